//! Checkpoints of a whole VM: the tree of component states ([`VmSnapshot`]) plus memory,
//! written to and restored from a checkpoint directory in the format of
//! [`ferry_checkpoint`].
//!
//! Snapshot: pause the vCPUs (if running), save every vCPU, the in-kernel devices and the
//! serial port, write the memory file sparsely and the state file, then resume, or, for a
//! suspend, stop. Any failure removes what was written and leaves the VM as it was.
//!
//! Restore: check the state file, check the host has every CPU feature the guest was
//! given, map the memory file copy-on-write, create the VM and its devices from the saved
//! states, and only then start the vCPUs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ferry_api::{SnapshotReport, SnapshotRequest};
use ferry_arch::layout;
use ferry_arch::state::{VcpuState, VmState};
use ferry_checkpoint::{memory as memfile, read_state_file, write_state_file, MEMORY_FILE, STATE_FILE};
use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::{ExitNotifier, Request as VcpuRequest, RunState, VcpuContext};
use crate::{create_devices, efd, open_host, vm, Error, SerialConfig, StopSource, VmRunState, Vmm};

/// How long pausing may take before it is an error.
const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub use ferry_migration::schema::{RegionState, VmSnapshot};

/// Why a snapshot failed. The VM is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The target exists and is not an empty directory.
    #[error("snapshot target {0} exists and is not empty")]
    NotEmpty(PathBuf),
    /// The target exists and is not a directory.
    #[error("snapshot target {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The target cannot be created or written.
    #[error("snapshot target {path} cannot be written")]
    Unwritable {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vCPUs cannot be paused.
    #[error("cannot pause the vCPUs")]
    Pause(#[from] crate::vcpu::Error),
    /// KVM state cannot be read.
    #[error("cannot read the VM's state")]
    State(#[from] ferry_arch::state::Error),
    /// The memory file cannot be written.
    #[error(transparent)]
    Memory(#[from] memfile::Error),
    /// The state file cannot be written.
    #[error(transparent)]
    Format(#[from] ferry_checkpoint::format::Error),
}

/// Why a restore failed. Nothing ran, and the checkpoint is untouched.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The directory is missing.
    #[error("checkpoint directory {0} does not exist")]
    NoDirectory(PathBuf),
    /// Not a directory.
    #[error("checkpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The state file is bad.
    #[error(transparent)]
    Format(#[from] ferry_checkpoint::format::Error),
    /// The memory file is bad.
    #[error(transparent)]
    Memory(#[from] memfile::Error),
    /// The state contradicts itself.
    #[error("the checkpoint is inconsistent: {0}")]
    Inconsistent(String),
    /// The host lacks CPU features the guest uses.
    #[error("this host's CPU lacks features the checkpointed guest was given: {0}")]
    MissingFeatures(String),
    /// KVM refused a saved state.
    #[error("cannot restore the vCPU and device state")]
    State(#[from] ferry_arch::state::Error),
    /// The VM ran on past the checkpoint.
    #[error(
        "the checkpoint is of generation {checkpoint}, but the VM in {home} has run on since (generation \
         {current}): restoring it would bring back an older VM; if that is what you want, and the VM's \
         disks match the checkpoint, restore with --revert"
    )]
    Stale {
        /// The home.
        home: PathBuf,
        /// The checkpoint's generation.
        checkpoint: u64,
        /// The home's.
        current: u64,
    },
    /// The home's generation is older than the checkpoint's: it is not the home the
    /// checkpoint was taken in (a copy, or a backup put back).
    #[error(
        "the VM home {home} is at generation {current}, older than the checkpoint's {checkpoint}: it is not the \
         home this checkpoint was taken in; restore with --revert to use it anyway"
    )]
    HomeBehind {
        /// The home.
        home: PathBuf,
        /// The checkpoint's generation.
        checkpoint: u64,
        /// The home's.
        current: u64,
    },
    /// The checkpoint has no generation (an older Ferry wrote it) and the home has one.
    #[error(
        "the checkpoint was written by a Ferry without generations, and the VM in {home} is at generation \
         {current}: Ferry cannot tell whether the VM ran on since; restore with --revert if it did not"
    )]
    Unversioned {
        /// The home.
        home: PathBuf,
        /// The home's generation.
        current: u64,
    },
    /// The home belongs to another VM.
    #[error("the VM home {home} belongs to VM {home_vm}, not to the checkpoint's VM {checkpoint_vm}")]
    OtherVm {
        /// The home.
        home: PathBuf,
        /// Its VM.
        home_vm: String,
        /// The checkpoint's VM.
        checkpoint_vm: String,
    },
    /// The home's identity or generation cannot be read or written.
    #[error(transparent)]
    Home(#[from] crate::home::Error),
}

/// What `ferry restore` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The checkpoint directory.
    pub from: PathBuf,
    /// The serial console.
    pub serial: SerialConfig,
    /// Serve the API here.
    pub api_socket: Option<PathBuf>,
    /// The VM's home; `None` means the one the checkpoint names, or a new default one.
    pub home: Option<PathBuf>,
    /// Where default homes go.
    pub state_dir: PathBuf,
    /// The VM's lease on shared storage (`None`: `vm.lock` alone arbitrates).
    pub lease: Option<crate::lease::LeaseConfig>,
    /// `CLOCK_MONOTONIC` ns at process start.
    pub started_ns: u64,
    /// Taps to use instead of the checkpoint's: `(name then, name now)`.
    pub tap_map: Vec<(String, String)>,
    /// Restore even if the VM ran on past the checkpoint (the operator vouches that the
    /// disks match it).
    pub revert: bool,
    /// CPU features treated as absent from this host (`--cpu-hide`): a checkpoint whose
    /// CPUID has one is refused as on a host without it.
    pub cpu_hide: Vec<String>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks `dir` can take a snapshot; returns whether it had to be created.
fn prepare_target(dir: &Path) -> Result<bool, SnapshotError> {
    let unwritable = |source| SnapshotError::Unwritable { path: dir.to_owned(), source };
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(SnapshotError::NotADirectory(dir.to_owned())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir).map_err(unwritable)?;
            if entries.next().is_some() {
                return Err(SnapshotError::NotEmpty(dir.to_owned()));
            }
            // Prove we can create files there before pausing anything.
            let probe = dir.join(".ferry-write-test");
            std::fs::write(&probe, b"").map_err(unwritable)?;
            let _ = std::fs::remove_file(&probe);
            Ok(false)
        }
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(unwritable)?;
            Ok(true)
        }
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

impl Vmm {
    /// Pauses every vCPU and waits until all are out of the guest.
    pub(crate) fn pause_vcpus(&mut self) -> Result<(), crate::vcpu::Error> {
        for v in &self.vcpus {
            v.request(VcpuRequest::Pause);
        }
        for v in &self.vcpus {
            v.wait_for(RunState::Paused, PAUSE_TIMEOUT)?;
        }
        self.state = VmRunState::Paused;
        self.record_stop();
        Ok(())
    }

    /// Lets every vCPU run again, after raising the VM's generation (durably, under its
    /// lock): from now on no state taken before this moment may run. If the generation
    /// cannot be raised the VM stays paused.
    pub(crate) fn resume_vcpus(&mut self) -> Result<(), Error> {
        self.start_generation()?;
        for v in &self.vcpus {
            v.request(VcpuRequest::Run);
        }
        self.state = VmRunState::Running;
        Ok(())
    }

    /// Before any vCPU runs: the lock must be held, the state this VMM holds must still be
    /// the newest, and the generation is raised and the start recorded.
    pub(crate) fn start_generation(&mut self) -> Result<u64, Error> {
        if !self.home.is_held() {
            return Err(Error::NotLocked(self.home.dir().to_owned()));
        }
        if let Some(state) = self.state_generation {
            let current = self.home.generation();
            if current != Some(state) {
                return Err(Error::Stale { home: self.home.dir().to_owned(), state, current });
            }
        }
        let generation = self.home.raise_generation()?;
        // The state this VMM held is now older than the VM: only this VMM's own, running
        // on, may go further.
        self.state_generation = None;
        self.home.record_run(crate::home::RunEvent::Run, self.migrated_in.as_deref());
        self.run_recorded = true;
        Ok(generation)
    }

    /// Records in the home that the vCPUs have stopped (once per start).
    pub(crate) fn record_stop(&mut self) {
        if self.run_recorded {
            self.home.record_run(crate::home::RunEvent::Stop, self.migrated_in.as_deref());
            self.run_recorded = false;
        }
    }

    /// Captures the whole VM's state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmSnapshot, SnapshotError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (v, cpuid) in self.vcpus.iter().zip(&self.cpuid) {
            vcpus.push(v.with_fd(|fd| VcpuState::save(fd, &self.kvm, cpuid, &self.msrs))??);
        }
        let vm = VmState::save(&self.vm)?;
        let serial = self.devices.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
        let memory_regions =
            self.memory.iter().map(|r| RegionState { guest_addr: r.start_addr().0, len: r.len() }).collect();
        Ok(VmSnapshot {
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ms: unix_ms(),
            description: self.description.clone(),
            memory_regions,
            vm,
            vcpus,
            serial,
            home: Some(self.home.dir().to_owned()),
            virtio: self.devices.virtio.save(),
            vm_uuid: self.home.vm_uuid().map(str::to_owned),
            generation: self.home.generation(),
        })
    }

    /// Writes a checkpoint to `request.to`. Unless `request.stop`, the VM goes on as it was
    /// (running or paused); with `stop`, its vCPUs stay paused and the caller ends the VM.
    pub fn snapshot(&mut self, request: &SnapshotRequest) -> Result<SnapshotReport, SnapshotError> {
        let started = Instant::now();
        let dir = request.to.clone();
        let created = prepare_target(&dir)?;
        let was_running = self.state == VmRunState::Running;
        if was_running {
            if let Err(e) = self.pause_vcpus() {
                if let Err(r) = self.resume_vcpus() {
                    tracing::error!(
                        "the VM cannot resume and stays paused: {}",
                        crate::migration::error_chain(&r)
                    );
                }
                return Err(e.into());
            }
        }
        let paused_at = Instant::now();
        let result = self.write_checkpoint(&dir);
        if (result.is_err() || !request.stop) && was_running {
            if let Err(e) = self.resume_vcpus() {
                tracing::error!(
                    "after the snapshot the VM cannot resume and stays paused: {}",
                    crate::migration::error_chain(&e)
                );
            }
        }
        let paused_ms = if was_running { paused_at.elapsed().as_secs_f64() * 1e3 } else { 0.0 };
        match result {
            Ok((stats, state_bytes)) => {
                let report = SnapshotReport {
                    path: dir.clone(),
                    stopped: request.stop,
                    total_ms: started.elapsed().as_secs_f64() * 1e3,
                    paused_ms,
                    memory_bytes: self.description.memory,
                    memory_written_bytes: stats.bytes_written,
                    zero_pages: stats.zero_pages,
                    state_bytes,
                    disk_bytes: allocated_bytes(&dir.join(MEMORY_FILE))
                        + allocated_bytes(&dir.join(STATE_FILE)),
                };
                tracing::info!(
                    path = %dir.display(),
                    total_ms = format_args!("{:.1}", report.total_ms),
                    paused_ms = format_args!("{:.1}", report.paused_ms),
                    written_mib = stats.bytes_written >> 20,
                    "snapshot written"
                );
                Ok(report)
            }
            Err(e) => {
                let _ = std::fs::remove_file(dir.join(MEMORY_FILE));
                let _ = std::fs::remove_file(dir.join(STATE_FILE));
                if created {
                    let _ = std::fs::remove_dir(&dir);
                }
                tracing::warn!("snapshot to {} failed: {e}; the VM goes on", dir.display());
                Err(e)
            }
        }
    }

    fn write_checkpoint(&self, dir: &Path) -> Result<(memfile::WriteStats, u64), SnapshotError> {
        let state = self.save_state()?;
        let stats = memfile::write_sparse(&self.memory, &dir.join(MEMORY_FILE))?;
        let path = write_state_file(dir, &state)?;
        let state_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok((stats, state_bytes))
    }

    /// Builds a VM from the checkpoint in `config.from`. Its vCPUs start with [`Vmm::run`].
    /// Stops when `stop` fires, as [`Vmm::build`].
    pub fn restore(config: RestoreConfig, stop: StopSource) -> Result<Self, Error> {
        let dir = &config.from;
        match std::fs::metadata(dir) {
            Err(_) => return Err(RestoreError::NoDirectory(dir.clone()).into()),
            Ok(m) if !m.is_dir() => return Err(RestoreError::NotADirectory(dir.clone()).into()),
            Ok(_) => {}
        }
        let snap: VmSnapshot = read_state_file(dir).map_err(RestoreError::from)?;
        let host = open_host(&config.cpu_hide)?;
        check_consistent(&snap, host.max_vcpus)?;
        // CPU features and the memory file, before the home is claimed: a checkpoint this
        // host cannot run neither takes the lease (raising its version) nor the lock.
        for (i, v) in snap.vcpus.iter().enumerate() {
            let entries: Vec<kvm_cpuid_entry2> = v.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
            let missing = ferry_arch::cpuid::missing_features(&entries, &host.supported);
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(|f| f.to_string()).collect();
                return Err(RestoreError::MissingFeatures(format!("{} (vCPU {i})", names.join(", "))).into());
            }
        }
        let regions: Vec<(GuestAddress, u64)> =
            snap.memory_regions.iter().map(|r| (GuestAddress(r.guest_addr), r.len)).collect();
        let mem = memfile::map_private(&dir.join(MEMORY_FILE), &regions).map_err(RestoreError::from)?;

        let target = config.home.as_deref().or(snap.home.as_deref());
        let (mut claim, home_is_default) =
            crate::lock_home(target, &config.state_dir, false, config.lease.clone())?;
        let same_home = match (target, &snap.home) {
            (Some(t), Some(h)) => same_dir(t, h),
            _ => false,
        };
        let state_generation = adopt_checkpoint(claim.home_mut(), &snap, same_home, config.revert)?;

        // The disks (locked) and taps, before anything else is created.
        let backends: Vec<crate::virtio::Backend> = snap.virtio.iter().map(|v| v.backend.clone()).collect();
        let (opened, backends) = crate::virtio::open_backends(&backends, true, &config.tap_map)?;

        let vm_fd = vm::create_vm(&host.kvm, &mem)?;
        Vmm::from_snapshot(Parts {
            host,
            memory: mem,
            vm: vm_fd,
            snap,
            serial: config.serial,
            api_socket: config.api_socket,
            home: claim,
            home_is_default,
            started_ns: config.started_ns,
            restored_from: Some(dir.clone()),
            signals: stop,
            opened,
            backends,
            state_generation,
        })
    }

    /// Builds the VM around restored memory from the rest of a checkpoint: devices, vCPUs
    /// (threads waiting in `Created`), in-kernel devices and clock. Shared by restore and
    /// the migration destination.
    pub(crate) fn from_snapshot(p: Parts) -> Result<Self, Error> {
        let Parts { host, memory: mem, vm: vm_fd, snap, serial, api_socket, home, home_is_default, .. } = p;
        let virtio =
            crate::virtio::VirtioDevices::restore(&vm_fd, &mem, &snap.virtio, &p.backends, p.opened)?;
        let devices = create_devices(&vm_fd, &serial, Some(&snap.serial), virtio)?;
        let exit = Arc::new(ExitNotifier::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(efd("the VM exit eventfd"))?,
        ));
        let throttle = Arc::new(crate::vcpu::Throttle::default());
        let ctx = VcpuContext {
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            memory: mem.clone(),
            exit: exit.clone(),
            throttle: throttle.clone(),
        };

        let mut fds = Vec::with_capacity(snap.vcpus.len());
        for (i, state) in snap.vcpus.iter().enumerate() {
            let index = i as u8;
            let fd = vm_fd.create_vcpu(index as u64).map_err(|source| Error::CreateVcpu { index, source })?;
            state.restore(&fd).map_err(RestoreError::from)?;
            fds.push(fd);
        }
        snap.vm.restore(&vm_fd).map_err(RestoreError::from)?;
        let saved: Vec<u32> =
            snap.vcpus.first().map(|v| v.msrs.iter().map(|&(i, _)| i).collect()).unwrap_or_default();
        let (vcpus, msrs) = crate::spawn_vcpus(&host.kvm, fds, &ctx, Some(saved))?;
        tracing::info!(memory_mib = snap.description.memory >> 20, "restored {}", snap.description.kernel);
        Ok(Vmm {
            vcpus,
            vm: Arc::new(vm_fd),
            kvm: host.kvm,
            memory: mem,
            devices,
            exit,
            signals: Some(p.signals),
            description: snap.description,
            serial_config: serial,
            api_socket,
            msrs,
            cpuid: snap.vcpus.iter().map(|v| v.cpuid.clone()).collect(),
            state: VmRunState::Running,
            started: Instant::now(),
            started_ns: p.started_ns,
            restored_from: p.restored_from,
            home: home.into_home(),
            home_is_default,
            migration: None,
            last_migration: None,
            activation: None,
            state_generation: p.state_generation,
            run_recorded: false,
            fenced: None,
            fence_record: None,
            migrated_in: None,
            events: Default::default(),
            api_server: None,
            throttle,
        })
    }
}

/// Whether two paths name the same directory (or, if either does not exist, the same path).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Applies the generation rule to a checkpoint about to be restored into `home` (locked):
/// returns the generation the restored VM may run at (`None`: any, after `--revert`).
///
/// - A home without identity (new, or the checkpoint's own whose files went) takes the
///   checkpoint's identity if it is the checkpoint's own home, else a new one (a clone).
/// - Otherwise the checkpoint must be of the home's VM and of its current generation: an
///   older one means the VM ran on past it, which only `--revert` accepts.
fn adopt_checkpoint(
    home: &mut crate::home::VmHome,
    snap: &VmSnapshot,
    same_home: bool,
    revert: bool,
) -> Result<Option<u64>, RestoreError> {
    let Some(record) = home.record().cloned() else {
        let uuid = snap.vm_uuid.clone().filter(|_| same_home).unwrap_or_else(crate::home::new_uuid);
        let generation = snap.generation.unwrap_or(0);
        home.init_identity(uuid, generation)?;
        return Ok(Some(generation));
    };
    if let Some(vm) = &snap.vm_uuid {
        if *vm != record.vm_uuid {
            return Err(RestoreError::OtherVm {
                home: home.dir().to_owned(),
                home_vm: record.vm_uuid,
                checkpoint_vm: vm.clone(),
            });
        }
    }
    let current = record.generation;
    match snap.generation {
        Some(g) if g == current => Ok(Some(g)),
        _ if revert => {
            tracing::warn!(
                "restoring a checkpoint of generation {:?} over generation {current} of {} (--revert)",
                snap.generation,
                home.dir().display()
            );
            Ok(None)
        }
        Some(checkpoint) if checkpoint < current => {
            Err(RestoreError::Stale { home: home.dir().to_owned(), checkpoint, current })
        }
        Some(checkpoint) => {
            Err(RestoreError::HomeBehind { home: home.dir().to_owned(), checkpoint, current })
        }
        None => Err(RestoreError::Unversioned { home: home.dir().to_owned(), current }),
    }
}

/// What [`Vmm::from_snapshot`] builds a VM from.
pub(crate) struct Parts {
    pub host: crate::Host,
    pub memory: crate::memory::GuestMemory,
    pub vm: kvm_ioctls::VmFd,
    pub snap: VmSnapshot,
    pub serial: SerialConfig,
    pub api_socket: Option<PathBuf>,
    pub home: crate::Claim,
    pub home_is_default: bool,
    pub started_ns: u64,
    pub restored_from: Option<PathBuf>,
    pub signals: crate::stop::StopSource,
    /// What backs `snap.virtio`, opened by the caller (disks locked for a restore; not yet
    /// for a migration destination, which locks them at the switchover).
    pub opened: crate::virtio::Opened,
    /// `snap.virtio`'s backends as they are named on this host (taps may differ).
    pub backends: Vec<crate::virtio::Backend>,
    /// The generation the restored VM may run at (see [`Vmm::start_generation`]).
    pub state_generation: Option<u64>,
}

/// Checks the parts of a state that must agree with each other.
pub(crate) fn check_consistent(snap: &VmSnapshot, max_vcpus: usize) -> Result<(), RestoreError> {
    let bad = |m: String| Err(RestoreError::Inconsistent(m));
    let d = &snap.description;
    if snap.vcpus.is_empty() || snap.vcpus.len() > max_vcpus || snap.vcpus.len() != d.vcpus as usize {
        return bad(format!(
            "{} vCPU states for a VM of {} vCPUs (this host allows {max_vcpus})",
            snap.vcpus.len(),
            d.vcpus
        ));
    }
    let expected: Vec<RegionState> = layout::ram_ranges(d.memory)
        .into_iter()
        .map(|(a, l)| RegionState { guest_addr: a.0, len: l })
        .collect();
    if snap.memory_regions != expected {
        return bad(format!(
            "memory regions {:?} do not match a {}-byte guest",
            snap.memory_regions, d.memory
        ));
    }
    Ok(())
}
