//! The controller's HTTP API (`ferry cluster serve`): the types shared by the controller, the
//! host daemons that report to it, and the CLI. JSON over HTTPS with mutual TLS (the cluster
//! CA); the paths are in [`paths`]. The OpenAPI document is generated from these types
//! (`GET /openapi.json`, checked in as `docs/openapi/cluster.json`).
//!
//! Compatibility: [`API_VERSION`] stays the same for additive changes (new endpoints, new
//! fields with defaults); anything else raises it.

use ferry_host_api::HostInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The version of this API.
pub const API_VERSION: u32 = 1;

/// How often a joined host sends its heartbeat, ms.
pub const HEARTBEAT_INTERVAL_MS: u64 = 2000;

/// After this many missed heartbeats a host is `not_responding`.
pub const MISSED_HEARTBEATS: u64 = 3;

/// The controller's endpoints.
pub mod paths {
    /// `POST` [`crate::Heartbeat`] (hosts only): a host's inventory; answers
    /// [`crate::HeartbeatAck`].
    pub const HEARTBEAT: &str = "/heartbeat";
    /// `POST` (hosts only, no body): the calling host leaves the cluster (`disconnected`);
    /// answers [`crate::HostSummary`].
    pub const LEAVE: &str = "/leave";
    /// `GET`: [`crate::HostList`].
    pub const HOSTS: &str = "/hosts";
    /// `GET`: [`crate::VmList`].
    pub const VMS: &str = "/vms";
    /// `GET`: [`crate::DatastoreList`].
    pub const DATASTORES: &str = "/datastores";
    /// `GET`: [`crate::PortGroupList`].
    pub const PORTGROUPS: &str = "/portgroups";
    /// `GET`: the OpenAPI document of this API.
    pub const OPENAPI: &str = "/openapi.json";
    /// `GET`: [`crate::EvcReport`]; `POST` [`crate::EvcSet`]: change the CPU baseline,
    /// answers [`crate::EvcChanged`].
    pub const EVC: &str = "/evc";

    /// `GET /hosts/NAME`: [`crate::HostDetail`]; `DELETE /hosts/NAME`: remove the host
    /// (`disconnected`; its heartbeats are refused until it joins again), answers
    /// [`crate::HostSummary`].
    pub fn host(name: &str) -> String {
        format!("/hosts/{name}")
    }

    /// `GET /vms/NAME`: [`crate::VmList`] of every host's record of that VM name.
    pub fn vm(name: &str) -> String {
        format!("/vms/{name}")
    }

    /// `POST /vms/NAME/migrate` [`crate::MigrateRequest`]: with `check`, answers
    /// [`crate::CheckTable`]; else [`crate::MigrationStarted`].
    pub fn migrate(name: &str) -> String {
        format!("/vms/{name}/migrate")
    }

    /// `POST /vms/NAME/ACTION` (start, stop, kill, suspend, resume, snapshot): forwarded to
    /// the host that has the VM; answers [`crate::VmActionDone`].
    pub fn action(name: &str, action: &str) -> String {
        format!("/vms/{name}/{action}")
    }

    /// `GET /migrations[?active|?failed|?vm=NAME|?host=NAME]`: [`crate::MigrationList`].
    pub const MIGRATIONS: &str = "/migrations";

    /// `GET /migrations/ID`: [`crate::MigrationDetail`].
    pub fn migration(id: &str) -> String {
        format!("/migrations/{id}")
    }

    /// `POST` [`crate::CreateVmRequest`]: create a VM on a host placement picks (or the one
    /// named); answers [`crate::VmActionDone`], or [`crate::Placement`] with `explain`.
    /// (`GET` on the same path lists the VMs.)
    pub const CREATE: &str = "/vms";

    /// `POST` [`crate::RegisterVmRequest`]: register an existing home on a host placement
    /// picks (or the one named); answers [`crate::VmActionDone`], or [`crate::Placement`]
    /// with `explain`.
    pub const REGISTER: &str = "/vms/register";
}

/// A host's state as the controller sees it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Its heartbeats arrive.
    Connected,
    /// No heartbeat for [`MISSED_HEARTBEATS`] intervals: its VMs are shown as last reported.
    NotResponding,
    /// It left the cluster (`ferry host leave`) or was removed (`ferry cluster remove-host`).
    Disconnected,
    /// Its heartbeats arrive and its configuration puts it in maintenance (it refuses
    /// incoming migrations).
    Maintenance,
}

impl HostState {
    /// The name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Connected => "connected",
            HostState::NotResponding => "not_responding",
            HostState::Disconnected => "disconnected",
            HostState::Maintenance => "maintenance",
        }
    }

    /// Parses [`HostState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "connected" => HostState::Connected,
            "not_responding" => HostState::NotResponding,
            "disconnected" => HostState::Disconnected,
            "maintenance" => HostState::Maintenance,
            _ => return None,
        })
    }
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /heartbeat`: what a joined host reports every [`HEARTBEAT_INTERVAL_MS`]. The host's
/// name is its certificate's, never a field of the body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The host daemon's API (`https://IP:PORT`) as its configuration says; an unspecified
    /// IP (0.0.0.0) is replaced by the address the heartbeat came from.
    pub api_url: String,
    /// Whether its configuration puts it in maintenance.
    pub maintenance: bool,
    /// The first heartbeat of a join (`ferry host join`): taken from a `disconnected` host;
    /// a regular heartbeat from a host that left or was removed is refused (409).
    #[serde(default)]
    pub join: bool,
    /// `GET /host` of the host daemon.
    #[schema(value_type = Object)]
    pub info: HostInfo,
}

/// The answer of a heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HeartbeatAck {
    /// The controller's name (its certificate's).
    pub controller: String,
    /// The interval the controller expects, ms.
    pub interval_ms: u64,
    /// The cluster's CPU baseline (EVC), once there is one: every VM the host powers on
    /// from then on sees only these features (the host hides the rest it offers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evc: Option<EvcBaseline>,
}

/// A host in `GET /hosts`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HostSummary {
    /// Its name (from its certificate).
    pub name: String,
    /// Its daemon's API.
    pub api_url: String,
    /// Its state.
    pub state: HostState,
    /// When it joined (first heartbeat), ms since the Unix epoch.
    pub joined_unix_ms: u64,
    /// Its last heartbeat, ms since the Unix epoch.
    pub last_seen_unix_ms: u64,
    /// Age of its last heartbeat when answered, ms.
    pub age_ms: u64,
    /// Its VMs (as last reported).
    pub vms: u32,
    /// Logical CPUs.
    pub cpus: u32,
    /// CPU model.
    pub cpu_model: String,
    /// Memory, bytes.
    pub memory_total_bytes: u64,
    /// Memory available, bytes.
    pub memory_available_bytes: u64,
    /// Ferry's release on the host.
    pub ferry_version: String,
}

/// `GET /hosts`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HostList {
    /// Every host that ever joined, by name.
    pub hosts: Vec<HostSummary>,
}

/// `GET /hosts/NAME`: the summary and the host's last inventory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct HostDetail {
    /// The summary.
    pub summary: HostSummary,
    /// Its last `GET /host`.
    #[schema(value_type = Object)]
    pub info: HostInfo,
}

/// A VM in `GET /vms`: as its host last reported it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ClusterVm {
    /// Its name.
    pub name: String,
    /// The host that has it registered.
    pub host: String,
    /// That host's state.
    pub host_state: HostState,
    /// Its state as last reported (`running`, `defined`, ... see the host API).
    pub state: String,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its datastore's name on that host.
    pub datastore: String,
    /// When the host reported it, ms since the Unix epoch.
    pub reported_unix_ms: u64,
    /// Age of that report when answered, ms.
    pub age_ms: u64,
}

/// `GET /vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct VmList {
    /// By name, then host.
    pub vms: Vec<ClusterVm>,
}

/// A host that sees a datastore.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct DatastoreSeen {
    /// The host.
    pub host: String,
    /// The datastore's name on that host.
    pub name: String,
    /// Its path on that host.
    pub path: String,
    /// Free bytes.
    pub free_bytes: u64,
    /// Total bytes.
    pub total_bytes: u64,
}

/// A datastore (by its id, the same on every host that sees it) in `GET /datastores`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ClusterDatastore {
    /// Its id (`.ferry-datastore`).
    pub id: String,
    /// The hosts that see it, by host name.
    pub hosts: Vec<DatastoreSeen>,
}

/// `GET /datastores`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct DatastoreList {
    /// By id.
    pub datastores: Vec<ClusterDatastore>,
}

/// A host that has a port group.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct PortGroupSeen {
    /// The host.
    pub host: String,
    /// The bridge on that host.
    pub bridge: String,
    /// Whether the bridge existed at the last report.
    pub present: bool,
}

/// A port group (by name) in `GET /portgroups`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ClusterPortGroup {
    /// Its name.
    pub name: String,
    /// The hosts that have it, by host name.
    pub hosts: Vec<PortGroupSeen>,
}

/// `GET /portgroups`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct PortGroupList {
    /// By name.
    pub portgroups: Vec<ClusterPortGroup>,
}

/// `POST /vms/NAME/migrate`: the controller finds the host that has the VM and asks it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination host's name. Without it: with `check`, every other host is checked;
    /// with `explain`, placement's ranking is answered; else placement picks the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_host: Option<String>,
    /// Only run the checks (nothing is reserved).
    #[serde(default)]
    pub check: bool,
    /// Largest acceptable downtime, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Parallel streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    /// Without `to_host`: only answer the placement's ranking ([`Placement`]): nothing is
    /// migrated or reserved.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub explain: bool,
}

/// A reason a host cannot take the VM: the source daemon's check reason (its `code` is the
/// host API's check code), or `host_not_connected` when the controller has no live report
/// of the host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct CheckReason {
    /// The code.
    pub code: String,
    /// In words.
    pub message: String,
}

/// The checks of the migration to one host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HostCheck {
    /// The destination host.
    pub host: String,
    /// It may go ahead.
    pub ok: bool,
    /// Every reason it may not.
    pub reasons: Vec<CheckReason>,
}

/// The answer of a check: one row per candidate host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct CheckTable {
    /// The VM.
    pub vm: String,
    /// The host that has it.
    pub source: String,
    /// By host name.
    pub checks: Vec<HostCheck>,
}

/// The answer of a migration request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct MigrationStarted {
    /// The VM.
    pub vm: String,
    /// The host that has it.
    pub source: String,
    /// The destination.
    pub destination: String,
    /// The checks.
    pub checks: HostCheck,
    /// The migration's id, if the checks passed and it started (follow it with
    /// `GET /migrations/ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
}

/// The answer of a VM action forwarded to its host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct VmActionDone {
    /// The host that did it.
    pub host: String,
    /// The host's answer (the host API's `VmDetail`).
    #[schema(value_type = Object)]
    pub vm: ferry_host_api::VmDetail,
}

/// `GET /migrations`: the controller's history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct MigrationList {
    /// Newest first: the source host's records (the host API's `MigrationRecord`).
    #[schema(value_type = Vec<Object>)]
    pub migrations: Vec<ferry_host_api::MigrationRecord>,
}

/// An event of a migration in the controller's history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct MigrationEvent {
    /// Its order (from 1).
    pub seq: u64,
    /// When, ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// What kind (`recorded`, `completed`, `failed`, ...).
    pub kind: String,
    /// In words.
    pub message: String,
}

/// `GET /migrations/ID`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct MigrationDetail {
    /// The record (per-pass statistics in `passes`).
    #[schema(value_type = Object)]
    pub record: ferry_host_api::MigrationRecord,
    /// What the controller saw happen, oldest first.
    pub events: Vec<MigrationEvent>,
}

/// The cluster's CPU baseline (EVC): the CPU features every VM powered on in the cluster
/// sees. Names as `ferry_arch::cpuid` gives them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EvcBaseline {
    /// Raised at every change (from 1).
    pub generation: u64,
    /// The features, sorted.
    pub features: Vec<String>,
    /// How it was set (`first host NAME`, `operator: ...`).
    pub set_by: String,
    /// When, ms since the Unix epoch.
    pub set_unix_ms: u64,
}

/// A host in [`EvcReport`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EvcHost {
    /// The host.
    pub name: String,
    /// Its state.
    pub state: HostState,
    /// Whether its last report had KVM's CPUID (else `extra` and `lacking` are empty).
    pub cpuid_known: bool,
    /// Features it offers beyond the baseline (hidden from the VMs it powers on).
    pub extra: Vec<String>,
    /// Features of the baseline it lacks (it could not join with them).
    pub lacking: Vec<String>,
}

/// A VM in [`EvcReport`] and [`EvcChanged`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EvcVm {
    /// The VM.
    pub name: String,
    /// The host that reported it powered on (or, when off, last reported it).
    pub host: String,
    /// Its state there.
    pub state: String,
    /// The baseline generation its CPUID was made under (while it is powered on; a VM keeps
    /// its CPUID until it is powered off), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Whether that is the current generation.
    pub current: bool,
    /// Features its CPUID has that the current baseline does not (it keeps them until it is
    /// powered off; hosts without them cannot take it).
    pub above_baseline: Vec<String>,
}

/// A host refused at join for lacking baseline features (until it joins).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EvcRefused {
    /// The host.
    pub name: String,
    /// The features it lacks.
    pub lacking: Vec<String>,
    /// When it was last refused, ms since the Unix epoch.
    pub at_unix_ms: u64,
}

/// `GET /evc`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EvcReport {
    /// The baseline, once a host with KVM's CPUID joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<EvcBaseline>,
    /// Every host, by name.
    pub hosts: Vec<EvcHost>,
    /// Every VM reported powered on, by name.
    pub vms: Vec<EvcVm>,
    /// Hosts refused at join that have not joined since, by name.
    pub refused: Vec<EvcRefused>,
}

/// `POST /evc`: a new baseline: the current one minus `hide`, plus `add`, intersected with
/// the features of host `baseline_of` (a joined host, or one refused at join).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvcSet {
    /// Features to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hide: Vec<String>,
    /// Features to add back (refused if a connected host lacks one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<String>,
    /// Intersect with this host's features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_of: Option<String>,
}

/// The answer of `POST /evc`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EvcChanged {
    /// The new baseline (the same generation if nothing changed).
    pub baseline: EvcBaseline,
    /// Features it no longer has.
    pub removed: Vec<String>,
    /// Features it gained.
    pub added: Vec<String>,
    /// The powered-on VMs that keep features above it until they are powered off.
    pub vms_keeping: Vec<EvcVm>,
}

/// `POST /vms`: create a VM through the controller: the host daemon's create (`datastore`
/// by name, `definition`) plus the host to create it on, else the one placement picks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// The datastore, by its name in the hosts' configurations (the host must have it).
    pub datastore: String,
    /// The definition, as the host API's `POST /vms` takes it.
    #[schema(value_type = Object)]
    pub definition: ferry_host_api::VmDefinition,
    /// The host to create it on (its name); without it placement picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Only answer the placement's ranking ([`Placement`]); nothing is created.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub explain: bool,
}

/// `POST /vms/register`: register an existing home through the controller.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterVmRequest {
    /// The home directory, as the hosts see it (on one of their datastores).
    #[schema(value_type = String)]
    pub path: std::path::PathBuf,
    /// The host to register it on (its name); without it placement picks one among the
    /// hosts whose datastore holds the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Only answer the placement's ranking ([`Placement`]); nothing is registered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub explain: bool,
}

/// A host's score in a placement (see docs/cluster.md, "Placement"): higher
/// `free_after_fraction` first, then lower `load`, then the host's name.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PlacementScore {
    /// Memory VMs may have on the host (its `vm_memory_mib`, else its total), bytes.
    pub total_bytes: u64,
    /// Free for VMs as the host last reported it, bytes.
    pub free_bytes: u64,
    /// Held on it by the controller (migrations in flight or queued to it, creates in
    /// progress), bytes.
    pub reserved_bytes: u64,
    /// Left after the VM: free - reserved - the VM's memory, bytes.
    pub free_after_bytes: u64,
    /// `free_after_bytes / total_bytes` (0 to 1): the first criterion, higher is better.
    pub free_after_fraction: f64,
    /// vCPUs of the VMs running there per logical CPU: the second criterion, lower is better.
    pub load: f64,
}

/// A host in a placement: its rank and score if it may take the VM, else every reason.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PlacementHost {
    /// The host.
    pub host: String,
    /// 1 for the best host, 2 for the next... absent for an excluded host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// Its score, if it passed the checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<PlacementScore>,
    /// Why it cannot take the VM (the checks' codes); empty when ranked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<CheckReason>,
}

/// A placement's ranking (`explain`): every host, ranked ones first (best first), then the
/// excluded ones by name.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Placement {
    /// The VM.
    pub vm: String,
    /// The host that has it (a migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Its memory, MiB (0: unknown, for a home registered by path).
    pub memory_mib: u64,
    /// The hosts.
    pub hosts: Vec<PlacementHost>,
}

/// What kind of failure an error answer is: clients decide on this, never on the text.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (400).
    BadRequest,
    /// The caller's certificate may not do this (403).
    Forbidden,
    /// No such host or VM (404).
    NotFound,
    /// It clashes with the current state: the VM's host does not answer (409).
    Conflict,
    /// A host daemon failed or refused the controller's request (502).
    HostFailed,
    /// The controller failed (500).
    Internal,
    /// A host lacks features of the cluster's CPU baseline (EVC) and cannot join until the
    /// baseline is lowered (409); the message names the features.
    CpuBelowBaseline,
}

impl ErrorCode {
    /// The HTTP status of the answer.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::CpuBelowBaseline => 409,
            ErrorCode::HostFailed => 502,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
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
    fn host_states_round_trip() {
        for s in
            [HostState::Connected, HostState::NotResponding, HostState::Disconnected, HostState::Maintenance]
        {
            assert_eq!(HostState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).expect("json"), format!("\"{s}\""));
        }
        assert_eq!(HostState::parse("gone"), None);
    }
}
