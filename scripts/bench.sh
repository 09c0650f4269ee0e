#!/usr/bin/env bash
# Runs one of Ferry's benchmarks against a release build: scripts/bench.sh boot [--json] [...]
# `cluster` starts a private PostgreSQL server for the run (scripts/postgres.sh) unless one is
# named. `migrate` also migrates the same guest with QEMU side by side: it installs
# qemu-system-x86_64 (Debian's qemu-system-x86) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "${1:-}" = migrate ] && ! command -v qemu-system-x86_64 >/dev/null; then
  echo "bench: installing qemu-system-x86 for the QEMU side-by-side run" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null; } ||
    echo "bench: could not install qemu-system-x86; the QEMU side-by-side run will be skipped" >&2
fi
cargo build --release --locked -q -p ferry -p ferry-bench
# `cluster` measures the controller on PostgreSQL too: a private server for the run unless
# one is named (--database URL or FERRY_TEST_POSTGRES_URL) or only SQLite is asked.
if [ "${1:-}" = cluster ] && [ -z "${FERRY_TEST_POSTGRES_URL:-}" ] &&
  ! printf '%s\n' "$@" | grep -qE '^(--database(=.*)?|--backend=sqlite|sqlite)$'; then
  pgdir=$(mktemp -d /tmp/ferry-bench-pg.XXXXXX)
  trap 'scripts/postgres.sh stop "$pgdir" >/dev/null 2>&1 || true; rm -rf "$pgdir"' EXIT
  FERRY_TEST_POSTGRES_URL=$(scripts/postgres.sh start "$pgdir")
  export FERRY_TEST_POSTGRES_URL
  target/release/ferry-bench "$@"
  exit
fi
exec target/release/ferry-bench "$@"
