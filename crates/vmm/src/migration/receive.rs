//! The destination side of a live migration: `ferry receive`.
//!
//! ```text
//! Listening ──accept──> Handshake ──> Checks ──> Reserved ──> Receiving ──> Restored
//!     ^                     │            │           │            │            │
//!     └─────────────────────┴────────────┴───────────┴────────────┴── failure: drop
//!                                                                     everything, listen
//! Restored ──Commit──> take the VM's lock ──> Activated (vCPUs run, `Activated` sent)
//! Restored ──connection lost──> take the lock if free (the source committed or died)
//!                                or give up (the source still holds it and resumes)
//! ```
//!
//! Nothing runs before the lock is held: [`Vmm::run`] refuses to start vCPUs without it.
//! Connections are accepted and authenticated by `super::accept`, concurrently and each
//! within one deadline; a migration starts here with an authenticated first stream.
//! A failed incoming migration (bad key, malformed message, a check that fails, the source
//! rolling back) is logged and the receiver waits for the next one; SIGTERM or SIGINT end
//! it, aborting a migration in progress before its commit.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::events::Events;
use ferry_api::{EventBody, MigrationPhase, Side};

use ferry_arch::layout;
use ferry_migration::auth::Key;
use ferry_migration::outcome::{Check, ReasonCode};
use ferry_migration::protocol::{
    self as wire, parse_json, to_json, write_frame, Accept, Commit, Kind, PageEntries, PassEnd, RestoreResult,
};
use kvm_bindings::kvm_cpuid_entry2;

use super::accept::{Acceptor, Authenticated, Desk};
use super::managed;
use super::place::Placer;
use super::populate::{self, Ahead};
use super::{
    error_chain, memory_crcs, parse_address, verify_chunk, Activation, Error, Faults, MigrationConfig,
    DEVICES,
};
use crate::home::VmHome;
use crate::memory::{self, GuestMemory};
use crate::persist::{check_consistent, Parts, RegionState, VmSnapshot};
use crate::stop::{RawStop, StopSource};
use crate::{open_host, vm, Host, SerialConfig, Vmm};

/// How long any single read or write may block before the migration is given up, until
/// the source's Config names its stall bound (`MigrationConfig::stall_timeout`), which
/// bounds every later wait: a read that gets nothing, the wait for Commit after RESTORE_OK
/// (so a lost answer is found within the bound), and the wait for Verify (the bound plus
/// 1 s per GiB, as the source's wait for RestoreResult: the source hashes meanwhile).
/// The default stall bound: a source that authenticated and then says nothing is given
/// up as soon as a source that names no bound would give up on us.
const IO_TIMEOUT: Duration = Duration::from_secs(ferry_api::DEFAULT_STALL_TIMEOUT_S);
/// How long to wait for the source to release the VM's lock after its commit.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long the source's extra streams have to connect and prove the key after `Accept`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to try for the lock when the connection broke after RESTORE_OK.
const LOST_LOCK_WAIT: Duration = Duration::from_secs(2);

/// What `ferry receive` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// Where to listen. [`Listen::Api`] waits for `PUT /vm/receive` (needs `api_socket`).
    pub listen: Listen,
    /// The shared key (ignored with [`Listen::Api`]: the request brings it).
    pub auth_key: AuthKey,
    /// The serial console of the VM once it runs here.
    pub serial: SerialConfig,
    /// Serve the VM's API here once it runs.
    pub api_socket: Option<PathBuf>,
    /// The VM's home; `None` means the one the source names (shared storage).
    pub home: Option<PathBuf>,
    /// `CLOCK_MONOTONIC` ns at process start.
    pub started_ns: u64,
    /// Taps to use instead of the source's: `(name on the source, name here)`. A NIC whose
    /// tap is not listed uses a tap of the same name here.
    pub tap_map: Vec<(String, String)>,
    /// Give up if no migration has started this long after listening began, or after the
    /// last failed one ([`Error::Deadline`]); `None` waits for ever.
    pub deadline: Option<Duration>,
    /// Faults to inject (tests only; the `ferry` binary reads them from
    /// `FERRY_FAULT_INJECT`).
    pub faults: Faults,
    /// The VM's lease on shared storage: joined before listening, taken at the switchover
    /// where the lock is (`None`: `vm.lock` alone arbitrates).
    pub lease: Option<crate::lease::LeaseConfig>,
    /// CPU features treated as absent from this host (`--cpu-hide`): a VM whose CPUID has
    /// one is refused (`cpu_features`) as on a host without it.
    pub cpu_hide: Vec<String>,
}

/// Where a receiving VMM listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Bind `tcp:HOST:PORT`.
    Address(String),
    /// An inherited listening TCP socket (checked before use).
    Fd(RawFd),
    /// Started empty: `PUT /vm/receive` on the API socket says where, and the key.
    Api,
}

/// Where the key shared with the source comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthKey {
    /// A file.
    File(PathBuf),
    /// A descriptor (a pipe) read to its end, then closed.
    Fd(RawFd),
    /// `PUT /vm/receive` brings it.
    Api,
}

/// Why one incoming migration failed, with its id when known.
struct Failed {
    id: Option<String>,
    error: Error,
}

impl Vmm {
    /// Waits for an incoming migration and returns the VM it brought, holding its lock,
    /// ready to [`Vmm::run`]. Failed attempts are logged and the wait goes on; `stop`
    /// ends the wait (and aborts a migration before its commit), then stops the VM.
    pub fn receive(config: ReceiveConfig, stop: StopSource) -> Result<Vmm, crate::Error> {
        let mig = |e: Error| crate::Error::Migration(Box::new(e));
        let setup =
            |e: managed::Error| mig(Error::Vmm(format!("set up the receiving side: {}", error_chain(&e))));
        // Fail early on a host that cannot run VMs at all.
        drop(open_host(&config.cpu_hide)?);
        // Join the datastore's lockspace now: it takes 2 * io_timeout, which must not
        // fall in a migration's switchover.
        if let Some(lease) = &config.lease {
            lease.join().map_err(|e| {
                mig(Error::Vmm(format!("join the lease lockspace {}: {}", lease.lockspace, error_chain(&e))))
            })?;
        }
        let given = match &config.listen {
            Listen::Address(a) => {
                parse_address(a).map_err(mig)?;
                Some(managed::bind(a).map_err(setup)?)
            }
            Listen::Fd(fd) => Some(managed::listener_from_fd(*fd).map_err(setup)?),
            Listen::Api if config.api_socket.is_none() => {
                return Err(mig(Error::Vmm(
                    "receive without a listen address: that needs an API socket to be told one".into(),
                )))
            }
            Listen::Api => None,
        };
        let given = match given {
            None => None,
            Some(l) => {
                let key = match &config.auth_key {
                    AuthKey::File(f) => Key::load(f).map_err(|e| mig(e.into()))?,
                    AuthKey::Fd(fd) => managed::key_from_fd(*fd).map_err(setup)?,
                    AuthKey::Api => return Err(mig(Error::Vmm("receive without a key".into()))),
                };
                Some((l, key))
            }
        };
        let status = Arc::new(
            managed::Status::new(given.as_ref().map(|(l, _)| managed::local_name(l)))
                .map_err(|e| mig(Error::Vmm(format!("create an eventfd: {e}"))))?,
        );
        // Every incoming migration's phases and passes, handed to the VM that arrives so
        // that its `GET /vm/events` shows them.
        let events = Arc::new(Events::new());
        // The API serves from now on; the VM that arrives takes the same server over.
        let server = match &config.api_socket {
            Some(path) => {
                let handler = managed::Receiving { status: status.clone(), events: events.clone() };
                let delegate = Arc::new(ferry_api::server::Delegate::new(Arc::new(handler)));
                let handle = ferry_api::server::spawn(path, delegate.clone())?;
                tracing::info!(socket = %path.display(), "API listening (receiving)");
                Some((handle, delegate))
            }
            None => None,
        };
        let (listener, key) = match given {
            Some(g) => g,
            None => {
                tracing::info!("waiting for PUT /vm/receive on the API socket");
                wait_configured(&status, &stop, config.deadline)?
            }
        };
        let local = managed::local_name(&listener);
        tracing::info!("waiting for an incoming migration on {local}");
        let faults = config.faults.clone();
        let desk = Arc::new(Desk::new().map_err(|e| crate::Error::Migration(Box::new(e)))?);
        // Closing the desk drops whatever waits there; the acceptor, dropped on return, stops
        // accepting and drops the connections still being authenticated.
        let _acceptor =
            Acceptor::start(listener, key, desk.clone()).map_err(|e| crate::Error::Migration(Box::new(e)))?;
        let mut server = server;
        let end = |e: Error| {
            desk.close();
            crate::Error::Migration(Box::new(e))
        };
        loop {
            let deadline = config.deadline.map(|d| Instant::now() + d);
            let conn = match next_migration(&desk, stop.raw(), deadline) {
                Ok(c) => c,
                Err(NoMigration::Signal(sig)) => {
                    tracing::info!("signal {sig} received: no longer waiting for a migration");
                    return Err(end(Error::Interrupted(sig)));
                }
                Err(NoMigration::Deadline) => {
                    let secs = config.deadline.unwrap_or_default().as_secs();
                    tracing::error!("no migration started within {secs} s (--deadline-s): giving up");
                    return Err(end(Error::Deadline(secs)));
                }
            };
            let peer = conn.peer;
            tracing::info!("migration {}: incoming from {peer}", conn.hello.migration_id);
            let started = Instant::now();
            match incoming(conn, &desk, &config, &faults, &stop, &events, &status) {
                Ok(mut vmm) => {
                    desk.close();
                    vmm.events = events.clone();
                    vmm.api_server = server.take();
                    tracing::info!(
                        "migration {}: received in {:.1} ms",
                        vmm.activation.as_ref().map(|a| a.id.as_str()).unwrap_or("?"),
                        started.elapsed().as_secs_f64() * 1e3
                    );
                    return Ok(vmm);
                }
                Err(Failed { id, error }) => {
                    let cancelled = status.end();
                    let id = id.unwrap_or_else(|| format!("from {peer}"));
                    let (msg, code) = (error_chain(&error), error.code());
                    events.push(
                        &id,
                        Side::Destination,
                        EventBody::Phase { phase: MigrationPhase::Failed, reason: Some(msg.clone()) },
                    );
                    if let Error::Interrupted(_) = error {
                        tracing::info!("migration {id}: {msg}");
                        return Err(end(error));
                    }
                    // Everything of that migration is gone: the next one may come.
                    desk.idle();
                    if cancelled {
                        tracing::info!(
                            "migration {id}: cancelled through the API; nothing runs here; waiting for another migration"
                        );
                        continue;
                    }
                    tracing::warn!(
                        "migration {id}: failed: {msg}; nothing runs here; waiting for another migration \
                         (code {code})"
                    );
                }
            }
        }
    }
}

/// Waits for `PUT /vm/receive` (see [`managed`]), a stop signal, or `deadline`.
fn wait_configured(
    status: &managed::Status,
    stop: &StopSource,
    deadline: Option<Duration>,
) -> Result<(TcpListener, Key), crate::Error> {
    let deadline_at = deadline.map(|d| Instant::now() + d);
    loop {
        if let Some(c) = status.take_configured() {
            return Ok(c);
        }
        let left = match deadline_at {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => {
                    let secs = deadline.unwrap_or_default().as_secs();
                    tracing::error!("not told where to receive within {secs} s (--deadline-s): giving up");
                    return Err(crate::Error::Migration(Box::new(Error::Deadline(secs))));
                }
            },
            None => None,
        };
        if let Wait::Signal(sig) = wait_readable(status.wake.as_raw_fd(), Some(stop.raw()), left) {
            tracing::info!("signal {sig} received: no longer waiting to be told where to receive");
            return Err(crate::Error::Migration(Box::new(Error::Interrupted(sig))));
        }
    }
}

/// Why no migration came.
enum NoMigration {
    Signal(i32),
    Deadline,
}

/// Waits for the authenticated first stream of a migration, a stop signal, or `deadline`.
fn next_migration(
    desk: &Desk,
    stop: RawStop,
    deadline: Option<Instant>,
) -> Result<Authenticated, NoMigration> {
    loop {
        if let Some(conn) = desk.take_first() {
            return Ok(conn);
        }
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(NoMigration::Deadline),
            },
            None => None,
        };
        if let Wait::Signal(sig) = wait_readable(desk.ready_fd(), Some(stop), left) {
            return Err(NoMigration::Signal(sig));
        }
    }
}

enum Wait {
    Ready,
    Signal(i32),
    Timeout,
    /// The connection being watched was closed by its peer.
    HangUp,
}

/// Waits until `fd` is readable or a stop signal arrives on `signals`.
fn wait_readable(fd: RawFd, stop: Option<RawStop>, timeout: Option<Duration>) -> Wait {
    wait_readable_watching(fd, stop, timeout, None)
}

/// [`wait_readable`], and also returns [`Wait::HangUp`] when the peer of `watch` closes it.
fn wait_readable_watching(
    fd: RawFd,
    stop: Option<RawStop>,
    timeout: Option<Duration>,
    watch: Option<RawFd>,
) -> Wait {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut fds = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.map_or(-1, |s| s.fd()), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: watch.unwrap_or(-1), events: libc::POLLRDHUP, revents: 0 },
        ];
        let ms = match deadline {
            None => -1,
            Some(d) => d.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32,
        };
        // SAFETY: `fds` is a valid array of three pollfd for the duration of the call (a
        // negative fd is ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Wait::Ready; // let the read report the error
        }
        if fds[1].revents != 0 {
            if let Some(sig) = stop.and_then(|s| s.read()) {
                return Wait::Signal(sig);
            }
        }
        if fds[2].revents != 0 {
            return Wait::HangUp;
        }
        if fds[0].revents != 0 {
            return Wait::Ready;
        }
        if n == 0 {
            return Wait::Timeout;
        }
    }
}

/// One incoming migration, from its authenticated first stream to a restored VM holding
/// its lock.
fn incoming(
    conn: Authenticated,
    desk: &Desk,
    config: &ReceiveConfig,
    faults: &Faults,
    stop: &StopSource,
    events: &Arc<Events>,
    status: &Arc<managed::Status>,
) -> Result<Vmm, Failed> {
    let id = Some(conn.hello.migration_id.clone());
    status.begin(&conn.hello.migration_id, Some(&conn.stream));
    let mut rx = Receiver {
        status: status.clone(),
        id: id.clone(),
        stream: None,
        signals: stop.raw(),
        payload: Vec::new(),
        events: events.clone(),
        phase: Phase::Listening,
    };
    rx.event(EventBody::Phase { phase: MigrationPhase::Setup, reason: None });
    // The acceptor has authenticated the first stream (see `super::accept`).
    rx.enter(Phase::Handshake);
    let io = |e| Failed { id: id.clone(), error: Error::Protocol(wire::Error::Io(e)) };
    let stream = conn.stream;
    super::size_socket_buffer(&stream, libc::SO_RCVBUFFORCE);
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    rx.stream = Some(stream);
    match rx.run(desk, config, faults) {
        Ok(vmm) => {
            rx.enter(Phase::Running);
            Ok(vmm)
        }
        Err(error) => {
            rx.enter(Phase::Failed);
            // A cancel through the API shut the streams' reading side: say so to the source.
            let error = if status.is_cancelled() { Error::Cancelled } else { error };
            // Tell the source why, unless the connection is what failed or it aborted.
            if !matches!(error, Error::Protocol(wire::Error::Io(_) | wire::Error::PeerAborted { .. })) {
                rx.abort(&error);
            }
            Err(Failed { id: rx.id.clone(), error })
        }
    }
}

/// The destination's lifecycle for one incoming migration (`docs/migration.md`,
/// "Destination state machine"). Transitions are checked as the source's are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a connection (the acceptor runs the handshakes).
    Listening,
    /// The first stream proved the key.
    Handshake,
    /// The Config arrived: checking this host can run the VM.
    Checks,
    /// Checks passed: memory and the KVM VM exist; Accept is sent.
    Reserved,
    /// Pages (and then the state) are arriving.
    Receiving,
    /// Devices and vCPUs restored; RESTORE_OK is sent, the vCPUs wait.
    Restored,
    /// Waiting for Commit, then taking the VM's lock and its disks'.
    Activating,
    /// The VM is this VMM's: its vCPUs start.
    Running,
    /// Everything of this migration is dropped; the receiver listens again.
    Failed,
}

impl Phase {
    fn may_enter(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Listening, Handshake)
                | (Handshake, Checks)
                | (Checks, Reserved)
                | (Reserved, Receiving)
                | (Receiving, Restored)
                | (Restored, Activating)
                | (Activating, Running)
                | (Listening | Handshake | Checks | Reserved | Receiving | Restored | Activating, Failed)
        )
    }
}

struct Receiver {
    /// What the API shows while the migration goes on.
    status: Arc<managed::Status>,
    id: Option<String>,
    stream: Option<TcpStream>,
    signals: RawStop,
    payload: Vec<u8>,
    /// This side's phases and passes, for `GET /vm/events` once the VM runs here.
    events: Arc<Events>,
    phase: Phase,
}

impl Receiver {
    fn id(&self) -> &str {
        self.id.as_deref().unwrap_or("?")
    }

    fn event(&self, body: EventBody) {
        self.events.push(self.id(), Side::Destination, body);
    }

    /// Moves to `next`, checking the transition is one the state machine has.
    fn enter(&mut self, next: Phase) {
        let ok = self.phase.may_enter(next);
        debug_assert!(ok, "receiver state {:?} -> {next:?}", self.phase);
        if ok {
            tracing::debug!("migration {}: {:?} -> {next:?}", self.id(), self.phase);
        } else {
            tracing::error!("migration {}: invalid state change {:?} -> {next:?}", self.id(), self.phase);
        }
        self.phase = next;
        use ferry_api::ReceivePhase as P;
        let shown = match next {
            Phase::Listening | Phase::Running | Phase::Failed => None,
            Phase::Handshake => Some(P::Authenticating),
            Phase::Checks | Phase::Reserved => Some(P::Checking),
            Phase::Receiving => Some(P::ReceivingMemory),
            Phase::Restored => Some(P::Restoring),
            Phase::Activating => Some(P::Activating),
        };
        if let Some(p) = shown {
            self.status.enter(p);
        }
    }

    fn stream(&mut self) -> Result<&mut TcpStream, Error> {
        self.stream.as_mut().ok_or(Error::Protocol(wire::Error::Io(std::io::ErrorKind::NotConnected.into())))
    }

    fn send<T: serde::Serialize>(&mut self, kind: Kind, msg: &T) -> Result<(), Error> {
        write_frame(self.stream()?, kind, &to_json(msg))?;
        Ok(())
    }

    /// Tells the source why this side gives up: the sentence and the code.
    fn abort(&mut self, e: &Error) {
        let abort = to_json(&wire::Abort::new(error_chain(e), e.code()));
        if let Ok(s) = self.stream() {
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_frame(s, Kind::Abort, &abort);
        }
    }

    /// Reads the next frame into `self.payload`, giving up on a stop signal.
    fn next(&mut self) -> Result<Kind, Error> {
        let h = self.next_header()?;
        self.read_payload(h)
    }

    /// Reads the next frame's header, giving up on a stop signal.
    fn next_header(&mut self) -> Result<wire::Header, Error> {
        // Between frames, and before blocking for one, look for a stop signal.
        if let Some(sig) = self.signals.read() {
            return Err(Error::Interrupted(sig));
        }
        Ok(wire::read_header(self.stream()?)?)
    }

    /// Reads the payload of the frame whose header is `h` into `self.payload`.
    fn read_payload(&mut self, h: wire::Header) -> Result<Kind, Error> {
        let mut payload = std::mem::take(&mut self.payload);
        let r = h.read_payload(self.stream()?, &mut payload);
        self.payload = payload;
        r?;
        Ok(h.kind)
    }

    fn expect<T: for<'de> serde::Deserialize<'de>>(
        &mut self,
        want: Kind,
        name: &'static str,
    ) -> Result<T, Error> {
        let got = self.next()?;
        Ok(parse_json(got, &self.payload, want, name)?)
    }

    /// The migration whose first stream has been authenticated (see [`super::accept`]).
    fn run(&mut self, desk: &Desk, config: &ReceiveConfig, faults: &Faults) -> Result<Vmm, Error> {
        let id = self.id().to_string();

        // Pre-migration checks, then the reservation.
        let cfg: MigrationConfig = self.expect(Kind::Config, "Config")?;
        self.enter(Phase::Checks);
        let stall = cfg.stall_timeout();
        self.bound_waits(stall)?;
        super::size_receive_buffer(self.stream()?, &cfg);
        let mut host = open_host(&config.cpu_hide)?;
        for name in &faults.hide_cpu_features {
            if ferry_arch::cpuid::clear_feature(&mut host.supported, name) {
                tracing::warn!("migration {id}: fault injected: pretending this CPU lacks {name}");
            }
        }
        check_config(&cfg, &host).map_err(|(check, why)| Error::Check(check, why))?;
        // Both sides must lock the same VM, not only the same kind of VM.
        let home_dir = config.home.clone().unwrap_or_else(|| cfg.home.clone());
        check_lock(&cfg, &home_dir, config.home.is_some())
            .map_err(|why| Error::Check(Check::LockIdentity, why))?;
        // The disks and taps exist and can be opened here (the disks' locks come at the
        // switchover).
        let (opened, backends) = crate::virtio::open_backends(&cfg.virtio, false, &config.tap_map)
            .map_err(|e| Error::Check(Check::Disks, error_chain(&e)))?;
        // Small pages for the receive (huge ones advised once it is in): `memory::create_small`.
        let small = populate::small_pages_from_env();
        let mem = if small {
            memory::create_small(cfg.description.memory)
        } else {
            memory::create(cfg.description.memory)
        }
        .map_err(|e| Error::Check(Check::Memory, error_chain(&e)))?;
        let vm_fd = vm::create_vm(&host.kvm, &mem).map_err(|e| Error::Check(Check::Host, error_chain(&e)))?;
        self.enter(Phase::Reserved);
        self.status.describe(&cfg.description);
        // The source opens its extra streams as soon as it reads Accept: take them from now on.
        desk.start_joining(cfg.streams);
        self.send(Kind::Accept, &Accept { ferry_version: env!("CARGO_PKG_VERSION").into() })?;
        self.event(EventBody::Phase { phase: MigrationPhase::PreCopy, reason: None });
        tracing::info!(
            "migration {id}: checks passed; reserved {} MiB and {} vCPUs for {}",
            cfg.description.memory >> 20,
            cfg.description.vcpus,
            cfg.description.kernel
        );

        // Memory, pass after pass, then the state.
        let extra = self.join_streams(desk, &id, cfg.streams)?;
        for s in &extra {
            self.status.add_stream(s);
        }
        self.enter(Phase::Receiving);
        for s in &extra {
            super::size_receive_buffer(s, &cfg);
            s.set_read_timeout(Some(stall)).map_err(wire::Error::Io)?;
            s.set_write_timeout(Some(stall)).map_err(wire::Error::Io)?;
        }
        let snap = self.receive_memory(&mem, &extra)?;
        if small {
            memory::advise_huge(&mem);
        }
        // From here on this side holds the VM's whole state. If the connection breaks now the
        // source may have died, and this may be the only copy: the lock (free only if the
        // source let the VM go or died) and the generation decide, not the connection.
        let mut orphaned: Option<String> = None;
        let restore = |reason: String| Error::RestoreFailed { reason, code: ReasonCode::RestoreFailed };
        let snap_virtio: Vec<crate::virtio::Backend> =
            snap.virtio.iter().map(|v| v.backend.clone()).collect();
        if snap.description != cfg.description
            || snap.memory_regions != cfg.memory_regions
            || snap_virtio != cfg.virtio
        {
            return self.refuse_restore(restore("the state does not match the configuration checked".into()));
        }
        if let Err(e) = check_consistent(&snap, host.max_vcpus) {
            return self.refuse_restore(restore(error_chain(&e)));
        }
        if cfg.verify {
            // Hashed here while the source hashes its side: the two run at the same time.
            let mine = memory_crcs(&mem, verify_chunk(cfg.description.memory));
            self.bound_waits(cfg.restore_wait())?;
            let verify = self.expect::<wire::Verify>(Kind::Verify, "Verify");
            self.bound_waits(stall)?;
            match verify {
                Ok(v) => {
                    if let Err(why) = compare_memory(&mine, cfg.description.memory, &v) {
                        return self.refuse_restore(Error::Verify(why));
                    }
                    tracing::info!("migration {id}: memory verified ({} chunks agree)", v.crcs.len());
                }
                Err(Error::Protocol(wire::Error::Io(e))) => {
                    orphaned = Some(format!("the connection broke before the memory checksums came ({e})"));
                }
                Err(e) => return Err(e),
            }
        }
        if faults.restore_fail {
            return self.refuse_restore(restore("fault injected (FERRY_FAULT_INJECT=restore-fail)".into()));
        }
        let signals = self.dup_signals()?;
        let state_generation = snap.generation;
        let vmm = match Vmm::from_snapshot(Parts {
            host,
            memory: mem,
            vm: vm_fd,
            snap,
            serial: config.serial.clone(),
            api_socket: config.api_socket.clone(),
            home: crate::Claim::existing(leased_home(&home_dir, config.lease.clone())?),
            home_is_default: cfg.home_is_default,
            started_ns: config.started_ns,
            restored_from: None,
            signals,
            opened,
            backends,
            state_generation,
        }) {
            Ok(v) => v,
            Err(e) => return self.refuse_restore(restore(error_chain(&e))),
        };
        self.enter(Phase::Restored);
        // The last moment a cancel through the API can win: once RESTORE_OK is out the
        // source may commit, and then only the lock decides. From here a cancel is refused.
        if !self.status.enter(ferry_api::ReceivePhase::Activating) {
            return self.refuse_restore(Error::Cancelled);
        }
        if orphaned.is_none() {
            match self.send(
                Kind::RestoreResult,
                &RestoreResult { ok: true, reason: String::new(), code: ReasonCode::Unknown },
            ) {
                Ok(()) => {
                    tracing::info!("migration {id}: restored (RESTORE_OK); waiting for the source to commit")
                }
                Err(Error::Protocol(wire::Error::Io(e))) => {
                    orphaned = Some(format!("the connection broke before RESTORE_OK could be sent ({e})"));
                }
                Err(e) => return Err(e),
            }
        }
        self.activate(vmm, &home_dir, orphaned, stall)
    }

    /// Every later read or write on the first stream fails after `bound` without progress.
    fn bound_waits(&mut self, bound: Duration) -> Result<(), Error> {
        let s = self.stream()?;
        s.set_read_timeout(Some(bound)).map_err(wire::Error::Io)?;
        s.set_write_timeout(Some(bound)).map_err(wire::Error::Io)?;
        Ok(())
    }

    /// Takes the source's extra streams 1..`streams` from `desk`, where the acceptor leaves
    /// those that proved the key for this migration (from [`Desk::start_joining`], before
    /// Accept); a connection that does not (a stray client, a wrong key, another migration's
    /// id) never gets here. Waits up to [`JOIN_TIMEOUT`].
    fn join_streams(&mut self, desk: &Desk, id: &str, streams: u32) -> Result<Vec<TcpStream>, Error> {
        let mut joined: Vec<Option<TcpStream>> = (1..streams).map(|_| None).collect();
        let r = self.wait_for_streams(desk, id, &mut joined);
        desk.stop_joining();
        r?;
        if streams > 1 {
            tracing::info!("migration {id}: {streams} streams open");
        }
        Ok(joined.into_iter().flatten().collect())
    }

    fn wait_for_streams(
        &mut self,
        desk: &Desk,
        id: &str,
        joined: &mut [Option<TcpStream>],
    ) -> Result<(), Error> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        loop {
            for conn in desk.take_joined() {
                let (k, peer) = (conn.hello.stream, conn.peer);
                match joined.get_mut((k as usize).wrapping_sub(1)) {
                    Some(slot @ None) => {
                        let stream = conn.stream;
                        super::size_socket_buffer(&stream, libc::SO_RCVBUFFORCE);
                        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
                        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
                        tracing::debug!("migration {id}: stream {k} joined from {peer}");
                        *slot = Some(stream);
                    }
                    _ => tracing::warn!(
                        "migration {id}: stream {k} joined twice; dropped the second from {peer}"
                    ),
                }
            }
            if joined.iter().all(Option::is_some) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let n = joined.iter().filter(|s| s.is_some()).count();
                return Err(Error::Streams(format!(
                    "{n} of {} joined within {} s",
                    joined.len(),
                    JOIN_TIMEOUT.as_secs()
                )));
            }
            // The source gives up (closes the first stream) if a stream cannot join on its side.
            let control = self.stream()?.as_raw_fd();
            match wait_readable_watching(desk.ready_fd(), Some(self.signals), Some(left), Some(control)) {
                Wait::Signal(sig) => return Err(Error::Interrupted(sig)),
                Wait::HangUp => {
                    // Its reason, if it sent one, is the next frame.
                    let got = self.next()?;
                    parse_json::<Accept>(got, &self.payload, Kind::Accept, "nothing while streams join")?;
                    return Err(Error::Streams("the source closed the connection".into()));
                }
                Wait::Timeout | Wait::Ready => {}
            }
        }
    }

    /// Answers RESTORE_FAILED: the reason (for a failed restore without the sentence's
    /// frame, which the source adds; for a memory mismatch the whole sentence, which older
    /// sources need to begin with "memory verification failed") and its code.
    fn refuse_restore<T>(&mut self, e: Error) -> Result<T, Error> {
        let (reason, code) = match &e {
            Error::RestoreFailed { reason, code } => (reason.clone(), *code),
            other => (error_chain(other), other.code()),
        };
        let _ = self.send(Kind::RestoreResult, &RestoreResult { ok: false, reason, code });
        // Already told: no Abort on top.
        self.stream = None;
        Err(e)
    }

    fn dup_signals(&self) -> Result<StopSource, Error> {
        self.signals.dup().map_err(|e| Error::Vmm(format!("duplicate the stop descriptor: {e}")))
    }

    /// Receives page batches and pass ends until the state arrives: on the first stream
    /// here, on each extra stream in a thread of its own.
    fn receive_memory(&mut self, mem: &GuestMemory, extra: &[TcpStream]) -> Result<VmSnapshot, Error> {
        let progress = self.status.clone();
        let ahead = populate::window_from_env().map(|window| Ahead::new(mem, window));
        let placer = Placer::new(mem).with_progress(&progress).with_ahead(ahead.as_ref());
        let done = AtomicBool::new(false);
        let id = self.id().to_owned();
        // A stream that fails wakes the first stream's reader through this handle.
        let wake = self.stream()?.try_clone().map_err(wire::Error::Io)?;
        std::thread::scope(|s| {
            let threads: Vec<_> = extra
                .iter()
                .enumerate()
                .map(|(i, stream)| {
                    let (placer, done, id, wake) = (&placer, &done, id.as_str(), &wake);
                    std::thread::Builder::new()
                        .name("migration-stream".into())
                        .spawn_scoped(s, move || receive_stream(id, i as u32 + 1, stream, wake, placer, done))
                })
                .collect();
            if threads.iter().any(Result::is_err) {
                let _ = wake.shutdown(std::net::Shutdown::Read);
            }
            // Populates guest memory ahead of the first pass; scoped: joined below whatever
            // happens to the receive.
            let stop_helper = ahead.as_ref().map(Ahead::finish_on_drop);
            let helper = ahead.as_ref().map(|a| {
                std::thread::Builder::new().name("populate-ahead".into()).spawn_scoped(s, move || a.run())
            });
            let first = self.receive_first_stream(&placer, extra.len() + 1);
            drop(stop_helper);
            // The state is in (or this failed): the extra streams have nothing more to say.
            done.store(true, Ordering::SeqCst);
            for stream in extra {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            if let (Some(helper), Some(a)) = (helper, &ahead) {
                log_populated(&id, helper, a);
            }
            let mut failed = None;
            for t in threads {
                let r = match t {
                    Ok(t) => t.join().unwrap_or_else(|_| {
                        Err(Error::Vmm("receive pages (a stream thread panicked)".into()))
                    }),
                    Err(e) => Err(Error::Vmm(format!("start a stream thread: {e}"))),
                };
                if let Err(e) = r {
                    failed.get_or_insert(e);
                }
            }
            match (first, failed) {
                (Ok(snap), None) => Ok(snap),
                // A stream's own error is the cause when the first stream only saw the
                // connection go (the source's Abort, when it sent one, says more).
                (Ok(_), Some(e)) => Err(e),
                (Err(Error::Protocol(wire::Error::Io(_))), Some(se)) => Err(se),
                (Err(e), _) => Err(e),
            }
        })
    }

    /// The first stream's part of [`Receiver::receive_memory`]: pages, pass ends, the state.
    fn receive_first_stream(&mut self, placer: &Placer<'_>, streams: usize) -> Result<VmSnapshot, Error> {
        let mut entries = PageEntries::default();
        let mut pages_in_pass = 0u64;
        let mut pass_started = Instant::now();
        // A PassAck that cannot be written (the source died, or closed its side) does not end
        // the migration by itself: the source sends the last pass's PassEnd and the State
        // back to back, so the whole State may be in this socket's buffer already, and then
        // this side holds the VM's only copy. The next read decides.
        let mut ack_failed: Option<Error> = None;
        tracing::debug!("migration {}: receiving memory on {streams} stream(s)", self.id());
        loop {
            let h = match (self.next_header(), ack_failed.take()) {
                (Ok(h), _) => h,
                (Err(_), Some(ack)) => return Err(ack),
                (Err(e), None) => return Err(e),
            };
            if h.kind == Kind::Pages {
                pages_in_pass += receive_batch(h, self.stream()?, &mut entries, placer)?;
                continue;
            }
            if h.kind == Kind::DeltaPages {
                self.read_payload(h)?;
                pages_in_pass += placer.place_deltas(&self.payload)?;
                continue;
            }
            match self.read_payload(h)? {
                Kind::PassEnd => {
                    let end: PassEnd = parse_json(Kind::PassEnd, &self.payload, Kind::PassEnd, "PassEnd")?;
                    if end.pass == 1 {
                        placer.first_pass_done();
                    }
                    match acknowledge_pass(self.stream()?, &end, pages_in_pass) {
                        Ok(()) => {}
                        Err(e @ Error::Protocol(wire::Error::Io(_))) => {
                            tracing::warn!(
                                "migration {}: cannot acknowledge pass {}: {}; reading on for the State",
                                self.id(),
                                end.pass,
                                error_chain(&e)
                            );
                            ack_failed = Some(e);
                        }
                        Err(e) => return Err(e),
                    }
                    let ms = pass_started.elapsed().as_secs_f64() * 1e3;
                    self.event(EventBody::Pass {
                        pass: end.pass,
                        pages: end.pages,
                        bytes: 0,
                        ms,
                        dirtied: 0,
                        rate_mib_s: 0.0,
                        stop_and_copy: false,
                        expected_downtime_ms: None,
                        bytes_transferred: 0,
                        throttle_percent: 0,
                    });
                    tracing::info!(
                        "migration {}: pass {} received: {} pages in {:.1} ms{}",
                        self.id(),
                        end.pass,
                        end.pages,
                        pass_started.elapsed().as_secs_f64() * 1e3,
                        if streams > 1 { " on the first stream" } else { "" }
                    );
                    pages_in_pass = 0;
                    pass_started = Instant::now();
                }
                Kind::State => {
                    self.event(EventBody::Phase { phase: MigrationPhase::Restoring, reason: None });
                    return serde_json::from_slice(&self.payload)
                        .map_err(|source| Error::Protocol(wire::Error::Json { kind: Kind::State, source }));
                }
                other => {
                    // An Abort becomes PeerAborted; anything else is out of place.
                    parse_json::<PassEnd>(other, &self.payload, Kind::PassEnd, "Pages, PassEnd or State")?;
                    return Err(Error::Protocol(wire::Error::Unexpected {
                        got: other,
                        expected: "Pages, PassEnd or State",
                    }));
                }
            }
        }
    }

    /// After RESTORE_OK: the commit, the lock, then the VM is this VMM's. `orphaned` says
    /// why the connection is gone already (then only the lock and generation decide).
    /// Waits at most `stall` for the Commit.
    fn activate(
        &mut self,
        mut vmm: Vmm,
        home_dir: &std::path::Path,
        orphaned: Option<String>,
        stall: Duration,
    ) -> Result<Vmm, Error> {
        self.enter(Phase::Activating);
        let id = self.id().to_string();
        let note = id.clone();
        let commit_ns;
        if let Some(why) = orphaned {
            tracing::warn!("migration {id}: {why}; this side holds the VM's whole state");
            commit_ns = crate::monotonic_ns();
            self.take_over_if_free(&mut vmm, &note, &why)?;
            vmm.announce_at_switchover(&id);
            tracing::info!(
                "migration {id}: holding the VM's lock on {}; starting the vCPUs",
                home_dir.display()
            );
            vmm.activation = self.stream.take().map(|stream| Activation { stream, id, commit_ns });
            return Ok(vmm);
        }
        let stream_fd = self.stream()?.as_raw_fd();
        match wait_readable(stream_fd, Some(self.signals), Some(stall)) {
            Wait::Signal(sig) => return Err(Error::Interrupted(sig)),
            Wait::Timeout => {
                tracing::warn!(
                    "migration {id}: no commit from the source in {:.1} s (its stall bound)",
                    stall.as_secs_f64()
                );
                commit_ns = crate::monotonic_ns();
                self.take_over_if_free(&mut vmm, &note, "the source sent no commit")?;
            }
            Wait::Ready | Wait::HangUp => match self.next() {
                Ok(Kind::Commit) => {
                    commit_ns = crate::monotonic_ns();
                    let _: Commit = parse_json(Kind::Commit, &self.payload, Kind::Commit, "Commit")?;
                    vmm.home.acquire_within(Some(&note), LOCK_WAIT).map_err(|e| {
                        Error::Lock(format!("take the VM's lock after the commit: {}", error_chain(&e)))
                    })?;
                    Self::check_newest(&mut vmm)?;
                    Self::lock_disks(&mut vmm)?;
                }
                Ok(other) => {
                    parse_json::<Commit>(other, &self.payload, Kind::Commit, "Commit")?;
                    return Err(Error::Protocol(wire::Error::Unexpected { got: other, expected: "Commit" }));
                }
                Err(Error::Protocol(wire::Error::Io(e))) => {
                    commit_ns = crate::monotonic_ns();
                    let why = format!("the connection broke before the commit ({e})");
                    self.take_over_if_free(&mut vmm, &note, &why)?;
                }
                Err(e) => return Err(e),
            },
        }
        vmm.announce_at_switchover(&id);
        tracing::info!("migration {id}: holding the VM's lock on {}; starting the vCPUs", home_dir.display());
        self.event(EventBody::Phase { phase: MigrationPhase::Committed, reason: None });
        let stream = self.stream.take().ok_or(Error::Vmm("keep the connection".into()))?;
        vmm.activation = Some(Activation { stream, id, commit_ns });
        Ok(vmm)
    }

    /// With the VM's lock held: the state received must still be the VM's newest (nobody
    /// started or resumed the VM since it was taken). If it is not, the lock is released
    /// cleanly and this copy is dropped: it must never run.
    fn check_newest(vmm: &mut Vmm) -> Result<(), Error> {
        let (state, current) = (vmm.state_generation, vmm.home.generation());
        if let Some(state) = state {
            if current != Some(state) {
                vmm.home.release();
                return Err(Error::Stale { state, current });
            }
        }
        Ok(())
    }

    /// With the VM's lock held: the disks' locks. If one is held elsewhere the VM's lock is
    /// released again (cleanly, so the source sees it was never used) and this side fails:
    /// the source takes the VM back.
    fn lock_disks(vmm: &mut Vmm) -> Result<(), Error> {
        if let Err(e) = vmm.devices.virtio.lock_disks() {
            vmm.home.release();
            return Err(Error::Lock(format!("take the VM's disk locks: {}", error_chain(&e))));
        }
        Ok(())
    }

    /// Without a commit message, the lock decides: free means the source committed (or
    /// died) and will never resume; held means it still has the VM.
    fn take_over_if_free(&mut self, vmm: &mut Vmm, note: &str, why: &str) -> Result<(), Error> {
        match vmm.home.acquire_within(Some(note), LOST_LOCK_WAIT) {
            Ok(_) => {
                Self::check_newest(vmm)?;
                tracing::warn!(
                    "migration {}: {why}, but the VM's lock is free and the state here is the VM's newest: \
                     the source has let the VM go; taking it over",
                    self.id()
                );
                Self::lock_disks(vmm)
            }
            Err(e) => Err(Error::Lock(format!(
                "take the VM over: {why} and the source still holds the VM's lock ({})",
                error_chain(&e)
            ))),
        }
    }
}

/// Receives one extra stream's pages until the source closes it (or `done` is set and
/// the stream shut down). A failure is answered with an Abort on that stream, which is then
/// closed (so the source's writes fail at once), and ends the first stream's reading too
/// (so the whole migration stops and says why on the first stream).
fn receive_stream(
    id: &str,
    k: u32,
    stream: &TcpStream,
    first: &TcpStream,
    placer: &Placer<'_>,
    done: &AtomicBool,
) -> Result<(), Error> {
    let r = receive_stream_pages(k, stream, placer, done);
    match &r {
        Ok(()) => tracing::debug!("migration {id}: stream {k} closed"),
        Err(e) => {
            if !matches!(e, Error::Protocol(wire::Error::Io(_) | wire::Error::PeerAborted { .. })) {
                let abort = to_json(&wire::Abort::new(error_chain(e), e.code()));
                let _ = write_frame(&mut &*stream, Kind::Abort, &abort);
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
            if !done.load(Ordering::SeqCst) {
                let _ = first.shutdown(std::net::Shutdown::Read);
            }
            tracing::warn!("migration {id}: stream {k} failed: {}", error_chain(e));
        }
    }
    r
}

fn receive_stream_pages(
    k: u32,
    stream: &TcpStream,
    placer: &Placer<'_>,
    done: &AtomicBool,
) -> Result<(), Error> {
    let mut entries = PageEntries::default();
    let mut payload = Vec::new();
    let mut pages_in_pass = 0u64;
    loop {
        if pages_in_pass == 0 {
            // Between passes this stream idles while the others finish theirs: no stall
            // bound here (the first stream's reader has it, and its failure shuts this one
            // down); within a pass, the socket's timeout is the bound.
            let _ = wait_readable(stream.as_raw_fd(), None, None);
        }
        let h = match wire::read_header(&mut &*stream) {
            Ok(h) => h,
            // Closed between frames, and not in the middle of a pass: this stream is done.
            Err(wire::Error::Io(e))
                if pages_in_pass == 0
                    && (done.load(Ordering::SeqCst) || e.kind() == std::io::ErrorKind::UnexpectedEof) =>
            {
                return Ok(());
            }
            Err(wire::Error::Io(e)) if pages_in_pass > 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::Streams(format!("stream {k} closed in the middle of a pass")));
            }
            Err(e) => return Err(e.into()),
        };
        if h.kind == Kind::Pages {
            pages_in_pass += receive_batch(h, stream, &mut entries, placer)?;
            continue;
        }
        h.read_payload(&mut &*stream, &mut payload)?;
        if h.kind == Kind::DeltaPages {
            pages_in_pass += placer.place_deltas(&payload)?;
            continue;
        }
        let end: PassEnd = parse_json(h.kind, &payload, Kind::PassEnd, "Pages or PassEnd")?;
        acknowledge_pass(stream, &end, pages_in_pass)?;
        pages_in_pass = 0;
    }
}

/// Reads the `Pages` frame whose header is `h` from `stream`: its entries first, checked,
/// then each run's data straight into guest memory. Returns the pages in it.
fn receive_batch(
    h: wire::Header,
    stream: &TcpStream,
    entries: &mut PageEntries,
    placer: &Placer<'_>,
) -> Result<u64, Error> {
    h.read_page_entries(&mut &*stream, entries)?;
    for run in entries.runs() {
        placer.place_run(run, stream)?;
    }
    Ok(entries.len() as u64)
}

/// Joins the populate-ahead helper and logs what it did. Its failure only ever meant the
/// receive faulted its pages in itself.
fn log_populated(
    id: &str,
    helper: std::io::Result<std::thread::ScopedJoinHandle<'_, Result<(), populate::Error>>>,
    ahead: &Ahead<'_>,
) {
    let r = match helper {
        Ok(h) => h.join().unwrap_or(Err(populate::Error::Panicked)),
        Err(e) => Err(populate::Error::Spawn(e)),
    };
    let done = ahead.populated();
    let (mib, ms) = (done.bytes as f64 / (1 << 20) as f64, done.ms);
    match r {
        Ok(()) => tracing::info!("migration {id}: populated {mib:.0} MiB ahead of the receive ({ms:.1} ms)"),
        Err(e) => tracing::warn!(
            "migration {id}: populated {mib:.0} MiB ahead of the receive ({ms:.1} ms), then stopped: {}; \
             the receive faulted the rest in itself",
            error_chain(&e)
        ),
    }
}

/// Checks a stream's `PassEnd` against the pages that came in the pass and answers it
/// with `PassAck`.
fn acknowledge_pass(stream: &TcpStream, end: &PassEnd, pages_in_pass: u64) -> Result<(), Error> {
    if end.pages != pages_in_pass {
        return Err(Error::Protocol(wire::Error::BadPages("pass page count mismatch")));
    }
    let ack = to_json(&wire::PassAck { pass: end.pass, pages: end.pages });
    write_frame(&mut &*stream, Kind::PassAck, &ack)?;
    Ok(())
}

impl Vmm {
    /// On a destination: tells the source the vCPUs run. Called once they do. Returns the
    /// migration's id if the VM has just migrated in.
    pub(crate) fn report_activation(&mut self) -> Option<String> {
        let id = self.activation.as_ref().map(|a| a.id.clone());
        if let Some(mut a) = self.activation.take() {
            let ns = crate::monotonic_ns().saturating_sub(a.commit_ns);
            self.events.push(
                &a.id,
                Side::Destination,
                EventBody::Phase {
                    phase: MigrationPhase::Completed,
                    reason: Some(format!(
                        "the VM runs here; vCPUs started {:.3} ms after the commit",
                        ns as f64 / 1e6
                    )),
                },
            );
            let msg = to_json(&wire::Activated { activation_ns: ns });
            match write_frame(&mut a.stream, Kind::Activated, &msg) {
                Ok(()) => tracing::info!(
                    "migration {}: the VM runs here; vCPUs started {:.3} ms after the commit",
                    a.id,
                    ns as f64 / 1e6
                ),
                Err(e) => tracing::warn!(
                    "migration {}: the VM runs here, but the source could not be told: {}",
                    a.id,
                    error_chain(&e)
                ),
            }
            // After Activated: the source's pause lasts until it hears it, and the record's
            // syncs are not part of the switchover.
            self.write_destination_record(&a.id, ns);
        }
        id
    }
}

/// The destination's view of a migration, `HOME/migrations/<id>.destination.json`.
#[derive(Debug, serde::Serialize)]
struct DestinationRecord<'a> {
    migration_id: &'a str,
    side: Side,
    status: MigrationPhase,
    /// Commit to vCPUs running here, ms.
    activation_ms: f64,
    /// This VMM's pid and host.
    pid: u32,
    /// Every event this side saw of the migration, in order.
    events: Vec<ferry_api::Event>,
}

impl Vmm {
    /// Writes this side's record of migration `id` into the home (after activation).
    fn write_destination_record(&self, id: &str, activation_ns: u64) {
        let mut events = Vec::new();
        let mut cursor = 0;
        while let ferry_api::events::Batch::Events(batch, next) = self.events.after(cursor, 256) {
            events.extend(batch.into_iter().filter(|e| e.migration_id == id));
            cursor = next;
        }
        let record = DestinationRecord {
            migration_id: id,
            side: Side::Destination,
            status: MigrationPhase::Completed,
            activation_ms: activation_ns as f64 / 1e6,
            pid: std::process::id(),
            events,
        };
        let name = format!("{id}.destination.json");
        if let Some(Err(e)) = super::write_record_bounded(self.home.dir(), &name, &record, super::RECORD_WAIT)
        {
            tracing::warn!("migration {id}: cannot write this side's record into the home: {e}");
        }
    }
}

/// The home this side would lock must be the source's: the same VM, the same lock (not a
/// copy of the home, not another VM's).
/// The destination's handle on the VM's home, not yet locked; with a lease, its lease file
/// read ahead so that the switchover only acquires it.
fn leased_home(dir: &std::path::Path, lease: Option<crate::lease::LeaseConfig>) -> Result<VmHome, Error> {
    let lock = |e: crate::home::Error| Error::Lock(format!("prepare the VM's lease: {}", error_chain(&e)));
    let mut home = VmHome::unlocked(dir).with_lease(lease).map_err(lock)?;
    home.prepare_lease().map_err(lock)?;
    Ok(home)
}

fn check_lock(c: &MigrationConfig, home: &std::path::Path, overridden: bool) -> Result<(), String> {
    match &c.lock {
        Some(expected) => {
            let here = crate::home::lock_identity(home)
                .map_err(|e| format!("the VM's home cannot be used here: {}", error_chain(&e)))?;
            if here != *expected {
                return Err(format!(
                    "the home here ({here}) is not the source's VM lock ({expected}): the VM would run under \
                     two locks; give the destination the source's home on shared storage"
                ));
            }
            Ok(())
        }
        None if overridden && home != c.home => Err(format!(
            "the source names no lock identity (an older Ferry), so the destination must use the source's home \
             {}, not {}",
            c.home.display(),
            home.display()
        )),
        None => Ok(()),
    }
}

/// The pre-migration checks: can this host run this VM?
fn check_config(c: &MigrationConfig, host: &Host) -> Result<(), (Check, String)> {
    let d = &c.description;
    if d.vcpus == 0 || d.vcpus as usize > host.max_vcpus {
        return Err((
            Check::Vcpus,
            format!("the VM has {} vCPUs; this host allows 1 to {}", d.vcpus, host.max_vcpus),
        ));
    }
    if c.cpuid.len() != d.vcpus as usize {
        return Err((Check::Vcpus, format!("{} CPUID tables for {} vCPUs", c.cpuid.len(), d.vcpus)));
    }
    memory::check_size(d.memory, memory::host_ram(), vm::phys_bits(&host.supported))
        .map_err(|e| (Check::Memory, format!("memory: {}", error_chain(&e))))?;
    let expected: Vec<RegionState> = layout::ram_ranges(d.memory)
        .into_iter()
        .map(|(a, l)| RegionState { guest_addr: a.0, len: l })
        .collect();
    if c.memory_regions != expected {
        return Err((
            Check::Memory,
            format!("memory layout {:?} is not this Ferry's for {} bytes", c.memory_regions, d.memory),
        ));
    }
    if !(1..=ferry_api::MAX_STREAMS).contains(&c.streams) {
        return Err((
            Check::Streams,
            format!("{} streams; this Ferry takes 1 to {}", c.streams, ferry_api::MAX_STREAMS),
        ));
    }
    if c.virtio.len() > crate::virtio::MAX_DEVICES {
        return Err((
            Check::Devices,
            format!("{} virtio devices; this Ferry supports {}", c.virtio.len(), crate::virtio::MAX_DEVICES),
        ));
    }
    let virtio: Vec<String> = c
        .virtio
        .iter()
        .enumerate()
        .map(|(i, b)| b.device_name(crate::virtio::MMIO_BASE + i as u64 * crate::virtio::MMIO_SIZE))
        .collect();
    let unknown: Vec<&String> =
        c.devices.iter().filter(|d| !DEVICES.contains(&d.as_str()) && !virtio.contains(d)).collect();
    if !unknown.is_empty() {
        return Err((Check::Devices, format!("this Ferry has no device like {unknown:?}")));
    }
    for (i, table) in c.cpuid.iter().enumerate() {
        let entries: Vec<kvm_cpuid_entry2> = table.iter().map(kvm_cpuid_entry2::from).collect();
        let missing = ferry_arch::cpuid::missing_features(&entries, &host.supported);
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|f| f.to_string()).collect();
            return Err((
                Check::CpuFeatures,
                format!("this host's CPU lacks features the VM was given: {} (vCPU {i})", names.join(", ")),
            ));
        }
    }
    // The CPU model beyond feature bits: XSAVE and TSC (MSRs just below; the capabilities a
    // restore uses fail it cleanly if missing).
    if let Some(table) = c.cpuid.first() {
        let here = ferry_arch::model::host_model(&host.kvm, &host.supported)
            .map_err(|e| (Check::Host, format!("cannot probe this host's CPU model: {}", error_chain(&e))))?;
        let vm = ferry_arch::model::vm_model(table, &[], Vec::new());
        for m in ferry_arch::model::compare(&vm, &here) {
            match m.kind {
                ferry_arch::model::MismatchKind::Xsave => return Err((Check::Xsave, m.message)),
                ferry_arch::model::MismatchKind::Tsc => return Err((Check::Tsc, m.message)),
                ferry_arch::model::MismatchKind::Msrs | ferry_arch::model::MismatchKind::KvmCapabilities => {}
            }
        }
    }
    let list = host
        .kvm
        .get_msr_index_list()
        .map_err(|e| (Check::Msrs, format!("cannot list this host's MSRs: {e}")))?;
    let missing: Vec<String> =
        c.msrs.iter().filter(|m| !list.as_slice().contains(m)).map(|m| format!("{m:#x}")).collect();
    if !missing.is_empty() {
        return Err((Check::Msrs, format!("this host's KVM cannot restore MSRs {}", missing.join(", "))));
    }
    Ok(())
}

/// Compares this side's checksums of guest memory (`mine`, made with [`verify_chunk`]) with
/// the source's; the error names the first mismatch.
fn compare_memory(mine: &[u32], memory: u64, v: &wire::Verify) -> Result<(), String> {
    if v.chunk_bytes != verify_chunk(memory) {
        return Err(format!("unexpected chunk size {}", v.chunk_bytes));
    }
    if mine.len() != v.crcs.len() {
        return Err(format!("{} checksums for {} chunks", v.crcs.len(), mine.len()));
    }
    let bad: Vec<usize> =
        mine.iter().zip(&v.crcs).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
    match bad.first() {
        None => Ok(()),
        Some(&first) => Err(format!(
            "{} of {} chunks of {} KiB differ, the first is chunk {first}",
            bad.len(),
            mine.len(),
            v.chunk_bytes >> 10
        )),
    }
}
