//! Where things are in the bucket (see the layout in `store::s3`).

use crate::oci::names::{Digest, RepoName};
use crate::store::{Area, LinkKind, LOCAL_UPSTREAM};

/// Where a blob's last use is recorded (see `mark_used`).
pub(super) fn used_key(area: Area, d: &Digest) -> String {
    format!("{}/used/{}", area.name(), d.hex())
}

pub(super) fn blob_key(area: Area, d: &Digest) -> String {
    format!("{}/blobs/sha256/{}", area.name(), d.hex())
}

pub(super) fn type_key(area: Area, d: &Digest) -> String {
    format!("{}/types/sha256/{}", area.name(), d.hex())
}

pub(super) fn tags_dir(area: Area, upstream: &str, repo: &RepoName) -> String {
    format!("{}/repos/{upstream}/{repo}/_tags", area.name())
}

pub(super) fn links_dir(repo: &RepoName, kind: LinkKind) -> String {
    let base = format!("local/repos/{LOCAL_UPSTREAM}/{repo}");
    match kind {
        LinkKind::Layers => format!("{base}/_layers"),
        LinkKind::Manifests => format!("{base}/_manifests"),
        LinkKind::Referrers(subject) => format!("{base}/_referrers/{}", subject.hex()),
    }
}

pub(super) fn link_key(repo: &RepoName, kind: LinkKind, d: &Digest) -> String {
    format!("{}/{}", links_dir(repo, kind), d.hex())
}

/// `a/b/_tags/x` → (`a/b`, `_tags/x`): repository names never have a segment starting with
/// `_`, so the first such segment ends the name.
pub(super) fn split_repo(key: &str) -> Option<(RepoName, &str)> {
    let at = key.find("/_")?;
    Some((RepoName::parse(&key[..at]).ok()?, &key[at + 1..]))
}

pub(super) fn digest_of_key(key: &str) -> Option<Digest> {
    let hex = key.rsplit('/').next()?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}
