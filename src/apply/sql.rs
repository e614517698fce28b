//! The SQL that applies batched row changes, generated per (table, operation, shape).
//!
//! Every statement takes its rows as parallel `text[]` parameters, one array per column,
//! and `unnest`s them, so a run of N changes is one statement with a fixed parameter count
//! (prepared once, reused for any N). Values stay in the text form pgoutput sent them in
//! and are cast to the target column's type (`format_type` from the target's catalog, without
//! its modifier: the column enforces that, with an error where a cast would truncate), so
//! enums, domains, arrays and composites work without knowing their OIDs on either side.
//!
//! Citus: whenever the distribution column's value is known, UPDATE and DELETE also say
//! `AND t.<dist> = ANY($n)`, so the statement is routed to the shards holding those rows
//! instead of every shard (a join against `unnest` alone is not pruned, see FACTS.md). The
//! distribution column is never assigned in a SET list (Citus refuses that); a change of its
//! value is applied as DELETE + INSERT by the batcher.

use crate::source::quote_ident;

/// One column of a target table as the generated SQL needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlColumn {
    pub name: String,
    /// `format_type(atttypid, -1)` on the target: the type without its length or precision,
    /// which storing into the column then enforces (an explicit cast would truncate).
    pub type_name: String,
    /// `GENERATED ALWAYS AS IDENTITY` on the target: an INSERT must say `OVERRIDING SYSTEM
    /// VALUE` to write the source's value, and no UPDATE may set it (only to DEFAULT).
    pub generated_always: bool,
}

impl SqlColumn {
    pub fn new(name: impl Into<String>, type_name: impl Into<String>) -> Self {
        SqlColumn {
            name: name.into(),
            type_name: type_name.into(),
            generated_always: false,
        }
    }

    pub fn generated_always(self) -> Self {
        SqlColumn {
            generated_always: true,
            ..self
        }
    }

    fn cast(&self, expression: &str) -> String {
        format!("{expression}::{}", self.type_name)
    }
}

/// `$1::text[], $2::text[], ...` for `count` arrays starting at parameter `first`.
fn text_arrays(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `s(k0, k1, v0, ...)`: positional aliases, so column names never clash with ours.
fn aliases(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}{i}")).collect()
}

/// `INSERT INTO t (cols) SELECT s.v0::type, ... FROM unnest($1, ...) AS s(v0, ...)`.
/// Parameters: one text array per column, in `columns` order. `OVERRIDING SYSTEM VALUE`
/// only where a column needs it (the source's identity values are the ones to keep; COPY
/// needs no such clause).
pub fn insert_unnest(table: &str, columns: &[SqlColumn]) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    let values = aliases("v", columns.len());
    let casts: Vec<String> = columns
        .iter()
        .zip(&values)
        .map(|(c, v)| c.cast(&format!("s.{v}")))
        .collect();
    let overriding = match columns.iter().any(|c| c.generated_always) {
        true => " OVERRIDING SYSTEM VALUE",
        false => "",
    };
    format!(
        "INSERT INTO {table} ({}){overriding} SELECT {} FROM unnest({}) AS s({})",
        names.join(", "),
        casts.join(", "),
        text_arrays(1, columns.len()),
        values.join(", ")
    )
}

/// `COPY t (cols) FROM STDIN` (text format; values escaped by `copy_text`).
pub fn copy_in(table: &str, columns: &[SqlColumn]) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    format!("COPY {table} ({}) FROM STDIN", names.join(", "))
}

/// The WHERE clause matching target rows to key values `s.k0 ...`, plus Citus routing.
/// Returns the clause and the number of parameters it adds after `first_param`.
fn key_match(keys: &[SqlColumn], dist: Option<&SqlColumn>, first_param: usize) -> (String, usize) {
    let key_aliases = aliases("k", keys.len());
    let mut conditions: Vec<String> = keys
        .iter()
        .zip(&key_aliases)
        .map(|(k, a)| format!("t.{} = {}", quote_ident(&k.name), k.cast(&format!("s.{a}"))))
        .collect();
    let mut extra = 0;
    if let Some(dist) = dist {
        conditions.push(format!(
            "t.{} = ANY(${first_param}::text[]::{}[])",
            quote_ident(&dist.name),
            dist.type_name
        ));
        extra = 1;
    }
    (conditions.join(" AND "), extra)
}

/// The columns of one UPDATE shape.
pub struct UpdateColumns<'a> {
    /// Matched against the old key values.
    pub keys: &'a [SqlColumn],
    /// Assigned their new values.
    pub set: &'a [SqlColumn],
    /// New values that cannot be assigned (`GENERATED ALWAYS AS IDENTITY` on the target):
    /// the row must already hold them, so they join the WHERE clause and a changed value
    /// leaves the row unmatched (reported, never silently kept old).
    pub guards: &'a [SqlColumn],
    /// Assigned to itself when `set` is empty, so a guarded row is still matched.
    pub touch: Option<&'a SqlColumn>,
    /// Citus distribution column.
    pub dist: Option<&'a SqlColumn>,
}

/// `UPDATE t SET col = s.v0::type ... FROM unnest(keys..., values..., guards...) AS s(k0..,
/// v0.., g0..) WHERE t.key = s.k0::type ... [AND t.guard = s.g0::type] [AND t.dist = ANY($n)]`.
///
/// Parameters: key arrays (old key values, in `keys` order), then value arrays (in `set`
/// order), then guard arrays, then, with `dist`, one array of the rows' distribution values.
pub fn update_unnest(table: &str, columns: &UpdateColumns) -> String {
    let UpdateColumns {
        keys,
        set,
        guards,
        touch,
        dist,
    } = *columns;
    let key_aliases = aliases("k", keys.len());
    let value_aliases = aliases("v", set.len());
    let guard_aliases = aliases("g", guards.len());
    let mut assignments: Vec<String> = set
        .iter()
        .zip(&value_aliases)
        .map(|(c, v)| format!("{} = {}", quote_ident(&c.name), c.cast(&format!("s.{v}"))))
        .collect();
    if let (true, Some(touch)) = (assignments.is_empty(), touch) {
        let name = quote_ident(&touch.name);
        assignments.push(format!("{name} = t.{name}"));
    }
    let arrays = keys.len() + set.len() + guards.len();
    let (mut matching, _) = key_match(keys, dist, arrays + 1);
    for (column, alias) in guards.iter().zip(&guard_aliases) {
        matching.push_str(&format!(
            " AND t.{} = {}",
            quote_ident(&column.name),
            column.cast(&format!("s.{alias}"))
        ));
    }
    let all_aliases: Vec<String> = key_aliases
        .into_iter()
        .chain(value_aliases)
        .chain(guard_aliases)
        .collect();
    format!(
        "UPDATE {table} AS t SET {} FROM unnest({}) AS s({}) WHERE {matching}",
        assignments.join(", "),
        text_arrays(1, arrays),
        all_aliases.join(", ")
    )
}

/// `DELETE FROM t USING unnest(keys...) AS s(k0..) WHERE t.key = s.k0::type ...
/// [AND t.dist = ANY($n)]`. Parameters: key arrays, then the distribution values.
pub fn delete_unnest(table: &str, keys: &[SqlColumn], dist: Option<&SqlColumn>) -> String {
    let key_aliases = aliases("k", keys.len());
    let (matching, _) = key_match(keys, dist, keys.len() + 1);
    format!(
        "DELETE FROM {table} AS t USING unnest({}) AS s({}) WHERE {matching}",
        text_arrays(1, keys.len()),
        key_aliases.join(", ")
    )
}

/// Matching one row by all its old values (REPLICA IDENTITY FULL without a usable key on
/// the target): compared as text, since some types (json, point, xml) have no equality
/// operator, and `IS NOT DISTINCT FROM` so NULLs match. The text is the type's output
/// function, what pgoutput sends: `format('%s', ...)`, not a `::text` cast, which for
/// boolean (`true`, not `t`), inet (`/32` added) and char(n) (blanks trimmed) is another
/// function and matched no row. `num_nulls` asks whether the value itself is NULL (`IS
/// NULL` is also true of a composite whose fields are all NULL). `LIMIT 1` through ctid
/// changes exactly one row even when identical rows exist, as the source did.
///
/// `narrowing` (column indexes of a deferrable primary key, or of a unique index over NOT
/// NULL columns) adds typed equalities on those columns, from the same parameters, so that
/// index finds the candidates and the text comparisons pick the one row.
fn one_row_by_values(
    table: &str,
    columns: &[SqlColumn],
    first_param: usize,
    narrowing: &[usize],
) -> String {
    let narrowed = narrowing.iter().map(|&i| {
        let c = &columns[i];
        format!(
            "o.{} = {}",
            quote_ident(&c.name),
            c.cast(&format!("${}::text", first_param + i))
        )
    });
    let by_text = columns.iter().enumerate().map(|(i, c)| {
        let column = format!("o.{}", quote_ident(&c.name));
        format!(
            "CASE WHEN num_nulls({column}) = 0 THEN format('%s', {column}) END \
             IS NOT DISTINCT FROM ${}::text",
            first_param + i
        )
    });
    let conditions: Vec<String> = narrowed.chain(by_text).collect();
    // A ctid names a row within one relation only: through a partitioned table (or an
    // inheritance parent) the same ctid exists in every partition, and an UPDATE matched by
    // ctid alone changed the row at that position in each of them. The pair is one InitPlan,
    // and the ctid still makes a TID scan.
    format!(
        "(t.tableoid, t.ctid) = (SELECT o.tableoid, o.ctid FROM {table} AS o WHERE {} LIMIT 1)",
        conditions.join(" AND ")
    )
}

/// One-row UPDATE matched by all old values. Parameters: new values (`set` order), then
/// old values (`old` order), all text.
pub fn update_by_values(
    table: &str,
    old: &[SqlColumn],
    set: &[SqlColumn],
    narrowing: &[usize],
) -> String {
    let assignments: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{} = {}",
                quote_ident(&c.name),
                c.cast(&format!("${}::text", i + 1))
            )
        })
        .collect();
    format!(
        "UPDATE {table} AS t SET {} WHERE {}",
        assignments.join(", "),
        one_row_by_values(table, old, set.len() + 1, narrowing)
    )
}

/// One-row DELETE matched by all old values. Parameters: old values, text.
pub fn delete_by_values(table: &str, old: &[SqlColumn], narrowing: &[usize]) -> String {
    format!(
        "DELETE FROM {table} AS t WHERE {}",
        one_row_by_values(table, old, 1, narrowing)
    )
}

/// TRUNCATE of the tables the source names, with its RESTART IDENTITY, and never CASCADE:
/// a source `TRUNCATE ... CASCADE` already names every published table it reached, and on
/// the target CASCADE would also empty tables the source never touched (a target-only
/// table referring to one of them). As PostgreSQL's own apply worker does: a target table
/// outside the list that refers to one in it makes the TRUNCATE fail (apply stalls, named),
/// rather than lose its rows.
pub fn truncate(tables: &[String], restart_identity: bool) -> String {
    let mut sql = format!("TRUNCATE TABLE {}", tables.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    sql
}

/// Appends one value to a COPY text-format row: `\N` for NULL, else the text with
/// backslash, newline, carriage return and tab escaped. pgoutput's text values need
/// nothing else.
pub fn copy_text_value(out: &mut Vec<u8>, value: Option<&[u8]>) {
    let Some(value) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    let mut start = 0;
    for (i, &byte) in value.iter().enumerate() {
        let escape = match byte {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.push(b'\\');
        out.push(escape);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SqlColumn {
        SqlColumn::new("id", "bigint")
    }

    fn tenant() -> SqlColumn {
        SqlColumn::new("tenant_id", "integer")
    }

    fn note() -> SqlColumn {
        SqlColumn::new("note", "text")
    }

    fn plain<'a>(
        keys: &'a [SqlColumn],
        set: &'a [SqlColumn],
        dist: Option<&'a SqlColumn>,
    ) -> UpdateColumns<'a> {
        UpdateColumns {
            keys,
            set,
            guards: &[],
            touch: None,
            dist,
        }
    }

    #[test]
    fn an_insert_overrides_only_identities_generated_always() {
        assert!(!insert_unnest("t", &[id(), note()]).contains("OVERRIDING"));
        assert_eq!(
            insert_unnest("t", &[id().generated_always(), note()]),
            "INSERT INTO t (\"id\", \"note\") OVERRIDING SYSTEM VALUE SELECT s.v0::bigint, \
             s.v1::text FROM unnest($1::text[], $2::text[]) AS s(v0, v1)"
        );
    }

    #[test]
    fn an_identity_generated_always_is_matched_not_assigned() {
        let seq = SqlColumn::new("seq", "integer").generated_always();
        let sql = update_unnest(
            "t",
            &UpdateColumns {
                guards: std::slice::from_ref(&seq),
                ..plain(&[tenant(), id()], &[note()], Some(&tenant()))
            },
        );
        assert_eq!(
            sql,
            "UPDATE t AS t SET \"note\" = s.v0::text FROM unnest($1::text[], $2::text[], \
             $3::text[], $4::text[]) AS s(k0, k1, v0, g0) WHERE t.\"tenant_id\" = s.k0::integer \
             AND t.\"id\" = s.k1::bigint AND t.\"tenant_id\" = ANY($5::text[]::integer[]) \
             AND t.\"seq\" = s.g0::integer"
        );
        // Nothing else to set: the row is touched so that a changed identity goes unmatched.
        let only_guarded = update_unnest(
            "t",
            &UpdateColumns {
                guards: std::slice::from_ref(&seq),
                touch: Some(&note()),
                ..plain(&[id()], &[], None)
            },
        );
        assert_eq!(
            only_guarded,
            "UPDATE t AS t SET \"note\" = t.\"note\" FROM unnest($1::text[], $2::text[]) \
             AS s(k0, g0) WHERE t.\"id\" = s.k0::bigint AND t.\"seq\" = s.g0::integer"
        );
    }

    #[test]
    fn insert_casts_every_column_from_text() {
        assert_eq!(
            insert_unnest("\"public\".\"t\"", &[id(), note()]),
            "INSERT INTO \"public\".\"t\" (\"id\", \"note\") SELECT s.v0::bigint, s.v1::text \
             FROM unnest($1::text[], $2::text[]) AS s(v0, v1)"
        );
    }

    #[test]
    fn update_on_plain_postgres_joins_on_the_key() {
        assert_eq!(
            update_unnest("t", &plain(&[id()], &[note()], None)),
            "UPDATE t AS t SET \"note\" = s.v0::text FROM unnest($1::text[], $2::text[]) \
             AS s(k0, v0) WHERE t.\"id\" = s.k0::bigint"
        );
    }

    #[test]
    fn update_on_citus_routes_by_the_distribution_column_and_never_sets_it() {
        // The batcher passes SET columns without the distribution column; the statement
        // adds the ANY() condition that lets Citus prune to the rows' shards.
        let sql = update_unnest("t", &plain(&[tenant(), id()], &[note()], Some(&tenant())));
        assert_eq!(
            sql,
            "UPDATE t AS t SET \"note\" = s.v0::text FROM unnest($1::text[], $2::text[], \
             $3::text[]) AS s(k0, k1, v0) WHERE t.\"tenant_id\" = s.k0::integer AND \
             t.\"id\" = s.k1::bigint AND t.\"tenant_id\" = ANY($4::text[]::integer[])"
        );
        assert!(!sql.contains("SET \"tenant_id\""));
    }

    #[test]
    fn delete_on_citus_is_pruned_too() {
        assert_eq!(
            delete_unnest("t", &[id()], Some(&tenant())),
            "DELETE FROM t AS t USING unnest($1::text[]) AS s(k0) WHERE t.\"id\" = s.k0::bigint \
             AND t.\"tenant_id\" = ANY($2::text[]::integer[])"
        );
        assert_eq!(
            delete_unnest("t", &[id()], None),
            "DELETE FROM t AS t USING unnest($1::text[]) AS s(k0) WHERE t.\"id\" = s.k0::bigint"
        );
    }

    #[test]
    fn full_identity_without_a_key_changes_exactly_one_row() {
        let sql = update_by_values("t", &[id(), note()], &[note()], &[]);
        assert_eq!(
            sql,
            "UPDATE t AS t SET \"note\" = $1::text::text WHERE (t.tableoid, t.ctid) = (SELECT o.tableoid, o.ctid FROM t AS o \
             WHERE CASE WHEN num_nulls(o.\"id\") = 0 THEN format('%s', o.\"id\") END IS NOT \
             DISTINCT FROM $2::text AND CASE WHEN num_nulls(o.\"note\") = 0 THEN format('%s', \
             o.\"note\") END IS NOT DISTINCT FROM $3::text LIMIT 1)"
        );
        assert!(delete_by_values("t", &[id()], &[]).ends_with("LIMIT 1)"));
    }

    #[test]
    fn a_deferrable_key_narrows_the_search_through_its_index() {
        let sql = delete_by_values("t", &[id(), note()], &[0]);
        assert!(
            sql.contains("WHERE o.\"id\" = $1::text::bigint AND CASE WHEN num_nulls(o.\"id\")"),
            "{sql}"
        );
        assert!(
            sql.contains("IS NOT DISTINCT FROM $2::text LIMIT 1)"),
            "{sql}"
        );
    }

    #[test]
    fn truncate_keeps_restart_identity_and_never_cascades() {
        assert_eq!(
            truncate(&["a".into(), "b".into()], true),
            "TRUNCATE TABLE a, b RESTART IDENTITY"
        );
        assert_eq!(truncate(&["a".into()], false), "TRUNCATE TABLE a");
    }

    #[test]
    fn copy_text_escapes_only_what_copy_needs() {
        let mut out = Vec::new();
        copy_text_value(&mut out, Some(b"a\\b\tc\nd\re"));
        out.push(b'\t');
        copy_text_value(&mut out, None);
        out.push(b'\t');
        copy_text_value(&mut out, Some(b""));
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re\t\\N\t".to_vec());
    }
}
