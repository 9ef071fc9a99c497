//! The command line: config errors, defaults, signals.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn berth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_berth"))
}

#[test]
fn an_invalid_config_is_one_line_naming_the_key_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("max_cache_size = \"lots\"\n", "max_cache_size"),
        ("listen = \"nowhere\"\n", "listen"),
        ("colour = \"blue\"\n", "colour"),
        ("[upstreams.\"ghcr.io\"]\nurl = \"ghcr.io\"\n", "url"),
        ("default_upstream = \"quay.io\"\n", "default_upstream"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, text).unwrap();
        let out = berth()
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{stderr:?} should name {key}");
    }
    let out = berth()
        .args(["serve", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

#[test]
fn a_missing_htpasswd_file_stops_the_start_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-htpasswd");
    let port = free_port();
    let out = exits_within(
        berth()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--private-ns", "private", "--htpasswd"])
            .arg(&missing)
            .arg("--data-dir")
            .arg(dir.path()),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("htpasswd"), "{stderr}");
    assert!(
        stderr.contains(&missing.display().to_string()),
        "{stderr:?} should name the file"
    );
    // The same from the config file.
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "htpasswd = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let out = exits_within(berth().args(["serve", "--config"]).arg(&config));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&missing.display().to_string()));
}

/// Runs a command that should exit by itself; one still running after 20 s is killed and the
/// test fails (rather than hangs).
fn exits_within(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 20 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Waits (at most 20 s) until something listens on the port.
async fn wait_listening(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "berth did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process killed when the test ends, passed or failed.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_can_come_from_berth_variables() {
    let up = Fake::start().await;
    let img = Image::new(2, &[100]);
    up.add_image("library/env", "1", &img);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // No flags and no file: the listener, the data dir and the upstream (a key of a table the
    // defaults create) from the environment. (Nesting and value types: config::env's tests.)
    let _berth = Killed(
        berth()
            .arg("serve")
            .env("BERTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("BERTH_DATA_DIR", dir.path())
            .env("BERTH_UPSTREAMS__DOCKER_IO__URL", up.url())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port).await;
    let url = format!("http://127.0.0.1:{port}/v2/env/manifests/1");
    assert_eq!(
        send(http::Method::GET, &url, &[]).await.bytes(),
        img.manifest
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().count() > 0,
        "the data dir of BERTH_DATA_DIR is used"
    );

    // A variable that is no setting, or a bad value, is one line naming it, exit code 2.
    for (name, value) in [
        ("BERTH_COLOUR", "blue"),
        ("BERTH_LIMITS__IDLE_TIMEOUT", "soon"),
    ] {
        let out = berth().arg("serve").env(name, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(name), "{stderr:?} should name {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_cleanly() {
    let up = Fake::start().await;
    let img = Image::new(1, &[1000]);
    up.add_image("library/sig", "1", &img);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = berth()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &up.url(),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("BERTH_LOG", "info")
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v2/sig/manifests/1");
    wait_listening(port).await;
    assert_eq!(
        send(http::Method::GET, &url, &[]).await.bytes(),
        img.manifest
    );
    // The shell's built-in kill: /bin/kill (procps) is not on every fresh machine.
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "berth did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    let last = log.lines().last().unwrap_or("");
    assert!(
        last.contains("stopped"),
        "the last line says berth stopped: {last:?}"
    );
}

#[test]
fn fsck_reports_dangling_tags_and_repair_removes_them() {
    use berth::oci::names::{Digest, RepoName, Tag};
    use berth::store::private::PrivateStore;
    use berth::store::{disk::DiskStore, Area};
    let dir = tempfile::tempdir().unwrap();
    let ps = PrivateStore::new(DiskStore::open(dir.path()).unwrap().shared());
    let repo = RepoName::parse("private/app").unwrap();
    let stored = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        ps.store()
            .put_manifest(Area::Local, d, OCI_MANIFEST, bytes)
            .unwrap();
        d
    };
    let (kept, deleted) = (
        stored(br#"{"schemaVersion":2,"n":1}"#),
        stored(br#"{"schemaVersion":2,"n":2}"#),
    );
    let (good, broken) = (Tag::parse("good").unwrap(), Tag::parse("broken").unwrap());
    ps.link_manifest(&repo, &kept).unwrap();
    ps.set_tag(&repo, &good, &kept, OCI_MANIFEST).unwrap();
    // What the push/delete race used to leave: a tag naming a manifest deleted from the
    // repository (its bytes are still stored).
    ps.set_tag(&repo, &broken, &deleted, OCI_MANIFEST).unwrap();

    let fsck = |repair: bool| {
        let mut cmd = berth();
        cmd.arg("fsck").arg("--data-dir").arg(dir.path());
        if repair {
            cmd.arg("--repair");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = fsck(false);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("dangling tag: private/app:broken -> {deleted}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("checked 2 private tags: 1 dangling"),
        "{stdout}"
    );
    assert_eq!(
        ps.tags(&repo).unwrap().len(),
        2,
        "a check alone removes nothing"
    );

    let (code, stdout) = fsck(true);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("removed dangling tag: private/app:broken"),
        "{stdout}"
    );
    assert_eq!(ps.tags(&repo).unwrap(), vec![(good, kept)]);
    let (code, stdout) = fsck(false);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("checked 1 private tags: 0 dangling"),
        "{stdout}"
    );
}

#[test]
fn gc_grace_zero_reclaims_a_just_unreferenced_blob() {
    use berth::oci::names::Digest;
    use berth::store::{disk::DiskStore, Area, ContentStore};
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    // A layer whose manifest was just deleted: referenced by nothing, written a moment ago.
    let layer = pseudo_random(7, 10_000);
    let d = Digest::of(&layer);
    store.put_blob(Area::Local, d, &layer).unwrap();
    let gc = |extra: &[&str]| {
        let out = berth()
            .arg("gc")
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = gc(&[]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("1 recent unreferenced blob(s) (--grace 1h)"),
        "{stdout}"
    );
    assert_eq!(store.blob_len(Area::Local, &d).unwrap(), Some(10_000));

    let (code, stdout) = gc(&["--grace", "0s", "--dry-run"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("would remove blob {d}")),
        "{stdout}"
    );
    assert!(store.blob_len(Area::Local, &d).unwrap().is_some());

    let (code, stdout) = gc(&["--grace", "0s"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("removed blob {d} (10000 bytes)")),
        "{stdout}"
    );
    assert_eq!(store.blob_len(Area::Local, &d).unwrap(), None);

    let out = berth()
        .args(["gc", "--grace", "soon", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--grace"));
}

#[test]
fn the_shipped_man_pages_are_the_ones_the_command_line_makes() {
    for command in [
        None,
        Some("serve"),
        Some("fsck"),
        Some("certs"),
        Some("user"),
        Some("gc"),
        Some("warm"),
        Some("cache"),
    ] {
        let mut cmd = berth();
        cmd.arg("man");
        let file = match command {
            Some(c) => {
                cmd.arg(c);
                format!("deploy/man/berth-{c}.1")
            }
            None => "deploy/man/berth.1".to_owned(),
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let shipped = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            out.stdout == shipped,
            "{file} is out of date: regenerate it with `berth man {}`",
            command.unwrap_or("")
        );
    }
    let help = berth().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("\"Configuration\"") && help.contains("deploy/man/"),
        "{help}"
    );
}

#[test]
fn users_are_listed_added_and_removed() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    let ht = file.to_str().unwrap();
    for user in ["bob", "alice"] {
        let mut add = berth()
            .args([
                "user",
                "add",
                user,
                "--password-stdin",
                "--cost",
                "4",
                "--htpasswd",
                ht,
            ])
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        add.stdin.take().unwrap().write_all(b"secret\n").unwrap();
        assert!(add.wait().unwrap().success());
    }
    let list = || {
        let out = berth()
            .args(["user", "list", "--htpasswd", ht])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(list(), "alice\nbob\n");
    let removed = berth()
        .args(["user", "remove", "bob", "--htpasswd", ht])
        .output()
        .unwrap();
    assert!(removed.status.success());
    assert_eq!(list(), "alice\n");
    let missing = berth()
        .args(["user", "list", "--htpasswd"])
        .arg(dir.path().join("nope"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}
