//! `sluice cutover`: the guided switch from source to target.
//!
//! 1. (`--freeze-source`) Make the source database read-only for new transactions with
//!    `ALTER DATABASE ... SET default_transaction_read_only = on`, then end the other
//!    client sessions of that database with `pg_terminate_backend`, so that no session
//!    opened before the freeze keeps writing. Never ended: our own session, walsenders
//!    (the slot's stream must go on until the end), and sessions named `sluice*` or with the
//!    source connection's configured application name (the daemon's). This stops the
//!    application, not a determined superuser: a session may still
//!    `SET default_transaction_read_only = off`.
//! 2. Take the source's `pg_current_wal_lsn()` after the freeze and wait until the target's
//!    `sluice.applied_position.caught_up_lsn` reaches it: every change committed before
//!    the freeze is then on the target. (The daemon advances `caught_up_lsn` on keepalives
//!    too, so an idle, frozen source gets there.) Without a freeze this is "caught up with
//!    the moment cutover started", and writes continue behind it.
//! 3. Sync sequences (see `sequences`), 4. verify every table, 5. report, the next steps,
//!    and the undo for the freeze.
//!
//! `--dry-run` connects and reads (sessions that would end, current lag, sequence plan) but
//! changes nothing.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::checkpoint;
use crate::config::{parse_duration, Config};
use crate::control::DaemonState;
use crate::error::{self, Error, Result};
use crate::lsn::Lsn;
use crate::source::quote_ident;

#[derive(Debug, clap::Args)]
pub struct CutoverArgs {
    /// Make the source read-only for new transactions and end other sessions first.
    #[arg(long)]
    pub freeze_source: bool,
    /// Show the steps without doing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask before freezing the source (needed without a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Sequence safety margin, in increments (see sync-sequences).
    #[arg(long, default_value_t = 0, value_name = "N", allow_negative_numbers = true,
          value_parser = crate::cutover::sequences::parse_margin)]
    pub margin: u64,
    /// Longest wait for zero lag.
    #[arg(long, default_value = "10m", value_name = "DUR")]
    pub timeout: String,
    /// Tables verified in parallel.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub jobs: usize,
}

/// A session the freeze would end.
#[derive(Debug)]
struct Session {
    pid: i32,
    user: String,
    application: String,
    state: String,
}

/// The source's other client sessions, but never sluice's own: those named `sluice*` (the
/// default application name) or with the application name the config gives the source.
/// With `started_before` (a timestamptz as text), only the sessions that began before it.
async fn other_sessions(
    source: &Client,
    slot: &str,
    own_name: &str,
    started_before: Option<&str>,
) -> Result<Vec<Session>> {
    let rows = source
        .query(
            "SELECT a.pid, COALESCE(a.usename::text, ''), COALESCE(a.application_name, ''),
                    COALESCE(a.state, '')
             FROM pg_stat_activity a
             WHERE a.datname = current_database()
               AND a.pid <> pg_backend_pid()
               AND a.backend_type = 'client backend'
               AND COALESCE(a.application_name, '') NOT LIKE 'sluice%'
               AND COALESCE(a.application_name, '') <> $2
               AND a.pid NOT IN (SELECT active_pid FROM pg_replication_slots
                                 WHERE slot_name = $1 AND active_pid IS NOT NULL)
               AND ($3::text IS NULL OR a.backend_start < $3::text::timestamptz)
             ORDER BY a.pid",
            &[&slot, &own_name, &started_before],
        )
        .await
        .map_err(|e| error::pg("Listing the source's sessions (pg_stat_activity)", e))?;
    Ok(rows
        .iter()
        .map(|r| Session {
            pid: r.get(0),
            user: r.get(1),
            application: r.get(2),
            state: r.get(3),
        })
        .collect())
}

/// What would make the cutover fail or wait in vain, found before anything is changed: no
/// applied position on the target, or no `sluice run` streaming (stopped, stalled, still
/// copying). A freeze that then fails leaves the application unable to write for nothing.
async fn preflight(
    config: &Config,
    source: &Client,
    target: &Client,
    freeze: bool,
) -> Result<Vec<String>> {
    let slot = &config.source.slot;
    let mut problems = Vec::new();
    if freeze {
        // Freezing is ALTER DATABASE (its owner or a superuser); finding and ending the
        // sessions opened before it needs to see and signal other users' sessions. Known
        // now, a freeze that cannot succeed, or cannot be made sure of, is never started.
        let row = source
            .query_one(
                "SELECT current_user::text, current_database()::text, d.datdba::regrole::text,
                        r.rolsuper OR pg_has_role(current_user, d.datdba, 'MEMBER'),
                        r.rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
                        r.rolsuper OR pg_has_role(current_user, 'pg_signal_backend', 'USAGE'),
                        (SELECT o.rolsuper FROM pg_roles o WHERE o.oid = d.datdba)
                 FROM pg_database d, pg_roles r
                 WHERE d.datname = current_database() AND r.rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| error::pg("Reading the source user's rights", e))?;
        let (user, database, owner): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        if !row.get::<_, bool>(3) {
            // Membership in a superuser owner would make the user a superuser (SET ROLE):
            // handing the database to it is the narrower grant.
            let grant = match row.get::<_, Option<bool>>(6).unwrap_or(false) {
                true => format!(
                    "ALTER DATABASE {} OWNER TO {} (its owner {owner} is a superuser: membership in it would make {user} one too)",
                    quote_ident(&database),
                    quote_ident(&user)
                ),
                false => format!("GRANT {} TO {}", quote_ident(&owner), quote_ident(&user)),
            };
            problems.push(format!(
                "the source user {user} may not freeze database {database} (ALTER DATABASE needs its owner {owner} or a superuser): run cutover as {owner}, or {grant}"
            ));
        }
        let mut missing = Vec::new();
        if !row.get::<_, bool>(4) {
            missing.push("pg_read_all_stats");
        }
        if !row.get::<_, bool>(5) {
            missing.push("pg_signal_backend");
        }
        if !missing.is_empty() {
            problems.push(format!(
                "the source user {user} cannot {} other users' sessions, so sessions opened before the freeze, which can still write, could not be ended: GRANT {} TO {} (as a superuser, or a managed service's administrator role)",
                match (row.get::<_, bool>(4), row.get::<_, bool>(5)) {
                    (false, false) => "see or end",
                    (false, true) => "see",
                    _ => "end",
                },
                missing.join(", "),
                quote_ident(&user)
            ));
        }
    }
    if checkpoint::read_target_position(target, slot)
        .await?
        .is_none()
    {
        problems.push(format!(
            "the target has no applied position for slot {slot} (sluice.applied_position): `sluice run` has not applied anything with this slot yet; start it (check source.slot), let the copy finish, then run cutover again"
        ));
    }
    if let Some(problem) = daemon_problem(config, source).await? {
        problems.push(problem);
    }
    Ok(problems)
}

/// Why `sluice run` is not bringing the target up to date right now, if it is not: it is
/// stalled, still starting or copying, or not running at all (nothing answers on the control
/// socket and no session streams from the slot; a daemon on another machine does).
async fn daemon_problem(config: &Config, source: &Client) -> Result<Option<String>> {
    let slot = &config.source.slot;
    Ok(
        match crate::control::client::request_status(&config.state.dir).await {
            Ok(Some(report)) => match report.state {
                DaemonState::Streaming => None,
                DaemonState::Stalled => Some(format!(
                    "sluice run is stalled: {}; fix that first (sluice status), the target cannot catch up until then",
                    report.last_error.unwrap_or_default()
                )),
                other => Some(format!(
                    "sluice run is {}: wait until `sluice status` says streaming",
                    serde_json::to_value(other)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                )),
            },
            Ok(None) => {
                let active = crate::source::slot::slot_info(source, slot)
                    .await?
                    .is_some_and(|info| info.active);
                (!active).then(|| format!(
                    "sluice run is not running: nothing answers on the control socket in {} and no session streams from slot {slot}; start it, then run cutover again",
                    config.state.dir.display()
                ))
            }
            Err(e) => Some(format!("cannot ask sluice run for its state: {}", e.report())),
        },
    )
}

/// Waits until the target's caught-up position for `slot` reaches `goal`.
/// Gives up as soon as the daemon stops or stalls: the wait could only time out, with the
/// source frozen all along.
async fn wait_for_zero_lag(
    config: &Config,
    source: &Client,
    target: &Client,
    goal: Lsn,
    timeout: Duration,
    frozen: bool,
) -> Result<Lsn> {
    let slot = &config.source.slot;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut last_daemon_look = Instant::now();
    loop {
        // No position at all: nothing was ever applied for this slot, so waiting is futile.
        let Some(position) = checkpoint::read_target_position(target, slot).await? else {
            return Err(Error::definite(format!(
                "The target has no applied position for slot {slot} (sluice.applied_position): is sluice run running, with the initial copy done? Start it, then run cutover again"
            )));
        };
        let caught_up = position.caught_up_lsn;
        if caught_up >= goal {
            return Ok(caught_up);
        }
        if started.elapsed() >= timeout {
            return Err(Error::definite(format!(
                "The target did not catch up with the source's position {goal} within {} (caught up to {caught_up}, {} bytes behind): check sluice status, then run cutover again{}",
                humantime::format_duration(timeout),
                goal.bytes_since(caught_up),
                if frozen { " (the freeze stays in place)" } else { "" }
            )));
        }
        if last_daemon_look.elapsed() >= Duration::from_secs(1) {
            last_daemon_look = Instant::now();
            if let Some(problem) = daemon_problem(config, source).await? {
                return Err(Error::definite(format!(
                    "The target stopped catching up with the source's position {goal} (caught up to {caught_up}, {} bytes behind): {problem}{}",
                    goal.bytes_since(caught_up),
                    if frozen { " (the freeze stays in place)" } else { "" }
                )));
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            crate::say!(
                "  ... caught up to {caught_up}, {} bytes to go",
                goal.bytes_since(caught_up)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `sluice cutover`: exit 0 when the target is caught up, sequences are set and every
/// table matches; 1 otherwise.
pub async fn command(config: &Config, args: &CutoverArgs) -> Result<i32> {
    let timeout = parse_duration(&args.timeout, "--timeout")?;
    // Said before anything changes: verify, the last step, would refuse it after the freeze.
    if args.jobs == 0 {
        return Err(Error::config("--jobs must be at least 1"));
    }
    let (source, target) = super::connect_both(config).await?;
    let database: String = source
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| error::pg("Reading the source's database name", e))?
        .get(0);
    let freeze_sql = format!(
        "ALTER DATABASE {} SET default_transaction_read_only = on",
        quote_ident(&database)
    );
    // A session of the frozen database is read-only itself: the undo opens a read-write
    // transaction explicitly (or run it from another database).
    let undo_sql = format!(
        "BEGIN READ WRITE; ALTER DATABASE {} RESET default_transaction_read_only; COMMIT;",
        quote_ident(&database)
    );
    if args.dry_run {
        crate::say!("Dry run: nothing is changed.");
    }
    let problems = preflight(config, &source, &target, args.freeze_source).await?;
    if !problems.is_empty() {
        crate::say!("Cutover NOT ready (nothing was changed):");
        for problem in &problems {
            crate::say!("  - {problem}");
        }
        // "Nothing was changed" must not read as "the source takes writes": an earlier
        // cutover's freeze is still in place until it is undone.
        if source_frozen(&source).await {
            crate::say!(
                "Note: the source database {database} is still frozen by an earlier cutover (default_transaction_read_only = on): new transactions there are read-only. To let the application write again: {undo_sql}"
            );
        }
        return Ok(1);
    }
    let outcome = freeze_and_switch(
        config,
        args,
        &source,
        &target,
        &database,
        (&freeze_sql, &undo_sql),
        timeout,
    )
    .await;
    // The way back is said whatever happened after the freeze, and only when the source
    // is frozen (not after a refused confirmation or a freeze that failed).
    if args.freeze_source && !args.dry_run && source_frozen(&source).await {
        crate::say!(
            "To undo the freeze (keep the source as the primary): {undo_sql} (sessions opened before the undo stay read-only until they reconnect)"
        );
    }
    outcome
}

/// From the freeze on, Ctrl-C or SIGTERM (an operator giving up on the wait, a `timeout`
/// around the command) ends cutover with the way back said, not with a frozen source and
/// no word. Armed only after the confirmation: the prompt reads the terminal on this
/// (single) runtime thread, and a Ctrl-C there must still end the process at once.
fn undo_on_interrupt(undo_sql: String) {
    tokio::spawn(async move {
        crate::daemon::wait_for_signal().await;
        crate::say!(
            "Cutover interrupted after the freeze: the source may be frozen. To undo the freeze (keep the source as the primary): {undo_sql} (sessions opened before the undo stay read-only until they reconnect)"
        );
        std::process::exit(1);
    });
}

/// Whether the source database is frozen (`ALTER DATABASE ... SET
/// default_transaction_read_only = on`, for every role).
async fn source_frozen(source: &Client) -> bool {
    source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s
                            JOIN pg_database d ON d.oid = s.setdatabase
                            WHERE d.datname = current_database() AND s.setrole = 0
                              AND 'default_transaction_read_only=on' = ANY(s.setconfig))",
            &[],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(false)
}

/// Steps 1 to 5, after the preflight.
async fn freeze_and_switch(
    config: &Config,
    args: &CutoverArgs,
    source: &Client,
    target: &Client,
    database: &str,
    (freeze_sql, undo_sql): (&str, &str),
    timeout: Duration,
) -> Result<i32> {
    let slot = &config.source.slot;
    let own_name = config
        .source
        .conn
        .application_name
        .as_deref()
        .unwrap_or("sluice");
    let would = if args.dry_run { "WOULD " } else { "" };

    // 1. Freeze. Sessions opened before it stay read-write: any that outlives the sweeps
    // could write after the position the target catches up to.
    let mut still_writable: Vec<Session> = Vec::new();
    let mut blind_to: Option<String> = None;
    let mut prepared: Vec<String> = Vec::new();
    let mut overriding_roles: Vec<String> = Vec::new();
    if args.freeze_source {
        // Without superuser or pg_read_all_stats, pg_stat_activity hides other users'
        // sessions entirely (no database, no user): "0 other sessions" would be a lie.
        let (user, sees_all): (String, bool) = source
            .query_one(
                "SELECT current_user::text,
                        rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map(|row| (row.get(0), row.get(1)))
            .map_err(|e| error::pg("Reading the source user's roles", e))?;
        if !sees_all {
            crate::say!(
                "WARNING the source user {user} cannot see other users' sessions (it is neither a superuser nor a member of pg_read_all_stats): sessions opened before the freeze, which can still write, can be neither found nor ended"
            );
            blind_to = Some(user);
        }
        let sessions = other_sessions(source, slot, own_name, None).await?;
        crate::say!(
            "Step 1: {would}freeze the source database {database}: {freeze_sql}; then end {} other session(s){}",
            sessions.len(),
            if sessions.is_empty() { "." } else { ":" }
        );
        for s in &sessions {
            crate::say!(
                "  pid {} user {} application {:?} ({})",
                s.pid,
                s.user,
                s.application,
                s.state
            );
        }
        if !args.dry_run {
            if !super::confirm(
                "Freeze the source and end these sessions?",
                args.yes,
                "the source is unchanged",
            )? {
                return Err(Error::definite(
                    "Cutover not confirmed: the source is unchanged. Answer yes to go ahead, or pass --yes",
                ));
            }
            undo_on_interrupt(undo_sql.to_string());
            // READ WRITE: a cutover run again (after "not ready") connects to a database
            // that is frozen already, where every transaction is read-only by default.
            source
                .batch_execute(&format!("BEGIN READ WRITE; {freeze_sql}; COMMIT"))
                .await
                .map_err(|e| error::pg(format!("Freezing the source ({freeze_sql}); this needs the database's owner or a superuser"), e))?;
            crate::say!("FROZEN {database}: new transactions are read-only");
            let frozen_at: String = source
                .query_one("SELECT clock_timestamp()::text", &[])
                .await
                .map_err(|e| error::pg("Reading the source's clock", e))?
                .get(0);
            // Sessions that started in between are ended too; a second and third sweep
            // catch sessions that were still starting up (and read the old setting) while
            // the previous one ran.
            // Signalled sessions take a moment to exit; each is handled once.
            let mut handled: Vec<i32> = Vec::new();
            for sweep in 0..3 {
                if sweep > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let sessions: Vec<Session> = other_sessions(source, slot, own_name, None)
                    .await?
                    .into_iter()
                    .filter(|s| !handled.contains(&s.pid))
                    .collect();
                if sessions.is_empty() && sweep > 0 {
                    break;
                }
                for s in sessions {
                    handled.push(s.pid);
                    match source
                        .query_one("SELECT pg_terminate_backend($1)", &[&s.pid])
                        .await
                    {
                        Ok(row) if row.get::<_, bool>(0) => crate::say!(
                            "ENDED session pid {} ({} {:?})",
                            s.pid,
                            s.user,
                            s.application
                        ),
                        Ok(_) => crate::say!("GONE session pid {} had ended already", s.pid),
                        Err(e) => {
                            let reason = e
                                .as_db_error()
                                .map(|d| d.message().to_string())
                                .unwrap_or_else(|| e.to_string());
                            crate::say!(
                                "WARNING could not end session pid {} ({}): {reason}; end it yourself: SELECT pg_terminate_backend({})",
                                s.pid, s.user, s.pid
                            );
                        }
                    }
                }
            }
            // A prepared (two-phase) transaction belongs to no session: no sweep ends it,
            // and it can commit its writes whenever its coordinator says so.
            prepared = source
                .query(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()
                     ORDER BY prepared",
                    &[],
                )
                .await
                .map_err(|e| error::pg("Listing the source's prepared transactions", e))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            for gid in &prepared {
                crate::say!(
                    "PREPARED transaction {gid:?} is pending: it can still commit its writes"
                );
            }
            // A role's own setting (ALTER ROLE ... [IN DATABASE ...] SET
            // default_transaction_read_only = off) wins over the database's: its new
            // sessions could write after the freeze.
            overriding_roles = source
                .query(
                    "SELECT DISTINCT r.rolname::text
                     FROM pg_db_role_setting s
                     JOIN pg_roles r ON r.oid = s.setrole
                     CROSS JOIN LATERAL unnest(s.setconfig) AS c(setting)
                     WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
                       AND lower(split_part(c.setting, '=', 1)) = 'default_transaction_read_only'
                       AND lower(split_part(c.setting, '=', 2)) IN ('off', 'false', 'no', '0', 'f', 'n')
                       AND r.rolcanlogin
                     ORDER BY 1",
                    &[],
                )
                .await
                .map_err(|e| error::pg("Reading the source's per-role settings (pg_db_role_setting)", e))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            for role in &overriding_roles {
                crate::say!(
                    "ROLE {role} sets default_transaction_read_only = off for itself: its new sessions can still write"
                );
            }
            // Ended sessions take a moment to go; what is left then was not ended.
            tokio::time::sleep(Duration::from_millis(500)).await;
            still_writable =
                other_sessions(source, slot, own_name, Some(frozen_at.as_str())).await?;
            for s in &still_writable {
                crate::say!(
                    "STILL OPEN session pid {} ({} {:?}), opened before the freeze: it can still write",
                    s.pid,
                    s.user,
                    s.application
                );
            }
        }
    } else {
        // A database an earlier `--freeze-source` froze stays frozen: say so, not "writes go on".
        if source_frozen(source).await {
            crate::say!("Step 1: no --freeze-source, but the source database {database} is still frozen by an earlier cutover (default_transaction_read_only = on): new transactions are read-only.");
        } else {
            crate::say!("Step 1: the source is not frozen (no --freeze-source): writes go on, so zero lag means caught up with the moment cutover started.");
        }
    }

    // 2. Zero lag.
    let goal = super::current_lsn(source).await?;
    if args.dry_run {
        let caught_up = checkpoint::read_target_position(target, slot)
            .await?
            .map(|p| p.caught_up_lsn);
        match caught_up {
            Some(lsn) => crate::say!(
                "Step 2: WOULD wait until the target's caught-up position (now {lsn}, {} bytes behind) reaches the source's {goal}",
                goal.bytes_since(lsn)
            ),
            None => crate::say!(
                "Step 2: WOULD wait for the target to reach {goal}; the target has no position for slot {slot} yet (is sluice run running?)"
            ),
        }
    } else {
        crate::say!(
            "Step 2: waiting until the target has caught up with the source's {goal} (at most {})",
            humantime::format_duration(timeout)
        );
        let reached =
            wait_for_zero_lag(config, source, target, goal, timeout, args.freeze_source).await?;
        crate::say!("CAUGHT UP to {reached}: lag is zero");
    }

    // 3. Sequences.
    crate::say!("Step 3: {would}sync sequences (margin {})", args.margin);
    let sequences =
        super::sequences::sync(config, source, target, args.margin, args.dry_run).await?;

    // 4. Verify.
    let verified = if args.dry_run {
        crate::say!(
            "Step 4: WOULD verify every selected table (row counts, then checksums per key range)"
        );
        None
    } else {
        crate::say!("Step 4: verifying");
        Some(super::verify::verify(config, &[], args.jobs, 10_000, 2).await?)
    };

    // 5. Report.
    let mut ok = sequences.missing.is_empty()
        && sequences.failed.is_empty()
        && still_writable.is_empty()
        && blind_to.is_none()
        && prepared.is_empty()
        && overriding_roles.is_empty();
    crate::say!();
    if args.dry_run {
        crate::say!("Dry run done: nothing was changed.");
    } else {
        let verified = verified.unwrap_or_default();
        ok &= verified.ok();
        if ok {
            crate::say!(
                "Cutover ready: target caught up, {} sequence(s) set, {} kept, {} table(s) match.",
                sequences.set,
                sequences.kept,
                verified.tables
            );
            crate::say!("Next:");
            crate::say!(
                "  1. Point the application at the target {}.",
                config.target.conn.redacted()
            );
            crate::say!(
                "  2. Stop sluice run (SIGTERM) once the application writes to the target."
            );
            crate::say!("  3. sluice teardown: drops the slot (the source stops retaining WAL), the publication and the target's sluice schema.");
        } else {
            crate::say!("Cutover NOT ready:");
            if let Some(user) = &blind_to {
                crate::say!(
                    "  - other users' sessions cannot be seen, so the freeze cannot be made sure of: GRANT pg_read_all_stats, pg_signal_backend TO {} (as a superuser, or an administrator role of a managed service), then run cutover again",
                    crate::source::quote_ident(user)
                );
            }
            if !prepared.is_empty() {
                crate::say!(
                    "  - {} prepared transaction(s) pending on the source can still commit writes: COMMIT PREPARED or ROLLBACK PREPARED them (pg_prepared_xacts), then run cutover again",
                    prepared.len()
                );
            }
            if !overriding_roles.is_empty() {
                // Run on the frozen database, the ALTER ROLEs need a read-write transaction
                // of their own, as the freeze's undo does.
                let resets: Vec<String> = overriding_roles
                    .iter()
                    .map(|role| {
                        let role = quote_ident(role);
                        format!(
                            "ALTER ROLE {role} RESET default_transaction_read_only; ALTER ROLE {role} IN DATABASE {} RESET default_transaction_read_only;",
                            quote_ident(database)
                        )
                    })
                    .collect();
                crate::say!(
                    "  - role(s) {} turn the freeze off for their own sessions: BEGIN READ WRITE; {} COMMIT; then run cutover again",
                    overriding_roles.join(", "),
                    resets.join(" ")
                );
            }
            if !still_writable.is_empty() {
                let pids: Vec<String> = still_writable.iter().map(|s| s.pid.to_string()).collect();
                crate::say!(
                    "  - {} session(s) opened before the freeze could not be ended and may still write (pid {}): end them (SELECT pg_terminate_backend(pid) as a superuser, or as a member of pg_signal_backend for non-superusers' sessions), then run cutover again",
                    still_writable.len(),
                    pids.join(", ")
                );
            }
            if !sequences.missing.is_empty() {
                crate::say!("  - sequences missing on the target: create them (sluice schema), then sync-sequences");
            }
            if !sequences.failed.is_empty() {
                crate::say!("  - sequences that could not be read or set (see FAILED lines above): grant what they say, then sync-sequences");
            }
            if !verified.ok() && !args.freeze_source {
                // Without a freeze, rows written while verify reads are still on their
                // way: a difference in them says nothing about the copy.
                crate::say!(
                    "  - tables differ: {} (see DIFF lines above). The source is not frozen, so rows written meanwhile may only be on their way: verify again (differences that stay are real), or cut over with --freeze-source",
                    verified.differing.join(", ")
                );
            } else if !verified.ok() {
                crate::say!(
                    "  - tables differ: {} (see DIFF lines above; fix or re-copy them, then sluice verify)",
                    verified.differing.join(", ")
                );
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}
