//! Support code shared by the integration tests: real PostgreSQL clusters and helpers.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod sluice;

pub use cluster::PgCluster;
