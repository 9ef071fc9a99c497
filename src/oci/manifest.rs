//! The manifest model: descriptors, image manifests and indexes (Docker schema 2 and OCI 1.1,
//! with `subject` and `artifactType`) as serde types, parsed once from the bytes.
//!
//! [`Manifest`] is what the JSON says, with each field's type checked; the status page reads
//! stored manifests (mirrored ones too) through it. [`parse_push`] decides what the private
//! namespace accepts and gives the [`Parsed`] view: the kind and what the manifest refers to,
//! which the registry checks against the store afterwards and garbage collection walks.
//! Parsing is pure (no I/O).

use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::oci::error::RegistryError;
use crate::oci::media::{bare, is_index, DOCKER_LIST, DOCKER_MANIFEST, PUSHABLE};
#[cfg(test)]
use crate::oci::media::{DOCKER_SCHEMA1, OCI_INDEX, OCI_MANIFEST};
use crate::oci::names::Digest;

/// The largest manifest accepted on push (the limit Docker Hub and distribution use).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A content descriptor: what a manifest says about one thing it refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// Foreign layers (Windows base layers) are fetched from their `urls` (a non-empty array),
    /// not from the registry.
    #[serde(
        rename = "urls",
        default,
        skip_serializing,
        deserialize_with = "non_empty_array"
    )]
    pub has_urls: bool,
    /// In an index: the platform of the manifest listed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub platform: Option<Platform>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub artifact_type: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub annotations: Option<Map<String, Value>>,
}

/// The platform an index entry is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        default,
        rename = "os.version",
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

/// The fields of an image manifest or an index that berth uses; the others are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase")]
pub struct Manifest {
    /// Checked on push only (2), so read leniently: anything but an unsigned integer is None.
    #[serde(default, deserialize_with = "lenient")]
    pub schema_version: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    pub media_type: Option<String>,
    /// An image manifest's configuration blob.
    #[serde(default, deserialize_with = "present")]
    pub config: Option<Descriptor>,
    #[serde(default, deserialize_with = "present")]
    pub layers: Option<Vec<Descriptor>>,
    /// An index's manifests.
    #[serde(default, deserialize_with = "present")]
    pub manifests: Option<Vec<Descriptor>>,
    /// OCI 1.0 artifact manifests listed their content here: read as descriptors when an image
    /// manifest has an array, ignored otherwise.
    #[serde(default, deserialize_with = "lenient")]
    blobs: Option<Vec<Value>>,
    /// The manifest this one refers to (OCI 1.1 referrers), if any.
    #[serde(default)]
    pub subject: Option<Descriptor>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub annotations: Option<Map<String, Value>>,
}

/// Manifests and descriptors are JSON objects: serde's derived structs would also take arrays
/// (fields by position), so these deserialize from maps only. The derive (`remote = "Self"`)
/// leaves an inherent `deserialize` that takes arrays too: outside this macro, call the trait's
/// (`<T as Deserialize>::deserialize`, or serde_json).
macro_rules! from_objects_only {
    ($($t:ident: $what:literal),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Object;
                impl<'de> Visitor<'de> for Object {
                    type Value = $t;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<$t, A::Error> {
                        // The derived (remote = "Self") deserializer.
                        $t::deserialize(MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(Object)
            }
        }
    )*};
}

from_objects_only!(Descriptor: "a descriptor object", Manifest: "a manifest object");

impl Descriptor {
    /// Checks what the store holds under this descriptor's digest (`stored_len`, None when
    /// nothing) against it: MANIFEST_BLOB_UNKNOWN when missing, MANIFEST_INVALID when the sizes
    /// differ. `listed_by` names what lists it ("manifest", "index").
    pub fn check_stored(
        &self,
        stored_len: Option<u64>,
        listed_by: &str,
    ) -> Result<(), RegistryError> {
        match stored_len {
            None => Err(RegistryError::ManifestBlobUnknown(self.digest.to_string())),
            Some(len) if len != self.size => Err(invalid(format!(
                "{} has {len} bytes, the {listed_by} says {}",
                self.digest, self.size
            ))),
            Some(_) => Ok(()),
        }
    }
}

impl Serialize for Descriptor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Descriptor::serialize(self, s)
    }
}

/// A field that may be missing, but not null.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A field read when it has the expected type and ignored (None) otherwise.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    Ok(T::deserialize(Value::deserialize(d)?).ok())
}

fn non_empty_array<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Value::deserialize(d)?
        .as_array()
        .is_some_and(|a| !a.is_empty()))
}

impl Manifest {
    /// The blobs a pull of this image manifest fetches from the registry: the config and the
    /// layers, but not foreign layers (those come from their own URLs).
    pub fn pull_blobs(&self) -> Vec<Descriptor> {
        self.config
            .iter()
            .chain(self.layers.iter().flatten())
            .filter(|d| !d.has_urls)
            .cloned()
            .collect()
    }

    /// Reads a manifest's fields, checking their types only (not that the manifest is one berth
    /// would accept on push).
    pub fn from_slice(bytes: &[u8]) -> Result<Manifest, RegistryError> {
        serde_json::from_slice(bytes).map_err(|e| {
            invalid(if e.is_data() {
                format!("not a valid manifest: {e}")
            } else {
                format!("not JSON: {e}")
            })
        })
    }
}

/// What an accepted manifest is and refers to.
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
        is_index(&self.media_type)
    }

    /// This manifest's descriptor as the referrers API lists it, given its digest and size.
    pub fn referrer(&self, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest,
            size,
            has_urls: false,
            platform: None,
            artifact_type: self.artifact_type.clone(),
            annotations: self.annotations.clone(),
        }
    }
}

fn invalid(detail: impl Into<String>) -> RegistryError {
    RegistryError::ManifestInvalid(detail.into())
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
    let manifest = Manifest::from_slice(bytes)?;
    let body_type = manifest.media_type.as_deref();
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
    if manifest.schema_version != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    // Docker's kinds always carry their mediaType; only OCI made it optional.
    if body_type.is_none() && (media_type == DOCKER_MANIFEST || media_type == DOCKER_LIST) {
        return Err(invalid("a Docker manifest must carry its mediaType"));
    }
    references(media_type, manifest)
}

/// Parses a manifest already stored under a known media type (for garbage collection).
pub fn parse_stored(media_type: &str, bytes: &[u8]) -> Result<Parsed, RegistryError> {
    references(bare(media_type), Manifest::from_slice(bytes)?)
}

/// What a manifest of kind `media_type` refers to; an index lists manifests only, an image
/// manifest has a config and no manifests.
fn references(media_type: String, m: Manifest) -> Result<Parsed, RegistryError> {
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    if is_index(&media_type) {
        if m.config.is_some() || m.layers.is_some() {
            return Err(invalid("an index has no config or layers"));
        }
        children = m
            .manifests
            .ok_or_else(|| invalid("an index needs a manifests array"))?;
    } else {
        if m.manifests.is_some() {
            return Err(invalid("an image manifest has no manifests array"));
        }
        let config = m
            .config
            .ok_or_else(|| invalid("an image manifest needs a config"))?;
        blobs.push(config);
        blobs.extend(m.layers.unwrap_or_default());
        for (i, b) in m.blobs.unwrap_or_default().into_iter().enumerate() {
            // The trait's deserialize (objects only), not the derived inherent one.
            let blob = <Descriptor as Deserialize>::deserialize(b);
            blobs.push(blob.map_err(|e| invalid(format!("blobs[{i}]: {e}")))?);
        }
    }
    // An image's config comes first in `blobs`; an index has none.
    let config_type = blobs.first().map(|c| c.media_type.clone());
    Ok(Parsed {
        media_type,
        blobs,
        children,
        subject: m.subject,
        artifact_type: m.artifact_type.or(config_type),
        annotations: m.annotations,
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

    #[test]
    fn a_docker_manifest_list_lists_its_children_with_platforms() {
        let m = json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
            {"mediaType": DOCKER_MANIFEST, "size": 7, "digest": d(b"amd"),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": DOCKER_MANIFEST, "size": 8, "digest": d(b"arm"),
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            // A platform that is not one is ignored, as are fields berth does not use.
            {"mediaType": DOCKER_MANIFEST, "size": 9, "digest": d(b"odd"), "platform": "x",
             "x-unknown": [1, 2]},
        ]});
        let p = parse_push(None, &serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(p.is_index());
        assert_eq!(p.media_type, DOCKER_LIST);
        assert!(p.blobs.is_empty());
        assert_eq!(p.artifact_type, None);
        let digests: Vec<_> = p.children.iter().map(|c| c.digest).collect();
        assert_eq!(digests, [b"amd" as &[u8], b"arm", b"odd"].map(Digest::of));
        assert_eq!(p.children[1].size, 8);
        let arm = p.children[1].platform.as_ref().unwrap();
        assert_eq!(
            (
                arm.os.as_str(),
                arm.architecture.as_str(),
                arm.variant.as_deref()
            ),
            ("linux", "arm64", Some("v8"))
        );
        assert_eq!(p.children[2].platform, None);
        // The same bytes, read back from the store.
        let stored = parse_stored(DOCKER_LIST, &serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(stored.children, p.children);
    }

    #[test]
    fn an_oci_index_with_a_subject_is_a_referrer() {
        let m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": "application/vnd.example.bundle",
            "manifests": [{"mediaType": OCI_MANIFEST, "size": 3, "digest": d(b"m"),
                "artifactType": "application/vnd.example.sig", "annotations": {"a": "b"}}],
            "subject": {"mediaType": OCI_MANIFEST, "size": 5, "digest": d(b"s")},
            "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        let p = parse_push(Some(OCI_INDEX), &bytes).unwrap();
        assert!(p.is_index());
        assert_eq!(p.subject.as_ref().unwrap().digest, Digest::of(b"s"));
        assert_eq!(
            p.children[0].artifact_type.as_deref(),
            Some("application/vnd.example.sig")
        );
        // Its entry in the referrers listing: kind, digest, size, artifact type, annotations.
        let entry = serde_json::to_value(p.referrer(Digest::of(&bytes), bytes.len() as u64));
        assert_eq!(
            entry.unwrap(),
            json!({
                "mediaType": OCI_INDEX,
                "digest": d(&bytes),
                "size": bytes.len(),
                "artifactType": "application/vnd.example.bundle",
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
            })
        );
        // Descriptors serialize with the same field names they are read with.
        let child = serde_json::to_value(&p.children[0]).unwrap();
        assert_eq!(child["mediaType"], OCI_MANIFEST);
        assert_eq!(child["digest"], d(b"m"));
        assert_eq!(child["annotations"]["a"], "b");
    }

    #[test]
    fn invalid_manifests_are_refused_as_manifest_invalid() {
        let c = json!({"mediaType": "c", "size": 1, "digest": d(b"c")});
        let refused = [
            // Not an object, at the top or where a descriptor belongs.
            json!([2, OCI_MANIFEST]),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": ["c", d(b"c"), 1]}),
            // Present but null, or of the wrong type.
            json!({"schemaVersion": 2, "mediaType": null, "config": c}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "layers": null}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "layers": {}}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "artifactType": 1}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "annotations": []}),
            json!({"schemaVersion": "2", "mediaType": OCI_MANIFEST, "config": c}),
            // Descriptors need a media type, a sha256 digest and a size that is a count.
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "c", "size": 1}}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "c", "size": -1, "digest": d(b"c")}}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "c", "size": 1.5, "digest": d(b"c")}}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c,
                "layers": [{"mediaType": "l", "size": 1, "digest": "sha512:00"}]}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c,
                "subject": {"mediaType": "s", "size": 1}}),
            // OCI 1.0 artifact blobs are read as descriptors.
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "blobs": [{}]}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c,
                "blobs": [["c", d(b"c"), 1]]}),
            // Kinds keep to their own fields.
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "config": c}),
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "layers": []}),
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "manifests": []}),
            // Schema 1 is mirrored, never pushed.
            json!({"schemaVersion": 1, "mediaType": DOCKER_SCHEMA1, "fsLayers": []}),
        ];
        for m in refused {
            let bytes = serde_json::to_vec(&m).unwrap();
            assert!(
                matches!(
                    parse_push(None, &bytes),
                    Err(RegistryError::ManifestInvalid(_))
                ),
                "accepted: {m}"
            );
        }
        // What is not checked: blobs that are not an array, an index's blobs, odd urls.
        for m in [
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "blobs": "x"}),
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "blobs": [{}]}),
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "c", "size": 1, "digest": d(b"c"), "urls": "x"}}),
        ] {
            let bytes = serde_json::to_vec(&m).unwrap();
            let p = parse_push(None, &bytes).unwrap_or_else(|e| panic!("{m}: {e:?}"));
            assert!(p.blobs.iter().all(|b| !b.has_urls));
        }
    }

    #[test]
    fn any_stored_manifest_can_be_read_for_what_it_lists() {
        // A mirrored image manifest without a config, and a schema 1 manifest: read, not checked.
        let m = json!({"schemaVersion": 2, "layers": [{"mediaType": "l", "size": 4, "digest": d(b"l")}]});
        let read = Manifest::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(read.layers.unwrap()[0].size, 4);
        assert!(read.config.is_none() && read.manifests.is_none());
        let v1 = json!({"schemaVersion": 1, "name": "x", "fsLayers": [{"blobSum": d(b"l")}]});
        let read = Manifest::from_slice(&serde_json::to_vec(&v1).unwrap()).unwrap();
        assert_eq!(read.schema_version, Some(1));
        assert!(read.layers.is_none() && read.manifests.is_none());
        assert!(Manifest::from_slice(b"[]").is_err());
        assert!(Manifest::from_slice(b"{").is_err());
    }
}
