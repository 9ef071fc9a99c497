//! Deterministic test images, written as OCI image layouts without any tool.
//!
//! Everything here is a pure function of its seeds: the same test run twice pushes the same
//! bytes, so a digest in a failure message means the same thing on every machine. Layers are
//! ustar archives of pseudo-random files, either plain or wrapped in gzip (stored deflate blocks:
//! valid gzip, no compressor whose output could change between versions).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::support::pseudo_random;
pub use crate::support::{sha256, OCI_INDEX, OCI_MANIFEST};

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The hex part of a `sha256:` digest.
pub fn hex_of(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"))
}

/// A content-addressed blob and how a manifest refers to it.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: &'static str,
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &'static str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type,
            digest: sha256(&bytes),
            bytes,
        }
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// One platform's image: a manifest, its config and its layers.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl Image {
    /// The config and the layers: the blobs a pull of this image fetches.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }
}

/// What a test pushes under one tag: a single image, or an index of several.
#[derive(Clone, Debug)]
pub enum Artifact {
    Image(Image),
    Index { index: Blob, images: Vec<Image> },
}

impl Artifact {
    /// The manifest the tag points at.
    pub fn top(&self) -> &Blob {
        match self {
            Artifact::Image(image) => &image.manifest,
            Artifact::Index { index, .. } => index,
        }
    }

    pub fn is_index(&self) -> bool {
        matches!(self, Artifact::Index { .. })
    }

    /// Every platform image.
    pub fn images(&self) -> Vec<&Image> {
        match self {
            Artifact::Image(image) => vec![image],
            Artifact::Index { images, .. } => images.iter().collect(),
        }
    }

    /// The distinct config and layer blobs of all platforms, by digest.
    pub fn distinct_blobs(&self) -> BTreeMap<String, &Blob> {
        self.images()
            .into_iter()
            .flat_map(Image::blobs)
            .map(|b| (b.digest.clone(), b))
            .collect()
    }

    /// Writes an OCI image layout holding this artifact under `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        let blobs_dir = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs_dir).expect("create the layout's blob dir");
        let mut all: Vec<&Blob> = vec![self.top()];
        for image in self.images() {
            all.push(&image.manifest);
            all.extend(image.blobs());
        }
        for blob in all {
            std::fs::write(blobs_dir.join(hex_of(&blob.digest)), &blob.bytes)
                .expect("write a layout blob");
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
        let mut top = self.top().descriptor();
        top["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        let index = json!({ "schemaVersion": 2, "manifests": [top] });
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("serialize index.json"),
        )
        .expect("write index.json");
    }
}

/// A ustar archive owned by root (0:0), mtime 0: a name ending in `/` is a directory (mode
/// 0755, its data ignored), any other a regular file (mode 0644).
pub fn tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        assert!(
            name.len() < 100,
            "tar name too long for this writer: {name}"
        );
        let dir = name.ends_with('/');
        let data: &[u8] = if dir { &[] } else { data };
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], if dir { 0o755 } else { 0o644 });
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[148..156].fill(b' ');
        h[156] = if dir { b'5' } else { b'0' };
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Writes `value` as zero-padded octal followed by a NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    assert_eq!(
        s.len(),
        digits,
        "{value} does not fit a {digits}-digit tar field"
    );
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

/// gzip (RFC 1952) of `data` using stored deflate blocks: deterministic and dependency-free.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(0xffff).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, entry) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *entry = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// How to build one layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerSpec {
    pub seed: u64,
    /// Total bytes of file content in the layer, split over a few files.
    pub size: usize,
    pub gzip: bool,
}

/// A layer blob and its diff id (the digest of the uncompressed tar).
pub fn layer(spec: LayerSpec) -> (Blob, String) {
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let name = format!("layer-{:x}/file-{i}.bin", spec.seed);
            (
                name,
                pseudo_random(spec.seed * 4 + i, spec.size / 4).to_vec(),
            )
        })
        .collect();
    let tar = tar(&files);
    let diff_id = sha256(&tar);
    let blob = if spec.gzip {
        Blob::new(OCI_LAYER_GZIP, gzip_stored(&tar))
    } else {
        Blob::new(OCI_LAYER_TAR, tar)
    };
    (blob, diff_id)
}

/// A linux image for `arch` made of the given layers.
pub fn image(arch: &str, layers: &[LayerSpec]) -> Image {
    let (layers, diff_ids): (Vec<Blob>, Vec<String>) = layers.iter().copied().map(layer).unzip();
    let config = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": { "Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [{ "created": "2024-01-01T00:00:00Z", "created_by": "berth interop test" }],
    });
    let config = Blob::new(
        OCI_CONFIG,
        serde_json::to_vec(&config).expect("serialize config"),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(
        OCI_MANIFEST,
        serde_json::to_vec_pretty(&manifest).expect("serialize manifest"),
    );
    Image {
        manifest,
        config,
        layers,
    }
}

/// An OCI index over `images`, each listed with its config's platform.
pub fn index(images: Vec<(Image, &str)>) -> Artifact {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|(image, arch)| {
            let mut d = image.manifest.descriptor();
            d["platform"] = json!({ "architecture": arch, "os": "linux" });
            d
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    let index = Blob::new(
        OCI_INDEX,
        serde_json::to_vec_pretty(&index).expect("serialize index"),
    );
    Artifact::Index {
        index,
        images: images.into_iter().map(|(image, _)| image).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_stored_round_trips_through_gunzip() {
        let data = pseudo_random(7, 200_000).to_vec();
        let gz = gzip_stored(&data);
        let out = std::process::Command::new("gzip")
            .args(["-dc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(&gz)?;
                child.wait_with_output()
            })
            .expect("run gzip -dc");
        assert!(out.status.success());
        assert_eq!(out.stdout, data);
    }

    #[test]
    fn tar_lists_with_system_tar() {
        let t = tar(&[
            ("a/".into(), vec![]),
            ("a/b.bin".into(), vec![1; 1000]),
            ("c".into(), vec![]),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tar");
        std::fs::write(&path, t).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
            .expect("run tar");
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("a/b.bin") && listing.contains(" 1000 "),
            "{listing}"
        );
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("drwxr-xr-x") && l.ends_with(" a/")),
            "{listing}"
        );
    }
}
