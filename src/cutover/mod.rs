//! The migration runbook's first and last steps, one command each:
//!
//! - `schema`: duplicate the selected tables' DDL on the target (pre-data now, indexes and
//!   foreign keys deferred until after the copy), distribute tables on Citus;
//! - `sync-sequences`: sequences do not replicate, so copy their positions;
//! - `verify`: compare source and target per table, narrowing down to the differing keys;
//! - `cutover`: freeze the source, wait for zero lag, sync sequences, verify, report;
//! - `teardown`: drop the slot, the publication and sluice's objects on the target.
//!
//! Everything here runs while the daemon may be streaming (except `teardown`), so it only
//! reads the source, and on the target it touches sequences, sluice's own schema and DDL.

// `sluice cutover` is one of the runbook's commands, named like the others.
#[allow(clippy::module_inception)]
pub mod cutover;
pub mod schema;
pub mod sequences;
pub mod teardown;
pub mod verify;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, Result};

/// Both ends, connected with the TLS their connection strings ask for.
pub(crate) async fn connect_both(
    config: &Config,
) -> Result<(tokio_postgres::Client, tokio_postgres::Client)> {
    let source = crate::tls::connect(&config.source.conn, "the source").await?;
    let target = crate::tls::connect(&config.target.conn, "the target").await?;
    Ok((source, target))
}

/// The source's current WAL position.
pub(crate) async fn current_lsn(source: &tokio_postgres::Client) -> Result<crate::Lsn> {
    let text: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| crate::error::pg("Reading the source's WAL position", e))?
        .get(0);
    text.parse::<crate::Lsn>().map_err(|e| {
        Error::with_source(
            crate::ErrorKind::Definite,
            "The source returned an invalid WAL position",
            e,
        )
    })
}

/// Where a PostgreSQL client tool (`pg_dump`, `pg_restore`) lives: `$PG_BINDIR`, then the
/// PATH, then the newest `/usr/lib/postgresql/*/bin` (Debian installs the tools there
/// without putting every version on the PATH). The newest wins because pg_dump refuses
/// servers newer than itself.
pub fn find_pg_tool(tool: &str) -> Result<PathBuf> {
    let is_tool = |dir: &Path| dir.join(tool).is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        if is_tool(&dir) {
            return Ok(dir.join(tool));
        }
        return Err(Error::config(format!(
            "PG_BINDIR={} has no {tool}: point PG_BINDIR at the bin directory of a PostgreSQL client at least as new as the source",
            dir.display()
        )));
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| is_tool(d)) {
            return Ok(dir.join(tool));
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            is_tool(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin.join(tool)).ok_or_else(|| {
        Error::config(format!(
            "{tool} not found on PATH, in PG_BINDIR or /usr/lib/postgresql/*/bin: install the PostgreSQL client tools (at least the source's major version) or set PG_BINDIR"
        ))
    })
}

/// Asks the operator to type `yes`. `--yes` skips the question; without a terminal on
/// stdin there is nobody to ask, so the answer is no and the caller says to pass `--yes`.
/// Asks on a terminal. Without one and without `--yes` nobody can answer: a usage error
/// (exit 2) naming `what` was left untouched, as a missing flag is.
pub(crate) fn confirm(question: &str, yes: bool, untouched: &str) -> Result<bool> {
    if yes {
        return Ok(true);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::config(format!(
            "No terminal to confirm on and no --yes: {untouched}. Pass --yes to go ahead without asking"
        )));
    }
    crate::say_partial!("{question} Type yes to continue: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Error::with_source(crate::ErrorKind::Definite, "Reading the answer", e))?;
    Ok(answer.trim().eq_ignore_ascii_case("yes"))
}
