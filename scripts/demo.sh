#!/usr/bin/env bash
# Ferry's demo on this machine (about a minute): a live migration there and back.
#   1. boots the memstress test guest: 1 GiB VM holding 512 MiB of random initrd content,
#      64 MiB working set whose every page it stamps and checks on every pass;
#   2. starts a second VMM (ferry receive) and live-migrates the running VM to it
#      (ferry migrate --verify): iterative pre-copy, then all guest memory hashed on both
#      sides while the guest is paused (that hashing is most of the ~100-150 ms downtime
#      shown here; without --verify the downtime is a few milliseconds); the first VMM
#      exits, the guest keeps passing its stamps there;
#   3. starts a third VMM and migrates the VM back, this time over two TCP streams
#      (--streams 2);
#   4. checks the guest's console: pass numbers keep increasing across both moves and no
#      page ever came back wrong (no CORRUPTION line), then stops the VM.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo: /dev/kvm is not usable (need KVM and read-write access)" >&2; exit 1; }
scripts/setup.sh
echo "demo: building Ferry (release)..." >&2
cargo build --release --locked -q -p ferry
ferry=$PWD/target/release/ferry

work=$(mktemp -d /tmp/ferry-demo-XXXX)
cleanup() { pkill -f "$work/" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export FERRY_STATE_DIR=$work/state

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
last_pass() { grep -o 'memstress: pass [0-9]*' "$1" | tail -1 | grep -o '[0-9]*$' || echo 0; }
wait_for() { # FILE PATTERN SECONDS
  for _ in $(seq 1 $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "demo: FAILED: no '$2' in $1 after $3 s" >&2; cat "$1" >&2; exit 1
}
wait_pass_after() { # CONSOLE N SECONDS
  for _ in $(seq 1 $(($3 * 10))); do [ "$(last_pass "$1")" -gt "$2" ] && return 0; sleep 0.1; done
  echo "demo: FAILED: the guest made no progress after pass $2 in $1" >&2; exit 1
}
receiver() { # NAME -> starts `ferry receive` on a free port, prints the port
  $ferry receive --listen tcp:127.0.0.1:0 --auth-key-file "$work/key" --api-socket "$work/$1.sock" \
    --serial "file:$work/$1.console" > /dev/null 2> "$work/$1.log" &
  wait_for "$work/$1.log" "waiting for an incoming migration" 10
  grep -o 'tcp:127.0.0.1:[0-9]*' "$work/$1.log" | head -1
}

say "0. a shared migration key and 512 MiB of random initrd content"
head -c 32 /dev/urandom > "$work/key"
head -c 512M /dev/urandom > "$work/initrd.img"

say "1. ferry run: memstress, 1 GiB, 512 MiB initrd, wss=64M (VMM A)"
$ferry run --guest memstress --memory 1G --initrd "$work/initrd.img" --cmdline "wss=64M" \
  --api-socket "$work/a.sock" --home "$work/home" --serial "file:$work/a.console" > /dev/null 2> "$work/a.log" &
a_pid=$!
wait_for "$work/a.console" "memstress: ready" 60
wait_pass_after "$work/a.console" 1 60
grep -m3 "memstress" "$work/a.console" >&2
$ferry info --api-socket "$work/a.sock"

say "2. ferry migrate: A -> B (a second VMM process)"
to_b=$(receiver b)
$ferry migrate --api-socket "$work/a.sock" --to "$to_b" --auth-key-file "$work/key" --verify
wait $a_pid
a_last=$(last_pass "$work/a.console")
wait_pass_after "$work/b.console" "$a_last" 30
echo "VMM A exited after pass $a_last; on B the guest is at pass $(last_pass "$work/b.console")" >&2

say "3. ferry migrate --streams 2: B -> C (back to a third VMM process, over two TCP streams)"
to_c=$(receiver c)
b_pid=$(pgrep -f -- "--api-socket $work/b.sock")
$ferry migrate --api-socket "$work/b.sock" --to "$to_c" --auth-key-file "$work/key" --verify --streams 2
while kill -0 "$b_pid" 2>/dev/null; do sleep 0.1; done
b_last=$(last_pass "$work/b.console")
wait_pass_after "$work/c.console" "$b_last" 30
$ferry info --api-socket "$work/c.sock"

say "4. the guest's view (its console on A, B and C around each move)"
if grep -h CORRUPTION "$work"/*.console >&2; then
  echo "demo: FAILED: the guest found a page with the wrong stamp" >&2
  exit 1
fi
for v in a b c; do
  echo "--- console on VMM ${v^^}:" >&2
  grep "memstress: pass" "$work/$v.console" | sed -n '1p;$p' >&2
done

say "5. the hosts' view (each migration's log lines on its source)"
grep -h "migration .*: pre-copy pass\|downtime" "$work/a.log" "$work/b.log" >&2
kill -TERM "$(pgrep -f -- "--api-socket $work/c.sock")"
echo "demo: memstress ran passes 1-$a_last on A, $((a_last + 1))-$b_last on B, then on C up to pass $(last_pass "$work/c.console"); every page kept its stamp (no CORRUPTION)." >&2
