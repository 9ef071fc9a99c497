//! Warming: images put in the cache before anyone pulls them.
//!
//! [`warm_image`] fetches an image the way a pull would — its manifest through the mirror (so
//! the tag and the manifest are cached as a pull caches them), for an index the children of
//! the chosen platforms, then every config and layer blob through the fetch coordinator (one
//! upstream GET per blob, shared with any client pulling it at the same time), a few at once.
//! [`spawn_schedule`] refreshes the `[[warm]]` list at start and every `warm_interval`: each
//! tag is revalidated with a HEAD (free on Docker Hub) and fetched only when it moved or is not
//! cached. [`prefetch_moved`] is called by a pull that saw a tag move (`prefetch_on_move`).
//! No warming spends the upstream's last `ratelimit_reserve` pulls. Every failure is logged
//! with its reason and counted in [`Warming`] (the `berth_warm_*` metrics).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;

use crate::config::{WarmEntry, MAX_TAGS_PER_ENTRY};
use crate::lock;
use crate::mirror::fetch::{Attach, FetchFailure};
use crate::mirror::upstream::Upstream;
use crate::mirror::{Mirror, Outcome, ServedManifest};
use crate::oci::error::RegistryError;
use crate::oci::manifest::{Descriptor, Manifest};
use crate::oci::media::AcceptSet;
use crate::oci::names::{Digest, Reference, RepoName, Tag};
use crate::oci::platform::PlatformSpec;

/// Blobs of one image fetched at once.
const BLOB_CONCURRENCY: usize = 4;
/// Prefetches of moved tags running at once, and waiting at most.
const PREFETCH_CONCURRENCY: usize = 2;
const PREFETCH_PENDING: usize = 32;
/// Tags asked for per page of a tag list, and pages read at most.
const TAG_PAGE: usize = 1000;
const MAX_TAG_PAGES: usize = 20;
/// The most children of one index warmed (an index lists a few dozen platforms at most).
const MAX_CHILDREN: usize = 128;

/// What to warm: one image on one upstream.
#[derive(Debug, Clone)]
pub struct WarmRequest {
    /// The upstream key; the default upstream when None.
    pub upstream: Option<String>,
    /// As a client names it: on Docker Hub `alpine` is `library/alpine`.
    pub repository: RepoName,
    pub reference: Reference,
    /// The platforms of an index to warm; all of them when empty.
    pub platforms: Vec<PlatformSpec>,
}

/// What a warm did.
#[derive(Debug, Clone, Default)]
pub struct WarmReport {
    /// The digest the reference resolved to.
    pub digest: Option<Digest>,
    /// Manifests (the image's, and an index's children) taken from the upstream.
    pub manifests_fetched: usize,
    /// Manifests already in the cache.
    pub manifests_cached: usize,
    pub blobs_fetched: usize,
    pub blobs_cached: usize,
}

impl WarmReport {
    fn fetched_any(&self) -> bool {
        self.manifests_fetched + self.blobs_fetched > 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{0}")]
    Registry(RegistryError),
    #[error("upstream unavailable: the cached tag was kept")]
    Stale,
    #[error("the upstream's rate limit has {remaining} pulls left, at or below ratelimit_reserve = {reserve}")]
    Reserve { remaining: i64, reserve: u32 },
    #[error("the index lists none of the platforms asked for ({0})")]
    NoPlatform(String),
    #[error("{failed} blob(s) failed, first {digest}: {failure}")]
    Blobs {
        failed: usize,
        digest: Digest,
        failure: String,
    },
}

impl WarmError {
    /// The `result` label an image that failed this way is counted under.
    fn result(&self) -> &'static str {
        match self {
            WarmError::Reserve { .. } => "reserve",
            _ => "failed",
        }
    }
}

/// Counts by a short label, for metrics.
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<&'static str, u64>>);

impl Tally {
    pub fn add(&self, label: &'static str, n: u64) {
        *lock(&self.0).entry(label).or_default() += n;
    }

    pub fn get(&self, label: &str) -> u64 {
        lock(&self.0).get(label).copied().unwrap_or(0)
    }

    /// Every label counted so far, in order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        lock(&self.0).iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// What warming has done, for the metrics, and the prefetches under way.
pub struct Warming {
    /// Images warmed, by result: `warmed` (something was fetched), `unchanged` (all cached),
    /// `failed`, `reserve` (stopped at the rate-limit reserve), `busy` (an admin's warm-up
    /// refused: too many running).
    pub images: Tally,
    /// Blobs, by result: `fetched`, `cached`, `failed`.
    pub blobs: Tally,
    /// Refreshes of `[[warm]]`, by result: `complete`, `reserve` (an upstream's entries were
    /// cut short at its rate-limit reserve).
    pub refreshes: Tally,
    /// Prefetches of moved tags, by result: `started`, `dropped` (too many waiting).
    pub prefetches: Tally,
    /// Moved tags' images being prefetched, by upstream and digest.
    prefetching: Mutex<HashSet<(String, Digest)>>,
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    /// Warm-ups an admin asked for (API, status page) running at once.
    requested_slots: Arc<tokio::sync::Semaphore>,
    /// The server's shutdown signal, once it runs: prefetches stop with it.
    stopped: OnceLock<tokio::sync::watch::Receiver<bool>>,
}

impl Warming {
    /// Resolves when the server stops (never, outside a server).
    async fn until_stopped(&self) {
        match self.stopped.get().cloned() {
            // An error means the server is gone: stopped too.
            Some(mut rx) => drop(rx.wait_for(|stopped| *stopped).await),
            None => std::future::pending().await,
        }
    }
}

impl Default for Warming {
    fn default() -> Self {
        Warming {
            images: Tally::default(),
            blobs: Tally::default(),
            refreshes: Tally::default(),
            prefetches: Tally::default(),
            prefetching: Mutex::new(HashSet::new()),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(PREFETCH_CONCURRENCY)),
            requested_slots: Arc::new(tokio::sync::Semaphore::new(REQUESTED_CONCURRENCY)),
            stopped: OnceLock::new(),
        }
    }
}

/// Warm-ups asked for by admins running at once; more are refused (and counted as `busy`),
/// never queued without bound.
const REQUESTED_CONCURRENCY: usize = 4;

/// Starts warming an image in the background, as an admin asked (the API, the status page):
/// false, with the refusal counted in `images{result="busy"}` and logged, when
/// [`REQUESTED_CONCURRENCY`] are running already. The warm-up logs and counts its own result,
/// and stops with the server.
pub fn start(mirror: &Arc<Mirror>, req: WarmRequest) -> bool {
    let Ok(slot) = mirror.warm.requested_slots.clone().try_acquire_owned() else {
        mirror.warm.images.add("busy", 1);
        tracing::warn!(repository = %req.repository, reference = %req.reference, running = REQUESTED_CONCURRENCY, "warm-up refused: too many running");
        return false;
    };
    let mirror = mirror.clone();
    tokio::spawn(async move {
        let _slot = slot;
        tokio::select! {
            _ = warm_image(&mirror, &req) => {}
            _ = mirror.warm.until_stopped() => {}
        }
    });
    true
}

/// The media types a pull by Docker or containerd accepts: warmed tags are cached under the
/// same key as their pulls.
fn pull_accept() -> AcceptSet {
    AcceptSet::from_headers(std::iter::empty())
}

/// Warms one image: its manifest, an index's children of the chosen platforms, and their
/// blobs. Counted in [`Warming`] and logged when it fails.
pub async fn warm_image(mirror: &Arc<Mirror>, req: &WarmRequest) -> Result<WarmReport, WarmError> {
    let (up, repo) = match mirror.route(req.upstream.as_deref(), req.repository.clone()) {
        Ok(routed) => routed,
        Err(e) => {
            mirror.warm.images.add("failed", 1);
            tracing::warn!(repository = %req.repository, error = %e, "warming failed");
            return Err(WarmError::Registry(e));
        }
    };
    warm_counted(mirror, &up, &repo, &req.reference, &req.platforms, false).await
}

async fn warm_counted(
    mirror: &Arc<Mirror>,
    up: &Arc<Upstream>,
    repo: &RepoName,
    reference: &Reference,
    platforms: &[PlatformSpec],
    revalidate: bool,
) -> Result<WarmReport, WarmError> {
    let result = warm(mirror, up, repo, reference, platforms, revalidate).await;
    match &result {
        Ok(report) => {
            let label = if report.fetched_any() {
                "warmed"
            } else {
                "unchanged"
            };
            mirror.warm.images.add(label, 1);
            tracing::info!(upstream = %up.name, %repo, %reference, result = label,
                manifests_fetched = report.manifests_fetched, blobs_fetched = report.blobs_fetched,
                blobs_cached = report.blobs_cached, "warmed");
        }
        Err(e) => {
            mirror.warm.images.add(e.result(), 1);
            tracing::warn!(upstream = %up.name, %repo, %reference, reason = e.result(), error = %e, "warming failed");
        }
    }
    result
}

/// Refuses when the upstream has no more pulls left than the reserve.
fn check_reserve(up: &Upstream) -> Result<(), WarmError> {
    let remaining = up.ratelimit_remaining.load(Ordering::Relaxed);
    let reserve = up.config.ratelimit_reserve;
    if remaining >= 0 && remaining <= i64::from(reserve) {
        return Err(WarmError::Reserve { remaining, reserve });
    }
    Ok(())
}

async fn warm(
    mirror: &Arc<Mirror>,
    up: &Arc<Upstream>,
    repo: &RepoName,
    reference: &Reference,
    platforms: &[PlatformSpec],
    revalidate: bool,
) -> Result<WarmReport, WarmError> {
    let accept = pull_accept();
    let mut report = WarmReport::default();
    let top = manifest(
        mirror,
        up,
        repo,
        reference,
        &accept,
        revalidate,
        &mut report,
    )
    .await?;
    report.digest = Some(top.digest);
    let parsed = Manifest::from_slice(&top.manifest.bytes).map_err(WarmError::Registry)?;
    let mut blobs: Vec<Descriptor> = Vec::new();
    match &parsed.manifests {
        Some(children) => {
            let chosen: Vec<&Descriptor> = children
                .iter()
                .filter(|c| match &c.platform {
                    // Attestations and signatures are listed as `unknown/unknown`: no client
                    // pulls them as an image.
                    Some(p) if p.os == "unknown" => false,
                    Some(p) => platforms.is_empty() || platforms.iter().any(|s| s.matches(p)),
                    None => platforms.is_empty(),
                })
                .take(MAX_CHILDREN)
                .collect();
            if chosen.is_empty() {
                let names: Vec<String> = platforms.iter().map(ToString::to_string).collect();
                let asked = if names.is_empty() {
                    "any image".to_owned()
                } else {
                    names.join(", ")
                };
                return Err(WarmError::NoPlatform(asked));
            }
            for child in chosen {
                let reference = Reference::Digest(child.digest);
                let m = manifest(mirror, up, repo, &reference, &accept, false, &mut report).await?;
                let child = Manifest::from_slice(&m.manifest.bytes).map_err(WarmError::Registry)?;
                blobs.extend(child.pull_blobs());
            }
        }
        None => blobs.extend(parsed.pull_blobs()),
    }
    let mut seen = HashSet::new();
    blobs.retain(|b| seen.insert(b.digest));
    let results: Vec<(Digest, Result<bool, String>)> = futures_util::stream::iter(blobs)
        .map(|b| async move { (b.digest, blob(mirror, up, repo, b.digest).await) })
        .buffer_unordered(BLOB_CONCURRENCY)
        .collect()
        .await;
    let mut failed: Option<(usize, Digest, String)> = None;
    for (digest, r) in results {
        match r {
            Ok(true) => {
                report.blobs_fetched += 1;
                mirror.warm.blobs.add("fetched", 1);
            }
            Ok(false) => {
                report.blobs_cached += 1;
                mirror.warm.blobs.add("cached", 1);
            }
            Err(e) => {
                mirror.warm.blobs.add("failed", 1);
                tracing::warn!(upstream = %up.name, %repo, %digest, error = %e, "warming a blob failed");
                match &mut failed {
                    Some((n, _, _)) => *n += 1,
                    None => failed = Some((1, digest, e)),
                }
            }
        }
    }
    match failed {
        Some((failed, digest, failure)) => Err(WarmError::Blobs {
            failed,
            digest,
            failure,
        }),
        None => Ok(report),
    }
}

/// A manifest through the mirror, as a pull gets it; with `revalidate`, a cached tag is checked
/// with the upstream (a HEAD) however fresh it is.
async fn manifest(
    mirror: &Arc<Mirror>,
    up: &Arc<Upstream>,
    repo: &RepoName,
    reference: &Reference,
    accept: &AcceptSet,
    revalidate: bool,
    report: &mut WarmReport,
) -> Result<ServedManifest, WarmError> {
    if let Reference::Digest(d) = reference {
        if let Some(m) = mirror
            .cached_manifest(d)
            .await
            .map_err(WarmError::Registry)?
        {
            report.manifests_cached += 1;
            return Ok(m);
        }
    }
    check_reserve(up)?;
    let (served, outcome) = if revalidate {
        mirror
            .manifest_from_upstream(up, repo, reference, accept)
            .await
    } else {
        mirror.manifest(up, repo, reference, accept).await
    }
    .map_err(WarmError::Registry)?;
    match outcome {
        Outcome::Stale => return Err(WarmError::Stale),
        Outcome::Miss | Outcome::Joined => report.manifests_fetched += 1,
        Outcome::Hit | Outcome::Local => report.manifests_cached += 1,
    }
    Ok(served)
}

/// Puts one blob in the cache: Ok(true) when it was fetched, Ok(false) when it was there.
async fn blob(
    mirror: &Mirror,
    up: &Arc<Upstream>,
    repo: &RepoName,
    digest: Digest,
) -> Result<bool, String> {
    match mirror
        .attach_blob(up, repo, digest)
        .await
        .map_err(|e| e.to_string())?
    {
        Attach::Cached => Ok(false),
        Attach::InFlight { download, .. } => {
            let holder = download.hold();
            holder
                .finished()
                .await
                .map_err(|e: FetchFailure| format!("{} ({})", e, e.reason()))?;
            Ok(true)
        }
    }
}

/// Runs the `[[warm]]` refresh at start and every `every`, until `stopped` (a refresh under way
/// is cut short: its downloads finish in their own tasks); prefetches stop then too.
pub fn spawn_schedule(
    mirror: Arc<Mirror>,
    entries: Vec<WarmEntry>,
    every: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let _ = mirror.warm.stopped.set(stopped.clone());
    if entries.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            tokio::select! {
                _ = refresh(&mirror, &entries) => {}
                _ = stopped.changed() => return,
            }
        }
    });
}

/// What one refresh did.
#[derive(Debug, Clone, Default)]
pub struct RefreshReport {
    /// Tags warmed (something fetched), unchanged, failed.
    pub warmed: usize,
    pub unchanged: usize,
    pub failed: usize,
    /// Upstreams whose entries were cut short at their rate-limit reserve.
    pub stopped: Vec<String>,
}

/// One refresh of the `[[warm]]` list: each matching tag revalidated, and fetched only when it
/// moved or is not cached. An upstream whose rate limit falls to its reserve is left alone for
/// the rest of the refresh.
pub async fn refresh(mirror: &Arc<Mirror>, entries: &[WarmEntry]) -> RefreshReport {
    let mut report = RefreshReport::default();
    for entry in entries {
        let (up, repo) = match mirror.route(entry.upstream.as_deref(), entry.repository.clone()) {
            Ok(routed) => routed,
            Err(e) => {
                tracing::warn!(repository = %entry.repository, error = %e, "warm entry skipped");
                report.failed += 1;
                continue;
            }
        };
        if report.stopped.contains(&up.key) {
            continue;
        }
        let tags = match matching_tags(mirror, &up, &repo, entry).await {
            Ok(tags) => tags,
            Err(e) => {
                tracing::warn!(upstream = %up.name, %repo, error = %e, "warm entry skipped: its tags could not be listed");
                mirror.warm.images.add("failed", 1);
                report.failed += 1;
                continue;
            }
        };
        for tag in tags {
            if let Err(e) = check_reserve(&up) {
                tracing::warn!(upstream = %up.name, error = %e, "warm refresh stopped for this upstream: it keeps its remaining pulls for clients");
                report.stopped.push(up.key.clone());
                break;
            }
            let reference = Reference::Tag(tag);
            match warm_counted(mirror, &up, &repo, &reference, &entry.platforms, true).await {
                Ok(r) if r.fetched_any() => report.warmed += 1,
                Ok(_) => report.unchanged += 1,
                Err(WarmError::Reserve { .. }) => {
                    report.stopped.push(up.key.clone());
                    break;
                }
                Err(_) => report.failed += 1,
            }
        }
    }
    let label = if report.stopped.is_empty() {
        "complete"
    } else {
        "reserve"
    };
    mirror.warm.refreshes.add(label, 1);
    tracing::info!(
        warmed = report.warmed,
        unchanged = report.unchanged,
        failed = report.failed,
        stopped = report.stopped.len(),
        "warm refresh done"
    );
    report
}

/// The tags of an entry: its literal ones, and those of the upstream's tag list its patterns
/// match, at most [`MAX_TAGS_PER_ENTRY`].
async fn matching_tags(
    mirror: &Mirror,
    up: &Upstream,
    repo: &RepoName,
    entry: &WarmEntry,
) -> Result<Vec<Tag>, RegistryError> {
    let mut tags: Vec<Tag> = Vec::new();
    let add = |t: Tag, tags: &mut Vec<Tag>| {
        if !tags.contains(&t) {
            tags.push(t);
        }
    };
    let mut patterns = Vec::new();
    for p in &entry.tags {
        match p.literal() {
            Some(t) => add(Tag::parse(t)?, &mut tags),
            None => patterns.push(p),
        }
    }
    if !patterns.is_empty() {
        let mut last: Option<String> = None;
        for _ in 0..MAX_TAG_PAGES {
            let pass = {
                let mut pass = form_urlencoded::Serializer::new(String::new());
                pass.append_pair("n", &TAG_PAGE.to_string());
                if let Some(l) = &last {
                    pass.append_pair("last", l);
                }
                pass.finish()
            };
            let (list, _) = mirror.tags_list(up, repo, &pass).await?;
            #[derive(serde::Deserialize)]
            struct Page {
                #[serde(default)]
                tags: Option<Vec<String>>,
            }
            let page: Page = serde_json::from_slice(&list.body).map_err(|e| {
                RegistryError::Unavailable(format!("the upstream's tag list is not JSON: {e}"))
            })?;
            let page = page.tags.unwrap_or_default();
            for t in &page {
                if patterns.iter().any(|p| p.matches(t)) {
                    if let Ok(t) = Tag::parse(t) {
                        add(t, &mut tags);
                    }
                }
            }
            match (list.link, page.last()) {
                (Some(_), Some(l)) => last = Some(l.clone()),
                _ => break,
            }
        }
    }
    if tags.len() > MAX_TAGS_PER_ENTRY {
        tracing::warn!(upstream = %up.name, %repo, matched = tags.len(), kept = MAX_TAGS_PER_ENTRY,
            "a warm entry matches too many tags; only the first are warmed");
        tags.truncate(MAX_TAGS_PER_ENTRY);
    }
    Ok(tags)
}

/// Called by a pull that found `tag` moved from `old` to `new`: fetches the new image's blobs in
/// the background — for an index, the platforms whose manifests of the old one were cached —
/// so the next pull is a cache hit. One prefetch per image at a time, a few at once.
pub fn prefetch_moved(
    mirror: &Arc<Mirror>,
    up: &Arc<Upstream>,
    repo: &RepoName,
    old: ServedManifest,
    new: Digest,
) {
    let key = (up.key.clone(), new);
    {
        let mut pending = lock(&mirror.warm.prefetching);
        if pending.contains(&key) {
            return;
        }
        if pending.len() >= PREFETCH_PENDING {
            drop(pending);
            mirror.warm.prefetches.add("dropped", 1);
            tracing::warn!(upstream = %up.name, %repo, digest = %new, "moved tag not prefetched: too many prefetches waiting");
            return;
        }
        pending.insert(key.clone());
    }
    mirror.warm.prefetches.add("started", 1);
    let (mirror, up, repo) = (mirror.clone(), up.clone(), repo.clone());
    tokio::spawn(async move {
        // Leaves the pending set however the task ends.
        struct Pending(Arc<Mirror>, (String, Digest));
        impl Drop for Pending {
            fn drop(&mut self) {
                lock(&self.0.warm.prefetching).remove(&self.1);
            }
        }
        let _pending = Pending(mirror.clone(), key);
        let work = async {
            let Ok(_slot) = mirror.warm.prefetch_slots.clone().acquire_owned().await else {
                return;
            };
            let platforms = match cached_platforms(&mirror, &old).await {
                Some(p) if p.is_empty() => return,
                Some(p) => p,
                None => Vec::new(),
            };
            let _ = warm_counted(
                &mirror,
                &up,
                &repo,
                &Reference::Digest(new),
                &platforms,
                false,
            )
            .await;
        };
        // A shutdown does not wait for prefetches: they would keep starting downloads.
        tokio::select! {
            _ = work => {}
            _ = mirror.warm.until_stopped() => {}
        }
    });
}

/// For an index, the platforms of its children that are cached (the ones clients pulled);
/// None for an image manifest.
async fn cached_platforms(mirror: &Mirror, old: &ServedManifest) -> Option<Vec<PlatformSpec>> {
    let children = Manifest::from_slice(&old.manifest.bytes).ok()?.manifests?;
    let mut platforms = Vec::new();
    for child in children.iter().take(MAX_CHILDREN) {
        let Some(p) = &child.platform else { continue };
        if matches!(mirror.cached_manifest(&child.digest).await, Ok(Some(_))) {
            platforms.push(PlatformSpec::of(p));
        }
    }
    Some(platforms)
}
