//! Manifests pushed into the private namespace: which kinds are accepted, and what they refer to.
//!
//! Parsing is pure (no I/O): the registry checks the references against the store afterwards,
//! and garbage collection uses the same parse to find what a stored manifest keeps alive.

use serde_json::{Map, Value};

use crate::oci::error::RegistryError;
use crate::oci::names::Digest;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The manifest kinds berth accepts on push.
pub const PUSHABLE: [&str; 4] = [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX];

/// The largest manifest accepted on push (the limit Docker Hub and distribution use).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A content descriptor: what a manifest says about one thing it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// Foreign layers (Windows base layers) are fetched from these URLs, not from the registry.
    pub has_urls: bool,
}

/// What a manifest refers to.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The manifest's kind: one of `PUSHABLE`.
    pub media_type: String,
    /// Blobs (config and layers) an image manifest needs.
    pub blobs: Vec<Descriptor>,
    /// Manifests an index lists.
    pub children: Vec<Descriptor>,
    /// The manifest this one refers to (OCI 1.1 referrers), if any.
    pub subject: Option<Descriptor>,
    /// The artifact type shown in referrers listings: `artifactType`, else the config's type.
    pub artifact_type: Option<String>,
    pub annotations: Option<Map<String, Value>>,
}

impl Parsed {
    pub fn is_index(&self) -> bool {
        self.media_type == DOCKER_LIST || self.media_type == OCI_INDEX
    }
}

fn invalid(detail: impl Into<String>) -> RegistryError {
    RegistryError::ManifestInvalid(detail.into())
}

/// A media type without parameters (`; charset=utf-8`), lower-cased.
fn bare(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Parses a pushed manifest. `content_type` is the request's Content-Type header; it must name
/// a known manifest kind and agree with the body's `mediaType` when the body has one.
pub fn parse_push(content_type: Option<&str>, bytes: &[u8]) -> Result<Parsed, RegistryError> {
    let header = content_type.map(bare).filter(|c| !c.is_empty());
    if let Some(h) = &header {
        if !PUSHABLE.contains(&h.as_str()) {
            return Err(invalid(format!(
                "unsupported manifest media type {h:?} (push one of: {})",
                PUSHABLE.join(", ")
            )));
        }
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("a manifest is a JSON object"))?;
    let body_type = match obj.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid("mediaType is not a string")),
    };
    let media_type = match (&header, body_type) {
        (Some(h), Some(b)) if h != b => {
            return Err(invalid(format!(
                "Content-Type {h:?} does not match the manifest's mediaType {b:?}"
            )))
        }
        (Some(h), _) => h.clone(),
        (None, Some(b)) if PUSHABLE.contains(&b) => b.to_owned(),
        (None, Some(b)) => return Err(invalid(format!("unsupported manifest media type {b:?}"))),
        (None, None) => {
            return Err(invalid(
                "the manifest kind is unknown: send a Content-Type header or a mediaType field",
            ))
        }
    };
    if obj.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    // Docker's kinds always carry their mediaType; only OCI made it optional.
    if body_type.is_none() && (media_type == DOCKER_MANIFEST || media_type == DOCKER_LIST) {
        return Err(invalid("a Docker manifest must carry its mediaType"));
    }
    parse_fields(media_type, obj)
}

/// Parses a manifest already stored under a known media type (for garbage collection).
pub fn parse_stored(media_type: &str, bytes: &[u8]) -> Result<Parsed, RegistryError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("a manifest is a JSON object"))?;
    parse_fields(bare(media_type), obj)
}

fn parse_fields(media_type: String, obj: &Map<String, Value>) -> Result<Parsed, RegistryError> {
    let index = media_type == DOCKER_LIST || media_type == OCI_INDEX;
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    let mut config_type = None;
    if index {
        if obj.contains_key("config") || obj.contains_key("layers") {
            return Err(invalid("an index has no config or layers"));
        }
        let list = obj
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("an index needs a manifests array"))?;
        for (i, d) in list.iter().enumerate() {
            children.push(descriptor(d, &format!("manifests[{i}]"))?);
        }
    } else {
        if obj.contains_key("manifests") {
            return Err(invalid("an image manifest has no manifests array"));
        }
        let config = obj
            .get("config")
            .ok_or_else(|| invalid("an image manifest needs a config"))?;
        let config = descriptor(config, "config")?;
        config_type = Some(config.media_type.clone());
        blobs.push(config);
        let layers = match obj.get("layers") {
            None => &Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(invalid("layers is not an array")),
        };
        for (i, d) in layers.iter().enumerate() {
            blobs.push(descriptor(d, &format!("layers[{i}]"))?);
        }
        // OCI 1.0 artifact manifests listed their content under `blobs`.
        if let Some(Value::Array(a)) = obj.get("blobs") {
            for (i, d) in a.iter().enumerate() {
                blobs.push(descriptor(d, &format!("blobs[{i}]"))?);
            }
        }
    }
    let subject = match obj.get("subject") {
        None | Some(Value::Null) => None,
        Some(d) => Some(descriptor(d, "subject")?),
    };
    let artifact_type = match obj.get("artifactType") {
        None | Some(Value::Null) => config_type,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("artifactType is not a string")),
    };
    let annotations = match obj.get("annotations") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err(invalid("annotations is not an object")),
    };
    Ok(Parsed {
        media_type,
        blobs,
        children,
        subject,
        artifact_type,
        annotations,
    })
}

fn descriptor(v: &Value, at: &str) -> Result<Descriptor, RegistryError> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid(format!("{at} is not a descriptor object")))?;
    let media_type = obj
        .get("mediaType")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at}.mediaType is missing")))?
        .to_owned();
    let digest = obj
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at}.digest is missing")))?;
    let digest = Digest::parse(digest)
        .map_err(|_| invalid(format!("{at}.digest {digest:?} is not a sha256 digest")))?;
    let size = obj
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(format!("{at}.size is missing or negative")))?;
    let has_urls = obj
        .get("urls")
        .and_then(Value::as_array)
        .is_some_and(|u| !u.is_empty());
    Ok(Descriptor {
        media_type,
        digest,
        size,
        has_urls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(b: &[u8]) -> String {
        Digest::of(b).to_string()
    }

    #[test]
    fn image_manifests_list_their_blobs_and_subject() {
        let m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.example+json", "size": 2, "digest": d(b"{}")},
            "layers": [{"mediaType": "x", "size": 1, "digest": d(b"a")}],
            "subject": {"mediaType": OCI_MANIFEST, "size": 9, "digest": d(b"s")},
            "annotations": {"k": "v"},
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        let p = parse_push(Some(OCI_MANIFEST), &bytes).unwrap();
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(p.subject.unwrap().digest, Digest::of(b"s"));
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.example+json")
        );
        assert_eq!(p.annotations.unwrap()["k"], "v");
        // mediaType may be omitted in OCI manifests when the header names the kind.
        let mut m2 = m.clone();
        m2.as_object_mut().unwrap().remove("mediaType");
        let bytes2 = serde_json::to_vec(&m2).unwrap();
        assert!(parse_push(Some(OCI_MANIFEST), &bytes2).is_ok());
        assert!(parse_push(None, &bytes2).is_err());
        assert!(parse_push(None, &bytes).is_ok());
    }

    #[test]
    fn kinds_must_agree_and_be_known() {
        let m = json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": []});
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(parse_push(Some(DOCKER_LIST), &bytes).unwrap().is_index());
        assert!(parse_push(
            Some("application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8"),
            &bytes
        )
        .is_ok());
        assert!(parse_push(Some(OCI_INDEX), &bytes).is_err());
        assert!(parse_push(Some("application/json"), &bytes).is_err());
        assert!(parse_push(Some(DOCKER_LIST), b"not json").is_err());
        let v1 = json!({"schemaVersion": 1, "mediaType": DOCKER_LIST, "manifests": []});
        assert!(parse_push(Some(DOCKER_LIST), &serde_json::to_vec(&v1).unwrap()).is_err());
        let bad = json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "c", "size": 1, "digest": "sha256:nothex"}, "layers": []});
        assert!(matches!(
            parse_push(Some(DOCKER_MANIFEST), &serde_json::to_vec(&bad).unwrap()),
            Err(RegistryError::ManifestInvalid(_))
        ));
        let no_config = json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []});
        assert!(parse_push(None, &serde_json::to_vec(&no_config).unwrap()).is_err());
    }

    #[test]
    fn foreign_layers_are_marked() {
        let m = json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "c", "size": 1, "digest": d(b"c")},
            "layers": [{"mediaType": "f", "size": 1, "digest": d(b"f"), "urls": ["https://x/f"]}]});
        let p = parse_stored(DOCKER_MANIFEST, &serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(!p.blobs[0].has_urls);
        assert!(p.blobs[1].has_urls);
    }
}
