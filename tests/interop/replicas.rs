//! Two berth replicas (the built binary) on one Garage bucket, behind nginx running the shipped
//! load-balancer config (`deploy/replicas/nginx.conf`): pulls fetched once for both, a push
//! through the load balancer pulled from either replica, cached pulls while the bucket is down,
//! and a replica killed mid-download leaving nothing partial while the other completes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::garage::Garage;
use crate::oci::{self, Artifact, LayerSpec};
use crate::procs::{self, find_tool, free_port, Berth, Proc, Registry, Skopeo};
use crate::pulls::{
    assert_fetched_once, assert_no_new_blob_gets, assert_pulled, expected_files, pull, pull_with,
    push,
};

const MIB: usize = 1 << 20;

/// nginx with `deploy/replicas/nginx.conf`, its replicas and port swapped for these, everything
/// else as shipped.
pub struct Nginx {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl Nginx {
    /// Listens on `addr`.
    pub fn start(dir: &Path, addr: SocketAddr, replicas: &[SocketAddr]) -> Nginx {
        let nginx = find_tool("nginx", "nginx");
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/replicas/nginx.conf"),
        )
        .expect("read deploy/replicas/nginx.conf");
        let root = dir.join("nginx");
        std::fs::create_dir_all(&root).expect("create nginx's dir");
        // nginx's workers run as an unprivileged user: they must reach their temp dirs.
        for d in [dir, root.as_path()] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .expect("open nginx's dir");
        }
        let servers: String = replicas
            .iter()
            .map(|r| format!("        server {r} max_fails=1 fail_timeout=10s;\n"))
            .collect();
        let mut conf = String::new();
        let mut servers_written = false;
        for line in shipped.lines() {
            let t = line.trim();
            if t.starts_with("server berth-") {
                if !servers_written {
                    conf.push_str(&servers);
                    servers_written = true;
                }
            } else if t == "listen 5000;" {
                conf.push_str(&format!("        listen {addr};\n"));
            } else if t == "http {" {
                let r = root.display();
                conf.push_str(&format!(
                    "http {{\n    access_log {r}/access.log;\n    client_body_temp_path {r}/body;\n    \
                     proxy_temp_path {r}/proxy;\n    fastcgi_temp_path {r}/fastcgi;\n    \
                     uwsgi_temp_path {r}/uwsgi;\n    scgi_temp_path {r}/scgi;\n"
                ));
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        assert!(servers_written, "the shipped config lists its replicas");
        let conf = format!(
            "daemon off;\npid {r}/nginx.pid;\nerror_log {r}/error.log;\n{conf}",
            r = root.display()
        );
        let path = root.join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let mut cmd = Command::new(nginx);
        cmd.arg("-p").arg(&root).arg("-c").arg(&path);
        let log = root.join("stderr");
        // SIGTERM first: nginx's master then stops its workers (a SIGKILL would orphan them,
        // still listening).
        let mut proc = Proc::spawn("nginx", &mut cmd, &log, &log).graceful(Duration::from_secs(5));
        proc.wait_ready(addr);
        Nginx { addr, _proc: proc }
    }
}

/// A berth config for one replica on the cluster's bucket.
fn replica_config(dir: &Path, name: &str, garage: &Garage, top: &str, evict: bool) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "{top}\n{}",
        garage.storage_toml("cluster", &format!("evict = {evict}\n"))
    );
    std::fs::write(&path, text).expect("write a replica's config");
    path
}

fn fsck(config: &Path, data_dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("fsck")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run berth fsck");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn image(seed: u64) -> Artifact {
    let layers: Vec<LayerSpec> = (0..3)
        .map(|i| LayerSpec {
            seed: seed + i,
            size: (2 + i as usize) * MIB,
            gzip: i != 2,
        })
        .collect();
    Artifact::Image(oci::image("amd64", &layers))
}

#[test]
fn replicas_on_one_bucket_fetch_once_share_pushes_and_serve_while_the_bucket_is_down() {
    procs::require_tools();
    let skopeo = Skopeo::new();
    let registry = Registry::start();
    let mut garage = Garage::start();
    let dir = TempDir::new().expect("temp dir");
    let ht = procs::htpasswd(dir.path(), "alice", "wonderland");
    let lb_port = free_port();
    let top = format!(
        "private_ns = [\"private\"]\nhtpasswd = \"{}\"\npublic_url = \"http://127.0.0.1:{lb_port}\"\n",
        ht.display()
    );
    let config_a = replica_config(dir.path(), "a", &garage, &top, true);
    let config_b = replica_config(dir.path(), "b", &garage, &top, false);
    let a = Berth::start_with(&registry.url(), &["--config", config_a.to_str().unwrap()]);
    let mut b = Berth::start_with(&registry.url(), &["--config", config_b.to_str().unwrap()]);
    let lb = SocketAddr::from(([127, 0, 0, 1], lb_port));
    let _nginx = Nginx::start(dir.path(), lb, &[a.addr, b.addr]);

    // Pulled through A, then through B: one upstream GET per blob for the two.
    let shared = image(0x9100);
    push(&skopeo, &registry, &shared, "shared", "v1");
    let want = expected_files(&shared, None);
    let before = registry.blob_gets().len();
    let first = pull(
        &skopeo,
        &format!("docker://{}/library/shared:v1", a.addr),
        false,
    );
    assert_pulled(first.path(), &want, "the pull through A");
    assert_fetched_once(
        &registry,
        before,
        "library/shared",
        &shared.distinct_blobs(),
    );
    a.settle();
    let before = registry.blob_gets().len();
    let second = pull(
        &skopeo,
        &format!("docker://{}/library/shared:v1", b.addr),
        false,
    );
    assert_pulled(second.path(), &want, "the pull through B");
    assert_no_new_blob_gets(&registry, before, "B's pull of what A fetched");
    b.settle();

    // Pushed through the load balancer, pulled back from each replica, byte for byte.
    let private = image(0x9200);
    let layout = TempDir::new().expect("layout dir");
    private.write_layout(layout.path(), "1");
    skopeo.copy(&[
        "--dest-tls-verify=false",
        "--preserve-digests",
        "--dest-creds",
        "alice:wonderland",
        &format!("oci:{}:1", layout.path().display()),
        &format!("docker://{lb}/private/app:1"),
    ]);
    for (name, replica) in [("A", &a), ("B", &b)] {
        let back = pull_with(
            &skopeo,
            &format!("docker://{}/private/app:1", replica.addr),
            &["--src-creds", "alice:wonderland"],
        );
        assert_pulled(
            back.path(),
            &expected_files(&private, None),
            &format!("the pushed image pulled from {name}"),
        );
    }

    // The bucket stops: what B holds locally is still served, without the upstream; what it
    // does not hold is fetched from the upstream and kept locally; requests that needed the
    // bucket are counted, and a WARN says why.
    let fresh = image(0x9400);
    push(&skopeo, &registry, &fresh, "fresh", "v1");
    garage.stop();
    let before = registry.blob_gets().len();
    let during = pull(
        &skopeo,
        &format!("docker://{}/library/shared:v1", b.addr),
        false,
    );
    assert_pulled(during.path(), &want, "B's pull while the bucket is down");
    assert_no_new_blob_gets(&registry, before, "B's pull while the bucket is down");
    let before = registry.blob_gets().len();
    let new = pull(
        &skopeo,
        &format!("docker://{}/library/fresh:v1", b.addr),
        false,
    );
    assert_pulled(
        new.path(),
        &expected_files(&fresh, None),
        "B's cold pull while the bucket is down",
    );
    assert_fetched_once(&registry, before, "library/fresh", &fresh.distinct_blobs());
    b.settle();
    let before = registry.blob_gets().len();
    let again = pull(
        &skopeo,
        &format!("docker://{}/library/fresh:v1", b.addr),
        false,
    );
    assert_pulled(
        again.path(),
        &expected_files(&fresh, None),
        "B's pull of it again",
    );
    assert_no_new_blob_gets(
        &registry,
        before,
        "B's second pull while the bucket is down",
    );
    assert!(b.is_running(), "B exited while the bucket was down");
    let metrics = Command::new("curl")
        .args(["-s", &format!("http://{}/metrics", b.addr)])
        .output()
        .expect("run curl");
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("berth_store_bucket_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no bucket error counter in:\n{metrics}"));
    assert!(errors > 0.0, "the failed bucket requests are counted");
    assert!(b.log().contains("bucket unreachable"), "a WARN says why");

    // Back up: the bucket holds only whole, verified content.
    garage.restart();
    let (code, out) = fsck(&config_b, &dir.path().join("fsck-data"));
    assert_eq!(code, Some(0), "berth fsck on the bucket: {out}");
    assert!(out.contains("0 corrupt"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_download_leaves_nothing_partial_and_the_other_completes() {
    use crate::support::{spawn_get, Fake};

    let fake = Fake::start().await;
    let mut garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let dir = TempDir::new().expect("temp dir");
    let config_a = replica_config(dir.path(), "a", &garage, "", true);
    let config_b = replica_config(dir.path(), "b", &garage, "", false);
    let (up, ca, cb) = (fake.url(), config_a.clone(), config_b.clone());
    let (replicas, nginx) = tokio::task::spawn_blocking(move || {
        let a = Berth::start_with(&up, &["--config", ca.to_str().unwrap()]);
        let b = Berth::start_with(&up, &["--config", cb.to_str().unwrap()]);
        let (aa, ba) = (a.addr, b.addr);
        let lb = SocketAddr::from(([127, 0, 0, 1], free_port()));
        ([a, b], Nginx::start(dir_path(&ca), lb, &[aa, ba]))
    })
    .await
    .unwrap();
    let [mut a, mut b] = replicas;

    // 8 MiB that the upstream sends up to 3 MiB, then holds.
    let (blob, digest, gate) = fake.add_gated_blob(0x9300, 8 * MIB, 3 * MIB);
    let url = format!("http://{}/v2/library/big/blobs/{digest}", nginx.addr);
    let first = spawn_get(&url, &[]);
    let writing = |r: &Berth| r.writing();
    crate::support::wait_for("a replica downloading", Duration::from_secs(30), || {
        fake.count("GET", &digest) == 1 && (writing(&a) || writing(&b))
    })
    .await;
    let (victim, survivor, victim_config) = if a.writing() {
        (&mut a, &mut b, &config_a)
    } else {
        (&mut b, &mut a, &config_b)
    };
    victim.kill();
    let cut = first.await.unwrap();
    assert!(
        cut.body.as_ref().map_or(true, |got| got.len() < blob.len()),
        "the client of the killed replica did not get a whole body"
    );

    // The client retries through the load balancer: the other replica completes it.
    fake.st().faults.remove(&digest);
    gate.notify_waiters();
    let retried = crate::support::send(http::Method::GET, &url, &[]).await;
    assert_eq!(retried.status, 200);
    assert!(retried.bytes() == blob, "the retried GET is byte-exact");
    let settled = survivor.data_dir();
    crate::support::wait_for(
        "the survivor's write to land",
        Duration::from_secs(30),
        || std::fs::read_dir(settled.join("tmp")).is_ok_and(|mut d| d.next().is_none()),
    )
    .await;

    // Nothing partial anywhere: the bucket checks clean, and the killed replica, restarted on
    // its data dir, serves the whole blob.
    let (cfg, data) = (
        victim_config.clone(),
        dir_path(victim_config).join("fsck-data"),
    );
    let (code, out) = tokio::task::spawn_blocking(move || fsck(&cfg, &data))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "berth fsck on the bucket: {out}");
    assert!(out.contains("0 corrupt"), "{out}");
    let (up, cfg, data) = (fake.url(), victim_config.clone(), victim.data_dir());
    let again = tokio::task::spawn_blocking(move || {
        Berth::start_on(&up, &data, &["--config", cfg.to_str().unwrap()])
    })
    .await
    .unwrap();
    let direct = crate::support::send(
        http::Method::GET,
        &format!("http://{}/v2/library/big/blobs/{digest}", again.addr),
        &[],
    )
    .await;
    assert!(
        direct.bytes() == blob,
        "the restarted replica serves the whole blob"
    );
    assert_eq!(
        fake.count("GET", &digest),
        2,
        "one upstream GET by the killed replica, one by the survivor, none by the restart"
    );
    garage.stop();
}

fn dir_path(config: &Path) -> &Path {
    config.parent().expect("a config in a dir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_cold_gets_through_the_load_balancer_fetch_once_and_all_complete() {
    use crate::support::{pseudo_random, spawn_get, Fake};

    let fake = Fake::start().await;
    let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let dir = TempDir::new().expect("temp dir");
    let config_a = replica_config(dir.path(), "a", &garage, "", true);
    let config_b = replica_config(dir.path(), "b", &garage, "", false);
    let (up, ca, cb) = (fake.url(), config_a.clone(), config_b.clone());
    let (_replicas, nginx) = tokio::task::spawn_blocking(move || {
        let a = Berth::start_with(&up, &["--config", ca.to_str().unwrap()]);
        let b = Berth::start_with(&up, &["--config", cb.to_str().unwrap()]);
        let lb = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let nginx = Nginx::start(dir_path(&ca), lb, &[a.addr, b.addr]);
        ([a, b], nginx)
    })
    .await
    .unwrap();
    // Larger than a multipart part, so the upload to the bucket is a multipart one.
    let blob = pseudo_random(0x9500, 40 * MIB);
    let digest = fake.add_blob(blob.clone());
    let url = format!("http://{}/v2/library/big/blobs/{digest}", nginx.addr);
    let clients: Vec<_> = (0..8).map(|_| spawn_get(&url, &[])).collect();
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        let mut replies = Vec::new();
        for c in clients {
            replies.push(c.await.unwrap());
        }
        replies
    })
    .await
    .expect("eight cold GETs through two S3 replicas finish (nothing wedges)");
    for r in &all {
        assert_eq!(r.status, 200);
        assert!(r.bytes() == blob, "byte-exact");
    }
    assert_eq!(
        fake.count("GET", &digest),
        1,
        "one upstream GET for the cluster"
    );
}
