//! The server: listeners, connections, and graceful shutdown.
//!
//! Each accepted connection is served by hyper-util's auto builder (HTTP/1.1, or h2 when the
//! client speaks it). With `tls` configured a second listener terminates TLS (see [`crate::http::tls`])
//! and serves the same way. On shutdown the listeners close first, then in-flight responses on
//! both get the configured grace period to finish.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::http::App;
use crate::mirror::Mirror;
use crate::store::Store;
use crate::http::tls::{CertResolver, Tls, TlsError};

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
pub async fn start(config: Config) -> Result<Running, StartError> {
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
    tokio::spawn(crate::registry::expire_uploads(app.clone(), stopped.clone()));
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
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
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
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let local = stream.local_addr().ok().map(crate::http::LocalAddr);
                let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(local) = local {
                        req.extensions_mut().insert(local);
                    }
                    app.clone().handle(req, peer)
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
                    }
                });
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
                let _ = stream.set_nodelay(true);
                tokio::spawn(crate::http::tls::serve_connection(
                    tls.acceptor.clone(),
                    stream,
                    peer,
                    app.clone(),
                    builder.clone(),
                    graceful.watcher(),
                ));
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    drop(tls);
    tracing::info!("shutting down: waiting for in-flight responses and downloads");
    let drained = async {
        graceful.shutdown().await;
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
