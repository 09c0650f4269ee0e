#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit tests, and end-to-end tests that boot real guests on
# KVM (memstress, Debian's cloud kernel). Installs what the tests need first.
#
# It fails, loudly, if /dev/kvm is not usable or it does not run as root: a suite that
# skips its KVM tests proves nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "ferry tests: FATAL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "the suite must run as root (network namespaces, /dev/kvm, mount namespaces)"
[ -e /dev/kvm ] || die "/dev/kvm does not exist: this machine has no KVM"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is not readable and writable"
python3 - <<'PY' || die "/dev/kvm cannot be opened or does not answer KVM_GET_API_VERSION"
import fcntl, os
fd = os.open('/dev/kvm', os.O_RDWR)
assert fcntl.ioctl(fd, 0xAE00, 0) == 12
PY

scripts/setup.sh

# The Linux boot check's kernel (cached in target/linux).
FERRY_TEST_VMLINUX=$(scripts/fetch-linux.sh target/linux)
export FERRY_TEST_VMLINUX
# The previous release, for the rolling-upgrade test (built once, cached in target/previous).
FERRY_PREVIOUS_BIN=$(scripts/previous-release.sh)
export FERRY_PREVIOUS_BIN

# The controller's store tests run on PostgreSQL too: a private throwaway server, stopped
# (and its directory removed) at exit; a test that needs it fails if it is missing.
pgdir=$(mktemp -d /tmp/ferry-test-postgres.XXXXXX)
trap 'scripts/postgres.sh stop "$pgdir" || true; rm -rf "$pgdir"' EXIT
FERRY_TEST_POSTGRES_URL=$(scripts/postgres.sh start "$pgdir")
export FERRY_TEST_POSTGRES_URL
export FERRY_TEST_REQUIRE_POSTGRES=1

# KVM guests here run by instruction emulation on 2 cores: two tests at a time keeps
# each guest's pace close to what it has alone.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-2}
log=$(mktemp)
trap 'rm -f "$log"; scripts/postgres.sh stop "$pgdir" || true; rm -rf "$pgdir"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary, the last of
# which is often an empty doc-test run).
passed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo
echo "ferry tests: $passed passed, $failed failed"
[ "$status" = 0 ] || echo "ferry tests: FAILED (cargo test exited $status)" >&2
exit "$status"
