//! The operations layer around every request: client address, CORS, client rate limits, the
//! request log line, metrics and the statistics the status page shows.
//!
//! [`Service`] is the handlers with this layer around them: for each request it calls
//! [`begin`] when the request arrives, [`intercept`] to answer it early (CORS preflight, rate
//! limit), then the handlers, and [`finish`] with the response. `finish` wraps the response body so
//! that the bytes really sent are counted and the log line is written when the body is done (or
//! dropped because the client went away), not when the headers leave.
//!
//! Upstream clients report every request they send to the [`UpstreamHook`], which also admits
//! them under `rate_limit.upstream_rps` and remembers each upstream's last success and error.

pub mod cors;
pub mod metrics;
pub mod ratelimit;
pub mod status;

use crate::lock;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, ORIGIN};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::config::Config;
use crate::http::server::Handler;
use crate::http::{error_response, App, Body, OpsPages, Served};
use crate::mirror::upstream::{UpstreamError, UpstreamObserver};
use crate::mirror::{Mirror, Outcome};
use crate::oci::names::Reference;
use crate::oci::routes::{Query, Route};
use crate::ops::cors::Cors;
use crate::ops::metrics::{Content, Metrics, UpstreamStatus};
use crate::ops::ratelimit::{Client, ClientLimits, UpstreamRate};
use crate::ops::status::{PullStats, Traffic, PRIVATE};
use crate::store::now_secs;

/// The handlers with the ops layer around them: what the listeners serve. It dereferences to
/// the [`App`] it wraps, so the ops code reads the mirror and the config as `app.mirror`.
pub struct Service {
    pub app: Arc<App>,
    pub ops: Ops,
    /// What keeps the status pages cheap (see `status`).
    pub pages: status::Pages,
}

impl std::ops::Deref for Service {
    type Target = App;

    fn deref(&self) -> &App {
        &self.app
    }
}

impl Service {
    pub fn new(app: App) -> Service {
        Service {
            ops: Ops::new(&app.config, &app.mirror),
            app: Arc::new(app),
            pages: status::Pages::new(),
        }
    }

    /// One request, start to end: never fails, errors become registry JSON errors.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: std::net::SocketAddr,
    ) -> Response<Body> {
        let route = Route::parse(req.uri().path());
        let info = begin(&self, &req, peer, route.as_ref().ok());
        let write = !matches!(*req.method(), Method::GET | Method::HEAD);
        let manifest = matches!(route, Ok(Route::Manifest { .. }));
        let resp = match intercept(&self, &info, &req) {
            Some(resp) => resp,
            None => {
                // Boxed: `scope` holds its future in two places, so unboxed it would count twice
                // in what every request in flight holds.
                let served = Box::pin(self.app.respond(route, req, info.client.ip, &*self));
                self.ops.limits.scope(info.client.ip, served).await
            }
        };
        // What the status pages list changes when a tag comes from upstream, or with a push
        // or delete; their listings are made anew then.
        if let Some(served) = resp.extensions().get::<Served>() {
            if (manifest && served.outcome == Outcome::Miss)
                || (served.outcome == Outcome::Local && write && resp.status().is_success())
            {
                self.pages.changed();
            }
        }
        finish(&self, info, resp)
    }
}

impl Handler for Service {
    fn handle(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: std::net::SocketAddr,
    ) -> futures_util::future::BoxFuture<'static, Response<Body>> {
        Box::pin(Service::handle(self, req, peer))
    }
}

impl OpsPages for Service {
    fn metrics(&self, head: bool) -> Result<Response<Body>, crate::oci::error::RegistryError> {
        metrics::main_listener(self, head)
    }

    fn status<'a>(
        &'a self,
        path: &'a str,
        req: &'a Request<hyper::body::Incoming>,
        head: bool,
        client: std::net::IpAddr,
    ) -> futures_util::future::BoxFuture<'a, Result<Response<Body>, crate::oci::error::RegistryError>>
    {
        Box::pin(status::page(self, path, req, head, client))
    }

    fn form<'a>(
        &'a self,
        path: &'a str,
        req: Request<hyper::body::Incoming>,
        client: std::net::IpAddr,
    ) -> futures_util::future::BoxFuture<'a, Result<Response<Body>, crate::oci::error::RegistryError>>
    {
        Box::pin(status::forms::post(self, path, req, client))
    }
}

/// Everything the ops layer keeps, one per server.
pub struct Ops {
    pub metrics: Arc<Metrics>,
    pub limits: Arc<ClientLimits>,
    pub hook: Arc<UpstreamHook>,
    pub traffic: Traffic,
    pub pulls: PullStats,
    pub cors: Cors,
    /// Client connections, their caps and timeouts.
    pub conns: Arc<crate::http::conn::Conns>,
}

impl Ops {
    /// Builds the layer and attaches the upstream hook to every upstream client.
    pub fn new(config: &Config, mirror: &Mirror) -> Ops {
        let metrics = Arc::new(Metrics::new());
        let hook = Arc::new(UpstreamHook {
            metrics: metrics.clone(),
            rate: UpstreamRate::new(&config.rate_limit),
            refused: AtomicU64::new(0),
            health: Mutex::new(HashMap::new()),
        });
        for up in mirror.upstreams() {
            up.set_hook(hook.clone());
        }
        Ops {
            metrics,
            limits: Arc::new(ClientLimits::new(config)),
            hook,
            traffic: Traffic::new(mirror.fetches.clone()),
            pulls: PullStats::default(),
            cors: Cors::new(&config.cors_origins),
            conns: Arc::new(crate::http::conn::Conns::new(
                &config.limits,
                config.limits.max_connections.unwrap_or_else(|| {
                    crate::http::conn::connection_budget(
                        crate::http::conn::fd_limit(),
                        config.limits.fd_reserve,
                    )
                }),
                config.trusted_proxies.clone(),
            )),
        }
    }
}

/// What the ops layer knows about a request while it is served.
pub struct RequestInfo {
    pub client: Client,
    method: Method,
    pub path: String,
    route: &'static str,
    /// The upstream the request is routed to, if it names a mirrored repository.
    upstream: Option<String>,
    /// containerd's `?ns=`: the registry the client meant (logged; it is no secret).
    ns: Option<String>,
    /// What a manifest or blob request is for, for cache outcome metrics.
    kind: Option<Content>,
    /// For manifest requests: (upstream or [`PRIVATE`], repository, tag if by tag).
    pull: Option<(String, String, Option<String>)>,
    origin: Option<HeaderValue>,
    started: Instant,
    /// Whether the request came over h2 (its response body is handed out in slices).
    h2: bool,
}

impl RequestInfo {
    /// Health and metrics endpoints: never rate limited, logged at debug level only.
    fn is_probe(&self) -> bool {
        matches!(self.route, "healthz" | "readyz" | "metrics")
    }
}

/// Notes what the ops layer needs before the request is handed to the handlers.
pub fn begin<B>(
    app: &Service,
    req: &Request<B>,
    peer: std::net::SocketAddr,
    route: Option<&Route>,
) -> RequestInfo {
    let started = Instant::now();
    let client = app.ops.limits.client(peer, req.headers());
    let named = match route {
        Some(Route::Manifest { name, .. })
        | Some(Route::Blob { name, .. })
        | Some(Route::Tags { name })
        | Some(Route::Referrers { name, .. }) => Some(name),
        _ => None,
    };
    let ns = Query::parse(req.uri().query()).ns;
    let mut upstream = None;
    let mut repo = None;
    if let Some(name) = named {
        if app.is_private(name) {
            repo = Some((PRIVATE.to_owned(), name.to_string()));
        } else {
            if let Ok((up, name)) = app.mirror.route(ns.as_deref(), name.clone()) {
                upstream = Some(up.key.clone());
                repo = Some((up.key.clone(), name.to_string()));
            }
        }
    }
    let pull = match (route, repo) {
        (Some(Route::Manifest { reference, .. }), Some((up, name))) => {
            let tag = match reference {
                Reference::Tag(t) => Some(t.to_string()),
                Reference::Digest(_) => None,
            };
            Some((up, name, tag))
        }
        _ => None,
    };
    RequestInfo {
        client,
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        route: route.map(Route::label).unwrap_or("invalid"),
        upstream,
        ns,
        kind: match route {
            Some(Route::Manifest { .. }) => Some(Content::Manifest),
            Some(Route::Blob { .. }) => Some(Content::Blob),
            _ => None,
        },
        pull,
        origin: req.headers().get(ORIGIN).cloned(),
        started,
        h2: req.version() == http::Version::HTTP_2,
    }
}

/// A response that answers the request before the handlers see it: a CORS preflight, or a 429
/// for a client over its limit (unless only upstream work is counted).
pub fn intercept<B>(app: &Service, info: &RequestInfo, req: &Request<B>) -> Option<Response<Body>> {
    if let Some(resp) = app
        .ops
        .cors
        .preflight(req.method(), &info.path, req.headers())
    {
        return Some(resp);
    }
    let limits = &app.ops.limits;
    if info.is_probe() || !limits.enabled() || limits.exempt_cache_hits {
        return None;
    }
    limits
        .check(info.client.ip)
        .err()
        .map(|e| error_response(&e, req.method()))
}

/// Counts the response, adds CORS headers and wraps the body so the log line and the byte
/// counts are written when it has been sent.
pub fn finish(app: &Arc<Service>, info: RequestInfo, mut resp: Response<Body>) -> Response<Body> {
    let outcome = resp.extensions().get::<Served>().map(|s| s.outcome);
    let status = resp.status();
    if let (Some(kind), Some(outcome)) = (info.kind, outcome) {
        app.ops.metrics.cache_outcome(kind, outcome);
        app.ops.traffic.lookup(outcome);
        // A manifest GET is what Docker Hub counts as a pull; one answered from the cache is a
        // pull avoided (a HEAD revalidating the tag is not counted as one).
        let avoided = kind == Content::Manifest
            && outcome == Outcome::Hit
            && info.method == Method::GET
            && status == StatusCode::OK;
        if let (true, Some(up)) = (avoided, &info.upstream) {
            app.ops.metrics.pull_avoided(up);
            app.ops.traffic.pull_avoided();
        }
    }
    if status == StatusCode::OK {
        if let Some((up, repo, tag)) = &info.pull {
            app.ops.pulls.record(up, repo, tag.as_deref());
        }
    }
    app.ops
        .cors
        .decorate(&info.path, info.origin.as_ref(), resp.headers_mut());
    let (parts, body) = resp.into_parts();
    // With a declared length, hyper drops a body once that many bytes are out without asking
    // for its end: that is how the last piece is known to have been taken.
    let expected = match info.method {
        Method::HEAD => None,
        _ => parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok()),
    };
    let tracked = Tracked {
        slice: if info.h2 { SLICE } else { usize::MAX },
        inner: body,
        sent: 0,
        handed: 0,
        rest: Bytes::new(),
        expected,
        done: Some(Done {
            app: app.clone(),
            info,
            status,
            outcome,
        }),
    };
    Response::from_parts(parts, BodyExt::boxed(tracked))
}

/// Pieces a response body is handed to an h2 connection in. A cache hit is read in pieces of a
/// megabyte; handed over whole, a piece would sit in the stream's send buffer for as long as the
/// client does not read, and be counted as sent while it does. Smaller slices cost throughput:
/// 64 KiB took an eighth off an h2 cache hit, 256 KiB nothing measurable. HTTP/1 gets whole
/// pieces: its one response at a time leaves the socket in large writes (64 KiB slices cost a
/// fifth of the cache-hit throughput), and a stalled HTTP/1 client is seen at the socket
/// (`conn::Io`).
const SLICE: usize = 256 << 10;

/// A response body that counts the bytes the connection has taken from it.
///
/// A piece counts once the connection asks for the next one (it has found room for this one:
/// hyper polls again only then) or the body is complete; the piece a stalled connection still
/// holds when it is dropped does not.
struct Tracked {
    /// The largest piece handed out at once.
    slice: usize,
    inner: Body,
    sent: u64,
    /// The length of the last piece handed out, not yet counted.
    handed: u64,
    /// What is left of a large frame of `inner`, handed out in slices.
    rest: Bytes,
    /// The declared length (Content-Length), if any.
    expected: Option<u64>,
    done: Option<Done>,
}

struct Done {
    app: Arc<Service>,
    info: RequestInfo,
    status: StatusCode,
    outcome: Option<Outcome>,
}

impl Tracked {
    fn hand(&mut self, mut data: Bytes) -> Frame<Bytes> {
        if data.len() > self.slice {
            self.rest = data.split_off(self.slice);
        }
        self.handed = data.len() as u64;
        Frame::data(data)
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        this.sent += std::mem::take(&mut this.handed);
        if !this.rest.is_empty() {
            let rest = std::mem::take(&mut this.rest);
            return Poll::Ready(Some(Ok(this.hand(rest))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(this.hand(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let complete = self.rest.is_empty()
            && (self.inner.is_end_stream() || self.expected == Some(self.sent + self.handed));
        if complete {
            self.sent += self.handed;
        }
        if let Some(done) = self.done.take() {
            done.log(self.sent);
        }
    }
}

impl Done {
    fn log(self, bytes: u64) {
        let info = &self.info;
        let elapsed = info.started.elapsed();
        let status = self.status.as_u16();
        self.app
            .ops
            .metrics
            .request(info.route, status, elapsed, self.outcome, bytes);
        let outcome = self.outcome.map_or("-", Outcome::as_str);
        if !info.is_probe() {
            self.app.ops.traffic.sent(self.outcome, bytes);
        }
        let ms = (elapsed.as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
        let client = info.client.ip;
        let method = &info.method;
        let path = info.path.as_str();
        // Called as people see it (see `upstream::display_name`); metrics keep the key.
        let upstream = info
            .upstream
            .as_deref()
            .map_or("-", |key| self.app.mirror.upstream_name(key));
        let route = info.route;
        let ns = info.ns.as_deref();
        // The path and `ns` only: query strings may carry tokens, and no header is ever logged.
        if info.is_probe() {
            tracing::debug!(%client, %method, path, status, bytes, ms, route = %route, "request");
        } else {
            tracing::info!(%client, %method, path, status, bytes, ms, route = %route, cache = %outcome, upstream = %upstream, ns, "request");
        }
    }
}

/// The last thing an upstream did well and badly, for the status page.
#[derive(Debug, Clone, Default)]
pub struct UpstreamHealth {
    /// Seconds since the epoch.
    pub last_success: Option<u64>,
    pub last_error: Option<(u64, String)>,
}

/// Called by every upstream client around each request it sends.
pub struct UpstreamHook {
    metrics: Arc<Metrics>,
    rate: Option<UpstreamRate>,
    /// Upstream requests refused by `rate_limit.upstream_rps`.
    pub refused: AtomicU64,
    health: Mutex<HashMap<String, UpstreamHealth>>,
}

impl UpstreamObserver for UpstreamHook {
    /// Admits a request under `rate_limit.upstream_rps`, waiting a little if needed.
    fn admit<'a>(
        &'a self,
        upstream: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), UpstreamError>> {
        Box::pin(async move {
            let Some(rate) = &self.rate else {
                return Ok(());
            };
            rate.admit().await.inspect_err(|e| {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(upstream, error = %e, "upstream request refused by rate_limit.upstream_rps");
            })
        })
    }

    /// Records what a request sent to `upstream` came to.
    fn record(&self, upstream: &str, result: Result<StatusCode, &UpstreamError>) {
        let status = UpstreamStatus::of(result);
        self.metrics.upstream(upstream, status);
        let error = status.is_error().then(|| match result {
            Ok(s) => format!("answered {s}"),
            Err(UpstreamError::Timeout) => "timed out".to_owned(),
            Err(UpstreamError::TooManyRequests { .. }) => "rate limited (429)".to_owned(),
            Err(e) => e.to_string(),
        });
        let now = now_secs();
        let mut health = lock(&self.health);
        let h = health.entry(upstream.to_owned()).or_default();
        match error {
            Some(message) => h.last_error = Some((now, message)),
            None => h.last_success = Some(now),
        }
    }
}

impl UpstreamHook {
    /// The configured `upstream_rps`, if any.
    pub fn rps(&self) -> Option<f64> {
        self.rate.as_ref().map(|r| r.rps)
    }

    pub fn health(&self, upstream: &str) -> UpstreamHealth {
        lock(&self.health)
            .get(upstream)
            .cloned()
            .unwrap_or_default()
    }
}
