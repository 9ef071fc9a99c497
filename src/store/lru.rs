//! Recency order of blobs by digest, with their sizes: what a size bound evicts first. Used by
//! the mirror's bound on the cache area and by backends that keep a bounded local copy.

use std::collections::{BTreeSet, HashMap};

use crate::oci::names::Digest;

/// Don't rewrite a blob's mtime more often than this (seconds): after a restart, last use
/// needs minutes of precision, not nanoseconds.
pub const TOUCH_EVERY: u64 = 60;

/// Recency order of blobs. In memory every use moves an entry to the back; the owner records
/// the use where it survives a restart (a file's mtime) when [`Lru::used`] says it is due, at
/// most once a minute, which is all a restart needs.
#[derive(Default)]
pub struct Lru {
    entries: HashMap<Digest, Entry>,
    order: BTreeSet<(u64, Digest)>,
    next_tick: u64,
    total: u64,
}

struct Entry {
    size: u64,
    tick: u64,
    /// The last use recorded where it survives a restart, in seconds.
    persisted: u64,
}

impl Lru {
    pub fn insert(&mut self, digest: Digest, size: u64, persisted: u64) {
        self.remove(&digest);
        let tick = self.next_tick;
        self.next_tick += 1;
        self.entries.insert(
            digest,
            Entry {
                size,
                tick,
                persisted,
            },
        );
        self.order.insert((tick, digest));
        self.total += size;
    }

    /// Moves an entry to the most recent end; tells whether its mtime is due for a rewrite.
    pub fn used(&mut self, digest: &Digest, now: u64) -> bool {
        let tick = self.next_tick;
        let Some(e) = self.entries.get_mut(digest) else {
            return false;
        };
        self.order.remove(&(e.tick, *digest));
        e.tick = tick;
        self.order.insert((tick, *digest));
        self.next_tick += 1;
        if now.saturating_sub(e.persisted) >= TOUCH_EVERY {
            e.persisted = now;
            true
        } else {
            false
        }
    }

    pub fn remove(&mut self, digest: &Digest) -> Option<u64> {
        let e = self.entries.remove(digest)?;
        self.order.remove(&(e.tick, *digest));
        self.total -= e.size;
        Some(e.size)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When an entry was last used, as last recorded (seconds since the epoch).
    pub fn last_used(&self, digest: &Digest) -> Option<u64> {
        self.entries.get(digest).map(|e| e.persisted)
    }

    /// Bytes of all entries.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Entries from the least recently used on.
    pub fn oldest_first(&self) -> impl Iterator<Item = Digest> + '_ {
        self.order.iter().map(|(_, d)| *d)
    }
}
