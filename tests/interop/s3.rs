//! berth's S3 backend against a real object store (Garage): the store contract, and replicas
//! sharing one bucket.

use std::sync::Arc;

use berth::config::{Config, StorageConfig};
use berth::store::s3::S3Store;
use berth::store::Store;

use crate::garage::Garage;
use crate::support::contract::check_backend;

fn s3_config(garage: &Garage, prefix: &str) -> berth::config::S3Config {
    let config = Config::from_toml(&garage.storage_toml(prefix, "")).expect("a valid [storage]");
    config.validate().expect("a valid config");
    match config.storage {
        StorageConfig::S3(s3) => s3,
        StorageConfig::Disk => unreachable!("the table names s3"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_backend_keeps_the_store_contract_on_garage() {
    let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let s3 =
        S3Store::open(&s3_config(&garage, "contract"), data.path()).expect("open the S3 store");
    let store: Store = Arc::new(s3);
    check_backend(store).await;
}

/// Two stores on one bucket with their own data dirs, as two replicas are.
fn two_replicas(garage: &Garage, prefix: &str) -> (Store, Store, [tempfile::TempDir; 2]) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let open = |dir: &tempfile::TempDir| -> Store {
        Arc::new(S3Store::open(&s3_config(garage, prefix), dir.path()).expect("open the S3 store"))
    };
    (open(&dirs[0]), open(&dirs[1]), dirs)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_writes_another_reads_from_the_bucket() {
    use berth::oci::names::{Digest, RepoName, Tag};
    use berth::store::pages::Pages;
    use berth::store::{Area, LinkKind, TagEntry};
    use futures_util::TryStreamExt;

    let garage = blocking(Garage::start).await;
    let (a, b, dirs) = two_replicas(&garage, "replicas");
    // 40 MiB: a multipart upload of three parts.
    let layer: Vec<u8> = (0..40u32 << 20).map(|i| (i % 253) as u8).collect();
    let d = Digest::of(&layer);
    let (a2, l2) = (a.clone(), layer.clone());
    blocking(move || a2.put_blob(Area::Local, d, &l2))
        .await
        .unwrap();
    let repo = RepoName::parse("private/app").unwrap();
    let tag = Tag::parse("v1").unwrap();
    let (a2, r2, t2) = (a.clone(), repo.clone(), tag.clone());
    blocking(move || {
        a2.put_link(&r2, LinkKind::Layers, &d, b"x")?;
        a2.put_tag(
            Area::Local,
            "_local",
            &r2,
            &t2,
            "",
            &TagEntry {
                digest: d,
                media_type: "m".into(),
                fetched_at: 1,
            },
        )
    })
    .await
    .unwrap();

    // B has none of it locally, and finds all of it.
    let (b2, r2, t2) = (b.clone(), repo.clone(), tag.clone());
    let (len, linked, tagged) = blocking(move || {
        (
            b2.blob_len(Area::Local, &d).unwrap(),
            b2.has_link(&r2, LinkKind::Layers, &d).unwrap(),
            b2.get_tag(Area::Local, "_local", &r2, &t2, "").unwrap(),
        )
    })
    .await;
    assert_eq!(len, Some(layer.len() as u64));
    assert!(linked);
    assert_eq!(tagged.map(|e| e.digest), Some(d));
    let local_copy = dirs[1]
        .path()
        .join("local/blobs/sha256")
        .join(&d.hex()[..2])
        .join(d.hex());
    assert!(!local_copy.exists(), "B has no local copy yet");

    // A range streams from the bucket without filling; the whole blob fills B's local copy.
    let b2 = b.clone();
    let reader = blocking(move || b2.open_blob(Area::Local, &d))
        .await
        .unwrap()
        .unwrap();
    let part: Vec<bytes::Bytes> = reader
        .stream(1000, 5_000_000, Pages::Copied)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(part.concat(), layer[1000..5_000_000]);
    let b2 = b.clone();
    let reader = blocking(move || b2.open_blob(Area::Local, &d))
        .await
        .unwrap()
        .unwrap();
    let whole: Vec<bytes::Bytes> = reader
        .stream(0, layer.len() as u64, Pages::Copied)
        .try_collect()
        .await
        .unwrap();
    assert!(whole.concat() == layer, "the whole blob, byte for byte");
    crate::procs::wait_for("B's local copy", std::time::Duration::from_secs(10), || {
        local_copy.exists().then_some(())
    });
    assert_eq!(std::fs::read(&local_copy).unwrap(), layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evicting_replica_bounds_what_every_replica_added_and_spares_what_is_in_use() {
    use berth::mirror::cache::DiskCache;
    use berth::oci::names::Digest;
    use berth::store::Area;

    let garage = blocking(Garage::start).await;
    let (a, b, _dirs) = two_replicas(&garage, "bound");
    // B adds four mirrored blobs of 100 KiB and one private blob; A bounds the cache at 250 KiB.
    let blobs: Vec<Digest> = (0..4u8)
        .map(|i| {
            let bytes = vec![i; 100 << 10];
            (Digest::of(&bytes), bytes)
        })
        .map(|(d, bytes)| {
            let b = b.clone();
            std::thread::spawn(move || b.put_blob(Area::Cache, d, &bytes).map(|()| d))
                .join()
                .unwrap()
                .unwrap()
        })
        .collect();
    let private = vec![9u8; 300 << 10];
    let (b2, p2) = (b.clone(), private.clone());
    blocking(move || b2.put_blob(Area::Local, Digest::of(&p2), &p2))
        .await
        .unwrap();
    let cache_total = |s: &Store| {
        let s = s.clone();
        async move {
            blocking(move || s.blobs(Area::Cache).unwrap())
                .await
                .iter()
                .map(|b| b.len)
                .sum::<u64>()
        }
    };
    assert_eq!(cache_total(&a).await, 400 << 10);

    // Used in the last hour by some replica (all of them are): nothing may go.
    let a2 = a.clone();
    let sparing = blocking(move || {
        DiskCache::open_sparing(a2, 250 << 10, std::time::Duration::from_secs(3600)).unwrap()
    })
    .await;
    blocking(move || sparing.resync()).await.unwrap();
    assert_eq!(
        cache_total(&a).await,
        400 << 10,
        "nothing in use was evicted"
    );

    // Without that: exactly what the bound asks (two blobs), never a leased one, never private.
    let a2 = a.clone();
    let cache = Arc::new(blocking(move || DiskCache::open(a2, 250 << 10).unwrap()).await);
    let leased = cache.lease(blobs[0]);
    let c2 = cache.clone();
    blocking(move || c2.resync()).await.unwrap();
    assert_eq!(
        cache_total(&a).await,
        200 << 10,
        "evicted down to the bound, no further"
    );
    let (b2, d0) = (b.clone(), blobs[0]);
    assert!(
        blocking(move || b2.blob_len(Area::Cache, &d0).unwrap())
            .await
            .is_some(),
        "the leased blob stays"
    );
    let (b2, pd) = (b.clone(), Digest::of(&private));
    assert!(
        blocking(move || b2.blob_len(Area::Local, &pd).unwrap())
            .await
            .is_some(),
        "private content is never evicted"
    );
    drop(leased);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_gc_collects_the_bucket_and_keeps_what_manifests_refer_to() {
    use berth::oci::names::{Digest, RepoName, Tag};
    use berth::store::private::PrivateStore;
    use berth::store::Area;

    let garage = blocking(Garage::start).await;
    // A writes; B, whose data dir holds nothing, sees what the bucket holds.
    let (a, b, dirs) = two_replicas(&garage, "gc");
    let (config, layer, orphan) = (b"{}".to_vec(), vec![7u8; 50_000], vec![8u8; 60_000]);
    let (cd, ld, od) = (Digest::of(&config), Digest::of(&layer), Digest::of(&orphan));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":50000}}]}}"#
    );
    let md = Digest::of(manifest.as_bytes());
    let a2 = a.clone();
    blocking(move || {
        let ps = PrivateStore::new(a2.clone());
        let repo = RepoName::parse("private/app").unwrap();
        for (d, bytes) in [(cd, &config), (ld, &layer), (od, &orphan)] {
            a2.put_blob(Area::Local, d, bytes).unwrap();
            ps.link_blob(&repo, &d).unwrap();
        }
        a2.put_manifest(
            Area::Local,
            md,
            "application/vnd.oci.image.manifest.v1+json",
            manifest.as_bytes(),
        )
        .unwrap();
        ps.link_manifest(&repo, &md).unwrap();
        ps.set_tag(
            &repo,
            &Tag::parse("v1").unwrap(),
            &md,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .unwrap();
    })
    .await;
    let cfg = dirs[0].path().join("berth.toml");
    std::fs::write(&cfg, garage.storage_toml("gc", "")).unwrap();
    let gc = |grace: &'static str| {
        let (cfg, data) = (cfg.clone(), dirs[1].path().join("gc-data"));
        blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
                .arg("gc")
                .arg("--config")
                .arg(&cfg)
                .arg("--data-dir")
                .arg(&data)
                .args(["--grace", grace])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let present = |d: Digest| {
        let b = b.clone();
        blocking(move || b.blob_len(Area::Local, &d).unwrap().is_some())
    };
    // Everything is recent: the default grace keeps the orphan.
    gc("1h").await;
    assert!(
        present(od).await,
        "a blob written a moment ago survives the grace period"
    );
    let report = gc("0s").await;
    assert!(
        !present(od).await,
        "the orphan is collected from the bucket: {report}"
    );
    for (what, d) in [("config", cd), ("layer", ld), ("manifest", md)] {
        assert!(
            present(d).await,
            "the {what} a tag refers to stays: {report}"
        );
    }
}
