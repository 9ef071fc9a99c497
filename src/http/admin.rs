//! The admin routes: purges of mirrored content (a manifest DELETE on a mirrored repository,
//! and `DELETE /_berth/api/mirror/<name>` for a whole one), warm-ups
//! (`POST /_berth/api/warm/<name>`) and the users of the htpasswd file
//! (`/_berth/api/users[/<name>]`). Authorization (a user whom a rule makes admin of the
//! repository, or of `*` for users) has been done.

use super::*;
use crate::mirror::purge::{PurgeReport, PurgeTarget};

impl App {
    /// `DELETE /v2/<name>/manifests/<reference>` on a mirrored repository.
    pub(super) async fn purge_manifest(
        &self,
        name: RepoName,
        reference: Reference,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        let target = match reference {
            Reference::Tag(t) => PurgeTarget::Tag(t),
            Reference::Digest(d) => PurgeTarget::Manifest(d),
        };
        self.purge(name, target, query).await
    }

    /// `DELETE /_berth/api/mirror/<name>[?ns=<upstream>]`.
    pub(super) async fn purge_repository(
        &self,
        name: RepoName,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        if self.is_private(&name) {
            return Err(RegistryError::Denied(format!(
                "{name} is in the private namespace, not mirrored: delete its manifests instead"
            )));
        }
        self.purge(name, PurgeTarget::Repository, query).await
    }

    async fn purge(
        &self,
        name: RepoName,
        target: PurgeTarget,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let report: PurgeReport = self.mirror.purge(&up, &name, target).await?;
        let body =
            serde_json::to_string(&report).map_err(|e| RegistryError::Internal(e.to_string()))?;
        json_response(StatusCode::ACCEPTED, body)
    }
}

/// Longest body of an admin request (a password): anything longer is refused unread.
const MAX_ADMIN_BODY: usize = 4 << 10;
/// Longest wait for an admin request's body.
const ADMIN_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `PUT /_berth/api/users/<name>`'s body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPassword {
    password: String,
}

impl App {
    /// `POST /_berth/api/warm/<name>?reference=TAG|DIGEST&platform=OS/ARCH[/VARIANT]...&ns=`:
    /// starts pulling the image into the cache (the reference defaults to `latest`; every
    /// platform of an index unless some are named) and answers 202 at once; the warm-up logs
    /// and counts its result.
    pub(super) fn start_warm(
        &self,
        name: RepoName,
        query: Option<&str>,
    ) -> Result<Response<Body>, RegistryError> {
        use crate::mirror::warm::WarmRequest;
        use crate::oci::platform::PlatformSpec;
        let mut reference = Reference::parse("latest")?;
        let mut platforms = Vec::new();
        let mut upstream = None;
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "reference" => reference = Reference::parse(&v)?,
                "platform" if platforms.len() < 32 => {
                    platforms.push(PlatformSpec::parse(&v).map_err(RegistryError::Unsupported)?)
                }
                "platform" => {
                    return Err(RegistryError::Unsupported(
                        "at most 32 platforms a warm-up".into(),
                    ))
                }
                "ns" => upstream = Some(v.into_owned()),
                _ => {}
            }
        }
        if self.is_private(&name) {
            return Err(RegistryError::Denied(format!(
                "{name} is in the private namespace: it is stored here, not mirrored"
            )));
        }
        // Refused now, not in the background, when the upstream is unknown.
        let (up, _) = self.mirror.route(upstream.as_deref(), name.clone())?;
        let body = serde_json::json!({
            "repository": name.as_str(),
            "reference": reference.to_string(),
            "upstream": up.name,
            "platforms": platforms.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
        .to_string();
        let started = crate::mirror::warm::start(
            &self.mirror,
            WarmRequest {
                upstream,
                repository: name,
                reference,
                platforms,
            },
        );
        if !started {
            return Err(RegistryError::TooManyRequests {
                retry_after: std::time::Duration::from_secs(10),
            });
        }
        json_response(StatusCode::ACCEPTED, body)
    }

    /// `/_berth/api/users[/<name>]`: GET lists the users of the htpasswd file; PUT (body
    /// `{"password": "..."}`) adds a user or sets a password; DELETE removes one. Changes are
    /// picked up as `berth user` changes are: the file is re-read when it changes.
    pub(super) async fn users(
        &self,
        user: Option<String>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, RegistryError> {
        let Some(path) = self.config.htpasswd.clone() else {
            return Err(RegistryError::Unsupported(
                "no htpasswd file is configured".into(),
            ));
        };
        let method = req.method().clone();
        let bad_name = |e: std::io::Error| RegistryError::NameInvalid(e.to_string());
        match (user, method) {
            (None, Method::GET) => {
                let text = blocking(move || match std::fs::read_to_string(&path) {
                    Ok(t) => Ok(t),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                    Err(e) => Err(e),
                })
                .await?;
                let (users, _) = crate::auth::parse_htpasswd(&text);
                let mut names: Vec<String> = users.into_keys().collect();
                names.sort();
                json_response(
                    StatusCode::OK,
                    serde_json::json!({ "users": names }).to_string(),
                )
            }
            (Some(name), Method::PUT) => {
                crate::auth::check_user_name(&name).map_err(bad_name)?;
                let body = tokio::time::timeout(
                    ADMIN_BODY_TIMEOUT,
                    http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY).collect(),
                )
                .await
                .map_err(|_| {
                    tracing::warn!(user = %name, "admin API: a user's body took too long; refused");
                    RegistryError::Unsupported("the body took too long".into())
                })?
                .map_err(|_| {
                    tracing::warn!(user = %name, limit = MAX_ADMIN_BODY, "admin API: a user's body is too large; refused");
                    RegistryError::TooLarge(format!("a body over {MAX_ADMIN_BODY} bytes"))
                })?
                .to_bytes();
                let SetPassword { password } = serde_json::from_slice(&body).map_err(|e| {
                    RegistryError::Unsupported(format!("expected {{\"password\": \"...\"}}: {e}"))
                })?;
                let _edit = USERS_EDIT.lock().await;
                let n = name.clone();
                let existed = blocking(move || {
                    crate::auth::add_user(&path, &n, &password, crate::auth::DEFAULT_COST)
                })
                .await?;
                tracing::info!(user = %name, existed, "user set through the admin API");
                json_response(
                    if existed {
                        StatusCode::OK
                    } else {
                        StatusCode::CREATED
                    },
                    serde_json::json!({ "user": name, "created": !existed }).to_string(),
                )
            }
            (Some(name), Method::DELETE) => {
                crate::auth::check_user_name(&name).map_err(bad_name)?;
                let _edit = USERS_EDIT.lock().await;
                let n = name.clone();
                if !blocking(move || crate::auth::remove_user(&path, &n)).await? {
                    return Err(RegistryError::NotFound(format!("no user {name:?}")));
                }
                tracing::info!(user = %name, "user removed through the admin API");
                json_response(
                    StatusCode::ACCEPTED,
                    serde_json::json!({ "user": name }).to_string(),
                )
            }
            _ => Err(RegistryError::Unsupported(
                "GET /_berth/api/users, PUT or DELETE /_berth/api/users/NAME".into(),
            )),
        }
    }
}

/// One change to the htpasswd file at a time: each is a read, an edit and a rewrite.
static USERS_EDIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn json_response(status: StatusCode, body: String) -> Result<Response<Body>, RegistryError> {
    let mut resp = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(full(body))
        .map_err(internal)?;
    api_version(&mut resp);
    Ok(resp)
}
