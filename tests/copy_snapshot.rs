//! The copy sees exactly the exported snapshot, and the slot holds exactly what came after:
//! with a writer inserting and deleting on the source all through the copy, the copied rows
//! plus the slot's changes (replayed in order) give the source's final rows, with no change
//! applied to a row twice and none missing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice::checkpoint::Store;
use sluice::control::{DaemonState, TableState};
use sluice::snapshot::state::ChunkRange;
use sluice::snapshot::{copy_finished, initial_copy, plan, table_sync_positions};
use sluice::source::slot::slot_info;

use crate::copy_common::{peek_changes, start_pair, Change, Pair, DB};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_sees_the_snapshot_and_the_slot_holds_every_later_write_once() {
    let pair = start_pair().await;
    pair.schema(
        "CREATE TABLE items (id int8 PRIMARY KEY, v text NOT NULL);
         CREATE TABLE big (id int8 PRIMARY KEY, payload text NOT NULL);",
    )
    .await;
    pair.src
        .batch_execute(
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20000) g;
             INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 60000) g;
             ANALYZE;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();

    // A writer: one transaction per statement, inserts above 1_000_000 and deletes of the
    // original rows, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = pair.source.connect(DB).await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                client
                    .execute("INSERT INTO items VALUES ($1, 'late')", &[&(1_000_000 + n)])
                    .await
                    .unwrap();
                client
                    .execute("DELETE FROM items WHERE id = $1", &[&(n * 7)])
                    .await
                    .unwrap();
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Many chunks, few jobs: the copy takes a while, and the writer keeps going meanwhile.
    let ctx = pair
        .context(pair.config(2, "256kB", dir.path()), &store)
        .await;
    let outcome = initial_copy(&ctx).await.expect("initial copy");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 10, "the writer ran during the copy ({written})");

    assert!(copy_finished(&store).unwrap());
    // `sluice status` shows every table copied, with its rows.
    let report = ctx.status.snapshot();
    assert_eq!(
        report.state,
        DaemonState::Copying,
        "streaming is the caller's to set"
    );
    let big_status = report
        .tables
        .iter()
        .find(|t| t.name == "public.big")
        .unwrap();
    assert_eq!(
        (big_status.state, big_status.rows_copied),
        (TableState::Copied, 60000)
    );
    assert!(report.tables.iter().all(|t| t.state == TableState::Copied));
    assert!(table_sync_positions(&store).unwrap().is_empty());
    assert_eq!(outcome.tables_copied, 2);
    let slot = slot_info(&pair.src, "sluice").await.unwrap().expect("slot");
    assert_eq!(slot.plugin.as_deref(), Some("pgoutput"));
    assert!(!slot.temporary);
    assert_eq!(
        slot.confirmed_flush_lsn,
        Some(outcome.consistent_point),
        "streaming starts at the consistent point"
    );

    // `big` was split (about 3 MB in 256 kB chunks) and is copied exactly.
    let records = sluice::snapshot::state::load_tables(&store).unwrap();
    let big = records.iter().find(|r| r.name.name == "big").unwrap();
    assert!(big.chunks.len() > 5, "big is split: {:?}", big.chunks.len());
    assert_eq!(big.rows, 60000);
    pair.assert_same("big", "id, payload").await;
    // Each chunk reads only its blocks: the chunk query plans as a TID range scan.
    let table = crate::copy_common::table(&ctx.tables, "public.big");
    let layout = plan::table_layout(&pair.src, &pair.dst, table)
        .await
        .unwrap();
    let copy_sql = plan::source_copy_sql(&layout, big.chunks[1]).unwrap();
    let select = copy_sql
        .strip_prefix("COPY (")
        .and_then(|rest| rest.split(") TO STDOUT").next())
        .unwrap();
    let explain: Vec<String> = pair
        .src
        .query(&format!("EXPLAIN {select}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        explain[0].contains("Tid Range Scan"),
        "{copy_sql}: {explain:?}"
    );

    // Replay the slot's changes on the copied ids: every insert is new, every delete hits a
    // row that is there, and the result is the source's final state.
    let mut rows: BTreeSet<i64> = Pair::ids(&pair.dst, "items").await.into_iter().collect();
    let copied_late = rows.iter().filter(|id| **id > 1_000_000).count();
    let changes = peek_changes(&pair.src, "sluice", "sluice").await;
    let mut streamed = 0;
    for change in changes {
        match change {
            Change::Insert { table, id, commit } if table == "public.items" => {
                assert!(commit >= outcome.consistent_point);
                assert!(
                    rows.insert(id),
                    "insert of {id} is both copied and streamed"
                );
                streamed += 1;
            }
            Change::Delete { table, id, .. } if table == "public.items" => {
                assert!(rows.remove(&id), "delete of {id}: the row was never copied");
                streamed += 1;
            }
            _ => {}
        }
    }
    let source_rows: BTreeSet<i64> = Pair::ids(&pair.src, "items").await.into_iter().collect();
    assert_eq!(rows, source_rows, "copy + stream = source");
    assert!(
        streamed > 0 && copied_late > 0,
        "writes fell on both sides of the snapshot ({copied_late} in the copy, {streamed} streamed)"
    );
}

/// Splitting by primary-key ranges (what sources before PostgreSQL 14 get, forced here with
/// `copy.split_by`): chunks follow the key's histogram, so skewed ids still give chunks of
/// similar size; every key, negative, huge or written during the copy, lands exactly once;
/// tables without a single-column integer key fall back to ctid ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_key_chunks_cover_every_key_once_and_follow_its_distribution() {
    let pair = start_pair().await;
    pair.schema(
        "CREATE TABLE skewed (id int8 PRIMARY KEY, payload text NOT NULL);
         CREATE TABLE small (\"Key\" int2 PRIMARY KEY, payload text NOT NULL);
         CREATE TABLE pair_key (a int4, b int4, payload text NOT NULL, PRIMARY KEY (a, b));",
    )
    .await;
    pair.src
        .batch_execute(
            "INSERT INTO skewed SELECT g, repeat(md5(g::text), 4) FROM generate_series(-3000, 27000) g;
             INSERT INTO skewed SELECT 1000000000000 + g, repeat(md5(g::text), 4) FROM generate_series(1, 30000) g;
             INSERT INTO small SELECT g, repeat(md5(g::text), 8) FROM generate_series(-32768, 32767, 3) g;
             INSERT INTO pair_key SELECT g % 7, g, repeat(md5(g::text), 4) FROM generate_series(1, 20000) g;
             ANALYZE;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = pair.source.connect(DB).await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // Beyond both ends of what planning saw, and deletes inside the ranges.
                client
                    .execute(
                        "INSERT INTO skewed VALUES ($1, 'late'), ($2, 'late')",
                        &[&(-1_000_000 - n), &(2_000_000_000_000 + n)],
                    )
                    .await
                    .unwrap();
                client
                    .execute("DELETE FROM skewed WHERE id = $1", &[&(n * 11)])
                    .await
                    .unwrap();
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let config = pair.config_with(2, "256kB", dir.path(), "split_by = \"primary_key\"");
    let ctx = pair.context(config, &store).await;
    let outcome = initial_copy(&ctx).await.expect("initial copy");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 5, "the writer ran during the copy ({written})");

    let records = sluice::snapshot::state::load_tables(&store).unwrap();
    let record = |name: &str| records.iter().find(|r| r.name.name == name).unwrap();
    let keyed = |name: &str| {
        let chunks = &record(name).chunks;
        assert!(chunks.len() > 3, "{name} is split: {chunks:?}");
        chunks.iter().all(|c| matches!(c, ChunkRange::Keys { .. }))
    };
    assert!(keyed("skewed") && keyed("small"));
    assert!(
        record("pair_key")
            .chunks
            .iter()
            .all(|c| matches!(c, ChunkRange::Blocks { .. })),
        "a composite key falls back to ctid ranges: {:?}",
        record("pair_key").chunks
    );
    // Half the ids sit a trillion away from the rest: cut evenly by value, nearly every
    // chunk would be empty. Cut at the histogram's quantiles, none is, and none is huge.
    let skewed = record("skewed");
    let done = sluice::snapshot::state::done_chunks(&store, &skewed.name, 0).unwrap();
    assert_eq!(done.len(), skewed.chunks.len());
    let rows: Vec<u64> = done.iter().map(|(_, d)| d.rows).collect();
    let largest = *rows.iter().max().unwrap();
    assert!(
        rows.iter().all(|&r| r > 0) && largest < 3 * 60_001 / rows.len() as u64,
        "chunks follow the key's distribution: {rows:?}"
    );
    pair.assert_same("small", "\"Key\", payload").await;
    pair.assert_same("pair_key", "a, b, payload").await;

    // Copy + the slot's changes = the source, each change once.
    let mut ids: BTreeSet<i64> = Pair::ids(&pair.dst, "skewed").await.into_iter().collect();
    for change in peek_changes(&pair.src, "sluice", "sluice").await {
        match change {
            Change::Insert { table, id, commit } if table == "public.skewed" => {
                assert!(commit >= outcome.consistent_point);
                assert!(ids.insert(id), "insert of {id} is both copied and streamed");
            }
            Change::Delete { table, id, .. } if table == "public.skewed" => {
                assert!(ids.remove(&id), "delete of {id}: the row was never copied");
            }
            _ => {}
        }
    }
    let source: BTreeSet<i64> = Pair::ids(&pair.src, "skewed").await.into_iter().collect();
    assert_eq!(ids, source, "copy + stream = source");
}

/// Creating the slot waits for transactions already running on the source; the copy then
/// holds their rows (they committed before the consistent point) and the slot does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_waits_for_a_running_transaction_whose_rows_are_then_copied() {
    let pair = start_pair().await;
    pair.schema("CREATE TABLE t (id int8 PRIMARY KEY)").await;
    pair.src
        .batch_execute("CREATE PUBLICATION sluice FOR ALL TABLES")
        .await
        .unwrap();
    let open = pair.source.connect(DB).await;
    open.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(1, "10GB", dir.path()), &store)
        .await;
    let copy = tokio::spawn(async move { initial_copy(&ctx).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !copy.is_finished(),
        "the slot waits for the open transaction"
    );
    open.batch_execute("COMMIT").await.unwrap();
    copy.await.unwrap().expect("copy");

    assert_eq!(Pair::ids(&pair.dst, "t").await, vec![1]);
    assert!(peek_changes(&pair.src, "sluice", "sluice").await.is_empty());
}

/// A publication the operator made with a row filter and a column list (PostgreSQL 15): the
/// stream carries only the rows and columns it publishes, so the copy brings exactly those
/// too, as PostgreSQL's own table sync does, split table or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publications_row_filter_and_column_list_shape_the_copy() {
    let pair = start_pair().await;
    pair.schema(
        "CREATE TABLE tenants (tenant int, id int, v text, secret text, PRIMARY KEY (tenant, id));
         CREATE TABLE small (tenant int, id int, v text, PRIMARY KEY (tenant, id));",
    )
    .await;
    pair.src
        .batch_execute(
            "INSERT INTO tenants SELECT g % 4 + 5, g, repeat('v', 100), 'secret' FROM generate_series(1, 8000) g;
             INSERT INTO small SELECT g % 4 + 5, g, 'v' FROM generate_series(1, 40) g;
             CREATE PUBLICATION sluice FOR TABLE tenants (tenant, id, v) WHERE (tenant = 7),
                                           small WHERE (tenant IN (5, 6));",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(2, "64kB", dir.path()), &store)
        .await;
    initial_copy(&ctx).await.expect("initial copy");
    let records = sluice::snapshot::state::load_tables(&store).unwrap();
    let tenants = records.iter().find(|r| r.name.name == "tenants").unwrap();
    assert!(tenants.chunks.len() > 3, "tenants is split");

    let expected = |sql: &str| {
        let sql = sql.to_string();
        let src = &pair.src;
        async move { src.query_one(&sql, &[]).await.unwrap().get::<_, String>(0) }
    };
    let digest = "SELECT count(*)::text || ':' || md5(string_agg(ROW(tenant, id, v)::text, ',' ORDER BY tenant, id))";
    assert_eq!(
        pair.dst
            .query_one(&format!("{digest} FROM tenants"), &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        expected(&format!("{digest} FROM tenants WHERE tenant = 7")).await,
        "only the published rows of tenants"
    );
    assert_eq!(
        pair.dst
            .query_one(&format!("{digest} FROM small"), &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        expected(&format!("{digest} FROM small WHERE tenant IN (5, 6)")).await,
        "only the published rows of small (copied whole)"
    );
    let secrets: i64 = pair
        .dst
        .query_one("SELECT count(secret) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(secrets, 0, "the unpublished column was not copied");

    let config_path = dir.path().join("sluice.toml");
    std::fs::write(
        &config_path,
        format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n",
            pair.source.url(DB),
            pair.target.url(DB),
            dir.path().join("verify-state").display()
        ),
    )
    .unwrap();
    // `check` says what the publication leaves out.
    let (_, stdout, _) =
        crate::support::sluice::sluice(&["check", "--config", config_path.to_str().unwrap()]);
    assert!(
        stdout.lines().any(|l| l.starts_with("PASS")
            && l.contains("carries only rows where (tenant = 7) and only columns tenant, id, v of table public.tenants")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l
                .contains("only rows where (tenant = ANY (ARRAY[5, 6])) of table public.small")),
        "{stdout}"
    );
    // `verify` compares what the publication carries: the filtered rows, the listed columns.
    let (code, stdout, stderr) =
        crate::support::sluice::sluice(&["verify", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("OK public.tenants: 2000 rows")
            && stdout.contains("OK public.small: 20 rows"),
        "{stdout}"
    );
    // A row the filter admits but the target lacks is still found.
    pair.dst
        .batch_execute("DELETE FROM tenants WHERE id = 2")
        .await
        .unwrap();
    let (code, stdout, _) =
        crate::support::sluice::sluice(&["verify", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("DIFF public.tenants"), "{stdout}");
}
