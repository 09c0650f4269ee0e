//! x86_64 specifics for Ferry.
//!
//! Everything that depends on the architecture lives behind this crate, so the rest of
//! the VMM speaks of "the memory layout", "the boot registers" or "the CPUID policy"
//! without caring how x86 lays them out:
//!
//! - [`layout`]: where RAM, the MMIO hole and the boot structures sit in guest-physical memory;
//! - [`cpuid`]: the CPUID each vCPU sees, derived from what KVM supports through one function
//!   ([`cpuid::vcpu_cpuid`]) where features can be masked;
//! - [`model`]: the CPU model beyond feature bits (XSAVE, TSC, MSRs, KVM capabilities) a VM's
//!   state needs and a host offers, and their comparison;
//! - [`regs`]: the register, segment, FPU, LAPIC and MSR state of a vCPU at PVH entry.

pub mod cpuid;
pub mod layout;
pub mod model;
pub mod regs;
pub mod state;
