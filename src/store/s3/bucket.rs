//! The bucket as the S3 backend sees it: keys under the configured prefix, every request
//! bounded by the configured timeout, errors as `io::Error` naming the operation and key, and a
//! blocking face for the store's blocking methods.
//!
//! The client (the `object_store` crate) is async; the store's methods block. Every request,
//! bodies included, runs on a small runtime of the bucket's own: a caller blocked on the bucket
//! (on any thread, holding anything) can never starve the requests it waits for, which would
//! happen if they needed the threads of berth's main runtime.

use std::future::Future;
use std::io;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, PutPayload, RetryConfig, WriteMultipart,
};
use tokio::io::AsyncReadExt;

use crate::config::S3Config;
use crate::oci::names::Digest;
use crate::store::ByteStream;
use sha2::{Digest as _, Sha256};

/// Files up to this size go up in one PUT; larger ones as a multipart upload in parts of this
/// size (S3 wants parts of at least 5 MiB).
const PART: usize = 16 << 20;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// An object as a listing sees it.
pub struct Listed {
    /// The key below the prefix.
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

pub struct Bucket {
    client: Arc<dyn ObjectStore>,
    /// `""` or `"prefix/"`.
    prefix: String,
    timeout: Duration,
    runtime: BucketRuntime,
    /// Requests that failed (not "not found"): the store's health, for metrics.
    pub errors: AtomicU64,
}

impl Bucket {
    /// A client for the configured bucket. Nothing is sent yet.
    pub fn open(config: &S3Config) -> io::Result<Bucket> {
        let runtime = BucketRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("berth-bucket")
                .enable_all()
                .build()?,
        ));
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http)
            // Requests are bounded by `timeout` around each one here (and per piece of a
            // body): the client's own total timeout would cut long bodies short.
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_connect_timeout(Duration::from_secs(5).min(config.timeout.0))
                    .with_timeout_disabled(),
            )
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: config.timeout.0,
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &config.endpoint {
            // S3-compatible servers (Garage, MinIO) name buckets in the path.
            b = b
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        if let Some(file) = &config.credentials_file {
            let (id, secret) = read_credentials(file)?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let client = b
            .build()
            .map_err(|e| io::Error::other(format!("bucket {}: {e}", config.bucket)))?;
        let prefix = match config.prefix() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Ok(Bucket {
            client: Arc::new(client),
            prefix,
            timeout: config.timeout.0,
            runtime,
            errors: AtomicU64::new(0),
        })
    }

    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{key}", self.prefix))
    }

    /// Runs one request on the bucket's runtime and waits for it, at most `timeout`. Not found is
    /// `Ok(None)`.
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        key: &str,
        request: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> io::Result<Option<T>> {
        let timeout = self.timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.handle().spawn(async move {
            let _ = tx.send(tokio::time::timeout(timeout, request).await);
        });
        let wait = || rx.recv();
        // On a runtime worker (which the store's callers should not be), let the runtime move
        // its other tasks elsewhere while this thread waits.
        let answer = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        let result = match answer {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                return Err(self.failed(
                    what,
                    key,
                    io::Error::new(io::ErrorKind::TimedOut, "timed out"),
                ))
            }
            Err(_) => return Err(self.failed(what, key, io::Error::other("request task lost"))),
        };
        match result {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(what, key, io::Error::other(e.to_string()))),
        }
    }

    fn failed(&self, what: &str, key: &str, e: io::Error) -> io::Error {
        self.errors.fetch_add(1, Ordering::Relaxed);
        io::Error::new(e.kind(), format!("bucket: {what} {key}: {e}"))
    }

    pub fn get(&self, key: &str) -> io::Result<Option<Bytes>> {
        let (client, path) = (self.client.clone(), self.path(key));
        self.run(
            "get",
            key,
            async move { client.get(&path).await?.bytes().await },
        )
    }

    /// The object's size, when it exists.
    pub fn size(&self, key: &str) -> io::Result<Option<u64>> {
        let (client, path) = (self.client.clone(), self.path(key));
        Ok(self
            .run("head", key, async move { client.head(&path).await })?
            .map(|m| m.size))
    }

    pub fn put(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        let (client, path) = (self.client.clone(), self.path(key));
        self.run("put", key, async move {
            client.put(&path, PutPayload::from(bytes)).await
        })?;
        Ok(())
    }

    /// [`put`](Self::put) in the background, for records nobody waits for; a failure is
    /// counted and logged.
    pub fn put_later(self: &Arc<Self>, key: &str, bytes: Bytes) {
        let (bucket, key) = (self.clone(), key.to_owned());
        let (client, path, timeout) = (self.client.clone(), self.path(&key), self.timeout);
        self.runtime.handle().spawn(async move {
            let put = tokio::time::timeout(timeout, client.put(&path, PutPayload::from(bytes)));
            let failed = match put.await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => io::Error::other(e.to_string()),
                Err(_) => io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            };
            let e = bucket.failed("put", &key, failed);
            tracing::warn!(error = %e, "a record of use did not reach the bucket");
        });
    }

    /// Uploads a local file: one PUT when small, a multipart upload otherwise. The object
    /// appears only when the upload completes.
    pub fn put_file(&self, key: &str, file: &FsPath) -> io::Result<()> {
        let len = std::fs::metadata(file)?.len();
        if len <= PART as u64 {
            return self.put(key, Bytes::from(std::fs::read(file)?));
        }
        let (client, path, file) = (self.client.clone(), self.path(key), file.to_owned());
        let timeout = self.timeout;
        self.run("upload", key, async move {
            let upload = client.put_multipart(&path).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let sent = send_file(&mut writer, &file, timeout).await;
            match sent {
                Ok(()) => writer.finish().await.map(drop),
                Err(e) => {
                    let _ = writer.abort().await;
                    Err(e)
                }
            }
        })?;
        Ok(())
    }

    /// Reads an object whole and hashes it: its actual digest and length.
    pub fn hash(&self, key: &str) -> io::Result<Option<(Digest, u64)>> {
        let (client, path) = (self.client.clone(), self.path(key));
        let timeout = self.timeout;
        self.run("hash", key, async move {
            let mut pieces = client.get(&path).await?.into_stream();
            let (mut hasher, mut len) = (Sha256::new(), 0u64);
            loop {
                let next = tokio::time::timeout(timeout, pieces.next())
                    .await
                    .map_err(|_| object_store::Error::Generic {
                        store: "berth",
                        source: "the bucket stopped sending".into(),
                    })?;
                let Some(piece) = next else { break };
                let piece = piece?;
                hasher.update(&piece);
                len += piece.len() as u64;
            }
            Ok((Digest::from_sha256(hasher.finalize().into()), len))
        })
    }

    /// Removes an object; removing what is not there is no error.
    pub fn delete(&self, key: &str) -> io::Result<()> {
        let (client, path) = (self.client.clone(), self.path(key));
        self.run("delete", key, async move { client.delete(&path).await })?;
        Ok(())
    }

    /// Every object whose key starts with `dir/` (all the pages of the listing).
    pub fn list(&self, dir: &str) -> io::Result<Vec<Listed>> {
        let (client, path) = (self.client.clone(), self.path(dir));
        let strip = self.prefix.len();
        let found = self.run("list", dir, async move {
            client.list(Some(&path)).try_collect::<Vec<_>>().await
        })?;
        Ok(found
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                Some(Listed {
                    key: m.location.as_ref().get(strip..)?.to_owned(),
                    size: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .collect())
    }

    /// Bytes `start..end` of an object, in pieces; a piece that takes longer than the timeout
    /// to arrive ends the stream with an error.
    pub fn stream(self: &Arc<Self>, key: &str, start: u64, end: u64) -> ByteStream {
        let (client, path, timeout) = (self.client.clone(), self.path(key), self.timeout);
        let (bucket, key) = (self.clone(), key.to_owned());
        let opened = async move {
            let options = GetOptions {
                range: Some(GetRange::Bounded(start..end)),
                ..GetOptions::default()
            };
            let got = tokio::time::timeout(timeout, client.get_opts(&path, options))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))?
                .map_err(|e| io::Error::other(e.to_string()))?;
            let pieces = got
                .into_stream()
                .map_err(|e| io::Error::other(e.to_string()));
            Ok::<_, io::Error>(with_stall_timeout(pieces.boxed(), timeout))
        };
        let mut pieces = Box::pin(
            futures_util::stream::once(opened)
                .try_flatten()
                .map_err(move |e| bucket.failed("get", &key, e)),
        );
        // Pulled on the bucket's runtime, handed over a few pieces ahead; a reader that goes
        // away closes the channel, which ends the pull.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        self.runtime.handle().spawn(async move {
            while let Some(piece) = pieces.next().await {
                let failed = piece.is_err();
                if tx.send(piece).await.is_err() || failed {
                    return;
                }
            }
        });
        let received =
            futures_util::stream::unfold(rx, |mut rx| async move { Some((rx.recv().await?, rx)) });
        Box::pin(sync_wrapper::SyncStream::new(received))
    }
}

/// The bucket's own runtime, shut down without waiting when the bucket goes (dropping a
/// runtime the ordinary way is not allowed where the store is usually dropped: on a runtime).
struct BucketRuntime(Option<tokio::runtime::Runtime>);

impl BucketRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        // Present from construction until drop.
        self.0
            .as_ref()
            .map(|r| r.handle())
            .expect("the bucket's runtime")
    }
}

impl Drop for BucketRuntime {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.shutdown_background();
        }
    }
}

/// Ends a stream with a timeout error when its next piece takes longer than `timeout`.
fn with_stall_timeout(
    pieces: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    timeout: Duration,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold(Some(pieces), move |state| async move {
        let mut pieces = state?;
        match tokio::time::timeout(timeout, pieces.next()).await {
            Ok(Some(piece)) => Some((piece, Some(pieces))),
            Ok(None) => None,
            Err(_) => Some((
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the bucket stopped sending",
                )),
                None,
            )),
        }
    })
}

/// Feeds a file into a multipart upload, each part bounded by `timeout`.
async fn send_file(
    writer: &mut WriteMultipart,
    file: &FsPath,
    timeout: Duration,
) -> object_store::Result<()> {
    let io_err = |e: io::Error| object_store::Error::Generic {
        store: "berth",
        source: Box::new(e),
    };
    let mut f = tokio::fs::File::open(file).await.map_err(io_err)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            return Ok(());
        }
        tokio::time::timeout(timeout, writer.wait_for_capacity(PARTS_IN_FLIGHT))
            .await
            .map_err(|_| io_err(io::Error::new(io::ErrorKind::TimedOut, "part timed out")))??;
        writer.write(&buf[..n]);
    }
}

/// The access key and secret of the `[default]` profile of an AWS shared-credentials file
/// (`key = value` lines under `[profile]` headers; the two keys are all berth reads).
fn read_credentials(file: &FsPath) -> io::Result<(String, String)> {
    let text = std::fs::read_to_string(file)?;
    let (mut id, mut secret, mut in_default) = (None, None, true);
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_default = line == "[default]";
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !in_default {
            continue;
        }
        match k.trim() {
            "aws_access_key_id" => id = Some(v.trim().to_owned()),
            "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err(io::Error::other(format!(
            "{}: no aws_access_key_id and aws_secret_access_key under [default]",
            file.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_come_from_the_default_profile() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(
            &f,
            "[other]\naws_access_key_id = X\n[default]\naws_access_key_id = GK1\naws_secret_access_key=s3cret\n",
        )
        .unwrap();
        assert_eq!(
            super::read_credentials(&f).unwrap(),
            ("GK1".to_owned(), "s3cret".to_owned())
        );
        std::fs::write(&f, "[other]\naws_access_key_id = X\n").unwrap();
        assert!(super::read_credentials(&f).is_err());
    }
}
