//! What the protocol's JSON messages carry: the `Config` payload (what a destination checks
//! and reserves the VM from) and the VM state schema (the `State` payload, which is also a
//! checkpoint's `state.ferry`).
//!
//! These types are the contract between two Ferry releases, so they live here, beside the
//! frames ([`crate::protocol`]) and under the same compatibility rule: a release reads what
//! the release before it wrote. A field added later carries `#[serde(default)]` (an older
//! peer does not send it) and is never required for a decision the older peer could not have
//! made; a field is never renamed or given a new meaning; a meaning that changes is a new
//! field behind a negotiated feature ([`crate::protocol::FEATURES`]). The state of each
//! device is defined by the crate that emulates it (`ferry-arch`, `ferry-devices`,
//! `ferry-virtio`) and held to the same rule there; `upgrade.rs` in the `ferry` crate's tests
//! migrates between the previous release's binary and this one both ways.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ferry_arch::state::{CpuidEntry, VcpuState, VmState};
use ferry_devices::serial::SerialState;
use ferry_net::NetConfig;
use ferry_virtio::MmioTransportState;
use serde::{Deserialize, Serialize};

/// The stall bounds a migration may ask for, seconds.
pub const STALL_TIMEOUT_S: std::ops::RangeInclusive<u64> = 1..=600;

/// The stall bound when a request names none, seconds.
pub const DEFAULT_STALL_TIMEOUT_S: u64 = 10;

/// The largest socket buffer either side asks for, bytes.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// The devices every Ferry VM has, as named in the pre-migration checks. A destination
/// refuses a VM with a device it does not know.
pub const DEVICES: &[&str] = &["serial-16550@0x3f8", "i8042@0x60", "boot-timer@0x80"];

/// What a VM is, as reported by `info` and recorded in its checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The kernel or bundled guest it booted.
    pub kernel: String,
    /// The kernel command line.
    pub cmdline: String,
}

/// One guest RAM region as stored in the memory file (back to back, in this order).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionState {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What names a VM's lock across hosts: a migration's two sides must name the same one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockIdentity {
    /// The VM's UUID (from the home's `vm.generation`).
    pub vm_uuid: String,
    /// The datastore's id, if the home is on one (a `.ferry-datastore` file above it).
    pub datastore: Option<String>,
    /// The home's path inside its datastore, or its canonical absolute path.
    pub path: PathBuf,
}

impl std::fmt::Display for LockIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.datastore {
            Some(d) => write!(f, "VM {} at {} on datastore {d}", self.vm_uuid, self.path.display()),
            None => write!(f, "VM {} at {}", self.vm_uuid, self.path.display()),
        }
    }
}

/// A `--disk` option that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("--disk {text:?}: {why} (expected path=FILE[,readonly=on|off])")]
pub struct DiskParseError {
    /// The option's text.
    pub text: String,
    /// What is wrong.
    pub why: String,
}

/// One virtio-blk disk: a raw image (`--disk path=FILE[,readonly=on]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// The guest may only read it.
    pub readonly: bool,
}

impl FromStr for DiskConfig {
    type Err = DiskParseError;

    fn from_str(text: &str) -> Result<Self, DiskParseError> {
        let bad = |why: &str| DiskParseError { text: text.to_owned(), why: why.to_owned() };
        let (mut path, mut readonly) = (None, None);
        for part in text.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| bad(&format!("{part:?} is not KEY=VALUE")))?;
            match k {
                "path" if path.is_some() => return Err(bad("path given twice")),
                "path" if v.is_empty() => return Err(bad("empty path")),
                "path" => path = Some(PathBuf::from(v)),
                "readonly" if readonly.is_some() => return Err(bad("readonly given twice")),
                "readonly" => {
                    readonly = Some(match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(bad(&format!("readonly={v:?}: use on or off"))),
                    })
                }
                _ => return Err(bad(&format!("unknown key {k:?}"))),
            }
        }
        let path = path.ok_or_else(|| bad("no path=FILE"))?;
        Ok(Self { path, readonly: readonly.unwrap_or(false) })
    }
}

/// What backs a virtio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// virtio-blk on a raw image.
    Disk(DiskConfig),
    /// virtio-net on a tap device.
    Net(NetConfig),
}

impl Backend {
    /// The name used in the migration's device list, e.g. `virtio-blk@0xd0000000`.
    pub fn device_name(&self, base: u64) -> String {
        match self {
            Backend::Disk(_) => format!("virtio-blk@{base:#x}"),
            Backend::Net(_) => format!("virtio-net@{base:#x}"),
        }
    }
}

/// One virtio device in a checkpoint or migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioState {
    /// What backs it.
    pub backend: Backend,
    /// Its MMIO window.
    pub base: u64,
    /// Its IOAPIC pin.
    pub gsi: u32,
    /// The transport and queues.
    pub transport: MmioTransportState,
}

/// The whole VM's state: a checkpoint's `state.ferry`, a migration's `State` message.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The Ferry version that wrote it.
    pub ferry_version: String,
    /// When, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// What the VM is.
    pub description: Description,
    /// Guest RAM layout, in memory-file order.
    pub memory_regions: Vec<RegionState>,
    /// PIC, IOAPIC, PIT, kvmclock.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The serial console.
    pub serial: SerialState,
    /// The VM's home directory when it was checkpointed (a restore locks it again unless
    /// told otherwise).
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// The virtio devices, in window order (none in checkpoints of Ferry before 0.1's
    /// devices stage, which read as an empty list).
    #[serde(default)]
    pub virtio: Vec<VirtioState>,
    /// The VM's UUID (from its home; absent in checkpoints of Ferry before generations).
    #[serde(default)]
    pub vm_uuid: Option<String>,
    /// The VM's generation when the state was taken: the state may run only while that is
    /// still the home's generation (absent before generations).
    #[serde(default)]
    pub generation: Option<u64>,
}

/// The `Config` message: what the destination checks before any memory moves, and what it
/// reserves the VM from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Memory size, vCPUs, kernel, command line.
    pub description: Description,
    /// Guest RAM layout.
    pub memory_regions: Vec<RegionState>,
    /// The CPUID table each vCPU was given.
    pub cpuid: Vec<Vec<CpuidEntry>>,
    /// The MSRs the source saves per vCPU.
    pub msrs: Vec<u32>,
    /// Device names ([`DEVICES`], then one per virtio device).
    pub devices: Vec<String>,
    /// What backs each virtio device (the destination opens every disk before any memory
    /// moves).
    #[serde(default)]
    pub virtio: Vec<Backend>,
    /// The VM's home directory (on storage both hosts share); its lock moves with the VM.
    pub home: PathBuf,
    /// The identity of the VM's lock: the destination refuses the VM unless the home it
    /// would lock is this one (not a copy, not another VM's). Absent from older sources.
    #[serde(default)]
    pub lock: Option<LockIdentity>,
    /// Whether Ferry made the home (then whoever runs the VM last removes it).
    pub home_is_default: bool,
    /// Both sides hash guest memory at the switchover.
    pub verify: bool,
    /// TCP streams carrying pre-copy pages (the first one also carries everything else).
    #[serde(default = "one_stream")]
    pub streams: u32,
    /// The stall bound, ms: the destination's waits on the source after authentication
    /// (a read that gets nothing, the wait for Commit) fail after this long. Older sources
    /// do not send it.
    #[serde(default = "default_stall_ms")]
    pub stall_timeout_ms: u64,
    /// The source's bandwidth cap over all streams, bytes/s (0: none; older sources do not
    /// send it). The destination sizes its receive buffers from it ([`Self::receive_buffer`]).
    #[serde(default)]
    pub bandwidth_cap: u64,
}

fn one_stream() -> u32 {
    1
}

fn default_stall_ms() -> u64 {
    DEFAULT_STALL_TIMEOUT_S * 1000
}

impl MigrationConfig {
    /// The stall bound, held to what a source may ask for (the value comes from the wire).
    pub fn stall_timeout(&self) -> Duration {
        let (min, max) = (*STALL_TIMEOUT_S.start() * 1000, *STALL_TIMEOUT_S.end() * 1000);
        Duration::from_millis(self.stall_timeout_ms.clamp(min, max))
    }

    /// The receive buffer a destination gives each stream of a capped migration: an eighth
    /// of the stall bound's worth of the cap (256 KiB to [`SOCKET_BUFFER`]); `None` when
    /// uncapped (the default buffer). The source cannot tell bytes the destination's kernel
    /// took into its buffer from bytes its process read, so a stopped destination is found
    /// only once that buffer is full: at the cap, a full-size buffer would take seconds to
    /// fill (16 MiB at 4 MiB/s), this one a fraction of the bound.
    pub fn receive_buffer(&self) -> Option<usize> {
        if self.bandwidth_cap == 0 {
            return None;
        }
        let bytes = self.bandwidth_cap.saturating_mul(self.stall_timeout().as_millis() as u64) / 8000;
        Some(bytes.clamp(256 << 10, SOCKET_BUFFER as u64) as usize)
    }

    /// How long the source waits for RestoreResult: the stall bound, plus, with `verify`,
    /// 1 s per GiB of guest memory (the destination hashes all of it first; the source's
    /// own hashing of the same size overlaps with it before the source starts waiting).
    pub fn restore_wait(&self) -> Duration {
        let hashing = if self.verify { self.description.memory.div_ceil(1 << 30) } else { 0 };
        self.stall_timeout() + Duration::from_secs(hashing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse_or_say_why() {
        let d: DiskConfig = "path=/x.img,readonly=on".parse().expect("parses");
        assert_eq!(d, DiskConfig { path: "/x.img".into(), readonly: true });
        for bad in ["", "path=", "readonly=on", "path=a,path=b", "path=a,readonly=maybe", "size=1"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad:?} parsed");
        }
    }

    /// A `Config` from a source that predates the optional fields still reads, with the
    /// defaults the compatibility rule promises.
    #[test]
    fn config_from_an_older_source_reads_with_defaults() {
        let old = r#"{"description":{"memory":268435456,"vcpus":1,"kernel":"memstress","cmdline":""},
            "memory_regions":[{"guest_addr":0,"len":268435456}],"cpuid":[],"msrs":[],
            "devices":[],"home":"/h","home_is_default":false,"verify":false}"#;
        let c: MigrationConfig = serde_json::from_str(old).expect("reads");
        assert_eq!((c.streams, c.stall_timeout_ms, c.bandwidth_cap), (1, 10_000, 0));
        assert!(c.lock.is_none() && c.virtio.is_empty());
        assert_eq!(c.receive_buffer(), None);
        assert_eq!(c.restore_wait(), Duration::from_secs(10));
    }

    #[test]
    fn the_stall_bound_from_the_wire_is_clamped() {
        let mut c: MigrationConfig = serde_json::from_str(
            r#"{"description":{"memory":1073741825,"vcpus":1,"kernel":"k","cmdline":""},
            "memory_regions":[],"cpuid":[],"msrs":[],"devices":[],"home":"/h",
            "home_is_default":false,"verify":true,"stall_timeout_ms":0}"#,
        )
        .expect("reads");
        assert_eq!(c.stall_timeout(), Duration::from_secs(1));
        assert_eq!(c.restore_wait(), Duration::from_secs(3), "1 s bound + 2 GiB of hashing");
        c.stall_timeout_ms = u64::MAX;
        assert_eq!(c.stall_timeout(), Duration::from_secs(600));
        c.bandwidth_cap = u64::MAX;
        assert_eq!(c.receive_buffer(), Some(SOCKET_BUFFER));
    }
}
