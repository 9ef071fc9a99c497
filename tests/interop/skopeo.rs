//! The interop tier: berth between real Debian tools.
//!
//! Upstream is the distribution registry (`docker-registry`, Debian's v2.8) on 127.0.0.1; images
//! are built here as OCI layouts, pushed into it with `skopeo copy --preserve-digests`, and pulled
//! back through berth with skopeo into `dir:` layouts whose files are compared byte for byte with
//! what was pushed. The registry's access log tells how many blob GETs reached upstream.
//!
//! Built and run only with `cargo test --features interop --test interop` (`skopeo::` alone). A missing tool fails
//! the test with the Debian package to install; nothing is skipped.

use crate::oci::{self, Artifact, Image, LayerSpec};
use crate::procs::{self, Berth, Registry, Skopeo};
use crate::pulls::{
    assert_blob_hits, assert_fetched_once, assert_no_new_blob_gets, assert_pulled, expected_files,
    pull, pull_with, push,
};
use tempfile::TempDir;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Three layers, a few MiB: two gzip'd, one plain tar.
fn three_layer_image(seed: u64) -> Image {
    oci::image(
        "amd64",
        &[
            LayerSpec {
                seed,
                size: 3 * MIB / 2,
                gzip: true,
            },
            LayerSpec {
                seed: seed + 1,
                size: MIB,
                gzip: true,
            },
            LayerSpec {
                seed: seed + 2,
                size: 512 * KIB,
                gzip: false,
            },
        ],
    )
}

/// An index of amd64 and arm64 images that share their base layer.
fn two_platform_index(seed: u64) -> Artifact {
    let base = LayerSpec {
        seed,
        size: MIB,
        gzip: true,
    };
    let amd64 = oci::image(
        "amd64",
        &[
            base,
            LayerSpec {
                seed: seed + 1,
                size: 768 * KIB,
                gzip: true,
            },
        ],
    );
    let arm64 = oci::image(
        "arm64",
        &[
            base,
            LayerSpec {
                seed: seed + 2,
                size: 640 * KIB,
                gzip: true,
            },
        ],
    );
    oci::index(vec![(amd64, "amd64"), (arm64, "arm64")])
}

#[test]
fn three_layer_image_pulls_byte_identical_and_second_pull_hits_cache() {
    procs::require_tools();
    let skopeo = Skopeo::new();
    let registry = Registry::start();
    let image = Artifact::Image(three_layer_image(0x1000));
    push(&skopeo, &registry, &image, "multilayer", "v1");
    let mut berth = Berth::start(&registry.url());
    let want = expected_files(&image, None);

    let before = registry.blob_gets().len();
    let first = pull(
        &skopeo,
        &format!("docker://{}/library/multilayer:v1", berth.addr),
        false,
    );
    assert_pulled(first.path(), &want, "first pull through berth");
    assert_fetched_once(
        &registry,
        before,
        "library/multilayer",
        &image.distinct_blobs(),
    );

    let before = registry.blob_gets().len();
    berth.settle();
    let logged = berth.served().len();
    let second = pull(
        &skopeo,
        &format!("docker://{}/library/multilayer:v1", berth.addr),
        false,
    );
    assert_pulled(second.path(), &want, "second pull through berth");
    assert_no_new_blob_gets(&registry, before, "the second pull");
    assert_blob_hits(&berth, logged, "the second pull");

    berth.settle();

    let logged = berth.served().len();
    let short = pull(
        &skopeo,
        &format!("docker://{}/multilayer:v1", berth.addr),
        false,
    );
    assert_pulled(short.path(), &want, "pull of the one-segment name");
    assert_no_new_blob_gets(&registry, before, "the one-segment pull");
    assert_blob_hits(&berth, logged, "the one-segment pull");

    assert!(berth.is_running(), "berth exited during the test");
}

#[test]
fn multi_arch_index_pulls_all_platforms_byte_identical() {
    procs::require_tools();
    let skopeo = Skopeo::new();
    let registry = Registry::start();
    let index = two_platform_index(0x2000);
    push(&skopeo, &registry, &index, "multiarch", "v1");
    let mut berth = Berth::start(&registry.url());
    let src = format!("docker://{}/library/multiarch:v1", berth.addr);
    let want = expected_files(&index, None);
    let blobs = index.distinct_blobs();
    assert_eq!(blobs.len(), 5, "two configs, one shared and two own layers");

    let before = registry.blob_gets().len();
    let first = pull(&skopeo, &src, true);
    assert_pulled(first.path(), &want, "first --all pull through berth");
    assert_fetched_once(&registry, before, "library/multiarch", &blobs);

    let before = registry.blob_gets().len();
    berth.settle();
    let logged = berth.served().len();
    let second = pull(&skopeo, &src, true);
    assert_pulled(second.path(), &want, "second --all pull through berth");
    assert_no_new_blob_gets(&registry, before, "the second --all pull");
    assert_blob_hits(&berth, logged, "the second --all pull");

    // One platform picked out of the index: skopeo fetches the index by tag, then the arm64
    // manifest by digest.
    let arm64 = &index.images()[1];
    berth.settle();
    let logged = berth.served().len();
    let one = pull_with(
        &skopeo,
        &format!("docker://{}/multiarch:v1", berth.addr),
        &["--override-os", "linux", "--override-arch", "arm64"],
    );
    assert_pulled(
        one.path(),
        &expected_files(&index, Some(arm64)),
        "arm64-only pull of the one-segment name",
    );
    assert_no_new_blob_gets(&registry, before, "the arm64-only pull");
    assert_blob_hits(&berth, logged, "the arm64-only pull");

    assert!(berth.is_running(), "berth exited during the test");
}

#[test]
fn one_segment_name_cold_pull_fetches_from_library() {
    procs::require_tools();
    let skopeo = Skopeo::new();
    let registry = Registry::start();
    let image = Artifact::Image(three_layer_image(0x3000));
    push(&skopeo, &registry, &image, "shortname", "1.0");
    let berth = Berth::start(&registry.url());

    let before = registry.blob_gets().len();
    let pulled = pull(
        &skopeo,
        &format!("docker://{}/shortname:1.0", berth.addr),
        false,
    );
    assert_pulled(
        pulled.path(),
        &expected_files(&image, None),
        "cold pull of the one-segment name",
    );
    assert_fetched_once(
        &registry,
        before,
        "library/shortname",
        &image.distinct_blobs(),
    );
}

#[test]
fn concurrent_cold_pulls_fetch_each_blob_once() {
    procs::require_tools();
    let skopeo = Skopeo::new();
    let registry = Registry::start();
    let image = Artifact::Image(three_layer_image(0x4000));
    push(&skopeo, &registry, &image, "concurrent", "v1");
    let berth = Berth::start(&registry.url());
    let want = expected_files(&image, None);
    let src = format!("docker://{}/library/concurrent:v1", berth.addr);

    let before = registry.blob_gets().len();
    let pulls: Vec<TempDir> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| pull(&skopeo, &src, false)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a concurrent pull panicked"))
            .collect()
    });
    for (i, out) in pulls.iter().enumerate() {
        assert_pulled(out.path(), &want, &format!("concurrent pull #{i}"));
    }
    assert_fetched_once(
        &registry,
        before,
        "library/concurrent",
        &image.distinct_blobs(),
    );
    let outcomes: Vec<String> = berth
        .served()
        .into_iter()
        .filter(|s| s.route == "blob" && s.method == "GET")
        .map(|s| s.cache)
        .collect();
    assert_eq!(
        outcomes.iter().filter(|c| *c == "miss").count(),
        image.distinct_blobs().len(),
        "berth must log one miss per blob across concurrent pulls, logged {outcomes:?}"
    );
}

/// Runs curl against berth and returns (status, headers, body).
fn curl(args: &[&str]) -> (u16, String, String) {
    procs::require_tool("curl", "curl");
    let out = std::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').expect("curl wrote the status");
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().expect("status code"),
        headers.to_owned(),
        body.to_owned(),
    )
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn private_push_pull_back_and_delete_by_hand() {
    procs::require_tools();
    let skopeo = Skopeo::new();
    let registry = Registry::start();
    let dir = TempDir::new().expect("temp dir");
    let htpasswd = procs::htpasswd(dir.path(), "alice", "wonderland");
    let ht = htpasswd.to_str().expect("utf-8 path");
    let mut berth = Berth::start_with(
        &registry.url(),
        &["--private-ns", "private", "--htpasswd", ht],
    );

    // Push an image into the private namespace with credentials, then copy it back out.
    let image = Artifact::Image(three_layer_image(0x5000));
    let layout = TempDir::new().expect("layout dir");
    image.write_layout(layout.path(), "1");
    let src = format!("oci:{}:1", layout.path().display());
    let dest = format!("docker://{}/private/app:1", berth.addr);
    skopeo.copy(&[
        "--dest-tls-verify=false",
        "--preserve-digests",
        "--dest-creds",
        "alice:wonderland",
        &src,
        &dest,
    ]);
    let back = pull_with(&skopeo, &dest, &["--src-creds", "alice:wonderland"]);
    assert_pulled(
        back.path(),
        &expected_files(&image, None),
        "the private image copied back out",
    );
    assert!(
        registry
            .accesses()
            .iter()
            .all(|a| !a.path.contains("private/")),
        "the upstream must never see the private namespace"
    );
    // Anonymous: refused.
    let base = format!("http://{}", berth.addr);
    let (status, _, _) = curl(&[&format!("{base}/v2/private/app/tags/list")]);
    assert_eq!(status, 401);

    // The delete workflow as a user does it by hand.
    let creds = ["-u", "alice:wonderland"];
    let (status, _, body) = curl(&[
        creds[0],
        creds[1],
        &format!("{base}/v2/private/app/tags/list"),
    ]);
    assert_eq!(status, 200);
    assert!(body.contains("\"1\""), "{body}");
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let manifest_url = format!("{base}/v2/private/app/manifests/1");
    let (status, headers, _) = curl(&[creds[0], creds[1], "-I", "-H", accept, &manifest_url]);
    assert_eq!(status, 200);
    let digest = header(&headers, "docker-content-digest")
        .expect("Docker-Content-Digest")
        .to_owned();
    assert_eq!(digest, image.top().digest);
    let by_digest = format!("{base}/v2/private/app/manifests/{digest}");
    let (status, _, _) = curl(&[creds[0], creds[1], "-X", "DELETE", &by_digest]);
    assert_eq!(status, 202);
    let (status, _, body) = curl(&[creds[0], creds[1], "-H", accept, &by_digest]);
    assert_eq!(status, 404);
    assert!(body.contains("MANIFEST_UNKNOWN"), "{body}");
    let (status, _, _) = curl(&[creds[0], creds[1], "-H", accept, &manifest_url]);
    assert_eq!(status, 404, "the tag went with the manifest");
    assert!(berth.is_running(), "berth exited during the test");
}
