#!/bin/bash
# host A holds vm1; SIGSTOP daemon A; host B retries acquire (default flags) every 0.5 s.
D=/work/probe-sanlock; R=LS:vm1:$D/ds/leases:0; cd $D
SANLOCK_RUN_DIR=$D/runA ./holder -t -1 $R > logs/stop_a.log 2>&1 & HA=$!
sleep 1
PA=$(cat logs/daemonA.pid); PAS=$(pgrep -P $PA || true)
echo "last A renewal before stop:"; SANLOCK_RUN_DIR=$D/runB sanlock client host_status -s LS
T0=$(date +%s.%N); echo "SIGSTOP daemon A ($PA) at $T0 (monotime $(cut -d' ' -f1 /proc/uptime))"; kill -STOP $PA
for i in $(seq 1 400); do
  out=$(SANLOCK_RUN_DIR=$D/runB ./holder -t 0 $R 2>&1)
  if echo "$out" | grep -q 'rv=0 (ok)'; then T1=$(date +%s.%N); echo "B acquired at $T1: $(echo "$T1-$T0"|bc) s after SIGSTOP"; echo "$out"; break; fi
  [ $((i % 10)) = 1 ] && echo "$(echo "$(date +%s.%N)-$T0"|bc) s: $(echo "$out" | grep acquire | sed 's/.*acquire//')"
  sleep 0.5
done
SANLOCK_RUN_DIR=$D/runB sanlock client host_status -s LS -D | head -12
echo "A's holder still alive? $(kill -0 $HA 2>/dev/null && echo YES-still-running || echo no)"
kill -CONT $PA; sleep 6; echo "after SIGCONT A:"; tail -20 logs/daemonA.log; cat logs/stop_a.log; kill -0 $HA 2>/dev/null && { echo "A holder still alive after CONT"; kill $HA; }
sleep 1; cat logs/stop_a.log
