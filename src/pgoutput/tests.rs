//! Hand-built payloads for the layouts real PostgreSQL 15 cannot produce (protocol 4) and for
//! malformed input; the real-server payloads are tested in `tests/decode_fixtures.rs`.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

#[derive(Default)]
struct Payload(BytesMut);

impl Payload {
    fn tag(tag: u8) -> Self {
        let mut p = Payload::default();
        p.0.put_u8(tag);
        p
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.put_u8(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.put_u16(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.put_u32(v);
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.put_i32(v);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.put_u64(v);
        self
    }
    fn str(mut self, v: &str) -> Self {
        self.0.put_slice(v.as_bytes());
        self.0.put_u8(0);
        self
    }
    fn text(self, v: &str) -> Self {
        let p = self.u8(b't').i32(v.len() as i32);
        p.raw(v.as_bytes())
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.put_slice(v);
        self
    }
    fn done(self) -> Bytes {
        self.0.freeze()
    }
}

fn decode(version: u32, payload: Bytes) -> Result<LogicalMessage, DecodeError> {
    Decoder::new(version).decode(payload)
}

#[test]
fn insert_values_are_slices_of_the_payload() {
    let payload = Payload::tag(b'I')
        .u32(16384)
        .u8(b'N')
        .u16(4)
        .text("42")
        .u8(b'n')
        .u8(b'u')
        .u8(b'b')
        .i32(2)
        .raw(&[0xCA, 0xFE])
        .done();
    let LogicalMessage::Insert(insert) = decode(1, payload.clone()).unwrap() else {
        panic!("not an insert")
    };
    assert_eq!(insert.xid, None);
    assert_eq!(insert.relation_oid, 16384);
    let values: Vec<_> = insert.new.iter().collect();
    assert_eq!(
        values,
        [
            Value::Text(b"42"),
            Value::Null,
            Value::UnchangedToast,
            Value::Binary(&[0xCA, 0xFE])
        ]
    );
    assert!(insert.new.has_unchanged_toast());
    let text = insert.new.bytes(0).unwrap();
    assert_eq!(&text[..], b"42");
    // Zero-copy: the value points into the payload's own buffer.
    let offset = text.as_ptr() as usize - payload.as_ptr() as usize;
    assert_eq!(offset, 1 + 4 + 1 + 2 + 1 + 4);
    assert_eq!(insert.new.bytes(1), None);
    assert_eq!(insert.new.bytes(2), None);
    assert_eq!(insert.new.bytes(9), None);
    assert_eq!(insert.new.get(9), None);
}

#[test]
fn stream_abort_v4_carries_abort_lsn_and_time_only_when_sent() {
    let parallel = Payload::tag(b'A')
        .u32(900)
        .u32(901)
        .u64(0x16_B374_D848)
        .u64(1_000_000)
        .done();
    let mut decoder = Decoder::new(4);
    assert_eq!(
        decoder.decode(parallel.clone()).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 900,
            subxid: 901,
            abort_lsn: Some("16/B374D848".parse().unwrap()),
            abort_time: Some(PgTimestamp(1_000_000)),
        })
    );
    // Protocol 4 with `streaming 'on'` (not parallel) sends the short form.
    let short = Payload::tag(b'A').u32(900).u32(900).done();
    let LogicalMessage::StreamAbort(abort) = decoder.decode(short.clone()).unwrap() else {
        panic!()
    };
    assert_eq!((abort.abort_lsn, abort.abort_time), (None, None));
    // Before protocol 4 the extra 16 bytes are not part of the layout.
    let error = decode(3, parallel).unwrap_err();
    assert_eq!(error.kind(), "Stream Abort");
    assert_eq!(error.offset(), 9);
    // A half-sent abort LSN is truncation, not the short form.
    let truncated = Payload::tag(b'A').u32(1).u32(1).u32(7).done();
    assert_eq!(decode(4, truncated).unwrap_err().offset(), 9);
}

#[test]
fn streamed_block_changes_carry_the_xid() {
    let mut decoder = Decoder::new(2);
    let start = Payload::tag(b'S').u32(750).u8(1).done();
    assert_eq!(
        decoder.decode(start).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid: 750,
            first_segment: true
        })
    );
    assert!(decoder.in_stream());
    let insert = Payload::tag(b'I')
        .u32(751)
        .u32(16384)
        .u8(b'N')
        .u16(1)
        .text("1")
        .done();
    let LogicalMessage::Insert(insert) = decoder.decode(insert.clone()).unwrap() else {
        panic!()
    };
    assert_eq!(insert.xid, Some(751));
    assert_eq!(insert.relation_oid, 16384);
    let truncate = Payload::tag(b'T')
        .u32(750)
        .u32(2)
        .u8(3)
        .u32(10)
        .u32(11)
        .done();
    assert_eq!(
        decoder.decode(truncate).unwrap(),
        LogicalMessage::Truncate(Truncate {
            xid: Some(750),
            cascade: true,
            restart_identity: true,
            relation_oids: vec![10, 11],
        })
    );
    assert_eq!(
        decoder.decode(Payload::tag(b'E').done()).unwrap(),
        LogicalMessage::StreamStop
    );
    assert!(!decoder.in_stream());
    // Outside the block the same bytes would be read without an xid, and no longer fit.
    let outside = Payload::tag(b'I')
        .u32(16384)
        .u8(b'N')
        .u16(1)
        .text("1")
        .done();
    assert!(decoder.decode(outside).is_ok());
}

#[test]
fn stream_block_nesting_is_checked_and_failures_keep_the_state() {
    let mut decoder = Decoder::new(2);
    assert!(decoder.decode(Payload::tag(b'E').done()).is_err());
    // A truncated Stream Start must not put the decoder into a block.
    assert!(decoder.decode(Payload::tag(b'S').u32(1).done()).is_err());
    assert!(!decoder.in_stream());
    decoder
        .decode(Payload::tag(b'S').u32(1).u8(0).done())
        .unwrap();
    let again = decoder
        .decode(Payload::tag(b'S').u32(1).u8(0).done())
        .unwrap_err();
    assert!(
        again.reason().contains("inside a streamed block"),
        "{again}"
    );
    assert!(decoder.in_stream());
}

#[test]
fn protocol_version_gates_stream_and_two_phase_messages() {
    let start = Payload::tag(b'S').u32(1).u8(1).done();
    let error = decode(1, start).unwrap_err();
    assert_eq!(
        error.to_string(),
        "Malformed pgoutput Stream Start message at byte 0: this message needs protocol \
         version 2, the stream uses 1"
    );
    let begin_prepare = Payload::tag(b'b')
        .u64(1)
        .u64(2)
        .u64(3)
        .u32(4)
        .str("gid")
        .done();
    assert!(decode(2, begin_prepare.clone()).is_err());
    assert_eq!(
        decode(3, begin_prepare).unwrap(),
        LogicalMessage::BeginPrepare(BeginPrepare {
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time: PgTimestamp(3),
            xid: 4,
            gid: "gid".into(),
        })
    );
}

#[test]
fn errors_name_kind_offset_and_reason() {
    let cases: Vec<(Bytes, &str)> =
        vec![
        (Bytes::new(), "Malformed pgoutput message at byte 0: empty payload"),
        (
            Payload::tag(b'Z').done(),
            "Malformed pgoutput message at byte 0: unknown message tag 'Z' (0x5A)",
        ),
        (
            Payload::tag(b'U').u32(1).u8(b'N').u16(70).u32(7).raw(&[1; 8]).done(),
            "Malformed pgoutput Update message at byte 6: tuple column count 70 exceeds \
             the remaining 12 bytes",
        ),
        (
            Payload::tag(b'B').u64(1).done(),
            "Malformed pgoutput Begin message at byte 9: truncated: commit timestamp needs 8 \
             bytes, 0 remain",
        ),
        (
            Payload::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(100).raw(b"ab").done(),
            "Malformed pgoutput Insert message at byte 13: tuple value of 100 bytes exceeds \
             the remaining 2 bytes",
        ),
        (
            Payload::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).done(),
            "Malformed pgoutput Insert message at byte 9: negative value length -1 for column 0",
        ),
        (
            Payload::tag(b'I').u32(1).u8(b'X').done(),
            "Malformed pgoutput Insert message at byte 5: expected new tuple marker 'N', \
             found 'X' (0x58)",
        ),
        (
            Payload::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'q').done(),
            "Malformed pgoutput Insert message at byte 8: unknown tuple value kind 'q' (0x71) \
             for column 0",
        ),
        (
            Payload::tag(b'O').u64(1).raw(b"origin").done(),
            "Malformed pgoutput Origin message at byte 9: origin name has no NUL terminator \
             in the remaining 6 bytes",
        ),
        (
            Payload::tag(b'Y').u32(1).raw(b"ok\0bad\xFF\0").done(),
            "Malformed pgoutput Type message at byte 11: type name is not valid UTF-8",
        ),
        (
            Payload::tag(b'T').u32(u32::MAX).u8(0).u32(1).done(),
            "Malformed pgoutput Truncate message at byte 1: relation count 4294967295 \
             exceeds the remaining 4 bytes",
        ),
        (
            Payload::tag(b'R').u32(1).str("public").str("t").u8(b'd').u16(60000).done(),
            "Malformed pgoutput Relation message at byte 15: column count 60000 exceeds the \
             remaining 0 bytes",
        ),
        (
            Payload::tag(b'R').u32(1).str("public").str("t").u8(b'x').u16(0).done(),
            "Malformed pgoutput Relation message at byte 14: unknown replica identity 'x' \
             (0x78)",
        ),
        (
            Payload::tag(b'D').u32(1).u8(b'N').done(),
            "Malformed pgoutput Delete message at byte 5: expected old tuple marker 'K' or \
             'O', found 'N' (0x4E)",
        ),
        (
            Payload::tag(b'U').u32(1).u8(b'K').u16(0).u8(b'K').done(),
            "Malformed pgoutput Update message at byte 8: expected tuple marker 'N', found \
             'K' (0x4B)",
        ),
        (
            Payload::tag(b'C').u8(0).u64(1).u64(2).u64(3).u8(9).done(),
            "Malformed pgoutput Commit message at byte 26: 1 unexpected trailing bytes after \
             the message",
        ),
        (
            Payload::tag(b'M').u8(1).u64(5).str("p").i32(-5).done(),
            "Malformed pgoutput Message message at byte 12: negative content length -5",
        ),
    ];
    for (payload, expected) in cases {
        let error = decode(3, payload.clone()).unwrap_err();
        assert_eq!(error.to_string(), expected, "payload {payload:?}");
    }
}

#[test]
fn timestamps_convert_before_and_after_1970() {
    use std::time::{Duration, UNIX_EPOCH};
    assert_eq!(
        PgTimestamp(0).to_system_time(),
        UNIX_EPOCH + Duration::from_secs(946_684_800)
    );
    // 1969-12-31 23:59:59.5 UTC
    let before = PgTimestamp(-946_684_800_000_000 - 500_000);
    assert_eq!(
        before.to_system_time(),
        UNIX_EPOCH - Duration::from_millis(500)
    );
    assert_eq!(before.unix_micros(), -500_000);
    assert_eq!(PgTimestamp::from_unix_micros(-500_000), before);
    // infinity and -infinity must not panic
    let _ = PgTimestamp(i64::MAX).to_system_time();
    let _ = PgTimestamp(i64::MIN).to_system_time();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(version in 1u32..=4, in_stream: bool, bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut decoder = Decoder::new(version);
        if in_stream && version >= 2 {
            decoder.decode(Payload::tag(b'S').u32(1).u8(1).done()).unwrap();
        }
        if let Err(error) = decoder.decode(Bytes::from(bytes.clone())) {
            prop_assert!(error.offset() <= bytes.len());
            prop_assert!(error.to_string().starts_with("Malformed pgoutput "));
        }
    }

    #[test]
    fn random_bodies_after_every_tag_never_panic(
        tag in proptest::sample::select(b"BCORYIUDTMSEcAbPKrpZ".to_vec()),
        body in proptest::collection::vec(any::<u8>(), 0..96),
    ) {
        let mut payload = vec![tag];
        payload.extend_from_slice(&body);
        for version in 1..=4 {
            let _ = Decoder::new(version).decode(Bytes::from(payload.clone()));
        }
    }

    #[test]
    fn well_formed_tuples_round_trip(values in proptest::collection::vec(
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)), 0..50)) {
        let mut payload = Payload::tag(b'I').u32(7).u8(b'N').u16(values.len() as u16);
        for value in &values {
            payload = match value {
                None => payload.u8(b'n'),
                Some(bytes) => payload.u8(b'b').i32(bytes.len() as i32).raw(bytes),
            };
        }
        let LogicalMessage::Insert(insert) = decode(1, payload.done()).unwrap() else {
            panic!()
        };
        prop_assert_eq!(insert.new.len(), values.len());
        for (i, value) in values.iter().enumerate() {
            match value {
                None => prop_assert_eq!(insert.new.get(i), Some(Value::Null)),
                Some(bytes) => prop_assert_eq!(insert.new.get(i), Some(Value::Binary(bytes))),
            }
        }
    }
}
