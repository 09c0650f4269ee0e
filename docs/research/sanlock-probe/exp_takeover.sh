#!/bin/bash
# host C reaches the datastore through FUSE (mnt/), host B directly (fbk/): same files.
# C holds vm1 with a killpath that makes it release; C's storage hangs; B waits to acquire.
D=/work/probe-sanlock; cd $D
SANLOCK_RUN_DIR=$D/runB sanlock client inq_lockspace -s LSF:2:$D/fbk/ids:0 >/dev/null 2>&1 || SANLOCK_RUN_DIR=$D/runB sanlock client add_lockspace -s LSF:2:$D/fbk/ids:0 -o 2
SANLOCK_RUN_DIR=$D/runC sanlock client inq_lockspace -s LSF:1:$D/mnt/ids:0 >/dev/null 2>&1 || SANLOCK_RUN_DIR=$D/runC sanlock client add_lockspace -s LSF:1:$D/mnt/ids:0 -o 2
SANLOCK_RUN_DIR=$D/runC timeout 150 ./holder -k $D/killpath.sh -P -a vm1 -e 2 -t -1 LSF:vm1:$D/mnt/leases:0 > logs/take_c.log 2>&1 &
sleep 3
echo "B nowait attempt while C holds:"; SANLOCK_RUN_DIR=$D/runB ./holder -w -t 0 LSF:vm1:$D/fbk/leases:0 | grep acquire
echo "C last renewal: $(SANLOCK_RUN_DIR=$D/runC sanlock client renewal -s LSF | tail -1)"
T0=$(date +%s.%N); echo hang > fuse.mode; echo "[$T0] C storage HANG, monotime $(cut -d' ' -f1 /proc/uptime)"
for i in $(seq 1 300); do
  SANLOCK_RUN_DIR=$D/runB timeout 150 ./holder -t 0 LSF:vm1:$D/fbk/leases:0 > logs/take_b.log 2>&1 && break
  [ $((i % 10)) = 1 ] && echo "$(echo "$(date +%s.%N)-$T0"|bc) s: $(grep acquire logs/take_b.log | sed 's/.*acquire//')"
  sleep 0.5
done
echo "C holder alive at B acquisition? $(pgrep -f 'holder -k' >/dev/null && echo YES || echo no)"
T1=$(date +%s.%N); echo "[$T1] B acquire returned $(echo "$T1-$T0"|bc) s after hang, monotime $(cut -d' ' -f1 /proc/uptime)"
cat logs/take_b.log; cat logs/take_c.log; cat logs/killpath.log; : > logs/killpath.log
sanlock direct dump $D/fbk/leases
echo ok > fuse.mode
