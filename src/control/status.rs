//! The status every reporting surface shares: `sluice status`, `sluice lag`, the control
//! socket and `/metrics`. The daemon owns one [`SharedStatus`] and updates it as it works;
//! readers take a [`StatusReport`] snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::pgoutput::PgTimestamp;

/// At most this many received, unapplied source transactions are remembered for `lag_seconds`.
const PENDING_TRANSACTIONS_TRACKED: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DaemonState {
    #[default]
    Starting,
    Copying,
    Streaming,
    Stalled,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TableState {
    #[default]
    Pending,
    Copying,
    Copied,
    Streaming,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableStatus {
    pub name: String,
    pub state: TableState,
    pub rows_copied: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildingStatus {
    /// The statement's title (`CONSTRAINT public.orders orders_pkey`).
    pub statement: String,
    /// Unix time (seconds) the build started.
    pub started_at: f64,
}

/// The SPEC.md status fields (and a few more). LSNs serialise as `16/B374D848`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StatusReport {
    pub state: DaemonState,
    pub slot: String,
    /// The source's current WAL position (`pg_current_wal_lsn()`), last sampled; at least
    /// `received_lsn` in a report (`refresh_lag`).
    pub source_lsn: Option<Lsn>,
    /// End of the last WAL data received from the slot.
    pub received_lsn: Option<Lsn>,
    /// End LSN of the last source commit applied on the target.
    pub applied_lsn: Option<Lsn>,
    /// The position sluice has caught up to: `applied_lsn`, or a later keepalive position
    /// acknowledged while nothing was in flight.
    pub caught_up_lsn: Option<Lsn>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub retained_wal_bytes: Option<u64>,
    /// `pg_replication_slots.wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
    pub applied_transactions: u64,
    pub applied_changes: u64,
    pub last_error: Option<String>,
    /// Seconds since the current stall began, when stalled.
    pub stalled_seconds: Option<f64>,
    /// Unix time the current stall began; `stalled_seconds` is counted from it.
    #[serde(skip)]
    pub stalled_since: Option<f64>,
    pub warnings: Vec<String>,
    /// Errors by kind (`transient`, `definite`, `apply`): since the daemon started, or, read
    /// without a daemon, those of this reading.
    pub errors_by_kind: BTreeMap<String, u64>,
    pub tables: Vec<TableStatus>,
    /// Deferred indexes and constraints being built right now (a key over a large table
    /// takes hours, while every table already says `copied`).
    #[serde(default)]
    pub building: Vec<BuildingStatus>,
    /// Unix time (seconds) the daemon started, when running.
    pub started_at: Option<f64>,
    /// Unix time (seconds) of this report.
    pub reported_at: f64,
    pub pid: Option<u32>,
}

/// The daemon's live status, updated by the stream, the applier, the copier and the monitor.
#[derive(Debug, Clone, Default)]
pub struct SharedStatus {
    inner: Arc<Mutex<StatusReport>>,
    tables: Arc<Mutex<BTreeMap<String, TableStatus>>>,
    building: Arc<Mutex<BTreeMap<u64, BuildingStatus>>>,
    /// Source transactions received and not applied yet, oldest first: (commit LSN, commit
    /// time as Unix seconds). The oldest one's age is `lag_seconds` while apply is behind.
    pending_transactions: Arc<Mutex<VecDeque<(Lsn, f64)>>>,
    next_build: Arc<std::sync::atomic::AtomicU64>,
}

/// Lists a statement under `building` for as long as it lives.
pub struct Building {
    status: SharedStatus,
    id: u64,
}

impl Drop for Building {
    fn drop(&mut self) {
        self.status
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl SharedStatus {
    pub fn new(slot: &str) -> Self {
        let status = SharedStatus::default();
        status.update(|s| {
            s.slot = slot.to_string();
            s.pid = Some(std::process::id());
            s.started_at = Some(unix_now());
        });
        status
    }

    /// Changes the report under the lock; keep the closure short.
    pub fn update(&self, change: impl FnOnce(&mut StatusReport)) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut guard);
    }

    pub fn set_table(&self, name: &str, state: TableState, rows_copied: u64) {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables.insert(
            name.to_string(),
            TableStatus {
                name: name.to_string(),
                state,
                rows_copied,
            },
        );
    }

    /// Moves a table to `state`, keeping its copied row count.
    pub fn set_table_state(&self, name: &str, state: TableState) {
        self.set_table_state_or_copied(name, state, 0);
    }

    /// Moves a table to `state`; a table this process has not listed yet (the copy was
    /// done by an earlier run) gets `rows_copied` as recorded then.
    pub fn set_table_state_or_copied(&self, name: &str, state: TableState, rows_copied: u64) {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let entry = tables
            .entry(name.to_string())
            .or_insert_with(|| TableStatus {
                name: name.to_string(),
                state,
                rows_copied,
            });
        entry.state = state;
    }

    /// A source transaction arrived (its Begin): committed on the source at `commit_time`.
    pub fn transaction_seen(&self, final_lsn: Lsn, commit_time: PgTimestamp) {
        let committed = commit_time
            .to_system_time()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let mut pending = self
            .pending_transactions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A restarted stream sends again what was not applied: known already, and it must
        // keep its place, so the age does not drop while a stall is retried. Only the oldest
        // matter; past the bound (a backlog of tiny transactions) later ones are left out,
        // and the age shown once these are applied is the last commit's.
        let known = pending.back().is_some_and(|(lsn, _)| *lsn >= final_lsn);
        if !known && pending.len() < PENDING_TRANSACTIONS_TRACKED {
            pending.push_back((final_lsn, committed));
        }
    }

    /// Apply committed on the target through `end_lsn`: every transaction whose commit
    /// record starts before it is there.
    pub fn transactions_applied_through(&self, end_lsn: Lsn) {
        let mut pending = self
            .pending_transactions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while pending.front().is_some_and(|(lsn, _)| *lsn < end_lsn) {
            pending.pop_front();
        }
    }

    /// Shows `statement` under `building` until the returned guard is dropped.
    pub fn building(&self, statement: &str) -> Building {
        let id = self
            .next_build
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                BuildingStatus {
                    statement: statement.to_string(),
                    started_at: unix_now(),
                },
            );
        Building {
            status: self.clone(),
            id,
        }
    }

    pub fn snapshot(&self) -> StatusReport {
        let mut report = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        report.tables = self
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        report.building = self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let now = unix_now();
        // How old the data on the target is: while a committed source transaction waits
        // (apply behind, blocked on a lock, stalled), the age of the oldest one, growing
        // with every report; otherwise what the last commit or keepalive said.
        if let Some((_, committed)) = self
            .pending_transactions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
        {
            report.lag_seconds = Some((now - committed).max(0.0));
        }
        if let Some(since) = report.stalled_since {
            report.stalled_seconds = Some((now - since).max(0.0));
        }
        report.refresh_lag();
        report.reported_at = now;
        report
    }
}

impl StatusReport {
    /// The monitor samples the source's position every `monitor.interval`, while the stream
    /// and apply move on in between: the source is at least where the stream has received
    /// from, and the lag follows the freshest positions (a report never shows the source
    /// behind what was applied).
    pub fn refresh_lag(&mut self) {
        if let (Some(source), Some(received)) = (self.source_lsn, self.received_lsn) {
            self.source_lsn = Some(source.max(received));
        }
        if let Some(source) = self.source_lsn {
            let caught_up = self.caught_up_lsn.or(self.applied_lsn);
            self.lag_bytes = caught_up.map(|c| source.bytes_since(c));
        }
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}
