//! `berth fsck`: re-hashes every stored blob and lists (or, repairing, removes) the corrupt ones.

use std::io;

use super::{Area, ContentStore};
use crate::oci::names::Digest;

/// What `berth fsck` found.
#[derive(Debug, Default)]
pub struct FsckReport {
    pub checked: u64,
    pub bytes: u64,
    /// Blobs whose content does not hash to their name (removed when repairing).
    pub corrupt: Vec<(Area, Digest)>,
}

/// Re-hashes every stored blob; with `repair`, removes the corrupt ones (and a manifest's media
/// type with it) so they are fetched again on the next pull.
pub fn fsck(store: &dyn ContentStore, repair: bool) -> io::Result<FsckReport> {
    let mut report = FsckReport::default();
    for area in [Area::Cache, Area::Local] {
        for blob in store.blobs(area)? {
            // Gone since the listing (evicted, collected): nothing to check.
            let Some((actual, len)) = store.hash_blob(area, &blob.digest)? else {
                continue;
            };
            report.checked += 1;
            report.bytes += len;
            if actual == blob.digest {
                continue;
            }
            if repair {
                store.remove_blob(area, &blob.digest)?;
                store.remove_manifest_type(area, &blob.digest)?;
            }
            report.corrupt.push((area, blob.digest));
        }
    }
    Ok(report)
}
