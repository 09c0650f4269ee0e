#!/usr/bin/env bash
# A private, throwaway PostgreSQL server for the controller's tests and demos.
#
#   scripts/postgres.sh start DIR [PORT]   initdb into DIR (as the postgres user), start the
#                                          server on a unix socket in DIR and on
#                                          127.0.0.1:PORT (default: a free port), print its URL
#   scripts/postgres.sh stop DIR           stop it (the directory stays; remove it yourself)
#
# Installs Debian's postgresql if it is missing (needs root, as scripts/setup.sh). The server
# trusts local connections (it listens only on loopback and its own socket): it is for tests,
# not for production.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1
dir=$2

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] || return 1
  echo "$d"
}

install_postgres() {
  bindir >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed and installing it needs root"
  echo "postgres.sh: installing postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq postgresql >/dev/null
  # Debian's package starts a cluster of its own; this script uses private ones only.
  bindir >/dev/null || die "postgresql installed but no /usr/lib/postgresql/*/bin"
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

case "$cmd" in
  start)
    install_postgres
    bin=$(bindir)
    port=${3:-$(free_port)}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || die "no postgres user (is the postgresql package installed?)"
      chown postgres: "$dir"
      # The postgres user must be able to reach DIR.
      p=$dir
      while [ "$p" != / ]; do p=$(dirname "$p"); chmod o+x "$p" 2>/dev/null || true; done
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    fi
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-k $dir -p $port -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
      || { cat "$dir/server.log" >&2; die "the server did not start"; }
    echo "$port" >"$dir/port"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    [ -d "$dir/data" ] || die "$dir holds no server (no $dir/data)"
    bin=$(bindir) || die "PostgreSQL is not installed"
    if [ -f "$dir/data/postmaster.pid" ]; then
      as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null
    fi
    ;;
  *)
    usage
    ;;
esac
