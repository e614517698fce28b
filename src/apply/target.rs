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
    /// Column name → (type OID, type modifier) on the target.
    column_types: HashMap<String, (u32, i32)>,
    /// Primary-key column names, in key order (empty when the table has none).
    pub primary_key: Vec<String>,
    /// The primary key is DEFERRABLE: inside one transaction two rows may hold the same key
    /// (a swap), so the key alone does not name one row.
    pub primary_key_deferrable: bool,
    /// Without a primary key: the columns of a unique index over NOT NULL columns (no
    /// expressions, no predicate), fewest first. Rows matched by all their old values find
    /// their candidates through it instead of a scan of the whole table.
    pub unique_columns: Vec<String>,
    /// Citus distribution column of a hash-distributed table.
    pub distribution_column: Option<String>,
    /// A plain table with inheritance children (legacy partitioning by inheritance):
    /// UPDATE, DELETE and TRUNCATE on it would reach the children's rows as well.
    pub has_inheritance_children: bool,
}

impl TargetTable {
    /// The table as UPDATE and DELETE name it: `ONLY` when it has inheritance children, so
    /// a change the source made to this table's row never reaches a child's row with the
    /// same key (or the same ctid, for rows matched by all their values), as PostgreSQL's
    /// own apply works on exactly one relation.
    pub fn dml_name(&self) -> String {
        match self.has_inheritance_children {
            true => format!("ONLY {}", self.quoted),
            false => self.quoted.clone(),
        }
    }

    pub fn column(&self, name: &str) -> Option<&SqlColumn> {
        self.columns.get(name)
    }

    /// The target columns for the source's `wanted` columns (name, and the type to add it
    /// with when the target lacks it and the type is known), in order; or an apply error
    /// that names every missing column at once (fixing them one stall at a time would take
    /// one retry round each) with the ALTER TABLE that adds them. `source_columns` are all
    /// the source's columns: a target column that is not among them may be a missing one
    /// under its old name (a RENAME on the source only), which adding a column would not
    /// mend.
    pub fn require_columns(
        &self,
        wanted: &[(&str, Option<String>)],
        source_columns: &[&str],
    ) -> Result<Vec<SqlColumn>> {
        let missing: Vec<&(&str, Option<String>)> = wanted
            .iter()
            .filter(|(name, _)| !self.columns.contains_key(*name))
            .collect();
        if missing.is_empty() {
            return Ok(wanted
                .iter()
                .filter_map(|(name, _)| self.columns.get(*name).cloned())
                .collect());
        }
        let additions: Vec<String> = missing
            .iter()
            .map(|(name, source_type)| {
                let column = crate::source::quote_ident(name);
                match source_type {
                    Some(type_name) => format!("ADD COLUMN {column} {type_name}"),
                    None => format!("ADD COLUMN {column} ... with the source's type"),
                }
            })
            .collect();
        let fix = format!("ALTER TABLE {} {}", self.quoted, additions.join(", "));
        let mut renamed: Vec<&str> = self
            .columns
            .keys()
            .map(String::as_str)
            .filter(|target| !source_columns.contains(target))
            .collect();
        renamed.sort_unstable();
        let message = match missing.as_slice() {
            [(name, _)] => {
                let rename = match renamed.as_slice() {
                    [] => String::new(),
                    [old] => format!(
                        "; or, if the source renamed {old:?} to {name:?}: ALTER TABLE {} RENAME COLUMN {} TO {}",
                        self.quoted,
                        crate::source::quote_ident(old),
                        crate::source::quote_ident(name)
                    ),
                    several => format!(
                        "; or, if the source renamed one of {} to {name:?}: ALTER TABLE {} RENAME COLUMN ... TO {}",
                        several.join(", "),
                        self.quoted,
                        crate::source::quote_ident(name)
                    ),
                };
                format!(
                    "Column {name:?} of {} does not exist on the target: add it ({fix}, with the source column's DEFAULT and NOT NULL too, or the target's existing rows differ from the source's){rename}; sluice retries by itself",
                    self.name
                )
            }
            several => {
                let names: Vec<String> = several
                    .iter()
                    .map(|(name, _)| format!("{name:?}"))
                    .collect();
                let rename = match renamed.as_slice() {
                    [] => String::new(),
                    old => format!(
                        "; or, where the source renamed a column ({} on the target only), ALTER TABLE {} RENAME COLUMN ... TO ... instead",
                        old.join(", "),
                        self.quoted
                    ),
                };
                format!(
                    "Columns {} of {} do not exist on the target: add them ({fix}, with the source columns' DEFAULT and NOT NULL too, or the target's existing rows differ from the source's){rename}; sluice retries by itself",
                    names.join(", "),
                    self.name
                )
            }
        };
        Err(Error::new(ErrorKind::Apply, message))
    }

    /// The target column's type when storing the source's values into it would change them
    /// without an error: rounding to a smaller scale or precision (numeric, timestamps,
    /// times, intervals), or a float of fewer digits. Such a column passes every value, so
    /// apply must stop on it instead (the source widened a column while sluice streamed, or
    /// the target was made narrower): `Some((target type OID, target modifier))`.
    /// Length-limited types (varchar(n), char(n), bit(n)) refuse a value too long
    /// themselves; user types have other OIDs on each side and are not compared.
    pub fn lossy_column(&self, name: &str, source: (u32, i32)) -> Option<(u32, i32)> {
        let target = *self.column_types.get(name)?;
        would_alter_values(source, target).then_some(target)
    }

    pub fn distribution(&self) -> Option<&SqlColumn> {
        self.distribution_column
            .as_deref()
            .and_then(|name| self.columns.get(name))
    }
}

const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;
const TIME: u32 = 1083;
const TIMETZ: u32 = 1266;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const INTERVAL: u32 = 1186;

/// Whether values of the source type (OID, modifier) change, without an error, when stored
/// into a target column of the target type. See [`TargetTable::lossy_column`].
pub fn would_alter_values(source: (u32, i32), target: (u32, i32)) -> bool {
    // An array's modifier is its elements': compare those.
    if let (Some(source_element), Some(target_element)) =
        (array_element(source.0), array_element(target.0))
    {
        return would_alter_values((source_element, source.1), (target_element, target.1));
    }
    let (source_type, source_mod) = source;
    let (target_type, target_mod) = target;
    let numeric_scale = |modifier: i32| numeric_modifier(modifier).map(|(_, scale)| scale);
    match (source_type, target_type) {
        (NUMERIC, NUMERIC) => match (numeric_scale(source_mod), numeric_scale(target_mod)) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(source), Some(target)) => source > target,
        },
        (INT2 | INT4 | INT8, NUMERIC) => numeric_scale(target_mod).is_some_and(|s| s < 0),
        (FLOAT4 | FLOAT8, NUMERIC) => numeric_scale(target_mod).is_some(),
        (TIME, TIME) | (TIMETZ, TIMETZ) | (TIMESTAMP, TIMESTAMP) | (TIMESTAMPTZ, TIMESTAMPTZ) => {
            seconds_precision(target_mod) < seconds_precision(source_mod)
        }
        // A modifier also limits an interval's fields (YEAR TO MONTH drops the days).
        (INTERVAL, INTERVAL) => target_mod >= 0 && target_mod != source_mod,
        (FLOAT8 | NUMERIC | INT4 | INT8, FLOAT4) => true,
        (NUMERIC | INT8, FLOAT8) => true,
        _ => false,
    }
}

/// numeric's (precision, scale): its modifier is ((precision << 16) | scale) + 4, and the
/// scale may be negative (15+); `None` without one (unbounded).
fn numeric_modifier(modifier: i32) -> Option<(i32, i32)> {
    (modifier >= 4).then(|| {
        let precision = ((modifier - 4) >> 16) & 0xffff;
        let scale = (((modifier - 4) & 0x7ff) ^ 1024) - 1024;
        (precision, scale)
    })
}

/// Fractional-second digits of a time, timestamp or interval: the modifier, or 6 without one.
fn seconds_precision(modifier: i32) -> i32 {
    if modifier < 0 {
        6
    } else {
        modifier & 0xffff
    }
}

const VARCHAR: u32 = 1043;
const TEXT: u32 = 25;
const VARBIT: u32 = 1562;

/// Whether a target column of the target type holds every value of the source type as it
/// is (a wider type: varchar(10) into text or varchar(20), int into bigint, numeric(10,2)
/// into numeric, timestamptz(6) into timestamptz). Built-in types only; `false` when
/// unsure.
pub fn holds_every_value(source: (u32, i32), target: (u32, i32)) -> bool {
    if let (Some(source_element), Some(target_element)) =
        (array_element(source.0), array_element(target.0))
    {
        return holds_every_value((source_element, source.1), (target_element, target.1));
    }
    let (source_type, source_mod) = source;
    let (target_type, target_mod) = target;
    match (source_type, target_type) {
        (a, b) if a == b && target_mod < 0 && a != 1042 => true,
        (VARCHAR, VARCHAR) | (VARBIT, VARBIT) => source_mod >= 0 && target_mod >= source_mod,
        (NUMERIC, NUMERIC) => match (numeric_modifier(source_mod), numeric_modifier(target_mod)) {
            (Some((sp, ss)), Some((tp, ts))) => ts >= ss && tp - ts >= sp - ss,
            _ => false,
        },
        (TIME, TIME) | (TIMETZ, TIMETZ) | (TIMESTAMP, TIMESTAMP) | (TIMESTAMPTZ, TIMESTAMPTZ) => {
            seconds_precision(target_mod) >= seconds_precision(source_mod)
        }
        (INT2, INT4 | INT8) | (INT4, INT8) | (FLOAT4, FLOAT8) | (VARCHAR, TEXT) => true,
        (INT2 | INT4 | INT8, NUMERIC) => target_mod < 0,
        _ => false,
    }
}

/// The element type of the built-in array types whose elements `would_alter_values` knows.
fn array_element(array: u32) -> Option<u32> {
    Some(match array {
        1005 => INT2,
        1007 => INT4,
        1016 => INT8,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1231 => NUMERIC,
        1183 => TIME,
        1270 => TIMETZ,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        1187 => INTERVAL,
        _ => return None,
    })
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
            // The type without its modifier (`character varying`, not `character
            // varying(10)`; `bpchar` and `"bit"`, the unlimited forms): an explicit cast to
            // varchar(n), char(n) or bit(n) silently truncates, while storing into the
            // column checks the length and refuses a value too long (22001), as COPY does.
            "SELECT a.attname::text, format_type(a.atttypid, -1),
                    COALESCE(a.attnum = ANY(i.indkey::int2[]), false),
                    array_position(i.indkey::int2[], a.attnum),
                    a.attidentity = 'a', a.atttypid, a.atttypmod,
                    COALESCE(NOT i.indimmediate, false)
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
    let mut column_types = HashMap::new();
    let mut key: Vec<(i32, String)> = Vec::new();
    let mut primary_key_deferrable = false;
    for row in rows {
        primary_key_deferrable |= row.get::<_, bool>(7);
        let column: String = row.get(0);
        column_types.insert(column.clone(), (row.get::<_, u32>(5), row.get::<_, i32>(6)));
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
    let unique_columns: Vec<String> = if key.is_empty() {
        target
            .query_opt(
                "SELECT array_agg(a.attname::text ORDER BY k.ord)
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid
                   AND i.indpred IS NULL AND i.indexprs IS NULL
                 GROUP BY i.indexrelid
                 HAVING bool_and(a.attnotnull)
                 ORDER BY count(*), i.indexrelid
                 LIMIT 1",
                &[&quoted],
            )
            .await
            .map_err(|e| {
                error::pg(
                    format!("Reading the unique indexes of {name} on the target"),
                    e,
                )
            })?
            .map(|row| row.get(0))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let has_inheritance_children = !inheritance_parents(target, std::slice::from_ref(&quoted))
        .await?
        .is_empty();
    let distribution_column = citus
        .and_then(|layout| layout.table(name))
        .and_then(|table| table.distribution_column())
        .map(str::to_string);
    Ok(TargetTable {
        name: name.clone(),
        quoted,
        columns,
        column_types,
        primary_key: key.into_iter().map(|(_, name)| name).collect(),
        primary_key_deferrable,
        unique_columns,
        distribution_column,
        has_inheritance_children,
    })
}

/// Which of `quoted` (quoted table names) are plain tables with inheritance children on the
/// target. Partitioned tables are not among them: their statements must recurse (`ONLY` on
/// one changes nothing, or is refused).
pub async fn inheritance_parents(target: &Client, quoted: &[String]) -> Result<Vec<String>> {
    let rows = target
        .query(
            "SELECT n.name FROM unnest($1::text[]) AS n(name)
             JOIN pg_class c ON c.oid = to_regclass(n.name)
             WHERE c.relkind = 'r'
               AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid)",
            &[&quoted],
        )
        .await
        .map_err(|e| error::pg("Looking for inheritance children on the target", e))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// How the target's triggers would behave under sluice's writes, when they would behave
/// differently from PostgreSQL's own replication.
///
/// Copy and apply run with `session_replication_role = replica`, as a subscription does: then
/// ordinary (`ENABLE`) triggers stay quiet and `ENABLE REPLICA` ones fire. A target user who
/// may not set that role writes as an application would, and the triggers do the opposite:
/// an `updated_at` trigger rewrites every copied row, an audit trigger fills its log. The
/// target would then differ from the source without any error, so this is checked first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaRole {
    /// The target user may set `session_replication_role = replica`.
    Allowed,
    /// It may not; `triggers` lists the selected tables whose triggers would misbehave.
    Refused {
        user: String,
        triggers: Vec<TriggersUnlikeReplica>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggersUnlikeReplica {
    pub table: TableName,
    /// Plain `ENABLE` triggers and rules: they would fire on every copied and applied row.
    pub would_fire: Vec<Hook>,
    /// `ENABLE REPLICA` ones: they would not fire.
    pub would_not_fire: Vec<Hook>,
}

/// A trigger, or a rule (`CREATE RULE ... ON INSERT/UPDATE/DELETE`): the replication role
/// switches both the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `TRIGGER` or `RULE`, as `ALTER TABLE ... DISABLE` spells it.
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.to_lowercase(), self.name)
    }
}

/// Whether the target's foreign keys are checked as rows arrive, so rows must reach it in an
/// order they allow. On plain PostgreSQL that is when the user may not act as a replica. On
/// Citus it is always so: a distributed or reference table's foreign keys are enforced on
/// the workers' shards, by sessions Citus opens itself, to which the coordinator session's
/// `SET session_replication_role` is not passed on (`citus.propagate_set_commands` is `none`
/// by default, and even `local` passes on only `SET LOCAL`).
pub async fn checks_foreign_keys(target: &Client) -> Result<bool> {
    if !may_act_as_replica(target).await? {
        return Ok(true);
    }
    Ok(crate::citus::detect(target).await?.is_some())
}

/// Whether the target user may set `session_replication_role = replica` (superuser, or a
/// granted SET privilege from 15). Tried in a transaction that is rolled back, so the
/// session is left as it was.
pub async fn may_act_as_replica(target: &Client) -> Result<bool> {
    match target
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica; ROLLBACK")
        .await
    {
        Ok(()) => Ok(true),
        Err(e) => {
            let _ = target.batch_execute("ROLLBACK").await;
            match e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                true => Ok(false),
                false => Err(error::pg(
                    "Trying session_replication_role = replica on the target",
                    e,
                )),
            }
        }
    }
}

/// Whether the target user may act as a replica, and if not, which of `tables`' triggers
/// (on the table or any of its partitions) would then behave unlike under replication.
pub async fn replica_role(target: &Client, tables: &[TableName]) -> Result<ReplicaRole> {
    if may_act_as_replica(target).await? {
        return Ok(ReplicaRole::Allowed);
    }
    let user: String = target
        .query_one("SELECT current_user::text", &[])
        .await
        .map_err(|e| error::pg("Reading the target user", e))?
        .get(0);
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rows = target
        .query(
            "WITH selected AS (
                 SELECT s, t, to_regclass(format('%I.%I', s, t)) AS oid
                 FROM unnest($1::text[], $2::text[]) AS u(s, t)),
             hooks AS (
                 SELECT tgrelid AS rel, 'TRIGGER' AS kind, tgname::text AS name,
                        tgenabled AS enabled
                 FROM pg_trigger WHERE NOT tgisinternal
                 UNION ALL
                 -- rules on writes; a view's own SELECT rule is not one
                 SELECT ev_class, 'RULE', rulename::text, ev_enabled
                 FROM pg_rewrite WHERE ev_type <> '1')
             SELECT DISTINCT s, t, h.kind, h.name, h.enabled = 'O'
             FROM selected
             JOIN hooks h
               ON h.rel = selected.oid
               -- a partitioned table's partitions (none listed for a plain table)
               OR h.rel IN (SELECT relid FROM pg_partition_tree(selected.oid))
             WHERE h.enabled IN ('O', 'R')
             ORDER BY 1, 2, 3, 4",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| {
            error::pg(
                "Reading the triggers and rules of the selected tables on the target",
                e,
            )
        })?;
    let mut triggers: Vec<TriggersUnlikeReplica> = Vec::new();
    for row in rows {
        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        if triggers.last().is_none_or(|last| last.table != table) {
            triggers.push(TriggersUnlikeReplica {
                table,
                would_fire: Vec::new(),
                would_not_fire: Vec::new(),
            });
        }
        let hook = Hook {
            kind: row.get(2),
            name: row.get(3),
        };
        if let Some(entry) = triggers.last_mut() {
            match row.get::<_, bool>(4) {
                true => entry.would_fire.push(hook),
                false => entry.would_not_fire.push(hook),
            }
        }
    }
    Ok(ReplicaRole::Refused { user, triggers })
}

impl ReplicaRole {
    /// Why copy and apply must not start, when triggers would make the target differ.
    pub fn trigger_problem(&self) -> Option<String> {
        let ReplicaRole::Refused { user, triggers } = self else {
            return None;
        };
        if triggers.is_empty() {
            return None;
        }
        let mut tables = Vec::new();
        let mut fixes = Vec::new();
        for found in triggers {
            let quoted = found.table.quoted();
            let mut parts = Vec::new();
            let list = |hooks: &[Hook]| {
                hooks
                    .iter()
                    .map(Hook::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !found.would_fire.is_empty() {
                parts.push(format!("{} would fire", list(&found.would_fire)));
            }
            if !found.would_not_fire.is_empty() {
                parts.push(format!(
                    "{} (ENABLE REPLICA) would not fire",
                    list(&found.would_not_fire)
                ));
            }
            tables.push(format!("{}: {}", found.table, parts.join("; ")));
            for hook in found.would_fire.iter().chain(&found.would_not_fire) {
                fixes.push(format!(
                    "ALTER TABLE {quoted} DISABLE {} {}",
                    hook.kind,
                    crate::source::quote_ident(&hook.name)
                ));
            }
        }
        let user = crate::source::quote_ident(user);
        // A schema with a trigger on every table must not make a line of thousands.
        let first = |items: &[String]| match items.len() {
            n if n <= 10 => items.join("; "),
            n => format!("{}; and {} more", items[..10].join("; "), n - 10),
        };
        Some(format!(
            "The target user {user} may not SET session_replication_role = replica, so the copy and apply would write as an application does and the target's triggers would act unlike under PostgreSQL's own replication, changing rows without an error: {}. Connect to the target as a superuser, or GRANT SET ON PARAMETER session_replication_role TO {user} (PostgreSQL 15+, as a superuser); or settle each trigger: DISABLE it until cutover ({}), or ENABLE ALWAYS it if it should act on replicated rows too",
            first(&tables),
            first(&fixes)
        ))
    }
}

#[cfg(test)]
mod lossy_tests {
    use super::*;

    fn numeric(precision: i32, scale: i32) -> (u32, i32) {
        (NUMERIC, ((precision << 16) | (scale & 0x7ff)) + 4)
    }

    #[test]
    fn rounding_and_fewer_digits_are_lossy_widening_is_not() {
        assert!(would_alter_values(numeric(12, 4), numeric(10, 2)));
        assert!(would_alter_values((NUMERIC, -1), numeric(10, 2)));
        assert!(!would_alter_values(numeric(10, 2), numeric(12, 4)));
        assert!(!would_alter_values(numeric(10, 2), (NUMERIC, -1)));
        assert!(
            !would_alter_values(numeric(14, 2), numeric(10, 2)),
            "overflow is an error"
        );
        assert!(would_alter_values((INT4, -1), numeric(5, -2)));
        assert!(!would_alter_values((INT4, -1), (INT8, -1)));
        assert!(would_alter_values((TIMESTAMP, 6), (TIMESTAMP, 0)));
        assert!(would_alter_values((TIMESTAMPTZ, -1), (TIMESTAMPTZ, 3)));
        assert!(!would_alter_values((TIMESTAMP, 0), (TIMESTAMP, -1)));
        assert!(would_alter_values((FLOAT8, -1), (FLOAT4, -1)));
        assert!(!would_alter_values((FLOAT4, -1), (FLOAT8, -1)));
        assert!(would_alter_values((NUMERIC, -1), (FLOAT8, -1)));
        assert!(would_alter_values(
            (INTERVAL, -1),
            (INTERVAL, 0x7fff0000 | 6)
        ));
        assert!(!would_alter_values((INTERVAL, 5), (INTERVAL, 5)));
        assert!(
            !would_alter_values((25, -1), (1043, 14)),
            "length limits refuse by themselves"
        );
        assert!(holds_every_value((VARCHAR, 14), (TEXT, -1)));
        assert!(holds_every_value((VARCHAR, 14), (VARCHAR, 24)));
        assert!(!holds_every_value((VARCHAR, 24), (VARCHAR, 14)));
        assert!(!holds_every_value((TEXT, -1), (VARCHAR, 14)));
        assert!(holds_every_value((INT4, -1), (INT8, -1)));
        assert!(!holds_every_value((INT8, -1), (INT4, -1)));
        assert!(holds_every_value(numeric(10, 2), (NUMERIC, -1)));
        assert!(holds_every_value(numeric(10, 2), numeric(12, 4)));
        assert!(!holds_every_value(numeric(10, 2), numeric(10, 4)));
        assert!(holds_every_value((TIMESTAMPTZ, 6), (TIMESTAMPTZ, -1)));
        assert!(!holds_every_value((TIMESTAMPTZ, -1), (TIMESTAMPTZ, 3)));
        // Arrays, by their elements.
        let numeric_array = |p: i32, s: i32| (1231, numeric(p, s).1);
        assert!(would_alter_values(
            numeric_array(10, 2),
            numeric_array(10, 1)
        ));
        assert!(!would_alter_values(
            numeric_array(10, 1),
            numeric_array(10, 2)
        ));
        assert!(would_alter_values((1022, -1), (1021, -1)));
        assert!(!would_alter_values((1007, -1), (1016, -1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_column_suggests_adding_it_or_renaming_the_old_one() {
        let table = TargetTable {
            name: TableName::new("public", "t"),
            quoted: "\"public\".\"t\"".into(),
            columns: ["id", "old_name"]
                .into_iter()
                .map(|c| (c.to_string(), SqlColumn::new(c, "integer")))
                .collect(),
            column_types: HashMap::new(),
            primary_key: vec!["id".into()],
            primary_key_deferrable: false,
            unique_columns: Vec::new(),
            distribution_column: None,
            has_inheritance_children: false,
        };
        let error = table
            .require_columns(&[("new_name", Some("integer".into()))], &["id", "new_name"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(r#"ADD COLUMN "new_name" integer"#),
            "{error}"
        );
        assert!(error.contains("DEFAULT and NOT NULL"), "{error}");
        assert!(
            error.contains(r#"RENAME COLUMN "old_name" TO "new_name""#),
            "{error}"
        );
        // Every target column is still on the source: nothing to rename.
        let error = table
            .require_columns(&[("extra", None)], &["id", "old_name", "extra"])
            .unwrap_err()
            .to_string();
        assert!(!error.contains("RENAME"), "{error}");
        // Several missing: all named, one statement adds them all.
        let error = table
            .require_columns(
                &[
                    ("id", None),
                    ("note", Some("text".into())),
                    ("amount", Some("numeric(12,2)".into())),
                ],
                &["id", "old_name", "note", "amount"],
            )
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(r#"Columns "note", "amount" of public.t do not exist on the target"#),
            "{error}"
        );
        assert!(
            error.contains(r#"ALTER TABLE "public"."t" ADD COLUMN "note" text, ADD COLUMN "amount" numeric(12,2)"#),
            "{error}"
        );
        // Present columns come back in the order asked.
        let found = table
            .require_columns(&[("old_name", None), ("id", None)], &["id", "old_name"])
            .unwrap();
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["old_name", "id"]);
    }

    fn refused(tables: usize) -> ReplicaRole {
        ReplicaRole::Refused {
            user: "writer".into(),
            triggers: (0..tables)
                .map(|n| TriggersUnlikeReplica {
                    table: TableName::new("public", format!("t{n}")),
                    would_fire: vec![Hook {
                        kind: "TRIGGER".into(),
                        name: "touch".into(),
                    }],
                    would_not_fire: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn the_trigger_problem_names_triggers_and_fixes_and_stays_one_readable_line() {
        assert_eq!(ReplicaRole::Allowed.trigger_problem(), None);
        assert_eq!(refused(0).trigger_problem(), None);
        let one = refused(1).trigger_problem().unwrap();
        assert!(one.contains("public.t0: trigger touch would fire"), "{one}");
        assert!(
            one.contains("ALTER TABLE \"public\".\"t0\" DISABLE TRIGGER \"touch\""),
            "{one}"
        );
        let many = refused(500).trigger_problem().unwrap();
        assert!(
            many.contains("public.t9: trigger touch would fire; and 490 more"),
            "{many}"
        );
        assert!(!many.contains("public.t10:"), "{many}");
        assert!(many.len() < 2000, "{}", many.len());
    }
}
