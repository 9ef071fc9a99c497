//! CORS for the registry API, so a browser UI (joxit/docker-registry-ui and the like) on another
//! origin can browse berth. Off unless `cors_origins` is configured.
//!
//! Listed origins are echoed back with `Access-Control-Allow-Credentials`, so the UI may send
//! the user's credentials; `"*"` allows any origin, but without credentials (browsers refuse
//! credentials with a wildcard, and echoing any origin with credentials would let every web page
//! read the private namespace with a visitor's stored login).

use http::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{Method, Response, StatusCode};

use crate::http::{empty, Body};

const ALLOW_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
const ALLOW_HEADERS: &str = "Authorization, Accept, Content-Type";
const EXPOSE_HEADERS: &str =
    "Docker-Content-Digest, Link, Content-Length, Docker-Distribution-Api-Version";
/// How long a browser may reuse a preflight answer, in seconds.
const MAX_AGE: &str = "600";

pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

impl Cors {
    pub fn new(origins: &[String]) -> Cors {
        Cors {
            any: origins.iter().any(|o| o == "*"),
            origins: origins
                .iter()
                .filter(|o| *o != "*")
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// Only the registry API is offered cross-origin.
    fn applies(path: &str) -> bool {
        path == "/v2" || path.starts_with("/v2/")
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if it is allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<(HeaderValue, bool)> {
        let o = origin.to_str().ok()?;
        if self.origins.iter().any(|a| a.eq_ignore_ascii_case(o)) {
            return Some((origin.clone(), true));
        }
        self.any.then(|| (HeaderValue::from_static("*"), false))
    }

    /// Answers a preflight (`OPTIONS` with `Access-Control-Request-Method`) on a `/v2/` path.
    pub fn preflight(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Response<Body>> {
        if !self.enabled()
            || method != Method::OPTIONS
            || !Cors::applies(path)
            || !headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let origin = headers.get(ORIGIN)?;
        let Some((allow, credentials)) = self.allow_origin(origin) else {
            return Some(
                Response::builder()
                    .status(StatusCode::FORBIDDEN)
                    .header(VARY, "Origin")
                    .body(empty())
                    .unwrap_or_default(),
            );
        };
        let mut resp = Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(empty())
            .unwrap_or_default();
        let h = resp.headers_mut();
        set(h, allow, credentials);
        if credentials {
            h.append(VARY, HeaderValue::from_static("Origin"));
        }
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        Some(resp)
    }

    /// Adds the CORS headers to a `/v2/` response for an allowed origin.
    pub fn decorate(&self, path: &str, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if !self.enabled() || !Cors::applies(path) {
            return;
        }
        if !self.origins.is_empty() {
            // The answer depends on the Origin, whichever it is: caches must keep them apart.
            headers.append(VARY, HeaderValue::from_static("Origin"));
        }
        let Some(origin) = origin else { return };
        if let Some((allow, credentials)) = self.allow_origin(origin) {
            set(headers, allow, credentials);
        }
    }
}

fn set(h: &mut HeaderMap, allow: HeaderValue, credentials: bool) {
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    h.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    if credentials {
        h.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::valid_origin;

    #[test]
    fn origins_validate() {
        assert!(valid_origin("*"));
        assert!(valid_origin("https://ui.example"));
        assert!(valid_origin("http://localhost:8080"));
        assert!(!valid_origin("ui.example"));
        assert!(!valid_origin("https://ui.example/path"));
        assert!(!valid_origin("javascript://x"));
    }

    #[test]
    fn listed_origins_get_credentials_and_wildcards_do_not() {
        let c = Cors::new(&["https://ui.example".into()]);
        let mut h = HeaderMap::new();
        c.decorate(
            "/v2/",
            Some(&HeaderValue::from_static("https://ui.example")),
            &mut h,
        );
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://ui.example");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        let mut h = HeaderMap::new();
        c.decorate(
            "/v2/",
            Some(&HeaderValue::from_static("https://evil")),
            &mut h,
        );
        assert!(!h.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN));
        assert_eq!(h[VARY], "Origin");
        let any = Cors::new(&["*".into()]);
        let mut h = HeaderMap::new();
        any.decorate(
            "/v2/",
            Some(&HeaderValue::from_static("https://evil")),
            &mut h,
        );
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(!h.contains_key(ACCESS_CONTROL_ALLOW_CREDENTIALS));
        let mut h = HeaderMap::new();
        any.decorate("/", Some(&HeaderValue::from_static("https://evil")), &mut h);
        assert!(h.is_empty(), "only the registry API is cross-origin");
    }
}
