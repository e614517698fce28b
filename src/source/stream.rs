//! The reader: replication events from pgwire-replication → decoded, typed stream items on a
//! bounded channel to the applier.
//!
//! pgwire-replication parses Begin, Commit and Message itself and hands every other pgoutput
//! message over raw; our decoder turns those into relations and row changes. The reader also
//! drops what the target already has: a transaction whose commit record starts before the
//! position the target holds (`final_lsn < resume_after`) was applied before, and a table
//! that was (re)copied under a later snapshot skips its changes committed before that
//! snapshot's consistent point.
//!
//! Keepalives are forwarded only between transactions: acknowledging a keepalive position
//! while a transaction is half received would let the slot skip it after a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{mpsc, watch};

use crate::control::SharedStatus;
use crate::error::{self, Error, ErrorKind, Result};
use crate::lsn::Lsn;
use crate::pgoutput::{
    Decoder, LogicalMessage, OldTuple, PgTimestamp, Relation, RelationCache, Tuple,
};
use crate::source::TableName;

/// What the applier receives, in source order.
#[derive(Debug)]
pub enum StreamItem {
    Begin {
        final_lsn: Lsn,
        xid: u32,
        commit_time: PgTimestamp,
    },
    /// A user type was described (it precedes the first Relation that uses it): its name,
    /// for messages about a column of that type.
    Type {
        oid: u32,
        name: String,
    },
    /// A relation was announced (first use, or after DDL on the source).
    Relation {
        relation: Arc<Relation>,
        changed: bool,
        /// Its generated columns (pgoutput leaves them out), from the source's catalog: a
        /// plain column of that name on the target would stay empty.
        generated: Vec<GeneratedColumn>,
    },
    Insert {
        relation: Arc<Relation>,
        new: Tuple,
    },
    Update {
        relation: Arc<Relation>,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: Arc<Relation>,
        old: OldTuple,
    },
    Truncate {
        relations: Vec<Arc<Relation>>,
        cascade: bool,
        restart_identity: bool,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    /// The source has sent everything up to `wal_end` and no transaction is open.
    KeepAlive {
        wal_end: Lsn,
    },
}

/// How long the stream may stay silent before sluice asks the source, on a SQL session,
/// whether a walsender still holds the slot. Silence alone proves nothing: the walsender
/// pings only a client that has not reported for `wal_sender_timeout / 2`, and ours
/// reports every second, so a source with no WAL at all sends nothing for as long as it is
/// idle. A connection lost without a word (a network cut) leaves the walsender without our
/// reports; it ends after `wal_sender_timeout`, and then no session holds the slot. So the
/// question is asked a little after that timeout (`silence_limit`).
pub fn silence_limit(wal_sender_timeout: Duration) -> Duration {
    if wal_sender_timeout.is_zero() {
        // The source never ends a silent walsender: ask every minute all the same.
        return Duration::from_secs(60);
    }
    (wal_sender_timeout + Duration::from_secs(5))
        .clamp(Duration::from_secs(10), Duration::from_secs(300))
}

pub struct Reader {
    pub client: ReplicationClient,
    /// Batches of items, in source order.
    pub items: mpsc::Sender<ItemBatch>,
    /// Bytes of row data handed to the applier and not yet taken in by it, in KiB: a
    /// transaction of wide rows must not pile up in the channel (it is bounded in batches,
    /// each up to `BATCH` items). See [`ItemBatch`].
    pub budget: Arc<tokio::sync::Semaphore>,
    /// Acknowledgements from the applier: every LSN here is durably applied.
    pub acks: watch::Receiver<Lsn>,
    /// Transactions whose commit starts before this are already on the target.
    pub resume_after: Lsn,
    /// Per table: skip changes of transactions committed before this LSN.
    pub table_sync: BTreeMap<TableName, Lsn>,
    pub status: SharedStatus,
    /// A SQL session on the source and the slot's name, to tell a quiet stream from a dead
    /// one, asked after `silence_limit` without a message.
    pub liveness: (tokio_postgres::Client, String),
    pub silence_limit: Duration,
    /// `[tables]`: a publication may publish more than sluice selected (one made by the
    /// owner `FOR ALL TABLES`, or shared with another migration); what it does not select
    /// is not applied.
    pub selection: crate::config::TablesConfig,
    /// With the copy on: the tables this daemon started with. A table `[tables]` selects but
    /// that is not among them (created, or added to the publication, since) is copied at the
    /// next start under a fresh snapshot, which holds its changes until then: applied now,
    /// they would land in a table not copied yet (stalls, or rows the copy then refuses).
    pub started_with: Option<std::collections::BTreeSet<TableName>>,
    /// The selected tables this daemon started with, by OID: a change of one under another
    /// name (renamed since, even renamed back) is that table's, not an unselected one's.
    pub started_oids: HashMap<u32, TableName>,
    pub publication: String,
    /// With the copy on: the store whose copy records a table copied again is forgotten in.
    pub recopy: Option<crate::checkpoint::Store>,
}

/// A column the source computes (`GENERATED ALWAYS AS (expression) STORED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedColumn {
    pub name: String,
    pub type_text: String,
    pub expression: String,
}

/// Items per hand-over to the applier, at most: one channel operation and one wake-up per
/// batch rather than per row change.
const BATCH: usize = 256;
/// Row data per hand-over, at most (past the item that reaches it): a batch of wide rows is
/// handed over early.
const BATCH_BYTES: usize = 4 << 20;
/// Row data (KiB) between the reader and the applier, at most; a single larger row takes all
/// of it and waits for the applier to take the rest in.
pub const BUDGET_KIB: usize = 64 << 10;

/// A hand-over to the applier: items in source order, with the share of the byte budget
/// they hold until the applier has taken them in (dropped with the batch).
pub struct ItemBatch {
    pub items: Vec<StreamItem>,
    pub budget: tokio::sync::OwnedSemaphorePermit,
}

impl StreamItem {
    /// Row data this item holds, for the memory bounds (messages without rows: 0).
    pub fn row_bytes(&self) -> usize {
        match self {
            StreamItem::Insert { new, .. } => new.payload_bytes(),
            StreamItem::Update { old, new, .. } => {
                new.payload_bytes() + old.as_ref().map_or(0, |o| o.tuple().payload_bytes())
            }
            StreamItem::Delete { old, .. } => old.tuple().payload_bytes(),
            _ => 0,
        }
    }
}

/// A batch smaller than this means the reader is ahead of the source: it waits `COALESCE`.
const TRICKLE: usize = 32;
const COALESCE: Duration = Duration::from_millis(1);

/// The reader's decoding state across events.
struct ReadState {
    decoder: Decoder,
    relations: RelationCache,
    /// The open transaction: whether to drop it, and its commit LSN for per-table skips.
    open: Option<(bool, Lsn)>,
    /// Relation OID → whether `[tables]` selects it (itself, or as a partition of a
    /// selected table), decided at its first description on this connection under each
    /// name: a table renamed since (its older changes come under the old name) is decided
    /// again under the new one, not left as it was for the old.
    selected: HashMap<u32, (String, Selected)>,
}

/// Whether `[tables]` selects a relation the stream describes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selected {
    /// By its own name (changes arrive under the selected table's name).
    Itself,
    /// A partition whose changes arrive under its own name, of this selected table: the
    /// publication published it without `publish_via_partition_root` at that position.
    PartitionOf(TableName),
    /// A selected table's changes under a name it had before (renamed since the change,
    /// while sluice was stopped or behind): sluice applies by name, so it cannot apply them
    /// to the table now under the selected name.
    FormerName(TableName),
    No,
}

impl Reader {
    /// After a silence: fine while a walsender holds the slot (an idle source), an error to
    /// reconnect on when none does or the source cannot be asked.
    async fn check_still_streaming(&self) -> Result<()> {
        let (source, slot) = &self.liveness;
        let held = crate::source::slot::slot_info(source, slot)
            .await
            .map_err(|e| {
                e.context(format!(
                    "The replication stream was silent for {:?} and the source could not be asked about slot {slot}",
                    self.silence_limit
                ))
            })?
            .map(|info| info.active_pid.is_some());
        match held {
            Some(true) => {
                tracing::debug!(slot = %slot, "stream quiet, slot held: the source is idle");
                Ok(())
            }
            _ => Err(Error::transient(format!(
                "The replication stream was silent for {:?} and no session holds slot {slot} on the source: the connection is lost; reconnecting",
                self.silence_limit
            ))),
        }
    }

    /// Whether `[tables]` selects a published relation: by its own name, or, for a partition
    /// (changes come per partition unless the publication publishes via the root), by the
    /// name of a partitioned table above it (never its own: partitions are never selected on
    /// their own). A relation the source's catalog does not show is looked for again for a
    /// moment (the walsender may send a transaction as soon as its commit record is flushed,
    /// before other sessions see what it created), then decided by its own name (dropped
    /// since the change: a missing target table stalls, never silently).
    async fn is_selected(&self, relation: &Relation) -> Result<Selected> {
        let (source, _) = &self.liveness;
        let mut attempts = 0;
        let rows = loop {
            let rows = source
                .query(
                    "WITH RECURSIVE up(oid, depth) AS (
                         SELECT $1::oid, 0
                       UNION ALL
                         SELECT i.inhparent, up.depth + 1 FROM up
                         JOIN pg_catalog.pg_class c ON c.oid = up.oid AND c.relispartition
                         JOIN pg_catalog.pg_inherits i ON i.inhrelid = up.oid
                     )
                     SELECT n.nspname::text, c.relname::text
                     FROM up JOIN pg_catalog.pg_class c ON c.oid = up.oid
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                     ORDER BY up.depth",
                    &[&relation.oid],
                )
                .await
                .map_err(|e| {
                    crate::error::pg(
                        format!(
                            "Looking up whether [tables] selects {} on the source",
                            relation.shown_name()
                        ),
                        e,
                    )
                })?;
            attempts += 1;
            if !rows.is_empty() || attempts >= 20 {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // A partition is selected through the topmost partitioned table `[tables]` selects
        // (as the copy and the publication take it), even when a glob matches its own name.
        let ancestor = rows.iter().skip(1).rev().find_map(|row| {
            let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
            self.selection.selects(&name.qualified()).then_some(name)
        });
        let partition = rows.len() > 1;
        let copied_later = |name: &TableName| {
            let later = self
                .started_with
                .as_ref()
                .is_some_and(|tables| !tables.contains(name));
            if later {
                tracing::info!(
                    table = %name,
                    "selected by [tables] but new since this daemon started: its changes are not applied now; the next start of sluice run copies it under a fresh snapshot that holds them"
                );
                // Where `status` readers see it too: lag and cutover do not count it.
                let warning = format!(
                    "{name} is selected but new since this daemon started: its changes wait for the copy the next start makes; restart sluice run (stop it, start it) to copy it"
                );
                self.status.update(|s| {
                    if !s.warnings.contains(&warning) {
                        s.warnings.push(warning);
                    }
                });
            }
            later
        };
        // A table this daemon streams, under a name it had at another moment (renamed and
        // perhaps renamed back since): its changes, whatever `[tables]` says of the name.
        let named = relation.table_name();
        if let Some(started) = self.started_oids.get(&relation.oid) {
            if *started != named {
                return Ok(Selected::FormerName(started.clone()));
            }
        }
        // Renamed since this change: the selected table is the one under its current name.
        if let Some(row) = rows.first().filter(|_| !partition) {
            let current = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
            if current != named && self.selection.selects(&current.qualified()) {
                return Ok(match copied_later(&current) {
                    true => Selected::No,
                    false => Selected::FormerName(current),
                });
            }
        }
        match ancestor {
            Some(root) if copied_later(&root) => Ok(Selected::No),
            Some(root) => Ok(Selected::PartitionOf(root)),
            None if !partition && self.selection.selects(&relation.qualified_name()) => {
                match copied_later(&named) {
                    true => Ok(Selected::No),
                    false => Ok(Selected::Itself),
                }
            }
            None => {
                tracing::warn!(
                    table = %relation.shown_name(),
                    publication = %self.publication,
                    "the publication publishes a table [tables] does not select: its changes are not applied"
                );
                Ok(Selected::No)
            }
        }
    }

    /// With the copy on, forgets `table`'s finished copy so that the next start copies it
    /// afresh. A store that cannot be written leaves the copy in place (`false`): the message
    /// then says to copy the table again by hand.
    fn forget_for_recopy(&self, table: &TableName) -> bool {
        self.recopy.as_ref().is_some_and(|store| {
            crate::snapshot::forget_finished_copies(store, std::slice::from_ref(table))
                .unwrap_or(false)
        })
    }

    /// A change of a selected partitioned table's partition that arrived under the
    /// partition's own name, after the root's copy: sluice applies a partitioned table's
    /// changes through its root (the target may be partitioned otherwise, and the root's
    /// copy and sync position are the root's), so it stops rather than apply it beside
    /// them. With the copy on, the root's copy is forgotten so that the next start copies it
    /// afresh under a new snapshot, which also holds this change.
    fn change_under_a_partition_name(
        &self,
        relation: &Relation,
        root: &TableName,
        txn_final_lsn: Option<Lsn>,
    ) -> Error {
        let at = txn_final_lsn.map_or_else(|| "-".to_string(), |lsn| lsn.to_string());
        let forgotten = self.forget_for_recopy(root);
        let then = if forgotten {
            format!(
                "sluice forgot its copy of {root}: set publish_via_partition_root = true again if it is not, empty {root} on the target (TRUNCATE {}) and start sluice run again; it copies {root} afresh before streaming resumes and skips the changes that copy holds",
                root.quoted()
            )
        } else {
            format!(
                "{root} must be copied again: set publish_via_partition_root = true again if it is not, empty {root} on the target, and start sluice run with copy.enabled = true after a finished copy (it copies a table it has no copy of before streaming resumes)"
            )
        };
        Error::definite(format!(
            "The source sent changes of {} (a partition of the selected {root}) under the partition's own name in the transaction ending at {at}: publication {} published it without publish_via_partition_root at that moment (set to false while sluice was stopped, or just now), and sluice applies a partitioned table's changes only through its root. {then}",
            relation.shown_name(),
            self.publication
        ))
    }

    /// A change of a selected table that arrived under a name it had before (renamed while
    /// sluice was stopped, or while apply was behind): sluice applies by name and cannot
    /// apply it to the table now under the selected name, nor skip it. It stops, and (copy
    /// on) forgets that table's copy, so that the next start copies it afresh under a new
    /// snapshot, which holds this change.
    fn change_under_a_former_name(
        &self,
        relation: &Relation,
        current: &TableName,
        txn_final_lsn: Option<Lsn>,
    ) -> Error {
        let at = txn_final_lsn.map_or_else(|| "-".to_string(), |lsn| lsn.to_string());
        let forgotten = self.forget_for_recopy(current);
        let then = if forgotten {
            format!(
                "sluice forgot its copy of {current}: rename the table on the target too if it is not, empty it (TRUNCATE {}) and start sluice run again; it copies {current} afresh before streaming resumes and skips the changes that copy holds",
                current.quoted()
            )
        } else {
            format!(
                "{current} must be copied again: rename it on the target too, empty it there, and start sluice run with copy.enabled = true after a finished copy (it copies a table it has no copy of before streaming resumes)"
            )
        };
        Error::definite(format!(
            "The source sent changes of {current} under another name it had, {}, in the transaction ending at {at}: it was renamed (while sluice was stopped, or since the daemon started; perhaps renamed back), and sluice applies changes by table name. {then}",
            relation.shown_name()
        ))
    }

    /// The relation's generated columns, from the source's catalog now (a column generated
    /// since the change is one the target must compute too from then on).
    async fn generated_columns(&self, relation: &Relation) -> Result<Vec<GeneratedColumn>> {
        let (source, _) = &self.liveness;
        let rows = source
            .query(
                "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
                        COALESCE(pg_catalog.pg_get_expr(d.adbin, d.adrelid), '')
                 FROM pg_catalog.pg_attribute a
                 LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                 WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND a.attgenerated <> ''",
                &[&relation.oid],
            )
            .await
            .map_err(|e| {
                crate::error::pg(
                    format!("Reading the generated columns of {}", relation.shown_name()),
                    e,
                )
            })?;
        Ok(rows
            .iter()
            .map(|row| GeneratedColumn {
                name: row.get(0),
                type_text: row.get(1),
                expression: row.get(2),
            })
            .collect())
    }

    /// The source's name for a type (schema-qualified: the session's search_path is
    /// empty), or `None` when it cannot be asked.
    async fn type_name(&self, oid: u32) -> Option<String> {
        let (source, _) = &self.liveness;
        source
            .query_one("SELECT pg_catalog.format_type($1, NULL)", &[&oid])
            .await
            .ok()
            .map(|row| row.get(0))
    }

    /// Runs until the stream ends or fails. `Ok(())` means the applier went away (shutdown).
    pub async fn run(mut self) -> Result<()> {
        let mut state = ReadState {
            decoder: Decoder::new(1),
            relations: RelationCache::new(),
            open: None,
            selected: HashMap::new(),
        };
        loop {
            // Wait for the next event (or an acknowledgement to pass on) ...
            let first = tokio::select! {
                changed = self.acks.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let lsn = *self.acks.borrow_and_update();
                    self.client.update_applied_lsn(lsn.into());
                    continue;
                }
                event = tokio::time::timeout(self.silence_limit, receive(&mut self.client)) => match event {
                    Ok(event) => event,
                    Err(_) => {
                        self.check_still_streaming().await?;
                        continue;
                    }
                },
            };
            // ... then take whatever else is already buffered, without waiting.
            let mut batch = Vec::with_capacity(BATCH);
            let mut batch_bytes = 0;
            let mut next = Some(first);
            while let Some(event) = next.take() {
                if let Some(mut item) = self.on_event(received(event)?, &mut state)? {
                    // A description precedes every change of its relation: decided here,
                    // before the next event is decoded.
                    if let StreamItem::Relation {
                        relation,
                        generated,
                        ..
                    } = &mut item
                    {
                        let name = relation.qualified_name();
                        let known = state
                            .selected
                            .get(&relation.oid)
                            .is_some_and(|(decided_for, _)| *decided_for == name);
                        if !known {
                            let selected = self.is_selected(relation).await?;
                            state.selected.insert(relation.oid, (name, selected));
                        }
                        *generated = self.generated_columns(relation).await?;
                    }
                    // pgoutput names a domain by its base type: the source says which.
                    let item = match item {
                        StreamItem::Type { oid, name } => StreamItem::Type {
                            oid,
                            name: self.type_name(oid).await.unwrap_or(name),
                        },
                        item => item,
                    };
                    batch_bytes += item.row_bytes();
                    batch.push(item);
                }
                if batch.len() < BATCH && batch_bytes < BATCH_BYTES {
                    next = receive(&mut self.client).now_or_never();
                }
            }
            let trickle = batch.len() < TRICKLE;
            if !batch.is_empty() {
                let kib = batch_bytes.div_ceil(1024).clamp(1, BUDGET_KIB) as u32;
                let Ok(budget) = self.budget.clone().acquire_many_owned(kib).await else {
                    return Ok(());
                };
                let batch = ItemBatch {
                    items: batch,
                    budget,
                };
                if self.items.send(batch).await.is_err() {
                    return Ok(());
                }
            }
            if trickle {
                // Only a few messages were waiting: let the socket fill for a moment. A reader
                // that keeps the walsender's socket empty makes it send (and pay a system call
                // for) every message on its own; measured, that costs the source more CPU
                // than the whole apply (docs/benchmarks.md). 1 ms is far below
                // apply.batch_max_delay.
                tokio::time::sleep(COALESCE).await;
            }
        }
    }

    /// One replication event → at most one stream item.
    fn on_event(
        &self,
        event: ReplicationEvent,
        state: &mut ReadState,
    ) -> Result<Option<StreamItem>> {
        Ok(Some(match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                let final_lsn = Lsn::from(final_lsn);
                let skip = final_lsn < self.resume_after;
                state.open = Some((skip, final_lsn));
                if skip {
                    return Ok(None);
                }
                StreamItem::Begin {
                    final_lsn,
                    xid,
                    commit_time: PgTimestamp(commit_time_micros),
                }
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                let skipped = matches!(state.open.take(), Some((true, _)));
                self.status
                    .update(|s| s.received_lsn = Some(Lsn::from(end_lsn)));
                if skipped {
                    return Ok(None);
                }
                StreamItem::Commit {
                    commit_lsn: Lsn::from(lsn),
                    end_lsn: Lsn::from(end_lsn),
                    commit_time: PgTimestamp(commit_time_micros),
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = Lsn::from(wal_end);
                self.status.update(|s| {
                    s.received_lsn = Some(s.received_lsn.unwrap_or_default().max(wal_end))
                });
                if state.open.is_some() {
                    return Ok(None);
                }
                StreamItem::KeepAlive { wal_end }
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                tracing::debug!(
                    %prefix, transactional, lsn = %Lsn::from(lsn), bytes = content.len(),
                    "logical message skipped (sluice does not replay messages)"
                );
                return Ok(None);
            }
            ReplicationEvent::StoppedAt { .. } => {
                return Err(Error::transient("The replication stream stopped"))
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = state.decoder.decode(data).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Definite,
                        "The source sent a pgoutput message sluice cannot decode",
                        e,
                    )
                })?;
                let (skip_txn, final_lsn) = match state.open {
                    Some((skip, lsn)) => (skip, Some(lsn)),
                    None => (false, None),
                };
                let item =
                    self.to_item(message, &mut state.relations, &state.selected, final_lsn)?;
                if skip_txn
                    && !matches!(
                        item,
                        Some(StreamItem::Relation { .. } | StreamItem::Type { .. })
                    )
                {
                    // Only relation descriptions of an already applied transaction matter.
                    return Ok(None);
                }
                return Ok(item);
            }
        }))
    }

    /// Turns a decoded message into a stream item; `None` for what the applier does not need.
    fn to_item(
        &self,
        message: LogicalMessage,
        relations: &mut RelationCache,
        selected: &HashMap<u32, (String, Selected)>,
        txn_final_lsn: Option<Lsn>,
    ) -> Result<Option<StreamItem>> {
        let resolve = |relations: &RelationCache, oid: u32| -> Result<Arc<Relation>> {
            relations.resolve(oid).cloned().map_err(|e| {
                Error::with_source(
                    ErrorKind::Definite,
                    "The source sent a change for a relation it never described",
                    e,
                )
            })
        };
        // A table copied under a later snapshot already holds this transaction's changes;
        // one `[tables]` does not select is not sluice's. `Ok(true)`: skip the change.
        let synced = |relation: &Relation| -> Result<bool> {
            let name = match selected.get(&relation.oid).map(|(_, selected)| selected) {
                Some(Selected::No) => return Ok(true),
                Some(Selected::PartitionOf(root)) => {
                    // Before the root's copy: that copy holds it, as for the root's own.
                    let copied = txn_final_lsn
                        .zip(self.table_sync.get(root))
                        .is_some_and(|(final_lsn, sync_lsn)| final_lsn < *sync_lsn);
                    if copied {
                        return Ok(true);
                    }
                    return Err(self.change_under_a_partition_name(relation, root, txn_final_lsn));
                }
                Some(Selected::FormerName(current)) => {
                    // Before the current name's copy: that copy holds it.
                    let copied = txn_final_lsn
                        .zip(self.table_sync.get(current))
                        .is_some_and(|(final_lsn, sync_lsn)| final_lsn < *sync_lsn);
                    if copied {
                        return Ok(true);
                    }
                    return Err(self.change_under_a_former_name(relation, current, txn_final_lsn));
                }
                _ => TableName::new(relation.namespace.clone(), relation.name.clone()),
            };
            let Some(final_lsn) = txn_final_lsn else {
                return Ok(false);
            };
            Ok(self
                .table_sync
                .get(&name)
                .is_some_and(|sync_lsn| final_lsn < *sync_lsn))
        };
        Ok(match message {
            LogicalMessage::Relation(relation) => {
                let changed = relations.insert(relation.clone());
                if let Some(change) = &changed {
                    tracing::info!(table = %relation.shown_name(), "source schema changed: {change}");
                }
                let relation = resolve(relations, relation.oid)?;
                Some(StreamItem::Relation {
                    relation,
                    changed: changed.is_some(),
                    generated: Vec::new(),
                })
            }
            LogicalMessage::Insert(insert) => {
                let relation = resolve(relations, insert.relation_oid)?;
                (!synced(&relation)?).then_some(StreamItem::Insert {
                    relation,
                    new: insert.new,
                })
            }
            LogicalMessage::Update(update) => {
                let relation = resolve(relations, update.relation_oid)?;
                (!synced(&relation)?).then_some(StreamItem::Update {
                    relation,
                    old: update.old,
                    new: update.new,
                })
            }
            LogicalMessage::Delete(delete) => {
                let relation = resolve(relations, delete.relation_oid)?;
                (!synced(&relation)?).then_some(StreamItem::Delete {
                    relation,
                    old: delete.old,
                })
            }
            LogicalMessage::Truncate(truncate) => {
                let mut list = Vec::with_capacity(truncate.relation_oids.len());
                for oid in truncate.relation_oids {
                    let relation = resolve(relations, oid)?;
                    if !synced(&relation)? {
                        list.push(relation);
                    }
                }
                (!list.is_empty()).then_some(StreamItem::Truncate {
                    relations: list,
                    cascade: truncate.cascade,
                    restart_identity: truncate.restart_identity,
                })
            }
            // Values of a type travel as text and are cast by the target column's type; the
            // name only serves messages. Origins and messages carry nothing to apply.
            LogicalMessage::Type(t) => Some(StreamItem::Type {
                oid: t.oid,
                name: match t.namespace.is_empty() {
                    true => crate::source::quote_ident(&t.name),
                    false => format!(
                        "{}.{}",
                        crate::source::quote_ident(&t.namespace),
                        crate::source::quote_ident(&t.name)
                    ),
                },
            }),
            LogicalMessage::Origin(_) | LogicalMessage::Message(_) => None,
            other => {
                return Err(Error::definite(format!(
                    "The source sent a pgoutput {} message, which protocol version 1 never sends",
                    other.kind()
                )))
            }
        })
    }
}

/// One receive from the transport, shielded from tokio's cooperative budget.
///
/// When the replication connection dies, pgwire-replication's `recv` first sees its channel
/// close, then takes the worker's join handle and awaits it for the real error. Both steps
/// spend budget: if the channel step spends the last unit, the join returns `Pending`, and our
/// `now_or_never` (or the `select!` on acknowledgements) drops the future with the handle in
/// it. The error is gone and every later receive says only "replication worker already
/// joined" (seen in CI: a dropped connection made the daemon exit instead of reconnecting).
/// Unconstrained, a closed channel on our current-thread runtime always finds the worker
/// finished, so the join completes in the same poll.
async fn receive(
    client: &mut ReplicationClient,
) -> std::result::Result<Option<ReplicationEvent>, pgwire_replication::PgWireError> {
    tokio::task::unconstrained(client.recv()).await
}

/// The transport's result for one receive, as an event or our error.
fn received(
    result: std::result::Result<Option<ReplicationEvent>, pgwire_replication::PgWireError>,
) -> Result<ReplicationEvent> {
    match result {
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err(Error::transient("The source ended the replication stream")),
        // Only reachable if a receive was cancelled mid-join despite `receive`: the session
        // is over and its error lost. Reconnecting is right either way: a definite cause
        // (slot dropped, permission revoked) shows again when the stream restarts.
        Err(pgwire_replication::PgWireError::Internal(message))
            if message.contains("already joined") =>
        {
            Err(Error::transient(format!(
                "The replication connection ended and its error was lost ({message}); reconnecting"
            )))
        }
        // The walsender decodes with the catalog as of each change: a publication dropped
        // (even if created again since) is missing there for good.
        Err(pgwire_replication::PgWireError::Server(message))
            if message.contains("publication") && message.contains("does not exist") =>
        {
            Err(Error::definite(format!(
                "Reading the replication stream: {message}. The publication was dropped on the source while the slot still had changes to send (or source.publication now names one created after them: then set it back); logical decoding reads publications as of each change's position, so creating it again does not bring back the changes in between. {}",
                crate::daemon::FRESH_COPY
            )))
        }
        Err(e) => Err(error::replication("Reading the replication stream", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_whose_error_was_lost_is_reconnected_not_abandoned() {
        let lost =
            pgwire_replication::PgWireError::Internal("replication worker already joined".into());
        let error = received(Err(lost)).unwrap_err();
        assert!(error.is_transient(), "{}", error.report());
        assert!(
            error.report().contains("reconnecting"),
            "{}",
            error.report()
        );
    }

    #[test]
    fn other_internal_errors_keep_their_classification() {
        let other = pgwire_replication::PgWireError::Internal("bad state".into());
        assert_eq!(
            received(Err(other)).unwrap_err().kind(),
            ErrorKind::Definite
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_receive_is_not_cut_short_by_the_cooperative_budget() {
        // Spend the task's whole budget, as a long batch of receives does; an unconstrained
        // future still completes in one poll.
        let (tx, mut rx) = mpsc::channel::<u8>(1024);
        for _ in 0..1024 {
            tx.try_send(1).unwrap();
        }
        let mut received = 0;
        while rx.recv().now_or_never().is_some() {
            received += 1;
        }
        assert!(
            received < 1024,
            "the budget never ran out: the test proves nothing"
        );
        assert_eq!(
            tokio::task::unconstrained(rx.recv()).now_or_never(),
            Some(Some(1))
        );
    }
}
