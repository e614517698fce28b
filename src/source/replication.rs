//! Building replication sessions (pgwire-replication) from a [`ConnInfo`].
//!
//! pgwire-replication has no connect timeout, no TCP keepalive and no reconnect (FACTS.md),
//! so every await on it here is wrapped in a timeout, and callers rebuild the client after
//! any error.

use std::future::Future;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig};

use crate::conninfo::ConnInfo;
use crate::error::{self, Error, Result};
use crate::tls;

/// How long connecting, authenticating or a replication command may take.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(30);

/// A replication session configuration for `slot` and `publication` on the source.
pub async fn replication_config(
    conn: &ConnInfo,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig> {
    let password = conn
        .password
        .as_ref()
        .map(|p| p.expose().to_string())
        .unwrap_or_default();
    let options = match &conn.options {
        // The walsender renders values as text the way every other session reads them.
        Some(extra) => format!("{} {extra}", crate::session::rendering_options()),
        None => crate::session::rendering_options(),
    };
    let mut config = ReplicationConfig::new(
        conn.host.clone(),
        conn.user.clone(),
        password,
        conn.dbname.clone(),
        slot,
        publication,
    )
    .with_port(conn.port)
    .with_options(options)
    .with_application_name(conn.application_name.as_deref().unwrap_or("sluice"))
    // Acknowledgements should reach the slot soon after the target commit: the slot's
    // confirmed_flush_lsn is what releases WAL and what cutover scripts watch.
    .with_status_interval(Duration::from_millis(100))
    .with_wakeup_interval(Duration::from_secs(1))
    // Bounded: the stream never runs far ahead of the applier, and a full buffer leaves the
    // data in the socket, where the walsender batches its sends. Counted in messages, not
    // bytes: with rows of 10 MB, 512 held 5 GB (a 2 GB transaction peaked at 1.5 GB); 64
    // keeps it at 64 rows' worth, and measured no slower on narrow rows (docs/architecture.md).
    .with_buffer_size(64);
    if !conn.is_unix_socket() {
        config = config.with_tls(tls::replication_tls(conn).await?);
    }
    Ok(config)
}

/// Runs a replication-session future with [`REPLICATION_TIMEOUT`]; a timeout is transient.
pub async fn with_timeout<T>(
    what: &str,
    future: impl Future<Output = std::result::Result<T, pgwire_replication::PgWireError>>,
) -> Result<T> {
    match tokio::time::timeout(REPLICATION_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error::replication(what.to_string(), e)),
        Err(_) => Err(Error::transient(format!(
            "{what}: no answer from the source within {REPLICATION_TIMEOUT:?}"
        ))),
    }
}

/// A gated session (authenticated, not streaming) for replication commands such as
/// `IDENTIFY_SYSTEM` and `CREATE_REPLICATION_SLOT`.
pub async fn connect_gated(config: ReplicationConfig, redacted: &str) -> Result<ReplicationClient> {
    let what = format!("Opening a replication connection to {redacted}");
    let mut client = with_timeout(&what, ReplicationClient::connect_gated(config)).await?;
    // connect_gated returns before authentication finishes; the first command reports it.
    with_timeout(&what, client.identify_system()).await?;
    Ok(client)
}
