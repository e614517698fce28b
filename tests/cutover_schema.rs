//! `sluice schema` into an empty target: types, enum, domain, serial, identity, a shared
//! sequence, a partitioned table; indexes, foreign keys and (with the copy on) primary keys
//! deferred and created later by `apply_deferred_ddl`, each tagged with the table whose copy
//! it waits for; existing tables left alone or recreated.

use crate::cutover_common::{show, stdout, Setup};
use crate::support::exists;

const SOURCE_SCHEMA: &str = "
    CREATE SCHEMA shop;
    CREATE TYPE shop.mood AS ENUM ('sad', 'ok', 'happy');
    CREATE DOMAIN public.posint AS int CHECK (VALUE > 0);
    CREATE TYPE public.pair AS (a int, b text);
    CREATE TYPE public.span AS RANGE (subtype = float8);
    CREATE SEQUENCE public.shared_seq START 1000;
    CREATE TABLE public.customers (
        id serial PRIMARY KEY,
        name text NOT NULL UNIQUE,
        moods shop.mood[],
        p pair
    );
    CREATE TABLE public.orders (
        id bigserial PRIMARY KEY,
        customer_id int REFERENCES public.customers (id),
        qty posint,
        during span,
        code bigint DEFAULT nextval('public.shared_seq'),
        note text,
        CHECK (code > 0)
    );
    CREATE INDEX orders_note_idx ON public.orders (note);
    CREATE TABLE public.items (
        id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        code bigint DEFAULT nextval('public.shared_seq')
    );
    CREATE TABLE public.events (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
    CREATE TABLE public.events_1 PARTITION OF public.events FOR VALUES FROM (0) TO (10);
    CREATE INDEX events_k_idx ON public.events (k);
    CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
    CREATE TRIGGER orders_touch BEFORE INSERT ON public.orders
        FOR EACH ROW EXECUTE FUNCTION public.touch();
    CREATE TABLE public.audit (x int PRIMARY KEY);
    CREATE TABLE public.audited (id int PRIMARY KEY, x int REFERENCES public.audit (x));
    INSERT INTO public.customers (name) VALUES ('ann');
    CREATE VIEW public.big_orders AS SELECT * FROM public.orders WHERE qty > 10;
    CREATE MATERIALIZED VIEW public.order_counts AS
        SELECT customer_id, count(*) FROM public.orders GROUP BY customer_id;
";

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn schema_into_an_empty_target_defers_indexes_and_foreign_keys() {
    let setup = Setup::new("[tables]\nexclude = [\"public.audit\"]\n").await;
    setup.source.batch_execute(SOURCE_SCHEMA).await.unwrap();

    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let out = stdout(&output);
    assert!(out.contains("CREATED TYPE shop.mood"), "{out}");
    assert!(out.contains("CREATED DOMAIN public.posint"), "{out}");
    assert!(
        out.contains("DEFERRED INDEX public.orders_note_idx"),
        "{out}"
    );
    assert!(
        out.contains("DEFERRED FK CONSTRAINT public.orders orders_customer_id_fkey"),
        "{out}"
    );
    assert!(out.contains("NOT COPIED trigger orders_touch"), "{out}");
    // Views are not tables and carry no rows of their own; the application may need them.
    assert!(
        out.contains("NOT COPIED view public.big_orders: it reads selected tables"),
        "{out}"
    );
    assert!(
        out.contains("NOT COPIED materialized view public.order_counts")
            && out.contains("REFRESH MATERIALIZED VIEW"),
        "{out}"
    );
    assert!(
        out.contains("NOT COPIED foreign key audited_x_fkey on public.audited references public.audit, which is not selected"),
        "{out}"
    );

    assert!(
        out.contains("DEFERRED CONSTRAINT public.customers customers_pkey"),
        "{out}"
    );

    let t = &setup.target;
    // Tables without their primary keys (the copy loads them first), the excluded table
    // not at all, no data.
    for table in ["customers", "orders", "items", "events", "events_1"] {
        assert!(
            !exists(t, &format!("SELECT 1 FROM pg_constraint WHERE contype = 'p' AND conrelid = 'public.{table}'::regclass")).await,
            "primary key of {table} before the copy\n{out}"
        );
    }
    // Each statement waits for its root table; foreign keys for every table.
    let tagged: Vec<(String, Option<String>)> = t
        .query(
            "SELECT split_part(statement, E'\n', 1), table_name FROM sluice.deferred_ddl ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let table_of = |title: &str| {
        tagged
            .iter()
            .find(|(t, _)| t == title)
            .unwrap_or_else(|| panic!("{title} not deferred: {tagged:?}"))
            .1
            .clone()
    };
    let orders = Some("\"public\".\"orders\"".to_string());
    let events = Some("\"public\".\"events\"".to_string());
    assert_eq!(table_of("-- INDEX public.orders_note_idx"), orders);
    assert_eq!(table_of("-- CONSTRAINT public.orders orders_pkey"), orders);
    assert_eq!(
        table_of("-- CONSTRAINT public.customers customers_name_key"),
        Some("\"public\".\"customers\"".to_string())
    );
    assert_eq!(
        table_of("-- CONSTRAINT public.events_1 events_1_pkey"),
        events
    );
    assert_eq!(table_of("-- INDEX ATTACH public.events_1_k_idx"), events);
    assert_eq!(
        table_of("-- FK CONSTRAINT public.orders orders_customer_id_fkey"),
        None
    );
    assert!(!exists(t, "SELECT 1 FROM pg_class WHERE relname = 'audit'").await);
    assert_eq!(count(t, "SELECT count(*) FROM public.customers").await, 0);
    // Types: enum labels, the domain's check, the composite and range types.
    let labels: String = t
        .query_one("SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'shop.mood'::regtype", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(labels, "sad,ok,happy");
    assert!(t.batch_execute("SELECT (-1)::public.posint").await.is_err());
    assert!(
        exists(
            t,
            "SELECT 1 FROM pg_type WHERE oid = 'public.pair'::regtype AND typtype = 'c'"
        )
        .await
    );
    assert!(
        exists(
            t,
            "SELECT 1 FROM pg_type WHERE oid = 'public.span'::regtype AND typtype = 'r'"
        )
        .await
    );
    // Sequences: serial ownership, identity, the shared sequence and its defaults.
    assert!(exists(t, "SELECT 1 FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attname = 'id' AND attidentity = 'a'").await);
    assert_eq!(
        t.query_one(
            "SELECT pg_get_serial_sequence('public.customers', 'id')",
            &[]
        )
        .await
        .unwrap()
        .get::<_, String>(0),
        "public.customers_id_seq"
    );
    t.batch_execute("INSERT INTO public.items DEFAULT VALUES")
        .await
        .unwrap();
    assert_eq!(count(t, "SELECT code FROM public.items").await, 1000);
    // Deferred: the index, the unique constraint, the foreign key; not created yet.
    assert!(
        !exists(
            t,
            "SELECT 1 FROM pg_class WHERE relname = 'orders_note_idx'"
        )
        .await
    );
    assert!(
        !exists(
            t,
            "SELECT 1 FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'"
        )
        .await
    );
    assert!(
        !exists(
            t,
            "SELECT 1 FROM pg_constraint WHERE conname = 'customers_name_key'"
        )
        .await
    );
    assert!(!exists(t, "SELECT 1 FROM pg_trigger WHERE tgname = 'orders_touch'").await);
    let deferred = count(
        t,
        "SELECT count(*) FROM sluice.deferred_ddl WHERE applied_at IS NULL",
    )
    .await;
    assert!(
        deferred >= 11,
        "index, 2 partition indexes + attach, unique, FK, 6 primary keys + attach: {deferred}"
    );

    // The copy would run here; then sluice run creates the deferred objects. One primary key
    // the operator added by hand, under another name, counts as there.
    t.batch_execute("ALTER TABLE public.items ADD CONSTRAINT items_by_hand PRIMARY KEY (id)")
        .await
        .unwrap();
    let applied = sluice::cutover::schema::apply_deferred_ddl(t, None)
        .await
        .unwrap();
    assert_eq!(applied as i64, deferred - 1);
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM sluice.deferred_ddl WHERE applied_at IS NULL",
        )
        .await,
        0
    );
    assert!(
        exists(
            t,
            "SELECT 1 FROM pg_class WHERE relname = 'orders_note_idx'"
        )
        .await
    );
    assert!(exists(t, "SELECT 1 FROM pg_constraint WHERE conname = 'orders_customer_id_fkey' AND contype = 'f'").await);
    assert!(
        exists(
            t,
            "SELECT 1 FROM pg_constraint WHERE conname = 'customers_name_key' AND contype = 'u'"
        )
        .await
    );
    assert!(exists(t, "SELECT 1 FROM pg_index WHERE indexrelid = 'public.events_k_idx'::regclass AND indisvalid").await);
    for table in ["customers", "orders", "items", "events", "events_1"] {
        assert!(
            exists(t, &format!("SELECT 1 FROM pg_constraint WHERE contype = 'p' AND conrelid = 'public.{table}'::regclass")).await,
            "primary key of {table} after the deferred DDL"
        );
    }
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM sluice.deferred_ddl WHERE applied_at IS NULL"
        )
        .await,
        0
    );
    assert_eq!(
        sluice::cutover::schema::apply_deferred_ddl(t, None)
            .await
            .unwrap(),
        0,
        "idempotent"
    );

    // Again: everything exists, so everything is left alone and nothing new is deferred.
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let out = stdout(&output);
    assert!(
        out.contains("LEFT ALONE public.orders: exists on the target"),
        "{out}"
    );
    assert!(!out.contains("CREATED"), "{out}");
    assert!(out.contains("0 statement(s) newly deferred"), "{out}");

    // --drop-if-exists recreates the tables (and defers their indexes again).
    t.batch_execute("INSERT INTO public.customers (name) VALUES ('stale')")
        .await
        .unwrap();
    let output = setup.sluice(&["schema", "--drop-if-exists"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let out = stdout(&output);
    assert!(out.contains("DROPPED public.customers"), "{out}");
    assert!(out.contains("CREATED TABLE public.customers"), "{out}");
    assert_eq!(count(t, "SELECT count(*) FROM public.customers").await, 0);
    assert!(
        !exists(
            t,
            "SELECT 1 FROM pg_class WHERE relname = 'orders_note_idx'"
        )
        .await
    );
    assert_eq!(
        sluice::cutover::schema::apply_deferred_ddl(t, None)
            .await
            .unwrap() as i64,
        deferred
    );
}

#[tokio::test]
async fn without_the_copy_primary_keys_are_created_at_once() {
    // The target is loaded some other way: apply needs the keys from the first change.
    let setup = Setup::new("[copy]\nenabled = false\n").await;
    setup
        .source
        .batch_execute(
            "CREATE TABLE public.a (id int PRIMARY KEY, v text);
             CREATE INDEX a_v_idx ON public.a (v);",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let out = stdout(&output);
    assert!(out.contains("CREATED CONSTRAINT public.a a_pkey"), "{out}");
    assert!(out.contains("DEFERRED INDEX public.a_v_idx"), "{out}");
    assert!(
        exists(
            &setup.target,
            "SELECT 1 FROM pg_constraint WHERE contype = 'p' AND conrelid = 'public.a'::regclass"
        )
        .await
    );
}

#[tokio::test]
async fn schema_refuses_citus_layout_on_a_target_without_citus() {
    let setup = Setup::new("[citus]\ndistribute = { \"public.t\" = \"id\" }\n").await;
    setup
        .source
        .batch_execute("CREATE TABLE public.t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    assert!(
        show(&output).contains("CREATE EXTENSION citus"),
        "{}",
        show(&output)
    );
    assert!(!exists(&setup.target, "SELECT 1 FROM pg_class WHERE relname = 't'").await);
}

#[tokio::test]
async fn schema_stops_before_any_change_when_the_target_lacks_what_pg_dump_cannot_bring() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE EXTENSION citext;
             CREATE EXTENSION hstore;
             CREATE EXTENSION btree_gist;
             CREATE TABLE public.users (id int PRIMARY KEY, email citext, attrs hstore);
             -- Needs btree_gist only for a constraint built after the copy.
             CREATE TABLE public.booking (id int PRIMARY KEY, room int, during tsrange,
                 EXCLUDE USING gist (room WITH =, during WITH &&));
             -- An extension kept in a schema of its own, named by that schema.
             CREATE SCHEMA extns;
             CREATE EXTENSION pg_trgm SCHEMA extns;
             CREATE TABLE public.notes (id int PRIMARY KEY, body text);
             CREATE INDEX notes_trgm ON public.notes USING gin (body extns.gin_trgm_ops);",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    // Every missing extension at once, not one per attempt.
    assert!(
        show(&output).contains(
            "run CREATE EXTENSION \"btree_gist\"; CREATE EXTENSION \"citext\"; CREATE EXTENSION \"hstore\"; CREATE SCHEMA IF NOT EXISTS \"extns\"; CREATE EXTENSION \"pg_trgm\" SCHEMA \"extns\"; on the target"
        ),
        "{}",
        show(&output)
    );
    assert!(
        show(&output).contains("index public.booking_room_during_excl (extension btree_gist)"),
        "{}",
        show(&output)
    );
    assert!(
        !exists(
            &setup.target,
            "SELECT 1 FROM pg_class WHERE relname = 'users'"
        )
        .await
    );

    // With the extension there, it goes through.
    setup
        .target
        .batch_execute(
            "CREATE EXTENSION citext; CREATE EXTENSION hstore; CREATE EXTENSION btree_gist; CREATE SCHEMA extns; CREATE EXTENSION pg_trgm SCHEMA extns",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));

    // A default calling a function the target lacks: one transaction, nothing created.
    setup
        .source
        .batch_execute(
            "CREATE FUNCTION public.next_code() RETURNS int LANGUAGE sql AS 'SELECT 7';
             CREATE TYPE public.state AS ENUM ('new', 'done');
             CREATE TABLE public.tickets (id int PRIMARY KEY, s public.state, code int DEFAULT public.next_code());",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let text = show(&output);
    assert!(
        text.contains("Creating TABLE public.tickets on the target (nothing was created"),
        "{text}"
    );
    assert!(text.contains("next_code"), "{text}");
    assert!(
        !exists(
            &setup.target,
            "SELECT 1 FROM pg_type WHERE typname = 'state'"
        )
        .await
    );
}

/// pg_dump gets the password through its environment: it works with password
/// authentication, and the password shows up in no output, also when it is wrong.
#[tokio::test]
async fn schema_passes_the_password_to_pg_dump_without_showing_it() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE ROLE migrator LOGIN SUPERUSER PASSWORD 'S3cret-pw';
             CREATE TABLE public.t (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
    setup.pg.write_hba(
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    );
    setup.pg.reload();
    let write_config = |name: &str, password: &str| {
        let path = setup.dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"postgresql://migrator:{password}@127.0.0.1:{}/src\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n",
                setup.pg.port,
                setup.pg.url("dst"),
                setup.dir.path().join("state").display()
            ),
        )
        .unwrap();
        path
    };

    let good = write_config("good.toml", "S3cret-pw");
    let output = setup.sluice_with(&good, &["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert!(
        stdout(&output).contains("CREATED TABLE public.t"),
        "{}",
        show(&output)
    );
    assert!(!show(&output).contains("S3cret-pw"), "{}", show(&output));

    let bad = write_config("bad.toml", "Wrong-pw");
    let output = setup.sluice_with(&bad, &["schema"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        show(&output).contains("password authentication failed"),
        "{}",
        show(&output)
    );
    assert!(!show(&output).contains("Wrong-pw"), "{}", show(&output));
}

/// Names that need quoting everywhere: spaces, capitals, quotes.
#[tokio::test]
async fn odd_identifiers_survive_schema_sequences_and_verify() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            r#"CREATE SCHEMA "Sales Dept";
               CREATE TYPE "Sales Dept"."Sta""tus" AS ENUM ('o''pen', 'closed');
               CREATE TABLE "Sales Dept"."Order Items" (
                   "Item Id" serial PRIMARY KEY,
                   "Region" text NOT NULL,
                   "st" "Sales Dept"."Sta""tus"
               );
               CREATE INDEX "By Region" ON "Sales Dept"."Order Items" ("Region");
               INSERT INTO "Sales Dept"."Order Items" ("Region", "st")
                   SELECT 'r' || i, 'o''pen' FROM generate_series(1, 30) i;"#,
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert!(
        stdout(&output).contains(r#"DEFERRED INDEX "Sales Dept"."By Region""#),
        "{}",
        show(&output)
    );
    let t = &setup.target;
    sluice::cutover::schema::apply_deferred_ddl(t, None)
        .await
        .unwrap();
    assert!(exists(t, r#"SELECT 1 FROM pg_class WHERE relname = 'By Region'"#).await);
    // The rows arrive (here by hand), then sequences and verify.
    t.batch_execute(
        r#"INSERT INTO "Sales Dept"."Order Items" ("Item Id", "Region", "st")
           SELECT i, 'r' || i, 'o''pen' FROM generate_series(1, 30) i"#,
    )
    .await
    .unwrap();
    let output = setup.sluice(&["sync-sequences"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let next: i64 = t
        .query_one(
            r#"SELECT nextval('"Sales Dept"."Order Items_Item Id_seq"')"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 31);
    let output = setup.sluice(&["verify", "--chunk-rows", "7"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    t.batch_execute(r#"UPDATE "Sales Dept"."Order Items" SET "st" = 'closed' WHERE "Item Id" = 9"#)
        .await
        .unwrap();
    let output = setup.sluice(&["verify", "--chunk-rows", "7"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        stdout(&output)
            .contains(r#"DIFF "Sales Dept"."Order Items" range ["Item Id"=8, "Item Id"=15)"#),
        "{}",
        show(&output)
    );
}

/// A target that cancels long statements (`statement_timeout` set for its database, as
/// managed services often do) still gets its deferred keys and indexes: building them is
/// the long statement by nature.
#[tokio::test(flavor = "multi_thread")]
async fn deferred_ddl_outlasts_the_targets_statement_timeout() {
    let target = crate::support::PgCluster::start();
    let admin = target.create_database("app").await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int);
             INSERT INTO t SELECT generate_series(1, 600);
             -- 1 ms a row: building the index takes longer than the timeout.
             CREATE FUNCTION slow(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep(0.001); RETURN $1; END $$;
             CREATE SCHEMA sluice;
             CREATE TABLE sluice.deferred_ddl (id serial PRIMARY KEY, statement text NOT NULL,
                 applied_at timestamptz, table_name text);
             INSERT INTO sluice.deferred_ddl (statement, table_name)
                 VALUES ('CREATE INDEX t_slow ON public.t ((public.slow(id)))', '\"public\".\"t\"');
             ALTER DATABASE app SET statement_timeout = '200ms';",
        )
        .await
        .unwrap();
    let client = target.connect("app").await;
    let timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "200ms", "the session has the database's timeout");
    let applied = sluice::cutover::schema::apply_deferred_ddl(&client, None)
        .await
        .expect("the index is built despite the timeout");
    assert_eq!(applied, 1);
    assert!(
        exists(
            &client,
            "SELECT 1 FROM pg_indexes WHERE indexname = 't_slow'"
        )
        .await
    );
    // Only the build's own transaction was exempt.
    let timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "200ms");
}

/// A user-defined collation (a column's, a domain's, an index's) is not a type: pg_dump of
/// the tables alone names it without creating it, and the table cannot be created.
#[tokio::test]
async fn user_defined_collations_come_with_the_tables_that_use_them() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE SCHEMA coll;
             CREATE COLLATION coll.bytewise FROM \"C\";
             CREATE COLLATION public.posix2 (locale = 'POSIX');
             CREATE COLLATION public.unused FROM \"C\";
             CREATE DOMAIN public.code AS text COLLATE public.posix2;
             CREATE TABLE public.users (
                 id int PRIMARY KEY,
                 email text COLLATE coll.bytewise,
                 c public.code
             );
             CREATE INDEX users_email_idx ON public.users (email COLLATE public.posix2);",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let collation_of = |column: &'static str| {
        format!(
            "SELECT count(*) FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
             WHERE a.attrelid = 'public.users'::regclass AND a.attname = '{column}'
               AND c.collname = 'bytewise' AND c.collnamespace = 'coll'::regnamespace"
        )
    };
    assert_eq!(count(&setup.target, &collation_of("email")).await, 1);
    assert!(
        exists(
            &setup.target,
            "SELECT 1 FROM pg_type WHERE typname = 'code' AND typcollation = 'public.posix2'::regcollation"
        )
        .await
    );
    assert!(
        !exists(
            &setup.target,
            "SELECT 1 FROM pg_collation WHERE collname = 'unused'"
        )
        .await,
        "a collation no selected table uses stays behind"
    );
    // The index using one is deferred, and builds with it.
    let built = sluice::cutover::schema::apply_deferred_ddl(&setup.target, None)
        .await
        .unwrap();
    assert!(built >= 1, "{built}");
    assert!(
        exists(
            &setup.target,
            "SELECT 1 FROM pg_indexes WHERE indexname = 'users_email_idx' AND indexdef LIKE '%COLLATE %posix2%'"
        )
        .await
    );

    // Present on the target already (a second database's schema run): reused.
    setup
        .target
        .batch_execute(
            "DROP TABLE public.users; DROP DOMAIN public.code; DELETE FROM sluice.deferred_ddl",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert_eq!(count(&setup.target, &collation_of("email")).await, 1);
}

/// An enum already on the target is reused; one missing labels would fail only in the copy.
#[tokio::test]
async fn an_enum_on_the_target_missing_labels_is_refused_before_any_change() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'it''s fine', 'happy');
             CREATE TABLE public.people (id int PRIMARY KEY, m public.mood);",
        )
        .await
        .unwrap();
    setup
        .target
        .batch_execute("CREATE TYPE public.mood AS ENUM ('sad', 'ok')")
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let text = show(&output);
    assert!(
        text.contains(
            r#"run ALTER TYPE "public"."mood" ADD VALUE 'it''s fine'; ALTER TYPE "public"."mood" ADD VALUE 'happy'; on the target"#
        ),
        "{text}"
    );
    assert!(
        !exists(
            &setup.target,
            "SELECT 1 FROM pg_class WHERE relname = 'people'"
        )
        .await
    );
    setup
        .target
        .batch_execute(
            "ALTER TYPE public.mood ADD VALUE 'it''s fine'; ALTER TYPE public.mood ADD VALUE 'happy'",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert!(
        exists(
            &setup.target,
            "SELECT 1 FROM pg_class WHERE relname = 'people'"
        )
        .await
    );
}

/// A composite or domain already on the target is used as it is. Values travel as text, a
/// composite's fields by position: fields in another order would swap the values silently,
/// and a narrower domain would round them. `schema` refuses and `check` FAILs.
#[tokio::test]
async fn a_type_on_the_target_that_differs_is_refused_by_schema_and_named_by_check() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE TYPE public.pair AS (a text, b text);
             CREATE DOMAIN public.amount AS numeric(12,4);
             CREATE TYPE public.kind AS ENUM ('x', 'y');
             CREATE TABLE public.deals (id int PRIMARY KEY, p public.pair, v public.amount, k public.kind);",
        )
        .await
        .unwrap();
    setup
        .target
        .batch_execute(
            "CREATE TYPE public.pair AS (b text, a text);
             CREATE DOMAIN public.amount AS numeric(10,2);
             CREATE DOMAIN public.kind AS text;",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let text = show(&output);
    assert!(
        text.contains(r#"type "public"."pair" is composite (a text, b text) on the source but composite (b text, a text) on the target"#),
        "{text}"
    );
    assert!(
        text.contains(r#"type "public"."amount" is domain over numeric(12,4) on the source but domain over numeric(10,2) on the target"#),
        "{text}"
    );
    // An enum that is a domain on the target: no ADD VALUE could mend it.
    assert!(
        text.contains(
            r#"type "public"."kind" is enum on the source but domain over text on the target"#
        ),
        "{text}"
    );
    assert!(!text.contains("ADD VALUE"), "{text}");
    assert!(
        !exists(
            &setup.target,
            "SELECT 1 FROM pg_class WHERE relname = 'deals'"
        )
        .await
    );

    // With the table there (made by hand), check names the types too.
    setup
        .target
        .batch_execute(
            "CREATE TABLE public.deals (id int PRIMARY KEY, p public.pair, v public.amount, k public.kind)",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["check"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let text = show(&output);
    assert!(
        text.lines().any(|l| l.starts_with("FAIL")
            && l.contains(r#"type "public"."pair" is composite (a text, b text) on the source"#)),
        "{text}"
    );

    // Made equal: both go through.
    setup
        .target
        .batch_execute(
            "DROP TABLE public.deals; DROP TYPE public.pair; DROP DOMAIN public.amount;
             DROP DOMAIN public.kind; CREATE TYPE public.pair AS (a text, b text);",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let output = setup.sluice(&["check"]).await;
    assert!(
        !show(&output).contains("on the source but"),
        "{}",
        show(&output)
    );
}

/// A multirange column: the multirange type cannot be created on its own; its range type
/// brings it.
#[tokio::test]
async fn a_multirange_column_brings_its_range_type() {
    let setup = Setup::new("").await;
    setup
        .source
        .batch_execute(
            "CREATE TYPE public.floatrange AS RANGE (subtype = float8);
             CREATE TABLE public.slots (id int PRIMARY KEY, free public.floatmultirange);",
        )
        .await
        .unwrap();
    let output = setup.sluice(&["schema"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    assert!(
        exists(
            &setup.target,
            "SELECT 1 FROM pg_attribute WHERE attrelid = 'public.slots'::regclass
               AND attname = 'free' AND atttypid = 'public.floatmultirange'::regtype"
        )
        .await
    );
}
