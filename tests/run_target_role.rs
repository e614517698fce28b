//! A target user who may not `SET session_replication_role = replica` (managed services,
//! least-privilege migration roles): the target's triggers and foreign keys then act on
//! sluice's writes. Triggers would make the target differ without an error, so the start is
//! refused; foreign keys only need the copy to load referenced rows first.

use std::time::Duration;

use crate::support::sluice::{sluice, Daemon, Pair};

const SCHEMA: &str = "
CREATE TABLE customers (id int PRIMARY KEY, name text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, note text,
                     updated_at timestamptz);
";

/// Both clusters with SCHEMA and rows on the source; on the target the tables belong to
/// `writer`, an ordinary role. `customers` is much larger than `orders`, whose rows refer to
/// its last ids, so a parallel copy finishes `orders` first.
async fn pair_with_a_plain_target_user() -> Pair {
    let pair = Pair::with_schema(SCHEMA).await;
    pair.source_client()
        .await
        .batch_execute(
            "INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 300000) g;
             INSERT INTO orders SELECT g, 300000 - g, 'order ' || g, '2020-01-01 00:00+00'
             FROM generate_series(1, 2000) g;",
        )
        .await
        .unwrap();
    pair.target_client()
        .await
        .batch_execute(
            "CREATE ROLE writer LOGIN;
             GRANT CREATE ON DATABASE app TO writer;
             ALTER TABLE customers OWNER TO writer;
             ALTER TABLE orders OWNER TO writer;",
        )
        .await
        .unwrap();
    pair
}

/// A config whose target user is `writer`; `name` keeps its slot, publication and state
/// apart from other configs in the same pair; `extra` goes under `[copy]`.
fn config_as_writer(pair: &Pair, name: &str, extra: &str) -> std::path::PathBuf {
    pair.config_named(
        name,
        &pair.source.dsn("app"),
        &format!(
            "host=127.0.0.1 port={} user=writer dbname=app",
            pair.target.port
        ),
        &format!("[copy]\n{extra}"),
    )
}

async fn source_objects(pair: &Pair) -> (i64, i64) {
    let row = pair
        .source_client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots),
                    (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// An `updated_at` trigger would have stamped every copied row with the time of the copy (and
/// a rule `ON DELETE DO INSTEAD NOTHING` swallowed every delete):
/// the target would differ from the source and nothing would say so. `check` fails and `run`
/// refuses (before anything exists on the source), naming the trigger and the fixes; with
/// the role granted, the copy leaves the rows as the source has them.
#[tokio::test(flavor = "multi_thread")]
async fn triggers_that_would_rewrite_copied_rows_refuse_the_start_until_the_role_is_granted() {
    let pair = pair_with_a_plain_target_user().await;
    let target = pair.target_client().await;
    target
        .batch_execute(
            "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
             CREATE TRIGGER touch BEFORE INSERT OR UPDATE ON orders
                 FOR EACH ROW EXECUTE FUNCTION touch();
             CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RETURN NULL; END $$;
             CREATE TRIGGER replica_only AFTER INSERT ON customers
                 FOR EACH ROW EXECUTE FUNCTION nothing();
             ALTER TABLE customers ENABLE REPLICA TRIGGER replica_only;
             CREATE RULE keep AS ON DELETE TO customers DO INSTEAD NOTHING;",
        )
        .await
        .unwrap();
    let config = config_as_writer(&pair, "sluice", "jobs = 2");
    let config = config.to_str().unwrap();

    let (code, stdout, _) = sluice(&["check", "--config", config]);
    assert_eq!(code, 1, "{stdout}");
    let fail = stdout
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("session_replication_role"))
        .unwrap_or_else(|| panic!("{stdout}"));
    for expected in [
        "public.orders: trigger touch would fire",
        "public.customers: rule keep would fire; trigger replica_only (ENABLE REPLICA) would not fire",
        "ALTER TABLE \"public\".\"customers\" DISABLE RULE \"keep\"",
        "GRANT SET ON PARAMETER session_replication_role TO \"writer\"",
        "ALTER TABLE \"public\".\"orders\" DISABLE TRIGGER \"touch\"",
    ] {
        assert!(fail.contains(expected), "{expected}: {fail}");
    }

    // Spawned, not run to completion: a start that is not refused would run for ever.
    let mut refused = Daemon::spawn(
        std::path::Path::new(config),
        &pair.dir.path().join("refused.log"),
    );
    let status = refused.wait(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "run was not refused:\n{}",
        refused.log()
    );
    assert!(
        refused
            .log()
            .contains("public.orders: trigger touch would fire"),
        "{}",
        refused.log()
    );
    assert_eq!(
        source_objects(&pair).await,
        (0, 0),
        "a refused start created a slot or a publication"
    );

    pair.target_client()
        .await
        .batch_execute("GRANT SET ON PARAMETER session_replication_role TO writer")
        .await
        .unwrap();
    let (code, stdout, _) = sluice(&["check", "--config", config]);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("PASS")
                && l.contains("may SET session_replication_role = replica")),
        "{code} {stdout}"
    );
    let daemon = pair.start_daemon(std::path::Path::new(config)).await;
    pair.source_client()
        .await
        .batch_execute("UPDATE orders SET note = 'changed' WHERE id = 7")
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &["customers", "orders"])
        .await;
    let stamped: i64 = target
        .query_one(
            "SELECT count(*) FROM orders WHERE updated_at <> '2020-01-01 00:00+00'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stamped, 0, "the trigger fired on sluice's writes");
}

/// Without the role the target checks foreign keys as rows arrive, and the copy runs tables
/// in parallel: `orders`, smaller, would finish before the `customers` it refers to had
/// committed. The copy reads the target's foreign keys and copies a table after those it
/// refers to; a table that refers to itself is copied whole (its chunks would each wait for
/// another's rows); two tables that refer to each other are tried one by one, and the one a
/// foreign key refuses is copied again once the other is in. Rows that refer to a table
/// outside the copy can never be loaded: the copy stops naming the foreign key and the fixes.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_replica_role_tables_are_copied_after_those_their_foreign_keys_refer_to() {
    let pair = pair_with_a_plain_target_user().await;

    let outside = config_as_writer(
        &pair,
        "outside",
        "jobs = 2\n[tables]\nexclude = [\"public.customers\"]",
    );
    let mut stopped = Daemon::spawn(&outside, &pair.dir.path().join("outside.log"));
    let status = stopped.wait(Duration::from_secs(60));
    let stderr = stopped.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    for expected in [
        "violates foreign key constraint \"orders_customer_id_fkey\"",
        "No chunk still being copied can supply the rows it refers to",
        "GRANT SET ON PARAMETER session_replication_role",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    let source = pair.source_client().await;
    source
        .batch_execute("SELECT pg_drop_replication_slot('outside'); DROP PUBLICATION outside;")
        .await
        .unwrap();

    // A tree whose rows refer to rows in every part of the table (no chunk can go first),
    // and two tables that refer to each other, one of them with no references filled in.
    let more = "CREATE TABLE nodes (id int PRIMARY KEY, parent int REFERENCES nodes, label text);
                CREATE TABLE teams (id int PRIMARY KEY, lead int, name text);
                CREATE TABLE people (id int PRIMARY KEY, team int REFERENCES teams, name text);
                ALTER TABLE teams ADD FOREIGN KEY (lead) REFERENCES people;";
    source.batch_execute(more).await.unwrap();
    source
        .batch_execute(
            "INSERT INTO nodes SELECT g, (g + 50000) % 100000 + 1, repeat('n', 300)
                 FROM generate_series(1, 100000) g;
             INSERT INTO teams SELECT g, NULL, 'team ' || g FROM generate_series(1, 50) g;
             INSERT INTO people SELECT g, g % 50 + 1, repeat('p', 40)
                 FROM generate_series(1, 20000) g;
             ANALYZE;",
        )
        .await
        .unwrap();
    let target = pair.target_client().await;
    target.batch_execute(more).await.unwrap();
    target
        .batch_execute(
            "ALTER TABLE nodes OWNER TO writer; ALTER TABLE teams OWNER TO writer;
             ALTER TABLE people OWNER TO writer;",
        )
        .await
        .unwrap();

    // Four jobs: every table starts at once unless something holds it back; chunks of
    // 20 MB: all but nodes are copied whole anyway.
    let config = config_as_writer(
        &pair,
        "sluice",
        "jobs = 4\nsplit_tables_larger_than = \"20MB\"",
    );
    let (code, stdout, _) = sluice(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("WARN")
            && l.contains("\"writer\" may not SET session_replication_role = replica")),
        "{stdout}"
    );
    let daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    let log = daemon.log();
    let copied_at = |table: &str| {
        log.find(&format!("table copied table=public.{table} "))
            .unwrap_or_else(|| panic!("{table} not copied:\n{log}"))
    };
    assert!(copied_at("customers") < copied_at("orders"), "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("refused rows") && l.contains("chunk=public.orders")),
        "orders was started before customers was copied:\n{log}"
    );
    assert!(
        log.contains("whole: its rows refer to its own rows"),
        "nodes was not copied whole:\n{log}"
    );
    // people (larger) was tried first and refused, then copied after teams.
    assert!(
        log.contains("a foreign key on the target refused rows that refer to rows not copied yet")
            && copied_at("teams") < copied_at("people"),
        "{log}"
    );
    source
        .batch_execute(
            "INSERT INTO customers VALUES (300001, 'new');
             INSERT INTO orders VALUES (5000, 300001, 'new', '2020-01-01 00:00+00');
             UPDATE nodes SET parent = 1 WHERE id = 2;",
        )
        .await
        .unwrap();
    pair.catch_up_and_compare(
        &daemon,
        &["customers", "orders", "nodes", "teams", "people"],
    )
    .await;
}

/// A target user without CREATE on the database, for whom an administrator created schema
/// sluice (what `check` offers instead of the GRANT): `check` passes and so does `run`
/// (`CREATE SCHEMA IF NOT EXISTS` checks the database privilege even when the schema exists).
#[tokio::test(flavor = "multi_thread")]
async fn a_sluice_schema_created_by_an_administrator_is_used_without_create_on_the_database() {
    let pair = pair_with_a_plain_target_user().await;
    pair.target_client()
        .await
        .batch_execute(
            "REVOKE CREATE ON DATABASE app FROM writer;
             CREATE SCHEMA sluice AUTHORIZATION writer;",
        )
        .await
        .unwrap();
    let config = config_as_writer(&pair, "sluice", "enabled = true\n");
    let (code, stdout, stderr) = sluice(&["check", "--config", config.to_str().unwrap()]);
    assert!(stdout.contains("\n0 FAIL"), "{stdout}{stderr}");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let log = pair.dir.path().join("run.log");
    let daemon = Daemon::spawn(&config, &log);
    daemon.wait_for_log("initial copy finished").await;
    pair.source_client()
        .await
        .batch_execute("INSERT INTO customers VALUES (300001, 'streamed')")
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &["customers", "orders"])
        .await;
}

/// A source user without REPLICATION: `run` says so before creating anything on the source
/// (the publication was left behind by a start that failed only at the slot).
#[tokio::test(flavor = "multi_thread")]
async fn a_source_user_that_may_not_replicate_is_refused_before_anything_is_created() {
    let pair = Pair::with_schema(SCHEMA).await;
    pair.source_client()
        .await
        .batch_execute(
            "CREATE ROLE reader LOGIN;
             GRANT CREATE ON DATABASE app TO reader;
             GRANT SELECT ON customers, orders TO reader;
             ALTER TABLE customers OWNER TO reader;
             ALTER TABLE orders OWNER TO reader;",
        )
        .await
        .unwrap();
    let config = pair.config_named(
        "sluice",
        &format!(
            "host=127.0.0.1 port={} user=reader dbname=app",
            pair.source.port
        ),
        &pair.target.dsn("app"),
        "",
    );
    let (code, stdout, stderr) = sluice(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("The source user reader may not replicate")
            && stderr.contains(r#"ALTER ROLE "reader" REPLICATION"#),
        "{stderr}"
    );
    assert_eq!(source_objects(&pair).await, (0, 0));
}

/// No replication slot free for the new one: refused before the publication is created
/// (a start that failed only at the slot left it behind).
#[tokio::test(flavor = "multi_thread")]
async fn no_free_slot_is_refused_before_anything_is_created() {
    let pair = Pair::with_schema(SCHEMA).await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "SELECT pg_create_physical_replication_slot('taken_' || g)
             FROM generate_series(1, current_setting('max_replication_slots')::int) g",
        )
        .await
        .unwrap();
    let config = pair.config("");
    let (code, stdout, stderr) = sluice(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("No free replication slot on the source for slot sluice"),
        "{stderr}"
    );
    let publications: i64 = source
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0);
}
