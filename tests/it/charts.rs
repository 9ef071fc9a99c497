//! The status page's savings charts and its in-flight lists: chart totals against `/metrics`,
//! the history across restarts (and a corrupt history file), downloads and uploads under way.

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use berth::ops::metrics::sample;
use http::Method;

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// What the charts total, and what `/metrics` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Totals {
    cache_bytes: u64,
    upstream_bytes: u64,
    hits: u64,
    lookups: u64,
    pulls_avoided: u64,
}

/// The `data-<name>` attribute of the element with this id.
fn attr(page: &str, id: &str, name: &str) -> u64 {
    let at = page
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} on the page"));
    let tag = &page[at..at + page[at..].find('>').unwrap()];
    let marker = format!("data-{name}=\"");
    let v = &tag[tag
        .find(&marker)
        .unwrap_or_else(|| panic!("no data-{name} on #{id}: {tag}"))
        + marker.len()..];
    v[..v.find('"').unwrap()].parse().unwrap()
}

/// The totals of one scale's charts (`hours` or `days`).
fn chart_totals(page: &str, scale: &str) -> Totals {
    let bytes = format!("chart-{scale}-bytes");
    let ratio = format!("chart-{scale}-ratio");
    Totals {
        cache_bytes: attr(page, &bytes, "cache-bytes"),
        upstream_bytes: attr(page, &bytes, "upstream-bytes"),
        hits: attr(page, &ratio, "hits"),
        lookups: attr(page, &ratio, "lookups"),
        pulls_avoided: attr(page, &format!("chart-{scale}-pulls"), "pulls-avoided"),
    }
}

fn metric_totals(text: &str) -> Totals {
    let n = |name: &str, labels: &[(&str, &str)]| sample(text, name, labels) as u64;
    let outcome = |o| n("berth_cache_requests_total", &[("outcome", o)]);
    Totals {
        cache_bytes: n("berth_cache_served_bytes_total", &[]),
        upstream_bytes: n("berth_upstream_fetched_bytes_total", &[]),
        hits: outcome("hit") + outcome("stale"),
        lookups: outcome("hit") + outcome("stale") + outcome("miss") + outcome("joined"),
        pulls_avoided: n("berth_pulls_avoided_total", &[]),
    }
}

async fn page(b: &Berth, headers: &[(&str, &str)]) -> String {
    let r = b.get_with("/", headers).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    String::from_utf8(r.bytes().to_vec()).unwrap()
}

/// The page's totals once they equal `/metrics`' plus `before` (responses are counted when
/// their body is done, a moment after the client has it), on both scales.
async fn totals_agreeing(b: &Berth, before: Totals) -> (Totals, String) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let metrics = String::from_utf8(b.get("/metrics").await.bytes().to_vec()).unwrap();
        let m = metric_totals(&metrics);
        let want = Totals {
            cache_bytes: before.cache_bytes + m.cache_bytes,
            upstream_bytes: before.upstream_bytes + m.upstream_bytes,
            hits: before.hits + m.hits,
            lookups: before.lookups + m.lookups,
            pulls_avoided: before.pulls_avoided + m.pulls_avoided,
        };
        let p = page(b, &[]).await;
        let (hours, days) = (chart_totals(&p, "hours"), chart_totals(&p, "days"));
        if hours == want && days == want {
            return (want, metrics);
        }
        assert!(
            tokio::time::Instant::now() < end,
            "charts (hours {hours:?}, days {days:?}) never agreed with /metrics ({want:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_totals_equal_the_metrics_after_cold_and_warm_pulls() {
    let up = Fake::start().await;
    let (alpine, app_img) = (Image::new(31, &[3000, 5000]), Image::new(32, &[7000]));
    up.add_image("library/alpine", "3.19", &alpine);
    up.add_image("team/app", "v1", &app_img);
    let b = Berth::start(&up, |_| {}).await;
    let empty = page(&b, &[]).await;
    assert_eq!(chart_totals(&empty, "hours"), Totals::default());
    assert!(empty.contains("nothing yet"));
    // Cold pulls, then warm ones; a HEAD of a cached tag and a GET by digest.
    b.pull("alpine", "3.19", &alpine).await;
    b.pull("team/app", "v1", &app_img).await;
    for _ in 0..2 {
        b.pull("alpine", "3.19", &alpine).await;
    }
    assert_eq!(b.head("/v2/alpine/manifests/3.19").await.status, 200);
    let by_digest = format!("/v2/team/app/manifests/{}", app_img.digest);
    assert_eq!(b.get(&by_digest).await.status, 200);

    let (totals, metrics) = totals_agreeing(&b, Totals::default()).await;
    // What those pulls come to: every blob fetched once; the warm manifest GETs (two by tag, one
    // by digest; the HEAD is not a pull) avoided a pull upstream.
    let blob_bytes: usize = [&alpine, &app_img]
        .iter()
        .flat_map(|i| i.blobs())
        .map(|b| b.len())
        .sum();
    assert_eq!(totals.upstream_bytes, blob_bytes as u64);
    assert_eq!(totals.pulls_avoided, 3);
    assert_eq!(
        sample(
            &metrics,
            "berth_pulls_avoided_total",
            &[("upstream", "docker.io")]
        ),
        3.0
    );
    let warm = 2 * (alpine.manifest.len() + alpine.config.len() + 8000) + app_img.manifest.len();
    assert_eq!(totals.cache_bytes, warm as u64);
    // Lookups: 4 + 3 cold, 2 x 4 warm, the HEAD and the GET by digest; hits are the warm ones.
    assert_eq!((totals.hits, totals.lookups), (10, 17));

    let p = page(&b, &[]).await;
    // Accessible charts: a title each, and a title with its value on every bar and point.
    for id in [
        "chart-hours-bytes",
        "chart-hours-ratio",
        "chart-hours-pulls",
        "chart-days-bytes",
        "chart-days-ratio",
        "chart-days-pulls",
    ] {
        assert!(p.contains(&format!("<title id=\"{id}-title\">")), "{id}");
    }
    // Cache, upstream and pulls bars in one bucket per scale (two if the pulls straddled the
    // turn of an hour or day).
    let bars = p.matches("<rect ").count();
    assert!((6..=12).contains(&bars), "{bars} bars: {p}");
    assert_eq!(p.matches("</title></rect>").count(), bars);
    let points = p.matches("<circle ").count();
    assert!((2..=4).contains(&points), "{points} points");
    assert_eq!(p.matches("lookups)</title></circle>").count(), points);
    assert!(
        p.contains("id=\"chart-days-ratio-total\">58.8%</span> (10 of 17 lookups)"),
        "{p}"
    );
    // The bars' values add up to the totals.
    let days = &p[p.find("id=\"chart-days-bytes\"").unwrap()..];
    let days = &days[..days.find("</svg>").unwrap()];
    let upstream: u64 = days
        .split("<rect class=\"upstream-bytes\"")
        .skip(1)
        .map(|r| {
            let v = &r[r.find("data-value=\"").unwrap() + 12..];
            v[..v.find('"').unwrap()].parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(upstream, blob_bytes as u64);
    assert!(!p.contains("<script"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_survives_a_restart_and_a_corrupt_file_with_a_warning() {
    let logs = captured_logs();
    let up = Fake::start().await;
    let img = Image::new(33, &[4000]);
    up.add_image("library/busybox", "1", &img);
    let b = Berth::start(&up, |_| {}).await;
    b.pull("busybox", "1", &img).await;
    b.pull("busybox", "1", &img).await;
    let (first, _) = totals_agreeing(&b, Totals::default()).await;
    assert!(first.cache_bytes > 0 && first.upstream_bytes > 0 && first.pulls_avoided == 1);
    let dir = b.stop().await;
    let file = dir.path().join("state").join("traffic-history.json");
    assert!(file.is_file(), "no history written at shutdown");

    // The same data dir: the charts start where they were; the counters start at zero.
    let b = Berth::start_in(dir, &up, |_| {}).await;
    let p = page(&b, &[]).await;
    assert_eq!(chart_totals(&p, "hours"), first);
    assert_eq!(chart_totals(&p, "days"), first);
    b.pull("busybox", "1", &img).await;
    let (second, metrics) = totals_agreeing(&b, first).await;
    assert_eq!(second.pulls_avoided, 2);
    assert_eq!(
        sample(&metrics, "berth_status_history_failures_total", &[]),
        0.0
    );
    let dir = b.stop().await;

    // A corrupt file: berth starts, says so, counts it, and the charts start empty.
    std::fs::write(&file, b"{\"version\":1,\"hours\":[{\"at\":").unwrap();
    let b = Berth::start_in(dir, &up, |_| {}).await;
    let p = page(&b, &[]).await;
    assert_eq!(chart_totals(&p, "days"), Totals::default());
    let path = file.display().to_string();
    wait_for("a WARN about the history file", DEADLINE, || {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        text.lines().any(|l| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                return false;
            };
            v["level"] == "WARN"
                && v["path"] == path.as_str()
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("traffic history cannot be read"))
        })
    })
    .await;
    let metrics = String::from_utf8(b.get("/metrics").await.bytes().to_vec()).unwrap();
    assert_eq!(
        sample(
            &metrics,
            "berth_status_history_failures_total",
            &[("op", "load")]
        ),
        1.0
    );
    // And it keeps counting: a pull shows, and the next stop writes a good file again.
    b.pull("busybox", "1", &img).await;
    let (third, _) = totals_agreeing(&b, Totals::default()).await;
    assert_eq!(third.pulls_avoided, 1);
    let dir = b.stop().await;
    let b = Berth::start_in(dir, &up, |_| {}).await;
    assert_eq!(chart_totals(&page(&b, &[]).await, "days"), third);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_and_uploads_in_flight_are_listed_to_signed_in_visitors_only() {
    let up = Fake::start().await;
    let (blob, digest, gate) = up.add_gated_blob(34, 300_000, 100_000);
    let users = tempfile::tempdir().unwrap();
    let htpasswd = users.path().join("htpasswd");
    berth::auth::add_user(&htpasswd, "alice", "pw", 4).unwrap();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:pw")
    );
    let signed_in = [("authorization", auth.as_str())];
    let b = Berth::start(&up, |c| {
        c.private_ns = vec!["private".into()];
        c.htpasswd = Some(htpasswd.clone());
    })
    .await;
    let app = b.running.as_ref().unwrap().app.clone();
    let p = page(&b, &[]).await;
    assert!(
        !p.contains("id=\"private-hidden\""),
        "no private repository yet"
    );

    // A private repository with a tag, and an upload session left open with some bytes in it.
    let secret = Image::new(35, &[10]);
    for blob in secret.blobs() {
        let url = b.url(&format!(
            "/v2/private/secret-app/blobs/uploads/?digest={}",
            sha256(&blob)
        ));
        let r = send_body(Method::POST, &url, &signed_in, blob).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", secret.media_type),
    ];
    let url = b.url("/v2/private/secret-app/manifests/v1");
    let r = send_body(Method::PUT, &url, &headers, secret.manifest.clone()).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = send(
        Method::POST,
        &b.url("/v2/private/wip-upload/blobs/uploads/"),
        &signed_in,
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let location = r.header("location").to_owned();
    let r = send_body(
        Method::PATCH,
        &b.url(&location),
        &signed_in,
        pseudo_random(36, 12_345),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);

    // A download held part-way by the upstream.
    let client = spawn_get(&b.url(&format!("/v2/library/held/blobs/{digest}")), &[]);
    wait_for("the download to be part-way", DEADLINE, || {
        app.mirror.fetches.list(10).first().map(|d| d.received) == Some(100_000)
    })
    .await;

    let short = &digest[7..19];
    let anonymous = page(&b, &[]).await;
    assert!(anonymous.contains("<span id=\"downloads-in-flight\">1</span>"));
    assert!(anonymous.contains("<span id=\"uploads-in-flight\">1</span>"));
    assert!(anonymous.contains("id=\"private-hidden\""), "{anonymous}");
    for hidden in [short, "library/held", "wip-upload", "secret-app", "alice"] {
        assert!(!anonymous.contains(hidden), "{hidden} shown to anyone");
    }
    let signed = page(&b, &signed_in).await;
    assert!(!signed.contains("id=\"private-hidden\""));
    let downloads = &signed[signed.find("id=\"downloads\"").expect("downloads listed")..];
    let row = &downloads[..downloads.find("</tr></table>").unwrap()];
    let row = &row[row.find(short).expect("the digest")..];
    for want in [
        "library/held",
        "docker.io",
        "97.7 KiB / 293.0 KiB",
        ">1</td>",
    ] {
        assert!(
            row.contains(want),
            "{want} not in the download's row: {row}"
        );
    }
    let uploads = &signed[signed.find("id=\"uploads\"").expect("uploads listed")..];
    for want in ["private/wip-upload", "alice", "12.1 KiB"] {
        assert!(
            uploads.contains(want),
            "{want} not in the uploads: {uploads}"
        );
    }
    assert!(signed.contains("secret-app"));

    gate.notify_one();
    assert_eq!(client.await.unwrap().bytes(), blob);
    b.settle().await;
    let done = page(&b, &signed_in).await;
    assert!(done.contains("<span id=\"downloads-in-flight\">0</span>"));
    assert!(!done.contains("id=\"downloads\""));
    assert!(app.mirror.fetches.started.load(Ordering::Relaxed) == 1);
}
