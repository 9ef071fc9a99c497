//! The private namespace's state: its repositories' links (through the store), the webhooks
//! told about pushes and deletes, the locks that keep a repository's tag and manifest changes
//! atomic, and the count of open upload sessions per user (with their expiry).
//!
//! The HTTP side of the private namespace (the push API, private pulls, listings) is
//! `http::private`.

pub mod webhook;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::oci::names::RepoName;
use crate::oci::routes::UploadId;
use crate::registry::webhook::Notifier;
use crate::store::blocking;
use crate::store::private::PrivateStore;
use crate::store::Store;

/// Async locks by key, made on demand; an entry goes once nobody holds or waits for its lock.
struct KeyedLocks<K> {
    locks: Mutex<HashMap<K, Weak<tokio::sync::Mutex<()>>>>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLocks<K> {
    fn new() -> Self {
        KeyedLocks {
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn handle(&self, key: &K) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if locks.len() > 256 {
            locks.retain(|_, w| w.strong_count() > 0);
        }
        match locks.get(key).and_then(Weak::upgrade) {
            Some(m) => m,
            None => {
                let m = Arc::new(tokio::sync::Mutex::new(()));
                locks.insert(key.clone(), Arc::downgrade(&m));
                m
            }
        }
    }

    async fn lock(&self, key: &K) -> tokio::sync::OwnedMutexGuard<()> {
        self.handle(key).lock_owned().await
    }

    /// The lock, unless someone holds it.
    fn try_lock(&self, key: &K) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.handle(key).try_lock_owned().ok()
    }
}

/// An upload session the server counts against its owner.
struct OpenUpload {
    /// `None` for sessions started by versions that did not record one: they expire like any
    /// other but count against nobody.
    owner: Option<Arc<str>>,
    /// When the session's directory was known to exist; `None` while it is being made.
    created: Option<Instant>,
}

/// The open upload sessions, by id and by owner.
#[derive(Default)]
struct OpenUploads {
    by_id: HashMap<UploadId, OpenUpload>,
    per_user: HashMap<Arc<str>, usize>,
}

impl OpenUploads {
    fn insert(&mut self, id: UploadId, upload: OpenUpload) {
        if let Some(owner) = &upload.owner {
            *self.per_user.entry(owner.clone()).or_default() += 1;
        }
        if let Some(old) = self.by_id.insert(id, upload) {
            self.uncount(old.owner);
        }
    }

    fn remove(&mut self, id: &UploadId) -> Option<OpenUpload> {
        let upload = self.by_id.remove(id)?;
        self.uncount(upload.owner.clone());
        Some(upload)
    }

    fn uncount(&mut self, owner: Option<Arc<str>>) {
        let Some(owner) = owner else { return };
        if let Some(n) = self.per_user.get_mut(&owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(&owner);
            }
        }
    }

    fn count(&self, user: &str) -> usize {
        self.per_user.get(user).copied().unwrap_or(0)
    }
}

/// State of the private registry shared by all requests.
pub struct Registry {
    pub store: PrivateStore,
    pub webhooks: Notifier,
    /// One lock per upload session in use, so chunks of one upload are written in order.
    upload_locks: KeyedLocks<UploadId>,
    /// One lock per repository, held across manifest pushes and deletes of manifests, tags and
    /// blobs, so that a tag push and a delete of the manifest it names cannot interleave (and
    /// leave a tag naming a manifest the repository no longer has). Adding a blob link needs
    /// no lock: it cannot break what a manifest push checked.
    repo_locks: KeyedLocks<RepoName>,
    uploads: Mutex<OpenUploads>,
    pub(crate) max_uploads_per_user: usize,
    pub(crate) upload_max_age: Duration,
    /// Upload starts refused by `max_uploads_per_user`.
    pub uploads_refused: AtomicU64,
    /// Upload sessions the server removed for being idle longer than `upload_max_age`.
    pub uploads_expired: AtomicU64,
}

impl Registry {
    /// Builds the registry and counts the upload sessions already on disk, so that a restart
    /// changes nothing about who may start more.
    pub fn new(config: &Config, store: Store) -> Registry {
        let store = PrivateStore::new(store);
        let mut uploads = OpenUploads::default();
        match store.uploads.infos() {
            Ok(infos) => {
                let now = Instant::now();
                for (id, info) in infos {
                    let upload = OpenUpload {
                        owner: info.owner.map(Arc::from),
                        created: Some(now),
                    };
                    uploads.insert(id, upload);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list upload sessions; they count against nobody until they end")
            }
        }
        Registry {
            store,
            webhooks: Notifier::new(&config.webhooks),
            upload_locks: KeyedLocks::new(),
            repo_locks: KeyedLocks::new(),
            uploads: Mutex::new(uploads),
            max_uploads_per_user: config.max_uploads_per_user,
            upload_max_age: config.upload_max_age.0,
            uploads_refused: AtomicU64::new(0),
            uploads_expired: AtomicU64::new(0),
        }
    }

    pub(crate) async fn lock_upload(&self, id: &UploadId) -> tokio::sync::OwnedMutexGuard<()> {
        self.upload_locks.lock(id).await
    }

    /// The repository's lock. Callers move the guard into the blocking closure doing the
    /// change, so it is held until the change is done even if the request is dropped meanwhile.
    pub(crate) async fn lock_repo(&self, repo: &RepoName) -> tokio::sync::OwnedMutexGuard<()> {
        self.repo_locks.lock(repo).await
    }

    fn open_uploads(&self) -> std::sync::MutexGuard<'_, OpenUploads> {
        self.uploads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Upload sessions open now.
    pub fn uploads_open(&self) -> usize {
        self.open_uploads().by_id.len()
    }

    /// Counts session `id` against `user`, unless that would take them over
    /// `max_uploads_per_user`; then returns how many they have open.
    pub(crate) fn reserve_upload(&self, user: &str, id: &UploadId) -> Result<(), usize> {
        let mut open = self.open_uploads();
        let n = open.count(user);
        if self.max_uploads_per_user > 0 && n >= self.max_uploads_per_user {
            return Err(n);
        }
        open.insert(
            id.clone(),
            OpenUpload {
                owner: Some(Arc::from(user)),
                created: None,
            },
        );
        Ok(())
    }

    pub(crate) fn upload_created(&self, id: &UploadId) {
        if let Some(u) = self.open_uploads().by_id.get_mut(id) {
            u.created = Some(Instant::now());
        }
    }

    /// The session ended (finished, cancelled, expired, or never made).
    pub(crate) fn forget_upload(&self, id: &UploadId) -> Option<Arc<str>> {
        self.open_uploads().remove(id).and_then(|u| u.owner)
    }

    /// Stops counting sessions made before `before` whose directory `exists` says is gone:
    /// `berth gc` removes sessions behind the server's back.
    pub(crate) fn forget_vanished(
        &self,
        before: Instant,
        exists: impl Fn(&UploadId) -> bool,
    ) -> usize {
        let mut open = self.open_uploads();
        let gone: Vec<UploadId> = open
            .by_id
            .iter()
            .filter(|(id, u)| u.created.is_some_and(|c| c < before) && !exists(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            open.remove(id);
        }
        gone.len()
    }

    /// The sessions counted against `user`, made before now.
    pub(crate) fn sessions_of(&self, user: &str) -> Vec<UploadId> {
        self.open_uploads()
            .by_id
            .iter()
            .filter(|(_, u)| u.owner.as_deref() == Some(user) && u.created.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// How often the server looks for idle upload sessions: a quarter of `upload_max_age`, so one
/// is removed at most a quarter late, but at most every 5 minutes and at least every 10 ms.
pub fn upload_expiry_interval(upload_max_age: Duration) -> Duration {
    (upload_max_age / 4).clamp(Duration::from_millis(10), Duration::from_secs(300))
}

/// Removes upload sessions idle for longer than `upload_max_age`, every
/// `upload_expiry_interval`, until `stopped` changes.
pub async fn expire_uploads(reg: Arc<Registry>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(upload_expiry_interval(reg.upload_max_age));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        expire_uploads_once(&reg).await;
    }
}

fn idle(now: SystemTime, last: SystemTime) -> Duration {
    now.duration_since(last).unwrap_or(Duration::ZERO)
}

/// One pass of `expire_uploads`; returns how many sessions it removed.
pub async fn expire_uploads_once(reg: &Registry) -> usize {
    let max_age = reg.upload_max_age;
    let scanned_at = Instant::now();
    let ps = reg.store.clone();
    let sessions = match blocking(move || ps.uploads.all()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list upload sessions to expire idle ones");
            return 0;
        }
    };
    let on_disk: std::collections::HashSet<UploadId> =
        sessions.iter().map(|(id, _, _)| id.clone()).collect();
    let vanished = reg.forget_vanished(scanned_at, |id| on_disk.contains(id));
    if vanished > 0 {
        tracing::debug!(
            sessions = vanished,
            "upload sessions removed by someone else (berth gc) are no longer counted"
        );
    }
    let now = SystemTime::now();
    let mut expired = 0;
    for (id, _, last) in sessions {
        if idle(now, last) < max_age {
            continue;
        }
        // A session whose lock is held is being written or finished: not idle.
        let Some(guard) = reg.upload_locks.try_lock(&id) else {
            continue;
        };
        let (ps, i) = (reg.store.clone(), id.clone());
        let removed = blocking(move || {
            let _guard = guard;
            // Looked at again under the lock: a chunk may have arrived since the listing.
            match ps.uploads.activity(&i)? {
                Some((size, last)) if idle(SystemTime::now(), last) >= max_age => {
                    ps.uploads.remove(&i)?;
                    Ok(Some((size, last)))
                }
                _ => Ok(None),
            }
        })
        .await;
        match removed {
            Ok(Some((size, last))) => {
                let owner = reg.forget_upload(&id);
                reg.uploads_expired.fetch_add(1, Ordering::Relaxed);
                expired += 1;
                tracing::info!(
                    upload = %id,
                    user = owner.as_deref().unwrap_or("-"),
                    bytes = size,
                    idle_s = idle(SystemTime::now(), last).as_secs(),
                    max_age_s = max_age.as_secs_f64(),
                    "removed an upload session idle for longer than upload_max_age"
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(upload = %id, error = %e, "cannot remove an idle upload session")
            }
        }
    }
    expired
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::names::RepoName;

    /// Makes an upload session look idle since `ago`.
    fn backdate(ps: &PrivateStore, id: &UploadId, ago: Duration) {
        let then = SystemTime::now() - ago;
        let dir = ps.uploads.data_path(id).parent().unwrap().to_path_buf();
        for f in ["data", "info"] {
            let file = std::fs::File::options()
                .write(true)
                .open(dir.join(f))
                .unwrap();
            file.set_modified(then).unwrap();
        }
        std::fs::File::open(&dir)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }

    #[tokio::test]
    async fn expiry_removes_idle_sessions_but_not_one_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.upload_max_age = crate::config::Seconds(Duration::from_secs(3600));
        let reg = Registry::new(
            &config,
            crate::store::disk::DiskStore::open(dir.path())
                .unwrap()
                .shared(),
        );
        let repo = RepoName::parse("private/app").unwrap();
        let (idle, busy, fresh) = (UploadId::new(), UploadId::new(), UploadId::new());
        for id in [&idle, &busy, &fresh] {
            reg.reserve_upload("alice", id).unwrap();
            reg.store.uploads.create(&repo, id, Some("alice")).unwrap();
            reg.upload_created(id);
        }
        backdate(&reg.store, &idle, Duration::from_secs(7200));
        backdate(&reg.store, &busy, Duration::from_secs(7200));
        // A chunk being written holds the session's lock, however old its files look.
        let writing = reg.lock_upload(&busy).await;
        assert_eq!(expire_uploads_once(&reg).await, 1);
        assert!(!reg.store.uploads.exists(&idle));
        assert!(reg.store.uploads.exists(&busy) && reg.store.uploads.exists(&fresh));
        assert_eq!(reg.uploads_open(), 2);
        drop(writing);
        assert_eq!(expire_uploads_once(&reg).await, 1);
        assert_eq!(reg.uploads_open(), 1);
        assert_eq!(reg.uploads_expired.load(Ordering::Relaxed), 2);
        // A session removed behind the server's back (berth gc) stops counting.
        reg.store.uploads.remove(&fresh).unwrap();
        assert_eq!(expire_uploads_once(&reg).await, 0);
        assert_eq!(reg.uploads_open(), 0);
        assert_eq!(
            upload_expiry_interval(Duration::from_secs(24 * 3600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            upload_expiry_interval(Duration::from_millis(200)),
            Duration::from_millis(50)
        );
    }
}
