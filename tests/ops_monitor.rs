//! WAL-retention safety: the monitor keeps the slot's figures in the status, warns over the
//! bound, rides out a source restart, and stops with a definite error when the slot is lost
//! or dropped.

use std::time::{Duration, Instant};

use sluice::config::{Config, Overrides};
use sluice::control::{monitor, SharedStatus};
use sluice::ErrorKind;

use crate::ops_common::*;
use crate::support::PgCluster;

fn config(pg: &PgCluster, retained_wal_warn: &str) -> Config {
    let text = format!(
        "[source]\nurl = {:?}\n[target]\nurl = {:?}\n[monitor]\ninterval = \"100ms\"\nretained_wal_warn = {retained_wal_warn:?}\n",
        pg.url("postgres"),
        pg.url("target")
    );
    Config::parse(&text, "test", &Overrides::default()).unwrap()
}

async fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_tracks_the_slot_warns_survives_a_restart_and_stops_when_the_slot_goes() {
    let (pg, client) = PgCluster::start_with_client().await;
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    let config = config(&pg, "1MB");
    let status = SharedStatus::new("sluice");
    status.update(|s| s.caught_up_lsn = Some(sluice::Lsn(1)));
    let state = tempfile::tempdir().unwrap();
    let store = sluice::checkpoint::Store::open(state.path()).unwrap();
    let task = {
        let status = status.clone();
        tokio::spawn(async move { monitor::run(&config, status, store).await })
    };

    wait_for("a first sample", Duration::from_secs(10), || {
        let s = status.snapshot();
        s.confirmed_flush_lsn.is_some() && s.restart_lsn.is_some() && s.source_lsn.is_some()
    })
    .await;
    let report = status.snapshot();
    assert_eq!(report.wal_status.as_deref(), Some("reserved"));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(
        report.lag_bytes,
        Some(report.source_lsn.unwrap().0 - 1),
        "lag = source position - caught-up position"
    );

    // Two megabytes of WAL the slot must keep: over the 1MB bound.
    client
        .batch_execute(
            "CREATE TABLE filler (v text);
             INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000);",
        )
        .await
        .unwrap();
    wait_for("the retained-WAL warning", Duration::from_secs(10), || {
        status.snapshot().warnings.iter().any(|w| {
            w.starts_with("Retained WAL") && w.contains("monitor.retained_wal_warn 1024 kB")
        })
    })
    .await;
    assert!(status.snapshot().retained_wal_bytes.unwrap() > 1 << 20);

    // The source restarts: the monitor is not fatal, it picks up again.
    drop(client);
    pg.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !task.is_finished(),
        "a source outage must not end the monitor"
    );
    pg.start_again();
    let client = pg.connect("postgres").await;
    client
        .batch_execute("INSERT INTO filler VALUES ('after the restart')")
        .await
        .unwrap();
    let now: sluice::Lsn = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    wait_for(
        "a sample after the restart",
        Duration::from_secs(30),
        || status.snapshot().source_lsn.is_some_and(|l| l >= now),
    )
    .await;
    assert!(!task.is_finished());

    // The slot dropped behind sluice's back: a definite error that says what to do.
    client
        .batch_execute("SELECT pg_drop_replication_slot('sluice')")
        .await
        .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the monitor stops when the slot disappears")
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Definite);
    let text = error.to_string();
    assert!(
        text.contains("disappeared") && text.contains("fresh copy"),
        "{text}"
    );
    assert!(status.snapshot().last_error.unwrap().contains("fresh copy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_the_source_invalidated_is_a_definite_error_asking_for_a_fresh_copy() {
    let pg = PgCluster::builder()
        .setting("max_slot_wal_keep_size", "'1MB'")
        .start();
    let client = pg.connect("postgres").await;
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE filler (v text)")
        .await
        .unwrap();
    // Push the slot's restart_lsn more than max_slot_wal_keep_size behind, then let a
    // checkpoint invalidate it.
    let mut lost = false;
    for _ in 0..10 {
        client
            .batch_execute(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 500);
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
        client.batch_execute("CHECKPOINT").await.unwrap();
        let status: Option<String> = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'sluice'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            lost = true;
            break;
        }
    }
    assert!(lost, "the source did not invalidate the slot");

    let status = SharedStatus::new("sluice");
    let state = tempfile::tempdir().unwrap();
    let store = sluice::checkpoint::Store::open(state.path()).unwrap();
    let error = tokio::time::timeout(
        Duration::from_secs(10),
        monitor::run(&config(&pg, "10GB"), status.clone(), store),
    )
    .await
    .expect("the monitor stops on a lost slot")
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Definite);
    let text = error.to_string();
    assert!(text.contains("wal_status = lost"), "{text}");
    assert!(text.contains("A fresh copy is needed"), "{text}");
    let report = status.snapshot();
    assert_eq!(report.wal_status.as_deref(), Some("lost"));
    assert!(report.last_error.unwrap().contains("fresh copy"));

    // `sluice status` with the daemon down says the same.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg.url("postgres"),
        &pg.url("target"),
        &dir.path().join("state"),
        "",
    );
    let output = run(
        sluice(&config, &["status", "--json"]),
        Duration::from_secs(60),
    )
    .await;
    let json = parse_json(&output);
    assert_eq!(json["wal_status"], "lost");
    let last_error = json["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("A fresh copy is needed"), "{json}");

    // And `check` FAILs it, as `run` refuses it (it said PASS "already exists").
    let output = run(sluice(&config, &["check"]), Duration::from_secs(60)).await;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FAIL")
            && l.contains("was invalidated by the source")
            && l.contains("A fresh copy is needed")),
        "{text}"
    );
    assert!(!text.contains("already exists"), "{text}");
}
