//! `sluice run`: the supervisor around one streaming pipeline.
//!
//! ```text
//!  start-up checks ─▶ publication ─▶ slot ─▶ positions (target row = authority)
//!        │
//!        ▼
//!  ┌─ pipeline ──────────────────────────────────────────────────────────────┐
//!  │ replication session ─▶ Reader (decode, skip applied) ─▶ Applier ─▶ target │
//!  │        ▲                                                   │             │
//!  │        └────────────── acknowledgements (watch) ◀──────────┘             │
//!  └──────────────────────────────────────────────────────────────────────────┘
//!        │ error
//!        ▼
//!  transient → back off with jitter, rebuild everything, resume from the target's position
//!  apply     → replay the failed range in strict mode; if it fails again: stalled, retry slowly
//!  definite  → stop, exit 1
//! ```
//!
//! Every (re)start reads the position from the target again: whatever happened before (a
//! crash, a lost connection, a restarted server), the target's row says what it holds.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use crate::apply::{Applier, ApplyOptions, Progress, TargetClients};
use crate::checkpoint::{self, Identity, Position, ServerIdentity, Store};
use crate::config::Config;
use crate::control::status::unix_now;
use crate::control::{DaemonState, SharedStatus};
use crate::error::{self, Error, ErrorKind, Result};
use crate::lsn::Lsn;
use crate::snapshot;
use crate::source::replication::{self, with_timeout};
use crate::source::slot::slot_info;
use crate::source::stream::Reader;
use crate::source::{quote_ident, selected_tables, SourceTable, TableName};
use crate::tls;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Runs until SIGINT/SIGTERM (Ok) or a definite error (Err).
pub async fn run(config: Config, options: RunOptions) -> Result<()> {
    let status = SharedStatus::new(&config.source.slot);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let stopping = status.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested: finishing the open target transaction");
        // From now on nothing is brought up to date: a `cutover` asking in this window
        // must not take the daemon for streaming (it would freeze the source for nothing).
        stopping.update(|s| s.state = DaemonState::Stopped);
        let _ = shutdown_tx.send(true);
    });
    // A `sluice status` reading the checkpoint holds it for a moment: wait that out, and
    // still hear a stop request meanwhile.
    let Some(store) = unless_stopped(
        &shutdown,
        Store::open_waiting(&config.state.dir, std::time::Duration::from_secs(5)),
        "stop requested while waiting for the state dir; nothing was started",
    )
    .await?
    else {
        return Ok(());
    };
    // A stop reason from an earlier run no longer holds.
    store.save_stopped_on(None)?;
    let claimed_before = store.identity()?.is_some();
    let state_dir = std::fs::canonicalize(&config.state.dir).unwrap_or(config.state.dir.clone());
    match claimed_before {
        true => tracing::info!(state_dir = %state_dir.display(), "state dir"),
        // The target's position row is the authority, so a new state dir resumes correctly;
        // said anyway, since a relative state.dir follows the working directory.
        false => {
            tracing::info!(state_dir = %state_dir.display(), "state dir (new: nothing recorded yet)")
        }
    }
    // What the state dir knows, shown from the start: a daemon still connecting (a source
    // that is down) would otherwise report the migration's counts as 0. The target's
    // position replaces these once it is read.
    if let Some(position) = store.position()? {
        status.update(|s| {
            s.applied_transactions = position.applied_transactions;
            s.applied_changes = position.applied_changes;
            s.applied_lsn.get_or_insert(position.applied_lsn);
            s.caught_up_lsn.get_or_insert(position.caught_up_lsn);
        });
    }
    // Held for the daemon's lifetime: dropping it stops the server and removes the socket.
    let _socket = crate::control::socket::serve(&config.state.dir, status.clone())?;
    let metrics = match options.metrics_addr {
        Some(addr) => Some(crate::control::metrics::serve(addr, status.clone())?),
        None => None,
    };
    // The monitor samples the slot (lag, retained WAL) and only ever returns a definite
    // error: the slot was invalidated or dropped under us.
    let result = tokio::select! {
        result = supervise(&config, &store, &status, shutdown) => result,
        result = crate::control::monitor::run(&config, status.clone(), store.clone()) => result,
    };
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    status.update(|s| {
        s.state = DaemonState::Stopped;
        if let Err(error) = &result {
            s.last_error = Some(error.report());
        }
    });
    // A first start refused before anything was recorded (a missing target table, a
    // refused publication) does not bind the state dir to this slot and source: a
    // corrected config may name another.
    if result.is_err()
        && !claimed_before
        && store.position()?.is_none()
        && snapshot::state::load_state(&store)?.is_none()
    {
        let _ = store.release_claim();
    }
    // `status` with the daemon down shows why it stopped: an error, or the stall it was
    // stopped in.
    let report = status.snapshot();
    let stalled_on = report.stalled_since.and(report.last_error);
    let reason = match (&result, stalled_on) {
        (Err(error), _) => Some(error.report()),
        (Ok(()), Some(stall)) => Some(format!("a stop request while apply was stalled: {stall}")),
        (Ok(()), None) => None,
    };
    if let Err(e) = store.save_stopped_on(reason.as_deref()) {
        tracing::warn!(error = %e.report(), "could not record the stop reason in the state dir");
    }
    result
}

/// Validates the deferred foreign keys created NOT VALID once apply has caught up to
/// `after` (`cutover::schema::validate_deferred_foreign_keys`). A key that does not hold is
/// an error in the log and a warning in `status`; streaming goes on.
async fn validate_foreign_keys_when_caught_up(
    target: crate::conninfo::ConnInfo,
    status: SharedStatus,
    after: Lsn,
) {
    while status
        .snapshot()
        .caught_up_lsn
        .is_none_or(|lsn| lsn < after)
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let result = async {
        let client = tls::connect(&target, "the target").await?;
        crate::cutover::schema::validate_deferred_foreign_keys(&client).await
    }
    .await;
    match result {
        Ok(problems) => {
            for problem in problems {
                tracing::error!("{problem}");
                status.update(|s| s.warnings.push(problem));
            }
        }
        Err(error) => tracing::warn!(
            error = %error.report(),
            "could not validate the foreign keys created NOT VALID after the copy; the next start tries again"
        ),
    }
}

/// How long a stop waits for the open target transaction before cancelling its statement.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// SIGTERM or SIGINT (Ctrl-C), whichever comes first.
pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Exponential backoff with full jitter.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    fn step(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let jittered = ceiling.as_secs_f64() * (0.5 + fastrand::f64() / 2.0);
        Duration::from_secs_f64(jittered)
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

async fn supervise(
    config: &Config,
    store: &Store,
    status: &SharedStatus,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut retry = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut stall_retry = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
    let mut strict_through: Option<Lsn> = None;
    let mut stalled_since: Option<Instant> = None;
    // The tables selected at this daemon's first pipeline run (see `run_pipeline`).
    let mut selection: Option<BTreeSet<TableName>> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let progress = Arc::new(Progress::default());
        let started = Instant::now();
        let mut caught_up_before = None;
        status.update(|s| caught_up_before = s.caught_up_lsn);
        let outcome = pipeline(
            config,
            store,
            status,
            shutdown.clone(),
            strict_through,
            progress.clone(),
            &mut selection,
        )
        .await;
        let error = match outcome {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        status.update(|s| {
            *s.errors_by_kind
                .entry(error.kind().as_str().to_string())
                .or_default() += 1;
            s.last_error = Some(error.report());
        });
        // A pipeline that ran a while, or committed something on the target, before failing
        // starts its backoff afresh: after a server restart that went well, the next outage
        // is a new one (growing across them, a restart a minute later waited 20 s after the
        // server was back). Failing again before anything commits still backs off.
        let mut caught_up_after = None;
        status.update(|s| caught_up_after = s.caught_up_lsn);
        if started.elapsed() > Duration::from_secs(60) || caught_up_after > caught_up_before {
            retry.reset();
        }
        let wait = match error.kind() {
            ErrorKind::Transient => {
                // Nothing is applied until the pipeline is back: not `streaming` meanwhile
                // (last_error says why). A stall stays a stall.
                status.update(|s| {
                    if matches!(s.state, DaemonState::Streaming | DaemonState::Copying) {
                        s.state = DaemonState::Starting;
                    }
                });
                let wait = retry.step();
                tracing::warn!("{}; retrying in {:.1}s", error.report(), wait.as_secs_f64());
                wait
            }
            ErrorKind::Apply => {
                let seen = Lsn(progress.seen_final_lsn.load(Ordering::Relaxed));
                if strict_through.is_none_or(|through| through < seen) {
                    tracing::warn!(
                        "{}; the failed target transaction may have grouped several source transactions (the LSN above may be a later one than that of the change at fault): replaying those through {seen} one by one, in source order, to name it",
                        error.report()
                    );
                    strict_through = Some(seen);
                    // Apply is not moving until the replay shows otherwise: said at once (a
                    // replay of a large transaction takes a while), cleared by its first
                    // commit, counted on by the stall that names the change.
                    let mut cleared = false;
                    status.update(|s| cleared = s.stalled_since.is_none());
                    if cleared {
                        stalled_since = None;
                        stall_retry.reset();
                    }
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    status.update(|s| {
                        s.state = DaemonState::Stalled;
                        s.stalled_since = Some(unix_now() - since.elapsed().as_secs_f64());
                    });
                    Duration::ZERO
                } else {
                    // Apply committed since the last stall (which clears the status's
                    // stall): this is a new stall, counted and backed off afresh.
                    let mut cleared = false;
                    status.update(|s| cleared = s.stalled_since.is_none());
                    if cleared && stalled_since.is_some() {
                        stalled_since = None;
                        stall_retry.reset();
                    }
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    let wait = stall_retry.step();
                    tracing::error!(
                        "apply stalled: {}. The slot is kept and retains WAL; fix the target and sluice continues by itself (next try in {:.0}s)",
                        error.report(),
                        wait.as_secs_f64()
                    );
                    status.update(|s| {
                        s.state = DaemonState::Stalled;
                        // Counted from here on every report (`SharedStatus::snapshot`).
                        s.stalled_since = Some(unix_now() - since.elapsed().as_secs_f64());
                    });
                    // Kept in the state dir, so `status` with the daemon down (killed, or
                    // stopped while stalled) still says what it was stuck on.
                    if let Err(e) = store.save_stopped_on(Some(&format!(
                        "apply stalled (the last stall of that run; it may have cleared before the daemon ended): {}",
                        error.report()
                    ))) {
                        tracing::debug!(error = %e.report(), "could not record the stall in the state dir");
                    }
                    wait
                }
            }
            _ => return Err(error),
        };
        if !sleep_or_shutdown(wait, shutdown.clone()).await {
            return Ok(());
        }
        if error.kind() != ErrorKind::Apply {
            stalled_since = None;
        }
    }
}

/// A source user without the right to replicate gets its refusal before the publication is
/// created (it was left behind by a start that failed only at the slot).
async fn refuse_a_user_that_may_not_replicate(source: &Client) -> Result<()> {
    let row = source
        .query_one(
            "SELECT r.rolsuper OR r.rolreplication
                    OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'rds_replication')
                        AND pg_catalog.pg_has_role('rds_replication', 'MEMBER')),
                    current_user::text
             FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| error::pg("Reading the source user's replication right", e))?;
    if row.get::<_, bool>(0) {
        return Ok(());
    }
    let name: String = row.get(1);
    let (shown, user) = (crate::source::display_ident(&name), quote_ident(&name));
    Err(Error::definite(format!(
        "The source user {shown} may not replicate, so no slot can be created or read: ALTER ROLE {user} REPLICATION (RDS: GRANT rds_replication TO {user}), then start sluice run again"
    )))
}

/// A slot to create where none is free is refused before the publication is created (it
/// was left behind by a start that failed only at the slot).
async fn refuse_a_new_slot_without_room(source: &Client, slot: &str) -> Result<()> {
    let row = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1),
                    (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int4,
                    current_setting('max_replication_slots')::int4",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg("Reading the source's replication slots", e))?;
    let (exists, used, max): (bool, i32, i32) = (row.get(0), row.get(1), row.get(2));
    if exists || used < max {
        return Ok(());
    }
    Err(Error::definite(format!(
        "No free replication slot on the source for slot {slot} (max_replication_slots = {max}, {used} in use): drop an unused slot (pg_drop_replication_slot) or raise max_replication_slots and restart the source, then start sluice run again"
    )))
}

/// Sleeps unless shutdown comes first; `false` means shut down.
async fn sleep_or_shutdown(wait: Duration, mut shutdown: watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.changed() => false,
    }
}

/// Creates the publication for the selected tables when missing; an existing one must
/// publish every selected table.
pub async fn ensure_publication(
    source: &Client,
    publication: &str,
    tables: &[SourceTable],
    forget_copies: &dyn Fn(&[String]) -> Result<Vec<String>>,
) -> Result<()> {
    if tables.is_empty() {
        return Err(Error::config(
            "No source table matches [tables] include/exclude: nothing to replicate",
        ));
    }
    let Some(missing) = unpublished_tables(source, publication, tables).await? else {
        return create_publication(source, publication, tables).await;
    };
    // Tables left out since the copy (while sluice was stopped): their changes meanwhile
    // were never sent. Put back, they would stream on from now without them, so their
    // copies are forgotten and the next start copies them afresh, as the monitor does
    // when this happens while streaming.
    let then = |names: &[String]| -> Result<String> {
        let forgotten = forget_copies(names)?;
        Ok(match forgotten.is_empty() {
            false => format!(
                " Their changes while left out were not sent: sluice forgot its copies of {}, so once the publication is mended, empty them on the target (TRUNCATE) and start sluice run again; it copies them afresh before streaming resumes (a table selected since the copy is simply copied)",
                forgotten.join(", ")
            ),
            true => String::new(),
        })
    };
    if !missing.is_empty() {
        let dropped: Vec<String> = missing
            .iter()
            .filter(|t| !t.needs_partition_root)
            .map(|t| t.name.clone())
            .collect();
        let then = if dropped.is_empty() {
            String::new()
        } else {
            then(&dropped)?
        };
        return Err(Error::definite(format!(
            "{}.{then}",
            unpublished_message(publication, &missing)
        )));
    }
    if let Some(message) = unpublished_operations_message(source, publication).await? {
        let every: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
        return Err(Error::definite(format!("{message}.{}", then(&every)?)));
    }
    Ok(())
}

/// An existing publication that leaves out some operations (`WITH (publish = 'insert')`)
/// would silently leave the target with rows the source deleted or emptied: named, with the
/// fix. `None` when it publishes all four (or does not exist).
pub async fn unpublished_operations_message(
    source: &Client,
    publication: &str,
) -> Result<Option<String>> {
    let row = source
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| error::pg("Reading the publication's operations on the source", e))?;
    let Some(row) = row else { return Ok(None) };
    let left_out: Vec<&str> = ["insert", "update", "delete", "truncate"]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !row.get::<_, bool>(*i))
        .map(|(_, op)| op)
        .collect();
    if left_out.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "Publication {publication} does not publish {}: those changes would never reach the target, which would silently drift from the source. ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate') on the source",
        left_out.join(", "),
        quote_ident(publication)
    )))
}

/// A selected table an existing publication does not publish the way sluice needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishedTable {
    pub name: String,
    /// A partitioned table whose changes the publication sends under each partition's name
    /// (no `publish_via_partition_root`): adding the table would not help.
    pub needs_partition_root: bool,
}

/// What to say about selected tables an existing publication does not publish. Only the
/// tables really missing get `ADD TABLE` advice: a `FOR ALL TABLES` publication has none
/// (PostgreSQL refuses ADD TABLE on it), only partitioned tables published per partition.
pub fn unpublished_message(publication: &str, missing: &[UnpublishedTable]) -> String {
    let quoted = quote_ident(publication);
    let names: Vec<String> = missing
        .iter()
        .map(|t| {
            if t.needs_partition_root {
                format!(
                    "{} (published partition by partition: ALTER PUBLICATION {quoted} SET (publish_via_partition_root = true))",
                    t.name
                )
            } else {
                t.name.clone()
            }
        })
        .collect();
    let advice = if missing.iter().any(|t| !t.needs_partition_root) {
        format!(
            "Add them (ALTER PUBLICATION {publication} ADD TABLE ...; with copy.enabled, the next start copies their rows before streaming resumes) or exclude them in [tables]"
        )
    } else {
        "Change the publication as shown, or exclude them in [tables]".to_string()
    };
    format!(
        "Publication {publication} does not publish these selected tables: {}. {advice}",
        names.join(", ")
    )
}

/// The selected tables that publication does not publish, or `None` when it does not exist.
/// A partitioned table counts as unpublished unless the publication publishes through the
/// root (`publish_via_partition_root`): otherwise its changes arrive under each partition's
/// name, which the target need not have.
pub async fn unpublished_tables(
    source: &Client,
    publication: &str,
    tables: &[SourceTable],
) -> Result<Option<Vec<UnpublishedTable>>> {
    let via_root: Option<bool> = source
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| error::pg("Looking up the publication on the source", e))?
        .map(|row| row.get(0));
    let Some(via_root) = via_root else {
        return Ok(None);
    };
    let rows = source
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| error::pg("Reading the publication's tables on the source", e))?;
    let published: std::collections::HashSet<(String, String)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(Some(
        tables
            .iter()
            .filter(|t| !published.contains(&(t.name.schema.clone(), t.name.name.clone())))
            .map(|t| UnpublishedTable {
                name: t.name.to_string(),
                needs_partition_root: t.is_partitioned && !via_root,
            })
            .collect(),
    ))
}

/// Creates the publication for the selected tables, refusing tables whose UPDATE and DELETE
/// publishing would break on the source.
async fn create_publication(
    source: &Client,
    publication: &str,
    tables: &[SourceTable],
) -> Result<()> {
    // Publishing a table without a replica identity makes every UPDATE and DELETE on it
    // fail on the source itself: sluice must not break the application it migrates.
    // A partitioned table's partitions are checked by their own identity, not the root's.
    let unmatched: Vec<String> = tables
        .iter()
        .filter(|t| t.lacks_identity())
        .map(|t| t.name.to_string())
        .chain(tables.iter().flat_map(|t| {
            t.partitions_without_identity
                .iter()
                .map(move |p| format!("{p} (a partition of {})", t.name))
        }))
        .collect();
    if !unmatched.is_empty() {
        return Err(Error::definite(format!(
            "These selected tables have no primary key and no replica identity usable here: {}. Publishing them would make every UPDATE and DELETE on them fail on the source (or, for a partition of a REPLICA IDENTITY FULL table that is not FULL itself, send old rows that cannot be matched). Give each a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX) on it (for a partition: on the partition itself), or exclude the (partitioned) table in [tables]",
            unmatched.join(", ")
        )));
    }
    let statement = create_publication_sql(publication, tables);
    if let Some(problem) = publication_privilege_problem(source, tables).await? {
        return Err(Error::definite(publication_privilege_message(
            publication,
            tables,
            &problem,
        )));
    }
    source.batch_execute(&statement).await.map_err(|e| {
        error::pg(
            format!("Creating publication {publication} on the source"),
            e,
        )
    })?;
    tracing::info!(
        publication,
        tables = tables.len(),
        "created the publication"
    );
    Ok(())
}

fn create_publication_sql(publication: &str, tables: &[SourceTable]) -> String {
    // ONLY: a table named without it brings its inheritance children into the publication,
    // and a child excluded in [tables] would then stream changes nobody selected. (A
    // partitioned table always brings its partitions, published through it.)
    let list: Vec<String> = tables
        .iter()
        .map(|t| match t.is_partitioned {
            true => t.name.quoted(),
            false => format!("ONLY {}", t.name.quoted()),
        })
        .collect();
    format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
        quote_ident(publication),
        list.join(", ")
    )
}

/// Why the source user may not create the publication itself, `None` when it may: CREATE
/// PUBLICATION ... FOR TABLE needs CREATE on the database and ownership of every table
/// (membership in the owning role will do), unless the user is a superuser.
pub async fn publication_privilege_problem(
    source: &Client,
    tables: &[SourceTable],
) -> Result<Option<String>> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let row = source
        .query_one(
            "SELECT r.rolsuper, has_database_privilege(current_database(), 'CREATE'),
                    current_user::text, current_database()::text,
                    ARRAY(SELECT format('%I.%I', n.nspname, c.relname)
                          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE c.oid = ANY($1::oid[]) AND NOT pg_has_role(c.relowner, 'USAGE')
                          ORDER BY 1)
             FROM pg_roles r WHERE r.rolname = current_user",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg("Checking who may create the publication on the source", e))?;
    let (superuser, may_create, user, database): (bool, bool, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let not_owned: Vec<String> = row.get(4);
    if superuser {
        return Ok(None);
    }
    let mut problems = Vec::new();
    if !may_create {
        problems.push(format!("{user} lacks CREATE on database {database}"));
    }
    if !not_owned.is_empty() {
        problems.push(format!(
            "{user} does not own {} of the selected tables ({})",
            not_owned.len(),
            crate::source::abbreviate(&not_owned, 5)
        ));
    }
    Ok((!problems.is_empty()).then(|| problems.join(", and ")))
}

/// What to do when the source user may not create the publication.
pub fn publication_privilege_message(
    publication: &str,
    tables: &[SourceTable],
    problem: &str,
) -> String {
    format!(
        "Publication {publication} does not exist and sluice may not create it: {problem} (CREATE PUBLICATION needs CREATE on the database and ownership of every published table). Have the tables' owner or a superuser run `{}` on the source (sluice uses an existing publication that publishes every selected table), or GRANT CREATE and the owning role to this user; then start again",
        create_publication_sql(publication, tables)
    )
}

/// Runs `work` unless a stop request comes first; then says `on_stop` and returns `None`
/// (dropping `work`, which closes its connections).
async fn unless_stopped<T>(
    shutdown: &watch::Receiver<bool>,
    work: impl std::future::Future<Output = Result<T>>,
    on_stop: &str,
) -> Result<Option<T>> {
    let mut stop = shutdown.clone();
    tokio::select! {
        done = work => done.map(Some),
        _ = stop.changed() => {
            tracing::info!("{on_stop}");
            Ok(None)
        }
    }
}

/// What to do when the slot can no longer supply every change since the target's position.
/// A migration under way (its slot exists, and this state dir or the target knows it) whose
/// publication is missing: created now, it would not exist for the changes the slot still
/// holds (logical decoding reads publications as of each change), so streaming would fail on
/// the first of them, and say it was dropped. Most often `source.publication` was changed
/// between runs: refused before anything is created, naming the publications there are.
async fn refuse_a_publication_newer_than_the_slot(
    source: &Client,
    target: &Client,
    store: &Store,
    slot: &str,
    config: &Config,
) -> Result<()> {
    let publication = &config.source.publication;
    let publications: Vec<String> = source
        .query("SELECT pubname::text FROM pg_publication ORDER BY 1", &[])
        .await
        .map_err(|e| error::pg("Listing the source's publications", e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if publications.contains(publication) {
        return Ok(());
    }
    let Some(slot_now) = slot_info(source, slot).await? else {
        return Ok(());
    };
    let under_way = store.position()?.is_some()
        || snapshot::state::load_state(store)?.is_some()
        || checkpoint::read_target_position(target, slot)
            .await?
            .is_some();
    if !under_way {
        return Ok(());
    }
    let from = slot_now
        .confirmed_flush_lsn
        .map(|lsn| format!(" (from {lsn})"))
        .unwrap_or_default();
    let existing = match publications.is_empty() {
        true => "there is none on the source now".to_string(),
        false => format!("the source has {}", publications.join(", ")),
    };
    Err(Error::definite(format!(
        "Publication {} does not exist on the source, but slot {slot} of this migration resumes streaming{from}: a publication created now would not exist for the changes the slot still holds (logical decoding reads publications as of each change), so streaming would fail on the first of them. If source.publication was changed since the last run, set it back to the publication this migration streams through ({existing}). If the publication was dropped, the changes it published since are lost to this slot: {FRESH_COPY}",
        crate::source::display_ident(publication)
    )))
}

pub const FRESH_COPY: &str = "A fresh copy is needed: with sluice stopped, run `sluice teardown` (it drops the slot, the publication, sluice's schema on the target and the state dir's checkpoint), empty the target tables (or recreate them with `sluice schema`), then `sluice run` copies again";

/// Takes the migration's lock on the target: a session-level advisory lock named after the
/// slot (the target's `sluice.applied_position` is keyed by slot too), held by a session of
/// its own for as long as the pipeline runs. A second daemon with another state dir on the
/// same slot (started beside the first, or taking over while the first still stops) would
/// otherwise copy the tables a second time, or apply from a position the first has since
/// moved past: both double rows. It waits instead (a transient error, retried). The session
/// tells the server to notice a vanished host within about a minute, so a daemon moved to
/// another machine after a crash does not wait for the kernel's two-hour default.
async fn lock_migration(config: &Config) -> Result<tokio_postgres::Client> {
    let slot = &config.source.slot;
    let client = tls::connect(&config.target.conn, "the target").await?;
    let _ = client
        .batch_execute(
            "SET tcp_keepalives_idle = 20; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 4",
        )
        .await;
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            &[&format!("sluice slot {slot}")],
        )
        .await
        .map_err(|e| error::pg("Taking the migration's lock on the target", e))?
        .get(0);
    if !locked {
        return Err(Error::transient(format!(
            "Another sluice process is running this migration (slot {slot}) against this target, with another state dir: it holds the migration's lock on the target. sluice waits until it stops; if it should not run, stop that process (its session on the target: SELECT pid, client_addr FROM pg_locks JOIN pg_stat_activity USING (pid) WHERE locktype = 'advisory' AND granted; ending only that session makes it stop and start again, not go away)"
        )));
    }
    Ok(client)
}

/// One run of the pipeline, from connecting to the first error (or shutdown).
async fn pipeline(
    config: &Config,
    store: &Store,
    status: &SharedStatus,
    shutdown: watch::Receiver<bool>,
    strict_through: Option<Lsn>,
    progress: Arc<Progress>,
    selection: &mut Option<BTreeSet<TableName>>,
) -> Result<()> {
    // One daemon per migration, for as long as this run lasts. Should the lock's session
    // end (terminated on the target, or its connection lost), what runs is stopped as on a
    // stop request and the run starts again, taking the lock anew: going on without it
    // would let a second daemon copy or apply beside this one.
    let lock = lock_migration(config).await?;
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (inner_tx, inner_rx) = watch::channel(*shutdown.borrow());
    let watcher = tokio::spawn(watch_lock(lock, shutdown, inner_tx, lost.clone()));
    let result = run_pipeline(
        config,
        store,
        status,
        inner_rx,
        strict_through,
        progress,
        selection,
    )
    .await;
    watcher.abort();
    if lost.load(Ordering::SeqCst) {
        return Err(Error::transient(
            "The session holding this migration's lock on the target ended (terminated, or its connection lost): what ran was stopped, and sluice starts again, taking the lock anew",
        ));
    }
    result
}

/// Passes a stop request on, and stops the run when the lock's session ends.
async fn watch_lock(
    lock: tokio_postgres::Client,
    mut shutdown: watch::Receiver<bool>,
    inner: watch::Sender<bool>,
    lost: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    let _ = inner.send(true);
                    return;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if lock.is_closed() {
                    tracing::warn!("the session holding this migration's lock on the target ended: stopping to take it again");
                    lost.store(true, Ordering::SeqCst);
                    let _ = inner.send(true);
                    return;
                }
            }
        }
    }
}

/// One run of the pipeline under the migration's lock.
async fn run_pipeline(
    config: &Config,
    store: &Store,
    status: &SharedStatus,
    shutdown: watch::Receiver<bool>,
    strict_through: Option<Lsn>,
    progress: Arc<Progress>,
    selection: &mut Option<BTreeSet<TableName>>,
) -> Result<()> {
    let slot = &config.source.slot;
    status.update(|s| {
        if !matches!(s.state, DaemonState::Stalled | DaemonState::Stopped) {
            s.state = DaemonState::Starting
        }
    });
    let source = tls::connect(&config.source.conn, "the source").await?;
    let target = tls::connect(&config.target.conn, "the target").await?;

    // Whose state dir this is, before anything is created on either side: a state dir of
    // another migration must not cost a slot or a publication first.
    let source_server = ServerIdentity::read(&source, "the source").await?;
    let target_server = ServerIdentity::read(&target, "the target").await?;
    if source_server.same_database(&target_server) {
        return Err(Error::definite(format!(
            "source.url ({}) and target.url ({}) reach the same database {} of the same server (system {}): the target must be another database",
            config.source.conn.redacted(),
            config.target.conn.redacted(),
            source_server.database,
            source_server.system.as_deref().unwrap_or_default()
        )));
    }
    let identity = |source_system: &str| Identity {
        source_system_identifier: source_system.to_string(),
        source_database: config.source.conn.dbname.clone(),
        slot: slot.clone(),
        target: checkpoint::target_identity(&config.target.conn, Some(&target_server)),
    };
    // Where the source user may not read pg_control_system(), the replication session's
    // IDENTIFY_SYSTEM below claims it.
    if let Some(system) = &source_server.system {
        store.claim(&identity(system), &config.target.conn)?;
    }

    // The slot is gone, but this state dir copied or streamed from it (after `sluice
    // teardown`, or someone dropped the slot): a new slot would start from now, and the
    // writes since the old one went would never arrive. Refused before anything is created.
    if slot_info(&source, slot).await?.is_none()
        && (snapshot::copy_finished(store)?
            || store
                .position()?
                .is_some_and(|p| p.caught_up_lsn > Lsn::ZERO))
    {
        return Err(Error::definite(format!(
            "Replication slot {slot} is gone from the source, but the state dir {} records a copy or changes streamed from it: a new slot would start from now and the changes since the old one went would be lost. {FRESH_COPY}",
            store.dir().display()
        )));
    }

    // A copy this state dir began and did not finish: streaming without it would leave its
    // tables partly copied for good (a later start with the copy on finds the target's
    // position and never resumes it).
    if !config.copy.enabled {
        if let Some(copy) = snapshot::state::load_state(store)?.filter(|c| !c.finished) {
            let partial: Vec<String> = snapshot::state::load_tables(store)?
                .into_iter()
                .filter(|record| !record.finished)
                .map(|record| record.name.to_string())
                .collect();
            return Err(Error::definite(format!(
                "The state dir {} records an initial copy from slot {} that has not finished{}: with copy.enabled = false sluice would stream into tables missing rows. Set copy.enabled = true to finish it (tables already copied are kept), or start over ({FRESH_COPY})",
                store.dir().display(),
                copy.slot,
                match partial.is_empty() {
                    true => String::new(),
                    false => format!(" ({} not finished)", crate::source::abbreviate(&partial, 10)),
                }
            )));
        }
    }

    let mut tables = selected_tables(&source, &config.tables).await?;
    // This daemon's first pipeline run (not a restart after a lost connection or a stall).
    let first_run = selection.is_none();
    // A restart within this daemon (a lost connection, the one-by-one replay after a
    // refused batch) keeps the tables it started with: a table created since, or one that
    // now matches, is for the next start, which copies it. Picked up here, its checks (not
    // on the target yet, rows there already) turned a stall or a reconnect into an exit.
    match selection {
        Some(first) => {
            let new: Vec<String> = tables
                .iter()
                .filter(|t| !first.contains(&t.name))
                .map(|t| t.name.to_string())
                .collect();
            if !new.is_empty() {
                tracing::info!(
                    tables = new.join(", "),
                    "selected by [tables] but new since this daemon started: the next start copies them"
                );
            }
            tables.retain(|t| first.contains(&t.name));
        }
        None => *selection = Some(tables.iter().map(|t| t.name.clone()).collect()),
    }
    let replaced = snapshot::forget_copies_of_other_tables(store, &tables)?;
    if !replaced.is_empty() {
        let names: Vec<String> = replaced.iter().map(|t| t.to_string()).collect();
        tracing::warn!(
            tables = crate::source::abbreviate(&names, 10),
            "another table than the one copied under each of these names (dropped and created again, or another renamed to it, while sluice was stopped): their copies are forgotten, and each is copied afresh once it is emptied on the target (TRUNCATE), as its rows there are the other table's"
        );
    }
    // Before anything is created on the source: a target whose triggers would rewrite the
    // rows sluice writes is refused, not quietly made to differ.
    let names: Vec<TableName> = tables.iter().map(|t| t.name.clone()).collect();
    if let Some(problem) = crate::apply::target::replica_role(&target, &names)
        .await?
        .trigger_problem()
    {
        return Err(Error::definite(problem));
    }
    // Before the publication is created: a target without the tables cannot take them.
    let name_refs: Vec<&TableName> = names.iter().collect();
    let missing = snapshot::plan::missing_on_target(&target, &name_refs).await?;
    if !missing.is_empty() {
        return Err(Error::definite(format!(
            "{} selected table(s) do not exist on the target: {}. Create the schema first (`sluice schema`), or exclude them in [tables]",
            missing.len(),
            crate::source::abbreviate(&missing, 10)
        )));
    }
    // At the first start a refusal; after, apply stalls on it (`Applier::plan`) and goes on
    // once the target is mended, rather than the daemon ending.
    let generated = match first_run {
        true => snapshot::plan::generated_only_on_source(&source, &target, &name_refs).await?,
        false => Vec::new(),
    };
    if !generated.is_empty() {
        return Err(Error::definite(format!(
            "Generated columns the target would leave empty: {}",
            generated.join("; ")
        )));
    }
    refuse_a_user_that_may_not_replicate(&source).await?;
    refuse_a_new_slot_without_room(&source, slot).await?;
    refuse_a_publication_newer_than_the_slot(&source, &target, store, slot, config).await?;
    // The copy was made for another publication: `source.publication` was changed, and the
    // tables it lacks were never out of this migration's publication. Their copies stay.
    let made_for = snapshot::state::load_state(store)?
        .and_then(|copy| copy.publication)
        .filter(|made_for| *made_for != config.source.publication);
    let published = ensure_publication(
        &source,
        &config.source.publication,
        &tables,
        // Only tables the copy holds have a copy to forget; one never copied is simply
        // copied once published.
        &|names| {
            if made_for.is_some() {
                return Ok(Vec::new());
            }
            let copied: Vec<String> = snapshot::state::load_tables(store)?
                .into_iter()
                .filter(|record| record.finished)
                .map(|record| record.name.to_string())
                .filter(|name| names.contains(name))
                .collect();
            if copied.is_empty() {
                return Ok(copied);
            }
            Ok(
                match crate::control::monitor::forget_copies(config, store, &copied)? {
                    true => copied,
                    false => Vec::new(),
                },
            )
        },
    )
    .await;
    if let (Err(error), Some(made_for)) = (&published, &made_for) {
        return Err(Error::definite(format!(
            "{} Note: this migration's copy was made for publication {}, and source.publication now names {}: if that was not meant, set source.publication back to {} (nothing was forgotten or lost)",
            error.report(),
            crate::source::display_ident(made_for),
            crate::source::display_ident(&config.source.publication),
            crate::source::display_ident(made_for)
        )));
    }
    published?;

    checkpoint::ensure_position_table(&target).await?;
    let target_position = checkpoint::read_target_position(&target, slot).await?;

    if let Some(position) = target_position.as_ref().filter(|_| config.copy.enabled) {
        if snapshot::state::load_state(store)?.is_none() {
            // A table empty on the target while the source has rows was never copied (one
            // published since, while the state dir was gone): copied at this start.
            let names: Vec<&TableName> = tables.iter().map(|t| &t.name).collect();
            let on_target: BTreeSet<String> =
                snapshot::plan::holding_rows_on_target(&target, &names)
                    .await?
                    .into_iter()
                    .collect();
            let on_source: BTreeSet<String> =
                snapshot::plan::holding_rows_on_target(&source, &names)
                    .await?
                    .into_iter()
                    .collect();
            let (taken, not_taken): (Vec<SourceTable>, Vec<SourceTable>) =
                tables.iter().cloned().partition(|t| {
                    let name = t.name.to_string();
                    on_target.contains(&name) || !on_source.contains(&name)
                });
            snapshot::restore_copy_record(
                store,
                slot,
                &config.source.publication,
                position.caught_up_lsn,
                &taken,
            )?;
            let shown = |list: &[SourceTable]| {
                let names: Vec<String> = list.iter().map(|t| t.name.to_string()).collect();
                crate::source::abbreviate(&names, 10)
            };
            tracing::info!(
                taken_as_copied = shown(&taken),
                to_copy = shown(&not_taken),
                applied = %position.applied_lsn,
                "the state dir has no copy record, but the target holds this migration's position: the selected tables are taken as copied, except those empty on the target while the source has rows, which are copied now; a table selected from now on is copied at the start that selects it"
            );
        }
    }
    // The initial copy: unless disabled, or done (sled says so, or the target already holds
    // streamed changes: its position row is the authority).
    let late = if config.copy.enabled {
        snapshot::tables_to_copy_late(store, &tables)?
    } else {
        // What the copy would take: with it off, streamed on from whatever the target holds.
        let stale = snapshot::tables_to_copy_late(store, &tables)?;
        if !stale.is_empty() {
            let names: Vec<String> = stale.iter().map(|t| t.to_string()).collect();
            tracing::warn!(
                tables = crate::source::abbreviate(&names, 10),
                "selected, but not in this migration's copy (selected since it, or left out of [tables] for a while): with copy.enabled = false their changes are applied to whatever rows the target holds; bring them up to date yourself (sluice verify shows what differs), or set copy.enabled = true and empty them (TRUNCATE) to have sluice copy them"
            );
        }
        Vec::new()
    };
    if !late.is_empty() {
        let names: Vec<String> = late.iter().map(|t| t.to_string()).collect();
        tracing::info!(
            tables = names.join(", "),
            "selected since the copy finished: copying them before streaming resumes"
        );
    }
    let mut to_analyze = Vec::new();
    if config.copy.enabled
        && ((target_position.is_none() && !snapshot::copy_finished(store)?) || !late.is_empty())
    {
        use std::io::IsTerminal;
        let context = snapshot::CopyContext {
            config: config.clone(),
            tables: tables.clone(),
            store: store.clone(),
            status: status.clone(),
            progress: std::io::stderr().is_terminal(),
        };
        // A stop request ends the copy at once: only finished chunks are recorded, so the
        // next start resumes where this one was, under a new snapshot if needed.
        let Some(outcome) = unless_stopped(
            &shutdown,
            snapshot::initial_copy(&context),
            "stopping in the middle of the initial copy; the next start resumes it",
        )
        .await?
        else {
            return Ok(());
        };
        tracing::info!(
            tables = outcome.tables_copied,
            rows = outcome.rows,
            consistent_point = %outcome.consistent_point,
            "initial copy finished; streaming from its consistent point"
        );
        to_analyze = if late.is_empty() {
            tables.iter().map(|t| t.name.clone()).collect()
        } else {
            late
        };
    }
    // What `sluice schema` deferred and no copy built (the copy is off: the target was
    // loaded some other way; or `schema` ran again for more tables): before streaming, as
    // apply needs the primary keys. A stop request ends a build at once (hours for a large
    // index otherwise); the server rolls it back, and the next start builds it again.
    let Some(built) = unless_stopped(
        &shutdown,
        crate::cutover::schema::apply_deferred_ddl(&target, Some(status)),
        "stopping while building deferred indexes and constraints; the next start builds the rest",
    )
    .await?
    else {
        return Ok(());
    };
    if built > 0 {
        tracing::info!(
            statements = built,
            "created the deferred indexes and constraints before streaming"
        );
    }
    if !to_analyze.is_empty()
        && unless_stopped(
            &shutdown,
            snapshot::analyze_copied(&target, &to_analyze),
            "stopping while analyzing the copied tables; autovacuum or ANALYZE by hand gives them statistics",
        )
        .await?
        .is_none()
    {
        return Ok(());
    }
    // The state dir's positions, kept on the target too, and the target's for what a lost
    // or restored state dir no longer knows (the state dir's are the later ones).
    let mut table_sync = snapshot::table_sync_positions(store)?;
    checkpoint::save_table_sync(&target, slot, &table_sync).await?;
    for (table, lsn) in checkpoint::load_table_sync(&target, slot).await? {
        table_sync.entry(table).or_insert(lsn);
    }
    // On Citus the position row must commit atomically with distributed writes: as a
    // reference table it makes every apply commit two-phase (docs/citus.md).
    if crate::citus::make_reference_table_if_citus(&target, checkpoint::POSITION_TABLE).await? {
        tracing::info!("made sluice.applied_position a Citus reference table");
    }
    let local_position = store.position()?;

    let slot_state = match slot_info(&source, slot).await? {
        Some(state) => state,
        None if target_position.is_some() => {
            return Err(Error::definite(format!(
                "Replication slot {slot} is gone from the source, but the target holds changes applied from it: the changes since then are lost. {FRESH_COPY}"
            )))
        }

        None => {
            // Another slot's position on this target, that slot still on the source: most
            // likely this migration under its earlier slot name, whose changes since its
            // position a new slot does not have. (Several migrations into one target are
            // allowed, so this is said, not refused.)
            let others = target
                .query(
                    "SELECT slot, applied_lsn::text FROM sluice.applied_position WHERE slot <> $1 ORDER BY slot",
                    &[slot],
                )
                .await
                .map_err(|e| error::pg("Reading sluice.applied_position on the target", e))?;
            for other in &others {
                let other_slot: String = other.get(0);
                if slot_info(&source, &other_slot).await?.is_some() {
                    tracing::warn!(
                        slot,
                        other_slot = %other_slot,
                        other_position = %other.get::<_, String>(1),
                        "the target holds the position of another slot of this source, which still exists: if this migration went on under that slot before (source.slot renamed), the changes since that position are not in the new slot; set source.slot back to it. A second migration into this target may ignore this"
                    );
                }
            }
            let row = source
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[slot],
                )
                .await
                .map_err(|e| error::pg(format!("Creating replication slot {slot}"), e))?;
            tracing::info!(slot, at = row.get::<_, String>(0), "created the replication slot");
            slot_info(&source, slot).await?.ok_or_else(|| {
                Error::transient(format!("Replication slot {slot} vanished right after creation"))
            })?
        }
    };
    if slot_state.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::definite(format!(
            "Replication slot {slot} uses plugin {}, not pgoutput: choose another source.slot, or drop that slot if it is unused",
            slot_state.plugin.as_deref().unwrap_or("(physical)")
        )));
    }
    if slot_state.database.as_deref() != Some(config.source.conn.dbname.as_str()) {
        return Err(Error::definite(format!(
            "Replication slot {slot} belongs to database {}, not {}: choose another source.slot",
            slot_state.database.as_deref().unwrap_or("(none)"),
            config.source.conn.dbname
        )));
    }
    // Only one session can stream from a slot. Said before trying, with who holds it: the
    // server's own refusal names a PID only, and another consumer (a second sluice with its
    // own state dir, a forgotten pg_recvlogical) would keep this one retrying without end.
    if slot_state.active_pid.is_some() {
        if let Some(holder) =
            crate::source::slot::holder_after(&source, slot, Duration::from_secs(3)).await?
        {
            return Err(Error::transient(format!(
                "Replication slot {slot} is in use by another session ({holder}). A sluice that just stopped lets go within the source's wal_sender_timeout, and sluice retries until then; if it is another consumer, stop it (or SELECT pg_terminate_backend(pid) on the source), or give this sluice its own source.slot"
            )));
        }
    }
    if slot_state.wal_status.as_deref() == Some("lost") {
        return Err(Error::definite(format!(
            "Replication slot {slot} was invalidated by the source (wal_status = lost: max_slot_wal_keep_size was exceeded). The WAL it needed is gone. {FRESH_COPY}"
        )));
    }

    // A position the source has not written yet (a row edited by hand, or one of another
    // source): streaming from it would acknowledge it to the slot, which then skips every
    // change up to there, for good.
    if let Some(position) = &target_position {
        let now: String = source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| error::pg("Reading the source's WAL position", e))?
            .get(0);
        let now: Lsn = now.parse().map_err(|_| {
            Error::definite(format!(
                "The source returned an invalid WAL position {now:?}"
            ))
        })?;
        let furthest = position.caught_up_lsn.max(position.applied_lsn);
        if furthest > now {
            return Err(Error::definite(format!(
                "The target's position for slot {slot} in {} ({furthest}) is beyond the source's current WAL position ({now}): it was edited by hand, or belongs to another source. Streaming from it would tell the slot to skip every change up to there. Put the row back as it was (a backup of the target, or the last applied position in sluice's log); otherwise start over. {FRESH_COPY}",
                checkpoint::POSITION_TABLE
            )));
        }
    }
    // The target's row is the authority; the local cache can only be behind it.
    let resume = target_position.as_ref().map(|p| Position {
        applied_lsn: p.applied_lsn,
        caught_up_lsn: p.caught_up_lsn,
        acked_lsn: p
            .caught_up_lsn
            .max(local_position.map(|l| l.acked_lsn).unwrap_or_default()),
        // Counts live in the state dir only: they go on from there.
        applied_transactions: local_position.map_or(0, |l| l.applied_transactions),
        applied_changes: local_position.map_or(0, |l| l.applied_changes),
    });
    if let (Some(resume), Some(confirmed)) = (resume, slot_state.confirmed_flush_lsn) {
        if confirmed > resume.acked_lsn {
            return Err(Error::definite(format!(
                "Replication slot {slot} has confirmed {confirmed}, beyond anything sluice acknowledged ({}): it was recreated or advanced by someone else, and the changes in between are gone. {FRESH_COPY}",
                resume.acked_lsn
            )));
        }
    }
    // Nothing applied on the target yet: the state dir is then the only record, and the slot
    // only ever confirms what it acknowledged (sled first, then the slot). A slot ahead of
    // it is not the one this state dir streamed from: a state dir of an earlier attempt,
    // restored from a backup, whose finished copy would skip this attempt's copy.
    if let (None, Some(confirmed)) = (resume, slot_state.confirmed_flush_lsn) {
        let copy = snapshot::state::load_state(store)?.filter(|c| c.finished);
        let known = local_position
            .map(|p| p.acked_lsn)
            .or(copy.as_ref().map(|c| c.consistent_point));
        if let Some(known) = known.filter(|known| confirmed > *known) {
            return Err(Error::definite(format!(
                "Replication slot {slot} has confirmed {confirmed}, beyond anything the state dir {} records ({known}), and the target holds no position for it: the state dir is from another attempt (restored from a backup?), and its finished copy is not this slot's. Point state.dir at a new empty directory, empty the target tables (TRUNCATE), and start `sluice run` again: it copies them under this slot",
                store.dir().display()
            )));
        }
    }
    // The state dir records applied changes (it is written only after the target's commit
    // that holds the row), yet the target has no row: deleted by hand, or the target was
    // restored or replaced. Resuming from the state dir could apply again what the target
    // holds past it (doubled rows where no key catches them), so the row is asked for.
    if let (None, Some(local)) = (&target_position, local_position) {
        let system = store
            .identity()?
            .map(|identity| identity.source_system_identifier)
            .unwrap_or_else(|| "<source system identifier>".to_string());
        return Err(Error::definite(format!(
            "The target holds no position for slot {slot} in {}, but the state dir {} records changes applied from it (up to at least {}): the row was deleted, or the target was restored or replaced. Streaming on could apply changes a second time. If the target's data is intact, put the row back as it was (from a backup of the target, or the last applied position in sluice's log or `sluice status`), e.g. INSERT INTO {} (slot, source_system_identifier, applied_lsn, caught_up_lsn) VALUES ('{slot}', '{system}', '<lsn>', '<lsn>'); otherwise start over. {FRESH_COPY}",
            checkpoint::POSITION_TABLE,
            store.dir().display(),
            local.caught_up_lsn,
            checkpoint::POSITION_TABLE,
        )));
    }
    let position = resume.unwrap_or_default();

    // The replication session: identify the source, claim the state dir, start streaming.
    let start_lsn = position.caught_up_lsn;
    let replication_config =
        replication::replication_config(&config.source.conn, slot, &config.source.publication)
            .await?
            .with_start_lsn(start_lsn.into())
            .with_ack_lsn(start_lsn.into());
    let redacted = config.source.conn.redacted();
    let mut client = replication::connect_gated(replication_config, &redacted).await?;
    let system = with_timeout("IDENTIFY_SYSTEM", client.identify_system()).await?;
    if let Some(target_position) = &target_position {
        if target_position.source_system_identifier != system.system_id {
            return Err(Error::definite(format!(
                "The target's sluice.applied_position for slot {slot} was written from another source cluster (system {}, this source is {}): point sluice at the right source or target",
                target_position.source_system_identifier, system.system_id
            )));
        }
    }
    store.claim(&identity(&system.system_id), &config.target.conn)?;
    with_timeout("Starting replication", client.start()).await?;
    with_timeout("Starting replication", client.wait_started()).await?;
    match start_lsn {
        // A new slot, or none applied yet: the slot's own confirmed position is the start.
        Lsn::ZERO => tracing::info!(slot, from = "the slot's confirmed position", "streaming"),
        lsn => tracing::info!(slot, from = %lsn, "streaming"),
    }

    status.update(|s| {
        s.applied_transactions = position.applied_transactions;
        s.applied_changes = position.applied_changes;
        s.applied_lsn = target_position.as_ref().map(|p| p.applied_lsn);
        s.caught_up_lsn = target_position.as_ref().map(|p| p.caught_up_lsn);
        // After a copy too: the copy's state ends here (not a stop's).
        if !matches!(s.state, DaemonState::Stalled | DaemonState::Stopped) {
            s.state = DaemonState::Streaming;
        }
    });
    // Rows copied by an earlier run of this daemon's state dir, as `status` shows them when
    // the daemon is down.
    let copied: std::collections::HashMap<String, u64> = snapshot::state::load_tables(store)?
        .into_iter()
        .filter(|record| record.finished)
        .map(|record| (record.name.to_string(), record.rows))
        .collect();
    for table in &tables {
        let name = table.name.to_string();
        let rows = copied.get(&name).copied().unwrap_or(0);
        status.set_table_state_or_copied(&name, crate::control::TableState::Streaming, rows);
    }

    // Batches of up to 256 items: at most 16 × 256 changes wait between reader and applier.
    let (items_tx, items_rx) = mpsc::channel(16);
    let (acks_tx, acks_rx) = watch::channel(start_lsn);
    let wal_sender_timeout: i64 = source
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| error::pg("Reading the source's wal_sender_timeout", e))?
        .get(0);
    let wal_sender_timeout = Duration::from_millis(wal_sender_timeout.max(0) as u64);
    // Foreign keys the copy had to create NOT VALID hold once apply has passed every
    // table's sync position (the rows they refer to have then arrived).
    let validate_after = table_sync.values().max().copied().unwrap_or(Lsn::ZERO);
    // Only now, with every start-up check passed: a start refused for something else
    // streams nothing, and its tables' copies stay good.
    let left_out = snapshot::forget_unselected_copies(store, &tables)?;
    if !left_out.is_empty() {
        let names: Vec<String> = left_out.iter().map(|t| t.to_string()).collect();
        tracing::warn!(
            tables = crate::source::abbreviate(&names, 10),
            "copied earlier but no longer selected (left out of [tables], or dropped on the source): their changes are not applied from now on, and their copies are forgotten; selected again, each is copied afresh once it is emptied on the target (TRUNCATE), as its rows there would miss the changes made meanwhile"
        );
    }
    let reader = Reader {
        client,
        items: items_tx,
        acks: acks_rx,
        resume_after: start_lsn,
        table_sync,
        status: status.clone(),
        silence_limit: crate::source::stream::silence_limit(wal_sender_timeout),
        liveness: (source, slot.clone()),
        selection: config.tables.clone(),
        started_with: config
            .copy
            .enabled
            .then(|| selection.clone().unwrap_or_default()),
        started_oids: tables.iter().map(|t| (t.oid, t.name.clone())).collect(),
        publication: config.source.publication.clone(),
        recopy: config.copy.enabled.then(|| store.clone()),
        budget: Arc::new(tokio::sync::Semaphore::new(
            crate::source::stream::BUDGET_KIB,
        )),
    };
    let catalog = tls::connect(&config.target.conn, "the target").await?;
    let cancel = target.cancel_token();
    let applier = Applier::start(
        TargetClients {
            apply: target,
            catalog,
        },
        store.clone(),
        status.clone(),
        acks_tx,
        ApplyOptions {
            slot: slot.clone(),
            system_identifier: system.system_id,
            batch_max_rows: config.apply.batch_max_rows,
            batch_max_delay: config.apply.batch_max_delay,
            strict_through,
        },
        position,
        progress,
    )
    .await?;
    let validation = tokio::spawn(validate_foreign_keys_when_caught_up(
        config.target.conn.clone(),
        status.clone(),
        validate_after,
    ));
    let mut reader_task = tokio::spawn(reader.run());
    // A stop finishes or rolls back the open target transaction; a statement waiting on a
    // target lock would keep it waiting as long as the lock is held. After a grace period
    // the statement is cancelled: the transaction rolls back, and the next start applies
    // it again.
    let watchdog = {
        let mut stop = shutdown.clone();
        let conn = config.target.conn.clone();
        tokio::spawn(async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(STOP_GRACE).await;
            tracing::warn!(
                "the open target transaction did not end within {STOP_GRACE:?} of the stop request (a lock held on the target?): cancelling its statement; it rolls back and is applied again at the next start"
            );
            tls::cancel(&conn, &cancel).await;
        })
    };
    let applied = applier.run(items_rx, shutdown).await;
    let cancelled = watchdog.is_finished();
    watchdog.abort();
    validation.abort();
    // The error a cancelled statement ends apply with is the stop's own doing.
    let applied = match applied {
        Err(error) if cancelled && error.sqlstate() == Some("57014") => Ok(()),
        other => other,
    };
    match applied {
        Ok(()) => {
            // Let the last acknowledgement reach the slot before the session closes.
            let _ = tokio::time::timeout(Duration::from_millis(300), &mut reader_task).await;
            reader_task.abort();
            Ok(())
        }
        Err(apply_error) => {
            // When the reader failed first, its error is the cause.
            let reader_error =
                match tokio::time::timeout(Duration::from_secs(1), &mut reader_task).await {
                    Ok(Ok(Err(error))) => Some(error),
                    _ => None,
                };
            reader_task.abort();
            Err(match reader_error {
                Some(error) if apply_error.kind() == ErrorKind::Transient => error,
                _ => apply_error,
            })
        }
    }
}
