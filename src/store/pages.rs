//! Reading blob files into response bodies: mapped windows of the page cache, or copies read
//! with `pread`. The only module with `unsafe` code.
//!
//! Why mappings are sound here, once for every `unsafe` below: a mapping is only sound while
//! nobody shrinks or rewrites the mapped range, and berth never does either to a blob file.
//! Cache entries and private blobs are written to a temp file and renamed into place, then only
//! ever unlinked (eviction, gc, fsck --repair), which leaves existing mappings intact; a
//! download's temp file only grows, and its readers map only what has already been written.
//! Someone else cutting a file short (or a disk failing) is what [`Pages`] guards against.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use memmap2::{Advice, Mmap, MmapOptions};

use crate::lock;

/// Reads of a cached blob go in pieces of this size: large enough that the hand-off to a
/// blocking thread and the mapping are a small part of each piece.
const READ_CHUNK: usize = 1 << 20;
/// Copied reads go in pieces of this size: a piece is encrypted moments after it is read, while
/// it is still in the CPU's cache, and its buffer is then reused for the next one.
const COPY_CHUNK: usize = 256 << 10;
/// Readers following a download share mappings of it in windows of this size. They read the
/// same region at about the same time, so the eight clients of one cold blob cost one mapping
/// (and one unmap, with its cross-CPU TLB flush) per window rather than eight per piece.
const WINDOW: u64 = 1 << 20;
/// Windows a download keeps track of, for readers that are a little behind the others.
const WINDOWS_KEPT: usize = 4;

/// How a blob's bytes are handed to the connection.
///
/// A mapping costs no copy, but a page of it that cannot be read (a failing disk, a file cut
/// short behind berth's back) is SIGBUS for whoever touches it. When the connection hands the
/// bytes to the kernel (`write`/`writev` of plain HTTP/1.1), the kernel touches them: a bad
/// page fails that write with EFAULT, and only that response. When they are read in user space
/// (TLS encrypts them, HTTP/2 may copy small frames), a bad page would kill the process; those
/// connections get copies read with `pread`, where a bad page is an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    Mapped,
    Copied,
}

/// A blob being written, as the readers that follow the write see it: the bytes already
/// written, read from the staging file, never past what the writer reports written.
pub struct Growing {
    file: Arc<File>,
    windows: Windows,
}

impl Growing {
    pub fn new(file: Arc<File>) -> Growing {
        Growing {
            file,
            windows: Windows::default(),
        }
    }

    /// A piece of the written bytes `pos..limit`: up to the end of `pos`'s window (mapped), or
    /// up to [`COPY_CHUNK`] bytes copied into `buf`.
    pub fn piece(
        &self,
        pos: u64,
        limit: u64,
        pages: Pages,
        buf: &mut BytesMut,
    ) -> io::Result<Bytes> {
        let window_end = (pos / WINDOW + 1) * WINDOW;
        let len = (limit.min(window_end) - pos) as usize;
        match pages {
            Pages::Mapped => self.windows.piece(&self.file, pos, len),
            // Written moments ago, so in memory: read on this thread.
            Pages::Copied => read_into(&self.file, pos, len.min(COPY_CHUNK), buf),
        }
    }
}

/// Mappings of a growing file shared by the readers that follow it, in windows of [`WINDOW`].
#[derive(Default)]
struct Windows {
    /// Recently mapped windows, by index; alive while a reader holds a piece.
    recent: Mutex<Vec<(u64, Weak<Mmap>)>>,
}

impl Windows {
    /// Bytes `pos..pos + len` of `file`, already written and within one window, from a mapping
    /// of that window shared with the other readers.
    ///
    /// These bytes were written moments ago and are still in memory, so this runs on the
    /// reader's own thread: mapping them costs less than handing the work to another one.
    fn piece(&self, file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
        let index = pos / WINDOW;
        let base = index * WINDOW;
        let map = {
            let mut recent = lock(&self.recent);
            let shared = recent
                .iter()
                .find(|(i, _)| *i == index)
                .and_then(|(_, w)| w.upgrade());
            match shared {
                Some(map) => map,
                None => {
                    // SAFETY: see the module doc. The window may reach past what has been
                    // written (and past the end of the file); only written bytes are ever read.
                    let map = unsafe {
                        MmapOptions::new()
                            .offset(base)
                            .len(WINDOW as usize)
                            .map(file)?
                    };
                    let map = Arc::new(map);
                    recent.retain(|(_, w)| w.strong_count() > 0);
                    if recent.len() >= WINDOWS_KEPT {
                        recent.remove(0);
                    }
                    recent.push((index, Arc::downgrade(&map)));
                    map
                }
            }
        };
        let start = (pos - base) as usize;
        if map.advise_range(Advice::PopulateRead, start, len).is_err() {
            return read_now(file, pos, len);
        }
        Ok(Bytes::from_owner(Window {
            map,
            range: start..start + len,
        }))
    }
}

/// A body stream of bytes `start..end` of a complete file.
pub fn file_reader(
    file: File,
    start: u64,
    end: u64,
    pages: Pages,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let file = Arc::new(file);
    futures_util::stream::try_unfold((start, BytesMut::new()), move |(pos, mut buf)| {
        let file = file.clone();
        async move {
            if pos >= end {
                return Ok(None);
            }
            let len = (end - pos).min(READ_CHUNK as u64) as usize;
            let chunk = match pages {
                Pages::Copied => {
                    let len = len.min(COPY_CHUNK);
                    let (chunk, back) = tokio::task::spawn_blocking(move || {
                        read_into(&file, pos, len, &mut buf).map(|c| (c, buf))
                    })
                    .await
                    .map_err(io::Error::other)??;
                    buf = back;
                    chunk
                }
                Pages::Mapped => match map_if_resident(&file, pos, len)? {
                    Some(chunk) => chunk,
                    None => map_at(file, pos, len).await?,
                },
            };
            if chunk.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob shorter than its length",
                ));
            }
            let next = pos + chunk.len() as u64;
            Ok(Some((chunk, (next, buf))))
        }
    })
}

/// Maps bytes `pos..pos + len` of `file` and hands them out as `Bytes` that unmap when the
/// connection has sent them.
///
/// A mapping instead of a read: the bytes go from the page cache to the socket (or to the TLS
/// encrypter) without a copy into a buffer of ours, with no buffer to allocate and zero, and the
/// pages leave berth's memory as soon as the chunk is sent. The pages are read in here, on a
/// blocking thread, so a page that is not in memory never stalls a runtime thread; and they are
/// read in with `MADV_POPULATE_READ`, which reports a failing disk as an error where touching
/// the mapping would kill the process (SIGBUS). Where that is unavailable (Linux before 5.14),
/// the piece is read into a buffer instead.
async fn map_at(file: Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || map_now(&file, pos, len))
        .await
        .map_err(io::Error::other)?
}

/// How much of `pos..pos + len` lies within the file: a mapping past its end faults (SIGBUS)
/// when read, so nothing is ever mapped there.
fn within_file(file: &File, pos: u64, len: usize) -> io::Result<usize> {
    let file_len = file.metadata()?.len();
    Ok(len.min(file_len.saturating_sub(pos) as usize))
}

/// [`map_at`] on the calling thread.
fn map_now(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let len = within_file(file, pos, len)?;
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: see the module doc.
    let map = unsafe { MmapOptions::new().offset(pos).len(len).map(file)? };
    match map.advise(Advice::PopulateRead) {
        Ok(()) => Ok(Bytes::from_owner(map)),
        Err(_) => {
            drop(map);
            read_now(file, pos, len)
        }
    }
}

/// [`map_at`] on the calling thread when every page of the piece is in memory already, so
/// nothing can wait for the disk: a cache hit on a blob read recently then needs no hand-off to
/// the blocking pool (two thread wake-ups per piece). `None` when some page is not in memory.
fn map_if_resident(file: &File, pos: u64, len: usize) -> io::Result<Option<Bytes>> {
    let len = within_file(file, pos, len)?;
    if len == 0 {
        return Ok(Some(Bytes::new()));
    }
    // mincore wants a page-aligned address: map from the page that holds `pos`.
    let page = page_size();
    let base = pos - pos % page as u64;
    let skip = (pos - base) as usize;
    // SAFETY: see the module doc.
    let map = unsafe { MmapOptions::new().offset(base).len(skip + len).map(file)? };
    let mut present = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping that starts on a page boundary (`base` is aligned), and
    // `present` has one byte for each of its pages, as mincore(2) requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            present.as_mut_ptr(),
        )
    };
    if rc != 0 || present.iter().any(|p| p & 1 == 0) {
        return Ok(None);
    }
    if map.advise(Advice::PopulateRead).is_err() {
        return Ok(None);
    }
    Ok(Some(Bytes::from_owner(Window {
        map: Arc::new(map),
        range: skip..skip + len,
    })))
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

/// Bytes `pos..pos + len` of `file` read into a buffer: where pages cannot be populated.
fn read_now(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0; len];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, pos)?;
    buf.truncate(n);
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file shorter than expected",
        ));
    }
    Ok(Bytes::from(buf))
}

/// Bytes `pos..pos + len` of `file` read with `pread` into `buf`'s free space, without zeroing
/// it first. The piece is split off as `Bytes`; once the connection has dropped it, the next
/// read reuses the same memory, so a long body costs no allocation (and no page faults) per
/// piece.
fn read_into(file: &File, pos: u64, len: usize, buf: &mut BytesMut) -> io::Result<Bytes> {
    buf.clear();
    buf.reserve(len);
    let spare = buf.spare_capacity_mut();
    let len = len.min(spare.len());
    // SAFETY: `spare` is `len` or more writable bytes that `buf` owns; pread writes at most
    // `len` of them and reports how many, and only that many are marked initialised below.
    let n = unsafe {
        libc::pread(
            std::os::fd::AsRawFd::as_raw_fd(file),
            spare.as_mut_ptr().cast(),
            len,
            pos as libc::off_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file shorter than expected",
        ));
    }
    // SAFETY: pread initialised the first `n` (<= `len`) bytes of the spare capacity.
    unsafe { buf.set_len(n as usize) };
    Ok(buf.split().freeze())
}

/// A piece of a mapping (shared by several readers, or aligned below the piece), as the owner
/// of a `Bytes`.
struct Window {
    map: Arc<Mmap>,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    #[tokio::test]
    async fn file_reader_returns_exactly_the_range_across_chunks() {
        // Neither the start nor the end on a page or chunk boundary, and longer than two chunks.
        let len = 2 * READ_CHUNK + 12_345;
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &content).unwrap();
        for (start, end) in [(0, len), (4097, len - 3), (READ_CHUNK - 1, READ_CHUNK + 1)] {
            for pages in [Pages::Mapped, Pages::Copied] {
                let chunks: Vec<Bytes> =
                    file_reader(file.try_clone().unwrap(), start as u64, end as u64, pages)
                        .try_collect()
                        .await
                        .unwrap();
                assert!(chunks.iter().all(|c| c.len() <= READ_CHUNK));
                assert_eq!(
                    chunks.concat(),
                    &content[start..end],
                    "range {start}..{end}, {pages:?}"
                );
            }
        }
    }

    #[test]
    fn every_way_of_reading_a_piece_gives_the_same_bytes() {
        let content: Vec<u8> = (0..300_000).map(|i| (i % 253) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &content).unwrap();
        for (pos, len) in [
            (0, 300_000),
            (4095, 10_000),
            (123_457, 100_000),
            (299_999, 1),
        ] {
            let want = &content[pos..pos + len];
            let pos64 = pos as u64;
            assert_eq!(&map_now(&file, pos64, len).unwrap()[..], want);
            assert_eq!(&read_now(&file, pos64, len).unwrap()[..], want);
            // Just written, so in memory.
            let resident = map_if_resident(&file, pos64, len).unwrap();
            assert_eq!(
                &resident.expect("pages just written are in memory")[..],
                want
            );
        }
        // Past the end: nothing, not a mapping that would fault.
        assert!(map_now(&file, 300_000, 10).unwrap().is_empty());
        assert!(map_if_resident(&file, 300_001, 10)
            .unwrap()
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn file_reader_fails_on_a_file_shorter_than_its_length() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &[7u8; 1000]).unwrap();
        for pages in [Pages::Mapped, Pages::Copied] {
            let got: io::Result<Vec<Bytes>> =
                file_reader(file.try_clone().unwrap(), 0, 2000, pages)
                    .try_collect()
                    .await;
            assert_eq!(
                got.unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof,
                "a short file must end the body with an error, never a fault or a short 200"
            );
        }
    }
}
