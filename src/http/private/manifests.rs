//! Manifests: pulls by tag or digest, pushes (checked against what the repository holds), deletes.

use super::*;

/// The digest a reference names in the repository, if the repository holds it.
pub(super) async fn resolve(
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
        Ok(ps.manifest_in_repo(&n, &d)?.then_some(d))
    })
    .await
}

pub(super) async fn get_manifest(
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

pub(super) async fn read_manifest_body(req: Request<Incoming>) -> Result<Bytes, RegistryError> {
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
pub(super) enum References {
    /// Everything, at the sizes the manifest gives.
    Present,
    /// A reference missing or of another size: the error to answer the push with.
    Unmet(RegistryError),
}

/// Checks that everything a manifest refers to is in the repository.
pub(super) fn check_references(
    ps: &PrivateStore,
    repo: &RepoName,
    parsed: &Parsed,
) -> io::Result<References> {
    for b in parsed.blobs.iter().filter(|b| !b.has_urls) {
        if let Err(e) = b.check_stored(ps.blob_in_repo(repo, &b.digest)?, "manifest") {
            return Ok(References::Unmet(e));
        }
    }
    for c in &parsed.children {
        let len = if ps.manifest_in_repo(repo, &c.digest)? {
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

pub(super) async fn put_manifest(
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
        tag: tag.as_ref().map(|t| t.to_string()),
        tags: tag.iter().map(|t| t.to_string()).collect(),
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

pub(super) async fn delete_manifest(
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
    // (digest, media type, tags removed) of what was deleted, or None when the reference names
    // nothing here.
    let deleted = blocking(move || {
        let _guard = guard;
        match &r {
            Reference::Tag(t) => {
                let Some(d) = ps.resolve_tag(&n, t)? else {
                    return Ok(None);
                };
                ps.remove_tag(&n, t)?;
                let mt = store.get_manifest(Area::Local, &d)?.map(|(_, mt)| mt);
                Ok(Some((d, mt, vec![t.to_string()])))
            }
            Reference::Digest(d) => {
                if !ps.manifest_in_repo(&n, d)? {
                    return Ok(None);
                }
                let stored = store.get_manifest(Area::Local, d)?;
                // Tags first: a delete cut short leaves a manifest without tags, not tags
                // without their manifest.
                let mut removed = Vec::new();
                for (t, target) in ps.tags(&n)? {
                    if target == *d {
                        ps.remove_tag(&n, &t)?;
                        removed.push(t.to_string());
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
                Ok(Some((*d, mt, removed)))
            }
        }
    })
    .await?
    .ok_or_else(unknown)?;
    let (digest, media_type, tags) = deleted;
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
        tags,
        digest: Some(digest.to_string()),
        media_type,
        size: None,
        actor,
        timestamp: now_rfc3339(),
    });
    accepted()
}
