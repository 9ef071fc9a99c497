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
//! Verification runs bcrypt on the blocking pool; successes are remembered for a short while,
//! keyed by a salted hash of the credentials (never the credentials themselves). Failed logins
//! are rate-limited per client address. Credentials never reach a log line.

use crate::lock;
use std::collections::HashMap;
use std::io::{self, BufRead, IsTerminal, Write};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};
use http::{HeaderMap, Method};
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::error::RegistryError;
use crate::routes::Route;

/// Failed logins allowed per client address and minute before it gets 429s.
pub const FAILURES_PER_MINUTE: u32 = 5;
/// How long a verified password is remembered (a user removed from the file keeps access at
/// most this long).
const VERIFIED_TTL: Duration = Duration::from_secs(30);
/// The cost `berth user add` uses unless told otherwise.
pub const DEFAULT_COST: u32 = 10;

/// A user whose credentials were verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User(pub Arc<str>);

impl User {
    pub fn name(&self) -> &str {
        &self.0
    }
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
}

#[derive(Default)]
struct Users {
    /// user -> bcrypt hash
    entries: HashMap<String, String>,
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
                self.entries = entries;
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the htpasswd file; every login fails until it is readable");
                self.entries.clear();
            }
        }
    }

    fn verify(&self, user: &str, password: &str) -> bool {
        match self.entries.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                // Spend the time a real check takes, so timing does not tell who exists.
                if let Some(any) = self.entries.values().next() {
                    let _ = bcrypt::verify(password, any);
                }
                false
            }
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

/// Checks credentials and applies the access policy.
pub struct Authenticator {
    htpasswd: Option<PathBuf>,
    users: Arc<Mutex<Users>>,
    verified: moka::future::Cache<[u8; 32], User>,
    salt: [u8; 32],
    failures: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// Bearer tokens handed out by `/auth/token`: who they speak for (None: anonymous).
    tokens: moka::future::Cache<String, Option<User>>,
}

/// How long a token from `/auth/token` is good for.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

impl Authenticator {
    pub fn new(config: &Config) -> Authenticator {
        Authenticator::with_failure_quota(config, FAILURES_PER_MINUTE)
    }

    pub fn with_failure_quota(config: &Config, failures_per_minute: u32) -> Authenticator {
        let per_minute = NonZeroU32::new(failures_per_minute).unwrap_or(NonZeroU32::MIN);
        let users = Arc::new(Mutex::new(Users::default()));
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
            failures: DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_minute)),
            blocked: Mutex::new(HashMap::new()),
            tokens: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(TOKEN_TTL)
                .build(),
        }
    }

    /// Applies the policy to a request: `Ok(Some(user))` when credentials were needed and are
    /// valid, `Ok(None)` when none were needed, else the error to answer with.
    pub async fn authorize(
        &self,
        config: &Config,
        access: Access,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<Option<User>, RegistryError> {
        let needed = match access {
            Access::Probe => false,
            // Docker probes `/v2/` first and only sends credentials to a registry that asked for
            // them there. An anonymous token satisfies the probe, so a Docker daemon without
            // credentials for berth can still use it as a mirror.
            Access::Login => self.htpasswd.is_some() && !self.anonymous_token(headers).await,
            Access::Mirror => config.auth_everything,
            Access::PrivateRead => config.auth_everything || !config.private_pull_public,
            Access::PrivateWrite => true,
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
            Some(user) => Ok(Some(user)),
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
    /// credentials an anonymous token (which pulls what anonymous pulls may pull).
    pub async fn issue_token(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<String, RegistryError> {
        let user = match headers.get(http::header::AUTHORIZATION) {
            Some(_) => match self.authenticate(headers, client).await? {
                Some(user) => Some(user),
                None => return Err(RegistryError::Unauthorized("invalid credentials".into())),
            },
            None => None,
        };
        let token = hex::encode(rand::random::<[u8; 32]>());
        self.tokens.insert(token.clone(), user).await;
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
        let ip = client;
        if let Some(wait) = self.blocked_for(ip) {
            return Err(RegistryError::TooManyRequests { retry_after: wait });
        }
        let Some((user, password)) = decode_basic(encoded.trim()) else {
            return Err(self.failed(ip));
        };
        let key = self.cache_key(&user, &password);
        if let Some(u) = self.verified.get(&key).await {
            return Ok(Some(u));
        }
        let Some(path) = self.htpasswd.clone() else {
            return Err(self.failed(ip));
        };
        let users = self.users.clone();
        let name = user.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let mut users = lock(&users);
            users.refresh(&path);
            users.verify(&name, &password)
        })
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?;
        if ok {
            let u = User(user.into());
            self.verified.insert(key, u.clone()).await;
            Ok(Some(u))
        } else {
            // Not even the user name is logged: people type passwords into the wrong field.
            tracing::info!(%client, "failed login");
            Err(self.failed(ip))
        }
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        let blocked = lock(&self.blocked);
        let until = *blocked.get(&ip)?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Counts a failed login: 401 while the address is within its quota, 429 beyond.
    fn failed(&self, ip: IpAddr) -> RegistryError {
        match self.failures.check_key(&ip) {
            Ok(()) => RegistryError::Unauthorized("invalid username or password".into()),
            Err(not_until) => {
                let wait = not_until
                    .wait_time_from(self.failures.clock().now())
                    .max(Duration::from_secs(1));
                let now = Instant::now();
                let mut blocked = lock(&self.blocked);
                blocked.retain(|_, until| *until > now);
                blocked.insert(ip, now + wait);
                drop(blocked);
                if self.failures.len() > 10_000 {
                    self.failures.retain_recent();
                }
                tracing::warn!(client = %ip, retry_after_s = wait.as_secs(), "too many failed logins");
                RegistryError::TooManyRequests { retry_after: wait }
            }
        }
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

fn check_user_name(name: &str) -> io::Result<()> {
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

// --- the `berth user` command -------------------------------------------------------------

/// `berth user …`: manage the htpasswd file.
#[derive(clap::Subcommand)]
pub enum UserCommand {
    /// Add a user, or change the password of an existing one (the password is read from stdin).
    Add(UserAddArgs),
    /// Remove a user.
    Remove(UserFileArgs),
}

#[derive(clap::Args)]
pub struct UserFileArgs {
    /// The user name.
    pub name: String,
    /// The htpasswd file [default: the `htpasswd` of --config]
    #[arg(long)]
    pub htpasswd: Option<PathBuf>,
    /// Config file naming the htpasswd file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct UserAddArgs {
    #[command(flatten)]
    pub file: UserFileArgs,
    /// Read the password from stdin without prompting (as `docker login --password-stdin`).
    #[arg(long)]
    pub password_stdin: bool,
    /// bcrypt cost (4 to 31); each step doubles the time a login takes.
    #[arg(long, default_value_t = DEFAULT_COST)]
    pub cost: u32,
}

impl UserFileArgs {
    fn path(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.htpasswd {
            return Ok(p.clone());
        }
        let Some(config) = &self.config else {
            return Err("give --htpasswd FILE (or --config with an htpasswd key)".into());
        };
        Config::from_file(config)
            .map_err(|e| e.to_string())?
            .htpasswd
            .ok_or_else(|| format!("{} sets no htpasswd file", config.display()))
    }
}

impl UserCommand {
    pub fn run(self) -> ExitCode {
        let result = match self {
            UserCommand::Add(args) => run_add(&args),
            UserCommand::Remove(args) => run_remove(&args),
        };
        match result {
            Ok(message) => {
                eprintln!("{message}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

fn run_add(args: &UserAddArgs) -> Result<String, String> {
    let path = args.file.path()?;
    check_user_name(&args.file.name).map_err(|e| e.to_string())?;
    if !(4..=31).contains(&args.cost) {
        return Err("--cost must be between 4 and 31".into());
    }
    let password = read_password(args.password_stdin).map_err(|e| e.to_string())?;
    let existed = add_user(&path, &args.file.name, &password, args.cost)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "{} user {:?} in {}",
        if existed { "updated" } else { "added" },
        args.file.name,
        path.display()
    ))
}

fn run_remove(args: &UserFileArgs) -> Result<String, String> {
    let path = args.path()?;
    match remove_user(&path, &args.name) {
        Ok(true) => Ok(format!(
            "removed user {:?} from {}",
            args.name,
            path.display()
        )),
        Ok(false) => Err(format!("no user {:?} in {}", args.name, path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Reads the password: one line from stdin, or from the terminal with echo off (twice).
fn read_password(from_stdin: bool) -> io::Result<String> {
    let stdin = io::stdin();
    if from_stdin || !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    let first = prompt("Password: ")?;
    let second = prompt("Repeat the password: ")?;
    if first != second {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the passwords differ",
        ));
    }
    Ok(first)
}

fn prompt(text: &str) -> io::Result<String> {
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    eprint!("{text}");
    io::stderr().flush()?;
    let hidden = stty("-echo");
    let mut line = String::new();
    let read = io::stdin().lock().read_line(&mut line);
    if hidden {
        stty("echo");
        eprintln!();
    }
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
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
    fn access_policy() {
        let private = RepoName::parse("private/app").unwrap();
        let m = Route::Manifest {
            name: private,
            reference: crate::names::Reference::parse("v1").unwrap(),
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

    use crate::names::RepoName;
}
