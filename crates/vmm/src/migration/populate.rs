//! Populating guest memory ahead of the first pass's receive (the destination).
//!
//! A first pass lands every byte on memory the kernel has never given this process: the
//! receiving thread's `recv` faults each fresh 2 MiB page in, and the kernel allocates and
//! clears it while that thread holds the socket. [`Ahead`] runs one helper thread that asks
//! the kernel to populate the next chunks of guest memory (`MADV_POPULATE_WRITE`, Linux
//! 5.14+) a little ahead of where the receive is, so that `recv` finds its pages present and
//! only copies.
//!
//! The source sends the first pass in address order (every page of every region, never
//! touched pages as zero markers; with several streams each takes the next 512 pages, so
//! the streams stay within a few batches of each other). The receive's *frontier* is the
//! highest guest address any stream has reached (data or zero markers); the helper keeps
//! populating whole chunks from the frontier up to `window` bytes past it ([`Window`]), and
//! waits when it is that far ahead. It never populates outside guest memory, skips what the
//! frontier has passed, and stops at the end of the first pass, at the end of the receive
//! (success, failure, cancel: the thread is scoped to the receive and joined), or at the
//! first error from the kernel (an old kernel's `EINVAL`, `ENOMEM`): the receive goes on
//! exactly as without it, faulting pages in itself.
//!
//! Populating never changes data: a page already present (received, or faulted in by the
//! receive meanwhile) is left as it is, and a page populated ahead reads as zeros, as an
//! untouched one does. The cost is memory: where the data ends and a stretch of zero markers
//! begins, up to `window` bytes of zero pages are populated that a plain receive would have
//! left unbacked (at most one window per such stretch).
//!
//! The receive lands in small pages (`memory::create_small`; huge pages are advised once the
//! memory is in): a fault that must find a free 2 MiB block can make the kernel compact
//! memory on the spot, which on a host whose RAM is full of page cache cost more than the
//! receive itself (docs/migration.md, "The receive").
//!
//! The helper is off unless `FERRY_POPULATE_AHEAD` (read by the receiving VMM) is `on` or a
//! window in MiB: on the 2-core reference machine, where the source's vCPU holds one core,
//! it competes with the receive and the guest for the other; it paid there when the machine
//! was quiet and cost up to twice the time when it was busy. A destination with an idle
//! core is where it should pay. `FERRY_RECEIVE_PAGES=huge` receives
//! into memory advised for huge pages from the start, as before (for side-by-side
//! measurements).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// The unit populated at a time: one transparent huge page.
pub const CHUNK: u64 = 2 << 20;
/// The window when [`ENV`] names none in MiB (`on`).
pub const DEFAULT_WINDOW: u64 = 16 << 20;
/// The environment variable that sets the window (MiB; `0` or `off`: no helper).
pub const ENV: &str = "FERRY_POPULATE_AHEAD";
/// The environment variable that chooses the pages the receive lands in (`small`, `huge`).
pub const PAGES_ENV: &str = "FERRY_RECEIVE_PAGES";
/// The longest the helper sleeps without looking at the frontier and its stop flag (a
/// wake-up can be missed between its check and its park; this bounds the cost).
const NAP: Duration = Duration::from_millis(5);

/// What the helper should do next, given where the receive is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Populate `len` bytes of guest memory at `addr`.
    Populate {
        /// Guest address, a multiple of [`CHUNK`] or a region's start.
        addr: u64,
        /// Bytes, at most [`CHUNK`], never past the region's end.
        len: u64,
    },
    /// `window` bytes ahead of the frontier already: wait for it to move.
    Wait,
    /// Nothing is left ahead of the frontier.
    Done,
}

/// The ahead-window bookkeeping: which chunk comes next, from the frontier, the regions and
/// what is populated already. Pure: the thread around it is [`Ahead`].
#[derive(Clone, Debug)]
pub struct Window {
    /// Guest memory's regions, `(start, end)` (end exclusive), in address order.
    regions: Vec<(u64, u64)>,
    /// How far past the frontier to populate.
    window: u64,
    /// The first guest address not yet populated by the helper (or skipped).
    next: u64,
}

impl Window {
    /// A window of `window` bytes (at least one chunk) over `regions` (`(start, len)`).
    pub fn new(regions: &[(u64, u64)], window: u64) -> Self {
        let mut regions: Vec<(u64, u64)> =
            regions.iter().filter(|(_, len)| *len > 0).map(|&(s, len)| (s, s.saturating_add(len))).collect();
        regions.sort_unstable();
        let next = regions.first().map_or(0, |r| r.0);
        Self { regions, window: window.max(CHUNK), next }
    }

    /// The next step when the receive has reached guest address `frontier` (exclusive: the
    /// end of the last run or marker placed).
    pub fn next(&mut self, frontier: u64) -> Step {
        // What the receive has reached it populates itself: start at the first whole chunk
        // past the frontier.
        let past = frontier.checked_next_multiple_of(CHUNK).unwrap_or(u64::MAX);
        let mut at = self.next.max(past);
        loop {
            // The region holding `at`, or the next one above it.
            let Some(&(start, end)) = self.regions.iter().find(|&&(_, end)| at < end) else {
                self.next = at;
                return Step::Done;
            };
            at = at.max(start);
            if at >= frontier.saturating_add(self.window) {
                self.next = at;
                return Step::Wait;
            }
            let chunk_end = at.saturating_add(1).checked_next_multiple_of(CHUNK).unwrap_or(u64::MAX).min(end);
            if chunk_end > at {
                self.next = chunk_end;
                return Step::Populate { addr: at, len: chunk_end - at };
            }
            at = end;
        }
    }
}

/// Whether the receive lands pages in small pages (`memory::create_small`, the default) or
/// in memory advised for huge pages from the start ([`PAGES_ENV`]`=huge`, for side-by-side
/// measurements).
pub fn small_pages_from_env() -> bool {
    match std::env::var(PAGES_ENV) {
        Err(_) => true,
        Ok(v) if v.trim().eq_ignore_ascii_case("small") => true,
        Ok(v) if v.trim().eq_ignore_ascii_case("huge") => false,
        Ok(v) => {
            tracing::warn!("{PAGES_ENV}={v:?} is not \"small\" or \"huge\": receiving into small pages");
            true
        }
    }
}

/// The window the receiving VMM uses: off (`None`) unless [`ENV`] is `on` or a number of
/// MiB. Off by default: on the 2-core reference machine, where the source's vCPU holds a
/// core, the helper made migrations faster when the machine was quiet and up to twice as
/// slow when it was busy (docs/migration.md, "The receive"). A value that is not understood
/// is ignored with a warning.
pub fn window_from_env() -> Option<u64> {
    match std::env::var(ENV) {
        Err(_) => None,
        Ok(v) => parse_window(&v).unwrap_or_else(|| {
            tracing::warn!("{ENV}={v:?} is not a size in MiB, \"on\" or \"off\": populating nothing ahead");
            None
        }),
    }
}

/// `off` or `0`: `Some(None)`; `on`: the default window; a number of MiB: that window;
/// anything else: `None`.
fn parse_window(v: &str) -> Option<Option<u64>> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("off") {
        return Some(None);
    }
    if v.eq_ignore_ascii_case("on") {
        return Some(Some(DEFAULT_WINDOW));
    }
    let mib: u64 = v.parse().ok()?;
    Some((mib > 0).then(|| mib.saturating_mul(1 << 20)))
}

/// Why the helper stopped populating before the end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused `MADV_POPULATE_WRITE` (older than 5.14: `EINVAL`; out of memory:
    /// `ENOMEM`).
    #[error("cannot populate {len} bytes of guest memory at {addr:#x} ahead of the receive")]
    Populate {
        /// Guest address.
        addr: u64,
        /// Bytes.
        len: u64,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// A chunk the window chose is not in guest memory (a bug; nothing was touched).
    #[error("guest address {0:#x} is not in guest memory")]
    Outside(u64),
    /// The helper thread could not be started.
    #[error("cannot start the populate-ahead thread")]
    Spawn(#[source] std::io::Error),
    /// The helper thread panicked.
    #[error("the populate-ahead thread panicked")]
    Panicked,
}

/// What the helper did, for the log and the receiving side's report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Populated {
    /// Bytes populated ahead of the receive.
    pub bytes: u64,
    /// Time spent in `madvise`, ms.
    pub ms: f64,
}

/// The populate-ahead helper's shared state: the receive moves the frontier, the helper
/// thread ([`Ahead::run`]) populates ahead of it. See the module documentation.
#[derive(Debug)]
pub struct Ahead<'a> {
    mem: &'a GuestMemory,
    window: u64,
    frontier: AtomicU64,
    stop: AtomicBool,
    helper: OnceLock<Thread>,
    bytes: AtomicU64,
    ns: AtomicU64,
}

impl<'a> Ahead<'a> {
    /// A helper for `mem`, populating up to `window` bytes ahead.
    pub fn new(mem: &'a GuestMemory, window: u64) -> Self {
        Self {
            mem,
            window,
            frontier: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            helper: OnceLock::new(),
            bytes: AtomicU64::new(0),
            ns: AtomicU64::new(0),
        }
    }

    /// The receive has reached guest address `end` (exclusive). Wakes the helper when the
    /// frontier enters a new chunk.
    pub fn reached(&self, end: u64) {
        let before = self.frontier.fetch_max(end, Ordering::AcqRel);
        if end > before && end / CHUNK != before / CHUNK {
            if let Some(t) = self.helper.get() {
                t.unpark();
            }
        }
    }

    /// Stops the helper (it finishes the chunk it is populating, then returns).
    pub fn finish(&self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.helper.get() {
                t.unpark();
            }
        }
    }

    /// A guard that stops the helper when dropped, so that a receive that ends any way,
    /// unwinding included, never leaves a scope waiting for it.
    pub fn finish_on_drop(&self) -> FinishOnDrop<'_, 'a> {
        FinishOnDrop(self)
    }

    /// What the helper has done so far.
    pub fn populated(&self) -> Populated {
        Populated {
            bytes: self.bytes.load(Ordering::Relaxed),
            ms: self.ns.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// The helper thread's body: populates ahead of the frontier until [`Ahead::finish`],
    /// the end of guest memory, or the kernel's first refusal (returned; the receive goes
    /// on without help).
    pub fn run(&self) -> Result<(), Error> {
        // Best effort: a receive that never registered a thread to wake still works, the
        // helper then looks every NAP.
        let _ = self.helper.set(std::thread::current());
        let regions: Vec<(u64, u64)> = self.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let mut window = Window::new(&regions, self.window);
        while !self.stop.load(Ordering::Acquire) {
            match window.next(self.frontier.load(Ordering::Acquire)) {
                Step::Done => return Ok(()),
                Step::Wait => std::thread::park_timeout(NAP),
                Step::Populate { addr, len } => self.populate(addr, len)?,
            }
        }
        Ok(())
    }

    fn populate(&self, addr: u64, len: u64) -> Result<(), Error> {
        // The whole chunk must lie in one region (the window never crosses a region's end).
        let region = self.mem.find_region(GuestAddress(addr)).ok_or(Error::Outside(addr))?;
        let last = addr.checked_add(len - 1).ok_or(Error::Outside(addr))?;
        if last > region.last_addr().0 {
            return Err(Error::Outside(last));
        }
        let host = self.mem.get_host_address(GuestAddress(addr)).map_err(|_| Error::Outside(addr))?;
        let t = Instant::now();
        // SAFETY: `host .. host + len` lies inside one mapped region of guest memory (checked
        // just above), which lives as long as `self.mem`. MADV_POPULATE_WRITE only faults
        // pages in as a write would, without writing: a page already present keeps its
        // bytes, so a receive writing into the same pages meanwhile loses nothing.
        let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(Error::Populate { addr, len, source: std::io::Error::last_os_error() });
        }
        self.ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

/// Stops the helper when dropped ([`Ahead::finish_on_drop`]).
#[derive(Debug)]
pub struct FinishOnDrop<'h, 'a>(&'h Ahead<'a>);

impl Drop for FinishOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn populate(addr: u64, len: u64) -> Step {
        Step::Populate { addr, len }
    }

    /// From the start of memory, up to the window past the frontier, chunk by chunk; then
    /// it waits until the frontier moves.
    #[test]
    fn populates_up_to_the_window_then_waits() {
        let mut w = Window::new(&[(0, 64 * MIB)], 8 * MIB);
        assert_eq!(w.next(0), populate(0, CHUNK));
        assert_eq!(w.next(0), populate(2 * MIB, CHUNK));
        assert_eq!(w.next(0), populate(4 * MIB, CHUNK));
        assert_eq!(w.next(0), populate(6 * MIB, CHUNK));
        assert_eq!(w.next(0), Step::Wait);
        // The window is measured from the frontier itself.
        assert_eq!(w.next(4096), populate(8 * MIB, CHUNK));
        assert_eq!(w.next(4096), Step::Wait);
        assert_eq!(w.next(2 * MIB), Step::Wait);
        assert_eq!(w.next(2 * MIB + 1), populate(10 * MIB, CHUNK));
    }

    /// What the frontier has passed is skipped (the receive faulted it in, or it was zero
    /// markers), and so is the chunk the frontier is in.
    #[test]
    fn skips_what_the_receive_has_passed() {
        let mut w = Window::new(&[(0, 64 * MIB)], 4 * MIB);
        assert_eq!(w.next(0), populate(0, CHUNK));
        assert_eq!(w.next(20 * MIB + 4096), populate(22 * MIB, CHUNK));
        assert_eq!(w.next(20 * MIB + 4096), populate(24 * MIB, CHUNK));
        assert_eq!(w.next(20 * MIB + 4096), Step::Wait);
        assert_eq!(w.next(64 * MIB), Step::Done);
        assert_eq!(w.next(0), Step::Done, "a frontier never moves back; the window does not either");
    }

    /// Never past a region's end, never in the gap between regions, done at the last end;
    /// a region whose end is not a chunk boundary gets a short last chunk.
    #[test]
    fn stays_inside_the_regions() {
        let top = 3 * MIB + 4096 * 3;
        let high = 4096 * MIB;
        let mut w = Window::new(&[(high, 4 * MIB), (0, top)], 64 * MIB);
        assert_eq!(w.next(0), populate(0, CHUNK));
        assert_eq!(w.next(0), populate(2 * MIB, top - 2 * MIB));
        // The gap below the high region is out of the window (64 MiB past a frontier of 0).
        assert_eq!(w.next(0), Step::Wait);
        assert_eq!(w.next(top), Step::Wait);
        assert_eq!(w.next(high - 60 * MIB), populate(high, CHUNK));
        assert_eq!(w.next(high - 60 * MIB), populate(high + 2 * MIB, CHUNK));
        assert_eq!(w.next(high - 60 * MIB), Step::Done);
        let mut w = Window::new(&[(0, 4 * MIB)], 64 * MIB);
        assert_eq!(w.next(3 * MIB), Step::Done, "the last chunk is the receive's");
        assert_eq!(Window::new(&[], 8 * MIB).next(0), Step::Done);
        assert_eq!(Window::new(&[(0, 8 * MIB)], 8 * MIB).next(u64::MAX), Step::Done);
    }

    /// A window below one chunk still populates one chunk ahead.
    #[test]
    fn the_window_is_at_least_a_chunk() {
        let mut w = Window::new(&[(0, 8 * MIB)], 4096);
        assert_eq!(w.next(0), populate(0, CHUNK));
        assert_eq!(w.next(0), Step::Wait);
    }

    #[test]
    fn parses_the_window() {
        assert_eq!(parse_window("off"), Some(None));
        assert_eq!(parse_window("On"), Some(Some(DEFAULT_WINDOW)));
        assert_eq!(parse_window(" 0 "), Some(None));
        assert_eq!(parse_window("32"), Some(Some(32 * MIB)));
        assert_eq!(parse_window("32M"), None);
        assert_eq!(parse_window(""), None);
    }

    /// The thread populates real memory ahead of a moving frontier, stays inside guest
    /// memory, leaves data in place, and stops when told.
    #[test]
    fn populates_guest_memory_and_stops() {
        use vm_memory::Bytes;
        let mem = crate::memory::create(64 * MIB).expect("memory");
        mem.write_obj(0x1234_5678u32, GuestAddress(9 * MIB)).expect("write");
        let ahead = Ahead::new(&mem, 16 * MIB);
        std::thread::scope(|s| {
            let h = s.spawn(|| ahead.run());
            // Up to 16 MiB past a frontier at 0: 8 chunks.
            while ahead.populated().bytes < 16 * MIB {
                std::thread::sleep(Duration::from_millis(1));
            }
            ahead.reached(64 * MIB);
            let r = h.join().expect("helper");
            assert!(r.is_ok(), "{r:?}");
        });
        assert_eq!(ahead.populated().bytes, 16 * MIB, "nothing past the window, nothing twice");
        assert_eq!(mem.read_obj::<u32>(GuestAddress(9 * MIB)).expect("read"), 0x1234_5678);
        let untouched = crate::memory::never_touched(&mem);
        let bits = untouched[0].as_ref().expect("map");
        let never = |p: usize| bits[p / 64] & (1 << (p % 64)) != 0;
        assert!((0..4096).all(|p| !never(p)), "the first 16 MiB are populated");
        assert!((8192..16384).all(never), "nothing far past the window");

        let ahead = Ahead::new(&mem, 16 * MIB);
        std::thread::scope(|s| {
            let h = s.spawn(|| ahead.run());
            ahead.finish();
            assert!(h.join().expect("helper").is_ok());
        });
    }
}
