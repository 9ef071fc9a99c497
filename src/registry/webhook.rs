//! Webhook notifications: a JSON event POSTed to every configured URL on each push and delete
//! in the private namespace.
//!
//! With a secret, each delivery carries `Berth-Signature: t=<unix seconds>,v1=<hex>`, where the
//! hex is HMAC-SHA256 with the secret over `<t>.<body>`: a receiver recomputes it and refuses a
//! `t` too far from its clock, so a captured delivery cannot be replayed later. Each attempt is
//! signed afresh, so a retry minutes later still passes such a window.
//!
//! Delivery runs in spawned tasks and never delays the request that caused it. Each delivery is
//! tried a few times with exponential backoff; an event that still cannot be delivered is logged
//! and dropped (receivers that must not miss anything should reconcile from the catalog).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Webhook, WebhookUrl};

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "berth-signature";

/// Attempts per event and receiver.
const ATTEMPTS: u32 = 4;
/// The first retry waits this long; each later one twice as long as the one before.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait for a receiver's answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries in flight at once; beyond that new events are dropped (and logged).
const MAX_IN_FLIGHT: usize = 1000;

/// What happened, as sent to receivers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// `push` or `delete`.
    pub action: &'static str,
    pub repository: String,
    pub tag: Option<String>,
    /// Every tag the action touched: the pushed tag, or on a delete the tags that went with the
    /// manifest (a delete by digest removes every tag pointing at it).
    pub tags: Vec<String>,
    pub digest: Option<String>,
    #[serde(rename = "mediaType")]
    pub media_type: Option<String>,
    pub size: Option<u64>,
    /// The user who did it.
    pub actor: Option<String>,
    /// RFC 3339, UTC.
    pub timestamp: String,
}

type HookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A receiver, ready to send to: its secret already read.
struct Receiver {
    url: WebhookUrl,
    key: Option<Arc<[u8]>>,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// What deliveries came to, for `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    /// Given up after every attempt failed.
    pub failed: AtomicU64,
    /// Dropped without an attempt: too many deliveries pending, or a secret that cannot be read.
    pub dropped: AtomicU64,
}

#[derive(Clone)]
pub struct Notifier {
    receivers: Arc<Vec<Arc<Receiver>>>,
    client: Option<HookClient>,
    in_flight: Arc<AtomicUsize>,
    pub stats: Arc<WebhookStats>,
}

impl Notifier {
    pub fn new(hooks: &[Webhook]) -> Notifier {
        let stats = Arc::new(WebhookStats::default());
        let receivers: Vec<_> = hooks
            .iter()
            .filter_map(|h| {
                // The config check read the secret already; failing now means the file changed.
                // Never send unsigned what the receiver expects signed.
                let key = match h.secret.as_ref().map(|s| s.load()).transpose() {
                    Ok(k) => k.map(Arc::from),
                    Err(e) => {
                        tracing::error!(url = %h.url, error = %e, "cannot read the webhook's secret; no events go to it");
                        return None;
                    }
                };
                Some(Arc::new(Receiver {
                    url: h.url.clone(),
                    key,
                    headers: h.headers.clone(),
                }))
            })
            .collect();
        let client = (!receivers.is_empty()).then(|| {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_connect_timeout(Some(TIMEOUT));
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
            .with_no_client_auth();
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https)
        });
        Notifier {
            receivers: Arc::new(receivers),
            client,
            in_flight: Arc::new(AtomicUsize::new(0)),
            stats,
        }
    }

    /// Sends the event to every receiver in the background.
    pub fn notify(&self, event: Event) {
        let Some(client) = &self.client else { return };
        let body = match serde_json::to_vec(&event) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a webhook event");
                return;
            }
        };
        for receiver in self.receivers.iter() {
            if self.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %receiver.url, action = event.action, repository = %event.repository, "too many webhook deliveries pending; event dropped");
                continue;
            }
            let (client, receiver, body) = (client.clone(), receiver.clone(), body.clone());
            let (in_flight, stats) = (self.in_flight.clone(), self.stats.clone());
            let (action, repo) = (event.action, event.repository.clone());
            tokio::spawn(async move {
                let counter = if deliver(&client, &receiver, body, action, &repo).await {
                    &stats.delivered
                } else {
                    &stats.failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                in_flight.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }
}

/// Tries to deliver one event; whether it was.
async fn deliver(
    client: &HookClient,
    receiver: &Receiver,
    body: Bytes,
    action: &str,
    repo: &str,
) -> bool {
    let url = &receiver.url;
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let outcome = match send(client, receiver, body.clone()).await {
            Ok(status) if status.is_success() => {
                tracing::debug!(%url, action, repository = repo, attempt, "webhook delivered");
                return true;
            }
            Ok(status) => format!("answered {status}"),
            Err(e) => e,
        };
        if attempt == ATTEMPTS {
            tracing::warn!(%url, action, repository = repo, attempts = ATTEMPTS, error = %outcome, "webhook not delivered; event dropped");
            return false;
        }
        tracing::debug!(%url, action, repository = repo, attempt, error = %outcome, "webhook delivery failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    false
}

/// The `Berth-Signature` value for a body sent at `t` (Unix seconds).
pub fn signature(key: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

async fn send(
    client: &HookClient,
    receiver: &Receiver,
    body: Bytes,
) -> Result<http::StatusCode, String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(receiver.url.0.clone());
    for (name, value) in &receiver.headers {
        req = req.header(name, value);
    }
    if let Some(key) = &receiver.key {
        req = req.header(
            SIGNATURE_HEADER,
            signature(key, crate::store::now_secs(), &body),
        );
    }
    // Set last, so a configured header cannot pretend to be another content type.
    let req = req
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("berth/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read (a bounded amount of) the answer so the connection can be reused.
    let _ = tokio::time::timeout(
        TIMEOUT,
        http_body_util::Limited::new(resp.into_body(), 64 << 10).collect(),
    )
    .await;
    Ok(status)
}

/// Seconds since the epoch as RFC 3339 in UTC (`2024-05-01T12:00:00Z`). A time past the year
/// 9999, which `time` does not represent, is written as the last second of that year.
pub fn rfc3339(secs: u64) -> String {
    use time::{format_description::well_known::Rfc3339, OffsetDateTime};
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "9999-12-31T23:59:59Z".to_owned())
}

/// Now, as RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(crate::store::now_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_564_800), "2024-05-01T12:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn events_are_the_documented_json() {
        let e = Event {
            action: "push",
            repository: "private/app".into(),
            tag: Some("v1".into()),
            tags: vec!["v1".into()],
            digest: Some("sha256:00".into()),
            media_type: Some("m".into()),
            size: Some(3),
            actor: Some("alice".into()),
            timestamp: rfc3339(0),
        };
        let v = serde_json::to_value(&e).unwrap();
        for k in [
            "action",
            "repository",
            "tag",
            "tags",
            "digest",
            "mediaType",
            "size",
            "actor",
            "timestamp",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_over_the_time_and_body() {
        // Expected value from Python: hmac.new(b"Jefe", b'1700000000.{"action":"push"}', sha256).
        assert_eq!(
            signature(b"Jefe", 1_700_000_000, br#"{"action":"push"}"#),
            "t=1700000000,v1=1bae507836267671397e6cac47040216bc6832d3ef9aed5e25bb772025f4a964"
        );
        assert_ne!(signature(b"Jefe", 1, b"x"), signature(b"Jefe", 2, b"x"));
        assert_ne!(signature(b"Jefe", 1, b"x"), signature(b"Jeff", 1, b"x"));
    }
}
