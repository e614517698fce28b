//! `sluice lag [--follow] [--interval DUR] [--until-below BYTES] [--timeout DUR]`.
//!
//! One line per sample: time, state, applied LSN, lag (bytes, humanised, and seconds), apply
//! rate and retained WAL. The rate needs two samples: a one-shot `lag` against a running
//! daemon takes a second sample one interval (at most 1 s) later; from a stopped daemon
//! there is no rate to measure and the first sample is printed at once.
//!
//! With the daemon down the samples come from the source and the target's position row only:
//! `lag --follow` must not open the sled checkpoint every second, or it could keep a daemon
//! that is starting up from taking it.

use std::time::{Duration, Instant};

use clap::Args;

use crate::config::{format_size, parse_duration, parse_size, Config};
use crate::control::status::{unix_now, StatusReport};
use crate::error::{Error, ErrorKind, Result};
use crate::ops::status::{collect, Origin};

#[derive(Debug, Clone, Args)]
pub struct LagArgs {
    /// Print a line every --interval until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Time between samples with --follow or --until-below.
    #[arg(long, value_name = "DUR", default_value = "1s")]
    pub interval: String,
    /// Exit 0 as soon as the lag is at most this many bytes ("10MB", "64kB", "0").
    #[arg(long, value_name = "BYTES")]
    pub until_below: Option<String>,
    /// With --until-below: exit 1 when the lag is still above the bound after this long.
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
}

/// One sample and when it was taken.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    report: StatusReport,
    /// Only a running daemon counts applied changes; without it there is no rate.
    origin: Origin,
}

pub async fn run(config: &Config, args: &LagArgs) -> Result<i32> {
    let interval = parse_duration(&args.interval, "--interval")?;
    if interval.is_zero() {
        return Err(Error::config("--interval must be longer than 0"));
    }
    let bound = args
        .until_below
        .as_deref()
        .map(|text| parse_size(text, "--until-below"))
        .transpose()?;
    let timeout = args
        .timeout
        .as_deref()
        .map(|text| parse_duration(text, "--timeout"))
        .transpose()?;
    if timeout.is_some() && bound.is_none() {
        return Err(Error::config(
            "--timeout only applies with --until-below BYTES",
        ));
    }
    // The daemon's view of the source's position is a sample up to `monitor.interval` old:
    // a commit made just before this command would not count yet, and a script's gate
    // (`sluice lag --until-below 0 && ...`) would pass before it is applied. So the bound is
    // also held against the source's position read now, once.
    let floor = match bound {
        Some(_) => tokio::time::timeout(Duration::from_secs(5), source_position_now(config))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let started = Instant::now();
    // A timeout too long to represent is no timeout.
    let deadline = timeout.and_then(|t| started.checked_add(t));

    let timed_out = |lag: Option<u64>| {
        crate::complain!(
            "Lag is still {} after {}, above --until-below {}: the target has not caught up; check `sluice status` for errors",
            lag.map(format_size).unwrap_or_else(|| "unknown".into()),
            humantime::format_duration(timeout.unwrap_or_default()),
            format_size(bound.unwrap_or_default())
        );
        Ok(1)
    };
    let mut previous: Option<Sample> = None;
    loop {
        // A wedged daemon or a silent source must not hold the answer past --timeout: the
        // last lag seen is the answer then.
        let sample = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, take_sample(config)).await {
                    Ok(sample) => sample,
                    Err(_) => {
                        return timed_out(previous.and_then(|p| p.report.lag_bytes));
                    }
                }
            }
            None => take_sample(config).await,
        };
        let (current, origin) = match sample {
            // Read without a daemon: a wrong password or a missing database will not pass.
            Ok((sample, origin))
                if origin != Origin::Daemon
                    && sample
                        .report
                        .errors_by_kind
                        .contains_key(ErrorKind::Definite.as_str()) =>
            {
                return Err(Error::definite(
                    sample.report.last_error.unwrap_or_default(),
                ));
            }
            Ok(pair) => pair,
            // What may pass (a daemon restarting or wedged, a source restarting): when
            // following or waiting for a bound, print the reason and keep trying. What will
            // not (a wrong password, a missing database, a socket of another user) ends the
            // wait, as it ends a one-shot.
            Err(error)
                if (bound.is_some() || args.follow) && error.kind() == ErrorKind::Transient =>
            {
                (
                    Sample {
                        at: Instant::now(),
                        report: StatusReport {
                            last_error: Some(error.report()),
                            reported_at: unix_now(),
                            ..Default::default()
                        },
                        origin: Origin::Unknown,
                    },
                    Origin::Unknown,
                )
            }
            Err(error) => return Err(error),
        };
        // One-shot against a daemon: take the second sample the rate needs.
        if previous.is_none() && !args.follow && bound.is_none() && origin == Origin::Daemon {
            tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
            previous = Some(current);
            continue;
        }
        crate::say!("{}", line(previous.as_ref(), &current));
        // `lag --follow | head`: nobody reads any more. (With --until-below the exit status
        // is the answer, so the wait goes on.)
        if args.follow && bound.is_none() && crate::output::stdout_closed() {
            return Ok(0);
        }
        if let Some(bound) = bound {
            let caught_up = current.report.caught_up_lsn.or(current.report.applied_lsn);
            let past_floor = match (floor, caught_up) {
                (Some(floor), Some(caught_up)) => floor.bytes_since(caught_up) <= bound,
                (Some(_), None) => false,
                (None, _) => true,
            };
            if past_floor && current.report.lag_bytes.is_some_and(|lag| lag <= bound) {
                // The bound is what was asked (SPEC), but a gate that passes while nothing
                // replicates should say so where a script's log shows it.
                let idle = match (current.origin, current.report.state) {
                    (Origin::Direct, _) => Some("sluice run is not running"),
                    (_, crate::control::DaemonState::Stalled) => Some("sluice run is stalled"),
                    _ => None,
                };
                if let Some(idle) = idle {
                    crate::complain!(
                        "note: the lag is within the bound, but {idle}: the target is not being brought up to date (sluice status says why)"
                    );
                }
                return Ok(0);
            }
            if let Some(deadline) = deadline {
                if Instant::now() >= deadline {
                    return timed_out(current.report.lag_bytes);
                }
            }
        } else if !args.follow {
            // One line, and the lag could not be measured (the source or the target could
            // not be read; with no daemon, no slot or no applied position to measure from):
            // a script's `sluice lag || alert` must not see success.
            let unmeasured = current.report.lag_bytes.is_none()
                && (current.report.last_error.is_some() || origin == Origin::Direct);
            return Ok(if unmeasured { 1 } else { 0 });
        }
        previous = Some(current);
        let mut pause = interval;
        if let Some(deadline) = deadline {
            pause = pause.min(deadline.saturating_duration_since(Instant::now()));
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            // Ctrl-C, or SIGTERM (a service manager, `timeout`): both end a follow cleanly.
            _ = crate::daemon::wait_for_signal() => return Ok(if bound.is_some() { 1 } else { 0 }),
        }
    }
}

/// The source's WAL position now, read directly; `None` when the source cannot be read
/// (the samples then say why).
async fn source_position_now(config: &Config) -> Option<crate::lsn::Lsn> {
    let client = crate::tls::connect(&config.source.conn, "the source")
        .await
        .ok()?;
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .ok()?
        .get(0);
    text.parse().ok()
}

async fn take_sample(config: &Config) -> Result<(Sample, Origin)> {
    let (report, origin) = collect(config, false).await?;
    Ok((
        Sample {
            at: Instant::now(),
            report,
            origin,
        },
        origin,
    ))
}

/// `2026-11-21T12:00:00Z streaming applied 16/B374D848 lag 12 MB 0.4 s rate 1200 changes/s
/// 35 tx/s retained 1 GB`.
fn line(previous: Option<&Sample>, current: &Sample) -> String {
    let report = &current.report;
    let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let state = match current.origin {
        Origin::Unknown => "unknown".to_string(),
        _ => serde_json::to_value(report.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    };
    let applied = report
        .applied_lsn
        .map(|l| l.to_string())
        .unwrap_or_else(|| "-".into());
    let lag_bytes = report
        .lag_bytes
        .map(format_size)
        .unwrap_or_else(|| "-".into());
    let lag_seconds = report
        .lag_seconds
        .map(|s| format!("{s:.1} s"))
        .unwrap_or_else(|| "- s".into());
    let rate = match previous {
        Some(previous) if previous.origin == Origin::Daemon && current.origin == Origin::Daemon => {
            let elapsed = current.at.duration_since(previous.at).as_secs_f64();
            let delta = |now: u64, before: u64| now.saturating_sub(before) as f64 / elapsed;
            if elapsed > 0.0 {
                format!(
                    "{:.0} changes/s {:.0} tx/s",
                    delta(report.applied_changes, previous.report.applied_changes),
                    delta(
                        report.applied_transactions,
                        previous.report.applied_transactions
                    )
                )
            } else {
                "- changes/s - tx/s".into()
            }
        }
        _ => "- changes/s - tx/s".into(),
    };
    let retained = report
        .retained_wal_bytes
        .map(format_size)
        .unwrap_or_else(|| "-".into());
    let mut text = format!(
        "{time} {state} applied {applied} lag {lag_bytes} {lag_seconds} rate {rate} retained {retained}"
    );
    if let Some(error) = &report.last_error {
        text.push_str(" error: ");
        text.push_str(error);
    }
    // A lag that cannot be told says why (the slot not created yet, say); otherwise the
    // warnings are `status`'s to show, not every line's.
    if report.lag_bytes.is_none() && report.last_error.is_none() {
        for warning in &report.warnings {
            text.push_str(" note: ");
            text.push_str(warning);
        }
    }
    text
}
