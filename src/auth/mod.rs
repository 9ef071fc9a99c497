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
//! - purges of mirrored content need a user whom an access rule makes admin;
//! - health, readiness and metrics probes never need credentials.
//!
//! Verification runs bcrypt on the blocking pool, a bounded number at once, without holding a
//! lock; successes are remembered for a short while, keyed by a salted hash of the credentials
//! (never the credentials themselves). An address over its failed-login limit is refused before
//! anything is hashed. Tokens from `/auth/token` grant the scopes they were issued for and no
//! more. Access rules (`[[access]]`, see [`rules`]) then limit what each user may do, tokens
//! included. Credentials never reach a log line.
//!
//! The parts: [`htpasswd`] (the users file, bcrypt checks and `berth user`), [`limits`] (the
//! failed-login limit per address), [`tokens`] (token scopes, issue and verification) and
//! [`policy`] (what a request needs: [`Access`], [`Need`]), [`rules`] (what a user may).

mod htpasswd;
mod limits;
mod policy;
pub mod rules;
mod session;
mod tokens;

pub use htpasswd::{add_user, check_user_name, parse_htpasswd, remove_user, DEFAULT_COST};
pub use policy::{Access, Namespaces, Need, Repository};
pub use tokens::{requested_scopes, Actions, Grants, TokenKey, TOKEN_TTL};

use crate::lock;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http::HeaderMap;
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::oci::error::RegistryError;

use htpasswd::{verify, Users};
use limits::FailureLimit;
use tokens::bearer;

/// Failed logins allowed per client address and minute before it gets 429s.
pub const FAILURES_PER_MINUTE: u32 = 5;
/// How long a verified password is remembered (a user removed from the file keeps access at
/// most this long).
const VERIFIED_TTL: Duration = Duration::from_secs(30);
/// Longest wait for a turn at a password check. A login that would wait longer is refused, so a
/// flood of logins from many addresses costs each of them a bounded wait, not a growing queue.
const CHECK_WAIT: Duration = Duration::from_secs(5);
/// Logins waiting for a turn at a password check beyond which more are refused at once.
const MAX_WAITING_CHECKS: usize = 64;

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
    /// Requests with a token that is unknown, expired, or not signed with this berth's key.
    pub refused_token: AtomicU64,
    /// Requests of a user that the access rules do not allow.
    pub refused_rule: AtomicU64,
}

/// Why a password check did not produce a user.
#[derive(Debug)]
enum CheckFailed {
    Wrong,
    Busy,
    Internal(String),
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
    token_key: TokenKey,
}

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
            token_key: TokenKey::random(),
        }
    }

    /// Signs tokens with `key`: replicas sharing a store share the key, so a token one of them
    /// issued is good at every other.
    pub fn with_token_key(mut self, key: TokenKey) -> Authenticator {
        self.token_key = key;
        self
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
                Access::Admin => "purging mirrored content needs an admin user, but no htpasswd file is configured".into(),
                _ => "pulls from the private namespace need credentials, but no htpasswd file is configured (configure one, or set private_pull_public = true)".into(),
            }));
        }
        let Some(user) = self.authenticate(headers, client).await? else {
            return Err(RegistryError::Unauthorized(
                "authentication required".into(),
            ));
        };
        let Some(need) = need else {
            // Every admin route names its repository; one that did not could not be checked.
            return match access {
                Access::Admin => Err(RegistryError::Denied(
                    "admin requests name a repository".into(),
                )),
                _ => Ok(Some(user)),
            };
        };
        // The rules first: what they refuse no token can grant, so the client is told so for
        // good (403), not sent for another token (401).
        if let Err(refusal) = rules::check(config, user.name(), access, need) {
            let message = refusal.message(user.name());
            self.stats.refused_rule.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%client, user = user.name(), reason = %message, "refused by the access rules");
            return Err(RegistryError::Denied(message));
        }
        if !user.may(need) {
            self.stats.refused_scope.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%client, user = user.name(), needs = %need.scope(), "refused: the token does not grant what the request needs");
            return Err(RegistryError::Unauthorized(format!(
                "the token does not grant {}",
                need.scope()
            )));
        }
        Ok(Some(user))
    }

    /// Verifies the request's Basic credentials (or a token from `/auth/token`): `Ok(None)`
    /// when it sends none, or an anonymous token.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<Option<User>, RegistryError> {
        if let Some(token) = bearer(headers) {
            return match self.token_holder(token).await {
                Some(user) => Ok(user),
                None => {
                    self.stats.refused_token.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%client, "refused: a token that is unknown, expired or not signed with this berth's key");
                    Err(RegistryError::Unauthorized(
                        "unknown or expired token".into(),
                    ))
                }
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

fn decode_basic(encoded: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}
