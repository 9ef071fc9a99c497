//! Prometheus metrics, in the OpenMetrics text exposition at `GET /metrics`.
//!
//! Per-request metrics (requests, latency, cache outcomes, bytes sent) are counted by the ops
//! layer as responses are served; upstream requests by the hook every upstream client calls.
//! Everything else (disk cache, downloads, upstream rate-limit headers, limiter refusals) is read
//! from the components at scrape time ([`scraped`]), so there is one source of truth for each
//! number.
//!
//! With `metrics_listen` set, `/metrics` is served on that listener only.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::{empty, full, Body};
use crate::mirror::upstream::UpstreamError;
use crate::mirror::Outcome;
use crate::oci::error::RegistryError;
use crate::ops::Service;

mod scraped;

use scraped::Scraped;

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
struct UpstreamOnly {
    upstream: String,
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
    pulls_avoided: Family<UpstreamOnly, Counter>,
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
        let pulls_avoided = Family::<UpstreamOnly, Counter>::default();
        registry.register(
            "berth_pulls_avoided",
            "Manifest GETs of mirrored repositories answered from the cache, by upstream: pulls \
             the upstream did not see (Docker Hub counts a pull per manifest GET; a HEAD that \
             revalidates a tag is not one)",
            pulls_avoided.clone(),
        );
        Metrics {
            registry,
            pulls_avoided,
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

    /// A manifest GET of a repository mirrored from `upstream` was answered from the cache.
    pub fn pull_avoided(&self, upstream: &str) {
        self.pulls_avoided
            .get_or_create(&UpstreamOnly {
                upstream: upstream.to_owned(),
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
