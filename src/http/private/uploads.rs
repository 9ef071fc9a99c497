//! Blob uploads: monolithic and chunked, mounts, status, cancel, and the per-user limit on open sessions.

use super::*;

pub(super) enum PumpError {
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
pub(super) async fn pump<S: Send + 'static>(
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

pub(super) fn write_upload_sink(
    s: &mut crate::store::uploads::Appender,
    bytes: &[u8],
) -> io::Result<()> {
    s.write(bytes)
}

pub(super) fn write_blob_sink(w: &mut crate::store::BlobWriter, bytes: &[u8]) -> io::Result<()> {
    w.write(bytes)
}

pub(super) fn digest_param(query: &Query) -> Result<Option<Digest>, RegistryError> {
    query.digest.as_deref().map(Digest::parse).transpose()
}

pub(super) async fn start_upload(
    app: &App,
    name: RepoName,
    query: &Query,
    req: Request<Incoming>,
    user: Option<&User>,
) -> Result<Response<Body>, RegistryError> {
    let ps = app.private.store.clone();
    if let Some(mount) = &query.mount {
        let digest = Digest::parse(mount)?;
        // Mounting reads the source repository: a token must grant pulling it, and the access
        // rules must let the user pull it.
        let config = &app.config;
        let readable = |f: &RepoName| {
            user.map_or(true, |u| {
                u.may(&crate::auth::Need {
                    resource: format!("repository:{f}"),
                    actions: crate::auth::Actions::PULL,
                }) && (config.private_pull_public
                    || crate::auth::rules::rights(config, u.name(), f)
                        .actions
                        .contains(crate::auth::Actions::PULL))
            })
        };
        let from = match &query.from {
            Some(f) => Some(RepoName::parse(f)?).filter(|f| app.is_private(f) && readable(f)),
            None => None,
        };
        // Without `from` the blob may come from any repository, which a token scoped to
        // repositories (or a user limited by access rules) cannot vouch for: they upload
        // instead.
        let mountable = match &query.from {
            None => config.access.is_empty() && user.map_or(true, |u| !u.is_scoped()),
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
    blocking(move || ps.uploads.create(&target, &i, Some(&owner))).await?;
    reservation.keep();
    upload_accepted(StatusCode::ACCEPTED, &name, &id, 0)
}

/// A session counted against its user while it is being made. Unless kept, dropping it stops
/// counting the session, so that a failed start, or a request dropped half-way because its
/// client left, does not hold one of the user's places for good.
pub(super) struct Reservation<'a> {
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
pub(super) async fn reserve_upload(app: &App, user: &str, id: &UploadId) -> Result<(), usize> {
    let reg = &app.private;
    if reg.reserve_upload(user, id).is_ok() {
        return Ok(());
    }
    let checked_at = Instant::now();
    let (ps, ids) = (reg.store.clone(), reg.sessions_of(user));
    if let Ok(gone) = blocking(move || {
        Ok(ids
            .into_iter()
            .filter(|id| !ps.uploads.exists(id))
            .collect::<std::collections::HashSet<_>>())
    })
    .await
    {
        reg.forget_vanished(checked_at, |id| !gone.contains(id));
    }
    reg.reserve_upload(user, id)
}

/// 429 TOOMANYREQUESTS, in the registry's JSON error format, saying which limit was hit.
pub(super) fn too_many_uploads(user: &str, open: usize) -> Result<Response<Body>, RegistryError> {
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

pub(super) async fn commit_blob(writer: crate::store::BlobWriter) -> Result<u64, RegistryError> {
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
pub(super) async fn upload_size(
    app: &App,
    name: &RepoName,
    id: &UploadId,
) -> Result<u64, RegistryError> {
    let (ps, n, i) = (app.private.store.clone(), name.clone(), id.clone());
    blocking(move || ps.uploads.size(&n, &i))
        .await?
        .ok_or_else(|| RegistryError::BlobUploadUnknown(id.to_string()))
}

pub(super) async fn upload_status(
    app: &App,
    name: RepoName,
    id: UploadId,
) -> Result<Response<Body>, RegistryError> {
    let _guard = app.private.lock_upload(&id).await;
    let size = upload_size(app, &name, &id).await?;
    upload_accepted(StatusCode::NO_CONTENT, &name, &id, size)
}

/// `start-end` (inclusive) from a `Content-Range` header; `bytes ` and `/total` are tolerated.
pub(super) fn parse_content_range(v: &str) -> Option<(u64, u64)> {
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
pub(super) enum Chunk {
    /// Taken whole: the upload's size now.
    Appended(u64),
    /// Not taken (the upload is as it was): a 416 to send as is.
    Refused(Response<Body>),
}

/// Appends a request body to an upload.
pub(super) async fn append_chunk(
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
    let sink = blocking(move || ps.uploads.appender(&i, size)).await?;
    let mut body = req.into_body();
    let result = pump(&mut body, sink, write_upload_sink).await;
    let undo = || {
        let (ps, i) = (app.private.store.clone(), id.clone());
        blocking(move || ps.uploads.truncate(&i, size))
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

pub(super) async fn patch_upload(
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

pub(super) async fn finish_upload(
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

pub(super) async fn cancel_upload(
    app: &App,
    name: RepoName,
    id: UploadId,
) -> Result<Response<Body>, RegistryError> {
    let _guard = app.private.lock_upload(&id).await;
    upload_size(app, &name, &id).await?;
    let (ps, i) = (app.private.store.clone(), id.clone());
    blocking(move || ps.uploads.remove(&i)).await?;
    app.private.forget_upload(&id);
    respond(
        StatusCode::NO_CONTENT,
        vec![(CONTENT_LENGTH, "0".into())],
        empty(),
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
}
