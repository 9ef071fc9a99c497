//! The interop tier over TLS: real clients pull Docker Hub names through berth's HTTPS listener,
//! verifying its certificate against the CA `berth certs` wrote, configured with the very client
//! files shipped in `deploy/clients/` (only the host, port and CA path substituted).
//!
//! - skopeo (containers/image, as podman, buildah and CRI-O): `registries.conf` with berth as the
//!   `[[registry.mirror]]` of docker.io, CA in `certs.d/HOST:PORT/ca.crt`; then the plain-HTTP
//!   fallback with `insecure = true`; and a CA that did not sign berth's certificate is refused.
//! - containerd (`ctr images pull --hosts-dir`): `certs.d/docker.io/hosts.toml` and
//!   `certs.d/ghcr.io/hosts.toml` with berth as a `pull`/`resolve` host and its `ca`, then the
//!   plain-HTTP fallback (an `http://` host). containerd adds `?ns=docker.io` / `?ns=ghcr.io`,
//!   which berth logs and routes by: its default upstream is a closed port, so only a request
//!   naming its registry can succeed.
//!
//! Docker Hub and ghcr.io are unreachable here (no DNS), so a pull of `docker.io/...` or
//! `ghcr.io/...` that succeeds went through berth; the upstream is Debian's distribution registry
//! on 127.0.0.1, and what the clients stored is compared byte for byte with what was pushed.
//!
//! `cargo test --features interop --test interop tls::`; needs the Debian packages
//! `docker-registry`, `skopeo` and `containerd`. A missing tool fails the test; nothing is
//! skipped.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::oci::{self, Artifact, LayerSpec};
use crate::procs::{self, Berth, Containerd, Registry, Skopeo};
use crate::pulls::{
    assert_blob_hits, assert_fetched_once, assert_no_new_blob_gets, assert_pulled, expected_files,
    push, push_repo,
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

/// `deploy/clients/containerd/certs.d/REGISTRY/hosts.toml` with berth at `host_port` and the
/// CA at `ca`.
fn containerd_hosts_toml(registry: &str, host_port: &str, ca: &Path) -> String {
    let rel = format!("deploy/clients/containerd/certs.d/{registry}/hosts.toml");
    let text = shipped(&rel);
    for want in [SHIPPED_MIRROR, SHIPPED_CONTAINERD_CA] {
        assert!(text.contains(want), "{rel} no longer names {want}");
    }
    text.replace(SHIPPED_MIRROR, host_port)
        .replace(SHIPPED_CONTAINERD_CA, utf8(ca))
}

/// The plain-HTTP fallback of `certs.d/docker.io/hosts.toml` (docs/clients.md): the host is
/// `http://HOST:PORT` of berth's plain listener, and there is no `ca`.
fn containerd_plain_hosts_toml(host_port: &str) -> String {
    let rel = "deploy/clients/containerd/certs.d/docker.io/hosts.toml";
    let text = shipped(rel);
    let host = format!("[host.\"https://{SHIPPED_MIRROR}\"]");
    assert!(text.contains(&host), "{rel} no longer has {host}");
    text.replace(&host, &format!("[host.\"http://{host_port}\"]"))
        .lines()
        .filter(|l| !l.trim_start().starts_with("ca = "))
        .map(|l| format!("{l}\n"))
        .collect()
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

/// Asserts that berth served, after its first `skip` request lines, the manifest of `REPO:TAG`
/// (a 200 for the tag, and a 200 GET by tag or by digest) and a 200 GET of
/// every blob of `artifact`; returns those lines.
fn assert_berth_served_pull(
    berth: &Berth,
    skip: usize,
    repo: &str,
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
    let by_tag = format!("/v2/{repo}/manifests/{tag}");
    let by_digest = format!("/v2/{repo}/manifests/{}", artifact.top().digest);
    assert!(
        ok("", &by_tag) && (ok("GET", &by_tag) || ok("GET", &by_digest)),
        "{what}: berth did not log the manifest pull ({by_tag} resolved, then fetched by tag \
         or digest); it logged {served:#?}"
    );
    for digest in artifact.distinct_blobs().keys() {
        let blob = format!("/v2/{repo}/blobs/{digest}");
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
    berth.settle();
    let logged = berth.served().len();
    let pulled = client.pull("library/tlsmirror:v1");
    assert_pulled(pulled.path(), &want, "skopeo pull through berth over TLS");
    assert_fetched_once(
        &registry,
        before,
        "library/tlsmirror",
        &image.distinct_blobs(),
    );
    let served = assert_berth_served_pull(
        &berth,
        logged,
        "library/tlsmirror",
        "v1",
        &image,
        "skopeo over TLS",
    );
    assert!(
        served.iter().all(|s| s.ns.is_empty()),
        "skopeo sends no ?ns=, yet berth logged {served:#?}"
    );

    // The plain-HTTP fallback: the mirror on berth's plain listener with `insecure = true`.
    let client = Client::new(&podman_registries_conf(&berth.addr.to_string(), true), None);
    let before = registry.blob_gets().len();
    berth.settle();
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
        "library/tlsmirror",
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
    berth.settle();
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

/// berth for containerd: TLS and plain listeners; the upstreams `docker.io` and `ghcr.io` are both
/// `registry`, and the default upstream is a closed port, so only a request that names its
/// registry with `?ns=` can succeed.
fn berth_for_containerd(registry: &Registry, certs: &Certs, dir: &Path) -> (Berth, u16) {
    let config = dir.join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "default_upstream = \"elsewhere.test\"\n\
             [upstreams.\"elsewhere.test\"]\nurl = \"http://127.0.0.1:1\"\n\
             [upstreams.\"docker.io\"]\nurl = \"{url}\"\n\
             [upstreams.\"ghcr.io\"]\nurl = \"{url}\"\n",
            url = registry.url()
        ),
    )
    .expect("write berth.toml");
    // --upstream sets the default upstream's URL: a port nothing listens on.
    let dead = format!("http://127.0.0.1:{}", procs::free_port());
    let tls_port = procs::free_port();
    let berth = start_tls_berth(&dead, certs, tls_port, &["--config", utf8(&config)]);
    (berth, tls_port)
}

/// A containerd hosts dir (what `config_path` or `--hosts-dir` names) holding one
/// `REGISTRY/hosts.toml`.
fn hosts_dir(registry: &str, hosts_toml: &str) -> TempDir {
    let dir = TempDir::new().expect("create a hosts dir");
    let sub = dir.path().join(registry);
    std::fs::create_dir(&sub).expect("create certs.d/REGISTRY");
    std::fs::write(sub.join("hosts.toml"), hosts_toml).expect("write hosts.toml");
    dir
}

/// `ctr images pull --hosts-dir DIR REFERENCE`: fetches and unpacks (native snapshotter: no
/// overlay mounts needed).
fn ctr_pull(containerd: &Containerd, hosts: &TempDir, reference: &str) {
    containerd.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        utf8(hosts.path()),
        "--platform",
        "linux/amd64",
        "--snapshotter",
        "native",
        reference,
    ]);
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

/// Asserts that containerd's `reference` is the pushed manifest of `artifact` and that its
/// content store holds the manifest, config and layers byte for byte.
fn assert_containerd_holds(containerd: &Containerd, reference: &str, artifact: &Artifact) {
    let Artifact::Image(image) = artifact else {
        panic!("containerd tests pull single images")
    };
    assert_eq!(
        image_digest(containerd, reference),
        image.manifest.digest,
        "containerd's image {reference} must point at the pushed manifest"
    );
    for blob in std::iter::once(&image.manifest).chain(image.blobs()) {
        let got = containerd.ctr(&["content", "get", &blob.digest]).stdout;
        assert!(
            got == blob.bytes,
            "{reference}: containerd's {} differs from what was pushed: {} bytes (sha256 {}), \
             want {} bytes",
            blob.digest,
            got.len(),
            oci::sha256(&got),
            blob.bytes.len()
        );
    }
}

/// Asserts that every registry request in `served` carried `?ns=NS` and was routed to the
/// upstream of that name.
/// Every request of a pull named `ns` and berth routed it to the upstream of that key, which it
/// logs as `upstream` (the built-in `docker.io` pointed at the test registry is logged by the
/// registry's host).
fn assert_all_ns(served: &[procs::Served], ns: &str, upstream: &str, what: &str) {
    let other: Vec<_> = served
        .iter()
        .filter(|s| s.route != "base" && (s.ns != ns || s.upstream != upstream))
        .collect();
    assert!(
        other.is_empty(),
        "{what}: containerd must send ?ns={ns} with every request to the mirror, and berth \
         route it to upstream {upstream}; berth logged {other:#?}"
    );
}

#[test]
fn containerd_pulls_docker_io_through_berth_as_hosts_toml_mirror_over_tls_and_plain_http() {
    procs::require_tools();
    let mut containerd = Containerd::start();
    let registry = Registry::start();
    let skopeo = Skopeo::new();
    let tls_image = small_image(0x7300);
    push(&skopeo, &registry, &tls_image, "ctrmirror", "v1");
    let plain_image = small_image(0x7400);
    push(&skopeo, &registry, &plain_image, "ctrplain", "v1");
    let dir = TempDir::new().expect("create a certs dir");
    let certs = berth_certs(dir.path());
    let (mut berth, tls_port) = berth_for_containerd(&registry, &certs, dir.path());

    // The shipped hosts.toml, reaching berth by the certificate's IP-address name.
    let hosts = hosts_dir(
        "docker.io",
        &containerd_hosts_toml("docker.io", &format!("127.0.0.1:{tls_port}"), &certs.ca),
    );
    let reference = "docker.io/library/ctrmirror:v1";
    let before = registry.blob_gets().len();
    berth.settle();
    let logged = berth.served().len();
    ctr_pull(&containerd, &hosts, reference);
    let served = assert_berth_served_pull(
        &berth,
        logged,
        "library/ctrmirror",
        "v1",
        &tls_image,
        "containerd over TLS",
    );
    let registry_host = registry.addr.to_string();
    assert_all_ns(&served, "docker.io", &registry_host, "containerd over TLS");
    assert_fetched_once(
        &registry,
        before,
        "library/ctrmirror",
        &tls_image.distinct_blobs(),
    );
    assert_containerd_holds(&containerd, reference, &tls_image);

    // The plain-HTTP fallback: an http:// host on berth's plain listener, no ca.
    let hosts = hosts_dir(
        "docker.io",
        &containerd_plain_hosts_toml(&berth.addr.to_string()),
    );
    let reference = "docker.io/library/ctrplain:v1";
    let before = registry.blob_gets().len();
    berth.settle();
    let logged = berth.served().len();
    ctr_pull(&containerd, &hosts, reference);
    let served = assert_berth_served_pull(
        &berth,
        logged,
        "library/ctrplain",
        "v1",
        &plain_image,
        "containerd over plain HTTP",
    );
    assert_all_ns(
        &served,
        "docker.io",
        &registry_host,
        "containerd over plain HTTP",
    );
    assert_fetched_once(
        &registry,
        before,
        "library/ctrplain",
        &plain_image.distinct_blobs(),
    );
    assert_containerd_holds(&containerd, reference, &plain_image);

    assert!(berth.is_running(), "berth exited during the test");
    assert!(containerd.is_running(), "containerd exited during the test");
}

#[test]
fn containerd_pulls_ghcr_io_through_berth_with_the_shipped_ghcr_hosts_toml() {
    procs::require_tools();
    let mut containerd = Containerd::start();
    let registry = Registry::start();
    let image = small_image(0x7500);
    push_repo(&Skopeo::new(), &registry, &image, "berth-test/app", "v1");
    let dir = TempDir::new().expect("create a certs dir");
    let certs = berth_certs(dir.path());
    let (mut berth, tls_port) = berth_for_containerd(&registry, &certs, dir.path());

    // The certificate's DNS name this time.
    let hosts = hosts_dir(
        "ghcr.io",
        &containerd_hosts_toml("ghcr.io", &format!("localhost:{tls_port}"), &certs.ca),
    );
    let reference = "ghcr.io/berth-test/app:v1";
    let before = registry.blob_gets().len();
    berth.settle();
    let logged = berth.served().len();
    ctr_pull(&containerd, &hosts, reference);
    let served = assert_berth_served_pull(
        &berth,
        logged,
        "berth-test/app",
        "v1",
        &image,
        "containerd, ghcr.io over TLS",
    );
    assert_all_ns(
        &served,
        "ghcr.io",
        "ghcr.io",
        "containerd, ghcr.io over TLS",
    );
    assert_fetched_once(&registry, before, "berth-test/app", &image.distinct_blobs());
    assert_containerd_holds(&containerd, reference, &image);
    assert!(berth.is_running(), "berth exited during the test");
    assert!(containerd.is_running(), "containerd exited during the test");
}
