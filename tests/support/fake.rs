//! The in-process fake upstream registry: manifests, blobs, tags, token auth, redirects to a
//! "CDN", and fault injection per blob (corrupt, truncated, gated, slow).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, Notify};

use super::image::{pseudo_random, sha256, Image};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// How the fake answers one blob.
#[derive(Clone)]
pub enum BlobFault {
    /// Same length, different bytes: the digest will not match.
    Corrupt,
    /// Declares the full length, sends only this many bytes, then closes.
    Truncate(usize),
    /// Sends this many bytes, then waits for `gate` before the rest.
    Gate(usize, Arc<Notify>),
}

#[derive(Clone)]
pub struct Auth {
    /// `user:password` the token endpoint requires as Basic auth, if any.
    pub basic: Option<String>,
    pub expires_in: Option<u64>,
    /// Answer with `access_token` rather than `token`.
    pub access_token_field: bool,
}

#[derive(Default)]
pub struct FakeState {
    /// (repo, tag or digest) -> (bytes, media type). Tag entries are keyed per media type so
    /// Accept negotiation can be observed.
    pub manifests: HashMap<(String, String), Vec<(Bytes, String)>>,
    pub blobs: HashMap<String, Bytes>,
    pub faults: HashMap<String, BlobFault>,
    pub log: Vec<(Method, String, HeaderMap)>,
    /// When set, every /v2 request gets this status.
    pub fail_status: Option<(u16, Option<u64>)>,
    /// When set, every /v2 request hangs forever.
    pub hang: bool,
    pub auth: Option<Auth>,
    /// When set, blob GETs redirect here (`{cdn}/cdn/<digest>`).
    pub redirect_blobs_to: Option<String>,
    pub issued_tokens: usize,
    /// Tokens numbered up to this are refused (as if expired).
    pub revoked_below: usize,
    pub rate_limit_headers: bool,
    /// When set, manifest responses carry `ratelimit-remaining: N;w=21600`, N going down by one
    /// with each manifest GET (Docker Hub counts GETs as pulls; HEADs are free).
    pub rate_limit_remaining: Option<u64>,
    /// When set, manifest requests wait for this before answering.
    pub manifest_gate: Option<Arc<Notify>>,
}

#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
    pub token_requests: Arc<AtomicUsize>,
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Fake {
            addr,
            state: Arc::new(Mutex::new(FakeState::default())),
            token_requests: Arc::new(AtomicUsize::new(0)),
        };
        let f2 = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let f = f2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let f = f.clone();
                        async move { Ok::<_, Infallible>(f.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    pub fn add_image(&self, repo: &str, tag: &str, image: &Image) {
        let mut s = self.st();
        for b in image.blobs() {
            s.blobs.insert(sha256(&b), b);
        }
        s.manifests.insert(
            (repo.into(), tag.into()),
            vec![(image.manifest.clone(), image.media_type.into())],
        );
        s.manifests.insert(
            (repo.into(), image.digest.clone()),
            vec![(image.manifest.clone(), image.media_type.into())],
        );
    }

    pub fn add_manifest(&self, repo: &str, reference: &str, bytes: Bytes, media_type: &str) {
        let mut s = self.st();
        let e = s
            .manifests
            .entry((repo.into(), reference.into()))
            .or_default();
        e.retain(|(_, m)| m != media_type);
        e.push((bytes, media_type.into()));
    }

    /// Adds a pseudo-random blob that the fake sends up to byte `at`, then holds until the
    /// returned gate is notified. Returns (bytes, digest, gate).
    pub fn add_gated_blob(&self, seed: u64, len: usize, at: usize) -> (Bytes, String, Arc<Notify>) {
        let blob = pseudo_random(seed, len);
        let d = self.add_blob(blob.clone());
        let gate = Arc::new(Notify::new());
        self.st()
            .faults
            .insert(d.clone(), BlobFault::Gate(at, gate.clone()));
        (blob, d, gate)
    }

    pub fn add_blob(&self, b: Bytes) -> String {
        let d = sha256(&b);
        self.st().blobs.insert(d.clone(), b);
        d
    }

    /// Requests whose method and path match.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.st()
            .log
            .iter()
            .filter(|(m, p, _)| m.as_str() == method && p.contains(path_contains))
            .count()
    }

    pub fn requests(&self) -> usize {
        self.st().log.len()
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let full_path = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let method = req.method().clone();
        let headers = req.headers().clone();
        if path == "/token" {
            return self.token(&headers, req.uri().query().unwrap_or(""));
        }
        if let Some(d) = path.strip_prefix("/cdn/") {
            self.st()
                .log
                .push((method.clone(), full_path, headers.clone()));
            assert!(
                headers.get("authorization").is_none(),
                "the CDN was sent an Authorization header"
            );
            let blob = self.st().blobs.get(d).cloned();
            return match blob {
                Some(b) => self.blob_response(d, b, &method),
                None => status(404),
            };
        }
        let (fail, hang, auth, redirect, rl, mut remaining) = {
            let mut s = self.st();
            s.log.push((method.clone(), full_path, headers.clone()));
            (
                s.fail_status,
                s.hang,
                s.auth.clone(),
                s.redirect_blobs_to.clone(),
                s.rate_limit_headers,
                s.rate_limit_remaining,
            )
        };
        if hang {
            std::future::pending::<()>().await;
        }
        if let Some((code, retry)) = fail {
            let mut r = status(code);
            if let Some(retry) = retry {
                r.headers_mut().insert("retry-after", retry.into());
            }
            return r;
        }
        if auth.is_some() {
            let (issued, revoked) = {
                let s = self.st();
                (s.issued_tokens, s.revoked_below)
            };
            let ok = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer token-"))
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n > revoked && n <= issued);
            if !ok {
                let scope = repo_scope(&path);
                let mut r = status(401);
                let h = format!(
                    r#"Bearer realm="http://{}/token",service="fake-registry",scope="{}""#,
                    self.addr, scope
                );
                r.headers_mut()
                    .insert("www-authenticate", h.parse().unwrap());
                return r;
            }
        }
        let mut resp = if path == "/v2/" {
            status(200)
        } else if let Some((repo, rest)) = split_route(&path) {
            match rest {
                Route::Manifest(reference) => {
                    let gate = self.st().manifest_gate.clone();
                    if let Some(gate) = gate {
                        gate.notified().await;
                        gate.notify_one();
                    }
                    let accept = headers
                        .get_all("accept")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect::<Vec<_>>()
                        .join(",");
                    let found = self
                        .st()
                        .manifests
                        .get(&(repo.clone(), reference.clone()))
                        .cloned();
                    match found.and_then(|variants| pick(&variants, &accept)) {
                        Some((bytes, mt)) => {
                            let mut r = Response::builder()
                                .status(200)
                                .header("content-type", mt)
                                .header("content-length", bytes.len())
                                .header("docker-content-digest", sha256(&bytes))
                                .body(if method == Method::HEAD {
                                    empty()
                                } else {
                                    full(bytes)
                                })
                                .unwrap();
                            if rl {
                                r.headers_mut()
                                    .insert("ratelimit-limit", "100;w=21600".parse().unwrap());
                                r.headers_mut()
                                    .insert("ratelimit-remaining", "42;w=21600".parse().unwrap());
                            }
                            if method == Method::GET {
                                let mut s = self.st();
                                if let Some(n) = &mut s.rate_limit_remaining {
                                    *n = n.saturating_sub(1);
                                }
                                remaining = s.rate_limit_remaining;
                            }
                            if let Some(n) = remaining {
                                r.headers_mut().insert(
                                    "ratelimit-remaining",
                                    format!("{n};w=21600").parse().unwrap(),
                                );
                            }
                            r
                        }
                        None => error(404, "MANIFEST_UNKNOWN"),
                    }
                }
                Route::Blob(d) => {
                    if let (Some(cdn), true) = (&redirect, method == Method::GET) {
                        Response::builder()
                            .status(307)
                            .header("location", format!("{cdn}/cdn/{d}"))
                            .body(empty())
                            .unwrap()
                    } else {
                        let blob = self.st().blobs.get(&d).cloned();
                        match blob {
                            Some(b) => self.blob_response(&d, b, &method),
                            None => error(404, "BLOB_UNKNOWN"),
                        }
                    }
                }
                Route::Tags => {
                    let mut tags: Vec<String> = self
                        .st()
                        .manifests
                        .keys()
                        .filter(|(r, t)| *r == repo && !t.contains(':'))
                        .map(|(_, t)| t.clone())
                        .collect();
                    if tags.is_empty() {
                        return error(404, "NAME_UNKNOWN");
                    }
                    tags.sort();
                    let q = req.uri().query().unwrap_or("");
                    let param = |k: &str| {
                        q.split('&')
                            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                            .map(str::to_owned)
                    };
                    if let Some(last) = param("last") {
                        tags.retain(|t| *t > last);
                    }
                    let mut link = None;
                    if let Some(n) = param("n").and_then(|n| n.parse::<usize>().ok()) {
                        if tags.len() > n {
                            tags.truncate(n);
                            link = Some(format!(
                                "</v2/{repo}/tags/list?n={n}&last={}>; rel=\"next\"",
                                tags[n - 1]
                            ));
                        }
                    }
                    let body = serde_json::to_vec(&serde_json::json!({"name": repo, "tags": tags}))
                        .unwrap();
                    let mut r = Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(full(body))
                        .unwrap();
                    if let Some(l) = link {
                        r.headers_mut().insert("link", l.parse().unwrap());
                    }
                    r
                }
            }
        } else {
            status(404)
        };
        resp.headers_mut().insert(
            "docker-distribution-api-version",
            "registry/2.0".parse().unwrap(),
        );
        resp
    }

    fn token(&self, headers: &HeaderMap, query: &str) -> Response<Body> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let auth = self.st().auth.clone();
        let Some(auth) = auth else { return status(404) };
        assert!(
            query.contains("scope=repository"),
            "token request without a scope: {query}"
        );
        if let Some(expected) = &auth.basic {
            use base64::Engine as _;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(expected)
            );
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
                return status(401);
            }
        }
        let n = {
            let mut s = self.st();
            s.issued_tokens += 1;
            s.issued_tokens
        };
        let field = if auth.access_token_field {
            "access_token"
        } else {
            "token"
        };
        let mut body = serde_json::json!({ field: format!("token-{n}") });
        if let Some(e) = auth.expires_in {
            body["expires_in"] = e.into();
        }
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(full(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn blob_response(&self, digest: &str, b: Bytes, method: &Method) -> Response<Body> {
        let builder = Response::builder()
            .status(200)
            .header("content-length", b.len())
            .header("docker-content-digest", digest)
            .header("content-type", "application/octet-stream");
        if *method == Method::HEAD {
            return builder.body(empty()).unwrap();
        }
        let fault = self.st().faults.get(digest).cloned();
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        tokio::spawn(async move {
            let send = |b: Bytes| {
                let tx = tx.clone();
                async move { tx.send(Ok(Frame::data(b))).await.is_ok() }
            };
            match fault {
                None => {
                    for c in b.chunks(64 << 10) {
                        if !send(b.slice_ref(c)).await {
                            return;
                        }
                    }
                }
                Some(BlobFault::Corrupt) => {
                    let mut v = b.to_vec();
                    if let Some(x) = v.last_mut() {
                        *x ^= 0xff;
                    }
                    send(Bytes::from(v)).await;
                }
                Some(BlobFault::Truncate(n)) => {
                    send(b.slice(..n)).await;
                    let _ = tx.send(Err(std::io::Error::other("cut"))).await;
                }
                Some(BlobFault::Gate(n, gate)) => {
                    if !send(b.slice(..n)).await {
                        return;
                    }
                    gate.notified().await;
                    send(b.slice(n..)).await;
                }
            }
        });
        let stream = tokio_stream_from(rx);
        builder
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn pick(variants: &[(Bytes, String)], accept: &str) -> Option<(Bytes, String)> {
    if accept.is_empty() {
        return variants.first().cloned();
    }
    variants
        .iter()
        .find(|(_, mt)| accept.contains(mt.as_str()))
        .cloned()
}

enum Route {
    Manifest(String),
    Blob(String),
    Tags,
}

fn split_route(path: &str) -> Option<(String, Route)> {
    let rest = path.strip_prefix("/v2/")?;
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        return Some((repo.into(), Route::Tags));
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (repo, kind) = head.rsplit_once('/')?;
    match kind {
        "manifests" => Some((repo.into(), Route::Manifest(last.into()))),
        "blobs" => Some((repo.into(), Route::Blob(last.into()))),
        _ => None,
    }
}

fn repo_scope(path: &str) -> String {
    match split_route(path) {
        Some((repo, _)) => format!("repository:{repo}:pull"),
        None => "registry:catalog:*".into(),
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|n| match n {}).boxed()
}

pub fn status(code: u16) -> Response<Body> {
    Response::builder().status(code).body(empty()).unwrap()
}

fn error(code: u16, c: &str) -> Response<Body> {
    let body = format!(r#"{{"errors":[{{"code":"{c}","message":"x"}}]}}"#);
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap()
}
