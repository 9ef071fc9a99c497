//! What a client may hold: connections (globally and per address), the time a connection may
//! take to send a request header or stay idle, the time a response may go without the client
//! taking its bytes, and the file descriptors all of that costs.
//!
//! The accept loops ask [`Conns::admit`] for every new connection and close it at once when a
//! cap is reached. Each admitted connection gets an [`Activity`], which its reads ([`Io`]), its
//! requests and its response bodies ([`Watched`]) keep up to date, and [`drive`] runs the
//! connection until it ends or one of the [`Activity::deadline`]s passes. The deadlines are
//! kept here rather than in hyper because hyper's HTTP/1 header timer also ends idle
//! keep-alive connections (with the header timeout, not an idle one), nothing in hyper bounds
//! the wait before the protocol is known, and h2 has no idle timer at all.

mod activity;

pub use activity::{drive, Activity, Ended, Io, RequestGuard, Watched};

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

use crate::config::IpNet;
use crate::config::LimitsConfig;
use crate::lock;

/// Largest connection cap derived from the file-descriptor limit when `max_connections` is not
/// set: past this, memory rather than descriptors is what a flood of connections would exhaust.
const DERIVED_MAX: usize = 32768;

/// Raises the soft limit on open files to the hard limit; returns the limit before and after.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let (before, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    // An unlimited hard limit cannot be the soft one: the kernel refuses more than nr_open.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(ceiling);
    if target <= before {
        return Ok((before, before));
    }
    rlimit::setrlimit(rlimit::Resource::NOFILE, target, hard)?;
    Ok((before, target))
}

/// The current soft limit on open files (1024 if it cannot be read).
pub fn fd_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The default connection cap for a file-descriptor limit: the descriptors left after the
/// reserve (at most a quarter of the limit), halved because a connection being served a blob
/// holds the blob's file open too.
pub fn connection_budget(fd_limit: u64, reserve: usize) -> usize {
    let limit = usize::try_from(fd_limit).unwrap_or(usize::MAX);
    let reserve = reserve.min(limit / 4);
    ((limit - reserve) / 2).clamp(1, DERIVED_MAX)
}

/// Why a connection was refused or closed early; the label of its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    MaxConnections,
    MaxConnectionsPerClient,
    HandshakeTimeout,
    HeaderTimeout,
    IdleTimeout,
    SendTimeout,
}

impl Reason {
    pub const REFUSALS: [Reason; 2] = [Reason::MaxConnections, Reason::MaxConnectionsPerClient];
    pub const CLOSES: [Reason; 4] = [
        Reason::HandshakeTimeout,
        Reason::HeaderTimeout,
        Reason::IdleTimeout,
        Reason::SendTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MaxConnections => "max_connections",
            Reason::MaxConnectionsPerClient => "max_connections_per_client",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::HeaderTimeout => "header_read_timeout",
            Reason::IdleTimeout => "idle_timeout",
            Reason::SendTimeout => "send_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const REASONS: usize = 6;

/// At most one log line per second for each reason, so that a flood of refusals does not turn
/// into a flood of log lines; the next line says how many were left out.
#[derive(Default)]
struct Throttle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// `Some(lines left out since the last one)` when a line may be written now.
    fn check(&self) -> Option<u64> {
        let mut s = lock(&self.state);
        match s.0 {
            Some(t) if t.elapsed() < Duration::from_secs(1) => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(Instant::now()), 0);
                Some(suppressed)
            }
        }
    }
}

/// The timeouts one connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake: Duration,
    pub header: Duration,
    pub idle: Duration,
    pub send: Duration,
}

/// Every client connection, counted globally and per address.
pub struct Conns {
    pub max: usize,
    trusted: Vec<IpNet>,
    pub max_per_client: usize,
    pub timeouts: Timeouts,
    pub h2_max_streams: u32,
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Responses not yet sent in full, over all connections.
    responses: AtomicUsize,
    counts: [AtomicU64; REASONS],
    throttles: [Throttle; REASONS],
    closed_all: Notify,
}

impl Conns {
    /// `max` is the global cap (`limits.max_connections` once the default is derived);
    /// `trusted` are the `trusted_proxies`, which carry many clients' connections and so are
    /// not held to the per-client cap.
    pub fn new(limits: &LimitsConfig, max: usize, trusted: Vec<IpNet>) -> Conns {
        Conns {
            max,
            trusted,
            max_per_client: limits.max_connections_per_client,
            timeouts: Timeouts {
                handshake: limits.handshake_timeout.0,
                header: limits.header_read_timeout.0,
                idle: limits.idle_timeout.0,
                send: limits.send_timeout.0,
            },
            h2_max_streams: limits.h2_max_concurrent_streams,
            open: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            responses: AtomicUsize::new(0),
            counts: Default::default(),
            throttles: Default::default(),
            closed_all: Notify::new(),
        }
    }

    /// Admits a new connection from `ip`, or counts and logs its refusal; the caller closes a
    /// refused connection at once (nothing has been read, so no HTTP answer is possible).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refuse(Reason::MaxConnections, ip, self.max);
            return None;
        }
        {
            let mut per = lock(&self.per_client);
            let n = per.entry(ip).or_insert(0);
            if *n >= self.max_per_client && !self.trusted.iter().any(|net| net.contains(ip)) {
                drop(per);
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.refuse(Reason::MaxConnectionsPerClient, ip, self.max_per_client);
                return None;
            }
            *n += 1;
        }
        Some(ConnGuard {
            conns: self.clone(),
            ip,
        })
    }

    fn refuse(&self, reason: Reason, ip: IpAddr, limit: usize) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.throttles[reason.index()].check() {
            tracing::warn!(
                client = %ip,
                limit,
                reason = reason.as_str(),
                suppressed,
                "connection refused: limits.{} reached",
                reason.as_str()
            );
        }
    }

    /// Counts a connection closed early, and logs it (idle closes at debug level: they are the
    /// normal end of a keep-alive connection).
    pub fn closed(&self, reason: Reason, ip: IpAddr) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
        if reason == Reason::IdleTimeout {
            tracing::debug!(client = %ip, "closing an idle connection (limits.idle_timeout)");
            return;
        }
        if let Some(suppressed) = self.throttles[reason.index()].check() {
            let what = match reason {
                Reason::HandshakeTimeout => "did not finish the TLS handshake in time",
                Reason::HeaderTimeout => "did not send a complete request header in time",
                _ => "took no response bytes in time",
            };
            tracing::warn!(
                client = %ip,
                reason = reason.as_str(),
                suppressed,
                "connection closed: the client {what} (limits.{})",
                reason.as_str()
            );
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn responses_in_flight(&self) -> usize {
        self.responses.load(Ordering::Acquire)
    }

    /// Connections refused or closed for `reason` since start.
    pub fn count(&self, reason: Reason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }

    /// Returns when no connection is open.
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.closed_all.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// An admitted connection's place under the caps, given back when dropped.
pub struct ConnGuard {
    conns: Arc<Conns>,
    ip: IpAddr,
}

impl ConnGuard {
    pub fn conns(&self) -> &Arc<Conns> {
        &self.conns
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        {
            let mut per = lock(&self.conns.per_client);
            if let Some(n) = per.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&self.ip);
                }
            }
        }
        if self.conns.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conns.closed_all.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Seconds};

    #[test]
    fn the_budget_keeps_a_reserve_and_a_descriptor_per_served_file() {
        // 1024, a common default: 256 kept back, half of the rest for connections.
        assert_eq!(connection_budget(1024, 256), 384);
        // A small limit keeps a quarter back rather than all of it.
        assert_eq!(connection_budget(400, 256), 150);
        assert_eq!(connection_budget(2, 256), 1);
        // A generous hard limit is not an invitation to a million connections.
        assert_eq!(connection_budget(1 << 20, 256), DERIVED_MAX);
    }

    #[test]
    fn limits_are_read_from_their_table_and_checked() {
        let c = Config::from_toml(
            "[limits]\nheader_read_timeout = \"5s\"\nidle_timeout = \"90s\"\nmax_connections = 100\n\
             max_connections_per_client = 10\nsend_timeout = \"250ms\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.header_read_timeout.0, Duration::from_secs(5));
        assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(90));
        assert_eq!(c.limits.send_timeout.0, Duration::from_millis(250));
        assert_eq!(c.limits.max_connections, Some(100));
        assert_eq!(c.limits.max_connections_per_client, 10);
        c.validate().unwrap();
        let e = Config::from_toml("[limits]\nidle_timout = \"1s\"\n").unwrap_err();
        assert!(e.to_string().contains("idle_timout"), "{e}");
        let mut c = Config::default();
        c.limits.send_timeout = Seconds(Duration::ZERO);
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "limits.send_timeout");
        let mut c = Config::default();
        c.limits.max_connections_per_client = 0;
        assert_eq!(
            c.validate().unwrap_err().key,
            "limits.max_connections_per_client"
        );
    }

    #[test]
    fn a_burst_of_warnings_is_one_line_with_a_count() {
        let t = Throttle::default();
        assert_eq!(t.check(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.check(), None);
        }
        lock(&t.state).0 = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(t.check(), Some(5));
    }

    #[test]
    fn the_caps_count_per_address_and_give_places_back() {
        let limits = LimitsConfig {
            max_connections_per_client: 2,
            ..LimitsConfig::default()
        };
        let proxy = IpNet::parse("192.168.0.0/16").unwrap();
        let conns = Arc::new(Conns::new(&limits, 4, vec![proxy]));
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        // A trusted proxy speaks for many clients: only the global cap applies to it.
        let p = IpAddr::from([192, 168, 1, 1]);
        let p1 = conns.admit(p).unwrap();
        let p2 = conns.admit(p).unwrap();
        let p3 = conns.admit(p).unwrap();
        drop((p1, p2, p3));
        let _p1 = conns.admit(p).unwrap();
        let a1 = conns.admit(a).unwrap();
        let _a2 = conns.admit(a).unwrap();
        assert!(conns.admit(a).is_none());
        assert_eq!(conns.count(Reason::MaxConnectionsPerClient), 1);
        let _b1 = conns.admit(b).unwrap();
        assert!(conns.admit(b).is_none());
        assert_eq!(conns.count(Reason::MaxConnections), 1);
        drop(a1);
        assert_eq!(conns.open(), 3);
        assert!(conns.admit(a).is_some());
    }
}
