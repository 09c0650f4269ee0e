//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_0000 ..0x0000_0500   real-mode IVT/BDA area, left alone
//! 0x0000_0500 ..0x0000_0528   boot GDT (PVH entry segments)
//! 0x0000_0528 ..0x0000_0530   boot IDT (empty)
//! 0x0000_6000 ..0x0000_6040   hvm_start_info
//! 0x0000_6040 ..0x0000_7000   PVH module list (initrd)
//! 0x0000_7000 ..0x0000_8000   PVH memory map (e820-like)
//! 0x0002_0000 ..0x0003_0000   kernel command line (64 KiB at most)
//! 0x0009_fc00 ..0x0010_0000   EBDA / VGA / BIOS: reserved, not RAM; inside it:
//! 0x000e_0000 ..0x000f_0000     ACPI tables, RSDP first (written by ferry-acpi)
//! 0x0010_0000 ..              the kernel (ELF segments must start at or above 1 MiB)
//! ...           ..top of low RAM  initrd, placed as high as possible below the MMIO hole
//! 0xc000_0000 ..0x1_0000_0000 32-bit MMIO hole (LAPIC, IOAPIC, future device windows)
//! 0x1_0000_0000 ..            RAM above 4 GiB, when memory exceeds 3 GiB
//! ```

use vm_memory::GuestAddress;

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Boot GDT address.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT address.
pub const BOOT_IDT_START: u64 = 0x528;
/// Address of `hvm_start_info`, passed to the guest in EBX.
pub const PVH_INFO_START: u64 = 0x6000;
/// Address of the PVH module list.
pub const MODLIST_START: u64 = 0x6040;
/// Address of the PVH memory map.
pub const MEMMAP_START: u64 = 0x7000;
/// Largest number of memory map entries that fit before the command line area.
pub const MEMMAP_MAX_ENTRIES: usize = (0x1000 / 24) as usize;
/// Address of the kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of usable RAM below 1 MiB (start of the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the ACPI table area, in the BIOS area the memory map reserves. The RSDP is
/// its first structure: 16-byte aligned inside 0xe_0000..0x10_0000, where a guest that is
/// not told the RSDP's address (PVH `rsdp_paddr` left 0) scans for it.
pub const ACPI_START: u64 = 0xe_0000;
/// Size of the ACPI table area (64 KiB: 0xe_0000..0xf_0000).
pub const ACPI_SIZE: u64 = 0x1_0000;
/// Start of high memory: kernels load here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Address KVM uses for the three-page TSS area (inside the MMIO hole, below the IOAPIC).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// The smallest guest memory Ferry accepts: the boot structures sit below 1 MiB and a
/// kernel needs room above it.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The guest-physical RAM ranges `(start, length)` for a guest of `mem_size` bytes: one
/// range below the MMIO hole and, if the memory does not fit there, one above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(MMIO_HOLE_END), mem_size - MMIO_HOLE_START)]
    }
}

/// Kind of an entry in the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM.
    Ram,
    /// Reserved: the guest must not use it as RAM.
    Reserved,
}

/// One entry of the memory map the guest is given (E820 / PVH memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

/// The memory map the guest sees for `mem_size` bytes of RAM: low RAM up to the EBDA, the
/// legacy hole reserved, RAM from 1 MiB to the top of low memory, the MMIO hole's
/// architectural part reserved, and RAM above 4 GiB if any.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry { start: 0, len: EBDA_START, kind: MemoryKind::Ram },
        MemoryMapEntry { start: EBDA_START, len: HIMEM_START - EBDA_START, kind: MemoryKind::Reserved },
    ];
    let low_end = mem_size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        map.push(MemoryMapEntry { start: HIMEM_START, len: low_end - HIMEM_START, kind: MemoryKind::Ram });
    }
    if mem_size > MMIO_HOLE_START {
        map.push(MemoryMapEntry {
            start: MMIO_HOLE_END,
            len: mem_size - MMIO_HOLE_START,
            kind: MemoryKind::Ram,
        });
    }
    map
}

/// The highest address (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let map = memory_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            MemoryMapEntry { start: HIMEM_START, len: (256 << 20) - HIMEM_START, kind: MemoryKind::Ram }
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let four_g = 4u64 << 30;
        let ranges = ram_ranges(four_g);
        assert_eq!(
            ranges,
            vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(MMIO_HOLE_END), four_g - MMIO_HOLE_START)]
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, four_g);
        let map = memory_map(four_g);
        assert!(map.iter().all(|e| e.kind != MemoryKind::Ram
            || e.start + e.len <= MMIO_HOLE_START
            || e.start >= MMIO_HOLE_END));
        assert_eq!(low_ram_end(four_g), MMIO_HOLE_START);
    }

    #[test]
    fn exactly_the_hole_start_needs_no_high_range() {
        assert_eq!(ram_ranges(MMIO_HOLE_START).len(), 1);
    }
}
