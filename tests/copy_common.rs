//! Shared pieces of the initial-copy scenarios: a source and a target cluster, a copy
//! context over them, row-for-row comparison, and a small reader of the slot's pgoutput
//! changes (peeked with `pg_logical_slot_peek_binary_changes`) to prove what streaming
//! would deliver after the copy.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use sluice::checkpoint::Store;
use sluice::config::{Config, Overrides};
use sluice::control::SharedStatus;
use sluice::snapshot::CopyContext;
use sluice::source::{selected_tables, SourceTable};
use sluice::Lsn;

use crate::support::PgCluster;

pub const DB: &str = "app";

pub struct Pair {
    pub source: PgCluster,
    pub target: PgCluster,
    pub src: tokio_postgres::Client,
    pub dst: tokio_postgres::Client,
}

/// Two clusters, each with database `app`, started side by side.
pub async fn start_pair() -> Pair {
    let (source, target) = tokio::task::spawn_blocking(|| {
        let source = std::thread::spawn(PgCluster::start);
        let target = PgCluster::start();
        (source.join().expect("source cluster"), target)
    })
    .await
    .unwrap();
    let src = source.create_database(DB).await;
    let dst = target.create_database(DB).await;
    Pair {
        source,
        target,
        src,
        dst,
    }
}

impl Pair {
    /// Runs the same DDL on both sides (the schema exists on the target before the copy).
    pub async fn schema(&self, ddl: &str) {
        self.src.batch_execute(ddl).await.expect("source DDL");
        self.dst.batch_execute(ddl).await.expect("target DDL");
    }

    pub fn config(&self, jobs: usize, split: &str, state_dir: &Path) -> Config {
        self.config_with(jobs, split, state_dir, "")
    }

    /// `config` with more `[copy]` lines.
    pub fn config_with(&self, jobs: usize, split: &str, state_dir: &Path, copy: &str) -> Config {
        let text = format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[copy]\njobs = {jobs}\nsplit_tables_larger_than = \"{split}\"\n{copy}\n[state]\ndir = \"{}\"\n",
            self.source.url(DB),
            self.target.url(DB),
            state_dir.display()
        );
        Config::parse(&text, "test", &Overrides::default()).expect("test config")
    }

    pub async fn context(&self, config: Config, store: &Store) -> CopyContext {
        let tables = selected_tables(&self.src, &config.tables)
            .await
            .expect("selected tables");
        CopyContext {
            status: SharedStatus::new(&config.source.slot),
            config,
            tables,
            store: store.clone(),
            progress: false,
        }
    }

    /// `count:md5` of a table's rows in the given column order, on one side.
    pub async fn digest(client: &tokio_postgres::Client, table: &str, columns: &str) -> String {
        client
            .query_one(
                &format!(
                    "SELECT count(*)::text || ':' || coalesce(md5(string_agg(r::text, E'\\n' ORDER BY r::text)), '')
                     FROM (SELECT ROW({columns}) AS r FROM {table}) s"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("digest of {table}: {e}"))
            .get(0)
    }

    /// Asserts that `table` holds the same rows on both sides.
    pub async fn assert_same(&self, table: &str, columns: &str) {
        let source = Self::digest(&self.src, table, columns).await;
        let target = Self::digest(&self.dst, table, columns).await;
        assert_eq!(source, target, "{table} differs between source and target");
    }

    pub async fn ids(client: &tokio_postgres::Client, table: &str) -> Vec<i64> {
        client
            .query(&format!("SELECT id::int8 FROM {table} ORDER BY id"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

pub fn table<'a>(tables: &'a [SourceTable], name: &str) -> &'a SourceTable {
    tables
        .iter()
        .find(|t| t.name.qualified() == name)
        .unwrap_or_else(|| panic!("{name} is not selected"))
}

/// A row change read from the slot: the commit LSN of its transaction, the relation name,
/// and the first column (the id) as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Insert { commit: Lsn, table: String, id: i64 },
    Delete { commit: Lsn, table: String, id: i64 },
}

/// Peeks (does not consume) the slot's pending changes as pgoutput protocol 1 and decodes
/// the few messages the scenarios need: Begin, Relation, Insert, Delete.
pub async fn peek_changes(
    client: &tokio_postgres::Client,
    slot: &str,
    publication: &str,
) -> Vec<Change> {
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2)",
            &[&slot, &publication],
        )
        .await
        .expect("peek the slot");
    let mut relations: BTreeMap<u32, String> = BTreeMap::new();
    let mut commit = Lsn::ZERO;
    let mut changes = Vec::new();
    for row in rows {
        let data: Vec<u8> = row.get(0);
        let mut r = Reader { data: &data, at: 1 };
        match data.first() {
            Some(b'B') => commit = Lsn(r.u64()),
            Some(b'R') => {
                let oid = r.u32();
                let schema = r.cstr();
                let name = r.cstr();
                relations.insert(oid, format!("{schema}.{name}"));
            }
            Some(b'I') => {
                let oid = r.u32();
                assert_eq!(r.u8(), b'N');
                let id = r.first_column();
                changes.push(Change::Insert {
                    commit,
                    table: relations[&oid].clone(),
                    id,
                });
            }
            Some(b'D') => {
                let oid = r.u32();
                let _kind = r.u8();
                let id = r.first_column();
                changes.push(Change::Delete {
                    commit,
                    table: relations[&oid].clone(),
                    id,
                });
            }
            _ => {}
        }
    }
    changes
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        self.at += 1;
        self.data[self.at - 1]
    }
    fn u32(&mut self) -> u32 {
        let v = u32::from_be_bytes(self.data[self.at..self.at + 4].try_into().unwrap());
        self.at += 4;
        v
    }
    fn u64(&mut self) -> u64 {
        let v = u64::from_be_bytes(self.data[self.at..self.at + 8].try_into().unwrap());
        self.at += 8;
        v
    }
    fn cstr(&mut self) -> String {
        let end = self.data[self.at..].iter().position(|b| *b == 0).unwrap() + self.at;
        let text = String::from_utf8_lossy(&self.data[self.at..end]).into_owned();
        self.at = end + 1;
        text
    }
    /// Tuple data: column count, then the first column as text.
    fn first_column(&mut self) -> i64 {
        let _columns = u16::from_be_bytes(self.data[self.at..self.at + 2].try_into().unwrap());
        self.at += 2;
        assert_eq!(self.u8(), b't', "the id column is sent as text");
        let len = self.u32() as usize;
        let text = std::str::from_utf8(&self.data[self.at..self.at + len]).unwrap();
        text.parse().unwrap()
    }
}
