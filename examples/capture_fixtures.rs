//! Captures raw pgoutput payloads from a real PostgreSQL into `proto/fixtures/`.
//!
//! ```text
//! cargo run --example capture_fixtures            # writes proto/fixtures/*.bin and MANIFEST.md
//! ```
//!
//! Each scenario gets its own slot, created after the scenario's DDL and before its
//! transactions, so the slot sees exactly those transactions. The payloads are read with
//! `pg_logical_slot_peek_binary_changes`, which runs the same pgoutput code as a walsender but
//! accepts any option set (protocol 2 and 3, streaming, two-phase), unlike the replication
//! client we use in production (protocol 1 only).
//!
//! File format (`<scenario>.bin`), repeated until the end of the file, big-endian:
//! `u64 lsn | u32 xid | u32 length | payload[length]`, where `lsn` and `xid` are the `lsn`
//! and `xid` columns the SQL function returned next to the payload.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cluster::PgCluster;

struct Scenario {
    name: &'static str,
    about: &'static str,
    protocol: u32,
    /// pgoutput options beyond `proto_version` and `publication_names`.
    options: &'static [(&'static str, &'static str)],
    two_phase_slot: bool,
    /// Run before the slot exists: not part of the capture.
    setup: &'static str,
    /// Each entry is one `batch_execute` on the same session (one transaction unless it
    /// says otherwise).
    transactions: &'static [&'static str],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "v1_text_changes",
        about: "Protocol 1, text values: insert (NULLs, numeric, timestamptz, array), update of non-key columns (no old tuple), primary-key change (K tuple), delete (K tuple).",
        protocol: 1,
        options: &[],
        two_phase_slot: false,
        setup: "CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2), \
                note text, created timestamptz, tags text[])",
        transactions: &[
            "INSERT INTO orders VALUES (1, 'alice', 12.50, NULL, '2026-11-21 10:00:00+00', '{a,b}'), \
             (2, 'bob', 99.99, 'first \"quoted\" note', '1999-12-31 23:59:59.5+00', NULL)",
            "UPDATE orders SET amount = 13.75, note = 'paid' WHERE id = 1",
            "UPDATE orders SET id = 10 WHERE id = 2",
            "DELETE FROM orders WHERE id = 10",
        ],
    },
    Scenario {
        name: "v1_binary_values",
        about: "Protocol 1 with binary 'true': values in each type's binary send format.",
        protocol: 1,
        options: &[("binary", "true")],
        two_phase_slot: false,
        setup: "CREATE TABLE typed (id int4 PRIMARY KEY, big int8, flag bool, label text, payload bytea, \
                ratio float8, at timestamptz, uid uuid, gone text)",
        transactions: &[
            "INSERT INTO typed VALUES (42, -2, true, 'héllo', '\\xdeadbeef', 1.5, \
             '2000-01-01 00:00:01+00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', NULL)",
            "UPDATE typed SET flag = false WHERE id = 42",
        ],
    },
    Scenario {
        name: "v1_replica_identities",
        about: "REPLICA IDENTITY FULL without a primary key (O tuples, every column a key), USING INDEX (K tuple of the index columns), NOTHING.",
        protocol: 1,
        options: &[],
        two_phase_slot: false,
        setup: "CREATE TABLE events (kind text, payload text); \
                ALTER TABLE events REPLICA IDENTITY FULL; \
                CREATE TABLE accounts (id int NOT NULL, email text NOT NULL, balance int); \
                CREATE UNIQUE INDEX accounts_email ON accounts (email); \
                ALTER TABLE accounts REPLICA IDENTITY USING INDEX accounts_email; \
                CREATE TABLE blind (id int); \
                ALTER TABLE blind REPLICA IDENTITY NOTHING",
        transactions: &[
            "INSERT INTO events VALUES ('click', 'a'), ('view', NULL)",
            "UPDATE events SET payload = 'b' WHERE kind = 'click'",
            "DELETE FROM events WHERE kind = 'view'",
            "INSERT INTO accounts VALUES (1, 'a@example.com', 10)",
            "UPDATE accounts SET email = 'b@example.com', balance = 20 WHERE id = 1",
            "DELETE FROM accounts WHERE id = 1",
            "INSERT INTO blind VALUES (7)",
        ],
    },
    Scenario {
        name: "v1_unchanged_toast",
        about: "An out-of-line TOASTed column left alone by updates arrives as 'u'; a key change adds a K tuple.",
        protocol: 1,
        options: &[],
        two_phase_slot: false,
        setup: "CREATE TABLE docs (id int PRIMARY KEY, title text, body text); \
                ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
        transactions: &[
            "INSERT INTO docs VALUES (1, 'draft', repeat('toast!', 500))",
            "UPDATE docs SET title = 'final' WHERE id = 1",
            "UPDATE docs SET id = 2 WHERE id = 1",
        ],
    },
    Scenario {
        name: "v1_types",
        about: "Enum, enum array and domain columns: one Type message per non-built-in type, before the Relation.",
        protocol: 1,
        options: &[],
        two_phase_slot: false,
        setup: "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); \
                CREATE DOMAIN positive AS int CHECK (VALUE > 0); \
                CREATE TABLE diary (id int PRIMARY KEY, today mood, history mood[], score positive)",
        transactions: &["INSERT INTO diary VALUES (1, 'happy', '{sad,ok}', 7)"],
    },
    Scenario {
        name: "v1_truncate",
        about: "TRUNCATE with CASCADE (flag 1), RESTART IDENTITY (flag 2), both, and neither.",
        protocol: 1,
        options: &[],
        two_phase_slot: false,
        setup: "CREATE TABLE parent (id serial PRIMARY KEY); \
                CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent); \
                CREATE TABLE solo (id int)",
        transactions: &[
            "TRUNCATE parent CASCADE",
            "TRUNCATE solo RESTART IDENTITY",
            "TRUNCATE solo, parent RESTART IDENTITY CASCADE",
            "TRUNCATE solo",
        ],
    },
    Scenario {
        name: "v1_messages",
        about: "messages 'true': a non-transactional message on its own, then a transaction emitting a transactional (binary content) and a non-transactional message; the latter arrives before that transaction's Begin.",
        protocol: 1,
        options: &[("messages", "true")],
        two_phase_slot: false,
        setup: "CREATE TABLE notes (id int PRIMARY KEY)",
        transactions: &[
            "SELECT pg_logical_emit_message(false, 'sluice.fixture', 'outside a transaction')",
            "BEGIN; INSERT INTO notes VALUES (1); \
             SELECT pg_logical_emit_message(true, 'sluice.fixture', '\\x00ff'::bytea); \
             SELECT pg_logical_emit_message(false, 'sluice.nontx', 'emitted mid-transaction'); \
             COMMIT",
        ],
    },
    Scenario {
        name: "v1_origin",
        about: "A transaction replayed under a replication origin (origin LSN 0/ABCDEF, origin commit time 2026-11-21 12:00:00 UTC): Begin, Origin, ..., Commit.",
        protocol: 1,
        options: &[],
        two_phase_slot: false,
        setup: "SELECT pg_replication_origin_create('fixture_origin'); \
                CREATE TABLE replicated (id int PRIMARY KEY)",
        transactions: &[
            "SELECT pg_replication_origin_session_setup('fixture_origin')",
            "BEGIN; \
             SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2026-11-21 12:00:00+00'); \
             INSERT INTO replicated VALUES (1); \
             COMMIT",
            "SELECT pg_replication_origin_session_reset()",
        ],
    },
    Scenario {
        name: "v2_streaming",
        about: "Protocol 2, streaming 'on', logical_decoding_work_mem 64kB. A committed transaction larger than that (streamed in segments, with a rolled-back savepoint, a released savepoint, update, delete, truncate and a transactional message inside the stream) and a rolled-back streamed transaction.",
        protocol: 2,
        options: &[("streaming", "on"), ("messages", "true")],
        two_phase_slot: false,
        setup: "CREATE TYPE level AS ENUM ('low', 'high'); \
                CREATE TABLE bulk (id int PRIMARY KEY, lvl level, filler text); \
                CREATE TABLE scratch (id int)",
        transactions: &[
            "BEGIN; \
             INSERT INTO bulk SELECT g, 'low', 'r' || g FROM generate_series(1, 600) g; \
             SAVEPOINT a; \
             INSERT INTO bulk SELECT g, 'high', 'undone' FROM generate_series(601, 1200) g; \
             ROLLBACK TO SAVEPOINT a; \
             SAVEPOINT b; \
             INSERT INTO bulk VALUES (2000, 'high', 'in a subtransaction'); \
             RELEASE SAVEPOINT b; \
             UPDATE bulk SET filler = 'updated' WHERE id = 1; \
             DELETE FROM bulk WHERE id = 2; \
             TRUNCATE scratch; \
             SELECT pg_logical_emit_message(true, 'sluice.stream', 'inside a streamed transaction'); \
             COMMIT",
            "BEGIN; \
             INSERT INTO bulk SELECT g, 'low', 'rolled back' FROM generate_series(5001, 5600) g; \
             ROLLBACK",
        ],
    },
    Scenario {
        name: "v3_two_phase",
        about: "Protocol 3, two_phase 'on' (slot created with two_phase), streaming 'on': PREPARE + COMMIT PREPARED, PREPARE + ROLLBACK PREPARED, and a prepared transaction large enough to be streamed (Stream Prepare).",
        protocol: 3,
        options: &[("two_phase", "on"), ("streaming", "on")],
        two_phase_slot: true,
        setup: "CREATE TABLE ledger (id int PRIMARY KEY, amount int)",
        transactions: &[
            "BEGIN; INSERT INTO ledger VALUES (1, 100); PREPARE TRANSACTION 'fx_commit'",
            "COMMIT PREPARED 'fx_commit'",
            "BEGIN; INSERT INTO ledger VALUES (2, 200); PREPARE TRANSACTION 'fx_rollback'",
            "ROLLBACK PREPARED 'fx_rollback'",
            "BEGIN; INSERT INTO ledger SELECT g, g FROM generate_series(1000, 1599) g; \
             PREPARE TRANSACTION 'fx_streamed'",
            "COMMIT PREPARED 'fx_streamed'",
        ],
    },
];

struct Frame {
    lsn: u64,
    xid: u32,
    payload: Vec<u8>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/fixtures"));
    for (name, count) in capture_all(&out).await {
        println!("{name}: {count} messages");
    }
}

/// Starts a cluster, runs every scenario and writes its `.bin`, the synthetic fixture and
/// MANIFEST.md into `out`. Also used by `tests/decode_fixtures.rs` to check that a fresh
/// capture still matches the committed files.
pub async fn capture_all(out: &Path) -> Vec<(&'static str, usize)> {
    std::fs::create_dir_all(out).expect("create the fixtures directory");
    let (pg, client) = PgCluster::start_with_client().await;
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    // Text output depends on the decoding session's settings: pin them like a subscriber.
    client
        .batch_execute(
            "SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3; \
             SET timezone = 'UTC'; CREATE PUBLICATION p FOR ALL TABLES",
        )
        .await
        .unwrap();

    let mut manifest = String::new();
    writeln!(
        manifest,
        "# Captured pgoutput fixtures\n\n\
         Generated by `cargo run --example capture_fixtures` against PostgreSQL {version} \
         (`logical_decoding_work_mem = 64kB`, publication `p` FOR ALL TABLES, text output with \
         `datestyle ISO`, `timezone UTC`, `extra_float_digits 3`). Do not edit by hand; the \
         format is described in `proto/README.md`.\n"
    )
    .unwrap();

    let mut counts = Vec::new();
    for scenario in SCENARIOS {
        let frames = capture(&client, scenario).await;
        write_frames(&out.join(format!("{}.bin", scenario.name)), &frames);
        describe(&mut manifest, scenario, &frames);
        counts.push((scenario.name, frames.len()));
    }

    let synthetic = synthetic_v4_stream_abort();
    write_frames(&out.join("v4_stream_abort_synthetic.bin"), &synthetic);
    writeln!(
        manifest,
        "## v4_stream_abort_synthetic (SYNTHETIC, not captured)\n\n\
         PostgreSQL 15 accepts protocol versions up to 3, so the protocol 4 Stream Abort with \
         abort LSN and abort time (sent with `streaming 'parallel'`, PostgreSQL 16+) was built \
         by hand from the documented layout. Frame 0: the long form (xid 1234, subxid 1235, \
         abort LSN 0/1A2B3C4D, abort time 2026-11-21 12:00:00 UTC). Frame 1: the short form \
         protocol 4 sends with `streaming 'on'` (xid 1234, subxid 1234). The frames' lsn and \
         xid fields are 0.\n"
    )
    .unwrap();
    std::fs::write(out.join("MANIFEST.md"), manifest).unwrap();
    drop(pg);
    counts
}

async fn capture(client: &tokio_postgres::Client, scenario: &Scenario) -> Vec<Frame> {
    let slot = format!("fx_{}", scenario.name);
    client.batch_execute(scenario.setup).await.unwrap();
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, $2)",
            &[&slot, &scenario.two_phase_slot],
        )
        .await
        .unwrap();
    for sql in scenario.transactions {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", scenario.name));
    }
    // Aborts are not flushed when they are written, and the SQL interface decodes only up
    // to the flushed position: force a flush so a trailing ROLLBACK is part of the capture.
    client.batch_execute("CHECKPOINT").await.unwrap();
    let mut sql = format!(
        "SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_binary_changes(\
         '{slot}', NULL, NULL, 'proto_version', '{}', 'publication_names', 'p'",
        scenario.protocol
    );
    for (name, value) in scenario.options {
        write!(sql, ", '{name}', '{value}'").unwrap();
    }
    sql.push(')');
    let rows = client.query(&sql, &[]).await.unwrap();
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    rows.iter()
        .map(|row| Frame {
            lsn: row
                .get::<_, String>(0)
                .parse::<sluice::Lsn>()
                .expect("an LSN")
                .0,
            xid: u32::try_from(row.get::<_, Option<i64>>(1).unwrap_or(0)).expect("an xid"),
            payload: row.get(2),
        })
        .collect()
}

fn write_frames(path: &Path, frames: &[Frame]) {
    let mut bytes = Vec::new();
    for frame in frames {
        bytes.extend_from_slice(&frame.lsn.to_be_bytes());
        bytes.extend_from_slice(&frame.xid.to_be_bytes());
        bytes.extend_from_slice(&(frame.payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&frame.payload);
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn synthetic_v4_stream_abort() -> Vec<Frame> {
    // 2026-11-21 12:00:00 UTC in microseconds since 2000-01-01.
    let abort_time: i64 = (1_795_262_400 - 946_684_800) * 1_000_000;
    let mut long = vec![b'A'];
    long.extend_from_slice(&1234u32.to_be_bytes());
    long.extend_from_slice(&1235u32.to_be_bytes());
    long.extend_from_slice(&0x1A2B_3C4Du64.to_be_bytes());
    long.extend_from_slice(&abort_time.to_be_bytes());
    let mut short = vec![b'A'];
    short.extend_from_slice(&1234u32.to_be_bytes());
    short.extend_from_slice(&1234u32.to_be_bytes());
    [long, short]
        .into_iter()
        .map(|payload| Frame {
            lsn: 0,
            xid: 0,
            payload,
        })
        .collect()
}

fn describe(manifest: &mut String, scenario: &Scenario, frames: &[Frame]) {
    let options: Vec<String> = std::iter::once(format!("proto_version '{}'", scenario.protocol))
        .chain(scenario.options.iter().map(|(n, v)| format!("{n} '{v}'")))
        .collect();
    writeln!(
        manifest,
        "## {}\n\n{}\n\n- options: {}\n- slot two_phase: {}\n- setup (before the slot): `{}`\n- transactions, in order:",
        scenario.name,
        scenario.about,
        options.join(", "),
        scenario.two_phase_slot,
        squash(scenario.setup)
    )
    .unwrap();
    for sql in scenario.transactions {
        writeln!(manifest, "  - `{}`", squash(sql)).unwrap();
    }
    writeln!(
        manifest,
        "\n| frames | tag | lsn | xid |\n|---|---|---|---|"
    )
    .unwrap();
    // Runs of the same tag in one transaction collapse into one line (streams are long).
    let mut i = 0;
    while i < frames.len() {
        let tag = frames[i].payload.first().copied().unwrap_or(b'?');
        let mut j = i + 1;
        while j < frames.len()
            && frames[j].payload.first() == Some(&tag)
            && frames[j].xid == frames[i].xid
            && tag != b'S'
            && tag != b'E'
        {
            j += 1;
        }
        let range = if j - i == 1 {
            format!("{i}")
        } else {
            format!("{i}-{} ({}x)", j - 1, j - i)
        };
        writeln!(
            manifest,
            "| {range} | {} | {} | {} |",
            tag as char,
            sluice::Lsn(frames[i].lsn),
            frames[i].xid
        )
        .unwrap();
        i = j;
    }
    manifest.push('\n');
}

fn squash(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}
