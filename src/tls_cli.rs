//! The TLS side of the command line: `berth serve`'s TLS flags, `berth certs`, and the SIGHUP
//! certificate reload. Kept apart from `main.rs` so the binary only wires them in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::certs;
use crate::config::{Config, ConfigError, TlsConfig};
use crate::http::tls::CertResolver;

/// The TLS port used when a certificate is given without `--tls-listen`.
pub const DEFAULT_TLS_PORT: u16 = 5443;

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
            Some(listen) => listen.parse().map(Some).map_err(|e| ConfigError {
                key: "--tls-listen".into(),
                message: format!("{listen:?}: {e}"),
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
                certs::trust_instructions(&paths, &self.hosts, listen.port())
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

/// `berth certs`.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// DNS name or IP address clients use to reach berth (repeatable; IPs become IP SANs)
    #[arg(long = "host", value_name = "NAME", required = true)]
    pub hosts: Vec<String>,
    /// Directory for ca.crt, ca.key, server.crt and server.key
    #[arg(long, value_name = "DIR", default_value = "certs")]
    pub out: PathBuf,
    /// Replace existing files
    #[arg(long)]
    pub force: bool,
    /// Days the server certificate is valid (the CA lives at least ten years)
    #[arg(long, value_name = "N", default_value_t = certs::DEFAULT_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// TLS port clients will use, for the printed instructions
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_TLS_PORT)]
    pub port: u16,
}

impl CertsArgs {
    /// Generates and writes the files, then prints how to trust the CA.
    pub fn run(&self) -> ExitCode {
        let written = certs::generate(&self.hosts, self.days)
            .and_then(|bundle| certs::write_bundle(&self.out, &bundle, self.force));
        match written {
            Ok(paths) => {
                println!(
                    "{}",
                    certs::trust_instructions(&paths, &self.hosts, self.port)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::FAILURE
            }
        }
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
}
