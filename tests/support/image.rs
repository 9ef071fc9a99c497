//! Synthetic images for the in-process tier: deterministic blobs, single-platform images and
//! manifest lists, and the media types and digest helper the tests share.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

pub const S2_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const S2_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic pseudo-random bytes (incompressible, unlike zeros).
pub fn pseudo_random(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A synthetic single-platform image.
#[derive(Clone)]
pub struct Image {
    pub manifest: Bytes,
    pub media_type: &'static str,
    pub digest: String,
    pub config: Bytes,
    pub layers: Vec<Bytes>,
}

impl Image {
    pub fn new(seed: u64, layer_sizes: &[usize]) -> Image {
        let config = Bytes::from(format!(
            r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#
        ));
        let layers: Vec<Bytes> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pseudo_random(seed * 1000 + i as u64, n))
            .collect();
        let layer_json: Vec<_> = layers
            .iter()
            .map(|l| serde_json::json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": l.len(), "digest": sha256(l)}))
            .collect();
        let manifest = serde_json::to_vec_pretty(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": S2_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": sha256(&config)},
            "layers": layer_json,
        }))
        .unwrap();
        let manifest = Bytes::from(manifest);
        Image {
            digest: sha256(&manifest),
            manifest,
            media_type: S2_MANIFEST,
            config,
            layers,
        }
    }

    pub fn blobs(&self) -> Vec<Bytes> {
        let mut v = vec![self.config.clone()];
        v.extend(self.layers.iter().cloned());
        v
    }
}

/// A manifest list over some images.
pub fn index_of(images: &[&Image]) -> (Bytes, String) {
    let archs = ["amd64", "arm64", "s390x", "ppc64le"];
    let entries: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, im)| serde_json::json!({"mediaType": im.media_type, "size": im.manifest.len(), "digest": im.digest, "platform": {"architecture": archs[i % 4], "os": "linux"}}))
        .collect();
    let bytes = Bytes::from(
        serde_json::to_vec(
            &serde_json::json!({"schemaVersion": 2, "mediaType": S2_LIST, "manifests": entries}),
        )
        .unwrap(),
    );
    let d = sha256(&bytes);
    (bytes, d)
}
