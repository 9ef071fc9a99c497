//! TLS termination: the rustls server configuration, the reloadable certificate, the
//! per-connection handshake, and the write coalescing that h2 over TLS needs.
//!
//! The certificate lives in a [`CertResolver`] that rustls asks for it on every handshake.
//! [`CertResolver::reload`] (called on SIGHUP) reads the files again and swaps the new
//! certificate in; connections that are already open keep the one they were set up with, and a
//! reload that fails keeps serving the old certificate.

use std::fmt;
use std::io::{self, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::http::conn::{Activity, ConnGuard, Reason};
use crate::http::server::{serve_http, Arrival, Handler};

/// ALPN protocols offered, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate file {}: {message}", path.display())]
    Cert { path: PathBuf, message: String },
    #[error("TLS key file {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("TLS key file {} does not belong to certificate {}: {message}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first) and private key and checks that they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_chain(cert)?;
    let key_der = read_key(key)?;
    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Key {
            path: key.to_owned(),
            message: format!("unusable private key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
                message: "the key does not match the first certificate's public key".into(),
            })
        }
        Err(e) => Err(TlsError::Cert {
            path: cert.to_owned(),
            message: format!("the first certificate cannot be parsed: {e}"),
        }),
    }
}

fn open(path: &Path) -> io::Result<BufReader<std::fs::File>> {
    std::fs::File::open(path).map(BufReader::new)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: path.to_owned(),
        message,
    };
    let mut reader = open(path).map_err(|e| cert_err(format!("cannot read: {e}")))?;
    let chain = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err(
            "holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")".into(),
        ));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key_err = |message: String| TlsError::Key {
        path: path.to_owned(),
        message,
    };
    let mut reader = open(path).map_err(|e| key_err(format!("cannot read: {e}")))?;
    rustls_pemfile::private_key(&mut reader)
        .map_err(|e| key_err(format!("not valid PEM: {e}")))?
        .ok_or_else(|| key_err("holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into()))
}

/// The certificate served on every handshake, swapped by [`CertResolver::reload`].
pub struct CertResolver {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CertResolver {
    /// Loads the certificate and key; both files are read again on every reload.
    pub fn load(cert: &Path, key: &Path) -> Result<CertResolver, TlsError> {
        let certified = load_certified_key(cert, key)?;
        Ok(CertResolver {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(certified)),
        })
    }

    /// Reads the files again and serves the new certificate to new connections. On error the
    /// old certificate stays in place and the error is logged (and returned).
    pub fn reload(&self) -> Result<(), TlsError> {
        match load_certified_key(&self.cert, &self.key) {
            Ok(certified) => {
                let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
                *current = Arc::new(certified);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate reload failed; still serving the previous certificate");
                Err(e)
            }
        }
    }

    /// The certificate chain new connections get, leaf first.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The rustls configuration: TLS 1.2 and 1.3, ALPN h2 and http/1.1, certificate from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Everything a TLS listener needs besides its socket.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub resolver: Arc<CertResolver>,
}

impl Tls {
    pub fn new(config: &TlsConfig) -> Result<Tls, TlsError> {
        let resolver = Arc::new(CertResolver::load(&config.cert, &config.key)?);
        let server = server_config(resolver.clone())?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
        })
    }
}

/// Runs the handshake (bounded by `limits.handshake_timeout`) and then serves HTTP on the
/// connection: h2 when ALPN chose it, otherwise whatever the client speaks.
pub async fn serve_connection(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
    handler: Arc<dyn Handler>,
    builder: auto::Builder<TokioExecutor>,
    mut stopped: watch::Receiver<bool>,
) {
    let conns = guard.conns().clone();
    let timeout = conns.timeouts.handshake;
    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::info!(client = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                conns.closed(Reason::HandshakeTimeout, peer.ip());
                return;
            }
        },
        // A shutdown does not wait for handshakes: there is no request yet.
        _ = stopped.wait_for(|s| *s) => return,
    };
    let act = Activity::new(&guard);
    let arrival = Arrival {
        peer,
        local: stream.get_ref().0.local_addr().ok(),
        over_tls: true,
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        act.set_h2();
        let builder = builder.http2_only();
        let io = Coalesce::new(stream);
        serve_http(io, arrival, act, handler, builder, stopped).await;
    } else {
        serve_http(stream, arrival, act, handler, builder, stopped).await;
    }
    drop(guard);
}

/// Plaintext collected before it goes to the TLS stream, for HTTP/2 connections.
const COALESCE: usize = 64 << 10;

/// Collects the writes of an HTTP/2 connection into pieces of up to [`COALESCE`] bytes before
/// they are encrypted.
///
/// The h2 crate flushes after every DATA frame (16 KiB by default), and a TLS stream turns each
/// flush into a socket write holding a full record and a 9-byte one (the frame header spills
/// over). Here a flush that follows new writes is deferred: it returns at once and wakes the
/// connection, which keeps writing frames while it has them and calls flush again when it has
/// none; that flush, with nothing written since, goes through. So a burst of frames becomes
/// full records and one socket write per [`COALESCE`] bytes, and nothing waits for more data.
struct Coalesce<S> {
    inner: S,
    buf: Vec<u8>,
    /// Something was written since the last flush.
    written: bool,
}

impl<S> Coalesce<S> {
    fn new(inner: S) -> Coalesce<S> {
        Coalesce {
            inner,
            // Allocated on first use: an idle connection holds nothing.
            buf: Vec::new(),
            written: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Hands everything collected to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sent = 0;
        while sent < self.buf.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.buf[sent..]) {
                Poll::Ready(Ok(0)) => {
                    self.buf.drain(..sent);
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => {
                    self.buf.drain(..sent);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    self.buf.drain(..sent);
                    return Poll::Pending;
                }
            }
        }
        self.buf.clear();
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buf.len() + len > COALESCE {
            ready!(this.poll_drain(cx))?;
        }
        if len >= COALESCE {
            // Already large: collecting it would only add a copy.
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        this.written = true;
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if std::mem::take(&mut this.written) && !this.buf.is_empty() {
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = crate::certs::generate(&["mirror.test".to_owned()], 30).unwrap();
        let cert = write(dir.path(), "server.crt", &bundle.server_chain);
        let key = write(dir.path(), "server.key", &bundle.server_key);
        CertResolver::load(&cert, &key).unwrap();

        let missing = dir.path().join("nope.crt");
        let e = CertResolver::load(&missing, &key).unwrap_err().to_string();
        assert!(e.contains("nope.crt") && e.contains("certificate"), "{e}");

        let garbage = write(dir.path(), "garbage.crt", "hello\n");
        let e = CertResolver::load(&garbage, &key).unwrap_err().to_string();
        assert!(e.contains("garbage.crt"), "{e}");

        // A certificate given where the key belongs.
        let e = CertResolver::load(&cert, &cert).unwrap_err().to_string();
        assert!(e.contains("key file") && e.contains("server.crt"), "{e}");

        let other = crate::certs::generate(&["other.test".to_owned()], 30).unwrap();
        let other_key = write(dir.path(), "other.key", &other.server_key);
        let e = CertResolver::load(&cert, &other_key)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("other.key") && e.contains("does not belong"),
            "{e}"
        );
    }

    #[test]
    fn failed_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = crate::certs::generate(&["mirror.test".to_owned()], 30).unwrap();
        let cert = write(dir.path(), "server.crt", &bundle.server_chain);
        let key = write(dir.path(), "server.key", &bundle.server_key);
        let resolver = CertResolver::load(&cert, &key).unwrap();
        let before = resolver.current().cert[0].clone();
        std::fs::write(&cert, "truncated").unwrap();
        let e = resolver.reload().unwrap_err().to_string();
        assert!(e.contains("server.crt"), "{e}");
        assert_eq!(resolver.current().cert[0], before);
    }

    #[test]
    fn config_offers_h2_and_http1() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = crate::certs::generate(&["mirror.test".to_owned()], 30).unwrap();
        let cert = write(dir.path(), "server.crt", &bundle.server_chain);
        let key = write(dir.path(), "server.key", &bundle.server_key);
        let resolver = Arc::new(CertResolver::load(&cert, &key).unwrap());
        let config = server_config(resolver).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
