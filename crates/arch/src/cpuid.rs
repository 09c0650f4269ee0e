//! The CPUID each vCPU sees.
//!
//! Ferry starts from the set KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`) and
//! passes every vCPU's table through [`vcpu_cpuid`], the single place where the table is
//! specialised: topology (APIC IDs), the hypervisor bit and timing leaves, and a
//! [`FeatureMask`] that hides features, so that a VM can be given a CPU baseline shared
//! by several hosts and later move between them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Highest hypervisor leaf Ferry fills in (the VMware-defined timing leaf).
pub const HYPERVISOR_TIMING_LEAF: u32 = 0x4000_0010;
/// The LAPIC timer frequency KVM emulates, in kHz (1 GHz).
const KVM_LAPIC_TIMER_KHZ: u32 = 1_000_000;

/// Errors building a vCPU's CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The table would exceed what KVM accepts.
    #[error("the CPUID table has too many entries for KVM")]
    TooManyEntries,
}

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Bits to hide from one register of one CPUID leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskEntry {
    /// The leaf (EAX input).
    pub leaf: u32,
    /// The subleaf (ECX input); `None` applies to every subleaf.
    pub subleaf: Option<u32>,
    /// The register the bits are in.
    pub register: Register,
    /// The bits to clear.
    pub clear: u32,
}

/// A set of CPU features hidden from the guest. Empty by default: the guest sees
/// everything KVM supports on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeatureMask {
    entries: Vec<MaskEntry>,
}

impl FeatureMask {
    /// A mask hiding the given bits.
    pub fn new(entries: Vec<MaskEntry>) -> Self {
        Self { entries }
    }

    /// The masked bits.
    pub fn entries(&self) -> &[MaskEntry] {
        &self.entries
    }

    fn apply(&self, entry: &mut kvm_cpuid_entry2) {
        for m in &self.entries {
            if m.leaf == entry.function && m.subleaf.is_none_or(|s| s == entry.index) {
                let reg = match m.register {
                    Register::Eax => &mut entry.eax,
                    Register::Ebx => &mut entry.ebx,
                    Register::Ecx => &mut entry.ecx,
                    Register::Edx => &mut entry.edx,
                };
                *reg &= !m.clear;
            }
        }
    }
}

/// Where a vCPU sits in the VM's topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// This vCPU's index, which is also its APIC ID.
    pub index: u8,
    /// Number of vCPUs in the VM.
    pub count: u8,
}

/// Builds the CPUID table of one vCPU from the host's supported table.
///
/// `tsc_khz`, when known, is published in leaf 0x4000_0010 (EAX: TSC kHz, EBX: LAPIC
/// timer kHz), the leaf QEMU and VMware use so a guest can learn its clock rate
/// without calibrating.
pub fn vcpu_cpuid(
    supported: &CpuId,
    topology: Topology,
    tsc_khz: Option<u32>,
    mask: &FeatureMask,
) -> Result<CpuId, Error> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let apic_id = u32::from(topology.index);
    let count = u32::from(topology.count.max(1));
    let mut has_hypervisor_leaf = false;

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                // Hypervisor present.
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0x4 => {
                // Cores per package - 1, in EAX[31:26].
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
            }
            0x4000_0000 => {
                has_hypervisor_leaf = true;
                if tsc_khz.is_some() {
                    e.eax = e.eax.max(HYPERVISOR_TIMING_LEAF);
                }
            }
            _ => {}
        }
        mask.apply(e);
    }

    if let (Some(khz), true) = (tsc_khz, has_hypervisor_leaf) {
        entries.retain(|e| e.function != HYPERVISOR_TIMING_LEAF);
        entries.push(kvm_cpuid_entry2 {
            function: HYPERVISOR_TIMING_LEAF,
            index: 0,
            flags: 0,
            eax: khz,
            ebx: KVM_LAPIC_TIMER_KHZ,
            ..Default::default()
        });
    }

    CpuId::from_entries(&entries).map_err(|_| Error::TooManyEntries)
}

/// A CPU feature: one bit of one CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf.
    pub subleaf: u32,
    /// Register.
    pub register: Register,
    /// Bit number.
    pub bit: u8,
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match feature_name(self) {
            Some(name) => write!(f, "{name}"),
            None => {
                write!(f, "CPUID[{:#x}.{}].{:?} bit {}", self.leaf, self.subleaf, self.register, self.bit)
            }
        }
    }
}

/// The feature registers compared between a guest's CPUID and a host's: (leaf, subleaf,
/// register, bits that are not features and must be ignored).
const FEATURE_REGISTERS: &[(u32, u32, Register, u32)] = &[
    // Hypervisor (31) is Ferry's own; OSXSAVE (27) mirrors CR4.
    (0x1, 0, Register::Ecx, (1 << 31) | (1 << 27)),
    // HTT (28) follows the vCPU count.
    (0x1, 0, Register::Edx, 1 << 28),
    (0x7, 0, Register::Ebx, 0),
    // OSPKE (4) mirrors CR4.
    (0x7, 0, Register::Ecx, 1 << 4),
    (0x7, 0, Register::Edx, 0),
    (0x7, 1, Register::Eax, 0),
    (0xd, 1, Register::Eax, 0),
    (0x8000_0001, 0, Register::Ecx, 0),
    (0x8000_0001, 0, Register::Edx, 0),
];

/// Names of the features most worth naming in a message.
fn feature_name(f: &Feature) -> Option<&'static str> {
    use Register::*;
    Some(match (f.leaf, f.subleaf, f.register, f.bit) {
        (1, 0, Ecx, 0) => "sse3",
        (1, 0, Ecx, 9) => "ssse3",
        (1, 0, Ecx, 12) => "fma",
        (1, 0, Ecx, 13) => "cx16",
        (1, 0, Ecx, 19) => "sse4.1",
        (1, 0, Ecx, 20) => "sse4.2",
        (1, 0, Ecx, 21) => "x2apic",
        (1, 0, Ecx, 22) => "movbe",
        (1, 0, Ecx, 23) => "popcnt",
        (1, 0, Ecx, 24) => "tsc-deadline",
        (1, 0, Ecx, 25) => "aes",
        (1, 0, Ecx, 26) => "xsave",
        (1, 0, Ecx, 28) => "avx",
        (1, 0, Ecx, 29) => "f16c",
        (1, 0, Ecx, 30) => "rdrand",
        (1, 0, Edx, 25) => "sse",
        (1, 0, Edx, 26) => "sse2",
        (7, 0, Ebx, 0) => "fsgsbase",
        (7, 0, Ebx, 3) => "bmi1",
        (7, 0, Ebx, 5) => "avx2",
        (7, 0, Ebx, 8) => "bmi2",
        (7, 0, Ebx, 9) => "erms",
        (7, 0, Ebx, 16) => "avx512f",
        (7, 0, Ebx, 18) => "rdseed",
        (7, 0, Ebx, 19) => "adx",
        (7, 0, Ebx, 29) => "sha",
        (7, 0, Ecx, 9) => "vaes",
        (7, 0, Ecx, 22) => "rdpid",
        (7, 0, Edx, 22) => "amx-bf16",
        (7, 0, Edx, 24) => "amx-tile",
        (7, 0, Edx, 25) => "amx-int8",
        (0xd, 1, Eax, 0) => "xsaveopt",
        (0xd, 1, Eax, 1) => "xsavec",
        (0xd, 1, Eax, 3) => "xsaves",
        (0x8000_0001, 0, Ecx, 0) => "lahf_lm",
        (0x8000_0001, 0, Ecx, 5) => "abm",
        (0x8000_0001, 0, Edx, 20) => "nx",
        (0x8000_0001, 0, Edx, 26) => "pdpe1gb",
        (0x8000_0001, 0, Edx, 27) => "rdtscp",
        (0x8000_0001, 0, Edx, 29) => "lm",
        _ => return None,
    })
}

fn register(e: &kvm_cpuid_entry2, r: Register) -> u32 {
    match r {
        Register::Eax => e.eax,
        Register::Ebx => e.ebx,
        Register::Ecx => e.ecx,
        Register::Edx => e.edx,
    }
}

fn register_mut(e: &mut kvm_cpuid_entry2, r: Register) -> &mut u32 {
    match r {
        Register::Eax => &mut e.eax,
        Register::Ebx => &mut e.ebx,
        Register::Ecx => &mut e.ecx,
        Register::Edx => &mut e.edx,
    }
}

/// The features a guest was given (`guest`, e.g. from a checkpoint) that `host` does not
/// support. Empty means the guest can run on the host.
pub fn missing_features(guest: &[kvm_cpuid_entry2], host: &CpuId) -> Vec<Feature> {
    let mut missing = Vec::new();
    for &(leaf, subleaf, reg, ignore) in FEATURE_REGISTERS {
        let Some(g) = guest.iter().find(|e| {
            e.function == leaf && (e.index == subleaf || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        }) else {
            continue;
        };
        let h = find(host, leaf, subleaf).map(|e| register(&e, reg)).unwrap_or(0);
        let lacking = register(g, reg) & !h & !ignore;
        for bit in 0..32u8 {
            if lacking & (1 << bit) != 0 {
                missing.push(Feature { leaf, subleaf, register: reg, bit });
            }
        }
    }
    missing
}

/// Clears from a guest's table every feature bit [`missing_features`] would name for
/// `host`, so that the guest can run there (what a CPU baseline does); returns what was
/// cleared. Bits that are not features are left alone.
pub fn mask_to_host(guest: &mut [kvm_cpuid_entry2], host: &CpuId) -> Vec<Feature> {
    let missing = missing_features(guest, host);
    for f in &missing {
        for e in guest.iter_mut().filter(|e| {
            e.function == f.leaf && (e.index == f.subleaf || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        }) {
            *register_mut(e, f.register) &= !(1u32 << f.bit);
        }
    }
    missing
}

/// The XSAVE state components (XCR0 bits) a feature's instructions use: hiding the feature
/// hides them too, or a guest could still enable them in XCR0 and its XSAVE area would need
/// them on every host it moves to.
const XSAVE_COMPONENTS: &[(&str, u64)] = &[
    // Without XSAVE only x87 and SSE state is left (and leaf 0xD means nothing).
    ("xsave", !0x3),
    // YMM upper halves.
    ("avx", 1 << 2),
    // Opmask, ZMM upper halves, upper ZMM registers.
    ("avx512f", 0b111 << 5),
    // Tile configuration and tile data.
    ("amx-tile", 0b11 << 17),
];

/// Smallest XSAVE area: the legacy region and the XSAVE header.
const XSAVE_MIN_SIZE: u32 = 576;

/// Clears `components` from the XCR0 bits leaf 0xD.0 offers (EDX:EAX) and makes its ECX
/// (the area's size for every offered component) fit what is left.
fn drop_xsave_components(cpuid: &mut CpuId, components: u64) {
    let entries = cpuid.as_mut_slice();
    let Some(i) = entries.iter().position(|e| e.function == 0xd && e.index == 0) else { return };
    entries[i].eax &= !(components as u32);
    entries[i].edx &= !((components >> 32) as u32);
    let offered = u64::from(entries[i].eax) | (u64::from(entries[i].edx) << 32);
    let size = entries
        .iter()
        .filter(|e| e.function == 0xd && (2..64).contains(&e.index) && offered & (1 << e.index) != 0)
        .map(|e| e.ebx.saturating_add(e.eax))
        .fold(XSAVE_MIN_SIZE, u32::max);
    entries[i].ecx = entries[i].ecx.min(size);
}

/// Clears the feature called `name` (as [`Feature`]'s `Display` names it, e.g. `avx2`) in
/// a host table, as if the host lacked it, with the XSAVE components only it uses. Returns
/// whether the name is known.
pub fn clear_feature(cpuid: &mut CpuId, name: &str) -> bool {
    if let Some(&(_, components)) = XSAVE_COMPONENTS.iter().find(|(n, _)| *n == name) {
        drop_xsave_components(cpuid, components);
    }
    for &(leaf, subleaf, reg, _) in FEATURE_REGISTERS {
        for bit in 0..32u8 {
            let f = Feature { leaf, subleaf, register: reg, bit };
            if feature_name(&f) != Some(name) {
                continue;
            }
            for e in cpuid.as_mut_slice().iter_mut().filter(|e| {
                e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
            }) {
                *register_mut(e, reg) &= !(1u32 << bit);
            }
            return true;
        }
    }
    false
}

/// Every feature name [`clear_feature`] knows, in CPUID order.
pub fn feature_names() -> Vec<&'static str> {
    let mut names = Vec::new();
    for &(leaf, subleaf, register, _) in FEATURE_REGISTERS {
        for bit in 0..32u8 {
            if let Some(n) = feature_name(&Feature { leaf, subleaf, register, bit }) {
                names.push(n);
            }
        }
    }
    names
}

/// A feature name that is not one of [`feature_names`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU feature {name:?}; the features that can be hidden are: {}", feature_names().join(", "))]
pub struct UnknownFeature {
    /// The name given.
    pub name: String,
}

/// Checks one name given to hide (`--cpu-hide`, `[cpu] hide`): trimmed, known.
pub fn parse_feature_name(name: &str) -> Result<String, UnknownFeature> {
    let n = name.trim();
    if feature_names().contains(&n) {
        Ok(n.to_string())
    } else {
        Err(UnknownFeature { name: n.to_string() })
    }
}

/// Clears every feature of `names` in a host table (see [`clear_feature`]); the first unknown
/// name is an error and leaves the table partly cleared (check names first with
/// [`parse_feature_name`]).
pub fn hide_features(cpuid: &mut CpuId, names: &[String]) -> Result<(), UnknownFeature> {
    for n in names {
        if !clear_feature(cpuid, n) {
            return Err(UnknownFeature { name: n.clone() });
        }
    }
    Ok(())
}

/// Looks up one leaf/subleaf in a table.
pub fn find(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| {
            e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
        })
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cleared_feature_is_missing() {
        let mut h = host();
        let guest: Vec<kvm_cpuid_entry2> = h.as_slice().to_vec();
        assert!(missing_features(&guest, &h).is_empty());
        assert!(clear_feature(&mut h, "sse3"));
        let names: Vec<String> = missing_features(&guest, &h).iter().map(|f| f.to_string()).collect();
        assert_eq!(names, vec!["sse3"]);
        assert!(!clear_feature(&mut h, "no-such-feature"));
    }

    #[test]
    fn names_are_checked() {
        assert!(feature_names().contains(&"avx2"));
        assert_eq!(parse_feature_name(" avx2 "), Ok("avx2".to_string()));
        let e = parse_feature_name("bogus").expect_err("unknown");
        assert!(e.to_string().contains("\"bogus\"") && e.to_string().contains("avx2"), "{e}");
        let mut h = host();
        hide_features(&mut h, &["sse3".into()]).expect("known");
        assert_eq!(find(&h, 1, 0).expect("leaf 1").ecx & 1, 0);
        assert!(hide_features(&mut h, &["bogus".into()]).is_err());
    }

    #[test]
    fn hiding_avx_hides_its_xsave_state() {
        let leaf_d = |index, eax, ebx, ecx| kvm_cpuid_entry2 {
            function: 0xd,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx,
            ..Default::default()
        };
        let mut t = CpuId::from_entries(&[
            kvm_cpuid_entry2 { function: 1, ecx: 1 << 28, ..Default::default() },
            // x87, SSE, AVX, the AVX-512 three: 2688 bytes with all of them.
            leaf_d(0, 0xe7, 576, 2688),
            leaf_d(2, 256, 576, 0),
            leaf_d(5, 64, 1088, 0),
            leaf_d(6, 512, 1152, 0),
            leaf_d(7, 1024, 1664, 0),
        ])
        .expect("table");
        assert!(clear_feature(&mut t, "avx512f"));
        let d = find(&t, 0xd, 0).expect("leaf 0xd");
        assert_eq!((d.eax, d.ecx), (0x7, 832), "AVX-512 state gone, the area shrinks to AVX's end");
        assert!(clear_feature(&mut t, "avx"));
        let d = find(&t, 0xd, 0).expect("leaf 0xd");
        assert_eq!((d.eax, d.ecx), (0x3, 576));
        assert_eq!(find(&t, 1, 0).expect("leaf 1").ecx & (1 << 28), 0);
        // Features without XSAVE state leave leaf 0xD alone.
        let before = find(&t, 0xd, 0);
        assert!(clear_feature(&mut t, "avx2"));
        assert_eq!(find(&t, 0xd, 0), before);
    }

    fn host() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 { function: 0, eax: 0x1f, ..Default::default() },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ecx: 0x0000_0201,
                edx: 0x1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 { function: 0x4000_0000, eax: 0x4000_0001, ..Default::default() },
        ])
        .expect("small table")
    }

    #[test]
    fn topology_and_hypervisor_bit() {
        let t = vcpu_cpuid(&host(), Topology { index: 3, count: 4 }, None, &FeatureMask::default())
            .expect("cpuid");
        let l1 = find(&t, 1, 0).expect("leaf 1");
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_ne!(l1.edx & (1 << 28), 0);
        assert_eq!(find(&t, 0xb, 1).expect("leaf b").edx, 3);
        assert!(find(&t, HYPERVISOR_TIMING_LEAF, 0).is_none());
    }

    #[test]
    fn timing_leaf_published() {
        let t =
            vcpu_cpuid(&host(), Topology { index: 0, count: 1 }, Some(2_500_000), &FeatureMask::default())
                .expect("cpuid");
        assert_eq!(find(&t, 0x4000_0000, 0).expect("leaf").eax, HYPERVISOR_TIMING_LEAF);
        let l = find(&t, HYPERVISOR_TIMING_LEAF, 0).expect("timing leaf");
        assert_eq!(l.eax, 2_500_000);
        assert_eq!(l.ebx, KVM_LAPIC_TIMER_KHZ);
    }

    #[test]
    fn missing_features_are_named() {
        let h = host();
        let guest =
            vcpu_cpuid(&h, Topology { index: 0, count: 2 }, None, &FeatureMask::default()).expect("cpuid");
        // A guest made from the host's own table (plus Ferry's synthetic bits) fits.
        assert!(missing_features(guest.as_slice(), &h).is_empty());
        let mut entries = guest.as_slice().to_vec();
        for e in entries.iter_mut().filter(|e| e.function == 1) {
            e.ecx |= 1 << 20; // sse4.2
            e.ecx |= 1 << 2; // an unnamed bit
        }
        let missing = missing_features(&entries, &h);
        let names: Vec<String> = missing.iter().map(|f| f.to_string()).collect();
        assert_eq!(names, vec!["CPUID[0x1.0].Ecx bit 2".to_string(), "sse4.2".to_string()]);
        // Masked to the host, the guest fits again; the bits that are not features stay.
        let cleared = mask_to_host(&mut entries, &h);
        assert_eq!(cleared, missing);
        assert!(missing_features(&entries, &h).is_empty());
        let l1 = entries.iter().find(|e| e.function == 1).expect("leaf 1");
        assert_eq!(l1.ecx & (1 << 20 | 1 << 2), 0);
        assert_ne!(l1.ecx & (1 << 31), 0, "the hypervisor bit is Ferry's, not a host feature");
    }

    #[test]
    fn mask_hides_bits() {
        let mask = FeatureMask::new(vec![MaskEntry {
            leaf: 1,
            subleaf: None,
            register: Register::Ecx,
            clear: 1 << 9,
        }]);
        let t = vcpu_cpuid(&host(), Topology { index: 0, count: 1 }, None, &mask).expect("cpuid");
        assert_eq!(find(&t, 1, 0).expect("leaf 1").ecx & (1 << 9), 0);
        assert_ne!(find(&t, 1, 0).expect("leaf 1").ecx & 1, 0);
    }
}
