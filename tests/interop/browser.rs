//! The status page in a real browser: Debian's headless chromium renders berth's `/` after some
//! pulls, dumps the DOM and takes a screenshot (`status-page.png` in cargo's
//! `CARGO_TARGET_TMPDIR`, `target/tmp/` by default, kept for a look after the run).
//!
//! Interop tier: `cargo test --features interop --test interop browser::`; needs
//! `/usr/bin/chromium` (Debian package `chromium`). berth and its upstream are the in-process
//! ones of the fresh-machine tier (`tests/support`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
/// A cold chromium start in a busy container can take a while; a hung one must not hang CI.
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(120);

/// Runs headless chromium with its own throwaway profile; returns stdout.
async fn chromium(extra: &[String], url: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} not found: install the Debian package `chromium` (apt-get install -y chromium)"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(CHROMIUM_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {CHROMIUM_DEADLINE:?}"))
        .unwrap_or_else(|e| {
            panic!("cannot run {CHROMIUM} ({e}): install the Debian package `chromium`")
        });
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text a reader sees: the DOM without tags, entities decoded, whitespace collapsed.
fn visible_text(dom: &str) -> String {
    let body = dom.split_once("<body").map_or(dom, |(_, b)| b);
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG"
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_chromium() {
    let up = Fake::start().await;
    let images = [
        (
            "library/alpine",
            "alpine",
            "3.19",
            Image::new(21, &[40_000, 250_000]),
        ),
        (
            "library/debian",
            "debian",
            "bookworm-slim",
            Image::new(22, &[900_000]),
        ),
        (
            "team/api",
            "team/api",
            "v2.4.1",
            Image::new(23, &[120_000, 30_000]),
        ),
    ];
    for (repo, _, tag, img) in &images {
        up.add_image(repo, tag, img);
    }
    up.st().rate_limit_headers = true;
    let b = Berth::start(&up, |c| {
        c.max_cache_size = berth::config::ByteSize(4 << 20);
        c.rate_limit.max_upstream_concurrency = Some(8);
    })
    .await;
    // Pull everything, then pull alpine twice more from the cache.
    for (i, (_, name, tag, img)) in images.iter().enumerate() {
        let pulls = if i == 0 { 3 } else { 1 };
        for _ in 0..pulls {
            let r = b.get(&format!("/v2/{name}/manifests/{tag}")).await;
            assert_eq!(r.status, 200);
            for blob in img.blobs() {
                assert_eq!(
                    b.get(&format!("/v2/{name}/blobs/{}", sha256(&blob)))
                        .await
                        .bytes(),
                    blob
                );
            }
        }
    }
    let url = b.url("/");

    let dom = chromium(&["--dump-dom".to_owned()], &url).await;
    let text = visible_text(&dom);
    for (repo, _, tag, _) in &images {
        assert!(text.contains(repo), "{repo} not on the page: {text}");
        assert!(text.contains(tag), "{tag} not on the page: {text}");
    }
    let ratio = text
        .split_once("Hit ratio ")
        .and_then(|(_, rest)| rest.split_once('%'))
        .and_then(|(v, _)| v.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no hit ratio on the page: {text}"));
    assert!(ratio > 0.0, "hit ratio {ratio}: {text}");

    let shot: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,900".to_owned(),
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", shot.display()));
    assert_eq!(png_size(&png), (1280, 900));
    assert!(
        png.len() > 20_000,
        "a {}-byte screenshot is too small to show the page",
        png.len()
    );
}
