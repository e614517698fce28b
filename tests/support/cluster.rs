//! Throwaway PostgreSQL clusters for tests: `initdb` + `pg_ctl` in a temp dir, on a free
//! loopback port, owned by the `postgres` OS user when the tests run as root (initdb refuses
//! root). Every cluster is stopped when its handle drops, also when a test panics.
//!
//! ```ignore
//! let (pg, client) = PgCluster::start_with_client().await;
//! client.batch_execute("CREATE TABLE t (id int primary key)").await.unwrap();
//! ```
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Settings every test cluster gets. `fsync = off` because test data never needs to outlive
/// the machine; crash tests kill sluice, not the server.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "'127.0.0.1'"),
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("max_connections", "100"),
    ("shared_buffers", "32MB"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("max_prepared_transactions", "10"),
    ("logical_decoding_work_mem", "64kB"),
    ("log_min_messages", "warning"),
    ("log_line_prefix", "'%m [%p] %q%u@%d '"),
];

pub struct ClusterBuilder {
    settings: Vec<(String, String)>,
}

impl ClusterBuilder {
    /// Adds or overrides one `postgresql.conf` setting (the value is written as given, so
    /// quote strings: `.setting("wal_level", "replica")`, `.setting("timezone", "'UTC'")`).
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    pub fn start(self) -> PgCluster {
        let bindir = postgres_bindir();
        let mut last_error = String::new();
        // A free port can be taken between probing and binding it: retry on a new one.
        for _ in 0..5 {
            match PgCluster::init_and_start(&bindir, &self.settings) {
                Ok(cluster) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start a test PostgreSQL cluster: {last_error}");
    }
}

pub struct PgCluster {
    root: tempfile::TempDir,
    data: PathBuf,
    bindir: PathBuf,
    pub port: u16,
}

impl PgCluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            settings: BASE_SETTINGS
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// A running cluster with `wal_level = logical`.
    pub fn start() -> PgCluster {
        Self::builder().start()
    }

    /// A running cluster and a client connected to its `postgres` database.
    pub async fn start_with_client() -> (PgCluster, tokio_postgres::Client) {
        let cluster = Self::start();
        let client = cluster.connect("postgres").await;
        (cluster, client)
    }

    fn init_and_start(bindir: &Path, settings: &[(String, String)]) -> Result<PgCluster, String> {
        let root = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let data = root.path().join("data");
        let owner = server_owner();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(root.path(), Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", root.path().display()))?;
        }
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let port = free_port();
        let initdb = run_as_owner(
            Command::new(bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg("--no-sync"),
            owner,
        )?;
        if !initdb.status.success() {
            return Err(format!("initdb failed: {}", text(&initdb)));
        }
        let mut conf = String::from("\n# sluice test cluster\n");
        conf.push_str(&format!("port = {port}\n"));
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            root.path().display()
        ));
        for (name, value) in settings {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        append(&data.join("postgresql.conf"), &conf)?;
        let cluster = PgCluster {
            root,
            data,
            bindir: bindir.to_path_buf(),
            port,
        };
        cluster.pg_ctl(&["start", "-w", "-t", "60"])?;
        Ok(cluster)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let log = self.root.path().join("server.log");
        let output = run_as_owner(
            Command::new(self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .args(args),
            server_owner(),
        )?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl {args:?} failed: {}\n--- server log ---\n{}",
                text(&output),
                fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }

    /// The directory of the server's Unix-domain socket.
    pub fn socket_dir(&self) -> &Path {
        self.root.path()
    }

    /// libpq key=value connection string for `dbname` as superuser `postgres`.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// libpq URL for `dbname` as superuser `postgres`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// A client on `dbname`; its connection task runs on the current runtime.
    pub async fn connect(&self, dbname: &str) -> tokio_postgres::Client {
        self.try_connect(dbname)
            .await
            .unwrap_or_else(|e| panic!("connect to test cluster {}: {e}", self.dsn(dbname)))
    }

    pub async fn try_connect(
        &self,
        dbname: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.dsn(dbname), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Creates a database and returns a client on it.
    pub async fn create_database(&self, name: &str) -> tokio_postgres::Client {
        let admin = self.connect("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.connect(name).await
    }

    /// Runs SQL through `psql` (for scripts with `\` commands or many statements);
    /// panics with psql's output on failure.
    pub fn psql(&self, dbname: &str, sql: &str) -> String {
        let output = Command::new(self.tool("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(self.dsn(dbname))
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        assert!(output.status.success(), "psql failed: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// A client tool (psql, pg_dump, pgbench): from the server's bindir, else from PATH.
    pub fn tool(&self, name: &str) -> PathBuf {
        let beside = self.bindir.join(name);
        if beside.is_file() {
            beside
        } else {
            PathBuf::from(name)
        }
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn server_log(&self) -> String {
        fs::read_to_string(self.root.path().join("server.log")).unwrap_or_default()
    }

    /// Appends settings to `postgresql.conf`; call `reload` or `restart` to apply them.
    pub fn append_conf(&self, lines: &str) {
        append(&self.data.join("postgresql.conf"), &format!("\n{lines}\n")).unwrap();
    }

    /// Replaces `pg_hba.conf` (for authentication tests); call `reload` afterwards.
    pub fn write_hba(&self, contents: &str) {
        fs::write(self.data.join("pg_hba.conf"), contents).unwrap();
    }

    pub fn reload(&self) {
        self.pg_ctl(&["reload"]).unwrap();
    }

    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-w", "-m", "fast"]).unwrap();
    }

    /// Stops without a shutdown checkpoint, as a crash would.
    pub fn stop_immediate(&self) {
        self.pg_ctl(&["stop", "-w", "-m", "immediate"]).unwrap();
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]).unwrap();
    }

    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-w", "-m", "fast", "-t", "60"])
            .unwrap();
    }

    /// Waits until the server accepts connections again (after a restart done elsewhere).
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.try_connect("postgres").await.is_err() {
            assert!(Instant::now() < deadline, "test cluster did not come back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = run_as_owner(
            Command::new(self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["stop", "-w", "-m", "immediate"]),
            server_owner(),
        );
    }
}

/// Where the server binaries are: `$PG_BINDIR`, then a PATH entry holding both `initdb` and
/// `pg_ctl`, then the newest `/usr/lib/postgresql/*/bin`.
pub fn postgres_bindir() -> PathBuf {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        assert!(
            has_tools(&dir),
            "PG_BINDIR={} has no initdb/pg_ctl",
            dir.display()
        );
        return dir;
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| has_tools(d)) {
            // Follow a symlinked initdb to the directory that has the other tools too.
            return fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "no PostgreSQL server binaries: install them (apt-get install -y postgresql) or set PG_BINDIR",
    )
}

/// The (uid, gid) the server runs as: `postgres` when we are root, else ourselves.
fn server_owner() -> Option<(u32, u32)> {
    let output = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&output.stdout).trim() != "0" {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"));
    let line = line.expect("running as root needs a `postgres` OS user to own test clusters");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
}

fn run_as_owner(command: &mut Command, owner: Option<(u32, u32)>) -> Result<Output, String> {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    // The server must not inherit our pipes: pg_ctl's children would keep them open.
    command.stdin(std::process::Stdio::null());
    command
        .output()
        .map_err(|e| format!("run {:?}: {e}", command.get_program()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free loopback port")
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
