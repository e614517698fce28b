//! How one table is copied: its column list, the COPY format, and its chunks.
//!
//! **Chunks are ctid ranges by heap block** (`ctid >= '(N,0)' AND ctid < '(M,0)'`), not
//! primary-key ranges. On PostgreSQL 14 and later such a predicate is a TID range scan that
//! reads only blocks N to M-1, so chunks cost what their share of the table costs, whatever
//! the key looks like (none, composite, skewed, text). Key ranges would need the key's
//! distribution (a scan or histogram) and an index scan per chunk, which is slower than a
//! sequential read on a cold table. Before 14 a ctid predicate scans the whole table, so
//! there large tables are copied whole. The last chunk has no upper bound: rows that sit in
//! blocks beyond the size seen at planning time are still copied. Partitioned tables are
//! copied whole through their root (their partitions' blocks are numbered separately).
//!
//! **Binary COPY** only when every column's type is built in (OID below 10000: the same OID
//! in every cluster, also inside arrays) and the target column has the same type; a user
//! type, a domain, or a type that differs on the target goes as text, which the target
//! parses by name.

use tokio_postgres::Client;

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
}

/// Reads the source and target catalogs for `table`. Errors name the table and what the
/// operator should fix on the target.
pub async fn table_layout(
    source: &Client,
    target: &Client,
    table: &SourceTable,
) -> Result<TableLayout> {
    let name = &table.name;
    // Generated columns are computed by the target itself; COPY cannot write them.
    let source_columns = source
        .query(
            "SELECT a.attname::text, a.atttypid
             FROM pg_attribute a
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
        binary &= type_oid < FIRST_NON_BUILTIN_OID && target_type == type_oid;
        columns.push(quote_ident(&column));
    }
    Ok(TableLayout {
        name: name.clone(),
        columns,
        binary,
        source_partitioned: table.is_partitioned,
        target_partitioned: target_kind == "p",
    })
}

/// Splits a table into chunks of about `chunk_bytes` each (by its heap blocks), or keeps it
/// whole when it is small, partitioned, or the source is older than PostgreSQL 14.
pub fn plan_chunks(
    table: &SourceTable,
    heap_blocks: u64,
    chunk_bytes: u64,
    tid_range_scans: bool,
) -> Vec<ChunkRange> {
    let size = u64::try_from(table.size_bytes).unwrap_or(0);
    if table.is_partitioned || !tid_range_scans || chunk_bytes == 0 || size <= chunk_bytes {
        return vec![ChunkRange::Whole];
    }
    // Bounded so a tiny threshold on a huge table cannot plan millions of chunks.
    let count = size.div_ceil(chunk_bytes).clamp(2, 10_000).min(heap_blocks);
    if count < 2 {
        return vec![ChunkRange::Whole];
    }
    let per_chunk = heap_blocks.div_ceil(count);
    let mut chunks = Vec::new();
    let mut first = 0;
    while first < heap_blocks {
        let end = first + per_chunk;
        chunks.push(ChunkRange::Blocks {
            first,
            end: (end < heap_blocks).then_some(end),
        });
        first = end;
    }
    chunks
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

/// `COPY ... TO STDOUT` for one chunk of the source table.
pub fn source_copy_sql(layout: &TableLayout, chunk: ChunkRange) -> String {
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
    match chunk {
        ChunkRange::Whole if !layout.source_partitioned => {
            // `COPY table TO` skips the executor's projection; it never includes children.
            format!("COPY {table}{column_list} TO STDOUT{format}")
        }
        ChunkRange::Whole => {
            format!("COPY (SELECT {columns} FROM {only}{table}) TO STDOUT{format}")
        }
        ChunkRange::Blocks { first, end } => {
            let lower = quote_literal(&format!("({first},0)"));
            let upper = match end {
                Some(end) => format!(" AND ctid < {}::tid", quote_literal(&format!("({end},0)"))),
                None => String::new(),
            };
            format!(
                "COPY (SELECT {columns} FROM {only}{table} WHERE ctid >= {lower}::tid{upper}) TO STDOUT{format}"
            )
        }
    }
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

/// Empties the target table (a partitioned target with its partitions).
pub fn truncate_sql(layout: &TableLayout) -> String {
    let only = if layout.target_partitioned {
        ""
    } else {
        "ONLY "
    };
    format!("TRUNCATE {only}{}", layout.name.quoted())
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

/// A chunk as people read it in messages: `public.orders (blocks 1000..2000)`.
pub fn describe(name: &TableName, chunk: ChunkRange) -> String {
    match chunk {
        ChunkRange::Whole => name.to_string(),
        ChunkRange::Blocks {
            first,
            end: Some(end),
        } => format!("{name} (blocks {first}..{end})"),
        ChunkRange::Blocks { first, end: None } => format!("{name} (blocks {first}..end)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(size_bytes: i64) -> SourceTable {
        SourceTable {
            name: TableName::new("public", "t"),
            oid: 1,
            replica_identity: 'd',
            has_primary_key: true,
            is_partitioned: false,
            size_bytes,
            estimated_rows: 0,
        }
    }

    #[test]
    fn chunks_cover_every_block_once_and_the_last_is_open() {
        let chunks = plan_chunks(&table(1_000_000), 122, 100_000, true);
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
            plan_chunks(&table(50), 1, 100, true),
            vec![ChunkRange::Whole]
        );
        assert_eq!(
            plan_chunks(&table(1000), 10, 100, false),
            vec![ChunkRange::Whole]
        );
        let mut partitioned = table(1000);
        partitioned.is_partitioned = true;
        assert_eq!(
            plan_chunks(&partitioned, 10, 100, true),
            vec![ChunkRange::Whole]
        );
        // Big by TOAST but one heap block: nothing to split by ctid.
        assert_eq!(
            plan_chunks(&table(1000), 1, 100, true),
            vec![ChunkRange::Whole]
        );
    }

    #[test]
    fn sql_quotes_names_and_bounds_chunks() {
        let layout = TableLayout {
            name: TableName::new("s", "we\"ird"),
            columns: vec![quote_ident("b"), quote_ident("a")],
            binary: false,
            source_partitioned: false,
            target_partitioned: false,
        };
        assert_eq!(
            source_copy_sql(&layout, ChunkRange::Whole),
            "COPY \"s\".\"we\"\"ird\" (\"b\", \"a\") TO STDOUT"
        );
        assert_eq!(
            source_copy_sql(&layout, ChunkRange::Blocks { first: 5, end: Some(9) }),
            "COPY (SELECT \"b\", \"a\" FROM ONLY \"s\".\"we\"\"ird\" WHERE ctid >= '(5,0)'::tid AND ctid < '(9,0)'::tid) TO STDOUT"
        );
        let binary = TableLayout {
            binary: true,
            ..layout
        };
        assert_eq!(
            target_copy_sql(&binary),
            "COPY \"s\".\"we\"\"ird\" (\"b\", \"a\") FROM STDIN (FORMAT binary)"
        );
    }
}
