//! The initial snapshot copy, handed off to streaming with no gap and no overlap.
//!
//! ```text
//!  CREATE_REPLICATION_SLOT s LOGICAL pgoutput (SNAPSHOT 'export')   (gated session, held open)
//!        │ consistent point C, snapshot S
//!        ▼
//!  plan: per table its columns, COPY format, chunks (ctid block ranges above the threshold)
//!        │ record copy/table/<t> {generation, chunks}  (flushed before any row lands)
//!        ▼
//!  copy.jobs workers, each: BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT S;
//!        COPY (SELECT cols ... chunk) TO STDOUT ──stream──▶ COPY t (cols) FROM STDIN; COMMIT
//!        │ record copy/chunk/<t>/<generation>/<i>, and copy/table/<t>.finished (flushed)
//!        ▼
//!        │ table copied ──▶ ddl::build: its deferred key, indexes, constraints (meanwhile)
//!        ▼
//!  every table copied: the rest of the deferred DDL (foreign keys), copy/state.finished = true
//!        ▼
//!  streaming from the slot at C (the caller's part)
//! ```
//!
//! **Why it is exactly once.** The slot decodes every transaction that commits at or after
//! C; the snapshot holds every transaction that committed before it. Each row is therefore
//! in the copy or in the stream, never both, never neither.
//!
//! **Resuming.** A snapshot lives as long as the session that exported it, that is as long
//! as this process. Within the process, a failed chunk (a connection reset, a terminated
//! backend) is retried under the same snapshot and finished chunks are kept. A new process
//! (after a kill or restart) keeps every finished table; each unfinished table is emptied on
//! the target and copied again, whole, under a fresh snapshot exported by a TEMPORARY slot
//! `<slot>_sync_<n>` (generation n). That slot's consistent point is the table's *sync LSN*:
//! streaming from the permanent slot must skip this table's transactions that commit before
//! it, because the fresh snapshot already holds them ([`table_sync_positions`]). PostgreSQL's
//! own table synchronisation works the same way. Chunks of different snapshots never mix.
//!
//! A table's record is written (and flushed) before any of its rows reach the target, so a
//! table whose rows might be on the target is always known, and emptied before it is copied
//! again. A table with no record must be empty on the target; sluice refuses to copy into a
//! table that already holds rows it did not write.

pub mod ddl;
mod pipe;
pub mod plan;
pub mod progress;
pub mod state;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_postgres::Client;

use crate::checkpoint::Store;
use crate::config::Config;
use crate::control::{DaemonState, SharedStatus, TableState};
use crate::error::{self, Cause, Error, Result};
use crate::lsn::Lsn;
use crate::source::slot::{create_slot_exporting_snapshot, slot_info, ExportedSnapshot};
use crate::source::{SourceTable, TableName};
use crate::tls;

use self::pipe::Worker;
use self::plan::TableLayout;
use self::progress::{Reporter, TableProgress};
use self::state::{ChunkDone, ChunkRange, CopyState, TableRecord};

/// Everything the copy needs from the daemon.
pub struct CopyContext {
    pub config: Config,
    /// The selected source tables (`source::selected_tables`).
    pub tables: Vec<SourceTable>,
    pub store: Store,
    pub status: SharedStatus,
    /// Draw a live terminal display (else log a line per running table every 10 s).
    pub progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Where streaming from the permanent slot begins.
    pub consistent_point: Lsn,
    /// Selected tables whose copy is finished (all of them on success).
    pub tables_copied: usize,
    pub rows: u64,
    /// Bytes of COPY data moved (text or binary, as sent).
    pub bytes: u64,
}

/// How often one chunk is tried before the copy round gives up on it.
const CHUNK_ATTEMPTS: u32 = 4;
/// How many snapshots one call may use after transient failures of a whole round.
const MAX_ROUNDS: u32 = 3;

/// Whether the initial copy (data and deferred DDL) is finished: `sluice run` then streams
/// without copying.
pub fn copy_finished(store: &Store) -> Result<bool> {
    Ok(state::load_state(store)?.is_some_and(|s| s.finished))
}

/// After a finished copy, forgets the copies of `tables`, so the next start copies them
/// under a fresh snapshot and skips the stream's changes that snapshot holds, as for a table
/// selected after the copy. Returns whether it did (no finished copy: nothing to forget).
pub fn forget_finished_copies(store: &Store, tables: &[TableName]) -> Result<bool> {
    if !copy_finished(store)? {
        return Ok(false);
    }
    for table in tables {
        state::forget_table(store, table)?;
    }
    Ok(true)
}

/// A state dir without a copy record (lost, or started afresh) for a migration whose target
/// already holds applied changes: the copy finished before (the target's position is the
/// authority), but which tables it copied only the lost state dir knew. The tables selected
/// now are taken as copied and recorded so, so that a table selected later is copied at its
/// start rather than streamed into empty (nothing recorded, nothing was ever copied late).
/// Returns how many were recorded; 0 when the state dir has a copy record.
pub fn restore_copy_record(
    store: &Store,
    slot: &str,
    publication: &str,
    position: Lsn,
    tables: &[SourceTable],
) -> Result<usize> {
    if state::load_state(store)?.is_some() {
        return Ok(0);
    }
    for table in tables {
        state::save_table(
            store,
            &TableRecord {
                name: table.name.clone(),
                oid: Some(table.oid),
                generation: 0,
                sync_lsn: None,
                chunks: Vec::new(),
                finished: true,
                rows: 0,
                bytes: 0,
            },
        )?;
    }
    state::save_state(
        store,
        &state::CopyState {
            slot: slot.to_string(),
            consistent_point: position,
            generation: 0,
            finished: true,
            publication: Some(publication.to_string()),
        },
    )?;
    store.flush()?;
    Ok(tables.len())
}

/// Forgets the finished copies recorded under a selected table's name for another table
/// (another OID: the one copied was dropped and a table created again, or another renamed
/// to its name, while sluice was stopped), and returns their names: the rows on the target
/// are the other table's, so the one selected now is copied afresh once emptied there.
pub fn forget_copies_of_other_tables(
    store: &Store,
    tables: &[SourceTable],
) -> Result<Vec<TableName>> {
    if !copy_finished(store)? {
        return Ok(Vec::new());
    }
    let replaced: Vec<TableName> = state::load_tables(store)?
        .into_iter()
        .filter(|record| {
            record.finished
                && tables
                    .iter()
                    .any(|t| t.name == record.name && record.oid.is_some_and(|oid| oid != t.oid))
        })
        .map(|record| record.name)
        .collect();
    forget_finished_copies(store, &replaced)?;
    Ok(replaced)
}

/// Forgets the finished copies of tables `[tables]` no longer selects, and returns their
/// names. Their changes are not applied while they are left out (the stream skips tables it
/// does not select), so the copied rows go stale: selected again, such a table must be
/// copied afresh (the copy refuses it until it is emptied on the target), not streamed on
/// from rows that miss what happened meanwhile.
pub fn forget_unselected_copies(store: &Store, tables: &[SourceTable]) -> Result<Vec<TableName>> {
    if !copy_finished(store)? {
        return Ok(Vec::new());
    }
    let left_out: Vec<TableName> = state::load_tables(store)?
        .into_iter()
        .filter(|record| record.finished && !tables.iter().any(|t| t.name == record.name))
        .map(|record| record.name)
        .collect();
    forget_finished_copies(store, &left_out)?;
    Ok(left_out)
}

/// Selected tables that a finished copy never copied: selected after it (a wider
/// `[tables]`, a table created since). They are copied before streaming resumes, under a
/// temporary slot's snapshot with a sync LSN, the way PostgreSQL's `ALTER SUBSCRIPTION ...
/// REFRESH PUBLICATION` copies tables added to a publication. Without a finished copy in this
/// state dir (the copy was off, or is still under way) there are none: the tables were
/// loaded some other way, or the copy in progress takes them.
pub fn tables_to_copy_late(store: &Store, tables: &[SourceTable]) -> Result<Vec<TableName>> {
    if !copy_finished(store)? {
        return Ok(Vec::new());
    }
    let copied: std::collections::HashSet<TableName> = state::load_tables(store)?
        .into_iter()
        .filter(|record| record.finished)
        .map(|record| record.name)
        .collect();
    Ok(tables
        .iter()
        .filter(|table| !copied.contains(&table.name))
        .map(|table| table.name.clone())
        .collect())
}

/// Gives the planner statistics on the freshly copied tables (`ANALYZE`, as pgcopydb and
/// PostgreSQL's own restore advice do), before streaming starts: an autoanalyze that ran
/// while a table was still empty (during its copy) left it with zero rows in the planner's
/// eyes, and the first batched UPDATE, planned before a background ANALYZE finished, scanned
/// the whole table once per row it matched (minutes, with `state` streaming). A failure
/// only warns (autovacuum, or the operator, analyzes later).
pub async fn analyze_copied(target: &Client, tables: &[TableName]) -> Result<()> {
    let started = std::time::Instant::now();
    let mut analyzed = 0;
    for table in tables {
        match target
            .batch_execute(&format!("ANALYZE {}", table.quoted()))
            .await
        {
            Ok(()) => analyzed += 1,
            Err(e) => tracing::warn!(
                table = %table,
                error = %error::pg("ANALYZE on the target", e).report(),
                "the copied table was not analyzed; autovacuum or ANALYZE by hand gives it statistics"
            ),
        }
    }
    tracing::info!(
        tables = analyzed,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "analyzed the copied tables on the target"
    );
    Ok(())
}

/// Per-table positions for streaming: a table re-copied under a fresh snapshot (its original
/// snapshot was gone) must have its changes skipped for transactions whose commit LSN
/// (`Begin.final_lsn`) is below this LSN; from this LSN on they apply. This is PostgreSQL's
/// own test (`should_apply_changes_for_rel`: apply when `sync_lsn <= final_lsn`). Tables
/// copied under the permanent slot's snapshot are not in the map: streaming from the slot's
/// consistent point is right for them.
pub fn table_sync_positions(store: &Store) -> Result<BTreeMap<TableName, Lsn>> {
    Ok(state::load_tables(store)?
        .into_iter()
        .filter_map(|record| record.sync_lsn.map(|lsn| (record.name, lsn)))
        .collect())
}

/// Creates the slot when missing (exporting its snapshot), copies every selected table that
/// is not copied yet, records everything in the store, and runs the deferred DDL.
pub async fn initial_copy(ctx: &CopyContext) -> Result<CopyOutcome> {
    ctx.status.update(|s| {
        if s.state != DaemonState::Stopped {
            s.state = DaemonState::Copying
        }
    });
    let mut copy_state = state::load_state(&ctx.store)?;

    let records: HashMap<TableName, TableRecord> = state::load_tables(&ctx.store)?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let progress: Vec<Arc<TableProgress>> = ctx
        .tables
        .iter()
        .map(|table| {
            let entry = Arc::new(TableProgress::new(
                table.name.to_string(),
                table.estimated_rows,
            ));
            if let Some(record) = records.get(&table.name).filter(|r| r.finished) {
                entry.reset_to(record.rows, record.bytes);
                entry.mark_copied();
            }
            ctx.status.set_table(
                &table.name.to_string(),
                if records.get(&table.name).is_some_and(|r| r.finished) {
                    TableState::Copied
                } else {
                    TableState::Pending
                },
                entry.rows(),
            );
            entry
        })
        .collect();
    let reporter = Reporter::start(progress.clone(), ctx.status.clone(), ctx.progress);

    // The deferred DDL is built beside the copy, each table's as soon as it is copied. In a
    // JoinSet so that a copy that fails or is stopped takes it down too.
    let (copied, copied_feed) = unbounded_channel();
    let mut deferred = tokio::task::JoinSet::new();
    if !copy_state.as_ref().is_some_and(|s| s.finished) {
        let target = tls::connect(&ctx.config.target.conn, "the target").await?;
        let schedule =
            ddl::DdlSchedule::new(crate::cutover::schema::pending_deferred_ddl(&target).await?);
        drop(target);
        for (name, record) in &records {
            if record.finished {
                let _ = copied.send(name.quoted());
            }
        }
        deferred.spawn(ddl::build(
            ctx.config.target.conn.clone(),
            ctx.status.clone(),
            schedule,
            copied_feed,
            ctx.config.copy.jobs,
        ));
    }

    let mut round = 1;
    loop {
        match copy_round(ctx, &mut copy_state, &progress, &copied).await {
            Ok(()) => break,
            Err(e) if e.is_transient() && round < MAX_ROUNDS => {
                if e.has_cause(Cause::SlotBeingCreated) {
                    // Nothing failed and nothing is copied again: it waits.
                    tracing::warn!(error = %e.report(), "waiting before the copy starts");
                } else {
                    tracing::warn!(
                        error = %e.report(),
                        "the copy round failed; unfinished tables are copied again under a fresh snapshot"
                    );
                }
                tokio::time::sleep(Duration::from_secs(2 * u64::from(round))).await;
                round += 1;
            }
            Err(e) => {
                reporter.finish().await;
                return Err(e);
            }
        }
    }
    reporter.finish().await;

    let Some(mut copy_state) = copy_state else {
        return Err(Error::definite(
            "The initial copy finished without a recorded slot: this is a bug in sluice; move state.dir away and start again",
        ));
    };
    if !copy_state.finished {
        drop(copied);
        after_copy(&mut deferred).await?;
        copy_state.finished = true;
        state::save_state(&ctx.store, &copy_state)?;
    }
    let records = state::load_tables(&ctx.store)?;
    let selected: Vec<&TableRecord> = records
        .iter()
        .filter(|r| r.finished && ctx.tables.iter().any(|t| t.name == r.name))
        .collect();
    let outcome = CopyOutcome {
        consistent_point: copy_state.consistent_point,
        tables_copied: selected.len(),
        rows: selected.iter().map(|r| r.rows).sum(),
        bytes: selected.iter().map(|r| r.bytes).sum(),
    };
    tracing::info!(
        consistent_point = %outcome.consistent_point,
        tables = outcome.tables_copied,
        rows = outcome.rows,
        bytes = outcome.bytes,
        "initial copy finished"
    );
    Ok(outcome)
}

/// Runs once every table's data is on the target (the feed of copied tables closed): waits
/// for the deferred indexes and constraints `sluice schema` stored (building them once is
/// much faster than maintaining them row by row), the foreign keys last. It ends before
/// `copy/state.finished` is set, so a crash while building runs the rest on the next start;
/// each statement is marked applied with its own commit.
async fn after_copy(deferred: &mut tokio::task::JoinSet<Result<usize>>) -> Result<()> {
    let mut created = 0;
    while let Some(joined) = deferred.join_next().await {
        created += joined.map_err(|e| {
            Error::definite(format!(
                "Building the deferred indexes and constraints stopped unexpectedly ({e}): this is a bug in sluice; restart to build the rest"
            ))
        })??;
    }
    if created > 0 {
        tracing::info!(
            statements = created,
            "created the deferred indexes and constraints"
        );
    }
    Ok(())
}

/// The name of the temporary slot of snapshot generation `generation`.
fn sync_slot_name(slot: &str, generation: u32) -> String {
    let suffix = format!("_sync_{generation}");
    let keep = 63usize.saturating_sub(suffix.len()).min(slot.len());
    format!("{}{suffix}", &slot[..keep])
}

/// One snapshot's worth of copying: takes a snapshot (the slot's own on the first start, a
/// temporary slot's otherwise), then copies every unfinished table under it.
async fn copy_round(
    ctx: &CopyContext,
    copy_state: &mut Option<CopyState>,
    progress: &[Arc<TableProgress>],
    copied: &UnboundedSender<String>,
) -> Result<()> {
    // A connection per round: a round that failed on a broken connection gets a new one.
    let source = tls::connect(&ctx.config.source.conn, "the source").await?;
    let source = &source;
    let slot = &ctx.config.source.slot;
    let conn = &ctx.config.source.conn;
    let publication = &ctx.config.source.publication;
    let records: HashMap<TableName, TableRecord> = state::load_tables(&ctx.store)?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let pending: Vec<(usize, &SourceTable)> = ctx
        .tables
        .iter()
        .enumerate()
        .filter(|(_, t)| !records.get(&t.name).is_some_and(|r| r.finished))
        .collect();

    // Before any slot exists, so that a start that cannot copy leaves nothing retaining WAL
    // on the source: every table to copy exists on the target, and the ones not begun yet
    // are empty there (each is checked again as its copy begins).
    if !pending.is_empty() {
        let target = tls::connect(&ctx.config.target.conn, "the target").await?;
        let names: Vec<&TableName> = pending.iter().map(|(_, t)| &t.name).collect();
        let missing = plan::missing_on_target(&target, &names).await?;
        if !missing.is_empty() {
            return Err(Error::definite(format!(
                "{} selected table(s) do not exist on the target: {}. Create the schema first (`sluice schema`), or exclude them in [tables]",
                missing.len(),
                crate::source::abbreviate(&missing, 10)
            )));
        }
        let lossy = plan::lossy_columns_on_target(source, &target, &names).await?;
        if !lossy.is_empty() {
            return Err(Error::definite(format!(
                "{} column(s) on the target would round or cut the copied values without an error: {}. Give them the source's type (ALTER TABLE ... ALTER COLUMN ... TYPE ...; `sluice check` lists every difference), then start again",
                lossy.len(),
                crate::source::abbreviate(&lossy, 10)
            )));
        }
        let not_begun: Vec<&TableName> = names
            .into_iter()
            .filter(|name| !records.contains_key(*name))
            .collect();
        let occupied = plan::holding_rows_on_target(&target, &not_begun).await?;
        if !occupied.is_empty() {
            // The slot exists but this state dir records no copy: a copy began under it and
            // its state dir was lost, so the rows there are a part copy, never data "as of
            // the slot's position" that streaming could go on from.
            let interrupted = copy_state.is_none() && slot_info(source, slot).await?.is_some();
            let late = copy_state.as_ref().is_some_and(|c| c.finished);
            let otherwise = match interrupted {
                _ if late => "; they are selected since the copy (or were left out for a while), so their rows there miss changes the stream did not apply: empty them to have them copied afresh".to_string(),
                true => format!(
                    "; slot {slot} exists already while this state dir records no copy: if a copy under it was interrupted and its state dir lost, these rows are a part copy and must be emptied (copy.enabled = false would stream on from them with rows missing); set copy.enabled = false only if you loaded them yourself as of the slot's position"
                ),
                false => ", or set copy.enabled = false if the target already holds the data as of the slot's position".to_string(),
            };
            return Err(Error::definite(format!(
                "{} selected table(s) already hold rows on the target: {}. The initial copy only writes into empty tables: empty them (TRUNCATE), or exclude them in [tables]{otherwise}",
                occupied.len(),
                crate::source::abbreviate(&occupied, 10)
            )));
        }
    }
    let mut snapshot: Option<ExportedSnapshot> = None;
    // The caller's copy of the state is updated whenever the store is, so a failed round
    // never makes the next one forget the slot it created.
    let mut state_now = match copy_state.clone() {
        Some(existing) => {
            if slot_info(source, slot).await?.is_none() {
                return Err(Error::definite(format!(
                    "The replication slot {slot} that the initial copy started from is gone from the source: the changes since its consistent point {} are lost. Start over: empty the target tables, move state.dir away, and run again",
                    existing.consistent_point
                )));
            }
            existing
        }
        None => match slot_info(source, slot).await? {
            None => {
                let exported =
                    create_slot_exporting_snapshot(conn, slot, publication, false).await?;
                let fresh = CopyState {
                    slot: slot.clone(),
                    consistent_point: exported.consistent_point,
                    generation: 0,
                    finished: false,
                    publication: Some(publication.clone()),
                };
                state::save_state(&ctx.store, &fresh)?;
                *copy_state = Some(fresh.clone());
                snapshot = Some(exported);
                fresh
            }
            Some(info) => {
                // The slot exists but this state dir never copied from it (a crash right
                // after creating it, or a slot made by hand). Its snapshot cannot be had
                // again; every table goes through a temporary slot and gets a sync LSN.
                if info.plugin.as_deref() != Some("pgoutput")
                    || info.database.as_deref() != Some(conn.dbname.as_str())
                {
                    return Err(Error::definite(format!(
                        "Replication slot {slot} exists on the source but is not a pgoutput slot of database {} (plugin {:?}, database {:?}): choose another source.slot",
                        conn.dbname, info.plugin, info.database
                    )));
                }
                let consistent_point = match (info.confirmed_flush_lsn, info.active_pid) {
                    (Some(lsn), _) => lsn,
                    // Still being created by a session (a sluice killed while the slot
                    // waited for the source's open transactions): it finishes, or vanishes
                    // with that session, once those end. Retried, as a slot held by a dying
                    // session is.
                    (None, Some(pid)) => {
                        return Err(Error::transient(format!(
                            "Replication slot {slot} is still being created by session {pid} (a sluice stopped while the slot waited for the source's open transactions to end?); waiting for it to finish or go away"
                        ))
                        .because(Cause::SlotBeingCreated))
                    }
                    (None, None) => {
                        return Err(Error::definite(format!(
                            "Replication slot {slot} has no confirmed_flush_lsn: it is not a usable logical slot; drop it or choose another source.slot"
                        )))
                    }
                };
                tracing::warn!(
                    slot,
                    %consistent_point,
                    "the slot exists but no copy was recorded for it; copying every table under a temporary slot's snapshot"
                );
                let fresh = CopyState {
                    slot: slot.clone(),
                    consistent_point,
                    generation: 0,
                    finished: false,
                    publication: Some(publication.clone()),
                };
                state::save_state(&ctx.store, &fresh)?;
                *copy_state = Some(fresh.clone());
                fresh
            }
        },
    };
    let result = async {
        if pending.is_empty() {
            return Ok(());
        }
        if snapshot.is_none() {
            // The generation is recorded before its slot exists, so a number is never
            // reused by a later process.
            state_now.generation += 1;
            state::save_state(&ctx.store, &state_now)?;
            let name = sync_slot_name(slot, state_now.generation);
            snapshot = Some(create_slot_exporting_snapshot(conn, &name, publication, true).await?);
        }
        let Some(exported) = snapshot.as_ref() else {
            return Ok(());
        };
        let generation = state_now.generation;
        let sync_lsn = (generation > 0).then_some(exported.consistent_point);
        copy_tables(
            ctx,
            source,
            &pending,
            &records,
            progress,
            &exported.snapshot_name,
            generation,
            sync_lsn,
            copied,
        )
        .await
    }
    .await;
    *copy_state = Some(state_now);
    // The exported snapshot (and a temporary slot) end here, after every worker is done.
    drop(snapshot);
    result
}

/// One unit of work: a chunk of a table.
struct Job {
    table: usize,
    chunk: usize,
    range: ChunkRange,
    weight: u64,
    /// Refused by a foreign key on the target (its rows refer to rows not copied yet): how
    /// many chunks had finished then, and the refusal. It is tried again once one more has.
    waits_for_references: Option<(usize, Error)>,
}

/// What the workers of one round share.
struct Round {
    store: Store,
    status: SharedStatus,
    source_conn: crate::conninfo::ConnInfo,
    target_conn: crate::conninfo::ConnInfo,
    snapshot: String,
    generation: u32,
    layouts: Vec<TableLayout>,
    records: Vec<Mutex<TableRecord>>,
    remaining: Vec<AtomicUsize>,
    progress: Vec<Arc<TableProgress>>,
    queue: Mutex<VecDeque<Job>>,
    /// Per table: the other tables of this round its foreign keys on the target refer to.
    /// A chunk a foreign key refused waits for them to be copied before it is tried again.
    references: Vec<Vec<usize>>,
    /// The target checks foreign keys as rows arrive (the user may not set
    /// `session_replication_role = replica`, or the target is Citus), so a table waits for
    /// those it refers to.
    checks_foreign_keys: bool,
    /// Chunks finished in this round, chunks being copied right now, and a wake-up for
    /// workers whose queued chunks all wait for rows a running chunk may provide.
    chunks_finished: AtomicUsize,
    chunks_running: AtomicUsize,
    chunk_ended: tokio::sync::Notify,
    /// Tells the deferred-DDL builder a table is copied (its quoted name).
    copied: UnboundedSender<String>,
    /// Tables this snapshot cannot copy (rewritten since it was taken, or a chunk's COMMIT
    /// of unknown outcome), with why: left for a round under a fresh snapshot, while the
    /// other tables go on under this one.
    set_aside: Mutex<Vec<(usize, Error)>>,
}

impl Round {
    fn is_set_aside(&self, table: usize) -> bool {
        self.set_aside
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(t, _)| *t == table)
    }

    /// Sets `table` aside for the next round: its queued chunks are dropped. The first
    /// reason is kept.
    fn set_aside(&self, table: usize, why: Error) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|job| job.table != table);
        let mut set_aside = self.set_aside.lock().unwrap_or_else(|p| p.into_inner());
        if set_aside.iter().all(|(t, _)| *t != table) {
            tracing::warn!(
                table = %self.layouts[table].name,
                reason = %why.report(),
                "this table is copied again under a fresh snapshot once the others are done"
            );
            set_aside.push((table, why));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_tables(
    ctx: &CopyContext,
    source: &Client,
    pending: &[(usize, &SourceTable)],
    records: &HashMap<TableName, TableRecord>,
    progress: &[Arc<TableProgress>],
    snapshot: &str,
    generation: u32,
    sync_lsn: Option<Lsn>,
    copied: &UnboundedSender<String>,
) -> Result<()> {
    let names: Vec<&TableName> = pending.iter().map(|(_, table)| &table.name).collect();
    let target = tls::connect(&ctx.config.target.conn, "the target").await?;
    let earlier: Vec<&TableName> = names
        .iter()
        .copied()
        .filter(|name| records.contains_key(*name))
        .collect();
    empty_target_tables(&target, &earlier).await?;
    let version: i32 = source
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| error::pg("Reading the source's version", e))?
        .get(0);
    // TID range scans (PostgreSQL 14) make a ctid-bounded chunk read only its blocks.
    let tid_range_scans = version >= 140_000;

    let checks_foreign_keys = crate::apply::target::checks_foreign_keys(&target).await?;
    let (references, self_referencing) = foreign_key_references(&target, &names).await?;
    let mut layouts = Vec::new();
    let mut round_records = Vec::new();
    let mut remaining = Vec::new();
    let mut round_progress = Vec::new();
    let mut jobs = Vec::new();
    for (position, (index, table)) in pending.iter().enumerate() {
        // Checked as rows arrive, a table whose rows refer to its own other rows cannot be
        // loaded in parallel chunks (each would wait for another's rows): whole, in one.
        let whole_for_its_keys = checks_foreign_keys && self_referencing[position];
        let mut layout = plan::table_layout(source, &target, table).await?;
        plan::apply_publication_filters(source, &ctx.config.source.publication, &mut layout)
            .await?;
        let blocks: i64 = source
            .query_one(
                "SELECT pg_relation_size($1::oid::regclass, 'main')
                        / current_setting('block_size')::int8",
                &[&table.oid],
            )
            .await
            .map_err(|e| {
                error::pg(
                    format!("Reading the size of {} on the source", table.name),
                    e,
                )
            })?
            .get(0);
        let split = ctx.config.copy.split_tables_larger_than;
        let count = plan::chunk_count(u64::try_from(table.size_bytes).unwrap_or(0), split);
        let by_key = !table.is_partitioned
            && !whole_for_its_keys
            && count > 1
            && plan::splits_by_key(ctx.config.copy.split_by, tid_range_scans);
        let key_split = if by_key {
            plan::key_split(source, table, count).await?
        } else {
            None
        };
        let cuts = key_split.as_ref().map(|(_, cuts)| cuts.as_slice());
        let chunks = match whole_for_its_keys {
            true => vec![ChunkRange::Whole],
            false => plan::plan_chunks(
                table,
                u64::try_from(blocks).unwrap_or(0),
                split,
                tid_range_scans,
                &layout.leaves,
                cuts,
            ),
        };
        let split_by = match chunks.first() {
            Some(ChunkRange::Keys { .. }) => "primary key",
            Some(ChunkRange::Blocks { .. }) => "ctid",
            Some(ChunkRange::Leaf { .. }) => "partition",
            _ if count > 1 && whole_for_its_keys => "whole: its rows refer to its own rows, and the target checks foreign keys as rows arrive",
            _ if count > 1 && !tid_range_scans => "whole: no TID range scans before PostgreSQL 14, and no single-column integer primary key",
            _ => "whole",
        };
        layout.split_key = key_split.map(|(column, _)| column);
        empty_target_table(ctx, &target, &layout, records.get(&table.name)).await?;
        let record = TableRecord {
            name: table.name.clone(),
            oid: Some(table.oid),
            generation,
            sync_lsn,
            chunks: chunks.clone(),
            finished: false,
            rows: 0,
            bytes: 0,
        };
        // Recorded before any row lands: a later start knows rows may be there.
        state::save_table(&ctx.store, &record)?;
        progress[*index].reset_to(0, 0);
        let table_bytes = u64::try_from(table.size_bytes).unwrap_or(0);
        for (chunk, range) in chunks.iter().enumerate() {
            jobs.push(Job {
                table: layouts.len(),
                chunk,
                range: *range,
                weight: plan::chunk_weight(&layout, table_bytes, &chunks, *range),
                waits_for_references: None,
            });
        }
        remaining.push(AtomicUsize::new(chunks.len()));
        round_records.push(Mutex::new(record));
        round_progress.push(progress[*index].clone());
        layouts.push(layout);
        tracing::info!(
            table = %table.name,
            chunks = chunks.len(),
            format = if layouts.last().is_some_and(|l| l.binary) { "binary" } else { "text" },
            split_by,
            generation,
            "planned"
        );
    }
    drop(target);
    // Largest first: the long chunks start early and the small ones fill the gaps.
    jobs.sort_by_key(|job| std::cmp::Reverse(job.weight));
    let workers = ctx.config.copy.jobs.max(1).min(jobs.len());
    let round = Arc::new(Round {
        store: ctx.store.clone(),
        status: ctx.status.clone(),
        source_conn: ctx.config.source.conn.clone(),
        target_conn: ctx.config.target.conn.clone(),
        snapshot: snapshot.to_string(),
        generation,
        layouts,
        records: round_records,
        remaining,
        progress: round_progress,
        queue: Mutex::new(jobs.into()),
        references,
        checks_foreign_keys,
        chunks_finished: AtomicUsize::new(0),
        chunks_running: AtomicUsize::new(0),
        chunk_ended: tokio::sync::Notify::new(),
        copied: copied.clone(),
        set_aside: Mutex::new(Vec::new()),
    });
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        set.spawn(work(round.clone()));
    }
    while let Some(joined) = set.join_next().await {
        let result = joined.map_err(|e| {
            Error::definite(format!(
                "A copy worker stopped unexpectedly ({e}): this is a bug in sluice; restart to resume the copy"
            ))
        });
        if let Err(e) | Ok(Err(e)) = result {
            // The others' open target transactions roll back when their tasks end.
            set.abort_all();
            return Err(e);
        }
    }
    // Every other table is copied; the ones set aside need a fresh snapshot: the next
    // round (only they are unfinished) takes one, empties them and copies them again.
    let set_aside = std::mem::take(&mut *round.set_aside.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some((_, why)) = set_aside.into_iter().next() {
        return Err(why);
    }
    Ok(())
}

/// For each table of the round: the other tables of the round its foreign keys on the target
/// refer to, and whether one refers to the table itself (partitions counted as their
/// partitioned table, as the round names them).
async fn foreign_key_references(
    target: &Client,
    tables: &[&TableName],
) -> Result<(Vec<Vec<usize>>, Vec<bool>)> {
    let names: Vec<String> = tables.iter().map(|name| name.quoted()).collect();
    let rows = target
        .query(
            "WITH round AS (
                 SELECT n - 1 AS i, to_regclass(name) AS oid
                 FROM unnest($1::text[]) WITH ORDINALITY AS u(name, n))
             SELECT DISTINCT referencing.i::int4, referenced.i::int4
             FROM pg_constraint c
             JOIN round referencing
               ON referencing.oid = COALESCE(pg_partition_root(c.conrelid), c.conrelid)
             JOIN round referenced
               ON referenced.oid = COALESCE(pg_partition_root(c.confrelid), c.confrelid)
             WHERE c.contype = 'f'",
            &[&names],
        )
        .await
        .map_err(|e| {
            error::pg(
                "Reading the foreign keys between the copied tables on the target",
                e,
            )
        })?;
    let mut references = vec![Vec::new(); tables.len()];
    let mut self_referencing = vec![false; tables.len()];
    for row in rows {
        let (from, to): (i32, i32) = (row.get(0), row.get(1));
        let (Ok(from), Ok(to)) = (usize::try_from(from), usize::try_from(to)) else {
            continue;
        };
        if from == to {
            if let Some(flag) = self_referencing.get_mut(from) {
                *flag = true;
            }
        } else if let Some(list) = references.get_mut(from) {
            list.push(to);
        }
    }
    Ok((references, self_referencing))
}

/// Empties, in one TRUNCATE, the target tables an earlier attempt may have left rows in
/// (their copy was not finished and its snapshot is gone). One statement, because a foreign
/// key between two of them makes TRUNCATE refuse either table alone. Never CASCADE: that
/// would empty tables outside the copy.
async fn empty_target_tables(target: &Client, names: &[&TableName]) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let quoted: Vec<String> = names.iter().map(|name| name.quoted()).collect();
    // ONLY keeps inheritance children out; a partitioned table refuses it (its partitions
    // are its rows).
    let rows = target
        .query(
            "SELECT n, c.relkind = 'p' FROM unnest($1::text[]) AS n
             LEFT JOIN pg_class c ON c.oid = to_regclass(n)",
            &[&quoted],
        )
        .await
        .map_err(|e| error::pg("Reading the target tables to empty", e))?;
    let list: Vec<String> = rows
        .iter()
        .map(|row| match row.get::<_, Option<bool>>(1) {
            Some(true) => row.get::<_, String>(0),
            _ => format!("ONLY {}", row.get::<_, String>(0)),
        })
        .collect();
    let shown: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    tracing::info!(
        tables = %crate::source::abbreviate(&shown, 10),
        "emptying the tables on the target: their earlier copy was not finished and its snapshot is gone"
    );
    target
        .batch_execute(&format!("TRUNCATE {}", list.join(", ")))
        .await
        .map_err(|e| {
            error::pg(
                format!("Emptying {} on the target before copying them again (TRUNCATE); a foreign key from another table (one copied already, or one outside the copy: the error's detail names it) refers to one of them: drop that constraint until the copy is done, and create it again after (`sluice schema` defers foreign keys and `run` creates them after the copy)", crate::source::abbreviate(&shown, 10)),
                e,
            )
        })?;
    Ok(())
}

/// Before a table is copied under this round's snapshot its target table must be empty:
/// emptied (by `empty_target_tables`) when an earlier attempt may have left rows, checked
/// otherwise.
async fn empty_target_table(
    ctx: &CopyContext,
    target: &Client,
    layout: &TableLayout,
    earlier: Option<&TableRecord>,
) -> Result<()> {
    let name = &layout.name;
    if earlier.is_some() {
        state::clear_chunks(&ctx.store, name)?;
        return Ok(());
    }
    let has_rows: bool = target
        .query_one(&plan::any_row_sql(layout), &[])
        .await
        .map_err(|e| error::pg(format!("Checking that {name} is empty on the target"), e))?
        .get(0);
    if has_rows {
        return Err(Error::definite(format!(
            "Table {name} already holds rows on the target: the initial copy only writes into empty tables. Empty it (TRUNCATE {}), exclude it in [tables], or set copy.enabled = false",
            name.quoted()
        )));
    }
    Ok(())
}

/// A worker: takes chunks off the queue until it is empty, retrying a failed chunk under the
/// same snapshot on fresh connections.
async fn work(round: Arc<Round>) -> Result<()> {
    let mut worker: Option<Worker> = None;
    while let Some(mut job) = next_job(&round).await? {
        let layout = &round.layouts[job.table];
        let progress = &round.progress[job.table];
        if progress.rows() == 0 {
            round
                .status
                .set_table(&progress.name, TableState::Copying, 0);
        }
        progress.mark_copying();
        let mut attempt = 1;
        let outcome = loop {
            let result = async {
                let connected = match worker.as_mut() {
                    Some(connected) => connected,
                    None => worker
                        .insert(Worker::connect(&round.source_conn, &round.target_conn).await?),
                };
                connected
                    .copy_chunk(layout, job.range, &round.snapshot, progress)
                    .await
            }
            .await;
            match result {
                Ok(done) => break Ok(Some(done)),
                Err(e) => {
                    // A failed chunk leaves its connections mid-transaction: start afresh.
                    worker = None;
                    // Without session_replication_role = replica the target checks foreign
                    // keys as rows arrive, and chunks are copied in parallel in no order of
                    // their references: a chunk whose rows refer to rows another chunk has
                    // not committed yet waits for it, as a loader would order the tables.
                    if e.sqlstate() == Some("23503") {
                        let finished = round.chunks_finished.load(Ordering::Acquire);
                        tracing::info!(
                            chunk = %plan::describe(layout, job.range),
                            "a foreign key on the target refused rows that refer to rows not copied yet; the chunk waits for another one to finish, then is copied again"
                        );
                        job.waits_for_references = Some((finished, e));
                        break Ok(None);
                    }
                    // These need a round under a fresh snapshot, which empties the table and
                    // copies it again from the start; retrying the chunk cannot help (or,
                    // after a COMMIT that may have happened, would copy its rows twice).
                    let snapshot_gone = e.sqlstate() == Some("22023");
                    if !e.is_transient() || snapshot_gone {
                        break Err(e);
                    }
                    // Only this table needs the fresh snapshot: the others go on.
                    if e.has_cause(Cause::TableRewritten) || e.has_cause(Cause::CommitUnknown) {
                        round.set_aside(job.table, e);
                        break Ok(None);
                    }
                    if attempt >= CHUNK_ATTEMPTS {
                        break Err(e.context(format!(
                            "Gave up after {attempt} attempts (check the connections to the source and the target; restarting sluice resumes the copy and keeps the tables already copied)"
                        )));
                    }
                    tracing::warn!(
                        chunk = %plan::describe(layout, job.range),
                        attempt,
                        error = %e.report(),
                        "copying a chunk failed; retrying under the same snapshot"
                    );
                    tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                    attempt += 1;
                }
            }
        };
        let outcome = match outcome {
            Ok(Some(done)) => finish_chunk(&round, &job, done).map(|()| {
                round.chunks_finished.fetch_add(1, Ordering::AcqRel);
            }),
            // Waiting for the rows it refers to: queued again (unless set aside).
            Ok(None) if job.waits_for_references.is_some() && !round.is_set_aside(job.table) => {
                round
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(job);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        round.chunks_running.fetch_sub(1, Ordering::AcqRel);
        round.chunk_ended.notify_waiters();
        outcome?;
    }
    Ok(())
}

/// The next chunk to copy: the first queued one that is not waiting for references, or
/// whose wait may be over (a chunk finished since it was refused). None when the queue is
/// empty. When every queued chunk waits and none is being copied, nothing can supply the
/// rows they refer to: the first refusal is the error.
async fn next_job(round: &Round) -> Result<Option<Job>> {
    loop {
        // Registered before the queue is looked at, so a chunk ending in between still wakes us.
        let ended = round.chunk_ended.notified();
        {
            let mut queue = round.queue.lock().unwrap_or_else(|p| p.into_inner());
            let finished = round.chunks_finished.load(Ordering::Acquire);
            let referenced_copied = |job: &Job| {
                round.references[job.table]
                    .iter()
                    .all(|&t| round.remaining[t].load(Ordering::Acquire) == 0)
            };
            let ready = queue
                .iter()
                .position(|job| match &job.waits_for_references {
                    // Refused once: after the tables it refers to, when they are in this round;
                    // else (rows outside the round, or in its own other chunks) after any end.
                    Some((since, _)) => referenced_copied(job) && finished > *since,
                    // Checked as rows arrive: the tables it refers to are copied first.
                    None => !round.checks_foreign_keys || referenced_copied(job),
                });
            // Held back for tables that are all held back too (foreign keys in a cycle) and
            // nothing running: try one; a refusal then says what is wrong.
            let ready = ready.or_else(|| {
                let idle = round.chunks_running.load(Ordering::Acquire) == 0;
                idle.then(|| {
                    queue
                        .iter()
                        .position(|job| job.waits_for_references.is_none())
                })
                .flatten()
            });
            if let Some(ready) = ready {
                round.chunks_running.fetch_add(1, Ordering::AcqRel);
                return Ok(queue.remove(ready));
            }
            if queue.is_empty() {
                return Ok(None);
            }
            if round.chunks_running.load(Ordering::Acquire) == 0 {
                // Every queued chunk waits (one that does not is always ready).
                let Some(refusal) = queue
                    .iter()
                    .find_map(|job| Some(&job.waits_for_references.as_ref()?.1))
                else {
                    return Err(Error::definite(
                        "The copy's queue holds chunks none of which may start: this is a bug in sluice; restart to resume the copy",
                    ));
                };
                return Err(Error::definite(format!(
                    "{}\nNo chunk still being copied can supply the rows it refers to: they are outside the copy, or the source breaks a foreign key the target has, or two tables refer to each other. The target user may not SET session_replication_role = replica, so the target checks foreign keys during the copy: connect as a superuser or GRANT SET ON PARAMETER session_replication_role to the target user (PostgreSQL 15+), or drop the foreign keys until the copy is done (`sluice schema` defers them)",
                    refusal.report()
                )));
            }
        }
        ended.await;
    }
}

fn finish_chunk(round: &Round, job: &Job, done: ChunkDone) -> Result<()> {
    let layout = &round.layouts[job.table];
    state::save_chunk(
        &round.store,
        &layout.name,
        round.generation,
        job.chunk,
        &done,
    )?;
    let mut record = round.records[job.table]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    record.rows += done.rows;
    record.bytes += done.bytes;
    if round.remaining[job.table].fetch_sub(1, Ordering::AcqRel) == 1 {
        record.finished = true;
        state::save_table(&round.store, &record)?;
        let progress = &round.progress[job.table];
        progress.reset_to(record.rows, record.bytes);
        progress.mark_copied();
        round
            .status
            .set_table(&progress.name, TableState::Copied, record.rows);
        tracing::info!(
            table = %layout.name,
            rows = record.rows,
            bytes = record.bytes,
            "table copied"
        );
        // The builder reads until the copy is over (even after a failure of its own).
        let _ = round.copied.send(layout.name.quoted());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_slot_names_stay_valid_slot_names() {
        assert_eq!(sync_slot_name("sluice", 3), "sluice_sync_3");
        let long = sync_slot_name(&"s".repeat(63), 12);
        assert_eq!(long.len(), 63);
        assert!(crate::source::slot::validate_slot_name(&long).is_ok());
    }

    fn record(name: &str, finished: bool) -> TableRecord {
        TableRecord {
            name: TableName::new("public", name),
            oid: None,
            generation: 0,
            sync_lsn: None,
            chunks: Vec::new(),
            finished,
            rows: 0,
            bytes: 0,
        }
    }

    #[test]
    fn only_a_finished_copy_has_tables_to_copy_late() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tables = ["a", "b", "c"].map(|name| SourceTable::keyed(TableName::new("public", name)));
        // No copy (it was off): nothing is copied late.
        assert!(tables_to_copy_late(&store, &tables).unwrap().is_empty());
        let mut copy = CopyState {
            slot: "sluice".into(),
            consistent_point: Lsn(1),
            generation: 0,
            finished: false,
            publication: None,
        };
        state::save_state(&store, &copy).unwrap();
        state::save_table(&store, &record("a", true)).unwrap();
        state::save_table(&store, &record("b", false)).unwrap();
        // A copy under way takes its unfinished tables itself.
        assert!(tables_to_copy_late(&store, &tables).unwrap().is_empty());
        copy.finished = true;
        state::save_state(&store, &copy).unwrap();
        // b was killed in a late copy; c was selected since.
        assert_eq!(
            tables_to_copy_late(&store, &tables).unwrap(),
            vec![TableName::new("public", "b"), TableName::new("public", "c")]
        );
    }
}
