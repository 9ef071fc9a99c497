//! What a client may hold: connection caps, header, idle and send timeouts, stalled h2 streams,
//! and the file-descriptor budget. berth runs in-process on 127.0.0.1 (every client has the same
//! address, so tests that are not about the per-client cap raise it), except for the
//! file-descriptor test, which needs a process of its own with a low limit.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use berth::config::{Config, Seconds};
use berth::ops::metrics::sample;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait for something the server must do ends in a failure after this.
const DEADLINE: Duration = Duration::from_secs(15);

fn ms(n: u64) -> Seconds {
    Seconds(Duration::from_millis(n))
}

/// Long timeouts and high caps, for tests to lower the one they are about.
fn relaxed(c: &mut Config) {
    c.limits.header_read_timeout = Seconds(Duration::from_secs(60));
    c.limits.idle_timeout = Seconds(Duration::from_secs(60));
    c.limits.send_timeout = Seconds(Duration::from_secs(60));
    c.limits.max_connections = Some(10_000);
    c.limits.max_connections_per_client = 10_000;
}

async fn metrics(b: &Berth) -> String {
    let r = b.get("/metrics").await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.bytes().to_vec()).unwrap()
}

/// Scrapes until `name{labels}` satisfies `ok`; returns the last exposition.
async fn wait_metric(b: &Berth, name: &str, labels: &[(&str, &str)], ok: impl Fn(f64) -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = metrics(b).await;
        if ok(sample(&text, name, labels)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{name}{labels:?} never got there:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the server closes the connection; fails if it is still open at the deadline.
async fn closed_by_server(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, read_to_end)
        .await
        .expect("the server kept the connection open");
}

/// Whether the server has closed the connection by now (a read does not block).
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_or_missing_header_is_closed_after_the_header_timeout() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| {
        relaxed(c);
        c.limits.header_read_timeout = ms(300);
    })
    .await;
    // Sends nothing at all.
    let mut silent = connect(b.addr).await;
    // Starts a request and trickles a header byte every 50 ms: each byte is progress, but the
    // header as a whole is late.
    let mut slow = connect(b.addr).await;
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = async {
        for b in b"X-Slow: abcdefghijklmnopqrstuvwxyz0123456789"
            .iter()
            .cycle()
        {
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(DEADLINE, trickle)
        .await
        .expect("the trickling connection stayed open");
    closed_by_server(&mut silent).await;
    wait_metric(
        &b,
        "berth_connections_closed_total",
        &[("reason", "header_read_timeout")],
        |v| v == 2.0,
    )
    .await;
    // A prompt client on the same server is unaffected.
    assert_eq!(b.get("/v2/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| {
        relaxed(c);
        c.limits.idle_timeout = ms(400);
    })
    .await;
    let mut s = connect(b.addr).await;
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    // The response was whole (keep-alive); now the connection sits idle.
    closed_by_server(&mut s).await;
    wait_metric(
        &b,
        "berth_connections_closed_total",
        &[("reason", "idle_timeout")],
        |v| v == 1.0,
    )
    .await;
}

/// An h2c (prior knowledge) client connection with small windows, so that a response it does
/// not read stalls quickly.
async fn h2c(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = connect(addr).await;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

fn get(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_after_the_idle_timeout() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| {
        relaxed(c);
        c.limits.idle_timeout = ms(400);
    })
    .await;
    let (mut sender, conn) = h2c(b.addr).await;
    let resp = sender.send_request(get(b.addr, "/v2/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    // The client keeps its side open: only the server can end the connection.
    tokio::time::timeout(DEADLINE, conn)
        .await
        .expect("the idle h2 connection stayed open")
        .unwrap()
        .ok();
    wait_metric(
        &b,
        "berth_connections_closed_total",
        &[("reason", "idle_timeout")],
        |v| v == 1.0,
    )
    .await;
    wait_metric(&b, "berth_connections_open", &[], |v| v == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_closes_new_connections_at_once_and_counts_them() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| {
        relaxed(c);
        c.limits.max_connections = Some(5);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect(b.addr).await);
    }
    let app = b.running.as_ref().unwrap().app.clone();
    wait_for("5 connections admitted", DEADLINE, || {
        app.ops.conns.open() == 5
    })
    .await;
    let mut over = connect(b.addr).await;
    closed_by_server(&mut over).await;
    for s in &mut held {
        assert!(!is_closed(s).await, "an admitted connection was closed");
    }
    assert_eq!(
        app.ops
            .conns
            .count(berth::http::conn::Reason::MaxConnections),
        1
    );
    // A place given back is a place for the next client.
    held.pop();
    wait_for("a place freed", DEADLINE, || app.ops.conns.open() == 4).await;
    let text = metrics(&b).await;
    assert_eq!(
        sample(
            &text,
            "berth_connections_refused_total",
            &[("reason", "max_connections")]
        ),
        1.0
    );
    assert_eq!(sample(&text, "berth_connections_max", &[]), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_refuses_with_one_warning_per_burst() {
    let logs = captured_logs();
    let up = Fake::start().await;
    // A cap no other test uses, to find this test's log lines.
    const CAP: usize = 3;
    let b = Berth::start(&up, |c| {
        relaxed(c);
        c.limits.max_connections_per_client = CAP;
    })
    .await;
    let app = b.running.as_ref().unwrap().app.clone();
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(connect(b.addr).await);
    }
    wait_for("the cap's connections admitted", DEADLINE, || {
        app.ops.conns.open() == CAP
    })
    .await;
    const OVER: u64 = 20;
    for _ in 0..OVER {
        let mut s = connect(b.addr).await;
        closed_by_server(&mut s).await;
    }
    let per_client = berth::http::conn::Reason::MaxConnectionsPerClient;
    assert_eq!(app.ops.conns.count(per_client), OVER);
    assert_eq!(
        app.ops
            .conns
            .count(berth::http::conn::Reason::MaxConnections),
        0
    );
    // Every refusal is in a warning line, either as the line or in its `suppressed` count, and
    // the burst did not write a line each.
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "max_connections_per_client" && v["limit"] == CAP)
        .collect();
    assert!(
        !lines.is_empty() && (lines.len() as u64) < OVER,
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l["level"] == "WARN"), "{lines:?}");
    let accounted: u64 = lines
        .iter()
        .map(|l| 1 + l["suppressed"].as_u64().unwrap_or(0))
        .sum();
    // The last refusals may still be in the suppressed count of a line not yet written.
    assert!(accounted <= OVER, "{lines:?}");
    // Dropping one of the client's connections lets it connect again.
    held.pop();
    wait_for("a place freed", DEADLINE, || {
        app.ops.conns.open() == CAP - 1
    })
    .await;
    assert_eq!(b.get("/v2/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_served_while_2000_slow_connections_are_open_and_they_all_time_out() {
    let up = Fake::start().await;
    let b = Berth::start(&up, |c| {
        relaxed(c);
        c.limits.header_read_timeout = Seconds(Duration::from_secs(4));
    })
    .await;
    let app = b.running.as_ref().unwrap().app.clone();
    const SLOW: usize = 2000;
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut s = connect(b.addr).await;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    wait_for("the slow connections admitted", DEADLINE, || {
        app.ops.conns.open() >= SLOW
    })
    .await;
    let r = b.get("/v2/").await;
    assert_eq!(r.status, 200);
    // They were all still open while the client was served...
    assert!(
        app.ops
            .conns
            .count(berth::http::conn::Reason::HeaderTimeout)
            == 0,
        "slow connections timed out before the client was served: the test machine is too slow \
         for a 4 s header timeout"
    );
    // ...and none outlives the header timeout.
    for s in &mut slow {
        closed_by_server(s).await;
    }
    wait_for("every slow connection closed", DEADLINE, || {
        app.ops.conns.open() == 0
    })
    .await;
    assert_eq!(
        app.ops
            .conns
            .count(berth::http::conn::Reason::HeaderTimeout),
        SLOW as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_the_client_does_not_read_is_aborted_after_the_send_timeout() {
    // Cached first, so the stalled response is a cache hit served from the disk.
    let (_up, b, path, _blob) = cached_big_blob(77, 8 << 20).await;
    let before = metrics(&b).await;
    let hit_bytes = |t: &str| sample(t, "berth_served_bytes_total", &[("outcome", "hit")]);

    let (mut sender, conn) = h2c(b.addr).await;
    let resp = sender.send_request(get(b.addr, &path)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The body is never read: the client's windows (64 KiB) stay closed after the first bytes.
    let _unread = resp;
    tokio::time::timeout(DEADLINE, conn)
        .await
        .expect("the stalled h2 connection stayed open")
        .unwrap()
        .ok();
    let app = b.running.as_ref().unwrap().app.clone();
    wait_for("the stalled response dropped", DEADLINE, || {
        app.ops.conns.responses_in_flight() == 0
    })
    .await;
    wait_metric(
        &b,
        "berth_connections_closed_total",
        &[("reason", "send_timeout")],
        |v| v == 1.0,
    )
    .await;
    // Counted: what the client's window let through (64 KiB), give or take the slice it came in
    // (256 KiB), not the megabyte pieces the cache is read in.
    let after = metrics(&b).await;
    let counted = hit_bytes(&after) - hit_bytes(&before);
    assert!(
        counted <= (512 << 10) as f64,
        "{counted} bytes counted as sent for a stream that took 64 KiB"
    );
}

/// A child process, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn http1_get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, Bytes) {
    sender.ready().await.unwrap();
    let req = Request::get(path)
        .header("host", "berth")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_low_fd_limit_idle_clients_cannot_take_what_the_cache_and_upstream_need() {
    use std::os::unix::process::CommandExt;

    let up = Fake::start().await;
    let blob = pseudo_random(14, 1 << 20);
    let digest = up.add_blob(blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let log_path = dir.path().join("berth.log");
    // Idle connections stay for the whole test: only the caps stand between them and the
    // descriptors.
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, "[limits]\nheader_read_timeout = \"5m\"\n").unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args([
        "serve",
        "--listen",
        &addr.to_string(),
        "--upstream",
        &up.url(),
    ])
    .arg("--config")
    .arg(&config)
    .arg("--data-dir")
    .arg(dir.path().join("data"))
    .env("BERTH_LOG", "info")
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(&log_path).unwrap());
    // SAFETY: the closure runs in the forked child before exec and calls only setrlimit, which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            // As a service manager might start berth: a low soft limit under a higher hard one.
            let lim = libc::rlimit {
                rlim_cur: 300,
                rlim_max: 400,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _child = Child(cmd.spawn().unwrap());

    // The one legitimate client, connected while there is room.
    let end = tokio::time::Instant::now() + DEADLINE;
    let stream = loop {
        match TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < end,
                    "berth did not start: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(http1_get(&mut client, "/v2/").await.0, StatusCode::OK);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("raised the open-file limit") && log.contains("after=400"),
        "{log}"
    );

    // More idle connections than the process has descriptors.
    let mut idle = Vec::new();
    for _ in 0..450 {
        idle.push(connect(addr).await);
    }
    let metric = |text: &str, name: &str, labels: &[(&str, &str)]| sample(text, name, labels);
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = http1_get(&mut client, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let max = metric(&text, "berth_connections_max", &[]);
        let open = metric(&text, "berth_connections_open", &[]);
        let refused = metric(
            &text,
            "berth_connections_refused_total",
            &[("reason", "max_connections")],
        );
        // Derived from the raised limit: (400 - a reserve of 100) / 2.
        assert_eq!(max, 150.0, "{text}");
        if open == max && refused >= (450.0 + 1.0 - max) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the idle connections were not all admitted or refused:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With every client place taken, a cache miss still opens an upstream connection and a
    // cache file.
    let path = format!("/v2/library/x/blobs/{digest}");
    let cold = http1_get(&mut client, &path);
    let (status, body) = tokio::time::timeout(DEADLINE, cold)
        .await
        .expect("the cache miss did not finish");
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(body == blob, "the blob arrived changed");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_response_the_client_does_not_read_is_aborted_after_the_send_timeout() {
    // Larger than what the loopback socket buffers on both sides can hold.
    let (_up, b, path, blob) = cached_big_blob(78, 48 << 20).await;
    let mut s = connect(b.addr).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let app = b.running.as_ref().unwrap().app.clone();
    // Nothing is read until the server has given up on the response.
    wait_for("the unread response aborted", DEADLINE, || {
        app.ops.conns.count(berth::http::conn::Reason::SendTimeout) == 1
    })
    .await;
    wait_for("its connection closed", DEADLINE, || {
        app.ops.conns.open() == 0 && app.ops.conns.responses_in_flight() == 0
    })
    .await;
    // What the client can still read is what the sockets held: never the whole blob.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await;
    assert!(got.len() < blob.len(), "the whole response arrived");
}

/// A berth with a 500 ms send timeout and a blob of `len` bytes in its cache; the upstream
/// must live as long as the berth.
async fn cached_big_blob(seed: u64, len: usize) -> (Fake, Berth, String, bytes::Bytes) {
    let up = Fake::start().await;
    let blob = pseudo_random(seed, len);
    let digest = up.add_blob(blob.clone());
    let b = Berth::start(&up, |c| {
        relaxed(c);
        c.limits.send_timeout = ms(500);
        c.max_cache_size = berth::config::ByteSize(1 << 30);
    })
    .await;
    let path = format!("/v2/library/big/blobs/{digest}");
    assert_eq!(b.get(&path).await.bytes(), blob);
    b.settle().await;
    (up, b, path, blob)
}
