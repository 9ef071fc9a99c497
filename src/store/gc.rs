//! `berth gc`: garbage collection of the private namespace.
//!
//! Mark: every manifest linked into a private repository (and every tag's target) is kept, with
//! the config, layers and child manifests it refers to. Sweep: any other blob in the local area
//! is removed, unless it was written or linked less than `blob_min_age` ago (`--grace`, an hour
//! by default), so blobs of a push in progress, whose manifest has not arrived yet, survive a
//! collection running beside a live server. Links to removed blobs and upload sessions idle for longer than
//! `upload_max_age` go as well. Mirrored content is not touched: the cache bounds itself.

use std::collections::HashSet;
use std::io;
use std::time::{Duration, SystemTime};

use crate::oci::manifest;
use crate::oci::names::Digest;
use crate::oci::routes::UploadId;
use crate::store::private::PrivateStore;
use crate::store::{Area, Store};

/// Blobs younger than this are never collected.
pub const BLOB_MIN_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// The time ages are measured against (injectable for tests).
    pub now: SystemTime,
    pub upload_max_age: Duration,
    pub blob_min_age: Duration,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
}

impl GcOptions {
    pub fn new(upload_max_age: Duration) -> GcOptions {
        GcOptions {
            now: SystemTime::now(),
            upload_max_age,
            blob_min_age: BLOB_MIN_AGE,
            dry_run: false,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    /// Blobs (and manifests) removed, with their sizes.
    pub blobs: Vec<(Digest, u64)>,
    /// Upload sessions removed, with the bytes they held.
    pub uploads: Vec<(UploadId, u64)>,
    /// Repository links to blobs that are gone.
    pub links: usize,
    /// Unreferenced blobs left alone because they are recent.
    pub kept_recent: usize,
    /// Blobs kept because a manifest refers to them.
    pub kept_referenced: usize,
    pub bytes_freed: u64,
}

/// Collects garbage in the store's private area.
pub fn collect(store: &Store, opts: &GcOptions) -> io::Result<GcReport> {
    let ps = PrivateStore::new(store.clone());
    let mut report = GcReport::default();

    // Mark.
    let mut live: HashSet<Digest> = HashSet::new();
    let mut manifests: Vec<Digest> = Vec::new();
    for repo in ps.all_repos()? {
        manifests.extend(ps.manifests_of(&repo)?);
        manifests.extend(ps.tags(&repo)?.into_iter().map(|(_, d)| d));
    }
    let mut seen: HashSet<Digest> = HashSet::new();
    while let Some(d) = manifests.pop() {
        if !seen.insert(d) {
            continue;
        }
        live.insert(d);
        let Some((bytes, media_type)) = store.get_manifest(Area::Local, &d)? else {
            continue;
        };
        match manifest::parse_stored(&media_type, &bytes) {
            Ok(parsed) => {
                live.extend(parsed.blobs.iter().map(|b| b.digest));
                manifests.extend(parsed.children.iter().map(|c| c.digest));
            }
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "a stored manifest does not parse; what it refers to may be collected");
            }
        }
    }

    // Sweep blobs.
    let mut removed: HashSet<Digest> = HashSet::new();
    for blob in store.blobs(Area::Local)? {
        let digest = blob.digest;
        if live.contains(&digest) {
            report.kept_referenced += 1;
            continue;
        }
        if age(opts.now, blob.last_used) < opts.blob_min_age {
            report.kept_recent += 1;
            continue;
        }
        if !opts.dry_run {
            store.remove_blob(Area::Local, &digest)?;
            store.remove_manifest_type(Area::Local, &digest)?;
        }
        report.bytes_freed += blob.len;
        report.blobs.push((digest, blob.len));
        removed.insert(digest);
    }

    // Links to what is gone.
    for repo in ps.all_repos()? {
        for d in ps.blobs_of(&repo)? {
            let gone = removed.contains(&d) || store.blob_len(Area::Local, &d)?.is_none();
            if gone {
                report.links += 1;
                if !opts.dry_run {
                    ps.unlink_blob(&repo, &d)?;
                }
            }
        }
    }

    // Abandoned uploads.
    for (id, size, last) in ps.uploads.all()? {
        if age(opts.now, last) < opts.upload_max_age {
            continue;
        }
        if !opts.dry_run {
            ps.uploads.remove(&id)?;
        }
        report.bytes_freed += size;
        report.uploads.push((id, size));
    }
    report.blobs.sort();
    Ok(report)
}

fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::ZERO)
}
