//! Control and status: the daemon's live status, and (later) the control socket it serves.

pub mod status;

pub use status::{DaemonState, SharedStatus, StatusReport, TableState, TableStatus};
