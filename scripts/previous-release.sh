#!/usr/bin/env bash
# Builds the `ferry` binary of the previous release (the last line of RELEASES) from this
# repository's own history, in a cached work tree under target/previous/, and prints its
# path. The test suite migrates VMs between it and the current build (rolling upgrades:
# operators upgrade hosts one at a time, so a VM must move from the previous release to
# this one).
#
# Usage: scripts/previous-release.sh      (idempotent: a binary already built is kept)
set -euo pipefail
cd "$(dirname "$0")/.."

line=$(grep -v '^#' RELEASES | awk 'NF >= 2' | tail -1)
version=$(echo "$line" | awk '{print $1}')
commit=$(echo "$line" | awk '{print $2}')
[ -n "$commit" ] || { echo "previous-release: RELEASES lists no release" >&2; exit 1; }

base=$PWD/target/previous/$commit
bin=$base/ferry
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
  echo "previous-release: commit $commit (release $version) is not in this repository's history;" \
       "a shallow clone? fetch the full history (git fetch --unshallow)" >&2
  exit 1
fi
echo "previous-release: building Ferry $version ($commit) once; later runs reuse it" >&2
rm -rf "$base/src"
mkdir -p "$base/src"
git archive "$commit" | tar -x -C "$base/src"
# Its own Cargo.lock, its own target directory (kept for incremental rebuilds).
CARGO_TARGET_DIR=$base/target cargo build --locked -q --manifest-path "$base/src/Cargo.toml" -p ferry --bin ferry
cp "$base/target/debug/ferry" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
