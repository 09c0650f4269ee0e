//! The host daemon's HTTP API (`ferry host serve`): request and response types shared by the
//! daemon and its clients (the `ferry vm ...` commands, later other hosts and the
//! controller). JSON over HTTP; the paths are in [`paths`].
//!
//! Compatibility: [`API_VERSION`] (in `GET /host`) stays the same for additive changes (new
//! endpoints, new fields with defaults); anything else raises it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The version of this API. See the crate documentation for the rule.
pub const API_VERSION: u32 = 1;

/// The daemon's endpoints.
pub mod paths {
    /// `GET`: [`crate::HostInfo`].
    pub const HOST: &str = "/host";
    /// `GET`: [`crate::VmList`]; `POST` [`crate::CreateVm`]: a new VM, answers [`crate::VmDetail`].
    pub const VMS: &str = "/vms";
    /// `POST` [`crate::RegisterVm`]: adopt an existing home, answers [`crate::VmDetail`].
    pub const REGISTER: &str = "/vms/register";

    /// `GET /vms/NAME`: [`crate::VmDetail`]; `DELETE /vms/NAME`: unregister (the home stays),
    /// answers its last [`crate::VmDetail`].
    pub fn vm(name: &str) -> String {
        format!("/vms/{name}")
    }

    /// `POST /vms/NAME/ACTION` (see [`crate::Action`]): answers [`crate::VmDetail`].
    pub fn action(name: &str, action: crate::Action) -> String {
        format!("/vms/{name}/{}", action.as_str())
    }

    /// `GET /vms/NAME/log?lines=N`: [`crate::VmLog`].
    pub fn log(name: &str, lines: usize) -> String {
        format!("/vms/{name}/log?lines={lines}")
    }

    /// `POST /vms/NAME/migrate` [`crate::MigrateVm`]: answers [`crate::MigrateStarted`] (or,
    /// with `check`, the [`crate::CheckReport`] alone).
    pub fn migrate(name: &str) -> String {
        format!("/vms/{name}/migrate")
    }

    /// `POST` [`crate::IncomingMigration`] (host peers): reserve for an incoming VM, answers
    /// [`crate::Reservation`]; with a 409 [`crate::CheckReport`]-carrying error when refused.
    pub const INCOMING: &str = "/migrations/incoming";
    /// `POST` [`crate::IncomingMigration`] (host peers): the checks alone, [`crate::CheckReport`].
    pub const INCOMING_CHECK: &str = "/migrations/incoming/check";

    /// `POST /migrations/ID/complete` (host peers): the source's VMM committed; the VM is
    /// the destination's. Answers [`crate::MigrationRecord`].
    pub fn complete(id: &str) -> String {
        format!("/migrations/{id}/complete")
    }

    /// `POST /migrations/ID/abort` (host peers): release the reservation. Answers
    /// [`crate::MigrationRecord`].
    pub fn abort(id: &str) -> String {
        format!("/migrations/{id}/abort")
    }

    /// `GET /migrations[?active|?failed|?id=ID]`: [`crate::MigrationList`].
    pub const MIGRATIONS: &str = "/migrations";

    /// `POST /migrations/ID/cancel` (any client; no body): cancel this host's outgoing
    /// migration ID (the VM stays here, the destination releases its reservation). Answers
    /// the [`crate::MigrationRecord`] once it ended (outcome `cancelled`), or 409 when it
    /// can no longer be cancelled (committed, or ended otherwise).
    pub fn cancel(id: &str) -> String {
        format!("/migrations/{id}/cancel")
    }
}

/// A VM's lifecycle as the daemon sees it. Transitions (checked by the daemon, see
/// `docs/host.md`):
///
/// ```text
/// defined --start--> starting --(API answers)--> running <--> paused
///    ^                  |                          |  |
///    |                  +--(VMM exits)--> crashed   |  +--suspend--> suspended --resume--> starting
///    +----(VMM exits after stop/kill)-- stopping <--+
/// running/paused --(VMM exits unasked)--> crashed --start--> starting
/// ```
///
/// `elsewhere`: another process (on this host or another) holds the VM's lock or lease; the
/// daemon does not run it and leaves it alone until the lock is free.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Registered, not running (never started, or stopped cleanly).
    Defined,
    /// Its VMM process was spawned; its API has not answered yet.
    Starting,
    /// Its VMM runs the vCPUs.
    Running,
    /// Its VMM runs, the vCPUs are paused.
    Paused,
    /// The daemon asked the VMM to stop (or killed it) and waits for it to exit.
    Stopping,
    /// Written to a checkpoint in its home (`HOME/suspend`) and stopped; `resume` restores it.
    Suspended,
    /// Its VMM exited without being asked to (see `last_exit` and `last_log`). Nothing
    /// restarts it; `start` boots it again.
    Crashed,
    /// Another process holds the VM's lock (another host, or a VMM this daemon did not start).
    Elsewhere,
}

impl VmState {
    /// Whether a VMM process of this daemon is (believed) alive in this state.
    pub fn has_process(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping)
    }

    /// The name used on the wire and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Defined => "defined",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Suspended => "suspended",
            VmState::Crashed => "crashed",
            VmState::Elsewhere => "elsewhere",
        }
    }

    /// Parses [`VmState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "defined" => VmState::Defined,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "stopping" => VmState::Stopping,
            "suspended" => VmState::Suspended,
            "crashed" => VmState::Crashed,
            "elsewhere" => VmState::Elsewhere,
            _ => return None,
        })
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `POST /vms/NAME/ACTION` asks for.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Boot the VM (from `defined`, `crashed`).
    Start,
    /// Graceful stop: SIGTERM to the VMM, which stops the vCPUs, releases the lock and exits.
    Stop,
    /// SIGKILL to the VMM.
    Kill,
    /// Checkpoint into `HOME/suspend` and stop the VMM.
    Suspend,
    /// From `suspended`: restore from `HOME/suspend`; from `paused`: resume the vCPUs.
    Resume,
    /// Checkpoint into `HOME/snapshots/<time>`; the VM goes on running.
    Snapshot,
}

impl Action {
    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Kill => "kill",
            Action::Suspend => "suspend",
            Action::Resume => "resume",
            Action::Snapshot => "snapshot",
        }
    }

    /// Parses [`Action::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "start" => Action::Start,
            "stop" => Action::Stop,
            "kill" => Action::Kill,
            "suspend" => Action::Suspend,
            "resume" => Action::Resume,
            "snapshot" => Action::Snapshot,
            _ => return None,
        })
    }
}

/// A VM's definition: `vm.toml` in its home, and the body of `POST /vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    /// The VM's name, unique on a host: letters, digits, `-`, `_`, `.`; 1 to 64 characters.
    pub name: String,
    /// Guest memory in MiB (at least 16).
    pub memory_mib: u64,
    /// Number of vCPUs (1 to 64).
    pub vcpus: u32,
    /// A bundled test guest (`ferry guests`); exactly one of `guest` and `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// A PVH kernel file (absolute, or relative to the home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line, or a bundled guest's options.
    #[serde(default)]
    pub cmdline: String,
    /// Disks: raw image files in the home.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskDef>,
    /// NICs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicDef>,
    /// The CPU model the VM is given (free text for now; unused by the VMM yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// CPU features hidden from the VM's CPUID (names as `ferry run --cpu-hide` takes them):
    /// the VM can then run on, and migrate to, hosts that lack them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_hide: Vec<String>,
}

/// A disk of a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskDef {
    /// The image's file name in the home (no directories).
    pub file: String,
    /// Its size in bytes: `create` makes a sparse file of this size if it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Given read-only to the guest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
}

/// A NIC of a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NicDef {
    /// Its MAC address (`52:54:00:..`); made from the VM's name when `create` is not given one.
    pub mac: String,
    /// The port group it joins (mapped to a bridge by each host's configuration).
    pub portgroup: String,
}

/// `POST /vms`: create a VM home on a datastore and register it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// The datastore (a name from the daemon's configuration).
    pub datastore: String,
    /// The definition; an empty `mac` of a NIC gets one made from the VM's name.
    pub definition: VmDefinition,
}

/// `POST /vms/register`: adopt an existing home.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterVm {
    /// The home directory (on one of the daemon's datastores).
    pub path: PathBuf,
}

/// One VM in a list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSummary {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its datastore's name.
    pub datastore: String,
    /// The VMM's process id while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The cluster CPU baseline (EVC) generation this host powered it on under, while it is
    /// powered on here and was started by this host in a cluster (a VM received by
    /// migration keeps the CPUID it was started with: its generation is the controller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuid_generation: Option<u64>,
}

/// `GET /vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmList {
    /// Every registered VM, by name.
    pub vms: Vec<VmSummary>,
}

/// How a VMM process ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitInfo {
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Whether the daemon asked it to end (stop, kill, suspend).
    pub requested: bool,
    /// In words (`exit code 1`, `signal 9 (SIGKILL)`, `unknown: not a child of this daemon`).
    pub description: String,
    /// When (ms since the Unix epoch).
    pub at_unix_ms: u64,
}

/// `GET /vms/NAME` and the answer of every action.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmDetail {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// Its home directory.
    pub home: PathBuf,
    /// Its datastore's name.
    pub datastore: String,
    /// `vm.toml`.
    pub definition: VmDefinition,
    /// The VMM's process id while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The VMM's API socket while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// The taps made for its NICs, in NIC order.
    #[serde(default)]
    pub taps: Vec<String>,
    /// Who holds the home's lock (from `vm.lock`), or the lease, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_holder: Option<String>,
    /// The home's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// How its last VMM ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// The last lines of its log when its last VMM ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_log: Vec<String>,
    /// The daemon's last events about it (created, starting, running, crashed, adopted ...),
    /// oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<VmEvent>,
}

/// Something the daemon recorded about a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmEvent {
    /// When (ms since the Unix epoch).
    pub at_unix_ms: u64,
    /// What kind (`created`, `starting`, `running`, `stopping`, `ended`, `crashed`,
    /// `adopted`, `reconciled`, `suspending`, `snapshot`, `registered`).
    pub kind: String,
    /// In words.
    pub message: String,
}

/// `GET /vms/NAME/log`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmLog {
    /// The log file (`HOME/vm.log`: the VMM's stdout and stderr).
    pub path: PathBuf,
    /// Its last lines.
    pub lines: Vec<String>,
}

/// A datastore in `GET /host`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatastoreInfo {
    /// Its name on this host.
    pub name: String,
    /// Its path on this host.
    pub path: PathBuf,
    /// Its stable id (`.ferry-datastore`): the same on every host that sees it.
    pub id: String,
    /// Free bytes (statvfs, for unprivileged users).
    pub free_bytes: u64,
    /// Total bytes.
    pub total_bytes: u64,
    /// Its sanlock lockspace, if VMs on it run with leases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockspace: Option<String>,
}

/// A port group in `GET /host`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortGroupInfo {
    /// Its name.
    pub name: String,
    /// The bridge it maps to on this host.
    pub bridge: String,
    /// Whether the bridge exists now.
    pub present: bool,
}

/// The CPU in `GET /host`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuInfo {
    /// `vendor_id` of /proc/cpuinfo.
    pub vendor: String,
    /// `model name` of /proc/cpuinfo.
    pub model: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// What KVM offers guests (KVM_GET_SUPPORTED_CPUID), if KVM could be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm: Option<KvmCpuid>,
    /// What KVM offers for restoring VMs beyond feature bits (XSAVE, TSC, MSRs,
    /// capabilities), if KVM could be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_model: Option<ferry_arch::model::HostCpuModel>,
}

/// The CPUID leaves KVM offers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvmCpuid {
    /// SHA-256 of the entries (function, index, flags, eax, ebx, ecx, edx, little-endian, in
    /// KVM's order): equal digests, equal offers.
    pub digest: String,
    /// Number of entries.
    pub entries: usize,
    /// The feature bits set, by name where Ferry knows one (without `hidden`).
    pub features: Vec<String>,
    /// Features the host's configuration hides (`[cpu] hide`): absent from `features` and
    /// from every VM this host starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<String>,
}

/// Memory in `GET /host`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryInfo {
    /// MemTotal, bytes.
    pub total_bytes: u64,
    /// MemAvailable, bytes.
    pub available_bytes: u64,
    /// The sum of the memory of the VMs whose VMM runs (or is starting) and of incoming
    /// migrations' reservations, bytes.
    pub reserved_bytes: u64,
    /// The memory this host gives VMs (its configuration's `vm_memory_mib`), bytes, when it
    /// limits it; else all of `total_bytes`. Absent from older hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_limit_bytes: Option<u64>,
    /// The memory free for another VM as this host's own migration check counts it
    /// (available minus incoming reservations, within `vm_memory_mib` minus what running VMs
    /// and reservations hold), bytes. Absent from older hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_for_vms_bytes: Option<u64>,
}

/// `GET /host`: this host's inventory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostInfo {
    /// [`API_VERSION`].
    pub api_version: u32,
    /// The host's name (from its configuration).
    pub name: String,
    /// Ferry's release.
    pub ferry_version: String,
    /// Migration protocol versions this host speaks.
    pub migration_protocols: Vec<u32>,
    /// The CPU.
    pub cpu: CpuInfo,
    /// Memory.
    pub memory: MemoryInfo,
    /// Datastores.
    pub datastores: Vec<DatastoreInfo>,
    /// Port groups.
    pub portgroups: Vec<PortGroupInfo>,
    /// VMs.
    pub vms: Vec<VmSummary>,
}

/// Why a migration to a host cannot go ahead (a check's reason), as a stable code.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CheckCode {
    /// The destination daemon does not answer.
    Unreachable,
    /// It speaks none of the source's migration protocol versions (or another API version).
    Protocol,
    /// The VM's datastore (its id) is not among the destination's.
    DatastoreNotVisible,
    /// A port group of the VM's NICs is missing there (or its bridge is).
    PortGroupMissing,
    /// Not enough free memory there (available minus reserved).
    NotEnoughMemory,
    /// CPU features the VM may use are not offered by the destination's KVM.
    CpuFeatures,
    /// The VM's XSAVE components (XCR0) are not offered there, or its XSAVE area is larger
    /// than KVM there restores.
    Xsave,
    /// The VM's TSC frequency differs from the destination's (beyond 250 ppm) and KVM there
    /// cannot scale it.
    Tsc,
    /// MSRs the VM's state carries are not in the destination KVM's MSR index list.
    Msrs,
    /// KVM capabilities the VM's state restore uses are missing there.
    KvmCapabilities,
    /// The VM does not run (a VM that is not running cannot migrate live).
    VmNotRunning,
    /// A migration of the VM is already in progress.
    AlreadyMigrating,
    /// The destination is in maintenance.
    Maintenance,
    /// A VM of that name (or a MAC of it) is already registered on the destination.
    NameTaken,
    /// The destination is the source itself.
    SameHost,
}

impl CheckCode {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckCode::Unreachable => "unreachable",
            CheckCode::Protocol => "protocol",
            CheckCode::DatastoreNotVisible => "datastore_not_visible",
            CheckCode::PortGroupMissing => "port_group_missing",
            CheckCode::NotEnoughMemory => "not_enough_memory",
            CheckCode::CpuFeatures => "cpu_features",
            CheckCode::Xsave => "xsave",
            CheckCode::Tsc => "tsc",
            CheckCode::Msrs => "msrs",
            CheckCode::KvmCapabilities => "kvm_capabilities",
            CheckCode::VmNotRunning => "vm_not_running",
            CheckCode::AlreadyMigrating => "already_migrating",
            CheckCode::Maintenance => "maintenance",
            CheckCode::NameTaken => "name_taken",
            CheckCode::SameHost => "same_host",
        }
    }
}

/// One reason a migration cannot go ahead.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckReason {
    /// What kind.
    pub code: CheckCode,
    /// In words.
    pub message: String,
}

/// The checks of a migration to a host: every reason at once.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckReport {
    /// The VM.
    pub vm: String,
    /// The destination (its URL as given, or its name once it answered).
    pub destination: String,
    /// No reasons: it may go ahead.
    pub ok: bool,
    /// Every reason it may not.
    pub reasons: Vec<CheckReason>,
    /// The VM's home mapped to the destination's path for the same datastore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_home: Option<PathBuf>,
    /// The host API version of the host that made the report.
    #[serde(default)]
    pub api_version: u32,
}

/// `POST /vms/NAME/migrate`: migrate a running VM to another host's daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// The destination daemon (`http://HOST:PORT`).
    pub to_host: String,
    /// Largest acceptable downtime, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Parallel streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    /// Only run the checks (nothing is reserved).
    #[serde(default)]
    pub check: bool,
    /// The migration's id, when the caller chose it (the controller does, so one id names
    /// the migration on the controller and both hosts): 1 to 64 letters, digits, `-`, `_`,
    /// not already in this host's history. Absent: the daemon makes one. (A daemon older
    /// than this field refuses a request that carries it.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Bandwidth cap of the VMM's migration, MiB/s (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib: Option<u64>,
}

/// The answer of `POST /vms/NAME/migrate`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateStarted {
    /// The checks (with `check: true`, or when they refused).
    pub checks: CheckReport,
    /// The migration's id once started (follow it with `GET /migrations?id=ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// A migration (not `check`) the checks refused: the id of its record (outcome
    /// `refused`) in the source's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_id: Option<String>,
}

/// `POST /migrations/incoming` (and `/check`): a source host asks this one to take a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigration {
    /// The migration's id (the same on both hosts).
    pub migration_id: String,
    /// The source host's name.
    pub source: String,
    /// The VM's definition.
    pub definition: VmDefinition,
    /// The id of the VM's datastore.
    pub datastore_id: String,
    /// Feature bits the VM may use (the source's KVM offer).
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// What the VM's state needs beyond feature bits (its VMM's `GET /vm` `cpu_model`);
    /// absent from a VMM that does not say, and then not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<ferry_arch::model::VmCpuModel>,
    /// Migration protocol versions the source speaks.
    #[serde(default)]
    pub migration_protocols: Vec<u32>,
}

/// The answer of `POST /migrations/incoming`: where the receiver listens and its one-time
/// key (sent only over the daemons' channel).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    /// The migration.
    pub migration_id: String,
    /// `tcp:IP:PORT` of the receiving VMM.
    pub listen: String,
    /// The 32-byte key, hex.
    pub auth_key_hex: String,
    /// The VM's home on the destination.
    pub home: PathBuf,
    /// Until when the reservation holds if unused (ms since the Unix epoch).
    pub expires_unix_ms: u64,
}

/// Which side of a migration a host's record is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationRole {
    /// The VM left this host.
    Source,
    /// The VM came to this host.
    Destination,
}

/// How a migration ended (or that it has not yet).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationOutcome {
    /// In progress.
    Active,
    /// The VM runs on the destination.
    Completed,
    /// The VM stayed on the source.
    Failed,
    /// Refused by the checks.
    Refused,
    /// Cancelled by an operator before the commit (`POST /migrations/ID/cancel` on the
    /// source host or the controller): the VM stayed on the source.
    Cancelled,
    /// Waiting in the controller's queue for a free slot (the controller's history only;
    /// a host never records it).
    Queued,
    /// The controller lost track of it: its source and destination both stopped answering
    /// for longer than the controller's bound (reason code `host_lost`). Not an end: the
    /// record takes the hosts' outcome once one of them answers again (the controller's
    /// history only; a host never records it).
    Unknown,
}

impl MigrationOutcome {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationOutcome::Active => "active",
            MigrationOutcome::Completed => "completed",
            MigrationOutcome::Failed => "failed",
            MigrationOutcome::Refused => "refused",
            MigrationOutcome::Cancelled => "cancelled",
            MigrationOutcome::Queued => "queued",
            MigrationOutcome::Unknown => "unknown",
        }
    }

    /// Parses [`MigrationOutcome::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => MigrationOutcome::Active,
            "completed" => MigrationOutcome::Completed,
            "failed" => MigrationOutcome::Failed,
            "refused" => MigrationOutcome::Refused,
            "cancelled" => MigrationOutcome::Cancelled,
            "queued" => MigrationOutcome::Queued,
            "unknown" => MigrationOutcome::Unknown,
            _ => return None,
        })
    }
}

/// Live progress of a migration (from the source VMM's `GET /vm/migration`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationProgress {
    /// The phase.
    pub phase: String,
    /// The pass.
    pub pass: u32,
    /// Pages left in this pass.
    pub pages_left: u64,
    /// MiB/s.
    pub rate_mib_s: f64,
    /// Expected downtime now, ms.
    pub expected_downtime_ms: f64,
    /// Estimated time left, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<f64>,
    /// Bytes sent so far.
    pub bytes_transferred: u64,
    /// The guest's memory, 4 KiB pages (0 when not known).
    #[serde(default)]
    pub memory_pages: u64,
    /// Progress, percent: the share of the guest's memory not waiting to be sent in the
    /// current pass (rises through pass 1, then stays near 100 while later passes send
    /// what the guest dirtied); absent when the memory size is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

impl MigrationProgress {
    /// [`MigrationProgress::percent`] from the pages left and the memory size.
    pub fn percent_of(pages_left: u64, memory_pages: u64) -> Option<f64> {
        (memory_pages > 0)
            .then(|| 100.0 * memory_pages.saturating_sub(pages_left) as f64 / memory_pages as f64)
    }
}

/// Where a migration by name spends its time outside the VMM's own migration, ms, as the
/// source's daemon measures it from the `POST /vms/NAME/migrate` request. The first five
/// add up to `orchestration_ms`; `source_cleanup_ms` comes after it (in `total_ms`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct OrchestrationSteps {
    /// The checks: the VM's definition and CPU model from its VMM, the destination's
    /// `POST /migrations/check` round trip, the comparison.
    pub checks_ms: f64,
    /// The destination's reservation (`POST /migrations/incoming`: re-checks, taps, the
    /// receiving VMM's spawn), recording the migration here included.
    pub reservation_ms: f64,
    /// Starting the source VMM's migration: the key file, `PUT /vm/migrate`.
    pub start_ms: f64,
    /// Following it: from the VMM's answer to its report's arrival here, less the VMM's own
    /// `total_ms` (negative when the VMM's clock started before it answered).
    pub follow_ms: f64,
    /// The destination's completion (`POST /migrations/ID/complete` round trip).
    pub completion_ms: f64,
    /// The source's clean-up after the completion: its VMM's exit, the VM unregistered.
    pub source_cleanup_ms: f64,
}

/// One migration in a host's history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrationRecord {
    /// Its id (the same on both hosts).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The source host's name.
    pub source: String,
    /// The destination host's name (or URL).
    pub destination: String,
    /// This host's side.
    pub role: MigrationRole,
    /// Start, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// End, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
    /// How it ended.
    pub outcome: MigrationOutcome,
    /// Why, as a stable code (`completed`, the VMM's reason codes, the checks' codes ...).
    #[serde(default)]
    pub reason_code: String,
    /// Why, in words.
    #[serde(default)]
    pub reason: String,
    /// The guest's downtime, ms (the source's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Total time, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
    /// Time spent outside the VMM's migration (checks, reservation, completion), ms: the sum
    /// of `orchestration`'s parts other than `source_cleanup_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orchestration_ms: Option<f64>,
    /// `orchestration_ms` step by step (the source's record of a completed migration only:
    /// the parts are known after the destination's completion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orchestration: Option<OrchestrationSteps>,
    /// Bytes sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Per-pass statistics (the report's passes), JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passes: Option<serde_json::Value>,
    /// Live progress while active (source side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// Every reason the checks gave (outcome `refused`; `reason_code` is the first one's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<CheckReason>,
    /// Outcome `queued` (the controller's history only): its place in the queue, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
}

impl MigrationRecord {
    /// A record of migration `id` that begins at `started_unix_ms` with `outcome` (active,
    /// queued, ...): nothing measured, no reason yet. The other fields are set with struct
    /// update syntax where they are known.
    pub fn begin(
        id: &str,
        vm: &str,
        (source, destination): (&str, &str),
        role: MigrationRole,
        outcome: MigrationOutcome,
        started_unix_ms: u64,
    ) -> MigrationRecord {
        MigrationRecord {
            id: id.to_string(),
            vm: vm.to_string(),
            source: source.to_string(),
            destination: destination.to_string(),
            role,
            started_unix_ms,
            ended_unix_ms: None,
            outcome,
            reason_code: String::new(),
            reason: String::new(),
            downtime_ms: None,
            total_ms: None,
            orchestration_ms: None,
            orchestration: None,
            bytes: None,
            passes: None,
            progress: None,
            reasons: Vec::new(),
            queue_position: None,
        }
    }
}

/// `GET /migrations`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrationList {
    /// Newest first.
    pub migrations: Vec<MigrationRecord>,
}

/// What kind of failure an error answer is: clients decide on this, never on the text.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or names something invalid (400).
    BadRequest,
    /// No such VM or datastore (404).
    NotFound,
    /// It clashes with the current state: duplicate name or MAC, wrong state (409).
    Conflict,
    /// The daemon failed (500).
    Internal,
}

impl ErrorCode {
    /// The HTTP status of the answer.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// The kind.
    pub code: ErrorCode,
    /// What went wrong, in one sentence (with its causes).
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_actions_round_trip() {
        for s in [
            VmState::Defined,
            VmState::Starting,
            VmState::Running,
            VmState::Paused,
            VmState::Stopping,
            VmState::Suspended,
            VmState::Crashed,
            VmState::Elsewhere,
        ] {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).expect("json");
            assert_eq!(json, format!("\"{s}\""));
        }
        for a in
            [Action::Start, Action::Stop, Action::Kill, Action::Suspend, Action::Resume, Action::Snapshot]
        {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
    }
}
