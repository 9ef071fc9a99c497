//! The status page: `/` and `/ui/repo/<upstream>/<name>`, server-rendered HTML with a little
//! inline CSS and no JavaScript.
//!
//! It shows uptime, the disk cache against its limit, hit ratio and bytes served from the cache
//! (today and since start), each upstream's health and rate-limit headroom, the most pulled images
//! and the cached repositories with their tags, sizes and last pull. Everything interpolated into
//! the page is HTML-escaped. Private repositories are listed only to visitors who
//! [`App::may_see_private`].
//!
//! Pull counts and traffic are kept in memory: they start again at zero with the process.
//!
//! Anyone can make the cache hold what they like (a pull through the mirror is enough), so what
//! a page costs must not grow with it: see [`Pages`] for the bounds.

use crate::config::human_bytes;
use crate::lock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};

use crate::http::App;
use crate::http::{empty, full, Body};
use crate::mirror::fetch::Fetches;
use crate::mirror::Outcome;
use crate::oci::error::RegistryError;
use crate::oci::names::{Digest, RepoName};
use crate::ops::Service;
use crate::store::blocking;
use crate::store::{now_secs, Area, Store};

/// The upstream key under which pulls of private repositories are counted.
pub const PRIVATE: &str = "";
/// Distinct repositories whose pulls are counted; later ones are not, to bound memory.
const MAX_TRACKED_REPOS: usize = 10_000;
/// Repositories listed on the overview.
const MAX_LISTED_REPOS: usize = 500;
/// Tags named per repository on the overview.
const TAGS_PER_ROW: usize = 8;
const TOP_PULLS: usize = 10;

const CSS: &str =
    "body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}\
header{background:#1d3557;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}\
header a{color:#fff;text-decoration:none}header small{opacity:.8}\
main{padding:18px 28px;max-width:1200px}section{background:#fff;border:1px solid #dde1e6;\
border-radius:6px;padding:12px 18px;margin:0 0 16px}h2{font-size:16px;margin:4px 0 10px}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;\
border-bottom:1px solid #eceef1;vertical-align:top}th{font-weight:600;color:#56606b}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
.bar{background:#e8ebef;border-radius:4px;height:12px;width:320px;display:inline-block;\
vertical-align:middle;overflow:hidden}.bar span{display:block;height:100%;background:#2a9d8f}\
.ok{color:#2a7d34}.bad{color:#b3261e}.muted{color:#7a838d}code{font-size:12px}\
.grid{display:flex;gap:16px;flex-wrap:wrap}.grid section{flex:1;min-width:320px}";

/// Request and byte counts, since start and for the current (UTC) day.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub requests: u64,
    /// Mirrored manifest and blob requests (hit, miss, joined, stale).
    pub lookups: u64,
    /// Of those, answered from the cache (hit, stale).
    pub hits: u64,
    /// Response bytes sent from the cache.
    pub cache_bytes: u64,
    pub sent_bytes: u64,
    /// Blob bytes fetched from upstreams.
    pub upstream_bytes: u64,
}

impl Counts {
    pub fn hit_ratio(&self) -> Option<f64> {
        (self.lookups > 0).then(|| self.hits as f64 / self.lookups as f64)
    }
}

pub struct Traffic {
    fetches: Arc<Fetches>,
    inner: Mutex<TrafficInner>,
}

#[derive(Default)]
struct TrafficInner {
    total: Counts,
    today: Counts,
    day: u64,
    upstream_at_day_start: u64,
}

impl Traffic {
    pub fn new(fetches: Arc<Fetches>) -> Traffic {
        Traffic {
            inner: Mutex::new(TrafficInner {
                day: now_secs() / 86_400,
                upstream_at_day_start: fetches.upstream_bytes.load(Ordering::Relaxed),
                ..TrafficInner::default()
            }),
            fetches,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut TrafficInner) -> T) -> T {
        let mut inner = lock(&self.inner);
        let day = now_secs() / 86_400;
        if day != inner.day {
            inner.day = day;
            inner.today = Counts::default();
            inner.upstream_at_day_start = self.fetches.upstream_bytes.load(Ordering::Relaxed);
        }
        f(&mut inner)
    }

    /// A manifest or blob response started with this cache outcome.
    pub fn lookup(&self, outcome: Outcome) {
        if outcome == Outcome::Local {
            return;
        }
        let hit = matches!(outcome, Outcome::Hit | Outcome::Stale);
        self.with(|t| {
            for c in [&mut t.total, &mut t.today] {
                c.lookups += 1;
                c.hits += u64::from(hit);
            }
        });
    }

    /// A response finished, having sent `bytes` of body.
    pub fn sent(&self, outcome: Option<Outcome>, bytes: u64) {
        let from_cache = matches!(outcome, Some(Outcome::Hit | Outcome::Stale));
        self.with(|t| {
            for c in [&mut t.total, &mut t.today] {
                c.requests += 1;
                c.sent_bytes += bytes;
                if from_cache {
                    c.cache_bytes += bytes;
                }
            }
        });
    }

    /// (since start, today).
    pub fn snapshot(&self) -> (Counts, Counts) {
        let upstream = self.fetches.upstream_bytes.load(Ordering::Relaxed);
        self.with(|t| {
            let mut total = t.total;
            let mut today = t.today;
            total.upstream_bytes = upstream;
            today.upstream_bytes = upstream.saturating_sub(t.upstream_at_day_start);
            (total, today)
        })
    }
}

/// Manifest pulls per repository and tag, in memory.
#[derive(Default)]
pub struct PullStats {
    repos: Mutex<HashMap<(String, String), RepoPulls>>,
}

#[derive(Debug, Clone, Default)]
pub struct RepoPulls {
    /// Seconds since the epoch of the last manifest request answered.
    pub last: u64,
    pub tags: BTreeMap<String, u64>,
}

impl PullStats {
    /// A manifest of `repo` was served; `tag` when it was asked for by tag.
    pub fn record(&self, upstream: &str, repo: &str, tag: Option<&str>) {
        let mut repos = lock(&self.repos);
        let key = (upstream.to_owned(), repo.to_owned());
        if !repos.contains_key(&key) && repos.len() >= MAX_TRACKED_REPOS {
            return;
        }
        let e = repos.entry(key).or_default();
        e.last = now_secs();
        if let Some(tag) = tag {
            *e.tags.entry(tag.to_owned()).or_insert(0) += 1;
        }
    }

    pub fn get(&self, upstream: &str, repo: &str) -> Option<RepoPulls> {
        lock(&self.repos)
            .get(&(upstream.to_owned(), repo.to_owned()))
            .cloned()
    }

    /// The most pulled repo:tag pairs: (upstream, repo, tag, pulls).
    pub fn top(&self, n: usize, private: bool) -> Vec<(String, String, String, u64)> {
        let repos = lock(&self.repos);
        let mut all: Vec<_> = repos
            .iter()
            .filter(|((up, _), _)| private || up != PRIVATE)
            .flat_map(|((up, repo), p)| {
                p.tags
                    .iter()
                    .map(move |(t, n)| (up.clone(), repo.clone(), t.clone(), *n))
            })
            .collect();
        all.sort_by(|a, b| b.3.cmp(&a.3).then_with(|| (&a.1, &a.2).cmp(&(&b.1, &b.2))));
        all.truncate(n);
        all
    }
}

impl App {
    /// Whether this visitor may see the private namespace on the status page: when anonymous
    /// pulls of it are allowed, or the request carries credentials of a user.
    pub async fn may_see_private<B>(&self, req: &Request<B>, client: std::net::IpAddr) -> bool {
        self.config.private_pull_public
            || matches!(
                self.auth.authenticate(req.headers(), client).await,
                Ok(Some(_))
            )
    }
}

/// Answers `/` and `/ui/...`.
pub async fn page<B>(
    app: &Service,
    path: &str,
    req: &Request<B>,
    head: bool,
    client: std::net::IpAddr,
) -> Result<Response<Body>, RegistryError> {
    let private = app.may_see_private(req, client).await;
    let (status, html) = if path == "/" {
        (StatusCode::OK, overview(app, private).await?)
    } else if let Some(rest) = path.strip_prefix("/ui/repo/") {
        match repo_page(app, rest, private).await? {
            Some(html) => (StatusCode::OK, html),
            None => (StatusCode::NOT_FOUND, not_found(path)),
        }
    } else {
        (StatusCode::NOT_FOUND, not_found(path))
    };
    Ok(Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/html; charset=utf-8")
        .header(CONTENT_LENGTH, html.len())
        .header(CACHE_CONTROL, "no-store")
        .header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'",
        )
        .header("x-content-type-options", "nosniff")
        .body(if head { empty() } else { full(html) })
        .unwrap_or_default())
}

/// A repository as the page lists it.
struct Repo {
    area: Area,
    upstream: String,
    name: RepoName,
    /// The first tag names, sorted, whether or not their entries were read.
    tag_names: Vec<String>,
    /// How many tags the repository has.
    tag_count: usize,
    /// The tags whose entries were read.
    tags: Vec<TagRow>,
    /// Compressed size of the unique blobs the read tags reference (known ones).
    size: u64,
    /// Whether `size` counts everything (every tag read, every manifest known).
    size_complete: bool,
}

struct TagRow {
    tag: String,
    digest: String,
    media_type: String,
    /// When the upstream last confirmed the tag (seconds since the epoch).
    fetched_at: u64,
    size: Option<u64>,
    size_complete: bool,
    platforms: Option<usize>,
}

/// Files (tag entries and manifests) one listing reads at most: a listing costs the same however
/// much an outsider has pulled into the cache. What is not read shows as unknown; summaries are
/// remembered, so later listings fill in.
const READS_PER_LISTING: usize = 4_000;
/// Children of an index whose manifests are read for its size; beyond, the size is a lower bound.
const MAX_CHILDREN: usize = 128;
/// Tag entries read per repository on the overview (all tags are counted).
const TAGS_READ_PER_REPO: usize = 32;
/// Tag rows on a repository's page.
const MAX_REPO_PAGE_TAGS: usize = 500;
/// How long a listing is reused (a push, a delete or a pull that reaches the upstream makes a
/// new one sooner).
const LISTING_TTL: Duration = Duration::from_secs(10);
/// Listings computed at once; visitors asking for the same one share it.
const MAX_RENDERS: usize = 2;
/// Longest wait for a turn at computing a listing before the visitor gets 503.
const RENDER_WAIT: Duration = Duration::from_secs(10);
/// Memory for remembered manifest summaries (roughly, in bytes).
const SUMMARY_MEMORY: usize = 32 << 20;
/// Summaries that could not read everything are computed again after this long.
const INCOMPLETE_TTL: Duration = Duration::from_secs(60);

/// What a manifest says about sizes, computed once per digest.
struct Summary {
    /// The manifest itself and what it refers to, with sizes: an image's config and layers, an
    /// index's image children and theirs.
    blobs: Vec<(Digest, u64)>,
    platforms: Option<usize>,
    /// Whether `blobs` is everything (an index's children all read).
    complete: bool,
}

/// A remembered summary (None: not a manifest the page understands), and when it expires if it
/// is incomplete.
type Remembered = (Option<Arc<Summary>>, Option<Instant>);

#[derive(Default)]
struct Summaries {
    map: HashMap<(Area, Digest), Remembered>,
    weight: usize,
}

/// Reads left to a listing.
struct Budget(usize);

impl Budget {
    fn take(&mut self) -> bool {
        if self.0 == 0 {
            return false;
        }
        self.0 -= 1;
        true
    }
}

/// The remembered summaries, shared with listings computed on the blocking pool.
#[derive(Clone, Default)]
struct Memo {
    summaries: Arc<Mutex<Summaries>>,
    reads: Arc<AtomicU64>,
    /// Indexes with more children than are looked at.
    truncated_indexes: Arc<AtomicU64>,
    /// Listings that spent their read budget.
    spent_budgets: Arc<AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum ListingKey {
    Overview {
        generation: u64,
        private: bool,
    },
    Repo {
        generation: u64,
        area: Area,
        upstream: String,
        name: RepoName,
    },
}

/// A computed listing: the repositories, and whether more exist than are listed.
struct Listing {
    repos: Vec<Repo>,
    more: bool,
}

/// What keeps the status pages cheap however much is cached: manifest summaries computed once
/// per digest (an index's children read once, at most [`MAX_CHILDREN`] of them), listings
/// computed within a read budget, shared by concurrent visitors and reused for a while, and
/// at most [`MAX_RENDERS`] of them computed at once.
pub struct Pages {
    memo: Memo,
    listings: moka::future::Cache<ListingKey, Arc<Listing>>,
    renders: tokio::sync::Semaphore,
    render_wait: Duration,
    generation: AtomicU64,
    /// Visitors refused because too many listings were being computed.
    pub busy_refusals: AtomicU64,
}

impl Default for Pages {
    fn default() -> Self {
        Pages::new()
    }
}

impl Pages {
    pub fn new() -> Pages {
        Pages {
            memo: Memo::default(),
            // Weighed by rows, a few hundred bytes each: some tens of MiB at most.
            listings: moka::future::Cache::builder()
                .weigher(|_, l: &Arc<Listing>| {
                    let rows: usize = l.repos.iter().map(|r| 1 + r.tags.len()).sum();
                    u32::try_from(rows).unwrap_or(u32::MAX)
                })
                .max_capacity(100_000)
                .time_to_live(LISTING_TTL)
                .build(),
            renders: tokio::sync::Semaphore::new(MAX_RENDERS),
            render_wait: RENDER_WAIT,
            generation: AtomicU64::new(0),
            busy_refusals: AtomicU64::new(0),
        }
    }

    /// What the pages list may have changed (a tag fetched, a push, a delete).
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Manifests the pages have read from the store.
    pub fn manifest_reads(&self) -> u64 {
        self.memo.reads.load(Ordering::Relaxed)
    }

    /// Indexes whose size counted only their first [`MAX_CHILDREN`] children.
    pub fn truncated_indexes(&self) -> u64 {
        self.memo.truncated_indexes.load(Ordering::Relaxed)
    }

    /// Listings that stopped reading at [`READS_PER_LISTING`].
    pub fn spent_budgets(&self) -> u64 {
        self.memo.spent_budgets.load(Ordering::Relaxed)
    }

    /// The listing for `key`: reused, or computed on the blocking pool by one visitor while
    /// the others wait for it.
    async fn listing(
        &self,
        key: ListingKey,
        compute: impl FnOnce(&Memo, &mut Budget) -> std::io::Result<Listing> + Send + 'static,
    ) -> Result<Arc<Listing>, RegistryError> {
        let memo = self.memo.clone();
        self.listings
            .try_get_with(key, async move {
                let Ok(Ok(_turn)) =
                    tokio::time::timeout(self.render_wait, self.renders.acquire()).await
                else {
                    self.busy_refusals.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        renders = MAX_RENDERS,
                        wait_s = self.render_wait.as_secs(),
                        "status page refused: too many listings being computed"
                    );
                    return Err(RegistryError::Unavailable(
                        "the status page is busy; try again shortly".into(),
                    ));
                };
                blocking(move || {
                    let mut budget = Budget(READS_PER_LISTING);
                    let listing = compute(&memo, &mut budget);
                    if budget.0 == 0 {
                        memo.spent_budgets.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            reads = READS_PER_LISTING,
                            "status listing stopped at its read budget; some sizes show as unknown"
                        );
                    }
                    listing
                })
                .await
                .map(Arc::new)
            })
            .await
            .map_err(|e| (*e).clone())
    }
}

impl Memo {
    /// The summary of a manifest: remembered, or read (within the budget; None when the budget
    /// is spent, the manifest is missing, or it is not one the page understands). An index's
    /// image children are read too, unless `shallow`.
    fn summary(
        &self,
        store: &Store,
        area: Area,
        digest: &str,
        budget: &mut Budget,
        shallow: bool,
    ) -> Option<Arc<Summary>> {
        let d = Digest::parse(digest).ok()?;
        {
            let summaries = lock(&self.summaries);
            if let Some((s, expires)) = summaries.map.get(&(area, d)) {
                if expires.map_or(true, |t| t > Instant::now()) {
                    return s.clone();
                }
            }
        }
        if !budget.take() {
            return None;
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let (bytes, _) = store.get_manifest(area, &d).ok()??;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let desc = |e: &serde_json::Value| -> Option<(Digest, u64)> {
            Some((
                Digest::parse(e.get("digest")?.as_str()?).ok()?,
                e.get("size")?.as_u64()?,
            ))
        };
        let own = (d, bytes.len() as u64);
        let summary = if let Some(list) = v.get("manifests").and_then(|m| m.as_array()) {
            if shallow {
                // An index inside an index: counted by its own bytes, not remembered.
                return Some(Arc::new(Summary {
                    blobs: vec![own],
                    platforms: Some(list.len()),
                    complete: false,
                }));
            }
            let mut blobs = vec![own];
            let mut complete = list.len() <= MAX_CHILDREN;
            if !complete {
                self.truncated_indexes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%d, children = list.len(), looked_at = MAX_CHILDREN, "status page: an index with more children than are looked at; its size is a lower bound");
            }
            for (child, _) in list.iter().take(MAX_CHILDREN).filter_map(desc) {
                match self.summary(store, area, &child.to_string(), budget, true) {
                    Some(s) => {
                        complete &= s.complete;
                        blobs.extend(s.blobs.iter().copied());
                    }
                    None => complete = false,
                }
            }
            Some(Summary {
                blobs,
                platforms: Some(list.len()),
                complete,
            })
        } else if let Some(layers) = v.get("layers").and_then(|l| l.as_array()) {
            let mut blobs = vec![own];
            blobs.extend(layers.iter().filter_map(desc));
            blobs.extend(v.get("config").and_then(desc));
            Some(Summary {
                blobs,
                platforms: None,
                complete: true,
            })
        } else {
            None
        };
        let summary = summary.map(Arc::new);
        self.remember(area, d, summary.clone());
        summary
    }

    fn remember(&self, area: Area, digest: Digest, summary: Option<Arc<Summary>>) {
        let weight = 64 + summary.as_ref().map_or(0, |s| s.blobs.len() * 40);
        let expires = summary
            .as_ref()
            .filter(|s| !s.complete)
            .map(|_| Instant::now() + INCOMPLETE_TTL);
        let mut summaries = lock(&self.summaries);
        if summaries.weight + weight > SUMMARY_MEMORY {
            // Crude but bounded: start over; the next listings read again within their budget.
            summaries.map.clear();
            summaries.weight = 0;
        }
        summaries.weight += weight;
        summaries.map.insert((area, digest), (summary, expires));
    }
}

/// Reads a repository's tags (at most `max_tags` entries) with their sizes (blocking).
fn read_repo(
    memo: &Memo,
    store: &Store,
    area: Area,
    upstream: String,
    name: RepoName,
    max_tags: usize,
    budget: &mut Budget,
) -> std::io::Result<Option<Repo>> {
    let Some(files) = store.tag_names(area, &upstream, &name)? else {
        return Ok(None);
    };
    let mut tag_names: Vec<String> = files.iter().map(|(t, _)| t.to_string()).collect();
    tag_names.dedup();
    let tag_count = tag_names.len();
    tag_names.truncate(TAGS_PER_ROW);
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut repo_blobs: HashMap<Digest, u64> = HashMap::new();
    let mut size_complete = true;
    let mut tags = Vec::new();
    for (read, (tag, variant)) in files.iter().enumerate() {
        if read >= max_tags || !budget.take() {
            size_complete = false;
            break;
        }
        let Some(entry) = store.get_tag(area, &upstream, &name, tag, variant)? else {
            continue;
        };
        let digest = entry.digest.to_string();
        if !seen.insert((tag.to_string(), digest.clone())) {
            continue;
        }
        let summary = memo.summary(store, area, &digest, budget, false);
        let (size, complete, platforms) = match &summary {
            Some(s) => {
                let unique: HashMap<Digest, u64> = s.blobs.iter().copied().collect();
                repo_blobs.extend(unique.iter().map(|(d, n)| (*d, *n)));
                (Some(unique.values().sum()), s.complete, s.platforms)
            }
            None => (None, false, None),
        };
        size_complete &= complete;
        tags.push(TagRow {
            tag: tag.to_string(),
            digest,
            media_type: entry.media_type,
            fetched_at: entry.fetched_at,
            size,
            size_complete: complete,
            platforms,
        });
    }
    Ok(Some(Repo {
        area,
        upstream,
        name,
        tag_names,
        tag_count,
        tags,
        size: repo_blobs.values().sum(),
        size_complete,
    }))
}

/// The first `limit` repositories of an area, in (upstream, name) order, read within the
/// budget; and whether there are more (blocking).
fn list_area(
    memo: &Memo,
    store: &Store,
    area: Area,
    limit: usize,
    budget: &mut Budget,
) -> std::io::Result<Listing> {
    let mut names = store.area_repos(area, limit + 1);
    let more = names.len() > limit;
    names.truncate(limit);
    let mut repos = Vec::new();
    for (up, name) in names {
        let Ok(name) = RepoName::parse(&name) else {
            continue;
        };
        if let Some(repo) = read_repo(memo, store, area, up, name, TAGS_READ_PER_REPO, budget)? {
            repos.push(repo);
        }
    }
    Ok(Listing { repos, more })
}

/// A size for people, marked as a lower bound when not everything could be counted.
fn size_text(size: u64, complete: bool) -> String {
    if complete {
        human_bytes(size)
    } else {
        format!("≥ {}", human_bytes(size))
    }
}

async fn overview(app: &Service, private: bool) -> Result<String, RegistryError> {
    let store = app.mirror.store().clone();
    let key = ListingKey::Overview {
        generation: app.pages.generation.load(Ordering::Relaxed),
        private,
    };
    let listing = app
        .pages
        .listing(key, move |memo, budget| {
            let mut listing = list_area(memo, &store, Area::Cache, MAX_LISTED_REPOS, budget)?;
            if private {
                let local = list_area(memo, &store, Area::Local, MAX_LISTED_REPOS, budget)?;
                listing.repos.extend(local.repos);
                listing.more |= local.more;
            }
            Ok(listing)
        })
        .await?;
    let repos = &listing.repos;
    let (since_start, today) = app.ops.traffic.snapshot();
    let disk = &app.mirror.disk;
    let mut h = String::with_capacity(16 << 10);
    head(&mut h, "berth status");
    let _ = write!(
        h,
        "<main><div class=\"grid\"><section><h2>Server</h2><table>\
         <tr><th>Uptime</th><td id=\"uptime\">{}</td></tr>\
         <tr><th>Version</th><td>{}</td></tr>\
         <tr><th>Cache</th><td><span class=\"bar\"><span style=\"width:{:.1}%\"></span></span> \
         <span id=\"cache-size\">{}</span> of {} ({:.1}%)</td></tr>\
         <tr><th>Evictions</th><td>{} ({})</td></tr>\
         <tr><th>Downloads in flight</th><td>{}</td></tr></table></section>",
        human_duration(app.started.elapsed()),
        esc(env!("CARGO_PKG_VERSION")),
        percent(disk.size(), disk.limit()).min(100.0),
        human_bytes(disk.size()),
        human_bytes(disk.limit()),
        percent(disk.size(), disk.limit()),
        disk.evictions.load(Ordering::Relaxed),
        human_bytes(disk.evicted_bytes.load(Ordering::Relaxed)),
        app.mirror.fetches.in_flight(),
    );
    h.push_str(
        "<section><h2>Traffic</h2><table><tr><th></th><th class=\"num\">Today (UTC)</th>\
         <th class=\"num\">Since start</th></tr>",
    );
    let row = |h: &mut String, label: &str, id: &str, f: &dyn Fn(&Counts) -> String| {
        let _ = write!(
            h,
            "<tr><th>{label}</th><td class=\"num\" id=\"{id}-today\">{}</td>\
             <td class=\"num\" id=\"{id}\">{}</td></tr>",
            f(&today),
            f(&since_start)
        );
    };
    row(&mut h, "Hit ratio", "hit-ratio", &|c| match c.hit_ratio() {
        Some(r) => format!("{:.1}%", r * 100.0),
        None => "—".into(),
    });
    row(
        &mut h,
        "Bytes saved (served from cache)",
        "bytes-saved",
        &|c| human_bytes(c.cache_bytes),
    );
    row(&mut h, "Bytes fetched upstream", "bytes-upstream", &|c| {
        human_bytes(c.upstream_bytes)
    });
    row(&mut h, "Bytes sent", "bytes-sent", &|c| {
        human_bytes(c.sent_bytes)
    });
    row(&mut h, "Requests", "requests", &|c| c.requests.to_string());
    row(&mut h, "Cache lookups", "lookups", &|c| {
        c.lookups.to_string()
    });
    h.push_str("</table></section></div>");
    upstreams(app, &mut h);
    // Most pulled images.
    h.push_str("<section><h2>Most pulled images</h2>");
    let top = app.ops.pulls.top(TOP_PULLS, private);
    if top.is_empty() {
        h.push_str("<p class=\"muted\">No pulls since start.</p>");
    } else {
        h.push_str("<table><tr><th>Image</th><th>Upstream</th><th class=\"num\">Pulls</th></tr>");
        for (up, repo, tag, n) in top {
            let _ = write!(
                h,
                "<tr><td><code>{}:{}</code></td><td>{}</td><td class=\"num\">{n}</td></tr>",
                esc(&repo),
                esc(&tag),
                esc(upstream_label(&up)),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
    // Repositories.
    let _ = write!(
        h,
        "<section><h2>Repositories ({}{})</h2>",
        repos.len(),
        if listing.more { "+" } else { "" }
    );
    if repos.is_empty() {
        h.push_str("<p class=\"muted\">Nothing cached yet.</p>");
    } else {
        h.push_str(
            "<table><tr><th>Repository</th><th>Upstream</th><th>Tags</th>\
             <th class=\"num\">Size</th><th>Last pull</th></tr>",
        );
        for r in repos {
            let pulls = app.ops.pulls.get(pull_key(r), r.name.as_str());
            let more = r.tag_count.saturating_sub(r.tag_names.len());
            let shown: Vec<String> = r.tag_names.iter().map(|t| esc(t)).collect();
            let _ = write!(
                h,
                "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}{}</td>\
                 <td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&repo_href(&r.upstream, &r.name)),
                esc(r.name.as_str()),
                esc(area_label(r)),
                shown.join(", "),
                if more > 0 {
                    format!(" <span class=\"muted\">and {more} more</span>")
                } else {
                    String::new()
                },
                size_text(r.size, r.size_complete),
                pulls.map_or_else(|| "—".to_owned(), |p| ago(p.last)),
            );
        }
        h.push_str("</table>");
        if listing.more {
            let _ = write!(
                h,
                "<p class=\"muted\">Showing the first {} in name order.</p>",
                repos.len()
            );
        }
    }
    h.push_str("</section></main></body></html>\n");
    Ok(h)
}

fn upstreams(app: &Service, h: &mut String) {
    h.push_str(
        "<section><h2>Upstreams</h2><table><tr><th>Upstream</th><th>URL</th>\
         <th>Last success</th><th>Last error</th><th>Rate limit remaining</th></tr>",
    );
    let mut ups: Vec<_> = app.mirror.upstreams().collect();
    ups.sort_by(|a, b| a.key.cmp(&b.key));
    for up in ups {
        let health = app.ops.hook.health(&up.key);
        let remaining = up.ratelimit_remaining.load(Ordering::Relaxed);
        let limit = up.ratelimit_limit.load(Ordering::Relaxed);
        let rl = match (remaining, limit) {
            (r, l) if r >= 0 && l > 0 => format!("{r} of {l}"),
            (r, _) if r >= 0 => r.to_string(),
            _ => "<span class=\"muted\">not reported</span>".to_owned(),
        };
        let ok = health.last_success.map_or_else(
            || "<span class=\"muted\">never</span>".into(),
            |t| format!("<span class=\"ok\">{}</span>", ago(t)),
        );
        let bad = health.last_error.map_or_else(
            || "<span class=\"muted\">none</span>".into(),
            |(t, msg)| format!("<span class=\"bad\">{}</span>: {}", ago(t), esc(&msg)),
        );
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{ok}</td><td>{bad}</td><td>{rl}</td></tr>",
            esc(&up.key),
            esc(&up.url.to_string()),
        );
    }
    h.push_str("</table>");
    let mut limits = Vec::new();
    if let Some(rps) = app.ops.hook.rps() {
        limits.push(format!("upstream requests: {rps}/s"));
    }
    let slots = &app.mirror.slots;
    if slots.max() > 0 {
        limits.push(format!(
            "upstream fetches: {} of {} slots in use",
            slots.in_use(),
            slots.max()
        ));
    }
    if let Some(rps) = app.config.rate_limit.per_client_rps {
        limits.push(format!(
            "clients: {rps}/s each{}",
            if app.config.rate_limit.exempt_cache_hits {
                ", cache hits exempt"
            } else {
                ""
            }
        ));
    }
    if !limits.is_empty() {
        let _ = write!(
            h,
            "<p class=\"muted\">berth's own limits: {}</p>",
            esc(&limits.join("; "))
        );
    }
    h.push_str("</section>");
}

async fn repo_page(
    app: &Service,
    rest: &str,
    private: bool,
) -> Result<Option<String>, RegistryError> {
    let Some((upstream, name)) = rest.split_once('/') else {
        return Ok(None);
    };
    let upstream = percent_decode(upstream);
    let Ok(name) = RepoName::parse(name.trim_end_matches('/')) else {
        return Ok(None);
    };
    let is_private = app.is_private(&name);
    if is_private && !private {
        return Ok(None);
    }
    let area = if is_private { Area::Local } else { Area::Cache };
    // The upstream part names a directory: only a plain name is looked up.
    let plain = !upstream.is_empty()
        && upstream != "."
        && upstream != ".."
        && !upstream.contains(['/', '\\', '\0']);
    if !plain || (is_private != (upstream == crate::store::LOCAL_UPSTREAM)) {
        return Ok(None);
    }
    let store = app.mirror.store().clone();
    let key = ListingKey::Repo {
        generation: app.pages.generation.load(Ordering::Relaxed),
        area,
        upstream: upstream.clone(),
        name: name.clone(),
    };
    let listing = app
        .pages
        .listing(key, move |memo, budget| {
            let repo = read_repo(
                memo,
                &store,
                area,
                upstream,
                name,
                MAX_REPO_PAGE_TAGS,
                budget,
            )?;
            Ok(Listing {
                repos: repo.into_iter().collect(),
                more: false,
            })
        })
        .await?;
    let Some(repo) = listing.repos.first() else {
        return Ok(None);
    };
    let pulls = app.ops.pulls.get(pull_key(repo), repo.name.as_str());
    let mut h = String::with_capacity(8 << 10);
    head(&mut h, &format!("{} — berth", repo.name));
    let _ = write!(
        h,
        "<main><p><a href=\"/\">← all repositories</a></p><section><h2>{}</h2><table>\
         <tr><th>Upstream</th><td>{}</td></tr><tr><th>Size</th><td>{}</td></tr>\
         <tr><th>Last pull</th><td>{}</td></tr></table></section>",
        esc(repo.name.as_str()),
        esc(area_label(repo)),
        size_text(repo.size, repo.size_complete),
        pulls
            .as_ref()
            .map_or_else(|| "— (none since start)".to_owned(), |p| ago(p.last)),
    );
    h.push_str(
        "<section><h2>Tags</h2><table><tr><th>Tag</th><th>Digest</th><th>Type</th>\
         <th class=\"num\">Size</th><th>Checked upstream</th><th class=\"num\">Pulls</th></tr>",
    );
    for t in &repo.tags {
        let kind = match t.platforms {
            Some(n) => format!("index, {n} platforms"),
            None => short_media_type(&t.media_type).to_owned(),
        };
        let n = pulls
            .as_ref()
            .and_then(|p| p.tags.get(&t.tag))
            .copied()
            .unwrap_or(0);
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td><code title=\"{}\">{}</code></td><td>{}</td>\
             <td class=\"num\">{}</td><td>{}</td><td class=\"num\">{n}</td></tr>",
            esc(&t.tag),
            esc(&t.digest),
            esc(short_digest(&t.digest)),
            esc(&kind),
            t.size
                .map_or_else(|| "?".to_owned(), |n| size_text(n, t.size_complete)),
            if repo.area == Area::Local {
                "—".to_owned()
            } else {
                ago(t.fetched_at)
            },
        );
    }
    h.push_str("</table>");
    let unread = repo.tag_count.saturating_sub(repo.tags.len());
    if unread > 0 {
        let _ = write!(h, "<p class=\"muted\">{unread} more tags not shown.</p>");
    }
    h.push_str("</section></main></body></html>\n");
    Ok(Some(h))
}

fn head(h: &mut String, title: &str) {
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body><header><h1><a href=\"/\">berth</a> \
         <small>pull-through registry mirror</small></h1></header>",
        esc(title)
    );
}

fn not_found(path: &str) -> String {
    let mut h = String::new();
    head(&mut h, "not found — berth");
    let _ = writeln!(
        h,
        "<main><section><h2>Not found</h2><p>Nothing at <code>{}</code>.</p>\
         <p><a href=\"/\">Back to the status page</a></p></section></main></body></html>",
        esc(path)
    );
    h
}

fn pull_key(r: &Repo) -> &str {
    if r.area == Area::Local {
        PRIVATE
    } else {
        &r.upstream
    }
}

fn area_label(r: &Repo) -> &str {
    if r.area == Area::Local {
        "private"
    } else {
        &r.upstream
    }
}

fn upstream_label(up: &str) -> &str {
    if up == PRIVATE {
        "private"
    } else {
        up
    }
}

fn repo_href(upstream: &str, name: &RepoName) -> String {
    format!("/ui/repo/{}/{}", percent_encode(upstream), name.as_str())
}

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Unreserved characters and `:` (as in `localhost:5000`) stay; everything else is escaped.
const UPSTREAM_KEY: &percent_encoding::AsciiSet = &crate::oci::routes::UNRESERVED.remove(b':');

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UPSTREAM_KEY).to_string()
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn short_digest(d: &str) -> &str {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    hex.get(..12).unwrap_or(hex)
}

fn short_media_type(m: &str) -> &str {
    match m {
        "application/vnd.docker.distribution.manifest.v2+json" => "docker image",
        "application/vnd.oci.image.manifest.v1+json" => "OCI image",
        "application/vnd.docker.distribution.manifest.list.v2+json" => "docker index",
        "application/vnd.oci.image.index.v1+json" => "OCI index",
        other => other,
    }
}

fn percent(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m {secs}s"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// "5m ago", with the exact time in a tooltip.
fn ago(then: u64) -> String {
    let when = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(then));
    let d = Duration::from_secs(now_secs().saturating_sub(then));
    format!(
        "<span title=\"{}\">{} ago</span>",
        esc(&when),
        human_duration(d)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_formatting() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(percent_encode("docker.io"), "docker.io");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h 2m");
        assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listings_are_shared_and_at_most_two_computed_at_once() {
        let pages = Arc::new(Pages {
            render_wait: Duration::from_millis(200),
            ..Pages::new()
        });
        let computed = Arc::new(AtomicU64::new(0));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let key = |n: u64| ListingKey::Overview {
            generation: n,
            private: false,
        };
        // Visitors of one listing share one computation, which holds one of the two turns.
        let slow = |n: u64| {
            let (pages, computed, gate) = (pages.clone(), computed.clone(), gate.clone());
            tokio::spawn(async move {
                pages
                    .listing(key(n), move |_, _| {
                        computed.fetch_add(1, Ordering::Relaxed);
                        let _ = lock(&gate).recv();
                        Ok(Listing {
                            repos: Vec::new(),
                            more: false,
                        })
                    })
                    .await
                    .is_ok()
            })
        };
        let visits: Vec<_> = (0..10).map(|_| slow(1)).collect();
        let other = slow(2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pages.renders.available_permits() > 0 {
            assert!(Instant::now() < deadline, "two listings never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A third listing finds no turn within the wait: 503, counted.
        let refused = pages
            .listing(key(3), |_, _| {
                Ok(Listing {
                    repos: Vec::new(),
                    more: false,
                })
            })
            .await;
        assert!(matches!(refused, Err(RegistryError::Unavailable(_))));
        assert_eq!(pages.busy_refusals.load(Ordering::Relaxed), 1);
        release.send(()).unwrap();
        release.send(()).unwrap();
        for v in visits {
            assert!(v.await.unwrap());
        }
        assert!(other.await.unwrap());
        assert_eq!(computed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn top_pulls_hide_private_repositories() {
        let p = PullStats::default();
        for _ in 0..3 {
            p.record("docker.io", "library/alpine", Some("3"));
        }
        p.record(PRIVATE, "private/app", Some("1"));
        p.record(PRIVATE, "private/app", Some("1"));
        p.record("docker.io", "library/alpine", None);
        let top = p.top(10, false);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].3, 3);
        assert_eq!(p.top(10, true).len(), 2);
    }
}
