#!/usr/bin/env bash
# Installs the Debian packages Ferry's build, tests and demos need, if missing.
# Safe to run again. Needs root (apt-get).
set -euo pipefail

pkgs=()
need() { dpkg -s "$1" >/dev/null 2>&1 || pkgs+=("$1"); }
need gcc           # builds the bundled test guests
need binutils      # as/ld for the guests
need lz4           # decompresses Debian's kernel for the Linux boot check
need util-linux    # unshare/setpriv for the error tests
need iproute2      # network namespaces (network tests)
need iputils-ping  # ping, the client in the network tests
need sanlock       # the lease daemon (leases on shared storage)
need libsanlock-dev # libsanlock_client, which Ferry links
need fuse3         # FUSE mounts for the storage-fault tests
need libfuse3-dev  # builds the tests' fault-injecting FUSE passthrough

if [ ${#pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
