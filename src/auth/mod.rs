//! Authentication: users from an htpasswd file (bcrypt entries, as `htpasswd -B` writes them),
//! HTTP Basic credentials, and who needs them for what.
//!
//! Policy:
//! - `/v2/` asks for credentials whenever an htpasswd file is configured, so `docker login`
//!   has something to check against;
//! - pushes and deletes in the private namespace need a valid user, always; without an htpasswd
//!   file they are refused (berth never opens the namespace by accident);
//! - pulls from the private namespace need a valid user unless `private_pull_public`;
//! - mirrored pulls are anonymous unless `auth_everything`;
//! - health, readiness and metrics probes never need credentials.
//!
//! Verification runs bcrypt on the blocking pool, a bounded number at once, without holding a
//! lock; successes are remembered for a short while, keyed by a salted hash of the credentials
//! (never the credentials themselves). An address over its failed-login limit is refused before
//! anything is hashed. Tokens from `/auth/token` grant the scopes they were issued for and no
//! more. Credentials never reach a log line.

use crate::lock;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use http::{HeaderMap, Method};
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::oci::error::RegistryError;
use crate::oci::names::RepoName;
use crate::oci::routes::Route;

/// Failed logins allowed per client address and minute before it gets 429s.
pub const FAILURES_PER_MINUTE: u32 = 5;
/// The sliding window failed logins are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a verified password is remembered (a user removed from the file keeps access at
/// most this long).
const VERIFIED_TTL: Duration = Duration::from_secs(30);
/// The cost `berth user add` uses unless told otherwise.
pub const DEFAULT_COST: u32 = 10;
/// Longest wait for a turn at a password check. A login that would wait longer is refused, so a
/// flood of logins from many addresses costs each of them a bounded wait, not a growing queue.
const CHECK_WAIT: Duration = Duration::from_secs(5);
/// Logins waiting for a turn at a password check beyond which more are refused at once.
const MAX_WAITING_CHECKS: usize = 64;
/// Addresses the failure limit tracks before it drops those with nothing to remember.
const TRACKED_ADDRESSES: usize = 10_000;
/// Scopes one token request may ask for; more are ignored.
const MAX_SCOPES: usize = 32;

/// A user whose credentials were verified, and what those credentials may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    name: Arc<str>,
    /// None for a password, which may do whatever the user may; a token's grants otherwise.
    grants: Option<Arc<Grants>>,
}

impl User {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether these credentials are a token limited to the scopes it was issued for.
    pub fn is_scoped(&self) -> bool {
        self.grants.is_some()
    }

    /// Whether these credentials allow what a request needs.
    pub fn may(&self, need: &Need) -> bool {
        self.grants.as_ref().map_or(true, |g| g.allows(need))
    }
}

/// Actions of the token scope grammar (`repository:NAME:pull,push`), as a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const PULL: Actions = Actions(1);
    pub const PUSH: Actions = Actions(2);
    pub const DELETE: Actions = Actions(4);
    /// `*`: every action (what the catalog asks for).
    pub const ALL: Actions = Actions(7);

    /// A comma-separated action list; unknown actions grant nothing.
    pub fn parse(list: &str) -> Actions {
        list.split(',')
            .map(|a| match a.trim() {
                "pull" => Actions::PULL,
                "push" => Actions::PUSH,
                "delete" => Actions::DELETE,
                "*" => Actions::ALL,
                _ => Actions::NONE,
            })
            .fold(Actions::NONE, Actions::union)
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    pub fn intersection(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn contains(self, other: Actions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What a request needs credentials to allow: actions on a resource (`repository:NAME` or
/// `registry:catalog`), as a token scope names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub resource: String,
    pub actions: Actions,
}

impl Need {
    /// What a route needs, in token-scope terms; None for routes outside any repository.
    pub fn of(route: &Route, method: &Method) -> Option<Need> {
        let read = matches!(*method, Method::GET | Method::HEAD);
        let (name, actions) = match route {
            Route::Catalog => {
                return Some(Need {
                    resource: "registry:catalog".into(),
                    actions: Actions::ALL,
                })
            }
            Route::Manifest { name, .. } | Route::Blob { name, .. } => (
                name,
                match *method {
                    Method::GET | Method::HEAD => Actions::PULL,
                    Method::DELETE => Actions::DELETE,
                    _ => Actions::PUSH,
                },
            ),
            Route::Tags { name } | Route::Referrers { name, .. } => {
                (name, if read { Actions::PULL } else { Actions::PUSH })
            }
            // Upload sessions, status included, are part of a push.
            Route::UploadStart { name } | Route::Upload { name, .. } => (name, Actions::PUSH),
            _ => return None,
        };
        Some(Need {
            resource: format!("repository:{name}"),
            actions,
        })
    }

    /// The scope to put in a challenge: what a client should ask a token for. A push asks for
    /// pull too, as Docker does, since a push reads what is already there.
    pub fn scope(&self) -> String {
        let actions = if self.actions == Actions::ALL {
            "*"
        } else if self.actions.contains(Actions::PUSH) {
            "pull,push"
        } else if self.actions.contains(Actions::DELETE) {
            "delete"
        } else {
            "pull"
        };
        format!("{}:{actions}", self.resource)
    }
}

/// The resources and actions a token was issued for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(HashMap<String, Actions>);

impl Grants {
    pub fn allows(&self, need: &Need) -> bool {
        self.0
            .get(&need.resource)
            .is_some_and(|a| a.contains(need.actions))
    }
}

/// The scopes a token request asks for: every `scope` parameter, each a space-separated list
/// of `type:name:actions`, as (resource, actions).
pub fn requested_scopes(query: Option<&str>) -> Vec<(String, Actions)> {
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if k != "scope" {
            continue;
        }
        for scope in v.split_whitespace() {
            // The name may hold a colon (a registry host with a port); the type may not, and
            // the actions come last.
            let Some((resource, actions)) = scope.rsplit_once(':') else {
                continue;
            };
            if !resource.contains(':') || out.len() >= MAX_SCOPES {
                continue;
            }
            out.push((resource.to_owned(), Actions::parse(actions)));
        }
    }
    out
}

/// What a request does, as far as authentication is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health, readiness, metrics.
    Probe,
    /// `/v2/`: where `docker login` checks credentials.
    Login,
    /// Pulls through the mirror (and anything else outside the private namespace).
    Mirror,
    /// Pulls from the private namespace, and the catalog that lists it.
    PrivateRead,
    /// Pushes and deletes in the private namespace.
    PrivateWrite,
}

impl Access {
    pub fn of(route: &Route, method: &Method, private: bool, private_configured: bool) -> Access {
        let read = matches!(*method, Method::GET | Method::HEAD);
        match route {
            // The token endpoint checks credentials itself.
            Route::Healthz | Route::Readyz | Route::Metrics | Route::Token => Access::Probe,
            Route::Base => Access::Login,
            Route::Catalog if private_configured => Access::PrivateRead,
            Route::Catalog | Route::Status { .. } => Access::Mirror,
            Route::UploadStart { .. } | Route::Upload { .. } if private => Access::PrivateWrite,
            Route::Manifest { .. }
            | Route::Blob { .. }
            | Route::Tags { .. }
            | Route::Referrers { .. }
                if private =>
            {
                if read {
                    Access::PrivateRead
                } else {
                    Access::PrivateWrite
                }
            }
            _ => Access::Mirror,
        }
    }

    /// Whether this access needs a user (`/v2/` aside, which the token flow also opens).
    fn needs_user(self, config: &Config) -> bool {
        match self {
            Access::Probe => false,
            Access::Login => config.htpasswd.is_some(),
            Access::Mirror => config.auth_everything,
            Access::PrivateRead => config.auth_everything || !config.private_pull_public,
            Access::PrivateWrite => true,
        }
    }
}

#[derive(Default)]
struct Users {
    /// user -> bcrypt hash; shared with the checks under way, which run without the lock.
    entries: Arc<HashMap<String, String>>,
    /// (mtime, length) of the file the entries were read from; None before the first read or
    /// while the file is missing.
    stamp: Option<(SystemTime, u64)>,
    read_once: bool,
}

impl Users {
    /// Re-reads the file when it changed, so `berth user add` takes effect without a restart.
    fn refresh(&mut self, path: &Path) {
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if self.read_once && stamp == self.stamp {
            return;
        }
        self.read_once = true;
        self.stamp = stamp;
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let (entries, warnings) = parse_htpasswd(&text);
                for w in warnings {
                    tracing::warn!(file = %path.display(), "{w}");
                }
                tracing::info!(file = %path.display(), users = entries.len(), "htpasswd loaded");
                self.entries = Arc::new(entries);
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the htpasswd file; every login fails until it is readable");
                self.entries = Arc::default();
            }
        }
    }
}

/// Runs bcrypt: seconds of CPU at high costs, so only ever on the blocking pool.
fn verify(entries: &HashMap<String, String>, user: &str, password: &str) -> bool {
    match entries.get(user) {
        Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
        None => {
            // Spend the time a real check takes, so timing does not tell who exists.
            if let Some(any) = entries.values().next() {
                let _ = bcrypt::verify(password, any);
            }
            false
        }
    }
}

/// Parses htpasswd text into user -> bcrypt hash, with warnings for entries it cannot use.
pub fn parse_htpasswd(text: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut entries = HashMap::new();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            warnings.push(format!("line {}: not a user:hash entry; ignored", i + 1));
            continue;
        };
        if !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
            warnings.push(format!(
                "line {} (user {user:?}): only bcrypt entries are supported (htpasswd -B); ignored",
                i + 1
            ));
            continue;
        }
        entries.insert(user.to_owned(), hash.to_owned());
    }
    (entries, warnings)
}

/// Counters of what authentication did, for `/metrics`.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// bcrypt runs.
    pub password_checks: AtomicU64,
    /// Basic credentials answered from the cache of verified ones, without bcrypt.
    pub verified_hits: AtomicU64,
    pub failed_logins: AtomicU64,
    /// Logins refused before any hashing: the address is over its failure limit.
    pub refused_failures: AtomicU64,
    /// Logins refused because too many password checks were waiting.
    pub refused_busy: AtomicU64,
    /// Requests whose token does not grant what they need.
    pub refused_scope: AtomicU64,
}

/// Why a password check did not produce a user.
#[derive(Debug)]
enum CheckFailed {
    Wrong,
    Busy,
    Internal(String),
}

/// Failed logins per client address in a sliding window, and the password checks under way for
/// each address. An address whose failures and checks under way reach the quota is refused
/// before anything is hashed, so a flood from one address costs at most the quota in bcrypt
/// runs per window, however many requests it sends at once. Requests with the same credentials
/// share one check (a client's parallel requests), so they take room once.
struct FailureLimit {
    quota: usize,
    addresses: Mutex<HashMap<IpAddr, Attempts>>,
}

#[derive(Default)]
struct Attempts {
    /// Times of the failures in the window, oldest first.
    failures: VecDeque<Instant>,
    /// Checks under way, by credentials key, with the requests waiting on each.
    checking: HashMap<[u8; 32], usize>,
}

impl Attempts {
    fn expire(&mut self, now: Instant) {
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
        {
            self.failures.pop_front();
        }
    }

    /// `Err(retry after)` when the address has no room for another check.
    fn room(&self, quota: usize, now: Instant) -> Result<(), Duration> {
        if self.failures.len() + self.checking.len() < quota {
            return Ok(());
        }
        // Room comes back when the oldest failure leaves the window, or a check under way ends.
        let wait = match self.failures.front() {
            Some(oldest) if self.failures.len() >= quota => {
                (*oldest + FAILURE_WINDOW).saturating_duration_since(now)
            }
            _ => Duration::ZERO,
        };
        Err(wait.max(Duration::from_secs(1)))
    }
}

/// A request waiting on a password check for an address; ends when dropped (also when the
/// client leaves).
struct Checking<'a> {
    limit: &'a FailureLimit,
    address: IpAddr,
    credentials: [u8; 32],
}

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        if let Some(a) = lock(&self.limit.addresses).get_mut(&self.address) {
            if let Some(n) = a.checking.get_mut(&self.credentials) {
                *n -= 1;
                if *n == 0 {
                    a.checking.remove(&self.credentials);
                }
            }
        }
    }
}

impl FailureLimit {
    fn new(quota: u32) -> FailureLimit {
        FailureLimit {
            quota: quota.max(1) as usize,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// One IPv6 client holds a /64 at least, so that is what counts as its address.
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        }
    }

    /// Whether the address may try credentials now.
    fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut addresses = lock(&self.addresses);
        match addresses.get_mut(&FailureLimit::key(ip)) {
            Some(a) => {
                a.expire(now);
                a.room(self.quota, now)
            }
            None => Ok(()),
        }
    }

    /// Takes room for a check of these credentials from the address (none when the same
    /// credentials are being checked for it already), or says how long until there is some.
    fn begin(&self, ip: IpAddr, credentials: [u8; 32]) -> Result<Checking<'_>, Duration> {
        let address = FailureLimit::key(ip);
        let now = Instant::now();
        let mut addresses = lock(&self.addresses);
        if addresses.len() >= TRACKED_ADDRESSES && !addresses.contains_key(&address) {
            addresses.retain(|_, a| {
                a.expire(now);
                !a.checking.is_empty() || !a.failures.is_empty()
            });
        }
        let a = addresses.entry(address).or_default();
        a.expire(now);
        if !a.checking.contains_key(&credentials) {
            a.room(self.quota, now)?;
        }
        *a.checking.entry(credentials).or_insert(0) += 1;
        Ok(Checking {
            limit: self,
            address,
            credentials,
        })
    }

    fn failed(&self, ip: IpAddr) {
        let mut addresses = lock(&self.addresses);
        let a = addresses.entry(FailureLimit::key(ip)).or_default();
        a.failures.push_back(Instant::now());
        while a.failures.len() > self.quota {
            a.failures.pop_front();
        }
    }
}

/// Checks credentials and applies the access policy.
pub struct Authenticator {
    htpasswd: Option<PathBuf>,
    users: Arc<Mutex<Users>>,
    verified: moka::future::Cache<[u8; 32], User>,
    salt: [u8; 32],
    failures: FailureLimit,
    /// Turns at bcrypt: at most this many run at once, each on a blocking-pool thread.
    checks: Arc<tokio::sync::Semaphore>,
    checks_total: usize,
    /// Logins waiting for a turn.
    waiting: AtomicUsize,
    pub stats: AuthStats,
    /// Bearer tokens handed out by `/auth/token`: who they speak for (None: anonymous), with
    /// what they grant.
    tokens: moka::future::Cache<String, Option<User>>,
}

/// How long a token from `/auth/token` is good for.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// Counts a login waiting for a turn at bcrypt while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Authenticator {
    pub fn new(config: &Config) -> Authenticator {
        Authenticator::with_failure_quota(config, FAILURES_PER_MINUTE)
    }

    pub fn with_failure_quota(config: &Config, failures_per_minute: u32) -> Authenticator {
        let users = Arc::new(Mutex::new(Users::default()));
        let checks_total = config.password_check_concurrency();
        match &config.htpasswd {
            Some(path) => lock(&users).refresh(path),
            None if !config.private_ns.is_empty() => tracing::warn!(
                "no htpasswd file is configured: pushes and deletes in the private namespace are refused"
            ),
            None => {}
        }
        Authenticator {
            htpasswd: config.htpasswd.clone(),
            users,
            verified: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_TTL)
                .build(),
            salt: rand::random(),
            failures: FailureLimit::new(failures_per_minute),
            checks: Arc::new(tokio::sync::Semaphore::new(checks_total)),
            checks_total,
            waiting: AtomicUsize::new(0),
            stats: AuthStats::default(),
            tokens: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(TOKEN_TTL)
                .build(),
        }
    }

    /// Applies the policy to a request: `Ok(Some(user))` when credentials were needed and are
    /// valid (and, for a token, grant what `need` names), `Ok(None)` when none were needed,
    /// else the error to answer with.
    pub async fn authorize(
        &self,
        config: &Config,
        access: Access,
        need: Option<&Need>,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<Option<User>, RegistryError> {
        let needed = match access {
            // Docker probes `/v2/` first and only sends credentials to a registry that asked for
            // them there. An anonymous token satisfies the probe, so a Docker daemon without
            // credentials for berth can still use it as a mirror.
            Access::Login => access.needs_user(config) && !self.anonymous_token(headers).await,
            _ => access.needs_user(config),
        };
        if !needed {
            return Ok(None);
        }
        if self.htpasswd.is_none() {
            return Err(RegistryError::Denied(match access {
                Access::PrivateWrite => "pushes and deletes in the private namespace are disabled: no htpasswd file is configured (create users with `berth user add`)".into(),
                _ => "pulls from the private namespace need credentials, but no htpasswd file is configured (configure one, or set private_pull_public = true)".into(),
            }));
        }
        match self.authenticate(headers, client).await? {
            Some(user) => match need {
                Some(need) if !user.may(need) => {
                    self.stats.refused_scope.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%client, user = user.name(), needs = %need.scope(), "refused: the token does not grant what the request needs");
                    Err(RegistryError::Unauthorized(format!(
                        "the token does not grant {}",
                        need.scope()
                    )))
                }
                _ => Ok(Some(user)),
            },
            None => Err(RegistryError::Unauthorized(
                "authentication required".into(),
            )),
        }
    }

    /// Whether the request carries a valid anonymous Bearer token.
    async fn anonymous_token(&self, headers: &HeaderMap) -> bool {
        match bearer(headers) {
            Some(token) => matches!(self.tokens.get(token).await, Some(None)),
            None => false,
        }
    }

    /// `/auth/token`, Docker's token flow: Basic credentials get a token for their user, no
    /// credentials an anonymous token (which pulls what anonymous pulls may pull). A token
    /// grants what the `scope` parameters ask for, as far as its holder may do it.
    pub async fn issue_token(
        &self,
        config: &Config,
        headers: &HeaderMap,
        query: Option<&str>,
        client: IpAddr,
    ) -> Result<String, RegistryError> {
        let user = match headers.get(http::header::AUTHORIZATION) {
            Some(_) => match self.authenticate(headers, client).await? {
                Some(user) => Some(user),
                None => return Err(RegistryError::Unauthorized("invalid credentials".into())),
            },
            None => None,
        };
        let mut grants = Grants::default();
        for (resource, asked) in requested_scopes(query) {
            let mut granted = asked.intersection(rights(config, user.is_some(), &resource));
            // A token traded for another grants no more than it did itself.
            if let Some(held) = user.as_ref().and_then(|u| u.grants.as_ref()) {
                granted = granted.intersection(held.0.get(&resource).copied().unwrap_or_default());
            }
            if !granted.is_empty() {
                let e = grants.0.entry(resource).or_default();
                *e = e.union(granted);
            }
        }
        let holder = user.map(|u| User {
            name: u.name,
            grants: Some(Arc::new(grants)),
        });
        let token = hex::encode(rand::random::<[u8; 32]>());
        self.tokens.insert(token.clone(), holder).await;
        Ok(token)
    }

    /// Verifies the request's Basic credentials (or a token from `/auth/token`): `Ok(None)`
    /// when it sends none, or an anonymous token.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<Option<User>, RegistryError> {
        if let Some(token) = bearer(headers) {
            return match self.tokens.get(token).await {
                Some(user) => Ok(user),
                None => Err(RegistryError::Unauthorized(
                    "unknown or expired token".into(),
                )),
            };
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let Some(encoded) = value.to_str().ok().and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        }) else {
            // Another scheme: berth only ever challenges for Basic.
            return Ok(None);
        };
        self.failures
            .check(client)
            .map_err(|wait| self.refused_failures(client, wait))?;
        let Some((user, password)) = decode_basic(encoded.trim()) else {
            return Err(self.failed(client));
        };
        let key = self.cache_key(&user, &password);
        if let Some(u) = self.verified.get(&key).await {
            self.stats.verified_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(u));
        }
        let _checking = self
            .failures
            .begin(client, key)
            .map_err(|wait| self.refused_failures(client, wait))?;
        // Identical credentials checked at once (a client's parallel requests) share one run,
        // which counts as one failure when they are wrong.
        match self
            .verified
            .try_get_with(key, self.check_password(user, password, client))
            .await
        {
            Ok(u) => Ok(Some(u)),
            Err(e) => match &*e {
                CheckFailed::Wrong => Err(RegistryError::Unauthorized(
                    "invalid username or password".into(),
                )),
                CheckFailed::Busy => {
                    self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%client, running = self.checks_running(), waiting = self.waiting.load(Ordering::Relaxed), "login refused: too many password checks at once");
                    Err(RegistryError::TooManyRequests {
                        retry_after: Duration::from_secs(1),
                    })
                }
                CheckFailed::Internal(e) => Err(RegistryError::Internal(e.clone())),
            },
        }
    }

    /// Waits for a turn (boundedly), then runs bcrypt on the blocking pool. The turn is held
    /// by the blocking task itself, so a client that leaves cannot free it while bcrypt runs.
    async fn check_password(
        &self,
        user: String,
        password: String,
        client: IpAddr,
    ) -> Result<User, CheckFailed> {
        let Some(path) = self.htpasswd.clone() else {
            self.failed(client);
            return Err(CheckFailed::Wrong);
        };
        let permit = {
            let waiting = Waiting(&self.waiting);
            if waiting.0.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING_CHECKS {
                return Err(CheckFailed::Busy);
            }
            match tokio::time::timeout(CHECK_WAIT, self.checks.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) | Err(_) => return Err(CheckFailed::Busy),
            }
        };
        let users = self.users.clone();
        let name = user.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let _turn = permit;
            let entries = {
                let mut users = lock(&users);
                users.refresh(&path);
                users.entries.clone()
            };
            verify(&entries, &name, &password)
        });
        self.stats.password_checks.fetch_add(1, Ordering::Relaxed);
        match ok.await {
            Ok(true) => Ok(User {
                name: user.into(),
                grants: None,
            }),
            Ok(false) => {
                // Not even the user name is logged: people type passwords into the wrong field.
                tracing::info!(%client, "failed login");
                self.failed(client);
                Err(CheckFailed::Wrong)
            }
            Err(e) => Err(CheckFailed::Internal(e.to_string())),
        }
    }

    /// Password checks running now.
    pub fn checks_running(&self) -> usize {
        self.checks_total
            .saturating_sub(self.checks.available_permits())
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn refused_failures(&self, client: IpAddr, wait: Duration) -> RegistryError {
        self.stats.refused_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%client, retry_after_s = wait.as_secs(), "login refused: too many failed logins from this address");
        RegistryError::TooManyRequests { retry_after: wait }
    }

    /// Counts a failed login.
    fn failed(&self, client: IpAddr) -> RegistryError {
        self.stats.failed_logins.fetch_add(1, Ordering::Relaxed);
        self.failures.failed(client);
        RegistryError::Unauthorized("invalid username or password".into())
    }
}

/// What a holder may do with a resource: a user pulls anything and pushes and deletes in the
/// private namespace; anonymous holders pull what anonymous pulls may.
fn rights(config: &Config, user: bool, resource: &str) -> Actions {
    if resource == "registry:catalog" {
        let access = Access::of(
            &Route::Catalog,
            &Method::GET,
            false,
            !config.private_ns.is_empty(),
        );
        return if user || !access.needs_user(config) {
            Actions::ALL
        } else {
            Actions::NONE
        };
    }
    let Some(name) = resource
        .strip_prefix("repository:")
        .and_then(|n| RepoName::parse(n).ok())
    else {
        return Actions::NONE;
    };
    let private = config.private_ns.iter().any(|ns| name.is_in_namespace(ns));
    let read = if private {
        Access::PrivateRead
    } else {
        Access::Mirror
    };
    match (user, private) {
        (true, true) => Actions::ALL,
        (true, false) => Actions::PULL,
        (false, _) if !read.needs_user(config) => Actions::PULL,
        (false, _) => Actions::NONE,
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

fn decode_basic(encoded: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

// --- the htpasswd file --------------------------------------------------------------------

/// Checks a user name the htpasswd file can hold (as [`add_user`] does before anything else).
pub fn check_user_name(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a user name is 1 to 255 characters without ':', spaces or control characters",
        ));
    }
    Ok(())
}

/// Adds a user to an htpasswd file, or sets the password of one already there. The file is
/// created if needed and always left with mode 0600. Returns whether the user already existed.
pub fn add_user(path: &Path, name: &str, password: &str, cost: u32) -> io::Result<bool> {
    check_user_name(name)?;
    if password.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the password is empty",
        ));
    }
    let hash = bcrypt::non_truncating_hash_with_result(password, cost)
        .map_err(|e| match e {
            bcrypt::BcryptError::Truncation(_) => io::Error::new(
                io::ErrorKind::InvalidInput,
                "bcrypt uses at most 72 bytes of a password; choose a shorter one",
            ),
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        })?
        .format_for_version(bcrypt::Version::TwoY);
    let existing = read_if_exists(path)?;
    let mut found = false;
    let mut out = String::new();
    for line in existing.lines() {
        if line.split_once(':').map(|(u, _)| u.trim()) == Some(name) {
            if !found {
                out.push_str(&format!("{name}:{hash}\n"));
            }
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        out.push_str(&format!("{name}:{hash}\n"));
    }
    write_private(path, out.as_bytes())?;
    Ok(found)
}

/// Removes a user from an htpasswd file. Returns whether the user was there.
pub fn remove_user(path: &Path, name: &str) -> io::Result<bool> {
    let existing = read_if_exists(path)?;
    let mut found = false;
    let mut out = String::new();
    for line in existing.lines() {
        if line.split_once(':').map(|(u, _)| u.trim()) == Some(name) {
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if found {
        write_private(path, out.as_bytes())?;
    }
    Ok(found)
}

fn read_if_exists(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// Replaces a file atomically with a mode-0600 one.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htpasswd_lines() {
        let (e, w) = parse_htpasswd(
            "# comment\nalice:$2y$05$abcdefghijklmnopqrstuuQ3cIGlzhZl9A4fDG9jGDXw7H5VuM4Cq\nbob:{SHA}x\n\ncarol\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e.contains_key("alice"));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn add_update_remove_users() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        assert!(!add_user(&path, "alice", "s3cret", 4).unwrap());
        assert!(!add_user(&path, "bob", "other", 4).unwrap());
        assert!(add_user(&path, "alice", "new", 4).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("alice:$2y$04$"), "{text}");
        let (e, w) = parse_htpasswd(&text);
        assert!(w.is_empty());
        assert!(bcrypt::verify("new", &e["alice"]).unwrap());
        assert!(!bcrypt::verify("s3cret", &e["alice"]).unwrap());
        assert!(remove_user(&path, "bob").unwrap());
        assert!(!remove_user(&path, "bob").unwrap());
        assert!(add_user(&path, "a:b", "x", 4).is_err());
        assert!(add_user(&path, "eve", &"x".repeat(73), 4).is_err());
    }

    #[test]
    fn token_scopes() {
        let asked = requested_scopes(Some(
            "service=berth&scope=repository:private/a:pull,push%20repository:localhost:5000/x:pull&scope=registry:catalog:*&scope=junk",
        ));
        assert_eq!(
            asked,
            vec![
                (
                    "repository:private/a".to_owned(),
                    Actions::PULL.union(Actions::PUSH)
                ),
                ("repository:localhost:5000/x".to_owned(), Actions::PULL),
                ("registry:catalog".to_owned(), Actions::ALL),
            ]
        );
        let config = Config {
            private_ns: vec!["private".into()],
            ..Config::default()
        };
        assert_eq!(rights(&config, true, "repository:private/a"), Actions::ALL);
        assert_eq!(rights(&config, true, "repository:library/a"), Actions::PULL);
        assert_eq!(
            rights(&config, false, "repository:private/a"),
            Actions::NONE
        );
        assert_eq!(
            rights(&config, false, "repository:library/a"),
            Actions::PULL
        );
        assert_eq!(rights(&config, true, "repository:../x"), Actions::NONE);
        let m = Route::Manifest {
            name: RepoName::parse("private/a").unwrap(),
            reference: crate::oci::names::Reference::parse("v1").unwrap(),
        };
        let need = Need::of(&m, &Method::PUT).unwrap();
        assert_eq!(need.scope(), "repository:private/a:pull,push");
        let grants = Grants(asked.into_iter().collect());
        assert!(grants.allows(&need));
        assert!(!grants.allows(&Need::of(&m, &Method::DELETE).unwrap()));
    }

    #[test]
    fn failure_limit_counts_failures_and_checks_under_way() {
        let limit = FailureLimit::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = limit.begin(ip, [1; 32]).unwrap();
        // The same credentials join the check under way; others need room.
        let a2 = limit.begin(ip, [1; 32]).unwrap();
        let b = limit.begin(ip, [2; 32]).unwrap();
        assert!(limit.begin(ip, [3; 32]).is_err());
        drop((a, a2));
        limit.failed(ip);
        drop(b);
        limit.failed(ip);
        let wait = limit.check(ip).unwrap_err();
        assert!(
            wait > Duration::from_secs(50) && wait <= FAILURE_WINDOW,
            "{wait:?}"
        );
        // One IPv6 client is its /64.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        limit.failed(v6);
        limit.failed("2001:db8::2".parse().unwrap());
        assert!(limit.check("2001:db8::ffff".parse().unwrap()).is_err());
        assert!(limit.check("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn access_policy() {
        let private = RepoName::parse("private/app").unwrap();
        let m = Route::Manifest {
            name: private,
            reference: crate::oci::names::Reference::parse("v1").unwrap(),
        };
        assert_eq!(
            Access::of(&m, &Method::GET, true, true),
            Access::PrivateRead
        );
        assert_eq!(
            Access::of(&m, &Method::PUT, true, true),
            Access::PrivateWrite
        );
        assert_eq!(Access::of(&m, &Method::PUT, false, true), Access::Mirror);
        assert_eq!(
            Access::of(&Route::Catalog, &Method::GET, false, false),
            Access::Mirror
        );
        assert_eq!(
            Access::of(&Route::Healthz, &Method::GET, false, true),
            Access::Probe
        );
    }
}
