//! Operating berth: metrics, client rate limits, X-Forwarded-For, the status page, CORS and the
//! request log.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use berth::config::Seconds;
use berth::ops::metrics::sample;
use bytes::Bytes;
use http::Method;
use serde_json::json;
use tokio::sync::Notify;

const DEADLINE: Duration = Duration::from_secs(10);

async fn scrape(b: &Berth) -> String {
    let r = b.get("/metrics").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.header("content-type")
            .starts_with("application/openmetrics-text"),
        "{}",
        r.header("content-type")
    );
    String::from_utf8(r.bytes().to_vec()).unwrap()
}

type Want<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Scrapes until every sample has the wanted value: responses are counted when their body is
/// done, which may be a moment after the client has read it.
async fn wait_metrics(b: &Berth, wants: &[Want<'_>]) -> String {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(b).await;
        let wrong: Vec<String> = wants
            .iter()
            .filter_map(|(name, labels, want)| {
                let got = sample(&text, name, labels);
                (got != *want).then(|| format!("{name}{labels:?} is {got}, not {want}"))
            })
            .collect();
        if wrong.is_empty() {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{}\n{text}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn app(b: &Berth) -> Arc<berth::ops::Service> {
    b.running.as_ref().unwrap().app.clone()
}

fn rate_limited(c: &mut berth::config::Config, rps: f64, burst: u32) {
    c.rate_limit.per_client_rps = Some(rps);
    c.rate_limit.burst = Some(burst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_hits_misses_and_the_bytes_really_sent() {
    let up = Fake::start().await;
    up.st().rate_limit_headers = true;
    let img = Image::new(1, &[50_000]);
    up.add_image("library/alpine", "3", &img);
    let layer = &img.layers[0];
    let layer_path = format!("/v2/alpine/blobs/{}", sha256(layer));
    let b = Berth::start(&up, |c| c.max_cache_size = berth::config::ByteSize(1 << 30)).await;

    for _ in 0..2 {
        assert_eq!(b.get("/v2/alpine/manifests/3").await.bytes(), img.manifest);
        assert_eq!(b.get(&layer_path).await.bytes(), *layer);
        b.settle().await;
    }
    // A HEAD declares the length and sends nothing; a range sends ten bytes.
    let head = b.head(&layer_path).await;
    assert_eq!(head.header("content-length"), layer.len().to_string());
    let range = b.get_with(&layer_path, &[("range", "bytes=0-9")]).await;
    assert_eq!(range.status, 206);
    assert_eq!(range.bytes().len(), 10);

    let from_cache = (img.manifest.len() + layer.len() + 10) as f64;
    let from_upstream = (img.manifest.len() + layer.len()) as f64;
    let text = wait_metrics(
        &b,
        &[
            (
                "berth_served_bytes_total",
                &[("outcome", "hit")],
                from_cache,
            ),
            (
                "berth_served_bytes_total",
                &[("outcome", "miss")],
                from_upstream,
            ),
            ("berth_http_requests_total", &[("route", "blob")], 4.0),
            ("berth_http_requests_total", &[("route", "manifest")], 2.0),
        ],
    )
    .await;
    let m = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    let manifest = [("kind", "manifest")];
    assert_eq!(
        m(
            "berth_cache_requests_total",
            &[manifest[0], ("outcome", "miss")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "berth_cache_requests_total",
            &[manifest[0], ("outcome", "hit")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "berth_cache_requests_total",
            &[("kind", "blob"), ("outcome", "miss")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "berth_cache_requests_total",
            &[("kind", "blob"), ("outcome", "hit")]
        ),
        3.0
    );
    assert_eq!(
        m(
            "berth_http_requests_total",
            &[("route", "manifest"), ("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        m(
            "berth_http_requests_total",
            &[("route", "blob"), ("status", "206")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "berth_http_request_duration_seconds_count",
            &[("route", "manifest")]
        ),
        2.0
    );
    assert_eq!(m("berth_cache_served_bytes_total", &[]), from_cache);
    assert_eq!(
        m("berth_upstream_fetched_bytes_total", &[]),
        layer.len() as f64
    );
    assert!(
        m(
            "berth_upstream_requests_total",
            &[("upstream", "docker.io"), ("status", "200")]
        ) >= 2.0
    );
    assert_eq!(m("berth_upstream_errors_total", &[]), 0.0);
    assert_eq!(
        m(
            "berth_upstream_ratelimit_remaining",
            &[("upstream", "docker.io")]
        ),
        42.0
    );
    assert_eq!(
        m(
            "berth_upstream_ratelimit_limit",
            &[("upstream", "docker.io")]
        ),
        100.0
    );
    assert!(m("berth_disk_cache_bytes", &[]) >= (img.manifest.len() + layer.len()) as f64);
    assert_eq!(m("berth_disk_cache_limit_bytes", &[]), (1u64 << 30) as f64);
    assert_eq!(m("berth_disk_cache_evictions_total", &[]), 0.0);
    assert_eq!(m("berth_downloads_in_flight", &[]), 0.0);
    assert_eq!(m("berth_downloads_started_total", &[]), 1.0);
    assert!(text.ends_with("# EOF\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_serve_and_the_upstream_error_behind_it_are_counted() {
    let up = Fake::start().await;
    let img = Image::new(2, &[100]);
    up.add_image("library/web", "1", &img);
    let b = Berth::start(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().tag_ttl = Seconds(Duration::ZERO);
    })
    .await;
    assert_eq!(b.get("/v2/web/manifests/1").await.status, 200);
    up.st().fail_status = Some((503, None));
    let r = b.get("/v2/web/manifests/1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), img.manifest);
    let text = scrape(&b).await;
    let m = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(
        m(
            "berth_cache_requests_total",
            &[("kind", "manifest"), ("outcome", "stale")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "berth_cache_requests_total",
            &[("kind", "manifest"), ("outcome", "miss")]
        ),
        1.0
    );
    assert_eq!(m("berth_stale_serves_total", &[]), 1.0);
    assert!(
        m(
            "berth_upstream_errors_total",
            &[("upstream", "docker.io"), ("status", "503")]
        ) >= 1.0,
        "{text}"
    );
    // The status page shows the error against the upstream.
    let page = String::from_utf8(b.get("/").await.bytes().to_vec()).unwrap();
    assert!(page.contains("answered 503"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_joining_a_download_is_counted_as_joined() {
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(3, 400_000, 100_000);
    let b = Berth::start(&up, |_| {}).await;
    let url = b.url(&format!("/v2/library/big/blobs/{d}"));
    let first = spawn_get(&url, &[]);
    let app = app(&b);
    wait_for("the first request to start the download", DEADLINE, || {
        app.mirror.fetches.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = spawn_get(&url, &[]);
    wait_for("the second request to join", DEADLINE, || {
        app.mirror.fetches.joined.load(Ordering::SeqCst) == 1
    })
    .await;
    let during = scrape(&b).await;
    assert_eq!(sample(&during, "berth_downloads_in_flight", &[]), 1.0);
    gate.notify_one();
    for c in [first, second] {
        assert_eq!(c.await.unwrap().bytes(), blob);
    }
    let text = wait_metrics(
        &b,
        &[
            (
                "berth_served_bytes_total",
                &[("outcome", "joined")],
                blob.len() as f64,
            ),
            ("berth_downloads_in_flight", &[], 0.0),
        ],
    )
    .await;
    let m = |labels: &[(&str, &str)]| sample(&text, "berth_cache_requests_total", labels);
    assert_eq!(m(&[("kind", "blob"), ("outcome", "joined")]), 1.0);
    assert_eq!(m(&[("kind", "blob"), ("outcome", "miss")]), 1.0);
    assert_eq!(sample(&text, "berth_downloads_joined_total", &[]), 1.0);
    assert_eq!(sample(&text, "berth_downloads_in_flight", &[]), 0.0);
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_moves_metrics_to_their_own_listener() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    assert_eq!(b.get("/v2/").await.status, 200);
    let r = b.get("/metrics").await;
    assert_eq!(r.status, 404);
    let at = b.running.as_ref().unwrap().metrics_addr.unwrap();
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = send(Method::GET, &format!("http://{at}/metrics"), &[]).await;
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.bytes().to_vec()).unwrap();
        if sample(&text, "berth_http_requests_total", &[("route", "base")]) == 1.0 {
            assert_eq!(
                sample(&text, "berth_http_requests_total", &[("route", "metrics")]),
                1.0,
                "the 404 on the main listener is counted"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < end, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = send(Method::GET, &format!("http://{at}/v2/"), &[]).await;
    assert_eq!(other.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_client_limit_gets_429_with_retry_after() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| rate_limited(c, 0.1, 3)).await;
    for _ in 0..3 {
        assert_eq!(b.get("/v2/").await.status, 200);
    }
    let r = b.get("/v2/").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "TOOMANYREQUESTS");
    let after: u64 = r
        .header("retry-after")
        .parse()
        .expect("Retry-After seconds");
    assert!((1..=10).contains(&after), "Retry-After {after}");
    // Probes are never limited.
    for _ in 0..5 {
        assert_eq!(b.get("/healthz").await.status, 200);
        assert_eq!(b.get("/readyz").await.status, 200);
    }
    let text = scrape(&b).await;
    assert_eq!(
        sample(
            &text,
            "berth_ratelimited_requests_total",
            &[("limit", "client")]
        ),
        1.0
    );
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_are_exempt_when_configured() {
    let up = Fake::start().await;
    let img = Image::new(4, &[1000]);
    up.add_image("library/alpine", "3", &img);
    let b = Berth::start(&up, |c| {
        rate_limited(c, 0.1, 2);
        c.rate_limit.exempt_cache_hits = true;
    })
    .await;
    let layer = format!("/v2/alpine/blobs/{}", sha256(&img.layers[0]));
    // Two misses use the burst.
    assert_eq!(b.get("/v2/alpine/manifests/3").await.status, 200);
    assert_eq!(b.get(&layer).await.status, 200);
    b.settle().await;
    // Hits, and requests that need no upstream, are free.
    for _ in 0..10 {
        assert_eq!(b.get("/v2/").await.status, 200);
        assert_eq!(b.get("/v2/alpine/manifests/3").await.status, 200);
        let r = b.get(&layer).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.bytes(), img.layers[0]);
    }
    // The next miss is one too many, and is refused before the upstream is asked.
    let config_blob = sha256(&img.config);
    let r = b.get(&format!("/v2/alpine/blobs/{config_blob}")).await;
    assert_eq!(r.status, 429);
    assert!(!r.header("retry-after").is_empty());
    assert_eq!(up.count("GET", &config_blob), 0);
    assert_eq!(b.get("/v2/alpine/manifests/3").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let up = Fake::start().await;
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    // From a trusted proxy every forwarded client has its own quota.
    let b = Berth::start(&up, |c| {
        rate_limited(c, 0.1, 1);
        c.trusted_proxies = vec![berth::config::IpNet::parse("127.0.0.0/8").unwrap()];
    })
    .await;
    assert_eq!(b.get_with("/v2/", &xff("203.0.113.5")).await.status, 200);
    assert_eq!(b.get_with("/v2/", &xff("203.0.113.5")).await.status, 429);
    assert_eq!(b.get_with("/v2/", &xff("203.0.113.6")).await.status, 200);
    // A client cannot pick an address by prepending it: the proxy appended the real one.
    assert_eq!(
        b.get_with("/v2/", &xff("198.51.100.1, 203.0.113.6"))
            .await
            .status,
        429
    );
    assert_eq!(
        b.get("/v2/").await.status,
        200,
        "the proxy itself is a client too"
    );
    // From anyone else the header is ignored: all these are the same client.
    let b2 = Berth::start(&up, |c| {
        rate_limited(c, 0.1, 1);
        c.trusted_proxies = vec![berth::config::IpNet::parse("10.9.9.9").unwrap()];
    })
    .await;
    assert_eq!(b2.get_with("/v2/", &xff("203.0.113.5")).await.status, 200);
    assert_eq!(b2.get_with("/v2/", &xff("203.0.113.6")).await.status, 429);
    assert_eq!(b2.get("/v2/").await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_downloads_queue_for_an_upstream_fetch_slot() {
    let up = Fake::start().await;
    let (a, b_blob) = (pseudo_random(11, 300_000), pseudo_random(12, 1000));
    let (da, db) = (up.add_blob(a.clone()), up.add_blob(b_blob.clone()));
    let gate = Arc::new(Notify::new());
    up.st()
        .faults
        .insert(da.clone(), BlobFault::Gate(100_000, gate.clone()));
    let b = Berth::start(&up, |c| c.rate_limit.max_upstream_concurrency = Some(1)).await;
    let first = spawn_get(&b.url(&format!("/v2/library/x/blobs/{da}")), &[]);
    let app = app(&b);
    wait_for("the first download to hold the slot", DEADLINE, || {
        app.mirror.slots.in_use() == 1 && up.count("GET", &da) == 1
    })
    .await;
    let second = spawn_get(&b.url(&format!("/v2/library/x/blobs/{db}")), &[]);
    wait_for("the second download to queue", DEADLINE, || {
        app.mirror.fetches.in_flight() == 2
    })
    .await;
    let text = scrape(&b).await;
    assert_eq!(sample(&text, "berth_upstream_fetch_slots_in_use", &[]), 1.0);
    assert_eq!(sample(&text, "berth_upstream_fetch_slots_max", &[]), 1.0);
    // The only slot is held until the gate opens, so the second cannot have gone upstream.
    assert_eq!(up.count("GET", &db), 0);
    gate.notify_one();
    assert_eq!(first.await.unwrap().bytes(), a);
    assert_eq!(second.await.unwrap().bytes(), b_blob);
    assert_eq!(up.count("GET", &db), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requests_over_upstream_rps_are_refused_with_retry_after() {
    let up = Fake::start().await;
    let img = Image::new(13, &[10]);
    up.add_image("library/alpine", "3", &img);
    let b = Berth::start(&up, |c| c.rate_limit.upstream_rps = Some(0.05)).await;
    assert_eq!(b.get("/v2/alpine/manifests/3").await.status, 200);
    let r = b
        .get(&format!("/v2/alpine/blobs/{}", sha256(&img.layers[0])))
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    let after: u64 = r.header("retry-after").parse().unwrap();
    assert!((5..=21).contains(&after), "Retry-After {after}");
    assert_eq!(up.count("GET", "/blobs/"), 0);
    let text = scrape(&b).await;
    assert_eq!(
        sample(
            &text,
            "berth_ratelimited_requests_total",
            &[("limit", "upstream_rps")]
        ),
        1.0
    );
    // Still a hit for what is cached.
    assert_eq!(b.get("/v2/alpine/manifests/3").await.status, 200);
}

fn html(r: &Reply) -> String {
    assert!(
        r.header("content-type").starts_with("text/html"),
        "{}",
        r.header("content-type")
    );
    String::from_utf8(r.bytes().to_vec()).unwrap()
}

/// The percentage in the element with this id, e.g. `id="hit-ratio">66.7%`.
fn percent_in(page: &str, id: &str) -> f64 {
    let marker = format!("id=\"{id}\">");
    let at = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {id} in {page}"));
    let rest = &page[at + marker.len()..];
    rest[..rest
        .find('%')
        .unwrap_or_else(|| panic!("{id} is not a percentage: {rest:.40}"))]
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_lists_repositories_and_a_hit_ratio() {
    let up = Fake::start().await;
    let (alpine, app_img) = (Image::new(5, &[3000, 5000]), Image::new(6, &[7000]));
    up.add_image("library/alpine", "3.19", &alpine);
    up.add_image("team/app", "v1", &app_img);
    let b = Berth::start(&up, |_| {}).await;
    let page = html(&b.get("/").await);
    assert!(page.contains("Nothing cached yet"), "{page}");
    for _ in 0..3 {
        b.pull("alpine", "3.19", &alpine).await;
    }
    b.pull("team/app", "v1", &app_img).await;
    let r = b.get("/").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-security-policy")
        .contains("default-src 'none'"));
    let page = html(&r);
    for s in ["library/alpine", "team/app", "3.19", "v1"] {
        assert!(page.contains(s), "{s} missing from {page}");
    }
    // The default upstream (the fake, not Docker Hub) is shown by its host, with the key that
    // `?ns=` names it by; links keep the key.
    let host = up.url().trim_start_matches("http://").to_owned();
    assert!(
        page.contains(&format!(
            "<td>{host} <span class=\"muted\">(?ns=docker.io)</span></td>"
        )),
        "{page}"
    );
    assert!(
        page.contains(&format!("<td>{host}</td>")),
        "repositories' upstream: {page}"
    );
    assert!(
        !page.contains(">docker.io<"),
        "not called Docker Hub: {page}"
    );
    assert!(!page.contains("<script"), "no JavaScript");
    let ratio = percent_in(&page, "hit-ratio");
    // Three pulls of four items (manifest, config, two layers) and one of three: 15 lookups,
    // of which the 8 of the second and third pulls are hits.
    assert!(
        (ratio - 8.0 / 15.0 * 100.0).abs() < 0.1,
        "hit ratio {ratio}"
    );
    assert!(percent_in(&page, "hit-ratio-today") > 0.0);
    assert!(
        page.contains("href=\"/ui/repo/docker.io/library/alpine\""),
        "{page}"
    );
    // The most pulled image comes first.
    let top = page.find("Most pulled").unwrap();
    let alpine_at = page[top..].find("library/alpine:3.19").unwrap();
    let app_at = page[top..].find("team/app:v1").unwrap();
    assert!(alpine_at < app_at);

    let repo = b.get("/ui/repo/docker.io/library/alpine").await;
    assert_eq!(repo.status, 200);
    let repo = html(&repo);
    assert!(repo.contains("3.19"), "{repo}");
    assert!(
        repo.contains(&alpine.digest[7..19]),
        "short digest in {repo}"
    );
    // The size of the image: manifest, config and layers.
    let size = alpine.manifest.len() + alpine.config.len() + 8000;
    assert!(
        repo.contains(&format!("{:.1} KiB", size as f64 / 1024.0)),
        "{repo}"
    );
    for missing in [
        "/ui/repo/docker.io/library/nope",
        "/ui/repo/..%2F..%2Fetc/passwd",
        "/ui/whatever",
    ] {
        assert_eq!(b.get(missing).await.status, 404, "{missing}");
    }
}

/// Pushes an image into the private namespace through the registry API.
async fn push_private(b: &Berth, name: &str, tag: &str, img: &Image, auth: &str) {
    for blob in img.blobs() {
        let url = b.url(&format!(
            "/v2/{name}/blobs/uploads/?digest={}",
            sha256(&blob)
        ));
        let r = send_body(Method::POST, &url, &[("authorization", auth)], blob).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    let url = b.url(&format!("/v2/{name}/manifests/{tag}"));
    let headers = [("authorization", auth), ("content-type", img.media_type)];
    let r = send_body(Method::PUT, &url, &headers, img.manifest.clone()).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_repositories_are_not_listed_to_anonymous_visitors() {
    let up = Fake::start().await;
    let public = Image::new(7, &[10]);
    up.add_image("library/alpine", "3", &public);
    let secret = Image::new(8, &[10]);
    let users = tempfile::tempdir().unwrap();
    let htpasswd = users.path().join("htpasswd");
    berth::auth::add_user(&htpasswd, "alice", "pw", 4).unwrap();
    use base64::Engine as _;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:pw")
    );
    for open in [false, true] {
        let b = Berth::start(&up, |c| {
            c.private_ns = vec!["private".into()];
            c.private_pull_public = open;
            c.htpasswd = Some(htpasswd.clone());
        })
        .await;
        b.pull("alpine", "3", &public).await;
        push_private(&b, "private/secret-app", "v1", &secret, &auth).await;
        let path = format!("/v2/private/secret-app/manifests/{}", secret.digest);
        assert_eq!(
            b.get_with(&path, &[("authorization", &auth)]).await.status,
            200
        );
        let page = html(&b.get("/").await);
        assert!(page.contains("library/alpine"));
        assert_eq!(page.contains("secret-app"), open, "{page}");
        let repo = b.get("/ui/repo/_local/private/secret-app").await;
        assert_eq!(repo.status, if open { 200 } else { 404 });
        // A signed-in visitor sees the private namespace either way.
        let page = html(&b.get_with("/", &[("authorization", &auth)]).await);
        assert!(page.contains("secret-app"), "{page}");
        let repo = b
            .get_with(
                "/ui/repo/_local/private/secret-app",
                &[("authorization", &auth)],
            )
            .await;
        assert_eq!(repo.status, 200);
        assert!(html(&repo).contains("v1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_headers_for_a_browser_ui() {
    let up = Fake::start().await;
    let img = Image::new(9, &[10]);
    up.add_image("library/alpine", "3", &img);
    let b = Berth::start(&up, |c| c.cors_origins = vec!["https://ui.example".into()]).await;
    let preflight = |origin: &'static str| {
        let url = b.url("/v2/alpine/tags/list");
        async move {
            send(
                Method::OPTIONS,
                &url,
                &[
                    ("origin", origin),
                    ("access-control-request-method", "GET"),
                    ("access-control-request-headers", "authorization"),
                ],
            )
            .await
        }
    };
    let r = preflight("https://ui.example").await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        "https://ui.example"
    );
    assert!(r.header("access-control-allow-methods").contains("GET"));
    assert!(r
        .header("access-control-allow-headers")
        .contains("Authorization"));
    for h in [
        "Docker-Content-Digest",
        "Link",
        "Content-Length",
        "Docker-Distribution-Api-Version",
    ] {
        assert!(r.header("access-control-expose-headers").contains(h), "{h}");
    }
    assert_eq!(r.header("access-control-allow-credentials"), "true");
    let denied = preflight("https://evil.example").await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("access-control-allow-origin"), "");

    let r = b
        .get_with(
            "/v2/alpine/manifests/3",
            &[("origin", "https://ui.example")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        "https://ui.example"
    );
    assert!(r
        .header("access-control-expose-headers")
        .contains("Docker-Content-Digest"));
    let r = b
        .get_with("/v2/", &[("origin", "https://evil.example")])
        .await;
    assert_eq!(r.header("access-control-allow-origin"), "");

    // Without cors_origins nothing changes: OPTIONS is not a registry method.
    let plain = Berth::start(&up, |_| {}).await;
    let r = send(
        Method::OPTIONS,
        &plain.url("/v2/"),
        &[
            ("origin", "https://ui.example"),
            ("access-control-request-method", "GET"),
        ],
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("access-control-allow-origin"), "");
    let any = Berth::start(&up, |c| c.cors_origins = vec!["*".into()]).await;
    let r = any
        .get_with("/v2/", &[("origin", "https://x.example")])
        .await;
    assert_eq!(r.header("access-control-allow-origin"), "*");
}

fn request_lines(logs: &Mutex<Vec<u8>>, path: &str) -> Vec<serde_json::Value> {
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request" && v["path"] == path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_log_has_bytes_sent_and_no_secrets() {
    let logs = captured_logs();
    let up = Fake::start().await;
    let img = Image::new(10, &[10]);
    up.add_image("library/logged", "1", &img);
    let b = Berth::start(&up, |_| {}).await;
    assert_eq!(b.get("/healthz").await.status, 200);
    let path = "/v2/logged/manifests/1";
    let r = b
        .get_with(
            &format!("{path}?token=QUERYSECRET"),
            &[("authorization", "Bearer HEADERSECRET")],
        )
        .await;
    assert_eq!(r.status, 200);
    let head = b.head(path).await;
    assert_eq!(head.status, 200);
    wait_for("two log lines", DEADLINE, || {
        request_lines(&logs, path).len() == 2
    })
    .await;
    let lines = request_lines(&logs, path);
    let get = lines.iter().find(|l| l["method"] == "GET").unwrap();
    assert_eq!(get["client"], "127.0.0.1");
    assert_eq!(get["status"], 200);
    assert_eq!(get["bytes"], img.manifest.len());
    assert_eq!(get["cache"], "miss");
    // The default upstream pointed at another registry is called by that registry's host.
    let host = up.url().trim_start_matches("http://").to_owned();
    assert_eq!(get["upstream"], host);
    assert_eq!(get["route"], "manifest");
    assert!(get["ms"].as_f64().is_some());
    assert_eq!(get["level"], "INFO");
    let head = lines.iter().find(|l| l["method"] == "HEAD").unwrap();
    assert_eq!(
        head["bytes"], 0,
        "a HEAD sends no body, whatever its Content-Length"
    );
    assert_eq!(head["cache"], "hit");
    let all = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(!all.contains("QUERYSECRET"), "query strings are not logged");
    assert!(!all.contains("HEADERSECRET"), "headers are not logged");
    assert!(
        request_lines(&logs, "/healthz").is_empty(),
        "probes log at debug only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_index_costs_the_status_page_a_bounded_number_of_reads() {
    let up = Fake::start().await;
    // An index with 10,000 children, none of which exists.
    let children: Vec<_> = (0..10_000u32)
        .map(|i| {
            json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "size": 500,
                "digest": sha256(&i.to_le_bytes()),
                "platform": {"architecture": "amd64", "os": "linux"},
            })
        })
        .collect();
    let index = Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": children,
        }))
        .unwrap(),
    );
    up.add_manifest("library/crafted", "1", index.clone(), OCI_INDEX);
    let img = Image::new(9, &[100]);
    up.add_image("library/plain", "1", &img);
    let b = Berth::start(&up, |_| {}).await;
    let r = b
        .get_with("/v2/library/crafted/manifests/1", &[("accept", OCI_INDEX)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), index);
    // 600 more repositories, as the cache files them.
    let cache = b.dir.path().join("cache/repos/docker.io");
    for i in 0..600 {
        std::fs::create_dir_all(cache.join(format!("many/r{i:03}/_tags"))).unwrap();
    }
    let app = app(&b);
    let before = app.pages.manifest_reads();

    // 32 visitors at once share one listing, which reads at most 128 of the children.
    let visits: Vec<_> = (0..32).map(|_| spawn_get(&b.url("/"), &[])).collect();
    for v in visits {
        let r = v.await.unwrap();
        assert_eq!(r.status, 200);
        let page = html(&r);
        assert!(page.contains("library/crafted"), "{page}");
        assert!(page.contains("Repositories (500+)"), "{page}");
    }
    let reads = app.pages.manifest_reads() - before;
    assert!(reads <= 1 + 128, "{reads} manifest reads");
    // The repository's page and later listings reuse the summary.
    let r = b.get("/ui/repo/docker.io/library/crafted").await;
    assert_eq!(r.status, 200);
    assert!(html(&r).contains("index, 10000 platforms"));
    b.pull("plain", "1", &img).await;
    assert_eq!(b.get("/").await.status, 200);
    let r = b.get("/ui/repo/docker.io/library/plain").await;
    assert!(html(&r).contains(&img.digest[7..19]));
    // Only the new image's manifest was read since.
    assert_eq!(app.pages.manifest_reads() - before, reads + 1);
    assert_eq!(app.pages.truncated_indexes(), 1);
    let text = scrape(&b).await;
    assert!(
        sample(&text, "berth_status_manifest_reads_total", &[]) >= (reads + 1) as f64,
        "{text}"
    );
}
