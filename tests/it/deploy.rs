//! The files under `deploy/` parse and agree with berth: configs load, probes hit real routes,
//! client configs are valid JSON/TOML and point at berth.

use std::path::PathBuf;

use berth::config::Config;
use berth::oci::routes::Route;

fn path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn packaged_berth_toml_loads_with_and_without_tls() {
    let config = Config::from_file(&path("deploy/berth.toml")).unwrap();
    config.validate().unwrap();
    assert!(config.upstreams.contains_key("ghcr.io"));
    // The commented [tls] table is valid once uncommented.
    let text = read("deploy/berth.toml");
    let tls_at = text.find("# [tls]").expect("a commented [tls] table");
    let uncommented: String = text[tls_at..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let config = Config::from_toml(&format!("{}{}\n", &text[..tls_at], uncommented)).unwrap();
    config.validate().unwrap();
    assert_eq!(config.tls.unwrap().listen.port(), 5443);
}

/// The block scalar under `berth.toml: |` in the ConfigMap.
fn configmap_toml() -> String {
    block_scalar("deploy/k8s/configmap.yaml", "berth.toml")
}

/// The block scalar under `KEY: |` in a YAML file, unindented.
fn block_scalar(file: &str, key: &str) -> String {
    let yaml = read(file);
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    lines
        .next()
        .unwrap_or_else(|| panic!("{file}: a {key} key"));
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.get(4..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn k8s_configmap_matches_the_deployment() {
    let config = Config::from_toml(&configmap_toml()).unwrap();
    config.validate().unwrap();
    let deployment = read("deploy/k8s/deployment.yaml");
    let tls = config.tls.expect("[tls] in the ConfigMap");
    assert!(tls.cert.starts_with("/etc/berth/tls"));
    assert!(deployment.contains("mountPath: /etc/berth/tls"));
    assert!(deployment.contains("mountPath: /etc/berth/config"));
    assert!(deployment.contains("\"/etc/berth/config/berth.toml\""));
    assert!(deployment.contains(&format!("mountPath: {}", config.data_dir.display())));
    assert!(deployment.contains(&format!("containerPort: {}", config.listen.port())));
    assert!(deployment.contains(&format!("containerPort: {}", tls.listen.port())));
    for probe in ["/healthz", "/readyz"] {
        assert!(deployment.contains(&format!("path: {probe}")));
        assert!(Route::parse(probe).is_ok(), "{probe} is not a berth route");
    }
}

#[test]
fn docker_daemon_configs_are_json() {
    let tls: serde_json::Value =
        serde_json::from_str(&read("deploy/clients/docker/daemon.json")).unwrap();
    assert!(tls["registry-mirrors"][0]
        .as_str()
        .unwrap()
        .starts_with("https://"));
    let insecure: serde_json::Value =
        serde_json::from_str(&read("deploy/clients/docker/daemon-insecure.json")).unwrap();
    let mirror = insecure["registry-mirrors"][0].as_str().unwrap();
    let host = insecure["insecure-registries"][0].as_str().unwrap();
    assert_eq!(mirror, format!("http://{host}"));
}

#[test]
fn containerd_hosts_files_use_berth_with_a_ca() {
    for (ns, server) in [
        ("docker.io", "https://registry-1.docker.io"),
        ("ghcr.io", "https://ghcr.io"),
    ] {
        let file = format!("deploy/clients/containerd/certs.d/{ns}/hosts.toml");
        let v: toml::Value = toml::from_str(&read(&file)).unwrap();
        assert_eq!(v["server"].as_str(), Some(server), "{file}");
        let hosts = v["host"].as_table().unwrap();
        assert_eq!(hosts.len(), 1, "{file}");
        let (url, host) = hosts.iter().next().unwrap();
        assert!(url.starts_with("https://"), "{file}");
        assert!(host["ca"].as_str().unwrap().ends_with(".crt"), "{file}");
        // berth must know the upstream containerd names with ?ns=.
        let config = Config::from_file(&path("deploy/berth.toml")).unwrap();
        assert!(
            config.upstreams.contains_key(ns),
            "{ns} missing in berth.toml"
        );
    }
}

#[test]
fn podman_registries_conf_mirrors_docker_hub() {
    let v: toml::Value = toml::from_str(&read("deploy/clients/podman/registries.conf")).unwrap();
    let registry = &v["registry"][0];
    assert_eq!(registry["location"].as_str(), Some("docker.io"));
    assert!(registry["mirror"][0]["location"].as_str().is_some());
}

#[test]
fn certs_dir_ignores_everything_but_its_docs() {
    let ignore = read("certs/.gitignore");
    let rules: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(rules, ["*", "!.gitignore", "!README.md"]);
}

/// A shipped client file without its comment lines.
fn config_body(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

#[test]
fn clients_doc_quotes_the_shipped_client_files() {
    let doc = read("docs/clients.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .map(str::trim)
        .collect();
    for rel in [
        "deploy/clients/podman/registries.conf",
        "deploy/clients/containerd/certs.d/docker.io/hosts.toml",
        "deploy/clients/containerd/certs.d/ghcr.io/hosts.toml",
    ] {
        let body = config_body(&read(rel));
        assert!(
            blocks.contains(&body.as_str()),
            "docs/clients.md must quote {rel} in a ```toml block:\n{body}"
        );
    }
}

#[test]
fn the_dockerfile_dependency_layer_loads_from_the_manifest_alone() {
    // The recipe builds dependencies from Cargo.toml, Cargo.lock and a stub `src/` before it
    // copies the sources: the manifest must load without `tests/` or `benches/` (a `[[test]]`
    // whose path cargo has to infer breaks that layer).
    let dockerfile = read("deploy/Dockerfile");
    assert!(
        dockerfile.contains("COPY Cargo.toml Cargo.lock ./"),
        "the recipe no longer stages the manifest alone; update this test"
    );
    let stage = tempfile::tempdir().unwrap();
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(path(f), stage.path().join(f)).unwrap();
    }
    std::fs::create_dir(stage.path().join("src")).unwrap();
    std::fs::write(stage.path().join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(stage.path().join("src/lib.rs"), "").unwrap();
    // `cargo fetch` loads every target of the manifest as the build would, without compiling;
    // the dependencies are on this machine already (this test was built with them).
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    let out = std::process::Command::new(env!("CARGO"))
        .args(["fetch", "--locked", "--offline", "--target", &host])
        .current_dir(stage.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the dependency layer fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A replica's config: S3 storage, with the role's `evict`.
fn replica_storage(config: &Config) -> &berth::config::S3Config {
    match &config.storage {
        berth::config::StorageConfig::S3(s3) => s3,
        other => panic!("a replica stores in a bucket, not {other:?}"),
    }
}

#[test]
fn replica_configs_share_everything_but_evict() {
    for (evicting, other) in [
        (
            "deploy/replicas/berth.toml",
            "deploy/replicas/berth-replica.toml",
        ),
        ("k8s evict.toml", "k8s replica.toml"),
    ] {
        let load = |name: &str| match name.strip_prefix("k8s ") {
            Some(key) => {
                Config::from_toml(&block_scalar("deploy/k8s/replicas/configmap.yaml", key)).unwrap()
            }
            None => Config::from_file(&path(name)).unwrap(),
        };
        let (a, b) = (load(evicting), load(other));
        let (sa, sb) = (replica_storage(&a), replica_storage(&b));
        assert!(sa.evict && !sb.evict, "{evicting} evicts, {other} does not");
        assert_eq!(
            (&sa.bucket, &sa.endpoint, sa.prefix(), &sa.credentials_file),
            (&sb.bucket, &sb.endpoint, sb.prefix(), &sb.credentials_file),
            "{evicting} and {other} name one bucket"
        );
        assert!(
            a.public_url.is_some(),
            "{evicting}: tokens name the load balancer"
        );
        assert_eq!(format!("{:?}", a.public_url), format!("{:?}", b.public_url));
        assert_eq!(a.private_ns, b.private_ns);
    }
}

#[test]
fn the_load_balancers_route_to_the_replicas_they_are_shipped_with() {
    let nginx = read("deploy/replicas/nginx.conf");
    let compose = read("deploy/replicas/compose.yaml");
    for server in ["berth-1:5000", "berth-2:5000"] {
        assert!(nginx.contains(&format!("server {server}")), "{server}");
        let service = server.trim_end_matches(":5000");
        assert!(
            compose.contains(&format!("  {service}:\n")),
            "compose has {service}"
        );
    }
    assert!(nginx.contains("hash $berth_route consistent;"));
    // The Kubernetes load balancer runs the same routing, naming the StatefulSets' pods.
    let k8s = block_scalar("deploy/k8s/replicas/nginx.yaml", "nginx.conf");
    let routing = |conf: &str| -> String {
        conf.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("server ") && !l.starts_with('#') && !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let shipped_http = &nginx[nginx.find("http {").unwrap()..];
    let k8s_http = &k8s[k8s.find("http {").unwrap()..];
    assert_eq!(routing(shipped_http), routing(k8s_http));
    let sts = read("deploy/k8s/replicas/statefulsets.yaml");
    for pod in [
        "berth-evict-0.berth-evict",
        "berth-0.berth",
        "berth-1.berth",
    ] {
        assert!(k8s.contains(&format!("server {pod}:5000")), "{pod}");
    }
    assert!(sts.contains("name: berth-evict\n") && sts.contains("serviceName: berth\n"));
    for role in ["evict", "replica"] {
        assert!(sts.contains(&format!("/etc/berth/config/{role}.toml")));
    }
}
