//! `sluice lag`: one line per sample, `--until-below` for cutover scripts (0 once the lag is
//! under the bound, 1 on timeout), from the daemon's socket or, with the daemon down, from
//! the source and the target's position row.

use std::time::{Duration, Instant};

use sluice::checkpoint;
use sluice::control::{socket, DaemonState, SharedStatus};

use crate::ops_common::*;
use crate::support::PgCluster;

/// The lag in bytes from a `lag` line (`... lag 8022 kB ...`).
fn lag_of(line: &str) -> u64 {
    let mut words = line.split(" lag ").nth(1).unwrap_or_default().split(' ');
    let (number, unit) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let unit = if unit == "bytes" { "" } else { unit };
    sluice::config::parse_size(&format!("{number}{unit}"), "lag")
        .unwrap_or_else(|_| panic!("no lag in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_until_below_waits_for_the_daemon_to_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = write_config(
        dir.path(),
        &unreachable_url("app"),
        &unreachable_url("target"),
        &state,
        "",
    );
    let status = SharedStatus::new("sluice");
    status.update(|s| {
        s.state = DaemonState::Streaming;
        s.applied_lsn = Some("5/0".parse().unwrap());
        s.lag_bytes = Some(100 << 20);
        s.lag_seconds = Some(30.0);
        s.retained_wal_bytes = Some(2 << 30);
    });
    let _server = socket::serve(&state, status.clone()).unwrap();

    // One-shot: one line with every field, the rate measured over two samples.
    let applier = {
        let status = status.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                status.update(|s| {
                    s.applied_changes += 500;
                    s.applied_transactions += 5;
                });
            }
        })
    };
    let output = run(sluice(&config, &["lag"]), Duration::from_secs(30)).await;
    applier.await.unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains(" streaming applied 5/0 lag 100 MB 30.0 s rate "),
        "{text}"
    );
    assert!(text.contains(" retained 2048 MB"), "{text}");
    let changes_per_second: f64 = text
        .split(" rate ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rate in {text}"));
    assert!(
        (2000.0..=20000.0).contains(&changes_per_second),
        "about 10000 changes/s were applied: {text}"
    );

    // Still far behind: --timeout ends it with 1.
    let started = Instant::now();
    let output = run(
        sluice(
            &config,
            &[
                "lag",
                "--until-below",
                "10MB",
                "--timeout",
                "1s",
                "--interval",
                "200ms",
            ],
        ),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        stderr(&output).contains("above --until-below 10 MB"),
        "{}",
        stderr(&output)
    );

    // Catching up while it waits: exits 0 once the lag is at most the bound.
    let waiting = sluice(
        &config,
        &[
            "lag",
            "--until-below",
            "10MB",
            "--timeout",
            "60s",
            "--interval",
            "100ms",
        ],
    )
    .output();
    let waiting = async { (waiting.await, Instant::now()) };
    let catch_up = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        status.update(|s| s.lag_bytes = Some(20 << 20));
        tokio::time::sleep(Duration::from_millis(500)).await;
        status.update(|s| s.lag_bytes = Some(10 << 20));
        Instant::now()
    };
    let ((output, finished_at), caught_up_at) = tokio::join!(waiting, catch_up);
    let output = output.unwrap();
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}{}", stderr(&output));
    assert!(
        finished_at >= caught_up_at,
        "returned before the lag reached the bound"
    );
    assert!(
        text.lines().count() >= 3,
        "printed each sample while waiting: {text}"
    );
    assert!(
        text.lines().next().unwrap().contains("lag 100 MB"),
        "{text}"
    );
    assert!(text.contains("lag 20 MB"), "{text}");
    assert!(text.lines().last().unwrap().contains("lag 10 MB"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_until_below_with_the_daemon_down_follows_a_source_under_load() {
    let pg = PgCluster::start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    source
        .batch_execute("CREATE TABLE orders (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    source
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    checkpoint::ensure_position_table(&target).await.unwrap();
    let current_lsn = || async {
        source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let record = |lsn: String| {
        let target = &target;
        async move {
            crate::support::record_position(target, "7300000000000000001", &lsn)
                .await
                .unwrap();
        }
    };
    record(current_lsn().await).await;

    // Load: a writer on the source keeps producing WAL while the lag is watched.
    let load = {
        let writer = pg.connect("app").await;
        tokio::spawn(async move {
            for _ in 0..15 {
                writer
                    .batch_execute(
                        "INSERT INTO orders (note) SELECT repeat('x', 200) FROM generate_series(1, 2000)",
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = write_config(dir.path(), &pg.url("app"), &pg.url("target"), &state, "");

    // Behind by megabytes: a short timeout fails.
    let output = run(
        sluice(
            &config,
            &[
                "lag",
                "--until-below",
                "64kB",
                "--timeout",
                "1s",
                "--interval",
                "200ms",
            ],
        ),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(
        stdout(&output).contains(" stopped applied "),
        "{}",
        stdout(&output)
    );

    // An applier catching up (here: the test moving the position row, as `sluice run` does
    // in its apply transactions) ends the wait.
    let waiting = sluice(
        &config,
        &[
            "lag",
            "--until-below",
            "64kB",
            "--timeout",
            "60s",
            "--interval",
            "200ms",
        ],
    )
    .output();
    let waiting = async { (waiting.await, Instant::now()) };
    let catch_up = async {
        load.await.unwrap();
        let mut at = None;
        for _ in 0..20 {
            record(current_lsn().await).await;
            at.get_or_insert_with(Instant::now);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        at.unwrap()
    };
    let ((output, finished_at), caught_up_at) = tokio::join!(waiting, catch_up);
    let output = output.unwrap();
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}{}", stderr(&output));
    assert!(text.lines().count() >= 2, "{text}");
    let first = lag_of(text.lines().next().unwrap());
    assert!(
        first > 1 << 20,
        "the first sample shows megabytes of lag: {text}"
    );
    assert!(
        text.contains("rate - changes/s - tx/s"),
        "no rate without a daemon: {text}"
    );
    assert!(
        finished_at >= caught_up_at,
        "returned before the target caught up"
    );
    // The source was writing, so not exactly zero is fine; at most the bound.
    assert!(lag_of(text.lines().last().unwrap()) <= 64 << 10, "{text}");
    // Reached with no daemon: exit 0 as asked, with a note that nothing replicates.
    assert!(
        stderr(&output).contains("the lag is within the bound, but sluice run is not running"),
        "{}",
        stderr(&output)
    );

    // What waiting cannot mend (here a database that does not exist) ends the wait with
    // exit 1 and the reason, even without --timeout.
    let config = write_config(
        dir.path(),
        &pg.url("nosuchdb"),
        &pg.url("target"),
        &state,
        "",
    );
    let output = run(
        sluice(
            &config,
            &["lag", "--until-below", "64kB", "--interval", "200ms"],
        ),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stderr(&output).contains("nosuchdb"), "{}", stderr(&output));

    // No slot yet (`run` not started): the wait goes on, and each line says why the lag
    // is unknown.
    source
        .batch_execute("SELECT pg_drop_replication_slot('sluice')")
        .await
        .unwrap();
    pg.create_database("fresh").await;
    pg.create_database("fresh_target").await;
    let config = write_config(
        dir.path(),
        &pg.url("fresh"),
        &pg.url("fresh_target"),
        &dir.path().join("fresh-state"),
        "",
    );
    let output = run(
        sluice(
            &config,
            &[
                "lag",
                "--until-below",
                "64kB",
                "--interval",
                "200ms",
                "--timeout",
                "1s",
            ],
        ),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(
        text.lines()
            .next()
            .is_some_and(|line| line.contains(" lag - ")
                && line.contains("note: Slot sluice does not exist on the source")),
        "{text}"
    );
}

/// Output into a pipe whose reader has gone (`sluice status | head -1`, `sluice lag --follow
/// | grep -m1 ...`) panicked on the first write after it closed. It is dropped now: `status`
/// ends as it would, and `lag --follow`, which only prints, ends with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_ends_quietly() {
    let pg = PgCluster::start();
    let source = pg.create_database("app").await;
    let target = pg.create_database("target").await;
    source
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    checkpoint::ensure_position_table(&target).await.unwrap();
    let lsn: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    crate::support::record_position(&target, "7300000000000000001", &lsn)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = write_config(dir.path(), &pg.url("app"), &pg.url("target"), &state, "");

    for args in [
        &["status"][..],
        &["status", "--json"],
        &["lag", "--follow", "--interval", "100ms"],
    ] {
        let mut command = sluice(&config, args);
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        // The reader goes away before sluice has anything to say.
        drop(child.stdout.take());
        let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{args:?} went on after its reader had gone"))
            .unwrap();
        let errors = stderr(&output);
        assert!(!errors.contains("panicked"), "{args:?}: {errors}");
        assert_eq!(output.status.code(), Some(0), "{args:?}: {errors}");
    }
}

/// A one-shot `lag` that cannot read the source or the target prints why and exits 1: a
/// script's `sluice lag || alert` must not take an unknown lag for success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_lag_that_cannot_measure_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &unreachable_url("app"),
        &unreachable_url("target"),
        &dir.path().join("state"),
        "",
    );
    let output = run(sluice(&config, &["lag"]), Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains(" lag - ") && text.contains("error: "),
        "{text}"
    );
}

/// Before the first `sluice run` (or after `teardown`) there is no slot, so there is no lag
/// to measure: a one-shot says why and exits 1, as when the source cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_lag_before_the_slot_exists_exits_1() {
    let pair =
        crate::support::sluice::Pair::with_schema("CREATE TABLE t (id int PRIMARY KEY);").await;
    let config = pair.config("");
    let (code, stdout, stderr) =
        crate::support::sluice::sluice(&["lag", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(" lag - ") && stdout.contains("Slot sluice does not exist on the source"),
        "{stdout}"
    );
}
