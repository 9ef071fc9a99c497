//! The mirror's routes: manifests, blobs and tag lists of mirrored repositories, from the
//! cache or through the mirror from the upstream.

use super::*;

impl App {
    pub(super) async fn get_manifest(
        &self,
        name: RepoName,
        reference: Reference,
        query: &Query,
        accept: &AcceptSet,
        head: bool,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let (served, outcome) = self.mirror.manifest(&up, &name, &reference, accept).await?;
        let m = &served.manifest;
        let mut resp = Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, &*m.media_type)
            .header(CONTENT_LENGTH, m.bytes.len())
            .header("docker-content-digest", served.digest.to_string())
            .header(ETAG, format!("\"{}\"", served.digest))
            .body(if head { empty() } else { full(m.bytes.clone()) })
            .map_err(internal)?;
        api_version(&mut resp);
        resp.extensions_mut().insert(Served { outcome });
        Ok(resp)
    }

    pub(super) async fn get_blob(
        &self,
        name: RepoName,
        digest: Digest,
        query: &Query,
        read: &BlobRead,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let (range, head) = (read.range.as_deref(), read.head);
        if let Some(resp) = self
            .serve_stored_blob(Area::Cache, digest, read, Outcome::Hit)
            .await?
        {
            return Ok(resp);
        }
        crate::mirror::admission::before_upstream()?;
        if head {
            // A blob being downloaded (or just verified, not yet renamed into the cache) has a
            // known length: no need to ask the upstream.
            if let Some(download) = self.mirror.fetches.running(&up.key, &digest) {
                if let Ok(Some(len)) = download.ready().await {
                    let mut resp =
                        blob_headers(Response::builder().status(StatusCode::OK), &digest)
                            .header(CONTENT_LENGTH, len)
                            .body(empty())
                            .map_err(internal)?;
                    resp.extensions_mut().insert(Served {
                        outcome: Outcome::Joined,
                    });
                    return Ok(resp);
                }
            }
            return self.head_upstream_blob(&up, &name, digest).await;
        }
        loop {
            match self.mirror.attach_blob(&up, &name, digest).await? {
                Attach::Cached => {
                    if let Some(resp) = self
                        .serve_stored_blob(Area::Cache, digest, read, Outcome::Hit)
                        .await?
                    {
                        return Ok(resp);
                    }
                    // Evicted between the check and the open: start over.
                }
                Attach::InFlight { download, joined } => {
                    let outcome = if joined {
                        Outcome::Joined
                    } else {
                        Outcome::Miss
                    };
                    let total = download.ready().await.map_err(|e| match e {
                        crate::mirror::fetch::FetchFailure::Upstream(u) => {
                            upstream_blob_error(u, &name, &digest)
                        }
                        other => RegistryError::Unavailable(other.to_string()),
                    })?;
                    let (status, start, end) = match (total, range) {
                        (Some(total), Some(range)) => match parse_range(range, total)? {
                            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, Some(e)),
                            None => (StatusCode::OK, 0, None),
                        },
                        _ => (StatusCode::OK, 0, None),
                    };
                    // A range is a complete body of its own: its bytes are sent only once the
                    // whole blob is verified, so no client gets a complete wrong range.
                    let verified_only = status == StatusCode::PARTIAL_CONTENT;
                    let body = BodyExt::boxed(StreamBody::new(futures_util::StreamExt::map(
                        download.reader(start, end, verified_only, read.pages),
                        |r| r.map(Frame::data),
                    )));
                    let mut b = blob_headers(Response::builder().status(status), &digest);
                    match (status, total, end) {
                        (StatusCode::PARTIAL_CONTENT, Some(total), Some(end)) => {
                            b = b.header(CONTENT_LENGTH, end - start).header(
                                CONTENT_RANGE,
                                format!("bytes {start}-{}/{total}", end - 1),
                            );
                        }
                        (_, Some(total), _) => b = b.header(CONTENT_LENGTH, total),
                        _ => {}
                    }
                    let mut resp = b.body(body).map_err(internal)?;
                    resp.extensions_mut().insert(Served { outcome });
                    return Ok(resp);
                }
            }
        }
    }

    async fn head_upstream_blob(
        &self,
        up: &Arc<Upstream>,
        name: &RepoName,
        digest: Digest,
    ) -> Result<Response<Body>, RegistryError> {
        let resp = up
            .blob(Method::HEAD, name, &digest)
            .await
            .map_err(|e| upstream_blob_error(e, name, &digest))?;
        let mut b = blob_headers(Response::builder().status(StatusCode::OK), &digest);
        if let Some(len) = crate::mirror::upstream::content_length(resp.headers()) {
            b = b.header(CONTENT_LENGTH, len);
        }
        let mut resp = b.body(empty()).map_err(internal)?;
        resp.extensions_mut().insert(Served {
            outcome: Outcome::Miss,
        });
        Ok(resp)
    }

    pub(super) async fn get_tags(
        &self,
        name: RepoName,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let pass = {
            let mut pass = form_urlencoded::Serializer::new(String::new());
            if let Some(n) = &query.n {
                pass.append_pair("n", n);
            }
            if let Some(last) = &query.last {
                pass.append_pair("last", last);
            }
            pass.finish()
        };
        crate::mirror::admission::before_upstream()?;
        let (TagList { body, link }, outcome) = self.mirror.tags_list(&up, &name, &pass).await?;
        let mut b = Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len());
        if let Some(link) = link {
            b = b.header(http::header::LINK, link);
        }
        let mut resp = b.body(full(body)).map_err(internal)?;
        api_version(&mut resp);
        resp.extensions_mut().insert(Served { outcome });
        Ok(resp)
    }
}

pub(super) fn upstream_blob_error(
    e: crate::mirror::upstream::UpstreamError,
    repo: &RepoName,
    digest: &Digest,
) -> RegistryError {
    upstream_error(e, repo, RegistryError::BlobUnknown(digest.to_string()))
}
