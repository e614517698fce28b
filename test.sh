#!/usr/bin/env bash
# The whole test suite: unit tests, property tests, and integration tests that start real
# PostgreSQL clusters. Installs PostgreSQL first when the machine lacks it.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/prereqs.sh
cargo test --all-targets --no-fail-fast "$@"
