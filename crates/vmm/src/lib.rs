//! The Ferry virtual machine monitor: one process per VM.
//!
//! [`Vmm::build`] turns a [`VmConfig`] into a VM ready to run: KVM opened and checked,
//! guest memory mapped (lazily), the kernel booted through PVH ([`ferry_boot`]), the
//! devices placed ([`ferry_devices`]), one thread per vCPU ([`vcpu`]).
//! [`Vmm::restore`] builds the same from a checkpoint ([`persist`]). [`Vmm::run`] then runs
//! the guest until it powers off, fails, is suspended, or the process is asked to stop,
//! serving the API socket meanwhile ([`api`]).
//!
//! The library leaves the process to its caller: it reads no environment variable, never
//! changes the signal mask (a [`StopSource`] says when to stop: the `ferry` binary's
//! signalfd for SIGTERM/SIGINT, or a [`StopHandle`] a program keeps), and reads stdin only
//! when told to ([`SerialConfig::Stdio`]).

pub mod api;
pub mod config;
pub mod dirty;
pub mod disk;
mod fence;
pub mod home;
pub mod lease;
pub mod memory;
pub mod migration;
pub mod persist;
pub mod stop;
pub mod vcpu;
pub mod virtio;
pub mod vm;

mod run;

use std::fs::File;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_arch::cpuid::{self, FeatureMask, Topology};
use ferry_arch::regs;
use ferry_boot::Initrd;
use ferry_devices::boot_timer::{BootTimer, FirstWrite};
use ferry_devices::i8042::I8042;
use ferry_devices::serial::{self, Serial, SerialOutput, SerialState};
use ferry_devices::Bus;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

pub use config::{KernelSource, SerialConfig, VmConfig};
pub use ferry_devices::boot_timer::monotonic_ns;
pub use persist::RestoreConfig;
pub use run::RunOutcome;
pub use stop::{StopHandle, StopSource};
pub use vcpu::{GuestFault, StopReason};

use crate::disk::Disk;
use crate::memory::GuestMemory;
use crate::vcpu::{ExitNotifier, VcpuContext, VcpuHandle};
use crate::virtio::VirtioDevices;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// KVM is unusable.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// A feature to hide (`--cpu-hide`) is not one Ferry knows.
    #[error(transparent)]
    CpuHide(#[from] ferry_arch::cpuid::UnknownFeature),
    /// Guest memory cannot be created.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd file cannot be opened.
    #[error("cannot open initrd {path}")]
    OpenInitrd {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel or initrd cannot be loaded.
    #[error("cannot boot {kernel}")]
    Boot {
        /// Kernel name.
        kernel: String,
        /// Why.
        #[source]
        source: ferry_boot::Error,
    },
    /// CPUID cannot be built.
    #[error("cannot build the vCPUs' CPUID")]
    Cpuid(#[from] cpuid::Error),
    /// A vCPU cannot be created or set up.
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU's boot state cannot be set.
    #[error("cannot set up vCPU {index}")]
    SetupVcpu {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: regs::Error,
    },
    /// A device cannot be created.
    #[error("cannot set up the serial console")]
    Serial(#[from] serial::Error),
    /// A device cannot be placed.
    #[error("cannot place a device on the I/O bus")]
    Bus(#[from] ferry_devices::bus::Error),
    /// An eventfd cannot be made or registered.
    #[error("cannot set up {what}")]
    EventFd {
        /// What it was for.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// KVM refused to report or take vCPU or VM state.
    #[error("cannot access the vCPU state")]
    State(#[from] ferry_arch::state::Error),
    /// The VM's home cannot be locked.
    #[error(transparent)]
    Home(#[from] home::Error),
    /// Restoring from a checkpoint failed.
    #[error(transparent)]
    Restore(#[from] persist::RestoreError),
    /// The API socket cannot be served.
    #[error(transparent)]
    Api(#[from] ferry_api::server::Error),
    /// The guest failed.
    #[error(transparent)]
    Guest(#[from] GuestFault),
    /// The guest stopped and reported a failure on its exit status port.
    #[error("the guest stopped with failure status {0} (its console says why)")]
    GuestFailed(u8),
    /// The run loop failed.
    #[error("the VMM's event loop failed")]
    EventLoop(#[source] std::io::Error),
    /// A migration failed (receive side), or was interrupted.
    #[error(transparent)]
    Migration(Box<migration::Error>),
    /// The VM was lost in a migration (the destination failed after taking it over).
    #[error("the VM was lost in a migration: {0}")]
    MigrationLost(String),
    /// The ACPI tables could not be built.
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] ferry_acpi::Error),
    /// A virtio device (or the disk image behind it) could not be set up.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
    /// The VMM does not hold the VM's lock, so it must not run the VM.
    #[error("VM home {0} is not locked by this VMM: refusing to start the vCPUs")]
    NotLocked(PathBuf),
    /// The state this VMM holds is older than the VM's current generation: the VM ran on
    /// past it, so running it would bring back a stale VM.
    #[error(
        "refusing to run a stale copy of the VM in {home}: its state is of generation {state}, but the VM \
         has run on since (generation {current:?})"
    )]
    Stale {
        /// The VM's home.
        home: PathBuf,
        /// The generation of the state held here.
        state: u64,
        /// The home's current generation.
        current: Option<u64>,
    },
}

fn efd(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::EventFd { what, source }
}

pub use ferry_migration::schema::Description;

/// Whether the guest runs (the VMM's view; each vCPU thread has its own state machine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRunState {
    /// vCPUs run.
    Running,
    /// vCPUs are paused by request.
    Paused,
}

/// The devices of a VM.
struct Devices {
    serial: Arc<Mutex<Serial>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    virtio: VirtioDevices,
    reset_evt: EventFd,
    boot_timer: FirstWrite,
    /// What the guest wrote to its exit status port before powering off.
    exit_status: ferry_devices::exit_status::Status,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field("virtio", &self.virtio)
            .finish()
    }
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vmm {
    // Field order is drop order: vCPUs, then the VM, then the memory it maps.
    vcpus: Vec<VcpuHandle>,
    vm: Arc<VmFd>,
    kvm: Kvm,
    memory: GuestMemory,
    devices: Devices,
    exit: Arc<ExitNotifier>,
    signals: Option<stop::StopSource>,
    description: Description,
    serial_config: SerialConfig,
    api_socket: Option<PathBuf>,
    msrs: Vec<u32>,
    /// The CPUID table each vCPU was given.
    cpuid: Vec<Vec<ferry_arch::state::CpuidEntry>>,
    state: VmRunState,
    started: Instant,
    started_ns: u64,
    restored_from: Option<PathBuf>,
    /// The home whose lock this VMM holds.
    home: home::VmHome,
    /// Whether Ferry made the home (and removes it when the VM ends for good).
    home_is_default: bool,
    /// The outgoing migration in progress.
    migration: Option<migration::Outgoing>,
    /// The last outgoing migration's final status.
    last_migration: Option<ferry_api::MigrationInfo>,
    /// On a migration destination: the connection to tell the source the VM runs.
    activation: Option<migration::Activation>,
    /// The generation of the state this VMM was built from (a checkpoint or a migration's
    /// State): it may run only while that is still the home's generation. `None` for a VM
    /// booted afresh, or restored with `--revert`.
    state_generation: Option<u64>,
    /// Whether `runs.log` shows the vCPUs running (a `run` without its `stop`).
    run_recorded: bool,
    /// Why the VMM fenced itself (its lease failed), while it stays fenced.
    fenced: Option<String>,
    /// The fence's stop record, written from a thread (the datastore may hang).
    fence_record: Option<std::sync::mpsc::Receiver<()>>,
    /// The migration that brought the VM here, for the run records.
    migrated_in: Option<String>,
    /// The vCPU throttle (auto-converge while a migration runs; 0 otherwise).
    throttle: Arc<vcpu::Throttle>,
    /// Migration events for `GET /vm/events` (both sides; a destination's come from
    /// [`Vmm::receive`]).
    events: std::sync::Arc<ferry_api::events::Events>,
    /// On a migration destination with an API socket: the server that has served it since
    /// `ferry receive` started, and the handler to point at this VM ([`Vmm::run`]).
    api_server: Option<(ferry_api::server::ServerHandle, std::sync::Arc<ferry_api::server::Delegate>)>,
}

/// A home locked for a VM being built. If the build fails, a home this VMM made (the
/// default one, or a directory that did not exist) is removed again, so that a VM that
/// could not start leaves nothing behind.
pub(crate) struct Claim {
    home: home::VmHome,
    made: bool,
}

impl Claim {
    /// A home this VMM did not make: never removed.
    pub(crate) fn existing(home: home::VmHome) -> Self {
        Self { home, made: false }
    }

    /// The build succeeded: the home is the VM's.
    pub(crate) fn into_home(mut self) -> home::VmHome {
        self.made = false;
        std::mem::replace(&mut self.home, home::VmHome::unlocked(std::path::Path::new("")))
    }

    fn home_mut(&mut self) -> &mut home::VmHome {
        &mut self.home
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.made {
            self.home.remove();
        }
    }
}

/// Locks `requested` or a new default home under `state_dir`; returns it and whether it is
/// a default one. For a VM booted from its definition (`boot`), a home without identity
/// gets one; a restore gives it the checkpoint's instead.
fn lock_home(
    requested: Option<&std::path::Path>,
    state_dir: &std::path::Path,
    boot: bool,
    lease: Option<lease::LeaseConfig>,
) -> Result<(Claim, bool), Error> {
    let (dir, is_default) = match requested {
        Some(dir) => (dir.to_owned(), false),
        None => (home::default_home(state_dir, &new_vm_id()), true),
    };
    let made = !dir.exists();
    let home = home::VmHome::lock_leased(&dir, lease, boot)?;
    Ok((Claim { home, made }, is_default))
}

/// Starts one thread per vCPU; the threads wait in `Created` until [`Vmm::run`] lets them
/// run. Returns them with the MSRs a checkpoint must save: `known` (a restored VM keeps
/// the set it was saved with) or, for a new VM, those this host's KVM can save.
fn spawn_vcpus(
    kvm: &Kvm,
    fds: Vec<VcpuFd>,
    ctx: &VcpuContext,
    known: Option<Vec<u32>>,
) -> Result<(Vec<VcpuHandle>, Vec<u32>), Error> {
    let msrs = match (known, fds.first()) {
        (Some(m), _) => m,
        (None, Some(fd)) => ferry_arch::state::saveable_msrs(kvm, fd)?,
        (None, None) => Vec::new(),
    };
    let mut vcpus = Vec::with_capacity(fds.len());
    for (index, fd) in fds.into_iter().enumerate() {
        vcpus.push(VcpuHandle::spawn(index as u8, fd, ctx.clone())?);
    }
    Ok((vcpus, msrs))
}

/// A fresh VM id: 8 random hex digits.
fn new_vm_id() -> String {
    let mut b = [0u8; 4];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("vm-{:02x}{:02x}{:02x}{:02x}-{}", b[0], b[1], b[2], b[3], std::process::id())
}

/// KVM opened and checked, with the host's CPUID; the first step of build and restore.
pub(crate) struct Host {
    pub(crate) kvm: Kvm,
    pub(crate) supported: kvm_bindings::CpuId,
    pub(crate) max_vcpus: usize,
}

/// Opens KVM; `hide` are CPU features (names as [`ferry_arch::cpuid::feature_names`]) treated
/// as absent from this host (`--cpu-hide`): a VM built here never sees them, and a VM whose
/// CPUID has one is refused here as on a host without it.
pub(crate) fn open_host(hide: &[String]) -> Result<Host, Error> {
    let kvm = vm::open_kvm()?;
    let max_vcpus = kvm.get_max_vcpus().min(usize::from(u8::MAX));
    let mut supported = vm::supported_cpuid(&kvm)?;
    cpuid::hide_features(&mut supported, hide)?;
    Ok(Host { kvm, supported, max_vcpus })
}

fn create_devices(
    vm_fd: &VmFd,
    serial_config: &SerialConfig,
    serial_state: Option<&SerialState>,
    virtio: VirtioDevices,
) -> Result<Devices, Error> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(efd("the serial interrupt"))?;
    vm_fd.register_irqfd(&serial_irq, serial::COM1_IRQ).map_err(|e| Error::EventFd {
        what: "the serial interrupt",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let out = match serial_config {
        SerialConfig::Stdio => SerialOutput::Stdout,
        SerialConfig::File(path) => SerialOutput::file(path)?,
        SerialConfig::Null => SerialOutput::Sink,
    };
    let serial = match serial_state {
        Some(state) => Serial::restore(state, serial_irq, out)?,
        None => Serial::new(serial_irq, out),
    };
    let serial = Arc::new(Mutex::new(serial));
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(efd("the reset eventfd"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(reset_evt.try_clone().map_err(efd("the reset eventfd"))?)));
    let boot_timer = FirstWrite::default();
    let mut pio = Bus::new();
    pio.insert(serial::COM1_PORT.into(), serial::PORT_COUNT.into(), serial.clone())?;
    pio.insert(0x60, 5, i8042)?;
    pio.insert(0x80, 1, Arc::new(Mutex::new(BootTimer::new(boot_timer.clone()))))?;
    let exit_status = ferry_devices::exit_status::Status::default();
    pio.insert(
        ferry_devices::exit_status::PORT.into(),
        1,
        Arc::new(Mutex::new(ferry_devices::exit_status::ExitStatus::new(exit_status.clone()))),
    )?;
    let mut mmio = Bus::new();
    virtio.attach(&mut mmio)?;
    Ok(Devices {
        serial,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        virtio,
        reset_evt,
        boot_timer,
        exit_status,
    })
}

impl Vmm {
    /// The feature bits of the CPUID vCPU 0 gives the guest, by name where Ferry knows one.
    pub(crate) fn cpu_features(&self) -> Vec<String> {
        let Some(table) = self.cpuid.first() else { return Vec::new() };
        let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = table.iter().map(Into::into).collect();
        // Every feature bit the guest has is one an empty table lacks.
        match kvm_bindings::CpuId::new(0) {
            Ok(empty) => cpuid::missing_features(&entries, &empty).iter().map(ToString::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// What the VM's state needs from a host that restores it beyond feature bits: vCPU 0's
    /// CPUID (XSAVE, TSC), the MSRs its state carries, the KVM capabilities it was saved with.
    pub(crate) fn cpu_model(&self) -> ferry_arch::model::VmCpuModel {
        let table = self.cpuid.first().map(Vec::as_slice).unwrap_or_default();
        ferry_arch::model::vm_model(table, &self.msrs, ferry_arch::model::kvm_capabilities(&self.kvm))
    }

    /// Builds the VM described by `config`. Nothing runs until [`Vmm::run`], which stops
    /// when `stop` fires (see [`stop`]: the library never touches the signal mask).
    pub fn build(config: VmConfig, stop: StopSource) -> Result<Self, Error> {
        let host = open_host(&config.cpu_hide)?;
        config.validate(host.max_vcpus)?;
        // The VM runs in one VMM only: take its home's lock before anything else.
        let (claim, home_is_default) =
            lock_home(config.home.as_deref(), &config.state_dir, true, config.lease.clone())?;
        // Checked above: 1..=255.
        let vcpu_count = config.vcpus as u8;

        memory::check_size(config.memory, memory::host_ram(), vm::phys_bits(&host.supported))?;
        // Disks (locked) and taps, before anything else is created.
        Disk::check_distinct(&config.disks).map_err(virtio::Error::from)?;
        let backends: Vec<virtio::Backend> = config
            .disks
            .iter()
            .cloned()
            .map(virtio::Backend::Disk)
            .chain(config.nets.iter().cloned().map(virtio::Backend::Net))
            .collect();
        let (opened, backends) = virtio::open_backends(&backends, true, &[])?;
        let mem = memory::create(config.memory)?;
        let vm_fd = vm::create_vm(&host.kvm, &mem)?;
        let virtio = VirtioDevices::create(&vm_fd, &mem, &backends, opened)?;
        let cmdline = match virtio.cmdline() {
            extra if extra.is_empty() => config.cmdline.clone(),
            extra if config.cmdline.is_empty() => extra,
            extra => format!("{} {extra}", config.cmdline),
        };

        // Boot: kernel, command line, initrd, start info, boot GDT.
        let kernel_name = config.kernel.name();
        let boot_err = |source| Error::Boot { kernel: kernel_name.clone(), source };
        let initrd = match &config.initrd {
            Some(path) => {
                let open_err = |source| Error::OpenInitrd { path: path.clone(), source };
                let f = File::open(path).map_err(open_err)?;
                let meta = f.metadata().map_err(|source| Error::OpenInitrd { path: path.clone(), source })?;
                if meta.is_dir() {
                    return Err(Error::OpenInitrd {
                        path: path.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "it is a directory"),
                    });
                }
                Some(Initrd { source: f, size: meta.len() })
            }
            None => None,
        };
        let boot = match &config.kernel {
            KernelSource::File(path) => {
                let mut f =
                    File::open(path).map_err(|source| Error::OpenKernel { path: path.clone(), source })?;
                ferry_boot::load_pvh(&mem, config.memory, &mut f, &cmdline, initrd)
            }
            KernelSource::Embedded { elf, .. } => {
                ferry_boot::load_pvh(&mem, config.memory, &mut Cursor::new(*elf), &cmdline, initrd)
            }
        }
        .map_err(boot_err)?;
        regs::write_boot_tables(&mem).map_err(|source| Error::SetupVcpu { index: 0, source })?;
        // ACPI: the CPUs (MADT) and the virtio devices (DSDT), for guests that read them.
        let rsdp = ferry_acpi::write_tables(&mem, vcpu_count, &virtio.acpi_devices())?;
        ferry_boot::set_rsdp(&mem, rsdp).map_err(boot_err)?;
        tracing::debug!(entry = format_args!("{:#x}", boot.entry.0), initrd = ?boot.initrd, "kernel loaded");

        let devices = create_devices(&vm_fd, &config.serial, None, virtio)?;
        let exit = Arc::new(ExitNotifier::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(efd("the VM exit eventfd"))?,
        ));

        // vCPUs.
        let mask = FeatureMask::default();
        let throttle = Arc::new(crate::vcpu::Throttle::default());
        let ctx = VcpuContext {
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            memory: mem.clone(),
            exit: exit.clone(),
            throttle: throttle.clone(),
        };
        let mut fds: Vec<VcpuFd> = Vec::with_capacity(usize::from(vcpu_count));
        let mut tables = Vec::with_capacity(usize::from(vcpu_count));
        for index in 0..vcpu_count {
            let fd =
                vm_fd.create_vcpu(u64::from(index)).map_err(|source| Error::CreateVcpu { index, source })?;
            let tsc_khz = fd.get_tsc_khz().ok();
            let table =
                cpuid::vcpu_cpuid(&host.supported, Topology { index, count: vcpu_count }, tsc_khz, &mask)?;
            fd.set_cpuid2(&table).map_err(|source| Error::CreateVcpu { index, source })?;
            tables.push(table.as_slice().iter().map(ferry_arch::state::CpuidEntry::from).collect());
            let setup = |r: Result<(), regs::Error>| r.map_err(|source| Error::SetupVcpu { index, source });
            setup(regs::setup_msrs(&fd))?;
            setup(regs::setup_fpu(&fd))?;
            setup(regs::setup_lint(&fd))?;
            if index == 0 {
                setup(regs::setup_pvh_registers(&fd, boot.entry, boot.start_info))?;
            }
            fds.push(fd);
        }
        let (vcpus, msrs) = spawn_vcpus(&host.kvm, fds, &ctx, None)?;

        let description = Description {
            memory: config.memory,
            vcpus: config.vcpus,
            kernel: kernel_name,
            cmdline: config.cmdline.clone(),
        };
        Ok(Self {
            vcpus,
            vm: Arc::new(vm_fd),
            kvm: host.kvm,
            memory: mem,
            devices,
            exit,
            signals: Some(stop),
            description,
            serial_config: config.serial,
            api_socket: config.api_socket,
            msrs,
            cpuid: tables,
            state: VmRunState::Running,
            started: Instant::now(),
            started_ns: config.started_ns,
            restored_from: None,
            home: claim.into_home(),
            home_is_default,
            migration: None,
            last_migration: None,
            activation: None,
            state_generation: None,
            run_recorded: false,
            fenced: None,
            fence_record: None,
            migrated_in: None,
            events: Default::default(),
            api_server: None,
            throttle,
        })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The KVM VM handle.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The VM's home directory.
    pub fn home(&self) -> &std::path::Path {
        self.home.dir()
    }

    /// Whether the VM runs under a lease on shared storage (`--lease`): then nothing on the
    /// VMM thread may wait for the datastore, which can hang.
    pub fn leased(&self) -> bool {
        self.home.lease().is_some()
    }

    /// What the VM is.
    pub fn description(&self) -> &Description {
        &self.description
    }
}
