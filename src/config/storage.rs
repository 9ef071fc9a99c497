//! `[storage]`: where the content store keeps its data. The data dir on local disk by default;
//! with `backend = "s3"`, an S3-compatible bucket shared by any number of replicas, with the
//! data dir as a bounded local copy in front of it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{err, ByteSize, ConfigError, Seconds};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum StorageConfig {
    /// Everything in `data_dir`.
    #[default]
    Disk,
    /// The bucket is the source of truth; `data_dir` holds a bounded local copy.
    S3(S3Config),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// The server's URL (`http://127.0.0.1:3900`, `https://minio.office:9000`); AWS S3 when
    /// unset (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Keys go under this prefix, so that one bucket can hold several berth clusters.
    #[serde(default)]
    pub prefix: String,
    /// An AWS shared-credentials file (`[default]` with `aws_access_key_id`,
    /// `aws_secret_access_key`); without it the usual `AWS_*` environment is read.
    pub credentials_file: Option<PathBuf>,
    /// Allows a plain-HTTP endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// Bound on the local copy in `data_dir`, least recently used out first.
    #[serde(default = "default_max_local_size")]
    pub max_local_size: ByteSize,
    /// Whether this replica bounds the bucket's mirrored content by `max_cache_size`. With
    /// several replicas, set it on one of them only (see the README).
    #[serde(default = "yes")]
    pub evict: bool,
    /// Longest wait for one request to the bucket (or for the next piece of a body), after
    /// which it fails with an error instead of hanging.
    #[serde(default = "default_timeout")]
    pub timeout: Seconds,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_max_local_size() -> ByteSize {
    ByteSize(20 << 30)
}
fn yes() -> bool {
    true
}
fn default_timeout() -> Seconds {
    Seconds(Duration::from_secs(30))
}

impl StorageConfig {
    /// Whether this berth bounds the mirrored content by `max_cache_size`.
    pub fn evicts(&self) -> bool {
        match self {
            StorageConfig::Disk => true,
            StorageConfig::S3(s3) => s3.evict,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let StorageConfig::S3(s3) = self else {
            return Ok(());
        };
        if s3.bucket.is_empty() {
            return Err(err("storage.bucket", "must name a bucket"));
        }
        if s3.timeout.0.is_zero() {
            return Err(err("storage.timeout", "must be more than 0"));
        }
        if let Some(e) = &s3.endpoint {
            let plain = e.starts_with("http://");
            if !plain && !e.starts_with("https://") {
                return Err(err(
                    "storage.endpoint",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
            if plain && !s3.allow_http {
                return Err(err(
                    "storage.endpoint",
                    "is plain HTTP: set `allow_http = true` to use it",
                ));
            }
        }
        if let Some(path) = &s3.credentials_file {
            if !path.is_file() {
                return Err(err(
                    "storage.credentials_file",
                    format!("{}: not a readable file", path.display()),
                ));
            }
        }
        Ok(())
    }
}

impl S3Config {
    /// The prefix without slashes at either end (`""` for none).
    pub fn prefix(&self) -> &str {
        self.prefix.trim_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, StorageConfig};

    #[test]
    fn storage_defaults_to_disk_and_s3_keys_are_checked() {
        assert!(matches!(
            Config::from_toml("").unwrap().storage,
            StorageConfig::Disk
        ));
        let c = Config::from_toml(
            "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:3900\"\nallow_http = true\nprefix = \"/berth/\"\nregion = \"garage\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let StorageConfig::S3(s3) = &c.storage else {
            panic!("s3 expected")
        };
        assert_eq!((s3.prefix(), s3.region.as_str()), ("berth", "garage"));
        let plain = Config::from_toml(
            "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:3900\"\n",
        )
        .unwrap();
        assert_eq!(plain.validate().unwrap_err().key, "storage.endpoint");
        let unknown =
            Config::from_toml("[storage]\nbackend = \"s3\"\nbucket = \"b\"\nbukket = 1\n");
        assert!(unknown.is_err());
        let no_bucket = Config::from_toml("[storage]\nbackend = \"s3\"\n");
        assert!(no_bucket.is_err());
        let other = Config::from_toml("[storage]\nbackend = \"ftp\"\n");
        assert!(other.is_err());
    }
}
