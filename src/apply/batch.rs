//! Pending row changes of one target transaction, grouped by table and operation.
//!
//! ```text
//!   changes in source order ──▶ per table: [Insert run][Update run][Delete run][Insert run]…
//!                                 table order: first appearance in the batch
//! ```
//!
//! Within a table, order is kept exactly: a new run starts whenever the operation changes.
//! Across tables, changes are reordered (all of table A's runs, then table B's) only when
//! the apply session runs with `session_replication_role = replica`: then no triggers and no
//! foreign-key checks fire, so statements on different tables commute. Without it the
//! applier flushes whenever the table changes, keeping the global order.
//!
//! An update run collapses repeated updates of the same row (same key, key unchanged) into
//! one: the later values win and unchanged-TOAST cells keep the earlier value. After that a
//! run touches each row once, so one `UPDATE ... FROM unnest(...)` applies it (PostgreSQL
//! would apply only one of several matches per target row). An update that changes the key
//! is applied alone, in order, so key swaps behave as they did on the source.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

/// One column value as the applier keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    /// An unchanged TOASTed value (`u`): the target keeps what it has.
    Unchanged,
    Text(Bytes),
}

impl Cell {
    pub fn as_str(&self) -> Option<&[u8]> {
        match self {
            Cell::Text(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// Bytes this cell holds (1 for markers), for memory accounting.
    pub fn weight(&self) -> usize {
        match self {
            Cell::Text(bytes) => bytes.len(),
            _ => 1,
        }
    }
}

pub type Row = Arc<[Cell]>;

#[derive(Debug, Clone)]
pub struct UpdateRow {
    /// Old key values (key columns in plan order).
    pub key: Vec<Cell>,
    /// New values of every source column; `Unchanged` where TOAST was left alone.
    pub new: Vec<Cell>,
}

#[derive(Debug, Clone)]
pub enum Run {
    Insert(Vec<Row>),
    Update {
        rows: Vec<UpdateRow>,
        /// Encoded key → index in `rows`, for collapsing repeated updates.
        index: HashMap<Vec<u8>, usize>,
        /// A key-changing update: applied alone.
        key_change: bool,
    },
    Delete(Vec<Vec<Cell>>),
    /// REPLICA IDENTITY FULL with no key on the target: one statement per change, matched
    /// by all old values.
    ByValues(Vec<ValueChange>),
}

#[derive(Debug, Clone)]
pub enum ValueChange {
    Update { old: Vec<Cell>, new: Vec<Cell> },
    Delete { old: Vec<Cell> },
}

impl Run {
    pub fn rows(&self) -> usize {
        match self {
            Run::Insert(rows) => rows.len(),
            Run::Update { rows, .. } => rows.len(),
            Run::Delete(keys) => keys.len(),
            Run::ByValues(changes) => changes.len(),
        }
    }
}

/// Encodes key cells into one comparable byte string (length-prefixed, NULL-aware).
pub fn encode_key(cells: &[Cell]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cells.iter().map(|c| c.weight() + 5).sum());
    for cell in cells {
        match cell {
            Cell::Null => out.push(0),
            Cell::Unchanged => out.push(1),
            Cell::Text(bytes) => {
                out.push(2);
                out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
    out
}

/// The changes of one table, in order.
#[derive(Debug, Default)]
pub struct TableQueue {
    pub runs: Vec<Run>,
}

impl TableQueue {
    pub fn push_insert(&mut self, row: Row) {
        if let Some(Run::Insert(rows)) = self.runs.last_mut() {
            rows.push(row);
        } else {
            self.runs.push(Run::Insert(vec![row]));
        }
    }

    pub fn push_delete(&mut self, key: Vec<Cell>) {
        if let Some(Run::Delete(keys)) = self.runs.last_mut() {
            keys.push(key);
        } else {
            self.runs.push(Run::Delete(vec![key]));
        }
    }

    pub fn push_by_values(&mut self, change: ValueChange) {
        if let Some(Run::ByValues(changes)) = self.runs.last_mut() {
            changes.push(change);
        } else {
            self.runs.push(Run::ByValues(vec![change]));
        }
    }

    /// Adds an update. `new_key` is the key after the update (`None` when unchanged).
    /// Returns whether it was merged into an earlier update of the same row.
    pub fn push_update(&mut self, row: UpdateRow, new_key: Option<Vec<Cell>>) -> bool {
        if let Some(new_key) = new_key {
            let mut index = HashMap::new();
            index.insert(encode_key(&new_key), 0);
            self.runs.push(Run::Update {
                rows: vec![row],
                index,
                key_change: true,
            });
            return false;
        }
        let encoded = encode_key(&row.key);
        if let Some(Run::Update {
            rows,
            index,
            key_change: false,
        }) = self.runs.last_mut()
        {
            if let Some(&at) = index.get(&encoded) {
                merge_update(&mut rows[at].new, row.new);
                return true;
            }
            index.insert(encoded, rows.len());
            rows.push(row);
            return false;
        }
        let mut index = HashMap::new();
        index.insert(encoded, 0);
        self.runs.push(Run::Update {
            rows: vec![row],
            index,
            key_change: false,
        });
        false
    }
}

/// Later values win; an unchanged-TOAST cell keeps the earlier value.
fn merge_update(earlier: &mut [Cell], later: Vec<Cell>) {
    for (slot, cell) in earlier.iter_mut().zip(later) {
        if cell != Cell::Unchanged {
            *slot = cell;
        }
    }
}

/// All pending changes of the open target transaction.
#[derive(Debug, Default)]
pub struct Pending {
    /// Table keys (relation OIDs) in order of first appearance.
    pub order: Vec<u32>,
    pub tables: HashMap<u32, TableQueue>,
    pub rows: usize,
    pub bytes: usize,
    pub last_table: Option<u32>,
}

impl Pending {
    pub fn queue(&mut self, relation: u32) -> &mut TableQueue {
        if !self.tables.contains_key(&relation) {
            self.order.push(relation);
        }
        self.last_table = Some(relation);
        self.tables.entry(relation).or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Takes everything out, in execution order.
    pub fn drain(&mut self) -> Vec<(u32, TableQueue)> {
        let mut tables = std::mem::take(&mut self.tables);
        let order = std::mem::take(&mut self.order);
        self.rows = 0;
        self.bytes = 0;
        self.last_table = None;
        order
            .into_iter()
            .filter_map(|oid| tables.remove(&oid).map(|queue| (oid, queue)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    #[test]
    fn repeated_updates_of_a_row_collapse_and_keep_toast() {
        let mut queue = TableQueue::default();
        let first = UpdateRow {
            key: vec![text("1")],
            new: vec![text("1"), text("a"), text("big")],
        };
        let second = UpdateRow {
            key: vec![text("1")],
            new: vec![text("1"), text("b"), Cell::Unchanged],
        };
        let other = UpdateRow {
            key: vec![text("2")],
            new: vec![text("2"), text("c"), Cell::Unchanged],
        };
        assert!(!queue.push_update(first, None));
        assert!(!queue.push_update(other, None));
        assert!(queue.push_update(second, None));
        let Run::Update { rows, .. } = &queue.runs[0] else {
            panic!("expected an update run")
        };
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].new, vec![text("1"), text("b"), text("big")]);
        assert_eq!(rows[1].new[2], Cell::Unchanged);
    }

    #[test]
    fn operations_on_a_table_keep_their_order() {
        let mut queue = TableQueue::default();
        queue.push_insert(Arc::from(vec![text("1")]));
        queue.push_insert(Arc::from(vec![text("2")]));
        queue.push_delete(vec![text("1")]);
        queue.push_insert(Arc::from(vec![text("1")]));
        let kinds: Vec<(usize, &str)> = queue
            .runs
            .iter()
            .map(|run| {
                (
                    run.rows(),
                    match run {
                        Run::Insert(_) => "insert",
                        Run::Delete(_) => "delete",
                        _ => "other",
                    },
                )
            })
            .collect();
        assert_eq!(kinds, vec![(2, "insert"), (1, "delete"), (1, "insert")]);
    }

    #[test]
    fn key_changes_are_applied_alone_and_in_order() {
        let mut queue = TableQueue::default();
        let swap = |from: &str, to: &str| UpdateRow {
            key: vec![text(from)],
            new: vec![text(to)],
        };
        queue.push_update(swap("1", "3"), Some(vec![text("3")]));
        queue.push_update(swap("2", "1"), Some(vec![text("1")]));
        queue.push_update(swap("3", "2"), Some(vec![text("2")]));
        assert_eq!(queue.runs.len(), 3);
    }

    #[test]
    fn keys_encode_nulls_apart_from_text() {
        assert_ne!(encode_key(&[Cell::Null]), encode_key(&[text("")]));
        assert_ne!(
            encode_key(&[text("ab"), text("c")]),
            encode_key(&[text("a"), text("bc")])
        );
    }

    #[test]
    fn pending_drains_in_first_appearance_order() {
        let mut pending = Pending::default();
        pending.queue(7).push_delete(vec![text("1")]);
        pending.queue(3).push_delete(vec![text("1")]);
        pending.queue(7).push_delete(vec![text("2")]);
        let order: Vec<u32> = pending.drain().into_iter().map(|(oid, _)| oid).collect();
        assert_eq!(order, vec![7, 3]);
        assert!(pending.is_empty());
    }
}
