//! Talking to upstreams the way Docker does: tokens, redirects, TTLs, outages, several upstreams.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;
use berth::config::{Seconds, UpstreamConfig, UpstreamUrl};

fn bearer() -> Auth {
    Auth {
        basic: None,
        expires_in: Some(300),
        access_token_field: false,
    }
}

fn tokens(up: &Fake) -> usize {
    up.token_requests.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_bearer_tokens_are_fetched_once_and_reused() {
    let up = Fake::start().await;
    up.st().auth = Some(bearer());
    let img = Image::new(1, &[1000, 2000]);
    up.add_image("library/alpine", "3", &img);
    let b = Berth::start(&up, |_| {}).await;
    let r = b.get("/v2/alpine/manifests/3").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.bytes(), img.manifest);
    for blob in img.blobs() {
        assert_eq!(
            b.get(&format!("/v2/alpine/blobs/{}", sha256(&blob)))
                .await
                .bytes(),
            blob
        );
    }
    assert_eq!(
        tokens(&up),
        1,
        "one token serves every request of the scope"
    );
    // Only the first request met a 401; later ones sent the token up front.
    let unauthorized = up
        .st()
        .log
        .iter()
        .filter(|(_, p, h)| p.starts_with("/v2/") && h.get("authorization").is_none())
        .count();
    assert_eq!(unauthorized, 1);
    // Every request names its sender, as registries' logs expect.
    assert!(up.st().log.iter().all(|(_, _, h)| h
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("berth/"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_needing_a_token_share_one_fetch() {
    let up = Fake::start().await;
    up.st().auth = Some(bearer());
    let imgs: Vec<_> = (0..8).map(|i| Image::new(100 + i, &[10])).collect();
    for (i, img) in imgs.iter().enumerate() {
        up.add_image("library/many", &format!("t{i}"), img);
    }
    let b = Berth::start(&up, |_| {}).await;
    let clients: Vec<_> = (0..8)
        .map(|i| spawn_get(&b.url(&format!("/v2/many/manifests/t{i}")), &[]))
        .collect();
    for (c, img) in clients.into_iter().zip(&imgs) {
        assert_eq!(c.await.unwrap().bytes(), img.manifest);
    }
    assert_eq!(tokens(&up), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_to_the_token_realm_as_basic_auth() {
    let up = Fake::start().await;
    up.st().auth = Some(Auth {
        basic: Some("robot:s3cret".into()),
        expires_in: None,
        access_token_field: true,
    });
    let img = Image::new(2, &[10]);
    up.add_image("library/private-thing", "1", &img);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let b = Berth::start(&up, |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.user = Some("robot".into());
        u.password_file = Some(pw.clone());
    })
    .await;
    let r = b.get("/v2/library/private-thing/manifests/1").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(tokens(&up), 1);
    // The registry endpoints only ever saw Bearer tokens, never the password.
    for (_, path, h) in up.st().log.iter() {
        let auth = h
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            !auth.starts_with("Basic"),
            "{path} was sent Basic credentials"
        );
    }
    // Wrong credentials: the token endpoint refuses, the client hears 401.
    up.st().auth = Some(Auth {
        basic: Some("robot:other".into()),
        expires_in: None,
        access_token_field: false,
    });
    up.st().revoked_below = usize::MAX;
    let r = b.get("/v2/library/private-thing/manifests/2").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "UNAUTHORIZED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_refreshed_and_the_request_retried_once() {
    let up = Fake::start().await;
    up.st().auth = Some(bearer());
    let img = Image::new(3, &[10, 20, 30]);
    up.add_image("library/r", "1", &img);
    let b = Berth::start(&up, |_| {}).await;
    assert_eq!(b.get("/v2/r/manifests/1").await.status, 200);
    assert_eq!(tokens(&up), 1);
    // The registry now considers token-1 expired.
    up.st().revoked_below = 1;
    let blob = &img.layers[0];
    assert_eq!(
        b.get(&format!("/v2/r/blobs/{}", sha256(blob)))
            .await
            .bytes(),
        *blob
    );
    assert_eq!(tokens(&up), 2);
    // A registry that refuses every token: one retry, then an error, not a loop.
    up.st().revoked_below = usize::MAX;
    let before = up.requests();
    let r = b
        .get(&format!("/v2/r/blobs/{}", sha256(&img.layers[1])))
        .await;
    assert_ne!(r.status, 200);
    assert_eq!(
        up.requests() - before,
        2,
        "the first try and exactly one retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_and_are_fetched_again() {
    let up = Fake::start().await;
    up.st().auth = Some(Auth {
        basic: None,
        expires_in: Some(1),
        access_token_field: false,
    });
    let imgs: Vec<_> = (0..50).map(|i| Image::new(200 + i, &[10])).collect();
    for img in &imgs {
        up.add_image("library/exp", &img.digest, img);
    }
    let b = Berth::start(&up, |_| {}).await;
    // Each request is a new manifest, so each reaches the upstream; the token must be renewed
    // once its one-second lifetime is nearly over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while tokens(&up) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token was never renewed"
        );
        let img = &imgs[i % imgs.len()];
        assert_eq!(
            b.get(&format!("/v2/exp/manifests/{}", img.digest))
                .await
                .status,
            200
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(i > 1, "the first token served more than one request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_reach_the_cdn_without_credentials() {
    let up = Fake::start().await;
    let cdn = Fake::start().await;
    up.st().auth = Some(bearer());
    up.st().redirect_blobs_to = Some(cdn.url());
    let blob = pseudo_random(4, 300_000);
    up.add_blob(blob.clone());
    let d = cdn.add_blob(blob.clone());
    let b = Berth::start(&up, |_| {}).await;
    let r = b.get(&format!("/v2/library/cdn/blobs/{d}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), blob);
    assert_eq!(cdn.count("GET", "/cdn/"), 1);
    assert!(
        cdn.st()
            .log
            .iter()
            .all(|(_, _, h)| h.get("authorization").is_none()),
        "the CDN saw an Authorization header"
    );
    // The registry itself did get the token.
    assert!(up
        .st()
        .log
        .iter()
        .any(|(_, p, h)| p.contains("/blobs/") && h.get("authorization").is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_fresh_for_the_ttl_then_revalidated_with_a_head() {
    let up = Fake::start().await;
    let v1 = Image::new(5, &[10]);
    up.add_image("library/ttl", "latest", &v1);
    // A long TTL: repeated pulls cause no upstream request at all.
    let b = Berth::start(&up, |_| {}).await;
    b.get("/v2/ttl/manifests/latest").await.bytes();
    let before = up.requests();
    for _ in 0..3 {
        assert_eq!(b.get("/v2/ttl/manifests/latest").await.bytes(), v1.manifest);
    }
    assert_eq!(up.requests(), before);

    // TTL zero: every pull revalidates with one HEAD, and GETs only when the tag moved.
    let up = Fake::start().await;
    up.add_image("library/ttl", "latest", &v1);
    let b = Berth::start(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().tag_ttl = Seconds(Duration::ZERO)
    })
    .await;
    b.get("/v2/ttl/manifests/latest").await.bytes();
    let (heads, gets) = (
        up.count("HEAD", "/manifests/"),
        up.count("GET", "/manifests/"),
    );
    assert_eq!(b.get("/v2/ttl/manifests/latest").await.bytes(), v1.manifest);
    assert_eq!(up.count("HEAD", "/manifests/"), heads + 1);
    assert_eq!(
        up.count("GET", "/manifests/"),
        gets,
        "unchanged tag: no GET"
    );
    let v2 = Image::new(6, &[10]);
    up.add_image("library/ttl", "latest", &v2);
    let r = b.get("/v2/ttl/manifests/latest").await;
    assert_eq!(r.bytes(), v2.manifest);
    assert_eq!(r.header("docker-content-digest"), v2.digest);
    assert_eq!(up.count("HEAD", "/manifests/"), heads + 2);
    assert_eq!(
        up.count("GET", "/manifests/"),
        gets + 1,
        "moved tag: one GET"
    );
    // Manifests by digest are immutable: never revalidated.
    let before = up.requests();
    b.get(&format!("/v2/ttl/manifests/{}", v2.digest))
        .await
        .bytes();
    assert_eq!(up.requests(), before);
}

async fn cached_tag_with_ttl_zero(up: &Fake, img: &Image, timeout: Duration) -> Berth {
    up.add_image("library/off", "1", img);
    let b = Berth::start(up, |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.tag_ttl = Seconds(Duration::ZERO);
        u.response_timeout = Seconds(timeout);
    })
    .await;
    assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tags_are_served_stale_when_the_upstream_fails_or_rate_limits() {
    let up = Fake::start().await;
    let img = Image::new(7, &[10]);
    let b = cached_tag_with_ttl_zero(&up, &img, Duration::from_secs(5)).await;
    let stale = || {
        b.running
            .as_ref()
            .unwrap()
            .app
            .mirror
            .stale_serves
            .load(Ordering::SeqCst)
    };
    up.st().fail_status = Some((500, None));
    assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    assert_eq!(stale(), 1);
    // Uncached while the upstream is broken: 503, not a hang.
    let r = b.get("/v2/off/manifests/2").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), "UNAVAILABLE");

    up.st().fail_status = Some((429, Some(2)));
    assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    assert_eq!(stale(), 2);
    let r = b
        .get(&format!("/v2/off/blobs/{}", sha256(b"uncached")))
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "TOOMANYREQUESTS");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    // Within Retry-After berth does not ask again at all.
    let before = up.requests();
    assert_eq!(b.get("/v2/off/manifests/2").await.status, 429);
    assert_eq!(up.requests(), before, "no requests during the back-off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_times_out_to_the_cache_or_503() {
    let up = Fake::start().await;
    let img = Image::new(8, &[10]);
    let b = cached_tag_with_ttl_zero(&up, &img, Duration::from_millis(300)).await;
    up.st().hang = true;
    assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    let r = b.get("/v2/off/manifests/other").await;
    assert_eq!(r.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_serves_the_cache_after_a_restart() {
    let up = Fake::start().await;
    let img = Image::new(9, &[1000]);
    let b = cached_tag_with_ttl_zero(&up, &img, Duration::from_secs(2)).await;
    let blob = &img.layers[0];
    assert_eq!(
        b.get(&format!("/v2/off/blobs/{}", sha256(blob)))
            .await
            .bytes(),
        *blob
    );
    let dir = b.stop().await;
    // Same data dir, upstream gone (a port nothing listens on).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let b = Berth::start_in(dir, &up, |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.url = UpstreamUrl::parse(&dead).unwrap();
        u.tag_ttl = Seconds(Duration::ZERO);
    })
    .await;
    assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    assert_eq!(
        b.get(&format!("/v2/off/blobs/{}", sha256(blob)))
            .await
            .bytes(),
        *blob
    );
    assert_eq!(b.get("/v2/off/manifests/never-seen").await.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_routes_to_separate_upstreams_and_caches() {
    let hub = Fake::start().await;
    let ghcr = Fake::start().await;
    let a = Image::new(10, &[100]);
    let g = Image::new(11, &[100]);
    hub.add_image("org/app", "1", &a);
    ghcr.add_image("org/app", "1", &g);
    let ghcr_url = ghcr.url();
    let b = Berth::start(&hub, move |c| {
        c.upstreams.insert(
            "ghcr.io".into(),
            UpstreamConfig::new(UpstreamUrl::parse(&ghcr_url).unwrap()),
        );
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            b.get("/v2/org/app/manifests/1?ns=docker.io").await.bytes(),
            a.manifest
        );
        assert_eq!(
            b.get("/v2/org/app/manifests/1?ns=ghcr.io").await.bytes(),
            g.manifest
        );
        assert_eq!(b.get("/v2/org/app/manifests/1").await.bytes(), a.manifest);
    }
    assert_eq!(hub.count("GET", "/manifests/"), 1);
    assert_eq!(ghcr.count("GET", "/manifests/"), 1);
    let gl = &g.layers[0];
    assert_eq!(
        b.get(&format!("/v2/org/app/blobs/{}?ns=ghcr.io", sha256(gl)))
            .await
            .bytes(),
        *gl
    );
    assert_eq!(ghcr.count("GET", "/blobs/"), 1);
    assert_eq!(hub.count("GET", "/blobs/"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_rate_limit_headers_are_recorded() {
    let up = Fake::start().await;
    up.st().rate_limit_headers = true;
    up.add_image("library/rl", "1", &Image::new(12, &[10]));
    let b = Berth::start(&up, |_| {}).await;
    b.get("/v2/rl/manifests/1").await.bytes();
    let app = b.running.as_ref().unwrap().app.clone();
    let hub = app
        .mirror
        .upstreams()
        .find(|u| u.key == "docker.io")
        .unwrap()
        .clone();
    assert_eq!(hub.ratelimit_remaining.load(Ordering::SeqCst), 42);
    assert_eq!(hub.ratelimit_limit.load(Ordering::SeqCst), 100);
}

/// GETs `path` until it answers `status`, failing the test after `deadline`.
async fn get_until(b: &Berth, path: &str, status: u16, deadline: Duration) -> Reply {
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let r = tokio::time::timeout_at(give_up, b.get(path))
            .await
            .unwrap_or_else(|_| panic!("GET {path} hung past the deadline"));
        if r.status == status {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "GET {path} still answers {} instead of {status}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_capped_and_wedges_nothing() {
    let up = Fake::start().await;
    let img = Image::new(21, &[20_000]);
    up.add_image("library/ra", "1", &img);
    let layer = format!("/v2/ra/blobs/{}", sha256(&img.layers[0]));
    let b = Berth::start(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().max_retry_after =
            Seconds(Duration::from_millis(500));
    })
    .await;
    for huge in [u64::MAX, 999_999_999] {
        up.st().fail_status = Some((429, Some(huge)));
        let r = tokio::time::timeout(Duration::from_secs(10), b.get(&layer))
            .await
            .expect("a cold blob GET during a 429 answers");
        assert_eq!(r.status, 429, "Retry-After {huge}");
        assert_eq!(r.error_code(), "TOOMANYREQUESTS");
        let told: u64 = r.header("retry-after").parse().unwrap();
        assert!(told <= 1, "told clients to wait {told}s");
        let uncached = format!("/v2/ra/manifests/round-{huge}");
        let r = tokio::time::timeout(Duration::from_secs(10), b.get(&uncached))
            .await
            .expect("a manifest GET during a 429 answers");
        assert_eq!(r.status, 429);
        // The upstream recovers: within the cap, pulls work again.
        up.st().fail_status = None;
        assert_eq!(
            get_until(&b, &layer, 200, Duration::from_secs(5))
                .await
                .bytes(),
            img.layers[0]
        );
        assert_eq!(
            get_until(&b, "/v2/ra/manifests/1", 200, Duration::from_secs(5))
                .await
                .bytes(),
            img.manifest
        );
        b.settle().await;
        // Forget the blob so the next round is a cold download again.
        let store = b.running.as_ref().unwrap().app.mirror.store().clone();
        let digest = berth::oci::names::Digest::parse(&sha256(&img.layers[0])).unwrap();
        store
            .remove_blob(berth::store::Area::Cache, &digest)
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_upstream_is_remembered_then_probed() {
    let up = Fake::start().await;
    let img = Image::new(22, &[10]);
    up.add_image("library/off", "1", &img);
    let b = Berth::start(&up, |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.tag_ttl = Seconds(Duration::ZERO);
        u.response_timeout = Seconds(Duration::from_millis(300));
        u.breaker_failures = 2;
        u.breaker_cooldown = Seconds(Duration::from_millis(1500));
    })
    .await;
    assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    assert_eq!(b.get("/v2/off/tags/list").await.status, 200);
    up.st().hang = true;
    // Two requests wait for the timeout; then the upstream is taken for down.
    for _ in 0..2 {
        assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    }
    let app = b.running.as_ref().unwrap().app.clone();
    let docker_hub = app.mirror.upstreams().next().unwrap().clone();
    assert!(docker_hub.is_down());
    // While it is down nothing is sent: stale tags, tag lists, 503s come without asking.
    let sent = up.requests();
    assert_eq!(b.get("/v2/off/manifests/1").await.bytes(), img.manifest);
    let tags = b.get("/v2/off/tags/list").await;
    assert_eq!(tags.status, 200);
    assert_eq!(tags.json()["tags"][0], "1");
    let r = b.get("/v2/off/manifests/other").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), "UNAVAILABLE");
    let r = b.get(&format!("/v2/off/blobs/{}", sha256(b"never"))).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.requests(), sent, "a down upstream was asked anyway");
    let metrics = b.get("/metrics").await.bytes();
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("berth_upstream_down{upstream=\"docker.io\"} 1"),
        "{metrics}"
    );
    // After the cooldown one probe finds it back up, and it is used again.
    up.st().hang = false;
    let r = get_until(&b, "/v2/off/manifests/other", 404, Duration::from_secs(10)).await;
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    assert!(!docker_hub.is_down());
    assert!(up.requests() > sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_downloads_are_counted_by_reason() {
    let up = Fake::start().await;
    let truncated = pseudo_random(23, 200_000);
    let t = up.add_blob(truncated);
    up.st().faults.insert(t.clone(), BlobFault::Truncate(1000));
    let corrupt = pseudo_random(24, 200_000);
    let c = up.add_blob(corrupt);
    up.st().faults.insert(c.clone(), BlobFault::Corrupt);
    let b = Berth::start(&up, |_| {}).await;
    for d in [&t, &c] {
        let r = b.get(&format!("/v2/library/x/blobs/{d}")).await;
        assert!(r.body.is_err() || r.status != 200, "{d} arrived complete");
    }
    b.settle().await;
    let metrics = b.get("/metrics").await.bytes();
    let metrics = String::from_utf8_lossy(&metrics);
    for reason in ["interrupted", "digest_mismatch"] {
        assert!(
            metrics.contains(&format!(
                "berth_downloads_failed_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_cold_blob_is_sent_only_from_verified_bytes() {
    let up = Fake::start().await;
    let blob = pseudo_random(25, 300_000);
    let d = up.add_blob(blob.clone());
    up.st().faults.insert(d.clone(), BlobFault::Corrupt);
    let b = Berth::start(&up, |_| {}).await;
    let path = format!("/v2/library/x/blobs/{d}");
    let r = b.get_with(&path, &[("range", "bytes=0-4999")]).await;
    assert!(
        r.body.is_err() || r.status != 206,
        "a range of a blob that fails verification arrived complete"
    );
    b.settle().await;
    // A good cold blob: the range arrives, right.
    up.st().faults.clear();
    let r = b.get_with(&path, &[("range", "bytes=1000-4999")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), "bytes 1000-4999/300000");
    assert_eq!(r.bytes(), blob.slice(1000..5000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_that_do_not_parse_are_ignored_and_outside_ones_are_416() {
    let up = Fake::start().await;
    let blob = pseudo_random(26, 1000);
    let d = up.add_blob(blob.clone());
    let b = Berth::start(&up, |_| {}).await;
    let path = format!("/v2/library/x/blobs/{d}");
    assert_eq!(b.get(&path).await.bytes(), blob);
    b.settle().await;
    for ignored in ["bytes=5-2", "bytes=abc", "bytes=1-2,5-6", "lines=1-2"] {
        let r = b.get_with(&path, &[("range", ignored)]).await;
        assert_eq!(r.status, 200, "{ignored}");
        assert_eq!(r.bytes(), blob, "{ignored}");
    }
    for outside in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let r = b.get_with(&path, &[("range", outside)]).await;
        assert_eq!(r.status, 416, "{outside}");
        assert_eq!(r.header("content-range"), "bytes */1000", "{outside}");
        assert_eq!(r.error_code(), "RANGE_INVALID");
    }
}
