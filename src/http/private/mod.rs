//! The private namespace over HTTP: the OCI distribution push API (monolithic and chunked
//! uploads, mounts, manifests by tag or digest), private pulls, deletes, tag lists, referrers
//! and the catalog.
//!
//! Repositories under a `private_ns` are stored in the store's local area and never forwarded
//! upstream. Content belongs to a repository through links (see `store::private`), so a blob or
//! manifest pushed to one repository is not served from another, and deletes are per
//! repository. Request bodies are streamed to disk, never held whole in memory (manifests, at
//! most 4 MiB, excepted).

mod listings;
mod manifests;
mod uploads;

use listings::*;
pub use listings::{MAX_CATALOG_PAGE, MAX_REFERRERS_PAGE};
use manifests::*;
use uploads::*;

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, ETAG, LINK, LOCATION, RANGE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::auth::User;
use crate::http::{api_version, empty, error_response, full, App, Body, Served};
use crate::mirror::Outcome;
use crate::oci::error::RegistryError;
use crate::oci::manifest::{self, Parsed, MAX_MANIFEST_BYTES};
use crate::oci::media::OCI_INDEX;
use crate::oci::names::{Digest, Reference, RepoName};
use crate::oci::routes::{Query, Route, UploadId};
use crate::registry::webhook::{now_rfc3339, Event};
use crate::registry::Registry;
use crate::store::blocking;
use crate::store::private::PrivateStore;
use crate::store::{Area, StoreError};

/// Request bodies are written to disk in pieces of about this size.
const WRITE_BATCH: usize = 1 << 20;

const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
const FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// Async locks by key, made on demand; an entry goes once nobody holds or waits for its lock.
/// The repository a route names, if any.
pub fn route_repo(route: &Route) -> Option<&RepoName> {
    match route {
        Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::Tags { name }
        | Route::Referrers { name, .. }
        | Route::UploadStart { name }
        | Route::Upload { name, .. } => Some(name),
        _ => None,
    }
}

/// Answers a request for the private namespace (or the catalog). Authorization has been done.
pub async fn dispatch(
    app: &App,
    route: Route,
    req: Request<Incoming>,
    query: Query,
    user: Option<User>,
) -> Result<Response<Body>, RegistryError> {
    let method = req.method().clone();
    let head = method == Method::HEAD;
    let actor = user.as_ref().map(|u| u.name().to_owned());
    match (route, method) {
        (Route::Catalog, Method::GET) => catalog(app, &query, user.as_ref()).await,
        (Route::Manifest { name, reference }, Method::GET | Method::HEAD) => {
            get_manifest(app, name, reference, head).await
        }
        (Route::Manifest { name, reference }, Method::PUT) => {
            put_manifest(app, name, reference, req, actor).await
        }
        (Route::Manifest { name, reference }, Method::DELETE) => {
            delete_manifest(app, name, reference, actor).await
        }
        (Route::Blob { name, digest }, Method::GET | Method::HEAD) => {
            get_blob(app, name, digest, &crate::http::BlobRead::of(&req)).await
        }
        (Route::Blob { name, digest }, Method::DELETE) => {
            delete_blob(app, name, digest, actor).await
        }
        (Route::Tags { name }, Method::GET) => tags(app, name, &query).await,
        (Route::Referrers { name, digest }, Method::GET) => {
            referrers(app, name, digest, &query).await
        }
        (Route::UploadStart { name }, Method::POST) => {
            start_upload(app, name, &query, req, user.as_ref()).await
        }
        (Route::Upload { name, id }, Method::GET) => upload_status(app, name, id).await,
        (Route::Upload { name, id }, Method::PATCH) => patch_upload(app, name, id, req).await,
        (Route::Upload { name, id }, Method::PUT) => {
            finish_upload(app, name, id, &query, req).await
        }
        (Route::Upload { name, id }, Method::DELETE) => cancel_upload(app, name, id).await,
        _ => Err(RegistryError::Unsupported(
            "method not allowed on this route".into(),
        )),
    }
}

/// Deletes a manifest or a tag of a private repository for the status page's actions: the API's
/// DELETE itself (repository lock, webhook), without its HTTP response. Permission is the
/// caller's to check.
pub async fn delete_manifest_for(
    app: &App,
    name: RepoName,
    reference: Reference,
    actor: &User,
) -> Result<(), RegistryError> {
    delete_manifest(app, name, reference, Some(actor.name().to_owned()))
        .await
        .map(drop)
}

// --- responses ------------------------------------------------------------------------------

fn respond(
    status: StatusCode,
    headers: Vec<(HeaderName, String)>,
    body: Body,
) -> Result<Response<Body>, RegistryError> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        let v = HeaderValue::from_str(&v).map_err(|e| RegistryError::Internal(e.to_string()))?;
        b = b.header(k, v);
    }
    let mut resp = b
        .body(body)
        .map_err(|e| RegistryError::Internal(e.to_string()))?;
    api_version(&mut resp);
    resp.extensions_mut().insert(Served {
        outcome: Outcome::Local,
    });
    Ok(resp)
}

fn upload_location(name: &RepoName, id: &UploadId) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// The `Range` header of an upload holding `size` bytes (`0-0` when empty, as distribution does).
fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn upload_accepted(
    status: StatusCode,
    name: &RepoName,
    id: &UploadId,
    size: u64,
) -> Result<Response<Body>, RegistryError> {
    respond(
        status,
        vec![
            (LOCATION, upload_location(name, id)),
            (RANGE, upload_range(size)),
            (UPLOAD_UUID, id.to_string()),
            (CONTENT_LENGTH, "0".into()),
        ],
        empty(),
    )
}

fn blob_created(name: &RepoName, digest: &Digest) -> Result<Response<Body>, RegistryError> {
    respond(
        StatusCode::CREATED,
        vec![
            (LOCATION, format!("/v2/{name}/blobs/{digest}")),
            (CONTENT_DIGEST, digest.to_string()),
            (CONTENT_LENGTH, "0".into()),
        ],
        empty(),
    )
}

/// 416 for a chunk that does not start where the upload ends, telling what is there.
fn range_refused(
    name: &RepoName,
    id: &UploadId,
    size: u64,
    detail: String,
) -> Result<Response<Body>, RegistryError> {
    let mut resp = error_response(&RegistryError::RangeInvalid(detail), &Method::PATCH);
    let h = resp.headers_mut();
    for (k, v) in [
        (LOCATION, upload_location(name, id)),
        (RANGE, upload_range(size)),
        (UPLOAD_UUID, id.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    Ok(resp)
}

fn accepted() -> Result<Response<Body>, RegistryError> {
    respond(
        StatusCode::ACCEPTED,
        vec![(CONTENT_LENGTH, "0".into())],
        empty(),
    )
}

fn json_response(
    content_type: &str,
    value: &serde_json::Value,
    extra: Vec<(HeaderName, String)>,
) -> Result<Response<Body>, RegistryError> {
    let body = serde_json::to_vec(value).map_err(|e| RegistryError::Internal(e.to_string()))?;
    let mut headers = vec![
        (CONTENT_TYPE, content_type.to_owned()),
        (CONTENT_LENGTH, body.len().to_string()),
    ];
    headers.extend(extra);
    respond(StatusCode::OK, headers, full(body))
}

// --- blobs ----------------------------------------------------------------------------------

async fn get_blob(
    app: &App,
    name: RepoName,
    digest: Digest,
    read: &crate::http::BlobRead,
) -> Result<Response<Body>, RegistryError> {
    let (ps, n) = (app.private.store.clone(), name.clone());
    if blocking(move || ps.blob_in_repo(&n, &digest))
        .await?
        .is_none()
    {
        return Err(RegistryError::BlobUnknown(format!("{name}@{digest}")));
    }
    app.serve_stored_blob(Area::Local, digest, read, Outcome::Local)
        .await?
        .ok_or_else(|| RegistryError::BlobUnknown(format!("{name}@{digest}")))
}

async fn delete_blob(
    app: &App,
    name: RepoName,
    digest: Digest,
    actor: Option<String>,
) -> Result<Response<Body>, RegistryError> {
    let (ps, n) = (app.private.store.clone(), name.clone());
    // A manifest push checks that its blobs are linked, then links itself: not in between.
    let guard = app.private.lock_repo(&name).await;
    let unlinked = blocking(move || {
        let _guard = guard;
        ps.unlink_blob(&n, &digest)
    });
    if !unlinked.await? {
        return Err(RegistryError::BlobUnknown(format!("{name}@{digest}")));
    }
    app.private.webhooks.notify(Event {
        action: "delete",
        repository: name.to_string(),
        tag: None,
        tags: Vec::new(),
        digest: Some(digest.to_string()),
        media_type: None,
        size: None,
        actor,
        timestamp: now_rfc3339(),
    });
    accepted()
}
