//! Bearer tokens from `/auth/token`: the scopes a request asks for, what its holder may be
//! granted, and the tokens issued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method};
use sha2::Sha256;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
            Some(token) => matches!(self.token_holder(token).await, Some(None)),
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
            let holder = user.as_ref().map(|u| u.name());
            let mut granted = asked.intersection(rights(config, holder, &resource));
            // A token traded for another grants no more than it did itself.
            if let Some(held) = user.as_ref().and_then(|u| u.grants.as_ref()) {
                granted = granted.intersection(held.0.get(&resource).copied().unwrap_or_default());
            }
            if !granted.is_empty() {
                let e = grants.0.entry(resource).or_default();
                *e = e.union(granted);
            }
        }
        let claims = Claims {
            user: user.as_ref().map(|u| u.name.to_string()),
            grants,
            expires: crate::store::now_secs() + TOKEN_TTL.as_secs(),
            nonce: hex::encode(rand::random::<[u8; 8]>()),
        };
        let token = self.token_key.sign(&claims);
        let holder = claims.holder();
        self.tokens.insert(token.clone(), holder).await;
        Ok(token)
    }

    /// Who a token speaks for: from the tokens this berth issued, else, when its signature is
    /// good and it has not expired, from the token itself (another replica issued it).
    pub(super) async fn token_holder(&self, token: &str) -> Option<Option<User>> {
        if let Some(holder) = self.tokens.get(token).await {
            return Some(holder);
        }
        let claims = self.token_key.verify(token)?;
        let holder = claims.holder();
        self.tokens.insert(token.to_owned(), holder.clone()).await;
        Some(holder)
    }
}

/// What a token says about its holder; signed, so that every replica that shares the key
/// can check it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    #[serde(rename = "u")]
    user: Option<String>,
    #[serde(rename = "g")]
    grants: Grants,
    /// Seconds since the epoch.
    #[serde(rename = "e")]
    expires: u64,
    /// Two tokens issued in the same second for the same scopes still differ.
    #[serde(rename = "n")]
    nonce: String,
}

impl Claims {
    fn holder(&self) -> Option<User> {
        self.user.as_ref().map(|name| User {
            name: name.as_str().into(),
            grants: Some(Arc::new(self.grants.clone())),
        })
    }
}

/// The key tokens are signed with (HMAC-SHA256). Random per process unless the content store
/// is shared by replicas, which then share one key (see `ContentStore::cluster_secret`).
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn random() -> TokenKey {
        TokenKey(rand::random())
    }

    pub fn new(key: [u8; 32]) -> TokenKey {
        TokenKey(key)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // An HMAC takes a key of any length; this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }

    /// `base64url(claims JSON) "." base64url(HMAC of the first part)`.
    fn sign(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{tag}")
    }

    /// The claims of a token signed with this key that has not expired.
    fn verify(&self, token: &str) -> Option<Claims> {
        let (body, tag) = token.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&tag).ok()?;
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
        (claims.expires > crate::store::now_secs()).then_some(claims)
    }
}

/// What a holder may do with a resource: a user what the access rules allow (see
/// [`rules`](crate::auth::rules): without rules, pull anything and push and delete in the
/// private namespace; delete in a mirrored repository only as its admin); anonymous holders
/// pull what anonymous pulls may.
fn rights(config: &Config, user: Option<&str>, resource: &str) -> Actions {
    if resource == "registry:catalog" {
        let access = Access::of(
            &Route::Catalog,
            &Method::GET,
            Repository::Mirrored,
            Namespaces::of(config),
        );
        return if user.is_some() || !access.needs_user(config) {
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
    match user {
        Some(user) => {
            let rights = crate::auth::rules::rights(config, user, &name);
            let pull = if !private || !read.needs_user(config) {
                Actions::PULL
            } else {
                Actions::NONE
            };
            let purge = if !private && rights.admin {
                Actions::DELETE
            } else {
                Actions::NONE
            };
            rights.actions.union(pull).union(purge)
        }
        None if !read.needs_user(config) => Actions::PULL,
        None => Actions::NONE,
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
        assert_eq!(
            rights(&config, Some("alice"), "repository:private/a"),
            Actions::ALL
        );
        assert_eq!(
            rights(&config, Some("alice"), "repository:library/a"),
            Actions::PULL
        );
        assert_eq!(rights(&config, None, "repository:private/a"), Actions::NONE);
        assert_eq!(rights(&config, None, "repository:library/a"), Actions::PULL);
        assert_eq!(
            rights(&config, Some("alice"), "repository:../x"),
            Actions::NONE
        );
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

    #[tokio::test]
    async fn a_token_is_good_at_every_berth_sharing_the_key_and_nowhere_else() {
        let config = Config::default();
        let key = TokenKey::new([7; 32]);
        let issuer = Authenticator::new(&config).with_token_key(key.clone());
        let replica = Authenticator::new(&config).with_token_key(key.clone());
        let stranger = Authenticator::new(&config);
        let client: IpAddr = [127, 0, 0, 1].into();
        let token = issuer
            .issue_token(
                &config,
                &HeaderMap::new(),
                Some("scope=repository:library/a:pull"),
                client,
            )
            .await
            .unwrap();
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            h
        };
        assert!(replica.anonymous_token(&bearer(&token)).await);
        assert!(!stranger.anonymous_token(&bearer(&token)).await);
        assert!(stranger
            .authenticate(&bearer(&token), client)
            .await
            .is_err());
        // A token whose claims were changed, or that has expired, is refused.
        let (body, tag) = token.split_once('.').unwrap();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
        claims["u"] = "admin".into();
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(replica
            .authenticate(&bearer(&forged), client)
            .await
            .is_err());
        let expired = key.sign(&Claims {
            user: Some("alice".into()),
            grants: Grants::default(),
            expires: crate::store::now_secs() - 1,
            nonce: String::new(),
        });
        assert!(replica
            .authenticate(&bearer(&expired), client)
            .await
            .is_err());
        // Each refusal is counted (the stranger's too).
        use std::sync::atomic::Ordering;
        assert_eq!(replica.stats.refused_token.load(Ordering::Relaxed), 2);
        assert_eq!(stranger.stats.refused_token.load(Ordering::Relaxed), 1);
        let good = key.sign(&Claims {
            user: Some("alice".into()),
            grants: Grants::default(),
            expires: crate::store::now_secs() + 60,
            nonce: String::new(),
        });
        let user = replica.authenticate(&bearer(&good), client).await.unwrap();
        assert_eq!(user.map(|u| u.name().to_owned()), Some("alice".to_owned()));
    }
}
