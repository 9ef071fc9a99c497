//! The fetch coordinator: one upstream download per missing blob, streamed to every reader.
//!
//! The first request for a missing blob starts a download task that receives it in batches,
//! keeps the last few in memory, and hands them to a sink thread that writes them into a
//! staging file of the store and hashes them; both publish their progress on a `watch` channel.
//! Every request for the same blob — the first one included — reads from byte 0 at its own
//! pace, woken by progress notifications: from the batches in memory while it keeps up, from
//! the staging file when it falls behind, never past what was received, and never the last byte
//! before the whole blob is verified. The task belongs to no client: a client that goes away
//! does not stop it (unless nobody is left and the blob is larger than the orphan limit). Only a
//! verified blob becomes a cache entry; on any failure every reader's body ends with an error, so
//! clients see a broken transfer and never a complete wrong body.

use crate::lock;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::Method;
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::mirror::cache::DiskCache;
pub use crate::mirror::download::{Download, FetchFailure};
use crate::mirror::download::{Progress, State, BATCHES_KEPT};
use crate::mirror::slots::UpstreamSlots;
use crate::mirror::upstream::{content_length, Upstream, UpstreamError};
use crate::oci::names::{Digest, RepoName};
use crate::store::{Area, BlobWriter, StoreError};

/// Upstream frames are coalesced into writes of up to this size when they arrive faster than disk.
const WRITE_BATCH: usize = 1 << 20;

/// Batches received but not yet written a download may hold: beyond this, receiving waits
/// for the disk.
const SINK_QUEUE: usize = 2;

/// A download's writes, on a thread of its own: each batch written and hashed in order, and
/// the progress published for the readers. Ends when the download stops sending.
fn sink(
    mut writer: BlobWriter,
    mut batches: tokio::sync::mpsc::Receiver<Bytes>,
    download: &Download,
) -> io::Result<BlobWriter> {
    while let Some(batch) = batches.blocking_recv() {
        writer.write(&batch)?;
        let written = writer.written();
        download.progress.send_modify(|p| p.written = written);
    }
    Ok(writer)
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

/// A download under way as the status page lists it.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub upstream: String,
    pub digest: Digest,
    pub repo: RepoName,
    /// Bytes received so far, and the length the upstream announced.
    pub received: u64,
    pub total: Option<u64>,
    /// Requests reading it now.
    pub readers: usize,
}

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

    /// The downloads under way (at most `limit` of them, by upstream and digest), with their
    /// progress, for the status page.
    pub fn list(&self, limit: usize) -> Vec<InFlight> {
        let inflight = lock(&self.inflight);
        let mut keys: Vec<&DownloadKey> = inflight.keys().collect();
        keys.sort();
        keys.truncate(limit);
        keys.into_iter()
            .filter_map(|k| {
                let d = inflight.get(k)?;
                let p = d.progress.borrow();
                Some(InFlight {
                    upstream: k.0.clone(),
                    digest: k.1,
                    repo: d.repo.clone(),
                    received: p.received,
                    total: p.total,
                    readers: d.readers.load(Ordering::Relaxed),
                })
            })
            .collect()
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
        // Checked under the lock: a download puts its blob in place (here, on this machine)
        // before it leaves the map, so a blob that is in neither place is really missing. Only
        // what this berth holds is looked at: the caller asked the whole store before the lock
        // (which may take a request over the network).
        if self
            .disk
            .store()
            .blob_len_held(Area::Cache, &digest)?
            .is_some()
        {
            return Ok(Attach::Cached);
        }
        let writer = self.disk.store().begin_blob(Area::Cache, digest)?;
        let (progress, _) = watch::channel(Progress {
            state: State::Connecting,
            written: 0,
            received: 0,
            total: None,
        });
        let download = Arc::new(Download {
            repo: repo.clone(),
            written: writer.follow(),
            recent: Mutex::new(std::collections::VecDeque::with_capacity(BATCHES_KEPT)),
            progress,
            readers: AtomicUsize::new(0),
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
                tracing::warn!(%digest, upstream = %upstream.name, %repo, reason = e.reason(), error = %e, "blob download failed");
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
        download: &Arc<Download>,
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
        // The network and the disk never wait for each other: batches go to a thread of the
        // download's own that writes and hashes them in order (a few batches ahead at most:
        // the channel's bound is the back-pressure), while the next one is received. Each
        // batch is also kept in memory for the readers (see `recent`), who need not wait for
        // the disk.
        let (to_sink, from_task) = tokio::sync::mpsc::channel::<Bytes>(SINK_QUEUE);
        let sink = {
            let download = download.clone();
            tokio::task::spawn_blocking(move || sink(writer, from_task, &download))
        };
        // Whatever ends the receiving, the sink is stopped and waited for before this returns:
        // a failed download's staging file is gone by the time its readers hear of it.
        let received = async {
            let mut batch = BytesMut::with_capacity(WRITE_BATCH);
            let mut submitted = 0u64;
            let mut end = false;
            while !end {
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => return Err(FetchFailure::Upstream(UpstreamError::Timeout)),
                    Ok(None) => end = true,
                    Ok(Some(Err(e))) => return Err(FetchFailure::Interrupted(e.to_string())),
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            batch.extend_from_slice(&data);
                        }
                        // Take whatever else is already buffered, so a fast upstream costs few
                        // wake-ups and a slow one is passed on at once.
                        while batch.len() < WRITE_BATCH {
                            match body.frame().now_or_never() {
                                Some(Some(Ok(f))) => {
                                    if let Ok(d) = f.into_data() {
                                        batch.extend_from_slice(&d);
                                    }
                                }
                                Some(Some(Err(e))) => {
                                    return Err(FetchFailure::Interrupted(e.to_string()))
                                }
                                Some(None) => {
                                    end = true;
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let chunk =
                    std::mem::replace(&mut batch, BytesMut::with_capacity(WRITE_BATCH)).freeze();
                let len = chunk.len() as u64;
                if let Some(expected) = total.filter(|&t| submitted + len > t) {
                    return Err(FetchFailure::Truncated {
                        expected,
                        got: submitted + len,
                    });
                }
                download.keep(submitted, chunk.clone());
                submitted += len;
                self.upstream_bytes.fetch_add(len, Ordering::Relaxed);
                download.progress.send_modify(|p| p.received = submitted);
                if download.readers.load(Ordering::Acquire) == 0
                    && total.unwrap_or(submitted) > self.max_orphan
                {
                    return Err(FetchFailure::Abandoned);
                }
                if to_sink.send(chunk).await.is_err() {
                    // The sink stopped: its error says why.
                    break;
                }
            }
            Ok::<(), FetchFailure>(())
        }
        .await;
        drop(to_sink);
        let sunk = sink.await;
        received?;
        let writer = sunk
            .map_err(|e| FetchFailure::Io(e.to_string()))?
            .map_err(|e| FetchFailure::Io(e.to_string()))?;
        let written = writer.written();
        if let Some(expected) = total {
            if written != expected {
                return Err(FetchFailure::Truncated {
                    expected,
                    got: written,
                });
            }
        }
        match writer.verify() {
            Ok(()) => {}
            Err(StoreError::DigestMismatch { expected, actual }) => {
                return Err(FetchFailure::Mismatch(format!(
                    "upstream sent content with digest {actual}, not {expected}"
                )))
            }
            Err(StoreError::Io(e)) => return Err(FetchFailure::Io(e.to_string())),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pages::Pages;
    use futures_util::TryStreamExt;

    #[test]
    fn a_download_whose_task_dies_fails_its_readers_and_frees_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::disk::DiskStore::open(dir.path())
            .unwrap()
            .shared();
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
}
