//! Writing a blob: into a local staging file, hashed as it is written, published under its
//! digest only when the bytes match (see `BlobWriter::commit`). Every backend stages this way:
//! verification needs the whole blob, and readers that follow a download read the staging file.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::StoreError;
use crate::oci::names::Digest;

/// A blob being written. Dropping it without `commit` removes the temp file.
pub struct BlobWriter {
    file: Arc<File>,
    temp: Option<PathBuf>,
    hasher: Sha256,
    written: u64,
    expected: Digest,
    /// Makes the verified, durable staging file the blob (the backend's part of a commit).
    publish: Publish,
}

/// What a backend does with a verified staging file: move it into place, upload it…
pub type Publish = Box<dyn FnOnce(&Path) -> io::Result<()> + Send + Sync>;

impl BlobWriter {
    /// A writer into `temp` (created empty by the backend) of a blob expected to hash to
    /// `expected`; `publish` runs on commit.
    pub fn new(file: File, temp: PathBuf, expected: Digest, publish: Publish) -> BlobWriter {
        BlobWriter {
            file: Arc::new(file),
            temp: Some(temp),
            hasher: Sha256::new(),
            written: 0,
            expected,
            publish,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, self.written)?;
        // Hashed right after the write, while the bytes are still in the CPU's cache.
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Checks what was written against the expected digest, without making it durable yet.
    pub fn verify(&self) -> Result<(), StoreError> {
        let actual = Digest::from_sha256(self.hasher.clone().finalize().into());
        if actual == self.expected {
            Ok(())
        } else {
            Err(StoreError::DigestMismatch {
                expected: self.expected,
                actual,
            })
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn expected(&self) -> Digest {
        self.expected
    }

    /// The bytes written so far, for readers that follow the write as it grows.
    pub fn follow(&self) -> super::pages::Growing {
        super::pages::Growing::new(self.file.clone())
    }

    /// Verifies the digest, makes the bytes durable and publishes them.
    pub fn commit(mut self) -> Result<u64, StoreError> {
        self.verify()?;
        self.file.sync_all()?;
        let temp = self
            .temp
            .take()
            .ok_or_else(|| io::Error::other("blob committed twice"))?;
        let publish = std::mem::replace(&mut self.publish, Box::new(|_| Ok(())));
        if let Err(e) = publish(&temp) {
            let _ = fs::remove_file(&temp);
            return Err(e.into());
        }
        Ok(self.written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
    }
}
