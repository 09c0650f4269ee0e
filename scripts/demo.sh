#!/usr/bin/env bash
# Ferry's demo on this machine: builds Ferry, then boots the memstress test guest (256 MiB,
# 16 MiB working set) on KVM with its console here. memstress stamps every page of its
# working set on each pass and checks the previous stamps, so any lost or stale page would
# show as a CORRUPTION line. Stop it with Ctrl-C (Ferry exits 0).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo: /dev/kvm is not usable (need KVM and read-write access)" >&2; exit 1; }
scripts/setup.sh
cargo build --release --locked -q -p ferry
exec target/release/ferry run --guest memstress --memory 256M --cmdline "wss=16M" "$@"
