//! The executor: owns the apply session on the target and runs the builder's work in order.
//!
//! It runs as its own task so that the target executes batch N while the builder is already
//! grouping batch N+1 from the stream; the channel between them is bounded, so at most a
//! few runs wait here. It alone commits, and after each commit it writes the sled
//! checkpoint and acknowledges the position to the slot, in that order.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::batch::{Cell, Row, Run, UpdateRow, ValueChange};
use super::sql::{self, SqlColumn};
use super::{Matching, TablePlan};
use crate::checkpoint::{Position, Store};
use crate::control::{DaemonState, SharedStatus};
use crate::error::{classify_sqlstate, Error, ErrorKind, Result};
use crate::lsn::Lsn;
use crate::pgoutput::PgTimestamp;
use crate::source::quote_literal;

/// Insert runs at least this long go through COPY; shorter ones through one INSERT.
const COPY_MIN_ROWS: usize = 32;

/// What the builder asks the executor to do, in order.
pub enum Work {
    /// Apply a run of one table's changes; `lsn` is the commit LSN of the (last) source
    /// transaction it belongs to, for error messages.
    Run {
        plan: Arc<TablePlan>,
        run: Run,
        lsn: Lsn,
        /// The run's rows in flight; released when the run has been executed.
        rows: OwnedSemaphorePermit,
        /// The bytes of the flush this run ends, if it does; released with it.
        bytes: Option<OwnedSemaphorePermit>,
    },
    /// A statement such as TRUNCATE.
    Sql { what: String, sql: String, lsn: Lsn },
    /// Commit whole source transactions ending at `end_lsn`.
    Commit {
        end_lsn: Lsn,
        transactions: u64,
        changes: u64,
        commit_time: Option<PgTimestamp>,
    },
    /// Nothing in flight: record and acknowledge a keepalive position.
    KeepAlive { wal_end: Lsn },
    /// Throw away the open target transaction (shutdown in the middle of a source one).
    Rollback,
}

/// The refusal of `session_replication_role = replica` was logged by this process.
static REPLICA_ROLE_REFUSAL_SAID: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub struct Executor {
    client: Client,
    store: Store,
    status: SharedStatus,
    acks: watch::Sender<Lsn>,
    slot: String,
    system_identifier: String,
    statements: HashMap<String, Statement>,
    position: Position,
    in_target_txn: bool,
    /// Commit LSN of the source transaction being applied, for error messages.
    lsn: Lsn,
}

impl Executor {
    /// Prepares the apply session. Returns whether `session_replication_role = replica`
    /// could be set (then statements on different tables may be reordered).
    pub async fn new(
        client: Client,
        store: Store,
        status: SharedStatus,
        acks: watch::Sender<Lsn>,
        slot: String,
        system_identifier: String,
        position: Position,
    ) -> Result<(Executor, bool)> {
        // Text values are cast by the target; parse them the way the source's walsender
        // was pinned to render them (`session`).
        client
            .batch_execute(&format!(
                "{}; {}",
                crate::session::rendering_sql(),
                crate::session::LONG_WORK
            ))
            .await
            .map_err(|e| crate::error::pg("Preparing the apply session on the target", e))?;
        let replica_role = match client
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            Ok(()) => true,
            // Said once per daemon, not at every reconnect (runbook.md).
            Err(error)
                if !REPLICA_ROLE_REFUSAL_SAID.swap(true, std::sync::atomic::Ordering::Relaxed) =>
            {
                tracing::warn!(
                    "The target user may not set session_replication_role = replica ({}): \
                     applying with triggers and foreign-key checks on, in exact source order \
                     (slower). Apply as a superuser, or GRANT SET ON PARAMETER \
                     session_replication_role TO this user (PostgreSQL 15+), to avoid this.",
                    error
                        .as_db_error()
                        .map(|e| e.message())
                        .unwrap_or("refused")
                );
                false
            }
            Err(_) => false,
        };
        Ok((
            Executor {
                client,
                store,
                status,
                acks,
                slot,
                system_identifier,
                statements: HashMap::new(),
                position,
                in_target_txn: false,
                lsn: position.applied_lsn,
            },
            replica_role,
        ))
    }

    /// Runs work until the builder closes the channel (Ok) or the target fails (Err).
    pub async fn run(mut self, mut work: mpsc::Receiver<Work>) -> Result<()> {
        while let Some(item) = work.recv().await {
            if let Err(error) = self.execute(item).await {
                if self.in_target_txn {
                    let _ = self.client.batch_execute("ROLLBACK").await;
                }
                return Err(error);
            }
        }
        if self.in_target_txn {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        Ok(())
    }

    async fn execute(&mut self, work: Work) -> Result<()> {
        match work {
            Work::Run {
                plan,
                run,
                lsn,
                rows: _in_flight,
                bytes: _bytes_in_flight,
            } => {
                self.lsn = lsn;
                self.begin().await?;
                match run {
                    Run::Insert(rows) => self.insert(&plan, rows).await,
                    Run::Update {
                        rows, key_change, ..
                    } => self.update(&plan, rows, key_change).await,
                    Run::Delete(keys) => self.delete(&plan, keys).await,
                    Run::ByValues(changes) => {
                        for change in changes {
                            self.by_values(&plan, change).await?;
                        }
                        Ok(())
                    }
                }
            }
            Work::Sql { what, sql, lsn } => {
                self.lsn = lsn;
                self.begin().await?;
                let result = self.client.batch_execute(&sql).await;
                result.map_err(|e| self.apply_error(&what, e))
            }
            Work::Commit {
                end_lsn,
                transactions,
                changes,
                commit_time,
            } => {
                self.lsn = end_lsn;
                self.commit(end_lsn, transactions, changes, commit_time)
                    .await
            }
            Work::KeepAlive { wal_end } => self.acknowledge_idle(wal_end).await,
            Work::Rollback => {
                if self.in_target_txn {
                    let result = self.client.batch_execute("ROLLBACK").await;
                    self.in_target_txn = false;
                    result.map_err(|e| self.apply_error("ROLLBACK", e))?;
                }
                Ok(())
            }
        }
    }

    async fn begin(&mut self) -> Result<()> {
        if !self.in_target_txn {
            let result = self.client.batch_execute("BEGIN").await;
            result.map_err(|e| self.apply_error("BEGIN", e))?;
            self.in_target_txn = true;
        }
        Ok(())
    }

    /// The prepared statement for `text`; a refusal names `what` it was for (preparing is
    /// where the target rejects a missing column, a type, an identity column).
    async fn statement(&mut self, text: &str, types: &[Type], what: &str) -> Result<Statement> {
        if let Some(statement) = self.statements.get(text) {
            return Ok(statement.clone());
        }
        let result = self.client.prepare_typed(text, types).await;
        let statement = result.map_err(|e| self.apply_error(what, e))?;
        self.statements.insert(text.to_string(), statement.clone());
        Ok(statement)
    }

    async fn insert(&mut self, plan: &TablePlan, rows: Vec<Row>) -> Result<()> {
        let table = &plan.target.quoted;
        let columns = &plan.columns;
        let what = format!("{} insert(s) into {}", rows.len(), plan.target.name);
        if rows.len() >= COPY_MIN_ROWS {
            let statement = self
                .statement(&sql::copy_in(table, columns), &[], &what)
                .await?;
            let mut buffer = Vec::with_capacity(rows.len() * columns.len() * 16);
            for row in &rows {
                for i in 0..columns.len() {
                    if i > 0 {
                        buffer.push(b'\t');
                    }
                    let value = row
                        .text(i)
                        .map_err(|problem| self.bad_row(&what, problem))?;
                    sql::copy_text_value(&mut buffer, value);
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
        let text = sql::insert_unnest(table, columns);
        let statement = self
            .statement(&text, &vec![Type::TEXT_ARRAY; columns.len()], &what)
            .await?;
        let mut arrays: Vec<Vec<Option<&str>>> = (0..columns.len())
            .map(|_| Vec::with_capacity(rows.len()))
            .collect();
        for row in &rows {
            for (i, array) in arrays.iter_mut().enumerate() {
                let value = row
                    .text(i)
                    .map_err(|problem| self.bad_row(&what, problem))?;
                array.push(match value {
                    Some(bytes) => Some(utf8(bytes)?),
                    None => None,
                });
            }
        }
        let result = self.client.execute(&statement, &params(&arrays)).await;
        result.map_err(|e| self.apply_error(&what, e))?;
        Ok(())
    }

    fn bad_row(&self, what: &str, problem: &str) -> Error {
        Error::definite(format!(
            "Applying {what} (source transaction at {}): the stream carried {problem}",
            self.lsn
        ))
    }

    async fn update(
        &mut self,
        plan: &TablePlan,
        rows: Vec<UpdateRow>,
        key_change: bool,
    ) -> Result<()> {
        let key_columns = plan.key_columns();
        let key_indexes: &[usize] = match &plan.matching {
            Matching::Key(indexes) => indexes,
            _ => &[],
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
        // The column a guarded-only update assigns to itself: never the Citus distribution
        // column (Citus refuses it in a SET list), a key column only when nothing else is left.
        let assignable = |i: &usize| !plan.columns[*i].generated_always && Some(*i) != distribution;
        let touch = (0..plan.columns.len())
            .filter(assignable)
            .min_by_key(|i| key_indexes.contains(i))
            .map(|i| &plan.columns[i]);
        for (shape, members) in shapes {
            // A column that is GENERATED ALWAYS AS IDENTITY on the target cannot be
            // assigned: it is matched instead (the row must already hold the new value).
            let (guard_indexes, set_indexes): (Vec<usize>, Vec<usize>) = (0..shape.len())
                .filter(|&i| shape[i])
                .partition(|&i| plan.columns[i].generated_always);
            let what = format!("{} update(s) of {}", members.len(), plan.target.name);
            if set_indexes.is_empty() && guard_indexes.is_empty() {
                // Only unchanged or key columns: the row already is as the source has it.
                continue;
            }
            let set: Vec<SqlColumn> = set_indexes
                .iter()
                .map(|&i| plan.columns[i].clone())
                .collect();
            let guards: Vec<SqlColumn> = guard_indexes
                .iter()
                .map(|&i| plan.columns[i].clone())
                .collect();
            let dist_column = distribution.map(|i| plan.columns[i].clone());
            if set.is_empty() && touch.is_none() {
                return Err(self.identity_changed(&what, &plan.target.quoted, &guards));
            }
            let text = sql::update_unnest(
                &plan.target.dml_name(),
                &sql::UpdateColumns {
                    keys: &key_columns,
                    set: &set,
                    guards: &guards,
                    touch,
                    dist: dist_column.as_ref(),
                },
            );
            let param_count =
                key_columns.len() + set.len() + guards.len() + usize::from(dist_column.is_some());
            let statement = self
                .statement(&text, &vec![Type::TEXT_ARRAY; param_count], &what)
                .await?;
            let selected: Vec<&UpdateRow> = members.iter().map(|&at| &rows[at]).collect();
            let mut arrays = column_arrays(&selected, key_columns.len(), |row, i| &row.key[i])
                .map_err(|e| e.context(&what))?;
            for indexes in [&set_indexes, &guard_indexes] {
                let values = column_arrays(&selected, indexes.len(), |row, i| &row.new[indexes[i]])
                    .map_err(|e| e.context(&what))?;
                arrays.extend(values);
            }
            if let Some(dist) = distribution {
                // The rows' current distribution values: from the key when it holds the
                // column, else from the new row (unchanged there: a change of it became
                // DELETE + INSERT in the builder).
                let dist_values = column_arrays(&selected, 1, |row, _| {
                    match key_indexes.iter().position(|&k| k == dist) {
                        Some(at) => &row.key[at],
                        None => &row.new[dist],
                    }
                })
                .map_err(|e| e.context(&what))?;
                arrays.extend(dist_values);
            }
            let result = self.client.execute(&statement, &params(&arrays)).await;
            let updated = result.map_err(|e| self.apply_error(&what, e))?;
            if (updated as usize) < members.len() && !guards.is_empty() {
                return Err(self.identity_changed(&what, &plan.target.quoted, &guards));
            }
            if (updated as usize) < members.len() {
                let names: Vec<&str> = key_columns.iter().map(|c| c.name.as_str()).collect();
                return Err(Error::new(
                    ErrorKind::Apply,
                    format!(
                        "{what}: only {updated} of {} rows exist on the target (source transaction at {}; the missing ones are among {}). The target is missing rows the source has: find them with `sluice verify`, repair the target, and sluice retries by itself",
                        members.len(),
                        self.lsn,
                        describe_keys(&names, &arrays[..names.len()], 5)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An UPDATE that would have to set a target identity column GENERATED ALWAYS (or, with
    /// guarded rows unmatched, the rows may also be missing: both are named).
    fn identity_changed(&self, what: &str, table: &str, guards: &[SqlColumn]) -> Error {
        let names: Vec<&str> = guards.iter().map(|c| c.name.as_str()).collect();
        let fixes: Vec<String> = guards
            .iter()
            .map(|c| {
                format!(
                    "ALTER TABLE {table} ALTER COLUMN {} SET GENERATED BY DEFAULT",
                    crate::source::quote_ident(&c.name)
                )
            })
            .collect();
        Error::new(
            ErrorKind::Apply,
            format!(
                "{what} (source transaction at {}): the source gave {} a new value, but on the target {} GENERATED ALWAYS AS IDENTITY, which no UPDATE may set (unless the target is missing the rows: `sluice verify` finds them). Let the target take the source's values: `{}` on the target (back to ALWAYS at cutover); sluice retries by itself",
                self.lsn,
                names.join(", "),
                if names.len() == 1 { "it is" } else { "they are" },
                fixes.join("; "),
            ),
        )
    }

    async fn delete(&mut self, plan: &TablePlan, keys: Vec<Vec<Cell>>) -> Result<()> {
        let key_columns = plan.key_columns();
        let key_indexes: &[usize] = match &plan.matching {
            Matching::Key(indexes) => indexes,
            _ => &[],
        };
        let dist_at = plan
            .distribution
            .and_then(|d| key_indexes.iter().position(|&k| k == d));
        let dist_column = dist_at.map(|at| key_columns[at].clone());
        let what = format!("{} delete(s) from {}", keys.len(), plan.target.name);
        let text = sql::delete_unnest(&plan.target.dml_name(), &key_columns, dist_column.as_ref());
        let param_count = key_columns.len() + usize::from(dist_column.is_some());
        let statement = self
            .statement(&text, &vec![Type::TEXT_ARRAY; param_count], &what)
            .await?;
        let mut arrays = column_arrays(&keys, key_columns.len(), |row, i| &row[i])
            .map_err(|e| e.context(&what))?;
        if let Some(at) = dist_at {
            arrays
                .extend(column_arrays(&keys, 1, |row, _| &row[at]).map_err(|e| e.context(&what))?);
        }
        let result = self.client.execute(&statement, &params(&arrays)).await;
        let deleted = result.map_err(|e| self.apply_error(&what, e))?;
        if (deleted as usize) < keys.len() {
            // The end state is what the source has either way: say so, do not stall.
            tracing::warn!(
                "{what}: {} of the rows were already gone on the target (source transaction at {})",
                keys.len() - deleted as usize,
                self.lsn
            );
        }
        Ok(())
    }

    async fn by_values(&mut self, plan: &TablePlan, change: ValueChange) -> Result<()> {
        let table = &plan.target.dml_name();
        let columns = &plan.columns;
        let name = &plan.target.name;
        let narrowing: &[usize] = match &plan.matching {
            Matching::AllValues(key) => key,
            _ => &[],
        };
        let (text, values, what) = match &change {
            ValueChange::Update { old, new } => {
                // The whole old row is known: an identity the target generates ALWAYS is
                // left out when unchanged and reported when changed.
                let changed_identities: Vec<SqlColumn> = (0..new.len())
                    .filter(|&i| columns[i].generated_always)
                    .filter(|&i| new[i] != Cell::Unchanged && new[i] != old[i])
                    .map(|i| columns[i].clone())
                    .collect();
                if !changed_identities.is_empty() {
                    return Err(self.identity_changed(
                        &format!("an update of {name}"),
                        table,
                        &changed_identities,
                    ));
                }
                let set_indexes: Vec<usize> = (0..new.len())
                    .filter(|&i| new[i] != Cell::Unchanged && !columns[i].generated_always)
                    .collect();
                if set_indexes.is_empty() {
                    return Ok(());
                }
                let set: Vec<SqlColumn> = set_indexes.iter().map(|&i| columns[i].clone()).collect();
                let mut values: Vec<Option<&str>> = Vec::new();
                for &i in &set_indexes {
                    values.push(text_of(&new[i])?);
                }
                for cell in old {
                    values.push(text_of(cell)?);
                }
                (
                    sql::update_by_values(table, columns, &set, narrowing),
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
                    sql::delete_by_values(table, columns, narrowing),
                    values,
                    format!("a delete from {name}"),
                )
            }
        };
        let statement = self
            .statement(&text, &vec![Type::TEXT; values.len()], &what)
            .await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let result = self.client.execute(&statement, &params).await;
        let changed = result.map_err(|e| self.apply_error(&what, e))?;
        if changed == 0 {
            if let ValueChange::Update { old, .. } = &change {
                // Matched by all its values (no key): the row looked for is the fix, since
                // `verify` cannot name rows of a table without a key.
                let shown: Vec<String> = old
                    .iter()
                    .zip(columns.iter())
                    .map(|(cell, column)| {
                        let value = match cell {
                            Cell::Null => "NULL".to_string(),
                            Cell::Unchanged => "(unchanged TOAST value)".to_string(),
                            Cell::Text(bytes) => {
                                let text = String::from_utf8_lossy(bytes);
                                let cut: String = text.chars().take(200).collect();
                                let more = if cut.len() < text.len() { "..." } else { "" };
                                format!("{}{more}", crate::source::quote_literal(&cut))
                            }
                        };
                        format!("{} = {value}", crate::source::quote_ident(&column.name))
                    })
                    .collect();
                return Err(Error::new(
                    ErrorKind::Apply,
                    format!(
                        "{what}: no target row has the old values ({}) (source transaction at {}). Put a row with those values on the target (the source changed it from them), or repair the table from the source (`sluice verify` finds the difference); sluice retries by itself",
                        shown.join(", "),
                        self.lsn
                    ),
                ));
            }
            // As for key deletes: the end state is the source's either way, but say so.
            tracing::warn!(
                "{what}: no target row had the old values, it was already gone on the target (source transaction at {})",
                self.lsn
            );
        }
        Ok(())
    }

    /// Commits with the position row, then checkpoints and acknowledges.
    async fn commit(
        &mut self,
        end_lsn: Lsn,
        transactions: u64,
        changes: u64,
        commit_time: Option<PgTimestamp>,
    ) -> Result<()> {
        let caught_up = end_lsn.max(self.position.caught_up_lsn);
        let record = self.position_sql(end_lsn, caught_up);
        // One round trip; transactions without changes for us still move the position.
        let statement = if self.in_target_txn {
            format!("{record}; COMMIT")
        } else {
            format!("BEGIN; {record}; COMMIT")
        };
        let result = self.client.batch_execute(&statement).await;
        self.in_target_txn = false;
        result.map_err(|e| {
            self.apply_error("the commit (deferred constraints are checked here)", e)
        })?;
        self.position = Position {
            applied_lsn: end_lsn,
            caught_up_lsn: caught_up,
            acked_lsn: self.position.acked_lsn.max(caught_up),
            applied_transactions: self.position.applied_transactions + transactions,
            applied_changes: self.position.applied_changes + changes,
        };
        self.checkpoint().await?;
        let position = self.position;
        self.status.transactions_applied_through(end_lsn);
        self.status.update(|s| {
            s.applied_lsn = Some(position.applied_lsn);
            s.caught_up_lsn = Some(position.caught_up_lsn);
            s.applied_transactions = position.applied_transactions;
            s.applied_changes = position.applied_changes;
            if let Some(time) = commit_time {
                let behind = time.to_system_time().elapsed().unwrap_or_default();
                s.lag_seconds = Some(behind.as_secs_f64());
            }
            if !matches!(s.state, DaemonState::Copying | DaemonState::Stopped) {
                s.state = DaemonState::Streaming;
            }
            s.last_error = None;
            s.stalled_seconds = None;
            s.stalled_since = None;
        });
        Ok(())
    }

    /// On an idle stream: records the keepalive position so the slot can release WAL.
    async fn acknowledge_idle(&mut self, wal_end: Lsn) -> Result<()> {
        if wal_end <= self.position.caught_up_lsn {
            return Ok(());
        }
        let record = self.position_sql(self.position.applied_lsn, wal_end);
        let result = self
            .client
            .batch_execute(&format!("BEGIN; {record}; COMMIT"))
            .await;
        result.map_err(|e| self.apply_error("recording the keepalive position", e))?;
        self.position.caught_up_lsn = wal_end;
        self.position.acked_lsn = self.position.acked_lsn.max(wal_end);
        self.checkpoint().await?;
        self.status.update(|s| {
            s.caught_up_lsn = Some(wal_end);
            s.lag_seconds = Some(0.0);
            if !matches!(s.state, DaemonState::Copying | DaemonState::Stopped) {
                s.state = DaemonState::Streaming;
            }
            // Streaming and caught up: an error of before (a lost connection) is over.
            s.last_error = None;
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
            quote_literal(&self.slot),
            quote_literal(&self.system_identifier),
            quote_literal(&applied.to_string()),
            quote_literal(&caught_up.to_string()),
        )
    }

    /// sled, then the slot: only after the target commit. The flush is a disk sync, so it
    /// runs off the runtime's thread.
    async fn checkpoint(&mut self) -> Result<()> {
        let store = self.store.clone();
        let position = self.position;
        tokio::task::spawn_blocking(move || store.save_position(&position))
            .await
            .map_err(|e| Error::with_source(ErrorKind::Definite, "Saving the checkpoint", e))??;
        let _ = self.acks.send(position.caught_up_lsn);
        Ok(())
    }

    /// An error from the target while applying: SQLSTATE decides retry, stop or stall, and
    /// the message names what was applied and where in the source.
    fn apply_error(&self, what: &str, error: tokio_postgres::Error) -> Error {
        let lsn = self.lsn;
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
                // Raised inside a target function (a CHECK, a DEFAULT, an ENABLE ALWAYS
                // trigger): it named an object without its schema, and sluice's sessions
                // run with an empty search_path, as PostgreSQL's own apply worker does.
                if matches!(db.code().code(), "42883" | "42P01") {
                    if let Some(context) = db.where_() {
                        message.push_str(&format!(
                            " (in: {}). sluice's sessions run with an empty search_path, as PostgreSQL's apply worker does: schema-qualify the names that function uses, or give it its own (ALTER FUNCTION ... SET search_path = public)",
                            context.lines().next().unwrap_or(context)
                        ));
                    }
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

fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes)
        .map_err(|_| Error::new(ErrorKind::Apply, "a value is not valid UTF-8 text"))
}

fn text_of(cell: &Cell) -> Result<Option<&str>> {
    match cell {
        Cell::Text(bytes) => utf8(bytes).map(Some),
        _ => Ok(None),
    }
}

/// The first `limit` keys of a batch, for messages: `(id, k)=(7, 'a')`, then how many
/// more. Values are quoted as SQL literals (NULL as NULL).
fn describe_keys(names: &[&str], arrays: &[Vec<Option<&str>>], limit: usize) -> String {
    let rows = arrays.first().map_or(0, Vec::len);
    let key = |row: usize| -> String {
        let values: Vec<String> = arrays
            .iter()
            .map(|array| match array[row] {
                Some(value) => crate::source::quote_literal(value),
                None => "NULL".to_string(),
            })
            .collect();
        match names.len() {
            1 => format!("{}={}", names[0], values[0]),
            _ => format!("({})=({})", names.join(", "), values.join(", ")),
        }
    };
    let mut shown: Vec<String> = (0..rows.min(limit)).map(key).collect();
    if rows > limit {
        shown.push(format!("{} more", rows - limit));
    }
    shown.join(", ")
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

fn params<'a>(arrays: &'a [Vec<Option<&'a str>>]) -> Vec<&'a (dyn ToSql + Sync)> {
    arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

#[cfg(test)]
mod tests {
    use super::describe_keys;

    #[test]
    fn missing_rows_are_named_by_their_keys() {
        let ids = vec![Some("7"), Some("8"), None];
        let ks = vec![Some("a"), Some("it's"), Some("c")];
        assert_eq!(
            describe_keys(&["id", "k"], &[ids.clone(), ks], 2),
            "(id, k)=('7', 'a'), (id, k)=('8', 'it''s'), 1 more"
        );
        assert_eq!(describe_keys(&["id"], &[ids], 5), "id='7', id='8', id=NULL");
    }
}
