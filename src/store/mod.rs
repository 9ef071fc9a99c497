//! The content store: the one interface through which the mirror and the private registry keep
//! blobs, manifests, tags and repository links, and the backends behind it.
//!
//! [`ContentStore`] is that interface; [`Store`] is how the rest of berth holds one. Its only
//! backend today is [`disk::DiskStore`] (a data dir on local disk); another (object storage)
//! plugs in by implementing the trait, without touching the handlers. What every backend
//! promises:
//! - Content is addressed by digest and becomes visible only once verified: a blob is written
//!   through a [`BlobWriter`] (a local staging file, hashed as it is written) and published
//!   under its digest only when the bytes match, so concurrent writers of one digest write
//!   identical bytes and a crash or a mismatch leaves nothing.
//! - Tags and links are small records, last writer wins.
//! - Reads of blobs are streams of byte ranges ([`BlobReader`]), never a file handed out.
//!
//! The methods block (a disk, a network round trip): async callers run them through
//! [`blocking`]. Blob bodies are the exception: [`BlobReader::stream`] is async.
//!
//! Two areas: `Cache` holds mirrored content (evictable, see `mirror::cache`), `Local` the
//! private namespace (kept until `berth gc`).

pub mod disk;
mod fsck;
pub mod gc;
pub mod inventory;
pub mod lru;
pub mod manifests;
pub mod pages;
pub mod private;
pub mod s3;
pub mod state;
pub mod uploads;
mod writer;

pub use fsck::{fsck, FsckReport};
pub use writer::BlobWriter;

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::oci::names::{Digest, RepoName, Tag};
use pages::Pages;
use uploads::Uploads;

/// The content store as the rest of berth holds it: shared, whatever the backend.
pub type Store = Arc<dyn ContentStore>;

/// Which half of the store: the evictable mirror cache or the private namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    Cache,
    Local,
}

impl Area {
    pub fn name(self) -> &'static str {
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

/// A tag resolution as recorded in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    /// Written as its string form (`sha256:…`); a record whose digest does not parse reads as
    /// no entry.
    #[serde(with = "digest_string")]
    pub digest: Digest,
    pub media_type: String,
    /// Seconds since the epoch when the upstream last confirmed this digest.
    pub fetched_at: u64,
}

/// A digest in its string form, as tag records hold it.
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

/// What a private repository links to: a link is what makes content visible in a repository
/// (a blob pushed to `private/a` is not served from `private/b` until pushed or mounted there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Blobs (layers and configs) pushed or mounted into the repository.
    Layers,
    /// Manifests pushed into the repository.
    Manifests,
    /// Manifests whose `subject` is the given manifest; each link holds the referrer's
    /// descriptor as JSON.
    Referrers(Digest),
}

/// A stored blob as a listing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub len: u64,
    /// When it was written or last marked used (see [`ContentStore::mark_used`]).
    pub last_used: SystemTime,
}

/// A blob's bytes as a body stream, in pieces.
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + Sync>>;

/// A stored blob opened for reading: its length, and its bytes as a stream of any range.
pub struct BlobReader {
    len: u64,
    source: Box<dyn BlobSource>,
}

/// Where a [`BlobReader`]'s bytes come from; each backend has its own.
pub trait BlobSource: Send {
    /// Bytes `start..end` (end exclusive, within the blob), in pieces. `pages` says whether the
    /// pieces may be mappings of files (see [`Pages`]); a backend without files ignores it.
    fn stream(self: Box<Self>, start: u64, end: u64, pages: Pages) -> ByteStream;
}

impl BlobReader {
    pub fn new(len: u64, source: Box<dyn BlobSource>) -> BlobReader {
        BlobReader { len, source }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `start..end` of the blob (`end` at most [`len`](Self::len)).
    pub fn stream(self, start: u64, end: u64, pages: Pages) -> ByteStream {
        self.source.stream(start, end.min(self.len), pages)
    }
}

/// How a store with a remote part (a bucket) is doing.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoteStats {
    /// Requests to the remote part that failed (errors, timeouts, unreachable) since start.
    pub errors: u64,
    /// Bytes of the remote content kept in the local copy.
    pub local_bytes: u64,
}

/// The content store: blobs, manifests, tags and repository links, in two [`Area`]s.
///
/// Every method may block; call them from blocking threads (see [`blocking`]).
pub trait ContentStore: Send + Sync + 'static {
    // --- blobs (manifests are blobs too) -----------------------------------------------------

    /// The blob's length, when it is stored.
    fn blob_len(&self, area: Area, digest: &Digest) -> io::Result<Option<u64>>;

    /// The blob's length if this berth holds it without asking anyone else (no request over
    /// the network): cheap enough to call under a lock. For a store entirely on this machine,
    /// [`blob_len`](Self::blob_len).
    fn blob_len_held(&self, area: Area, digest: &Digest) -> io::Result<Option<u64>> {
        self.blob_len(area, digest)
    }

    /// Whether everything the store holds is on this machine, so that
    /// [`blob_len_held`](Self::blob_len_held) is the whole answer.
    fn all_held_here(&self) -> bool {
        true
    }

    /// Opens a stored blob for reading.
    fn open_blob(&self, area: Area, digest: &Digest) -> io::Result<Option<BlobReader>>;

    /// Starts a verified write of a blob: nothing is visible until [`BlobWriter::commit`]
    /// finds the bytes match `digest`.
    fn begin_blob(&self, area: Area, digest: Digest) -> io::Result<BlobWriter>;

    /// Publishes a local file that the caller has verified to hash to `digest` and made
    /// durable (a finished upload), taking it over.
    fn adopt_blob(&self, area: Area, digest: &Digest, verified: &Path) -> io::Result<()>;

    /// Removes a blob (and nothing else); removing what is not there is no error.
    fn remove_blob(&self, area: Area, digest: &Digest) -> io::Result<()>;

    /// Every blob of an area.
    fn blobs(&self, area: Area) -> io::Result<Vec<BlobInfo>>;

    /// Records that a blob was used now, for eviction and for `gc`'s grace period. Best effort.
    fn mark_used(&self, area: Area, digest: &Digest);

    /// Reads a stored blob whole and hashes it (`berth fsck`): its actual digest and length.
    fn hash_blob(&self, area: Area, digest: &Digest) -> io::Result<Option<(Digest, u64)>>;

    /// Stores a whole small blob in one call.
    fn put_blob(&self, area: Area, digest: Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.begin_blob(area, digest)?;
        w.write(bytes)?;
        w.commit()?;
        Ok(())
    }

    // --- manifests -------------------------------------------------------------------------

    /// Stores a manifest and its media type; the blob goes first, so a type never names nothing.
    fn put_manifest(
        &self,
        area: Area,
        digest: Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError>;

    /// A manifest's bytes and media type; a manifest whose bytes do not match its digest (found
    /// corrupt, or half evicted) is a miss.
    fn get_manifest(&self, area: Area, digest: &Digest) -> io::Result<Option<(Bytes, String)>>;

    /// Forgets a manifest's media type (the blob itself is removed separately).
    fn remove_manifest_type(&self, area: Area, digest: &Digest) -> io::Result<()>;

    /// Every manifest of an area: the digests with a recorded media type (their blobs may have
    /// gone since), unsorted.
    fn manifest_digests(&self, area: Area) -> io::Result<Vec<Digest>>;

    // --- tags ------------------------------------------------------------------------------
    // `upstream` is the registry a mirrored repository comes from (`LOCAL_UPSTREAM` for private
    // ones); `variant` separates resolutions of one tag that differ by what the client accepts.

    fn get_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
    ) -> io::Result<Option<TagEntry>>;

    fn put_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
        entry: &TagEntry,
    ) -> io::Result<()>;

    /// Whether there was such a tag.
    fn remove_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
    ) -> io::Result<bool>;

    /// Every tag of a repository with its variant and entry, sorted by tag and variant.
    fn list_tags(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
    ) -> io::Result<Vec<(Tag, String, TagEntry)>>;

    /// A repository's tags as (tag, variant), sorted, without reading their entries; `None`
    /// when the repository has no tags at all.
    fn tag_names(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
    ) -> io::Result<Option<Vec<(Tag, String)>>>;

    /// Every repository with tags in an area, as (upstream, name), sorted.
    fn list_repos(&self, area: Area) -> io::Result<Vec<(String, RepoName)>>;

    // --- links of private repositories -------------------------------------------------------

    /// Records a link; `body` is what [`get_link`](Self::get_link) gives back.
    fn put_link(
        &self,
        repo: &RepoName,
        kind: LinkKind,
        digest: &Digest,
        body: &[u8],
    ) -> io::Result<()>;

    fn get_link(
        &self,
        repo: &RepoName,
        kind: LinkKind,
        digest: &Digest,
    ) -> io::Result<Option<Vec<u8>>>;

    fn has_link(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> io::Result<bool>;

    /// Whether there was such a link.
    fn remove_link(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> io::Result<bool>;

    /// The digests linked into a repository, sorted.
    fn links(&self, repo: &RepoName, kind: LinkKind) -> io::Result<Vec<Digest>>;

    /// Every private repository that ever had a link or a tag, sorted.
    fn private_repos(&self) -> io::Result<Vec<RepoName>>;

    /// Up to `n` repository names after `last`, in byte order: the private repositories that
    /// hold a manifest or a tag, and the mirrored ones with a tag, of every upstream. A page
    /// costs about the same however many repositories the store holds.
    fn catalog_names(&self, last: Option<&str>, n: usize) -> Vec<String>;

    /// Up to `n` repositories of an area with tags, as (upstream, name), in that order.
    fn area_repos(&self, area: Area, n: usize) -> Vec<(String, String)>;

    // --- the rest ----------------------------------------------------------------------------

    /// Where this store stages the private namespace's blob uploads.
    fn uploads(&self) -> Uploads;

    /// Whether the store can take writes now (the readiness probe).
    fn probe_writable(&self) -> io::Result<()>;

    /// How a remote backend is doing, for metrics; `None` for a store on local disk only.
    fn remote_stats(&self) -> Option<RemoteStats> {
        None
    }

    /// A secret that every berth sharing this store reads the same (replicas sign their tokens
    /// with it); `None` for a store no other berth shares.
    fn cluster_secret(&self) -> io::Result<Option<[u8; 32]>> {
        Ok(None)
    }
}

/// The name a tag's record is kept under: the tag, then `@variant` when there is one.
pub(crate) fn tag_file(tag: &Tag, variant: &str) -> String {
    if variant.is_empty() {
        tag.as_str().to_owned()
    } else {
        format!("{tag}@{variant}")
    }
}

/// The tag and variant a record's name holds (see [`tag_file`]).
pub(crate) fn parse_tag_file(name: &str) -> Option<(Tag, String)> {
    let (tag, variant) = name.split_once('@').unwrap_or((name, ""));
    Some((Tag::parse(tag).ok()?, variant.to_owned()))
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
