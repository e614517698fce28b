//! `sluice run` from an empty target: the initial copy, then streaming from its consistent
//! point, with writes during the copy and a kill -9 in the middle of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::exists;
use crate::support::sluice::{sluice, Daemon, Pair};

const SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, customer int NOT NULL, amount numeric(12,2), note text);
CREATE TABLE events (id bigserial PRIMARY KEY, order_id bigint, kind text, at timestamptz DEFAULT now());
CREATE TABLE tags (name text, weight int);
ALTER TABLE tags REPLICA IDENTITY FULL;
";

async fn seed(pair: &Pair) {
    pair.source_client()
        .await
        .batch_execute(
            "INSERT INTO orders SELECT g, g % 977, g / 7.0, repeat(md5(g::text), 3) FROM generate_series(1, 200000) g;
             INSERT INTO events (order_id, kind) SELECT g, 'created' FROM generate_series(1, 50000) g;
             INSERT INTO tags SELECT 'tag' || (g % 50), g FROM generate_series(1, 1000) g;
             ANALYZE;",
        )
        .await
        .unwrap();
}

/// Runs the transaction `transaction(n)` on the source, n = 0, 1, ..., every 5 ms until
/// stopped; returns how many ran.
fn write_until_stopped(
    pair: &Pair,
    stop: Arc<AtomicBool>,
    transaction: impl Fn(i64) -> String + Send + 'static,
) -> tokio::task::JoinHandle<u64> {
    let dsn = pair.source.dsn("app");
    tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            client.batch_execute(&transaction(n as i64)).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

/// Writes to every table until stopped.
fn writer(pair: &Pair, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    write_until_stopped(pair, stop, |n| {
        let id = 200_000 + n + 1;
        let victim = fastrand::i64(1..200_000);
        format!(
            "BEGIN;
             INSERT INTO orders VALUES ({id}, 1, 9.99, 'new');
             UPDATE orders SET amount = amount + 1 WHERE id = {victim};
             INSERT INTO events (order_id, kind) VALUES ({victim}, 'paid');
             DELETE FROM tags WHERE ctid = (SELECT ctid FROM tags LIMIT 1);
             COMMIT;"
        )
    })
}

/// The statements on the target that wait for a lock, as `query` text.
async fn waiting_on_locks(target: &tokio_postgres::Client) -> Vec<String> {
    target
        .query(
            "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits until a statement of the daemon's waits for a lock the test holds.
async fn wait_until_waiting(target: &tokio_postgres::Client, needle: &str, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !waiting_on_locks(target)
        .await
        .iter()
        .any(|query| query.contains(needle))
    {
        assert!(
            Instant::now() < deadline,
            "nothing waits on {needle}:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stopped or killed daemon leaves no statement behind on the target: one left waiting
/// for a lock would run to its end (a key build of hours) and hold the next start up.
async fn assert_nothing_left_waiting(target: &tokio_postgres::Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = waiting_on_locks(target).await;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still on the target after sluice stopped: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn assert_all_same(pair: &Pair) {
    for table in ["orders", "events", "tags"] {
        pair.assert_same(table).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_copy_and_the_stream_meet_without_gap_or_overlap() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config =
        pair.config("[copy]\nenabled = true\njobs = 2\nsplit_tables_larger_than = \"1MB\"\n");
    let stop = Arc::new(AtomicBool::new(false));
    let load = writer(&pair, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = load.await.unwrap();
    assert!(written > 10, "writes ran during the copy ({written})");
    pair.wait_caught_up(&daemon).await;
    assert_all_same(&pair).await;
    let (code, out, err) = sluice(&["status", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "streaming", "{out}");
    let orders = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.orders")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(orders["state"], "streaming", "{out}");
    let rows_copied = orders["rows_copied"].as_u64().unwrap();
    assert!(rows_copied >= 200_000, "{out}");
    // The copied tables get statistics (a manual ANALYZE, not autovacuum's).
    daemon.wait_for_log("analyzed the copied tables").await;
    // Before streaming: a batched UPDATE planned on the statistics of a table analyzed
    // while empty scanned the whole table once per row.
    let log = daemon.log();
    assert!(
        log.find("analyzed the copied tables") < log.find("streaming slot="),
        "{log}"
    );
    let mut daemon = daemon;
    let analyzed: i64 = pair
        .target_client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname IN ('orders', 'events', 'tags') AND last_analyze IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(analyzed, 3, "{}", daemon.log());

    // After a restart the running daemon still shows what the copy copied.
    assert!(daemon.terminate().success(), "{}", daemon.log());
    let _daemon = pair.start_daemon(&config).await;
    let (code, out, err) = sluice(&["status", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(status["pid"].is_u64(), "not the daemon's answer: {out}");
    let orders = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.orders")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(orders["rows_copied"].as_u64(), Some(rows_copied), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_killed_midway_resumes_and_ends_exactly_once() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config =
        pair.config("[copy]\nenabled = true\njobs = 1\nsplit_tables_larger_than = \"512kB\"\n");
    let stop = Arc::new(AtomicBool::new(false));
    let load = writer(&pair, stop.clone());
    let mut daemon = pair.start_daemon(&config).await;
    // Kill it while chunks are being copied (some recorded as finished, some not).
    let target = pair.target_client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copied: i64 = target
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .unwrap()
            .get(0);
        if copied > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy never started:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill9();
    let daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    pair.wait_caught_up(&daemon).await;
    assert_all_same(&pair).await;
}

/// A sluice killed while its new slot waited for the source's open transactions leaves the
/// slot half made, held by the dying session's walsender until they end. The next start
/// waits for it (retried, as a slot held by a dying session is) instead of exiting with
/// advice to drop a slot that cannot be dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_left_half_made_by_a_killed_start_is_waited_for() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\n");
    let open = pair.source.connect("app").await;
    open.batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first
        .wait_for_log("creating the replication slot waits for transactions")
        .await;
    first.kill9();
    let mut second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("is still being created by session")
        .await;
    assert!(
        second.wait(Duration::from_secs(2)).is_none(),
        "the second start gave up:\n{}",
        second.log()
    );
    open.batch_execute("COMMIT").await.unwrap();
    second.wait_for_log("initial copy finished").await;
    stream_and_compare(&pair, &second, "INSERT INTO tags VALUES ('after', 1)").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_the_copy_stops_promptly_and_the_next_start_finishes_it() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 1\n");
    // Hold the copy up at one table (SHARE blocks its COPY, not the checks that read it):
    // the copy is provably in the middle when asked to stop.
    let blocker = hold_lock(&pair, "LOCK TABLE events IN SHARE MODE").await;
    // Not start_daemon: the slot is not active while the copy holds its snapshot.
    let mut daemon = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    daemon.wait_for_log("planned").await;
    let target = pair.target_client().await;
    wait_until_waiting(&target, "COPY", &daemon).await;
    daemon.terminate_within(Duration::from_secs(15));
    assert!(
        daemon
            .log()
            .contains("stopping in the middle of the initial copy"),
        "{}",
        daemon.log()
    );
    assert_nothing_left_waiting(&target).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    // Started with the copy turned off, it would stream into tables missing rows (and a
    // later start with the copy on would never resume it): refused, naming them.
    let off = pair.dir.path().join("copy-off.toml");
    std::fs::write(
        &off,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("enabled = true", "enabled = false"),
    )
    .unwrap();
    let (code, _, stderr) = sluice(&["run", "--config", off.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("records an initial copy from slot sluice that has not finished")
            && stderr.contains("public.events"),
        "{stderr}"
    );
    let daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&daemon).await;
    assert_all_same(&pair).await;
}

const SCHEMA_WITH_KEYS: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, customer int NOT NULL, amount numeric(12,2), note text);
CREATE INDEX orders_customer_idx ON orders (customer);
CREATE TABLE events (id bigserial PRIMARY KEY, order_id bigint REFERENCES orders (id), kind text, at timestamptz DEFAULT now());
CREATE TABLE tags (name text, weight int);
ALTER TABLE tags REPLICA IDENTITY FULL;
";

/// A pair whose target is empty: `sluice schema` creates it (primary keys deferred).
async fn pair_through_sluice_schema(config_extra: &str) -> (Pair, std::path::PathBuf) {
    let pair = Pair::with_schema("").await;
    pair.source_client()
        .await
        .batch_execute(SCHEMA_WITH_KEYS)
        .await
        .unwrap();
    seed(&pair).await;
    let config = pair.config(config_extra);
    let (code, out, err) = sluice(&["schema", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // Keys are deferred only when the copy will load the tables.
    let keys_deferred = !config_extra.contains("enabled = false");
    assert_eq!(
        out.contains("DEFERRED CONSTRAINT public.orders orders_pkey"),
        keys_deferred,
        "{out}"
    );
    assert!(
        out.contains("DEFERRED INDEX public.orders_customer_idx"),
        "{out}"
    );
    (pair, config)
}

/// A table copied again under a later snapshot (sluice killed in the middle of its copy)
/// holds rows whose referenced rows, in a table copied before the kill, arrive only by
/// streaming: its deferred foreign key failed to build, and so did every restart, with
/// advice to delete the "orphans". It is created NOT VALID and validated once streaming has
/// passed that table's sync position.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_key_over_tables_of_two_snapshots_is_validated_after_catching_up() {
    let pair = Pair::with_schema("").await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "CREATE TABLE customers (id bigint PRIMARY KEY, name text);
             CREATE TABLE orders (id bigint PRIMARY KEY,
                                  customer_id bigint NOT NULL REFERENCES customers (id), note text);
             INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 30000) g;
             INSERT INTO orders SELECT g, g, 'o' FROM generate_series(1, 3000) g;",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\njobs = 1\n");
    let (code, out, err) = sluice(&["schema", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("DEFERRED FK CONSTRAINT public.orders"),
        "{out}"
    );
    // orders (copied after the larger customers) is held up on the target, so the kill
    // lands in the middle of its copy.
    let blocker = hold_lock(&pair, "LOCK TABLE orders IN SHARE MODE").await;
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first
        .wait_for_log("table copied table=public.customers")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.kill9();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    // Made while sluice is down: the order comes with orders' second copy, its customer only
    // by streaming.
    source
        .batch_execute(
            "BEGIN;
             INSERT INTO customers VALUES (90001, 'new');
             INSERT INTO orders VALUES (90001, 90001, 'new');
             COMMIT;",
        )
        .await
        .unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second.wait_for_log("initial copy finished").await;
    assert!(
        second.log().contains("foreign key created NOT VALID"),
        "{}",
        second.log()
    );
    second.wait_for_log("validated the foreign key").await;
    pair.wait_caught_up(&second).await;
    let validated: bool = pair
        .target_client()
        .await
        .query_one(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(validated);
    pair.assert_same("customers").await;
    pair.assert_same("orders").await;
}

/// Takes `lock` (`LOCK TABLE t IN ... MODE`) on the target in a transaction that lasts
/// until the returned client commits: holds a table's copy (SHARE) or its key build (ROW
/// EXCLUSIVE) up, so a test can act while sluice provably waits.
async fn hold_lock(pair: &Pair, lock: &str) -> tokio_postgres::Client {
    let blocker = pair.target_client().await;
    blocker
        .batch_execute(&format!("BEGIN; {lock}"))
        .await
        .unwrap();
    blocker
}

/// Writes `sql` on the source, waits for the daemon to apply it, compares every table.
async fn stream_and_compare(pair: &Pair, daemon: &Daemon, sql: &str) {
    pair.source_client().await.batch_execute(sql).await.unwrap();
    pair.wait_caught_up(daemon).await;
    assert_all_same(pair).await;
}

/// Starts the daemon again and checks that it copies nothing `copied_before` names again
/// (a log needle), then that it streams.
async fn restart_without_copying_again(
    pair: &Pair,
    config: &std::path::Path,
    copied_before: &str,
) -> Daemon {
    let daemon = pair.start_daemon(config).await;
    let log = daemon.log();
    assert!(!log.contains(copied_before), "copied again:\n{log}");
    stream_and_compare(
        pair,
        &daemon,
        "UPDATE orders SET note = 'after' WHERE id <= 10",
    )
    .await;
    daemon
}

const EVERY_DEFERRED_STATEMENT_APPLIED: &str =
    "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM sluice.deferred_ddl WHERE applied_at IS NULL)";

/// Waits until the target has the primary key of orders.
async fn wait_for_orders_key(target: &tokio_postgres::Client, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !exists(
        target,
        "SELECT 1 FROM pg_constraint WHERE conname = 'orders_pkey'",
    )
    .await
    {
        assert!(
            Instant::now() < deadline,
            "the key of orders was not built while tags was held:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_built_per_table_during_the_copy_and_streaming_uses_them() {
    let (pair, config) = pair_through_sluice_schema("[copy]\nenabled = true\njobs = 2\n").await;
    // The key of orders must appear while the copy is provably not over.
    let blocker = hold_lock(&pair, "LOCK TABLE tags IN SHARE MODE").await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = writer(&pair, stop.clone());
    let daemon = Daemon::spawn(&config, &pair.dir.path().join("sluice.log"));
    let target = pair.target_client().await;
    wait_for_orders_key(&target, &daemon).await;
    assert!(
        !daemon.log().contains("initial copy finished"),
        "{}",
        daemon.log()
    );
    // Foreign keys wait for every table.
    assert!(
        !exists(&target, "SELECT 1 FROM pg_constraint WHERE contype = 'f'").await,
        "{}",
        daemon.log()
    );
    blocker.batch_execute("COMMIT").await.unwrap();
    daemon.wait_for_log("initial copy finished").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    pair.wait_caught_up(&daemon).await;
    assert_all_same(&pair).await;
    for (what, sql) in [
        ("every deferred statement applied", EVERY_DEFERRED_STATEMENT_APPLIED),
        ("the key of events", "SELECT 1 FROM pg_constraint WHERE conname = 'events_pkey'"),
        ("the index of orders", "SELECT 1 FROM pg_index WHERE indexrelid = 'orders_customer_idx'::regclass AND indisvalid"),
        ("the foreign key, validated", "SELECT 1 FROM pg_constraint WHERE contype = 'f' AND convalidated"),
    ] {
        assert!(exists(&target, sql).await, "{what}:\n{}", daemon.log());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_deferred_index_lets_the_copy_finish_then_stops_with_its_name() {
    let (pair, config) = pair_through_sluice_schema("[copy]\nenabled = true\njobs = 2\n").await;
    // A unique index over tags.name, which repeats: it can only fail.
    let target = pair.target_client().await;
    target
        .batch_execute(
            "INSERT INTO sluice.deferred_ddl (statement, table_name) VALUES
             (E'-- INDEX public.tags_name_uq\\nCREATE UNIQUE INDEX tags_name_uq ON public.tags (name);', '\"public\".\"tags\"')",
        )
        .await
        .unwrap();
    let mut daemon = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    let status = daemon
        .wait(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("sluice kept running:\n{}", daemon.log()));
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("INDEX public.tags_name_uq"), "{log}");
    assert!(log.contains("the copy goes on"), "{log}");
    // Every table's data is there, and recorded: the next start copies nothing again.
    for table in ["orders", "events", "tags"] {
        pair.assert_same(table).await;
    }
    // The operator drops the statement (or fixes the data), and starts again.
    target
        .batch_execute("DELETE FROM sluice.deferred_ddl WHERE statement LIKE '%tags_name_uq%'")
        .await
        .unwrap();
    restart_without_copying_again(&pair, &config, "planned").await;
    assert!(
        exists(
            &target,
            "SELECT 1 FROM pg_constraint WHERE contype = 'f' AND convalidated"
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_while_keys_are_being_built_resumes_without_copying_finished_tables_again() {
    let (pair, config) = pair_through_sluice_schema("[copy]\nenabled = true\njobs = 2\n").await;
    let blocker = hold_lock(&pair, "LOCK TABLE tags IN SHARE MODE").await;
    let mut daemon = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    let target = pair.target_client().await;
    wait_for_orders_key(&target, &daemon).await;
    wait_until_waiting(&target, "COPY", &daemon).await;
    daemon.kill9();
    // The copy of tags, waiting for the lock, does not outlive the daemon.
    assert_nothing_left_waiting(&target).await;
    let first = daemon.log();
    assert!(first.contains("planned table=public.orders"), "{first}");
    assert!(first.contains("orders_pkey"), "{first}");
    // With the daemon down, status reads the copy's records: orders done, tags to redo.
    let (code, out, err) = sluice(&["status", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let table = |name: &str| {
        status["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {out}"))
            .clone()
    };
    assert_eq!(table("public.orders")["state"], "copied", "{out}");
    assert_eq!(table("public.orders")["rows_copied"], 200_000, "{out}");
    assert_eq!(table("public.tags")["state"], "pending", "{out}");
    assert_eq!(table("public.tags")["rows_copied"], 0, "{out}");
    blocker.batch_execute("COMMIT").await.unwrap();
    let daemon = pair.start_daemon(&config).await;
    let log = daemon.log();
    // orders was recorded copied before its key was built: it is not copied again, and
    // its key is not built twice.
    assert!(!log.contains("planned table=public.orders"), "{log}");
    assert!(!log.contains("orders_pkey"), "{log}");
    stream_and_compare(
        &pair,
        &daemon,
        "UPDATE orders SET note = 'after' WHERE id <= 10; DELETE FROM tags WHERE weight < 5",
    )
    .await;
    assert!(exists(&target, EVERY_DEFERRED_STATEMENT_APPLIED).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_key_build_ends_it_on_the_target_and_the_next_start_builds_it() {
    let (pair, config) = pair_through_sluice_schema("[copy]\nenabled = true\njobs = 2\n").await;
    // ROW EXCLUSIVE lets the copy of orders in and keeps its key build out.
    let blocker = hold_lock(&pair, "LOCK TABLE orders IN ROW EXCLUSIVE MODE").await;
    let mut daemon = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    let target = pair.target_client().await;
    wait_until_waiting(&target, "orders", &daemon).await;
    // Every table says copied; status names what is being built meanwhile.
    let (code, out, err) = sluice(&["status", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let building: Vec<&str> = status["building"]
        .as_array()
        .unwrap_or_else(|| panic!("no building: {out}"))
        .iter()
        .map(|b| b["statement"].as_str().unwrap())
        .collect();
    assert!(building.iter().any(|b| b.contains("orders")), "{out}");
    let (_, text, _) = sluice(&["status", "--config", config.to_str().unwrap()]);
    assert!(text.contains("building"), "{text}");
    daemon.terminate_within(Duration::from_secs(15));
    assert_nothing_left_waiting(&target).await;
    assert!(
        !exists(
            &target,
            "SELECT 1 FROM pg_constraint WHERE conname = 'orders_pkey'"
        )
        .await,
        "{}",
        daemon.log()
    );
    blocker.batch_execute("COMMIT").await.unwrap();
    let daemon = restart_without_copying_again(&pair, &config, "planned table=public.orders").await;
    assert!(
        exists(&target, EVERY_DEFERRED_STATEMENT_APPLIED).await,
        "{}",
        daemon.log()
    );
    assert!(
        exists(
            &target,
            "SELECT 1 FROM pg_constraint WHERE conname = 'orders_pkey'"
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_run_builds_deferred_indexes_with_the_copy_off_stops_at_once() {
    let (pair, config) = pair_through_sluice_schema("[copy]\nenabled = false\n").await;
    let blocker = hold_lock(&pair, "LOCK TABLE orders IN ROW EXCLUSIVE MODE").await;
    let mut daemon = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    let target = pair.target_client().await;
    wait_until_waiting(&target, "orders_customer_idx", &daemon).await;
    daemon.terminate_within(Duration::from_secs(15));
    assert_nothing_left_waiting(&target).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    let daemon = pair.start_daemon(&config).await;
    // The copy is off, so the target holds only what streams from now on.
    pair.source_client()
        .await
        .batch_execute("INSERT INTO orders VALUES (900001, 1, 1, 'after the stop')")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    for (what, sql) in [
        ("the streamed row", "SELECT 1 FROM orders WHERE id = 900001"),
        (
            "every deferred statement applied",
            EVERY_DEFERRED_STATEMENT_APPLIED,
        ),
    ] {
        assert!(exists(&target, sql).await, "{what}:\n{}", daemon.log());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_is_copied_partition_by_partition_while_rows_move_between_them() {
    let pair = Pair::with_schema(
        "CREATE TABLE readings (id bigint, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE readings_eu PARTITION OF readings FOR VALUES IN ('eu');
         CREATE TABLE readings_us PARTITION OF readings FOR VALUES IN ('us');
         CREATE TABLE readings_other PARTITION OF readings DEFAULT;",
    )
    .await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "INSERT INTO readings SELECT g, CASE WHEN g % 10 = 0 THEN 'us' WHEN g % 10 = 1 THEN 'jp' ELSE 'eu' END, repeat(md5(g::text), 4)
             FROM generate_series(1, 150000) g;
             ANALYZE readings;",
        )
        .await
        .unwrap();
    let config =
        pair.config("[copy]\nenabled = true\njobs = 2\nsplit_tables_larger_than = \"4MB\"\n");
    // Rows change partition (a new region) while the copy runs.
    let stop = Arc::new(AtomicBool::new(false));
    let dsn = pair.source.dsn("app");
    let mover = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = fastrand::i64(1..150_000);
                client
                    .batch_execute(&format!(
                        "UPDATE readings SET region = (ARRAY['eu','us','jp'])[1 + {id} % 3], v = 'moved' WHERE id = {id};
                         INSERT INTO readings VALUES ({}, 'us', 'new');",
                        150_000 + n as i64 + 1
                    ))
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    stop.store(true, Ordering::Relaxed);
    let moved = mover.await.unwrap();
    assert!(moved > 10, "rows moved during the copy ({moved})");
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("readings").await;
    let log = daemon.log();
    // Three partitions, the big one (eu, 80 % of the rows) split: more than three chunks.
    let planned = log
        .lines()
        .find(|l| l.contains("planned table=public.readings"))
        .unwrap_or_else(|| panic!("{log}"));
    let chunks: usize = planned
        .split("chunks=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{planned}"));
    assert!(chunks > 3, "{planned}");
}

/// Inserts into, updates and deletes from `late` on the source until stopped.
fn late_writer(pair: &Pair, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    write_until_stopped(pair, stop, |n| {
        let id = 100_000 + n + 1;
        let victim = fastrand::i64(1..100_000);
        format!(
            "BEGIN;
             INSERT INTO late VALUES ({id}, 'new');
             UPDATE late SET v = v || '+' WHERE id = {victim};
             DELETE FROM late WHERE id = {victim} + 1;
             UPDATE orders SET note = 'late' WHERE id = {victim};
             COMMIT;"
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_selected_after_the_copy_is_copied_before_streaming_resumes() {
    let (pair, config) = pair_through_sluice_schema("[copy]\nenabled = true\njobs = 2\n").await;
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    // A table created on the source since, with rows; `schema` creates it on the target.
    let source = pair.source_client().await;
    source
        .batch_execute(
            "CREATE TABLE late (id int PRIMARY KEY, v text);
             INSERT INTO late SELECT g, md5(g::text) FROM generate_series(1, 100000) g;",
        )
        .await
        .unwrap();
    let (code, out, err) = sluice(&["schema", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("LEFT ALONE"), "{out}");

    // Not published yet: a clear refusal, nothing streamed.
    let mut refused = Daemon::spawn(&config, &pair.dir.path().join("refused.log"));
    let status = refused
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("sluice kept running:\n{}", refused.log()));
    assert_eq!(status.code(), Some(1), "{}", refused.log());
    assert!(
        refused.log().contains("ALTER PUBLICATION sluice ADD TABLE"),
        "{}",
        refused.log()
    );

    // Published: changes made between the publication and the copy's snapshot are in the
    // stream and in the snapshot, and must land once.
    source
        .batch_execute(
            "ALTER PUBLICATION sluice ADD TABLE late;
             UPDATE late SET v = v || '!' WHERE id <= 500;
             DELETE FROM late WHERE id BETWEEN 501 AND 600;
             INSERT INTO late VALUES (200001, 'between the publication and the copy');",
        )
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = late_writer(&pair, stop.clone());
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second.wait_for_log("initial copy finished").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(load.await.unwrap() > 0);
    pair.wait_caught_up(&second).await;
    let log = second.log();
    assert!(log.contains("planned table=public.late"), "{log}");
    for copied_before in ["orders", "events", "tags"] {
        assert!(
            !log.contains(&format!("planned table=public.{copied_before}")),
            "copied again:\n{log}"
        );
    }
    for table in ["orders", "events", "tags", "late"] {
        pair.assert_same(table).await;
    }
    let target = pair.target_client().await;
    assert!(
        exists(
            &target,
            "SELECT 1 FROM pg_constraint WHERE conname = 'late_pkey'"
        )
        .await,
        "{log}"
    );
    // And it streams on.
    stream_and_compare(&pair, &second, "UPDATE late SET v = 'after' WHERE id <= 10").await;
    pair.assert_same("late").await;
}

async fn slot_count(pair: &Pair) -> i64 {
    pair.source_client()
        .await
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0)
}

/// `sluice run` before `sluice schema`, or into tables that already hold rows: refused at
/// once, naming the tables, and before any slot exists, so a failed first start leaves
/// nothing retaining WAL on the source.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_that_cannot_copy_is_refused_before_a_slot_exists() {
    let pair = Pair::with_schema("").await;
    pair.source_client()
        .await
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, note text);
             CREATE TABLE \"Line Items\" (id bigint PRIMARY KEY);
             INSERT INTO orders VALUES (1, 'one');",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n");
    let (code, _, stderr) = sluice(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "2 selected table(s) do not exist on the target: public.\"Line Items\", public.orders"
        ) && stderr.contains("sluice schema"),
        "{stderr}"
    );
    assert_eq!(
        slot_count(&pair).await,
        0,
        "a failed first start left a slot behind"
    );
    let publications: i64 = pair
        .source_client()
        .await
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0, "a failed first start left a publication");
    // Nor is the state dir bound to that slot: a corrected config may name another.
    let other = pair.dir.path().join("other-slot.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("[source]\n", "[source]\nslot = \"other\"\n"),
    )
    .unwrap();
    let (code, _, stderr) = sluice(&["run", "--config", other.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("do not exist on the target") && !stderr.contains("belongs to"),
        "{stderr}"
    );
    // With the schema in place but rows already in a table: refused the same way.
    let (code, _, stderr) = sluice(&["schema", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let target = pair.target_client().await;
    target
        .batch_execute("INSERT INTO orders VALUES (7, 'stale')")
        .await
        .unwrap();
    let (code, _, stderr) = sluice(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("1 selected table(s) already hold rows on the target: public.orders"),
        "{stderr}"
    );
    assert_eq!(
        slot_count(&pair).await,
        0,
        "a refused start left a slot behind"
    );
    // Emptied, the same state dir copies and streams.
    target.batch_execute("TRUNCATE orders").await.unwrap();
    let daemon = pair.start_daemon(&config).await;
    pair.catch_up_and_compare(&daemon, &["orders", "\"Line Items\""])
        .await;
}

/// The publication's options, a table's entry in it, or the table behind a name changed on
/// the source while sluice streams: the source sends fewer changes, or another table's,
/// and nothing in the stream says so. sluice stops, and the next start copies what it must.
#[tokio::test(flavor = "multi_thread")]
async fn a_publication_narrowed_or_a_table_swapped_while_streaming_stops_and_is_copied_again() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    // Looks often, so its first look (the reference) is taken well before the changes.
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n[monitor]\ninterval = \"100ms\"\n");
    let mut daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&daemon).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let source = pair.source_client().await;
    let target = pair.target_client().await;

    // Deletes no longer published.
    source
        .batch_execute("ALTER PUBLICATION sluice SET (publish = 'insert, update')")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(log.contains("its options changed"), "{log}");
    assert!(
        log.contains("SET (publish = 'insert, update, delete, truncate'"),
        "{log}"
    );
    source
        .batch_execute(
            "DELETE FROM orders WHERE id <= 100;
             ALTER PUBLICATION sluice SET (publish = 'insert, update, delete, truncate');",
        )
        .await
        .unwrap();
    target
        .batch_execute("TRUNCATE orders, events, tags")
        .await
        .unwrap();
    let mut daemon = pair.start_daemon(&config).await;
    daemon
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    daemon.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&daemon).await;
    assert_all_same(&pair).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Another table under the same name, in one transaction.
    source
        .batch_execute(
            "CREATE TABLE tags_new (name text, weight int);
             ALTER TABLE tags_new REPLICA IDENTITY FULL;
             INSERT INTO tags_new SELECT 'new' || g, g FROM generate_series(1, 30) g;
             BEGIN;
             ALTER TABLE tags RENAME TO tags_old;
             ALTER TABLE tags_new RENAME TO tags;
             DROP TABLE tags_old;
             ALTER PUBLICATION sluice ADD TABLE tags;
             COMMIT;
             INSERT INTO tags VALUES ('after the swap', 1);",
        )
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("public.tags is another table now"),
        "{}",
        daemon.log()
    );
    target.batch_execute("TRUNCATE tags").await.unwrap();
    let mut daemon = pair.start_daemon(&config).await;
    daemon
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    daemon.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&daemon).await;
    assert_all_same(&pair).await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// The publication altered on the source while sluice streams: the source just stops
/// sending those changes, so sluice stops and says how to get the rows back; the next start
/// copies the table again. A dropped publication cannot be mended: a fresh copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_dropped_from_the_publication_stops_the_daemon_and_is_copied_again() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&daemon).await;
    let source = pair.source_client().await;
    source
        .batch_execute("ALTER PUBLICATION sluice DROP TABLE tags")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(log.contains("no longer publishes public.tags"), "{log}");
    assert!(
        log.contains(r#"ALTER PUBLICATION "sluice" ADD TABLE "public"."tags""#),
        "{log}"
    );
    // Changes made while it was out of the publication never reach the stream.
    source
        .batch_execute(
            "DELETE FROM tags WHERE weight < 100;
             INSERT INTO tags VALUES ('late', 5000);
             UPDATE orders SET note = 'meanwhile' WHERE id <= 10;",
        )
        .await
        .unwrap();
    source
        .batch_execute("ALTER PUBLICATION sluice ADD TABLE tags")
        .await
        .unwrap();
    let target = pair.target_client().await;
    target.batch_execute("TRUNCATE tags").await.unwrap();
    let mut daemon = pair.start_daemon(&config).await;
    daemon
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    daemon.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&daemon).await;
    assert_all_same(&pair).await;

    // A dropped publication: the source can never send the changes in between.
    source
        .batch_execute("DROP PUBLICATION sluice")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE orders SET note = 'lost' WHERE id = 11")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("A fresh copy is needed"),
        "{}",
        daemon.log()
    );
}

/// A table rewritten on the source while its chunks are copied (VACUUM FULL, CLUSTER) moves
/// rows between block ranges already copied and not yet copied. The copy holds ACCESS SHARE
/// on the tables it copies, as pg_dump does, so the rewrite waits for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_rewritten_during_a_chunked_copy_loses_no_row() {
    let pair = Pair::with_schema("CREATE TABLE vf (id int PRIMARY KEY, pad text);").await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "INSERT INTO vf SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g;
             DELETE FROM vf WHERE id % 2 = 0 AND id < 50000;",
        )
        .await
        .unwrap();
    source.batch_execute("VACUUM vf").await.unwrap();
    // Each chunk's COPY takes a second on the target, so the rewrite lands mid-copy.
    pair.target_client()
        .await
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(1); RETURN NULL; END$$;
             CREATE TRIGGER slow AFTER INSERT ON vf FOR EACH STATEMENT EXECUTE FUNCTION slow();
             ALTER TABLE vf ENABLE ALWAYS TRIGGER slow;",
        )
        .await
        .unwrap();
    let config = pair.config(
        "[copy]\nenabled = true\njobs = 2\nsplit_tables_larger_than = \"4MB\"\nsplit_by = \"ctid\"\n",
    );
    let daemon = Daemon::spawn(&config, &pair.dir.path().join("sluice.log"));
    daemon.wait_for_log("planned table=public.vf").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    source.batch_execute("VACUUM FULL vf").await.unwrap();
    daemon.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("vf").await;
}

/// A rewrite committed after the copy's snapshot (ALTER TABLE ... TYPE, pg_repack) gives
/// the table a new file whose rows that snapshot does not see: a whole-table (or key-range,
/// or partitioned) copy read it as empty and said "copied", and the stream never brings
/// those rows. The copy compares each leaf's file as of the snapshot with its file now and
/// copies such a table again under a fresh snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_rewritten_after_the_snapshot_is_copied_again_not_left_empty() {
    let pair = Pair::with_schema(
        "CREATE TABLE first (id int PRIMARY KEY, pad text);
         CREATE TABLE later (id int PRIMARY KEY, v int);
         CREATE TABLE parts (id int PRIMARY KEY, v int) PARTITION BY RANGE (id);
         CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (5000);
         CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (5000) TO (10000);",
    )
    .await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "INSERT INTO first SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g;
             INSERT INTO later SELECT g, g FROM generate_series(1, 5000) g;
             INSERT INTO parts SELECT g, g FROM generate_series(1, 9999) g;",
        )
        .await
        .unwrap();
    // Each chunk of `first` (the largest, copied first) takes two seconds on the target, so
    // the rewrites land while the other two wait their turn.
    pair.target_client()
        .await
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(2); RETURN NULL; END$$;
             CREATE TRIGGER slow AFTER INSERT ON first FOR EACH STATEMENT EXECUTE FUNCTION slow();
             ALTER TABLE first ENABLE ALWAYS TRIGGER slow;",
        )
        .await
        .unwrap();
    // Three chunks of `first` and two jobs: its third chunk is being copied when the
    // other job finds the rewrites.
    let config = pair.config(
        "[copy]\nenabled = true\njobs = 2\nsplit_tables_larger_than = \"4MB\"\nsplit_by = \"ctid\"\n",
    );
    let daemon = Daemon::spawn(&config, &pair.dir.path().join("sluice.log"));
    daemon.wait_for_log("planned table=public.parts").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    source
        .batch_execute(
            "ALTER TABLE later ALTER COLUMN v TYPE bigint;
             ALTER TABLE parts ALTER COLUMN v TYPE bigint;",
        )
        .await
        .unwrap();
    pair.target_client()
        .await
        .batch_execute(
            "ALTER TABLE later ALTER COLUMN v TYPE bigint;
             ALTER TABLE parts ALTER COLUMN v TYPE bigint;",
        )
        .await
        .unwrap();
    daemon.wait_for_log("initial copy finished").await;
    assert!(
        daemon
            .log()
            .contains("The table was rewritten on the source"),
        "{}",
        daemon.log()
    );
    // Only the rewritten tables wait for the fresh snapshot: `first`, in the middle of its
    // copy then, goes on under the first one (it is not emptied and copied again).
    assert!(
        daemon
            .log()
            .contains("this table is copied again under a fresh snapshot once the others are done"),
        "{}",
        daemon.log()
    );
    assert!(
        !daemon
            .log()
            .lines()
            .any(|l| l.contains("emptying the tables") && l.contains("public.first")),
        "{}",
        daemon.log()
    );
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("first").await;
    pair.assert_same("later").await;
    pair.assert_same("parts").await;
}

/// A streamed table dropped on the source leaves the publication with it: the daemon says
/// it was dropped (not "put it back", which would fail), and a restart without it streams.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_dropped_on_the_source_is_named_as_dropped() {
    let pair = Pair::with_schema(SCHEMA).await;
    let config = pair.config("");
    let mut daemon = pair.start_daemon(&config).await;
    pair.wait_caught_up(&daemon).await;
    let source = pair.source_client().await;
    source.batch_execute("DROP TABLE tags").await.unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("public.tags was dropped on the source (take it out of [tables]"),
        "{}",
        daemon.log()
    );
    // Nothing to empty or copy for a dropped table.
    assert!(
        daemon.log().contains("Then start `sluice run` again")
            && !daemon.log().contains("Then empty"),
        "{}",
        daemon.log()
    );
    let config = pair.config("[tables]\nexclude = [\"public.tags\"]\n");
    let daemon = pair.start_daemon(&config).await;
    source
        .batch_execute("INSERT INTO orders VALUES (1, 1, 1.0, 'after')")
        .await
        .unwrap();
    pair.catch_up_and_compare(&daemon, &["orders"]).await;
}

/// Two daemons on one slot and target, each with its own state dir, started together (or one
/// taking over while the other still runs): only one may copy and apply. The other waits on
/// the migration's lock on the target and takes over once the first stops, from where it
/// stopped: nothing copied or applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_the_same_slot_waits_and_takes_over_without_doubling() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let first = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let second = pair.dir.path().join("second.toml");
    std::fs::write(
        &second,
        std::fs::read_to_string(&first).unwrap().replace(
            &pair.state_dir().display().to_string(),
            &pair.dir.path().join("state-b").display().to_string(),
        ),
    )
    .unwrap();
    let a = crate::support::sluice::Daemon::spawn(&first, &pair.dir.path().join("a.log"));
    let b = crate::support::sluice::Daemon::spawn(&second, &pair.dir.path().join("b.log"));
    let waiting = "Another sluice process is running this migration (slot sluice)";
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut running, mut waiter) = loop {
        if b.log().contains(waiting) {
            break (a, b);
        }
        if a.log().contains(waiting) {
            break (b, a);
        }
        assert!(
            Instant::now() < deadline,
            "neither waited:\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    running.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&running).await;
    assert_all_same(&pair).await;
    assert!(!waiter.log().contains("planned table"), "{}", waiter.log());

    // The first stops; the second takes over from the target's position.
    let source = pair.source_client().await;
    source
        .batch_execute("INSERT INTO tags SELECT 'late' || g, g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    assert!(running.terminate().success(), "{}", running.log());
    source
        .batch_execute(
            "INSERT INTO tags SELECT 'later' || g, g FROM generate_series(1, 100) g;
             UPDATE orders SET note = 'taken over' WHERE id <= 50;",
        )
        .await
        .unwrap();
    waiter.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&waiter).await;
    assert_all_same(&pair).await;
    assert!(waiter.terminate().success(), "{}", waiter.log());
}

/// A table copied under a later snapshot than the slot's (selected after the copy) has its
/// changes below that snapshot skipped. That position is kept on the target as well: with
/// the state dir lost while apply is still below it, a restart from an empty state dir
/// skips them the same, instead of applying them a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_state_dir_keeps_the_skips_of_a_table_copied_later() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let without_tags =
        pair.config("[copy]\nenabled = true\njobs = 2\n[tables]\nexclude = [\"public.tags\"]\n");
    let mut first = Daemon::spawn(&without_tags, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    // Rows for tags in the stream, then an orders change the target refuses: apply stays
    // below the snapshot tags is copied under.
    let source = pair.source_client().await;
    let target = pair.target_client().await;
    source
        .batch_execute(
            "ALTER PUBLICATION sluice ADD TABLE tags;
             INSERT INTO tags VALUES ('streamed before the copy', 1);
             INSERT INTO orders VALUES (2000000, 1, 1.0, 'refused at first');",
        )
        .await
        .unwrap();
    target
        .batch_execute("ALTER TABLE orders ADD CONSTRAINT not_yet CHECK (id < 1000000)")
        .await
        .unwrap();
    let with_tags = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut second = Daemon::spawn(&with_tags, &pair.dir.path().join("second.log"));
    second.wait_for_log("apply stalled").await;
    assert!(second.terminate().success(), "{}", second.log());

    // The state dir is lost; the target is mended; a new start resumes from the target.
    std::fs::remove_dir_all(pair.state_dir()).unwrap();
    target
        .batch_execute("ALTER TABLE orders DROP CONSTRAINT not_yet")
        .await
        .unwrap();
    let third = Daemon::spawn(&with_tags, &pair.dir.path().join("third.log"));
    pair.wait_caught_up(&third).await;
    assert_all_same(&pair).await;
}

/// Which tables the copy took was known only to the state dir: after it was lost, a table
/// selected later was streamed into empty, never copied. The target's position says the
/// copy finished, so the tables selected then are recorded as copied, and a later one is
/// copied at its start.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_selected_after_the_state_dir_was_lost_is_still_copied() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let without_tags =
        pair.config("[copy]\nenabled = true\njobs = 2\n[tables]\nexclude = [\"public.tags\"]\n");
    let mut first = Daemon::spawn(&without_tags, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    std::fs::remove_dir_all(pair.state_dir()).unwrap();
    let mut second = Daemon::spawn(&without_tags, &pair.dir.path().join("second.log"));
    second.wait_for_log("streaming slot").await;
    assert!(
        second.log().contains("the state dir has no copy record"),
        "{}",
        second.log()
    );
    assert!(second.terminate().success(), "{}", second.log());

    let source = pair.source_client().await;
    source
        .batch_execute("ALTER PUBLICATION sluice ADD TABLE tags")
        .await
        .unwrap();
    let with_tags = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let third = Daemon::spawn(&with_tags, &pair.dir.path().join("third.log"));
    third.wait_for_log("selected since the copy finished").await;
    // The late copy runs before streaming; the target's position is caught up already.
    third.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&third).await;
    assert_all_same(&pair).await;
}

/// A table created and published while the daemon runs: its changes wait for the copy the
/// next start makes (under a snapshot that holds them), rather than landing in a table not
/// copied yet, where an UPDATE stalled and INSERTed rows made the copy refuse the table.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_published_while_running_waits_for_its_copy_at_the_next_start() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;

    let fresh = "CREATE TABLE fresh (id int PRIMARY KEY, v text);";
    pair.target_client()
        .await
        .batch_execute(fresh)
        .await
        .unwrap();
    let source = pair.source_client().await;
    source
        .batch_execute(&format!(
            "{fresh}
             INSERT INTO fresh SELECT g, 'before' FROM generate_series(1, 100) g;
             ALTER PUBLICATION sluice ADD TABLE fresh;
             INSERT INTO fresh SELECT g, 'published' FROM generate_series(101, 200) g;
             UPDATE fresh SET v = 'changed' WHERE id <= 10;
             INSERT INTO orders VALUES (4000000, 1, 1.0, 'after fresh');"
        ))
        .await
        .unwrap();
    pair.wait_caught_up(&first).await;
    assert!(
        first.log().contains("new since this daemon started"),
        "{}",
        first.log()
    );
    let (code, stdout, stderr) =
        sluice(&["status", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("public.fresh is selected but new since this daemon started"),
        "{stdout}"
    );
    let on_target: i64 = pair
        .target_client()
        .await
        .query_one("SELECT count(*) FROM fresh", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_target, 0, "{}", first.log());
    assert!(first.terminate().success(), "{}", first.log());

    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    second.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&second).await;
    pair.assert_same("fresh").await;
    assert_all_same(&pair).await;
}

/// A table renamed on the source while sluice is stopped: its changes before the rename
/// come under the old name, which no longer exists on the target. Copied afresh under the
/// new name, those are in the copy and skipped; they stalled apply for good, and excluding
/// the old name then made sluice skip the new name's changes too (decided once per table).
#[tokio::test(flavor = "multi_thread")]
async fn a_table_renamed_while_stopped_is_copied_under_its_new_name_and_streams_on() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    let source = pair.source_client().await;
    source
        .batch_execute(
            "UPDATE tags SET weight = -2 WHERE weight = 2;
             ALTER TABLE tags RENAME TO labels;
             UPDATE labels SET weight = -3 WHERE weight = 3;",
        )
        .await
        .unwrap();
    let target = pair.target_client().await;
    target
        .batch_execute("ALTER TABLE tags RENAME TO labels")
        .await
        .unwrap();
    let mut refused = Daemon::spawn(&config, &pair.dir.path().join("refused.log"));
    let status = refused.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        refused.log()
    );
    assert!(
        refused.log().contains("already hold rows") && refused.log().contains("public.labels"),
        "{}",
        refused.log()
    );
    target.batch_execute("TRUNCATE labels").await.unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    second.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&second).await;
    pair.assert_same("labels").await;
    source
        .batch_execute(
            "UPDATE labels SET weight = -4 WHERE weight = 4;
             INSERT INTO labels VALUES ('after', 5000);",
        )
        .await
        .unwrap();
    pair.wait_caught_up(&second).await;
    for table in ["labels", "orders", "events"] {
        pair.assert_same(table).await;
    }
}

/// While sluice was stopped a copied table was dropped and another renamed to its name:
/// the copy recorded under the name is the dropped table's. The table now under the name is
/// copied afresh once emptied, never streamed on from the other table's rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_replaced_under_the_same_name_while_stopped_is_copied_afresh() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    let swap = "CREATE TABLE tags_next (name text, weight int);
                ALTER TABLE tags_next REPLICA IDENTITY FULL;
                DROP TABLE tags;
                ALTER TABLE tags_next RENAME TO tags;";
    let source = pair.source_client().await;
    source.batch_execute(swap).await.unwrap();
    source
        .batch_execute(
            "ALTER PUBLICATION sluice ADD TABLE tags;
             INSERT INTO tags SELECT 'next' || g, g FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let target = pair.target_client().await;
    target.batch_execute(swap).await.unwrap();
    target
        .batch_execute("INSERT INTO tags VALUES ('stale', 1)")
        .await
        .unwrap();
    let mut refused = Daemon::spawn(&config, &pair.dir.path().join("refused.log"));
    let status = refused.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        refused.log()
    );
    let log = refused.log();
    assert!(
        log.contains("another table than the one copied under each of these names")
            && log.contains("already hold rows")
            && log.contains("public.tags"),
        "{log}"
    );
    target.batch_execute("TRUNCATE tags").await.unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    second.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&second).await;
    assert_all_same(&pair).await;
}

/// The state dir lost, and a table created and published before the next start: empty on
/// the target while the source has rows, it is not taken as copied but copied at that start.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_published_while_the_state_dir_was_lost_is_copied() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    std::fs::remove_dir_all(pair.state_dir()).unwrap();
    let fresh = "CREATE TABLE fresh (id int PRIMARY KEY, v text);";
    pair.target_client()
        .await
        .batch_execute(fresh)
        .await
        .unwrap();
    pair.source_client()
        .await
        .batch_execute(&format!(
            "{fresh}
             INSERT INTO fresh SELECT g, 'n' FROM generate_series(1, 500) g;
             ALTER PUBLICATION sluice ADD TABLE fresh;"
        ))
        .await
        .unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    second.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&second).await;
    pair.assert_same("fresh").await;
    assert_all_same(&pair).await;
}

/// `source.publication` changed to another existing publication that lacks some tables: a
/// config mistake, not tables left out of this migration's publication. Refused naming the
/// publication the copy was made for, and nothing is forgotten: set back, it streams on
/// without copying again.
#[tokio::test(flavor = "multi_thread")]
async fn another_publication_in_the_config_forgets_no_copy() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    let source = pair.source_client().await;
    source
        .batch_execute(
            "CREATE PUBLICATION other FOR TABLE orders WITH (publish_via_partition_root = true)",
        )
        .await
        .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[source]\n", "[source]\npublication = \"other\"\n", 1),
    )
    .unwrap();
    let mut refused = Daemon::spawn(&config, &pair.dir.path().join("refused.log"));
    let status = refused.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        refused.log()
    );
    let log = refused.log();
    assert!(
        log.contains("this migration's copy was made for publication sluice")
            && !log.contains("forgot its copies"),
        "{log}"
    );

    std::fs::write(&config, text).unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second.wait_for_log("streaming slot").await;
    assert!(
        !second.log().contains("selected since the copy finished"),
        "{}",
        second.log()
    );
    source
        .batch_execute("UPDATE tags SET weight = weight + 1 WHERE weight < 10")
        .await
        .unwrap();
    pair.wait_caught_up(&second).await;
    assert_all_same(&pair).await;
}

/// Renamed away and back while sluice was stopped: the changes made under the other name
/// come under it, which `[tables]` does not select, and were skipped, silently. They belong
/// to the selected table (its OID): sluice stops, forgets its copy, and copies it afresh
/// once it is emptied.
#[tokio::test(flavor = "multi_thread")]
async fn changes_under_a_former_name_stop_and_the_table_is_copied_afresh() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config(
        "[copy]\nenabled = true\njobs = 2\n[tables]\ninclude = [\"public.orders\", \"public.events\", \"public.tags\"]\n",
    );
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    pair.source_client()
        .await
        .batch_execute(
            "ALTER TABLE tags RENAME TO tags_away;
             UPDATE tags_away SET weight = -weight WHERE weight <= 5;
             ALTER TABLE tags_away RENAME TO tags;
             UPDATE tags SET weight = 0 WHERE weight = 6;",
        )
        .await
        .unwrap();
    let mut stopped = Daemon::spawn(&config, &pair.dir.path().join("stopped.log"));
    let status = stopped.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        stopped.log()
    );
    assert!(
        stopped.log().contains(
            "The source sent changes of public.tags under another name it had, public.tags_away"
        ),
        "{}",
        stopped.log()
    );
    pair.target_client()
        .await
        .batch_execute("TRUNCATE tags")
        .await
        .unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    second.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&second).await;
    assert_all_same(&pair).await;
}

/// Renamed away and back while streaming, faster than the publication monitor looks: the
/// changes in between come under the other name, which `[tables]` does not select, and were
/// skipped with a warning only. They are the streamed table's (its OID): sluice stops.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_renamed_away_and_back_while_streaming_stops_sluice() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config(
        "[copy]\nenabled = true\njobs = 2\n[tables]\ninclude = [\"public.orders\", \"public.events\", \"public.tags\"]\n[monitor]\ninterval = \"10s\"\n",
    );
    let mut daemon = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    daemon.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&daemon).await;
    let source = pair.source_client().await;
    for statement in [
        "ALTER TABLE tags RENAME TO tags_away",
        "UPDATE tags_away SET weight = -weight WHERE weight <= 5",
        "ALTER TABLE tags_away RENAME TO tags",
        "UPDATE tags SET weight = 0 WHERE weight = 6",
    ] {
        source.batch_execute(statement).await.unwrap();
        // The stream reads each change while the table still has the name it came under.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("changes of public.tags under another name it had, public.tags_away"),
        "{}",
        daemon.log()
    );
    pair.target_client()
        .await
        .batch_execute("TRUNCATE tags")
        .await
        .unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("selected since the copy finished")
        .await;
    // The late copy runs before streaming; the target's position is caught up already.
    second.wait_for_log("streaming slot").await;
    pair.wait_caught_up(&second).await;
    assert_all_same(&pair).await;
}

/// A copied table left out of `[tables]` for a while misses the changes made meanwhile (the
/// stream skips it): selected again, it is copied afresh once emptied, never streamed on
/// from its stale rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_left_out_and_selected_again_is_copied_afresh() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let all = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut first = Daemon::spawn(&all, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    let without_tags =
        pair.config("[copy]\nenabled = true\njobs = 2\n[tables]\nexclude = [\"public.tags\"]\n");
    let mut second = Daemon::spawn(&without_tags, &pair.dir.path().join("second.log"));
    second.wait_for_log("streaming slot").await;
    second.wait_for_log("no longer selected").await;
    assert!(second.log().contains("public.tags"), "{}", second.log());
    let source = pair.source_client().await;
    source
        .batch_execute(
            "UPDATE tags SET weight = weight + 1000 WHERE weight <= 5;
             INSERT INTO orders VALUES (3000000, 1, 1.0, 'while tags was left out');",
        )
        .await
        .unwrap();
    pair.wait_caught_up(&second).await;
    assert!(second.terminate().success(), "{}", second.log());

    // Selected again: refused while its stale rows are there, copied once emptied. (One
    // config file: written again.)
    let all = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut third = Daemon::spawn(&all, &pair.dir.path().join("third.log"));
    let status = third.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        third.log()
    );
    assert!(
        third.log().contains("already hold rows") && third.log().contains("public.tags"),
        "{}",
        third.log()
    );
    pair.target_client()
        .await
        .batch_execute("TRUNCATE tags")
        .await
        .unwrap();
    let fourth = Daemon::spawn(&all, &pair.dir.path().join("fourth.log"));
    pair.wait_caught_up(&fourth).await;
    assert_all_same(&pair).await;
}

/// A state dir of an earlier attempt, restored over this attempt's (same slot name, source
/// and target): its finished copy must not make this attempt skip its own copy and stream
/// into tables missing rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_state_dir_of_an_earlier_attempt_is_refused() {
    let pair = Pair::with_schema(SCHEMA).await;
    seed(&pair).await;
    let config = pair.config("[copy]\nenabled = true\njobs = 2\n");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());
    let saved = pair.dir.path().join("saved-state");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(pair.state_dir())
        .arg(&saved)
        .status()
        .unwrap();
    assert!(status.success());
    let (code, out, err) = sluice(&["teardown", "--yes", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    // The second attempt: its copy is held up on the target, and it is killed mid-way.
    let target = pair.target_client().await;
    target
        .batch_execute("TRUNCATE orders, events, tags")
        .await
        .unwrap();
    let source = pair.source_client().await;
    source
        .batch_execute("INSERT INTO tags VALUES ('second attempt', 1)")
        .await
        .unwrap();
    let mut locker = pair.target_client().await;
    let hold = locker.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE orders, events, tags IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second
        .wait_for_log("created replication slot with an exported snapshot")
        .await;
    second.kill9();
    hold.rollback().await.unwrap();

    // The earlier attempt's state dir put back.
    std::fs::remove_dir_all(pair.state_dir()).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&saved)
        .arg(pair.state_dir())
        .status()
        .unwrap();
    assert!(status.success());
    let mut third = Daemon::spawn(&config, &pair.dir.path().join("third.log"));
    let status = third.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        third.log()
    );
    assert!(
        third
            .log()
            .contains("the state dir is from another attempt"),
        "{}",
        third.log()
    );
}

/// A table moved to another schema, out of a publication of a schema: named as moved, with
/// advice that can be followed.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_moved_out_of_a_published_schema_is_named_as_moved() {
    let pair = Pair::with_schema(
        "CREATE SCHEMA app;
         CREATE TABLE app.a1 (id int PRIMARY KEY);",
    )
    .await;
    let source = pair.source_client().await;
    source
        .batch_execute("CREATE PUBLICATION sluice FOR TABLES IN SCHEMA app")
        .await
        .unwrap();
    let config = pair.config("[tables]\ninclude = [\"app.*\"]\n[monitor]\ninterval = \"100ms\"\n");
    let mut daemon = pair.start_daemon(&config).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    source
        .batch_execute("CREATE SCHEMA other; ALTER TABLE app.a1 SET SCHEMA other")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}\n{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("app.a1 is now other.a1 (renamed, or moved to another schema)"),
        "{}",
        daemon.log()
    );
}

/// A target column that would round the copied values (COPY rounds them as silently as an
/// assignment would): refused before any slot exists, naming the column and both types.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_into_a_column_that_would_round_is_refused_before_a_slot_exists() {
    let pair = Pair::with_schema("").await;
    pair.source_client()
        .await
        .batch_execute(
            "CREATE TABLE prices (id int PRIMARY KEY, price numeric(10,2), history numeric(10,2)[]);
             INSERT INTO prices VALUES (1, 2.25, '{2.25}');",
        )
        .await
        .unwrap();
    let target = pair.target_client().await;
    target
        .batch_execute(
            "CREATE TABLE prices (id int PRIMARY KEY, price numeric(10,1), history numeric(10,1)[])",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n");
    let (code, _, stderr) = sluice(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("2 column(s) on the target would round or cut the copied values")
            && stderr.contains("public.prices.price (numeric(10,2) → numeric(10,1))")
            && stderr.contains("public.prices.history (numeric(10,2)[] → numeric(10,1)[])"),
        "{stderr}"
    );
    assert_eq!(slot_count(&pair).await, 0);
    target
        .batch_execute(
            "ALTER TABLE prices ALTER COLUMN price TYPE numeric(10,2),
                                ALTER COLUMN history TYPE numeric(10,2)[]",
        )
        .await
        .unwrap();
    let daemon = pair.start_daemon(&config).await;
    pair.catch_up_and_compare(&daemon, &["prices"]).await;
}

/// Changes of a partition sent under the partition's own name (the publication's
/// publish_via_partition_root set to false while sluice was stopped, then back): applied
/// beside the root's copy they left an old value on the target, silently. Those before the
/// root's copy are skipped as the root's; one after it stops sluice, which forgets the
/// root's copy, and the next start (the root emptied) copies it afresh.
#[tokio::test(flavor = "multi_thread")]
async fn changes_sent_under_a_partitions_own_name_are_never_applied_beside_the_roots_copy() {
    let pair = Pair::with_schema("").await;
    pair.source_client()
        .await
        .batch_execute(
            "CREATE TABLE t (id int, k int NOT NULL, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
             CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (0) TO (100);
             CREATE TABLE t_2 PARTITION OF t FOR VALUES FROM (100) TO (200);
             INSERT INTO t SELECT i, i % 200, 'v' FROM generate_series(1, 1000) i;",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n");
    let (code, out, err) = sluice(&["schema", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    let source = pair.source_client().await;
    source
        .batch_execute(
            "ALTER PUBLICATION sluice SET (publish_via_partition_root = false);
             UPDATE t SET v = 'old' WHERE id = 10;
             ALTER PUBLICATION sluice SET (publish_via_partition_root = true);
             UPDATE t SET v = 'new' WHERE id = 10;
             INSERT INTO t VALUES (5000, 150, 'after');",
        )
        .await
        .unwrap();
    let mut stopped = Daemon::spawn(&config, &pair.dir.path().join("stopped.log"));
    let status = stopped
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("sluice kept running:\n{}", stopped.log()));
    assert_eq!(status.code(), Some(1), "{}", stopped.log());
    let log = stopped.log();
    assert!(
        log.contains("The source sent changes of public.t_1 (a partition of the selected public.t) under the partition's own name"),
        "{log}"
    );
    assert!(log.contains("sluice forgot its copy of public.t"), "{log}");
    let target = pair.target_client().await;
    let v: String = target
        .query_one("SELECT v FROM t WHERE id = 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "v", "nothing of it was applied");

    target.batch_execute("TRUNCATE t").await.unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    second.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&second).await;
    assert!(
        second.log().contains("planned table=public.t"),
        "{}",
        second.log()
    );
    pair.assert_same("t").await;
}

/// Partition maintenance seen by the publication monitor: publish_via_partition_root turned
/// off while streaming is the options' change alone (the roots, listed by partition then,
/// were each said to be out of the publication, with an ADD TABLE that fails); a selected
/// table attached as a partition keeps its rows on the target and is not to be emptied.
#[tokio::test(flavor = "multi_thread")]
async fn partition_maintenance_while_streaming_stops_with_the_right_advice() {
    let pair = Pair::with_schema("").await;
    pair.source_client()
        .await
        .batch_execute(
            "CREATE TABLE m (id int, k int NOT NULL, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
             CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100);
             CREATE TABLE m_2 (id int, k int NOT NULL, PRIMARY KEY (id, k));
             INSERT INTO m SELECT i, i % 100 FROM generate_series(1, 500) i;
             INSERT INTO m_2 SELECT i, 100 + i % 100 FROM generate_series(1, 300) i;",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n[monitor]\ninterval = \"100ms\"\n");
    let (code, out, err) = sluice(&["schema", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let source = pair.source_client().await;

    let mut daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&daemon).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    source
        .batch_execute("ALTER PUBLICATION sluice SET (publish_via_partition_root = false)")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("its options changed"), "{log}");
    assert!(!log.contains("ADD TABLE"), "{log}");
    source
        .batch_execute("ALTER PUBLICATION sluice SET (publish_via_partition_root = true)")
        .await
        .unwrap();
    let target = pair.target_client().await;
    target.batch_execute("TRUNCATE m, m_2").await.unwrap();

    let mut daemon = pair.start_daemon(&config).await;
    daemon.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&daemon).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    source
        .batch_execute("ALTER TABLE m ATTACH PARTITION m_2 FOR VALUES FROM (100) TO (200)")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("public.m_2 was attached as a partition of"),
        "{log}"
    );
    let last_error = log.lines().rfind(|l| l.starts_with("Error:")).unwrap_or("");
    assert!(
        last_error.contains("its rows on the target are kept"),
        "{log}"
    );
    assert!(!last_error.contains("Then empty"), "{log}");
    // Attached on the target too, with the selection unchanged (m_2 is a partition now,
    // never selected on its own): it streams on, nothing copied again.
    target
        .batch_execute("ALTER TABLE m ATTACH PARTITION m_2 FOR VALUES FROM (100) TO (200)")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE m SET id = id + 1000 WHERE k = 150")
        .await
        .unwrap();
    let daemon = pair.start_daemon(&config).await;
    pair.wait_caught_up(&daemon).await;
    let log = daemon.log();
    let last_start = log.rfind("state dir").unwrap_or(0);
    assert!(!log[last_start..].contains("planned table"), "{log}");
    pair.assert_same("m").await;
}

/// A table taken out of the publication while sluice was stopped: its changes meanwhile were
/// never sent. The start-up refusal forgets its copy, so that once it is put back and
/// emptied, the next start copies it afresh (it streamed on without those changes).
#[tokio::test(flavor = "multi_thread")]
async fn a_table_left_out_of_the_publication_while_stopped_is_copied_again() {
    let pair = Pair::with_schema("").await;
    pair.source_client()
        .await
        .batch_execute(
            "CREATE TABLE kept (id int PRIMARY KEY, v text);
             CREATE TABLE left_out (id int PRIMARY KEY, v text);
             INSERT INTO kept SELECT g, 'k' FROM generate_series(1, 100) g;
             INSERT INTO left_out SELECT g, 'l' FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    let config = pair.config("[copy]\nenabled = true\n");
    let (code, out, err) = sluice(&["schema", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let mut first = Daemon::spawn(&config, &pair.dir.path().join("first.log"));
    first.wait_for_log("initial copy finished").await;
    pair.wait_caught_up(&first).await;
    assert!(first.terminate().success(), "{}", first.log());

    let source = pair.source_client().await;
    source
        .batch_execute(
            "ALTER PUBLICATION sluice DROP TABLE left_out;
             UPDATE left_out SET v = 'changed while left out' WHERE id <= 10;
             INSERT INTO left_out VALUES (1000, 'new while left out');
             CREATE TABLE fresh (id int PRIMARY KEY);
             INSERT INTO fresh SELECT generate_series(1, 10);",
        )
        .await
        .unwrap();
    // A table created since, never published nor copied: refused too, but it has no copy
    // to forget.
    pair.target_client()
        .await
        .batch_execute("CREATE TABLE fresh (id int PRIMARY KEY)")
        .await
        .unwrap();
    let (code, _, stderr) = sluice(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "does not publish these selected tables: public.fresh, public.left_out. Add them"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("sluice forgot its copies of public.left_out, so"),
        "{stderr}"
    );
    source
        .batch_execute("ALTER PUBLICATION sluice ADD TABLE left_out, fresh")
        .await
        .unwrap();
    pair.target_client()
        .await
        .batch_execute("TRUNCATE left_out")
        .await
        .unwrap();
    let second = Daemon::spawn(&config, &pair.dir.path().join("second.log"));
    pair.wait_caught_up(&second).await;
    assert!(
        second.log().contains("planned table=public.left_out"),
        "{}",
        second.log()
    );
    pair.assert_same("left_out").await;
    pair.assert_same("kept").await;
    pair.assert_same("fresh").await;
}
