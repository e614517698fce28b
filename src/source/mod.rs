//! The source side: which tables, the publication and slot, and the replication stream.

pub mod replication;
pub mod slot;
pub mod stream;
pub mod tables;

pub use tables::{
    abbreviate, display_ident, glob_misses, quote_ident, quote_literal, selected_tables,
    unreplicated_tables, IdentityKey, SourceTable, TableName, Unreplicated,
};
