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

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::http::conn::{Activity, ConnGuard, Ended, Io, Watched};
use crate::http::tls::{CertResolver, Tls, TlsError};
use crate::http::{App, LocalAddr, OverTls};
use crate::mirror::Mirror;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {0}: {1}")]
    Store(String, std::io::Error),
    #[error("{0}")]
    Setup(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// A started server. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub addr: SocketAddr,
    /// The TLS listener's address, when `tls` is configured.
    pub tls_addr: Option<SocketAddr>,
    /// The TLS certificate; `reload()` it on SIGHUP. `None` without TLS.
    pub tls: Option<Arc<CertResolver>>,
    /// The `/metrics` listener's address, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight responses finish (within the grace period), and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops by itself (it does not, except through `shutdown`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Opens the store, builds the mirror and starts listening.
pub async fn start(mut config: Config) -> Result<Running, StartError> {
    fd_budget(&mut config);
    let store = Store::open(&config.data_dir)
        .map_err(|e| StartError::Store(config.data_dir.display().to_string(), e))?;
    store
        .remove_leftovers()
        .map_err(|e| StartError::Store(config.data_dir.display().to_string(), e))?;
    let mirror = Mirror::new(&config, store).map_err(|e| StartError::Setup(e.to_string()))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let tls = match &config.tls {
        Some(tls_config) => {
            let tls = Tls::new(tls_config)?;
            let listener = TcpListener::bind(tls_config.listen)
                .await
                .map_err(|e| StartError::Bind(tls_config.listen, e))?;
            let tls_addr = listener
                .local_addr()
                .map_err(|e| StartError::Bind(tls_config.listen, e))?;
            tracing::info!(addr = %tls_addr, cert = %tls_config.cert.display(), "listening (TLS)");
            Some((listener, tls_addr, tls))
        }
        None => None,
    };
    let tls_addr = tls.as_ref().map(|(_, a, _)| *a);
    let resolver = tls.as_ref().map(|(_, _, t)| t.resolver.clone());
    let tls = tls.map(|(l, _, t)| (l, t));
    let grace = config.shutdown_grace.0;
    let app = Arc::new(App::new(config, mirror));
    let (stop, stopped) = watch::channel(false);
    let metrics_addr = match app.config.metrics_listen {
        Some(at) => Some(
            crate::ops::metrics::listen(app.clone(), at, stopped.clone())
                .await
                .map_err(|e| StartError::Bind(at, e))?
                .0,
        ),
        None => None,
    };
    tokio::spawn(crate::registry::expire_uploads(
        app.private.clone(),
        stopped.clone(),
    ));
    tracing::info!(%addr, "listening (plain HTTP)");
    let task = tokio::spawn(serve(listener, tls, app.clone(), stopped, grace));
    Ok(Running {
        addr,
        tls_addr,
        tls: resolver,
        metrics_addr,
        app,
        stop,
        task,
    })
}

/// Raises the open-file limit and derives the default connection cap from it, so that clients
/// can never take the descriptors the cache and the upstream connections need.
fn fd_budget(config: &mut Config) {
    match crate::http::conn::raise_fd_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(
                before,
                after,
                "raised the open-file limit to the hard limit"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let limits = &mut config.limits;
    let fd_limit = crate::http::conn::fd_limit();
    let budget = crate::http::conn::connection_budget(fd_limit, limits.fd_reserve);
    match limits.max_connections {
        None => limits.max_connections = Some(budget),
        Some(max) if max > budget => tracing::warn!(
            max_connections = max,
            fd_limit,
            budget,
            "limits.max_connections is more than the open-file limit leaves for clients: \
             raise the limit (LimitNOFILE=) or lower limits.max_connections"
        ),
        Some(_) => {}
    }
    tracing::info!(
        fd_limit,
        max_connections = limits.max_connections.unwrap_or(budget),
        max_connections_per_client = limits.max_connections_per_client,
        "connection limits"
    );
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
    app: Arc<App>,
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
        let handled = app.clone().handle(req, peer);
        async move {
            let resp = handled.await?;
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
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    stopped: watch::Receiver<bool>,
) {
    let act = Activity::new(&guard);
    let arrival = Arrival {
        peer,
        local: stream.local_addr().ok(),
        over_tls: false,
    };
    serve_http(stream, arrival, act, app, builder, stopped).await;
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

async fn serve(
    listener: TcpListener,
    tls: Option<(TcpListener, Tls)>,
    app: Arc<App>,
    mut stopped: watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let conns = app.ops.conns.clone();
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
                tokio::spawn(serve_plain(stream, peer, guard, app.clone(), builder.clone(), stopped.clone()));
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
                    app.clone(),
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
        app.mirror.fetches.wait_idle().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "in-flight responses or downloads did not finish within the grace period"
        );
    }
}
