//! The daemon's core: registered VMs, their lifecycle, supervision of their VMM processes,
//! and reconciliation of the database with the homes at start-up.
//!
//! Each VMM is `ferry run` (or `ferry restore` for a resume) in a session of its own
//! (setsid), stdin from /dev/null, stdout and stderr appended to `HOME/vm.log`, its API on
//! `STATE_DIR/run/NAME.sock`, so it outlives the daemon. A watcher thread waits for each VMM
//! the daemon spawned (its exit status and signal) or, for one re-adopted after a restart, for
//! its pidfd to become readable; then [`Daemon::on_exit`] records how it ended: `crashed`
//! (with the last log lines) unless the daemon asked it to end. Nothing restarts it.
//!
//! State transitions are checked by [`transition`]; the table is in `docs/host.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_host_api::{
    Action, CreateVm, DatastoreInfo, ExitInfo, HostInfo, MemoryInfo, PortGroupInfo, RegisterVm, VmDefinition,
    VmDetail, VmList, VmLog, VmState, VmSummary,
};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::db::{unix_ms, Db, VmRow};
use crate::vmdef;

/// Log lines kept with a VM that ended.
const LAST_LOG_LINES: usize = 20;
/// How long `start` waits for a new VMM's API to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the VMM to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one VMM API request.
const API_TIMEOUT: Duration = Duration::from_secs(5);
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
}

impl Error {
    /// The code clients see.
    pub fn code(&self) -> ferry_host_api::ErrorCode {
        use ferry_host_api::ErrorCode::*;
        match self {
            Error::NoVm(_) | Error::NoDatastore(_) => NotFound,
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
    pub async fn start(config: Config) -> Result<Shared, Error> {
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
        let daemon = Arc::new(Daemon {
            config,
            db,
            vms: Mutex::new(BTreeMap::new()),
            datastore_ids,
            runtime: tokio::runtime::Handle::current(),
        });
        daemon.reconcile().await?;
        Ok(daemon)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    async fn event(&self, vm: &str, kind: &str, message: &str) {
        tracing::info!(vm, "{kind}: {message}");
        if let Err(e) = self.db.event(Some(vm), kind, message).await {
            tracing::warn!(vm, "cannot record event: {e}");
        }
    }

    /// Start-up: each row against its home and its VMM. The home's lock wins.
    async fn reconcile(self: &Arc<Self>) -> Result<(), Error> {
        for mut row in self.db.all().await? {
            let def = match vmdef::load(&row.home) {
                Ok(d) => d,
                Err(e) => {
                    // The home is gone or unreadable: the home is the truth, so the VM is
                    // no longer this host's. The row goes; the event says why.
                    tracing::warn!(vm = %row.name, "unregistered: its home cannot be read: {e}");
                    self.db
                        .event(Some(&row.name), "unregistered", &format!("its home cannot be read: {e}"))
                        .await?;
                    self.db.delete(&row.name).await?;
                    continue;
                }
            };
            let sock = self.socket_of(&row.name);
            let info = {
                let s = sock.clone();
                tokio::task::spawn_blocking(move || {
                    ferry_api::client::send(&s, &ferry_api::Request::Info, API_TIMEOUT)
                })
                .await
                .ok()
                .and_then(Result::ok)
            };
            let info = match info {
                Some(ferry_api::Response::Info(i))
                    if i.home.as_deref().and_then(|h| std::fs::canonicalize(h).ok())
                        == std::fs::canonicalize(&row.home).ok() =>
                {
                    Some(i)
                }
                _ => None,
            };
            let before = row.state;
            let adopt = match (info, row.pid) {
                (Some(info), _) => Some((
                    info.pid,
                    if info.state == ferry_api::RunState::Paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    },
                )),
                // Its socket does not answer, but the pid recorded is alive and is a VMM of
                // this home (its command line names it): adopt it too.
                (None, Some(pid)) if before.has_process() && alive(pid) && runs_home(pid, &row.home) => {
                    Some((pid, VmState::Running))
                }
                _ => None,
            };
            if let Some((pid, state)) = adopt {
                // A VMM of this VM is alive: adopt it.
                row.pid = Some(pid);
                row.api_socket = Some(sock);
                row.state = state;
                row.taps = (0..def.nics.len()).map(|i| vmdef::tap_name(&def.name, i)).collect();
                self.db.put(&row).await?;
                self.vms.lock().await.insert(
                    row.name.clone(),
                    Vm { row: row.clone(), def, stop_requested: false, suspending: false },
                );
                self.event(
                    &row.name,
                    "adopted",
                    &format!("VMM pid {pid} re-adopted ({before} in the database)"),
                )
                .await;
                self.watch_pid(row.name.clone(), pid);
                continue;
            }
            // No VMM of ours answers. Does anyone hold the home's lock?
            let home = row.home.clone();
            let status = tokio::task::spawn_blocking(move || ferry_vmm::home::status(&home))
                .await
                .ok()
                .and_then(Result::ok);
            let holder = status.as_ref().and_then(|s| self.held_by_other(&row.datastore, s));
            let was_running = before.has_process();
            for t in row.taps.drain(..) {
                crate::taps::delete(&t);
            }
            let _ = std::fs::remove_file(self.socket_of(&row.name));
            if let Some(holder) = holder {
                tracing::info!(vm = %row.name, "its home is held by {holder}");
                row.state = VmState::Elsewhere;
                row.pid = None;
                row.api_socket = None;
            } else if was_running {
                let clean = status.as_ref().and_then(|s| s.lock.as_ref()).is_some_and(|l| !l.held);
                row.state =
                    if before == VmState::Stopping || clean { VmState::Defined } else { VmState::Crashed };
                row.last_exit = Some(ExitInfo {
                    code: None,
                    signal: None,
                    requested: before == VmState::Stopping,
                    description: "ended while the daemon was not running (exit status unknown)".into(),
                    at_unix_ms: unix_ms(),
                });
                row.last_log = last_run_tail(&row.home.join(VM_LOG), LAST_LOG_LINES);
                row.pid = None;
                row.api_socket = None;
            } else if before == VmState::Elsewhere
                || (before == VmState::Suspended && !row.home.join(SUSPEND_DIR).is_dir())
            {
                row.state = VmState::Defined;
            }
            if row.state != before {
                self.event(
                    &row.name,
                    "reconciled",
                    &format!("{before} in the database, {} from its home", row.state),
                )
                .await;
            }
            self.db.put(&row).await?;
            self.vms
                .lock()
                .await
                .insert(row.name.clone(), Vm { row, def, stop_requested: false, suspending: false });
        }
        Ok(())
    }

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

    fn summary(vm: &Vm) -> VmSummary {
        VmSummary {
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
        VmList { vms: self.vms.lock().await.values().map(Self::summary).collect() }
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

    /// `POST /vms/NAME/ACTION`.
    pub async fn action(self: &Arc<Self>, name: &str, action: Action) -> Result<VmDetail, Error> {
        let state =
            self.vms.lock().await.get(name).map(|v| v.row.state).ok_or_else(|| Error::NoVm(name.into()))?;
        match action {
            Action::Start => self.start_vm(name, false).await?,
            Action::Resume if state == VmState::Suspended => self.start_vm(name, true).await?,
            Action::Resume => {
                self.api_call(name, ferry_api::Request::Resume, VmState::Paused, VmState::Running).await?
            }
            Action::Stop => self.end_vm(name, libc::SIGTERM, STOP_TIMEOUT).await?,
            Action::Kill => self.end_vm(name, libc::SIGKILL, Duration::from_secs(10)).await?,
            Action::Suspend => self.suspend_vm(name).await?,
            Action::Snapshot => self.snapshot_vm(name).await?,
        }
        self.show(name).await
    }

    async fn api_call(
        &self,
        name: &str,
        req: ferry_api::Request,
        from: VmState,
        to: VmState,
    ) -> Result<(), Error> {
        let sock = {
            let vms = self.vms.lock().await;
            let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
            if vm.row.state != from {
                return Err(Error::Conflict(format!("VM {name} is {}, not {from}", vm.row.state)));
            }
            transition(from, to)?;
            vm.row.api_socket.clone().ok_or_else(|| Error::Conflict(format!("VM {name} has no VMM")))?
        };
        tokio::task::spawn_blocking(move || ferry_api::client::send(&sock, &req, API_TIMEOUT))
            .await
            .map_err(|e| Error::BadRequest(e.to_string()))?
            .map_err(|source| Error::Vmm { vm: name.into(), source })?;
        self.set_state(name, to).await;
        Ok(())
    }

    /// Start (`restore` = resume from the suspend checkpoint).
    async fn start_vm(self: &Arc<Self>, name: &str, restore: bool) -> Result<(), Error> {
        let (mut row, def, lease) = {
            let mut vms = self.vms.lock().await;
            let vm = vms.get_mut(name).ok_or_else(|| Error::NoVm(name.into()))?;
            if vm.row.state == VmState::Elsewhere {
                // It was held by someone else at the last look; spawn_vmm checks again.
                vm.row.state = VmState::Defined;
            }
            let allowed = if restore {
                vm.row.state == VmState::Suspended
            } else {
                matches!(vm.row.state, VmState::Defined | VmState::Crashed)
            };
            if !allowed {
                return Err(Error::Conflict(format!(
                    "VM {name} is {}; {} needs it {}",
                    vm.row.state,
                    if restore { "resume" } else { "start" },
                    if restore {
                        "suspended or paused"
                    } else {
                        "defined or crashed (a suspended VM resumes)"
                    }
                )));
            }
            transition(vm.row.state, VmState::Starting)?;
            // Reserve the VM before anything slow: a second start sees `starting`.
            vm.row.state = VmState::Starting;
            vm.stop_requested = false;
            vm.suspending = false;
            let lease = self.config.datastores.get(&vm.row.datastore).and_then(|d| d.lease.clone());
            (vm.row.clone(), vm.def.clone(), lease)
        };
        let before = if restore {
            VmState::Suspended
        } else {
            self.vms.lock().await.get(name).and_then(|v| v.row.last_exit.as_ref()).map_or(
                VmState::Defined,
                |e| {
                    if e.requested || e.code == Some(0) {
                        VmState::Defined
                    } else {
                        VmState::Crashed
                    }
                },
            )
        };
        match self.spawn_vmm(&mut row, &def, lease.as_ref(), restore).await {
            Ok(child) => {
                let pid = child.id();
                {
                    let mut vms = self.vms.lock().await;
                    if let Some(vm) = vms.get_mut(name) {
                        vm.row = row.clone();
                    }
                }
                self.db.put(&row).await?;
                self.event(
                    name,
                    "starting",
                    &format!("VMM pid {pid}{}", if restore { ", from its suspend checkpoint" } else { "" }),
                )
                .await;
                self.watch_child(name.to_string(), child);
                self.wait_started(name, pid).await
            }
            Err(e) => {
                let mut vms = self.vms.lock().await;
                if let Some(vm) = vms.get_mut(name) {
                    vm.row.state =
                        if matches!(e, Error::HeldElsewhere { .. }) { VmState::Elsewhere } else { before };
                }
                Err(e)
            }
        }
    }

    /// Makes the taps and spawns the VMM; on error nothing is left.
    async fn spawn_vmm(
        &self,
        row: &mut VmRow,
        def: &VmDefinition,
        lease: Option<&crate::config::LeaseSettings>,
        restore: bool,
    ) -> Result<std::process::Child, Error> {
        let home = row.home.clone();
        {
            let h = home.clone();
            let status = tokio::task::spawn_blocking(move || ferry_vmm::home::status(&h))
                .await
                .map_err(|e| Error::BadRequest(e.to_string()))??;
            if let Some(holder) = self.held_by_other(&row.datastore, &status) {
                return Err(Error::HeldElsewhere { vm: def.name.clone(), holder });
            }
        }
        self.check_portgroups(def)?;
        let mut taps: Vec<String> = Vec::new();
        for (i, nic) in def.nics.iter().enumerate() {
            let tap = vmdef::tap_name(&def.name, i);
            let bridge = self.config.portgroups.get(&nic.portgroup).cloned().unwrap_or_default();
            let t = tap.clone();
            let made = tokio::task::spawn_blocking(move || crate::taps::create(&t, &bridge))
                .await
                .map_err(|e| Error::BadRequest(e.to_string()))?;
            if let Err(source) = made {
                for t in &taps {
                    crate::taps::delete(t);
                }
                return Err(Error::Tap { vm: def.name.clone(), index: i, source });
            }
            taps.push(tap);
        }
        let sock = self.socket_of(&def.name);
        let _ = std::fs::remove_file(&sock);
        let mut cmd = std::process::Command::new(&self.config.ferry_binary);
        if restore {
            cmd.arg("restore").arg("--from").arg(home.join(SUSPEND_DIR));
        } else {
            cmd.arg("run");
            match (&def.guest, &def.kernel) {
                (Some(g), _) => cmd.arg("--guest").arg(g),
                (None, Some(k)) => cmd.arg("--kernel").arg(home.join(k)),
                (None, None) => &mut cmd,
            };
            cmd.arg("--memory").arg(format!("{}M", def.memory_mib));
            cmd.arg("--cpus").arg(def.vcpus.to_string());
            cmd.arg("--cmdline").arg(&def.cmdline);
            for d in &def.disks {
                let mut s = format!("path={}", home.join(&d.file).display());
                if d.readonly {
                    s.push_str(",readonly=on");
                }
                cmd.arg("--disk").arg(s);
            }
            for (nic, tap) in def.nics.iter().zip(&taps) {
                cmd.arg("--net").arg(format!("tap={tap},mac={}", nic.mac));
            }
        }
        cmd.arg("--serial").arg(format!("file:{}", home.join(CONSOLE_LOG).display()));
        cmd.arg("--api-socket").arg(&sock);
        cmd.arg("--home").arg(&home);
        if let Some(l) = lease {
            cmd.arg("--lease").arg(l.to_arg());
        }
        let log_path = home.join(VM_LOG);
        let cleanup = |taps: &[String]| {
            for t in taps {
                crate::taps::delete(t);
            }
        };
        let log = match std::fs::OpenOptions::new().create(true).append(true).open(&log_path) {
            Ok(f) => f,
            Err(e) => {
                cleanup(&taps);
                return Err(io("open", &log_path)(e));
            }
        };
        let log2 = match log.try_clone() {
            Ok(f) => f,
            Err(e) => {
                cleanup(&taps);
                return Err(io("open", &log_path)(e));
            }
        };
        {
            use std::io::Write;
            let mut l = &log;
            let _ = writeln!(
                l,
                "{START_MARK}{}: {} {:?}",
                self.config.name,
                if restore { "resume" } else { "start" },
                cmd
            );
        }
        cmd.stdin(std::process::Stdio::null()).stdout(log).stderr(log2);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it
            // makes the VMM a session of its own, so it outlives the daemon and its signals.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                cleanup(&taps);
                return Err(Error::Spawn { binary: self.config.ferry_binary.clone(), source });
            }
        };
        row.state = VmState::Starting;
        row.pid = Some(child.id());
        row.api_socket = Some(sock);
        row.taps = taps;
        Ok(child)
    }

    /// Waits for a new VMM's API to answer (running) or for it to exit (an error with its log).
    async fn wait_started(&self, name: &str, pid: u32) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let (state, sock, row) = {
                let vms = self.vms.lock().await;
                let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
                (vm.row.state, vm.row.api_socket.clone(), vm.row.clone())
            };
            if state != VmState::Starting || row.pid != Some(pid) {
                if state.has_process() {
                    return Ok(());
                }
                return Err(Error::StartFailed {
                    vm: name.into(),
                    exit: row.last_exit.map(|e| e.description).unwrap_or_default(),
                    log: row.last_log.join("\n"),
                });
            }
            if let Some(sock) = sock {
                let info = tokio::task::spawn_blocking(move || {
                    ferry_api::client::send(&sock, &ferry_api::Request::Info, API_TIMEOUT)
                })
                .await
                .ok()
                .and_then(Result::ok);
                if let Some(ferry_api::Response::Info(i)) = info {
                    let to = if i.state == ferry_api::RunState::Paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                    self.set_state(name, to).await;
                    self.event(name, "running", &format!("VMM pid {pid} answers on its API socket")).await;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Conflict(format!(
                    "the VMM of {name} (pid {pid}) did not answer on its API socket within {} s; it is still starting (see `ferry vm log {name}`)",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop (SIGTERM) or kill (SIGKILL), then wait for the end.
    async fn end_vm(&self, name: &str, sig: i32, wait: Duration) -> Result<(), Error> {
        let pid = {
            let mut vms = self.vms.lock().await;
            let vm = vms.get_mut(name).ok_or_else(|| Error::NoVm(name.into()))?;
            let pid = match (vm.row.state.has_process(), vm.row.pid) {
                (true, Some(pid)) => pid,
                _ => {
                    return Err(Error::Conflict(format!(
                        "VM {name} is {}: no VMM runs it here",
                        vm.row.state
                    )))
                }
            };
            transition(vm.row.state, VmState::Stopping)?;
            vm.stop_requested = true;
            vm.row.state = VmState::Stopping;
            let row = vm.row.clone();
            drop(vms);
            self.db.put(&row).await?;
            pid
        };
        self.event(name, "stopping", &format!("{} to VMM pid {pid}", signal_name(sig))).await;
        send_signal(pid, sig);
        self.wait_end(name, pid, wait).await;
        Ok(())
    }

    /// Waits (at most `wait`) until the VM's VMM `pid` has been recorded as ended.
    async fn wait_end(&self, name: &str, pid: u32, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            {
                let vms = self.vms.lock().await;
                match vms.get(name) {
                    Some(vm) if vm.row.pid == Some(pid) => {}
                    _ => return,
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn running_socket(&self, name: &str) -> Result<(PathBuf, u32), Error> {
        let vms = self.vms.lock().await;
        let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
        match (vm.row.state, &vm.row.api_socket, vm.row.pid) {
            (VmState::Running | VmState::Paused, Some(s), Some(p)) => Ok((s.clone(), p)),
            (state, _, _) => Err(Error::Conflict(format!("VM {name} is {state}, not running or paused"))),
        }
    }

    async fn suspend_vm(&self, name: &str) -> Result<(), Error> {
        let (sock, pid) = self.running_socket(name).await?;
        let home = self
            .vms
            .lock()
            .await
            .get(name)
            .map(|v| v.row.home.clone())
            .ok_or_else(|| Error::NoVm(name.into()))?;
        let dir = home.join(SUSPEND_DIR);
        if dir.exists() {
            // The previous suspend's checkpoint; the running VM no longer needs it (a
            // restored VM's memory mapping keeps its data).
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        if let Some(vm) = self.vms.lock().await.get_mut(name) {
            vm.suspending = true;
        }
        let req = ferry_api::Request::Snapshot(ferry_api::SnapshotRequest { to: dir.clone(), stop: true });
        let done =
            tokio::task::spawn_blocking(move || ferry_api::client::send(&sock, &req, SNAPSHOT_TIMEOUT))
                .await
                .map_err(|e| Error::BadRequest(e.to_string()))?;
        if let Err(source) = done {
            if let Some(vm) = self.vms.lock().await.get_mut(name) {
                vm.suspending = false;
            }
            return Err(Error::Vmm { vm: name.into(), source });
        }
        self.event(name, "suspending", &format!("checkpoint written to {}", dir.display())).await;
        self.wait_end(name, pid, STOP_TIMEOUT).await;
        Ok(())
    }

    async fn snapshot_vm(&self, name: &str) -> Result<(), Error> {
        let (sock, _) = self.running_socket(name).await?;
        let home = self
            .vms
            .lock()
            .await
            .get(name)
            .map(|v| v.row.home.clone())
            .ok_or_else(|| Error::NoVm(name.into()))?;
        let dir = home.join("snapshots").join(unix_ms().to_string());
        let req = ferry_api::Request::Snapshot(ferry_api::SnapshotRequest { to: dir.clone(), stop: false });
        tokio::task::spawn_blocking(move || ferry_api::client::send(&sock, &req, SNAPSHOT_TIMEOUT))
            .await
            .map_err(|e| Error::BadRequest(e.to_string()))?
            .map_err(|source| Error::Vmm { vm: name.into(), source })?;
        self.event(name, "snapshot", &format!("checkpoint written to {}", dir.display())).await;
        Ok(())
    }

    /// Waits for a VMM this daemon spawned, on a thread of its own.
    fn watch_child(self: &Arc<Self>, name: String, mut child: std::process::Child) {
        let daemon = Arc::clone(self);
        let pid = child.id();
        let spawned = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
            use std::os::unix::process::ExitStatusExt;
            let (code, signal) = match child.wait() {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            };
            let rt = daemon.runtime.clone();
            rt.block_on(daemon.on_exit(&name, pid, code, signal, true));
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a watcher thread: {e}");
        }
    }

    /// Waits for a re-adopted VMM (not this daemon's child) through its pidfd.
    fn watch_pid(self: &Arc<Self>, name: String, pid: u32) {
        let daemon = Arc::clone(self);
        let spawned = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
            if fd >= 0 {
                let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                loop {
                    // SAFETY: one valid pollfd; the descriptor is ours until closed below.
                    let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
                    if rc > 0
                        || (rc < 0
                            && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
                    {
                        break;
                    }
                }
                // SAFETY: closing the descriptor pidfd_open gave us.
                unsafe { libc::close(fd) };
            } else {
                while alive(pid) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            let rt = daemon.runtime.clone();
            rt.block_on(daemon.on_exit(&name, pid, None, None, false));
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a watcher thread: {e}");
        }
    }

    /// A VMM ended: records how, deletes its taps and socket.
    async fn on_exit(&self, name: &str, pid: u32, code: Option<i32>, signal: Option<i32>, child: bool) {
        // For a VMM that is not our child, whether it released the home's lock cleanly tells
        // a stop from a crash; read before taking the daemon's lock.
        let home = self.vms.lock().await.get(name).map(|v| v.row.home.clone());
        let released = match home {
            Some(h) if !child => home_status(h).await.and_then(|s| s.lock).is_some_and(|l| !l.held),
            _ => false,
        };
        let mut vms = self.vms.lock().await;
        let Some(vm) = vms.get_mut(name) else { return };
        if vm.row.pid != Some(pid) {
            return;
        }
        for t in vm.row.taps.drain(..) {
            crate::taps::delete(&t);
        }
        if let Some(s) = vm.row.api_socket.take() {
            let _ = std::fs::remove_file(s);
        }
        let description = match (code, signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {s} ({})", signal_name(s)),
            (None, None) if child => "exit status unknown".to_string(),
            (None, None) => "exit status unknown (a re-adopted VMM, not this daemon's child)".to_string(),
        };
        let requested = vm.stop_requested || vm.suspending;
        let from = vm.row.state;
        let to = if vm.suspending && vm.row.home.join(SUSPEND_DIR).is_dir() {
            VmState::Suspended
        } else if requested || code == Some(0) || (!child && code.is_none() && released) {
            // Asked to end, or the guest powered off.
            VmState::Defined
        } else {
            VmState::Crashed
        };
        if let Err(e) = transition(from, to) {
            tracing::warn!(vm = name, "{e}");
        }
        vm.row.state = to;
        vm.row.pid = None;
        vm.row.last_log = last_run_tail(&vm.row.home.join(VM_LOG), LAST_LOG_LINES);
        vm.row.last_exit = Some(ExitInfo {
            code,
            signal,
            requested,
            description: description.clone(),
            at_unix_ms: unix_ms(),
        });
        vm.stop_requested = false;
        vm.suspending = false;
        let row = vm.row.clone();
        drop(vms);
        if let Err(e) = self.db.put(&row).await {
            tracing::warn!(vm = name, "cannot record the VMM's end: {e}");
        }
        let kind = if to == VmState::Crashed { "crashed" } else { "ended" };
        self.event(name, kind, &format!("VMM pid {pid} ended: {description}; now {to}")).await;
    }

    /// `GET /host`.
    pub async fn host_info(&self) -> HostInfo {
        let vms = self.list().await.vms;
        let reserved_bytes = {
            let all = self.vms.lock().await;
            all.values().filter(|v| v.row.state.has_process()).map(|v| v.def.memory_mib << 20).sum()
        };
        let (cpu, (total, available), datastores) = tokio::task::spawn_blocking({
            let config = self.config.clone();
            let ids = self.datastore_ids.clone();
            move || {
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
                (crate::inventory::cpu(), crate::inventory::memory(), ds)
            }
        })
        .await
        .unwrap_or_else(|_| (crate::inventory::cpu(), (0, 0), Vec::new()));
        HostInfo {
            api_version: ferry_host_api::API_VERSION,
            name: self.config.name.clone(),
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            migration_protocols: vec![ferry_migration::protocol::PROTOCOL_VERSION],
            cpu,
            memory: MemoryInfo { total_bytes: total, available_bytes: available, reserved_bytes },
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
