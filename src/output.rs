//! What the commands print for people and scripts, on stdout.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`sluice status | head`,
//! `sluice lag --follow | grep -m1 ...`). Output that nobody reads any more is not an error
//! of sluice's: it is dropped, and the command goes on with its work (a cutover must still
//! finish or undo what it started). Loops that only print (`lag --follow`) ask
//! [`stdout_closed`] and end.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout as it is; a write that fails marks stdout closed.
pub fn write(text: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if out.write_fmt(text).and_then(|()| out.flush()).is_err() {
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Whether a write to stdout has failed (its reader is gone).
pub fn stdout_closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// `println!` without the panic: see the module documentation.
#[macro_export]
macro_rules! say {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` without the panic.
#[macro_export]
macro_rules! say_partial {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}

/// Writes `text` to stderr; a failed write is dropped (the messages sluice has no one to
/// tell are logged too when the daemon runs).
pub fn write_err(text: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(text).and_then(|()| err.flush());
}

/// `eprintln!` without the panic when stderr is a closed pipe (`2>&1 | head`).
#[macro_export]
macro_rules! complain {
    ($($arg:tt)*) => {
        $crate::output::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}
