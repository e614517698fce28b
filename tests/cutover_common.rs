//! Shared set-up for the cutover scenarios: one cluster, a source database `src` and a
//! target database `dst` (two databases are enough: sluice only needs them to differ), a
//! config file pointing at them, and a way to run the `sluice` binary.

use std::path::PathBuf;
use std::process::Output;

use crate::support::PgCluster;

pub struct Setup {
    pub pg: PgCluster,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub source: tokio_postgres::Client,
    pub target: tokio_postgres::Client,
}

impl Setup {
    /// A cluster with `src` and `dst`; `extra` is appended to the config file.
    pub async fn new(extra: &str) -> Setup {
        Setup::on(PgCluster::start(), extra).await
    }

    /// The same on a cluster started with settings of its own.
    pub async fn on(pg: PgCluster, extra: &str) -> Setup {
        let source = pg.create_database("src").await;
        let target = pg.create_database("dst").await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sluice.toml");
        std::fs::write(
            &config,
            format!(
                "[source]\nurl = \"{}\"\n\n[target]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\n\n{extra}\n",
                pg.url("src"),
                pg.url("dst"),
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        Setup {
            pg,
            dir,
            config,
            source,
            target,
        }
    }

    /// Runs `sluice <args> --config <config>` with stdin closed (no terminal).
    pub async fn sluice(&self, args: &[&str]) -> Output {
        self.sluice_with(&self.config, args).await
    }

    /// The same with another config file.
    pub async fn sluice_with(&self, config: &std::path::Path, args: &[&str]) -> Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .arg("--config")
            .arg(config)
            .env_remove("SLUICE_SOURCE_URL")
            .env_remove("SLUICE_TARGET_URL")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("run the sluice binary")
    }

    /// Runs the same SQL on source and target.
    pub async fn both(&self, sql: &str) {
        self.source.batch_execute(sql).await.unwrap();
        self.target.batch_execute(sql).await.unwrap();
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Both streams, for assertion messages.
pub fn show(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status.code(),
        stdout(output),
        stderr(output)
    )
}
