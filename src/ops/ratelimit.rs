//! Rate limits: per client address, on upstream requests per second, and on concurrent upstream
//! fetches. Every limit is off unless configured.
//!
//! - Clients are keyed by IP address: the TCP peer, or the address a trusted proxy put in
//!   `X-Forwarded-For` (IPv6 clients by their /64). A client over its quota is answered 429 `TOOMANYREQUESTS` with
//!   `Retry-After`. With `exempt_cache_hits`, a request is counted only when it is about to
//!   contact an upstream ([`before_upstream`]), so cache hits are never refused.
//! - Upstream requests per second are admitted by [`UpstreamRate`], shared by all upstreams,
//!   waiting briefly when the next slot is near and refusing otherwise.
//! - Concurrent upstream fetches are bounded by [`UpstreamSlots`]: a new download or manifest
//!   fetch waits for a free slot, up to the upstream's response timeout.

use std::cell::Cell;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;

use crate::config::{Config, IpNet, RateLimitConfig};
use crate::mirror::admission::UpstreamAdmission;
use crate::mirror::upstream::UpstreamError;
use crate::oci::error::RegistryError;

/// The burst a client gets when only `per_client_rps` is configured: a `docker pull` asks for a
/// manifest or two and every layer at once.
const DEFAULT_BURST: u32 = 50;
/// The keyed limiter forgets idle clients every this many checks.
const PRUNE_EVERY: u64 = 4096;
/// How long an upstream request may wait for its turn under `upstream_rps` before it is refused.
const UPSTREAM_RPS_MAX_WAIT: Duration = Duration::from_secs(5);

/// Why a request was refused, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Client,
    UpstreamRps,
    UpstreamConcurrency,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Client => "client",
            Refusal::UpstreamRps => "upstream_rps",
            Refusal::UpstreamConcurrency => "upstream_concurrency",
        }
    }
}

/// Who a request is from.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub ip: IpAddr,
    /// The proxy that forwarded the request, when `X-Forwarded-For` was believed.
    pub via: Option<SocketAddr>,
}

/// The client-facing limits: the per-address limiter and the proxies trusted to name clients.
pub struct ClientLimits {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    checks: AtomicU64,
    trusted: Vec<IpNet>,
    pub exempt_cache_hits: bool,
    /// Requests refused, by limit.
    pub refused_client: AtomicU64,
}

impl ClientLimits {
    pub fn new(config: &Config) -> ClientLimits {
        let rl = &config.rate_limit;
        let limiter = rl.per_client_rps.and_then(|rps| {
            let burst = rl
                .burst
                .unwrap_or_else(|| DEFAULT_BURST.max(rps.ceil() as u32));
            let quota = Quota::with_period(Duration::try_from_secs_f64(1.0 / rps).ok()?)?
                .allow_burst(NonZeroU32::new(burst.max(1))?);
            Some(RateLimiter::keyed(quota))
        });
        ClientLimits {
            limiter,
            checks: AtomicU64::new(0),
            trusted: config.trusted_proxies.clone(),
            exempt_cache_hits: rl.exempt_cache_hits,
            refused_client: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limiter.is_some()
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy and sent
    /// `X-Forwarded-For`, in which case the right-most address no trusted proxy owns.
    pub fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> Client {
        let direct = Client {
            ip: peer.ip().to_canonical(),
            via: None,
        };
        if !self.is_trusted(peer.ip()) {
            return direct;
        }
        let mut hops: Vec<IpAddr> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else {
                return direct;
            };
            for part in value.split(',') {
                match parse_forwarded_addr(part) {
                    Some(ip) => hops.push(ip),
                    // A malformed list cannot be trusted at all.
                    None => return direct,
                }
            }
        }
        let Some(&first) = hops.first() else {
            return direct;
        };
        let ip = hops
            .iter()
            .rev()
            .find(|ip| !self.is_trusted(**ip))
            .copied()
            .unwrap_or(first);
        Client {
            ip: ip.to_canonical(),
            via: Some(peer),
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(ip))
    }

    /// Counts one request of `ip`; refuses it when the client is over its quota.
    pub fn check(&self, ip: IpAddr) -> Result<(), RegistryError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&limit_key(ip)).map_err(|not_until| {
            self.refused_client.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            tracing::debug!(client = %ip, wait_ms = wait.as_millis() as u64, "client over its rate limit");
            RegistryError::TooManyRequests {
                retry_after: round_up_secs(wait),
            }
        })
    }

    /// Runs a request's handler with the deferred check armed when cache hits are exempt.
    pub async fn scope<F: std::future::Future>(
        self: &Arc<Self>,
        client: IpAddr,
        f: F,
    ) -> F::Output {
        if self.limiter.is_some() && self.exempt_cache_hits {
            let deferred = Deferred {
                limits: self.clone(),
                client,
                counted: Cell::new(false),
            };
            crate::mirror::admission::scope(Box::new(deferred), f).await
        } else {
            f.await
        }
    }
}

/// The address a client is limited by: IPv4 addresses as they are, IPv6 by their /64, which is
/// what one host (or one customer of a provider) gets, so rotating addresses does not help.
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((v6.to_bits() & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// `X-Forwarded-For` entries are bare addresses, though some proxies add a port.
fn parse_forwarded_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}

fn round_up_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(Duration::from_secs(1))
}

struct Deferred {
    limits: Arc<ClientLimits>,
    client: IpAddr,
    counted: Cell<bool>,
}

impl UpstreamAdmission for Deferred {
    /// Counts the request against its client's limit, once.
    fn admit(&self) -> Result<(), RegistryError> {
        if self.counted.replace(true) {
            return Ok(());
        }
        self.limits.check(self.client)
    }
}

/// The cap on upstream requests per second, shared by all upstreams.
pub struct UpstreamRate {
    limiter: DefaultDirectRateLimiter,
    pub rps: f64,
}

impl UpstreamRate {
    pub fn new(config: &RateLimitConfig) -> Option<UpstreamRate> {
        let rps = config.upstream_rps?;
        let burst = NonZeroU32::new((rps.ceil() as u32).max(1))?;
        let quota =
            Quota::with_period(Duration::try_from_secs_f64(1.0 / rps).ok()?)?.allow_burst(burst);
        Some(UpstreamRate {
            limiter: RateLimiter::direct(quota),
            rps,
        })
    }

    /// Waits for the next slot if it comes soon; refuses the request otherwise.
    pub async fn admit(&self) -> Result<(), UpstreamError> {
        loop {
            match self.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    if wait > UPSTREAM_RPS_MAX_WAIT {
                        return Err(UpstreamError::TooManyRequests {
                            retry_after: round_up_secs(wait),
                        });
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_ne!(limit_key(a), limit_key(c));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(limit_key(v4), v4);
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let config = Config {
            trusted_proxies: vec![IpNet::parse("10.0.0.0/8").unwrap()],
            ..Config::default()
        };
        let limits = ClientLimits::new(&config);
        let proxy: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let stranger: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let h = headers("203.0.113.9, 10.0.0.7");
        assert_eq!(
            limits.client(proxy, &h).ip,
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(limits.client(stranger, &h).ip, stranger.ip());
        // The right-most untrusted hop wins: a client cannot pick its address by prepending one.
        let h = headers("1.1.1.1, 203.0.113.9");
        assert_eq!(
            limits.client(proxy, &h).ip,
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(limits.client(proxy, &headers("garbage")).ip, proxy.ip());
        assert_eq!(limits.client(proxy, &HeaderMap::new()).ip, proxy.ip());
    }
}
