#!/usr/bin/env bash
# Fuzzes the migration receiver's message parsing (fuzz/fuzz_targets/receiver_frames.rs) with
# libFuzzer for N seconds (default 60): scripts/fuzz.sh [SECONDS]. Works on the stable
# toolchain: the coverage instrumentation is passed as plain codegen flags (no sanitizer).
# Exits non-zero if libFuzzer finds a crash; the input is left in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation out of build scripts.
cargo build --release --target x86_64-unknown-linux-gnu --bin receiver_frames
mkdir -p corpus/receiver_frames artifacts
exec target/x86_64-unknown-linux-gnu/release/receiver_frames -max_total_time="$secs" -artifact_prefix=artifacts/ corpus/receiver_frames
