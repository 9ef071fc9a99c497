//! Configuration: the TOML file, the command-line flags that override it, and validation.
//!
//! Every value is parsed into its final type while the file is read, so an invalid value is
//! reported with the key that holds it and the rest of berth never sees a raw string.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod access;
mod env;
mod storage;
mod values;
mod warm;
mod webhook;
pub use access::{AccessRule, Permission, RepoPattern};
pub use storage::{S3Config, StorageConfig};
pub use values::{
    human_bytes, valid_origin, ByteSize, IpNet, PublicUrl, Seconds, UpstreamUrl, WebhookUrl,
};
pub use warm::{TagPattern, WarmEntry, MAX_TAGS_PER_ENTRY};
pub use webhook::{Webhook, WebhookSecret};

/// The upstream key that Docker Hub is filed under, and the one used when a request names none.
pub const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Plain-HTTP listen address.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// Repository namespaces stored locally and open to push.
    pub private_ns: Vec<String>,
    /// htpasswd file with bcrypt entries; required for pushes.
    pub htpasswd: Option<PathBuf>,
    /// Whether pulls from the private namespace are allowed without credentials.
    pub private_pull_public: bool,
    /// Whether every request, mirrored pulls included, needs credentials.
    pub auth_everything: bool,
    /// Bound on the disk cache of mirrored content; private content is not counted against it.
    pub max_cache_size: ByteSize,
    /// Bound on the in-memory manifest cache.
    pub memory_cache_size: ByteSize,
    /// A download nobody is waiting for any more is finished only below this size.
    pub max_orphan_download: ByteSize,
    /// Which upstream serves requests that do not name one with `?ns=`.
    pub default_upstream: String,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// How long in-flight responses may take to finish after a shutdown signal.
    pub shutdown_grace: Seconds,
    pub tls: Option<TlsConfig>,
    /// Upload sessions idle for longer than this are removed, by the running server (checking
    /// every quarter of it, at most every 5 minutes) and by `berth gc`.
    pub upload_max_age: Seconds,
    /// Upload sessions one user may have open at once; 0 for no limit.
    pub max_uploads_per_user: usize,
    /// Receivers that get a JSON event on every push and delete in the private namespace.
    pub webhooks: Vec<Webhook>,
    /// Serve `/metrics` on its own listener (then not on the main one).
    pub metrics_listen: Option<SocketAddr>,
    /// Peers whose `X-Forwarded-For` names the client (addresses or CIDR blocks).
    pub trusted_proxies: Vec<IpNet>,
    /// Browser origins allowed to call the registry API, or `["*"]`; none by default.
    pub cors_origins: Vec<String>,
    pub rate_limit: RateLimitConfig,
    /// The URL clients reach berth at (behind a proxy, or by a name): the token realm in
    /// challenges. Without it, the address of the listener the request came in on.
    pub public_url: Option<PublicUrl>,
    /// bcrypt checks of passwords running at once [default: the number of CPUs].
    pub password_check_concurrency: Option<usize>,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    /// Images kept in the cache ahead of any pull (see `mirror::warm`).
    pub warm: Vec<WarmEntry>,
    /// How often the `[[warm]]` list is refreshed (also once at start).
    pub warm_interval: Seconds,
    /// Named lists of users, for `access` rules.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Who may do what to which repositories; none: every user pulls, pushes and deletes in
    /// the private namespace, and nobody is admin (see `config::access`).
    pub access: Vec<AccessRule>,
}

/// Bounds on what one connection, and all of them together, may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest time from the first byte of a request (or from connecting) to its last header.
    pub header_read_timeout: Seconds,
    /// Longest time a client may take to finish the TLS handshake after connecting.
    pub handshake_timeout: Seconds,
    /// A keep-alive connection (HTTP/1.1 or h2) with no request for this long is closed.
    pub idle_timeout: Seconds,
    /// A response that makes no progress (the client takes no bytes) for this long is aborted,
    /// with its connection.
    pub send_timeout: Seconds,
    /// Client connections open at once [default: (the open-file limit − `fd_reserve`) / 2, at
    /// most 32768; see `conn::connection_budget`].
    pub max_connections: Option<usize>,
    /// Client connections open at once from one address.
    pub max_connections_per_client: usize,
    /// File descriptors kept back from clients, for cache files and upstream connections.
    pub fd_reserve: usize,
    /// Requests one HTTP/2 connection may have in flight at once.
    pub h2_max_concurrent_streams: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout: Seconds(Duration::from_secs(15)),
            handshake_timeout: Seconds(Duration::from_secs(10)),
            idle_timeout: Seconds(Duration::from_secs(60)),
            send_timeout: Seconds(Duration::from_secs(60)),
            max_connections: None,
            max_connections_per_client: 256,
            fd_reserve: 256,
            h2_max_concurrent_streams: 32,
        }
    }
}

/// Client and upstream rate limits; every limit is off unless configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per second each client address may make.
    pub per_client_rps: Option<f64>,
    /// Requests a client may make at once [default: the larger of 50 and `per_client_rps`].
    pub burst: Option<u32>,
    /// Count a request only if it needs the upstream: cache hits are never refused.
    pub exempt_cache_hits: bool,
    /// Upstream fetches (blob downloads, manifest fetches) running at once, over all upstreams.
    pub max_upstream_concurrency: Option<usize>,
    /// Requests per second sent to the upstreams, all together.
    pub upstream_rps: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for this upstream, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: Seconds,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Seconds,
    /// Longest wait for the first byte of an upstream response.
    #[serde(default = "default_response_timeout")]
    pub response_timeout: Seconds,
    /// The longest `Retry-After` of a 429 that is obeyed; a longer one is cut to this.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after: Seconds,
    /// Consecutive failed requests (unreachable, timed out, 5xx) after which the upstream is
    /// taken for down and not asked again until `breaker_cooldown` has passed.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long a down upstream is left alone before one probe request may try it again.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown: Seconds,
    /// Warming (`[[warm]]`, `berth warm`, prefetches) stops while the upstream's
    /// `ratelimit-remaining` (Docker Hub) is at or below this, leaving those pulls to clients.
    #[serde(default = "default_ratelimit_reserve")]
    pub ratelimit_reserve: u32,
    /// When a pull finds a tag moved to a new digest, fetch the new image's blobs in the
    /// background so the next pull is a cache hit.
    #[serde(default)]
    pub prefetch_on_move: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

fn default_tag_ttl() -> Seconds {
    Seconds(Duration::from_secs(300))
}
fn default_connect_timeout() -> Seconds {
    Seconds(Duration::from_secs(10))
}
fn default_response_timeout() -> Seconds {
    Seconds(Duration::from_secs(30))
}
fn default_max_retry_after() -> Seconds {
    Seconds(Duration::from_secs(600))
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown() -> Seconds {
    Seconds(Duration::from_secs(30))
}
fn default_ratelimit_reserve() -> u32 {
    20
}

impl UpstreamConfig {
    pub fn new(url: UpstreamUrl) -> Self {
        UpstreamConfig {
            url,
            user: None,
            password_file: None,
            ca_file: None,
            tag_ttl: default_tag_ttl(),
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            max_retry_after: default_max_retry_after(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown: default_breaker_cooldown(),
            ratelimit_reserve: default_ratelimit_reserve(),
            prefetch_on_move: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut upstreams = BTreeMap::new();
        upstreams.insert(
            DOCKER_HUB.to_owned(),
            UpstreamConfig::new(
                UpstreamUrl::parse("https://registry-1.docker.io").expect("valid default"),
            ),
        );
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data_dir: PathBuf::from("./berth-data"),
            log_format: LogFormat::Text,
            private_ns: Vec::new(),
            htpasswd: None,
            private_pull_public: false,
            auth_everything: false,
            max_cache_size: ByteSize(50 << 30),
            memory_cache_size: ByteSize(256 << 20),
            max_orphan_download: ByteSize(4 << 30),
            default_upstream: DOCKER_HUB.to_owned(),
            upstreams,
            shutdown_grace: Seconds(Duration::from_secs(30)),
            tls: None,
            upload_max_age: Seconds(Duration::from_secs(24 * 3600)),
            max_uploads_per_user: 100,
            webhooks: Vec::new(),
            metrics_listen: None,
            trusted_proxies: Vec::new(),
            cors_origins: Vec::new(),
            rate_limit: RateLimitConfig::default(),
            public_url: None,
            password_check_concurrency: None,
            limits: LimitsConfig::default(),
            storage: StorageConfig::default(),
            warm: Vec::new(),
            warm_interval: Seconds(Duration::from_secs(6 * 3600)),
            groups: BTreeMap::new(),
            access: Vec::new(),
        }
    }
}

/// A configuration error: which key, and what is wrong with it. Displayed on one line.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads a TOML file; keys it does not set keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
        Config::from_toml(&text)
    }

    /// What a command runs with: the file of `--config` (or the defaults), with the `BERTH_*`
    /// variables of this process's environment applied (see [`env`]).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| err("--config", format!("{}: {e}", path.display())))?,
            None => String::new(),
        };
        Config::from_toml_and_env(&text, std::env::vars())
    }

    /// The file's text with the `BERTH_*` settings among `vars` applied.
    pub fn from_toml_and_env(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let Some((merged, applied)) = env::overlay(text, vars)? else {
            return Config::from_toml(text);
        };
        Config::from_toml(&merged).map_err(|mut e| {
            // The merged text's line numbers mean nothing to the user: name the variables.
            e.message = format!("{} (with {} set)", e.message, applied.join(", "));
            e
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        // A file that lists upstreams without Docker Hub still gets the default Docker Hub entry,
        // so the default upstream always exists unless the file moved the default elsewhere.
        if !config.upstreams.contains_key(DOCKER_HUB) && config.default_upstream == DOCKER_HUB {
            config.upstreams.extend(Config::default().upstreams);
        }
        Ok(config)
    }

    /// Checks what cannot be checked key by key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.upstreams.contains_key(&self.default_upstream) {
            return Err(err(
                "default_upstream",
                format!(
                    "no [upstreams.\"{}\"] table is configured",
                    self.default_upstream
                ),
            ));
        }
        for ns in &self.private_ns {
            if crate::oci::names::RepoName::parse(ns).is_err() {
                return Err(err(
                    "private_ns",
                    format!("{ns:?} is not a valid repository namespace"),
                ));
            }
        }
        if self.upload_max_age.0.is_zero() {
            return Err(err(
                "upload_max_age",
                "must be more than 0: every upload would expire as it starts",
            ));
        }
        if let Some(path) = &self.htpasswd {
            // Checked here, not at the first login: a typo in the path would otherwise refuse
            // every push with nothing but a log line to say why.
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(err("htpasswd", format!("{}: not a file", path.display()))),
                Err(e) => return Err(err("htpasswd", format!("{}: {e}", path.display()))),
            }
        }
        if self.password_check_concurrency == Some(0) {
            return Err(err("password_check_concurrency", "must be at least 1"));
        }
        if self.auth_everything && self.htpasswd.is_none() {
            return Err(err(
                "auth_everything",
                "needs an htpasswd file to check credentials against",
            ));
        }
        for (key, up) in &self.upstreams {
            if up.user.is_some() != up.password_file.is_some() {
                return Err(err(
                    format!("upstreams.\"{key}\".user"),
                    "user and password_file must be given together",
                ));
            }
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            if let Some(secret) = &hook.secret {
                secret
                    .load()
                    .map_err(|e| err(format!("webhooks[{i}].secret"), e))?;
            }
        }
        self.rate_limit.validate()?;
        for o in &self.cors_origins {
            if !valid_origin(o) {
                return Err(err(
                    "cors_origins",
                    format!("{o:?} is not \"*\" or an origin like \"https://ui.example\""),
                ));
            }
        }
        self.limits.validate()?;
        self.storage.validate()?;
        warm::validate(&self.warm, &self.upstreams, self.warm_interval.0)?;
        access::validate(&self.groups, &self.access)?;
        Ok(())
    }

    /// How many password checks may run at once.
    pub fn password_check_concurrency(&self) -> usize {
        self.password_check_concurrency.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    pub fn default_upstream_config_mut(&mut self) -> &mut UpstreamConfig {
        let key = self.default_upstream.clone();
        self.upstreams
            .entry(key)
            .or_insert_with(|| UpstreamConfig::new(UpstreamUrl::docker_hub()))
    }
}

/// Turns toml's multi-line report into one line naming the key at the error's position.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_owned();
    let Some(span) = e.span() else {
        return err("(file)", message);
    };
    let line_start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let line = &text[line_start..line_end];
    let line_no = text[..line_start].matches('\n').count() + 1;
    let key = match line.split_once('=') {
        Some((k, _)) => k.trim().to_owned(),
        None => line.trim().to_owned(),
    };
    // Keys inside a table are named with the table, as in `upstreams."ghcr.io".url`.
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = match table {
        Some(t) if !key.starts_with('[') => format!("{t}.{key}"),
        _ => key,
    };
    err(key, format!("line {line_no}: {message}"))
}

impl RateLimitConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            key: format!("rate_limit.{key}"),
            message,
        };
        for (key, rps) in [
            ("per_client_rps", self.per_client_rps),
            ("upstream_rps", self.upstream_rps),
        ] {
            if let Some(rps) = rps {
                if !(1e-6..=1e9).contains(&rps) {
                    return Err(err(key, format!("{rps} is not a positive rate")));
                }
            }
        }
        if self.burst == Some(0) {
            return Err(err("burst", "must be at least 1".into()));
        }
        if self.max_upstream_concurrency == Some(0) {
            return Err(err(
                "max_upstream_concurrency",
                "must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, message: &str| ConfigError {
            key: format!("limits.{key}"),
            message: message.to_owned(),
        };
        for (key, t) in [
            ("header_read_timeout", self.header_read_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if t.0.is_zero() {
                return Err(err(key, "must be longer than zero"));
            }
        }
        if self.max_connections == Some(0) {
            return Err(err("max_connections", "must be at least 1"));
        }
        if self.max_connections_per_client == 0 {
            return Err(err("max_connections_per_client", "must be at least 1"));
        }
        if self.h2_max_concurrent_streams == 0 {
            return Err(err("h2_max_concurrent_streams", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_are_one_line_errors_not_panics() {
        for huge in [
            "100000000000000000000s",
            "36600000d",
            "99999999999999999999999999999999999999h",
        ] {
            let e = Seconds::parse(huge).unwrap_err();
            assert!(e.contains("at most 100 years"), "{huge}: {e}");
        }
        let e = Config::from_toml("shutdown_grace = \"100000000000000000000s\"\n").unwrap_err();
        assert!(e.to_string().contains("shutdown_grace"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = Config::from_toml("shutdown_grace = 18446744073709551615\n").unwrap_err();
        assert!(e.to_string().contains("shutdown_grace"), "{e}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let e = Config::from_toml("listen = \"0.0.0.0:5000\"\nmax_cache_size = \"5 parsecs\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("max_cache_size"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = Config::from_toml("lisen = \"0.0.0.0:5000\"\n").unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        let e =
            Config::from_toml("[upstreams.\"ghcr.io\"]\nurl = \"ftp://ghcr.io\"\n").unwrap_err();
        assert!(e.to_string().contains("url"), "{e}");
    }

    #[test]
    fn a_file_with_other_upstreams_keeps_docker_hub() {
        let c = Config::from_toml(
            "[upstreams.\"ghcr.io\"]\nurl = \"https://ghcr.io\"\ntag_ttl = \"1m\"\n",
        )
        .unwrap();
        assert!(c.upstreams.contains_key(DOCKER_HUB));
        assert_eq!(c.upstreams["ghcr.io"].tag_ttl.0, Duration::from_secs(60));
        c.validate().unwrap();
    }

    #[test]
    fn private_registry_keys() {
        let c = Config::from_toml(
            "upload_max_age = \"2h\"\nwebhooks = [\"http://127.0.0.1:9/hook\"]\n",
        )
        .unwrap();
        assert_eq!(c.upload_max_age.0, Duration::from_secs(7200));
        assert_eq!(c.webhooks[0].to_string(), "http://127.0.0.1:9/hook");
        assert_eq!(
            Config::default().upload_max_age.0,
            Duration::from_secs(86400)
        );
        let e = Config::from_toml("webhooks = [\"ftp://x/\"]\n").unwrap_err();
        assert!(e.to_string().contains("webhooks"), "{e}");
        let c = Config::from_toml("auth_everything = true\n").unwrap();
        assert!(c.validate().is_err());
        assert_eq!(Config::default().max_uploads_per_user, 100);
        let c =
            Config::from_toml("max_uploads_per_user = 3\nupload_max_age = \"200ms\"\n").unwrap();
        assert_eq!(c.max_uploads_per_user, 3);
        assert_eq!(c.upload_max_age.0, Duration::from_millis(200));
        c.validate().unwrap();
        let e = Config::from_toml("upload_max_age = \"0s\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("upload_max_age"), "{e}");
        let c = Config::from_toml("public_url = \"https://mirror.office:5443/\"\n").unwrap();
        assert_eq!(
            c.public_url.unwrap().to_string(),
            "https://mirror.office:5443"
        );
        for bad in ["mirror.office", "https://m/v2", "https://m?x", "ftp://m"] {
            let e = Config::from_toml(&format!("public_url = \"{bad}\"\n")).unwrap_err();
            assert!(e.to_string().contains("public_url"), "{e}");
        }
        let e = Config::from_toml("htpasswd = \"/nonexistent/htpasswd\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/htpasswd"), "{e}");
    }
}
