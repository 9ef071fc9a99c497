//! One download, many readers: single-flight, streaming, failure, disconnects, crash safety.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use http::Method;
use http_body_util::BodyExt;
use tokio::sync::Notify;

fn joined(b: &Berth) -> u64 {
    b.running
        .as_ref()
        .unwrap()
        .app
        .mirror
        .fetches
        .joined
        .load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_cold_pulls_cause_one_upstream_download() {
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(1, 3 << 20, 64 << 10);
    let b = Berth::start(&up, |_| {}).await;
    let url = b.url(&format!("/v2/library/big/blobs/{d}"));
    let clients: Vec<_> = (0..8).map(|_| spawn_get(&url, &[])).collect();
    // Hold the upstream mid-stream until all eight requests are attached to the one download.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while joined(&b) < 7 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} requests joined",
            joined(&b)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.notify_one();
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.bytes(), blob);
    }
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_reach_the_client_before_the_upstream_finishes() {
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(2, 1 << 20, 100_000);
    let b = Berth::start(&up, |_| {}).await;
    let resp = send_head(
        Method::GET,
        &b.url(&format!("/v2/library/s/blobs/{d}")),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        blob.len().to_string().as_str()
    );
    let mut body = resp.into_body();
    // The upstream is parked after 100 kB: whatever arrives now was streamed, not buffered.
    let mut got = Vec::new();
    while got.len() < 50_000 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("first bytes while upstream is parked")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&frame.into_data().unwrap());
    }
    assert_eq!(&got[..], &blob[..got.len()]);
    gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    got.extend_from_slice(&rest);
    assert_eq!(got, blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_truncated_upstream_aborts_every_reader_and_caches_nothing() {
    let up = Fake::start().await;
    let blob = pseudo_random(3, 500_000);
    let d = up.add_blob(blob.clone());
    up.st()
        .faults
        .insert(d.clone(), BlobFault::Truncate(200_000));
    let b = Berth::start(&up, |_| {}).await;
    let url = b.url(&format!("/v2/library/t/blobs/{d}"));
    let clients: Vec<_> = (0..3).map(|_| spawn_get(&url, &[])).collect();
    for c in clients {
        let r = c.await.unwrap();
        // Either the download failed before headers (503) or the body is cut short.
        assert!(
            r.status == 503 || r.body.is_err(),
            "status {} body ok {}",
            r.status,
            r.body.is_ok()
        );
    }
    let store_dir = b.dir.path().to_path_buf();
    assert_eq!(
        std::fs::read_dir(store_dir.join("tmp")).unwrap().count(),
        0,
        "temp file left behind"
    );
    up.st().faults.clear();
    let before = up.count("GET", "/blobs/");
    let r = b.get(&format!("/v2/library/t/blobs/{d}")).await;
    assert_eq!(r.bytes(), blob);
    assert_eq!(
        up.count("GET", "/blobs/"),
        before + 1,
        "nothing was cached: a fresh download"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_that_leaves_does_not_stop_the_others_and_the_blob_is_cached() {
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(4, 2 << 20, 200_000);
    let b = Berth::start(&up, |_| {}).await;
    let url = b.url(&format!("/v2/library/l/blobs/{d}"));
    let mut leaver = send_head(Method::GET, &url, &[]).await.into_body();
    let first = leaver.frame().await.unwrap().unwrap();
    assert!(!first.into_data().unwrap().is_empty());
    let stayer = spawn_get(&url, &[]);
    wait_for("the second reader to join", Duration::from_secs(10), || {
        joined(&b) >= 1
    })
    .await;
    drop(leaver);
    gate.notify_one();
    let r = stayer.await.unwrap();
    assert_eq!(r.bytes(), blob);
    let r = b.get(&format!("/v2/library/l/blobs/{d}")).await;
    assert_eq!(r.bytes(), blob);
    assert_eq!(
        up.count("GET", "/blobs/"),
        1,
        "the finished download must be a cache entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_download_still_completes_into_the_cache() {
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(5, 1 << 20, 100_000);
    let b = Berth::start(&up, |_| {}).await;
    let mut only = send_head(
        Method::GET,
        &b.url(&format!("/v2/library/o/blobs/{d}")),
        &[],
    )
    .await
    .into_body();
    only.frame().await.unwrap().unwrap();
    drop(only);
    gate.notify_one();
    let cached = b
        .dir
        .path()
        .join(format!("cache/blobs/sha256/{}/{}", &d[7..9], &d[7..]));
    wait_for(
        "the orphaned download to land in the cache",
        Duration::from_secs(10),
        || cached.exists(),
    )
    .await;
    assert_eq!(std::fs::read(&cached).unwrap(), blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_requests_on_a_blob_still_downloading() {
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(6, 1 << 20, 300_000);
    let b = Berth::start(&up, |_| {}).await;
    let url = b.url(&format!("/v2/library/r/blobs/{d}"));
    let full_reader = spawn_get(&url, &[]);
    wait_for("the download to start", Duration::from_secs(10), || {
        up.count("GET", "/blobs/") == 1
    })
    .await;
    // Inside what has arrived and beyond it: both join the download, and both are answered
    // once the whole blob is verified (a range is a complete body of its own).
    let inside = spawn_get(&url, &[("range", "bytes=1000-1999")]);
    let tail = spawn_get(&url, &[("range", "bytes=-100")]);
    let app = b.running.as_ref().unwrap().app.clone();
    wait_for(
        "both ranges to join the download",
        Duration::from_secs(10),
        || {
            app.mirror
                .fetches
                .joined
                .load(std::sync::atomic::Ordering::SeqCst)
                >= 2
        },
    )
    .await;
    gate.notify_one();
    let r = inside.await.unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.bytes(), blob.slice(1000..2000));
    let r = tail.await.unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.bytes(), blob.slice(blob.len() - 100..));
    assert_eq!(full_reader.await.unwrap().bytes(), blob);
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_identical_manifest_requests_is_one_upstream_request() {
    let up = Fake::start().await;
    let img = Image::new(7, &[10]);
    up.add_image("library/burst", "1", &img);
    let gate = Arc::new(Notify::new());
    up.st().manifest_gate = Some(gate.clone());
    let b = Berth::start(&up, |_| {}).await;
    let url = b.url("/v2/library/burst/manifests/1");
    let clients: Vec<_> = (0..8).map(|_| spawn_get(&url, &[])).collect();
    let app = b.running.as_ref().unwrap().app.clone();
    wait_for(
        "seven requests to join the first",
        Duration::from_secs(10),
        || app.mirror.manifest_joins() >= 7,
    )
    .await;
    gate.notify_one();
    for c in clients {
        assert_eq!(c.await.unwrap().bytes(), img.manifest);
    }
    assert_eq!(up.count("GET", "/manifests/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_cache_under_its_limit_least_recently_used_first() {
    let up = Fake::start().await;
    let blobs: Vec<_> = (0..3).map(|i| pseudo_random(20 + i, 100_000)).collect();
    let digests: Vec<_> = blobs.iter().map(|b| up.add_blob(b.clone())).collect();
    let b = Berth::start(&up, |c| c.max_cache_size = berth::config::ByteSize(250_000)).await;
    let paths: Vec<String> = digests
        .iter()
        .map(|d| format!("/v2/library/e/blobs/{d}"))
        .collect();
    let get = |i: usize| spawn_get(&b.url(&paths[i]), &[]);
    let disk = b.running.as_ref().unwrap().app.mirror.disk.clone();
    // A client has its bytes once they are verified; the blob joins the cache (and pushes the
    // oldest out) right after, when it is durable. Each step waits for that.
    let cached = |n: u64| {
        let disk = disk.clone();
        async move {
            wait_for(
                "the download to land in the cache",
                Duration::from_secs(10),
                || disk.size() == n * 100_000,
            )
            .await
        }
    };
    get(0).await.unwrap().bytes();
    cached(1).await;
    get(1).await.unwrap().bytes();
    cached(2).await;
    get(0).await.unwrap().bytes(); // 0 is now more recent than 1
    get(2).await.unwrap().bytes(); // over the limit: 1 goes
    wait_for("1 to be evicted", Duration::from_secs(10), || {
        disk.evictions.load(Ordering::SeqCst) == 1
    })
    .await;
    let before = up.count("GET", "/blobs/");
    assert_eq!(get(0).await.unwrap().bytes(), blobs[0]);
    assert_eq!(get(2).await.unwrap().bytes(), blobs[2]);
    assert_eq!(
        up.count("GET", "/blobs/"),
        before,
        "0 and 2 must still be cached"
    );
    assert_eq!(get(1).await.unwrap().bytes(), blobs[1]);
    assert_eq!(
        up.count("GET", "/blobs/"),
        before + 1,
        "1 was evicted and fetched again"
    );
    wait_for(
        "1 to land again, pushing 0 out",
        Duration::from_secs(10),
        || disk.evictions.load(Ordering::SeqCst) == 2,
    )
    .await;
    assert!(disk.size() <= 250_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_download_then_restart_serves_the_right_blob_and_fsck_finds_rot() {
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(8, 1 << 20, 100_000);
    let data = tempfile::tempdir().unwrap();
    let mut proc = BerthProcess::spawn(data.path(), &up.url()).await;
    let url = format!("http://{}/v2/library/k/blobs/{d}", proc.addr);
    let mut body = send_head(Method::GET, &url, &[]).await.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(
        std::fs::read_dir(data.path().join("tmp")).unwrap().count(),
        1,
        "a download in progress"
    );
    proc.kill();
    assert!(
        body.collect().await.is_err(),
        "the client sees the broken transfer"
    );
    up.st().faults.clear();
    gate.notify_one();

    let proc = BerthProcess::spawn(data.path(), &up.url()).await;
    assert_eq!(
        std::fs::read_dir(data.path().join("tmp")).unwrap().count(),
        0,
        "leftovers removed at start"
    );
    let r = send(
        Method::GET,
        &format!("http://{}/v2/library/k/blobs/{d}", proc.addr),
        &[],
    )
    .await;
    assert_eq!(r.bytes(), blob);
    let path = data
        .path()
        .join(format!("cache/blobs/sha256/{}/{}", &d[7..9], &d[7..]));
    wait_for(
        "the blob to be made durable",
        Duration::from_secs(10),
        || path.exists(),
    )
    .await;
    drop(proc);

    let fsck = |repair: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.arg("fsck").arg("--data-dir").arg(data.path());
        if repair {
            cmd.arg("--repair");
        }
        cmd.output().unwrap()
    };
    assert!(fsck(false).status.success());
    let mut rotten = std::fs::read(&path).unwrap();
    rotten[12345] ^= 1;
    std::fs::write(&path, rotten).unwrap();
    let out = fsck(false);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&d[7..]),
        "fsck names the corrupt blob"
    );
    assert!(fsck(true).status.success());
    assert!(!path.exists());
    assert!(fsck(false).status.success());
}

/// berth as a separate process, for tests that kill it.
struct BerthProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl BerthProcess {
    async fn spawn(data: &std::path::Path, upstream: &str) -> BerthProcess {
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--upstream",
                upstream,
                "--data-dir",
            ])
            .arg(data)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "berth did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        BerthProcess { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BerthProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_arrived_before_the_upstream_stalls_reaches_the_client() {
    // One small frame, then the upstream stalls: the write of that frame must be published
    // without waiting for another frame.
    let up = Fake::start().await;
    let (blob, d, gate) = up.add_gated_blob(40, 200_000, 10_000);
    let b = Berth::start(&up, |_| {}).await;
    let resp = send_head(
        Method::GET,
        &b.url(&format!("/v2/library/p/blobs/{d}")),
        &[],
    )
    .await;
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < 10_000 {
        let frame = tokio::time::timeout(Duration::from_secs(3), body.frame())
            .await
            .expect("the first 10 kB while the upstream is stalled")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&frame.into_data().unwrap());
    }
    assert_eq!(&got[..], &blob[..10_000]);
    gate.notify_one();
    got.extend_from_slice(&body.collect().await.unwrap().to_bytes());
    assert_eq!(got, blob);
}
