//! Writing a blob: into a temp file, hashed as it is written, renamed into place only when the
//! bytes match the digest (see `BlobWriter::commit`).

use super::*;

/// Pieces at least this large are hashed on a second thread while they are written.
const PARALLEL_HASH_MIN: usize = 256 << 10;

/// A blob being written. Dropping it without `commit` removes the temp file.
pub struct BlobWriter {
    pub(super) file: Arc<File>,
    pub(super) temp: Option<PathBuf>,
    pub(super) hasher: Sha256,
    pub(super) written: u64,
    pub(super) dest: PathBuf,
    pub(super) expected: Digest,
}

impl BlobWriter {
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let (file, hasher, offset) = (&self.file, &mut self.hasher, self.written);
        if bytes.len() >= PARALLEL_HASH_MIN {
            // Hashing costs about as much as the write: on a large piece do both at once.
            std::thread::scope(|scope| {
                let hashing = scope.spawn(|| hasher.update(bytes));
                let written = file.write_all_at(bytes, offset);
                hashing
                    .join()
                    .map_err(|_| io::Error::other("hashing thread panicked"))?;
                written
            })?;
        } else {
            file.write_all_at(bytes, offset)?;
            hasher.update(bytes);
        }
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

    /// The temp file, for readers that follow the write as it grows.
    pub fn shared_file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Verifies the digest, makes the bytes durable and moves them into place.
    pub fn commit(mut self) -> Result<u64, StoreError> {
        self.verify()?;
        self.file.sync_all()?;
        let temp = self
            .temp
            .take()
            .ok_or_else(|| io::Error::other("blob committed twice"))?;
        if let Err(e) = rename_durable(&temp, &self.dest) {
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
