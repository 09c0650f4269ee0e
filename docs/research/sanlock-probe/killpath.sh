#!/bin/sh
# sanlock killpath helper: called by sanlock's helper process when the lockspace
# of a lease held by pid $last-arg is failing. Tell the "VMM" to pause vCPUs.
PID=$(eval echo \${$#})
echo "$(date +%s.%N) killpath uid=$(id -u) args=[$*] -> kill -USR1 $PID" >> /work/probe-sanlock/logs/killpath.log
kill -USR1 "$PID"
