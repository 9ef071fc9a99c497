//! Links of private repositories on disk: one small file per link, named by the linked digest.
//!
//! ```text
//! local/repos/_local/<repo>/_layers/<hex>                   the blob belongs to the repository
//! local/repos/_local/<repo>/_manifests/<hex>                the manifest belongs to the repository
//! local/repos/_local/<repo>/_referrers/<subject hex>/<hex>  descriptor of a manifest whose subject
//!                                                           is <subject>
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::DiskStore;
use crate::oci::names::{Digest, RepoName};
use crate::store::LinkKind;

impl DiskStore {
    pub(super) fn links_dir(&self, repo: &RepoName, kind: LinkKind) -> PathBuf {
        let repo_dir = self.local_repos_dir().join(repo.as_str());
        match kind {
            LinkKind::Layers => repo_dir.join("_layers"),
            LinkKind::Manifests => repo_dir.join("_manifests"),
            LinkKind::Referrers(subject) => repo_dir.join("_referrers").join(subject.hex()),
        }
    }

    pub(super) fn link_path(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> PathBuf {
        self.links_dir(repo, kind).join(digest.hex())
    }

    pub(super) fn unlink(
        &self,
        repo: &RepoName,
        kind: LinkKind,
        digest: &Digest,
    ) -> io::Result<bool> {
        let existed = match fs::remove_file(self.link_path(repo, kind, digest)) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if let LinkKind::Referrers(_) = kind {
            // Leave no empty directory per subject behind; failing because another push just
            // added a referrer is fine.
            let _ = fs::remove_dir(self.links_dir(repo, kind));
        }
        Ok(existed)
    }
}

/// The digests named by the files of a link directory, sorted.
pub(super) fn read_links(dir: &Path) -> io::Result<Vec<Digest>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<Digest> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            Digest::parse(&format!("sha256:{}", name.to_str()?)).ok()
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Collects repository names: a directory holding one of the `_` directories is a repository
/// (repository names never start with `_`, so these never collide with a name's segments).
pub(super) fn walk_repos(dir: &Path, prefix: &str, out: &mut Vec<RepoName>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut is_repo = false;
    for e in entries.filter_map(Result::ok) {
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('_') {
            is_repo = true;
        } else if e.path().is_dir() {
            let next = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            walk_repos(&e.path(), &next, out);
        }
    }
    if is_repo {
        if let Ok(r) = RepoName::parse(prefix) {
            out.push(r);
        }
    }
}
