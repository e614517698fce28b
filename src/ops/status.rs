//! `sluice status [--json]`.
//!
//! With the daemon running, its own report over the control socket. Without it, a report put
//! together from the records that outlive it, `state = stopped`:
//! - the source: `pg_current_wal_lsn()` and the slot's row in `pg_replication_slots`;
//! - the target: `sluice.applied_position`, the authority for what has been applied;
//! - the sled checkpoint in `state.dir`, when it exists (never created just to be read; a
//!   daemon holds it while running, and then the socket answers instead).
//!
//! Whatever cannot be reached is named in `last_error`; the rest is still printed.

use std::collections::BTreeMap;
use std::path::Path;

use clap::Args;

use crate::checkpoint;
use crate::config::{format_size, Config};
use crate::control::client;
use crate::control::monitor::sample_slot;
use crate::control::status::{unix_now, DaemonState, StatusReport, TableState, TableStatus};
use crate::error::{Error, ErrorKind, Result};
use crate::lsn::Lsn;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print the status as one JSON object (the fields SPEC.md lists).
    #[arg(long)]
    pub json: bool,
}

/// Where a report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The running daemon answered on the control socket.
    Daemon,
    /// No daemon: read from the source, the target (and the checkpoint).
    Direct,
    /// A daemon may be there but could not be asked (`lag` keeps trying).
    Unknown,
}

pub async fn run(config: &Config, args: &StatusArgs) -> Result<i32> {
    let (report, origin) = collect(config, true).await?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| {
            Error::with_source(ErrorKind::Definite, "Encoding the status as JSON", e)
        })?;
        crate::say!("{text}");
    } else {
        crate::say_partial!("{}", human(&report, origin));
    }
    Ok(0)
}

/// The daemon's report, or (no daemon on the socket) one read directly. An error only when a
/// daemon is there but cannot be asked (permissions, no answer): then a direct report would
/// claim `stopped` for a running daemon.
pub async fn collect(config: &Config, read_checkpoint: bool) -> Result<(StatusReport, Origin)> {
    tracing::debug!(state_dir = %config.state.dir.display(), "asking the daemon for its status");
    if let Some(report) = client::request_status(&config.state.dir).await? {
        return Ok((report, Origin::Daemon));
    }
    tracing::debug!("no daemon answers; reading the source and the target directly");
    Ok((direct_report(config, read_checkpoint).await, Origin::Direct))
}

/// The status from the databases (and the checkpoint when `read_checkpoint`), for a daemon
/// that is not running. Never fails: what cannot be read is left empty and named in
/// `last_error`.
pub async fn direct_report(config: &Config, read_checkpoint: bool) -> StatusReport {
    let mut report = StatusReport {
        state: DaemonState::Stopped,
        slot: config.source.slot.clone(),
        reported_at: unix_now(),
        ..Default::default()
    };
    let mut problems: Vec<String> = Vec::new();

    if read_checkpoint {
        match read_local_checkpoint(&config.state.dir) {
            // A state dir of another slot says nothing about this one (`run` refuses it).
            Ok((_, _, Some(other_slot), _)) if other_slot != config.source.slot => {
                report.warnings.push(format!(
                    "The state dir {} belongs to slot {other_slot}, not {}: its checkpoint is not shown (`sluice run` refuses it too); point state.dir at this migration's directory",
                    config.state.dir.display(),
                    config.source.slot
                ));
            }
            Ok((position, tables, _, stopped_on)) => {
                if let Some(error) = stopped_on {
                    problems.push(format!("sluice run stopped on: {error}"));
                }
                if let Some(position) = position {
                    report.applied_lsn = Some(position.applied_lsn).filter(|lsn| *lsn > Lsn::ZERO);
                    report.caught_up_lsn = Some(position.caught_up_lsn);
                    report.applied_transactions = position.applied_transactions;
                    report.applied_changes = position.applied_changes;
                }
                report.tables = tables;
            }
            // The store is locked, yet nobody answered on the socket: a daemon is starting
            // (or wedged before serving). Say so rather than claim it is stopped.
            Err(_) if checkpoint::daemon_holds(&config.state.dir) => {
                report.state = DaemonState::Starting;
                report.warnings.push(format!(
                    "A sluice process holds {} but does not answer on its control socket yet: starting up? Ask again in a moment",
                    config.state.dir.display()
                ));
            }
            Err(error) => problem(&mut report, &mut problems, error),
        }
    }

    let (source, target) = tokio::join!(read_source(config), read_target(config));
    let mut slot_missing = false;
    match source {
        Ok(sample) => {
            report.source_lsn = Some(sample.source_lsn);
            report.retained_wal_bytes = sample.retained_wal_bytes();
            match sample.slot {
                Some(slot) => {
                    report.confirmed_flush_lsn = slot.confirmed_flush_lsn;
                    report.restart_lsn = slot.restart_lsn;
                    report.wal_status = slot.wal_status;
                    report.safe_wal_size = slot.safe_wal_size;
                    if slot.active {
                        report.warnings.push(format!(
                            "Slot {} is in use by a session although no daemon answers on {}: another sluice with another state.dir, or a dying session",
                            config.source.slot,
                            crate::control::socket::socket_path(&config.state.dir).display()
                        ));
                    }
                }
                None => slot_missing = true,
            }
        }
        Err(error) => problem(&mut report, &mut problems, error),
    }
    let target_has_position = matches!(target, Ok(Some(_)));
    match target {
        // The target's row is the authority for what was applied; the checkpoint may only
        // know a later caught-up (keepalive) position.
        Ok(Some(position)) => {
            // 0/0: only idle keepalives were acknowledged, no transaction applied yet (the
            // running daemon shows null then too).
            report.applied_lsn = Some(position.applied_lsn).filter(|lsn| *lsn > Lsn::ZERO);
            report.caught_up_lsn = report
                .caught_up_lsn
                .max(Some(position.caught_up_lsn))
                .max(Some(position.applied_lsn));
        }
        Ok(None) => {}
        Err(error) => problem(&mut report, &mut problems, error),
    }
    if let Some(source_lsn) = report.source_lsn {
        // Nothing applied yet: the slot's confirmed position is how far the source knows
        // sluice has come.
        let caught_up = report
            .caught_up_lsn
            .or(report.applied_lsn)
            .or(report.confirmed_flush_lsn);
        report.lag_bytes = caught_up.map(|c| source_lsn.bytes_since(c));
    }
    if slot_missing {
        // `run` refuses a new slot once changes were copied or streamed from the old one:
        // the writes since it went are lost. Say the same, as a definite problem, so
        // `lag --until-below` stops waiting for what cannot come.
        let streamed = target_has_position
            || report.caught_up_lsn.is_some_and(|lsn| lsn > Lsn::ZERO)
            || report.tables.iter().any(|t| t.state != TableState::Pending);
        if streamed {
            problem(
                &mut report,
                &mut problems,
                crate::control::monitor::slot_lost_error(
                    &config.source.slot,
                    "is gone from the source, but changes were copied or streamed from it",
                ),
            );
        } else {
            report.warnings.push(format!(
                "Slot {} does not exist on the source: `sluice run` creates it",
                config.source.slot
            ));
        }
    }
    if report.wal_status.as_deref() == Some("lost") {
        let lost = crate::control::monitor::slot_lost_error(
            &config.source.slot,
            "was invalidated by the source (wal_status = lost)",
        );
        problem(&mut report, &mut problems, lost);
    }
    if !problems.is_empty() {
        report.last_error = Some(problems.join("; "));
    }
    report
}

/// A reading that failed: its text for `last_error`, its kind counted in `errors_by_kind`
/// (so `lag --until-below` can stop waiting on what waiting cannot mend).
fn problem(report: &mut StatusReport, problems: &mut Vec<String>, error: crate::error::Error) {
    *report
        .errors_by_kind
        .entry(error.kind().as_str().to_string())
        .or_default() += 1;
    // What the daemon stopped on is often what this reading finds again: said once.
    let text = error.report();
    if !problems.iter().any(|said| said.contains(&text)) {
        problems.push(text);
    }
}

async fn read_source(config: &Config) -> Result<crate::control::monitor::SlotSample> {
    let client = crate::tls::connect(&config.source.conn, "the source").await?;
    sample_slot(&client, &config.source.slot).await
}

async fn read_target(config: &Config) -> Result<Option<checkpoint::TargetPosition>> {
    let client = crate::tls::connect(&config.target.conn, "the target").await?;
    checkpoint::read_target_position(&client, &config.source.slot).await
}

/// The position, the copy's tables, the slot the state dir belongs to, and why the daemon
/// last stopped (when it stopped on an error).
type LocalCheckpoint = (
    Option<checkpoint::Position>,
    Vec<TableStatus>,
    Option<String>,
    Option<String>,
);

/// The sled checkpoint and what the copy recorded per table, when the state dir holds
/// them. Never creates the state dir. With the daemon down a table is `copied` once its
/// copy finished (`streaming` once the whole copy did), else `pending`: an unfinished
/// table is copied again from the start, so its rows so far do not count.
fn read_local_checkpoint(state_dir: &Path) -> Result<LocalCheckpoint> {
    if !checkpoint::sled_path(state_dir).is_dir() {
        return Ok((None, Vec::new(), None, None));
    }
    let store = checkpoint::Store::open(state_dir)?;
    let slot = store.identity()?.map(|identity| identity.slot);
    let copy_finished = crate::snapshot::copy_finished(&store)?;
    let mut tables: Vec<TableStatus> = crate::snapshot::state::load_tables(&store)?
        .into_iter()
        .map(|record| TableStatus {
            name: record.name.to_string(),
            state: match (record.finished, copy_finished) {
                (true, true) => TableState::Streaming,
                (true, false) => TableState::Copied,
                (false, _) => TableState::Pending,
            },
            rows_copied: if record.finished { record.rows } else { 0 },
        })
        .collect();
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((store.position()?, tables, slot, store.stopped_on()?))
}

fn lsn(value: Option<Lsn>) -> String {
    value.map(|l| l.to_string()).unwrap_or_else(|| "-".into())
}

fn bytes(value: Option<u64>) -> String {
    value.map(format_size).unwrap_or_else(|| "-".into())
}

/// The readable summary.
pub fn human(report: &StatusReport, origin: Origin) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        out.push_str(&format!("{label:<22}{value}\n"));
    };
    let state = serde_json::to_value(report.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let how = match origin {
        Origin::Daemon => match report.pid {
            Some(pid) => format!("{state} (daemon pid {pid})"),
            None => state,
        },
        Origin::Direct => format!("{state} (no daemon answers; read from the source and target)"),
        Origin::Unknown => "unknown (the daemon could not be asked)".to_string(),
    };
    line("state", how);
    if let Some(stalled) = report.stalled_seconds {
        line("stalled for", format!("{stalled:.0} s"));
    }
    line(
        "slot",
        match &report.wal_status {
            Some(wal) => format!("{} (wal_status {wal})", report.slot),
            None => report.slot.clone(),
        },
    );
    line("source LSN", lsn(report.source_lsn));
    line("received LSN", lsn(report.received_lsn));
    line("applied LSN", lsn(report.applied_lsn));
    line("confirmed flush LSN", lsn(report.confirmed_flush_lsn));
    line("restart LSN", lsn(report.restart_lsn));
    line(
        "lag",
        format!(
            "{}{}",
            bytes(report.lag_bytes),
            report
                .lag_seconds
                .map(|s| format!(", {s:.1} s"))
                .unwrap_or_default()
        ),
    );
    line(
        "retained WAL",
        format!(
            "{}{}",
            bytes(report.retained_wal_bytes),
            report
                .safe_wal_size
                .map(|s| format!(
                    " ({} more before the source invalidates the slot)",
                    format_size(s.max(0) as u64)
                ))
                .unwrap_or_default()
        ),
    );
    line(
        "applied",
        format!(
            "{} transactions, {} changes",
            report.applied_transactions, report.applied_changes
        ),
    );
    if !report.errors_by_kind.is_empty() {
        let errors: Vec<String> = report
            .errors_by_kind
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        line("errors", errors.join(", "));
    }
    line(
        "last error",
        report.last_error.clone().unwrap_or_else(|| "none".into()),
    );
    for warning in &report.warnings {
        line("warning", warning.clone());
    }
    for build in &report.building {
        line(
            "building",
            format!(
                "{} (for {:.0} s)",
                build.statement,
                (report.reported_at - build.started_at).max(0.0)
            ),
        );
    }
    out.push_str(&tables_section(&report.tables));
    out
}

/// Above this many tables the human status lists only those still on their way (a
/// thousand-table migration would otherwise bury the lines above under its table list);
/// `--json` always has all of them.
const TABLES_LISTED: usize = 50;

fn tables_section(tables: &[TableStatus]) -> String {
    let state_of = |table: &TableStatus| {
        serde_json::to_value(table.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let row = |table: &TableStatus| {
        format!(
            "  {:<40} {:<10} {} rows copied\n",
            table.name,
            state_of(table),
            table.rows_copied
        )
    };
    if tables.is_empty() {
        return String::new();
    }
    if tables.len() <= TABLES_LISTED {
        return std::iter::once("tables:\n".to_string())
            .chain(tables.iter().map(row))
            .collect();
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for table in tables {
        *counts.entry(state_of(table)).or_default() += 1;
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    let mut out = format!(
        "tables: {} ({}); each one: sluice status --json\n",
        tables.len(),
        counts.join(", ")
    );
    let on_their_way: Vec<&TableStatus> = tables
        .iter()
        .filter(|t| !matches!(t.state, TableState::Streaming | TableState::Copied))
        .collect();
    for table in on_their_way.iter().take(TABLES_LISTED) {
        out.push_str(&row(table));
    }
    if on_their_way.len() > TABLES_LISTED {
        out.push_str(&format!(
            "  ... and {} more not copied yet\n",
            on_their_way.len() - TABLES_LISTED
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_the_daemon_stopped_on_is_said_once() {
        let mut report = StatusReport::default();
        let mut problems = vec!["sluice run stopped on: password authentication failed".into()];
        problem(
            &mut report,
            &mut problems,
            crate::error::Error::definite("password authentication failed"),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        problem(
            &mut report,
            &mut problems,
            crate::error::Error::definite("something else"),
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(report.errors_by_kind["definite"], 2);
    }

    fn table(n: usize, state: TableState) -> TableStatus {
        TableStatus {
            name: format!("public.t{n}"),
            state,
            rows_copied: 20,
        }
    }

    #[test]
    fn a_few_tables_are_all_listed() {
        let tables: Vec<TableStatus> = (0..3).map(|n| table(n, TableState::Streaming)).collect();
        let text = tables_section(&tables);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.contains("public.t2"), "{text}");
    }

    #[test]
    fn thousands_of_tables_are_counted_and_only_those_on_their_way_listed() {
        let mut tables: Vec<TableStatus> =
            (0..3000).map(|n| table(n, TableState::Streaming)).collect();
        tables[7].state = TableState::Copying;
        tables[8].state = TableState::Pending;
        let text = tables_section(&tables);
        assert!(
            text.starts_with(
                "tables: 3000 (copying 1, pending 1, streaming 2998); each one: sluice status --json\n"
            ),
            "{text}"
        );
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains("public.t7 ") && text.contains("public.t8 "),
            "{text}"
        );

        for table in tables.iter_mut().take(200) {
            table.state = TableState::Pending;
        }
        let text = tables_section(&tables);
        assert_eq!(text.lines().count(), 1 + TABLES_LISTED + 1, "{text}");
        assert!(
            text.ends_with("  ... and 150 more not copied yet\n"),
            "{text}"
        );
    }
}
