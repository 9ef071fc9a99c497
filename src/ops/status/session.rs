//! Signed-in visitors of the status page: server-side sessions behind a cookie, the CSRF tokens
//! of its forms, and the origin check every form post gets.
//!
//! A session id is 32 bytes from the thread CSPRNG, sent as the `berth_session` cookie
//! (`HttpOnly`, `SameSite=Strict`, `Path=/`, `Secure` over TLS); the server keeps only the user
//! name it speaks for, at most [`MAX_SESSIONS`] of them, each for [`SESSION_TTL`]. A session is
//! credentials for the status page only: nothing in the registry API reads the cookie.
//!
//! Forms carry a token bound to what they act for: HMAC(server key, session id) for a signed-in
//! visitor's forms; for the sign-in form, HMAC(server key, a pre-session id) whose id is set as
//! the short-lived `berth_login` cookie when the form is shown (against login CSRF, where another
//! site signs a visitor in as someone else). A post whose `Origin` or `Sec-Fetch-Site` says it
//! came from another site is refused before anything else, as defence in depth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http::header::{COOKIE, HOST, ORIGIN};
use http::{HeaderMap, Request};
use sha2::Sha256;

use crate::auth::User;
use crate::http::OverTls;
use crate::ops::Service;

pub const COOKIE_NAME: &str = "berth_session";
pub const LOGIN_COOKIE: &str = "berth_login";
/// How long a session lasts from sign-in, whatever its use.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; past it the least recently used go.
pub const MAX_SESSIONS: u64 = 10_000;
/// How long the sign-in form shown stays good for.
const LOGIN_TTL: Duration = Duration::from_secs(3600);

/// Form posts refused, by reason, for `/metrics`.
#[derive(Debug, Default)]
pub struct Refusals {
    /// A missing or wrong CSRF token.
    pub csrf: AtomicU64,
    /// An `Origin` or `Sec-Fetch-Site` of another site.
    pub origin: AtomicU64,
    /// A post needing a session without one.
    pub no_session: AtomicU64,
    /// A signed-in user without the permission an action needs.
    pub permission: AtomicU64,
    /// Sign-ins with a wrong user name or password.
    pub failed_sign_ins: AtomicU64,
}

pub struct Sessions {
    /// Session id (hex) -> user name.
    live: moka::future::Cache<String, Arc<str>>,
    key: [u8; 32],
    pub refusals: Refusals,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(MAX_SESSIONS)
    }
}

/// Who is looking at a page: a signed-in user (with their session's form token), or nobody.
#[derive(Default)]
pub struct Viewer {
    pub user: Option<User>,
    pub session: Option<String>,
    pub csrf: Option<String>,
    /// Whether there is anyone to sign in as (an htpasswd file is configured).
    pub can_sign_in: bool,
}

impl Sessions {
    pub fn new(capacity: u64) -> Sessions {
        Sessions {
            // Least recently used go first: a new session must never be refused admission,
            // which moka's default policy may do to an entry seen once.
            live: moka::future::Cache::builder()
                .max_capacity(capacity)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_live(SESSION_TTL)
                .build(),
            key: rand::random(),
            refusals: Refusals::default(),
        }
    }

    /// Starts a session for the user `name` (whose password was just checked); its id.
    pub async fn start(&self, name: &str) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        self.live.insert(id.clone(), name.into()).await;
        id
    }

    pub async fn end(&self, id: &str) {
        self.live.invalidate(id).await;
    }

    /// Sessions held now, once the store's pending evictions are done.
    pub async fn count(&self) -> u64 {
        self.live.run_pending_tasks().await;
        self.live.entry_count()
    }

    /// Sessions held, as last counted (moka counts lazily).
    pub fn approx_count(&self) -> u64 {
        self.live.entry_count()
    }

    /// The viewer of a request: its session's user if the cookie names a live session of a
    /// user still in the htpasswd file.
    pub async fn viewer<B>(&self, app: &Service, req: &Request<B>) -> Viewer {
        let mut viewer = Viewer {
            can_sign_in: app.config.htpasswd.is_some(),
            ..Viewer::default()
        };
        let Some(id) = cookie(req.headers(), COOKIE_NAME) else {
            return viewer;
        };
        let Some(name) = self.live.get(id).await else {
            return viewer;
        };
        match app.auth.session_user(&name).await {
            Some(user) => {
                viewer.user = Some(user);
                viewer.csrf = Some(self.token("session", id));
                viewer.session = Some(id.to_owned());
            }
            None => {
                tracing::info!(user = %name, "session ended: its user is no longer in the htpasswd file");
                self.end(id).await;
            }
        }
        viewer
    }

    /// The form token for `id` in `purpose` ("session" or "login").
    pub fn token(&self, purpose: &str, id: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `given` is the form token for `id` in `purpose` (compared in constant time).
    pub fn token_ok(&self, purpose: &str, id: &str, given: &str) -> bool {
        let want = self.token(purpose, id);
        want.len() == given.len()
            && want
                .bytes()
                .zip(given.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// A new pre-session id for a sign-in form, with the cookie that carries it.
    pub fn login_cookie(&self, secure: bool) -> (String, String) {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let cookie = set_cookie(secure, LOGIN_COOKIE, &id, LOGIN_TTL);
        (id, cookie)
    }
}

/// A cookie's value from a request's `Cookie` headers; only a plain hex value of a sane length.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether cookies should be marked `Secure`: the request came over TLS, or the server's public
/// URL is https (TLS ends at a proxy in front of berth).
pub fn secure<B>(app: &Service, req: &Request<B>) -> bool {
    req.extensions().get::<OverTls>().is_some()
        || app
            .config
            .public_url
            .as_ref()
            .is_some_and(|u| u.to_string().starts_with("https://"))
}

/// A `Set-Cookie` value.
pub fn set_cookie(secure: bool, name: &str, value: &str, max_age: Duration) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{name}={value}; Max-Age={}; Path=/; HttpOnly; SameSite=Strict{secure}",
        max_age.as_secs()
    )
}

/// A `Set-Cookie` value that removes a cookie.
pub fn clear_cookie(secure: bool, name: &str) -> String {
    set_cookie(secure, name, "", Duration::ZERO)
}

/// Why a post is refused as coming from another site, if it is: its `Sec-Fetch-Site` names
/// another site, or its `Origin` is not the host it was sent to (nor `public_url`'s).
pub fn foreign_origin<B>(req: &Request<B>, public_url: Option<&str>) -> Option<&'static str> {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        // "none": the visitor's own doing (typed, bookmarked).
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Some("Sec-Fetch-Site is not same-origin");
        }
    }
    let origin = headers.get(ORIGIN)?;
    let Some(authority) = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, a)| a)
    else {
        return Some("Origin is opaque or malformed");
    };
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let public = public_url
        .and_then(|u| u.split_once("://"))
        .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
    if Some(authority) == host || Some(authority) == public {
        None
    } else {
        Some("Origin is another site")
    }
}

impl Refusals {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_store_is_bounded_and_keeps_the_newest_sessions() {
        let sessions = Sessions::new(3);
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(sessions.start(&format!("u{i}")).await);
        }
        assert!(sessions.count().await <= 3, "{}", sessions.count().await);
        // The newest sign-in is always kept (no admission policy turns it away).
        let last = ids.last().unwrap();
        assert_eq!(sessions.live.get(last).await.as_deref(), Some("u9"));
        assert_eq!(sessions.live.get(&ids[0]).await, None);
        assert_eq!(last.len(), 64);
    }

    #[test]
    fn tokens_are_bound_to_their_session_and_purpose() {
        let sessions = Sessions::new(3);
        let t = sessions.token("session", "ab");
        assert!(sessions.token_ok("session", "ab", &t));
        assert!(!sessions.token_ok("session", "ac", &t));
        assert!(!sessions.token_ok("login", "ab", &t));
        assert!(!sessions.token_ok("session", "ab", ""));
        // Another server (another key) does not take it.
        assert!(!Sessions::new(3).token_ok("session", "ab", &t));
    }

    #[test]
    fn only_plain_hex_cookies_are_read() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; berth_session=zz".parse().unwrap());
        h.append(COOKIE, "berth_login=00ff".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE_NAME), None);
        assert_eq!(cookie(&h, LOGIN_COOKIE), Some("00ff"));
    }
}
