//! The cache: the in-memory manifest layer, and the size bound on the disk cache.
//!
//! Manifests are small and asked for on every pull, so the hot ones live in a moka cache bounded
//! by bytes. Mirrored blobs and manifests on disk are bounded by `max_cache_size` and evicted least
//! recently used first. Last use is the file's mtime (touched at most once a minute per blob), so
//! it survives restarts without a database. Private content lives in the store's other area and
//! is never counted or evicted here; blobs with a reader holding a lease are skipped.

use crate::lock;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::oci::names::Digest;
use crate::store::lru::Lru;
use crate::store::{Area, Store};

/// Accounting and eviction for the cache area of the store.
pub struct DiskCache {
    store: Store,
    max: u64,
    lru: Mutex<Lru>,
    leases: Mutex<HashMap<Digest, usize>>,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Blobs used this recently (seconds) are never evicted: on a store shared by replicas,
    /// another replica may be reading them (its uses reach this one as recorded last uses).
    spare_recent: u64,
}

/// Reads the cache area's sizes and last uses into a recency order.
fn scan(store: &Store) -> io::Result<Lru> {
    let mut found: Vec<(u64, Digest, u64)> = store
        .blobs(Area::Cache)?
        .into_iter()
        .map(|b| (secs(b.last_used), b.digest, b.len))
        .collect();
    // Oldest first, so the recency order after a restart is the one before it.
    found.sort();
    let mut lru = Lru::default();
    for (used, digest, size) in found {
        lru.insert(digest, size, used);
    }
    Ok(lru)
}

impl DiskCache {
    /// Scans the cache area to learn sizes and last uses, and evicts what is over `max`.
    pub fn open(store: Store, max: u64) -> io::Result<DiskCache> {
        DiskCache::open_sparing(store, max, std::time::Duration::ZERO)
    }

    /// [`open`](Self::open) for a store shared by replicas: never evicts what was used in the
    /// last `recent` (another replica may be reading it; its uses reach this one as recorded
    /// last uses).
    pub fn open_sparing(
        store: Store,
        max: u64,
        recent: std::time::Duration,
    ) -> io::Result<DiskCache> {
        let lru = scan(&store)?;
        tracing::info!(
            entries = lru.len(),
            bytes = lru.total(),
            limit = max,
            "disk cache opened"
        );
        let cache = DiskCache {
            store,
            max,
            lru: Mutex::new(lru),
            leases: Mutex::new(HashMap::new()),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            spare_recent: recent.as_secs(),
        };
        cache.evict();
        Ok(cache)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn size(&self) -> u64 {
        lock(&self.lru).total()
    }

    pub fn limit(&self) -> u64 {
        self.max
    }

    /// Records a new blob in the cache area and evicts what no longer fits: on the blocking
    /// pool when there is one (removing may take requests over the network), else at once.
    pub fn added(self: &Arc<Self>, digest: Digest, size: u64) {
        let over = {
            let mut lru = lock(&self.lru);
            lru.insert(digest, size, now());
            lru.total() > self.max
        };
        if !over {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let me = self.clone();
                runtime.spawn_blocking(move || me.evict());
            }
            Err(_) => self.evict(),
        }
    }

    /// Marks a cached blob as used now.
    pub fn touch(&self, digest: &Digest) {
        let persist = lock(&self.lru).used(digest, now());
        if persist {
            self.store.mark_used(Area::Cache, digest);
        }
    }

    /// Keeps a blob from eviction while the lease lives.
    pub fn lease(self: &Arc<Self>, digest: Digest) -> Lease {
        *lock(&self.leases).entry(digest).or_insert(0) += 1;
        Lease {
            cache: self.clone(),
            digest,
        }
    }

    /// Reads the cache area again (what other replicas added and used since), then evicts
    /// what no longer fits, least recently used by any replica first.
    pub fn resync(&self) -> io::Result<()> {
        let fresh = scan(&self.store)?;
        let (entries, bytes) = (fresh.len(), fresh.total());
        *lock(&self.lru) = fresh;
        tracing::debug!(entries, bytes, "disk cache read again from the store");
        self.evict();
        Ok(())
    }

    /// Forgets a blob that was removed from disk by someone else (fsck).
    pub fn forget(&self, digest: &Digest) {
        lock(&self.lru).remove(digest);
    }

    fn evict(&self) {
        loop {
            let victim = {
                let lru = lock(&self.lru);
                if lru.total() <= self.max {
                    return;
                }
                let leases = lock(&self.leases);
                let now = now();
                let victim = lru.oldest_first().find(|d| {
                    !leases.contains_key(d)
                        && lru
                            .last_used(d)
                            .is_some_and(|t| now.saturating_sub(t) >= self.spare_recent)
                });
                victim
            };
            let Some(digest) = victim else {
                tracing::warn!("disk cache over its limit, but every entry is in use");
                return;
            };
            let size = lock(&self.lru).remove(&digest).unwrap_or(0);
            let _ = self.store.remove_manifest_type(Area::Cache, &digest);
            if let Err(e) = self.store.remove_blob(Area::Cache, &digest) {
                tracing::warn!(%digest, error = %e, "eviction could not remove blob");
            }
            self.evictions.fetch_add(1, Ordering::Relaxed);
            self.evicted_bytes.fetch_add(size, Ordering::Relaxed);
            tracing::info!(%digest, size, cache_bytes = self.size(), limit = self.max, "evicted from disk cache");
        }
    }
}

pub struct Lease {
    cache: Arc<DiskCache>,
    digest: Digest,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = lock(&self.cache.leases);
        if let Some(n) = leases.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                leases.remove(&self.digest);
            }
        }
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn now() -> u64 {
    secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::disk::DiskStore;

    fn blob(store: &Store, seed: u8, len: usize) -> Digest {
        let bytes = vec![seed; len];
        let d = Digest::of(&bytes);
        store.put_blob(Area::Cache, d, &bytes).unwrap();
        d
    }

    #[test]
    fn evicts_least_recently_used_first_and_skips_leased_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap().shared();
        let cache = Arc::new(DiskCache::open(store.clone(), 300).unwrap());
        let (a, b, c) = (
            blob(&store, 1, 100),
            blob(&store, 2, 100),
            blob(&store, 3, 100),
        );
        for d in [a, b, c] {
            cache.added(d, 100);
        }
        cache.touch(&a);
        let lease_b = cache.lease(b);
        let e = blob(&store, 4, 100);
        cache.added(e, 100);
        // c is the least recently used; b is older than a but leased.
        assert!(store.blob_len(Area::Cache, &c).unwrap().is_none());
        for d in [a, b, e] {
            assert!(store.blob_len(Area::Cache, &d).unwrap().is_some());
        }
        assert_eq!(cache.size(), 300);
        drop(lease_b);
        let f = blob(&store, 5, 100);
        cache.added(f, 100);
        assert!(
            store.blob_len(Area::Cache, &b).unwrap().is_none(),
            "b is the oldest once its lease is gone"
        );
        assert_eq!(cache.evictions.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn recency_survives_a_restart_and_private_blobs_are_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskStore::open(dir.path()).unwrap();
        let store = disk.clone().shared();
        let (old, new) = (blob(&store, 1, 100), blob(&store, 2, 100));
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let f = std::fs::File::options()
            .write(true)
            .open(disk.blob_path(Area::Cache, &old))
            .unwrap();
        f.set_modified(hour_ago).unwrap();
        let private = vec![9u8; 1000];
        store
            .put_blob(Area::Local, Digest::of(&private), &private)
            .unwrap();
        let cache = DiskCache::open(store.clone(), 150).unwrap();
        assert_eq!(cache.size(), 100);
        assert!(store.blob_len(Area::Cache, &old).unwrap().is_none());
        assert!(store.blob_len(Area::Cache, &new).unwrap().is_some());
        assert!(store
            .blob_len(Area::Local, &Digest::of(&private))
            .unwrap()
            .is_some());
    }
}
