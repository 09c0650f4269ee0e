#!/bin/bash
# usage: exp_fence.sh TAG [holder args...]; hang FUSE storage under lockspace LSF, watch what sanlock does to the holder
D=/work/probe-sanlock; M=$D/mnt; TAG=$1; shift; cd $D
export SANLOCK_RUN_DIR=$D/runC
sanlock client inq_lockspace -s LSF:1:$M/ids:0 >/dev/null 2>&1 || sanlock client add_lockspace -s LSF:1:$M/ids:0 -o 2 >/dev/null
./holder "$@" -t -1 LSF:vm1:$M/leases:0 > logs/fence_$TAG.holder 2>&1 & H=$!
sleep 3
LAST=$(sanlock client renewal -s LSF | tail -1)
echo ok > fuse.mode; T0=$(date +%s.%N); echo hang > fuse.mode
echo "[$T0] storage HANG (last renewal: $LAST; monotime $(cut -d' ' -f1 /proc/uptime))"
for i in $(seq 1 1200); do kill -0 $H 2>/dev/null || break; sleep 0.1; done
T1=$(date +%s.%N); echo "[$T1] holder gone: $(echo "$T1-$T0"|bc) s after hang"
kill -0 $H 2>/dev/null && { echo "holder still alive after 120s"; }
wait $H; echo "holder exit status $?"
echo "--- holder log"; cat logs/fence_$TAG.holder
echo "--- killpath log"; cat logs/killpath.log; : > logs/killpath.log
sleep 1; echo ok > fuse.mode; echo "[$(date +%s.%N)] storage OK again"
sleep 3; echo "--- daemon C log (this run)"; awk -v t="$T0" '1' logs/daemonC.log | tail -40
echo "--- status"; sanlock client status
