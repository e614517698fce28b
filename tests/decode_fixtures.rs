//! Decodes every payload captured from PostgreSQL 15 (`proto/fixtures/`, see its MANIFEST.md
//! for the SQL behind each) and checks the exact values; then attacks the same payloads with
//! truncation and byte flips, which must give errors, never panics.
//!
//! LSNs and xids differ between captures, so they are checked against the `lsn` / `xid`
//! columns PostgreSQL returned next to each payload and against each other, not against
//! constants.

use std::collections::BTreeSet;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use sluice::pgoutput::*;

struct Frame {
    /// The `lsn` column of `pg_logical_slot_peek_binary_changes`: for Begin the first LSN of
    /// the transaction, for a change its record, for Commit (and the two-phase ends) the end
    /// of the commit record.
    lsn: Lsn,
    xid: u32,
    payload: Bytes,
}

struct Decoded {
    frame: Frame,
    /// Decoder state before this payload, so a payload can be re-decoded on its own.
    in_stream: bool,
    message: LogicalMessage,
}

fn frames(name: &str) -> Vec<Frame> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("proto/fixtures")
        .join(format!("{name}.bin"));
    frames_from(Bytes::from(
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")),
    ))
}

fn frames_from(data: Bytes) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let header = &data[pos..pos + 16];
        let lsn = u64::from_be_bytes(header[0..8].try_into().unwrap());
        let xid = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(header[12..16].try_into().unwrap()) as usize;
        frames.push(Frame {
            lsn: Lsn(lsn),
            xid,
            payload: data.slice(pos + 16..pos + 16 + len),
        });
        pos += 16 + len;
    }
    frames
}

fn decode_all(name: &str, protocol: u32) -> Vec<Decoded> {
    let mut decoder = Decoder::new(protocol);
    frames(name)
        .into_iter()
        .enumerate()
        .map(|(i, frame)| {
            let in_stream = decoder.in_stream();
            let message = decoder
                .decode(frame.payload.clone())
                .unwrap_or_else(|e| panic!("{name} frame {i}: {e}"));
            Decoded {
                frame,
                in_stream,
                message,
            }
        })
        .collect()
}

const SCENARIOS: &[(&str, u32)] = &[
    ("v1_text_changes", 1),
    ("v1_binary_values", 1),
    ("v1_replica_identities", 1),
    ("v1_unchanged_toast", 1),
    ("v1_types", 1),
    ("v1_truncate", 1),
    ("v1_messages", 1),
    ("v1_origin", 1),
    ("v2_streaming", 2),
    ("v3_two_phase", 3),
    ("v4_stream_abort_synthetic", 4),
];

/// Values as strings: NULL, <u> for unchanged TOAST, text as is, binary as hex.
fn cells(tuple: &Tuple) -> Vec<String> {
    tuple
        .iter()
        .map(|value| match value {
            Value::Null => "NULL".to_string(),
            Value::UnchangedToast => "<u>".to_string(),
            Value::Text(text) => String::from_utf8(text.to_vec()).unwrap(),
            Value::Binary(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        })
        .collect()
}

fn column(is_key: bool, name: &str, type_oid: u32, type_modifier: i32) -> Column {
    Column {
        is_key,
        name: name.to_string(),
        type_oid,
        type_modifier,
    }
}

macro_rules! expect {
    ($decoded:expr, $variant:ident) => {
        match &$decoded.message {
            LogicalMessage::$variant(inner) => inner,
            other => panic!("expected {}, got {other:?}", stringify!($variant)),
        }
    };
}

/// Begin and Commit of one plain transaction agree with each other and with the server.
fn check_transaction(begin: &Decoded, commit: &Decoded) -> (u32, Lsn) {
    let b = expect!(begin, Begin);
    let c = expect!(commit, Commit);
    assert_eq!(b.xid, begin.frame.xid);
    assert_eq!(
        b.final_lsn, c.commit_lsn,
        "Begin.final_lsn is the commit LSN"
    );
    assert_eq!(b.commit_time, c.commit_time);
    assert_eq!(c.flags, 0);
    assert_eq!(
        c.end_lsn, commit.frame.lsn,
        "the server reports the commit end"
    );
    assert!(c.end_lsn > c.commit_lsn);
    assert!(begin.frame.lsn <= b.final_lsn);
    assert!(recent(c.commit_time), "{:?}", c.commit_time);
    (b.xid, c.end_lsn)
}

/// A capture time: after 2020 and not in the far future.
fn recent(time: PgTimestamp) -> bool {
    let unix = time
        .to_system_time()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (1_577_836_800..4_102_444_800).contains(&unix)
}

#[test]
fn text_changes_insert_update_key_change_delete() {
    let d = decode_all("v1_text_changes", 1);
    assert_eq!(d.len(), 14);
    let mut ends = Vec::new();
    for (begin, commit) in [(0, 4), (5, 7), (8, 10), (11, 13)] {
        ends.push(check_transaction(&d[begin], &d[commit]));
    }
    assert!(ends.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));

    let relation = expect!(d[1], Relation);
    assert_eq!(relation.xid, None);
    assert_eq!(
        (relation.namespace.as_str(), relation.name.as_str()),
        ("public", "orders")
    );
    assert_eq!(relation.replica_identity, ReplicaIdentity::Default);
    assert_eq!(
        relation.columns,
        [
            column(true, "id", 23, -1),
            column(false, "customer", 25, -1),
            // numeric(10,2): ((10 << 16) | 2) + 4
            column(false, "amount", 1700, 655_366),
            column(false, "note", 25, -1),
            column(false, "created", 1184, -1),
            column(false, "tags", 1009, -1),
        ]
    );
    let oid = relation.oid;

    let first = expect!(d[2], Insert);
    assert_eq!((first.xid, first.relation_oid), (None, oid));
    assert_eq!(
        cells(&first.new),
        [
            "1",
            "alice",
            "12.50",
            "NULL",
            "2026-11-21 10:00:00+00",
            "{a,b}"
        ]
    );
    let second = expect!(d[3], Insert);
    assert_eq!(
        cells(&second.new),
        [
            "2",
            "bob",
            "99.99",
            "first \"quoted\" note",
            "1999-12-31 23:59:59.5+00",
            "NULL"
        ]
    );

    let update = expect!(d[6], Update);
    assert_eq!(update.relation_oid, oid);
    assert!(update.old.is_none(), "no key change, no old tuple");
    assert_eq!(
        cells(&update.new),
        [
            "1",
            "alice",
            "13.75",
            "paid",
            "2026-11-21 10:00:00+00",
            "{a,b}"
        ]
    );

    let key_change = expect!(d[9], Update);
    let Some(OldTuple::Key(old)) = &key_change.old else {
        panic!("a key change sends the old key: {key_change:?}")
    };
    assert_eq!(cells(old), ["2", "NULL", "NULL", "NULL", "NULL", "NULL"]);
    assert_eq!(cells(&key_change.new)[..3], ["10", "bob", "99.99"]);

    let delete = expect!(d[12], Delete);
    assert_eq!(delete.relation_oid, oid);
    let OldTuple::Key(old) = &delete.old else {
        panic!("default identity deletes send K")
    };
    assert_eq!(cells(old), ["10", "NULL", "NULL", "NULL", "NULL", "NULL"]);
}

#[test]
fn binary_values_are_the_send_formats() {
    let d = decode_all("v1_binary_values", 1);
    assert_eq!(d.len(), 7);
    check_transaction(&d[0], &d[3]);
    check_transaction(&d[4], &d[6]);
    let relation = expect!(d[1], Relation);
    let types: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(types, [23, 20, 16, 25, 17, 701, 1184, 2950, 25]);
    let insert = expect!(d[2], Insert);
    assert!(insert
        .new
        .iter()
        .take(8)
        .all(|v| matches!(v, Value::Binary(_))));
    assert_eq!(
        cells(&insert.new),
        [
            "0000002a",
            "fffffffffffffffe",
            "01",
            "68c3a96c6c6f", // 'héllo' in UTF-8
            "deadbeef",
            "3ff8000000000000", // 1.5
            "00000000000f4240", // one second after 2000-01-01, in microseconds
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "NULL"
        ]
    );
    assert_eq!(
        f64::from_be_bytes(insert.new.bytes(5).unwrap()[..].try_into().unwrap()),
        1.5
    );
    let update = expect!(d[5], Update);
    assert!(update.old.is_none());
    assert_eq!(cells(&update.new)[2], "00");
    assert_eq!(cells(&update.new)[..2], cells(&insert.new)[..2]);
}

#[test]
fn replica_identity_full_index_and_nothing() {
    let d = decode_all("v1_replica_identities", 1);
    assert_eq!(d.len(), 25);
    for (begin, commit) in [
        (0, 4),
        (5, 7),
        (8, 10),
        (11, 14),
        (15, 17),
        (18, 20),
        (21, 24),
    ] {
        check_transaction(&d[begin], &d[commit]);
    }
    let events = expect!(d[1], Relation);
    assert_eq!(events.replica_identity, ReplicaIdentity::Full);
    assert_eq!(
        events.columns,
        [
            column(true, "kind", 25, -1),
            column(true, "payload", 25, -1)
        ],
        "FULL marks every column as key"
    );
    assert_eq!(cells(&expect!(d[3], Insert).new), ["view", "NULL"]);
    let update = expect!(d[6], Update);
    let Some(OldTuple::Full(old)) = &update.old else {
        panic!("FULL sends O: {update:?}")
    };
    assert_eq!(cells(old), ["click", "a"]);
    assert_eq!(cells(&update.new), ["click", "b"]);
    let delete = expect!(d[9], Delete);
    assert!(matches!(&delete.old, OldTuple::Full(t) if cells(t) == ["view", "NULL"]));

    let accounts = expect!(d[12], Relation);
    assert_eq!(accounts.replica_identity, ReplicaIdentity::Index);
    assert_eq!(
        accounts.columns,
        [
            column(false, "id", 23, -1),
            column(true, "email", 25, -1),
            column(false, "balance", 23, -1)
        ]
    );
    assert_eq!(accounts.key_columns().collect::<Vec<_>>(), [1]);
    let update = expect!(d[16], Update);
    assert_eq!(update.relation_oid, accounts.oid);
    let Some(OldTuple::Key(old)) = &update.old else {
        panic!("changing the index key sends K")
    };
    assert_eq!(cells(old), ["NULL", "a@example.com", "NULL"]);
    assert_eq!(cells(&update.new), ["1", "b@example.com", "20"]);
    let delete = expect!(d[19], Delete);
    assert!(
        matches!(&delete.old, OldTuple::Key(t) if cells(t) == ["NULL", "b@example.com", "NULL"])
    );

    let blind = expect!(d[22], Relation);
    assert_eq!(blind.replica_identity, ReplicaIdentity::Nothing);
    assert_eq!(blind.columns, [column(false, "id", 23, -1)]);
    assert_eq!(cells(&expect!(d[23], Insert).new), ["7"]);
}

#[test]
fn unchanged_toast_is_u_in_updates() {
    let d = decode_all("v1_unchanged_toast", 1);
    assert_eq!(d.len(), 10);
    for (begin, commit) in [(0, 3), (4, 6), (7, 9)] {
        check_transaction(&d[begin], &d[commit]);
    }
    let insert = expect!(d[2], Insert);
    assert_eq!(cells(&insert.new)[..2], ["1", "draft"]);
    assert_eq!(
        insert.new.bytes(2).unwrap(),
        "toast!".repeat(500).as_bytes()
    );
    assert!(!insert.new.has_unchanged_toast());
    let update = expect!(d[5], Update);
    assert!(update.old.is_none());
    assert_eq!(cells(&update.new), ["1", "final", "<u>"]);
    assert!(update.new.has_unchanged_toast());
    assert_eq!(update.new.bytes(2), None);
    let key_change = expect!(d[8], Update);
    assert!(matches!(&key_change.old, Some(OldTuple::Key(t)) if cells(t) == ["1", "NULL", "NULL"]));
    assert_eq!(cells(&key_change.new), ["2", "final", "<u>"]);
}

#[test]
fn enum_array_and_domain_columns_send_type_messages_first() {
    let d = decode_all("v1_types", 1);
    assert_eq!(d.len(), 7);
    check_transaction(&d[0], &d[6]);
    let types: Vec<&TypeMessage> = d[1..4].iter().map(|x| expect!(x, Type)).collect();
    let names: Vec<(&str, &str)> = types
        .iter()
        .map(|t| (t.namespace.as_str(), t.name.as_str()))
        .collect();
    // A domain's Type message carries the domain's OID but its base type's name (pg_catalog
    // is sent as an empty namespace).
    assert_eq!(
        names,
        [("public", "mood"), ("public", "_mood"), ("", "int4")]
    );
    assert!(types.iter().all(|t| t.xid.is_none()));
    let relation = expect!(d[4], Relation);
    let column_types: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(
        column_types,
        [23, types[0].oid, types[1].oid, types[2].oid],
        "the columns use the OIDs the Type messages announced"
    );
    assert_eq!(
        cells(&expect!(d[5], Insert).new),
        ["1", "happy", "{sad,ok}", "7"]
    );
}

#[test]
fn truncate_flags_and_relations() {
    let d = decode_all("v1_truncate", 1);
    assert_eq!(d.len(), 19);
    for (begin, commit) in [(0, 4), (5, 8), (9, 14), (15, 18)] {
        check_transaction(&d[begin], &d[commit]);
    }
    let mut cache = RelationCache::new();
    let mut truncates = Vec::new();
    for decoded in &d {
        match &decoded.message {
            LogicalMessage::Relation(relation) => {
                assert!(
                    cache.insert(relation.clone()).is_none(),
                    "re-sent unchanged"
                );
            }
            LogicalMessage::Truncate(truncate) => {
                let names: Vec<String> = truncate
                    .relation_oids
                    .iter()
                    .map(|oid| cache.resolve(*oid).unwrap().name.clone())
                    .collect();
                truncates.push((
                    truncate.xid,
                    truncate.cascade,
                    truncate.restart_identity,
                    names.join(","),
                ));
            }
            _ => {}
        }
    }
    assert_eq!(
        truncates,
        [
            (None, true, false, "parent,child".to_string()),
            (None, false, true, "solo".to_string()),
            (None, true, true, "solo,parent,child".to_string()),
            (None, false, false, "solo".to_string()),
        ]
    );
    // TRUNCATE gives the table a new file, which makes pgoutput send its Relation again.
    assert_eq!(expect!(d[16], Relation).name, "solo");
}

#[test]
fn logical_messages_transactional_and_not() {
    let d = decode_all("v1_messages", 1);
    assert_eq!(d.len(), 7);
    let (xid, _) = check_transaction(&d[2], &d[6]);
    let outside = expect!(d[0], Message);
    assert_eq!(
        (outside.xid, outside.transactional, outside.prefix.as_str()),
        (None, false, "sluice.fixture")
    );
    assert_eq!(&outside.content[..], b"outside a transaction");
    assert_eq!(d[0].frame.xid, 0);
    // Emitted inside transaction `xid`, non-transactional: delivered before its Begin.
    let early = expect!(d[1], Message);
    assert_eq!(
        (early.transactional, early.prefix.as_str()),
        (false, "sluice.nontx")
    );
    assert_eq!(&early.content[..], b"emitted mid-transaction");
    assert_eq!(d[1].frame.xid, xid);
    let begin = expect!(d[2], Begin);
    assert!(early.lsn > d[2].frame.lsn && early.lsn <= begin.final_lsn);
    let inside = expect!(d[5], Message);
    assert_eq!(
        (inside.xid, inside.transactional, inside.prefix.as_str()),
        (None, true, "sluice.fixture")
    );
    assert_eq!(&inside.content[..], [0x00, 0xFF]);
    for i in [0, 1, 5] {
        let message = expect!(d[i], Message);
        assert_eq!(message.lsn, d[i].frame.lsn, "frame {i}");
    }
}

#[test]
fn origin_follows_begin() {
    let d = decode_all("v1_origin", 1);
    assert_eq!(d.len(), 5);
    check_transaction(&d[0], &d[4]);
    let origin = expect!(d[1], Origin);
    assert_eq!(origin.commit_lsn, "0/ABCDEF".parse().unwrap());
    assert_eq!(origin.name, "fixture_origin");
    // pg_replication_origin_xact_setup also sets the commit timestamp: 2026-11-21 12:00 UTC.
    let begin = expect!(d[0], Begin);
    assert_eq!(
        begin.commit_time,
        PgTimestamp::from_unix_micros(1_795_262_400_000_000)
    );
    assert_eq!(
        begin.commit_time.to_system_time(),
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_262_400)
    );
}

#[test]
fn streamed_transactions_carry_xids_inside_blocks() {
    let d = decode_all("v2_streaming", 2);
    assert_eq!(d.len(), 1066);
    let top = expect!(d[0], StreamStart).xid;
    let rolled_back = expect!(d[618], StreamStart).xid;

    // Segment boundaries and first-segment flags.
    let starts: Vec<(usize, u32, bool)> = d
        .iter()
        .enumerate()
        .filter_map(|(i, x)| match &x.message {
            LogicalMessage::StreamStart(s) => Some((i, s.xid, s.first_segment)),
            _ => None,
        })
        .collect();
    assert_eq!(
        starts,
        [
            (0, top, true),
            (470, top, false),
            (607, top, false),
            (618, rolled_back, true)
        ]
    );
    let stops: Vec<usize> = d
        .iter()
        .enumerate()
        .filter(|(_, x)| x.message == LogicalMessage::StreamStop)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stops, [469, 605, 616, 1064]);
    for (i, x) in d.iter().enumerate() {
        let inside = starts
            .iter()
            .zip(&stops)
            .any(|(start, stop)| i > start.0 && i < *stop);
        assert_eq!(x.in_stream, inside || stops.contains(&i), "frame {i}");
    }

    let ty = expect!(d[1], Type);
    assert_eq!((ty.xid, ty.name.as_str()), (Some(top), "level"));
    let bulk = expect!(d[2], Relation);
    assert_eq!((bulk.xid, bulk.name.as_str()), (Some(top), "bulk"));
    assert_eq!(bulk.columns[1].type_oid, ty.oid);

    // The first 600 rows are in the top-level transaction, in order, across two segments.
    let mut ids = Vec::new();
    for x in d[3..469].iter().chain(&d[471..605]) {
        let insert = expect!(x, Insert);
        assert_eq!((insert.xid, insert.relation_oid), (Some(top), bulk.oid));
        ids.push(cells(&insert.new)[0].parse::<u32>().unwrap());
    }
    assert_eq!(ids, (1..=600).collect::<Vec<_>>());
    assert_eq!(cells(&expect!(d[3], Insert).new), ["1", "low", "r1"]);

    // ROLLBACK TO SAVEPOINT a: its rows were never streamed, the abort names it anyway.
    let sub_abort = expect!(d[606], StreamAbort);
    assert_eq!(sub_abort.xid, top);
    assert_ne!(sub_abort.subxid, top);
    assert_eq!(sub_abort.subxid, d[606].frame.xid);
    assert_eq!((sub_abort.abort_lsn, sub_abort.abort_time), (None, None));

    // Changes carry the xid of the subtransaction that made them: savepoint b (nested in the
    // restarted savepoint a) for the insert, the restarted a for update/delete/truncate; the
    // transactional message carries the top-level xid.
    let inner_ty = expect!(d[608], Type);
    let inner_rel = expect!(d[609], Relation);
    let sub_insert = expect!(d[610], Insert);
    let b = sub_insert.xid.unwrap();
    assert_eq!((inner_ty.xid, inner_rel.xid), (Some(b), Some(b)));
    assert_eq!(
        cells(&sub_insert.new),
        ["2000", "high", "in a subtransaction"]
    );
    let update = expect!(d[611], Update);
    let a = update.xid.unwrap();
    assert!(top < a && a < b && a != sub_abort.subxid);
    assert_eq!(cells(&update.new), ["1", "low", "updated"]);
    let delete = expect!(d[612], Delete);
    assert_eq!(delete.xid, Some(a));
    assert!(matches!(&delete.old, OldTuple::Key(t) if cells(t) == ["2", "NULL", "NULL"]));
    let scratch = expect!(d[613], Relation);
    assert_eq!((scratch.xid, scratch.name.as_str()), (Some(a), "scratch"));
    let truncate = expect!(d[614], Truncate);
    assert_eq!(truncate.xid, Some(a));
    assert_eq!(truncate.relation_oids, [scratch.oid]);
    let message = expect!(d[615], Message);
    assert_eq!(
        (message.xid, message.transactional, message.prefix.as_str()),
        (Some(top), true, "sluice.stream")
    );
    assert_eq!(&message.content[..], b"inside a streamed transaction");

    let commit = expect!(d[617], StreamCommit);
    assert_eq!((commit.xid, commit.flags), (top, 0));
    assert_eq!(commit.end_lsn, d[617].frame.lsn);
    assert!(commit.commit_lsn < commit.end_lsn);
    assert!(message.lsn <= commit.commit_lsn);
    assert!(recent(commit.commit_time));

    // The rolled-back streamed transaction: 443 rows streamed, then aborted as a whole.
    assert!(rolled_back > top);
    assert!(d[621..1064]
        .iter()
        .all(|x| expect!(x, Insert).xid == Some(rolled_back)));
    let abort = expect!(d[1065], StreamAbort);
    assert_eq!((abort.xid, abort.subxid), (rolled_back, rolled_back));
    assert!(!d[1065].in_stream);
}

#[test]
fn two_phase_prepare_commit_rollback_and_streamed_prepare() {
    let d = decode_all("v3_two_phase", 3);
    assert_eq!(d.len(), 616);

    let begin = expect!(d[0], BeginPrepare);
    let prepare = expect!(d[3], Prepare);
    let commit = expect!(d[4], CommitPrepared);
    assert_eq!(begin.gid, "fx_commit");
    assert_eq!(begin.xid, d[0].frame.xid);
    assert_eq!(
        (
            prepare.flags,
            prepare.prepare_lsn,
            prepare.end_lsn,
            prepare.prepare_time
        ),
        (0, begin.prepare_lsn, begin.end_lsn, begin.prepare_time)
    );
    assert_eq!(
        (prepare.xid, prepare.gid.as_str()),
        (begin.xid, "fx_commit")
    );
    assert_eq!(prepare.end_lsn, d[3].frame.lsn);
    assert!(prepare.prepare_lsn < prepare.end_lsn);
    assert!(recent(prepare.prepare_time));
    let ledger = expect!(d[1], Relation);
    assert_eq!(ledger.name, "ledger");
    let insert = expect!(d[2], Insert);
    assert_eq!(
        (insert.xid, cells(&insert.new)),
        (None, vec!["1".into(), "100".into()])
    );
    assert_eq!((commit.flags, commit.xid), (0, begin.xid));
    assert_eq!(commit.gid, "fx_commit");
    assert_eq!(commit.end_lsn, d[4].frame.lsn);
    assert!(commit.commit_lsn >= prepare.end_lsn && commit.commit_lsn < commit.end_lsn);
    assert!(commit.commit_time >= prepare.prepare_time);

    let begin = expect!(d[5], BeginPrepare);
    assert_eq!(begin.gid, "fx_rollback");
    assert_eq!(cells(&expect!(d[6], Insert).new), ["2", "200"]);
    let prepare = expect!(d[7], Prepare);
    let rollback = expect!(d[8], RollbackPrepared);
    assert_eq!(
        (rollback.flags, rollback.xid, rollback.gid.as_str()),
        (0, begin.xid, "fx_rollback")
    );
    assert_eq!(rollback.prepare_end_lsn, prepare.end_lsn);
    assert_eq!(rollback.rollback_end_lsn, d[8].frame.lsn);
    assert_eq!(rollback.prepare_time, prepare.prepare_time);
    assert!(rollback.rollback_time >= rollback.prepare_time);

    let start = expect!(d[9], StreamStart);
    assert!(start.first_segment);
    assert_eq!(expect!(d[10], Relation).xid, Some(start.xid));
    let values: Vec<String> = d[11..613]
        .iter()
        .filter(|x| {
            !matches!(
                x.message,
                LogicalMessage::StreamStop | LogicalMessage::StreamStart(_)
            )
        })
        .map(|x| {
            let insert = expect!(x, Insert);
            assert_eq!(insert.xid, Some(start.xid));
            cells(&insert.new)[0].clone()
        })
        .collect();
    assert_eq!(values.len(), 600);
    assert_eq!(values[599], "1599");
    assert_eq!(d[613].message, LogicalMessage::StreamStop);
    let stream_prepare = expect!(d[614], StreamPrepare);
    assert_eq!(
        (
            stream_prepare.flags,
            stream_prepare.xid,
            stream_prepare.gid.as_str()
        ),
        (0, start.xid, "fx_streamed")
    );
    assert_eq!(stream_prepare.end_lsn, d[614].frame.lsn);
    let commit = expect!(d[615], CommitPrepared);
    assert_eq!(
        (commit.xid, commit.gid.as_str()),
        (start.xid, "fx_streamed")
    );
}

#[test]
fn synthetic_v4_stream_abort_long_and_short_forms() {
    let d = decode_all("v4_stream_abort_synthetic", 4);
    assert_eq!(
        d[0].message,
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 1234,
            subxid: 1235,
            abort_lsn: Some("0/1A2B3C4D".parse().unwrap()),
            abort_time: Some(PgTimestamp::from_unix_micros(1_795_262_400_000_000)),
        })
    );
    assert_eq!(
        d[1].message,
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 1234,
            subxid: 1234,
            abort_lsn: None,
            abort_time: None,
        })
    );
}

#[test]
fn fixtures_cover_every_message_kind() {
    let mut seen = BTreeSet::new();
    for (name, protocol) in SCENARIOS {
        for decoded in decode_all(name, *protocol) {
            seen.insert(decoded.message.kind());
            if let LogicalMessage::Update(u) = &decoded.message {
                seen.insert(match &u.old {
                    None => "Update without old tuple",
                    Some(OldTuple::Key(_)) => "Update with K",
                    Some(OldTuple::Full(_)) => "Update with O",
                });
            }
            if let LogicalMessage::Delete(d) = &decoded.message {
                seen.insert(match &d.old {
                    OldTuple::Key(_) => "Delete with K",
                    OldTuple::Full(_) => "Delete with O",
                });
            }
        }
    }
    let expected: BTreeSet<&str> = [
        "Begin",
        "Commit",
        "Origin",
        "Relation",
        "Type",
        "Insert",
        "Update",
        "Delete",
        "Truncate",
        "Message",
        "Stream Start",
        "Stream Stop",
        "Stream Commit",
        "Stream Abort",
        "Begin Prepare",
        "Prepare",
        "Commit Prepared",
        "Rollback Prepared",
        "Stream Prepare",
        "Update without old tuple",
        "Update with K",
        "Update with O",
        "Delete with K",
        "Delete with O",
    ]
    .into_iter()
    .collect();
    assert_eq!(seen, expected);
}

/// Every payload of every fixture, with what its decoder needs to see it as the stream did.
fn all_payloads() -> Vec<(u32, bool, Bytes)> {
    SCENARIOS
        .iter()
        .flat_map(|(name, protocol)| {
            decode_all(name, *protocol)
                .into_iter()
                .map(|d| (*protocol, d.in_stream, d.frame.payload))
        })
        .collect()
}

fn decoder_for(protocol: u32, in_stream: bool) -> Decoder {
    let mut decoder = Decoder::new(protocol);
    if in_stream {
        decoder
            .decode(Bytes::from_static(&[b'S', 0, 0, 0, 1, 1]))
            .unwrap();
    }
    decoder
}

#[test]
fn every_truncation_of_every_fixture_is_an_error() {
    let mut checked = 0;
    for (protocol, in_stream, payload) in all_payloads() {
        for len in 0..payload.len() {
            let result = decoder_for(protocol, in_stream).decode(payload.slice(..len));
            // The one layout with an optional tail: protocol 4's Stream Abort cut after
            // subxid is the complete short form.
            let short_abort = protocol == 4 && payload[0] == b'A' && len == 9;
            match result {
                Ok(message) => assert!(short_abort, "prefix {len} of {payload:?} gave {message:?}"),
                Err(error) => {
                    assert!(error.offset() <= len, "{error} for a {len}-byte prefix");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 50_000, "{checked}");
}

#[test]
fn trailing_garbage_after_any_fixture_is_an_error() {
    for (protocol, in_stream, payload) in all_payloads() {
        let mut longer = payload.to_vec();
        longer.push(0);
        let error = decoder_for(protocol, in_stream)
            .decode(Bytes::from(longer))
            .unwrap_err();
        assert_eq!(error.offset(), payload.len(), "{error}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Random byte flips in real payloads: an error or some message, never a panic.
    #[test]
    fn byte_flips_in_fixtures_never_panic(
        pick in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let payloads = payloads();
        let (protocol, in_stream, payload) = &payloads[pick.index(payloads.len())];
        let mut bytes = payload.to_vec();
        for (at, value) in flips {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        let len = bytes.len();
        if let Err(error) = decoder_for(*protocol, *in_stream).decode(Bytes::from(bytes)) {
            prop_assert!(error.offset() <= len);
        }
    }
}

/// Decoding every fixture for every proptest case would dominate the run: do it once.
fn payloads() -> &'static [(u32, bool, Bytes)] {
    static PAYLOADS: std::sync::OnceLock<Vec<(u32, bool, Bytes)>> = std::sync::OnceLock::new();
    PAYLOADS.get_or_init(all_payloads)
}

// The example brings its own copy of the cluster harness (it is its own crate too).
#[path = "../examples/capture_fixtures.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod capture_fixtures;

/// The committed fixtures are what this PostgreSQL produces today: a fresh capture gives the
/// same messages in the same order with the same tuple values (LSNs, xids, OIDs and times
/// differ and are left out).
#[tokio::test]
async fn a_fresh_capture_matches_the_committed_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    capture_fixtures::capture_all(dir.path()).await;
    let shape = |payloads: Vec<Frame>, protocol: u32| -> Vec<String> {
        let mut decoder = Decoder::new(protocol);
        payloads
            .into_iter()
            .map(|frame| {
                let message = decoder.decode(frame.payload).unwrap();
                let values = match &message {
                    LogicalMessage::Insert(i) => cells(&i.new).join("|"),
                    LogicalMessage::Update(u) => {
                        let old = u.old.as_ref().map(|o| cells(o.tuple()).join("|"));
                        format!("{old:?} {}", cells(&u.new).join("|"))
                    }
                    LogicalMessage::Delete(d) => cells(d.old.tuple()).join("|"),
                    LogicalMessage::Relation(r) => format!("{}.{}", r.namespace, r.name),
                    LogicalMessage::Type(t) => format!("{}.{}", t.namespace, t.name),
                    _ => String::new(),
                };
                format!("{} {values}", message.kind())
            })
            .collect()
    };
    for (name, protocol) in SCENARIOS {
        let fresh = std::fs::read(dir.path().join(format!("{name}.bin"))).unwrap();
        let fresh = frames_from(Bytes::from(fresh));
        assert_eq!(
            shape(fresh, *protocol),
            shape(frames(name), *protocol),
            "{name} differs from a fresh capture: if PostgreSQL changed, re-run \
             `cargo run --example capture_fixtures` and review the diff"
        );
    }
}
