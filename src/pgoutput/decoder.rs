//! Turns one pgoutput payload into a `LogicalMessage`.
//!
//! The only state is the protocol version and whether we are between Stream Start and
//! Stream Stop: inside such a block, protocol 2+ prefixes Relation, Type, Insert, Update,
//! Delete, Truncate and Message with the xid of the (sub)transaction the change belongs to.
//! A payload that fails to decode leaves that state as it was.

use bytes::Bytes;

use super::error::{DecodeError, UNKNOWN};
use super::messages::*;
use super::reader::Reader;
use super::tuple::{describe_byte, Tuple};

/// First protocol version with streamed transactions (`streaming 'on'`).
pub const PROTO_STREAMING: u32 = 2;
/// First protocol version with two-phase commit messages (`two_phase 'on'`).
pub const PROTO_TWO_PHASE: u32 = 3;
/// First protocol version whose Stream Abort may carry the abort LSN and time.
pub const PROTO_STREAM_PARALLEL: u32 = 4;

#[derive(Debug, Clone)]
pub struct Decoder {
    protocol_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// A decoder for the `proto_version` the stream was started with.
    pub fn new(protocol_version: u32) -> Decoder {
        Decoder {
            protocol_version,
            in_stream: false,
        }
    }

    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// True between a Stream Start and its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one payload (the `data` of an XLogData message, or one row of
    /// `pg_logical_slot_*_binary_changes`). Tuple values and message contents are slices
    /// of `data`, not copies.
    pub fn decode(&mut self, data: Bytes) -> Result<LogicalMessage, DecodeError> {
        let Some(&tag) = data.first() else {
            return Err(DecodeError::new(UNKNOWN, 0, "empty payload"));
        };
        let kind = kind_name(tag).ok_or_else(|| {
            DecodeError::new(
                UNKNOWN,
                0,
                format!("unknown message tag {}", describe_byte(tag)),
            )
        })?;
        if u32::try_from(data.len()).is_err() {
            return Err(DecodeError::new(
                kind,
                0,
                format!(
                    "payload of {} bytes is larger than any PostgreSQL message",
                    data.len()
                ),
            ));
        }
        if let b'I' | b'U' | b'D' = tag {
            return self.row_change(tag, kind, data);
        }
        let mut r = Reader::new(&data, 1, kind);
        let message = match tag {
            b'B' => LogicalMessage::Begin(Begin {
                final_lsn: r.lsn("final LSN")?,
                commit_time: timestamp(&mut r, "commit timestamp")?,
                xid: r.u32("xid")?,
            }),
            b'C' => LogicalMessage::Commit(Commit {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time: timestamp(&mut r, "commit timestamp")?,
            }),
            b'O' => LogicalMessage::Origin(Origin {
                commit_lsn: r.lsn("origin commit LSN")?,
                name: r.cstr("origin name")?,
            }),
            b'R' => LogicalMessage::Relation(self.relation(&mut r)?),
            b'Y' => LogicalMessage::Type(TypeMessage {
                xid: self.stream_xid(&mut r)?,
                oid: r.u32("type OID")?,
                namespace: r.cstr("type namespace")?,
                name: r.cstr("type name")?,
            }),
            b'T' => {
                let xid = self.stream_xid(&mut r)?;
                let count_at = r.pos();
                let count = r.u32("relation count")? as usize;
                let options = r.u8("options")?;
                if count > r.remaining() / 4 {
                    return Err(r.error_at(
                        count_at,
                        format!(
                            "relation count {count} exceeds the remaining {} bytes",
                            r.remaining()
                        ),
                    ));
                }
                let mut relation_oids = Vec::with_capacity(count);
                for _ in 0..count {
                    relation_oids.push(r.u32("relation OID")?);
                }
                LogicalMessage::Truncate(Truncate {
                    xid,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    relation_oids,
                })
            }
            b'M' => {
                let xid = self.stream_xid(&mut r)?;
                let flags = r.u8("flags")?;
                let lsn = r.lsn("message LSN")?;
                let prefix = r.cstr("prefix")?;
                let len_at = r.pos();
                let len = r.i32("content length")?;
                let len = usize::try_from(len)
                    .map_err(|_| r.error_at(len_at, format!("negative content length {len}")))?;
                let start = r.skip(len, "content")?;
                LogicalMessage::Message(LogicalDecodingMessage {
                    xid,
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: data.slice(start..start + len),
                })
            }
            b'S' => {
                self.require(&r, PROTO_STREAMING)?;
                if self.in_stream {
                    return Err(r.error_at(
                        0,
                        "Stream Start inside a streamed block (no Stream Stop before it)",
                    ));
                }
                let xid = r.u32("xid")?;
                let first_at = r.pos();
                let first_segment = match r.u8("first segment flag")? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(r.error_at(
                            first_at,
                            format!("first segment flag must be 0 or 1, found {other}"),
                        ))
                    }
                };
                LogicalMessage::StreamStart(StreamStart { xid, first_segment })
            }
            b'E' => {
                self.require(&r, PROTO_STREAMING)?;
                if !self.in_stream {
                    return Err(r.error_at(0, "Stream Stop outside a streamed block"));
                }
                LogicalMessage::StreamStop
            }
            b'c' => {
                self.require(&r, PROTO_STREAMING)?;
                LogicalMessage::StreamCommit(StreamCommit {
                    xid: r.u32("xid")?,
                    flags: r.u8("flags")?,
                    commit_lsn: r.lsn("commit LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    commit_time: timestamp(&mut r, "commit timestamp")?,
                })
            }
            b'A' => {
                self.require(&r, PROTO_STREAMING)?;
                let xid = r.u32("xid")?;
                let subxid = r.u32("subtransaction xid")?;
                // Protocol 4 adds the abort LSN and time, but only when the subscriber asked
                // for `streaming 'parallel'`: the payload length tells which one we got.
                let (abort_lsn, abort_time) =
                    if self.protocol_version >= PROTO_STREAM_PARALLEL && r.remaining() > 0 {
                        (
                            Some(r.lsn("abort LSN")?),
                            Some(timestamp(&mut r, "abort timestamp")?),
                        )
                    } else {
                        (None, None)
                    };
                LogicalMessage::StreamAbort(StreamAbort {
                    xid,
                    subxid,
                    abort_lsn,
                    abort_time,
                })
            }
            b'b' => {
                self.require(&r, PROTO_TWO_PHASE)?;
                LogicalMessage::BeginPrepare(BeginPrepare {
                    prepare_lsn: r.lsn("prepare LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    prepare_time: timestamp(&mut r, "prepare timestamp")?,
                    xid: r.u32("xid")?,
                    gid: r.cstr("gid")?,
                })
            }
            b'P' => {
                self.require(&r, PROTO_TWO_PHASE)?;
                LogicalMessage::Prepare(Prepare {
                    flags: r.u8("flags")?,
                    prepare_lsn: r.lsn("prepare LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    prepare_time: timestamp(&mut r, "prepare timestamp")?,
                    xid: r.u32("xid")?,
                    gid: r.cstr("gid")?,
                })
            }
            b'K' => {
                self.require(&r, PROTO_TWO_PHASE)?;
                LogicalMessage::CommitPrepared(CommitPrepared {
                    flags: r.u8("flags")?,
                    commit_lsn: r.lsn("commit LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    commit_time: timestamp(&mut r, "commit timestamp")?,
                    xid: r.u32("xid")?,
                    gid: r.cstr("gid")?,
                })
            }
            b'r' => {
                self.require(&r, PROTO_TWO_PHASE)?;
                LogicalMessage::RollbackPrepared(RollbackPrepared {
                    flags: r.u8("flags")?,
                    prepare_end_lsn: r.lsn("prepare end LSN")?,
                    rollback_end_lsn: r.lsn("rollback end LSN")?,
                    prepare_time: timestamp(&mut r, "prepare timestamp")?,
                    rollback_time: timestamp(&mut r, "rollback timestamp")?,
                    xid: r.u32("xid")?,
                    gid: r.cstr("gid")?,
                })
            }
            b'p' => {
                self.require(&r, PROTO_TWO_PHASE)?;
                LogicalMessage::StreamPrepare(StreamPrepare {
                    flags: r.u8("flags")?,
                    prepare_lsn: r.lsn("prepare LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    prepare_time: timestamp(&mut r, "prepare timestamp")?,
                    xid: r.u32("xid")?,
                    gid: r.cstr("gid")?,
                })
            }
            // kind_name() accepted the tag, so every tag it knows has an arm above.
            _ => return Err(r.error_at(0, format!("unknown message tag {}", describe_byte(tag)))),
        };
        r.finish()?;
        // Only a payload that decoded completely moves the streamed-block state.
        match message {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }

    /// Insert, Update and Delete: the bulk of any stream, so their payload is moved into the
    /// last tuple instead of cloned.
    fn row_change(
        &self,
        tag: u8,
        kind: &'static str,
        data: Bytes,
    ) -> Result<LogicalMessage, DecodeError> {
        let (xid, relation_oid, first, second) = {
            let mut r = Reader::new(&data, 1, kind);
            let xid = self.stream_xid(&mut r)?;
            let relation_oid = r.u32("relation OID")?;
            let marker_at = r.pos();
            let marker = r.u8("tuple marker")?;
            let (first, second) = match (tag, marker) {
                (b'I', b'N') => ((marker, Tuple::read_fields(&mut r)?), None),
                (b'U', b'N') => ((marker, Tuple::read_fields(&mut r)?), None),
                (b'U' | b'D', b'K' | b'O') => {
                    let old = Tuple::read_fields(&mut r)?;
                    let new = if tag == b'U' {
                        let new_at = r.pos();
                        let new_marker = r.u8("new tuple marker 'N'")?;
                        if new_marker != b'N' {
                            return Err(r.error_at(
                                new_at,
                                format!(
                                    "expected tuple marker 'N', found {}",
                                    describe_byte(new_marker)
                                ),
                            ));
                        }
                        Some(Tuple::read_fields(&mut r)?)
                    } else {
                        None
                    };
                    ((marker, old), new)
                }
                (_, other) => {
                    let expected = match tag {
                        b'I' => "new tuple marker 'N'",
                        b'U' => "tuple marker 'K', 'O' or 'N'",
                        _ => "old tuple marker 'K' or 'O'",
                    };
                    return Err(r.error_at(
                        marker_at,
                        format!("expected {expected}, found {}", describe_byte(other)),
                    ));
                }
            };
            r.finish()?;
            (xid, relation_oid, first, second)
        };
        let old = |marker: u8, tuple: Tuple| {
            if marker == b'K' {
                OldTuple::Key(tuple)
            } else {
                OldTuple::Full(tuple)
            }
        };
        let (marker, fields) = first;
        Ok(match (tag, second) {
            (b'I', _) => LogicalMessage::Insert(Insert {
                xid,
                relation_oid,
                new: Tuple::from_parts(data, fields),
            }),
            (b'U', None) => LogicalMessage::Update(Update {
                xid,
                relation_oid,
                old: None,
                new: Tuple::from_parts(data, fields),
            }),
            (b'U', Some(new)) => LogicalMessage::Update(Update {
                xid,
                relation_oid,
                old: Some(old(marker, Tuple::from_parts(data.clone(), fields))),
                new: Tuple::from_parts(data, new),
            }),
            _ => LogicalMessage::Delete(Delete {
                xid,
                relation_oid,
                old: old(marker, Tuple::from_parts(data, fields)),
            }),
        })
    }

    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            r.u32("streamed transaction xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn require(&self, r: &Reader<'_>, version: u32) -> Result<(), DecodeError> {
        if self.protocol_version >= version {
            Ok(())
        } else {
            Err(r.error_at(
                0,
                format!(
                    "this message needs protocol version {version}, the stream uses {}",
                    self.protocol_version
                ),
            ))
        }
    }

    fn relation(&self, r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
        let xid = self.stream_xid(r)?;
        let oid = r.u32("relation OID")?;
        let namespace = r.cstr("namespace")?;
        let name = r.cstr("relation name")?;
        let identity_at = r.pos();
        let identity = r.u8("replica identity")?;
        let replica_identity = ReplicaIdentity::from_byte(identity).ok_or_else(|| {
            r.error_at(
                identity_at,
                format!("unknown replica identity {}", describe_byte(identity)),
            )
        })?;
        let count_at = r.pos();
        let count = usize::from(r.u16("column count")?);
        // A column takes at least 10 bytes (flags, empty name, type OID, typmod).
        if count > r.remaining() / 10 {
            return Err(r.error_at(
                count_at,
                format!(
                    "column count {count} exceeds the remaining {} bytes",
                    r.remaining()
                ),
            ));
        }
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = r.u8("column flags")?;
            columns.push(Column {
                is_key: flags & 1 != 0,
                name: r.cstr("column name")?,
                type_oid: r.u32("column type OID")?,
                type_modifier: r.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            xid,
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }
}

fn timestamp(r: &mut Reader<'_>, what: &str) -> Result<PgTimestamp, DecodeError> {
    r.i64(what).map(PgTimestamp)
}

/// Message names as the protocol documentation spells them, by tag byte.
fn kind_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}
