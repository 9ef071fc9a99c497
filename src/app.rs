//! Wiring: builds the parts (store, mirror, registry, handlers, the ops layer around them),
//! starts the listeners, and shuts them down.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::TokenKey;
use crate::config::Config;
use crate::config::StorageConfig;
use crate::http::server::{serve, Listeners};
use crate::http::tls::{CertResolver, Tls, TlsError};
use crate::http::App;
use crate::mirror::Mirror;
use crate::ops::Service;
use crate::store::disk::DiskStore;
use crate::store::s3::S3Store;
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
    /// The handlers with the ops layer around them.
    pub app: Arc<Service>,
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

/// Opens the configured content store and removes writes a crash interrupted.
pub fn open_store(config: &Config) -> Result<Store, StartError> {
    let failed = |e| StartError::Store(config.data_dir.display().to_string(), e);
    match &config.storage {
        StorageConfig::Disk => {
            let disk = DiskStore::open(&config.data_dir).map_err(failed)?;
            disk.remove_leftovers().map_err(failed)?;
            Ok(disk.shared())
        }
        StorageConfig::S3(s3) => {
            let store = S3Store::open(s3, &config.data_dir).map_err(failed)?;
            store.local().remove_leftovers().map_err(failed)?;
            Ok(Arc::new(store))
        }
    }
}

/// Opens the configured store for a tool running beside a server (`fsck`, `gc`): a data dir
/// must exist already, and nothing in progress is removed.
pub fn open_existing_store(config: &Config) -> Result<Store, StartError> {
    let failed = |e| StartError::Store(config.data_dir.display().to_string(), e);
    match &config.storage {
        StorageConfig::Disk => Ok(DiskStore::open_existing(&config.data_dir)
            .map_err(failed)?
            .shared()),
        StorageConfig::S3(s3) => Ok(Arc::new(
            S3Store::open(s3, &config.data_dir).map_err(failed)?,
        )),
    }
}

/// How often the replica that bounds a shared bucket reads what the others added and used.
const RESYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// Keeps the bound of a bucket that replicas share: other replicas add to it and use it, and
/// only this one evicts.
fn resync_shared_cache(disk: Arc<crate::mirror::cache::DiskCache>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RESYNC_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            let d = disk.clone();
            match tokio::task::spawn_blocking(move || d.resync()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the shared cache's bound could not be checked")
                }
                Err(e) => tracing::warn!(error = %e, "the shared cache's check died"),
            }
        }
    });
}

/// Opens the store, builds the mirror and starts listening.
pub async fn start(mut config: Config) -> Result<Running, StartError> {
    fd_budget(&mut config);
    // Opening may list a bucket and read its shared secret: off the async workers.
    let (config, mirror, token_key) = {
        tokio::task::spawn_blocking(move || {
            let store = open_store(&config)?;
            let token_key = match store.cluster_secret() {
                Ok(Some(secret)) => TokenKey::new(secret),
                Ok(None) => TokenKey::random(),
                Err(e) => {
                    return Err(StartError::Setup(format!(
                        "the store's shared secret (for tokens) cannot be read: {e}"
                    )))
                }
            };
            let mirror =
                Mirror::new(&config, store).map_err(|e| StartError::Setup(e.to_string()))?;
            Ok::<_, StartError>((config, mirror, token_key))
        })
        .await
        .map_err(|e| StartError::Setup(e.to_string()))??
    };
    if let StorageConfig::S3(s3) = &config.storage {
        if s3.evict {
            resync_shared_cache(mirror.disk.clone());
        }
    }
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
    let app = Arc::new(Service::new(App::new(config, mirror, token_key)));
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
    crate::ops::status::history::restore(&app).await;
    tokio::spawn(crate::ops::status::history::keep(
        app.clone(),
        stopped.clone(),
    ));
    crate::mirror::warm::spawn_schedule(
        app.mirror.clone(),
        app.config.warm.clone(),
        app.config.warm_interval.0,
        stopped.clone(),
    );
    tracing::info!(%addr, "listening (plain HTTP)");
    let listeners = Listeners {
        plain: listener,
        tls,
    };
    let served = serve(
        listeners,
        app.clone(),
        app.ops.conns.clone(),
        app.mirror.clone(),
        stopped,
        grace,
    );
    // The history is written once more when the last response is done.
    let task = tokio::spawn({
        let app = app.clone();
        async move {
            served.await;
            crate::ops::status::history::save(&app).await;
        }
    });
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
