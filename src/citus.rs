//! Citus on the target: is it there, and how is each table laid out.
//!
//! Why it matters (all observed on Citus 13, see FACTS.md): writes must go through the
//! coordinator's distributed tables, never a local shell table; an UPDATE or DELETE routes
//! to one shard only when its WHERE clause names the distribution column; an UPDATE may
//! never assign that column. The apply code asks [`CitusLayout::table`] for the column.
//!
//! The layout comes from `pg_dist_partition` (present in every Citus version), one row per
//! table Citus manages:
//!
//! | partmethod | repmodel | kind |
//! |---|---|---|
//! | `h` hash, `r` range, `a` append | any | distributed by `partkey` |
//! | `n` none | `t` two-phase | reference (a copy on every node) |
//! | `n` none | `s` | local to one node: a Citus local table, or a single-shard table of schema-based sharding; no column to route by |
//!
//! Tables absent from `pg_dist_partition` are plain tables on the coordinator:
//! [`CitusLayout::table`] returns `None` for them.
//!
//! Citus itself cannot be installed on the development machines, so the catalog parsing
//! and the SQL generated here are unit-tested; the queries use only documented catalogs
//! and functions (`pg_dist_partition`, `column_to_column_name`, `create_distributed_table`,
//! `create_reference_table`).

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::error::{self, Error, Result};
use crate::source::{quote_literal, TableName};

/// How Citus holds one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableKind {
    /// Sharded by `column`: statements route by its value.
    Distributed { column: String },
    /// Replicated to every node; writes commit with two-phase commit.
    Reference,
    /// Managed by Citus on a single node (Citus local or single-shard table).
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedTable {
    pub name: TableName,
    pub kind: TableKind,
    /// Tables with the same colocation id keep rows of equal distribution values together.
    pub colocation_id: i32,
}

impl DistributedTable {
    /// The column UPDATE and DELETE must name to reach one shard.
    pub fn distribution_column(&self) -> Option<&str> {
        match &self.kind {
            TableKind::Distributed { column } => Some(column),
            _ => None,
        }
    }
}

/// The Citus layout of a target database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CitusLayout {
    /// `pg_extension.extversion` of citus, e.g. `13.2-1`.
    pub version: String,
    tables: BTreeMap<TableName, DistributedTable>,
}

impl CitusLayout {
    pub fn new(version: impl Into<String>, tables: Vec<DistributedTable>) -> Self {
        CitusLayout {
            version: version.into(),
            tables: tables.into_iter().map(|t| (t.name.clone(), t)).collect(),
        }
    }

    /// How Citus holds `name`; `None` for a plain coordinator table (or no such table).
    pub fn table(&self, name: &TableName) -> Option<&DistributedTable> {
        self.tables.get(name)
    }

    pub fn tables(&self) -> impl Iterator<Item = &DistributedTable> {
        self.tables.values()
    }
}

/// The catalog query behind [`detect`]: schema, table, partmethod, repmodel, distribution
/// column name (NULL for reference and local tables), colocation id.
pub const LAYOUT_SQL: &str = "SELECT n.nspname::text, c.relname::text,
       p.partmethod::text, p.repmodel::text,
       CASE WHEN p.partkey IS NULL OR p.partkey = '' THEN NULL
            ELSE column_to_column_name(p.logicalrelid, p.partkey) END,
       p.colocationid
FROM pg_dist_partition p
JOIN pg_class c ON c.oid = p.logicalrelid
JOIN pg_namespace n ON n.oid = c.relnamespace";

/// Classifies one `pg_dist_partition` row (see the table in the module docs).
pub fn classify(
    name: &TableName,
    partmethod: &str,
    repmodel: &str,
    column: Option<String>,
) -> Result<TableKind> {
    match (partmethod, repmodel) {
        ("h" | "r" | "a", _) => match column {
            Some(column) if !column.is_empty() => Ok(TableKind::Distributed { column }),
            _ => Err(Error::definite(format!(
                "Citus lists {name} as distributed (partmethod {partmethod}) without a distribution column: check pg_dist_partition on the coordinator"
            ))),
        },
        ("n", "t") => Ok(TableKind::Reference),
        ("n", _) => Ok(TableKind::Local),
        _ => Err(Error::definite(format!(
            "Citus lists {name} with partmethod {partmethod:?} and repmodel {repmodel:?}, which sluice does not know: report this with your Citus version"
        ))),
    }
}

/// `None` when the target has no citus extension; else every table Citus manages.
pub async fn detect(target: &Client) -> Result<Option<CitusLayout>> {
    let version = target
        .query_opt(
            "SELECT extversion::text FROM pg_extension WHERE extname = 'citus'",
            &[],
        )
        .await
        .map_err(|e| error::pg("Looking for the citus extension on the target", e))?;
    let Some(version) = version else {
        return Ok(None);
    };
    read_layout(target, version.get::<_, String>(0))
        .await
        .map(Some)
}

/// Reads `pg_dist_partition` (the part of [`detect`] after finding the extension).
pub async fn read_layout(target: &Client, version: String) -> Result<CitusLayout> {
    let rows = target
        .query(LAYOUT_SQL, &[])
        .await
        .map_err(|e| error::pg("Reading pg_dist_partition on the target", e))?;
    let mut tables = Vec::with_capacity(rows.len());
    for row in rows {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let kind = classify(&name, row.get(2), row.get(3), row.get(4))?;
        tables.push(DistributedTable {
            name,
            kind,
            colocation_id: row.get(5),
        });
    }
    Ok(CitusLayout::new(version, tables))
}

/// For `sluice check`: a finding when UPDATE and DELETE of `table` cannot carry its
/// distribution column, because the column is not in what pgoutput sends for the old row.
///
/// pgoutput sends the old row's replica identity: the primary key (`d`), the columns of the
/// REPLICA IDENTITY index (`i`), every column (`f`), or nothing (`n`). When the new tuple
/// is absent (DELETE) or the key changed, only those columns are known; without the
/// distribution column among them the statement goes to every shard, and a DELETE cannot
/// be routed at all. `identity_columns` are the columns of the primary key or the replica
/// identity index (empty for `f` and `n`).
pub fn routing_finding(
    table: &TableName,
    distribution_column: &str,
    replica_identity: char,
    identity_columns: &[String],
) -> Option<String> {
    let known = match replica_identity {
        'f' => true,
        'd' | 'i' => identity_columns.iter().any(|c| c == distribution_column),
        _ => false,
    };
    (!known).then(|| {
        format!(
            "{table}: distribution column {distribution_column} is not in the replica identity, so UPDATE and DELETE cannot be routed to one shard: add it to the primary key (or a unique index used as REPLICA IDENTITY USING INDEX), or set REPLICA IDENTITY FULL (more WAL)"
        )
    })
}

/// `SELECT create_distributed_table('"s"."t"', 'column' [, colocate_with => '"s"."u"'])`.
/// The table is a quoted regclass text; the column is passed as its exact name (Citus looks
/// it up without case folding).
pub fn create_distributed_table_sql(
    table: &TableName,
    column: &str,
    colocate_with: Option<&TableName>,
) -> String {
    let colocate = colocate_with
        .map(|c| format!(", colocate_with => {}", quote_literal(&c.quoted())))
        .unwrap_or_default();
    format!(
        "SELECT create_distributed_table({}, {}{colocate})",
        quote_literal(&table.quoted()),
        quote_literal(column)
    )
}

/// `SELECT create_reference_table('"s"."t"')`.
pub fn create_reference_table_sql(table: &TableName) -> String {
    format!(
        "SELECT create_reference_table({})",
        quote_literal(&table.quoted())
    )
}

/// Makes `table` (`schema.name`, e.g. `sluice.applied_position`) a reference table when the
/// target runs Citus and it is not one yet. Returns whether it changed anything.
///
/// Why the position table must be one: a transaction that writes one shard commits on the
/// worker before the coordinator's local commit (one-phase), so a coordinator crash in
/// between leaves the changes applied and a local position row behind: replayed twice. A
/// write to a reference table makes Citus use two-phase commit for the whole transaction,
/// which closes that window. See docs/citus.md.
pub async fn make_reference_table_if_citus(target: &Client, table: &str) -> Result<bool> {
    let Some(layout) = detect(target).await? else {
        return Ok(false);
    };
    let name = TableName::parse(table);
    match layout.table(&name).map(|t| &t.kind) {
        Some(TableKind::Reference) => Ok(false),
        Some(TableKind::Distributed { column }) => Err(Error::definite(format!(
            "{name} is distributed by {column} on the Citus target; it must be a reference table so that its commit is two-phase: run SELECT undistribute_table('{name}') on the coordinator and start again"
        ))),
        _ => {
            target
                .batch_execute(&create_reference_table_sql(&name))
                .await
                .map_err(|e| {
                    error::pg(
                        format!("Making {name} a reference table on the Citus target"),
                        e,
                    )
                })?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TableName {
        TableName::parse(s)
    }

    #[test]
    fn catalog_rows_classify_into_kinds() {
        let t = name("public.orders");
        assert_eq!(
            classify(&t, "h", "s", Some("customer_id".into())).unwrap(),
            TableKind::Distributed {
                column: "customer_id".into()
            }
        );
        assert_eq!(
            classify(&t, "a", "c", Some("ts".into())).unwrap(),
            TableKind::Distributed {
                column: "ts".into()
            }
        );
        assert_eq!(classify(&t, "n", "t", None).unwrap(), TableKind::Reference);
        assert_eq!(classify(&t, "n", "s", None).unwrap(), TableKind::Local);
        let error = classify(&t, "h", "s", None).unwrap_err().to_string();
        assert!(error.contains("public.orders"), "{error}");
        assert!(classify(&t, "x", "s", None).is_err());
    }

    #[test]
    fn the_layout_answers_per_table() {
        let layout = CitusLayout::new(
            "13.2-1",
            vec![
                DistributedTable {
                    name: name("public.orders"),
                    kind: TableKind::Distributed {
                        column: "customer_id".into(),
                    },
                    colocation_id: 3,
                },
                DistributedTable {
                    name: name("public.countries"),
                    kind: TableKind::Reference,
                    colocation_id: 1,
                },
            ],
        );
        assert_eq!(
            layout
                .table(&name("public.orders"))
                .and_then(|t| t.distribution_column()),
            Some("customer_id")
        );
        assert_eq!(
            layout
                .table(&name("public.countries"))
                .and_then(|t| t.distribution_column()),
            None
        );
        assert!(layout.table(&name("public.plain")).is_none());
        assert_eq!(layout.tables().count(), 2);
    }

    #[test]
    fn routing_needs_the_distribution_column_in_the_replica_identity() {
        let t = name("public.orders");
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            routing_finding(&t, "customer_id", 'd', &cols(&["customer_id", "id"])),
            None
        );
        assert_eq!(routing_finding(&t, "customer_id", 'f', &[]), None);
        let finding = routing_finding(&t, "customer_id", 'd', &cols(&["id"])).unwrap();
        assert!(
            finding.starts_with("public.orders: distribution column customer_id"),
            "{finding}"
        );
        assert!(finding.contains("REPLICA IDENTITY FULL"), "{finding}");
        assert!(routing_finding(&t, "customer_id", 'i', &cols(&["id"])).is_some());
        assert!(routing_finding(&t, "customer_id", 'n', &[]).is_some());
    }

    #[test]
    fn generated_sql_quotes_every_name() {
        assert_eq!(
            create_distributed_table_sql(&name("public.orders"), "customer_id", None),
            "SELECT create_distributed_table('\"public\".\"orders\"', 'customer_id')"
        );
        assert_eq!(
            create_distributed_table_sql(
                &TableName::new("Sales", "it's"),
                "Tenant Id",
                Some(&name("public.customers"))
            ),
            "SELECT create_distributed_table('\"Sales\".\"it''s\"', 'Tenant Id', colocate_with => '\"public\".\"customers\"')"
        );
        assert_eq!(
            create_reference_table_sql(&name("sluice.applied_position")),
            "SELECT create_reference_table('\"sluice\".\"applied_position\"')"
        );
    }
}
