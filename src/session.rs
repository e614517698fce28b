//! Settings sluice pins on its own sessions, whatever the database or role sets.
//!
//! Values cross from source to target as text (the stream, text COPY, apply's parameters)
//! and are compared as text (rows matched by their old values, `verify`'s checksums), so
//! every session that writes or reads them renders them the same way, the way PostgreSQL's
//! own subscriber pins them. One list, used as SQL by the SQL sessions and as startup
//! options by the walsender (startup options override `ALTER DATABASE/ROLE ... SET`).

/// Dates in ISO, intervals in postgres style, floats exact, timestamps with time zone in
/// UTC, bytea in hex (a legacy `bytea_output = 'escape'` made FULL-identity matches of bytea
/// rows fail), money in the C locale; XML read as content (fragments are valid values; a
/// database's `xmloption = document` refused them), and `NULL` in an array's text read as
/// a NULL element (a legacy `array_nulls = off` made it the string "NULL"), as pg_dump sets.
const RENDERING: [(&str, &str); 8] = [
    ("datestyle", "ISO"),
    ("intervalstyle", "postgres"),
    ("extra_float_digits", "3"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
    ("xmloption", "content"),
    ("array_nulls", "on"),
];

/// Every session sluice opens runs with an empty `search_path`, as PostgreSQL's own
/// logical replication does on both sides: the text of regclass, regtype, regproc and
/// regconfig values names the object relative to the search_path (`x` for `app1.x` where
/// `app1` is on the path), so an unpinned path made such values point at another object
/// on the other side. With it empty they are written schema-qualified (pg_catalog is
/// always searched), and so are the type names sluice reads with `format_type`.
///
/// `standard_conforming_strings` is pinned on in the same statement: sluice's SQL writes
/// backslashes in string literals as themselves (`LIKE 'pg\_%'`, [`quote_literal`]), which
/// a legacy database's `standard_conforming_strings = off` read as escapes (the catalog
/// filter then matched every schema starting with `pg` and one more character, and left
/// their tables out of the selection without a word).
///
/// [`quote_literal`]: crate::source::quote_literal
pub const SCHEMA_SAFE: &str = "SELECT pg_catalog.set_config('search_path', '', false), \
     pg_catalog.set_config('standard_conforming_strings', 'on', false)";

/// `SET name = 'value'; ...` for a SQL session.
pub fn rendering_sql() -> String {
    RENDERING
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}'"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `-c name=value ...` for a replication session's startup packet, with the empty
/// `search_path` of [`SCHEMA_SAFE`].
pub fn rendering_options() -> String {
    RENDERING
        .iter()
        .chain(&[("search_path", "")])
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sessions whose work is long by nature (a copy chunk, a large source transaction
/// applied at once): no timeout of the database or role may end it. `row_security = off`:
/// where row-level security would hide rows, the statement fails instead of silently
/// reading or matching only the rows the policies show.
pub const LONG_WORK: &str = "SET statement_timeout = 0; SET lock_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0; SET row_security = off";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_list_two_spellings() {
        assert!(
            rendering_sql().starts_with("SET datestyle = 'ISO'; SET intervalstyle = 'postgres'")
        );
        assert!(rendering_sql().ends_with("SET array_nulls = 'on'"));
        assert_eq!(
            rendering_options(),
            "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c TimeZone=UTC \
             -c bytea_output=hex -c lc_monetary=C -c xmloption=content -c array_nulls=on \
             -c search_path="
        );
    }
}
