//! Helpers for the operations tests (`status`, `lag`, `check`, socket, metrics): a config
//! file for the sluice binary and a way to run it with a deadline.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// A URL nothing listens on (port 1 is never a PostgreSQL server here): for commands that
/// must not need a database, and for "unreachable" scenarios.
pub fn unreachable_url(dbname: &str) -> String {
    format!("postgresql://postgres:sekret@127.0.0.1:1/{dbname}")
}

/// Writes `sluice.toml` into `dir` and returns its path.
pub fn write_config(
    dir: &Path,
    source: &str,
    target: &str,
    state_dir: &Path,
    extra: &str,
) -> PathBuf {
    let path = dir.join("sluice.toml");
    let text = format!(
        "[source]\nurl = {source:?}\n[target]\nurl = {target:?}\n[state]\ndir = {:?}\n{extra}\n",
        state_dir.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The sluice binary with `--config PATH` and the given arguments, environment overrides
/// cleared so the developer's shell cannot leak in.
pub fn sluice(config: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("SLUICE_SOURCE_URL")
        .env_remove("SLUICE_TARGET_URL")
        .env_remove("SLUICE_LOG")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    command
}

/// Runs to completion; panics when it takes longer than `limit`. A binary the test has just
/// written may still be open for writing in a child another test thread forked meanwhile
/// (until that child execs): "Text file busy" is waited out.
pub async fn run(mut command: tokio::process::Command, limit: Duration) -> Output {
    for _ in 0..100 {
        match tokio::time::timeout(limit, command.output()).await {
            Err(_) => panic!("{command:?} did not finish within {limit:?}"),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(result) => return result.expect("run the sluice binary"),
        }
    }
    panic!("{command:?}: the binary stayed busy (Text file busy)")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `status --json` output parsed.
pub fn parse_json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}):\nstdout: {}\nstderr: {}",
            stdout(output),
            stderr(output)
        )
    })
}

/// The (uid, gid) of the `postgres` OS user, when the tests run as root.
pub fn postgres_user_when_root() -> Option<(u32, u32)> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
}

/// A temp dir other users may enter (tempfile makes them 0700), for files a non-root child
/// must reach.
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}
