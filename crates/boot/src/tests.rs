use std::io::Cursor;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::testing::make_elf;

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
    let err = load_pvh(
        &mem,
        32 << 20,
        &mut Cursor::new(
            b"hello, not an elf file at all, but long enough to read a header from it ok".to_vec(),
        ),
        "",
        NO_INITRD,
    )
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
    let err = load_pvh(
        &mem,
        32 << 20,
        &mut Cursor::new(&elf),
        "",
        Some(Initrd { source: &big[..], size: big.len() as u64 }),
    )
    .expect_err("too big");
    assert!(matches!(err, Error::InitrdLargerThanMemory { .. }), "{err:?}");
    let almost = vec![0u8; 31 << 20];
    let err = load_pvh(
        &mem,
        32 << 20,
        &mut Cursor::new(&elf),
        "",
        Some(Initrd { source: &almost[..], size: almost.len() as u64 }),
    )
    .expect_err("does not fit");
    assert!(matches!(err, Error::InitrdDoesNotFit { .. }), "{err:?}");
}

#[test]
fn rejects_bad_cmdline() {
    let mem = memory(32 << 20);
    let elf = make_elf(0x10_0000, &[0x90], Some(0x10_0000));
    let long = "x".repeat(CMDLINE_MAX_SIZE);
    assert!(matches!(
        load_pvh(&mem, 32 << 20, &mut Cursor::new(&elf), &long, NO_INITRD),
        Err(Error::CmdlineTooLong { .. })
    ));
    assert!(matches!(
        load_pvh(&mem, 32 << 20, &mut Cursor::new(&elf), "a\0b", NO_INITRD),
        Err(Error::CmdlineNul)
    ));
}

#[test]
fn rsdp_address_goes_into_start_info() {
    let mem = memory(64 << 20);
    let elf = make_elf(0x10_0000, &[0xf4; 16], Some(0x10_0000));
    load_pvh(&mem, 64 << 20, &mut Cursor::new(&elf), "", NO_INITRD).expect("load");
    let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("start info");
    assert_eq!(start.rsdp_paddr, 0);
    set_rsdp(&mem, GuestAddress(0xe_0000)).expect("rsdp");
    let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("start info");
    assert_eq!(start.rsdp_paddr, 0xe_0000);
    assert_eq!(start.magic, XEN_HVM_START_MAGIC_VALUE, "nothing else changed");
}
