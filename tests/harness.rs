//! The harness itself: a cluster starts with logical decoding on, and stops on drop.

use crate::support::PgCluster;

#[tokio::test]
async fn a_cluster_starts_with_logical_decoding_and_stops_on_drop() {
    let (pg, client) = PgCluster::start_with_client().await;
    let row = client.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    let data_dir = pg.data_dir().to_path_buf();
    assert!(data_dir.join("postmaster.pid").exists());
    drop(client);
    drop(pg);
    assert!(!data_dir.exists(), "the temp dir goes with the cluster");
}
