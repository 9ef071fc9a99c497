//! Serving stored blobs, for both halves: `Range` requests (RFC 9110), the blob headers, and
//! how the bytes reach the connection (see `store::pages::Pages`).

use super::*;

impl App {
    pub(crate) async fn serve_stored_blob(
        &self,
        area: Area,
        digest: Digest,
        read: &BlobRead,
        outcome: Outcome,
    ) -> Result<Option<Response<Body>>, RegistryError> {
        let (range, head) = (read.range.as_deref(), read.head);
        let store = self.mirror.store().clone();
        let Some(blob) = blocking(move || store.open_blob(area, &digest)).await? else {
            return Ok(None);
        };
        let len = blob.len();
        let lease = (area == Area::Cache).then(|| {
            self.mirror.disk.touch(&digest);
            self.mirror.disk.lease(digest)
        });
        let (status, start, end) = match range {
            Some(r) => match parse_range(r, len)? {
                Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
                None => (StatusCode::OK, 0, len),
            },
            None => (StatusCode::OK, 0, len),
        };
        let mut b = blob_headers(Response::builder().status(status), &digest)
            .header(CONTENT_LENGTH, end - start);
        if status == StatusCode::PARTIAL_CONTENT {
            b = b.header(CONTENT_RANGE, format!("bytes {start}-{}/{len}", end - 1));
        }
        let body = if head {
            empty()
        } else {
            // The lease rides along with the body, so eviction skips the blob while it is read.
            let stream =
                futures_util::StreamExt::map(blob.stream(start, end, read.pages), move |r| {
                    let _keep = &lease;
                    r.map(Frame::data)
                });
            BodyExt::boxed(StreamBody::new(stream))
        };
        let mut resp = b.body(body).map_err(internal)?;
        resp.extensions_mut().insert(Served { outcome });
        Ok(Some(resp))
    }
}

/// What a blob GET or HEAD asks for, and how its bytes may reach the connection.
pub(crate) struct BlobRead {
    pub range: Option<String>,
    pub head: bool,
    pub pages: Pages,
}

impl BlobRead {
    pub fn of<B>(req: &Request<B>) -> BlobRead {
        // Only plain HTTP/1.x hands body bytes to the kernel untouched (see `Pages`).
        let plain_h1 =
            req.extensions().get::<OverTls>().is_none() && req.version() <= http::Version::HTTP_11;
        BlobRead {
            range: range_header(req.headers()),
            head: req.method() == Method::HEAD,
            pages: if plain_h1 {
                Pages::Mapped
            } else {
                Pages::Copied
            },
        }
    }
}

/// The request's `Range` header, if it has one that is text.
pub(crate) fn range_header(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Parses a single `bytes=` range against a length: `Ok(None)` to serve the whole blob,
/// `Ok(Some((start, end_exclusive)))`, or 416 when the range lies outside the blob.
///
/// As RFC 9110 asks, a header that does not parse as one valid byte range (`bytes=5-2`,
/// `bytes=abc`, another unit, several ranges) is ignored: the whole blob is served.
pub(super) fn parse_range(header: &str, len: u64) -> Result<Option<(u64, u64)>, RegistryError> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().unwrap_or(u64::MAX))
    };
    let unsatisfiable = RegistryError::RangeNotSatisfiable { len };
    let (start, end) = match (a.trim().is_empty(), number(a), number(b)) {
        // A suffix: the last `n` bytes.
        (true, _, Some(0)) => return Err(unsatisfiable),
        (true, _, Some(n)) => (len.saturating_sub(n), len),
        (false, Some(start), None) if b.trim().is_empty() => (start, len),
        (false, Some(start), Some(last)) if last >= start => {
            (start, last.saturating_add(1).min(len))
        }
        _ => return Ok(None),
    };
    if start >= len {
        return Err(unsatisfiable);
    }
    Ok(Some((start, end)))
}

pub(super) fn blob_headers(b: http::response::Builder, digest: &Digest) -> http::response::Builder {
    b.header(CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string())
        .header(ETAG, format!("\"{digest}\""))
        .header(ACCEPT_RANGES, "bytes")
        .header("docker-distribution-api-version", "registry/2.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some((50, 100)));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=100-200", 100).is_err());
        assert!(parse_range("bytes=-0", 100).is_err());
        assert_eq!(parse_range("bytes=-500", 100).unwrap(), Some((0, 100)));
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999", 100).unwrap(),
            Some((0, 100))
        );
        // Not one valid range: ignored, the whole blob is served (RFC 9110).
        for ignored in [
            "items=1-2",
            "bytes=5-2",
            "bytes=abc",
            "bytes=1-2,4-5",
            "bytes=",
            "bytes=-",
            "bytes=--1",
            "bytes=+1-2",
        ] {
            assert_eq!(parse_range(ignored, 100).unwrap(), None, "{ignored}");
        }
    }
}
