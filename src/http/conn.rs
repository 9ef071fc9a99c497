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

/// What one connection is doing, for its deadlines. Times are milliseconds since `start`.
pub struct Activity {
    start: Instant,
    conns: Arc<Conns>,
    ip: IpAddr,
    /// Requests whose response is not yet sent in full.
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// When the last response finished (or the connection opened).
    idle_since: AtomicU64,
    /// When the first byte of the next HTTP/1 request header arrived; 0 for none.
    head_since: AtomicU64,
    h2: AtomicBool,
    /// When bytes last went into the connection's socket (or TLS stream).
    last_write: AtomicU64,
    next_id: AtomicU64,
    /// Response bodies that handed the connection bytes it has not taken yet: (id, since).
    waiting: Mutex<Vec<(u64, u64)>>,
}

impl Activity {
    /// The activity of the connection `guard` admitted.
    pub fn new(guard: &ConnGuard) -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            conns: guard.conns.clone(),
            ip: guard.ip,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            last_write: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// The connection speaks h2 (ALPN said so, or the client sent the h2 preface).
    pub fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    fn on_write(&self) {
        self.last_write.store(self.now(), Ordering::Relaxed);
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            // +1: zero means "no header under way".
            self.head_since.store(self.now() + 1, Ordering::Relaxed);
        }
    }

    /// A request's header is complete and its handler starts: its response is in flight until
    /// the returned guard (moved into the response body) is dropped.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        self.conns.responses.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            act: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            waiting: false,
        }
    }

    /// The next deadline of this connection, and what passing it means.
    pub fn deadline(&self, t: &Timeouts) -> Option<(Instant, Reason)> {
        let oldest_wait = lock(&self.waiting).iter().map(|(_, since)| *since).min();
        if let Some(since) = oldest_wait {
            // HTTP/1 has one response at a time, handed out in large pieces: bytes leaving the
            // socket are its progress. On h2 they may be another stream's, so each stream must
            // take its own slices.
            let since = match self.h2.load(Ordering::Relaxed) {
                true => since,
                false => since.max(self.last_write.load(Ordering::Relaxed)),
            };
            return Some((self.at(since) + t.send, Reason::SendTimeout));
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::Relaxed);
        if head > 0 && !self.h2.load(Ordering::Relaxed) {
            return Some((self.at(head - 1) + t.header, Reason::HeaderTimeout));
        }
        let idle = self.at(self.idle_since.load(Ordering::Relaxed));
        if self.requests.load(Ordering::Relaxed) == 0 {
            // A client connects to send a request: one that sends none in time is a slow one.
            Some((idle + t.header, Reason::HeaderTimeout))
        } else {
            Some((idle + t.idle, Reason::IdleTimeout))
        }
    }
}

/// One response in flight; see [`Activity::begin`].
pub struct RequestGuard {
    act: Arc<Activity>,
    id: u64,
    waiting: bool,
}

impl RequestGuard {
    fn wait(&mut self) {
        if !self.waiting {
            let now = self.act.now();
            lock(&self.act.waiting).push((self.id, now));
            self.waiting = true;
        }
    }

    fn taken(&mut self) {
        if self.waiting {
            lock(&self.act.waiting).retain(|(id, _)| *id != self.id);
            self.waiting = false;
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.taken();
        let act = &self.act;
        if act.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            act.idle_since.store(act.now(), Ordering::Relaxed);
        }
        act.conns.responses.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that tells its connection's [`Activity`] when it has handed out bytes the
/// connection has not taken yet: hyper polls a body for more only once it has found room for
/// what it got before, so a body left waiting (with, on HTTP/1, nothing leaving the socket
/// either) is a response the client is not reading.
pub struct Watched<B> {
    inner: B,
    guard: RequestGuard,
}

impl<B> Watched<B> {
    pub fn new(inner: B, guard: RequestGuard) -> Watched<B> {
        Watched { inner, guard }
    }
}

impl<B> HttpBody for Watched<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        this.guard.taken();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.data_ref().is_some_and(|d| !d.is_empty()) && !this.inner.is_end_stream() {
                this.guard.wait();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's byte stream, reporting reads and writes to its [`Activity`] and recognising
/// the h2 preface of a plaintext connection.
pub struct Io<T> {
    inner: T,
    act: Arc<Activity>,
    /// The first bytes read, until there are enough to tell h2 from HTTP/1.
    prefix: Vec<u8>,
    sniffed: bool,
}

impl<T> Io<T> {
    pub fn new(inner: T, act: Arc<Activity>) -> Io<T> {
        Io {
            inner,
            act,
            prefix: Vec::new(),
            sniffed: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if !this.sniffed {
                const H2: &[u8] = b"PRI ";
                let want = H2.len() - this.prefix.len();
                this.prefix.extend_from_slice(&new[..new.len().min(want)]);
                if this.prefix.len() == H2.len() {
                    this.sniffed = true;
                    if this.prefix == H2 {
                        this.act.set_h2();
                    }
                    this.prefix = Vec::new();
                }
            }
            this.act.on_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        this.act.on_write();
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.act.on_write();
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a connection driven by [`drive`] ended.
pub enum Ended<E> {
    /// The connection finished by itself (or after a graceful shutdown).
    Done(Result<(), E>),
    /// A deadline passed: the connection was closed for this reason (counted and logged).
    Closed(Reason),
}

/// How long a connection may take to finish after it was asked to shut down gracefully (idle
/// or server shutdown is handled by the server's own grace period).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Runs a connection until it ends, a deadline of `act` passes, or `stop` turns true (then it
/// is shut down gracefully: in-flight responses finish, and the server bounds that wait).
///
/// An idle connection gets a graceful shutdown too (h2 clients then see a GOAWAY rather than a
/// reset); one that overruns a header or send deadline is dropped at once, because the client
/// is the one not keeping up.
pub async fn drive<F, E>(
    conn: F,
    mut shutdown: impl FnMut(Pin<&mut F>),
    act: &Activity,
    mut stop: watch::Receiver<bool>,
) -> Ended<E>
where
    F: Future<Output = Result<(), E>>,
{
    let t = act.conns.timeouts;
    // Without a deadline (a response being produced), look again this often.
    let recheck = t.header.min(t.idle).min(t.send);
    let mut conn = std::pin::pin!(conn);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let mut stopped = std::pin::pin!(stopped);
    let sleep = tokio::time::sleep(recheck);
    let mut sleep = std::pin::pin!(sleep);
    let mut stopping = false;
    let mut idle_closing: Option<Instant> = None;
    std::future::poll_fn(move |cx| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Ended::Done(r));
        }
        if !stopping && stopped.as_mut().poll(cx).is_ready() {
            stopping = true;
            shutdown(conn.as_mut());
            continue;
        }
        // The timer is moved only to an earlier deadline: deadlines move later with every piece
        // a response hands out, and one that fires early is simply looked at again below.
        let wanted = match idle_closing {
            Some(at) => Some(at + IDLE_CLOSE_GRACE),
            None => act.deadline(&t).map(|(at, _)| at),
        };
        if let Some(at) = wanted.map(tokio::time::Instant::from_std) {
            if at < sleep.deadline() {
                sleep.as_mut().reset(at);
            }
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if idle_closing.is_some() {
            return Poll::Ready(Ended::Closed(Reason::IdleTimeout));
        }
        let now = Instant::now();
        match act.deadline(&t) {
            Some((at, reason)) if at <= now => {
                act.conns.closed(reason, act.ip);
                if reason == Reason::IdleTimeout && !stopping {
                    idle_closing = Some(now);
                    stopping = true;
                    shutdown(conn.as_mut());
                    continue;
                }
                return Poll::Ready(Ended::Closed(reason));
            }
            // Not due yet (a request began, a piece was taken), or nothing is due at all.
            due => {
                let next = due.map_or(now + recheck, |(at, _)| at);
                sleep.as_mut().reset(tokio::time::Instant::from_std(next));
            }
        }
    })
    .await
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
