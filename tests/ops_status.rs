//! `sluice status` with the daemon down: the report comes from the source's slot, the
//! target's position row and the sled checkpoint, `state = stopped`.

use std::time::Duration;

use sluice::checkpoint::{self, Position, Store};
use sluice::Lsn;

use crate::ops_common::*;
use crate::support::PgCluster;

fn lsn(value: &serde_json::Value) -> Lsn {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not an LSN: {value}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_with_the_daemon_down_reads_the_slot_the_target_row_and_the_checkpoint() {
    let pg = PgCluster::start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    source
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        .await
        .unwrap();
    // Its own statement: a slot cannot be created in a transaction that wrote.
    source
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    let confirmed: String = source
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'sluice'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The target has applied up to the slot's start; then the source moves on.
    checkpoint::ensure_position_table(&target).await.unwrap();
    crate::support::record_position(&target, "7300000000000000001", &confirmed)
        .await
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO orders SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g",
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = write_config(dir.path(), &pg.url("app"), &pg.url("target"), &state, "");

    let output = run(
        sluice(&config, &["status", "--json"]),
        Duration::from_secs(60),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let json = parse_json(&output);
    assert_eq!(json["state"], "stopped");
    assert_eq!(json["slot"], "sluice");
    assert_eq!(json["last_error"], serde_json::Value::Null, "{json}");
    assert_eq!(json["confirmed_flush_lsn"], confirmed.as_str());
    assert_eq!(json["applied_lsn"], confirmed.as_str());
    let source_lsn = lsn(&json["source_lsn"]);
    let restart = lsn(&json["restart_lsn"]);
    let applied = lsn(&json["applied_lsn"]);
    let now: Lsn = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    assert!(source_lsn > applied && source_lsn <= now, "{json}");
    assert_eq!(json["lag_bytes"], source_lsn.bytes_since(applied), "{json}");
    assert!(
        json["lag_bytes"].as_u64().unwrap() > 500_000,
        "5000 rows of WAL: {json}"
    );
    assert_eq!(json["retained_wal_bytes"], source_lsn.bytes_since(restart));
    assert_eq!(json["wal_status"], "reserved");
    assert!(
        !state.exists(),
        "status must not create the state dir just to read it"
    );

    // A checkpoint in the state dir: read (nobody holds it), but the target's row stays the
    // authority for applied_lsn; a later caught-up (keepalive) position counts for the lag.
    let caught_up = Lsn(source_lsn.0 - 100);
    {
        let store = Store::open(&state).unwrap();
        store
            .save_position(&Position {
                applied_lsn: Lsn(1),
                caught_up_lsn: caught_up,
                acked_lsn: caught_up,
                ..Default::default()
            })
            .unwrap();
    }
    let output = run(
        sluice(&config, &["status", "--json"]),
        Duration::from_secs(60),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let json = parse_json(&output);
    assert_eq!(json["applied_lsn"], confirmed.as_str());
    assert_eq!(json["caught_up_lsn"], caught_up.to_string());
    let source_lsn = lsn(&json["source_lsn"]);
    assert_eq!(json["lag_bytes"], source_lsn.bytes_since(caught_up));

    // A process holds the checkpoint but nothing answers on the socket (a daemon starting):
    // not "stopped".
    {
        let _held = Store::open(&state).unwrap();
        let output = run(
            sluice(&config, &["status", "--json"]),
            Duration::from_secs(60),
        )
        .await;
        assert!(output.status.success(), "{}", stderr(&output));
        let json = parse_json(&output);
        assert_eq!(json["state"], "starting", "{json}");
        assert!(
            json["warnings"]
                .to_string()
                .contains("does not answer on its control socket"),
            "{json}"
        );
        assert_eq!(
            json["applied_lsn"],
            confirmed.as_str(),
            "the target is still read"
        );
    }

    // The readable form, with JSON logs on stderr for collectors.
    let mut command = sluice(&config, &["--log-format", "json", "status"]);
    command.env("SLUICE_LOG", "sluice=debug");
    let output = run(command, Duration::from_secs(60)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("stopped (no daemon answers"), "{text}");
    assert!(
        text.contains(&format!("applied LSN           {confirmed}")),
        "{text}"
    );
    let logs = stderr(&output);
    assert!(logs.contains("no daemon answers"), "{logs}");
    for line in logs.lines() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("--log-format json printed a non-JSON line ({e}): {line}"));
        assert!(entry["level"].is_string(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_with_an_unreachable_target_prints_what_is_known_and_names_the_failure() {
    let pg = PgCluster::start();
    let source = pg.create_database("app").await;
    source
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = write_config(
        dir.path(),
        &pg.url("app"),
        &unreachable_url("target"),
        &state,
        "",
    );
    let output = run(
        sluice(&config, &["status", "--json"]),
        Duration::from_secs(60),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let json = parse_json(&output);
    assert_eq!(json["state"], "stopped");
    assert!(json["source_lsn"].is_string(), "{json}");
    assert!(json["confirmed_flush_lsn"].is_string(), "{json}");
    // Nothing applied yet: the lag counts from the slot's confirmed position.
    assert!(json["lag_bytes"].is_u64(), "{json}");
    assert_eq!(json["applied_lsn"], serde_json::Value::Null);
    let error = json["last_error"]
        .as_str()
        .expect("last_error names the failure");
    assert!(
        error.contains("Connecting to the target postgresql://postgres@127.0.0.1:1/target"),
        "{error}"
    );
    assert!(!stdout(&output).contains("sekret") && !stderr(&output).contains("sekret"));

    // The slot dropped: status says so instead of failing.
    source
        .batch_execute("SELECT pg_drop_replication_slot('sluice')")
        .await
        .unwrap();
    let output = run(
        sluice(&config, &["status", "--json"]),
        Duration::from_secs(60),
    )
    .await;
    let json = parse_json(&output);
    let warnings = json["warnings"].to_string();
    assert!(warnings.contains("Slot sluice does not exist"), "{json}");
    assert_eq!(json["confirmed_flush_lsn"], serde_json::Value::Null);
}
