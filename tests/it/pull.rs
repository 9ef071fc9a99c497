//! The pull path against an in-process fake upstream: bytes, digests, headers, errors.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_endpoint_announces_the_api_version() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |_| {}).await;
    for r in [b.get("/v2/").await, b.head("/v2/").await] {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("docker-distribution-api-version"), "registry/2.0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_and_blobs_are_served_byte_exact_and_then_from_cache() {
    let up = Fake::start().await;
    let img = Image::new(1, &[3000, 200_000]);
    up.add_image("library/alpine", "3.19", &img);
    let b = Berth::start(&up, |_| {}).await;

    let r = b
        .get_with(
            "/v2/library/alpine/manifests/3.19",
            &[("accept", S2_MANIFEST)],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), img.manifest);
    assert_eq!(r.header("content-type"), S2_MANIFEST);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    assert_eq!(r.header("content-length"), img.manifest.len().to_string());

    let h = b
        .head(&format!("/v2/library/alpine/manifests/{}", img.digest))
        .await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("docker-content-digest"), img.digest);
    assert_eq!(h.bytes().len(), 0);

    for blob in img.blobs() {
        let path = format!("/v2/library/alpine/blobs/{}", sha256(&blob));
        let r = b.get(&path).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), blob.len().to_string());
        assert_eq!(r.header("docker-content-digest"), sha256(&blob));
        assert_eq!(r.bytes(), blob);
    }
    let upstream_blob_gets = up.count("GET", "/blobs/");
    assert_eq!(upstream_blob_gets, img.blobs().len());

    // Second pull: manifests within the TTL and blobs by digest come from the cache.
    let before = up.requests();
    let r = b
        .get_with(
            "/v2/library/alpine/manifests/3.19",
            &[("accept", S2_MANIFEST)],
        )
        .await;
    assert_eq!(r.bytes(), img.manifest);
    for blob in img.blobs() {
        let r = b
            .get(&format!("/v2/library/alpine/blobs/{}", sha256(&blob)))
            .await;
        assert_eq!(r.bytes(), blob);
        let h = b
            .head(&format!("/v2/library/alpine/blobs/{}", sha256(&blob)))
            .await;
        assert_eq!(h.header("content-length"), blob.len().to_string());
    }
    assert_eq!(
        up.requests(),
        before,
        "a warm pull must not reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_segment_names_map_to_library_and_ns_is_honoured() {
    let up = Fake::start().await;
    let img = Image::new(2, &[100]);
    up.add_image("library/busybox", "latest", &img);
    let b = Berth::start(&up, |_| {}).await;
    let r = b.get("/v2/busybox/manifests/latest").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), img.manifest);
    assert_eq!(up.count("GET", "/v2/library/busybox/manifests/latest"), 1);
    // The same cache entry answers the Docker daemon's spelling and containerd's ?ns=.
    let r = b
        .get("/v2/library/busybox/manifests/latest?ns=docker.io")
        .await;
    assert_eq!(r.bytes(), img.manifest);
    let blob = &img.layers[0];
    let r = b
        .get(&format!("/v2/busybox/blobs/{}?ns=docker.io", sha256(blob)))
        .await;
    assert_eq!(r.bytes(), *blob);
    assert_eq!(up.count("GET", "/manifests/"), 1);
    // An ns berth has no upstream for is an error, not a silent Docker Hub pull.
    let r = b.get("/v2/busybox/manifests/latest?ns=quay.io").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_on_cached_blobs() {
    let up = Fake::start().await;
    let blob = pseudo_random(9, 10_000);
    let d = up.add_blob(blob.clone());
    let b = Berth::start(&up, |_| {}).await;
    let path = format!("/v2/library/x/blobs/{d}");
    assert_eq!(b.get(&path).await.bytes(), blob);

    let r = b.get_with(&path, &[("range", "bytes=100-199")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), "bytes 100-199/10000");
    assert_eq!(r.bytes(), blob.slice(100..200));
    let r = b.get_with(&path, &[("range", "bytes=-10")]).await;
    assert_eq!(r.bytes(), blob.slice(9990..));
    let r = b.get_with(&path, &[("range", "bytes=10000-")]).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.error_code(), "RANGE_INVALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_content_is_a_registry_404() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |_| {}).await;
    let r = b.get("/v2/library/nope/manifests/latest").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    let r = b
        .get(&format!("/v2/library/nope/blobs/{}", sha256(b"absent")))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UNKNOWN");
    let r = b
        .head(&format!("/v2/library/nope/blobs/{}", sha256(b"absent")))
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_before_the_upstream_or_disk() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |_| {}).await;
    let cases = [
        ("/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/../../etc/manifests/latest", 400, "NAME_INVALID"),
        // No manifest can have that tag: a pull of it is 404, as the OCI conformance suite expects.
        ("/v2/alpine/manifests/.bad", 404, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/blobs/sha256:1234", 400, "DIGEST_INVALID"),
        (
            "/v2/alpine/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/alpine/frobnicate/x", 404, "NOT_FOUND"),
    ];
    for (path, status, code) in cases {
        let r = b.get(path).await;
        assert_eq!(r.status, status, "{path}");
        assert_eq!(r.error_code(), code, "{path}");
    }
    assert_eq!(
        up.requests(),
        0,
        "the upstream must not see malformed requests"
    );
    let r = send(
        http::Method::DELETE,
        &b.url("/v2/library/alpine/manifests/latest"),
        &[],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "DENIED");
    let r = b.head("/v2/alpine/manifests/.bad").await;
    assert_eq!(r.status, 404, "HEAD of an impossible tag");
    // Pushing to such a tag names the real problem.
    let r = send(http::Method::PUT, &b.url("/v2/alpine/manifests/.bad"), &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "TAG_INVALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_is_never_cached() {
    let up = Fake::start().await;
    let blob = pseudo_random(5, 100_000);
    let d = up.add_blob(blob.clone());
    up.st().faults.insert(d.clone(), BlobFault::Corrupt);
    let b = Berth::start(&up, |_| {}).await;
    let path = format!("/v2/library/x/blobs/{d}");
    let r = b.get(&path).await;
    assert!(
        r.body.is_err() || r.status != 200,
        "a wrong body must not arrive complete"
    );
    assert!(r.body.as_ref().map_or(true, |body| *body != blob));
    // Nothing cached: the next request goes upstream again, and succeeds once it is fixed.
    up.st().faults.clear();
    let before = up.count("GET", "/blobs/");
    let r = b.get(&path).await;
    assert_eq!(r.bytes(), blob);
    assert_eq!(up.count("GET", "/blobs/"), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let up = Fake::start().await;
    let img = Image::new(3, &[10]);
    // The upstream serves other bytes under this digest.
    up.add_manifest(
        "library/a",
        &img.digest,
        Image::new(4, &[10]).manifest,
        S2_MANIFEST,
    );
    let b = Berth::start(&up, |_| {}).await;
    let r = b
        .get(&format!("/v2/library/a/manifests/{}", img.digest))
        .await;
    assert_eq!(r.status, 503);
    up.add_manifest("library/a", &img.digest, img.manifest.clone(), S2_MANIFEST);
    let r = b
        .get(&format!("/v2/library/a/manifests/{}", img.digest))
        .await;
    assert_eq!(r.bytes(), img.manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lists_are_proxied_with_pagination() {
    let up = Fake::start().await;
    let img = Image::new(6, &[10]);
    for t in ["a", "b", "c", "d"] {
        up.add_image("library/t", t, &img);
    }
    let b = Berth::start(&up, |_| {}).await;
    let r = b.get("/v2/t/tags/list").await;
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b", "c", "d"]));
    let r = b.get("/v2/t/tags/list?n=2&last=a").await;
    assert_eq!(r.json()["tags"], serde_json::json!(["b", "c"]));
    assert!(r.header("link").contains("last=c"), "{}", r.header("link"));
    let r = b.get("/v2/nothere/tags/list").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_indexes_and_accept_negotiation() {
    let up = Fake::start().await;
    let amd = Image::new(10, &[10]);
    let arm = Image::new(11, &[10]);
    up.add_image("library/multi", &amd.digest, &amd);
    up.add_image("library/multi", &arm.digest, &arm);
    let (index, index_digest) = index_of(&[&amd, &arm]);
    up.add_manifest("library/multi", "1", index.clone(), S2_LIST);
    up.add_manifest("library/multi", "1", amd.manifest.clone(), S2_MANIFEST);
    let b = Berth::start(&up, |_| {}).await;
    let r = b
        .get_with(
            "/v2/multi/manifests/1",
            &[("accept", &format!("{S2_LIST}, {S2_MANIFEST}"))],
        )
        .await;
    assert_eq!(r.header("content-type"), S2_LIST);
    assert_eq!(r.header("docker-content-digest"), index_digest);
    assert_eq!(r.bytes(), index);
    // A client that only accepts single manifests never gets the cached list.
    let r = b
        .get_with("/v2/multi/manifests/1", &[("accept", S2_MANIFEST)])
        .await;
    assert_eq!(r.header("content-type"), S2_MANIFEST);
    assert_eq!(r.bytes(), amd.manifest);
    let r = b
        .get_with(
            &format!("/v2/multi/manifests/{}", arm.digest),
            &[("accept", S2_MANIFEST)],
        )
        .await;
    assert_eq!(r.bytes(), arm.manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_stops_accepting_and_lets_in_flight_responses_finish() {
    let up = Fake::start().await;
    let blob = pseudo_random(30, 1 << 20);
    let d = up.add_blob(blob.clone());
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.st()
        .faults
        .insert(d.clone(), BlobFault::Gate(100_000, gate.clone()));
    let mut b = Berth::start(&up, |c| {
        c.shutdown_grace = berth::config::Seconds(std::time::Duration::from_secs(20))
    })
    .await;
    let in_flight = spawn_get(&b.url(&format!("/v2/library/g/blobs/{d}")), &[]);
    wait_for(
        "the download to start",
        std::time::Duration::from_secs(10),
        || up.count("GET", "/blobs/") == 1,
    )
    .await;
    let addr = b.addr;
    let running = b.running.take().unwrap();
    let stopping = tokio::spawn(running.shutdown());
    // New connections are refused once the listener is closed...
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting after shutdown"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        !stopping.is_finished(),
        "shutdown must wait for the response in flight"
    );
    // ...while the response in flight completes.
    gate.notify_one();
    assert_eq!(in_flight.await.unwrap().bytes(), blob);
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_clients_are_served() {
    use http_body_util::BodyExt;
    let up = Fake::start().await;
    let img = Image::new(31, &[10]);
    up.add_image("library/h2", "1", &img);
    let b = Berth::start(&up, |_| {}).await;
    let stream = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(b.url("/v2/h2/manifests/1"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        img.manifest
    );
}
