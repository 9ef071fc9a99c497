//! Platforms as people name them (`linux/amd64`, `linux/arm64/v8`) and which entries of an
//! index they pick, normalised the way Docker does (`arm64` is `arm64/v8`, `arm` is `arm/v7`).

use std::fmt;

use crate::oci::manifest::Platform;

/// `os/architecture[/variant]`, lower case, as `docker pull --platform` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl PlatformSpec {
    pub fn parse(s: &str) -> Result<PlatformSpec, String> {
        let bad = || format!("{s:?} is not a platform like \"linux/amd64\" or \"linux/arm64/v8\"");
        let parts: Vec<&str> = s.trim().split('/').collect();
        let word = |p: &&str| {
            !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(word) {
            return Err(bad());
        }
        let lower = |p: &str| p.to_ascii_lowercase();
        let architecture = normal_arch(&lower(parts[1]));
        let variant = parts.get(2).map(|v| lower(v));
        Ok(PlatformSpec {
            os: lower(parts[0]),
            variant: variant.or_else(|| default_variant(&architecture).map(str::to_owned)),
            architecture,
        })
    }

    /// The spec naming an index entry's platform.
    pub fn of(p: &Platform) -> PlatformSpec {
        let architecture = normal_arch(&p.architecture.to_ascii_lowercase());
        PlatformSpec {
            os: p.os.to_ascii_lowercase(),
            variant: p
                .variant
                .as_deref()
                .map(str::to_ascii_lowercase)
                .or_else(|| default_variant(&architecture).map(str::to_owned)),
            architecture,
        }
    }

    /// Whether an index entry's platform is this one. An entry without a variant matches the
    /// architecture's default one (`arm64` is `arm64/v8`); a spec without a variant matches any.
    pub fn matches(&self, p: &Platform) -> bool {
        let arch = normal_arch(&p.architecture.to_ascii_lowercase());
        if p.os.to_ascii_lowercase() != self.os || arch != self.architecture {
            return false;
        }
        let theirs = p
            .variant
            .as_deref()
            .map(str::to_ascii_lowercase)
            .or_else(|| default_variant(&arch).map(str::to_owned));
        match (&self.variant, theirs) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => *mine == theirs,
            (Some(_), None) => false,
        }
    }
}

/// Docker's aliases for architectures.
fn normal_arch(a: &str) -> String {
    match a {
        "x86_64" | "x86-64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        "armhf" => "arm".into(),
        "i386" => "386".into(),
        other => other.into(),
    }
}

/// The variant an entry without one is taken to have.
fn default_variant(arch: &str) -> Option<&'static str> {
    match arch {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for PlatformSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        PlatformSpec::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            architecture: arch.into(),
            os: os.into(),
            variant: variant.map(Into::into),
            os_version: None,
        }
    }

    #[test]
    fn platforms_parse_and_match_like_docker() {
        let amd = PlatformSpec::parse("linux/amd64").unwrap();
        assert!(amd.matches(&platform("linux", "amd64", None)));
        assert!(!amd.matches(&platform("linux", "arm64", None)));
        assert!(!amd.matches(&platform("windows", "amd64", None)));
        let arm64 = PlatformSpec::parse("linux/arm64").unwrap();
        assert_eq!(arm64.to_string(), "linux/arm64/v8");
        assert!(arm64.matches(&platform("linux", "arm64", Some("v8"))));
        assert!(arm64.matches(&platform("linux", "arm64", None)));
        let v8 = PlatformSpec::parse("linux/arm64/v8").unwrap();
        assert!(v8.matches(&platform("linux", "arm64", None)));
        let v6 = PlatformSpec::parse("linux/arm/v6").unwrap();
        assert!(!v6.matches(&platform("linux", "arm", Some("v7"))));
        assert!(!v6.matches(&platform("linux", "arm", None)));
        assert!(v6.matches(&platform("linux", "arm", Some("v6"))));
        for bad in ["linux", "linux/", "a/b/c/d", "linux/amd 64", ""] {
            assert!(PlatformSpec::parse(bad).is_err(), "{bad:?}");
        }
    }
}
