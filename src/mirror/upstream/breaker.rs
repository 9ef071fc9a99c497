//! The circuit breaker: after `breaker_failures` failed requests in a row an upstream is taken
//! for down, and requests fail at once until a probe gets through.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Response;
use hyper::body::Incoming;

use crate::lock;
use crate::mirror::upstream::{Upstream, UpstreamError};

/// The circuit breaker's view of the upstream: after `breaker_failures` failed requests in a
/// row it is taken for down, and requests fail at once instead of each waiting for the full
/// timeout; after `breaker_cooldown` one probe request may try it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Health {
    Up {
        failures: u32,
    },
    Down {
        since_failures: u32,
        until: Instant,
    },
    /// One probe request is on its way; everything else still fails at once.
    Probing {
        since_failures: u32,
    },
}

/// Held by the request that probes a down upstream. Dropped without a verdict (the request was
/// cancelled), it lets the next request probe at once, so the breaker can never stay half-open.
pub(super) struct Probe<'a> {
    upstream: Option<&'a Upstream>,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(up) = self.upstream {
            let mut health = lock(&up.health);
            if let Health::Probing { since_failures } = *health {
                *health = Health::Down {
                    since_failures,
                    until: Instant::now(),
                };
            }
        }
    }
}

impl Upstream {
    /// Whether the upstream is down, in the breaker's view.
    pub fn is_down(&self) -> bool {
        !matches!(*lock(&self.health), Health::Up { .. })
    }

    /// Lets a request through unless the breaker is open; after the cooldown, the first request
    /// through is the probe.
    pub(super) fn admit_health(&self) -> Result<Probe<'_>, UpstreamError> {
        let mut health = lock(&self.health);
        match *health {
            Health::Up { .. } => Ok(Probe { upstream: None }),
            Health::Down {
                since_failures,
                until,
            } => {
                let now = Instant::now();
                if now < until {
                    return Err(UpstreamError::Down {
                        failures: since_failures,
                        retry_in: until - now,
                    });
                }
                *health = Health::Probing { since_failures };
                tracing::info!(upstream = %self.name, "probing a down upstream");
                Ok(Probe {
                    upstream: Some(self),
                })
            }
            Health::Probing { since_failures } => Err(UpstreamError::Down {
                failures: since_failures,
                retry_in: Duration::ZERO,
            }),
        }
    }

    /// Counts a request's outcome: an answer (any status but 5xx) means the upstream is up;
    /// unreachable, timed out and 5xx count towards taking it for down.
    pub(super) fn record_health(
        &self,
        mut probe: Probe<'_>,
        result: &Result<Response<Incoming>, UpstreamError>,
    ) {
        let failed = match result {
            Ok(resp) => resp.status().is_server_error(),
            Err(e) => matches!(e, UpstreamError::Unreachable(_) | UpstreamError::Timeout),
        };
        probe.upstream = None;
        let mut health = lock(&self.health);
        let before = *health;
        *health = match (before, failed) {
            (_, false) => Health::Up { failures: 0 },
            (Health::Up { failures }, true) if failures + 1 < self.config.breaker_failures => {
                Health::Up {
                    failures: failures + 1,
                }
            }
            (Health::Up { failures }, true) => self.trip(failures + 1),
            (Health::Probing { since_failures }, true) => {
                self.trip(since_failures.saturating_add(1))
            }
            // A request sent before the breaker opened: it is open already.
            (down @ Health::Down { .. }, true) => down,
        };
        if !failed && !matches!(before, Health::Up { .. }) {
            tracing::info!(upstream = %self.name, "upstream answers again");
        }
    }

    fn trip(&self, failures: u32) -> Health {
        let cooldown = self.config.breaker_cooldown.0;
        self.breaker_trips.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(upstream = %self.name, failures, cooldown_s = cooldown.as_secs_f64(),
            "upstream taken for down: cached tags are served stale and misses answer 503 at once until a probe succeeds");
        Health::Down {
            since_failures: failures,
            until: Instant::now() + cooldown,
        }
    }
}
