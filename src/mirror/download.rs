//! One download in flight as its readers see it: its progress, the batches kept in memory, the
//! staging file behind them, and the body stream each reader gets (see `fetch` for how a
//! download is run).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::watch;

use crate::lock;
use crate::mirror::upstream::UpstreamError;
use crate::store::pages::{self, Pages};

/// Batches a download keeps in memory for its readers: a reader within this many batches of
/// the download is served from memory, one further behind from the file.
pub(super) const BATCHES_KEPT: usize = 4;

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
pub(super) enum State {
    /// Waiting for the upstream's response headers.
    Connecting,
    Streaming,
    /// Every byte is written and matches the digest; the blob is being made durable.
    Verified,
    Done,
    Failed(FetchFailure),
}

#[derive(Debug, Clone)]
pub(super) struct Progress {
    pub(super) state: State,
    /// Bytes in the staging file.
    pub(super) written: u64,
    /// Bytes received: the ones past `written` are in the batches kept in memory.
    pub(super) received: u64,
    pub(super) total: Option<u64>,
}

/// One download in flight.
pub struct Download {
    /// The repository the first request named (for the status page).
    pub(super) repo: crate::oci::names::RepoName,
    pub(super) progress: watch::Sender<Progress>,
    pub(super) readers: AtomicUsize,
    /// The bytes written so far, shared by the readers.
    pub(super) written: pages::Growing,
    /// The last batches, by offset: readers keeping up are served these (a slice shares the
    /// memory), sparing them a mapping or a read of what was written a moment ago.
    pub(super) recent: Mutex<std::collections::VecDeque<(u64, Bytes)>>,
}

impl Download {
    /// Keeps a batch (bytes `at..`) for the readers, dropping the oldest kept one.
    pub(super) fn keep(&self, at: u64, batch: Bytes) {
        let mut recent = lock(&self.recent);
        if recent.len() == BATCHES_KEPT {
            recent.pop_front();
        }
        recent.push_back((at, batch));
    }

    /// Bytes from `pos` up to `limit` out of a kept batch, if one holds `pos`.
    fn kept(&self, pos: u64, limit: u64) -> Option<Bytes> {
        if pos >= limit {
            return None;
        }
        let recent = lock(&self.recent);
        let (at, batch) = recent
            .iter()
            .find(|(at, b)| *at <= pos && pos < at + b.len() as u64)?;
        let from = (pos - at) as usize;
        let to = (limit - at).min(batch.len() as u64) as usize;
        Some(batch.slice(from..to))
    }

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

    /// Waits until the download has ended: its blob is a cache entry, or it failed. The
    /// returned guard counts as a reader while held, so a download nobody else reads is not
    /// abandoned as an orphan (see `max_orphan_download`): hold it across the wait.
    pub fn hold(self: &Arc<Self>) -> Holder {
        self.readers.fetch_add(1, Ordering::AcqRel);
        Holder(ReaderGuard(self.clone()))
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
                    let reachable = p.received.max(p.written);
                    let available = match p.total {
                        _ if verified_only && !verified => 0,
                        Some(total) if !verified => reachable.min(total.saturating_sub(1)),
                        _ => reachable,
                    };
                    let limit = match end {
                        Some(end) => end.min(available),
                        None => available,
                    };
                    // Bytes past `written` are always kept in memory (a download keeps more batches
                    // than it has writes in flight); older ones come from the file.
                    let piece = match guard.0.kept(pos, limit) {
                        Some(chunk) => Some(chunk),
                        None if pos < limit.min(p.written) => Some(guard.0.written.piece(
                            pos,
                            limit.min(p.written),
                            pages,
                            &mut buf,
                        )?),
                        None => None,
                    };
                    if let Some(chunk) = piece {
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

/// A reader that reads nothing: it keeps a download going and waits for its end.
pub struct Holder(ReaderGuard);

impl Holder {
    /// Waits for the download's end: Ok once its blob is in the cache.
    pub async fn finished(&self) -> Result<(), FetchFailure> {
        let mut rx = self.0 .0.progress.subscribe();
        loop {
            match &rx.borrow_and_update().state {
                State::Done => return Ok(()),
                State::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(FetchFailure::Io("download task vanished".into()));
            }
        }
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
    }
}
