//! `GET /metrics`: the status report in the Prometheus text exposition format (0.0.4).
//!
//! A few lines of HTTP/1.x on plain tokio TCP: one request per connection, answered and
//! closed. A scraper needs nothing more, and a web framework would be the biggest dependency
//! of the crate for it. Requests are read with a size bound and a timeout so a stuck or
//! hostile client cannot hold memory or a task for long.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::control::status::{DaemonState, SharedStatus, StatusReport};
use crate::error::{Error, ErrorKind, Result};

/// The request head may be at most this long.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `/metrics` until the returned task is aborted. Must be called
/// inside a tokio runtime.
pub fn serve(addr: SocketAddr, status: SharedStatus) -> Result<JoinHandle<()>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::definite(
            "The metrics endpoint must be served from inside the async runtime",
        ));
    }
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .and_then(TcpListener::from_std)
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("Cannot listen on --metrics-addr {addr}: choose a free address and port"),
                e,
            )
        })?;
    Ok(serve_on(listener, status))
}

/// Serves `/metrics` on a listener the caller bound (tests bind port 0).
pub fn serve_on(listener: TcpListener, status: SharedStatus) -> JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    }
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, status.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

async fn handle(mut stream: TcpStream, status: SharedStatus) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return,
    };
    let first = head.lines().next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (code, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&status.snapshot()),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "Not found: sluice serves /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "Only GET /metrics is served\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads up to the blank line ending the request head; `None` when the client sends more
/// than [`MAX_HEAD`] bytes of head or closes first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            // A bare "GET /metrics" line without headers, then EOF, is still answered.
            return (!buffer.is_empty()).then(|| String::from_utf8_lossy(&buffer).into_owned());
        }
        buffer.extend_from_slice(&chunk[..n]);
        if buffer.windows(4).any(|w| w == b"\r\n\r\n") || buffer.windows(2).any(|w| w == b"\n\n") {
            return Some(String::from_utf8_lossy(&buffer).into_owned());
        }
        if buffer.len() > MAX_HEAD {
            return None;
        }
    }
}

/// The Prometheus text for one status report. Gauges whose value is unknown are left out
/// (absent, not zero, so alerts do not fire on "unknown"); counters are always present.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {}", number(*value));
        }
    };
    let one = |value: Option<f64>| -> Vec<(String, f64)> {
        value.map(|v| vec![(String::new(), v)]).unwrap_or_default()
    };

    metric(
        "sluice_up",
        "gauge",
        "1 while the sluice daemon runs (it is the one answering).",
        &one(Some(1.0)),
    );
    let states = [
        DaemonState::Starting,
        DaemonState::Copying,
        DaemonState::Streaming,
        DaemonState::Stalled,
        DaemonState::Stopped,
    ];
    let state_samples: Vec<(String, f64)> = states
        .iter()
        .map(|state| {
            (
                format!("{{state=\"{}\"}}", state_name(*state)),
                if *state == report.state { 1.0 } else { 0.0 },
            )
        })
        .collect();
    metric(
        "sluice_state",
        "gauge",
        "The daemon's state: 1 for the current one.",
        &state_samples,
    );
    metric(
        "sluice_lag_bytes",
        "gauge",
        "Source WAL position minus the position sluice has caught up to, bytes.",
        &one(report.lag_bytes.map(|v| v as f64)),
    );
    metric(
        "sluice_lag_seconds",
        "gauge",
        "Seconds between the source commit of the last applied transaction and now.",
        &one(report.lag_seconds),
    );
    metric(
        "sluice_applied_transactions_total",
        "counter",
        "Source transactions applied on the target since the daemon started.",
        &one(Some(report.applied_transactions as f64)),
    );
    metric(
        "sluice_applied_changes_total",
        "counter",
        "Row changes applied on the target since the daemon started.",
        &one(Some(report.applied_changes as f64)),
    );
    metric(
        "sluice_retained_wal_bytes",
        "gauge",
        "WAL the replication slot keeps on the source (current position minus restart_lsn), bytes.",
        &one(report.retained_wal_bytes.map(|v| v as f64)),
    );
    metric(
        "sluice_safe_wal_size_bytes",
        "gauge",
        "WAL that can still be written before the source invalidates the slot (pg_replication_slots.safe_wal_size).",
        &one(report.safe_wal_size.map(|v| v as f64)),
    );
    metric(
        "sluice_source_lsn",
        "gauge",
        "The source's current WAL position, as a byte offset.",
        &one(report.source_lsn.map(|l| l.0 as f64)),
    );
    metric(
        "sluice_applied_lsn",
        "gauge",
        "End LSN of the last source commit applied on the target, as a byte offset.",
        &one(report.applied_lsn.map(|l| l.0 as f64)),
    );
    metric(
        "sluice_stalled_seconds",
        "gauge",
        "How long apply has been stalled on an error.",
        &one(report.stalled_seconds),
    );
    let copy: Vec<(String, f64)> = report
        .tables
        .iter()
        .map(|t| {
            (
                format!("{{table=\"{}\"}}", escape_label(&t.name)),
                t.rows_copied as f64,
            )
        })
        .collect();
    metric(
        "sluice_copy_rows_total",
        "counter",
        "Rows copied by the initial snapshot copy, per table.",
        &copy,
    );
    // Every kind is always present so that rate() and increase() work from the first error.
    let mut errors: std::collections::BTreeMap<String, u64> = ["transient", "definite", "apply"]
        .iter()
        .map(|k| (k.to_string(), 0))
        .collect();
    for (kind, count) in &report.errors_by_kind {
        errors.insert(kind.clone(), *count);
    }
    let errors: Vec<(String, f64)> = errors
        .iter()
        .map(|(kind, count)| {
            (
                format!("{{kind=\"{}\"}}", escape_label(kind)),
                *count as f64,
            )
        })
        .collect();
    metric(
        "sluice_errors_total",
        "counter",
        "Errors seen since the daemon started, by kind (transient: retried; definite: fatal; apply: stalls).",
        &errors,
    );
    metric(
        "sluice_warnings",
        "gauge",
        "Number of active warnings (see `sluice status`).",
        &one(Some(report.warnings.len() as f64)),
    );
    metric(
        "sluice_deferred_ddl_building",
        "gauge",
        "Deferred indexes and constraints being built now (see `sluice status`).",
        &one(Some(report.building.len() as f64)),
    );
    out
}

fn state_name(state: DaemonState) -> &'static str {
    match state {
        DaemonState::Starting => "starting",
        DaemonState::Copying => "copying",
        DaemonState::Streaming => "streaming",
        DaemonState::Stalled => "stalled",
        DaemonState::Stopped => "stopped",
    }
}

/// Integers print without a fraction; everything else as Rust prints floats (Prometheus
/// accepts both).
fn number(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else if value.is_nan() {
        "NaN".to_string()
    } else {
        format!("{value}")
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::status::{TableState, TableStatus};

    #[test]
    fn renders_every_family_once() {
        let mut report = StatusReport {
            state: DaemonState::Streaming,
            lag_bytes: Some(1234),
            lag_seconds: Some(0.5),
            applied_transactions: 10,
            applied_changes: 200,
            retained_wal_bytes: Some(16 << 20),
            ..Default::default()
        };
        report.tables.push(TableStatus {
            name: "public.we\"ird".into(),
            state: TableState::Copied,
            rows_copied: 42,
        });
        report.errors_by_kind.insert("apply".into(), 3);
        report
            .building
            .push(crate::control::status::BuildingStatus {
                statement: "CONSTRAINT public.t t_pkey".into(),
                started_at: 1.0,
            });
        let text = render(&report);
        for line in [
            "sluice_up 1",
            "sluice_state{state=\"streaming\"} 1",
            "sluice_state{state=\"stalled\"} 0",
            "sluice_lag_bytes 1234",
            "sluice_lag_seconds 0.5",
            "sluice_applied_transactions_total 10",
            "sluice_applied_changes_total 200",
            "sluice_retained_wal_bytes 16777216",
            "sluice_copy_rows_total{table=\"public.we\\\"ird\"} 42",
            "sluice_errors_total{kind=\"apply\"} 3",
            "sluice_errors_total{kind=\"transient\"} 0",
            "sluice_deferred_ddl_building 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(text.matches("# TYPE sluice_errors_total").count(), 1);
        // unknown gauges are absent, not zero
        assert!(!text.contains("sluice_safe_wal_size_bytes"));
    }
}
