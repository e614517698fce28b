//! `sluice teardown`: refuses without --yes (no terminal), while the daemon holds the state
//! dir, and while the slot is active; then leaves no slot, publication or sluice schema.

use std::time::{Duration, Instant};

use crate::cutover_common::{show, Setup};

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn leftovers(setup: &Setup) -> (i64, i64, i64) {
    (
        count(
            &setup.source,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'sluice'",
        )
        .await,
        count(
            &setup.source,
            "SELECT count(*) FROM pg_publication WHERE pubname = 'sluice'",
        )
        .await,
        count(
            &setup.target,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'sluice'",
        )
        .await,
    )
}

#[tokio::test]
async fn teardown_refuses_until_safe_then_drops_everything() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE TABLE public.t (id int PRIMARY KEY);
             CREATE PUBLICATION sluice FOR TABLE public.t;",
        )
        .await
        .unwrap();
    setup
        .source
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    sluice::checkpoint::ensure_position_table(&setup.target)
        .await
        .unwrap();

    // No terminal, no --yes.
    let output = setup.sluice(&["teardown"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    assert!(show(&output).contains("Pass --yes"), "{}", show(&output));
    assert_eq!(leftovers(&setup).await, (1, 1, 1));

    // A daemon holds the state dir.
    let state = setup.dir.path().join("state");
    {
        let _store = sluice::checkpoint::Store::open(&state).unwrap();
        let status = sluice::control::SharedStatus::new("sluice");
        status.update(|s| s.pid = Some(4242));
        let _socket = sluice::control::socket::serve(&state, status).unwrap();
        let output = setup.sluice(&["teardown", "--yes"]).await;
        assert_eq!(output.status.code(), Some(1), "{}", show(&output));
        assert!(show(&output).contains("stop it first"), "{}", show(&output));
        assert!(show(&output).contains(", PID 4242)"), "{}", show(&output));
    }

    // The slot is streaming to someone (a daemon on another machine).
    let mut receiver =
        std::process::Command::new(sluice::cutover::find_pg_tool("pg_recvlogical").unwrap())
            .args([
                "--dbname",
                &setup.pg.dsn("src"),
                "--slot",
                "sluice",
                "--start",
                "--file",
                "/dev/null",
            ])
            .args(["-o", "proto_version=1", "-o", "publication_names=sluice"])
            .spawn()
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(
        &setup.source,
        "SELECT count(*) FROM pg_replication_slots WHERE active",
    )
    .await
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "pg_recvlogical did not start streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = setup.sluice(&["teardown", "--yes"]).await;
    let _ = receiver.kill();
    let _ = receiver.wait();
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(show(&output).contains("in use by PID"), "{}", show(&output));
    assert_eq!(leftovers(&setup).await, (1, 1, 1));

    let deadline = Instant::now() + Duration::from_secs(20);
    while count(
        &setup.source,
        "SELECT count(*) FROM pg_replication_slots WHERE active",
    )
    .await
        > 0
    {
        assert!(Instant::now() < deadline, "the slot stayed active");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = setup.sluice(&["teardown", "--yes"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert_eq!(leftovers(&setup).await, (0, 0, 0));
    // The application's data stays.
    assert_eq!(
        count(&setup.source, "SELECT count(*) FROM public.t").await,
        0
    );

    // Nothing left: a second teardown says so.
    let output = setup.sluice(&["teardown", "--yes"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert!(
        show(&output).contains("Nothing to tear down"),
        "{}",
        show(&output)
    );
}

#[tokio::test]
async fn teardown_works_on_a_source_frozen_by_cutover() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE TABLE public.t (id int PRIMARY KEY);
             CREATE PUBLICATION sluice FOR TABLE public.t;",
        )
        .await
        .unwrap();
    for sql in [
        "SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')",
        "ALTER DATABASE src SET default_transaction_read_only = on",
    ] {
        setup.source.batch_execute(sql).await.unwrap();
    }
    let output = setup.sluice(&["teardown", "--yes"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert_eq!(leftovers(&setup).await, (0, 0, 0));
}

/// Another migration from the same source database into another target (its position row
/// is not on this target) streams through the same default publication: dropping it under
/// that slot would end that migration for good. Left, naming the slot.
#[tokio::test]
async fn teardown_leaves_the_publication_a_slot_into_another_target_uses() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE TABLE public.t (id int PRIMARY KEY);
             CREATE PUBLICATION sluice FOR TABLE public.t;",
        )
        .await
        .unwrap();
    for slot in ["sluice", "elsewhere"] {
        setup
            .source
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
    }
    sluice::checkpoint::ensure_position_table(&setup.target)
        .await
        .unwrap();
    let output = setup.sluice(&["teardown", "--yes"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let text = show(&output);
    assert!(
        text.contains("LEFT publication sluice: slot(s) elsewhere of this source database"),
        "{text}"
    );
    assert_eq!(leftovers(&setup).await, (0, 1, 0));
}

/// Two migrations from one source into one target, each with its own slot, sharing the
/// default publication name and the target's `sluice` schema: tearing one down leaves what
/// the other still uses. A publication this user may not drop is left for its owner, after
/// everything else is done (the slot no longer goes first and the rest stays stuck).
#[tokio::test]
async fn teardown_leaves_what_another_migration_uses_and_what_it_may_not_drop() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE TABLE public.t (id int PRIMARY KEY);
             CREATE PUBLICATION sluice FOR TABLE public.t;",
        )
        .await
        .unwrap();
    for slot in ["sluice", "other"] {
        setup
            .source
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
    }
    sluice::checkpoint::ensure_position_table(&setup.target)
        .await
        .unwrap();
    setup
        .target
        .batch_execute(
            "INSERT INTO sluice.applied_position (slot, source_system_identifier, applied_lsn, caught_up_lsn)
             VALUES ('sluice', '1', '0/0', '0/0'), ('other', '1', '0/0', '0/0')",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["teardown", "--yes"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let text = show(&output);
    assert!(
        text.contains("LEFT publication sluice: slot(s) other of this source database"),
        "{text}"
    );
    assert_eq!(leftovers(&setup).await, (0, 1, 1));
    let slots: Vec<String> = setup
        .target
        .query("SELECT slot FROM sluice.applied_position", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, ["other"]);

    // The other migration, torn down as a user who does not own the publication.
    setup
        .source
        .batch_execute("CREATE ROLE migrator LOGIN REPLICATION")
        .await
        .unwrap();
    let config = setup.dir.path().join("other.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\nslot = \"other\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n",
            setup.pg.url("src").replace("postgres@", "migrator@"),
            setup.pg.url("dst"),
            setup.dir.path().join("other-state").display()
        ),
    )
    .unwrap();
    let output = setup.sluice_with(&config, &["teardown", "--yes"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let text = show(&output);
    assert!(
        text.contains("LEFT publication sluice: owned by postgres")
            && text.contains("DROPPED replication slot other")
            && text.contains("DROPPED schema sluice on the target"),
        "{text}"
    );
    assert_eq!(
        count(&setup.source, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
}
