//! The private namespace over HTTP: the OCI distribution push API (monolithic and chunked
//! uploads, mounts, manifests by tag or digest), private pulls, deletes, tag lists, referrers
//! and the catalog.
//!
//! Repositories under a `private_ns` are stored in the store's local area and never forwarded
//! upstream. Content belongs to a repository through links (see `store::private`), so a blob or
//! manifest pushed to one repository is not served from another, and deletes are per
//! repository. Request bodies are streamed to disk, never held whole in memory (manifests, at
//! most 4 MiB, excepted).

use std::io;
use std::os::unix::fs::FileExt;
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
        (Route::Catalog, Method::GET) => catalog(app, &query).await,
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

// --- uploads --------------------------------------------------------------------------------

enum PumpError {
    Body(String),
    Io(io::Error),
}

impl From<PumpError> for RegistryError {
    fn from(e: PumpError) -> RegistryError {
        match e {
            PumpError::Body(e) => {
                RegistryError::BlobUploadInvalid(format!("reading the request body: {e}"))
            }
            PumpError::Io(e) => RegistryError::Internal(format!("store: {e}")),
        }
    }
}

/// Streams a request body into `sink` in batches written on the blocking pool. Returns the sink
/// and the bytes written.
async fn pump<S: Send + 'static>(
    body: &mut Incoming,
    mut sink: S,
    write: fn(&mut S, &[u8]) -> io::Result<()>,
) -> Result<(S, u64), PumpError> {
    let mut batch = BytesMut::new();
    let mut total = 0u64;
    loop {
        let end = match body.frame().await {
            None => true,
            Some(Err(e)) => return Err(PumpError::Body(e.to_string())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    batch.extend_from_slice(&data);
                }
                false
            }
        };
        if !batch.is_empty() && (end || batch.len() >= WRITE_BATCH) {
            let chunk: Bytes = batch.split().freeze();
            total += chunk.len() as u64;
            sink = tokio::task::spawn_blocking(move || write(&mut sink, &chunk).map(|()| sink))
                .await
                .map_err(|e| PumpError::Io(io::Error::other(e)))?
                .map_err(PumpError::Io)?;
        }
        if end {
            return Ok((sink, total));
        }
    }
}

/// An upload's data file, written at a position.
struct FileSink {
    file: std::fs::File,
    pos: u64,
}

fn write_file_sink(s: &mut FileSink, bytes: &[u8]) -> io::Result<()> {
    s.file.write_all_at(bytes, s.pos)?;
    s.pos += bytes.len() as u64;
    Ok(())
}

fn write_blob_sink(w: &mut crate::store::BlobWriter, bytes: &[u8]) -> io::Result<()> {
    w.write(bytes)
}

fn digest_param(query: &Query) -> Result<Option<Digest>, RegistryError> {
    query.digest.as_deref().map(Digest::parse).transpose()
}

async fn start_upload(
    app: &App,
    name: RepoName,
    query: &Query,
    req: Request<Incoming>,
    user: Option<&User>,
) -> Result<Response<Body>, RegistryError> {
    let ps = app.private.store.clone();
    if let Some(mount) = &query.mount {
        let digest = Digest::parse(mount)?;
        // Mounting reads the source repository: a token must grant pulling it.
        let readable = |f: &RepoName| {
            user.map_or(true, |u| {
                u.may(&crate::auth::Need {
                    resource: format!("repository:{f}"),
                    actions: crate::auth::Actions::PULL,
                })
            })
        };
        let from = match &query.from {
            Some(f) => Some(RepoName::parse(f)?).filter(|f| app.is_private(f) && readable(f)),
            None => None,
        };
        // Without `from` the blob may come from any repository, which a token scoped to
        // repositories cannot vouch for: its holder uploads instead.
        let mountable = match &query.from {
            None => user.map_or(true, |u| !u.is_scoped()),
            Some(_) => from.is_some(),
        };
        let (ps2, target) = (ps.clone(), name.clone());
        let mounted = mountable
            && blocking(move || {
                let present = match &from {
                    Some(from) => ps2.blob_in_repo(from, &digest)?.is_some(),
                    None => ps2.store().blob_len(Area::Local, &digest)?.is_some(),
                };
                if present {
                    ps2.link_blob(&target, &digest)?;
                }
                Ok(present)
            })
            .await?;
        if mounted {
            return blob_created(&name, &digest);
        }
        // Not mountable: the client uploads the blob instead.
    } else if let Some(digest) = digest_param(query)? {
        // Monolithic upload: the whole blob in the POST body.
        let writer = {
            let store = ps.store().clone();
            blocking(move || store.begin_blob(Area::Local, digest)).await?
        };
        let mut body = req.into_body();
        let (writer, _) = pump(&mut body, writer, write_blob_sink).await?;
        commit_blob(writer).await?;
        let (ps2, target) = (ps.clone(), name.clone());
        blocking(move || ps2.link_blob(&target, &digest)).await?;
        return blob_created(&name, &digest);
    }
    // Pushes always authenticate; "-" only stands in should that ever change.
    let user = user.map_or("-", |u| u.name());
    let id = UploadId::new();
    if let Err(open) = reserve_upload(app, user, &id).await {
        app.private.uploads_refused.fetch_add(1, Ordering::Relaxed);
        let max = app.private.max_uploads_per_user;
        tracing::warn!(
            repository = %name,
            user,
            open,
            max_uploads_per_user = max,
            "upload refused: the user has too many upload sessions open"
        );
        return too_many_uploads(user, open);
    }
    let reservation = Reservation {
        reg: &app.private,
        id: Some(id.clone()),
    };
    let (target, i, owner) = (name.clone(), id.clone(), user.to_owned());
    blocking(move || ps.create_upload(&target, &i, Some(&owner))).await?;
    reservation.keep();
    upload_accepted(StatusCode::ACCEPTED, &name, &id, 0)
}

/// A session counted against its user while it is being made. Unless kept, dropping it stops
/// counting the session, so that a failed start, or a request dropped half-way because its
/// client left, does not hold one of the user's places for good.
struct Reservation<'a> {
    reg: &'a Registry,
    id: Option<UploadId>,
}

impl Reservation<'_> {
    fn keep(mut self) {
        if let Some(id) = self.id.take() {
            self.reg.upload_created(&id);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.reg.forget_upload(&id);
        }
    }
}

/// Counts a new session against `user` (see `Registry::reserve_upload`). At the limit, first
/// stops counting the user's sessions that `berth gc` removed behind the server's back.
async fn reserve_upload(app: &App, user: &str, id: &UploadId) -> Result<(), usize> {
    let reg = &app.private;
    if reg.reserve_upload(user, id).is_ok() {
        return Ok(());
    }
    let checked_at = Instant::now();
    let (ps, ids) = (reg.store.clone(), reg.sessions_of(user));
    if let Ok(gone) = blocking(move || {
        Ok(ids
            .into_iter()
            .filter(|id| !ps.upload_exists(id))
            .collect::<std::collections::HashSet<_>>())
    })
    .await
    {
        reg.forget_vanished(checked_at, |id| !gone.contains(id));
    }
    reg.reserve_upload(user, id)
}

/// 429 TOOMANYREQUESTS, in the registry's JSON error format, saying which limit was hit.
fn too_many_uploads(user: &str, open: usize) -> Result<Response<Body>, RegistryError> {
    // Sessions end when finished, cancelled or idle for upload_max_age: a minute is a guess
    // that lets a client's own pushes finish meanwhile.
    let e = RegistryError::TooManyRequests {
        retry_after: Duration::from_secs(60),
    };
    let mut resp = error_response(&e, &Method::POST);
    let body = serde_json::json!({
        "errors": [{
            "code": e.code(),
            "message": e.to_string(),
            "detail": format!(
                "user {user} has {open} upload sessions open, the most allowed (max_uploads_per_user); finish or cancel some first"
            ),
        }]
    })
    .to_string();
    if let Ok(len) = HeaderValue::from_str(&body.len().to_string()) {
        resp.headers_mut().insert(CONTENT_LENGTH, len);
    }
    *resp.body_mut() = full(body);
    resp.extensions_mut().insert(Served {
        outcome: Outcome::Local,
    });
    Ok(resp)
}

async fn commit_blob(writer: crate::store::BlobWriter) -> Result<u64, RegistryError> {
    match tokio::task::spawn_blocking(move || writer.commit())
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?
    {
        Ok(len) => Ok(len),
        Err(StoreError::DigestMismatch { expected, actual }) => Err(RegistryError::DigestInvalid(
            format!("the content has digest {actual}, not {expected}"),
        )),
        Err(StoreError::Io(e)) => Err(RegistryError::Internal(format!("store: {e}"))),
    }
}

/// The upload's size, or BLOB_UPLOAD_UNKNOWN.
async fn upload_size(app: &App, name: &RepoName, id: &UploadId) -> Result<u64, RegistryError> {
    let (ps, n, i) = (app.private.store.clone(), name.clone(), id.clone());
    blocking(move || ps.upload_size(&n, &i))
        .await?
        .ok_or_else(|| RegistryError::BlobUploadUnknown(id.to_string()))
}

async fn upload_status(
    app: &App,
    name: RepoName,
    id: UploadId,
) -> Result<Response<Body>, RegistryError> {
    let _guard = app.private.lock_upload(&id).await;
    let size = upload_size(app, &name, &id).await?;
    upload_accepted(StatusCode::NO_CONTENT, &name, &id, size)
}

/// `start-end` (inclusive) from a `Content-Range` header; `bytes ` and `/total` are tolerated.
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v
        .strip_prefix("bytes")
        .map(|r| r.trim_start_matches([' ', '=']))
        .unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// What became of a chunk sent to an upload.
enum Chunk {
    /// Taken whole: the upload's size now.
    Appended(u64),
    /// Not taken (the upload is as it was): a 416 to send as is.
    Refused(Response<Body>),
}

/// Appends a request body to an upload.
async fn append_chunk(
    app: &App,
    name: &RepoName,
    id: &UploadId,
    size: u64,
    req: Request<Incoming>,
) -> Result<Chunk, RegistryError> {
    let declared = match req.headers().get(http::header::CONTENT_RANGE) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(parse_content_range) {
            Some(r) => Some(r),
            None => {
                return range_refused(name, id, size, "unreadable Content-Range".into())
                    .map(Chunk::Refused)
            }
        },
    };
    if let Some((start, _)) = declared {
        if start != size {
            return range_refused(
                name,
                id,
                size,
                format!("the chunk starts at {start} but the upload holds {size} bytes"),
            )
            .map(Chunk::Refused);
        }
    }
    let ps = app.private.store.clone();
    let i = id.clone();
    let file = blocking(move || ps.open_upload(&i)).await?;
    let mut body = req.into_body();
    let result = pump(&mut body, FileSink { file, pos: size }, write_file_sink).await;
    let undo = || {
        let (ps, i) = (app.private.store.clone(), id.clone());
        blocking(move || ps.truncate_upload(&i, size))
    };
    let written = match result {
        Ok((_, n)) => n,
        Err(e) => {
            // A chunk is taken whole or not at all, so the upload's state stays what the client
            // last saw.
            undo().await?;
            return Err(e.into());
        }
    };
    if let Some((start, end)) = declared {
        if written != end - start + 1 {
            undo().await?;
            return range_refused(
                name,
                id,
                size,
                format!(
                    "Content-Range {start}-{end} announced {} bytes, the body had {written}",
                    end - start + 1
                ),
            )
            .map(Chunk::Refused);
        }
    }
    Ok(Chunk::Appended(size + written))
}

async fn patch_upload(
    app: &App,
    name: RepoName,
    id: UploadId,
    req: Request<Incoming>,
) -> Result<Response<Body>, RegistryError> {
    let _guard = app.private.lock_upload(&id).await;
    let size = upload_size(app, &name, &id).await?;
    match append_chunk(app, &name, &id, size, req).await? {
        Chunk::Appended(size) => upload_accepted(StatusCode::ACCEPTED, &name, &id, size),
        Chunk::Refused(refusal) => Ok(refusal),
    }
}

async fn finish_upload(
    app: &App,
    name: RepoName,
    id: UploadId,
    query: &Query,
    req: Request<Incoming>,
) -> Result<Response<Body>, RegistryError> {
    let _guard = app.private.lock_upload(&id).await;
    let size = upload_size(app, &name, &id).await?;
    let digest = digest_param(query)?
        .ok_or_else(|| RegistryError::DigestInvalid("finishing an upload needs ?digest=".into()))?;
    if let Chunk::Refused(refusal) = append_chunk(app, &name, &id, size, req).await? {
        return Ok(refusal);
    }
    let (ps, n, i) = (app.private.store.clone(), name.clone(), id.clone());
    let finished = tokio::task::spawn_blocking(move || ps.finish_upload(&n, &i, &digest))
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?;
    match finished {
        Ok(_) => {
            app.private.forget_upload(&id);
            blob_created(&name, &digest)
        }
        Err(StoreError::DigestMismatch { expected, actual }) => {
            app.private.forget_upload(&id);
            Err(RegistryError::DigestInvalid(format!(
                "the uploaded content has digest {actual}, not {expected}; the upload was discarded"
            )))
        }
        Err(StoreError::Io(e)) => Err(RegistryError::Internal(format!("store: {e}"))),
    }
}

async fn cancel_upload(
    app: &App,
    name: RepoName,
    id: UploadId,
) -> Result<Response<Body>, RegistryError> {
    let _guard = app.private.lock_upload(&id).await;
    upload_size(app, &name, &id).await?;
    let (ps, i) = (app.private.store.clone(), id.clone());
    blocking(move || ps.remove_upload(&i)).await?;
    app.private.forget_upload(&id);
    respond(
        StatusCode::NO_CONTENT,
        vec![(CONTENT_LENGTH, "0".into())],
        empty(),
    )
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
        digest: Some(digest.to_string()),
        media_type: None,
        size: None,
        actor,
        timestamp: now_rfc3339(),
    });
    accepted()
}

// --- manifests ------------------------------------------------------------------------------

/// The digest a reference names in the repository, if the repository holds it.
async fn resolve(
    app: &App,
    name: &RepoName,
    reference: &Reference,
) -> Result<Option<Digest>, RegistryError> {
    let (ps, n, r) = (app.private.store.clone(), name.clone(), reference.clone());
    blocking(move || {
        let d = match &r {
            Reference::Digest(d) => *d,
            Reference::Tag(t) => match ps.resolve_tag(&n, t)? {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        Ok(ps.manifest_in_repo(&n, &d).then_some(d))
    })
    .await
}

async fn get_manifest(
    app: &App,
    name: RepoName,
    reference: Reference,
    head: bool,
) -> Result<Response<Body>, RegistryError> {
    let unknown = || RegistryError::ManifestUnknown(format!("{name}:{reference}"));
    let digest = resolve(app, &name, &reference).await?.ok_or_else(unknown)?;
    let m = app
        .manifests
        .get(Area::Local, &digest)
        .await?
        .ok_or_else(unknown)?;
    respond(
        StatusCode::OK,
        vec![
            (CONTENT_TYPE, m.media_type.to_string()),
            (CONTENT_LENGTH, m.bytes.len().to_string()),
            (CONTENT_DIGEST, digest.to_string()),
            (ETAG, format!("\"{digest}\"")),
        ],
        if head { empty() } else { full(m.bytes.clone()) },
    )
}

async fn read_manifest_body(req: Request<Incoming>) -> Result<Bytes, RegistryError> {
    let too_large = || {
        RegistryError::TooLarge(format!(
            "a manifest may be at most {MAX_MANIFEST_BYTES} bytes"
        ))
    };
    let declared = crate::mirror::upstream::content_length(req.headers());
    if declared.is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(req.into_body(), MAX_MANIFEST_BYTES)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(RegistryError::ManifestInvalid(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// Whether what a manifest refers to is in the repository.
enum References {
    /// Everything, at the sizes the manifest gives.
    Present,
    /// A reference missing or of another size: the error to answer the push with.
    Unmet(RegistryError),
}

/// Checks that everything a manifest refers to is in the repository.
fn check_references(ps: &PrivateStore, repo: &RepoName, parsed: &Parsed) -> io::Result<References> {
    for b in parsed.blobs.iter().filter(|b| !b.has_urls) {
        if let Err(e) = b.check_stored(ps.blob_in_repo(repo, &b.digest)?, "manifest") {
            return Ok(References::Unmet(e));
        }
    }
    for c in &parsed.children {
        let len = if ps.manifest_in_repo(repo, &c.digest) {
            ps.store().blob_len(Area::Local, &c.digest)?
        } else {
            None
        };
        if let Err(e) = c.check_stored(len, "index") {
            return Ok(References::Unmet(e));
        }
    }
    // Referenced blobs count as in use from now on, for a garbage collection running meanwhile.
    for b in &parsed.blobs {
        ps.touch_blob(&b.digest);
    }
    Ok(References::Present)
}

async fn put_manifest(
    app: &App,
    name: RepoName,
    reference: Reference,
    req: Request<Incoming>,
    actor: Option<String>,
) -> Result<Response<Body>, RegistryError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = read_manifest_body(req).await?;
    let parsed = manifest::parse_push(content_type.as_deref(), &bytes)?;
    let digest = Digest::of(&bytes);
    if let Reference::Digest(d) = &reference {
        if *d != digest {
            return Err(RegistryError::DigestInvalid(format!(
                "the manifest has digest {digest}, not {d}"
            )));
        }
    }
    let tag = match &reference {
        Reference::Tag(t) => Some(t.clone()),
        Reference::Digest(_) => None,
    };
    let size = bytes.len();
    let descriptor = parsed.referrer(digest, size as u64);
    let subject = parsed.subject.as_ref().map(|s| s.digest);
    let media_type = parsed.media_type.clone();
    let (ps, n, t, mt) = (
        app.private.store.clone(),
        name.clone(),
        tag.clone(),
        media_type.clone(),
    );
    let guard = app.private.lock_repo(&name).await;
    let references = blocking(move || {
        let _guard = guard;
        let references = check_references(&ps, &n, &parsed)?;
        if let References::Unmet(_) = references {
            return Ok(references);
        }
        ps.store()
            .put_manifest(Area::Local, digest, &mt, &bytes)
            .map_err(io::Error::other)?;
        ps.link_manifest(&n, &digest)?;
        if let Some(subject) = &subject {
            ps.add_referrer(&n, subject, &digest, &descriptor)?;
        }
        if let Some(t) = &t {
            ps.set_tag(&n, t, &digest, &mt)?;
        }
        Ok(references)
    })
    .await?;
    if let References::Unmet(e) = references {
        return Err(e);
    }
    tracing::info!(repository = %name, reference = %reference, %digest, user = actor.as_deref().unwrap_or("-"), "manifest pushed");
    app.private.webhooks.notify(Event {
        action: "push",
        repository: name.to_string(),
        tag: tag.map(|t| t.to_string()),
        digest: Some(digest.to_string()),
        media_type: Some(media_type),
        size: Some(size as u64),
        actor,
        timestamp: now_rfc3339(),
    });
    let mut headers = vec![
        (LOCATION, format!("/v2/{name}/manifests/{digest}")),
        (CONTENT_DIGEST, digest.to_string()),
        (CONTENT_LENGTH, "0".into()),
    ];
    if let Some(s) = subject {
        headers.push((OCI_SUBJECT, s.to_string()));
    }
    respond(StatusCode::CREATED, headers, empty())
}

async fn delete_manifest(
    app: &App,
    name: RepoName,
    reference: Reference,
    actor: Option<String>,
) -> Result<Response<Body>, RegistryError> {
    let unknown = || RegistryError::ManifestUnknown(format!("{name}:{reference}"));
    let ps = app.private.store.clone();
    let n = name.clone();
    let r = reference.clone();
    let store = ps.store().clone();
    let guard = app.private.lock_repo(&name).await;
    // (digest, media type) of what was deleted, or None when the reference names nothing here.
    let deleted = blocking(move || {
        let _guard = guard;
        match &r {
            Reference::Tag(t) => {
                let Some(d) = ps.resolve_tag(&n, t)? else {
                    return Ok(None);
                };
                ps.remove_tag(&n, t)?;
                let mt = store.get_manifest(Area::Local, &d)?.map(|(_, mt)| mt);
                Ok(Some((d, mt)))
            }
            Reference::Digest(d) => {
                if !ps.manifest_in_repo(&n, d) {
                    return Ok(None);
                }
                let stored = store.get_manifest(Area::Local, d)?;
                // Tags first: a delete cut short leaves a manifest without tags, not tags
                // without their manifest.
                for (t, target) in ps.tags(&n)? {
                    if target == *d {
                        ps.remove_tag(&n, &t)?;
                    }
                }
                ps.unlink_manifest(&n, d)?;
                let mt = stored.map(|(bytes, mt)| {
                    if let Ok(Some(subject)) =
                        manifest::parse_stored(&mt, &bytes).map(|p| p.subject)
                    {
                        if let Err(e) = ps.remove_referrer(&n, &subject.digest, d) {
                            tracing::warn!(error = %e, "cannot remove a referrer link");
                        }
                    }
                    mt
                });
                Ok(Some((*d, mt)))
            }
        }
    })
    .await?
    .ok_or_else(unknown)?;
    let (digest, media_type) = deleted;
    if matches!(reference, Reference::Digest(_)) {
        app.manifests.forget(Area::Local, &digest).await;
    }
    tracing::info!(repository = %name, reference = %reference, user = actor.as_deref().unwrap_or("-"), "manifest deleted");
    app.private.webhooks.notify(Event {
        action: "delete",
        repository: name.to_string(),
        tag: match &reference {
            Reference::Tag(t) => Some(t.to_string()),
            Reference::Digest(_) => None,
        },
        digest: Some(digest.to_string()),
        media_type,
        size: None,
        actor,
        timestamp: now_rfc3339(),
    });
    accepted()
}

// --- listings -------------------------------------------------------------------------------

/// One page of a sorted list.
#[derive(Debug, PartialEq, Eq)]
struct Page {
    items: Vec<String>,
    /// The page size and last entry, when more entries follow.
    next: Option<(usize, String)>,
}

/// The entries after `last`, at most `n`, and whether more follow.
fn paginate(items: Vec<String>, query: &Query) -> Result<Page, RegistryError> {
    let n = query.page_size()?;
    let mut items: Vec<String> = match &query.last {
        Some(last) => items.into_iter().filter(|i| i > last).collect(),
        None => items,
    };
    let mut next = None;
    if let Some(n) = n {
        if items.len() > n {
            items.truncate(n);
            if let Some(last) = items.last() {
                next = Some((n, last.clone()));
            }
        }
    }
    Ok(Page { items, next })
}

fn next_link(path: &str, next: Option<(usize, String)>) -> Vec<(HeaderName, String)> {
    next.map(|(n, last)| {
        let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
        (LINK, format!("<{path}?n={n}&last={last}>; rel=\"next\""))
    })
    .into_iter()
    .collect()
}

async fn tags(app: &App, name: RepoName, query: &Query) -> Result<Response<Body>, RegistryError> {
    let (ps, n) = (app.private.store.clone(), name.clone());
    let tags = blocking(move || {
        if !ps.repo_exists(&n) {
            return Ok(None);
        }
        Ok(Some(
            ps.tags(&n)?
                .into_iter()
                .map(|(t, _)| t.to_string())
                .collect::<Vec<_>>(),
        ))
    })
    .await?
    .ok_or_else(|| RegistryError::NameUnknown(name.to_string()))?;
    let page = paginate(tags, query)?;
    json_response(
        "application/json",
        &serde_json::json!({"name": name.as_str(), "tags": page.items}),
        next_link(&format!("/v2/{name}/tags/list"), page.next),
    )
}

/// The most repositories one catalog page lists: a client asking for more, or for no page
/// size, gets this many and a `Link` to the rest.
pub const MAX_CATALOG_PAGE: usize = 1000;

async fn catalog(app: &App, query: &Query) -> Result<Response<Body>, RegistryError> {
    let n = query
        .page_size()?
        .unwrap_or(MAX_CATALOG_PAGE)
        .min(MAX_CATALOG_PAGE);
    let last = query.last.clone();
    let store = app.private.store.store().clone();
    let mut names = blocking(move || Ok(store.catalog_names(last.as_deref(), n + 1))).await?;
    let next = if names.len() > n {
        names.truncate(n);
        names.last().map(|l| (n, l.clone()))
    } else {
        None
    };
    json_response(
        "application/json",
        &serde_json::json!({ "repositories": names }),
        next_link("/v2/_catalog", next),
    )
}

/// Referrers listed per page unless the client asks for fewer; more follow through `Link`.
pub const MAX_REFERRERS_PAGE: usize = 100;

async fn referrers(
    app: &App,
    name: RepoName,
    subject: Digest,
    query: &Query,
) -> Result<Response<Body>, RegistryError> {
    let n = query
        .page_size()?
        .unwrap_or(MAX_REFERRERS_PAGE)
        .clamp(1, MAX_REFERRERS_PAGE);
    let after = query.last.as_deref().map(Digest::parse).transpose()?;
    let artifact_type = query.artifact_type.clone();
    let (ps, n2, t) = (
        app.private.store.clone(),
        name.clone(),
        artifact_type.clone(),
    );
    // A filtered page may come back short (even empty) with a Link: reading stops after a few
    // pages' worth of referrers, matching or not.
    let (list, next) = blocking(move || {
        ps.referrers_page(&n2, &subject, after.as_ref(), n, 4 * n, &|d| {
            t.as_ref().map_or(true, |t| {
                d.get("artifactType").and_then(|v| v.as_str()) == Some(t.as_str())
            })
        })
    })
    .await?;
    let mut extra = Vec::new();
    if artifact_type.is_some() {
        extra.push((FILTERS_APPLIED, "artifactType".to_owned()));
    }
    if let Some(next) = next {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("n", &n.to_string());
        q.append_pair("last", &next.to_string());
        if let Some(t) = &artifact_type {
            q.append_pair("artifactType", t);
        }
        extra.push((
            LINK,
            format!(
                "</v2/{name}/referrers/{subject}?{}>; rel=\"next\"",
                q.finish()
            ),
        ));
    }
    json_response(
        OCI_INDEX,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": list,
        }),
        extra,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes=5-5"), Some((5, 5)));
        assert_eq!(parse_content_range("9-1"), None);
        assert_eq!(parse_content_range("x"), None);
    }

    #[test]
    fn pages() {
        let items: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let q = Query::parse(Some("n=2&last=a"));
        let page = paginate(items.clone(), &q).unwrap();
        assert_eq!(page.items, ["b", "c"]);
        assert_eq!(page.next, Some((2, "c".to_owned())));
        let page = paginate(items.clone(), &Query::parse(Some("n=2&last=c"))).unwrap();
        assert_eq!(page.items, ["d"]);
        assert_eq!(page.next, None);
        let page = paginate(items, &Query::parse(None)).unwrap();
        assert_eq!(page.items.len(), 4);
        assert_eq!(
            next_link("/v2/_catalog", Some((1, "private/a".into())))[0].1,
            "</v2/_catalog?n=1&last=private%2Fa>; rel=\"next\""
        );
    }
}
