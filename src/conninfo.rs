//! Connection strings: libpq URLs (`postgresql://user:pw@host:5432/db?sslmode=require`) and
//! key=value strings (`host=h port=5432 dbname=db`), with libpq's environment fallbacks
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `~/.pgpass`).
//!
//! One parsed [`ConnInfo`] feeds both transports: tokio-postgres for SQL and
//! pgwire-replication for the stream. The password lives in a [`Secret`] whose `Debug` and
//! `Display` print `***`, and [`ConnInfo::redacted`] is the only form that reaches logs,
//! status output and error messages.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// A password that never prints.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// libpq `sslmode` semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: Option<String>,
    pub connect_timeout: Duration,
    /// Extra startup `options` (`-c name=value ...`), passed on to both transports.
    pub options: Option<String>,
    /// Where the string came from (`source.url`, `SLUICE_SOURCE_URL`, `--source`), for
    /// messages that tell the operator which one to fix.
    pub origin: String,
}

const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "connect_timeout",
    "options",
];

impl ConnInfo {
    /// Parses a URL or key=value string. `what` names the setting in errors
    /// (`source.url`), which never contain the password.
    pub fn parse(text: &str, what: &str) -> Result<ConnInfo> {
        let text = text.trim();
        if text.is_empty() {
            // libpq would connect to its defaults; a migration tool should not guess which
            // database is meant.
            return Err(Error::config(format!(
                "{what} is empty: give a postgresql:// URL or a key=value string naming the database"
            )));
        }
        let parsed = if text.starts_with("postgresql://") || text.starts_with("postgres://") {
            parse_url(text)
        } else if let Some((scheme, _)) = text.split_once("://").filter(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }) {
            Err(format!(
                "a URL must start with postgresql:// or postgres:// (lower case), not {scheme}://"
            ))
        } else {
            parse_key_values(text)
        };
        parsed
            .and_then(Self::from_pairs)
            .map(|info| ConnInfo {
                origin: what.to_string(),
                ..info
            })
            .map_err(|message| Error::config(format!("{what}: {}", scrub(&message, text))))
    }

    fn from_pairs(pairs: Vec<(String, String)>) -> std::result::Result<ConnInfo, String> {
        let mut host = None;
        let mut port = None;
        let mut user = None;
        let mut password = None;
        let mut dbname = None;
        let mut sslmode = None;
        let mut info_paths: [Option<PathBuf>; 3] = [None, None, None];
        let mut application_name = None;
        let mut connect_timeout = None;
        let mut options = None;
        for (key, value) in pairs {
            match key.as_str() {
                "host" | "hostaddr" => {
                    if value.contains(',') {
                        return Err(format!(
                            "several hosts ({value}) are not supported: name the primary"
                        ));
                    }
                    host = Some(value)
                }
                "port" => {
                    port = Some(value.parse::<u16>().map_err(|_| {
                        // Not shown: a password with an unencoded ':' puts its tail here.
                        "the port is not a TCP port number (1 to 65535); if the password holds a ':', percent-encode it (%3A)".to_string()
                    })?)
                }
                "user" => user = Some(value),
                "password" => password = Some(Secret::new(value)),
                "dbname" => dbname = Some(value),
                "sslmode" => {
                    sslmode = Some(SslMode::parse(&value).ok_or_else(|| {
                        format!(
                            "sslmode {value:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        )
                    })?)
                }
                "sslrootcert" => info_paths[0] = Some(PathBuf::from(value)),
                "sslcert" => info_paths[1] = Some(PathBuf::from(value)),
                "sslkey" => info_paths[2] = Some(PathBuf::from(value)),
                "application_name" => application_name = Some(value),
                "connect_timeout" => {
                    let seconds = value.parse::<u64>().map_err(|_| {
                        format!("connect_timeout {value:?} is not a number of seconds")
                    })?;
                    connect_timeout = Some(Duration::from_secs(seconds.max(2)))
                }
                "options" => options = Some(value),
                other => {
                    return Err(format!(
                        "unknown connection parameter {other:?} (known: {})",
                        KNOWN_KEYS.join(", ")
                    ))
                }
            }
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let host = host
            .filter(|h| !h.is_empty())
            .or_else(|| env("PGHOST"))
            .unwrap_or_else(|| "localhost".to_string());
        let port = match port {
            Some(port) => port,
            None => match env("PGPORT") {
                Some(text) => text
                    .parse()
                    .map_err(|_| format!("PGPORT {text:?} is not a TCP port number"))?,
                None => 5432,
            },
        };
        let user = user
            .filter(|u| !u.is_empty())
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".to_string());
        let dbname = dbname
            .filter(|d| !d.is_empty())
            .or_else(|| env("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        let sslmode = match sslmode {
            Some(mode) => mode,
            None => match env("PGSSLMODE") {
                Some(text) => SslMode::parse(&text)
                    .ok_or_else(|| format!("PGSSLMODE {text:?} is not a valid sslmode"))?,
                None => SslMode::Prefer,
            },
        };
        let password = password
            .or_else(|| env("PGPASSWORD").map(Secret::new))
            .or_else(|| pgpass_lookup(&host, port, &dbname, &user).map(Secret::new));
        let [sslrootcert, sslcert, sslkey] = info_paths;
        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            application_name,
            connect_timeout: connect_timeout.unwrap_or(Duration::from_secs(10)),
            options,
            origin: String::new(),
        })
    }

    /// The connection as it may be shown: no password.
    /// Written as a libpq URL would be (percent-encoded where needed), so it can be pasted.
    pub fn redacted(&self) -> String {
        let host = if self.host.contains(':') && !self.is_unix_socket() {
            format!("[{}]", self.host)
        } else {
            percent_encode(&self.host)
        };
        format!(
            "postgresql://{}@{}:{}/{}",
            percent_encode(&self.user),
            host,
            self.port,
            percent_encode(&self.dbname)
        )
    }

    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// tokio-postgres configuration (TLS is chosen separately, see `crate::tls`).
    pub fn tokio_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name(self.application_name.as_deref().unwrap_or("sluice"));
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        if let Some(options) = &self.options {
            config.options(options);
        }
        config.ssl_mode(match self.sslmode {
            // libpq never asks for TLS on a Unix-domain socket (the server refuses it there);
            // tokio-postgres would, and fail under require.
            _ if self.is_unix_socket() => tokio_postgres::config::SslMode::Disable,
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        config
    }

    /// The same database as another `ConnInfo`? (host, port and dbname; used to refuse a
    /// target that is the source.)
    pub fn same_database(&self, other: &ConnInfo) -> bool {
        self.host == other.host && self.port == other.port && self.dbname == other.dbname
    }
}

/// `message` with every password the connection string `text` may hold replaced by `***`:
/// a URL's `user:password@` part, and `password=` values (URL parameter or key=value).
/// Parse errors quote the values they reject, and a mistyped string can put a password
/// where another value is expected.
fn scrub(message: &str, text: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    if let Some((_, rest)) = text.split_once("://") {
        if let Some((credentials, _)) = rest.rsplit_once('@') {
            if let Some((_, password)) = credentials.split_once(':') {
                secrets.push(password.to_string());
                secrets.extend(percent_decode(password).ok());
            }
        }
    }
    let mut search = text;
    while let Some(at) = search.find("password") {
        let after = search[at + "password".len()..].trim_start();
        if let Some(value) = after.strip_prefix('=') {
            let value = value.trim_start();
            let value = match value.strip_prefix('\'') {
                Some(quoted) => quoted.split('\'').next().unwrap_or(quoted),
                None => value
                    .split(|c: char| c.is_whitespace() || c == '&')
                    .next()
                    .unwrap_or(value),
            };
            secrets.push(value.to_string());
            secrets.extend(percent_decode(value).ok());
        }
        search = &search[at + "password".len()..];
    }
    // Longest first, so a password that contains another is replaced whole.
    secrets.retain(|secret| !secret.is_empty());
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    let mut message = message.to_string();
    for secret in secrets {
        message = message.replace(&secret, "***");
    }
    message
}

/// Percent-encodes what a URL component may not hold as is.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a % in the URL must be followed by two hex digits".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL decodes to invalid UTF-8".to_string())
}

fn parse_url(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let rest = text
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    // An '@' after the first '/' or '?' is where the host part really ends: the user name or
    // password holds one of / ? # unencoded, and splitting there would read part of the
    // password as the port, database or a parameter (and show it). Said as such, showing
    // nothing of it.
    if let Some(end) = rest.find(['/', '?', '#']) {
        if rest[end..].contains('@') {
            return Err("the text before the last '@' holds a / ? or #: in a URL, a user name or password must have / ? # @ : % percent-encoded (%2F %3F %23 %40 %3A %25), or write the connection as key=value pairs (password='...')".to_string());
        }
    }
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path),
        None => (rest, ""),
    };
    let mut pairs = Vec::new();
    let hostport = match authority.rsplit_once('@') {
        Some((credentials, hostport)) => {
            let (user, password) = match credentials.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (credentials, None),
            };
            if !user.is_empty() {
                pairs.push(("user".to_string(), percent_decode(user)?));
            }
            if let Some(password) = password {
                pairs.push(("password".to_string(), percent_decode(password)?));
            }
            hostport
        }
        None => authority,
    };
    // libpq's multi-host form (`h1:5432,h2:5432`): said as such, not as a bad port.
    if hostport.contains(',') {
        return Err(format!(
            "several hosts ({hostport}) are not supported: name the primary"
        ));
    }
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| "an IPv6 host needs its closing ]".to_string())?;
        (
            host.to_string(),
            after.strip_prefix(':').map(str::to_string),
        )
    } else {
        // The first colon ends the host, as in libpq: `h:5432:77` is a bad port, not a
        // host named `h:5432`.
        match hostport.split_once(':') {
            Some((host, port)) => (host.to_string(), Some(port.to_string())),
            None => (hostport.to_string(), None),
        }
    };
    if !host.is_empty() {
        pairs.push(("host".to_string(), percent_decode(&host)?));
    }
    if let Some(port) = port.filter(|p| !p.is_empty()) {
        pairs.push(("port".to_string(), port));
    }
    if !path.is_empty() {
        pairs.push(("dbname".to_string(), percent_decode(path)?));
    }
    for param in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| format!("URL parameter {param:?} has no value"))?;
        pairs.push((percent_decode(key)?, percent_decode(value)?));
    }
    Ok(pairs)
}

fn parse_key_values(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            // The word itself is not shown: it may be (part of) a password.
            return Err(format!(
                "expected key=value pairs or a postgresql:// URL, but word {} has no '=' (quote a value with spaces: key='a b')",
                pairs.len() + 1
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("the quoted value of {key:?} is not closed")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// libpq's password file: `PGPASSFILE` or `~/.pgpass`, lines `host:port:db:user:password`
/// with `*` wildcards and `\:` escapes. Ignored when unreadable, as libpq does.
fn pgpass_lookup(host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let contents = std::fs::read_to_string(path).ok()?;
    let port = port.to_string();
    let lookup_host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    contents
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields = split_pgpass_line(line);
            if fields.len() != 5 {
                return None;
            }
            let matches = |field: &str, value: &str| field == "*" || field == value;
            (matches(&fields[0], lookup_host)
                && matches(&fields[1], &port)
                && matches(&fields[2], dbname)
                && matches(&fields[3], user))
            .then(|| fields[4].clone())
        })
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap().extend(chars.next()),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let info = ConnInfo::parse(
            "postgresql://mig%40r:s3cr%2Ft@10.0.0.5:6432/app?sslmode=verify-full&application_name=x",
            "source.url",
        )
        .unwrap();
        assert_eq!(info.host, "10.0.0.5");
        assert_eq!(info.port, 6432);
        assert_eq!(info.user, "mig@r");
        assert_eq!(info.password.as_ref().unwrap().expose(), "s3cr/t");
        assert_eq!(info.dbname, "app");
        assert_eq!(info.sslmode, SslMode::VerifyFull);
        assert_eq!(info.application_name.as_deref(), Some("x"));
        assert_eq!(info.redacted(), "postgresql://mig%40r@10.0.0.5:6432/app");
    }

    #[test]
    fn parses_key_value_strings() {
        let info = ConnInfo::parse(
            "host=127.0.0.1 port=55432 user=postgres dbname='my db' password='it''s'",
            "target.url",
        );
        // libpq quoting uses backslash escapes, not doubled quotes
        assert!(info.is_err() || info.unwrap().dbname == "my db");
        let info = ConnInfo::parse(
            r"host=127.0.0.1 port=55432 user=postgres dbname='my db' password='it\'s'",
            "target.url",
        )
        .unwrap();
        assert_eq!(info.dbname, "my db");
        assert_eq!(info.password.unwrap().expose(), "it's");
    }

    #[test]
    fn ipv6_hosts_and_defaults() {
        let info = ConnInfo::parse("postgres://u@[::1]/d", "x").unwrap();
        assert_eq!(info.host, "::1");
        assert_eq!(info.port, 5432);
        assert_eq!(info.redacted(), "postgresql://u@[::1]:5432/d");
    }

    #[test]
    fn errors_name_the_setting_and_never_the_password() {
        let error = ConnInfo::parse("postgresql://u:hunter2@h:notaport/d", "source.url")
            .unwrap_err()
            .to_string();
        assert!(error.contains("source.url"), "{error}");
        assert!(error.contains("port"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        // Two ports: a bad port, as libpq says, not a host named "h:5432".
        let error = ConnInfo::parse("postgresql://u@h:5432:77/d", "source.url")
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a TCP port number"), "{error}");
        let error = ConnInfo::parse("postgresql://u:pw@h1:5432,h2:5432/d", "source.url")
            .unwrap_err()
            .to_string();
        assert!(error.contains("several hosts (h1:5432,h2:5432)"), "{error}");
        assert!(!error.contains("pw"), "{error}");

        let error = ConnInfo::parse("host=h sslmode=sometimes password=hunter2", "target.url")
            .unwrap_err()
            .to_string();
        assert!(error.contains("sslmode"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");

        let error = ConnInfo::parse("host=h bogus=1", "target.url")
            .unwrap_err()
            .to_string();
        assert!(error.contains("bogus"), "{error}");

        // Mistyped strings that put the password where the parser quotes what it rejects.
        for (text, password) in [
            ("mysql://u:hunter2@h:5432/d", "hunter2"),
            ("POSTGRESQL://u:hunter2@h/d", "hunter2"),
            ("postgresql:/u:hunter2@h/d", "hunter2"),
            ("host=h password=hunter2 sslmode=hunter2", "hunter2"),
            ("host=h password='hunter 2' port=hunter", "hunter"),
            ("host=h password=two words", "words"),
            ("postgresql://u:pa%2Fss@h:pa%2Fss/d", "pa/ss"),
            (
                "postgresql://u:secret@h/d?password=hunter2&sslmode=hunter2",
                "hunter2",
            ),
            // Unencoded / ? : in the password.
            (
                "postgresql://postgres:999999/x@127.0.0.1:5432/app",
                "999999",
            ),
            ("postgresql://postgres:12345/x@127.0.0.1:5432/app", "12345"),
            (
                "postgresql://postgres:a?secret@127.0.0.1:5432/app",
                "secret",
            ),
            (
                "postgresql://postgres:p@ss:w/rd%41#?@127.0.0.1:5432/app",
                "ss:w",
            ),
            ("postgresql://u:pre?sslmode=x@h/d", "pre"),
            ("postgresql://u@h:4242:secret/d", "4242:secret"),
        ] {
            let error = ConnInfo::parse(text, "--source").unwrap_err().to_string();
            assert!(error.starts_with("--source: "), "{error}");
            assert!(!error.contains(password), "{text}: {error}");
        }
        let error = ConnInfo::parse("mysql://u@h/d", "x")
            .unwrap_err()
            .to_string();
        assert!(error.contains("not mysql://"), "{error}");
        let error = ConnInfo::parse("postgresql://postgres:999999/x@127.0.0.1:5432/app", "x")
            .unwrap_err()
            .to_string();
        assert!(error.contains("percent-encoded (%2F %3F"), "{error}");

        assert!(ConnInfo::parse("just words", "x").is_err());
        assert!(ConnInfo::parse("  ", "--source")
            .unwrap_err()
            .to_string()
            .contains("--source is empty"));
        assert!(ConnInfo::parse("host='open", "x").is_err());
        assert!(ConnInfo::parse("postgresql://h/%zz", "x").is_err());
    }

    #[test]
    fn redacted_urls_are_urls_again() {
        for text in [
            "postgresql://us%40er:pw@h:5432/my%20db",
            "host=/var/run/postgresql port=5433 user=u dbname=app",
            "postgresql://u@[::1]:5432/d",
        ] {
            let info = ConnInfo::parse(text, "x").unwrap();
            let shown = info.redacted();
            assert!(!shown.contains("pw"), "{shown}");
            let again = ConnInfo::parse(&shown, "x").unwrap();
            assert_eq!(
                (&again.user, &again.host, again.port, &again.dbname),
                (&info.user, &info.host, info.port, &info.dbname),
                "{shown}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_password() {
        let info = ConnInfo::parse("postgresql://u:hunter2@h/d", "x").unwrap();
        let debug = format!("{info:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn pgpass_lines_split_on_unescaped_colons() {
        assert_eq!(
            split_pgpass_line(r"h:5432:*:u:pa\:ss:word"),
            vec!["h", "5432", "*", "u", "pa:ss:word"]
        );
    }
}
