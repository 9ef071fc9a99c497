//! Purging mirrored content on an admin's request: a cached tag, a cached manifest (with its
//! tags, and the blobs only it used), or a whole mirrored repository; then the memory caches
//! forget it, so the next pull goes to the upstream.
//!
//! The cache area keeps manifests and blobs by digest, shared by every mirrored repository, so
//! "only it used" is decided over the whole area: a blob stays while any other cached manifest
//! refers to it. Private content lives in the other area and is never touched.

use std::collections::{HashMap, HashSet};
use std::io;

use serde::Serialize;

use crate::mirror::upstream::Upstream;
use crate::mirror::Mirror;
use crate::oci::error::RegistryError;
use crate::oci::manifest;
use crate::oci::names::{Digest, RepoName, Tag};
use crate::store::{blocking, Area, ContentStore};

/// What to purge from one mirrored repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// The cached resolution of a tag (every accept variant); the manifest stays cached.
    Tag(Tag),
    /// A cached manifest, the repository's tags that point at it, its child manifests when it
    /// is an index, and the blobs no other cached manifest refers to.
    Manifest(Digest),
    /// Every tag of the repository, the manifests they point at (unless another repository's
    /// tag points there too), and the blobs nothing else refers to.
    Repository,
}

/// What a purge removed, as the admin API answers it.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct PurgeReport {
    pub upstream: String,
    pub repository: String,
    /// Tags removed (each once, whatever its variants).
    pub tags: Vec<String>,
    pub manifests: Vec<String>,
    /// Layers and configs removed.
    pub blobs: Vec<String>,
    /// Bytes freed: manifests and blobs.
    pub bytes: u64,
}

/// What a cached manifest refers to.
struct Refs {
    blobs: Vec<Digest>,
    children: Vec<Digest>,
}

/// Every manifest in the cache area with what it refers to (one that does not parse refers to
/// nothing, and protects nothing).
fn all_refs(store: &dyn ContentStore) -> io::Result<HashMap<Digest, Refs>> {
    let mut out = HashMap::new();
    for d in store.manifest_digests(Area::Cache)? {
        let Some((bytes, media_type)) = store.get_manifest(Area::Cache, &d)? else {
            continue;
        };
        let refs = match manifest::parse_stored(&media_type, &bytes) {
            Ok(p) => Refs {
                blobs: p.blobs.iter().map(|b| b.digest).collect(),
                children: p.children.iter().map(|c| c.digest).collect(),
            },
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "a cached manifest does not parse; it protects nothing from a purge");
                Refs {
                    blobs: Vec::new(),
                    children: Vec::new(),
                }
            }
        };
        out.insert(d, refs);
    }
    Ok(out)
}

/// Removes what `target` names from the store's cache area: `Ok(None)` when there is nothing
/// of it cached.
pub fn purge(
    store: &dyn ContentStore,
    upstream: &str,
    repo: &RepoName,
    target: &PurgeTarget,
) -> io::Result<Option<PurgeReport>> {
    let tags = store.list_tags(Area::Cache, upstream, repo)?;
    let refs = all_refs(store)?;
    // The tags to remove, and the manifests to consider removing (`asked`: named by digest,
    // removed whatever else refers to it).
    let (gone_tags, roots, asked): (Vec<_>, Vec<Digest>, Option<Digest>) = match target {
        PurgeTarget::Tag(t) => (
            tags.iter().filter(|(tag, ..)| tag == t).collect(),
            vec![],
            None,
        ),
        PurgeTarget::Manifest(d) => (
            tags.iter().filter(|(.., e)| e.digest == *d).collect(),
            vec![*d],
            Some(*d),
        ),
        PurgeTarget::Repository => (
            tags.iter().collect(),
            tags.iter().map(|(.., e)| e.digest).collect(),
            None,
        ),
    };
    let cached_root = roots.iter().any(|d| refs.contains_key(d));
    if gone_tags.is_empty() && !cached_root {
        return Ok(None);
    }
    // Candidates: the roots and, through indexes, their children.
    let mut candidates: HashSet<Digest> = HashSet::new();
    let mut todo = roots.clone();
    while let Some(d) = todo.pop() {
        if refs.contains_key(&d) && candidates.insert(d) {
            todo.extend(refs[&d].children.iter().copied());
        }
    }
    // Kept: every other cached manifest, and candidates another repository's tag points at;
    // with what they refer to.
    let mut kept_roots: Vec<Digest> = refs
        .keys()
        .filter(|d| !candidates.contains(d))
        .copied()
        .collect();
    if !candidates.is_empty() {
        for (up, other) in store.list_repos(Area::Cache)? {
            if up == upstream && other == *repo {
                continue;
            }
            for (.., e) in store.list_tags(Area::Cache, &up, &other)? {
                if candidates.contains(&e.digest) && Some(e.digest) != asked {
                    kept_roots.push(e.digest);
                }
            }
        }
    }
    let mut kept: HashSet<Digest> = HashSet::new();
    while let Some(d) = kept_roots.pop() {
        if Some(d) != asked && kept.insert(d) {
            if let Some(r) = refs.get(&d) {
                kept_roots.extend(r.children.iter().copied());
            }
        }
    }
    let manifests: Vec<Digest> = candidates.difference(&kept).copied().collect();
    let kept_blobs: HashSet<Digest> = kept
        .iter()
        .filter_map(|d| refs.get(d))
        .flat_map(|r| r.blobs.iter().copied())
        .collect();
    let blobs: HashSet<Digest> = manifests
        .iter()
        .flat_map(|d| refs[d].blobs.iter().copied())
        .filter(|b| !kept_blobs.contains(b))
        .collect();

    let mut report = PurgeReport {
        upstream: upstream.to_owned(),
        repository: repo.to_string(),
        ..PurgeReport::default()
    };
    for (tag, variant, _) in &gone_tags {
        store.remove_tag(Area::Cache, upstream, repo, tag, variant)?;
        if report.tags.last().map(String::as_str) != Some(tag.as_str()) {
            report.tags.push(tag.to_string());
        }
    }
    for d in &manifests {
        report.bytes += store.blob_len(Area::Cache, d)?.unwrap_or(0);
        store.remove_manifest_type(Area::Cache, d)?;
        store.remove_blob(Area::Cache, d)?;
        report.manifests.push(d.to_string());
    }
    for d in &blobs {
        if let Some(len) = store.blob_len(Area::Cache, d)? {
            report.bytes += len;
            store.remove_blob(Area::Cache, d)?;
            report.blobs.push(d.to_string());
        }
    }
    report.manifests.sort();
    report.blobs.sort();
    Ok(Some(report))
}

impl Mirror {
    /// Purges mirrored content (see [`purge`]) and makes the memory caches forget it.
    pub async fn purge(
        &self,
        up: &Upstream,
        repo: &RepoName,
        target: PurgeTarget,
    ) -> Result<PurgeReport, RegistryError> {
        let store = self.store().clone();
        let (key, name, t) = (up.key.clone(), repo.clone(), target.clone());
        let report = blocking(move || purge(&*store, &key, &name, &t))
            .await
            .inspect_err(|e| {
                tracing::warn!(upstream = %up.key, repository = %repo, error = %e, "purge failed; part of it may be done");
            })?;
        let Some(report) = report else {
            return Err(match target {
                PurgeTarget::Repository => {
                    RegistryError::NameUnknown(format!("{repo} has nothing cached"))
                }
                PurgeTarget::Tag(t) => RegistryError::ManifestUnknown(format!("{repo}:{t}")),
                PurgeTarget::Manifest(d) => RegistryError::ManifestUnknown(format!("{repo}@{d}")),
            });
        };
        // Tag resolutions are keyed by variant too: forget every one of this repository's.
        let (k, r) = (up.key.clone(), repo.clone());
        let gone: HashSet<String> = report.tags.iter().cloned().collect();
        let stale: Vec<_> = self
            .tags
            .iter()
            .filter(|(key, _)| key.0 == k && key.1 == r && gone.contains(key.2.as_str()))
            .map(|(key, _)| (*key).clone())
            .collect();
        for key in stale {
            self.tags.invalidate(&key).await;
        }
        for d in report.manifests.iter().chain(&report.blobs) {
            if let Ok(d) = Digest::parse(d) {
                self.manifests.forget(Area::Cache, &d).await;
                self.disk.forget(&d);
            }
        }
        tracing::info!(upstream = %report.upstream, repository = %report.repository, tags = report.tags.len(), manifests = report.manifests.len(), blobs = report.blobs.len(), bytes = report.bytes, "purged mirrored content");
        Ok(report)
    }
}
