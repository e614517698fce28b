//! What people see while the copy runs: live bars on a terminal (indicatif), a log line per
//! running table every ten seconds otherwise, and per-table state and rows in the shared
//! status that `sluice status` reports.
//!
//! Workers only bump atomics ([`TableProgress`]); one reporter task turns them into bars,
//! log lines and status, so the hot copy loop never takes a lock or formats text.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, HumanCount, MultiProgress, ProgressBar, ProgressStyle};

use crate::control::{SharedStatus, TableState};

const PENDING: u8 = 0;
const COPYING: u8 = 1;
const COPIED: u8 = 2;

/// Live counters of one table's copy.
#[derive(Debug)]
pub struct TableProgress {
    pub name: String,
    /// `pg_class.reltuples` of the source (0 when never analysed: no ETA then).
    pub estimated_rows: u64,
    rows: AtomicU64,
    bytes: AtomicU64,
    state: AtomicU8,
    started: Mutex<Option<Instant>>,
}

impl TableProgress {
    pub fn new(name: String, estimated_rows: i64) -> Self {
        TableProgress {
            name,
            estimated_rows: u64::try_from(estimated_rows).unwrap_or(0),
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            state: AtomicU8::new(PENDING),
            started: Mutex::new(None),
        }
    }

    pub fn add(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes back what a failed chunk had counted (its rows were rolled back).
    pub fn subtract(&self, rows: u64, bytes: u64) {
        let _ = self
            .rows
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(rows))
            });
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Sets the counters to known totals (chunks already finished before this run).
    pub fn reset_to(&self, rows: u64, bytes: u64) {
        self.rows.store(rows, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn mark_copying(&self) {
        if self
            .state
            .compare_exchange(PENDING, COPYING, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
            started.get_or_insert_with(Instant::now);
        }
    }

    pub fn mark_copied(&self) {
        self.state.store(COPIED, Ordering::Relaxed);
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }

    fn elapsed(&self) -> Duration {
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|s| s.elapsed())
            .unwrap_or_default()
    }
}

/// Runs until dropped (or `finish`ed), drawing and logging from the counters.
pub struct Reporter {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    pub fn start(tables: Vec<Arc<TableProgress>>, status: SharedStatus, terminal: bool) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(report(tables, status, terminal, stopped));
        Reporter {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Draws the final state once and stops.
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn status_state(state: u8) -> TableState {
    match state {
        COPYING => TableState::Copying,
        COPIED => TableState::Copied,
        _ => TableState::Pending,
    }
}

async fn report(
    tables: Vec<Arc<TableProgress>>,
    status: SharedStatus,
    terminal: bool,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let started = Instant::now();
    let tick = if terminal {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(1)
    };
    let mut display = terminal.then(|| Display::new(&tables));
    let mut last_log = Instant::now();
    let mut final_round = false;
    loop {
        for table in &tables {
            status.set_table(&table.name, status_state(table.state()), table.rows());
        }
        match &mut display {
            Some(display) => display.draw(&tables),
            None => {
                if last_log.elapsed() >= Duration::from_secs(10) || final_round {
                    last_log = Instant::now();
                    log_lines(&tables, started.elapsed(), final_round);
                }
            }
        }
        if final_round {
            if let Some(display) = display.take() {
                display.close(&tables);
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = &mut stopped => final_round = true,
        }
    }
}

fn rate(amount: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        amount as f64 / seconds
    } else {
        0.0
    }
}

/// `last`: the copy ended (every table copied, or it stopped on an error).
fn log_lines(tables: &[Arc<TableProgress>], elapsed: Duration, last: bool) {
    for table in tables.iter().filter(|t| t.state() == COPYING) {
        let rows = table.rows();
        let row_rate = rate(rows, table.elapsed());
        let eta = if row_rate > 0.0 && table.estimated_rows > rows {
            format!("{:.0}s", (table.estimated_rows - rows) as f64 / row_rate)
        } else {
            "unknown".to_string()
        };
        tracing::info!(
            table = %table.name,
            rows,
            estimated_rows = table.estimated_rows,
            bytes = table.bytes(),
            rows_per_second = row_rate as u64,
            mb_per_second = format!("{:.1}", rate(table.bytes(), table.elapsed()) / 1e6),
            eta = %eta,
            "copying"
        );
    }
    let rows: u64 = tables.iter().map(|t| t.rows()).sum();
    let bytes: u64 = tables.iter().map(|t| t.bytes()).sum();
    let copied = tables.iter().filter(|t| t.state() == COPIED).count();
    tracing::info!(
        tables_copied = copied,
        tables = tables.len(),
        rows,
        bytes,
        mb_per_second = format!("{:.1}", rate(bytes, elapsed) / 1e6),
        // A copy that stopped on an error reports its last state too; it is not finished.
        finished = last && copied == tables.len(),
        "initial copy progress"
    );
}

/// The terminal display: one overall bar plus one bar per running table.
struct Display {
    multi: MultiProgress,
    overall: ProgressBar,
    bars: Vec<Option<ProgressBar>>,
    started: Instant,
}

impl Display {
    fn new(tables: &[Arc<TableProgress>]) -> Self {
        let multi = MultiProgress::new();
        let total: u64 = tables.iter().map(|t| t.estimated_rows).sum();
        let overall = multi.add(ProgressBar::new(total.max(1)).with_style(style(
            "{prefix:>24} [{bar:30}] {human_pos}/{human_len} rows, {msg}, ETA {eta}",
        )));
        overall.set_prefix("all tables");
        Display {
            multi,
            overall,
            bars: tables.iter().map(|_| None).collect(),
            started: Instant::now(),
        }
    }

    fn draw(&mut self, tables: &[Arc<TableProgress>]) {
        for (table, bar) in tables.iter().zip(self.bars.iter_mut()) {
            match (table.state(), bar.as_ref()) {
                (COPYING, None) => {
                    let new = self.multi.add(
                        ProgressBar::new(table.estimated_rows.max(1)).with_style(style(
                            "{prefix:>24} [{bar:30}] {human_pos}/{human_len} rows, {msg}, ETA {eta}",
                        )),
                    );
                    new.set_prefix(short(&table.name));
                    *bar = Some(new);
                }
                (COPIED, Some(done)) => {
                    done.finish_and_clear();
                    self.multi.remove(done);
                    *bar = None;
                }
                _ => {}
            }
            if let Some(bar) = bar {
                let rows = table.rows();
                if rows > bar.length().unwrap_or(0) {
                    bar.set_length(rows);
                }
                bar.set_position(rows);
                bar.set_message(format!(
                    "{} rows/s, {}, {}/s",
                    HumanCount(rate(rows, table.elapsed()) as u64),
                    HumanBytes(table.bytes()),
                    HumanBytes(rate(table.bytes(), table.elapsed()) as u64)
                ));
            }
        }
        let rows: u64 = tables.iter().map(|t| t.rows()).sum();
        let bytes: u64 = tables.iter().map(|t| t.bytes()).sum();
        if rows > self.overall.length().unwrap_or(0) {
            self.overall.set_length(rows);
        }
        self.overall.set_position(rows);
        let copied = tables.iter().filter(|t| t.state() == COPIED).count();
        let elapsed = self.started.elapsed();
        self.overall.set_message(format!(
            "{} rows/s, {}, {}/s, {copied}/{} tables",
            HumanCount(rate(rows, elapsed) as u64),
            HumanBytes(bytes),
            HumanBytes(rate(bytes, elapsed) as u64),
            tables.len()
        ));
    }

    fn close(self, tables: &[Arc<TableProgress>]) {
        for bar in self.bars.into_iter().flatten() {
            bar.finish_and_clear();
        }
        let rows: u64 = tables.iter().map(|t| t.rows()).sum();
        self.overall
            .set_style(style("{prefix:>24} [{bar:30}] {msg}"));
        self.overall.finish_with_message(format!(
            "{} rows, {} copied in {:.1}s",
            HumanCount(rows),
            HumanBytes(tables.iter().map(|t| t.bytes()).sum()),
            self.started.elapsed().as_secs_f64()
        ));
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Table names longer than the prefix column keep their end (the table, not the schema).
fn short(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= 24 {
        name.to_string()
    } else {
        let tail: String = chars[chars.len() - 23..].iter().collect();
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_chunk_takes_its_rows_back_without_underflow() {
        let table = TableProgress::new("public.t".into(), -1);
        assert_eq!(table.estimated_rows, 0);
        table.add(10, 100);
        table.subtract(4, 40);
        assert_eq!((table.rows(), table.bytes()), (6, 60));
        table.subtract(100, 1000);
        assert_eq!((table.rows(), table.bytes()), (0, 0));
    }

    #[test]
    fn long_names_keep_their_end() {
        assert_eq!(short("public.t"), "public.t");
        let long = short("a_very_long_schema_name.orders_2026");
        assert!(long.ends_with("orders_2026") && long.chars().count() == 24);
    }
}
