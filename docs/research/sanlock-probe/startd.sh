#!/bin/sh
# usage: startd.sh NAME [extra daemon args]  -> runs sanlock daemon with SANLOCK_RUN_DIR=$PWD/runNAME
D=/work/probe-sanlock; N=$1; shift
mkdir -p $D/run$N && chown sanlock:sanlock $D/run$N
SANLOCK_RUN_DIR=$D/run$N LD_PRELOAD=$D/rlimit_shim.so setsid ${NETNS_WRAP:-} sanlock daemon -D -w 0 -l 0 -h 0 -U sanlock -G sanlock -e host$N "$@" >$D/logs/daemon$N.log 2>&1 &
echo $! > $D/logs/daemon$N.pid
