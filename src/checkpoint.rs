//! Where sluice remembers how far it got.
//!
//! Two records, one authority:
//!
//! 1. **The target's position row** (`sluice.applied_position`, one row per slot) is written
//!    inside the same target transaction as the changes it covers. It is the authority: after
//!    any crash, the target holds exactly the changes up to its `applied_lsn`, no more, no
//!    fewer. On start, transactions whose commit end LSN is at or below it are skipped.
//! 2. **The sled store** in `state.dir` is a local cache of that position plus what only this
//!    machine knows: which source, slot and target the state dir belongs to, the highest LSN
//!    ever acknowledged to the slot, and initial-copy progress. sled's `flush()` survives
//!    `kill -9` but is not power-loss durable (it syncs with `sync_file_range`), which is
//!    why it is never the authority for what the target holds.
//!
//! Order of events per target commit: COMMIT (data + position row) → sled write + flush →
//! acknowledge the LSN to the slot. A crash between any two steps leaves the later records
//! behind the earlier ones, never ahead, so nothing is lost (the slot still has it) and
//! nothing is applied twice (the target's row says what it has).

use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio_postgres::Client;

use crate::error::{self, Error, ErrorKind, Result};
use crate::lsn::Lsn;

/// What the state dir belongs to; a state dir of another source, slot or target is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The source cluster's `system_identifier` (IDENTIFY_SYSTEM / pg_control_system()).
    pub source_system_identifier: String,
    pub source_database: String,
    pub slot: String,
    /// The target as `system <system_identifier> database <name>`, or as `host:port/dbname`
    /// when the target user may not read `pg_control_system()` (and in state dirs written
    /// before sluice recorded the system).
    pub target: String,
}

/// Which database a session is on, whatever host name or address reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `pg_control_system()`'s `system_identifier`; `None` where the user may not call it.
    pub system: Option<String>,
    pub database: String,
}

impl ServerIdentity {
    pub async fn read(client: &tokio_postgres::Client, what: &str) -> Result<ServerIdentity> {
        let database: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(|e| error::pg(format!("Reading {what}'s database name"), e))?
            .get(0);
        // Executable by everyone by default; a managed service may revoke it.
        let system = client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .ok()
            .map(|row| row.get::<_, String>(0));
        Ok(ServerIdentity { system, database })
    }

    /// The same database as `other`, as far as both identities tell.
    pub fn same_database(&self, other: &ServerIdentity) -> bool {
        self.system.is_some() && self.system == other.system && self.database == other.database
    }
}

/// How the state dir names the target: by its system identifier when known, so another host
/// name or address for the same server is the same target.
pub fn target_identity(
    conn: &crate::conninfo::ConnInfo,
    server: Option<&ServerIdentity>,
) -> String {
    match server {
        Some(ServerIdentity {
            system: Some(system),
            database,
        }) => format!("system {system} database {database}"),
        _ => legacy_target_identity(conn),
    }
}

fn legacy_target_identity(conn: &crate::conninfo::ConnInfo) -> String {
    format!("{}:{}/{}", conn.host, conn.port, conn.dbname)
}

/// The locally cached position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    /// End LSN of the last source commit applied on the target.
    pub applied_lsn: Lsn,
    /// `applied_lsn` or a later keepalive LSN acknowledged while nothing was in flight.
    pub caught_up_lsn: Lsn,
    /// The highest LSN ever acknowledged to the slot. A slot whose `confirmed_flush_lsn` is
    /// beyond this was advanced by someone else (or recreated): changes were lost.
    pub acked_lsn: Lsn,
    /// Source transactions and row changes applied since the migration began (every run of
    /// this state dir), for `status`. Saved after each target commit: a `kill -9` between
    /// the two loses one batch's count, never its rows.
    #[serde(default)]
    pub applied_transactions: u64,
    #[serde(default)]
    pub applied_changes: u64,
}

const IDENTITY_KEY: &str = "identity";
const POSITION_KEY: &str = "position";
/// The error the daemon last stopped on, for `status` while it is down.
const STOPPED_ON_KEY: &str = "daemon/stopped_on";

/// The sled store in `state.dir`. Only one process can hold it: the running daemon.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

/// The sled database lives in a subdirectory so the state dir can also hold the control
/// socket and other files.
pub fn sled_path(state_dir: &Path) -> PathBuf {
    state_dir.join("checkpoint")
}

impl Store {
    /// Opens (creating) the store. Fails with a clear message when another sluice process
    /// holds it.
    pub fn open(state_dir: &Path) -> Result<Store> {
        Self::open_once(state_dir).map_err(|(_, e)| e)
    }

    /// Opens the store, waiting up to `patience` for a lock held by someone else. `sluice
    /// status` reads the checkpoint when no daemon answers on the socket, which holds the lock
    /// for a moment: a `sluice run` starting at that instant (a restart under a watch loop)
    /// must not exit for it. A daemon holds the lock for good, so a second `run` still fails,
    /// only `patience` later. Async so the caller can give up at once (a stop request).
    pub async fn open_waiting(state_dir: &Path, patience: std::time::Duration) -> Result<Store> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Self::open_once(state_dir) {
                Err((true, _)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                opened => return opened.map_err(|(_, e)| e),
            }
        }
    }

    /// One attempt; the error says whether another process holds the lock.
    fn open_once(state_dir: &Path) -> std::result::Result<Store, (bool, Error)> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            (
                false,
                Error::with_source(
                    ErrorKind::Config,
                    format!("Cannot create state.dir {}", state_dir.display()),
                    e,
                ),
            )
        })?;
        restrict_permissions(state_dir);
        let opened = sled::Config::new()
            .path(sled_path(state_dir))
            .mode(sled::Mode::HighThroughput)
            .open();
        match opened {
            Ok(db) => Ok(Store {
                db,
                dir: state_dir.to_path_buf(),
            }),
            // The lock's own error is the OS's "would block": the message says it all.
            Err(e) if is_lock_error(&e) => Err((
                true,
                Error::definite(format!(
                    "The state dir {} is in use by another sluice process (a running `sluice run`?): stop it first, or use another state.dir",
                    state_dir.display()
                )),
            )),
            Err(e) => Err((
                false,
                Error::with_source(
                    ErrorKind::Definite,
                    format!(
                        "Cannot open the checkpoint store in {} (if it reports corrupted data: move the state dir aside and start again with an empty one; the position resumes from the target's sluice.applied_position, see troubleshooting.md)",
                        state_dir.display()
                    ),
                    e,
                ),
            )),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn identity(&self) -> Result<Option<Identity>> {
        self.get(IDENTITY_KEY)
    }

    /// Forgets the identity: for a first start refused before it created or recorded
    /// anything, so the state dir is not bound to a migration that never began.
    pub fn release_claim(&self) -> Result<()> {
        self.remove(IDENTITY_KEY)?;
        self.flush()
    }

    /// Records the identity on first use; afterwards refuses a different one. `target_conn`
    /// lets a state dir that named its target by host and port (before the system
    /// identifier was recorded) be recognised, and upgraded.
    pub fn claim(
        &self,
        identity: &Identity,
        target_conn: &crate::conninfo::ConnInfo,
    ) -> Result<()> {
        match self.identity()? {
            None => {
                self.put(IDENTITY_KEY, identity)?;
                self.flush()
            }
            Some(existing) if existing == *identity => Ok(()),
            Some(existing)
                if existing.target == legacy_target_identity(target_conn)
                    && Identity {
                        target: identity.target.clone(),
                        ..existing.clone()
                    } == *identity =>
            {
                self.put(IDENTITY_KEY, identity)?;
                self.flush()
            }
            Some(existing) => {
                let mut differences = Vec::new();
                if existing.source_system_identifier != identity.source_system_identifier
                    || existing.source_database != identity.source_database
                {
                    differences.push(format!(
                        "source (system {} database {}, now system {} database {})",
                        existing.source_system_identifier,
                        existing.source_database,
                        identity.source_system_identifier,
                        identity.source_database
                    ));
                }
                if existing.slot != identity.slot {
                    differences.push(format!("slot ({}, now {})", existing.slot, identity.slot));
                }
                if existing.target != identity.target {
                    differences.push(format!(
                        "target ({}, now {})",
                        existing.target, identity.target
                    ));
                }
                Err(Error::definite(format!(
                    "The state dir {} belongs to another migration: {}. Point state.dir at this migration's directory, or at a new empty one",
                    self.dir.display(),
                    differences.join("; ")
                )))
            }
        }
    }

    /// Records why the daemon stopped (`None`: it stopped as asked, or is starting).
    pub fn save_stopped_on(&self, error: Option<&str>) -> Result<()> {
        match error {
            Some(error) => self.put(STOPPED_ON_KEY, &error.to_string())?,
            None => self.remove(STOPPED_ON_KEY)?,
        }
        self.flush()
    }

    pub fn stopped_on(&self) -> Result<Option<String>> {
        self.get(STOPPED_ON_KEY)
    }

    pub fn position(&self) -> Result<Option<Position>> {
        self.get(POSITION_KEY)
    }

    /// Writes the position and flushes it to disk before returning.
    pub fn save_position(&self, position: &Position) -> Result<()> {
        self.put(POSITION_KEY, position)?;
        self.flush()
    }

    /// A value of another module (copy progress, ...) under its own key.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(bytes) = self.db.get(key).map_err(|e| self.io_error(key, e))? else {
            return Ok(None);
        };
        rmp_serde::from_slice(&bytes).map(Some).map_err(|e| {
            Error::with_source(
                ErrorKind::Definite,
                format!(
                    "The checkpoint store in {} holds an unreadable {key:?} record: move the state dir away and restart (the target's position row is the authority)",
                    self.dir.display()
                ),
                e,
            )
        })
    }

    /// Stores a value (not flushed: call `flush` when it must survive a crash).
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = rmp_serde::to_vec_named(value)
            .map_err(|e| Error::with_source(ErrorKind::Definite, format!("Encoding {key:?}"), e))?;
        self.db
            .insert(key, bytes)
            .map_err(|e| self.io_error(key, e))?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        self.db.remove(key).map_err(|e| self.io_error(key, e))?;
        Ok(())
    }

    /// Keys starting with `prefix`, with their values.
    pub fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>> {
        let mut out = Vec::new();
        for entry in self.db.scan_prefix(prefix) {
            let (key, _) = entry.map_err(|e| self.io_error(prefix, e))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            if let Some(value) = self.get(&key)? {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(|e| self.io_error("flush", e))?;
        Ok(())
    }

    fn io_error(&self, what: &str, error: sled::Error) -> Error {
        Error::with_source(
            ErrorKind::Definite,
            format!(
                "The checkpoint store in {} failed ({what})",
                self.dir.display()
            ),
            error,
        )
    }
}

fn is_lock_error(error: &sled::Error) -> bool {
    let text = error.to_string();
    text.contains("could not acquire lock") || text.contains("WouldBlock")
}

/// Whether a daemon holds the state dir right now (sled's lock is taken).
pub fn daemon_holds(state_dir: &Path) -> bool {
    if !sled_path(state_dir).exists() {
        return false;
    }
    match sled::Config::new().path(sled_path(state_dir)).open() {
        Ok(_) => false,
        Err(error) => is_lock_error(&error),
    }
}

/// The state dir holds the checkpoint and the control socket: owner-only.
fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

/// The position row on the target, read at start-up and by `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPosition {
    pub source_system_identifier: String,
    pub applied_lsn: Lsn,
    pub caught_up_lsn: Lsn,
}

pub const POSITION_TABLE: &str = "sluice.applied_position";

/// Creates sluice's schema and position table on the target when missing.
pub async fn ensure_position_table(target: &Client) -> Result<()> {
    // Present already (every start but the first): nothing to create, so a target that is
    // read-only for a while (maintenance, a failover) stalls apply rather than failing here.
    let present: bool = target
        .query_one(
            "SELECT to_regclass('sluice.applied_position') IS NOT NULL
                    AND to_regclass('sluice.table_sync') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| error::pg("Looking for sluice.applied_position on the target", e))?
        .get(0);
    if present {
        return Ok(());
    }
    // A schema created for sluice by an administrator (what `check` offers instead of the
    // database's CREATE privilege) is used as it is: `CREATE SCHEMA IF NOT EXISTS` checks
    // that privilege even when the schema exists.
    let schema_exists: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'sluice')",
            &[],
        )
        .await
        .map_err(|e| error::pg("Looking for schema sluice on the target", e))?
        .get(0);
    let create_schema = match schema_exists {
        true => "",
        false => "CREATE SCHEMA IF NOT EXISTS sluice;",
    };
    target
        .batch_execute(&format!(
            // Quietly: "already exists, skipping" notices on every reconnect are noise.
            "BEGIN;
             SET LOCAL client_min_messages = warning;
             {create_schema}
             CREATE TABLE IF NOT EXISTS sluice.applied_position (
                 slot text PRIMARY KEY,
                 source_system_identifier text NOT NULL,
                 applied_lsn pg_lsn NOT NULL,
                 caught_up_lsn pg_lsn NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now()
             );
             CREATE TABLE IF NOT EXISTS sluice.table_sync (
                 slot text NOT NULL,
                 table_schema text NOT NULL,
                 table_name text NOT NULL,
                 sync_lsn pg_lsn NOT NULL,
                 PRIMARY KEY (slot, table_schema, table_name)
             );
             COMMIT;"
        ))
        .await
        .map_err(|e| {
            let hint = match e.code().map(|c| c.code()) {
                Some("42501") => ": the target user may not create schema sluice or tables in it; GRANT CREATE ON DATABASE (for the schema) or CREATE ON SCHEMA sluice to it, or create them as their owner (`sluice schema` does)",
                Some("25006") => ": the target is read-only (default_transaction_read_only, or a standby); make it writable",
                _ => "",
            };
            error::pg(format!("Creating sluice.applied_position on the target{hint}"), e)
        })
}

/// Records on the target the per-table positions of tables copied under a later snapshot
/// than the slot's (`snapshot::table_sync_positions`), before streaming uses them. Kept only
/// in the state dir, they were lost with it: a start from an empty or restored state dir
/// then applied those tables' changes below the position a second time (rows doubled).
pub async fn save_table_sync(
    target: &Client,
    slot: &str,
    positions: &std::collections::BTreeMap<crate::source::TableName, Lsn>,
) -> Result<()> {
    if positions.is_empty() {
        return Ok(());
    }
    let schemas: Vec<&str> = positions.keys().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = positions.keys().map(|t| t.name.as_str()).collect();
    let lsns: Vec<String> = positions.values().map(|l| l.to_string()).collect();
    target
        .execute(
            "INSERT INTO sluice.table_sync (slot, table_schema, table_name, sync_lsn)
             SELECT $1, s, n, l::pg_lsn FROM unnest($2::text[], $3::text[], $4::text[]) AS u(s, n, l)
             ON CONFLICT (slot, table_schema, table_name) DO UPDATE SET sync_lsn = EXCLUDED.sync_lsn",
            &[&slot, &schemas, &names, &lsns],
        )
        .await
        .map_err(|e| error::pg("Recording the copied tables' sync positions on the target", e))?;
    Ok(())
}

/// The per-table positions the target holds for `slot` (see [`save_table_sync`]).
pub async fn load_table_sync(
    target: &Client,
    slot: &str,
) -> Result<std::collections::BTreeMap<crate::source::TableName, Lsn>> {
    let rows = target
        .query(
            "SELECT table_schema, table_name, sync_lsn::text FROM sluice.table_sync WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg("Reading the copied tables' sync positions on the target", e))?;
    rows.iter()
        .map(|row| {
            let lsn: String = row.get(2);
            let lsn: Lsn = lsn.parse().map_err(|_| {
                Error::definite(format!("sluice.table_sync holds an invalid LSN {lsn:?}"))
            })?;
            Ok((
                crate::source::TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
                lsn,
            ))
        })
        .collect()
}

/// The target's position for `slot`, `None` when sluice never applied anything for it (or
/// the table does not exist yet).
pub async fn read_target_position(target: &Client, slot: &str) -> Result<Option<TargetPosition>> {
    let exists = target
        .query_one(
            "SELECT to_regclass('sluice.applied_position') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| error::pg("Looking for sluice.applied_position on the target", e))?
        .get::<_, bool>(0);
    if !exists {
        return Ok(None);
    }
    let row = target
        .query_opt(
            "SELECT source_system_identifier, applied_lsn::text, caught_up_lsn::text
             FROM sluice.applied_position WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg("Reading sluice.applied_position on the target", e))?;
    let Some(row) = row else { return Ok(None) };
    let parse = |text: String| {
        text.parse::<Lsn>().map_err(|e| {
            Error::with_source(
                ErrorKind::Definite,
                "sluice.applied_position on the target holds an invalid LSN",
                e,
            )
        })
    };
    Ok(Some(TargetPosition {
        source_system_identifier: row.get(0),
        applied_lsn: parse(row.get(1))?,
        caught_up_lsn: parse(row.get(2))?,
    }))
}

/// The statement that records the position inside an apply transaction:
/// `$1` slot, `$2` system identifier, `$3` applied LSN, `$4` caught-up LSN (text).
pub const UPSERT_POSITION_SQL: &str = "INSERT INTO sluice.applied_position AS p
        (slot, source_system_identifier, applied_lsn, caught_up_lsn, updated_at)
    VALUES ($1, $2, $3::text::pg_lsn, $4::text::pg_lsn, now())
    ON CONFLICT (slot) DO UPDATE SET
        source_system_identifier = EXCLUDED.source_system_identifier,
        applied_lsn = EXCLUDED.applied_lsn,
        caught_up_lsn = EXCLUDED.caught_up_lsn,
        updated_at = EXCLUDED.updated_at";

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            source_system_identifier: "7300000000000000001".into(),
            source_database: "app".into(),
            slot: "sluice".into(),
            target: "system 7300000000000000002 database app".into(),
        }
    }

    fn target_conn() -> crate::conninfo::ConnInfo {
        crate::conninfo::ConnInfo::parse("host=coordinator port=5432 dbname=app user=u", "t")
            .unwrap()
    }

    #[test]
    fn positions_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.claim(&identity(), &target_conn()).unwrap();
            store
                .save_position(&Position {
                    applied_lsn: Lsn(100),
                    caught_up_lsn: Lsn(120),
                    acked_lsn: Lsn(120),
                    ..Default::default()
                })
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.position().unwrap().unwrap().caught_up_lsn, Lsn(120));
        store.claim(&identity(), &target_conn()).unwrap();
    }

    #[test]
    fn a_state_dir_of_another_migration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.claim(&identity(), &target_conn()).unwrap();
        let mut other = identity();
        other.slot = "other".into();
        other.target = "elsewhere:5432/app".into();
        let error = store.claim(&other, &target_conn()).unwrap_err().to_string();
        assert!(error.contains("slot (sluice, now other)"), "{error}");
        assert!(error.contains("target"), "{error}");
    }

    #[test]
    fn a_target_named_by_host_and_port_is_recognised_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let legacy = Identity {
            target: "coordinator:5432/app".into(),
            ..identity()
        };
        store.claim(&legacy, &target_conn()).unwrap();
        store.claim(&identity(), &target_conn()).unwrap();
        assert_eq!(store.identity().unwrap(), Some(identity()));
        // Another host's legacy name is another target.
        let elsewhere = crate::conninfo::ConnInfo::parse("host=elsewhere dbname=app", "t").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.claim(&legacy, &elsewhere).unwrap();
        assert!(store.claim(&identity(), &elsewhere).is_err());
    }

    #[tokio::test]
    async fn a_brief_holder_is_waited_out_and_a_lasting_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path()).unwrap();
        if Store::open(dir.path()).is_ok() {
            return; // this sled locks per process: nothing to wait for here
        }
        let started = std::time::Instant::now();
        let error = Store::open_waiting(dir.path(), std::time::Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("in use"), "{error}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        Store::open_waiting(dir.path(), std::time::Duration::from_secs(10))
            .await
            .unwrap();
        release.join().unwrap();
    }

    #[test]
    fn a_second_opener_is_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Store::open(dir.path()).unwrap();
        assert!(daemon_holds(dir.path()));
        // sled's lock is per process in some versions; only check the message when it fails
        if let Err(error) = Store::open(dir.path()) {
            assert!(error.to_string().contains("in use"), "{error}");
        }
    }

    #[test]
    fn a_position_saved_before_the_counts_existed_still_reads() {
        #[derive(Serialize)]
        struct Before {
            applied_lsn: Lsn,
            caught_up_lsn: Lsn,
            acked_lsn: Lsn,
        }
        let bytes = rmp_serde::to_vec_named(&Before {
            applied_lsn: Lsn(1),
            caught_up_lsn: Lsn(2),
            acked_lsn: Lsn(3),
        })
        .unwrap();
        let position: Position = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(position.acked_lsn, Lsn(3));
        assert_eq!(position.applied_transactions, 0);
    }
}
