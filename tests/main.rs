//! sluice's integration tests: one binary (one link step), one module per scenario, every
//! scenario against real PostgreSQL clusters started by `support::cluster`.

mod support;

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
mod run_failures;
mod run_stream;
