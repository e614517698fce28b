//! sluice's integration tests: one binary (one link step), one module per scenario, every
//! scenario against real PostgreSQL clusters started by `support::cluster`.

mod support;

mod copy_bench;
mod copy_common;
mod copy_resume;
mod copy_snapshot;
mod copy_types;
mod cutover_citus;
mod cutover_common;
mod cutover_live;
mod cutover_schema;
mod cutover_sequences;
mod cutover_switch;
mod cutover_teardown;
mod cutover_verify;
mod decode_fixtures;
mod decode_live;
mod harness;
mod ops_check;
mod ops_common;
mod ops_lag;
mod ops_metrics;
mod ops_monitor;
mod ops_socket;
mod ops_status;
mod run_copy;
mod run_failures;
mod run_stream;
mod run_target_role;
mod run_tls;
