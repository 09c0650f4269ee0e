//! The guest's ACPI tables, built with rust-vmm's `acpi_tables`.
//!
//! A Ferry guest has no firmware, so the VMM writes the tables a kernel reads at boot:
//!
//! - the RSDP (revision 2), pointing at
//! - the XSDT, listing
//! - the FADT, with the hardware-reduced ACPI flag set (no PM timer, no SCI, no fixed
//!   power button or sleep registers, no legacy PIC or PIT for Linux, as in Firecracker and
//!   Cloud Hypervisor), whose `X_DSDT` points at
//! - the DSDT, which declares one device per virtio-mmio transport under `\_SB`
//!   (`_HID "LNRO0005"`, `_UID` its index, `_CRS` its window and its interrupt), so that a
//!   stock Linux finds the transports through ACPI, without
//!   `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` and `virtio_mmio.device=` arguments;
//! - and the MADT: one enabled local APIC per vCPU (APIC IDs 0..n-1, as KVM numbers them),
//!   the IOAPIC at [`IOAPIC_ADDR`] serving GSIs 0..[`IOAPIC_PINS`], and the PC's interrupt
//!   source override of ISA IRQ 0 (the timer) onto GSI 2.
//!
//! Everything goes into one area of guest memory, [`ferry_arch::layout::ACPI_START`]
//! (0xe_0000) for [`ferry_arch::layout::ACPI_SIZE`] bytes (64 KiB), inside the BIOS range the
//! memory map reserves. The RSDP comes first, so it is where a guest scanning
//! 0xe_0000..0x10_0000 looks; PVH guests can also be given its address in
//! `hvm_start_info.rsdp_paddr`. The other tables follow it, 16-byte aligned, in the order
//! XSDT, FADT, MADT, DSDT. The whole area is written in one go, padded with zeros, so the
//! result does not depend on what was there before, and nothing is written when the tables
//! cannot be built.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use ferry_arch::layout::{ACPI_SIZE, ACPI_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// OEM ID in every table.
pub const OEM_ID: [u8; 6] = *b"FERRY ";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity, which tells the guest what it runs on.
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"FERRYVMM";
/// Guest-physical address of the local APICs (the x86 default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Guest-physical address of the IOAPIC (KVM's in-kernel IOAPIC, the x86 default).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Pins of KVM's IOAPIC: the GSIs the MADT declares are 0..IOAPIC_PINS.
pub const IOAPIC_PINS: u32 = 24;
/// `_HID` of a virtio-mmio transport, which Linux's virtio_mmio driver matches.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Most virtio-mmio devices the DSDT can name (`V000`..`VFFF`). Fewer fit in practice: each
/// needs its own GSI.
pub const MAX_DEVICES: usize = 0x1000;

/// IA-PC boot architecture flags in the FADT: no VGA (bit 2), no MSI (bit 3), and the OS must
/// not enable PCIe ASPM (bit 4). The 8042 bit (1) is clear: the guest's i8042 does nothing but
/// reset, so Linux need not probe it (`reboot=k` still works, it writes the port directly),
/// and neither are "legacy devices" (bit 0) present.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);
/// Revision of the MADT (ACPI 6.5).
const MADT_REVISION: u8 = 6;
/// Revision of the DSDT: 2 and above make AML integers 64-bit.
const DSDT_REVISION: u8 = 2;
/// Length of the RSDP (revision 2).
const RSDP_LEN: usize = 36;
/// Length of a standard table header.
const HEADER_LEN: usize = 36;
/// Tables in the XSDT: FADT and MADT (the DSDT hangs off the FADT).
const XSDT_ENTRIES: usize = 2;
/// Length of the XSDT.
const XSDT_LEN: usize = HEADER_LEN + 8 * XSDT_ENTRIES;
/// Length of the MADT's fixed part: header, local APIC address, flags.
const MADT_HEADER_LEN: usize = HEADER_LEN + 8;
/// Alignment of each table in the area.
const TABLE_ALIGN: usize = 16;

/// MADT structure type of an interrupt source override.
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// Length of an interrupt source override.
const INTERRUPT_SOURCE_OVERRIDE_LEN: u8 = 10;
/// ISA IRQ of the PC timer (PIT channel 0)...
const TIMER_ISA_IRQ: u8 = 0;
/// ...and the GSI it is wired to on a PC.
const TIMER_GSI: u32 = 2;

// The RSDP must be 16-byte aligned in 0xe_0000..0x10_0000 for a scanning guest to find it,
// and the area must stay inside the BIOS range the memory map reserves.
const _: () = assert!(
    ACPI_START % 16 == 0
        && ACPI_START >= 0xe_0000
        && ACPI_START >= ferry_arch::layout::EBDA_START
        && ACPI_START + ACPI_SIZE <= ferry_arch::layout::HIMEM_START
);

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More devices than the DSDT can name.
    #[error("{count} virtio-mmio devices; the DSDT names at most {max}")]
    TooManyDevices {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A device window is empty or does not lie below 4 GiB (`Memory32Fixed` is 32-bit).
    #[error(
        "virtio-mmio device {index}: its window {base:#x} (+{len:#x}) must be non-empty and below 4 GiB"
    )]
    DeviceWindow {
        /// The device's position.
        index: usize,
        /// Its base address.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A device GSI is not a pin of the IOAPIC.
    #[error("virtio-mmio device {index}: GSI {gsi} is not an IOAPIC pin (0..{IOAPIC_PINS})")]
    DeviceGsi {
        /// The device's position.
        index: usize,
        /// Its GSI.
        gsi: u32,
    },
    /// Two devices have the same GSI, which the DSDT declares exclusive.
    #[error("virtio-mmio devices {first} and {second} both use GSI {gsi}")]
    SharedGsi {
        /// The first device with it.
        first: usize,
        /// The second.
        second: usize,
        /// The GSI.
        gsi: u32,
    },
    /// The tables do not fit in the area reserved for them.
    #[error("the ACPI tables for {vcpus} vCPUs and {devices} devices take {size} bytes; the area at {start:#x} holds {max}")]
    TooLarge {
        /// vCPUs asked for.
        vcpus: u8,
        /// Devices asked for.
        devices: usize,
        /// Bytes the tables need.
        size: usize,
        /// Start of the area.
        start: u64,
        /// Its size.
        max: usize,
    },
    /// Guest memory does not cover the area.
    #[error("guest memory does not cover the ACPI area {start:#x}..{end:#x}")]
    AreaNotInMemory {
        /// Start of the area.
        start: u64,
        /// Its end (exclusive).
        end: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write the ACPI tables to guest memory at {addr:#x}")]
    Write {
        /// Start of the area.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A virtio-mmio transport to declare in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its register window (below 4 GiB).
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// Its interrupt: an IOAPIC pin, edge-triggered, active high, not shared.
    pub gsi: u32,
}

/// Writes the ACPI tables for `vcpus` vCPUs and the virtio-mmio `devices` (declared in this
/// order, `_UID` = position) into `mem`, in the area at
/// [`ferry_arch::layout::ACPI_START`], and returns the RSDP's address (for PVH's
/// `hvm_start_info.rsdp_paddr`). On error nothing has been written.
pub fn write_tables<M: GuestMemoryBackend>(
    mem: &M,
    vcpus: u8,
    devices: &[MmioDevice],
) -> Result<GuestAddress, Error> {
    let max = usize::try_from(ACPI_SIZE).unwrap_or(usize::MAX);
    let image = build(ACPI_START, max, vcpus, devices)?;
    if !mem.check_range(GuestAddress(ACPI_START), image.len()) {
        return Err(Error::AreaNotInMemory { start: ACPI_START, end: ACPI_START + ACPI_SIZE });
    }
    mem.write_slice(&image, GuestAddress(ACPI_START))
        .map_err(|source| Error::Write { addr: ACPI_START, source })?;
    Ok(GuestAddress(ACPI_START))
}

/// Builds the area's contents, `max` bytes for guest address `start`: the RSDP at its
/// start, the other tables after it, zeros after them.
fn build(start: u64, max: usize, vcpus: u8, devices: &[MmioDevice]) -> Result<Vec<u8>, Error> {
    if vcpus == 0 {
        return Err(Error::NoVcpus);
    }
    check_devices(devices)?;

    let madt = madt(vcpus);
    let dsdt = dsdt(devices);
    let xsdt_at = align(RSDP_LEN);
    let fadt_at = align(xsdt_at + XSDT_LEN);
    let madt_at = align(fadt_at + FADT::len());
    let dsdt_at = align(madt_at + madt.len());
    let size = dsdt_at + dsdt.len();
    if size > max {
        return Err(Error::TooLarge { vcpus, devices: devices.len(), size, start, max });
    }
    let addr = |offset: usize| start + offset as u64;

    let mut fadt = FADTBuilder::new(OEM_ID, *b"FERRFACP", OEM_REVISION)
        .dsdt_64(addr(dsdt_at))
        .flag(Flags::HwReducedAcpi)
        // Set, these two say the buttons are not fixed-feature hardware (there is none).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    let fadt = fadt.finalize();

    let mut xsdt = XSDT::new(OEM_ID, *b"FERRXSDT", OEM_REVISION);
    xsdt.add_entry(addr(fadt_at));
    xsdt.add_entry(addr(madt_at));

    let rsdp = Rsdp::new(OEM_ID, addr(xsdt_at));

    let mut image = vec![0u8; max];
    for (at, table) in [
        (0, aml_bytes(&rsdp)),
        (xsdt_at, aml_bytes(&xsdt)),
        (fadt_at, aml_bytes(&fadt)),
        (madt_at, madt),
        (dsdt_at, dsdt),
    ] {
        image[at..at + table.len()].copy_from_slice(&table);
    }
    Ok(image)
}

fn check_devices(devices: &[MmioDevice]) -> Result<(), Error> {
    if devices.len() > MAX_DEVICES {
        return Err(Error::TooManyDevices { count: devices.len(), max: MAX_DEVICES });
    }
    let mut gsi_user = [None; IOAPIC_PINS as usize];
    for (index, d) in devices.iter().enumerate() {
        let end = d.base.checked_add(d.len);
        if d.len == 0 || end.is_none_or(|end| end > 1 << 32) {
            return Err(Error::DeviceWindow { index, base: d.base, len: d.len });
        }
        let user = usize::try_from(d.gsi)
            .ok()
            .and_then(|pin| gsi_user.get_mut(pin))
            .ok_or(Error::DeviceGsi { index, gsi: d.gsi })?;
        if let Some(first) = *user {
            return Err(Error::SharedGsi { first, second: index, gsi: d.gsi });
        }
        *user = Some(index);
    }
    Ok(())
}

/// The MADT: local APICs 0..vcpus, the IOAPIC, the timer's override.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt =
        Sdt::new(*b"APIC", MADT_HEADER_LEN as u32, MADT_REVISION, OEM_ID, *b"FERRAPIC", OEM_REVISION);
    madt.write_u32(HEADER_LEN, LAPIC_ADDR);
    // Flags: PCAT_COMPAT clear. In hardware-reduced mode the guest ignores the 8259s anyway.
    madt.write_u32(HEADER_LEN + 4, 0);
    for id in 0..vcpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(id, id, EnabledStatus::Enabled)));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(0, IOAPIC_ADDR, 0)));
    // `acpi_tables` has no interrupt source override structure; its layout (ACPI 6.5,
    // 5.2.12.5) is type, length, bus (0: ISA), source IRQ, GSI (u32), MPS INTI flags (u16;
    // 0: "conforms to the bus", which for ISA is edge-triggered, active high).
    let mut iso = vec![MADT_INTERRUPT_SOURCE_OVERRIDE, INTERRUPT_SOURCE_OVERRIDE_LEN, 0, TIMER_ISA_IRQ];
    iso.extend_from_slice(&TIMER_GSI.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    madt.append_slice(&iso);
    madt.as_slice().to_vec()
}

/// The DSDT: `Scope (\_SB) { Device (Vnnn) { ... } ... }`, one device per transport.
/// `check_devices` has checked that every name and value fits.
fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    for (index, d) in devices.iter().enumerate() {
        let name = format!("V{index:03X}");
        let index_u32 = index as u32;
        let window = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
        // Consumer, edge-triggered, active high, exclusive.
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
        let uid = aml::Name::new("_UID".into(), &index_u32);
        let crs = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
    }
    let mut dsdt = Sdt::new(*b"DSDT", HEADER_LEN as u32, DSDT_REVISION, OEM_ID, *b"FERRDSDT", OEM_REVISION);
    dsdt.append_slice(&aml::Scope::raw("\\_SB_".into(), body));
    dsdt.as_slice().to_vec()
}

fn aml_bytes(value: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    value.to_aml_bytes(&mut bytes);
    bytes
}

fn align(offset: usize) -> usize {
    offset.next_multiple_of(TABLE_ALIGN)
}

#[cfg(test)]
mod tests;
