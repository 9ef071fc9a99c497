//! The processes an interop test runs: the distribution registry as upstream, berth, skopeo,
//! containerd; and what every module uses to run them: finding a tool, a [`Proc`] stopped when
//! dropped, [`wait_for`] a condition with a deadline, a minimal HTTP client, free ports.
//!
//! Every server binds 127.0.0.1 only, is stopped when its [`Proc`] drops, and is waited for by
//! polling `GET /v2/` against a deadline. A process dropped during a panic prints the tail of its
//! logs, so a failing test shows what the servers saw.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use crate::support::free_port;

/// How long a server may take to answer `GET /v2/` after it is started.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Where tools are looked for: PATH, then the sbin and bin dirs a non-login PATH may lack.
pub fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(PathBuf::from(d));
        }
    }
    dirs
}

/// [`search_path`] as a `PATH` value, for daemons started with a cleared environment.
pub fn search_path_env() -> OsString {
    std::env::join_paths(search_path()).expect("a PATH of plain directories")
}

/// The executable `tool` in [`search_path`]; panics, naming the Debian package, if there is none.
pub fn find_tool(tool: &str, package: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    search_path()
        .into_iter()
        .map(|dir| dir.join(tool))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| {
            panic!(
                "the interop tests need `{tool}`, which is not installed: install the Debian \
                 package `{package}` (apt-get install -y {package}; .ci/run does this)"
            )
        })
}

/// Panics, naming the Debian package, unless `tool` is installed (see [`find_tool`]).
pub fn require_tool(tool: &str, package: &str) {
    find_tool(tool, package);
}

/// Both tools every interop test uses.
pub fn require_tools() {
    require_tool("docker-registry", "docker-registry");
    require_tool("skopeo", "skopeo");
}

/// Polls `cond` every 20 ms until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A response's status and headers (the body is read and dropped).
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 request on a new connection to `addr` (`IP:PORT`), for readiness checks
/// and probes.
pub fn http(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpReply> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let _ = s.shutdown(Shutdown::Both);
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(HttpReply { status, headers })
}

/// `GET path`: the status code, or `None` if nothing answered.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http("GET", &addr.to_string(), path, &[])
        .ok()
        .map(|r| r.status)
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process with its output in log files: stopped (and reaped) when dropped, then, if
/// the thread is panicking, the tail of its logs printed. By default it is killed at once; with
/// [`Proc::graceful`] it is sent SIGTERM first.
pub struct Proc {
    name: String,
    child: Option<Child>,
    logs: Vec<PathBuf>,
    grace: Duration,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to these files (the same
    /// path for both gives one log).
    pub fn spawn(name: &str, cmd: &mut Command, stdout: &Path, stderr: &Path) -> Proc {
        let out = File::create(stdout).expect("create a log file");
        let err = if stderr == stdout {
            out.try_clone().expect("share the log file")
        } else {
            File::create(stderr).expect("create a log file")
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let mut logs = vec![stdout.to_owned()];
        if stderr != stdout {
            logs.push(stderr.to_owned());
        }
        Proc {
            name: name.to_owned(),
            child: Some(child),
            logs,
            grace: Duration::ZERO,
        }
    }

    /// When dropped, SIGTERM first and SIGKILL only if it has not exited within `grace`.
    pub fn graceful(mut self, grace: Duration) -> Proc {
        self.grace = grace;
        self
    }

    /// The first log file (stdout's).
    pub fn log(&self) -> &Path {
        &self.logs[0]
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Panics, with the end of its log, if the process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("started");
        if let Ok(Some(status)) = child.try_wait() {
            self.child = None;
            panic!(
                "{} exited ({status}) before it was ready; the end of {}:\n{}",
                self.name,
                self.log().display(),
                tail(self.log(), 40)
            );
        }
    }

    /// Waits until `GET /v2/` answers 200, failing at once if the process exits.
    pub fn wait_ready(&mut self, addr: SocketAddr) {
        let name = self.name.clone();
        wait_for(
            &format!("{name} to answer GET /v2/ on {addr}"),
            START_DEADLINE,
            || {
                self.assert_running();
                // 401 is ready too: a registry with users answers /v2/ with a Basic challenge.
                matches!(http_status(addr, "/v2/"), Some(200 | 401)).then_some(())
            },
        );
    }

    /// SIGTERM (unless `grace` is zero), then SIGKILL if it has not exited within `grace`.
    /// Never panics.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if !grace.is_zero() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let end = Instant::now() + grace;
            while Instant::now() < end {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!(
                "interop: {} ignored SIGTERM for {grace:?}; killing it",
                self.name
            );
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(self.grace);
        if std::thread::panicking() {
            for log in &self.logs {
                eprintln!(
                    "----- {} log {} (last 40 lines) -----\n{}",
                    self.name,
                    log.display(),
                    tail(log, 40)
                );
            }
        }
    }
}

/// One line of the registry's access log (Apache combined format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// The distribution registry (`docker-registry serve`), storing in a temp dir.
pub struct Registry {
    pub addr: SocketAddr,
    access_log: PathBuf,
    _proc: Proc,
    _dir: TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().expect("create the registry's temp dir");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: berth-interop-test\n",
                dir.path().join("storage").display()
            ),
        )
        .expect("write the registry config");
        // The access log goes to stdout; the application log to stderr.
        let access_log = dir.path().join("access.log");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let mut proc = Proc::spawn(
            "docker-registry",
            &mut cmd,
            &access_log,
            &dir.path().join("registry.log"),
        );
        proc.wait_ready(addr);
        Registry {
            addr,
            access_log,
            _proc: proc,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request logged so far.
    pub fn accesses(&self) -> Vec<Access> {
        let text = std::fs::read_to_string(&self.access_log).expect("read the access log");
        text.lines().filter_map(parse_access).collect()
    }

    /// The blob GETs logged so far, as (repository path, digest) pairs.
    pub fn blob_gets(&self) -> Vec<(String, String)> {
        self.accesses()
            .into_iter()
            .filter(|a| a.method == "GET")
            .filter_map(|a| {
                let (repo, digest) = a.path.strip_prefix("/v2/")?.split_once("/blobs/")?;
                digest
                    .starts_with("sha256:")
                    .then(|| (repo.to_owned(), digest.to_owned()))
            })
            .collect()
    }
}

/// `127.0.0.1 - - [date] "GET /v2/x HTTP/1.1" 200 2 "" "agent"` → method, path, status.
fn parse_access(line: &str) -> Option<Access> {
    let (_, rest) = line.split_once('"')?;
    let (request, rest) = rest.split_once('"')?;
    let mut request = request.split(' ');
    let method = request.next()?.to_owned();
    let path = request.next()?.to_owned();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some(Access {
        method,
        path,
        status,
    })
}

/// One `request` line of berth's JSON log.
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    pub path: String,
    /// The `?ns=` the client sent (containerd names the registry it meant), or empty.
    pub ns: String,
    /// The upstream berth routed the request to (`-` when it names no mirrored repository).
    pub upstream: String,
    pub status: u16,
    pub route: String,
    pub cache: String,
}

/// berth, started from the binary cargo built for this test run.
pub struct Berth {
    pub addr: SocketAddr,
    log: PathBuf,
    proc: Proc,
    data: PathBuf,
    _dir: TempDir,
}

impl Berth {
    pub fn start(upstream: &str) -> Berth {
        Berth::start_with(upstream, &[])
    }

    /// berth with extra `serve` arguments (private namespace, htpasswd, ...).
    pub fn start_with(upstream: &str, extra: &[&str]) -> Berth {
        let dir = tempfile::tempdir().expect("create berth's temp dir");
        let data = dir.path().join("data");
        Berth::launch(upstream, data, dir, extra)
    }

    /// berth on an existing data dir (a restart), its logs in a new temp dir.
    pub fn start_on(upstream: &str, data: &Path, extra: &[&str]) -> Berth {
        let dir = tempfile::tempdir().expect("create berth's temp dir");
        Berth::launch(upstream, data.to_owned(), dir, extra)
    }

    fn launch(upstream: &str, data: PathBuf, dir: TempDir, extra: &[&str]) -> Berth {
        // berth cannot report the port it chose for :0, so pick one and hand it over.
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data)
            .arg("--upstream")
            .arg(upstream)
            .arg("--log-format")
            .arg("json")
            .args(extra)
            .env("BERTH_LOG", "info")
            .env("NO_COLOR", "1");
        let log = dir.path().join("berth.log");
        let mut proc = Proc::spawn("berth", &mut cmd, &dir.path().join("berth.stdout"), &log);
        proc.wait_ready(addr);
        Berth {
            addr,
            log,
            proc,
            data,
            _dir: dir,
        }
    }

    /// Waits until berth has no write in progress: a client has a blob's bytes as soon as they
    /// are verified, and the blob becomes a cache entry a moment later.
    pub fn settle(&self) {
        let tmp = self.data.join("tmp");
        wait_for(
            "berth's downloads to land in its cache",
            START_DEADLINE,
            || {
                let busy = std::fs::read_dir(&tmp).map_or(0, |d| d.count());
                (busy == 0).then_some(())
            },
        );
    }

    /// Its data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }

    /// Whether a download or upload is being written (a file in its staging dir).
    pub fn writing(&self) -> bool {
        std::fs::read_dir(self.data_dir().join("tmp")).is_ok_and(|mut d| d.next().is_some())
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill(&mut self) {
        self.proc.stop(Duration::ZERO);
    }

    /// The request lines berth logged so far.
    pub fn served(&self) -> Vec<Served> {
        let text = std::fs::read_to_string(&self.log).expect("read berth's log");
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v["message"] == "request")
            .map(|v| {
                let s = |k: &str| match &v[k] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                };
                Served {
                    method: s("method"),
                    path: s("path"),
                    ns: s("ns"),
                    upstream: s("upstream"),
                    status: s("status").parse().unwrap_or(0),
                    route: s("route"),
                    cache: s("cache"),
                }
            })
            .collect()
    }

    /// Everything berth logged so far (JSON lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("read berth's log")
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}

/// An htpasswd file in `dir` with one user, written by `berth user add`.
pub fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let path = dir.join("htpasswd");
    let mut add = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["user", "add", user, "--password-stdin", "--htpasswd"])
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run berth user add");
    add.stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    assert!(add.wait().expect("berth user add").success());
    path
}

/// skopeo with a private policy, auth file and temp dir, so the host's settings do not matter.
pub struct Skopeo {
    dir: TempDir,
    registries_conf: Option<PathBuf>,
    home: Option<PathBuf>,
}

impl Skopeo {
    pub fn new() -> Skopeo {
        let dir = tempfile::tempdir().expect("create skopeo's temp dir");
        std::fs::write(
            dir.path().join("policy.json"),
            br#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy.json");
        std::fs::write(dir.path().join("auth.json"), b"{}").expect("write auth.json");
        std::fs::create_dir(dir.path().join("tmp")).expect("create skopeo's tmp dir");
        Skopeo {
            dir,
            registries_conf: None,
            home: None,
        }
    }

    /// Uses `path` as registries.conf (skopeo's global `--registries-conf`) instead of the host's
    /// `/etc/containers/registries.conf`.
    pub fn with_registries_conf(mut self, path: &Path) -> Skopeo {
        self.registries_conf = Some(path.to_owned());
        self
    }

    /// Runs skopeo with `HOME=home`: it then looks for per-registry certificates in
    /// `home/.config/containers/certs.d/HOST:PORT/` before `/etc/containers/certs.d/HOST:PORT/`.
    pub fn with_home(mut self, home: &Path) -> Skopeo {
        self.home = Some(home.to_owned());
        self
    }

    /// Runs `skopeo copy ARGS` and returns its output, whether it succeeded or not.
    pub fn try_copy(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("skopeo");
        if let Some(conf) = &self.registries_conf {
            cmd.arg("--registries-conf").arg(conf);
        }
        if let Some(home) = &self.home {
            cmd.env("HOME", home);
        }
        cmd.arg("--policy")
            .arg(self.dir.path().join("policy.json"))
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"))
            .arg("copy")
            .arg("--retry-times=0")
            .args(args)
            .env("REGISTRY_AUTH_FILE", self.dir.path().join("auth.json"))
            .stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run skopeo: {e}"))
    }

    /// Runs `skopeo copy ARGS`, panicking with skopeo's output if it fails.
    pub fn copy(&self, args: &[&str]) -> Output {
        let out = self.try_copy(args);
        assert!(
            out.status.success(),
            "skopeo copy {} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        out
    }
}

/// How long one `ctr` command may take before it gives up (ctr's own `--timeout`).
const CTR_TIMEOUT: &str = "120s";

/// A private containerd (Debian's `containerd`, 1.6): its own root, state and sockets in a temp
/// dir, the CRI plugin disabled, driven with `ctr --address`.
pub struct Containerd {
    pub socket: PathBuf,
    log: PathBuf,
    proc: Proc,
    _dir: TempDir,
}

impl Containerd {
    pub fn start() -> Containerd {
        require_tool("containerd", "containerd");
        require_tool("ctr", "containerd");
        let dir = tempfile::tempdir().expect("create containerd's temp dir");
        let path = |name: &str| dir.path().join(name);
        let socket = path("containerd.sock");
        let config = path("config.toml");
        // Every path containerd would otherwise take from /var/lib, /run or /opt is in `dir`.
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = {root:?}\n\
                 state = {state:?}\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {socket:?}\n\
                 [ttrpc]\n  address = {ttrpc:?}\n\
                 [debug]\n  address = \"\"\n\
                 [metrics]\n  address = \"\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
                root = path("root"),
                state = path("state"),
                ttrpc = path("containerd-ttrpc.sock"),
                opt = path("opt"),
            ),
        )
        .expect("write containerd's config.toml");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let log = path("containerd.log");
        let mut proc = Proc::spawn("containerd", &mut cmd, &path("containerd.stdout"), &log);
        wait_for(
            &format!("containerd to answer `ctr version` on {}", socket.display()),
            START_DEADLINE,
            || {
                proc.assert_running();
                let ok = Command::new("ctr")
                    .arg("--address")
                    .arg(&socket)
                    .args(["--connect-timeout", "1s", "--timeout", "5s", "version"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                ok.then_some(())
            },
        );
        Containerd {
            socket,
            log,
            proc,
            _dir: dir,
        }
    }

    /// Runs `ctr --address SOCKET ARGS` and returns its output, whether it succeeded or not.
    pub fn try_ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--timeout", CTR_TIMEOUT])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ctr: {e}"))
    }

    /// Runs `ctr ARGS`, panicking with its output (and containerd's log) if it fails.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let out = self.try_ctr(args);
        assert!(
            out.status.success(),
            "ctr {} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n\
             --- containerd log (last 20 lines) ---\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log, 20),
        );
        out
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_parse() {
        let a = parse_access(
            "127.0.0.1 - - [23/Nov/2026:19:50:26 +0000] \"GET /v2/library/x/blobs/sha256:00 \
             HTTP/1.1\" 404 157 \"\" \"curl/7.88.1\"",
        )
        .unwrap();
        assert_eq!(a.method, "GET");
        assert_eq!(a.path, "/v2/library/x/blobs/sha256:00");
        assert_eq!(a.status, 404);
    }
}
