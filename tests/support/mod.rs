//! Support code shared by the integration tests: real PostgreSQL clusters and helpers.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod sluice;

pub use cluster::PgCluster;

/// Writes slot `sluice`'s position row on the target as a daemon that applied (and caught up
/// to) `lsn` would; `system_identifier` is the source's, as text.
pub async fn record_position(
    target: &tokio_postgres::Client,
    system_identifier: &str,
    lsn: &str,
) -> Result<u64, tokio_postgres::Error> {
    target
        .execute(
            ::sluice::checkpoint::UPSERT_POSITION_SQL,
            &[&"sluice", &system_identifier, &lsn, &lsn],
        )
        .await
}

/// Terminates the backends `filter` (a condition on `pg_stat_activity`) selects; how many.
pub async fn terminate_backends(client: &tokio_postgres::Client, filter: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                 FROM pg_stat_activity WHERE {filter}"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Whether `sql` returns a row.
pub async fn exists(client: &tokio_postgres::Client, sql: &str) -> bool {
    client
        .query_one(&format!("SELECT EXISTS ({sql})"), &[])
        .await
        .unwrap()
        .get(0)
}
