//! What the applier needs to know about each target table, read from the target's catalog
//! once per table (and again after the source announces a schema change).

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::apply::sql::SqlColumn;
use crate::citus::CitusLayout;
use crate::error::{self, Error, ErrorKind, Result};
use crate::source::TableName;

#[derive(Debug, Clone)]
pub struct TargetTable {
    pub name: TableName,
    pub quoted: String,
    columns: HashMap<String, SqlColumn>,
    /// Primary-key column names, in key order (empty when the table has none).
    pub primary_key: Vec<String>,
    /// Citus distribution column of a hash-distributed table.
    pub distribution_column: Option<String>,
}

impl TargetTable {
    pub fn column(&self, name: &str) -> Option<&SqlColumn> {
        self.columns.get(name)
    }

    /// The target column for a source column, or an apply error that names both and, when
    /// known, the type to add it with.
    pub fn require_column(&self, name: &str, source_type: Option<&str>) -> Result<&SqlColumn> {
        self.columns.get(name).ok_or_else(|| {
            let fix = match source_type {
                Some(type_name) => format!(
                    "ALTER TABLE {} ADD COLUMN {} {type_name}",
                    self.quoted,
                    crate::source::quote_ident(name)
                ),
                None => format!("ALTER TABLE {} ADD COLUMN ... with the source's type", self.quoted),
            };
            Error::new(
                ErrorKind::Apply,
                format!(
                    "Column {name:?} of {} does not exist on the target: add it ({fix}); sluice retries by itself",
                    self.name
                ),
            )
        })
    }

    pub fn distribution(&self) -> Option<&SqlColumn> {
        self.distribution_column
            .as_deref()
            .and_then(|name| self.columns.get(name))
    }
}

/// Reads a table's columns and primary key from the target; the distribution column comes
/// from the Citus layout when the target runs Citus.
pub async fn load(
    target: &Client,
    name: &TableName,
    citus: Option<&CitusLayout>,
) -> Result<TargetTable> {
    let quoted = name.quoted();
    let rows = target
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    COALESCE(a.attnum = ANY(i.indkey::int2[]), false),
                    array_position(i.indkey::int2[], a.attnum),
                    a.attidentity = 'a'
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&quoted],
        )
        .await
        .map_err(|e| error::pg(format!("Reading the columns of {name} on the target"), e))?;
    if rows.is_empty() {
        return Err(Error::new(
            ErrorKind::Apply,
            format!(
                "Table {name} does not exist on the target: create it (sluice schema does) or exclude it in [tables]; sluice retries by itself"
            ),
        ));
    }
    let mut columns = HashMap::new();
    let mut key: Vec<(i32, String)> = Vec::new();
    for row in rows {
        let column: String = row.get(0);
        let type_name: String = row.get(1);
        if row.get::<_, bool>(2) {
            key.push((row.get::<_, Option<i32>>(3).unwrap_or(0), column.clone()));
        }
        let mut sql_column = SqlColumn::new(column.clone(), type_name);
        if row.get::<_, bool>(4) {
            sql_column = sql_column.generated_always();
        }
        columns.insert(column, sql_column);
    }
    key.sort();
    let distribution_column = citus
        .and_then(|layout| layout.table(name))
        .and_then(|table| table.distribution_column())
        .map(str::to_string);
    Ok(TargetTable {
        name: name.clone(),
        quoted,
        columns,
        primary_key: key.into_iter().map(|(_, name)| name).collect(),
        distribution_column,
    })
}
