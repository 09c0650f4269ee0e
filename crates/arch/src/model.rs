//! The CPU model beyond feature bits: what a VM's saved state needs from the KVM that
//! restores it, what a host's KVM offers, and the comparison of the two.
//!
//! Feature bits ([`crate::cpuid::missing_features`]) are not enough for a VM to resume on
//! another host: its XSAVE area must fit and its XCR0 components exist there, its TSC must
//! tick at the same rate (or KVM must scale it), every MSR its state carries must be one
//! KVM can restore there, and the KVM calls its restore makes must exist. [`compare`] names
//! each mismatch separately, so that a migration check reports all of them at once.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};

use crate::state::CpuidEntry;

/// How far apart two TSC frequencies may be and still count as equal, in parts per million:
/// KVM's own `tsc_tolerance_ppm` default, under which it runs a guest at the host's rate
/// without scaling (and within which `KVM_SET_TSC_KHZ` succeeds without TSC scaling). NTP
/// corrects clocks that are up to 500 ppm off, so a guest does not notice the difference.
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// The legacy XSAVE area (`struct kvm_xsave`): what every KVM with XSAVE takes.
pub const LEGACY_XSAVE_SIZE: u32 = 4096;

/// The KVM capabilities a VM's state restore uses ([`crate::state::VcpuState::restore`],
/// [`crate::state::VmState::restore`]), by the name the kernel gives them.
pub const STATE_CAPABILITIES: &[(Cap, &str)] = &[
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
];

/// What a VM's state needs from the host that restores it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmCpuModel {
    /// The XCR0 components its CPUID offers the guest (CPUID 0xD.0 EDX:EAX): the guest may
    /// have enabled any of them, and its XSAVE state holds them.
    pub xcr0: u64,
    /// Its XSAVE area's size for all those components, bytes (CPUID 0xD.0 ECX).
    pub xsave_size: u32,
    /// The TSC frequency it was given, kHz (the timing leaf 0x4000_0010 Ferry publishes,
    /// `KVM_GET_TSC_KHZ` where it started); `None` when KVM did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u32>,
    /// The MSR indices its saved state carries.
    pub msrs: Vec<u32>,
    /// The KVM capabilities of [`STATE_CAPABILITIES`] its state was saved with (state of a
    /// capability the source lacked is not in it and not needed).
    pub kvm_capabilities: Vec<String>,
}

/// What a host's KVM offers for restoring VMs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostCpuModel {
    /// The XCR0 components KVM supports (supported CPUID 0xD.0 EDX:EAX).
    pub xcr0: u64,
    /// The largest XSAVE area KVM restores, bytes (`KVM_CAP_XSAVE2`'s size where KVM has it,
    /// else CPUID 0xD.0 ECX up to the legacy 4 KiB area).
    pub xsave_size: u32,
    /// This host's TSC frequency, kHz (`KVM_GET_TSC_KHZ` of a new vCPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u32>,
    /// Whether KVM can run a guest at another TSC frequency (`KVM_CAP_TSC_CONTROL`).
    pub tsc_scaling: bool,
    /// `KVM_GET_MSR_INDEX_LIST`.
    pub msrs: Vec<u32>,
    /// The capabilities of [`STATE_CAPABILITIES`] this KVM has.
    pub kvm_capabilities: Vec<String>,
}

/// What kind of mismatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MismatchKind {
    /// XSAVE components or area size.
    Xsave,
    /// TSC frequency.
    Tsc,
    /// MSRs the state carries.
    Msrs,
    /// KVM capabilities the restore uses.
    KvmCapabilities,
}

/// One reason a VM's state cannot be restored on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The kind.
    pub kind: MismatchKind,
    /// In words.
    pub message: String,
}

/// Errors probing this host's model.
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Whether `a` and `b` kHz are equal within [`TSC_TOLERANCE_PPM`].
pub fn tsc_within_tolerance(a: u32, b: u32) -> bool {
    let diff = u64::from(a.abs_diff(b));
    diff * 1_000_000 <= u64::from(a) * TSC_TOLERANCE_PPM
}

/// Every way `vm`'s state cannot be restored on `host`; empty when it can.
pub fn compare(vm: &VmCpuModel, host: &HostCpuModel) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut push = |kind, message| out.push(Mismatch { kind, message });
    let lacking = vm.xcr0 & !host.xcr0;
    if lacking != 0 {
        push(
            MismatchKind::Xsave,
            format!(
                "KVM does not offer XSAVE components the VM may use (XCR0 bits {lacking:#x}; the VM's {:#x}, the host's {:#x})",
                vm.xcr0, host.xcr0
            ),
        );
    }
    if vm.xsave_size > host.xsave_size {
        push(
            MismatchKind::Xsave,
            format!(
                "the VM's XSAVE area is {} bytes, KVM restores at most {}",
                vm.xsave_size, host.xsave_size
            ),
        );
    }
    match (vm.tsc_khz, host.tsc_khz) {
        (Some(v), Some(h)) if !tsc_within_tolerance(v, h) && !host.tsc_scaling => push(
            MismatchKind::Tsc,
            format!(
                "the VM's TSC runs at {v} kHz, the host's at {h} kHz (more than {TSC_TOLERANCE_PPM} ppm apart) and KVM cannot scale it (no KVM_CAP_TSC_CONTROL)"
            ),
        ),
        (Some(v), None) if !host.tsc_scaling => push(
            MismatchKind::Tsc,
            format!("the VM's TSC runs at {v} kHz; the host's frequency is unknown and KVM cannot scale it"),
        ),
        _ => {}
    }
    let missing: Vec<String> =
        vm.msrs.iter().filter(|m| !host.msrs.contains(m)).map(|m| format!("{m:#x}")).collect();
    if !missing.is_empty() {
        push(
            MismatchKind::Msrs,
            format!("KVM cannot restore MSRs the VM's state carries: {}", missing.join(", ")),
        );
    }
    let missing: Vec<&str> = vm
        .kvm_capabilities
        .iter()
        .filter(|c| !host.kvm_capabilities.contains(c))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        push(
            MismatchKind::KvmCapabilities,
            format!("KVM lacks capabilities the VM's state restore uses: {}", missing.join(", ")),
        );
    }
    out
}

/// The capabilities of [`STATE_CAPABILITIES`] `kvm` has.
pub fn kvm_capabilities(kvm: &Kvm) -> Vec<String> {
    STATE_CAPABILITIES.iter().filter(|(c, _)| kvm.check_extension(*c)).map(|(_, n)| n.to_string()).collect()
}

fn leaf(cpuid: &[CpuidEntry], leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
    cpuid
        .iter()
        .find(|e| e.leaf == leaf && (e.subleaf == subleaf || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0))
}

/// A VM's needs from the CPUID its vCPU 0 was given, the MSRs its state carries and the
/// capabilities of [`STATE_CAPABILITIES`] of the KVM it runs on.
pub fn vm_model(cpuid: &[CpuidEntry], msrs: &[u32], kvm_capabilities: Vec<String>) -> VmCpuModel {
    let xsave = leaf(cpuid, 0xd, 0);
    VmCpuModel {
        xcr0: xsave.map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32)),
        xsave_size: xsave.map_or(0, |e| e.ecx),
        tsc_khz: leaf(cpuid, crate::cpuid::HYPERVISOR_TIMING_LEAF, 0).map(|e| e.eax).filter(|&k| k > 0),
        msrs: msrs.to_vec(),
        kvm_capabilities,
    }
}

/// This host's offer: `supported` is KVM's supported CPUID (as the host presents it, e.g.
/// with hidden features cleared). Makes a throw-away VM and vCPU to read the TSC frequency.
pub fn host_model(kvm: &Kvm, supported: &CpuId) -> Result<HostCpuModel, Error> {
    let entries: Vec<CpuidEntry> = supported.as_slice().iter().map(CpuidEntry::from).collect();
    let xsave = leaf(&entries, 0xd, 0);
    let xcr0 = xsave.map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
    let xsave_size = match kvm.check_extension_int(Cap::Xsave2) {
        n if n > 0 => n as u32,
        _ if kvm.check_extension(Cap::Xsave) => {
            xsave.map_or(LEGACY_XSAVE_SIZE, |e| e.ecx.min(LEGACY_XSAVE_SIZE))
        }
        _ => 0,
    };
    let vm = kvm.create_vm().map_err(kvm_err("create a VM to probe"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU to probe"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let msrs = kvm.get_msr_index_list().map_err(kvm_err("list its MSRs"))?.as_slice().to_vec();
    Ok(HostCpuModel {
        xcr0,
        xsave_size,
        tsc_khz,
        tsc_scaling: kvm.check_extension(Cap::TscControl),
        msrs,
        kvm_capabilities: kvm_capabilities(kvm),
    })
}

/// This host's offer with KVM's own supported CPUID minus `hide` (see [`host_model`]).
pub fn probe_host(hide: &[String]) -> Result<HostCpuModel, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID failed: {e}"))?;
    crate::cpuid::hide_features(&mut cpuid, hide).map_err(|e| e.to_string())?;
    host_model(&kvm, &cpuid).map_err(|e| match e {
        Error::Kvm { what, source } => format!("KVM failed to {what}: {source}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostCpuModel {
        HostCpuModel {
            xcr0: 0x7,
            xsave_size: 4096,
            tsc_khz: Some(2_000_000),
            tsc_scaling: false,
            msrs: vec![0x10, 0x174, 0xc000_0080],
            kvm_capabilities: vec!["KVM_CAP_XSAVE".into(), "KVM_CAP_XCRS".into()],
        }
    }

    fn vm() -> VmCpuModel {
        VmCpuModel {
            xcr0: 0x7,
            xsave_size: 832,
            tsc_khz: Some(2_000_000),
            msrs: vec![0x10, 0xc000_0080],
            kvm_capabilities: vec!["KVM_CAP_XSAVE".into()],
        }
    }

    fn kinds(vm: &VmCpuModel, host: &HostCpuModel) -> Vec<MismatchKind> {
        compare(vm, host).iter().map(|m| m.kind).collect()
    }

    #[test]
    fn a_fitting_vm_has_no_mismatch() {
        assert!(compare(&vm(), &host()).is_empty());
        // Within the tolerance.
        let v = VmCpuModel { tsc_khz: Some(2_000_400), ..vm() };
        assert!(compare(&v, &host()).is_empty());
    }

    #[test]
    fn xsave_components_alone() {
        let v = VmCpuModel { xcr0: 0xe7, ..vm() };
        let m = compare(&v, &host());
        assert_eq!(m.iter().map(|m| m.kind).collect::<Vec<_>>(), vec![MismatchKind::Xsave]);
        assert!(m[0].message.contains("0xe0"), "{}", m[0].message);
    }

    #[test]
    fn xsave_size_alone() {
        let v = VmCpuModel { xsave_size: 8192, ..vm() };
        let m = compare(&v, &host());
        assert_eq!(m.iter().map(|m| m.kind).collect::<Vec<_>>(), vec![MismatchKind::Xsave]);
        assert!(m[0].message.contains("8192") && m[0].message.contains("4096"), "{}", m[0].message);
    }

    #[test]
    fn tsc_alone_unless_scaled() {
        let v = VmCpuModel { tsc_khz: Some(2_001_000), ..vm() };
        let m = compare(&v, &host());
        assert_eq!(m.iter().map(|m| m.kind).collect::<Vec<_>>(), vec![MismatchKind::Tsc]);
        assert!(
            m[0].message.contains("2001000 kHz") && m[0].message.contains("2000000 kHz"),
            "{}",
            m[0].message
        );
        // A host that scales takes it (the restore sets the VM's frequency).
        assert!(compare(&v, &HostCpuModel { tsc_scaling: true, ..host() }).is_empty());
        // A VM whose frequency is unknown is not compared.
        assert!(compare(&VmCpuModel { tsc_khz: None, ..v }, &host()).is_empty());
        assert_eq!(kinds(&vm(), &HostCpuModel { tsc_khz: None, ..host() }), vec![MismatchKind::Tsc]);
    }

    #[test]
    fn msrs_alone_in_hex() {
        let v = VmCpuModel { msrs: vec![0x10, 0x3a, 0x4b56_4d01], ..vm() };
        let m = compare(&v, &host());
        assert_eq!(m.iter().map(|m| m.kind).collect::<Vec<_>>(), vec![MismatchKind::Msrs]);
        assert!(m[0].message.ends_with("0x3a, 0x4b564d01"), "{}", m[0].message);
    }

    #[test]
    fn capabilities_alone() {
        let v = VmCpuModel {
            kvm_capabilities: vec!["KVM_CAP_XSAVE".into(), "KVM_CAP_VCPU_EVENTS".into()],
            ..vm()
        };
        let m = compare(&v, &host());
        assert_eq!(m.iter().map(|m| m.kind).collect::<Vec<_>>(), vec![MismatchKind::KvmCapabilities]);
        assert!(m[0].message.ends_with("KVM_CAP_VCPU_EVENTS"), "{}", m[0].message);
    }

    #[test]
    fn every_mismatch_at_once() {
        let v = VmCpuModel {
            xcr0: 0xff,
            xsave_size: 9000,
            tsc_khz: Some(3_000_000),
            msrs: vec![0x3a],
            kvm_capabilities: vec!["KVM_CAP_PIT2".into()],
        };
        assert_eq!(
            kinds(&v, &host()),
            vec![
                MismatchKind::Xsave,
                MismatchKind::Xsave,
                MismatchKind::Tsc,
                MismatchKind::Msrs,
                MismatchKind::KvmCapabilities
            ]
        );
    }

    #[test]
    fn vm_model_reads_the_cpuid() {
        let cpuid = vec![
            CpuidEntry { leaf: 0xd, subleaf: 0, flags: 1, eax: 0x7, ebx: 576, ecx: 832, edx: 0 },
            CpuidEntry { leaf: 0xd, subleaf: 1, flags: 1, eax: 0x1, ..Default::default() },
            CpuidEntry { leaf: crate::cpuid::HYPERVISOR_TIMING_LEAF, eax: 2_500_000, ..Default::default() },
        ];
        let m = vm_model(&cpuid, &[0x10], vec!["KVM_CAP_XSAVE".into()]);
        assert_eq!((m.xcr0, m.xsave_size, m.tsc_khz), (0x7, 832, Some(2_500_000)));
        assert_eq!(m.msrs, vec![0x10]);
        let none = vm_model(&[], &[], Vec::new());
        assert_eq!((none.xcr0, none.xsave_size, none.tsc_khz), (0, 0, None));
    }

    #[test]
    fn this_host_fits_itself() {
        // Needs /dev/kvm (root).
        let t = std::time::Instant::now();
        let host = probe_host(&[]).expect("probe this host");
        let probe = t.elapsed();
        let t = std::time::Instant::now();
        let vm = VmCpuModel {
            xcr0: host.xcr0,
            xsave_size: host.xsave_size.min(LEGACY_XSAVE_SIZE),
            tsc_khz: host.tsc_khz,
            msrs: host.msrs.clone(),
            kvm_capabilities: host.kvm_capabilities.clone(),
        };
        assert!(compare(&vm, &host).is_empty(), "{:?}", compare(&vm, &host));
        eprintln!("probe_host: {probe:?}; compare with {} MSRs: {:?}", host.msrs.len(), t.elapsed());
        assert!(host.kvm_capabilities.iter().any(|c| c == "KVM_CAP_IRQCHIP"), "{host:?}");
        assert!(!host.msrs.is_empty());
    }
}
