//! Which tables sluice moves: the source's user tables matched by `[tables]` include/exclude.
//!
//! Partitions are never selected on their own: a partitioned table is selected as its root
//! and published with `publish_via_partition_root = true`, so its changes arrive under the
//! root's name and the target may be partitioned differently (or not at all).

use std::fmt;

use tokio_postgres::Client;

use crate::config::TablesConfig;
use crate::error::{self, Result};

/// A table by schema and name (unquoted, as in the catalogs).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `schema.table` as written in config globs and messages.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."table"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Parses a name as `Display` writes it (`public.orders`, `"My Schema"."a.b"`): the
    /// inverse of `to_string()`, for names kept as text (the status's tables). `None` for
    /// text that is not such a name.
    pub fn parse_shown(text: &str) -> Option<TableName> {
        fn ident(text: &str) -> Option<(String, &str)> {
            match text.strip_prefix('"') {
                Some(mut rest) => {
                    let mut out = String::new();
                    loop {
                        let end = rest.find('"')?;
                        out.push_str(&rest[..end]);
                        rest = &rest[end + 1..];
                        match rest.strip_prefix('"') {
                            Some(after) => {
                                out.push('"');
                                rest = after;
                            }
                            None => return Some((out, rest)),
                        }
                    }
                }
                None => {
                    let end = text.find('.').unwrap_or(text.len());
                    Some((text[..end].to_string(), &text[end..]))
                }
            }
        }
        let (schema, rest) = ident(text)?;
        let (name, rest) = ident(rest.strip_prefix('.')?)?;
        rest.is_empty().then(|| TableName::new(schema, name))
    }

    /// Parses `schema.table` (no quoting); `public` when the schema is left out.
    pub fn parse(text: &str) -> TableName {
        match text.split_once('.') {
            Some((schema, name)) => TableName::new(schema, name),
            None => TableName::new("public", text),
        }
    }
}

/// For people: `schema.table`, each part double-quoted only where PostgreSQL needs it
/// (`public.orders`, `"My Schema"."Orders"`, `public."order"`), as `regclass` and
/// `format('%I')` print them. Names holding dots or quotes stay unambiguous, and a name
/// copied from a message works in SQL.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            display_ident(&self.schema),
            display_ident(&self.name)
        )
    }
}

/// The identifier as PostgreSQL's `quote_ident` writes it: as it is when it is lower case
/// letters, digits and underscores (not leading with a digit) and no reserved word;
/// double-quoted otherwise.
pub fn display_ident(ident: &str) -> std::borrow::Cow<'_, str> {
    let plain = ident
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && RESERVED_WORDS.binary_search(&ident).is_err();
    if plain {
        std::borrow::Cow::Borrowed(ident)
    } else {
        std::borrow::Cow::Owned(quote_ident(ident))
    }
}

/// PostgreSQL 15's keywords that are not unreserved (`pg_get_keywords()` with catcode other
/// than `U`): as identifiers they must be quoted. Sorted, for the binary search.
const RESERVED_WORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "bigint",
    "binary",
    "bit",
    "boolean",
    "both",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "coalesce",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "dec",
    "decimal",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "extract",
    "false",
    "fetch",
    "float",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "inout",
    "int",
    "integer",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "least",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "national",
    "natural",
    "nchar",
    "none",
    "normalize",
    "not",
    "notnull",
    "null",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "out",
    "outer",
    "overlaps",
    "overlay",
    "placing",
    "position",
    "precision",
    "primary",
    "real",
    "references",
    "returning",
    "right",
    "row",
    "select",
    "session_user",
    "setof",
    "similar",
    "smallint",
    "some",
    "substring",
    "symmetric",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "trailing",
    "treat",
    "trim",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "values",
    "varchar",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlnamespaces",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

/// Double-quotes an identifier for SQL.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Single-quotes a string literal for SQL (standard_conforming_strings on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A selected source table and what the catalogs say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub name: TableName,
    pub oid: u32,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// The index REPLICA IDENTITY DEFAULT or USING INDEX stands on.
    pub identity_key: IdentityKey,
    pub is_partitioned: bool,
    /// `pg_relation_size` plus TOAST, bytes (for copy planning and `check`).
    pub size_bytes: i64,
    /// `pg_class.reltuples`, an estimate (-1 when never analysed). A partitioned table's
    /// size and rows are its partitions'.
    pub estimated_rows: i64,
    /// Partitions (of a partitioned table) without a primary key and with REPLICA IDENTITY
    /// DEFAULT, or with NOTHING: the source checks each partition's own identity, not the
    /// root's, and rejects their UPDATEs and DELETEs once the root is published. Under a
    /// root that is REPLICA IDENTITY FULL, every partition that is not FULL too: it sends its
    /// old rows by its own key, and rows matched by all values would not be found.
    pub partitions_without_identity: Vec<TableName>,
}

/// Whether PostgreSQL can use the index a replica identity names (the primary key for
/// DEFAULT, the chosen index for USING INDEX): without one the source rejects the table's
/// UPDATEs and DELETEs once it is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKey {
    Usable,
    /// No primary key (DEFAULT), or the USING INDEX index was dropped (then PostgreSQL acts
    /// as under NOTHING).
    Missing,
    /// The primary key is DEFERRABLE: PostgreSQL never uses a deferrable index as the
    /// replica identity.
    Deferrable,
}

impl IdentityKey {
    /// The SQL expression, over `pg_class` aliased `alias`, that [`IdentityKey::from_sql`]
    /// reads.
    pub fn sql(alias: &str) -> String {
        format!(
            "CASE
                WHEN {alias}.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i
                     WHERE i.indrelid = {alias}.oid AND i.indisreplident) THEN 'usable'
                WHEN {alias}.relreplident = 'i' THEN 'missing'
                WHEN EXISTS (SELECT 1 FROM pg_index i
                     WHERE i.indrelid = {alias}.oid AND i.indisprimary AND i.indimmediate) THEN 'usable'
                WHEN EXISTS (SELECT 1 FROM pg_index i
                     WHERE i.indrelid = {alias}.oid AND i.indisprimary) THEN 'deferrable'
                ELSE 'missing'
             END"
        )
    }

    pub fn from_sql(text: &str) -> IdentityKey {
        match text {
            "usable" => IdentityKey::Usable,
            "deferrable" => IdentityKey::Deferrable,
            _ => IdentityKey::Missing,
        }
    }
}

impl SourceTable {
    /// The source rejects this table's UPDATEs and DELETEs once it is published.
    pub fn lacks_identity(&self) -> bool {
        match self.replica_identity {
            'f' => false,
            'd' | 'i' => self.identity_key != IdentityKey::Usable,
            _ => true,
        }
    }
}

#[cfg(test)]
impl SourceTable {
    /// For unit tests: an empty, unpartitioned table with a primary key.
    pub fn keyed(name: TableName) -> SourceTable {
        SourceTable {
            name,
            oid: 1,
            replica_identity: 'd',
            identity_key: IdentityKey::Usable,
            is_partitioned: false,
            size_bytes: 0,
            estimated_rows: 0,
            partitions_without_identity: Vec::new(),
        }
    }
}

/// Tables no extension owns: an extension's own tables (PostGIS's `spatial_ref_sys`) come
/// with `CREATE EXTENSION` on the target, as pg_dump leaves them out.
const NOT_AN_EXTENSION_MEMBER: &str = "NOT EXISTS (SELECT 1 FROM pg_depend d
                   WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

/// The source's selected tables, sorted by name. System schemas, sluice's own schema,
/// temporary and unlogged tables (logical decoding cannot see their changes), tables of
/// extensions, and partitions (their root is selected instead) are never selected;
/// `unreplicated_tables` names the ones the globs match.
pub async fn selected_tables(client: &Client, tables: &TablesConfig) -> Result<Vec<SourceTable>> {
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, c.oid, c.relreplident::text,
                    {},
                    c.relkind = 'p',
                    COALESCE(pg_total_relation_size(c.oid) - pg_indexes_size(c.oid), 0)::int8,
                    c.reltuples::int8
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p')
               AND NOT c.relispartition
               AND c.relpersistence = 'p'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'sluice')
               AND n.nspname NOT LIKE 'pg\\_%'
               AND {NOT_AN_EXTENSION_MEMBER}
             ORDER BY 1, 2",
                IdentityKey::sql("c")
            ),
            &[],
        )
        .await
        .map_err(|e| error::pg("Listing the source's tables", e))?;
    let mut selected = Vec::new();
    for row in rows {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        if !tables.selects(&name.qualified()) {
            continue;
        }
        let identity: String = row.get(3);
        selected.push(SourceTable {
            name,
            oid: row.get(2),
            replica_identity: identity.chars().next().unwrap_or('d'),
            identity_key: IdentityKey::from_sql(row.get(4)),
            is_partitioned: row.get(5),
            size_bytes: row.get(6),
            estimated_rows: row.get(7),
            partitions_without_identity: Vec::new(),
        });
    }
    let partitioned: Vec<u32> = selected
        .iter()
        .filter(|t| t.is_partitioned)
        .map(|t| t.oid)
        .collect();
    if !partitioned.is_empty() {
        let rows = client
            .query(
                &format!(
                    "SELECT r.root,
                        COALESCE(sum(pg_total_relation_size(c.oid) - pg_indexes_size(c.oid)), 0)::int8,
                        COALESCE(sum(greatest(c.reltuples, 0)), 0)::int8,
                        COALESCE(array_agg(n.nspname::text ORDER BY n.nspname, c.relname) FILTER (WHERE NOT c.identified), '{{}}'),
                        COALESCE(array_agg(c.relname::text ORDER BY n.nspname, c.relname) FILTER (WHERE NOT c.identified), '{{}}')
                 FROM unnest($1::oid[]) AS r(root)
                 CROSS JOIN LATERAL pg_partition_tree(r.root) p
                 JOIN LATERAL (
                     SELECT l.oid, l.relname, l.relnamespace, l.reltuples,
                            CASE WHEN (SELECT relreplident FROM pg_class WHERE oid = r.root) = 'f'
                                 -- Matched by all values: a partition must send whole rows.
                                 THEN l.relreplident = 'f'
                                 ELSE l.relreplident = 'f' OR (l.relreplident IN ('d', 'i')
                                      AND {} = 'usable')
                            END AS identified
                     FROM pg_class l WHERE l.oid = p.relid AND l.relkind = 'r'
                 ) c ON true
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 GROUP BY r.root",
                    IdentityKey::sql("l")
                ),
                &[&partitioned],
            )
            .await
            .map_err(|e| error::pg("Reading the partitions of the selected tables", e))?;
        for row in rows {
            let root: u32 = row.get(0);
            let Some(table) = selected.iter_mut().find(|t| t.oid == root) else {
                continue;
            };
            table.size_bytes = row.get(1);
            table.estimated_rows = row.get(2);
            let schemas: Vec<String> = row.get(3);
            let names: Vec<String> = row.get(4);
            table.partitions_without_identity = schemas
                .into_iter()
                .zip(names)
                .map(|(schema, name)| TableName::new(schema, name))
                .collect();
        }
    }
    Ok(selected)
}

/// Why a table the globs match is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreplicated {
    Unlogged,
    /// The extension that owns it.
    OfExtension(String),
}

/// Tables the `[tables]` globs match that sluice leaves out, each with the reason: unlogged
/// tables (their changes never reach the WAL) and tables an extension owns.
pub async fn unreplicated_tables(
    client: &Client,
    tables: &TablesConfig,
) -> Result<Vec<(TableName, Unreplicated)>> {
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, c.relpersistence = 'u', e.extname::text
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                      AND d.deptype = 'e'
                 LEFT JOIN pg_extension e ON e.oid = d.refobjid
                 WHERE c.relkind IN ('r', 'p')
                   AND NOT c.relispartition
                   AND c.relpersistence IN ('p', 'u')
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'sluice')
                   AND n.nspname NOT LIKE 'pg\\_%'
                   AND (c.relpersistence = 'u' OR NOT {NOT_AN_EXTENSION_MEMBER})
                 ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .map_err(|e| error::pg("Listing the source's unlogged and extension tables", e))?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
            let reason = match row.get::<_, bool>(2) {
                true => Unreplicated::Unlogged,
                false => {
                    Unreplicated::OfExtension(row.get::<_, Option<String>>(3).unwrap_or_default())
                }
            };
            (name, reason)
        })
        .filter(|(name, _)| tables.selects(&name.qualified()))
        .collect())
}

/// What the `[tables]` globs miss or cannot do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GlobMisses {
    /// Include globs that match no table of the source at all (a typo, or a name whose case
    /// differs: globs are case-sensitive).
    pub unmatched: Vec<String>,
    /// Partitions the globs match by name, with their root, which they do not select:
    /// partitions are never selected on their own.
    pub partitions: Vec<(TableName, TableName)>,
    /// Exclude globs that match partitions only: a partition goes with its root, so
    /// excluding it changes nothing.
    pub partition_excludes: Vec<String>,
}

pub async fn glob_misses(client: &Client, tables: &TablesConfig) -> Result<GlobMisses> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, rn.nspname::text, r.relname::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_class r ON c.relispartition AND r.oid = pg_partition_root(c.oid)
             LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence IN ('p', 'u')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'sluice')
               AND n.nspname NOT LIKE 'pg\\_%'",
            &[],
        )
        .await
        .map_err(|e| error::pg("Listing the source's tables", e))?;
    let mut misses = GlobMisses::default();
    let mut names = Vec::with_capacity(rows.len());
    let mut partition_names = Vec::new();
    for row in &rows {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let root: Option<String> = row.get(3);
        if let Some(root) = root {
            let root = TableName::new(row.get::<_, String>(2), root);
            // A root the includes match but an exclude takes out was left out on purpose,
            // and its partitions with it.
            let root_included = tables.include.is_empty()
                || tables
                    .include
                    .iter()
                    .any(|glob| crate::config::glob_matches(glob, &root.qualified()));
            if tables.selects(&name.qualified()) && !root_included {
                misses.partitions.push((name.clone(), root));
            }
            partition_names.push(name.qualified());
        } else {
            names.push(name.qualified());
        }
    }
    let matches_any = |glob: &str, list: &[String]| {
        list.iter()
            .any(|name| crate::config::glob_matches(glob, name))
    };
    misses.unmatched = tables
        .include
        .iter()
        .filter(|glob| !matches_any(glob, &names) && !matches_any(glob, &partition_names))
        .cloned()
        .collect();
    misses.partition_excludes = tables
        .exclude
        .iter()
        .filter(|glob| !matches_any(glob, &names) && matches_any(glob, &partition_names))
        .cloned()
        .collect();
    misses.partitions.sort();
    Ok(misses)
}

/// The first `limit` names, then how many more (messages about many tables stay readable).
pub fn abbreviate(names: &[String], limit: usize) -> String {
    if names.len() <= limit {
        names.join(", ")
    } else {
        format!(
            "{} and {} more",
            names[..limit].join(", "),
            names.len() - limit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let table = TableName::new("My Schema", "we\"ird");
        assert_eq!(table.quoted(), "\"My Schema\".\"we\"\"ird\"");
        assert_eq!(table.qualified(), "My Schema.we\"ird");
        assert_eq!(table.to_string(), "\"My Schema\".\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            TableName::parse("orders"),
            TableName::new("public", "orders")
        );
    }

    #[test]
    fn names_are_shown_quoted_only_where_postgresql_needs_it() {
        let shown = |schema: &str, name: &str| TableName::new(schema, name).to_string();
        assert_eq!(shown("public", "orders_2024"), "public.orders_2024");
        assert_eq!(shown("public", "_t"), "public._t");
        assert_eq!(shown("public", "Orders"), "public.\"Orders\"");
        assert_eq!(shown("public", "order"), "public.\"order\"");
        assert_eq!(shown("public", "2024"), "public.\"2024\"");
        assert_eq!(shown("public", ""), "public.\"\"");
        // Two tables whose plain names would read the same.
        assert_ne!(shown("a", "b.c"), shown("a.b", "c"));
        assert_eq!(shown("a", "b.c"), "a.\"b.c\"");
        assert_eq!(shown("Ünï", "t"), "\"Ünï\".t");
        // Unreserved keywords need no quotes, as in PostgreSQL.
        assert_eq!(shown("public", "data"), "public.data");
        // And back.
        for (schema, name) in [
            ("public", "orders"),
            ("My Schema", "we\"ird"),
            ("a", "b.c"),
            ("a.b", "c"),
            ("public", "order"),
            ("x", "\"\""),
        ] {
            let table = TableName::new(schema, name);
            assert_eq!(TableName::parse_shown(&table.to_string()), Some(table));
        }
        assert_eq!(TableName::parse_shown("nodot"), None);
        assert_eq!(TableName::parse_shown("\"open.t"), None);
    }
}
