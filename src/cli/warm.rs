//! `berth warm IMAGE...`: pulls images through a running berth as a client would, so they are
//! in its cache before anyone needs them: each manifest (with the Accept header Docker sends),
//! an index's children of the chosen platforms, and every blob, read to the end and checked
//! against its digest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use sha2::Digest as _;

use berth::config::human_bytes;
use berth::oci::manifest::{Descriptor, Manifest};
use berth::oci::names::{Digest, Reference, RepoName};
use berth::oci::platform::PlatformSpec;

/// The manifest kinds asked for: what Docker and containerd send.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";
/// Longest wait for a response's headers (berth may be fetching from its upstream), and for
/// the next piece of a body.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(120);
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest manifest read (the limit registries use is 4 MiB).
const MAX_MANIFEST: usize = 8 << 20;
/// The most children of one index pulled (an index lists a few dozen platforms at most).
const MAX_CHILDREN: usize = 128;
/// Blobs of one image pulled at once.
const BLOB_CONCURRENCY: usize = 4;

#[derive(Args)]
pub struct WarmArgs {
    /// Images to pull, as docker names them: NAME[:TAG|@DIGEST] (`alpine` is
    /// `library/alpine:latest`; a leading registry host such as `ghcr.io/` picks that upstream)
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    /// Platform of a multi-platform image to pull, as os/arch[/variant] (repeatable)
    /// [default: all]
    #[arg(long = "platform", value_name = "PLATFORM", value_parser = PlatformSpec::parse)]
    platforms: Vec<PlatformSpec>,
    /// The running berth [default: http:// and the listen address of --config]
    #[arg(long)]
    url: Option<String>,
    /// Config file whose listen address is the default --url
    #[arg(long)]
    config: Option<PathBuf>,
    /// The upstream to pull from (berth's `?ns=`), for images that name no registry host
    /// [default: berth's default upstream]
    #[arg(long)]
    upstream: Option<String>,
    /// User to log in as; the password is read from BERTH_PASSWORD, else from the first line of
    /// stdin
    #[arg(long)]
    user: Option<String>,
    /// Extra CA certificate (PEM) trusted for an https --url, such as the one `berth certs`
    /// made
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

/// One image named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Image {
    /// The upstream (`?ns=`), when the name or --upstream gives one.
    ns: Option<String>,
    repo: RepoName,
    reference: Reference,
}

/// Splits `[host/]name[:tag][@digest]` the way docker does.
fn parse_image(s: &str, upstream: Option<&str>) -> Result<Image, String> {
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (
            r,
            Some(Digest::parse(d).map_err(|_| format!("{d:?} is not a sha256 digest"))?),
        ),
        None => (s, None),
    };
    let (name, tag) = match rest.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (rest, None),
    };
    let (host, path) = match name.split_once('/') {
        Some((h, p)) if h.contains(['.', ':']) || h == "localhost" => (Some(h), p),
        _ => (None, name),
    };
    let ns = match host {
        Some("docker.io" | "index.docker.io" | "registry-1.docker.io") => {
            Some(berth::config::DOCKER_HUB.to_owned())
        }
        Some(h) => Some(h.to_owned()),
        None => upstream.map(str::to_owned),
    };
    let on_hub = ns
        .as_deref()
        .map_or(true, |n| n == berth::config::DOCKER_HUB);
    let repo = RepoName::parse(path).map_err(|_| format!("{path:?} is not a repository name"))?;
    let repo = if on_hub {
        repo.with_library_prefix()
    } else {
        repo
    };
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d),
        (None, Some(t)) => Reference::parse(t).map_err(|_| format!("{t:?} is not a tag"))?,
        (None, None) => Reference::parse("latest").map_err(|e| e.to_string())?,
    };
    Ok(Image {
        ns,
        repo,
        reference,
    })
}

use super::client::HttpClient;

struct Puller {
    client: HttpClient,
    base: String,
    auth: Option<String>,
    platforms: Vec<PlatformSpec>,
}

/// What pulling one image came to.
struct Pulled {
    digest: String,
    platforms: usize,
    blobs: usize,
    bytes: u64,
}

impl WarmArgs {
    /// Exits 0 when every image was pulled, 1 when any failed, 2 on a bad argument.
    pub fn run(self) -> ExitCode {
        let setup = || -> Result<(Vec<(String, Image)>, Puller), String> {
            let images = self
                .images
                .iter()
                .map(|s| {
                    parse_image(s, self.upstream.as_deref())
                        .map(|i| (s.clone(), i))
                        .map_err(|e| format!("{s}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let base = match &self.url {
                Some(u) => u.trim_end_matches('/').to_owned(),
                None => super::client::default_url(
                    &berth::config::Config::load(self.config.as_deref())
                        .map_err(|e| e.to_string())?,
                ),
            };
            if !base.starts_with("http://") && !base.starts_with("https://") {
                return Err(format!("--url {base:?}: give an http:// or https:// URL"));
            }
            let auth = match &self.user {
                Some(user) => {
                    let password = super::client::password()
                        .map_err(|e| format!("reading the password: {e}"))?;
                    Some(super::client::basic(user, &password))
                }
                None => None,
            };
            let client = super::client::http_client(self.ca_file.as_deref())?;
            Ok((
                images,
                Puller {
                    client,
                    base,
                    auth,
                    platforms: self.platforms.clone(),
                },
            ))
        };
        let (images, puller) = match setup() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("berth: warm: {e}");
                return ExitCode::from(2);
            }
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("berth: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut failed = 0;
        runtime.block_on(async {
            for (name, image) in &images {
                match puller.pull(image).await {
                    Ok(p) => println!(
                        "{name}: {} ({} platform(s), {} blob(s), {})",
                        p.digest,
                        p.platforms,
                        p.blobs,
                        human_bytes(p.bytes)
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("berth: warm: {name}: {e}");
                    }
                }
            }
        });
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

impl Puller {
    async fn pull(&self, image: &Image) -> Result<Pulled, String> {
        let (top, media_type, digest) = self.manifest(image, &image.reference).await?;
        let mut blobs: Vec<Descriptor> = Vec::new();
        let mut platforms = 1;
        match top.manifests {
            Some(children) => {
                let chosen: Vec<Descriptor> = children
                    .into_iter()
                    .filter(|c| match &c.platform {
                        Some(p) if p.os == "unknown" => false,
                        Some(p) => {
                            self.platforms.is_empty() || self.platforms.iter().any(|s| s.matches(p))
                        }
                        None => self.platforms.is_empty(),
                    })
                    .take(MAX_CHILDREN)
                    .collect();
                if chosen.is_empty() {
                    return Err(format!(
                        "the index ({media_type}) lists none of the platforms asked for"
                    ));
                }
                platforms = chosen.len();
                for child in chosen {
                    let (m, _, _) = self
                        .manifest(image, &Reference::Digest(child.digest))
                        .await?;
                    blobs.extend(m.pull_blobs());
                }
            }
            None => blobs.extend(top.pull_blobs()),
        }
        let mut seen = std::collections::HashSet::new();
        blobs.retain(|b| seen.insert(b.digest));
        let count = blobs.len();
        let results: Vec<Result<u64, String>> = futures_util::stream::iter(blobs)
            .map(|b| self.blob(image, b))
            .buffer_unordered(BLOB_CONCURRENCY)
            .collect()
            .await;
        let mut bytes = 0;
        for r in results {
            bytes += r?;
        }
        Ok(Pulled {
            digest,
            platforms,
            blobs: count,
            bytes,
        })
    }

    fn url(&self, image: &Image, what: &str) -> String {
        let mut url = format!("{}/v2/{}/{what}", self.base, image.repo);
        if let Some(ns) = &image.ns {
            url.push_str("?ns=");
            url.push_str(&form_urlencoded::byte_serialize(ns.as_bytes()).collect::<String>());
        }
        url
    }

    async fn get(
        &self,
        url: &str,
        accept: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let mut req = Request::get(url).header(header::ACCEPT, accept);
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth);
        }
        let req = req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))?;
        let resp = tokio::time::timeout(HEADERS_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("{url}: no answer in {}s", HEADERS_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
        if resp.status() == StatusCode::OK {
            return Ok(resp);
        }
        let status = resp.status();
        let body = read(resp.into_body(), 64 << 10).await.unwrap_or_default();
        Err(format!("{url}: {status}{}", registry_error(&body)))
    }

    /// A manifest, parsed, with its media type and digest.
    async fn manifest(
        &self,
        image: &Image,
        reference: &Reference,
    ) -> Result<(Manifest, String, String), String> {
        let url = self.url(image, &format!("manifests/{reference}"));
        let resp = self.get(&url, ACCEPT).await?;
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = read(resp.into_body(), MAX_MANIFEST)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let digest = Digest::of(&body);
        if let Reference::Digest(want) = reference {
            if *want != digest {
                return Err(format!("{url}: the manifest's digest is {digest}"));
            }
        }
        let m = Manifest::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
        Ok((m, media_type, digest.to_string()))
    }

    /// Reads a blob to the end, checking its digest; its length.
    async fn blob(&self, image: &Image, d: Descriptor) -> Result<u64, String> {
        let url = self.url(image, &format!("blobs/{}", d.digest));
        let mut body = self.get(&url, "*/*").await?.into_body();
        let mut hash = sha2::Sha256::new();
        let mut len = 0u64;
        loop {
            match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
                Err(_) => return Err(format!("{url}: the body stalled")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(format!("{url}: {e}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        len += data.len() as u64;
                        hash.update(&data);
                    }
                }
            }
        }
        let got = Digest::from_sha256(hash.finalize().into());
        if got != d.digest {
            return Err(format!("{url}: the body's digest is {got}"));
        }
        Ok(len)
    }
}

async fn read(body: hyper::body::Incoming, max: usize) -> Result<Bytes, String> {
    let limited = http_body_util::Limited::new(body, max);
    match tokio::time::timeout(IDLE_TIMEOUT, limited.collect()).await {
        Err(_) => Err("the body stalled".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// `: CODE message` from a registry error document, or nothing.
fn registry_error(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match (
        v["errors"][0]["code"].as_str(),
        v["errors"][0]["message"].as_str(),
    ) {
        (Some(c), Some(m)) => format!(": {c} {m}"),
        (Some(c), None) => format!(": {c}"),
        _ => String::new(),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(inner) = next {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        next = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_normalise_like_docker() {
        let i = parse_image("alpine", None).unwrap();
        assert_eq!(i.repo.as_str(), "library/alpine");
        assert_eq!(i.reference.to_string(), "latest");
        assert_eq!(i.ns, None);
        let i = parse_image("docker.io/alpine:3.19", None).unwrap();
        assert_eq!(i.repo.as_str(), "library/alpine");
        assert_eq!(i.reference.to_string(), "3.19");
        let i = parse_image("ghcr.io/owner/app:1", None).unwrap();
        assert_eq!(
            (i.ns.as_deref(), i.repo.as_str()),
            (Some("ghcr.io"), "owner/app")
        );
        let i = parse_image("localhost:5000/app", None).unwrap();
        assert_eq!(i.ns.as_deref(), Some("localhost:5000"));
        assert_eq!(i.repo.as_str(), "app");
        let d = format!("sha256:{}", "a".repeat(64));
        let i = parse_image(&format!("user/app@{d}"), None).unwrap();
        assert_eq!(i.reference.to_string(), d);
        assert_eq!(i.repo.as_str(), "user/app");
        let i = parse_image("app", Some("quay.io")).unwrap();
        assert_eq!((i.ns.as_deref(), i.repo.as_str()), (Some("quay.io"), "app"));
        assert!(parse_image("Bad", None).is_err());
        assert!(parse_image("a@sha256:zz", None).is_err());
    }
}
