//! The on-disk store: content-addressed blobs, manifests' media types, tag indexes.
//!
//! Layout under the data dir:
//! ```text
//! cache/blobs/sha256/ab/abcd…        mirrored blobs and manifests (evictable)
//! cache/types/sha256/ab/abcd…        media type of a mirrored manifest
//! cache/repos/<upstream>/<repo>/_tags/<tag>@<accept>   tag -> digest, with fetch time
//! local/…                            the same for the private namespace (never evicted)
//! local/repos/_local/<repo>/…        a private repository: tags, links, referrers (see `private_store`)
//! local/uploads/<id>/                a blob upload in progress (see `private_store`)
//! tmp/                               writes in progress; emptied at start
//! ```
//! Every write goes to a temp file under `tmp/` (same filesystem), is hashed as it is written,
//! checked against the expected digest, fsynced and renamed into place, so a crash or a mismatch
//! at any point leaves no entry. Paths are built only from parsed `Digest`s and `RepoName`s.

mod fsck;
pub mod gc;
mod listing;
pub mod manifests;
mod writer;

pub use fsck::FsckReport;
pub use writer::BlobWriter;
pub mod pages;
pub mod private;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::oci::names::{Digest, RepoName, Tag};

/// Which half of the store: the evictable mirror cache or the private namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    Cache,
    Local,
}

impl Area {
    fn dir(self) -> &'static str {
        match self {
            Area::Cache => "cache",
            Area::Local => "local",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content does not match digest {expected} (got {actual})")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("store I/O: {0}")]
    Io(#[from] io::Error),
}

/// A tag resolution as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    /// Written as its string form (`sha256:…`); a file whose digest does not parse reads as no
    /// entry.
    #[serde(with = "digest_string")]
    pub digest: Digest,
    pub media_type: String,
    /// Seconds since the epoch when the upstream last confirmed this digest.
    pub fetched_at: u64,
}

/// A digest in its string form, as tag files hold it.
mod digest_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::oci::names::Digest;

    pub fn serialize<S: Serializer>(digest: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(digest)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The upstream key private repositories' tags are filed under (not a valid upstream name).
pub const LOCAL_UPSTREAM: &str = "_local";

#[derive(Clone)]
pub struct Store {
    root: Arc<PathBuf>,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating) the store and removes leftovers of writes a crash interrupted.
    /// Opens (creating) the store. Safe beside a running server: it changes nothing that exists.
    pub fn open(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root.join("tmp"))?;
        for area in [Area::Cache, Area::Local] {
            fs::create_dir_all(root.join(area.dir()).join("blobs/sha256"))?;
        }
        Ok(Store {
            root: Arc::new(root.to_path_buf()),
        })
    }

    /// Removes writes a crash interrupted. Only the server that owns the data dir calls this,
    /// at start, before anything else can be writing.
    pub fn remove_leftovers(&self) -> io::Result<usize> {
        let mut removed = 0;
        for e in fs::read_dir(self.root.join("tmp"))?.filter_map(Result::ok) {
            if fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed unfinished writes left by an earlier run");
        }
        Ok(removed)
    }

    /// Opens an existing store without removing anything, for tools (such as `berth gc`) that
    /// may run beside a live server whose writes in `tmp/` must be left alone.
    pub fn open_existing(root: &Path) -> io::Result<Store> {
        if !root.join("local").is_dir() && !root.join("cache").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "not a berth data dir (it has no cache/ or local/ directory)",
            ));
        }
        Ok(Store {
            root: Arc::new(root.to_path_buf()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where upload sessions of the private namespace live, one directory per upload id.
    pub fn uploads_dir(&self) -> PathBuf {
        self.root.join(Area::Local.dir()).join("uploads")
    }

    /// The directories of private repositories: `<this>/<repo>/` holds `_tags` (the upstream key
    /// of private tags is `LOCAL_UPSTREAM`) and the repository's links.
    /// Writes and removes a file in `tmp/`: whether the store can take writes now.
    pub fn probe_writable(&self) -> io::Result<()> {
        let probe = self.root.join("tmp").join(".ready");
        std::fs::write(&probe, b"ok")?;
        std::fs::remove_file(&probe)
    }

    pub fn local_repos_dir(&self) -> PathBuf {
        self.root
            .join(Area::Local.dir())
            .join("repos")
            .join(LOCAL_UPSTREAM)
    }

    pub fn blob_path(&self, area: Area, digest: &Digest) -> PathBuf {
        self.sharded(area, "blobs/sha256", digest)
    }

    fn type_path(&self, area: Area, digest: &Digest) -> PathBuf {
        self.sharded(area, "types/sha256", digest)
    }

    /// `AREA/KIND/ab/abcd…`: files by digest, spread over 256 directories.
    fn sharded(&self, area: Area, kind: &str, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(area.dir())
            .join(kind)
            .join(&hex[..2])
            .join(hex)
    }

    pub fn blobs_dir(&self, area: Area) -> PathBuf {
        self.root.join(area.dir()).join("blobs/sha256")
    }

    fn tags_dir(&self, area: Area, upstream: &str, repo: &RepoName) -> PathBuf {
        self.root
            .join(area.dir())
            .join("repos")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags")
    }

    /// Opens a stored blob for reading, with its length.
    pub fn open_blob(&self, area: Area, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(area, digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn blob_len(&self, area: Area, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(area, digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts a verified write of a blob.
    pub fn begin_blob(&self, area: Area, expected: Digest) -> io::Result<BlobWriter> {
        let path = self.temp_path();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(BlobWriter {
            file: Arc::new(file),
            temp: Some(path),
            hasher: Sha256::new(),
            written: 0,
            dest: self.blob_path(area, &expected),
            expected,
        })
    }

    fn temp_path(&self) -> PathBuf {
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!(
            "{}-{n}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    /// Stores a whole small blob (a manifest) in one call.
    pub fn put_blob(&self, area: Area, digest: Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.begin_blob(area, digest)?;
        w.write(bytes)?;
        w.commit()?;
        Ok(())
    }

    /// Stores a manifest and its media type; the blob goes first so a type never names nothing.
    pub fn put_manifest(
        &self,
        area: Area,
        digest: Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.put_blob(area, digest, bytes)?;
        self.write_atomic(&self.type_path(area, &digest), media_type.as_bytes())?;
        Ok(())
    }

    pub fn get_manifest(&self, area: Area, digest: &Digest) -> io::Result<Option<(Bytes, String)>> {
        let media_type = match fs::read_to_string(self.type_path(area, digest)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match fs::read(self.blob_path(area, digest)) {
            // A manifest evicted or found corrupt by fsck is simply a miss.
            Ok(bytes) if Digest::of(&bytes) == *digest => {
                Ok(Some((Bytes::from(bytes), media_type)))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets a manifest's media type (the blob itself is removed separately).
    pub fn remove_manifest_type(&self, area: Area, digest: &Digest) -> io::Result<()> {
        remove_if_exists(&self.type_path(area, digest))
    }

    pub fn remove_blob(&self, area: Area, digest: &Digest) -> io::Result<()> {
        remove_if_exists(&self.blob_path(area, digest))
    }

    /// `variant` separates resolutions of one tag that differ by what the client accepts.
    pub fn get_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
    ) -> io::Result<Option<TagEntry>> {
        let path = self
            .tags_dir(area, upstream, repo)
            .join(tag_file(tag, variant));
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn put_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
        entry: &TagEntry,
    ) -> io::Result<()> {
        let path = self
            .tags_dir(area, upstream, repo)
            .join(tag_file(tag, variant));
        let json = serde_json::to_vec(entry).map_err(io::Error::other)?;
        self.write_atomic(&path, &json)
    }

    pub fn remove_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
    ) -> io::Result<bool> {
        let path = self
            .tags_dir(area, upstream, repo)
            .join(tag_file(tag, variant));
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every tag of a repository with its entry, sorted by tag name.
    pub fn list_tags(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
    ) -> io::Result<Vec<(Tag, String, TagEntry)>> {
        let dir = self.tags_dir(area, upstream, repo);
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (tag, variant) = name.split_once('@').unwrap_or((name, ""));
            let (Ok(tag), Ok(bytes)) = (Tag::parse(tag), fs::read(entry.path())) else {
                continue;
            };
            if let Ok(e) = serde_json::from_slice(&bytes) {
                out.push((tag, variant.to_owned(), e));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        Ok(out)
    }

    /// A repository's tag files as (tag, variant), sorted, without reading them; None when the
    /// repository has no tag directory. `upstream` must be a single path component.
    pub fn tag_names(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
    ) -> io::Result<Option<Vec<(Tag, String)>>> {
        let entries = match fs::read_dir(self.tags_dir(area, upstream, repo)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (tag, variant) = name.split_once('@').unwrap_or((name, ""));
            if let Ok(tag) = Tag::parse(tag) {
                out.push((tag, variant.to_owned()));
            }
        }
        out.sort();
        Ok(Some(out))
    }

    /// Every repository that has tags in an area, as (upstream, name).
    pub fn list_repos(&self, area: Area) -> io::Result<Vec<(String, RepoName)>> {
        let base = self.root.join(area.dir()).join("repos");
        let mut out = Vec::new();
        let Ok(upstreams) = fs::read_dir(&base) else {
            return Ok(out);
        };
        for up in upstreams.filter_map(Result::ok) {
            let Some(up_name) = up.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            collect_repos(&up.path(), "", &up_name, &mut out);
        }
        out.sort();
        Ok(out)
    }

    /// Writes a small file atomically: temp, fsync, rename.
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let temp = self.temp_path();
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&temp, dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

fn collect_repos(dir: &Path, prefix: &str, upstream: &str, out: &mut Vec<(String, RepoName)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name == "_tags" {
            if let Ok(repo) = RepoName::parse(prefix) {
                out.push((upstream.to_owned(), repo));
            }
        } else if e.path().is_dir() {
            let next = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            collect_repos(&e.path(), &next, upstream, out);
        }
    }
}

fn tag_file(tag: &Tag, variant: &str) -> String {
    if variant.is_empty() {
        tag.as_str().to_owned()
    } else {
        format!("{tag}@{variant}")
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The sha256 and length of a file, read in pieces of 1 MiB.
pub(crate) fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut f = io::BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hasher = Sha256::new();
    let len = io::copy(&mut f, &mut hasher)?;
    Ok((Digest::from_sha256(hasher.finalize().into()), len))
}

/// Moves a file into place (creating its directory), then syncs the directory: the rename is
/// durable only once the directory entry is.
pub(crate) fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    let parent = to.parent();
    if let Some(parent) = parent {
        fs::create_dir_all(parent)?;
    }
    fs::rename(from, to)?;
    if let Some(dir) = parent.and_then(|p| File::open(p).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Runs store I/O off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, crate::oci::error::RegistryError> {
    use crate::oci::error::RegistryError;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?
        .map_err(|e| RegistryError::Internal(format!("store: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_or_dropped_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
        let store = Store::open(dir.path()).unwrap();
        let (good, bad) = (Digest::of(b"good"), Digest::of(b"bad"));
        store.put_blob(Area::Cache, good, b"good").unwrap();
        store.put_manifest(Area::Local, bad, "x", b"bad").unwrap();
        fs::write(store.blob_path(Area::Local, &bad), b"rot").unwrap();
        let r = store.fsck(false).unwrap();
        assert_eq!((r.checked, r.corrupt.len()), (2, 1));
        assert!(store.blob_len(Area::Local, &bad).unwrap().is_some());
        store.fsck(true).unwrap();
        assert!(store.blob_len(Area::Local, &bad).unwrap().is_none());
        assert!(store.get_manifest(Area::Local, &bad).unwrap().is_none());
        assert_eq!(store.fsck(false).unwrap().corrupt.len(), 0);
    }

    #[test]
    fn leftover_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp/partial"), b"half a layer").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        assert_eq!(store.remove_leftovers().unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn tags_round_trip_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
        let store = Store::open(dir.path()).unwrap();
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
}
