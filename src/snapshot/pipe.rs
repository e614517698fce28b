//! One copy worker: a source and a target connection, and the pipe between them.
//!
//! A chunk is one source transaction (REPEATABLE READ, importing the exported snapshot) and
//! one target transaction. The source's `COPY ... TO STDOUT` stream is fed message by message
//! into the target's `COPY ... FROM STDIN` sink; both sides apply backpressure (bounded
//! channels in tokio-postgres), so memory stays flat whatever the table size. The target
//! transaction commits only after the whole chunk arrived: a chunk is on the target
//! completely or not at all.

use std::pin::pin;

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::error::{self, Cause, Error, ErrorKind, Result};
use crate::session;
use crate::snapshot::plan::{self, TableLayout};
use crate::snapshot::progress::TableProgress;
use crate::snapshot::state::{ChunkDone, ChunkRange};
use crate::source::quote_literal;

use crate::tls;

/// Text output and input must agree on how values are written (`session::rendering_sql`),
/// and a chunk may take hours (`session::LONG_WORK`): both sides pin both.
fn session_settings() -> String {
    format!("{}; {}", session::rendering_sql(), session::LONG_WORK)
}

/// How much COPY data goes to the target in one CopyData message.
const COALESCE_BYTES: usize = 128 * 1024;

pub struct Worker {
    source: Client,
    target: Client,
    /// To ask, on a connection of its own, how a COMMIT whose reply was lost ended.
    target_conn: ConnInfo,
}

impl Worker {
    pub async fn connect(source: &ConnInfo, target: &ConnInfo) -> Result<Worker> {
        let target_conn = target.clone();
        let source = tls::connect(source, "the source").await?;
        source
            .batch_execute(&format!(
                "{}; SET application_name = 'sluice copy'",
                session_settings()
            ))
            .await
            .map_err(|e| error::pg("Preparing a copy session on the source", e))?;
        let target = tls::connect(target, "the target").await?;
        target
            .batch_execute(&session_settings())
            .await
            .map_err(|e| error::pg("Preparing a copy session on the target", e))?;
        // `replica`: no triggers and no foreign-key checks while rows arrive, as PostgreSQL's
        // own table sync does. It needs superuser (or, from 15, a granted SET privilege).
        // Without it, `run` has already refused targets whose triggers would act on the
        // rows, and a chunk a foreign key refuses waits for the rows it refers to (mod.rs).
        if let Err(e) = target
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            tracing::debug!(error = %e, "session_replication_role = replica not allowed on the target; copying with triggers enabled");
        }
        Ok(Worker {
            source,
            target,
            target_conn,
        })
    }

    /// Copies one chunk under `snapshot`, committing it on the target.
    pub async fn copy_chunk(
        &mut self,
        layout: &TableLayout,
        chunk: ChunkRange,
        snapshot: &str,
        progress: &TableProgress,
    ) -> Result<ChunkDone> {
        let mut counted = (0u64, 0u64);
        let result = self
            .copy_chunk_counted(layout, chunk, snapshot, progress, &mut counted)
            .await;
        if result.is_err() {
            // The target transaction is rolled back: so are the rows it had counted.
            progress.subtract(counted.0, counted.1);
        }
        result
    }

    async fn copy_chunk_counted(
        &mut self,
        layout: &TableLayout,
        chunk: ChunkRange,
        snapshot: &str,
        progress: &TableProgress,
        counted: &mut (u64, u64),
    ) -> Result<ChunkDone> {
        let what = plan::describe(layout, chunk);
        let source_sql = plan::source_copy_sql(layout, chunk)?;
        if let Err(e) = self
            .source
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(snapshot)
            ))
            .await
        {
            // 22023 "invalid snapshot identifier": the session that exported it is gone.
            if e.code().map(|c| c.code()) == Some("22023") {
                return Err(Error::with_source(
                    ErrorKind::Transient,
                    format!("Copying {what}: the exported snapshot {snapshot} is gone (its replication session ended); the copy continues under a fresh snapshot"),
                    e,
                ));
            }
            return Err(error::pg(
                format!("Copying {what}: importing snapshot {snapshot} on the source"),
                e,
            ));
        }
        // A rewrite (ALTER TABLE ... TYPE, VACUUM FULL, CLUSTER, pg_repack) committed after
        // the snapshot gives the table a new file whose rows this snapshot does not see (a
        // rewrite is not MVCC-safe): the copy would read an empty table, or a block range
        // of another file, and the stream carries no rows for it. Under the lock (COPY takes
        // it anyway, and it keeps the file until this chunk's transaction ends), the file of
        // each leaf as of the snapshot (pg_class, read through it) is compared with the file
        // it has now.
        self.source
            .batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS SHARE MODE",
                layout.name.quoted()
            ))
            .await
            .map_err(|e| source_error(&what, e))?;
        let rewritten: Vec<String> = self
            .source
            .query(
                // pg_partition_tree lists nothing for a table that is not partitioned.
                "SELECT c.oid::regclass::text
                 FROM (SELECT relid FROM pg_partition_tree($1::text::regclass)
                       UNION SELECT $1::text::regclass) AS tree
                 JOIN pg_class AS c ON c.oid = tree.relid
                 WHERE c.relkind = 'r'
                   AND c.relfilenode IS DISTINCT FROM pg_relation_filenode(c.oid)",
                &[&layout.name.quoted()],
            )
            .await
            .map_err(|e| source_error(&what, e))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !rewritten.is_empty() {
            return Err(Error::transient(format!(
                "The table was rewritten on the source: {} ({}) after the copy's snapshot was taken (VACUUM FULL, CLUSTER, ALTER TABLE ... TYPE, TRUNCATE, pg_repack); that snapshot no longer sees its rows, so it is copied again from the start under a fresh snapshot",
                layout.name,
                rewritten.join(", ")
            ))
            .because(Cause::TableRewritten));
        }
        self.target
            .batch_execute("BEGIN")
            .await
            .map_err(|e| error::pg(format!("Copying {what}: BEGIN on the target"), e))?;
        // The transaction's id, so that a COMMIT whose reply is lost can be looked up
        // rather than the chunk copied a second time beside its committed rows.
        let xid: i64 = self
            .target
            .query_one("SELECT txid_current()", &[])
            .await
            .map_err(|e| error::pg(format!("Copying {what}: on the target"), e))?
            .get(0);

        let sink = self
            .target
            .copy_in::<_, bytes::Bytes>(&plan::target_copy_sql(layout))
            .await
            .map_err(|e| target_error(&what, e))?;
        let stream = self
            .source
            .copy_out(&source_sql)
            .await
            .map_err(|e| source_error(&what, e))?;
        let mut sink = pin!(sink);
        let mut stream = pin!(stream);
        // PostgreSQL sends one CopyData message per row (binary: the header rides on the
        // first row, the trailer is a message of its own), so counting messages gives live
        // row counts; the exact count comes from the target at the end.
        let mut pending = (0u64, 0u64);
        // COPY data is a byte stream: message boundaries need not match rows. Rows are
        // gathered into large CopyData messages, so the target connection handles one message
        // (and one write) per `COALESCE_BYTES` instead of per 4 kB (tokio-postgres's own
        // threshold), which measured a quarter less CPU in sluice for the same copy
        // (docs/benchmarks.md).
        let mut gathered = bytes::BytesMut::with_capacity(COALESCE_BYTES);
        while let Some(data) = stream.next().await {
            let data = data.map_err(|e| source_error(&what, e))?;
            pending.0 += 1;
            pending.1 += data.len() as u64;
            gathered.extend_from_slice(&data);
            if gathered.len() >= COALESCE_BYTES {
                // `feed` queues without flushing (`send` would flush every message, FACTS.md).
                sink.feed(gathered.split().freeze())
                    .await
                    .map_err(|e| target_error(&what, e))?;
                gathered.reserve(COALESCE_BYTES);
            }
            if pending.0 >= 1024 {
                progress.add(pending.0, pending.1);
                counted.0 += pending.0;
                counted.1 += pending.1;
                pending = (0, 0);
            }
        }
        if !gathered.is_empty() {
            sink.feed(gathered.freeze())
                .await
                .map_err(|e| target_error(&what, e))?;
        }
        progress.add(pending.0, pending.1);
        counted.0 += pending.0;
        counted.1 += pending.1;
        let rows = sink.finish().await.map_err(|e| target_error(&what, e))?;
        if let Err(e) = self.target.batch_execute("COMMIT").await {
            // A refusal (a deferred constraint) is an answer; a lost connection is not: the
            // COMMIT may have been carried out and only its reply lost.
            if e.as_db_error().is_some() || !self.committed_after_all(xid, &what).await? {
                return Err(target_error(&what, e));
            }
            tracing::info!(chunk = %what, "the target's reply to COMMIT was lost, but the chunk's transaction committed: it is not copied again");
        }
        // Nothing was written on the source; ending the snapshot transaction is all.
        let _ = self.source.batch_execute("COMMIT").await;
        // Replace the message count with the exact row count.
        if rows >= counted.0 {
            progress.add(rows - counted.0, 0);
        } else {
            progress.subtract(counted.0 - rows, 0);
        }
        counted.0 = rows;
        Ok(ChunkDone {
            rows,
            bytes: counted.1,
        })
    }
}

impl Worker {
    /// How the target transaction `xid` ended, asked on a fresh connection: `true` when it
    /// committed. A backend whose client went away finishes the COMMIT it was given first,
    /// and a target restarting takes a moment: both are asked again for a while. When no
    /// answer comes, the error ([`Cause::CommitUnknown`]) makes the copy empty the table and copy
    /// it again under a fresh snapshot instead of retrying the chunk beside rows it may
    /// have committed.
    async fn committed_after_all(&self, xid: i64, what: &str) -> Result<bool> {
        let mut last = String::new();
        let mut client = None;
        for _ in 0..50 {
            if client.is_none() {
                match tls::connect(&self.target_conn, "the target").await {
                    Ok(c) => client = Some(c),
                    Err(e) => last = e.report(),
                }
            }
            if let Some(c) = &client {
                match c.query_one("SELECT txid_status($1)", &[&xid]).await {
                    Ok(row) => match row.get::<_, Option<String>>(0).as_deref() {
                        Some("committed") => return Ok(true),
                        Some("aborted") => return Ok(false),
                        other => last = format!("transaction {xid} is {other:?}"),
                    },
                    Err(e) => {
                        last = e.to_string();
                        client = None;
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Err(Error::transient(format!(
            "Copying {what}: the connection to the target was lost during COMMIT and how it ended could not be learned ({last}); its rows may be on the target already, so the table is emptied and copied again rather than the chunk retried"
        ))
        .because(Cause::CommitUnknown))
    }
}

fn source_error(what: &str, e: tokio_postgres::Error) -> Error {
    let hint = if is_row_security_refusal(&e) {
        ": row-level security policies would hide rows from this user, so nothing is copied rather than a part; let the source user bypass them (ALTER ROLE ... BYPASSRLS, as a superuser), connect as the table's owner, or exclude the table in [tables]"
    } else if e.code().map(|c| c.code()) == Some("42501") {
        ": the source user may not read the table; GRANT USAGE ON SCHEMA (of the table) and SELECT ON the table TO it, or exclude the table in [tables] (`sluice check` lists what is missing)"
    } else {
        ""
    };
    error::pg(format!("Copying {what}: reading from the source{hint}"), e)
}

/// "query would be affected by row-level security policy" (42501 under `row_security = off`).
fn is_row_security_refusal(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code().code() == "42501" && db.message().contains("row-level security")
    })
}

/// A refused row on the target (type mismatch, constraint) is the operator's to fix.
fn target_error(what: &str, e: tokio_postgres::Error) -> Error {
    let hint = match e.code().map(|c| c.code()) {
        _ if is_row_security_refusal(&e) => {
            ": row-level security policies on the target table apply to this user; let it bypass them (ALTER ROLE ... BYPASSRLS) or connect as the table's owner"
        }
        Some("42501") => {
            ": the target user lacks a privilege the copy needs (INSERT on the table, USAGE on its schema); GRANT it, or connect as the table's owner (`sluice check` lists what is missing)"
        }
        // untranslatable_character: a text value, not a column type.
        Some("22P05") => {
            ": the target database's encoding cannot hold a character the source has; create the target database in UTF8 (CREATE DATABASE ... ENCODING 'UTF8') and copy again"
        }
        Some(code) if code.starts_with("23") => {
            ": the target refused a row (constraint); copy into empty tables without extra constraints, or fix the target table"
        }
        Some(code) if code.starts_with("22") || code.starts_with("42") => {
            ": the target does not accept one of the source's values as it stands (the error below says which); compare the table's column types with the source's (`sluice check`), and objects the values name (a type, a text search configuration, a table in a reg* column) that the target lacks"
        }
        _ => "",
    };
    error::pg(format!("Copying {what}: writing to the target{hint}"), e)
}
