#!/usr/bin/env bash
# bench/copy-sluice.sh -- adds sluice (and the source's own read rate) as copy methods of
# the shared initial-copy benchmark, without editing it.
#
# usage: bench/copy-sluice.sh [ROUNDS]
#   env: COPY_METHODS (default "stdout sluice pgcopydb"; add sluiceschema to time `sluice schema` +
#        `sluice run` as an operator runs them, sluicerun for `sluice run` with pg_restore's schema), SHARED_BENCH (../shared/bench),
#        SLUICE_COPY_BIN (the test binary; built with `cargo test --release --no-run` when unset),
#        SLUICE_BENCH_JOBS (2), SLUICE_BENCH_SPLIT ("256MB"), SLUICE_BENCH_SPLIT_BY ("auto").
#
# The `sluice` method times the copy alone through the ignored test `copy_bench::copy_bench`,
# which calls `sluice::snapshot::initial_copy` directly (no daemon start-up, no deferred DDL);
# `sluicerun` and `sluiceschema` time the real commands an operator runs.
#
# Methods (each a `copy_NAME TARGETDB` function, exported so the shared copy.sh sees them):
#   sluice : schema without indexes/constraints (pg_restore --section=pre-data), sluice's
#            parallel snapshot copy, then indexes and constraints (--section=post-data -j2),
#            as `sluice schema` will defer them; the slot sluice creates is dropped after.
#   stdout : `COPY table TO STDOUT > /dev/null` of every table, two at a time: what the
#            source can read, the bound for any copy.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
if [ -z "${SHARED_BENCH:-}" ]; then
  # The main checkout sits beside shared/; a worktree one level deeper.
  for d in "$HERE" "$REPO/../shared/bench" "$REPO/../../shared/bench"; do
    [ -x "$d/copy.sh" ] && { SHARED_BENCH=$(cd "$d" && pwd); break; }
  done
fi
SHARED_BENCH=${SHARED_BENCH:-$REPO/../shared/bench}
[ -x "$SHARED_BENCH/copy.sh" ] || { echo "no copy.sh in $SHARED_BENCH: set SHARED_BENCH" >&2; exit 2; }

export COPY_METHODS=${COPY_METHODS:-"stdout sluice pgcopydb"}
# The test-binary driver is only needed by the `sluice` method.
if [[ " $COPY_METHODS " == *" sluice "* ]]; then
  if [ -z "${SLUICE_COPY_BIN:-}" ]; then
    SLUICE_COPY_BIN=$(cd "$REPO" && cargo test --release --test main --no-run --message-format=json 2>/dev/null \
      | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    [ -x "$SLUICE_COPY_BIN" ] || { echo "could not build the test binary" >&2; exit 2; }
  fi
  export SLUICE_COPY_BIN SHARED_BENCH
fi

copy_sluice() {
  local db=$1 dump=$BENCH_ROOT/runs/sluice_schema.dump slot=sluice_bench
  mkdir -p "$BENCH_ROOT/runs"
  "$PGBIN/pg_dump" -h $BENCH_HOST -p $SRC_PORT -Fc --schema-only --no-publications --no-subscriptions -f "$dump" big || return 1
  "$PGBIN/pg_restore" -h $BENCH_HOST -p $TGT_PORT -d "$db" --no-owner --section=pre-data "$dump" || return 1
  spsql big -c "select pg_drop_replication_slot('$slot') from pg_replication_slots where slot_name = '$slot'" >/dev/null
  SLUICE_BENCH_SOURCE=$(src_uri big) SLUICE_BENCH_TARGET=$(tgt_uri "$db") SLUICE_BENCH_SLOT=$slot \
    "$SLUICE_COPY_BIN" --ignored --exact copy_bench::copy_bench --nocapture --test-threads 1 \
    > "$BENCH_ROOT/runs/sluice_copy.log" 2>&1
  local st=$?
  grep -h "sluice copy:" "$BENCH_ROOT/runs/sluice_copy.log" >&2
  spsql big -c "select pg_drop_replication_slot('$slot') from pg_replication_slots where slot_name = '$slot'" >/dev/null
  [ $st = 0 ] || { tail -20 "$BENCH_ROOT/runs/sluice_copy.log" >&2; return 1; }
  "$PGBIN/pg_restore" -h $BENCH_HOST -p $TGT_PORT -d "$db" --no-owner -j 2 --section=post-data "$dump" || return 1
}
# Helpers of the two `sluice run` methods. _sluice_config DIR SLOT DB writes DIR/sluice.toml.
_sluice_config() {
  local dir=$1 slot=$2 db=$3
  mkdir -p "$BENCH_ROOT/runs"; rm -rf "$dir"; mkdir -p "$dir"
  _sluice_drop_slot "$slot"
  cat > "$dir/sluice.toml" <<TOML
[source]
url = "$(src_uri big)"
slot = "$slot"
publication = "$slot"
[target]
url = "$(tgt_uri "$db")"
[copy]
jobs = ${SLUICE_BENCH_JOBS:-2}
split_tables_larger_than = "${SLUICE_BENCH_SPLIT:-256MB}"
split_by = "${SLUICE_BENCH_SPLIT_BY:-auto}"
[state]
dir = "$dir/state"
TOML
}
_sluice_drop_slot() {
  spsql big -c "select pg_drop_replication_slot('$1') from pg_replication_slots where slot_name = '$1'" -c "drop publication if exists $1" >/dev/null
}
# _sluice_run_until_streaming DIR SLOT: `sluice run` until `sluice status` says streaming
# (the copy and its deferred DDL done), then stop it and drop its slot.
_sluice_run_until_streaming() {
  local dir=$1 slot=$2
  "${SLUICE_BIN:-sluice}" run --config "$dir/sluice.toml" > "$dir/run.log" 2>&1 &
  local pid=$! st=1
  for _ in $(seq 1 3000); do
    if "${SLUICE_BIN:-sluice}" status --json --config "$dir/sluice.toml" 2>/dev/null | grep -q '"state": "streaming"'; then st=0; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.2
  done
  kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null
  _sluice_drop_slot "$slot"
  [ $st = 0 ] || { tail -20 "$dir/run.log" >&2; return 1; }
}
# sluicerun: the real command: `sluice run` with the copy enabled (schema pre-data first by
# pg_restore), until `sluice status` reports streaming; then the indexes and constraints
# (post-data, -j 2). SLUICE_BIN names the release binary.
copy_sluicerun() {
  local db=$1 dump=$BENCH_ROOT/runs/sluice_schema.dump dir=$BENCH_ROOT/runs/sluicerun slot=sluice_bench_run
  _sluice_config "$dir" $slot "$db"
  "$PGBIN/pg_dump" -h $BENCH_HOST -p $SRC_PORT -Fc --schema-only --no-publications --no-subscriptions -f "$dump" big || return 1
  "$PGBIN/pg_restore" -h $BENCH_HOST -p $TGT_PORT -d "$db" --no-owner --section=pre-data "$dump" || return 1
  _sluice_run_until_streaming "$dir" $slot || return 1
  "$PGBIN/pg_restore" -h $BENCH_HOST -p $TGT_PORT -d "$db" --no-owner -j 2 --section=post-data "$dump" || return 1
}
# sluiceschema: the product path the copy goal describes: `sluice schema` (tables without
# their indexes, constraints or primary keys), then `sluice run` until `sluice status` says
# streaming; run builds each table's key and indexes as soon as that table is copied, and
# the foreign keys at the end. No pg_restore at all.
copy_sluiceschema() {
  local db=$1 dir=$BENCH_ROOT/runs/sluiceschema slot=sluice_bench_schema
  _sluice_config "$dir" $slot "$db"
  "${SLUICE_BIN:-sluice}" schema --config "$dir/sluice.toml" > "$dir/schema.log" 2>&1 || { tail -20 "$dir/schema.log" >&2; return 1; }
  _sluice_run_until_streaming "$dir" $slot
}
copy_stdout() {
  spsql big -c "select format('%I.%I', schemaname, tablename) from pg_tables where schemaname = 'public'" \
    | xargs -P 2 -I{} "$PGBIN/psql" -X -q -h $BENCH_HOST -p $SRC_PORT -d big -c "\\copy {} to '/dev/null'"
}
export -f copy_sluice copy_sluicerun copy_sluiceschema copy_stdout _sluice_config _sluice_drop_slot _sluice_run_until_streaming
exec "$SHARED_BENCH/copy.sh" "$@"
