//! The local copy in front of the bucket: blobs already in the bucket, kept in the data dir
//! while they are used, within `max_local_size`, least recently used out first.
//!
//! Dropping a local copy loses nothing (the bucket has it), and a reader that has the file
//! open keeps reading it after it is unlinked, so nothing here waits for readers.

use std::sync::Mutex;

use crate::lock;
use crate::oci::names::Digest;
use crate::store::disk::DiskStore;
use crate::store::lru::Lru;
use crate::store::{now_secs, Area, ContentStore};

pub struct Tier {
    local: DiskStore,
    max: u64,
    lru: Mutex<Lru>,
}

impl Tier {
    /// Learns what the data dir holds (both areas), oldest first, and trims it to the bound.
    pub fn open(local: DiskStore, max: u64) -> std::io::Result<Tier> {
        let mut found = Vec::new();
        for area in [Area::Cache, Area::Local] {
            for b in local.blobs(area)? {
                let used = b
                    .last_used
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                found.push((used, b.digest, b.len));
            }
        }
        found.sort();
        let mut lru = Lru::default();
        for (used, digest, len) in found {
            lru.insert(digest, len, used);
        }
        let tier = Tier {
            local,
            max,
            lru: Mutex::new(lru),
        };
        tier.trim();
        Ok(tier)
    }

    pub fn added(&self, digest: Digest, len: u64) {
        lock(&self.lru).insert(digest, len, now_secs());
        self.trim();
    }

    pub fn used(&self, area: Area, digest: &Digest) {
        if lock(&self.lru).used(digest, now_secs()) {
            self.local.mark_used(area, digest);
        }
    }

    pub fn forget(&self, digest: &Digest) {
        lock(&self.lru).remove(digest);
    }

    /// Bytes held locally.
    pub fn size(&self) -> u64 {
        lock(&self.lru).total()
    }

    fn trim(&self) {
        loop {
            let victim = {
                let mut lru = lock(&self.lru);
                if lru.total() <= self.max {
                    return;
                }
                let Some(d) = lru.oldest_first().next() else {
                    return;
                };
                lru.remove(&d);
                d
            };
            // A digest can be in both areas; either copy is only a copy.
            for area in [Area::Cache, Area::Local] {
                if let Err(e) = self.local.remove_blob(area, &victim) {
                    tracing::warn!(digest = %victim, error = %e, "could not drop a local copy");
                }
            }
        }
    }
}
