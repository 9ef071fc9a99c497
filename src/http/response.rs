//! Responses: bodies, the registry's JSON error document, small fixed answers.

use super::*;

pub fn api_version(resp: &mut Response<Body>) {
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub(super) fn json_body(head: bool, s: &'static str) -> Body {
    if head {
        empty()
    } else {
        full(s)
    }
}

pub(super) fn base_response(status: StatusCode, body: Body) -> Response<Body> {
    let mut resp = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_default();
    api_version(&mut resp);
    resp
}

pub(super) fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(s))
        .unwrap_or_default()
}

pub(super) fn internal(e: http::Error) -> RegistryError {
    RegistryError::Internal(e.to_string())
}

/// The registry JSON error document with the error's status.
pub fn error_response(e: &RegistryError, method: &Method) -> Response<Body> {
    let body = e.body();
    let len = body.len();
    let mut b = Response::builder()
        .status(e.status())
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, len);
    if let Some(after) = e.retry_after() {
        b = b.header(RETRY_AFTER, after.as_secs().max(1));
    }
    if let RegistryError::RangeNotSatisfiable { len } = e {
        b = b.header(CONTENT_RANGE, format!("bytes */{len}"));
    }
    if let RegistryError::Unauthorized(_) = e {
        b = b.header(http::header::WWW_AUTHENTICATE, "Basic realm=\"berth\"");
    }
    let mut resp = b
        .body(if method == Method::HEAD {
            empty()
        } else {
            full(body)
        })
        .unwrap_or_default();
    api_version(&mut resp);
    resp
}
