//! The content store on S3-compatible object storage, shared by any number of berth replicas,
//! with the data dir as a bounded local copy in front of it (`tier`).
//!
//! Keys under the configured prefix (the disk layout, without shards):
//! ```text
//! cache/blobs/sha256/<hex>                      mirrored blobs and manifests
//! cache/types/sha256/<hex>                      a mirrored manifest's media type
//! cache/repos/<upstream>/<repo>/_tags/<tag>[@<variant>]
//! local/…                                       the same for the private namespace
//! local/repos/_local/<repo>/_layers/<hex>       links (see `LinkKind`)
//! local/repos/_local/<repo>/_manifests/<hex>
//! local/repos/_local/<repo>/_referrers/<subject hex>/<hex>
//! ```
//!
//! Why it is safe without conditional writes (which S3-compatible servers do not all honour):
//! - A blob is written under its digest only after its bytes were verified, from a complete
//!   local file: two replicas writing one digest write the same bytes, and a replica killed
//!   mid-upload leaves no object (a multipart upload appears only when completed).
//! - A manifest's media type is written after its bytes, so a type never names nothing.
//! - Tags and links are small records, last writer wins (as registry:2 on S3).
//!
//! Reads: blobs and manifests (immutable, by digest) from the local copy first, then the
//! bucket, streaming while the local copy fills; tags, links and listings from the bucket (the
//! truth every replica shares), and from the local copy, with a warning, while the bucket
//! cannot be reached, so cached pulls and stale tags still answer. Writes go to both.

mod bucket;
mod fill;
mod keys;
mod tier;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

pub use bucket::Bucket;
use fill::BucketSource;
use keys::{
    blob_key, digest_of_key, link_key, links_dir, split_repo, tags_dir, type_key, used_key,
};
use tier::Tier;

use super::disk::DiskStore;
use super::uploads::Uploads;
use super::{
    now_secs, parse_tag_file, rename_durable, tag_file, Area, BlobInfo, BlobReader, BlobWriter,
    ContentStore, LinkKind, RemoteStats, StoreError, TagEntry, LOCAL_UPSTREAM,
};
use crate::config::S3Config;
use crate::oci::names::{Digest, RepoName, Tag};

pub struct S3Store {
    bucket: Arc<Bucket>,
    local: DiskStore,
    tier: Arc<Tier>,
    /// When the last "bucket unreachable, answering from the local copy" warning was logged.
    last_warning: AtomicU64,
}

impl S3Store {
    /// Opens the bucket client (nothing is sent yet) and the local copy in `data_dir`.
    pub fn open(config: &S3Config, data_dir: &Path) -> io::Result<S3Store> {
        let local = DiskStore::open(data_dir)?;
        let bucket = Arc::new(Bucket::open(config)?);
        let tier = Arc::new(Tier::open(local.clone(), config.max_local_size.0)?);
        Ok(S3Store {
            bucket,
            local,
            tier,
            last_warning: AtomicU64::new(0),
        })
    }

    /// The local copy.
    pub fn local(&self) -> &DiskStore {
        &self.local
    }

    /// The bucket's answer, or, when the bucket cannot be reached, the local copy's.
    fn or_local<T>(
        &self,
        remote: io::Result<T>,
        local: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        match remote {
            Ok(v) => Ok(v),
            Err(e) => {
                self.unreachable(&e);
                local()
            }
        }
    }

    /// A write to the bucket that failed: private content must reach it (the error stands);
    /// mirrored content still serves this replica from its local copy.
    fn shared_or_local(&self, area: Area, written: io::Result<()>, what: &str) -> io::Result<()> {
        match written {
            Err(e) if area == Area::Cache => {
                tracing::warn!(error = %e, "a mirrored {what} is kept locally only: the bucket cannot be reached");
                Ok(())
            }
            other => other,
        }
    }

    /// Says (at most every 10 s) that the bucket cannot be reached and what is done instead.
    fn unreachable(&self, e: &io::Error) {
        let now = now_secs();
        let last = self.last_warning.swap(now, Ordering::Relaxed);
        if now.saturating_sub(last) >= 10 {
            tracing::warn!(error = %e, "bucket unreachable: answering from the local copy");
        }
    }

    /// A mirrored blob the bucket cannot be asked about counts as absent: the mirror then
    /// fetches it from the upstream (and keeps it locally), rather than failing the pull. A
    /// private one has nowhere else to come from: the error stands.
    fn size_in_bucket(&self, area: Area, digest: &Digest) -> io::Result<Option<u64>> {
        match self.bucket.size(&blob_key(area, digest)) {
            Err(e) if area == Area::Cache => {
                self.unreachable(&e);
                Ok(None)
            }
            other => other,
        }
    }

    /// A writer whose commit makes the blob local and uploads it. A private blob that cannot be
    /// uploaded fails the commit (the bucket is where every replica finds it); a mirrored one
    /// stays local only, with a warning.
    fn writer(&self, area: Area, digest: Digest, upload: bool) -> io::Result<BlobWriter> {
        let (file, temp) = self.local.stage()?;
        let dest = self.local.blob_path(area, &digest);
        let (bucket, tier, key) = (
            self.bucket.clone(),
            self.tier.clone(),
            blob_key(area, &digest),
        );
        let publish = move |temp: &Path| {
            rename_durable(temp, &dest)?;
            let len = fs::metadata(&dest)?.len();
            if upload {
                if let Err(e) = bucket.put_file(&key, &dest) {
                    if area == Area::Local {
                        let _ = fs::remove_file(&dest);
                        return Err(e);
                    }
                    tracing::warn!(%digest, error = %e, "a mirrored blob is kept locally only: the upload to the bucket failed");
                }
            }
            tier.added(digest, len);
            Ok(())
        };
        Ok(BlobWriter::new(file, temp, digest, Box::new(publish)))
    }

    fn keys_under(&self, dir: &str) -> io::Result<Vec<String>> {
        Ok(self.bucket.list(dir)?.into_iter().map(|l| l.key).collect())
    }

    fn repos_in_bucket(&self, area: Area) -> io::Result<BTreeSet<(String, RepoName)>> {
        let base = format!("{}/repos/", area.name());
        let mut out = BTreeSet::new();
        for key in self.keys_under(&format!("{}/repos", area.name()))? {
            let Some(rest) = key.strip_prefix(&base) else {
                continue;
            };
            let Some((upstream, rest)) = rest.split_once('/') else {
                continue;
            };
            if let Some((repo, data)) = split_repo(rest) {
                if data.starts_with("_tags/") {
                    out.insert((upstream.to_owned(), repo));
                }
            }
        }
        Ok(out)
    }

    /// Private repositories with a key whose kind `keep` accepts (`_tags/…`, `_layers/…`).
    fn private_in_bucket(&self, keep: impl Fn(&str) -> bool) -> io::Result<BTreeSet<RepoName>> {
        let base = format!("local/repos/{LOCAL_UPSTREAM}/");
        let mut out = BTreeSet::new();
        for key in self.keys_under(&format!("local/repos/{LOCAL_UPSTREAM}"))? {
            if let Some((repo, data)) = key.strip_prefix(&base).and_then(split_repo) {
                if keep(data) {
                    out.insert(repo);
                }
            }
        }
        Ok(out)
    }
}

impl ContentStore for S3Store {
    fn blob_len(&self, area: Area, digest: &Digest) -> io::Result<Option<u64>> {
        if let Some(len) = self.local.blob_len(area, digest)? {
            return Ok(Some(len));
        }
        self.size_in_bucket(area, digest)
    }

    fn blob_len_held(&self, area: Area, digest: &Digest) -> io::Result<Option<u64>> {
        self.local.blob_len(area, digest)
    }

    fn all_held_here(&self) -> bool {
        false
    }

    fn open_blob(&self, area: Area, digest: &Digest) -> io::Result<Option<BlobReader>> {
        if let Some(local) = self.local.open_blob(area, digest)? {
            self.tier.used(area, digest);
            return Ok(Some(local));
        }
        let Some(len) = self.size_in_bucket(area, digest)? else {
            return Ok(None);
        };
        let key = blob_key(area, digest);
        let source = BucketSource {
            bucket: self.bucket.clone(),
            key,
            len,
            fill: self.writer(area, *digest, false).ok(),
        };
        Ok(Some(BlobReader::new(len, Box::new(source))))
    }

    fn begin_blob(&self, area: Area, digest: Digest) -> io::Result<BlobWriter> {
        self.writer(area, digest, true)
    }

    fn adopt_blob(&self, area: Area, digest: &Digest, verified: &Path) -> io::Result<()> {
        self.bucket.put_file(&blob_key(area, digest), verified)?;
        let len = fs::metadata(verified)?.len();
        self.local.adopt_blob(area, digest, verified)?;
        self.tier.added(*digest, len);
        Ok(())
    }

    fn remove_blob(&self, area: Area, digest: &Digest) -> io::Result<()> {
        self.bucket.delete(&blob_key(area, digest))?;
        self.bucket.delete(&used_key(area, digest))?;
        self.local.remove_blob(area, digest)?;
        self.tier.forget(digest);
        Ok(())
    }

    fn blobs(&self, area: Area) -> io::Result<Vec<BlobInfo>> {
        let used: std::collections::HashMap<Digest, std::time::SystemTime> = self
            .bucket
            .list(&format!("{}/used", area.name()))?
            .into_iter()
            .filter_map(|l| Some((digest_of_key(&l.key)?, l.modified)))
            .collect();
        Ok(self
            .bucket
            .list(&format!("{}/blobs/sha256", area.name()))?
            .into_iter()
            .filter_map(|l| {
                let digest = digest_of_key(&l.key)?;
                let marked = used.get(&digest).copied().unwrap_or(l.modified);
                Some(BlobInfo {
                    digest,
                    len: l.size,
                    last_used: l.modified.max(marked),
                })
            })
            .collect())
    }

    /// A use is recorded in the bucket, as a marker object written now, so that every replica
    /// sees it: `berth gc` spares a private blob a push just linked again (written before the
    /// push goes on), and the replica bounding the mirrored content evicts what the whole
    /// cluster used least recently (written in the background: a hit does not wait for it).
    fn mark_used(&self, area: Area, digest: &Digest) {
        self.tier.used(area, digest);
        let key = used_key(area, digest);
        match area {
            Area::Local => {
                if let Err(e) = self.bucket.put(&key, Bytes::from_static(b"used")) {
                    tracing::warn!(%digest, error = %e, "could not record a private blob's use in the bucket");
                }
            }
            Area::Cache => self.bucket.put_later(&key, Bytes::from_static(b"used")),
        }
    }

    fn hash_blob(&self, area: Area, digest: &Digest) -> io::Result<Option<(Digest, u64)>> {
        self.bucket.hash(&blob_key(area, digest))
    }

    fn put_manifest(
        &self,
        area: Area,
        digest: Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.put_blob(area, digest, bytes)?;
        self.local
            .write_atomic(&self.local.type_path(area, &digest), media_type.as_bytes())?;
        let remote = self
            .bucket
            .put(&type_key(area, &digest), Bytes::from(media_type.to_owned()));
        self.shared_or_local(area, remote, "manifest")?;
        Ok(())
    }

    fn get_manifest(&self, area: Area, digest: &Digest) -> io::Result<Option<(Bytes, String)>> {
        if let Some(found) = self.local.get_manifest(area, digest)? {
            return Ok(Some(found));
        }
        let Some(media_type) = self.bucket.get(&type_key(area, digest))? else {
            return Ok(None);
        };
        let Some(bytes) = self.bucket.get(&blob_key(area, digest))? else {
            return Ok(None);
        };
        if Digest::of(&bytes) != *digest {
            return Ok(None);
        }
        let media_type = String::from_utf8_lossy(&media_type).into_owned();
        // Kept locally for the next reader; a failure here only costs that reader a request.
        let _ = self
            .writer(area, *digest, false)
            .and_then(|mut w| {
                w.write(&bytes)?;
                w.commit().map_err(io::Error::other)
            })
            .and_then(|_| {
                self.local
                    .write_atomic(&self.local.type_path(area, digest), media_type.as_bytes())
            });
        Ok(Some((bytes, media_type)))
    }

    fn remove_manifest_type(&self, area: Area, digest: &Digest) -> io::Result<()> {
        self.bucket.delete(&type_key(area, digest))?;
        self.local.remove_manifest_type(area, digest)
    }

    fn manifest_digests(&self, area: Area) -> io::Result<Vec<Digest>> {
        Ok(self
            .bucket
            .list(&format!("{}/types/sha256", area.name()))?
            .into_iter()
            .filter_map(|l| digest_of_key(&l.key))
            .collect())
    }

    fn get_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
    ) -> io::Result<Option<TagEntry>> {
        let key = format!(
            "{}/{}",
            tags_dir(area, upstream, repo),
            tag_file(tag, variant)
        );
        let remote = self
            .bucket
            .get(&key)
            .map(|b| b.and_then(|b| serde_json::from_slice::<TagEntry>(&b).ok()));
        if let Ok(Some(entry)) = &remote {
            // Kept locally too, so that the tag still answers while the bucket cannot be
            // reached.
            if self
                .local
                .get_tag(area, upstream, repo, tag, variant)?
                .as_ref()
                != Some(entry)
            {
                self.local
                    .put_tag(area, upstream, repo, tag, variant, entry)?;
            }
        }
        self.or_local(remote, || {
            self.local.get_tag(area, upstream, repo, tag, variant)
        })
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
        let key = format!(
            "{}/{}",
            tags_dir(area, upstream, repo),
            tag_file(tag, variant)
        );
        let json = serde_json::to_vec(entry).map_err(io::Error::other)?;
        let remote = self.bucket.put(&key, Bytes::from(json));
        self.shared_or_local(area, remote, "tag")?;
        self.local
            .put_tag(area, upstream, repo, tag, variant, entry)
    }

    fn remove_tag(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
    ) -> io::Result<bool> {
        let key = format!(
            "{}/{}",
            tags_dir(area, upstream, repo),
            tag_file(tag, variant)
        );
        let existed = self.bucket.size(&key)?.is_some();
        self.bucket.delete(&key)?;
        let here = self.local.remove_tag(area, upstream, repo, tag, variant)?;
        Ok(existed || here)
    }

    fn list_tags(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
    ) -> io::Result<Vec<(Tag, String, TagEntry)>> {
        let remote = (|| {
            let mut out = Vec::new();
            for key in self.keys_under(&tags_dir(area, upstream, repo))? {
                let Some((tag, variant)) = key.rsplit('/').next().and_then(parse_tag_file) else {
                    continue;
                };
                let Some(bytes) = self.bucket.get(&key)? else {
                    continue;
                };
                if let Ok(e) = serde_json::from_slice(&bytes) {
                    out.push((tag, variant, e));
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            Ok(out)
        })();
        self.or_local(remote, || self.local.list_tags(area, upstream, repo))
    }

    fn tag_names(
        &self,
        area: Area,
        upstream: &str,
        repo: &RepoName,
    ) -> io::Result<Option<Vec<(Tag, String)>>> {
        let remote = self
            .keys_under(&tags_dir(area, upstream, repo))
            .map(|keys| {
                let mut out: Vec<(Tag, String)> = keys
                    .iter()
                    .filter_map(|k| k.rsplit('/').next().and_then(parse_tag_file))
                    .collect();
                out.sort();
                (!out.is_empty()).then_some(out)
            });
        self.or_local(remote, || self.local.tag_names(area, upstream, repo))
    }

    fn list_repos(&self, area: Area) -> io::Result<Vec<(String, RepoName)>> {
        let remote = self.repos_in_bucket(area).map(|s| s.into_iter().collect());
        self.or_local(remote, || self.local.list_repos(area))
    }

    fn put_link(
        &self,
        repo: &RepoName,
        kind: LinkKind,
        digest: &Digest,
        body: &[u8],
    ) -> io::Result<()> {
        self.bucket
            .put(&link_key(repo, kind, digest), Bytes::copy_from_slice(body))?;
        self.local.put_link(repo, kind, digest, body)
    }

    fn get_link(
        &self,
        repo: &RepoName,
        kind: LinkKind,
        digest: &Digest,
    ) -> io::Result<Option<Vec<u8>>> {
        let remote = self
            .bucket
            .get(&link_key(repo, kind, digest))
            .map(|b| b.map(|b| b.to_vec()));
        self.or_local(remote, || self.local.get_link(repo, kind, digest))
    }

    fn has_link(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> io::Result<bool> {
        let remote = self
            .bucket
            .size(&link_key(repo, kind, digest))
            .map(|s| s.is_some());
        self.or_local(remote, || self.local.has_link(repo, kind, digest))
    }

    fn remove_link(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> io::Result<bool> {
        let key = link_key(repo, kind, digest);
        let existed = self.bucket.size(&key)?.is_some();
        self.bucket.delete(&key)?;
        let here = self.local.remove_link(repo, kind, digest)?;
        Ok(existed || here)
    }

    fn links(&self, repo: &RepoName, kind: LinkKind) -> io::Result<Vec<Digest>> {
        let remote = self.keys_under(&links_dir(repo, kind)).map(|keys| {
            let mut out: Vec<Digest> = keys.iter().filter_map(|k| digest_of_key(k)).collect();
            out.sort();
            out
        });
        self.or_local(remote, || self.local.links(repo, kind))
    }

    fn private_repos(&self) -> io::Result<Vec<RepoName>> {
        let remote = self
            .private_in_bucket(|_| true)
            .map(|s| s.into_iter().collect());
        self.or_local(remote, || self.local.private_repos())
    }

    fn catalog_names(&self, last: Option<&str>, n: usize) -> Vec<String> {
        let remote = (|| {
            let mut names: BTreeSet<String> = self
                .private_in_bucket(|d| d.starts_with("_manifests/") || d.starts_with("_tags/"))?
                .into_iter()
                .map(|r| r.to_string())
                .collect();
            names.extend(
                self.repos_in_bucket(Area::Cache)?
                    .into_iter()
                    .map(|(_, r)| r.to_string()),
            );
            Ok(names
                .into_iter()
                .filter(|name| last.map_or(true, |l| name.as_str() > l))
                .take(n)
                .collect())
        })();
        self.or_local(remote, || Ok(self.local.catalog_names(last, n)))
            .unwrap_or_default()
    }

    fn area_repos(&self, area: Area, n: usize) -> Vec<(String, String)> {
        let remote = self.repos_in_bucket(area).map(|s| {
            s.into_iter()
                .take(n)
                .map(|(up, r)| (up, r.to_string()))
                .collect()
        });
        self.or_local(remote, || Ok(self.local.area_repos(area, n)))
            .unwrap_or_default()
    }

    fn uploads(&self) -> Uploads {
        self.local.uploads()
    }

    fn probe_writable(&self) -> io::Result<()> {
        self.local.probe_writable()
    }

    fn remote_stats(&self) -> Option<RemoteStats> {
        Some(RemoteStats {
            errors: self.bucket.errors.load(Ordering::Relaxed),
            local_bytes: self.tier.size(),
        })
    }

    /// Made by the first replica that finds none. Two replicas starting at once may both write
    /// one (there is no conditional write to stop the second); each reads back after the writes
    /// have settled, so both keep whichever landed last.
    fn cluster_secret(&self) -> io::Result<Option<[u8; 32]>> {
        const KEY: &str = "_berth/cluster-secret";
        let read = || -> io::Result<Option<[u8; 32]>> {
            Ok(self
                .bucket
                .get(KEY)?
                .and_then(|b| <[u8; 32]>::try_from(&b[..]).ok()))
        };
        if let Some(secret) = read()? {
            return Ok(Some(secret));
        }
        let fresh: [u8; 32] = rand::random();
        self.bucket.put(KEY, Bytes::copy_from_slice(&fresh))?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        Ok(Some(read()?.unwrap_or(fresh)))
    }
}
