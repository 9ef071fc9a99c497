//! What a request needs credentials for: [`Access`], the policy's classes of requests, and
//! [`Need`], the actions on a resource a token must grant.

use http::Method;

use crate::config::Config;
use crate::oci::routes::Route;

use crate::auth::Actions;

/// What a request needs credentials to allow: actions on a resource (`repository:NAME` or
/// `registry:catalog`), as a token scope names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub resource: String,
    pub actions: Actions,
}

/// The resource user management needs, in token-scope terms.
pub const USERS_RESOURCE: &str = "registry:users";

impl Need {
    /// What a route needs, in token-scope terms; None for routes outside any repository.
    pub fn of(route: &Route, method: &Method) -> Option<Need> {
        let read = matches!(*method, Method::GET | Method::HEAD);
        let (name, actions) = match route {
            Route::Catalog => {
                return Some(Need {
                    resource: "registry:catalog".into(),
                    actions: Actions::ALL,
                })
            }
            Route::Manifest { name, .. } | Route::Blob { name, .. } => (
                name,
                match *method {
                    Method::GET | Method::HEAD => Actions::PULL,
                    Method::DELETE => Actions::DELETE,
                    _ => Actions::PUSH,
                },
            ),
            Route::Tags { name } | Route::Referrers { name, .. } => {
                (name, if read { Actions::PULL } else { Actions::PUSH })
            }
            // Upload sessions, status included, are part of a push.
            Route::UploadStart { name } | Route::Upload { name, .. } => (name, Actions::PUSH),
            // A purge of a whole mirrored repository deletes, as a purge of one manifest does.
            Route::MirrorRepo { name } => (name, Actions::DELETE),
            // A warm-up pulls (admin, besides, which only rules grant).
            Route::Warm { name } => (name, Actions::PULL),
            // Users are no repository's: admin over every repository (see `rules::check`).
            Route::Users { .. } => {
                return Some(Need {
                    resource: USERS_RESOURCE.into(),
                    actions: Actions::ALL,
                })
            }
            _ => return None,
        };
        Some(Need {
            resource: format!("repository:{name}"),
            actions,
        })
    }

    /// The repository the need is about, if any.
    pub fn repository(&self) -> Option<crate::oci::names::RepoName> {
        let name = self.resource.strip_prefix("repository:")?;
        crate::oci::names::RepoName::parse(name).ok()
    }

    /// The scope to put in a challenge: what a client should ask a token for. A push asks for
    /// pull too, as Docker does, since a push reads what is already there.
    pub fn scope(&self) -> String {
        let actions = if self.actions == Actions::ALL {
            "*"
        } else if self.actions.contains(Actions::PUSH) {
            "pull,push"
        } else if self.actions.contains(Actions::DELETE) {
            "delete"
        } else {
            "pull"
        };
        format!("{}:{actions}", self.resource)
    }
}

/// What a request does, as far as authentication is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health, readiness, metrics.
    Probe,
    /// `/v2/`: where `docker login` checks credentials.
    Login,
    /// Pulls through the mirror (and anything else outside the private namespace).
    Mirror,
    /// Pulls from the private namespace, and the catalog that lists it.
    PrivateRead,
    /// Pushes and deletes in the private namespace.
    PrivateWrite,
    /// Purges of mirrored content: a user whom a rule makes admin.
    Admin,
}

/// Which namespace the repository a request names is in (requests that name none: the mirror's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repository {
    Mirrored,
    Private,
}

/// Whether the configuration has a private namespace (`private_ns`), whose catalog then lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespaces {
    MirrorOnly,
    WithPrivate,
}

impl Namespaces {
    pub fn of(config: &Config) -> Namespaces {
        if config.private_ns.is_empty() {
            Namespaces::MirrorOnly
        } else {
            Namespaces::WithPrivate
        }
    }
}

impl Access {
    pub fn of(route: &Route, method: &Method, repo: Repository, namespaces: Namespaces) -> Access {
        let private = repo == Repository::Private;
        let read = matches!(*method, Method::GET | Method::HEAD);
        match route {
            // The token endpoint checks credentials itself.
            Route::Healthz | Route::Readyz | Route::Metrics | Route::Token => Access::Probe,
            Route::Base => Access::Login,
            Route::Catalog if namespaces == Namespaces::WithPrivate => Access::PrivateRead,
            Route::Catalog | Route::Status { .. } => Access::Mirror,
            Route::UploadStart { .. } | Route::Upload { .. } if private => Access::PrivateWrite,
            Route::MirrorRepo { .. } | Route::Warm { .. } | Route::Users { .. } => Access::Admin,
            Route::Manifest { .. } if !private && *method == Method::DELETE => Access::Admin,
            Route::Manifest { .. }
            | Route::Blob { .. }
            | Route::Tags { .. }
            | Route::Referrers { .. }
                if private =>
            {
                if read {
                    Access::PrivateRead
                } else {
                    Access::PrivateWrite
                }
            }
            _ => Access::Mirror,
        }
    }

    /// Whether this access needs a user (`/v2/` aside, which the token flow also opens).
    pub(super) fn needs_user(self, config: &Config) -> bool {
        match self {
            Access::Probe => false,
            Access::Login => config.htpasswd.is_some(),
            Access::Mirror => config.auth_everything,
            Access::PrivateRead => config.auth_everything || !config.private_pull_public,
            Access::PrivateWrite | Access::Admin => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::names::RepoName;

    #[test]
    fn access_policy() {
        let private = RepoName::parse("private/app").unwrap();
        let m = Route::Manifest {
            name: private,
            reference: crate::oci::names::Reference::parse("v1").unwrap(),
        };
        assert_eq!(
            Access::of(
                &m,
                &Method::GET,
                Repository::Private,
                Namespaces::WithPrivate
            ),
            Access::PrivateRead
        );
        assert_eq!(
            Access::of(
                &m,
                &Method::PUT,
                Repository::Private,
                Namespaces::WithPrivate
            ),
            Access::PrivateWrite
        );
        assert_eq!(
            Access::of(
                &m,
                &Method::PUT,
                Repository::Mirrored,
                Namespaces::WithPrivate
            ),
            Access::Mirror
        );
        assert_eq!(
            Access::of(
                &Route::Catalog,
                &Method::GET,
                Repository::Mirrored,
                Namespaces::MirrorOnly
            ),
            Access::Mirror
        );
        assert_eq!(
            Access::of(
                &Route::Healthz,
                &Method::GET,
                Repository::Mirrored,
                Namespaces::WithPrivate
            ),
            Access::Probe
        );
    }
}
