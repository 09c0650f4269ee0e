//! vCPU threads.
//!
//! Each vCPU runs `KVM_RUN` in a thread of its own and handles the exits KVM hands to
//! user space: port I/O goes to the [`Bus`], anything that ends the VM (power-off, a
//! triple fault, an emulation failure) is reported once through the [`ExitNotifier`].
//!
//! A vCPU's lifecycle is an explicit state machine driven by requests from the VMM
//! thread: `Running -> Paused -> Running`, and any state `-> Stopped`. A request kicks
//! the thread out of `KVM_RUN` with a signal whose handler sets `kvm_run.immediate_exit`,
//! so a kick that lands just before the thread enters the kernel is not lost.
//!
//! A [`Throttle`] (auto-converge during a migration) takes a share of each vCPU's time
//! away: a throttled thread arms a one-shot timer that sends it the kick signal after
//! [`THROTTLE_SLICE`] in the guest, then sleeps `slice * p / (100 - p)` outside `KVM_RUN`
//! (a pause or stop request ends the sleep at once).

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use ferry_devices::Bus;

use crate::memory::GuestMemory;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (i8042 reset line or a KVM shutdown system event).
    PowerOff,
    /// The guest failed in a way that stops the VM.
    Fault(GuestFault),
}

/// A guest failure reported by KVM.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestFault {
    /// KVM could not emulate an instruction.
    #[error("KVM could not emulate the instruction of vCPU {vcpu} at RIP {rip:#x} (bytes at RIP: {}) (KVM internal error, suberror {suberror})", hex(bytes))]
    EmulationFailure {
        /// vCPU index.
        vcpu: u8,
        /// KVM's suberror code (1 = emulation failure).
        suberror: u32,
        /// Guest instruction pointer.
        rip: u64,
        /// Up to 16 bytes at RIP, if they could be read.
        bytes: Vec<u8>,
    },
    /// The guest triple-faulted.
    #[error(
        "vCPU {vcpu} triple-faulted (the guest crashed or reset) at RIP {rip:#x} (bytes at RIP: {})",
        hex(bytes)
    )]
    TripleFault {
        /// vCPU index.
        vcpu: u8,
        /// Guest instruction pointer.
        rip: u64,
        /// Up to 16 bytes at RIP.
        bytes: Vec<u8>,
    },
    /// KVM failed to enter the guest.
    #[error("KVM failed to enter vCPU {vcpu} (hardware entry failure reason {reason:#x})")]
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// Hardware reason.
        reason: u64,
    },
    /// The guest reported a crash (e.g. a pvpanic-like system event).
    #[error("vCPU {vcpu} reported a guest crash")]
    Crash {
        /// vCPU index.
        vcpu: u8,
    },
    /// An exit Ferry does not handle.
    #[error("vCPU {vcpu} stopped with an unexpected KVM exit: {what}")]
    Unexpected {
        /// vCPU index.
        vcpu: u8,
        /// The exit.
        what: String,
    },
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed on vCPU {vcpu}: {message}")]
    RunFailed {
        /// vCPU index.
        vcpu: u8,
        /// The error.
        message: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "unreadable".to_string();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Records the first reason the VM stopped and wakes the VMM thread.
#[derive(Debug)]
pub struct ExitNotifier {
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
}

impl ExitNotifier {
    /// A notifier signalling `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self { reason: Mutex::new(None), evt }
    }

    /// Records `reason` unless one was recorded already, and wakes the VMM thread.
    pub fn notify(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the VMM thread: {e}");
        }
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The eventfd the VMM thread waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What the VMM asks of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Run the guest.
    Run,
    /// Leave `KVM_RUN` and wait.
    Pause,
    /// Leave `KVM_RUN` and end the thread.
    Stop,
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Created, not yet running.
    Created,
    /// In or around `KVM_RUN`.
    Running,
    /// Waiting for a request, outside `KVM_RUN`.
    Paused,
    /// The thread has ended.
    Stopped,
}

impl RunState {
    /// Whether the vCPU may move from `self` to `next`.
    pub fn can_move_to(self, next: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, next),
            (Created, Running) | (Created, Paused) | (Running, Paused) | (Paused, Running) | (_, Stopped)
        ) && self != Stopped
    }
}

#[derive(Debug)]
struct ControlState {
    request: Request,
    state: RunState,
}

/// The shared control block of one vCPU thread.
#[derive(Debug)]
struct Control {
    inner: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU
            // thread before it first runs and cleared before the VcpuFd is dropped.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// The signal that kicks vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// How long a throttled vCPU runs between its sleeps.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// The share of every vCPU's time taken away, percent (0: none; at most 99). One per VM,
/// shared by its vCPU threads; a migration's auto-converge sets it and clears it when the
/// migration ends however it ends.
#[derive(Debug, Default)]
pub struct Throttle {
    percent: AtomicU8,
}

impl Throttle {
    /// Sets the throttle, held to 0-99%.
    pub fn set(&self, percent: u8) {
        self.percent.store(percent.min(99), Ordering::Relaxed);
    }

    /// The throttle now.
    pub fn get(&self) -> u8 {
        self.percent.load(Ordering::Relaxed)
    }

    /// How long a vCPU sleeps after each slice at `percent`.
    pub fn sleep_for(percent: u8) -> Duration {
        let p = u32::from(percent.min(99));
        THROTTLE_SLICE * p / (100 - p)
    }
}

/// A POSIX timer that sends this thread the kick signal once, `THROTTLE_SLICE` after it is
/// armed: what takes a throttled vCPU out of the guest when its slice is up.
struct SliceTimer(libc::timer_t);

impl SliceTimer {
    /// A timer aimed at the calling thread.
    fn for_this_thread() -> Result<Self, std::io::Error> {
        /// `SIGEV_THREAD_ID` (Linux): deliver to the thread `sigev_notify_thread_id`.
        const SIGEV_THREAD_ID: libc::c_int = 4;
        // SAFETY: an all-zero sigevent is a valid value of this plain C struct.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are valid for the call; the kernel fills `id`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(id))
    }

    /// Fires once after `after` (zero disarms it).
    fn arm(&self, after: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: the timer id is live (deleted only on drop) and `spec` is valid.
        unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) };
    }
}

impl Drop for SliceTimer {
    fn drop(&mut self) {
        // SAFETY: the id came from timer_create and is deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
    });
    result
}

/// Pauses one vCPU from any thread: the request is set and the thread kicked out of
/// `KVM_RUN`, as [`VcpuHandle::request`] does, without the handle.
#[derive(Clone)]
pub struct VcpuPauser {
    control: Arc<Control>,
    thread: libc::pthread_t,
}

impl std::fmt::Debug for VcpuPauser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuPauser").finish_non_exhaustive()
    }
}

impl VcpuPauser {
    /// Asks the vCPU to pause (it stays paused until the VMM thread asks it to run).
    pub fn pause(&self) {
        let mut c = self.control.lock();
        // A thread that has not reported Stopped (under this lock) has not returned, so
        // it has not been joined and its pthread_t is valid while the lock is held.
        if c.state == RunState::Stopped || c.request == Request::Stop {
            return;
        }
        c.request = Request::Pause;
        self.control.changed.notify_all();
        // SAFETY: the thread is alive and not joined (above); the kick signal's handler
        // was installed before the thread was spawned.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

/// The moment (`CLOCK_MONOTONIC` ns) after which no vCPU may enter the guest, because the
/// VM's lease may no longer be this VMM's (see `crate::lease`); 0: no such bound (no lease).
/// Checked by every vCPU before every entry: a VMM frozen past it (the whole process
/// stopped) pauses its vCPUs when it thaws, before they run one more guest instruction.
pub static RUN_DEADLINE_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether the lease's deadline has passed.
fn past_run_deadline() -> bool {
    let deadline = RUN_DEADLINE_NS.load(std::sync::atomic::Ordering::SeqCst);
    deadline != 0 && ferry_devices::boot_timer::monotonic_ns() >= deadline
}

/// What a vCPU thread needs besides its file descriptor.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices (virtio-mmio transports).
    pub mmio: Arc<Bus>,
    /// Guest memory (to show the bytes at RIP on a failure).
    pub memory: GuestMemory,
    /// Where to report that the VM stopped.
    pub exit: Arc<ExitNotifier>,
    /// The VM's vCPU throttle.
    pub throttle: Arc<Throttle>,
}

/// Errors starting or controlling vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kick signal handler cannot be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread cannot be spawned.
    #[error("cannot start the thread of vCPU {index}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU is running, so its state cannot be touched.
    #[error("vCPU {index} is running; pause it first")]
    NotPaused {
        /// vCPU index.
        index: u8,
    },
    /// A thread did not reach the requested state in time.
    #[error("vCPU {index} did not reach the {want:?} state within {timeout_ms} ms")]
    Timeout {
        /// vCPU index.
        index: u8,
        /// Wanted state.
        want: RunState,
        /// Timeout.
        timeout_ms: u64,
    },
}

/// A running vCPU thread.
///
/// The thread holds the vCPU's file descriptor locked only around `KVM_RUN` and the handling
/// of one exit, so once it reports `Paused` the VMM thread can lock it to save or restore
/// state.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    control: Arc<Control>,
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread of vCPU `index`; it waits in `Created` until asked to run.
    pub fn spawn(index: u8, fd: VcpuFd, ctx: VcpuContext) -> Result<Self, Error> {
        register_kick_handler().map_err(Error::Signal)?;
        let control = Arc::new(Control {
            inner: Mutex::new(ControlState { request: Request::Pause, state: RunState::Created }),
            changed: Condvar::new(),
        });
        let c = control.clone();
        let fd = Arc::new(Mutex::new(fd));
        let f = fd.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_thread(index, f, ctx, c))
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(Self { index, control, fd, thread: Some(thread) })
    }

    /// Runs `f` on the vCPU's file descriptor. The vCPU must not be running (created,
    /// paused or stopped), which is checked.
    pub fn with_fd<R>(&self, f: impl FnOnce(&VcpuFd) -> R) -> Result<R, Error> {
        let state = self.state();
        if state == RunState::Running {
            return Err(Error::NotPaused { index: self.index });
        }
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&fd))
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Its state now.
    pub fn state(&self) -> RunState {
        self.control.lock().state
    }

    /// Asks the thread to move on; kicks it out of `KVM_RUN` if it is in there.
    pub fn request(&self, request: Request) {
        {
            let mut c = self.control.lock();
            if c.state == RunState::Stopped {
                return;
            }
            c.request = request;
            self.control.changed.notify_all();
        }
        if request != Request::Run {
            self.kick();
        }
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread_t is the live thread owned by this handle (it has not
            // been joined), and the kick signal has a handler installed in `spawn`.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// A handle that pauses this vCPU from any thread (the lease watchdog's fence), while
    /// the thread lives.
    pub fn pauser(&self) -> Option<VcpuPauser> {
        use std::os::unix::thread::JoinHandleExt;
        let t = self.thread.as_ref()?;
        Some(VcpuPauser { control: self.control.clone(), thread: t.as_pthread_t() })
    }

    /// Waits until the thread reports `want` (or has stopped), kicking it while it does
    /// not, since a guest can sit in an in-kernel halt for ever.
    pub fn wait_for(&self, want: RunState, timeout: Duration) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + timeout;
        let mut c = self.control.lock();
        while c.state != want && c.state != RunState::Stopped {
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    index: self.index,
                    want,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            c = self.control.changed.wait_timeout(c, wait).unwrap_or_else(|p| p.into_inner()).0;
            if c.state != want && c.request != Request::Run {
                drop(c);
                self.kick();
                c = self.control.lock();
            }
        }
        Ok(())
    }

    /// Stops the thread and waits for it to end.
    pub fn stop(mut self) {
        self.request(Request::Stop);
        let Some(t) = self.thread.take() else { return };
        // Keep kicking until the thread notices: it may be entering KVM_RUN.
        while !t.is_finished() {
            {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: as in `kick`: the thread is alive and not joined.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = t.join();
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request(Request::Stop);
        }
    }
}

fn vcpu_thread(index: u8, fd: Arc<Mutex<VcpuFd>>, ctx: VcpuContext, control: Arc<Control>) {
    // The kvm_run mapping lives as long as the VcpuFd, which this thread co-owns.
    let immediate_exit: *mut u8 =
        &mut fd.lock().unwrap_or_else(|p| p.into_inner()).get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
    // The slice timer, made the first time the VM is throttled.
    let mut timer: Option<SliceTimer> = None;
    let mut slice_started: Option<Instant> = None;

    loop {
        // Obey the request before (re-)entering the guest.
        {
            let mut c = control.lock();
            loop {
                match c.request {
                    Request::Run if past_run_deadline() => {
                        // The lease watchdog fences the VM; stay out of the guest already.
                        c.request = Request::Pause;
                    }
                    Request::Run => break,
                    Request::Stop => {
                        c.state = RunState::Stopped;
                        control.changed.notify_all();
                        drop(c);
                        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
                        return;
                    }
                    Request::Pause => {
                        if c.state != RunState::Paused {
                            debug_assert!(c.state.can_move_to(RunState::Paused));
                            c.state = RunState::Paused;
                            control.changed.notify_all();
                        }
                        c = control.changed.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
            if c.state != RunState::Running {
                debug_assert!(c.state.can_move_to(RunState::Running));
                c.state = RunState::Running;
                control.changed.notify_all();
            }
        }

        let throttle = ctx.throttle.get();
        match (throttle, slice_started) {
            (0, Some(_)) => {
                if let Some(t) = &timer {
                    t.arm(Duration::ZERO);
                }
                slice_started = None;
            }
            (1.., None) => {
                if timer.is_none() {
                    match SliceTimer::for_this_thread() {
                        Ok(t) => timer = Some(t),
                        Err(e) => tracing::warn!("vCPU {index}: cannot throttle (no slice timer: {e})"),
                    }
                }
                if let Some(t) = &timer {
                    t.arm(THROTTLE_SLICE);
                    slice_started = Some(Instant::now());
                }
            }
            _ => {}
        }

        let result = {
            let mut fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            run_once(index, &mut fd, &ctx)
        };
        if let (1.., Some(started)) = (throttle, slice_started) {
            if started.elapsed() >= THROTTLE_SLICE {
                throttle_sleep(&control, Throttle::sleep_for(throttle));
                if let Some(t) = &timer {
                    t.arm(THROTTLE_SLICE);
                }
                slice_started = Some(Instant::now());
            }
        }
        match result {
            Ok(()) => {}
            Err(reason) => {
                ctx.exit.notify(reason);
                // Stay out of the guest until the VMM stops or resumes us.
                let mut c = control.lock();
                if c.request == Request::Run {
                    c.request = Request::Pause;
                }
            }
        }
    }
}

/// Sleeps `time` outside the guest, or less if the VMM asks for anything but `Run`.
fn throttle_sleep(control: &Control, time: Duration) {
    let deadline = Instant::now() + time;
    let mut c = control.lock();
    while c.request == Request::Run {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        c = control.changed.wait_timeout(c, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
}

/// Runs the guest until one exit has been handled. `Err` means the VM must stop.
fn run_once(index: u8, fd: &mut VcpuFd, ctx: &VcpuContext) -> Result<(), StopReason> {
    let exit = match fd.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            return Ok(());
        }
        Err(e) => {
            return Err(StopReason::Fault(GuestFault::RunFailed { vcpu: index, message: e.to_string() }));
        }
    };
    match exit {
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
            Ok(())
        }
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
            Ok(())
        }
        VcpuExit::MmioRead(addr, data) => {
            // Unclaimed addresses float high, like an empty bus.
            ctx.mmio.read(addr, data);
            Ok(())
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
            Ok(())
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => Ok(()),
        VcpuExit::SystemEvent(kind, _) => {
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                Err(StopReason::PowerOff)
            } else {
                Err(StopReason::Fault(GuestFault::Crash { vcpu: index }))
            }
        }
        VcpuExit::Shutdown => {
            let (rip, bytes) = bytes_at_rip(fd, &ctx.memory);
            Err(StopReason::Fault(GuestFault::TripleFault { vcpu: index, rip, bytes }))
        }
        VcpuExit::FailEntry(reason, _) => {
            Err(StopReason::Fault(GuestFault::FailEntry { vcpu: index, reason }))
        }
        VcpuExit::InternalError => {
            // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member
            // of the exit union.
            let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            let (rip, bytes) = bytes_at_rip(fd, &ctx.memory);
            Err(StopReason::Fault(GuestFault::EmulationFailure { vcpu: index, suberror, rip, bytes }))
        }
        other => {
            let what = format!("{other:?}");
            Err(StopReason::Fault(GuestFault::Unexpected { vcpu: index, what }))
        }
    }
}

/// The guest's RIP and up to 16 bytes of code there (translated through its page tables).
fn bytes_at_rip(fd: &VcpuFd, mem: &GuestMemory) -> (u64, Vec<u8>) {
    let Ok(regs) = fd.get_regs() else { return (0, Vec::new()) };
    let base = fd.get_sregs().map(|s| s.cs.base).unwrap_or(0);
    let linear = base.wrapping_add(regs.rip);
    let mut bytes = Vec::new();
    if let Ok(t) = fd.translate_gva(linear) {
        if t.valid != 0 {
            let mut buf = [0u8; 16];
            // Read byte by byte: the code may end at a region boundary.
            for (i, b) in buf.iter_mut().enumerate() {
                match mem.read_obj::<u8>(GuestAddress(t.physical_address + i as u64)) {
                    Ok(v) => *b = v,
                    Err(_) => {
                        bytes.extend_from_slice(&buf[..i]);
                        return (regs.rip, bytes);
                    }
                }
            }
            bytes.extend_from_slice(&buf);
        }
    }
    (regs.rip, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_sleeps_its_share_of_each_slice() {
        assert_eq!(Throttle::sleep_for(0), Duration::ZERO);
        assert_eq!(Throttle::sleep_for(20), Duration::from_micros(2500));
        assert_eq!(Throttle::sleep_for(50), THROTTLE_SLICE);
        assert_eq!(Throttle::sleep_for(99), THROTTLE_SLICE * 99);
        assert_eq!(Throttle::sleep_for(200), THROTTLE_SLICE * 99, "held to 99%");
        let t = Throttle::default();
        t.set(150);
        assert_eq!(t.get(), 99);
    }

    #[test]
    fn state_machine_transitions() {
        use RunState::*;
        assert!(Created.can_move_to(Running));
        assert!(Running.can_move_to(Paused));
        assert!(Paused.can_move_to(Running));
        assert!(Running.can_move_to(Stopped));
        assert!(!Stopped.can_move_to(Running));
        assert!(!Running.can_move_to(Created));
    }

    #[test]
    fn fault_messages_show_code_bytes() {
        let f =
            GuestFault::EmulationFailure { vcpu: 0, suberror: 1, rip: 0x1000, bytes: vec![0x0f, 0xc7, 0x0e] };
        let s = f.to_string();
        assert!(s.contains("0x1000") && s.contains("0f c7 0e"), "{s}");
    }
}
