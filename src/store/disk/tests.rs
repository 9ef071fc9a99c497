//! The disk backend's own checks: verified writes, repairs, tag records.

use super::*;
use crate::store::fsck;

#[test]
fn mismatched_or_dropped_writes_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    let good = Digest::of(b"hello");
    let mut w = store.begin_blob(Area::Cache, good).unwrap();
    w.write(b"jello").unwrap();
    assert!(matches!(w.commit(), Err(StoreError::DigestMismatch { .. })));
    assert!(store.open_blob(Area::Cache, &good).unwrap().is_none());
    let mut w = store.begin_blob(Area::Cache, good).unwrap();
    w.write(b"hel").unwrap();
    drop(w);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    store.put_blob(Area::Cache, good, b"hello").unwrap();
    assert_eq!(store.blob_len(Area::Cache, &good).unwrap(), Some(5));
    assert!(store.open_blob(Area::Local, &good).unwrap().is_none());
}

#[test]
fn fsck_finds_and_repairs_corrupt_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    let (good, bad) = (Digest::of(b"good"), Digest::of(b"bad"));
    store.put_blob(Area::Cache, good, b"good").unwrap();
    store.put_manifest(Area::Local, bad, "x", b"bad").unwrap();
    fs::write(store.blob_path(Area::Local, &bad), b"rot").unwrap();
    let r = fsck(&store, false).unwrap();
    assert_eq!((r.checked, r.corrupt.len()), (2, 1));
    assert!(store.blob_len(Area::Local, &bad).unwrap().is_some());
    fsck(&store, true).unwrap();
    assert!(store.blob_len(Area::Local, &bad).unwrap().is_none());
    assert!(store.get_manifest(Area::Local, &bad).unwrap().is_none());
    assert_eq!(fsck(&store, false).unwrap().corrupt.len(), 0);
}

#[test]
fn leftover_temp_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("tmp")).unwrap();
    fs::write(dir.path().join("tmp/partial"), b"half a layer").unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
    assert_eq!(store.remove_leftovers().unwrap(), 1);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn tags_round_trip_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    let repo = RepoName::parse("library/alpine").unwrap();
    let entry = TagEntry {
        digest: Digest::of(b"m"),
        media_type: "x".into(),
        fetched_at: 7,
    };
    for t in ["latest", "3.19"] {
        store
            .put_tag(
                Area::Cache,
                "docker.io",
                &repo,
                &Tag::parse(t).unwrap(),
                "v1",
                &entry,
            )
            .unwrap();
    }
    let got = store
        .get_tag(
            Area::Cache,
            "docker.io",
            &repo,
            &Tag::parse("latest").unwrap(),
            "v1",
        )
        .unwrap();
    assert_eq!(got, Some(entry));
    let tags: Vec<_> = store
        .list_tags(Area::Cache, "docker.io", &repo)
        .unwrap()
        .into_iter()
        .map(|t| t.0.to_string())
        .collect();
    assert_eq!(tags, ["3.19", "latest"]);
    assert_eq!(
        store.list_repos(Area::Cache).unwrap(),
        vec![("docker.io".to_owned(), repo)]
    );
}

#[test]
fn tag_files_keep_the_digest_as_its_string() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    let repo = RepoName::parse("library/alpine").unwrap();
    let tag = Tag::parse("latest").unwrap();
    let digest = Digest::of(b"m");
    let entry = TagEntry {
        digest,
        media_type: "x".into(),
        fetched_at: 7,
    };
    store
        .put_tag(Area::Cache, "docker.io", &repo, &tag, "", &entry)
        .unwrap();
    let file = store
        .tags_dir(Area::Cache, "docker.io", &repo)
        .join("latest");
    let written = fs::read_to_string(&file).unwrap();
    assert_eq!(
        written,
        format!(r#"{{"digest":"{digest}","media_type":"x","fetched_at":7}}"#)
    );
    // A file whose digest does not parse is no entry.
    fs::write(
        &file,
        r#"{"digest":"sha256:nothex","media_type":"x","fetched_at":7}"#,
    )
    .unwrap();
    let got = store
        .get_tag(Area::Cache, "docker.io", &repo, &tag, "")
        .unwrap();
    assert_eq!(got, None);
}
