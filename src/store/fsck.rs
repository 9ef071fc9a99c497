//! `berth fsck`: re-hashes every stored blob and lists (or, repairing, removes) the corrupt ones.

use super::*;

/// What `berth fsck` found.
#[derive(Debug, Default)]
pub struct FsckReport {
    pub checked: u64,
    pub bytes: u64,
    /// Blobs whose content does not hash to their name (removed when repairing).
    pub corrupt: Vec<(Area, PathBuf)>,
}

impl Store {
    /// Re-hashes every stored blob; with `repair`, removes the corrupt ones (and a manifest's
    /// media type with it) so they are fetched again on the next pull.
    pub fn fsck(&self, repair: bool) -> io::Result<FsckReport> {
        let mut report = FsckReport::default();
        for area in [Area::Cache, Area::Local] {
            for shard in fs::read_dir(self.blobs_dir(area))?.filter_map(Result::ok) {
                for entry in fs::read_dir(shard.path())?.filter_map(Result::ok) {
                    let path = entry.path();
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let expected = Digest::parse(&format!("sha256:{name}")).ok();
                    let (actual, len) = hash_file(&path)?;
                    report.checked += 1;
                    report.bytes += len;
                    if expected == Some(actual) {
                        continue;
                    }
                    if repair {
                        fs::remove_file(&path)?;
                        if let Some(d) = expected {
                            self.remove_manifest_type(area, &d)?;
                        }
                    }
                    report.corrupt.push((area, path));
                }
            }
        }
        Ok(report)
    }
}
