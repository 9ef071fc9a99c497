//! TLS termination end to end: berth runs in-process with a plain and a TLS listener on
//! 127.0.0.1, using certificates from `berth::certs`, and a rustls + hyper client talks to it.
//!
//! The upstream is a port nothing listens on (`/v2/` never contacts it), except where a test
//! needs content: then it is the in-process fake of `support::fake`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use berth::app::{Running, StartError};
use berth::certs::{self, Ca, Host, Validity};
use berth::config::{Config, Seconds, TlsConfig, UpstreamUrl};

/// Every test finishes within this, or fails.
const DEADLINE: Duration = Duration::from_secs(30);

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("the test did not finish within its deadline")
}

fn hosts() -> Vec<Host> {
    vec![
        Host::parse("mirror.test").unwrap(),
        Host::parse("127.0.0.1").unwrap(),
    ]
}

/// A CA plus the PEM files of a server certificate it issued, in a temporary directory.
struct Certs {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Certs {
    fn new(server_validity: Validity) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(Validity::days_from_now(30)).unwrap();
        let certs = Certs { dir, ca };
        certs.issue(server_validity);
        certs
    }

    fn valid() -> Certs {
        Certs::new(Validity::days_from_now(30))
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// Issues a new server certificate (new key) over the files; returns its leaf in DER.
    fn issue(&self, validity: Validity) -> CertificateDer<'static> {
        let server = self.ca.issue(&hosts(), validity).unwrap();
        std::fs::write(self.cert(), &server.chain).unwrap();
        std::fs::write(self.key(), &server.key).unwrap();
        leaf(&self.cert())
    }
}

fn leaf(chain: &Path) -> CertificateDer<'static> {
    let pem = std::fs::read(chain).unwrap();
    let first = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    first
}

struct Server {
    running: Running,
    _data: tempfile::TempDir,
}

impl Server {
    fn tls_addr(&self) -> SocketAddr {
        self.running.tls_addr.expect("TLS is configured")
    }
}

fn config(certs: &Certs, data: &Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.to_owned(),
        shutdown_grace: Seconds(Duration::from_secs(5)),
        tls: Some(TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: certs.cert(),
            key: certs.key(),
        }),
        ..Config::default()
    };
    config.default_upstream_config_mut().url = UpstreamUrl::parse("http://127.0.0.1:9").unwrap();
    config
}

async fn start(certs: &Certs) -> Server {
    let data = tempfile::tempdir().unwrap();
    let running = berth::app::start(config(certs, data.path())).await.unwrap();
    Server {
        running,
        _data: data,
    }
}

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection does a full handshake, so it shows the certificate served right now
    // (a resumed session would carry the one from before).
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// The certificate error a failed client handshake ended with.
fn cert_error(e: &io::Error) -> CertificateError {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => c.clone(),
        _ => panic!("expected a certificate error, got {e:?}"),
    }
}

fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

fn served_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

type Sender1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http1(stream: TlsStream<TcpStream>) -> Sender1 {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get_v2_http1(sender: &mut Sender1) -> Response<Incoming> {
    sender.ready().await.unwrap();
    let req = Request::get("/v2/")
        .header(http::header::HOST, "mirror.test")
        .body(Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap()
}

async fn assert_registry_ok(resp: Response<Incoming>) {
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("docker-distribution-api-version")
            .and_then(|v| v.to_str().ok()),
        Some("registry/2.0")
    );
    resp.into_body().collect().await.unwrap();
}

#[tokio::test]
async fn v2_over_tls_negotiates_h2_and_http1() {
    within(async {
        let certs = Certs::valid();
        let server = start(&certs).await;
        let ca = certs.ca.cert_pem();

        // h2 offered first: berth picks it, and speaks it.
        let stream = connect(
            server.tls_addr(),
            client_config(&ca, &[b"h2", b"http/1.1"]),
            "mirror.test",
        )
        .await
        .unwrap();
        assert_eq!(alpn(&stream).as_deref(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("https://mirror.test/v2/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_registry_ok(resp).await;

        // Only http/1.1 offered, and reaching berth by IP address (an IP SAN).
        let stream = connect(
            server.tls_addr(),
            client_config(&ca, &[b"http/1.1"]),
            "127.0.0.1",
        )
        .await
        .unwrap();
        assert_eq!(alpn(&stream).as_deref(), Some(&b"http/1.1"[..]));
        let mut sender = http1(stream).await;
        let resp = get_v2_http1(&mut sender).await;
        assert_eq!(resp.version(), Version::HTTP_11);
        assert_registry_ok(resp).await;

        // The plain listener runs at the same time.
        let tcp = TcpStream::connect(server.running.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        assert_registry_ok(get_v2_http1(&mut sender).await).await;

        server.running.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_client_trusting_another_ca_fails_the_handshake() {
    within(async {
        let certs = Certs::valid();
        let server = start(&certs).await;
        let other = Ca::generate(Validity::days_from_now(30)).unwrap();
        let e = connect(
            server.tls_addr(),
            client_config(&other.cert_pem(), &[b"http/1.1"]),
            "mirror.test",
        )
        .await
        .unwrap_err();
        assert_eq!(cert_error(&e), CertificateError::UnknownIssuer);
        server.running.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_wrong_host_name_fails_verification() {
    within(async {
        let certs = Certs::valid();
        let server = start(&certs).await;
        let e = connect(
            server.tls_addr(),
            client_config(&certs.ca.cert_pem(), &[b"http/1.1"]),
            "elsewhere.test",
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                cert_error(&e),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ),
            "{e:?}"
        );
        server.running.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn an_expired_certificate_is_rejected() {
    within(async {
        let now = time::OffsetDateTime::now_utc();
        let certs = Certs::new(Validity {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
        });
        let server = start(&certs).await;
        let e = connect(
            server.tls_addr(),
            client_config(&certs.ca.cert_pem(), &[b"http/1.1"]),
            "mirror.test",
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                cert_error(&e),
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ),
            "{e:?}"
        );
        server.running.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn reload_switches_the_certificate_without_dropping_open_connections() {
    within(async {
        let certs = Certs::valid();
        let first = leaf(&certs.cert());
        let server = start(&certs).await;
        let resolver = server.running.tls.clone().expect("TLS is configured");
        let client = client_config(&certs.ca.cert_pem(), &[b"http/1.1"]);

        let stream = connect(server.tls_addr(), client.clone(), "mirror.test")
            .await
            .unwrap();
        assert_eq!(served_leaf(&stream), first);
        let mut open = http1(stream).await;
        assert_registry_ok(get_v2_http1(&mut open).await).await;

        // What SIGHUP does, after the files were replaced.
        let second = certs.issue(Validity::days_from_now(60));
        assert_ne!(first, second);
        resolver.reload().unwrap();

        let stream = connect(server.tls_addr(), client.clone(), "mirror.test")
            .await
            .unwrap();
        assert_eq!(served_leaf(&stream), second);
        let mut fresh = http1(stream).await;
        assert_registry_ok(get_v2_http1(&mut fresh).await).await;

        // The connection opened before the reload still works.
        assert_registry_ok(get_v2_http1(&mut open).await).await;

        // A reload that fails keeps serving the current certificate.
        std::fs::write(certs.key(), "not a key").unwrap();
        let e = resolver.reload().unwrap_err();
        assert!(e.to_string().contains("server.key"), "{e}");
        let stream = connect(server.tls_addr(), client, "mirror.test")
            .await
            .unwrap();
        assert_eq!(served_leaf(&stream), second);

        server.running.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shutdown_closes_both_listeners_and_idle_tls_connections() {
    within(async {
        let certs = Certs::valid();
        let server = start(&certs).await;
        let (plain, tls) = (server.running.addr, server.tls_addr());
        let stream = connect(
            tls,
            client_config(&certs.ca.cert_pem(), &[b"http/1.1"]),
            "mirror.test",
        )
        .await
        .unwrap();
        let (mut idle, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        assert_registry_ok(get_v2_http1(&mut idle).await).await;

        // Returns well before the 5 s grace period: the idle keep-alive connection is closed,
        // which ends the client's connection task.
        tokio::time::timeout(Duration::from_secs(4), server.running.shutdown())
            .await
            .expect("shutdown waited on an idle connection");
        let _ = conn.await.unwrap();
        assert!(idle.ready().await.is_err());
        assert!(TcpStream::connect(plain).await.is_err());
        assert!(TcpStream::connect(tls).await.is_err());
    })
    .await
}

#[tokio::test]
async fn a_missing_key_stops_start_and_names_the_file() {
    within(async {
        let certs = Certs::valid();
        std::fs::remove_file(certs.key()).unwrap();
        let data = tempfile::tempdir().unwrap();
        let e = match berth::app::start(config(&certs, data.path())).await {
            Err(e) => e,
            Ok(_) => panic!("started without a key"),
        };
        assert!(matches!(e, StartError::Tls(_)), "{e:?}");
        assert!(e.to_string().contains("server.key"), "{e}");
    })
    .await
}

#[tokio::test]
async fn certs_bundle_serves_as_written() {
    within(async {
        // The files `berth certs` writes work as they are: server.crt holds the full chain.
        let dir = tempfile::tempdir().unwrap();
        let bundle = certs::generate(&["mirror.test".into(), "127.0.0.1".into()], 30).unwrap();
        let paths = certs::write_bundle(dir.path(), &bundle, false).unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut config = config(&Certs::valid(), data.path());
        config.tls = Some(TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: paths.server_cert.clone(),
            key: paths.server_key.clone(),
        });
        let running = berth::app::start(config).await.unwrap();
        let ca = std::fs::read_to_string(&paths.ca_cert).unwrap();
        let stream = connect(
            running.tls_addr.unwrap(),
            client_config(&ca, &[b"http/1.1"]),
            "127.0.0.1",
        )
        .await
        .unwrap();
        assert_eq!(
            stream.get_ref().1.peer_certificates().map(<[_]>::len),
            Some(2)
        );
        let mut sender = http1(stream).await;
        assert_registry_ok(get_v2_http1(&mut sender).await).await;
        running.shutdown().await;
    })
    .await
}

/// GETs `path` on an h2 connection and returns the status and the whole body.
async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, Bytes) {
    let req = Request::get(format!("https://mirror.test{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn h2_over_tls_delivers_large_and_small_responses_whole() {
    // berth holds back an h2 connection's small writes to send them together: whatever it
    // holds must still go out when the connection has nothing more to write.
    within(async {
        let certs = Certs::valid();
        let upstream = crate::support::Fake::start().await;
        let blob = crate::support::pseudo_random(7, 3 * 1024 * 1024 + 4321);
        let digest = upstream.add_blob(blob.clone());
        let tls = TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: certs.cert(),
            key: certs.key(),
        };
        let berth = crate::support::Berth::start(&upstream, |c| c.tls = Some(tls)).await;
        let addr = berth.running.as_ref().unwrap().tls_addr.unwrap();
        let stream = connect(
            addr,
            client_config(&certs.ca.cert_pem(), &[b"h2"]),
            "mirror.test",
        )
        .await
        .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let path = format!("/v2/library/x/blobs/{digest}");
        // Cold (streamed while it downloads), then from the cache.
        for _ in 0..2 {
            let (status, body) = h2_get(&mut sender, &path).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.len(), blob.len());
            assert!(body == blob, "the blob arrived changed");
            berth.settle().await;
        }
        // Small answers one after another on the same connection: each arrives by itself.
        for _ in 0..20 {
            let (status, body) = h2_get(&mut sender, "/v2/").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"{}");
        }
        let (status, body) = h2_get(&mut sender, "/v2/library/x/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(std::str::from_utf8(&body).unwrap().contains("BLOB_UNKNOWN"));
        berth.stop().await;
    })
    .await
}

/// Reads `body` until at least `want` bytes came, and returns how many did.
async fn read_some(body: &mut Incoming, want: usize) -> usize {
    let mut got = 0;
    while got < want {
        match body.frame().await {
            Some(Ok(frame)) => got += frame.data_ref().map_or(0, |d| d.len()),
            other => panic!("the body ended early: {:?}", other.map(|f| f.is_ok())),
        }
    }
    got
}

/// Reads the rest of `body`: the bytes that came, and whether it ended cleanly.
async fn read_rest(mut body: Incoming) -> (usize, bool) {
    let mut got = 0;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => got += frame.data_ref().map_or(0, |d| d.len()),
            Some(Err(_)) => return (got, false),
            None => return (got, true),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_file_cut_short_while_it_is_sent_fails_that_response_not_the_process() {
    // A page of a blob that cannot be read (a failing disk; here, a file cut short behind
    // berth's back) must cost one response, not the process: over TLS and h2 berth's own code
    // reads the bytes, where a mapped page that cannot be read would be SIGBUS.
    within(async {
        let certs = Certs::valid();
        let upstream = crate::support::Fake::start().await;
        let blob = crate::support::pseudo_random(8, 32 << 20);
        let digest = upstream.add_blob(blob.clone());
        let tls = TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: certs.cert(),
            key: certs.key(),
        };
        let berth = crate::support::Berth::start(&upstream, |c| c.tls = Some(tls)).await;
        let running = berth.running.as_ref().unwrap();
        let tls_addr = running.tls_addr.unwrap();
        let path = format!("/v2/library/x/blobs/{digest}");
        let hex = digest.trim_start_matches("sha256:");
        let file = berth
            .dir
            .path()
            .join("cache/blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        for how in ["plain http/1.1", "TLS http/1.1", "TLS h2"] {
            // Cached afresh for each round.
            let _ = std::fs::remove_file(&file);
            assert_eq!(berth.get(&path).await.bytes().len(), blob.len());
            berth.settle().await;
            assert!(file.exists(), "{how}: the blob is not where the test looks");
            let req = Request::get(format!("https://mirror.test{path}"))
                .header(http::header::HOST, "mirror.test")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = match how {
                "plain http/1.1" => {
                    let tcp = TcpStream::connect(berth.addr).await.unwrap();
                    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    s.send_request(req).await.unwrap()
                }
                "TLS http/1.1" => {
                    let config = client_config(&certs.ca.cert_pem(), &[b"http/1.1"]);
                    let stream = connect(tls_addr, config, "mirror.test").await.unwrap();
                    http1(stream).await.send_request(req).await.unwrap()
                }
                _ => {
                    let config = client_config(&certs.ca.cert_pem(), &[b"h2"]);
                    let stream = connect(tls_addr, config, "mirror.test").await.unwrap();
                    let (mut s, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await
                    .unwrap();
                    tokio::spawn(conn);
                    s.send_request(req).await.unwrap()
                }
            };
            assert_eq!(resp.status(), StatusCode::OK, "{how}");
            let mut body = resp.into_body();
            let first = read_some(&mut body, 1 << 20).await;
            // The client stops reading with most of the blob still to come, so berth holds
            // pieces of it that it has not sent yet; then the file loses its pages.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(0)
                .unwrap();
            let (rest, clean) = read_rest(body).await;
            assert!(
                !clean || first + rest < blob.len(),
                "{how}: a body whose file was cut short arrived complete"
            );
            // berth is still alive and serving.
            let r = berth.get("/v2/").await;
            assert_eq!(r.status, StatusCode::OK, "{how}");
        }
        berth.stop().await;
    })
    .await
}

/// Over TLS the token realm is the TLS listener's address with https, whatever Host says.
#[tokio::test]
async fn the_token_realm_over_tls_is_the_tls_listener() {
    within(async {
        let certs = Certs::valid();
        let data = tempfile::tempdir().unwrap();
        let htpasswd = data.path().join("htpasswd");
        berth::auth::add_user(&htpasswd, "alice", "secret", 4).unwrap();
        let mut config = config(&certs, data.path());
        config.htpasswd = Some(htpasswd);
        let running = berth::app::start(config).await.unwrap();
        let tls_addr = running.tls_addr.expect("TLS is configured");
        let stream = connect(
            tls_addr,
            client_config(&certs.ca.cert_pem(), &[b"http/1.1"]),
            "mirror.test",
        )
        .await
        .unwrap();
        let mut sender = http1(stream).await;
        // get_v2_http1 sends `Host: mirror.test`.
        let resp = get_v2_http1(&mut sender).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(
                format!("Bearer realm=\"https://{tls_addr}/auth/token\",service=\"berth\"")
                    .as_str()
            )
        );
        running.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn an_idle_h2_connection_over_tls_is_closed_after_the_idle_timeout() {
    within(async {
        let certs = Certs::valid();
        let data = tempfile::tempdir().unwrap();
        let mut config = config(&certs, data.path());
        config.limits.idle_timeout = Seconds(Duration::from_millis(400));
        let running = berth::app::start(config).await.unwrap();
        let stream = connect(
            running.tls_addr.unwrap(),
            client_config(&certs.ca.cert_pem(), &[b"h2"]),
            "mirror.test",
        )
        .await
        .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let (status, _) = h2_get(&mut sender, "/v2/").await;
        assert_eq!(status, StatusCode::OK);
        // The client keeps the connection: only the server's idle timeout can end it (and does,
        // well within the test's deadline).
        let _ = conn.await.unwrap();
        assert_eq!(
            running
                .app
                .ops
                .conns
                .count(berth::http::conn::Reason::IdleTimeout),
            1
        );
        running.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_closed() {
    within(async {
        let certs = Certs::valid();
        let data = tempfile::tempdir().unwrap();
        let mut config = config(&certs, data.path());
        config.limits.handshake_timeout = Seconds(Duration::from_millis(300));
        let running = berth::app::start(config).await.unwrap();
        // Connected, and silent: no ClientHello.
        let mut tcp = TcpStream::connect(running.tls_addr.unwrap()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf)
            .await
            .unwrap_or(0);
        assert_eq!(
            n, 0,
            "the server sent something to a client that said nothing"
        );
        assert_eq!(
            running
                .app
                .ops
                .conns
                .count(berth::http::conn::Reason::HandshakeTimeout),
            1
        );
        let app = running.app.clone();
        crate::support::wait_for("the connection's place given back", DEADLINE, || {
            app.ops.conns.open() == 0
        })
        .await;
        running.shutdown().await;
    })
    .await
}

/// The status page's cookies are `Secure` when the page came over TLS, and only then.
#[tokio::test]
async fn sign_in_cookies_are_secure_over_tls_only() {
    within(async {
        let certs = Certs::valid();
        let server = start(&certs).await;
        let stream = connect(
            server.tls_addr(),
            client_config(&certs.ca.cert_pem(), &[b"http/1.1"]),
            "mirror.test",
        )
        .await
        .unwrap();
        let mut sender = http1(stream).await;
        sender.ready().await.unwrap();
        let req = Request::get("/ui/login")
            .header(http::header::HOST, "mirror.test")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let cookie = |resp: &Response<Incoming>| {
            resp.headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let over_tls = cookie(&resp);
        assert!(over_tls.starts_with("berth_login="), "{over_tls}");
        assert!(over_tls.ends_with("; Secure"), "{over_tls}");
        let plain = crate::support::client::send_head(
            http::Method::GET,
            &format!("http://{}/ui/login", server.running.addr),
            &[],
        )
        .await;
        let plain = cookie(&plain);
        assert!(
            plain.starts_with("berth_login=") && !plain.contains("Secure"),
            "{plain}"
        );
        server.running.shutdown().await;
    })
    .await
}
