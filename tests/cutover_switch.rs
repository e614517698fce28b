//! `sluice cutover`: with `--freeze-source` the source ends up read-only for new
//! transactions, other sessions are ended, the target is caught up, sequences are set,
//! every table verified, and the undo is printed. `--dry-run` changes nothing.
//!
//! The daemon is not in these tests yet: a stand-in keeps the target's
//! `sluice.applied_position.caught_up_lsn` at the source's current WAL position, as the
//! daemon does on an idle source. Once `sluice run` exists, run it here instead (and write
//! to the source until the freeze) to prove "live source under load ends with zero lag".

use std::time::Duration;

use crate::cutover_common::{show, stdout, Setup};

const DDL: &str = "CREATE TABLE public.t (id serial PRIMARY KEY, v text)";

/// The application inserted 200 rows on the source; the copy brought them to the target
/// with their ids, so the target's sequence is still at its start.
async fn load(setup: &Setup) {
    setup.both(DDL).await;
    setup
        .source
        .batch_execute("INSERT INTO public.t (v) SELECT 'v' || i FROM generate_series(1, 200) i")
        .await
        .unwrap();
    setup
        .target
        .batch_execute(
            "INSERT INTO public.t (id, v) SELECT i, 'v' || i FROM generate_series(1, 200) i",
        )
        .await
        .unwrap();
}

/// Keeps `caught_up_lsn` at the source's WAL end, like the daemon on keepalives. Its
/// application name starts with `sluice`, so the freeze does not end its session.
async fn daemon_stand_in(setup: &Setup) -> tokio::task::JoinHandle<()> {
    // It answers on the control socket as a streaming daemon would (cutover asks first).
    let state = setup.dir.path().join("state");
    let status = sluice::control::SharedStatus::new("sluice");
    status.update(|s| s.state = sluice::control::DaemonState::Streaming);
    let socket = sluice::control::socket::serve(&state, status).unwrap();
    let connect = |db: &str| {
        let dsn = format!("{} application_name=sluice-stand-in", setup.pg.dsn(db));
        async move {
            let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
        }
    };
    let source = connect("src").await;
    let target = connect("dst").await;
    sluice::checkpoint::ensure_position_table(&target)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _socket = socket;
        loop {
            let Ok(row) = source
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
            else {
                return;
            };
            let lsn: String = row.get(0);
            let _ = crate::support::record_position(&target, "0", &lsn).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn read_only(setup: &Setup) -> bool {
    let fresh = setup.pg.connect("src").await;
    let setting: String = fresh
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    setting == "on"
}

async fn target_next_id(setup: &Setup) -> (i64, bool) {
    let row = setup
        .target
        .query_one("SELECT last_value, is_called FROM public.t_id_seq", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_freezes_the_source_and_prints_the_undo() {
    let setup = Setup::new("").await;
    load(&setup).await;
    // The application's session, open before the freeze.
    let app = setup.pg.connect("src").await;
    app.batch_execute("SELECT 1").await.unwrap();
    let stand_in = daemon_stand_in(&setup).await;

    let output = setup
        .sluice(&["cutover", "--freeze-source", "--yes", "--timeout", "30s"])
        .await;
    stand_in.abort();
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let out = stdout(&output);
    assert!(out.contains("FROZEN src"), "{out}");
    assert!(out.contains("ENDED session pid"), "{out}");
    assert!(out.contains("lag is zero"), "{out}");
    assert!(out.contains("SET public.t_id_seq"), "{out}");
    assert!(out.contains("OK public.t: 200 rows"), "{out}");
    assert!(out.contains("Point the application at the target"), "{out}");
    let undo =
        "BEGIN READ WRITE; ALTER DATABASE \"src\" RESET default_transaction_read_only; COMMIT;";
    assert!(out.contains(undo), "{out}");

    // The source: the old session is gone, new ones cannot write.
    assert!(
        app.batch_execute("SELECT 1").await.is_err(),
        "the app's session was ended"
    );
    assert!(read_only(&setup).await);
    let fresh = setup.pg.connect("src").await;
    let error = fresh
        .batch_execute("INSERT INTO public.t (v) VALUES ('late')")
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("25006"), "{error}");
    // The target continues where the source stopped.
    assert_eq!(target_next_id(&setup).await, (201, false));

    // The printed undo works (on a new session: the old ones were ended).
    setup
        .pg
        .connect("src")
        .await
        .batch_execute(undo)
        .await
        .unwrap();
    assert!(!read_only(&setup).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_dry_run_changes_nothing_and_without_progress_it_stops() {
    let setup = Setup::new("").await;
    load(&setup).await;
    let app = setup.pg.connect("src").await;
    let before = target_next_id(&setup).await;

    // Without a daemon the cutover cannot succeed: said before anything changes, by the
    // dry run too, and the source is not frozen.
    for args in [
        &["cutover", "--freeze-source", "--dry-run"][..],
        &["cutover", "--freeze-source", "--yes"][..],
    ] {
        let output = setup.sluice(args).await;
        assert_eq!(output.status.code(), Some(1), "{}", show(&output));
        let out = stdout(&output);
        assert!(
            out.contains("Cutover NOT ready (nothing was changed)"),
            "{out}"
        );
        assert!(out.contains("no applied position for slot sluice"), "{out}");
        assert!(out.contains("sluice run is not running"), "{out}");
        assert!(!out.contains("FROZEN"), "{out}");
        assert!(!out.contains("still frozen"), "{out}");
        assert!(!read_only(&setup).await);
    }
    // Still frozen by an earlier cutover: "nothing was changed" comes with the freeze that
    // stays, and its undo.
    app.batch_execute("ALTER DATABASE src SET default_transaction_read_only = on")
        .await
        .unwrap();
    let output = setup.sluice(&["cutover", "--dry-run"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let out = stdout(&output);
    assert!(
        out.contains("Cutover NOT ready (nothing was changed)")
            && out.contains("the source database src is still frozen by an earlier cutover")
            && out.contains(r#"ALTER DATABASE "src" RESET default_transaction_read_only"#),
        "{out}"
    );
    app.batch_execute("ALTER DATABASE src RESET default_transaction_read_only")
        .await
        .unwrap();

    let stand_in = daemon_stand_in(&setup).await;
    let output = setup
        .sluice(&["cutover", "--freeze-source", "--dry-run"])
        .await;
    stand_in.abort();
    let _ = stand_in.await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let out = stdout(&output);
    assert!(
        out.contains("Step 1: WOULD freeze the source database src"),
        "{out}"
    );
    assert!(out.contains("WOULD SET public.t_id_seq"), "{out}");
    assert!(out.contains("nothing was changed"), "{out}");
    app.batch_execute("INSERT INTO public.t (v) VALUES ('still writable')")
        .await
        .unwrap();
    assert!(!read_only(&setup).await);
    assert_eq!(target_next_id(&setup).await, before);

    // A daemon that says it streams but whose position does not move: the timeout.
    let status = sluice::control::SharedStatus::new("sluice");
    status.update(|s| s.state = sluice::control::DaemonState::Streaming);
    let socket =
        sluice::control::socket::serve(&setup.dir.path().join("state"), status.clone()).unwrap();
    crate::support::record_position(&setup.target, "0", "0/0")
        .await
        .unwrap();
    let output = setup.sluice(&["cutover", "--timeout", "1s"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        show(&output).contains("did not catch up"),
        "{}",
        show(&output)
    );
    assert!(
        !show(&output).contains("the freeze stays in place"),
        "no freeze was asked for: {}",
        show(&output)
    );
    // A stalled daemon: said at once, with its error, before any freeze.
    status.update(|s| {
        s.state = sluice::control::DaemonState::Stalled;
        s.last_error = Some("Applying to public.t: SQLSTATE 23505".into());
    });
    let output = setup.sluice(&["cutover", "--freeze-source", "--yes"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        stdout(&output).contains("sluice run is stalled: Applying to public.t: SQLSTATE 23505"),
        "{}",
        show(&output)
    );
    assert!(!read_only(&setup).await);
    drop(socket);
    assert_eq!(
        target_next_id(&setup).await,
        before,
        "stopped before the sequences"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_refuses_to_freeze_without_confirmation() {
    let setup = Setup::new("").await;
    load(&setup).await;
    let stand_in = daemon_stand_in(&setup).await;
    let output = setup.sluice(&["cutover", "--freeze-source"]).await;
    stand_in.abort();
    // Nobody can answer without a terminal: a usage error, as a missing flag is.
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    assert!(show(&output).contains("--yes"), "{}", show(&output));
    assert!(!read_only(&setup).await);
    // Nothing was frozen: no undo to run.
    assert!(
        !show(&output).contains("To undo the freeze"),
        "{}",
        show(&output)
    );
}

/// A cutover run by the database's owner, not a superuser (as on managed services). It may
/// freeze the database, but without pg_read_all_stats it cannot even see other users'
/// sessions, and it can never end a superuser's: a session opened before the freeze can
/// still write. The cutover must not say ready while that may be so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_is_not_ready_while_a_session_opened_before_the_freeze_may_survive_it() {
    let setup = Setup::new("").await;
    load(&setup).await;
    setup
        .source
        .batch_execute(
            "CREATE ROLE owner LOGIN;
             ALTER DATABASE src OWNER TO owner;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO owner;
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO owner;",
        )
        .await
        .unwrap();
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        &setup.pg.url("src"),
        &format!("postgresql://owner@127.0.0.1:{}/src", setup.pg.port),
    );
    std::fs::write(&setup.config, text).unwrap();
    // A superuser's session (an administrator's psql), open before the freeze.
    let admin = setup.pg.connect("src").await;
    admin.batch_execute("SELECT 1").await.unwrap();
    let stand_in = daemon_stand_in(&setup).await;
    let cutover = || setup.sluice(&["cutover", "--freeze-source", "--yes", "--timeout", "30s"]);

    // Blind: pg_stat_activity shows it no other user's session at all. Known before the
    // freeze, so nothing is changed.
    let output = cutover().await;
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(!out.contains("FROZEN src"), "{out}");
    assert!(!read_only(&setup).await);
    assert!(
        out.contains("Cutover NOT ready (nothing was changed)")
            && out.contains("cannot see or end other users' sessions")
            && out.contains("GRANT pg_read_all_stats, pg_signal_backend TO \"owner\""),
        "{out}"
    );
    // The dry run says the same.
    let output = setup
        .sluice(&["cutover", "--freeze-source", "--dry-run"])
        .await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        stdout(&output).contains("cannot see or end other users' sessions"),
        "{}",
        show(&output)
    );

    // Seeing and signalling, but not owning the database: ALTER DATABASE would fail.
    setup
        .source
        .batch_execute(
            "GRANT pg_read_all_stats, pg_signal_backend TO owner;
             CREATE ROLE keeper;
             ALTER DATABASE src OWNER TO keeper;",
        )
        .await
        .unwrap();
    let output = cutover().await;
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        out.contains(
            "may not freeze database src (ALTER DATABASE needs its owner keeper or a superuser)"
        ) && out.contains("GRANT \"keeper\" TO \"owner\""),
        "{out}"
    );
    assert!(!read_only(&setup).await);
    // Owned by a superuser: membership in it would make the user one, so the advice is
    // to hand the database over instead.
    setup
        .source
        .batch_execute("ALTER DATABASE src OWNER TO postgres")
        .await
        .unwrap();
    let out = stdout(&cutover().await);
    assert!(
        out.contains("ALTER DATABASE \"src\" OWNER TO \"owner\"")
            && !out.contains("GRANT \"postgres\" TO"),
        "{out}"
    );

    // Owning it, but unable to end a superuser's session.
    setup
        .source
        .batch_execute("ALTER DATABASE src OWNER TO owner")
        .await
        .unwrap();
    let output = cutover().await;
    stand_in.abort();
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(out.contains("WARNING could not end session pid"), "{out}");
    assert!(
        out.contains("opened before the freeze: it can still write"),
        "{out}"
    );
    assert!(
        out.contains("Cutover NOT ready")
            && out.contains("opened before the freeze could not be ended"),
        "{out}"
    );
    assert!(
        !out.contains("Point the application at the target"),
        "{out}"
    );
    // It could indeed still write.
    admin
        .batch_execute("INSERT INTO public.t (v) VALUES ('after the freeze')")
        .await
        .unwrap();
}

/// A prepared (two-phase) transaction belongs to no session, so the freeze's sweeps cannot
/// end it, and it may commit its writes at any time: not ready until it is settled. Run
/// again on the already frozen source once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_is_not_ready_while_a_prepared_transaction_is_pending() {
    let setup = Setup::on(
        crate::support::PgCluster::builder()
            .setting("max_prepared_transactions", "5")
            .start(),
        "",
    )
    .await;
    load(&setup).await;
    setup
        .pg
        .connect("src")
        .await
        .batch_execute(
            "BEGIN; INSERT INTO public.t (v) VALUES ('prepared'); PREPARE TRANSACTION 'pending-1';",
        )
        .await
        .unwrap();
    let stand_in = daemon_stand_in(&setup).await;
    let cutover = || setup.sluice(&["cutover", "--freeze-source", "--yes", "--timeout", "30s"]);

    let output = cutover().await;
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        out.contains("PREPARED transaction \"pending-1\" is pending")
            && out.contains("1 prepared transaction(s) pending on the source"),
        "{out}"
    );
    assert!(
        !out.contains("Point the application at the target"),
        "{out}"
    );

    // Settled, the cutover goes through on the source it froze the first time.
    setup
        .pg
        .connect("src")
        .await
        .batch_execute("ROLLBACK PREPARED 'pending-1'")
        .await
        .unwrap();
    // A role that turns the freeze off for itself (its setting wins over the database's)
    // could still write from a new session.
    setup
        .pg
        .connect("src")
        .await
        .batch_execute(
            "BEGIN READ WRITE;
             CREATE ROLE app LOGIN;
             ALTER ROLE app IN DATABASE src SET default_transaction_read_only = off;
             COMMIT;",
        )
        .await
        .unwrap();
    let output = cutover().await;
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        out.contains("ROLE app sets default_transaction_read_only = off")
            && out.contains("role(s) app turn the freeze off"),
        "{out}"
    );
    // The printed fix works as given, from a new session of the frozen database.
    let fix = out
        .split("turn the freeze off for their own sessions: ")
        .nth(1)
        .and_then(|rest| rest.split(" then run cutover again").next())
        .unwrap_or_else(|| panic!("no fix printed: {out}"));
    setup
        .pg
        .connect("src")
        .await
        .batch_execute(fix)
        .await
        .unwrap_or_else(|e| panic!("{fix}: {e}"));
    let output = cutover().await;
    stand_in.abort();
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert!(stdout(&output).contains("Point the application at the target"));
}

/// After the freeze the wait for zero lag gives up as soon as the daemon stalls (not at the
/// timeout, with the application frozen all along), and a cutover interrupted while it waits
/// (Ctrl-C, SIGTERM) still says how to undo the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_after_the_freeze_ends_when_the_daemon_stalls_or_cutover_is_interrupted() {
    let setup = Setup::new("").await;
    load(&setup).await;
    // A daemon that says it streams but never catches up: its position stays where it is.
    let state = setup.dir.path().join("state");
    let status = sluice::control::SharedStatus::new("sluice");
    status.update(|s| s.state = sluice::control::DaemonState::Streaming);
    let _socket = sluice::control::socket::serve(&state, status.clone()).unwrap();
    sluice::checkpoint::ensure_position_table(&setup.target)
        .await
        .unwrap();
    crate::support::record_position(&setup.target, "0", "0/1000")
        .await
        .unwrap();
    let undo =
        "BEGIN READ WRITE; ALTER DATABASE \"src\" RESET default_transaction_read_only; COMMIT;";
    let cutover = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["cutover", "--freeze-source", "--yes", "--timeout", "120s"])
            .arg("--config")
            .arg(&setup.config)
            .env_remove("SLUICE_SOURCE_URL")
            .env_remove("SLUICE_TARGET_URL")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    let started = std::time::Instant::now();
    let child = cutover();
    tokio::time::sleep(Duration::from_secs(3)).await;
    status.update(|s| {
        s.state = sluice::control::DaemonState::Stalled;
        s.last_error = Some("Applying 1 insert(s) into public.t failed".to_string());
    });
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("cutover gave up long before its timeout")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let text = show(&output);
    assert!(text.contains("FROZEN src"), "{text}");
    assert!(
        text.contains("sluice run is stalled: Applying 1 insert(s) into public.t failed"),
        "{text}"
    );
    assert!(text.contains(undo), "{text}");
    assert!(read_only(&setup).await);
    setup
        .pg
        .connect("src")
        .await
        .batch_execute(undo)
        .await
        .unwrap();

    // Interrupted while it waits: the undo is said, exit 1.
    status.update(|s| {
        s.state = sluice::control::DaemonState::Streaming;
        s.last_error = None;
    });
    let child = cutover();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("cutover ended on SIGTERM")
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let text = show(&output);
    assert!(text.contains("Step 2: waiting"), "{text}");
    assert!(
        text.contains("Cutover interrupted after the freeze"),
        "{text}"
    );
    assert!(text.contains(undo), "{text}");
    assert!(read_only(&setup).await);
}
