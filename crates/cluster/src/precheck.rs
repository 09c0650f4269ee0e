//! The controller's own checks of a VM against a host (the precheck): a pure function over
//! what the store holds, so that placement can screen every host of a large cluster without
//! asking any daemon. It mirrors the host daemon's incoming-migration checks
//! (`crates/host/src/daemon/migrate.rs`) with the same check codes, as far as the hosts'
//! last reports (their `GET /host`) tell:
//!
//! | code | when |
//! |---|---|
//! | `host_not_connected` | the host is not_responding or disconnected (the controller's code) |
//! | `maintenance` | the host is in maintenance |
//! | `same_host` | the host is the VM's source |
//! | `protocol` | no migration protocol version in common with the source, or another host API version |
//! | `datastore_not_visible` | the host does not see the VM's datastore (by id, or by name for a create) |
//! | `port_group_missing` | a port group of the VM's NICs is not on the host, or its bridge is missing |
//! | `not_enough_memory` | the host's free memory for VMs minus what the controller reserved on it is less than the VM's |
//! | `cpu_features` | the VM's CPU features are not all in the host's KVM offer |
//! | `name_taken` | the host already has a VM of that name that runs (or, for a create, any) |
//!
//! What it cannot see (XSAVE, TSC, MSRs, KVM capabilities, MAC clashes, a migration of the
//! VM already in progress) only the source daemon's real check finds: placement asks it for
//! the host it chose, and tries the next one if that check fails.

use ferry_cluster_api::{CheckReason, HostState};
use ferry_host_api::{CheckCode, HostInfo};

use crate::store::HostRow;

/// The controller's code for a host it has no live report of (not a host daemon code).
pub const HOST_NOT_CONNECTED: &str = "host_not_connected";

/// Which datastore the VM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatastoreRef {
    /// By id (`.ferry-datastore`): a VM that exists (its source host's datastore).
    Id(String),
    /// By name in the hosts' configurations: a VM to create.
    Name(String),
}

/// What the controller knows of the VM to place: from its report row and its source host's
/// stored inventory (a migration), or from the definition asked for (a create).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmFacts {
    /// The VM's name.
    pub name: String,
    /// Its memory, MiB (0 when unknown: a home registered by path).
    pub memory_mib: u64,
    /// Its vCPUs.
    pub vcpus: u32,
    /// The host that has it (a migration), or none (a create or register).
    pub source: Option<String>,
    /// Its datastore; `None`: not compared.
    pub datastore: Option<DatastoreRef>,
    /// The port groups of its NICs (each must be on the host, its bridge present).
    pub portgroups: Vec<String>,
    /// The CPU features its CPUID may give the guest; `None`: not compared (a VM not yet
    /// powered on takes the host's).
    pub cpu_features: Option<Vec<String>>,
    /// The migration protocol versions its source speaks; empty: not compared.
    pub migration_protocols: Vec<u32>,
    /// Its source's host API version; `None`: not compared.
    pub api_version: Option<u32>,
}

impl VmFacts {
    /// The facts of VM `name` as reported by its source host `source` (its stored `GET /host`):
    /// memory, vCPUs, the datastore's id, the source's migration protocols and API version,
    /// and as CPU features the source's KVM offer intersected with `baseline` (the EVC
    /// generation the VM was powered on under, if known) minus `cpu_hide` (the VM's own).
    /// Port groups are not in the inventory: the caller gives them (from the VM's
    /// definition), else they are not compared.
    pub fn from_source(
        name: &str,
        source: &HostInfo,
        portgroups: Vec<String>,
        cpu_hide: &[String],
        baseline: Option<&[String]>,
    ) -> Option<VmFacts> {
        let vm = source.vms.iter().find(|v| v.name == name)?;
        let datastore = source.datastores.iter().find(|d| d.name == vm.datastore).map(|d| d.id.clone());
        let cpu_features = source.cpu.kvm.as_ref().map(|k| {
            k.features
                .iter()
                .filter(|f| baseline.is_none_or(|b| b.contains(f)) && !cpu_hide.contains(f))
                .cloned()
                .collect()
        });
        Some(VmFacts {
            name: name.to_string(),
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            source: Some(source.name.clone()),
            datastore: datastore.map(DatastoreRef::Id),
            portgroups,
            cpu_features,
            migration_protocols: source.migration_protocols.clone(),
            api_version: Some(source.api_version),
        })
    }
}

/// A host's memory as placement counts it, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// What VMs may have on the host: its `vm_memory_mib` limit, else its total.
    pub total: u64,
    /// Free for another VM, as the host reported it (see [`free_for_vms`]).
    pub free: u64,
    /// Held by the controller on the host: migrations in flight or queued to it and creates
    /// in progress there.
    pub reserved: u64,
    /// What is left after the VM is placed: `free - reserved - VM` (0 if it does not fit).
    pub after: u64,
}

/// What a host that passes the precheck offers the VM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Its memory.
    pub memory: Memory,
    /// Its load: the vCPUs of the VMs whose VMM runs there per logical CPU.
    pub load: f64,
}

/// The host's free memory for VMs: what it reported its own check counts
/// (`free_for_vms_bytes`), else (an older host) its available memory within its total minus
/// what its VMs and reservations hold.
pub fn free_for_vms(info: &HostInfo) -> u64 {
    let m = &info.memory;
    m.free_for_vms_bytes.unwrap_or_else(|| {
        let limit = m.vm_limit_bytes.unwrap_or(m.total_bytes);
        m.available_bytes.min(limit.saturating_sub(m.reserved_bytes))
    })
}

/// The host's load: the vCPUs of the VMs whose VMM runs there per logical CPU (0 with no
/// CPU count).
pub fn load(info: &HostInfo) -> f64 {
    let vcpus: u64 = info.vms.iter().filter(|v| v.state.has_process()).map(|v| u64::from(v.vcpus)).sum();
    if info.cpu.cpus == 0 {
        0.0
    } else {
        vcpus as f64 / f64::from(info.cpu.cpus)
    }
}

fn reason(code: &str, message: String) -> CheckReason {
    CheckReason { code: code.to_string(), message }
}

/// The precheck of `vm` on `host`, with `reserved_bytes` held there by the controller
/// (migrations in flight or queued to it, creates in progress): what it offers, or every
/// reason it cannot take the VM. Pure and allocation-light: placement runs it on every host.
pub fn precheck(vm: &VmFacts, host: &HostRow, reserved_bytes: u64) -> Result<Fit, Vec<CheckReason>> {
    let info = &host.info;
    let mut reasons = Vec::new();
    match host.state {
        HostState::Connected => {}
        HostState::Maintenance => reasons
            .push(reason(CheckCode::Maintenance.as_str(), format!("host {} is in maintenance", host.name))),
        HostState::NotResponding | HostState::Disconnected => {
            reasons.push(reason(HOST_NOT_CONNECTED, format!("host {} is {}", host.name, host.state)))
        }
    }
    if vm.source.as_deref() == Some(host.name.as_str()) {
        reasons
            .push(reason(CheckCode::SameHost.as_str(), format!("VM {} is on host {}", vm.name, host.name)));
    }
    if !vm.migration_protocols.is_empty()
        && !vm.migration_protocols.iter().any(|p| info.migration_protocols.contains(p))
    {
        reasons.push(reason(
            CheckCode::Protocol.as_str(),
            format!(
                "host {} speaks migration protocol {:?}, the source {:?}",
                host.name, info.migration_protocols, vm.migration_protocols
            ),
        ));
    }
    if let Some(api) = vm.api_version.filter(|a| *a != info.api_version) {
        reasons.push(reason(
            CheckCode::Protocol.as_str(),
            format!("host {} speaks host API {}, the source {api}", host.name, info.api_version),
        ));
    }
    let seen = match &vm.datastore {
        None => true,
        Some(DatastoreRef::Id(id)) => info.datastores.iter().any(|d| d.id == *id),
        Some(DatastoreRef::Name(n)) => info.datastores.iter().any(|d| d.name == *n),
    };
    if !seen {
        let what = match &vm.datastore {
            Some(DatastoreRef::Id(id)) => format!("the VM's datastore (id {id})"),
            Some(DatastoreRef::Name(n)) => format!("datastore {n:?}"),
            None => String::new(),
        };
        let has: Vec<&str> = info.datastores.iter().map(|d| d.name.as_str()).collect();
        reasons.push(reason(
            CheckCode::DatastoreNotVisible.as_str(),
            format!("{what} is not one host {} sees (it has: {})", host.name, has.join(", ")),
        ));
    }
    for pg in &vm.portgroups {
        match info.portgroups.iter().find(|p| p.name == *pg) {
            None => reasons.push(reason(
                CheckCode::PortGroupMissing.as_str(),
                format!("host {} has no port group {pg:?}", host.name),
            )),
            Some(p) if !p.present => reasons.push(reason(
                CheckCode::PortGroupMissing.as_str(),
                format!(
                    "port group {pg:?} maps to bridge {} on host {}, which does not exist",
                    p.bridge, host.name
                ),
            )),
            Some(_) => {}
        }
    }
    let need = vm.memory_mib << 20;
    let free = free_for_vms(info);
    let usable = free.saturating_sub(reserved_bytes);
    if usable < need {
        reasons.push(reason(
            CheckCode::NotEnoughMemory.as_str(),
            format!(
                "the VM needs {} MiB, host {} has {} MiB free for VMs{}",
                vm.memory_mib,
                host.name,
                usable >> 20,
                if reserved_bytes > 0 {
                    format!(
                        " ({} MiB free, {} MiB reserved by the controller)",
                        free >> 20,
                        reserved_bytes >> 20
                    )
                } else {
                    String::new()
                }
            ),
        ));
    }
    if let Some(features) = &vm.cpu_features {
        match &info.cpu.kvm {
            Some(kvm) => {
                let missing: Vec<&str> =
                    features.iter().filter(|f| !kvm.features.contains(f)).map(String::as_str).collect();
                if !missing.is_empty() {
                    reasons.push(reason(
                        CheckCode::CpuFeatures.as_str(),
                        format!(
                            "KVM on host {} does not offer CPU features the VM may use: {}",
                            host.name,
                            missing.join(", ")
                        ),
                    ));
                }
            }
            None => reasons.push(reason(
                CheckCode::CpuFeatures.as_str(),
                format!("host {} reported no KVM CPUID: its CPU features are unknown", host.name),
            )),
        }
    }
    let on_source = vm.source.as_deref() == Some(host.name.as_str());
    if let Some(other) = info.vms.iter().find(|v| v.name == vm.name).filter(|_| !on_source) {
        if vm.source.is_none() || other.state.has_process() {
            reasons.push(reason(
                CheckCode::NameTaken.as_str(),
                format!("a VM named {} is registered on host {} ({})", vm.name, host.name, other.state),
            ));
        }
    }
    if !reasons.is_empty() {
        return Err(reasons);
    }
    let total = info.memory.vm_limit_bytes.unwrap_or(info.memory.total_bytes);
    Ok(Fit {
        memory: Memory { total, free, reserved: reserved_bytes, after: usable - need },
        load: load(info),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_host_api::{CpuInfo, DatastoreInfo, KvmCpuid, MemoryInfo, PortGroupInfo, VmState, VmSummary};

    /// A connected host with `free_mib` free for VMs out of `total_mib`, 4 CPUs, datastore
    /// `ds` (id `ds-id`), port group `lan`, KVM features `fpu sse2 avx`.
    pub(crate) fn host(name: &str, total_mib: u64, free_mib: u64) -> HostRow {
        HostRow {
            name: name.into(),
            api_url: format!("https://{name}:7443"),
            state: HostState::Connected,
            maintenance: false,
            joined_unix_ms: 1,
            last_seen_unix_ms: 1,
            info: std::sync::Arc::new(HostInfo {
                api_version: 1,
                name: name.into(),
                ferry_version: "0".into(),
                migration_protocols: vec![1],
                cpu: CpuInfo {
                    vendor: "GenuineIntel".into(),
                    model: "test".into(),
                    cpus: 4,
                    kvm: Some(KvmCpuid {
                        digest: String::new(),
                        entries: 0,
                        features: vec!["fpu".into(), "sse2".into(), "avx".into()],
                        hidden: Vec::new(),
                    }),
                    kvm_model: None,
                },
                memory: MemoryInfo {
                    total_bytes: total_mib << 20,
                    available_bytes: free_mib << 20,
                    reserved_bytes: 0,
                    vm_limit_bytes: None,
                    free_for_vms_bytes: Some(free_mib << 20),
                },
                datastores: vec![DatastoreInfo {
                    name: "ds".into(),
                    path: "/srv/ds".into(),
                    id: "ds-id".into(),
                    free_bytes: 1 << 30,
                    total_bytes: 1 << 31,
                    lockspace: None,
                }],
                portgroups: vec![PortGroupInfo { name: "lan".into(), bridge: "br0".into(), present: true }],
                vms: Vec::new(),
            }),
        }
    }

    pub(crate) fn vm_on(host: &mut HostRow, name: &str, memory_mib: u64, vcpus: u32, state: VmState) {
        std::sync::Arc::make_mut(&mut host.info).vms.push(VmSummary {
            name: name.into(),
            state,
            memory_mib,
            vcpus,
            datastore: "ds".into(),
            pid: None,
            cpuid_generation: None,
        });
    }

    /// A 256 MiB VM on `source` on datastore `ds-id`, port group `lan`, features `fpu sse2`.
    pub(crate) fn facts(source: Option<&str>) -> VmFacts {
        VmFacts {
            name: "web1".into(),
            memory_mib: 256,
            vcpus: 1,
            source: source.map(String::from),
            datastore: Some(DatastoreRef::Id("ds-id".into())),
            portgroups: vec!["lan".into()],
            cpu_features: Some(vec!["fpu".into(), "sse2".into()]),
            migration_protocols: vec![1],
            api_version: Some(1),
        }
    }

    fn codes(r: &Result<Fit, Vec<CheckReason>>) -> Vec<String> {
        match r {
            Ok(_) => Vec::new(),
            Err(reasons) => reasons.iter().map(|r| r.code.clone()).collect(),
        }
    }

    #[test]
    fn a_host_that_fits() {
        let mut h = host("b", 4096, 2048);
        vm_on(&mut h, "x", 512, 3, VmState::Running);
        vm_on(&mut h, "y", 512, 8, VmState::Defined);
        let fit = precheck(&facts(Some("a")), &h, 512 << 20).expect("fits");
        assert_eq!(fit.memory.total, 4096 << 20);
        assert_eq!(fit.memory.free, 2048 << 20);
        assert_eq!(fit.memory.reserved, 512 << 20);
        assert_eq!(fit.memory.after, (2048 - 512 - 256) << 20);
        // Only the running VM's vCPUs count: 3 over 4 CPUs.
        assert!((fit.load - 0.75).abs() < 1e-9);
    }

    #[test]
    fn every_reason_at_once() {
        let mut h = host("b", 4096, 300);
        h.state = HostState::Maintenance;
        std::sync::Arc::make_mut(&mut h.info).migration_protocols = vec![2];
        std::sync::Arc::make_mut(&mut h.info).api_version = 2;
        std::sync::Arc::make_mut(&mut h.info).datastores[0].id = "other".into();
        std::sync::Arc::make_mut(&mut h.info).portgroups[0].present = false;
        if let Some(k) = std::sync::Arc::make_mut(&mut h.info).cpu.kvm.as_mut() {
            k.features.retain(|f| f != "sse2");
        }
        vm_on(&mut h, "web1", 64, 1, VmState::Running);
        // 300 MiB free, 100 reserved: 200 < 256.
        let r = precheck(&facts(Some("a")), &h, 100 << 20);
        assert_eq!(
            codes(&r),
            [
                "maintenance",
                "protocol",
                "protocol",
                "datastore_not_visible",
                "port_group_missing",
                "not_enough_memory",
                "cpu_features",
                "name_taken"
            ]
        );
        let text = format!("{:?}", r);
        assert!(text.contains("sse2"), "{text}");
        assert!(text.contains("100 MiB reserved"), "{text}");
    }

    #[test]
    fn host_states_source_and_names() {
        let mut h = host("a", 4096, 2048);
        vm_on(&mut h, "web1", 256, 1, VmState::Running);
        // Its own VM on its source: only same_host.
        assert_eq!(codes(&precheck(&facts(Some("a")), &h, 0)), ["same_host"]);
        std::sync::Arc::make_mut(&mut h.info).vms.clear();
        h.state = HostState::NotResponding;
        assert_eq!(codes(&precheck(&facts(Some("b")), &h, 0)), [HOST_NOT_CONNECTED]);
        h.state = HostState::Connected;
        std::sync::Arc::make_mut(&mut h.info).portgroups.clear();
        assert_eq!(codes(&precheck(&facts(Some("b")), &h, 0)), ["port_group_missing"]);
        // A VM of that name defined there: taken for a create, not for a migration (the
        // host re-registers the same home).
        let mut h = host("b", 4096, 2048);
        vm_on(&mut h, "web1", 256, 1, VmState::Defined);
        assert!(precheck(&facts(Some("a")), &h, 0).is_ok());
        assert_eq!(codes(&precheck(&facts(None), &h, 0)), ["name_taken"]);
        // A create names its datastore.
        let h = host("b", 4096, 2048);
        let mut f = facts(None);
        f.datastore = Some(DatastoreRef::Name("ds".into()));
        assert!(precheck(&f, &h, 0).is_ok());
        f.datastore = Some(DatastoreRef::Name("nope".into()));
        assert_eq!(codes(&precheck(&f, &h, 0)), ["datastore_not_visible"]);
        // No KVM CPUID reported: the features cannot be checked.
        let mut h = host("b", 4096, 2048);
        std::sync::Arc::make_mut(&mut h.info).cpu.kvm = None;
        assert_eq!(codes(&precheck(&facts(Some("a")), &h, 0)), ["cpu_features"]);
        let mut f = facts(Some("a"));
        f.cpu_features = None;
        assert!(precheck(&f, &h, 0).is_ok());
    }

    #[test]
    fn memory_exactly_enough_and_older_hosts() {
        let h = host("b", 4096, 256);
        assert_eq!(precheck(&facts(None), &h, 0).expect("fits").memory.after, 0);
        assert_eq!(codes(&precheck(&facts(None), &h, 1)), ["not_enough_memory"]);
        // An older host: available within the limit minus what its VMs hold.
        let mut h = host("b", 4096, 0);
        std::sync::Arc::make_mut(&mut h.info).memory.free_for_vms_bytes = None;
        std::sync::Arc::make_mut(&mut h.info).memory.available_bytes = 3000 << 20;
        std::sync::Arc::make_mut(&mut h.info).memory.vm_limit_bytes = Some(1024 << 20);
        std::sync::Arc::make_mut(&mut h.info).memory.reserved_bytes = 512 << 20;
        assert_eq!(free_for_vms(&h.info), 512 << 20);
        assert_eq!(precheck(&facts(None), &h, 0).expect("fits").memory.total, 1024 << 20);
    }

    #[test]
    fn facts_from_the_source_report() {
        let mut a = host("a", 4096, 2048);
        vm_on(&mut a, "web1", 300, 2, VmState::Running);
        let baseline = ["fpu".to_string(), "sse2".to_string()];
        let f = VmFacts::from_source("web1", &a.info, vec!["lan".into()], &["sse2".into()], Some(&baseline))
            .expect("reported");
        assert_eq!(f.memory_mib, 300);
        assert_eq!(f.vcpus, 2);
        assert_eq!(f.source.as_deref(), Some("a"));
        assert_eq!(f.datastore, Some(DatastoreRef::Id("ds-id".into())));
        // avx is above the baseline, sse2 hidden by the VM.
        assert_eq!(f.cpu_features, Some(vec!["fpu".to_string()]));
        assert!(VmFacts::from_source("nope", &a.info, Vec::new(), &[], None).is_none());
    }
}
