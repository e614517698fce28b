#!/usr/bin/env bash
# bench/copy-cpu.sh -- one initial copy of the copy benchmark's source `big` into a fresh target
# database, with the CPU time it cost: the whole machine's (from /proc/stat, before and after)
# and the tool's own processes'.
#
# usage: bench/copy-cpu.sh sluice|pgcopydb   (clusters up and `big` built: bench/copy.sh does both)
#   env: SLUICE_BIN (target/release/sluice), SLUICE_BENCH_JOBS, SLUICE_BENCH_SPLIT (as copy-sluice.sh)
#
# sluice: `sluice schema` then `sluice run` until `sluice status` says streaming (what the
# `sluiceschema` method of copy-sluice.sh times); its CPU is read from /proc/PID/stat just
# before it is stopped. pgcopydb: `pgcopydb clone --table-jobs 2 --index-jobs 2` under
# /usr/bin/time. Wall and machine CPU include schema, data, indexes and constraints.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
source "$HERE/lib.sh"
method=${1:?usage: bench/copy-cpu.sh sluice|pgcopydb}
case $method in sluice|pgcopydb) ;; *) echo "unknown method $method: sluice or pgcopydb" >&2; exit 2 ;; esac
SLUICE_BIN=${SLUICE_BIN:-$REPO/target/release/sluice}
# The config and slot helpers of copy-sluice.sh, without running its benchmark.
source <(sed -n '/^_sluice_config()/,/^}/p;/^_sluice_drop_slot()/,/^}/p' "$HERE/copy-sluice.sh")

db=cpu_$method
tpsql postgres -c "drop database if exists $db with (force)" >/dev/null 2>&1
tpsql postgres -c "create database $db" || exit 1
sync; spsql big -c checkpoint; tpsql postgres -c checkpoint
machine_cpu_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
ticks=$(getconf CLK_TCK)
c0=$(machine_cpu_ticks); t0=$(now)
case $method in
  sluice)
    dir=$BENCH_ROOT/runs/cpu_sluice slot=sluice_cpu
    _sluice_config "$dir" $slot $db
    "$SLUICE_BIN" schema --config "$dir/sluice.toml" > "$dir/schema.log" 2>&1 || { tail -5 "$dir/schema.log" >&2; exit 1; }
    "$SLUICE_BIN" run --config "$dir/sluice.toml" > "$dir/run.log" 2>&1 & pid=$!
    until "$SLUICE_BIN" status --json --config "$dir/sluice.toml" 2>/dev/null | grep -q '"state": "streaming"'; do
      kill -0 $pid 2>/dev/null || { tail -5 "$dir/run.log" >&2; exit 1; }
      sleep 0.2
    done
    own=$(awk -v t=$ticks '{printf "user %.2f sys %.2f", $14/t, $15/t}' /proc/$pid/stat)
    kill -TERM $pid; wait $pid
    _sluice_drop_slot $slot ;;
  pgcopydb)
    d=$BENCH_ROOT/runs/cpu_pgcopydb; rm -rf "$d"
    /usr/bin/time -f "user %U sys %S" -o "$d.time" pgcopydb clone --source "$(src_uri big)" --target "$(tgt_uri $db)" \
      --dir "$d" --table-jobs 2 --index-jobs 2 > "$d.log" 2>&1 || { tail -5 "$d.log" >&2; exit 1; }
    own=$(tail -1 "$d.time") ;;
esac
c1=$(machine_cpu_ticks)
echo "$method: wall $(since $t0) s, machine CPU $(awk -v a=$c0 -v b=$c1 -v t=$ticks 'BEGIN{printf "%.1f", (b-a)/t}') s, own processes $own s"
