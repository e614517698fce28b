//! Operator commands that watch and check a migration: `status`, `lag` and `check`.
//!
//! `status` and `lag` ask the running daemon over the control socket. When no daemon
//! answers they read what the databases themselves know (the slot on the source, the
//! applied-position row on the target) so the commands work whether or not `sluice run` is
//! up; see [`status::collect`].

pub mod check;
pub mod lag;
pub mod status;
