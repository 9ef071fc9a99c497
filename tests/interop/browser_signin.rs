//! Signing in to the status page and deleting a tag from it, in a real browser: headless
//! chromium driven over the DevTools protocol (`--remote-debugging-pipe`: JSON messages, each
//! ended by a NUL byte, on its fds 3 and 4, which a shell maps to the pipes of its stdin and
//! stdout). The page has no script of its own: the test types into the form and clicks its
//! buttons from outside, as a person would.
//!
//! A screenshot of the repository page after the delete is kept in cargo's
//! `CARGO_TARGET_TMPDIR` (`status-signed-in.png`).
//!
//! Interop tier: `cargo test --features interop --test interop browser`; needs
//! `/usr/bin/chromium` (Debian package `chromium`).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
/// A cold chromium start in a busy container can take a while; a hung one must not hang CI.
const DEADLINE: Duration = Duration::from_secs(120);

/// Headless chromium and one page in it, over the DevTools protocol.
struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    next: u64,
    session: String,
}

impl Browser {
    async fn start() -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: install the Debian package `chromium`"
        );
        let profile = tempfile::tempdir().unwrap();
        // fd 3 is what chromium reads commands from, fd 4 where it writes answers; its own
        // stdout goes to stderr so that nothing else lands in the pipe.
        let script = "exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>&2";
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start chromium");
        let mut b = Browser {
            to: child.stdin.take().unwrap(),
            from: BufReader::new(child.stdout.take().unwrap()),
            _child: child,
            _profile: profile,
            next: 0,
            session: String::new(),
        };
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b.call("Page.enable", json!({})).await;
        b
    }

    /// Sends a command (to the page once attached) and waits for its answer.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).await.unwrap();
        self.to.flush().await.unwrap();
        let read = async {
            loop {
                let mut buf = Vec::new();
                let n = self.from.read_until(0, &mut buf).await.unwrap();
                assert!(n > 0, "chromium closed its DevTools pipe");
                buf.pop();
                let v: Value = serde_json::from_slice(&buf).unwrap();
                if v["id"] == json!(id) {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        };
        tokio::time::timeout(DEADLINE, read)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method} within {DEADLINE:?}"))
    }

    /// Evaluates an expression in the page; its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits until the page at a URL containing `url_part` has loaded; its body's text.
    async fn loaded(&mut self, url_part: &str) -> String {
        let start = Instant::now();
        loop {
            let state = self
                .eval("[document.readyState, location.href, document.body ? document.body.innerText : '']")
                .await;
            if state[0] == "complete" && state[1].as_str().unwrap_or("").contains(url_part) {
                return state[2].as_str().unwrap_or("").to_owned();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no page at {url_part} loaded: {state}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn goto(&mut self, url: &str) -> String {
        self.call("Page.navigate", json!({"url": url})).await;
        self.loaded(url).await
    }

    /// Clicks the element `selector` names (it must exist).
    async fn click(&mut self, selector: &str) {
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector:?}); if (!e) return false; e.click(); return true; }})()"
            ))
            .await;
        assert_eq!(found, json!(true), "nothing at {selector}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_signs_in_and_deletes_a_tag_and_a_form_without_its_token_is_refused() {
    let users = tempfile::tempdir().unwrap();
    let htpasswd = users.path().join("htpasswd");
    berth::auth::add_user(&htpasswd, "alice", "pw", 4).unwrap();
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| {
        c.private_ns = vec!["private".into()];
        c.htpasswd = Some(htpasswd.clone());
    })
    .await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:pw")
    );
    let auth = [("authorization", basic.as_str())];
    let image = Image::new(300, &[10]);
    for tag in ["v1", "v2"] {
        for blob in image.blobs() {
            let url = b.url(&format!(
                "/v2/private/app/blobs/uploads/?digest={}",
                sha256(&blob)
            ));
            assert_eq!(send_body(Method::POST, &url, &auth, blob).await.status, 201);
        }
        let headers = [auth[0], ("content-type", image.media_type)];
        let url = b.url(&format!("/v2/private/app/manifests/{tag}"));
        let r = send_body(Method::PUT, &url, &headers, image.manifest.clone()).await;
        assert_eq!(r.status, 201);
    }
    let api = |tag: &'static str| {
        let url = b.url(&format!("/v2/private/app/manifests/{tag}"));
        let auth = basic.clone();
        async move {
            send(Method::GET, &url, &[("authorization", auth.as_str())])
                .await
                .status
        }
    };

    let mut browser = Browser::start().await;
    let text = browser.goto(&b.url("/")).await;
    assert!(
        text.contains("Private repositories exist but are hidden"),
        "{text}"
    );
    assert!(!text.contains("private/app"));

    // Sign in through the form, as a person would.
    browser.click("#sign-in-link").await;
    browser.loaded("/ui/login").await;
    browser
        .eval("document.querySelector('input[name=user]').value = 'alice'; document.querySelector('input[name=password]').value = 'pw'")
        .await;
    browser.click("#sign-in button").await;
    let start = Instant::now();
    let text = loop {
        let text = browser.loaded("/").await;
        if text.contains("Signed in as alice") || start.elapsed() > DEADLINE {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.contains("Signed in as alice"), "{text}");
    assert!(text.contains("private/app"), "{text}");

    // Delete v1 from its repository's page.
    let page = b.url("/ui/repo/_local/private/app");
    browser.goto(&page).await;
    browser.click("#delete-tag-v1").await;
    let text = browser.loaded("?deleted=v1").await;
    assert!(text.contains("Deleted v1."), "{text}");
    // A look at the signed-in page, kept for after the run.
    let shot = browser
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-signed-in.png");
    std::fs::write(&path, &png).unwrap();
    assert_eq!(api("v1").await, 404);
    assert_eq!(api("v2").await, 200);

    // The same form for v2 without its token: refused, and v2 stays.
    browser
        .eval("document.querySelector('#delete-tag-v2').form.querySelector('input[name=csrf]').remove()")
        .await;
    browser.click("#delete-tag-v2").await;
    let start = Instant::now();
    let text = loop {
        let text = browser.loaded("/ui/repo/_local/private/app").await;
        if text.contains("DENIED") || start.elapsed() > DEADLINE {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.contains("DENIED"), "{text}");
    assert_eq!(api("v2").await, 200);
    b.stop().await;
}
