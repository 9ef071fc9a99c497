//! Listings: tags, the catalog and referrers, each paged with `n`, `last` and a `Link`.

use super::*;

/// One page of a sorted list.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Page {
    items: Vec<String>,
    /// The page size and last entry, when more entries follow.
    next: Option<(usize, String)>,
}

/// The entries after `last`, at most `n`, and whether more follow.
pub(super) fn paginate(items: Vec<String>, query: &Query) -> Result<Page, RegistryError> {
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

pub(super) fn next_link(path: &str, next: Option<(usize, String)>) -> Vec<(HeaderName, String)> {
    next.map(|(n, last)| {
        let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
        (LINK, format!("<{path}?n={n}&last={last}>; rel=\"next\""))
    })
    .into_iter()
    .collect()
}

pub(super) async fn tags(
    app: &App,
    name: RepoName,
    query: &Query,
) -> Result<Response<Body>, RegistryError> {
    let (ps, n) = (app.private.store.clone(), name.clone());
    let tags = blocking(move || {
        if !ps.repo_exists(&n)? {
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

/// Catalog pages read from the store for one answer at most, when access rules hide names: a
/// page of hidden names ends the answer early, with a `Link` to go on from there.
const CATALOG_SCANS: usize = 8;

/// `GET /v2/_catalog`. Under access rules, a private repository is listed only to users who may
/// pull from it (`private_pull_public` lists them all); mirrored ones are listed to everyone.
pub(super) async fn catalog(
    app: &App,
    query: &Query,
    user: Option<&User>,
) -> Result<Response<Body>, RegistryError> {
    let n = query
        .page_size()?
        .unwrap_or(MAX_CATALOG_PAGE)
        .min(MAX_CATALOG_PAGE);
    let config = &app.config;
    let filtered = !config.access.is_empty() && !config.private_pull_public;
    let visible = |name: &str| {
        if !filtered {
            return true;
        }
        let Ok(repo) = RepoName::parse(name) else {
            return false;
        };
        !app.is_private(&repo)
            || user.is_some_and(|u| {
                crate::auth::rules::rights(config, u.name(), &repo)
                    .actions
                    .contains(crate::auth::Actions::PULL)
            })
    };
    let mut names = Vec::new();
    let mut cursor = query.last.clone();
    let mut more = false;
    for _ in 0..CATALOG_SCANS {
        let store = app.private.store.store().clone();
        let after = cursor.clone();
        let batch = blocking(move || Ok(store.catalog_names(after.as_deref(), n + 1))).await?;
        let batch_more = batch.len() > n;
        let scanned = batch.len().min(n);
        for (i, name) in batch.into_iter().take(n).enumerate() {
            cursor = Some(name.clone());
            if visible(&name) {
                names.push(name);
                if names.len() == n {
                    more = i + 1 < scanned || batch_more;
                    break;
                }
            }
        }
        if names.len() == n {
            break;
        }
        if !batch_more {
            more = false;
            break;
        }
        // Every page scanned so far was mostly hidden; past the last scan the client goes on.
        more = true;
    }
    let next = if more {
        cursor.map(|last| (n, last))
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

pub(super) async fn referrers(
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
