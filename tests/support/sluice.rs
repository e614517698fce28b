//! Driving the real `sluice` binary against a real source and target.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::cluster::PgCluster;

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// A source and a target cluster, each with database `app` holding the same schema, and a
/// state dir with a `sluice.toml` pointing at both.
pub struct Pair {
    pub source: PgCluster,
    pub target: PgCluster,
    pub dir: tempfile::TempDir,
}

impl Pair {
    /// Both clusters, `schema` run on both `app` databases.
    pub async fn with_schema(schema: &str) -> Pair {
        let source = PgCluster::start();
        let target = PgCluster::start();
        for cluster in [&source, &target] {
            let client = cluster.create_database("app").await;
            if !schema.is_empty() {
                client
                    .batch_execute(schema)
                    .await
                    .unwrap_or_else(|e| panic!("schema: {e}"));
            }
        }
        Pair {
            source,
            target,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub async fn source_client(&self) -> tokio_postgres::Client {
        self.source.connect("app").await
    }

    pub async fn target_client(&self) -> tokio_postgres::Client {
        self.target.connect("app").await
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes `sluice.toml` (copy disabled unless `extra` says otherwise) and returns its path.
    pub fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("sluice.toml");
        let copy = if extra.contains("[copy]") {
            String::new()
        } else {
            "[copy]\nenabled = false\n".to_string()
        };
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n{copy}{extra}\n",
                self.source.dsn("app"),
                self.target.dsn("app"),
                self.state_dir().display()
            ),
        )
        .unwrap();
        path
    }

    /// Writes `NAME.toml` between any two connection strings, with its own slot and
    /// publication (both `name`) and state dir, so several configs share one pair; `extra`
    /// is appended (sections included). Returns its path.
    pub fn config_named(&self, name: &str, source: &str, target: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"{source}\"\nslot = \"{name}\"\npublication = \"{name}\"\n\
                 [target]\nurl = \"{target}\"\n[state]\ndir = \"{}\"\n{extra}\n",
                self.dir.path().join(format!("{name}-state")).display()
            ),
        )
        .unwrap();
        path
    }

    /// Starts `sluice run` and waits until it streams (its slot is active).
    pub async fn start_daemon(&self, config: &Path) -> Daemon {
        let daemon = Daemon::spawn(config, &self.dir.path().join("sluice.log"));
        let source = self.source_client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let active: Option<bool> = source
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 'sluice'",
                    &[],
                )
                .await
                .unwrap()
                .map(|r| r.get(0));
            if active == Some(true) {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not start streaming:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the target has applied everything the source has written so far.
    pub async fn wait_caught_up(&self, daemon: &Daemon) {
        let source = self.source_client().await;
        let target = self.target_client().await;
        let goal: String = source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let reached: Option<bool> = target
                .query_opt(
                    "SELECT caught_up_lsn >= $1::text::pg_lsn FROM sluice.applied_position WHERE slot = 'sluice'",
                    &[&goal],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get(0));
            if reached == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not catch up to {goal}:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the daemon has applied everything, then compares each table.
    pub async fn catch_up_and_compare(&self, daemon: &Daemon, tables: &[&str]) {
        self.wait_caught_up(daemon).await;
        for table in tables {
            self.assert_same(table).await;
        }
    }

    /// Asserts that `table` holds the same rows on both sides.
    pub async fn assert_same(&self, table: &str) {
        let source = digest(&self.source_client().await, table).await;
        let target = digest(&self.target_client().await, table).await;
        assert_eq!(source, target, "{table} differs between source and target");
    }
}

/// Row count and an order-independent digest of a table's rows as text.
pub async fn digest(client: &tokio_postgres::Client, table: &str) -> (i64, String) {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(r, ',' ORDER BY r)), '') FROM (SELECT t::text AS r FROM {table} t) s"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("digest of {table}: {e}"));
    (row.get(0), row.get(1))
}

pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(config: &Path, log: &Path) -> Daemon {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(SLUICE)
            .args(["run", "--config"])
            .arg(config)
            .env("SLUICE_LOG", "info,sluice=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start sluice");
        Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (two minutes at most) until the daemon's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_exit(&mut child, Duration::from_secs(60)).expect("sluice did not stop on SIGTERM")
    }

    /// SIGTERM; the daemon must exit 0 within `limit`.
    pub fn terminate_within(&mut self, limit: Duration) {
        let asked = Instant::now();
        let status = self.terminate();
        assert!(status.success(), "{}", self.log());
        assert!(
            asked.elapsed() < limit,
            "took {:?}:\n{}",
            asked.elapsed(),
            self.log()
        );
    }

    /// Waits for the daemon to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_exit(child, timeout);
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Peak resident set size (VmHWM) in kB, from /proc.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the `sluice` binary to completion with `args`; returns (exit code, stdout, stderr).
pub fn sluice(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(SLUICE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sluice");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
