//! The decoded message types, one struct per message of the protocol documentation
//! ("Logical Replication Message Formats"), fields named after the documented fields.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::tuple::Tuple;
use crate::lsn::Lsn;

/// A PostgreSQL `TimestampTz` as sent on the wire: microseconds since 2000-01-01 00:00 UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

/// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

impl PgTimestamp {
    /// The same instant as a `SystemTime`, also before 1970 (negative offsets).
    ///
    /// `infinity` / `-infinity` (i64::MAX / MIN) and anything else out of `SystemTime`'s range
    /// saturate instead of panicking.
    pub fn to_system_time(self) -> SystemTime {
        let unix_micros = i128::from(self.0) + i128::from(PG_EPOCH_UNIX_SECONDS) * 1_000_000;
        let magnitude = u64::try_from(unix_micros.unsigned_abs()).unwrap_or(u64::MAX);
        let offset = Duration::from_micros(magnitude);
        let moved = if unix_micros >= 0 {
            UNIX_EPOCH.checked_add(offset)
        } else {
            UNIX_EPOCH.checked_sub(offset)
        };
        moved.unwrap_or(UNIX_EPOCH)
    }

    /// Microseconds since the Unix epoch (what most clocks and libraries count in).
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_SECONDS * 1_000_000)
    }

    pub fn from_unix_micros(micros: i64) -> PgTimestamp {
        PgTimestamp(micros.saturating_sub(PG_EPOCH_UNIX_SECONDS * 1_000_000))
    }
}

/// One pgoutput message. New protocol versions add messages, hence non-exhaustive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalDecodingMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(StreamPrepare),
}

impl LogicalMessage {
    /// The message's name in the protocol documentation ("Stream Commit").
    pub fn kind(&self) -> &'static str {
        match self {
            LogicalMessage::Begin(_) => "Begin",
            LogicalMessage::Commit(_) => "Commit",
            LogicalMessage::Origin(_) => "Origin",
            LogicalMessage::Relation(_) => "Relation",
            LogicalMessage::Type(_) => "Type",
            LogicalMessage::Insert(_) => "Insert",
            LogicalMessage::Update(_) => "Update",
            LogicalMessage::Delete(_) => "Delete",
            LogicalMessage::Truncate(_) => "Truncate",
            LogicalMessage::Message(_) => "Message",
            LogicalMessage::StreamStart(_) => "Stream Start",
            LogicalMessage::StreamStop => "Stream Stop",
            LogicalMessage::StreamCommit(_) => "Stream Commit",
            LogicalMessage::StreamAbort(_) => "Stream Abort",
            LogicalMessage::BeginPrepare(_) => "Begin Prepare",
            LogicalMessage::Prepare(_) => "Prepare",
            LogicalMessage::CommitPrepared(_) => "Commit Prepared",
            LogicalMessage::RollbackPrepared(_) => "Rollback Prepared",
            LogicalMessage::StreamPrepare(_) => "Stream Prepare",
        }
    }
}

/// `B`: start of a (non-streamed) transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record (equals `Commit::commit_lsn`).
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

/// `C`: end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to acknowledge once the transaction is applied.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// `O`: the transaction came from another node (replication origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `R`: a table's schema as the publication sends it. Re-sent after DDL and on reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Set only inside a streamed block (protocol 2 and later).
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

impl Relation {
    /// `namespace.name`, unquoted, as `[tables]` globs are written.
    pub fn qualified_name(&self) -> String {
        if self.namespace.is_empty() {
            format!("pg_catalog.{}", self.name)
        } else {
            format!("{}.{}", self.namespace, self.name)
        }
    }

    /// The table's name (an empty namespace is `pg_catalog`).
    pub fn table_name(&self) -> crate::source::TableName {
        let namespace = if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            &self.namespace
        };
        crate::source::TableName::new(namespace, self.name.as_str())
    }

    /// The name for messages, quoted where PostgreSQL needs it (as `TableName` shows it).
    pub fn shown_name(&self) -> String {
        self.table_name().to_string()
    }

    /// Indexes of the columns flagged as part of the replica identity key.
    pub fn key_columns(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
    }
}

/// `pg_class.relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing; updates and deletes carry no old row.
    Nothing,
    /// `f`: the whole old row, every column marked as key.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    pub(crate) fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }

    /// The SQL spelling (`ALTER TABLE ... REPLICA IDENTITY <this>`).
    pub fn as_sql(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "DEFAULT",
            ReplicaIdentity::Nothing => "NOTHING",
            ReplicaIdentity::Full => "FULL",
            ReplicaIdentity::Index => "USING INDEX",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Flag bit 1: the column is part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, -1 when the type has none.
    pub type_modifier: i32,
}

/// `Y`: a non-built-in type a relation uses (enums, domains, composites, their arrays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// `I`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub new: Tuple,
}

/// `U`. `old` is present for a key change (`K`) or REPLICA IDENTITY FULL (`O`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

/// `D`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub old: OldTuple,
}

/// The old row of an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: replica identity key columns set, every other column `n`.
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(tuple) | OldTuple::Full(tuple) => tuple,
        }
    }
}

/// `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    /// Option bit 1.
    pub cascade: bool,
    /// Option bit 2.
    pub restart_identity: bool,
    pub relation_oids: Vec<u32>,
}

/// `M`: `pg_logical_emit_message`. A non-transactional one arrives on its own, before the
/// Begin of the transaction that emitted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    pub xid: Option<u32>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// `S` (protocol 2+): the start of one segment of a streamed, still in-progress transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    /// True on the transaction's first segment.
    pub first_segment: bool,
}

/// `c` (protocol 2+): a streamed transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// `A` (protocol 2+): a streamed transaction (`subxid == xid`) or one of its
/// subtransactions rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
    /// Protocol 4, only with `streaming 'parallel'`.
    pub abort_lsn: Option<Lsn>,
    /// Protocol 4, only with `streaming 'parallel'`.
    pub abort_time: Option<PgTimestamp>,
}

/// `b` (protocol 3+): start of a transaction being prepared (two-phase commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

/// `P` (protocol 3+): end of a prepared transaction's changes (`PREPARE TRANSACTION`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

/// `K` (protocol 3+): `COMMIT PREPARED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

/// `r` (protocol 3+): `ROLLBACK PREPARED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub rollback_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

/// `p` (protocol 3+): a streamed transaction was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPrepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}
