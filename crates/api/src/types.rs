//! Requests, responses and reports.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use ferry_migration::outcome::{Check, ReasonCode};

/// Whether the guest's vCPUs run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped; the VM can be resumed.
    Paused,
    /// A `ferry receive` waiting for, or in the middle of, an incoming migration: no VM
    /// runs here yet ([`VmInfo::receiving`] says how far it is).
    Receiving,
    /// The VMM stopped the vCPUs itself and gave up the VM's lease because the lease could
    /// not be renewed in time ([`VmInfo::fenced`] says why). It resumes only on request,
    /// and only if it gets the lease back with the VM's generation unchanged.
    Fenced,
}

/// Where a receiving VMM is in an incoming migration (`GET /vm` while `receiving`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReceivePhase {
    /// Started empty: waiting for `PUT /vm/receive` to say where to listen and the key.
    Unconfigured,
    /// Listening; no migration in progress.
    Waiting,
    /// A connection proved the key; the handshake goes on.
    Authenticating,
    /// The source's Config arrived: checking this host can run the VM, reserving it.
    Checking,
    /// Memory pages are arriving.
    ReceivingMemory,
    /// The state arrived: checking it, restoring devices and vCPUs.
    Restoring,
    /// Restored (RESTORE_OK sent): the source commits, this side takes the VM's lock and
    /// the vCPUs start next. Cancelling is too late: the source may have committed.
    Activating,
}

/// `GET /vm` on a receiving VMM: the incoming migration so far.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceivingInfo {
    /// Where the incoming migration is.
    pub phase: ReceivePhase,
    /// The address this VMM listens on (`tcp:HOST:PORT`), once it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The migration in progress, once its first stream proved the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Pages placed so far by the migration in progress (data and zero pages).
    #[serde(default)]
    pub pages: u64,
    /// Bytes of page data received so far by the migration in progress.
    #[serde(default)]
    pub bytes: u64,
}

/// `PUT /vm/receive`: on a `ferry receive` started with `--api-socket` alone, listen for
/// one incoming migration. Exactly one of `listen` and `listen_fd`, and exactly one of
/// `auth_key_hex` and `auth_key_file`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// `tcp:HOST:PORT` to bind and listen on (port 0: any free port; the answer names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// A listening TCP socket this VMM process already holds (inherited from its parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_fd: Option<i32>,
    /// The key shared with the source, hex-encoded (16 to 4096 bytes once decoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_key_hex: Option<String>,
    /// A file holding the key shared with the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_key_file: Option<PathBuf>,
}

/// The answer to `PUT /vm/receive` (202): where this VMM listens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiveStarted {
    /// `tcp:HOST:PORT` actually bound.
    pub listen: String,
}

/// `GET /vm`: what the VM is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    /// Running or paused.
    pub state: RunState,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Milliseconds since this VMM process started the VM.
    pub uptime_ms: u64,
    /// The kernel or bundled guest it booted.
    pub kernel: String,
    /// The VMM's process id.
    pub pid: u32,
    /// The checkpoint it was restored from, if any.
    #[serde(default)]
    pub restored_from: Option<PathBuf>,
    /// The VM's home directory (whose lock this VMM holds).
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// The migration in progress, or the last one this VMM attempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationInfo>,
    /// The virtio devices, in window order.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
    /// While `state` is `receiving`: the incoming migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving: Option<ReceivingInfo>,
    /// While `state` is `fenced`: why the VMM fenced itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
    /// The CPU feature bits the VM's CPUID gives the guest (vCPU 0), by name where Ferry
    /// knows one: what a destination's KVM must offer (the host daemon's migration checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
    /// The CPU model beyond feature bits that the VM's state needs from a host that restores
    /// it (XSAVE components and size, TSC frequency, MSRs, KVM capabilities): what the host
    /// daemon's migration checks compare with the destination's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<ferry_arch::model::VmCpuModel>,
}

/// One virtio device in [`VmInfo`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Kind and MMIO window, e.g. `virtio-blk@0xd0000000`.
    pub name: String,
    /// Its interrupt (IOAPIC pin).
    pub gsi: u32,
    /// The disk image's path, or the tap's name.
    pub backend: String,
    /// A disk: whether the guest may only read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// A disk: whether this VMM holds the image's lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<bool>,
    /// A NIC: its MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// A NIC: frames and bytes through it since this VMM started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<NicStats>,
}

/// A NIC's counters.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames from the tap dropped (the guest's buffer too small, or unusable).
    pub rx_dropped: u64,
    /// Frames the guest sent to the tap.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames from the guest dropped (malformed, or the tap full or down).
    pub tx_dropped: u64,
}

/// `PUT /vm/migrate`: live-migrate the VM to a `ferry receive` listening at `to`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT` of the receiving VMM.
    pub to: String,
    /// The shared key file (the receiver reads the same key).
    pub auth_key_file: PathBuf,
    /// Largest acceptable downtime, ms (default 300).
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Most pre-copy passes before giving up (default 30).
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    /// Give up after this many seconds (default 600).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Bandwidth cap in MiB/s; 0 = none (the default).
    #[serde(default)]
    pub bandwidth_mib: u64,
    /// Hash the whole guest memory on both sides at the switchover.
    #[serde(default)]
    pub verify: bool,
    /// TCP streams (each with a thread on both sides) that carry pre-copy pages, 1 to
    /// [`MAX_STREAMS`] (default 1).
    #[serde(default = "default_streams")]
    pub streams: u32,
    /// The stall bound, seconds ([`STALL_TIMEOUT_S`], default
    /// [`DEFAULT_STALL_TIMEOUT_S`]): any wait on the destination (a write it does not take,
    /// an answer it does not send) that lasts longer fails the migration.
    #[serde(default = "default_stall_timeout_s")]
    pub stall_timeout_s: u64,
    /// What to do when pre-copy stalls (default `auto-converge`; `raise-downtime`,
    /// `give-up`): docs/migration.md, "Convergence".
    #[serde(default)]
    pub policy: Policy,
    /// The most `raise-downtime` may raise the downtime limit to, ms (default 1000).
    #[serde(default = "default_max_downtime_ms")]
    pub max_downtime_ms: u64,
    /// The source's cache of sent pages for delta encoding, MiB (default 64, at most
    /// [`MAX_DELTA_CACHE_MIB`]; 0 turns delta encoding off). Used when the destination has
    /// the `delta` feature.
    #[serde(default = "default_delta_cache_mib")]
    pub delta_cache_mib: u64,
    /// Compress pages (LZ4) that compress: `auto` (the default: on when `bandwidth_mib` is
    /// 1 to [`COMPRESS_AUTO_MAX_MIB`], a link slow enough that compressing a page costs less
    /// than sending it), `on` or `off`. Used when the destination has the `lz4` feature.
    #[serde(default)]
    pub compress: Compress,
    /// The migration's id, when the caller chose it (the host daemons use the same id on
    /// both hosts): 1 to 64 of letters, digits, `-`, `_`. Default: a fresh `m-...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
}

/// Whether a migration compresses pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compress {
    /// On when the bandwidth cap says the link is slow.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl std::str::FromStr for Compress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compress::Auto),
            "on" => Ok(Compress::On),
            "off" => Ok(Compress::Off),
            _ => Err(format!("--compress {s:?}: use auto, on or off")),
        }
    }
}

/// `compress: auto` compresses when the bandwidth cap is at most this, MiB/s (about
/// 2 Gbit/s): LZ4 packs a page in a few microseconds, which such a link takes to send it.
pub const COMPRESS_AUTO_MAX_MIB: u64 = 256;

impl MigrateRequest {
    /// Whether this request asks for compression.
    pub fn wants_compression(&self) -> bool {
        match self.compress {
            Compress::On => true,
            Compress::Off => false,
            Compress::Auto => (1..=COMPRESS_AUTO_MAX_MIB).contains(&self.bandwidth_mib),
        }
    }
}

/// The largest delta cache a migration may ask for, MiB.
pub const MAX_DELTA_CACHE_MIB: u64 = 4096;

fn default_delta_cache_mib() -> u64 {
    64
}

pub use ferry_migration::convergence::Policy;

fn default_max_downtime_ms() -> u64 {
    1000
}

/// Most streams one migration may use.
pub const MAX_STREAMS: u32 = 8;

pub use ferry_migration::schema::{DEFAULT_STALL_TIMEOUT_S, STALL_TIMEOUT_S};

fn default_stall_timeout_s() -> u64 {
    DEFAULT_STALL_TIMEOUT_S
}

fn default_streams() -> u32 {
    1
}

fn default_downtime_ms() -> u64 {
    300
}
fn default_max_iterations() -> u32 {
    30
}
fn default_timeout_s() -> u64 {
    600
}

impl MigrateRequest {
    /// A request with the default limits.
    pub fn new(to: impl Into<String>, auth_key_file: impl Into<PathBuf>) -> Self {
        Self {
            to: to.into(),
            auth_key_file: auth_key_file.into(),
            downtime_ms: default_downtime_ms(),
            max_iterations: default_max_iterations(),
            timeout_s: default_timeout_s(),
            bandwidth_mib: 0,
            verify: false,
            streams: default_streams(),
            stall_timeout_s: DEFAULT_STALL_TIMEOUT_S,
            policy: Policy::default(),
            max_downtime_ms: default_max_downtime_ms(),
            delta_cache_mib: default_delta_cache_mib(),
            compress: Compress::Auto,
            migration_id: None,
        }
    }
}

/// Phases of a migration, as the source sees them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Connecting, authenticating, pre-migration checks.
    Setup,
    /// Iterative pre-copy; the guest runs.
    PreCopy,
    /// vCPUs paused; the last pages and the state are going out.
    StopAndCopy,
    /// Waiting for the destination to restore (RESTORE_OK / RESTORE_FAILED).
    Restoring,
    /// The source stopped for good and released the lock; waiting for activation.
    Committed,
    /// The VM runs on the destination.
    Completed,
    /// The migration failed; the VM runs on the source.
    Failed,
    /// An operator cancelled it; the VM runs on the source.
    Cancelled,
    /// The source committed but the destination failed after taking the VM over: it runs
    /// nowhere.
    Lost,
}

/// Where the VM runs once a migration has ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmLocation {
    /// The source VMM (the migration did not happen).
    Source,
    /// The destination VMM.
    Destination,
    /// Nowhere (the destination failed after it had taken over).
    Nowhere,
}

/// A migration in progress (or the last one), for `ferry info` and progress displays.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrationInfo {
    /// The migration id.
    pub migration_id: String,
    /// Where it is.
    pub phase: MigrationPhase,
    /// The destination address.
    pub destination: String,
    /// The pre-copy pass running (0 before the first).
    pub pass: u32,
    /// Pages still to send in this pass.
    pub pages_left: u64,
    /// Pages dirtied and waiting for the next pass (known after each pass).
    pub pages_dirty: u64,
    /// Throughput of the running pass, MB/s.
    pub rate_mb_s: f64,
    /// Downtime a stop-and-copy would cost now, ms (from the last pass).
    pub expected_downtime_ms: f64,
    /// Bytes sent so far.
    pub bytes_transferred: u64,
    /// Since the migration started, ms.
    pub elapsed_ms: u64,
    /// Why it ended, once it has.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Throughput of the running pass, MiB/s (the same measure as `rate_mb_s`).
    #[serde(default)]
    pub rate_mib_s: f64,
    /// Pages the guest dirtied per second in the last pass (0 before the first ends).
    #[serde(default)]
    pub dirty_pages_per_s: f64,
    /// Whether `expected_downtime_ms` is a measurement (false until the first pass ends).
    #[serde(default)]
    pub downtime_known: bool,
    /// A rough estimate of the time left, ms: the rest of this pass at the current rate,
    /// plus, in pre-copy, the next pass (the dirty pages at the last bandwidth) and the
    /// expected downtime. `None` until a rate is known or once the migration has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<f64>,
    /// The full report, once the migration has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Box<MigrationReport>>,
    /// How it ended, as a code, once it has (see [`MigrationReport::reason_code`]).
    #[serde(default, skip_serializing_if = "ReasonCode::is_unknown")]
    pub reason_code: ReasonCode,
    /// The vCPU throttle now, percent (auto-converge; 0 when the guest runs at full speed).
    #[serde(default)]
    pub throttle_percent: u8,
}

/// The version of the VMM API this Ferry serves (`GET /version`). Additive changes (new
/// endpoints, new fields with defaults) keep it; anything else raises it, and a client (a
/// daemon) refuses a VMM whose API version it does not know.
pub const API_VERSION: u32 = 2;

/// `GET /version`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// [`API_VERSION`] of the VMM.
    pub api_version: u32,
    /// The VMM's Ferry release.
    pub ferry_version: String,
}

impl VersionInfo {
    /// This build's.
    pub fn current() -> Self {
        Self { api_version: API_VERSION, ferry_version: env!("CARGO_PKG_VERSION").to_string() }
    }
}

/// `PUT /vm/migrate`'s answer (202): the migration has started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationStarted {
    /// Follow it in `GET /vm/events` and `GET /vm/migration`.
    pub migration_id: String,
}

/// Which VMM saw an event.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The VMM sending the VM.
    Source,
    /// The VMM receiving it.
    Destination,
}

/// One line of `GET /vm/events` (newline-delimited JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// From 1, one more per event of this VMM; `?since=SEQ` resumes after it.
    pub seq: u64,
    /// The migration (empty in a `gap`).
    pub migration_id: String,
    /// The side that saw it.
    pub side: Side,
    /// What happened.
    #[serde(flatten)]
    pub body: EventBody,
}

/// What an [`Event`] says, by `kind`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EventBody {
    /// The migration entered `phase` (an end phase carries the reason).
    Phase {
        /// The new phase.
        phase: MigrationPhase,
        /// Why it ended, for `completed`, `failed`, `cancelled`, `lost`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A pass ended (the source: acknowledged by the destination; the destination: its
    /// PassEnd arrived).
    Pass {
        /// Pass number, from 1.
        pass: u32,
        /// Pages in it.
        pages: u64,
        /// Bytes (the source: on the wire; the destination: 0, not counted there).
        #[serde(default)]
        bytes: u64,
        /// Duration, ms.
        ms: f64,
        /// Pages dirtied meanwhile (source only).
        #[serde(default)]
        dirtied: u64,
        /// Throughput, MiB/s.
        #[serde(default)]
        rate_mib_s: f64,
        /// The stop-and-copy pass.
        #[serde(default)]
        stop_and_copy: bool,
        /// After a pre-copy pass (source): the downtime a stop-and-copy would cost now, ms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_downtime_ms: Option<f64>,
        /// Bytes sent so far in the migration (source).
        #[serde(default)]
        bytes_transferred: u64,
        /// The vCPU throttle from the next pass on, percent (source; auto-converge).
        #[serde(default)]
        throttle_percent: u8,
    },
    /// The migration ended: the full report (source), as `GET /vm/migration`'s `report`.
    Report {
        /// The report.
        report: Box<MigrationReport>,
    },
    /// Events `missed_from..=missed_to` are no longer in the ring (the client reconnected
    /// too late or read too slowly); the stream goes on after them.
    Gap {
        /// First missed sequence number.
        missed_from: u64,
        /// Last missed.
        missed_to: u64,
    },
    /// The VMM fenced itself: its lease could not be renewed in time, so it stopped the
    /// vCPUs and gave the lease up (`migration_id` is empty, or the migration in progress).
    Fenced {
        /// Why.
        reason: String,
    },
}

/// One pre-copy pass in a [`MigrationReport`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PassReport {
    /// Pass number, from 1. The stop-and-copy pass is the last one.
    pub pass: u32,
    /// Pages sent (data and zero markers).
    pub pages: u64,
    /// Of those, zero pages sent as markers only.
    pub zero_pages: u64,
    /// Bytes put on the wire.
    pub bytes: u64,
    /// Duration, ms.
    pub ms: f64,
    /// Pages the guest dirtied while this pass ran.
    pub dirtied: u64,
    /// Whether the vCPUs were paused (the stop-and-copy pass).
    pub stop_and_copy: bool,
    /// The vCPU throttle while this pass ran, percent (auto-converge; 0 in reports of
    /// older Ferrys).
    #[serde(default)]
    pub throttle_percent: u8,
    /// The downtime limit this pass was judged against, ms (raised by `raise-downtime`;
    /// 0 in reports of older Ferrys).
    #[serde(default)]
    pub downtime_limit_ms: u64,
}

/// What a migration did: `ferry migrate`'s report (`--json` prints it as is).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrationReport {
    /// The migration id (in every log line of both VMMs).
    pub migration_id: String,
    /// `completed`, `failed`, `cancelled` or `lost` (see [`MigrationPhase`]).
    pub status: MigrationPhase,
    /// Where the VM runs now.
    pub vm_running_on: VmLocation,
    /// Why pre-copy stopped (completed) or why the migration failed.
    pub reason: String,
    /// How it ended, as a stable code (`completed`, `cancelled`, `auth_failed`,
    /// `refused_by_destination/cpu_features`, ...; docs/migration.md has the table):
    /// programs decide by this, never by `reason`. `unknown` in reports of older Ferrys.
    #[serde(default)]
    pub reason_code: ReasonCode,
    /// The destination address.
    pub destination: String,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Request to end, ms.
    pub total_ms: f64,
    /// Connection, authentication and pre-migration checks, ms.
    pub setup_ms: f64,
    /// vCPUs paused on the source until they run on the destination, ms (0 if the
    /// migration did not reach the stop-and-copy).
    pub downtime_ms: f64,
    /// Bytes sent (all frames).
    pub bytes_transferred: u64,
    /// Pages sent with data.
    pub pages_sent: u64,
    /// Zero pages sent as markers only.
    pub zero_pages: u64,
    /// Bulk throughput of the first pass, MB/s.
    pub throughput_mb_s: f64,
    /// Whether both sides hashed guest memory at the switchover and agreed.
    pub verified: bool,
    /// TCP streams that carried pre-copy pages.
    #[serde(default = "default_streams")]
    pub streams: u32,
    /// Each pass, the stop-and-copy last.
    pub passes: Vec<PassReport>,
    /// The convergence policy the migration ran under (absent in reports of older Ferrys).
    #[serde(default)]
    pub policy: Option<Policy>,
    /// What the policy did, one entry per step (empty when pre-copy never stalled).
    #[serde(default)]
    pub policy_steps: Vec<PolicyStep>,
    /// The delta cache, MiB (0: delta encoding was off, or the destination lacks it).
    #[serde(default)]
    pub delta_cache_mib: u64,
    /// Pages sent as deltas against the destination's copy.
    #[serde(default)]
    pub delta_pages: u64,
    /// Bytes of those deltas (4096 bytes each would have gone whole).
    #[serde(default)]
    pub delta_bytes: u64,
    /// Whether pages were compressed (asked for, and the destination has `lz4`).
    #[serde(default)]
    pub compressed: bool,
    /// Pages sent compressed.
    #[serde(default)]
    pub compressed_pages: u64,
    /// Bytes of those pages on the wire.
    #[serde(default)]
    pub compressed_bytes: u64,
}

/// One step a convergence policy took.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyStep {
    /// The pass after which it stepped in.
    pub after_pass: u32,
    /// The vCPU throttle from then on, percent.
    pub throttle_percent: u8,
    /// The downtime limit from then on, ms.
    pub downtime_limit_ms: u64,
}

/// `PUT /vm/snapshot`: write a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The checkpoint directory; created if missing, must be empty if present.
    pub to: PathBuf,
    /// Stop the VM for good after the checkpoint (suspend): the VMM exits.
    #[serde(default)]
    pub stop: bool,
}

/// What a snapshot did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapshotReport {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// Whether the VM stopped (suspend) instead of resuming.
    pub stopped: bool,
    /// Wall time of the whole snapshot, ms.
    pub total_ms: f64,
    /// How long the vCPUs were paused for it, ms (0 if they were paused already).
    pub paused_ms: f64,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Bytes of memory written (non-zero pages).
    pub memory_written_bytes: u64,
    /// Pages left out as zero.
    pub zero_pages: u64,
    /// Size of the state file, bytes.
    pub state_bytes: u64,
    /// Disk space the checkpoint takes (allocated blocks), bytes.
    pub disk_bytes: u64,
}

/// A request to the VMM. The CLI and the server share this definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /vm`.
    Info,
    /// `PUT /vm/pause`.
    Pause,
    /// `PUT /vm/resume`.
    Resume,
    /// `PUT /vm/snapshot`.
    Snapshot(SnapshotRequest),
    /// `PUT /vm/migrate`: answers (202) once the migration has started.
    Migrate(MigrateRequest),
    /// `GET /vm/migration`: the migration in progress or the last one.
    MigrationStatus,
    /// `PUT /vm/migrate/cancel`.
    MigrateCancel,
    /// `PUT /vm/receive`: answers (202) once listening.
    Receive(ReceiveRequest),
}

impl Request {
    /// HTTP method.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Info | Request::MigrationStatus => "GET",
            _ => "PUT",
        }
    }

    /// HTTP path.
    pub fn path(&self) -> &'static str {
        match self {
            Request::Info => "/vm",
            Request::Pause => "/vm/pause",
            Request::Resume => "/vm/resume",
            Request::Snapshot(_) => "/vm/snapshot",
            Request::Migrate(_) => "/vm/migrate",
            Request::MigrateCancel => "/vm/migrate/cancel",
            Request::MigrationStatus => "/vm/migration",
            Request::Receive(_) => "/vm/receive",
        }
    }

    /// JSON body, if the request has one.
    pub fn body(&self) -> Option<Vec<u8>> {
        match self {
            Request::Snapshot(s) => serde_json::to_vec(s).ok(),
            Request::Migrate(m) => serde_json::to_vec(m).ok(),
            Request::Receive(r) => serde_json::to_vec(r).ok(),
            _ => None,
        }
    }
}

/// A successful answer.
// One per request, moved once: the size of `Info` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    /// The VM's description.
    Info(VmInfo),
    /// Done; nothing to report.
    Done,
    /// A snapshot's report.
    Snapshot(SnapshotReport),
    /// A migration has started (202).
    MigrationStarted(MigrationStarted),
    /// The migration in progress or the last one.
    MigrationStatus(Box<MigrationInfo>),
    /// A receiving VMM listens (202).
    ReceiveStarted(ReceiveStarted),
}

/// A refused or failed request: HTTP status and a sentence saying why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status: 400 malformed, 404 no such endpoint, 405 wrong method, 409 the VM is not
    /// in a state that allows it, 500 the VMM failed doing it.
    #[serde(skip)]
    pub status: u16,
    /// Why.
    #[serde(rename = "error")]
    pub message: String,
}

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into() }
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self { status: 409, message: message.into() }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: 404, message: message.into() }
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: 500, message: message.into() }
    }
}
