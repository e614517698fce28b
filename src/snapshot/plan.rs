//! How one table is copied: its column list, the COPY format, and its chunks.
//!
//! **Chunks are ctid ranges by heap block** (`ctid >= '(N,0)' AND ctid < '(M,0)'`) from
//! PostgreSQL 14: such a predicate is a TID range scan that reads only blocks N to M-1, so
//! chunks cost what their share of the table costs, whatever the key looks like (none,
//! composite, skewed, text), and each is a sequential read. The last chunk has no upper
//! bound: rows that sit in blocks beyond the size seen at planning time are still copied.
//!
//! **Before 14 a ctid predicate scans the whole table**, so there a large table is split by
//! its primary key when that is one integer column (`id >= a AND id < b`, read through the
//! key's index): cut at the quantiles of the column's histogram in `pg_stats` (equal rows
//! per chunk however the ids are spread), or evenly between its minimum and maximum when the
//! table was never analyzed. The first and last chunks are open-ended. A table without
//! such a key is copied whole there. `copy.split_by` overrides the choice per run. A partitioned table is
//! copied partition by partition (each leaf a chunk, a large leaf split by its own blocks the
//! same way), read from the leaf and written through the target's root, which routes the
//! rows (the target may be partitioned differently, or not at all).
//!
//! **Binary COPY** only when every column's type is built in (OID below 10000: the same OID
//! in every cluster, also inside arrays) and the target column has the same type; a user
//! type, a domain, or a type that differs on the target goes as text, which the target
//! parses by name. Two kinds of built-in types go as text too: the `reg*` types (`regclass`,
//! `regtype`, ...), whose binary form is the referenced object's OID, which names something
//! else (or nothing) in another cluster, while their text form is the name; and types
//! without a binary form (`aclitem`), on which a binary COPY fails.

use tokio_postgres::Client;

use crate::config::SplitBy;
use crate::error::{self, Error, Result};
use crate::snapshot::state::ChunkRange;
use crate::source::{quote_ident, quote_literal, SourceTable, TableName};

/// OIDs below this are assigned at initdb from the catalogs' source (genbki): identical in
/// every cluster of a major version.
const FIRST_NON_BUILTIN_OID: u32 = 10_000;

/// What the copy of one table needs to know.
#[derive(Debug, Clone)]
pub struct TableLayout {
    pub name: TableName,
    /// Quoted column names, in source order (the target's order may differ: both sides
    /// name them explicitly).
    pub columns: Vec<String>,
    pub binary: bool,
    pub source_partitioned: bool,
    pub target_partitioned: bool,
    /// The leaf partitions of a partitioned source table, by OID (empty otherwise).
    pub leaves: Vec<Leaf>,
    /// The quoted primary-key column that `ChunkRange::Keys` chunks are ranges of.
    pub split_key: Option<String>,
    /// The publication's row filter for the table (PostgreSQL 15+), as SQL.
    pub row_filter: Option<String>,
}

/// One leaf partition of a partitioned source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub name: TableName,
    /// Heap blocks, and bytes with TOAST (what chunking and weights go by).
    pub blocks: u64,
    pub bytes: u64,
    /// A plain table (ctid ranges work), not a foreign table.
    pub heap: bool,
    /// The copy's user may read the partition itself (reading through the root checks only
    /// the root's privileges); without it the table is read whole through its root.
    pub readable: bool,
}

/// Reads the source and target catalogs for `table`. Errors name the table and what the
/// operator should fix on the target.
/// The tables of `names` the target lacks, named for messages.
pub async fn missing_on_target(target: &Client, names: &[&TableName]) -> Result<Vec<String>> {
    let quoted: Vec<String> = names.iter().map(|n| n.quoted()).collect();
    let rows = target
        .query(
            "SELECT q FROM unnest($1::text[]) AS q WHERE to_regclass(q) IS NULL",
            &[&quoted],
        )
        .await
        .map_err(|e| error::pg("Looking for the selected tables on the target", e))?;
    let absent: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok(names
        .iter()
        .filter(|n| absent.contains(&n.quoted()))
        .map(|n| n.to_string())
        .collect())
}

/// Columns generated on the source (`GENERATED ALWAYS AS (...) STORED`) that are plain
/// columns on the target: PostgreSQL sends no value for a generated column (neither the copy
/// nor pgoutput before 18), so the target's column would stay NULL, or its default, for good
/// without an error. One line per column, with the statements that make it generated on the
/// target too.
pub async fn generated_only_on_source(
    source: &Client,
    target: &Client,
    names: &[&TableName],
) -> Result<Vec<String>> {
    let schemas: Vec<&str> = names.iter().map(|n| n.schema.as_str()).collect();
    let tables: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
    let columns_query = |generated: &'static str| {
        format!(
            "SELECT n.nspname::text, c.relname::text, a.attname::text,
                    format_type(a.atttypid, a.atttypmod),
                    COALESCE(pg_get_expr(d.adbin, d.adrelid), '')
             FROM unnest($1::text[], $2::text[]) AS u(s, t)
             JOIN pg_namespace n ON n.nspname = u.s
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = u.t
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attgenerated {generated}"
        )
    };
    let on_source = source
        .query(&columns_query("<> ''"), &[&schemas, &tables])
        .await
        .map_err(|e| error::pg("Reading the generated columns of the selected tables", e))?;
    if on_source.is_empty() {
        return Ok(Vec::new());
    }
    let plain_on_target: std::collections::HashSet<(String, String, String)> = target
        .query(&columns_query("= ''"), &[&schemas, &tables])
        .await
        .map_err(|e| {
            error::pg(
                "Reading the columns of the selected tables on the target",
                e,
            )
        })?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(on_source
        .iter()
        .filter(|r| plain_on_target.contains(&(r.get(0), r.get(1), r.get(2))))
        .map(|r| {
            let table = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let column: String = r.get(2);
            let type_text: String = r.get(3);
            let expression: String = r.get(4);
            let column_sql = quote_ident(&column);
            format!(
                "{table}.{} is GENERATED ALWAYS AS ({expression}) STORED on the source but a plain column on the target, where it would stay empty (PostgreSQL sends no values for generated columns): ALTER TABLE {} DROP COLUMN {column_sql}, ADD COLUMN {column_sql} {type_text} GENERATED ALWAYS AS ({expression}) STORED",
                crate::source::display_ident(&column),
                table.quoted()
            )
        })
        .collect())
}

/// The tables of `names` that hold at least one row on the target, as `schema.table`.
pub async fn holding_rows_on_target(target: &Client, names: &[&TableName]) -> Result<Vec<String>> {
    let mut holding = Vec::new();
    for name in names {
        let has_rows: bool = target
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", name.quoted()),
                &[],
            )
            .await
            .map_err(|e| error::pg(format!("Checking that {name} is empty on the target"), e))?
            .get(0);
        if has_rows {
            holding.push(name.to_string());
        }
    }
    Ok(holding)
}

/// Columns of `tables` whose target type would change the copied values without an error
/// (`apply::target::would_alter_values`: a smaller numeric scale or time precision, a float
/// of fewer digits), as `schema.table.column (source type → target type)`. Checked before
/// any slot exists: COPY rounds them silently, as apply would.
pub async fn lossy_columns_on_target(
    source: &Client,
    target: &Client,
    tables: &[&TableName],
) -> Result<Vec<String>> {
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let query = "SELECT n.nspname::text, c.relname::text, a.attname::text, a.atttypid, a.atttypmod,
                        format_type(a.atttypid, a.atttypmod)
                 FROM unnest($1::text[], $2::text[]) AS u(s, r)
                 JOIN pg_namespace n ON n.nspname = u.s
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = u.r
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped";
    type Columns = std::collections::HashMap<(String, String, String), (u32, i32, String)>;
    async fn read(
        client: &Client,
        query: &str,
        schemas: &[&str],
        names: &[&str],
        side: &str,
    ) -> Result<Columns> {
        let rows = client
            .query(query, &[&schemas, &names])
            .await
            .map_err(|e| {
                error::pg(
                    format!("Reading the copied tables' column types on the {side}"),
                    e,
                )
            })?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    (r.get(0), r.get(1), r.get(2)),
                    (r.get(3), r.get(4), r.get(5)),
                )
            })
            .collect())
    }
    let on_source = read(source, query, &schemas, &names, "source").await?;
    let on_target = read(target, query, &schemas, &names, "target").await?;
    let mut lossy: Vec<String> = on_source
        .iter()
        .filter_map(|(key, (oid, modifier, text))| {
            let (target_oid, target_mod, target_text) = on_target.get(key)?;
            crate::apply::target::would_alter_values((*oid, *modifier), (*target_oid, *target_mod))
                .then(|| format!("{}.{}.{} ({text} → {target_text})", key.0, key.1, key.2))
        })
        .collect();
    lossy.sort();
    Ok(lossy)
}

pub async fn table_layout(
    source: &Client,
    target: &Client,
    table: &SourceTable,
) -> Result<TableLayout> {
    let name = &table.name;
    // Generated columns are computed by the target itself; COPY cannot write them.
    let source_columns = source
        .query(
            "SELECT a.attname::text, a.atttypid,
                    t.typsend::oid <> 0 AND t.typreceive::oid <> 0
                    AND (e.oid IS NULL OR (e.typsend::oid <> 0 AND e.typreceive::oid <> 0))
                    AND COALESCE(e.oid, t.oid) NOT IN (24, 2202, 2203, 2204, 2205, 2206,
                                                       3734, 3769, 4089, 4096, 4191)
             FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&table.oid],
        )
        .await
        .map_err(|e| error::pg(format!("Reading the columns of {name} on the source"), e))?;
    let target_rel = target
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(|e| error::pg(format!("Looking for {name} on the target"), e))?
        .ok_or_else(|| {
            Error::definite(format!(
                "Table {name} does not exist on the target: create the schema first (`sluice schema`), or exclude the table in [tables]"
            ))
        })?;
    let target_oid: u32 = target_rel.get(0);
    let target_kind: String = target_rel.get(1);
    let target_columns = target
        .query(
            "SELECT a.attname::text, a.atttypid, a.attgenerated::text
             FROM pg_attribute a
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&target_oid],
        )
        .await
        .map_err(|e| error::pg(format!("Reading the columns of {name} on the target"), e))?;

    let mut columns = Vec::with_capacity(source_columns.len());
    let mut binary = true;
    for row in &source_columns {
        let column: String = row.get(0);
        let type_oid: u32 = row.get(1);
        let on_target = target_columns
            .iter()
            .find(|t| t.get::<_, String>(0) == column)
            .ok_or_else(|| {
                Error::definite(format!(
                    "Column {column} of {name} is missing on the target: add it there (or recreate the table with `sluice schema`)"
                ))
            })?;
        if !on_target.get::<_, String>(2).is_empty() {
            return Err(Error::definite(format!(
                "Column {column} of {name} is a generated column on the target but not on the source: make it a plain column on the target"
            )));
        }
        let target_type: u32 = on_target.get(1);
        let portable_binary: bool = row.get(2);
        binary &= type_oid < FIRST_NON_BUILTIN_OID && target_type == type_oid && portable_binary;
        columns.push(quote_ident(&column));
    }
    let leaves = if table.is_partitioned {
        leaves_of(source, table).await?
    } else {
        Vec::new()
    };
    Ok(TableLayout {
        name: name.clone(),
        columns,
        binary,
        source_partitioned: table.is_partitioned,
        target_partitioned: target_kind == "p",
        leaves,
        split_key: None,
        row_filter: None,
    })
}

/// The leaf partitions of a partitioned source table, at every level.
async fn leaves_of(source: &Client, table: &SourceTable) -> Result<Vec<Leaf>> {
    let rows = source
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relkind = 'r',
                    (pg_relation_size(c.oid, 'main') / current_setting('block_size')::int8)::int8,
                    COALESCE(pg_total_relation_size(c.oid) - pg_indexes_size(c.oid), 0)::int8,
                    has_table_privilege(c.oid, 'SELECT')
             FROM pg_partition_tree($1::oid::regclass) p
             JOIN pg_class c ON c.oid = p.relid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE p.isleaf AND c.relkind IN ('r', 'f')
             ORDER BY c.oid",
            &[&table.oid],
        )
        .await
        .map_err(|e| {
            error::pg(
                format!("Listing the partitions of {} on the source", table.name),
                e,
            )
        })?;
    Ok(rows
        .iter()
        .map(|row| Leaf {
            name: TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            heap: row.get(2),
            blocks: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
            bytes: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
            readable: row.get(5),
        })
        .collect())
}

/// Splits a table into chunks of about `chunk_bytes` each: at `key_cuts` when given (from
/// [`key_split`]), else by its heap blocks, or keeps it whole when it is small or the source
/// is older than PostgreSQL 14. A partitioned table gets a chunk per leaf partition
/// (`leaves`, from its layout), a large leaf several.
pub fn plan_chunks(
    table: &SourceTable,
    heap_blocks: u64,
    chunk_bytes: u64,
    tid_range_scans: bool,
    leaves: &[Leaf],
    key_cuts: Option<&[i64]>,
) -> Vec<ChunkRange> {
    if let Some(cuts) = key_cuts.filter(|c| !c.is_empty() && !table.is_partitioned) {
        return key_ranges(cuts);
    }
    if table.is_partitioned {
        // No partitions: nothing to read, but the table still needs its one chunk. A
        // partition the user may not read directly: through the root, whole.
        if leaves.is_empty() || leaves.iter().any(|l| !l.readable) {
            return vec![ChunkRange::Whole];
        }
        let mut chunks = Vec::new();
        for (index, leaf) in leaves.iter().enumerate() {
            let leaf_index = u32::try_from(index).unwrap_or(u32::MAX);
            let ranges = if leaf.heap && tid_range_scans {
                block_ranges(leaf.bytes, leaf.blocks, chunk_bytes)
            } else {
                None
            };
            match ranges {
                Some(ranges) => {
                    chunks.extend(ranges.into_iter().map(|(first, end)| ChunkRange::Leaf {
                        leaf: leaf_index,
                        first,
                        end,
                    }))
                }
                None => chunks.push(ChunkRange::Leaf {
                    leaf: leaf_index,
                    first: 0,
                    end: None,
                }),
            }
        }
        return chunks;
    }
    let size = u64::try_from(table.size_bytes).unwrap_or(0);
    let ranges = if tid_range_scans {
        block_ranges(size, heap_blocks, chunk_bytes)
    } else {
        None
    };
    match ranges {
        Some(ranges) => ranges
            .into_iter()
            .map(|(first, end)| ChunkRange::Blocks { first, end })
            .collect(),
        None => vec![ChunkRange::Whole],
    }
}

/// Block ranges `[first, end)` of about `chunk_bytes` each covering a relation of `size`
/// bytes in `heap_blocks` blocks, the last one open; `None` when it is not worth splitting.
fn block_ranges(size: u64, heap_blocks: u64, chunk_bytes: u64) -> Option<Vec<(u64, Option<u64>)>> {
    let count = chunk_count(size, chunk_bytes).min(heap_blocks);
    if count < 2 {
        return None;
    }
    let per_chunk = heap_blocks.div_ceil(count);
    let mut ranges = Vec::new();
    let mut first = 0;
    while first < heap_blocks {
        let end = first + per_chunk;
        ranges.push((first, (end < heap_blocks).then_some(end)));
        first = end;
    }
    Some(ranges)
}

/// How many chunks a table of `size` bytes is cut into at `chunk_bytes` each; 1: whole.
pub fn chunk_count(size: u64, chunk_bytes: u64) -> u64 {
    if chunk_bytes == 0 || size <= chunk_bytes {
        return 1;
    }
    // Bounded so a tiny threshold on a huge table cannot plan millions of chunks.
    size.div_ceil(chunk_bytes).clamp(2, 10_000)
}

/// Whether a large table is split by its primary key (when it has a usable one) rather
/// than by ctid: always when asked, by default only where ctid ranges cannot be read
/// without a whole-table scan (before PostgreSQL 14).
pub fn splits_by_key(split_by: SplitBy, tid_range_scans: bool) -> bool {
    match split_by {
        SplitBy::Auto => !tid_range_scans,
        SplitBy::Ctid => false,
        SplitBy::PrimaryKey => true,
    }
}

/// Chunks `[.., c1), [c1, c2), .., [ck, ..)` for increasing cuts.
fn key_ranges(cuts: &[i64]) -> Vec<ChunkRange> {
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut lower = None;
    for &cut in cuts {
        chunks.push(ChunkRange::Keys {
            lower,
            upper: Some(cut),
        });
        lower = Some(cut);
    }
    chunks.push(ChunkRange::Keys { lower, upper: None });
    chunks
}

/// The single-column integer primary key a table's chunks can be ranges of, and where to
/// cut it into `count` chunks; `None` when the table has no such key, or is empty.
pub async fn key_split(
    source: &Client,
    table: &SourceTable,
    count: u64,
) -> Result<Option<(String, Vec<i64>)>> {
    let name = &table.name;
    let Some(column) = integer_key(source, table).await? else {
        return Ok(None);
    };
    let quoted = quote_ident(&column);
    // Both ends of the key's index: two index probes, not a scan.
    let span = source
        .query_one(
            &format!(
                "SELECT min({quoted})::int8, max({quoted})::int8 FROM ONLY {}",
                name.quoted()
            ),
            &[],
        )
        .await
        .map_err(|e| {
            error::pg(
                format!("Reading the range of {name}'s primary key {column} on the source"),
                e,
            )
        })?;
    let (Some(min), Some(max)) = (span.get::<_, Option<i64>>(0), span.get::<_, Option<i64>>(1))
    else {
        return Ok(None);
    };
    // Equal-depth bounds from the last ANALYZE; readable wherever the column is.
    let histogram: Option<String> = source
        .query_opt(
            "SELECT histogram_bounds::text FROM pg_stats
             WHERE schemaname = $1 AND tablename = $2 AND attname = $3 AND NOT inherited",
            &[&name.schema, &name.name, &column],
        )
        .await
        .map_err(|e| error::pg(format!("Reading the statistics of {name} on the source"), e))?
        .and_then(|row| row.get(0));
    let histogram = histogram
        .map(|text| parse_int_array(&text))
        .unwrap_or_default();
    Ok(Some((quoted, key_cuts(min, max, &histogram, count))))
}

/// The table's primary key when it is one `smallint`, `integer` or `bigint` column.
pub async fn integer_key(source: &Client, table: &SourceTable) -> Result<Option<String>> {
    let key = source
        .query_opt(
            "SELECT a.attname::text
             FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid = $1 AND i.indisprimary AND i.indnatts = 1
               AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)",
            &[&table.oid],
        )
        .await
        .map_err(|e| {
            error::pg(
                format!("Reading the primary key of {} on the source", table.name),
                e,
            )
        })?;
    Ok(key.map(|row| row.get(0)))
}

/// `{1,2,3}` as integers; empty when any element is not one.
fn parse_int_array(text: &str) -> Vec<i64> {
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    inner
        .split(',')
        .map(|v| v.trim().parse::<i64>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .unwrap_or_default()
}

/// Where to cut keys in `[min, max]` into `count` chunks of about equal rows: at the
/// quantiles of `histogram` (sorted equal-depth bounds) when there is one, else evenly.
/// Cuts are strictly increasing and inside `(min, max]`, so no chunk is empty by plan.
fn key_cuts(min: i64, max: i64, histogram: &[i64], count: u64) -> Vec<i64> {
    if count < 2 || min >= max {
        return Vec::new();
    }
    let count = i128::from(count);
    let mut cuts: Vec<i64> = Vec::new();
    let sorted = histogram.len() >= 2 && histogram.windows(2).all(|w| w[0] <= w[1]);
    for i in 1..count {
        let cut = if sorted {
            // Position i/count of the way through the bounds, interpolated between two.
            let last = histogram.len() as i128 - 1;
            let position = i * last;
            let index = (position / count) as usize;
            let fraction = position % count;
            let low = i128::from(histogram[index]);
            let high = i128::from(histogram[(index + 1).min(histogram.len() - 1)]);
            low + (high - low) * fraction / count
        } else {
            i128::from(min) + (i128::from(max) - i128::from(min)) * i / count
        };
        let Ok(cut) = i64::try_from(cut) else {
            continue;
        };
        if cut > min && cut <= max && cuts.last().is_none_or(|&last| cut > last) {
            cuts.push(cut);
        }
    }
    cuts
}

/// How much of the copy a chunk is (bytes, roughly), to start the big ones first.
pub fn chunk_weight(
    layout: &TableLayout,
    table_bytes: u64,
    chunks: &[ChunkRange],
    chunk: ChunkRange,
) -> u64 {
    match chunk {
        ChunkRange::Leaf { leaf, .. } => {
            let of_leaf = chunks
                .iter()
                .filter(|c| matches!(c, ChunkRange::Leaf { leaf: l, .. } if *l == leaf))
                .count()
                .max(1) as u64;
            layout
                .leaves
                .get(leaf as usize)
                .map_or(0, |l| l.bytes / of_leaf)
        }
        _ => table_bytes / chunks.len().max(1) as u64,
    }
}

/// ` (a, b)` for COPY, or nothing for a table without columns (`()` is a syntax error;
/// such a table still has rows, copied as empty lines).
fn column_list(layout: &TableLayout) -> String {
    if layout.columns.is_empty() {
        String::new()
    } else {
        format!(" ({})", layout.columns.join(", "))
    }
}

/// A ctid range predicate for blocks `[first, end)`.
fn ctid_range(first: u64, end: Option<u64>) -> String {
    let lower = quote_literal(&format!("({first},0)"));
    let upper = match end {
        Some(end) => format!(" AND ctid < {}::tid", quote_literal(&format!("({end},0)"))),
        None => String::new(),
    };
    format!("ctid >= {lower}::tid{upper}")
}

/// A key range predicate for `[lower, upper)`; both open is every row (never planned).
fn key_range(key: &str, lower: Option<i64>, upper: Option<i64>) -> String {
    match (lower, upper) {
        (Some(lower), Some(upper)) => format!("{key} >= {lower} AND {key} < {upper}"),
        (Some(lower), None) => format!("{key} >= {lower}"),
        (None, Some(upper)) => format!("{key} < {upper}"),
        (None, None) => "true".to_string(),
    }
}

/// `COPY ... TO STDOUT` for one chunk of the source table.
pub fn source_copy_sql(layout: &TableLayout, chunk: ChunkRange) -> Result<String> {
    // `SELECT FROM t` is valid and yields one empty row per row.
    let columns = layout.columns.join(", ");
    let column_list = column_list(layout);
    let table = layout.name.quoted();
    let format = if layout.binary {
        " (FORMAT binary)"
    } else {
        ""
    };
    // ONLY: inheritance children are tables of their own and copied on their own.
    // A partitioned root is read with its partitions (they are never selected alone).
    let only = if layout.source_partitioned {
        ""
    } else {
        "ONLY "
    };
    // The publication's row filter, as PostgreSQL's own table sync applies it: the stream
    // only carries the rows it admits, so the copy must not bring others.
    let mut conditions: Vec<String> = layout
        .row_filter
        .iter()
        .map(|filter| format!("({filter})"))
        .collect();
    let from = match chunk {
        ChunkRange::Whole if !layout.source_partitioned && conditions.is_empty() => {
            // `COPY table TO` skips the executor's projection; it never includes children.
            return Ok(format!("COPY {table}{column_list} TO STDOUT{format}"));
        }
        ChunkRange::Whole => format!("{only}{table}"),
        ChunkRange::Blocks { first, end } => {
            conditions.push(ctid_range(first, end));
            format!("{only}{table}")
        }
        ChunkRange::Keys { lower, upper } => {
            let key = layout.split_key.as_deref().ok_or_else(|| {
                Error::definite(format!(
                    "A copy chunk of {table} is a range of its primary key, but its plan has no key column: this is a bug in sluice; restart to plan the copy of this table again"
                ))
            })?;
            conditions.push(key_range(key, lower, upper));
            format!("{only}{table}")
        }
        ChunkRange::Leaf { leaf, first, end } => {
            // A leaf has no partitions of its own; its blocks are its own.
            if first != 0 || end.is_some() {
                conditions.push(ctid_range(first, end));
            }
            leaf_of(layout, leaf)?.name.quoted()
        }
    };
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    Ok(format!(
        "COPY (SELECT {columns} FROM {from}{filter}) TO STDOUT{format}"
    ))
}

/// What a publication carries of a table (PostgreSQL 15 and later): its column list and
/// row filter, when it has them.
#[derive(Debug, Default)]
pub struct Published {
    pub columns: Option<Vec<String>>,
    pub row_filter: Option<String>,
}

/// What `publication` publishes of `name`; nothing narrowed before 15 (the view has neither
/// column there) or when the publication does not list the table.
pub async fn published_shape(
    source: &Client,
    publication: &str,
    name: &TableName,
) -> Result<Published> {
    let row = source
        .query_opt(
            "SELECT attnames::text[], rowfilter FROM pg_publication_tables
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &name.schema, &name.name],
        )
        .await;
    let row = match row {
        Ok(row) => row,
        Err(e) if e.code().map(|c| c.code()) == Some("42703") => None,
        Err(e) => {
            return Err(error::pg(
                format!("Reading what publication {publication} publishes of {name}"),
                e,
            ))
        }
    };
    Ok(row.map_or_else(Published::default, |row| Published {
        columns: row.get(0),
        row_filter: row.get(1),
    }))
}

/// Narrows `layout` to what `publication` publishes of its table: the row filter, and the
/// column list (columns outside it never reach the target by the stream either, so they
/// are not copied: the target keeps its defaults there).
pub async fn apply_publication_filters(
    source: &Client,
    publication: &str,
    layout: &mut TableLayout,
) -> Result<()> {
    let published = published_shape(source, publication, &layout.name).await?;
    layout.row_filter = published.row_filter;
    if let Some(names) = published.columns {
        let names: Vec<String> = names.iter().map(|c| quote_ident(c)).collect();
        layout.columns.retain(|c| names.contains(c));
    }
    Ok(())
}

fn leaf_of(layout: &TableLayout, leaf: u32) -> Result<&Leaf> {
    layout.leaves.get(leaf as usize).ok_or_else(|| {
        Error::definite(format!(
            "A copy chunk of {} names partition #{leaf}, which its plan does not have: this is a bug in sluice; restart to plan the copy of this table again",
            layout.name
        ))
    })
}

/// `COPY ... FROM STDIN` into the target table.
pub fn target_copy_sql(layout: &TableLayout) -> String {
    let format = if layout.binary {
        " (FORMAT binary)"
    } else {
        ""
    };
    format!(
        "COPY {}{} FROM STDIN{format}",
        layout.name.quoted(),
        column_list(layout)
    )
}

/// Whether the target table holds any row.
pub fn any_row_sql(layout: &TableLayout) -> String {
    let only = if layout.target_partitioned {
        ""
    } else {
        "ONLY "
    };
    format!(
        "SELECT EXISTS (SELECT 1 FROM {only}{})",
        layout.name.quoted()
    )
}

/// A chunk as people read it in messages: `public.orders (blocks 1000..2000)`,
/// `public.events (partition public.events_2024, blocks 0..500)`.
pub fn describe(layout: &TableLayout, chunk: ChunkRange) -> String {
    let name = &layout.name;
    let blocks = |first: u64, end: Option<u64>| match end {
        Some(end) => format!("blocks {first}..{end}"),
        None => format!("blocks {first}..end"),
    };
    match chunk {
        ChunkRange::Whole => name.to_string(),
        ChunkRange::Blocks { first, end } => format!("{name} ({})", blocks(first, end)),
        ChunkRange::Keys { lower, upper } => {
            let key = layout.split_key.as_deref().unwrap_or("key");
            let bound = |b: Option<i64>| b.map_or_else(String::new, |b| b.to_string());
            format!("{name} ({key} {}..{})", bound(lower), bound(upper))
        }
        ChunkRange::Leaf { leaf, first, end } => {
            let partition = layout
                .leaves
                .get(leaf as usize)
                .map_or_else(|| format!("#{leaf}"), |l| l.name.to_string());
            if first == 0 && end.is_none() {
                format!("{name} (partition {partition})")
            } else {
                format!("{name} (partition {partition}, {})", blocks(first, end))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(size_bytes: i64) -> SourceTable {
        SourceTable {
            size_bytes,
            ..SourceTable::keyed(TableName::new("public", "t"))
        }
    }

    #[test]
    fn chunks_cover_every_block_once_and_the_last_is_open() {
        let chunks = plan_chunks(&table(1_000_000), 122, 100_000, true, &[], None);
        assert_eq!(chunks.len(), 10);
        let mut next = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let ChunkRange::Blocks { first, end } = *chunk else {
                panic!("whole")
            };
            assert_eq!(first, next);
            if i + 1 == chunks.len() {
                assert_eq!(end, None);
            } else {
                next = end.unwrap();
            }
        }
    }

    #[test]
    fn small_partitioned_or_old_servers_copy_whole() {
        assert_eq!(
            plan_chunks(&table(50), 1, 100, true, &[], None),
            vec![ChunkRange::Whole]
        );
        assert_eq!(
            plan_chunks(&table(1000), 10, 100, false, &[], None),
            vec![ChunkRange::Whole]
        );
        let mut partitioned = table(1000);
        partitioned.is_partitioned = true;
        assert_eq!(
            plan_chunks(&partitioned, 0, 100, true, &[], None),
            vec![ChunkRange::Whole],
            "a partitioned table without partitions still has its one chunk"
        );
        // Big by TOAST but one heap block: nothing to split by ctid.
        assert_eq!(
            plan_chunks(&table(1000), 1, 100, true, &[], None),
            vec![ChunkRange::Whole]
        );
    }

    fn leaf(name: &str, blocks: u64, bytes: u64, heap: bool) -> Leaf {
        Leaf {
            name: TableName::new("public", name),
            blocks,
            bytes,
            heap,
            readable: true,
        }
    }

    #[test]
    fn a_partitioned_table_is_copied_partition_by_partition_and_big_ones_split() {
        let mut parts = table(10_000);
        parts.is_partitioned = true;
        let leaves = [
            leaf("p_small", 1, 50, true),
            leaf("p_big", 40, 400, true),
            leaf("p_remote", 0, 0, false),
        ];
        let chunks = plan_chunks(&parts, 0, 100, true, &leaves, None);
        let whole = |leaf| ChunkRange::Leaf {
            leaf,
            first: 0,
            end: None,
        };
        assert_eq!(chunks[0], whole(0));
        assert_eq!(
            chunks.last(),
            Some(&whole(2)),
            "a foreign partition is read whole"
        );
        let big: Vec<&ChunkRange> = chunks
            .iter()
            .filter(|c| matches!(c, ChunkRange::Leaf { leaf: 1, .. }))
            .collect();
        assert_eq!(big.len(), 4, "{chunks:?}");
        assert_eq!(
            *big[3],
            ChunkRange::Leaf {
                leaf: 1,
                first: 30,
                end: None
            }
        );
        // Before PostgreSQL 14 each partition is still a chunk of its own.
        assert_eq!(
            plan_chunks(&parts, 0, 100, false, &leaves, None),
            vec![whole(0), whole(1), whole(2)]
        );
        // A partition the user may read only through the root: the root, whole.
        let mut guarded = leaves.to_vec();
        guarded[1].readable = false;
        assert_eq!(
            plan_chunks(&parts, 0, 100, true, &guarded, None),
            vec![ChunkRange::Whole]
        );

        let layout = TableLayout {
            name: TableName::new("public", "parts"),
            columns: vec![quote_ident("a")],
            binary: true,
            source_partitioned: true,
            target_partitioned: false,
            leaves: leaves.to_vec(),
            split_key: None,
            row_filter: None,
        };
        assert_eq!(
            source_copy_sql(&layout, whole(0)).unwrap(),
            "COPY (SELECT \"a\" FROM \"public\".\"p_small\") TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            source_copy_sql(&layout, *big[1]).unwrap(),
            "COPY (SELECT \"a\" FROM \"public\".\"p_big\" WHERE ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid) TO STDOUT (FORMAT binary)"
        );
        assert!(source_copy_sql(&layout, whole(7)).is_err());
        assert_eq!(
            describe(&layout, *big[1]),
            "public.parts (partition public.p_big, blocks 10..20)"
        );
        assert_eq!(chunk_weight(&layout, 10_000, &chunks, *big[0]), 100);
        assert_eq!(chunk_weight(&layout, 10_000, &chunks, whole(0)), 50);
    }

    #[test]
    fn sql_quotes_names_and_bounds_chunks() {
        let layout = TableLayout {
            name: TableName::new("s", "we\"ird"),
            columns: vec![quote_ident("b"), quote_ident("a")],
            binary: false,
            source_partitioned: false,
            target_partitioned: false,
            leaves: Vec::new(),
            split_key: None,
            row_filter: None,
        };
        assert_eq!(
            source_copy_sql(&layout, ChunkRange::Whole).unwrap(),
            "COPY \"s\".\"we\"\"ird\" (\"b\", \"a\") TO STDOUT"
        );
        assert_eq!(
            source_copy_sql(&layout, ChunkRange::Blocks { first: 5, end: Some(9) }).unwrap(),
            "COPY (SELECT \"b\", \"a\" FROM ONLY \"s\".\"we\"\"ird\" WHERE ctid >= '(5,0)'::tid AND ctid < '(9,0)'::tid) TO STDOUT"
        );
        let keys = ChunkRange::Keys {
            lower: Some(-5),
            upper: Some(9),
        };
        // A key chunk without its key column in the plan is refused, not read whole.
        assert!(source_copy_sql(&layout, keys).is_err());
        let keyed = TableLayout {
            split_key: Some(quote_ident("Id")),
            ..layout.clone()
        };
        assert_eq!(
            source_copy_sql(&keyed, keys).unwrap(),
            "COPY (SELECT \"b\", \"a\" FROM ONLY \"s\".\"we\"\"ird\" WHERE \"Id\" >= -5 AND \"Id\" < 9) TO STDOUT"
        );
        let first = ChunkRange::Keys {
            lower: None,
            upper: Some(-5),
        };
        let last = ChunkRange::Keys {
            lower: Some(9),
            upper: None,
        };
        assert!(source_copy_sql(&keyed, first)
            .unwrap()
            .ends_with("WHERE \"Id\" < -5) TO STDOUT"));
        assert!(source_copy_sql(&keyed, last)
            .unwrap()
            .ends_with("WHERE \"Id\" >= 9) TO STDOUT"));
        assert_eq!(describe(&keyed, keys), "s.\"we\"\"ird\" (\"Id\" -5..9)");
        // A publication's row filter joins every chunk's predicate, and turns a whole
        // table's COPY into a SELECT.
        let filtered = TableLayout {
            row_filter: Some("(tenant = 7)".to_string()),
            ..keyed.clone()
        };
        assert_eq!(
            source_copy_sql(&filtered, ChunkRange::Whole).unwrap(),
            "COPY (SELECT \"b\", \"a\" FROM ONLY \"s\".\"we\"\"ird\" WHERE ((tenant = 7))) TO STDOUT"
        );
        assert!(source_copy_sql(&filtered, keys)
            .unwrap()
            .contains("WHERE ((tenant = 7)) AND \"Id\" >= -5 AND \"Id\" < 9)"));
        assert_eq!(describe(&keyed, first), "s.\"we\"\"ird\" (\"Id\" ..-5)");
        let binary = TableLayout {
            binary: true,
            ..layout
        };
        assert_eq!(
            target_copy_sql(&binary),
            "COPY \"s\".\"we\"\"ird\" (\"b\", \"a\") FROM STDIN (FORMAT binary)"
        );
    }

    /// Every key in `[min, max]` (and beyond) falls in exactly one planned chunk.
    fn chunk_of(chunks: &[ChunkRange], key: i64) -> usize {
        let holding: Vec<usize> = chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| match c {
                ChunkRange::Keys { lower, upper } => {
                    lower.is_none_or(|l| key >= l) && upper.is_none_or(|u| key < u)
                }
                _ => false,
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(holding.len(), 1, "key {key} is in chunks {holding:?}");
        holding[0]
    }

    #[test]
    fn key_ranges_cover_every_key_once_and_follow_the_histogram() {
        // Never analyzed: evenly between min and max.
        let cuts = key_cuts(1, 1000, &[], 4);
        assert_eq!(cuts, vec![250, 500, 750]);
        let chunks = plan_chunks(&table(1_000_000), 100, 250_000, false, &[], Some(&cuts));
        assert_eq!(chunks.len(), 4);
        for key in [i64::MIN, -3, 1, 249, 250, 251, 999, 1000, 5000, i64::MAX] {
            chunk_of(&chunks, key);
        }
        assert_eq!(chunk_of(&chunks, 249), 0);
        assert_eq!(chunk_of(&chunks, 250), 1);
        assert_eq!(chunk_of(&chunks, 1000), 3);

        // Skewed ids: the histogram's equal-depth bounds, not the value range, decide.
        let histogram = [1, 2, 3, 4, 5, 6, 7, 8, 1_000_000];
        assert_eq!(key_cuts(1, 1_000_000, &histogram, 4), vec![3, 5, 7]);
        // More chunks than buckets: cut between bounds too.
        let cuts = key_cuts(0, 100, &[0, 100], 4);
        assert_eq!(cuts, vec![25, 50, 75]);

        // The extremes of int8 do not overflow.
        let cuts = key_cuts(i64::MIN, i64::MAX, &[], 3);
        assert_eq!(cuts.len(), 2);
        assert!(cuts[0] < 0 && cuts[1] > 0);

        // Nothing to cut: one key, a stale histogram outside the keys, a single chunk.
        assert!(key_cuts(7, 7, &[], 4).is_empty());
        assert!(key_cuts(1, 10, &[], 1).is_empty());
        assert!(key_cuts(1, 10, &[100, 200, 300], 4).is_empty());
        // Fewer distinct keys than chunks: no empty or repeated cut.
        assert_eq!(key_cuts(1, 3, &[], 10), vec![2]);
        // An unsorted "histogram" is not trusted.
        assert_eq!(key_cuts(0, 100, &[50, 10, 90], 2), vec![50]);

        // Key cuts never apply to a partitioned table.
        let partitioned = SourceTable {
            is_partitioned: true,
            ..table(1_000_000)
        };
        assert_eq!(
            plan_chunks(&partitioned, 0, 100, false, &[], Some(&[5])),
            vec![ChunkRange::Whole]
        );
        // Before PostgreSQL 14 (no TID range scans) the default is the key.
        assert!(splits_by_key(SplitBy::Auto, false));
        assert!(!splits_by_key(SplitBy::Auto, true));
        assert!(splits_by_key(SplitBy::PrimaryKey, true));
        assert!(!splits_by_key(SplitBy::Ctid, false));
        assert_eq!(parse_int_array("{-1,2, 30}"), vec![-1, 2, 30]);
        assert!(parse_int_array("{a,2}").is_empty());
        assert_eq!(chunk_count(100, 0), 1);
        assert_eq!(chunk_count(100, 100), 1);
        assert_eq!(chunk_count(101, 100), 2);
    }
}
