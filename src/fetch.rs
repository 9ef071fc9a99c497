//! The fetch coordinator: one upstream download per missing blob, streamed to every reader.
//!
//! The first request for a missing blob starts a download task that writes into a temp file of
//! the store and publishes its progress on a `watch` channel. Every request for the same blob —
//! the first one included — reads that temp file from byte 0 at its own pace, woken by progress
//! notifications, never past what has been written. The task belongs to no client: a client that
//! goes away does not stop it (unless nobody is left and the blob is larger than the orphan
//! limit). Only a verified blob is renamed into the cache; on any failure every reader's body ends
//! with an error, so clients see a broken transfer and never a complete wrong body.
//!
//! `SingleFlight` gives manifest fetches and tag resolutions the same one-request-many-waiters
//! behaviour.

use crate::lock;
use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::Stream;
use http::Method;
use http_body_util::BodyExt;
use memmap2::{Advice, Mmap, MmapOptions};
use tokio::sync::watch;

use crate::cache::DiskCache;
use crate::names::{Digest, RepoName};
use crate::ratelimit::UpstreamSlots;
use crate::store::{Area, BlobWriter, StoreError};
use crate::upstream::{content_length, Upstream, UpstreamError};

/// Reads of a cached blob go in pieces of this size: large enough that the hand-off to a
/// blocking thread and the mapping are a small part of each piece.
const READ_CHUNK: usize = 1 << 20;
/// Copied reads go in pieces of this size: a piece is encrypted moments after it is read, while
/// it is still in the CPU's cache, and its buffer is then reused for the next one.
const COPY_CHUNK: usize = 256 << 10;
/// Readers following a download share mappings of it in windows of this size. They read the
/// same region at about the same time, so the eight clients of one cold blob cost one mapping
/// (and one unmap, with its cross-CPU TLB flush) per window rather than eight per piece.
const FOLLOW_WINDOW: u64 = 1 << 20;
/// Windows a download keeps track of, for readers that are a little behind the others.
const FOLLOW_WINDOWS_KEPT: usize = 4;
/// Upstream frames are coalesced into writes of up to this size when they arrive faster than disk.
const WRITE_BATCH: usize = 1 << 20;

/// How a blob's bytes are handed to the connection.
///
/// A mapping costs no copy, but a page of it that cannot be read (a failing disk, a file cut
/// short behind berth's back) is SIGBUS for whoever touches it. When the connection hands the
/// bytes to the kernel (`write`/`writev` of plain HTTP/1.1), the kernel touches them: a bad
/// page fails that write with EFAULT, and only that response. When they are read in user space
/// (TLS encrypts them, HTTP/2 may copy small frames), a bad page would kill the process; those
/// connections get copies read with `pread`, where a bad page is an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    Mapped,
    Copied,
}

/// Why a download ended without a cache entry.
#[derive(Debug, Clone)]
pub enum FetchFailure {
    Upstream(UpstreamError),
    Mismatch(String),
    Truncated {
        expected: u64,
        got: u64,
    },
    /// The upstream's body broke off with an error.
    Interrupted(String),
    Abandoned,
    Io(String),
    /// The download task ended without an outcome (it panicked or was cancelled).
    Died,
}

impl FetchFailure {
    /// A short name for metric labels and log fields.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchFailure::Upstream(e) => e.kind(),
            FetchFailure::Mismatch(_) => "digest_mismatch",
            FetchFailure::Truncated { .. } => "truncated",
            FetchFailure::Interrupted(_) => "interrupted",
            FetchFailure::Abandoned => "abandoned",
            FetchFailure::Io(_) => "store_io",
            FetchFailure::Died => "task_died",
        }
    }
}

impl std::fmt::Display for FetchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchFailure::Upstream(e) => write!(f, "{e}"),
            FetchFailure::Mismatch(m) => write!(f, "{m}"),
            FetchFailure::Truncated { expected, got } => {
                write!(f, "upstream stream ended at {got} of {expected} bytes")
            }
            FetchFailure::Interrupted(e) => write!(f, "upstream body broke off: {e}"),
            FetchFailure::Abandoned => write!(
                f,
                "download abandoned: no readers left and over the orphan limit"
            ),
            FetchFailure::Io(e) => write!(f, "store I/O: {e}"),
            FetchFailure::Died => write!(f, "download task died"),
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    /// Waiting for the upstream's response headers.
    Connecting,
    Streaming,
    /// Every byte is written and matches the digest; the blob is being made durable.
    Verified,
    Done,
    Failed(FetchFailure),
}

#[derive(Debug, Clone)]
struct Progress {
    state: State,
    written: u64,
    total: Option<u64>,
}

/// One download in flight.
pub struct Download {
    file: Arc<File>,
    progress: watch::Sender<Progress>,
    readers: AtomicUsize,
    /// Recently mapped windows of the file, by index; alive while a reader holds a piece.
    windows: Mutex<Vec<(u64, Weak<Mmap>)>>,
}

/// What a blob request attaches to.
pub enum Attach {
    /// The blob was already in the cache.
    Cached,
    /// A download is under way; `joined` tells whether this request started it.
    InFlight {
        download: Arc<Download>,
        joined: bool,
    },
}

type DownloadKey = (String, Digest);

/// Ends a download when its task does, however it does.
struct Ending {
    fetches: Arc<Fetches>,
    key: DownloadKey,
    download: Arc<Download>,
    outcome: Option<Result<(), FetchFailure>>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Err(FetchFailure::Died));
        if let Err(e) = &outcome {
            if matches!(e, FetchFailure::Died) {
                tracing::warn!(digest = %self.key.1, upstream = %self.key.0, reason = e.reason(), "blob download failed: its task died");
            }
            self.fetches.count_failure(e.reason());
        }
        // Remove from the map only after the rename, then tell the readers.
        let idle = {
            let mut inflight = lock(&self.fetches.inflight);
            inflight.remove(&self.key);
            inflight.is_empty()
        };
        self.download.progress.send_modify(|p| {
            p.state = match outcome {
                Ok(()) => State::Done,
                Err(e) => State::Failed(e),
            }
        });
        if idle {
            self.fetches.idle.notify_waiters();
        }
    }
}

pub struct Fetches {
    inflight: Mutex<HashMap<DownloadKey, Arc<Download>>>,
    /// Downloads that failed, by reason.
    failed: Mutex<HashMap<&'static str, u64>>,
    disk: Arc<DiskCache>,
    max_orphan: u64,
    /// Downloads started, and requests that joined one already running.
    pub started: AtomicU64,
    pub joined: AtomicU64,
    /// Bytes received from upstreams.
    pub upstream_bytes: AtomicU64,
    /// The cap on upstream fetches running at once.
    slots: Arc<UpstreamSlots>,
    /// Woken when the last download ends.
    idle: tokio::sync::Notify,
}

impl Fetches {
    pub fn new(disk: Arc<DiskCache>, max_orphan: u64) -> Fetches {
        Fetches {
            inflight: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            disk,
            max_orphan,
            started: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            upstream_bytes: AtomicU64::new(0),
            slots: Arc::new(UpstreamSlots::unlimited()),
            idle: tokio::sync::Notify::new(),
        }
    }

    /// Makes downloads wait for one of these slots before they contact the upstream.
    pub fn with_slots(mut self, slots: Arc<UpstreamSlots>) -> Fetches {
        self.slots = slots;
        self
    }

    fn count_failure(&self, reason: &'static str) {
        *lock(&self.failed).entry(reason).or_default() += 1;
    }

    /// Failed downloads so far, by reason.
    pub fn failures(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = lock(&self.failed).iter().map(|(r, n)| (*r, *n)).collect();
        v.sort();
        v
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Waits until no download is running, so a shutdown leaves finished blobs in the cache
    /// rather than in `tmp/`.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The download of `digest` from the upstream `key`, if one is under way.
    pub fn running(&self, key: &str, digest: &Digest) -> Option<Arc<Download>> {
        lock(&self.inflight)
            .get(&(key.to_owned(), *digest))
            .cloned()
    }

    /// Joins the download of `digest` from `upstream`, starting it if none runs.
    pub fn attach(
        self: &Arc<Self>,
        upstream: Arc<Upstream>,
        repo: RepoName,
        digest: Digest,
    ) -> io::Result<Attach> {
        let key = (upstream.key.clone(), digest);
        let mut inflight = lock(&self.inflight);
        if let Some(d) = inflight.get(&key) {
            self.joined.fetch_add(1, Ordering::Relaxed);
            return Ok(Attach::InFlight {
                download: d.clone(),
                joined: true,
            });
        }
        // Checked under the lock: a download renames its blob into place before it leaves the
        // map, so a blob that is in neither place is really missing.
        if self.disk.store().blob_len(Area::Cache, &digest)?.is_some() {
            return Ok(Attach::Cached);
        }
        let writer = self.disk.store().begin_blob(Area::Cache, digest)?;
        let (progress, _) = watch::channel(Progress {
            state: State::Connecting,
            written: 0,
            total: None,
        });
        let download = Arc::new(Download {
            file: writer.shared_file(),
            progress,
            readers: AtomicUsize::new(0),
            windows: Mutex::new(Vec::new()),
        });
        inflight.insert(key.clone(), download.clone());
        self.started.fetch_add(1, Ordering::Relaxed);
        drop(inflight);
        // The guard ends the download whatever happens to the task: finished, failed, panicked
        // or cancelled, its readers are told and its slot in the map is freed.
        let mut guard = Ending {
            fetches: self.clone(),
            key,
            download: download.clone(),
            outcome: Some(Err(FetchFailure::Died)),
        };
        tokio::spawn(async move {
            let this = guard.fetches.clone();
            let outcome = async {
                let _slot = this
                    .slots
                    .acquire(upstream.config.response_timeout.0)
                    .await
                    .map_err(FetchFailure::Upstream)?;
                this.run(&guard.download, writer, &upstream, &repo, digest)
                    .await
            }
            .await;
            if let Err(e) = &outcome {
                tracing::warn!(%digest, upstream = %upstream.key, %repo, reason = e.reason(), error = %e, "blob download failed");
            }
            guard.outcome.replace(outcome);
        });
        Ok(Attach::InFlight {
            download,
            joined: false,
        })
    }

    async fn run(
        &self,
        download: &Download,
        writer: BlobWriter,
        upstream: &Upstream,
        repo: &RepoName,
        digest: Digest,
    ) -> Result<(), FetchFailure> {
        let resp = upstream
            .blob(Method::GET, repo, &digest)
            .await
            .map_err(FetchFailure::Upstream)?;
        let total = content_length(resp.headers());
        download.progress.send_modify(|p| {
            p.state = State::Streaming;
            p.total = total;
        });
        let idle = upstream.config.response_timeout.0;
        let mut body = resp.into_body();
        // One write is in flight while the next batch is read from the upstream, so the
        // download never waits for the disk and the disk never waits for the network. The two
        // batch buffers take turns, so a download allocates them once.
        let mut batch = BytesMut::with_capacity(WRITE_BATCH);
        let mut spare: Option<BytesMut> = None;
        let mut in_flight: Option<tokio::task::JoinHandle<io::Result<(BlobWriter, BytesMut)>>> =
            None;
        let mut idle_writer = Some(writer);
        loop {
            // While a write is in flight, whichever comes first: its completion is published at
            // once (readers must not wait for the next upstream frame to see those bytes).
            let next = match in_flight.as_mut() {
                Some(write) => tokio::select! {
                    landed = write => Err(landed),
                    frame = tokio::time::timeout(idle, body.frame()) => Ok(frame),
                },
                None => Ok(tokio::time::timeout(idle, body.frame()).await),
            };
            let next = match next {
                Ok(frame) => frame,
                Err(landed) => {
                    in_flight = None;
                    let (writer, buf) = self.landed(download, landed, total)?;
                    (idle_writer, spare) = (Some(writer), Some(buf));
                    continue;
                }
            };
            let frame = match next {
                Err(_) => return Err(FetchFailure::Upstream(UpstreamError::Timeout)),
                Ok(None) => None,
                Ok(Some(Err(e))) => return Err(FetchFailure::Interrupted(e.to_string())),
                Ok(Some(Ok(frame))) => Some(frame),
            };
            let end = frame.is_none();
            if let Some(data) = frame.and_then(|f| f.into_data().ok()) {
                batch.extend_from_slice(&data);
                // Take whatever else is already buffered, so a fast upstream costs few syscalls
                // and a slow one is passed on at once.
                while batch.len() < WRITE_BATCH {
                    match body.frame().now_or_never() {
                        Some(Some(Ok(f))) => {
                            if let Ok(d) = f.into_data() {
                                batch.extend_from_slice(&d);
                            }
                        }
                        Some(Some(Err(e))) => return Err(FetchFailure::Interrupted(e.to_string())),
                        _ => break,
                    }
                }
            }
            if let Some(write) = in_flight.take() {
                let (writer, buf) = self.landed(download, write.await, total)?;
                (idle_writer, spare) = (Some(writer), Some(buf));
            }
            if !batch.is_empty() {
                let next = spare
                    .take()
                    .unwrap_or_else(|| BytesMut::with_capacity(WRITE_BATCH));
                let chunk = std::mem::replace(&mut batch, next);
                let Some(mut writer) = idle_writer.take() else {
                    return Err(FetchFailure::Io("blob writer lost".into()));
                };
                in_flight = Some(tokio::task::spawn_blocking(move || {
                    writer.write(&chunk).map(|()| (writer, chunk))
                }));
            }
            if end {
                break;
            }
        }
        if let Some(write) = in_flight.take() {
            idle_writer = Some(self.landed(download, write.await, total)?.0);
        }
        let Some(writer) = idle_writer else {
            return Err(FetchFailure::Io("blob writer lost".into()));
        };
        let written = writer.written();
        if let Some(expected) = total {
            if written != expected {
                return Err(FetchFailure::Truncated {
                    expected,
                    got: written,
                });
            }
        }
        if let Err(StoreError::DigestMismatch { expected, actual }) = writer.verify() {
            return Err(FetchFailure::Mismatch(format!(
                "upstream sent content with digest {actual}, not {expected}"
            )));
        }
        // Readers may finish now: their bytes are verified. The fsync and rename that make the
        // blob a cache entry need not hold them up.
        download.progress.send_modify(|p| p.state = State::Verified);
        let committed = tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| FetchFailure::Io(e.to_string()))?;
        match committed {
            Ok(len) => {
                self.disk.added(digest, len);
                Ok(())
            }
            Err(e) => Err(FetchFailure::Io(e.to_string())),
        }
    }

    /// Publishes the progress a finished write made.
    fn landed(
        &self,
        download: &Download,
        write: Result<io::Result<(BlobWriter, BytesMut)>, tokio::task::JoinError>,
        total: Option<u64>,
    ) -> Result<(BlobWriter, BytesMut), FetchFailure> {
        let (writer, mut buf) = write
            .map_err(|e| FetchFailure::Io(e.to_string()))?
            .map_err(|e| FetchFailure::Io(e.to_string()))?;
        let written = writer.written();
        if let Some(expected) = total.filter(|&t| written > t) {
            return Err(FetchFailure::Truncated {
                expected,
                got: written,
            });
        }
        let before = download.progress.borrow().written;
        self.upstream_bytes
            .fetch_add(written - before, Ordering::Relaxed);
        download.progress.send_modify(|p| p.written = written);
        if download.readers.load(Ordering::Acquire) == 0
            && total.unwrap_or(written) > self.max_orphan
        {
            return Err(FetchFailure::Abandoned);
        }
        buf.clear();
        Ok((writer, buf))
    }
}

impl Download {
    /// Waits for the upstream's headers: the total length, if it sent one.
    pub async fn ready(&self) -> Result<Option<u64>, FetchFailure> {
        let mut rx = self.progress.subscribe();
        loop {
            let p = rx.borrow_and_update().clone();
            match p.state {
                State::Connecting => {}
                State::Failed(e) => return Err(e),
                State::Streaming | State::Verified | State::Done => {
                    return Ok(p
                        .total
                        .or(if matches!(p.state, State::Verified | State::Done) {
                            Some(p.written)
                        } else {
                            None
                        }))
                }
            }
            if rx.changed().await.is_err() {
                return Err(FetchFailure::Io("download task vanished".into()));
            }
        }
    }

    /// Bytes `pos..pos + len`, already written and within one window, from a mapping of that
    /// window shared with the other readers.
    ///
    /// These bytes were written moments ago and are still in memory, so this runs on the
    /// reader's own thread: mapping them costs less than handing the work to another one.
    fn follow_piece(&self, pos: u64, len: usize) -> io::Result<Bytes> {
        let index = pos / FOLLOW_WINDOW;
        let base = index * FOLLOW_WINDOW;
        let map = {
            let mut windows = lock(&self.windows);
            let shared = windows
                .iter()
                .find(|(i, _)| *i == index)
                .and_then(|(_, w)| w.upgrade());
            match shared {
                Some(map) => map,
                None => {
                    // SAFETY: as in `map_now`. The window may reach past what has been written
                    // (and past the end of the file); only written bytes are ever read.
                    let map = unsafe {
                        MmapOptions::new()
                            .offset(base)
                            .len(FOLLOW_WINDOW as usize)
                            .map(&*self.file)?
                    };
                    let map = Arc::new(map);
                    windows.retain(|(_, w)| w.strong_count() > 0);
                    if windows.len() >= FOLLOW_WINDOWS_KEPT {
                        windows.remove(0);
                    }
                    windows.push((index, Arc::downgrade(&map)));
                    map
                }
            }
        };
        let start = (pos - base) as usize;
        if map.advise_range(Advice::PopulateRead, start, len).is_err() {
            return read_now(&self.file, pos, len);
        }
        Ok(Bytes::from_owner(Window {
            map,
            range: start..start + len,
        }))
    }

    /// A body stream of bytes `start..end` (`end` None: to the end), as they become available;
    /// with `verified_only`, none before the whole blob is verified.
    pub fn reader(
        self: &Arc<Self>,
        start: u64,
        end: Option<u64>,
        verified_only: bool,
        pages: Pages,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.readers.fetch_add(1, Ordering::AcqRel);
        let guard = ReaderGuard(self.clone());
        let rx = self.progress.subscribe();
        futures_util::stream::try_unfold(
            (guard, rx, start, BytesMut::new()),
            move |(guard, mut rx, pos, mut buf)| async move {
                loop {
                    let p = rx.borrow_and_update().clone();
                    if let State::Failed(e) = &p.state {
                        return Err(io::Error::other(e.to_string()));
                    }
                    // The last byte is held back until the digest is verified: with a declared
                    // Content-Length, a client holding every byte takes the body as complete, so
                    // a mismatch must still be able to cut the transfer short.
                    let verified = matches!(p.state, State::Verified | State::Done);
                    let available = match p.total {
                        _ if verified_only && !verified => 0,
                        Some(total) if !verified => p.written.min(total.saturating_sub(1)),
                        _ => p.written,
                    };
                    let limit = match end {
                        Some(end) => end.min(available),
                        None => available,
                    };
                    if pos < limit {
                        let window_end = (pos / FOLLOW_WINDOW + 1) * FOLLOW_WINDOW;
                        let len = (limit.min(window_end) - pos) as usize;
                        let chunk = match pages {
                            Pages::Mapped => guard.0.follow_piece(pos, len)?,
                            // Written moments ago, so in memory: read on this thread.
                            Pages::Copied => {
                                read_into(&guard.0.file, pos, len.min(COPY_CHUNK), &mut buf)?
                            }
                        };
                        let next = pos + chunk.len() as u64;
                        return Ok(Some((chunk, (guard, rx, next, buf))));
                    }
                    if verified || end.is_some_and(|e| pos >= e) {
                        return Ok(None);
                    }
                    if rx.changed().await.is_err() {
                        return Err(io::Error::other("download task vanished"));
                    }
                }
            },
        )
    }
}

struct ReaderGuard(Arc<Download>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A body stream of bytes `start..end` of a complete file.
pub fn file_reader(
    file: File,
    start: u64,
    end: u64,
    pages: Pages,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let file = Arc::new(file);
    futures_util::stream::try_unfold((start, BytesMut::new()), move |(pos, mut buf)| {
        let file = file.clone();
        async move {
            if pos >= end {
                return Ok(None);
            }
            let len = (end - pos).min(READ_CHUNK as u64) as usize;
            let chunk = match pages {
                Pages::Copied => {
                    let len = len.min(COPY_CHUNK);
                    let (chunk, back) = tokio::task::spawn_blocking(move || {
                        read_into(&file, pos, len, &mut buf).map(|c| (c, buf))
                    })
                    .await
                    .map_err(io::Error::other)??;
                    buf = back;
                    chunk
                }
                Pages::Mapped => match map_if_resident(&file, pos, len)? {
                    Some(chunk) => chunk,
                    None => map_at(file, pos, len).await?,
                },
            };
            if chunk.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob shorter than its length",
                ));
            }
            let next = pos + chunk.len() as u64;
            Ok(Some((chunk, (next, buf))))
        }
    })
}

/// Maps bytes `pos..pos + len` of `file` and hands them out as `Bytes` that unmap when the
/// connection has sent them.
///
/// A mapping instead of a read: the bytes go from the page cache to the socket (or to the TLS
/// encrypter) without a copy into a buffer of ours, with no buffer to allocate and zero, and the
/// pages leave berth's memory as soon as the chunk is sent. The pages are read in here, on a
/// blocking thread, so a page that is not in memory never stalls a runtime thread; and they are
/// read in with `MADV_POPULATE_READ`, which reports a failing disk as an error where touching
/// the mapping would kill the process (SIGBUS). Where that is unavailable (Linux before 5.14),
/// the piece is read into a buffer instead.
async fn map_at(file: Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || map_now(&file, pos, len))
        .await
        .map_err(io::Error::other)?
}

/// How much of `pos..pos + len` lies within the file: a mapping past its end faults (SIGBUS)
/// when read, so nothing is ever mapped there.
fn within_file(file: &File, pos: u64, len: usize) -> io::Result<usize> {
    let file_len = file.metadata()?.len();
    Ok(len.min(file_len.saturating_sub(pos) as usize))
}

/// [`map_at`] on the calling thread.
fn map_now(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let len = within_file(file, pos, len)?;
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: a mapping is only sound while nobody shrinks or rewrites the mapped range. berth
    // never does either to a blob file: cache entries and private blobs are written to a temp
    // file and renamed into place, then only ever unlinked (eviction, gc, fsck --repair), which
    // leaves existing mappings intact; a download's temp file only grows, and its readers map
    // only what has already been written.
    let map = unsafe { MmapOptions::new().offset(pos).len(len).map(file)? };
    match map.advise(Advice::PopulateRead) {
        Ok(()) => Ok(Bytes::from_owner(map)),
        Err(_) => {
            drop(map);
            read_now(file, pos, len)
        }
    }
}

/// [`map_at`] on the calling thread when every page of the piece is in memory already, so
/// nothing can wait for the disk: a cache hit on a blob read recently then needs no hand-off to
/// the blocking pool (two thread wake-ups per piece). `None` when some page is not in memory.
fn map_if_resident(file: &File, pos: u64, len: usize) -> io::Result<Option<Bytes>> {
    let len = within_file(file, pos, len)?;
    if len == 0 {
        return Ok(Some(Bytes::new()));
    }
    // mincore wants a page-aligned address: map from the page that holds `pos`.
    let page = page_size();
    let base = pos - pos % page as u64;
    let skip = (pos - base) as usize;
    // SAFETY: as in `map_now`.
    let map = unsafe { MmapOptions::new().offset(base).len(skip + len).map(file)? };
    let mut present = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping that starts on a page boundary (`base` is aligned), and
    // `present` has one byte for each of its pages, as mincore(2) requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            present.as_mut_ptr(),
        )
    };
    if rc != 0 || present.iter().any(|p| p & 1 == 0) {
        return Ok(None);
    }
    if map.advise(Advice::PopulateRead).is_err() {
        return Ok(None);
    }
    Ok(Some(Bytes::from_owner(Window {
        map: Arc::new(map),
        range: skip..skip + len,
    })))
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

/// Bytes `pos..pos + len` of `file` read into a buffer: where pages cannot be populated.
fn read_now(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0; len];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, pos)?;
    buf.truncate(n);
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file shorter than expected",
        ));
    }
    Ok(Bytes::from(buf))
}

/// Bytes `pos..pos + len` of `file` read with `pread` into `buf`'s free space, without zeroing
/// it first. The piece is split off as `Bytes`; once the connection has dropped it, the next
/// read reuses the same memory, so a long body costs no allocation (and no page faults) per
/// piece.
fn read_into(file: &File, pos: u64, len: usize, buf: &mut BytesMut) -> io::Result<Bytes> {
    buf.clear();
    buf.reserve(len);
    let spare = buf.spare_capacity_mut();
    let len = len.min(spare.len());
    // SAFETY: `spare` is `len` or more writable bytes that `buf` owns; pread writes at most
    // `len` of them and reports how many, and only that many are marked initialised below.
    let n = unsafe {
        libc::pread(
            std::os::fd::AsRawFd::as_raw_fd(file),
            spare.as_mut_ptr().cast(),
            len,
            pos as libc::off_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file shorter than expected",
        ));
    }
    // SAFETY: pread initialised the first `n` (<= `len`) bytes of the spare capacity.
    unsafe { buf.set_len(n as usize) };
    Ok(buf.split().freeze())
}

/// A piece of a mapping (shared by several readers, or aligned below the piece), as the owner
/// of a `Bytes`.
struct Window {
    map: Arc<Mmap>,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// Runs one future per key at a time; callers with the same key share its result. The future
/// runs as its own task, so it finishes even if the caller that started it goes away.
pub struct SingleFlight<K, V> {
    map: Arc<FlightMap<K, V>>,
    /// Calls that joined a flight already running.
    pub joined: AtomicU64,
}

/// A single-flight task ended without a result (it panicked): every caller gets this, and the
/// next call starts afresh.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the shared upstream request died")]
pub struct FlightDied;

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            map: Arc::new(Mutex::new(HashMap::new())),
            joined: AtomicU64::new(0),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Returns the shared result and whether this call joined a flight that was already running.
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (Result<V, FlightDied>, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (shared, joined) = {
            let mut map = lock(&self.map);
            match map.get(&key) {
                Some(s) => {
                    self.joined.fetch_add(1, Ordering::Relaxed);
                    (s.clone(), true)
                }
                None => {
                    let fut = make();
                    let landing = FlightKey {
                        map: Arc::downgrade(&self.map),
                        key: Some(key.clone()),
                    };
                    let handle = tokio::spawn(async move {
                        let _landing = landing;
                        fut.await
                    });
                    let shared = async move {
                        handle.await.map_err(|e| {
                            tracing::warn!(error = %e, "a shared upstream request died");
                            FlightDied
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(key, shared.clone());
                    (shared, false)
                }
            }
        };
        (shared.await, joined)
    }
}

type FlightMap<K, V> = Mutex<HashMap<K, Shared<BoxFuture<'static, Result<V, FlightDied>>>>>;

/// Frees a flight's key when its task ends, also when it panics or is cancelled.
struct FlightKey<K: Hash + Eq, V> {
    map: Weak<FlightMap<K, V>>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for FlightKey<K, V> {
    fn drop(&mut self) {
        if let (Some(map), Some(key)) = (self.map.upgrade(), self.key.take()) {
            lock(&map).remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    #[test]
    fn a_download_whose_task_dies_fails_its_readers_and_frees_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let fetches = Arc::new(Fetches::new(
            Arc::new(DiskCache::open(store, 1 << 30).unwrap()),
            1 << 30,
        ));
        // An upstream that accepts connections and never answers: the task waits forever.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let upstream = Arc::new(
            Upstream::new(
                "test",
                &crate::config::UpstreamConfig::new(
                    crate::config::UpstreamUrl::parse(&url).unwrap(),
                ),
            )
            .unwrap(),
        );
        let digest = Digest::of(b"never arrives");
        let repo = RepoName::parse("library/x").unwrap();
        let doomed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let download = doomed.block_on(async {
            match fetches.attach(upstream, repo, digest).unwrap() {
                Attach::InFlight { download, .. } => download,
                Attach::Cached => panic!("nothing is cached"),
            }
        });
        assert_eq!(fetches.in_flight(), 1);
        // The runtime goes away with the task in it, as a panic or a shutdown would end it.
        drop(doomed);
        assert_eq!(fetches.in_flight(), 0, "the dead download keeps its slot");
        assert_eq!(fetches.failures(), vec![("task_died", 1)]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ready = tokio::time::timeout(std::time::Duration::from_secs(5), download.ready())
                .await
                .expect("a reader of a dead download must not wait forever");
            assert!(matches!(ready, Err(FetchFailure::Died)));
            let body: io::Result<Vec<Bytes>> = download
                .reader(0, None, false, Pages::Mapped)
                .try_collect()
                .await;
            assert!(body.is_err());
        });
    }

    #[tokio::test]
    async fn a_single_flight_that_panics_fails_its_callers_and_the_next_call_runs_anew() {
        let flights: SingleFlight<&str, u32> = SingleFlight::default();
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let first = flights.run("k", move || async move {
            g.notified().await;
            panic!("boom")
        });
        let second = flights.run("k", || async { 7 });
        let opener = async {
            tokio::task::yield_now().await;
            gate.notify_one();
        };
        let ((a, a_joined), (b, b_joined), ()) = tokio::join!(first, second, opener);
        assert!(a.is_err() && b.is_err());
        assert!(!a_joined && b_joined);
        let (c, joined) = flights.run("k", || async { 7 }).await;
        assert_eq!(c.unwrap(), 7);
        assert!(!joined);
    }

    #[tokio::test]
    async fn file_reader_returns_exactly_the_range_across_chunks() {
        // Neither the start nor the end on a page or chunk boundary, and longer than two chunks.
        let len = 2 * READ_CHUNK + 12_345;
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &content).unwrap();
        for (start, end) in [(0, len), (4097, len - 3), (READ_CHUNK - 1, READ_CHUNK + 1)] {
            for pages in [Pages::Mapped, Pages::Copied] {
                let chunks: Vec<Bytes> =
                    file_reader(file.try_clone().unwrap(), start as u64, end as u64, pages)
                        .try_collect()
                        .await
                        .unwrap();
                assert!(chunks.iter().all(|c| c.len() <= READ_CHUNK));
                assert_eq!(
                    chunks.concat(),
                    &content[start..end],
                    "range {start}..{end}, {pages:?}"
                );
            }
        }
    }

    #[test]
    fn every_way_of_reading_a_piece_gives_the_same_bytes() {
        let content: Vec<u8> = (0..300_000).map(|i| (i % 253) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &content).unwrap();
        for (pos, len) in [
            (0, 300_000),
            (4095, 10_000),
            (123_457, 100_000),
            (299_999, 1),
        ] {
            let want = &content[pos..pos + len];
            let pos64 = pos as u64;
            assert_eq!(&map_now(&file, pos64, len).unwrap()[..], want);
            assert_eq!(&read_now(&file, pos64, len).unwrap()[..], want);
            // Just written, so in memory.
            let resident = map_if_resident(&file, pos64, len).unwrap();
            assert_eq!(
                &resident.expect("pages just written are in memory")[..],
                want
            );
        }
        // Past the end: nothing, not a mapping that would fault.
        assert!(map_now(&file, 300_000, 10).unwrap().is_empty());
        assert!(map_if_resident(&file, 300_001, 10)
            .unwrap()
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn file_reader_fails_on_a_file_shorter_than_its_length() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &[7u8; 1000]).unwrap();
        for pages in [Pages::Mapped, Pages::Copied] {
            let got: io::Result<Vec<Bytes>> =
                file_reader(file.try_clone().unwrap(), 0, 2000, pages)
                    .try_collect()
                    .await;
            assert_eq!(
                got.unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof,
                "a short file must end the body with an error, never a fault or a short 200"
            );
        }
    }
}
