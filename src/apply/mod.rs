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
//! **Pipelined.** The builder (this module) reads the stream and groups runs; the executor
//! (`executor`) owns the apply session and executes them, so the target works on batch N
//! while batch N+1 is being grouped. A bounded channel between them bounds memory.
//!
//! **Strict mode.** Batching reorders statements across tables (only when triggers and
//! foreign keys are off, see `batch`) and applies a run of updates as one statement. If the
//! target rejects a batch, the supervisor replays the same source transactions in strict
//! mode: one target transaction per source transaction, in source order, one statement per
//! update, as the source ran them. Only a change that fails even then stalls apply. A run of
//! inserts or of deletes into one table stays one statement there: it cannot fail where
//! the same rows one by one would not (unique checks go row by row either way, foreign keys
//! are checked at the statement's end), and the target's error names the row at fault, so a
//! rejected million-row INSERT is replayed in seconds, not row by row in minutes.

pub mod batch;
pub mod executor;
pub mod sql;
pub mod target;
pub mod waits;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::checkpoint::{Position, Store};
use crate::control::SharedStatus;
use crate::error::{Error, ErrorKind, Result};
use crate::lsn::Lsn;
use crate::pgoutput::{OldTuple, PgTimestamp, Relation, ReplicaIdentity, Tuple, Value};
use crate::source::stream::StreamItem;
use crate::source::TableName;
use batch::{Cell, Pending, Row, UpdateRow, ValueChange};
use executor::{Executor, Work};
use sql::SqlColumn;
use target::TargetTable;

/// Pending value bytes that force a flush, whatever the row count (wide rows).
const MAX_PENDING_BYTES: usize = 32 << 20;
/// At most this often, an idle stream's keepalive position is written and acknowledged.
const KEEPALIVE_ACK_INTERVAL: Duration = Duration::from_millis(500);
/// Work items waiting for the executor, at most (rows are bounded separately).
const WORK_QUEUE: usize = 64;
/// Rows handed to the executor and not yet executed, at most, in batches: with the pending
/// batch that makes three batches' worth of rows in memory when the target is the
/// bottleneck, whatever the backlog.
const BATCHES_IN_FLIGHT: usize = 2;
/// Row data handed to the executor and not yet executed, at most (KiB): rows are counted
/// above, but a run of wide rows is bounded by its bytes (`MAX_PENDING_BYTES` per flush).
const KIB_IN_FLIGHT: usize = BATCHES_IN_FLIGHT * (MAX_PENDING_BYTES >> 10);

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
pub struct TablePlan {
    /// The relation description this plan was made for.
    relation: Arc<Relation>,
    target: TargetTable,
    /// Target column per source column.
    columns: Vec<SqlColumn>,
    /// How rows are matched for UPDATE/DELETE.
    matching: Matching,
    /// Source column index of the Citus distribution column.
    distribution: Option<usize>,
}

enum Matching {
    /// Source column indexes of the key.
    Key(Vec<usize>),
    /// REPLICA IDENTITY FULL and no usable key on the target: all old values, one row.
    /// The source column indexes of a key that narrows the search (through its index)
    /// without naming one row by itself: a DEFERRABLE primary key, or a unique index over
    /// NOT NULL columns when there is no primary key; empty when none.
    AllValues(Vec<usize>),
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

/// The name of a built-in type (an OID below PostgreSQL's first user OID, the same on every
/// cluster) as the target spells it; `None` for types each cluster numbers itself.
async fn builtin_type_name(catalog: &Client, type_oid: u32, type_modifier: i32) -> Option<String> {
    const FIRST_NORMAL_OBJECT_ID: u32 = 16384;
    if type_oid >= FIRST_NORMAL_OBJECT_ID {
        return None;
    }
    catalog
        .query_one("SELECT format_type($1, $2)", &[&type_oid, &type_modifier])
        .await
        .ok()
        .map(|row| row.get(0))
}

/// Counters the supervisor reads after the applier stops.
#[derive(Debug, Default)]
pub struct Progress {
    /// Commit LSN of the newest source transaction the applier has started.
    pub seen_final_lsn: AtomicU64,
}

/// The target connections the applier needs: one for the apply session, one for catalog
/// lookups while the apply session is busy.
pub struct TargetClients {
    pub apply: Client,
    pub catalog: Client,
}

pub struct Applier {
    catalog: Arc<Client>,
    /// Names, in a status warning, the sessions a waiting apply statement waits for.
    _lock_waits: waits::LockWaitWatcher,
    /// Permits for rows handed to the executor and not yet executed.
    in_flight: Arc<Semaphore>,
    rows_in_flight_limit: usize,
    kib_in_flight: Arc<Semaphore>,
    work: mpsc::Sender<Work>,
    executor: Option<JoinHandle<Result<()>>>,
    options: ApplyOptions,
    progress: Arc<Progress>,
    /// Told of every source transaction as it arrives, for `lag_seconds`.
    status: SharedStatus,
    citus: bool,
    /// `session_replication_role = replica` is in effect where the rows are stored (not on
    /// Citus: see `target::checks_foreign_keys`): statements on different tables may be
    /// reordered.
    replica_role: bool,
    plans: HashMap<u32, Arc<TablePlan>>,
    /// Per relation: its generated columns on the source (from its last description).
    generated: HashMap<u32, Vec<crate::source::stream::GeneratedColumn>>,
    /// Source user types by OID (from Type messages), to name them in messages.
    user_types: HashMap<u32, String>,
    pending: Pending,
    /// The source transaction being received: (commit LSN, commit time, strict).
    open_txn: Option<(Lsn, PgTimestamp, bool)>,
    /// Work was sent since the last commit: a target transaction is open.
    target_txn_open: bool,
    /// Whole source transactions since the last commit.
    batch_txns: u64,
    batch_changes: u64,
    batch_rows_sent: usize,
    batch_end_lsn: Lsn,
    batch_commit_time: Option<PgTimestamp>,
    first_commit_waiting: Option<Instant>,
    last_keepalive_ack: Instant,
    acked_keepalive: Lsn,
}

impl Applier {
    /// Prepares the apply session and starts the executor.
    pub async fn start(
        target: TargetClients,
        store: Store,
        status: SharedStatus,
        acks: watch::Sender<Lsn>,
        options: ApplyOptions,
        position: Position,
        progress: Arc<Progress>,
    ) -> Result<Applier> {
        let citus = crate::citus::detect(&target.catalog).await?.is_some();
        let apply_pid: i32 = target
            .apply
            .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
            .await
            .map_err(|e| crate::error::pg("Preparing the apply session on the target", e))?
            .get(0);
        let catalog = Arc::new(target.catalog);
        let lock_waits = waits::LockWaitWatcher::start(catalog.clone(), apply_pid, status.clone());
        let (executor, replica_role) = Executor::new(
            target.apply,
            store,
            status.clone(),
            acks,
            options.slot.clone(),
            options.system_identifier.clone(),
            position,
        )
        .await?;
        let (work, queue) = mpsc::channel(WORK_QUEUE);
        let executor = tokio::spawn(executor.run(queue));
        let rows_in_flight_limit = (options.batch_max_rows * BATCHES_IN_FLIGHT)
            .min(Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        Ok(Applier {
            catalog,
            _lock_waits: lock_waits,
            in_flight: Arc::new(Semaphore::new(rows_in_flight_limit)),
            rows_in_flight_limit,
            kib_in_flight: Arc::new(Semaphore::new(KIB_IN_FLIGHT)),
            work,
            executor: Some(executor),
            options,
            progress,
            status,
            citus,
            replica_role: replica_role && !citus,
            plans: HashMap::new(),
            generated: HashMap::new(),
            user_types: HashMap::new(),
            pending: Pending::default(),
            open_txn: None,
            target_txn_open: false,
            batch_txns: 0,
            batch_changes: 0,
            batch_rows_sent: 0,
            batch_end_lsn: Lsn::ZERO,
            batch_commit_time: None,
            first_commit_waiting: None,
            last_keepalive_ack: Instant::now() - KEEPALIVE_ACK_INTERVAL,
            acked_keepalive: position.caught_up_lsn,
        })
    }

    /// Applies items until the stream ends (`Err`) or `shutdown` fires (`Ok`).
    pub async fn run(
        mut self,
        mut items: mpsc::Receiver<crate::source::stream::ItemBatch>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut executor = self.executor.take().expect("the executor runs");
        // One timer for the batch deadline, reset only when the deadline moves: a timer per
        // item costs more than the item.
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let outcome = 'run: loop {
            let deadline = self
                .first_commit_waiting
                .map(|at| at + self.options.batch_max_delay);
            if deadline != armed {
                if let Some(at) = deadline {
                    timer.as_mut().reset(at.into());
                }
                armed = deadline;
            }
            let step = tokio::select! {
                biased;
                finished = &mut executor => {
                    // The executor only stops early on an error.
                    return Err(executor_outcome(finished).err().unwrap_or_else(|| {
                        Error::transient("The apply session ended unexpectedly")
                    }));
                }
                _ = shutdown.changed() => break self.shut_down().await,
                _ = &mut timer, if armed.is_some() && self.open_txn.is_none() => {
                    self.commit_batch().await
                }
                batch = items.recv() => match batch {
                    Some(batch) => {
                        // The batch's share of the reader's byte budget goes back once its
                        // rows are taken in (pending and in-flight rows have bounds of their
                        // own).
                        let _budget = batch.budget;
                        for item in batch.items {
                            if let Err(error) = self.handle(item).await {
                                break 'run Err(self.located(error));
                            }
                        }
                        Ok(())
                    }
                    // The reader stopped; it reports why.
                    None => break Err(Error::transient("The replication stream stopped")),
                },
            };
            if let Err(error) = step {
                break Err(error);
            }
        };
        // Closing the queue lets the executor finish what it has (or roll back) and stop.
        drop(self.work);
        let executed = executor_outcome(executor.await);
        match (outcome, executed) {
            // The executor's own error is the cause of a failed send.
            (_, Err(error)) => Err(error),
            (outcome, Ok(())) => outcome,
        }
    }

    async fn send(&mut self, work: Work) -> Result<()> {
        self.work
            .send(work)
            .await
            .map_err(|_| Error::transient("The apply session stopped"))
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
                self.status.transaction_seen(final_lsn, commit_time);
                self.open_txn = Some((final_lsn, commit_time, strict));
            }
            StreamItem::Type { oid, name } => {
                self.user_types.insert(oid, name);
            }
            StreamItem::Relation {
                relation,
                changed,
                generated,
            } => {
                self.generated.insert(relation.oid, generated);
                if changed || self.plans.contains_key(&relation.oid) {
                    // Pending rows were planned against the old shape: apply them first.
                    self.flush().await?;
                    self.plans.remove(&relation.oid);
                }
            }
            StreamItem::Insert { relation, new } => {
                self.before_change(relation.oid).await?;
                let plan = self.plan(&relation).await?;
                self.push_insert(&relation, &new)?;
                self.after_change(&plan, false).await?;
            }
            StreamItem::Update { relation, old, new } => {
                self.before_change(relation.oid).await?;
                let plan = self.plan(&relation).await?;
                self.push_update(&plan, &relation, old.as_ref(), &new)?;
                self.after_change(&plan, true).await?;
            }
            StreamItem::Delete { relation, old } => {
                self.before_change(relation.oid).await?;
                let plan = self.plan(&relation).await?;
                self.push_delete(&plan, &relation, &old)?;
                self.after_change(&plan, false).await?;
            }
            StreamItem::Truncate {
                relations,
                restart_identity,
                ..
            } => {
                self.flush().await?;
                let names: Vec<String> = relations
                    .iter()
                    .map(|r| TableName::new(r.namespace.clone(), r.name.clone()).quoted())
                    .collect();
                // The source names every table it truncated: a parent by inheritance is
                // truncated ONLY, or its children's rows on the target would go with it
                // (`TRUNCATE ONLY parent` on the source names the parent alone).
                let parents = target::inheritance_parents(&self.catalog, &names).await?;
                let names: Vec<String> = names
                    .into_iter()
                    .map(|name| match parents.contains(&name) {
                        true => format!("ONLY {name}"),
                        false => name,
                    })
                    .collect();
                let work = Work::Sql {
                    what: format!("TRUNCATE of {}", names.join(", ")),
                    sql: sql::truncate(&names, restart_identity),
                    lsn: self.current_lsn(),
                };
                self.send(work).await?;
                self.target_txn_open = true;
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
                if strict || self.batch_rows_sent + self.pending.rows >= self.options.batch_max_rows
                {
                    self.commit_batch().await?;
                }
            }
            StreamItem::KeepAlive { wal_end } => {
                let idle = self.batch_txns == 0 && !self.target_txn_open && self.open_txn.is_none();
                if idle
                    && wal_end > self.acked_keepalive
                    && self.last_keepalive_ack.elapsed() >= KEEPALIVE_ACK_INTERVAL
                {
                    self.send(Work::KeepAlive { wal_end }).await?;
                    self.acked_keepalive = wal_end;
                    self.last_keepalive_ack = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// Without the replica role (or in strict mode), statements on different tables must not
    /// be reordered: apply what is pending before the first change of another table.
    async fn before_change(&mut self, relation: u32) -> Result<()> {
        let strict = self.open_txn.is_some_and(|(_, _, strict)| strict);
        if (!self.replica_role || strict)
            && self.pending.last_table.is_some_and(|last| last != relation)
        {
            self.flush().await?;
        }
        Ok(())
    }

    /// `update`: in strict mode each update is its own statement (a run of them as one can
    /// fail where the source's one by one did not, e.g. keys shifted by one).
    async fn after_change(&mut self, _plan: &TablePlan, update: bool) -> Result<()> {
        self.batch_changes += 1;
        let strict = self.open_txn.is_some_and(|(_, _, strict)| strict);
        if (strict && update)
            || self.pending.rows >= self.options.batch_max_rows
            || self.pending.bytes >= MAX_PENDING_BYTES
        {
            self.flush().await?;
        }
        Ok(())
    }

    async fn shut_down(&mut self) -> Result<()> {
        if self.open_txn.is_some() {
            // Half a source transaction is in the target transaction: it must not commit.
            tracing::info!("shutting down: rolling back the partly applied source transaction");
            self.pending.drain();
            self.send(Work::Rollback).await
        } else if self.batch_txns > 0 {
            tracing::info!(
                transactions = self.batch_txns,
                "shutting down: committing the whole source transactions already applied"
            );
            self.commit_batch().await
        } else {
            Ok(())
        }
    }

    /// Plans a relation against its target table (once per relation shape).
    async fn plan(&mut self, relation: &Arc<Relation>) -> Result<Arc<TablePlan>> {
        if let Some(plan) = self.plans.get(&relation.oid) {
            if Arc::ptr_eq(&plan.relation, relation) {
                return Ok(plan.clone());
            }
            // A new description of the table: apply what was planned against the old one.
            self.flush().await?;
        }
        let name = TableName::new(relation.namespace.clone(), relation.name.clone());
        // Read afresh for every plan: a table distributed after sluice started is routed too.
        let layout = match self.citus {
            true => crate::citus::detect(&self.catalog).await?,
            false => None,
        };
        let table = target::load(&self.catalog, &name, layout.as_ref()).await?;
        // Generated on the source, plain on the target: pgoutput sends no value for it, so
        // it would stay empty there for every row from now on.
        let plain: Vec<String> = self
            .generated
            .get(&relation.oid)
            .into_iter()
            .flatten()
            .filter(|column| table.column(&column.name).is_some())
            .map(|column| {
                let quoted = crate::source::quote_ident(&column.name);
                format!(
                    "ALTER TABLE {} DROP COLUMN {quoted}, ADD COLUMN {quoted} {} GENERATED ALWAYS AS ({}) STORED",
                    name.quoted(),
                    column.type_text,
                    column.expression
                )
            })
            .collect();
        if !plain.is_empty() {
            return Err(Error::new(
                ErrorKind::Apply,
                format!(
                    "{name} has columns generated on the source that are plain columns on the target, where they would stay empty (PostgreSQL sends no values for generated columns): {}; sluice retries by itself",
                    plain.join("; ")
                ),
            ));
        }
        let mut wanted = Vec::with_capacity(relation.columns.len());
        let source_columns: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        for column in &relation.columns {
            let source_type = match table.column(&column.name) {
                Some(_) => None,
                None => match self.user_types.get(&column.type_oid) {
                    Some(name) => Some(name.clone()),
                    None => {
                        builtin_type_name(&self.catalog, column.type_oid, column.type_modifier)
                            .await
                    }
                },
            };
            wanted.push((column.name.as_str(), source_type));
        }
        let columns = table.require_columns(&wanted, &source_columns)?;
        for column in &relation.columns {
            let source = (column.type_oid, column.type_modifier);
            if let Some(target) = table.lossy_column(&column.name, source) {
                return Err(self
                    .lossy_column_error(&name, &column.name, source, target)
                    .await);
            }
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
                // A deferrable key may be held by two rows in the middle of a source
                // transaction (`UPDATE t SET id = 3 - id` swaps two keys): the key would
                // then match both, and the second update write both rows. The whole old
                // row names one row; the key still finds it through its index. Citus has
                // no ctid to name one row by: the key it is.
                Some(key)
                    if table.primary_key_deferrable && table.distribution_column.is_none() =>
                {
                    Matching::AllValues(key)
                }
                Some(key) => Matching::Key(key),
                None if table.distribution_column.is_some() => {
                    return Err(Error::new(
                        ErrorKind::Apply,
                        format!(
                            "{name} has REPLICA IDENTITY FULL and no primary key on the Citus target: rows cannot be matched on a distributed table (no ctid). Add a primary key that includes the distribution column on the target"
                        ),
                    ))
                }
                // A unique index over NOT NULL columns narrows the search (an index
                // lookup instead of a scan of the whole table per change).
                None => Matching::AllValues(
                    table
                        .unique_columns
                        .iter()
                        .map(|c| index_of(c))
                        .collect::<Option<Vec<_>>>()
                        .unwrap_or_default(),
                ),
            },
            _ if !source_key.is_empty() => Matching::Key(source_key),
            _ => Matching::Impossible,
        };
        let distribution = table.distribution_column.as_deref().and_then(index_of);
        let plan = Arc::new(TablePlan {
            relation: relation.clone(),
            target: table,
            columns,
            matching,
            distribution,
        });
        self.plans.insert(relation.oid, plan.clone());
        Ok(plan)
    }

    /// A target column that would round the source's values (`TargetTable::lossy_column`):
    /// named with both types and the statement that makes the target hold them.
    async fn lossy_column_error(
        &self,
        table: &TableName,
        column: &str,
        source: (u32, i32),
        target: (u32, i32),
    ) -> Error {
        // Built-in types only, so their OIDs and names are the same on both sides.
        let names = self
            .catalog
            .query_one(
                "SELECT pg_catalog.format_type($1, $2), pg_catalog.format_type($3, $4)",
                &[&source.0, &source.1, &target.0, &target.1],
            )
            .await
            .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
            .unwrap_or_else(|_| (format!("type {}", source.0), format!("type {}", target.0)));
        Error::new(
            ErrorKind::Apply,
            format!(
                "Column {column:?} of {table} is {} on the source but {} on the target, which would round or cut its values without an error (the source's column was changed, or the target's made narrower): ALTER TABLE {} ALTER COLUMN {} TYPE {} on the target; sluice retries by itself",
                names.0,
                names.1,
                table.quoted(),
                crate::source::quote_ident(column),
                names.0
            ),
        )
    }

    fn push_insert(&mut self, relation: &Relation, new: &Tuple) -> Result<()> {
        if new.len() != relation.columns.len() {
            return Err(column_count_mismatch(relation, new, "INSERT"));
        }
        let bytes = new
            .iter()
            .map(|v| v.as_bytes().map_or(1, <[u8]>::len))
            .sum::<usize>();
        // The tuple itself is queued: its values are escaped into COPY straight from the
        // received message.
        self.pending
            .queue(relation.oid)
            .push_insert(Row::Tuple(new.clone()));
        self.pending.rows += 1;
        self.pending.bytes += bytes;
        Ok(())
    }

    fn push_update(
        &mut self,
        plan: &TablePlan,
        relation: &Relation,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<()> {
        let new_cells = cells(new, relation, "UPDATE")?;
        let bytes: usize = new_cells.iter().map(Cell::weight).sum();
        let key_indexes = match &plan.matching {
            Matching::Key(indexes) => indexes.clone(),
            Matching::AllValues(_) => {
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
                    relation.shown_name()
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
                                        relation.shown_name()
                                    ),
                                ))
                            }
                        }
                    }
                }
                let queue = self.pending.queue(relation.oid);
                queue.push_delete(old_key);
                queue.push_insert(Row::Cells(Arc::from(row.into_boxed_slice())));
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

    fn push_delete(&mut self, plan: &TablePlan, relation: &Relation, old: &OldTuple) -> Result<()> {
        let old_cells = cells(old.tuple(), relation, "DELETE")?;
        let bytes: usize = old_cells.iter().map(Cell::weight).sum();
        match &plan.matching {
            Matching::Key(indexes) => {
                let key: Vec<Cell> = indexes.iter().map(|&i| old_cells[i].clone()).collect();
                self.pending.queue(relation.oid).push_delete(key);
            }
            // A key-only old row (a partition whose own identity is a key, under a root
            // that is FULL) holds NULL for every other column: matched by all values it
            // would find nothing, and the delete would be lost. Stall, loudly.
            Matching::AllValues(_) if !matches!(old, OldTuple::Full(_)) => {
                return Err(self.missing_old_tuple(relation, "DELETE"));
            }
            Matching::AllValues(_) => {
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
                relation.shown_name()
            ),
        )
    }

    fn missing_old_tuple(&self, relation: &Relation, what: &str) -> Error {
        Error::new(
            ErrorKind::Apply,
            format!(
                "{what} on {} arrived without its whole old row although the table has REPLICA IDENTITY FULL (a partition whose own replica identity is not FULL sends only its key: ALTER TABLE <partition> REPLICA IDENTITY FULL on the source; this change cannot be matched by all values, so the table must be copied again once that is done)",
                relation.shown_name()
            ),
        )
    }

    /// Hands every pending run to the executor (inside the open target transaction).
    async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = self.pending.rows;
        let kib = self.pending.bytes.div_ceil(1024).clamp(1, KIB_IN_FLIGHT) as u32;
        let lsn = self.current_lsn();
        let mut bytes = Some(
            self.kib_in_flight
                .clone()
                .acquire_many_owned(kib)
                .await
                .map_err(|_| Error::transient("The apply session stopped"))?,
        );
        let runs: Vec<(u32, batch::Run)> = self
            .pending
            .drain()
            .into_iter()
            .flat_map(|(oid, queue)| queue.runs.into_iter().map(move |run| (oid, run)))
            .collect();
        let last = runs.len().saturating_sub(1);
        for (at, (oid, run)) in runs.into_iter().enumerate() {
            let plan = self.plans[&oid].clone();
            let wanted = run.rows().clamp(1, self.rows_in_flight_limit) as u32;
            let rows = self
                .in_flight
                .clone()
                .acquire_many_owned(wanted)
                .await
                .map_err(|_| Error::transient("The apply session stopped"))?;
            self.send(Work::Run {
                plan,
                run,
                lsn,
                rows,
                // Runs execute in order: the flush's bytes go back with its last run.
                bytes: if at == last { bytes.take() } else { None },
            })
            .await?;
        }
        self.target_txn_open = true;
        self.batch_rows_sent += rows;
        Ok(())
    }

    /// Ends the target transaction at the last whole source transaction.
    async fn commit_batch(&mut self) -> Result<()> {
        if self.batch_txns == 0 {
            self.first_commit_waiting = None;
            return Ok(());
        }
        self.flush().await?;
        let work = Work::Commit {
            end_lsn: self.batch_end_lsn,
            transactions: self.batch_txns,
            changes: self.batch_changes,
            commit_time: self.batch_commit_time.take(),
        };
        self.send(work).await?;
        self.target_txn_open = false;
        self.acked_keepalive = self.acked_keepalive.max(self.batch_end_lsn);
        self.batch_txns = 0;
        self.batch_changes = 0;
        self.batch_rows_sent = 0;
        self.first_commit_waiting = None;
        Ok(())
    }

    /// An apply error found while planning (a missing column or table, a key the target
    /// lacks) names the source transaction too, as the executor's errors do: status's
    /// `last_error` then says where the stream stands.
    fn located(&self, error: Error) -> Error {
        let report = error.report();
        if error.kind() != ErrorKind::Apply || report.contains("source transaction at") {
            return error;
        }
        Error::new(
            ErrorKind::Apply,
            format!("Source transaction at {}: {report}", self.current_lsn()),
        )
    }

    fn current_lsn(&self) -> Lsn {
        self.open_txn
            .map(|(lsn, _, _)| lsn)
            .unwrap_or(self.batch_end_lsn)
    }
}

fn executor_outcome(joined: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match joined {
        Ok(result) => result,
        Err(error) => Err(Error::with_source(
            ErrorKind::Definite,
            "The apply session task failed",
            error,
        )),
    }
}

/// A tuple's values as applier cells (text only: the stream is not asked for binary).
fn column_count_mismatch(relation: &Relation, tuple: &Tuple, what: &str) -> Error {
    Error::definite(format!(
        "A pgoutput {what} for {} carries {} values for {} columns",
        relation.shown_name(),
        tuple.len(),
        relation.columns.len()
    ))
}

fn cells(tuple: &Tuple, relation: &Relation, what: &str) -> Result<Vec<Cell>> {
    if tuple.len() != relation.columns.len() {
        return Err(column_count_mismatch(relation, tuple, what));
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
                    relation.shown_name()
                )))
            }
        });
    }
    Ok(out)
}
