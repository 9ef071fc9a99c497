//! Registry errors: one enum variant per error code of the distribution spec, each with its
//! HTTP status and the JSON body clients parse (`{"errors":[{"code","message","detail"}]}`).

use std::time::Duration;

use http::StatusCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry")]
    BlobUnknown(String),
    #[error("blob upload invalid")]
    BlobUploadInvalid(String),
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown(String),
    #[error("provided digest did not match uploaded content")]
    DigestInvalid(String),
    #[error("blob unknown to registry")]
    ManifestBlobUnknown(String),
    #[error("manifest invalid")]
    ManifestInvalid(String),
    #[error("manifest unknown")]
    ManifestUnknown(String),
    #[error("invalid repository name")]
    NameInvalid(String),
    #[error("repository name not known to registry")]
    NameUnknown(String),
    #[error("manifest tag did not match URI")]
    TagInvalid(String),
    #[error("provided length did not match content length")]
    SizeInvalid(String),
    #[error("payload too large")]
    TooLarge(String),
    #[error("requested range not satisfiable")]
    RangeInvalid(String),
    /// A `Range` outside a blob of `len` bytes (416 with `Content-Range: bytes */len`).
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { len: u64 },
    #[error("authentication required")]
    Unauthorized(String),
    /// The message names why (what permission is missing), so that a client that shows only
    /// the message (the Docker CLI) says so.
    #[error("requested access to the resource is denied: {0}")]
    Denied(String),
    #[error("the operation is unsupported")]
    Unsupported(String),
    #[error("too many requests")]
    TooManyRequests { retry_after: Duration },
    #[error("upstream unavailable")]
    Unavailable(String),
    #[error("not found")]
    NotFound(String),
    #[error("internal error")]
    Internal(String),
}

impl RegistryError {
    /// The spec's error code string.
    pub fn code(&self) -> &'static str {
        use RegistryError::*;
        match self {
            BlobUnknown(_) => "BLOB_UNKNOWN",
            BlobUploadInvalid(_) => "BLOB_UPLOAD_INVALID",
            BlobUploadUnknown(_) => "BLOB_UPLOAD_UNKNOWN",
            DigestInvalid(_) => "DIGEST_INVALID",
            ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            ManifestInvalid(_) => "MANIFEST_INVALID",
            ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            NameInvalid(_) => "NAME_INVALID",
            NameUnknown(_) => "NAME_UNKNOWN",
            TagInvalid(_) => "TAG_INVALID",
            SizeInvalid(_) => "SIZE_INVALID",
            TooLarge(_) => "SIZE_INVALID",
            RangeInvalid(_) | RangeNotSatisfiable { .. } => "RANGE_INVALID",
            Unauthorized(_) => "UNAUTHORIZED",
            Denied(_) => "DENIED",
            Unsupported(_) => "UNSUPPORTED",
            TooManyRequests { .. } => "TOOMANYREQUESTS",
            Unavailable(_) => "UNAVAILABLE",
            NotFound(_) => "NOT_FOUND",
            Internal(_) => "UNKNOWN",
        }
    }

    pub fn status(&self) -> StatusCode {
        use RegistryError::*;
        match self {
            BlobUnknown(_) | ManifestUnknown(_) | NameUnknown(_) | BlobUploadUnknown(_)
            | NotFound(_) => StatusCode::NOT_FOUND,
            BlobUploadInvalid(_)
            | DigestInvalid(_)
            | ManifestBlobUnknown(_)
            | ManifestInvalid(_)
            | NameInvalid(_)
            | TagInvalid(_)
            | SizeInvalid(_) => StatusCode::BAD_REQUEST,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RangeInvalid(_) | RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Denied(_) => StatusCode::FORBIDDEN,
            Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn detail(&self) -> Option<&str> {
        use RegistryError::*;
        match self {
            BlobUnknown(d)
            | BlobUploadInvalid(d)
            | BlobUploadUnknown(d)
            | DigestInvalid(d)
            | ManifestBlobUnknown(d)
            | ManifestInvalid(d)
            | ManifestUnknown(d)
            | NameInvalid(d)
            | NameUnknown(d)
            | TagInvalid(d)
            | SizeInvalid(d)
            | TooLarge(d)
            | RangeInvalid(d)
            | Unauthorized(d)
            | Denied(d)
            | Unsupported(d)
            | Unavailable(d)
            | NotFound(d)
            | Internal(d) => Some(d.as_str()),
            TooManyRequests { .. } | RangeNotSatisfiable { .. } => None,
        }
    }

    /// The seconds a client should wait before retrying, for the `Retry-After` header.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::TooManyRequests { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The JSON error document of the distribution spec.
    pub fn body(&self) -> String {
        let detail = self.detail().filter(|d| !d.is_empty());
        serde_json::json!({
            "errors": [{
                "code": self.code(),
                "message": self.to_string(),
                "detail": detail,
            }]
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_registry_json_format() {
        let e = RegistryError::ManifestUnknown("library/alpine:nope".into());
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
        assert_eq!(v["errors"][0]["detail"], "library/alpine:nope");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            RegistryError::Denied(String::new()).status(),
            StatusCode::FORBIDDEN
        );
    }
}
