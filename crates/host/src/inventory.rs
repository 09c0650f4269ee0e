//! What `GET /host` says about the machine: CPU (and what KVM offers guests) and memory.

use ferry_host_api::{CpuInfo, KvmCpuid};

/// The CPU from /proc/cpuinfo, and KVM's supported CPUID if /dev/kvm can be opened, minus
/// the features in `hide` (the configuration's `[cpu] hide`).
pub fn cpu(hide: &[String]) -> CpuInfo {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let cpus =
        text.lines().filter(|l| l.split(':').next().map(str::trim) == Some("processor")).count() as u32;
    CpuInfo {
        vendor: field("vendor_id"),
        model: field("model name"),
        cpus,
        kvm: kvm_cpuid(hide).ok(),
        kvm_model: None,
    }
}

/// The CPUID entries KVM offers, minus the features in `hide` (as the VMMs this host starts
/// see them with `--cpu-hide`): a digest, the count, the named feature bits.
pub fn kvm_cpuid(hide: &[String]) -> Result<KvmCpuid, String> {
    use sha2::Digest;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID failed: {e}"))?;
    ferry_arch::cpuid::hide_features(&mut cpuid, hide).map_err(|e| e.to_string())?;
    let entries = cpuid.as_slice();
    let mut h = sha2::Sha256::new();
    for e in entries {
        for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            h.update(v.to_le_bytes());
        }
    }
    let digest = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    // Every feature bit KVM offers is one an empty table lacks.
    let empty = kvm_bindings::CpuId::new(0).map_err(|e| format!("{e:?}"))?;
    let features =
        ferry_arch::cpuid::missing_features(entries, &empty).iter().map(ToString::to_string).collect();
    Ok(KvmCpuid { digest, entries: entries.len(), features, hidden: hide.to_vec() })
}

/// MemTotal and MemAvailable from /proc/meminfo, bytes.
pub fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kib("MemTotal:"), kib("MemAvailable:"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_machine() {
        let cpu = super::cpu(&[]);
        assert!(cpu.cpus >= 1 && !cpu.vendor.is_empty(), "{cpu:?}");
        let (total, avail) = super::memory();
        assert!(total > 0 && avail <= total);
    }
}
