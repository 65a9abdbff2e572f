#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the ledger tests:
#   postgres.sh start PORT   (prints the connection URL)
#   postgres.sh stop PORT
# Runs as the `postgres` user (initdb refuses root); its data lives in /tmp/router-middleware-pg-PORT.
set -euo pipefail
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
ACTION=$1
PORT=$2
DIR=/tmp/router-middleware-pg-$PORT
if [ "$ACTION" = start ]; then
  rm -rf "$DIR"
  mkdir -p "$DIR"
  chown postgres "$DIR"
  runuser -u postgres -- "$BIN/initdb" -D "$DIR/data" -A trust -U postgres > "$DIR/initdb.log" 2>&1
  runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -k $DIR" start > /dev/null
  echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
else
  runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop > /dev/null 2>&1 || true
  rm -rf "$DIR"
fi
