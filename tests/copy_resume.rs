//! Interrupted copies resume without losing or doubling a row.
//!
//! 1. A copy connection dies in the middle (the snapshot is still held by this process):
//!    the chunk is retried under the same snapshot, finished chunks are kept, no temporary
//!    slot is needed.
//! 2. The copying process dies (the task is aborted, as `kill -9` would end it: its
//!    replication session, snapshot and open transactions go with it): the next start keeps
//!    the finished tables, empties the half-copied one on the target and copies it again
//!    under a temporary slot's snapshot, and records that slot's consistent point as the
//!    table's sync LSN. Replaying the permanent slot's changes with that rule gives exactly
//!    the source's rows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sluice::checkpoint::Store;
use sluice::control::TableState;
use sluice::snapshot::state;
use sluice::snapshot::{copy_finished, initial_copy, table_sync_positions};
use sluice::source::slot::slot_info;
use sluice::source::TableName;

use crate::copy_common::{peek_changes, start_pair, Change, Pair};

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Makes the copy into `table` on the target take a while, so a test can interrupt it in the
/// middle: a trigger that sleeps on every 500th row. ENABLE ALWAYS, because the copy runs
/// with session_replication_role = replica, which skips ordinary triggers.
async fn slow_down(target: &tokio_postgres::Client, table: &str) {
    target
        .batch_execute(&format!(
            "CREATE FUNCTION slow_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.id % 500 = 0 THEN PERFORM pg_sleep(0.05); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER slow BEFORE INSERT ON {table}
                 FOR EACH ROW EXECUTE FUNCTION slow_{table}();
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER slow;"
        ))
        .await
        .unwrap();
}

fn big() -> TableName {
    TableName::new("public", "big")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_copy_connection_is_retried_under_the_same_snapshot() {
    let pair = start_pair().await;
    pair.schema("CREATE TABLE big (id int8 PRIMARY KEY, payload text NOT NULL)")
        .await;
    pair.src
        .batch_execute(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 30000) g;
             ANALYZE big;",
        )
        .await
        .unwrap();
    slow_down(&pair.dst, "big").await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(1, "512kB", dir.path()), &store)
        .await;
    let status = ctx.status.clone();
    let copy = tokio::spawn(async move { initial_copy(&ctx).await });

    // Once the first chunk is recorded, kill the copy's source backend.
    wait_for("the first chunk", || {
        !state::done_chunks(&store, &big(), 0).unwrap().is_empty()
    })
    .await;
    let killed =
        crate::support::terminate_backends(&pair.src, "application_name = 'sluice copy'").await;
    let finished_when_killed = state::load_tables(&store).unwrap()[0].finished;
    assert_eq!(status.snapshot().tables[0].state, TableState::Copying);
    assert_eq!(killed, 1, "one copy backend was running");
    assert!(
        !finished_when_killed,
        "the kill landed before the copy ended"
    );

    let outcome = copy.await.unwrap().expect("the copy recovers");
    assert_eq!(outcome.rows, 30000);
    pair.assert_same("big", "id, payload").await;
    // Still the first snapshot: no temporary slot, no sync LSN, every chunk of generation 0.
    let copy_state = state::load_state(&store).unwrap().unwrap();
    assert_eq!(copy_state.generation, 0);
    assert!(table_sync_positions(&store).unwrap().is_empty());
    let record = &state::load_tables(&store).unwrap()[0];
    assert!(record.chunks.len() > 5);
    assert_eq!(
        state::done_chunks(&store, &big(), 0).unwrap().len(),
        record.chunks.len()
    );
}

/// A TCP proxy to the target port that forwards everything, except that the first COMMIT a
/// connection sends after a COPY (while `armed`) reaches the target and its reply never
/// comes back: the connection is closed instead. The chunk committed; its client cannot
/// tell.
async fn commit_reply_losing_proxy(
    target_port: u16,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let armed = std::sync::Arc::new(AtomicBool::new(true));
    let armed_for_proxy = armed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let armed = armed_for_proxy.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let back = tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = from_server.read(&mut buf).await {
                        if n == 0 || to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buf = vec![0u8; 65536];
                let mut copied = false;
                while let Ok(n) = from_client.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    copied |= contains(&buf[..n], b"COPY ");
                    let lose_reply = copied
                        && contains(&buf[..n], b"COMMIT\0")
                        && armed.swap(false, Ordering::SeqCst);
                    if lose_reply {
                        // Nothing is owed to the client before its COMMIT: stop the way back
                        // first, so the reply cannot slip through.
                        back.abort();
                        let _ = to_server.write_all(&buf[..n]).await;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        return;
                    }
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                back.abort();
            });
        }
    });
    (port, armed)
}

/// The target's reply to a chunk's COMMIT lost (a network drop, a target restarting right
/// after the commit): the chunk did commit, and retrying it copied its rows a second time
/// (a table without a key kept both; with a deferred key its build failed). The copy asks
/// the target how the transaction ended before retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_commit_reply_does_not_copy_a_chunk_twice() {
    let pair = start_pair().await;
    pair.schema("CREATE TABLE big (id int8, payload text NOT NULL)")
        .await;
    pair.src
        .batch_execute(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 30000) g;
             ANALYZE big;",
        )
        .await
        .unwrap();
    let (proxy_port, armed) = commit_reply_losing_proxy(pair.target.port).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let text = format!(
        "[source]\nurl = \"{}\"\n[target]\nurl = \"postgresql://postgres@127.0.0.1:{proxy_port}/app\"\n[copy]\njobs = 2\nsplit_tables_larger_than = \"512kB\"\n[state]\ndir = \"{}\"\n",
        pair.source.url("app"),
        dir.path().display()
    );
    let config = sluice::config::Config::parse(&text, "test", &Default::default()).unwrap();
    let ctx = pair.context(config, &store).await;
    let outcome = initial_copy(&ctx).await.expect("the copy goes on");
    assert!(
        !armed.load(std::sync::atomic::Ordering::SeqCst),
        "a COMMIT reply was lost"
    );
    assert_eq!(outcome.rows, 30000);
    pair.assert_same("big", "id, payload").await;
}

/// Tables an earlier process left half copied are emptied before they are copied again. A
/// foreign key between two of them made TRUNCATE refuse the referenced one alone, and every
/// restart failed the same way: they are emptied in one TRUNCATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_copied_tables_linked_by_a_foreign_key_are_emptied_together() {
    let pair = start_pair().await;
    pair.schema(
        "CREATE TABLE parent (id int8 PRIMARY KEY, payload text NOT NULL);
         CREATE TABLE child (id int8 PRIMARY KEY, parent_id int8 NOT NULL, payload text NOT NULL);",
    )
    .await;
    pair.dst
        .batch_execute("ALTER TABLE child ADD FOREIGN KEY (parent_id) REFERENCES parent (id)")
        .await
        .unwrap();
    pair.src
        .batch_execute(
            "INSERT INTO parent SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 30000) g;
             INSERT INTO child SELECT g, g, repeat(md5(g::text), 2) FROM generate_series(1, 20000) g;
             ANALYZE;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();
    slow_down(&pair.dst, "parent").await;
    let parent = TableName::new("public", "parent");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let config = pair.config(1, "256kB", dir.path());
    let ctx = pair.context(config.clone(), &store).await;
    let copy = tokio::spawn(async move { initial_copy(&ctx).await });
    wait_for("one chunk of parent", || {
        !state::done_chunks(&store, &parent, 0).unwrap().is_empty()
    })
    .await;
    copy.abort();
    assert!(copy.await.unwrap_err().is_cancelled());
    let records = state::load_tables(&store).unwrap();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| !r.finished), "both cut off");

    // A new process: both are emptied (in one TRUNCATE) and copied again.
    let ctx = pair.context(config, &store).await;
    initial_copy(&ctx).await.expect("resumed copy");
    pair.assert_same("parent", "id, payload").await;
    pair.assert_same("child", "id, parent_id, payload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_copy_resumes_under_a_temporary_slot_with_a_sync_lsn() {
    let pair = start_pair().await;
    pair.schema(
        "CREATE TABLE kept (id int8 PRIMARY KEY, payload text NOT NULL);
         CREATE TABLE redone (id int8 PRIMARY KEY, payload text NOT NULL);",
    )
    .await;
    pair.src
        .batch_execute(
            "INSERT INTO kept SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 40000) g;
             INSERT INTO redone SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 6000) g;
             ANALYZE;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();
    slow_down(&pair.dst, "redone").await;
    let redone = TableName::new("public", "redone");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Both tables are split at 256 kB; with one job and the largest chunks first, all of
    // kept's chunks (about 250 kB each) go before redone's (about 200 kB each, slow).
    let config = pair.config(1, "256kB", dir.path());
    let ctx = pair.context(config.clone(), &store).await;
    let copy = tokio::spawn(async move { initial_copy(&ctx).await });
    wait_for("kept and one chunk of redone", || {
        let kept_done = state::load_tables(&store)
            .unwrap()
            .iter()
            .any(|r| r.name.name == "kept" && r.finished);
        kept_done && !state::done_chunks(&store, &redone, 0).unwrap().is_empty()
    })
    .await;
    copy.abort();
    assert!(copy.await.unwrap_err().is_cancelled());
    let records = state::load_tables(&store).unwrap();
    let redone_record = records.iter().find(|r| r.name == redone).unwrap();
    assert!(!redone_record.finished, "redone was cut off half way");
    assert!(redone_record.chunks.len() > 1);
    let first_point = state::load_state(&store).unwrap().unwrap().consistent_point;

    // The source moves on while sluice is down.
    pair.src
        .batch_execute(
            "INSERT INTO kept SELECT g, 'late' FROM generate_series(900001, 900010) g;
             INSERT INTO redone SELECT g, 'late' FROM generate_series(900001, 900010) g;
             DELETE FROM redone WHERE id <= 5;",
        )
        .await
        .unwrap();

    // A new process: fresh status, same state dir.
    let ctx = pair.context(config, &store).await;
    let outcome = initial_copy(&ctx).await.expect("resumed copy");
    assert!(copy_finished(&store).unwrap());
    assert_eq!(outcome.consistent_point, first_point);
    assert_eq!(outcome.tables_copied, 2);
    let copy_state = state::load_state(&store).unwrap().unwrap();
    assert_eq!(copy_state.generation, 1, "one temporary slot was used");
    let sync = table_sync_positions(&store).unwrap();
    assert_eq!(
        sync.keys().cloned().collect::<Vec<_>>(),
        vec![redone.clone()]
    );
    assert!(sync[&redone] > first_point);
    // redone's chunks of the dead snapshot are forgotten; all of the new ones are there.
    assert!(state::done_chunks(&store, &redone, 0).unwrap().is_empty());
    assert_eq!(
        state::done_chunks(&store, &redone, 1).unwrap().len(),
        state::load_tables(&store)
            .unwrap()
            .iter()
            .find(|r| r.name == redone)
            .unwrap()
            .chunks
            .len()
    );

    // redone is the source's current content (copied again); kept is what the first
    // snapshot saw (its later rows come from the stream).
    pair.assert_same("redone", "id, payload").await;
    assert_eq!(Pair::ids(&pair.dst, "kept").await.len(), 40000);

    // Replaying the permanent slot with the sync rule (skip a table's transactions that
    // commit before its sync LSN) gives the source exactly.
    let mut rows: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for table in ["kept", "redone"] {
        rows.insert(
            format!("public.{table}"),
            Pair::ids(&pair.dst, table).await.into_iter().collect(),
        );
    }
    let sync_by_name: BTreeMap<String, sluice::Lsn> = sync
        .iter()
        .map(|(name, lsn)| (name.qualified(), *lsn))
        .collect();
    let mut skipped = 0;
    for change in peek_changes(&pair.src, "sluice", "sluice").await {
        let (Change::Insert { commit, table, .. } | Change::Delete { commit, table, .. }) = &change;
        if sync_by_name.get(table).is_some_and(|lsn| commit < lsn) {
            skipped += 1;
            continue;
        }
        let set = rows.get_mut(table).unwrap();
        match change {
            Change::Insert { id, .. } => assert!(set.insert(id), "{id} doubled"),
            Change::Delete { id, .. } => assert!(set.remove(&id), "{id} missing"),
        }
    }
    assert_eq!(
        skipped, 15,
        "redone's writes while down are in its new copy"
    );
    for table in ["kept", "redone"] {
        let source: BTreeSet<i64> = Pair::ids(&pair.src, table).await.into_iter().collect();
        assert_eq!(rows[&format!("public.{table}")], source, "{table}");
    }

    // The permanent slot stays; the temporary one is gone with its session.
    assert!(slot_info(&pair.src, "sluice").await.unwrap().is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let temporary: i64 = pair
            .src
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'sluice_sync%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if temporary == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the temporary slot outlived its session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A crash between creating the slot and recording it (or a slot made by hand) leaves a slot
/// whose snapshot is gone: every table is copied under a temporary slot, with a sync LSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_without_a_recorded_copy_gives_every_table_a_sync_lsn() {
    let pair = start_pair().await;
    pair.schema("CREATE TABLE t (id int8 PRIMARY KEY, v text)")
        .await;
    pair.src
        .batch_execute(
            "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 1000) g;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();
    // Separate statements: a slot cannot be created in a transaction that wrote.
    pair.src
        .batch_execute("SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")
        .await
        .unwrap();
    for id in 1001..=1010i64 {
        pair.src
            .execute("INSERT INTO t VALUES ($1, 'after the slot')", &[&id])
            .await
            .unwrap();
    }
    let slot_point = slot_info(&pair.src, "sluice")
        .await
        .unwrap()
        .unwrap()
        .confirmed_flush_lsn
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(2, "10GB", dir.path()), &store)
        .await;
    let outcome = initial_copy(&ctx).await.expect("copy");
    assert_eq!(outcome.consistent_point, slot_point);
    assert_eq!(state::load_state(&store).unwrap().unwrap().generation, 1);
    let sync = table_sync_positions(&store).unwrap();
    let t = TableName::new("public", "t");
    assert!(sync[&t] > slot_point);
    pair.assert_same("t", "id, v").await;
    // The ten rows written after the slot are both in the copy and in the slot: the sync
    // LSN must tell streaming to skip them.
    let changes = peek_changes(&pair.src, "sluice", "sluice").await;
    assert_eq!(changes.len(), 10);
    for change in changes {
        let Change::Insert { commit, .. } = change else {
            panic!("{change:?}")
        };
        assert!(commit < sync[&t], "a copied row would be applied again");
    }
}

/// The session holding the snapshot dies while the copy runs (its walsender is terminated):
/// chunks already under way finish, the next import fails, and the same call carries on
/// under a temporary slot's snapshot with a sync LSN, never mixing the two snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_lost_in_the_middle_is_replaced_in_the_same_call() {
    let pair = start_pair().await;
    pair.schema("CREATE TABLE big (id int8 PRIMARY KEY, payload text NOT NULL)")
        .await;
    pair.src
        .batch_execute(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 20000) g;
             ANALYZE big;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();
    slow_down(&pair.dst, "big").await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(1, "256kB", dir.path()), &store)
        .await;
    let copy = tokio::spawn(async move { initial_copy(&ctx).await });
    wait_for("the first chunk", || {
        !state::done_chunks(&store, &big(), 0).unwrap().is_empty()
    })
    .await;
    let killed = crate::support::terminate_backends(&pair.src, "backend_type = 'walsender'").await;
    assert_eq!(killed, 1);
    assert!(!state::load_tables(&store).unwrap()[0].finished);

    copy.await.unwrap().expect("the copy carries on");
    let copy_state = state::load_state(&store).unwrap().unwrap();
    assert_eq!(copy_state.generation, 1);
    let sync = table_sync_positions(&store).unwrap();
    assert!(sync[&big()] > copy_state.consistent_point);
    let record = &state::load_tables(&store).unwrap()[0];
    assert_eq!(record.generation, 1);
    assert_eq!(
        state::done_chunks(&store, &big(), 1).unwrap().len(),
        record.chunks.len()
    );
    assert!(state::done_chunks(&store, &big(), 0).unwrap().is_empty());
    pair.assert_same("big", "id, payload").await;
    assert!(slot_info(&pair.src, "sluice").await.unwrap().is_some());
}

/// A source database that ends sessions idle in a transaction (managed services and careful
/// DBAs set `idle_in_transaction_session_timeout`): the session holding the exported
/// snapshot sits idle in its transaction for the whole copy, and must not be ended by it,
/// or every round of a long copy would lose its snapshot and start over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_transaction_timeout_on_the_source_does_not_end_the_snapshot() {
    let pair = start_pair().await;
    pair.schema(
        "CREATE TABLE big (id int8 PRIMARY KEY, v text);
         CREATE TABLE small (id int8 PRIMARY KEY, v text);",
    )
    .await;
    pair.src
        .batch_execute(
            "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g;
             INSERT INTO small SELECT g, 'y' FROM generate_series(1, 10) g;
             CREATE PUBLICATION sluice FOR ALL TABLES;
             ALTER DATABASE app SET idle_in_transaction_session_timeout = '500ms';",
        )
        .await
        .unwrap();
    // `big` (copied first, one job) takes about 2 s on the target; `small` imports the
    // snapshot after that.
    slow_down(&pair.dst, "big").await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(1, "10GB", dir.path()), &store)
        .await;
    let started = Instant::now();
    initial_copy(&ctx).await.expect("initial copy");
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the copy outlasted the timeout ({:?})",
        started.elapsed()
    );
    let copy_state = state::load_state(&store).unwrap().expect("copy state");
    assert_eq!(
        copy_state.generation, 0,
        "the slot's own snapshot lasted the whole copy (no temporary slot was needed)"
    );
    pair.assert_same("big", "id, v").await;
    pair.assert_same("small", "id, v").await;
}
