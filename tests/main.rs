//! sluice's integration tests: one binary (one link step), one module per scenario, every
//! scenario against real PostgreSQL clusters started by `support::cluster`.

mod support;

mod harness;

mod copy_bench;
mod copy_common;
mod copy_resume;
mod copy_snapshot;
mod copy_types;
