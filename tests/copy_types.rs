//! Every type family arrives value for value, whichever COPY format the table gets: built-in
//! types go binary, user types (enum, domain, composite, arrays of them) go as text. Also an
//! empty table, a table without a primary key, a target whose column order differs, a
//! target that refuses rows that are already there, and a split table without a key.

use sluice::checkpoint::Store;
use sluice::snapshot::{initial_copy, plan, state};

use crate::copy_common::{start_pair, table};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE SCHEMA "Odd Schema";
CREATE TABLE builtin (
    id int8 PRIMARY KEY, n numeric(30,10), f8 float8, f4 real, i2 int2, i4 int4, t text,
    vc varchar(20), ch char(3), b bytea, j json, jb jsonb, ia int4[], ta text[], na numeric[],
    r int4range, tr tstzrange, ts timestamp, tz timestamptz, d date, tm time, iv interval,
    u uuid, ip inet, cd cidr, mac macaddr, bo bool, bits varbit, pt point, x xml, m money
);
CREATE TABLE usertypes (id int8 PRIMARY KEY, m mood, ma mood[], d posint, c pair, ca pair[]);
CREATE TABLE nopk (a int, b text);
CREATE TABLE empty (id int PRIMARY KEY, v text);
CREATE TABLE "Odd Schema"."Mixed ""Case""" (id int PRIMARY KEY, "Value" text);
CREATE TABLE parts (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu');
CREATE TABLE parts_us PARTITION OF parts FOR VALUES IN ('us');
CREATE TABLE nocolumns ();
CREATE TABLE catalog_refs (id int PRIMARY KEY, rc regclass, rt regtype, rcs regclass[], rn regnamespace, acl aclitem[]);
CREATE TABLE parent (id int PRIMARY KEY, v text);
CREATE TABLE child (extra text) INHERITS (parent);
"#;

const BUILTIN_ROWS: &str = r#"
INSERT INTO builtin VALUES
 (1, 12345678901234567890.0123456789, 'NaN', '-Infinity', -32768, 2147483647,
  E'tab\there\nnewline \\ backslash ''quote'' ünïcödé 🐘', 'short', 'ab', '\x00ff10'::bytea,
  '{"a": [1, 2.50, null]}', '{"b": {"c": true}}', '{1,NULL,3}', '{"x y","",NULL,"q\"uote"}',
  '{1.5,NaN}', '[1,10)', '[2026-01-01 00:00+00,infinity)', '2026-11-21 12:34:56.789012',
  '2026-11-21 12:34:56.789012+05:30', '4713-01-01 BC', '23:59:59.999999',
  '1 year 2 mons -3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '::1/128',
  '10.0.0.0/8', '08:00:2b:01:02:03', true, B'10101', '(1.5,-2)', '<a>x</a>', '12.34'),
 (2, -0.0000000001, '-0', 'Infinity', 0, 0, '', NULL, NULL, ''::bytea, 'null', '[]', '{}',
  '{}', NULL, 'empty', NULL, 'infinity', '-infinity', 'infinity', '00:00', '0', NULL,
  '0.0.0.0', NULL, NULL, false, B'', NULL, NULL, NULL),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO builtin (id, n, f8, t, b, tz, ia)
  SELECT g, g / 7.0, g * 1.1, repeat('x', g % 300), decode(md5(g::text), 'hex'),
         '2026-01-01'::timestamptz + g * interval '1 minute', ARRAY[g, -g]
  FROM generate_series(10, 5000) g;
INSERT INTO usertypes VALUES
 (1, 'happy', '{sad,ok}', 5, ROW(1, 'one'), ARRAY[ROW(2, 'two')::pair, ROW(NULL, 'a,"b"')::pair]),
 (2, NULL, '{}', NULL, ROW(NULL, NULL), NULL),
 (3, 'sad', NULL, 1, NULL, '{}');
INSERT INTO nopk SELECT g % 10, 'dup' FROM generate_series(1, 3000) g;
INSERT INTO nopk VALUES (NULL, NULL), (NULL, NULL);
INSERT INTO "Odd Schema"."Mixed ""Case""" VALUES (1, 'odd');
INSERT INTO parts SELECT g, CASE WHEN g % 3 = 0 THEN 'eu' ELSE 'us' END, 'p' || g FROM generate_series(1, 3000) g;
INSERT INTO nocolumns SELECT FROM generate_series(1, 7);
INSERT INTO catalog_refs VALUES
 (1, 'builtin', 'mood', '{builtin,usertypes,"\"Odd Schema\".\"Mixed \"\"Case\"\"\""}', '"Odd Schema"',
  ARRAY[makeaclitem(0, (SELECT oid FROM pg_roles WHERE rolname = current_user), 'SELECT', false)]),
 (2, NULL, NULL, NULL, NULL, NULL);
INSERT INTO parent VALUES (1, 'parent row');
INSERT INTO child VALUES (2, 'child row', 'extra');
"#;

const BUILTIN_COLUMNS: &str = "id, n, f8, f4, i2, i4, t, vc, ch, b, j::text, jb, ia, ta, na, r, tr, ts, tz, d, tm, iv, u, ip, cd, mac, bo, bits, pt::text, x::text, m";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_type_family_arrives_value_for_value() {
    let pair = start_pair().await;
    pair.src.batch_execute(SCHEMA).await.unwrap();
    // The target: same tables, but `usertypes` and `nopk` with their columns in another
    // order, and a different time zone (timestamptz must not shift).
    let target_schema = SCHEMA
        .replace(
            "CREATE TABLE usertypes (id int8 PRIMARY KEY, m mood, ma mood[], d posint, c pair, ca pair[]);",
            "CREATE TABLE usertypes (ca pair[], c pair, d posint, ma mood[], m mood, id int8 PRIMARY KEY);",
        )
        .replace("CREATE TABLE nopk (a int, b text);", "CREATE TABLE nopk (b text, a int);");
    // Objects the source does not have, so every later object's OID differs from the
    // source's: a reg* value copied as a raw OID would name something else, or nothing.
    let target_schema = format!(
        "CREATE TABLE oid_shift (a int); CREATE TYPE oid_shift_type AS (a int); {target_schema}"
    );
    pair.dst.batch_execute(&target_schema).await.unwrap();
    pair.dst
        .batch_execute("ALTER DATABASE app SET timezone = 'Asia/Kolkata'")
        .await
        .unwrap();
    pair.src
        .batch_execute(&format!("{BUILTIN_ROWS}; ANALYZE"))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Small enough a threshold that `nopk` (no key at all) is split by ctid too.
    let mut ctx = pair
        .context(pair.config(3, "64kB", dir.path()), &store)
        .await;
    // The terminal display code runs too (indicatif hides it when stderr is no terminal).
    ctx.progress = true;
    // The format each table gets: binary only where every column is a built-in type.
    for (name, binary) in [
        ("public.builtin", true),
        ("public.usertypes", false),
        ("public.nopk", true),
        // Built in, but reg* values are OIDs in binary (cluster-specific), and aclitem has
        // no binary form at all.
        ("public.catalog_refs", false),
    ] {
        let layout = plan::table_layout(&pair.src, &pair.dst, table(&ctx.tables, name))
            .await
            .unwrap();
        assert_eq!(layout.binary, binary, "{name}");
    }
    let outcome = initial_copy(&ctx).await.expect("initial copy");
    assert_eq!(outcome.tables_copied, 10);

    pair.assert_same("builtin", BUILTIN_COLUMNS).await;
    pair.assert_same("usertypes", "id, m, ma, d, c, ca").await;
    pair.assert_same("nopk", "a, b").await;
    pair.assert_same("empty", "id, v").await;
    pair.assert_same(r#""Odd Schema"."Mixed ""Case""""#, r#"id, "Value""#)
        .await;
    // A partitioned table through its root, into the target's partitions.
    pair.assert_same("parts", "id, region, v").await;
    pair.assert_same("parts_eu", "id, region, v").await;
    // Inheritance: the parent's own rows once, the child's rows once (ONLY on both).
    pair.assert_same("ONLY parent", "id, v").await;
    pair.assert_same("child", "id, v, extra").await;
    pair.assert_same("nocolumns", "1").await;
    pair.assert_same(
        "catalog_refs",
        "id, rc::text, rt::text, rcs::text, rn::text, acl::text",
    )
    .await;
    // Spot checks that a digest of text forms could not hide.
    let row = pair
        .dst
        .query_one(
            "SELECT f8::text, tz = '2026-11-21 07:04:56.789012+00', t, b FROM builtin WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "NaN");
    assert!(row.get::<_, bool>(1), "timestamptz kept its instant");
    assert!(row.get::<_, String>(2).contains("🐘"));
    assert_eq!(row.get::<_, Vec<u8>>(3), vec![0x00, 0xff, 0x10]);

    let records = state::load_tables(&store).unwrap();
    let nopk = records.iter().find(|r| r.name.name == "nopk").unwrap();
    assert!(nopk.chunks.len() > 1, "nopk is split");
    assert_eq!(nopk.rows, 3002);
    let empty = records.iter().find(|r| r.name.name == "empty").unwrap();
    assert!(empty.finished && empty.rows == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_table_that_already_holds_rows_is_refused() {
    let pair = start_pair().await;
    pair.schema("CREATE TABLE t (id int PRIMARY KEY)").await;
    pair.src
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    pair.dst
        .batch_execute("INSERT INTO t VALUES (99)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(1, "10GB", dir.path()), &store)
        .await;
    let error = initial_copy(&ctx).await.unwrap_err().to_string();
    assert!(
        error.contains("already hold rows on the target: public.t") && error.contains("TRUNCATE"),
        "{error}"
    );
    // Nothing of the operator's was touched.
    let kept: i32 = pair
        .dst
        .query_one("SELECT id FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_target_refuses_stops_the_copy_naming_the_table() {
    let pair = start_pair().await;
    pair.src
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t VALUES (1, '12'), (2, 'not a number');",
        )
        .await
        .unwrap();
    pair.dst
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = pair
        .context(pair.config(1, "10GB", dir.path()), &store)
        .await;
    let started = std::time::Instant::now();
    let error = initial_copy(&ctx).await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("Copying public.t: writing to the target")
            && text.contains("compare the table's column types with the source's"),
        "{text}"
    );
    assert_eq!(error.kind(), sluice::ErrorKind::Definite);
    // Refused at once, not retried: retrying cannot change the value.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let rows: i64 = pair
        .dst
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the failed chunk left nothing behind");
    assert!(!sluice::snapshot::copy_finished(&store).unwrap());
}

/// Row-level security on the source filters what a COPY reads for a user that is not
/// exempt, while the stream is not filtered: the target would lack the hidden rows for
/// good. The copy refuses such a table instead, `check` says so first, and once the user
/// may bypass the policies every row is copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_never_hides_rows_from_the_copy() {
    let pair = start_pair().await;
    pair.schema("CREATE TABLE guarded (id int PRIMARY KEY, v text);")
        .await;
    pair.src
        .batch_execute(
            "CREATE ROLE reader LOGIN REPLICATION;
             INSERT INTO guarded SELECT g, 'row ' || g FROM generate_series(1, 20) g;
             ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;
             CREATE POLICY only_some ON guarded USING (id < 10);
             GRANT SELECT ON guarded TO reader;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[source]\nurl = \"postgresql://reader@127.0.0.1:{}/app\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n",
        pair.source.port,
        pair.target.url("app"),
        dir.path().join("state").display()
    );
    let config_path = dir.path().join("sluice.toml");
    std::fs::write(&config_path, &text).unwrap();

    let (code, stdout, _) =
        crate::support::sluice::sluice(&["check", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL")
            && l.contains("public.guarded has row-level security that applies to reader")
            && l.contains("ALTER ROLE \"reader\" BYPASSRLS")),
        "{stdout}"
    );

    let config =
        sluice::config::Config::parse(&text, "test", &sluice::config::Overrides::default())
            .unwrap();
    let store = Store::open(&config.state.dir).unwrap();
    let ctx = pair.context(config.clone(), &store).await;
    let error = initial_copy(&ctx).await.unwrap_err().report();
    assert!(
        error.contains("public.guarded") && error.contains("BYPASSRLS"),
        "{error}"
    );
    let on_target: i64 = pair
        .dst
        .query_one("SELECT count(*) FROM guarded", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_target, 0, "no part of the table was copied");

    pair.src
        .batch_execute("ALTER ROLE reader BYPASSRLS")
        .await
        .unwrap();
    let ctx = pair.context(config, &store).await;
    initial_copy(&ctx)
        .await
        .expect("copy once the policies are bypassed");
    pair.assert_same("guarded", "id, v").await;

    // The same on the target side: policies that apply to the target user would stop the
    // copy's COPY FROM and stall apply; `check` names the table and the fix.
    pair.dst
        .batch_execute(
            "CREATE ROLE writer LOGIN;
             ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;
             GRANT ALL ON guarded TO writer;",
        )
        .await
        .unwrap();
    let text = text.replace(
        &pair.target.url("app"),
        &format!("postgresql://writer@127.0.0.1:{}/app", pair.target.port),
    );
    std::fs::write(&config_path, &text).unwrap();
    let (code, stdout, _) =
        crate::support::sluice::sluice(&["check", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL")
            && l.contains(
                "target: table public.guarded has row-level security that applies to writer"
            )),
        "{stdout}"
    );
}

/// SELECT on a table without USAGE on its schema: `check` said the table was readable and
/// the copy failed with PostgreSQL's bare "permission denied for schema". Both name the
/// GRANT now, and with it the copy goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_schema_without_usage_is_named_with_its_grant() {
    let pair = start_pair().await;
    pair.schema("CREATE SCHEMA sales; CREATE TABLE sales.items (id int PRIMARY KEY);")
        .await;
    pair.src
        .batch_execute(
            "CREATE ROLE reader LOGIN REPLICATION;
             INSERT INTO sales.items SELECT generate_series(1, 20);
             GRANT SELECT ON sales.items TO reader;
             CREATE PUBLICATION sluice FOR ALL TABLES;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[source]\nurl = \"postgresql://reader@127.0.0.1:{}/app\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n",
        pair.source.port,
        pair.target.url("app"),
        dir.path().join("state").display()
    );
    let config_path = dir.path().join("sluice.toml");
    std::fs::write(&config_path, &text).unwrap();
    let (code, stdout, _) =
        crate::support::sluice::sluice(&["check", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL")
            && l.contains("schema sales is not usable by this user")
            && l.contains("GRANT USAGE ON SCHEMA \"sales\"")),
        "{stdout}"
    );
    assert!(!stdout.contains("may read all"), "{stdout}");

    let config =
        sluice::config::Config::parse(&text, "test", &sluice::config::Overrides::default())
            .unwrap();
    let store = Store::open(&config.state.dir).unwrap();
    let ctx = pair.context(config.clone(), &store).await;
    let error = initial_copy(&ctx).await.unwrap_err().report();
    assert!(
        error.contains("sales.items") && error.contains("GRANT USAGE ON SCHEMA"),
        "{error}"
    );
    pair.src
        .batch_execute("GRANT USAGE ON SCHEMA sales TO reader")
        .await
        .unwrap();
    let ctx = pair.context(config, &store).await;
    initial_copy(&ctx).await.unwrap();
    let on_target: i64 = pair
        .dst
        .query_one("SELECT count(*) FROM sales.items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_target, 20);
}
