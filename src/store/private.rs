//! The private namespace as the content store holds it: which content belongs to which
//! repository (links, see [`LinkKind`]), tags, the referrers index, and blob upload sessions.
//! Everything here blocks; callers on the async side run it through `spawn_blocking`.
//!
//! Content itself lives in the store's local area, shared by all private repositories. A link
//! is what makes content visible in a repository: a blob pushed to `private/a` is not served
//! from `private/b` until it is pushed or mounted there. Content no manifest refers to is
//! removed by `berth gc`.

use std::io;

use crate::oci::manifest::Descriptor;
use crate::oci::names::{Digest, RepoName, Tag};
use crate::oci::routes::UploadId;
use crate::store::uploads::Uploads;
use crate::store::{now_secs, Area, LinkKind, Store, StoreError, TagEntry, LOCAL_UPSTREAM};

pub use crate::store::uploads::UploadInfo;

/// What `fsck_tags` found.
#[derive(Debug, Default)]
pub struct TagCheck {
    pub checked: u64,
    /// Tags naming a manifest their repository does not hold (removed when repairing).
    pub dangling: Vec<(RepoName, Tag, Digest)>,
}

#[derive(Clone)]
pub struct PrivateStore {
    store: Store,
    /// Blob uploads in progress.
    pub uploads: Uploads,
}

impl PrivateStore {
    pub fn new(store: Store) -> PrivateStore {
        PrivateStore {
            uploads: store.uploads(),
            store,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether anything was ever pushed to the repository.
    pub fn repo_exists(&self, repo: &RepoName) -> io::Result<bool> {
        Ok(self
            .store
            .tag_names(Area::Local, LOCAL_UPSTREAM, repo)?
            .is_some()
            || !self.store.links(repo, LinkKind::Manifests)?.is_empty()
            || !self.store.links(repo, LinkKind::Layers)?.is_empty())
    }

    // --- blobs -------------------------------------------------------------------------------

    /// Makes a stored blob part of a repository, and marks it as recently used so a concurrent
    /// garbage collection leaves it alone.
    pub fn link_blob(&self, repo: &RepoName, digest: &Digest) -> io::Result<()> {
        self.link(repo, LinkKind::Layers, digest)?;
        self.store.mark_used(Area::Local, digest);
        Ok(())
    }

    /// The blob's length, when it is stored and belongs to the repository.
    pub fn blob_in_repo(&self, repo: &RepoName, digest: &Digest) -> io::Result<Option<u64>> {
        if !self.store.has_link(repo, LinkKind::Layers, digest)? {
            return Ok(None);
        }
        self.store.blob_len(Area::Local, digest)
    }

    pub fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        self.store.remove_link(repo, LinkKind::Layers, digest)
    }

    /// Marks blobs a manifest refers to as recently used (see `link_blob`).
    pub fn touch_blob(&self, digest: &Digest) {
        self.store.mark_used(Area::Local, digest);
    }

    // --- manifests and tags ----------------------------------------------------------------

    pub fn link_manifest(&self, repo: &RepoName, digest: &Digest) -> io::Result<()> {
        self.link(repo, LinkKind::Manifests, digest)
    }

    pub fn manifest_in_repo(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        self.store.has_link(repo, LinkKind::Manifests, digest)
    }

    pub fn unlink_manifest(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        self.store.remove_link(repo, LinkKind::Manifests, digest)
    }

    /// Every manifest linked into the repository.
    pub fn manifests_of(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        self.store.links(repo, LinkKind::Manifests)
    }

    /// Every blob linked into the repository.
    pub fn blobs_of(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        self.store.links(repo, LinkKind::Layers)
    }

    pub fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<Option<Digest>> {
        Ok(self
            .store
            .get_tag(Area::Local, LOCAL_UPSTREAM, repo, tag, "")?
            .map(|e| e.digest))
    }

    pub fn set_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        media_type: &str,
    ) -> io::Result<()> {
        let entry = TagEntry {
            digest: *digest,
            media_type: media_type.to_owned(),
            fetched_at: now_secs(),
        };
        self.store
            .put_tag(Area::Local, LOCAL_UPSTREAM, repo, tag, "", &entry)
    }

    pub fn remove_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<bool> {
        self.store
            .remove_tag(Area::Local, LOCAL_UPSTREAM, repo, tag, "")
    }

    /// The repository's tags with their digests, sorted by tag.
    pub fn tags(&self, repo: &RepoName) -> io::Result<Vec<(Tag, Digest)>> {
        Ok(self
            .store
            .list_tags(Area::Local, LOCAL_UPSTREAM, repo)?
            .into_iter()
            .filter(|(_, variant, _)| variant.is_empty())
            .map(|(tag, _, e)| (tag, e.digest))
            .collect())
    }

    /// Whether a tag naming `digest` resolves: the manifest is linked into the repository and
    /// stored intact.
    fn tag_resolves(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        Ok(self.manifest_in_repo(repo, digest)?
            && self.store.get_manifest(Area::Local, digest)?.is_some())
    }

    /// Finds tags that name a manifest the repository does not hold (`berth fsck`): pulls of
    /// them fail though `tags/list` shows them. With `repair`, removes each one, unless a push
    /// made it resolve (or pointed it elsewhere) since it was looked at.
    pub fn fsck_tags(&self, repair: bool) -> io::Result<TagCheck> {
        let mut check = TagCheck::default();
        for repo in self.store.private_repos()? {
            for (tag, digest) in self.tags(&repo)? {
                check.checked += 1;
                if self.tag_resolves(&repo, &digest)? {
                    continue;
                }
                if repair
                    && self.resolve_tag(&repo, &tag)? == Some(digest)
                    && !self.tag_resolves(&repo, &digest)?
                {
                    self.remove_tag(&repo, &tag)?;
                }
                check.dangling.push((repo.clone(), tag, digest));
            }
        }
        Ok(check)
    }

    // --- referrers -------------------------------------------------------------------------

    /// Records that `referrer` (described by `descriptor`) has `subject` as its subject.
    pub fn add_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: &Descriptor,
    ) -> io::Result<()> {
        let json = serde_json::to_vec(descriptor).map_err(io::Error::other)?;
        self.store
            .put_link(repo, LinkKind::Referrers(*subject), referrer, &json)
    }

    pub fn remove_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> io::Result<()> {
        self.store
            .remove_link(repo, LinkKind::Referrers(*subject), referrer)
            .map(drop)
    }

    /// Descriptors of the manifests in the repository whose subject is `subject`, sorted by
    /// digest so pages are stable.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> io::Result<Vec<serde_json::Value>> {
        Ok(self
            .referrers_page(repo, subject, None, usize::MAX, usize::MAX, &|_| true)?
            .0)
    }

    /// One page of [`referrers`](Self::referrers): the descriptors of referrers whose digest
    /// sorts after `after` that `keep` accepts, at most `n`, reading at most `scan` of them.
    /// Returns the page and, when more may follow, the last digest looked at (where the next
    /// page starts), so a request costs its page however many referrers a subject has.
    pub fn referrers_page(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        n: usize,
        scan: usize,
        keep: &dyn Fn(&serde_json::Value) -> bool,
    ) -> io::Result<(Vec<serde_json::Value>, Option<Digest>)> {
        let kind = LinkKind::Referrers(*subject);
        let links = self.store.links(repo, kind)?;
        let mut rest = links.iter().filter(|d| after.map_or(true, |a| *d > a));
        let mut out = Vec::new();
        let mut scanned = 0;
        let mut last = None;
        for digest in rest.by_ref() {
            last = Some(*digest);
            scanned += 1;
            // A referrer deleted from the repository no longer counts, whatever is left stored.
            if self.manifest_in_repo(repo, digest)? {
                if let Some(bytes) = self.store.get_link(repo, kind, digest)? {
                    if let Ok(v) = serde_json::from_slice(&bytes) {
                        if keep(&v) {
                            out.push(v);
                        }
                    }
                }
            }
            if out.len() >= n || scanned >= scan {
                break;
            }
        }
        let more = rest.next().is_some();
        Ok((out, if more { last } else { None }))
    }

    // --- repositories ----------------------------------------------------------------------

    /// Private repositories holding at least one manifest or tag, sorted.
    pub fn list_repos(&self) -> io::Result<Vec<RepoName>> {
        let mut out = Vec::new();
        for r in self.store.private_repos()? {
            if !self.manifests_of(&r)?.is_empty()
                || self
                    .store
                    .tag_names(Area::Local, LOCAL_UPSTREAM, &r)?
                    .is_some_and(|t| !t.is_empty())
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Every private repository, whether or not it holds anything.
    pub fn all_repos(&self) -> io::Result<Vec<RepoName>> {
        self.store.private_repos()
    }

    /// Links once: a link already there is left as it is.
    fn link(&self, repo: &RepoName, kind: LinkKind, digest: &Digest) -> io::Result<()> {
        if self.store.has_link(repo, kind, digest)? {
            return Ok(());
        }
        self.store
            .put_link(repo, kind, digest, digest.to_string().as_bytes())
    }

    // --- uploads ---------------------------------------------------------------------------

    /// Finishes an upload: when its bytes match `expected`, the store adopts them as the blob
    /// and it is linked into `repo`. On a mismatch the upload is discarded and nothing is
    /// stored. Returns the blob's length.
    pub fn finish_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        expected: &Digest,
    ) -> Result<u64, StoreError> {
        let (data, len) = self.uploads.verified_data(id, expected)?;
        self.store.adopt_blob(Area::Local, expected, &data)?;
        self.link_blob(repo, expected)?;
        self.uploads.remove(id)?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PrivateStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::disk::DiskStore::open(dir.path()).unwrap();
        (dir, PrivateStore::new(std::sync::Arc::new(store)))
    }

    #[test]
    fn uploads_finish_into_the_store_and_link() {
        let (_dir, ps) = setup();
        let repo = RepoName::parse("private/app").unwrap();
        let other = RepoName::parse("private/other").unwrap();
        let id = UploadId::new();
        ps.uploads.create(&repo, &id, Some("alice")).unwrap();
        assert_eq!(ps.uploads.size(&repo, &id).unwrap(), Some(0));
        assert_eq!(
            ps.uploads.infos().unwrap()[0].1.owner.as_deref(),
            Some("alice")
        );
        assert_eq!(ps.uploads.size(&other, &id).unwrap(), None);
        std::fs::write(ps.uploads.data_path(&id), b"hello").unwrap();
        let wrong = Digest::of(b"jello");
        assert!(matches!(
            ps.finish_upload(&repo, &id, &wrong),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert_eq!(ps.uploads.size(&repo, &id).unwrap(), None);
        assert!(ps.store().blob_len(Area::Local, &wrong).unwrap().is_none());

        let id = UploadId::new();
        ps.uploads.create(&repo, &id, None).unwrap();
        std::fs::write(ps.uploads.data_path(&id), b"hello").unwrap();
        let good = Digest::of(b"hello");
        assert_eq!(ps.finish_upload(&repo, &id, &good).unwrap(), 5);
        assert_eq!(ps.blob_in_repo(&repo, &good).unwrap(), Some(5));
        assert_eq!(ps.blob_in_repo(&other, &good).unwrap(), None);
        assert!(ps.uploads.all().unwrap().is_empty());
        assert_eq!(ps.all_repos().unwrap(), vec![repo.clone()]);
        // Blobs alone do not make a repository show in the catalog.
        assert!(ps.list_repos().unwrap().is_empty());
        let tag = Tag::parse("v1").unwrap();
        ps.link_manifest(&repo, &good).unwrap();
        ps.set_tag(&repo, &tag, &good, "x").unwrap();
        assert_eq!(ps.list_repos().unwrap(), vec![repo.clone()]);
        assert_eq!(ps.resolve_tag(&repo, &tag).unwrap(), Some(good));
        assert_eq!(ps.tags(&repo).unwrap(), vec![(tag, good)]);
    }

    #[test]
    fn fsck_finds_and_removes_dangling_tags() {
        let (_dir, ps) = setup();
        let repo = RepoName::parse("private/app").unwrap();
        let (m, gone) = (b"{\"m\":1}".as_slice(), Digest::of(b"gone"));
        let md = Digest::of(m);
        ps.store().put_manifest(Area::Local, md, "x", m).unwrap();
        ps.link_manifest(&repo, &md).unwrap();
        let (good, unlinked, missing) = (
            Tag::parse("good").unwrap(),
            Tag::parse("unlinked").unwrap(),
            Tag::parse("missing").unwrap(),
        );
        ps.set_tag(&repo, &good, &md, "x").unwrap();
        // Linked but not stored, and stored but not linked here.
        ps.link_manifest(&repo, &gone).unwrap();
        ps.set_tag(&repo, &missing, &gone, "x").unwrap();
        let other = RepoName::parse("private/other").unwrap();
        ps.set_tag(&other, &unlinked, &md, "x").unwrap();

        let check = ps.fsck_tags(false).unwrap();
        assert_eq!(check.checked, 3);
        assert_eq!(
            check.dangling,
            vec![
                (repo.clone(), missing.clone(), gone),
                (other.clone(), unlinked.clone(), md)
            ]
        );
        assert_eq!(
            ps.tags(&repo).unwrap().len(),
            2,
            "a check alone removes nothing"
        );
        assert_eq!(ps.fsck_tags(true).unwrap().dangling.len(), 2);
        assert_eq!(ps.tags(&repo).unwrap(), vec![(good, md)]);
        assert!(ps.tags(&other).unwrap().is_empty());
        let check = ps.fsck_tags(false).unwrap();
        assert_eq!((check.checked, check.dangling.len()), (1, 0));
    }
}
