//! The interop tier over TLS: real clients pull Docker Hub names through berth's HTTPS listener,
//! verifying its certificate against the CA `berth certs` wrote, configured with the very client
//! files shipped in `deploy/clients/` (only the host, port and CA path substituted).
//!
//! - skopeo (containers/image, as podman, buildah and CRI-O): `registries.conf` with berth as the
//!   `[[registry.mirror]]` of docker.io, CA in `certs.d/HOST:PORT/ca.crt`; then the plain-HTTP
//!   fallback with `insecure = true`; and a CA that did not sign berth's certificate is refused.
//! - containerd (`ctr images pull --hosts-dir`): `certs.d/docker.io/hosts.toml` with berth as a
//!   `pull`/`resolve` host and its `ca`; containerd adds `?ns=docker.io`, which berth logs and
//!   routes by.
//!
//! Docker Hub is unreachable here (no DNS), so a pull of `docker.io/library/...` that succeeds
//! went through berth; the upstream is Debian's distribution registry on 127.0.0.1.
//!
//! `cargo test --features interop --test interop_tls`; needs the Debian packages
//! `docker-registry`, `skopeo` and `containerd`. A missing tool fails the test; nothing is
//! skipped.

#[path = "interop/oci.rs"]
mod oci;
#[path = "interop/procs.rs"]
mod procs;
#[path = "interop/pulls.rs"]
mod pulls;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use oci::{Artifact, LayerSpec};
use procs::{Berth, Containerd, Registry, Skopeo};
use pulls::{
    assert_blob_hits, assert_fetched_once, assert_no_new_blob_gets, assert_pulled, expected_files,
    push,
};
use tempfile::TempDir;

const KIB: usize = 1 << 10;

/// The host and port the shipped client files name; the tests put berth's in their place.
const SHIPPED_MIRROR: &str = "mirror.office:5443";
/// Where the shipped containerd `hosts.toml` expects berth's CA.
const SHIPPED_CONTAINERD_CA: &str = "/etc/containerd/certs.d/berth-ca.crt";

/// A two-layer amd64 image of a few hundred KiB (one gzip'd layer, one plain tar).
fn small_image(seed: u64) -> Artifact {
    Artifact::Image(oci::image(
        "amd64",
        &[
            LayerSpec {
                seed,
                size: 384 * KIB,
                gzip: true,
            },
            LayerSpec {
                seed: seed + 1,
                size: 128 * KIB,
                gzip: false,
            },
        ],
    ))
}

/// The files `berth certs` writes.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// `berth certs --host 127.0.0.1 --host localhost --out DIR`, with the built binary.
fn berth_certs(dir: &Path) -> Certs {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "certs",
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
            "--out",
        ])
        .arg(dir)
        .output()
        .expect("run `berth certs`");
    assert!(
        out.status.success(),
        "berth certs failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Certs {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    }
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// berth with its plain listener and a TLS listener on `tls_port` serving `certs`.
fn start_tls_berth(upstream: &str, certs: &Certs, tls_port: u16, extra: &[&str]) -> Berth {
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let mut args = vec![
        "--tls-listen",
        &tls_listen,
        "--tls-cert",
        utf8(&certs.cert),
        "--tls-key",
        utf8(&certs.key),
    ];
    args.extend_from_slice(extra);
    let berth = Berth::start_with(upstream, &args);
    // berth binds the TLS listener before the plain one answers, so this is immediate.
    let addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    procs::wait_for(
        &format!("berth's TLS listener on {addr}"),
        Duration::from_secs(10),
        || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok(),
    );
    berth
}

fn shipped(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `deploy/clients/podman/registries.conf` with berth at `location`; with `insecure`, the
/// plain-HTTP fallback its comment describes (`insecure = true` in the mirror table).
fn podman_registries_conf(location: &str, insecure: bool) -> String {
    let text = shipped("deploy/clients/podman/registries.conf");
    let line = format!("location = \"{SHIPPED_MIRROR}\"");
    assert!(
        text.contains(&line),
        "deploy/clients/podman/registries.conf no longer has {line}"
    );
    let mirror = if insecure {
        format!("location = \"{location}\"\ninsecure = true")
    } else {
        format!("location = \"{location}\"")
    };
    text.replace(&line, &mirror)
}

/// `deploy/clients/containerd/certs.d/docker.io/hosts.toml` with berth at `host_port` and the
/// CA at `ca`.
fn containerd_hosts_toml(host_port: &str, ca: &Path) -> String {
    let text = shipped("deploy/clients/containerd/certs.d/docker.io/hosts.toml");
    for want in [SHIPPED_MIRROR, SHIPPED_CONTAINERD_CA] {
        assert!(
            text.contains(want),
            "deploy/clients/containerd/certs.d/docker.io/hosts.toml no longer names {want}"
        );
    }
    text.replace(SHIPPED_MIRROR, host_port)
        .replace(SHIPPED_CONTAINERD_CA, utf8(ca))
}

/// A skopeo set up as a podman user would be: `registries.conf` from `conf`, and, with `ca`, the
/// CA trusted for `HOST:PORT` in `$HOME/.config/containers/certs.d/HOST:PORT/ca.crt` (the
/// per-user twin of `/etc/containers/certs.d/HOST:PORT/ca.crt`).
struct Client {
    skopeo: Skopeo,
    _dir: TempDir,
}

impl Client {
    fn new(conf: &str, ca: Option<(&str, &Path)>) -> Client {
        let dir = TempDir::new().expect("create a client dir");
        let conf_path = dir.path().join("registries.conf");
        std::fs::write(&conf_path, conf).expect("write registries.conf");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).expect("create the client's HOME");
        if let Some((host_port, ca)) = ca {
            let certs_d = home.join(".config/containers/certs.d").join(host_port);
            std::fs::create_dir_all(&certs_d).expect("create certs.d/HOST:PORT");
            std::fs::copy(ca, certs_d.join("ca.crt")).expect("copy the CA into certs.d");
        }
        let skopeo = Skopeo::new()
            .with_registries_conf(&conf_path)
            .with_home(&home);
        Client { skopeo, _dir: dir }
    }

    /// `skopeo copy docker://docker.io/library/NAME:TAG dir:OUT`, TLS verification as
    /// registries.conf says (no `--src-tls-verify` flag).
    fn try_pull(&self, reference: &str) -> (Output, TempDir) {
        let out = TempDir::new().expect("create a pull dir");
        let src = format!("docker://docker.io/{reference}");
        let dest = format!("dir:{}", out.path().join("image").display());
        (self.skopeo.try_copy(&[&src, &dest]), out)
    }

    fn pull(&self, reference: &str) -> TempDir {
        let (output, out) = self.try_pull(reference);
        assert!(
            output.status.success(),
            "skopeo pull of docker.io/{reference} through berth failed with {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        out
    }
}

/// Asserts that berth served, after its first `skip` request lines, the manifest of
/// `library/NAME:TAG` (a 200 for the tag, and a 200 GET by tag or by digest) and a 200 GET of
/// every blob of `artifact`; returns those lines.
fn assert_berth_served_pull(
    berth: &Berth,
    skip: usize,
    name: &str,
    tag: &str,
    artifact: &Artifact,
    what: &str,
) -> Vec<procs::Served> {
    let served: Vec<procs::Served> = berth.served().into_iter().skip(skip).collect();
    let ok = |method: &str, path: &str| {
        served
            .iter()
            .any(|s| (method.is_empty() || s.method == method) && s.status == 200 && s.path == path)
    };
    let by_tag = format!("/v2/library/{name}/manifests/{tag}");
    let by_digest = format!("/v2/library/{name}/manifests/{}", artifact.top().digest);
    assert!(
        ok("", &by_tag) && (ok("GET", &by_tag) || ok("GET", &by_digest)),
        "{what}: berth did not log the manifest pull ({by_tag} resolved, then fetched by tag \
         or digest); it logged {served:#?}"
    );
    for digest in artifact.distinct_blobs().keys() {
        let blob = format!("/v2/library/{name}/blobs/{digest}");
        assert!(
            ok("GET", &blob),
            "{what}: berth logged no 200 GET {blob}; it logged {served:#?}"
        );
    }
    served
}

#[test]
fn skopeo_pulls_docker_io_through_berth_as_registries_conf_mirror_over_tls_and_plain_http() {
    procs::require_tools();
    let registry = Registry::start();
    let image = small_image(0x7100);
    push(&Skopeo::new(), &registry, &image, "tlsmirror", "v1");
    let certs_dir = TempDir::new().expect("create a certs dir");
    let certs = berth_certs(certs_dir.path());
    let tls_port = procs::free_port();
    let mut berth = start_tls_berth(&registry.url(), &certs, tls_port, &[]);
    let want = expected_files(&image, None);

    // TLS, verified against berth's CA, found by the mirror's HOST:PORT.
    let mirror = format!("localhost:{tls_port}");
    let client = Client::new(
        &podman_registries_conf(&mirror, false),
        Some((&mirror, &certs.ca)),
    );
    let before = registry.blob_gets().len();
    let logged = berth.served().len();
    let pulled = client.pull("library/tlsmirror:v1");
    assert_pulled(pulled.path(), &want, "skopeo pull through berth over TLS");
    assert_fetched_once(
        &registry,
        before,
        "library/tlsmirror",
        &image.distinct_blobs(),
    );
    let served =
        assert_berth_served_pull(&berth, logged, "tlsmirror", "v1", &image, "skopeo over TLS");
    assert!(
        served.iter().all(|s| s.ns.is_empty()),
        "skopeo sends no ?ns=, yet berth logged {served:#?}"
    );

    // The plain-HTTP fallback: the mirror on berth's plain listener with `insecure = true`.
    let client = Client::new(&podman_registries_conf(&berth.addr.to_string(), true), None);
    let before = registry.blob_gets().len();
    let logged = berth.served().len();
    let pulled = client.pull("library/tlsmirror:v1");
    assert_pulled(
        pulled.path(),
        &want,
        "skopeo pull through berth's plain listener",
    );
    assert_berth_served_pull(
        &berth,
        logged,
        "tlsmirror",
        "v1",
        &image,
        "skopeo over plain HTTP",
    );
    assert_no_new_blob_gets(&registry, before, "the pull through the plain listener");
    assert_blob_hits(&berth, logged, "the pull through the plain listener");

    assert!(berth.is_running(), "berth exited during the test");
}

#[test]
fn skopeo_refuses_berth_when_its_certificate_is_not_signed_by_the_trusted_ca() {
    procs::require_tools();
    let registry = Registry::start();
    let image = small_image(0x7200);
    push(&Skopeo::new(), &registry, &image, "wrongca", "v1");
    let certs_dir = TempDir::new().expect("create a certs dir");
    let certs = berth_certs(&certs_dir.path().join("served"));
    // Another `berth certs` run: same names, a different CA.
    let other = berth_certs(&certs_dir.path().join("other"));
    let tls_port = procs::free_port();
    let mut berth = start_tls_berth(&registry.url(), &certs, tls_port, &[]);
    let mirror = format!("localhost:{tls_port}");
    let conf = podman_registries_conf(&mirror, false);

    let before = registry.accesses().len();
    let logged = berth.served().len();
    let client = Client::new(&conf, Some((&mirror, &other.ca)));
    let (output, _out) = client.try_pull("library/wrongca:v1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "skopeo pulled through berth although it trusts another CA:\n{stderr}"
    );
    assert!(
        stderr.contains("x509: certificate signed by unknown authority"),
        "skopeo failed, but not on certificate verification:\n{stderr}"
    );
    let served = &berth.served()[logged..];
    assert!(
        served.is_empty(),
        "no request may get past the refused handshake, berth logged {served:#?}"
    );
    assert!(
        berth.log().contains("TLS handshake failed"),
        "berth did not log the refused handshake"
    );
    assert_eq!(
        registry.accesses().len(),
        before,
        "the upstream must not be asked for anything"
    );

    // The same configuration with the right CA pulls: the CA was the only thing wrong.
    let client = Client::new(&conf, Some((&mirror, &certs.ca)));
    let pulled = client.pull("library/wrongca:v1");
    assert_pulled(
        pulled.path(),
        &expected_files(&image, None),
        "skopeo pull with the right CA",
    );
    assert!(berth.is_running(), "berth exited during the test");
}

/// `ctr images ls` → the digest of `reference`.
fn image_digest(containerd: &Containerd, reference: &str) -> String {
    let out = containerd.ctr(&["images", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // REF TYPE DIGEST SIZE PLATFORMS LABELS
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&reference))
        .and_then(|cols| cols.get(2).map(|d| d.to_string()))
        .unwrap_or_else(|| panic!("`ctr images ls` does not list {reference}:\n{text}"))
}

#[test]
fn containerd_pulls_docker_io_through_berth_as_hosts_toml_mirror_over_tls() {
    procs::require_tools();
    let containerd = Containerd::start();
    let registry = Registry::start();
    let image = small_image(0x7300);
    push(&Skopeo::new(), &registry, &image, "ctrmirror", "v1");
    let certs_dir = TempDir::new().expect("create a certs dir");
    let certs = berth_certs(certs_dir.path());

    // Only `?ns=docker.io` reaches the registry: berth's default upstream is a closed port.
    let config = certs_dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "default_upstream = \"elsewhere.test\"\n\
             [upstreams.\"elsewhere.test\"]\nurl = \"http://127.0.0.1:1\"\n\
             [upstreams.\"docker.io\"]\nurl = \"{}\"\n",
            registry.url()
        ),
    )
    .expect("write berth.toml");
    let dead = format!("http://127.0.0.1:{}", procs::free_port());
    let tls_port = procs::free_port();
    let mut berth = start_tls_berth(&dead, &certs, tls_port, &["--config", utf8(&config)]);

    // hosts.toml as shipped; the IP-address name of the certificate this time.
    let hosts_dir = TempDir::new().expect("create a hosts dir");
    let docker_io = hosts_dir.path().join("docker.io");
    std::fs::create_dir(&docker_io).expect("create certs.d/docker.io");
    std::fs::write(
        docker_io.join("hosts.toml"),
        containerd_hosts_toml(&format!("127.0.0.1:{tls_port}"), &certs.ca),
    )
    .expect("write hosts.toml");

    let reference = "docker.io/library/ctrmirror:v1";
    let before = registry.blob_gets().len();
    containerd.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        utf8(hosts_dir.path()),
        "--platform",
        "linux/amd64",
        "--snapshotter",
        "native",
        reference,
    ]);

    let served =
        assert_berth_served_pull(&berth, 0, "ctrmirror", "v1", &image, "containerd over TLS");
    let without_ns: Vec<_> = served
        .iter()
        .filter(|s| s.route != "base" && s.ns != "docker.io")
        .collect();
    assert!(
        without_ns.is_empty(),
        "containerd must send ?ns=docker.io with every request to the mirror, berth logged \
         {without_ns:#?}"
    );
    assert_fetched_once(
        &registry,
        before,
        "library/ctrmirror",
        &image.distinct_blobs(),
    );

    // What containerd stored is what was pushed.
    let manifest = &image.top().digest;
    assert_eq!(
        &image_digest(&containerd, reference),
        manifest,
        "containerd's image {reference} must point at the pushed manifest"
    );
    let oci::Artifact::Image(img) = &image else {
        unreachable!("small_image is one image")
    };
    for blob in std::iter::once(&img.manifest).chain(img.blobs()) {
        let got = containerd.ctr(&["content", "get", &blob.digest]).stdout;
        assert!(
            got == blob.bytes,
            "containerd's {} differs from what was pushed: {} bytes (sha256 {}), want {} bytes",
            blob.digest,
            got.len(),
            oci::digest_of(&got),
            blob.bytes.len()
        );
    }

    assert!(berth.is_running(), "berth exited during the test");
}
