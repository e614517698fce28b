//! The pgoutput decoder (protocol versions 1 to 4).
//!
//! `Decoder::decode` turns one payload from the replication stream into a `LogicalMessage`.
//! Tuple values are not copied: a `Tuple` shares the payload's `Bytes` and records where
//! each value sits. Malformed input is a `DecodeError` naming the message kind and the byte
//! offset, never a panic; every length read from the wire is checked against what is left
//! before it is used. `RelationCache` keeps the latest Relation per OID and reports schema
//! changes. The byte layouts we rely on are written down in `proto/README.md`.

mod cache;
mod decoder;
mod error;
mod messages;
mod reader;
mod tuple;

pub use crate::lsn::Lsn;
pub use cache::{RelationCache, SchemaChange};
pub use decoder::{Decoder, PROTO_STREAMING, PROTO_STREAM_PARALLEL, PROTO_TWO_PHASE};
pub use error::DecodeError;
pub use messages::{
    Begin, BeginPrepare, Column, Commit, CommitPrepared, Delete, Insert, LogicalDecodingMessage,
    LogicalMessage, OldTuple, Origin, PgTimestamp, Prepare, Relation, ReplicaIdentity,
    RollbackPrepared, StreamAbort, StreamCommit, StreamPrepare, StreamStart, Truncate, TypeMessage,
    Update,
};
pub use tuple::{Tuple, Value};

#[cfg(test)]
mod tests;
