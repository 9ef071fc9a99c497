//! What the mirror cache holds, read from the store (`berth cache ls` and `berth cache du`):
//! mirrored tags with their sizes and last pulls, and the bytes of each area. Read-only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::time::SystemTime;

use crate::oci::manifest;
use crate::oci::names::{Digest, RepoName, Tag};
use crate::store::{Area, ContentStore};

/// One cached tag of a mirrored repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedTag {
    pub upstream: String,
    pub repo: RepoName,
    pub tag: Tag,
    pub digest: Digest,
    /// The manifest and every blob it lists (for an index: with its cached child manifests
    /// and theirs), as the manifests declare them.
    pub size: u64,
    /// When the manifest was last served from the cache or written to it, as the store records
    /// uses (to within about a minute); None when the manifest itself is no longer cached.
    pub last_pull: Option<SystemTime>,
}

/// The cached tags of every mirrored repository (or of those `keep` accepts), sorted by
/// upstream, repository and tag; a tag resolved to different manifests for different clients
/// is listed once per manifest.
pub fn cached_tags(
    store: &dyn ContentStore,
    keep: impl Fn(&str, &RepoName) -> bool,
) -> io::Result<Vec<CachedTag>> {
    let used: HashMap<Digest, SystemTime> = store
        .blobs(Area::Cache)?
        .into_iter()
        .map(|b| (b.digest, b.last_used))
        .collect();
    let mut sizes = Sizes::default();
    let mut out = Vec::new();
    for (upstream, repo) in store.list_repos(Area::Cache)? {
        if !keep(&upstream, &repo) {
            continue;
        }
        let mut seen = HashSet::new();
        for (tag, _, entry) in store.list_tags(Area::Cache, &upstream, &repo)? {
            if !seen.insert((tag.clone(), entry.digest)) {
                continue;
            }
            out.push(CachedTag {
                size: sizes.of(store, &entry.digest, 0)?,
                last_pull: used.get(&entry.digest).copied(),
                upstream: upstream.clone(),
                repo: repo.clone(),
                tag,
                digest: entry.digest,
            });
        }
    }
    Ok(out)
}

/// Sizes of cached manifests with what they list, remembered across tags.
#[derive(Default)]
struct Sizes(HashMap<Digest, u64>);

impl Sizes {
    fn of(&mut self, store: &dyn ContentStore, d: &Digest, depth: u8) -> io::Result<u64> {
        if let Some(s) = self.0.get(d) {
            return Ok(*s);
        }
        let Some((bytes, media_type)) = store.get_manifest(Area::Cache, d)? else {
            return Ok(0);
        };
        let mut size = bytes.len() as u64;
        if let Ok(parsed) = manifest::parse_stored(&media_type, &bytes) {
            size += parsed.blobs.iter().map(|b| b.size).sum::<u64>();
            // Indexes nest one level in practice; the bound keeps a hostile one from recursing.
            for c in &parsed.children {
                size += if depth < 4 {
                    self.of(store, &c.digest, depth + 1)?
                } else {
                    0
                };
            }
        }
        self.0.insert(*d, size);
        Ok(size)
    }
}

/// How much the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub mirrored_bytes: u64,
    pub mirrored_blobs: usize,
    /// Bytes of the mirrored blobs (manifests included) the tags of each upstream lead to; a
    /// blob two upstreams share counts for both.
    pub per_upstream: BTreeMap<String, u64>,
    /// Mirrored bytes no cached tag leads to (manifests pulled by digest, leftovers).
    pub untagged_bytes: u64,
    pub private_bytes: u64,
    pub private_blobs: usize,
}

/// Totals of both areas, and the mirrored bytes per upstream.
pub fn usage(store: &dyn ContentStore) -> io::Result<Usage> {
    let cache: HashMap<Digest, u64> = store
        .blobs(Area::Cache)?
        .into_iter()
        .map(|b| (b.digest, b.len))
        .collect();
    let private = store.blobs(Area::Local)?;
    let mut usage = Usage {
        mirrored_bytes: cache.values().sum(),
        mirrored_blobs: cache.len(),
        private_bytes: private.iter().map(|b| b.len).sum(),
        private_blobs: private.len(),
        ..Usage::default()
    };
    let mut reached_any: HashSet<Digest> = HashSet::new();
    let mut reached: BTreeMap<String, HashSet<Digest>> = BTreeMap::new();
    for (upstream, repo) in store.list_repos(Area::Cache)? {
        let set = reached.entry(upstream.clone()).or_default();
        let mut todo: Vec<Digest> = store
            .list_tags(Area::Cache, &upstream, &repo)?
            .into_iter()
            .map(|(.., e)| e.digest)
            .collect();
        while let Some(d) = todo.pop() {
            if !set.insert(d) {
                continue;
            }
            if let Some((bytes, media_type)) = store.get_manifest(Area::Cache, &d)? {
                if let Ok(parsed) = manifest::parse_stored(&media_type, &bytes) {
                    set.extend(parsed.blobs.iter().map(|b| b.digest));
                    todo.extend(parsed.children.iter().map(|c| c.digest));
                }
            }
        }
    }
    for (upstream, set) in reached {
        let bytes = set.iter().filter_map(|d| cache.get(d)).sum();
        usage.per_upstream.insert(upstream, bytes);
        reached_any.extend(set);
    }
    usage.untagged_bytes = cache
        .iter()
        .filter(|(d, _)| !reached_any.contains(d))
        .map(|(_, len)| len)
        .sum();
    Ok(usage)
}
