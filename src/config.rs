//! `sluice.toml`: every key SPEC.md names, validated up front with errors that name the key.
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` structs that refuse unknown
//! keys, then `Config::from_raw` turns strings into typed values (durations, sizes,
//! connection strings, globs) so an error can say `apply.batch_max_delay: ...` rather than
//! a serde message about a string.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::conninfo::ConnInfo;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub target: TargetConfig,
    pub tables: TablesConfig,
    pub copy: CopyConfig,
    pub apply: ApplyConfig,
    pub state: StateConfig,
    pub citus: CitusConfig,
    pub monitor: MonitorConfig,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub conn: ConnInfo,
    pub slot: String,
    pub publication: String,
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub conn: ConnInfo,
}

#[derive(Debug, Clone, Default)]
pub struct TablesConfig {
    /// `schema.table` globs (`*`, `?`); empty means every user table.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CopyConfig {
    pub enabled: bool,
    pub jobs: usize,
    pub split_tables_larger_than: u64,
    pub split_by: SplitBy,
}

/// How a table above `copy.split_tables_larger_than` is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitBy {
    /// Heap-block (ctid) ranges from PostgreSQL 14, primary-key ranges before it.
    Auto,
    /// Heap-block ranges; before PostgreSQL 14 (no TID range scans) tables are copied whole.
    Ctid,
    /// Ranges of a single-column integer primary key; tables without one as under `Auto`.
    PrimaryKey,
}

#[derive(Debug, Clone)]
pub struct ApplyConfig {
    pub batch_max_rows: usize,
    pub batch_max_delay: Duration,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub dir: PathBuf,
}

/// `[citus]`: how `sluice schema` lays out tables on a Citus target.
#[derive(Debug, Clone, Default)]
pub struct CitusConfig {
    /// `"schema.table" = "distribution column"`.
    pub distribute: BTreeMap<String, String>,
    pub reference: Vec<String>,
    pub colocate_with: Option<String>,
}

/// `[monitor]`: WAL-retention safety.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// Warn (logs, status) when the slot retains more WAL than this.
    pub retained_wal_warn: u64,
    /// How often the daemon samples the source's slot and WAL position.
    pub interval: Duration,
}

/// Overrides from the command line and environment (`--source`, `SLUICE_SOURCE_URL`, ...).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub source_url: Option<String>,
    pub target_url: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    source: RawSource,
    #[serde(default)]
    target: RawTarget,
    #[serde(default)]
    tables: RawTables,
    #[serde(default)]
    copy: RawCopy,
    #[serde(default)]
    apply: RawApply,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    citus: RawCitus,
    #[serde(default)]
    monitor: RawMonitor,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: Option<String>,
    slot: Option<String>,
    publication: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    url: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTables {
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    enabled: Option<bool>,
    jobs: Option<i64>,
    split_tables_larger_than: Option<SizeValue>,
    split_by: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApply {
    batch_max_rows: Option<i64>,
    batch_max_delay: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCitus {
    distribute: Option<BTreeMap<String, String>>,
    reference: Option<Vec<String>>,
    colocate_with: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    retained_wal_warn: Option<SizeValue>,
    interval: Option<String>,
}

/// A size written as `"10GB"` or as a plain number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(i64),
    Text(String),
}

pub const DEFAULT_CONFIG_PATH: &str = "./sluice.toml";

impl Config {
    /// Reads and validates the file, then applies overrides (flags win over environment,
    /// environment over the file).
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "Cannot read the configuration file {}: {e}. Pass --config PATH or create ./sluice.toml",
                path.display()
            ))
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    pub fn parse(text: &str, origin: &str, overrides: &Overrides) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's own rendering quotes the offending line, which may hold a URL with its
            // password: say where, and what, without the text.
            let place = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                    format!(
                        " at line {line}, column {column}{}",
                        toml_place(text, span.start)
                    )
                })
                .unwrap_or_default();
            Error::config(format!(
                "Invalid configuration in {origin}{place}: {}",
                plain_serde_message(e.message().trim())
            ))
        })?;
        Self::from_raw(raw, overrides)
    }

    fn from_raw(raw: RawConfig, overrides: &Overrides) -> Result<Config> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        // Errors name where the URL came from, so the operator fixes the right one.
        let source_url = overrides
            .source_url
            .clone()
            .map(|url| (url, "--source"))
            .or_else(|| env("SLUICE_SOURCE_URL").map(|url| (url, "SLUICE_SOURCE_URL")))
            .or(raw.source.url.map(|url| (url, "source.url")))
            .ok_or_else(|| {
                Error::config(
                    "source.url is missing: set it in the config, SLUICE_SOURCE_URL or --source",
                )
            })?;
        let target_url = overrides
            .target_url
            .clone()
            .map(|url| (url, "--target"))
            .or_else(|| env("SLUICE_TARGET_URL").map(|url| (url, "SLUICE_TARGET_URL")))
            .or(raw.target.url.map(|url| (url, "target.url")))
            .ok_or_else(|| {
                Error::config(
                    "target.url is missing: set it in the config, SLUICE_TARGET_URL or --target",
                )
            })?;
        let source_conn = ConnInfo::parse(&source_url.0, source_url.1)?;
        let target_conn = ConnInfo::parse(&target_url.0, target_url.1)?;
        if source_conn.same_database(&target_conn) {
            return Err(Error::config(format!(
                "source.url and target.url name the same database ({}): the target must be another database",
                source_conn.redacted()
            )));
        }

        let state_dir = raw
            .state
            .dir
            .unwrap_or_else(|| PathBuf::from("./sluice-state"));
        if state_dir.as_os_str().is_empty() {
            // An empty path would put the checkpoint store in whatever directory sluice
            // happens to start in.
            return Err(Error::config(
                "state.dir is empty: set it to the directory for sluice's checkpoint store and control socket (default ./sluice-state)",
            ));
        }
        if state_dir.exists() && !state_dir.is_dir() {
            return Err(Error::config(format!(
                "state.dir {} exists and is not a directory: point state.dir at a directory (sluice creates it when missing)",
                state_dir.display()
            )));
        }

        let slot = raw.source.slot.unwrap_or_else(|| "sluice".to_string());
        validate_identifier(&slot, "source.slot")?;
        let publication = raw
            .source
            .publication
            .unwrap_or_else(|| "sluice".to_string());
        validate_identifier(&publication, "source.publication")?;

        let include = raw.tables.include.unwrap_or_default();
        let exclude = raw.tables.exclude.unwrap_or_default();
        for (key, patterns) in [("tables.include", &include), ("tables.exclude", &exclude)] {
            for pattern in patterns {
                validate_table_pattern(pattern, key)?;
            }
        }

        let jobs = raw.copy.jobs.unwrap_or(4);
        if !(1..=64).contains(&jobs) {
            return Err(Error::config(format!(
                "copy.jobs = {jobs}: use a number of parallel copies from 1 to 64"
            )));
        }
        let split = match raw.copy.split_tables_larger_than {
            Some(value) => size_value(value, "copy.split_tables_larger_than")?,
            None => 10 * 1024 * 1024 * 1024,
        };

        let split_by = match raw.copy.split_by.as_deref() {
            None | Some("auto") => SplitBy::Auto,
            Some("ctid") => SplitBy::Ctid,
            Some("primary_key") => SplitBy::PrimaryKey,
            Some(other) => {
                return Err(Error::config(format!(
                    "copy.split_by = {other:?}: use \"auto\", \"ctid\" or \"primary_key\""
                )))
            }
        };

        let batch_max_rows = raw.apply.batch_max_rows.unwrap_or(10_000);
        if !(1..=10_000_000).contains(&batch_max_rows) {
            return Err(Error::config(format!(
                "apply.batch_max_rows = {batch_max_rows}: use a number of rows from 1 to 10000000"
            )));
        }
        let batch_max_delay = match raw.apply.batch_max_delay {
            Some(text) => parse_duration(&text, "apply.batch_max_delay")?,
            None => Duration::from_millis(100),
        };

        let citus = CitusConfig {
            distribute: raw.citus.distribute.unwrap_or_default(),
            reference: raw.citus.reference.unwrap_or_default(),
            colocate_with: raw.citus.colocate_with,
        };
        for table in citus.distribute.keys() {
            validate_qualified_table(table, "citus.distribute")?;
        }
        for table in &citus.reference {
            validate_qualified_table(table, "citus.reference")?;
            if citus.distribute.contains_key(table) {
                return Err(Error::config(format!(
                    "citus: {table} is both distributed and a reference table; choose one"
                )));
            }
        }

        let monitor = MonitorConfig {
            retained_wal_warn: match raw.monitor.retained_wal_warn {
                Some(value) => size_value(value, "monitor.retained_wal_warn")?,
                None => 10 * 1024 * 1024 * 1024,
            },
            interval: match raw.monitor.interval {
                Some(text) => parse_duration(&text, "monitor.interval")?,
                None => Duration::from_secs(1),
            },
        };
        // Each look is a few catalog queries on the source: a nanosecond interval would
        // make the monitor a load generator.
        if monitor.interval < Duration::from_millis(100) {
            return Err(Error::config(
                "monitor.interval must be at least 100ms (it queries the source each time; the default is 1s)",
            ));
        }

        Ok(Config {
            source: SourceConfig {
                conn: source_conn,
                slot,
                publication,
            },
            target: TargetConfig { conn: target_conn },
            tables: TablesConfig { include, exclude },
            copy: CopyConfig {
                enabled: raw.copy.enabled.unwrap_or(true),
                jobs: jobs as usize,
                split_tables_larger_than: split,
                split_by,
            },
            apply: ApplyConfig {
                batch_max_rows: batch_max_rows as usize,
                batch_max_delay,
            },
            state: StateConfig { dir: state_dir },
            citus,
            monitor,
        })
    }
}

/// Slot and publication names go into replication commands unquoted (the transport does
/// not quote them), so only lower-case letters, digits and underscores are allowed.
pub fn validate_identifier(name: &str, key: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{key} = {name:?}: use 1 to 63 lower-case letters, digits and underscores"
        )))
    }
}

fn validate_table_pattern(pattern: &str, key: &str) -> Result<()> {
    let Some((schema, table)) = pattern.split_once('.') else {
        return Err(Error::config(format!(
            "{key}: {pattern:?} must be schema.table (globs allowed: \"public.*\")"
        )));
    };
    // The table part may hold dots: patterns match the name `schema.table` as written, so
    // `public.dot.name` selects a table called "dot.name".
    if schema.is_empty() || table.is_empty() {
        return Err(Error::config(format!(
            "{key}: {pattern:?} must be schema.table (globs allowed: \"public.*\")"
        )));
    }
    Ok(())
}

fn validate_qualified_table(name: &str, key: &str) -> Result<()> {
    validate_table_pattern(name, key)?;
    if name.contains('*') || name.contains('?') {
        return Err(Error::config(format!(
            "{key}: {name:?} must name one table, without globs"
        )));
    }
    Ok(())
}

/// Matches `schema.table` against a glob with `*` (any run) and `?` (one character).
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    fn matches(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => matches(&p[1..], n) || (!n.is_empty() && matches(p, &n[1..])),
            (Some('?'), Some(_)) => matches(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => matches(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    matches(&p, &n)
}

impl TablesConfig {
    /// Whether `schema.table` is selected by include/exclude.
    pub fn selects(&self, qualified: &str) -> bool {
        let included =
            self.include.is_empty() || self.include.iter().any(|p| glob_matches(p, qualified));
        included && !self.exclude.iter().any(|p| glob_matches(p, qualified))
    }
}

/// Parses `"100ms"`, `"5s"`, `"2m"`, `"1h 30m"` (humantime syntax).
pub fn parse_duration(text: &str, key: &str) -> Result<Duration> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        Error::config(format!(
            "{key} = {text:?} is not a duration ({e}); write it like \"100ms\", \"5s\" or \"2m\""
        ))
    })
}

fn size_value(value: SizeValue, key: &str) -> Result<u64> {
    match value {
        SizeValue::Bytes(n) if n >= 0 => Ok(n as u64),
        SizeValue::Bytes(n) => Err(Error::config(format!(
            "{key} = {n}: a size cannot be negative"
        ))),
        SizeValue::Text(text) => parse_size(&text, key),
    }
}

/// Parses `"10GB"`, `"512MB"`, `"64kB"`, `"1TB"`, `"123"` (bytes). Units are powers of 1024,
/// as in PostgreSQL's own settings.
pub fn parse_size(text: &str, key: &str) -> Result<u64> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let bad = || {
        Error::config(format!(
            "{key} = {text:?} is not a size; write it like \"10GB\", \"512MB\" or a number of bytes"
        ))
    };
    let number: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" | "kib" => 1 << 10,
        "mb" | "m" | "mib" => 1 << 20,
        "gb" | "g" | "gib" => 1 << 30,
        "tb" | "t" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    if !number.is_finite() || number < 0.0 {
        return Err(bad());
    }
    Ok((number * multiplier as f64) as u64)
}

/// Bytes as PostgreSQL's `pg_size_pretty` would print them.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 10.0 * 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{:.0} {}", value, UNITS[unit])
    }
}

/// The key (and its table) or the table header at byte `offset` of a TOML text, for an
/// error toml reports without them: a value of the wrong type names neither.
fn toml_place(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header = |l: &str| l.starts_with('[') && l.ends_with(']');
    if header(line) {
        return format!(" (the table {line})");
    }
    let section = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| header(l))
        .map(|l| format!(" in {l}"))
        .unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) => format!(" (key {}{section})", key.trim().trim_matches('"')),
        None => section
            .strip_prefix(' ')
            .map(|s| format!(" ({s})"))
            .unwrap_or_default(),
    }
}

/// serde names Rust types ("expected i64"); the operator wrote TOML.
fn plain_serde_message(message: &str) -> String {
    [
        ("expected i64", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ]
    .iter()
    .fold(message.to_string(), |m, (rust, plain)| {
        m.replace(rust, plain)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [source]
        url = "postgresql://migrator:pw@10.0.0.5:5432/app"
        [target]
        url = "postgresql://citus@coordinator:5432/app"
    "#;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, "test.toml", &Overrides::default())
    }

    #[test]
    fn defaults_follow_the_spec() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.source.slot, "sluice");
        assert_eq!(config.source.publication, "sluice");
        assert!(config.copy.enabled);
        assert_eq!(config.copy.jobs, 4);
        assert_eq!(config.copy.split_tables_larger_than, 10 << 30);
        assert_eq!(config.copy.split_by, SplitBy::Auto);
        assert_eq!(config.apply.batch_max_rows, 10_000);
        assert_eq!(config.apply.batch_max_delay, Duration::from_millis(100));
        assert_eq!(config.state.dir, PathBuf::from("./sluice-state"));
        assert!(config.tables.selects("public.anything"));
    }

    #[test]
    fn toml_errors_say_where_without_quoting_the_line() {
        for (text, line) in [
            (
                "[source]\nurl = \"postgresql://u:hunter2@h/app\n[target]\nurl = \"host=t\"\n",
                "line 2",
            ),
            ("[source]\nurl = postgresql://u:hunter2@h/app\n", "line 2"),
            (
                "[source]\nurl = \"host=s\"\npassword = \"hunter2\"\n[target]\nurl = \"host=t\"\n",
                "line 3",
            ),
        ] {
            let error = parse(text).unwrap_err();
            let message = error.to_string();
            assert_eq!(error.exit_code(), 2);
            assert!(message.contains(line), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn an_empty_or_file_state_dir_is_a_configuration_error() {
        let error = parse(&format!("{MINIMAL}\n[state]\ndir = \"\"\n")).unwrap_err();
        assert!(error.to_string().contains("state.dir is empty"), "{error}");
        let file = std::env::temp_dir().join(format!("sluice-state-file-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        let error = parse(&format!(
            "{MINIMAL}\n[state]\ndir = {:?}\n",
            file.display().to_string()
        ))
        .unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert!(error.to_string().contains("is not a directory"), "{error}");
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn the_spec_example_parses() {
        let config = parse(
            r#"
            [source]
            url = "postgresql://migrator@10.0.0.5:5432/app"
            slot = "sluice"
            publication = "sluice"
            [target]
            url = "postgresql://citus@coordinator:5432/app"
            [tables]
            include = ["public.*"]
            exclude = ["public.audit_logs"]
            [copy]
            enabled = true
            jobs = 4
            split_tables_larger_than = "10GB"
            [apply]
            batch_max_rows = 10000
            batch_max_delay = "100ms"
            [state]
            dir = "./sluice-state"
            "#,
        )
        .unwrap();
        assert!(config.tables.selects("public.orders"));
        assert!(!config.tables.selects("public.audit_logs"));
        assert!(!config.tables.selects("other.orders"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = parse(&format!("{MINIMAL}\n[apply]\nbatch_rows = 5\n")).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("batch_rows"), "{error}");
        assert!(
            error.to_string().contains("(key batch_rows in [apply])"),
            "{error}"
        );
    }

    #[test]
    fn values_of_the_wrong_type_name_their_key_in_toml_words() {
        let error = parse(&format!("{MINIMAL}\n[copy]\njobs = \"four\"\n")).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        let text = error.to_string();
        assert!(text.contains("(key jobs in [copy])"), "{text}");
        assert!(text.contains("expected a whole number"), "{text}");
        let error = parse(&format!("{MINIMAL}\n[source2]\nx = 1\n")).unwrap_err();
        assert!(
            error.to_string().contains("(the table [source2])"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                "[apply]\nbatch_max_delay = \"soon\"",
                "apply.batch_max_delay",
            ),
            ("[apply]\nbatch_max_rows = 0", "apply.batch_max_rows"),
            (
                "[copy]\nsplit_tables_larger_than = \"big\"",
                "copy.split_tables_larger_than",
            ),
            ("[copy]\nsplit_by = \"pk\"", "copy.split_by"),
            ("[copy]\njobs = 0", "copy.jobs"),
            ("[tables]\ninclude = [\"orders\"]", "tables.include"),
            ("[monitor]\ninterval = \"1ns\"", "monitor.interval"),
            (
                "[monitor]\nretained_wal_warn = \"lots\"",
                "monitor.retained_wal_warn",
            ),
        ];
        for (extra, key) in cases {
            let error = parse(&format!("{MINIMAL}\n{extra}\n")).unwrap_err();
            assert_eq!(error.exit_code(), 2);
            assert!(error.to_string().contains(key), "{key}: {error}");
        }
        let error = parse(
            "[source]\nurl = \"postgresql://a:pw@h/d\"\nslot = \"Bad-Slot\"\n[target]\nurl = \"host=t\"",
        )
        .unwrap_err();
        assert!(error.to_string().contains("source.slot"), "{error}");
    }

    #[test]
    fn a_table_name_with_dots_can_be_selected() {
        let config = parse(&format!(
            "{MINIMAL}\n[tables]\ninclude = [\"public.dot.name\", \"public.v?.*\"]\n"
        ))
        .unwrap();
        assert!(config.tables.selects("public.dot.name"));
        assert!(config.tables.selects("public.v1.x"));
        assert!(!config.tables.selects("public.dot"));
    }

    #[test]
    fn bad_urls_are_configuration_errors_without_the_password() {
        let error = parse(
            "[source]\nurl = \"postgresql://u:hunter2@h:99999/d\"\n[target]\nurl = \"host=t\"",
        )
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
        let text = error.to_string();
        assert!(text.contains("source.url"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let overrides = Overrides {
            source_url: Some("host=override dbname=x".into()),
            target_url: None,
        };
        let config = Config::parse(MINIMAL, "t", &overrides).unwrap();
        assert_eq!(config.source.conn.host, "override");
        assert_eq!(config.target.conn.host, "coordinator");
    }

    #[test]
    fn the_target_must_not_be_the_source() {
        let error = parse(
            "[source]\nurl = \"host=h port=5432 dbname=app\"\n[target]\nurl = \"postgresql://x@h:5432/app\"",
        )
        .unwrap_err();
        assert!(error.to_string().contains("same database"), "{error}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("10GB", "k").unwrap(), 10 << 30);
        assert_eq!(parse_size("64kB", "k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1.5MB", "k").unwrap(), 1_572_864);
        assert_eq!(parse_size("123", "k").unwrap(), 123);
        assert!(parse_size("-1GB", "k").is_err());
        assert!(parse_size("12 parsecs", "k").is_err());
        assert_eq!(
            parse_duration("100ms", "k").unwrap(),
            Duration::from_millis(100)
        );
        assert!(parse_duration("fast", "k").is_err());
        assert_eq!(format_size(512), "512 bytes");
        assert_eq!(format_size(20 << 20), "20 MB");
    }

    #[test]
    fn globs() {
        assert!(glob_matches("public.*", "public.orders"));
        assert!(glob_matches("public.order?", "public.orders"));
        assert!(!glob_matches("public.order?", "public.order"));
        assert!(glob_matches("*.*", "a.b"));
        assert!(!glob_matches("public.a*", "public.b"));
    }
}
