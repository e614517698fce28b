//! `sluice check`: each problem of the runbook named on its own FAIL/WARN line, exit 1 on
//! any FAIL, exit 0 on a ready pair.

use std::time::Duration;

use crate::ops_common::*;
use crate::support::PgCluster;

fn line_with<'a>(text: &'a str, level: &str, needles: &[&str]) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(level) && needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no {level} line with {needles:?} in:\n{text}"))
}

/// Runs `sluice check`, asserts its exit code, and returns what it printed.
async fn check_exits(config: &std::path::Path, code: i32) -> String {
    let output = run(sluice(config, &["check"]), Duration::from_secs(60)).await;
    let text = stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "{text}\n{}",
        stderr(&output)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_every_blocking_problem_and_exits_1() {
    let pg = PgCluster::builder().setting("wal_level", "replica").start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    source
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric(10,2), placed timestamptz);
             CREATE TABLE events (happened timestamptz, payload jsonb);
             CREATE TABLE audit (id int PRIMARY KEY);
             CREATE TABLE wide (id int, v varchar(10));
             ALTER TABLE wide REPLICA IDENTITY FULL;
             CREATE TABLE keyed (id int NOT NULL, v text);
             CREATE UNIQUE INDEX keyed_id ON keyed (id);
             ALTER TABLE keyed REPLICA IDENTITY USING INDEX keyed_id;",
        )
        .await
        .unwrap();
    target
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, total integer, placed timestamptz);
             CREATE TABLE events (happened timestamptz, payload jsonb);
             CREATE TABLE wide (id int, v text);
             CREATE TABLE keyed (id int NOT NULL, v text);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "wal_level = replica",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    );
    line_with(&text, "FAIL", &["public.events", "no primary key"]);
    line_with(
        &text,
        "WARN",
        &["public.wide", "REPLICA IDENTITY FULL", "WAL"],
    );
    line_with(&text, "FAIL", &["table public.audit is missing"]);
    line_with(
        &text,
        "FAIL",
        &["public.orders column total is integer on the target but numeric(10,2) on the source"],
    );
    // A wider target type holds every value: a warning, not a failure.
    line_with(
        &text,
        "WARN",
        &["public.wide column v is text on the target, wider than the source's character varying(10)"],
    );
    line_with(&text, "PASS", &["superuser"]);
    line_with(&text, "PASS", &["a replication connection opens"]);
    line_with(
        &text,
        "WARN",
        &["max_slot_wal_keep_size = -1", "pg_wal holds"],
    );
    line_with(&text, "PASS", &["plain PostgreSQL"]);
    // keyed (replica identity index), orders and audit (primary keys) are fine on the source side
    assert!(!text.contains("table public.keyed:"), "{text}");
    // On the target, keyed lacks the index its replica identity finds rows by.
    line_with(
        &text,
        "WARN",
        &["target: table public.keyed has no index to find rows by id"],
    );
    line_with(
        &text,
        "PASS",
        &["3 of 5 selected tables have a primary key or a replica identity index"],
    );
    assert!(
        text.trim_end().ends_with("PASS"),
        "summary line last: {text}"
    );

    // A user who may neither replicate nor read, and an unreachable target with a password
    // in its URL: both FAIL lines, the password nowhere.
    source
        .batch_execute("CREATE ROLE reader LOGIN; GRANT SELECT ON orders TO reader")
        .await
        .unwrap();
    let reader = format!("postgresql://reader@127.0.0.1:{}/app", pg.port);
    let target_url = unreachable_url("target");
    let output = run(
        sluice(
            &config,
            &["--source", &reader, "--target", &target_url, "check"],
        ),
        Duration::from_secs(60),
    )
    .await;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    line_with(
        &text,
        "FAIL",
        &[
            "user reader may not replicate",
            "ALTER ROLE reader REPLICATION",
        ],
    );
    line_with(
        &text,
        "FAIL",
        &["table public.events cannot be read", "GRANT SELECT"],
    );
    assert!(
        !text.contains("table public.orders cannot be read"),
        "{text}"
    );
    line_with(
        &text,
        "FAIL",
        &[
            "target: cannot connect",
            "postgresql://postgres@127.0.0.1:1/target",
        ],
    );
    assert!(
        !text.contains("sekret") && !stderr(&output).contains("sekret"),
        "{text}"
    );
}

/// `run` streams through a walsender: a source that admits SQL sessions but no walsender
/// would fail `run` only after the publication was made, so check opens one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_opens_a_replication_connection_as_run_will() {
    let pg = PgCluster::builder().setting("max_wal_senders", "0").start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    for client in [&source, &target] {
        client
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "cannot open a replication connection",
            "max_wal_senders",
            "although a SQL session opened",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_ready_source_and_target() {
    let pg = PgCluster::builder()
        .setting("max_slot_wal_keep_size", "'10GB'")
        .start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    let schema = "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric(10,2), tags text[]);
                  CREATE TYPE mood AS ENUM ('ok', 'sad');
                  CREATE TABLE people (id uuid PRIMARY KEY, mood mood, born date);
                  CREATE TABLE readings (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
                  CREATE TABLE readings_2026 PARTITION OF readings
                      FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    // Matched by the globs but left out, each said once: an unlogged table, and a table an
    // extension owns (as PostGIS's spatial_ref_sys).
    source
        .batch_execute(
            "CREATE UNLOGGED TABLE cache (k text PRIMARY KEY, v text);
             CREATE EXTENSION citext;
             CREATE TABLE citext_words (w citext PRIMARY KEY);
             ALTER EXTENSION citext ADD TABLE citext_words;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 0).await;
    assert!(!text.contains("FAIL  "), "{text}");
    line_with(&text, "PASS", &["3 tables selected by [tables]"]);
    line_with(
        &text,
        "WARN",
        &["partitioned tables selected (public.readings)", "TRUNCATE"],
    );
    line_with(&text, "WARN", &["public.cache", "UNLOGGED", "SET LOGGED"]);
    line_with(
        &text,
        "WARN",
        &[
            "public.citext_words",
            "extension citext",
            "CREATE EXTENSION citext",
        ],
    );
    line_with(&text, "PASS", &["wal_level = logical"]);
    line_with(&text, "PASS", &["max_slot_wal_keep_size = 10GB"]);
    line_with(
        &text,
        "PASS",
        &["3 of 3 selected tables exist with compatible columns"],
    );
    line_with(
        &text,
        "PASS",
        &["free (sluice needs 1)", "max_replication_slots"],
    );
    line_with(&text, "PASS", &["free (sluice needs 1)", "max_wal_senders"]);
    line_with(&text, "PASS", &["publication sluice does not exist yet"]);
    line_with(
        &text,
        "PASS",
        &["may SET session_replication_role = replica"],
    );
    assert!(!text.contains("large objects"), "{text}");

    // Large objects are in no table: neither the copy nor the stream carries them.
    source
        .batch_execute("SELECT lo_from_bytea(0, 'scan.pdf'), lo_from_bytea(0, 'logo.png')")
        .await
        .unwrap();
    let text = check_exits(&config, 0).await;
    line_with(
        &text,
        "WARN",
        &[
            "holds 2 large objects",
            "do not carry them",
            "--large-objects",
        ],
    );

    // A publication that misses a selected table blocks `run`: check says so first.
    source
        .batch_execute("CREATE PUBLICATION sluice FOR TABLE orders")
        .await
        .unwrap();
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &["public.people", "ALTER PUBLICATION sluice ADD TABLE"],
    );
    // Partitions published on their own would arrive under names the target need not have.
    source
        .batch_execute("ALTER PUBLICATION sluice ADD TABLE people, readings")
        .await
        .unwrap();
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "public.readings (published partition by partition",
            "publish_via_partition_root = true",
        ],
    );
    // Adding the table would not help (and a FOR ALL TABLES publication refuses ADD TABLE).
    assert!(!text.contains("ADD TABLE"), "{text}");
    source
        .batch_execute("ALTER PUBLICATION sluice SET (publish_via_partition_root = true)")
        .await
        .unwrap();
    let text = check_exits(&config, 0).await;
    line_with(
        &text,
        "PASS",
        &["publication sluice publishes every selected table"],
    );

    // [citus] on a target without Citus: `schema` would refuse, so check says so first.
    let citus = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "[citus]\ndistribute = { \"public.orders\" = \"id\" }\n",
    );
    let text = check_exits(&citus, 1).await;
    line_with(
        &text,
        "FAIL",
        &["no citus extension", "CREATE EXTENSION citus"],
    );

    // The source itself by another host name is no target.
    let itself = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("app").replace("127.0.0.1", "localhost"),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&itself, 1).await;
    line_with(&text, "FAIL", &["reaches the source database itself (app"]);
}

/// Apply finds rows by the replica identity's columns: a target without an index on them
/// scans the whole table for every UPDATE and DELETE batch. Keys `sluice schema` deferred
/// are built before streaming, so those tables are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_when_the_target_cannot_find_rows_by_an_index() {
    let pg = PgCluster::start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    source
        .batch_execute(
            "CREATE TABLE plain (id int PRIMARY KEY, v text);
             CREATE TABLE wide (a int, b text);
             ALTER TABLE wide REPLICA IDENTITY FULL;
             CREATE TABLE keyed (id int PRIMARY KEY, v text);
             CREATE TABLE later (id int PRIMARY KEY, v text);",
        )
        .await
        .unwrap();
    target
        .batch_execute(
            "CREATE TABLE plain (id int, v text);
             CREATE TABLE wide (a int, b text);
             CREATE TABLE keyed (id int, v text);
             CREATE INDEX ON keyed (id);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    // `later` is created by `sluice schema`, its key deferred to after the copy.
    let output = run(sluice(&config, &["schema"]), Duration::from_secs(60)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = check_exits(&config, 0).await;
    line_with(
        &text,
        "WARN",
        &["public.plain has no index to find rows by id"],
    );
    line_with(
        &text,
        "WARN",
        &["public.wide has no index", "REPLICA IDENTITY FULL"],
    );
    let unindexed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("has no index"))
        .collect();
    assert_eq!(unindexed.len(), 2, "{text}");
}

/// A target user short of a privilege copy or apply needs would stop them at the first row
/// it may not write, possibly hours into the copy: `check` names each gap and the GRANT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_the_target_user_may_not_do() {
    let pg = PgCluster::start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    let schema = "CREATE TABLE orders (id int PRIMARY KEY, note text);
                  CREATE TABLE events (id int PRIMARY KEY, at timestamptz);";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    target
        .batch_execute(
            "CREATE ROLE limited LOGIN;
             GRANT SELECT, INSERT ON orders TO limited;
             GRANT ALL ON events TO limited;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &format!("postgresql://limited@127.0.0.1:{}/target", pg.port),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "\"limited\" lacks UPDATE, DELETE, TRUNCATE on 1 table(s): public.orders",
            "GRANT UPDATE, DELETE, TRUNCATE ON",
        ],
    );
    line_with(
        &text,
        "FAIL",
        &[
            "\"limited\" may not create sluice's schema",
            "GRANT CREATE ON DATABASE",
        ],
    );
    assert!(!text.contains("public.events"), "{text}");

    target
        .batch_execute(
            "GRANT UPDATE, DELETE, TRUNCATE ON orders TO limited;
             GRANT CREATE ON DATABASE target TO limited;",
        )
        .await
        .unwrap();
    let text = check_exits(&config, 0).await;
    assert!(
        !text.contains("lacks") && !text.contains("may not create"),
        "{text}"
    );

    // `sluice schema` run as another user: schema sluice is that user's, and the deferred
    // keys wait for tables this user does not own, in a schema it may not create in.
    target
        .batch_execute(
            "CREATE SCHEMA sluice;
             CREATE TABLE sluice.deferred_ddl (id int, table_name text, statement text, applied_at timestamptz);
             INSERT INTO sluice.deferred_ddl VALUES (1, '\"public\".\"orders\"', 'CREATE INDEX ...', NULL);
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;",
        )
        .await
        .unwrap();
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "schema sluice exists, owned by postgres, and \"limited\" may not use it",
            "ALTER SCHEMA sluice OWNER TO \"limited\"",
        ],
    );
    target
        .batch_execute(
            "ALTER SCHEMA sluice OWNER TO limited; ALTER TABLE sluice.deferred_ddl OWNER TO limited;",
        )
        .await
        .unwrap();
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "\"limited\" does not own 1 table(s) whose deferred keys and indexes",
            "\"public\".\"orders\" (owner postgres)",
        ],
    );
    line_with(
        &text,
        "FAIL",
        &[
            "may not create in schema public",
            "GRANT CREATE ON SCHEMA public",
        ],
    );
    assert!(!text.contains("no index"), "{text}");

    // A source that cannot be reached hides none of that: one run lists everything.
    let config = write_config(
        dir.path(),
        &pg.url("nosuchdb"),
        &format!("postgresql://limited@127.0.0.1:{}/target", pg.port),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 1).await;
    line_with(&text, "FAIL", &["source: cannot connect"]);
    line_with(
        &text,
        "FAIL",
        &["\"limited\" does not own 1 table(s) whose deferred keys and indexes"],
    );
}

/// Globs that select nothing say why: a glob that matches no table (a typo, the wrong case),
/// a partition named without its root, an unlogged table. Names are shown as PostgreSQL
/// quotes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_which_globs_miss_and_why_nothing_is_selected() {
    let pg = PgCluster::builder().start();
    let source = pg.create_database("app").await;
    pg.create_database("target").await;
    source
        .batch_execute(
            r#"CREATE TABLE "Order Items" (id int PRIMARY KEY);
               CREATE UNLOGGED TABLE unlog (id int PRIMARY KEY);
               CREATE TABLE meas (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
               CREATE TABLE meas_2024 PARTITION OF meas FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"#,
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &state,
        r#"[tables]
include = ["public.unlog", "public.meas_2024", "public.order items"]"#,
    );
    let text = check_exits(&config, 1).await;
    line_with(&text, "WARN", &["public.unlog", "UNLOGGED"]);
    line_with(
        &text,
        "WARN",
        &[
            "public.meas_2024",
            "a partition of public.meas",
            "include public.meas",
        ],
    );
    line_with(
        &text,
        "WARN",
        &[
            "include \"public.order items\" matches no table",
            "case-sensitive",
        ],
    );
    line_with(&text, "FAIL", &["no table is selected by [tables]"]);
    assert!(
        !text.contains("include \"public.unlog\" matches no table"),
        "{text}"
    );

    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &state,
        r#"[tables]
include = ["public.Order Items", "public.typo"]"#,
    );
    let text = check_exits(&config, 1).await;
    line_with(&text, "PASS", &["1 tables selected"]);
    line_with(&text, "WARN", &["include \"public.typo\" matches no table"]);
    line_with(&text, "FAIL", &["table public.\"Order Items\" is missing"]);

    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &state,
        r#"[tables]
exclude = ["public.meas_2024"]"#,
    );
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "WARN",
        &[
            "exclude \"public.meas_2024\" matches partitions only",
            "changes nothing",
        ],
    );

    // A partitioned table excluded on purpose: its partitions are not flagged one by one.
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &state,
        r#"[tables]
exclude = ["public.meas"]"#,
    );
    let text = check_exits(&config, 1).await;
    assert!(!text.contains("a partition of public.meas"), "{text}");
}

/// The source checks each partition's own replica identity, not the root's: a partitioned
/// table set to REPLICA IDENTITY FULL whose partitions have no key would, once published,
/// make the application's UPDATEs and DELETEs fail. check FAILs it and run refuses before
/// publishing; a partitioned table's size is its partitions'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_without_a_replica_identity_are_named_and_never_published() {
    let pg = PgCluster::builder().start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    let schema = "CREATE TABLE logs (at date, msg text) PARTITION BY RANGE (at);
                  CREATE TABLE logs_2024 PARTITION OF logs FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
                  CREATE TABLE logs_2025 PARTITION OF logs FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
                  ALTER TABLE logs REPLICA IDENTITY FULL;
                  ALTER TABLE logs_2025 REPLICA IDENTITY FULL;";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    source
        .batch_execute(
            "INSERT INTO logs SELECT date '2024-01-01' + (i % 700), repeat('x', 200) FROM generate_series(1, 20000) i",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "table public.logs: REPLICA IDENTITY FULL, but its partitions public.logs_2024 are not",
            "each partition",
        ],
    );
    // Not 0 bytes: the rows are in the partitions.
    let selected = line_with(&text, "PASS", &["1 tables selected"]);
    assert!(!selected.contains(" 0 bytes"), "{selected}");

    let output = run(sluice(&config, &["run"]), Duration::from_secs(60)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("public.logs_2024 (a partition of public.logs)"),
        "{}",
        stderr(&output)
    );
    let publications: i64 = source
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0);
    source
        .batch_execute("UPDATE logs SET msg = 'y' WHERE at = '2024-01-02'")
        .await
        .unwrap();

    // Every partition identified: it passes.
    source
        .batch_execute("ALTER TABLE logs_2024 REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let text = check_exits(&config, 0).await;
    assert!(!text.contains("have no primary key"), "{text}");

    // A partition with a key of its own under the FULL root sends its old rows by that key:
    // matched by all values they would find nothing (a delete lost).
    source
        .batch_execute(
            "CREATE TABLE logs_2026 PARTITION OF logs FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
             ALTER TABLE logs_2026 ADD PRIMARY KEY (at);",
        )
        .await
        .unwrap();
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &["table public.logs: REPLICA IDENTITY FULL, but its partitions public.logs_2026 are not"],
    );
}

/// PostgreSQL uses neither a DEFERRABLE primary key nor a dropped USING INDEX index as a
/// replica identity: published, such a table's UPDATEs and DELETEs fail on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_postgresql_cannot_use_as_identity_are_named_and_never_published() {
    let pg = PgCluster::builder().start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    let schema = "CREATE TABLE accounts (id int PRIMARY KEY DEFERRABLE, balance int);
                  CREATE TABLE ledger (id int NOT NULL, note text);
                  CREATE UNIQUE INDEX ledger_id ON ledger (id);
                  ALTER TABLE ledger REPLICA IDENTITY USING INDEX ledger_id;
                  DROP INDEX ledger_id;
                  CREATE TABLE logs (at date, msg text, PRIMARY KEY (at) DEFERRABLE) PARTITION BY RANGE (at);
                  CREATE TABLE logs_2024 PARTITION OF logs FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    source
        .batch_execute(
            "INSERT INTO accounts VALUES (1, 10); INSERT INTO ledger VALUES (1, 'a');
             INSERT INTO logs VALUES ('2024-03-01', 'x');",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 1).await;
    line_with(
        &text,
        "FAIL",
        &[
            "table public.accounts: its primary key is DEFERRABLE",
            "REPLICA IDENTITY FULL",
        ],
    );
    line_with(
        &text,
        "FAIL",
        &["table public.ledger: REPLICA IDENTITY USING INDEX, but that index was dropped"],
    );
    line_with(
        &text,
        "FAIL",
        &["table public.logs: partitions public.logs_2024"],
    );

    let output = run(sluice(&config, &["run"]), Duration::from_secs(60)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    for name in [
        "public.accounts",
        "public.ledger",
        "public.logs_2024 (a partition of public.logs)",
    ] {
        assert!(
            stderr(&output).contains(name),
            "{name}: {}",
            stderr(&output)
        );
    }
    let publications: i64 = source
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0);
    source
        .batch_execute(
            "UPDATE accounts SET balance = 11; UPDATE ledger SET note = 'b';
             UPDATE logs SET msg = 'y';",
        )
        .await
        .unwrap();

    // Identities PostgreSQL can use: it passes.
    source
        .batch_execute(
            "ALTER TABLE accounts REPLICA IDENTITY FULL;
             CREATE UNIQUE INDEX ledger_id ON ledger (id);
             ALTER TABLE ledger REPLICA IDENTITY USING INDEX ledger_id;
             ALTER TABLE logs REPLICA IDENTITY FULL; ALTER TABLE logs_2024 REPLICA IDENTITY FULL;",
        )
        .await
        .unwrap();
    let text = check_exits(&config, 0).await;
    assert!(!text.lines().any(|l| l.starts_with("FAIL")), "{text}");
    // FULL is the way for a deferrable key: not advised back to "a primary key".
    line_with(
        &text,
        "WARN",
        &[
            "table public.accounts: REPLICA IDENTITY FULL",
            "so keep FULL",
        ],
    );
}

/// A column generated on the source and plain on the target would stay empty there:
/// PostgreSQL sends no value for a generated column. `check` FAILs and `run` refuses, each
/// with the statement that mends it; mended, the target computes the values itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_generated_only_on_the_source_is_refused_with_the_fix() {
    let pg = PgCluster::builder().start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    source
        .batch_execute(
            "CREATE TABLE g1 (id int PRIMARY KEY, v int, g int GENERATED ALWAYS AS (v * 2) STORED);
             INSERT INTO g1 (id, v) SELECT i, i FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    target
        .batch_execute("CREATE TABLE g1 (id int PRIMARY KEY, v int, g int)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    let text = check_exits(&config, 1).await;
    let fix = "ALTER TABLE \"public\".\"g1\" DROP COLUMN \"g\", ADD COLUMN \"g\" integer GENERATED ALWAYS AS ((v * 2)) STORED";
    line_with(
        &text,
        "FAIL",
        &["public.g1.g is GENERATED ALWAYS AS ((v * 2)) STORED on the source but a plain column on the target", fix],
    );
    let output = run(sluice(&config, &["run"]), Duration::from_secs(60)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains(fix), "{}", stderr(&output));

    // The advice, followed.
    target.batch_execute(fix).await.unwrap();
    check_exits(&config, 0).await;
}

/// A port nothing listens on: the message says where to look, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_says_where_to_look() {
    let pg = PgCluster::builder().start();
    pg.create_database("app")
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &format!("postgresql://postgres@127.0.0.1:{port}/target"),
        &dir.path().join("state"),
        "",
    );
    let output = run(sluice(&config, &["verify"]), Duration::from_secs(60)).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(1), "{text}");
    let hint = format!("Nothing accepts connections at 127.0.0.1:{port}");
    assert_eq!(text.matches(&hint).count(), 1, "{text}");
    assert!(text.contains("Check the host and port in"), "{text}");
    // check says it once too, without the generic advice beside it.
    let text = check_exits(&config, 1).await;
    assert_eq!(text.matches(&hint).count(), 1, "{text}");
    assert!(!text.contains("the network path"), "{text}");
}
