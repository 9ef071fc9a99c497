//! Blob upload sessions of the private namespace, staged on local disk.
//!
//! ```text
//! <uploads>/<id>/info    {"repo": …, "started": secs, "owner": user}
//! <uploads>/<id>/data    the bytes received so far
//! ```
//! A session lives on the disk of the berth that started it; finishing it verifies the bytes
//! and hands the file to the content store ([`ContentStore::adopt_blob`]). The directory is on
//! the same filesystem as the backend's staging area, so that hand-over is a rename.
//!
//! [`ContentStore::adopt_blob`]: super::ContentStore::adopt_blob

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{hash_file, now_secs, StoreError};
use crate::oci::names::{Digest, RepoName};
use crate::oci::routes::UploadId;

/// What an upload session records besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadInfo {
    pub repo: String,
    /// Seconds since the epoch when the upload was started.
    pub started: u64,
    /// The user who started it, so that a restarted server still counts each user's open
    /// sessions against `max_uploads_per_user` (sessions of older versions have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// The upload sessions of one store.
#[derive(Clone)]
pub struct Uploads {
    dir: PathBuf,
}

impl Uploads {
    pub fn new(dir: PathBuf) -> Uploads {
        Uploads { dir }
    }

    fn session_dir(&self, id: &UploadId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    pub fn data_path(&self, id: &UploadId) -> PathBuf {
        self.session_dir(id).join("data")
    }

    /// Starts upload session `id` for a repository, on behalf of `owner`.
    pub fn create(&self, repo: &RepoName, id: &UploadId, owner: Option<&str>) -> io::Result<()> {
        let dir = self.session_dir(id);
        let result = (|| {
            fs::create_dir_all(&dir)?;
            let info = UploadInfo {
                repo: repo.to_string(),
                started: now_secs(),
                owner: owner.map(str::to_owned),
            };
            let json = serde_json::to_vec(&info).map_err(io::Error::other)?;
            fs::write(dir.join("info"), json)?;
            File::create(dir.join("data"))?;
            Ok(())
        })();
        if result.is_err() {
            // A half-made session would only wait for expiry.
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    /// Every session with what its `info` records (sessions whose `info` is unreadable are left
    /// out; expiry still finds them through [`all`](Self::all)).
    pub fn infos(&self) -> io::Result<Vec<(UploadId, UploadInfo)>> {
        Ok(self
            .ids()?
            .into_iter()
            .filter_map(|id| {
                let bytes = fs::read(self.session_dir(&id).join("info")).ok()?;
                let info = serde_json::from_slice(&bytes).ok()?;
                Some((id, info))
            })
            .collect())
    }

    /// Up to `limit` sessions (the first by id), with what their `info` records and the bytes
    /// received so far, oldest first: the status page's list of uploads in flight.
    pub fn in_progress(&self, limit: usize) -> io::Result<Vec<(UploadId, UploadInfo, u64)>> {
        let mut ids = self.ids()?;
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        ids.truncate(limit);
        let mut out: Vec<_> = ids
            .into_iter()
            .filter_map(|id| {
                let dir = self.session_dir(&id);
                let info = serde_json::from_slice(&fs::read(dir.join("info")).ok()?).ok()?;
                let len = fs::metadata(dir.join("data")).ok()?.len();
                Some((id, info, len))
            })
            .collect();
        out.sort_by_key(|(_, info, _): &(UploadId, UploadInfo, u64)| info.started);
        Ok(out)
    }

    fn ids(&self) -> io::Result<Vec<UploadId>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| UploadId::parse(n).ok()))
            .collect())
    }

    pub fn exists(&self, id: &UploadId) -> bool {
        self.session_dir(id).is_dir()
    }

    /// The session's size and last activity, when it exists.
    pub fn activity(&self, id: &UploadId) -> io::Result<Option<(u64, SystemTime)>> {
        let dir = self.session_dir(id);
        match fs::metadata(&dir) {
            Ok(m) => Ok(Some(dir_activity(&dir, &m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bytes received so far, when the upload exists and belongs to `repo`.
    pub fn size(&self, repo: &RepoName, id: &UploadId) -> io::Result<Option<u64>> {
        let dir = self.session_dir(id);
        let info = match fs::read(dir.join("info")) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Ok(info) = serde_json::from_slice::<UploadInfo>(&info) else {
            return Ok(None);
        };
        if info.repo != repo.as_str() {
            return Ok(None);
        }
        match fs::metadata(dir.join("data")) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the session's next bytes, from `at` (the bytes received so far) on.
    pub fn appender(&self, id: &UploadId, at: u64) -> io::Result<Appender> {
        Ok(Appender {
            file: self.open(id)?,
            pos: at,
        })
    }

    fn open(&self, id: &UploadId) -> io::Result<File> {
        fs::OpenOptions::new().write(true).open(self.data_path(id))
    }

    /// Cuts the data back to `len` bytes (after a chunk that was refused half-way).
    pub fn truncate(&self, id: &UploadId, len: u64) -> io::Result<()> {
        self.open(id)?.set_len(len)
    }

    pub fn remove(&self, id: &UploadId) -> io::Result<()> {
        match fs::remove_dir_all(self.session_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Hashes the session's data (streaming from disk); when it matches `expected`, makes it
    /// durable and returns its path and length, for the store to adopt. On a mismatch the
    /// session is discarded.
    pub fn verified_data(
        &self,
        id: &UploadId,
        expected: &Digest,
    ) -> Result<(PathBuf, u64), StoreError> {
        let data = self.data_path(id);
        let (actual, len) = hash_file(&data)?;
        if actual != *expected {
            self.remove(id)?;
            return Err(StoreError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        File::open(&data)?.sync_all()?;
        Ok((data, len))
    }

    /// Every session with its size and last activity (for garbage collection).
    pub fn all(&self) -> io::Result<Vec<(UploadId, u64, SystemTime)>> {
        let mut out = Vec::new();
        for id in self.ids()? {
            // Gone since the listing: finished or cancelled meanwhile.
            if let Some((size, last)) = self.activity(&id)? {
                out.push((id, size, last));
            }
        }
        Ok(out)
    }
}

/// An upload's data, written at a position.
pub struct Appender {
    file: File,
    pos: u64,
}

impl Appender {
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, self.pos)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

/// The bytes an upload directory holds and when anything in it last changed.
fn dir_activity(dir: &Path, meta: &fs::Metadata) -> (u64, SystemTime) {
    let mut size = 0;
    let mut last = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if let Ok(files) = fs::read_dir(dir) {
        for f in files.filter_map(Result::ok) {
            if let Ok(m) = f.metadata() {
                size += m.len();
                if let Ok(t) = m.modified() {
                    last = last.max(t);
                }
            }
        }
    }
    (size, last)
}
