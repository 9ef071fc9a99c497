//! Reading a blob that is in the bucket and not local: streamed to the reader while it fills
//! the local copy.

use std::sync::Arc;

use bytes::BytesMut;
use futures_util::StreamExt;

use super::Bucket;
use crate::store::pages::Pages;
use crate::store::{BlobSource, BlobWriter, ByteStream};

/// A blob read from the bucket fills the local copy in writes of this size.
const FILL_BATCH: usize = 1 << 20;

/// A blob in the bucket and not local: streamed from the bucket, and, when the whole blob is
/// read, copied into the local copy on the way (verified like any write).
pub(super) struct BucketSource {
    pub(super) bucket: Arc<Bucket>,
    pub(super) key: String,
    pub(super) len: u64,
    pub(super) fill: Option<BlobWriter>,
}

impl BlobSource for BucketSource {
    fn stream(self: Box<Self>, start: u64, end: u64, _pages: Pages) -> ByteStream {
        let pieces = self.bucket.stream(&self.key, start, end);
        match self.fill {
            Some(writer) if start == 0 && end == self.len => {
                fill_while_streaming(pieces, writer, self.len)
            }
            _ => pieces,
        }
    }
}

/// Passes the pieces on, and writes them to `writer` in batches; once `len` bytes have passed,
/// commits them in the background (a response body is not polled past its last byte, so the
/// end of the stream may never be seen). A failed local write stops the filling, never the
/// stream.
fn fill_while_streaming(pieces: ByteStream, writer: BlobWriter, len: u64) -> ByteStream {
    struct Fill {
        writer: BlobWriter,
        batch: BytesMut,
        seen: u64,
    }
    async fn write_batch(mut f: Fill) -> Option<Fill> {
        let batch = f.batch.split().freeze();
        let written =
            tokio::task::spawn_blocking(move || f.writer.write(&batch).map(|()| f.writer)).await;
        match written {
            Ok(Ok(writer)) => Some(Fill {
                writer,
                batch: BytesMut::new(),
                seen: f.seen,
            }),
            _ => None,
        }
    }
    let fill = Fill {
        writer,
        batch: BytesMut::new(),
        seen: 0,
    };
    let stream = futures_util::stream::unfold(
        (pieces, Some(fill)),
        move |(mut pieces, mut fill)| async move {
            let piece = match pieces.next().await? {
                Ok(piece) => piece,
                Err(e) => return Some((Err(e), (pieces, None))),
            };
            if let Some(mut f) = fill.take() {
                f.batch.extend_from_slice(&piece);
                f.seen += piece.len() as u64;
                if f.seen >= len {
                    tokio::spawn(async move {
                        let Some(f) = write_batch(f).await else {
                            return;
                        };
                        let committed =
                            tokio::task::spawn_blocking(move || f.writer.commit()).await;
                        if let Ok(Err(e)) = committed {
                            tracing::warn!(error = %e, "a blob read from the bucket was not kept locally");
                        }
                    });
                } else if f.batch.len() >= FILL_BATCH {
                    fill = write_batch(f).await;
                } else {
                    fill = Some(f);
                }
            }
            Some((Ok(piece), (pieces, fill)))
        },
    );
    Box::pin(sync_wrapper::SyncStream::new(stream))
}
