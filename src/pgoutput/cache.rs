//! The relations a stream has described so far, and what changed when one is re-sent.
//!
//! pgoutput sends a Relation before the first change of a table in a session and again
//! after any DDL on it, possibly in the middle of a transaction and more than once. The
//! cache therefore always replaces; the returned `SchemaChange` is how the applier learns
//! that the target's table no longer matches.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::error::DecodeError;
use super::messages::Relation;

#[derive(Debug, Default, Clone)]
pub struct RelationCache {
    relations: HashMap<u32, Arc<Relation>>,
}

impl RelationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the cached relation; returns what changed when the OID was known and its
    /// name, replica identity or columns (names, order, types, typmods, key flags) differ.
    pub fn insert(&mut self, relation: Relation) -> Option<SchemaChange> {
        let new = Arc::new(relation);
        let old = self.relations.insert(new.oid, Arc::clone(&new))?;
        let details = differences(&old, &new);
        if details.is_empty() {
            None
        } else {
            Some(SchemaChange { old, new, details })
        }
    }

    pub fn get(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&oid)
    }

    /// The relation a change refers to. The server always sends a Relation before the first
    /// change of a table, so an unknown OID means the stream (or our state) is broken.
    pub fn resolve(&self, oid: u32) -> Result<&Arc<Relation>, DecodeError> {
        self.relations.get(&oid).ok_or_else(|| {
            DecodeError::stream(
                "Relation",
                format!(
                    "Unknown relation OID {oid} in the pgoutput stream: no Relation message \
                     described it before this change (the decoder must see the stream from a \
                     transaction boundary on, with every Relation message)"
                ),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    pub fn clear(&mut self) {
        self.relations.clear();
    }
}

/// A known relation was re-described differently.
#[derive(Debug, Clone)]
pub struct SchemaChange {
    old: Arc<Relation>,
    new: Arc<Relation>,
    details: Vec<String>,
}

impl SchemaChange {
    pub fn oid(&self) -> u32 {
        self.new.oid
    }

    pub fn old(&self) -> &Arc<Relation> {
        &self.old
    }

    pub fn new_relation(&self) -> &Arc<Relation> {
        &self.new
    }

    /// One entry per difference ("column note added", "column amount type 1700 -> 701").
    pub fn details(&self) -> &[String] {
        &self.details
    }

    /// True when the column count or a column's type or typmod changed (by position): rows of
    /// the old shape no longer fit. False for renames and key-flag changes alone.
    pub fn column_types_changed(&self) -> bool {
        self.old.columns.len() != self.new.columns.len()
            || self
                .old
                .columns
                .iter()
                .zip(&self.new.columns)
                .any(|(a, b)| a.type_oid != b.type_oid || a.type_modifier != b.type_modifier)
    }
}

impl fmt::Display for SchemaChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.new.shown_name(), self.details.join("; "))
    }
}

fn differences(old: &Relation, new: &Relation) -> Vec<String> {
    let mut details = Vec::new();
    if old.namespace != new.namespace || old.name != new.name {
        details.push(format!("renamed from {}", old.shown_name()));
    }
    if old.replica_identity != new.replica_identity {
        details.push(format!(
            "replica identity {} -> {}",
            old.replica_identity.as_sql(),
            new.replica_identity.as_sql()
        ));
    }
    for column in &old.columns {
        if !new.columns.iter().any(|c| c.name == column.name) {
            details.push(format!("column {} dropped", column.name));
        }
    }
    for column in &new.columns {
        let Some(before) = old.columns.iter().find(|c| c.name == column.name) else {
            details.push(format!("column {} added", column.name));
            continue;
        };
        if before.type_oid != column.type_oid {
            details.push(format!(
                "column {} type {} -> {}",
                column.name, before.type_oid, column.type_oid
            ));
        }
        if before.type_modifier != column.type_modifier {
            details.push(format!(
                "column {} type modifier {} -> {}",
                column.name, before.type_modifier, column.type_modifier
            ));
        }
        if before.is_key != column.is_key {
            let now = if column.is_key {
                "is now part of the key"
            } else {
                "is no longer part of the key"
            };
            details.push(format!("column {} {now}", column.name));
        }
    }
    // Tuples are positional: the same columns in another order change how rows map.
    if details.is_empty() {
        let names = |r: &Relation| r.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        if names(old) != names(new) {
            details.push(format!(
                "column order {} -> {}",
                names(old).join(","),
                names(new).join(",")
            ));
        }
    }
    details
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, ReplicaIdentity};

    fn column(name: &str, type_oid: u32, is_key: bool) -> Column {
        Column {
            is_key,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        }
    }

    fn orders(columns: Vec<Column>) -> Relation {
        Relation {
            xid: None,
            oid: 16384,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
            columns,
        }
    }

    #[test]
    fn identical_relation_is_not_a_change_but_still_replaces() {
        let mut cache = RelationCache::new();
        assert!(cache.insert(orders(vec![column("id", 23, true)])).is_none());
        let mut again = orders(vec![column("id", 23, true)]);
        again.xid = Some(77);
        assert!(cache.insert(again).is_none());
        assert_eq!(cache.get(16384).unwrap().xid, Some(77));
    }

    #[test]
    fn describes_added_and_retyped_columns() {
        let mut cache = RelationCache::new();
        cache.insert(orders(vec![
            column("id", 23, true),
            column("amount", 1700, false),
        ]));
        let change = cache
            .insert(orders(vec![
                column("id", 23, true),
                column("amount", 701, false),
                column("note", 25, false),
            ]))
            .expect("a change");
        assert_eq!(
            change.to_string(),
            "public.orders: column amount type 1700 -> 701; column note added"
        );
        assert!(change.column_types_changed());
        assert_eq!(cache.get(16384).unwrap().columns.len(), 3);
    }

    #[test]
    fn describes_identity_rename_key_and_order_changes() {
        let mut cache = RelationCache::new();
        cache.insert(orders(vec![column("id", 23, true), column("b", 25, false)]));
        let mut renamed = orders(vec![column("id", 23, true), column("b", 25, true)]);
        renamed.name = "orders2".into();
        renamed.replica_identity = ReplicaIdentity::Full;
        let change = cache.insert(renamed).unwrap();
        assert_eq!(
            change.to_string(),
            "public.orders2: renamed from public.orders; replica identity DEFAULT -> FULL; \
             column b is now part of the key"
        );
        let reordered = cache
            .insert(orders(vec![column("b", 25, true), column("id", 23, true)]))
            .unwrap();
        assert!(reordered
            .to_string()
            .contains("renamed from public.orders2"));
        let mut cache = RelationCache::new();
        cache.insert(orders(vec![column("id", 23, true), column("b", 25, false)]));
        let change = cache
            .insert(orders(vec![column("b", 25, false), column("id", 23, true)]))
            .unwrap();
        assert_eq!(
            change.to_string(),
            "public.orders: column order id,b -> b,id"
        );
        let dropped = cache.insert(orders(vec![column("id", 23, true)])).unwrap();
        assert_eq!(dropped.details(), ["column b dropped"]);
    }

    #[test]
    fn unknown_oid_is_an_error_naming_it() {
        let cache = RelationCache::new();
        let error = cache.resolve(99).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("Unknown relation OID 99 in the pgoutput stream"),
            "{error}"
        );
        assert_eq!(error.kind(), "Relation");
    }
}
