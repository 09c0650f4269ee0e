#!/usr/bin/env bash
# Ferry's controller demo (about a minute after the build, root): a controller
# (ferry cluster serve) on PostgreSQL (a private throwaway server from scripts/postgres.sh;
# --sqlite: SQLite in its state directory instead), two hosts in network namespaces joined by
# a switch bridge (as scripts/demo-hosts.sh makes them), a datastore directory both see.
#   1. both hosts join the controller; its inventory: hosts, the datastore both see, port
#      groups, VMs, the CPU baseline (EVC);
#   2. a memstress VM on host a: the per-host check table, then a migration by name through
#      the controller; the guest's self-check keeps passing on host b;
#   3. the controller's history: ferry cluster migrations, and the migration with its passes.
# Exits non-zero if anything fails; leaves no namespace, process or file behind.
# FERRY=path/to/ferry skips the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo-cluster: run as root (network namespaces)" >&2; exit 1; }
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo-cluster: /dev/kvm is not usable" >&2; exit 1; }
store=postgres
case "${1:-}" in
  --sqlite) store=sqlite ;;
  "") ;;
  *) echo "usage: scripts/demo-cluster.sh [--sqlite]" >&2; exit 2 ;;
esac
if [ -z "${FERRY:-}" ]; then
  scripts/setup.sh
  echo "demo-cluster: building Ferry (release)..." >&2
  cargo build --release --locked -q -p ferry
  FERRY=$PWD/target/release/ferry
fi
ferry=$FERRY

tag=fyc$$
work=$(mktemp -d /tmp/ferry-demo-cluster-XXXX)
pids=()
cleanup() {
  set +e
  for vmm in $(pgrep -f -- "--home $work/ds/"); do kill -9 "$vmm" 2>/dev/null; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  [ -d "$work/pg/data" ] && scripts/postgres.sh stop "$work/pg"
  for ns in a b c sw; do ip netns del "$tag-$ns" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
fail() {
  echo "demo-cluster: FAILED: $*" >&2
  for log in "$work"/*.log; do echo "--- the end of $(basename "$log"):" >&2; tail -n 15 "$log" >&2; done
  exit 1
}
in_ns() { local ns=$1; shift; ip netns exec "$tag-$ns" "$@"; }
export FERRY_IDENTITY=$work/client
cli() { in_ns c "$ferry" "$@"; }
A=https://10.89.0.1:7443
B=https://10.89.0.2:7443
export FERRY_SERVER=https://10.89.0.100:7444

say "0. network: hosts a (10.89.0.1) and b (10.89.0.2), the controller c (10.89.0.100), switch sw"
ip netns add "$tag-sw"
in_ns sw ip link add sw0 type bridge
in_ns sw ip link set sw0 up
n=1
for ns in a b c; do
  ip netns add "$tag-$ns"
  in_ns "$ns" ip link set lo up
  ip link add "$tag-$ns" type veth peer name "$tag-$ns-sw"
  ip link set "$tag-$ns" netns "$tag-$ns"
  ip link set "$tag-$ns-sw" netns "$tag-sw"
  in_ns sw ip link set "$tag-$ns-sw" master sw0 up
done
for ns in a b; do
  # Port group `prod` is each host's bridge br0 (fixed MAC, as in demo-hosts.sh).
  in_ns "$ns" ip link add br0 address "02:00:00:89:00:0$n" type bridge
  in_ns "$ns" ip link set "$tag-$ns" master br0 up
  in_ns "$ns" ip link set br0 up
  in_ns "$ns" ip addr add "10.89.0.$n/24" dev br0
  n=$((n + 1))
done
in_ns c ip link set "$tag-c" up
in_ns c ip addr add 10.89.0.100/24 dev "$tag-c"

say "1. the store ($store), a cluster CA, the controller, two hosts' daemons"
if [ "$store" = postgres ]; then
  scripts/postgres.sh start "$work/pg" > /dev/null || fail "PostgreSQL did not start"
  # The controller runs in namespace c: it reaches the server by its unix socket.
  database="database = \"postgres://postgres@localhost:$(cat "$work/pg/port")/postgres?host=$work/pg\""
  echo "PostgreSQL: private server in $work/pg (unix socket)" >&2
else
  database=""
  echo "SQLite: $work/ctl/cluster.db" >&2
fi
mkdir -p "$work/ds"
$ferry ca init --dir "$work/ca" > /dev/null
$ferry ca issue --ca "$work/ca" --name demo-cli --kind client --out "$work/client" > /dev/null
cat > "$work/cluster.toml" <<EOF
name = "demo-controller"
listen = "10.89.0.100:7444"
state_dir = "$work/ctl"
$database
EOF
$ferry cluster init --config "$work/cluster.toml" --ca "$work/ca" > /dev/null
ip netns exec "$tag-c" "$ferry" cluster serve --config "$work/cluster.toml" > "$work/controller.log" 2>&1 &
pids+=($!)
n=1
for h in a b; do
  cat > "$work/host-$h.toml" <<EOF
name = "host-$h"
listen = "10.89.0.$n:7443"
state_dir = "$work/state-$h"

[datastores]
shared = "$work/ds"

[portgroups]
prod = "br0"
EOF
  in_ns "$h" "$ferry" host init --config "$work/host-$h.toml" --ca "$work/ca" --address "10.89.0.$n" > /dev/null
  ip netns exec "$tag-$h" "$ferry" host serve --config "$work/host-$h.toml" > "$work/daemon-$h.log" 2>&1 &
  pids+=($!)
  n=$((n + 1))
done
for url in $A $B; do
  for _ in $(seq 1 100); do cli host info --host "$url" > /dev/null 2>&1 && break; sleep 0.1; done
done
for _ in $(seq 1 100); do cli cluster hosts > /dev/null 2>&1 && break; sleep 0.1; done
cli cluster hosts > /dev/null || fail "the controller does not answer"

say "2. both hosts join; the controller's inventory"
cli host join "$FERRY_SERVER" --host $A || fail "host a did not join"
cli host join "$FERRY_SERVER" --host $B || fail "host b did not join"
cli vm --host $A create m1 --datastore shared --memory-mib 256 --guest memstress --cmdline "wss=64M" > /dev/null
cli vm --host $A start m1 > /dev/null
home=$work/ds/m1
# (Reports are read whole before grep: a pipe closed early would fail them under pipefail.)
m1_running() { local out; out=$(cli cluster vm m1 --json 2>/dev/null) || return 1; grep -q '"state": "running"' <<<"$out"; }
for _ in $(seq 1 100); do m1_running && break; sleep 0.2; done
m1_running || fail "the controller does not show m1 running"
cli cluster hosts
cli cluster datastores
cli cluster portgroups
cli cluster vms
# The cluster's CPU baseline (EVC): set by the first host to join; m1 runs under it.
cli cluster evc || fail "the CPU baseline"

say "3. the check table (every other host), then m1 migrated to host b by name through the controller"
for _ in $(seq 1 600); do grep -q "memstress: pass 2" "$home/console.log" 2>/dev/null && break; sleep 0.1; done
cli cluster migrate m1 --check || fail "the checks"
last_pass() { grep -ao 'memstress: pass [0-9]*' "$home/console.log" | tail -1 | grep -o '[0-9]*$' || echo 0; }
before=$(last_pass)
cli cluster migrate m1 --to-host host-b || fail "the migration through the controller"
for _ in $(seq 1 300); do
  now=$(last_pass)
  [ "$now" -gt "$before" ] && break; sleep 0.1
done
[ "$now" -gt "$before" ] || fail "the guest made no progress on host b"
if grep -a CORRUPTION "$home"/console*.log >&2; then fail "the guest found a page with the wrong stamp"; fi
echo "the guest was at pass $before before the move, now at pass $now on host b" >&2

say "4. the controller's history"
cli cluster migrations
history=$(cli cluster migrations --json) || fail "the controller's history"
id=$(grep -o '"id": "m-[0-9a-f]*"' <<<"$history" | sed -n '1s/.*"\(m-[0-9a-f]*\)"/\1/p')
[ -n "$id" ] || fail "no migration in the controller's history"
shown=$(cli cluster migration "$id") || fail "migration $id"
sed -n '1,6p' <<<"$shown"
echo "the controller's log follows it by its id:" >&2
grep -h "migration $id" "$work/controller.log" | cut -c1-160 >&2

say "done: stopping the VM; the cleanup removes the namespaces, the store and $work"
cli vm --host $B stop m1 > /dev/null
