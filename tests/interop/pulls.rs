//! Pushing test images to the upstream registry and checking what a pull through berth wrote:
//! shared by the skopeo and containerd tests (`skopeo.rs`, `tls.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::oci::{self, Artifact, Image};
use crate::procs::{self, Berth, Registry, Skopeo};

/// Pushes `artifact` to `registry` as `library/NAME:TAG` with its digests unchanged, and checks
/// that a direct pull from the registry gives back exactly those bytes, so that any later
/// difference is berth's.
pub fn push(skopeo: &Skopeo, registry: &Registry, artifact: &Artifact, name: &str, tag: &str) {
    push_repo(skopeo, registry, artifact, &format!("library/{name}"), tag);
}

/// [`push`] to any repository path (`owner/app`), not only under `library/`.
pub fn push_repo(skopeo: &Skopeo, registry: &Registry, artifact: &Artifact, repo: &str, tag: &str) {
    let layout = TempDir::new().expect("create a layout dir");
    artifact.write_layout(layout.path(), tag);
    let src = format!("oci:{}:{tag}", layout.path().display());
    let dest = format!("docker://{}/{repo}:{tag}", registry.addr);
    let mut args = vec!["--dest-tls-verify=false", "--preserve-digests"];
    if artifact.is_index() {
        args.push("--all");
    }
    args.extend([src.as_str(), dest.as_str()]);
    skopeo.copy(&args);

    let src = format!("docker://{}/{repo}:{tag}", registry.addr);
    let direct = pull(skopeo, &src, artifact.is_index());
    assert_pulled(
        direct.path(),
        &expected_files(artifact, None),
        "the direct pull from the upstream registry (before berth is involved)",
    );
}

/// `skopeo copy SRC dir:OUT` (with `--all` for an index), plain HTTP source.
pub fn pull_with(skopeo: &Skopeo, src: &str, extra: &[&str]) -> TempDir {
    let out = TempDir::new().expect("create a pull dir");
    let dest = format!("dir:{}", out.path().join("image").display());
    let mut args = vec!["--src-tls-verify=false"];
    args.extend_from_slice(extra);
    args.extend([src, dest.as_str()]);
    skopeo.copy(&args);
    out
}

pub fn pull(skopeo: &Skopeo, src: &str, all: bool) -> TempDir {
    pull_with(skopeo, src, if all { &["--all"] } else { &[] })
}

/// The files a `dir:` pull must hold: `manifest.json` is the tag's manifest (or the one platform
/// image asked for), an index's platform manifests are `<hex>.manifest.json`, blobs are `<hex>`.
pub fn expected_files(artifact: &Artifact, platform: Option<&Image>) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let images = match platform {
        Some(image) => {
            files.insert("manifest.json".to_owned(), image.manifest.bytes.clone());
            vec![image]
        }
        None => {
            files.insert("manifest.json".to_owned(), artifact.top().bytes.clone());
            let images = artifact.images();
            if artifact.is_index() {
                for image in &images {
                    files.insert(
                        format!("{}.manifest.json", oci::hex_of(&image.manifest.digest)),
                        image.manifest.bytes.clone(),
                    );
                }
            }
            images
        }
    };
    for image in images {
        for blob in image.blobs() {
            files.insert(oci::hex_of(&blob.digest).to_owned(), blob.bytes.clone());
        }
    }
    files
}

/// Asserts that the `dir:` layout under `out` holds exactly `expected` (plus skopeo's `version`).
pub fn assert_pulled(out: &Path, expected: &BTreeMap<String, Vec<u8>>, what: &str) {
    let dir = out.join("image");
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{what}: {dir:?}: {e}")) {
        let entry = entry.expect("read a pulled dir entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "version" {
            continue;
        }
        found.insert(
            name,
            std::fs::read(entry.path()).expect("read a pulled file"),
        );
    }
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !found.contains_key(*k))
        .collect();
    let extra: Vec<&String> = found
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: pulled files differ from what was pushed\n  missing: {missing:?}\n  \
         unexpected: {extra:?}"
    );
    for (name, want) in expected {
        let got = &found[name];
        assert!(
            got == want,
            "{what}: {name} differs from what was pushed: got {} bytes (sha256 {}), \
             want {} bytes (sha256 {})",
            got.len(),
            oci::sha256(got),
            want.len(),
            oci::sha256(want),
        );
    }
}

/// Waits until the upstream has logged `expected` more blob GETs than `before`, then asserts
/// they are exactly one GET of each expected digest, in `repo`.
pub fn assert_fetched_once(
    registry: &Registry,
    before: usize,
    repo: &str,
    expected: &BTreeMap<String, &oci::Blob>,
) {
    // A request is logged before its last bytes leave the registry, so once skopeo is done the
    // lines are there; the short poll only guards against a slow file system.
    let gets = procs::wait_for(
        &format!("{} upstream blob GETs", expected.len()),
        Duration::from_secs(5),
        || {
            let gets = registry.blob_gets();
            (gets.len() >= before + expected.len()).then_some(gets)
        },
    );
    let new = &gets[before..];
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (r, digest) in new {
        assert_eq!(r, repo, "upstream blob GET in an unexpected repository");
        *counts.entry(digest.as_str()).or_default() += 1;
    }
    let want: BTreeMap<&str, usize> = expected.keys().map(|d| (d.as_str(), 1)).collect();
    assert_eq!(
        counts, want,
        "the first pull through berth must GET each blob from upstream exactly once"
    );
}

pub fn assert_no_new_blob_gets(registry: &Registry, before: usize, what: &str) {
    let gets = registry.blob_gets();
    assert!(
        gets.len() == before,
        "{what} must be served from berth's cache, but upstream served {} blob GETs: {:?}",
        gets.len() - before,
        &gets[before..]
    );
}

/// Asserts that berth logged every blob GET after the first `skip` request lines as a hit.
pub fn assert_blob_hits(berth: &Berth, skip: usize, what: &str) {
    let served = berth.served();
    let blobs: Vec<_> = served[skip..]
        .iter()
        .filter(|s| s.route == "blob" && s.method == "GET")
        .collect();
    assert!(!blobs.is_empty(), "{what}: berth logged no blob GET");
    for s in blobs {
        assert!(
            s.status == 200 && s.cache == "hit",
            "{what}: berth served {} with status {} cache={}, want 200 cache=hit",
            s.path,
            s.status,
            s.cache
        );
    }
}
