//! Writing a blob: into a local staging file, hashed as it is written, published under its
//! digest only when the bytes match (see `BlobWriter::commit`). Every backend stages this way:
//! verification needs the whole blob, and readers that follow a download read the staging file.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::StoreError;
use crate::oci::names::Digest;

/// The hash of what was written: computed as it is written, or by a thread of its own that
/// takes the pieces as they come (see [`BlobWriter::hash_in_background`]).
enum Hashing {
    Inline(Sha256),
    Background {
        pieces: std::sync::mpsc::Sender<Bytes>,
        done: std::thread::JoinHandle<Sha256>,
    },
    /// The background thread was joined (or lost, which is an error).
    Joined(Option<Sha256>),
}

/// A blob being written. Dropping it without `commit` removes the temp file.
pub struct BlobWriter {
    file: Arc<File>,
    temp: Option<PathBuf>,
    hasher: Hashing,
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
            hasher: Hashing::Inline(Sha256::new()),
            written: 0,
            expected,
            publish,
        }
    }

    /// Hashes on a thread of its own from now on: for a large blob, so that hashing one piece
    /// overlaps writing the next instead of adding to it. Pieces must then come through
    /// [`write_shared`](Self::write_shared).
    pub fn hash_in_background(&mut self) -> io::Result<()> {
        let Hashing::Inline(hasher) = &mut self.hasher else {
            return Ok(());
        };
        let mut hasher = std::mem::replace(hasher, Sha256::new());
        let (pieces, arriving) = std::sync::mpsc::channel::<Bytes>();
        let done = std::thread::Builder::new()
            .name("berth-hash".into())
            .spawn(move || {
                for piece in arriving {
                    hasher.update(&piece);
                }
                hasher
            })?;
        self.hasher = Hashing::Background { pieces, done };
        Ok(())
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.hasher {
            Hashing::Inline(hasher) => hasher.update(bytes),
            Hashing::Background { pieces, .. } => {
                let _ = pieces.send(Bytes::copy_from_slice(bytes));
            }
            Hashing::Joined(_) => return Err(io::Error::other("blob written after its check")),
        }
        self.file.write_all_at(bytes, self.written)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// [`write`](Self::write) of shared bytes: a background hasher takes them without a copy.
    pub fn write_shared(&mut self, bytes: Bytes) -> io::Result<()> {
        match &mut self.hasher {
            Hashing::Background { pieces, .. } => {
                self.file.write_all_at(&bytes, self.written)?;
                self.written += bytes.len() as u64;
                // A hasher thread that died is reported by `verify`.
                let _ = pieces.send(bytes);
                Ok(())
            }
            _ => self.write(&bytes),
        }
    }

    /// Checks what was written against the expected digest, without making it durable yet.
    /// Nothing may be written after it.
    pub fn verify(&mut self) -> Result<(), StoreError> {
        let hasher = match std::mem::replace(&mut self.hasher, Hashing::Joined(None)) {
            Hashing::Inline(h) => Some(h),
            Hashing::Background { pieces, done } => {
                drop(pieces);
                done.join().ok()
            }
            Hashing::Joined(h) => h,
        };
        let Some(hasher) = hasher else {
            return Err(io::Error::other("the hashing thread died").into());
        };
        let actual = Digest::from_sha256(hasher.clone().finalize().into());
        self.hasher = Hashing::Joined(Some(hasher));
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
