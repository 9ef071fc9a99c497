//! The wire grammar's nouns: repository names, tags, digests and references.
//!
//! Everything that comes off the wire is parsed into these types once, at the edge. They are the
//! only way the rest of berth names content, so a value of one of these types is already known to
//! be safe to use as a path component: the grammars admit no `/..`, no leading dot, no NUL.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::oci::error::RegistryError;

/// A repository name per the distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

const MAX_NAME_LEN: usize = 255;

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(RegistryError::NameInvalid(s.chars().take(300).collect()));
        }
        Ok(RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Docker Hub keeps official images under `library/`; the Docker daemon sends the full name but
    /// other clients send `alpine`. Both must hit the same cache entry and the same upstream path.
    pub fn with_library_prefix(self) -> Self {
        if self.0.contains('/') || self.0.len() + "library/".len() > MAX_NAME_LEN {
            self
        } else {
            RepoName(format!("library/{}", self.0))
        }
    }

    /// Whether this name lies in namespace `ns` (equal to it, or below it).
    pub fn is_in_namespace(&self, ns: &str) -> bool {
        self.0 == ns
            || (self.0.len() > ns.len()
                && self.0.starts_with(ns)
                && self.0.as_bytes()[ns.len()] == b'/')
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let Some(&first) = b.first() else {
        return false;
    };
    if !alnum(first) || !alnum(b[b.len() - 1]) {
        return false;
    }
    // Between alphanumeric runs exactly one separator: ".", "_", "__" or one or more "-".
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let b = s.as_bytes();
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        let ok = !b.is_empty()
            && b.len() <= 128
            && word(b[0])
            && b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(RegistryError::TagInvalid(s.chars().take(200).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A content digest. Only sha256 is accepted: it is what every registry in use produces, and it
/// is the only algorithm berth can verify (an unverifiable digest is not a digest).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let invalid = || RegistryError::DigestInvalid(s.chars().take(200).collect());
        let hex_part = s.strip_prefix("sha256:").ok_or_else(invalid)?;
        // Upper-case hex is not canonical; accepting it would give one blob two names.
        if hex_part.len() != 64
            || !hex_part
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| invalid())?;
        Ok(Digest(out))
    }

    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn from_sha256(hash: [u8; 32]) -> Self {
        Digest(hash)
    }

    /// Lower-case hex of the hash, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// In JSON (descriptors), a digest is its string form.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        Digest::parse(&s).map_err(|_| {
            let shown: String = s.chars().take(200).collect();
            serde::de::Error::custom(format_args!("{shown:?} is not a sha256 digest"))
        })
    }
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for good in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "my--app",
            "a__b",
            "a.b",
            "x0/y_1",
        ] {
            assert!(RepoName::parse(good).is_ok(), "{good} should parse");
        }
        for bad in [
            "", "Alpine", "a/", "/a", "a//b", "..", "a/../b", "a___b", "a._b", "-a", "a-", "a b",
            "a%2fb",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn library_prefix_only_for_single_segment_names() {
        let n = |s| RepoName::parse(s).unwrap().with_library_prefix();
        assert_eq!(n("alpine").as_str(), "library/alpine");
        assert_eq!(n("library/alpine").as_str(), "library/alpine");
        assert_eq!(n("bitnami/redis").as_str(), "bitnami/redis");
    }

    #[test]
    fn namespaces_match_whole_segments() {
        let n = RepoName::parse("private/app").unwrap();
        assert!(n.is_in_namespace("private"));
        assert!(!RepoName::parse("privateer/app")
            .unwrap()
            .is_in_namespace("private"));
        assert!(RepoName::parse("private")
            .unwrap()
            .is_in_namespace("private"));
    }

    #[test]
    fn tags_and_digests() {
        assert!(Tag::parse("v1.2.3-rc_1").is_ok());
        assert!(Tag::parse(".hidden").is_err());
        assert!(Tag::parse(&"a".repeat(129)).is_err());
        let d = Digest::of(b"hello");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(Digest::parse("sha256:ABC").is_err());
        assert!(Digest::parse(&format!("sha512:{}", d.hex())).is_err());
        assert!(Digest::parse(&d.to_string().to_uppercase().replace("SHA256", "sha256")).is_err());
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse(&d.to_string()),
            Ok(Reference::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("sha256:zz"),
            Err(RegistryError::DigestInvalid(_))
        ));
    }
}
