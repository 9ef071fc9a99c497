//! The wire grammar of requests: which route a path names, with its parsed parts.
//!
//! A request path is parsed once, here, into a `Route` holding typed names, references and
//! digests; anything that does not parse is answered with the spec's error before any handler,
//! cache or file is involved.

use crate::oci::error::RegistryError;
use crate::oci::names::{Digest, Reference, RepoName};

/// RFC 3986's unreserved characters, which a percent-encoded URL component keeps as they are.
pub const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: API version check, and where `docker login` authenticates.
    Base,
    Catalog,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    Tags {
        name: RepoName,
    },
    Referrers {
        name: RepoName,
        digest: Digest,
    },
    /// `POST /v2/<name>/blobs/uploads/`
    UploadStart {
        name: RepoName,
    },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload {
        name: RepoName,
        id: UploadId,
    },
    /// Where clients trade credentials (or none) for a Bearer token.
    Token,
    Healthz,
    Readyz,
    Metrics,
    /// The status page and its per-repository pages.
    Status {
        path: String,
    },
    /// `/_berth/api/mirror/<name>`: a whole mirrored repository (an admin purges it).
    MirrorRepo {
        name: RepoName,
    },
    /// `/_berth/api/warm/<name>`: an admin starts pulling an image of it into the cache.
    Warm {
        name: RepoName,
    },
    /// `/_berth/api/users[/<user>]`: an admin lists, sets or removes users of the htpasswd file.
    /// The name is checked by the handler, as `berth user` checks it.
    Users {
        user: Option<String>,
    },
}

/// An upload session id: berth issues them as 32 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId(String);

impl UploadId {
    pub fn new() -> UploadId {
        UploadId(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn parse(s: &str) -> Result<UploadId, RegistryError> {
        if s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(UploadId(s.to_owned()))
        } else {
            Err(RegistryError::BlobUploadUnknown(
                s.chars().take(100).collect(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for UploadId {
    fn default() -> Self {
        UploadId::new()
    }
}

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Route {
    pub fn parse(path: &str) -> Result<Route, RegistryError> {
        match path {
            "/v2" | "/v2/" => return Ok(Route::Base),
            "/v2/_catalog" => return Ok(Route::Catalog),
            "/healthz" => return Ok(Route::Healthz),
            "/readyz" => return Ok(Route::Readyz),
            "/metrics" => return Ok(Route::Metrics),
            "/auth/token" => return Ok(Route::Token),
            _ => {}
        }
        if let Some(name) = path.strip_prefix("/_berth/api/mirror/") {
            return Ok(Route::MirrorRepo {
                name: RepoName::parse(name.trim_end_matches('/'))?,
            });
        }
        if let Some(name) = path.strip_prefix("/_berth/api/warm/") {
            return Ok(Route::Warm {
                name: RepoName::parse(name.trim_end_matches('/'))?,
            });
        }
        if path == "/_berth/api/users" {
            return Ok(Route::Users { user: None });
        }
        if let Some(user) = path.strip_prefix("/_berth/api/users/") {
            return Ok(Route::Users {
                user: Some(user.chars().take(200).collect()),
            });
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            if path == "/" || path.starts_with("/ui/") {
                return Ok(Route::Status {
                    path: path.to_owned(),
                });
            }
            return Err(RegistryError::NotFound(path.chars().take(200).collect()));
        };
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Route::Tags {
                name: RepoName::parse(name)?,
            });
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Ok(Route::UploadStart {
                name: RepoName::parse(name)?,
            });
        }
        // The name may itself contain "manifests" or "blobs" segments; the route's keyword is the
        // second-to-last segment, and the reference (which never holds a slash) the last.
        let (head, last) = rest.rsplit_once('/').ok_or_else(|| not_found(path))?;
        let (name, kind) = head.rsplit_once('/').ok_or_else(|| not_found(path))?;
        match kind {
            "manifests" => Ok(Route::Manifest {
                name: RepoName::parse(name)?,
                reference: Reference::parse(last)?,
            }),
            "blobs" => Ok(Route::Blob {
                name: RepoName::parse(name)?,
                digest: Digest::parse(last)?,
            }),
            "referrers" => Ok(Route::Referrers {
                name: RepoName::parse(name)?,
                digest: Digest::parse(last)?,
            }),
            "uploads" => {
                let name = name.strip_suffix("/blobs").ok_or_else(|| not_found(path))?;
                Ok(Route::Upload {
                    name: RepoName::parse(name)?,
                    id: UploadId::parse(last)?,
                })
            }
            _ => Err(not_found(path)),
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::UploadStart { .. } | Route::Upload { .. } => "upload",
            Route::Token => "token",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Status { .. } => "status",
            Route::MirrorRepo { .. } | Route::Warm { .. } | Route::Users { .. } => "admin",
        }
    }
}

fn not_found(path: &str) -> RegistryError {
    RegistryError::NotFound(path.chars().take(200).collect())
}

/// The query parameters berth understands, decoded.
#[derive(Debug, Default, Clone)]
pub struct Query {
    /// containerd's `?ns=<registry host>`: which upstream the client meant.
    pub ns: Option<String>,
    pub n: Option<String>,
    pub last: Option<String>,
    pub digest: Option<String>,
    pub mount: Option<String>,
    pub from: Option<String>,
    pub artifact_type: Option<String>,
}

impl Query {
    pub fn parse(query: Option<&str>) -> Query {
        let mut q = Query::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let slot = match k.as_ref() {
                "ns" => &mut q.ns,
                "n" => &mut q.n,
                "last" => &mut q.last,
                "digest" => &mut q.digest,
                "mount" => &mut q.mount,
                "from" => &mut q.from,
                "artifactType" => &mut q.artifact_type,
                _ => continue,
            };
            *slot = Some(v.into_owned());
        }
        q
    }

    /// `n` as a page size; a value that is not a number is a client error.
    pub fn page_size(&self) -> Result<Option<usize>, RegistryError> {
        match &self.n {
            None => Ok(None),
            Some(n) => n
                .parse()
                .map(Some)
                .map_err(|_| RegistryError::Unsupported(format!("n={n:?} is not a number"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let d = Digest::of(b"x");
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        assert!(matches!(
            Route::parse("/v2/library/alpine/manifests/latest").unwrap(),
            Route::Manifest { .. }
        ));
        assert!(
            matches!(Route::parse(&format!("/v2/a/manifests/b/blobs/{d}")).unwrap(), Route::Blob { name, .. } if name.as_str() == "a/manifests/b")
        );
        assert!(matches!(
            Route::parse("/v2/alpine/tags/list").unwrap(),
            Route::Tags { .. }
        ));
        assert!(matches!(
            Route::parse("/v2/private/app/blobs/uploads/").unwrap(),
            Route::UploadStart { .. }
        ));
        let id = UploadId::new();
        assert!(matches!(
            Route::parse(&format!("/v2/private/app/blobs/uploads/{id}")).unwrap(),
            Route::Upload { .. }
        ));
        assert!(matches!(
            Route::parse("/v2/Alpine/manifests/latest"),
            Err(RegistryError::NameInvalid(_))
        ));
        assert!(matches!(
            Route::parse("/v2/alpine/manifests/-bad"),
            Err(RegistryError::TagInvalid(_))
        ));
        assert!(matches!(
            Route::parse("/v2/alpine/blobs/sha256:nothex"),
            Err(RegistryError::DigestInvalid(_))
        ));
        assert!(matches!(
            Route::parse("/v2/../../etc/passwd/blobs/x"),
            Err(RegistryError::NameInvalid(_) | RegistryError::DigestInvalid(_))
        ));
        assert!(matches!(
            Route::parse("/v2/alpine/whatever/x"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(
            matches!(Route::parse("/_berth/api/mirror/library/alpine/").unwrap(), Route::MirrorRepo { name } if name.as_str() == "library/alpine")
        );
        assert!(matches!(
            Route::parse("/_berth/api/mirror/../x"),
            Err(RegistryError::NameInvalid(_))
        ));
    }

    #[test]
    fn query_decodes() {
        let q = Query::parse(Some("ns=docker.io&n=10&last=a%3Ab&digest=sha256%3Aab"));
        assert_eq!(q.ns.as_deref(), Some("docker.io"));
        assert_eq!(q.page_size().unwrap(), Some(10));
        assert_eq!(q.last.as_deref(), Some("a:b"));
        assert_eq!(q.digest.as_deref(), Some("sha256:ab"));
    }
}
