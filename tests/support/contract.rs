//! What every content-store backend must do, as one check any backend's test runs on a fresh,
//! empty store: blobs (verified writes, ranges, listing, removal), manifests, tags, links and
//! referrers, through the `ContentStore` trait only.

use berth::oci::names::{Digest, RepoName, Tag};
use berth::store::pages::Pages;
use berth::store::{Area, LinkKind, Store, StoreError, TagEntry, LOCAL_UPSTREAM};
use futures_util::TryStreamExt;

async fn read(store: &Store, area: Area, d: &Digest, start: u64, end: u64) -> Vec<u8> {
    let (s, d) = (store.clone(), *d);
    let blob = tokio::task::spawn_blocking(move || s.open_blob(area, &d))
        .await
        .unwrap()
        .unwrap()
        .expect("the blob is stored");
    let mut out = Vec::new();
    for pages in [Pages::Copied, Pages::Mapped] {
        let (s2, d2) = (store.clone(), d);
        let again = tokio::task::spawn_blocking(move || s2.open_blob(area, &d2))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let pieces: Vec<bytes::Bytes> =
            again.stream(start, end, pages).try_collect().await.unwrap();
        let bytes = pieces.concat();
        if out.is_empty() {
            out = bytes;
        } else {
            assert_eq!(out, bytes, "copied and mapped reads agree");
        }
    }
    assert!(blob.len() >= end.min(blob.len()));
    out
}

/// Runs every check on `store`, which must be empty. Blocking calls run on the blocking pool,
/// as berth makes them.
pub async fn check_backend(store: Store) {
    let s = store.clone();
    tokio::task::spawn_blocking(move || blocking_checks(&s))
        .await
        .unwrap();

    // Streaming reads of ranges, larger than one piece.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let d = Digest::of(&big);
    let (s, b) = (store.clone(), big.clone());
    tokio::task::spawn_blocking(move || s.put_blob(Area::Cache, d, &b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read(&store, Area::Cache, &d, 0, big.len() as u64).await,
        big
    );
    assert_eq!(
        read(&store, Area::Cache, &d, 1_048_570, 2_100_000).await,
        big[1_048_570..2_100_000]
    );
    assert_eq!(
        read(&store, Area::Cache, &d, 2_999_999, 5_000_000).await,
        big[2_999_999..],
        "a range past the end stops at the end"
    );
}

fn blocking_checks(store: &Store) {
    // Blobs: a mismatch or an abandoned write leaves nothing; a good one is in one area only.
    let good = Digest::of(b"hello");
    let mut w = store.begin_blob(Area::Local, good).unwrap();
    w.write(b"jello").unwrap();
    assert!(matches!(w.commit(), Err(StoreError::DigestMismatch { .. })));
    let mut w = store.begin_blob(Area::Local, good).unwrap();
    w.write(b"hel").unwrap();
    drop(w);
    assert_eq!(store.blob_len(Area::Local, &good).unwrap(), None);
    assert!(store.open_blob(Area::Local, &good).unwrap().is_none());
    store.put_blob(Area::Local, good, b"hello").unwrap();
    // Writing the same content again is harmless (concurrent writers write identical bytes).
    store.put_blob(Area::Local, good, b"hello").unwrap();
    assert_eq!(store.blob_len(Area::Local, &good).unwrap(), Some(5));
    assert_eq!(store.blob_len(Area::Cache, &good).unwrap(), None);
    assert_eq!(
        store.hash_blob(Area::Local, &good).unwrap(),
        Some((good, 5))
    );
    let listed: Vec<_> = store.blobs(Area::Local).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].digest, listed[0].len), (good, 5));
    store.mark_used(Area::Local, &good);
    assert!(store.blobs(Area::Cache).unwrap().is_empty());

    // Manifests: bytes and media type together; a removed blob is a miss.
    let m = br#"{"schemaVersion":2}"#;
    let md = Digest::of(m);
    store
        .put_manifest(
            Area::Cache,
            md,
            "application/vnd.oci.image.manifest.v1+json",
            m,
        )
        .unwrap();
    let (bytes, mt) = store.get_manifest(Area::Cache, &md).unwrap().unwrap();
    assert_eq!(
        (&bytes[..], mt.as_str()),
        (&m[..], "application/vnd.oci.image.manifest.v1+json")
    );
    assert!(store.get_manifest(Area::Local, &md).unwrap().is_none());
    // Listed among the area's manifests (what a purge weighs), and only there.
    assert_eq!(store.manifest_digests(Area::Cache).unwrap(), vec![md]);
    assert!(store.manifest_digests(Area::Local).unwrap().is_empty());
    store.remove_blob(Area::Cache, &md).unwrap();
    store.remove_blob(Area::Cache, &md).unwrap();
    assert!(store.get_manifest(Area::Cache, &md).unwrap().is_none());
    store.remove_manifest_type(Area::Cache, &md).unwrap();
    assert!(store.manifest_digests(Area::Cache).unwrap().is_empty());

    // Tags: last writer wins, variants apart, listed in order.
    let repo = RepoName::parse("library/alpine").unwrap();
    let (latest, old) = (Tag::parse("latest").unwrap(), Tag::parse("3.19").unwrap());
    let entry = |d: Digest| TagEntry {
        digest: d,
        media_type: "x".into(),
        fetched_at: 7,
    };
    assert_eq!(store.tag_names(Area::Cache, "up", &repo).unwrap(), None);
    store
        .put_tag(Area::Cache, "up", &repo, &latest, "", &entry(md))
        .unwrap();
    store
        .put_tag(Area::Cache, "up", &repo, &latest, "", &entry(good))
        .unwrap();
    store
        .put_tag(Area::Cache, "up", &repo, &latest, "v1", &entry(md))
        .unwrap();
    store
        .put_tag(Area::Cache, "up", &repo, &old, "", &entry(md))
        .unwrap();
    assert_eq!(
        store
            .get_tag(Area::Cache, "up", &repo, &latest, "")
            .unwrap(),
        Some(entry(good))
    );
    let tags: Vec<(String, String)> = store
        .list_tags(Area::Cache, "up", &repo)
        .unwrap()
        .into_iter()
        .map(|(t, v, _)| (t.to_string(), v))
        .collect();
    assert_eq!(
        tags,
        [
            ("3.19".into(), "".into()),
            ("latest".into(), "".into()),
            ("latest".into(), "v1".into())
        ]
    );
    assert_eq!(
        store.list_repos(Area::Cache).unwrap(),
        vec![("up".to_owned(), repo.clone())]
    );
    assert!(store
        .remove_tag(Area::Cache, "up", &repo, &old, "")
        .unwrap());
    assert!(!store
        .remove_tag(Area::Cache, "up", &repo, &old, "")
        .unwrap());
    assert_eq!(
        store.area_repos(Area::Cache, 10),
        vec![("up".to_owned(), repo.to_string())]
    );

    // Links of private repositories, and the catalog over both halves.
    let private = RepoName::parse("private/app").unwrap();
    assert!(!store.has_link(&private, LinkKind::Layers, &good).unwrap());
    store
        .put_link(&private, LinkKind::Layers, &good, b"x")
        .unwrap();
    store
        .put_link(&private, LinkKind::Manifests, &md, b"y")
        .unwrap();
    assert!(store.has_link(&private, LinkKind::Layers, &good).unwrap());
    assert!(!store.has_link(&private, LinkKind::Layers, &md).unwrap());
    assert_eq!(
        store.links(&private, LinkKind::Manifests).unwrap(),
        vec![md]
    );
    let referrers = LinkKind::Referrers(md);
    store
        .put_link(&private, referrers, &good, br#"{"a":1}"#)
        .unwrap();
    assert_eq!(
        store
            .get_link(&private, referrers, &good)
            .unwrap()
            .as_deref(),
        Some(&br#"{"a":1}"#[..])
    );
    assert_eq!(store.private_repos().unwrap(), vec![private.clone()]);
    store
        .put_tag(
            Area::Local,
            LOCAL_UPSTREAM,
            &private,
            &latest,
            "",
            &entry(md),
        )
        .unwrap();
    assert_eq!(
        store.catalog_names(None, 10),
        vec!["library/alpine".to_owned(), "private/app".to_owned()]
    );
    assert_eq!(
        store.catalog_names(Some("library/alpine"), 10),
        vec!["private/app".to_owned()]
    );
    assert!(store.remove_link(&private, referrers, &good).unwrap());
    assert!(!store.remove_link(&private, referrers, &good).unwrap());
    assert!(store.links(&private, referrers).unwrap().is_empty());

    store.probe_writable().unwrap();
}
