//! TLS with libpq `sslmode` semantics, on both the SQL and the replication connection: a
//! source that admits the migration user only over TLS, with a certificate from a test CA.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::sluice::{sluice, Pair};

/// A CA and a server certificate for `localhost` / 127.0.0.1, in `dir`.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(output.status.success(), "openssl {args:?}: {output:?}");
    };
    // A self-signed CA: its subject, key file and certificate file.
    let ca = |subject: &str, key: &str, certificate: &str| {
        run(&[
            "req",
            "-new",
            "-x509",
            "-days",
            "2",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            key,
            "-out",
            certificate,
        ])
    };
    ca("/CN=sluice test CA", "ca.key", "ca.crt");
    run(&[
        "req",
        "-new",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.crt",
        "-extfile",
        "san.ext",
    ]);
    // The same key, certified for the address only (no DNS name): what verify-ca is for
    // when the host is reached by a name the certificate does not hold.
    std::fs::write(dir.join("ip.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server-ip.crt",
        "-extfile",
        "ip.ext",
    ]);
    ca("/CN=another CA", "other.key", "other.crt");
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_verify_full_streams_over_tls_and_a_wrong_ca_is_definite() {
    let pair = Pair::with_schema("CREATE TABLE t (id int PRIMARY KEY, v text);").await;
    let data = pair.source.data_dir().to_path_buf();
    make_certificates(&data);
    // The server reads its key as the cluster's owner, and refuses a key others can read.
    let owner = std::fs::metadata(&data).unwrap();
    for file in ["server.key", "server.crt", "server-ip.crt", "ca.crt"] {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = data.join(file);
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    pair.source
        .append_conf("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'");
    pair.source.write_hba(
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         hostssl all migrator 127.0.0.1/32 trust\n\
         hostssl replication migrator 127.0.0.1/32 trust\n",
    );
    pair.source.restart();
    pair.source
        .psql("app", "CREATE ROLE migrator LOGIN SUPERUSER REPLICATION");

    // Copies the CA where sluice (running as root) can read it.
    let ca = pair.dir.path().join("ca.crt");
    std::fs::copy(data.join("ca.crt"), &ca).unwrap();
    let other_ca = pair.dir.path().join("other.crt");
    std::fs::copy(data.join("other.crt"), &other_ca).unwrap();

    let config = pair.config("");
    let source_url = |root: &Path| {
        format!(
            "postgresql://migrator@localhost:{}/app?sslmode=verify-full&sslrootcert={}",
            pair.source.port,
            root.display()
        )
    };
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&pair.source.dsn("app"), &source_url(&ca));
    std::fs::write(&config, text).unwrap();

    let mut daemon = pair.start_daemon(&config).await;
    let source = pair.source_client().await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'over tls' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("t").await;
    let encrypted: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE ssl AND usename = 'migrator' AND backend_type = 'walsender'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(encrypted, 1, "the replication connection uses TLS");
    assert!(daemon.terminate().success(), "{}", daemon.log());

    // verify-full towards an IP address checks the certificate's IP addresses, as libpq
    // does, on the replication connection too.
    let by_address = pair.dir.path().join("by-address.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &source_url(&ca),
        &source_url(&ca).replace("@localhost:", "@127.0.0.1:"),
    );
    assert!(text.contains("@127.0.0.1:"), "{text}");
    std::fs::write(&by_address, text).unwrap();
    let mut daemon = pair.start_daemon(&by_address).await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'by address' FROM generate_series(101, 200) g")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("t").await;
    assert!(daemon.terminate().success(), "{}", daemon.log());

    // A server certificate that does not lead to the configured CA: exit 1, quickly.
    let wrong = pair.dir.path().join("wrong.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&source_url(&ca), &source_url(&other_ca));
    std::fs::write(&wrong, text).unwrap();
    let started = Instant::now();
    let (code, _, stderr) = sluice(&["run", "--config", wrong.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    // verify-ca: the chain is checked, the name is not. A certificate for 127.0.0.1 only,
    // reached as localhost: psql connects; the replication connection refused it (its
    // transport checked the name all the same).
    pair.source.append_conf("ssl_cert_file = 'server-ip.crt'");
    pair.source.restart();
    let verify_ca = pair.dir.path().join("verify-ca.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &source_url(&ca),
        &source_url(&ca).replace("sslmode=verify-full", "sslmode=verify-ca"),
    );
    assert!(text.contains("sslmode=verify-ca"), "{text}");
    std::fs::write(&verify_ca, text).unwrap();
    let (code, out, err) = sluice(&["check", "--config", verify_ca.to_str().unwrap()]);
    assert!(
        !out.contains("cannot open a replication connection"),
        "{out}{err} (exit {code})"
    );
    let mut daemon = pair.start_daemon(&verify_ca).await;
    let source = pair.source_client().await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'verify-ca' FROM generate_series(201, 300) g")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("t").await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
    // verify-full by that name is still refused.
    let (code, _, stderr) = sluice(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not valid for name"), "{stderr}");
}

/// libpq never uses TLS on a Unix-domain socket, so the default `sslmode=prefer` connects
/// there; and `sslmode=require` towards a server without TLS cannot work however often it
/// is tried, so it is a definite error that says what to change.
#[tokio::test(flavor = "multi_thread")]
async fn unix_sockets_need_no_tls_and_a_server_without_tls_under_require_is_definite() {
    let pair = Pair::with_schema("CREATE TABLE t (id int PRIMARY KEY, v text);").await;
    let config = pair.config("");
    let over_socket = |cluster: &crate::support::cluster::PgCluster| {
        format!(
            // sslmode=require: libpq still uses no TLS on a socket, nor must sluice.
            "host={} port={} user=postgres dbname=app sslmode=require",
            cluster.socket_dir().display(),
            cluster.port
        )
    };
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&pair.source.dsn("app"), &over_socket(&pair.source))
        .replace(&pair.target.dsn("app"), &over_socket(&pair.target));
    assert!(text.contains("host=/"), "{text}");
    std::fs::write(&config, &text).unwrap();
    let mut daemon = pair.start_daemon(&config).await;
    let source = pair.source_client().await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'over a socket' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    pair.wait_caught_up(&daemon).await;
    pair.assert_same("t").await;
    assert!(daemon.terminate().success(), "{}", daemon.log());

    let require = pair.dir.path().join("require.toml");
    let text = text.replace(
        &over_socket(&pair.source),
        &format!("{} sslmode=require", pair.source.dsn("app")),
    );
    std::fs::write(&require, text).unwrap();
    let started = Instant::now();
    let (code, _, stderr) = sluice(&["run", "--config", require.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(stderr.contains("does not offer TLS"), "{stderr}");
}
