//! Command line: global options, one subcommand per runbook step, exit codes per SPEC.md
//! (0 success, 1 a finding or failed check, 2 usage or configuration error).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, Overrides, DEFAULT_CONFIG_PATH};
use crate::error::Result;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Stream a live PostgreSQL database into PostgreSQL or Citus: snapshot copy, then pgoutput change data capture, transactional and exactly once"
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH, value_name = "PATH")]
    pub config: PathBuf,
    /// Source connection string; overrides SLUICE_SOURCE_URL and source.url.
    #[arg(long, global = true, value_name = "URL")]
    pub source: Option<String>,
    /// Target connection string; overrides SLUICE_TARGET_URL and target.url.
    #[arg(long, global = true, value_name = "URL")]
    pub target: Option<String>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Preflight: every prerequisite of the migration, one PASS/WARN/FAIL line each.
    Check(crate::ops::check::CheckArgs),
    /// Status of the daemon and the slot; works whether or not the daemon runs.
    Status(crate::ops::status::StatusArgs),
    /// Replication lag as one line, or tailed with --follow; --until-below for scripts.
    Lag(crate::ops::lag::LagArgs),
    /// The daemon: publication and slot, then stream and apply changes forever (resumes
    /// from its checkpoint; SIGINT/SIGTERM finish or roll back the open transaction).
    Run(RunArgs),
    /// Duplicate the selected tables' schema on the target (indexes and foreign keys deferred
    /// until after the copy; tables distributed on Citus as [citus] says).
    Schema(crate::cutover::schema::SchemaArgs),
    /// Set the target's sequences of the selected tables from the source's positions.
    SyncSequences(crate::cutover::sequences::SyncSequencesArgs),
    /// Compare source and target: row counts, then checksums per primary-key range.
    Verify(crate::cutover::verify::VerifyArgs),
    /// Guided switch: freeze the source (optional), wait for zero lag, sync sequences, verify.
    Cutover(crate::cutover::cutover::CutoverArgs),
    /// Drop the slot, the publication and the target's sluice schema, after confirmation.
    Teardown(crate::cutover::teardown::TeardownArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Cli {
    pub fn load_config(&self) -> Result<Config> {
        Config::load(
            &self.config,
            &Overrides {
                source_url: self.source.clone(),
                target_url: self.target.clone(),
            },
        )
    }
}

/// Logs go to stderr so that stdout stays for command output (`status --json`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // The replication transport logs its own errors as it ends its worker; sluice reports
    // the same error itself, with context (which connection, what to do), so the
    // transport's line is noise by default (`SLUICE_LOG=debug,pgwire_replication=debug`
    // shows it).
    let filter = EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pgwire_replication=off"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal; log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { 2 } else { 0 };
            let _ = error.print();
            return code;
        }
    };
    init_logging(cli.log_format);
    crate::tls::install_crypto_provider();
    // One thread: the pipeline hands every row change from task to task (transport,
    // reader, builder, executor, connection), and across threads each hand-off costs a
    // futex wake-up that outweighs the work. Measured: several times the CPU per change
    // with the multi-threaded runtime (docs/benchmarks.md). Disk syncs run on the
    // blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            crate::complain!("Error: cannot start the async runtime: {error}");
            return 1;
        }
    };
    let result: Result<i32> = runtime.block_on(async move {
        match &cli.command {
            Command::Run(args) => {
                let config = cli.load_config()?;
                crate::daemon::run(
                    config,
                    crate::daemon::RunOptions {
                        metrics_addr: args.metrics_addr,
                    },
                )
                .await?;
                Ok(0)
            }
            Command::Check(args) => crate::ops::check::run(&cli.load_config()?, args).await,
            Command::Status(args) => crate::ops::status::run(&cli.load_config()?, args).await,
            Command::Lag(args) => crate::ops::lag::run(&cli.load_config()?, args).await,
            Command::Schema(args) => {
                crate::cutover::schema::command(&cli.load_config()?, args).await
            }
            Command::SyncSequences(args) => {
                crate::cutover::sequences::command(&cli.load_config()?, args).await
            }
            Command::Verify(args) => {
                crate::cutover::verify::command(&cli.load_config()?, args).await
            }
            Command::Cutover(args) => {
                crate::cutover::cutover::command(&cli.load_config()?, args).await
            }
            Command::Teardown(args) => {
                crate::cutover::teardown::command(&cli.load_config()?, args).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            crate::complain!("Error: {}", error.report());
            error.exit_code()
        }
    }
}
