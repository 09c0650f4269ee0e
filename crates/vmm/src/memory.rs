//! Guest memory: anonymous, lazily populated mappings laid out by [`ferry_arch::layout`].
//!
//! Memory is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`: creating a 2 GiB guest costs
//! address space, not RAM; a page is populated when the guest or the VMM first touches it
//! (2 MiB at a time where the host gives transparent huge pages).
//! Every region carries an [`AtomicBitmap`] of the pages the VMM itself has written
//! through `vm-memory` (loading the kernel and initrd now; device DMA later), so that a
//! migration's dirty set can be the union of KVM's dirty log and the VMM's own writes.

use ferry_arch::layout::{self, MIN_MEMORY, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest memory with VMM-write tracking.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Errors sizing or creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Below the minimum.
    #[error("guest memory of {size} bytes is below the minimum of {} MiB", MIN_MEMORY >> 20)]
    TooSmall {
        /// Requested size.
        size: u64,
    },
    /// Not a whole number of pages.
    #[error("guest memory of {size} bytes is not a multiple of the 4 KiB page size")]
    NotPageAligned {
        /// Requested size.
        size: u64,
    },
    /// More than the host has.
    #[error("guest memory of {} MiB exceeds this host's {} MiB of RAM", size >> 20, host >> 20)]
    MoreThanHost {
        /// Requested size.
        size: u64,
        /// Host RAM.
        host: u64,
    },
    /// The top guest-physical address exceeds what the CPU can address.
    #[error("guest memory of {} MiB ends above the {bits}-bit physical address space of this CPU", size >> 20)]
    BeyondPhysBits {
        /// Requested size.
        size: u64,
        /// Physical address bits.
        bits: u8,
    },
    /// The kernel refused the mapping.
    #[error("cannot map {} MiB of guest memory", size >> 20)]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Total RAM of this host in bytes, from `/proc/meminfo`.
pub fn host_ram() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks a requested size against the minimum, the page size, the host's RAM and the
/// CPU's physical address width.
pub fn check_size(size: u64, host_ram: Option<u64>, phys_bits: u8) -> Result<(), Error> {
    if size < MIN_MEMORY {
        return Err(Error::TooSmall { size });
    }
    if size % PAGE_SIZE != 0 {
        return Err(Error::NotPageAligned { size });
    }
    if let Some(host) = host_ram {
        if size > host {
            return Err(Error::MoreThanHost { size, host });
        }
    }
    let top = layout::ram_ranges(size).last().map(|(a, l)| a.0 + l).unwrap_or(size);
    if phys_bits < 64 && top > (1u64 << phys_bits) {
        return Err(Error::BeyondPhysBits { size, bits: phys_bits });
    }
    Ok(())
}

/// Maps `size` bytes of guest memory (lazily: nothing is touched), asking for transparent
/// huge pages: populating memory 2 MiB at a time is several times cheaper than 4 KiB at a
/// time when the host has free 2 MiB blocks (loading an initrd), and the guest takes fewer
/// TLB misses. Without THP (disabled on the host) the memory works the same with small pages.
pub fn create(size: u64) -> Result<GuestMemory, Error> {
    let mem = create_small(size)?;
    advise_huge(&mem);
    Ok(mem)
}

/// Maps `size` bytes of guest memory (lazily) without asking for huge pages: a migration's
/// destination receives into it. A fault in memory advised for huge pages allocates a 2 MiB
/// block, and when the host has none free (its RAM full of page cache, or fragmented) the
/// kernel compacts or reclaims memory for it right there (`defrag` = `madvise`, the default),
/// while the receive holds the socket; small pages need none of that. On the reference
/// machine the receive ran several times faster in small pages (docs/migration.md, "The
/// receive"). [`advise_huge`] advises huge pages once the memory has arrived, for what the
/// guest touches later.
pub fn create_small(size: u64) -> Result<GuestMemory, Error> {
    let ranges: Vec<(GuestAddress, usize)> =
        layout::ram_ranges(size).into_iter().map(|(a, l)| (a, l as usize)).collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| Error::Map { size, source })
}

/// Advises transparent huge pages for all of `mem` (see [`create`]): pages faulted in from
/// now on come 2 MiB at a time where the host has them; pages present stay as they are
/// (khugepaged may merge them later). Without THP on the host this changes nothing.
pub fn advise_huge(mem: &GuestMemory) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        // SAFETY: advice on a mapping of guest memory, which `mem` owns and keeps mapped;
        // MADV_HUGEPAGE changes how the kernel backs it, not its contents or its validity.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                "no transparent huge pages for guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// For each region, a bitmap (bit `i` of word `i / 64` = page `i`) of the pages that were
/// never populated: neither present nor swapped out, in an anonymous mapping, so they read
/// as zeros. `None` for a region mapped from a file (a restored checkpoint: a page not
/// present there holds the file's bytes) or when `/proc/self/pagemap` cannot be read.
///
/// A migration's first pass sends these as zero markers without touching them: reading
/// such a page would make the kernel map the zero page (a fault per page) only to find
/// zeros. A page the guest writes after this call is in the dirty log and sent again.
pub fn never_touched(mem: &GuestMemory) -> Vec<Option<Vec<u64>>> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok();
    mem.iter()
        .map(|r| {
            if r.file_offset().is_some() {
                return None;
            }
            let f = pagemap.as_ref()?;
            let pages = (r.len() / PAGE_SIZE) as usize;
            let first = r.as_ptr() as u64 / PAGE_SIZE;
            let mut bits = vec![0u64; pages.div_ceil(64)];
            let mut buf = vec![0u8; 8 * 8192];
            let mut page = 0usize;
            while page < pages {
                let n = (pages - page).min(8192);
                let raw = &mut buf[..8 * n];
                f.read_exact_at(raw, (first + page as u64) * 8).ok()?;
                for (i, e) in raw.chunks_exact(8).enumerate() {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(e);
                    let entry = u64::from_le_bytes(a);
                    // Bit 63: present; bit 62: swapped.
                    if entry >> 62 == 0 {
                        let p = page + i;
                        bits[p / 64] |= 1 << (p % 64);
                    }
                }
                page += n;
            }
            Some(bits)
        })
        .collect()
}

/// Resident pages of the calling process, from `/proc/self/statm` (for tests and
/// reports that check memory is populated lazily).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn size_checks() {
        assert!(matches!(check_size(1 << 20, None, 48), Err(Error::TooSmall { .. })));
        assert!(matches!(check_size((64 << 20) + 1, None, 48), Err(Error::NotPageAligned { .. })));
        assert!(matches!(check_size(8 << 30, Some(4 << 30), 48), Err(Error::MoreThanHost { .. })));
        assert!(matches!(check_size(8 << 30, None, 32), Err(Error::BeyondPhysBits { .. })));
        check_size(256 << 20, Some(1 << 30), 48).expect("fits");
    }

    #[test]
    fn creating_two_gib_touches_nothing() {
        let before = resident_bytes().expect("statm");
        let mem = create(2 << 30).expect("map");
        let after = resident_bytes().expect("statm");
        assert_eq!(mem.iter().map(vm_memory::GuestMemoryRegion::len).sum::<u64>(), 2 << 30);
        // The bitmaps (64 KiB) and allocator noise, not 2 GiB.
        assert!(after.saturating_sub(before) < 16 << 20, "grew by {}", after - before);
    }

    /// Pages written or read are not "never touched"; pages in a 2 MiB stretch nobody
    /// touched are (with transparent huge pages the kernel populates whole stretches, so
    /// the neighbours of a touched page may count as touched too).
    #[test]
    fn never_touched_pages() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = create(16 << 20).expect("map");
        mem.write_obj(7u64, GuestAddress(0x5000)).expect("write");
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(0x40_9000)).expect("read");
        let maps = never_touched(&mem);
        let bits = maps[0].as_ref().expect("anonymous memory has a map");
        let untouched = |p: usize| bits[p / 64] & (1 << (p % 64)) != 0;
        assert!(!untouched(5), "a written page");
        assert!(!untouched(0x409), "a page read (the zero page is mapped)");
        assert!((512..1024).all(untouched) && (1536..4096).all(untouched));
        assert!(bits.iter().map(|w| w.count_ones()).sum::<u32>() >= 4096 - 2 * 512);
    }

    /// The `VmFlags` of the mapping that starts at `addr`, from `/proc/self/smaps`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let start = format!("{addr:x}-");
        let mut inside = false;
        for line in smaps.lines() {
            if line.split_whitespace().next().is_some_and(|r| r.contains('-') && !r.ends_with(':')) {
                inside = line.starts_with(&start);
            } else if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    /// Memory for a receive is not advised for huge pages until `advise_huge`; `create`
    /// advises it at once. (`hg` is the kernel's flag for MADV_HUGEPAGE.)
    #[test]
    fn small_pages_until_advised() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = create_small(16 << 20).expect("map");
        let addr = mem.iter().next().expect("a region").as_ptr() as usize;
        assert!(!vm_flags(addr).split(' ').any(|f| f == "hg"), "{}", vm_flags(addr));
        mem.write_obj(7u64, GuestAddress(0x5000)).expect("write");
        advise_huge(&mem);
        assert!(vm_flags(addr).split(' ').any(|f| f == "hg"), "{}", vm_flags(addr));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).expect("read"), 7, "advice keeps data");
        let mem = create(16 << 20).expect("map");
        let addr = mem.iter().next().expect("a region").as_ptr() as usize;
        assert!(vm_flags(addr).split(' ').any(|f| f == "hg"), "{}", vm_flags(addr));
    }

    #[test]
    fn large_memory_has_two_regions() {
        let mem = create(4 << 30).expect("map");
        assert_eq!(mem.num_regions(), 2);
    }
}
