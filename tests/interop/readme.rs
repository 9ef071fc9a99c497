//! The README's commands, run as written, so the docs cannot drift from berth.
//!
//! The test reads README.md when it runs, takes the ```sh blocks of the sections in
//! [`SECTIONS`] (indented blocks too), joins `\` continuations, strips trailing `# comments`
//! and runs every command line with `sh -c`, in order, each within [`COMMAND_DEADLINE`], in one
//! working directory (so `./berth-data` and `./layout` are where the README means). A command
//! must succeed; where its comment states an HTTP status (`# 202; ...`) that status is asserted,
//! and [`CHECKS`] assert the other outcomes the README states.
//!
//! A command runs unchanged unless a rule of [`RULES`] rewrites it (each says why), and only
//! `cargo test` is not run ([`NOT_RUN`]). The test fails when a command's program has no runner
//! (the README gained a tool this test does not set up), or when a rule, an exemption or a check
//! matches nothing (so none of them goes stale).
//!
//! What is set up instead of rewriting commands, through the environment:
//! - the upstream: a local distribution registry, named by `BERTH_UPSTREAMS__DOCKER_IO__URL`,
//!   seeded with `library/alpine:3.19` (a small generated image, pushed with skopeo); the
//!   plain listener comes from `BERTH_LISTEN` (a free port on 127.0.0.1);
//! - `mirror.office`: an /etc/hosts line mapping it to ::1 (as `docker.rs` maps its TLS name:
//!   dockerd verifies no certificate on 127.0.0.0/8), so its TLS listener is on `[::1]`;
//! - trust in the self-signed CA berth writes to `./berth-data/certs/ca.crt`: `CURL_CA_BUNDLE`
//!   for curl, `SSL_CERT_FILE` for skopeo, and for dockerd the README's own TLS step,
//!   `/etc/docker/certs.d/mirror.office:PORT/ca.crt`, once that `serve` has written the CA;
//! - `app:1.2.0` in a private dockerd (docker.rs's, vfs storage), loaded with
//!   `skopeo copy ... docker-daemon:`, and `./layout:1`, an OCI layout; both the generated image;
//! - stdin of every command is the README's password (`secret`), as a user types it at a prompt
//!   (`berth user add` reads it from stdin when that is not a terminal);
//! - curl writes each response's status to stderr (a `write-out` in a `.curlrc` under
//!   `CURL_HOME`), so a curl command that got a 4xx fails here even without `--fail`.
//!
//! A `berth serve` line runs in the background until the next `serve` line (which replaces it,
//! as a user stops one to start the other) or the end, and is waited for by polling its ports.

use std::cell::RefCell;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::docker::{CertsDEntry, HostsEntry, World, README_HOST};
use crate::procs::{find_tool, free_port, http, search_path_env, wait_for, Proc};

/// The README sections whose ```sh blocks are run, with how many blocks each has: a block that
/// disappears (or a renamed heading) fails the test rather than silently running less.
const SECTIONS: &[(&str, usize)] = &[
    ("## Quick start", 1),
    ("## Point Docker at it", 1),
    ("## Private namespace: push, login, delete, gc", 2),
];

/// The README's user and password (`alice:secret`).
const PASSWORD: &str = "secret";

const COMMAND_DEADLINE: Duration = Duration::from_secs(120);
const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(30);

/// What the `.curlrc` makes curl print on stderr after each response.
const STATUS_MARK: &str = "berth-readme-test: http_code=";

/// A rewrite: `find` (at the start of the command or after a space when `word`) becomes `to`,
/// in which `{berth}`, `{port}`, `{tls_port}`, `{tls_listen}`, `{tmp}` and `{digest}` are then
/// filled in. Applied in order.
struct Rule {
    find: &'static str,
    word: bool,
    to: &'static str,
    why: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        find: "cargo run --release -- ",
        word: true,
        to: "{berth} ",
        why: "the berth binary this test run built (a release build would take minutes)",
    },
    Rule {
        find: "berth ",
        word: true,
        to: "{berth} ",
        why: "the installed `berth` the README assumes is the binary this test run built",
    },
    Rule {
        find: "docker login mirror.office:5443",
        word: true,
        to: "docker login --username alice --password-stdin mirror.office:5443",
        why: "docker login prompts only on a terminal; the README's user, and its password on \
              stdin, are what a user types at the prompts",
    },
    Rule {
        find: "--self-signed",
        word: true,
        to: "--self-signed --tls-listen '{tls_listen}'",
        why: "the TLS port (5443 in the README) must be a free one on ::1; BERTH_TLS__LISTEN \
              cannot say it, since a [tls] table from the environment needs cert and key too",
    },
    Rule {
        find: ":5000",
        word: false,
        to: ":{port}",
        why: "the plain listener is on a free port (BERTH_LISTEN), not 5000",
    },
    Rule {
        find: ":5443",
        word: false,
        to: ":{tls_port}",
        why: "the TLS listener is on a free port, not 5443",
    },
    Rule {
        find: "/etc/berth/htpasswd",
        word: true,
        to: "{tmp}/htpasswd",
        why: "the test writes nothing under /etc/berth",
    },
    Rule {
        find: "dir:/tmp/alpine",
        word: true,
        to: "dir:{tmp}/alpine",
        why: "a directory of this run's own, not a shared /tmp/alpine",
    },
    Rule {
        find: "sha256:...",
        word: false,
        to: "{digest}",
        why: "the README's placeholder for the digest the previous command printed",
    },
];

/// Commands not run, with why; each must still be in the README.
const NOT_RUN: &[(&str, &str)] = &[(
    "cargo test",
    "the test suite itself, of which this test is a part",
)];

/// The programs a command may run (after the rules): each has its environment set up above.
const PROGRAMS: &[&str] = &["{berth}", "curl", "skopeo", "docker"];

/// An outcome the README states for a command (matched by a part of the command as written),
/// checked after it ran.
struct Check {
    command: &'static str,
    states: &'static str,
    check: fn(&Ctx, &Ran),
}

const CHECKS: &[Check] = &[
    Check {
        command: "cargo run --release -- serve",
        states: "cache in ./berth-data",
        check: |ctx, _| {
            assert!(
                ctx.cwd.join("berth-data").join("cache").is_dir(),
                "berth serve made no ./berth-data/cache"
            )
        },
    },
    Check {
        command: "tags/list?n=5",
        states: "the tags of library/alpine, through berth from the upstream",
        check: |_, ran| {
            let v: Value = serde_json::from_str(ran.stdout.trim())
                .unwrap_or_else(|e| panic!("the tag list is not JSON ({e}): {}", ran.stdout));
            assert_eq!(v["tags"], json!(["3.19"]), "the tag list: {v}");
        },
    },
    Check {
        command: "dir:/tmp/alpine",
        states: "the image copied through berth",
        check: |ctx, _| {
            let m = ctx.tmp.join("alpine").join("manifest.json");
            assert!(m.is_file(), "skopeo wrote no {}", m.display());
        },
    },
    Check {
        command: "berth user list",
        states: "the users, one per line",
        check: |_, ran| assert_eq!(ran.stdout.trim(), "alice", "berth user list printed"),
    },
    Check {
        command: "v2/private/app/tags/list",
        states: "the tags pushed by docker and skopeo",
        check: |_, ran| {
            let v: Value = serde_json::from_str(ran.stdout.trim())
                .unwrap_or_else(|e| panic!("the tag list is not JSON ({e}): {}", ran.stdout));
            let tags = v["tags"].as_array().cloned().unwrap_or_default();
            for t in ["1", "1.2.0"] {
                assert!(tags.contains(&json!(t)), "private/app has no tag {t}: {v}");
            }
        },
    },
    Check {
        command: "| grep -i docker-content-digest",
        states: "the manifest's digest",
        check: |_, ran| {
            assert!(
                digest_in(&ran.stdout).is_some(),
                "no digest in {:?}",
                ran.stdout
            )
        },
    },
    Check {
        command: "docker login",
        states: "a Bearer challenge, then /auth/token with the password",
        check: |ctx, _| {
            let log = ctx
                .serve_log
                .borrow()
                .clone()
                .expect("a berth serve is running");
            // The request line is written as the response ends, maybe after docker returned.
            wait_for(
                "berth to log the challenge, then the token (docker login)",
                START_DEADLINE,
                || {
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    let at = |path: &str, status: u16| {
                        let needle = format!(" path=\"{path}\" status={status} ");
                        text.lines().position(|l| l.contains(&needle))
                    };
                    let (challenge, token) = (at("/v2/", 401)?, at("/auth/token", 200)?);
                    (challenge < token).then_some(())
                },
            );
        },
    },
    Check {
        command: "-X DELETE",
        states: "the tags go with it",
        check: |ctx, _| {
            let list = ctx.run(&format!(
                "curl -s -u alice:{PASSWORD} https://{README_HOST}:{}/v2/private/app/tags/list",
                ctx.tls_port
            ));
            assert!(list.status.success(), "listing the tags again failed");
            assert!(
                !list.stdout.contains("\"1.2.0\""),
                "the deleted manifest's tag is still listed: {}",
                list.stdout
            );
        },
    },
];

/// One command of the README.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadmeCommand {
    section: &'static str,
    /// As written, continuations joined, without its comment.
    line: String,
    comment: Option<String>,
}

/// What a foreground command did.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// The HTTP status of each response curl got, in order.
    http: Vec<u16>,
}

/// The test's world as the commands see it.
struct Ctx {
    cwd: PathBuf,
    tmp: PathBuf,
    port: u16,
    tls_port: u16,
    env: Vec<(String, OsString)>,
    /// The log of the `berth serve` running now.
    serve_log: RefCell<Option<PathBuf>>,
}

impl Ctx {
    fn fill(&self, s: &str, digest: Option<&str>) -> String {
        let mut out = s
            .replace("{berth}", env!("CARGO_BIN_EXE_berth"))
            .replace("{port}", &self.port.to_string())
            .replace("{tls_port}", &self.tls_port.to_string())
            .replace("{tls_listen}", &format!("[::1]:{}", self.tls_port))
            .replace("{tmp}", &self.tmp.display().to_string());
        if out.contains("{digest}") {
            let d = digest.expect("the README uses sha256:... before any command printed a digest");
            out = out.replace("{digest}", d);
        }
        out
    }

    fn sh(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(line)
            .current_dir(&self.cwd)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `line` to completion with the password on stdin, killing it at the deadline.
    fn run(&self, line: &str) -> Ran {
        let mut child = self
            .sh(line)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sh -c {line:?}: {e}"));
        // A command that never reads stdin may close it first: that is not an error.
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{PASSWORD}\n").as_bytes());
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = r.read_to_end(&mut s);
                String::from_utf8_lossy(&s).into_owned()
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("stdout")));
        let err = drain(Box::new(child.stderr.take().expect("stderr")));
        let end = Instant::now() + COMMAND_DEADLINE;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{line}` did not finish within {COMMAND_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = out.join().expect("stdout reader");
        let all_err = err.join().expect("stderr reader");
        let mut http = Vec::new();
        let mut stderr = String::new();
        for l in all_err.lines() {
            match l.strip_prefix(STATUS_MARK) {
                Some(code) => http.push(code.trim().parse().unwrap_or(0)),
                None => {
                    stderr.push_str(l);
                    stderr.push('\n');
                }
            }
        }
        Ran {
            status,
            stdout,
            stderr,
            http,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the README

/// The commands of [`SECTIONS`], in README order.
fn readme_commands(readme: &str) -> Vec<ReadmeCommand> {
    let mut out = Vec::new();
    for &(heading, blocks_expected) in SECTIONS {
        let start = readme
            .lines()
            .position(|l| l.trim_end() == heading)
            .unwrap_or_else(|| panic!("README.md has no section `{heading}`"));
        let section: Vec<&str> = readme
            .lines()
            .skip(start + 1)
            .take_while(|l| !l.starts_with("## "))
            .collect();
        let blocks = sh_blocks(&section);
        assert_eq!(
            blocks.len(),
            blocks_expected,
            "`{heading}` has {} ```sh blocks, the test expects {blocks_expected}: update SECTIONS",
            blocks.len()
        );
        for block in blocks {
            for line in join_continuations(&block) {
                let (line, comment) = split_comment(&line);
                if !line.is_empty() {
                    out.push(ReadmeCommand {
                        section: heading,
                        line,
                        comment,
                    });
                }
            }
        }
    }
    out
}

/// The bodies of the ```sh blocks among `lines`, at any indentation (a list item's block too).
fn sh_blocks(lines: &[&str]) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, Vec<String>)> = None;
    for l in lines {
        let indent = l.len() - l.trim_start().len();
        match &mut current {
            None if l.trim() == "```sh" => current = Some((indent, Vec::new())),
            None => {}
            Some(_) if l.trim() == "```" => {
                blocks.push(current.take().map(|(_, b)| b).unwrap_or_default());
            }
            Some((strip, body)) => body.push(l.get(*strip..).unwrap_or(l.trim_start()).into()),
        }
    }
    assert!(current.is_none(), "a ```sh block is not closed");
    blocks
}

/// Lines ending in `\` joined with the next one.
fn join_continuations(block: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    for l in block {
        let text = match pending.take() {
            Some(p) => format!("{p} {}", l.trim_start()),
            None => l.clone(),
        };
        match text.trim_end().strip_suffix('\\') {
            Some(head) => pending = Some(head.trim_end().to_owned()),
            None => out.push(text),
        }
    }
    assert!(pending.is_none(), "a block ends in a `\\` continuation");
    out
}

/// The command and its trailing comment: a `#` after whitespace, outside quotes.
fn split_comment(line: &str) -> (String, Option<String>) {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && prev_space => {
                return (
                    line[..i].trim().to_owned(),
                    Some(line[i + 1..].trim().to_owned()),
                );
            }
            None => {}
        }
        prev_space = c.is_whitespace();
    }
    (line.trim().to_owned(), None)
}

/// The HTTP status a comment states: `# 202; the tags go with it`.
fn stated_status(comment: &str) -> Option<u16> {
    let word = comment.split([';', ' ', ',']).next()?;
    (word.len() == 3)
        .then(|| word.parse().ok())
        .flatten()
        .filter(|s| (100..600).contains(s))
}

/// `line` with every rule applied; counts each rule's matches into `used`.
fn rewrite(line: &str, used: &mut [usize]) -> String {
    let mut s = line.to_owned();
    for (i, r) in RULES.iter().enumerate() {
        let mut out = String::new();
        let mut rest = s.as_str();
        let mut at_start = true;
        while let Some(pos) = rest.find(r.find) {
            let before = &rest[..pos];
            let boundary = if before.is_empty() {
                at_start
            } else {
                before.ends_with(char::is_whitespace)
            };
            out.push_str(before);
            if !r.word || boundary {
                out.push_str(r.to);
                used[i] += 1;
            } else {
                out.push_str(r.find);
            }
            rest = &rest[pos + r.find.len()..];
            at_start = false;
        }
        out.push_str(rest);
        s = out;
    }
    s
}

/// The program a command runs: its first word after `NAME=value` assignments.
fn program(line: &str) -> &str {
    line.split_whitespace()
        .find(|w| !w.contains('='))
        .unwrap_or("")
}

/// `line` with `exec` before its program (after any `NAME=value` words), so that stopping the
/// shell stops the program.
fn exec_form(line: &str) -> String {
    let mut pos = 0;
    for w in line.split_whitespace() {
        let at = line[pos..].find(w).map_or(pos, |i| pos + i);
        if !w.contains('=') {
            return format!("{}exec {}", &line[..at], &line[at..]);
        }
        pos = at + w.len();
    }
    format!("exec {line}")
}

/// The first `sha256:` digest in `text`.
fn digest_in(text: &str) -> Option<String> {
    text.match_indices("sha256:").find_map(|(i, _)| {
        let hex = text.get(i + 7..i + 7 + 64)?;
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| format!("sha256:{hex}"))
    })
}

// ---------------------------------------------------------------------------------------------
// The test

#[test]
fn readme_commands_run_as_written() {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let commands = readme_commands(&readme);
    find_tool("curl", "curl");
    find_tool("skopeo", "skopeo");
    TcpListener::bind("[::1]:0").expect(
        "the README test needs IPv6 loopback (::1): mirror.office maps there, where dockerd \
         verifies berth's certificate",
    );

    let mut w = World::new("readme");
    let cwd = w.dir.join("work");
    let tmp = w.dir.join("tmp");
    let home = w.dir.join("home");
    for d in [&cwd, &tmp, &home.join(".config").join("containers")] {
        fs::create_dir_all(d).expect("create the test's dirs");
    }
    fs::write(
        home.join(".config").join("containers").join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("write policy.json");
    fs::write(home.join("auth.json"), "{}").expect("write auth.json");
    fs::write(
        home.join(".curlrc"),
        format!("write-out = \"%{{stderr}}{STATUS_MARK}%{{http_code}}\\n\"\n"),
    )
    .expect("write .curlrc");
    w.hosts = Some(HostsEntry::add("::1", README_HOST));
    w.start_dockerd(json!({}));

    let port = free_port();
    let tls_port = TcpListener::bind("[::1]:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port on ::1")
        .port();
    let ca = cwd.join("berth-data").join("certs").join("ca.crt");
    let mut env: Vec<(String, OsString)> = vec![
        ("PATH".into(), search_path_env()),
        ("HOME".into(), home.clone().into()),
        ("CURL_HOME".into(), home.clone().into()),
        ("CURL_CA_BUNDLE".into(), ca.clone().into()),
        ("SSL_CERT_FILE".into(), ca.clone().into()),
        ("REGISTRY_AUTH_FILE".into(), home.join("auth.json").into()),
        ("NO_PROXY".into(), "*".into()),
        ("no_proxy".into(), "*".into()),
        ("NO_COLOR".into(), "1".into()),
        ("BERTH_LOG".into(), "info".into()),
        ("BERTH_LISTEN".into(), format!("127.0.0.1:{port}").into()),
        (
            "BERTH_UPSTREAMS__DOCKER_IO__URL".into(),
            format!("http://127.0.0.1:{}", w.upstream_port).into(),
        ),
    ];
    env.extend(
        w.docker()
            .client_env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    let ctx = Ctx {
        cwd: cwd.clone(),
        tmp,
        port,
        tls_port,
        env,
        serve_log: RefCell::new(None),
    };

    // The images the README assumes: docker.rs's generated single-platform image, as
    // library/alpine:3.19 upstream, as app:1.2.0 in the local docker, and as ./layout:1.
    let image = format!("oci:{}:single", w.dir.join("oci").display());
    let sock = ctx
        .env
        .iter()
        .find(|(k, _)| k == "DOCKER_HOST")
        .map(|(_, v)| v.to_string_lossy().into_owned())
        .expect("DOCKER_HOST");
    for setup in [
        format!(
            "skopeo copy --quiet --dest-tls-verify=false {image} \
             docker://127.0.0.1:{}/library/alpine:3.19",
            w.upstream_port
        ),
        format!("skopeo copy --quiet {image} oci:./layout:1"),
        format!("skopeo copy --quiet --dest-daemon-host {sock} {image} docker-daemon:app:1.2.0"),
        "docker image inspect app:1.2.0".to_owned(),
    ] {
        let ran = ctx.run(&setup);
        assert!(
            ran.status.success(),
            "setup `{setup}` failed ({}):\n{}\n{}",
            ran.status,
            ran.stdout,
            ran.stderr
        );
    }

    let mut used = vec![0; RULES.len()];
    let mut not_run_used = vec![0; NOT_RUN.len()];
    let mut checks_used = vec![0; CHECKS.len()];
    let mut digest: Option<String> = None;
    let mut serve: Option<Proc> = None;
    let mut serves = 0;
    for cmd in &commands {
        if let Some(i) = NOT_RUN.iter().position(|(c, _)| *c == cmd.line) {
            not_run_used[i] += 1;
            eprintln!("readme: not run: `{}` ({})", cmd.line, NOT_RUN[i].1);
            continue;
        }
        let line = ctx.fill(&rewrite(&cmd.line, &mut used), digest.as_deref());
        eprintln!("readme: {}\n   $ {line}", cmd.line);
        let prog = program(&rewrite(&cmd.line, &mut vec![0; RULES.len()])).to_owned();
        assert!(
            PROGRAMS.contains(&prog.as_str()),
            "README.md (`{}`) runs `{prog}`, which no runner of this test knows: set it up \
             (or add a rule), see tests/interop/readme.rs",
            cmd.line
        );
        let is_serve = prog == "{berth}" && line.split_whitespace().any(|w| w == "serve");
        let ran = if is_serve {
            if let Some(mut old) = serve.take() {
                old.stop(STOP_GRACE);
            }
            serves += 1;
            let addr = format!("127.0.0.1:{port}");
            wait_for("the old berth's port to be free", START_DEADLINE, || {
                TcpListener::bind(&addr).ok().map(drop)
            });
            let log = w.dir.join(format!("serve-{serves}.log"));
            let mut p = Proc::spawn(
                &format!("berth serve #{serves}"),
                &mut ctx.sh(&exec_form(&line)),
                &log,
                &log,
            )
            .graceful(STOP_GRACE);
            wait_for(&format!("`{line}` to answer /v2/"), START_DEADLINE, || {
                p.assert_running();
                matches!(http("GET", &addr, "/v2/", &[]), Ok(r) if r.status == 200 || r.status == 401)
                    .then_some(())
            });
            if line.contains(&format!("[::1]:{tls_port}")) {
                wait_for("berth's TLS listener", START_DEADLINE, || {
                    p.assert_running();
                    TcpStream::connect(("::1", tls_port)).ok().map(drop)
                });
                // The README's TLS section: dockerd trusts the CA in certs.d/HOST:PORT.
                w.ca = Some(CertsDEntry::add(&format!("{README_HOST}:{tls_port}"), &ca));
            }
            serve = Some(p);
            *ctx.serve_log.borrow_mut() = Some(log);
            None
        } else {
            let ran = ctx.run(&line);
            eprint!("{}{}", ran.stdout, ran.stderr);
            assert!(
                ran.status.success(),
                "`{line}` (README: `{}`) failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
                cmd.line,
                ran.status,
                ran.stdout,
                ran.stderr
            );
            for code in &ran.http {
                assert!(
                    (200..300).contains(code),
                    "`{line}` got HTTP {code}:\n{}\n{}",
                    ran.stdout,
                    ran.stderr
                );
            }
            if let Some(want) = cmd.comment.as_deref().and_then(stated_status) {
                assert_eq!(
                    ran.http.last(),
                    Some(&want),
                    "`{line}`: the README says {want}"
                );
            }
            if let Some(d) = digest_in(&ran.stdout) {
                digest = Some(d);
            }
            Some(ran)
        };
        for (i, c) in CHECKS.iter().enumerate() {
            if cmd.line.contains(c.command) {
                checks_used[i] += 1;
                let none = Ran {
                    status: ExitStatus::default(),
                    stdout: String::new(),
                    stderr: String::new(),
                    http: Vec::new(),
                };
                (c.check)(&ctx, ran.as_ref().unwrap_or(&none));
                eprintln!("readme:   checked: {}", c.states);
            }
        }
    }
    drop(serve);

    for (r, n) in RULES.iter().zip(&used) {
        assert!(
            *n > 0,
            "the rewrite `{}` -> `{}` ({}) matches no README command: remove it",
            r.find,
            r.to,
            r.why
        );
    }
    for ((c, why), n) in NOT_RUN.iter().zip(&not_run_used) {
        assert!(
            *n > 0,
            "`{c}` ({why}) is no longer in the README: remove it"
        );
    }
    for (c, n) in CHECKS.iter().zip(&checks_used) {
        assert!(
            *n > 0,
            "the check `{}` ({}) matches no README command: remove or update it",
            c.command,
            c.states
        );
    }
    assert!(serves >= 2, "the README's sections start berth twice");
}

#[test]
fn readme_blocks_are_read_as_a_shell_would() {
    let block: Vec<String> = [
        "berth serve --a \\",
        "    --b x      # TLS on :5443",
        "curl -H 'Accept: a#b' https://h/x   # 202; gone",
        "",
    ]
    .map(String::from)
    .to_vec();
    let lines: Vec<(String, Option<String>)> = join_continuations(&block)
        .iter()
        .map(|l| split_comment(l))
        .collect();
    assert_eq!(
        lines,
        vec![
            ("berth serve --a --b x".into(), Some("TLS on :5443".into())),
            (
                "curl -H 'Accept: a#b' https://h/x".into(),
                Some("202; gone".into())
            ),
            (String::new(), None),
        ]
    );
    assert_eq!(stated_status("202; gone"), Some(202));
    assert_eq!(stated_status("the users, one per line"), None);
    let md = [
        "x", "  ```sh", "  a \\", "    b", "  ```", "```json", "{}", "```",
    ];
    assert_eq!(
        sh_blocks(&md),
        vec![vec!["a \\".to_owned(), "  b".to_owned()]]
    );
    let mut used = vec![0; RULES.len()];
    assert_eq!(
        rewrite("X=1 berth serve --htpasswd /etc/berth/htpasswd", &mut used),
        "X=1 {berth} serve --htpasswd {tmp}/htpasswd"
    );
    assert_eq!(program("X=1 {berth} serve"), "{berth}");
    // A program the test has not set up is refused, not run.
    let other = rewrite("podman pull mirror.office:5000/x", &mut used);
    assert!(!PROGRAMS.contains(&program(&other)));
    assert_eq!(
        exec_form("X=1 Y=2 {berth} serve"),
        "X=1 Y=2 exec {berth} serve"
    );
    assert_eq!(exec_form("{berth} serve"), "exec {berth} serve");
    assert_eq!(
        digest_in(&format!(
            "docker-content-digest: sha256:{}\r\n",
            "a".repeat(64)
        )),
        Some(format!("sha256:{}", "a".repeat(64)))
    );
}
