//! Authenticating to an upstream the way Docker does: Bearer tokens from the realm a 401
//! challenge names (cached per scope, fetched once for concurrent requests), or Basic
//! credentials.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};

use crate::lock;
use crate::mirror::upstream::{Upstream, UpstreamError};
use crate::oci::names::RepoName;

#[derive(Clone)]
pub(super) struct Token {
    value: String,
    ttl: Duration,
}

pub(super) struct TokenExpiry;

impl moka::Expiry<String, Token> for TokenExpiry {
    fn expire_after_create(&self, _: &String, token: &Token, _: Instant) -> Option<Duration> {
        // Refresh a little before the registry would refuse the token.
        Some(
            token
                .ttl
                .mul_f64(0.9)
                .saturating_sub(Duration::from_secs(1))
                .max(Duration::from_millis(500)),
        )
    }
}

/// What a 401 asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

impl Upstream {
    /// The Authorization header to send up front, when earlier challenges told us what it is.
    pub(super) async fn auth_header(
        &self,
        repo: &RepoName,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let bearer = lock(&self.bearer).clone();
        match bearer {
            Some((realm, service)) => self
                .token(&realm, service.as_deref(), &pull_scope(repo))
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    pub(super) fn basic(&self) -> Option<HeaderValue> {
        let (user, password) = self.credentials.as_ref()?;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// A Bearer token for a scope, from the cache or the realm; concurrent callers share one fetch.
    pub(super) async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let key = token_key(realm, service, scope);
        let token = self
            .tokens
            .try_get_with(key, self.fetch_token(realm, service, scope))
            .await
            .map_err(|e: Arc<UpstreamError>| (*e).clone())?;
        let mut v = HeaderValue::from_str(&format!("Bearer {}", token.value))
            .map_err(|_| UpstreamError::Invalid("token is not a header value".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, UpstreamError> {
        let mut url = format!("{realm}?scope={}", urlencode(scope));
        if let Some(service) = service {
            url.push_str(&format!("&service={}", urlencode(service)));
        }
        let uri: Uri = url
            .parse()
            .map_err(|_| UpstreamError::Invalid(format!("bad token realm {realm:?}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(UpstreamError::Invalid(format!("bad token realm {realm:?}")));
        }
        let mut req = Request::builder().method(Method::GET).uri(uri);
        // Credentials go to the token realm the registry named, and nowhere else.
        if let Some(basic) = self.basic() {
            req = req.header(AUTHORIZATION, basic);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
        let resp = self.dispatch(req).await?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(UpstreamError::Denied(resp.status()))
            }
            s => return Err(UpstreamError::Status(s)),
        }
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| UpstreamError::Invalid(format!("token: {e}")))?
            .to_bytes();
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Invalid(format!("token response: {e}")))?;
        let value = parsed
            .token
            .or(parsed.access_token)
            .ok_or_else(|| UpstreamError::Invalid("token response has no token".into()))?;
        let ttl = Duration::from_secs(parsed.expires_in.unwrap_or(60).max(1));
        tracing::debug!(upstream = %self.name, scope, ttl_s = ttl.as_secs(), "fetched upstream token");
        Ok(Token { value, ttl })
    }
}

pub(super) fn pull_scope(repo: &RepoName) -> String {
    format!("repository:{repo}:pull")
}

pub(super) fn token_key(realm: &str, service: Option<&str>, scope: &str) -> String {
    format!("{realm}\n{}\n{scope}", service.unwrap_or(""))
}

/// Parses `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub(super) fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut scope = None;
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, a)| (v, a))
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = Some(value.to_owned()),
            "scope" => scope = Some(value.to_owned()),
            _ => {}
        }
        rest = after.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
        scope,
    })
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, crate::oci::routes::UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }
}
