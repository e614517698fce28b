//! The indexes and constraints `sluice schema` deferred, built while the copy goes on.
//!
//! A table's own statements (its primary key, indexes, unique and check constraints, in the
//! order pg_dump gave them) run as soon as its last chunk is on the target, on their own
//! connection, while other tables are still being copied: the index builds fill the time
//! the copy would leave idle, instead of all starting after the last row (what a
//! `pg_restore --section=post-data` after the copy does). Up to `copy.jobs` tables build at
//! once. Foreign keys, and statements tied to no one table, wait for every table and run
//! one at a time (two foreign keys lock the same tables).
//!
//! A failing statement (a unique index over duplicate rows) does not stop the copy: the
//! data of the other tables is worth keeping. It is logged at once, nothing new is started,
//! and the copy ends with that error; the next start finds the data copied and builds what
//! is still missing. Each statement commits together with marking its row applied
//! (`apply_deferred_statement`), so none runs twice.

use std::collections::{HashMap, VecDeque};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use crate::conninfo::ConnInfo;
use crate::control::SharedStatus;
use crate::cutover::schema::{apply_deferred_statement, statement_title, DeferredStatement};
use crate::error::{Error, Result};
use crate::tls;

/// Which deferred statements may run, given the tables copied so far.
#[derive(Debug, Default)]
pub struct DdlSchedule {
    /// Per quoted root table, its statements in id order, until the table is copied.
    per_table: HashMap<String, Vec<DeferredStatement>>,
    /// Foreign keys and statements tied to no one table: after every table.
    last: Vec<DeferredStatement>,
}

impl DdlSchedule {
    /// `statements` oldest first (as `pending_deferred_ddl` returns them).
    pub fn new(statements: Vec<DeferredStatement>) -> DdlSchedule {
        let mut schedule = DdlSchedule::default();
        for statement in statements {
            match statement.table.clone() {
                Some(table) => schedule.per_table.entry(table).or_default().push(statement),
                None => schedule.last.push(statement),
            }
        }
        schedule
    }

    /// The statements `table` (quoted) was waiting for; `None` when it has none (left).
    pub fn table_copied(&mut self, table: &str) -> Option<Vec<DeferredStatement>> {
        self.per_table.remove(table)
    }

    /// Every table's statements still waiting: once the copy is over, a table that was not
    /// copied now (no longer selected, or copied by an earlier sluice) builds too.
    pub fn take_waiting(&mut self) -> Vec<Vec<DeferredStatement>> {
        let mut groups: Vec<Vec<DeferredStatement>> =
            self.per_table.drain().map(|(_, g)| g).collect();
        groups.sort_by_key(|group| group.first().map(|s| s.id));
        groups
    }

    /// What runs after every table's own statements.
    pub fn take_last(&mut self) -> Vec<DeferredStatement> {
        std::mem::take(&mut self.last)
    }
}

/// Builds the deferred statements as tables are reported copied on `copied` (quoted root
/// names), up to `jobs` tables at once; when `copied` closes (the copy is over), the
/// waiting rest, then the foreign keys. Returns how many statements ran.
pub async fn build(
    target: ConnInfo,
    status: SharedStatus,
    mut schedule: DdlSchedule,
    mut copied: UnboundedReceiver<String>,
    jobs: usize,
) -> Result<usize> {
    let jobs = jobs.max(1);
    let mut running: JoinSet<Result<usize>> = JoinSet::new();
    let mut queue: VecDeque<Vec<DeferredStatement>> = VecDeque::new();
    let mut failure: Option<Error> = None;
    let mut copy_over = false;
    let mut applied = 0;
    loop {
        while failure.is_none() && running.len() < jobs {
            let Some(group) = queue.pop_front() else {
                break;
            };
            running.spawn(build_group(target.clone(), status.clone(), group));
        }
        if copy_over && running.is_empty() && (queue.is_empty() || failure.is_some()) {
            break;
        }
        tokio::select! {
            table = copied.recv(), if !copy_over => match table {
                Some(table) => queue.extend(schedule.table_copied(&table)),
                None => {
                    copy_over = true;
                    queue.extend(schedule.take_waiting());
                }
            },
            Some(joined) = running.join_next(), if !running.is_empty() => {
                let result = joined.unwrap_or_else(|e| {
                    Err(Error::definite(format!(
                        "Building deferred indexes stopped unexpectedly ({e}): this is a bug in sluice; restart to build the rest"
                    )))
                });
                match result {
                    Ok(n) => applied += n,
                    Err(e) => {
                        if failure.is_none() {
                            if e.is_transient() {
                                tracing::warn!(
                                    error = %e.report(),
                                    "building a deferred index or constraint was interrupted; the copy goes on, no other is started, and it is built again once the copy is over"
                                );
                            } else {
                                tracing::error!(
                                    error = %e.report(),
                                    "a deferred index or constraint failed; the copy goes on, no other is started, and sluice stops with this error once the copy is over"
                                );
                            }
                            failure = Some(e);
                        }
                    }
                }
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let last = schedule.take_last();
    if !last.is_empty() {
        applied += build_group(target, status, last).await?;
    }
    Ok(applied)
}

/// One table's statements (or the final ones), in order, on one connection.
async fn build_group(
    target: ConnInfo,
    status: SharedStatus,
    group: Vec<DeferredStatement>,
) -> Result<usize> {
    let Some(first) = group.first() else {
        return Ok(0);
    };
    let client = tls::connect(&target, "the target").await.map_err(|e| {
        e.context(format!(
            "Connecting to build {}",
            statement_title(&first.statement)
        ))
    })?;
    let mut applied = 0;
    for statement in &group {
        if apply_deferred_statement(&client, statement, Some(&status)).await? {
            applied += 1;
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(id: i32, table: Option<&str>) -> DeferredStatement {
        DeferredStatement {
            id,
            statement: format!("-- INDEX s{id}\nSELECT {id}"),
            table: table.map(str::to_string),
        }
    }

    #[test]
    fn a_table_releases_its_own_statements_in_order_and_only_once() {
        let mut schedule = DdlSchedule::new(vec![
            statement(1, Some("\"public\".\"a\"")),
            statement(2, Some("\"public\".\"b\"")),
            statement(3, None),
            statement(4, Some("\"public\".\"a\"")),
        ]);
        let a = schedule.table_copied("\"public\".\"a\"").unwrap();
        assert_eq!(a.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 4]);
        assert!(schedule.table_copied("\"public\".\"a\"").is_none());
        assert!(schedule.table_copied("\"public\".\"c\"").is_none());
        // b was never reported: it builds when the copy is over, before the last ones.
        let waiting = schedule.take_waiting();
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0][0].id, 2);
        assert_eq!(
            schedule
                .take_last()
                .iter()
                .map(|s| s.id)
                .collect::<Vec<_>>(),
            vec![3]
        );
        assert!(schedule.take_waiting().is_empty() && schedule.take_last().is_empty());
    }

    #[test]
    fn waiting_tables_come_out_oldest_first() {
        let mut schedule = DdlSchedule::new(vec![
            statement(5, Some("z")),
            statement(2, Some("y")),
            statement(9, Some("x")),
        ]);
        let order: Vec<i32> = schedule.take_waiting().iter().map(|g| g[0].id).collect();
        assert_eq!(order, vec![2, 5, 9]);
    }
}
