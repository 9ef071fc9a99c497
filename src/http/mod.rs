//! Request handlers: from a parsed route to an HTTP response.
//!
//! Handlers speak HTTP (headers, ranges, status codes) and delegate everything else: content
//! comes from the mirror (cache, then upstream) or the private registry; no handler touches a file.

mod admin;
mod blobs;
pub mod conn;
mod mirror;
pub mod private;
mod response;
pub mod server;
pub mod tls;

pub(crate) use blobs::BlobRead;
use blobs::{blob_headers, parse_range};
pub use response::{api_version, empty, error_response, full};
use response::{base_response, internal, json_body, text};

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
use crate::store::pages::Pages;
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
    /// A form posted to the status page (sign-in, sign-out, actions on a repository).
    fn form<'a>(
        &'a self,
        path: &'a str,
        req: Request<Incoming>,
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
    /// `token_key` signs the tokens of `/auth/token` (shared by replicas of one store).
    pub fn new(config: Config, mirror: Mirror, token_key: crate::auth::TokenKey) -> App {
        App {
            auth: crate::auth::Authenticator::new(&config).with_token_key(token_key),
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
        // The URI shares its bytes: no copy of the path unless a 503 logs it.
        let uri = req.uri().clone();
        let mut resp = match route {
            Ok(route) => self
                .dispatch(route, req, client, need.as_ref(), pages)
                .await
                .unwrap_or_else(|e| {
                    if let RegistryError::Unavailable(why) = &e {
                        tracing::warn!(%client, path = uri.path(), reason = %why, "answering 503");
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
        // The status page authorizes itself: a session of its sign-in form counts there, and
        // only there. Each step's future is boxed: one request's future is then the size of the
        // step it is at, not the sum of every step's (rustc lays awaited futures out side by
        // side), which is what concurrent requests hold.
        let user = match route {
            Route::Status { .. } => None,
            _ => {
                Box::pin(
                    self.auth
                        .authorize(&self.config, access, need, req.headers(), client),
                )
                .await?
            }
        };
        if repo == Repository::Private || route == Route::Catalog {
            return Box::pin(crate::http::private::dispatch(
                self, route, req, query, user,
            ))
            .await;
        }
        match (route, method) {
            (Route::Base, Method::GET | Method::HEAD) => {
                Ok(base_response(StatusCode::OK, json_body(head, "{}")))
            }
            (Route::Healthz, Method::GET | Method::HEAD) => Ok(text(StatusCode::OK, "ok\n")),
            (Route::Token, Method::GET) => {
                let token = Box::pin(self.auth.issue_token(
                    &self.config,
                    req.headers(),
                    req.uri().query(),
                    client,
                ))
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
            (Route::Status { path }, Method::POST) => pages.form(&path, req, client).await,
            (Route::Manifest { name, reference }, Method::GET | Method::HEAD) => {
                let accept = AcceptSet::from_headers(
                    req.headers()
                        .get_all(ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok()),
                );
                Box::pin(self.get_manifest(name, reference, &query, &accept, head)).await
            }
            (Route::Blob { name, digest }, Method::GET | Method::HEAD) => {
                Box::pin(self.get_blob(name, digest, &query, &BlobRead::of(&req))).await
            }
            (Route::Tags { name }, Method::GET) => Box::pin(self.get_tags(name, &query)).await,
            (Route::Manifest { name, reference }, Method::DELETE) => {
                Box::pin(self.purge_manifest(name, reference, &query)).await
            }
            (Route::MirrorRepo { name }, Method::DELETE) => {
                Box::pin(self.purge_repository(name, &query)).await
            }
            (Route::Warm { name }, Method::POST) => self.start_warm(name, req.uri().query()),
            (Route::Users { user }, _) => Box::pin(self.users(user, req)).await,
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
}
