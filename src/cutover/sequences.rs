//! `sluice sync-sequences`: sequences do not replicate (logical decoding carries no sequence
//! changes in PostgreSQL 15), so the target's sequences stay where `schema` created them
//! while rows with ever higher keys arrive. Before the application writes to the target,
//! every sequence a selected table draws from must be moved past the source's position.
//!
//! Which sequences: those owned by a selected table (serial, bigserial), identity sequences,
//! and any sequence a selected table's column DEFAULT calls (`nextval('shared_seq')`, also
//! when two tables share it).
//!
//! Decision: a target sequence is never moved backwards. If it is already at or beyond the
//! wanted position (an earlier run with a larger margin, or the application already writes
//! to the target), it is kept: moving it back could hand out keys that are already used.
//! That also makes the command safe to repeat. The comparison is on the value the next
//! `nextval` returns, in the direction of the sequence's increment, so descending sequences
//! and `is_called = false` (a fresh sequence) are handled exactly; `setval(.., false)` sets
//! that next value precisely.

use tokio_postgres::Client;

use crate::config::Config;
use crate::error::{self, Error, Result};
use crate::source::{quote_ident, selected_tables, TableName};

/// `--margin N`: a count of increments, 0 or more. Negative numbers are let through clap
/// (which would call `-1` an unexpected argument) to be refused here by name.
pub fn parse_margin(text: &str) -> Result<u64, String> {
    match text.trim().parse::<i128>() {
        Ok(n) if n < 0 => Err(format!(
            "{n} is negative: the margin is a number of increments added on top of the source's position, 0 or more"
        )),
        Ok(n) => u64::try_from(n).map_err(|_| format!("{n} is too large")),
        Err(_) => Err(format!("{text:?} is not a whole number of increments")),
    }
}

#[derive(Debug, clap::Args)]
pub struct SyncSequencesArgs {
    /// Add this many increments on top of the source's position (room for writes that
    /// reach the source after the sync).
    #[arg(long, default_value_t = 0, value_name = "N", allow_negative_numbers = true,
          value_parser = crate::cutover::sequences::parse_margin)]
    pub margin: u64,
    /// Show what would be set without changing the target.
    #[arg(long)]
    pub dry_run: bool,
}

/// A sequence on the source that a selected table draws from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceRef {
    pub oid: u32,
    pub name: TableName,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    /// `table.column` of the columns that use it, for the report.
    pub used_by: Vec<String>,
    /// The table that owns it (serial or identity), if any: `schema` creates the ownership
    /// only when that table is created too.
    pub owner: Option<u32>,
    /// `CYCLE`: past its end it starts again at the other.
    pub cycle: bool,
}

/// A sequence's position: what `SELECT last_value, is_called FROM seq` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqState {
    pub last_value: i64,
    pub is_called: bool,
}

impl SeqState {
    /// The value the next `nextval` returns (None past the type's range).
    pub fn next_value(self, increment: i64) -> Option<i64> {
        if self.is_called {
            self.last_value.checked_add(increment)
        } else {
            Some(self.last_value)
        }
    }
}

/// What to do with one target sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqAction {
    /// `setval(seq, next, false)`: the next `nextval` on the target returns `next`.
    Set { from_next: i64, next: i64 },
    /// The target is at or beyond the wanted position already.
    Keep { target_next: i64, wanted_next: i64 },
    /// The source's position plus the margin is outside the sequence's range (a CYCLE
    /// sequence about to wrap, one used up, or a margin too wide for a small range): the
    /// target takes the source's exact state, `setval(seq, last_value, is_called)`, so its
    /// next `nextval` does what the source's would (wrap, or fail).
    Mirror { state: SeqState },
    /// As `Mirror`, with the target in that exact state already (a second run).
    Mirrored { state: SeqState },
}

/// Decides the target's new position (pure, so the rules are unit-tested).
pub fn plan(
    sequence: &SequenceRef,
    source: SeqState,
    target: SeqState,
    margin: u64,
) -> Result<SeqAction> {
    let wanted_next = source
        .next_value(sequence.increment)
        .and_then(|source_next| {
            let step = i64::try_from(margin)
                .ok()
                .and_then(|m| m.checked_mul(sequence.increment))?;
            source_next
                .checked_add(step)
                .filter(|next| (sequence.min..=sequence.max).contains(next))
        });
    let Some(wanted_next) = wanted_next else {
        return Ok(if target == source {
            SeqAction::Mirrored { state: source }
        } else {
            SeqAction::Mirror { state: source }
        });
    };
    // A target sequence at its very end (is_called at max) cannot hand out more anyway.
    let target_next = target
        .next_value(sequence.increment)
        .unwrap_or(if sequence.increment > 0 {
            i64::MAX
        } else {
            i64::MIN
        });
    let ahead = if sequence.increment > 0 {
        target_next >= wanted_next
    } else {
        target_next <= wanted_next
    };
    Ok(if ahead {
        SeqAction::Keep {
            target_next,
            wanted_next,
        }
    } else {
        SeqAction::Set {
            from_next: target_next,
            next: wanted_next,
        }
    })
}

/// Every sequence the given source tables draw from: owned (serial), identity, or called by
/// a column default. Sorted by name.
pub async fn sequences_of(source: &Client, table_oids: &[u32]) -> Result<Vec<SequenceRef>> {
    let rows = source
        .query(
            "WITH tables AS (SELECT unnest($1::oid[]) AS oid),
             uses AS (
                 -- owned by a column (serial: deptype a) or an identity column (i)
                 SELECT d.objid AS seq, d.refobjid AS tab, d.refobjsubid AS col
                 FROM pg_depend d
                 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                   AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
                   AND d.refobjid IN (SELECT oid FROM tables)
                 UNION
                 -- called by a column default (also a sequence shared by several tables)
                 SELECT d.refobjid, ad.adrelid, ad.adnum
                 FROM pg_attrdef ad
                 JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                      AND d.refclassid = 'pg_class'::regclass
                 WHERE ad.adrelid IN (SELECT oid FROM tables)
                 UNION
                 -- called by the default of a domain a column has
                 SELECT d.refobjid, a.attrelid, a.attnum
                 FROM pg_attribute a
                 JOIN pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'd'
                 JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = ty.oid
                      AND d.refclassid = 'pg_class'::regclass
                 WHERE a.attrelid IN (SELECT oid FROM tables) AND a.attnum > 0
                   AND NOT a.attisdropped
                 UNION
                 -- nextval('name'::text), the pre-8.1 form, shown as
                 -- nextval(('name'::text)::regclass): late-bound, so no dependency is
                 -- recorded. A qualified name resolves as it is; an unqualified one
                 -- through the application's search_path, which this session (empty
                 -- search_path) does not have: the table's own schema, then public, as
                 -- the default \"$user\", public would for most applications.
                 SELECT r.oid, ad.adrelid, ad.adnum
                 FROM pg_attrdef ad
                 JOIN pg_class tc ON tc.oid = ad.adrelid
                 JOIN pg_namespace tcn ON tcn.oid = tc.relnamespace
                 CROSS JOIN LATERAL regexp_matches(pg_get_expr(ad.adbin, ad.adrelid),
                                                   'nextval\\(\\(''([^'']+)''::text\\)::regclass\\)', 'g') AS m
                 CROSS JOIN LATERAL (
                     SELECT COALESCE(
                         to_regclass(m[1]),
                         CASE WHEN strpos(m[1], '.') = 0 THEN
                             COALESCE(to_regclass(format('%I.', tcn.nspname) || m[1]),
                                      to_regclass('public.' || m[1]))
                         END)::oid AS oid
                 ) AS r
                 WHERE ad.adrelid IN (SELECT oid FROM tables) AND r.oid IS NOT NULL
             )
             SELECT s.oid, n.nspname::text, s.relname::text,
                    q.seqincrement, q.seqmin, q.seqmax,
                    array_agg(DISTINCT quote_ident(tn.nspname) || '.' || quote_ident(t.relname) || '.' || quote_ident(a.attname)),
                    (SELECT d.refobjid FROM pg_depend d
                     WHERE d.classid = 'pg_class'::regclass AND d.objid = s.oid
                       AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                     LIMIT 1),
                    q.seqcycle
             FROM uses u
             JOIN pg_class s ON s.oid = u.seq AND s.relkind = 'S'
             JOIN pg_namespace n ON n.oid = s.relnamespace
             JOIN pg_sequence q ON q.seqrelid = s.oid
             JOIN pg_class t ON t.oid = u.tab
             JOIN pg_namespace tn ON tn.oid = t.relnamespace
             JOIN pg_attribute a ON a.attrelid = u.tab AND a.attnum = u.col
             GROUP BY 1, 2, 3, 4, 5, 6, q.seqcycle
             ORDER BY 2, 3",
            &[&table_oids],
        )
        .await
        .map_err(|e| {
            error::pg(
                "Listing the sequences of the selected tables on the source",
                e,
            )
        })?;
    Ok(rows
        .iter()
        .map(|row| SequenceRef {
            oid: row.get(0),
            name: TableName::new(row.get::<_, String>(1), row.get::<_, String>(2)),
            increment: row.get(3),
            min: row.get(4),
            max: row.get(5),
            used_by: row.get(6),
            owner: row.get(7),
            cycle: row.get(8),
        })
        .collect())
}

/// Reads a sequence's position; `None` when it does not exist on that side.
pub async fn read_state(client: &Client, name: &TableName, side: &str) -> Result<Option<SeqState>> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name.quoted()])
        .await
        .map_err(|e| error::pg(format!("Looking for sequence {name} on {side}"), e))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_one(
            &format!("SELECT last_value, is_called FROM {}", name.quoted()),
            &[],
        )
        .await
        .map_err(|e| error::pg(format!("Reading sequence {name} on {side}"), e))?;
    Ok(Some(SeqState {
        last_value: row.get(0),
        is_called: row.get(1),
    }))
}

/// What happened to each sequence, for the caller's verdict.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub set: usize,
    pub kept: usize,
    /// Sequences that exist on the source but not on the target.
    pub missing: Vec<TableName>,
    /// Sequences that could not be read or set (permissions).
    pub failed: Vec<TableName>,
}

/// Moves every target sequence of the selected tables past the source's position and
/// prints one line per sequence. With `dry_run`, prints without changing anything.
pub async fn sync(
    config: &Config,
    source: &Client,
    target: &Client,
    margin: u64,
    dry_run: bool,
) -> Result<SyncReport> {
    let tables = selected_tables(source, &config.tables).await?;
    let roots: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    // Partitions may have defaults of their own: look at every table of each tree.
    // (pg_partition_tree returns no rows for a plain table, hence the union.)
    let oids: Vec<u32> = source
        .query(
            "SELECT r.root FROM unnest($1::oid[]) AS r(root)
             UNION
             SELECT p.relid::oid FROM unnest($1::oid[]) AS r(root)
             CROSS JOIN LATERAL pg_partition_tree(r.root) p",
            &[&roots],
        )
        .await
        .map_err(|e| error::pg("Listing the partitions of the selected tables", e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let sequences = sequences_of(source, &oids).await?;
    let mut report = SyncReport::default();
    if sequences.is_empty() {
        crate::say!(
            "No sequences: none of the {} selected tables uses one.",
            tables.len()
        );
    }
    for sequence in &sequences {
        let used_by = sequence.used_by.join(", ");
        // One sequence that cannot be read or set does not hold up the others: each is
        // reported, with the grant it lacks.
        // Reading needs SELECT on both sides, setting UPDATE on the target: what each side
        // lacks is granted at once, not one privilege per run.
        let failed = |report: &mut SyncReport, error: Error, _: &str| {
            let text = error.report();
            let name = sequence.name.quoted();
            let mut grants = Vec::new();
            if text.contains("permission denied") && text.contains("the source") {
                grants.push(format!(
                    "on the source: GRANT SELECT ON SEQUENCE {name} TO {}",
                    quote_ident(&config.source.conn.user)
                ));
            }
            if text.contains("permission denied") && !text.contains("the source") {
                grants.push(format!(
                    "on the target: GRANT SELECT, UPDATE ON SEQUENCE {name} TO {}",
                    quote_ident(&config.target.conn.user)
                ));
            }
            let hint = match grants.is_empty() {
                true => String::new(),
                false => format!(" ({})", grants.join("; ")),
            };
            crate::say!("FAILED {} (used by {used_by}): {text}{hint}", sequence.name);
            report.failed.push(sequence.name.clone());
        };
        let states = tokio::try_join!(
            read_state(source, &sequence.name, "the source"),
            read_state(target, &sequence.name, "the target"),
        );
        let (source_state, target_state) = match states {
            Ok(states) => states,
            Err(error) => {
                failed(&mut report, error, "SELECT");
                continue;
            }
        };
        let Some(source_state) = source_state else {
            // Dropped between listing and reading: nothing to carry over.
            continue;
        };
        let Some(target_state) = target_state else {
            crate::say!(
                "MISSING {} (used by {used_by}): not on the target; run `sluice schema` or create it, then sync again",
                sequence.name
            );
            report.missing.push(sequence.name.clone());
            continue;
        };
        let set = |value: i64, is_called: bool| async move {
            if dry_run {
                // What the real run would be refused: said by the dry run too.
                let may: bool = target
                    .query_one(
                        "SELECT pg_catalog.has_sequence_privilege($1::text::regclass, 'UPDATE')",
                        &[&sequence.name.quoted()],
                    )
                    .await
                    .map_err(|e| {
                        error::pg(
                            format!(
                                "Reading the privileges on sequence {} on the target",
                                sequence.name
                            ),
                            e,
                        )
                    })?
                    .get(0);
                return match may {
                    true => Ok(()),
                    false => Err(Error::definite(format!(
                        "Setting sequence {} on the target would fail: permission denied (no UPDATE privilege)",
                        sequence.name
                    ))),
                };
            }
            target
                .execute(
                    "SELECT pg_catalog.setval($1::text::regclass, $2, $3)",
                    &[&sequence.name.quoted(), &value, &is_called],
                )
                .await
                .map(|_| ())
                .map_err(|e| {
                    error::pg(
                        format!("Setting sequence {} on the target", sequence.name),
                        e,
                    )
                })
        };
        match plan(sequence, source_state, target_state, margin)? {
            SeqAction::Mirror { state } => {
                if let Err(error) = set(state.last_value, state.is_called).await {
                    failed(&mut report, error, "UPDATE");
                    continue;
                }
                crate::say!(
                    "{} {} (used by {used_by}): to the source's exact position (last_value {}{}): its next value plus a margin of {margin} is outside the sequence's range [{}, {}]{}",
                    if dry_run { "WOULD SET" } else { "SET" },
                    sequence.name,
                    state.last_value,
                    if state.is_called { "" } else { ", never used" },
                    sequence.min,
                    sequence.max,
                    if sequence.cycle { " (it cycles: the next value wraps, as on the source)" } else { "" }
                );
                report.set += 1;
            }
            SeqAction::Set { from_next, next } => {
                if let Err(error) = set(next, false).await {
                    failed(&mut report, error, "UPDATE");
                    continue;
                }
                crate::say!(
                    "{} {} (used by {used_by}): next value {from_next} -> {next} (source last_value {}{}, margin {margin})",
                    if dry_run { "WOULD SET" } else { "SET" },
                    sequence.name,
                    source_state.last_value,
                    if source_state.is_called { "" } else { ", never used" },
                );
                report.set += 1;
            }
            SeqAction::Mirrored { state } => {
                crate::say!(
                    "KEPT {} (used by {used_by}): at the source's exact position already (last_value {}{}): its next value plus a margin of {margin} is outside the sequence's range [{}, {}]",
                    sequence.name,
                    state.last_value,
                    if state.is_called { "" } else { ", never used" },
                    sequence.min,
                    sequence.max,
                );
                report.kept += 1;
            }
            SeqAction::Keep {
                target_next,
                wanted_next,
            } => {
                crate::say!(
                    "KEPT {} (used by {used_by}): target's next value {target_next} is already at or past {wanted_next}; sequences never move backwards",
                    sequence.name
                );
                report.kept += 1;
            }
        }
    }
    Ok(report)
}

/// `sluice sync-sequences`: exit 0, or 1 when a sequence is missing on the target.
pub async fn command(config: &Config, args: &SyncSequencesArgs) -> Result<i32> {
    let (source, target) = super::connect_both(config).await?;
    let report = sync(config, &source, &target, args.margin, args.dry_run).await?;
    crate::say!(
        "{} sequence(s) {}, {} kept, {} missing on the target, {} failed.",
        report.set,
        if args.dry_run { "would be set" } else { "set" },
        report.kept,
        report.missing.len(),
        report.failed.len()
    );
    Ok(if report.missing.is_empty() && report.failed.is_empty() {
        0
    } else {
        1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_margin_is_a_count_of_increments() {
        assert_eq!(parse_margin("0"), Ok(0));
        assert_eq!(parse_margin("1000"), Ok(1000));
        assert!(parse_margin("-1").unwrap_err().contains("negative"));
        assert!(parse_margin("1.5").unwrap_err().contains("whole number"));
    }

    fn seq(increment: i64) -> SequenceRef {
        SequenceRef {
            oid: 1,
            name: TableName::new("public", "s"),
            increment,
            min: if increment > 0 { 1 } else { i64::MIN + 1 },
            max: if increment > 0 { i64::MAX } else { -1 },
            used_by: vec![],
            owner: None,
            cycle: false,
        }
    }

    fn state(last_value: i64, is_called: bool) -> SeqState {
        SeqState {
            last_value,
            is_called,
        }
    }

    #[test]
    fn a_fresh_target_moves_to_the_sources_next_value_plus_margin() {
        let action = plan(&seq(1), state(41, true), state(1, false), 0).unwrap();
        assert_eq!(
            action,
            SeqAction::Set {
                from_next: 1,
                next: 42
            }
        );
        let action = plan(&seq(5), state(41, true), state(1, false), 10).unwrap();
        assert_eq!(
            action,
            SeqAction::Set {
                from_next: 1,
                next: 96
            }
        );
    }

    #[test]
    fn an_unused_source_sequence_keeps_its_start() {
        let action = plan(&seq(1), state(1, false), state(1, false), 0).unwrap();
        assert!(
            matches!(action, SeqAction::Keep { wanted_next: 1, .. }),
            "{action:?}"
        );
    }

    #[test]
    fn a_target_ahead_is_never_moved_back_and_a_rerun_changes_nothing() {
        let action = plan(&seq(1), state(41, true), state(100, true), 0).unwrap();
        assert_eq!(
            action,
            SeqAction::Keep {
                target_next: 101,
                wanted_next: 42
            }
        );
        // After a sync to next = 42 the target reads (42, false): the same run again keeps it.
        let action = plan(&seq(1), state(41, true), state(42, false), 0).unwrap();
        assert!(matches!(action, SeqAction::Keep { .. }));
    }

    #[test]
    fn descending_sequences_move_down() {
        let action = plan(&seq(-1), state(-10, true), state(-1, false), 2).unwrap();
        assert_eq!(
            action,
            SeqAction::Set {
                from_next: -1,
                next: -13
            }
        );
    }

    #[test]
    fn past_the_range_the_target_takes_the_sources_exact_state() {
        // A margin too wide for what is left of the range.
        let action = plan(&seq(1), state(i64::MAX - 1, true), state(1, false), 5).unwrap();
        assert_eq!(
            action,
            SeqAction::Mirror {
                state: state(i64::MAX - 1, true)
            }
        );
        // A cycling sequence at its end: its next value wraps on both sides.
        let mut cycling = seq(3);
        (cycling.min, cycling.max, cycling.cycle) = (10, 40, true);
        let action = plan(&cycling, state(40, true), state(10, false), 0).unwrap();
        assert_eq!(
            action,
            SeqAction::Mirror {
                state: state(40, true)
            }
        );
        // Run again: the same state is kept.
        let action = plan(&cycling, state(40, true), state(40, true), 0).unwrap();
        assert_eq!(
            action,
            SeqAction::Mirrored {
                state: state(40, true)
            }
        );
    }
}
