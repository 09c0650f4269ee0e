//! vCPU state at PVH entry.
//!
//! The PVH boot ABI starts the boot vCPU in 32-bit protected mode with paging off: flat
//! 4 GiB code and data segments, EBX holding the physical address of `hvm_start_info`,
//! interrupts off. Application processors are left to KVM, which holds them in the
//! wait-for-SIPI state as real hardware does.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};

/// Errors setting up a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the boot GDT or IDT to guest memory failed.
    #[error("cannot write the boot descriptor tables to guest memory")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
    /// A KVM vCPU ioctl failed.
    #[error("cannot set the vCPU's {what}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused one of the boot MSRs.
    #[error("KVM rejected boot MSR {0:#x}")]
    MsrRejected(u32),
    /// The MSR list could not be built.
    #[error("cannot build the boot MSR list")]
    MsrList,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Selectors of the boot GDT.
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

/// A descriptor in the boot GDT, described once and encoded both for guest memory and
/// for KVM's segment registers.
#[derive(Clone, Copy, Debug)]
struct Descriptor {
    selector: u16,
    /// Access byte type field (4 bits).
    type_: u8,
    /// Code/data (1) or system (0).
    s: u8,
    /// 32-bit default operand size.
    db: u8,
    /// Limit in 4 KiB units.
    g: u8,
    limit: u32,
}

const CODE32: Descriptor =
    Descriptor { selector: CODE_SELECTOR, type_: 0xb, s: 1, db: 1, g: 1, limit: 0xfffff };
const DATA32: Descriptor =
    Descriptor { selector: DATA_SELECTOR, type_: 0x3, s: 1, db: 1, g: 1, limit: 0xfffff };
const TSS32: Descriptor = Descriptor { selector: TSS_SELECTOR, type_: 0xb, s: 0, db: 0, g: 0, limit: 0x67 };

impl Descriptor {
    /// The 8-byte GDT encoding (base 0, present, DPL 0).
    fn encode(&self) -> u64 {
        let access = u64::from(self.type_) | (u64::from(self.s) << 4) | (1 << 7);
        let flags = (u64::from(self.db) << 2) | (u64::from(self.g) << 3);
        let limit = u64::from(self.limit);
        (limit & 0xffff) | (access << 40) | (((limit >> 16) & 0xf) << 48) | (flags << 52)
    }

    /// The segment register KVM loads from this descriptor.
    fn segment(&self) -> kvm_segment {
        let limit = if self.g == 1 { (self.limit << 12) | 0xfff } else { self.limit };
        kvm_segment {
            base: 0,
            limit,
            selector: self.selector,
            type_: self.type_,
            present: 1,
            dpl: 0,
            db: self.db,
            s: self.s,
            l: 0,
            g: self.g,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// Writes the boot GDT (null, null, code, data, TSS) and an empty IDT to guest memory.
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    let gdt = [0u64, 0, CODE32.encode(), DATA32.encode(), TSS32.encode()];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64)).map_err(Error::WriteTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(Error::WriteTables)?;
    Ok(())
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Sets the boot vCPU's registers for PVH entry at `entry` with `start_info` in EBX.
/// [`write_boot_tables`] must have been called on the guest's memory.
pub fn setup_pvh_registers(
    vcpu: &VcpuFd,
    entry: GuestAddress,
    start_info: GuestAddress,
) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    sregs.cs = CODE32.segment();
    let data = DATA32.segment();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = TSS32.segment();
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;

    let regs = kvm_regs { rip: entry.0, rbx: start_info.0, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(kvm("general registers"))?;
    Ok(())
}

/// Sets the FPU control state every x86 vCPU starts with (FNINIT values, MXCSR default).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

/// Sets the MSRs a freshly reset x86 CPU has after firmware: fast strings on, MTRRs on
/// with write-back as the default type, syscall MSRs cleared.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("boot MSRs"))?;
    if set != entries.len() {
        // KVM stops at the first MSR it rejects; report which one.
        return Err(Error::MsrRejected(entries[set].index));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Programs the local APIC's LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI,
/// as PC firmware leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = [reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8];
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_like_the_manual() {
        // Flat 32-bit ring-0 code and data segments, as every PC boot loader writes them.
        assert_eq!(CODE32.encode(), 0x00cf_9b00_0000_ffff);
        assert_eq!(DATA32.encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(TSS32.encode(), 0x0000_8b00_0000_0067);
        assert_eq!(CODE32.segment().limit, 0xffff_ffff);
        assert_eq!(TSS32.segment().limit, 0x67);
    }
}
