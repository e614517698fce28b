//! `/metrics`: Prometheus text over plain HTTP, from the daemon's live status.

use std::time::Duration;

use sluice::control::metrics;
use sluice::control::{DaemonState, SharedStatus, TableState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    response
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text_and_follow_the_status() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = SharedStatus::new("sluice");
    status.update(|s| {
        s.state = DaemonState::Copying;
        s.lag_bytes = Some(4096);
        s.retained_wal_bytes = Some(1 << 20);
        s.errors_by_kind.insert("transient".into(), 2);
    });
    status.set_table("public.orders", TableState::Copying, 500);
    let server = metrics::serve_on(listener, status.clone());

    let response = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains("Content-Type: text/plain; version=0.0.4"),
        "{response}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    for line in [
        "sluice_up 1",
        "sluice_state{state=\"copying\"} 1",
        "sluice_lag_bytes 4096",
        "sluice_retained_wal_bytes 1048576",
        "sluice_applied_transactions_total 0",
        "sluice_applied_changes_total 0",
        "sluice_copy_rows_total{table=\"public.orders\"} 500",
        "sluice_errors_total{kind=\"transient\"} 2",
        "sluice_errors_total{kind=\"apply\"} 0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    let length: usize = response
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len());

    status.update(|s| {
        s.applied_changes = 77;
        s.lag_seconds = Some(1.5);
    });
    let body = get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(
        body.contains("\nsluice_applied_changes_total 77\n"),
        "{body}"
    );
    assert!(body.contains("\nsluice_lag_seconds 1.5\n"), "{body}");

    assert!(get(addr, "GET / HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 404"));
    assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 405"));
    // An endless header is cut off without an answer, and the server lives on.
    let mut flood = TcpStream::connect(addr).await.unwrap();
    let _ = flood.write_all(&vec![b'a'; 64 * 1024]).await;
    drop(flood);
    assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .contains("sluice_up 1"));
    server.abort();
}

#[tokio::test]
async fn serve_binds_the_address_and_refuses_a_busy_one() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let error = metrics::serve(addr, SharedStatus::new("sluice")).unwrap_err();
    assert_eq!(error.exit_code(), 2, "{error}");
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
    drop(busy);
    let server = metrics::serve(addr, SharedStatus::new("sluice")).unwrap();
    assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .contains("sluice_up 1"));
    server.abort();
}
