//! The VM's home directory: its exclusive lock, its generation, its identity and the record
//! of when its vCPUs ran. Together they are the arbiter that a VM runs in one VMM only, and
//! only from its newest state (vMotion's lock on the VM's files on shared storage, with a
//! fencing token).
//!
//! - `vm.lock`: an open-file-description (OFD) write lock held by the one VMM that may run
//!   the VM. It conflicts with every other open of the file, in this process or any other
//!   on any host sharing the file system's lock manager, and the kernel drops it when the
//!   process dies. Its content is a [`LockRecord`]: who holds (or last held) it.
//! - `vm.generation`: a [`GenerationRecord`], the VM's identity (a UUID made with the home)
//!   and its generation. Whoever starts or resumes the VM raises the generation first,
//!   durably, under the lock ([`VmHome::raise_generation`]). Every state that leaves a VMM
//!   (a migration's State, a checkpoint) carries the generation it was taken at and may run
//!   only while that is still the current one: a copy of an older state can never start
//!   after the VM ran on past it.
//! - `runs.log`: one JSON line ([`RunRecord`]) per start and stop of the vCPUs, from every
//!   VMM that ran the VM, on the monotonic clock: the evidence that no two ran at once.
//!
//! See `docs/migration.md` ("The arbiter") for the argument, case by case.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::ofd_lock;

/// The lock file's name in a home directory.
pub const LOCK_FILE: &str = "vm.lock";
/// The generation file's name in a home directory.
pub const GENERATION_FILE: &str = "vm.generation";
/// The run record's name in a home directory.
pub const RUNS_FILE: &str = "runs.log";
/// Where VMM processes write their logs in a home (`vmm-<host>-<pid>.log`, by the binary).
pub const LOGS_DIR: &str = "logs";
/// A file at the root of a datastore naming it (one line: its id). A home below it is
/// identified by the datastore's id and its path inside the datastore, so two hosts that
/// mount the same datastore at different paths agree on it.
pub const DATASTORE_FILE: &str = ".ferry-datastore";
/// Where homes go when `--home` is not given: `<state dir>/vms/<id>`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";
/// Version of the records this module writes.
const RECORD_VERSION: u32 = 1;

/// Errors with a VM home.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory or lock file cannot be created or opened.
    #[error("cannot use VM home {path}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another VMM holds the lock.
    #[error("VM home {path} is locked by another VMM ({holder}): that VMM runs the VM; give this one another --home")]
    Held {
        /// The directory.
        path: PathBuf,
        /// Who holds it, from the lock file.
        holder: String,
    },
    /// The lock call failed for another reason.
    #[error("cannot lock VM home {path}")]
    Lock {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The generation file cannot be written durably.
    #[error("cannot record the VM's generation in {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The generation file is unreadable or malformed.
    #[error("VM home {path} has a damaged {GENERATION_FILE}: {reason}")]
    Damaged {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The home has no generation file (it was never a VM's home, or it is not visible).
    #[error("{path} is not a VM home (no {GENERATION_FILE}): is the VM's datastore visible on this host?")]
    NotAHome {
        /// The directory.
        path: PathBuf,
    },
    /// The operation needs the lock, and this VMM does not hold it.
    #[error("VM home {0} is not locked by this VMM")]
    NotHeld(PathBuf),
    /// The VM's lease (`--lease`) cannot be made, read or acquired.
    #[error("cannot use the lease of VM home {path}")]
    Lease {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: ferry_lease::Error,
    },
    /// The home has a lease (`vm.lease`) and this VMM was not given one.
    #[error(
        "VM home {path} has a lease ({}): the VM runs only under it; give --lease LOCKSPACE:HOSTID:IDS_PATH",
        crate::lease::LEASE_FILE
    )]
    LeaseRequired {
        /// The directory.
        path: PathBuf,
    },
    /// The home's lease belongs to another lockspace than `--lease` names.
    #[error("the lease of VM home {path} is in lockspace {lockspace}, not {configured}: give the datastore's lockspace to --lease")]
    LeaseElsewhere {
        /// The directory.
        path: PathBuf,
        /// The lease's lockspace.
        lockspace: String,
        /// The one configured.
        configured: String,
    },
}

/// `vm.generation`: the VM's identity and its generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// Record version.
    pub v: u32,
    /// The VM's UUID, made with its home.
    pub vm_uuid: String,
    /// Raised by whoever starts or resumes the VM, every time.
    pub generation: u64,
}

/// `vm.lock`'s content: who holds the lock (or held it last).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Record version.
    pub v: u32,
    /// The VM's UUID.
    pub vm_uuid: String,
    /// The generation when the record was written.
    pub generation: u64,
    /// The holder's host name.
    pub host: String,
    /// The holder's process id.
    pub pid: u32,
    /// The migration that brought the VM to the holder, if any.
    pub migration_id: Option<String>,
    /// When the holder took the lock (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// Whether the lock is held; false once the holder released it cleanly.
    pub held: bool,
    /// The holder's lease on shared storage, if the VM runs with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::lease::LeaseRecord>,
}

impl std::fmt::Display for LockRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}, generation {}", self.pid, self.host, self.generation)?;
        if let Some(l) = &self.lease {
            write!(f, ", host id {} of lockspace {}, lease version {}", l.host_id, l.lockspace, l.lver)?;
        }
        if let Some(m) = &self.migration_id {
            write!(f, ", migration {m}")?;
        }
        Ok(())
    }
}

pub use ferry_migration::schema::LockIdentity;

/// One line of `runs.log`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Record version.
    pub v: u32,
    /// The VMM's process id.
    pub pid: u32,
    /// Its host name.
    pub host: String,
    /// `run` (written before any vCPU may run) or `stop` (after all are stopped).
    pub event: RunEvent,
    /// The generation the vCPUs run (ran) at.
    pub generation: u64,
    /// `CLOCK_MONOTONIC` in ns.
    pub monotonic_ns: u64,
    /// The migration that brought the VM here, if any.
    pub migration_id: Option<String>,
}

/// A start or stop of the vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunEvent {
    /// The vCPUs are about to run.
    Run,
    /// The vCPUs have stopped.
    Stop,
}

/// The default home of a new VM under `state_dir`.
pub fn default_home(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("vms").join(id)
}

/// A fresh VM UUID.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A VM home whose lock this VMM holds while the value lives (or until [`VmHome::release`]).
#[derive(Debug)]
pub struct VmHome {
    dir: PathBuf,
    lock: Option<File>,
    /// `vm.generation` as last read or written under the lock.
    record: Option<GenerationRecord>,
    /// The migration named in the lock record.
    migration_id: Option<String>,
    since_unix_ms: u64,
    /// The VM's lease on shared storage (`--lease`), the arbiter when there is one.
    lease: Option<crate::lease::HomeLease>,
}

impl VmHome {
    /// Creates `dir` if needed and takes its lock, without waiting.
    pub fn lock(dir: &Path) -> Result<Self, Error> {
        let mut home = Self::unlocked(dir);
        home.acquire(None)?;
        Ok(home)
    }

    /// [`VmHome::lock`], and gives the home an identity (a new UUID, generation 0) if it has
    /// none: the home of a VM booted from its definition.
    pub fn lock_for_boot(dir: &Path) -> Result<Self, Error> {
        let mut home = Self::lock(dir)?;
        if home.record.is_none() {
            home.init_identity(new_uuid(), 0)?;
        }
        Ok(home)
    }

    /// Removes the home's own files (with the VMMs' logs and migration reports) and the
    /// directory, if nothing else is in it (a home Ferry made for a VM that has ended for
    /// good). Needs the lock, which it releases.
    pub fn remove(&mut self) {
        if self.lock.is_none() {
            return;
        }
        if let Some(l) = self.lease.as_mut() {
            l.release();
        }
        for name in [GENERATION_FILE, RUNS_FILE, LOCK_FILE, crate::lease::LEASE_FILE] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        // What the VMMs wrote there: their logs and migration reports.
        for dir in [LOGS_DIR, crate::migration::REPORTS_DIR] {
            let _ = std::fs::remove_dir_all(self.dir.join(dir));
        }
        // The lock goes with its file's last description.
        self.lock = None;
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// A home whose lock is not (yet) held: a migration destination reserves the VM under
    /// it and takes the lock only at the switchover.
    pub fn unlocked(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            lock: None,
            record: None,
            migration_id: None,
            since_unix_ms: 0,
            lease: None,
        }
    }

    /// This home with a lease on shared storage (`None`: only `vm.lock`): every
    /// acquisition takes the lease first, every release lets it go last.
    pub fn with_lease(mut self, config: Option<crate::lease::LeaseConfig>) -> Result<Self, Error> {
        self.lease = match config {
            Some(c) => Some(
                crate::lease::HomeLease::new(c)
                    .map_err(|source| Error::Open { path: self.dir.clone(), source })?,
            ),
            None => None,
        };
        Ok(self)
    }

    /// Creates `dir` if needed and takes its lease (if `lease`) and lock, without waiting;
    /// with `boot`, gives a home without identity one (see [`VmHome::lock_for_boot`]).
    pub fn lock_leased(
        dir: &Path,
        lease: Option<crate::lease::LeaseConfig>,
        boot: bool,
    ) -> Result<Self, Error> {
        let mut home = Self::unlocked(dir).with_lease(lease)?;
        home.acquire(None)?;
        if boot && home.record.is_none() {
            home.init_identity(new_uuid(), 0)?;
        }
        Ok(home)
    }

    /// The lease, if the home has one.
    pub fn lease(&self) -> Option<&crate::lease::HomeLease> {
        self.lease.as_ref()
    }

    /// Joins the lease's lockspace and makes the lease file if needed (a migration
    /// destination, before the switchover, so that taking the lease costs no more than the
    /// acquisition itself). Nothing without a lease.
    pub fn prepare_lease(&mut self) -> Result<(), Error> {
        match &mut self.lease {
            Some(l) => {
                std::fs::create_dir_all(&self.dir)
                    .map_err(|source| Error::Open { path: self.dir.clone(), source })?;
                l.prepare(&self.dir).map(drop)
            }
            None => Ok(()),
        }
    }

    /// Self-fencing: gives up the lock and the lease at once, without waiting for the lease
    /// daemon (it may hang with the storage). The record is left saying `held`: this holder
    /// did not end cleanly.
    pub fn fence(&mut self) {
        if let Some(l) = self.lease.as_mut() {
            l.abandon();
        }
        if let Some(f) = self.lock.take() {
            let _ = ofd_lock(&f, libc::F_UNLCK as libc::c_short);
        }
    }

    /// Takes the lock, without waiting, naming this process (and the migration that brought
    /// the VM here, if any) in the lock file, and reads the generation. Returns the previous
    /// lock record (`held` still true if its holder ended without releasing: it died).
    /// Checks that the home's storage answers within `wait`: on a datastore that hangs,
    /// every open or stat blocks in the kernel for as long as it hangs, so callers that must
    /// not block (a resume asked through the API) look first. The probe runs on a thread of
    /// its own, which stays blocked until the storage answers if it does not.
    pub fn answers_within(&self, wait: std::time::Duration) -> Result<(), Error> {
        let dir = self.dir.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let probe = std::thread::Builder::new().name("home-probe".into()).spawn(move || {
            let r =
                std::fs::metadata(&dir).and_then(|_| match std::fs::metadata(dir.join(GENERATION_FILE)) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other.map(|_| ()),
                });
            let _ = tx.send(r);
        });
        let open = |source| Error::Open { path: self.dir.clone(), source };
        probe.map_err(open)?;
        match rx.recv_timeout(wait) {
            Ok(r) => r.map_err(open),
            Err(_) => Err(open(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("its storage did not answer within {} s", wait.as_secs_f64()),
            ))),
        }
    }

    pub fn acquire(&mut self, migration_id: Option<&str>) -> Result<Option<LockRecord>, Error> {
        if self.lock.is_some() {
            return Ok(None);
        }
        let dir = self.dir.clone();
        let open = |source| Error::Open { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(open)?;
        // A leased VM's home is never run without its lease: a VMM started without
        // --lease would not see that another holds the VM.
        if self.lease.is_none() && dir.join(crate::lease::LEASE_FILE).exists() {
            return Err(Error::LeaseRequired { path: dir });
        }
        // With a lease, the lease decides first (it holds across hosts); vm.lock, which
        // only holds on one kernel or lock manager, follows as its local cache.
        if let Some(l) = self.lease.as_mut() {
            l.acquire(&dir)?;
        }
        match self.lock_file(&dir, migration_id) {
            Ok(previous) => Ok(previous),
            Err(e) => {
                if let Some(l) = self.lease.as_mut() {
                    l.release();
                }
                Err(e)
            }
        }
    }

    fn lock_file(&mut self, dir: &Path, migration_id: Option<&str>) -> Result<Option<LockRecord>, Error> {
        let dir = dir.to_owned();
        let open = |source| Error::Open { path: dir.clone(), source };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(open)?;
        match ofd_lock(&file, libc::F_WRLCK as libc::c_short) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                let holder = match read_record(&mut file) {
                    Some(r) => r.to_string(),
                    None => "holder unknown".to_string(),
                };
                // With the lease held, vm.lock is only its cache: a holder of the file lock
                // without the lease is fenced, or gone from a host whose lock manager has not
                // noticed yet (NFSv3 can keep a dead host's locks for ever).
                if !self.lease.as_ref().is_some_and(|l| l.is_held()) {
                    return Err(Error::Held { path: dir, holder });
                }
                tracing::warn!(
                    "{LOCK_FILE} in {} is still locked ({holder}), but this VMM holds the VM's lease, which \
                     decides: going on without the file lock",
                    dir.display()
                );
            }
            Err(source) => return Err(Error::Lock { path: dir, source }),
        }
        let previous = read_record(&mut file);
        remove_stale_temporaries(&dir);
        self.record = match read_generation(&dir) {
            Ok(r) => r,
            Err(e) => {
                let _ = ofd_lock(&file, libc::F_UNLCK as libc::c_short);
                return Err(e);
            }
        };
        self.lock = Some(file);
        self.migration_id = migration_id.map(str::to_owned);
        self.since_unix_ms = unix_ms();
        self.write_lock_record(true);
        Ok(previous)
    }

    /// [`VmHome::acquire`], retrying while another VMM holds the lock, for up to `wait`.
    pub fn acquire_within(
        &mut self,
        migration_id: Option<&str>,
        wait: std::time::Duration,
    ) -> Result<Option<LockRecord>, Error> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.acquire(migration_id) {
                Err(Error::Held { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                other => return other,
            }
        }
    }

    /// Gives a home without identity one: `vm_uuid` at `generation`. Needs the lock.
    pub fn init_identity(&mut self, vm_uuid: String, generation: u64) -> Result<(), Error> {
        if self.lock.is_none() {
            return Err(Error::NotHeld(self.dir.clone()));
        }
        let record = GenerationRecord { v: RECORD_VERSION, vm_uuid, generation };
        write_generation(&self.dir, &record)?;
        self.record = Some(record);
        self.write_lock_record(true);
        Ok(())
    }

    /// The identity and generation read under the lock (None: the home has none yet).
    pub fn record(&self) -> Option<&GenerationRecord> {
        self.record.as_ref()
    }

    /// The current generation (None: the home has no identity yet).
    pub fn generation(&self) -> Option<u64> {
        self.record.as_ref().map(|r| r.generation)
    }

    /// The VM's UUID (None: the home has no identity yet).
    pub fn vm_uuid(&self) -> Option<&str> {
        self.record.as_ref().map(|r| r.vm_uuid.as_str())
    }

    /// Raises the generation by one, durably (file and directory synced), before the vCPUs
    /// start or resume. Needs the lock. Returns the new generation.
    pub fn raise_generation(&mut self) -> Result<u64, Error> {
        if self.lock.is_none() {
            return Err(Error::NotHeld(self.dir.clone()));
        }
        // Read again: what is on disk is the truth, whatever this VMM remembers. A home from
        // a Ferry before generations (a VM migrated in from the previous release) gets its
        // identity now, under the lock.
        let current = match read_generation(&self.dir)? {
            Some(r) => r,
            None => {
                tracing::info!(
                    "VM home {} had no generation (an older Ferry's): starting one",
                    self.dir.display()
                );
                GenerationRecord { v: RECORD_VERSION, vm_uuid: new_uuid(), generation: 0 }
            }
        };
        let next = GenerationRecord { generation: current.generation + 1, ..current };
        write_generation(&self.dir, &next)?;
        self.record = Some(next.clone());
        self.write_lock_record(true);
        Ok(next.generation)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this VMM still holds the lock.
    pub fn is_held(&self) -> bool {
        self.lock.is_some()
    }

    /// Gives the lock up (the source of a migration, once it has stopped for good), marking
    /// the record released so that the next holder knows this one did not die holding it.
    pub fn release(&mut self) {
        if self.lock.is_some() {
            self.write_lock_record(false);
        }
        if let Some(f) = self.lock.take() {
            let _ = ofd_lock(&f, libc::F_UNLCK as libc::c_short);
        }
        if let Some(l) = self.lease.as_mut() {
            l.release();
        }
    }

    /// Appends a start or stop of the vCPUs to `runs.log`. A failure is logged: the record
    /// is evidence, not the arbiter.
    pub fn record_run(&self, event: RunEvent, migration_id: Option<&str>) {
        if let Err(e) =
            append_line(&self.dir.join(RUNS_FILE), &self.run_line(event, migration_id, crate::monotonic_ns()))
        {
            tracing::warn!("cannot append to {}: {e}", self.dir.join(RUNS_FILE).display());
        }
    }

    /// [`VmHome::record_run`] for an event at `at_ns`, written by a thread: a fenced VMM
    /// records its stop without waiting for storage that may hang.
    /// Returns what says the line is written (the sender goes when the thread ends).
    pub fn record_run_detached(
        &self,
        event: RunEvent,
        migration_id: Option<&str>,
        at_ns: u64,
    ) -> Option<std::sync::mpsc::Receiver<()>> {
        let line = self.run_line(event, migration_id, at_ns);
        let path = self.dir.join(RUNS_FILE);
        let (done, written) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new().name("runs-log".into()).spawn(move || {
            if let Err(e) = append_line(&path, &line) {
                tracing::warn!("cannot append to {}: {e}", path.display());
            }
            drop(done);
        });
        match spawned {
            Ok(_) => Some(written),
            Err(e) => {
                tracing::warn!("cannot record the stop in {RUNS_FILE}: {e}");
                None
            }
        }
    }

    fn run_line(&self, event: RunEvent, migration_id: Option<&str>, at_ns: u64) -> Vec<u8> {
        let record = RunRecord {
            v: RECORD_VERSION,
            pid: std::process::id(),
            host: hostname(),
            event,
            generation: self.generation().unwrap_or(0),
            monotonic_ns: at_ns,
            migration_id: migration_id.map(str::to_owned),
        };
        let mut line = serde_json::to_vec(&record).unwrap_or_default();
        line.push(b'\n');
        line
    }

    fn write_lock_record(&mut self, held: bool) {
        let Some(file) = self.lock.as_mut() else { return };
        let record = LockRecord {
            v: RECORD_VERSION,
            vm_uuid: self.record.as_ref().map(|r| r.vm_uuid.clone()).unwrap_or_default(),
            generation: self.record.as_ref().map(|r| r.generation).unwrap_or(0),
            host: hostname(),
            pid: std::process::id(),
            migration_id: self.migration_id.clone(),
            since_unix_ms: self.since_unix_ms,
            held,
            lease: self.lease.as_ref().and_then(|l| l.record()),
        };
        let mut text = serde_json::to_vec(&record).unwrap_or_default();
        text.push(b'\n');
        // The record is for readers (operators, daemons): the lock itself is the arbiter, and
        // the generation (synced in its own file) the fencing token. So the record is not
        // synced: on the switchover's path each sync costs milliseconds of downtime.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.write_all(&text);
    }
}

/// What an operator or a daemon can read about a home without locking it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeStatus {
    /// The directory.
    pub home: PathBuf,
    /// Its identity and generation, if it has one.
    pub generation: Option<GenerationRecord>,
    /// The lock file's record, if it has one.
    pub lock: Option<LockRecord>,
    /// Whether some process holds the lock now (an OFD lock test, not the record).
    pub locked: bool,
    /// The lease on shared storage (`vm.lease`), read through the local sanlock daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::lease::LeaseStatus>,
    /// Why the lease could not be read, if the home has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_error: Option<String>,
}

/// Reads a home's status without taking its lock.
pub fn status(dir: &Path) -> Result<HomeStatus, Error> {
    if !dir.is_dir() {
        return Err(Error::Open {
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        });
    }
    let generation = read_generation(dir)?;
    let (lock, locked) = match File::open(dir.join(LOCK_FILE)) {
        Ok(mut f) => {
            let record = read_record(&mut f);
            (record, is_locked(&f).map_err(|source| Error::Lock { path: dir.to_owned(), source })?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, false),
        Err(source) => return Err(Error::Open { path: dir.to_owned(), source }),
    };
    let (lease, lease_error) = match crate::lease::status(dir) {
        Ok(l) => (l, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(HomeStatus { home: dir.to_owned(), generation, lock, locked, lease, lease_error })
}

/// Whether another open file description holds a lock on `f` (F_OFD_GETLK).
fn is_locked(f: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_GETLK on a descriptor this process owns, with a valid flock pointer.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// The identity of the lock of the home at `dir`, read without locking it: what a
/// migration's destination compares with the source's before anything moves.
pub fn lock_identity(dir: &Path) -> Result<LockIdentity, Error> {
    let record = read_generation(dir)?.ok_or_else(|| Error::NotAHome { path: dir.to_owned() })?;
    let canonical =
        std::fs::canonicalize(dir).map_err(|source| Error::Open { path: dir.to_owned(), source })?;
    let (datastore, path) = match find_datastore(&canonical) {
        Some((id, root)) => {
            let inside = canonical.strip_prefix(&root).map(Path::to_path_buf).unwrap_or(canonical.clone());
            (Some(id), inside)
        }
        None => (None, canonical),
    };
    Ok(LockIdentity { vm_uuid: record.vm_uuid, datastore, path })
}

/// The nearest directory at or above `dir` with a [`DATASTORE_FILE`]: its id and path.
fn find_datastore(dir: &Path) -> Option<(String, PathBuf)> {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if let Ok(text) = std::fs::read_to_string(d.join(DATASTORE_FILE)) {
            let id = text.trim();
            if !id.is_empty() {
                return Some((id.to_string(), d.to_owned()));
            }
        }
        cur = d.parent();
    }
    None
}

fn read_record(file: &mut File) -> Option<LockRecord> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// Reads `dir/vm.generation`; `None` if there is none.
pub fn read_generation(dir: &Path) -> Result<Option<GenerationRecord>, Error> {
    let path = dir.join(GENERATION_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Damaged { path: dir.to_owned(), reason: e.to_string() }),
    };
    let record: GenerationRecord = serde_json::from_str(text.trim())
        .map_err(|e| Error::Damaged { path: dir.to_owned(), reason: e.to_string() })?;
    if record.v > RECORD_VERSION {
        return Err(Error::Damaged {
            path: dir.to_owned(),
            reason: format!("record version {} is newer than this Ferry's {RECORD_VERSION}", record.v),
        });
    }
    if record.vm_uuid.is_empty() {
        return Err(Error::Damaged { path: dir.to_owned(), reason: "no VM UUID".into() });
    }
    Ok(Some(record))
}

/// Removes the temporary files a holder killed while replacing `vm.generation` left
/// behind. Only the lock holder writes them, so with the lock held none is in use.
fn remove_stale_temporaries(dir: &Path) {
    let prefix = format!(".{GENERATION_FILE}.");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Replaces `dir/vm.generation` atomically and durably: a temporary file written and
/// synced, renamed over the old one, and the directory synced.
fn write_generation(dir: &Path, record: &GenerationRecord) -> Result<(), Error> {
    let path = dir.join(GENERATION_FILE);
    let tmp = dir.join(format!(".{GENERATION_FILE}.{}.tmp", std::process::id()));
    let err = |source| Error::Write { path: path.clone(), source };
    let mut text = serde_json::to_vec(record).unwrap_or_default();
    text.push(b'\n');
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

fn append_line(path: &Path, line: &[u8]) -> std::io::Result<()> {
    OpenOptions::new().append(true).create(true).open(path).and_then(|mut f| f.write_all(line))
}

/// This host's name, for the records.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "this host".into())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-home-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn one_holder_at_a_time_and_release() {
        let dir = scratch("one");
        let mut a = VmHome::lock(&dir).expect("first lock");
        assert!(a.is_held());
        // OFD locks conflict between open file descriptions, even in one process.
        match VmHome::lock(&dir) {
            Err(Error::Held { holder, .. }) => {
                assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}")
            }
            other => panic!("expected Held, got {other:?}"),
        }
        assert!(status(&dir).expect("status").locked);
        a.release();
        assert!(!a.is_held());
        let s = status(&dir).expect("status");
        assert!(!s.locked);
        assert_eq!(s.lock.map(|l| l.held), Some(false));
        let b = VmHome::lock(&dir).expect("after release");
        drop(b);
        // Dropping the File closes the description and so drops the lock.
        let _c = VmHome::lock(&dir).expect("after drop");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_previous_record_says_whether_its_holder_released() {
        let dir = scratch("prev");
        let mut a = VmHome::lock(&dir).expect("lock");
        a.release();
        let mut b = VmHome::unlocked(&dir);
        assert_eq!(b.acquire(Some("m-1")).expect("lock").map(|r| r.held), Some(false));
        // A holder that ends without releasing (a crash) leaves its record held.
        drop(b);
        let mut c = VmHome::unlocked(&dir);
        let before = c.acquire(None).expect("lock").expect("a record");
        assert!(before.held);
        assert_eq!(before.migration_id.as_deref(), Some("m-1"));
        // Waiting gives up after the deadline while another holds it.
        let mut d = VmHome::unlocked(&dir);
        let t = std::time::Instant::now();
        assert!(matches!(
            d.acquire_within(None, std::time::Duration::from_millis(50)),
            Err(Error::Held { .. })
        ));
        assert!(t.elapsed() >= std::time::Duration::from_millis(50));
        drop(c);
        d.acquire_within(None, std::time::Duration::from_millis(50)).expect("free now");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_generation_only_goes_up_and_survives_the_holder() {
        let dir = scratch("gen");
        let mut a = VmHome::lock_for_boot(&dir).expect("lock");
        let uuid = a.vm_uuid().expect("identity").to_string();
        assert_eq!(a.generation(), Some(0));
        assert_eq!(a.raise_generation().expect("raise"), 1);
        assert_eq!(a.raise_generation().expect("raise"), 2);
        drop(a);
        let mut b = VmHome::unlocked(&dir);
        // Without the lock, nothing may be raised.
        assert!(matches!(b.raise_generation(), Err(Error::NotHeld(_))));
        b.acquire(None).expect("lock");
        assert_eq!(b.generation(), Some(2));
        assert_eq!(b.vm_uuid(), Some(uuid.as_str()));
        let r = read_generation(&dir).expect("read").expect("record");
        assert_eq!((r.vm_uuid, r.generation), (uuid, 2));
        // A holder killed mid-write leaves a temporary file; the next holder removes it.
        std::fs::write(dir.join(format!(".{GENERATION_FILE}.999999.tmp")), b"{").expect("write");
        drop(b);
        let mut again = VmHome::unlocked(&dir);
        again.acquire(None).expect("lock");
        drop(again);
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_copied_home_has_another_lock_identity() {
        let dir = scratch("ident");
        let a = dir.join("vm");
        let home = VmHome::lock_for_boot(&a).expect("lock");
        let id = lock_identity(&a).expect("identity");
        assert_eq!(id.vm_uuid, home.vm_uuid().expect("uuid"));
        assert_eq!(id.datastore, None);
        // A copy carries the same UUID but sits elsewhere: another lock.
        let b = dir.join("copy");
        std::fs::create_dir_all(&b).expect("mkdir");
        std::fs::copy(a.join(GENERATION_FILE), b.join(GENERATION_FILE)).expect("copy");
        assert_ne!(lock_identity(&b).expect("identity"), id);
        // On a datastore, the identity is the path inside it, wherever it is mounted.
        std::fs::write(dir.join(DATASTORE_FILE), "ds-1\n").expect("datastore");
        let on_ds = lock_identity(&a).expect("identity");
        assert_eq!(on_ds.datastore.as_deref(), Some("ds-1"));
        assert_eq!(on_ds.path, Path::new("vm"));
        // A directory that is not a home has no identity.
        assert!(matches!(lock_identity(&dir), Err(Error::NotAHome { .. })));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn damaged_or_newer_records_are_refused() {
        let dir = scratch("bad");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(GENERATION_FILE), "{not json").expect("write");
        assert!(matches!(VmHome::lock(&dir), Err(Error::Damaged { .. })));
        std::fs::write(dir.join(GENERATION_FILE), r#"{"v":9,"vm_uuid":"x","generation":1}"#).expect("write");
        let e = VmHome::lock(&dir).expect_err("newer");
        assert!(e.to_string().contains("newer"), "{e}");
        // The failed attempts left the lock free.
        let f = File::open(dir.join(LOCK_FILE)).expect("lock file");
        assert!(!is_locked(&f).expect("test the lock"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn runs_are_recorded_as_json_lines() {
        let dir = scratch("runs");
        let mut h = VmHome::lock_for_boot(&dir).expect("lock");
        h.raise_generation().expect("raise");
        h.record_run(RunEvent::Run, Some("m-x"));
        h.record_run(RunEvent::Stop, None);
        let text = std::fs::read_to_string(dir.join(RUNS_FILE)).expect("runs");
        let lines: Vec<RunRecord> =
            text.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].event, lines[0].generation), (RunEvent::Run, 1));
        assert_eq!(lines[0].migration_id.as_deref(), Some("m-x"));
        assert_eq!(lines[1].event, RunEvent::Stop);
        assert!(lines[1].monotonic_ns >= lines[0].monotonic_ns);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn unusable_directory() {
        assert!(matches!(VmHome::lock(Path::new("/proc/ferry-no-home")), Err(Error::Open { .. })));
    }
}
