//! `sluice verify`: does the target hold the same rows as the source?
//!
//! Per table: row counts on both sides, then content checksums over primary-key ranges.
//! The ranges are cut from the source's keys (every `--chunk-rows` rows); for each range
//! both sides compute `md5(string_agg(md5(ROW(columns)::text), '' ORDER BY key))` with the
//! same SQL, so equal rows in equal order give equal hashes. A range that differs is
//! narrowed down to its keys: both sides list `key, md5(row)` for that range (at most about
//! one chunk of rows in memory) and the keys missing, extra or changed on the target are
//! named. A table without a primary key gets one whole-table checksum over the row hashes
//! sorted by themselves (a multiset comparison: equivalent to ordering by all columns).
//!
//! The columns are the source's, by name, so a target with other column order or extra
//! columns still compares what replication carries. Both sessions pin the settings that
//! shape text output (DateStyle, IntervalStyle, TimeZone, extra_float_digits,
//! bytea_output), and text-like keys are ordered and cut with `COLLATE "C"` so that a
//! target with another default collation still cuts the same ranges.
//!
//! On a live source the two sides are read at slightly different moments, without a common
//! snapshot: a range can differ only because a change was not applied yet. The verdict is
//! exact when writes are stopped and the lag is zero (what `sluice cutover` arranges);
//! otherwise re-run it and look for differences that persist.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::checkpoint;
use crate::config::{glob_matches, Config};
use crate::error::{self, Error, ErrorKind, Result};
use crate::source::{quote_ident, selected_tables, SourceTable, TableName};

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Only these tables (schema.table globs, comma-separated or repeated).
    #[arg(long, value_delimiter = ',', value_name = "GLOB")]
    pub tables: Vec<String>,
    /// Tables compared in parallel (each with one connection per side).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub jobs: usize,
    /// Rows per checksum range.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub chunk_rows: i64,
    /// A differing range is compared again up to N times, each after the target has caught
    /// up with the source's current position (needs a running daemon; 0 to report at once).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub rechecks: u32,
}

/// How many differing keys are named per range.
const MAX_KEYS_SHOWN: usize = 10;

/// Beside `session::rendering_sql` (so `row::text` is the same on both sides): no statement
/// timeout of the database or role cancels a checksum of a large range (verify is run by
/// hand), and rows that row-level security would hide make it fail rather than compare a
/// part.
const VERIFY_SETTINGS: &str = "SET statement_timeout = 0; SET row_security = off";

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub tables: usize,
    /// `schema.table` of the tables that differ.
    pub differing: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.differing.is_empty()
    }
}

/// A column as the source has it.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    /// `format_type` of the source column, to cast key bounds.
    type_name: String,
    collatable: bool,
}

impl Column {
    /// The column as an ordering/comparison expression.
    fn key_expr(&self) -> String {
        if self.collatable {
            format!("{} COLLATE \"C\"", quote_ident(&self.name))
        } else {
            quote_ident(&self.name)
        }
    }

    /// Parameter `$n` as a value of this column's type.
    fn param_expr(&self, n: usize) -> String {
        let cast = format!("${n}::text::{}", self.type_name);
        if self.collatable {
            format!("{cast} COLLATE \"C\"")
        } else {
            cast
        }
    }
}

/// The SQL for one table, built once from the source's catalog.
#[derive(Debug, Clone)]
struct TablePlan {
    key: Vec<Column>,
    row_hash: String,
    order_by: String,
    /// The publication's row filter: only the rows it admits reach the target, so only
    /// they are compared (read on the source side alone).
    source_filter: Option<String>,
    /// The table as the statements read it: `ONLY` for a parent by inheritance, whose
    /// children are tables of their own (compared on their own when selected).
    from: String,
}

/// Which side a statement is for: the source's may carry the publication's row filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

impl TablePlan {
    fn new(name: TableName, columns: &[Column], key: Vec<Column>) -> Self {
        let row = columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let order_by = key
            .iter()
            .map(Column::key_expr)
            .collect::<Vec<_>>()
            .join(", ");
        TablePlan {
            key,
            row_hash: format!("md5(ROW({row})::text)"),
            order_by,
            source_filter: None,
            from: name.quoted(),
        }
    }

    /// `range`, with the row filter in front on the source side.
    fn filtered(&self, side: Side, range: String) -> String {
        match (side, &self.source_filter) {
            (Side::Source, Some(filter)) => format!("({filter}) AND {range}"),
            _ => range,
        }
    }

    fn count_sql(&self, side: Side) -> String {
        format!(
            "SELECT count(*) FROM {} WHERE {}",
            self.from,
            self.filtered(side, "true".to_string())
        )
    }

    /// `WHERE` for `[lower, upper)`; parameters numbered from 1, lower bound first.
    fn range_predicate(&self, lower: bool, upper: bool) -> String {
        let keys = format!("({})", self.order_by);
        let bound = |first: usize| {
            let params: Vec<String> = self
                .key
                .iter()
                .enumerate()
                .map(|(i, c)| c.param_expr(first + i))
                .collect();
            format!("({})", params.join(", "))
        };
        let mut parts = Vec::new();
        if lower {
            parts.push(format!("{keys} >= {}", bound(1)));
        }
        if upper {
            let first = if lower { self.key.len() + 1 } else { 1 };
            parts.push(format!("{keys} < {}", bound(first)));
        }
        if parts.is_empty() {
            "true".to_string()
        } else {
            parts.join(" AND ")
        }
    }

    fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|c| format!("{}::text", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every `chunk`-th key of the source (the starts of all ranges but the first).
    fn boundaries_sql(&self) -> String {
        format!(
            "SELECT {keys} FROM (SELECT {keys_raw}, row_number() OVER (ORDER BY {order}) AS sluice_rn FROM {table} WHERE {filter}) s
             WHERE sluice_rn % $1 = 1 AND sluice_rn > 1 ORDER BY sluice_rn",
            keys = self
                .key
                .iter()
                .map(|c| format!("{}::text", quote_ident(&c.name)))
                .collect::<Vec<_>>()
                .join(", "),
            keys_raw = self
                .key
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", "),
            order = self.order_by,
            table = self.from,
            filter = self.filtered(Side::Source, "true".to_string()),
        )
    }

    /// Row count and the sum of the rows' md5 (as two 64-bit halves). A sum is independent
    /// of row order: no sort, no collation question, and on Citus it is computed on the
    /// shards (an ordered string_agg would pull every row to the coordinator).
    fn checksum_sql(&self, side: Side, lower: bool, upper: bool) -> String {
        format!(
            "SELECT count(*),
                    COALESCE(sum(('x' || substr(h, 1, 16))::bit(64)::bigint), 0)::text,
                    COALESCE(sum(('x' || substr(h, 17, 16))::bit(64)::bigint), 0)::text
             FROM (SELECT {hash} AS h FROM {table} WHERE {range}) s",
            hash = self.row_hash,
            table = self.from,
            range = self.filtered(side, self.range_predicate(lower, upper)),
        )
    }

    fn rows_sql(&self, side: Side, lower: bool, upper: bool) -> String {
        format!(
            "SELECT {keys}, {hash} FROM {table} WHERE {range} ORDER BY {order}",
            keys = self.key_text(),
            hash = self.row_hash,
            table = self.from,
            range = self.filtered(side, self.range_predicate(lower, upper)),
            order = self.order_by,
        )
    }

    /// `id=300`, `code='a b'` or `(a, b)=(1, 'x, y')`: numbers as they are, every other
    /// value as a SQL literal, so `''` and `' '` (or a value holding the separator) stay
    /// apart and the key can be pasted into a WHERE clause.
    fn describe_key(&self, values: &[String]) -> String {
        fn shown(value: &str) -> String {
            let unsigned = value.strip_prefix('-').unwrap_or(value);
            let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
            let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
            if digits(whole) && digits(fraction) {
                value.to_string()
            } else {
                crate::source::quote_literal(value)
            }
        }
        let names: Vec<String> = self
            .key
            .iter()
            .map(|c| crate::source::display_ident(&c.name).into_owned())
            .collect();
        let values: Vec<String> = values.iter().map(|v| shown(v)).collect();
        if self.key.len() == 1 {
            format!("{}={}", names[0], values.first().map_or("", |v| v))
        } else {
            format!("({})=({})", names.join(", "), values.join(", "))
        }
    }

    fn describe_range(&self, lower: Option<&Vec<String>>, upper: Option<&Vec<String>>) -> String {
        format!(
            "[{}, {})",
            lower.map_or("start".to_string(), |k| self.describe_key(k)),
            upper.map_or("end".to_string(), |k| self.describe_key(k)),
        )
    }
}

async fn columns_of(source: &Client, table: &SourceTable) -> Result<(Vec<Column>, Vec<Column>)> {
    let pg = |e| {
        error::pg(
            format!("Reading the columns of {} on the source", table.name),
            e,
        )
    };
    let rows = source
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attcollation <> 0
             FROM pg_attribute a
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&table.oid],
        )
        .await
        .map_err(pg)?;
    let column = |row: &tokio_postgres::Row| Column {
        name: row.get(0),
        type_name: row.get(1),
        collatable: row.get(2),
    };
    let columns = rows.iter().map(column).collect();
    let key_rows = source
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attcollation <> 0
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisprimary
             ORDER BY k.n",
            &[&table.oid],
        )
        .await
        .map_err(pg)?;
    Ok((columns, key_rows.iter().map(column).collect()))
}

async fn pinned(client: &Client, side: &str) -> Result<()> {
    client
        .batch_execute(&format!(
            "{}; {VERIFY_SETTINGS}",
            crate::session::rendering_sql()
        ))
        .await
        .map_err(|e| error::pg(format!("Setting output settings on {side}"), e))
}

/// One table's verdict and the lines that explain it.
struct TableVerdict {
    name: TableName,
    same: bool,
    lines: Vec<String>,
}

fn params(values: &[String]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

async fn verify_table(
    config: &Config,
    table: &SourceTable,
    chunk_rows: i64,
    rechecks: u32,
    stuck: &AtomicBool,
) -> Result<TableVerdict> {
    let (source, target) = super::connect_both(config).await?;
    pinned(&source, "the source").await?;
    pinned(&target, "the target").await?;
    let (mut columns, key) = columns_of(&source, table).await?;
    let published =
        crate::snapshot::plan::published_shape(&source, &config.source.publication, &table.name)
            .await?;
    if let Some(names) = &published.columns {
        columns.retain(|c| names.contains(&c.name));
    }
    let mut plan = TablePlan::new(table.name.clone(), &columns, key);
    plan.source_filter = published.row_filter;
    let quoted = [table.name.quoted()];
    let inherited = !crate::apply::target::inheritance_parents(&source, &quoted)
        .await?
        .is_empty()
        || !crate::apply::target::inheritance_parents(&target, &quoted)
            .await?
            .is_empty();
    if inherited {
        plan.from = format!("ONLY {}", plan.from);
    }
    let name = &table.name;
    let mut lines = Vec::new();

    let exists: bool = target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name.quoted()])
        .await
        .map_err(|e| error::pg(format!("Looking for {name} on the target"), e))?
        .get(0);
    if !exists {
        lines.push(format!(
            "DIFF {name}: missing on the target (run sluice schema, then sluice run)"
        ));
        return Ok(TableVerdict {
            name: name.clone(),
            same: false,
            lines,
        });
    }

    // Schema drift: a column the source has and the target lacks is a difference, not an
    // error of the checksum query.
    let wanted: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    let missing: Vec<String> = target
        .query(
            "SELECT w FROM unnest($1::text[]) AS w
             WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                               WHERE a.attrelid = to_regclass($2) AND a.attname = w
                                 AND a.attnum > 0 AND NOT a.attisdropped)",
            &[&wanted, &name.quoted()],
        )
        .await
        .map_err(|e| error::pg(format!("Reading the columns of {name} on the target"), e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !missing.is_empty() {
        lines.push(format!(
            "DIFF {name}: columns missing on the target: {} (add them, then re-copy the table)",
            missing.join(", ")
        ));
        return Ok(TableVerdict {
            name: name.clone(),
            same: false,
            lines,
        });
    }

    let source_rows: i64 = one(&source, &plan.count_sql(Side::Source), &[], || {
        format!("Counting the rows of {name} on the source")
    })
    .await?
    .get(0);
    let target_rows: i64 = one(&target, &plan.count_sql(Side::Target), &[], || {
        format!("Counting the rows of {name} on the target")
    })
    .await?
    .get(0);
    // Printed when the table differs; on a live source the two counts are reads at
    // different moments, so the checksums (re-checked after catching up) decide.
    if source_rows != target_rows {
        lines.push(format!(
            "DIFF {name}: {source_rows} rows on the source, {target_rows} on the target"
        ));
    }

    let recheck = Recheck {
        source: &source,
        target: &target,
        slot: &config.source.slot,
        rechecks,
        stuck,
        state_dir: &config.state.dir,
    };
    if plan.key.is_empty() {
        let sql = (
            plan.checksum_sql(Side::Source, false, false),
            plan.checksum_sql(Side::Target, false, false),
        );
        let matched = recheck.compare(&sql, &[], name).await?;
        let same = matched.same();
        if !same {
            lines.push(format!(
                "DIFF {name}: contents differ (no primary key: whole-table checksum, rows cannot be named)"
            ));
        } else {
            lines.clear();
            lines.push(format!(
                "OK {name}: {} rows, whole-table checksum matches (no primary key){}",
                matched.rows(),
                matched.note()
            ));
        }
        return Ok(TableVerdict {
            name: name.clone(),
            same,
            lines,
        });
    }

    let boundaries: Vec<Vec<String>> = source
        .query(&plan.boundaries_sql(), &[&chunk_rows])
        .await
        .map_err(|e| error::pg(format!("Choosing key ranges of {name} on the source"), e))?
        .iter()
        .map(|row| (0..plan.key.len()).map(|i| row.get(i)).collect())
        .collect();
    let ranges = boundaries.len() + 1;
    let width = plan.key.len();
    let mut differing_ranges = 0;
    let mut matched_on_recheck = 0;
    for i in 0..ranges {
        let lower = i.checked_sub(1).and_then(|j| boundaries.get(j));
        let upper = boundaries.get(i);
        let bounds: Vec<String> = lower
            .into_iter()
            .chain(upper)
            .flat_map(|k| k.iter().cloned())
            .collect();
        let sql = (
            plan.checksum_sql(Side::Source, lower.is_some(), upper.is_some()),
            plan.checksum_sql(Side::Target, lower.is_some(), upper.is_some()),
        );
        let compared = recheck.compare(&sql, &bounds, name).await?;
        if compared.same() {
            if compared.rechecked {
                matched_on_recheck += 1;
            }
            continue;
        }
        let (on_source, on_target) = (compared.source, compared.target);
        differing_ranges += 1;
        // Narrow down: which keys differ in this range.
        let rows_sql = (
            plan.rows_sql(Side::Source, lower.is_some(), upper.is_some()),
            plan.rows_sql(Side::Target, lower.is_some(), upper.is_some()),
        );
        let keyed = |rows: Vec<tokio_postgres::Row>| {
            rows.iter()
                .map(|r| {
                    let key: Vec<String> = (0..width).map(|i| r.get(i)).collect();
                    (key, r.get::<_, String>(width))
                })
                .collect::<Vec<_>>()
        };
        let source_list = keyed(
            all(&source, &rows_sql.0, &bounds, || {
                format!("Listing rows of {name} on the source")
            })
            .await?,
        );
        let target_list: BTreeMap<Vec<String>, String> = keyed(
            all(&target, &rows_sql.1, &bounds, || {
                format!("Listing rows of {name} on the target")
            })
            .await?,
        )
        .into_iter()
        .collect();
        let differences = diff_rows(&source_list, &target_list);
        let shown: Vec<String> = differences
            .iter()
            .take(MAX_KEYS_SHOWN)
            .map(|(key, what)| format!("{} ({what})", plan.describe_key(key)))
            .collect();
        let more = differences.len().saturating_sub(MAX_KEYS_SHOWN);
        lines.push(format!(
            "DIFF {name} range {}: {} row(s) on the source, {} on the target; {} key(s) differ: {}{}",
            plan.describe_range(lower, upper),
            on_source.0,
            on_target.0,
            differences.len(),
            if shown.is_empty() {
                "none when listed (rows changed while verifying: run again)".to_string()
            } else {
                shown.join(", ")
            },
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    // The ranges decide: on a live source the counts are two reads at different moments.
    let same = differing_ranges == 0;
    if same {
        let note = if matched_on_recheck > 0 {
            format!(" ({matched_on_recheck} after waiting for the target to catch up)")
        } else {
            String::new()
        };
        let counts = if source_rows == target_rows {
            String::new()
        } else {
            " (the counts moved while verifying)".to_string()
        };
        lines.clear();
        lines.push(format!(
            "OK {name}: {source_rows} rows, {ranges} key range(s) match{note}{counts}"
        ));
    }
    Ok(TableVerdict {
        name: name.clone(),
        same,
        lines,
    })
}

async fn one(
    client: &Client,
    sql: &str,
    values: &[String],
    what: impl Fn() -> String,
) -> Result<tokio_postgres::Row> {
    client
        .query_one(sql, &params(values))
        .await
        .map_err(|e| error::pg(what(), e))
}

async fn all(
    client: &Client,
    sql: &str,
    values: &[String],
    what: impl Fn() -> String,
) -> Result<Vec<tokio_postgres::Row>> {
    client
        .query(sql, &params(values))
        .await
        .map_err(|e| error::pg(what(), e))
}

/// One range's checksums on both sides: (rows, sum of hash halves).
struct Compared {
    source: (i64, String, String),
    target: (i64, String, String),
    /// It matched only on a re-check.
    rechecked: bool,
}

impl Compared {
    fn same(&self) -> bool {
        self.source == self.target
    }

    fn rows(&self) -> i64 {
        self.source.0
    }

    fn note(&self) -> &'static str {
        if self.rechecked {
            " after waiting for the target to catch up"
        } else {
            ""
        }
    }
}

/// Compares checksums, and re-compares a difference after the target caught up.
struct Recheck<'a> {
    source: &'a Client,
    target: &'a Client,
    slot: &'a str,
    rechecks: u32,
    /// Shared by every table: once the target is found not to move (sluice run stopped or
    /// stalled), no range waits for it again.
    stuck: &'a AtomicBool,
    state_dir: &'a std::path::Path,
}

/// How long a re-check waits for the target to reach the source's position.
const RECHECK_WAIT: Duration = Duration::from_secs(30);

impl Recheck<'_> {
    async fn checksums(
        &self,
        sql: &(String, String),
        bounds: &[String],
        name: &TableName,
    ) -> Result<Compared> {
        let read = |row: tokio_postgres::Row| {
            (
                row.get::<_, i64>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
            )
        };
        // Both sides at once: half the wall time, and the two reads closer in time.
        let (source, target) = tokio::try_join!(
            one(self.source, &sql.0, bounds, || format!(
                "Checksumming {name} on the source"
            )),
            one(self.target, &sql.1, bounds, || format!(
                "Checksumming {name} on the target"
            )),
        )?;
        let (source, target) = (read(source), read(target));
        Ok(Compared {
            source,
            target,
            rechecked: false,
        })
    }

    async fn compare(
        &self,
        sql: &(String, String),
        bounds: &[String],
        name: &TableName,
    ) -> Result<Compared> {
        let mut compared = self.checksums(sql, bounds, name).await?;
        for _ in 0..self.rechecks {
            if compared.same() || !self.wait_for_catch_up().await? {
                break;
            }
            compared = self.checksums(sql, bounds, name).await?;
            compared.rechecked = true;
        }
        Ok(compared)
    }

    /// Waits until the target's caught-up position passes the source's current one: every
    /// change committed before now is then applied. False when there is no position to
    /// wait for (no daemon ever ran) or it did not get there in time.
    async fn wait_for_catch_up(&self) -> Result<bool> {
        if self.stuck.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if let Some(why) = self.not_streaming().await {
            if !self.stuck.swap(true, Ordering::Relaxed) {
                crate::say!(
                    "NOTE {why}: the target cannot catch up, so differences are reported without waiting for it"
                );
            }
            return Ok(false);
        }
        let goal = super::current_lsn(self.source).await?;
        let started = Instant::now();
        loop {
            let Some(position) = checkpoint::read_target_position(self.target, self.slot).await?
            else {
                return Ok(false);
            };
            let caught_up = position.caught_up_lsn;
            if caught_up >= goal {
                return Ok(true);
            }
            if started.elapsed() >= RECHECK_WAIT {
                if !self.stuck.swap(true, Ordering::Relaxed) {
                    crate::say!(
                        "NOTE the target did not catch up within {RECHECK_WAIT:?} (at {caught_up}, the source at {goal}): differences are reported without waiting again"
                    );
                }
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Why no `sluice run` moves the target now (stopped, stalled, still copying), when
    /// that can be told: its control socket, or, with no daemon on this state dir, whether
    /// a session streams from the slot.
    async fn not_streaming(&self) -> Option<String> {
        use crate::control::DaemonState;
        match crate::control::client::request_status(self.state_dir).await {
            Ok(Some(report)) => match report.state {
                DaemonState::Stalled => Some(format!(
                    "sluice run is stalled ({})",
                    report.last_error.unwrap_or_default()
                )),
                DaemonState::Stopped => Some("sluice run is stopping".to_string()),
                _ => None,
            },
            Ok(None) => {
                let active = crate::source::slot::slot_info(self.source, self.slot)
                    .await
                    .ok()?
                    .is_some_and(|info| info.active);
                (!active).then(|| {
                    format!(
                        "sluice run is not running (no session streams from slot {})",
                        self.slot
                    )
                })
            }
            Err(_) => None,
        }
    }
}

/// Keys that are missing, extra or changed on the target, source order first.
fn diff_rows(
    source: &[(Vec<String>, String)],
    target: &BTreeMap<Vec<String>, String>,
) -> Vec<(Vec<String>, &'static str)> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (key, hash) in source {
        seen.insert(key);
        match target.get(key) {
            None => out.push((key.clone(), "missing on the target")),
            Some(other) if other != hash => out.push((key.clone(), "changed")),
            Some(_) => {}
        }
    }
    for key in target.keys() {
        if !seen.contains(key) {
            out.push((key.clone(), "only on the target"));
        }
    }
    out
}

/// Compares the selected tables (optionally only those matching `only`), `jobs` at a time,
/// printing one block of lines per table.
pub async fn verify(
    config: &Config,
    only: &[String],
    jobs: usize,
    chunk_rows: i64,
    rechecks: u32,
) -> Result<VerifyReport> {
    if chunk_rows < 1 {
        return Err(Error::config("--chunk-rows must be at least 1"));
    }
    if jobs < 1 {
        return Err(Error::config("--jobs must be at least 1"));
    }
    let source = crate::tls::connect(&config.source.conn, "the source").await?;
    let tables: Vec<SourceTable> = selected_tables(&source, &config.tables)
        .await?
        .into_iter()
        .filter(|t| only.is_empty() || only.iter().any(|g| glob_matches(g, &t.name.qualified())))
        .collect();
    drop(source);
    // One refusal, said once, rather than the same one per table.
    drop(crate::tls::connect(&config.target.conn, "the target").await?);
    if tables.is_empty() {
        return Err(Error::config(match only.is_empty() {
            true => "[tables] selects no table on the source: check include/exclude (schema.table globs)",
            false => "No selected table matches --tables: check the names (schema.table globs) and [tables]",
        }));
    }
    let mut report = VerifyReport {
        tables: tables.len(),
        ..VerifyReport::default()
    };
    let stuck = AtomicBool::new(false);
    let mut verdicts = stream::iter(tables.iter())
        .map(|table| verify_table(config, table, chunk_rows, rechecks, &stuck))
        .buffer_unordered(jobs.max(1));
    let mut failed: Option<(ErrorKind, usize)> = None;
    while let Some(verdict) = verdicts.next().await {
        match verdict {
            Ok(verdict) => {
                for line in &verdict.lines {
                    crate::say!("{line}");
                }
                if !verdict.same {
                    report.differing.push(verdict.name.to_string());
                }
            }
            Err(e) => {
                crate::complain!("Error: {}", e.report());
                failed.get_or_insert((e.kind(), 0)).1 += 1;
            }
        }
    }
    if let Some((kind, count)) = failed {
        return Err(Error::new(
            kind,
            format!(
                "Verify could not compare {count} of {} table(s): the errors above say why",
                report.tables
            ),
        ));
    }
    report.differing.sort();
    Ok(report)
}

/// `sluice verify`: exit 0 when every table matches, 1 otherwise.
pub async fn command(config: &Config, args: &VerifyArgs) -> Result<i32> {
    let report = verify(
        config,
        &args.tables,
        args.jobs,
        args.chunk_rows,
        args.rechecks,
    )
    .await?;
    if report.ok() {
        crate::say!("Verify: all {} table(s) match.", report.tables);
        Ok(0)
    } else {
        crate::say!(
            "Verify: {} of {} table(s) differ: {}",
            report.differing.len(),
            report.tables,
            report.differing.join(", ")
        );
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> TablePlan {
        let id = Column {
            name: "id".into(),
            type_name: "integer".into(),
            collatable: false,
        };
        let code = Column {
            name: "Code".into(),
            type_name: "text".into(),
            collatable: true,
        };
        TablePlan::new(
            TableName::new("public", "t"),
            &[id.clone(), code.clone()],
            vec![id, code],
        )
    }

    #[test]
    fn range_predicates_number_their_parameters() {
        let plan = plan();
        assert_eq!(plan.range_predicate(false, false), "true");
        assert_eq!(
            plan.range_predicate(true, true),
            "(\"id\", \"Code\" COLLATE \"C\") >= ($1::text::integer, $2::text::text COLLATE \"C\") AND (\"id\", \"Code\" COLLATE \"C\") < ($3::text::integer, $4::text::text COLLATE \"C\")"
        );
        assert_eq!(
            plan.range_predicate(false, true),
            "(\"id\", \"Code\" COLLATE \"C\") < ($1::text::integer, $2::text::text COLLATE \"C\")"
        );
        assert!(plan
            .checksum_sql(Side::Target, true, false)
            .contains("md5(ROW(\"id\", \"Code\")::text)"));
        // A publication's row filter narrows the source side only.
        let filtered = TablePlan {
            source_filter: Some("(id > 5)".to_string()),
            ..plan
        };
        assert!(filtered
            .checksum_sql(Side::Source, true, false)
            .contains("WHERE ((id > 5)) AND (\"id\""));
        assert!(!filtered
            .checksum_sql(Side::Target, true, false)
            .contains("id > 5"));
        assert!(filtered
            .boundaries_sql()
            .contains("WHERE ((id > 5)) AND true"));
        assert_eq!(
            filtered.count_sql(Side::Target),
            "SELECT count(*) FROM \"public\".\"t\" WHERE true"
        );
    }

    #[test]
    fn keys_and_ranges_read_well() {
        let plan = plan();
        let key = vec!["3".to_string(), "x".to_string()];
        assert_eq!(plan.describe_key(&key), "(id, \"Code\")=(3, 'x')");
        // Text keys that would read the same unquoted stay apart; numbers stay bare.
        let single = TablePlan {
            key: plan.key[..1].to_vec(),
            ..plan.clone()
        };
        assert_eq!(single.describe_key(&["".to_string()]), "id=''");
        assert_eq!(single.describe_key(&[" ".to_string()]), "id=' '");
        assert_eq!(single.describe_key(&["-1.50".to_string()]), "id=-1.50");
        assert_eq!(single.describe_key(&["1e5".to_string()]), "id='1e5'");
        assert_eq!(single.describe_key(&["it's".to_string()]), "id='it''s'");
        assert_eq!(
            plan.describe_range(None, Some(&key)),
            "[start, (id, \"Code\")=(3, 'x'))"
        );
    }

    #[test]
    fn row_differences_are_named_by_kind() {
        let k = |v: &str| vec![v.to_string()];
        let source = vec![
            (k("1"), "a".into()),
            (k("2"), "b".into()),
            (k("3"), "c".into()),
        ];
        let target: BTreeMap<_, _> = [
            (k("1"), "a".into()),
            (k("2"), "B".into()),
            (k("4"), "d".into()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            diff_rows(&source, &target),
            vec![
                (k("2"), "changed"),
                (k("3"), "missing on the target"),
                (k("4"), "only on the target"),
            ]
        );
    }
}
