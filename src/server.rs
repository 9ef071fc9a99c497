//! The server: listeners, connections, and graceful shutdown.
//!
//! Each accepted connection is served by hyper-util's auto builder (HTTP/1.1, or h2 when the
//! client speaks it). On shutdown the listeners close first, then in-flight responses get the
//! configured grace period to finish.

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
use crate::handlers::App;
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
}

/// A started server. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub addr: SocketAddr,
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
    let grace = config.shutdown_grace.0;
    let app = Arc::new(App::new(config, mirror));
    let (stop, stopped) = watch::channel(false);
    let metrics_addr = match app.config.metrics_listen {
        Some(at) => Some(
            crate::metrics::listen(app.clone(), at, stopped.clone())
                .await
                .map_err(|e| StartError::Bind(at, e))?
                .0,
        ),
        None => None,
    };
    tracing::info!(%addr, "listening (plain HTTP)");
    let task = tokio::spawn(serve(listener, app.clone(), stopped, grace));
    Ok(Running {
        addr,
        metrics_addr,
        app,
        stop,
        task,
    })
}

async fn serve(
    listener: TcpListener,
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
                let service = service_fn(move |req| app.clone().handle(req, peer));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight responses");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "in-flight responses did not finish within the grace period"
        );
    }
}
