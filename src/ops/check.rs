//! `sluice check`: the migration runbook's prerequisites, one line each, PASS / WARN / FAIL
//! with what to do. Exit 1 when any line is a FAIL.
//!
//! Every check is a small function over catalog facts, so each finding can be read (and
//! tested) on its own. A database that cannot be reached is itself a FAIL line; the checks
//! that need it are skipped, the others still run, so one run shows everything to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use clap::Args;
use tokio_postgres::Client;

use crate::apply::target::ReplicaRole;
use crate::config::{format_size, Config, SplitBy};
use crate::error::{self, Result};
use crate::snapshot::plan;
use crate::source::{
    abbreviate, glob_misses, selected_tables, unreplicated_tables, IdentityKey, SourceTable,
    TableName, Unreplicated,
};

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  {}", self.level, self.text)
    }
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn pass(&mut self, text: impl Into<String>) {
        self.push(Level::Pass, text.into());
    }
    fn warn(&mut self, text: impl Into<String>) {
        self.push(Level::Warn, text.into());
    }
    fn fail(&mut self, text: impl Into<String>) {
        self.push(Level::Fail, text.into());
    }
    fn push(&mut self, level: Level, text: String) {
        self.0.push(Finding { level, text });
    }
}

pub async fn run(config: &Config, _args: &CheckArgs) -> Result<i32> {
    let findings = findings(config).await;
    for finding in &findings {
        crate::say!("{finding}");
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let (fails, warns, passes) = (count(Level::Fail), count(Level::Warn), count(Level::Pass));
    crate::say!("{fails} FAIL, {warns} WARN, {passes} PASS");
    Ok(if fails > 0 { 1 } else { 0 })
}

/// Runs every check and returns the lines in order: source, tables, target.
pub async fn findings(config: &Config) -> Vec<Finding> {
    let mut out = Findings::default();
    let source = check_source(config, &mut out).await;
    check_target(config, source.as_ref(), &mut out).await;
    out.0
}

/// A column as the catalogs describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    name: String,
    /// `format_type(atttypid, atttypmod)`: `numeric(10,2)`, `character varying(20)`, ...
    type_text: String,
    /// Type OID and modifier, to tell a wider target type from a narrower one.
    type_oid: u32,
    type_mod: i32,
    not_null: bool,
    has_default: bool,
    /// The DEFAULT expression (`pg_get_expr`), for the ADD COLUMN a missing column needs.
    default_expr: Option<String>,
}

/// What the target checks need from the source.
struct SourceFacts {
    /// Which server and database the source is, to tell a target that is the same one.
    server: Option<crate::checkpoint::ServerIdentity>,
    tables: Vec<SourceTable>,
    columns: BTreeMap<u32, Vec<Column>>,
    /// The columns pgoutput sends for an old row: the primary key's (identity `d`) or the
    /// REPLICA IDENTITY index's (`i`). Tables with neither are absent.
    identity_columns: BTreeMap<u32, Vec<String>>,
    /// Whether the slot exists; `None` when that could not be read.
    slot_exists: Option<bool>,
    /// The user-defined types the tables use, recursively (quoted name → what it is), to
    /// compare with the target's types of the same names.
    user_types: BTreeMap<String, crate::cutover::schema::TypeShape>,
}

/// A FAIL line for a database that cannot be reached. The connection's own hint (a refused
/// port, a password, a missing database) names what to check already; the generic advice
/// is for the rest.
fn cannot_connect(side: &str, error: &crate::error::Error, origin: &str) -> String {
    let report = error.report();
    let advice = if report.contains(origin) {
        String::new()
    } else {
        format!("check {origin}, the network path and pg_hba.conf; ")
    };
    format!("{side}: cannot connect ({report}): {advice}the {side} checks were skipped")
}

async fn check_source(config: &Config, out: &mut Findings) -> Option<SourceFacts> {
    let conn = &config.source.conn;
    let client = match crate::tls::connect(conn, "the source").await {
        Ok(client) => client,
        Err(error) => {
            out.fail(cannot_connect("source", &error, &conn.origin));
            return None;
        }
    };
    out.pass(format!("source: connected to {}", conn.redacted()));
    let slot_exists = match check_source_settings(&client, config, out).await {
        Ok(exists) => Some(exists),
        Err(error) => {
            out.fail(format!(
                "source: cannot read its settings ({}): connect as a user who may read pg_settings and pg_roles",
                error.report()
            ));
            None
        }
    };
    let tables = match selected_tables(&client, &config.tables).await {
        Ok(tables) => tables,
        Err(error) => {
            out.fail(format!(
                "source: cannot list the tables ({})",
                error.report()
            ));
            return None;
        }
    };
    if !tables.is_empty() {
        out.pass(format!(
            "source: {} tables selected by [tables], {} in all",
            tables.len(),
            format_size(tables.iter().map(|t| t.size_bytes.max(0) as u64).sum())
        ));
    }
    // What the globs match but sluice leaves out, and globs that match nothing, are said
    // even when nothing is selected: they are usually why.
    match unreplicated_tables(&client, &config.tables).await {
        Ok(left_out) => {
            for (name, reason) in left_out {
                out.warn(match reason {
                    Unreplicated::Unlogged => format!(
                        "table {name}: UNLOGGED, so it is not replicated (its changes never reach the WAL) and not created on the target; to migrate it, ALTER TABLE {} SET LOGGED on the source (a rewrite), or exclude it in [tables]",
                        name.quoted()
                    ),
                    Unreplicated::OfExtension(extension) => format!(
                        "table {name}: belongs to extension {extension}, so it is left out as pg_dump does (CREATE EXTENSION {extension} on the target creates it); rows added to it on the source are not migrated"
                    ),
                });
            }
        }
        Err(error) => out.fail(format!(
            "source: cannot list unlogged and extension tables ({})",
            error.report()
        )),
    }
    match glob_misses(&client, &config.tables).await {
        Ok(misses) => {
            for glob in misses.unmatched {
                out.warn(format!(
                    "source: [tables] include {glob:?} matches no table (globs are schema.table, unquoted and case-sensitive): a typo?"
                ));
            }
            for glob in misses.partition_excludes {
                out.warn(format!(
                    "source: [tables] exclude {glob:?} matches partitions only: a partition goes with its partitioned table (copied and streamed through it), so excluding it changes nothing (exclude the partitioned table to leave all of it out)"
                ));
            }
            for (partition, root) in misses.partitions {
                out.warn(format!(
                    "table {partition}: a partition of {root}, which [tables] does not select; partitions are never selected on their own: include {} to migrate it (its partitions come with it)",
                    root.qualified()
                ));
            }
        }
        Err(error) => out.fail(format!(
            "source: cannot list the tables the globs match ({})",
            error.report()
        )),
    }
    if tables.is_empty() {
        out.fail(
            "source: no table is selected by [tables] include/exclude: check the globs (schema.table) in the config and the lines above",
        );
        return None;
    }
    // Large objects live outside every table: neither the copy nor pgoutput carries them, and
    // the oid columns that point at them would arrive pointing at nothing.
    match client
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await
    {
        Ok(row) if row.get::<_, i64>(0) > 0 => out.warn(format!(
            "source: the database holds {} large objects (pg_largeobject): logical replication and the copy do not carry them, so oid columns referring to them would point at nothing on the target; copy them separately at cutover, after writes stop (pg_dump --blobs / --large-objects, or lo_export and lo_import), keeping their OIDs",
            row.get::<_, i64>(0)
        )),
        Ok(_) => {}
        Err(error) => out.fail(format!(
            "source: cannot count its large objects ({})",
            error::pg("Reading pg_largeobject_metadata", error).report()
        )),
    }
    if let Err(error) = check_read_privilege(&client, &tables, config.copy.enabled, out).await {
        out.fail(format!(
            "source: cannot check table privileges ({})",
            error.report()
        ));
    }
    for finding in replica_identity_findings(&tables) {
        out.push(finding.level, finding.text);
    }
    if let Some(text) = partition_maintenance_warning(&tables) {
        out.warn(text);
    }
    if let Err(error) = check_copy_split(&client, config, &tables, out).await {
        out.fail(format!(
            "source: cannot tell how large tables will be split for the copy ({})",
            error.report()
        ));
    }
    let publication = &config.source.publication;
    match crate::daemon::unpublished_tables(&client, publication, &tables).await {
        Ok(None) => match crate::daemon::publication_privilege_problem(&client, &tables).await {
            Ok(None) => out.pass(format!(
                "source: publication {publication} does not exist yet; run creates it for the selected tables"
            )),
            Ok(Some(problem)) => out.fail(format!(
                "source: {}",
                crate::daemon::publication_privilege_message(publication, &tables, &problem)
            )),
            Err(error) => out.fail(format!(
                "source: cannot tell whether the publication can be created ({})",
                error.report()
            )),
        },
        Ok(Some(missing)) if missing.is_empty() => {
            out.pass(format!(
                "source: publication {publication} publishes every selected table"
            ));
            match crate::daemon::unpublished_operations_message(&client, publication).await {
                Ok(None) => {}
                Ok(Some(message)) => out.fail(format!("source: {message}")),
                Err(error) => out.fail(format!(
                    "source: cannot read publication {publication}'s operations ({})",
                    error.report()
                )),
            }
            match filtered_publication(&client, publication, &tables).await {
                Ok(lines) => lines.into_iter().for_each(|line| out.pass(line)),
                Err(error) => out.fail(format!(
                    "source: cannot read publication {publication}'s row filters ({})",
                    error.report()
                )),
            }
        }
        Ok(Some(missing)) => out.fail(format!(
            "source: {}",
            crate::daemon::unpublished_message(publication, &missing)
        )),
        Err(error) => out.fail(format!(
            "source: cannot read publication {publication} ({})",
            error.report()
        )),
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let columns = match columns_of(&client, &oids).await {
        Ok(columns) => columns,
        Err(error) => {
            out.fail(format!(
                "source: cannot read the tables' columns ({})",
                error.report()
            ));
            return None;
        }
    };
    let identity_columns = match identity_columns_of(&client, &oids).await {
        Ok(identity) => identity,
        Err(error) => {
            out.fail(format!(
                "source: cannot read the tables' replica identities ({})",
                error.report()
            ));
            return None;
        }
    };
    let user_types = match source_type_shapes(&client, &oids).await {
        Ok(types) => types,
        Err(error) => {
            out.fail(format!("source: {}", error.report()));
            return None;
        }
    };
    let server = crate::checkpoint::ServerIdentity::read(&client, "the source")
        .await
        .ok();
    Some(SourceFacts {
        server,
        tables,
        columns,
        identity_columns,
        slot_exists,
        user_types,
    })
}

async fn source_type_shapes(
    client: &Client,
    tables: &[u32],
) -> Result<BTreeMap<String, crate::cutover::schema::TypeShape>> {
    let names = crate::cutover::schema::user_types_of(client, tables).await?;
    crate::cutover::schema::type_shapes(client, &names, "source").await
}

/// The key columns of each table's replica identity: its primary key for REPLICA IDENTITY
/// DEFAULT, its REPLICA IDENTITY index for USING INDEX.
async fn identity_columns_of(client: &Client, oids: &[u32]) -> Result<BTreeMap<u32, Vec<String>>> {
    let rows = client
        .query(
            "SELECT c.oid, array_agg(a.attname::text ORDER BY k.n)
             FROM pg_class c
             JOIN pg_index i ON i.indrelid = c.oid
                AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
             WHERE c.oid = ANY($1::oid[])
             GROUP BY c.oid",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg("Reading the replica identity of the tables", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Distributed tables whose UPDATE and DELETE cannot be routed to one shard (the old row
/// pgoutput sends lacks the distribution column). `distribution_column` gives a table's,
/// from the target's layout or, before `sluice schema` distributed it, the config.
fn routing_findings<'a>(
    source: &SourceFacts,
    distribution_column: impl Fn(&TableName) -> Option<&'a str>,
) -> Vec<String> {
    source
        .tables
        .iter()
        .filter_map(|table| {
            let column = distribution_column(&table.name)?;
            let identity = source
                .identity_columns
                .get(&table.oid)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            crate::citus::routing_finding(&table.name, column, table.replica_identity, identity)
        })
        .collect()
}

/// `run` streams through a walsender, a session of its own kind: it needs a free
/// max_wal_senders place, and goes through the replication transport's own TLS. A source that admits SQL sessions can still refuse it, which `run` would find
/// only after creating the publication.
async fn check_replication_connection(config: &Config, out: &mut Findings) {
    let conn = &config.source.conn;
    let opened = match crate::source::replication::replication_config(
        conn,
        &config.source.slot,
        &config.source.publication,
    )
    .await
    {
        Ok(replication) => {
            crate::source::replication::connect_gated(replication, &conn.redacted()).await
        }
        Err(error) => Err(error),
    };
    match opened {
        Ok(mut session) => {
            // Gated, it waits for START_REPLICATION: a graceful stop would wait forever.
            session.abort();
            out.pass("source: a replication connection opens (the walsender answered IDENTIFY_SYSTEM)");
        }
        Err(error) => out.fail(format!(
            "source: cannot open a replication connection ({}) although a SQL session opened: the walsender needs a free max_wal_senders place, and pg_hba.conf and sslmode apply to it as to any session of database {}",
            error.report(),
            conn.dbname
        )),
    }
}

async fn check_source_settings(
    client: &Client,
    config: &Config,
    out: &mut Findings,
) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int4,
                    (SELECT count(*) FROM pg_replication_slots)::int4,
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
                    current_setting('max_wal_senders')::int4,
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int4,
                    r.rolsuper, r.rolreplication, current_user::text,
                    CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication')
                         THEN pg_has_role('rds_replication', 'member') ELSE false END,
                    current_setting('max_slot_wal_keep_size', true),
                    (SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1)
             FROM pg_roles r WHERE r.rolname = current_user",
            &[&config.source.slot],
        )
        .await
        .map_err(|e| error::pg("Reading the source's replication settings", e))?;
    let wal_level: String = row.get(0);
    if wal_level == "logical" {
        out.pass("source: wal_level = logical");
    } else {
        out.fail(format!(
            "source: wal_level = {wal_level}, logical decoding needs logical: run ALTER SYSTEM SET wal_level = logical and restart the source (RDS / Cloud SQL / Azure: set the logical replication flag in the parameter group)"
        ));
    }

    let (max_slots, used_slots, slot_exists): (i32, i32, bool) =
        (row.get(1), row.get(2), row.get(3));
    let wal_status: Option<String> = row.get(11);
    if slot_exists && wal_status.as_deref() == Some("lost") {
        // `run` refuses it at once: so does the preflight.
        out.fail(format!(
            "source: {}",
            crate::control::monitor::slot_lost_error(
                &config.source.slot,
                "was invalidated by the source (wal_status = lost, max_slot_wal_keep_size exceeded)",
            )
            .report()
        ));
    } else if slot_exists {
        out.pass(format!(
            "source: slot {} already exists (used {used_slots} of max_replication_slots = {max_slots})",
            config.source.slot
        ));
    } else if used_slots < max_slots {
        out.pass(format!(
            "source: {} of max_replication_slots = {max_slots} free (sluice needs 1)",
            max_slots - used_slots
        ));
    } else {
        out.fail(format!(
            "source: no free replication slot (max_replication_slots = {max_slots}, {used_slots} in use): drop an unused slot (pg_drop_replication_slot) or raise max_replication_slots and restart the source"
        ));
    }
    let (max_senders, used_senders): (i32, i32) = (row.get(4), row.get(5));
    if used_senders < max_senders {
        out.pass(format!(
            "source: {} of max_wal_senders = {max_senders} free (sluice needs 1)",
            max_senders - used_senders
        ));
    } else {
        out.fail(format!(
            "source: no free WAL sender (max_wal_senders = {max_senders}, {used_senders} in use): raise max_wal_senders and restart the source"
        ));
    }

    let (superuser, replication, user, rds): (bool, bool, String, bool) =
        (row.get(6), row.get(7), row.get(8), row.get(9));
    if superuser || replication || rds {
        let how = if superuser {
            "is a superuser"
        } else if replication {
            "has REPLICATION"
        } else {
            "is a member of rds_replication"
        };
        out.pass(format!("source: user {user} {how} and may stream changes"));
        check_replication_connection(config, out).await;
    } else {
        out.fail(format!(
            "source: user {user} may not replicate: ALTER ROLE {user} REPLICATION (RDS: GRANT rds_replication TO {user})"
        ));
    }

    // NULL before PostgreSQL 13, which has no such bound at all.
    let keep: Option<String> = row.get(10);
    let wal_size = client
        .query_one(
            "SELECT COALESCE(sum(size), 0)::int8 FROM pg_ls_waldir()",
            &[],
        )
        .await
        .map(|r| format_size(r.get::<_, i64>(0).max(0) as u64));
    let wal_text = match &wal_size {
        Ok(size) => format!("pg_wal holds {size} now"),
        Err(_) => "pg_wal size unknown (reading it needs pg_monitor)".to_string(),
    };
    let Some(keep) = keep else {
        out.warn(format!(
            "source: no max_slot_wal_keep_size before PostgreSQL 13 ({wal_text}): the slot retains WAL without limit while sluice is behind or stopped, which can fill the source's disk; watch `sluice lag` and the source's free space"
        ));
        return Ok(slot_exists);
    };
    if keep.trim() == "-1" {
        out.warn(format!(
            "source: max_slot_wal_keep_size = -1 ({wal_text}): the slot may retain WAL without limit while sluice is behind or stopped, which can fill the source's disk; set a bound the disk can hold (ALTER SYSTEM SET max_slot_wal_keep_size = '100GB'; SELECT pg_reload_conf()) and watch `sluice lag`"
        ));
    } else {
        out.pass(format!(
            "source: max_slot_wal_keep_size = {keep} ({wal_text}); a slot that falls further behind is invalidated and needs a fresh copy"
        ));
    }
    Ok(slot_exists)
}

async fn check_read_privilege(
    client: &Client,
    tables: &[SourceTable],
    copy_enabled: bool,
    out: &mut Findings,
) -> Result<()> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = client
        .query(
            "SELECT o FROM unnest($1::oid[]) AS o WHERE NOT has_table_privilege(o, 'SELECT')",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg("Checking SELECT privileges on the source", e))?;
    let denied: BTreeSet<u32> = rows.iter().map(|r| r.get::<_, u32>(0)).collect();
    // SELECT on a table is of no use without USAGE on its schema (the copy fails there).
    let unusable: Vec<String> = client
        .query(
            "SELECT DISTINCT n.nspname::text
             FROM unnest($1::oid[]) AS o
             JOIN pg_catalog.pg_class AS c ON c.oid = o
             JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             WHERE NOT has_schema_privilege(n.oid, 'USAGE')
             ORDER BY 1",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg("Checking schema USAGE privileges on the source", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for schema in &unusable {
        out.fail(format!(
            "source: schema {} is not usable by this user (no USAGE privilege), so its tables cannot be read: GRANT USAGE ON SCHEMA {} TO the sluice user",
            crate::source::display_ident(schema),
            crate::source::quote_ident(schema)
        ));
    }
    // Row-level security filters what this user's COPY reads (the stream is not filtered):
    // the copy refuses such a table (row_security = off) rather than copy part of it.
    if copy_enabled {
        let (filtered, user) = under_row_security(client, &oids, "the source").await?;
        for table in tables.iter().filter(|t| filtered.contains(&t.oid)) {
            out.fail(format!(
                "source: table {} has row-level security that applies to {user}: its policies would hide rows from the initial copy, which therefore refuses it; ALTER ROLE {} BYPASSRLS (as a superuser), connect as the table's owner, or exclude the table",
                table.name,
                crate::source::quote_ident(&user)
            ));
        }
    }
    if denied.is_empty() && unusable.is_empty() {
        out.pass(format!(
            "source: the user may read all {} selected tables",
            tables.len()
        ));
    }
    for table in tables.iter().filter(|t| denied.contains(&t.oid)) {
        out.fail(format!(
            "source: table {} cannot be read by this user (no SELECT privilege): GRANT SELECT ON {} TO the sluice user",
            table.name,
            table.name.quoted()
        ));
    }
    Ok(())
}

/// Partitions are published through their root (`publish_via_partition_root`), and
/// PostgreSQL then sends nothing for a TRUNCATE of one partition; detaching or dropping one
/// is DDL, never replicated either. Time-partitioned tables are pruned exactly that way.
/// The tables of `oids` whose row-level security policies apply to the connected user (not
/// superuser, not BYPASSRLS, not the owner, or the owner under FORCE), and that user.
async fn under_row_security(
    client: &Client,
    oids: &[u32],
    side: &str,
) -> Result<(Vec<u32>, String)> {
    let row = client
        .query_one(
            "SELECT current_user::text, ARRAY(
                 SELECT c.oid FROM pg_class c
                 WHERE c.oid = ANY($1::oid[]) AND c.relrowsecurity
                   AND NOT (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r
                            WHERE r.rolname = current_user)
                   AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE')))",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg(format!("Checking row-level security on {side}"), e))?;
    Ok((row.get(1), row.get(0)))
}

/// The selected tables the publication narrows by a row filter or a column list
/// (PostgreSQL 15): the copy and `verify` follow the same shape, but the operator should
/// see that only part of each is migrated.
async fn filtered_publication(
    client: &Client,
    publication: &str,
    tables: &[SourceTable],
) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT p.schemaname::text, p.tablename::text, p.rowfilter,
                    CASE WHEN cardinality(p.attnames) < (
                        SELECT count(*) FROM pg_attribute a
                        WHERE a.attrelid = format('%I.%I', p.schemaname, p.tablename)::regclass
                          AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '')
                    THEN array_to_string(p.attnames, ', ') END
             FROM pg_publication_tables p
             WHERE p.pubname = $1",
            &[&publication],
        )
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        // Before 15 the view has neither column, and publications filter nothing.
        Err(e) if e.code().map(|c| c.code()) == Some("42703") => return Ok(Vec::new()),
        Err(e) => return Err(error::pg("Reading the publication's row filters", e)),
    };
    let mut lines = Vec::new();
    for row in rows {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        if !tables.iter().any(|t| t.name == name) {
            continue;
        }
        let filter: Option<String> = row.get(2);
        let columns: Option<String> = row.get(3);
        let mut parts = Vec::new();
        if let Some(filter) = filter {
            parts.push(format!("only rows where {filter}"));
        }
        if let Some(columns) = columns {
            parts.push(format!("only columns {columns}"));
        }
        if !parts.is_empty() {
            lines.push(format!(
                "source: publication {publication} carries {} of table {name}; the copy and verify follow it",
                parts.join(" and ")
            ));
        }
    }
    Ok(lines)
}

/// Before PostgreSQL 14 a large table is split for the copy by its primary key; one
/// without a single-column integer key is copied whole, by one job. Worth knowing before a
/// copy of hundreds of GB.
async fn check_copy_split(
    client: &Client,
    config: &Config,
    tables: &[SourceTable],
    out: &mut Findings,
) -> Result<()> {
    if !config.copy.enabled {
        return Ok(());
    }
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| error::pg("Reading the source's version", e))?
        .get(0);
    if version >= 140_000 {
        return Ok(());
    }
    for table in tables {
        let size = u64::try_from(table.size_bytes).unwrap_or(0);
        if table.is_partitioned || plan::chunk_count(size, config.copy.split_tables_larger_than) < 2
        {
            continue;
        }
        let has_key = plan::integer_key(client, table).await?.is_some();
        if let Some(why) = copied_whole_before_14(config.copy.split_by, has_key) {
            out.warn(format!(
                "table {}: {} will be copied whole by one job, not in chunks: the source is older than PostgreSQL 14 (no TID range scans) and {why}",
                table.name,
                format_size(size)
            ));
        }
    }
    Ok(())
}

/// Why a large table of a source before PostgreSQL 14 would be copied whole, if it would.
fn copied_whole_before_14(split_by: SplitBy, has_integer_key: bool) -> Option<&'static str> {
    if !plan::splits_by_key(split_by, false) {
        Some("copy.split_by = \"ctid\" (use \"auto\" to split by the primary key)")
    } else if !has_integer_key {
        Some("it has no single-column integer primary key to split by")
    } else {
        None
    }
}

fn partition_maintenance_warning(tables: &[SourceTable]) -> Option<String> {
    let partitioned: Vec<String> = tables
        .iter()
        .filter(|t| t.is_partitioned)
        .map(|t| t.name.to_string())
        .collect();
    (!partitioned.is_empty()).then(|| {
        format!(
            "source: partitioned tables selected ({}): a TRUNCATE, DETACH PARTITION or DROP TABLE of one partition is not replicated (PostgreSQL publishes partitions through their root and sends nothing for these); while sluice runs, do the same on the target, or DELETE through the root instead. `sluice verify` shows any difference",
            partitioned.join(", ")
        )
    })
}

/// Primary key or usable replica identity, per table. Only problems get their own line.
fn replica_identity_findings(tables: &[SourceTable]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut good = 0;
    for table in tables {
        let name = &table.name;
        match (table.replica_identity, table.identity_key) {
            ('d' | 'i', IdentityKey::Usable) => good += 1,
            ('f', IdentityKey::Deferrable) => out.push(Finding {
                level: Level::Warn,
                text: format!(
                    "table {name}: REPLICA IDENTITY FULL: every UPDATE and DELETE writes the whole old row to the WAL (more WAL, slower apply, matched on all columns); its primary key is DEFERRABLE, which PostgreSQL cannot use as the replica identity, so keep FULL, or use REPLICA IDENTITY USING INDEX on a unique index that is not deferrable"
                ),
            }),
            ('f', _) => out.push(Finding {
                level: Level::Warn,
                text: format!(
                    "table {name}: REPLICA IDENTITY FULL: every UPDATE and DELETE writes the whole old row to the WAL (more WAL, slower apply, matched on all columns); prefer a primary key, or REPLICA IDENTITY USING INDEX on a unique index"
                ),
            }),
            ('n', _) => out.push(Finding {
                level: Level::Fail,
                text: format!(
                    "table {name}: REPLICA IDENTITY NOTHING: its UPDATEs and DELETEs cannot be replicated; add a primary key, or ALTER TABLE {} REPLICA IDENTITY FULL",
                    name.quoted()
                ),
            }),
            ('d', IdentityKey::Deferrable) => out.push(Finding {
                level: Level::Fail,
                text: format!(
                    "table {name}: its primary key is DEFERRABLE, which PostgreSQL cannot use as the replica identity: its UPDATEs and DELETEs cannot be replicated (the source rejects them once published); ALTER TABLE {} REPLICA IDENTITY FULL, or USING INDEX on a unique index that is not deferrable (or make the key NOT DEFERRABLE)",
                    name.quoted()
                ),
            }),
            ('i', _) => out.push(Finding {
                level: Level::Fail,
                text: format!(
                    "table {name}: REPLICA IDENTITY USING INDEX, but that index was dropped (PostgreSQL then acts as under NOTHING): its UPDATEs and DELETEs cannot be replicated; ALTER TABLE {} REPLICA IDENTITY USING INDEX on a unique index, or DEFAULT with a primary key, or FULL",
                    name.quoted()
                ),
            }),
            _ => out.push(Finding {
                level: Level::Fail,
                text: format!(
                    "table {name}: no primary key and REPLICA IDENTITY DEFAULT: its UPDATEs and DELETEs cannot be replicated (the source rejects them once published); add a primary key, or ALTER TABLE {} REPLICA IDENTITY USING INDEX on a unique index, or REPLICA IDENTITY FULL",
                    name.quoted()
                ),
            }),
        }
        if !table.partitions_without_identity.is_empty() {
            let shown: Vec<String> = table
                .partitions_without_identity
                .iter()
                .map(|p| p.to_string())
                .collect();
            let text = if table.replica_identity == 'f' {
                format!(
                    "table {name}: REPLICA IDENTITY FULL, but its partitions {} are not: each partition sends its old rows by its own replica identity (a key only, or nothing), which cannot be matched by all values as the root's FULL asks (deletes would be lost, updates stall); ALTER TABLE ... REPLICA IDENTITY FULL on each partition (the root's setting does not reach them)",
                    abbreviate(&shown, 10)
                )
            } else {
                format!(
                    "table {name}: partitions {} have no primary key and REPLICA IDENTITY DEFAULT (or NOTHING): the source checks each partition's own replica identity, not the root's, and rejects their UPDATEs and DELETEs once published; ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX) on each partition, or add a primary key",
                    abbreviate(&shown, 10)
                )
            };
            out.push(Finding {
                level: Level::Fail,
                text,
            });
        }
    }
    if good > 0 {
        out.insert(
            0,
            Finding {
                level: Level::Pass,
                text: format!(
                    "source: {good} of {} selected tables have a primary key or a replica identity index",
                    tables.len()
                ),
            },
        );
    }
    out
}

/// Columns (user, not dropped, not generated) of the given tables, in column order.
async fn columns_of(client: &Client, oids: &[u32]) -> Result<BTreeMap<u32, Vec<Column>>> {
    let rows = client
        .query(
            "SELECT a.attrelid, a.attname::text, format_type(a.atttypid, a.atttypmod),
                    a.attnotnull, a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '',
                    a.atttypid, a.atttypmod,
                    CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END
             FROM pg_attribute a
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attrelid, a.attnum",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg("Reading table columns", e))?;
    let mut columns: BTreeMap<u32, Vec<Column>> = BTreeMap::new();
    for row in rows {
        columns.entry(row.get(0)).or_default().push(Column {
            name: row.get(1),
            type_text: row.get(2),
            type_oid: row.get(5),
            type_mod: row.get(6),
            not_null: row.get(3),
            has_default: row.get(4),
            default_expr: row.get(7),
        });
    }
    Ok(columns)
}

async fn check_target(config: &Config, source: Option<&SourceFacts>, out: &mut Findings) {
    let conn = &config.target.conn;
    let client = match crate::tls::connect(conn, "the target").await {
        Ok(client) => client,
        Err(error) => {
            out.fail(cannot_connect("target", &error, &conn.origin));
            return;
        }
    };
    out.pass(format!("target: connected to {}", conn.redacted()));
    // `run` refuses a new slot once changes were applied from the old one: say so first.
    if source.is_some_and(|facts| facts.slot_exists == Some(false)) {
        match crate::checkpoint::read_target_position(&client, &config.source.slot).await {
            Ok(Some(_)) => out.fail(format!(
                "source: replication slot {} is gone, but the target holds changes applied from it: the changes since it went are lost. {}",
                config.source.slot,
                crate::daemon::FRESH_COPY
            )),
            Ok(None) => {}
            Err(error) => out.fail(format!("target: {}", error.report())),
        }
    }
    let source_server = source.and_then(|facts| facts.server.as_ref());
    if let Some(source_server) = source_server {
        match crate::checkpoint::ServerIdentity::read(&client, "the target").await {
            Ok(target_server) if source_server.same_database(&target_server) => {
                out.fail(format!(
                    "target: target.url reaches the source database itself ({} of system {}) by another name: the target must be another database",
                    target_server.database,
                    target_server.system.as_deref().unwrap_or_default()
                ));
                return;
            }
            Ok(_) => {}
            Err(error) => out.fail(format!("target: {}", error.report())),
        }
    }
    let citus = match client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'citus'",
            &[],
        )
        .await
    {
        Ok(row) => row.map(|r| r.get::<_, String>(0)),
        Err(error) => {
            out.fail(format!(
                "target: cannot read its extensions ({})",
                error::pg("Reading pg_extension", error).report()
            ));
            return;
        }
    };
    let Some(source) = source else {
        // What needs no source facts still runs, so one run lists everything to fix: the
        // target user's rights on sluice's own schema and on deferred keys.
        let user: Result<String> = client
            .query_one("SELECT current_user::text", &[])
            .await
            .map(|row| row.get(0))
            .map_err(|e| error::pg("Reading the target user", e));
        let lines = match user {
            Ok(user) => target_privilege_problems(&client, &BTreeMap::new(), &user).await,
            Err(error) => Err(error),
        };
        match lines {
            Ok(lines) => lines.into_iter().for_each(|line| out.fail(line)),
            Err(error) => out.fail(format!("target: {}", error.report())),
        }
        return;
    };
    if let Err(error) = check_target_tables(config, &client, source, citus.as_deref(), out).await {
        out.fail(format!(
            "target: cannot read its tables ({})",
            error.report()
        ));
    }
}

async fn check_target_tables(
    config: &Config,
    client: &Client,
    source: &SourceFacts,
    citus: Option<&str>,
    out: &mut Findings,
) -> Result<()> {
    let schemas: Vec<&str> = source
        .tables
        .iter()
        .map(|t| t.name.schema.as_str())
        .collect();
    let names: Vec<&str> = source.tables.iter().map(|t| t.name.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.oid
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'f')
               AND (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| error::pg("Looking up the selected tables on the target", e))?;
    let on_target: BTreeMap<TableName, u32> = rows
        .iter()
        .map(|r| {
            (
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect();
    let target_oids: Vec<u32> = on_target.values().copied().collect();
    let target_columns = columns_of(client, &target_oids).await?;

    let mut complete = 0;
    for table in &source.tables {
        let Some(target_oid) = on_target.get(&table.name) else {
            out.fail(format!(
                "target: table {} is missing: create it (`sluice schema` copies the source's definition)",
                table.name
            ));
            continue;
        };
        let source_columns = source
            .columns
            .get(&table.oid)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let target_columns = target_columns
            .get(target_oid)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let problems = column_findings(&table.name, source_columns, target_columns);
        if problems.iter().all(|f| f.level != Level::Fail) {
            complete += 1;
        }
        for finding in problems {
            out.push(finding.level, finding.text);
        }
    }
    if complete > 0 {
        out.pass(format!(
            "target: {complete} of {} selected tables exist with compatible columns",
            source.tables.len()
        ));
    }
    // A type of the same name already on the target is used as it is: one that differs
    // would put values in the wrong composite fields, round them, or refuse them.
    let type_names: Vec<String> = source.user_types.keys().cloned().collect();
    let target_types = crate::cutover::schema::type_shapes(client, &type_names, "target").await?;
    for line in crate::cutover::schema::shape_differences(&source.user_types, &target_types) {
        out.fail(format!(
            "target: {line}: values would land in the wrong fields, or be rounded or refused; make it equal on the target (or drop it there before sluice schema)"
        ));
    }
    // Generated columns are compared through the source itself (a second connection, once):
    // their expressions are not among the facts gathered above.
    if let Ok(source_client) = crate::tls::connect(&config.source.conn, "the source").await {
        let names: Vec<&TableName> = on_target.keys().collect();
        for line in
            crate::snapshot::plan::generated_only_on_source(&source_client, client, &names).await?
        {
            out.fail(format!("target: {line}"));
        }
    }
    for warning in unindexed_matches(client, source, &on_target).await? {
        out.warn(warning);
    }
    // Apply runs with row_security = off: a table whose policies apply to the target user
    // would stall every change to it (and refuse the copy's COPY FROM).
    let (guarded, user) = under_row_security(client, &target_oids, "the target").await?;
    for (name, _) in on_target.iter().filter(|(_, oid)| guarded.contains(oid)) {
        out.fail(format!(
            "target: table {name} has row-level security that applies to {user}: the copy and apply could not write every row; ALTER ROLE {} BYPASSRLS (as a superuser), or connect as the table's owner",
            crate::source::quote_ident(&user)
        ));
    }

    for line in target_privilege_problems(client, &on_target, &user).await? {
        out.fail(line);
    }
    let selected: Vec<TableName> = on_target.keys().cloned().collect();
    let role = crate::apply::target::replica_role(client, &selected).await?;
    if let Some(problem) = role.trigger_problem() {
        out.fail(format!("target: {problem}"));
    } else if let ReplicaRole::Refused { user, .. } = &role {
        let user = crate::source::quote_ident(user);
        out.warn(format!(
            "target: {user} may not SET session_replication_role = replica: foreign keys are checked as rows arrive (the copy loads a table after those it refers to, and a table that refers to itself in one piece) and apply keeps every change in exact source order, which is slower; connect as a superuser, or GRANT SET ON PARAMETER session_replication_role TO {user} (PostgreSQL 15+)"
        ));
    } else if citus.is_some() {
        out.pass("target: the user may SET session_replication_role = replica, but on Citus the foreign keys of distributed and reference tables are checked on the workers all the same: the copy loads a table after those it refers to, and apply keeps every change in exact source order");
    } else {
        out.pass("target: the user may SET session_replication_role = replica: the target's triggers and foreign keys stay quiet during copy and apply, as under PostgreSQL's own replication");
    }

    let citus_wanted = !config.citus.distribute.is_empty() || !config.citus.reference.is_empty();
    match citus {
        None if citus_wanted => out.fail(
            "target: [citus] lays tables out, but the target has no citus extension: run CREATE EXTENSION citus on the target (the coordinator), or remove [citus]; `sluice schema` refuses until then",
        ),
        None => out.pass("target: plain PostgreSQL (no citus extension); tables stay local"),
        Some(version) => {
            let distributed: BTreeSet<u32> = client
                .query("SELECT logicalrelid::oid FROM pg_dist_partition", &[])
                .await
                .map_err(|e| error::pg("Reading pg_dist_partition on the target", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let local: Vec<String> = on_target
                .iter()
                .filter(|(_, oid)| !distributed.contains(oid))
                .map(|(name, _)| name.to_string())
                .collect();
            let layout = crate::citus::detect(client).await?;
            let routing = routing_findings(source, |name| {
                match layout.as_ref().and_then(|l| l.table(name)) {
                    Some(laid_out) => laid_out.distribution_column(),
                    None => config
                        .citus
                        .distribute
                        .get(&name.qualified())
                        .map(String::as_str),
                }
            });
            for finding in routing {
                out.warn(format!("target: {finding}"));
            }
            if local.is_empty() {
                out.pass(format!(
                    "target: Citus {version}; every selected table is distributed or a reference table"
                ));
            } else {
                out.warn(format!(
                    "target: Citus {version}; {} tables are not distributed yet and would stay on the coordinator: {}. Run `sluice schema` with [citus] distribute, or SELECT create_distributed_table(...) / create_reference_table(...) before the copy",
                    local.len(),
                    abbreviate(&local, 10)
                ));
            }
        }
    }
    Ok(())
}

/// What the target user may not do that copy and apply need: on each table SELECT (apply
/// reads the key columns it matches on), INSERT, UPDATE, DELETE and TRUNCATE (the copy empties
/// a table it copies again; the source's TRUNCATEs are applied); and its own `sluice` schema
/// (the applied position), which it creates on the first start. Without them the copy or
/// apply stops at the first row it may not write, possibly hours into the copy.
async fn target_privilege_problems(
    client: &Client,
    on_target: &BTreeMap<TableName, u32>,
    user: &str,
) -> Result<Vec<String>> {
    let oids: Vec<u32> = on_target.values().copied().collect();
    let rows = client
        .query(
            "SELECT o, array_agg(p ORDER BY n)
             FROM unnest($1::oid[]) AS o,
                  unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'])
                      WITH ORDINALITY AS privileges(p, n)
             WHERE NOT has_table_privilege(o, p)
             GROUP BY o",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg("Reading the target user's table privileges", e))?;
    let by_oid: BTreeMap<u32, &TableName> = on_target.iter().map(|(n, o)| (*o, n)).collect();
    let user = crate::source::quote_ident(user);
    let mut lines = Vec::new();
    // One line per set of missing privileges, so a thousand tables lacking the same do not
    // make a thousand lines.
    let mut lacking: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for row in &rows {
        if let Some(name) = by_oid.get(&row.get::<_, u32>(0)) {
            lacking
                .entry(row.get(1))
                .or_default()
                .push(name.to_string());
        }
    }
    for (privileges, tables) in lacking {
        lines.push(format!(
            "target: {user} lacks {} on {} table(s): {}; copy and apply need them: GRANT {} ON ... TO {user} (or GRANT ... ON ALL TABLES IN SCHEMA ...), as the tables' owner",
            privileges.join(", "),
            tables.len(),
            abbreviate(&tables, 10),
            privileges.join(", ")
        ));
    }
    // sluice's own schema: created on the first start (CREATE on the database), or, when
    // it exists already (made by `sluice schema` run as another user), used: USAGE and
    // CREATE on it, and reading and writing its tables.
    let row = client
        .query_one(
            "SELECT current_database()::text,
                    to_regnamespace('sluice') IS NOT NULL,
                    has_database_privilege(current_database(), 'CREATE'),
                    (SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'sluice'),
                    (SELECT array_agg(c.relname::text ORDER BY c.relname)
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'sluice' AND c.relkind = 'r'
                       AND NOT has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE'))",
            &[],
        )
        .await
        .map_err(|e| error::pg("Reading the target user's database privileges", e))?;
    let database = crate::source::quote_ident(&row.get::<_, String>(0));
    let schema_exists: bool = row.get(1);
    if !schema_exists && !row.get::<_, bool>(2) {
        lines.push(format!(
            "target: {user} may not create sluice's schema (sluice.applied_position, written with every applied transaction): GRANT CREATE ON DATABASE {database} TO {user}, or create schema sluice owned by {user}"
        ));
    }
    if schema_exists {
        let owner: String = row.get(3);
        let schema_ok: bool = client
            .query_one(
                "SELECT has_schema_privilege('sluice', 'USAGE') AND has_schema_privilege('sluice', 'CREATE')",
                &[],
            )
            .await
            .map_err(|e| error::pg("Reading the target user's privileges on schema sluice", e))?
            .get(0);
        let tables: Option<Vec<String>> = row.get(4);
        if !schema_ok || tables.as_ref().is_some_and(|t| !t.is_empty()) {
            lines.push(format!(
                "target: schema sluice exists, owned by {owner}, and {user} may not use it{}: have {owner} run ALTER SCHEMA sluice OWNER TO {user} and ALTER TABLE ... OWNER TO {user} for its tables (or GRANT USAGE, CREATE ON SCHEMA sluice and SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA sluice TO {user})",
                match &tables {
                    Some(tables) if !tables.is_empty() => format!(" (nor its tables {})", tables.join(", ")),
                    _ => String::new(),
                }
            ));
        }
    }
    // The keys, indexes and constraints `sluice schema` deferred are built by `run` after
    // each table's copy: CREATE INDEX and ALTER TABLE need the table's owner, and an index
    // needs CREATE on the table's schema. Found here, not after an hours-long copy.
    match client
        .query(
            "SELECT DISTINCT d.table_name,
                    pg_has_role(current_user, c.relowner, 'USAGE'),
                    has_schema_privilege(c.relnamespace, 'CREATE'),
                    c.relowner::regrole::text, c.relnamespace::regnamespace::text
             FROM sluice.deferred_ddl d
             JOIN pg_class c ON c.oid = to_regclass(d.table_name)
             WHERE d.applied_at IS NULL AND d.table_name IS NOT NULL",
            &[],
        )
        .await
    {
        Ok(rows) => {
            let not_owned: Vec<String> = rows
                .iter()
                .filter(|r| !r.get::<_, bool>(1))
                .map(|r| format!("{} (owner {})", r.get::<_, String>(0), r.get::<_, String>(3)))
                .collect();
            if !not_owned.is_empty() {
                lines.push(format!(
                    "target: {user} does not own {} table(s) whose deferred keys and indexes `sluice run` builds after the copy (CREATE INDEX and ALTER TABLE need the owner): {}; ALTER TABLE ... OWNER TO {user}, or run sluice as the owner",
                    not_owned.len(),
                    abbreviate(&not_owned, 10)
                ));
            }
            let schemas: BTreeSet<String> = rows
                .iter()
                .filter(|r| !r.get::<_, bool>(2))
                .map(|r| r.get(4))
                .collect();
            for schema in schemas {
                lines.push(format!(
                    "target: {user} may not create in schema {schema}, where `sluice run` builds the deferred indexes after the copy: GRANT CREATE ON SCHEMA {schema} TO {user}"
                ));
            }
        }
        // Nothing deferred: no sluice.deferred_ddl yet.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {}
        Err(e) => lines.push(format!(
            "target: {user} cannot read sluice.deferred_ddl, the keys and indexes `sluice schema` deferred ({}): see the line about schema sluice",
            e.as_db_error().map(|d| d.message()).unwrap_or("refused")
        )),
    }
    Ok(lines)
}

/// Tables whose UPDATE and DELETE the target can only match by scanning the whole table:
/// apply matches rows on the replica identity's columns (REPLICA IDENTITY FULL: on the
/// target's primary key, else on every column), and without an index that starts with one
/// of them every batch reads the table end to end, which on a large table is a stall in all
/// but name. Tables whose keys `sluice schema` deferred (built by `run` after the copy, before
/// streaming) are fine.
async fn unindexed_matches(
    client: &Client,
    source: &SourceFacts,
    on_target: &BTreeMap<TableName, u32>,
) -> Result<Vec<String>> {
    let oids: Vec<u32> = on_target.values().copied().collect();
    let rows = client
        .query(
            "SELECT i.indrelid, a.attname::text, i.indisprimary
             FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid = ANY($1::oid[]) AND i.indisvalid AND i.indpred IS NULL",
            &[&oids],
        )
        .await
        .map_err(|e| error::pg("Reading the target tables' indexes", e))?;
    // Per target table: the leading column of each index, and whether it is the primary key.
    let mut indexes: BTreeMap<u32, Vec<(String, bool)>> = BTreeMap::new();
    for row in rows {
        indexes
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2)));
    }
    let deferred = client
        .query(
            "SELECT table_name FROM sluice.deferred_ddl
             WHERE applied_at IS NULL AND table_name IS NOT NULL
               AND to_regclass('sluice.deferred_ddl') IS NOT NULL",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect::<BTreeSet<String>>());
    let deferred = match deferred {
        Ok(deferred) => deferred,
        // No sluice.deferred_ddl yet: `sluice schema` deferred nothing.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            BTreeSet::new()
        }
        // Unreadable (another user's schema): what was deferred is unknown, so no table is
        // said to lack an index it will get (the privilege finding says why).
        Err(_) => return Ok(Vec::new()),
    };
    let mut warnings = Vec::new();
    for table in &source.tables {
        let Some(oid) = on_target.get(&table.name) else {
            continue;
        };
        if deferred.contains(&table.name.quoted()) {
            continue;
        }
        let target_indexes = indexes.get(oid).map(Vec::as_slice).unwrap_or(&[]);
        let (matched_on, indexed) = match table.replica_identity {
            'f' => (
                "every column (REPLICA IDENTITY FULL and no primary key on the target)".to_string(),
                target_indexes.iter().any(|(_, primary)| *primary),
            ),
            _ => match source.identity_columns.get(&table.oid) {
                Some(columns) => (
                    columns.join(", "),
                    target_indexes
                        .iter()
                        .any(|(first, _)| columns.contains(first)),
                ),
                // No replica identity: reported with the source's findings.
                None => continue,
            },
        };
        if !indexed {
            warnings.push(format!(
                "target: table {} has no index to find rows by {matched_on}: every UPDATE and DELETE batch on it scans the whole table; create its primary key (or an index on those columns) on the target before streaming",
                table.name
            ));
        }
    }
    Ok(warnings)
}

/// The rest of the ADD COLUMN a missing column needs, so that the target's existing rows get
/// what the source's got: its DEFAULT and NOT NULL (a sequence's default needs the sequence,
/// which `sluice schema` creates; a volatile one gives each target row a value of its own).
fn add_column_tail(column: &Column) -> String {
    let mut tail = String::new();
    match &column.default_expr {
        Some(expr) if expr.contains("nextval(") => {
            tail.push_str(&format!(
                " DEFAULT {expr} (create its sequence first; `sluice schema` does)"
            ));
        }
        Some(expr) => {
            tail.push_str(&format!(" DEFAULT {expr}"));
            if column.not_null {
                tail.push_str(" NOT NULL");
            }
            if expr.contains('(') {
                tail.push_str(" (a DEFAULT that calls a function, such as now() or random(), gives the existing target rows values of their own: set them to the source's)");
            }
        }
        None if column.not_null => {
            tail.push_str(" (NOT NULL on the source: add it once the rows hold values)")
        }
        None => {}
    }
    tail
}

/// Compares one table's columns. Types are compared by their `format_type` text: the same
/// text is the same type; anything else would make apply fail or change values.
fn column_findings(table: &TableName, source: &[Column], target: &[Column]) -> Vec<Finding> {
    let mut out = Vec::new();
    let target_by_name: BTreeMap<&str, &Column> =
        target.iter().map(|c| (c.name.as_str(), c)).collect();
    for column in source {
        match target_by_name.get(column.name.as_str()) {
            None => out.push(Finding {
                level: Level::Fail,
                text: format!(
                    "target: table {table} has no column {} (source type {}): ALTER TABLE {} ADD COLUMN {} {}{}",
                    column.name,
                    column.type_text,
                    table.quoted(),
                    crate::source::quote_ident(&column.name),
                    column.type_text,
                    add_column_tail(column)
                ),
            }),
            // Wider on the target (built-in types, whose OIDs are the same on both sides):
            // every value fits as it is.
            Some(target)
                if target.type_text != column.type_text
                    && (1..16384).contains(&column.type_oid)
                    && crate::apply::target::holds_every_value(
                        (column.type_oid, column.type_mod),
                        (target.type_oid, target.type_mod),
                    ) =>
            {
                out.push(Finding {
                    level: Level::Warn,
                    text: format!(
                        "target: table {table} column {} is {} on the target, wider than the source's {}: every value fits; make them equal before cutover if the application relies on the source's limit",
                        column.name, target.type_text, column.type_text
                    ),
                })
            }
            Some(target) if target.type_text != column.type_text => out.push(Finding {
                level: Level::Fail,
                text: format!(
                    "target: table {table} column {} is {} on the target but {} on the source: ALTER TABLE {} ALTER COLUMN {} TYPE {}",
                    column.name,
                    target.type_text,
                    column.type_text,
                    table.quoted(),
                    crate::source::quote_ident(&column.name),
                    column.type_text
                ),
            }),
            Some(_) => {}
        }
    }
    let source_names: BTreeSet<&str> = source.iter().map(|c| c.name.as_str()).collect();
    for column in target {
        if source_names.contains(column.name.as_str()) {
            continue;
        }
        if column.not_null && !column.has_default {
            out.push(Finding {
                level: Level::Fail,
                text: format!(
                    "target: table {table} has column {} NOT NULL without a default that the source does not have: every insert would fail; drop it or give it a default",
                    column.name
                ),
            });
        } else {
            out.push(Finding {
                level: Level::Warn,
                text: format!(
                    "target: table {table} has an extra column {} the source does not have: it will stay NULL or at its default",
                    column.name
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, identity: char, pk: bool) -> SourceTable {
        SourceTable {
            replica_identity: identity,
            identity_key: match pk {
                true => IdentityKey::Usable,
                false => IdentityKey::Missing,
            },
            ..SourceTable::keyed(TableName::parse(name))
        }
    }

    fn column(name: &str, type_text: &str) -> Column {
        Column {
            name: name.into(),
            type_text: type_text.into(),
            type_oid: 0,
            type_mod: -1,
            not_null: false,
            has_default: false,
            default_expr: None,
        }
    }

    #[test]
    fn distributed_tables_whose_old_rows_lack_the_distribution_column_are_named() {
        let mut keyed = table("public.orders", 'd', true);
        keyed.oid = 10;
        let mut other_key = table("public.items", 'd', true);
        other_key.oid = 11;
        let mut full = table("public.notes", 'f', false);
        full.oid = 12;
        let mut local = table("public.plain", 'd', true);
        local.oid = 13;
        let facts = SourceFacts {
            server: None,
            tables: vec![keyed, other_key, full, local],
            columns: BTreeMap::new(),
            identity_columns: BTreeMap::from([
                (10, vec!["customer_id".to_string(), "id".to_string()]),
                (11, vec!["id".to_string()]),
                (13, vec!["id".to_string()]),
            ]),
            slot_exists: None,
            user_types: BTreeMap::new(),
        };
        let findings = routing_findings(&facts, |name| {
            (name.name != "plain").then_some("customer_id")
        });
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(findings[0].starts_with("public.items: distribution column customer_id"));
    }

    #[test]
    fn large_tables_of_old_sources_without_an_integer_key_are_named() {
        assert_eq!(copied_whole_before_14(SplitBy::Auto, true), None);
        assert_eq!(copied_whole_before_14(SplitBy::PrimaryKey, true), None);
        assert!(copied_whole_before_14(SplitBy::Auto, false)
            .unwrap()
            .contains("no single-column integer primary key"));
        assert!(copied_whole_before_14(SplitBy::Ctid, true)
            .unwrap()
            .contains("split_by"));
    }

    #[test]
    fn replica_identities() {
        let findings = replica_identity_findings(&[
            table("public.a", 'd', true),
            table("public.b", 'i', true),
            table("public.c", 'f', false),
            table("public.d", 'n', true),
            table("public.e", 'd', false),
            // USING INDEX whose index was dropped: PostgreSQL acts as under NOTHING.
            table("public.f", 'i', false),
        ]);
        let levels: Vec<(Level, bool)> = findings
            .iter()
            .map(|f| (f.level, f.text.contains("public.")))
            .collect();
        assert_eq!(
            levels,
            vec![
                (Level::Pass, false),
                (Level::Warn, true),
                (Level::Fail, true),
                (Level::Fail, true),
                (Level::Fail, true)
            ]
        );
        assert!(findings[1].text.contains("public.c") && findings[1].text.contains("WAL"));
        assert!(findings[3].text.contains("public.e"));
        assert!(findings[4].text.contains("public.f") && findings[4].text.contains("dropped"));
    }

    #[test]
    fn columns_name_table_column_and_both_types() {
        let name = TableName::parse("public.orders");
        let mut extra = column("note", "text");
        extra.not_null = true;
        let findings = column_findings(
            &name,
            &[
                column("id", "bigint"),
                column("total", "numeric(10,2)"),
                column("x", "text"),
            ],
            &[column("id", "bigint"), column("total", "integer"), extra],
        );
        assert_eq!(findings.len(), 3, "{findings:?}");
        assert!(findings.iter().all(|f| f.level == Level::Fail));
        assert!(findings[0].text.contains(
            "public.orders column total is integer on the target but numeric(10,2) on the source"
        ));
        assert!(findings[1].text.contains("no column x"));
        assert!(findings[2].text.contains("note NOT NULL"));

        // A missing column is added as the source has it: DEFAULT and NOT NULL, or the
        // target's existing rows would differ from the source's.
        let mut defaulted = column("c3", "integer");
        defaulted.not_null = true;
        defaulted.default_expr = Some("7".into());
        let mut stamped = column("at", "timestamp with time zone");
        stamped.default_expr = Some("now()".into());
        let findings = column_findings(&name, &[defaulted, stamped], &[]);
        assert!(
            findings[0]
                .text
                .ends_with(r#"ADD COLUMN "c3" integer DEFAULT 7 NOT NULL"#),
            "{findings:?}"
        );
        assert!(
            findings[1]
                .text
                .contains("DEFAULT now() (a DEFAULT that calls a function"),
            "{findings:?}"
        );
    }
}
