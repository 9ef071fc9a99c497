//! Small named state files of this berth process, kept in the data dir beside the content
//! (`<data_dir>/state/<name>`): statistics worth keeping across restarts, such as the status
//! page's traffic history. They are this berth's own (a replica sharing a bucket keeps its own
//! data dir), are never content, and are replaced whole: written to a temp file, fsynced and
//! renamed over the old one, so a crash leaves the old or the new file, never half of one.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::rename_durable;

/// A state file's name: a compile-time constant, so it never comes from input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateName(&'static str);

impl StateName {
    /// Names are plain file names: lower-case letters, digits, `-` and `.` (not leading).
    pub const fn new(name: &'static str) -> StateName {
        let b = name.as_bytes();
        assert!(
            !b.is_empty() && b[0] != b'.',
            "a state name is a plain file name"
        );
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            assert!(
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.',
                "a state name is a plain file name"
            );
            i += 1;
        }
        StateName(name)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// The state files of one data dir.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// Distinguishes the temp files of writes that overlap.
static WRITES: AtomicU64 = AtomicU64::new(0);

impl StateDir {
    pub fn new(data_dir: &Path) -> StateDir {
        StateDir {
            dir: data_dir.join("state"),
        }
    }

    pub fn path(&self, name: StateName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    /// The file's bytes; `None` when there is none. A file larger than `max_len` is an error
    /// (it was not written by this code), so a stray file cannot make a start read gigabytes.
    pub fn load(&self, name: StateName, max_len: u64) -> io::Result<Option<Vec<u8>>> {
        let file = match File::open(self.path(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.take(max_len + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than the {max_len} bytes such a file can be"),
            ));
        }
        Ok(Some(bytes))
    }

    /// Replaces the file with `bytes`, atomically and durably.
    pub fn save(&self, name: StateName, bytes: &[u8]) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{}.{}.{n}.tmp", name.as_str(), std::process::id()));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            rename_durable(&tmp, &self.path(name))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: StateName = StateName::new("test-state.json");

    #[test]
    fn saves_replace_the_file_whole_and_loads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(state.load(NAME, 100).unwrap(), None);
        state.save(NAME, b"first").unwrap();
        state.save(NAME, b"second").unwrap();
        assert_eq!(state.load(NAME, 100).unwrap().unwrap(), b"second");
        // No temp file is left behind.
        let files: Vec<_> = fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, vec![std::ffi::OsString::from("test-state.json")]);
        let err = state.load(NAME, 3).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
