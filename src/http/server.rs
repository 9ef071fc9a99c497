//! The server: listeners, connections, and graceful shutdown.
//!
//! Each accepted connection is admitted under the connection caps (see [`crate::http::conn`]), then
//! served by hyper-util's auto builder (HTTP/1.1, or h2 when the client speaks it) under the
//! header, idle and send timeouts. With `tls` configured a second listener terminates TLS (see
//! [`crate::http::tls`]) and serves the same way. On shutdown the listeners close first, then
//! in-flight responses on both get the configured grace period to finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::conn::{Activity, ConnGuard, Conns, Ended, Io, Watched};
use crate::http::tls::Tls;
use crate::http::{Body, LocalAddr, OverTls};
use crate::mirror::Mirror;

/// What answers each request: the ops layer around the handlers (`ops::Service`). Never
/// fails: errors are responses too.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> BoxFuture<'static, Response<Body>>;
}

/// The listeners a server accepts on.
pub struct Listeners {
    pub plain: TcpListener,
    pub tls: Option<(TcpListener, Tls)>,
}

/// The HTTP settings of every client connection.
fn builder(conns: &crate::http::conn::Conns) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // What one h2 connection may hold for a client that does not read: each stream keeps the
    // cache piece it is sending (handed to hyper in slices of ops::SLICE) and a send buffer of
    // 64 KiB, there are at most `h2_max_concurrent_streams` of them, and a stream that takes
    // nothing for `send_timeout` ends the connection (conn::drive). The receive windows bound
    // what an uploading client can make berth buffer.
    builder
        .http2()
        .max_concurrent_streams(conns.h2_max_streams)
        .max_send_buf_size(64 << 10)
        .initial_stream_window_size(256 << 10)
        .initial_connection_window_size(1 << 20);
    builder
}

/// Where a connection came from and arrived at: what its requests carry as extensions.
pub(crate) struct Arrival {
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub over_tls: bool,
}

/// Serves HTTP on an admitted connection until it ends, times out, or the server stops.
pub(crate) async fn serve_http<I>(
    io: I,
    arrival: Arrival,
    act: Arc<Activity>,
    handler: Arc<dyn Handler>,
    builder: auto::Builder<TokioExecutor>,
    stopped: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Arrival {
        peer,
        local,
        over_tls,
    } = arrival;
    let requests = act.clone();
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        if over_tls {
            req.extensions_mut().insert(OverTls);
        }
        if let Some(local) = local {
            req.extensions_mut().insert(LocalAddr(local));
        }
        let guard = requests.begin();
        let handled = handler.clone().handle(req, peer);
        async move {
            let resp = handled.await;
            Ok::<_, Infallible>(resp.map(|body| Watched::new(body, guard)))
        }
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(Io::new(io, act.clone())), service)
        .into_owned();
    if let Ended::Done(Err(e)) =
        crate::http::conn::drive(conn, |c| c.graceful_shutdown(), &act, stopped).await
    {
        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
    }
}

async fn serve_plain(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
    handler: Arc<dyn Handler>,
    builder: auto::Builder<TokioExecutor>,
    stopped: watch::Receiver<bool>,
) {
    let act = Activity::new(&guard);
    let arrival = Arrival {
        peer,
        local: stream.local_addr().ok(),
        over_tls: false,
    };
    serve_http(stream, arrival, act, handler, builder, stopped).await;
    drop(guard);
}

/// Accepts on the TLS listener, or never when there is none.
async fn accept_tls(
    tls: &Option<(TcpListener, Tls)>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tls {
        Some((listener, _)) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Accepts on the listeners (connections admitted under `conns`) until `stopped` changes; then
/// lets in-flight responses and the mirror's downloads finish within `grace`.
pub async fn serve(
    listeners: Listeners,
    handler: Arc<dyn Handler>,
    conns: Arc<Conns>,
    mirror: Arc<Mirror>,
    mut stopped: watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let Listeners {
        plain: listener,
        tls,
    } = listeners;
    let builder = builder(&conns);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Over a cap the connection is closed at once, before anything is read.
                let Some(guard) = conns.admit(peer.ip()) else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_plain(stream, peer, guard, handler.clone(), builder.clone(), stopped.clone()));
            }
            accepted = accept_tls(&tls) => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed (TLS)");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some((_, tls)) = &tls else { continue };
                let Some(guard) = conns.admit(peer.ip()) else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(crate::http::tls::serve_connection(
                    tls.acceptor.clone(),
                    stream,
                    peer,
                    guard,
                    handler.clone(),
                    builder.clone(),
                    stopped.clone(),
                ));
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    drop(tls);
    tracing::info!("shutting down: waiting for in-flight responses and downloads");
    let drained = async {
        conns.wait_closed().await;
        // A download whose clients are served may still be making its blob durable.
        mirror.fetches.wait_idle().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "in-flight responses or downloads did not finish within the grace period"
        );
    }
}
