#!/usr/bin/env bash
# The whole test suite: unit tests, property tests, and integration tests that start real
# PostgreSQL clusters. Installs PostgreSQL first when the machine lacks it.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/prereqs.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# cargo prints one result line per test binary, the last one for an example with no tests;
# close with the totals over all of them.
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "total: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
exit "$status"
