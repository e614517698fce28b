//! `sluice run` keeps a real target identical to a real source through every case SPEC.md
//! lists under "What must be handled"; each scenario compares the tables row for row.

use crate::support::sluice::{Daemon, Pair};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a integer, b text);
CREATE TABLE kinds (
    id bigint PRIMARY KEY,
    n numeric(12,2), f float8, r real, i2 smallint, b boolean,
    t text, vc varchar(20), ch char(3), by bytea,
    j json, jb jsonb, arr integer[], tarr text[], rng int4range, tsr tstzrange,
    ts timestamp, tstz timestamptz, d date, tm time, iv interval,
    u uuid, ip inet, cidr_ cidr, mac macaddr,
    m mood, pos positive, comp pair, marr mood[], x xml, pt point, bits bit varying(8), money_ money
);
CREATE TABLE toasty (id int PRIMARY KEY, small text, big text);
ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE full_nokey (a int, b text);
ALTER TABLE full_nokey REPLICA IDENTITY FULL;
CREATE TABLE full_pk (id int PRIMARY KEY, b text);
ALTER TABLE full_pk REPLICA IDENTITY FULL;
CREATE TABLE by_index (code text NOT NULL, v int);
CREATE UNIQUE INDEX by_index_code ON by_index (code);
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_code;
CREATE TABLE parent (id serial PRIMARY KEY, note text);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent(id), v text);
CREATE TABLE measurements (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
"#;

const TABLES: &[&str] = &[
    "kinds",
    "toasty",
    "full_nokey",
    "full_pk",
    "by_index",
    "parent",
    "child",
    "measurements",
];

#[tokio::test(flavor = "multi_thread")]
async fn every_change_kind_and_type_family_arrives_exactly() {
    let pair = Pair::with_schema(SCHEMA).await;
    // The target's partitions differ from the source's: changes arrive under the root.
    let target = pair.target_client().await;
    target
        .batch_execute("DROP TABLE measurements; CREATE TABLE measurements (id int, at date, v int, PRIMARY KEY (id, at));")
        .await
        .unwrap();
    let config = pair.config("");
    let mut daemon = pair.start_daemon(&config).await;
    let source = pair.source_client().await;

    source
        .batch_execute(
            r#"
        INSERT INTO kinds VALUES (1, 12.5, 1.0000000000000002, 3.25, -7, true,
            E'tab\there\nnewline \\ backslash', 'vc', 'abc', '\x00ff10'::bytea,
            '{"a": [1, 2]}', '{"b": {"c": null}}', '{1,NULL,3}', '{"x,y","z\"q"}', '[1,10)',
            '["2026-01-01 10:00+02","2026-01-02 00:00+00")',
            '2026-11-21 10:11:12.123456', '2026-11-21 10:11:12.5+05:30', '2026-11-21', '23:59:59',
            '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 'happy', 5, ROW(1, 'one'),
            '{sad,happy}', '<a>x</a>', '(1.5,2.5)', B'1011', 12.34);
        INSERT INTO kinds (id) VALUES (2);
        INSERT INTO kinds (id, t, f) VALUES (3, '', 'NaN'), (4, 'null', '-Infinity');
        UPDATE kinds SET n = NULL, m = 'sad', arr = '{}', comp = ROW(NULL, NULL) WHERE id = 1;
        UPDATE kinds SET id = 10 WHERE id = 2;
        DELETE FROM kinds WHERE id = 3;

        INSERT INTO toasty SELECT g, 's' || g, repeat(md5(g::text), 1000) FROM generate_series(1, 5) g;
        UPDATE toasty SET small = 'changed' WHERE id <= 3;
        UPDATE toasty SET small = 'again' WHERE id = 1;
        UPDATE toasty SET big = 'short now' WHERE id = 2;

        INSERT INTO full_nokey VALUES (1, 'dup'), (1, 'dup'), (2, NULL), (3, 'x');
        UPDATE full_nokey SET b = 'one of two' WHERE ctid = (SELECT min(ctid) FROM full_nokey WHERE a = 1);
        UPDATE full_nokey SET b = 'was null' WHERE a = 2;
        DELETE FROM full_nokey WHERE a = 3;
        INSERT INTO full_pk VALUES (1, 'a'), (2, 'b');
        UPDATE full_pk SET b = 'B' WHERE id = 2;
        DELETE FROM full_pk WHERE id = 1;

        INSERT INTO by_index VALUES ('a', 1), ('b', 2);
        UPDATE by_index SET v = 20 WHERE code = 'b';
        UPDATE by_index SET code = 'c' WHERE code = 'a';

        INSERT INTO parent (note) VALUES ('p1'), ('p2');
        INSERT INTO child VALUES (1, 1, 'c1'), (2, 2, 'c2');
        INSERT INTO measurements VALUES (1, '2025-06-01', 1), (2, '2026-06-01', 2);
        UPDATE measurements SET v = 3 WHERE id = 2;

        SELECT pg_logical_emit_message(true, 'test', 'transactional message');
        SELECT pg_logical_emit_message(false, 'test', 'non-transactional message');
        "#,
        )
        .await
        .unwrap();
    // Several statements in one transaction, and a rolled-back one that must not arrive.
    source
        .batch_execute(
            "BEGIN; INSERT INTO kinds (id) VALUES (100); UPDATE kinds SET t = 'in txn' WHERE id = 100; COMMIT;
             BEGIN; INSERT INTO kinds (id) VALUES (101); ROLLBACK;",
        )
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, TABLES).await;

    // Primary-key swap through a temporary key, in one transaction.
    source
        .batch_execute(
            "BEGIN; UPDATE full_pk SET id = 3 WHERE id = 2; INSERT INTO full_pk VALUES (2, 'new two'); COMMIT;
             UPDATE by_index SET code = 'tmp' WHERE code = 'b';
             UPDATE by_index SET code = 'b' WHERE code = 'c';
             UPDATE by_index SET code = 'c' WHERE code = 'tmp';",
        )
        .await
        .unwrap();
    // TRUNCATE ... RESTART IDENTITY CASCADE empties both tables and resets the sequence.
    source
        .batch_execute(
            "TRUNCATE parent RESTART IDENTITY CASCADE;
             INSERT INTO parent (note) VALUES ('after truncate');
             TRUNCATE full_nokey;",
        )
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, TABLES).await;
    let target_next: i64 = target
        .query_one("SELECT last_value FROM parent_id_seq", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        target_next, 1,
        "RESTART IDENTITY reached the target's sequence"
    );

    assert!(daemon.terminate().success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(!log.contains("ERROR"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_lag_report_a_running_daemon() {
    use crate::support::sluice::sluice;
    let pair = Pair::with_schema("CREATE TABLE t (id int PRIMARY KEY, v text);").await;
    let config = pair.config("");
    let mut daemon = pair.start_daemon(&config).await;
    let source = pair.source_client().await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 1000) g; UPDATE t SET v = 'w' WHERE id <= 10;")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    let config = config.to_str().unwrap();
    let (code, out, err) = sluice(&[
        "lag",
        "--config",
        config,
        "--until-below",
        "1MB",
        "--timeout",
        "30s",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // The slot's figures come from the monitor's samples: the first lands shortly after the
    // slot is created, possibly after the catch-up of so small a workload.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (out, status) = loop {
        let (code, out, err) = sluice(&["status", "--json", "--config", config]);
        assert_eq!(code, 0, "{err}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        if status["retained_wal_bytes"].is_u64() || std::time::Instant::now() > deadline {
            break (out, status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(status["state"], "streaming", "{out}");
    assert_eq!(status["slot"], "sluice");
    // One simple-query batch is one implicit transaction on the source.
    assert_eq!(status["applied_transactions"], 1, "{out}");
    assert_eq!(status["applied_changes"], 1010, "{out}");
    assert!(
        status["applied_lsn"].as_str().unwrap().contains('/'),
        "{out}"
    );
    assert!(status["lag_bytes"].as_u64().is_some(), "{out}");
    assert!(status["retained_wal_bytes"].as_u64().is_some(), "{out}");
    assert!(status["last_error"].is_null(), "{out}");
    assert!(daemon.terminate().success());
    let (code, out, _) = sluice(&["status", "--json", "--config", config]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "stopped", "{out}");
    assert!(status["applied_lsn"].as_str().is_some(), "{out}");
    // The counts are the migration's, not one run's: kept while stopped, and going on
    // from there after a restart.
    assert_eq!(status["applied_transactions"], 1, "{out}");
    assert_eq!(status["applied_changes"], 1010, "{out}");
    let mut daemon = pair.start_daemon(std::path::Path::new(config)).await;
    source
        .batch_execute("DELETE FROM t WHERE id <= 5")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    let (_, out, _) = sluice(&["status", "--json", "--config", config]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["applied_transactions"], 2, "{out}");
    assert_eq!(status["applied_changes"], 1015, "{out}");
    assert!(daemon.terminate().success());
}

/// Identity columns GENERATED ALWAYS (the schema `sluice schema` copies keeps them so): the
/// target keeps the source's values, as native logical replication does, and a new value
/// the target cannot take by UPDATE stalls apply with the fix instead of being dropped.
#[tokio::test(flavor = "multi_thread")]
async fn identity_columns_generated_always_keep_the_source_values() {
    let pair = Pair::with_schema(
        "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text);
         CREATE TABLE tickets (code text PRIMARY KEY, seq int GENERATED ALWAYS AS IDENTITY, note text);
         CREATE TABLE events (n int GENERATED ALWAYS AS IDENTITY, what text);
         ALTER TABLE events REPLICA IDENTITY FULL;",
    )
    .await;
    let tables = ["orders", "tickets", "events"];
    let target = pair.target_client().await;
    // Values the target would generate itself differ from the source's.
    target
        .batch_execute(
            "SELECT setval('orders_id_seq', 1000); SELECT setval('tickets_seq_seq', 1000);",
        )
        .await
        .unwrap();
    let config = pair.config("");
    let mut daemon = pair.start_daemon(&config).await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "INSERT INTO orders (note) VALUES ('one');
             INSERT INTO orders (note) VALUES ('two'), ('three');
             INSERT INTO orders (note) SELECT 'bulk ' || g FROM generate_series(1, 100) g;
             INSERT INTO tickets (code, note) VALUES ('a', 'first'), ('b', 'second'), ('c', 'third');
             INSERT INTO events (what) VALUES ('started'), ('started'), ('stopped');
             UPDATE orders SET note = 'changed' WHERE id = 2;
             DELETE FROM orders WHERE id = 1;
             UPDATE tickets SET note = 'changed' WHERE code = 'a';
             UPDATE tickets SET code = 'z' WHERE code = 'b';
             UPDATE events SET what = 'restarted' WHERE n = 2;
             DELETE FROM events WHERE n = 3;",
        )
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &tables).await;

    // `SET ... = DEFAULT` gives a row a new identity value on the source; no UPDATE can give
    // it to the target's GENERATED ALWAYS column: stall, name the column and the fix.
    source
        .batch_execute(
            "UPDATE tickets SET seq = DEFAULT WHERE code = 'a';
             UPDATE events SET n = DEFAULT WHERE n = 1;",
        )
        .await
        .unwrap();
    daemon
        .wait_for_log(
            r#"ALTER TABLE "public"."tickets" ALTER COLUMN "seq" SET GENERATED BY DEFAULT"#,
        )
        .await;
    daemon.wait_for_log("apply stalled").await;
    let seq_a: i32 = target
        .query_one("SELECT seq FROM tickets WHERE code = 'a'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seq_a, 1,
        "the old value stays until the target can take the new one"
    );
    target
        .batch_execute("ALTER TABLE tickets ALTER COLUMN seq SET GENERATED BY DEFAULT")
        .await
        .unwrap();
    // REPLICA IDENTITY FULL without a key: the same rule through the by-values path.
    daemon
        .wait_for_log(r#"ALTER TABLE "public"."events" ALTER COLUMN "n" SET GENERATED BY DEFAULT"#)
        .await;
    target
        .batch_execute("ALTER TABLE events ALTER COLUMN n SET GENERATED BY DEFAULT")
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &tables).await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// A DEFERRABLE primary key cannot be a replica identity, so such tables replicate with
/// REPLICA IDENTITY FULL; inside one source transaction two rows may then hold the same key
/// (keys swapped or rotated). Matched by the key alone, the second update found both rows
/// and wrote both: a row lost, another doubled, no error. Each change must reach exactly
/// the row it changed on the source.
#[tokio::test(flavor = "multi_thread")]
async fn keys_swapped_under_a_deferrable_primary_key_change_one_row_each() {
    let pair = Pair::with_schema(
        "CREATE TABLE ranks (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text);
         ALTER TABLE ranks REPLICA IDENTITY FULL;
         CREATE TABLE slots (a int, b int, v text,
                             PRIMARY KEY (a, b) DEFERRABLE INITIALLY IMMEDIATE);
         ALTER TABLE slots REPLICA IDENTITY FULL;
         CREATE TABLE uniq (id int NOT NULL, v text,
                            CONSTRAINT uniq_id UNIQUE (id) DEFERRABLE INITIALLY DEFERRED);
         ALTER TABLE uniq REPLICA IDENTITY FULL;",
    )
    .await;
    let config = pair.config("");
    let mut daemon = pair.start_daemon(&config).await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "INSERT INTO ranks SELECT g, 'r' || g FROM generate_series(1, 5) g;
             INSERT INTO slots SELECT 1, g, 's' || g FROM generate_series(1, 4) g;
             INSERT INTO uniq SELECT g, 'u' || g FROM generate_series(1, 5) g;",
        )
        .await
        .unwrap();
    source
        .batch_execute(
            "BEGIN;
             UPDATE ranks SET id = 3 - id WHERE id IN (1, 2);
             UPDATE ranks SET id = id % 3 + 3 WHERE id BETWEEN 3 AND 5;
             COMMIT;
             BEGIN;
             SET CONSTRAINTS ALL DEFERRED;
             UPDATE slots SET b = 5 - b;
             DELETE FROM slots WHERE b = 1;
             COMMIT;
             UPDATE uniq SET id = 6 - id;",
        )
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("ranks").await;
    pair.assert_same("slots").await;
    pair.assert_same("uniq").await;
    // Without a primary key, the unique index over NOT NULL columns found the rows (not a
    // scan of the whole table per change).
    let target = pair.target_client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let scans: i64 = target
            .query_one(
                "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'uniq_id'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if scans > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "uniq_id was never used"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// Rows of a partitioned table matched by their old values (REPLICA IDENTITY FULL without
/// a plain key) are found by ctid, and a ctid names a row within one partition only: an
/// update through the root changed the row at that position in every partition (rows lost
/// and doubled, no error). Matched by partition and ctid together.
#[tokio::test(flavor = "multi_thread")]
async fn full_identity_rows_of_a_partitioned_table_change_in_their_own_partition_only() {
    let pair = Pair::with_schema(
        "CREATE TABLE t (id int, k int, v text) PARTITION BY RANGE (k);
         CREATE TABLE ta PARTITION OF t FOR VALUES FROM (0) TO (100);
         CREATE TABLE tb PARTITION OF t FOR VALUES FROM (100) TO (200);
         ALTER TABLE t REPLICA IDENTITY FULL;
         ALTER TABLE ta REPLICA IDENTITY FULL;
         ALTER TABLE tb REPLICA IDENTITY FULL;
         CREATE TABLE d (id int, k int, v text,
                         PRIMARY KEY (id, k) DEFERRABLE INITIALLY DEFERRED) PARTITION BY RANGE (k);
         CREATE TABLE da PARTITION OF d FOR VALUES FROM (0) TO (100);
         CREATE TABLE db PARTITION OF d FOR VALUES FROM (100) TO (200);
         ALTER TABLE d REPLICA IDENTITY FULL;
         ALTER TABLE da REPLICA IDENTITY FULL;
         ALTER TABLE db REPLICA IDENTITY FULL;",
    )
    .await;
    // Copied: each partition holds its two rows at ctids (0,1) and (0,2).
    let source = pair.source_client().await;
    source
        .batch_execute(
            "INSERT INTO t VALUES (1, 50, 'a'), (2, 150, 'b'), (3, 60, 'c'), (4, 160, 'd');
             INSERT INTO d VALUES (1, 50, 'a'), (2, 150, 'b'), (3, 60, 'c'), (4, 160, 'd');",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n");
    let mut daemon = pair.start_daemon(&config).await;
    for statement in [
        "UPDATE t SET v = 'x' WHERE id = 1",
        "DELETE FROM t WHERE id = 3",
        "UPDATE d SET v = 'x' WHERE id = 1",
        "DELETE FROM d WHERE id = 3",
    ] {
        source.batch_execute(statement).await.unwrap();
    }
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("t").await;
    pair.assert_same("d").await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// Databases with their own output settings, different on each side (legacy applications
/// set `bytea_output = 'escape'`, a `DateStyle` or a time zone per database, which the
/// walsender and every session inherit): rows matched by their whole old values (REPLICA
/// IDENTITY FULL) are still found, because both the stream and the apply session pin how
/// values are written.
#[tokio::test(flavor = "multi_thread")]
async fn full_identity_rows_are_matched_whatever_the_databases_output_settings() {
    // boolean, inet and char(n) have a cast to text that is not their output function
    // (`true` for `t`, `/32` added, blanks trimmed): rows holding them must still match.
    // regclass values are written relative to the search_path.
    let pair = Pair::with_schema(
        "CREATE SCHEMA app1;
         CREATE TABLE app1.x (id int PRIMARY KEY);
         CREATE TABLE public.x (id int PRIMARY KEY);
         CREATE TABLE legacy (b bytea, at timestamptz, d date, iv interval, f float8,
                              ok bool, ip inet, code char(5), doc xml, tags text[],
                              r regclass, n text);
         ALTER TABLE legacy REPLICA IDENTITY FULL;
         CREATE SCHEMA pgapp;
         CREATE TABLE pgapp.orders (id int PRIMARY KEY, note text);",
    )
    .await;
    // Different on each side, as two clusters set up years apart would be.
    pair.source_client()
        .await
        .batch_execute(
            "ALTER DATABASE app SET bytea_output = 'escape';
             ALTER DATABASE app SET DateStyle = 'SQL, DMY';
             ALTER DATABASE app SET IntervalStyle = 'sql_standard';
             ALTER DATABASE app SET TimeZone = 'America/New_York';
             ALTER DATABASE app SET extra_float_digits = 0;
             ALTER DATABASE app SET search_path = app1, public;
             ALTER DATABASE app SET standard_conforming_strings = off;",
        )
        .await
        .unwrap();
    pair.target_client()
        .await
        .batch_execute(
            "ALTER DATABASE app SET DateStyle = 'German';
             ALTER DATABASE app SET IntervalStyle = 'iso_8601';
             ALTER DATABASE app SET TimeZone = 'Asia/Kolkata';
             ALTER DATABASE app SET extra_float_digits = 1;
             ALTER DATABASE app SET xmloption = document;
             ALTER DATABASE app SET array_nulls = off;
             ALTER DATABASE app SET standard_conforming_strings = off;",
        )
        .await
        .unwrap();
    let source = pair.source_client().await;
    // This test's own literals are written with standard strings.
    source
        .batch_execute("SET standard_conforming_strings = on")
        .await
        .unwrap();
    // One row through the copy.
    source
        .batch_execute(
            r#"INSERT INTO public.legacy VALUES
                 ('\x00'::bytea, '2026-11-21 23:30:00+00', '2026-01-01', '1 day', 2.5, true,
                  '10.9.9.9', 'C', 'fragment <i>copied</i>', '{z,NULL}', 'app1.x', 'copied');
               INSERT INTO pgapp.orders VALUES (1, 'copied');"#,
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n");
    let mut daemon = pair.start_daemon(&config).await;
    source
        .batch_execute(
            r#"INSERT INTO public.legacy VALUES
                 ('\x00015c27ff'::bytea, '2026-11-21 23:30:00.25+00', '2026-01-02', '-1 day 02:03:04.5', 0.1,
                  true, '10.1.2.3', 'AB', 'hello <b>world</b>', '{a,NULL}', 'app1.x', 'one'),
                 ('\x41'::bytea, '2026-03-08 07:00:00+00', '1999-12-31', '1 year 2 mons', 1.0000000000000002,
                  false, '10.0.0.0/8', 'abcde', NULL, '{}', 'public.x', 'two'),
                 (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'three'),
                 (NULL, NULL, NULL, NULL, NULL, false, '192.168.0.1', 'Z', NULL, NULL, NULL, 'four');"#,
        )
        .await
        .unwrap();
    pinned_compare(&pair, &daemon).await;
    source
        .batch_execute(
            "UPDATE public.legacy SET n = 'one updated' WHERE n = 'one';
             UPDATE public.legacy SET n = 'two updated' WHERE n = 'two';
             UPDATE public.legacy SET n = 'copied updated' WHERE n = 'copied';
             DELETE FROM public.legacy WHERE n = 'three';
             DELETE FROM public.legacy WHERE n = 'four';",
        )
        .await
        .unwrap();
    pinned_compare(&pair, &daemon).await;
    let names: Vec<String> = pair
        .target_client()
        .await
        .query("SELECT n FROM public.legacy ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["copied updated", "one updated", "two updated"]);
    // A schema named pg and one more character is a user schema under a legacy
    // standard_conforming_strings = off too: selected, copied and streamed.
    source
        .batch_execute(r"INSERT INTO pgapp.orders VALUES (2, 'stre\amed')")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    let orders: Vec<String> = pair
        .target_client()
        .await
        .query("SELECT note FROM pgapp.orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(orders, ["copied", r"stre\amed"]);
    // Each regclass names the table it named on the source, and NULL elements stayed NULL.
    let target = pair.target_client().await;
    let row = target
        .query_one(
            "SELECT r::oid = 'app1.x'::regclass::oid, tags[2] IS NULL
             FROM public.legacy WHERE n = 'one updated'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    let log = daemon.log();
    assert!(!log.contains("WARN"), "{log}");
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// Catches up, then compares `legacy` under the same output settings on both sides (each
/// database's own settings would make equal values read differently).
async fn pinned_compare(pair: &Pair, daemon: &crate::support::sluice::Daemon) {
    pair.wait_caught_up(daemon).await;
    let pin = "SET bytea_output = 'hex'; SET DateStyle = ISO; SET IntervalStyle = postgres;
               SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET search_path = '';";
    let source = pair.source_client().await;
    let target = pair.target_client().await;
    source.batch_execute(pin).await.unwrap();
    target.batch_execute(pin).await.unwrap();
    assert_eq!(
        crate::support::sluice::digest(&source, "public.legacy").await,
        crate::support::sluice::digest(&target, "public.legacy").await,
        "legacy differs between source and target"
    );
}

/// Databases that close idle sessions (`idle_session_timeout`, set by managed services and
/// careful DBAs): sluice's sessions are idle whenever the source is, and stay open through
/// a quiet spell instead of failing and reconnecting.
#[tokio::test(flavor = "multi_thread")]
async fn idle_session_timeouts_do_not_close_sluices_sessions() {
    let pair = Pair::with_schema("CREATE TABLE quiet (id int PRIMARY KEY, v text);").await;
    for client in [pair.source_client().await, pair.target_client().await] {
        client
            .batch_execute("ALTER DATABASE app SET idle_session_timeout = '300ms'")
            .await
            .unwrap();
    }
    let config = pair.config("");
    let mut daemon = pair.start_daemon(&config).await;
    let source = pair.source_client().await;
    source
        .batch_execute("INSERT INTO quiet VALUES (1, 'before')")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    // A quiet spell several times the timeout.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // The test's own session was closed meanwhile: it is the database's setting at work.
    assert!(source.batch_execute("SELECT 1").await.is_err());
    let source = pair.source_client().await;
    source
        .batch_execute(
            "SET idle_session_timeout = 0; INSERT INTO quiet VALUES (2, 'after the quiet spell')",
        )
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    let target = pair.target_client().await;
    let rows: i64 = target
        .query_one("SELECT count(*) FROM quiet", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
    assert!(daemon.terminate().success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        !log.contains("connection closed") && !log.contains("WARN"),
        "no session was closed under sluice: {log}"
    );
}

/// Legacy partitioning by inheritance: a parent and its children are tables of their own,
/// each published and applied on its own. A change the source made to the parent's row
/// must not reach a child's row on the target that has the same key, or, for rows matched
/// by all their values, the same ctid (each table's first row is at (0,1)); a `TRUNCATE
/// ONLY` of the parent must leave the children's rows.
#[tokio::test(flavor = "multi_thread")]
async fn changes_to_a_parent_by_inheritance_never_reach_its_childrens_rows() {
    let schema = "
        CREATE TABLE events (id int PRIMARY KEY, kind text);
        CREATE TABLE events_2019 (PRIMARY KEY (id)) INHERITS (events);
        CREATE TABLE notes (n int, t text);
        ALTER TABLE notes REPLICA IDENTITY FULL;
        CREATE TABLE notes_2019 () INHERITS (notes);
        ALTER TABLE notes_2019 REPLICA IDENTITY FULL;
        INSERT INTO events SELECT g, 'new' FROM generate_series(1, 10) g;
        INSERT INTO events_2019 SELECT g, 'old' FROM generate_series(1, 10) g;
        INSERT INTO notes VALUES (1, 'new'), (2, 'new');
        INSERT INTO notes_2019 VALUES (1, 'old'), (2, 'old');";
    let pair = Pair::with_schema(schema).await;
    // A child left out of the migration (and absent on the target) stays out of the
    // publication, though a publication of its parent would otherwise bring it in.
    pair.source_client()
        .await
        .batch_execute("CREATE TABLE events_archive () INHERITS (events)")
        .await
        .unwrap();
    let config = pair.config("[tables]\nexclude = [\"public.events_archive\"]\n");
    let daemon = pair.start_daemon(&config).await;
    pair.source_client()
        .await
        .batch_execute(
            "INSERT INTO events_archive VALUES (1, 'archived');
             UPDATE ONLY events SET kind = 'changed' WHERE id = 5;
             DELETE FROM ONLY events WHERE id = 6;
             UPDATE ONLY notes SET t = 'changed' WHERE n = 1;
             DELETE FROM ONLY notes WHERE n = 2;",
        )
        .await
        .unwrap();
    let tables = ["ONLY events", "events_2019", "ONLY notes", "notes_2019"];
    pair.catch_up_and_compare(&daemon, &tables).await;
    pair.source_client()
        .await
        .batch_execute("TRUNCATE ONLY events, ONLY notes")
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &tables).await;
    let children: i64 = pair
        .target_client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM events_2019) + (SELECT count(*) FROM notes_2019)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(children, 12, "the children's rows are all there");
    // verify reads each of them on its own too: a row only a child has on the target is
    // the child's difference, not its parent's.
    let (code, stdout, stderr) =
        crate::support::sluice::sluice(&["verify", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    pair.target_client()
        .await
        .batch_execute("INSERT INTO events_2019 VALUES (99, 'target only')")
        .await
        .unwrap();
    let (code, stdout, stderr) =
        crate::support::sluice::sluice(&["verify", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("OK public.events:"))
            && stdout
                .lines()
                .any(|l| l.starts_with("DIFF public.events_2019") && l.contains("id=99")),
        "{stdout}"
    );
}

/// A legacy source database in LATIN1 and a UTF8 target: the copy and the stream both
/// carry characters, not bytes (both sessions run with client_encoding UTF8, so the
/// source converts), and the target reads them back the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_latin1_source_arrives_intact_in_a_utf8_target() {
    let table = "CREATE TABLE t (id int PRIMARY KEY, v text, c char(5));";
    let pair = Pair::with_schema(table).await;
    pair.source
        .connect("postgres")
        .await
        .batch_execute(
            "CREATE DATABASE legacy ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .await
        .unwrap();
    let legacy = pair.source.connect("legacy").await;
    legacy
        .batch_execute(&format!(
            "{table} INSERT INTO t VALUES (1, 'café ñandú £ ü', 'äöü'), (2, repeat('é', 3000), 'ß');"
        ))
        .await
        .unwrap();
    let config = pair.config_named(
        "sluice",
        &pair.source.dsn("legacy"),
        &pair.target.dsn("app"),
        "",
    );
    let daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    legacy
        .batch_execute(
            "INSERT INTO t VALUES (3, 'résumé ÿ ¿qué?', 'àé');
             UPDATE t SET v = v || ' naïve' WHERE id = 1;",
        )
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    let rows = |client: tokio_postgres::Client| async move {
        client
            .query("SELECT id, v, c FROM t ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                )
            })
            .collect::<Vec<_>>()
    };
    let on_source = rows(pair.source.connect("legacy").await).await;
    assert_eq!(on_source[0].1, "café ñandú £ ü naïve");
    assert_eq!(on_source, rows(pair.target_client().await).await);

    // The other way, a character the target's encoding has no room for: refused, named.
    pair.source_client()
        .await
        .batch_execute("INSERT INTO t VALUES (1, 'price: 5 €', 'x')")
        .await
        .unwrap();
    pair.target
        .connect("postgres")
        .await
        .batch_execute(
            "CREATE DATABASE narrow ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .await
        .unwrap();
    pair.target
        .connect("narrow")
        .await
        .batch_execute(table)
        .await
        .unwrap();
    let narrow = pair.config_named(
        "narrow",
        &pair.source.dsn("app"),
        &pair.target.dsn("narrow"),
        "",
    );
    let mut refused = Daemon::spawn(&narrow, &pair.dir.path().join("narrow.log"));
    let status = refused.wait(std::time::Duration::from_secs(60));
    let log = refused.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("Copying public.t")
            && log.contains("has no equivalent in encoding \"LATIN1\"")
            && log.contains("create the target database in UTF8"),
        "{log}"
    );
}

/// A plain source table into a target partitioned by time (re-partitioning during the
/// migration): the copy fills the partitions through the root, and inserts, an update
/// that moves a row to another partition, deletes and a TRUNCATE follow it there.
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_source_table_streams_into_a_partitioned_target() {
    let pair = Pair::with_schema("").await;
    pair.source_client()
        .await
        .batch_execute(
            "CREATE TABLE events (id int PRIMARY KEY, at date NOT NULL, v text);
             INSERT INTO events SELECT g, date '2025-01-01' + g % 700, 'v' || g
                 FROM generate_series(1, 5000) g;",
        )
        .await
        .unwrap();
    pair.target_client()
        .await
        .batch_execute(
            "CREATE TABLE events (id int, at date NOT NULL, v text, PRIMARY KEY (id, at))
                 PARTITION BY RANGE (at);
             CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
             CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n");
    let daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    pair.source_client()
        .await
        .batch_execute(
            "INSERT INTO events VALUES (6000, '2026-06-01', 'new');
             UPDATE events SET at = '2026-02-02', v = 'moved' WHERE id = 10;
             UPDATE events SET v = 'same partition' WHERE id = 11;
             DELETE FROM events WHERE id = 12;",
        )
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &["events"]).await;
    let moved: String = pair
        .target_client()
        .await
        .query_one(
            "SELECT tableoid::regclass::text FROM events WHERE id = 10",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(moved, "events_2026");
    pair.source_client()
        .await
        .batch_execute("TRUNCATE events")
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &["events"]).await;
    let (code, stdout, stderr) =
        crate::support::sluice::sluice(&["verify", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// A publication made by the owner `FOR ALL TABLES` publishes more than `[tables]` selects:
/// the rest is not applied (the target's own table of that name keeps its rows), while the
/// partitions of a selected table are. A source `TRUNCATE ... CASCADE` empties on the target
/// only what the source names: a target-only table that refers to one of them stalls apply
/// instead of being emptied.
#[tokio::test(flavor = "multi_thread")]
async fn only_selected_tables_are_applied_and_truncate_never_cascades_further() {
    let pair = Pair::with_schema(
        "CREATE TABLE orders (id int PRIMARY KEY, note text);
         CREATE TABLE audit_logs (id int PRIMARY KEY, what text);
         CREATE TABLE events (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100);",
    )
    .await;
    let source = pair.source_client().await;
    let target = pair.target_client().await;
    source
        .batch_execute(
            "CREATE PUBLICATION sluice FOR ALL TABLES WITH (publish_via_partition_root = true)",
        )
        .await
        .unwrap();
    target
        .batch_execute("INSERT INTO audit_logs VALUES (1, 'the target''s own')")
        .await
        .unwrap();
    let config = pair.config(
        "[tables]\ninclude = [\"public.orders\", \"public.events\"]\nexclude = [\"public.audit_logs\"]\n",
    );
    let mut daemon = pair.start_daemon(&config).await;
    source
        .batch_execute(
            "INSERT INTO orders VALUES (1, 'a'), (2, 'b'), (3, 'c');
             INSERT INTO audit_logs VALUES (1, 'source'), (2, 'source');
             UPDATE audit_logs SET what = 'changed' WHERE id = 1;
             INSERT INTO events VALUES (1, 5), (2, 50);
             TRUNCATE orders, audit_logs;
             INSERT INTO orders VALUES (10, 'after');
             INSERT INTO audit_logs VALUES (3, 'source');
             DELETE FROM events WHERE id = 2;",
        )
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &["orders", "events"])
        .await;
    let audit: Vec<String> = target
        .query("SELECT id || ':' || what FROM audit_logs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audit, ["1:the target's own"]);
    let log = daemon.log();
    assert!(
        log.contains("the publication publishes a table [tables] does not select")
            && log.contains("public.audit_logs"),
        "{log}"
    );
    assert!(!log.contains("table=public.events_1"), "{log}");

    // A table only the target has, referring to orders.
    target
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, order_id int REFERENCES orders (id));
             INSERT INTO notes VALUES (1, 10);",
        )
        .await
        .unwrap();
    source
        .batch_execute("TRUNCATE orders CASCADE; INSERT INTO orders VALUES (20, 'later');")
        .await
        .unwrap();
    daemon.wait_for_log("apply stalled").await;
    let notes: i64 = target
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(notes, 1, "the target-only table kept its row");
    target
        .batch_execute("ALTER TABLE notes DROP CONSTRAINT notes_order_id_fkey")
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &["orders", "events"])
        .await;
    let notes: i64 = target
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(notes, 1);
    assert!(daemon.terminate().success(), "{}", daemon.log());
}
