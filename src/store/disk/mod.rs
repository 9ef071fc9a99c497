//! The content store on local disk: a data dir, the default backend.
//!
//! Layout under the data dir:
//! ```text
//! cache/blobs/sha256/ab/abcd…        mirrored blobs and manifests (evictable)
//! cache/types/sha256/ab/abcd…        media type of a mirrored manifest
//! cache/repos/<upstream>/<repo>/_tags/<tag>@<accept>   tag -> digest, with fetch time
//! local/…                            the same for the private namespace (never evicted)
//! local/repos/_local/<repo>/…        a private repository: tags and links (see `links`)
//! local/uploads/<id>/                a blob upload in progress (see `store::uploads`)
//! tmp/                               writes in progress; emptied at start
//! ```
//! Every write goes to a temp file under `tmp/` (same filesystem), is fsynced and renamed into
//! place, so a crash at any point leaves no entry; blobs are also hashed as they are written and
//! renamed only when they match. Paths are built only from parsed `Digest`s and `RepoName`s.

mod links;
mod listing;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::pages::{self, Pages};
use super::uploads::Uploads;
use super::{
    hash_file, parse_tag_file, rename_durable, tag_file, Area, BlobInfo, BlobReader, BlobSource,
    BlobWriter, ByteStream, ContentStore, LinkKind, StoreError, TagEntry, LOCAL_UPSTREAM,
};
use crate::oci::names::{Digest, RepoName, Tag};

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Clone)]
pub struct DiskStore {
    root: Arc<PathBuf>,
}

impl DiskStore {
    /// Opens (creating) the store. Safe beside a running server: it changes nothing that exists.
    pub fn open(root: &Path) -> io::Result<DiskStore> {
        fs::create_dir_all(root.join("tmp"))?;
        for area in [Area::Cache, Area::Local] {
            fs::create_dir_all(root.join(area.name()).join("blobs/sha256"))?;
        }
        Ok(DiskStore {
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
    pub fn open_existing(root: &Path) -> io::Result<DiskStore> {
        if !root.join("local").is_dir() && !root.join("cache").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "not a berth data dir (it has no cache/ or local/ directory)",
            ));
        }
        Ok(DiskStore {
            root: Arc::new(root.to_path_buf()),
        })
    }

    /// This store as the rest of berth holds one.
    pub fn shared(self) -> super::Store {
        Arc::new(self)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where upload sessions of the private namespace live, one directory per upload id.
    fn uploads_dir(&self) -> PathBuf {
        self.root.join(Area::Local.name()).join("uploads")
    }

    /// The directories of private repositories: `<this>/<repo>/` holds `_tags` (the upstream key
    /// of private tags is `LOCAL_UPSTREAM`) and the repository's links.
    fn local_repos_dir(&self) -> PathBuf {
        self.root
            .join(Area::Local.name())
            .join("repos")
            .join(LOCAL_UPSTREAM)
    }

    pub fn blob_path(&self, area: Area, digest: &Digest) -> PathBuf {
        self.sharded(area, "blobs/sha256", digest)
    }

    pub(crate) fn type_path(&self, area: Area, digest: &Digest) -> PathBuf {
        self.sharded(area, "types/sha256", digest)
    }

    /// `AREA/KIND/ab/abcd…`: files by digest, spread over 256 directories.
    fn sharded(&self, area: Area, kind: &str, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(area.name())
            .join(kind)
            .join(&hex[..2])
            .join(hex)
    }

    fn blobs_dir(&self, area: Area) -> PathBuf {
        self.root.join(area.name()).join("blobs/sha256")
    }

    fn tags_dir(&self, area: Area, upstream: &str, repo: &RepoName) -> PathBuf {
        self.root
            .join(area.name())
            .join("repos")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags")
    }

    /// A new, empty staging file under `tmp/` (for a [`BlobWriter`]).
    pub(crate) fn stage(&self) -> io::Result<(File, PathBuf)> {
        let path = self.temp_path();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    fn temp_path(&self) -> PathBuf {
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!(
            "{}-{n}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ))
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

/// A blob file opened for reading.
struct FileSource(File);

impl BlobSource for FileSource {
    fn stream(self: Box<Self>, start: u64, end: u64, pages: Pages) -> ByteStream {
        Box::pin(pages::file_reader(self.0, start, end, pages))
    }
}

impl ContentStore for DiskStore {
    fn blob_len(&self, area: Area, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(area, digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open_blob(&self, area: Area, digest: &Digest) -> io::Result<Option<BlobReader>> {
        match File::open(self.blob_path(area, digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some(BlobReader::new(len, Box::new(FileSource(f)))))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn begin_blob(&self, area: Area, expected: Digest) -> io::Result<BlobWriter> {
        let (file, path) = self.stage()?;
        let dest = self.blob_path(area, &expected);
        Ok(BlobWriter::new(
            file,
            path,
            expected,
            Box::new(move |temp| rename_durable(temp, &dest)),
        ))
    }

    fn adopt_blob(&self, area: Area, digest: &Digest, verified: &Path) -> io::Result<()> {
        rename_durable(verified, &self.blob_path(area, digest))
    }

    fn remove_blob(&self, area: Area, digest: &Digest) -> io::Result<()> {
        remove_if_exists(&self.blob_path(area, digest))
    }

    fn blobs(&self, area: Area) -> io::Result<Vec<BlobInfo>> {
        let mut out = Vec::new();
        let shards = match fs::read_dir(self.blobs_dir(area)) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for shard in shards.filter_map(Result::ok) {
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.filter_map(Result::ok) {
                let Some(digest) = f
                    .file_name()
                    .to_str()
                    .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok())
                else {
                    continue;
                };
                // Gone since the listing (evicted, collected): not a blob any more.
                let Ok(meta) = f.metadata() else { continue };
                out.push(BlobInfo {
                    digest,
                    len: meta.len(),
                    last_used: meta.modified().unwrap_or(UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    fn mark_used(&self, area: Area, digest: &Digest) {
        if let Ok(f) = fs::OpenOptions::new()
            .write(true)
            .open(self.blob_path(area, digest))
        {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    fn hash_blob(&self, area: Area, digest: &Digest) -> io::Result<Option<(Digest, u64)>> {
        match hash_file(&self.blob_path(area, digest)) {
            Ok(found) => Ok(Some(found)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put_manifest(
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

    fn get_manifest(&self, area: Area, digest: &Digest) -> io::Result<Option<(Bytes, String)>> {
        let media_type = match fs::read_to_string(self.type_path(area, digest)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match fs::read(self.blob_path(area, digest)) {
            Ok(bytes) if Digest::of(&bytes) == *digest => {
                Ok(Some((Bytes::from(bytes), media_type)))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn remove_manifest_type(&self, area: Area, digest: &Digest) -> io::Result<()> {
        remove_if_exists(&self.type_path(area, digest))
    }

    fn manifest_digests(&self, area: Area) -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        let shards = match fs::read_dir(self.root.join(area.name()).join("types/sha256")) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for shard in shards.filter_map(Result::ok) {
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            out.extend(files.filter_map(Result::ok).filter_map(|f| {
                let name = f.file_name();
                Digest::parse(&format!("sha256:{}", name.to_str()?)).ok()
            }));
        }
        Ok(out)
    }

    fn get_tag(
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

    fn put_tag(
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

    fn remove_tag(
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

    fn list_tags(
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
            let (Some((tag, variant)), Ok(bytes)) = (parse_tag_file(name), fs::read(entry.path()))
            else {
                continue;
            };
            if let Ok(e) = serde_json::from_slice(&bytes) {
                out.push((tag, variant, e));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        Ok(out)
    }

    fn tag_names(
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
            out.extend(parse_tag_file(name));
        }
        out.sort();
        Ok(Some(out))
    }

    fn list_repos(&self, area: Area) -> io::Result<Vec<(String, RepoName)>> {
        let base = self.root.join(area.name()).join("repos");
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

    fn put_link(
        &self,
        repo: &RepoName,
        kind: LinkKind,
        digest: &Digest,
        body: &[u8],
    ) -> io::Result<()> {
        self.write_atomic(&self.link_path(repo, kind, digest), body)
    }

    fn get_link(
        &self,
        repo: &RepoName,
        kind: LinkKind,
        digest: &Digest,
    ) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.link_path(repo, kind, digest)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn has_link(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> io::Result<bool> {
        self.link_path(repo, kind, digest).try_exists()
    }

    fn remove_link(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> io::Result<bool> {
        self.unlink(repo, kind, digest)
    }

    fn links(&self, repo: &RepoName, kind: LinkKind) -> io::Result<Vec<Digest>> {
        links::read_links(&self.links_dir(repo, kind))
    }

    fn private_repos(&self) -> io::Result<Vec<RepoName>> {
        let mut out = Vec::new();
        links::walk_repos(&self.local_repos_dir(), "", &mut out);
        out.sort();
        Ok(out)
    }

    fn catalog_names(&self, last: Option<&str>, n: usize) -> Vec<String> {
        self.catalog_page(last, n)
    }

    fn area_repos(&self, area: Area, n: usize) -> Vec<(String, String)> {
        self.area_page(area, n)
    }

    fn uploads(&self) -> Uploads {
        Uploads::new(self.uploads_dir())
    }

    fn probe_writable(&self) -> io::Result<()> {
        let probe = self.root.join("tmp").join(".ready");
        fs::write(&probe, b"ok")?;
        fs::remove_file(&probe)
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

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
