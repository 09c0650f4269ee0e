#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64) and extracts an uncompressed
# vmlinux from it, for Ferry's Linux boot check. The kernel is Debian's stock build with
# CONFIG_PVH=y, so Ferry boots it through the PVH entry note.
#
# Usage: scripts/fetch-linux.sh [OUTDIR]   (default: target/linux)
# Prints the path of the vmlinux on stdout. Idempotent: a kernel already extracted is kept.
set -euo pipefail

out=${1:-target/linux}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ -s "$out/vmlinux" ] && [ -s "$out/version" ]; then
  echo "$out/vmlinux"
  exit 0
fi

need_pkg() { # tool package
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "fetch-linux: installing $2" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

# The metapackage names the current versioned kernel package.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
if [ -z "$pkg" ]; then
  echo "fetch-linux: refreshing the package lists" >&2
  apt-get update -qq >/dev/null
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "fetch-linux: cannot find Debian's linux-image-cloud-amd64 package" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetch-linux: downloading $pkg" >&2
(cd "$work" && apt-get download -qq "$pkg" 2>/dev/null) || (cd "$work" && apt-get download "$pkg" >&2)
deb=$(ls "$work"/*.deb)
dpkg-deb -x "$deb" "$work/x"
vmlinuz=$(ls "$work"/x/boot/vmlinuz-*)

# A bzImage's setup header says where the compressed kernel starts (payload_offset,
# relative to the protected-mode code after the setup sectors) and how long it is.
python3 - "$vmlinuz" "$work/payload" <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
if d[0x202:0x206] != b'HdrS':
    sys.exit('fetch-linux: %s is not a bzImage' % sys.argv[1])
setup_sects = d[0x1f1] or 4
offset, length = struct.unpack_from('<II', d, 0x248)
start = (setup_sects + 1) * 512 + offset
open(sys.argv[2], 'wb').write(d[start:start + length])
PY

magic=$(head -c 6 "$work/payload" | od -An -tx1 | tr -d ' \n')
case "$magic" in
  1f8b*)         need_pkg gzip gzip;   dec="gzip -dc" ;;
  fd377a585a00*) need_pkg xz xz-utils; dec="xz -dc" ;;
  28b52ffd*)     need_pkg zstd zstd;   dec="zstd -dcq" ;;
  02214c18*)     need_pkg lz4 lz4;     dec="lz4 -dc" ;;
  5d0000*)       need_pkg xz xz-utils; dec="xz -dc --format=lzma" ;;
  425a68*)       need_pkg bzip2 bzip2; dec="bzip2 -dc" ;;
  *) echo "fetch-linux: unknown kernel compression (payload starts with $magic)" >&2; exit 1 ;;
esac
# The payload carries the decompressed size after the stream; some decompressors then
# complain about trailing data, so judge the result, not the exit status.
$dec < "$work/payload" > "$work/vmlinux" 2>/dev/null || true
if [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' \n')" != "7f454c46" ]; then
  echo "fetch-linux: decompressing the kernel with '$dec' did not give an ELF image" >&2
  exit 1
fi
mv "$work/vmlinux" "$out/vmlinux"
echo "$pkg" > "$out/version"
echo "fetch-linux: $pkg -> $out/vmlinux" >&2
echo "$out/vmlinux"
