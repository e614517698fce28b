//! Says when the apply session waits on the target for a lock another session holds, or
//! runs one statement for minutes.
//!
//! A target table locked by someone else (a long migration script, an `idle in transaction`
//! session, a `LOCK TABLE`) makes apply wait without an error: `state` stays `streaming`
//! and only `lag_seconds` grows, with nothing saying why. The watcher looks at the apply
//! session in `pg_stat_activity` every few seconds, on the catalog connection (the apply
//! connection is the one waiting), and once a lock wait has lasted [`REPORT_AFTER`] puts a
//! status warning that names the sessions holding it; the warning goes when the wait ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::control::SharedStatus;

/// Lock waits shorter than this are ordinary on a busy target.
const REPORT_AFTER: Duration = Duration::from_secs(10);
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// A statement running this long without waiting on a lock is worth a word.
const LONG_STATEMENT: Duration = Duration::from_secs(120);
/// Every warning of the watcher starts so, and only those are replaced or removed.
const PREFIX: &str = "Apply has waited ";

/// The watcher's task; stopped, and its warning removed, when dropped with the applier.
pub struct LockWaitWatcher {
    task: JoinHandle<()>,
    status: SharedStatus,
}

impl LockWaitWatcher {
    pub fn start(catalog: Arc<Client>, apply_pid: i32, status: SharedStatus) -> LockWaitWatcher {
        let task = tokio::spawn(watch(catalog, apply_pid, status.clone()));
        LockWaitWatcher { task, status }
    }
}

impl Drop for LockWaitWatcher {
    fn drop(&mut self) {
        self.task.abort();
        set_warning(&self.status, None);
    }
}

async fn watch(catalog: Arc<Client>, apply_pid: i32, status: SharedStatus) {
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        match lock_wait(&catalog, apply_pid).await {
            Ok(warning) => set_warning(&status, warning),
            // The catalog connection failing is the applier's to report (it uses it too).
            Err(e) => tracing::debug!(error = %e, "could not look at the apply session's waits"),
        }
    }
}

fn set_warning(status: &SharedStatus, warning: Option<String>) {
    status.update(|s| {
        s.warnings.retain(|w| !w.starts_with(PREFIX));
        s.warnings.extend(warning);
    });
}

/// The warning for a lock wait of the apply session that has lasted long enough, naming the
/// sessions it waits for; `None` when it is not waiting on a lock.
async fn lock_wait(
    catalog: &Client,
    apply_pid: i32,
) -> Result<Option<String>, tokio_postgres::Error> {
    let rows = catalog
        .query(
            "SELECT a.wait_event_type::text || ': ' || a.wait_event::text,
                    extract(epoch FROM now() - a.query_start)::float8,
                    b.pid, b.usename::text, b.application_name::text, b.state::text,
                    extract(epoch FROM now() - COALESCE(b.xact_start, b.state_change))::float8,
                    left(regexp_replace(b.query, '\\s+', ' ', 'g'), 120)
             FROM pg_catalog.pg_stat_activity AS a
             LEFT JOIN pg_catalog.pg_stat_activity AS b
                    ON b.pid = ANY (pg_catalog.pg_blocking_pids(a.pid))
             WHERE a.pid = $1 AND a.state = 'active'
             ORDER BY b.pid",
            &[&apply_pid],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    // Counted from the statement's start (`pg_locks.waitstart` is 14+ only): a statement
    // that waits on a row lock after working a while is said to wait a little longer.
    let waited: f64 = first.get::<_, Option<f64>>(1).unwrap_or(0.0);
    let wait = first.get::<_, Option<String>>(0);
    let Some(lock) = wait.as_deref().and_then(|w| w.strip_prefix("Lock: ")) else {
        // Not waiting on a lock: a statement that runs this long is a very large
        // transaction's, or one the target plans badly (statistics of a table analyzed
        // while it was empty): said, so that `streaming` with a growing lag has a reason.
        if waited < LONG_STATEMENT.as_secs_f64() {
            return Ok(None);
        }
        return Ok(Some(format!(
            "{PREFIX}{waited:.0} s for one statement on the target to finish ({}): a very large source transaction takes that long; otherwise look at the statement in pg_stat_activity (pid {apply_pid}) and at the table's statistics (ANALYZE)",
            wait.unwrap_or_else(|| "on the CPU".to_string())
        )));
    };
    if waited < REPORT_AFTER.as_secs_f64() {
        return Ok(None);
    }
    let holders: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let pid: i32 = row.get::<_, Option<i32>>(2)?;
            let user = row.get::<_, Option<String>>(3).unwrap_or_default();
            let application = row.get::<_, Option<String>>(4).unwrap_or_default();
            let state = row.get::<_, Option<String>>(5).unwrap_or_default();
            let seconds = row.get::<_, Option<f64>>(6).unwrap_or(0.0);
            let query = row.get::<_, Option<String>>(7).unwrap_or_default();
            Some(format!(
                "pid {pid} (user {user:?}, application {application:?}, {state} for {seconds:.0} s, last statement: {query})"
            ))
        })
        .collect();
    let held_by = match holders.is_empty() {
        true => "another session (not visible to this user: pg_blocking_pids needs pg_read_all_stats to show it)".to_string(),
        false => holders.join(", "),
    };
    Ok(Some(format!(
        "{PREFIX}{waited:.0} s for a lock ({lock}) on the target, held by {held_by}: it goes on by itself once that session commits or rolls back (or is ended: SELECT pg_terminate_backend(pid)); lag grows meanwhile"
    )))
}
