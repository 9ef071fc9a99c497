//! The private namespace: pushes (monolithic, chunked, mounted), manifests, referrers, listings,
//! deletes, authentication, garbage collection and webhooks, against berth in-process.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use crate::support::*;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A berth with a `private` namespace and one user, plus the fake upstream behind it.
struct Env {
    b: Berth,
    up: Fake,
    auth: String,
    _users: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        Env::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut berth::config::Config)) -> Env {
        let users = tempfile::tempdir().unwrap();
        let htpasswd = users.path().join("htpasswd");
        berth::auth::add_user(&htpasswd, USER, PASSWORD, 4).unwrap();
        let up = Fake::start().await;
        let b = Berth::start(&up, |c| {
            c.private_ns = vec!["private".into()];
            c.htpasswd = Some(htpasswd);
            tweak(c);
        })
        .await;
        Env {
            b,
            up,
            auth: basic(USER, PASSWORD),
            _users: users,
        }
    }

    fn h(&self) -> Vec<(&str, &str)> {
        vec![("authorization", self.auth.as_str())]
    }

    fn h_with<'a>(&'a self, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut h = self.h();
        h.extend_from_slice(more);
        h
    }

    async fn get(&self, path: &str) -> Reply {
        send(Method::GET, &self.b.url(path), &self.h()).await
    }

    async fn head(&self, path: &str) -> Reply {
        send(Method::HEAD, &self.b.url(path), &self.h()).await
    }

    async fn delete(&self, path: &str) -> Reply {
        send(Method::DELETE, &self.b.url(path), &self.h()).await
    }

    /// Monolithic upload; returns the digest.
    async fn push_blob(&self, repo: &str, blob: &Bytes) -> String {
        let d = sha256(blob);
        let r = send_body(
            Method::POST,
            &self.b.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")),
            &self.h(),
            blob.clone(),
        )
        .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        d
    }

    async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &Bytes,
        media_type: &str,
    ) -> Reply {
        send_body(
            Method::PUT,
            &self.b.url(&format!("/v2/{repo}/manifests/{reference}")),
            &self.h_with(&[("content-type", media_type)]),
            bytes.clone(),
        )
        .await
    }

    async fn push_image(&self, repo: &str, reference: &str, image: &Image) {
        for blob in image.blobs() {
            self.push_blob(repo, &blob).await;
        }
        let r = self
            .push_manifest(repo, reference, &image.manifest, image.media_type)
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    /// Starts an upload session; returns its Location.
    async fn start_upload(&self, repo: &str) -> String {
        let r = send(
            Method::POST,
            &self.b.url(&format!("/v2/{repo}/blobs/uploads/")),
            &self.h(),
        )
        .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        r.header("location").to_owned()
    }

    /// Files under the private area's blob directory.
    fn local_blob_count(&self) -> usize {
        count_files(&self.b.dir.path().join("local/blobs"))
    }
}

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Appends a query parameter to an upload Location.
fn with_query(location: &str, q: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{q}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolithic_upload_and_pull_back() {
    let e = Env::start().await;
    let blob = pseudo_random(1, 300_000);
    let d = sha256(&blob);
    let r = send_body(
        Method::POST,
        &e.b.url(&format!("/v2/private/app/blobs/uploads/?digest={d}")),
        &e.h(),
        blob.clone(),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location"), format!("/v2/private/app/blobs/{d}"));
    assert_eq!(r.header("docker-content-digest"), d);

    let path = format!("/v2/private/app/blobs/{d}");
    let g = e.get(&path).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.bytes(), blob);
    assert_eq!(g.header("docker-content-digest"), d);
    let h = e.head(&path).await;
    assert_eq!(h.header("content-length"), "300000");
    let r = send(
        Method::GET,
        &e.b.url(&path),
        &e.h_with(&[("range", "bytes=10-19")]),
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.bytes(), blob.slice(10..20));
    // Another repository does not see it.
    let r = e.get(&format!("/v2/private/other/blobs/{d}")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UNKNOWN");
    assert_eq!(
        e.up.requests(),
        0,
        "the private namespace never goes upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_then_put_upload() {
    let e = Env::start().await;
    let r = send(
        Method::POST,
        &e.b.url("/v2/private/app/blobs/uploads/"),
        &e.h(),
    )
    .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), "0-0");
    let location = r.header("location").to_owned();
    let uuid = r.header("docker-upload-uuid").to_owned();
    assert_eq!(uuid.len(), 32);
    assert_eq!(location, format!("/v2/private/app/blobs/uploads/{uuid}"));

    let blob = pseudo_random(2, 70_000);
    let d = sha256(&blob);
    let r = send_body(
        Method::PUT,
        &e.b.url(&with_query(&location, &format!("digest={d}"))),
        &e.h(),
        blob.clone(),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.header("docker-content-digest"), d);
    assert_eq!(
        e.get(&format!("/v2/private/app/blobs/{d}")).await.bytes(),
        blob
    );
    // The session is gone once finished.
    let r = send(Method::GET, &e.b.url(&location), &e.h()).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_patch_upload_with_status_and_out_of_order_chunks() {
    let e = Env::start().await;
    let blob = pseudo_random(3, 250_000);
    let d = sha256(&blob);
    let location = e.start_upload("private/app").await;
    let url = e.b.url(&location);

    // First chunk with a Content-Range.
    let r = send_body(
        Method::PATCH,
        &url,
        &e.h_with(&[("content-range", "0-99999")]),
        blob.slice(..100_000),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.header("range"), "0-99999");
    assert_eq!(r.header("location"), location);

    let s = send(Method::GET, &url, &e.h()).await;
    assert_eq!(s.status, 204);
    assert_eq!(s.header("range"), "0-99999");
    assert!(!s.header("docker-upload-uuid").is_empty());

    // A chunk that does not start where the upload ends is refused, and nothing changes.
    let r = send_body(
        Method::PATCH,
        &url,
        &e.h_with(&[("content-range", "150000-199999")]),
        blob.slice(150_000..200_000),
    )
    .await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("range"), "0-99999");
    assert_eq!(r.error_code(), "RANGE_INVALID");

    // Second chunk streamed (chunked transfer encoding), without a Content-Range.
    let pieces: Vec<Bytes> = blob
        .slice(100_000..200_000)
        .chunks(7_000)
        .map(Bytes::copy_from_slice)
        .collect();
    let r = send_stream(Method::PATCH, &url, &e.h(), pieces).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.header("range"), "0-199999");

    // The last chunk rides on the PUT.
    let r = send_body(
        Method::PUT,
        &e.b.url(&with_query(&location, &format!("digest={d}"))),
        &e.h(),
        blob.slice(200_000..),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        e.get(&format!("/v2/private/app/blobs/{d}")).await.bytes(),
        blob
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_can_be_cancelled_and_unknown_ones_are_404() {
    let e = Env::start().await;
    let location = e.start_upload("private/app").await;
    let url = e.b.url(&location);
    let r = send_body(Method::PATCH, &url, &e.h(), Bytes::from_static(b"abc")).await;
    assert_eq!(r.status, 202);
    let r = send(Method::DELETE, &url, &e.h()).await;
    assert_eq!(r.status, 204);
    let r = send(Method::GET, &url, &e.h()).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
    let r = send_body(Method::PATCH, &url, &e.h(), Bytes::from_static(b"x")).await;
    assert_eq!(r.status, 404);
    // An upload belongs to the repository it was started in.
    let location = e.start_upload("private/app").await;
    let elsewhere = location.replace("private/app", "private/other");
    let r = send(Method::GET, &e.b.url(&elsewhere), &e.h()).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(
        count_files(&e.b.dir.path().join("local/uploads")),
        2,
        "only the open session remains (info + data)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_stores_nothing() {
    let e = Env::start().await;
    let blob = pseudo_random(4, 10_000);
    let wrong = sha256(b"something else");
    let r = send_body(
        Method::POST,
        &e.b.url(&format!("/v2/private/app/blobs/uploads/?digest={wrong}")),
        &e.h(),
        blob.clone(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "DIGEST_INVALID");

    let location = e.start_upload("private/app").await;
    let r = send_body(Method::PATCH, &e.b.url(&location), &e.h(), blob.clone()).await;
    assert_eq!(r.status, 202);
    let r = send(
        Method::PUT,
        &e.b.url(&with_query(&location, &format!("digest={wrong}"))),
        &e.h(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "DIGEST_INVALID");

    for d in [wrong, sha256(&blob)] {
        let r = e.head(&format!("/v2/private/app/blobs/{d}")).await;
        assert_eq!(r.status, 404);
    }
    assert_eq!(e.local_blob_count(), 0);
    assert_eq!(count_files(&e.b.dir.path().join("tmp")), 0);
    assert_eq!(count_files(&e.b.dir.path().join("local/uploads")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_repository_mount() {
    let e = Env::start().await;
    let blob = pseudo_random(5, 5_000);
    let d = e.push_blob("private/a", &blob).await;
    let r = send(
        Method::POST,
        &e.b.url(&format!(
            "/v2/private/b/blobs/uploads/?mount={d}&from=private/a"
        )),
        &e.h(),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location"), format!("/v2/private/b/blobs/{d}"));
    assert_eq!(
        e.get(&format!("/v2/private/b/blobs/{d}")).await.bytes(),
        blob
    );
    // A blob the source does not have: the client gets an upload session instead.
    let missing = sha256(b"missing");
    let r = send(
        Method::POST,
        &e.b.url(&format!(
            "/v2/private/b/blobs/uploads/?mount={missing}&from=private/a"
        )),
        &e.h(),
    )
    .await;
    assert_eq!(r.status, 202);
    assert!(r
        .header("location")
        .starts_with("/v2/private/b/blobs/uploads/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_by_tag_and_by_digest() {
    let e = Env::start().await;
    let img = Image::new(20, &[1000, 2000]);
    for blob in img.blobs() {
        e.push_blob("private/app", &blob).await;
    }
    let r = e
        .push_manifest("private/app", "v1", &img.manifest, img.media_type)
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    assert_eq!(
        r.header("location"),
        format!("/v2/private/app/manifests/{}", img.digest)
    );

    for reference in ["v1", img.digest.as_str()] {
        let g = e
            .get(&format!("/v2/private/app/manifests/{reference}"))
            .await;
        assert_eq!(g.status, 200);
        assert_eq!(g.bytes(), img.manifest);
        assert_eq!(g.header("content-type"), img.media_type);
        assert_eq!(g.header("docker-content-digest"), img.digest);
        let h = e
            .head(&format!("/v2/private/app/manifests/{reference}"))
            .await;
        assert_eq!(h.status, 200);
        assert_eq!(h.header("content-length"), img.manifest.len().to_string());
    }
    // Not visible from another repository.
    let r = e
        .get(&format!("/v2/private/other/manifests/{}", img.digest))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");

    // By digest, an OCI manifest over the same blobs.
    let oci = Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": img.config.len(), "digest": sha256(&img.config)},
            "layers": [],
        }))
        .unwrap(),
    );
    let r = e
        .push_manifest("private/app", &sha256(&oci), &oci, OCI_MANIFEST)
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // The body must hash to the digest it is pushed under.
    let r = e
        .push_manifest("private/app", &sha256(b"other"), &oci, OCI_MANIFEST)
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "DIGEST_INVALID");

    // Every blob must be there.
    let missing = Image::new(21, &[10]);
    let r = e
        .push_manifest("private/app", "v2", &missing.manifest, missing.media_type)
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "MANIFEST_BLOB_UNKNOWN");
    // Known media types only, and JSON only.
    let r = e
        .push_manifest("private/app", "v3", &img.manifest, "application/json")
        .await;
    assert_eq!(r.error_code(), "MANIFEST_INVALID");
    let r = e
        .push_manifest(
            "private/app",
            "v3",
            &Bytes::from_static(b"{nope"),
            S2_MANIFEST,
        )
        .await;
    assert_eq!(r.error_code(), "MANIFEST_INVALID");
    // Too large: refused from the announced length, before the body is read.
    let head = raw_request(
        &e,
        &format!(
            "PUT /v2/private/app/manifests/v3 HTTP/1.1\r\nhost: berth\r\nauthorization: {}\r\ncontent-type: {S2_MANIFEST}\r\ncontent-length: {}\r\n\r\n",
            e.auth,
            (4 << 20) + 1
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("SIZE_INVALID"), "{head}");
    let r = e.get("/v2/private/app/manifests/v3").await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_needs_its_children_first() {
    let e = Env::start().await;
    let amd = Image::new(30, &[100]);
    let arm = Image::new(31, &[100]);
    let (index, index_digest) = index_of(&[&amd, &arm]);
    e.push_image("private/multi", &amd.digest, &amd).await;
    let r = e.push_manifest("private/multi", "1", &index, S2_LIST).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "MANIFEST_BLOB_UNKNOWN");
    e.push_image("private/multi", &arm.digest, &arm).await;
    let r = e.push_manifest("private/multi", "1", &index, S2_LIST).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.header("docker-content-digest"), index_digest);
    let g = e.get("/v2/private/multi/manifests/1").await;
    assert_eq!(g.header("content-type"), S2_LIST);
    assert_eq!(g.bytes(), index);
}

/// Sends raw request bytes and returns what comes back until the server closes or 2s pass.
async fn raw_request(e: &Env, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(e.b.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&out).contains("SIZE_INVALID") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn artifact(subject: &Image, artifact_type: &str, note: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": sha256(b"{}")},
            "layers": [],
            "subject": {"mediaType": subject.media_type, "size": subject.manifest.len(), "digest": subject.digest},
            "annotations": {"note": note},
        }))
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_with_artifact_type_filter() {
    let e = Env::start().await;
    let img = Image::new(40, &[100]);
    e.push_image("private/app", "v1", &img).await;
    e.push_blob("private/app", &Bytes::from_static(b"{}")).await;
    let sig = artifact(&img, "application/vnd.example.signature", "sig");
    let sbom = artifact(&img, "application/vnd.example.sbom", "sbom");
    for a in [&sig, &sbom] {
        let r = e
            .push_manifest("private/app", &sha256(a), a, OCI_MANIFEST)
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.header("oci-subject"), img.digest);
    }
    let r = e
        .get(&format!("/v2/private/app/referrers/{}", img.digest))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), OCI_INDEX);
    let v = r.json();
    assert_eq!(v["mediaType"], OCI_INDEX);
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let sbom_entry = list
        .iter()
        .find(|d| d["digest"] == sha256(&sbom))
        .expect("the sbom is listed");
    assert_eq!(sbom_entry["artifactType"], "application/vnd.example.sbom");
    assert_eq!(sbom_entry["mediaType"], OCI_MANIFEST);
    assert_eq!(sbom_entry["size"], sbom.len());
    assert_eq!(sbom_entry["annotations"]["note"], "sbom");

    let r = e
        .get(&format!(
            "/v2/private/app/referrers/{}?artifactType=application/vnd.example.signature",
            img.digest
        ))
        .await;
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    let v = r.json();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], sha256(&sig));

    // Deleting a referrer takes it out of the list; a subject without referrers lists none.
    let r = e
        .delete(&format!("/v2/private/app/manifests/{}", sha256(&sig)))
        .await;
    assert_eq!(r.status, 202);
    let v = e
        .get(&format!("/v2/private/app/referrers/{}", img.digest))
        .await
        .json();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    let r = e
        .get(&format!("/v2/private/app/referrers/{}", sha256(b"none")))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["manifests"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_none_wrong_and_right() {
    let e = Env::start().await;
    let blob_url = e.b.url("/v2/private/app/blobs/uploads/");
    // /v2/ challenges, so `docker login` has something to answer.
    let r = e.b.get("/v2/").await;
    assert_eq!(r.status, 401);
    let challenge = format!(
        "Bearer realm=\"http://{}/auth/token\",service=\"berth\"",
        e.b.addr
    );
    assert_eq!(r.header("www-authenticate"), challenge);
    assert_eq!(r.error_code(), "UNAUTHORIZED");
    let wrong = basic(USER, "wrong");
    let r = e.b.get_with("/v2/", &[("authorization", &wrong)]).await;
    assert_eq!(r.status, 401);
    let r = e.b.get_with("/v2/", &[("authorization", &e.auth)]).await;
    assert_eq!(r.status, 200);

    // Pushes need a user; the challenge names the scope a token needs.
    let r = send(Method::POST, &blob_url, &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        format!("{challenge},scope=\"repository:private/app:pull,push\"")
    );
    let r = send(Method::POST, &blob_url, &[("authorization", &wrong)]).await;
    assert_eq!(r.status, 401);
    let r = send(
        Method::POST,
        &blob_url,
        &[("authorization", &basic("mallory", PASSWORD))],
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send(Method::POST, &blob_url, &[("authorization", &e.auth)]).await;
    assert_eq!(r.status, 202);

    // Private pulls too (by default); mirrored pulls stay anonymous.
    let img = Image::new(50, &[10]);
    e.push_image("private/app", "v1", &img).await;
    let r = e.b.get("/v2/private/app/manifests/v1").await;
    assert_eq!(r.status, 401);
    let r =
        e.b.get_with(
            "/v2/private/app/manifests/v1",
            &[("authorization", &e.auth)],
        )
        .await;
    assert_eq!(r.status, 200);
    e.up.add_image("library/alpine", "3", &img);
    let r = e.b.get("/v2/library/alpine/manifests/3").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_private_pulls_and_auth_everything() {
    let e = Env::start_with(|c| c.private_pull_public = true).await;
    let img = Image::new(51, &[10]);
    e.push_image("private/app", "v1", &img).await;
    let r = e.b.get("/v2/private/app/manifests/v1").await;
    assert_eq!(r.status, 200);
    // Pushes still need a user.
    let r = send(
        Method::POST,
        &e.b.url("/v2/private/app/blobs/uploads/"),
        &[],
    )
    .await;
    assert_eq!(r.status, 401);

    let e = Env::start_with(|c| c.auth_everything = true).await;
    e.up.add_image("library/alpine", "3", &img);
    let r = e.b.get("/v2/library/alpine/manifests/3").await;
    assert_eq!(r.status, 401);
    assert_eq!(e.up.requests(), 0);
    let r =
        e.b.get_with(
            "/v2/library/alpine/manifests/3",
            &[("authorization", &e.auth)],
        )
        .await;
    assert_eq!(r.status, 200);
    // Probes never need credentials.
    assert_eq!(e.b.get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_htpasswd_pushes_are_refused() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| c.private_ns = vec!["private".into()]).await;
    let r = send(Method::POST, &b.url("/v2/private/app/blobs/uploads/"), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "DENIED");
    assert!(r.json()["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("htpasswd"));
    // /v2/ has nothing to check credentials against: open.
    assert_eq!(b.get("/v2/").await.status, 200);
    assert_eq!(count_files(&b.dir.path().join("local/uploads")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited() {
    let e = Env::start().await;
    let wrong = basic(USER, "guess");
    for i in 0..berth::auth::FAILURES_PER_MINUTE {
        let r = e.b.get_with("/v2/", &[("authorization", &wrong)]).await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    let r = e.b.get_with("/v2/", &[("authorization", &wrong)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "TOOMANYREQUESTS");
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Blocked means blocked: right credentials wait too; anonymous mirror pulls do not.
    let r = e.b.get_with("/v2/", &[("authorization", &e.auth)]).await;
    assert_eq!(r.status, 429);
    let r = e.b.get("/healthz").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_pagination_with_link() {
    let e = Env::start().await;
    let img = Image::new(60, &[10]);
    for t in ["e", "a", "c", "b", "d"] {
        e.push_image("private/app", t, &img).await;
    }
    let r = e.get("/v2/private/app/tags/list").await;
    assert_eq!(
        r.json(),
        json!({"name": "private/app", "tags": ["a", "b", "c", "d", "e"]})
    );
    assert_eq!(r.header("link"), "");

    let mut seen = Vec::new();
    let mut path = "/v2/private/app/tags/list?n=2".to_owned();
    loop {
        let r = e.get(&path).await;
        assert_eq!(r.status, 200);
        for t in r.json()["tags"].as_array().unwrap() {
            seen.push(t.as_str().unwrap().to_owned());
        }
        let link = r.header("link");
        if link.is_empty() {
            break;
        }
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        path = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
        assert!(
            path.starts_with("/v2/private/app/tags/list?n=2&last="),
            "{path}"
        );
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    let r = e.get("/v2/private/app/tags/list?n=2&last=b").await;
    assert_eq!(r.json()["tags"], json!(["c", "d"]));
    assert_eq!(
        r.header("link"),
        "</v2/private/app/tags/list?n=2&last=d>; rel=\"next\""
    );
    let r = e.get("/v2/private/nothing/tags/list").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_private_and_mirrored_repositories() {
    let e = Env::start().await;
    let img = Image::new(70, &[10]);
    e.push_image("private/b", "v1", &img).await;
    e.push_image("private/a", "v1", &img).await;
    e.up.add_image("library/alpine", "3", &img);
    assert_eq!(e.b.get("/v2/library/alpine/manifests/3").await.status, 200);

    // The catalog names private repositories: it needs a user.
    assert_eq!(e.b.get("/v2/_catalog").await.status, 401);
    let r = e.get("/v2/_catalog").await;
    assert_eq!(
        r.json(),
        json!({"repositories": ["library/alpine", "private/a", "private/b"]})
    );
    let r = e.get("/v2/_catalog?n=2").await;
    assert_eq!(
        r.json()["repositories"],
        json!(["library/alpine", "private/a"])
    );
    assert_eq!(
        r.header("link"),
        "</v2/_catalog?n=2&last=private%2Fa>; rel=\"next\""
    );
    let r = e.get("/v2/_catalog?n=2&last=private%2Fa").await;
    assert_eq!(r.json()["repositories"], json!(["private/b"]));
    assert_eq!(r.header("link"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_by_tag_by_digest_and_of_blobs() {
    let e = Env::start().await;
    let img = Image::new(80, &[10, 20]);
    e.push_image("private/app", "v1", &img).await;
    let r = e
        .push_manifest("private/app", "v2", &img.manifest, img.media_type)
        .await;
    assert_eq!(r.status, 201);
    e.push_image("private/copy", "v1", &img).await;

    // By tag: only the tag goes.
    let r = e.delete("/v2/private/app/manifests/v1").await;
    assert_eq!(r.status, 202);
    assert_eq!(e.get("/v2/private/app/manifests/v1").await.status, 404);
    assert_eq!(e.get("/v2/private/app/manifests/v2").await.status, 200);
    assert_eq!(
        e.get(&format!("/v2/private/app/manifests/{}", img.digest))
            .await
            .status,
        200
    );
    assert_eq!(e.delete("/v2/private/app/manifests/v1").await.status, 404);

    // By digest: the manifest and every tag pointing at it, in this repository only.
    let r = e
        .delete(&format!("/v2/private/app/manifests/{}", img.digest))
        .await;
    assert_eq!(r.status, 202);
    for reference in ["v2", img.digest.as_str()] {
        let r = e
            .get(&format!("/v2/private/app/manifests/{reference}"))
            .await;
        assert_eq!(r.status, 404);
        assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    }
    assert_eq!(
        e.get("/v2/private/app/tags/list").await.json()["tags"],
        json!([])
    );
    assert_eq!(e.get("/v2/private/copy/manifests/v1").await.status, 200);

    // Blobs.
    let layer = sha256(&img.layers[0]);
    let r = e.delete(&format!("/v2/private/app/blobs/{layer}")).await;
    assert_eq!(r.status, 202);
    assert_eq!(
        e.get(&format!("/v2/private/app/blobs/{layer}"))
            .await
            .status,
        404
    );
    assert_eq!(
        e.get(&format!("/v2/private/copy/blobs/{layer}"))
            .await
            .bytes(),
        img.layers[0]
    );
    assert_eq!(
        e.delete(&format!("/v2/private/app/blobs/{layer}"))
            .await
            .status,
        404
    );
}

/// A tag push racing a delete of the manifest it names: whichever wins, no tag may be left that
/// `tags/list` shows but that does not resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_pushes_racing_manifest_deletes_leave_no_dangling_tag() {
    let e = Env::start().await;
    let img = Image::new(85, &[10]);
    e.push_image("private/race", "v1", &img).await;
    let by_digest = format!("/v2/private/race/manifests/{}", img.digest);
    for round in 0..300 {
        let r = e
            .push_manifest("private/race", "v1", &img.manifest, img.media_type)
            .await;
        assert_eq!(r.status, 201, "round {round}: {:?}", r.body);
        // The delete starts at a different point of the pushes' work in each round (a push
        // takes a few milliseconds, mostly fsyncs), so the rounds sweep the interleavings.
        let stagger = Duration::from_millis(round % 8);
        let (put1, put2, del) = tokio::join!(
            e.push_manifest("private/race", "v1", &img.manifest, img.media_type),
            e.push_manifest("private/race", "v2", &img.manifest, img.media_type),
            async {
                tokio::time::sleep(stagger).await;
                e.delete(&by_digest).await
            },
        );
        assert_eq!(put1.status, 201, "round {round}: {:?}", put1.body);
        assert_eq!(put2.status, 201, "round {round}: {:?}", put2.body);
        assert_eq!(del.status, 202, "round {round}: {:?}", del.body);
        let listed = e.get("/v2/private/race/tags/list").await.json();
        let tags: Vec<String> = listed["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        for tag in &tags {
            let r = e.get(&format!("/v2/private/race/manifests/{tag}")).await;
            assert_eq!(
                r.status, 200,
                "round {round}: tags/list shows {tag:?} ({tags:?}) but it does not resolve"
            );
        }
        if !tags.is_empty() {
            assert_eq!(e.get(&by_digest).await.status, 200, "round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_deletes_outside_the_namespace_are_refused() {
    let e = Env::start().await;
    let img = Image::new(90, &[10]);
    let d = sha256(&img.layers[0]);
    let cases = [
        (Method::POST, "/v2/library/alpine/blobs/uploads/".to_owned()),
        (
            Method::POST,
            format!("/v2/library/alpine/blobs/uploads/?digest={d}"),
        ),
        (
            Method::PUT,
            "/v2/library/alpine/manifests/latest".to_owned(),
        ),
        (Method::DELETE, format!("/v2/library/alpine/blobs/{d}")),
        (
            Method::DELETE,
            "/v2/library/alpine/manifests/latest".to_owned(),
        ),
        (Method::POST, "/v2/privateer/app/blobs/uploads/".to_owned()),
    ];
    for (method, path) in cases {
        let r = send_body(
            method.clone(),
            &e.b.url(&path),
            &e.h_with(&[("content-type", S2_MANIFEST)]),
            img.manifest.clone(),
        )
        .await;
        assert_eq!(r.status, 403, "{method} {path}");
        assert_eq!(r.error_code(), "DENIED", "{method} {path}");
    }
    assert_eq!(e.up.requests(), 0, "the upstream must see nothing");
    assert_eq!(e.local_blob_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_referenced_and_recent_blobs_and_removes_the_rest() {
    use berth::store::gc::{collect, GcOptions};
    let e = Env::start().await;
    let img = Image::new(100, &[1000, 2000]);
    e.push_image("private/app", "v1", &img).await;
    let orphan = pseudo_random(101, 4096);
    let orphan_digest = e.push_blob("private/app", &orphan).await;
    // A manifest deleted from its repository is garbage too, with the blobs only it used.
    let gone = Image::new(102, &[3000]);
    e.push_image("private/gone", "v1", &gone).await;
    let r = e
        .delete(&format!("/v2/private/gone/manifests/{}", gone.digest))
        .await;
    assert_eq!(r.status, 202);
    // An abandoned upload.
    let location = e.start_upload("private/app").await;
    let r = send_body(
        Method::PATCH,
        &e.b.url(&location),
        &e.h(),
        pseudo_random(103, 500),
    )
    .await;
    assert_eq!(r.status, 202);

    let store = berth::store::disk::DiskStore::open_existing(e.b.dir.path())
        .unwrap()
        .shared();
    let before = e.local_blob_count();

    // Now: everything is recent, nothing goes.
    let report = collect(&store, &GcOptions::new(Duration::from_secs(24 * 3600))).unwrap();
    assert!(report.blobs.is_empty(), "{report:?}");
    assert!(report.uploads.is_empty());
    assert!(report.kept_recent >= 2, "{report:?}");

    // Two hours on, as a dry run: reported, not removed.
    let mut later = GcOptions::new(Duration::from_secs(24 * 3600));
    later.now = SystemTime::now() + Duration::from_secs(2 * 3600);
    later.dry_run = true;
    let report = collect(&store, &later).unwrap();
    assert!(!report.blobs.is_empty());
    assert_eq!(e.local_blob_count(), before);

    // For real.
    later.dry_run = false;
    let report = collect(&store, &later).unwrap();
    let removed: Vec<String> = report.blobs.iter().map(|(d, _)| d.to_string()).collect();
    assert!(removed.contains(&orphan_digest), "{removed:?}");
    assert!(removed.contains(&gone.digest), "{removed:?}");
    assert!(removed.contains(&sha256(&gone.layers[0])), "{removed:?}");
    assert_eq!(
        removed.len(),
        4,
        "orphan, gone's manifest, config and layer: {removed:?}"
    );
    assert!(report.bytes_freed >= 4096 + 3000);
    assert!(
        report.uploads.is_empty(),
        "the upload is younger than a day"
    );
    assert!(report.links >= 2, "{report:?}");
    // What the image needs is still served.
    let r = e.get("/v2/private/app/manifests/v1").await;
    assert_eq!(r.bytes(), img.manifest);
    for blob in img.blobs() {
        let r = e
            .get(&format!("/v2/private/app/blobs/{}", sha256(&blob)))
            .await;
        assert_eq!(r.bytes(), blob);
    }
    let r = e
        .get(&format!("/v2/private/app/blobs/{orphan_digest}"))
        .await;
    assert_eq!(r.status, 404);

    // A day on, the upload is abandoned.
    let mut day = GcOptions::new(Duration::from_secs(24 * 3600));
    day.now = SystemTime::now() + Duration::from_secs(25 * 3600);
    let report = collect(&store, &day).unwrap();
    assert_eq!(report.uploads.len(), 1);
    assert!(report.uploads[0].1 > 500);
    let r = send(Method::GET, &e.b.url(&location), &e.h()).await;
    assert_eq!(r.status, 404);
}

fn upload_dirs(e: &Env) -> usize {
    std::fs::read_dir(e.b.dir.path().join("local/uploads"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn metric(e: &Env, name: &str) -> f64 {
    berth::ops::metrics::sample(
        &String::from_utf8_lossy(&e.b.get("/metrics").await.bytes()),
        name,
        &[],
    )
}

/// Starts an upload as whoever `auth` names; returns the reply.
async fn try_start_upload(e: &Env, auth: &str) -> Reply {
    send(
        Method::POST,
        &e.b.url("/v2/private/app/blobs/uploads/"),
        &[("authorization", auth)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_uploads_are_capped_per_user_across_restarts() {
    let cap = |c: &mut berth::config::Config| c.max_uploads_per_user = 3;
    let e = Env::start_with(cap).await;
    let htpasswd = e._users.path().join("htpasswd");
    berth::auth::add_user(&htpasswd, "bob", "battery staple", 4).unwrap();
    let bob = basic("bob", "battery staple");
    let mut alices = Vec::new();
    for _ in 0..3 {
        alices.push(e.start_upload("private/app").await);
    }
    let r = try_start_upload(&e, &e.auth).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.error_code(), "TOOMANYREQUESTS");
    assert!(
        r.json()["errors"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("alice") && d.contains("max_uploads_per_user")),
        "{:?}",
        r.body
    );
    assert!(!r.header("retry-after").is_empty());
    assert_eq!(upload_dirs(&e), 3, "a refused start leaves nothing behind");
    // Another user is not held back by alice's sessions.
    let r = try_start_upload(&e, &bob).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    // Nor is a blob pushed whole in one request, which opens no session.
    e.push_blob("private/app", &pseudo_random(110, 100)).await;
    assert_eq!(metric(&e, "berth_uploads_refused_total").await, 1.0);
    assert_eq!(metric(&e, "berth_uploads_open").await, 4.0);

    // A finished and a cancelled session each make room for one more.
    let blob = pseudo_random(111, 1000);
    let url = e.b.url(&with_query(
        &alices[0],
        &format!("digest={}", sha256(&blob)),
    ));
    assert_eq!(send_body(Method::PUT, &url, &e.h(), blob).await.status, 201);
    let r = send(Method::DELETE, &e.b.url(&alices[1]), &e.h()).await;
    assert_eq!(r.status, 204);
    e.start_upload("private/app").await;
    e.start_upload("private/app").await;
    assert_eq!(try_start_upload(&e, &e.auth).await.status, 429);

    // A restarted server knows whose sessions are open.
    let Env {
        b,
        up,
        auth,
        _users,
    } = e;
    let dir = b.stop().await;
    let b = Berth::start_in(dir, &up, |c| {
        c.private_ns = vec!["private".into()];
        c.htpasswd = Some(htpasswd);
        cap(c);
    })
    .await;
    let e = Env {
        b,
        up,
        auth,
        _users,
    };
    let r = try_start_upload(&e, &e.auth).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(try_start_upload(&e, &bob).await.status, 202);
    assert_eq!(metric(&e, "berth_uploads_open").await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_uploads_expire_in_the_running_server() {
    let e = Env::start_with(|c| {
        c.upload_max_age = berth::config::Seconds(Duration::from_millis(200));
        c.max_uploads_per_user = 1;
    })
    .await;
    // No chunk is sent before the wait: on a loaded machine it could arrive after the session
    // expired. That the session's files go is checked on disk below.
    let location = e.start_upload("private/app").await;
    let url = e.b.url(&location);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = send(Method::GET, &url, &e.h()).await;
        if r.status == 404 {
            assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
            break;
        }
        assert_eq!(r.status, 204, "{:?}", r.body);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle upload was never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = send_body(Method::PATCH, &url, &e.h(), Bytes::from_static(b"late")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(upload_dirs(&e), 0, "its bytes are gone from disk");
    assert_eq!(metric(&e, "berth_uploads_expired_total").await, 1.0);
    assert_eq!(metric(&e, "berth_uploads_open").await, 0.0);
    // The expired session no longer counts against its user.
    e.start_upload("private/app").await;
}

/// What a webhook receiver got: the JSON body, its raw bytes and the request's headers.
type Received = Arc<Mutex<Vec<(Value, bytes::Bytes, http::HeaderMap)>>>;

/// A webhook receiver: a tiny HTTP server that records what it is sent. It fails the first
/// delivery, so the retry path is exercised.
async fn receiver() -> (String, Received) {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ev = events.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (ev, calls) = (ev.clone(), calls.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (ev, calls) = (ev.clone(), calls.clone());
                    async move {
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                            return Ok::<_, std::convert::Infallible>(status(500));
                        }
                        let json = serde_json::from_slice(&body).unwrap();
                        ev.lock().unwrap().push((json, body, headers));
                        Ok(status(200))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/hook"), events)
}

/// Checks a `Berth-Signature` the way a receiver would: HMAC-SHA256 over `<t>.<body>`, and `t`
/// within five minutes of now.
fn signature_ok(secret: &[u8], header: &str, body: &[u8]) -> bool {
    use hmac::Mac;
    let Some((t, v1)) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let Ok(t_secs) = t.parse::<u64>() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(t_secs) > 300 {
        return false;
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let Ok(sig) = hex::decode(v1) else {
        return false;
    };
    mac.verify_slice(&sig).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_signed_push_and_delete_events() {
    let (url, events) = receiver().await;
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), "s3cret\n").unwrap();
    let toml = format!(
        "[[webhooks]]\nurl = \"{url}\"\nsecret_file = \"{}\"\nheaders = {{ X-Api-Key = \"k1\" }}\n",
        secret_file.path().display()
    );
    let hooks = berth::config::Config::from_toml(&toml).unwrap().webhooks;
    let e = Env::start_with(move |c| c.webhooks = hooks).await;
    let img = Image::new(110, &[10]);
    e.push_image("private/app", "v1", &img).await;
    wait_for("the push event", Duration::from_secs(10), || {
        !events.lock().unwrap().is_empty()
    })
    .await;
    let (push, body, headers) = events.lock().unwrap()[0].clone();
    assert_eq!(push["action"], "push");
    assert_eq!(push["repository"], "private/app");
    assert_eq!(push["tag"], "v1");
    assert_eq!(push["tags"], serde_json::json!(["v1"]));
    assert_eq!(push["digest"], img.digest);
    assert_eq!(push["mediaType"], img.media_type);
    assert_eq!(push["size"], img.manifest.len());
    assert_eq!(push["actor"], USER);
    let ts = push["timestamp"].as_str().unwrap();
    assert!(ts.len() == 20 && ts.ends_with('Z'), "{ts}");
    assert_eq!(headers["x-api-key"], "k1");
    let sig = headers["berth-signature"].to_str().unwrap();
    assert!(signature_ok(b"s3cret", sig, &body), "{sig}");
    assert!(!signature_ok(b"wrong", sig, &body), "another secret fails");
    assert!(
        !signature_ok(b"s3cret", sig, b"{\"action\":\"delete\"}"),
        "another body fails"
    );

    // A second tag on the same manifest; a delete by digest takes both tags with it, and says so.
    let r = e
        .push_manifest("private/app", "latest", &img.manifest, img.media_type)
        .await;
    assert_eq!(r.status, 201);
    let r = e
        .delete(&format!("/v2/private/app/manifests/{}", img.digest))
        .await;
    assert_eq!(r.status, 202);
    // Deliveries run concurrently: the second push's event and the delete's may come in
    // either order.
    let delete_event = || {
        events
            .lock()
            .unwrap()
            .iter()
            .find(|(json, _, _)| json["action"] == "delete")
            .cloned()
    };
    wait_for("the delete event", Duration::from_secs(10), || {
        delete_event().is_some() && events.lock().unwrap().len() >= 3
    })
    .await;
    let (del, body, headers) = delete_event().unwrap();
    assert_eq!(del["action"], "delete");
    assert_eq!(del["tag"], Value::Null);
    assert_eq!(del["tags"], serde_json::json!(["latest", "v1"]));
    assert_eq!(del["digest"], img.digest);
    let sig = headers["berth-signature"].to_str().unwrap();
    assert!(signature_ok(b"s3cret", sig, &body), "{sig}");
    // Every event arrived: the failed first attempt was retried and counted once as delivered.
    // (A delivery is counted once the receiver's answer is in, just after it recorded the event.)
    let stats =
        e.b.running
            .as_ref()
            .unwrap()
            .app
            .private
            .webhooks
            .stats
            .clone();
    wait_for("three deliveries counted", Duration::from_secs(10), || {
        stats.delivered.load(std::sync::atomic::Ordering::Relaxed) == 3
    })
    .await;
    let text = String::from_utf8_lossy(&e.b.get("/metrics").await.bytes()).into_owned();
    let deliveries = |result| {
        berth::ops::metrics::sample(
            &text,
            "berth_webhook_deliveries_total",
            &[("result", result)],
        )
    };
    assert_eq!(deliveries("delivered"), 3.0);
    assert_eq!(deliveries("failed"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_token_flow_anonymous_and_with_credentials() {
    let e = Env::start().await;
    let token_of = |r: &Reply| format!("Bearer {}", r.json()["token"].as_str().unwrap());
    // No credentials: an anonymous token, which passes Docker's /v2/ probe (so a daemon
    // without credentials for berth can use it as a mirror) and pulls mirrored content...
    let r =
        e.b.get("/auth/token?service=berth&scope=repository:library/alpine:pull")
            .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["expires_in"], 300);
    let anonymous = token_of(&r);
    let r = e.b.get_with("/v2/", &[("authorization", &anonymous)]).await;
    assert_eq!(r.status, 200);
    let img = Image::new(60, &[10]);
    e.up.add_image("library/alpine", "3", &img);
    let r =
        e.b.get_with(
            "/v2/library/alpine/manifests/3",
            &[("authorization", &anonymous)],
        )
        .await;
    assert_eq!(r.bytes(), img.manifest);
    // ...but cannot push.
    let uploads = e.b.url("/v2/private/app/blobs/uploads/");
    let r = send(Method::POST, &uploads, &[("authorization", &anonymous)]).await;
    assert_eq!(r.status, 401);
    // An anonymous token asking for push gets none.
    let r =
        e.b.get("/auth/token?service=berth&scope=repository:private/app:pull,push")
            .await;
    let r = send(Method::POST, &uploads, &[("authorization", &token_of(&r))]).await;
    assert_eq!(r.status, 401);
    // Credentials at the token endpoint: a token for the user, which passes `docker login`'s
    // probe, and pushes where its scope says.
    let r = e.b.get_with("/auth/token?service=berth", &e.h()).await;
    assert_eq!(r.status, 200);
    let login = token_of(&r);
    let r = e.b.get_with("/v2/", &[("authorization", &login)]).await;
    assert_eq!(r.status, 200);
    let r =
        e.b.get_with(
            "/auth/token?service=berth&scope=repository:private/app:pull,push",
            &e.h(),
        )
        .await;
    let user = token_of(&r);
    let r = send(Method::POST, &uploads, &[("authorization", &user)]).await;
    assert_eq!(r.status, 202);
    // Wrong credentials get no token; an unknown token is refused.
    let r =
        e.b.get_with("/auth/token", &[("authorization", &basic(USER, "wrong"))])
            .await;
    assert_eq!(r.status, 401);
    let r =
        e.b.get_with("/v2/", &[("authorization", "Bearer 00ff")])
            .await;
    assert_eq!(r.status, 401);
}

// --- password floods, token scopes, the token realm ---------------------------------------

fn app_of(b: &Berth) -> Arc<berth::ops::Service> {
    b.running.as_ref().expect("berth is running").app.clone()
}

/// bcrypt runs so far.
fn password_checks(b: &Berth) -> u64 {
    app_of(b)
        .auth
        .stats
        .password_checks
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A token from `/auth/token` with this query, for these credentials, as an Authorization value.
async fn token(e: &Env, query: &str) -> String {
    let r =
        e.b.get_with(&format!("/auth/token?service=berth&{query}"), &e.h())
            .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    format!("Bearer {}", r.json()["token"].as_str().unwrap())
}

/// An Env whose user's password is hashed at `cost`, behind a trusted proxy (127.0.0.1) so
/// that requests can speak for many client addresses through `X-Forwarded-For`.
async fn env_with_cost(cost: u32, tweak: impl FnOnce(&mut berth::config::Config)) -> Env {
    let e = Env::start_with(|c| {
        c.trusted_proxies = vec![berth::config::IpNet::parse("127.0.0.1").unwrap()];
        tweak(c);
    })
    .await;
    let htpasswd = e._users.path().join("htpasswd");
    berth::auth::add_user(&htpasswd, USER, PASSWORD, cost).unwrap();
    e
}

/// Many GET /v2/ at once, each with its own address and password.
fn flood(e: &Env, logins: &[(String, String)]) -> Vec<tokio::task::JoinHandle<Reply>> {
    logins
        .iter()
        .map(|(addr, password)| {
            spawn_get(
                &e.b.url("/v2/"),
                &[
                    ("authorization", &basic(USER, password)),
                    ("x-forwarded-for", addr),
                ],
            )
        })
        .collect()
}

async fn statuses(handles: Vec<tokio::task::JoinHandle<Reply>>) -> Vec<Reply> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_flood_from_one_address_is_refused_before_hashing() {
    let e = env_with_cost(10, |_| {}).await;
    // Something cached for anonymous pulls.
    let img = Image::new(80, &[2000]);
    e.up.add_image("library/cached", "1", &img);
    let layer = format!("/v2/library/cached/blobs/{}", sha256(&img.layers[0]));
    assert_eq!(e.b.get(&layer).await.status, 200);
    e.b.settle().await;
    let before = password_checks(&e.b);

    let attacker = "10.0.0.1".to_owned();
    let guesses: Vec<(String, String)> = (0..60)
        .map(|i| (attacker.clone(), format!("guess {i}")))
        .collect();
    let flood = flood(&e, &guesses);
    // While the flood is answered, a valid login from elsewhere and an anonymous pull go
    // through.
    let r =
        e.b.get_with(
            "/v2/",
            &[("authorization", &e.auth), ("x-forwarded-for", "10.0.0.2")],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = e.b.get(&layer).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), img.layers[0]);

    let replies = statuses(flood).await;
    let wrong = replies.iter().filter(|r| r.status == 401).count();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    let quota = berth::auth::FAILURES_PER_MINUTE as usize;
    assert_eq!(wrong, quota, "checked guesses");
    assert_eq!(refused.len(), guesses.len() - quota);
    for r in &refused {
        assert_eq!(r.error_code(), "TOOMANYREQUESTS");
        let retry: u64 = r.header("retry-after").parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
    }
    // The guesses over the limit cost no bcrypt: the quota's and the valid login's only.
    assert_eq!(password_checks(&e.b) - before, quota as u64 + 1);
    // The address stays refused, right password or not, without hashing.
    let r =
        e.b.get_with(
            "/v2/",
            &[("authorization", &e.auth), ("x-forwarded-for", &attacker)],
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(password_checks(&e.b) - before, quota as u64 + 1);
    let metrics = e.b.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.bytes()).into_owned();
    let line = format!(
        "berth_auth_refused_total{{reason=\"failed_logins\"}} {}",
        refused.len() + 1
    );
    assert!(text.contains(&line), "{line} not in:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_with_the_same_credentials_share_one_check() {
    let e = env_with_cost(8, |_| {}).await;
    let before = password_checks(&e.b);
    // A client's parallel requests with credentials not verified yet: one bcrypt, no 429.
    let same: Vec<(String, String)> = (0..20)
        .map(|_| ("10.0.0.3".to_owned(), PASSWORD.to_owned()))
        .collect();
    for r in statuses(flood(&e, &same)).await {
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(password_checks(&e.b) - before, 1);
    // Then the verification is remembered: more requests cost no bcrypt.
    for _ in 0..10 {
        let r =
            e.b.get_with(
                "/v2/",
                &[("authorization", &e.auth), ("x-forwarded-for", "10.0.0.3")],
            )
            .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(password_checks(&e.b) - before, 1);
    // The same wrong password sent in parallel (a misconfigured client) is one failed login,
    // not enough to lock the address out.
    let wrong: Vec<(String, String)> = (0..20)
        .map(|_| ("10.0.0.4".to_owned(), "typo".to_owned()))
        .collect();
    for r in statuses(flood(&e, &wrong)).await {
        assert_eq!(r.status, 401, "{:?}", r.body);
    }
    assert_eq!(password_checks(&e.b) - before, 2);
    let r =
        e.b.get_with(
            "/v2/",
            &[("authorization", &e.auth), ("x-forwarded-for", "10.0.0.4")],
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_checks_from_many_addresses_wait_boundedly() {
    let e = env_with_cost(9, |c| c.password_check_concurrency = Some(1)).await;
    let img = Image::new(81, &[2000]);
    e.up.add_image("library/cached", "1", &img);
    let layer = format!("/v2/library/cached/blobs/{}", sha256(&img.layers[0]));
    assert_eq!(e.b.get(&layer).await.status, 200);
    e.b.settle().await;
    // A client whose credentials were verified before the flood.
    let regular = [
        ("authorization", e.auth.as_str()),
        ("x-forwarded-for", "10.1.0.1"),
    ];
    assert_eq!(e.b.get_with("/v2/", &regular).await.status, 200);
    let before = password_checks(&e.b);

    // 30 addresses, each within its failure limit, 150 guesses in all.
    let guesses: Vec<(String, String)> = (0..150)
        .map(|i| (format!("10.2.0.{}", i / 5), format!("guess {i}")))
        .collect();
    let flood = flood(&e, &guesses);
    let app = app_of(&e.b);
    wait_for(
        "the flood to fill the queue",
        Duration::from_secs(30),
        || {
            app.auth
                .stats
                .refused_busy
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        },
    )
    .await;
    // Meanwhile: the verified client, and anonymous pulls, are served.
    assert_eq!(e.b.get_with("/v2/", &regular).await.status, 200);
    let r = e.b.get(&layer).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), img.layers[0]);
    assert!(app.auth.checks_running() <= 1);

    let replies = statuses(flood).await;
    let busy = replies.iter().filter(|r| r.status == 429).count();
    let wrong = replies.iter().filter(|r| r.status == 401).count();
    assert_eq!(busy + wrong, guesses.len());
    assert!(busy > 0);
    for r in replies.iter().filter(|r| r.status == 429) {
        assert_eq!(r.error_code(), "TOOMANYREQUESTS");
        assert!(!r.header("retry-after").is_empty());
    }
    // Refused guesses were never hashed.
    assert_eq!(password_checks(&e.b) - before, wrong as u64);
    let refused_busy = app
        .auth
        .stats
        .refused_busy
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused_busy, busy as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_only_their_scopes() {
    let e = Env::start().await;
    let img = Image::new(82, &[10]);
    e.push_image("private/b", "v1", &img).await;
    let uploads = |repo: &str| e.b.url(&format!("/v2/{repo}/blobs/uploads/"));
    let post = |url: String, auth: String| async move {
        send(Method::POST, &url, &[("authorization", &auth)]).await
    };

    let push_a = token(&e, "scope=repository:private/a:push").await;
    assert_eq!(post(uploads("private/a"), push_a.clone()).await.status, 202);
    // Another repository: 401 with the scope a token would need.
    let r = post(uploads("private/b"), push_a.clone()).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "UNAUTHORIZED");
    assert!(
        r.header("www-authenticate")
            .contains("scope=\"repository:private/b:pull,push\""),
        "{}",
        r.header("www-authenticate")
    );
    let r = send_body(
        Method::PUT,
        &e.b.url("/v2/private/b/manifests/evil"),
        &[("authorization", &push_a), ("content-type", img.media_type)],
        img.manifest.clone(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(e.get("/v2/private/b/manifests/evil").await.status, 404);
    // Another action: a push token does not pull.
    let r =
        e.b.get_with("/v2/private/a/tags/list", &[("authorization", &push_a)])
            .await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .contains("scope=\"repository:private/a:pull\""));

    let pull_b = token(&e, "scope=repository:private/b:pull").await;
    let r =
        e.b.get_with("/v2/private/b/manifests/v1", &[("authorization", &pull_b)])
            .await;
    assert_eq!(r.status, 200);
    assert_eq!(post(uploads("private/b"), pull_b.clone()).await.status, 401);
    let delete = |auth: String| {
        let url = e.b.url("/v2/private/b/manifests/v1");
        async move { send(Method::DELETE, &url, &[("authorization", &auth)]).await }
    };
    assert_eq!(delete(pull_b.clone()).await.status, 401);
    let delete_b = token(&e, "scope=repository:private/b:delete").await;

    // Several scopes in one request, repeated and space-separated.
    let both = token(
        &e,
        "scope=repository:private/a:pull,push&scope=repository:private/b:pull%20registry:catalog:*",
    )
    .await;
    assert_eq!(post(uploads("private/a"), both.clone()).await.status, 202);
    assert_eq!(post(uploads("private/b"), both.clone()).await.status, 401);
    let r =
        e.b.get_with("/v2/private/b/manifests/v1", &[("authorization", &both)])
            .await;
    assert_eq!(r.status, 200);
    let r =
        e.b.get_with("/v2/_catalog", &[("authorization", &both)])
            .await;
    assert_eq!(r.status, 200);
    let r =
        e.b.get_with("/v2/_catalog", &[("authorization", &push_a)])
            .await;
    assert_eq!(r.status, 401);

    // A mount reads its source: without pull on it, the client uploads instead.
    let config = sha256(&img.config);
    let mount = |auth: String, from: &str| {
        let url = e.b.url(&format!(
            "/v2/private/a/blobs/uploads/?mount={config}{from}"
        ));
        async move { send(Method::POST, &url, &[("authorization", &auth)]).await }
    };
    assert_eq!(mount(push_a.clone(), "&from=private/b").await.status, 202);
    assert_eq!(mount(push_a.clone(), "").await.status, 202);
    assert_eq!(
        e.head(&format!("/v2/private/a/blobs/{config}"))
            .await
            .status,
        404
    );
    assert_eq!(mount(both.clone(), "&from=private/b").await.status, 201);
    assert_eq!(
        e.head(&format!("/v2/private/a/blobs/{config}"))
            .await
            .status,
        200
    );

    // A token traded at the token endpoint grants no more than it did.
    let r =
        e.b.get_with(
            "/auth/token?service=berth&scope=repository:private/b:pull,push",
            &[("authorization", &push_a)],
        )
        .await;
    assert_eq!(r.status, 200);
    let traded = format!("Bearer {}", r.json()["token"].as_str().unwrap());
    assert_eq!(post(uploads("private/b"), traded).await.status, 401);

    assert_eq!(delete(delete_b).await.status, 202);
    let refused = app_of(&e.b)
        .auth
        .stats
        .refused_scope
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_realm_is_never_taken_from_the_host_header() {
    let e = Env::start().await;
    let r = raw_request(
        &e,
        "GET /v2/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let challenge = r
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("www-authenticate:"))
        .unwrap_or_else(|| panic!("no challenge in:\n{r}"));
    assert!(
        challenge.ends_with(&format!(
            "Bearer realm=\"http://{}/auth/token\",service=\"berth\"",
            e.b.addr
        )),
        "{challenge}"
    );

    let e = Env::start_with(|c| {
        c.public_url = Some(berth::config::PublicUrl::parse("https://mirror.office:5443").unwrap())
    })
    .await;
    let r = raw_request(
        &e,
        "GET /v2/private/app/tags/list HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.contains(
            "Bearer realm=\"https://mirror.office:5443/auth/token\",service=\"berth\",\
             scope=\"repository:private/app:pull\""
        ),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_pages_are_complete_and_bounded_over_many_repositories() {
    let e = Env::start().await;
    let img = Image::new(83, &[10]);
    e.push_image("private/app", "v1", &img).await;
    // A name cached from two upstreams is listed once.
    let other =
        e.b.dir
            .path()
            .join("cache/repos/ghcr.io/library/img0/_tags");
    std::fs::create_dir_all(other).unwrap();
    // Mirrored repositories as the cache files them, in nested namespaces, 2,500 of them.
    let cache = e.b.dir.path().join("cache/repos/docker.io");
    let mut expected = vec!["private/app".to_owned()];
    for i in 0..2500 {
        let name = match i % 3 {
            0 => format!("library/img{i}"),
            1 => format!("team-{}/svc{i}", i % 7),
            _ => format!("team-{}/svc/sub{i}", i % 7),
        };
        std::fs::create_dir_all(cache.join(&name).join("_tags")).unwrap();
        expected.push(name);
    }
    expected.sort();
    // Without a page size: the first 1000, and a Link to the rest.
    let r = e.get("/v2/_catalog").await;
    let first = r.json()["repositories"].as_array().unwrap().len();
    assert_eq!(first, berth::http::private::MAX_CATALOG_PAGE);
    assert!(r.header("link").contains("rel=\"next\""));
    // Following the Links with n=97 lists every repository once, in order.
    let mut listed: Vec<String> = Vec::new();
    let mut next = "/v2/_catalog?n=97".to_owned();
    loop {
        let r = e.get(&next).await;
        assert_eq!(r.status, 200);
        let page: Vec<String> = r.json()["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert!(page.len() <= 97);
        listed.extend(page);
        let link = r.header("link").to_owned();
        if link.is_empty() {
            break;
        }
        next = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(url, _)| url.to_owned())
            .unwrap();
    }
    assert_eq!(listed, expected);
}

/// Follows `Link: <…>; rel="next"` from `path`, collecting a JSON array field of every page.
async fn all_pages(e: &Env, path: &str, field: &str, max_page: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut next = path.to_owned();
    for _ in 0..1000 {
        let r = e.get(&next).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let page = r.json()[field].as_array().unwrap().clone();
        assert!(page.len() <= max_page, "{} > {max_page}", page.len());
        out.extend(page);
        let link = r.header("link").to_owned();
        if link.is_empty() {
            return out;
        }
        next = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(url, _)| url.to_owned())
            .unwrap();
    }
    panic!("more than 1000 pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_paged_with_link() {
    let e = Env::start().await;
    let img = Image::new(84, &[100]);
    e.push_image("private/app", "v1", &img).await;
    e.push_blob("private/app", &Bytes::from_static(b"{}")).await;
    let mut sigs = Vec::new();
    let mut all = Vec::new();
    for i in 0..230 {
        let kind = if i % 3 == 0 {
            "application/vnd.example.signature"
        } else {
            "application/vnd.example.sbom"
        };
        let a = artifact(&img, kind, &format!("n{i}"));
        let r = e
            .push_manifest("private/app", &sha256(&a), &a, OCI_MANIFEST)
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        if i % 3 == 0 {
            sigs.push(sha256(&a));
        }
        all.push(sha256(&a));
    }
    all.sort();
    sigs.sort();
    let path = format!("/v2/private/app/referrers/{}", img.digest);
    let r = e.get(&path).await;
    assert_eq!(
        r.json()["manifests"].as_array().unwrap().len(),
        berth::http::private::MAX_REFERRERS_PAGE
    );
    assert!(r.header("link").contains("rel=\"next\""));
    let digests = |v: Vec<Value>| -> Vec<String> {
        v.iter()
            .map(|d| d["digest"].as_str().unwrap().to_owned())
            .collect()
    };
    let listed = digests(
        all_pages(
            &e,
            &path,
            "manifests",
            berth::http::private::MAX_REFERRERS_PAGE,
        )
        .await,
    );
    assert_eq!(listed, all);
    let listed = digests(all_pages(&e, &format!("{path}?n=7"), "manifests", 7).await);
    assert_eq!(listed, all);
    // Filtered pages keep the filter in their Links.
    let filtered = format!("{path}?n=5&artifactType=application/vnd.example.signature");
    let listed = all_pages(&e, &filtered, "manifests", 5).await;
    assert!(listed
        .iter()
        .all(|d| d["artifactType"] == "application/vnd.example.signature"));
    assert_eq!(digests(listed), sigs);
}
