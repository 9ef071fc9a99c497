//! Request handlers: from a parsed route to an HTTP response.
//!
//! Handlers speak HTTP (headers, ranges, status codes) and delegate everything else: content
//! comes from the mirror (cache, then upstream) or the private registry; no handler touches a file.

pub mod conn;
pub mod private;
pub mod server;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE,
    RETRY_AFTER,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use crate::auth::{Access, Namespaces, Need, Repository};
use crate::config::Config;
use crate::mirror::fetch::Attach;
use crate::mirror::upstream::Upstream;
use crate::mirror::{upstream_error, Mirror, Outcome, TagList};
use crate::oci::error::RegistryError;
use crate::oci::media::AcceptSet;
use crate::oci::names::{Digest, Reference, RepoName};
use crate::oci::routes::{Query, Route};
use crate::store::blocking;
use crate::store::pages::{file_reader, Pages};
use crate::store::Area;

pub type Body = BoxBody<Bytes, io::Error>;

/// Everything a request may need, shared by all connections.
pub struct App {
    pub config: Config,
    pub mirror: Arc<Mirror>,
    pub started: Instant,
    /// Credentials and who needs them (see `auth`).
    pub auth: crate::auth::Authenticator,
    /// The private namespace's registry (see `private`).
    pub private: Arc<crate::registry::Registry>,
    /// Manifests by digest, for both halves (the mirror holds the same).
    pub manifests: Arc<crate::store::manifests::Manifests>,
}

/// The pages the ops layer serves on the main listener (the status page, `/metrics`). The
/// handlers authorize their routes like any other, then hand them over.
pub trait OpsPages: Send + Sync {
    fn metrics(&self, head: bool) -> Result<Response<Body>, RegistryError>;
    fn status<'a>(
        &'a self,
        path: &'a str,
        req: &'a Request<Incoming>,
        head: bool,
        client: std::net::IpAddr,
    ) -> futures_util::future::BoxFuture<'a, Result<Response<Body>, RegistryError>>;
}

/// Marks a request that arrived over TLS (set by the TLS listener).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// The local address of the connection a request came in on (set by the listeners).
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub SocketAddr);

/// Facts about a response that the request log wants, carried in response extensions.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    pub outcome: Outcome,
}

impl App {
    pub fn new(config: Config, mirror: Mirror) -> App {
        App {
            auth: crate::auth::Authenticator::new(&config),
            private: Arc::new(crate::registry::Registry::new(
                &config,
                mirror.store().clone(),
            )),
            manifests: mirror.manifests.clone(),
            config,
            mirror: Arc::new(mirror),
            started: Instant::now(),
        }
    }

    /// Answers a routed request (a route that did not parse too): errors become registry JSON
    /// errors, and a 401 carries the challenge that says where to get a token.
    pub async fn respond(
        &self,
        route: Result<Route, RegistryError>,
        req: Request<Incoming>,
        client: std::net::IpAddr,
        pages: &dyn OpsPages,
    ) -> Response<Body> {
        let method = req.method().clone();
        let need = route.as_ref().ok().and_then(|r| Need::of(r, &method));
        let challenge = self.challenge(&req, need.as_ref());
        let path = req.uri().path().to_owned();
        let mut resp = match route {
            Ok(route) => self
                .dispatch(route, req, client, need.as_ref(), pages)
                .await
                .unwrap_or_else(|e| {
                    if let RegistryError::Unavailable(why) = &e {
                        tracing::warn!(%client, %path, reason = %why, "answering 503");
                    }
                    error_response(&e, &method)
                }),
            // A tag that cannot exist names no manifest: what the OCI conformance suite
            // expects of a pull. A push of it stays 400 TAG_INVALID.
            Err(RegistryError::TagInvalid(tag)) if matches!(method, Method::GET | Method::HEAD) => {
                error_response(&RegistryError::ManifestUnknown(tag), &method)
            }
            Err(e) => error_response(&e, &method),
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            if let Some(challenge) = challenge {
                resp.headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, challenge);
            }
        }
        resp
    }

    /// The Bearer challenge for this request: Docker's token flow, with berth's own token
    /// endpoint at `public_url`, else at the address the connection came in on, never at what
    /// the Host header says (a client could send anyone's there). The scope names what the
    /// route needs. None without users (then the Basic challenge stands).
    fn challenge<B>(&self, req: &Request<B>, need: Option<&Need>) -> Option<HeaderValue> {
        self.config.htpasswd.as_ref()?;
        let base = match &self.config.public_url {
            Some(url) => url.to_string(),
            None => {
                let local = req.extensions().get::<LocalAddr>()?.0;
                let local = SocketAddr::new(local.ip().to_canonical(), local.port());
                let scheme = if req.extensions().get::<OverTls>().is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{local}")
            }
        };
        let mut value = format!("Bearer realm=\"{base}/auth/token\",service=\"berth\"");
        if let Some(need) = need {
            value.push_str(&format!(",scope=\"{}\"", need.scope()));
        }
        HeaderValue::from_str(&value).ok()
    }

    async fn dispatch(
        &self,
        route: Route,
        req: Request<Incoming>,
        client: std::net::IpAddr,
        need: Option<&Need>,
        pages: &dyn OpsPages,
    ) -> Result<Response<Body>, RegistryError> {
        let query = Query::parse(req.uri().query());
        let method = req.method().clone();
        let head = method == Method::HEAD;
        // Credentials first; then the private namespace (and the catalog) is the registry's.
        let repo = match crate::http::private::route_repo(&route) {
            Some(n) if self.is_private(n) => Repository::Private,
            _ => Repository::Mirrored,
        };
        let access = Access::of(&route, &method, repo, Namespaces::of(&self.config));
        let user = self
            .auth
            .authorize(&self.config, access, need, req.headers(), client)
            .await?;
        if repo == Repository::Private || route == Route::Catalog {
            return crate::http::private::dispatch(self, route, req, query, user).await;
        }
        match (route, method) {
            (Route::Base, Method::GET | Method::HEAD) => {
                Ok(base_response(StatusCode::OK, json_body(head, "{}")))
            }
            (Route::Healthz, Method::GET | Method::HEAD) => Ok(text(StatusCode::OK, "ok\n")),
            (Route::Token, Method::GET) => {
                let token = self
                    .auth
                    .issue_token(&self.config, req.headers(), req.uri().query(), client)
                    .await?;
                let body = serde_json::json!({
                    "token": token,
                    "access_token": token,
                    "expires_in": crate::auth::TOKEN_TTL.as_secs(),
                });
                Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, "application/json")
                    .body(full(body.to_string()))
                    .map_err(internal)?)
            }
            (Route::Readyz, Method::GET | Method::HEAD) => self.ready().await,
            (Route::Metrics, Method::GET | Method::HEAD) => pages.metrics(head),
            (Route::Status { path }, Method::GET | Method::HEAD) => {
                pages.status(&path, &req, head, client).await
            }
            (Route::Manifest { name, reference }, Method::GET | Method::HEAD) => {
                let accept = AcceptSet::from_headers(
                    req.headers()
                        .get_all(ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok()),
                );
                self.get_manifest(name, reference, &query, &accept, head)
                    .await
            }
            (Route::Blob { name, digest }, Method::GET | Method::HEAD) => {
                self.get_blob(name, digest, &query, &BlobRead::of(&req))
                    .await
            }
            (Route::Tags { name }, Method::GET) => self.get_tags(name, &query).await,
            (
                Route::Manifest { .. }
                | Route::Blob { .. }
                | Route::UploadStart { .. }
                | Route::Upload { .. },
                _,
            ) => Err(self.refuse_write()),
            (_, _) => Err(RegistryError::Unsupported(
                "method not allowed on this route".into(),
            )),
        }
    }

    pub(crate) fn is_private(&self, name: &RepoName) -> bool {
        self.config
            .private_ns
            .iter()
            .any(|ns| name.is_in_namespace(ns))
    }

    /// Every write outside the private namespace (private routes never get here).
    fn refuse_write(&self) -> RegistryError {
        RegistryError::Denied(
            "this repository is a read-only mirror; push into the private namespace".into(),
        )
    }

    async fn ready(&self) -> Result<Response<Body>, RegistryError> {
        let store = self.mirror.store().clone();
        blocking(move || store.probe_writable())
            .await
            .map_err(|e| RegistryError::Unavailable(format!("store not writable: {e}")))?;
        Ok(text(StatusCode::OK, "ready\n"))
    }

    async fn get_manifest(
        &self,
        name: RepoName,
        reference: Reference,
        query: &Query,
        accept: &AcceptSet,
        head: bool,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let (served, outcome) = self.mirror.manifest(&up, &name, &reference, accept).await?;
        let m = &served.manifest;
        let mut resp = Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, &*m.media_type)
            .header(CONTENT_LENGTH, m.bytes.len())
            .header("docker-content-digest", served.digest.to_string())
            .header(ETAG, format!("\"{}\"", served.digest))
            .body(if head { empty() } else { full(m.bytes.clone()) })
            .map_err(internal)?;
        api_version(&mut resp);
        resp.extensions_mut().insert(Served { outcome });
        Ok(resp)
    }

    async fn get_blob(
        &self,
        name: RepoName,
        digest: Digest,
        query: &Query,
        read: &BlobRead,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let (range, head) = (read.range.as_deref(), read.head);
        if let Some(resp) = self
            .serve_stored_blob(Area::Cache, digest, read, Outcome::Hit)
            .await?
        {
            return Ok(resp);
        }
        crate::mirror::admission::before_upstream()?;
        if head {
            // A blob being downloaded (or just verified, not yet renamed into the cache) has a
            // known length: no need to ask the upstream.
            if let Some(download) = self.mirror.fetches.running(&up.key, &digest) {
                if let Ok(Some(len)) = download.ready().await {
                    let mut resp =
                        blob_headers(Response::builder().status(StatusCode::OK), &digest)
                            .header(CONTENT_LENGTH, len)
                            .body(empty())
                            .map_err(internal)?;
                    resp.extensions_mut().insert(Served {
                        outcome: Outcome::Joined,
                    });
                    return Ok(resp);
                }
            }
            return self.head_upstream_blob(&up, &name, digest).await;
        }
        loop {
            match self.mirror.attach_blob(&up, &name, digest)? {
                Attach::Cached => {
                    if let Some(resp) = self
                        .serve_stored_blob(Area::Cache, digest, read, Outcome::Hit)
                        .await?
                    {
                        return Ok(resp);
                    }
                    // Evicted between the check and the open: start over.
                }
                Attach::InFlight { download, joined } => {
                    let outcome = if joined {
                        Outcome::Joined
                    } else {
                        Outcome::Miss
                    };
                    let total = download.ready().await.map_err(|e| match e {
                        crate::mirror::fetch::FetchFailure::Upstream(u) => {
                            upstream_blob_error(u, &name, &digest)
                        }
                        other => RegistryError::Unavailable(other.to_string()),
                    })?;
                    let (status, start, end) = match (total, range) {
                        (Some(total), Some(range)) => match parse_range(range, total)? {
                            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, Some(e)),
                            None => (StatusCode::OK, 0, None),
                        },
                        _ => (StatusCode::OK, 0, None),
                    };
                    // A range is a complete body of its own: its bytes are sent only once the
                    // whole blob is verified, so no client gets a complete wrong range.
                    let verified_only = status == StatusCode::PARTIAL_CONTENT;
                    let body = BodyExt::boxed(StreamBody::new(futures_util::StreamExt::map(
                        download.reader(start, end, verified_only, read.pages),
                        |r| r.map(Frame::data),
                    )));
                    let mut b = blob_headers(Response::builder().status(status), &digest);
                    match (status, total, end) {
                        (StatusCode::PARTIAL_CONTENT, Some(total), Some(end)) => {
                            b = b.header(CONTENT_LENGTH, end - start).header(
                                CONTENT_RANGE,
                                format!("bytes {start}-{}/{total}", end - 1),
                            );
                        }
                        (_, Some(total), _) => b = b.header(CONTENT_LENGTH, total),
                        _ => {}
                    }
                    let mut resp = b.body(body).map_err(internal)?;
                    resp.extensions_mut().insert(Served { outcome });
                    return Ok(resp);
                }
            }
        }
    }

    pub(crate) async fn serve_stored_blob(
        &self,
        area: Area,
        digest: Digest,
        read: &BlobRead,
        outcome: Outcome,
    ) -> Result<Option<Response<Body>>, RegistryError> {
        let (range, head) = (read.range.as_deref(), read.head);
        let store = self.mirror.store().clone();
        let Some((file, len)) = blocking(move || store.open_blob(area, &digest)).await? else {
            return Ok(None);
        };
        let lease = (area == Area::Cache).then(|| {
            self.mirror.disk.touch(&digest);
            self.mirror.disk.lease(digest)
        });
        let (status, start, end) = match range {
            Some(r) => match parse_range(r, len)? {
                Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
                None => (StatusCode::OK, 0, len),
            },
            None => (StatusCode::OK, 0, len),
        };
        let mut b = blob_headers(Response::builder().status(status), &digest)
            .header(CONTENT_LENGTH, end - start);
        if status == StatusCode::PARTIAL_CONTENT {
            b = b.header(CONTENT_RANGE, format!("bytes {start}-{}/{len}", end - 1));
        }
        let body = if head {
            empty()
        } else {
            // The lease rides along with the body, so eviction skips the blob while it is read.
            let stream =
                futures_util::StreamExt::map(file_reader(file, start, end, read.pages), move |r| {
                    let _keep = &lease;
                    r.map(Frame::data)
                });
            BodyExt::boxed(StreamBody::new(stream))
        };
        let mut resp = b.body(body).map_err(internal)?;
        resp.extensions_mut().insert(Served { outcome });
        Ok(Some(resp))
    }

    async fn head_upstream_blob(
        &self,
        up: &Arc<Upstream>,
        name: &RepoName,
        digest: Digest,
    ) -> Result<Response<Body>, RegistryError> {
        let resp = up
            .blob(Method::HEAD, name, &digest)
            .await
            .map_err(|e| upstream_blob_error(e, name, &digest))?;
        let mut b = blob_headers(Response::builder().status(StatusCode::OK), &digest);
        if let Some(len) = crate::mirror::upstream::content_length(resp.headers()) {
            b = b.header(CONTENT_LENGTH, len);
        }
        let mut resp = b.body(empty()).map_err(internal)?;
        resp.extensions_mut().insert(Served {
            outcome: Outcome::Miss,
        });
        Ok(resp)
    }

    async fn get_tags(
        &self,
        name: RepoName,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let pass = {
            let mut pass = form_urlencoded::Serializer::new(String::new());
            if let Some(n) = &query.n {
                pass.append_pair("n", n);
            }
            if let Some(last) = &query.last {
                pass.append_pair("last", last);
            }
            pass.finish()
        };
        crate::mirror::admission::before_upstream()?;
        let (TagList { body, link }, outcome) = self.mirror.tags_list(&up, &name, &pass).await?;
        let mut b = Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len());
        if let Some(link) = link {
            b = b.header(http::header::LINK, link);
        }
        let mut resp = b.body(full(body)).map_err(internal)?;
        api_version(&mut resp);
        resp.extensions_mut().insert(Served { outcome });
        Ok(resp)
    }
}

fn upstream_blob_error(
    e: crate::mirror::upstream::UpstreamError,
    repo: &RepoName,
    digest: &Digest,
) -> RegistryError {
    upstream_error(e, repo, RegistryError::BlobUnknown(digest.to_string()))
}

/// What a blob GET or HEAD asks for, and how its bytes may reach the connection.
pub(crate) struct BlobRead {
    pub range: Option<String>,
    pub head: bool,
    pub pages: Pages,
}

impl BlobRead {
    pub fn of<B>(req: &Request<B>) -> BlobRead {
        // Only plain HTTP/1.x hands body bytes to the kernel untouched (see `Pages`).
        let plain_h1 =
            req.extensions().get::<OverTls>().is_none() && req.version() <= http::Version::HTTP_11;
        BlobRead {
            range: range_header(req.headers()),
            head: req.method() == Method::HEAD,
            pages: if plain_h1 {
                Pages::Mapped
            } else {
                Pages::Copied
            },
        }
    }
}

/// The request's `Range` header, if it has one that is text.
pub(crate) fn range_header(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Parses a single `bytes=` range against a length: `Ok(None)` to serve the whole blob,
/// `Ok(Some((start, end_exclusive)))`, or 416 when the range lies outside the blob.
///
/// As RFC 9110 asks, a header that does not parse as one valid byte range (`bytes=5-2`,
/// `bytes=abc`, another unit, several ranges) is ignored: the whole blob is served.
fn parse_range(header: &str, len: u64) -> Result<Option<(u64, u64)>, RegistryError> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().unwrap_or(u64::MAX))
    };
    let unsatisfiable = RegistryError::RangeNotSatisfiable { len };
    let (start, end) = match (a.trim().is_empty(), number(a), number(b)) {
        // A suffix: the last `n` bytes.
        (true, _, Some(0)) => return Err(unsatisfiable),
        (true, _, Some(n)) => (len.saturating_sub(n), len),
        (false, Some(start), None) if b.trim().is_empty() => (start, len),
        (false, Some(start), Some(last)) if last >= start => {
            (start, last.saturating_add(1).min(len))
        }
        _ => return Ok(None),
    };
    if start >= len {
        return Err(unsatisfiable);
    }
    Ok(Some((start, end)))
}

fn blob_headers(b: http::response::Builder, digest: &Digest) -> http::response::Builder {
    b.header(CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string())
        .header(ETAG, format!("\"{digest}\""))
        .header(ACCEPT_RANGES, "bytes")
        .header("docker-distribution-api-version", "registry/2.0")
}

pub fn api_version(resp: &mut Response<Body>) {
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn json_body(head: bool, s: &'static str) -> Body {
    if head {
        empty()
    } else {
        full(s)
    }
}

fn base_response(status: StatusCode, body: Body) -> Response<Body> {
    let mut resp = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_default();
    api_version(&mut resp);
    resp
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(s))
        .unwrap_or_default()
}

fn internal(e: http::Error) -> RegistryError {
    RegistryError::Internal(e.to_string())
}

/// The registry JSON error document with the error's status.
pub fn error_response(e: &RegistryError, method: &Method) -> Response<Body> {
    let body = e.body();
    let len = body.len();
    let mut b = Response::builder()
        .status(e.status())
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, len);
    if let Some(after) = e.retry_after() {
        b = b.header(RETRY_AFTER, after.as_secs().max(1));
    }
    if let RegistryError::RangeNotSatisfiable { len } = e {
        b = b.header(CONTENT_RANGE, format!("bytes */{len}"));
    }
    if let RegistryError::Unauthorized(_) = e {
        b = b.header(http::header::WWW_AUTHENTICATE, "Basic realm=\"berth\"");
    }
    let mut resp = b
        .body(if method == Method::HEAD {
            empty()
        } else {
            full(body)
        })
        .unwrap_or_default();
    api_version(&mut resp);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some((50, 100)));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=100-200", 100).is_err());
        assert!(parse_range("bytes=-0", 100).is_err());
        assert_eq!(parse_range("bytes=-500", 100).unwrap(), Some((0, 100)));
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999", 100).unwrap(),
            Some((0, 100))
        );
        // Not one valid range: ignored, the whole blob is served (RFC 9110).
        for ignored in [
            "items=1-2",
            "bytes=5-2",
            "bytes=abc",
            "bytes=1-2,4-5",
            "bytes=",
            "bytes=-",
            "bytes=--1",
            "bytes=+1-2",
        ] {
            assert_eq!(parse_range(ignored, 100).unwrap(), None, "{ignored}");
        }
    }
}
