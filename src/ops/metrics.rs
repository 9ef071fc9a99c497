//! Prometheus metrics, in the OpenMetrics text exposition at `GET /metrics`.
//!
//! Per-request metrics (requests, latency, cache outcomes, bytes sent) are counted by the ops
//! layer as responses are served; upstream requests by the hook every upstream client calls.
//! Everything else (disk cache, downloads, upstream rate-limit headers, limiter refusals) is read
//! from the components at scrape time, so there is one source of truth for each number.
//!
//! With `metrics_listen` set, `/metrics` is served on that listener only.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::{empty, full, Body};
use crate::mirror::upstream::UpstreamError;
use crate::mirror::Outcome;
use crate::oci::error::RegistryError;
use crate::ops::ratelimit::Refusal;
use crate::ops::Service;

pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets, in seconds: from a memory hit to a multi-gigabyte layer.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
    status: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// What a request the cache answers is for: the `kind` label of the cache metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Manifest,
    Blob,
}

impl Content {
    pub fn as_str(self) -> &'static str {
        match self {
            Content::Manifest => "manifest",
            Content::Blob => "blob",
        }
    }
}

/// What one request sent to an upstream came to: the `status` label of the upstream metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamStatus {
    /// A response (a 429 the client turned into an error counts as one).
    Answered(StatusCode),
    Timeout,
    Unreachable,
}

impl UpstreamStatus {
    pub fn of(result: Result<StatusCode, &UpstreamError>) -> UpstreamStatus {
        match result {
            Ok(s) => UpstreamStatus::Answered(s),
            Err(UpstreamError::Timeout) => UpstreamStatus::Timeout,
            Err(UpstreamError::TooManyRequests { .. }) => {
                UpstreamStatus::Answered(StatusCode::TOO_MANY_REQUESTS)
            }
            Err(_) => UpstreamStatus::Unreachable,
        }
    }

    /// Whether it counts as an upstream error: no answer, a 429 or a 5xx.
    pub fn is_error(self) -> bool {
        match self {
            UpstreamStatus::Answered(s) => {
                s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamStatus::Timeout | UpstreamStatus::Unreachable => true,
        }
    }

    fn label(self) -> String {
        match self {
            UpstreamStatus::Answered(s) => s.as_u16().to_string(),
            UpstreamStatus::Timeout => "timeout".to_owned(),
            UpstreamStatus::Unreachable => "unreachable".to_owned(),
        }
    }
}

/// The metrics counted as things happen.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
    cache: Family<CacheLabels, Counter>,
    served_bytes: Family<OutcomeLabels, Counter>,
    cache_served_bytes: Counter,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_errors: Family<UpstreamLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "berth_http_requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        let latency: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register(
            "berth_http_request_duration_seconds",
            "Time from request to the last byte of the response, by route",
            latency.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "berth_cache_requests",
            "Manifest and blob requests by kind and cache outcome (hit, miss, joined, stale, local)",
            cache.clone(),
        );
        let served_bytes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "berth_served_bytes",
            "Response body bytes actually sent to clients, by cache outcome",
            served_bytes.clone(),
        );
        let cache_served_bytes = Counter::default();
        registry.register(
            "berth_cache_served_bytes",
            "Response body bytes sent to clients from the cache (hits and stale serves)",
            cache_served_bytes.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "berth_upstream_requests",
            "Requests sent to upstreams, by upstream and response status (or timeout/unreachable)",
            upstream_requests.clone(),
        );
        let upstream_errors = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "berth_upstream_errors",
            "Upstream requests that failed: timeouts, unreachable, 429 and 5xx",
            upstream_errors.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            cache,
            served_bytes,
            cache_served_bytes,
            upstream_requests,
            upstream_errors,
        }
    }

    /// A finished request: its route, status, duration and the body bytes sent.
    pub fn request(
        &self,
        route: &'static str,
        status: u16,
        elapsed: Duration,
        outcome: Option<Outcome>,
        bytes: u64,
    ) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
        if bytes > 0 {
            self.served_bytes
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.map_or("-", Outcome::as_str),
                })
                .inc_by(bytes);
            if matches!(outcome, Some(Outcome::Hit | Outcome::Stale)) {
                self.cache_served_bytes.inc_by(bytes);
            }
        }
    }

    /// A manifest or blob response started, with how the cache answered it.
    pub fn cache_outcome(&self, kind: Content, outcome: Outcome) {
        self.cache
            .get_or_create(&CacheLabels {
                kind: kind.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// One request sent to an upstream.
    pub fn upstream(&self, upstream: &str, status: UpstreamStatus) {
        let labels = UpstreamLabels {
            upstream: upstream.to_owned(),
            status: status.label(),
        };
        self.upstream_requests.get_or_create(&labels).inc();
        if status.is_error() {
            self.upstream_errors.get_or_create(&labels).inc();
        }
    }

    /// The text exposition: the counted metrics, then the ones read from the components now.
    pub fn render(&self, app: &Service) -> String {
        let mut out = String::with_capacity(8 << 10);
        let mut scraped = Registry::default();
        scraped.register_collector(Box::new(Scraped::of(app)));
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &scraped);
        let _ = encode_eof(&mut out);
        out
    }
}

/// The `/metrics` response.
pub fn response(app: &Service, head: bool) -> Response<Body> {
    let text = app.ops.metrics.render(app);
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)
        .header(CONTENT_LENGTH, text.len())
        .body(if head { empty() } else { full(text) })
        .unwrap_or_default()
}

/// `/metrics` on the main listener: 404 when it has a listener of its own (`metrics_listen`).
pub fn main_listener(app: &Service, head: bool) -> Result<Response<Body>, RegistryError> {
    if app.config.metrics_listen.is_some() {
        return Err(RegistryError::NotFound(
            "/metrics is served on the metrics_listen address".into(),
        ));
    }
    Ok(response(app, head))
}

/// Serves `/metrics` alone on its own address (`metrics_listen`), until `stopped` changes.
pub async fn listen(
    app: Arc<Service>,
    addr: SocketAddr,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "listening (metrics)");
    let task = tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let app = app.clone();
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(metrics_only(&app, &req)) }
                    });
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                _ = stopped.changed() => break,
            }
        }
    });
    Ok((local, task))
}

fn metrics_only<B>(app: &Service, req: &Request<B>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    match (req.uri().path(), req.method()) {
        ("/metrics", &Method::GET | &Method::HEAD) => response(app, head),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full("this listener serves /metrics only\n"))
            .unwrap_or_default(),
    }
}

/// Values read from the components at scrape time.
#[derive(Debug, Default)]
struct Scraped {
    families: Vec<Sampled>,
}

#[derive(Debug)]
struct Sampled {
    name: &'static str,
    help: &'static str,
    counter: bool,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Scraped {
    fn of(app: &Service) -> Scraped {
        let mirror = &app.mirror;
        let ops = &app.ops;
        let mut s = Scraped::default();
        let n = |v: u64| v as f64;
        s.gauge(
            "berth_uptime_seconds",
            "Seconds since berth started",
            app.started.elapsed().as_secs_f64(),
        );
        s.gauge(
            "berth_downloads_in_flight",
            "Blob downloads from upstreams under way",
            mirror.fetches.in_flight() as f64,
        );
        s.counter(
            "berth_downloads_started",
            "Blob downloads started",
            n(mirror.fetches.started.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_downloads_joined",
            "Blob requests that joined a download already under way",
            n(mirror.fetches.joined.load(Ordering::Relaxed)),
        );
        s.push(
            "berth_downloads_failed",
            "Blob downloads that ended without a cache entry, by reason",
            true,
            mirror
                .fetches
                .failures()
                .into_iter()
                .map(|(reason, v)| (vec![("reason", reason.to_owned())], n(v)))
                .collect(),
        );
        s.counter(
            "berth_manifest_fetches_joined",
            "Manifest requests that joined an upstream request already under way",
            n(mirror.manifest_joins()),
        );
        s.counter(
            "berth_stale_serves",
            "Tags served from the cache because the upstream was unavailable",
            n(mirror.stale_serves.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_upstream_fetched_bytes",
            "Blob bytes received from upstreams",
            n(mirror.fetches.upstream_bytes.load(Ordering::Relaxed)),
        );
        s.gauge(
            "berth_disk_cache_bytes",
            "Bytes of mirrored content on disk",
            n(mirror.disk.size()),
        );
        s.gauge(
            "berth_disk_cache_limit_bytes",
            "The disk cache's size limit (max_cache_size)",
            n(mirror.disk.limit()),
        );
        s.counter(
            "berth_disk_cache_evictions",
            "Blobs evicted from the disk cache",
            n(mirror.disk.evictions.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_disk_cache_evicted_bytes",
            "Bytes evicted from the disk cache",
            n(mirror.disk.evicted_bytes.load(Ordering::Relaxed)),
        );
        let private = &app.private;
        s.gauge(
            "berth_uploads_open",
            "Blob upload sessions open in the private namespace",
            private.uploads_open() as f64,
        );
        s.counter(
            "berth_uploads_refused",
            "Upload starts refused because the user had max_uploads_per_user sessions open",
            n(private.uploads_refused.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_uploads_expired",
            "Upload sessions removed for being idle longer than upload_max_age",
            n(private.uploads_expired.load(Ordering::Relaxed)),
        );
        let mut remaining = Vec::new();
        let mut limit = Vec::new();
        let mut down = Vec::new();
        let mut trips = Vec::new();
        for up in mirror.upstreams() {
            let labels = vec![("upstream", up.key.clone())];
            down.push((labels.clone(), if up.is_down() { 1.0 } else { 0.0 }));
            trips.push((labels.clone(), n(up.breaker_trips.load(Ordering::Relaxed))));
            let r = up.ratelimit_remaining.load(Ordering::Relaxed);
            if r >= 0 {
                remaining.push((labels.clone(), r as f64));
            }
            let l = up.ratelimit_limit.load(Ordering::Relaxed);
            if l >= 0 {
                limit.push((labels, l as f64));
            }
        }
        s.push(
            "berth_upstream_down",
            "1 while the circuit breaker takes the upstream for down",
            false,
            down,
        );
        s.push(
            "berth_upstream_breaker_trips",
            "Times the circuit breaker took the upstream for down",
            true,
            trips,
        );
        s.push(
            "berth_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream (Docker Hub) reported",
            false,
            remaining,
        );
        s.push(
            "berth_upstream_ratelimit_limit",
            "The last ratelimit-limit an upstream (Docker Hub) reported",
            false,
            limit,
        );
        let slots = &mirror.slots;
        if slots.max() > 0 {
            s.gauge(
                "berth_upstream_fetch_slots_in_use",
                "Upstream fetches holding one of the max_upstream_concurrency slots",
                slots.in_use() as f64,
            );
            s.gauge(
                "berth_upstream_fetch_slots_max",
                "rate_limit.max_upstream_concurrency",
                slots.max() as f64,
            );
        }
        let refused = [
            (
                Refusal::Client,
                ops.limits.refused_client.load(Ordering::Relaxed),
            ),
            (
                Refusal::UpstreamRps,
                ops.hook.refused.load(Ordering::Relaxed),
            ),
            (
                Refusal::UpstreamConcurrency,
                slots.refused.load(Ordering::Relaxed),
            ),
        ];
        let conns = &ops.conns;
        s.gauge(
            "berth_connections_open",
            "Client connections open (plain and TLS)",
            conns.open() as f64,
        );
        s.gauge(
            "berth_connections_max",
            "limits.max_connections: client connections allowed at once",
            conns.max as f64,
        );
        s.gauge(
            "berth_responses_in_flight",
            "Responses not yet taken in full by their clients",
            conns.responses_in_flight() as f64,
        );
        s.push(
            "berth_connections_refused",
            "Client connections closed on arrival because a connection cap was reached, by limit",
            true,
            crate::http::conn::Reason::REFUSALS
                .iter()
                .map(|r| (vec![("reason", r.as_str().to_owned())], n(conns.count(*r))))
                .collect(),
        );
        s.push(
            "berth_connections_closed",
            "Client connections closed by a timeout, by limit",
            true,
            crate::http::conn::Reason::CLOSES
                .iter()
                .map(|r| (vec![("reason", r.as_str().to_owned())], n(conns.count(*r))))
                .collect(),
        );
        s.push(
            "berth_ratelimited_requests",
            "Requests refused by berth's own rate limits, by limit",
            true,
            refused
                .iter()
                .map(|(r, v)| (vec![("limit", r.as_str().to_owned())], n(*v)))
                .collect(),
        );
        let auth = &app.auth.stats;
        let load = |a: &std::sync::atomic::AtomicU64| n(a.load(Ordering::Relaxed));
        s.counter(
            "berth_auth_password_checks",
            "Passwords checked with bcrypt (cached verifications not counted)",
            load(&auth.password_checks),
        );
        s.counter(
            "berth_auth_verified_cache_hits",
            "Basic credentials accepted from the short-lived cache of verified ones",
            load(&auth.verified_hits),
        );
        s.counter(
            "berth_auth_failed_logins",
            "Logins with wrong credentials",
            load(&auth.failed_logins),
        );
        s.gauge(
            "berth_auth_password_checks_running",
            "bcrypt checks running now (at most password_check_concurrency)",
            app.auth.checks_running() as f64,
        );
        s.counter(
            "berth_status_manifest_reads",
            "Manifests the status pages read from the store (each summary is read once)",
            n(app.pages.manifest_reads()),
        );
        s.counter(
            "berth_status_truncated_indexes",
            "Indexes whose size on the status page counts only their first 128 children",
            n(app.pages.truncated_indexes()),
        );
        s.counter(
            "berth_status_spent_budgets",
            "Status listings that stopped at their read budget (sizes shown as unknown)",
            n(app.pages.spent_budgets()),
        );
        s.counter(
            "berth_status_busy_refusals",
            "Status page visits refused because too many listings were being computed",
            load(&app.pages.busy_refusals),
        );
        s.push(
            "berth_auth_refused",
            "Requests refused by authentication limits: failed_logins (address over its limit, \
             refused before hashing), busy (too many password checks waiting), scope (a token \
             without the needed grant)",
            true,
            [
                ("failed_logins", &auth.refused_failures),
                ("busy", &auth.refused_busy),
                ("scope", &auth.refused_scope),
            ]
            .iter()
            .map(|(reason, v)| (vec![("reason", (*reason).to_owned())], load(v)))
            .collect(),
        );
        s
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, v: f64) {
        self.push(name, help, false, vec![(Vec::new(), v)]);
    }

    fn counter(&mut self, name: &'static str, help: &'static str, v: f64) {
        self.push(name, help, true, vec![(Vec::new(), v)]);
    }

    fn push(
        &mut self,
        name: &'static str,
        help: &'static str,
        counter: bool,
        samples: Vec<(Vec<(&'static str, String)>, f64)>,
    ) {
        self.families.push(Sampled {
            name,
            help,
            counter,
            samples,
        });
    }
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            if f.samples.is_empty() {
                continue;
            }
            let kind = if f.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut m = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            match f.samples.as_slice() {
                [(labels, v)] if labels.is_empty() => encode_sample(f.counter, *v, m)?,
                samples => {
                    for (labels, v) in samples {
                        encode_sample(f.counter, *v, m.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_sample(
    counter: bool,
    v: f64,
    e: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    if counter {
        ConstCounter::new(v).encode(e)
    } else {
        ConstGauge::new(v).encode(e)
    }
}

/// Reads one sample from an exposition text: the sum over the lines of `name` whose labels
/// include every pair in `labels`. For tests and tools.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if let Some(v) = rest.strip_prefix(' ') {
            ("", v)
        } else {
            continue;
        };
        let all = labels.iter().all(|(k, v)| {
            let mut want = String::new();
            let _ = write!(want, "{k}=\"{v}\"");
            label_text.split(',').any(|kv| kv == want)
        });
        if all {
            sum += value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_statuses_label_and_count_errors() {
        let of = |r: Result<StatusCode, &UpstreamError>| {
            let s = UpstreamStatus::of(r);
            (s.label(), s.is_error())
        };
        assert_eq!(of(Ok(StatusCode::OK)), ("200".into(), false));
        assert_eq!(of(Ok(StatusCode::NOT_FOUND)), ("404".into(), false));
        assert_eq!(of(Ok(StatusCode::BAD_GATEWAY)), ("502".into(), true));
        assert_eq!(of(Ok(StatusCode::TOO_MANY_REQUESTS)), ("429".into(), true));
        assert_eq!(
            of(Err(&UpstreamError::TooManyRequests {
                retry_after: Duration::from_secs(1)
            })),
            ("429".into(), true)
        );
        assert_eq!(of(Err(&UpstreamError::Timeout)), ("timeout".into(), true));
        assert_eq!(
            of(Err(&UpstreamError::Unreachable("refused".into()))),
            ("unreachable".into(), true)
        );
    }

    #[test]
    fn cache_served_bytes_count_hits_and_stale_serves_only() {
        let m = Metrics::new();
        let d = Duration::from_millis(1);
        m.request("blob", 200, d, Some(Outcome::Hit), 10);
        m.request("blob", 200, d, Some(Outcome::Stale), 5);
        m.request("blob", 200, d, Some(Outcome::Miss), 100);
        m.request("blob", 200, d, None, 1000);
        assert_eq!(m.cache_served_bytes.get(), 15);
        let mut text = String::new();
        encode_registry(&mut text, &m.registry).unwrap();
        assert_eq!(
            sample(&text, "berth_served_bytes_total", &[("outcome", "-")]),
            1000.0
        );
        assert_eq!(
            sample(&text, "berth_served_bytes_total", &[("outcome", "miss")]),
            100.0
        );
    }
}
