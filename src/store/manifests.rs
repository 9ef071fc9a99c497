//! Manifests by digest, from memory or from the store. Both halves read them here: the mirror
//! (the cache area) and the private registry (the local area), through one bounded memory cache
//! (`memory_cache_size`) in front of the files.

use std::sync::Arc;

use bytes::Bytes;

use crate::oci::error::RegistryError;
use crate::oci::names::Digest;
use crate::store::{blocking, Area, Store};

/// A manifest held in memory: its bytes and media type.
#[derive(Clone)]
pub struct CachedManifest {
    pub bytes: Bytes,
    pub media_type: Arc<str>,
}

pub struct Manifests {
    store: Store,
    memory: moka::future::Cache<(Area, Digest), CachedManifest>,
}

impl Manifests {
    pub fn new(store: Store, max_bytes: u64) -> Manifests {
        Manifests {
            store,
            memory: moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, m: &CachedManifest| {
                    (m.bytes.len() + m.media_type.len() + 64)
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// A stored manifest, from memory or disk.
    pub async fn get(
        &self,
        area: Area,
        digest: &Digest,
    ) -> Result<Option<CachedManifest>, RegistryError> {
        if let Some(m) = self.memory.get(&(area, *digest)).await {
            return Ok(Some(m));
        }
        let store = self.store.clone();
        let d = *digest;
        let Some((bytes, media_type)) = blocking(move || store.get_manifest(area, &d)).await?
        else {
            return Ok(None);
        };
        let m = CachedManifest {
            bytes,
            media_type: media_type.into(),
        };
        self.memory.insert((area, *digest), m.clone()).await;
        Ok(Some(m))
    }

    /// Stores a manifest (its bytes are verified against `digest` already) and keeps it in
    /// memory.
    pub async fn put(
        &self,
        area: Area,
        digest: Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<CachedManifest, RegistryError> {
        let store = self.store.clone();
        let (mt, b) = (media_type.to_owned(), bytes.clone());
        blocking(move || {
            store
                .put_manifest(area, digest, &mt, &b)
                .map_err(std::io::Error::other)
        })
        .await?;
        let m = CachedManifest {
            bytes,
            media_type: media_type.into(),
        };
        self.memory.insert((area, digest), m.clone()).await;
        Ok(m)
    }

    /// Forgets a manifest held in memory (after a delete).
    pub async fn forget(&self, area: Area, digest: &Digest) {
        self.memory.invalidate(&(area, *digest)).await;
    }
}
