//! Interop with a real Docker daemon: Debian's `docker.io` (dockerd 20.10) pulls through berth.
//!
//! Each test builds its own world under one temp dir: a distribution v2.8 registry
//! (`docker-registry serve`) on 127.0.0.1 seeded with `skopeo` from an OCI layout written here,
//! berth in front of it (the binary built by cargo), and a private dockerd (vfs storage, its
//! own data root, exec root, pidfile and unix socket) whose daemon.json names berth in
//! `registry-mirrors`. `docker pull NAME` then resolves to docker.io/library/NAME, which dockerd
//! asks the mirror for first.
//!
//! Run with `cargo test --features interop --test interop docker::` as root. Missing tools are a
//! failure, never a skip: the panic names the apt package. See docs/docker.md.
//!
//! The TLS test puts berth's CA where dockerd 20.10 reads it, `/etc/docker/certs.d/HOST:PORT/`
//! (a drop guard, [`CertsDEntry`], removes it), and maps the mirror's name to ::1: dockerd never
//! verifies a mirror in 127.0.0.0/8. The private-namespace test runs `docker login`, `docker
//! push` and `docker pull` against berth with an htpasswd file.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::oci::{self, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST};
use crate::procs::{find_tool, free_port, http, search_path_env, tail, wait_for, Proc};
use crate::support::{pseudo_random, sha256};

/// The daemons are heavy for a 2-core machine, and /etc/hosts is shared: one world at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The name the hosts-file tests map to 127.0.0.1.
const MIRROR_HOST: &str = "berth-mirror.test";

/// The name the TLS test maps to ::1 only. dockerd counts 127.0.0.0/8 as insecure whatever
/// daemon.json says, and then skips certificate checks (and certs.d); ::1 is outside that range.
const MIRROR_HOST6: &str = "berth-mirror6.test";

/// The README's name for the mirror, which `readme.rs` maps to ::1 to run its commands as written.
pub(crate) const README_HOST: &str = "mirror.office";

/// Where dockerd 20.10 looks for a registry's (or mirror's) CA: `CERTS_D/HOST:PORT/ca.crt`.
/// `--config-file` does not move it.
const CERTS_D: &str = "/etc/docker/certs.d";

const PULL_DEADLINE: Duration = Duration::from_secs(120);

/// How long a daemon may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The tests

/// Pulls by digest and by tag, single-arch and multi-arch, through berth as a plain-HTTP
/// loopback mirror; then, with the upstream registry gone, removes every image and pulls them
/// all again from berth's cache.
#[test]
fn plain_http_mirror_pull_then_offline_repull() {
    let mut w = World::new("plain");
    w.start_berth(None);
    let mirror = format!("http://127.0.0.1:{}", w.berth().port);
    w.start_dockerd(json!({ "registry-mirrors": [mirror] }));
    let info = w.docker().info();
    assert_eq!(
        info["RegistryConfig"]["Mirrors"],
        json!([format!("{mirror}/")]),
        "dockerd did not take the mirror from daemon.json"
    );

    let imgs = w.images.clone();
    let single = &imgs.single;
    let multi = imgs.native(&w.docker().arch);
    let foreign = imgs.foreign(&w.docker().arch);

    // Online, by digest first (so the daemon has nothing yet and must fetch every blob).
    let mark = w.berth().mark();
    w.docker()
        .pull_expect(&format!("single@{}", single.manifest), single);
    let reqs = w.berth().requests_since(mark);
    assert_served(
        &reqs,
        "GET",
        &format!("/v2/library/single/manifests/{}", single.manifest),
    );
    assert_blobs_served(&reqs, "single", &single.blobs());
    assert_outcome(
        &reqs,
        &format!("/v2/library/single/blobs/{}", single.layers[1]),
        &["miss"],
    );

    let mark = w.berth().mark();
    w.docker().pull_expect("single:v1", single);
    assert_manifest_asked(&w.berth().requests_since(mark), "single", "v1");
    w.docker()
        .assert_repo_digest("single:v1", "single", &single.manifest);

    // The multi-arch index: the daemon must take its own platform and never touch the other.
    let mark = w.berth().mark();
    w.docker().pull_expect("multi:v1", multi);
    let reqs = w.berth().requests_since(mark);
    assert_manifest_asked(&reqs, "multi", "v1");
    assert_served(
        &reqs,
        "GET",
        &format!("/v2/library/multi/manifests/{}", multi.manifest),
    );
    // The base layer is shared with `single`, so the daemon already has it.
    assert_blobs_served(&reqs, "multi", &[&multi.config, &multi.layers[1]]);
    w.docker()
        .assert_repo_digest("multi:v1", "multi", &imgs.multi_index);

    // After `rmi` dockerd 20.10 may still hold the index and manifest in its containerd content
    // store (until containerd's GC runs), so only the blobs are sure to be asked for again.
    w.docker().rmi("multi:v1");
    let mark = w.berth().mark();
    w.docker()
        .pull_expect(&format!("multi@{}", imgs.multi_index), multi);
    assert_blobs_served(
        &w.berth().requests_since(mark),
        "multi",
        &[&multi.config, &multi.layers[1]],
    );

    let all = w.berth().requests_since(0);
    let native_blobs = multi.blobs();
    let foreign_only = foreign
        .blobs()
        .into_iter()
        .chain([&foreign.manifest])
        .filter(|b| !native_blobs.contains(b));
    for blob in foreign_only {
        assert!(
            !all.iter().any(|r| r.path.ends_with(blob.as_str())),
            "the daemon asked for {blob}, which belongs to the other platform's image"
        );
    }
    assert_no_server_errors(&all);
    // berth really went upstream, and kept what it fetched.
    w.assert_upstream_saw(&format!("/v2/library/single/blobs/{}", single.layers[1]));
    w.assert_cached(&single.blobs());
    w.assert_cached(&[&multi.config, &multi.layers[1]]);

    // Offline: the upstream is gone; the daemon forgets everything and pulls again.
    w.stop_upstream();
    w.docker().rmi_all();
    let mark = w.berth().mark();
    w.docker().pull_expect("single:v1", single);
    w.docker().pull_expect("multi:v1", multi);
    w.docker()
        .pull_expect(&format!("single@{}", single.manifest), single);
    w.docker()
        .pull_expect(&format!("multi@{}", imgs.multi_index), multi);
    let reqs = w.berth().requests_since(mark);
    assert_manifest_asked(&reqs, "single", "v1");
    assert_manifest_asked(&reqs, "multi", "v1");
    assert_blobs_served(&reqs, "single", &single.blobs());
    assert_blobs_served(&reqs, "multi", &[&multi.config, &multi.layers[1]]);
    for r in reqs.iter().filter(|r| r.path.starts_with("/v2/library/")) {
        assert!(
            r.status == 200 && (r.cache == "hit" || r.cache == "stale"),
            "offline, berth answered {} {} with status {} cache={}",
            r.method,
            r.path,
            r.status,
            r.cache
        );
    }
}

/// With `tag_ttl = 0` every tag lookup revalidates: after the upstream is gone and berth has
/// restarted (so nothing is left in its memory), a tag pull is served as `cache=stale` from disk.
#[test]
fn offline_repull_after_berth_restart_serves_stale_tags() {
    let mut w = World::new("stale");
    w.start_berth(Some("tag_ttl = \"0s\""));
    w.start_dockerd(
        json!({ "registry-mirrors": [format!("http://127.0.0.1:{}", w.berth().port)] }),
    );
    let imgs = w.images.clone();
    let single = &imgs.single;
    let multi = imgs.native(&w.docker().arch);
    w.docker().pull_expect("single:v1", single);
    w.docker().pull_expect("multi:v1", multi);

    w.stop_upstream();
    w.restart_berth();
    w.docker().rmi_all();
    let mark = w.berth().mark();
    w.docker().pull_expect("single:v1", single);
    w.docker().pull_expect("multi:v1", multi);
    let reqs = w.berth().requests_since(mark);
    for repo in ["single", "multi"] {
        let tag = format!("/v2/library/{repo}/manifests/v1");
        assert_manifest_asked(&reqs, repo, "v1");
        assert_outcome(&reqs, &tag, &["stale"]);
    }
    assert_blobs_served(&reqs, "single", &single.blobs());
    assert_blobs_served(&reqs, "multi", &[&multi.config, &multi.layers[1]]);
    assert_no_server_errors(&reqs);
}

/// A mirror under a name that is not a loopback address, listed in both `registry-mirrors`
/// (with its `http://` scheme) and `insecure-registries`.
#[test]
fn hostname_mirror_listed_in_insecure_registries() {
    let mut w = World::new("insecure");
    w.map_mirror_host();
    w.start_berth(None);
    let host = format!("{MIRROR_HOST}:{}", w.berth().port);
    w.start_dockerd(json!({
        "registry-mirrors": [format!("http://{host}")],
        "insecure-registries": [host],
    }));
    let info = w.docker().info();
    let insecure = info["RegistryConfig"]["IndexConfigs"][&host]["Secure"].clone();
    assert_eq!(
        insecure,
        json!(false),
        "dockerd did not list {host} as insecure: {info}"
    );
    hostname_pull(&w);
}

/// The same name as a plain `http://` mirror alone: dockerd takes the scheme from the mirror
/// URL, so no `insecure-registries` entry is needed for plain HTTP.
#[test]
fn hostname_http_mirror_without_insecure_registries() {
    let mut w = World::new("hostonly");
    w.map_mirror_host();
    w.start_berth(None);
    let host = format!("{MIRROR_HOST}:{}", w.berth().port);
    w.start_dockerd(json!({ "registry-mirrors": [format!("http://{host}")] }));
    hostname_pull(&w);
}

/// A tag the upstream does not have: berth answers 404 (not a server error), and the pull fails
/// with dockerd's fallback to Docker Hub refused by the dead proxy, not with a hang.
#[test]
fn missing_tag_is_not_found() {
    let mut w = World::new("missing");
    w.start_berth(None);
    w.start_dockerd(
        json!({ "registry-mirrors": [format!("http://127.0.0.1:{}", w.berth().port)] }),
    );
    let mark = w.berth().mark();
    let o = w.docker().try_docker(&["pull", "single:nope"]);
    assert!(
        !o.status.success(),
        "pulling a missing tag succeeded:\n{}",
        o.stdout
    );
    let reqs = w.berth().requests_since(mark);
    let path = "/v2/library/single/manifests/nope";
    let asked: Vec<&Req> = reqs.iter().filter(|r| r.path == path).collect();
    assert!(
        !asked.is_empty(),
        "berth's log has no {path}:\n{}",
        show(&reqs)
    );
    for r in asked {
        assert_eq!(
            r.status, 404,
            "berth answered {} {path} with {}",
            r.method, r.status
        );
    }
    assert_no_server_errors(&reqs);
}

/// berth's TLS listener as an `https://` mirror, its CA in `/etc/docker/certs.d/HOST:PORT/`.
///
/// dockerd 20.10 adds 127.0.0.0/8 to the insecure registries whatever daemon.json says, and for
/// an insecure mirror it neither verifies the certificate nor reads certs.d. So the mirror's
/// name maps to ::1 only, where verification is on: without the CA the pull must fail at the
/// TLS handshake; with it the pull goes through. The plain listener is on 127.0.0.1, a port
/// dockerd is never told about, and every request must come from ::1, over TLS.
#[test]
fn tls_mirror_pull_with_berths_ca() {
    let mut w = World::new("tls");
    w.map_mirror_host6();
    let certs = w.dir.join("certs");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["certs", "--host", MIRROR_HOST6, "--out"])
            .arg(&certs),
        "berth certs",
        Duration::from_secs(60),
    );
    let tls_port = TcpListener::bind("[::1]:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port on ::1")
        .port();
    let tls_addr = format!("[::1]:{tls_port}");
    w.start_berth_with(BerthOpts {
        args: vec![
            "--tls-listen".into(),
            tls_addr.clone().into(),
            "--tls-cert".into(),
            certs.join("server.crt").into(),
            "--tls-key".into(),
            certs.join("server.key").into(),
        ],
        tls_addr: Some(tls_addr),
        ..BerthOpts::default()
    });
    let host = format!("{MIRROR_HOST6}:{tls_port}");
    let mirror = format!("https://{host}");
    w.start_dockerd(json!({ "registry-mirrors": [mirror] }));
    let info = w.docker().info();
    assert_eq!(
        info["RegistryConfig"]["Mirrors"],
        json!([format!("{mirror}/")]),
        "dockerd did not take the mirror from daemon.json"
    );
    assert!(
        info["RegistryConfig"]["IndexConfigs"].get(&host).is_none(),
        "dockerd lists {host} among its index configs (insecure?): {info}"
    );

    // No CA yet: dockerd must refuse berth's certificate, so berth serves nothing.
    let handshake_failed = "TLS handshake failed";
    let mark = w.berth().mark();
    let failed_before = w.berth().log_count(handshake_failed);
    let o = w.docker().try_docker(&["pull", "single:v1"]);
    assert!(
        !o.status.success(),
        "the pull succeeded although dockerd has no CA for {host}:\n{}",
        o.stdout
    );
    let reqs = w.berth().requests_since(mark);
    assert!(
        reqs.is_empty(),
        "berth served requests although dockerd should have rejected its certificate:\n{}",
        show(&reqs)
    );
    assert!(
        w.berth().log_count(handshake_failed) > failed_before,
        "berth logged no `{handshake_failed}` for dockerd's untrusting pull; berth's log:\n{}",
        w.berth().log_tail()
    );

    // With berth's CA where dockerd reads it.
    w.ca = Some(CertsDEntry::add(&host, &certs.join("ca.crt")));
    let failed_before = w.berth().log_count(handshake_failed);
    let imgs = w.images.clone();
    let multi = imgs.native(&w.docker().arch);
    let mark = w.berth().mark();
    w.docker().pull_expect("single:v1", &imgs.single);
    w.docker().pull_expect("multi:v1", multi);
    let reqs = w.berth().requests_since(mark);
    assert_manifest_asked(&reqs, "single", "v1");
    assert_manifest_asked(&reqs, "multi", "v1");
    assert_served(
        &reqs,
        "GET",
        &format!("/v2/library/single/manifests/{}", imgs.single.manifest),
    );
    assert_blobs_served(&reqs, "single", &imgs.single.blobs());
    assert_blobs_served(&reqs, "multi", &[&multi.config, &multi.layers[1]]);
    for r in &reqs {
        assert_eq!(
            r.client, "::1",
            "{} {} came from {}, not over the TLS listener on ::1",
            r.method, r.path, r.client
        );
    }
    assert_no_server_errors(&reqs);
    assert_eq!(
        w.berth().log_count(handshake_failed),
        failed_before,
        "TLS handshakes failed with the CA in place; berth's log:\n{}",
        w.berth().log_tail()
    );
    w.assert_cached(&imgs.single.blobs());
}

/// `docker login`, `docker push` and `docker pull` against berth's private namespace, over
/// berth's plain listener on 127.0.0.1 (insecure by default in dockerd). The image pushed is one
/// dockerd pulled through berth as a mirror; the upstream never hears of `private/`.
#[test]
fn private_push_and_pull_with_docker_login() {
    let mut w = World::new("private");
    let htpasswd = w.dir.join("htpasswd");
    let password = "alice-s3cret";
    let o = run_input(
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["user", "add", "alice", "--htpasswd"])
            .arg(&htpasswd)
            .arg("--password-stdin"),
        "berth user add",
        Duration::from_secs(60),
        Some(format!("{password}\n").as_bytes()),
    );
    assert!(
        o.status.success(),
        "berth user add failed ({}):\n{}\n{}",
        o.status,
        o.stdout,
        o.stderr
    );
    // One berth is both: the mirror of a daemon that has no credentials for it (berth's
    // anonymous tokens let dockerd through its `/v2/` probe), and the private registry that
    // `docker login` and `docker push` talk to.
    w.start_berth_with(BerthOpts {
        args: vec![
            "--private-ns".into(),
            "private".into(),
            "--htpasswd".into(),
            htpasswd.into(),
        ],
        ..BerthOpts::default()
    });
    let host = format!("127.0.0.1:{}", w.berth().port);
    w.start_dockerd(json!({ "registry-mirrors": [format!("http://{host}")] }));
    let single = w.images.single.clone();
    let mark = w.berth().mark();
    w.docker().pull_expect("single:v1", &single);
    let reqs = w.berth().requests_since(mark);
    assert!(
        reqs.iter()
            .any(|r| r.path.contains("/manifests/") && r.status == 200),
        "the anonymous mirror pull did not go through berth:\n{}",
        show(&reqs)
    );

    let mark = w.berth().mark();
    w.docker().docker_input_ok(
        &["login", &host, "-u", "alice", "--password-stdin"],
        Some(format!("{password}\n").as_bytes()),
    );
    let reqs = w.berth().requests_since(mark);
    assert!(
        reqs.iter().any(|r| r.path == "/v2/" && r.status == 200),
        "berth's log has no `/v2/` answered 200 for docker login:\n{}",
        show(&reqs)
    );
    let config = w.docker().cli_config.join("config.json");
    let config: Value =
        serde_json::from_slice(&fs::read(&config).expect("docker login wrote no config.json"))
            .expect("config.json is JSON");
    assert!(
        config["auths"].get(&host).is_some(),
        "docker login stored no credentials for {host}: {config}"
    );

    let app = format!("{host}/private/app:1");
    w.docker().docker_ok(&["tag", "single:v1", &app]);
    let mark = w.berth().mark();
    w.docker().docker_ok(&["push", &app]);
    let reqs = w.berth().requests_since(mark);
    assert!(
        reqs.iter().any(|r| r.method == "PUT"
            && r.path == "/v2/private/app/manifests/1"
            && r.status == 201),
        "berth's log has no `PUT /v2/private/app/manifests/1` answered 201:\n{}",
        show(&reqs)
    );
    assert_no_server_errors(&reqs);

    // Forget every image, so the pull must fetch all of it from the private repository.
    w.docker().rmi_all();
    let mark = w.berth().mark();
    w.docker().pull_expect(&app, &single);
    let reqs = w.berth().requests_since(mark);
    assert!(
        reqs.iter()
            .any(|r| r.path == "/v2/private/app/manifests/1" && r.status == 200),
        "berth's log has no `/v2/private/app/manifests/1` answered 200:\n{}",
        show(&reqs)
    );
    // dockerd pushes the layers gzipped anew, so only the config (the image ID) keeps its
    // digest; the layers are the pushed ones, as many as the image has.
    assert_served(
        &reqs,
        "GET",
        &format!("/v2/private/app/blobs/{}", single.config),
    );
    let mut blobs: Vec<&str> = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/v2/private/app/blobs/"))
        .map(|r| r.path.as_str())
        .collect();
    blobs.sort();
    blobs.dedup();
    assert_eq!(
        blobs.len(),
        single.blobs().len(),
        "the pull fetched other blobs than the config and layers:\n{}",
        show(&reqs)
    );
    for r in reqs.iter().filter(|r| r.path.starts_with("/v2/private/")) {
        assert!(
            r.status == 200 && r.cache == "local",
            "berth answered {} {} with {} cache={}",
            r.method,
            r.path,
            r.status,
            r.cache
        );
    }
    assert_no_server_errors(&reqs);

    let log = fs::read_to_string(&w.upstream_log).unwrap_or_default();
    assert!(
        !log.contains("private/"),
        "the upstream heard of the private namespace:\n{log}"
    );
}

fn hostname_pull(w: &World) {
    let imgs = w.images.clone();
    let multi = imgs.native(&w.docker().arch);
    let mark = w.berth().mark();
    w.docker().pull_expect("single:v1", &imgs.single);
    w.docker().pull_expect("multi:v1", multi);
    let reqs = w.berth().requests_since(mark);
    assert_manifest_asked(&reqs, "single", "v1");
    assert_manifest_asked(&reqs, "multi", "v1");
    assert_blobs_served(&reqs, "single", &imgs.single.blobs());
    assert_no_server_errors(&reqs);
    w.assert_cached(&imgs.single.blobs());
}

// ---------------------------------------------------------------------------------------------
// Assertions on berth's request log

fn assert_served(reqs: &[Req], method: &str, path: &str) {
    assert!(
        reqs.iter()
            .any(|r| r.method == method && r.path == path && r.status == 200),
        "berth's log has no `{method} {path}` answered 200; it has:\n{}",
        show(reqs)
    );
}

/// The daemon asks for a tag with HEAD or GET; either must have been answered 200.
fn assert_manifest_asked(reqs: &[Req], repo: &str, tag: &str) {
    let path = format!("/v2/library/{repo}/manifests/{tag}");
    assert!(
        reqs.iter().any(|r| r.path == path && r.status == 200),
        "berth's log has no `{path}` answered 200; it has:\n{}",
        show(reqs)
    );
}

fn assert_blobs_served(reqs: &[Req], repo: &str, blobs: &[&String]) {
    for blob in blobs {
        assert_served(reqs, "GET", &format!("/v2/library/{repo}/blobs/{blob}"));
    }
}

fn assert_outcome(reqs: &[Req], path: &str, allowed: &[&str]) {
    let found: Vec<&Req> = reqs.iter().filter(|r| r.path == path).collect();
    assert!(
        !found.is_empty(),
        "berth's log has no `{path}`:\n{}",
        show(reqs)
    );
    for r in found {
        assert!(
            allowed.contains(&r.cache.as_str()),
            "berth answered {} {} with cache={} (expected one of {allowed:?})",
            r.method,
            r.path,
            r.cache
        );
    }
}

fn assert_no_server_errors(reqs: &[Req]) {
    let bad: Vec<&Req> = reqs.iter().filter(|r| r.status >= 500).collect();
    assert!(
        bad.is_empty(),
        "berth answered with server errors:\n{bad:#?}"
    );
}

fn show(reqs: &[Req]) -> String {
    reqs.iter()
        .map(|r| format!("  {} {} {} cache={}\n", r.method, r.path, r.status, r.cache))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The world: temp dir, upstream, berth, dockerd, hosts entry

pub(crate) struct World {
    // Dropped in this order (see Drop): every process before the temp dir.
    dockerd: Option<Dockerd>,
    berth: Option<Berth>,
    upstream: Option<Proc>,
    pub(crate) hosts: Option<HostsEntry>,
    pub(crate) ca: Option<CertsDEntry>,
    pub(crate) upstream_port: u16,
    upstream_log: PathBuf,
    berth_runs: usize,
    images: Images,
    tools: Tools,
    pub(crate) dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    _serial: MutexGuard<'static, ()>,
}

impl World {
    /// Checks the tools, writes the images, starts the upstream registry and seeds it.
    pub(crate) fn new(name: &str) -> World {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let tools = Tools::find();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("berth-docker-{name}-"))
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let images = Images::write(&dir.join("oci"));
        let mut w = World {
            dockerd: None,
            berth: None,
            upstream: None,
            hosts: None,
            ca: None,
            upstream_port: 0,
            berth_runs: 0,
            upstream_log: dir.join("upstream.log"),
            images,
            tools,
            dir,
            tmp: Some(tmp),
            _serial: serial,
        };
        w.start_upstream();
        w.seed_upstream();
        w
    }

    fn start_upstream(&mut self) {
        let port = free_port();
        let storage = self.dir.join("upstream-data");
        fs::create_dir_all(&storage).unwrap();
        let config = self.dir.join("upstream.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&self.tools.registry);
        cmd.arg("serve").arg(&config);
        let mut p = Proc::spawn(
            "docker-registry",
            &mut cmd,
            &self.upstream_log,
            &self.upstream_log,
        )
        .graceful(STOP_GRACE);
        let addr = format!("127.0.0.1:{port}");
        wait_for(
            "the upstream registry to answer /v2/",
            Duration::from_secs(30),
            || {
                p.assert_running();
                matches!(http("GET", &addr, "/v2/", &[]), Ok(r) if r.status == 200).then_some(())
            },
        );
        self.upstream = Some(p);
        self.upstream_port = port;
    }

    /// `skopeo copy` each tag of the OCI layout to the upstream, digests preserved, and check
    /// the registry serves the digests computed here.
    fn seed_upstream(&mut self) {
        let policy = self.dir.join("policy.json");
        fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        let layout = self.dir.join("oci");
        for (tag, repo, all) in [("single", "single", false), ("multi", "multi", true)] {
            let mut cmd = Command::new(&self.tools.skopeo);
            cmd.arg("--policy")
                .arg(&policy)
                .args([
                    "copy",
                    "--quiet",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                ])
                .args(["--dest-no-creds"]);
            if all {
                cmd.arg("--all");
            }
            cmd.arg(format!("oci:{}:{tag}", layout.display()))
                .arg(format!(
                    "docker://127.0.0.1:{}/library/{repo}:v1",
                    self.upstream_port
                ));
            run_ok(&mut cmd, "skopeo copy", Duration::from_secs(120));
        }
        let addr = format!("127.0.0.1:{}", self.upstream_port);
        let accept = format!("{OCI_MANIFEST}, {OCI_INDEX}");
        for (repo, want) in [
            ("single", &self.images.single.manifest),
            ("multi", &self.images.multi_index),
        ] {
            let r = http(
                "HEAD",
                &addr,
                &format!("/v2/library/{repo}/manifests/v1"),
                &[("Accept", &accept)],
            )
            .expect("HEAD the seeded manifest");
            assert_eq!(r.status, 200, "the upstream has no library/{repo}:v1");
            assert_eq!(
                r.header("docker-content-digest"),
                Some(want.as_str()),
                "skopeo changed library/{repo}:v1 while copying"
            );
        }
    }

    fn stop_upstream(&mut self) {
        let mut p = self.upstream.take().expect("upstream running");
        p.stop(Duration::from_secs(10));
        let addr = format!("127.0.0.1:{}", self.upstream_port);
        assert!(
            TcpStream::connect(&addr).is_err(),
            "something still listens on the upstream's port {addr}"
        );
    }

    fn assert_upstream_saw(&self, path: &str) {
        let log = fs::read_to_string(&self.upstream_log).unwrap_or_default();
        assert!(
            log.contains(path),
            "the upstream's access log has no {path}:\n{log}"
        );
    }

    /// Starts berth on a free loopback port; `upstream_extra` is TOML added to the default
    /// upstream's table in a config file.
    fn start_berth(&mut self, upstream_extra: Option<&str>) {
        self.start_berth_with(BerthOpts {
            upstream_extra: upstream_extra.map(str::to_owned),
            ..BerthOpts::default()
        });
    }

    fn start_berth_with(&mut self, opts: BerthOpts) {
        let port = free_port();
        self.berth_runs += 1;
        let berth = Berth::start(
            &self.dir,
            self.berth_runs,
            port,
            &format!("http://127.0.0.1:{}", self.upstream_port),
            &opts,
        );
        self.berth = Some(berth);
    }

    /// Stops berth and starts it again on the same port and data dir.
    fn restart_berth(&mut self) {
        let opts = self.berth().opts.clone();
        self.restart_berth_with(opts);
    }

    /// Stops berth and starts it again on the same port and data dir, with `opts`.
    fn restart_berth_with(&mut self, opts: BerthOpts) {
        let old = self.berth.take().expect("berth running");
        let port = old.port;
        drop(old);
        let addr = format!("127.0.0.1:{port}");
        wait_for(
            "berth's old port to be free",
            Duration::from_secs(10),
            || TcpListener::bind(&addr).ok().map(drop),
        );
        self.berth_runs += 1;
        self.berth = Some(Berth::start(
            &self.dir,
            self.berth_runs,
            port,
            &format!("http://127.0.0.1:{}", self.upstream_port),
            &opts,
        ));
    }

    fn berth(&self) -> &Berth {
        self.berth.as_ref().expect("berth running")
    }

    pub(crate) fn start_dockerd(&mut self, daemon_json: Value) {
        self.dockerd = Some(Dockerd::start(&self.tools, &self.dir, daemon_json));
    }

    pub(crate) fn docker(&self) -> &Dockerd {
        self.dockerd.as_ref().expect("dockerd running")
    }

    fn map_mirror_host(&mut self) {
        self.hosts = Some(HostsEntry::add("127.0.0.1", MIRROR_HOST));
    }

    /// Maps [`MIRROR_HOST6`] to ::1 alone, checking first that ::1 can be listened on.
    fn map_mirror_host6(&mut self) {
        TcpListener::bind("[::1]:0").expect(
            "the TLS test needs IPv6 loopback (::1): dockerd treats every 127.0.0.0/8 address \
             as an insecure registry and would not verify berth's certificate there",
        );
        self.hosts = Some(HostsEntry::add("::1", MIRROR_HOST6));
    }

    /// Every digest has a file of that name somewhere under berth's `cache/blobs`.
    fn assert_cached(&self, digests: &[&String]) {
        let root = self.berth().data.join("cache").join("blobs");
        let mut names = Vec::new();
        walk(&root, &mut names);
        for d in digests {
            let hex = d.strip_prefix("sha256:").unwrap();
            assert!(
                names.iter().any(|n| n == hex),
                "{d} is not under {}; found {names:?}",
                root.display()
            );
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        drop(self.dockerd.take());
        drop(self.berth.take());
        drop(self.upstream.take());
        drop(self.hosts.take());
        drop(self.ca.take());
        if let Some(tmp) = self.tmp.take() {
            if std::env::var_os("BERTH_INTEROP_KEEP").is_some() {
                eprintln!("interop docker: keeping {}", tmp.keep().display());
                return;
            }
            let path = tmp.path().to_path_buf();
            if let Err(e) = tmp.close() {
                eprintln!("interop docker: could not remove {}: {e}", path.display());
            }
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tools

struct Tools {
    dockerd: PathBuf,
    docker: PathBuf,
    registry: PathBuf,
    skopeo: PathBuf,
}

impl Tools {
    fn find() -> Tools {
        let uid = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            })
            .unwrap_or_default();
        assert_eq!(uid, "0", "the docker tests run dockerd, which need root");
        let tools = Tools {
            dockerd: find_tool("dockerd", "docker.io"),
            docker: find_tool("docker", "docker.io"),
            registry: find_tool("docker-registry", "docker-registry"),
            skopeo: find_tool("skopeo", "skopeo"),
        };
        // dockerd starts these itself; name their packages now rather than fail obscurely later.
        find_tool("containerd", "containerd");
        find_tool("runc", "runc");
        tools
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs a command to completion, killing it (and failing) at the deadline.
fn run(cmd: &mut Command, what: &str, deadline: Duration) -> Output {
    run_input(cmd, what, deadline, None)
}

/// [`run`], with `input` written to the command's stdin (then closed).
fn run_input(cmd: &mut Command, what: &str, deadline: Duration, input: Option<&[u8]>) -> Output {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(input)
            .unwrap_or_else(|e| panic!("writing to {what}'s stdin: {e}"));
    }
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn run_ok(cmd: &mut Command, what: &str, deadline: Duration) -> String {
    let o = run(cmd, what, deadline);
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        o.stdout,
        o.stderr
    );
    o.stdout
}

// ---------------------------------------------------------------------------------------------
// berth

struct Berth {
    proc: Proc,
    port: u16,
    data: PathBuf,
    opts: BerthOpts,
}

/// Flags for `berth serve` beyond the plain listener, data dir and upstream.
#[derive(Clone, Debug, Default)]
struct BerthOpts {
    /// TOML added to the default upstream's table in a config file.
    upstream_extra: Option<String>,
    args: Vec<std::ffi::OsString>,
    /// Also wait until this address accepts TCP connections (the TLS listener).
    tls_addr: Option<String>,
}

/// One request line from berth's log.
#[derive(Debug)]
struct Req {
    client: String,
    method: String,
    path: String,
    status: u16,
    cache: String,
}

impl Berth {
    /// Starts berth on 127.0.0.1:`port` with its data in `dir/berth-data` and its log in
    /// `dir/berth-RUN.log`.
    fn start(dir: &Path, run: usize, port: u16, upstream: &str, opts: &BerthOpts) -> Berth {
        let data = dir.join("berth-data");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data)
            .args(["--upstream", upstream])
            .env("BERTH_LOG", "info")
            .env("NO_COLOR", "1")
            .args(&opts.args);
        if let Some(extra) = &opts.upstream_extra {
            let config = dir.join("berth.toml");
            fs::write(
                &config,
                format!("[upstreams.\"docker.io\"]\nurl = \"{upstream}\"\n{extra}\n"),
            )
            .unwrap();
            cmd.arg("--config").arg(config);
        }
        let log = dir.join(format!("berth-{run}.log"));
        let mut proc = Proc::spawn("berth", &mut cmd, &log, &log).graceful(STOP_GRACE);
        let addr = format!("127.0.0.1:{port}");
        // With an htpasswd file, `/v2/` asks for credentials: 401 is ready too.
        wait_for("berth to answer /v2/", Duration::from_secs(30), || {
            proc.assert_running();
            matches!(http("GET", &addr, "/v2/", &[]), Ok(r) if r.status == 200 || r.status == 401)
                .then_some(())
        });
        if let Some(tls) = &opts.tls_addr {
            wait_for("berth's TLS listener", Duration::from_secs(30), || {
                proc.assert_running();
                TcpStream::connect(tls).ok().map(drop)
            });
        }
        Berth {
            proc,
            port,
            data,
            opts: opts.clone(),
        }
    }

    /// The requests this run has logged, in order.
    fn requests(&self) -> Vec<Req> {
        fs::read_to_string(self.proc.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" request ") && l.contains(" path="))
            .map(|l| Req {
                client: field(l, "client").unwrap_or_default(),
                method: field(l, "method").unwrap_or_default(),
                path: field(l, "path").unwrap_or_default(),
                status: field(l, "status").and_then(|s| s.parse().ok()).unwrap_or(0),
                cache: field(l, "cache").unwrap_or_default(),
            })
            .collect()
    }

    /// How many lines of this run's log contain `needle`.
    fn log_count(&self, needle: &str) -> usize {
        fs::read_to_string(self.proc.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn log_tail(&self) -> String {
        tail(self.proc.log(), 30)
    }

    /// How many requests this run has logged so far.
    fn mark(&self) -> usize {
        self.requests().len()
    }

    fn requests_since(&self, mark: usize) -> Vec<Req> {
        self.requests().into_iter().skip(mark).collect()
    }
}

/// `key=value` or `key="value"` from a tracing text line.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.find('"').map(|end| quoted[..end].to_owned())
    } else {
        Some(rest.split_whitespace().next().unwrap_or("").to_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// dockerd

pub(crate) struct Dockerd {
    proc: Option<Proc>,
    root: PathBuf,
    sock: PathBuf,
    cli_config: PathBuf,
    docker: PathBuf,
    /// The daemon's platform architecture in OCI terms (amd64, arm64, ...).
    arch: String,
}

impl Dockerd {
    /// Starts a private dockerd under `dir/docker` and waits until its API answers.
    fn start(tools: &Tools, dir: &Path, mut daemon_json: Value) -> Dockerd {
        let root = dir.join("docker");
        let (data, exec) = (root.join("data"), root.join("exec"));
        let cli_config = root.join("cli");
        for d in [&data, &exec, &cli_config] {
            fs::create_dir_all(d).unwrap();
        }
        // Without this key dockerd 20.10 writes its trust key to /etc/docker/key.json.
        daemon_json["deprecated-key-path"] = json!(root.join("key.json"));
        let config = root.join("daemon.json");
        fs::write(&config, serde_json::to_vec_pretty(&daemon_json).unwrap()).unwrap();
        let sock = root.join("docker.sock");
        // Any fallback from the mirror to Docker Hub goes to a dead local proxy port, so it fails
        // at once and sends nothing off this machine; the mirror itself is reached directly.
        let dead_proxy = format!("http://127.0.0.1:{}", free_port());
        let mut cmd = Command::new(&tools.dockerd);
        cmd.env_clear()
            .env("PATH", search_path_env())
            .env("HOME", &root)
            .env("HTTP_PROXY", &dead_proxy)
            .env("HTTPS_PROXY", &dead_proxy)
            .env(
                "NO_PROXY",
                format!("localhost,127.0.0.1,::1,{MIRROR_HOST},{MIRROR_HOST6},{README_HOST}"),
            )
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(&data)
            .arg("--exec-root")
            .arg(&exec)
            .arg("--pidfile")
            .arg(root.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
            ]);
        let log = root.join("dockerd.log");
        let proc = Proc::spawn("dockerd", &mut cmd, &log, &log).graceful(STOP_GRACE);
        let mut d = Dockerd {
            proc: Some(proc),
            root,
            sock,
            cli_config,
            docker: tools.docker.clone(),
            arch: String::new(),
        };
        wait_for("dockerd's API", Duration::from_secs(60), || {
            d.proc.as_mut().unwrap().assert_running();
            let o = run(
                &mut d.cli(&["version", "--format", "{{.Server.Version}}"]),
                "docker version",
                Duration::from_secs(30),
            );
            o.status.success().then_some(())
        });
        let arch = d.info()["Architecture"].as_str().unwrap_or("").to_owned();
        d.arch = match arch.as_str() {
            "x86_64" => "amd64".into(),
            "aarch64" => "arm64".into(),
            other => other.into(),
        };
        d
    }

    /// The environment that points a `docker` command at this daemon with its own CLI config.
    pub(crate) fn client_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("DOCKER_CONFIG", self.cli_config.clone().into()),
            (
                "DOCKER_HOST",
                format!("unix://{}", self.sock.display()).into(),
            ),
        ]
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.docker);
        cmd.env_clear()
            .env("PATH", search_path_env())
            .env("HOME", &self.root)
            .env("DOCKER_CONFIG", &self.cli_config)
            .env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .args(args);
        cmd
    }

    fn try_docker(&self, args: &[&str]) -> Output {
        self.try_docker_input(args, None)
    }

    fn try_docker_input(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        run_input(
            &mut self.cli(args),
            &format!("docker {}", args.join(" ")),
            PULL_DEADLINE,
            input,
        )
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        self.docker_input_ok(args, None)
    }

    fn docker_input_ok(&self, args: &[&str], input: Option<&[u8]>) -> String {
        let what = format!("docker {}", args.join(" "));
        let o = self.try_docker_input(args, input);
        assert!(
            o.status.success(),
            "{what} failed ({}):\n{}\n{}\nthe end of dockerd's log:\n{}",
            o.status,
            o.stdout,
            o.stderr,
            tail(&self.root.join("dockerd.log"), 30)
        );
        o.stdout
    }

    fn info(&self) -> Value {
        serde_json::from_str(&self.docker_ok(&["info", "--format", "{{json .}}"]))
            .expect("docker info is JSON")
    }

    /// Pulls `reference` and checks the daemon now has it as the expected image.
    fn pull_expect(&self, reference: &str, img: &Img) {
        self.docker_ok(&["pull", reference]);
        let id = self.docker_ok(&["image", "inspect", "--format", "{{.Id}}", reference]);
        assert_eq!(
            id.trim(),
            img.config,
            "{reference} is not the expected image (the ID is the config's digest)"
        );
    }

    fn assert_repo_digest(&self, reference: &str, repo: &str, digest: &str) {
        let out = self.docker_ok(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            reference,
        ]);
        let digests: Vec<String> = serde_json::from_str(out.trim()).unwrap();
        assert!(
            digests.contains(&format!("{repo}@{digest}")),
            "{reference}'s RepoDigests are {digests:?}, without {repo}@{digest}"
        );
    }

    fn rmi(&self, reference: &str) {
        self.docker_ok(&["rmi", reference]);
    }

    /// Removes every image; the daemon keeps no layer either.
    fn rmi_all(&self) {
        let ids = self.docker_ok(&["images", "--all", "--quiet", "--no-trunc"]);
        let mut ids: Vec<&str> = ids.split_whitespace().collect();
        ids.sort();
        ids.dedup();
        if !ids.is_empty() {
            let mut args = vec!["rmi", "--force"];
            args.extend(ids);
            self.docker_ok(&args);
        }
        let left = self.docker_ok(&["images", "--all", "--quiet"]);
        assert!(left.trim().is_empty(), "images left after rmi: {left}");
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(30));
        }
        // dockerd stops its containerd; if dockerd was killed instead, do it here.
        let exec = self.root.join("exec");
        if let Ok(pid) = fs::read_to_string(exec.join("containerd").join("containerd.pid")) {
            let pid = pid.trim();
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*exec.to_string_lossy()) {
                eprintln!("interop docker: containerd {pid} outlived dockerd; killing it");
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        // dockerd bind-mounts its data root onto itself and unmounts it on a clean exit only.
        unmount_under(&self.root);
    }
}

/// Unmounts every mount point at or under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        eprintln!("interop docker: unmounting {}", p.display());
        let ok = Command::new("umount")
            .arg(&p)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /etc/hosts

/// A line mapping a name to an address in /etc/hosts, removed again when dropped.
pub(crate) struct HostsEntry {
    line: String,
}

const HOSTS: &str = "/etc/hosts";
const HOSTS_MARK: &str = "# added by berth interop_docker";

impl HostsEntry {
    pub(crate) fn add(ip: &str, name: &str) -> HostsEntry {
        let line = format!("{ip} {name} {HOSTS_MARK}");
        // A crashed earlier run may have left its line: one copy is enough.
        let mut hosts = strip_line(&fs::read_to_string(HOSTS).expect("read /etc/hosts"), &line);
        if !hosts.is_empty() && !hosts.ends_with('\n') {
            hosts.push('\n');
        }
        hosts.push_str(&line);
        hosts.push('\n');
        // Written in place: /etc/hosts may be a bind mount that a rename would not replace.
        fs::write(HOSTS, hosts).expect("write /etc/hosts (needs root)");
        HostsEntry { line }
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        match fs::read_to_string(HOSTS) {
            Ok(hosts) => {
                if let Err(e) = fs::write(HOSTS, strip_line(&hosts, &self.line)) {
                    eprintln!("interop docker: could not restore /etc/hosts: {e}");
                }
            }
            Err(e) => eprintln!("interop docker: could not read /etc/hosts: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /etc/docker/certs.d

/// `CERTS_D/HOST:PORT/ca.crt`, removed when dropped together with every directory this guard
/// created for it (deepest first, and only while empty).
pub(crate) struct CertsDEntry {
    file: PathBuf,
    created: Vec<PathBuf>,
}

impl CertsDEntry {
    pub(crate) fn add(host_port: &str, ca: &Path) -> CertsDEntry {
        let dir = Path::new(CERTS_D).join(host_port);
        let file = dir.join("ca.crt");
        assert!(
            !file.exists(),
            "{} already exists; remove it (a crashed run?) and retry",
            file.display()
        );
        // The ancestors that do not exist yet, outermost first.
        let mut created: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.exists())
            .map(Path::to_path_buf)
            .collect();
        created.reverse();
        // The guard exists before anything is created, so a failure half-way still cleans up.
        let guard = CertsDEntry {
            file: file.clone(),
            created,
        };
        for d in &guard.created {
            fs::create_dir(d)
                .unwrap_or_else(|e| panic!("create {} (needs root): {e}", d.display()));
        }
        fs::copy(ca, &file).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        guard
    }
}

impl Drop for CertsDEntry {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "interop docker: could not remove {}: {e}",
                    self.file.display()
                );
            }
        }
        for d in self.created.iter().rev() {
            if let Err(e) = fs::remove_dir(d) {
                eprintln!("interop docker: could not remove {}: {e}", d.display());
            }
        }
    }
}

fn strip_line(text: &str, line: &str) -> String {
    text.lines()
        .filter(|l| l.trim() != line)
        .map(|l| format!("{l}\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Images: an OCI layout written here, with real (tiny) gzipped tar layers

/// One platform image: digests of its manifest, config (= the image ID) and layers.
#[derive(Clone, Debug)]
struct Img {
    manifest: String,
    config: String,
    layers: Vec<String>,
}

impl Img {
    fn blobs(&self) -> Vec<&String> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }
}

#[derive(Clone, Debug)]
struct Images {
    /// `library/single:v1`: one amd64 manifest.
    single: Img,
    /// `library/multi:v1`: an index of amd64 and arm64 manifests.
    multi_index: String,
    multi: Vec<(String, Img)>,
}

impl Images {
    /// Writes the OCI layout with two tags: `single` (a manifest) and `multi` (an index).
    /// Layer 0 of every image is the same base layer; layer 1 is the image's own.
    fn write(dir: &Path) -> Images {
        let mut layout = Layout::new(dir);
        let base = layer(&[("base/", 0, 0), ("base/data.bin", 1, 48 << 10)]);
        let single = layout.image(
            "amd64",
            &base,
            &layer(&[("app/", 0, 0), ("app/single.bin", 2, 4 << 20)]),
        );
        let mut multi = Vec::new();
        for (arch, seed) in [("amd64", 3), ("arm64", 4)] {
            let own = layer(&[("app/", 0, 0), (&format!("app/{arch}.bin"), seed, 64 << 10)]);
            multi.push((arch.to_owned(), layout.image(arch, &base, &own)));
        }
        let manifests: Vec<Value> = multi
            .iter()
            .map(|(arch, img)| {
                json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": img.manifest,
                    "size": layout.size(&img.manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                })
            })
            .collect();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        }))
        .unwrap();
        let multi_index = layout.put(&index);
        layout.tag("single", OCI_MANIFEST, &single.manifest);
        layout.tag("multi", OCI_INDEX, &multi_index);
        layout.finish();
        Images {
            single,
            multi_index,
            multi,
        }
    }

    /// The multi-arch image's entry for the daemon's platform.
    fn native(&self, arch: &str) -> &Img {
        self.multi
            .iter()
            .find(|(a, _)| a == arch)
            .map(|(_, i)| i)
            .unwrap_or_else(|| panic!("no {arch} image in the test index"))
    }

    /// The multi-arch image's other entry, which the daemon must never fetch.
    fn foreign(&self, arch: &str) -> &Img {
        self.multi
            .iter()
            .find(|(a, _)| a != arch)
            .map(|(_, i)| i)
            .unwrap()
    }
}

struct Layout {
    dir: PathBuf,
    refs: Vec<Value>,
}

/// A layer: its gzipped bytes and the digest of the uncompressed tar (its diff ID).
struct Layer {
    gz: Vec<u8>,
    diff_id: String,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs").join("sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        }
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs")
            .join("sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
    }

    fn put(&mut self, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        fs::write(self.blob_path(&digest), bytes).unwrap();
        digest
    }

    fn size(&self, digest: &str) -> u64 {
        fs::metadata(self.blob_path(digest)).unwrap().len()
    }

    fn image(&mut self, arch: &str, base: &Layer, own: &Layer) -> Img {
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [base.diff_id, own.diff_id]},
        }))
        .unwrap();
        let config = self.put(&config);
        let layers = vec![self.put(&base.gz), self.put(&own.gz)];
        let layer_descs: Vec<Value> = layers
            .iter()
            .map(|d| json!({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": self.size(d)}))
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config, "size": self.size(&config)},
            "layers": layer_descs,
        }))
        .unwrap();
        Img {
            manifest: self.put(&manifest),
            config,
            layers,
        }
    }

    fn tag(&mut self, tag: &str, media_type: &str, digest: &str) {
        self.refs.push(json!({
            "mediaType": media_type,
            "digest": digest,
            "size": self.size(digest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }

    fn finish(&self) {
        let index = json!({"schemaVersion": 2, "manifests": self.refs});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

/// A layer from `(path, seed, size)` entries: a path ending in `/` is a directory, anything
/// else a file of `size` deterministic bytes.
fn layer(entries: &[(&str, u64, usize)]) -> Layer {
    let files: Vec<(String, Vec<u8>)> = entries
        .iter()
        .map(|&(path, seed, size)| {
            let data = if path.ends_with('/') {
                Vec::new()
            } else {
                pseudo_random(seed, size).to_vec()
            };
            (path.to_owned(), data)
        })
        .collect();
    let tar = oci::tar(&files);
    Layer {
        diff_id: sha256(&tar),
        gz: oci::gzip_stored(&tar),
    }
}
