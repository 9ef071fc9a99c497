//! The `[[warm]]` list: images the running server keeps in the cache ahead of any pull, and the
//! tag patterns that pick them.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::config::ConfigError;
use crate::oci::names::RepoName;
use crate::oci::platform::PlatformSpec;

/// The most tags one `[[warm]]` entry warms per refresh: a pattern like `*` on a repository
/// with thousands of tags would otherwise spend the upstream's whole pull allowance.
pub const MAX_TAGS_PER_ENTRY: usize = 100;

/// One `[[warm]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmEntry {
    /// As the upstream names it; on Docker Hub `alpine` is `library/alpine`.
    #[serde(deserialize_with = "repo_name")]
    pub repository: RepoName,
    /// The upstream key; the default upstream when absent.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Literal tags, or patterns (`*` any run of characters, `?` one) matched against the
    /// upstream's tag list.
    pub tags: Vec<TagPattern>,
    /// The platforms of an index to warm; all of them when empty.
    #[serde(default)]
    pub platforms: Vec<PlatformSpec>,
}

fn repo_name<'de, D: Deserializer<'de>>(d: D) -> Result<RepoName, D::Error> {
    let s = String::deserialize(d)?;
    RepoName::parse(&s)
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a repository name")))
}

/// A tag, or a glob over tags: `3.*`, `latest`, `1.2?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPattern(String);

impl TagPattern {
    pub fn parse(s: &str) -> Result<TagPattern, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-*?".contains(&b));
        if ok {
            Ok(TagPattern(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a tag or a tag pattern (letters, digits, `_.-`, and `*` or `?`)"
            ))
        }
    }

    /// Whether this names one tag rather than a pattern: then no tag list is needed.
    pub fn literal(&self) -> Option<&str> {
        (!self.0.contains(['*', '?'])).then_some(self.0.as_str())
    }

    pub fn matches(&self, tag: &str) -> bool {
        glob(self.0.as_bytes(), tag.as_bytes())
    }
}

/// `*` and `?` globbing, iteratively (with backtracking to the last `*`), so no pattern can
/// take more than pattern × text steps.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl fmt::Display for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TagPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TagPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks what the entries cannot check alone: that each names a configured upstream and a tag.
pub(super) fn validate(
    entries: &[WarmEntry],
    upstreams: &std::collections::BTreeMap<String, super::UpstreamConfig>,
    interval: std::time::Duration,
) -> Result<(), ConfigError> {
    if interval < std::time::Duration::from_secs(1) {
        return Err(ConfigError {
            key: "warm_interval".into(),
            message: "must be at least 1s".into(),
        });
    }
    for (i, e) in entries.iter().enumerate() {
        let key = |k: &str| format!("warm[{i}].{k}");
        if let Some(up) = &e.upstream {
            if !upstreams.contains_key(up) {
                return Err(ConfigError {
                    key: key("upstream"),
                    message: format!("no [upstreams.\"{up}\"] table is configured"),
                });
            }
        }
        if e.tags.is_empty() {
            return Err(ConfigError {
                key: key("tags"),
                message: "name at least one tag or pattern".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_patterns_glob() {
        let p = TagPattern::parse("3.*").unwrap();
        assert!(p.matches("3.19") && p.matches("3.") && !p.matches("v3.1") && !p.matches("4.0"));
        assert_eq!(p.literal(), None);
        let l = TagPattern::parse("latest").unwrap();
        assert_eq!(l.literal(), Some("latest"));
        assert!(l.matches("latest") && !l.matches("latest2"));
        let q = TagPattern::parse("1.?-*-alpine").unwrap();
        assert!(q.matches("1.2-x-alpine") && !q.matches("1.22-x-alpine"));
        assert!(TagPattern::parse("*").unwrap().matches(""));
        assert!(TagPattern::parse("a/b").is_err() && TagPattern::parse("").is_err());
    }

    #[test]
    fn warm_entries_are_checked_naming_the_key() {
        use crate::config::Config;
        let c = Config::from_toml(
            "warm_interval = \"30m\"\n[[warm]]\nrepository = \"library/alpine\"\n\
             tags = [\"3.*\", \"latest\"]\nplatforms = [\"linux/amd64\", \"linux/arm64/v8\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.warm_interval.0, std::time::Duration::from_secs(1800));
        assert_eq!(c.warm[0].repository.as_str(), "library/alpine");
        assert_eq!(c.warm[0].platforms.len(), 2);
        assert_eq!(
            Config::default().upstreams["docker.io"].ratelimit_reserve,
            20
        );
        for (text, key) in [
            (
                "[[warm]]\nrepository = \"Alpine\"\ntags = [\"1\"]\n",
                "repository",
            ),
            ("[[warm]]\nrepository = \"a\"\ntags = [\"a/b\"]\n", "tags"),
            (
                "[[warm]]\nrepository = \"a\"\ntags = [\"1\"]\nplatforms = [\"linux\"]\n",
                "platforms",
            ),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        for (text, key) in [
            ("[[warm]]\nrepository = \"a\"\ntags = []\n", "warm[0].tags"),
            (
                "[[warm]]\nrepository = \"a\"\ntags = [\"1\"]\nupstream = \"quay.io\"\n",
                "warm[0].upstream",
            ),
            ("warm_interval = \"0s\"\n", "warm_interval"),
        ] {
            let e = Config::from_toml(text).unwrap().validate().unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }
}
