//! Manifest media types: the kinds berth knows, the ones it accepts on push, and which of them a
//! client's `Accept` header asks for.

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 1, signed and unsigned: mirrored for old clients, never accepted on push.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// The manifest kinds berth accepts on push.
pub const PUSHABLE: [&str; 4] = [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX];

/// Manifest media types a registry client may ask for, with short names for cache keys; the
/// first four are the modern ones.
const MANIFEST_TYPES: [(&str, &str); 6] = [
    (DOCKER_MANIFEST, "s2"),
    (DOCKER_LIST, "ml"),
    (OCI_MANIFEST, "om"),
    (OCI_INDEX, "oi"),
    (DOCKER_SCHEMA1_SIGNED, "s1"),
    (DOCKER_SCHEMA1, "s1j"),
];

/// Whether a (bare) media type is a manifest list or an image index.
pub fn is_index(media_type: &str) -> bool {
    media_type == DOCKER_LIST || media_type == OCI_INDEX
}

/// A media type without parameters (`; charset=utf-8`), lower-cased.
pub fn bare(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The manifest media types a request accepts, as sent upstream and as the tag cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AcceptSet {
    /// The Accept header forwarded upstream.
    pub header: String,
    /// Canonical key: the short names of the accepted types, sorted.
    pub variant: String,
}

impl AcceptSet {
    /// From the client's Accept headers; a client that names no manifest type gets the four
    /// modern ones, which is what Docker, containerd and skopeo send anyway.
    pub fn from_headers<'a>(values: impl Iterator<Item = &'a str>) -> AcceptSet {
        let mut picked: Vec<(&str, &str)> = Vec::new();
        for value in values {
            for part in value.split(',') {
                let media = part.split(';').next().unwrap_or("").trim();
                if let Some(&t) = MANIFEST_TYPES.iter().find(|(m, _)| *m == media) {
                    if !picked.contains(&t) {
                        picked.push(t);
                    }
                }
            }
        }
        if picked.is_empty() {
            picked = MANIFEST_TYPES[..4].to_vec();
        }
        picked.sort_by_key(|(_, short)| *short);
        AcceptSet {
            header: picked
                .iter()
                .map(|(m, _)| *m)
                .collect::<Vec<_>>()
                .join(", "),
            variant: picked.iter().map(|(_, s)| *s).collect::<Vec<_>>().join("."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_sets_are_canonical() {
        let a = AcceptSet::from_headers(["application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json;q=0.9"].into_iter());
        let b = AcceptSet::from_headers(
            [
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.oci.image.index.v1+json",
            ]
            .into_iter(),
        );
        assert_eq!(a, b);
        assert_eq!(a.variant, "oi.s2");
        let s2 = AcceptSet::from_headers(
            ["application/vnd.docker.distribution.manifest.v2+json"].into_iter(),
        );
        assert_ne!(s2.variant, a.variant);
        assert_eq!(
            AcceptSet::from_headers(["*/*"].into_iter()).variant,
            "ml.oi.om.s2"
        );
    }
}
