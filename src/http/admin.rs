//! The admin routes: purges of mirrored content (a manifest DELETE on a mirrored repository,
//! and `DELETE /_berth/api/mirror/<name>` for a whole one). Authorization (a user whom a rule
//! makes admin) has been done.

use super::*;
use crate::mirror::purge::{PurgeReport, PurgeTarget};

impl App {
    /// `DELETE /v2/<name>/manifests/<reference>` on a mirrored repository.
    pub(super) async fn purge_manifest(
        &self,
        name: RepoName,
        reference: Reference,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        let target = match reference {
            Reference::Tag(t) => PurgeTarget::Tag(t),
            Reference::Digest(d) => PurgeTarget::Manifest(d),
        };
        self.purge(name, target, query).await
    }

    /// `DELETE /_berth/api/mirror/<name>[?ns=<upstream>]`.
    pub(super) async fn purge_repository(
        &self,
        name: RepoName,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        if self.is_private(&name) {
            return Err(RegistryError::Denied(format!(
                "{name} is in the private namespace, not mirrored: delete its manifests instead"
            )));
        }
        self.purge(name, PurgeTarget::Repository, query).await
    }

    async fn purge(
        &self,
        name: RepoName,
        target: PurgeTarget,
        query: &Query,
    ) -> Result<Response<Body>, RegistryError> {
        let (up, name) = self.mirror.route(query.ns.as_deref(), name)?;
        let report: PurgeReport = self.mirror.purge(&up, &name, target).await?;
        let body =
            serde_json::to_string(&report).map_err(|e| RegistryError::Internal(e.to_string()))?;
        let mut resp = Response::builder()
            .status(StatusCode::ACCEPTED)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len())
            .body(full(body))
            .map_err(internal)?;
        api_version(&mut resp);
        Ok(resp)
    }
}
