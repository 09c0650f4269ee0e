//! The tables are read back from guest memory and parsed here without `acpi_tables`: by
//! the offsets of the ACPI specification (6.5) and a small AML reader for the subset the
//! DSDT uses.

use ferry_arch::layout::{ACPI_SIZE, ACPI_START};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

/// The memory type the VMM uses.
type Memory = GuestMemoryMmap<AtomicBitmap>;

fn memory(size: usize) -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// `n` transports laid out as the VMM does: 4 KiB windows from 0xd000_0000, GSIs from 5.
fn devices(n: u32) -> Vec<MmioDevice> {
    (0..n)
        .map(|i| MmioDevice { base: 0xd000_0000 + u64::from(i) * 0x1000, len: 0x1000, gsi: 5 + i })
        .collect()
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read(mem: &Memory, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(addr)).expect("read guest memory");
    b
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Reads the table at `addr`: its header's length, the whole table, its checksum, and that
/// it lies in the ACPI area.
fn read_table(mem: &Memory, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let header = read(mem, addr, 36);
    assert_eq!(&header[0..4], signature, "table at {addr:#x}");
    let len = u32_at(&header, 4) as usize;
    assert!(len >= 36);
    assert!(addr >= ACPI_START && addr + len as u64 <= ACPI_START + ACPI_SIZE, "table outside the area");
    let table = read(mem, addr, len);
    assert_eq!(sum(&table), 0, "{} checksum", String::from_utf8_lossy(signature));
    assert_eq!(&table[10..16], &OEM_ID);
    table
}

#[derive(Debug)]
struct Parsed {
    /// (address, length) of RSDP, XSDT, FADT, MADT, DSDT.
    spans: Vec<(u64, usize)>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
}

fn parse(mem: &Memory, rsdp_addr: GuestAddress) -> Parsed {
    let rsdp = read(mem, rsdp_addr.0, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum (first 20 bytes)");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    let xsdt_addr = u64_at(&rsdp, 24);

    let xsdt = read_table(mem, xsdt_addr, b"XSDT");
    assert_eq!((xsdt.len() - 36) % 8, 0);
    let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|at| u64_at(&xsdt, at)).collect();
    assert_eq!(entries.len(), 2);
    let fadt = read_table(mem, entries[0], b"FACP");
    let madt = read_table(mem, entries[1], b"APIC");

    assert_eq!(fadt.len(), 276, "FADT of ACPI 6.x");
    assert_eq!(fadt[8], 6, "FADT major version");
    assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer unused");
    let dsdt_addr = u64_at(&fadt, 140);
    let dsdt = read_table(mem, dsdt_addr, b"DSDT");

    Parsed {
        spans: vec![
            (rsdp_addr.0, rsdp.len()),
            (xsdt_addr, xsdt.len()),
            (entries[0], fadt.len()),
            (entries[1], madt.len()),
            (dsdt_addr, dsdt.len()),
        ],
        fadt,
        madt,
        dsdt,
    }
}

fn check_fadt(fadt: &[u8]) {
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON: control method");
    assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON: control method");
    let iapc = u16_at(fadt, 109);
    assert_eq!(iapc, (1 << 2) | (1 << 3) | (1 << 4), "IAPC_BOOT_ARCH: no VGA, no MSI, no ASPM");
    assert_eq!(&fadt[268..276], b"FERRYVMM", "hypervisor vendor identity");
    assert_eq!(u64_at(fadt, 132), 0, "no FACS");
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Madt {
    /// (processor UID, APIC ID, flags)
    lapics: Vec<(u8, u8, u32)>,
    /// (id, address, GSI base)
    ioapics: Vec<(u8, u32, u32)>,
    /// (bus, source, GSI, flags)
    overrides: Vec<(u8, u8, u32, u16)>,
}

fn parse_madt(madt: &[u8]) -> Madt {
    assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
    let mut out = Madt::default();
    let mut at = 44;
    while at < madt.len() {
        let (ty, len) = (madt[at], madt[at + 1] as usize);
        assert!(len >= 2 && at + len <= madt.len(), "MADT structure at {at} overruns");
        let s = &madt[at..at + len];
        match ty {
            0 => {
                assert_eq!(len, 8);
                out.lapics.push((s[2], s[3], u32_at(s, 4)));
            }
            1 => {
                assert_eq!(len, 12);
                out.ioapics.push((s[2], u32_at(s, 4), u32_at(s, 8)));
            }
            2 => {
                assert_eq!(len, 10);
                out.overrides.push((s[2], s[3], u32_at(s, 4), u16_at(s, 8)));
            }
            _ => panic!("unexpected MADT structure type {ty}"),
        }
        at += len;
    }
    assert_eq!(at, madt.len());
    out
}

/// One `Device` of the DSDT, as read by [`parse_dsdt`].
#[derive(Debug, PartialEq, Eq)]
struct AmlDevice {
    name: String,
    hid: String,
    uid: u64,
    /// The `_CRS` buffer's bytes.
    crs: Vec<u8>,
}

/// Decodes a PkgLength at `at`: (the length it encodes, which counts itself; its size).
fn pkg_length(b: &[u8], at: usize) -> (usize, usize) {
    let lead = b[at];
    let follow = (lead >> 6) as usize;
    if follow == 0 {
        return ((lead & 0x3f) as usize, 1);
    }
    let mut len = (lead & 0x0f) as usize;
    for i in 0..follow {
        len |= (b[at + 1 + i] as usize) << (4 + 8 * i);
    }
    (len, follow + 1)
}

/// Decodes an integer term at `at`: (value, size).
fn integer(b: &[u8], at: usize) -> (u64, usize) {
    match b[at] {
        0x00 => (0, 1),
        0x01 => (1, 1),
        0x0a => (u64::from(b[at + 1]), 2),
        0x0b => (u64::from(u16_at(b, at + 1)), 3),
        0x0c => (u64::from(u32_at(b, at + 1)), 5),
        0x0e => (u64_at(b, at + 1), 9),
        op => panic!("not an integer: opcode {op:#x} at {at}"),
    }
}

/// Reads the DSDT: exactly `Scope (\_SB_) { Device (...) { Name (...) ... } ... }`.
fn parse_dsdt(dsdt: &[u8]) -> Vec<AmlDevice> {
    assert_eq!(dsdt[36], 0x10, "ScopeOp");
    let (scope_len, n) = pkg_length(dsdt, 37);
    assert_eq!(37 + scope_len, dsdt.len(), "the scope is the whole table");
    let mut at = 37 + n;
    assert_eq!(&dsdt[at..at + 5], b"\\_SB_");
    at += 5;
    let mut devices = Vec::new();
    while at < dsdt.len() {
        assert_eq!(&dsdt[at..at + 2], &[0x5b, 0x82], "DeviceOp at {at}");
        let (dev_len, n) = pkg_length(dsdt, at + 2);
        let end = at + 2 + dev_len;
        let name = String::from_utf8(dsdt[at + 2 + n..at + 2 + n + 4].to_vec()).expect("name");
        let mut p = at + 2 + n + 4;
        let (mut hid, mut uid, mut crs) = (None, None, None);
        while p < end {
            assert_eq!(dsdt[p], 0x08, "NameOp at {p}");
            let field = &dsdt[p + 1..p + 5];
            p += 5;
            match field {
                b"_HID" => {
                    assert_eq!(dsdt[p], 0x0d, "StringPrefix");
                    let nul = dsdt[p + 1..].iter().position(|&c| c == 0).expect("NUL") + p + 1;
                    hid = Some(String::from_utf8(dsdt[p + 1..nul].to_vec()).expect("HID"));
                    p = nul + 1;
                }
                b"_UID" => {
                    let (v, n) = integer(dsdt, p);
                    uid = Some(v);
                    p += n;
                }
                b"_CRS" => {
                    assert_eq!(dsdt[p], 0x11, "BufferOp");
                    let (buf_len, n) = pkg_length(dsdt, p + 1);
                    let buf_end = p + 1 + buf_len;
                    let (size, m) = integer(dsdt, p + 1 + n);
                    let data = dsdt[p + 1 + n + m..buf_end].to_vec();
                    assert_eq!(size as usize, data.len(), "buffer size");
                    crs = Some(data);
                    p = buf_end;
                }
                other => panic!("unexpected name {}", String::from_utf8_lossy(other)),
            }
        }
        assert_eq!(p, end, "device {name} ends where its PkgLength says");
        devices.push(AmlDevice {
            name,
            hid: hid.expect("_HID"),
            uid: uid.expect("_UID"),
            crs: crs.expect("_CRS"),
        });
        at = end;
    }
    devices
}

/// The resource template a device must have: Memory32Fixed (ReadWrite, base, len),
/// Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }, EndTag.
fn expected_crs(d: &MmioDevice) -> Vec<u8> {
    let mut crs = vec![0x86, 9, 0, 1];
    crs.extend_from_slice(&(d.base as u32).to_le_bytes());
    crs.extend_from_slice(&(d.len as u32).to_le_bytes());
    crs.extend_from_slice(&[0x89, 6, 0, 0b0011, 1]);
    crs.extend_from_slice(&d.gsi.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0]);
    crs
}

/// Writes the tables for `vcpus` and `devs` into a 16 MiB guest and checks all of them.
fn write_and_check(vcpus: u8, devs: &[MmioDevice]) -> Parsed {
    let mem = memory(16 << 20);
    let rsdp = write_tables(&mem, vcpus, devs).expect("write tables");
    assert_eq!(rsdp, GuestAddress(ACPI_START));
    assert_eq!(rsdp.0 % 16, 0);
    let parsed = parse(&mem, rsdp);

    check_fadt(&parsed.fadt);

    let madt = parse_madt(&parsed.madt);
    let n = usize::from(vcpus);
    assert_eq!(madt.lapics.len(), n);
    for (i, lapic) in madt.lapics.iter().enumerate() {
        assert_eq!(*lapic, (i as u8, i as u8, 1), "local APIC {i}: UID, APIC ID, enabled");
    }
    assert_eq!(madt.ioapics, vec![(0, 0xfec0_0000, 0)]);
    assert_eq!(madt.overrides, vec![(0, 0, 2, 0)], "ISA IRQ 0 -> GSI 2, conforming");
    assert_eq!(parsed.madt.len(), 44 + 8 * n + 12 + 10);

    let dsdt = &parsed.dsdt;
    assert_eq!(count(dsdt, b"LNRO0005"), devs.len());
    for d in devs {
        assert_eq!(count(dsdt, &(d.base as u32).to_le_bytes()), 1, "base {:#x} once", d.base);
    }
    let parsed_devices = parse_dsdt(dsdt);
    assert_eq!(parsed_devices.len(), devs.len());
    for (i, (got, d)) in parsed_devices.iter().zip(devs).enumerate() {
        assert_eq!(got.name, format!("V{i:03X}"));
        assert_eq!(got.hid, "LNRO0005");
        assert_eq!(got.uid, i as u64);
        assert_eq!(got.crs, expected_crs(d), "device {i} _CRS");
        assert_eq!(count(dsdt, &expected_crs(d)[..12]), 1, "Memory32Fixed of device {i}");
    }

    // The tables do not overlap, and everything after the last is zero.
    let mut spans = parsed.spans.clone();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].0 + w[0].1 as u64 <= w[1].0, "tables overlap: {w:?}");
    }
    let (last, len) = spans[spans.len() - 1];
    let tail_start = last + len as u64;
    let tail = read(&mem, tail_start, (ACPI_START + ACPI_SIZE - tail_start) as usize);
    assert!(tail.iter().all(|&b| b == 0));

    parsed
}

#[test]
fn tables_for_1_and_4_vcpus_and_0_1_3_devices() {
    for vcpus in [1, 4] {
        for n in [0, 1, 3] {
            write_and_check(vcpus, &devices(n));
        }
    }
}

#[test]
fn the_largest_valid_configuration_fits_with_room_to_spare() {
    // 255 vCPUs and a device on each of the IOAPIC's 24 pins is as big as valid input gets.
    let devs: Vec<MmioDevice> = (0..IOAPIC_PINS)
        .map(|i| MmioDevice { base: 0xd000_0000 + u64::from(i) * 0x1000, len: 0x1000, gsi: i })
        .collect();
    let parsed = write_and_check(255, &devs);
    let end = parsed.spans.iter().map(|(a, l)| a + *l as u64).max().expect("tables");
    assert!(end - ACPI_START < ACPI_SIZE / 4, "{} bytes", end - ACPI_START);
}

#[test]
fn a_guest_scanning_the_bios_area_finds_the_rsdp() {
    let mem = memory(16 << 20);
    let rsdp = write_tables(&mem, 2, &devices(2)).expect("write tables");
    let area = read(&mem, 0xe_0000, 0x2_0000);
    let found = (0..area.len())
        .step_by(16)
        .find(|&at| &area[at..at + 8] == b"RSD PTR " && sum(&area[at..at + 20]) == 0)
        .map(|at| 0xe_0000 + at as u64);
    assert_eq!(found, Some(rsdp.0));
}

#[test]
fn writing_twice_gives_the_same_bytes() {
    let mem = memory(16 << 20);
    write_tables(&mem, 4, &devices(3)).expect("first");
    let first = read(&mem, ACPI_START, ACPI_SIZE as usize);
    // Different tables in between leave nothing behind.
    write_tables(&mem, 255, &devices(16)).expect("bigger");
    write_tables(&mem, 4, &devices(3)).expect("again");
    assert_eq!(read(&mem, ACPI_START, ACPI_SIZE as usize), first);
}

fn assert_untouched_on_error(vcpus: u8, devs: &[MmioDevice]) -> Error {
    let mem = memory(16 << 20);
    let fill = vec![0xaa; ACPI_SIZE as usize];
    mem.write_slice(&fill, GuestAddress(ACPI_START)).expect("fill");
    let err = write_tables(&mem, vcpus, devs).expect_err("must fail");
    assert_eq!(read(&mem, ACPI_START, ACPI_SIZE as usize), fill, "nothing written on error");
    err
}

#[test]
fn invalid_configurations_are_errors() {
    assert!(matches!(assert_untouched_on_error(0, &[]), Error::NoVcpus));

    let mut devs = devices(2);
    devs[1].base = 0xffff_f800; // the 4 KiB window crosses 4 GiB
    assert!(matches!(assert_untouched_on_error(1, &devs), Error::DeviceWindow { index: 1, .. }));
    devs[1].base = 1 << 32;
    assert!(matches!(assert_untouched_on_error(1, &devs), Error::DeviceWindow { index: 1, .. }));
    devs[1].base = u64::MAX;
    assert!(matches!(assert_untouched_on_error(1, &devs), Error::DeviceWindow { index: 1, .. }));
    let mut devs = devices(1);
    devs[0].len = 0;
    assert!(matches!(assert_untouched_on_error(1, &devs), Error::DeviceWindow { index: 0, .. }));

    let mut devs = devices(3);
    devs[2].gsi = IOAPIC_PINS;
    assert!(matches!(assert_untouched_on_error(1, &devs), Error::DeviceGsi { index: 2, gsi: 24 }));
    devs[2].gsi = u32::MAX;
    assert!(matches!(assert_untouched_on_error(1, &devs), Error::DeviceGsi { index: 2, .. }));
    devs[2].gsi = devs[0].gsi;
    assert!(matches!(assert_untouched_on_error(1, &devs), Error::SharedGsi { first: 0, second: 2, gsi: 5 }));

    // A window ending exactly at 4 GiB is fine.
    let devs = [MmioDevice { base: 0xffff_f000, len: 0x1000, gsi: 5 }];
    write_and_check(1, &devs);
}

#[test]
fn too_many_devices_is_an_error() {
    // More transports than IOAPIC pins: the 25th has no GSI of its own.
    let devs: Vec<MmioDevice> = (0..=IOAPIC_PINS)
        .map(|i| MmioDevice { base: 0xd000_0000 + u64::from(i) * 0x1000, len: 0x1000, gsi: i })
        .collect();
    assert!(matches!(assert_untouched_on_error(255, &devs), Error::DeviceGsi { index: 24, gsi: 24 }));
    // More than the DSDT can name.
    let devs = vec![MmioDevice { base: 0xd000_0000, len: 0x1000, gsi: 5 }; MAX_DEVICES + 1];
    assert!(matches!(
        assert_untouched_on_error(1, &devs),
        Error::TooManyDevices { count: 0x1001, max: MAX_DEVICES }
    ));
}

#[test]
fn tables_larger_than_the_area_are_an_error() {
    // Valid input cannot outgrow the real area (see above), so shrink it.
    let small = 1024;
    let err = build(ACPI_START, small, 255, &devices(3)).expect_err("255 vCPUs need 2 KiB of MADT");
    match err {
        Error::TooLarge { vcpus: 255, devices: 3, size, start: ACPI_START, max } => {
            assert!(size > max);
            assert_eq!(max, small);
        }
        other => panic!("unexpected {other:?}"),
    }
    let fits = build(ACPI_START, small, 8, &devices(3)).expect("8 vCPUs fit in 1 KiB");
    assert_eq!(fits.len(), small);
    let err = build(ACPI_START, 700, 1, &devices(19)).expect_err("19 devices need more than 700 bytes");
    assert!(matches!(err, Error::TooLarge { vcpus: 1, devices: 19, .. }), "{err}");
}

#[test]
fn memory_without_the_area_is_an_error() {
    let mem = memory(512 << 10);
    let err = write_tables(&mem, 1, &devices(1)).expect_err("the area is not RAM");
    assert!(matches!(err, Error::AreaNotInMemory { start: ACPI_START, end: 0xf_0000 }), "{err}");
    // Half the area: nothing is written to that half either.
    let mem = memory(0xe_8000);
    let fill = vec![0xaa; 0x8000];
    mem.write_slice(&fill, GuestAddress(ACPI_START)).expect("fill");
    let err = write_tables(&mem, 1, &devices(1)).expect_err("half the area is not RAM");
    assert!(matches!(err, Error::AreaNotInMemory { .. }), "{err}");
    assert_eq!(read(&mem, ACPI_START, 0x8000), fill);
}

#[test]
fn the_area_sits_in_the_reserved_bios_range() {
    use ferry_arch::layout::{memory_map, MemoryKind};
    let map = memory_map(16 << 20);
    assert!(map.iter().any(|e| e.kind == MemoryKind::Reserved
        && e.start <= ACPI_START
        && ACPI_START + ACPI_SIZE <= e.start + e.len));
}
