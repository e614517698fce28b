#!/usr/bin/env bash
# A local sluice demo, start to finish, in a few minutes:
#   two throwaway PostgreSQL clusters on loopback, a pgbench sample database on the source,
#   `sluice check`, `sluice schema`, `sluice run` (snapshot copy, then streaming) while a
#   pgbench load runs, `sluice lag --follow`, `sluice cutover`, `sluice verify`, teardown.
# Installs what the machine lacks (PostgreSQL server binaries), leaves nothing running.
#
#   ./demo.sh                 # defaults
#   DEMO_SCALE=10 DEMO_LOAD_SECONDS=60 ./demo.sh
set -euo pipefail
cd "$(dirname "$0")"
source scripts/prereqs.sh

SCALE=${DEMO_SCALE:-5}                 # pgbench scale: 100,000 accounts per unit
LOAD_SECONDS=${DEMO_LOAD_SECONDS:-30}
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/sluice-demo.XXXXXX")
# The first ports from 55501 on that nothing listens on (a server left running elsewhere
# must not stop the demo).
free_port() { local p=$1; while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done; echo "$p"; }
SRC_PORT=${DEMO_SOURCE_PORT:-$(free_port 55501)}
TGT_PORT=${DEMO_TARGET_PORT:-$(free_port $((SRC_PORT + 1)))}
BIN="$PG_BINDIR"
SLUICE="$PWD/target/debug/sluice"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

daemon_pid=""
load_pid=""
cleanup() {
  set +e
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  for c in src tgt; do
    [ -d "$ROOT/$c" ] && as_owner "$BIN/pg_ctl" -D "$ROOT/$c" stop -m fast -w >/dev/null 2>&1
  done
  rm -rf "$ROOT"
}
trap cleanup EXIT INT TERM

step "building sluice"
cargo build --quiet

step "starting two throwaway clusters: source on port $SRC_PORT, target on port $TGT_PORT ($ROOT)"
if [ "$(id -u)" = 0 ]; then chown postgres "$ROOT"; fi
for c in src:$SRC_PORT tgt:$TGT_PORT; do
  name=${c%%:*}; port=${c##*:}
  as_owner "$BIN/initdb" -D "$ROOT/$name" -A trust -U postgres --no-sync >/dev/null
  cat >> "$ROOT/$name/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$ROOT'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
fsync = off
CONF
  as_owner "$BIN/pg_ctl" -D "$ROOT/$name" -l "$ROOT/$name.log" -w start >/dev/null || {
    # The log goes with the temp dir on exit: show why first (a port in use, most often).
    echo "the $name cluster did not start; its log:" >&2; tail -n 20 "$ROOT/$name.log" >&2; exit 1; }
done
SRC="host=127.0.0.1 port=$SRC_PORT user=postgres dbname=app"
TGT="host=127.0.0.1 port=$TGT_PORT user=postgres dbname=app"
"$BIN/psql" -X -q "host=127.0.0.1 port=$SRC_PORT user=postgres dbname=postgres" -c "CREATE DATABASE app"
"$BIN/psql" -X -q "host=127.0.0.1 port=$TGT_PORT user=postgres dbname=postgres" -c "CREATE DATABASE app"

step "loading a sample database on the source (pgbench scale $SCALE: $((SCALE * 100000)) accounts)"
"$BIN/pgbench" -q -i -s "$SCALE" "$SRC" 2>&1 | tail -n 1
# pgbench_history has no key; give it one, as any table that receives UPDATEs or DELETEs needs.
"$BIN/psql" -X -q "$SRC" -c "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY"

cat > "$ROOT/sluice.toml" <<TOML
[source]
url = "$SRC"
[target]
url = "$TGT"
[copy]
jobs = 2
[apply]
batch_max_delay = "50ms"
[state]
dir = "$ROOT/state"
TOML
CONFIG=(--config "$ROOT/sluice.toml")

step "sluice check: is everything ready for a migration?"
"$SLUICE" check "${CONFIG[@]}" || true

step "sluice schema: the source's tables on the target, keys and indexes built as each table is copied"
"$SLUICE" schema "${CONFIG[@]}"

step "pgbench load on the source for ${LOAD_SECONDS}s, while sluice copies and streams"
"$BIN/pgbench" -n -c 2 -j 2 -T "$LOAD_SECONDS" -P 10 "$SRC" > "$ROOT/pgbench.log" 2>&1 &
load_pid=$!

step "sluice run: snapshot copy, then streaming (log: $ROOT/sluice.log)"
"$SLUICE" run "${CONFIG[@]}" > "$ROOT/sluice.log" 2>&1 &
daemon_pid=$!
sleep 2

step "sluice lag --follow while the load runs"
timeout "$LOAD_SECONDS" "$SLUICE" lag "${CONFIG[@]}" --follow --interval 2s || true
wait "$load_pid" || true
load_pid=""
tail -n 3 "$ROOT/pgbench.log"

step "sluice cutover: freeze the source, wait for zero lag, sync sequences, verify"
"$SLUICE" cutover "${CONFIG[@]}" --freeze-source --yes --timeout 120s

step "sluice verify: source and target compared table by table"
"$SLUICE" verify "${CONFIG[@]}"

step "sluice status"
"$SLUICE" status "${CONFIG[@]}"

step "stopping sluice and tearing down the slot, publication and sluice's objects"
kill "$daemon_pid"; wait "$daemon_pid" || true
daemon_pid=""
"$SLUICE" teardown "${CONFIG[@]}" --yes

step "done: the target holds the source's data; everything is stopped and removed"
