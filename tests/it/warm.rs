//! Warming: the warm API, the `[[warm]]` refresh and its rate-limit reserve, prefetching moved
//! tags, and `berth warm` against a running berth.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use berth::config::{Config, Seconds};
use berth::mirror::warm::{refresh, warm_image, WarmRequest};
use berth::oci::names::{Reference, RepoName};
use berth::oci::platform::PlatformSpec;
use berth::ops::metrics::sample;

const DEADLINE: Duration = Duration::from_secs(10);

fn mirror(b: &Berth) -> Arc<berth::mirror::Mirror> {
    b.running.as_ref().unwrap().app.mirror.clone()
}

/// Puts an index of `images` (amd64, arm64, ...) under `tag`, with its children and blobs.
fn add_index(up: &Fake, repo: &str, tag: &str, images: &[&Image]) -> String {
    for im in images {
        for b in im.blobs() {
            up.add_blob(b);
        }
        up.add_manifest(repo, &im.digest, im.manifest.clone(), im.media_type);
    }
    let (bytes, digest) = index_of(images);
    up.add_manifest(repo, tag, bytes.clone(), S2_LIST);
    up.add_manifest(repo, &digest, bytes, S2_LIST);
    digest
}

/// Upstream GETs of the blobs of `im`, each.
fn blob_gets(up: &Fake, im: &Image) -> Vec<usize> {
    im.blobs()
        .iter()
        .map(|b| up.count("GET", &format!("/blobs/{}", sha256(b))))
        .collect()
}

fn warm_entries(toml: &str) -> Vec<berth::config::WarmEntry> {
    let c = Config::from_toml(toml).unwrap();
    c.validate().unwrap();
    c.warm
}

async fn metrics(b: &Berth) -> String {
    String::from_utf8(b.get("/metrics").await.bytes().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_an_index_caches_the_chosen_platform_only_and_a_pull_then_asks_nothing() {
    let up = Fake::start().await;
    let amd = Image::new(701, &[30_000, 20_000]);
    let arm = Image::new(702, &[40_000]);
    let index = add_index(&up, "library/multi", "1", &[&amd, &arm]);
    let b = Berth::start(&up, |_| {}).await;
    let report = warm_image(
        &mirror(&b),
        &WarmRequest {
            upstream: None,
            repository: RepoName::parse("multi").unwrap(),
            reference: Reference::parse("1").unwrap(),
            platforms: vec![PlatformSpec::parse("linux/arm64").unwrap()],
        },
    )
    .await
    .unwrap();
    assert_eq!(report.digest.unwrap().to_string(), index);
    assert_eq!((report.manifests_fetched, report.blobs_fetched), (2, 2));
    assert_eq!(
        blob_gets(&up, &arm),
        vec![1, 1],
        "each arm64 blob fetched once"
    );
    assert_eq!(blob_gets(&up, &amd), vec![0, 0, 0], "no amd64 blob fetched");
    assert_eq!(
        up.count("GET", &amd.digest),
        0,
        "the amd64 manifest not fetched"
    );

    let before = up.requests();
    let got = b.get("/v2/multi/manifests/1").await;
    assert_eq!(sha256(&got.bytes()), index);
    let child = b.get(&format!("/v2/multi/manifests/{}", arm.digest)).await;
    assert_eq!(child.bytes(), arm.manifest);
    for blob in arm.blobs() {
        let got = b.get(&format!("/v2/multi/blobs/{}", sha256(&blob))).await;
        assert_eq!(got.bytes(), blob);
    }
    assert_eq!(
        up.requests(),
        before,
        "the pull of a warmed image reached the upstream"
    );

    let text = metrics(&b).await;
    assert_eq!(
        sample(&text, "berth_warm_images_total", &[("result", "warmed")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "berth_warm_blobs_total", &[("result", "fetched")]),
        2.0
    );
    // A platform the index does not list is a failure, counted.
    let err = warm_image(
        &mirror(&b),
        &WarmRequest {
            upstream: None,
            repository: RepoName::parse("multi").unwrap(),
            reference: Reference::parse("1").unwrap(),
            platforms: vec![PlatformSpec::parse("windows/amd64").unwrap()],
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("windows/amd64"), "{err}");
    let text = metrics(&b).await;
    assert_eq!(
        sample(&text, "berth_warm_images_total", &[("result", "failed")]),
        1.0
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_list_is_warmed_at_start_and_a_refresh_fetches_only_moved_tags() {
    let up = Fake::start().await;
    let tags = ["1.0", "1.1", "2.0", "latest"];
    let images: Vec<Image> = (0..4).map(|i| Image::new(710 + i, &[10_000])).collect();
    for (tag, im) in tags.iter().zip(&images) {
        up.add_image("library/app", tag, im);
    }
    let entries = warm_entries(
        "warm_interval = \"1h\"\n[[warm]]\nrepository = \"library/app\"\ntags = [\"1.*\", \"latest\"]\n",
    );
    let b = Berth::start(&up, |c| {
        c.warm = entries.clone();
        c.warm_interval = Seconds(Duration::from_secs(3600));
    })
    .await;
    let m = mirror(&b);
    wait_for("the refresh at start", DEADLINE, || {
        m.warm.refreshes.get("complete") == 1
    })
    .await;
    for tag in ["1.0", "1.1", "latest"] {
        assert_eq!(up.count("GET", &format!("/manifests/{tag}")), 1, "{tag}");
    }
    assert_eq!(
        up.count("GET", "/manifests/2.0"),
        0,
        "2.0 matches no pattern"
    );
    assert_eq!(up.count("HEAD", "/manifests/2.0"), 0);
    assert_eq!(blob_gets(&up, &images[3]), vec![1, 1]);
    assert_eq!(blob_gets(&up, &images[2]), vec![0, 0]);

    // 1.1 moves: the refresh HEADs all three and GETs 1.1 only.
    let moved = Image::new(720, &[10_000]);
    up.add_image("library/app", "1.1", &moved);
    let (heads, gets) = (
        up.count("HEAD", "/manifests/"),
        up.count("GET", "/manifests/"),
    );
    let r = refresh(&m, &entries).await;
    assert_eq!((r.warmed, r.unchanged, r.failed), (1, 2, 0), "{r:?}");
    assert_eq!(up.count("HEAD", "/manifests/"), heads + 3);
    assert_eq!(up.count("GET", "/manifests/"), gets + 1);
    assert_eq!(up.count("GET", "/manifests/1.1"), 2);
    assert_eq!(blob_gets(&up, &moved), vec![1, 1]);

    // Nothing moved: HEADs only, no manifest or blob GET.
    let (heads, gets, blobs) = (
        up.count("HEAD", "/manifests/"),
        up.count("GET", "/manifests/"),
        up.count("GET", "/blobs/"),
    );
    let r = refresh(&m, &entries).await;
    assert_eq!((r.warmed, r.unchanged, r.failed), (0, 3, 0), "{r:?}");
    assert_eq!(up.count("HEAD", "/manifests/"), heads + 3);
    assert_eq!(up.count("GET", "/manifests/"), gets);
    assert_eq!(up.count("GET", "/blobs/"), blobs);
    // A pull of a warmed tag is a cache hit.
    let before = up.requests();
    assert_eq!(b.get("/v2/app/manifests/1.1").await.bytes(), moved.manifest);
    assert_eq!(up.requests(), before);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_stops_at_the_rate_limit_reserve() {
    let logs = captured_logs();
    let up = Fake::start().await;
    // Two pulls left above the reserve of 20.
    up.st().rate_limit_remaining = Some(22);
    let tags = ["a", "b", "c", "d"];
    for (i, tag) in tags.iter().enumerate() {
        up.add_image(
            "library/limited",
            tag,
            &Image::new(740 + i as u64, &[5_000]),
        );
    }
    let entries = warm_entries(
        "[[warm]]\nrepository = \"library/limited\"\ntags = [\"a\", \"b\", \"c\", \"d\"]\n",
    );
    let b = Berth::start(&up, |c| {
        c.warm = entries;
        c.default_upstream_config_mut().ratelimit_reserve = 20;
    })
    .await;
    let m = mirror(&b);
    wait_for("the refresh to stop at the reserve", DEADLINE, || {
        m.warm.refreshes.get("reserve") == 1
    })
    .await;
    assert_eq!(up.count("GET", "/manifests/a"), 1);
    assert_eq!(up.count("GET", "/manifests/b"), 1);
    for tag in ["c", "d"] {
        assert_eq!(up.count("GET", &format!("/manifests/{tag}")), 0, "{tag}");
        assert_eq!(up.count("HEAD", &format!("/manifests/{tag}")), 0, "{tag}");
    }
    assert_eq!(up.st().rate_limit_remaining, Some(20));
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.lines().any(|l| l.contains("\"WARN\"")
            && l.contains("warm refresh stopped")
            && l.contains("20 pulls left, at or below ratelimit_reserve = 20")),
        "no WARN line says why the refresh stopped"
    );
    let text = metrics(&b).await;
    assert_eq!(
        sample(
            &text,
            "berth_warm_refreshes_total",
            &[("result", "reserve")]
        ),
        1.0,
        "{text}"
    );
    // A client's pull is not held to the reserve.
    assert_eq!(b.get("/v2/limited/manifests/c").await.status, 200);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_has_its_pulled_platform_prefetched_in_the_background() {
    let up = Fake::start().await;
    let amd = Image::new(750, &[20_000]);
    let arm = Image::new(751, &[20_000]);
    add_index(&up, "library/moving", "latest", &[&amd, &arm]);
    let b = Berth::start(&up, |c| {
        let u = c.default_upstream_config_mut();
        u.prefetch_on_move = true;
        u.tag_ttl = Seconds(Duration::ZERO);
    })
    .await;
    // A client pulls the amd64 image.
    assert_eq!(b.get("/v2/moving/manifests/latest").await.status, 200);
    assert_eq!(
        b.get(&format!("/v2/moving/manifests/{}", amd.digest))
            .await
            .bytes(),
        amd.manifest
    );
    for blob in amd.blobs() {
        assert_eq!(
            b.get(&format!("/v2/moving/blobs/{}", sha256(&blob)))
                .await
                .bytes(),
            blob
        );
    }
    b.settle().await;

    let amd2 = Image::new(752, &[20_000]);
    let arm2 = Image::new(753, &[20_000]);
    let moved = add_index(&up, "library/moving", "latest", &[&amd2, &arm2]);
    let got = b.get("/v2/moving/manifests/latest").await;
    assert_eq!(sha256(&got.bytes()), moved);
    let m = mirror(&b);
    wait_for("the moved image's prefetch", DEADLINE, || {
        blob_gets(&up, &amd2) == vec![1, 1] && m.warm.images.get("warmed") == 1
    })
    .await;
    assert_eq!(m.warm.prefetches.get("started"), 1);
    assert_eq!(up.count("GET", &arm2.digest), 0, "arm64 was never pulled");
    assert_eq!(blob_gets(&up, &arm2), vec![0, 0]);

    let before = up.requests();
    assert_eq!(
        b.get(&format!("/v2/moving/manifests/{}", amd2.digest))
            .await
            .bytes(),
        amd2.manifest
    );
    for blob in amd2.blobs() {
        assert_eq!(
            b.get(&format!("/v2/moving/blobs/{}", sha256(&blob)))
                .await
                .bytes(),
            blob
        );
    }
    assert_eq!(up.requests(), before, "the next pull was not a cache hit");
    b.stop().await;
}

fn berth_warm(args: Vec<String>) -> tokio::task::JoinHandle<std::process::Output> {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("warm")
            .args(args)
            .output()
            .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_warm_pulls_images_through_a_running_berth() {
    let up = Fake::start().await;
    let amd = Image::new(760, &[15_000]);
    let arm = Image::new(761, &[25_000, 5_000]);
    let index = add_index(&up, "library/climulti", "1", &[&amd, &arm]);
    let single = Image::new(762, &[8_000]);
    up.add_image("someone/single", "2", &single);
    let b = Berth::start(&up, |_| {}).await;
    let url = format!("http://{}", b.addr);

    let out = berth_warm(vec![
        "climulti:1".into(),
        "--platform".into(),
        "linux/arm64".into(),
        "--url".into(),
        url.clone(),
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("climulti:1: {index}")), "{stdout}");
    assert!(stdout.contains("1 platform(s), 3 blob(s)"), "{stdout}");
    b.settle().await;
    assert_eq!(blob_gets(&up, &arm), vec![1, 1, 1]);
    assert_eq!(blob_gets(&up, &amd), vec![0, 0]);
    let m = mirror(&b);
    for blob in arm.blobs() {
        let d = berth::oci::names::Digest::parse(&sha256(&blob)).unwrap();
        assert!(m
            .store()
            .blob_len(berth::store::Area::Cache, &d)
            .unwrap()
            .is_some());
    }

    // The default URL comes from the config's listen address; a failure exits 1, naming the
    // image, and the others are still pulled.
    let config = b.dir.path().join("warm.toml");
    std::fs::write(&config, format!("listen = \"{}\"\n", b.addr)).unwrap();
    let out = berth_warm(vec![
        "climulti:nope".into(),
        "someone/single:2".into(),
        "--config".into(),
        config.display().to_string(),
    ])
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("climulti:nope") && stderr.contains("MANIFEST_UNKNOWN"),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("someone/single:2: {}", single.digest)),
        "{stdout}"
    );
    assert_eq!(blob_gets(&up, &single), vec![1, 1]);

    // A bad platform is a bad argument.
    let out = berth_warm(vec!["x".into(), "--platform".into(), "linux".into()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    b.stop().await;
}

#[test]
fn the_packaged_configs_warming_keys_are_valid_once_uncommented() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/berth.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let warm_keys = [
        "# warm_interval =",
        "# ratelimit_reserve =",
        "# prefetch_on_move =",
    ];
    let mut in_warm = false;
    let uncommented: Vec<&str> = text
        .lines()
        .map(|l| {
            // The [[warm]] block runs to the next blank line.
            in_warm = (in_warm && !l.is_empty()) || l.starts_with("# [[warm]]");
            if in_warm || warm_keys.iter().any(|k| l.starts_with(k)) {
                l.strip_prefix("# ").unwrap_or(l)
            } else {
                l
            }
        })
        .collect();
    let c = Config::from_toml(&uncommented.join("\n")).unwrap();
    c.validate().unwrap();
    assert_eq!(c.warm_interval.0, Duration::from_secs(6 * 3600));
    assert_eq!(c.warm.len(), 1);
    assert_eq!(c.warm[0].platforms[0].to_string(), "linux/amd64");
    assert!(c.upstreams["docker.io"].prefetch_on_move);
    assert_eq!(c.upstreams["docker.io"].ratelimit_reserve, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_warm_logs_in_with_user_and_the_password_from_the_environment() {
    let up = Fake::start().await;
    let img = Image::new(770, &[6_000]);
    up.add_image("library/locked", "1", &img);
    let users = tempfile::tempdir().unwrap();
    let htpasswd = users.path().join("htpasswd");
    berth::auth::add_user(&htpasswd, "warmer", "s3cret", 4).unwrap();
    let b = Berth::start(&up, |c| {
        c.htpasswd = Some(htpasswd);
        c.auth_everything = true;
    })
    .await;
    let url = format!("http://{}", b.addr);
    let run = |user: Option<&str>, password: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.args(["warm", "locked:1", "--url", &url]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        cmd.env("BERTH_PASSWORD", password);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    let out = run(None, "").await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = run(Some("warmer"), "wrong").await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(up.count("GET", "/manifests/"), 0);
    let out = run(Some("warmer"), "s3cret").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(blob_gets(&up, &img), vec![1, 1]);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_warm_names_another_upstream_by_its_host_or_with_upstream() {
    let hub = Fake::start().await;
    let other = Fake::start().await;
    let img = Image::new(780, &[7_000]);
    other.add_image("org/app", "1", &img);
    let b = Berth::start(&hub, |c| {
        c.upstreams.insert(
            "ghcr.io".into(),
            berth::config::UpstreamConfig::new(
                berth::config::UpstreamUrl::parse(&other.url()).unwrap(),
            ),
        );
    })
    .await;
    let url = format!("http://{}", b.addr);
    let out = berth_warm(vec![
        "ghcr.io/org/app:1".into(),
        "--url".into(),
        url.clone(),
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(blob_gets(&other, &img), vec![1, 1]);
    assert_eq!(hub.requests(), 0, "Docker Hub was asked");
    let out = berth_warm(vec![
        "org/app:1".into(),
        "--upstream".into(),
        "ghcr.io".into(),
        "--url".into(),
        url,
    ])
    .await
    .unwrap();
    assert!(out.status.success());
    assert_eq!(blob_gets(&other, &img), vec![1, 1], "cached the first time");
    assert_eq!(hub.requests(), 0);
    b.stop().await;
}
