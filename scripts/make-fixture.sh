#!/usr/bin/env bash
# Writes the checkpoint fixture the test suite restores to prove a later Ferry still reads
# format version N: a 16 MiB memstress VM suspended after a few passes.
# Usage: scripts/make-fixture.sh OUTDIR   (e.g. crates/ferry/tests/fixtures/checkpoint-v1)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/make-fixture.sh OUTDIR}
[ ! -e "$out" ] || { echo "make-fixture: $out exists; remove it first" >&2; exit 1; }
cargo build -q -p ferry
sock=$(mktemp -u /tmp/ferry-fixture-XXXX.sock)
console=$(mktemp)
target/debug/ferry run --guest memstress --memory 16M --cmdline "wss=1M seed=7" \
  --api-socket "$sock" --serial "file:$console" --log-level warn &
pid=$!
for _ in $(seq 100); do
  grep -q "memstress: pass 3" "$console" 2>/dev/null && break
  sleep 0.1
done
grep -q "memstress: pass 3" "$console" || { kill $pid; echo "make-fixture: memstress did not reach pass 3" >&2; exit 1; }
target/debug/ferry snapshot --api-socket "$sock" --to "$out" --stop
wait $pid
rm -f "$console"
ls -la "$out"
