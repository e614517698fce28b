//! sluice: a native PostgreSQL change-data-capture streamer.
//!
//! The data flow reads from the module list:
//! `source` (slot, publication, replication stream) → `pgoutput` (decoder) → `apply`
//! (transactional batches on the target) → `checkpoint` (sled + the target's position row),
//! with `snapshot` (initial copy), `control` (status socket), `config` and `cli` around it.

pub mod apply;
pub mod checkpoint;
pub mod citus;
pub mod cli;
pub mod config;
pub mod conninfo;
pub mod control;
pub mod cutover;
pub mod daemon;
pub mod error;
pub mod lsn;
pub mod ops;
pub mod output;
pub mod pgoutput;
pub mod session;
pub mod snapshot;
pub mod source;
pub mod tls;

pub use error::{Error, ErrorKind, Result};
pub use lsn::Lsn;
