//! Replication slots on the source: creating one that exports a snapshot, and reading what
//! `pg_replication_slots` says about one.
//!
//! The exported snapshot is the bridge between the initial copy and streaming: rows visible
//! in it are copied, and the slot decodes exactly the transactions that commit after its
//! consistent point. The snapshot can be imported (`SET TRANSACTION SNAPSHOT`) only while the
//! session that created the slot stays open and has not started streaming (FACTS.md), so the
//! session is handed back to the caller inside [`ExportedSnapshot`] and must be kept alive
//! until every copy worker has imported it.

use pgwire_replication::ReplicationClient;
use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::error::{self, Error, ErrorKind, Result};
use crate::lsn::Lsn;
use crate::source::replication::{connect_gated, replication_config, with_timeout};

/// The longest sluice waits for CREATE_REPLICATION_SLOT to answer.
const SLOT_CREATION_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A freshly created slot and the snapshot it exported.
pub struct ExportedSnapshot {
    /// The gated replication session that created the slot. Dropping it ends the session:
    /// the snapshot can no longer be imported, and a temporary slot vanishes.
    pub session: ReplicationClient,
    /// The slot decodes transactions that commit at or after this LSN; everything committed
    /// before it is in the snapshot.
    pub consistent_point: Lsn,
    /// The name to give `SET TRANSACTION SNAPSHOT`.
    pub snapshot_name: String,
}

impl std::fmt::Debug for ExportedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedSnapshot")
            .field("consistent_point", &self.consistent_point)
            .field("snapshot_name", &self.snapshot_name)
            .finish_non_exhaustive()
    }
}

/// Slot names reach the server unquoted (the transport splices them into
/// `START_REPLICATION`), so only names that need no quoting are accepted.
pub fn validate_slot_name(slot: &str) -> Result<()> {
    crate::config::validate_identifier(slot, "Replication slot name")
}

/// Creates the logical slot `slot` (pgoutput) on a gated replication session and exports
/// its snapshot. `temporary` slots vanish with the session; permanent ones stay until
/// someone drops them (sluice never does so implicitly).
///
/// `publication` is only carried in the session configuration (the transport wants one);
/// creating the slot does not need it to exist, but streaming does.
pub async fn create_slot_exporting_snapshot(
    conn: &ConnInfo,
    slot: &str,
    publication: &str,
    temporary: bool,
) -> Result<ExportedSnapshot> {
    validate_slot_name(slot)?;
    let config = replication_config(conn, slot, publication).await?;
    let mut session = connect_gated(config, &conn.redacted()).await?;

    // PostgreSQL 15 introduced the option-list syntax; the old keyword form still works on
    // older servers, so choose by version rather than assume.
    let version_rows = with_timeout(
        "Asking the source for its version",
        session.simple_query("SHOW server_version_num"),
    )
    .await?;
    let version = version_rows
        .first()
        .and_then(|row| row.first().cloned().flatten())
        .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.trim().parse::<u32>().ok())
        .unwrap_or(0);
    // The exported snapshot is a transaction this session keeps open, idle, for the whole
    // copy: a database's or role's `idle_in_transaction_session_timeout` (or, from 17,
    // `transaction_timeout`) would end the session and the snapshot with it, and every
    // round of the copy would start over. Off for this session only.
    let mut no_timeouts = vec!["SET idle_in_transaction_session_timeout = 0"];
    if version >= 170000 {
        no_timeouts.push("SET transaction_timeout = 0");
    }
    for statement in no_timeouts {
        with_timeout(
            &format!("Preparing the snapshot's session ({statement})"),
            session.simple_query(statement),
        )
        .await?;
    }
    let temporary_word = if temporary { " TEMPORARY" } else { "" };
    let command = if version >= 150000 {
        format!(
            "CREATE_REPLICATION_SLOT {slot}{temporary_word} LOGICAL pgoutput (SNAPSHOT 'export')"
        )
    } else {
        format!("CREATE_REPLICATION_SLOT {slot}{temporary_word} LOGICAL pgoutput EXPORT_SNAPSHOT")
    };
    let what = format!(
        "Creating the{} replication slot {slot} on {}",
        if temporary { " temporary" } else { "" },
        conn.redacted()
    );
    // Creating a slot waits until every transaction running on the source has ended, so a
    // long-running transaction delays it. PostgreSQL's own subscriber waits as long as it
    // takes; sluice does too, but says what it waits for after 5 s and every 30 s after
    // that (meanwhile the copy's progress line shows no rows), and gives up after
    // SLOT_CREATION_LIMIT in case the connection died silently (no TCP keepalive here).
    let started = std::time::Instant::now();
    let answer = {
        let mut creating = std::pin::pin!(session.simple_query(&command));
        let mut wait = std::time::Duration::from_secs(5);
        loop {
            tokio::select! {
                answer = &mut creating => break Some(answer),
                _ = tokio::time::sleep(wait) => {
                    wait = std::time::Duration::from_secs(30);
                    if started.elapsed() >= SLOT_CREATION_LIMIT {
                        break None;
                    }
                    tracing::warn!(
                        slot,
                        waited_seconds = started.elapsed().as_secs(),
                        "creating the replication slot waits for transactions running on the source to end; look for long-running ones: SELECT pid, xact_start, state, query FROM pg_stat_activity WHERE xact_start IS NOT NULL ORDER BY xact_start"
                    );
                }
            }
        }
    };
    let rows = match answer {
        Some(Ok(rows)) => rows,
        Some(Err(e)) => {
            let text = e.to_string();
            let error = error::replication(what.clone(), e);
            if text.contains("already exists") {
                return Err(Error::with_source(
                    ErrorKind::Definite,
                    format!("{what}: the slot already exists. Its snapshot cannot be exported again: drop it (SELECT pg_drop_replication_slot('{slot}')) if it is not in use, or choose another source.slot"),
                    error,
                ));
            }
            if text.contains("all replication slots are in use") {
                return Err(Error::with_source(
                    ErrorKind::Definite,
                    format!("{what}: every max_replication_slots place is taken. Drop slots nobody uses (SELECT slot_name, active FROM pg_replication_slots), or raise max_replication_slots (a restart of the source); a copy resumed under a fresh snapshot needs one place more than the migration's own slot while it runs"),
                    error,
                ));
            }
            return Err(error);
        }
        None => {
            return Err(Error::transient(format!(
                "{what}: no answer within {SLOT_CREATION_LIMIT:?}. Creating a slot waits for every transaction running on the source to end: end long-running transactions (pg_stat_activity), then start again"
            )))
        }
    };
    let row = rows.into_iter().next().ok_or_else(|| {
        Error::definite(format!(
            "{what}: the server answered CREATE_REPLICATION_SLOT with no row"
        ))
    })?;
    let text = |i: usize| -> Result<String> {
        row.get(i)
            .cloned()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or_else(|| {
                Error::definite(format!(
                    "{what}: CREATE_REPLICATION_SLOT returned no value in column {i}"
                ))
            })
    };
    let consistent_point = text(1)?.parse::<Lsn>().map_err(|e| {
        Error::with_source(
            ErrorKind::Definite,
            format!("{what}: bad consistent point"),
            e,
        )
    })?;
    let snapshot_name = text(2)?;
    tracing::info!(
        slot,
        temporary,
        %consistent_point,
        snapshot = %snapshot_name,
        "created replication slot with an exported snapshot"
    );
    Ok(ExportedSnapshot {
        session,
        consistent_point,
        snapshot_name,
    })
}

/// One row of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot: String,
    /// Output plugin (`pgoutput` for ours); `None` for a physical slot.
    pub plugin: Option<String>,
    /// Database of a logical slot.
    pub database: Option<String>,
    pub temporary: bool,
    /// Whether a session streams from it right now.
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// What holds WAL on the source (lags far behind `confirmed_flush_lsn`).
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (`None` before PostgreSQL 13).
    pub wal_status: Option<String>,
}

/// What the source says about `slot`, `None` when it does not exist.
pub async fn slot_info(source: &Client, slot: &str) -> Result<Option<SlotInfo>> {
    // wal_status exists from PostgreSQL 13; to_jsonb keeps one query for every version.
    let row = source
        .query_opt(
            "SELECT s.slot_name::text, s.plugin::text, s.database::text, s.temporary, s.active,
                    s.active_pid, s.confirmed_flush_lsn::text, s.restart_lsn::text,
                    to_jsonb(s) ->> 'wal_status'
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg(format!("Reading replication slot {slot} on the source"), e))?;
    let Some(row) = row else { return Ok(None) };
    let lsn = |i: usize| -> Result<Option<Lsn>> {
        row.get::<_, Option<String>>(i)
            .map(|text| {
                text.parse::<Lsn>().map_err(|e| {
                    Error::with_source(
                        ErrorKind::Definite,
                        format!("pg_replication_slots shows an invalid LSN for slot {slot}"),
                        e,
                    )
                })
            })
            .transpose()
    };
    Ok(Some(SlotInfo {
        slot: row.get(0),
        plugin: row.get(1),
        database: row.get(2),
        temporary: row.get(3),
        active: row.get(4),
        active_pid: row.get(5),
        confirmed_flush_lsn: lsn(6)?,
        restart_lsn: lsn(7)?,
        wal_status: row.get(8),
    }))
}

/// The session holding `slot` (streaming from it), described for people, once it has held
/// it for `patience` more: a session that is ending (a sluice that just stopped) lets go
/// within moments, another consumer does not. `None` when the slot is free.
pub async fn holder_after(
    source: &Client,
    slot: &str,
    patience: std::time::Duration,
) -> Result<Option<String>> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let row = source
            .query_opt(
                "SELECT s.active_pid, a.application_name::text, host(a.client_addr),
                        to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS UTC')
                 FROM pg_replication_slots s
                 LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid
                 WHERE s.slot_name = $1 AND s.active_pid IS NOT NULL",
                &[&slot],
            )
            .await
            .map_err(|e| error::pg(format!("Reading who holds replication slot {slot}"), e))?;
        let Some(row) = row else { return Ok(None) };
        if tokio::time::Instant::now() >= deadline {
            let pid: i32 = row.get(0);
            let mut parts = vec![format!("PID {pid}")];
            if let Some(name) = row.get::<_, Option<String>>(1).filter(|n| !n.is_empty()) {
                parts.push(format!("application_name {name}"));
            }
            if let Some(host) = row.get::<_, Option<String>>(2) {
                parts.push(format!("from {host}"));
            }
            if let Some(since) = row.get::<_, Option<String>>(3) {
                parts.push(format!("connected since {since}"));
            }
            return Ok(Some(parts.join(", ")));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_that_would_need_quoting_are_refused() {
        assert!(validate_slot_name("sluice_sync_1").is_ok());
        for bad in ["", "Sluice", "a-b", "a b", "x;DROP", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad:?}");
        }
    }
}
