//! The htpasswd file: its users and their bcrypt hashes, the checks against them, and the
//! `berth user` command that edits it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// The cost `berth user add` uses unless told otherwise.
pub const DEFAULT_COST: u32 = 10;

#[derive(Default)]
pub(super) struct Users {
    /// user -> bcrypt hash; shared with the checks under way, which run without the lock.
    pub(super) entries: Arc<HashMap<String, String>>,
    /// (mtime, length) of the file the entries were read from; None before the first read or
    /// while the file is missing.
    stamp: Option<(SystemTime, u64)>,
    read_once: bool,
}

impl Users {
    /// Re-reads the file when it changed, so `berth user add` takes effect without a restart.
    pub(super) fn refresh(&mut self, path: &Path) {
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if self.read_once && stamp == self.stamp {
            return;
        }
        self.read_once = true;
        self.stamp = stamp;
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let (entries, warnings) = parse_htpasswd(&text);
                for w in warnings {
                    tracing::warn!(file = %path.display(), "{w}");
                }
                tracing::info!(file = %path.display(), users = entries.len(), "htpasswd loaded");
                self.entries = Arc::new(entries);
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the htpasswd file; every login fails until it is readable");
                self.entries = Arc::default();
            }
        }
    }
}

/// Runs bcrypt: seconds of CPU at high costs, so only ever on the blocking pool.
pub(super) fn verify(entries: &HashMap<String, String>, user: &str, password: &str) -> bool {
    match entries.get(user) {
        Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
        None => {
            // Spend the time a real check takes, so timing does not tell who exists.
            if let Some(any) = entries.values().next() {
                let _ = bcrypt::verify(password, any);
            }
            false
        }
    }
}

/// Parses htpasswd text into user -> bcrypt hash, with warnings for entries it cannot use.
pub fn parse_htpasswd(text: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut entries = HashMap::new();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            warnings.push(format!("line {}: not a user:hash entry; ignored", i + 1));
            continue;
        };
        if !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
            warnings.push(format!(
                "line {} (user {user:?}): only bcrypt entries are supported (htpasswd -B); ignored",
                i + 1
            ));
            continue;
        }
        entries.insert(user.to_owned(), hash.to_owned());
    }
    (entries, warnings)
}

pub fn check_user_name(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a user name is 1 to 255 characters without ':', spaces or control characters",
        ));
    }
    Ok(())
}

/// Adds a user to an htpasswd file, or sets the password of one already there. The file is
/// created if needed and always left with mode 0600. Returns whether the user already existed.
pub fn add_user(path: &Path, name: &str, password: &str, cost: u32) -> io::Result<bool> {
    check_user_name(name)?;
    if password.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the password is empty",
        ));
    }
    let hash = bcrypt::non_truncating_hash_with_result(password, cost)
        .map_err(|e| match e {
            bcrypt::BcryptError::Truncation(_) => io::Error::new(
                io::ErrorKind::InvalidInput,
                "bcrypt uses at most 72 bytes of a password; choose a shorter one",
            ),
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        })?
        .format_for_version(bcrypt::Version::TwoY);
    let existing = read_if_exists(path)?;
    let mut found = false;
    let mut out = String::new();
    for line in existing.lines() {
        if line.split_once(':').map(|(u, _)| u.trim()) == Some(name) {
            if !found {
                out.push_str(&format!("{name}:{hash}\n"));
            }
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        out.push_str(&format!("{name}:{hash}\n"));
    }
    write_private(path, out.as_bytes())?;
    Ok(found)
}

/// Removes a user from an htpasswd file. Returns whether the user was there.
pub fn remove_user(path: &Path, name: &str) -> io::Result<bool> {
    let existing = read_if_exists(path)?;
    let mut found = false;
    let mut out = String::new();
    for line in existing.lines() {
        if line.split_once(':').map(|(u, _)| u.trim()) == Some(name) {
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if found {
        write_private(path, out.as_bytes())?;
    }
    Ok(found)
}

fn read_if_exists(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// Replaces a file atomically with a mode-0600 one.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htpasswd_lines() {
        let (e, w) = parse_htpasswd(
            "# comment\nalice:$2y$05$abcdefghijklmnopqrstuuQ3cIGlzhZl9A4fDG9jGDXw7H5VuM4Cq\nbob:{SHA}x\n\ncarol\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e.contains_key("alice"));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn add_update_remove_users() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        assert!(!add_user(&path, "alice", "s3cret", 4).unwrap());
        assert!(!add_user(&path, "bob", "other", 4).unwrap());
        assert!(add_user(&path, "alice", "new", 4).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("alice:$2y$04$"), "{text}");
        let (e, w) = parse_htpasswd(&text);
        assert!(w.is_empty());
        assert!(bcrypt::verify("new", &e["alice"]).unwrap());
        assert!(!bcrypt::verify("s3cret", &e["alice"]).unwrap());
        assert!(remove_user(&path, "bob").unwrap());
        assert!(!remove_user(&path, "bob").unwrap());
        assert!(add_user(&path, "a:b", "x", 4).is_err());
        assert!(add_user(&path, "eve", &"x".repeat(73), 4).is_err());
    }
}
