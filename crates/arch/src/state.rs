//! The saved state of an x86 vCPU and of a VM's in-kernel devices.
//!
//! Every field is KVM's own structure for that state (a stable kernel ABI), so a state saved
//! by one Ferry version restores in another. State the host's KVM does not have (XSAVE,
//! XCRs, ...) is saved as absent and skipped on restore, never an error.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM failed to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM handled fewer MSRs than asked.
    #[error("KVM {verb} {done} of {total} MSRs (stopped at MSR {index:#x})")]
    PartialMsrs {
        /// "read" or "wrote".
        verb: &'static str,
        /// How many it handled.
        done: usize,
        /// How many were asked.
        total: usize,
        /// The first one it did not.
        index: u32,
    },
    /// KVM cannot run the vCPU at the TSC frequency the VM had.
    #[error("KVM cannot set the vCPU's TSC frequency to the VM's {khz} kHz (this host cannot scale its TSC to it)")]
    TscKhz {
        /// The VM's frequency.
        khz: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A table is too large for KVM's fixed-size arrays.
    #[error("the saved {0} has too many entries")]
    TooManyEntries(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The MSRs worth saving on this host: those in KVM's index list that a vCPU can read.
/// Probed once per VM on a vCPU that has its CPUID set.
pub fn saveable_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, Error> {
    let list = kvm_fd.get_msr_index_list().map_err(kvm("list its MSRs"))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .map_err(|_| Error::TooManyEntries("MSR list"))?;
        if let Ok(1) = vcpu.get_msrs(&mut one) {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// One CPUID entry, in a form that reads well in a state file.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input).
    pub subleaf: u32,
    /// KVM's entry flags (whether the subleaf is significant).
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            leaf: e.function,
            subleaf: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.leaf,
            index: e.subleaf,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given (restored first: other state depends on it).
    pub cpuid: Vec<CpuidEntry>,
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (absent if the host lacks XSAVE).
    #[serde(default)]
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (absent if the host lacks XCRs).
    #[serde(default)]
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (index, value), TSC included.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// The TSC frequency in kHz, if KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `cpuid` is the table the VMM gave
    /// the vCPU (saved as given: some KVMs report a different table from KVM_GET_CPUID2
    /// than the one set); `msrs` lists what to save ([`saveable_msrs`]).
    pub fn save(vcpu: &VcpuFd, kvm_fd: &Kvm, cpuid: &[CpuidEntry], msrs: &[u32]) -> Result<Self, Error> {
        let cpuid = cpuid.to_vec();
        let mp_state = vcpu.get_mp_state().map_err(kvm("read the MP state"))?;
        let regs = vcpu.get_regs().map_err(kvm("read the general registers"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("read the special registers"))?;
        let xsave = if kvm_fd.check_extension(Cap::Xsave) {
            Some(vcpu.get_xsave().map_err(kvm("read the XSAVE area"))?)
        } else {
            None
        };
        let xcrs = if kvm_fd.check_extension(Cap::Xcrs) {
            Some(vcpu.get_xcrs().map_err(kvm("read the XCRs"))?)
        } else {
            None
        };
        let debug_regs = vcpu.get_debug_regs().map_err(kvm("read the debug registers"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("read the local APIC"))?;
        let entries: Vec<kvm_msr_entry> =
            msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut list = Msrs::from_entries(&entries).map_err(|_| Error::TooManyEntries("MSR list"))?;
        let n = vcpu.get_msrs(&mut list).map_err(kvm("read the MSRs"))?;
        if n != entries.len() {
            return Err(Error::PartialMsrs {
                verb: "read",
                done: n,
                total: entries.len(),
                index: entries[n].index,
            });
        }
        let msrs = list.as_slice().iter().map(|e| (e.index, e.data)).collect();
        let events = vcpu.get_vcpu_events().map_err(kvm("read the pending events"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        Ok(Self { cpuid, mp_state, regs, sregs, xsave, xcrs, debug_regs, lapic, msrs, events, tsc_khz })
    }

    /// Writes the state into a freshly created vCPU, in the order KVM needs: CPUID first,
    /// special registers before the LAPIC (APIC base), the LAPIC before the MSRs (TSC
    /// deadline), pending events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        let entries: Vec<kvm_cpuid_entry2> = self.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| Error::TooManyEntries("CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("set the vCPU's CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            // Keeps the guest's TSC rate on a host with another one: KVM takes a rate within
            // its tolerance (250 ppm) as is and scales others where it can; where it cannot
            // the restore fails, rather than the guest's clock running at the wrong rate.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz).map_err(|source| Error::TscKhz { khz, source })?;
            }
        }
        vcpu.set_mp_state(self.mp_state).map_err(kvm("set the MP state"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("set the general registers"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("set the special registers"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: `xsave` is a complete kvm_xsave saved by KVM_GET_XSAVE; its size is
            // the legacy 4 KiB area KVM_SET_XSAVE reads.
            unsafe { vcpu.set_xsave(xsave) }.map_err(kvm("set the XSAVE area"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm("set the XCRs"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs).map_err(kvm("set the debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("set the local APIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooManyEntries("MSR list"))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if n != entries.len() {
            return Err(Error::PartialMsrs {
                verb: "wrote",
                done: n,
                total: entries.len(),
                index: entries[n].index,
            });
        }
        vcpu.set_vcpu_events(&self.events).map_err(kvm("set the pending events"))?;
        Ok(())
    }
}

/// The VM's in-kernel devices: the two 8259 PICs, the IOAPIC, the PIT, and kvmclock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock reference.
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm("read the interrupt controllers"))?;
    Ok(chip)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are not running.
    pub fn save(vm: &VmFd) -> Result<Self, Error> {
        Ok(Self {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
            clock: vm.get_clock().map_err(kvm("read the KVM clock"))?,
        })
    }

    /// Writes the state into a new VM (before its vCPUs run).
    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(kvm("set the interrupt controllers"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("set the PIT"))?;
        // Only the clock value: the flags KVM reports (e.g. KVM_CLOCK_TSC_STABLE) are not
        // valid input to KVM_SET_CLOCK.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(kvm("set the KVM clock"))?;
        Ok(())
    }
}
