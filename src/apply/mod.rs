//! The applier: decoded source transactions → target transactions, in commit order, exactly
//! once.
//!
//! ```text
//!  StreamItem (bounded channel, source order)
//!     │ Begin ─ Insert/Update/Delete ─ Commit ─ Begin ─ … ─ Commit ─ KeepAlive
//!     ▼
//!  Pending (per table: runs of inserts / updates / deletes)      ← bounded: batch_max_rows
//!     │ flush: COPY for insert runs, one UPDATE/DELETE … FROM unnest($n::text[]) per run
//!     ▼
//!  target transaction ─ … ─ position row (slot, end LSN of the last whole source txn) ─ COMMIT
//!     │
//!     ▼ sled checkpoint (flushed) ─▶ acknowledgement to the slot (confirmed_flush_lsn)
//! ```
//!
//! **Transactional.** A target transaction only ever commits at a source commit boundary, so
//! the target never shows part of a source transaction. Several whole source transactions
//! share one target transaction until `batch_max_rows` rows or `batch_max_delay` since the
//! first of them committed. A source transaction larger than a batch is applied in pieces
//! into one open target transaction: pending rows are flushed (executed) every
//! `batch_max_rows`, so memory does not grow with its size, and it commits once, at its end.
//!
//! **Exactly once.** The position row is written in the same target transaction as the
//! changes it covers; sled and the slot only move after that commit. After any crash the
//! target's row says exactly which source transactions it holds, and the reader skips those.
//!
//! **Strict mode.** Batching reorders statements across tables (only when triggers and
//! foreign keys are off, see `batch`) and applies a run of updates as one statement. If the
//! target rejects a batch, the supervisor replays the same source transactions in strict
//! mode: one target transaction per source transaction, one statement per change, in source
//! order, exactly as the source ran them. Only a change that fails even then stalls apply.

pub mod batch;
pub mod sql;
pub mod target;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::checkpoint::{Position, Store};
use crate::control::{DaemonState, SharedStatus};
use crate::error::{classify_sqlstate, Error, ErrorKind, Result};
use crate::lsn::Lsn;
use crate::pgoutput::{OldTuple, PgTimestamp, Relation, ReplicaIdentity, Tuple, Value};
use crate::source::stream::StreamItem;
use crate::source::{quote_literal, TableName};
use batch::{Cell, Pending, Row, Run, TableQueue, UpdateRow, ValueChange};
use sql::SqlColumn;
use target::TargetTable;

/// Insert runs at least this long go through COPY; shorter ones through one INSERT.
const COPY_MIN_ROWS: usize = 32;
/// Pending value bytes that force a flush, whatever the row count (wide rows).
const MAX_PENDING_BYTES: usize = 32 << 20;
/// At most this often, an idle stream's keepalive position is written and acknowledged.
const KEEPALIVE_ACK_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub slot: String,
    pub system_identifier: String,
    pub batch_max_rows: usize,
    pub batch_max_delay: Duration,
    /// Source transactions with a commit LSN up to here are applied in strict mode.
    pub strict_through: Option<Lsn>,
}

/// How a source relation maps onto its target table.
struct TablePlan {
    target: TargetTable,
    /// Target column per source column.
    columns: Vec<SqlColumn>,
    /// How rows are matched for UPDATE/DELETE.
    matching: Matching,
    /// Source column index of the Citus distribution column.
    distribution: Option<usize>,
}

enum Matching {
    /// Source column indexes of the key, with their target columns.
    Key(Vec<usize>),
    /// REPLICA IDENTITY FULL and no usable key on the target: all old values, one row.
    AllValues,
    /// No replica identity: updates and deletes cannot be matched.
    Impossible,
}

impl TablePlan {
    fn key_columns(&self) -> Vec<SqlColumn> {
        match &self.matching {
            Matching::Key(indexes) => indexes.iter().map(|&i| self.columns[i].clone()).collect(),
            _ => Vec::new(),
        }
    }
}

/// Counters the supervisor reads after the applier stops.
#[derive(Debug, Default)]
pub struct Progress {
    /// Commit LSN of the newest source transaction the applier has started.
    pub seen_final_lsn: AtomicU64,
}

pub struct Applier {
    client: Client,
    store: Store,
    status: SharedStatus,
    acks: watch::Sender<Lsn>,
    options: ApplyOptions,
    progress: Arc<Progress>,
    citus: bool,
    /// `session_replication_role = replica` is in effect: statements on different tables
    /// may be reordered.
    replica_role: bool,
    plans: HashMap<u32, TablePlan>,
    statements: HashMap<String, Statement>,
    pending: Pending,
    position: Position,
    in_target_txn: bool,
    /// The source transaction being received: (commit LSN, commit time, strict).
    open_txn: Option<(Lsn, PgTimestamp, bool)>,
    /// Whole source transactions in the open target transaction.
    batch_txns: u64,
    batch_changes: u64,
    batch_rows_executed: usize,
    batch_end_lsn: Lsn,
    batch_commit_time: Option<PgTimestamp>,
    first_commit_waiting: Option<Instant>,
    last_keepalive_ack: Instant,
}

impl Applier {
    /// Prepares the apply session (settings, replica role) on an open target connection.
    pub async fn new(
        client: Client,
        store: Store,
        status: SharedStatus,
        acks: watch::Sender<Lsn>,
        options: ApplyOptions,
        position: Position,
        progress: Arc<Progress>,
    ) -> Result<Applier> {
        // Text values are cast by the target; render and parse them the way the source's
        // walsender was pinned to (see source::replication::PINNED_OPTIONS).
        client
            .batch_execute(
                "SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3;
                 SET TimeZone = 'UTC'; SET statement_timeout = 0; SET lock_timeout = 0;
                 SET idle_in_transaction_session_timeout = 0",
            )
            .await
            .map_err(|e| crate::error::pg("Preparing the apply session on the target", e))?;
        let replica_role = match client
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    "The target user may not set session_replication_role = replica ({}): \
                     applying with triggers and foreign-key checks on, in exact source order \
                     (slower). Grant superuser or run as the table owner on PostgreSQL 15+ to avoid this.",
                    error.as_db_error().map(|e| e.message()).unwrap_or("refused")
                );
                false
            }
        };
        let citus = target::has_citus(&client).await?;
        Ok(Applier {
            client,
            store,
            status,
            acks,
            options,
            progress,
            citus,
            replica_role,
            plans: HashMap::new(),
            statements: HashMap::new(),
            pending: Pending::default(),
            position,
            in_target_txn: false,
            open_txn: None,
            batch_txns: 0,
            batch_changes: 0,
            batch_rows_executed: 0,
            batch_end_lsn: Lsn::ZERO,
            batch_commit_time: None,
            first_commit_waiting: None,
            last_keepalive_ack: Instant::now() - KEEPALIVE_ACK_INTERVAL,
        })
    }

    /// Applies items until the stream ends (`Err`) or `shutdown` fires (`Ok`).
    pub async fn run(
        mut self,
        mut items: mpsc::Receiver<StreamItem>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        loop {
            let deadline = self
                .first_commit_waiting
                .map(|at| at + self.options.batch_max_delay);
            let item = tokio::select! {
                biased;
                _ = shutdown.changed() => return self.shut_down().await,
                _ = sleep_until(deadline), if deadline.is_some() && self.open_txn.is_none() => {
                    self.commit_batch().await?;
                    continue;
                }
                item = items.recv() => item,
            };
            let Some(item) = item else {
                // The reader stopped; it reports why.
                self.rollback().await;
                return Err(Error::transient("The replication stream stopped"));
            };
            if let Err(error) = self.handle(item).await {
                self.rollback().await;
                return Err(error);
            }
        }
    }

    async fn handle(&mut self, item: StreamItem) -> Result<()> {
        match item {
            StreamItem::Begin {
                final_lsn,
                commit_time,
                ..
            } => {
                let strict = self
                    .options
                    .strict_through
                    .is_some_and(|through| final_lsn <= through);
                if strict && self.batch_txns > 0 {
                    // Strict transactions are applied alone.
                    self.commit_batch().await?;
                }
                self.progress
                    .seen_final_lsn
                    .fetch_max(final_lsn.0, Ordering::Relaxed);
                self.open_txn = Some((final_lsn, commit_time, strict));
            }
            StreamItem::Relation { relation, changed } => {
                if changed || self.plans.contains_key(&relation.oid) {
                    // Pending rows were planned against the old shape: apply them first.
                    self.flush().await?;
                    self.plans.remove(&relation.oid);
                }
            }
            StreamItem::Insert { relation, new } => {
                self.before_change(relation.oid).await?;
                self.begin_target_txn().await?;
                self.plan(&relation).await?;
                self.push_insert(&relation, &new)?;
                self.after_change(relation.oid).await?;
            }
            StreamItem::Update { relation, old, new } => {
                self.before_change(relation.oid).await?;
                self.begin_target_txn().await?;
                self.plan(&relation).await?;
                self.push_update(&relation, old.as_ref(), &new)?;
                self.after_change(relation.oid).await?;
            }
            StreamItem::Delete { relation, old } => {
                self.before_change(relation.oid).await?;
                self.begin_target_txn().await?;
                self.plan(&relation).await?;
                self.push_delete(&relation, &old)?;
                self.after_change(relation.oid).await?;
            }
            StreamItem::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                self.flush().await?;
                self.begin_target_txn().await?;
                let names: Vec<String> = relations
                    .iter()
                    .map(|r| TableName::new(r.namespace.clone(), r.name.clone()).quoted())
                    .collect();
                let statement = sql::truncate(&names, cascade, restart_identity);
                let what = format!("TRUNCATE of {}", names.join(", "));
                let result = self.client.batch_execute(&statement).await;
                result.map_err(|e| self.apply_error(&what, e))?;
                self.batch_changes += relations.len() as u64;
            }
            StreamItem::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                let strict = self.open_txn.take().is_some_and(|(_, _, strict)| strict);
                self.batch_txns += 1;
                self.batch_end_lsn = end_lsn;
                self.batch_commit_time = Some(commit_time);
                if self.first_commit_waiting.is_none() {
                    self.first_commit_waiting = Some(Instant::now());
                }
                if strict
                    || self.batch_rows_executed + self.pending.rows >= self.options.batch_max_rows
                {
                    self.commit_batch().await?;
                }
            }
            StreamItem::KeepAlive { wal_end } => {
                if self.batch_txns == 0 && !self.in_target_txn && self.open_txn.is_none() {
                    self.status.update(|s| s.lag_seconds = Some(0.0));
                    if wal_end > self.position.caught_up_lsn
                        && self.last_keepalive_ack.elapsed() >= KEEPALIVE_ACK_INTERVAL
                    {
                        self.acknowledge_idle(wal_end).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Without the replica role, statements on different tables must not be reordered:
    /// apply what is pending before the first change of another table.
    async fn before_change(&mut self, relation: u32) -> Result<()> {
        if !self.replica_role && self.pending.last_table.is_some_and(|last| last != relation) {
            self.flush().await?;
        }
        Ok(())
    }

    async fn after_change(&mut self, _relation: u32) -> Result<()> {
        self.batch_changes += 1;
        let strict = self.open_txn.is_some_and(|(_, _, strict)| strict);
        if strict
            || self.pending.rows >= self.options.batch_max_rows
            || self.pending.bytes >= MAX_PENDING_BYTES
        {
            self.flush().await?;
        }
        Ok(())
    }

    async fn begin_target_txn(&mut self) -> Result<()> {
        if !self.in_target_txn {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| self.apply_error("BEGIN", e))?;
            self.in_target_txn = true;
        }
        Ok(())
    }

    async fn rollback(&mut self) {
        if self.in_target_txn {
            let _ = self.client.batch_execute("ROLLBACK").await;
            self.in_target_txn = false;
        }
        self.pending.drain();
    }

    async fn shut_down(mut self) -> Result<()> {
        if self.open_txn.is_some() {
            // Half a source transaction is in the target transaction: it must not commit.
            tracing::info!("shutting down: rolling back the partly applied source transaction");
            self.rollback().await;
        } else if self.batch_txns > 0 {
            tracing::info!(
                transactions = self.batch_txns,
                "shutting down: committing the whole source transactions already applied"
            );
            self.commit_batch().await?;
        }
        Ok(())
    }

    /// Plans a relation against its target table (once per relation shape).
    async fn plan(&mut self, relation: &Arc<Relation>) -> Result<()> {
        if self.plans.contains_key(&relation.oid) {
            return Ok(());
        }
        let name = TableName::new(relation.namespace.clone(), relation.name.clone());
        let table = target::load(&self.client, &name, self.citus).await?;
        let mut columns = Vec::with_capacity(relation.columns.len());
        for column in &relation.columns {
            columns.push(table.require_column(&column.name)?.clone());
        }
        let index_of = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let source_key: Vec<usize> = relation.key_columns().collect();
        let target_key: Option<Vec<usize>> = (!table.primary_key.is_empty())
            .then(|| {
                table
                    .primary_key
                    .iter()
                    .map(|c| index_of(c))
                    .collect::<Option<Vec<_>>>()
            })
            .flatten();
        let matching = match relation.replica_identity {
            ReplicaIdentity::Full => match target_key {
                Some(key) => Matching::Key(key),
                None if table.distribution_column.is_some() => {
                    return Err(Error::new(
                        ErrorKind::Apply,
                        format!(
                            "{name} has REPLICA IDENTITY FULL and no primary key on the Citus target: rows cannot be matched on a distributed table (no ctid). Add a primary key that includes the distribution column on the target"
                        ),
                    ))
                }
                None => Matching::AllValues,
            },
            _ if !source_key.is_empty() => Matching::Key(source_key),
            _ => Matching::Impossible,
        };
        let distribution = table.distribution_column.as_deref().and_then(index_of);
        self.plans.insert(
            relation.oid,
            TablePlan {
                target: table,
                columns,
                matching,
                distribution,
            },
        );
        Ok(())
    }

    fn plan_for(&self, relation: &Relation) -> &TablePlan {
        &self.plans[&relation.oid]
    }

    fn push_insert(&mut self, relation: &Relation, new: &Tuple) -> Result<()> {
        let row = cells(new, relation, "INSERT")?;
        let bytes: usize = row.iter().map(Cell::weight).sum();
        self.pending
            .queue(relation.oid)
            .push_insert(Arc::from(row.into_boxed_slice()));
        self.pending.rows += 1;
        self.pending.bytes += bytes;
        Ok(())
    }

    fn push_update(
        &mut self,
        relation: &Relation,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<()> {
        let plan = self.plan_for(relation);
        let new_cells = cells(new, relation, "UPDATE")?;
        let bytes: usize = new_cells.iter().map(Cell::weight).sum();
        let key_indexes = match &plan.matching {
            Matching::Key(indexes) => indexes.clone(),
            Matching::AllValues => {
                let Some(OldTuple::Full(old)) = old else {
                    return Err(self.missing_old_tuple(relation, "UPDATE"));
                };
                let old = cells(old, relation, "UPDATE")?;
                self.pending
                    .queue(relation.oid)
                    .push_by_values(ValueChange::Update {
                        old,
                        new: new_cells,
                    });
                self.pending.rows += 1;
                self.pending.bytes += bytes;
                return Ok(());
            }
            Matching::Impossible => return Err(self.no_identity(relation, "UPDATE")),
        };
        let distribution = plan.distribution;
        let old_cells = match old {
            Some(old) => Some(cells(old.tuple(), relation, "UPDATE")?),
            None => None,
        };
        let old_key: Vec<Cell> = key_indexes
            .iter()
            .map(|&i| old_cells.as_ref().unwrap_or(&new_cells)[i].clone())
            .collect();
        if old_key.contains(&Cell::Unchanged) {
            return Err(Error::new(
                ErrorKind::Apply,
                format!(
                    "An UPDATE of {} did not carry its key values (unchanged TOAST in a key column): set REPLICA IDENTITY FULL on the source table",
                    relation.qualified_name()
                ),
            ));
        }
        let new_key: Vec<Cell> = key_indexes.iter().map(|&i| new_cells[i].clone()).collect();
        let key_changed = new_key != old_key;
        // Citus cannot move a row between shards with UPDATE: delete and re-insert it.
        if let Some(dist) = distribution {
            let old_dist = old_cells.as_ref().map(|o| &o[dist]);
            if let Some(old_dist) =
                old_dist.filter(|d| **d != new_cells[dist] && **d != Cell::Unchanged)
            {
                let _ = old_dist;
                let mut row = new_cells.clone();
                for (i, cell) in row.iter_mut().enumerate() {
                    if *cell == Cell::Unchanged {
                        match old_cells.as_ref().map(|o| &o[i]) {
                            Some(Cell::Text(value)) => *cell = Cell::Text(value.clone()),
                            Some(Cell::Null) => *cell = Cell::Null,
                            _ => {
                                return Err(Error::new(
                                    ErrorKind::Apply,
                                    format!(
                                        "An UPDATE of {} moves a row to another distribution value but leaves a TOASTed column out: set REPLICA IDENTITY FULL on the source table so the whole row is known",
                                        relation.qualified_name()
                                    ),
                                ))
                            }
                        }
                    }
                }
                let queue = self.pending.queue(relation.oid);
                queue.push_delete(old_key);
                queue.push_insert(Arc::from(row.into_boxed_slice()));
                self.pending.rows += 2;
                self.pending.bytes += bytes;
                return Ok(());
            }
        }
        let row = UpdateRow {
            key: old_key,
            new: new_cells,
        };
        let queue = self.pending.queue(relation.oid);
        let merged = queue.push_update(row, key_changed.then_some(new_key));
        if !merged {
            self.pending.rows += 1;
        }
        self.pending.bytes += bytes;
        Ok(())
    }

    fn push_delete(&mut self, relation: &Relation, old: &OldTuple) -> Result<()> {
        let plan = self.plan_for(relation);
        let old_cells = cells(old.tuple(), relation, "DELETE")?;
        let bytes: usize = old_cells.iter().map(Cell::weight).sum();
        match &plan.matching {
            Matching::Key(indexes) => {
                let key: Vec<Cell> = indexes.iter().map(|&i| old_cells[i].clone()).collect();
                self.pending.queue(relation.oid).push_delete(key);
            }
            Matching::AllValues => {
                self.pending
                    .queue(relation.oid)
                    .push_by_values(ValueChange::Delete { old: old_cells });
            }
            Matching::Impossible => return Err(self.no_identity(relation, "DELETE")),
        }
        self.pending.rows += 1;
        self.pending.bytes += bytes;
        Ok(())
    }

    fn no_identity(&self, relation: &Relation, what: &str) -> Error {
        Error::new(
            ErrorKind::Apply,
            format!(
                "{what} on {} cannot be matched on the target: the table has no replica identity. Give it a primary key or REPLICA IDENTITY FULL on the source",
                relation.qualified_name()
            ),
        )
    }

    fn missing_old_tuple(&self, relation: &Relation, what: &str) -> Error {
        Error::new(
            ErrorKind::Apply,
            format!(
                "{what} on {} arrived without its old row although the table has REPLICA IDENTITY FULL",
                relation.qualified_name()
            ),
        )
    }

    /// Executes every pending run (inside the open target transaction).
    async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = self.pending.rows;
        for (oid, queue) in self.pending.drain() {
            self.execute_queue(oid, queue).await?;
        }
        self.batch_rows_executed += rows;
        Ok(())
    }

    async fn execute_queue(&mut self, oid: u32, queue: TableQueue) -> Result<()> {
        for run in queue.runs {
            match run {
                Run::Insert(rows) => self.execute_insert(oid, rows).await?,
                Run::Update {
                    rows, key_change, ..
                } => self.execute_update(oid, rows, key_change).await?,
                Run::Delete(keys) => self.execute_delete(oid, keys).await?,
                Run::ByValues(changes) => {
                    for change in changes {
                        self.execute_by_values(oid, change).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn statement(&mut self, text: &str, params: usize, copy: bool) -> Result<Statement> {
        if let Some(statement) = self.statements.get(text) {
            return Ok(statement.clone());
        }
        let types: Vec<Type> = if copy {
            Vec::new()
        } else {
            vec![Type::TEXT_ARRAY; params]
        };
        let statement = self
            .client
            .prepare_typed(text, &types)
            .await
            .map_err(|e| self.apply_error("preparing a statement", e))?;
        self.statements.insert(text.to_string(), statement.clone());
        Ok(statement)
    }

    async fn execute_insert(&mut self, oid: u32, rows: Vec<Row>) -> Result<()> {
        let plan = &self.plans[&oid];
        let table = plan.target.quoted.clone();
        let columns = plan.columns.clone();
        let what = format!("{} insert(s) into {}", rows.len(), plan.target.name);
        if rows.len() >= COPY_MIN_ROWS {
            let text = sql::copy_in(&table, &columns);
            let statement = self.statement(&text, 0, true).await?;
            let mut buffer = Vec::with_capacity(
                rows.iter()
                    .map(|r| r.iter().map(Cell::weight).sum::<usize>() + r.len())
                    .sum(),
            );
            for row in &rows {
                for (i, cell) in row.iter().enumerate() {
                    if i > 0 {
                        buffer.push(b'\t');
                    }
                    sql::copy_text_value(&mut buffer, cell.as_str());
                }
                buffer.push(b'\n');
            }
            let result = async {
                let sink = self.client.copy_in::<_, Bytes>(&statement).await?;
                futures_util::pin_mut!(sink);
                sink.feed(Bytes::from(buffer)).await?;
                sink.as_mut().finish().await
            }
            .await;
            result.map_err(|e| self.apply_error(&what, e))?;
            return Ok(());
        }
        let text = sql::insert_unnest(&table, &columns);
        let statement = self.statement(&text, columns.len(), false).await?;
        let arrays =
            column_arrays(&rows, columns.len(), |row, i| &row[i]).map_err(|e| e.context(&what))?;
        let params: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let result = self.client.execute(&statement, &params).await;
        result.map_err(|e| self.apply_error(&what, e))?;
        Ok(())
    }

    async fn execute_update(
        &mut self,
        oid: u32,
        rows: Vec<UpdateRow>,
        key_change: bool,
    ) -> Result<()> {
        let plan = &self.plans[&oid];
        let key_columns = plan.key_columns();
        let key_indexes: Vec<usize> = match &plan.matching {
            Matching::Key(indexes) => indexes.clone(),
            _ => Vec::new(),
        };
        let distribution = plan.distribution;
        // Group rows by which columns they set: unchanged TOAST and (unless the key changes)
        // key columns are left out; the Citus distribution column is never set.
        let mut shapes: HashMap<Vec<bool>, Vec<usize>> = HashMap::new();
        for (at, row) in rows.iter().enumerate() {
            let shape: Vec<bool> = row
                .new
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    *cell != Cell::Unchanged
                        && Some(i) != distribution
                        && (key_change || !key_indexes.contains(&i))
                })
                .collect();
            shapes.entry(shape).or_default().push(at);
        }
        for (shape, members) in shapes {
            let plan = &self.plans[&oid];
            let set_indexes: Vec<usize> = (0..shape.len()).filter(|&i| shape[i]).collect();
            let what = format!("{} update(s) of {}", members.len(), plan.target.name);
            if set_indexes.is_empty() {
                // Only unchanged or key columns: the row is already as the source has it,
                // but it must exist; counted below like any other update.
                continue;
            }
            let set: Vec<SqlColumn> = set_indexes
                .iter()
                .map(|&i| plan.columns[i].clone())
                .collect();
            let dist_column = distribution.map(|i| plan.columns[i].clone());
            let text = sql::update_unnest(
                &plan.target.quoted,
                &key_columns,
                &set,
                dist_column.as_ref(),
            );
            let param_count = key_columns.len() + set.len() + usize::from(dist_column.is_some());
            let statement = self.statement(&text, param_count, false).await?;
            let selected: Vec<&UpdateRow> = members.iter().map(|&at| &rows[at]).collect();
            let mut arrays = column_arrays(&selected, key_columns.len(), |row, i| &row.key[i])
                .map_err(|e| e.context(&what))?;
            let values = column_arrays(&selected, set_indexes.len(), |row, i| {
                &row.new[set_indexes[i]]
            })
            .map_err(|e| e.context(&what))?;
            arrays.extend(values);
            if let Some(dist) = distribution {
                // The rows' current distribution values: from the key when it holds the
                // column, else from the new row (it is unchanged: a change became DELETE +
                // INSERT in push_update).
                let dist_values = column_arrays(&selected, 1, |row, _| {
                    match key_indexes.iter().position(|&k| k == dist) {
                        Some(at) => &row.key[at],
                        None => &row.new[dist],
                    }
                })
                .map_err(|e| e.context(&what))?;
                arrays.extend(dist_values);
            }
            let params: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            let result = self.client.execute(&statement, &params).await;
            let updated = result.map_err(|e| self.apply_error(&what, e))?;
            if (updated as usize) < members.len() {
                return Err(Error::new(
                    ErrorKind::Apply,
                    format!(
                        "{what}: only {updated} of {} rows exist on the target (source transactions up to {}). The target is missing rows the source has: find them with `sluice verify`, repair the target, and sluice retries by itself",
                        members.len(),
                        self.current_lsn()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn execute_delete(&mut self, oid: u32, keys: Vec<Vec<Cell>>) -> Result<()> {
        let plan = &self.plans[&oid];
        let key_columns = plan.key_columns();
        let key_indexes: Vec<usize> = match &plan.matching {
            Matching::Key(indexes) => indexes.clone(),
            _ => Vec::new(),
        };
        let dist_at = plan
            .distribution
            .and_then(|d| key_indexes.iter().position(|&k| k == d));
        let dist_column = dist_at.map(|at| key_columns[at].clone());
        let what = format!("{} delete(s) from {}", keys.len(), plan.target.name);
        let text = sql::delete_unnest(&plan.target.quoted, &key_columns, dist_column.as_ref());
        let param_count = key_columns.len() + usize::from(dist_column.is_some());
        let statement = self.statement(&text, param_count, false).await?;
        let mut arrays = column_arrays(&keys, key_columns.len(), |row, i| &row[i])
            .map_err(|e| e.context(&what))?;
        if let Some(at) = dist_at {
            arrays
                .extend(column_arrays(&keys, 1, |row, _| &row[at]).map_err(|e| e.context(&what))?);
        }
        let params: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let result = self.client.execute(&statement, &params).await;
        let deleted = result.map_err(|e| self.apply_error(&what, e))?;
        if (deleted as usize) < keys.len() {
            // The end state is what the source has either way; say so, do not stall.
            tracing::warn!(
                "{what}: {} of the rows were already gone on the target (source transactions up to {})",
                keys.len() - deleted as usize,
                self.current_lsn()
            );
        }
        Ok(())
    }

    async fn execute_by_values(&mut self, oid: u32, change: ValueChange) -> Result<()> {
        let plan = &self.plans[&oid];
        let table = plan.target.quoted.clone();
        let columns = plan.columns.clone();
        let name = plan.target.name.clone();
        let (text, values, what) = match &change {
            ValueChange::Update { old, new } => {
                let set_indexes: Vec<usize> = (0..new.len())
                    .filter(|&i| new[i] != Cell::Unchanged)
                    .collect();
                let set: Vec<SqlColumn> = set_indexes.iter().map(|&i| columns[i].clone()).collect();
                let mut values: Vec<Option<&str>> = Vec::new();
                for &i in &set_indexes {
                    values.push(text_of(&new[i])?);
                }
                for cell in old {
                    values.push(text_of(cell)?);
                }
                (
                    sql::update_by_values(&table, &columns, &set),
                    values,
                    format!("an update of {name}"),
                )
            }
            ValueChange::Delete { old } => {
                let mut values = Vec::new();
                for cell in old {
                    values.push(text_of(cell)?);
                }
                (
                    sql::delete_by_values(&table, &columns),
                    values,
                    format!("a delete from {name}"),
                )
            }
        };
        let types = vec![Type::TEXT; values.len()];
        let statement = match self.statements.get(&text) {
            Some(statement) => statement.clone(),
            None => {
                let statement = self
                    .client
                    .prepare_typed(&text, &types)
                    .await
                    .map_err(|e| self.apply_error(&what, e))?;
                self.statements.insert(text.clone(), statement.clone());
                statement
            }
        };
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let result = self.client.execute(&statement, &params).await;
        let changed = result.map_err(|e| self.apply_error(&what, e))?;
        if changed == 0 && matches!(change, ValueChange::Update { .. }) {
            return Err(Error::new(
                ErrorKind::Apply,
                format!(
                    "{what}: no target row has the old values (source transactions up to {}). Repair the target (`sluice verify` finds the difference); sluice retries by itself",
                    self.current_lsn()
                ),
            ));
        }
        Ok(())
    }

    /// Commits the open target transaction with the position row, then checkpoints and
    /// acknowledges.
    async fn commit_batch(&mut self) -> Result<()> {
        if self.batch_txns == 0 {
            self.first_commit_waiting = None;
            return Ok(());
        }
        self.flush().await?;
        let end_lsn = self.batch_end_lsn;
        let caught_up = end_lsn.max(self.position.caught_up_lsn);
        let record = self.position_sql(end_lsn, caught_up);
        let statement = if self.in_target_txn {
            format!("{record}; COMMIT")
        } else {
            // Transactions without changes for us still move the position.
            format!("BEGIN; {record}; COMMIT")
        };
        let result = self.client.batch_execute(&statement).await;
        result.map_err(|e| self.apply_error("committing", e))?;
        self.in_target_txn = false;
        self.position = Position {
            applied_lsn: end_lsn,
            caught_up_lsn: caught_up,
            acked_lsn: self.position.acked_lsn.max(caught_up),
        };
        self.checkpoint()?;
        let (txns, changes) = (self.batch_txns, self.batch_changes);
        let commit_time = self.batch_commit_time.take();
        let position = self.position;
        self.status.update(|s| {
            s.applied_lsn = Some(position.applied_lsn);
            s.caught_up_lsn = Some(position.caught_up_lsn);
            s.applied_transactions += txns;
            s.applied_changes += changes;
            if let Some(time) = commit_time {
                let behind = time.to_system_time().elapsed().unwrap_or_default();
                s.lag_seconds = Some(behind.as_secs_f64());
            }
            if s.state != DaemonState::Copying {
                s.state = DaemonState::Streaming;
            }
            s.last_error = None;
            s.stalled_seconds = None;
        });
        self.batch_txns = 0;
        self.batch_changes = 0;
        self.batch_rows_executed = 0;
        self.first_commit_waiting = None;
        Ok(())
    }

    /// On an idle stream: records the keepalive position, so the slot can release WAL.
    async fn acknowledge_idle(&mut self, wal_end: Lsn) -> Result<()> {
        let record = self.position_sql(self.position.applied_lsn, wal_end);
        let result = self
            .client
            .batch_execute(&format!("BEGIN; {record}; COMMIT"))
            .await;
        result.map_err(|e| self.apply_error("recording the keepalive position", e))?;
        self.position.caught_up_lsn = wal_end;
        self.position.acked_lsn = self.position.acked_lsn.max(wal_end);
        self.checkpoint()?;
        self.last_keepalive_ack = Instant::now();
        self.status.update(|s| {
            s.caught_up_lsn = Some(wal_end);
            if s.state != DaemonState::Copying {
                s.state = DaemonState::Streaming;
            }
        });
        Ok(())
    }

    /// The position row as a literal statement, so it rides in the same round trip as
    /// COMMIT. Every value is quoted: the slot name is validated, the rest are digits/LSNs.
    fn position_sql(&self, applied: Lsn, caught_up: Lsn) -> String {
        format!(
            "INSERT INTO sluice.applied_position AS p
                 (slot, source_system_identifier, applied_lsn, caught_up_lsn, updated_at)
             VALUES ({}, {}, {}::pg_lsn, {}::pg_lsn, now())
             ON CONFLICT (slot) DO UPDATE SET
                 source_system_identifier = EXCLUDED.source_system_identifier,
                 applied_lsn = EXCLUDED.applied_lsn,
                 caught_up_lsn = EXCLUDED.caught_up_lsn,
                 updated_at = EXCLUDED.updated_at",
            quote_literal(&self.options.slot),
            quote_literal(&self.options.system_identifier),
            quote_literal(&applied.to_string()),
            quote_literal(&caught_up.to_string()),
        )
    }

    /// sled, then the slot: only after the target commit.
    fn checkpoint(&mut self) -> Result<()> {
        let store = self.store.clone();
        let position = self.position;
        tokio::task::block_in_place(|| store.save_position(&position))?;
        let _ = self.acks.send(position.caught_up_lsn);
        Ok(())
    }

    fn current_lsn(&self) -> Lsn {
        self.open_txn
            .map(|(lsn, _, _)| lsn)
            .unwrap_or(self.batch_end_lsn)
    }

    /// An error from the target while applying: SQLSTATE decides retry, stop or stall, and
    /// the message names what was applied and where in the source.
    fn apply_error(&self, what: &str, error: tokio_postgres::Error) -> Error {
        let lsn = self.current_lsn();
        match error.as_db_error() {
            Some(db) => {
                let kind = match classify_sqlstate(db.code().code()) {
                    ErrorKind::Definite => ErrorKind::Apply,
                    kind => kind,
                };
                let mut message = format!(
                    "Applying {what} (source transaction at {lsn}) failed: SQLSTATE {}: {}",
                    db.code().code(),
                    db.message()
                );
                if let Some(detail) = db.detail() {
                    message.push_str(&format!(" ({detail})"));
                }
                Error::new(kind, message)
            }
            None => Error::with_source(
                ErrorKind::Transient,
                format!(
                    "Applying {what} (source transaction at {lsn}): the target connection failed"
                ),
                error,
            ),
        }
    }
}

/// A tuple's values as applier cells (text only: the stream is not asked for binary).
fn cells(tuple: &Tuple, relation: &Relation, what: &str) -> Result<Vec<Cell>> {
    if tuple.len() != relation.columns.len() {
        return Err(Error::definite(format!(
            "A pgoutput {what} for {} carries {} values for {} columns",
            relation.qualified_name(),
            tuple.len(),
            relation.columns.len()
        )));
    }
    let mut out = Vec::with_capacity(tuple.len());
    for index in 0..tuple.len() {
        out.push(match tuple.get(index) {
            Some(Value::Null) | None => Cell::Null,
            Some(Value::UnchangedToast) => Cell::Unchanged,
            Some(Value::Text(_)) => Cell::Text(tuple.bytes(index).unwrap_or_default()),
            Some(Value::Binary(_)) => {
                return Err(Error::definite(format!(
                    "A pgoutput {what} for {} carries a binary value, which sluice never requests",
                    relation.qualified_name()
                )))
            }
        });
    }
    Ok(out)
}

fn text_of(cell: &Cell) -> Result<Option<&str>> {
    match cell {
        Cell::Text(bytes) => std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::new(ErrorKind::Apply, "a value is not valid UTF-8 text")),
        _ => Ok(None),
    }
}

/// Column-major text arrays from row-major cells: one `Vec<Option<&str>>` per column.
fn column_arrays<'a, R>(
    rows: &'a [R],
    columns: usize,
    cell: impl Fn(&'a R, usize) -> &'a Cell,
) -> Result<Vec<Vec<Option<&'a str>>>> {
    let mut arrays: Vec<Vec<Option<&str>>> = (0..columns)
        .map(|_| Vec::with_capacity(rows.len()))
        .collect();
    for row in rows {
        for (column, array) in arrays.iter_mut().enumerate() {
            array.push(text_of(cell(row, column))?);
        }
    }
    Ok(arrays)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
