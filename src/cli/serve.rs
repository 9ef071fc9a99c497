//! `berth serve`: its flags (the TLS ones with them), which override the config file, and the
//! signals it stops on (SIGTERM, SIGINT) or reloads its certificate on (SIGHUP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use berth::certs;
use berth::config::{Config, ConfigError, LogFormat, TlsConfig, UpstreamUrl};
use berth::http::tls::CertResolver;

use super::DEFAULT_TLS_PORT;

#[derive(Args)]
pub struct ServeArgs {
    /// TOML config file; flags given here override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Plain-HTTP listen address [default: 0.0.0.0:5000]
    #[arg(long)]
    listen: Option<String>,
    /// Where the cache and private repositories live [default: ./berth-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// URL of the default upstream (Docker Hub) [default: https://registry-1.docker.io]
    #[arg(long)]
    upstream: Option<String>,
    /// User for the default upstream (with --upstream-password-file)
    #[arg(long)]
    upstream_user: Option<String>,
    /// File holding the default upstream's password or access token
    #[arg(long)]
    upstream_password_file: Option<PathBuf>,
    /// Namespace stored locally and open to pushes (repeatable)
    #[arg(long)]
    private_ns: Vec<String>,
    /// htpasswd file (bcrypt entries) with the users who may push
    #[arg(long)]
    htpasswd: Option<PathBuf>,
    /// Log format
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl ServeArgs {
    /// Exits 2 on a bad flag or config file, 1 when berth cannot start, 0 after a signal
    /// stopped it.
    pub fn run(self) -> ExitCode {
        let mut config = match self.config() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("berth: {e}");
                return ExitCode::from(2);
            }
        };
        super::init_logs(config.log_format);
        if let Err(e) = self.tls.apply_self_signed(&mut config) {
            eprintln!("berth: {e}");
            return ExitCode::FAILURE;
        }
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("berth: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(serve(config))
    }

    fn config(&self) -> Result<Config, ConfigError> {
        let flag = |key: &str, message: String| ConfigError {
            key: format!("--{key}"),
            message,
        };
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(listen) = &self.listen {
            config.listen = listen_addr(listen).map_err(|e| flag("listen", e))?;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(url) = &self.upstream {
            config.default_upstream_config_mut().url =
                UpstreamUrl::parse(url).map_err(|e| flag("upstream", e))?;
        }
        if let Some(user) = &self.upstream_user {
            config.default_upstream_config_mut().user = Some(user.clone());
        }
        if let Some(file) = &self.upstream_password_file {
            config.default_upstream_config_mut().password_file = Some(file.clone());
        }
        if !self.private_ns.is_empty() {
            config.private_ns = self.private_ns.clone();
        }
        if let Some(h) = &self.htpasswd {
            config.htpasswd = Some(h.clone());
        }
        if let Some(f) = self.log_format {
            config.log_format = f;
        }
        self.tls.apply(&mut config)?;
        config.validate()?;
        Ok(config)
    }
}

async fn serve(config: Config) -> ExitCode {
    let running = match berth::app::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(reload_on_hangup(running.tls.clone()));
    let stop = running.stopper();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received");
        let _ = stop.send(true);
    });
    running.wait().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM, just not gracefully.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Reloads the TLS certificate on every SIGHUP (a failed reload logs and keeps the old one).
/// Without TLS, SIGHUP is still caught, since it would otherwise end the process, and ignored.
pub async fn reload_on_hangup(resolver: Option<Arc<CertResolver>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; certificates will not reload");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match &resolver {
            Some(resolver) => {
                tracing::info!("SIGHUP: reloading the TLS certificate");
                let _ = resolver.reload();
            }
            None => tracing::info!("SIGHUP: no TLS certificate to reload"),
        }
    }
}

/// A listen address: `IP:PORT`, or `HOST:PORT` with a host name that resolves (`localhost:5000`;
/// an IPv4 address is preferred when the name has both).
fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} is not HOST:PORT or IP:PORT ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

fn default_tls_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_TLS_PORT))
}

/// `berth serve`'s TLS flags (flattened into its arguments).
#[derive(Args, Debug, Default)]
pub struct TlsArgs {
    /// TLS listen address [default: 0.0.0.0:5443 when a certificate is given]
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<String>,
    /// PEM certificate chain, server certificate first (with --tls-key)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Unless a certificate is configured, serve TLS with <data_dir>/certs/server.crt, generating
    /// a local CA and a server certificate for the --host names there on first start
    #[arg(long, requires = "hosts")]
    pub self_signed: bool,
    /// DNS name or IP address for the self-signed certificate (repeatable)
    #[arg(long = "host", value_name = "NAME", requires = "self_signed")]
    pub hosts: Vec<String>,
}

impl TlsArgs {
    fn listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match &self.tls_listen {
            Some(listen) => listen_addr(listen)
                .map(Some)
                .map_err(|message| ConfigError {
                    key: "--tls-listen".into(),
                    message,
                }),
            None => Ok(None),
        }
    }

    /// Applies `--tls-cert`, `--tls-key` and `--tls-listen` to `config`. Writes no files:
    /// `--self-signed` is settled by [`TlsArgs::apply_self_signed`].
    pub fn apply(&self, config: &mut Config) -> Result<(), ConfigError> {
        let listen = self.listen()?;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let listen = listen
                .or(config.tls.as_ref().map(|t| t.listen))
                .unwrap_or_else(default_tls_listen);
            config.tls = Some(TlsConfig {
                listen,
                cert: cert.clone(),
                key: key.clone(),
            });
        } else if let Some(listen) = listen {
            match &mut config.tls {
                Some(tls) => tls.listen = listen,
                None if self.self_signed => {}
                None => {
                    return Err(ConfigError {
                        key: "--tls-listen".into(),
                        message: "needs a certificate: --tls-cert and --tls-key, a [tls] table \
                                  in the config file, or --self-signed"
                            .into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// `--self-signed` when no certificate is configured: use `<data_dir>/certs/server.crt`,
    /// generating a CA and server certificate there first if there is none (and printing how
    /// to trust it).
    pub fn apply_self_signed(&self, config: &mut Config) -> Result<(), String> {
        if !self.self_signed {
            return Ok(());
        }
        if let Some(tls) = &config.tls {
            tracing::info!(cert = %tls.cert.display(), "a certificate is configured; --self-signed has no effect");
            return Ok(());
        }
        let listen = self
            .listen()
            .map_err(|e| e.to_string())?
            .unwrap_or_else(default_tls_listen);
        let dir = config.data_dir.join("certs");
        let (paths, generated) = certs::ensure_self_signed(&dir, &self.hosts, certs::DEFAULT_DAYS)
            .map_err(|e| e.to_string())?;
        if generated {
            tracing::info!(dir = %dir.display(), "generated a local CA and server certificate");
            eprintln!(
                "{}",
                certs::trust_instructions(&paths, &self.hosts, listen.port(), true)
            );
        } else {
            tracing::info!(
                cert = %paths.server_cert.display(),
                "using the existing self-signed certificate (to change its names, run `berth certs --force --out` on that directory)"
            );
        }
        config.tls = Some(TlsConfig {
            listen,
            cert: paths.server_cert,
            key: paths.server_key,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut TlsArgs)) -> TlsArgs {
        let mut a = TlsArgs::default();
        f(&mut a);
        a
    }

    #[test]
    fn cert_flags_enable_tls_on_the_default_port() {
        let mut config = Config::default();
        args(|a| {
            a.tls_cert = Some("c.pem".into());
            a.tls_key = Some("k.pem".into());
        })
        .apply(&mut config)
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.listen, default_tls_listen());
        assert_eq!(tls.cert, PathBuf::from("c.pem"));
    }

    #[test]
    fn tls_listen_needs_a_certificate() {
        let mut config = Config::default();
        let e = args(|a| a.tls_listen = Some("127.0.0.1:8443".into()))
            .apply(&mut config)
            .unwrap_err();
        assert!(e.to_string().contains("--tls-listen"), "{e}");
        let e = args(|a| a.tls_listen = Some("nonsense".into()))
            .apply(&mut config)
            .unwrap_err();
        assert!(e.to_string().contains("nonsense"), "{e}");
    }

    #[test]
    fn self_signed_generates_into_the_data_dir_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let a = args(|a| {
            a.self_signed = true;
            a.hosts = vec!["mirror.test".into()];
            a.tls_listen = Some("127.0.0.1:0".into());
        });
        a.apply(&mut config).unwrap();
        a.apply_self_signed(&mut config).unwrap();
        let tls = config.tls.clone().unwrap();
        assert_eq!(tls.cert, dir.path().join("certs/server.crt"));
        assert_eq!(tls.listen, "127.0.0.1:0".parse().unwrap());
        let first = std::fs::read(&tls.cert).unwrap();
        config.tls = None;
        a.apply_self_signed(&mut config).unwrap();
        assert_eq!(std::fs::read(&tls.cert).unwrap(), first);
    }

    #[test]
    fn listen_addresses_may_name_a_host() {
        assert_eq!(
            super::listen_addr("0.0.0.0:5000").unwrap(),
            "0.0.0.0:5000".parse().unwrap()
        );
        let local = super::listen_addr("localhost:5000").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 5000, "{local}");
        for bad in ["5000", "localhost", "no-such-host.invalid:5000"] {
            assert!(super::listen_addr(bad).is_err(), "{bad}");
        }
    }
}
