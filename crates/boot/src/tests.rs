use std::io::Cursor;

use vm_memory::{GuestMemoryMmap, GuestAddress};

use super::*;

/// Builds a minimal ELF64 x86-64 executable with one PT_LOAD segment at `paddr` holding
/// `code`, and, if `pvh_entry` is given, a PT_NOTE with the Xen PVH entry note.
fn make_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let phoff = 64u64;
    let data_off = phoff + 56 * u64::from(phnum);
    let note_off = data_off + code.len() as u64;
    let mut f = vec![0u8; 64];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&phoff.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let phdr = |ty: u32, off: u64, addr: u64, size: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&ty.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&size.to_le_bytes());
        p[40..48].copy_from_slice(&size.to_le_bytes());
        p
    };
    f.extend(phdr(1, data_off, paddr, code.len() as u64));
    let mut note = Vec::new();
    if let Some(entry) = pvh_entry {
        note.extend(4u32.to_le_bytes()); // namesz
        note.extend(4u32.to_le_bytes()); // descsz
        note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend(b"Xen\0");
        note.extend(entry.to_le_bytes());
        f.extend(phdr(4, note_off, 0, note.len() as u64));
    }
    f.extend_from_slice(code);
    f.extend(note);
    f
}

fn memory(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        layout::ram_ranges(size).into_iter().map(|(a, l)| (a, l as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

const NO_INITRD: Option<Initrd<&[u8]>> = None;

#[test]
fn loads_a_pvh_elf_and_writes_start_info() {
    let mem = memory(64 << 20);
    let elf = make_elf(0x10_0000, &[0xf4; 16], Some(0x10_0000));
    let initrd_data = vec![0xabu8; 10_000];
    let info = load_pvh(
        &mem,
        64 << 20,
        &mut Cursor::new(&elf),
        "wss=1M seed=3",
        Some(Initrd { source: &initrd_data[..], size: initrd_data.len() as u64 }),
    )
    .expect("load");
    assert_eq!(info.entry, GuestAddress(0x10_0000));
    assert_eq!(info.kernel_end, 0x10_0010);
    let (initrd_addr, initrd_size) = info.initrd.expect("initrd");
    assert_eq!(initrd_size, 10_000);
    assert_eq!(initrd_addr.0 % PAGE_SIZE, 0);
    assert!(initrd_addr.0 + initrd_size <= 64 << 20);
    let mut buf = vec![0u8; 10_000];
    mem.read_slice(&mut buf, initrd_addr).expect("read");
    assert_eq!(buf, initrd_data);

    let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("start info");
    assert_eq!(start.magic, XEN_HVM_START_MAGIC_VALUE);
    assert_eq!(start.nr_modules, 1);
    assert_eq!(start.memmap_entries, 3);
    let module: hvm_modlist_entry = mem.read_obj(GuestAddress(start.modlist_paddr)).expect("module");
    assert_eq!((module.paddr, module.size), (initrd_addr.0, 10_000));
    let mut cmd = [0u8; 14];
    mem.read_slice(&mut cmd, GuestAddress(start.cmdline_paddr)).expect("cmdline");
    assert_eq!(&cmd, b"wss=1M seed=3\0");
    let mut code = [0u8; 16];
    mem.read_slice(&mut code, GuestAddress(0x10_0000)).expect("code");
    assert_eq!(code, [0xf4; 16]);
}

#[test]
fn rejects_non_elf() {
    let mem = memory(32 << 20);
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(b"hello, not an elf file at all, but long enough to read a header from it ok".to_vec()), "", NO_INITRD)
        .expect_err("not elf");
    assert!(matches!(err, Error::Elf(ElfError::NotElf)), "{err:?}");
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(b"tiny".to_vec()), "", NO_INITRD).expect_err("short");
    assert!(matches!(err, Error::Elf(ElfError::NotElf)), "{err:?}");
    let mut elf = make_elf(0x10_0000, &[0x90], Some(0x10_0000));
    elf.truncate(40);
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(elf), "", NO_INITRD).expect_err("truncated");
    assert!(matches!(err, Error::Elf(ElfError::Truncated)), "{err:?}");
}

#[test]
fn rejects_elf_without_pvh_note() {
    let mem = memory(32 << 20);
    let elf = make_elf(0x10_0000, &[0x90], None);
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(elf), "", NO_INITRD).expect_err("no note");
    assert!(matches!(err, Error::NoPvhNote), "{err:?}");
}

#[test]
fn rejects_segments_outside_ram() {
    let mem = memory(32 << 20);
    let low = make_elf(0x8000, &[0x90], Some(0x8000));
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(low), "", NO_INITRD).expect_err("low");
    assert!(matches!(err, Error::SegmentOutsideRam { start: 0x8000, .. }), "{err:?}");
    let high = make_elf(64 << 20, &[0x90], Some(64 << 20));
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(high), "", NO_INITRD).expect_err("high");
    assert!(matches!(err, Error::SegmentOutsideRam { .. }), "{err:?}");
}

#[test]
fn rejects_initrd_that_does_not_fit() {
    let mem = memory(32 << 20);
    let elf = make_elf(0x10_0000, &[0x90], Some(0x10_0000));
    let big = vec![0u8; 33 << 20];
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(&elf), "", Some(Initrd { source: &big[..], size: big.len() as u64 }))
        .expect_err("too big");
    assert!(matches!(err, Error::InitrdLargerThanMemory { .. }), "{err:?}");
    let almost = vec![0u8; 31 << 20];
    let err = load_pvh(&mem, 32 << 20, &mut Cursor::new(&elf), "", Some(Initrd { source: &almost[..], size: almost.len() as u64 }))
        .expect_err("does not fit");
    assert!(matches!(err, Error::InitrdDoesNotFit { .. }), "{err:?}");
}

#[test]
fn rejects_bad_cmdline() {
    let mem = memory(32 << 20);
    let elf = make_elf(0x10_0000, &[0x90], Some(0x10_0000));
    let long = "x".repeat(CMDLINE_MAX_SIZE);
    assert!(matches!(load_pvh(&mem, 32 << 20, &mut Cursor::new(&elf), &long, NO_INITRD), Err(Error::CmdlineTooLong { .. })));
    assert!(matches!(load_pvh(&mem, 32 << 20, &mut Cursor::new(&elf), "a\0b", NO_INITRD), Err(Error::CmdlineNul)));
}
