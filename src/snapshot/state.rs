//! The initial copy's records in the sled store (all under `copy/`).
//!
//! - `copy/state`: one [`CopyState`]: the slot, its consistent point, the last snapshot
//!   generation used, and whether the whole copy (data and deferred DDL) is finished.
//! - `copy/table/"schema"."name"`: one [`TableRecord`] per table the copy has touched: the
//!   generation whose snapshot its rows come from, its chunk plan, its sync LSN (for
//!   generations after the first) and whether it is finished.
//! - `copy/chunk/"schema"."name"/<generation>/<index>`: one [`ChunkDone`] per finished chunk.
//!
//! Generation 0 is the snapshot exported by the permanent slot; generation `n > 0` is the
//! snapshot of the temporary slot `<slot>_sync_<n>`. A snapshot lives only as long as the
//! process that holds its session, so rows of an unfinished table from an older generation
//! are never kept: the table is emptied and copied again under the current one.
//!
//! Every record that a later decision depends on is flushed before that decision can be
//! taken (sled's `flush` survives `kill -9`, FACTS.md).

use serde::{Deserialize, Serialize};

use crate::checkpoint::Store;
use crate::error::Result;
use crate::lsn::Lsn;
use crate::source::TableName;

pub const STATE_KEY: &str = "copy/state";
pub const TABLE_PREFIX: &str = "copy/table/";
pub const CHUNK_PREFIX: &str = "copy/chunk/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyState {
    pub slot: String,
    /// Where streaming from the permanent slot begins.
    pub consistent_point: Lsn,
    /// The highest snapshot generation used so far (0: only the slot's own snapshot).
    pub generation: u32,
    /// Data copied and deferred DDL applied: `sluice run` streams without copying.
    pub finished: bool,
    /// The publication the copy was made for (absent in states of earlier versions): a
    /// start whose `source.publication` names another one is a config mistake, not tables
    /// left out of this migration's publication.
    #[serde(default)]
    pub publication: Option<String>,
}

/// A chunk of a table: the whole table, a range of heap blocks `[first, end)` (`end =
/// None`: to the end of the table, so rows in blocks added after planning are still
/// covered), or a range of its primary key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkRange {
    Whole,
    Blocks {
        first: u64,
        end: Option<u64>,
    },
    /// One leaf partition of a partitioned table (its place in `TableLayout::leaves`):
    /// whole (`first = 0, end = None`) or a block range of it, like `Blocks`.
    Leaf {
        leaf: u32,
        first: u64,
        end: Option<u64>,
    },
    /// Rows whose single-column integer primary key (`TableLayout::split_key`) is in
    /// `[lower, upper)`; a missing bound is open, so the first and last chunks also cover
    /// keys beyond what planning saw.
    Keys {
        lower: Option<i64>,
        upper: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRecord {
    pub name: TableName,
    /// The source table's OID when it was copied (absent in records of earlier versions):
    /// a table of the same name with another OID is another table (dropped and created
    /// again, or another one renamed to the name), and this copy is not its.
    #[serde(default)]
    pub oid: Option<u32>,
    /// The snapshot generation the table's copied rows belong to.
    pub generation: u32,
    /// For generation > 0: the temporary slot's consistent point. Streaming skips this
    /// table's transactions that commit before it (they are in the copy).
    pub sync_lsn: Option<Lsn>,
    pub chunks: Vec<ChunkRange>,
    pub finished: bool,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDone {
    pub rows: u64,
    pub bytes: u64,
}

/// Keys embed the quoted name, so `a.b` + `c` and `a` + `b.c` never collide.
pub fn table_key(table: &TableName) -> String {
    format!("{TABLE_PREFIX}{}", table.quoted())
}

pub fn chunk_prefix(table: &TableName) -> String {
    format!("{CHUNK_PREFIX}{}/", table.quoted())
}

pub fn chunk_key(table: &TableName, generation: u32, index: usize) -> String {
    format!("{}{generation}/{index:06}", chunk_prefix(table))
}

pub fn load_state(store: &Store) -> Result<Option<CopyState>> {
    store.get(STATE_KEY)
}

pub fn save_state(store: &Store, state: &CopyState) -> Result<()> {
    store.put(STATE_KEY, state)?;
    store.flush()
}

pub fn load_tables(store: &Store) -> Result<Vec<TableRecord>> {
    Ok(store
        .scan::<TableRecord>(TABLE_PREFIX)?
        .into_iter()
        .map(|(_, record)| record)
        .collect())
}

pub fn save_table(store: &Store, record: &TableRecord) -> Result<()> {
    store.put(&table_key(&record.name), record)?;
    store.flush()
}

/// Finished chunks of `table` under `generation`, by index.
pub fn done_chunks(
    store: &Store,
    table: &TableName,
    generation: u32,
) -> Result<Vec<(usize, ChunkDone)>> {
    let prefix = format!("{}{generation}/", chunk_prefix(table));
    let mut done = Vec::new();
    for (key, value) in store.scan::<ChunkDone>(&prefix)? {
        if let Some(index) = key
            .strip_prefix(&prefix)
            .and_then(|i| i.parse::<usize>().ok())
        {
            done.push((index, value));
        }
    }
    Ok(done)
}

pub fn save_chunk(
    store: &Store,
    table: &TableName,
    generation: u32,
    index: usize,
    done: &ChunkDone,
) -> Result<()> {
    store.put(&chunk_key(table, generation, index), done)?;
    store.flush()
}

/// Forgets that `table` was copied (its record and chunks): the next start copies it again.
pub fn forget_table(store: &Store, table: &TableName) -> Result<()> {
    store.remove(&table_key(table))?;
    clear_chunks(store, table)
}

/// Forgets every finished chunk of `table` (of any generation).
pub fn clear_chunks(store: &Store, table: &TableName) -> Result<()> {
    for (key, _) in store.scan::<ChunkDone>(&chunk_prefix(table))? {
        store.remove(&key)?;
    }
    store.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_tables_with_dots_do_not_collide() {
        let a = TableName::new("a.b", "c");
        let b = TableName::new("a", "b.c");
        assert_ne!(table_key(&a), table_key(&b));
        assert!(chunk_key(&a, 2, 7).ends_with("/2/000007"));
    }

    #[test]
    fn chunks_are_found_per_generation_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let table = TableName::new("public", "t");
        let other = TableName::new("public", "t2");
        let done = ChunkDone { rows: 5, bytes: 50 };
        save_chunk(&store, &table, 0, 3, &done).unwrap();
        save_chunk(&store, &table, 1, 4, &done).unwrap();
        save_chunk(&store, &other, 0, 1, &done).unwrap();
        assert_eq!(done_chunks(&store, &table, 0).unwrap(), vec![(3, done)]);
        assert_eq!(done_chunks(&store, &table, 1).unwrap(), vec![(4, done)]);
        clear_chunks(&store, &table).unwrap();
        assert!(done_chunks(&store, &table, 0).unwrap().is_empty());
        assert_eq!(done_chunks(&store, &other, 0).unwrap().len(), 1);
    }
}
