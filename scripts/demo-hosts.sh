#!/usr/bin/env bash
# Ferry's host demo (about a minute, root): two hosts and a client in network namespaces
# joined by a switch bridge, each host with its daemon (ferry host serve, mutual TLS from a
# demo cluster CA), a datastore directory both hosts see and a port group `prod` on each.
#   1. a netecho VM is created on host A and migrated to host B by name while the client
#      pings it every 10 ms: the outage the client saw is printed;
#   2. a memstress VM is created on host A, migrated to B and back by name; its self-check
#      (every page of its working set stamped and checked on every pass) keeps passing;
#   3. each host's migration history (ferry host migrations) is printed: the same ids on
#      both hosts, one as source and one as destination.
# Exits non-zero if anything fails; leaves no namespace, process or file behind.
# FERRY=path/to/ferry skips the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo-hosts: run as root (network namespaces, taps)" >&2; exit 1; }
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo-hosts: /dev/kvm is not usable" >&2; exit 1; }
if [ -z "${FERRY:-}" ]; then
  scripts/setup.sh
  echo "demo-hosts: building Ferry (release)..." >&2
  cargo build --release --locked -q -p ferry
  FERRY=$PWD/target/release/ferry
fi
ferry=$FERRY

tag=fyd$$
work=$(mktemp -d /tmp/ferry-demo-hosts-XXXX)
pids=()
cleanup() {
  set +e
  # The VMs' VMMs (they outlive the daemons by design), then the daemons.
  for vmm in $(pgrep -f -- "--home $work/ds/"); do kill -9 "$vmm" 2>/dev/null; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  # Whatever still runs with this demo's configuration (a daemon started another way).
  pkill -f -- "host serve --config $work/" 2>/dev/null
  for ns in a b c sw; do ip netns del "$tag-$ns" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
fail() {
  echo "demo-hosts: FAILED: $*" >&2
  for h in a b; do echo "--- the end of host $h's daemon log:" >&2; tail -n 15 "$work/daemon-$h.log" >&2; done
  exit 1
}
in_ns() { local ns=$1; shift; ip netns exec "$tag-$ns" "$@"; }
export FERRY_IDENTITY=$work/client
cli() { in_ns c "$ferry" "$@"; }
A=https://10.88.0.1:7443
B=https://10.88.0.2:7443

say "0. network: hosts a (10.88.0.1) and b (10.88.0.2), client c (10.88.0.100), switch sw"
ip netns add "$tag-sw"
in_ns sw ip link add sw0 type bridge
in_ns sw ip link set sw0 up
for ns in a b c; do
  ip netns add "$tag-$ns"
  in_ns "$ns" ip link set lo up
  ip link add "$tag-$ns" type veth peer name "$tag-$ns-sw"
  ip link set "$tag-$ns" netns "$tag-$ns"
  ip link set "$tag-$ns-sw" netns "$tag-sw"
  in_ns sw ip link set "$tag-$ns-sw" master sw0 up
done
n=1
for ns in a b; do
  # Each host's port group `prod` is its bridge br0, which its uplink joins to the switch.
  # Its MAC is fixed: a bridge otherwise takes its ports' lowest, which changes when a VM's
  # tap leaves it, and the host's address would go unreachable until ARP caches expire.
  in_ns "$ns" ip link add br0 address "02:00:00:88:00:0$n" type bridge
  in_ns "$ns" ip link set "$tag-$ns" master br0 up
  in_ns "$ns" ip link set br0 up
  in_ns "$ns" ip addr add "10.88.0.$n/24" dev br0
  n=$((n + 1))
done
in_ns c ip link set "$tag-c" up
in_ns c ip addr add 10.88.0.100/24 dev "$tag-c"

say "1. a cluster CA, the client's identity, two hosts' daemons, one shared datastore"
mkdir -p "$work/ds"
$ferry ca init --dir "$work/ca" > /dev/null
$ferry ca issue --ca "$work/ca" --name demo-cli --kind client --out "$work/client" > /dev/null
n=1
for h in a b; do
  cat > "$work/host-$h.toml" <<EOF
name = "host-$h"
listen = "10.88.0.$n:7443"
state_dir = "$work/state-$h"

[datastores]
shared = "$work/ds"

[portgroups]
prod = "br0"
EOF
  in_ns "$h" "$ferry" host init --config "$work/host-$h.toml" --ca "$work/ca" --address "10.88.0.$n" > /dev/null
  # Not through in_ns: a shell function in the background is a subshell whose pid is not
  # the daemon's; `ip netns exec` execs the daemon in its own pid.
  ip netns exec "$tag-$h" "$ferry" host serve --config "$work/host-$h.toml" > "$work/daemon-$h.log" 2>&1 &
  pids+=($!)
  n=$((n + 1))
done
for url in $A $B; do
  for _ in $(seq 1 100); do cli host info --host "$url" > /dev/null 2>&1 && break; sleep 0.1; done
  cli host info --host "$url" | sed -n 1p
done

wait_console() { # HOME PATTERN SECONDS
  for _ in $(seq 1 $(($3 * 10))); do grep -q "$2" "$1/console.log" 2>/dev/null && return 0; sleep 0.1; done
  fail "no '$2' on the console of $1 after $3 s"
}
last_pass() { grep -ao 'memstress: pass [0-9]*' "$1/console.log" | tail -1 | grep -o '[0-9]*$' || echo 0; }

say "2. a netecho VM on host a, port group prod; migrated to host b by name while the client pings it"
cli vm --host $A create web1 --datastore shared --memory-mib 64 --guest netecho \
  --cmdline "ip=10.88.0.50/24" --nic portgroup=prod > /dev/null
cli vm --host $A start web1 > /dev/null
wait_console "$work/ds/web1" "netecho: ready" 30
in_ns c ping -c 3 -i 0.2 -W 2 10.88.0.50 > /dev/null || fail "the VM does not answer ping on host a"
# 400 pings 10 ms apart (about 4 s): the migration happens in their middle.
in_ns c ping -D -i 0.01 -c 400 -W 1 10.88.0.50 > "$work/ping.log" 2>&1 &
ping_pid=$!
sleep 1
cli vm --host $A migrate web1 --to-host $B || fail "migration of web1"
wait "$ping_pid" || true
in_ns c ping -c 3 -i 0.2 -W 2 10.88.0.50 > /dev/null || fail "the VM does not answer ping on host b"
grep -o '^\[[0-9.]*\]' "$work/ping.log" | tr -d '[]' | awk '
  NR > 1 { gap = ($1 - prev) * 1000; if (gap > max) max = gap } { prev = $1; n++ }
  END { printf "network outage seen by the client: %.1f ms (longest silence between %d replies, 10 ms interval)\n", max, n }' >&2
cli vm --host $B show web1 | sed -n 1,3p

say "3. a memstress VM on host a, migrated to host b and back by name; its self-check keeps passing"
cli vm --host $A create m1 --datastore shared --memory-mib 256 --guest memstress --cmdline "wss=64M" > /dev/null
cli vm --host $A start m1 > /dev/null
home=$work/ds/m1
wait_console "$home" "memstress: pass 2" 60
for move in "$A $B" "$B $A"; do
  set -- $move
  before=$(last_pass "$home")
  cli vm --host "$1" migrate m1 --to-host "$2" --streams 2 || fail "migration of m1 from $1 to $2"
  for _ in $(seq 1 300); do [ "$(last_pass "$home")" -gt "$before" ] && break; sleep 0.1; done
  [ "$(last_pass "$home")" -gt "$before" ] || fail "the guest made no progress after pass $before on $2"
  echo "the guest was at pass $before before the move, now at pass $(last_pass "$home") on $2" >&2
done
if grep -a CORRUPTION "$home"/console*.log >&2; then fail "the guest found a page with the wrong stamp"; fi
cli vm --host $A show m1 | sed -n 1,3p

say "4. each host's migration history: the same ids on both hosts"
for url in $A $B; do
  echo "--- $url" >&2
  cli host migrations --host "$url"
done
ids_a=$(cli host migrations --host $A --json | grep -o '"id": "m-[0-9a-f]*"' | sort)
ids_b=$(cli host migrations --host $B --json | grep -o '"id": "m-[0-9a-f]*"' | sort)
[ -n "$ids_a" ] && [ "$ids_a" = "$ids_b" ] || fail "the two hosts' histories differ"
echo "one grep over both daemons' logs follows a migration:" >&2
first=$(echo "$ids_a" | head -1 | grep -o 'm-[0-9a-f]*')
grep -h "migration $first" "$work"/daemon-*.log | cut -c1-160 >&2

say "done: stopping the VMs; the cleanup removes the namespaces and $work"
cli vm --host $B stop web1 > /dev/null
cli vm --host $A stop m1 > /dev/null
