//! The status page: `/` and `/ui/repo/<upstream>/<name>`, server-rendered HTML with a little
//! inline CSS and no JavaScript.
//!
//! It shows uptime, the disk cache against its limit, hit ratio and bytes served from the cache
//! (today and since start), each upstream's health and rate-limit headroom, the most pulled images
//! and the cached repositories with their tags, sizes and last pull. Everything interpolated into
//! the page is HTML-escaped. Private repositories are listed only to visitors who
//! [`App::may_see_private`].
//!
//! It also shows the savings charts (see `history` and `chart`) and what is in flight (see
//! `inflight`). Pull counts and the traffic table are kept in memory: they start again at zero
//! with the process; the charts' history is kept in the data dir.
//!
//! Visitors may sign in with a user of the htpasswd file (`/ui/login`, see `session` and
//! `forms`): a session shows them the private namespace, and lets them delete private tags and
//! manifests from a repository's page.
//!
//! Anyone can make the cache hold what they like (a pull through the mirror is enough), so what
//! a page costs must not grow with it: see [`Pages`] for the bounds.

mod chart;
pub mod forms;
pub mod history;
mod inflight;
mod listing;
mod render;
pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
#[cfg(test)]
use std::time::Instant;

use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};

use crate::auth::Access;
use crate::http::App;
use crate::http::{empty, full, Body};
use crate::lock;
use crate::mirror::fetch::Fetches;
use crate::mirror::Outcome;
use crate::oci::error::RegistryError;
use crate::ops::Service;
use crate::store::{blocking, now_secs};
use listing::{Budget, Listing, ListingKey, Memo, READS_PER_LISTING};
use render::{not_found, overview, repo_page};

/// The upstream key under which pulls of private repositories are counted: the one their tags
/// are filed under, which is also the upstream part of their pages' paths.
pub(crate) use crate::store::LOCAL_UPSTREAM as PRIVATE;
/// Distinct repositories whose pulls are counted; later ones are not, to bound memory.
const MAX_TRACKED_REPOS: usize = 10_000;

/// How long a listing is reused (a push, a delete or a pull that reaches the upstream makes a
/// new one sooner).
const LISTING_TTL: Duration = Duration::from_secs(10);
/// Listings computed at once; visitors asking for the same one share it.
const MAX_RENDERS: usize = 2;
/// Longest wait for a turn at computing a listing before the visitor gets 503.
const RENDER_WAIT: Duration = Duration::from_secs(10);

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
    /// Failures to read and to write the history file (see `history`).
    load_failures: AtomicU64,
    save_failures: AtomicU64,
}

#[derive(Default)]
struct TrafficInner {
    total: Counts,
    today: Counts,
    day: u64,
    upstream_at_day_start: u64,
    /// The charts' buckets, and the upstream byte count already added to them.
    history: history::History,
    upstream_seen: u64,
}

impl Traffic {
    pub fn new(fetches: Arc<Fetches>) -> Traffic {
        Traffic {
            inner: Mutex::new(TrafficInner {
                day: now_secs() / 86_400,
                upstream_at_day_start: fetches.upstream_bytes.load(Ordering::Relaxed),
                upstream_seen: fetches.upstream_bytes.load(Ordering::Relaxed),
                ..TrafficInner::default()
            }),
            fetches,
            load_failures: AtomicU64::new(0),
            save_failures: AtomicU64::new(0),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut TrafficInner) -> T) -> T {
        let mut inner = lock(&self.inner);
        let now = now_secs();
        // Upstream bytes are the mirror's counter: what it grew by since goes in the history now.
        let upstream = self.fetches.upstream_bytes.load(Ordering::Relaxed);
        let grown = upstream.saturating_sub(inner.upstream_seen);
        inner.upstream_seen = upstream;
        inner.history.add(
            now,
            &history::Counters {
                upstream_bytes: grown,
                ..Default::default()
            },
        );
        let day = now / 86_400;
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
            let c = history::Counters {
                lookups: 1,
                hits: u64::from(hit),
                ..Default::default()
            };
            t.history.add(now_secs(), &c);
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
            if from_cache {
                let c = history::Counters {
                    cache_bytes: bytes,
                    ..Default::default()
                };
                t.history.add(now_secs(), &c);
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
    if path == "/ui/login" {
        let secure = session::secure(app, req);
        return Ok(forms::login_page(app, secure, StatusCode::OK, None, head));
    }
    let viewer = app.pages.sessions.viewer(app, req).await;
    if app.config.auth_everything && viewer.user.is_none() {
        // What `auth_everything` asks of any request, unless a session answers for it. A
        // visitor without credentials is shown where to sign in.
        let anonymous = !req.headers().contains_key(http::header::AUTHORIZATION);
        match app
            .auth
            .authorize(&app.config, Access::Mirror, None, req.headers(), client)
            .await
        {
            Err(RegistryError::Unauthorized(_)) if anonymous => {
                return Ok(forms::see_other("/ui/login", Vec::new()));
            }
            Err(e) => return Err(e),
            Ok(_) => {}
        }
    }
    let private = viewer.user.is_some() || app.may_see_private(req, client).await;
    let (status, html) = if path == "/" {
        (StatusCode::OK, overview(app, private, &viewer).await?)
    } else if let Some(rest) = path.strip_prefix("/ui/repo/") {
        let query = req.uri().query();
        match repo_page(app, rest, private, &viewer, query).await? {
            Some(html) => (StatusCode::OK, html),
            None => (StatusCode::NOT_FOUND, not_found(path, &viewer)),
        }
    } else {
        (StatusCode::NOT_FOUND, not_found(path, &viewer))
    };
    Ok(html_response(status, html, head))
}

/// A status page response. Pages hold no script: the policy forbids any, and forms may post
/// only to this server, which no other site may frame.
pub(super) fn html_response(status: StatusCode, html: String, head: bool) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/html; charset=utf-8")
        .header(CONTENT_LENGTH, html.len())
        .header(CACHE_CONTROL, "no-store")
        .header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'",
        )
        .header("x-content-type-options", "nosniff")
        .body(if head { empty() } else { full(html) })
        .unwrap_or_default()
}

/// What keeps the status pages cheap however much is cached: manifest summaries computed once
/// per digest (an index's children read once, at most
/// [`MAX_CHILDREN`](listing::MAX_CHILDREN) of them), listings computed within a read budget,
/// shared by concurrent visitors and reused for a while, and at most [`MAX_RENDERS`] of them
/// computed at once.
pub struct Pages {
    memo: Memo,
    listings: moka::future::Cache<ListingKey, Arc<Listing>>,
    renders: tokio::sync::Semaphore,
    render_wait: Duration,
    generation: AtomicU64,
    /// Visitors refused because too many listings were being computed.
    pub busy_refusals: AtomicU64,
    /// Signed-in visitors (see `session`).
    pub sessions: session::Sessions,
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
            sessions: session::Sessions::default(),
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

    /// Indexes whose size counted only their first [`MAX_CHILDREN`](listing::MAX_CHILDREN) children.
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

#[cfg(test)]
mod tests {
    use super::*;

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
                            private_hidden: false,
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
                    private_hidden: false,
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
