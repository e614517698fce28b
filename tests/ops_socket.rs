//! The control socket: `sluice status` through it, owner-only permissions, garbage answered
//! with errors, one daemon per state dir.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use sluice::control::socket::{self, Request, Response, MAX_FRAME};
use sluice::control::{DaemonState, SharedStatus, TableState};
use sluice::Lsn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::ops_common::*;

fn streaming_status() -> SharedStatus {
    let status = SharedStatus::new("sluice");
    status.update(|s| {
        s.state = DaemonState::Streaming;
        s.source_lsn = Some("16/B374D848".parse().unwrap());
        s.applied_lsn = Some("16/B3000000".parse().unwrap());
        s.received_lsn = Some("16/B374D848".parse().unwrap());
        s.confirmed_flush_lsn = Some("16/B3000000".parse().unwrap());
        s.lag_bytes = Some(0x74_D848);
        s.lag_seconds = Some(0.25);
        s.retained_wal_bytes = Some(3 << 30);
        s.applied_transactions = 1234;
        s.applied_changes = 56789;
    });
    status.set_table("public.orders", TableState::Streaming, 1000);
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_comes_from_the_running_daemon_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Unreachable databases: the answer must come from the socket alone.
    let config = write_config(
        dir.path(),
        &unreachable_url("app"),
        &unreachable_url("target"),
        &state,
        "",
    );
    let status = streaming_status();
    let _server = socket::serve(&state, status.clone()).unwrap();

    let output = run(
        sluice(&config, &["status", "--json"]),
        Duration::from_secs(30),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let json = parse_json(&output);
    assert_eq!(json["state"], "streaming");
    assert_eq!(json["slot"], "sluice");
    assert_eq!(json["source_lsn"], "16/B374D848");
    assert_eq!(json["applied_lsn"], "16/B3000000");
    assert_eq!(json["lag_bytes"], 0x74_D848);
    assert_eq!(json["applied_transactions"], 1234);
    assert_eq!(json["applied_changes"], 56789);
    assert_eq!(json["last_error"], serde_json::Value::Null);
    assert_eq!(json["pid"], std::process::id());
    assert_eq!(json["tables"][0]["name"], "public.orders");
    assert_eq!(json["tables"][0]["state"], "streaming");
    assert_eq!(json["tables"][0]["rows_copied"], 1000);
    for field in [
        "received_lsn",
        "confirmed_flush_lsn",
        "lag_seconds",
        "retained_wal_bytes",
    ] {
        assert!(!json[field].is_null(), "{field} missing: {json}");
    }

    // The readable form says the same, and shows a stall with its error and duration.
    status.update(|s| {
        s.state = DaemonState::Stalled;
        s.last_error =
            Some("Applying to public.orders at 16/B3000000: column \"x\" does not exist".into());
        s.stalled_seconds = Some(42.0);
    });
    let output = run(sluice(&config, &["status"]), Duration::from_secs(30)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("stalled (daemon pid"), "{text}");
    assert!(text.contains("stalled for           42 s"), "{text}");
    assert!(text.contains("column \"x\" does not exist"), "{text}");
    assert!(text.contains("3072 MB"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_owner_only_and_other_users_are_refused() {
    let dir = open_tempdir();
    let state = dir.path().join("state");
    let config = write_config(
        dir.path(),
        &unreachable_url("app"),
        &unreachable_url("target"),
        &state,
        "",
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = socket::serve(&state, streaming_status()).unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "state dir");
    assert_eq!(mode(server.path()), 0o600, "socket");

    // Root bypasses file permissions, so the refusal is tested as another OS user.
    let Some((uid, gid)) = postgres_user_when_root() else {
        eprintln!("not root: the non-owner connection attempt is skipped, modes were checked");
        return;
    };
    // The build's own binary may sit under a directory only root can enter (a clone in a
    // `mktemp -d`): the other user runs a copy from the opened-up temp dir.
    let binary = dir.path().join("sluice");
    std::fs::copy(env!("CARGO_BIN_EXE_sluice"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_postgres = || {
        let mut command = std::process::Command::new(&binary);
        command
            .arg("--config")
            .arg(&config)
            .args(["status", "--json"])
            .env_remove("SLUICE_SOURCE_URL")
            .env_remove("SLUICE_TARGET_URL")
            .env("HOME", "/tmp")
            .uid(uid)
            .gid(gid);
        tokio::process::Command::from(command)
    };
    // Through the 0700 state dir...
    let output = run(as_postgres(), Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let error = stderr(&output);
    assert!(
        error.contains("Permission denied on the control socket"),
        "{error}"
    );
    assert!(error.contains("owner-only"), "{error}");
    assert!(
        stdout(&output).is_empty(),
        "a refused status must not print a fallback report"
    );

    // ...and with the dir opened up, the socket's own 0600 still refuses.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = run(as_postgres(), Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stderr(&output).contains("Permission denied on the control socket"));
}

async fn exchange(stream: &mut UnixStream, body: &[u8]) -> Response {
    socket::write_frame(stream, body).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), socket::read_frame(stream))
        .await
        .expect("an answer within 5 s")
        .expect("an answer frame");
    rmp_serde::from_slice(&answer).expect("a decodable answer")
}

fn error_message(response: Response) -> String {
    match response {
        Response::Error { message } => message,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_requests_get_error_answers_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = socket::serve(dir.path(), streaming_status()).unwrap();
    let path = server.path().to_path_buf();
    let status_request = socket::encode(&Request::Status).unwrap();

    // Garbage bodies on one connection: each gets an error, the connection stays usable.
    let mut stream = UnixStream::connect(&path).await.unwrap();
    for garbage in [
        &b"\xc1\xc1\xc1"[..],
        b"not messagepack at all",
        b"",
        b"\x81\xa7request\xa8shutdown",
        b"\x92\x01\x02",
    ] {
        let message = error_message(exchange(&mut stream, garbage).await);
        assert!(message.contains("Cannot decode the request"), "{message}");
    }
    match exchange(&mut stream, &status_request).await {
        Response::Status { status } => assert_eq!(status.state, DaemonState::Streaming),
        other => panic!("{other:?}"),
    }

    // An oversized length prefix is refused before any allocation, then the connection closes.
    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let answer = socket::read_frame(&mut stream).await.unwrap();
    let message = error_message(rmp_serde::from_slice(&answer).unwrap());
    assert!(message.contains(&MAX_FRAME.to_string()), "{message}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the connection is closed after a bad frame"
    );

    // A truncated frame and a vanished client cost nothing.
    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream.write_all(&[0, 0, 0, 50, 1, 2, 3]).await.unwrap();
    drop(stream);

    // The daemon still answers.
    let mut stream = UnixStream::connect(&path).await.unwrap();
    match exchange(&mut stream, &status_request).await {
        Response::Status { status } => {
            assert_eq!(
                status.applied_lsn,
                Some("16/B3000000".parse::<Lsn>().unwrap())
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn one_daemon_per_state_dir_and_stale_sockets_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let first = socket::serve(dir.path(), SharedStatus::new("sluice")).unwrap();
    let error = socket::serve(dir.path(), SharedStatus::new("sluice"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Another sluice daemon is answering"),
        "{error}"
    );
    assert!(
        first.path().exists(),
        "the refused second server must leave the socket alone"
    );

    let path = first.path().to_path_buf();
    first.shutdown();
    assert!(!path.exists(), "shutdown removes the socket file");
    let gone = sluice::control::client::request_status(dir.path())
        .await
        .unwrap();
    assert!(gone.is_none(), "no daemon: no status");

    // A socket file left by a daemon killed with -9: nobody listens, it is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(sluice::control::client::request_status(dir.path())
        .await
        .unwrap()
        .is_none());
    let _second = socket::serve(dir.path(), SharedStatus::new("sluice")).unwrap();
    let report = sluice::control::client::request_status(dir.path())
        .await
        .unwrap()
        .expect("the new daemon answers");
    assert_eq!(report.slot, "sluice");
}
