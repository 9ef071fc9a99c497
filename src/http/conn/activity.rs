//! One connection's activity and its deadlines: what its reads ([`Io`]), requests
//! ([`RequestGuard`]) and response bodies ([`Watched`]) did last, and [`drive`], which runs the
//! connection until it ends or a deadline passes.

use super::*;

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
