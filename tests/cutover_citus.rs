//! Citus is not installable here, so `src/citus.rs` is unit-tested on its SQL. This adds what
//! real PostgreSQL can prove: on a plain target there is no layout and the position table is
//! left as it is; and the layout query runs and decodes against a table shaped exactly like
//! Citus 13's `pg_dist_partition` (regclass, "char", text, integer, "char") with a
//! `column_to_column_name` that resolves `partkey` the way Citus does.

use sluice::citus::{self, TableKind};
use sluice::source::TableName;

use crate::support::PgCluster;

#[tokio::test]
async fn a_plain_target_has_no_layout_and_keeps_its_position_table() {
    let (_pg, client) = PgCluster::start_with_client().await;
    sluice::checkpoint::ensure_position_table(&client)
        .await
        .unwrap();
    assert!(citus::detect(&client).await.unwrap().is_none());
    assert!(
        !citus::make_reference_table_if_citus(&client, "sluice.applied_position")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn the_layout_query_decodes_a_citus_shaped_catalog() {
    let (_pg, client) = PgCluster::start_with_client().await;
    client
        .batch_execute(
            r#"
            CREATE TABLE public.orders ("Customer Id" int, id int, PRIMARY KEY ("Customer Id", id));
            CREATE TABLE public.countries (code text PRIMARY KEY);
            CREATE TABLE public.notes (id int PRIMARY KEY);
            CREATE TABLE public.plain (id int PRIMARY KEY);
            CREATE SCHEMA citus_shape;
            CREATE TABLE citus_shape.pg_dist_partition (
                logicalrelid regclass NOT NULL,
                partmethod "char" NOT NULL,
                partkey text,
                colocationid integer DEFAULT 0 NOT NULL,
                repmodel "char" DEFAULT 'c' NOT NULL,
                autoconverted boolean DEFAULT false
            );
            -- partkey holds a serialized Var; Citus resolves its varattno on the relation.
            CREATE FUNCTION citus_shape.column_to_column_name(rel regclass, partkey text)
            RETURNS text LANGUAGE sql STRICT AS $$
                SELECT attname::text FROM pg_attribute
                WHERE attrelid = rel AND attnum = substring(partkey FROM ':varattno (\d+)')::int
            $$;
            INSERT INTO citus_shape.pg_dist_partition VALUES
                ('public.orders', 'h', '{VAR :varno 1 :varattno 1 :vartype 23 :vartypmod -1 :varcollid 0 :varlevelsup 0 :varnosyn 1 :varattnosyn 1 :location -1}', 2, 's'),
                ('public.countries', 'n', NULL, 1, 't'),
                ('public.notes', 'n', NULL, 0, 's');
            SET search_path = citus_shape, public, pg_catalog;
            "#,
        )
        .await
        .unwrap();
    let layout = citus::read_layout(&client, "13.2-1".into()).await.unwrap();
    let orders = layout.table(&TableName::new("public", "orders")).unwrap();
    assert_eq!(
        orders.kind,
        TableKind::Distributed {
            column: "Customer Id".into()
        }
    );
    assert_eq!(orders.distribution_column(), Some("Customer Id"));
    assert_eq!(orders.colocation_id, 2);
    assert_eq!(
        layout
            .table(&TableName::new("public", "countries"))
            .unwrap()
            .kind,
        TableKind::Reference
    );
    assert_eq!(
        layout
            .table(&TableName::new("public", "notes"))
            .unwrap()
            .kind,
        TableKind::Local
    );
    assert!(layout.table(&TableName::new("public", "plain")).is_none());
}

#[tokio::test]
async fn unique_indexes_without_the_distribution_column_are_found_on_the_source() {
    let (_pg, client) = PgCluster::start_with_client().await;
    client
        .batch_execute(
            r#"
            CREATE TABLE public.orders (
                customer_id int NOT NULL, id int NOT NULL, code text, ref text,
                PRIMARY KEY (customer_id, id),
                CONSTRAINT orders_code_key UNIQUE (code),
                CONSTRAINT orders_ref_key UNIQUE (customer_id, ref)
            );
            CREATE UNIQUE INDEX orders_lower_code ON public.orders (lower(code));
            CREATE UNIQUE INDEX orders_id_customer ON public.orders (id, customer_id);
            CREATE INDEX orders_plain ON public.orders (code);
            "#,
        )
        .await
        .unwrap();
    let oid_of = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, u32>(0) }
    };
    let table = oid_of("SELECT 'public.orders'::regclass::oid").await;
    let found = sluice::cutover::schema::unenforceable_on_citus(&client, &[table], "customer_id")
        .await
        .unwrap();
    let code_index = oid_of("SELECT 'public.orders_code_key'::regclass::oid").await;
    let code_constraint =
        oid_of("SELECT oid FROM pg_constraint WHERE conname = 'orders_code_key'").await;
    let lower_index = oid_of("SELECT 'public.orders_lower_code'::regclass::oid").await;
    let keys: Vec<(u32, u32)> = found.keys().copied().collect();
    let mut expected = vec![
        (1259, code_index),
        (1259, lower_index),
        (2606, code_constraint),
    ];
    expected.sort();
    assert_eq!(keys, expected, "{found:?}");
    assert_eq!(found[&(1259, code_index)], "orders_code_key on orders");
    // A column name is matched exactly, not case-folded.
    let none = sluice::cutover::schema::unenforceable_on_citus(&client, &[table], "Customer_Id")
        .await
        .unwrap();
    assert_eq!(
        none.len(),
        6,
        "all four unique indexes and both constraints lack \"Customer_Id\": {none:?}"
    );
}
