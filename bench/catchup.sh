#!/usr/bin/env bash
# Catch-up benchmark of sluice beside native logical replication and pg_recvlogical, on
# the same backlogs, interleaved (see bench/README.md). Builds sluice in release mode first.
#
#   bench/catchup.sh                 # W1..W4, 3 interleaved repetitions
#   REPS=5 bench/catchup.sh w2 w3    # some workloads, more repetitions
#
# Results: ${TMPDIR:-/tmp}/bench-pg/results/anchors.tsv; summary: bench/summarize.py
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
source scripts/prereqs.sh
cargo build --release --quiet
export SLUICE_BIN="$PWD/target/release/sluice"
export CONSUMERS="${CONSUMERS:-recvlogical native sluice}"
export REPS="${REPS:-3}"
exec "$here/anchors.sh" "$@"
