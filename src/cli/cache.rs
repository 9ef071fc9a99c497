//! `berth cache ls|du|rm`: what the mirror cache holds, read from the store, and purges asked
//! of the running berth over its API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Empty, Limited};

use berth::config::human_bytes;
use berth::oci::names::{Digest, RepoName, Tag};
use berth::store::inventory::{cached_tags, usage};

/// How long `berth cache rm` waits for the server's answer (a purge of a big repository reads
/// every cached manifest).
const RM_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest answer `berth cache rm` reads.
const MAX_ANSWER: usize = 16 << 20;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List the cached tags of mirrored repositories: repository (upstream/name), tag, digest,
    /// size and last pull.
    ///
    /// Reads the configured store directly and changes nothing: safe with the server stopped,
    /// and beside a running one (which may change the cache as it is read). The size is the
    /// manifest's and every blob it lists (for an index, with its cached platform manifests),
    /// cached or not; the last pull is when the manifest was last served from or written to
    /// the cache, as the store records uses (to within about a minute).
    Ls(LsArgs),
    /// Show how much the store holds: mirrored bytes and blobs, the mirrored bytes each
    /// upstream's cached tags lead to, and private bytes and blobs.
    ///
    /// Reads the configured store directly and changes nothing: safe with the server stopped,
    /// and beside a running one.
    Du(DuArgs),
    /// Purge mirrored content through the running berth's API (as an admin user): a tag
    /// (`alpine:3.19`), a manifest by digest with its tags and the blobs only it used
    /// (`alpine@sha256:…`), or with --all a whole repository (`alpine`).
    ///
    /// The first part of REF names the upstream when it looks like a host (`ghcr.io/org/app`,
    /// `localhost:5001/x`), as in image references; else --ns, else the default upstream. The
    /// password is read from BERTH_PASSWORD, else from the first line of stdin.
    Rm(RmArgs),
}

impl CacheCommand {
    pub fn run(self) -> ExitCode {
        match self {
            CacheCommand::Ls(a) => a.run(),
            CacheCommand::Du(a) => a.run(),
            CacheCommand::Rm(a) => a.run(),
        }
    }
}

/// Which store.
#[derive(Args)]
pub struct StoreArgs {
    /// TOML config file (for its data_dir and storage)
    #[arg(long)]
    config: Option<PathBuf>,
    /// The data dir [default: the config's, else ./berth-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Sizes in bytes, not KiB/MiB/GiB.
    #[arg(long)]
    bytes: bool,
}

impl StoreArgs {
    fn open(&self) -> Result<berth::store::Store, ExitCode> {
        let config = super::load_config(self.config.as_deref())?;
        super::open_existing_store(&config, self.data_dir.clone())
    }

    fn size(&self, n: u64) -> String {
        if self.bytes {
            n.to_string()
        } else {
            human_bytes(n)
        }
    }
}

#[derive(Args)]
pub struct LsArgs {
    /// Only this repository (`alpine`, `library/alpine` or `docker.io/library/alpine`).
    repo: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

impl LsArgs {
    fn run(self) -> ExitCode {
        let store = match self.store.open() {
            Ok(s) => s,
            Err(code) => return code,
        };
        let wanted = self.repo.as_deref();
        let keep = |upstream: &str, repo: &RepoName| match wanted {
            None => true,
            Some(w) => {
                let name = repo.as_str();
                name == w
                    || name.strip_prefix("library/") == Some(w)
                    || format!("{upstream}/{name}") == w
            }
        };
        let tags = match cached_tags(store.as_ref(), keep) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("berth: cache ls: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("REPOSITORY\tTAG\tDIGEST\tSIZE\tLAST PULL");
        for t in &tags {
            println!(
                "{}/{}\t{}\t{}\t{}\t{}",
                t.upstream,
                t.repo,
                t.tag,
                t.digest,
                self.store.size(t.size),
                t.last_pull.map_or_else(|| "-".to_owned(), when)
            );
        }
        ExitCode::SUCCESS
    }
}

fn when(t: SystemTime) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

#[derive(Args)]
pub struct DuArgs {
    #[command(flatten)]
    store: StoreArgs,
}

impl DuArgs {
    fn run(self) -> ExitCode {
        let store = match self.store.open() {
            Ok(s) => s,
            Err(code) => return code,
        };
        let u = match usage(store.as_ref()) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("berth: cache du: {e}");
                return ExitCode::FAILURE;
            }
        };
        let size = |n| self.store.size(n);
        println!(
            "mirrored\t{}\t{} blobs",
            size(u.mirrored_bytes),
            u.mirrored_blobs
        );
        for (upstream, bytes) in &u.per_upstream {
            println!("  {upstream}\t{}", size(*bytes));
        }
        if u.untagged_bytes > 0 {
            println!("  (untagged)\t{}", size(u.untagged_bytes));
        }
        println!(
            "private\t{}\t{} blobs",
            size(u.private_bytes),
            u.private_blobs
        );
        println!(
            "total\t{}\t{} blobs",
            size(u.mirrored_bytes + u.private_bytes),
            u.mirrored_blobs + u.private_blobs
        );
        ExitCode::SUCCESS
    }
}

#[derive(Args)]
pub struct RmArgs {
    /// What to purge: `NAME:TAG`, `NAME@DIGEST`, or `NAME` with --all.
    reference: String,
    /// Purge the whole repository: every cached tag, the manifests they point at, and the blobs
    /// nothing else uses.
    #[arg(long)]
    all: bool,
    /// The upstream the repository comes from [default: from REF, else the default upstream].
    #[arg(long)]
    ns: Option<String>,
    /// The admin user.
    #[arg(long)]
    user: String,
    /// berth's URL [default: http:// and the listen address of --config, else
    /// http://127.0.0.1:5000]
    #[arg(long)]
    url: Option<String>,
    /// TOML config file (for the listen address)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for an https URL.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

/// What `berth cache rm` was asked to purge.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Tag(Tag),
    Digest(Digest),
    Repository,
}

/// Splits REF into (upstream named in it, repository, target).
fn parse_ref(text: &str, all: bool) -> Result<(Option<String>, RepoName, Target), String> {
    let (rest, target) = if let Some((name, d)) = text.split_once('@') {
        let d = Digest::parse(d).map_err(|e| e.to_string())?;
        (name, Target::Digest(d))
    } else {
        match text.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (
                name,
                Target::Tag(Tag::parse(tag).map_err(|e| e.to_string())?),
            ),
            _ => (text, Target::Repository),
        }
    };
    match (&target, all) {
        (Target::Repository, false) => {
            return Err(format!(
                "{text}: give a tag (NAME:TAG), a digest (NAME@sha256:…), or --all for the whole repository"
            ))
        }
        (Target::Tag(_) | Target::Digest(_), true) => {
            return Err(format!("{text}: --all takes a repository without a tag or digest"))
        }
        _ => {}
    }
    // As in image references: a first part with a dot or a port, or `localhost`, is a host.
    let (host, name) = match rest.split_once('/') {
        Some((first, name)) if first.contains(['.', ':']) || first == "localhost" => {
            (Some(first.to_owned()), name)
        }
        _ => (None, rest),
    };
    let name = RepoName::parse(name).map_err(|e| e.to_string())?;
    Ok((host, name, target))
}

impl RmArgs {
    fn run(self) -> ExitCode {
        let (host, name, target) = match parse_ref(&self.reference, self.all) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("berth: cache rm: {e}");
                return ExitCode::from(2);
            }
        };
        let base = match &self.url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => match super::load_config(self.config.as_deref()) {
                Ok(c) => super::client::default_url(&c),
                Err(code) => return code,
            },
        };
        let password = match super::client::password() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("berth: cache rm: reading the password: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut path = match &target {
            Target::Tag(t) => format!("/v2/{name}/manifests/{t}"),
            Target::Digest(d) => format!("/v2/{name}/manifests/{d}"),
            Target::Repository => format!("/_berth/api/mirror/{name}"),
        };
        if let Some(ns) = self.ns.as_ref().or(host.as_ref()) {
            path.push_str("?ns=");
            path.extend(form_urlencoded::byte_serialize(ns.as_bytes()));
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("berth: cache rm: {e}");
                return ExitCode::FAILURE;
            }
        };
        let url = format!("{base}{path}");
        let answer = runtime.block_on(async {
            tokio::time::timeout(
                RM_TIMEOUT,
                delete(&url, &self.user, &password, self.ca_file.as_ref()),
            )
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", RM_TIMEOUT.as_secs())))
        });
        match answer {
            Ok(report) => {
                print_report(&report);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: cache rm: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Sends the DELETE with Basic credentials; the JSON report on success, else what went wrong.
async fn delete(
    url: &str,
    user: &str,
    password: &str,
    ca_file: Option<&PathBuf>,
) -> Result<serde_json::Value, String> {
    let client = super::client::http_client(ca_file.map(PathBuf::as_path))?;
    let req = http::Request::builder()
        .method(http::Method::DELETE)
        .uri(url)
        .header(
            http::header::AUTHORIZATION,
            super::client::basic(user, password),
        )
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the answer: {e}"))?
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if status.is_success() {
        return Ok(json);
    }
    let error = &json["errors"][0];
    Err(match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => format!("{status}: {code}: {message}"),
        _ => format!("{status}"),
    })
}

fn print_report(report: &serde_json::Value) {
    let strings = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let repo = report["repository"].as_str().unwrap_or_default();
    for t in strings("tags") {
        println!("removed tag {repo}:{t}");
    }
    for d in strings("manifests") {
        println!("removed manifest {d}");
    }
    for d in strings("blobs") {
        println!("removed blob {d}");
    }
    let bytes = report["bytes"].as_u64().unwrap_or(0);
    println!("freed {} ({bytes} bytes)", human_bytes(bytes));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let (host, name, t) = parse_ref("alpine:3.19", false).unwrap();
        assert_eq!((host, name.as_str()), (None, "alpine"));
        assert_eq!(t, Target::Tag(Tag::parse("3.19").unwrap()));
        let (host, name, t) = parse_ref("ghcr.io/org/app", true).unwrap();
        assert_eq!(
            (host.as_deref(), name.as_str()),
            (Some("ghcr.io"), "org/app")
        );
        assert_eq!(t, Target::Repository);
        let (host, name, _) = parse_ref("localhost:5001/x:1", false).unwrap();
        assert_eq!(
            (host.as_deref(), name.as_str()),
            (Some("localhost:5001"), "x")
        );
        let d = Digest::of(b"m");
        let (_, name, t) = parse_ref(&format!("library/alpine@{d}"), false).unwrap();
        assert_eq!((name.as_str(), t), ("library/alpine", Target::Digest(d)));
        assert!(parse_ref("alpine", false).is_err());
        assert!(parse_ref("alpine:1", true).is_err());
        assert!(parse_ref("Alpine:1", false).is_err());
    }
}
