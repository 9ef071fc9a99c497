//! Local certificates: a small CA and a server certificate it signs (`berth certs`, and
//! `berth serve --self-signed`), written as PEM files, plus the steps that make clients trust it.
//!
//! Files written into the output directory:
//!
//! - `ca.crt`: the CA certificate, what clients must trust;
//! - `ca.key`: the CA's private key (mode 0600), needed only to issue another certificate;
//! - `server.crt`: the server certificate followed by the CA certificate (the full chain);
//! - `server.key`: the server's private key (mode 0600).

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Default lifetime of a server certificate. 825 days is the most Apple platforms accept.
pub const DEFAULT_DAYS: u32 = 825;

/// A CA lives at least this long, so that a server certificate can be reissued without
/// touching every client.
pub const CA_MIN_DAYS: u32 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("--host {0:?}: {1}")]
    Host(String, String),
    #[error("give at least one --host (a DNS name or IP address clients use to reach berth)")]
    NoHosts,
    #[error("refusing to overwrite {}: it already exists (pass --force to replace it)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks disagree a little) until `days` from now.
    pub fn days_from_now(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// A DNS name or an IP address, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Dns(String),
    Ip(IpAddr),
}

impl Host {
    pub fn parse(s: &str) -> Result<Host, CertsError> {
        let bad = |why: &str| CertsError::Host(s.to_owned(), why.to_owned());
        let trimmed = s.trim();
        let unbracketed = trimmed
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(trimmed);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        if trimmed.contains(':') {
            return Err(bad("give the name without a port or scheme"));
        }
        let name = trimmed.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return Err(bad("a DNS name has 1 to 253 characters"));
        }
        for (i, label) in name.split('.').enumerate() {
            if i == 0 && label == "*" && name.contains('.') {
                continue;
            }
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !ok {
                return Err(bad(
                    "not a DNS name (letters, digits and '-' in dot-separated labels; \
                     punycode for international names) or an IP address",
                ));
            }
        }
        Ok(Host::Dns(name))
    }

    fn san(&self) -> Result<SanType, CertsError> {
        Ok(match self {
            Host::Ip(ip) => SanType::IpAddress(*ip),
            Host::Dns(name) => {
                SanType::DnsName(name.clone().try_into().map_err(CertsError::Generate)?)
            }
        })
    }

    /// How the host is written in a URL's authority (IPv6 in brackets).
    pub fn authority(&self) -> String {
        match self {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            Host::Ip(ip) => ip.to_string(),
            Host::Dns(name) => name.clone(),
        }
    }

    /// `HOST:PORT`, as in URLs and in Docker's and podman's `certs.d` directory names.
    pub fn with_port(&self, port: u16) -> String {
        format!("{}:{port}", self.authority())
    }
}

/// Parses and de-duplicates the `--host` values; at least one is required.
pub fn parse_hosts(hosts: &[String]) -> Result<Vec<Host>, CertsError> {
    let mut out: Vec<Host> = Vec::new();
    for h in hosts {
        let host = Host::parse(h)?;
        if !out.contains(&host) {
            out.push(host);
        }
    }
    if out.is_empty() {
        return Err(CertsError::NoHosts);
    }
    Ok(out)
}

/// A certificate authority that can issue server certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn generate(validity: Validity) -> Result<Ca, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "berth");
        // A unique name, so that CAs from separate runs never stand in for each other.
        dn.push(
            DnType::CommonName,
            format!("berth local CA {:08x}", rand::random::<u32>()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A server certificate for `hosts` (DNS names as DNS SANs, IPs as IP SANs).
    pub fn issue(&self, hosts: &[Host], validity: Validity) -> Result<ServerCert, CertsError> {
        let first = hosts.first().ok_or(CertsError::NoHosts)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "berth");
        dn.push(
            DnType::CommonName,
            match first {
                Host::Dns(n) => n.clone(),
                Host::Ip(ip) => ip.to_string(),
            },
        );
        params.distinguished_name = dn;
        params.subject_alt_names = hosts.iter().map(Host::san).collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(ServerCert {
            chain: format!("{}{}", cert.pem(), self.cert.pem()),
            key: key.serialize_pem(),
        })
    }
}

/// A server certificate chain (server, then CA) and its key, in PEM.
pub struct ServerCert {
    pub chain: String,
    pub key: String,
}

/// The four PEM files `berth certs` writes.
pub struct Bundle {
    pub ca_cert: String,
    pub ca_key: String,
    pub server_chain: String,
    pub server_key: String,
}

/// A new CA (valid for at least [`CA_MIN_DAYS`]) and a server certificate valid for `days`.
pub fn generate(hosts: &[String], days: u32) -> Result<Bundle, CertsError> {
    let hosts = parse_hosts(hosts)?;
    let ca = Ca::generate(Validity::days_from_now(days.max(CA_MIN_DAYS)))?;
    let server = ca.issue(&hosts, Validity::days_from_now(days))?;
    Ok(Bundle {
        ca_cert: ca.cert_pem(),
        ca_key: ca.key_pem(),
        server_chain: server.chain,
        server_key: server.key,
    })
}

/// Where the files of a bundle live.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl CertPaths {
    pub fn in_dir(dir: &Path) -> CertPaths {
        CertPaths {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }
}

/// Writes the bundle into `dir` (created if needed). Keys get mode 0600, certificates 0644.
/// Without `force`, nothing is written if any of the four files exists.
pub fn write_bundle(dir: &Path, bundle: &Bundle, force: bool) -> Result<CertPaths, CertsError> {
    fs::create_dir_all(dir).map_err(|e| CertsError::Io {
        path: dir.to_owned(),
        source: e,
    })?;
    let paths = CertPaths::in_dir(dir);
    let files = [
        (&paths.ca_cert, &bundle.ca_cert, 0o644),
        (&paths.ca_key, &bundle.ca_key, 0o600),
        (&paths.server_cert, &bundle.server_chain, 0o644),
        (&paths.server_key, &bundle.server_key, 0o600),
    ];
    if !force {
        if let Some((path, _, _)) = files.iter().find(|(p, _, _)| p.symlink_metadata().is_ok()) {
            return Err(CertsError::Exists(path.to_path_buf()));
        }
    }
    for (path, text, mode) in files {
        write_file(path, text, mode, force)?;
    }
    Ok(paths)
}

/// Writes `text` with exactly `mode`. With `replace`, through a temporary file renamed over
/// `path`; otherwise `path` must not exist (checked atomically by the create).
fn write_file(path: &Path, text: &str, mode: u32, replace: bool) -> Result<(), CertsError> {
    let io_err = |p: &Path, e: io::Error| CertsError::Io {
        path: p.to_owned(),
        source: e,
    };
    let target = if replace {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".tmp-{}", std::process::id()));
        path.with_file_name(name)
    } else {
        path.to_owned()
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&target)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists && !replace {
                CertsError::Exists(path.to_owned())
            } else {
                io_err(&target, e)
            }
        })?;
    // The umask may have narrowed the mode; certificates are meant to be readable.
    let written = file
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&target);
        return Err(io_err(&target, e));
    }
    if replace {
        fs::rename(&target, path).map_err(|e| {
            let _ = fs::remove_file(&target);
            io_err(path, e)
        })?;
    }
    Ok(())
}

/// For `berth serve --self-signed`: the server certificate in `dir` if there is one, otherwise
/// a new CA and server certificate for `hosts` written there. Returns the paths and whether
/// they were generated now.
pub fn ensure_self_signed(
    dir: &Path,
    hosts: &[String],
    days: u32,
) -> Result<(CertPaths, bool), CertsError> {
    let paths = CertPaths::in_dir(dir);
    if paths.server_cert.exists() && paths.server_key.exists() {
        return Ok((paths, false));
    }
    let bundle = generate(hosts, days)?;
    Ok((write_bundle(dir, &bundle, false)?, true))
}

/// The steps that make each kind of client trust the CA, for clients reaching berth on
/// `port` through any of `hosts`.
/// `serving`: said by a server that is already serving these files (`serve --self-signed`),
/// rather than by `berth certs`, which tells how to serve them.
pub fn trust_instructions(paths: &CertPaths, hosts: &[String], port: u16, serving: bool) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let ca = abs(&paths.ca_cert).display().to_string();
    let hosts: Vec<Host> = hosts.iter().filter_map(|h| Host::parse(h).ok()).collect();
    // Docker and podman name the directory HOST:PORT, or just HOST for port 443.
    let dir_names: Vec<String> = hosts
        .iter()
        .map(|h| {
            if port == 443 {
                h.authority()
            } else {
                h.with_port(port)
            }
        })
        .collect();
    let first = dir_names
        .first()
        .cloned()
        .unwrap_or_else(|| format!("HOST:{port}"));
    let mut s = String::new();
    let _ = writeln!(s, "Wrote:");
    for (p, what) in [
        (&paths.ca_cert, "CA certificate: clients trust this"),
        (
            &paths.ca_key,
            "CA private key (0600): keep it secret, or delete it",
        ),
        (&paths.server_cert, "server certificate chain"),
        (&paths.server_key, "server private key (0600)"),
    ] {
        let _ = writeln!(s, "  {}  ({what})", abs(p).display());
    }
    let _ = writeln!(s);
    if serving {
        let _ = writeln!(s, "Serving TLS on port {port} with this certificate.");
    } else {
        let _ = writeln!(s, "Serve with:");
        let _ = writeln!(
            s,
            "  berth serve --tls-listen 0.0.0.0:{port} --tls-cert {} --tls-key {}",
            abs(&paths.server_cert).display(),
            abs(&paths.server_key).display()
        );
    }
    let _ = writeln!(
        s,
        "  (after replacing the files, `kill -HUP <berth pid>` reloads them)"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "Trust the CA on every client machine:");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Docker (for each HOST:PORT clients use; no restart needed):"
    );
    for d in &dir_names {
        let _ = writeln!(s, "  sudo mkdir -p /etc/docker/certs.d/{d}");
        let _ = writeln!(s, "  sudo cp {ca} /etc/docker/certs.d/{d}/ca.crt");
    }
    let _ = writeln!(
        s,
        "  To mirror Docker Hub, add {{\"registry-mirrors\": [\"https://{first}\"]}} to /etc/docker/daemon.json and restart dockerd."
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "containerd (CRI, nerdctl): /etc/containerd/certs.d/docker.io/hosts.toml"
    );
    let _ = writeln!(s, "  sudo mkdir -p /etc/containerd/certs.d/docker.io");
    let _ = writeln!(s, "  sudo cp {ca} /etc/containerd/certs.d/berth-ca.crt");
    let _ = writeln!(s, "  # hosts.toml:");
    let _ = writeln!(s, "  server = \"https://registry-1.docker.io\"");
    let _ = writeln!(s, "  [host.\"https://{first}\"]");
    let _ = writeln!(s, "    capabilities = [\"pull\", \"resolve\"]");
    let _ = writeln!(s, "    ca = \"/etc/containerd/certs.d/berth-ca.crt\"");
    let _ = writeln!(
        s,
        "  (same for ghcr.io etc. in certs.d/ghcr.io/hosts.toml; containerd adds ?ns=<registry> so berth picks the upstream;"
    );
    let _ = writeln!(
        s,
        "   the CRI plugin needs config_path = \"/etc/containerd/certs.d\" in its registry section of config.toml)"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "podman, skopeo, buildah, CRI-O:");
    for d in &dir_names {
        let _ = writeln!(s, "  sudo mkdir -p /etc/containers/certs.d/{d}");
        let _ = writeln!(s, "  sudo cp {ca} /etc/containers/certs.d/{d}/ca.crt");
    }
    let _ = writeln!(
        s,
        "  and a [[registry.mirror]] location = \"{first}\" under [[registry]] location = \"docker.io\" in /etc/containers/registries.conf"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "System store (curl, Go and other tools), Debian/Ubuntu:");
    let _ = writeln!(
        s,
        "  sudo cp {ca} /usr/local/share/ca-certificates/berth.crt && sudo update-ca-certificates"
    );
    let _ = writeln!(s, "Fedora/RHEL:");
    let _ = writeln!(
        s,
        "  sudo cp {ca} /etc/pki/ca-trust/source/anchors/berth.crt && sudo update-ca-trust"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn hosts() -> Vec<String> {
        vec!["mirror.office".into(), "10.0.0.5".into()]
    }

    #[test]
    fn keys_are_private_and_certs_readable() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = generate(&hosts(), 30).unwrap();
        let paths = write_bundle(&dir.path().join("certs"), &bundle, false).unwrap();
        assert_eq!(mode(&paths.ca_key), 0o600);
        assert_eq!(mode(&paths.server_key), 0o600);
        assert_eq!(mode(&paths.ca_cert), 0o644);
        assert_eq!(mode(&paths.server_cert), 0o644);
        let chain = fs::read_to_string(&paths.server_cert).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(chain.ends_with(&fs::read_to_string(&paths.ca_cert).unwrap()));
        assert!(fs::read_to_string(&paths.server_key)
            .unwrap()
            .contains("PRIVATE KEY"));
    }

    #[test]
    fn existing_files_are_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let first = generate(&hosts(), 30).unwrap();
        let paths = write_bundle(dir.path(), &first, false).unwrap();
        let second = generate(&hosts(), 30).unwrap();

        let e = write_bundle(dir.path(), &second, false).unwrap_err();
        assert!(
            matches!(&e, CertsError::Exists(p) if p == &paths.ca_cert),
            "{e}"
        );
        assert!(e.to_string().contains("ca.crt"), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(fs::read_to_string(&paths.ca_key).unwrap(), first.ca_key);

        // One file left over is enough to refuse, and nothing else gets written.
        for p in [&paths.ca_cert, &paths.ca_key, &paths.server_cert] {
            fs::remove_file(p).unwrap();
        }
        let e = write_bundle(dir.path(), &second, false).unwrap_err();
        assert!(e.to_string().contains("server.key"), "{e}");
        assert!(!paths.ca_cert.exists());

        // --force replaces everything and keeps the modes.
        fs::set_permissions(&paths.server_key, fs::Permissions::from_mode(0o644)).unwrap();
        write_bundle(dir.path(), &second, true).unwrap();
        assert_eq!(
            fs::read_to_string(&paths.server_key).unwrap(),
            second.server_key
        );
        assert_eq!(fs::read_to_string(&paths.ca_cert).unwrap(), second.ca_cert);
        assert_eq!(mode(&paths.server_key), 0o600);
        assert_eq!(mode(&paths.ca_key), 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn self_signed_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let (paths, generated) = ensure_self_signed(&certs, &hosts(), 30).unwrap();
        assert!(generated);
        let chain = fs::read_to_string(&paths.server_cert).unwrap();
        let (again, generated) = ensure_self_signed(&certs, &hosts(), 30).unwrap();
        assert!(!generated);
        assert_eq!(fs::read_to_string(&again.server_cert).unwrap(), chain);
    }

    #[test]
    fn hosts_are_checked() {
        assert_eq!(
            Host::parse("10.0.0.5").unwrap(),
            Host::Ip("10.0.0.5".parse().unwrap())
        );
        assert_eq!(
            Host::parse("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            Host::parse("Mirror.Office.").unwrap(),
            Host::Dns("mirror.office".into())
        );
        assert!(Host::parse("*.office.lan").is_ok());
        for bad in [
            "mirror.office:5443",
            "https://x",
            "",
            "a..b",
            "-a.b",
            "ünï.de",
            "a b",
        ] {
            let e = Host::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--host"), "{bad}: {e}");
        }
        assert!(matches!(parse_hosts(&[]), Err(CertsError::NoHosts)));
        assert_eq!(parse_hosts(&["a.b".into(), "A.B".into()]).unwrap().len(), 1);
    }

    #[test]
    fn instructions_name_every_client() {
        let paths = CertPaths::in_dir(Path::new("/srv/berth/certs"));
        let s = trust_instructions(&paths, &["mirror.office".into(), "::1".into()], 5443, false);
        for want in [
            "/etc/docker/certs.d/mirror.office:5443/ca.crt",
            "/etc/docker/certs.d/[::1]:5443/ca.crt",
            "ca = \"/etc/containerd/certs.d/berth-ca.crt\"",
            "/etc/containers/certs.d/mirror.office:5443/ca.crt",
            "cp /srv/berth/certs/ca.crt /usr/local/share/ca-certificates/berth.crt && sudo update-ca-certificates",
        ] {
            assert!(s.contains(want), "missing {want:?} in:\n{s}");
        }
        let s = trust_instructions(&paths, &["mirror.office".into()], 443, false);
        assert!(
            s.contains("/etc/docker/certs.d/mirror.office/ca.crt"),
            "{s}"
        );
        assert!(s.contains("Serve with:"), "{s}");
        // Said by a server already serving the files: no advice to start one.
        let s = trust_instructions(&paths, &["mirror.office".into()], 443, true);
        assert!(
            !s.contains("Serve with") && s.contains("Serving TLS on port 443"),
            "{s}"
        );
    }
}
