//! Bearer tokens from `/auth/token`: the scopes a request asks for, what its holder may be
//! granted, and the tokens issued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};

use crate::auth::{Access, Authenticator, Namespaces, Need, Repository, User};
use crate::config::Config;
use crate::oci::error::RegistryError;
use crate::oci::names::RepoName;
use crate::oci::routes::Route;

/// Scopes one token request may ask for; more are ignored.
const MAX_SCOPES: usize = 32;

/// How long a token from `/auth/token` is good for.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// Actions of the token scope grammar (`repository:NAME:pull,push`), as a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const PULL: Actions = Actions(1);
    pub const PUSH: Actions = Actions(2);
    pub const DELETE: Actions = Actions(4);
    /// `*`: every action (what the catalog asks for).
    pub const ALL: Actions = Actions(7);

    /// A comma-separated action list; unknown actions grant nothing.
    pub fn parse(list: &str) -> Actions {
        list.split(',')
            .map(|a| match a.trim() {
                "pull" => Actions::PULL,
                "push" => Actions::PUSH,
                "delete" => Actions::DELETE,
                "*" => Actions::ALL,
                _ => Actions::NONE,
            })
            .fold(Actions::NONE, Actions::union)
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    pub fn intersection(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn contains(self, other: Actions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The resources and actions a token was issued for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(HashMap<String, Actions>);

impl Grants {
    pub fn allows(&self, need: &Need) -> bool {
        self.0
            .get(&need.resource)
            .is_some_and(|a| a.contains(need.actions))
    }
}

/// The scopes a token request asks for: every `scope` parameter, each a space-separated list
/// of `type:name:actions`, as (resource, actions).
pub fn requested_scopes(query: Option<&str>) -> Vec<(String, Actions)> {
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if k != "scope" {
            continue;
        }
        for scope in v.split_whitespace() {
            // The name may hold a colon (a registry host with a port); the type may not, and
            // the actions come last.
            let Some((resource, actions)) = scope.rsplit_once(':') else {
                continue;
            };
            if !resource.contains(':') || out.len() >= MAX_SCOPES {
                continue;
            }
            out.push((resource.to_owned(), Actions::parse(actions)));
        }
    }
    out
}

impl Authenticator {
    /// Whether the request carries a valid anonymous Bearer token.
    pub(super) async fn anonymous_token(&self, headers: &HeaderMap) -> bool {
        match bearer(headers) {
            Some(token) => matches!(self.tokens.get(token).await, Some(None)),
            None => false,
        }
    }

    /// `/auth/token`, Docker's token flow: Basic credentials get a token for their user, no
    /// credentials an anonymous token (which pulls what anonymous pulls may pull). A token
    /// grants what the `scope` parameters ask for, as far as its holder may do it.
    pub async fn issue_token(
        &self,
        config: &Config,
        headers: &HeaderMap,
        query: Option<&str>,
        client: IpAddr,
    ) -> Result<String, RegistryError> {
        let user = match headers.get(http::header::AUTHORIZATION) {
            Some(_) => match self.authenticate(headers, client).await? {
                Some(user) => Some(user),
                None => return Err(RegistryError::Unauthorized("invalid credentials".into())),
            },
            None => None,
        };
        let mut grants = Grants::default();
        for (resource, asked) in requested_scopes(query) {
            let mut granted = asked.intersection(rights(config, user.is_some(), &resource));
            // A token traded for another grants no more than it did itself.
            if let Some(held) = user.as_ref().and_then(|u| u.grants.as_ref()) {
                granted = granted.intersection(held.0.get(&resource).copied().unwrap_or_default());
            }
            if !granted.is_empty() {
                let e = grants.0.entry(resource).or_default();
                *e = e.union(granted);
            }
        }
        let holder = user.map(|u| User {
            name: u.name,
            grants: Some(Arc::new(grants)),
        });
        let token = hex::encode(rand::random::<[u8; 32]>());
        self.tokens.insert(token.clone(), holder).await;
        Ok(token)
    }
}

/// What a holder may do with a resource: a user pulls anything and pushes and deletes in the
/// private namespace; anonymous holders pull what anonymous pulls may.
fn rights(config: &Config, user: bool, resource: &str) -> Actions {
    if resource == "registry:catalog" {
        let access = Access::of(
            &Route::Catalog,
            &Method::GET,
            Repository::Mirrored,
            Namespaces::of(config),
        );
        return if user || !access.needs_user(config) {
            Actions::ALL
        } else {
            Actions::NONE
        };
    }
    let Some(name) = resource
        .strip_prefix("repository:")
        .and_then(|n| RepoName::parse(n).ok())
    else {
        return Actions::NONE;
    };
    let private = config.private_ns.iter().any(|ns| name.is_in_namespace(ns));
    let read = if private {
        Access::PrivateRead
    } else {
        Access::Mirror
    };
    match (user, private) {
        (true, true) => Actions::ALL,
        (true, false) => Actions::PULL,
        (false, _) if !read.needs_user(config) => Actions::PULL,
        (false, _) => Actions::NONE,
    }
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_scopes() {
        let asked = requested_scopes(Some(
            "service=berth&scope=repository:private/a:pull,push%20repository:localhost:5000/x:pull&scope=registry:catalog:*&scope=junk",
        ));
        assert_eq!(
            asked,
            vec![
                (
                    "repository:private/a".to_owned(),
                    Actions::PULL.union(Actions::PUSH)
                ),
                ("repository:localhost:5000/x".to_owned(), Actions::PULL),
                ("registry:catalog".to_owned(), Actions::ALL),
            ]
        );
        let config = Config {
            private_ns: vec!["private".into()],
            ..Config::default()
        };
        assert_eq!(rights(&config, true, "repository:private/a"), Actions::ALL);
        assert_eq!(rights(&config, true, "repository:library/a"), Actions::PULL);
        assert_eq!(
            rights(&config, false, "repository:private/a"),
            Actions::NONE
        );
        assert_eq!(
            rights(&config, false, "repository:library/a"),
            Actions::PULL
        );
        assert_eq!(rights(&config, true, "repository:../x"), Actions::NONE);
        let m = Route::Manifest {
            name: RepoName::parse("private/a").unwrap(),
            reference: crate::oci::names::Reference::parse("v1").unwrap(),
        };
        let need = Need::of(&m, &Method::PUT).unwrap();
        assert_eq!(need.scope(), "repository:private/a:pull,push");
        let grants = Grants(asked.into_iter().collect());
        assert!(grants.allows(&need));
        assert!(!grants.allows(&Need::of(&m, &Method::DELETE).unwrap()));
    }
}
