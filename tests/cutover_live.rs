//! The runbook end to end with the real daemon: `schema` into an empty target, `run`, the
//! deferred DDL, `verify`, `teardown` refusing while the daemon runs; and `cutover
//! --freeze-source` on a live source under load, ending with zero lag, sequences ahead of
//! the source's keys and matching data.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::sluice::{Pair, SLUICE};

async fn sluice_async(args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(SLUICE)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run sluice");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_then_run_then_deferred_ddl_then_verify_then_teardown() {
    let pair = Pair::with_schema("").await;
    let source = pair.source_client().await;
    source
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE TABLE customers (id serial PRIMARY KEY, name text UNIQUE, m mood);
             CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int REFERENCES customers (id), note text);
             CREATE INDEX orders_note_idx ON orders (note);",
        )
        .await
        .unwrap();
    let config = pair.config("");
    let config_arg = config.display().to_string();
    let (code, out, err) = sluice_async(&["schema", "--config", &config_arg]).await;
    assert_eq!(code, 0, "{out}{err}");

    let daemon = pair.start_daemon(&config).await;
    source
        .batch_execute(
            "INSERT INTO customers (name, m) SELECT 'c' || i, 'happy' FROM generate_series(1, 100) i;
             INSERT INTO orders (customer_id, note) SELECT 1 + i % 100, 'n' || i FROM generate_series(1, 1000) i;
             UPDATE orders SET note = 'changed' WHERE id % 7 = 0;
             DELETE FROM orders WHERE id % 11 = 0;",
        )
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    // Without a copy, `run` builds what `schema` deferred before it streams.
    let target = pair.target_client().await;
    let applied: i64 = target
        .query_one(
            "SELECT count(*) FROM sluice.deferred_ddl WHERE applied_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 3, "unique constraint, index, foreign key");
    assert_eq!(
        sluice::cutover::schema::apply_deferred_ddl(&target, None)
            .await
            .unwrap(),
        0,
        "nothing left"
    );

    let (code, out, err) =
        sluice_async(&["verify", "--config", &config_arg, "--chunk-rows", "100"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("OK public.orders: 910 rows, 10 key range(s) match"),
        "{out}"
    );
    assert!(out.contains("OK public.customers: 100 rows"), "{out}");

    let (code, out, err) = sluice_async(&["teardown", "--yes", "--config", &config_arg]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("stop it first"), "{out}{err}");

    let mut daemon = daemon;
    daemon.terminate();

    // A slot dropped behind sluice's back: starting again on this state dir would stream
    // from a new slot's "now" and lose what is written in between. Refused, with nothing
    // created.
    // The walsender outlives its client by a moment: the slot is active until it ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let inactive: bool = source
            .query_one(
                "SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'sluice'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if inactive {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stays active"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    source
        .batch_execute(
            "SELECT pg_drop_replication_slot('sluice');
             INSERT INTO orders (customer_id, note) VALUES (1, 'after the slot went');",
        )
        .await
        .unwrap();
    let (code, out, err) = sluice_async(&["run", "--config", &config_arg]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("is gone from the source, but the state dir"),
        "{out}{err}"
    );
    let slots: i64 = source
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    // With the daemon down, status says why it stopped.
    let (code, out, err) = sluice_async(&["status", "--json", "--config", &config_arg]).await;
    assert_eq!(code, 0, "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("sluice run stopped on: Replication slot sluice is gone"),
        "{out}"
    );
    // Status says so from the source too (not "run creates it"), as a definite problem:
    // `lag --until-below` stops waiting for what cannot come.
    assert!(
        last_error.contains("Replication slot sluice is gone from the source, but changes were copied or streamed from it"),
        "{out}"
    );
    assert!(!out.contains("creates it"), "{out}");
    let started = std::time::Instant::now();
    let (code, out, err) = sluice_async(&[
        "lag",
        "--until-below",
        "1GB",
        "--timeout",
        "2m",
        "--config",
        &config_arg,
    ])
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("is gone from the source"), "{out}{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // check says so too, before run is tried.
    let (code, out, err) = sluice_async(&["check", "--config", &config_arg]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL")
            && l.contains("replication slot sluice is gone, but the target holds changes")),
        "{out}"
    );

    // Recreating the migrated tables empty would leave the state dir resuming into them.
    let (code, out, err) =
        sluice_async(&["schema", "--drop-if-exists", "--config", &config_arg]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("records a migration into"), "{out}{err}");

    // teardown drops what is left, the state dir's checkpoint included, so that a later
    // `run` starts a new migration (with the copy, into emptied tables) instead of resuming.
    let (code, out, err) = sluice_async(&["teardown", "--yes", "--config", &config_arg]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("DROPPED the checkpoint"), "{out}");
    assert!(!pair.state_dir().join("checkpoint").exists());
    let (code, out, err) =
        sluice_async(&["schema", "--drop-if-exists", "--config", &config_arg]).await;
    assert_eq!(code, 0, "{out}{err}");
    let publications: i64 = source
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0);
}

const SCHEMA: &str = "
    CREATE TABLE accounts (id serial PRIMARY KEY, balance bigint NOT NULL DEFAULT 0);
    CREATE TABLE history (id bigserial PRIMARY KEY, account int NOT NULL, delta int NOT NULL);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_under_load_ends_with_zero_lag_and_matching_data() {
    let pair = Pair::with_schema(SCHEMA).await;
    let config = pair.config("");
    let config_arg = config.display().to_string();
    let mut daemon = pair.start_daemon(&config).await;

    // The application: small transactions until told to stop; after the freeze its
    // session is ended and every new one is read-only.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let load = {
        let dsn = pair.source.dsn("app");
        let (stop, committed) = (stop.clone(), committed.clone());
        tokio::spawn(async move {
            let mut client = None;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
                        Ok((c, connection)) => {
                            tokio::spawn(connection);
                            client = Some(c);
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let result = client
                    .as_ref()
                    .unwrap()
                    .batch_execute(
                        "BEGIN;
                         WITH a AS (INSERT INTO accounts (balance) VALUES (10) RETURNING id)
                         INSERT INTO history (account, delta) SELECT id, 10 FROM a;
                         UPDATE accounts SET balance = balance + 1 WHERE id = (SELECT max(id) / 2 + 1 FROM accounts);
                         COMMIT;",
                    )
                    .await;
                match result {
                    Ok(()) => {
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        client = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    };
    while committed.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, out, err) = sluice_async(&[
        "cutover",
        "--freeze-source",
        "--yes",
        "--timeout",
        "2m",
        "--config",
        &config_arg,
    ])
    .await;
    let before_stop = committed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        committed.load(Ordering::Relaxed),
        before_stop,
        "nothing commits on the frozen source"
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(code, 0, "{out}{err}\n--- daemon ---\n{}", daemon.log());
    assert!(out.contains("FROZEN app"), "{out}");
    assert!(out.contains("lag is zero"), "{out}");
    assert!(out.contains("SET public.accounts_id_seq"), "{out}");
    assert!(out.contains("SET public.history_id_seq"), "{out}");
    assert!(out.contains("OK public.accounts"), "{out}");
    assert!(out.contains("OK public.history"), "{out}");
    assert!(out.contains("Cutover ready"), "{out}");

    // Data matches, and the target's sequences continue after the source's keys.
    pair.assert_same("accounts").await;
    pair.assert_same("history").await;
    let source = pair.source_client().await;
    let target = pair.target_client().await;
    for (table, sequence) in [
        ("accounts", "accounts_id_seq"),
        ("history", "history_id_seq"),
    ] {
        let max: i64 = source
            .query_one(
                &format!("SELECT COALESCE(max(id), 0)::int8 FROM {table}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let next: i64 = target
            .query_one(&format!("SELECT nextval('{sequence}')"), &[])
            .await
            .unwrap()
            .get(0);
        // The source's sequence may be past max(id): a transaction ended by the freeze had
        // drawn a value (sequences are not transactional). The target continues after it.
        let row = source
            .query_one(
                &format!("SELECT last_value, is_called FROM {sequence}"),
                &[],
            )
            .await
            .unwrap();
        let source_next = row.get::<_, i64>(0) + i64::from(row.get::<_, bool>(1));
        assert_eq!(next, source_next, "{sequence}");
        assert!(
            next > max,
            "{sequence}: {next} after the source's largest key {max}"
        );
    }
    daemon.terminate();
}
