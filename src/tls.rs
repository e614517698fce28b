//! TLS with libpq `sslmode` semantics for tokio-postgres connections, and the matching
//! settings for the replication transport.
//!
//! - `disable`: plain TCP. `allow`/`prefer`: TLS when the server offers it, unverified.
//! - `require`: TLS, unverified, unless `sslrootcert` is given: then as `verify-ca` (libpq
//!   does the same).
//! - `verify-ca`: the chain must lead to `sslrootcert` (default `~/.postgresql/root.crt`,
//!   `system` for the bundled web roots); the host name is not checked.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host.
//!
//! pgwire-replication installs ring as rustls' process-wide provider; we install the same
//! one first thing (`install_crypto_provider`) so both sides agree whoever connects first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::conninfo::{ConnInfo, SslMode};
use crate::error::{self, Error, Result};

/// Installs ring as rustls' process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens a SQL connection with the TLS the connection string asks for, and runs its
/// connection task in the background. Errors are classified (see `crate::error`).
pub async fn connect(info: &ConnInfo, purpose: &str) -> Result<tokio_postgres::Client> {
    let config = info.tokio_config();
    let what = || format!("Connecting to {purpose} {}", info.redacted());
    let failed = |e: tokio_postgres::Error| {
        let hint = connect_hint(&e, info);
        let error = error::pg(what(), e);
        match hint {
            Some(hint) => Error::new(error.kind(), format!("{}. {hint}", error.report())),
            None => error,
        }
    };
    let connect = async {
        // libpq never uses TLS on a Unix-domain socket, whatever sslmode says.
        if info.sslmode == SslMode::Disable || info.is_unix_socket() {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(failed)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(prepare_session(client).await)
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(info)?);
            let (client, connection) = config.connect(tls).await.map_err(failed)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(prepare_session(client).await)
        }
    };
    // tokio-postgres's connect_timeout covers the TCP connect only; a server that accepts
    // and then says nothing must not hang us either.
    match tokio::time::timeout(info.connect_timeout * 3, connect).await {
        Ok(result) => result,
        Err(_) => Err(Error::transient(format!(
            "{}: no answer within {:?}",
            what(),
            info.connect_timeout * 3
        ))),
    }
}

/// Cancels the statement running on the session `token` belongs to (a new connection to
/// the same server, as libpq's PQcancel). Failures are logged: the caller goes on either way.
pub async fn cancel(info: &ConnInfo, token: &tokio_postgres::CancelToken) {
    let result = if info.sslmode == SslMode::Disable || info.is_unix_socket() {
        token.cancel_query(tokio_postgres::NoTls).await
    } else {
        match client_config(info) {
            Ok(config) => {
                token
                    .cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(config))
                    .await
            }
            Err(error) => {
                tracing::warn!(error = %error.report(), "cannot cancel the statement");
                return;
            }
        }
    };
    if let Err(error) = result {
        tracing::warn!(error = %error, "cancelling the statement failed");
    }
}

/// What to do about a connection that failed for a reason retrying cannot change.
fn connect_hint(error: &tokio_postgres::Error, info: &ConnInfo) -> Option<String> {
    let code = error.code().map(|c| c.code().to_string());
    Some(match code.as_deref() {
        Some("28P01") | Some("28000") => format!(
            "Check the user {} and its password (in {}, PGPASSWORD or ~/.pgpass) and the server's pg_hba.conf entry for this client",
            info.user,
            info.origin
        ),
        Some("3D000") => format!(
            "The database {} does not exist on that server: check the database name in {}",
            info.dbname, info.origin
        ),
        None if error_chain_mentions(error, "password missing") => format!(
            "The server asks for a password for {} and none was given: put it in {} (postgresql://user:password@host/db, or password=... in key=value form), PGPASSWORD or ~/.pgpass",
            info.user, info.origin
        ),
        None if error_chain_mentions(error, "does not support TLS") => {
            "The server does not offer TLS: turn on ssl in its postgresql.conf, or connect with sslmode=prefer or disable".to_string()
        }
        None if error_chain_mentions(error, "certificate") => {
            "The server's certificate was not accepted: check sslrootcert, and for verify-full that the URL's host is a name the certificate holds".to_string()
        }
        // Transient (sluice run retries it), but a command run by hand should say where
        // to look.
        None if error_chain_mentions(error, "Connection refused") => format!(
            "Nothing accepts connections at {}:{}: is the server running, listening there (listen_addresses, port) and reachable from here? Check the host and port in {}",
            info.host, info.port, info.origin
        ),
        _ => return None,
    })
}

fn error_chain_mentions(error: &tokio_postgres::Error, needle: &str) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = next {
        if cause.to_string().contains(needle) {
            return true;
        }
        next = cause.source();
    }
    false
}

/// sluice's connections live as long as the daemon and are idle whenever the source is
/// (the apply session, the monitor's, a copy worker's between chunks); its transactions
/// are a whole chunk or a whole source transaction. A database's or role's
/// `idle_session_timeout` (14+) would close them every quiet minute, and `transaction_timeout`
/// (17+) end a long chunk; both are off for sluice's sessions. `set_config` only where the
/// server has the setting: naming it on an older server is an error.
const NO_IDLE_OR_TRANSACTION_TIMEOUT: &str = "SELECT set_config(name, '0', false) \
     FROM unnest(ARRAY['idle_session_timeout', 'transaction_timeout']) AS name \
     WHERE current_setting(name, true) IS NOT NULL";

/// How often the server checks, during a long statement, that sluice is still connected.
const CLIENT_CHECK: &str = "SET client_connection_check_interval = 1000";

/// A server notices a client that went away only when it next reads or writes the socket.
/// Without this, a statement running when sluice stops or is killed (a key build of hours,
/// a COPY or an apply statement waiting on a lock) goes on to its end, holding its locks,
/// and the next start waits behind it; with it, the server ends that statement within a
/// second. PostgreSQL 14 and later on Linux; older servers and other platforms refuse the
/// setting, and keep the old behaviour.
async fn prepare_session(client: tokio_postgres::Client) -> tokio_postgres::Client {
    if let Err(e) = client.batch_execute(NO_IDLE_OR_TRANSACTION_TIMEOUT).await {
        tracing::debug!(error = %e, "could not turn off idle_session_timeout / transaction_timeout");
    }
    if let Err(e) = client.batch_execute(CLIENT_CHECK).await {
        tracing::debug!(error = %e, "client_connection_check_interval not available");
    }
    if let Err(e) = client.batch_execute(crate::session::SCHEMA_SAFE).await {
        tracing::debug!(error = %e, "could not empty search_path");
    }
    client
}

/// The replication transport's TLS settings for the same connection string.
pub async fn replication_tls(info: &ConnInfo) -> Result<pgwire_replication::TlsConfig> {
    use pgwire_replication::SslMode as W;
    let root = root_cert_path(info)?;
    let mode = match info.sslmode {
        SslMode::Disable => W::Disable,
        SslMode::Allow | SslMode::Prefer => W::Prefer,
        SslMode::Require if root.is_some() => W::VerifyCa,
        SslMode::Require => W::Require,
        SslMode::VerifyCa => W::VerifyCa,
        SslMode::VerifyFull => W::VerifyFull,
    };
    // The transport's verify-ca checks the certificate's name all the same (it lets through
    // only the name-mismatch error rustls gave before 0.23.24, not the one it gives now), so
    // a certificate that does not name the host was refused: verify-ca exists for exactly
    // that case. The chain is verified in full and the name is one the certificate holds,
    // learnt from the certificate the server presents.
    if mode == W::VerifyCa {
        let name = name_the_certificate_holds(info).await?;
        let mut tls = pgwire_replication::TlsConfig {
            mode: W::VerifyFull,
            ca_pem_path: root.filter(|p| p.as_os_str() != "system"),
            ..Default::default()
        }
        .with_sni_hostname(name);
        if let (Some(cert), Some(key)) = (&info.sslcert, &info.sslkey) {
            tls = tls.with_client_cert(cert.clone(), key.clone());
        }
        return Ok(tls);
    }
    let mut tls = pgwire_replication::TlsConfig {
        mode,
        ca_pem_path: root.filter(|p| p.as_os_str() != "system"),
        ..Default::default()
    };
    if let (Some(cert), Some(key)) = (&info.sslcert, &info.sslkey) {
        tls = tls.with_client_cert(cert.clone(), key.clone());
    }
    // The transport refuses verify-full towards an IP address unless told which name to
    // check. libpq checks an IP host against the certificate's IP addresses, and rustls does
    // the same when the name it is given is the address itself.
    if info.sslmode == SslMode::VerifyFull && info.host.parse::<std::net::IpAddr>().is_ok() {
        tls = tls.with_sni_hostname(info.host.clone());
    }
    Ok(tls)
}

/// A name the server's certificate is valid for: the host itself when it is, else the
/// first DNS name of its subjectAltName (a wildcard's with a label put in). Read from the
/// certificate the server presents to a TLS handshake made for it, which verifies the chain
/// as verify-ca does.
async fn name_the_certificate_holds(info: &ConnInfo) -> Result<String> {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let config = Arc::new(client_config_keeping(info, Some(seen.clone()))?);
    let (host, port, timeout) = (info.host.clone(), info.port, info.connect_timeout);
    let what = format!("Reading the TLS certificate of {}", info.redacted());
    let handshake =
        tokio::task::spawn_blocking(move || -> std::io::Result<std::net::SocketAddr> {
            use std::io::{Read, Write};
            let address = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))?
                .next()
                .ok_or_else(|| std::io::Error::other("the host name resolves to no address"))?;
            let mut tcp = std::net::TcpStream::connect_timeout(&address, timeout)?;
            tcp.set_read_timeout(Some(timeout))?;
            tcp.set_write_timeout(Some(timeout))?;
            // SSLRequest: length 8, code 80877103.
            tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47])?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer)?;
            if answer[0] != b'S' {
                return Err(std::io::Error::other("the server does not offer TLS"));
            }
            let name =
                ServerName::try_from(host).map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut tls =
                rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
            while tls.is_handshaking() {
                tls.complete_io(&mut tcp)?;
            }
            Ok(address)
        });
    let outcome = handshake
        .await
        .map_err(|e| Error::transient(format!("{what}: {e}")))?;
    let certificate = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (der, address) = match (certificate, outcome) {
        (Some(der), Ok(address)) => (der, address),
        // A TLS refusal (the chain does not verify, no TLS offered) is definite; a
        // connection that failed is retried as any other.
        (_, Err(e)) => {
            let kind = match e.kind() {
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::Other => {
                    error::ErrorKind::Definite
                }
                _ => error::ErrorKind::Transient,
            };
            return Err(Error::with_source(kind, what, e));
        }
        (None, Ok(_)) => {
            return Err(Error::definite(format!(
                "{what}: the server presented no certificate"
            )))
        }
    };
    let der = CertificateDer::from(der);
    let certificate = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| Error::definite(format!("{what}: its certificate cannot be read ({e:?})")))?;
    let holds = |name: &ServerName<'_>| certificate.verify_is_valid_for_subject_name(name).is_ok();
    if ServerName::try_from(info.host.as_str()).is_ok_and(|name| holds(&name)) {
        return Ok(info.host.clone());
    }
    let ip = address.ip();
    if holds(&ServerName::IpAddress(ip.into())) {
        return Ok(ip.to_string());
    }
    if let Some(dns) = certificate.valid_dns_names().next() {
        return Ok(match dns.strip_prefix("*.") {
            Some(rest) => format!("sluice.{rest}"),
            None => dns.to_string(),
        });
    }
    Err(Error::definite(format!(
        "{what}: the certificate names no host in its subjectAltName (a CN alone is not read), so the replication connection cannot use it even under verify-ca: give the server a certificate with subjectAltName DNS or IP names, or connect with sslmode=require"
    )))
}

/// `sslrootcert`, or libpq's default file when it exists. `None` when no verification
/// material is configured.
fn root_cert_path(info: &ConnInfo) -> Result<Option<PathBuf>> {
    if let Some(path) = &info.sslrootcert {
        return Ok(Some(path.clone()));
    }
    let default = std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"));
    match default {
        Some(path) if path.is_file() => Ok(Some(path)),
        _ if matches!(info.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) => {
            Err(Error::config(format!(
                "{}: sslmode={} needs a root certificate: set sslrootcert=/path/to/ca.pem \
                 (or sslrootcert=system for the public web roots)",
                info.redacted(),
                info.sslmode.as_str()
            )))
        }
        _ => Ok(None),
    }
}

fn client_config(info: &ConnInfo) -> Result<ClientConfig> {
    client_config_keeping(info, None)
}

/// `client_config`, keeping the server's certificate in `seen` (verify-ca's verifier only).
fn client_config_keeping(
    info: &ConnInfo,
    seen: Option<Arc<std::sync::Mutex<Option<Vec<u8>>>>>,
) -> Result<ClientConfig> {
    install_crypto_provider();
    let root = root_cert_path(info)?;
    let verify = match info.sslmode {
        SslMode::VerifyFull => Some(true),
        SslMode::VerifyCa => Some(false),
        SslMode::Require if root.is_some() => Some(false),
        _ => None,
    };
    let builder = ClientConfig::builder();
    let builder = match (verify, root) {
        (Some(check_host), Some(root)) => {
            let roots = Arc::new(load_roots(&root, info)?);
            let webpki = rustls::client::WebPkiServerVerifier::builder(roots)
                .build()
                .map_err(|e| {
                    Error::with_source(
                        error::ErrorKind::Config,
                        format!("{}: building the certificate verifier", info.redacted()),
                        e,
                    )
                })?;
            if check_host {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Verifier {
                        chain: Some(webpki),
                        seen,
                    }))
            }
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier { chain: None, seen })),
    };
    match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(key)) => {
            let certs = read_pem_certs(cert, info)?;
            let key = read_pem_key(key, info)?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                Error::with_source(
                    error::ErrorKind::Config,
                    format!(
                        "{}: the client certificate and key do not fit",
                        info.redacted()
                    ),
                    e,
                )
            })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(Error::config(format!(
            "{}: sslcert and sslkey must be given together",
            info.redacted()
        ))),
    }
}

fn load_roots(path: &Path, info: &ConnInfo) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    if path.as_os_str() == "system" {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    }
    for cert in read_pem_certs(path, info)? {
        roots.add(cert).map_err(|e| {
            Error::with_source(
                error::ErrorKind::Config,
                format!(
                    "{}: bad root certificate in {}",
                    info.redacted(),
                    path.display()
                ),
                e,
            )
        })?;
    }
    Ok(roots)
}

fn read_pem_certs(path: &Path, info: &ConnInfo) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_file(path, info)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| {
            Error::with_source(
                error::ErrorKind::Config,
                format!(
                    "{}: reading certificates from {}",
                    info.redacted(),
                    path.display()
                ),
                e,
            )
        })?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "{}: {} holds no PEM certificate",
            info.redacted(),
            path.display()
        )));
    }
    Ok(certs)
}

fn read_pem_key(path: &Path, info: &ConnInfo) -> Result<PrivateKeyDer<'static>> {
    let bytes = read_file(path, info)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| {
            Error::config(format!(
                "{}: {} holds no PEM private key",
                info.redacted(),
                path.display()
            ))
        })
}

fn read_file(path: &Path, info: &ConnInfo) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::with_source(
            error::ErrorKind::Config,
            format!("{}: cannot read {}", info.redacted(), path.display()),
            e,
        )
    })
}

fn supported_schemes() -> Vec<SignatureScheme> {
    rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .supported_schemes()
}

fn verify_tls12(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &rustls::crypto::ring::default_provider().signature_verification_algorithms,
    )
}

fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &rustls::crypto::ring::default_provider().signature_verification_algorithms,
    )
}

/// The verifiers rustls' own WebPki one does not cover: `require` without a root certificate
/// (encrypted, not authenticated, as libpq) when `chain` is `None`, and `verify-ca` (the
/// chain must verify; a name mismatch is accepted) when it is set.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    /// Where to keep the server's certificate, for a probe that needs its names.
    seen: Option<Arc<std::sync::Mutex<Option<Vec<u8>>>>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if let Some(seen) = &self.seen {
            *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        }
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}
