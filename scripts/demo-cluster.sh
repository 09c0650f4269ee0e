#!/usr/bin/env bash
# Ferry's controller demo (about a minute after the build, root): a controller
# (ferry cluster serve) on PostgreSQL (--postgres, the default: a private throwaway server from scripts/postgres.sh;
# --sqlite: SQLite in its state directory instead), three hosts in network namespaces joined
# by a switch bridge (as scripts/demo-hosts.sh makes them), a datastore directory all see.
# Host a gives VMs 2048 MiB, b 1536 MiB, c 1024 MiB and hides a CPU feature its KVM offers
# ([cpu] hide).
#   1. the hosts join the controller (c first: the cluster's CPU baseline is what c offers);
#      its inventory: hosts, the datastore all see, port groups, the CPU baseline (EVC);
#   2. two VMs created by placement (its ranking first, with --explain), started through
#      the controller with `ferry vm` (no --host: FERRY_SERVER is set);
#   3. m1's check table (every other host), placement's ranking for its migration, then
#      `ferry vm migrate m1` without naming a host; the guest's self-check keeps passing on
#      the host placement picked;
#   4. the controller's history: ferry cluster migrations, and the migration with its passes.
# Exits non-zero if anything fails; leaves no namespace, process or file behind.
# FERRY=path/to/ferry skips the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo-cluster: run as root (network namespaces)" >&2; exit 1; }
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo-cluster: /dev/kvm is not usable" >&2; exit 1; }
store=postgres
case "${1:-}" in
  --sqlite) store=sqlite ;;
  --postgres | "") ;;
  *) echo "usage: scripts/demo-cluster.sh [--postgres (the default) | --sqlite]" >&2; exit 2 ;;
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
  for ns in a b c k sw; do ip netns del "$tag-$ns" 2>/dev/null; done
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
cli() { in_ns k "$ferry" "$@"; }
A=https://10.89.0.1:7443
B=https://10.89.0.2:7443
C=https://10.89.0.3:7443
export FERRY_SERVER=https://10.89.0.100:7444

say "0. network: hosts a, b, c (10.89.0.1 to .3), the controller k (10.89.0.100), switch sw"
ip netns add "$tag-sw"
in_ns sw ip link add sw0 type bridge
in_ns sw ip link set sw0 up
for ns in a b c k; do
  ip netns add "$tag-$ns"
  in_ns "$ns" ip link set lo up
  ip link add "$tag-$ns" type veth peer name "$tag-$ns-sw"
  ip link set "$tag-$ns" netns "$tag-$ns"
  ip link set "$tag-$ns-sw" netns "$tag-sw"
  in_ns sw ip link set "$tag-$ns-sw" master sw0 up
done
n=1
for ns in a b c; do
  # Port group `prod` is each host's bridge br0 (fixed MAC, as in demo-hosts.sh).
  in_ns "$ns" ip link add br0 address "02:00:00:89:00:0$n" type bridge
  in_ns "$ns" ip link set "$tag-$ns" master br0 up
  in_ns "$ns" ip link set br0 up
  in_ns "$ns" ip addr add "10.89.0.$n/24" dev br0
  n=$((n + 1))
done
in_ns k ip link set "$tag-k" up
in_ns k ip addr add 10.89.0.100/24 dev "$tag-k"

say "1. the store ($store), a cluster CA, the controller, three hosts' daemons"
if [ "$store" = postgres ]; then
  scripts/postgres.sh start "$work/pg" > /dev/null || fail "PostgreSQL did not start"
  # The controller runs in namespace k: it reaches the server by its unix socket.
  database="database = \"postgres://postgres@localhost:$(cat "$work/pg/port")/postgres?host=$work/pg\""
  echo "PostgreSQL: private server in $work/pg (unix socket)" >&2
else
  database=""
  echo "SQLite: $work/ctl/cluster.db" >&2
fi
mkdir -p "$work/ds"
$ferry ca init --dir "$work/ca" > /dev/null
$ferry ca issue --ca "$work/ca" --name demo-cli --kind client --out "$work/client" > /dev/null
cat > "$work/cluster.toml" <<END
name = "demo-controller"
listen = "10.89.0.100:7444"
state_dir = "$work/ctl"
$database
END
$ferry cluster init --config "$work/cluster.toml" --ca "$work/ca" > /dev/null
ip netns exec "$tag-k" "$ferry" cluster serve --config "$work/cluster.toml" > "$work/controller.log" 2>&1 &
pids+=($!)
# start_host NAME N VM_MEMORY_MIB EXTRA_TOML: host NAME at 10.89.0.N.
start_host() {
  local h=$1 n=$2 mib=$3 extra=$4
  cat > "$work/host-$h.toml" <<END
name = "host-$h"
listen = "10.89.0.$n:7443"
state_dir = "$work/state-$h"
vm_memory_mib = $mib
$extra

[datastores]
shared = "$work/ds"

[portgroups]
prod = "br0"
END
  in_ns "$h" "$ferry" host init --config "$work/host-$h.toml" --ca "$work/ca" --address "10.89.0.$n" > /dev/null
  ip netns exec "$tag-$h" "$ferry" host serve --config "$work/host-$h.toml" > "$work/daemon-$h.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do cli host info --host "https://10.89.0.$n:7443" > /dev/null 2>&1 && break; sleep 0.1; done
  cli host info --host "https://10.89.0.$n:7443" > /dev/null || fail "host $h's daemon does not answer"
}
start_host a 1 2048 ""
start_host b 2 1536 ""
# Host c hides a feature host a's KVM offers that a guest can run without (as
# tests/host_cpu.rs picks it).
offered=$(cli host info --host $A --json) || fail "host a's inventory"
hide=""
for f in avx2 sse4.2 popcnt ssse3 sse3 lahf_lm cx16; do
  if grep -q "\"$f\"" <<<"$offered"; then hide=$f; break; fi
done
[ -n "$hide" ] || fail "host a's KVM offers none of the usual CPU features"
start_host c 3 1024 "[cpu]
hide = [\"$hide\"]"
echo "host c hides CPU feature $hide" >&2
for _ in $(seq 1 100); do cli cluster hosts > /dev/null 2>&1 && break; sleep 0.1; done
cli cluster hosts > /dev/null || fail "the controller does not answer"

say "2. the hosts join (c first: the CPU baseline is what c offers); the controller's inventory"
cli host join "$FERRY_SERVER" --host $C || fail "host c did not join"
cli host join "$FERRY_SERVER" --host $A || fail "host a did not join"
cli host join "$FERRY_SERVER" --host $B || fail "host b did not join"
cli cluster hosts
cli cluster datastores
cli cluster portgroups
# The cluster's CPU baseline (EVC): host c's; a and b hide their extra feature from VMs.
cli cluster evc || fail "the CPU baseline"

say "3. VMs created by placement (its ranking first), started through the controller"
# (Reports are read whole before grep: a pipe closed early would fail them under pipefail.)
running() { local out; out=$(cli vm show "$1" --json 2>/dev/null) || return 1; grep -q '"state": "running"' <<<"$out"; }
for vm in m1 m2; do
  create=(create "$vm" --datastore shared --memory-mib 256 --guest memstress --cmdline "wss=64M")
  cli cluster "${create[@]}" --explain || fail "the ranking of $vm"
  out=$(cli cluster "${create[@]}") || fail "the creation of $vm"
  grep '^host:' <<<"$out" >&2
  for _ in $(seq 1 50); do cli vm show "$vm" > /dev/null 2>&1 && break; sleep 0.2; done
  # `ferry vm` without --host goes through the controller (FERRY_SERVER is set).
  cli vm start "$vm" || fail "the start of $vm through the controller"
  for _ in $(seq 1 100); do running "$vm" && break; sleep 0.2; done
  running "$vm" || fail "the controller does not show $vm running"
done
cli vm list

say "4. m1: the check table, placement's ranking, then migrated without naming a host"
home=$work/ds/m1
for _ in $(seq 1 600); do grep -q "memstress: pass 2" "$home/console.log" 2>/dev/null && break; sleep 0.1; done
cli cluster migrate m1 --check || fail "the checks"
cli vm migrate m1 --explain || fail "the ranking"
last_pass() { grep -ao 'memstress: pass [0-9]*' "$home/console.log" | tail -1 | grep -o '[0-9]*$' || echo 0; }
before=$(last_pass)
out=$(cli vm migrate m1 2>&1) || { echo "$out"; fail "the migration by placement"; }
echo "$out"
dest=$(sed -n 's/.* to \(host-[a-z]*\) (picked by placement)$/\1/p' <<<"$out" | head -1)
[ -n "$dest" ] || fail "no destination in the migration's report"
for _ in $(seq 1 300); do
  now=$(last_pass)
  [ "$now" -gt "$before" ] && break; sleep 0.1
done
[ "$now" -gt "$before" ] || fail "the guest made no progress after the move"
if grep -a CORRUPTION "$home"/console*.log >&2; then fail "the guest found a page with the wrong stamp"; fi
echo "the guest was at pass $before before the move, now at pass $now" >&2
grep -h "placement of VM m1" "$work/controller.log" | cut -c1-160 >&2

say "5. the controller's history"
cli cluster migrations
history=$(cli cluster migrations --json) || fail "the controller's history"
id=$(grep -o '"id": "m-[0-9a-f]*"' <<<"$history" | sed -n '1s/.*"\(m-[0-9a-f]*\)"/\1/p')
[ -n "$id" ] || fail "no migration in the controller's history"
shown=$(cli cluster migration "$id") || fail "migration $id"
sed -n '1,6p' <<<"$shown"
echo "the controller's log follows it by its id:" >&2
grep -h "migration $id" "$work/controller.log" | cut -c1-160 >&2

say "done: stopping the VMs through the controller; the cleanup removes the namespaces, the store and $work"
# Until m1's old host's next heartbeat (2 s) the controller still has its report of m1 there:
# wait for the one report, from its new host.
on_dest() {
  local out; out=$(cli vm show m1 --json 2>/dev/null) || return 1
  [ "$(grep -c '"host":' <<<"$out")" = 1 ] && grep -q "\"host\": \"$dest\"" <<<"$out"
}
for _ in $(seq 1 50); do on_dest && running m1 && break; sleep 0.2; done
for vm in m1 m2; do
  cli vm stop "$vm" || fail "the stop of $vm"
done
