//! `sluice schema`: duplicate the selected tables' schema on the target.
//!
//! How: `pg_dump --schema-only --format=custom` of every schema that holds a selected table
//! or a type one of them needs, then `pg_restore --list` to read its table of contents, and
//! a filter that keeps exactly the objects the selected tables need. The filter works on
//! the catalog OIDs TOC entries carry, not on SQL text (the few entries without one,
//! `SEQUENCE OWNED BY` and `TABLE`/`INDEX ATTACH`, are matched by the schema and name of
//! the sequence, partition or index they belong to):
//!
//! - types the columns use, recursively (enums, domains and their base types, composite
//!   and range types, array element types);
//! - the user-defined collations of the columns, those types and the indexes;
//! - sequences the tables own (serial, identity) or call in a DEFAULT (shared sequences);
//! - the tables, their partitions, their column defaults;
//! - primary keys (pre-data: apply needs them to find rows), other constraints, indexes and
//!   foreign keys (post-data: cheaper to build once after the copy).
//!
//! `pg_dump -t` alone was rejected: it dumps no types and no shared sequence. Functions are
//! not copied (a DEFAULT or CHECK calling one fails with a clear error: create the function
//! on the target first), nor triggers: on a replication target they would fire a second time
//! for changes the source's triggers already made; nor foreign keys to tables that are not
//! selected (they could only fail after the copy). They are listed for the operator.
//!
//! The kept entries are turned back into SQL with `pg_restore --use-list`: pre-data runs on
//! the target in one transaction, which also stores the post-data statements in
//! `sluice.deferred_ddl` for `sluice run` to apply after the copy ([`apply_deferred_ddl`]).
//! Tables, types and sequences that exist on the target are left alone (and so are the
//! deferred statements of a table left alone) unless `--drop-if-exists` drops the tables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use crate::citus::{self, TableKind};
use crate::config::Config;
use crate::conninfo::ConnInfo;
use crate::control::SharedStatus;
use crate::error::{self, Error, ErrorKind, Result};
use crate::source::{quote_ident, selected_tables, TableName};

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// Drop selected tables that already exist on the target (CASCADE) and create them anew.
    #[arg(long)]
    pub drop_if_exists: bool,
}

/// Where the post-data statements wait for the end of the copy.
pub const DEFERRED_DDL_TABLE: &str = "sluice.deferred_ddl";

/// `table_name` is the quoted root table a statement belongs to (built as soon as that
/// table is copied); NULL for foreign keys and statements tied to no one table (built once
/// every table is).
const CREATE_DEFERRED_DDL: &str = "CREATE SCHEMA IF NOT EXISTS sluice;
    CREATE TABLE IF NOT EXISTS sluice.deferred_ddl (
        id serial PRIMARY KEY,
        statement text NOT NULL,
        applied_at timestamptz,
        table_name text
    );
    ALTER TABLE sluice.deferred_ddl ADD COLUMN IF NOT EXISTS table_name text;";

/// One statement waiting in `sluice.deferred_ddl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredStatement {
    pub id: i32,
    pub statement: String,
    /// The quoted root table whose copy it waits for; `None`: it waits for every table.
    pub table: Option<String>,
}

/// Whether `sluice schema` made its table of deferred statements on the target.
async fn deferred_ddl_exists(target: &Client) -> Result<bool> {
    Ok(target
        .query_one("SELECT to_regclass('sluice.deferred_ddl') IS NOT NULL", &[])
        .await
        .map_err(|e| error::pg("Looking for sluice.deferred_ddl on the target", e))?
        .get(0))
}

/// The statements not applied yet, oldest first; none when `sluice schema` never ran.
pub async fn pending_deferred_ddl(target: &Client) -> Result<Vec<DeferredStatement>> {
    if !deferred_ddl_exists(target).await? {
        return Ok(Vec::new());
    }
    // Through jsonb so a table made by an older sluice (without table_name) reads too.
    let rows = target
        .query(
            "SELECT id, statement, to_jsonb(d) ->> 'table_name'
             FROM sluice.deferred_ddl d WHERE applied_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .map_err(|e| error::pg("Reading sluice.deferred_ddl on the target", e))?;
    Ok(rows
        .iter()
        .map(|row| DeferredStatement {
            id: row.get(0),
            statement: row.get(1),
            table: row.get(2),
        })
        .collect())
}

/// Runs the post-data statements `sluice schema` stored (primary keys when it deferred them,
/// indexes, other constraints, foreign keys), oldest first, each in its own transaction
/// together with marking its row applied. Idempotent: applied rows are skipped, and a
/// statement whose object already exists (created by hand) is marked applied. Returns how
/// many statements ran now. Without the table (no `sluice schema` run) there is nothing to
/// do: `Ok(0)`. The copy builds them table by table instead (`snapshot::ddl`).
pub async fn apply_deferred_ddl(target: &Client, status: Option<&SharedStatus>) -> Result<usize> {
    let mut applied = 0;
    for statement in pending_deferred_ddl(target).await? {
        if apply_deferred_statement(target, &statement, status).await? {
            applied += 1;
        }
    }
    Ok(applied)
}

const MARK_APPLIED: &str = "UPDATE sluice.deferred_ddl SET applied_at = now() WHERE id = $1";

/// `--drop-if-exists` on tables whose rows the state dir says this migration copied (or
/// streams into) is refused: the migration would go on without them.
fn refuse_dropping_migrated_tables(config: &Config, dropped: &[&TableName]) -> Result<()> {
    let state_dir = &config.state.dir;
    if !crate::checkpoint::sled_path(state_dir).is_dir() {
        return Ok(());
    }
    let start_over = "To start over, stop sluice run and run `sluice teardown` first (it also removes the state dir's checkpoint), then `sluice schema --drop-if-exists`";
    if crate::checkpoint::daemon_holds(state_dir) {
        return Err(Error::definite(format!(
            "sluice run is running on the state dir {}: --drop-if-exists would recreate, empty, tables it streams into. {start_over}",
            state_dir.display()
        )));
    }
    let store = crate::checkpoint::Store::open(state_dir)?;
    let copied: BTreeSet<TableName> = crate::snapshot::state::load_tables(&store)?
        .into_iter()
        .map(|record| record.name)
        .collect();
    let streamed = store.position()?.is_some();
    let migrated: Vec<String> = dropped
        .iter()
        .filter(|name| streamed || copied.contains(**name))
        .map(|name| name.to_string())
        .collect();
    if migrated.is_empty() {
        return Ok(());
    }
    Err(Error::definite(format!(
        "The state dir {} records a migration into {}: --drop-if-exists would recreate them empty, and the next `sluice run` would resume as if their rows were there. {start_over}",
        state_dir.display(),
        crate::source::abbreviate(&migrated, 10)
    )))
}

/// Runs one deferred statement in its own transaction together with marking its row
/// applied, so a crash in between never runs it twice (call it outside a transaction, on a
/// client not used concurrently). `Ok(false)` when its object existed already (SQLSTATE
/// 42P07/42710, or 42P16 for a primary key added under another name: the operator created
/// it): the row is marked applied all the same.
pub async fn apply_deferred_statement(
    target: &Client,
    deferred: &DeferredStatement,
    status: Option<&SharedStatus>,
) -> Result<bool> {
    let id = deferred.id;
    let title = statement_title(&deferred.statement);
    let _shown = status.map(|status| status.building(&title));
    // A key over a large table takes minutes to hours: say what is being built.
    tracing::info!(statement = %title, table = %deferred.table.as_deref().unwrap_or("-"), "building deferred DDL");
    let started = std::time::Instant::now();
    let run = async {
        // A key over a large table may build for hours: a statement_timeout or lock_timeout
        // the target sets for its database or role would cancel it (pg_restore turns them
        // off for the same reason). For this transaction only.
        target
            .batch_execute("BEGIN; SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
            .await?;
        target.batch_execute(&deferred.statement).await?;
        target.execute(MARK_APPLIED, &[&id]).await?;
        target.batch_execute("COMMIT").await
    };
    match run.await {
        Ok(()) => {
            tracing::info!(
                statement = %title,
                seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                "deferred DDL applied"
            );
            Ok(true)
        }
        Err(e) => {
            let _ = target.batch_execute("ROLLBACK").await;
            let code = e.code().map(|c| c.code().to_string());
            // A primary key the operator added under another name is refused as a second
            // one (42P16), not as a duplicate name: it is there all the same.
            let key_present = code.as_deref() == Some("42P16")
                && deferred.statement.contains("PRIMARY KEY")
                && e.as_db_error()
                    .is_some_and(|db| db.message().contains("multiple primary keys"));
            // A foreign key whose rows do not hold yet: a table copied again under a later
            // snapshot than the one it refers to (after a restart in the middle of the
            // copy) holds rows whose referenced rows arrive only by streaming. Created NOT
            // VALID (it holds for every row written from now on, and costs no scan), and
            // validated once streaming has passed every table's sync position
            // (`validate_deferred_foreign_keys`).
            if code.as_deref() == Some("23503") {
                if let Some(not_valid) = foreign_key_not_valid(&deferred.statement) {
                    let run = async {
                        target.batch_execute("BEGIN").await?;
                        target.batch_execute(&not_valid).await?;
                        target.execute(MARK_APPLIED, &[&id]).await?;
                        target.batch_execute("COMMIT").await
                    };
                    match run.await {
                        Ok(()) => {
                            tracing::info!(
                                statement = %title,
                                "foreign key created NOT VALID: rows it refers to are still on their way (a table was copied under a later snapshot); validated once streaming has caught up"
                            );
                            return Ok(true);
                        }
                        Err(_) => {
                            let _ = target.batch_execute("ROLLBACK").await;
                        }
                    }
                }
            }
            if matches!(code.as_deref(), Some("42P07") | Some("42710")) || key_present {
                target
                    .execute(MARK_APPLIED, &[&id])
                    .await
                    .map_err(|e| error::pg("Marking sluice.deferred_ddl on the target", e))?;
                tracing::info!(statement = %title, "deferred DDL already present on the target");
                return Ok(false);
            }
            // Without an answer from the server (a lost connection, a restart) there is
            // nothing to fix: it is built again on the next attempt.
            let context = if e.as_db_error().is_none() {
                format!("Creating {title} on the target after the copy (sluice.deferred_ddl id {id}): the connection was lost; it is built again on the next attempt")
            } else {
                let cause = match code.as_deref() {
                    Some("23505") => "rows on the target break its uniqueness: find and fix the duplicate keys",
                    Some("23503") => "rows on the target have no referenced row: fix the orphan rows",
                    Some("23514") | Some("23P01") => "rows on the target break it: fix those rows",
                    Some("42704") | Some("42883") => "an object it needs is missing on the target (an extension's operator class or function? run CREATE EXTENSION for it)",
                    _ => "fix the cause below",
                };
                format!("Creating {title} on the target after the copy (sluice.deferred_ddl id {id}): {cause}, or create it by hand; then restart")
            };
            Err(error::pg(context, e))
        }
    }
}

/// The statement of a deferred foreign key with NOT VALID added; `None` for other
/// statements and for a key the source itself has NOT VALID (pg_dump writes it so).
fn foreign_key_not_valid(statement: &str) -> Option<String> {
    if !statement_title(statement).starts_with("FK CONSTRAINT ") || statement.contains("NOT VALID")
    {
        return None;
    }
    let body = statement.trim_end().strip_suffix(';')?;
    Some(format!("{body} NOT VALID;"))
}

/// The table and constraint name of a deferred foreign-key statement (`ALTER TABLE [ONLY]
/// <table> ADD CONSTRAINT <name> FOREIGN KEY ...`, as pg_dump writes it: identifiers quoted
/// where needed), as written.
fn foreign_key_of(statement: &str) -> Option<(String, String)> {
    let sql: String = statement
        .lines()
        .filter(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    let rest = sql.trim_start().strip_prefix("ALTER TABLE ")?;
    let rest = rest.strip_prefix("ONLY ").unwrap_or(rest);
    let (table, rest) = identifier_token(rest)?;
    let rest = rest.trim_start().strip_prefix("ADD CONSTRAINT ")?;
    let (name, rest) = identifier_token(rest)?;
    rest.trim_start()
        .starts_with("FOREIGN KEY")
        .then(|| (table.to_string(), name.to_string()))
}

fn validate_sql(table: &str, name: &str) -> String {
    format!("ALTER TABLE {table} VALIDATE CONSTRAINT {name}")
}

/// A possibly schema-qualified identifier as SQL writes it (double quotes keep spaces and
/// dots), and what follows it.
fn identifier_token(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    let mut in_quotes = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => return Some((&text[..i], &text[i..])),
            _ => {}
        }
    }
    None
}

/// Validates the deferred foreign keys created NOT VALID (see `apply_deferred_statement`):
/// call it once the target holds every row they refer to. A key that still does not hold
/// is a difference between source and target: returned as text for the operator, not
/// fatal (streaming goes on; `sluice verify` names the rows).
pub async fn validate_deferred_foreign_keys(target: &Client) -> Result<Vec<String>> {
    if !deferred_ddl_exists(target).await? {
        return Ok(Vec::new());
    }
    let rows = target
        .query(
            "SELECT statement FROM sluice.deferred_ddl WHERE applied_at IS NOT NULL ORDER BY id",
            &[],
        )
        .await
        .map_err(|e| error::pg("Reading sluice.deferred_ddl on the target", e))?;
    let mut problems = Vec::new();
    for row in rows {
        let statement: String = row.get(0);
        if statement.contains("NOT VALID") {
            continue;
        }
        let Some((table, name)) = foreign_key_of(&statement) else {
            continue;
        };
        let title = statement_title(&statement);
        let not_valid: bool = target
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint
                                WHERE conrelid = to_regclass($1) AND quote_ident(conname) = $2
                                  AND contype = 'f' AND NOT convalidated)",
                &[&table, &name],
            )
            .await
            .map_err(|e| error::pg(format!("Looking up {title} on the target"), e))?
            .get(0);
        if !not_valid {
            continue;
        }
        match target.batch_execute(&validate_sql(&table, &name)).await {
            Ok(()) => tracing::info!(statement = %title, "validated the foreign key"),
            Err(e) => problems.push(format!(
                "{title} does not hold on the target although streaming has caught up: {} (`sluice verify` shows which rows differ from the source)",
                e.as_db_error().map_or_else(|| e.to_string(), |db| {
                    format!("{}{}", db.message(), db.detail().map(|d| format!(" ({d})")).unwrap_or_default())
                })
            )),
        }
    }
    Ok(problems)
}

/// Unique indexes of a distributed table (`tables`: its root and partitions) that lack its
/// distribution column `column` as a plain key column, and the unique constraints built on
/// them. Citus cannot enforce uniqueness without the distribution column and refuses to
/// create them, which would otherwise only show after the copy. Keyed by (catalog, OID) as
/// the TOC names them (`pg_class` for the index, `pg_constraint` for the constraint);
/// the value describes the index for the operator. Primary keys are not listed: they are
/// created with the table and `create_distributed_table` checks them itself.
pub async fn unenforceable_on_citus(
    source: &Client,
    tables: &[u32],
    column: &str,
) -> Result<BTreeMap<(u32, u32), String>> {
    let rows = source
        .query(
            "SELECT i.indexrelid, con.oid, format('%s on %s', ic.relname, i.indrelid::regclass)
             FROM pg_index i
             JOIN pg_class ic ON ic.oid = i.indexrelid
             LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype = 'u'
                                         AND con.conrelid = i.indrelid
             WHERE i.indrelid = ANY($1) AND i.indisunique AND NOT i.indisprimary
               AND NOT EXISTS (
                   SELECT 1 FROM pg_attribute a
                   WHERE a.attrelid = i.indrelid AND a.attname = $2
                     AND a.attnum = ANY(i.indkey::int2[]))",
            &[&tables, &column],
        )
        .await
        .map_err(|e| {
            error::pg(
                "Reading the unique indexes of the distributed tables on the source",
                e,
            )
        })?;
    let mut found = BTreeMap::new();
    for row in rows {
        let description: String = row.get(2);
        found.insert((PG_CLASS, row.get::<_, u32>(0)), description.clone());
        if let Some(constraint) = row.get::<_, Option<u32>>(1) {
            found.insert((PG_CONSTRAINT, constraint), description);
        }
    }
    Ok(found)
}

/// `-- INDEX public.orders_note_idx` first line of a stored statement, for messages.
pub(crate) fn statement_title(statement: &str) -> String {
    statement
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("-- "))
        .unwrap_or("a deferred statement")
        .to_string()
}

/// What the selected tables consist of on the source, by catalog OID.
#[derive(Debug, Default)]
struct Needs {
    /// Selected tables (roots).
    roots: BTreeMap<u32, TableName>,
    /// Every table to create (roots and their partitions) → the root it belongs to.
    tables: BTreeMap<u32, (TableName, u32)>,
    /// pg_type OID → name.
    types: BTreeMap<u32, TableName>,
    /// pg_class OID → sequence and its owning table (if any).
    sequences: BTreeMap<u32, (TableName, Option<u32>)>,
    /// pg_attrdef OID → table.
    defaults: BTreeMap<u32, u32>,
    /// pg_constraint OID → (table, is primary key).
    constraints: BTreeMap<u32, (u32, bool)>,
    /// index pg_class OID → (table, is primary key, index name).
    indexes: BTreeMap<u32, (u32, bool, TableName)>,
    /// pg_trigger OID → description (never copied, listed).
    triggers: BTreeMap<u32, String>,
    /// Views and materialized views reading the selected tables → (name, materialized)
    /// (never copied, listed: the application may need them after cutover).
    views: BTreeMap<u32, (TableName, bool)>,
    /// Foreign keys to tables that are not selected → description (never copied, listed):
    /// the referenced table would not exist on the target.
    dangling_fks: BTreeMap<u32, String>,
    /// Extensions the tables need → what needs it first (`type public.citext`, `index
    /// public.booking_excl`: an extension's types, or the operator classes and functions
    /// of an index or constraint, which is built only after the copy).
    extensions: BTreeMap<String, String>,
    /// Types that are neither built in nor dumpable (base types of no extension).
    foreign_types: BTreeSet<TableName>,
    /// pg_collation OID → name: user-defined collations of columns, types and indexes
    /// (`COLLATE public.ci`); without them the tables cannot be created.
    collations: BTreeMap<u32, TableName>,
}

impl Needs {
    fn schemas(&self) -> BTreeSet<String> {
        self.tables
            .values()
            .map(|(t, _)| t.schema.clone())
            .chain(self.types.values().map(|t| t.schema.clone()))
            .chain(self.sequences.values().map(|(s, _)| s.schema.clone()))
            .chain(self.collations.values().map(|c| c.schema.clone()))
            .collect()
    }
}

/// Every type the columns of the tables `$1` use, recursively (array elements, domain
/// bases, range subtypes, a multirange's range, composite fields), outside pg_catalog:
/// oid, schema, name, typtype, the extension it belongs to, the relkind of a row type.
const USER_TYPES_SQL: &str = "WITH RECURSIVE deps(oid) AS (
                 SELECT a.atttypid FROM pg_attribute a
                 WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
               UNION
                 SELECT x.oid FROM deps d JOIN pg_type t ON t.oid = d.oid
                 CROSS JOIN LATERAL (
                     SELECT t.typelem WHERE t.typelem <> 0
                     UNION ALL SELECT t.typbasetype WHERE t.typbasetype <> 0
                     UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = t.oid
                     UNION ALL SELECT d.refobjid FROM pg_depend d
                               WHERE t.typtype = 'm' AND d.classid = 'pg_type'::regclass
                                 AND d.objid = t.oid AND d.refclassid = 'pg_type'::regclass
                                 AND d.deptype = 'i'
                     UNION ALL SELECT a.atttypid FROM pg_attribute a
                               WHERE t.typtype = 'c' AND a.attrelid = t.typrelid
                                 AND a.attnum > 0 AND NOT a.attisdropped
                 ) x(oid)
             )
             SELECT t.oid, n.nspname::text, t.typname::text, t.typtype::text,
                    (SELECT e.extname::text FROM pg_depend dep
                     JOIN pg_extension e ON e.oid = dep.refobjid
                     WHERE dep.classid = 'pg_type'::regclass AND dep.objid = t.oid
                       AND dep.refclassid = 'pg_extension'::regclass AND dep.deptype = 'e'),
                    COALESCE((SELECT c.relkind::text FROM pg_class c WHERE c.oid = t.typrelid), '')
             FROM deps JOIN pg_type t ON t.oid = deps.oid
             JOIN pg_namespace n ON n.oid = t.typnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND NOT (t.typcategory = 'A' AND t.typelem <> 0)";

/// The user-defined types (enum, domain, composite, range) the columns of `tables` use,
/// recursively, quoted: those of no extension and not a table's row type.
pub(crate) async fn user_types_of(source: &Client, tables: &[u32]) -> Result<Vec<String>> {
    let rows = source
        .query(USER_TYPES_SQL, &[&tables])
        .await
        .map_err(|e| error::pg("Reading the types of the selected tables on the source", e))?;
    Ok(rows
        .iter()
        .filter(|row| {
            let typtype: String = row.get(3);
            let extension: Option<String> = row.get(4);
            let relkind: String = row.get(5);
            extension.is_none()
                && matches!(typtype.as_str(), "e" | "d" | "c" | "r")
                && (typtype != "c" || relkind == "c")
        })
        .map(|row| TableName::new(row.get::<_, String>(1), row.get::<_, String>(2)).quoted())
        .collect())
}

/// What a type is, to tell a type already on the target from the source's: its kind, and
/// its fields (composite), base type (domain), subtype (range) or labels (enum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TypeShape {
    pub description: String,
    pub labels: Vec<String>,
}

/// The shapes of the named types (quoted) that exist on this side. Type names in the
/// description are schema-qualified (the session's search_path is empty), so the two
/// sides compare as text.
pub(crate) async fn type_shapes(
    client: &Client,
    names: &[String],
    side: &str,
) -> Result<BTreeMap<String, TypeShape>> {
    let rows = client
        .query(
            "SELECT n.name,
                    CASE t.typtype
                      WHEN 'c' THEN format('composite (%s)', (
                          SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum)
                          FROM pg_attribute a
                          WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped))
                      WHEN 'd' THEN format('domain over %s', format_type(t.typbasetype, t.typtypmod))
                      WHEN 'r' THEN format('range over %s', (
                          SELECT format_type(r.rngsubtype, NULL) FROM pg_range r WHERE r.rngtypid = t.oid))
                      WHEN 'e' THEN 'enum'
                      ELSE format('type of kind %s', t.typtype)
                    END,
                    ARRAY(SELECT e.enumlabel::text FROM pg_enum e
                          WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder)
             FROM unnest($1::text[]) AS n(name)
             JOIN pg_type t ON t.oid = to_regtype(n.name)",
            &[&names],
        )
        .await
        .map_err(|e| error::pg(format!("Reading the types of the selected tables on the {side}"), e))?;
    Ok(rows
        .iter()
        .map(|row| {
            (
                row.get(0),
                TypeShape {
                    description: row.get(1),
                    labels: row.get(2),
                },
            )
        })
        .collect())
}

/// A composite whose fields differ (by name, type or order: values travel as text, field by
/// position, so they would land in the wrong fields), a domain over another base type or
/// modifier (values rounded or refused), a range over another subtype, an enum lacking
/// labels, or another kind of type altogether: one line each.
pub(crate) fn shape_differences(
    on_source: &BTreeMap<String, TypeShape>,
    on_target: &BTreeMap<String, TypeShape>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, theirs) in on_target {
        let Some(ours) = on_source.get(name) else {
            continue;
        };
        if ours.description != theirs.description {
            out.push(format!(
                "type {name} is {} on the source but {} on the target",
                ours.description, theirs.description
            ));
            continue;
        }
        let missing: Vec<String> = ours
            .labels
            .iter()
            .filter(|label| !theirs.labels.contains(label))
            .map(|label| crate::source::quote_literal(label))
            .collect();
        if !missing.is_empty() {
            out.push(format!(
                "enum {name} lacks the source's labels {} on the target (ALTER TYPE {name} ADD VALUE ... for each)",
                missing.join(", ")
            ));
        }
    }
    out
}

async fn gather(source: &Client, roots: BTreeMap<u32, TableName>) -> Result<Needs> {
    let pg = |what: &'static str| move |e| error::pg(format!("Reading {what} on the source"), e);
    let mut needs = Needs::default();
    let root_oids: Vec<u32> = roots.keys().copied().collect();
    // Partitions at every level belong to their root: created with it, skipped with it.
    for row in source
        .query(
            "SELECT p.relid::oid, n.nspname::text, c.relname::text, r.root
             FROM unnest($1::oid[]) AS r(root)
             CROSS JOIN LATERAL pg_partition_tree(r.root) p
             JOIN pg_class c ON c.oid = p.relid
             JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[&root_oids],
        )
        .await
        .map_err(pg("the partitions of the selected tables"))?
    {
        let name = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
        needs.tables.insert(row.get(0), (name, row.get(3)));
    }
    // pg_partition_tree returns no rows for a plain table: add the roots themselves.
    for (oid, name) in &roots {
        needs.tables.entry(*oid).or_insert((name.clone(), *oid));
    }
    needs.roots = roots;
    let oids: Vec<u32> = needs.tables.keys().copied().collect();

    for row in source
        .query(USER_TYPES_SQL, &[&oids])
        .await
        .map_err(pg("the types of the selected tables"))?
    {
        let name = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
        let typtype: String = row.get(3);
        let extension: Option<String> = row.get(4);
        let relkind: String = row.get(5);
        if let Some(extension) = extension {
            needs
                .extensions
                .entry(extension)
                .or_insert_with(|| format!("type {name}"));
        } else if typtype == "c" && relkind != "c" {
            // A table's row type used as a column: it comes with that table, not as a type.
            needs.foreign_types.insert(name);
        } else if matches!(typtype.as_str(), "e" | "d" | "c" | "r") {
            needs.types.insert(row.get(0), name);
        } else if typtype == "m" {
            // A multirange cannot be created on its own: its range type brings it, and the
            // walk above added that range type.
        } else {
            needs.foreign_types.insert(name);
        }
    }

    // The initdb and ICU collations of pg_catalog are the target's own; only user-defined
    // ones (CREATE COLLATION) must come along.
    let type_oids: Vec<u32> = needs.types.keys().copied().collect();
    for row in source
        .query(
            "SELECT c.oid, n.nspname::text, c.collname::text
             FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND c.oid IN (
                 SELECT a.attcollation FROM pg_attribute a
                 WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
                 UNION SELECT unnest(i.indcollation::oid[]) FROM pg_index i
                 WHERE i.indrelid = ANY($1)
                 UNION SELECT t.typcollation FROM pg_type t WHERE t.oid = ANY($2)
                 UNION SELECT r.rngcollation FROM pg_range r WHERE r.rngtypid = ANY($2)
                 UNION SELECT a.attcollation FROM pg_type t
                 JOIN pg_attribute a ON a.attrelid = t.typrelid
                 WHERE t.oid = ANY($2) AND a.attnum > 0 AND NOT a.attisdropped)",
            &[&oids, &type_oids],
        )
        .await
        .map_err(pg("the collations of the selected tables"))?
    {
        let name = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
        needs.collations.insert(row.get(0), name);
    }

    for sequence in super::sequences::sequences_of(source, &oids).await? {
        let owner = sequence.owner.filter(|o| needs.tables.contains_key(o));
        needs
            .sequences
            .insert(sequence.oid, (sequence.name.clone(), owner));
    }
    for row in source
        .query(
            "SELECT oid, adrelid FROM pg_attrdef WHERE adrelid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(pg("the column defaults of the selected tables"))?
    {
        needs.defaults.insert(row.get(0), row.get(1));
    }
    for row in source
        .query(
            "SELECT c.oid, c.conrelid, c.contype = 'p',
                    CASE WHEN c.contype = 'f' AND NOT c.confrelid = ANY($1)
                         THEN format('%s on %s references %s', c.conname, c.conrelid::regclass, c.confrelid::regclass)
                    END
             FROM pg_constraint c WHERE c.conrelid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(pg("the constraints of the selected tables"))?
    {
        let dangling: Option<String> = row.get(3);
        match dangling {
            Some(description) => {
                needs.dangling_fks.insert(row.get(0), description);
            }
            None => {
                needs
                    .constraints
                    .insert(row.get(0), (row.get(1), row.get(2)));
            }
        }
    }
    // An index or constraint is built only after the copy: one that needs an extension's
    // operator class (an EXCLUDE over btree_gist), operator or function must say so now,
    // not hours later. Its dependencies in pg_depend name every such member.
    for row in source
        .query(
            "SELECT DISTINCT e.extname::text, o.what
             FROM (SELECT 'pg_class'::regclass AS classid, i.indexrelid AS objid,
                          format('index %s', i.indexrelid::regclass) AS what
                   FROM pg_index i WHERE i.indrelid = ANY($1)
                   UNION ALL
                   SELECT 'pg_constraint'::regclass, c.oid,
                          format('constraint %s on %s', quote_ident(c.conname), c.conrelid::regclass)
                   FROM pg_constraint c WHERE c.conrelid = ANY($1)) AS o
             JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
             JOIN pg_depend m ON m.classid = d.refclassid AND m.objid = d.refobjid
                             AND m.refclassid = 'pg_extension'::regclass AND m.deptype = 'e'
             JOIN pg_extension e ON e.oid = m.refobjid
             ORDER BY 1, 2",
            &[&oids],
        )
        .await
        .map_err(pg("the extensions the indexes and constraints of the selected tables use"))?
    {
        needs.extensions.entry(row.get(0)).or_insert(row.get(1));
    }
    for row in source
        .query(
            "SELECT i.indexrelid, i.indrelid, i.indisprimary, n.nspname::text, c.relname::text
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE i.indrelid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(pg("the indexes of the selected tables"))?
    {
        let name = TableName::new(row.get::<_, String>(3), row.get::<_, String>(4));
        needs
            .indexes
            .insert(row.get(0), (row.get(1), row.get(2), name));
    }
    for row in source
        .query(
            "SELECT t.oid, t.tgname::text, t.tgrelid::regclass::text FROM pg_trigger t
             WHERE t.tgrelid = ANY($1) AND NOT t.tgisinternal AND t.tgparentid = 0",
            &[&oids],
        )
        .await
        .map_err(pg("the triggers of the selected tables"))?
    {
        needs.triggers.insert(
            row.get(0),
            format!("{} on {}", row.get::<_, String>(1), row.get::<_, String>(2)),
        );
    }
    // A view's query is a rewrite rule that depends on the tables it reads.
    for row in source
        .query(
            "SELECT DISTINCT v.oid, n.nspname::text, v.relname::text, v.relkind = 'm'
             FROM pg_depend d
             JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
             JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm')
             JOIN pg_namespace n ON n.oid = v.relnamespace
             WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY($1)
               AND v.oid <> d.refobjid",
            &[&oids],
        )
        .await
        .map_err(pg("the views over the selected tables"))?
    {
        let name = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
        needs.views.insert(row.get(0), (name, row.get(3)));
    }
    Ok(needs)
}

/// One line of `pg_restore --list`: `id; catalog oid DESC schema tag owner`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TocEntry {
    line: String,
    catalog: u32,
    oid: u32,
    /// Everything after the two numbers: `DESC schema tag owner`.
    rest: String,
}

fn parse_toc(list: &str) -> Vec<TocEntry> {
    list.lines()
        .filter(|line| !line.starts_with(';') && !line.trim().is_empty())
        .filter_map(|line| {
            let (_, after) = line.split_once("; ")?;
            let mut parts = after.splitn(3, ' ');
            let catalog = parts.next()?.parse().ok()?;
            let oid = parts.next()?.parse().ok()?;
            Some(TocEntry {
                line: line.to_string(),
                catalog,
                oid,
                rest: parts.next()?.to_string(),
            })
        })
        .collect()
}

const PG_TYPE: u32 = 1247;
const PG_CLASS: u32 = 1259;
const PG_ATTRDEF: u32 = 2604;
const PG_CONSTRAINT: u32 = 2606;
const PG_COLLATION: u32 = 3456;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Pre,
    Post,
}

/// Where a TOC entry goes, and the root table it belongs to (None for shared objects:
/// types and sequences no selected table owns). `None` for entries not needed. Primary keys
/// are post-data too when `defer_primary_keys` (the copy then loads tables without them).
fn place(
    entry: &TocEntry,
    needs: &Needs,
    defer_primary_keys: bool,
) -> Option<(Placement, Option<u32>, u32)> {
    use Placement::{Post, Pre};
    let key_placement = if defer_primary_keys { Post } else { Pre };
    let root_of = |table: u32| needs.tables.get(&table).map(|(_, root)| *root);
    match (entry.catalog, entry.oid) {
        (PG_TYPE, oid) if needs.types.contains_key(&oid) => Some((Pre, None, oid)),
        (PG_COLLATION, oid) if needs.collations.contains_key(&oid) => Some((Pre, None, oid)),
        (PG_CLASS, oid) if needs.tables.contains_key(&oid) => {
            Some((Pre, root_of(oid), oid)).filter(|_| entry.rest.starts_with("TABLE "))
        }
        (PG_CLASS, oid) if needs.sequences.contains_key(&oid) => {
            let owner = needs.sequences[&oid].1.and_then(root_of);
            Some((Pre, owner, oid))
        }
        (PG_CLASS, oid) if needs.indexes.contains_key(&oid) => {
            let (table, _, _) = needs.indexes[&oid];
            Some((Post, root_of(table), oid))
        }
        (PG_ATTRDEF, oid) => needs
            .defaults
            .get(&oid)
            .map(|table| (Pre, root_of(*table), oid)),
        (PG_CONSTRAINT, oid) => needs.constraints.get(&oid).map(|(table, primary)| {
            let placement = if *primary { key_placement } else { Post };
            (placement, root_of(*table), oid)
        }),
        (0, 0) => {
            // Entries without a catalog identity carry the object's schema and name.
            let names = |what: &str| entry.rest.strip_prefix(what).map(str::to_string);
            if let Some(rest) = names("SEQUENCE OWNED BY ") {
                needs.sequences.iter().find_map(|(oid, (name, owner))| {
                    let owner = (*owner)?;
                    rest.starts_with(&format!("{} {} ", name.schema, name.name))
                        .then(|| (Pre, root_of(owner), *oid))
                })
            } else if let Some(rest) = names("TABLE ATTACH ") {
                needs.tables.iter().find_map(|(oid, (name, root))| {
                    rest.starts_with(&format!("{} {} ", name.schema, name.name))
                        .then_some((Pre, Some(*root), *oid))
                })
            } else if let Some(rest) = names("INDEX ATTACH ") {
                needs
                    .indexes
                    .iter()
                    .find_map(|(oid, (table, primary, name))| {
                        rest.starts_with(&format!("{} {} ", name.schema, name.name))
                            .then(|| {
                                let placement = if *primary { key_placement } else { Post };
                                (placement, root_of(*table), *oid)
                            })
                    })
            } else {
                None
            }
        }
        _ => None,
    }
}

/// One object's SQL out of a `pg_restore` script.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScriptEntry {
    /// `INDEX public.orders_note_idx`
    title: String,
    /// The header's parts: `INDEX`, `public`, `orders_note_idx` (a constraint's tag is
    /// `table constraint`).
    kind: String,
    schema: String,
    tag: String,
    sql: String,
}

/// Splits a pg_restore script at its `-- Name: ...; Type: ...; Schema: ...` headers. The
/// preamble (SET commands) is returned separately; psql-only `\restrict` lines are dropped.
fn split_script(script: &str) -> (String, Vec<ScriptEntry>) {
    let lines: Vec<&str> = script
        .lines()
        .filter(|l| !(l.starts_with("\\restrict ") || l.starts_with("\\unrestrict ")))
        .collect();
    let mut preamble = String::new();
    let mut entries: Vec<ScriptEntry> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let header = line
            .strip_prefix("-- Name: ")
            .filter(|_| i > 0 && lines[i - 1] == "--");
        if let Some(header) = header {
            let (kind, schema, tag) = header_parts(header);
            entries.push(ScriptEntry {
                title: header_title(header),
                kind,
                schema,
                tag,
                sql: String::new(),
            });
            i += 1;
            continue;
        }
        match entries.last_mut() {
            None => {
                if !line.starts_with("--") {
                    preamble.push_str(line);
                    preamble.push('\n');
                }
            }
            Some(entry) => {
                entry.sql.push_str(line);
                entry.sql.push('\n');
            }
        }
        i += 1;
    }
    for entry in &mut entries {
        entry.sql = strip_comment_lines(&entry.sql);
        if let Some(title) = quoted_title(entry) {
            entry.title = title;
        }
    }
    entries.retain(|e| !e.sql.is_empty());
    (preamble.trim().to_string(), entries)
}

/// Drops the `--` lines pg_restore puts around headers and at the end; SQL stays as is.
fn strip_comment_lines(sql: &str) -> String {
    let kept: Vec<&str> = sql
        .lines()
        .filter(|l| !(*l == "--" || l.starts_with("-- PostgreSQL database dump")))
        .collect();
    kept.join("\n").trim().to_string()
}

/// The title with names quoted where PostgreSQL needs it, as every message writes them:
/// pg_restore's headers give names unquoted, and a constraint's as `table constraint`,
/// which a name with a space or a dot makes ambiguous. A constraint's names come from its
/// SQL (pg_dump quotes them); a one-name object's from the header. `None`: the header's.
fn quoted_title(entry: &ScriptEntry) -> Option<String> {
    if entry.kind.ends_with("CONSTRAINT") {
        let rest = entry.sql.strip_prefix("ALTER TABLE ")?;
        let rest = rest.strip_prefix("ONLY ").unwrap_or(rest);
        let (table, after) = rest.split_once("ADD CONSTRAINT ")?;
        let constraint = leading_identifier(after)?;
        return Some(format!("{} {} {constraint}", entry.kind, table.trim()));
    }
    let one_name = [
        "TABLE",
        "INDEX",
        "SEQUENCE",
        "TYPE",
        "DOMAIN",
        "VIEW",
        "MATERIALIZED VIEW",
    ];
    if !one_name.contains(&entry.kind.as_str()) {
        return None;
    }
    Some(match entry.schema.as_str() {
        "" | "-" => format!(
            "{} {}",
            entry.kind,
            crate::source::display_ident(&entry.tag)
        ),
        schema => format!(
            "{} {}",
            entry.kind,
            TableName::new(schema, entry.tag.as_str())
        ),
    })
}

/// The SQL identifier `text` starts with, as written (quoted with its doubled quotes, or
/// plain).
fn leading_identifier(text: &str) -> Option<&str> {
    let text = text.trim_start();
    if let Some(inner) = text.strip_prefix('"') {
        let mut chars = inner.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if chars.peek().is_some_and(|(_, next)| *next == '"') {
                    chars.next();
                    continue;
                }
                return Some(&text[..i + 2]);
            }
        }
        return None;
    }
    let end = text
        .find(|c: char| c.is_whitespace() || c == ';')
        .unwrap_or(text.len());
    (end > 0).then(|| &text[..end])
}

/// `orders orders_pkey; Type: CONSTRAINT; Schema: public; Owner: -` → `CONSTRAINT public.orders orders_pkey`
fn header_title(header: &str) -> String {
    let (kind, schema, name) = header_parts(header);
    if schema.is_empty() || schema == "-" {
        format!("{kind} {name}")
    } else {
        format!("{kind} {schema}.{name}")
    }
}

/// `orders orders_pkey; Type: CONSTRAINT; Schema: public; Owner: -` → (`CONSTRAINT`,
/// `public`, `orders orders_pkey`).
fn header_parts(header: &str) -> (String, String, String) {
    let mut name = header;
    let mut kind = "";
    let mut schema = "";
    for (i, part) in header.split("; ").enumerate() {
        if i == 0 {
            name = part;
        } else if let Some(t) = part.strip_prefix("Type: ") {
            kind = t;
        } else if let Some(s) = part.strip_prefix("Schema: ") {
            schema = s;
        }
    }
    (kind.to_string(), schema.to_string(), name.to_string())
}

/// The root table a deferred statement is built with, as soon as that table is copied:
/// its indexes (also a partition's, attached to the root's), its primary key and other
/// constraints. `None` for foreign keys (they need the referenced table's key, so they wait
/// for every table) and anything that cannot be told.
fn owning_root<'a>(entry: &ScriptEntry, needs: &'a Needs) -> Option<&'a TableName> {
    let root_name = |root: u32| needs.tables.get(&root).map(|(name, _)| name);
    let root_of = |table: u32| needs.tables.get(&table).map(|(_, root)| *root);
    match entry.kind.as_str() {
        "INDEX" | "INDEX ATTACH" => needs
            .indexes
            .values()
            .find(|(_, _, name)| name.schema == entry.schema && name.name == entry.tag)
            .and_then(|(table, _, _)| root_of(*table))
            .and_then(root_name),
        // The tag is `table constraint`; a table name may hold spaces: the longest match.
        "CONSTRAINT" | "CHECK CONSTRAINT" => needs
            .tables
            .values()
            .filter(|(name, _)| {
                name.schema == entry.schema
                    && entry
                        .tag
                        .strip_prefix(name.name.as_str())
                        .is_some_and(|rest| rest.starts_with(' '))
            })
            .max_by_key(|(name, _)| name.name.len())
            .and_then(|(_, root)| root_name(*root)),
        _ => None,
    }
}

/// A temporary directory for the dump, removed on drop (also on errors).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("sluice-schema-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| {
            Error::with_source(
                ErrorKind::Definite,
                format!(
                    "Creating the temporary directory {}: set TMPDIR to a writable directory",
                    path.display()
                ),
                e,
            )
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A libpq connection string holding only the database name: pg_dump treats a `--dbname`
/// with `=` in it as a connection string, so a plain name is quoted into one.
fn dbname_conninfo(dbname: &str) -> String {
    format!(
        "dbname='{}'",
        dbname.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// Runs a client tool against `conn`: host, port, user and database as arguments, the
/// password and TLS settings through the child's environment, never on the command line.
async fn run_tool(tool: &Path, conn: &ConnInfo, args: &[String]) -> Result<Vec<u8>> {
    let mut command = tokio::process::Command::new(tool);
    command
        .arg("--host")
        .arg(&conn.host)
        .arg("--port")
        .arg(conn.port.to_string())
        .arg("--username")
        .arg(&conn.user)
        .arg("--dbname")
        .arg(dbname_conninfo(&conn.dbname))
        .arg("--no-password")
        .args(args)
        .env_remove("PGPASSWORD")
        .env("PGSSLMODE", conn.sslmode.as_str())
        .env("PGAPPNAME", "sluice-schema")
        .env(
            "PGCONNECT_TIMEOUT",
            conn.connect_timeout.as_secs().max(2).to_string(),
        )
        .stdin(std::process::Stdio::null());
    if let Some(password) = &conn.password {
        command.env("PGPASSWORD", password.expose());
    }
    if let Some(options) = &conn.options {
        command.env("PGOPTIONS", options);
    }
    for (var, path) in [
        ("PGSSLROOTCERT", &conn.sslrootcert),
        ("PGSSLCERT", &conn.sslcert),
        ("PGSSLKEY", &conn.sslkey),
    ] {
        if let Some(path) = path {
            command.env(var, path);
        }
    }
    let output = command.output().await.map_err(|e| {
        Error::with_source(
            ErrorKind::Definite,
            format!("Running {}", tool.display()),
            e,
        )
    })?;
    if !output.status.success() {
        return Err(Error::definite(format!(
            "{} failed on {} ({}): {}",
            tool.display(),
            conn.redacted(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output.stdout)
}

/// Runs pg_restore on a local archive (no connection).
async fn restore(pg_restore: &Path, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(pg_restore)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Definite,
                format!("Running {}", pg_restore.display()),
                e,
            )
        })?;
    if !output.status.success() {
        return Err(Error::definite(format!(
            "{} {} failed ({}): {}",
            pg_restore.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    String::from_utf8(output.stdout)
        .map_err(|e| Error::with_source(ErrorKind::Definite, "pg_restore wrote non-UTF-8 SQL", e))
}

/// A type already on the target is reused as it is. For an enum that lacks some of the
/// source's labels, the rows holding them would fail only in the copy, hours later: say so
/// now, with the statements that add them.
fn refuse_enums_missing_labels(
    on_source: &BTreeMap<String, TypeShape>,
    on_target: &BTreeMap<String, TypeShape>,
) -> Result<()> {
    let mut fixes = Vec::new();
    for (name, ours) in on_source.iter().filter(|(_, s)| s.description == "enum") {
        // Not an enum on the target (a domain of that name?): no label can be added to it;
        // `shape_differences` names it with both definitions.
        let Some(theirs) = on_target.get(name).filter(|t| t.description == "enum") else {
            continue;
        };
        for label in ours.labels.iter().filter(|l| !theirs.labels.contains(l)) {
            fixes.push(format!(
                "ALTER TYPE {name} ADD VALUE {};",
                crate::source::quote_literal(label)
            ));
        }
    }
    if fixes.is_empty() {
        return Ok(());
    }
    Err(Error::definite(format!(
        "The target's enum types lack labels the source has, so rows holding them would fail in the copy (nothing was changed): run {} on the target, then sluice schema again",
        fixes.join(" ")
    )))
}

/// Names (quoted) that exist on the target, out of `names`.
async fn existing(target: &Client, names: &[String], function: &str) -> Result<BTreeSet<String>> {
    let rows = target
        .query(
            &format!("SELECT n FROM unnest($1::text[]) AS n WHERE {function}(n) IS NOT NULL"),
            &[&names],
        )
        .await
        .map_err(|e| error::pg("Looking for existing objects on the target", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// `sluice schema`.
pub async fn command(config: &Config, args: &SchemaArgs) -> Result<i32> {
    let (source, target) = super::connect_both(config).await?;
    let selected = selected_tables(&source, &config.tables).await?;
    if selected.is_empty() {
        return Err(Error::config(
            "No source table matches [tables] include/exclude: nothing to create",
        ));
    }
    let by_name: BTreeMap<String, &TableName> = selected
        .iter()
        .map(|t| (t.name.qualified(), &t.name))
        .collect();
    for name in config
        .citus
        .distribute
        .keys()
        .chain(config.citus.reference.iter())
    {
        if !by_name.contains_key(name) {
            return Err(Error::config(format!(
                "[citus] names {name}, which is not a selected source table: fix the name or [tables]"
            )));
        }
    }
    let citus_wanted = !config.citus.distribute.is_empty() || !config.citus.reference.is_empty();
    let layout = citus::detect(&target).await?;
    match (&layout, citus_wanted) {
        (None, true) => {
            return Err(Error::config(
                "[citus] distributes tables, but the target has no citus extension: run CREATE EXTENSION citus on the target (the coordinator), or remove [citus]",
            ))
        }
        (Some(layout), _) => crate::say!("Target is a Citus {} coordinator.", layout.version),
        (None, false) => {}
    }

    let roots: BTreeMap<u32, TableName> =
        selected.iter().map(|t| (t.oid, t.name.clone())).collect();
    let needs = gather(&source, roots).await?;

    // What must already be on the target because pg_dump cannot bring it.
    let wanted_extensions: Vec<String> = needs.extensions.keys().cloned().collect();
    let present: BTreeSet<String> = target
        .query(
            "SELECT extname::text FROM pg_extension WHERE extname = ANY($1)",
            &[&wanted_extensions],
        )
        .await
        .map_err(|e| error::pg("Listing the target's extensions", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Everything missing is named at once: one round of fixing, not one per run.
    let missing_extensions: Vec<(&String, &String)> = needs
        .extensions
        .iter()
        .filter(|(extension, _)| !present.contains(*extension))
        .collect();
    if !missing_extensions.is_empty() {
        let uses = missing_extensions
            .iter()
            .map(|(extension, what)| format!("{what} (extension {extension})"))
            .collect::<Vec<_>>()
            .join(", ");
        // In the schema the source has it in: its objects are named by that schema in the
        // tables' definitions (`extns.citext`).
        let names: Vec<&String> = missing_extensions.iter().map(|(e, _)| *e).collect();
        let schemas: BTreeMap<String, String> = source
            .query(
                "SELECT e.extname::text, n.nspname::text FROM pg_extension e
                 JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = ANY($1)",
                &[&names],
            )
            .await
            .map_err(|e| error::pg("Reading the extensions' schemas on the source", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let creates = missing_extensions
            .iter()
            .map(|(extension, _)| match schemas.get(*extension) {
                Some(schema) if schema != "public" => format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema}; CREATE EXTENSION {} SCHEMA {schema};",
                    quote_ident(extension),
                    schema = quote_ident(schema)
                ),
                _ => format!("CREATE EXTENSION {};", quote_ident(extension)),
            })
            .collect::<Vec<_>>()
            .join(" ");
        return Err(Error::definite(format!(
            "The selected tables use {uses}, which the target lacks: run {creates} on the target, then sluice schema again"
        )));
    }
    let foreign: Vec<String> = needs.foreign_types.iter().map(|t| t.quoted()).collect();
    let foreign_present = existing(&target, &foreign, "to_regtype").await?;
    let created_tables: BTreeSet<&TableName> = needs.tables.values().map(|(t, _)| t).collect();
    // A selected table's row type comes with that table.
    let missing_types: Vec<String> = needs
        .foreign_types
        .iter()
        .filter(|name| !foreign_present.contains(&name.quoted()) && !created_tables.contains(name))
        .map(|name| name.to_string())
        .collect();
    if !missing_types.is_empty() {
        return Err(Error::definite(format!(
            "The selected tables use {} {}, which sluice schema cannot copy (a base type or a table's row type): create {} on the target first, then sluice schema again",
            if missing_types.len() == 1 { "type" } else { "types" },
            missing_types.join(", "),
            if missing_types.len() == 1 { "it" } else { "them" },
        )));
    }

    // What exists on the target already.
    let root_names: Vec<String> = needs.roots.values().map(|t| t.quoted()).collect();
    let existing_roots = existing(&target, &root_names, "to_regclass").await?;
    let type_names: Vec<String> = needs.types.values().map(|t| t.quoted()).collect();
    let existing_types = existing(&target, &type_names, "to_regtype").await?;
    let existing_type_names: Vec<String> = existing_types.iter().cloned().collect();
    let on_source = type_shapes(&source, &existing_type_names, "source").await?;
    let on_target = type_shapes(&target, &existing_type_names, "target").await?;
    refuse_enums_missing_labels(&on_source, &on_target)?;
    let differing = shape_differences(&on_source, &on_target);
    if !differing.is_empty() {
        return Err(Error::definite(format!(
            "The target already has types that differ from the source's (nothing was changed): {}. Values travel as text, a composite's fields by position: they would land in the wrong fields, or be rounded or refused. Make each equal on the target (or drop it there and let sluice schema create it), then sluice schema again",
            differing.join("; ")
        )));
    }
    let seq_names: Vec<String> = needs.sequences.values().map(|(s, _)| s.quoted()).collect();
    let existing_seqs = existing(&target, &seq_names, "to_regclass").await?;
    let collation_names: Vec<String> = needs.collations.values().map(|c| c.quoted()).collect();
    let existing_collations = existing(&target, &collation_names, "to_regcollation").await?;
    let mut dropped: Vec<&TableName> = Vec::new();
    let mut left_alone: BTreeSet<u32> = BTreeSet::new();
    for (oid, name) in &needs.roots {
        if existing_roots.contains(&name.quoted()) {
            if args.drop_if_exists {
                dropped.push(name);
            } else {
                left_alone.insert(*oid);
            }
        }
    }

    // Tables this migration already copied or streams into: recreated empty, `run` would
    // resume streaming into them as if their rows were there.
    if !dropped.is_empty() {
        refuse_dropping_migrated_tables(config, &dropped)?;
    }

    // With the copy on, primary keys are built after the data too (loading a table with its
    // key maintained row by row is far slower); `sluice run` builds each table's key as
    // soon as that table is copied, and streaming starts only after. Without the copy the
    // target is loaded some other way and apply needs the keys from the start. On Citus
    // the key stays pre-data: distributing a table checks that its key includes the
    // distribution column, and that check belongs here, not after an hours-long copy.
    let defer_primary_keys = config.copy.enabled && layout.is_none();
    // On Citus, unique indexes without the distribution column cannot be created.
    let mut citus_unenforceable: BTreeMap<(u32, u32), String> = BTreeMap::new();
    if layout.is_some() {
        for (table, column) in &config.citus.distribute {
            let Some(root) = needs
                .roots
                .iter()
                .find(|(_, name)| &name.qualified() == table)
                .map(|(oid, _)| *oid)
            else {
                continue;
            };
            let members: Vec<u32> = needs
                .tables
                .iter()
                .filter(|(_, (_, r))| *r == root)
                .map(|(oid, _)| *oid)
                .collect();
            citus_unenforceable.extend(unenforceable_on_citus(&source, &members, column).await?);
        }
    }

    // Dump, list, filter.
    let pg_dump = super::find_pg_tool("pg_dump")?;
    let pg_restore = super::find_pg_tool("pg_restore")?;
    let dir = TempDir::new()?;
    let archive = dir.0.join("schema.dump");
    let mut dump_args = vec![
        "--schema-only".to_string(),
        "--format=custom".to_string(),
        // pg_dump share-locks every table of the dumped schemas; behind a pending
        // ACCESS EXCLUSIVE lock it would wait forever. Fail instead, and say so.
        "--lock-wait-timeout=60s".to_string(),
        format!("--file={}", archive.display()),
    ];
    for schema in needs.schemas() {
        // A double-quoted pattern is taken literally by pg_dump.
        dump_args.push(format!("--schema={}", quote_ident(&schema)));
    }
    run_tool(&pg_dump, &config.source.conn, &dump_args).await?;
    let archive_arg = archive.display().to_string();
    let toc = parse_toc(&restore(&pg_restore, &["--list", &archive_arg]).await?);
    let mut pre_list = String::new();
    let mut post_list = String::new();
    for entry in &toc {
        let Some((placement, root, oid)) = place(entry, &needs, defer_primary_keys) else {
            continue;
        };
        // An index attachment names the index; a constraint or index entry its own OID.
        let catalog = if entry.catalog == 0 {
            PG_CLASS
        } else {
            entry.catalog
        };
        if citus_unenforceable.contains_key(&(catalog, oid)) {
            continue;
        }
        if root.is_some_and(|r| left_alone.contains(&r)) {
            continue;
        }
        // Shared objects (types, collations; sequences no created table owns) are reused
        // when present.
        if root.is_none() {
            let skip = match entry.catalog {
                PG_TYPE => needs
                    .types
                    .get(&oid)
                    .is_some_and(|t| existing_types.contains(&t.quoted())),
                PG_COLLATION => needs
                    .collations
                    .get(&oid)
                    .is_some_and(|c| existing_collations.contains(&c.quoted())),
                _ => needs
                    .sequences
                    .get(&oid)
                    .is_some_and(|(s, _)| existing_seqs.contains(&s.quoted())),
            };
            if skip {
                continue;
            }
        }
        let list = match placement {
            Placement::Pre => &mut pre_list,
            Placement::Post => &mut post_list,
        };
        list.push_str(&entry.line);
        list.push('\n');
    }
    let script = |list: String, name: &'static str| {
        let pg_restore = pg_restore.clone();
        let list_path = dir.0.join(name);
        let archive_arg = archive_arg.clone();
        async move {
            if list.is_empty() {
                return Ok((String::new(), Vec::new()));
            }
            std::fs::write(&list_path, list).map_err(|e| {
                Error::with_source(
                    ErrorKind::Definite,
                    format!("Writing {}", list_path.display()),
                    e,
                )
            })?;
            let list_arg = format!("--use-list={}", list_path.display());
            let sql = restore(
                &pg_restore,
                &[
                    "--no-owner",
                    "--no-privileges",
                    "--no-tablespaces",
                    "--file=-",
                    &list_arg,
                    &archive_arg,
                ],
            )
            .await?;
            Ok::<_, Error>(split_script(&sql))
        }
    };
    let (preamble, pre) = script(pre_list, "pre.list").await?;
    let (_, post) = script(post_list, "post.list").await?;

    // Pre-data and the deferred statements in one target transaction: all or nothing.
    // IF NOT EXISTS notices ("schema public already exists") are noise here.
    let mut ddl = String::from("SET client_min_messages = warning;\nBEGIN;\n");
    ddl.push_str(CREATE_DEFERRED_DDL);
    ddl.push('\n');
    for schema in needs.schemas() {
        ddl.push_str(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};\n",
            quote_ident(&schema)
        ));
    }
    for table in &dropped {
        ddl.push_str(&format!("DROP TABLE {} CASCADE;\n", table.quoted()));
    }
    target.batch_execute(&ddl).await.map_err(|e| {
        error::pg(
            "Preparing the target (sluice.deferred_ddl, schemas, dropping tables)",
            e,
        )
    })?;
    let result = async {
        if !preamble.is_empty() {
            target
                .batch_execute(&preamble)
                .await
                .map_err(|e| error::pg("Running pg_dump's session settings on the target", e))?;
        }
        for entry in &pre {
            target.batch_execute(&entry.sql).await.map_err(|e| {
                error::pg(
                    format!(
                        "Creating {} on the target (nothing was created; fix the cause, e.g. create a function it calls, and run sluice schema again)",
                        entry.title
                    ),
                    e,
                )
            })?;
        }
        let mut deferred = 0;
        for entry in &post {
            let statement = format!("-- {}\n{}", entry.title, entry.sql);
            let table = owning_root(entry, &needs).map(TableName::quoted);
            // The same statement waiting from an earlier run is not stored twice.
            deferred += target
                .execute(
                    "INSERT INTO sluice.deferred_ddl (statement, table_name)
                     SELECT $1::text, $2::text WHERE NOT EXISTS (
                         SELECT 1 FROM sluice.deferred_ddl WHERE statement = $1::text AND applied_at IS NULL)",
                    &[&statement, &table],
                )
                .await
                .map_err(|e| error::pg("Storing deferred DDL in sluice.deferred_ddl", e))?;
        }
        target
            .batch_execute("COMMIT")
            .await
            .map_err(|e| error::pg("Committing the schema on the target", e))?;
        Ok::<u64, Error>(deferred)
    }
    .await;
    let deferred = match result {
        Ok(deferred) => deferred,
        Err(e) => {
            let _ = target.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };

    for table in &dropped {
        crate::say!("DROPPED {} on the target (--drop-if-exists)", table);
    }
    for entry in &pre {
        crate::say!("CREATED {}", entry.title);
    }
    for oid in &left_alone {
        crate::say!(
            "LEFT ALONE {}: exists on the target (pass --drop-if-exists to recreate it)",
            needs.roots[oid]
        );
    }
    for entry in &post {
        crate::say!(
            "DEFERRED {} (created by sluice run after the copy)",
            entry.title
        );
    }
    let mut listed = BTreeSet::new();
    for index in citus_unenforceable.values() {
        if listed.insert(index) {
            crate::say!(
                "NOT COPIED unique index {index}: it lacks the table's distribution column, and Citus cannot enforce uniqueness without it (the source keeps enforcing it until cutover; distribute by a column it contains if the application relies on it)"
            );
        }
    }
    for foreign_key in needs.dangling_fks.values() {
        crate::say!(
            "NOT COPIED foreign key {foreign_key}, which is not selected: add that table to [tables], or create the key by hand once it exists on the target"
        );
    }
    for trigger in needs.triggers.values() {
        crate::say!(
            "NOT COPIED trigger {trigger}: triggers would fire again for replicated changes; create it on the target at cutover if the application needs it"
        );
    }
    for (view, materialized) in needs.views.values() {
        match materialized {
            true => crate::say!(
                "NOT COPIED materialized view {view}: it reads selected tables, and its rows are not replicated; create it on the target at cutover (pg_dump --schema-only -t {} has its definition), then REFRESH MATERIALIZED VIEW",
                view.quoted()
            ),
            false => crate::say!(
                "NOT COPIED view {view}: it reads selected tables; create it on the target at cutover if the application needs it (pg_dump --schema-only -t {} has its definition)",
                view.quoted()
            ),
        }
    }

    if let Some(layout) = layout {
        distribute(config, &target, &layout).await?;
    }
    crate::say!(
        "Schema done: {} object(s) created, {} table(s) left alone, {} statement(s) newly deferred to after the copy.",
        pre.len(),
        left_alone.len(),
        deferred
    );
    Ok(0)
}

/// Lays out the configured tables on Citus before any data arrives: reference tables
/// first, then distributed tables (the `colocate_with` table before the others). Tables
/// already laid out as asked are left as they are, so a re-run after a failure finishes
/// the job. The position table becomes a reference table (see docs/citus.md).
async fn distribute(config: &Config, target: &Client, layout: &citus::CitusLayout) -> Result<()> {
    crate::checkpoint::ensure_position_table(target).await?;
    if citus::make_reference_table_if_citus(target, crate::checkpoint::POSITION_TABLE).await? {
        crate::say!(
            "CITUS {} is now a reference table",
            crate::checkpoint::POSITION_TABLE
        );
    }
    for name in &config.citus.reference {
        let table = TableName::parse(name);
        match layout.table(&table).map(|t| &t.kind) {
            Some(TableKind::Reference) => crate::say!("CITUS {table} is a reference table already"),
            Some(TableKind::Distributed { column }) => {
                return Err(Error::definite(format!(
                    "{table} is distributed by {column} on the target, but [citus] wants a reference table: run SELECT undistribute_table('{table}') on the target or change [citus]"
                )))
            }
            _ => {
                run_citus(target, &citus::create_reference_table_sql(&table), &table).await?;
                crate::say!("CITUS {table}: reference table created");
            }
        }
    }
    let colocate_with = config.citus.colocate_with.as_deref().map(TableName::parse);
    let mut order: Vec<(&String, &String)> = config.citus.distribute.iter().collect();
    // The table others colocate with is distributed first.
    order.sort_by_key(|(name, _)| Some(TableName::parse(name)) != colocate_with);
    for (name, column) in order {
        let table = TableName::parse(name);
        match layout.table(&table).map(|t| &t.kind) {
            Some(TableKind::Distributed { column: current }) if current == column => {
                crate::say!("CITUS {table} is distributed by {column} already");
            }
            Some(TableKind::Distributed { column: current }) => {
                return Err(Error::definite(format!(
                    "{table} is distributed by {current} on the target, but [citus] says {column}: run SELECT alter_distributed_table('{table}', distribution_column := '{column}') on the target or change [citus]"
                )))
            }
            Some(TableKind::Reference) => {
                return Err(Error::definite(format!(
                    "{table} is a reference table on the target, but [citus] distributes it by {column}: undistribute it on the target or change [citus]"
                )))
            }
            _ => {
                let colocate = colocate_with.as_ref().filter(|c| **c != table);
                let sql = citus::create_distributed_table_sql(&table, column, colocate);
                run_citus(target, &sql, &table).await?;
                crate::say!("CITUS {table}: distributed by {column}");
            }
        }
    }
    Ok(())
}

async fn run_citus(target: &Client, sql: &str, table: &TableName) -> Result<()> {
    target.batch_execute(sql).await.map_err(|e| {
        error::pg(
            format!(
                "Laying out {table} on Citus ({sql}); fix the cause and run sluice schema again (created tables are left alone, the layout is finished)"
            ),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str =
        ";\n; Archive created at 2026-11-21\n;\n4; 2615 2200 SCHEMA - public pg_database_owner
848; 1247 16386 TYPE public mood postgres
217; 1259 16401 TABLE public customers postgres
216; 1259 16400 SEQUENCE public customers_id_seq postgres
3406; 0 0 SEQUENCE OWNED BY public customers_id_seq postgres
3233; 2604 16404 DEFAULT public customers id postgres
3239; 2606 16410 CONSTRAINT public customers customers_name_key postgres
3241; 2606 16408 CONSTRAINT public customers customers_pkey postgres
3242; 1259 16426 INDEX public customers_note_idx postgres
3256; 2620 16451 TRIGGER public customers t postgres
";

    fn needs() -> Needs {
        let customers = TableName::new("public", "customers");
        let mut needs = Needs::default();
        needs.roots.insert(16401, customers.clone());
        needs.tables.insert(16401, (customers, 16401));
        needs.types.insert(16386, TableName::new("public", "mood"));
        needs.sequences.insert(
            16400,
            (TableName::new("public", "customers_id_seq"), Some(16401)),
        );
        needs.defaults.insert(16404, 16401);
        needs.constraints.insert(16410, (16401, false));
        needs.constraints.insert(16408, (16401, true));
        needs.indexes.insert(
            16426,
            (16401, false, TableName::new("public", "customers_note_idx")),
        );
        needs.triggers.insert(16451, "t on customers".into());
        needs
    }

    #[test]
    fn toc_lines_parse_and_land_in_the_right_section() {
        let toc = parse_toc(LIST);
        assert_eq!(toc.len(), 10);
        assert_eq!((toc[1].catalog, toc[1].oid), (1247, 16386));
        assert_eq!(
            toc[4].rest,
            "SEQUENCE OWNED BY public customers_id_seq postgres"
        );
        let needs = needs();
        let placed: Vec<Option<Placement>> = toc
            .iter()
            .map(|e| place(e, &needs, false).map(|p| p.0))
            .collect();
        use Placement::{Post, Pre};
        assert_eq!(
            placed,
            vec![
                None,       // SCHEMA: created with IF NOT EXISTS instead
                Some(Pre),  // TYPE
                Some(Pre),  // TABLE
                Some(Pre),  // SEQUENCE
                Some(Pre),  // SEQUENCE OWNED BY
                Some(Pre),  // DEFAULT
                Some(Post), // UNIQUE constraint
                Some(Pre),  // PRIMARY KEY
                Some(Post), // INDEX
                None,       // TRIGGER: never copied
            ]
        );
        // Objects of a table belong to it (skipped with it); a type is shared.
        assert_eq!(place(&toc[6], &needs, false).unwrap().1, Some(16401));
        assert_eq!(place(&toc[1], &needs, false).unwrap().1, None);
        // With the copy on, the primary key waits for the data too.
        assert_eq!(place(&toc[7], &needs, true).unwrap().0, Post);
        assert_eq!(place(&toc[5], &needs, true).unwrap().0, Pre);
    }

    fn entry(header: &str) -> ScriptEntry {
        let (kind, schema, tag) = header_parts(header);
        ScriptEntry {
            title: header_title(header),
            kind,
            schema,
            tag,
            sql: String::new(),
        }
    }

    #[test]
    fn deferred_statements_wait_for_their_root_table_and_foreign_keys_for_all() {
        let mut needs = needs();
        // Two tables whose names share a prefix (a name may hold spaces).
        needs
            .tables
            .insert(16500, (TableName::new("public", "my"), 16500));
        needs
            .tables
            .insert(16501, (TableName::new("public", "my table"), 16501));
        let root = |header: &str| owning_root(&entry(header), &needs).map(TableName::quoted);
        let customers = Some("\"public\".\"customers\"".to_string());
        assert_eq!(
            root("customers_note_idx; Type: INDEX; Schema: public; Owner: -"),
            customers
        );
        assert_eq!(
            root("customers customers_name_key; Type: CONSTRAINT; Schema: public; Owner: -"),
            customers
        );
        assert_eq!(
            root("my table my table_key; Type: CONSTRAINT; Schema: public; Owner: -"),
            Some("\"public\".\"my table\"".to_string())
        );
        assert_eq!(
            root("customers customers_fk; Type: FK CONSTRAINT; Schema: public; Owner: -"),
            None
        );
        // Same name in another schema: not this table.
        assert_eq!(
            root("customers_note_idx; Type: INDEX; Schema: other; Owner: -"),
            None
        );
    }

    #[test]
    fn scripts_split_at_headers_without_psql_commands() {
        let script = "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc123\n\nSET lock_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\n--\n-- Name: orders_note_idx; Type: INDEX; Schema: public; Owner: -\n--\n\nCREATE INDEX orders_note_idx ON public.orders USING btree (note);\n\n\n--\n-- Name: orders orders_fk; Type: FK CONSTRAINT; Schema: public; Owner: -\n--\n\nALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_fk FOREIGN KEY (c) REFERENCES public.c(id);\n\n\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc123\n\n";
        let (preamble, entries) = split_script(script);
        assert_eq!(
            preamble,
            "SET lock_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);"
        );
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].title, "INDEX public.orders_note_idx");
        assert_eq!(
            entries[0].sql,
            "CREATE INDEX orders_note_idx ON public.orders USING btree (note);"
        );
        assert_eq!(entries[1].title, "FK CONSTRAINT public.orders orders_fk");
        assert!(entries[1].sql.ends_with("REFERENCES public.c(id);"));
        assert!(!entries[1].sql.contains("unrestrict"));
        // Names that need quotes keep them (pg_restore's headers drop them).
        let script = "--\n-- Name: Order Items Order Items_pkey; Type: CONSTRAINT; Schema: Mixed Case; Owner: -\n--\n\nALTER TABLE ONLY \"Mixed Case\".\"Order Items\"\n    ADD CONSTRAINT \"Order Items_pkey\" PRIMARY KEY (id);\n\n--\n-- Name: a.b; Type: TABLE; Schema: sch.dot; Owner: -\n--\n\nCREATE TABLE \"sch.dot\".\"a.b\" (id integer);\n\n--\n-- Name: t t_fk; Type: FK CONSTRAINT; Schema: public; Owner: -\n--\n\nALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_fk FOREIGN KEY (c) REFERENCES public.c(id);\n";
        let (_, entries) = split_script(script);
        let titles: Vec<&str> = entries.iter().map(|e| e.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "CONSTRAINT \"Mixed Case\".\"Order Items\" \"Order Items_pkey\"",
                "TABLE \"sch.dot\".\"a.b\"",
                "FK CONSTRAINT public.t t_fk",
            ]
        );
    }

    #[test]
    fn a_database_name_is_quoted_into_a_connection_string() {
        assert_eq!(dbname_conninfo("app"), "dbname='app'");
        assert_eq!(dbname_conninfo("a'b=c"), "dbname='a\\'b=c'");
    }

    #[test]
    fn types_differ_by_definition_or_missing_enum_labels_only() {
        let shape = |description: &str, labels: &[&str]| TypeShape {
            description: description.to_string(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
        };
        let source = BTreeMap::from([
            (
                "\"p\"".to_string(),
                shape("composite (a text, b text)", &[]),
            ),
            ("\"e\"".to_string(), shape("enum", &["x", "y", "z"])),
            ("\"same\"".to_string(), shape("domain over integer", &[])),
            ("\"absent\"".to_string(), shape("enum", &["x"])),
        ]);
        let target = BTreeMap::from([
            (
                "\"p\"".to_string(),
                shape("composite (b text, a text)", &[]),
            ),
            // Extra labels on the target hold every source value.
            ("\"e\"".to_string(), shape("enum", &["w", "x", "y"])),
            ("\"same\"".to_string(), shape("domain over integer", &[])),
        ]);
        let lines = shape_differences(&source, &target);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("enum \"e\" lacks the source's labels 'z'"));
        assert!(lines[1]
            .contains("composite (a text, b text) on the source but composite (b text, a text)"));
    }

    #[test]
    fn a_deferred_foreign_key_can_be_made_not_valid_and_validated_later() {
        let statement = "-- FK CONSTRAINT public.orders orders_fk\nALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_fk FOREIGN KEY (c) REFERENCES public.c(id) ON DELETE CASCADE;\n";
        assert_eq!(
            foreign_key_not_valid(statement).unwrap(),
            "-- FK CONSTRAINT public.orders orders_fk\nALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_fk FOREIGN KEY (c) REFERENCES public.c(id) ON DELETE CASCADE NOT VALID;"
        );
        let (table, name) = foreign_key_of(statement).unwrap();
        assert_eq!(
            (validate_sql(&table, &name), name),
            (
                "ALTER TABLE public.orders VALIDATE CONSTRAINT orders_fk".to_string(),
                "orders_fk".to_string()
            )
        );
        let quoted = "-- FK CONSTRAINT s.t k\nALTER TABLE ONLY \"my s\".\"T t\"\n    ADD CONSTRAINT \"K k\" FOREIGN KEY (c) REFERENCES s.c(id);";
        let (table, name) = foreign_key_of(quoted).unwrap();
        assert_eq!(
            validate_sql(&table, &name),
            "ALTER TABLE \"my s\".\"T t\" VALIDATE CONSTRAINT \"K k\""
        );
        // Not a foreign key, or one the source has NOT VALID itself: left alone.
        assert!(
            foreign_key_not_valid("-- INDEX public.i\nCREATE INDEX i ON public.t (c);").is_none()
        );
        assert!(foreign_key_not_valid(&statement.replace(";", " NOT VALID;")).is_none());
    }
}
