//! Control and status: the daemon's live status, the control socket it serves (and the client
//! that asks it), the Prometheus endpoint and the WAL-retention monitor.

pub mod client;
pub mod metrics;
pub mod monitor;
pub mod socket;
pub mod status;

pub use status::{DaemonState, SharedStatus, StatusReport, TableState, TableStatus};
