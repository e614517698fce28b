//! The decoder on a real replication connection: pgwire-replication delivers Begin, Commit
//! and Message as parsed events and every other pgoutput message as raw XLogData, which
//! `Decoder::new(1)` must turn into exactly the changes the SQL made.

use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use sluice::pgoutput::*;
use tokio::time::timeout;

use crate::support::PgCluster;

/// What the stream said, one line per event, so a whole session compares at once. `None` for
/// a Relation re-sent unchanged: pgoutput re-sends one after any invalidation of its cache
/// entry (a TRUNCATE's new file, but also a shared-invalidation reset when the walsender falls
/// behind on a busy machine), so whether one appears is timing, not what the SQL made.
fn summarise(cache: &mut RelationCache, message: LogicalMessage) -> Option<String> {
    let name = |cache: &RelationCache, oid: u32| cache.resolve(oid).unwrap().name.clone();
    let row = |tuple: &Tuple| {
        tuple
            .iter()
            .map(|v| match v {
                Value::Null => "NULL".to_string(),
                Value::UnchangedToast => "<u>".to_string(),
                Value::Text(t) => String::from_utf8(t.to_vec()).unwrap(),
                Value::Binary(b) => format!("{b:02x?}"),
            })
            .collect::<Vec<_>>()
            .join("|")
    };
    let old = |old: &OldTuple| match old {
        OldTuple::Key(t) => format!("K={}", row(t)),
        OldTuple::Full(t) => format!("O={}", row(t)),
    };
    let line = match message {
        LogicalMessage::Relation(relation) => {
            let label = format!("R {} ({} columns)", relation.name, relation.columns.len());
            let known = cache.get(relation.oid).is_some();
            match cache.insert(relation) {
                Some(change) => format!("{label}: {change}"),
                None if known => return None,
                None => label,
            }
        }
        LogicalMessage::Insert(i) => {
            assert_eq!(i.xid, None);
            format!("I {} {}", name(cache, i.relation_oid), row(&i.new))
        }
        LogicalMessage::Update(u) => format!(
            "U {} {}new={}",
            name(cache, u.relation_oid),
            u.old.as_ref().map(|o| old(o) + " ").unwrap_or_default(),
            row(&u.new)
        ),
        LogicalMessage::Delete(d) => format!("D {} {}", name(cache, d.relation_oid), old(&d.old)),
        LogicalMessage::Truncate(t) => format!(
            "T {} cascade={} restart={}",
            t.relation_oids
                .iter()
                .map(|oid| name(cache, *oid))
                .collect::<Vec<_>>()
                .join(","),
            t.cascade,
            t.restart_identity
        ),
        other => format!("unexpected {other:?}"),
    };
    Some(line)
}

#[tokio::test]
async fn live_stream_decodes_every_change_the_sql_made() {
    let (pg, client) = PgCluster::start_with_client().await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(8,2), \
             seen timestamptz, data bytea, tags int[]); \
             CREATE TABLE logs (line text); \
             ALTER TABLE logs REPLICA IDENTITY FULL; \
             CREATE PUBLICATION live FOR TABLE items, logs",
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('live', 'pgoutput')")
        .await
        .unwrap();

    let config = ReplicationConfig::new("127.0.0.1", "postgres", "", "postgres", "live", "live")
        .with_port(pg.port)
        .with_tls(TlsConfig::disabled())
        .with_status_interval(Duration::from_millis(200))
        // Text values follow the walsender session's settings: pin them as a subscriber does.
        .with_options(
            "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c timezone=UTC",
        );
    let mut stream = timeout(Duration::from_secs(20), ReplicationClient::connect(config))
        .await
        .expect("connect timed out")
        .expect("connect");

    let transactions = [
        "INSERT INTO items VALUES (1, 'apple', 1.25, '2026-11-21 12:00:00+00', '\\x0102', '{1,2}'), \
         (2, NULL, 0.5, NULL, NULL, NULL)",
        "UPDATE items SET price = 1.5 WHERE id = 1",
        "UPDATE items SET id = 3 WHERE id = 2",
        "DELETE FROM items WHERE id = 3",
        "BEGIN; INSERT INTO logs VALUES ('x'); UPDATE logs SET line = 'y'; DELETE FROM logs; COMMIT",
        "BEGIN; SELECT pg_logical_emit_message(true, 'live', 'hello'); COMMIT",
        "BEGIN; ALTER TABLE items ADD COLUMN note text; \
         INSERT INTO items (id, name, price, note) VALUES (4, 'pear', 2, 'new column'); COMMIT",
        "TRUNCATE items, logs RESTART IDENTITY",
    ];
    for sql in transactions {
        client.batch_execute(sql).await.unwrap();
    }

    let mut decoder = Decoder::new(1);
    let mut cache = RelationCache::new();
    let mut lines = Vec::new();
    let mut commits = Vec::new();
    let mut open_xid = None;
    while commits.len() < transactions.len() {
        let event = timeout(Duration::from_secs(20), stream.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within 20 s; so far: {lines:#?}"))
            .expect("replication stream failed")
            .expect("replication stream ended early");
        match event {
            ReplicationEvent::Begin { xid, final_lsn, .. } => {
                assert!(open_xid.is_none(), "nested Begin");
                open_xid = Some((xid, final_lsn));
                lines.push("BEGIN".to_string());
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                let (_, final_lsn) = open_xid.take().expect("Commit without Begin");
                assert_eq!(lsn, final_lsn);
                commits.push(Lsn::from(end_lsn));
                stream.update_applied_lsn(end_lsn);
                lines.push("COMMIT".to_string());
            }
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                ..
            } => lines.push(format!(
                "M {prefix} {} transactional={transactional}",
                String::from_utf8_lossy(&content)
            )),
            ReplicationEvent::XLogData { data, .. } => {
                assert!(open_xid.is_some(), "a change outside a transaction");
                let message = decoder.decode(data).expect("decode a live payload");
                lines.extend(summarise(&mut cache, message));
            }
            ReplicationEvent::KeepAlive { .. } => {}
            ReplicationEvent::StoppedAt { .. } => panic!("no stop LSN was set"),
        }
    }
    stream.stop();

    let expected = [
        "BEGIN",
        "R items (6 columns)",
        "I items 1|apple|1.25|2026-11-21 12:00:00+00|\\x0102|{1,2}",
        "I items 2|NULL|0.50|NULL|NULL|NULL",
        "COMMIT",
        "BEGIN",
        "U items new=1|apple|1.50|2026-11-21 12:00:00+00|\\x0102|{1,2}",
        "COMMIT",
        "BEGIN",
        "U items K=2|NULL|NULL|NULL|NULL|NULL new=3|NULL|0.50|NULL|NULL|NULL",
        "COMMIT",
        "BEGIN",
        "D items K=3|NULL|NULL|NULL|NULL|NULL",
        "COMMIT",
        "BEGIN",
        "R logs (1 columns)",
        "I logs x",
        "U logs O=x new=y",
        "D logs O=y",
        "COMMIT",
        "BEGIN",
        "M live hello transactional=true",
        "COMMIT",
        "BEGIN",
        "R items (7 columns): public.items: column note added",
        "I items 4|pear|2.00|NULL|NULL|NULL|new column",
        "COMMIT",
        "BEGIN",
        "T items,logs cascade=false restart=true",
        "COMMIT",
    ];
    assert_eq!(lines, expected);
    assert!(commits.windows(2).all(|w| w[0] < w[1]), "{commits:?}");
    assert!(!decoder.in_stream());
    drop(client);
}
