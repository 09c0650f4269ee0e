//! PVH boot: puts a kernel, its command line and an optional initrd into guest memory and
//! describes them to the guest in `hvm_start_info`.
//!
//! PVH is the boot ABI Linux (`CONFIG_PVH`), Firecracker and Cloud Hypervisor use for ELF
//! kernels: the ELF carries a note (`XEN_ELFNOTE_PHYS32_ENTRY`) naming a 32-bit entry point,
//! and the VMM starts the boot vCPU there in protected mode with EBX pointing at
//! `hvm_start_info`. Ferry loads the ELF with `linux-loader` after checking its headers
//! itself, so that a bad kernel gets an error that says what is wrong with it.

mod elf;

use std::io::{Read, Seek};

use ferry_arch::layout::{
    self, MemoryKind, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MEMMAP_MAX_ENTRIES, MEMMAP_START,
    MODLIST_START, PAGE_SIZE, PVH_INFO_START,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_MEMMAP_TYPE_RAM,
    XEN_HVM_MEMMAP_TYPE_RESERVED, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

pub use elf::{read_headers, ElfError, KernelHeaders, Segment};

/// Errors loading a guest for PVH boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel's headers are not a loadable PVH ELF.
    #[error("the kernel is not usable")]
    Elf(#[from] ElfError),
    /// The ELF has no PVH entry note.
    #[error("the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); Ferry boots ELF kernels built with PVH support (Linux: CONFIG_PVH=y)")]
    NoPvhNote,
    /// A loadable segment does not fit in guest RAM above 1 MiB.
    #[error("the kernel's segment at {start:#x}..{end:#x} lies outside guest RAM above 1 MiB (RAM ends at {ram_end:#x})")]
    SegmentOutsideRam {
        /// Segment start (physical).
        start: u64,
        /// Segment end (physical, exclusive).
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// linux-loader failed to copy the kernel.
    #[error("cannot load the kernel into guest memory")]
    Load(#[source] linux_loader::loader::Error),
    /// The command line is too long.
    #[error("the command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line holds a NUL byte.
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    /// The initrd is larger than guest memory.
    #[error("the initrd ({size} bytes) is larger than guest memory ({mem_size} bytes)")]
    InitrdLargerThanMemory {
        /// Initrd size.
        size: u64,
        /// Guest memory size.
        mem_size: u64,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("the initrd ({size} bytes) does not fit in guest RAM between the kernel's end ({kernel_end:#x}) and {ram_end:#x}; give the VM more memory")]
    InitrdDoesNotFit {
        /// Initrd size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// Reading the initrd into guest memory failed.
    #[error("cannot read the initrd into guest memory")]
    ReadInitrd(#[source] vm_memory::GuestMemoryError),
    /// Writing a boot structure failed.
    #[error("cannot write the {what} to guest memory")]
    WriteBootData {
        /// Which structure.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// An initrd to load: any readable source and its exact size.
#[derive(Debug)]
pub struct Initrd<R> {
    /// Where to read it from.
    pub source: R,
    /// How many bytes to read.
    pub size: u64,
}

/// Where the guest was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// The PVH entry point.
    pub entry: GuestAddress,
    /// The address of `hvm_start_info` (EBX at entry).
    pub start_info: GuestAddress,
    /// First address after the kernel image.
    pub kernel_end: u64,
    /// Where the initrd was loaded and its size, if any.
    pub initrd: Option<(GuestAddress, u64)>,
}

fn write<T: vm_memory::ByteValued, M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    value: T,
    addr: u64,
) -> Result<(), Error> {
    mem.write_obj(value, GuestAddress(addr)).map_err(|source| Error::WriteBootData { what, source })
}

/// Points the `hvm_start_info` written by [`load_pvh`] at the ACPI RSDP at `rsdp` (the
/// guest then finds its ACPI tables without scanning the BIOS area).
pub fn set_rsdp<M: GuestMemoryBackend>(mem: &M, rsdp: GuestAddress) -> Result<(), Error> {
    let at = PVH_INFO_START + std::mem::offset_of!(hvm_start_info, rsdp_paddr) as u64;
    write(mem, "the ACPI RSDP address", rsdp.0, at)
}

/// Loads `kernel` (a PVH ELF), `cmdline` and `initrd` into `mem`, a guest of `mem_size`
/// bytes laid out by [`ferry_arch::layout`], and writes `hvm_start_info`.
pub fn load_pvh<M, K, I>(
    mem: &M,
    mem_size: u64,
    kernel: &mut K,
    cmdline: &str,
    initrd: Option<Initrd<I>>,
) -> Result<BootInfo, Error>
where
    M: GuestMemoryBackend,
    K: Read + ReadVolatile + Seek,
    I: Read + ReadVolatile,
{
    let low_end = layout::low_ram_end(mem_size);

    // Check the headers ourselves first: linux-loader's errors do not say which segment
    // is wrong, and it does not check segments against the layout.
    let headers = elf::read_headers(kernel)?;
    if headers.pvh_entry.is_none() {
        return Err(Error::NoPvhNote);
    }
    for seg in &headers.segments {
        if seg.start < HIMEM_START || seg.end > low_end {
            return Err(Error::SegmentOutsideRam { start: seg.start, end: seg.end, ram_end: low_end });
        }
    }

    // Command line.
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }

    let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(Error::Load)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr,
        _ => return Err(Error::NoPvhNote),
    };
    let kernel_end = loaded.kernel_end;

    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| Error::WriteBootData { what: "command line", source })?;

    // Initrd: as high as possible in low RAM, page aligned, like boot loaders do.
    let mut initrd_at = None;
    if let Some(mut initrd) = initrd {
        if initrd.size > mem_size {
            return Err(Error::InitrdLargerThanMemory { size: initrd.size, mem_size });
        }
        let kernel_top = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let start = low_end.checked_sub(initrd.size).map(|a| a & !(PAGE_SIZE - 1));
        let start = match start {
            Some(s) if s >= kernel_top => s,
            _ => return Err(Error::InitrdDoesNotFit { size: initrd.size, kernel_end, ram_end: low_end }),
        };
        let size = usize::try_from(initrd.size)
            .map_err(|_| Error::InitrdLargerThanMemory { size: initrd.size, mem_size })?;
        mem.read_exact_volatile_from(GuestAddress(start), &mut initrd.source, size)
            .map_err(Error::ReadInitrd)?;
        initrd_at = Some((GuestAddress(start), initrd.size));
    }

    // Memory map.
    let map = layout::memory_map(mem_size);
    debug_assert!(map.len() <= MEMMAP_MAX_ENTRIES);
    for (i, e) in map.iter().enumerate() {
        let type_ = match e.kind {
            MemoryKind::Ram => XEN_HVM_MEMMAP_TYPE_RAM,
            MemoryKind::Reserved => XEN_HVM_MEMMAP_TYPE_RESERVED,
        };
        let entry = hvm_memmap_table_entry { addr: e.start, size: e.len, type_, reserved: 0 };
        write(
            mem,
            "memory map",
            entry,
            MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
        )?;
    }

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd_at {
        let module = hvm_modlist_entry { paddr: addr.0, size, cmdline_paddr: 0, reserved: 0 };
        write(mem, "module list", module, MODLIST_START)?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_START;
    }
    write(mem, "start info", info, PVH_INFO_START)?;

    Ok(BootInfo { entry, start_info: GuestAddress(PVH_INFO_START), kernel_end, initrd: initrd_at })
}

pub mod testing;

#[cfg(test)]
mod tests;
