//! The upstream client: one per configured upstream registry.
//!
//! It owns everything about talking to a registry the way Docker does: Bearer token auth (with
//! tokens cached per scope and fetched once for concurrent requests), Basic auth, blob redirects
//! to CDN hosts (never carrying the Authorization header to another host), timeouts, and Docker
//! Hub's rate-limit headers and 429 back-off.
//!
//! [`auth`] holds the token and Basic auth, [`breaker`] the circuit breaker, [`errors`] what can
//! go wrong and how a failed request is told apart (a timeout or an unreachable upstream).

mod auth;
mod breaker;
mod errors;

pub use errors::{UpstreamError, UpstreamSetupError};

use auth::{parse_challenge, pull_scope, token_key, Challenge, Token, TokenExpiry};
use breaker::Health;

use crate::lock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{UpstreamConfig, UpstreamUrl, DOCKER_HUB};
use crate::oci::names::{Digest, Reference, RepoName};

/// The largest manifest berth will take from an upstream (Docker Hub's limit is 4 MiB).
const MAX_MANIFEST: usize = 8 << 20;
const MAX_REDIRECTS: usize = 5;

/// Told about every request an upstream client sends. The ops layer implements it: it counts
/// the requests, keeps each upstream's health for the status page, and admits requests under
/// `rate_limit.upstream_rps`.
pub trait UpstreamObserver: Send + Sync {
    /// Admits a request to `upstream`, waiting a little if needed, or refuses it.
    fn admit<'a>(
        &'a self,
        upstream: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), UpstreamError>>;
    /// What a request sent to `upstream` came to.
    fn record(&self, upstream: &str, result: Result<StatusCode, &UpstreamError>);
}

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A manifest fetched from upstream, verified against its digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// The name people see for an upstream: its key, except that the built-in `docker.io` entry
/// pointed at another registry (`--upstream https://registry.office`) is called by that
/// registry's host, not by a name that says Docker Hub. The key itself stays `docker.io`: it is
/// what containerd's `?ns=docker.io` asks for, and the directory its cache is filed under.
pub fn display_name(key: &str, url: &UpstreamUrl) -> String {
    if key == DOCKER_HUB && url.authority != DOCKER_HUB_REGISTRY {
        url.authority.clone()
    } else {
        key.to_owned()
    }
}

/// The host Docker Hub's registry API is served from.
const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";

pub struct Upstream {
    /// What `?ns=` names and the cache is filed under.
    pub key: String,
    /// What logs and the status page call it: see [`display_name`].
    pub name: String,
    pub url: UpstreamUrl,
    pub config: UpstreamConfig,
    client: HttpClient,
    credentials: Option<(String, String)>,
    /// The Bearer challenge learnt from the first 401, so later requests send a token up front.
    bearer: Mutex<Option<(String, Option<String>)>>,
    tokens: moka::future::Cache<String, Token>,
    backoff_until: Mutex<Option<Instant>>,
    health: Mutex<Health>,
    /// Times the breaker took the upstream for down.
    pub breaker_trips: std::sync::atomic::AtomicU64,
    /// Docker Hub's last `ratelimit-remaining`, -1 before any was seen.
    pub ratelimit_remaining: AtomicI64,
    pub ratelimit_limit: AtomicI64,
    /// Told about every request sent (metrics, health) and admits it (`upstream_rps`).
    hook: OnceLock<Arc<dyn UpstreamObserver>>,
}

impl Upstream {
    pub fn new(key: &str, config: &UpstreamConfig) -> Result<Upstream, UpstreamSetupError> {
        let credentials = match (&config.user, &config.password_file) {
            (Some(user), Some(file)) => {
                let password =
                    std::fs::read_to_string(file).map_err(|e| UpstreamSetupError::File {
                        path: file.display().to_string(),
                        message: e.to_string(),
                    })?;
                Some((
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_owned(),
                ))
            }
            _ => None,
        };
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = &config.ca_file {
            let fail = |message: String| UpstreamSetupError::File {
                path: ca.display().to_string(),
                message,
            };
            let pem = std::fs::read(ca).map_err(|e| fail(e.to_string()))?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| fail(e.to_string()))?;
                roots.add(cert).map_err(|e| fail(e.to_string()))?;
                added += 1;
            }
            if added == 0 {
                return Err(fail("no PEM certificate found".into()));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout.0));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(Upstream {
            key: key.to_owned(),
            name: display_name(key, &config.url),
            url: config.url.clone(),
            config: config.clone(),
            client,
            credentials,
            bearer: Mutex::new(None),
            tokens: moka::future::Cache::builder()
                .max_capacity(10_000)
                .expire_after(TokenExpiry)
                .build(),
            backoff_until: Mutex::new(None),
            health: Mutex::new(Health::Up { failures: 0 }),
            breaker_trips: std::sync::atomic::AtomicU64::new(0),
            ratelimit_remaining: AtomicI64::new(-1),
            ratelimit_limit: AtomicI64::new(-1),
            hook: OnceLock::new(),
        })
    }

    /// Sets the hook told about every upstream request; only the first call takes effect.
    pub fn set_hook(&self, hook: Arc<dyn UpstreamObserver>) {
        let _ = self.hook.set(hook);
    }

    /// Docker Hub files official images under `library/`.
    pub fn is_docker_hub(&self) -> bool {
        self.key == crate::config::DOCKER_HUB
    }

    fn uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        format!("{}{}", self.url, path_and_query)
            .parse()
            .map_err(|e| UpstreamError::Invalid(format!("{e}")))
    }

    /// GETs a manifest and checks its bytes against the digest (the requested one, or the one the
    /// upstream claims in `Docker-Content-Digest`).
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &str,
    ) -> Result<FetchedManifest, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self.send(Method::GET, &path, accept, repo).await?;
        let resp = check_status(resp)?;
        let media_type = content_type(resp.headers());
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let body = Limited::new(resp.into_body(), MAX_MANIFEST)
            .collect()
            .await
            .map_err(|e| UpstreamError::Invalid(format!("reading manifest: {e}")))?
            .to_bytes();
        let digest = Digest::of(&body);
        let expected = match reference {
            Reference::Digest(d) => Some(*d),
            Reference::Tag(_) => claimed,
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(UpstreamError::Invalid(format!(
                    "manifest digest {digest} does not match {expected}"
                )));
            }
        }
        Ok(FetchedManifest {
            bytes: body,
            media_type,
            digest,
        })
    }

    /// HEADs a manifest: the cheap way to learn what a tag points at (Docker Hub does not count
    /// HEADs against the pull limit).
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &str,
    ) -> Result<Option<(Digest, String, u64)>, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self.send(Method::HEAD, &path, accept, repo).await?;
        let resp = check_status(resp)?;
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let len = content_length(resp.headers()).unwrap_or(0);
        Ok(digest.map(|d| (d, content_type(resp.headers()), len)))
    }

    /// GETs (or HEADs) a blob, following CDN redirects. The response status is checked.
    pub async fn blob(
        &self,
        method: Method,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let mut resp = self.send(method.clone(), &path, "*/*", repo).await?;
        let mut current = self.uri(&path)?;
        for _ in 0..MAX_REDIRECTS {
            if !matches!(
                resp.status(),
                StatusCode::MOVED_PERMANENTLY
                    | StatusCode::FOUND
                    | StatusCode::SEE_OTHER
                    | StatusCode::TEMPORARY_REDIRECT
                    | StatusCode::PERMANENT_REDIRECT
            ) {
                return check_status(resp);
            }
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| UpstreamError::Invalid("redirect without Location".into()))?;
            let next = resolve(&current, location)?;
            // The redirect target (a CDN) gets no credentials: it authenticates by a signed URL,
            // and the token belongs to the registry that issued the challenge.
            let same_host =
                next.authority() == current.authority() && next.scheme() == current.scheme();
            tracing::debug!(upstream = %self.name, to = %next.authority().map(|a| a.as_str()).unwrap_or(""), "following blob redirect");
            let mut req = Request::builder().method(method.clone()).uri(next.clone());
            if same_host
                && next.authority().map(|a| a.as_str()) == Some(self.url.authority.as_str())
            {
                if let Some(auth) = self.auth_header(repo).await? {
                    req = req.header(AUTHORIZATION, auth);
                }
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
            resp = self.dispatch(req).await?;
            current = next;
        }
        Err(UpstreamError::Invalid("too many redirects".into()))
    }

    /// GETs the tag list, passing `n` and `last` through.
    pub async fn tags_list(
        &self,
        repo: &RepoName,
        query: &str,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = if query.is_empty() {
            format!("/v2/{repo}/tags/list")
        } else {
            format!("/v2/{repo}/tags/list?{query}")
        };
        check_status(
            self.send(Method::GET, &path, "application/json", repo)
                .await?,
        )
    }

    /// Sends a request to the registry itself, answering one auth challenge.
    async fn send(
        &self,
        method: Method,
        path: &str,
        accept: &str,
        repo: &RepoName,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.check_backoff()?;
        let uri = self.uri(path)?;
        let build = |auth: Option<HeaderValue>| {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(ACCEPT, accept);
            if let Some(auth) = auth {
                req = req.header(AUTHORIZATION, auth);
            }
            req.body(Empty::new())
                .map_err(|e| UpstreamError::Invalid(e.to_string()))
        };
        let sent_auth = self.auth_header(repo).await?;
        let had_auth = sent_auth.is_some();
        let resp = self.dispatch(build(sent_auth)?).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(resp);
        };
        let auth = match challenge {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let scope = scope.unwrap_or_else(|| pull_scope(repo));
                *lock(&self.bearer) = Some((realm.clone(), service.clone()));
                let key = token_key(&realm, service.as_deref(), &scope);
                if had_auth {
                    // The token we sent was refused: fetch a new one rather than retry with it.
                    self.tokens.invalidate(&key).await;
                }
                Some(self.token(&realm, service.as_deref(), &scope).await?)
            }
            Challenge::Basic => match &self.credentials {
                Some(_) if !had_auth => self.basic(),
                _ => return Ok(resp),
            },
        };
        self.dispatch(build(auth)?).await
    }

    /// Sends one request through the breaker and the hook: admitted under `upstream_rps`, then
    /// recorded.
    async fn dispatch(
        &self,
        req: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let probe = self.admit_health()?;
        let result = match self.hook.get() {
            None => self.dispatch_unobserved(req).await,
            Some(hook) => {
                hook.admit(&self.key).await?;
                let result = self.dispatch_unobserved(req).await;
                hook.record(&self.key, result.as_ref().map(|r| r.status()));
                result
            }
        };
        self.record_health(probe, &result);
        result
    }

    /// Sends one request with the first-byte timeout, and records rate-limit headers and 429s.
    async fn dispatch_unobserved(
        &self,
        mut req: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // Registries' logs (and Docker Hub's support) can tell berth's traffic apart.
        req.headers_mut().insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(concat!("berth/", env!("CARGO_PKG_VERSION"))),
        );
        let timeout = self.config.response_timeout.0;
        let resp = match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(Err(e)) => return Err(UpstreamError::unanswered(&e)),
            Ok(Ok(resp)) => resp,
        };
        self.record_rate_limit(resp.headers());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))
                .unwrap_or(Duration::from_secs(60))
                .min(self.config.max_retry_after.0);
            *lock(&self.backoff_until) = Instant::now().checked_add(retry_after);
            tracing::warn!(upstream = %self.name, retry_after_s = retry_after.as_secs(), "upstream rate limit hit; backing off");
            return Err(UpstreamError::TooManyRequests { retry_after });
        }
        Ok(resp)
    }

    fn check_backoff(&self) -> Result<(), UpstreamError> {
        let mut guard = lock(&self.backoff_until);
        if let Some(until) = *guard {
            let now = Instant::now();
            if now < until {
                return Err(UpstreamError::TooManyRequests {
                    retry_after: until - now,
                });
            }
            *guard = None;
        }
        Ok(())
    }

    fn record_rate_limit(&self, headers: &HeaderMap) {
        let read = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .and_then(|v| v.trim().parse::<i64>().ok())
        };
        if let Some(limit) = read("ratelimit-limit") {
            self.ratelimit_limit.store(limit, Ordering::Relaxed);
        }
        if let Some(remaining) = read("ratelimit-remaining") {
            let before = self.ratelimit_remaining.swap(remaining, Ordering::Relaxed);
            if before != remaining {
                tracing::info!(upstream = %self.name, remaining, limit = self.ratelimit_limit.load(Ordering::Relaxed), "upstream rate limit");
            }
        }
    }
}

fn check_status(resp: Response<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
    match resp.status() {
        s if s.is_success() => Ok(resp),
        StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Err(UpstreamError::Denied(resp.status()))
        }
        s => Err(UpstreamError::Status(s)),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
        .unwrap_or_else(|| "application/octet-stream".into())
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// `Retry-After` as seconds or as an HTTP date (relative to `now`). Any number of seconds
/// parses (a value too large for a `u64` means "very long"); the caller caps what is obeyed.
fn parse_retry_after(v: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = v.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or_default())
}

fn resolve(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = || UpstreamError::Invalid(format!("bad redirect location {location:?}"));
    let uri: Uri = location.parse().map_err(|_| bad())?;
    if uri.scheme().is_some() {
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad());
        }
        return Ok(uri);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(location.parse().map_err(|_| bad())?);
    Uri::from_parts(parts).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve() {
        let base: Uri = "https://registry-1.docker.io/v2/library/alpine/blobs/sha256:x"
            .parse()
            .unwrap();
        assert_eq!(
            resolve(&base, "https://cdn.example/abc?sig=1")
                .unwrap()
                .to_string(),
            "https://cdn.example/abc?sig=1"
        );
        assert_eq!(
            resolve(&base, "/other").unwrap().to_string(),
            "https://registry-1.docker.io/other"
        );
        assert!(resolve(&base, "file:///etc/passwd").is_err());
    }

    #[test]
    fn retry_after_forms() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_000);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(480))
        );
        // A date in the past: retry at once.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
