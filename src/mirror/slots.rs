//! The cap on upstream fetches running at once (`rate_limit.max_upstream_concurrency`), shared
//! by blob downloads and manifest fetches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::RateLimitConfig;
use crate::mirror::upstream::UpstreamError;

/// The cap on upstream fetches running at once.
pub struct UpstreamSlots {
    semaphore: Option<Arc<Semaphore>>,
    max: usize,
    pub refused: AtomicU64,
}

impl UpstreamSlots {
    pub fn new(config: &RateLimitConfig) -> UpstreamSlots {
        let max = config.max_upstream_concurrency.unwrap_or(0);
        UpstreamSlots {
            semaphore: (max > 0).then(|| Arc::new(Semaphore::new(max))),
            max,
            refused: AtomicU64::new(0),
        }
    }

    pub fn unlimited() -> UpstreamSlots {
        UpstreamSlots::new(&RateLimitConfig::default())
    }

    /// The configured cap, 0 for none.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Fetches holding a slot now.
    pub fn in_use(&self) -> usize {
        match &self.semaphore {
            Some(s) => self.max.saturating_sub(s.available_permits()),
            None => 0,
        }
    }

    /// Takes a slot, waiting up to `wait` for one; the slot is free again when dropped.
    pub async fn acquire(
        &self,
        wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, UpstreamError> {
        let Some(sem) = &self.semaphore else {
            return Ok(None);
        };
        match tokio::time::timeout(wait, sem.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            // The semaphore is never closed; treat it like a full one.
            Ok(Err(_)) | Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(max = self.max, "no upstream fetch slot became free in time");
                Err(UpstreamError::TooManyRequests {
                    retry_after: Duration::from_secs(1),
                })
            }
        }
    }
}
