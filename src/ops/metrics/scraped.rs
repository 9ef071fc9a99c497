//! The metrics read from the components at scrape time: one source of truth for each number.

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::ops::ratelimit::Refusal;
use crate::ops::Service;

/// Values read from the components at scrape time.
#[derive(Debug, Default)]
pub(super) struct Scraped {
    families: Vec<Sampled>,
}

#[derive(Debug)]
struct Sampled {
    name: &'static str,
    help: &'static str,
    counter: bool,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Scraped {
    pub(super) fn of(app: &Service) -> Scraped {
        let mirror = &app.mirror;
        let ops = &app.ops;
        let mut s = Scraped::default();
        let n = |v: u64| v as f64;
        s.gauge(
            "berth_uptime_seconds",
            "Seconds since berth started",
            app.started.elapsed().as_secs_f64(),
        );
        s.gauge(
            "berth_downloads_in_flight",
            "Blob downloads from upstreams under way",
            mirror.fetches.in_flight() as f64,
        );
        s.counter(
            "berth_downloads_started",
            "Blob downloads started",
            n(mirror.fetches.started.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_downloads_joined",
            "Blob requests that joined a download already under way",
            n(mirror.fetches.joined.load(Ordering::Relaxed)),
        );
        s.push(
            "berth_downloads_failed",
            "Blob downloads that ended without a cache entry, by reason",
            true,
            mirror
                .fetches
                .failures()
                .into_iter()
                .map(|(reason, v)| (vec![("reason", reason.to_owned())], n(v)))
                .collect(),
        );
        s.counter(
            "berth_manifest_fetches_joined",
            "Manifest requests that joined an upstream request already under way",
            n(mirror.manifest_joins()),
        );
        s.counter(
            "berth_stale_serves",
            "Tags served from the cache because the upstream was unavailable",
            n(mirror.stale_serves.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_upstream_fetched_bytes",
            "Blob bytes received from upstreams",
            n(mirror.fetches.upstream_bytes.load(Ordering::Relaxed)),
        );
        s.gauge(
            "berth_disk_cache_bytes",
            "Bytes of mirrored content on disk",
            n(mirror.disk.size()),
        );
        s.gauge(
            "berth_disk_cache_limit_bytes",
            "The disk cache's size limit (max_cache_size)",
            n(mirror.disk.limit()),
        );
        s.counter(
            "berth_disk_cache_evictions",
            "Blobs evicted from the disk cache",
            n(mirror.disk.evictions.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_disk_cache_evicted_bytes",
            "Bytes evicted from the disk cache",
            n(mirror.disk.evicted_bytes.load(Ordering::Relaxed)),
        );
        if let Some(remote) = mirror.store().remote_stats() {
            s.counter(
                "berth_store_bucket_errors",
                "Requests to the bucket that failed: errors, timeouts, unreachable",
                n(remote.errors),
            );
            s.gauge(
                "berth_store_local_copy_bytes",
                "Bytes of the bucket's content kept in the data dir (max_local_size)",
                n(remote.local_bytes),
            );
        }
        for (name, help, tally) in [
            (
                "berth_warm_images",
                "Images warmed (`[[warm]]`, admin warm-ups, prefetches), by result: warmed, \
                 unchanged, failed, reserve (stopped at ratelimit_reserve), busy (an admin's \
                 warm-up refused: too many running)",
                &mirror.warm.images,
            ),
            (
                "berth_warm_blobs",
                "Blobs of warmed images, by result: fetched, cached, failed",
                &mirror.warm.blobs,
            ),
            (
                "berth_warm_refreshes",
                "Refreshes of the [[warm]] list, by result: complete, reserve (cut short at an \
                 upstream's ratelimit_reserve)",
                &mirror.warm.refreshes,
            ),
            (
                "berth_prefetches",
                "Moved tags whose new image is fetched in the background (prefetch_on_move), by \
                 result: started, dropped (too many waiting)",
                &mirror.warm.prefetches,
            ),
        ] {
            s.push(
                name,
                help,
                true,
                tally
                    .snapshot()
                    .into_iter()
                    .map(|(label, v)| (vec![("result", label.to_owned())], n(v)))
                    .collect(),
            );
        }
        let private = &app.private;
        s.gauge(
            "berth_uploads_open",
            "Blob upload sessions open in the private namespace",
            private.uploads_open() as f64,
        );
        s.counter(
            "berth_uploads_refused",
            "Upload starts refused because the user had max_uploads_per_user sessions open",
            n(private.uploads_refused.load(Ordering::Relaxed)),
        );
        s.counter(
            "berth_uploads_expired",
            "Upload sessions removed for being idle longer than upload_max_age",
            n(private.uploads_expired.load(Ordering::Relaxed)),
        );
        let hooks = &private.webhooks.stats;
        s.push(
            "berth_webhook_deliveries",
            "Webhook events by result: delivered, failed (every attempt failed), dropped (too many pending)",
            true,
            [
                ("delivered", &hooks.delivered),
                ("failed", &hooks.failed),
                ("dropped", &hooks.dropped),
            ]
            .iter()
            .map(|(result, v)| (vec![("result", (*result).to_owned())], n(v.load(Ordering::Relaxed))))
            .collect(),
        );
        let mut remaining = Vec::new();
        let mut limit = Vec::new();
        let mut down = Vec::new();
        let mut trips = Vec::new();
        for up in mirror.upstreams() {
            let labels = vec![("upstream", up.key.clone())];
            down.push((labels.clone(), if up.is_down() { 1.0 } else { 0.0 }));
            trips.push((labels.clone(), n(up.breaker_trips.load(Ordering::Relaxed))));
            let r = up.ratelimit_remaining.load(Ordering::Relaxed);
            if r >= 0 {
                remaining.push((labels.clone(), r as f64));
            }
            let l = up.ratelimit_limit.load(Ordering::Relaxed);
            if l >= 0 {
                limit.push((labels, l as f64));
            }
        }
        s.push(
            "berth_upstream_down",
            "1 while the circuit breaker takes the upstream for down",
            false,
            down,
        );
        s.push(
            "berth_upstream_breaker_trips",
            "Times the circuit breaker took the upstream for down",
            true,
            trips,
        );
        s.push(
            "berth_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream (Docker Hub) reported",
            false,
            remaining,
        );
        s.push(
            "berth_upstream_ratelimit_limit",
            "The last ratelimit-limit an upstream (Docker Hub) reported",
            false,
            limit,
        );
        let slots = &mirror.slots;
        if slots.max() > 0 {
            s.gauge(
                "berth_upstream_fetch_slots_in_use",
                "Upstream fetches holding one of the max_upstream_concurrency slots",
                slots.in_use() as f64,
            );
            s.gauge(
                "berth_upstream_fetch_slots_max",
                "rate_limit.max_upstream_concurrency",
                slots.max() as f64,
            );
        }
        let refused = [
            (
                Refusal::Client,
                ops.limits.refused_client.load(Ordering::Relaxed),
            ),
            (
                Refusal::UpstreamRps,
                ops.hook.refused.load(Ordering::Relaxed),
            ),
            (
                Refusal::UpstreamConcurrency,
                slots.refused.load(Ordering::Relaxed),
            ),
        ];
        let conns = &ops.conns;
        s.gauge(
            "berth_connections_open",
            "Client connections open (plain and TLS)",
            conns.open() as f64,
        );
        s.gauge(
            "berth_connections_max",
            "limits.max_connections: client connections allowed at once",
            conns.max as f64,
        );
        s.gauge(
            "berth_responses_in_flight",
            "Responses not yet taken in full by their clients",
            conns.responses_in_flight() as f64,
        );
        s.push(
            "berth_connections_refused",
            "Client connections closed on arrival because a connection cap was reached, by limit",
            true,
            by_reason(conns, &crate::http::conn::Reason::REFUSALS),
        );
        s.push(
            "berth_connections_closed",
            "Client connections closed by a timeout, by limit",
            true,
            by_reason(conns, &crate::http::conn::Reason::CLOSES),
        );
        s.push(
            "berth_ratelimited_requests",
            "Requests refused by berth's own rate limits, by limit",
            true,
            refused
                .iter()
                .map(|(r, v)| (vec![("limit", r.as_str().to_owned())], n(*v)))
                .collect(),
        );
        let auth = &app.auth.stats;
        let load = |a: &std::sync::atomic::AtomicU64| n(a.load(Ordering::Relaxed));
        s.counter(
            "berth_auth_password_checks",
            "Passwords checked with bcrypt (cached verifications not counted)",
            load(&auth.password_checks),
        );
        s.counter(
            "berth_auth_verified_cache_hits",
            "Basic credentials accepted from the short-lived cache of verified ones",
            load(&auth.verified_hits),
        );
        s.counter(
            "berth_auth_failed_logins",
            "Logins with wrong credentials",
            load(&auth.failed_logins),
        );
        s.gauge(
            "berth_auth_password_checks_running",
            "bcrypt checks running now (at most password_check_concurrency)",
            app.auth.checks_running() as f64,
        );
        s.counter(
            "berth_status_manifest_reads",
            "Manifests the status pages read from the store (each summary is read once)",
            n(app.pages.manifest_reads()),
        );
        s.counter(
            "berth_status_truncated_indexes",
            "Indexes whose size on the status page counts only their first 128 children",
            n(app.pages.truncated_indexes()),
        );
        s.counter(
            "berth_status_spent_budgets",
            "Status listings that stopped at their read budget (sizes shown as unknown)",
            n(app.pages.spent_budgets()),
        );
        s.counter(
            "berth_status_busy_refusals",
            "Status page visits refused because too many listings were being computed",
            load(&app.pages.busy_refusals),
        );
        let refusals = &app.pages.sessions.refusals;
        s.push(
            "berth_status_form_refused",
            "Status page form posts refused, by reason: csrf (a missing or wrong token), origin \
             (posted from another site), no_session (an action without signing in), permission \
             (a user without the grant), sign_in (a wrong user name or password)",
            true,
            [
                ("csrf", &refusals.csrf),
                ("origin", &refusals.origin),
                ("no_session", &refusals.no_session),
                ("permission", &refusals.permission),
                ("sign_in", &refusals.failed_sign_ins),
            ]
            .iter()
            .map(|(reason, v)| (vec![("reason", (*reason).to_owned())], load(v)))
            .collect(),
        );
        s.gauge(
            "berth_status_sessions",
            "Signed-in status page sessions held (at most 10000, each for at most 12 h)",
            app.pages.sessions.approx_count() as f64,
        );
        let (load_failed, save_failed) = ops.traffic.history_failures();
        s.push(
            "berth_status_history_failures",
            "Failures to read (at start) or write the status page's traffic history file, by op",
            true,
            vec![
                (vec![("op", "load".to_owned())], n(load_failed)),
                (vec![("op", "save".to_owned())], n(save_failed)),
            ],
        );
        s.push(
            "berth_auth_refused",
            "Requests refused by authentication limits: failed_logins (address over its limit, \
             refused before hashing), busy (too many password checks waiting), scope (a token \
             without the needed grant), token (a token unknown, expired or not signed with \
             this berth's key), rule (a user the access rules do not allow)",
            true,
            [
                ("failed_logins", &auth.refused_failures),
                ("busy", &auth.refused_busy),
                ("scope", &auth.refused_scope),
                ("token", &auth.refused_token),
                ("rule", &auth.refused_rule),
            ]
            .iter()
            .map(|(reason, v)| (vec![("reason", (*reason).to_owned())], load(v)))
            .collect(),
        );
        s
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, v: f64) {
        self.push(name, help, false, vec![(Vec::new(), v)]);
    }

    fn counter(&mut self, name: &'static str, help: &'static str, v: f64) {
        self.push(name, help, true, vec![(Vec::new(), v)]);
    }

    fn push(
        &mut self,
        name: &'static str,
        help: &'static str,
        counter: bool,
        samples: Vec<(Vec<(&'static str, String)>, f64)>,
    ) {
        self.families.push(Sampled {
            name,
            help,
            counter,
            samples,
        });
    }
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            if f.samples.is_empty() {
                continue;
            }
            let kind = if f.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut m = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            match f.samples.as_slice() {
                [(labels, v)] if labels.is_empty() => encode_sample(f.counter, *v, m)?,
                samples => {
                    for (labels, v) in samples {
                        encode_sample(f.counter, *v, m.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_sample(
    counter: bool,
    v: f64,
    e: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    if counter {
        ConstCounter::new(v).encode(e)
    } else {
        ConstGauge::new(v).encode(e)
    }
}

/// One sample per connection-limit reason, labelled `reason`.
fn by_reason(
    conns: &crate::http::conn::Conns,
    reasons: &[crate::http::conn::Reason],
) -> Vec<(Vec<(&'static str, String)>, f64)> {
    reasons
        .iter()
        .map(|r| {
            (
                vec![("reason", r.as_str().to_owned())],
                conns.count(*r) as f64,
            )
        })
        .collect()
}
