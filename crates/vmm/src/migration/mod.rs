//! Live migration of a running VM between two VMM processes (see `docs/migration.md`).
//!
//! The source side runs on its own thread ([`send`]) so the VMM thread keeps serving the
//! API (progress in `info`, cancel) and the guest keeps running during pre-copy. Everything
//! that touches the vCPUs or the VM's lock (pause, save, commit, resume) the migration
//! thread asks of the VMM thread through a `Call`, so those steps are ordered with API
//! requests such as a cancel: the commit and a cancel can never both succeed.
//!
//! The destination side ([`receive`]) runs before the VM exists: `ferry receive` waits for
//! a connection, reserves the VM from the source's configuration, receives memory and
//! state, restores, and returns a [`Vmm`] whose vCPUs start only once it holds the VM's
//! lock.

mod accept;
mod link;
pub mod managed;
mod pass;
mod place;
mod populate;
pub mod receive;
pub mod send;
mod splice;

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use ferry_api::{
    ApiError, EventBody, MigrateRequest, MigrationInfo, MigrationPhase, MigrationReport, Response, Side,
    VmLocation,
};
use ferry_migration::outcome::{Check, ReasonCode};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;
use crate::persist::{RegionState, VmSnapshot};
use crate::{VmRunState, Vmm};

pub use populate::{small_pages_from_env, PAGES_ENV};
pub use receive::{AuthKey, Listen, ReceiveConfig};

pub use ferry_migration::schema::{MigrationConfig, DEVICES};

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is not `tcp:HOST:PORT`.
    #[error("bad migration address {0:?}: expected tcp:HOST:PORT, e.g. tcp:10.0.0.2:7000")]
    BadAddress(String),
    /// Nothing accepted the connection.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Listening failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The wire protocol failed (connection lost, malformed message, peer abort).
    #[error(transparent)]
    Protocol(#[from] ferry_migration::protocol::Error),
    /// A connection's handshake failed (before it was authenticated).
    #[error(transparent)]
    Handshake(#[from] ferry_migration::handshake::Error),
    /// The auth key cannot be used.
    #[error(transparent)]
    Key(#[from] ferry_migration::auth::Error),
    /// The peer did not prove it knows the key.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peers speak different protocol versions.
    #[error("the peer speaks migration protocol version {0}; this Ferry speaks version {1}")]
    Version(u32, u32),
    /// The destination refused the VM (its checks, or it is busy): its reason and code.
    #[error("the destination refused the VM: {reason}")]
    Refused {
        /// The destination's sentence.
        reason: String,
        /// The destination's code.
        code: ReasonCode,
    },
    /// A pre-migration check failed here (destination side): which one, and why.
    #[error("pre-migration check failed: {1}")]
    Check(Check, String),
    /// The peer made no progress for the stall bound.
    #[error(transparent)]
    Stalled(#[from] link::Stalled),
    /// Pre-copy did not converge (`no_convergence`), or the time limit was reached
    /// (`timeout`).
    #[error("{1}")]
    GaveUp(ReasonCode, String),
    /// An operator cancelled the migration.
    #[error("cancelled by the operator")]
    Cancelled,
    /// The VMM could not do its part (pause, save, commit).
    #[error("the VMM could not {0}")]
    Vmm(String),
    /// A lock (the VM's or a disk's) is held by someone else (destination side).
    #[error("the VMM could not {0}")]
    Lock(String),
    /// The destination could not restore the VM: its reason and code (`restore_failed`,
    /// or `verify_mismatch` when the memory checksums differ).
    #[error("the destination could not restore the VM: {reason}")]
    RestoreFailed {
        /// The destination's sentence.
        reason: String,
        /// Its code.
        code: ReasonCode,
    },
    /// The guest memory hashes of both sides differ.
    #[error("memory verification failed: {0}")]
    Verify(String),
    /// Dirty logging failed.
    #[error(transparent)]
    Dirty(#[from] crate::dirty::Error),
    /// Guest memory could not be read or written.
    #[error("guest memory access failed at {addr:#x}")]
    Memory {
        /// Guest-physical address.
        addr: u64,
    },
    /// The state received is older than the VM's generation: the VM ran on past it.
    #[error(
        "the state received is of generation {state}, but the VM has run on since (generation {current:?}): \
         this copy is stale and must not run"
    )]
    Stale {
        /// The state's generation.
        state: u64,
        /// The home's.
        current: Option<u64>,
    },
    /// A receiver waited its whole deadline and no migration started.
    #[error("no migration started within {0} s (--deadline-s); the receiver gives up, nothing runs here")]
    Deadline(u64),
    /// The process was asked to stop.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    /// The source's extra streams did not all join.
    #[error("the source's extra streams did not join: {0}")]
    Streams(String),
    /// A connection's Hello names no stream the receiver waits for.
    #[error("the connection did not join as a stream: {0}")]
    NotJoined(String),
    /// A first stream arrived while the receiver has a migration in progress (this one).
    #[error("the receiver is busy with migration {0}")]
    Busy(String),
    /// A stream stopped because another one failed (never reported: the other's error is).
    #[error("stopped because another stream failed")]
    StreamStopped,
    /// Building the VM on the destination failed.
    #[error(transparent)]
    Build(Box<crate::Error>),
}

impl Error {
    /// How this error ends a migration, as a code: decided by the error's type and the
    /// codes peers send, never by its text.
    pub fn code(&self) -> ReasonCode {
        match self {
            Error::BadAddress(_) | Error::Listen { .. } => ReasonCode::VmmError,
            Error::Connect { .. } => ReasonCode::Unreachable,
            Error::Protocol(e) => e.code(),
            Error::Handshake(e) => e.code(),
            Error::Key(_) | Error::Auth(_) => ReasonCode::AuthFailed,
            Error::Version(..) => ReasonCode::VersionMismatch,
            Error::Refused { code, .. } | Error::RestoreFailed { code, .. } | Error::GaveUp(code, _) => *code,
            Error::Check(check, _) => ReasonCode::RefusedByDestination(*check),
            Error::Stalled(_) => ReasonCode::Stalled,
            Error::Cancelled => ReasonCode::Cancelled,
            Error::Vmm(_) | Error::Dirty(_) | Error::Memory { .. } | Error::Build(_) => ReasonCode::VmmError,
            Error::Lock(_) => ReasonCode::LockConflict,
            Error::Verify(_) => ReasonCode::VerifyMismatch,
            Error::Stale { .. } => ReasonCode::StaleState,
            Error::Interrupted(_) => ReasonCode::Interrupted,
            Error::Deadline(_) => ReasonCode::Timeout,
            Error::Streams(_) | Error::StreamStopped => ReasonCode::ConnectionLost,
            Error::NotJoined(_) => ReasonCode::ProtocolError,
            Error::Busy(_) => ReasonCode::Busy,
        }
    }
}

impl From<crate::Error> for Error {
    fn from(e: crate::Error) -> Self {
        Error::Build(Box::new(e))
    }
}

/// An error and its causes in one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

/// Socket buffer size asked for on both ends when [`BUFFER_ENV`] says a size.
const SOCKET_BUFFER: libc::c_int = ferry_migration::schema::SOCKET_BUFFER as libc::c_int;

/// The environment variable that sets the migration sockets' buffers: a size in MiB (1 to
/// 64) forced on both ends, `max` (`SOCKET_BUFFER`, the default) or `auto` (the kernel's
/// autotuning), for side-by-side measurements on other machines.
pub const BUFFER_ENV: &str = "FERRY_SOCKET_BUFFER";

/// The socket buffer [`BUFFER_ENV`] asks for: `None` for the kernel's autotuning.
///
/// 8 MiB forced on both ends is the default: room for a few page batches in flight, so that
/// sender and receiver wake each other less often. Measured again against autotuning on
/// 2 Dec 2026 (`ferry-bench migrate --runs 2 --without-qemu`, alternated, 4 invocations
/// each, cold memory): total 664-742 ms against 716-1071 ms, pass 1 996-1150 against
/// 680-1053 MB/s. (A bare loopback stream into fresh memory went the other way, 813
/// against 1045 MB/s: the forced buffers help Ferry's sender, not every stream.)
fn socket_buffer() -> Option<libc::c_int> {
    static CHOICE: std::sync::OnceLock<Option<libc::c_int>> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| parse_socket_buffer(std::env::var(BUFFER_ENV).ok().as_deref()))
}

/// [`socket_buffer`] from the variable's value (`None`: unset).
fn parse_socket_buffer(value: Option<&str>) -> Option<libc::c_int> {
    match value.map(str::trim) {
        None | Some("" | "max") => Some(SOCKET_BUFFER),
        Some("auto") => None,
        Some(v) => match v.parse::<libc::c_int>() {
            Ok(mib @ 1..=64) => Some(mib << 20),
            _ => {
                tracing::warn!(
                    "{BUFFER_ENV}={v:?} is neither auto, max nor a size of 1 to 64 MiB; using max"
                );
                Some(SOCKET_BUFFER)
            }
        },
    }
}

/// On a destination: gives `sock` the receive buffer `config` asks for, if any
/// ([`MigrationConfig::receive_buffer`]).
fn size_receive_buffer(sock: &TcpStream, config: &MigrationConfig) {
    if let Some(size) = config.receive_buffer() {
        set_socket_buffer(sock, libc::SO_RCVBUFFORCE, size as libc::c_int);
    }
}

/// Gives a migration socket the buffer [`BUFFER_ENV`] asks for (8 MiB by default) in
/// direction `opt` (`SO_SNDBUFFORCE` or `SO_RCVBUFFORCE`, which need `CAP_NET_ADMIN`), or
/// leaves it to the kernel's autotuning (`auto`). Without the privilege autotuning stays in charge: a
/// plain `SO_SNDBUF` would cap the buffer at `wmem_max` and switch autotuning off.
fn size_socket_buffer(sock: &TcpStream, opt: libc::c_int) {
    if let Some(size) = socket_buffer() {
        set_socket_buffer(sock, opt, size);
    }
}

/// [`size_socket_buffer`] with `size` bytes.
fn set_socket_buffer(sock: &TcpStream, opt: libc::c_int, size: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket this process owns, with a valid pointer to an int and
    // its size; failure leaves the socket as it was.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("socket buffer left to the kernel: {}", std::io::Error::last_os_error());
    }
}

/// Parses `tcp:HOST:PORT`.
pub fn parse_address(s: &str) -> Result<String, Error> {
    let rest = s.strip_prefix("tcp:").ok_or_else(|| Error::BadAddress(s.to_string()))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| Error::BadAddress(s.to_string()))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(Error::BadAddress(s.to_string()));
    }
    Ok(rest.to_string())
}

/// A fresh migration id.
pub fn new_migration_id() -> String {
    let n = ferry_migration::auth::nonce().map(|n| ferry_migration::auth::hex(&n[..6])).unwrap_or_default();
    format!("m-{n}")
}

/// Faults a test can inject on a destination, to prove the recovery paths: given in
/// [`ReceiveConfig::faults`]. The `ferry` binary reads them from `FERRY_FAULT_INJECT`
/// ([`Faults::parse`]); the library reads no environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail the restore on the destination.
    pub restore_fail: bool,
    /// CPU features the destination pretends to lack.
    pub hide_cpu_features: Vec<String>,
}

impl Faults {
    /// Parses a comma-separated list: `restore-fail` (the destination answers
    /// RESTORE_FAILED), `hide-cpu-feature=NAME` (it pretends its CPU lacks NAME, e.g.
    /// `avx2`). Returns the faults and the items it does not know.
    pub fn parse(list: &str) -> (Self, Vec<String>) {
        let mut f = Faults::default();
        let mut unknown = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                None if item == "restore-fail" => f.restore_fail = true,
                Some(("hide-cpu-feature", name)) => f.hide_cpu_features.push(name.to_string()),
                _ => unknown.push(item.to_string()),
            }
        }
        (f, unknown)
    }
}

/// CRC-32 of each `chunk` bytes of guest memory, regions in order. The vCPUs must not run.
/// A chunk whose pages were never populated reads as zeros and is not read (reading it
/// would only map the zero page over and over).
pub fn memory_crcs(mem: &GuestMemory, chunk: u64) -> Vec<u32> {
    memory_crcs_unless(mem, chunk, &AtomicBool::new(false)).unwrap_or_default()
}

/// [`memory_crcs`], given up (`None`) as soon as `stop` is set: hashing a big guest takes
/// seconds, and a cancel must not wait for it.
pub(crate) fn memory_crcs_unless(mem: &GuestMemory, chunk: u64, stop: &AtomicBool) -> Option<Vec<u32>> {
    let untouched = crate::memory::never_touched(mem);
    let page = ferry_arch::layout::PAGE_SIZE;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk as usize];
    let mut zero_crc: Option<(usize, u32)> = None;
    for (i, r) in mem.iter().enumerate() {
        let map = untouched.get(i).and_then(Option::as_ref);
        let mut off = 0u64;
        while off < r.len() {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let n = chunk.min(r.len() - off) as usize;
            let (first, pages) = ((off / page) as usize, n / page as usize);
            let never = map.is_some_and(|m| {
                (first..first + pages).all(|p| m.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0))
            });
            let crc = if never {
                match zero_crc {
                    Some((len, crc)) if len == n => crc,
                    _ => {
                        let crc = crc32fast::hash(&vec![0u8; n]);
                        zero_crc = Some((n, crc));
                        crc
                    }
                }
            } else {
                let ok = r
                    .get_slice(vm_memory::MemoryRegionAddress(off), n)
                    .map(|s| s.copy_to(&mut buf[..n]) == n)
                    .unwrap_or(false);
                if ok {
                    crc32fast::hash(&buf[..n])
                } else {
                    0
                }
            };
            out.push(crc);
            off += n as u64;
        }
    }
    Some(out)
}

/// Chunk size for [`memory_crcs`]: 2 MiB, more for huge guests so the list stays small.
pub fn verify_chunk(memory: u64) -> u64 {
    (2u64 << 20).max((memory / 65536).next_power_of_two())
}

/// A request from the migration thread to the VMM thread.
#[derive(Debug)]
pub(crate) enum Call {
    /// Pause the vCPUs and save the VM's state (the stop-and-copy).
    StopAndSave(Sender<Result<Box<VmSnapshot>, String>>),
    /// Commit: refuse if cancelled; else stop for good and release the VM's lock.
    Commit(Sender<CommitAnswer>),
    /// The destination did not confirm activation: take the lock back, then the disks'.
    Reclaim(Sender<Reclaimed>),
    /// Raise the generation and let the vCPUs run again (rollback); the error says why
    /// they cannot.
    Resume(Sender<Result<(), String>>),
    /// The migration has ended.
    Finished(Box<MigrationReport>),
}

/// The VMM thread's answer to [`Call::Commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitAnswer {
    /// Committed: the lock is released, the source never runs the guest again.
    Committed,
    /// A cancel came first: nothing was released.
    Cancelled,
}

/// What taking the VM back after a commit found.
#[derive(Debug)]
pub(crate) enum Reclaimed {
    /// The VM's lock (and its disks') is this VMM's again and the generation is still the
    /// one of the state sent: nobody ran the VM since, so it may resume here.
    Ours,
    /// The lock was free but the generation moved on: the destination ran the VM (and has
    /// since died or let go). The state here is stale and must never run; the lock is
    /// released again. The lock record as found.
    RanOn {
        /// The home's generation.
        current: Option<u64>,
        /// The state's.
        state: Option<u64>,
        /// Who held the lock last.
        last_holder: Option<crate::home::LockRecord>,
    },
    /// Someone holds the VM's lock: why it cannot be taken.
    Held(String),
    /// The VM's lock is back, but a disk's is held by someone else: the VM must not run.
    DiskHeld(String),
}

/// The migration thread's end of the channel to the VMM thread.
#[derive(Debug, Clone)]
pub(crate) struct VmmPort {
    calls: Sender<Call>,
    wake: Arc<EventFd>,
}

impl VmmPort {
    /// Sends a call and waits for its answer.
    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Call) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        self.calls.send(make(tx)).ok()?;
        let _ = self.wake.write(1);
        rx.recv().ok()
    }

    fn finish(&self, report: MigrationReport) {
        let _ = self.calls.send(Call::Finished(Box::new(report)));
        let _ = self.wake.write(1);
    }
}

/// The directory in a VM's home where migrations leave their reports.
pub const REPORTS_DIR: &str = "migrations";

/// How long the VMM waits for a record to reach the home before going on without it.
pub(crate) const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// [`write_record`] on a thread of its own, waited for at most `wait`: a home on hung
/// storage (the datastore stopped answering) must not stop the VMM thread or keep a
/// migration's outcome from its event stream. Returns `None` when the write is still
/// blocked (it completes, or not, when the storage answers; the warning says so).
pub(crate) fn write_record_bounded<T: Serialize + ?Sized>(
    home: &std::path::Path,
    name: &str,
    value: &T,
    wait: std::time::Duration,
) -> Option<std::io::Result<PathBuf>> {
    let json = match serde_json::to_value(value) {
        Ok(v) => v,
        Err(e) => return Some(Err(std::io::Error::other(e))),
    };
    let (home, name_owned) = (home.to_owned(), name.to_owned());
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new().name("home-record".into()).spawn(move || {
        let _ = tx.send(write_record(&home, &name_owned, &json));
    });
    if let Err(e) = spawned {
        return Some(Err(e));
    }
    match rx.recv_timeout(wait) {
        Ok(r) => Some(r),
        Err(_) => {
            tracing::warn!(
                "the VM's home did not take {name} within {:.0} s (its storage does not answer); going on \
                 without it",
                wait.as_secs_f64()
            );
            None
        }
    }
}

/// Writes `value` as `HOME/migrations/<name>` atomically (a temporary file, synced, renamed,
/// the directory synced): a reader sees the whole record or none.
pub(crate) fn write_record<T: Serialize + ?Sized>(
    home: &std::path::Path,
    name: &str,
    value: &T,
) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let dir = home.join(REPORTS_DIR);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    let mut json = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    json.push(b'\n');
    // An unnamed file linked in once complete: a VMM killed while writing leaves nothing
    // behind (the kernel frees the inode). Where the file system cannot (O_TMPFILE is not
    // on NFS), a named temporary file renamed over.
    match write_unnamed(&dir, &path, &json) {
        Ok(()) => return Ok(path),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) => {}
        Err(e) => return Err(e),
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map(|()| path)
}

/// Writes `data` into an unnamed file in `dir` (O_TMPFILE), syncs it, and links it in as
/// `path` (replacing an older one), then syncs `dir`.
fn write_unnamed(dir: &std::path::Path, path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f =
        std::fs::OpenOptions::new().write(true).custom_flags(libc::O_TMPFILE).mode(0o644).open(dir)?;
    f.write_all(data)?;
    f.sync_all()?;
    let from =
        std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).map_err(std::io::Error::other)?;
    let to = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let _ = std::fs::remove_file(path);
    // SAFETY: both are valid NUL-terminated paths that live across the call; linkat does
    // not keep them.
    let rc = unsafe {
        libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::fs::File::open(dir)?.sync_all()
}

/// A rough time left, ms (see [`MigrationInfo::eta_ms`]).
fn eta_ms(m: &MigrationInfo) -> Option<f64> {
    let page = ferry_migration::protocol::PAGE_SIZE as f64;
    let bytes_per_ms = m.rate_mib_s * (1 << 20) as f64 / 1e3;
    match m.phase {
        MigrationPhase::Setup | MigrationPhase::PreCopy if bytes_per_ms > 0.0 => {
            let this_pass = m.pages_left as f64 * page / bytes_per_ms;
            let next = m.pages_dirty as f64 * page / bytes_per_ms;
            Some(this_pass + next + if m.downtime_known { m.expected_downtime_ms } else { 0.0 })
        }
        MigrationPhase::StopAndCopy if bytes_per_ms > 0.0 => Some(m.pages_left as f64 * page / bytes_per_ms),
        _ => None,
    }
}

/// Shared progress, read by `info`.
pub(crate) type Status = Arc<Mutex<MigrationInfo>>;

fn update(status: &Status, f: impl FnOnce(&mut MigrationInfo)) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut s);
}

/// The VMM thread's record of the outgoing migration.
#[derive(Debug)]
pub(crate) struct Outgoing {
    id: String,
    status: Status,
    cancel: Arc<AtomicBool>,
    /// The migration's sockets: a cancel shuts them down so that no wait outlasts it.
    sockets: link::Sockets,
    committed: bool,
    /// The generation of the state sent in the stop-and-copy (set once saved).
    state_generation: Option<u64>,
    /// Whether the state has been saved and is being sent: a pause or resume request now
    /// cancels the migration first (see [`Vmm::defer_until_rolled_back`]).
    state_taken: bool,
    /// Pause and resume requests that arrived after the state was taken: carried out once
    /// the migration has rolled back.
    deferred: Vec<(ferry_api::Request, Sender<Result<Response, ApiError>>)>,
    inbox: Receiver<Call>,
    /// Registered with the run loop's epoll.
    pub wake: Arc<EventFd>,
}

/// On a destination: the source connection, to report activation on.
#[derive(Debug)]
pub struct Activation {
    pub(crate) stream: TcpStream,
    pub(crate) id: String,
    pub(crate) commit_ns: u64,
}

/// What the run loop does after a migration call.
pub(crate) enum Next {
    /// Go on.
    Continue,
    /// The VM now runs on the destination: end this VMM.
    Migrated,
    /// The VM was lost (the destination failed after taking it over): end this VMM.
    Lost(String),
}

impl Vmm {
    /// Starts an outgoing migration and answers `reply` at once with its id (202); its
    /// progress goes to the event ring and the status, its report to the home.
    pub(crate) fn start_migration(
        &mut self,
        req: MigrateRequest,
        reply: Sender<Result<Response, ApiError>>,
    ) -> Result<(), (ApiError, Sender<Result<Response, ApiError>>)> {
        if let Some(m) = &self.migration {
            return Err((
                ApiError::conflict(format!("the VM is already migrating (migration {})", m.id)),
                reply,
            ));
        }
        if self.state == VmRunState::Paused {
            return Err((ApiError::conflict("the VM is paused; resume it before migrating"), reply));
        }
        let addr = match parse_address(&req.to) {
            Ok(a) => a,
            Err(e) => return Err((ApiError::bad_request(e.to_string()), reply)),
        };
        let key = match ferry_migration::auth::Key::load(&req.auth_key_file) {
            Ok(k) => k,
            Err(e) => return Err((ApiError::bad_request(error_chain(&e)), reply)),
        };
        if req.delta_cache_mib > ferry_api::MAX_DELTA_CACHE_MIB {
            return Err((
                ApiError::bad_request(format!(
                    "delta_cache_mib must be at most {} (0 turns delta encoding off)",
                    ferry_api::MAX_DELTA_CACHE_MIB
                )),
                reply,
            ));
        }
        if req.downtime_ms == 0 || req.max_iterations == 0 || req.timeout_s == 0 {
            return Err((
                ApiError::bad_request("downtime_ms, max_iterations and timeout_s must be at least 1"),
                reply,
            ));
        }
        if !(1..=ferry_api::MAX_STREAMS).contains(&req.streams) {
            return Err((
                ApiError::bad_request(format!("streams must be 1 to {}", ferry_api::MAX_STREAMS)),
                reply,
            ));
        }
        if !ferry_api::STALL_TIMEOUT_S.contains(&req.stall_timeout_s) {
            return Err((
                ApiError::bad_request(format!(
                    "stall_timeout_s must be {} to {} seconds, not {}",
                    ferry_api::STALL_TIMEOUT_S.start(),
                    ferry_api::STALL_TIMEOUT_S.end(),
                    req.stall_timeout_s
                )),
                reply,
            ));
        }
        let id = match &req.migration_id {
            Some(id) if ferry_migration::handshake::valid_id(id) => id.clone(),
            Some(id) => {
                return Err((
                    ApiError::bad_request(format!(
                        "migration_id {id:?}: use 1 to 64 letters, digits, '-' or '_'"
                    )),
                    reply,
                ))
            }
            None => new_migration_id(),
        };
        let status: Status = Arc::new(Mutex::new(MigrationInfo {
            migration_id: id.clone(),
            phase: MigrationPhase::Setup,
            destination: req.to.clone(),
            pass: 0,
            pages_left: 0,
            pages_dirty: 0,
            rate_mb_s: 0.0,
            expected_downtime_ms: 0.0,
            bytes_transferred: 0,
            elapsed_ms: 0,
            reason: String::new(),
            rate_mib_s: 0.0,
            dirty_pages_per_s: 0.0,
            downtime_known: false,
            eta_ms: None,
            report: None,
            reason_code: ferry_api::ReasonCode::Unknown,
            throttle_percent: 0,
        }));
        let wake = match EventFd::new(libc::EFD_NONBLOCK) {
            Ok(e) => Arc::new(e),
            Err(e) => return Err((ApiError::internal(format!("cannot start the migration: {e}")), reply)),
        };
        let (tx, inbox) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let config = MigrationConfig {
            description: self.description.clone(),
            memory_regions: self
                .memory
                .iter()
                .map(|r| RegionState { guest_addr: r.start_addr().0, len: r.len() })
                .collect(),
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            devices: DEVICES.iter().map(|d| d.to_string()).chain(self.devices.virtio.names()).collect(),
            virtio: self.devices.virtio.backends(),
            home: self.home.dir().to_owned(),
            lock: match crate::home::lock_identity(self.home.dir()) {
                Ok(l) => Some(l),
                Err(e) => {
                    return Err((
                        ApiError::internal(format!("cannot name the VM's lock: {}", error_chain(&e))),
                        reply,
                    ))
                }
            },
            home_is_default: self.home_is_default,
            verify: req.verify,
            streams: req.streams,
            stall_timeout_ms: req.stall_timeout_s * 1000,
            bandwidth_cap: req.bandwidth_mib.saturating_mul(1 << 20),
        };
        let sockets = link::Sockets::default();
        let source = send::Source {
            id: id.clone(),
            addr,
            req,
            key,
            config,
            memory: self.memory.clone(),
            dirty: self.dirty_log(),
            port: VmmPort { calls: tx, wake: wake.clone() },
            status: status.clone(),
            cancel: cancel.clone(),
            sockets: sockets.clone(),
            events: self.events.clone(),
            throttle: self.throttle.clone(),
        };
        if let Err(e) = std::thread::Builder::new().name("migration".into()).spawn(move || source.run()) {
            return Err((ApiError::internal(format!("cannot start the migration thread: {e}")), reply));
        }
        tracing::info!("migration {id}: started");
        self.events.push(&id, Side::Source, EventBody::Phase { phase: MigrationPhase::Setup, reason: None });
        let _ = reply
            .send(Ok(Response::MigrationStarted(ferry_api::MigrationStarted { migration_id: id.clone() })));
        self.migration = Some(Outgoing {
            id,
            status,
            cancel,
            sockets,
            committed: false,
            state_generation: None,
            state_taken: false,
            deferred: Vec::new(),
            inbox,
            wake,
        });
        Ok(())
    }

    /// Asks the outgoing migration to stop; it rolls back unless it has committed.
    pub(crate) fn cancel_migration(&mut self) -> Result<(), ApiError> {
        match &self.migration {
            None => Err(ApiError::conflict("no migration is in progress")),
            Some(m) if m.committed => Err(ApiError::conflict(format!(
                "migration {} has committed: the VM is moving to the destination and it can no longer \
                 be cancelled",
                m.id
            ))),
            Some(m) => {
                // The flag first: the migration thread decides from it when its waits end.
                m.cancel.store(true, Ordering::SeqCst);
                m.sockets.shut_down();
                tracing::info!("migration {}: cancel requested; its connections are shut down", m.id);
                Ok(())
            }
        }
    }

    /// Progress of the outgoing migration, or the last one's end.
    pub(crate) fn migration_info(&self) -> Option<MigrationInfo> {
        match &self.migration {
            Some(m) => Some(m.status.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            None => self.last_migration.clone(),
        }
    }

    /// `GET /vm/migration`: [`Vmm::migration_info`] with the estimates filled in.
    pub(crate) fn migration_status(&self) -> Option<MigrationInfo> {
        let mut m = self.migration_info()?;
        m.eta_ms = eta_ms(&m);
        Some(m)
    }

    /// The id of the migration in progress.
    pub(crate) fn migrating(&self) -> Option<&str> {
        self.migration.as_ref().map(|m| m.id.as_str())
    }

    /// Carries out the migration thread's requests.
    pub(crate) fn handle_migration_calls(&mut self) -> Next {
        let Some(m) = &self.migration else {
            return Next::Continue;
        };
        let _ = m.wake.read();
        let calls: Vec<Call> = m.inbox.try_iter().collect();
        for call in calls {
            match call {
                Call::StopAndSave(tx) => {
                    let t = std::time::Instant::now();
                    let r = match self.pause_vcpus() {
                        Ok(()) => {
                            let paused = t.elapsed();
                            let r = self.save_state().map(Box::new).map_err(|e| error_chain(&e));
                            let generation = self.home.generation();
                            if let Some(m) = &mut self.migration {
                                m.state_generation = generation;
                                m.state_taken = true;
                                tracing::info!(
                                    "migration {}: vCPUs paused in {:.3} ms; state saved in {:.3} ms",
                                    m.id,
                                    paused.as_secs_f64() * 1e3,
                                    (t.elapsed() - paused).as_secs_f64() * 1e3
                                );
                            }
                            r
                        }
                        Err(e) => Err(format!("pause the vCPUs: {}", error_chain(&e))),
                    };
                    let _ = tx.send(r);
                }
                Call::Commit(tx) => {
                    let Some(m) = &mut self.migration else { continue };
                    if m.cancel.load(Ordering::SeqCst) {
                        let _ = tx.send(CommitAnswer::Cancelled);
                        continue;
                    }
                    m.committed = true;
                    // From here on this VMM never runs the guest again (unless it takes the
                    // lock back because the destination never took the VM over). Disks
                    // first: the destination takes the VM's lock, then theirs.
                    self.devices.virtio.unlock_disks();
                    self.home.release();
                    tracing::info!(
                        "migration {}: committed; lock on {} released",
                        m.id,
                        self.home.dir().display()
                    );
                    let _ = tx.send(CommitAnswer::Committed);
                }
                Call::Reclaim(tx) => {
                    let state = self.migration.as_ref().and_then(|m| m.state_generation);
                    let r = self.reclaim(state);
                    if let Some(m) = &mut self.migration {
                        m.committed = false;
                    }
                    let _ = tx.send(r);
                }
                Call::Resume(tx) => {
                    // The guest resumes at full speed: auto-converge ends with the migration.
                    self.throttle.set(0);
                    let r = if let Some(why) = &self.fenced {
                        Err(format!("this VMM fenced the VM ({why}); it resumes only with its lease back"))
                    } else if self.state == VmRunState::Paused {
                        self.resume_vcpus().map_err(|e| error_chain(&e))
                    } else {
                        Ok(())
                    };
                    let _ = tx.send(r);
                }
                Call::Finished(report) => {
                    self.throttle.set(0);
                    let Some(m) = self.migration.take() else { continue };
                    let mut last = m.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    last.phase = report.status;
                    last.reason = report.reason.clone();
                    last.pages_left = 0;
                    last.report = Some(report.clone());
                    self.last_migration = Some(last);
                    let location = report.vm_running_on;
                    let reason = report.reason.clone();
                    // The home first: a daemon restarted meanwhile learns the outcome there.
                    let file = format!("{}.json", m.id);
                    if let Some(Err(e)) = write_record_bounded(self.home.dir(), &file, &*report, RECORD_WAIT)
                    {
                        tracing::warn!("migration {}: cannot write its report into the home: {e}", m.id);
                    }
                    self.events.push(
                        &m.id,
                        Side::Source,
                        EventBody::Phase { phase: report.status, reason: Some(reason.clone()) },
                    );
                    self.events.push(&m.id, Side::Source, EventBody::Report { report });
                    match location {
                        VmLocation::Destination | VmLocation::Nowhere => {
                            for (_, reply) in m.deferred {
                                let _ = reply.send(Err(ApiError::conflict(format!(
                                    "migration {} ended with the VM no longer here: {reason}",
                                    m.id
                                ))));
                            }
                            return if location == VmLocation::Destination {
                                Next::Migrated
                            } else {
                                Next::Lost(reason)
                            };
                        }
                        VmLocation::Source => {
                            // The rollback resumed the VM; now what was asked meanwhile.
                            for (request, reply) in m.deferred {
                                self.handle_deferred(request, reply);
                            }
                        }
                    }
                }
            }
        }
        Next::Continue
    }

    /// After a commit whose activation was not confirmed: takes the VM's lock and its
    /// disks' back if nobody ran the VM past `state` (the generation of the state sent).
    fn reclaim(&mut self, state: Option<u64>) -> Reclaimed {
        let last_holder = match self.home.acquire(None) {
            Err(e) => return Reclaimed::Held(error_chain(&e)),
            Ok(previous) => previous,
        };
        let current = self.home.generation();
        if current != state {
            // The destination raised the generation: it ran the VM. Never resume this copy.
            self.home.release();
            return Reclaimed::RanOn { current, state, last_holder };
        }
        match self.devices.virtio.lock_disks() {
            Ok(()) => Reclaimed::Ours,
            Err(e) => Reclaimed::DiskHeld(error_chain(&e)),
        }
    }

    /// A pause or resume that arrives while a migration is in progress. Before the state is
    /// taken it is refused (cancel the migration first); once the state has been taken (the
    /// stop-and-copy or later, before the commit) it cancels the migration, and is carried
    /// out once the VM has rolled back, so that nothing resumes the VM behind the
    /// migration's back; after the commit it is refused.
    pub(crate) fn defer_until_rolled_back(
        &mut self,
        request: ferry_api::Request,
        reply: Sender<Result<Response, ApiError>>,
    ) {
        let Some(m) = &mut self.migration else {
            return self.handle_deferred(request, reply);
        };
        if m.committed {
            let _ = reply.send(Err(ApiError::conflict(format!(
                "migration {} has committed: the VM is moving to the destination",
                m.id
            ))));
            return;
        }
        if !m.state_taken {
            let _ = reply.send(Err(ApiError::conflict(format!(
                "migration {} is in progress; cancel it first (ferry migrate-cancel)",
                m.id
            ))));
            return;
        }
        tracing::info!(
            "migration {}: a {} request cancels the migration; carried out once the VM has rolled back",
            m.id,
            match request {
                ferry_api::Request::Pause => "pause",
                _ => "resume",
            }
        );
        if let Err(e) = self.cancel_migration() {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(m) = &mut self.migration {
            m.deferred.push((request, reply));
        }
    }

    /// Carries out a pause or resume deferred by [`Vmm::defer_until_rolled_back`].
    fn handle_deferred(&mut self, request: ferry_api::Request, reply: Sender<Result<Response, ApiError>>) {
        let answer = match request {
            ferry_api::Request::Pause if self.state == VmRunState::Paused => Ok(Response::Done),
            ferry_api::Request::Pause => match self.pause_vcpus() {
                Ok(()) => {
                    tracing::info!("VM paused");
                    Ok(Response::Done)
                }
                Err(e) => Err(ApiError::internal(format!("cannot pause the VM: {e}"))),
            },
            _ if self.state == VmRunState::Running => Ok(Response::Done),
            _ => match self.resume_vcpus() {
                Ok(()) => Ok(Response::Done),
                Err(e) => Err(ApiError::internal(format!(
                    "cannot resume the VM; it stays paused: {}",
                    error_chain(&e)
                ))),
            },
        };
        let _ = reply.send(answer);
    }

    /// Ends an outgoing migration because the VM itself is ending (power-off, signal).
    pub(crate) fn abandon_migration(&mut self) {
        if let Some(m) = self.migration.take() {
            m.cancel.store(true, Ordering::SeqCst);
            if !m.committed {
                m.sockets.shut_down();
            }
            let reason = "the VM stopped on the source before the migration ended".to_string();
            tracing::warn!("migration {}: {reason}", m.id);
            let phase = if m.committed { MigrationPhase::Lost } else { MigrationPhase::Failed };
            self.events.push(&m.id, Side::Source, EventBody::Phase { phase, reason: Some(reason) });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn socket_buffer_choice() {
        assert_eq!(parse_socket_buffer(None), Some(SOCKET_BUFFER));
        assert_eq!(parse_socket_buffer(Some("auto")), None);
        assert_eq!(parse_socket_buffer(Some("max")), Some(SOCKET_BUFFER));
        assert_eq!(parse_socket_buffer(Some(" 4 ")), Some(4 << 20));
        for bad in ["0", "65", "-1", "8M", "lots"] {
            assert_eq!(parse_socket_buffer(Some(bad)), Some(SOCKET_BUFFER), "{bad}");
        }
    }

    /// A Config from a source without the stall bound (older Ferry), as JSON.
    fn older_config(memory: u64, verify: bool) -> serde_json::Value {
        serde_json::json!({
            "description": { "memory": memory, "vcpus": 1, "kernel": "k", "cmdline": "" },
            "memory_regions": [],
            "cpuid": [],
            "msrs": [],
            "devices": [],
            "home": "/tmp/h",
            "home_is_default": false,
            "verify": verify,
        })
    }

    #[test]
    fn records_are_written_whole_and_leave_no_temporary_file() {
        let home = std::env::temp_dir().join(format!("ferry-record-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        let path = write_record(&home, "m-1.json", &serde_json::json!({"n": 1})).expect("write");
        let path2 = write_record(&home, "m-1.json", &serde_json::json!({"n": 2})).expect("replace");
        assert_eq!(path, path2);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        assert_eq!(v["n"], 2);
        let names: Vec<String> = std::fs::read_dir(home.join(REPORTS_DIR))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["m-1.json".to_string()]);
        std::fs::remove_dir_all(&home).expect("cleanup");
    }

    #[test]
    fn every_failure_has_a_code_from_its_type_and_the_peer_code_not_its_text() {
        use ferry_migration::handshake;
        use ferry_migration::protocol::Error as Wire;
        let io = || std::io::Error::other("x");
        let cases: Vec<(Error, ReasonCode)> = vec![
            (Error::Cancelled, ReasonCode::Cancelled),
            (Error::Auth("authentication".into()), ReasonCode::AuthFailed),
            (Error::Handshake(handshake::Error::BadProof), ReasonCode::AuthFailed),
            (Error::Handshake(handshake::Error::Version(1, 2)), ReasonCode::VersionMismatch),
            (Error::Version(1, 2), ReasonCode::VersionMismatch),
            (Error::Connect { addr: "a".into(), source: io() }, ReasonCode::Unreachable),
            (Error::Protocol(Wire::Io(io())), ReasonCode::ConnectionLost),
            (Error::Protocol(Wire::BadMagic), ReasonCode::ProtocolError),
            // A peer's Abort carries its code; its text decides nothing.
            (
                Error::Protocol(Wire::PeerAborted {
                    reason: "authentication".into(),
                    code: ReasonCode::Busy,
                }),
                ReasonCode::Busy,
            ),
            (
                Error::Protocol(Wire::PeerAborted { reason: "memory".into(), code: ReasonCode::Unknown }),
                ReasonCode::Unknown,
            ),
            (
                Error::Refused {
                    reason: "authentication failed".into(),
                    code: ReasonCode::RefusedByDestination(Check::CpuFeatures),
                },
                ReasonCode::RefusedByDestination(Check::CpuFeatures),
            ),
            (
                Error::Check(Check::LockIdentity, "x".into()),
                ReasonCode::RefusedByDestination(Check::LockIdentity),
            ),
            (Error::Stalled(link::Stalled::new("x", std::time::Duration::from_secs(1))), ReasonCode::Stalled),
            (Error::GaveUp(ReasonCode::Timeout, "x".into()), ReasonCode::Timeout),
            (Error::GaveUp(ReasonCode::NoConvergence, "x".into()), ReasonCode::NoConvergence),
            (Error::Vmm("x".into()), ReasonCode::VmmError),
            (Error::Lock("x".into()), ReasonCode::LockConflict),
            (
                Error::RestoreFailed {
                    reason: "memory verification failed".into(),
                    code: ReasonCode::RestoreFailed,
                },
                ReasonCode::RestoreFailed,
            ),
            (Error::Verify("x".into()), ReasonCode::VerifyMismatch),
            (Error::Stale { state: 1, current: Some(2) }, ReasonCode::StaleState),
            (Error::Interrupted(15), ReasonCode::Interrupted),
            (Error::Streams("x".into()), ReasonCode::ConnectionLost),
            (Error::Busy("m-1".into()), ReasonCode::Busy),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e:?}");
        }
    }

    #[test]
    fn faults_parse_from_a_list() {
        let (f, unknown) = Faults::parse(" restore-fail, hide-cpu-feature=sse2,,bogus ");
        assert!(f.restore_fail);
        assert_eq!(f.hide_cpu_features, vec!["sse2".to_string()]);
        assert_eq!(unknown, vec!["bogus".to_string()]);
        assert_eq!(Faults::parse(""), (Faults::default(), vec![]));
    }

    #[test]
    fn an_older_source_means_the_default_stall_bound() {
        let c: MigrationConfig = serde_json::from_value(older_config(1 << 30, false)).expect("parse");
        assert_eq!(c.stall_timeout_ms, 10_000);
        assert_eq!(c.stall_timeout(), Duration::from_secs(10));
        assert_eq!(c.restore_wait(), Duration::from_secs(10));
    }

    #[test]
    fn the_stall_bound_from_the_wire_is_held_to_its_range_and_verify_adds_a_second_per_gib() {
        let mut v = older_config(5 << 30, true);
        v["stall_timeout_ms"] = 0.into();
        let c: MigrationConfig = serde_json::from_value(v.clone()).expect("parse");
        assert_eq!(c.stall_timeout(), Duration::from_secs(1));
        v["stall_timeout_ms"] = u64::MAX.into();
        let c: MigrationConfig = serde_json::from_value(v.clone()).expect("parse");
        assert_eq!(c.stall_timeout(), Duration::from_secs(600));
        v["stall_timeout_ms"] = 2500.into();
        let c: MigrationConfig = serde_json::from_value(v).expect("parse");
        assert_eq!(c.restore_wait(), Duration::from_millis(2500 + 5000));
    }

    #[test]
    fn a_capped_migration_gets_receive_buffers_a_fraction_of_the_bound_long() {
        let mut v = older_config(1 << 30, false);
        let c: MigrationConfig = serde_json::from_value(v.clone()).expect("parse");
        assert_eq!(c.bandwidth_cap, 0);
        assert_eq!(c.receive_buffer(), None);
        v["stall_timeout_ms"] = 2000.into();
        v["bandwidth_cap"] = (4u64 << 20).into();
        let c: MigrationConfig = serde_json::from_value(v.clone()).expect("parse");
        assert_eq!(c.receive_buffer(), Some(1 << 20));
        v["bandwidth_cap"] = (1u64 << 20).into();
        let c: MigrationConfig = serde_json::from_value(v.clone()).expect("parse");
        assert_eq!(c.receive_buffer(), Some(256 << 10));
        v["bandwidth_cap"] = u64::MAX.into();
        let c: MigrationConfig = serde_json::from_value(v).expect("parse");
        assert_eq!(c.receive_buffer(), Some(8 << 20));
    }
}
