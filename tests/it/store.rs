//! The content store's backends, through the `ContentStore` trait alone (`support::contract`).

use berth::store::disk::DiskStore;

use crate::support::contract::check_backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_backend_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    check_backend(DiskStore::open(dir.path()).unwrap().shared()).await;
}
