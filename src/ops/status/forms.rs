//! The status page's forms: signing in and out, and the actions a signed-in user may take on a
//! repository: deleting a private tag or manifest; for admins, purging a mirrored repository and
//! starting a warm-up of one of its images.
//!
//! Every post is read within [`FORM_LIMIT`] bytes and [`FORM_WAIT`], refused (403, a WARN line
//! and `berth_status_form_refused_total`) when its origin is another site or its CSRF token is
//! wrong, and answered with a redirect (303) back to a page, so reloading never posts twice.
//! Actions go through the registry's own code (its locks, its webhooks), after the permission
//! check of [`permitted`], the one place that decides who may do what from this page.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use http::header::{LOCATION, RETRY_AFTER, SET_COOKIE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::auth::{rules, Access, Actions, Need, User};
use crate::config::Config;
use crate::http::Body;
use crate::mirror::purge::PurgeTarget;
use crate::oci::error::RegistryError;
use crate::oci::names::{Digest, Reference, RepoName, Tag};
use crate::ops::Service;

use super::render::{esc, head, percent_decode, percent_encode};
use super::session::{self, Refusals, Viewer, COOKIE_NAME, LOGIN_COOKIE, SESSION_TTL};
use super::{html_response, PRIVATE};

/// The largest form body read.
pub const FORM_LIMIT: usize = 8 << 10;
/// The longest a form body may take to arrive.
pub const FORM_WAIT: Duration = Duration::from_secs(10);

/// What a signed-in user can ask for on a repository's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove one tag of a private repository (its manifest stays, by digest).
    DeleteTag(Tag),
    /// Remove a manifest of a private repository, and every tag pointing at it.
    DeleteManifest(Digest),
    /// Remove a mirrored repository from the cache (admin).
    Purge,
    /// Pull an image of a mirrored repository into the cache, in the background (admin).
    Warm(Reference),
}

impl Action {
    fn parse(form: &HashMap<String, String>) -> Result<Action, RegistryError> {
        let field = |k: &str| {
            form.get(k)
                .map(String::as_str)
                .ok_or_else(|| RegistryError::Unsupported(format!("the form has no {k} field")))
        };
        match field("action")? {
            "delete-tag" => Ok(Action::DeleteTag(Tag::parse(field("tag")?)?)),
            "delete-manifest" => Ok(Action::DeleteManifest(Digest::parse(field("digest")?)?)),
            "purge" => Ok(Action::Purge),
            "warm" => Ok(Action::Warm(Reference::parse(
                form.get("reference")
                    .map(|r| r.trim())
                    .filter(|r| !r.is_empty())
                    .unwrap_or("latest"),
            )?)),
            other => Err(RegistryError::Unsupported(format!(
                "unknown action {:?}",
                other.chars().take(40).collect::<String>()
            ))),
        }
    }

    /// What the API would need for the same thing, in token-scope terms.
    fn need(&self, name: &RepoName) -> Need {
        Need {
            resource: format!("repository:{name}"),
            actions: match self {
                Action::DeleteTag(_) | Action::DeleteManifest(_) | Action::Purge => Actions::DELETE,
                Action::Warm(_) => Actions::PULL,
            },
        }
    }

    /// Whether it acts on mirrored content, as an admin (else on the private namespace).
    fn on_mirror(&self) -> bool {
        matches!(self, Action::Purge | Action::Warm(_))
    }

    /// What the redirect after it tells the page to show.
    fn done(&self) -> (&'static str, String) {
        match self {
            Action::DeleteTag(t) => ("deleted", t.to_string()),
            Action::DeleteManifest(d) => ("deleted", d.to_string()),
            Action::Purge => ("purged", String::new()),
            Action::Warm(r) => ("warming", r.to_string()),
        }
    }
}

/// Whether `user` may take `action` on `name`: the API's own check for the same request (the
/// access rules for its [`Access`], and its [`Need`] and [`User::may`]), so per-repository
/// permissions apply here as they do there: deletes in the private namespace as the rules say
/// (every user without rules), purges and warm-ups of mirrored repositories for their admins.
pub fn permitted(config: &Config, user: &User, name: &RepoName, action: &Action) -> bool {
    let need = action.need(name);
    let access = if action.on_mirror() {
        Access::Admin
    } else {
        Access::PrivateWrite
    };
    rules::check(config, user.name(), access, &need).is_ok() && user.may(&need)
}

/// Does `action` for `user` on the repository `name` (`upstream` is [`PRIVATE`] or a mirror's key).
/// Permission has been checked.
async fn perform(
    app: &Service,
    user: &User,
    upstream: &str,
    name: RepoName,
    action: &Action,
) -> Result<(), RegistryError> {
    if (upstream == PRIVATE) == action.on_mirror() {
        return Err(RegistryError::Unsupported(if action.on_mirror() {
            "purges and warm-ups are for mirrored repositories".into()
        } else {
            "deletes are for private repositories".into()
        }));
    }
    let mirror = &app.app.mirror;
    let reference = match action {
        Action::DeleteTag(t) => Reference::Tag(t.clone()),
        Action::DeleteManifest(d) => Reference::Digest(*d),
        Action::Purge => {
            let (up, name) = mirror.route(Some(upstream), name)?;
            mirror.purge(&up, &name, PurgeTarget::Repository).await?;
            app.pages.changed();
            return Ok(());
        }
        Action::Warm(reference) => {
            let started = crate::mirror::warm::start(
                mirror,
                crate::mirror::warm::WarmRequest {
                    upstream: Some(upstream.to_owned()),
                    repository: name,
                    reference: reference.clone(),
                    platforms: Vec::new(),
                },
            );
            return if started {
                Ok(())
            } else {
                Err(RegistryError::TooManyRequests {
                    retry_after: Duration::from_secs(10),
                })
            };
        }
    };
    crate::http::private::delete_manifest_for(&app.app, name, reference, user).await?;
    app.pages.changed();
    Ok(())
}

/// Answers a form posted to `path`.
pub async fn post(
    app: &Service,
    path: &str,
    req: Request<Incoming>,
    client: IpAddr,
) -> Result<Response<Body>, RegistryError> {
    let sessions = &app.pages.sessions;
    let public = app.config.public_url.as_ref().map(|u| u.to_string());
    if let Some(why) = session::foreign_origin(&req, public.as_deref()) {
        Refusals::count(&sessions.refusals.origin);
        tracing::warn!(%client, path, reason = why, "status page form refused: posted from another site");
        return Err(RegistryError::Denied(
            "this form was posted from another site".into(),
        ));
    }
    let viewer = sessions.viewer(app, &req).await;
    let secure = session::secure(app, &req);
    let login_id = session::cookie(req.headers(), LOGIN_COOKIE).map(str::to_owned);
    let form = read_form(req).await?;
    let token = form.get("csrf").map(String::as_str).unwrap_or("");
    let csrf_refused = |what: &str| {
        Refusals::count(&sessions.refusals.csrf);
        tracing::warn!(%client, path, form = what, "status page form refused: missing or wrong CSRF token");
        RegistryError::Denied("the form's token is missing or stale; reload the page".into())
    };
    if path == "/ui/login" {
        let fresh = login_id
            .as_deref()
            .is_some_and(|id| sessions.token_ok("login", id, token));
        if !fresh {
            return Err(csrf_refused("sign-in"));
        }
        return sign_in(app, &form, secure, client).await;
    }
    let (Some(id), Some(user)) = (viewer.session.as_deref(), viewer.user.as_ref()) else {
        if path == "/ui/logout" {
            return Ok(see_other(
                "/",
                vec![session::clear_cookie(secure, COOKIE_NAME)],
            ));
        }
        Refusals::count(&sessions.refusals.no_session);
        tracing::warn!(%client, path, "status page form refused: not signed in");
        return Err(RegistryError::Denied("sign in first".into()));
    };
    if !sessions.token_ok("session", id, token) {
        return Err(csrf_refused(path));
    }
    if path == "/ui/logout" {
        sessions.end(id).await;
        tracing::info!(%client, user = user.name(), "signed out of the status page");
        return Ok(see_other(
            "/",
            vec![session::clear_cookie(secure, COOKIE_NAME)],
        ));
    }
    let Some((upstream, name)) = path
        .strip_prefix("/ui/repo/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return Err(RegistryError::NotFound(path.chars().take(200).collect()));
    };
    let upstream = percent_decode(upstream);
    let name = RepoName::parse(name.trim_end_matches('/'))?;
    if (upstream == PRIVATE) != app.is_private(&name) {
        return Err(RegistryError::NameUnknown(name.to_string()));
    }
    let action = Action::parse(&form)?;
    if !permitted(&app.config, user, &name, &action) {
        Refusals::count(&sessions.refusals.permission);
        tracing::warn!(%client, user = user.name(), repository = %name, ?action, "status page action refused: no permission");
        return Err(RegistryError::Denied(format!(
            "{} may not do this on {name}",
            user.name()
        )));
    }
    perform(app, user, &upstream, name.clone(), &action).await?;
    tracing::info!(%client, user = user.name(), repository = %name, ?action, "status page action done");
    let (key, value) = action.done();
    let back = format!(
        "/ui/repo/{}/{}?{key}={}",
        percent_encode(&upstream),
        name,
        form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>()
    );
    Ok(see_other(&back, Vec::new()))
}

async fn sign_in(
    app: &Service,
    form: &HashMap<String, String>,
    secure: bool,
    client: IpAddr,
) -> Result<Response<Body>, RegistryError> {
    let name = form.get("user").map(String::as_str).unwrap_or("");
    let password = form.get("password").map(String::as_str).unwrap_or("");
    let sessions = &app.pages.sessions;
    match app.auth.sign_in(name, password, client).await {
        Ok(user) => {
            let id = sessions.start(user.name()).await;
            tracing::info!(%client, user = user.name(), "signed in to the status page");
            Ok(see_other(
                "/",
                vec![
                    session::set_cookie(secure, COOKIE_NAME, &id, SESSION_TTL),
                    session::clear_cookie(secure, LOGIN_COOKIE),
                ],
            ))
        }
        Err(RegistryError::Unauthorized(_)) => {
            Refusals::count(&sessions.refusals.failed_sign_ins);
            // Not even the user name is logged: people type passwords into the wrong field.
            tracing::warn!(%client, "status page sign-in failed");
            Ok(login_page(
                app,
                secure,
                StatusCode::UNAUTHORIZED,
                Some("Sign-in failed: wrong user name or password."),
                false,
            ))
        }
        Err(RegistryError::TooManyRequests { retry_after }) => {
            tracing::warn!(%client, retry_after_s = retry_after.as_secs(), "status page sign-in refused: too many attempts");
            let mut resp = login_page(
                app,
                secure,
                StatusCode::TOO_MANY_REQUESTS,
                Some("Too many sign-in attempts; wait a minute and try again."),
                false,
            );
            if let Ok(v) = http::HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
                resp.headers_mut().insert(RETRY_AFTER, v);
            }
            Ok(resp)
        }
        Err(e) => Err(e),
    }
}

/// The sign-in form, with a new pre-session cookie and the token bound to it.
pub(super) fn login_page(
    app: &Service,
    secure: bool,
    status: StatusCode,
    message: Option<&str>,
    head_only: bool,
) -> Response<Body> {
    let (id, cookie) = app.pages.sessions.login_cookie(secure);
    let token = app.pages.sessions.token("login", &id);
    let mut h = String::with_capacity(4 << 10);
    let viewer = Viewer::default();
    head(&mut h, "sign in — berth", &viewer);
    h.push_str("<main><section><h2>Sign in</h2>");
    if app.config.htpasswd.is_none() {
        h.push_str(
            "<p class=\"bad\">No users are configured (no htpasswd file), so nobody can sign in.</p>",
        );
    }
    if let Some(m) = message {
        let _ = write!(h, "<p class=\"bad\" id=\"sign-in-error\">{}</p>", esc(m));
    }
    let _ = writeln!(
        h,
        "<form method=\"post\" action=\"/ui/login\" id=\"sign-in\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <p><label>User <input name=\"user\" autocomplete=\"username\" required></label></p>\
         <p><label>Password <input name=\"password\" type=\"password\" \
         autocomplete=\"current-password\" required></label></p>\
         <p><button type=\"submit\">Sign in</button></p></form>\
         <p class=\"muted\">The users of the htpasswd file. Signing in shows private \
         repositories and lets you act on them; it is not a login for the registry API.</p>\
         </section></main></body></html>",
        esc(&token)
    );
    let mut resp = html_response(status, h, head_only);
    if let Ok(v) = http::HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
    resp
}

/// A 303 to `location`, setting `cookies`.
pub(super) fn see_other(location: &str, cookies: Vec<String>) -> Response<Body> {
    let mut b = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(LOCATION, location)
        .header(http::header::CACHE_CONTROL, "no-store");
    for c in cookies {
        b = b.header(SET_COOKIE, c);
    }
    b.body(crate::http::empty()).unwrap_or_default()
}

/// The fields of a url-encoded form body, read within [`FORM_LIMIT`] and [`FORM_WAIT`]. A field
/// given twice keeps its first value.
async fn read_form(req: Request<Incoming>) -> Result<HashMap<String, String>, RegistryError> {
    let too_large = || RegistryError::TooLarge(format!("a form may be at most {FORM_LIMIT} bytes"));
    let declared = crate::mirror::upstream::content_length(req.headers());
    if declared.is_some_and(|n| n > FORM_LIMIT as u64) {
        return Err(too_large());
    }
    let body = http_body_util::Limited::new(req.into_body(), FORM_LIMIT).collect();
    let bytes = match tokio::time::timeout(FORM_WAIT, body).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => return Err(RegistryError::SizeInvalid(format!("reading the form: {e}"))),
        Err(_) => {
            return Err(RegistryError::SizeInvalid(format!(
                "the form did not arrive within {} s",
                FORM_WAIT.as_secs()
            )))
        }
    };
    let mut form = HashMap::new();
    for (k, v) in form_urlencoded::parse(&bytes) {
        form.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    Ok(form)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_users_the_api_would_let_delete_may_delete_from_the_page() {
        let app = RepoName::parse("private/app").unwrap();
        let other = RepoName::parse("private/other").unwrap();
        let tag = Action::DeleteTag(Tag::parse("v1").unwrap());
        let manifest = Action::DeleteManifest(Digest::of(b"m"));
        let puller = User::limited("bob", "repository:private/app", Actions::PULL);
        let pusher = User::limited(
            "bob",
            "repository:private/app",
            Actions::PULL.union(Actions::PUSH),
        );
        let deleter = User::limited("carol", "repository:private/app", Actions::DELETE);
        let mut config = Config {
            private_ns: vec!["private".into()],
            ..Config::default()
        };
        for action in [&tag, &manifest] {
            assert!(!permitted(&config, &puller, &app, action));
            assert!(!permitted(&config, &pusher, &app, action));
            assert!(permitted(&config, &deleter, &app, action));
            assert!(
                !permitted(&config, &deleter, &other, action),
                "another repository"
            );
        }
        // Purges and warm-ups of mirrored repositories: for their admins only; with no rules,
        // nobody is one.
        let alpine = RepoName::parse("library/alpine").unwrap();
        let warm = Action::Warm(Reference::parse("3").unwrap());
        let user = User::limited("carol", "repository:library/alpine", Actions::ALL);
        assert!(!permitted(&config, &user, &alpine, &Action::Purge));
        assert!(!permitted(&config, &user, &alpine, &warm));
        let rules = Config::from_toml(
            "[[access]]\nusers = [\"carol\"]\nrepositories = [\"library/*\"]\nactions = [\"admin\"]\n",
        )
        .unwrap();
        config.access = rules.access;
        assert!(permitted(&config, &user, &alpine, &Action::Purge));
        assert!(permitted(&config, &user, &alpine, &warm));
        let dave = User::limited("dave", "repository:library/alpine", Actions::ALL);
        assert!(!permitted(&config, &dave, &alpine, &Action::Purge));
        // The rules now govern the private namespace too: carol may not delete there.
        assert!(!permitted(&config, &deleter, &app, &tag));
    }

    #[test]
    fn forms_name_one_action() {
        let form = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            Action::parse(&form(&[("action", "delete-tag"), ("tag", "v1")])).unwrap(),
            Action::DeleteTag(Tag::parse("v1").unwrap())
        );
        assert!(Action::parse(&form(&[("action", "delete-tag")])).is_err());
        assert!(Action::parse(&form(&[("action", "delete-manifest"), ("digest", "v1")])).is_err());
        assert_eq!(
            Action::parse(&form(&[("action", "purge")])).unwrap(),
            Action::Purge
        );
        assert_eq!(
            Action::parse(&form(&[("action", "warm"), ("reference", " ")])).unwrap(),
            Action::Warm(Reference::parse("latest").unwrap())
        );
        assert!(Action::parse(&form(&[("action", "warm"), ("reference", "a b")])).is_err());
        assert!(Action::parse(&form(&[("action", "drop-tables")])).is_err());
    }
}
