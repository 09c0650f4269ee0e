//! The KVM virtual machine: `/dev/kvm`, the VM file descriptor, its in-kernel interrupt
//! controllers and PIT, and guest memory registered as KVM memory slots.

use std::path::Path;

use ferry_arch::layout::KVM_TSS_ADDRESS;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// The device node Ferry opens.
pub const KVM_PATH: &str = "/dev/kvm";

/// Capabilities Ferry cannot run without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open {KVM_PATH} (is KVM available, and may this user read and write it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// `/dev/kvm` is missing.
    #[error("{KVM_PATH} does not exist: this host has no KVM (load the kvm module, or run on a host with virtualization enabled)")]
    NoKvm,
    /// The KVM API is older than the stable one.
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    /// A capability is missing.
    #[error("this host's KVM lacks {0}, which Ferry needs")]
    MissingCap(&'static str),
    /// A VM ioctl failed.
    #[error("KVM failed to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Opens `/dev/kvm` and checks it can run Ferry's VMs.
pub fn open_kvm() -> Result<Kvm, Error> {
    if !Path::new(KVM_PATH).exists() {
        return Err(Error::NoKvm);
    }
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(Error::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// The host's supported CPUID table.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report its supported CPUID"))
}

/// The CPU's physical address width, from CPUID leaf 0x8000_0008 (36 if absent, the
/// architectural minimum with PAE).
pub fn phys_bits(cpuid: &CpuId) -> u8 {
    ferry_arch::cpuid::find(cpuid, 0x8000_0008, 0).map(|e| (e.eax & 0xff) as u8).unwrap_or(36)
}

/// Creates a VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and registers
/// every region of `mem` as a memory slot (slot numbers follow region order).
pub fn create_vm(kvm: &Kvm, mem: &GuestMemory) -> Result<VmFd, Error> {
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
    register_memory(&vm, mem, 0)?;
    Ok(vm)
}

/// Registers guest memory with KVM, one slot per region; `flags` are the slot flags
/// (`KVM_MEM_LOG_DIRTY_PAGES` to turn dirty logging on or 0 to turn it off).
pub fn register_memory(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|_| Error::Kvm {
            what: "find a memory region's host address",
            source: kvm_ioctls::Error::new(libc::EFAULT),
        })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`, a live mapping of exactly
        // `memory_size` bytes that outlives the VM (the Vmm owns both and drops the VM
        // file descriptor first).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(())
}
