//! Migration: live-migrates memstress (1 GiB, 512 MiB random initrd, wss=64M) between two
//! `ferry` processes over loopback, several runs, and measures one plain TCP stream on
//! loopback in the same run as the throughput reference. When `qemu-system-x86_64` is on
//! PATH, the same invocation also migrates the same guest ELF with the same initrd file
//! between two QEMUs (microvm, KVM; see `qemu.rs`), one QEMU run after each Ferry run, and reports
//! QEMU's figures and the Ferry/QEMU ratios next to Ferry's.
//!
//! Fairness: on a machine that is itself a VM, memory freed seconds ago costs several times
//! more to touch again than memory freed a moment ago, and a migration's destination touches
//! all of its memory. So the runs go in ABBA order (Ferry then QEMU, then QEMU then Ferry,
//! ...), each after the same idle time, and each run first times the touching of a small
//! fresh probe region: the run is `cold` or `warm` by that probe, and the report compares
//! each kind with its own. Every pair's ratio is printed, not only the medians. Beside time
//! and downtime, it reports what the guest felt: memstress passes per second on the source
//! while the migration ran, or dirtier's own rate and longest pause.
//!
//! The throughput references after the runs: one plain TCP stream, and one stream into fresh
//! memory, advised for huge pages and in small pages (the destination receives into small
//! pages: `ferry_vmm::memory::create_small`), each with the machine otherwise idle and with
//! one core kept busy as the guest's vCPU keeps it during a migration, and each repetition
//! after the same idle time and probe as the runs (a reference taken right after another
//! lands in memory freed a moment ago: warm, when the runs are cold). Pass 1 is held to the
//! like-for-like one: the receive's pages, a core busy. When the destination's populate-ahead
//! helper runs (`FERRY_POPULATE_AHEAD`, inherited by the receiving `ferry`), the report says
//! what it populated and the time it took, read from the destination's log.
//!
//! `--guest dirtier` is the fast-dirtying scenario: the dirtier guest (1 GiB, no initrd,
//! wss=128M) rewrites one stamp per page of its working set from ring 3 at native speed;
//! QEMU runs plain and with XBZRLE and auto-converge after each Ferry run; and each side
//! reports what the guest felt: its pages/s before and during the migration and its longest
//! pause (`guestline.rs`). Figures only, nothing asserted.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::checkpoint::{wait_file_line, write_random};
use crate::guestline::{self, Felt};
use crate::qemu;
use crate::stats::Summary;

/// Arguments of the migration benchmark.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Initrd size in MiB (random content; memstress only).
    #[arg(long, default_value_t = 512)]
    initrd_mib: u64,
    /// The guest: memstress (dirties slowly: ring 0 is emulated on these hosts) or dirtier
    /// (rewrites its working set at native speed from ring 3).
    #[arg(long, default_value = "memstress", value_parser = ["memstress", "dirtier"])]
    guest: String,
    /// The guest's working set (default: 64M for memstress, 128M for dirtier).
    #[arg(long)]
    wss: Option<String>,
    /// More options for the guest's command line, e.g. "words=512" (dirtier: rewrite 512
    /// words of every page, which delta encoding cannot shrink much).
    #[arg(long, default_value = "")]
    guest_cmdline: String,
    /// Downtime limit given to `ferry migrate`, ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Skip the QEMU side-by-side runs even if QEMU is installed (quicker, Ferry only).
    #[arg(long)]
    without_qemu: bool,
    /// `ferry migrate --streams N`.
    #[arg(long, default_value_t = 1)]
    streams: u32,
    /// Idle time before every run (both Ferry's and QEMU's), seconds.
    #[arg(long, default_value_t = 2.0)]
    idle_s: f64,
    /// Cap the migration's bandwidth on both sides, MiB/s (0: none; 120 is about 1 Gbit/s).
    #[arg(long, default_value_t = 0)]
    bandwidth_mib: u64,
    /// `ferry migrate --policy` (auto-converge, raise-downtime, give-up).
    #[arg(long, default_value = "auto-converge")]
    policy: String,
    /// QEMU migration capabilities to turn on, comma-separated (e.g.
    /// `xbzrle,auto-converge`, `multifd`); empty for plain pre-copy.
    #[arg(long, default_value = "", value_delimiter = ',')]
    qemu_caps: Vec<String>,
    /// Run QEMU only with `--qemu-caps`, not also with plain pre-copy (on a capped link a
    /// guest that dirties faster than the cap never converges under plain pre-copy, and the
    /// bench stops at QEMU's 120 s timeout).
    #[arg(long, requires = "qemu_caps")]
    qemu_caps_only: bool,
    /// A run is `cold` when touching the fresh probe region costs at least this much per
    /// 4 KiB page, ns.
    #[arg(long, default_value_t = 1000.0)]
    cold_ns_per_page: f64,
}

impl MigrateArgs {
    fn dirtier(&self) -> bool {
        self.guest == "dirtier"
    }

    fn wss(&self) -> &str {
        self.wss.as_deref().unwrap_or(if self.dirtier() { "128M" } else { "64M" })
    }

    /// The guest's command line.
    fn cmdline(&self) -> String {
        let base = if self.dirtier() {
            format!("wss={} report_ms={}", self.wss(), guestline::REPORT_MS)
        } else {
            format!("wss={} every=1", self.wss())
        };
        format!("{base} {}", self.guest_cmdline).trim_end().to_string()
    }

    /// Console text that says the workload runs: the migration starts after it.
    fn ready(&self) -> &'static str {
        if self.dirtier() {
            "dirtier: rate="
        } else {
            "memstress: pass 2"
        }
    }
}

/// Pages in the probe region touched before each run (16 MiB).
const PROBE_PAGES: usize = 4096;

/// ns per 4 KiB page to fault in and write a fresh, never-touched anonymous region (small
/// pages): how warm the machine's free memory is right now.
fn probe_ns_per_page() -> anyhow::Result<f64> {
    let len = PROBE_PAGES * 4096;
    let region = FreshMemory::new(len, false)?;
    let t = Instant::now();
    for i in 0..PROBE_PAGES {
        // SAFETY: the offset is inside the private mapping `region` owns.
        unsafe { std::ptr::write_volatile(region.0.cast::<u8>().add(i * 4096), 1) };
    }
    Ok(t.elapsed().as_nanos() as f64 / PROBE_PAGES as f64)
}

/// How far memstress has got by its console so far, in passes: the highest pass it says it
/// finished (`memstress: pass N`), or within a pass, the pass before plus the share of pages
/// done (`memstress: pass N: page I of M`). Read from the numbers, not by counting lines:
/// memstress prints at most two pass lines a second when it knows the TSC frequency (Ferry
/// gives it, QEMU does not), unless its command line says `every=1`, as the bench's does.
pub fn guest_passes(console: &Path) -> f64 {
    std::fs::read_to_string(console).map(|s| memstress_progress(&s)).unwrap_or(0.0)
}

/// [`guest_passes`] of a console's text.
fn memstress_progress(text: &str) -> f64 {
    let point = |line: &str| -> Option<f64> {
        let rest = line.strip_prefix("memstress: pass ")?;
        match rest.split_once(": page ") {
            None => rest.trim().parse::<f64>().ok(),
            Some((pass, pages)) => {
                let (done, of) = pages.split_once(" of ")?;
                let (pass, done, of) =
                    (pass.parse::<f64>().ok()?, done.parse::<f64>().ok()?, of.trim().parse::<f64>().ok()?);
                (of > 0.0).then(|| pass - 1.0 + done / of)
            }
        }
    };
    text.lines().filter_map(point).fold(0.0, f64::max)
}

/// One run of either side, as the pairs compare them.
#[derive(Debug, Clone, Serialize)]
struct RunFigures {
    total_ms: f64,
    downtime_ms: f64,
    passes: f64,
    guest_passes_per_s: f64,
    probe_ns_per_page: f64,
    cold: bool,
}

/// One ABBA pair.
#[derive(Debug, Serialize)]
struct Pair {
    /// Which ran first.
    first: &'static str,
    ferry: RunFigures,
    qemu: RunFigures,
    total_ratio: f64,
    downtime_ratio: f64,
    guest_progress_ratio: f64,
}

/// Medians of what dirtier felt over the runs.
#[derive(Debug, Serialize)]
struct FeltSummary {
    rate_before: Summary,
    rate_during: Summary,
    max_gap_ms: Summary,
}

impl FeltSummary {
    fn of(felt: &[Felt]) -> Option<Self> {
        if felt.is_empty() {
            return None;
        }
        let f = |g: fn(&Felt) -> f64| Summary::of(&felt.iter().map(g).collect::<Vec<_>>());
        Some(Self {
            rate_before: f(|x| x.rate_before),
            rate_during: f(|x| x.rate_during),
            max_gap_ms: f(|x| x.max_gap_ms),
        })
    }
}

#[derive(Debug, Serialize)]
struct Report {
    /// memstress or dirtier.
    guest: String,
    runs: usize,
    total_ms: Summary,
    downtime_ms: Summary,
    bytes_mib: Summary,
    passes: Summary,
    pass1_mb_s: Summary,
    /// How much of a core the source's vCPU thread got while the migration ran, %.
    vcpu_share_pct: Summary,
    /// `--streams`.
    streams: u32,
    tcp_stream_mb_s: f64,
    pass1_vs_tcp: f64,
    /// One TCP stream from populated memory into fresh memory (what pass 1 must do): huge
    /// and small pages, with the machine otherwise idle and with one core busy as the
    /// guest's vCPU keeps it during a migration; each repetition after the runs' idle time.
    fresh_references: Vec<FreshReference>,
    /// Pass 1 over the like-for-like reference after the runs: the destination's pages
    /// (small unless `FERRY_RECEIVE_PAGES=huge`) with a core busy.
    pass1_vs_like_reference: f64,
    /// Each run's pass 1 over the like-for-like stream measured right after it (the same
    /// bytes, the same idle time before): the figure pass 1 is held to.
    pass1_vs_adjacent: Option<Summary>,
    adjacent_reference_mb_s: Option<Summary>,
    /// What dirtier felt (pages/s before and during the migration, longest pause).
    guest_felt: Option<FeltSummary>,
    /// The same migration with QEMU, one entry per set of capabilities (plain first);
    /// empty when `qemu-system-x86_64` is not on PATH.
    qemu: Vec<QemuReport>,
    /// The guest's progress during Ferry's migrations, memstress passes per second.
    guest_passes_per_s: Summary,
    /// Each run's probe, ns per page, and how many runs were cold.
    probe_ns_per_page: Summary,
    cold_runs: usize,
    bandwidth_mib: u64,
    policy: String,
    /// What the destination populated ahead of the first pass's receive, MiB, and the time
    /// its helper spent doing it, ms (`None`: it did not run, `FERRY_POPULATE_AHEAD=off`).
    populated_ahead_mib: Option<Summary>,
    populate_ms: Option<Summary>,
}

/// QEMU's figures for the same guest, and Ferry's medians over QEMU's.
#[derive(Debug, Serialize)]
struct QemuReport {
    version: String,
    total_ms: Summary,
    downtime_ms: Summary,
    setup_ms: Summary,
    bytes_mib: Summary,
    /// `dirty-sync-count`.
    passes: Summary,
    /// Ferry's median total over QEMU's.
    total_ratio: f64,
    /// Ferry's median downtime over QEMU's.
    downtime_ratio: f64,
    /// Whether Ferry's median total is under half of QEMU's.
    total_under_half: bool,
    /// `cpu-throttle-percentage` at the end (auto-converge), %.
    throttle_pct: Summary,
    /// What dirtier felt.
    guest_felt: Option<FeltSummary>,
    /// The capabilities QEMU ran with (empty: plain pre-copy).
    caps: Vec<String>,
    /// QEMU's guest progress during its migrations, memstress passes per second.
    guest_passes_per_s: Summary,
    /// Each ABBA pair, in the order run.
    pairs: Vec<Pair>,
    /// Medians of the pairs' ratios (Ferry over QEMU).
    pair_total_ratio: f64,
    pair_downtime_ratio: f64,
    /// The same over the pairs where both runs were of the same kind (both cold, or both
    /// warm); `null` when there is none.
    pair_total_ratio_cold: Option<f64>,
    pair_total_ratio_warm: Option<f64>,
}

/// Writes the guest ELF for QEMU into `dir`; returns its path.
fn qemu_elf(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let guest = ferry_guests::find(name).with_context(|| format!("no bundled {name} guest"))?;
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&elf, guest.elf).with_context(|| format!("cannot write {}", elf.display()))?;
    Ok(elf)
}

/// MB/s of one plain TCP stream on loopback over `dur`.
fn tcp_stream(dur: Duration) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0x5au8; 2 << 20];
        let end = Instant::now() + dur;
        while Instant::now() < end {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let (mut r, _) = l.accept()?;
    let mut buf = vec![0u8; 2 << 20];
    let t = Instant::now();
    let mut n = 0u64;
    loop {
        match r.read(&mut buf)? {
            0 => break,
            k => n += k as u64,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    writer.join().map_err(|_| anyhow::anyhow!("writer thread failed"))??;
    Ok(n as f64 / secs / 1e6)
}

/// One reference for pass 1: one TCP stream on loopback from populated memory into fresh
/// memory, as a migration's first pass must do it.
#[derive(Debug, Clone, Serialize)]
struct FreshReference {
    /// `huge` (advised for transparent huge pages) or `small`.
    pages: &'static str,
    /// Whether a thread spun on a core meanwhile, as the source's vCPU does during a
    /// migration (two cores here: the sender and the receiver share what it leaves).
    busy_core: bool,
    /// Median of the repetitions, MB/s.
    mb_s: f64,
    /// Pass 1's median throughput over `mb_s`.
    pass1_ratio: f64,
    /// Each repetition's probe before its stream (after the same idle time as the runs),
    /// ns per page, and how many were cold.
    probe_ns_per_page: Summary,
    cold: usize,
    repetitions: usize,
}

/// Repetitions of each fresh-memory reference.
const REFERENCE_REPS: usize = 3;

/// [`FreshReference`]: `REFERENCE_REPS` streams carrying `mib` MiB each into a new mapping
/// (advised for huge pages if `huge`, else small pages), each after `idle` and a probe, as
/// the runs are, so that the reference is cold when they are; with one core kept busy if
/// `busy`.
fn tcp_into_fresh_memory(
    mib: usize,
    huge: bool,
    busy: bool,
    idle: Duration,
    cold_ns: f64,
) -> anyhow::Result<FreshReference> {
    let src = reference_data(mib);
    let mut rates = Vec::new();
    let mut probes = Vec::new();
    for _ in 0..REFERENCE_REPS {
        std::thread::sleep(idle);
        probes.push(probe_ns_per_page()?);
        rates.push(fresh_stream(&src, mib << 20, huge, busy)?);
    }
    Ok(FreshReference {
        pages: if huge { "huge" } else { "small" },
        busy_core: busy,
        mb_s: Summary::of(&rates).median,
        pass1_ratio: 0.0,
        cold: probes.iter().filter(|&&p| p >= cold_ns).count(),
        probe_ns_per_page: Summary::of(&probes),
        repetitions: REFERENCE_REPS,
    })
}

/// `mib` MiB of populated, non-zero data for the reference streams.
fn reference_data(mib: usize) -> std::sync::Arc<Vec<u8>> {
    std::sync::Arc::new((0..mib << 20).map(|i| (i ^ (i >> 12)) as u8 | 1).collect())
}

/// MB/s of one TCP stream on loopback carrying the first `len` bytes of `src` into a new
/// mapping (advised for huge pages if `huge`, else small pages), with one core kept busy
/// meanwhile if `busy`.
fn fresh_stream(src: &std::sync::Arc<Vec<u8>>, len: usize, huge: bool, busy: bool) -> anyhow::Result<f64> {
    let len = len.min(src.len());
    anyhow::ensure!(len > 0, "an empty reference stream");
    let spinner = busy.then(Spinner::start);
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let data = src.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        for chunk in data[..len].chunks(2 << 20) {
            s.write_all(chunk)?;
        }
        Ok(())
    });
    let (mut r, _) = l.accept()?;
    let fresh = FreshMemory::new(len, huge)?;
    let t = Instant::now();
    // SAFETY: `fresh` is a private anonymous mapping of `len` bytes that nothing else uses
    // and that outlives the slice.
    let buf = unsafe { std::slice::from_raw_parts_mut(fresh.0.cast::<u8>(), len) };
    r.read_exact(buf)?;
    let rate = len as f64 / t.elapsed().as_secs_f64() / 1e6;
    writer.join().map_err(|_| anyhow::anyhow!("writer thread failed"))??;
    drop(spinner);
    Ok(rate)
}

/// A thread that keeps one core busy until dropped.
struct Spinner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fresh anonymous mapping (advised for huge pages or against them), unmapped on drop.
struct FreshMemory(*mut libc::c_void, usize);

impl FreshMemory {
    fn new(len: usize, huge: bool) -> anyhow::Result<Self> {
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        anyhow::ensure!(p != libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let advice = if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        // SAFETY: advice on the mapping just made; failure (no THP) changes nothing.
        unsafe { libc::madvise(p, len, advice) };
        Ok(Self(p, len))
    }
}

impl Drop for FreshMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value made; no slice of it outlives it.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// Samples the CPU time of the source's vCPU thread while a migration runs: how much of a
/// core the guest kept (the migration's threads compete with it on a small host).
struct VcpuSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<f64>>,
}

impl VcpuSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let tid = vcpu_thread(pid)?;
            let read = || vcpu_ns(pid, tid).map(|ns| (Instant::now(), ns));
            let first = read()?;
            let mut last = first;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match read() {
                    Some(s) => last = s,
                    None => break, // the source has exited
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let wall = last.0.duration_since(first.0).as_secs_f64() * 1e9;
            (wall > 0.0).then(|| (last.1 - first.1) as f64 / wall)
        });
        Self { stop, thread }
    }

    /// The vCPU thread's share of one core over the samples, 0..1.
    fn stop(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().ok().flatten()
    }
}

/// The thread of `pid` named `vcpu0`.
fn vcpu_thread(pid: u32) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        (comm.trim() == "vcpu0").then(|| t.file_name().to_str()?.parse().ok()).flatten()
    })
}

/// Nanoseconds thread `tid` of `pid` has run on a CPU (`schedstat`).
fn vcpu_ns(pid: u32, tid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// What the destination's populate-ahead helper did, from its log line
/// (`populated N MiB ahead of the receive (X ms)`): MiB and ms. `None` when it did not run
/// (`FERRY_POPULATE_AHEAD=off`) or the line is not there.
fn populated_ahead(log: &str) -> Option<(f64, f64)> {
    let line = log.lines().find(|l| l.contains(" MiB ahead of the receive ("))?;
    let (head, tail) = line.split_once(" MiB ahead of the receive (")?;
    let mib = head.rsplit_once("populated ")?.1.trim().parse().ok()?;
    let ms = tail.split_once(" ms)")?.0.trim().parse().ok()?;
    Some((mib, ms))
}

fn one_run(
    ferry: &Path,
    dir: &Path,
    args: &MigrateArgs,
    initrd: &Path,
    key: &Path,
) -> anyhow::Result<serde_json::Value> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (src_sock, src_console) = (dir.join("src.sock"), dir.join("src.console"));
    let (dst_log, dst_console) = (dir.join("dst.log"), dir.join("dst.console"));
    let _ = std::fs::remove_file(&src_console);
    let _ = std::fs::remove_file(&dst_console);
    let mut cmd = Command::new(ferry);
    cmd.args(["run", "--guest", &args.guest, "--memory", &args.memory]);
    if !args.dirtier() {
        cmd.args(["--initrd", &s(initrd)]);
    }
    let mut src = cmd
        .args(["--cmdline", &args.cmdline(), "--api-socket", &s(&src_sock)])
        .args(["--home", &s(&dir.join("home")), "--serial", &format!("file:{}", s(&src_console))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut dst = Command::new(ferry)
        .args(["receive", "--listen", &format!("tcp:127.0.0.1:{port}"), "--auth-key-file", &s(key)])
        .args(["--serial", &if args.dirtier() { format!("file:{}", s(&dst_console)) } else { "null".into() }])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&dst_log)?)
        .spawn()?;
    let src_pid = src.id();
    let result = (|| {
        wait_file_line(&src_console, args.ready(), Duration::from_secs(120))?;
        if args.dirtier() {
            guestline::wait_warm(&src_console, Duration::from_secs(60))?;
        }
        wait_file_line(&dst_log, "waiting for an incoming migration", Duration::from_secs(10))?;
        let before = guestline::lines(&src_console);
        let sampler = VcpuSampler::start(src_pid);
        let passes_before = guest_passes(&src_console);
        let started = Instant::now();
        let out = Command::new(ferry)
            .args(["migrate", "--api-socket", &s(&src_sock), "--to", &format!("tcp:127.0.0.1:{port}")])
            .args([
                "--auth-key-file",
                &s(key),
                "--downtime-ms",
                &args.downtime_ms.to_string(),
                "--streams",
                &args.streams.to_string(),
                "--bandwidth-mib",
                &args.bandwidth_mib.to_string(),
                "--policy",
                &args.policy,
                "--json",
                "--quiet",
            ])
            .output()?;
        let took = started.elapsed().as_secs_f64();
        let guest = guest_passes(&src_console) - passes_before;
        let vcpu_share = sampler.stop();
        let mut report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("no report: {}", String::from_utf8_lossy(&out.stderr)))?;
        report["bench_vcpu_share"] = serde_json::json!(vcpu_share);
        if let Some((mib, ms)) = populated_ahead(&std::fs::read_to_string(&dst_log).unwrap_or_default()) {
            report["bench_populated_ahead_mib"] = serde_json::json!(mib);
            report["bench_populate_ms"] = serde_json::json!(ms);
        }
        report["bench_guest_passes_per_s"] = serde_json::json!(if took > 0.0 { guest / took } else { 0.0 });
        if report["status"] != "completed" {
            bail!("migration did not complete: {report}");
        }
        if args.dirtier() {
            let during = guestline::lines(&src_console).get(before.len()..).unwrap_or_default().to_vec();
            let first = guestline::wait_line(&dst_console, 0, Duration::from_secs(10));
            report["bench_guest_felt"] = serde_json::to_value(guestline::felt(&before, &during, first))?;
            let text = std::fs::read_to_string(&src_console).unwrap_or_default();
            report["bench_tsc_khz"] = serde_json::json!(tsc_khz(&text));
            if let Some(l) = std::fs::read_to_string(&dst_console)
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains("CORRUPTION"))
            {
                bail!("dirtier on the destination: {l}");
            }
        }
        Ok(report)
    })();
    let _ = src.kill();
    let _ = src.wait();
    let _ = dst.kill();
    let _ = dst.wait();
    result
}

pub fn run(ferry: &Path, args: &MigrateArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.idle_s >= 0.0 && args.idle_s <= 600.0, "--idle-s must be 0 to 600");
    let dir: PathBuf = std::env::temp_dir().join(format!("ferry-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initrd.img");
    if !args.dirtier() {
        write_random(&initrd, args.initrd_mib)?;
    }
    let key = dir.join("key");
    std::fs::write(&key, [0x42u8; 32])?;
    let result = all_runs(ferry, &dir, args, &initrd, &key, json);
    let _ = std::fs::remove_dir_all(&dir);
    let runs = result?;
    let reports: Vec<&serde_json::Value> = runs.ferry.iter().map(|(r, _)| r).collect();
    let figures: Vec<&RunFigures> = runs.ferry.iter().map(|(_, f)| f).collect();
    let tcp = tcp_stream(Duration::from_secs(1))?;
    let idle = Duration::from_secs_f64(args.idle_s);
    let mut fresh_references = Vec::new();
    for (huge, busy) in [(true, false), (false, false), (true, true), (false, true)] {
        let mib = args.initrd_mib.max(64) as usize;
        fresh_references.push(tcp_into_fresh_memory(mib, huge, busy, idle, args.cold_ns_per_page)?);
    }
    let f = |k: &str| -> Vec<f64> { reports.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect() };
    let bytes: Vec<f64> = f("bytes_transferred").iter().map(|b| b / (1u64 << 20) as f64).collect();
    let passes: Vec<f64> =
        reports.iter().map(|r| r["passes"].as_array().map(Vec::len).unwrap_or(0) as f64).collect();
    let pass1 = Summary::of(&f("throughput_mb_s"));
    let vcpu = Summary::of(&f("bench_vcpu_share").iter().map(|v| v * 100.0).collect::<Vec<_>>());
    let felt: Vec<Felt> =
        reports.iter().filter_map(|r| serde_json::from_value(r["bench_guest_felt"].clone()).ok()).collect();
    let mut report = Report {
        guest: args.guest.clone(),
        runs: args.runs,
        total_ms: Summary::of(&f("total_ms")),
        downtime_ms: Summary::of(&f("downtime_ms")),
        bytes_mib: Summary::of(&bytes),
        passes: Summary::of(&passes),
        pass1_vs_tcp: pass1.median / tcp,
        pass1_vs_adjacent: summary_of_present(&reports, "bench_pass1_vs_adjacent"),
        adjacent_reference_mb_s: summary_of_present(&reports, "bench_adjacent_reference_mb_s"),
        pass1_vs_like_reference: {
            // The receiving VMMs inherit this environment: read it as they do.
            let huge = !ferry_vmm::migration::small_pages_from_env();
            let like = fresh_references.iter().find(|r| r.busy_core && (r.pages == "huge") == huge);
            like.map_or(0.0, |r| pass1.median / r.mb_s)
        },
        fresh_references: fresh_references
            .into_iter()
            .map(|r| FreshReference { pass1_ratio: pass1.median / r.mb_s, ..r })
            .collect(),
        pass1_mb_s: pass1,
        vcpu_share_pct: vcpu,
        streams: args.streams,
        tcp_stream_mb_s: tcp,
        guest_felt: FeltSummary::of(&felt),
        qemu: Vec::new(),
        guest_passes_per_s: Summary::of(&f("bench_guest_passes_per_s")),
        probe_ns_per_page: Summary::of(&figures.iter().map(|f| f.probe_ns_per_page).collect::<Vec<_>>()),
        cold_runs: figures.iter().filter(|f| f.cold).count(),
        bandwidth_mib: args.bandwidth_mib,
        policy: args.policy.clone(),
        populated_ahead_mib: summary_of_present(&reports, "bench_populated_ahead_mib"),
        populate_ms: summary_of_present(&reports, "bench_populate_ms"),
    };
    if let Some(q) = &runs.qemu_bin {
        report.qemu =
            runs.qemu.iter().filter_map(|(caps, r)| qemu_report(q, caps, r, &runs.ferry, &report)).collect();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(args, &report);
    }
    Ok(())
}

/// The summary of `key` over the reports that have it; `None` if none has.
fn summary_of_present(reports: &[&serde_json::Value], key: &str) -> Option<Summary> {
    let v: Vec<f64> = reports.iter().filter_map(|r| r[key].as_f64()).collect();
    (!v.is_empty()).then(|| Summary::of(&v))
}

fn print_report(args: &MigrateArgs, report: &Report) {
    let p = |name: &str, s: &Summary, unit: &str| {
        println!(
            "{name:<27} median {:>9.2} {unit}  [{:.2} .. {:.2}]  ({} runs)",
            s.median, s.min, s.max, s.runs
        )
    };
    let initrd =
        if args.dirtier() { "no initrd".to_string() } else { format!("{} MiB initrd", args.initrd_mib) };
    let cap = if args.bandwidth_mib == 0 {
        "no bandwidth cap".to_string()
    } else {
        format!("{} MiB/s cap", args.bandwidth_mib)
    };
    println!(
        "migration of {} ({} memory, {initrd}, {}, {} stream{}, {cap}, policy {}):",
        args.guest,
        args.memory,
        args.cmdline(),
        args.streams,
        if args.streams == 1 { "" } else { "s" },
        args.policy
    );
    let felt = |who: &str, f: &Option<FeltSummary>| {
        if let Some(f) = f {
            p(&format!("{who}guest pages/s before"), &f.rate_before, "");
            p(&format!("{who}guest pages/s during"), &f.rate_during, "");
            p(&format!("{who}guest longest pause"), &f.max_gap_ms, "ms");
        }
    };
    p("total", &report.total_ms, "ms");
    p("downtime", &report.downtime_ms, "ms");
    p("sent", &report.bytes_mib, "MiB");
    p("passes", &report.passes, "");
    p("pass 1 throughput", &report.pass1_mb_s, "MB/s");
    p("vCPU kept of a core", &report.vcpu_share_pct, "%");
    match (&report.populated_ahead_mib, &report.populate_ms) {
        (Some(mib), Some(ms)) => {
            p("populated ahead (dest.)", mib, "MiB");
            p("populate time (dest.)", ms, "ms");
        }
        _ => println!("{:<27} off or not logged (FERRY_POPULATE_AHEAD)", "populated ahead (dest.)"),
    }
    if args.dirtier() {
        felt("", &report.guest_felt);
    } else {
        p("guest progress", &report.guest_passes_per_s, "passes/s");
    }
    p("probe (fresh memory)", &report.probe_ns_per_page, "ns/page");
    println!("{:<27} {} of {} Ferry runs", "cold runs", report.cold_runs, report.runs);
    println!(
        "{:<27} {:>13.0} MB/s (pass 1 reaches {:.0}% of it)",
        "one TCP stream",
        report.tcp_stream_mb_s,
        report.pass1_vs_tcp * 100.0
    );
    println!("one stream into fresh memory, each after the runs' idle time (median of {REFERENCE_REPS}):");
    for r in &report.fresh_references {
        println!(
            "  {:<5} pages, {:<9} {:>13.0} MB/s (pass 1 reaches {:>3.0}% of it; probe {:.0} ns/page, {} of {} cold)",
            r.pages,
            if r.busy_core { "core busy" } else { "idle" },
            r.mb_s,
            r.pass1_ratio * 100.0,
            r.probe_ns_per_page.median,
            r.cold,
            r.repetitions
        );
    }
    println!(
        "{:<27} {:>13.0}% of the stream into the receive's pages with a core busy",
        "pass 1, like for like",
        report.pass1_vs_like_reference * 100.0
    );
    if let (Some(ratio), Some(mb_s)) = (&report.pass1_vs_adjacent, &report.adjacent_reference_mb_s) {
        let pct = Summary {
            median: ratio.median * 100.0,
            min: ratio.min * 100.0,
            max: ratio.max * 100.0,
            ..*ratio
        };
        p("stream right after a run", mb_s, "MB/s");
        p("pass 1 / stream after it", &pct, "%");
    }
    if report.qemu.is_empty() {
        if args.without_qemu {
            println!("QEMU side by side: skipped (--without-qemu)");
        } else {
            println!(
                "QEMU side by side: skipped, {} is not on PATH (scripts/bench.sh installs it)",
                qemu::BINARY
            );
        }
    }
    for q in &report.qemu {
        let caps = if q.caps.is_empty() { "plain pre-copy".to_string() } else { q.caps.join(", ") };
        let same = if args.dirtier() { "same ELF and command line" } else { "same ELF and initrd" };
        println!("QEMU side by side, {same} ({}; {caps}):", q.version);
        p("QEMU total", &q.total_ms, "ms");
        p("QEMU downtime", &q.downtime_ms, "ms");
        p("QEMU setup", &q.setup_ms, "ms");
        p("QEMU sent (RAM)", &q.bytes_mib, "MiB");
        p("QEMU passes (syncs)", &q.passes, "");
        p("QEMU throttle at end", &q.throttle_pct, "%");
        if args.dirtier() {
            felt("QEMU ", &q.guest_felt);
        } else {
            p("QEMU guest progress", &q.guest_passes_per_s, "passes/s");
        }
        println!("ABBA pairs (Ferry/QEMU; probe ns/page, c = cold, w = warm):");
        for (i, pair) in q.pairs.iter().enumerate() {
            let kind = |f: &RunFigures| if f.cold { 'c' } else { 'w' };
            println!(
                "  pair {} ({} first): total {:>7.0}/{:<7.0} ms = {:.2}x  downtime {:>7.2}/{:<7.2} ms = {:.2}x  \
                 guest {:.2}x  probe {:.0}{}/{:.0}{}",
                i + 1,
                pair.first,
                pair.ferry.total_ms,
                pair.qemu.total_ms,
                pair.total_ratio,
                pair.ferry.downtime_ms,
                pair.qemu.downtime_ms,
                pair.downtime_ratio,
                pair.guest_progress_ratio,
                pair.ferry.probe_ns_per_page,
                kind(&pair.ferry),
                pair.qemu.probe_ns_per_page,
                kind(&pair.qemu)
            );
        }
        let opt = |r: Option<f64>| r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "no such pair".into());
        println!(
            "Ferry/QEMU ({caps}), median of pairs: total {:.2}x (under half: {}), downtime {:.2}x; \
             pairs both cold: {}, both warm: {}",
            q.pair_total_ratio,
            if q.total_under_half { "yes" } else { "no" },
            q.pair_downtime_ratio,
            opt(q.pair_total_ratio_cold),
            opt(q.pair_total_ratio_warm)
        );
    }
}

fn tsc_khz(console: &str) -> Option<u64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("dirtier: wss=")?.split_once(" tsc_khz=")?.1.trim().parse().ok())
}

/// Ferry's reports, and QEMU's runs (plain; with XBZRLE and auto-converge) when QEMU runs.
/// Every run: Ferry's, and per set of QEMU capabilities QEMU's, with the figures the pairs
/// compare.
struct Runs {
    ferry: Vec<(serde_json::Value, RunFigures)>,
    qemu_bin: Option<PathBuf>,
    qemu: Vec<(Vec<String>, Vec<QemuRun>)>,
}

/// One QEMU run and the figures its pair compares.
type QemuRun = (qemu::Run, RunFigures);

/// Sleeps the idle time, then probes how warm free memory is.
fn settle(args: &MigrateArgs) -> anyhow::Result<(f64, bool)> {
    std::thread::sleep(Duration::from_secs_f64(args.idle_s));
    let probe = probe_ns_per_page()?;
    Ok((probe, probe >= args.cold_ns_per_page))
}

/// The sets of QEMU capabilities to run: plain pre-copy, and `--qemu-caps` if given (with
/// dirtier and no `--qemu-caps`: XBZRLE and auto-converge, QEMU's answer to a fast dirtier).
fn qemu_variants(args: &MigrateArgs) -> Vec<Vec<String>> {
    let caps: Vec<String> = args.qemu_caps.iter().filter(|c| !c.is_empty()).cloned().collect();
    let mut v = if args.qemu_caps_only && !caps.is_empty() { Vec::new() } else { vec![Vec::new()] };
    if !caps.is_empty() {
        v.push(caps);
    } else if args.dirtier() {
        v.push(vec!["xbzrle".into(), "auto-converge".into()]);
    }
    v
}

/// The runs in ABBA order: round 1 runs Ferry then QEMU (each of its variants), round 2
/// QEMU then Ferry, and so on; every run after the same idle time and a probe.
fn all_runs(
    ferry: &Path,
    dir: &Path,
    args: &MigrateArgs,
    initrd: &Path,
    key: &Path,
    json: bool,
) -> anyhow::Result<Runs> {
    let qemu_bin = if args.without_qemu { None } else { qemu::find() };
    let setup = match &qemu_bin {
        Some(_) => {
            let elf = qemu_elf(dir, &args.guest)?;
            let memory = ferry_vmm::config::parse_size(&args.memory)?;
            Some((elf, memory))
        }
        None => None,
    };
    let cmdline = args.cmdline();
    let variants = qemu_variants(args);
    let mut runs = Runs {
        ferry: Vec::new(),
        qemu_bin: qemu_bin.clone(),
        qemu: variants.iter().map(|c| (c.clone(), Vec::new())).collect(),
    };
    let felt = |r: &Option<Felt>| match r {
        Some(f) => format!(
            "; guest {:.0} pages/s before, {:.0} during, longest pause {:.1} ms",
            f.rate_before, f.rate_during, f.max_gap_ms
        ),
        None => String::new(),
    };
    let mut tsc_hz = None;
    // The like-for-like reference right after each Ferry run: its pass 1's bytes into the
    // receive's kind of pages, a core busy, after the same idle time and probe.
    let huge = !ferry_vmm::migration::small_pages_from_env();
    let mut reference: Option<std::sync::Arc<Vec<u8>>> = None;
    for i in 0..args.runs {
        let qemu_first = i % 2 == 1 && qemu_bin.is_some();
        for side in if qemu_first { ["qemu", "ferry"] } else { ["ferry", "qemu"] } {
            if side == "ferry" {
                let (probe, cold) = settle(args)?;
                let r = one_run(ferry, dir, args, initrd, key).with_context(|| format!("run {}", i + 1))?;
                let f: Option<Felt> = serde_json::from_value(r["bench_guest_felt"].clone()).ok();
                let fig = RunFigures {
                    total_ms: r["total_ms"].as_f64().unwrap_or(0.0),
                    downtime_ms: r["downtime_ms"].as_f64().unwrap_or(0.0),
                    passes: r["passes"].as_array().map(Vec::len).unwrap_or(0) as f64,
                    guest_passes_per_s: match &f {
                        Some(f) => f.rate_during,
                        None => r["bench_guest_passes_per_s"].as_f64().unwrap_or(0.0),
                    },
                    probe_ns_per_page: probe,
                    cold,
                };
                if !json {
                    eprintln!(
                        "run {}: total {:.0} ms, downtime {:.2} ms, {} passes{}, probe {probe:.0} ns/page ({})",
                        i + 1,
                        fig.total_ms,
                        fig.downtime_ms,
                        fig.passes,
                        felt(&f),
                        if cold { "cold" } else { "warm" }
                    );
                }
                if let Some(k) = r["bench_tsc_khz"].as_u64() {
                    tsc_hz = Some(k * 1000);
                }
                let mut r = r;
                let pass1_bytes = r["passes"][0]["bytes"].as_u64().unwrap_or(0) as usize;
                if pass1_bytes >= 1 << 20 {
                    let src = reference
                        .get_or_insert_with(|| reference_data((pass1_bytes >> 20).clamp(1, 1024) + 64))
                        .clone();
                    let (probe, cold) = settle(args)?;
                    let mb_s = fresh_stream(&src, pass1_bytes, huge, true)?;
                    let pass1 = r["throughput_mb_s"].as_f64().unwrap_or(0.0);
                    if !json {
                        eprintln!(
                            "run {}: pass 1 {pass1:.0} MB/s; right after, one stream of its {} MiB into fresh {} \
                             pages with a core busy: {mb_s:.0} MB/s ({:.0}%), probe {probe:.0} ns/page ({})",
                            i + 1,
                            pass1_bytes >> 20,
                            if huge { "huge" } else { "small" },
                            pass1 / mb_s * 100.0,
                            if cold { "cold" } else { "warm" }
                        );
                    }
                    r["bench_adjacent_reference_mb_s"] = serde_json::json!(mb_s);
                    r["bench_pass1_vs_adjacent"] = serde_json::json!(pass1 / mb_s);
                }
                runs.ferry.push((r, fig));
                continue;
            }
            let (Some(q), Some((elf, memory))) = (&qemu_bin, &setup) else { continue };
            for (caps, done) in runs.qemu.iter_mut() {
                let (probe, cold) = settle(args)?;
                let s = qemu::Setup {
                    elf,
                    initrd: (!args.dirtier()).then_some(initrd),
                    memory: *memory,
                    append: &cmdline,
                    ready: args.ready(),
                    tsc_hz,
                    caps,
                    bandwidth_mib: args.bandwidth_mib,
                    dirtier: args.dirtier(),
                    downtime_ms: args.downtime_ms,
                };
                let name =
                    if caps.is_empty() { "QEMU".to_string() } else { format!("QEMU ({})", caps.join(", ")) };
                let r = qemu::one_run(q, dir, &s).with_context(|| format!("{name} run {}", i + 1))?;
                if !json {
                    eprintln!(
                        "{name} run {}: total {:.0} ms, downtime {:.2} ms, {} passes, throttle {:.0}%{}, probe {probe:.0} ns/page ({})",
                        i + 1,
                        r.total_ms,
                        r.downtime_ms,
                        r.passes,
                        r.throttle_pct,
                        felt(&r.guest),
                        if cold { "cold" } else { "warm" }
                    );
                }
                let fig = RunFigures {
                    total_ms: r.total_ms,
                    downtime_ms: r.downtime_ms,
                    passes: r.passes,
                    guest_passes_per_s: r
                        .guest
                        .as_ref()
                        .map(|g| g.rate_during)
                        .unwrap_or(r.guest_passes_per_s),
                    probe_ns_per_page: probe,
                    cold,
                };
                done.push((r, fig));
            }
        }
    }
    Ok(runs)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn median_of(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| Summary::of(v).median)
}

fn qemu_report(
    qemu: &Path,
    caps: &[String],
    runs: &[QemuRun],
    ferry_runs: &[(serde_json::Value, RunFigures)],
    ferry: &Report,
) -> Option<QemuReport> {
    if runs.is_empty() {
        return None;
    }
    let f = |g: fn(&qemu::Run) -> f64| -> Summary {
        Summary::of(&runs.iter().map(|(r, _)| g(r)).collect::<Vec<_>>())
    };
    let total_ms = f(|r| r.total_ms);
    let downtime_ms = f(|r| r.downtime_ms);
    let felt: Vec<Felt> = runs.iter().filter_map(|(r, _)| r.guest.clone()).collect();
    let pairs: Vec<Pair> = ferry_runs
        .iter()
        .zip(runs)
        .enumerate()
        .map(|(i, ((_, a), (_, b)))| Pair {
            first: if i % 2 == 1 { "qemu" } else { "ferry" },
            total_ratio: ratio(a.total_ms, b.total_ms),
            downtime_ratio: ratio(a.downtime_ms, b.downtime_ms),
            guest_progress_ratio: ratio(a.guest_passes_per_s, b.guest_passes_per_s),
            ferry: a.clone(),
            qemu: b.clone(),
        })
        .collect();
    let ratios = |keep: fn(&Pair) -> bool| -> Vec<f64> {
        pairs.iter().filter(|p| keep(p)).map(|p| p.total_ratio).collect()
    };
    let pair_total_ratio = median_of(&ratios(|_| true)).unwrap_or(f64::NAN);
    Some(QemuReport {
        version: qemu::version(qemu).unwrap_or_else(|e| format!("unknown version ({e:#})")),
        setup_ms: f(|r| r.setup_ms),
        bytes_mib: f(|r| r.bytes / (1u64 << 20) as f64),
        passes: f(|r| r.passes),
        total_ratio: ferry.total_ms.median / total_ms.median,
        downtime_ratio: ferry.downtime_ms.median / downtime_ms.median,
        total_under_half: pair_total_ratio < 0.5,
        throttle_pct: f(|r| r.throttle_pct),
        guest_felt: FeltSummary::of(&felt),
        caps: caps.to_vec(),
        guest_passes_per_s: f(|r| r.guest_passes_per_s),
        pair_total_ratio,
        pair_downtime_ratio: median_of(&pairs.iter().map(|p| p.downtime_ratio).collect::<Vec<_>>())
            .unwrap_or(f64::NAN),
        pair_total_ratio_cold: median_of(&ratios(|p| p.ferry.cold && p.qemu.cold)),
        pair_total_ratio_warm: median_of(&ratios(|p| !p.ferry.cold && !p.qemu.cold)),
        pairs,
        total_ms,
        downtime_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_populate_line() {
        let log = "2026-12-02T13:00:00Z INFO ferry_vmm: migration m-1: pass 1 received\n\
                   2026-12-02T13:00:00Z INFO ferry_vmm::migration::receive: migration m-1: populated 542 MiB \
                   ahead of the receive (201.5 ms)\n";
        assert_eq!(populated_ahead(log), Some((542.0, 201.5)));
        assert_eq!(populated_ahead("migration m-1: pass 1 received"), None);
    }

    #[test]
    fn memstress_progress_comes_from_the_pass_numbers() {
        let text =
            "memstress: ready\nmemstress: pass 1\nmemstress: pass 7\nmemstress: pass 8: page 4096 of 16384\n";
        assert_eq!(memstress_progress(text), 7.25);
        // Rate-limited lines skip passes: the count of lines would say 2, the numbers 12.
        assert_eq!(memstress_progress("memstress: pass 3\nmemstress: pass 12\n"), 12.0);
        assert_eq!(memstress_progress("memstress: CORRUPTION page=1\nmemstress: pass x\n"), 0.0);
    }
}
