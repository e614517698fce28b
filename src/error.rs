//! Errors with a kind that decides what the daemon does next.
//!
//! - `Config`: the operator's input is wrong (file, key, URL). Exit 2.
//! - `Transient`: the world hiccuped (connection refused/reset/timed out, a server restarting,
//!   a slot still held by a dying session). Retried with backoff and jitter, never skipped.
//! - `Definite`: retrying cannot help (authentication, a missing database or slot, permission
//!   denied, an invalidated slot, a state dir of another source). Reported at once, exit 1.
//! - `Apply`: the target refused a change (type mismatch, missing column, constraint). The
//!   daemon stalls, keeps the slot, and retries slowly until the target is fixed.
//!
//! Messages start with a capital letter, name the object (table, LSN, key) and say what to do.
//! The source chain is kept, never flattened into a string, so `{:#}`-style reporting and
//! classification can look at the original error.

use std::error::Error as StdError;
use std::fmt;

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    Config,
    Transient,
    Definite,
    Apply,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Transient => "transient",
            ErrorKind::Definite => "definite",
            ErrorKind::Apply => "apply",
        }
    }
}

/// Why an error happened, for the few callers that decide by it rather than by its kind.
/// Kept apart from the message, which is for people and may be reworded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cause {
    /// A copied table's files changed since the copy's snapshot (a rewrite): the snapshot no
    /// longer sees its rows.
    TableRewritten,
    /// The target connection was lost during a COMMIT and its outcome could not be learned.
    CommitUnknown,
    /// The replication slot is still being created by another (dying) session.
    SlotBeingCreated,
}

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
    cause: Option<Cause>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
            cause: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(source.into()),
            cause: None,
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    pub fn definite(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Definite, message)
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    /// Marks why this error happened ([`Error::has_cause`] finds it through wrapping).
    pub fn because(mut self, cause: Cause) -> Self {
        self.cause = Some(cause);
        self
    }

    /// Whether this error, or one it wraps, was marked with `cause`.
    pub fn has_cause(&self, cause: Cause) -> bool {
        let mut next: Option<&(dyn StdError + 'static)> = Some(self);
        while let Some(error) = next {
            if error
                .downcast_ref::<Error>()
                .is_some_and(|e| e.cause == Some(cause))
            {
                return true;
            }
            next = error.source();
        }
        false
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Exit code per SPEC.md: 2 for usage or configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Config => 2,
            _ => 1,
        }
    }

    /// The message with its whole source chain, for logs and status.
    pub fn report(&self) -> String {
        let mut text = self.message.clone();
        let mut next = self
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static));
        while let Some(error) = next {
            let part = error.to_string();
            if !part.is_empty() && !text.contains(&part) {
                text.push_str(": ");
                text.push_str(&part);
            }
            next = error.source();
        }
        text
    }

    /// Adds context in front of the message, keeping kind and source.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The SQLSTATE of the PostgreSQL error at the root of this one, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        let mut next = self
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static));
        while let Some(error) = next {
            if let Some(pg) = error.downcast_ref::<tokio_postgres::Error>() {
                return pg.code().map(|c| c.code());
            }
            next = error.source();
        }
        None
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// How a PostgreSQL error from a normal (SQL) connection should be treated.
pub fn classify_sqlstate(code: &str) -> ErrorKind {
    match code {
        // connection exceptions, shutdown in progress, cannot connect now, too many
        // connections, serialization failure, deadlock, lock timeout, out of memory/disk
        c if c.starts_with("08") => ErrorKind::Transient,
        "57P01" | "57P02" | "57P03" | "53300" | "53100" | "53200" | "40001" | "40P01" | "55P03"
        | "57014" | "58000" | "58030" | "XX000" => ErrorKind::Transient,
        // authentication, missing database, insufficient privilege, invalid role
        "28000" | "28P01" | "3D000" | "42501" | "42704" => ErrorKind::Definite,
        _ => ErrorKind::Apply,
    }
}

/// Wraps a tokio-postgres error from a connection or catalog query with context.
/// Errors without a SQLSTATE are I/O or protocol failures of the connection: transient.
pub fn pg(context: impl Into<String>, error: tokio_postgres::Error) -> Error {
    let kind = match error.code() {
        Some(code) => match classify_sqlstate(code.code()) {
            // Outside apply, a rejected statement is a definite problem of ours or the
            // operator's, not something to stall on.
            ErrorKind::Apply => ErrorKind::Definite,
            kind => kind,
        },
        // A certificate the client rejects, or a server without TLS under sslmode=require,
        // stays so however often we retry.
        None if is_tls_refusal(&error) => ErrorKind::Definite,
        // The client's own refusal to go on (a password the server asks for and nobody
        // gave): the same on every retry.
        None if error.to_string().starts_with("invalid configuration") => ErrorKind::Definite,
        None => ErrorKind::Transient,
    };
    let detail = error.as_db_error().map(|db| db.message().to_string());
    let context = with_replication_hint(context.into(), detail.as_deref().unwrap_or(""));
    Error::with_source(kind, context, error)
}

/// The server's "must be superuser or replication role" alone does not say what to run.
fn with_replication_hint(context: String, server_message: &str) -> String {
    if server_message.contains("must be superuser or replication role") {
        format!("{context} (the user lacks the REPLICATION attribute: ALTER ROLE <user> REPLICATION as a superuser, or on a managed service grant its replication role, e.g. rds_replication)")
    } else {
        context
    }
}

fn is_tls_refusal(error: &tokio_postgres::Error) -> bool {
    // tokio-postgres's own Display says only "error performing TLS handshake"; what went
    // wrong is in the causes.
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(cause) = next {
        if cause.to_string().contains("does not support TLS")
            || cause.downcast_ref::<rustls::Error>().is_some()
            || cause
                .downcast_ref::<rustls::pki_types::InvalidDnsNameError>()
                .is_some()
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        next = cause.source();
    }
    false
}

/// Wraps an error from the replication transport. Server messages are classified by what
/// PostgreSQL said: a slot held by a dying session or a server shutting down is transient.
pub fn replication(context: impl Into<String>, error: pgwire_replication::PgWireError) -> Error {
    use pgwire_replication::PgWireError as W;
    let kind = match &error {
        W::Io(_) | W::Task(_) => ErrorKind::Transient,
        W::Auth(_) | W::Tls(_) | W::MessageTooLarge { .. } => ErrorKind::Definite,
        W::Server(message) | W::Protocol(message) | W::Internal(message) => {
            classify_server_message(message)
        }
        _ => ErrorKind::Definite,
    };
    let context = with_replication_hint(context.into(), &error.to_string());
    Error::with_source(kind, context, error)
}

fn classify_server_message(message: &str) -> ErrorKind {
    let lower = message.to_ascii_lowercase();
    let transient = [
        "is active for pid",
        "the database system is starting up",
        "the database system is shutting down",
        "the database system is in recovery mode",
        "terminating connection",
        "connection reset",
        "connection refused",
        "timed out",
        "too many connections",
        "57p01",
        "57p03",
        "53300",
        "08006",
        "unexpected eof",
        "worker ended",
        "session ended",
    ];
    if transient.iter().any(|needle| lower.contains(needle)) {
        ErrorKind::Transient
    } else {
        ErrorKind::Definite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_spec() {
        assert_eq!(Error::config("x").exit_code(), 2);
        assert_eq!(Error::definite("x").exit_code(), 1);
        assert_eq!(Error::transient("x").exit_code(), 1);
    }

    #[test]
    fn a_cause_is_found_through_context_and_wrapping_but_not_invented() {
        let marked = Error::transient("lost").because(Cause::CommitUnknown);
        assert!(marked.has_cause(Cause::CommitUnknown));
        assert!(!marked.has_cause(Cause::TableRewritten));
        let with_context = Error::transient("lost")
            .because(Cause::TableRewritten)
            .context("Copying t");
        assert!(with_context.has_cause(Cause::TableRewritten));
        let wrapped = Error::with_source(ErrorKind::Transient, "round", marked);
        assert!(wrapped.has_cause(Cause::CommitUnknown));
        // The words alone do not make the cause.
        let unmarked = Error::transient("The table was rewritten on the source");
        assert!(!unmarked.has_cause(Cause::TableRewritten));
    }

    #[test]
    fn sqlstates_split_into_retry_stop_and_stall() {
        assert_eq!(classify_sqlstate("08006"), ErrorKind::Transient);
        assert_eq!(classify_sqlstate("57P01"), ErrorKind::Transient);
        assert_eq!(classify_sqlstate("28P01"), ErrorKind::Definite);
        assert_eq!(classify_sqlstate("3D000"), ErrorKind::Definite);
        assert_eq!(classify_sqlstate("23505"), ErrorKind::Apply);
        assert_eq!(classify_sqlstate("42703"), ErrorKind::Apply);
    }

    #[test]
    fn replication_server_messages_are_classified() {
        let held = pgwire_replication::PgWireError::Server(
            "ERROR: replication slot \"s\" is active for PID 123 (SQLSTATE 55006)".into(),
        );
        assert!(replication("start", held).is_transient());
        let missing = pgwire_replication::PgWireError::Server(
            "ERROR: replication slot \"s\" does not exist".into(),
        );
        assert_eq!(replication("start", missing).kind(), ErrorKind::Definite);
    }

    #[test]
    fn report_keeps_the_chain() {
        let io = std::io::Error::other("reset by peer");
        let error = Error::with_source(ErrorKind::Transient, "Reading from the source", io)
            .context("Slot sluice");
        assert_eq!(
            error.report(),
            "Slot sluice: Reading from the source: reset by peer"
        );
    }
}
