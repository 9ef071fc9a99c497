//! Administration: access rules (who may pull, push, delete, administer which repositories, with
//! Basic credentials and with tokens), purges of mirrored content over the API, and the `berth
//! cache` commands.

use std::path::Path;

use base64::Engine as _;
use bytes::Bytes;
use http::Method;

use crate::support::*;

const PASSWORD: &str = "pw";

fn basic(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"))
    )
}

/// Users alice and bob (group team-a), carol (admin of everything) and dave (no rule).
const RULES: &str = r#"
[groups]
team-a = ["alice", "bob"]

[[access]]
groups = ["team-a"]
repositories = ["private/team-a/*"]
actions = ["pull", "push"]

[[access]]
users = ["alice"]
repositories = ["private/team-a/*"]
actions = ["delete"]

[[access]]
users = ["carol"]
repositories = ["*"]
actions = ["pull", "push", "delete", "admin"]
"#;

struct Env {
    b: Berth,
    up: Fake,
    _users: tempfile::TempDir,
}

impl Env {
    /// A berth with a `private` namespace, the four users, and `rules` (TOML) as its rules.
    async fn start(rules: &str) -> Env {
        let users = tempfile::tempdir().unwrap();
        let htpasswd = users.path().join("htpasswd");
        for u in ["alice", "bob", "carol", "dave"] {
            berth::auth::add_user(&htpasswd, u, PASSWORD, 4).unwrap();
        }
        let up = Fake::start().await;
        let parsed = berth::config::Config::from_toml(rules).unwrap();
        let b = Berth::start(&up, |c| {
            c.private_ns = vec!["private".into()];
            c.htpasswd = Some(htpasswd);
            c.groups = parsed.groups;
            c.access = parsed.access;
        })
        .await;
        Env {
            b,
            up,
            _users: users,
        }
    }

    async fn req(&self, method: Method, path: &str, user: &str) -> Reply {
        let auth = basic(user);
        send(
            method,
            &self.b.url(path),
            &[("authorization", auth.as_str())],
        )
        .await
    }

    async fn push_blob(&self, repo: &str, blob: &Bytes, user: &str) -> Reply {
        let auth = basic(user);
        send_body(
            Method::POST,
            &self.b.url(&format!(
                "/v2/{repo}/blobs/uploads/?digest={}",
                sha256(blob)
            )),
            &[("authorization", auth.as_str())],
            blob.clone(),
        )
        .await
    }

    async fn push_image(&self, repo: &str, tag: &str, image: &Image, user: &str) -> Reply {
        for blob in image.blobs() {
            let r = self.push_blob(repo, &blob, user).await;
            if r.status != 201 {
                return r;
            }
        }
        let auth = basic(user);
        send_body(
            Method::PUT,
            &self.b.url(&format!("/v2/{repo}/manifests/{tag}")),
            &[
                ("authorization", auth.as_str()),
                ("content-type", image.media_type),
            ],
            image.manifest.clone(),
        )
        .await
    }

    fn cache_has(&self, digest: &str) -> bool {
        let hex = digest.trim_start_matches("sha256:");
        self.b
            .dir
            .path()
            .join("cache/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists()
    }
}

fn assert_denied(r: &Reply, message: &str) {
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.error_code(), "DENIED");
    let error = &r.json()["errors"][0];
    assert_eq!(
        error["message"],
        format!("requested access to the resource is denied: {message}")
    );
    assert_eq!(error["detail"], message);
}

fn refused_by_rules(b: &Berth) -> u64 {
    b.running
        .as_ref()
        .unwrap()
        .app
        .auth
        .stats
        .refused_rule
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn rules_allow_and_deny_each_action_with_a_message_naming_it() {
    let e = Env::start(RULES).await;
    let image = Image::new(1, &[500]);
    // A team member pushes and pulls in the team's repositories.
    let r = e
        .push_image("private/team-a/app", "v1", &image, "bob")
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = e
        .req(Method::GET, "/v2/private/team-a/app/manifests/v1", "bob")
        .await;
    assert_eq!(r.status, 200);
    // Nowhere else, and not delete unless a rule says so.
    let r = e
        .push_image("private/team-b/app", "v1", &image, "bob")
        .await;
    assert_denied(&r, "bob may not push to private/team-b/app");
    let r = e
        .req(Method::GET, "/v2/private/team-a/app/manifests/v1", "dave")
        .await;
    assert_denied(&r, "dave may not pull from private/team-a/app");
    let path = format!("/v2/private/team-a/app/manifests/{}", image.digest);
    let r = e.req(Method::DELETE, &path, "bob").await;
    assert_denied(&r, "bob may not delete from private/team-a/app");
    assert_eq!(refused_by_rules(&e.b), 3);
    let r = e.req(Method::DELETE, &path, "alice").await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    // Admin is only what a rule grants: bob is refused a purge, carol may.
    e.up.add_image("library/alpine", "3.19", &Image::new(2, &[100]));
    assert_eq!(
        e.b.get("/v2/library/alpine/manifests/3.19").await.status,
        200
    );
    let r = e
        .req(Method::DELETE, "/v2/library/alpine/manifests/3.19", "bob")
        .await;
    assert_denied(&r, "bob may not administer (purge) library/alpine");
    let r = e
        .req(Method::DELETE, "/_berth/api/mirror/library/alpine", "dave")
        .await;
    assert_denied(&r, "dave may not administer (purge) library/alpine");
    assert_eq!(refused_by_rules(&e.b), 5);
    let metrics = e.b.get("/metrics").await;
    assert!(
        String::from_utf8_lossy(&metrics.bytes())
            .contains("berth_auth_refused_total{reason=\"rule\"} 5"),
        "the refusals are counted"
    );
    let r = e
        .req(Method::DELETE, "/v2/library/alpine/manifests/3.19", "carol")
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
}

#[tokio::test]
async fn without_rules_every_user_writes_the_private_namespace_and_nobody_purges() {
    let e = Env::start("").await;
    let image = Image::new(3, &[300]);
    for user in ["bob", "dave"] {
        let r = e.push_image("private/any/app", user, &image, user).await;
        assert_eq!(r.status, 201, "{user}: {:?}", r.body);
    }
    let r = e
        .req(
            Method::DELETE,
            &format!("/v2/private/any/app/manifests/{}", image.digest),
            "dave",
        )
        .await;
    assert_eq!(r.status, 202);
    e.up.add_image("library/alpine", "3.19", &Image::new(4, &[100]));
    assert_eq!(
        e.b.get("/v2/library/alpine/manifests/3.19").await.status,
        200
    );
    let r = e
        .req(Method::DELETE, "/v2/library/alpine/manifests/3.19", "carol")
        .await;
    assert_denied(&r, "carol may not administer (purge) library/alpine");
    // Anonymous: asked for credentials.
    let r = send(
        Method::DELETE,
        &e.b.url("/v2/library/alpine/manifests/3.19"),
        &[],
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .contains("repository:library/alpine:delete"));
}

#[tokio::test]
async fn a_token_grants_no_more_than_the_rules() {
    let e = Env::start(RULES).await;
    let token_for = |user: &'static str, scope: &'static str| {
        let e = &e;
        async move {
            let r = e
                .req(
                    Method::GET,
                    &format!("/auth/token?service=berth&scope={scope}"),
                    user,
                )
                .await;
            assert_eq!(r.status, 200);
            r.json()["token"].as_str().unwrap().to_owned()
        }
    };
    let image = Image::new(5, &[200]);
    let blob = image.layers[0].clone();
    // A monolithic blob push to `repo` with a token.
    let push_with = |token: String, repo: &'static str| {
        let url = e.b.url(&format!(
            "/v2/{repo}/blobs/uploads/?digest={}",
            sha256(&blob)
        ));
        let blob = blob.clone();
        async move {
            let bearer = format!("Bearer {token}");
            send_body(
                Method::POST,
                &url,
                &[("authorization", bearer.as_str())],
                blob,
            )
            .await
        }
    };
    // bob asks for push to team-b: the token does not grant it, and the push is refused.
    let t = token_for("bob", "repository:private/team-b/app:pull,push").await;
    let r = push_with(t, "private/team-b/app").await;
    assert_denied(&r, "bob may not push to private/team-b/app");
    // For team-a it does.
    let t = token_for("bob", "repository:private/team-a/app:pull,push,delete").await;
    let bearer = format!("Bearer {t}");
    let r = push_with(t.clone(), "private/team-a/app").await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // Delete was asked for but not granted: the rules refuse it.
    let r = send(
        Method::DELETE,
        &e.b.url(&format!("/v2/private/team-a/app/blobs/{}", sha256(&blob))),
        &[("authorization", bearer.as_str())],
    )
    .await;
    assert_denied(&r, "bob may not delete from private/team-a/app");
    // The token itself carries only what the rules allow: pull and push, no delete.
    let body = t.split('.').next().unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["g"],
        serde_json::json!({"repository:private/team-a/app": 3})
    );
    // carol's token for a purge works; a pull-only token of hers does not purge.
    e.up.add_image("library/alpine", "3.19", &Image::new(6, &[100]));
    assert_eq!(
        e.b.get("/v2/library/alpine/manifests/3.19").await.status,
        200
    );
    let t = token_for("carol", "repository:library/alpine:pull").await;
    let r = send(
        Method::DELETE,
        &e.b.url("/v2/library/alpine/manifests/3.19"),
        &[("authorization", format!("Bearer {t}").as_str())],
    )
    .await;
    assert_eq!(r.status, 401, "a pull token does not purge");
    let t = token_for("carol", "repository:library/alpine:delete").await;
    let r = send(
        Method::DELETE,
        &e.b.url("/v2/library/alpine/manifests/3.19"),
        &[("authorization", format!("Bearer {t}").as_str())],
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
}

/// An image whose layers are given (so two images can share one).
fn image_with(seed: u64, layers: Vec<Bytes>) -> Image {
    let config = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#
    ));
    let layer_json: Vec<_> = layers
        .iter()
        .map(|l| serde_json::json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": l.len(), "digest": sha256(l)}))
        .collect();
    let manifest = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": S2_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": sha256(&config)},
            "layers": layer_json,
        }))
        .unwrap(),
    );
    Image {
        digest: sha256(&manifest),
        manifest,
        media_type: S2_MANIFEST,
        config,
        layers,
    }
}

#[tokio::test]
async fn purging_a_tag_a_digest_and_a_repository() {
    let e = Env::start(RULES).await;
    let shared = pseudo_random(77, 4000);
    let a = image_with(10, vec![shared.clone(), pseudo_random(78, 3000)]);
    let b = image_with(11, vec![shared.clone()]);
    e.up.add_image("library/alpine", "3.19", &a);
    e.up.add_image("library/busybox", "1", &b);
    e.b.pull("library/alpine", "3.19", &a).await;
    e.b.pull("library/busybox", "1", &b).await;
    let gets = |path: &str| e.up.count("GET", path);

    // A tag: the resolution goes, the next pull asks the upstream again.
    let before = gets("/manifests/3.19");
    let r = e
        .req(Method::DELETE, "/v2/library/alpine/manifests/3.19", "carol")
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.json()["tags"], serde_json::json!(["3.19"]));
    assert!(e.cache_has(&a.digest), "a tag purge keeps the manifest");
    let r = e
        .req(Method::DELETE, "/v2/library/alpine/manifests/3.19", "carol")
        .await;
    assert_eq!(r.status, 404, "nothing left to purge");
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    e.b.pull("library/alpine", "3.19", &a).await;
    assert_eq!(
        gets("/manifests/3.19"),
        before + 1,
        "the next pull went upstream"
    );

    // A digest: its tags, the manifest and its own blobs go; the shared layer stays.
    let r = e
        .req(
            Method::DELETE,
            &format!("/v2/library/alpine/manifests/{}", a.digest),
            "carol",
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let report = r.json();
    assert_eq!(report["tags"], serde_json::json!(["3.19"]));
    assert_eq!(report["manifests"], serde_json::json!([a.digest]));
    let mut own = vec![sha256(&a.config), sha256(&a.layers[1])];
    own.sort();
    assert_eq!(report["blobs"], serde_json::json!(own));
    assert!(!e.cache_has(&a.digest));
    for d in &own {
        assert!(!e.cache_has(d), "{d} only a used");
    }
    assert!(
        e.cache_has(&sha256(&shared)),
        "busybox still uses the shared layer"
    );
    assert!(e.cache_has(&b.digest));
    // The memory cache forgot the manifest too: asked by digest, it comes from the upstream.
    let by_digest = gets(&format!("/manifests/{}", a.digest));
    let r =
        e.b.get(&format!("/v2/library/alpine/manifests/{}", a.digest))
            .await;
    assert_eq!(r.status, 200);
    assert_eq!(gets(&format!("/manifests/{}", a.digest)), by_digest + 1);
    let by_tag = gets("/manifests/3.19");
    let blob_gets = gets(&sha256(&a.layers[1]));
    e.b.pull("library/alpine", "3.19", &a).await;
    assert_eq!(
        gets("/manifests/3.19"),
        by_tag + 1,
        "the tag was fetched again"
    );
    assert_eq!(
        gets(&sha256(&a.layers[1])),
        blob_gets + 1,
        "the layer was fetched again"
    );

    // A whole repository, through the admin API: busybox's tag, manifest and config; the
    // shared layer stays while alpine's manifest (cached, untagged after this) lists it.
    let r = e
        .req(Method::DELETE, "/v2/library/alpine/manifests/3.19", "carol")
        .await;
    assert_eq!(r.status, 202);
    let r = e
        .req(Method::DELETE, "/_berth/api/mirror/busybox", "carol")
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let report = r.json();
    assert_eq!(report["repository"], "library/busybox");
    assert_eq!(report["tags"], serde_json::json!(["1"]));
    assert_eq!(report["manifests"], serde_json::json!([b.digest]));
    assert!(!e.cache_has(&b.digest));
    assert!(!e.cache_has(&sha256(&b.config)));
    assert!(
        e.cache_has(&sha256(&shared)),
        "alpine's manifest is still cached (only its tag went) and uses the layer"
    );
    let r = e
        .req(Method::DELETE, "/_berth/api/mirror/busybox", "carol")
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
    let manifests = gets("/library/busybox/manifests/1");
    e.b.pull("library/busybox", "1", &b).await;
    assert_eq!(gets("/library/busybox/manifests/1"), manifests + 1);
    // Anonymous and non-admin callers of the admin API are refused.
    let r = send(Method::DELETE, &e.b.url("/_berth/api/mirror/busybox"), &[]).await;
    assert_eq!(r.status, 401);
    assert!(!r.header("www-authenticate").is_empty());
}

#[tokio::test]
async fn purging_an_index_takes_its_children_but_not_what_another_index_uses() {
    let e = Env::start(RULES).await;
    let (amd, arm) = (Image::new(20, &[1000]), Image::new(21, &[1000]));
    let (list, list_digest) = index_of(&[&amd, &arm]);
    let (other, other_digest) = index_of(&[&arm]);
    e.up.add_image("library/app", "amd", &amd);
    e.up.add_image("library/app", "arm", &arm);
    e.up.add_manifest("library/app", "multi", list.clone(), S2_LIST);
    e.up.add_manifest("library/app", &list_digest, list, S2_LIST);
    e.up.add_manifest("library/other", "multi", other.clone(), S2_LIST);
    e.up.add_manifest("library/other", &other_digest, other, S2_LIST);
    let accept = [("accept", S2_LIST)];
    for (repo, reference) in [("library/app", "multi"), ("library/other", "multi")] {
        let r =
            e.b.get_with(&format!("/v2/{repo}/manifests/{reference}"), &accept)
                .await;
        assert_eq!(r.status, 200);
    }
    e.b.pull("library/app", &amd.digest, &amd).await;
    e.b.pull("library/app", &arm.digest, &arm).await;
    let r = e
        .req(
            Method::DELETE,
            &format!("/v2/library/app/manifests/{list_digest}"),
            "carol",
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let mut gone = vec![list_digest.clone(), amd.digest.clone()];
    gone.sort();
    assert_eq!(r.json()["manifests"], serde_json::json!(gone));
    assert!(!e.cache_has(&sha256(&amd.layers[0])));
    assert!(e.cache_has(&arm.digest), "the other index still lists arm");
    assert!(e.cache_has(&sha256(&arm.layers[0])));
    assert!(e.cache_has(&other_digest));
}

/// Runs the built binary with `args`, `BERTH_PASSWORD` set; returns (status, stdout, stderr).
/// Async: the berth it talks to runs on this test's runtime.
async fn berth_cli(args: &[&str], password: Option<&str>) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args(args)
        .env_remove("BERTH_PASSWORD")
        .stdin(std::process::Stdio::null());
    if let Some(p) = password {
        cmd.env("BERTH_PASSWORD", p);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("berth exits within a minute")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_config(dir: &Path, data_dir: &Path) -> String {
    let path = dir.join("berth.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\nprivate_ns = [\"private\"]\n",
            data_dir.to_str().unwrap()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn cache_commands_list_measure_and_remove() {
    let e = Env::start(RULES).await;
    let a = image_with(30, vec![pseudo_random(31, 5000)]);
    let b = image_with(32, vec![pseudo_random(33, 7000)]);
    e.up.add_image("library/alpine", "3.19", &a);
    e.up.add_image("library/alpine", "3.20", &b);
    e.b.pull("library/alpine", "3.19", &a).await;
    e.b.pull("library/alpine", "3.20", &b).await;
    let private = Image::new(34, &[900]);
    assert_eq!(
        e.push_image("private/team-a/app", "v1", &private, "carol")
            .await
            .status,
        201
    );
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), e.b.dir.path());

    // ls: repositories, tags with sizes (a manifest's blobs) and last pull.
    let (code, out, err) = berth_cli(&["cache", "ls", "--config", &config, "--bytes"], None).await;
    assert_eq!(code, 0, "{err}");
    let size_a = a.manifest.len() + a.blobs().iter().map(Bytes::len).sum::<usize>();
    let line = out
        .lines()
        .find(|l| l.contains("\t3.19\t"))
        .unwrap_or_default();
    assert!(
        line.starts_with(&format!(
            "docker.io/library/alpine\t3.19\t{}\t{size_a}\t20",
            a.digest
        )),
        "repository, tag, digest, size and a last pull: {out}"
    );
    let (code, out, _) = berth_cli(&["cache", "ls", "--config", &config, "alpine"], None).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "header and two tags: {out}");
    let (code, out, _) = berth_cli(
        &["cache", "ls", "--config", &config, "library/nothing"],
        None,
    )
    .await;
    assert_eq!(code, 0);
    assert!(!out.contains("alpine"), "{out}");

    // du: totals.
    let (code, out, err) = berth_cli(&["cache", "du", "--config", &config, "--bytes"], None).await;
    assert_eq!(code, 0, "{err}");
    let mirrored: usize = [&a, &b]
        .iter()
        .map(|i| i.manifest.len() + i.blobs().iter().map(Bytes::len).sum::<usize>())
        .sum();
    assert!(
        out.contains(&format!("mirrored\t{mirrored}\t6 blobs")),
        "{out}"
    );
    assert!(out.contains(&format!("  docker.io\t{mirrored}\n")), "{out}");
    let private_bytes =
        private.manifest.len() + private.blobs().iter().map(Bytes::len).sum::<usize>();
    assert!(
        out.contains(&format!("private\t{private_bytes}\t3 blobs")),
        "{out}"
    );

    // rm, against the running berth: a tag, then the whole repository.
    let url = e.b.url("");
    let (code, _, err) = berth_cli(
        &["cache", "rm", "--url", &url, "--user", "bob", "alpine:3.19"],
        Some(PASSWORD),
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        err.contains("bob may not administer (purge) alpine"),
        "{err}"
    );
    let (code, out, err) = berth_cli(
        &[
            "cache",
            "rm",
            "--url",
            &url,
            "--user",
            "carol",
            "alpine:3.19",
        ],
        Some(PASSWORD),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tag library/alpine:3.19"), "{out}");
    // The whole repository: the other tag, its manifest and blobs; a's manifest is untagged
    // now, so not the repository's any more.
    let (code, out, err) = berth_cli(
        &[
            "cache", "rm", "--url", &url, "--user", "carol", "--all", "alpine",
        ],
        Some(PASSWORD),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tag library/alpine:3.20"), "{out}");
    assert!(out.contains(&format!("manifest {}", b.digest)), "{out}");
    assert!(
        out.contains(&format!("blob {}", sha256(&b.layers[0]))),
        "{out}"
    );
    assert!(!e.cache_has(&b.digest));
    assert!(e.cache_has(&a.digest));
    let (code, out, err) = berth_cli(
        &[
            "cache",
            "rm",
            "--url",
            &url,
            "--user",
            "carol",
            &format!("alpine@{}", a.digest),
        ],
        Some(PASSWORD),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("manifest {}", a.digest)), "{out}");
    assert!(!e.cache_has(&a.digest));
    let (code, _, err) = berth_cli(
        &[
            "cache", "rm", "--url", &url, "--user", "carol", "--all", "alpine",
        ],
        Some(PASSWORD),
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("NAME_UNKNOWN"), "{err}");
    let (code, out, _) = berth_cli(&["cache", "ls", "--config", &config], None).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "only the header is left: {out}");
}

#[tokio::test]
async fn a_mount_needs_pull_on_its_source_under_the_rules() {
    let e = Env::start(RULES).await;
    let secret = pseudo_random(40, 700);
    let d = sha256(&secret);
    let r = e.push_blob("private/team-b/app", &secret, "carol").await;
    assert_eq!(r.status, 201);
    let mount = |from: &str| format!("/v2/private/team-a/app/blobs/uploads/?mount={d}&from={from}");
    // bob may not pull team-b: no mount, an upload session instead; nor without `from`.
    for path in [
        mount("private/team-b/app"),
        format!("/v2/private/team-a/app/blobs/uploads/?mount={d}"),
    ] {
        let r = e.req(Method::POST, &path, "bob").await;
        assert_eq!(r.status, 202, "{path}: {:?}", r.body);
    }
    let r = e
        .req(
            Method::GET,
            &format!("/v2/private/team-a/app/blobs/{d}"),
            "bob",
        )
        .await;
    assert_eq!(r.status, 404, "nothing was mounted");
    // From a repository bob may pull, the mount works.
    let r = e.push_blob("private/team-a/lib", &secret, "carol").await;
    assert_eq!(r.status, 201);
    let r = e
        .req(Method::POST, &mount("private/team-a/lib"), "bob")
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_starts_a_warm_up_over_the_api() {
    let e = Env::start(RULES).await;
    let img = Image::new(8, &[300, 500]);
    e.up.add_image("library/alpine", "3.20", &img);
    let path = "/_berth/api/warm/alpine?reference=3.20";
    // Not an admin: refused, naming what is missing; nothing fetched.
    assert_denied(
        &e.req(Method::POST, path, "alice").await,
        "alice may not administer (purge) alpine",
    );
    let r = send(Method::POST, &e.b.url(path), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(e.up.count("GET", "/blobs/"), 0);
    // A bad platform is refused before anything starts.
    let r = e
        .req(Method::POST, &format!("{path}&platform=linux"), "carol")
        .await;
    assert_eq!(r.status, 405, "{:?}", r.body);
    // The admin: 202 at once, then the image lands in the cache.
    let r = e.req(Method::POST, path, "carol").await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.json()["repository"], "alpine");
    assert_eq!(r.json()["reference"], "3.20");
    wait_for(
        "the warmed blobs",
        std::time::Duration::from_secs(10),
        || img.blobs().iter().all(|b| e.cache_has(&sha256(b))),
    )
    .await;
    e.b.settle().await;
    // A pull now is all hits: no more upstream GETs.
    let before = e.up.count("GET", "/");
    e.b.pull("alpine", "3.20", &img).await;
    assert_eq!(
        e.up.count("GET", "/"),
        before,
        "the pull was served from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_of_everything_manages_users_over_the_api() {
    let e = Env::start(RULES).await;
    let list = || e.req(Method::GET, "/_berth/api/users", "carol");
    let r = list().await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json()["users"],
        serde_json::json!(["alice", "bob", "carol", "dave"])
    );
    // Users without admin on `*` may not, whatever else they may do.
    assert_denied(
        &e.req(Method::GET, "/_berth/api/users", "alice").await,
        "alice may not administer (purge) every repository (user management needs admin on \"*\")",
    );
    let carol = basic("carol");
    let set = |name: &str, body: &'static str| {
        let url = e.b.url(&format!("/_berth/api/users/{name}"));
        let carol = carol.clone();
        async move {
            send_body(
                Method::PUT,
                &url,
                &[("authorization", carol.as_str())],
                Bytes::from_static(body.as_bytes()),
            )
            .await
        }
    };
    let r = set("eve", r#"{"password": "pw"}"#).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // eve logs in with the password the API set.
    assert_eq!(e.req(Method::GET, "/v2/", "eve").await.status, 200);
    assert_eq!(set("eve", r#"{"password": "pw"}"#).await.status, 200);
    // Bad input: a bad name, a body that is not the password, one too large.
    assert_eq!(
        set("bad:name", r#"{"password": "x"}"#).await.error_code(),
        "NAME_INVALID"
    );
    assert_eq!(set("eve", r#"{"pass": "x"}"#).await.status, 405);
    let huge: &'static str =
        Box::leak(format!("{{\"password\": \"{}\"}}", "x".repeat(5000)).into_boxed_str());
    assert_eq!(set("eve", huge).await.error_code(), "SIZE_INVALID");
    // Refused before it is read whole, and counted with its route and status.
    let metrics = String::from_utf8_lossy(&e.b.get("/metrics").await.bytes()).into_owned();
    assert_eq!(
        berth::ops::metrics::sample(
            &metrics,
            "berth_http_requests_total",
            &[("route", "admin"), ("status", "413")]
        ),
        1.0
    );
    let r = e
        .req(Method::DELETE, "/_berth/api/users/eve", "carol")
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        list().await.json()["users"],
        serde_json::json!(["alice", "bob", "carol", "dave"])
    );
    let r = e
        .req(Method::DELETE, "/_berth/api/users/eve", "carol")
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_rules_the_catalog_lists_only_what_the_user_may_pull() {
    let e = Env::start(RULES).await;
    let img = Image::new(9, &[50]);
    for repo in [
        "private/team-a/app",
        "private/team-a/lib",
        "private/team-b/x1",
        "private/team-b/x2",
        "private/team-b/x3",
    ] {
        assert_eq!(e.push_image(repo, "v1", &img, "carol").await.status, 201);
    }
    e.up.add_image("library/alpine", "3", &img);
    e.b.pull("alpine", "3", &img).await;
    let listing = |user: &'static str, query: &'static str| {
        let e = &e;
        async move {
            let r = e
                .req(Method::GET, &format!("/v2/_catalog{query}"), user)
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let names: Vec<String> =
                serde_json::from_value(r.json()["repositories"].clone()).unwrap();
            (
                names,
                r.headers
                    .get("link")
                    .map(|l| l.to_str().unwrap().to_owned()),
            )
        }
    };
    // carol may pull everything: every name.
    let (all, _) = listing("carol", "").await;
    assert_eq!(all.len(), 6, "{all:?}");
    // bob (team-a): team-a's and the mirrored ones; team-b's names are not shown.
    let (names, link) = listing("bob", "").await;
    assert!(
        names.iter().all(|n| !n.starts_with("private/team-b/")),
        "{names:?}"
    );
    assert!(
        names.contains(&"private/team-a/app".to_owned()),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.ends_with("alpine")), "{names:?}");
    assert_eq!(link, None);
    // Paged by two: every visible name once, in order, none hidden.
    let mut paged = Vec::new();
    let mut query = "?n=2".to_owned();
    for _ in 0..10 {
        let q: &'static str = Box::leak(query.clone().into_boxed_str());
        let (page, link) = listing("bob", q).await;
        assert!(page.len() <= 2);
        paged.extend(page);
        let Some(link) = link else { break };
        let start = link.find("?").unwrap();
        query = link[start..link.find('>').unwrap()].to_owned();
        query = query.replace("/v2/_catalog", "");
    }
    assert_eq!(paged, names);
    // dave, with no rule: only the mirrored names.
    let (names, _) = listing("dave", "").await;
    assert!(
        names.iter().all(|n| !n.starts_with("private/")),
        "{names:?}"
    );
}
