//! What the commands that talk to a running berth share (`berth cache rm`, `berth warm`): its
//! default address, the password, Basic credentials and an HTTP(S) client trusting an extra CA.

use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use berth::config::Config;

pub type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// `http://` and the config's listen address (the loopback one when it listens on all).
pub fn default_url(config: &Config) -> String {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

/// The password of `--user`: `BERTH_PASSWORD`, else the first line of stdin (never a flag, which
/// `ps` would show).
pub fn password() -> std::io::Result<String> {
    if let Ok(p) = std::env::var("BERTH_PASSWORD") {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        eprint!("Password: ");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// An `Authorization` value for Basic credentials.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A client for http:// and https:// URLs, trusting the webpki roots and `ca_file` (PEM).
pub fn http_client(ca_file: Option<&Path>) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(ca) = ca_file {
        let fail = |m: String| format!("--ca-file {}: {m}", ca.display());
        let pem = std::fs::read(ca).map_err(|e| fail(e.to_string()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| fail(e.to_string()))?;
            roots.add(cert).map_err(|e| fail(e.to_string()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_is_the_listen_address_on_loopback() {
        let mut c = Config::default();
        assert_eq!(default_url(&c), "http://127.0.0.1:5000");
        c.listen = "[::]:5001".parse().unwrap();
        assert_eq!(default_url(&c), "http://[::1]:5001");
        c.listen = "10.0.0.7:5000".parse().unwrap();
        assert_eq!(default_url(&c), "http://10.0.0.7:5000");
    }
}
