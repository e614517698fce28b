#!/usr/bin/env bash
# The project's own binary, configured per SPEC.md (SLUICE_BIN names it; default: sluice on PATH).
# The harness exports BENCH_* variables (see bench/README.md), starts this
# script in its own process group, and considers the run done when the slot's
# confirmed_flush_lsn >= BENCH_END_LSN AND the harness's own checksum of the
# target tables equals the source's. Then it sends SIGTERM to the group.
# bench-done: slot
set -e
cfg="$BENCH_RUN_DIR/sluice.toml"
cat > "$cfg" <<TOML
[source]
url = "$BENCH_SRC_DSN"
slot = "$BENCH_SLOT"                # pre-created by the harness at the backlog's start
publication = "$BENCH_PUBLICATION"

[target]
url = "$BENCH_TGT_DSN"

[copy]
enabled = false                     # the target already holds the pre-backlog data

[state]
dir = "$BENCH_RUN_DIR/state"
TOML
exec "${SLUICE_BIN:-sluice}" run --config "$cfg"
