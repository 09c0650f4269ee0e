//! The VMM thread's event loop: waits for the guest to stop, for a signal, or for console
//! input, and tears the VM down in order.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use ferry_devices::boot_timer::monotonic_ns;

use ferry_api::{ApiError, Request as ApiRequest, Response, RunState as ApiRunState, VmInfo};

use ferry_virtio::device::Poll;

use crate::api::{self, Inbox};
use crate::migration::{error_chain, Next};
use crate::vcpu::{Request, StopReason};
use crate::{Error, SerialConfig, VmRunState, Vmm};

/// How a run ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest powered off.
    PowerOff,
    /// The process received SIGTERM or SIGINT and stopped the VM.
    Signalled(i32),
    /// A snapshot with `stop` suspended the VM: its checkpoint holds it now.
    Suspended,
    /// The VM was live-migrated: it runs on the destination now.
    Migrated,
}

const TOKEN_EXIT: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_STDIN: u64 = 4;
const TOKEN_API: u64 = 5;
const TOKEN_MIGRATION: u64 = 6;
const TOKEN_FENCE: u64 = 7;
/// NIC `i`: its event fd is `TOKEN_NIC + 2 * i`, its tap `TOKEN_NIC + 2 * i + 1`.
const TOKEN_NIC: u64 = 0x100;

/// One NIC's fds in the event loop. The receive path runs only while the vCPUs run: with
/// them paused (a snapshot, a migration's last copy) guest memory must not change, so both
/// fds leave the loop (level-triggered, they would spin) until the vCPUs run again.
struct NicPoll {
    index: usize,
    event: RawFd,
    tap: RawFd,
    event_on: bool,
    tap_on: bool,
}

impl NicPoll {
    fn set(epoll: &Epoll, fd: RawFd, token: u64, on: &mut bool, want: bool) {
        if *on == want {
            return;
        }
        let op = if want { ControlOperation::Add } else { ControlOperation::Delete };
        match epoll.ctl(op, fd, EpollEvent::new(EventSet::IN, token)) {
            Ok(()) => *on = want,
            Err(e) => tracing::warn!(
                "cannot {} a NIC fd in the event loop: {e}",
                if want { "add" } else { "remove" }
            ),
        }
    }

    fn token(&self) -> u64 {
        TOKEN_NIC + 2 * self.index as u64
    }

    /// Brings the fds in line with the VM's state; `work` runs the device's receive path
    /// (given the device's index).
    fn sync(&mut self, epoll: &Epoll, running: bool, work: impl FnOnce(usize) -> Poll) {
        if running {
            Self::set(epoll, self.event, self.token(), &mut self.event_on, true);
            let want_tap = work(self.index) == Poll::Backend;
            Self::set(epoll, self.tap, self.token() + 1, &mut self.tap_on, want_tap);
        } else {
            Self::set(epoll, self.event, self.token(), &mut self.event_on, false);
            Self::set(epoll, self.tap, self.token() + 1, &mut self.tap_on, false);
        }
    }
}

impl Vmm {
    /// Runs the guest until it powers off, fails, or the process gets SIGTERM/SIGINT.
    /// A guest failure is an error ([`Error::Guest`]).
    pub fn run(mut self) -> Result<RunOutcome, Error> {
        let signals = self
            .signals
            .take()
            .ok_or_else(|| Error::EventLoop(std::io::Error::other("the VM has already been run")))?;
        // The invariant that keeps a VM from running twice, or from an old state: no vCPU
        // starts without the lock, nor from a state older than the VM's generation, and the
        // generation is raised (durably) before any does.
        self.migrated_in = self.activation.as_ref().map(|a| a.id.clone());
        if let Err(e) = self.start_generation() {
            self.shutdown();
            return Err(e);
        }
        let epoll = Epoll::new().map_err(Error::EventLoop)?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
        };
        add(self.exit.eventfd().as_raw_fd(), TOKEN_EXIT).map_err(Error::EventLoop)?;
        add(self.devices.reset_evt.as_raw_fd(), TOKEN_RESET).map_err(Error::EventLoop)?;
        add(signals.as_raw_fd(), TOKEN_SIGNAL).map_err(Error::EventLoop)?;
        // With a lease: its monitor's verdict (see crate::lease).
        let fence_signal = self.home.lease().map(|l| l.fence_signal().clone());
        if let Some(f) = &fence_signal {
            add(f.event.as_raw_fd(), TOKEN_FENCE).map_err(Error::EventLoop)?;
            let pausers: Vec<_> = self.vcpus.iter().filter_map(|v| v.pauser()).collect();
            f.on_fire(Box::new(move || pausers.iter().for_each(|p| p.pause())));
        }
        // Console input: only from something epoll can watch (not /dev/null or a file).
        if self.serial_config == SerialConfig::Stdio {
            let _ = add(libc::STDIN_FILENO, TOKEN_STDIN);
        }
        for v in &self.vcpus {
            v.request(Request::Run);
        }
        let now = monotonic_ns();
        let migrated_in = self.report_activation();
        if let Some(id) = &migrated_in {
            self.announce_nics(id);
        }
        let mut nics: Vec<NicPoll> = self
            .devices
            .virtio
            .net_fds()
            .into_iter()
            .map(|(index, event, tap)| NicPoll { index, event, tap, event_on: false, tap_on: false })
            .collect();
        for nic in &mut nics {
            let virtio = &self.devices.virtio;
            nic.sync(&epoll, self.state == VmRunState::Running, |i| virtio.device_event(i));
        }
        // The API comes up once the guest runs: on a migration destination, every
        // microsecond before the vCPUs start is downtime.
        let mut server = None;
        let mut inbox: Option<Inbox> = None;
        if let Some(path) = self.api_socket.clone() {
            let (bridge, ib) = api::channel(self.events.clone()).map_err(Error::EventLoop)?;
            add(ib.wake.as_raw_fd(), TOKEN_API).map_err(Error::EventLoop)?;
            // A receiving VMM has served the socket since it started: hand it to the VM.
            let spawned = match self.api_server.take() {
                Some((handle, delegate)) => {
                    delegate.set(std::sync::Arc::new(bridge));
                    Ok(handle)
                }
                None => ferry_api::server::spawn(&path, std::sync::Arc::new(bridge)),
            };
            match spawned {
                Ok(s) => {
                    server = Some(s);
                    inbox = Some(ib);
                    tracing::info!(socket = %path.display(), "API listening");
                }
                // A VM that has just migrated in must not die for want of its API.
                Err(e) if migrated_in.is_some() => {
                    tracing::error!("{}; the VM runs without its API", error_chain(&e));
                }
                Err(e) => {
                    self.shutdown();
                    return Err(e.into());
                }
            }
        }

        tracing::info!(
            monotonic_ns = now,
            "vCPUs running {:.3} ms after ferry started",
            now.saturating_sub(self.started_ns) as f64 / 1e6
        );
        tracing::info!(
            memory_mib = self.description.memory >> 20,
            vcpus = self.description.vcpus,
            "{} running",
            self.description.kernel
        );

        let mut timer_logged = false;
        let mut migration_wake: Option<std::sync::Arc<vmm_sys_util::eventfd::EventFd>> = None;
        let mut events = vec![EpollEvent::default(); 8];
        let outcome = loop {
            let n = match epoll.wait(if timer_logged { -1 } else { 20 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Error::EventLoop(e)),
            };
            if !timer_logged {
                if let Some(&at) = self.devices.boot_timer.get() {
                    timer_logged = true;
                    let since = at.saturating_sub(self.started_ns);
                    tracing::info!(
                        monotonic_ns = at,
                        "boot timer: the guest's first instruction ran {:.3} ms after ferry started",
                        since as f64 / 1e6
                    );
                }
            }
            let mut stop = None;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {
                        let _ = self.exit.eventfd().read();
                        match self.exit.reason() {
                            Some(StopReason::PowerOff) => stop = Some(Ok(RunOutcome::PowerOff)),
                            Some(StopReason::Fault(f)) => stop = Some(Err(Error::Guest(f))),
                            None => {}
                        }
                    }
                    TOKEN_RESET => {
                        let _ = self.devices.reset_evt.read();
                        let status = *self.devices.exit_status.lock().unwrap_or_else(|p| p.into_inner());
                        match status {
                            Some(code) if code != 0 => {
                                tracing::info!("the guest powered off after reporting failure status {code}");
                                stop = Some(Err(Error::GuestFailed(code)));
                            }
                            _ => {
                                tracing::info!("the guest powered off (i8042 reset)");
                                stop = Some(Ok(RunOutcome::PowerOff));
                            }
                        }
                    }
                    TOKEN_FENCE => {
                        if let Some(reason) = fence_signal.as_ref().and_then(|f| f.take()) {
                            if self.home.lease().is_some_and(|l| l.is_held()) {
                                self.fence(reason);
                            }
                        }
                    }
                    TOKEN_SIGNAL => {
                        let sig = signals.read();
                        if let Some(sig) = sig.filter(|s| *s == crate::lease::FENCE_SIGNAL) {
                            // sanlock's killpath: the daemon counts this host's lease failed.
                            if self.home.lease().is_some_and(|l| l.is_held()) {
                                self.fence(format!(
                                    "the lease daemon counts this host's lease failed (killpath signal {sig})"
                                ));
                            }
                        } else if let Some(sig) = sig {
                            tracing::info!("signal {sig} received: stopping the VM");
                            stop = Some(Ok(RunOutcome::Signalled(sig)));
                        }
                    }
                    TOKEN_API => {
                        if let Some(ib) = &inbox {
                            let _ = ib.wake.read();
                            let calls: Vec<_> = ib.calls.try_iter().collect();
                            for (request, reply) in calls {
                                if let Some(s) = self.handle_api(request, reply) {
                                    stop = Some(s);
                                }
                            }
                        }
                        if let (Some(m), None) = (&self.migration, &migration_wake) {
                            let wake = m.wake.clone();
                            add(wake.as_raw_fd(), TOKEN_MIGRATION).map_err(Error::EventLoop)?;
                            migration_wake = Some(wake);
                        }
                    }
                    TOKEN_MIGRATION => {
                        match self.handle_migration_calls() {
                            Next::Continue => {}
                            Next::Migrated => stop = Some(Ok(RunOutcome::Migrated)),
                            Next::Lost(why) => stop = Some(Err(Error::MigrationLost(why))),
                        }
                        if self.migration.is_none() {
                            if let Some(w) = migration_wake.take() {
                                let _ =
                                    epoll.ctl(ControlOperation::Delete, w.as_raw_fd(), EpollEvent::default());
                            }
                        }
                    }
                    // Console input closed: stop watching it.
                    TOKEN_STDIN if !self.forward_stdin() => {
                        let _ =
                            epoll.ctl(ControlOperation::Delete, libc::STDIN_FILENO, EpollEvent::default());
                    }
                    t if t >= TOKEN_NIC => {
                        let index = ((t - TOKEN_NIC) / 2) as usize;
                        if let Some(nic) = nics.iter_mut().find(|n| n.index == index) {
                            let running = self.state == VmRunState::Running;
                            let virtio = &self.devices.virtio;
                            nic.sync(&epoll, running, |i| virtio.device_event(i));
                        }
                    }
                    _ => {}
                }
            }
            // A pause or resume in this batch (API, snapshot, migration): NICs follow.
            let running = self.state == VmRunState::Running;
            for nic in &mut nics {
                if nic.event_on != running {
                    let virtio = &self.devices.virtio;
                    nic.sync(&epoll, running, |i| virtio.device_event(i));
                }
            }
            if let Some(s) = stop {
                break s;
            }
        };
        self.abandon_migration();
        self.shutdown();
        // Event streams send what is left (a migration's report) and end.
        self.events.close();
        if let Some(mut s) = server {
            // Lets a response in flight (a suspend's report) reach its client.
            s.shutdown(std::time::Duration::from_secs(5));
        }
        // A home Ferry made for a VM that has now ended for good goes with it; a suspended
        // VM's home stays (its checkpoint names it).
        let handed_on = matches!(
            outcome,
            Ok(RunOutcome::Suspended) | Ok(RunOutcome::Migrated) | Err(Error::MigrationLost(_))
        );
        if self.home_is_default && !handed_on && self.home.is_held() {
            self.home.remove();
        }
        // A VMM that ends on its own lets go cleanly: the record says it did not die holding
        // the lock.
        self.home.release();
        outcome
    }

    /// Carries out one API request on the VMM thread and answers on `reply` (a migration
    /// answers when it ends). Returns how the VM ends, if this request ends it.
    fn handle_api(
        &mut self,
        request: ApiRequest,
        reply: std::sync::mpsc::Sender<Result<Response, ApiError>>,
    ) -> Option<Result<RunOutcome, Error>> {
        if let Some(id) = self.migrating() {
            if matches!(request, ApiRequest::Snapshot(_)) {
                let _ = reply.send(Err(ApiError::conflict(format!(
                    "migration {id} is in progress; cancel it first (ferry migrate-cancel)"
                ))));
                return None;
            }
            if matches!(request, ApiRequest::Pause | ApiRequest::Resume) {
                // Refused, or carried out after the migration has rolled back.
                self.defer_until_rolled_back(request, reply);
                return None;
            }
        }
        if let Some(why) = self.fenced.clone() {
            let refused = match &request {
                ApiRequest::Snapshot(_) | ApiRequest::Migrate(_) | ApiRequest::Pause => true,
                ApiRequest::Resume => match self.unfence() {
                    Ok(()) => {
                        let _ = reply.send(Ok(Response::Done));
                        return None;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::conflict(format!(
                            "the VM is fenced ({why}) and cannot resume: {}",
                            error_chain(&e)
                        ))));
                        return None;
                    }
                },
                _ => false,
            };
            if refused {
                let _ = reply.send(Err(ApiError::conflict(format!("the VM is fenced: {why}"))));
                return None;
            }
        }
        let answer = match request {
            ApiRequest::Info => Ok(Response::Info(self.info())),
            ApiRequest::Pause => {
                if self.state == VmRunState::Paused {
                    Err(ApiError::conflict("the VM is already paused"))
                } else {
                    match self.pause_vcpus() {
                        Ok(()) => {
                            tracing::info!("VM paused");
                            Ok(Response::Done)
                        }
                        Err(e) => {
                            if let Err(r) = self.resume_vcpus() {
                                tracing::error!("the VM cannot resume and stays paused: {}", error_chain(&r));
                            }
                            Err(ApiError::internal(format!("cannot pause the VM: {e}")))
                        }
                    }
                }
            }
            ApiRequest::Resume => {
                if self.state == VmRunState::Running {
                    Err(ApiError::conflict("the VM is not paused"))
                } else {
                    match self.resume_vcpus() {
                        Ok(()) => {
                            tracing::info!("VM resumed");
                            Ok(Response::Done)
                        }
                        Err(e) => Err(ApiError::internal(format!(
                            "cannot resume the VM; it stays paused: {}",
                            error_chain(&e)
                        ))),
                    }
                }
            }
            ApiRequest::Snapshot(req) => match self.snapshot(&req) {
                Ok(report) => {
                    let _ = reply.send(Ok(Response::Snapshot(report)));
                    return req.stop.then_some(Ok(RunOutcome::Suspended));
                }
                Err(e) => {
                    use crate::persist::SnapshotError as S;
                    let msg = error_chain(&e);
                    Err(match e {
                        S::NotEmpty(_) | S::NotADirectory(_) | S::Unwritable { .. } => {
                            ApiError::bad_request(msg)
                        }
                        _ => ApiError::internal(msg),
                    })
                }
            },
            ApiRequest::Migrate(req) => match self.start_migration(req, reply) {
                Ok(()) => return None,
                Err((e, reply)) => {
                    let _ = reply.send(Err(e));
                    return None;
                }
            },
            ApiRequest::MigrateCancel => self.cancel_migration().map(|()| Response::Done),
            ApiRequest::Receive(_) => {
                Err(ApiError::conflict("a VM runs here: this VMM receives no more migrations"))
            }
            ApiRequest::MigrationStatus => self
                .migration_status()
                .map(|m| Response::MigrationStatus(Box::new(m)))
                .ok_or_else(|| ApiError::not_found("no migration has been started on this VMM")),
        };
        let _ = reply.send(answer);
        None
    }

    /// On a migration destination, as soon as the VM is this host's (the commit received,
    /// the VM's lock and its disks' held) and before its vCPUs start: one round of RARP
    /// frames, so the switches already send the VM's traffic here while the vCPUs are being
    /// started (the frames wait in the tap until the guest reads them). Measured on the
    /// namespaced test network of a loaded machine, the first round otherwise left 20-37 ms
    /// after the lock was taken, 13-20 ms after the vCPUs ran (the announcing thread starts
    /// after them); with this round it leaves 4-5 ms before they run. The usual rounds
    /// follow once the guest runs ([`Self::announce_nics`]).
    /// Not earlier: until the lock is held here the source may still take the VM back.
    pub(crate) fn announce_at_switchover(&self, id: &str) {
        for n in self.devices.virtio.nics() {
            match n.announce() {
                Ok(()) => tracing::info!(
                    "migration {id}: sent a RARP frame from {} on tap {} at the switchover, before the vCPUs start",
                    n.mac(),
                    n.tap_name()
                ),
                Err(e) => {
                    tracing::warn!("migration {id}: cannot announce {} on {}: {e}", n.mac(), n.tap_name())
                }
            }
        }
    }

    /// After a migration: tells the switches where each NIC's MAC is now (RARP, several
    /// rounds, as vMotion and QEMU do), from a thread so nothing waits for it.
    fn announce_nics(&self, id: &str) {
        let nics = self.devices.virtio.nics();
        if nics.is_empty() {
            return;
        }
        let id = id.to_owned();
        let spawned = std::thread::Builder::new().name("announce".into()).spawn(move || {
            let mut sent = 0;
            for delay in ferry_net::rarp::schedule() {
                std::thread::sleep(delay);
                for n in &nics {
                    match n.announce() {
                        Ok(()) => sent += 1,
                        Err(e) => tracing::warn!(
                            "migration {id}: cannot announce {} on {}: {e}",
                            n.mac(),
                            n.tap_name()
                        ),
                    }
                }
            }
            for n in &nics {
                tracing::info!(
                    "migration {id}: announced {} on tap {} ({sent} RARP frames in all)",
                    n.mac(),
                    n.tap_name()
                );
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start announcing the NICs after the migration: {e}");
        }
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            state: match self.state {
                _ if self.fenced.is_some() => ApiRunState::Fenced,
                VmRunState::Running => ApiRunState::Running,
                VmRunState::Paused => ApiRunState::Paused,
            },
            memory_bytes: self.description.memory,
            vcpus: self.description.vcpus,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            kernel: self.description.kernel.clone(),
            pid: std::process::id(),
            restored_from: self.restored_from.clone(),
            home: Some(self.home.dir().to_owned()),
            migration: self.migration_info(),
            devices: self.devices.virtio.info(),
            receiving: None,
            fenced: self.fenced.clone(),
            cpu_features: self.cpu_features(),
            cpu_model: Some(self.cpu_model()),
        }
    }

    /// Moves console input into the UART; false once stdin is closed.
    fn forward_stdin(&self) -> bool {
        let mut serial = self.devices.serial.lock().unwrap_or_else(|p| p.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            return true;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: reading at most `want` <= buf.len() bytes into `buf`.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), want) };
        if n <= 0 {
            return false;
        }
        let _ = serial.enqueue_input(&buf[..n as usize]);
        true
    }

    fn shutdown(&mut self) {
        let started = monotonic_ns();
        for v in self.vcpus.drain(..) {
            v.stop();
        }
        self.record_stop();
        // A fence's stop record goes to runs.log from a thread: give it a moment to land
        // (the datastore may be back), without hanging on it if it is not.
        if let Some(written) = self.fence_record.take() {
            let _ = written.recv_timeout(std::time::Duration::from_secs(2));
        }
        tracing::debug!("vCPUs stopped in {} us", (monotonic_ns() - started) / 1000);
    }
}
