//! Single flight: one run of a future per key at a time, its result shared by every caller.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::lock;

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
}
