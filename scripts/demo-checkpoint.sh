#!/usr/bin/env bash
# Ferry's checkpoint demo on this machine (about 20 seconds): suspend and resume.
#   1. boots the memstress test guest (256 MiB VM, 16 MiB working set) on KVM;
#   2. suspends it to a checkpoint directory (ferry snapshot --stop): its VMM exits;
#   3. resumes it in a new VMM process (ferry restore): memstress's pass counter continues
#      and every page still carries the stamp of the pass before (no CORRUPTION line);
#   4. stops it.
# scripts/demo.sh shows the live migration.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo: /dev/kvm is not usable (need KVM and read-write access)" >&2; exit 1; }
scripts/setup.sh
echo "demo: building Ferry (release)..." >&2
cargo build --release --locked -q -p ferry
ferry=target/release/ferry

work=$(mktemp -d /tmp/ferry-demo-XXXX)
cleanup() { pkill -f "$work/" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

say "1. ferry run: memstress, 256 MiB, wss=16M (console below)"
$ferry run --guest memstress --memory 256M --cmdline "wss=16M" --api-socket "$work/vm.sock" --home "$work/home" \
  --log-level warn > "$work/console1" &
run_pid=$!
tail -f "$work/console1" --pid=$run_pid &
sleep 4
$ferry info --api-socket "$work/vm.sock"

say "2. ferry snapshot --stop: suspend to $work/checkpoint"
$ferry snapshot --api-socket "$work/vm.sock" --to "$work/checkpoint" --stop
wait $run_pid
last=$(grep -o 'memstress: pass [0-9]*' "$work/console1" | tail -1)
echo "suspended after: $last" >&2
ls -ls "$work/checkpoint" >&2

say "3. ferry restore: resume in a new VMM process"
$ferry restore --from "$work/checkpoint" --api-socket "$work/vm2.sock" --log-level warn > "$work/console2" &
restore_pid=$!
tail -f "$work/console2" --pid=$restore_pid &
sleep 4
$ferry info --api-socket "$work/vm2.sock"

say "4. stop"
kill -TERM $restore_pid
wait $restore_pid
first=$(grep -o 'memstress: pass [0-9]*' "$work/console2" | head -1)
if grep -q CORRUPTION "$work/console1" "$work/console2"; then
  echo "demo: FAILED: the guest reported corruption" >&2
  exit 1
fi
echo "demo: suspended at '$last', resumed with '$first', no corruption." >&2
