#!/usr/bin/env bash
# Fuzzes what a migration receiver does with its input, with libFuzzer, for N seconds per
# target (default 60): scripts/fuzz.sh [SECONDS] [TARGET...]. Targets (fuzz/fuzz_targets/):
# receiver_frames (frames, page batches, control messages), delta_frames (DeltaPages payloads
# and deltas) and receiver_handshake (the
# handshake before authentication); all of them unless named. Works on the stable
# toolchain: the coverage instrumentation is passed as plain codegen flags (no sanitizer).
# Exits non-zero if libFuzzer finds a crash; the input is left in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(receiver_frames receiver_handshake delta_frames)
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation out of build scripts.
bins=()
for t in "${targets[@]}"; do
    bins+=(--bin "$t")
done
cargo build --release --target x86_64-unknown-linux-gnu "${bins[@]}"
mkdir -p artifacts
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "fuzzing $t for $secs s"
    "target/x86_64-unknown-linux-gnu/release/$t" -max_total_time="$secs" -artifact_prefix=artifacts/ "corpus/$t"
done
