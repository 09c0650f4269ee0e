//! The daemon's core: registered VMs, their lifecycle, supervision of their VMM processes,
//! and reconciliation of the database with the homes at start-up.
//!
//! Each VMM is `ferry run` (or `ferry restore` for a resume) in a session of its own
//! (setsid), stdin from /dev/null, stdout and stderr appended to `HOME/vm.log`, its API on
//! `STATE_DIR/run/NAME.sock`, so it outlives the daemon. A watcher thread waits for each VMM
//! the daemon spawned (its exit status and signal) or, for one re-adopted after a restart, for
//! its pidfd to become readable; then `on_exit` records how it ended: `crashed` (with the
//! last log lines) unless the daemon asked it to end. Nothing restarts it.
//!
//! State transitions are checked by [`transition`]; the table is in `docs/host.md`.
//!
//! Here: the daemon's state, queries, create and register, the inventory. `lifecycle.rs`:
//! start, stop, kill, suspend, resume, snapshot. `supervise.rs`: the watchers and start-up
//! reconciliation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_host_api::{
    CreateVm, DatastoreInfo, HostInfo, MemoryInfo, PortGroupInfo, RegisterVm, VmDefinition, VmDetail, VmList,
    VmLog, VmState, VmSummary,
};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::db::{Db, VmRow};
use crate::vmdef;

pub mod fault;
mod lifecycle;
pub mod migrate;
mod supervise;

/// Log lines kept with a VM that ended.
const LAST_LOG_LINES: usize = 20;
/// How long `start` waits for a new VMM's API to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the VMM to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one VMM API request.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection to another host's daemon is kept idle for the next call (below the
/// 30 s after which `ferry_pki`'s server drops a connection that sends no request).
const PEER_IDLE: Duration = Duration::from_secs(20);
/// Timeout of a snapshot request (it writes all of memory).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// The VMM's own log, in its home.
pub const VM_LOG: &str = "vm.log";
/// The guest's serial console, in its home.
pub const CONSOLE_LOG: &str = "console.log";
/// The suspend checkpoint's directory in a home.
pub const SUSPEND_DIR: &str = "suspend";

/// Errors of the daemon's operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No VM of that name.
    #[error("no VM named {0:?} is registered on this host")]
    NoVm(String),
    /// No datastore of that name.
    #[error("no datastore named {0:?} in this host's configuration")]
    NoDatastore(String),
    /// A request clashes with what exists or with the VM's state.
    #[error("{0}")]
    Conflict(String),
    /// A request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Another process or host holds the VM's home.
    #[error("VM {vm} runs elsewhere: its home is held by {holder}")]
    HeldElsewhere {
        /// The VM.
        vm: String,
        /// Who holds it.
        holder: String,
    },
    /// A definition is wrong.
    #[error(transparent)]
    Definition(#[from] vmdef::Error),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    /// A tap could not be made.
    #[error("cannot make the tap for NIC {index} of VM {vm}")]
    Tap {
        /// The VM.
        vm: String,
        /// The NIC.
        index: usize,
        /// Why.
        #[source]
        source: crate::taps::Error,
    },
    /// The VMM process could not be spawned.
    #[error("cannot start the VMM {binary}", binary = .binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited before its API answered.
    #[error("the VMM of {vm} exited while starting ({exit}); its log ends with:\n{log}")]
    StartFailed {
        /// The VM.
        vm: String,
        /// How it ended.
        exit: String,
        /// Its last log lines.
        log: String,
    },
    /// The VMM's API refused or failed a request.
    #[error("the VMM of {vm} did not do it")]
    Vmm {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: ferry_api::client::Error,
    },
    /// A file of the home or the state directory failed.
    #[error("cannot {what} {path}", path = .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A datastore's id or space failed.
    #[error(transparent)]
    Datastore(#[from] crate::datastore::Error),
    /// The home's lock status cannot be read.
    #[error(transparent)]
    Home(#[from] ferry_vmm::home::Error),
    /// Another host's daemon failed or refused a request.
    #[error(transparent)]
    Peer(Box<crate::peer::Error>),
    /// No migration of that id on this host.
    #[error("no migration {0:?} on this host")]
    NoMigration(String),
}

impl Error {
    /// The code clients see.
    pub fn code(&self) -> ferry_host_api::ErrorCode {
        use ferry_host_api::ErrorCode::*;
        match self {
            Error::NoVm(_) | Error::NoDatastore(_) | Error::NoMigration(_) => NotFound,
            Error::Conflict(_) | Error::HeldElsewhere { .. } => Conflict,
            Error::Definition(vmdef::Error::Exists { .. }) => Conflict,
            Error::BadRequest(_) | Error::Definition(_) => BadRequest,
            Error::Vmm { source: ferry_api::client::Error::Refused(e), .. } if e.status == 409 => Conflict,
            _ => Internal,
        }
    }
}

/// Checks a lifecycle transition: `Err` names both states.
pub fn transition(from: VmState, to: VmState) -> Result<(), Error> {
    use VmState::*;
    let ok = match (from, to) {
        (Defined | Crashed, Starting) => true,
        (Suspended, Starting) => true,
        (Starting, Running | Paused) => true,
        (Running, Paused) | (Paused, Running) => true,
        (Starting | Running | Paused, Stopping) => true,
        // A VMM's end: asked (defined, suspended) or not (crashed).
        (Starting | Running | Paused | Stopping, Defined | Suspended | Crashed) => true,
        // Reconciliation follows the home's lock.
        (_, Elsewhere) | (Elsewhere, Defined | Running | Paused) => true,
        _ => from == to,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Conflict(format!("a VM that is {from} cannot become {to}")))
    }
}

/// One registered VM.
#[derive(Debug)]
struct Vm {
    row: VmRow,
    def: VmDefinition,
    /// The daemon asked its VMM to end (stop, kill); its end is not a crash.
    stop_requested: bool,
    /// The daemon asked its VMM to suspend; its end makes it `suspended`.
    suspending: bool,
}

/// The daemon.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    db: Db,
    vms: Mutex<BTreeMap<String, Vm>>,
    datastore_ids: BTreeMap<String, String>,
    /// Where watchers deliver a VMM's end.
    runtime: tokio::runtime::Handle,
    /// Incoming migrations' reservations, by migration id.
    reservations: Mutex<BTreeMap<String, migrate::Reserved>>,
    /// Outgoing migrations in progress, by VM name, with their live progress.
    outgoing: Mutex<BTreeMap<String, ferry_host_api::MigrationRecord>>,
    /// The CPU feature bits KVM offers guests here (without `[cpu] hide`).
    kvm_features: Vec<String>,
    /// What KVM here offers for restoring VMs beyond feature bits (probed at start: it does
    /// not change while the daemon runs), if KVM could be asked.
    cpu_model: Option<ferry_arch::model::HostCpuModel>,
    /// The client other hosts' daemons are called with (this host's TLS identity), if the
    /// identity loads.
    peer_client: Option<ferry_pki::Client>,
    /// Test-only faults (`FERRY_HOST_FAULT`): none in production.
    faults: fault::HostFaults,
    /// The cluster's CPU baseline and the VMs' generations (EVC).
    evc: crate::evc::Evc,
}

/// A handle to the daemon, shared by the API handlers and the watchers.
pub type Shared = Arc<Daemon>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { what, path, source }
}

/// The line the daemon writes to `vm.log` before each VMM's own lines.
const START_MARK: &str = "--- ferry host ";

/// The last `n` lines of `path` written by its last VMM (from the daemon's last start mark).
fn last_run_tail(path: &Path, n: usize) -> Vec<String> {
    let mut lines = tail(path, 1000);
    if let Some(at) = lines.iter().rposition(|l| l.starts_with(START_MARK)) {
        lines.drain(..at);
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

/// The last `n` lines of `path` (at most its last MiB is read).
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(1 << 20);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(|s| s.to_string()).collect()
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether process `pid`'s command line names `home` (a VMM of that home).
fn runs_home(pid: u32, home: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let home = home.to_string_lossy();
    cmdline.split(|&b| b == 0).any(|arg| arg == home.as_bytes())
}

/// How long reading a home's status may take before a report goes without it (a hung
/// datastore must not stop the daemon).
const HOME_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The home's status, read on a blocking thread, or `None` if it fails or takes too long.
async fn home_status(home: PathBuf) -> Option<ferry_vmm::home::HomeStatus> {
    let read = tokio::task::spawn_blocking(move || ferry_vmm::home::status(&home));
    match tokio::time::timeout(HOME_STATUS_TIMEOUT, read).await {
        Ok(Ok(Ok(s))) => Some(s),
        _ => None,
    }
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this daemon recorded for a VMM and a valid signal number.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

impl Daemon {
    /// Opens the database, checks the datastores and reconciles the registered VMs with
    /// their homes and any VMM still alive.
    /// `faults` are test-only (`FERRY_HOST_FAULT`, see [`fault`]); production passes none.
    pub async fn start(config: Config, faults: fault::HostFaults) -> Result<Shared, Error> {
        std::fs::create_dir_all(config.run_dir()).map_err(io("create", &config.run_dir()))?;
        // The VMMs' API sockets: for root only.
        {
            use std::os::unix::fs::PermissionsExt;
            for dir in [config.state_dir.clone(), config.run_dir()] {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io("set the mode of", &dir))?;
            }
        }
        let mut datastore_ids = BTreeMap::new();
        for ds in config.datastores.values() {
            datastore_ids.insert(ds.name.clone(), crate::datastore::ensure_id(&ds.path)?);
        }
        let db = Db::open(&config.db_path()).await?;
        let evc = crate::evc::Evc::load(&db).await?;
        let hide = config.cpu_hide.clone();
        let kvm_features = tokio::task::spawn_blocking(move || crate::inventory::kvm_cpuid(&hide))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|k| k.features)
            .unwrap_or_default();
        let hide = config.cpu_hide.clone();
        let cpu_model = match tokio::task::spawn_blocking(move || ferry_arch::model::probe_host(&hide)).await
        {
            Ok(Ok(m)) => Some(m),
            Ok(Err(e)) => {
                tracing::warn!("cannot probe this host's CPU model (XSAVE, TSC, MSRs): {e}");
                None
            }
            Err(_) => None,
        };
        // Connections to other hosts' daemons are kept (a migration by name makes four calls
        // to its destination; each new one costs a TCP and a mutual TLS handshake), each for
        // at most PEER_IDLE between two calls (the peers' servers drop idle ones at 30 s).
        let peer_client = match ferry_pki::Client::new(&config.identity_dir) {
            Ok(c) => Some(c.with_keep_alive(PEER_IDLE)),
            Err(e) => {
                tracing::warn!("no TLS identity to call other hosts with: {e}");
                None
            }
        };
        let daemon = Arc::new(Daemon {
            config,
            db,
            vms: Mutex::new(BTreeMap::new()),
            datastore_ids,
            runtime: tokio::runtime::Handle::current(),
            reservations: Mutex::new(BTreeMap::new()),
            outgoing: Mutex::new(BTreeMap::new()),
            kvm_features,
            cpu_model,
            peer_client,
            faults,
            evc,
        });
        daemon.reconcile().await?;
        daemon.close_stale_migrations().await?;
        Ok(daemon)
    }

    /// The daemon's database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The cluster's CPU baseline as this host keeps it (EVC).
    pub fn evc(&self) -> &crate::evc::Evc {
        &self.evc
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    async fn event(&self, vm: &str, kind: &str, message: &str) {
        tracing::info!(vm, "{kind}: {message}");
        if let Err(e) = self.db.event(Some(vm), kind, message).await {
            tracing::warn!(vm, "cannot record event: {e}");
        }
    }
}

impl Daemon {
    /// Who, other than this host's daemon's VMMs, holds the home: the holder of its lock
    /// (`vm.lock`), or the owner of its lease when that is another host id than this host's
    /// on the VM's datastore. The lease wins: a lease owned by another host means the VM is
    /// not this host's to run, whatever the database says.
    fn held_by_other(&self, datastore: &str, s: &ferry_vmm::home::HomeStatus) -> Option<String> {
        if s.locked {
            return Some(format!(
                "the holder of its lock ({})",
                s.lock.as_ref().map(|l| l.to_string()).unwrap_or_else(|| "unknown".into())
            ));
        }
        let ours = self.config.datastores.get(datastore).and_then(|d| d.lease.as_ref()).map(|l| l.host_id);
        match s.lease.as_ref().and_then(|l| l.owner_host_id) {
            Some(id) if Some(id) != ours => Some(format!("the owner of its lease, host id {id}")),
            _ => None,
        }
    }

    fn socket_of(&self, name: &str) -> PathBuf {
        self.config.run_dir().join(format!("{name}.sock"))
    }

    /// A VM's report; `status` is its home's, read beforehand (see [`home_status`]).
    fn detail(vm: &Vm, status: Option<ferry_vmm::home::HomeStatus>) -> VmDetail {
        let lock_holder = status.as_ref().and_then(|s| {
            let lock = s.lock.as_ref().filter(|_| s.locked).map(|l| l.to_string());
            match (&s.lease, lock) {
                (Some(l), lock) if l.owner_host_id.is_some() => Some(format!(
                    "lease held by host id {}{}",
                    l.owner_host_id.unwrap_or_default(),
                    lock.map(|x| format!(" ({x})")).unwrap_or_default()
                )),
                (_, lock) => lock,
            }
        });
        VmDetail {
            name: vm.row.name.clone(),
            state: vm.row.state,
            home: vm.row.home.clone(),
            datastore: vm.row.datastore.clone(),
            definition: vm.def.clone(),
            pid: vm.row.pid,
            api_socket: vm.row.api_socket.clone(),
            taps: vm.row.taps.clone(),
            lock_holder,
            generation: status.and_then(|s| s.generation.map(|g| g.generation)),
            last_exit: vm.row.last_exit.clone(),
            last_log: vm.row.last_log.clone(),
            events: Vec::new(),
        }
    }

    fn summary(&self, vm: &Vm) -> VmSummary {
        VmSummary {
            cpuid_generation: if crate::evc::powered_on(vm.row.state) {
                self.evc.generation(&vm.row.name)
            } else {
                None
            },
            name: vm.row.name.clone(),
            state: vm.row.state,
            memory_mib: vm.def.memory_mib,
            vcpus: vm.def.vcpus,
            datastore: vm.row.datastore.clone(),
            pid: vm.row.pid,
        }
    }

    /// `GET /vms`.
    pub async fn list(&self) -> VmList {
        VmList { vms: self.vms.lock().await.values().map(|v| self.summary(v)).collect() }
    }

    /// `GET /vms/NAME`; a running VM's paused/running state is read from its VMM.
    pub async fn show(&self, name: &str) -> Result<VmDetail, Error> {
        let sock = {
            let vms = self.vms.lock().await;
            let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
            match vm.row.state {
                VmState::Starting | VmState::Running | VmState::Paused => vm.row.api_socket.clone(),
                _ => None,
            }
        };
        if let Some(sock) = sock {
            let info = tokio::task::spawn_blocking(move || {
                ferry_api::client::send(&sock, &ferry_api::Request::Info, API_TIMEOUT)
            })
            .await
            .ok()
            .and_then(Result::ok);
            if let Some(ferry_api::Response::Info(i)) = info {
                let state =
                    if i.state == ferry_api::RunState::Paused { VmState::Paused } else { VmState::Running };
                self.set_state(name, state).await;
            }
        }
        let home = {
            let vms = self.vms.lock().await;
            vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?.row.home.clone()
        };
        let status = home_status(home).await;
        let mut detail = {
            let vms = self.vms.lock().await;
            let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
            Self::detail(vm, status)
        };
        detail.events = self.db.events(name, 10).await?;
        Ok(detail)
    }

    async fn set_state(&self, name: &str, state: VmState) {
        let mut vms = self.vms.lock().await;
        if let Some(vm) = vms.get_mut(name) {
            if vm.row.state != state
                && matches!(vm.row.state, VmState::Running | VmState::Paused | VmState::Starting)
            {
                vm.row.state = state;
                let row = vm.row.clone();
                drop(vms);
                if let Err(e) = self.db.put(&row).await {
                    tracing::warn!(vm = name, "cannot record state: {e}");
                }
            }
        }
    }

    /// `GET /vms/NAME/log`.
    pub async fn log(&self, name: &str, lines: usize) -> Result<VmLog, Error> {
        let vms = self.vms.lock().await;
        let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
        let path = vm.row.home.join(VM_LOG);
        Ok(VmLog { lines: tail(&path, lines.min(10_000)), path })
    }

    /// Refuses a name or a MAC another registered VM has.
    fn check_unique(vms: &BTreeMap<String, Vm>, def: &VmDefinition, home: &Path) -> Result<(), Error> {
        if vms.contains_key(&def.name) {
            return Err(Error::Conflict(format!(
                "a VM named {:?} is already registered on this host",
                def.name
            )));
        }
        for vm in vms.values() {
            if vm.row.home == home {
                return Err(Error::Conflict(format!(
                    "the home {} is already registered as VM {:?}",
                    home.display(),
                    vm.row.name
                )));
            }
            for mac in vmdef::macs(&vm.def) {
                if vmdef::macs(def).contains(&mac) {
                    return Err(Error::Conflict(format!(
                        "MAC {mac} is already used by VM {:?} on this host",
                        vm.row.name
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_portgroups(&self, def: &VmDefinition) -> Result<(), Error> {
        for (i, n) in def.nics.iter().enumerate() {
            if !self.config.portgroups.contains_key(&n.portgroup) {
                return Err(Error::BadRequest(format!(
                    "nics[{i}].portgroup: this host has no port group {:?} (it has: {})",
                    n.portgroup,
                    self.config.portgroups.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(())
    }

    /// `POST /vms`: makes the home and registers it. Nothing is left behind on error.
    pub async fn create(&self, req: CreateVm) -> Result<VmDetail, Error> {
        let ds = self
            .config
            .datastores
            .get(&req.datastore)
            .ok_or_else(|| Error::NoDatastore(req.datastore.clone()))?;
        let mut def = req.definition;
        for i in 0..def.nics.len() {
            if def.nics[i].mac.is_empty() {
                def.nics[i].mac = vmdef::make_mac(&def.name, i);
            }
        }
        vmdef::check(&def).map_err(|(field, message)| vmdef::Error::Invalid { field, message })?;
        self.check_portgroups(&def)?;
        let mut vms = self.vms.lock().await;
        let home_path = ds.path.join(&def.name);
        Self::check_unique(&vms, &def, &home_path)?;
        let home = vmdef::create_home(&ds.path, &def)?;
        let row = VmRow {
            name: def.name.clone(),
            home: home.clone(),
            datastore: ds.name.clone(),
            state: VmState::Defined,
            pid: None,
            api_socket: None,
            taps: Vec::new(),
            last_exit: None,
            last_log: Vec::new(),
        };
        if let Err(e) = self.db.put(&row).await {
            let _ = std::fs::remove_dir_all(&home);
            return Err(e.into());
        }
        let vm = Vm { row, def, stop_requested: false, suspending: false };
        let detail = Self::detail(&vm, None);
        vms.insert(vm.row.name.clone(), vm);
        drop(vms);
        self.event(&detail.name, "created", &format!("home {}", home.display())).await;
        Ok(detail)
    }

    /// `DELETE /vms/NAME`: forgets a VM whose VMM does not run here; its home stays as it is
    /// (it can be registered again, here or on another host). Answers the VM's last report.
    pub async fn unregister(&self, name: &str) -> Result<VmDetail, Error> {
        let mut vms = self.vms.lock().await;
        let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
        if vm.row.state.has_process() {
            return Err(Error::Conflict(format!(
                "VM {name} is {}: stop it before unregistering it",
                vm.row.state
            )));
        }
        let detail = Self::detail(vm, None);
        self.db.delete(name).await?;
        vms.remove(name);
        drop(vms);
        self.event(name, "unregistered", &format!("home {} kept", detail.home.display())).await;
        Ok(detail)
    }

    /// `POST /vms/register`: adopts an existing home on one of this host's datastores.
    pub async fn register(&self, req: RegisterVm) -> Result<VmDetail, Error> {
        let home = std::fs::canonicalize(&req.path)
            .map_err(|e| Error::BadRequest(format!("{}: {e}", req.path.display())))?;
        let ds = self
            .config
            .datastores
            .values()
            .find(|d| std::fs::canonicalize(&d.path).ok().as_deref() == home.parent())
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "{} is not a home directly inside one of this host's datastores ({})",
                    home.display(),
                    self.config
                        .datastores
                        .values()
                        .map(|d| d.path.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let def = vmdef::load(&home)?;
        if home.file_name().map(|n| n.to_string_lossy().into_owned()) != Some(def.name.clone()) {
            return Err(Error::BadRequest(format!(
                "{}: the VM's name {:?} is not its home's directory name",
                home.join(vmdef::DEFINITION_FILE).display(),
                def.name
            )));
        }
        self.check_portgroups(&def)?;
        let h = home.clone();
        let status = tokio::task::spawn_blocking(move || ferry_vmm::home::status(&h))
            .await
            .map_err(|e| Error::BadRequest(e.to_string()))??;
        if let Some(holder) = self.held_by_other(&ds.name, &status) {
            return Err(Error::Conflict(format!("the home {} is in use: held by {holder}", home.display())));
        }
        let mut vms = self.vms.lock().await;
        Self::check_unique(&vms, &def, &home)?;
        let state = if home.join(SUSPEND_DIR).is_dir() { VmState::Suspended } else { VmState::Defined };
        let row = VmRow {
            name: def.name.clone(),
            home: home.clone(),
            datastore: ds.name.clone(),
            state,
            pid: None,
            api_socket: None,
            taps: Vec::new(),
            last_exit: None,
            last_log: Vec::new(),
        };
        self.db.put(&row).await?;
        let vm = Vm { row, def, stop_requested: false, suspending: false };
        let detail = Self::detail(&vm, Some(status));
        vms.insert(vm.row.name.clone(), vm);
        drop(vms);
        self.event(&detail.name, "registered", &format!("home {}", home.display())).await;
        Ok(detail)
    }

    /// `GET /host`.
    pub async fn host_info(&self) -> HostInfo {
        let vms = self.list().await.vms;
        let reserved_bytes = {
            let all = self.vms.lock().await;
            all.values().filter(|v| v.row.state.has_process()).map(|v| v.def.memory_mib << 20).sum::<u64>()
        } + self.reserved_for_incoming().await;
        let (cpu, (total, available), datastores) = tokio::task::spawn_blocking({
            let config = self.config.clone();
            let ids = self.datastore_ids.clone();
            move || {
                let hide = &config.cpu_hide;
                let ds = config
                    .datastores
                    .values()
                    .map(|d| {
                        let (free_bytes, total_bytes) = crate::datastore::space(&d.path).unwrap_or((0, 0));
                        DatastoreInfo {
                            name: d.name.clone(),
                            path: d.path.clone(),
                            id: ids.get(&d.name).cloned().unwrap_or_default(),
                            free_bytes,
                            total_bytes,
                            lockspace: d.lease.as_ref().map(|l| l.lockspace.clone()),
                        }
                    })
                    .collect();
                (crate::inventory::cpu(hide), crate::inventory::memory(), ds)
            }
        })
        .await
        .unwrap_or_else(|_| (crate::inventory::cpu(&self.config.cpu_hide), (0, 0), Vec::new()));
        let cpu = ferry_host_api::CpuInfo { kvm_model: self.cpu_model.clone(), ..cpu };
        HostInfo {
            api_version: ferry_host_api::API_VERSION,
            name: self.config.name.clone(),
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            migration_protocols: vec![ferry_migration::protocol::PROTOCOL_VERSION],
            cpu,
            memory: MemoryInfo {
                total_bytes: total,
                available_bytes: available,
                reserved_bytes,
                vm_limit_bytes: self.config.vm_memory_mib.map(|m| m << 20),
                free_for_vms_bytes: Some(self.free_for_vms().await),
            },
            datastores,
            portgroups: self
                .config
                .portgroups
                .iter()
                .map(|(n, b)| PortGroupInfo {
                    name: n.clone(),
                    bridge: b.clone(),
                    present: crate::config::interface_exists(b),
                })
                .collect(),
            vms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_checked() {
        use VmState::*;
        assert!(transition(Defined, Starting).is_ok());
        assert!(transition(Running, Crashed).is_ok());
        assert!(transition(Crashed, Starting).is_ok());
        assert!(transition(Defined, Running).is_err());
        assert!(transition(Suspended, Running).is_err());
        assert!(transition(Crashed, Running).is_err());
        let e = transition(Defined, Paused).expect_err("refused").to_string();
        assert_eq!(e, "a VM that is defined cannot become paused");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let p = std::env::temp_dir().join(format!("ferry-tail-test-{}", std::process::id()));
        std::fs::write(&p, "a\nb\nc\n").expect("write");
        assert_eq!(tail(&p, 2), vec!["b".to_string(), "c".to_string()]);
        assert!(tail(&p.with_extension("none"), 2).is_empty());
        std::fs::remove_file(&p).expect("clean");
    }
}
