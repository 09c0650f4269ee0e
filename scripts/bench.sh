#!/usr/bin/env bash
# Runs one of Ferry's benchmarks against a release build: scripts/bench.sh boot [--json] [...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p ferry -p ferry-bench
exec target/release/ferry-bench "$@"
