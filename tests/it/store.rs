//! The content store's backends, through the `ContentStore` trait alone (`support::contract`).

use berth::store::disk::DiskStore;

use crate::support::contract::check_backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_backend_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    check_backend(DiskStore::open(dir.path()).unwrap().shared()).await;
}

/// A "bucket" at `addr` that accepts connections and then answers every request with
/// `reply` (or, with `None`, never answers).
async fn fake_bucket(reply: Option<&'static str>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                // Each read is taken as one request: enough for the small requests here.
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    match reply {
                        Some(r) => {
                            if s.write_all(r.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        None => std::future::pending::<()>().await,
                    }
                }
            });
        }
    });
    addr
}

fn s3_store_at(addr: std::net::SocketAddr, data: &std::path::Path) -> berth::store::Store {
    let credentials = data.join("credentials");
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = test\naws_secret_access_key = test\n",
    )
    .unwrap();
    let toml = format!(
        "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://{addr}\"\n\
         allow_http = true\ntimeout = \"1s\"\ncredentials_file = \"{}\"\n",
        credentials.display()
    );
    let config = berth::config::Config::from_toml(&toml).unwrap();
    let berth::config::StorageConfig::S3(s3) = &config.storage else {
        unreachable!()
    };
    std::sync::Arc::new(berth::store::s3::S3Store::open(s3, data).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_hangs_or_fails_gives_errors_in_bounded_time_and_mirrored_reads_go_on() {
    use berth::oci::names::{Digest, RepoName, Tag};
    use berth::store::{Area, TagEntry};
    use std::time::{Duration, Instant};

    for (what, reply) in [
        ("hangs", None),
        (
            "answers 503",
            Some("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
        ),
    ] {
        let addr = fake_bucket(reply).await;
        let dir = tempfile::tempdir().unwrap();
        let store = s3_store_at(addr, dir.path());
        let d = Digest::of(b"layer");
        let repo = RepoName::parse("library/alpine").unwrap();
        let tag = Tag::parse("latest").unwrap();
        let started = Instant::now();
        let calls = tokio::task::spawn_blocking(move || {
            (
                store.blob_len(Area::Local, &d),
                store.blob_len(Area::Cache, &d),
                store.get_tag(Area::Cache, "docker.io", &repo, &tag, ""),
                store.put_tag(
                    Area::Local,
                    "_local",
                    &RepoName::parse("private/a").unwrap(),
                    &Tag::parse("v1").unwrap(),
                    "",
                    &TagEntry {
                        digest: d,
                        media_type: "m".into(),
                        fetched_at: 1,
                    },
                ),
            )
        });
        let (private, mirrored, tagged, pushed) =
            tokio::time::timeout(Duration::from_secs(60), calls)
                .await
                .unwrap_or_else(|_| panic!("a bucket that {what} hung the store"))
                .unwrap();
        // Four requests, each bounded by the 1 s timeout (with two quick retries for a 503).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a bucket that {what}: {:?}",
            started.elapsed()
        );
        assert!(
            private.is_err(),
            "a private blob the bucket {what} about is an error"
        );
        assert_eq!(
            mirrored.unwrap(),
            None,
            "a mirrored blob counts as absent (the mirror fetches it upstream)"
        );
        assert_eq!(
            tagged.unwrap(),
            None,
            "a tag falls back to the (empty) local copy"
        );
        assert!(
            pushed.is_err(),
            "a private write that cannot reach the bucket fails"
        );
    }
}
