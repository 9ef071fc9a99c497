//! The status page in a real browser: Debian's headless chromium renders berth's `/` after some
//! pulls, dumps the DOM and takes a screenshot (`status-page.png` in cargo's
//! `CARGO_TARGET_TMPDIR`, `target/tmp/` by default, kept for a look after the run); the savings
//! charts are looked for in the DOM and, decoded, in a screenshot of their own
//! (`status-charts.png`).
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

/// An 8-bit RGB(A) image decoded from a PNG: (width, height, channels, pixels).
fn decode_png(png: &[u8]) -> (usize, usize, usize, Vec<u8>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("a sane PNG size")];
    let frame = reader.next_frame(&mut buf).expect("a PNG frame");
    let channels = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("a screenshot in {other:?}"),
    };
    buf.truncate(frame.buffer_size());
    (frame.width as usize, frame.height as usize, channels, buf)
}

/// "#3a86ff" as bytes.
fn rgb(hex: &str) -> [u8; 3] {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

/// Pixels of this colour (within a little rounding), and the tallest vertical run of them: a
/// bar is a tall run, a legend swatch is 10 px.
fn colour_in(img: &(usize, usize, usize, Vec<u8>), colour: [u8; 3]) -> (usize, usize) {
    let (w, h, ch, px) = img;
    let is = |x: usize, y: usize| {
        let p = &px[(y * w + x) * ch..][..3];
        p.iter()
            .zip(colour)
            .map(|(a, b)| a.abs_diff(b) as u32)
            .sum::<u32>()
            <= 24
    };
    let (mut count, mut tallest) = (0, 0);
    for x in 0..*w {
        let mut run = 0;
        for y in 0..*h {
            if is(x, y) {
                count += 1;
                run += 1;
                tallest = tallest.max(run);
            } else {
                run = 0;
            }
        }
    }
    (count, tallest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_savings_charts_render_in_chromium() {
    let up = Fake::start().await;
    let img = Image::new(24, &[60_000, 200_000]);
    up.add_image("library/alpine", "3.20", &img);
    let b = Berth::start(&up, |_| {}).await;
    // One cold pull and two warm ones: bytes from the cache and from upstream, hits and
    // misses, two pulls avoided.
    for _ in 0..3 {
        assert_eq!(b.get("/v2/alpine/manifests/3.20").await.status, 200);
        for blob in img.blobs() {
            let r = b.get(&format!("/v2/alpine/blobs/{}", sha256(&blob))).await;
            assert_eq!(r.bytes(), blob);
        }
        b.settle().await;
    }
    let url = b.url("/");

    // The DOM chromium built holds the charts, each titled, each bar and point with its value.
    let dom = chromium(&["--dump-dom".to_owned()], &url).await;
    for scale in ["hours", "days"] {
        for chart in ["bytes", "ratio", "pulls"] {
            let id = format!("chart-{scale}-{chart}");
            let at = dom
                .find(&format!("<svg id=\"{id}\""))
                .unwrap_or_else(|| panic!("no <svg id={id}> in the DOM: {dom}"));
            let svg = &dom[at..at + dom[at..].find("</svg>").unwrap()];
            assert!(svg.contains(&format!("<title id=\"{id}-title\">")), "{svg}");
            let marks = match chart {
                "bytes" => [
                    "<rect class=\"cache-bytes\"",
                    "<rect class=\"upstream-bytes\"",
                ],
                "ratio" => ["<circle class=\"hit-ratio\"", "<circle class=\"hit-ratio\""],
                _ => [
                    "<rect class=\"pulls-avoided\"",
                    "<rect class=\"pulls-avoided\"",
                ],
            };
            for mark in marks {
                let m = &svg[svg
                    .find(mark)
                    .unwrap_or_else(|| panic!("no {mark} in {svg}"))..];
                let mark_end = m.find("</rect>").or(m.find("</circle>")).unwrap();
                assert!(
                    m[..mark_end].contains("<title>"),
                    "untitled: {}",
                    &m[..mark_end]
                );
            }
        }
    }
    let text = visible_text(&dom);
    assert!(text.contains("pulls avoided: 2"), "{text}");

    // The screenshot shows them: bars (tall runs of their colour, not just the legend's
    // swatches) of bytes from the cache, from upstream and pulls avoided, and the hit ratio.
    let shot: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-charts.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1800".to_owned(),
            "--hide-scrollbars".to_owned(),
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", shot.display()));
    let image = decode_png(&png);
    assert_eq!((image.0, image.1), (1280, 1800));
    for (what, colour) in [
        ("bytes from the cache", "#3a86ff"),
        ("bytes from upstream", "#fb5607"),
        ("pulls avoided", "#d99a00"),
    ] {
        let (count, tallest) = colour_in(&image, rgb(colour));
        assert!(
            tallest >= 30,
            "no bar of {what} ({colour}) in {}: {count} pixels, tallest run {tallest}",
            shot.display()
        );
    }
    let (ratio, _) = colour_in(&image, rgb("#8338ec"));
    assert!(
        ratio > 0,
        "no hit ratio ({}) in {}",
        "#8338ec",
        shot.display()
    );
}
