//! The traffic history behind the status page's charts: bytes served from the cache, blob bytes
//! fetched from upstreams, cache hits and lookups, and upstream pulls avoided, per hour for the
//! last [`HOURS`] hours and per day (UTC) for the last [`DAYS`] days.
//!
//! Each number is counted where its Prometheus counter is, from the same events, so a chart's
//! totals agree with `/metrics` for as long as the process has run (the history also keeps what
//! earlier runs counted, the counters start at zero). Blob bytes fetched upstream are the
//! mirror's own counter (`berth_upstream_fetched_bytes_total`), whose growth is added to the
//! current bucket whenever the history is touched.
//!
//! The history is bounded (a fixed number of buckets) and kept across restarts in the data dir
//! (`state/traffic-history.json`, through [`crate::store::state`]): written every
//! [`SAVE_EVERY`] and when the server stops. A missing file starts an empty history; an
//! unreadable or corrupt one too, with a WARN and `berth_status_history_failures_total`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ops::Service;
use crate::store::now_secs;
use crate::store::state::{StateDir, StateName};

use super::Traffic;

/// Hourly buckets kept (and charted).
pub const HOURS: usize = 48;
/// Daily buckets kept (and charted).
pub const DAYS: usize = 90;
/// How often the history is written to the data dir.
pub const SAVE_EVERY: Duration = Duration::from_secs(60);

const HOUR: u64 = 3600;
const DAY: u64 = 86_400;
const FILE: StateName = StateName::new("traffic-history.json");
/// Far more than [`HOURS`] + [`DAYS`] buckets take as JSON (a few hundred bytes each).
const MAX_FILE: u64 = 256 << 10;
const VERSION: u32 = 1;

/// What one bucket (or a window of them) counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Response bytes sent from the cache (`berth_cache_served_bytes_total`).
    #[serde(default)]
    pub cache_bytes: u64,
    /// Blob bytes received from upstreams (`berth_upstream_fetched_bytes_total`).
    #[serde(default)]
    pub upstream_bytes: u64,
    /// Mirrored manifest and blob requests answered from the cache: hit or stale
    /// (`berth_cache_requests_total{outcome="hit"|"stale"}`).
    #[serde(default)]
    pub hits: u64,
    /// Mirrored manifest and blob requests: every outcome but `local`.
    #[serde(default)]
    pub lookups: u64,
    /// Manifest GETs answered from the cache (`berth_pulls_avoided_total`).
    #[serde(default)]
    pub pulls_avoided: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.cache_bytes = self.cache_bytes.saturating_add(o.cache_bytes);
        self.upstream_bytes = self.upstream_bytes.saturating_add(o.upstream_bytes);
        self.hits = self.hits.saturating_add(o.hits);
        self.lookups = self.lookups.saturating_add(o.lookups);
        self.pulls_avoided = self.pulls_avoided.saturating_add(o.pulls_avoided);
    }

    pub fn hit_ratio(&self) -> Option<f64> {
        (self.lookups > 0).then(|| self.hits as f64 / self.lookups as f64)
    }

    /// The sum over some buckets.
    pub fn total<'a>(buckets: impl IntoIterator<Item = &'a Bucket>) -> Counters {
        let mut t = Counters::default();
        for b in buckets {
            t.add(&b.counts);
        }
        t
    }
}

/// One hour or one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Hours (or days) since the epoch.
    pub at: u64,
    #[serde(flatten)]
    pub counts: Counters,
}

/// The last `len` buckets of `span` seconds each, oldest first; the ones where nothing was
/// counted are not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ring {
    span: u64,
    len: usize,
    buckets: VecDeque<Bucket>,
}

impl Ring {
    fn new(span: u64, len: usize) -> Ring {
        Ring {
            span,
            len,
            buckets: VecDeque::with_capacity(len),
        }
    }

    fn add(&mut self, now: u64, c: &Counters) {
        let at = now / self.span;
        match self.buckets.back_mut() {
            // The current bucket; or the clock went back, and the newest bucket takes it
            // rather than one being reopened out of order.
            Some(b) if b.at >= at => b.counts.add(c),
            _ => self.buckets.push_back(Bucket { at, counts: *c }),
        }
        let newest = self.buckets.back().map_or(at, |b| b.at);
        while self
            .buckets
            .front()
            .is_some_and(|b| b.at + self.len as u64 <= newest)
            || self.buckets.len() > self.len
        {
            self.buckets.pop_front();
        }
    }

    /// The `len` buckets up to now (or up to the newest, if the clock went back), oldest
    /// first, with empty ones where nothing was counted.
    fn window(&self, now: u64) -> Vec<Bucket> {
        let end = (now / self.span).max(self.buckets.back().map_or(0, |b| b.at));
        let start = (end + 1).saturating_sub(self.len as u64);
        let mut kept = self.buckets.iter().peekable();
        (start..=end)
            .map(|at| {
                while kept.next_if(|b| b.at < at).is_some() {}
                match kept.next_if(|b| b.at == at) {
                    Some(b) => *b,
                    None => Bucket {
                        at,
                        counts: Counters::default(),
                    },
                }
            })
            .collect()
    }

    /// Takes buckets read from a file: sorted, merged where one repeats, none from the future,
    /// the newest `len` kept.
    fn restore(&mut self, mut read: Vec<Bucket>, now: u64) {
        read.retain(|b| b.at <= now / self.span);
        read.sort_by_key(|b| b.at);
        let mut buckets: VecDeque<Bucket> = VecDeque::with_capacity(self.len);
        for b in read {
            match buckets.back_mut() {
                Some(last) if last.at == b.at => last.counts.add(&b.counts),
                _ => buckets.push_back(b),
            }
        }
        while buckets.len() > self.len {
            buckets.pop_front();
        }
        self.buckets = buckets;
    }
}

/// The hourly and daily buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    hours: Ring,
    days: Ring,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    hours: Vec<Bucket>,
    days: Vec<Bucket>,
}

impl History {
    pub fn new() -> History {
        History {
            hours: Ring::new(HOUR, HOURS),
            days: Ring::new(DAY, DAYS),
        }
    }

    /// Counts `c` at time `now` (seconds since the epoch).
    pub fn add(&mut self, now: u64, c: &Counters) {
        if *c == Counters::default() {
            return;
        }
        self.hours.add(now, c);
        self.days.add(now, c);
    }

    /// The last [`HOURS`] hours, oldest first.
    pub fn hours(&self, now: u64) -> Vec<Bucket> {
        self.hours.window(now)
    }

    /// The last [`DAYS`] days, oldest first.
    pub fn days(&self, now: u64) -> Vec<Bucket> {
        self.days.window(now)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let file = File {
            version: VERSION,
            hours: self.hours.buckets.iter().copied().collect(),
            days: self.days.buckets.iter().copied().collect(),
        };
        serde_json::to_vec(&file).unwrap_or_default()
    }

    /// A history read back from [`to_json`](Self::to_json)'s output.
    pub fn from_json(bytes: &[u8], now: u64) -> Result<History, String> {
        let file: File = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if file.version != VERSION {
            return Err(format!("version {} is not {VERSION}", file.version));
        }
        let mut h = History::new();
        h.hours.restore(file.hours, now);
        h.days.restore(file.days, now);
        Ok(h)
    }
}

impl Traffic {
    /// A manifest GET answered from the cache: a pull the upstream did not see.
    pub fn pull_avoided(&self) {
        self.with(|t| {
            t.history.add(
                now_secs(),
                &Counters {
                    pulls_avoided: 1,
                    ..Counters::default()
                },
            )
        });
    }

    /// The last [`HOURS`] hours and [`DAYS`] days, oldest first.
    pub fn history(&self) -> (Vec<Bucket>, Vec<Bucket>) {
        let now = now_secs();
        self.with(|t| (t.history.hours(now), t.history.days(now)))
    }

    /// Load and save failures of the history file.
    pub fn history_failures(&self) -> (u64, u64) {
        (
            self.load_failures.load(Ordering::Relaxed),
            self.save_failures.load(Ordering::Relaxed),
        )
    }
}

/// Reads the history an earlier run kept in the data dir (at start, before serving).
pub async fn restore(app: &Service) {
    let state = StateDir::new(&app.config.data_dir);
    let path = state.path(FILE);
    let read = tokio::task::spawn_blocking(move || state.load(FILE, MAX_FILE)).await;
    let history = match read {
        Ok(Ok(Some(bytes))) => History::from_json(&bytes, now_secs()),
        Ok(Ok(None)) => {
            tracing::info!(path = %path.display(), "no traffic history kept yet; starting one");
            return;
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match history {
        Ok(h) => app.ops.traffic.with(|t| t.history = h),
        Err(e) => {
            app.ops
                .traffic
                .load_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %path.display(), error = %e, "the traffic history cannot be read; the status page's charts start empty");
        }
    }
}

/// Writes the history to the data dir.
pub async fn save(app: &Service) {
    let bytes = app.ops.traffic.with(|t| t.history.to_json());
    let state = StateDir::new(&app.config.data_dir);
    let path = state.path(FILE);
    let saved = tokio::task::spawn_blocking(move || state.save(FILE, &bytes)).await;
    let error = match saved {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    app.ops
        .traffic
        .save_failures
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(path = %path.display(), error = %error, "the traffic history cannot be written");
}

/// Writes the history every [`SAVE_EVERY`] until `stopped` changes (the server writes it once
/// more when it has stopped).
pub async fn keep(app: Arc<Service>, mut stopped: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SAVE_EVERY);
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => save(&app).await,
            _ = stopped.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(cache: u64, upstream: u64) -> Counters {
        Counters {
            cache_bytes: cache,
            upstream_bytes: upstream,
            ..Counters::default()
        }
    }

    /// 2026-12-02 00:00 UTC, a day boundary.
    const T0: u64 = 1_796_169_600;

    #[test]
    fn buckets_roll_over_by_the_injected_clock() {
        assert_eq!(T0 % DAY, 0);
        let mut h = History::new();
        h.add(T0 + 10, &bytes(1, 2));
        h.add(T0 + HOUR - 1, &bytes(1, 0));
        h.add(T0 + HOUR, &bytes(0, 5));
        let hours = h.hours(T0 + HOUR + 1);
        assert_eq!(hours.len(), HOURS);
        assert_eq!(hours[HOURS - 2].counts, bytes(2, 2));
        assert_eq!(hours[HOURS - 1].counts, bytes(0, 5));
        assert_eq!(hours[HOURS - 1].at, (T0 + HOUR) / HOUR);
        assert_eq!(Counters::total(&hours), bytes(2, 7));
        // A quiet hour later: an empty bucket at the end, the others moved along.
        let later = h.hours(T0 + 3 * HOUR);
        assert_eq!(later[HOURS - 1].counts, Counters::default());
        assert_eq!(later[HOURS - 2].counts, Counters::default());
        assert_eq!(later[HOURS - 3].counts, bytes(0, 5));
        assert_eq!(later[HOURS - 4].counts, bytes(2, 2));
        // 48 hours on, the first hour has left the hourly window but not the daily one.
        let now = T0 + 48 * HOUR + 5;
        h.add(now, &bytes(100, 0));
        let hours = h.hours(now);
        assert_eq!(Counters::total(&hours), bytes(100, 5));
        assert_eq!(h.hours.buckets.len(), 2, "old hours are dropped");
        let days = h.days(now);
        assert_eq!(days.len(), DAYS);
        assert_eq!(days[DAYS - 3].counts, bytes(2, 7));
        assert_eq!(days[DAYS - 1].counts, bytes(100, 0));
        assert_eq!(Counters::total(&days), bytes(102, 7));
        // 90 days on, only the newest day is left.
        let far = T0 + 92 * DAY;
        h.add(far, &bytes(1, 1));
        assert_eq!(Counters::total(&h.days(far)), bytes(1, 1));
        assert_eq!(h.days.buckets.len(), 1);
    }

    #[test]
    fn every_hour_of_a_busy_week_keeps_the_history_bounded() {
        let mut h = History::new();
        for i in 0..(7 * 24 * 60) {
            h.add(T0 + i * 60, &bytes(1, 1));
        }
        assert_eq!(h.hours.buckets.len(), HOURS);
        assert_eq!(h.days.buckets.len(), 7);
        let now = T0 + 7 * 24 * 3600 - 60;
        assert_eq!(Counters::total(&h.hours(now)).cache_bytes, 48 * 60);
        assert_eq!(Counters::total(&h.days(now)).cache_bytes, 7 * 24 * 60);
    }

    #[test]
    fn a_clock_that_goes_back_adds_to_the_newest_bucket() {
        let mut h = History::new();
        h.add(T0 + 5 * HOUR, &bytes(1, 0));
        h.add(T0 + 2 * HOUR, &bytes(1, 0));
        assert_eq!(h.hours.buckets.len(), 1);
        let hours = h.hours(T0 + 2 * HOUR);
        assert_eq!(hours[HOURS - 1].at, (T0 + 5 * HOUR) / HOUR);
        assert_eq!(hours[HOURS - 1].counts, bytes(2, 0));
    }

    #[test]
    fn the_file_round_trips_and_bad_files_are_refused() {
        let mut h = History::new();
        h.add(T0, &bytes(3, 4));
        h.add(T0 + DAY, &bytes(5, 6));
        let json = h.to_json();
        let back = History::from_json(&json, T0 + DAY).unwrap();
        assert_eq!(back, h);
        assert!(History::from_json(b"{not json", T0).is_err());
        assert!(History::from_json(br#"{"version":9,"hours":[],"days":[]}"#, T0).is_err());
        // Buckets out of order, repeated, from the future or too many are put right.
        let mut hours: Vec<String> = (0..200)
            .map(|i| format!(r#"{{"at":{},"cache_bytes":1}}"#, T0 / HOUR - i))
            .collect();
        hours.push(format!(r#"{{"at":{},"cache_bytes":7}}"#, T0 / HOUR));
        hours.push(format!(r#"{{"at":{},"cache_bytes":9}}"#, T0 / HOUR + 10));
        let text = format!(r#"{{"version":1,"hours":[{}],"days":[]}}"#, hours.join(","));
        let h = History::from_json(text.as_bytes(), T0).unwrap();
        assert_eq!(h.hours.buckets.len(), HOURS);
        let window = h.hours(T0);
        assert_eq!(window[HOURS - 1].counts.cache_bytes, 8);
        assert_eq!(Counters::total(&window).cache_bytes, 8 + 47);
    }
}
