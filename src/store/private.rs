//! The on-disk side of the private namespace: which content belongs to which repository, the
//! referrers index, and blob upload sessions. Every function here does blocking I/O; callers on
//! the async side run them through `spawn_blocking`.
//!
//! Layout (content itself lives in the store's local area, shared by all private repositories):
//! ```text
//! local/repos/_local/<repo>/_tags/<tag>                     tag -> digest (Store::put_tag)
//! local/repos/_local/<repo>/_layers/<hex>                   the blob belongs to the repository
//! local/repos/_local/<repo>/_manifests/<hex>                the manifest belongs to the repository
//! local/repos/_local/<repo>/_referrers/<subject hex>/<hex>  descriptor of a manifest whose subject
//!                                                           is <subject>
//! local/uploads/<id>/info                                   {"repo": …, "started": secs, "owner": user}
//! local/uploads/<id>/data                                   the bytes received so far
//! ```
//! A link is what makes content visible in a repository: a blob pushed to `private/a` is not
//! served from `private/b` until it is pushed or mounted there. Content no manifest refers to is
//! removed by `berth gc`.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::oci::manifest::Descriptor;
use crate::oci::names::{Digest, RepoName, Tag};
use crate::oci::routes::UploadId;
use crate::store::{
    hash_file, now_secs, rename_durable, Area, Store, StoreError, TagEntry, LOCAL_UPSTREAM,
};

const LAYERS: &str = "_layers";
const MANIFESTS: &str = "_manifests";
const REFERRERS: &str = "_referrers";
const TAGS: &str = "_tags";

/// What an upload session records besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadInfo {
    pub repo: String,
    /// Seconds since the epoch when the upload was started.
    pub started: u64,
    /// The user who started it, so that a restarted server still counts each user's open
    /// sessions against `max_uploads_per_user` (sessions of older versions have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// What `fsck_tags` found.
#[derive(Debug, Default)]
pub struct TagCheck {
    pub checked: u64,
    /// Tags naming a manifest their repository does not hold (removed when repairing).
    pub dangling: Vec<(RepoName, Tag, Digest)>,
}

#[derive(Clone)]
pub struct PrivateStore {
    store: Store,
}

impl PrivateStore {
    pub fn new(store: Store) -> PrivateStore {
        PrivateStore { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn repo_dir(&self, repo: &RepoName) -> PathBuf {
        self.store.local_repos_dir().join(repo.as_str())
    }

    fn link_path(&self, repo: &RepoName, kind: &str, digest: &Digest) -> PathBuf {
        self.repo_dir(repo).join(kind).join(digest.hex())
    }

    /// Whether anything was ever pushed to the repository.
    pub fn repo_exists(&self, repo: &RepoName) -> bool {
        self.repo_dir(repo).is_dir()
    }

    // --- blobs -------------------------------------------------------------------------------

    /// Makes a stored blob part of a repository, and marks it as recently used so a concurrent
    /// garbage collection leaves it alone.
    pub fn link_blob(&self, repo: &RepoName, digest: &Digest) -> io::Result<()> {
        self.write_link(repo, LAYERS, digest)?;
        touch(&self.store.blob_path(Area::Local, digest));
        Ok(())
    }

    /// The blob's length, when it is stored and belongs to the repository.
    pub fn blob_in_repo(&self, repo: &RepoName, digest: &Digest) -> io::Result<Option<u64>> {
        if !self.link_path(repo, LAYERS, digest).exists() {
            return Ok(None);
        }
        self.store.blob_len(Area::Local, digest)
    }

    pub fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        remove_existing(&self.link_path(repo, LAYERS, digest))
    }

    /// Marks blobs a manifest refers to as recently used (see `link_blob`).
    pub fn touch_blob(&self, digest: &Digest) {
        touch(&self.store.blob_path(Area::Local, digest));
    }

    // --- manifests and tags ----------------------------------------------------------------

    pub fn link_manifest(&self, repo: &RepoName, digest: &Digest) -> io::Result<()> {
        self.write_link(repo, MANIFESTS, digest)
    }

    pub fn manifest_in_repo(&self, repo: &RepoName, digest: &Digest) -> bool {
        self.link_path(repo, MANIFESTS, digest).exists()
    }

    pub fn unlink_manifest(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        remove_existing(&self.link_path(repo, MANIFESTS, digest))
    }

    /// Every manifest linked into the repository.
    pub fn manifests_of(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        read_links(&self.repo_dir(repo).join(MANIFESTS))
    }

    /// Every blob linked into the repository.
    pub fn blobs_of(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        read_links(&self.repo_dir(repo).join(LAYERS))
    }

    pub fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<Option<Digest>> {
        Ok(self
            .store
            .get_tag(Area::Local, LOCAL_UPSTREAM, repo, tag, "")?
            .map(|e| e.digest))
    }

    pub fn set_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        media_type: &str,
    ) -> io::Result<()> {
        let entry = TagEntry {
            digest: *digest,
            media_type: media_type.to_owned(),
            fetched_at: now_secs(),
        };
        self.store
            .put_tag(Area::Local, LOCAL_UPSTREAM, repo, tag, "", &entry)
    }

    pub fn remove_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<bool> {
        self.store
            .remove_tag(Area::Local, LOCAL_UPSTREAM, repo, tag, "")
    }

    /// The repository's tags with their digests, sorted by tag.
    pub fn tags(&self, repo: &RepoName) -> io::Result<Vec<(Tag, Digest)>> {
        Ok(self
            .store
            .list_tags(Area::Local, LOCAL_UPSTREAM, repo)?
            .into_iter()
            .filter(|(_, variant, _)| variant.is_empty())
            .map(|(tag, _, e)| (tag, e.digest))
            .collect())
    }

    /// Whether a tag naming `digest` resolves: the manifest is linked into the repository and
    /// stored intact.
    fn tag_resolves(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        Ok(self.manifest_in_repo(repo, digest)
            && self.store.get_manifest(Area::Local, digest)?.is_some())
    }

    /// Finds tags that name a manifest the repository does not hold (`berth fsck`): pulls of
    /// them fail though `tags/list` shows them. With `repair`, removes each one, unless a push
    /// made it resolve (or pointed it elsewhere) since it was looked at.
    pub fn fsck_tags(&self, repair: bool) -> io::Result<TagCheck> {
        let mut check = TagCheck::default();
        for repo in self.all_repos() {
            for (tag, digest) in self.tags(&repo)? {
                check.checked += 1;
                if self.tag_resolves(&repo, &digest)? {
                    continue;
                }
                if repair
                    && self.resolve_tag(&repo, &tag)? == Some(digest)
                    && !self.tag_resolves(&repo, &digest)?
                {
                    self.remove_tag(&repo, &tag)?;
                }
                check.dangling.push((repo.clone(), tag, digest));
            }
        }
        Ok(check)
    }

    // --- referrers -------------------------------------------------------------------------

    /// Records that `referrer` (described by `descriptor`, an OCI descriptor as JSON) has
    /// `subject` as its subject.
    pub fn add_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: &Descriptor,
    ) -> io::Result<()> {
        let path = self
            .repo_dir(repo)
            .join(REFERRERS)
            .join(subject.hex())
            .join(referrer.hex());
        let json = serde_json::to_vec(descriptor).map_err(io::Error::other)?;
        self.store.write_atomic(&path, &json)
    }

    pub fn remove_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> io::Result<()> {
        let dir = self.repo_dir(repo).join(REFERRERS).join(subject.hex());
        remove_existing(&dir.join(referrer.hex()))?;
        // Leave no empty directory behind; failing because another push just added one is fine.
        let _ = fs::remove_dir(&dir);
        Ok(())
    }

    /// Descriptors of the manifests in the repository whose subject is `subject`, sorted by
    /// digest so pages are stable.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> io::Result<Vec<serde_json::Value>> {
        let dir = self.repo_dir(repo).join(REFERRERS).join(subject.hex());
        let mut out = Vec::new();
        for digest in read_links(&dir)? {
            // A referrer deleted from the repository no longer counts, whatever is left on disk.
            if !self.manifest_in_repo(repo, &digest) {
                continue;
            }
            match fs::read(dir.join(digest.hex())) {
                Ok(bytes) => {
                    if let Ok(v) = serde_json::from_slice(&bytes) {
                        out.push(v);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One page of [`referrers`](Self::referrers): the descriptors of referrers whose digest
    /// sorts after `after` that `keep` accepts, at most `n`, reading at most `scan` of them.
    /// Returns the page and, when more may follow, the last digest looked at (where the next
    /// page starts), so a request costs its page however many referrers a subject has.
    pub fn referrers_page(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        n: usize,
        scan: usize,
        keep: &dyn Fn(&serde_json::Value) -> bool,
    ) -> io::Result<(Vec<serde_json::Value>, Option<Digest>)> {
        let dir = self.repo_dir(repo).join(REFERRERS).join(subject.hex());
        let links = read_links(&dir)?;
        let mut rest = links.iter().filter(|d| after.map_or(true, |a| *d > a));
        let mut out = Vec::new();
        let mut scanned = 0;
        let mut last = None;
        for digest in rest.by_ref() {
            last = Some(*digest);
            scanned += 1;
            // A referrer deleted from the repository no longer counts, whatever is left on disk.
            if self.manifest_in_repo(repo, digest) {
                match fs::read(dir.join(digest.hex())) {
                    Ok(bytes) => {
                        if let Ok(v) = serde_json::from_slice(&bytes) {
                            if keep(&v) {
                                out.push(v);
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            if out.len() >= n || scanned >= scan {
                break;
            }
        }
        let more = rest.next().is_some();
        Ok((out, if more { last } else { None }))
    }

    // --- repositories ----------------------------------------------------------------------

    /// Private repositories holding at least one manifest or tag, sorted.
    pub fn list_repos(&self) -> io::Result<Vec<RepoName>> {
        let mut out = Vec::new();
        walk_repos(&self.store.local_repos_dir(), "", &mut out);
        out.retain(|r| {
            let dir = self.repo_dir(r);
            non_empty(&dir.join(MANIFESTS)) || non_empty(&dir.join(TAGS))
        });
        out.sort();
        Ok(out)
    }

    /// Every private repository directory, whether or not it holds anything.
    pub fn all_repos(&self) -> Vec<RepoName> {
        let mut out = Vec::new();
        walk_repos(&self.store.local_repos_dir(), "", &mut out);
        out.sort();
        out
    }

    fn write_link(&self, repo: &RepoName, kind: &str, digest: &Digest) -> io::Result<()> {
        let path = self.link_path(repo, kind, digest);
        if path.exists() {
            return Ok(());
        }
        self.store
            .write_atomic(&path, digest.to_string().as_bytes())
    }

    // --- uploads ---------------------------------------------------------------------------

    fn upload_dir(&self, id: &UploadId) -> PathBuf {
        self.store.uploads_dir().join(id.as_str())
    }

    pub fn upload_data_path(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join("data")
    }

    /// Starts upload session `id` for a repository, on behalf of `owner`.
    pub fn create_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        owner: Option<&str>,
    ) -> io::Result<()> {
        let dir = self.upload_dir(id);
        let result = (|| {
            fs::create_dir_all(&dir)?;
            let info = UploadInfo {
                repo: repo.to_string(),
                started: now_secs(),
                owner: owner.map(str::to_owned),
            };
            let json = serde_json::to_vec(&info).map_err(io::Error::other)?;
            fs::write(dir.join("info"), json)?;
            File::create(dir.join("data"))?;
            Ok(())
        })();
        if result.is_err() {
            // A half-made session would only wait for expiry.
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    /// Every upload session with what its `info` records (sessions whose `info` is unreadable
    /// are left out; expiry still finds them through `uploads`).
    pub fn upload_infos(&self) -> io::Result<Vec<(UploadId, UploadInfo)>> {
        Ok(self
            .upload_ids()?
            .into_iter()
            .filter_map(|id| {
                let bytes = fs::read(self.upload_dir(&id).join("info")).ok()?;
                let info = serde_json::from_slice(&bytes).ok()?;
                Some((id, info))
            })
            .collect())
    }

    fn upload_ids(&self) -> io::Result<Vec<UploadId>> {
        let entries = match fs::read_dir(self.store.uploads_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| UploadId::parse(n).ok()))
            .collect())
    }

    /// Whether the session's directory exists.
    pub fn upload_exists(&self, id: &UploadId) -> bool {
        self.upload_dir(id).is_dir()
    }

    /// The session's size and last activity, when it exists.
    pub fn upload_activity(&self, id: &UploadId) -> io::Result<Option<(u64, SystemTime)>> {
        let dir = self.upload_dir(id);
        match fs::metadata(&dir) {
            Ok(m) => Ok(Some(dir_activity(&dir, &m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bytes received so far, when the upload exists and belongs to `repo`.
    pub fn upload_size(&self, repo: &RepoName, id: &UploadId) -> io::Result<Option<u64>> {
        let dir = self.upload_dir(id);
        let info = match fs::read(dir.join("info")) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Ok(info) = serde_json::from_slice::<UploadInfo>(&info) else {
            return Ok(None);
        };
        if info.repo != repo.as_str() {
            return Ok(None);
        }
        match fs::metadata(dir.join("data")) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the upload's data file for writing at its end.
    pub fn open_upload(&self, id: &UploadId) -> io::Result<File> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.upload_data_path(id))
    }

    /// Cuts the data back to `len` bytes (after a chunk that was refused half-way).
    pub fn truncate_upload(&self, id: &UploadId, len: u64) -> io::Result<()> {
        self.open_upload(id)?.set_len(len)
    }

    pub fn remove_upload(&self, id: &UploadId) -> io::Result<()> {
        match fs::remove_dir_all(self.upload_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Finishes an upload: hashes the data (streaming from disk), and when it matches
    /// `expected` makes it durable, moves it into the blob store and links it into `repo`.
    /// On a mismatch the upload is discarded and nothing is stored. Returns the blob's length.
    pub fn finish_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        expected: &Digest,
    ) -> Result<u64, StoreError> {
        let data = self.upload_data_path(id);
        let (actual, len) = hash_file(&data)?;
        if actual != *expected {
            self.remove_upload(id)?;
            return Err(StoreError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        File::open(&data)?.sync_all()?;
        rename_durable(&data, &self.store.blob_path(Area::Local, expected))?;
        self.link_blob(repo, expected)?;
        self.remove_upload(id)?;
        Ok(len)
    }

    /// Every upload session with its size and last activity (for garbage collection).
    pub fn uploads(&self) -> io::Result<Vec<(UploadId, u64, SystemTime)>> {
        let mut out = Vec::new();
        for id in self.upload_ids()? {
            // Gone since the listing: finished or cancelled meanwhile.
            if let Some((size, last)) = self.upload_activity(&id)? {
                out.push((id, size, last));
            }
        }
        Ok(out)
    }
}

/// The bytes an upload directory holds and when anything in it last changed.
fn dir_activity(dir: &Path, meta: &fs::Metadata) -> (u64, SystemTime) {
    let mut size = 0;
    let mut last = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if let Ok(files) = fs::read_dir(dir) {
        for f in files.filter_map(Result::ok) {
            if let Ok(m) = f.metadata() {
                size += m.len();
                if let Ok(t) = m.modified() {
                    last = last.max(t);
                }
            }
        }
    }
    (size, last)
}

fn touch(path: &Path) {
    if let Ok(f) = fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

fn remove_existing(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn non_empty(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// The digests named by the files of a link directory.
fn read_links(dir: &Path) -> io::Result<Vec<Digest>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<Digest> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            Digest::parse(&format!("sha256:{}", name.to_str()?)).ok()
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Collects repository names: a directory holding one of the `_` directories is a repository
/// (repository names never start with `_`, so these never collide with a name's segments).
fn walk_repos(dir: &Path, prefix: &str, out: &mut Vec<RepoName>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut is_repo = false;
    for e in entries.filter_map(Result::ok) {
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('_') {
            is_repo = true;
        } else if e.path().is_dir() {
            let next = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            walk_repos(&e.path(), &next, out);
        }
    }
    if is_repo {
        if let Ok(r) = RepoName::parse(prefix) {
            out.push(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PrivateStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, PrivateStore::new(store))
    }

    #[test]
    fn uploads_finish_into_the_store_and_link() {
        let (_dir, ps) = setup();
        let repo = RepoName::parse("private/app").unwrap();
        let other = RepoName::parse("private/other").unwrap();
        let id = UploadId::new();
        ps.create_upload(&repo, &id, Some("alice")).unwrap();
        assert_eq!(ps.upload_size(&repo, &id).unwrap(), Some(0));
        assert_eq!(
            ps.upload_infos().unwrap()[0].1.owner.as_deref(),
            Some("alice")
        );
        assert_eq!(ps.upload_size(&other, &id).unwrap(), None);
        fs::write(ps.upload_data_path(&id), b"hello").unwrap();
        let wrong = Digest::of(b"jello");
        assert!(matches!(
            ps.finish_upload(&repo, &id, &wrong),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert_eq!(ps.upload_size(&repo, &id).unwrap(), None);
        assert!(ps.store().blob_len(Area::Local, &wrong).unwrap().is_none());

        let id = UploadId::new();
        ps.create_upload(&repo, &id, None).unwrap();
        fs::write(ps.upload_data_path(&id), b"hello").unwrap();
        let good = Digest::of(b"hello");
        assert_eq!(ps.finish_upload(&repo, &id, &good).unwrap(), 5);
        assert_eq!(ps.blob_in_repo(&repo, &good).unwrap(), Some(5));
        assert_eq!(ps.blob_in_repo(&other, &good).unwrap(), None);
        assert!(ps.uploads().unwrap().is_empty());
        assert_eq!(ps.all_repos(), vec![repo.clone()]);
        // Blobs alone do not make a repository show in the catalog.
        assert!(ps.list_repos().unwrap().is_empty());
        let tag = Tag::parse("v1").unwrap();
        ps.link_manifest(&repo, &good).unwrap();
        ps.set_tag(&repo, &tag, &good, "x").unwrap();
        assert_eq!(ps.list_repos().unwrap(), vec![repo.clone()]);
        assert_eq!(ps.resolve_tag(&repo, &tag).unwrap(), Some(good));
        assert_eq!(ps.tags(&repo).unwrap(), vec![(tag, good)]);
    }

    #[test]
    fn fsck_finds_and_removes_dangling_tags() {
        let (_dir, ps) = setup();
        let repo = RepoName::parse("private/app").unwrap();
        let (m, gone) = (b"{\"m\":1}".as_slice(), Digest::of(b"gone"));
        let md = Digest::of(m);
        ps.store().put_manifest(Area::Local, md, "x", m).unwrap();
        ps.link_manifest(&repo, &md).unwrap();
        let (good, unlinked, missing) = (
            Tag::parse("good").unwrap(),
            Tag::parse("unlinked").unwrap(),
            Tag::parse("missing").unwrap(),
        );
        ps.set_tag(&repo, &good, &md, "x").unwrap();
        // Linked but not stored, and stored but not linked here.
        ps.link_manifest(&repo, &gone).unwrap();
        ps.set_tag(&repo, &missing, &gone, "x").unwrap();
        let other = RepoName::parse("private/other").unwrap();
        ps.set_tag(&other, &unlinked, &md, "x").unwrap();

        let check = ps.fsck_tags(false).unwrap();
        assert_eq!(check.checked, 3);
        assert_eq!(
            check.dangling,
            vec![
                (repo.clone(), missing.clone(), gone),
                (other.clone(), unlinked.clone(), md)
            ]
        );
        assert_eq!(
            ps.tags(&repo).unwrap().len(),
            2,
            "a check alone removes nothing"
        );
        assert_eq!(ps.fsck_tags(true).unwrap().dangling.len(), 2);
        assert_eq!(ps.tags(&repo).unwrap(), vec![(good, md)]);
        assert!(ps.tags(&other).unwrap().is_empty());
        let check = ps.fsck_tags(false).unwrap();
        assert_eq!((check.checked, check.dangling.len()), (1, 0));
    }
}
