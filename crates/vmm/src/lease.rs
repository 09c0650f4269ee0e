//! The VM's lease on shared storage (opt-in, `--lease`): a sanlock resource lease in the
//! VM's home (`vm.lease`) in a lockspace of the datastore, held by the one VMM that may run
//! the VM, and a monitor that makes the VMM fence itself before the lease can expire.
//!
//! With a lease, the lease is the arbiter: it is acquired before `vm.lock` (which stays, as
//! the local cache and record of the holder) and released after it. The generation rule is
//! unchanged: `vm.generation` beside the lease is written only by the lease holder.
//!
//! Self-fencing (`Monitor`): sanlock renews this host's delta lease every
//! `2 * io_timeout` seconds; if it cannot, it counts the host's leases failed at
//! `8 * io_timeout` and runs the killpath Ferry registers (`kill -USR1 <pid>`); another
//! host may take the lease over only at `8 * io_timeout + 60` s. Without a watchdog a hung
//! or stopped daemon would fence nothing, so the VMM also watches its own host's renewal
//! time and fences at [`FENCE_FACTOR`]` * io_timeout`, whether the daemon answers or not.
//! See docs/migration.md ("Leases").

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_lease::{Code, KillPath, Lease, Lockspace, Resource};
use vmm_sys_util::eventfd::EventFd;

use crate::home::Error;
use crate::vcpu::RUN_DEADLINE_NS;

/// The lease file's name in a home directory.
pub const LEASE_FILE: &str = "vm.lease";
/// A lease area's size: 1 MiB (512-byte sectors, 1 MiB alignment).
const LEASE_BYTES: u64 = 1 << 20;
/// sanlock's own default I/O timeout, in seconds.
pub const DEFAULT_IO_TIMEOUT: u32 = 10;
/// The VMM fences itself when its host's last renewal is this many `io_timeout`s old:
/// before sanlock's `8 * io_timeout` (when it runs the killpath) and long before another
/// host may take over (`8 * io_timeout + 60` s).
pub const FENCE_FACTOR: u64 = 7;
/// How often the watchdog compares the last renewal with the clock.
const WATCH_PERIOD: Duration = Duration::from_millis(200);
/// The signal the killpath sends (`kill -USR1 <pid>`): the VMM fences itself.
pub const FENCE_SIGNAL: i32 = libc::SIGUSR1;

/// `--lease LOCKSPACE:HOSTID:IDS_PATH[,io_timeout=N]`: the datastore's lockspace, this
/// host's id in it, the lockspace's file, and the I/O timeout (seconds; default 10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The lockspace's name (one per datastore).
    pub lockspace: String,
    /// This host's id in it (unique per host, 1 to 2000).
    pub host_id: u64,
    /// The lockspace's file on the datastore.
    pub ids: PathBuf,
    /// The I/O timeout in seconds: renewal every 2x, fencing at [`FENCE_FACTOR`]x.
    pub io_timeout: u32,
}

impl std::str::FromStr for LeaseConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "expected LOCKSPACE:HOSTID:IDS_PATH[,io_timeout=SECONDS]";
        let (main, options) = match s.split_once(',') {
            Some((m, o)) => (m, Some(o)),
            None => (s, None),
        };
        let mut parts = main.splitn(3, ':');
        let (Some(lockspace), Some(host_id), Some(ids)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{s:?}: {usage}"));
        };
        let host_id: u64 =
            host_id.parse().map_err(|_| format!("{s:?}: the host id {host_id:?} is not a number"))?;
        if !(1..=2000).contains(&host_id) {
            return Err(format!("{s:?}: the host id must be 1 to 2000"));
        }
        if lockspace.is_empty() || lockspace.len() > 47 {
            return Err(format!("{s:?}: the lockspace name must be 1 to 47 bytes"));
        }
        if ids.is_empty() {
            return Err(format!("{s:?}: {usage}"));
        }
        let mut io_timeout = DEFAULT_IO_TIMEOUT;
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            match option.split_once('=') {
                Some(("io_timeout", v)) => {
                    io_timeout = v
                        .parse()
                        .ok()
                        .filter(|t| (1..=600).contains(t))
                        .ok_or_else(|| format!("{s:?}: io_timeout must be 1 to 600 seconds"))?;
                }
                _ => return Err(format!("{s:?}: unknown option {option:?} ({usage})")),
            }
        }
        Ok(Self { lockspace: lockspace.to_owned(), host_id, ids: PathBuf::from(ids), io_timeout })
    }
}

impl LeaseConfig {
    /// The lockspace, with this host's id.
    pub fn lockspace(&self) -> Result<Lockspace, ferry_lease::Error> {
        Lockspace::new(&self.lockspace, self.host_id, &self.ids)
    }

    /// Joins the lockspace if this host has not yet (takes `2 * io_timeout + 1` s then).
    pub fn join(&self) -> Result<(), ferry_lease::Error> {
        let ls = self.lockspace()?;
        if ls.is_joined()? {
            return Ok(());
        }
        let t = std::time::Instant::now();
        ls.add(self.io_timeout)?;
        tracing::info!(
            "joined lockspace {} as host id {} in {:.1} s",
            self.lockspace,
            self.host_id,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Seconds of renewal age at which the VMM fences itself.
    pub fn fence_after_s(&self) -> u64 {
        FENCE_FACTOR * u64::from(self.io_timeout)
    }
}

/// What the lock record says about the lease (for operators and the next holder).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRecord {
    /// The lockspace.
    pub lockspace: String,
    /// The holder's host id in it.
    pub host_id: u64,
    /// The lease version of the holder's acquisition.
    pub lver: u64,
}

/// How the monitor and the killpath tell the VMM thread to fence: an event fd it watches,
/// and the reason.
pub struct FenceSignal {
    /// Written when the VMM must fence itself.
    pub event: EventFd,
    reason: Mutex<Option<String>>,
    /// Stops the vCPUs at once, from the thread that fires (the VMM thread may be busy).
    stop_now: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The run deadline the watchdog saw pass (`CLOCK_MONOTONIC` ns; 0: fired otherwise).
    due_ns: AtomicU64,
}

impl std::fmt::Debug for FenceSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceSignal").field("event", &self.event).finish_non_exhaustive()
    }
}

impl FenceSignal {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            reason: Mutex::new(None),
            stop_now: Mutex::new(None),
            due_ns: AtomicU64::new(0),
        })
    }

    /// What [`FenceSignal::fire`] runs first, in the firing thread: the VMM pauses its
    /// vCPUs there, so that the fence does not wait for the VMM thread.
    pub fn on_fire(&self, stop_now: Box<dyn Fn() + Send + Sync>) {
        *self.stop_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop_now);
    }

    /// Stops the vCPUs (see [`FenceSignal::on_fire`]) and asks the VMM thread to fence, for
    /// `reason` (the first reason wins).
    pub fn fire(&self, reason: String) {
        if let Some(stop) = self.stop_now.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            stop();
        }
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.event.write(1);
    }

    /// The latest moment a vCPU can have run guest code after a fence by the watchdog: the
    /// deadline (past which no vCPU enters the guest) plus one watchdog period (within which
    /// it kicks those inside out). `None` if the fence did not come from the deadline.
    pub fn last_run_bound_ns(&self) -> Option<u64> {
        match self.due_ns.load(Ordering::SeqCst) {
            0 => None,
            due => Some(due + WATCH_PERIOD.as_nanos() as u64 + 50_000_000),
        }
    }

    /// The reason given, if any, clearing the event.
    pub fn take(&self) -> Option<String> {
        let _ = self.event.read();
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Watches this host's renewals of its delta lease while the VM's lease is held.
///
/// Two threads: a prober asks the daemon for this host's last renewal every second and
/// stores it; a watchdog compares it with the clock every 200 ms and fires the
/// [`FenceSignal`] once it is [`LeaseConfig::fence_after_s`] old. A daemon that hangs or
/// stops (a prober stuck in its call) stops the renewals from being seen: the watchdog
/// fences all the same.
#[derive(Debug)]
struct Monitor {
    stop: Arc<AtomicBool>,
}

impl Monitor {
    fn start(config: &LeaseConfig, fence: Arc<FenceSignal>) -> Result<Self, ferry_lease::Error> {
        let ls = config.lockspace()?;
        let stop = Arc::new(AtomicBool::new(false));
        // The lease was just acquired, which sanlock does only with a fresh host lease.
        let last = Arc::new(AtomicU64::new(ferry_lease::monotonic_secs()));
        if let Ok(Some(h)) = ls.host(config.host_id) {
            last.store(h.timestamp, Ordering::SeqCst);
        }
        let limit_s = config.fence_after_s();
        let deadline = move |renewed_s: u64| (renewed_s + limit_s).saturating_mul(1_000_000_000);
        RUN_DEADLINE_NS.store(deadline(last.load(Ordering::SeqCst)), Ordering::SeqCst);
        let (stop_p, last_p, fence_p) = (stop.clone(), last.clone(), fence.clone());
        let (host_id, io) = (config.host_id, config.io_timeout);
        let spawn_prober = std::thread::Builder::new().name("lease-probe".into()).spawn(move || {
            while !stop_p.load(Ordering::SeqCst) {
                match ls.host(host_id) {
                    Ok(Some(h)) if h.timestamp > 0 => {
                        // A renewal after a gap of the limit does not give the lease back:
                        // others may have taken it meanwhile (this process, or the whole host,
                        // was frozen; or the renewals stalled and resumed).
                        let prev = last_p.load(Ordering::SeqCst);
                        let gap = ferry_lease::monotonic_secs().max(h.timestamp).saturating_sub(prev);
                        if gap >= limit_s {
                            if !stop_p.load(Ordering::SeqCst) {
                                expire(
                                    &fence_p,
                                    format!(
                                        "this host's lease went {gap} s without a renewal (limit {limit_s} s = \
                                         {FENCE_FACTOR} x io_timeout {io} s): the host, the VMM or the lease \
                                         daemon was stopped, or the storage failed"
                                    ),
                                );
                            }
                            return;
                        }
                        let renewed = last_p.fetch_max(h.timestamp, Ordering::SeqCst).max(h.timestamp);
                        if !stop_p.load(Ordering::SeqCst) {
                            RUN_DEADLINE_NS.store(deadline(renewed), Ordering::SeqCst);
                        }
                    }
                    Ok(_) => {}
                    Err(e) if e.errno() == Some(libc::EAGAIN) => {}
                    Err(e) => tracing::debug!("lease monitor: {e}"),
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        if let Err(e) = spawn_prober {
            tracing::error!(
                "cannot start the lease monitor's prober: {e}; the watchdog fences when it sees no renewal"
            );
        }
        let (stop_w, limit, io) = (stop.clone(), config.fence_after_s(), config.io_timeout);
        let spawned = std::thread::Builder::new().name("lease-watch".into()).spawn(move || {
            while !stop_w.load(Ordering::SeqCst) {
                let age = ferry_lease::monotonic_secs().saturating_sub(last.load(Ordering::SeqCst));
                if age >= limit {
                    expire(
                        &fence,
                        format!(
                            "this host's lease was last renewed {age} s ago (limit {limit} s = {FENCE_FACTOR} x \
                             io_timeout {io} s): the storage or the lease daemon is failing"
                        ),
                    );
                    return;
                }
                std::thread::sleep(WATCH_PERIOD);
            }
        });
        if let Err(e) = spawned {
            // Without the watchdog only sanlock's killpath fences: refuse.
            stop.store(true, Ordering::SeqCst);
            return Err(ferry_lease::Error::Unexpected { op: "monitor", what: e.to_string() });
        }
        Ok(Self { stop })
    }
}

/// The lease may be lost: no vCPU enters the guest any more, and the VMM fences.
fn expire(fence: &FenceSignal, reason: String) {
    let due = RUN_DEADLINE_NS.swap(1, Ordering::SeqCst);
    // 0 or 1: no deadline was set (no lease), or it already expired (the first one counts).
    if due > 1 {
        fence.due_ns.store(due, Ordering::SeqCst);
    }
    fence.fire(reason);
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The lease of one VM home.
#[derive(Debug)]
pub struct HomeLease {
    config: LeaseConfig,
    lease: Option<Lease>,
    monitor: Option<Monitor>,
    fence: Arc<FenceSignal>,
    /// The lease file's resource, once read ([`HomeLease::prepare`]).
    resource: Option<Resource>,
}

impl HomeLease {
    /// A lease per `config`, not yet acquired.
    pub fn new(config: LeaseConfig) -> std::io::Result<Self> {
        Ok(Self { config, lease: None, monitor: None, fence: Arc::new(FenceSignal::new()?), resource: None })
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// What tells the VMM thread to fence itself.
    pub fn fence_signal(&self) -> &Arc<FenceSignal> {
        &self.fence
    }

    /// Joins the lockspace and makes sure `dir` has a formatted lease: what can be done
    /// ahead of an acquisition (a migration destination does it before the switchover).
    pub fn prepare(&mut self, dir: &Path) -> Result<Resource, Error> {
        if let Some(r) = &self.resource {
            return Ok(r.clone());
        }
        let err = |source| Error::Lease { path: dir.to_owned(), source };
        self.config.join().map_err(err)?;
        let path = dir.join(LEASE_FILE);
        if !path.exists() {
            create_lease_file(dir, &self.config.lockspace)?;
        }
        let resource = Resource::read(&path).map_err(err)?;
        if resource.lockspace != self.config.lockspace {
            return Err(Error::LeaseElsewhere {
                path: dir.to_owned(),
                lockspace: resource.lockspace,
                configured: self.config.lockspace.clone(),
            });
        }
        self.resource = Some(resource.clone());
        Ok(resource)
    }

    /// Acquires the lease (without waiting for another holder) and starts the monitor.
    /// Returns the lease version.
    pub fn acquire(&mut self, dir: &Path) -> Result<u64, Error> {
        if let Some(l) = &self.lease {
            return Ok(l.lver());
        }
        let resource = self.prepare(dir)?;
        let killpath = KillPath { program: "/bin/kill".into(), args: format!("-{FENCE_SIGNAL}") };
        let t = std::time::Instant::now();
        let wait = Duration::from_secs(2 * u64::from(self.config.io_timeout));
        let lease = match acquire_within(resource.clone(), killpath, wait) {
            Ok(l) => l,
            Err(e) if is_busy(&e) => {
                // No more I/O here: callers retry this every millisecond while they wait.
                let holder = format!(
                    "its lease in lockspace {} is held elsewhere: {}; `ferry home {}` shows the owner",
                    resource.lockspace,
                    e.code().map(|c| c.describe().to_string()).unwrap_or_else(|| e.to_string()),
                    dir.display()
                );
                return Err(Error::Held { path: dir.to_owned(), holder });
            }
            Err(source) => return Err(Error::Lease { path: dir.to_owned(), source }),
        };
        let monitor = Monitor::start(&self.config, self.fence.clone())
            .map_err(|source| Error::Lease { path: dir.to_owned(), source })?;
        tracing::info!(
            "lease of {} acquired in {:.2} ms (lockspace {}, host id {}, lease version {})",
            dir.display(),
            t.elapsed().as_secs_f64() * 1e3,
            self.config.lockspace,
            self.config.host_id,
            lease.lver()
        );
        // A fence request left from an earlier holding is void now.
        let _ = self.fence.take();
        self.fence.due_ns.store(0, Ordering::SeqCst);
        self.lease = Some(lease);
        self.monitor = Some(monitor);
        Ok(self.lver().unwrap_or(0))
    }

    /// The version of the held lease.
    pub fn lver(&self) -> Option<u64> {
        self.lease.as_ref().map(Lease::lver)
    }

    /// Whether the lease is held.
    pub fn is_held(&self) -> bool {
        self.lease.is_some()
    }

    /// What the lock record says about the held lease.
    pub fn record(&self) -> Option<LeaseRecord> {
        self.lease.as_ref().map(|l| LeaseRecord {
            lockspace: self.config.lockspace.clone(),
            host_id: self.config.host_id,
            lver: l.lver(),
        })
    }

    /// Releases the lease (and stops the monitor).
    pub fn release(&mut self) {
        self.monitor = None;
        // No lease, no bound: the vCPUs are stopped, or about to be, by whoever released.
        RUN_DEADLINE_NS.store(0, Ordering::SeqCst);
        if let Some(mut lease) = self.lease.take() {
            let t = std::time::Instant::now();
            match lease.release() {
                Ok(()) => tracing::info!(
                    "lease released in {:.2} ms (lease version {})",
                    t.elapsed().as_secs_f64() * 1e3,
                    lease.lver()
                ),
                Err(e) => tracing::warn!("cannot release the lease cleanly: {e}; closing its connection"),
            }
        }
    }

    /// Lets the lease go without waiting for the daemon (which may hang with the storage):
    /// a thread releases it and closes the connection. The VMM no longer holds it either
    /// way; if the daemon never answers, the lease expires.
    pub fn abandon(&mut self) {
        self.monitor = None;
        // Fenced: no vCPU enters the guest until the lease is back (a new monitor).
        RUN_DEADLINE_NS.store(1, Ordering::SeqCst);
        if let Some(mut lease) = self.lease.take() {
            let spawned = std::thread::Builder::new().name("lease-release".into()).spawn(move || {
                if let Err(e) = lease.release() {
                    tracing::warn!("fenced: the lease release failed ({e}); it expires on its own");
                }
            });
            if let Err(e) = spawned {
                tracing::warn!("fenced: cannot start the lease release ({e}); the lease expires on its own");
            }
        }
    }
}

/// [`Lease::acquire`] from a thread, waiting at most `wait`: a hung or stopped daemon
/// must not hang the VMM thread. If the answer comes after the wait, the thread lets the
/// lease go again (nobody is there to take it).
fn acquire_within(
    resource: Resource,
    killpath: KillPath,
    wait: Duration,
) -> Result<Lease, ferry_lease::Error> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("lease-acquire".into())
        .spawn(move || {
            let r = Lease::acquire(&resource, Some(&killpath));
            // A receiver gone (the wait is over) drops the lease here: released.
            let _ = tx.send(r);
        })
        .map_err(|e| ferry_lease::Error::Unexpected {
            op: "acquire",
            what: format!("cannot start a thread: {e}"),
        })?;
    match rx.recv_timeout(wait) {
        Ok(r) => r,
        Err(_) => Err(ferry_lease::Error::Unexpected {
            op: "acquire",
            what: format!("no answer from the lease daemon within {:.0} s", wait.as_secs_f64()),
        }),
    }
}

/// Whether `e` says another holder has the lease.
fn is_busy(e: &ferry_lease::Error) -> bool {
    matches!(
        e.code(),
        Some(
            Code::AcquireIdlive
                | Code::AcquireOwned
                | Code::AcquireOther
                | Code::AcquireOwnedRetry
                | Code::AcquireShretry
        )
    ) || e.errno() == Some(libc::EEXIST)
        || e.errno() == Some(libc::EAGAIN)
}

/// Creates `dir/vm.lease`, formatted, with a fresh resource name: formatted under a
/// temporary name and linked into place, so that no one ever sees a half-made lease and
/// two hosts making it at once do not overwrite each other's (the second link fails).
fn create_lease_file(dir: &Path, lockspace: &str) -> Result<(), Error> {
    let path = dir.join(LEASE_FILE);
    let tmp = dir.join(format!(".{LEASE_FILE}.{}.tmp", std::process::id()));
    let io = |source| Error::Open { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io)?;
    let made = file.set_len(LEASE_BYTES).map_err(io).and_then(|()| {
        let resource = Resource::new(lockspace, &ferry_lease::new_resource_name(), &tmp)
            .map_err(|source| Error::Lease { path: dir.to_owned(), source })?;
        resource.format().map_err(|source| Error::Lease { path: dir.to_owned(), source })?;
        file.sync_all().map_err(io)?;
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => {
                tracing::info!("made the lease {} in lockspace {lockspace}", path.display());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io(e)),
        }
    });
    let _ = std::fs::remove_file(&tmp);
    made
}

/// The lease of a home as an operator sees it: its lockspace and name, and its owner
/// (from the lease on disk, read through the local sanlock daemon).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseStatus {
    /// The lockspace.
    pub lockspace: String,
    /// The resource name.
    pub resource: String,
    /// The lease version (raised on every acquisition).
    pub lver: u64,
    /// The owner's host id, if the lease is held.
    pub owner_host_id: Option<u64>,
    /// The owner's host generation.
    pub owner_generation: Option<u64>,
    /// The owner's last renewal (seconds of the owner's `CLOCK_MONOTONIC`, as sanlock
    /// records it).
    pub renewed_monotonic_s: Option<u64>,
}

/// Reads the lease of `dir`, if it has one (`Ok(None)`: no `vm.lease`).
pub fn status(dir: &Path) -> Result<Option<LeaseStatus>, ferry_lease::Error> {
    let path = dir.join(LEASE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let resource = Resource::read(&path)?;
    let owners = resource.owners()?;
    // A leader whose owner marked its ballot block released is free (see
    // `Resource::released_by`).
    let owner = match owners.hosts.first() {
        Some(h) if resource.released_by(h.host_id, owners.lver)? => None,
        other => other,
    };
    Ok(Some(LeaseStatus {
        lockspace: resource.lockspace,
        resource: resource.name,
        lver: owners.lver,
        owner_host_id: owner.map(|h| h.host_id),
        owner_generation: owner.map(|h| h.generation),
        renewed_monotonic_s: owner.map(|h| h.timestamp).filter(|t| *t > 0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_options() {
        let c: LeaseConfig = "DS1:3:/mnt/ds1/ids".parse().expect("parse");
        assert_eq!(
            c,
            LeaseConfig { lockspace: "DS1".into(), host_id: 3, ids: "/mnt/ds1/ids".into(), io_timeout: 10 }
        );
        let c: LeaseConfig = "DS1:3:/a:b/ids,io_timeout=2".parse().expect("parse");
        assert_eq!((c.fence_after_s(), c.io_timeout, c.ids), (14, 2, PathBuf::from("/a:b/ids")));
        for bad in [
            "DS1",
            "DS1:x:/ids",
            "DS1:0:/ids",
            "DS1:1:",
            ":1:/ids",
            "DS1:1:/ids,io_timeout=0",
            "DS1:1:/i,x=1",
        ] {
            assert!(bad.parse::<LeaseConfig>().is_err(), "{bad}");
        }
    }
}
