//! `sluice verify`: equal data passes; a row changed, deleted or added on the target behind
//! sluice's back fails with exit 1, naming the table, the key range and the key.

use crate::cutover_common::{show, stdout, Setup};

const DATA: &str = "
    CREATE TYPE public.mood AS ENUM ('sad', 'ok');
    CREATE TABLE public.orders (id int PRIMARY KEY, note text, amount numeric, at timestamptz,
                                f float8, m public.mood, tags text[]);
    INSERT INTO public.orders
        SELECT i, 'note ' || i, i * 1.5, '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 hour',
               i / 3.0, CASE WHEN i % 2 = 0 THEN 'ok' ELSE 'sad' END::public.mood, ARRAY['a', i::text]
        FROM generate_series(1, 1000) i;
    CREATE TABLE public.lines (region text, n int, qty int, PRIMARY KEY (region, n));
    INSERT INTO public.lines SELECT r, n, n FROM unnest(ARRAY['eu', 'us', 'Asia']) r, generate_series(1, 50) n;
    CREATE TABLE public.log (msg text, at int);
    INSERT INTO public.log SELECT 'm' || i, i FROM generate_series(1, 30) i;
    CREATE TABLE public.empty (id int PRIMARY KEY);
";

#[tokio::test]
async fn verify_passes_on_equal_data_and_names_what_differs() {
    let setup = Setup::new("").await;
    setup.both(DATA).await;
    // Same content, other physical order and other session time zone on the target.
    setup
        .target
        .batch_execute("CLUSTER public.orders USING orders_pkey; ALTER DATABASE dst SET timezone = 'Asia/Tokyo'")
        .await
        .unwrap();

    let output = setup
        .sluice(&["verify", "--chunk-rows", "100", "--jobs", "2"])
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let out = stdout(&output);
    assert!(
        out.contains("OK public.orders: 1000 rows, 10 key range(s) match"),
        "{out}"
    );
    assert!(
        out.contains("OK public.log: 30 rows, whole-table checksum matches"),
        "{out}"
    );
    assert!(out.contains("OK public.empty: 0 rows"), "{out}");
    assert!(out.contains("all 4 table(s) match"), "{out}");

    // Behind sluice's back: a changed value, a deleted row, an extra row.
    setup
        .target
        .batch_execute(
            "UPDATE public.orders SET amount = amount + 0.01 WHERE id = 537;
             DELETE FROM public.lines WHERE region = 'us' AND n = 7;
             INSERT INTO public.log VALUES ('stray', 0);",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["verify", "--chunk-rows", "100"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let out = stdout(&output);
    assert!(
        out.contains("DIFF public.orders range [id=501, id=601): 100 row(s) on the source, 100 on the target; 1 key(s) differ: id=537 (changed)"),
        "{out}"
    );
    assert_eq!(
        out.matches("DIFF public.orders").count(),
        1,
        "only one range differs: {out}"
    );
    assert!(
        out.contains("DIFF public.lines: 150 rows on the source, 149 on the target"),
        "{out}"
    );
    assert!(
        out.contains("(region, n)=('us', 7) (missing on the target)"),
        "{out}"
    );
    assert!(
        out.contains("DIFF public.log: 30 rows on the source, 31 on the target"),
        "{out}"
    );
    assert!(out.contains("OK public.empty"), "{out}");
    assert!(
        out.contains("3 of 4 table(s) differ: public.lines, public.log, public.orders"),
        "{out}"
    );

    // --tables narrows the comparison.
    let output = setup
        .sluice(&["verify", "--tables", "public.empty,public.l*"])
        .await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let out = stdout(&output);
    assert!(!out.contains("public.orders"), "{out}");
    assert!(out.contains("2 of 3 table(s) differ"), "{out}");

    // A column the target lacks is a difference too.
    setup
        .target
        .batch_execute("ALTER TABLE public.log DROP COLUMN at")
        .await
        .unwrap();
    let output = setup.sluice(&["verify", "--tables", "public.log"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        stdout(&output).contains("DIFF public.log: columns missing on the target: at"),
        "{}",
        show(&output)
    );

    // A key present only on the target, beyond the source's last key.
    setup
        .target
        .batch_execute("UPDATE public.orders SET amount = amount - 0.01 WHERE id = 537; INSERT INTO public.orders (id) VALUES (5000)")
        .await
        .unwrap();
    let output = setup
        .sluice(&["verify", "--tables", "public.orders", "--chunk-rows", "100"])
        .await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        stdout(&output).contains("range [id=901, end): 100 row(s) on the source, 101 on the target; 1 key(s) differ: id=5000 (only on the target)"),
        "{}",
        show(&output)
    );
}

/// On a live source a range can differ only because the change is still on its way: verify
/// waits for the target to catch up with the source and compares that range again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_rechecks_a_range_that_was_still_in_flight() {
    let setup = Setup::new("").await;
    setup
        .both("CREATE TABLE public.t (id int PRIMARY KEY, v text); INSERT INTO public.t SELECT i, 'v' FROM generate_series(1, 100) i;")
        .await;
    sluice::checkpoint::ensure_position_table(&setup.target)
        .await
        .unwrap();
    crate::support::record_position(&setup.target, "0", "0/0")
        .await
        .unwrap();
    setup
        .source
        .batch_execute("UPDATE public.t SET v = 'new' WHERE id = 50")
        .await
        .unwrap();
    // The daemon's stand-in: answers on the control socket as streaming, applies the change
    // a second later, then keeps its position at the source's WAL end.
    let status = sluice::control::SharedStatus::new("sluice");
    status.update(|s| s.state = sluice::control::DaemonState::Streaming);
    let _socket =
        sluice::control::socket::serve(&setup.dir.path().join("state"), status.clone()).unwrap();
    let source = setup.pg.connect("src").await;
    let target = setup.pg.connect("dst").await;
    let stand_in = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        target
            .batch_execute("UPDATE public.t SET v = 'new' WHERE id = 50")
            .await
            .unwrap();
        loop {
            let lsn: String = source
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            crate::support::record_position(&target, "0", &lsn)
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let output = setup.sluice(&["verify"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert!(
        stdout(&output).contains("OK public.t: 100 rows, 1 key range(s) match (1 after waiting for the target to catch up)"),
        "{}",
        show(&output)
    );

    // Without re-checks, a difference is reported at once.
    setup
        .source
        .batch_execute("UPDATE public.t SET v = 'newer' WHERE id = 60")
        .await
        .unwrap();
    let output = setup.sluice(&["verify", "--rechecks", "0"]).await;
    stand_in.abort();
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        stdout(&output).contains("id=60 (changed)"),
        "{}",
        show(&output)
    );

    // A stalled daemon cannot bring the target up: no range waits for it (each waited 30 s).
    status.update(|s| {
        s.state = sluice::control::DaemonState::Stalled;
        s.last_error = Some("Applying to public.t: SQLSTATE 23514".into());
    });
    setup
        .source
        .batch_execute("UPDATE public.t SET v = 'stuck' WHERE id IN (10, 90)")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let output = setup.sluice(&["verify", "--chunk-rows", "20"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let out = stdout(&output);
    assert!(
        out.contains("NOTE sluice run is stalled (Applying to public.t"),
        "{out}"
    );
    assert!(
        out.contains("id=10 (changed)") && out.contains("id=90 (changed)"),
        "{out}"
    );
}
