//! The memory file: guest RAM regions back to back, zero pages left as holes.
//!
//! Writing skips zero pages, so the file is sparse and costs disk only for what the guest
//! used. Restoring maps the file `MAP_PRIVATE` (copy-on-write): nothing is read up front,
//! a page comes from the file the first time the guest touches it, and the guest's writes
//! never reach the file. Do not modify a checkpoint while a VM restored from it runs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

/// Name of the memory file in a checkpoint directory.
pub const MEMORY_FILE: &str = "memory.bin";
const PAGE: usize = 4096;

/// Errors writing or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O on the file.
    #[error("cannot {what} {path}")]
    Io {
        /// Doing what.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the memory it should hold.
    #[error("{path} holds {actual} bytes but the checkpoint's memory is {expected} bytes")]
    Short {
        /// The file.
        path: PathBuf,
        /// Expected length.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// The file cannot be mapped.
    #[error("cannot map {path} as guest memory")]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions overlap or are invalid.
    #[error("the checkpoint's memory regions are invalid")]
    Regions,
}

/// What writing the memory file did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Pages in guest memory.
    pub pages: u64,
    /// Pages that were zero and left as holes.
    pub zero_pages: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorises this.
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Writes every region of `mem` to `path` (created; must not exist), skipping zero pages.
/// The guest must not run meanwhile.
pub fn write_sparse<M>(mem: &M, path: &Path) -> Result<WriteStats, Error>
where
    M: GuestMemoryBackend,
{
    let io = |what| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(io("create"))?;
    let mut stats = WriteStats::default();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region.get_host_address(MemoryRegionAddress(0)).map_err(|_| Error::Regions)?;
        // SAFETY: `host` is the start of this region's live mapping of `len` bytes; the
        // caller guarantees no vCPU runs, and the VMM does not write guest memory while it
        // checkpoints, so the bytes do not change under this shared view.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut run_start: Option<usize> = None;
        let flush = |start: usize, end: usize, stats: &mut WriteStats| -> Result<(), Error> {
            file.write_all_at(&bytes[start..end], file_offset + start as u64).map_err(io("write"))?;
            stats.bytes_written += (end - start) as u64;
            Ok(())
        };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            stats.pages += 1;
            if is_zero(page) {
                stats.zero_pages += 1;
                if let Some(s) = run_start.take() {
                    flush(s, i * PAGE, &mut stats)?;
                }
            } else if run_start.is_none() {
                run_start = Some(i * PAGE);
            }
        }
        if let Some(s) = run_start {
            flush(s, len, &mut stats)?;
        }
        file_offset += len as u64;
    }
    file.set_len(file_offset).map_err(io("size"))?;
    file.sync_all().map_err(io("sync"))?;
    Ok(stats)
}

/// Maps `path` copy-on-write as guest memory laid out as `regions` (guest address, length),
/// stored back to back in the file.
pub fn map_private(
    path: &Path,
    regions: &[(GuestAddress, u64)],
) -> Result<GuestMemoryMmap<AtomicBitmap>, Error> {
    let io = |what| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    let file = File::open(path).map_err(io("open"))?;
    let actual = file.metadata().map_err(io("inspect"))?.len();
    let expected: u64 = regions.iter().map(|r| r.1).sum();
    if actual < expected {
        return Err(Error::Short { path: path.to_owned(), expected, actual });
    }
    let mut mapped = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for &(addr, len) in regions {
        let size = usize::try_from(len).map_err(|_| Error::Regions)?;
        let fd = file.try_clone().map_err(io("reopen"))?;
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| Error::Map { path: path.to_owned(), source })?;
        mapped.push(GuestRegionMmap::new(region, addr).ok_or(Error::Regions)?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|_| Error::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    #[test]
    fn sparse_round_trip() {
        let dir = std::env::temp_dir().join(format!("ferry-memfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let regions = [(GuestAddress(0), 4u64 << 20), (GuestAddress(1 << 30), 2 << 20)];
        let ranges: Vec<(GuestAddress, usize)> = regions.iter().map(|r| (r.0, r.1 as usize)).collect();
        let mem: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&ranges).expect("mem");
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x3000)).expect("write");
        mem.write_obj(0x1234_u64, GuestAddress((1 << 30) + 0x1ff8)).expect("write");
        let path = dir.join(MEMORY_FILE);
        let stats = write_sparse(&mem, &path).expect("write file");
        assert_eq!(stats.pages, 1536);
        assert_eq!(stats.zero_pages, 1534);
        assert_eq!(stats.bytes_written, 8192);
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), 6 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "file is not sparse: {} blocks", meta.blocks());
        // Writing again over an existing file is refused.
        assert!(matches!(write_sparse(&mem, &path), Err(Error::Io { what: "create", .. })));

        let back = map_private(&path, &regions).expect("map");
        assert_eq!(back.read_obj::<u64>(GuestAddress(0x3000)).expect("read"), 0xdead_beef);
        assert_eq!(back.read_obj::<u64>(GuestAddress((1 << 30) + 0x1ff8)).expect("read"), 0x1234);
        // Copy-on-write: the guest's writes do not reach the file.
        back.write_obj(7u64, GuestAddress(0x3000)).expect("write");
        let again = map_private(&path, &regions).expect("map");
        assert_eq!(again.read_obj::<u64>(GuestAddress(0x3000)).expect("read"), 0xdead_beef);

        let short = [(GuestAddress(0), 8u64 << 20)];
        assert!(matches!(map_private(&path, &short), Err(Error::Short { .. })));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
