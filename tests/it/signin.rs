//! The status page's sign-in and its actions: sessions from the sign-in form (cookie
//! attributes, what a session shows, signing out), CSRF and origin checks on every form, deletes
//! of private tags and manifests from a repository's page (through the registry's own delete),
//! and a session that is no credential for the registry API.

use base64::Engine as _;
use http::Method;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::client::{send, send_body, wait_for, Reply};
use crate::support::fake::Fake;
use crate::support::harness::Berth;
use crate::support::image::{sha256, Image};

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";
const REPO_PAGE: &str = "/ui/repo/_local/private/app";

struct Env {
    b: Berth,
    _up: Fake,
    users: tempfile::TempDir,
    basic: String,
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
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        Env {
            b,
            _up: up,
            users,
            basic,
        }
    }

    /// Pushes `image` as `repo:tag` with Basic credentials.
    async fn push(&self, repo: &str, tag: &str, image: &Image) {
        let auth = [("authorization", self.basic.as_str())];
        for blob in image.blobs() {
            let url = self.b.url(&format!(
                "/v2/{repo}/blobs/uploads/?digest={}",
                sha256(&blob)
            ));
            let r = send_body(Method::POST, &url, &auth, blob).await;
            assert_eq!(r.status, 201, "{:?}", r.body);
        }
        let headers = [
            ("authorization", self.basic.as_str()),
            ("content-type", image.media_type),
        ];
        let url = self.b.url(&format!("/v2/{repo}/manifests/{tag}"));
        let r = send_body(Method::PUT, &url, &headers, image.manifest.clone()).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    /// A manifest's status through the registry API, with Basic credentials.
    async fn api_status(&self, repo: &str, reference: &str) -> u16 {
        let url = self.b.url(&format!("/v2/{repo}/manifests/{reference}"));
        send(Method::GET, &url, &[("authorization", self.basic.as_str())])
            .await
            .status
            .as_u16()
    }

    /// A page as whoever `cookie` is.
    async fn page(&self, path: &str, cookie: &str) -> Reply {
        send(Method::GET, &self.b.url(path), &[("cookie", cookie)]).await
    }

    /// Posts a url-encoded form with these headers.
    async fn post(&self, path: &str, headers: &[(&str, &str)], fields: &[(&str, &str)]) -> Reply {
        let mut body = form_urlencoded::Serializer::new(String::new());
        for (k, v) in fields {
            body.append_pair(k, v);
        }
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        h.extend_from_slice(headers);
        send_body(Method::POST, &self.b.url(path), &h, body.finish()).await
    }

    /// Shows the sign-in form and posts it: the reply, and the session cookie it set, if any.
    async fn sign_in(&self, user: &str, password: &str) -> (Reply, Option<String>) {
        let form = self.b.get("/ui/login").await;
        assert_eq!(form.status, 200);
        let login = set_cookie(&form, "berth_login").expect("the form sets a pre-session cookie");
        let token = csrf(&String::from_utf8_lossy(&form.bytes()));
        let cookie = format!("berth_login={}", cookie_value(&login));
        let r = self
            .post(
                "/ui/login",
                &[("cookie", &cookie)],
                &[("csrf", &token), ("user", user), ("password", password)],
            )
            .await;
        let session = set_cookie(&r, "berth_session").filter(|c| !cookie_value(c).is_empty());
        (r, session)
    }

    async fn metric(&self, reason: &str) -> f64 {
        berth::ops::metrics::sample(
            &String::from_utf8_lossy(&self.b.get("/metrics").await.bytes()),
            "berth_status_form_refused_total",
            &[("reason", reason)],
        )
    }
}

/// The `Set-Cookie` header of a reply setting `name`, whole.
fn set_cookie(r: &Reply, name: &str) -> Option<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn cookie_value(set_cookie: &str) -> &str {
    let pair = set_cookie.split(';').next().unwrap();
    pair.split_once('=').unwrap().1
}

/// `berth_session=ID` for a `Cookie` header.
fn session_header(set_cookie: &str) -> String {
    format!("berth_session={}", cookie_value(set_cookie))
}

/// The first CSRF token in a page's forms.
fn csrf(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no form token in {html}"));
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.bytes()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_shows_private_repositories_until_signing_out() {
    let e = Env::start().await;
    e.push("private/app", "v1", &Image::new(200, &[10])).await;

    let anonymous = text(&e.b.get("/").await);
    assert!(anonymous.contains("id=\"private-hidden\""), "{anonymous}");
    assert!(anonymous.contains("href=\"/ui/login\""), "a sign-in link");
    assert!(!anonymous.contains("private/app"));
    assert_eq!(e.b.get(REPO_PAGE).await.status, 404);

    // A wrong password: a generic message, no session, counted.
    let (r, session) = e.sign_in(USER, "wrong").await;
    assert_eq!(r.status, 401);
    assert!(text(&r).contains("Sign-in failed"), "{}", text(&r));
    assert!(session.is_none());
    assert_eq!(e.metric("sign_in").await, 1.0);
    let (r, session) = e.sign_in("mallory", PASSWORD).await;
    assert_eq!(r.status, 401);
    assert!(session.is_none());

    // The right one: a session cookie only this server's pages can use.
    let (r, session) = e.sign_in(USER, PASSWORD).await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    assert_eq!(r.header("location"), "/");
    let session = session.expect("a session cookie");
    let id = cookie_value(&session);
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(
            session.contains(attribute),
            "{attribute} missing: {session}"
        );
    }
    assert!(
        !session.contains("Secure"),
        "not over plain HTTP: {session}"
    );
    let cookie = session_header(&session);

    let signed = text(&e.page("/", &cookie).await);
    assert!(signed.contains("private/app"), "{signed}");
    assert!(!signed.contains("id=\"private-hidden\""));
    assert!(signed.contains("<b id=\"signed-in-as\">alice</b>"));
    assert!(signed.contains("action=\"/ui/logout\""));
    let page = e.page(REPO_PAGE, &cookie).await;
    assert_eq!(page.status, 200);
    assert!(text(&page).contains("id=\"delete-tag-v1\""));
    assert!(
        page.header("content-security-policy")
            .contains("form-action 'self'"),
        "{}",
        page.header("content-security-policy")
    );
    assert!(!text(&page).contains("<script"));

    // Signing out needs the session's token; then the cookie is worth nothing, kept or not.
    let r = e
        .post("/ui/logout", &[("cookie", &cookie)], &[("csrf", "00")])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(e.page(REPO_PAGE, &cookie).await.status, 200);
    let r = e
        .post(
            "/ui/logout",
            &[("cookie", &cookie)],
            &[("csrf", &csrf(&signed))],
        )
        .await;
    assert_eq!(r.status, 303);
    let cleared = set_cookie(&r, "berth_session").expect("the cookie is cleared");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(e.page(REPO_PAGE, &cookie).await.status, 404);
    assert!(text(&e.page("/", &cookie).await).contains("id=\"private-hidden\""));

    // A user removed from the htpasswd file loses their sessions.
    let (_, session) = e.sign_in(USER, PASSWORD).await;
    let cookie = session_header(&session.unwrap());
    assert_eq!(e.page(REPO_PAGE, &cookie).await.status, 200);
    let htpasswd = e.users.path().join("htpasswd");
    berth::auth::remove_user(&htpasswd, USER).unwrap();
    assert_eq!(e.page(REPO_PAGE, &cookie).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_without_its_form_token_or_from_another_site_is_refused() {
    let e = Env::start().await;
    let creds = [("user", USER), ("password", PASSWORD)];
    // No pre-session cookie, no token: a page of another site cannot sign a visitor in.
    let r = e.post("/ui/login", &[], &creds).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "DENIED");
    assert!(set_cookie(&r, "berth_session").is_none());
    // A token that belongs to another form.
    let form = e.b.get("/ui/login").await;
    let login = set_cookie(&form, "berth_login").unwrap();
    let token = csrf(&text(&form));
    let other = set_cookie(&e.b.get("/ui/login").await, "berth_login").unwrap();
    let mut fields = vec![("csrf", token.as_str())];
    fields.extend_from_slice(&creds);
    let cookie = format!("berth_login={}", cookie_value(&other));
    let r = e.post("/ui/login", &[("cookie", &cookie)], &fields).await;
    assert_eq!(r.status, 403);
    assert_eq!(e.metric("csrf").await, 2.0);
    // The right token, posted from another site.
    let cookie = format!("berth_login={}", cookie_value(&login));
    for foreign in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = e
            .post("/ui/login", &[("cookie", &cookie), foreign], &fields)
            .await;
        assert_eq!(r.status, 403, "{foreign:?}");
        assert!(set_cookie(&r, "berth_session").is_none());
    }
    assert_eq!(e.metric("origin").await, 2.0);
    // From the page itself it works.
    let origin = format!("http://{}", e.b.addr);
    let r = e
        .post(
            "/ui/login",
            &[
                ("cookie", &cookie),
                ("origin", &origin),
                ("sec-fetch-site", "same-origin"),
            ],
            &fields,
        )
        .await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    assert!(set_cookie(&r, "berth_session").is_some());
    // A form body has a cap.
    let big = "x".repeat(20_000);
    let r = e
        .post("/ui/login", &[("cookie", &cookie)], &[("user", &big)])
        .await;
    assert_eq!(r.status, 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_from_the_page_need_the_session_token_and_are_the_registry_delete() {
    let e = Env::start().await;
    let app_image = Image::new(201, &[10]);
    let other = Image::new(202, &[12]);
    e.push("private/app", "v1", &app_image).await;
    e.push("private/app", "v2", &app_image).await;
    e.push("private/app", "other", &other).await;
    let (_, session) = e.sign_in(USER, PASSWORD).await;
    let cookie = session_header(&session.unwrap());
    let token = csrf(&text(&e.page(REPO_PAGE, &cookie).await));
    let delete_v1 = [("action", "delete-tag"), ("tag", "v1")];

    // Without the token, with another session's, without a session: refused, nothing deleted.
    let (_, second) = e.sign_in(USER, PASSWORD).await;
    let second = session_header(&second.unwrap());
    let second_token = csrf(&text(&e.page(REPO_PAGE, &second).await));
    assert_ne!(token, second_token);
    for (session, token, origin) in [
        (Some(cookie.as_str()), None, None),
        (Some(cookie.as_str()), Some(second_token.as_str()), None),
        (Some(cookie.as_str()), Some(""), None),
        (None, Some(token.as_str()), None),
        (
            Some(cookie.as_str()),
            Some(token.as_str()),
            Some("http://evil.example"),
        ),
    ] {
        let mut headers = Vec::new();
        headers.extend(session.map(|c| ("cookie", c)));
        headers.extend(origin.map(|o| ("origin", o)));
        let mut fields = delete_v1.to_vec();
        fields.extend(token.map(|t| ("csrf", t)));
        let r = e.post(REPO_PAGE, &headers, &fields).await;
        assert_eq!(r.status, 403, "{headers:?} {fields:?}");
        assert_eq!(e.api_status("private/app", "v1").await, 200);
    }
    assert_eq!(e.metric("csrf").await, 3.0);
    assert_eq!(e.metric("no_session").await, 1.0);
    assert_eq!(e.metric("origin").await, 1.0);

    // With it: the tag is gone from the registry API too, its manifest stays under v2.
    let mut fields = delete_v1.to_vec();
    fields.push(("csrf", &token));
    let r = e.post(REPO_PAGE, &[("cookie", &cookie)], &fields).await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    assert_eq!(r.header("location"), format!("{REPO_PAGE}?deleted=v1"));
    assert_eq!(e.api_status("private/app", "v1").await, 404);
    assert_eq!(e.api_status("private/app", "v2").await, 200);
    let page = text(&e.page(r.header("location"), &cookie).await);
    assert!(
        page.contains("id=\"notice\">Deleted <code>v1</code>"),
        "{page}"
    );
    assert!(!page.contains("id=\"delete-tag-v1\""));
    assert!(page.contains("id=\"delete-tag-v2\""));

    // A manifest by digest takes its tags with it.
    let fields = [
        ("csrf", token.as_str()),
        ("action", "delete-manifest"),
        ("digest", other.digest.as_str()),
    ];
    let r = e.post(REPO_PAGE, &[("cookie", &cookie)], &fields).await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    assert_eq!(e.api_status("private/app", &other.digest).await, 404);
    assert_eq!(e.api_status("private/app", "other").await, 404);
    assert_eq!(e.api_status("private/app", "v2").await, 200);

    // Bad input gets a registry error, not a delete.
    let fields = [
        ("csrf", token.as_str()),
        ("action", "delete-tag"),
        ("tag", "no such/tag"),
    ];
    let r = e.post(REPO_PAGE, &[("cookie", &cookie)], &fields).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.error_code(), "TAG_INVALID");
    let fields = [
        ("csrf", token.as_str()),
        ("action", "delete-tag"),
        ("tag", "gone"),
    ];
    let r = e.post(REPO_PAGE, &[("cookie", &cookie)], &fields).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_no_credential_for_the_registry_api() {
    let e = Env::start().await;
    e.push("private/app", "v1", &Image::new(203, &[10])).await;
    let (_, session) = e.sign_in(USER, PASSWORD).await;
    let cookie = session_header(&session.unwrap());
    assert_eq!(e.page(REPO_PAGE, &cookie).await.status, 200);
    let h = [("cookie", cookie.as_str())];
    for (method, path) in [
        (Method::GET, "/v2/"),
        (Method::GET, "/v2/_catalog"),
        (Method::GET, "/v2/private/app/manifests/v1"),
        (Method::DELETE, "/v2/private/app/manifests/v1"),
    ] {
        let r = send(method.clone(), &e.b.url(path), &h).await;
        assert_eq!(r.status, 401, "{method} {path}");
    }
    assert_eq!(e.api_status("private/app", "v1").await, 200);
}

/// Webhook deliveries received: their JSON bodies.
type Received = Arc<Mutex<Vec<serde_json::Value>>>;

/// A webhook receiver on a free port answering 200; its URL.
async fn receiver() -> (String, Received) {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events = Received::default();
    let ev = events.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ev = ev.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let ev = ev.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        ev.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_from_the_page_fires_the_webhook_with_the_signed_in_user() {
    let (url, events) = receiver().await;
    let hooks = berth::config::Config::from_toml(&format!("[[webhooks]]\nurl = \"{url}\"\n"))
        .unwrap()
        .webhooks;
    let e = Env::start_with(move |c| c.webhooks = hooks).await;
    let image = Image::new(204, &[10]);
    e.push("private/app", "v1", &image).await;
    let (_, session) = e.sign_in(USER, PASSWORD).await;
    let cookie = session_header(&session.unwrap());
    let token = csrf(&text(&e.page(REPO_PAGE, &cookie).await));
    let fields = [
        ("csrf", token.as_str()),
        ("action", "delete-tag"),
        ("tag", "v1"),
    ];
    let r = e.post(REPO_PAGE, &[("cookie", &cookie)], &fields).await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    wait_for("the delete event", Duration::from_secs(10), || {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "delete")
    })
    .await;
    let events = events.lock().unwrap();
    let delete = events.iter().find(|e| e["action"] == "delete").unwrap();
    assert_eq!(delete["repository"], "private/app");
    assert_eq!(delete["tag"], "v1");
    assert_eq!(delete["digest"], image.digest);
    assert_eq!(delete["actor"], USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_everything_the_page_asks_visitors_to_sign_in_and_a_session_answers() {
    let e = Env::start_with(|c| c.auth_everything = true).await;
    let r = e.b.get("/").await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), "/ui/login");
    assert_eq!(e.b.get("/ui/repo/docker.io/library/x").await.status, 303);
    let (r, session) = e.sign_in(USER, PASSWORD).await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    let cookie = session_header(&session.unwrap());
    let page = e.page("/", &cookie).await;
    assert_eq!(page.status, 200);
    assert!(text(&page).contains("id=\"signed-in-as\""));
    // Basic credentials still do, and wrong ones are refused as before.
    let r = e.b.get_with("/", &[("authorization", &e.basic)]).await;
    assert_eq!(r.status, 200);
    let r =
        e.b.get_with("/", &[("authorization", "Basic YWxpY2U6bm8=")])
            .await;
    assert_eq!(r.status, 401);
    // And the API still wants its own credentials.
    let r = send(
        Method::GET,
        &e.b.url("/v2/library/x/tags/list"),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_failures_count_against_the_same_limit_as_basic_credentials() {
    let e = Env::start().await;
    for _ in 0..berth::auth::FAILURES_PER_MINUTE {
        let (r, _) = e.sign_in(USER, "wrong").await;
        assert_eq!(r.status, 401);
    }
    // The form is refused before any password check, with the right password too...
    let (r, session) = e.sign_in(USER, PASSWORD).await;
    assert_eq!(r.status, 429);
    assert!(session.is_none());
    assert!(
        text(&r).contains("Too many sign-in attempts"),
        "{}",
        text(&r)
    );
    assert!(!r.header("retry-after").is_empty());
    // ...and so are Basic credentials from the same address: it is one limit.
    let r = e.b.get_with("/v2/", &[("authorization", &e.basic)]).await;
    assert_eq!(r.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_body_that_stalls_is_answered_within_the_form_wait() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = Env::start().await;
    let mut tcp = tokio::net::TcpStream::connect(e.b.addr).await.unwrap();
    let started = std::time::Instant::now();
    tcp.write_all(
        b"POST /ui/login HTTP/1.1\r\nhost: berth\r\ncontent-type: application/x-www-form-urlencoded\r\n\
          content-length: 100\r\n\r\nuser=alice",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a stalled form within 30 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "answered after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_offers_and_allows_what_the_access_rules_grant() {
    // alice: everything, admin of every repository; bob: pull and push in the private
    // namespace, no delete, no admin.
    let rules = berth::config::Config::from_toml(
        "[[access]]\nusers = [\"alice\"]\nrepositories = [\"*\"]\n\
         actions = [\"pull\", \"push\", \"delete\", \"admin\"]\n\
         [[access]]\nusers = [\"bob\"]\nrepositories = [\"private/*\"]\nactions = [\"pull\", \"push\"]\n",
    )
    .unwrap();
    let e = Env::start_with(|c| c.access = rules.access).await;
    berth::auth::add_user(&e.users.path().join("htpasswd"), "bob", PASSWORD, 4).unwrap();
    let img = Image::new(211, &[10]);
    e.push("private/app", "v1", &img).await;
    let public = Image::new(212, &[300, 400]);
    e._up.add_image("library/alpine", "3", &public);
    e.b.pull("alpine", "3", &public).await;
    let mirrored = "/ui/repo/docker.io/library/alpine";

    let (_, bob) = e.sign_in("bob", PASSWORD).await;
    let bob = session_header(&bob.expect("bob signs in"));
    let (_, alice) = e.sign_in(USER, PASSWORD).await;
    let alice = session_header(&alice.expect("alice signs in"));

    // bob sees no button he may not use, and a post of one is refused: nothing changes.
    let page = text(&e.page(REPO_PAGE, &bob).await);
    assert!(!page.contains("id=\"delete-tag-v1\""), "{page}");
    let page = text(&e.page(mirrored, &bob).await);
    assert!(
        !page.contains("id=\"purge\"") && !page.contains("id=\"warm\""),
        "{page}"
    );
    let token = csrf(&page);
    for (path, fields) in [
        (REPO_PAGE, vec![("action", "delete-tag"), ("tag", "v1")]),
        (mirrored, vec![("action", "purge")]),
        (mirrored, vec![("action", "warm"), ("reference", "3")]),
    ] {
        let mut fields = fields;
        fields.push(("csrf", &token));
        let r = e.post(path, &[("cookie", &bob)], &fields).await;
        assert_eq!(r.status, 403, "{path} {fields:?}");
        assert_eq!(r.error_code(), "DENIED");
    }
    assert_eq!(e.metric("permission").await, 3.0);
    assert_eq!(e.api_status("private/app", "v1").await, 200);
    let manifest_gets = || e._up.count("GET", "/v2/library/alpine/manifests/3");
    assert_eq!(manifest_gets(), 1);

    // alice, admin: the mirrored page has both forms; a purge empties the cache, so the next
    // pull asks the upstream again, and a warm-up fetches the image back in the background.
    let page = text(&e.page(mirrored, &alice).await);
    assert!(
        page.contains("id=\"purge\"") && page.contains("id=\"warm\""),
        "{page}"
    );
    let token = csrf(&page);
    let r = e
        .post(
            mirrored,
            &[("cookie", &alice)],
            &[("csrf", &token), ("action", "purge")],
        )
        .await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    assert_eq!(r.header("location"), format!("{mirrored}?purged="));
    let blob_gets = || e._up.count("GET", "/blobs/");
    let fetched = blob_gets();
    let r = e
        .post(
            mirrored,
            &[("cookie", &alice)],
            &[("csrf", &token), ("action", "warm"), ("reference", "3")],
        )
        .await;
    assert_eq!(r.status, 303, "{:?}", r.body);
    assert_eq!(r.header("location"), format!("{mirrored}?warming=3"));
    wait_for(
        "the warm-up to fetch the blobs again",
        Duration::from_secs(10),
        || blob_gets() == fetched + public.blobs().len(),
    )
    .await;
    assert_eq!(manifest_gets(), 2, "the purged tag was fetched anew");
    e.b.settle().await;
    e.b.pull("alpine", "3", &public).await;
    assert_eq!(
        blob_gets(),
        fetched + public.blobs().len(),
        "warm: hits only"
    );
}
