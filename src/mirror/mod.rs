//! The mirror: how a pull is answered from the caches, and when the upstream is asked.
//!
//! Manifests by digest are immutable: memory, then disk, then one upstream GET. Tags are
//! mutable: a resolution younger than the upstream's `tag_ttl` is answered from the cache; an
//! older one is revalidated with a HEAD and re-fetched only when the digest moved; when the
//! upstream is down (unreachable, timing out, 5xx or 429) the cached resolution is served stale.
//! Resolutions are kept per accepted media-type set, so a client is never handed a manifest kind
//! it did not ask for. Identical concurrent upstream requests are coalesced.
//!
//! [`warm`] puts images in the cache before anyone pulls them (`[[warm]]`, `berth warm`, and
//! prefetching a moved tag's new image).

pub mod admission;
pub mod cache;
mod download;
pub mod fetch;
pub mod purge;
pub mod singleflight;
pub mod slots;
pub mod upstream;
pub mod warm;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::config::Config;
use crate::mirror::cache::DiskCache;
use crate::mirror::fetch::{Attach, Fetches};
use crate::mirror::singleflight::SingleFlight;
use crate::mirror::slots::UpstreamSlots;
use crate::mirror::upstream::{Upstream, UpstreamError, UpstreamSetupError};
use crate::oci::error::RegistryError;
use crate::oci::media::AcceptSet;
use crate::oci::names::{Digest, Reference, RepoName, Tag};
use crate::store::manifests::{CachedManifest, Manifests};
use crate::store::{blocking, now_secs, Area, Store, TagEntry};

/// The largest tag list taken from an upstream.
const MAX_TAG_LIST: usize = 16 << 20;

/// How a request was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    /// Joined an upstream request another client started.
    Joined,
    /// Served from cache because the upstream is down.
    Stale,
    /// Private namespace, never upstream.
    Local,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Joined => "joined",
            Outcome::Stale => "stale",
            Outcome::Local => "local",
        }
    }
}

/// A manifest ready to serve.
#[derive(Clone)]
pub struct ServedManifest {
    pub manifest: CachedManifest,
    pub digest: Digest,
}

type TagKey = (String, RepoName, Tag, String);
/// The length of a digest's string form (`sha256:` and 64 hex digits), as a tag entry weighs.
const DIGEST_TEXT_LEN: usize = "sha256:".len() + 64;
/// Upstream, repository, and the `n`/`last` query passed on.
type TagListKey = (String, RepoName, String);

/// A tag list as the upstream sent it, kept for when the upstream is down.
#[derive(Clone)]
pub struct TagList {
    pub body: Bytes,
    pub link: Option<http::HeaderValue>,
}
type ManifestKey = (String, RepoName, Reference, String);
type ManifestResult = Result<(ServedManifest, Outcome), RegistryError>;

pub struct Mirror {
    store: Store,
    pub disk: Arc<DiskCache>,
    pub fetches: Arc<Fetches>,
    upstreams: HashMap<String, Arc<Upstream>>,
    default_upstream: String,
    /// Manifests by digest, shared with the private registry.
    pub manifests: Arc<Manifests>,
    tags: moka::future::Cache<TagKey, TagEntry>,
    manifest_flights: SingleFlight<ManifestKey, ManifestResult>,
    tag_lists: moka::future::Cache<TagListKey, TagList>,
    pub stale_serves: AtomicU64,
    /// The cap on upstream fetches running at once (`rate_limit.max_upstream_concurrency`).
    pub slots: Arc<UpstreamSlots>,
    /// Warming's counts and the prefetches of moved tags under way (see [`warm`]).
    pub warm: warm::Warming,
}

impl Mirror {
    pub fn new(config: &Config, store: Store) -> Result<Mirror, MirrorSetupError> {
        // A replica that does not evict from a shared bucket leaves the bound to the one that
        // does (see `[storage] evict`).
        let bound = if config.storage.evicts() {
            config.max_cache_size.0
        } else {
            u64::MAX
        };
        // On a bucket shared by replicas another one may be streaming a blob this one would
        // evict: spare what any replica used within two recorded uses' worth of time.
        let spare = match config.storage {
            crate::config::StorageConfig::S3(_) => 2 * crate::store::lru::TOUCH_EVERY,
            crate::config::StorageConfig::Disk => 0,
        };
        let disk = Arc::new(
            DiskCache::open_sparing(store.clone(), bound, std::time::Duration::from_secs(spare))
                .map_err(MirrorSetupError::Store)?,
        );
        let mut upstreams = HashMap::new();
        for (key, up) in &config.upstreams {
            let client =
                Upstream::new(key, up).map_err(|e| MirrorSetupError::Upstream(key.clone(), e))?;
            upstreams.insert(key.clone(), Arc::new(client));
        }
        let slots = Arc::new(UpstreamSlots::new(&config.rate_limit));
        Ok(Mirror {
            fetches: Arc::new(
                Fetches::new(disk.clone(), config.max_orphan_download.0).with_slots(slots.clone()),
            ),
            slots,
            disk,
            manifests: Arc::new(Manifests::new(store.clone(), config.memory_cache_size.0)),
            store,
            upstreams,
            default_upstream: config.default_upstream.clone(),
            // Tag resolutions are small; a quarter of the memory budget holds a great many.
            tags: moka::future::Cache::builder()
                .max_capacity(config.memory_cache_size.0 / 4)
                .weigher(|k: &TagKey, e: &TagEntry| {
                    let bytes = k.0.len() + k.1.as_str().len() + k.2.as_str().len() + k.3.len();
                    (bytes + DIGEST_TEXT_LEN + e.media_type.len() + 64) as u32
                })
                .build(),
            manifest_flights: SingleFlight::default(),
            // The last answer to each tag-list query, served while the upstream is down.
            tag_lists: moka::future::Cache::builder()
                .max_capacity(config.memory_cache_size.0 / 8)
                .weigher(|k: &TagListKey, l: &TagList| {
                    (k.0.len() + k.1.as_str().len() + k.2.len() + l.body.len() + 64)
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .build(),
            stale_serves: AtomicU64::new(0),
            warm: warm::Warming::default(),
        })
    }

    /// Manifest requests that joined an upstream request already under way.
    pub fn manifest_joins(&self) -> u64 {
        self.manifest_flights.joined.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn upstreams(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.upstreams.values()
    }

    /// What people see an upstream's key as (see [`upstream::display_name`]); a key no longer
    /// configured (cache left from an earlier config) as itself.
    pub fn upstream_name<'a>(&'a self, key: &'a str) -> &'a str {
        self.upstreams.get(key).map_or(key, |u| u.name.as_str())
    }

    /// Picks the upstream a request means (containerd's `?ns=`, else the default) and the
    /// repository name as that upstream spells it.
    pub fn route(
        &self,
        ns: Option<&str>,
        name: RepoName,
    ) -> Result<(Arc<Upstream>, RepoName), RegistryError> {
        let key = ns.unwrap_or(&self.default_upstream);
        let up = self
            .upstreams
            .get(key)
            .ok_or_else(|| {
                RegistryError::NameUnknown(format!("no upstream is configured for ns={key}"))
            })?
            .clone();
        let name = if up.is_docker_hub() {
            name.with_library_prefix()
        } else {
            name
        };
        Ok((up, name))
    }

    /// A mirrored manifest, by tag or digest.
    pub async fn manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
        accept: &AcceptSet,
    ) -> Result<(ServedManifest, Outcome), RegistryError> {
        match reference {
            Reference::Digest(d) => {
                if let Some(m) = self.cached_manifest(d).await? {
                    return Ok((m, Outcome::Hit));
                }
            }
            Reference::Tag(tag) => {
                if let Some(entry) = self.tag_entry(up, repo, tag, &accept.variant).await? {
                    let fresh =
                        now_secs().saturating_sub(entry.fetched_at) < up.config.tag_ttl.0.as_secs();
                    if fresh {
                        if let Some(m) = self.manifest_for_entry(&entry).await? {
                            return Ok((m, Outcome::Hit));
                        }
                    }
                }
            }
        }
        self.manifest_from_upstream(up, repo, reference, accept)
            .await
    }

    /// A manifest asked of the upstream whatever the cache holds: a cached tag is revalidated
    /// with a HEAD and fetched only when its digest moved. Concurrent identical requests share one.
    pub async fn manifest_from_upstream(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
        accept: &AcceptSet,
    ) -> Result<(ServedManifest, Outcome), RegistryError> {
        crate::mirror::admission::before_upstream()?;
        let key = (
            up.key.clone(),
            repo.clone(),
            reference.clone(),
            accept.variant.clone(),
        );
        let this = self.clone();
        let (up2, repo2, reference2, accept2) =
            (up.clone(), repo.clone(), reference.clone(), accept.clone());
        let (result, joined) = self
            .manifest_flights
            .run(key, move || async move {
                this.fetch_manifest(&up2, &repo2, &reference2, &accept2)
                    .await
            })
            .await;
        match result.map_err(|e| RegistryError::Unavailable(e.to_string()))? {
            Ok((m, Outcome::Miss)) if joined => Ok((m, Outcome::Joined)),
            other => other,
        }
    }

    /// Asks the upstream, revalidating a cached tag with a HEAD first.
    async fn fetch_manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
        accept: &AcceptSet,
    ) -> Result<(ServedManifest, Outcome), RegistryError> {
        // One of the upstream fetch slots, held until the upstream has answered.
        let slot = self.slots.acquire(up.config.response_timeout.0).await;
        let Reference::Tag(tag) = reference else {
            let _slot =
                slot.map_err(|e| upstream_error(e, repo, manifest_unknown(repo, reference)))?;
            let fetched = up
                .get_manifest(repo, reference, &accept.header)
                .await
                .map_err(|e| upstream_error(e, repo, manifest_unknown(repo, reference)))?;
            let served = self
                .keep_manifest(fetched.digest, &fetched.media_type, fetched.bytes)
                .await?;
            return Ok((served, Outcome::Miss));
        };
        let cached = match self.tag_entry(up, repo, tag, &accept.variant).await? {
            Some(entry) => self.manifest_for_entry(&entry).await?.map(|m| (entry, m)),
            None => None,
        };
        let _slot = match slot {
            Ok(slot) => slot,
            Err(e) => {
                return match cached {
                    Some((_, served)) => Ok(self.stale(up, repo, tag, &e, served)),
                    None => Err(upstream_error(e, repo, manifest_unknown(repo, reference))),
                }
            }
        };
        if let Some((entry, served)) = &cached {
            match up.head_manifest(repo, reference, &accept.header).await {
                Ok(Some((digest, _, _))) if digest == served.digest => {
                    let entry = TagEntry {
                        fetched_at: now_secs(),
                        ..entry.clone()
                    };
                    self.put_tag(up, repo, tag, &accept.variant, entry).await?;
                    return Ok((served.clone(), Outcome::Hit));
                }
                Ok(_) => {}
                Err(e) if e.is_outage() => {
                    return Ok(self.stale(up, repo, tag, &e, served.clone()))
                }
                Err(e) => return Err(upstream_error(e, repo, manifest_unknown(repo, reference))),
            }
        }
        match up.get_manifest(repo, reference, &accept.header).await {
            Ok(fetched) => {
                let media_type = fetched.media_type.clone();
                let served = self
                    .keep_manifest(fetched.digest, &fetched.media_type, fetched.bytes)
                    .await?;
                let entry = TagEntry {
                    digest: served.digest,
                    media_type,
                    fetched_at: now_secs(),
                };
                self.put_tag(up, repo, tag, &accept.variant, entry).await?;
                if let Some((_, old)) = cached {
                    if old.digest != served.digest && up.config.prefetch_on_move {
                        warm::prefetch_moved(self, up, repo, old, served.digest);
                    }
                }
                Ok((served, Outcome::Miss))
            }
            Err(e) if e.is_outage() => match cached {
                Some((_, served)) => Ok(self.stale(up, repo, tag, &e, served)),
                None => Err(upstream_error(e, repo, manifest_unknown(repo, reference))),
            },
            Err(e) => Err(upstream_error(e, repo, manifest_unknown(repo, reference))),
        }
    }

    /// A repository's tag list from the upstream (`pass`: its `n` and `last`), or the last one
    /// it sent while it is down.
    pub async fn tags_list(
        &self,
        up: &Upstream,
        repo: &RepoName,
        pass: &str,
    ) -> Result<(TagList, Outcome), RegistryError> {
        let key = (up.key.clone(), repo.clone(), pass.to_owned());
        let fetched = async {
            let resp = up.tags_list(repo, pass).await?;
            let link = resp.headers().get(http::header::LINK).cloned();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_TAG_LIST)
                .collect()
                .await
                .map_err(|e| UpstreamError::Invalid(format!("reading tag list: {e}")))?
                .to_bytes();
            Ok::<_, UpstreamError>(TagList { body, link })
        }
        .await;
        match fetched {
            Ok(list) => {
                self.tag_lists.insert(key, list.clone()).await;
                Ok((list, Outcome::Miss))
            }
            Err(e) if e.is_outage() => match self.tag_lists.get(&key).await {
                Some(list) => {
                    tracing::warn!(upstream = %up.name, %repo, error = %e, "upstream unavailable; serving cached tag list");
                    self.stale_serves.fetch_add(1, Ordering::Relaxed);
                    Ok((list, Outcome::Stale))
                }
                None => Err(upstream_error(
                    e,
                    repo,
                    RegistryError::NameUnknown(repo.to_string()),
                )),
            },
            Err(e) => Err(upstream_error(
                e,
                repo,
                RegistryError::NameUnknown(repo.to_string()),
            )),
        }
    }

    fn stale(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        e: &UpstreamError,
        served: ServedManifest,
    ) -> (ServedManifest, Outcome) {
        tracing::warn!(upstream = %up.name, %repo, %tag, error = %e, "upstream unavailable; serving cached tag");
        self.stale_serves.fetch_add(1, Ordering::Relaxed);
        (served, Outcome::Stale)
    }

    async fn tag_entry(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
    ) -> Result<Option<TagEntry>, RegistryError> {
        let key = (
            up.key.clone(),
            repo.clone(),
            tag.clone(),
            variant.to_owned(),
        );
        if let Some(e) = self.tags.get(&key).await {
            return Ok(Some(e));
        }
        let store = self.store.clone();
        let (k, r, t, v) = (
            up.key.clone(),
            repo.clone(),
            tag.clone(),
            variant.to_owned(),
        );
        let entry = blocking(move || store.get_tag(Area::Cache, &k, &r, &t, &v)).await?;
        if let Some(e) = &entry {
            self.tags.insert(key, e.clone()).await;
        }
        Ok(entry)
    }

    async fn put_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        variant: &str,
        entry: TagEntry,
    ) -> Result<(), RegistryError> {
        let store = self.store.clone();
        let (k, r, t, v, e) = (
            up.key.clone(),
            repo.clone(),
            tag.clone(),
            variant.to_owned(),
            entry.clone(),
        );
        blocking(move || store.put_tag(Area::Cache, &k, &r, &t, &v, &e)).await?;
        self.tags
            .insert(
                (
                    up.key.clone(),
                    repo.clone(),
                    tag.clone(),
                    variant.to_owned(),
                ),
                entry,
            )
            .await;
        Ok(())
    }

    async fn manifest_for_entry(
        &self,
        entry: &TagEntry,
    ) -> Result<Option<ServedManifest>, RegistryError> {
        self.cached_manifest(&entry.digest).await
    }

    /// A mirrored manifest from memory or disk, without asking anyone.
    pub async fn cached_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<ServedManifest>, RegistryError> {
        let Some(manifest) = self.manifests.get(Area::Cache, digest).await? else {
            return Ok(None);
        };
        self.disk.touch(digest);
        Ok(Some(ServedManifest {
            manifest,
            digest: *digest,
        }))
    }

    async fn keep_manifest(
        &self,
        digest: Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<ServedManifest, RegistryError> {
        let len = bytes.len() as u64;
        let manifest = self
            .manifests
            .put(Area::Cache, digest, media_type, bytes)
            .await?;
        self.disk.added(digest, len);
        Ok(ServedManifest { manifest, digest })
    }

    /// Starts or joins the download of a mirrored blob.
    pub async fn attach_blob(
        &self,
        up: &Arc<Upstream>,
        repo: &RepoName,
        digest: Digest,
    ) -> Result<Attach, RegistryError> {
        // A store with a remote part is asked before the coordinator's lock (which only looks
        // at what is held here); a local one is looked at under it, in one step.
        if !self.store.all_held_here() {
            let store = self.store.clone();
            if blocking(move || store.blob_len(Area::Cache, &digest))
                .await?
                .is_some()
            {
                return Ok(Attach::Cached);
            }
        }
        self.fetches
            .attach(up.clone(), repo.clone(), digest)
            .map_err(|e| RegistryError::Internal(format!("store: {e}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorSetupError {
    #[error("opening the cache: {0}")]
    Store(std::io::Error),
    #[error("upstream {0}: {1}")]
    Upstream(String, UpstreamSetupError),
}

/// Maps an upstream failure to what the client is told.
/// `unknown` is what an upstream 404 means for this request.
pub fn upstream_error(e: UpstreamError, repo: &RepoName, unknown: RegistryError) -> RegistryError {
    match e {
        UpstreamError::NotFound => unknown,
        UpstreamError::TooManyRequests { retry_after } => RegistryError::TooManyRequests {
            retry_after: retry_after.max(Duration::from_secs(1)),
        },
        UpstreamError::Denied(s) => {
            RegistryError::Unauthorized(format!("upstream refused access to {repo} ({s})"))
        }
        other => RegistryError::Unavailable(other.to_string()),
    }
}

fn manifest_unknown(repo: &RepoName, reference: &Reference) -> RegistryError {
    RegistryError::ManifestUnknown(format!("{repo}:{reference}"))
}
