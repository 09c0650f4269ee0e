//! The source side of a live migration, on its own thread.
//!
//! ```text
//! Setup ──> PreCopy ──> StopAndCopy ──> Restoring ──> Committed ──> Completed
//!   │          │             │              │             │
//!   └──────────┴─────────────┴──────────────┴──> Failed / Cancelled (VM resumes here)
//!                                                         └──> Failed (lock taken back,
//!                                                              VM resumes here) or Lost
//! ```
//!
//! Until `Committed` the source holds the VM's lock, so the destination cannot run the VM
//! whatever happens to the connection, and any failure resumes the VM here. At the commit
//! (on the VMM thread, where a cancel is also decided) the source releases the lock; from
//! then on only the lock decides: if the destination does not confirm activation, the
//! source takes the lock back, and resumes the VM only if the destination never held it
//! for this migration.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::events::Events;
use ferry_api::{EventBody, MigrateRequest, MigrationPhase, MigrationReport, PassReport, Side, VmLocation};
use ferry_migration::auth::{self, Key, Role};
use ferry_migration::convergence::{self, Action, Convergence, Decision, Limits, PassMeasure};
use ferry_migration::delta::SentCache;
use ferry_migration::outcome::{Check, ReasonCode};
use ferry_migration::protocol::{
    self as wire, parse_json, read_frame_into, to_json, write_frame, Accept, Activated, Challenge,
    ChallengeResponse, Commit, Hello, Kind, RestoreResult, PAGE_SIZE, PROTOCOL_VERSION,
};

use super::link::{self, In, Out, Sockets};
use super::pass;
use super::Reclaimed;
use super::{
    error_chain, memory_crcs_unless, update, verify_chunk, Call, CommitAnswer, Error, MigrationConfig,
    Status, VmmPort,
};
use crate::dirty::{DirtyLog, DirtyRegion};
use crate::memory::GuestMemory;

/// How long to wait for the destination to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
// Every other wait on the destination is bounded by the migration's stall bound
// (`MigrationConfig::stall_timeout`; `link` says how): a write it takes nothing of, a
// PassAck, Accept, Challenge or Activated, and RestoreResult
// (`MigrationConfig::restore_wait`: the bound, plus 1 s per GiB with --verify).

/// Everything the migration thread needs.
pub(crate) struct Source {
    pub id: String,
    pub addr: String,
    pub req: MigrateRequest,
    pub key: Key,
    pub config: MigrationConfig,
    pub memory: GuestMemory,
    pub dirty: DirtyLog,
    pub port: VmmPort,
    pub status: Status,
    pub cancel: Arc<AtomicBool>,
    /// Every socket opened is registered here, for a cancel to shut it down.
    pub sockets: Sockets,
    /// Phase changes and passes go here for `GET /vm/events` (never blocks).
    pub events: Arc<Events>,
    /// The VM's vCPU throttle, for auto-converge (cleared when the migration ends).
    pub throttle: Arc<crate::vcpu::Throttle>,
}

/// Counters kept while the migration runs, for the report.
#[derive(Default)]
struct Tally {
    setup_ms: f64,
    bytes: u64,
    pages_sent: u64,
    zero_pages: u64,
    passes: Vec<PassReport>,
    downtime_ms: f64,
    verified: bool,
    stop_reason: String,
    /// The throttle and downtime limit the next pass runs under.
    throttle: u8,
    downtime_limit_ms: u64,
    policy_steps: Vec<ferry_api::PolicyStep>,
}

/// How a migration ended, for its report.
struct Ended {
    status: MigrationPhase,
    location: VmLocation,
    reason: String,
    code: ReasonCode,
}

struct Run<'a> {
    src: &'a Source,
    stream: Option<TcpStream>,
    /// The extra page streams (stream 1 onwards), open during pre-copy.
    extra: Vec<TcpStream>,
    phase: MigrationPhase,
    started: Instant,
    tally: Tally,
    logging: bool,
    paused: bool,
    paused_at: Option<Instant>,
    /// The dirty set taken after the last pre-copy pass: sent with the stop-and-copy.
    last_dirty: Option<Vec<DirtyRegion>>,
    /// Pages as the destination holds them, when both sides have the `delta` feature and
    /// the request gives it a cache: passes after the first send deltas against it.
    delta: Option<std::sync::Mutex<SentCache>>,
    /// Whether the cache holds pages for deltas (else it only compresses).
    delta_on: bool,
    /// Whether pages are compressed (then pass 1 goes through the cache too, copied).
    compress: bool,
}

impl Source {
    /// Runs the migration to its end and hands the report to the VMM thread.
    pub fn run(self) {
        let mut run = Run {
            src: &self,
            stream: None,
            extra: Vec::new(),
            phase: MigrationPhase::Setup,
            started: Instant::now(),
            tally: Tally::default(),
            logging: false,
            paused: false,
            paused_at: None,
            last_dirty: None,
            delta: None,
            delta_on: false,
            compress: false,
        };
        let result = run.migrate().map_err(|e| run.classify(e));
        let report = run.finish(result);
        self.port.finish(report);
    }
}

impl Run<'_> {
    fn id(&self) -> &str {
        &self.src.id
    }

    /// Moves to `next`, checking the transition is one the state machine has.
    fn enter(&mut self, next: MigrationPhase) {
        use MigrationPhase::*;
        let ok = matches!(
            (self.phase, next),
            (Setup, PreCopy)
                | (PreCopy, StopAndCopy)
                | (StopAndCopy, Restoring)
                | (Restoring, Committed)
                | (Committed, Completed)
                | (Setup | PreCopy | StopAndCopy | Restoring | Committed, Failed | Cancelled | Lost)
        );
        debug_assert!(ok, "migration state {:?} -> {next:?}", self.phase);
        if !ok {
            tracing::error!("migration {}: invalid state change {:?} -> {next:?}", self.id(), self.phase);
        }
        self.phase = next;
        update(&self.src.status, |s| s.phase = next);
        // The end phases are announced by the VMM thread, with the reason and the report.
        if !matches!(next, Completed | Failed | Cancelled | Lost) {
            self.src.events.push(&self.src.id, Side::Source, EventBody::Phase { phase: next, reason: None });
        }
    }

    fn stream(&mut self) -> &mut TcpStream {
        match &mut self.stream {
            Some(s) => s,
            None => unreachable!("the stream exists from the handshake on"),
        }
    }

    /// The stall bound.
    fn stall(&self) -> Duration {
        self.src.config.stall_timeout()
    }

    /// What an error ends the migration as: a cancel shuts the sockets down, so whatever
    /// failed after it is the cancel (decided by the flag, never by the error's text); a
    /// stall inside an I/O error is a stall.
    fn classify(&self, e: Error) -> Error {
        if self.src.cancel.load(Ordering::SeqCst) && self.phase != MigrationPhase::Committed {
            return Error::Cancelled;
        }
        link::typed(e)
    }

    fn check_cancel(&self) -> Result<(), Error> {
        if self.src.cancel.load(Ordering::SeqCst) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    fn send<T: serde::Serialize>(&mut self, kind: Kind, msg: &T) -> Result<(), Error> {
        let payload = to_json(msg);
        self.send_raw(kind, &payload)
    }

    fn send_raw(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        let (stall, cancel) = (self.stall(), &*self.src.cancel);
        let stream = self.stream.as_ref().ok_or(Error::Vmm("send (not connected)".into()))?;
        let waiting = format!("sending {kind:?}");
        write_frame(&mut Out::new(stream, stall, cancel, &waiting), kind, payload)?;
        self.tally.bytes += (wire::HEADER_LEN + payload.len()) as u64;
        Ok(())
    }

    fn recv<T: for<'de> serde::Deserialize<'de>>(
        &mut self,
        want: Kind,
        expected: &'static str,
        timeout: Duration,
    ) -> Result<T, Error> {
        let cancel = &*self.src.cancel;
        let stream = self.stream.as_ref().ok_or(Error::Vmm("receive (not connected)".into()))?;
        let mut payload = Vec::new();
        let waiting = format!("waiting for {expected}");
        let got = read_frame_into(&mut In::new(stream, timeout, cancel, &waiting), &mut payload)
            .map_err(|e| link::typed(e.into()))?;
        Ok(parse_json(got, &payload, want, expected)?)
    }

    /// After a failed write: the peer may have said why before closing.
    fn peer_reason(&mut self, e: Error) -> Error {
        let e = link::typed(e);
        match &self.stream {
            Some(stream) => pass::peer_reason(stream, e),
            None => e,
        }
    }

    fn migrate(&mut self) -> Result<(), Error> {
        self.setup()?;
        self.tally.setup_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.enter(MigrationPhase::PreCopy);
        self.src.dirty.start()?;
        self.logging = true;
        self.precopy().map_err(|e| self.peer_reason(e))?;
        self.stop_and_copy().map_err(|e| self.peer_reason(e))?;
        self.switchover()
    }

    /// Connect, authenticate both ways, pre-migration checks.
    fn setup(&mut self) -> Result<(), Error> {
        let src = self.src;
        let addrs: Vec<_> = src
            .addr
            .to_socket_addrs()
            .map_err(|source| Error::Connect { addr: src.addr.clone(), source })?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address");
        let mut stream = None;
        for a in &addrs {
            match link::connect(a, CONNECT_TIMEOUT, &src.cancel) {
                Ok(s) => {
                    stream = Some((s, *a));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let (stream, peer) = stream.ok_or(Error::Connect { addr: src.addr.clone(), source: last })?;
        src.sockets.register(&stream).map_err(wire::Error::Io)?;
        configure(&stream)?;
        self.stream = Some(stream);
        tracing::info!("migration {}: connected to {}", src.id, src.addr);

        let stall = self.stall();
        let (written, features) = hello(self.stream(), &src.key, &src.id, 0, stall, &src.cancel)?;
        self.tally.bytes += written;
        let delta = features.iter().any(|f| f == "delta") && src.req.delta_cache_mib > 0;
        self.compress = features.iter().any(|f| f == "lz4") && src.req.wants_compression();
        if delta || self.compress {
            let cache = if delta { src.req.delta_cache_mib << 20 } else { 0 };
            self.delta = Some(std::sync::Mutex::new(SentCache::new(cache, self.compress)));
        }
        self.delta_on = delta;
        self.send(Kind::Config, &src.config)?;
        match self.recv::<Accept>(Kind::Accept, "Accept", self.stall()) {
            Ok(a) => {
                tracing::info!(
                    "migration {}: destination (Ferry {}) accepted the VM after its checks",
                    src.id,
                    a.ferry_version
                );
                for k in 1..src.config.streams {
                    let s = self.join_stream(peer, k)?;
                    self.extra.push(s);
                }
                if src.config.streams > 1 {
                    tracing::info!("migration {}: {} streams open", src.id, src.config.streams);
                }
                Ok(())
            }
            // An Abort in answer to the Config: its code says why; an older destination
            // sends none, and an Abort here is then a refusal of unknown cause.
            Err(Error::Protocol(wire::Error::PeerAborted { reason, code })) => match code {
                ReasonCode::AuthFailed => {
                    Err(Error::Auth(format!("the destination rejected this source's key: {reason}")))
                }
                code => Err(Error::Refused {
                    reason,
                    code: code.or(ReasonCode::RefusedByDestination(Check::Unknown)),
                }),
            },
            Err(e) => Err(e),
        }
    }

    /// Opens extra stream `k` to the destination and proves the key over it (the
    /// destination proves it first, as on the first stream).
    fn join_stream(&mut self, peer: SocketAddr, k: u32) -> Result<TcpStream, Error> {
        let src = self.src;
        let stream = link::connect(&peer, CONNECT_TIMEOUT, &src.cancel)
            .map_err(|source| Error::Connect { addr: src.addr.clone(), source })?;
        src.sockets.register(&stream).map_err(wire::Error::Io)?;
        configure(&stream)?;
        self.tally.bytes += hello(&stream, &src.key, &src.id, k, self.stall(), &src.cancel)?.0;
        Ok(stream)
    }

    /// Sends one pass of `pages` (guest-physical address, known to be zero without reading
    /// it) over every open stream.
    fn send_pages(
        &mut self,
        pages: &mut (dyn Iterator<Item = (u64, bool)> + Send),
        total: u64,
        pass: u32,
        wait_ack: bool,
    ) -> Result<pass::Sent, Error> {
        let src = self.src;
        let control = self.stream.as_ref().ok_or(Error::Vmm("send pages (not connected)".into()))?;
        let streams: Vec<&TcpStream> = std::iter::once(control).chain(self.extra.iter()).collect();
        let counted = pass::Counted::default();
        let p = pass::Pass {
            id: &src.id,
            number: pass,
            mem: &src.memory,
            cancel: &src.cancel,
            cap: src.req.bandwidth_mib.saturating_mul(1 << 20),
            wait_ack,
            stall: self.stall(),
            counted: &counted,
            // Pass 1 goes from guest memory unread (zero-copy) unless pages are compressed;
            // later ones through the cache.
            delta: if pass > 1 || self.compress { self.delta.as_ref() } else { None },
        };
        let (started, before) = (self.started, self.tally.bytes);
        let pass_start = Instant::now();
        let mut progress = |sent: u64, bytes: u64| {
            let secs = pass_start.elapsed().as_secs_f64().max(1e-9);
            update(&src.status, |s| {
                s.pass = pass;
                s.pages_left = total.saturating_sub(sent);
                s.rate_mb_s = bytes as f64 / secs / 1e6;
                s.rate_mib_s = bytes as f64 / secs / (1 << 20) as f64;
                s.bytes_transferred = before + bytes;
                s.elapsed_ms = started.elapsed().as_millis() as u64;
            });
        };
        match p.send(&streams, pages, &mut progress) {
            Ok(sent) => {
                self.tally.bytes += sent.bytes;
                Ok(sent)
            }
            Err(e) => {
                // The pass did not end, but what it sent counts in the report.
                let (pages, zero) =
                    (counted.pages.load(Ordering::Relaxed), counted.zero.load(Ordering::Relaxed));
                self.tally.bytes += counted.bytes.load(Ordering::Relaxed);
                self.tally.pages_sent += pages - zero;
                self.tally.zero_pages += zero;
                Err(e)
            }
        }
    }

    /// Closes the extra streams once pre-copy is over (the stop-and-copy uses the first).
    fn close_extra_streams(&mut self) {
        for s in self.extra.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn record_pass(&mut self, pass: u32, sent: pass::Sent, ms: f64, dirtied: u64, stop: bool) -> PassMeasure {
        let pass::Sent { pages, zero, bytes, first_bytes } = sent;
        self.tally.pages_sent += pages - zero;
        self.tally.zero_pages += zero;
        self.tally.passes.push(PassReport {
            pass,
            pages,
            zero_pages: zero,
            bytes,
            ms,
            dirtied,
            stop_and_copy: stop,
            // The stop-and-copy runs with the vCPUs paused, whatever the throttle.
            throttle_percent: if stop { 0 } else { self.tally.throttle },
            downtime_limit_ms: self.tally.downtime_limit_ms,
        });
        // The bandwidth that predicts the downtime is the first stream's: the stop-and-copy
        // has only that one.
        PassMeasure { pass, pages, bytes: first_bytes, ms, dirtied, wire_bytes: bytes }
    }

    fn precopy(&mut self) -> Result<(), Error> {
        let limits = Limits {
            downtime_ms: self.src.req.downtime_ms,
            max_iterations: self.src.req.max_iterations,
            timeout: Duration::from_secs(self.src.req.timeout_s),
        };
        let mut convergence = Convergence::new(limits, self.src.req.policy, self.src.req.max_downtime_ms);
        self.tally.downtime_limit_ms = limits.downtime_ms;
        let regions: Vec<(u64, u64)> =
            self.src.config.memory_regions.iter().map(|r| (r.guest_addr, r.len)).collect();
        let total: u64 = regions.iter().map(|(_, l)| l / PAGE_SIZE as u64).sum();
        let mut pending: Option<Vec<DirtyRegion>> = None;
        for pass in 1u32.. {
            let t = Instant::now();
            let sent = match pending.take() {
                None => {
                    // Every page; those never populated go as zero markers unread.
                    let untouched = crate::memory::never_touched(&self.src.memory);
                    let mut all = regions.iter().enumerate().flat_map(|(r, &(start, len))| {
                        let map = untouched.get(r).and_then(Option::as_ref);
                        (0..len / PAGE_SIZE as u64).map(move |i| {
                            let zero = map.is_some_and(|m| m[(i / 64) as usize] & (1 << (i % 64)) != 0);
                            (start + i * PAGE_SIZE as u64, zero)
                        })
                    });
                    self.send_pages(&mut all, total, pass, true)?
                }
                Some(dirty) => {
                    let n = dirty.iter().map(DirtyRegion::count).sum();
                    let mut it = dirty.iter().flat_map(|r| r.pages()).map(|a| (a, false));
                    self.send_pages(&mut it, n, pass, true)?
                }
            };
            // Timed to the destination's acknowledgements: what arrived, not what was buffered.
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let dirty = self.src.dirty.take()?;
            let dirtied: u64 = dirty.iter().map(DirtyRegion::count).sum();
            let m = self.record_pass(pass, sent, ms, dirtied, false);
            let (decision, action) = convergence.after_pass(m, self.started.elapsed());
            if let Some(action) = action {
                self.policy_step(pass, action, &convergence);
            }
            let expected = convergence::expected_downtime(convergence.passes(), dirtied);
            let throttle = convergence.throttle();
            let (transferred, elapsed) = (self.tally.bytes, self.started.elapsed().as_millis() as u64);
            let rate_mib_s = if ms > 0.0 { sent.bytes as f64 / (1 << 20) as f64 / (ms / 1e3) } else { 0.0 };
            update(&self.src.status, |s| {
                s.pass = pass;
                s.pages_left = 0;
                s.pages_dirty = dirtied;
                s.expected_downtime_ms = expected;
                s.downtime_known = true;
                s.dirty_pages_per_s = if ms > 0.0 { dirtied as f64 / (ms / 1e3) } else { 0.0 };
                s.bytes_transferred = transferred;
                s.elapsed_ms = elapsed;
                s.throttle_percent = throttle;
            });
            self.src.events.push(
                &self.src.id,
                Side::Source,
                EventBody::Pass {
                    pass,
                    pages: m.pages,
                    bytes: sent.bytes,
                    ms,
                    dirtied,
                    rate_mib_s,
                    stop_and_copy: false,
                    expected_downtime_ms: Some(expected),
                    bytes_transferred: transferred,
                    throttle_percent: throttle,
                },
            );
            let line = format!(
                "migration {}: pre-copy pass {pass}: sent {} pages ({} bytes) in {:.1} ms at {:.0} MB/s; {dirtied} \
                 pages dirtied meanwhile",
                self.id(),
                m.pages,
                sent.bytes,
                ms,
                if ms > 0.0 { sent.bytes as f64 / ms / 1e3 } else { 0.0 },
            );
            match decision {
                Decision::Continue => tracing::info!("{line}"),
                Decision::StopAndCopy(reason) => {
                    tracing::info!("{line}; last pass: {reason}");
                    self.tally.stop_reason = reason;
                    self.last_dirty = Some(dirty);
                    return Ok(());
                }
                Decision::GiveUp(code, reason) => {
                    tracing::info!("{line}; giving up: {reason} (code {code})");
                    return Err(Error::GaveUp(code, reason));
                }
            }
            self.check_cancel()?;
            pending = Some(dirty);
        }
        Ok(())
    }

    /// Carries out what the convergence policy decided after `pass`.
    fn policy_step(&mut self, pass: u32, action: Action, c: &Convergence) {
        match action {
            Action::Throttle(p) => {
                self.src.throttle.set(p);
                tracing::info!(
                    "migration {}: pre-copy stalled after pass {pass}: auto-converge throttles the vCPUs by {p}%",
                    self.id()
                );
            }
            Action::DowntimeLimit(ms) => tracing::info!(
                "migration {}: pre-copy stalled after pass {pass}: the downtime limit is raised to {ms} ms (at most {} ms)",
                self.id(),
                self.src.req.max_downtime_ms.max(self.src.req.downtime_ms)
            ),
        }
        self.tally.throttle = c.throttle();
        self.tally.downtime_limit_ms = c.downtime_limit_ms();
        self.tally.policy_steps.push(ferry_api::PolicyStep {
            after_pass: pass,
            throttle_percent: c.throttle(),
            downtime_limit_ms: c.downtime_limit_ms(),
        });
    }

    fn stop_and_copy(&mut self) -> Result<(), Error> {
        self.check_cancel()?;
        self.close_extra_streams();
        self.enter(MigrationPhase::StopAndCopy);
        let paused_at = Instant::now();
        self.paused = true;
        let state = self
            .src
            .port
            .ask(Call::StopAndSave)
            .ok_or_else(|| Error::Vmm("answer (the VMM is shutting down)".into()))?
            .map_err(|e| Error::Vmm(format!("pause and save the VM: {e}")))?;
        // Final sync: everything dirtied up to the pause (the previous pass's set was
        // taken and not sent: it is part of this one).
        let mut dirty = self.src.dirty.take()?;
        if let Some(last) = self.pending_last_dirty() {
            merge(&mut dirty, &last);
        }
        let n: u64 = dirty.iter().map(DirtyRegion::count).sum();
        let pass = self.tally.passes.len() as u32 + 1;
        let t = Instant::now();
        let mut it = dirty.iter().flat_map(|r| r.pages()).map(|a| (a, false));
        let sent = self.send_pages(&mut it, n, pass, false)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        self.record_pass(pass, sent, ms, 0, true);
        self.src.events.push(
            &self.src.id,
            Side::Source,
            EventBody::Pass {
                pass,
                pages: sent.pages,
                bytes: sent.bytes,
                ms,
                dirtied: 0,
                rate_mib_s: if ms > 0.0 { sent.bytes as f64 / (1 << 20) as f64 / (ms / 1e3) } else { 0.0 },
                stop_and_copy: true,
                expected_downtime_ms: None,
                bytes_transferred: self.tally.bytes,
                throttle_percent: 0,
            },
        );
        let payload =
            serde_json::to_vec(&*state).map_err(|e| Error::Vmm(format!("serialise the state: {e}")))?;
        self.send_raw(Kind::State, &payload)?;
        if self.src.config.verify {
            let chunk = verify_chunk(self.src.config.description.memory);
            let crcs =
                memory_crcs_unless(&self.src.memory, chunk, &self.src.cancel).ok_or(Error::Cancelled)?;
            self.send(Kind::Verify, &wire::Verify { chunk_bytes: chunk, crcs })?;
        }
        tracing::info!(
            "migration {}: stop-and-copy: sent {} pages and {} bytes of state in {:.2} ms after the pause",
            self.id(),
            sent.pages,
            payload.len(),
            paused_at.elapsed().as_secs_f64() * 1e3
        );
        self.paused_at = Some(paused_at);
        Ok(())
    }

    fn switchover(&mut self) -> Result<(), Error> {
        self.enter(MigrationPhase::Restoring);
        // The stop-and-copy pass is acknowledged like the others; the state was sent
        // without waiting for it.
        if let Some(last) = self.tally.passes.last() {
            let (pass, pages) = (last.pass, last.pages);
            let (stall, cancel) = (self.stall(), &*self.src.cancel);
            pass::wait_ack(self.stream(), pass, pages, stall, cancel)?;
        }
        let wait = self.src.config.restore_wait();
        let result: RestoreResult = self.recv(Kind::RestoreResult, "RestoreResult", wait)?;
        if !result.ok {
            // An older destination sends no code: a failed restore, whatever its text says.
            let code = result.code.or(ReasonCode::RestoreFailed);
            return Err(Error::RestoreFailed { reason: result.reason, code });
        }
        self.tally.verified = self.src.config.verify;
        tracing::info!("migration {}: destination restored the VM (RESTORE_OK)", self.id());
        // The commit point: decided on the VMM thread, where a cancel is decided too.
        match self.src.port.ask(Call::Commit) {
            None => return Err(Error::Vmm("answer (the VMM is shutting down)".into())),
            Some(CommitAnswer::Cancelled) => return Err(Error::Cancelled),
            Some(CommitAnswer::Committed) => {}
        }
        self.enter(MigrationPhase::Committed);
        self.send(Kind::Commit, &Commit {})?;
        let activated: Activated = self.recv(Kind::Activated, "Activated", self.stall())?;
        let paused_for = self.paused_at.map(|t| t.elapsed().as_secs_f64() * 1e3).unwrap_or(0.0);
        self.tally.downtime_ms = paused_for;
        tracing::info!(
            "migration {}: the VM runs on the destination ({:.3} ms from commit to vCPUs running there); \
             downtime {:.2} ms",
            self.id(),
            activated.activation_ns as f64 / 1e6,
            paused_for
        );
        self.enter(MigrationPhase::Completed);
        Ok(())
    }

    /// The dirty set taken after the last pre-copy pass, kept for the stop-and-copy.
    fn pending_last_dirty(&mut self) -> Option<Vec<DirtyRegion>> {
        self.last_dirty.take()
    }

    /// Turns the result into the report, rolling back first if needed.
    fn finish(&mut self, result: Result<(), Error>) -> MigrationReport {
        // However it ended, the guest runs at full speed again (here, after a rollback).
        self.src.throttle.set(0);
        let Ended { status, location, reason, code } = match result {
            Ok(()) => Ended {
                status: MigrationPhase::Completed,
                location: VmLocation::Destination,
                reason: self.tally.stop_reason.clone(),
                code: ReasonCode::Completed,
            },
            Err(e) => self.roll_back(e),
        };
        tracing::info!("migration {}: ended {code} ({status:?}, the VM runs on {location:?})", self.id());
        if status != MigrationPhase::Completed {
            self.enter(status);
        }
        let total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let throughput = self
            .tally
            .passes
            .first()
            .filter(|p| p.ms > 0.0)
            .map(|p| p.bytes as f64 / p.ms / 1e3)
            .unwrap_or(0.0);
        update(&self.src.status, |s| {
            s.elapsed_ms = total_ms as u64;
            s.reason = reason.clone();
            s.reason_code = code;
            s.throttle_percent = 0;
        });
        let (delta_pages, delta_bytes, compressed_pages, compressed_bytes) = match &self.delta {
            Some(c) => {
                let c = c.lock().unwrap_or_else(|p| p.into_inner());
                (c.delta_pages, c.delta_bytes, c.compressed_pages, c.compressed_bytes)
            }
            None => (0, 0, 0, 0),
        };
        let t = &self.tally;
        MigrationReport {
            migration_id: self.src.id.clone(),
            status,
            vm_running_on: location,
            reason,
            reason_code: code,
            destination: self.src.req.to.clone(),
            memory_bytes: self.src.config.description.memory,
            total_ms,
            setup_ms: t.setup_ms,
            downtime_ms: if status == MigrationPhase::Completed { t.downtime_ms } else { 0.0 },
            bytes_transferred: t.bytes,
            pages_sent: t.pages_sent,
            zero_pages: t.zero_pages,
            throughput_mb_s: throughput,
            verified: t.verified && status == MigrationPhase::Completed,
            streams: self.src.config.streams,
            passes: t.passes.clone(),
            policy: Some(self.src.req.policy),
            policy_steps: t.policy_steps.clone(),
            delta_cache_mib: if self.delta_on { self.src.req.delta_cache_mib } else { 0 },
            delta_pages,
            delta_bytes,
            compressed: self.compress,
            compressed_pages,
            compressed_bytes,
        }
    }

    /// After a failure: make the VM run here again unless the destination has it.
    fn roll_back(&mut self, e: Error) -> Ended {
        let mut reason = error_chain(&e);
        let code = e.code();
        let cancelled = matches!(e, Error::Cancelled);
        let ended = |status, location, reason, code| Ended { status, location, reason, code };
        tracing::warn!("migration {}: failed in {:?}: {reason} (code {code})", self.id(), self.phase);
        // Tell the destination, unless it is the one that ended it.
        if self.stream.is_some() && !matches!(e, Error::Protocol(_)) {
            let abort = wire::Abort::new(reason.clone(), code);
            // Best effort, briefly: a stalled peer may not take it.
            let _ = self.stream().set_write_timeout(Some(link::SLICE));
            let _ = write_frame(self.stream(), Kind::Abort, &to_json(&abort));
        }
        if self.phase == MigrationPhase::Committed {
            // The lock and the generation decide. If the destination ran the VM (it raised
            // the generation), the state here is stale: never resume it, even if the
            // destination has died since.
            match self.src.port.ask(Call::Reclaim) {
                Some(Reclaimed::Ours) => {
                    reason.push_str("; the destination never took the VM over, so the source took it back");
                }
                Some(Reclaimed::RanOn { current, state, last_holder }) => {
                    let holder = last_holder.map(|h| format!(" ({h})")).unwrap_or_default();
                    let why = format!(
                        "{reason}; the destination ran the VM{holder} (generation {} after the {} sent) and then \
                         failed: the VM runs nowhere; start it again from its home or its last checkpoint",
                        current.map(|g| g.to_string()).unwrap_or_else(|| "unknown".into()),
                        state.map(|g| g.to_string()).unwrap_or_else(|| "unknown".into()),
                    );
                    tracing::error!("migration {}: {why}", self.id());
                    self.stop_logging();
                    return ended(
                        MigrationPhase::Lost,
                        VmLocation::Nowhere,
                        why,
                        ReasonCode::DestinationDied,
                    );
                }
                Some(Reclaimed::DiskHeld(why)) => {
                    let why = format!("{reason}; the source took the VM's lock back but not its disks ({why}): the VM runs nowhere");
                    tracing::error!("migration {}: {why}", self.id());
                    self.stop_logging();
                    return ended(MigrationPhase::Lost, VmLocation::Nowhere, why, ReasonCode::LockConflict);
                }
                Some(Reclaimed::Held(held)) => {
                    // The destination holds the lock: it has the VM.
                    tracing::info!(
                        "migration {}: no activation message, but the destination holds the lock ({held}): \
                         the VM runs there",
                        self.id()
                    );
                    self.stop_logging();
                    return ended(
                        MigrationPhase::Completed,
                        VmLocation::Destination,
                        format!("{reason}; the destination holds the VM's lock, so it runs there"),
                        ReasonCode::Completed,
                    );
                }
                None => {
                    return ended(
                        MigrationPhase::Lost,
                        VmLocation::Nowhere,
                        format!("{reason}; the VMM is ending"),
                        ReasonCode::Lost,
                    );
                }
            }
        }
        self.stop_logging();
        if self.paused {
            match self.src.port.ask(Call::Resume) {
                Some(Ok(())) => self.paused = false,
                Some(Err(why)) => {
                    reason.push_str(&format!("; the VM stays paused on the source: {why}"));
                    tracing::error!("migration {}: the VM cannot resume on the source: {why}", self.id());
                }
                None => reason.push_str("; the VMM is ending"),
            }
        }
        tracing::info!("migration {}: the VM runs on the source", self.id());
        let status = if cancelled { MigrationPhase::Cancelled } else { MigrationPhase::Failed };
        ended(status, VmLocation::Source, reason, code)
    }

    fn stop_logging(&mut self) {
        if self.logging {
            if let Err(e) = self.src.dirty.stop() {
                tracing::warn!("migration {}: cannot stop dirty logging: {e}", self.id());
            }
            self.logging = false;
        }
    }
}

/// Opens stream `k` of migration `id`: Hello, the destination's proof of the key (checked
/// before anything else is sent), this side's proof. Returns the bytes written and the
/// features the destination accepted.
fn hello(
    stream: &TcpStream,
    key: &Key,
    id: &str,
    k: u32,
    stall: Duration,
    cancel: &AtomicBool,
) -> Result<(u64, Vec<String>), Error> {
    let name = wire::stream_id(id, k);
    let my_nonce = auth::nonce()?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        migration_id: id.to_string(),
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        nonce: auth::hex(&my_nonce),
        stream: k,
        role: wire::StreamRole::Pages,
        features: wire::FEATURES.iter().map(|f| f.to_string()).collect(),
    };
    let mut written = 0u64;
    let mut send = |kind: Kind, payload: Vec<u8>| -> Result<(), Error> {
        let waiting = format!("sending {kind:?}");
        write_frame(&mut Out::new(stream, stall, cancel, &waiting), kind, &payload)?;
        written += (wire::HEADER_LEN + payload.len()) as u64;
        Ok(())
    };
    send(Kind::Hello, to_json(&hello))?;
    let mut payload = Vec::new();
    let got = read_frame_into(&mut In::new(stream, stall, cancel, "waiting for Challenge"), &mut payload)
        .map_err(|e| link::typed(e.into()))?;
    let challenge: Challenge = parse_json(got, &payload, Kind::Challenge, "Challenge")?;
    if !key.check(Role::Receiver, &name, &my_nonce, &challenge.proof) {
        let abort = wire::Abort::new("authentication failed", ReasonCode::AuthFailed);
        let _ = send(Kind::Abort, to_json(&abort));
        let which = if k == 0 { String::new() } else { format!(" (stream {k})") };
        return Err(Error::Auth(format!("the destination does not know the migration key{which}")));
    }
    let their_nonce = auth::unhex(&challenge.nonce)
        .ok_or_else(|| Error::Auth("the destination sent a bad nonce".into()))?;
    let proof = key.prove(Role::Sender, &name, &their_nonce);
    send(Kind::ChallengeResponse, to_json(&ChallengeResponse { proof }))?;
    if k == 0 {
        tracing::info!("migration {id}: features agreed with the destination: {:?}", challenge.features);
        if !challenge.features.iter().any(|f| f == "generation") {
            tracing::warn!(
                "migration {id}: the destination does not check the VM's generation (an older Ferry): it cannot \
                 refuse a stale copy of the VM after a lost commit; upgrade it"
            );
        }
    }
    Ok((written, challenge.features))
}

/// Socket options of every stream: no Nagle delay, big buffers, reads and writes that
/// return every [`link::SLICE`] for the stall and cancel checks (`link::In`, `link::Out`).
fn configure(stream: &TcpStream) -> Result<(), Error> {
    let io = |e| Error::Protocol(wire::Error::Io(e));
    stream.set_nodelay(true).map_err(io)?;
    super::size_socket_buffer(stream, libc::SO_SNDBUFFORCE);
    stream.set_write_timeout(Some(link::SLICE)).map_err(io)?;
    stream.set_read_timeout(Some(link::SLICE)).map_err(io)?;
    Ok(())
}

/// ORs `extra` into `into` (same regions).
fn merge(into: &mut [DirtyRegion], extra: &[DirtyRegion]) {
    for (a, b) in into.iter_mut().zip(extra) {
        for (x, y) in a.bits.iter_mut().zip(&b.bits) {
            *x |= y;
        }
    }
}
