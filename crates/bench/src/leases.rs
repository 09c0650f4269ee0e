//! Leases (issue 13): what sanlock leases cost a host with many leased VMs, and how long the
//! hand-over of one VM's lease takes at a switchover.
//!
//! 1. **Renewal cost.** A private sanlock daemon (`ferry_lease::testing`) joins a lockspace;
//!    then, for 0, 1 and `--vms` leased VMMs (memstress, 16 MiB, close to idle), each window
//!    of `--seconds` reads the daemon's CPU time (`/proc/PID/stat` of every process in its
//!    process group: the daemon with all its threads and its helper), its I/O
//!    (`/proc/PID/io`), the CPU time of every VMM's lease threads (`lease-probe`,
//!    `lease-watch`: `/proc/PID/task/TID/stat`) and the renewals the daemon made
//!    (`sanlock client renewal`: timestamps and I/O times).
//! 2. **Hand-over.** Two daemons (host ids 1 and 2, one lockspace), each with a client
//!    process of its own (`ferry-bench lease-host`, the "VMM" of that host): the lease goes
//!    back and forth, release on one host then acquire on the other, timed inside the
//!    clients. Once with the files on tmpfs and once on the temporary directory's file
//!    system (sanlock reads and writes with O_DIRECT). `--ideas` adds variants that could make
//!    the destination's acquire cheaper (see [`Scheme`]).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ferry_lease::testing::{zero_file, AcquireMode, Daemon, Layout, RawConn, Scratch, RUN_DIR_ENV};
use ferry_lease::{KillPath, Lease, Lockspace, Resource};
use serde::Serialize;

use crate::stats::Summary;

const LS: &str = "FERRYBENCH";
const MIB: u64 = 1 << 20;

/// Arguments of the leases benchmark.
#[derive(Debug, clap::Args)]
pub struct LeasesArgs {
    /// Leased VMMs in the many-VM case (also measured: none and one).
    #[arg(long, default_value_t = 50)]
    vms: usize,
    /// Length of each measurement window, in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// The lockspace's I/O timeout (renewal every 2x); also used by the hand-over.
    #[arg(long, default_value_t = 10)]
    io_timeout: u32,
    /// Measurement windows per VM count (medians over them).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Hand-overs per variant.
    #[arg(long, default_value_t = 20)]
    handovers: usize,
    /// Skip the renewal-cost part.
    #[arg(long)]
    no_renewal: bool,
    /// Skip the hand-over part.
    #[arg(long)]
    no_handover: bool,
    /// Also time the ideas for a faster acquire (pre-registration, versioned acquire,
    /// shared lease converted, smaller Paxos area, 4 KiB sectors).
    #[arg(long)]
    ideas: bool,
    /// Leave the VMs running (memstress spins between its paced page writes: each takes a
    /// whole vCPU). By default each VM is paused once its lease is held: it keeps the lease
    /// and its lease threads, and its vCPU no longer competes with the daemon for the CPU.
    #[arg(long)]
    running: bool,
    /// The tmpfs directory for the hand-over's tmpfs case.
    #[arg(long, default_value = "/dev/shm")]
    tmpfs_dir: PathBuf,
    /// More places for the hand-over's files, `NAME=DIR` (repeatable), after tmpfs and the
    /// temporary directory.
    #[arg(long, value_name = "NAME=DIR")]
    store: Vec<String>,
    /// An extra option for the hand-over's sanlock daemons (repeatable; e.g. `-h 1` as
    /// `--daemon-arg=-h --daemon-arg=1` for realtime priority).
    #[arg(long, allow_hyphen_values = true)]
    daemon_arg: Vec<String>,
}

/// Set by SIGINT: the benchmark stops at its next check and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, returning early with an error on Ctrl-C.
fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupt()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(100)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// /proc parsing

/// The fields of `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) the benchmark reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// The command name (`comm`; for a thread, its name).
    pub comm: String,
    /// The process group.
    pub pgrp: i32,
    /// User plus system time, in clock ticks.
    pub ticks: u64,
}

/// Parses a `stat` line: `PID (COMM) STATE PPID PGRP ... UTIME STIME ...`, where COMM may
/// hold spaces and parentheses (it ends at the last `)`).
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<i64>().ok());
    let pgrp = i32::try_from(field(5)?).ok()?;
    let ticks = u64::try_from(field(14)?).ok()? + u64::try_from(field(15)?).ok()?;
    Some(ProcStat { comm, pgrp, ticks })
}

/// `/proc/PID/io`: `key: value` lines.
pub fn parse_io(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// One renewal in `sanlock client renewal -s LS`'s history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// The timestamp written (seconds of the daemon host's monotonic clock).
    pub timestamp: u64,
    /// The delta lease's read, in ms.
    pub read_ms: u64,
    /// Its write, in ms.
    pub write_ms: u64,
}

/// The renewals in `sanlock client renewal` output (`timestamp=N read_ms=N write_ms=N ...`).
pub fn parse_renewals(text: &str) -> Vec<Renewal> {
    text.lines()
        .filter_map(|l| {
            let mut f = BTreeMap::new();
            for tok in l.split_whitespace() {
                if let Some((k, v)) = tok.split_once('=') {
                    if let Ok(v) = v.parse::<u64>() {
                        f.insert(k, v);
                    }
                }
            }
            Some(Renewal {
                timestamp: *f.get("timestamp")?,
                read_ms: *f.get("read_ms")?,
                write_ms: *f.get("write_ms")?,
            })
        })
        .collect()
}

/// The nearest-rank percentile `p` (0-100) of `values` (non-empty).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn read_stat(path: &Path) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// The pids of every process in process group `pgrp`.
fn group_pids(pgrp: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| read_stat(&PathBuf::from(format!("/proc/{pid}/stat"))).is_some_and(|s| s.pgrp == pgrp))
        .collect()
}

/// CPU ticks and I/O counters of a daemon's process group.
#[derive(Clone, Debug, Default)]
struct DaemonSample {
    ticks: u64,
    io: BTreeMap<String, u64>,
}

fn sample_daemon(pgrp: i32) -> DaemonSample {
    let mut s = DaemonSample::default();
    for pid in group_pids(pgrp) {
        if let Some(st) = read_stat(&PathBuf::from(format!("/proc/{pid}/stat"))) {
            s.ticks += st.ticks;
        }
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
            for (k, v) in parse_io(&text) {
                *s.io.entry(k).or_default() += v;
            }
        }
    }
    s
}

/// CPU ticks of the lease threads of each VMM, by thread id.
fn lease_thread_ticks(pids: &[u32]) -> BTreeMap<(u32, String), u64> {
    let mut out = BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.filter_map(|e| e.ok()) {
            if let Some(st) = read_stat(&t.path().join("stat")) {
                if st.comm == "lease-probe" || st.comm == "lease-watch" {
                    out.insert((*pid, t.file_name().to_string_lossy().into_owned()), st.ticks);
                }
            }
        }
    }
    out
}

fn has_lease_threads(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks
        .filter_map(|e| e.ok())
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "lease-watch"))
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The file system type of `dir`, as `stat -f` names it.
fn fs_type(dir: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------------------
// Part 1: renewal cost

/// Leased VMMs on one host; stopped (SIGTERM, then SIGKILL) when dropped.
struct Vmms(Vec<Child>);

impl Vmms {
    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(|c| c.id()).collect()
    }

    fn ensure_alive(&mut self) -> anyhow::Result<()> {
        for (i, c) in self.0.iter_mut().enumerate() {
            if let Some(st) = c.try_wait()? {
                bail!("VMM {i} exited during the measurement ({st})");
            }
        }
        Ok(())
    }
}

impl Drop for Vmms {
    fn drop(&mut self) {
        for c in &self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for c in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `PUT /vm/pause` on a VMM's API socket (retried while the socket is not there yet).
fn pause(sock: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                write!(s, "PUT /vm/pause HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                let status = reply.lines().next().unwrap_or_default().to_owned();
                ensure!(status.contains(" 204"), "pause via {}: {status}", sock.display());
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => bail!("cannot reach {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn start_vmms(
    ferry: &Path,
    daemon: &Daemon,
    lease: &str,
    dir: &Path,
    n: usize,
    running: bool,
) -> anyhow::Result<Vmms> {
    let mut vmms = Vmms(Vec::new());
    for i in 0..n {
        check_interrupt()?;
        let home = dir.join(format!("vm-{i}"));
        let log = std::fs::File::create(dir.join(format!("vm-{i}.log")))?;
        let child = Command::new(ferry)
            .args([
                "run",
                "--guest",
                "memstress",
                "--memory",
                "16M",
                "--cmdline",
                "wss=1M rate=10",
                "--serial",
                "null",
            ])
            .arg("--home")
            .arg(&home)
            .arg("--api-socket")
            .arg(dir.join(format!("vm-{i}.sock")))
            .args(["--lease", lease])
            .env(RUN_DIR_ENV, daemon.run_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start ferry")?;
        let pid = child.id();
        vmms.0.push(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !has_lease_threads(pid) {
            check_interrupt()?;
            if let Some(st) = vmms.0[i].try_wait()? {
                let log = std::fs::read_to_string(dir.join(format!("vm-{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "leased VMM {i} exited at start ({st}): {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            ensure!(Instant::now() < deadline, "leased VMM {i} did not start its lease monitor within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        if !running {
            pause(&dir.join(format!("vm-{i}.sock")))?;
        }
    }
    Ok(vmms)
}

/// One window's figures.
#[derive(Clone, Debug)]
struct Window {
    daemon_ms_per_s: f64,
    lease_threads_ms_per_s: f64,
    io_per_s: BTreeMap<String, f64>,
    renewal_intervals_s: Vec<f64>,
    renewal_io_ms: Vec<f64>,
}

fn renewals(daemon: &Daemon) -> Vec<Renewal> {
    Command::new("sanlock")
        .args(["client", "renewal", "-s", LS])
        .env(RUN_DIR_ENV, daemon.run_dir())
        .output()
        .map(|o| parse_renewals(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

fn window(daemon: &Daemon, vmms: &mut Vmms, seconds: u64) -> anyhow::Result<Window> {
    let pgrp = daemon.pid() as i32;
    let pids = vmms.pids();
    let (m0, d0, l0, t0) =
        (ferry_lease::monotonic_secs(), sample_daemon(pgrp), lease_thread_ticks(&pids), Instant::now());
    sleep(Duration::from_secs(seconds))?;
    let (d1, l1, wall, m1) = (
        sample_daemon(pgrp),
        lease_thread_ticks(&pids),
        t0.elapsed().as_secs_f64(),
        ferry_lease::monotonic_secs(),
    );
    vmms.ensure_alive()?;
    let hist = renewals(daemon);
    let tick_ms = 1000.0 / ticks_per_s();
    let lease_ticks: u64 = l1.iter().map(|(k, v)| v.saturating_sub(l0.get(k).copied().unwrap_or(*v))).sum();
    let io_per_s = d1
        .io
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(d0.io.get(k).copied().unwrap_or(0)) as f64 / wall))
        .collect();
    let mut intervals = Vec::new();
    let mut io_ms = Vec::new();
    for pair in hist.windows(2) {
        if (m0..=m1).contains(&pair[1].timestamp) {
            intervals.push(pair[1].timestamp.saturating_sub(pair[0].timestamp) as f64);
        }
    }
    for r in hist.iter().filter(|r| (m0..=m1).contains(&r.timestamp)) {
        io_ms.push((r.read_ms + r.write_ms) as f64);
    }
    Ok(Window {
        daemon_ms_per_s: d1.ticks.saturating_sub(d0.ticks) as f64 * tick_ms / wall,
        lease_threads_ms_per_s: lease_ticks as f64 * tick_ms / wall,
        io_per_s,
        renewal_intervals_s: intervals,
        renewal_io_ms: io_ms,
    })
}

/// The renewal cost with `vms` leased VMMs, over the windows.
#[derive(Debug, Serialize)]
struct CostRow {
    vms: usize,
    /// The daemon's CPU (all threads and its helper), ms per second of wall time.
    daemon_cpu_ms_per_s: Summary,
    /// The VMMs' lease threads (sum over the VMMs), ms per second.
    lease_threads_cpu_ms_per_s: Summary,
    /// Both: the host's cost, ms per second (÷10: % of one core).
    host_cpu_ms_per_s: Summary,
    /// The daemon's `/proc/PID/io` counters per second (medians).
    daemon_io_per_s: BTreeMap<String, f64>,
    /// Intervals between the daemon's renewals seen in the windows, seconds.
    renewal_interval_s: Option<Summary>,
    /// Read plus write time of those renewals, ms.
    renewal_io_ms: Option<Summary>,
}

#[derive(Debug, Serialize)]
struct CostReport {
    io_timeout: u32,
    /// Whether the guests ran (`--running`) or were paused with their leases held.
    guests_running: bool,
    seconds: u64,
    scratch_fs: String,
    rows: Vec<CostRow>,
    /// (host cost with `--vms` VMMs - with none) / `--vms`, ms per second per VM (medians).
    per_vm_increment_ms_per_s: Option<f64>,
}

fn renewal_cost(ferry: &Path, args: &LeasesArgs, scratch: &Path) -> anyhow::Result<CostReport> {
    let daemon = Daemon::start(scratch, &format!("lbench-{}", std::process::id()), &[])?;
    let ids = scratch.join("ids");
    zero_file(&ids, MIB)?;
    // The daemon this process talks to: the only one, set before any other thread runs.
    daemon.use_in_this_process();
    let ls = Lockspace::new(LS, 1, &ids)?;
    ls.format(args.io_timeout)?;
    eprintln!(
        "leases: joining the lockspace (io_timeout {} s: about {} s)",
        args.io_timeout,
        2 * args.io_timeout + 1
    );
    ls.add(args.io_timeout)?;
    let lease = format!("{LS}:1:{},io_timeout={}", ids.display(), args.io_timeout);
    let mut counts = vec![0, 1, args.vms];
    counts.dedup();
    let mut rows = Vec::new();
    for &n in &counts {
        let dir = scratch.join(format!("vms-{n}"));
        std::fs::create_dir_all(&dir)?;
        eprintln!("leases: {n} leased VMM(s): starting");
        let mut vmms = start_vmms(ferry, &daemon, &lease, &dir, n, args.running)?;
        sleep(Duration::from_secs(2))?;
        let mut ws = Vec::new();
        for r in 0..args.runs {
            eprintln!("leases: {n} VMM(s), window {}/{} ({} s)", r + 1, args.runs, args.seconds);
            ws.push(window(&daemon, &mut vmms, args.seconds)?);
        }
        drop(vmms);
        let _ = std::fs::remove_dir_all(&dir);
        let d: Vec<f64> = ws.iter().map(|w| w.daemon_ms_per_s).collect();
        let l: Vec<f64> = ws.iter().map(|w| w.lease_threads_ms_per_s).collect();
        let h: Vec<f64> = ws.iter().map(|w| w.daemon_ms_per_s + w.lease_threads_ms_per_s).collect();
        let keys: Vec<String> = ws[0].io_per_s.keys().cloned().collect();
        let io = keys
            .into_iter()
            .map(|k| {
                let v: Vec<f64> = ws.iter().map(|w| w.io_per_s.get(&k).copied().unwrap_or(0.0)).collect();
                (k, Summary::of(&v).median)
            })
            .collect();
        let iv: Vec<f64> = ws.iter().flat_map(|w| w.renewal_intervals_s.clone()).collect();
        let rio: Vec<f64> = ws.iter().flat_map(|w| w.renewal_io_ms.clone()).collect();
        rows.push(CostRow {
            vms: n,
            daemon_cpu_ms_per_s: Summary::of(&d),
            lease_threads_cpu_ms_per_s: Summary::of(&l),
            host_cpu_ms_per_s: Summary::of(&h),
            daemon_io_per_s: io,
            renewal_interval_s: (!iv.is_empty()).then(|| Summary::of(&iv)),
            renewal_io_ms: (!rio.is_empty()).then(|| Summary::of(&rio)),
        });
    }
    let _ = ls.rem();
    let zero = rows.iter().find(|r| r.vms == 0).map(|r| r.host_cpu_ms_per_s.median);
    let many = rows.iter().find(|r| r.vms == args.vms && r.vms > 0).map(|r| r.host_cpu_ms_per_s.median);
    let per_vm = match (zero, many) {
        (Some(z), Some(m)) => Some((m - z) / args.vms as f64),
        _ => None,
    };
    Ok(CostReport {
        io_timeout: args.io_timeout,
        guests_running: args.running,
        seconds: args.seconds,
        scratch_fs: fs_type(scratch),
        rows,
        per_vm_increment_ms_per_s: per_vm,
    })
}

// ---------------------------------------------------------------------------------------
// Part 2: hand-over

/// How the lease moves from the source's host to the destination's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// What Ferry's VMM does: `Lease::release` on the source; `Lease::acquire` on the
    /// destination (register, killpath, acquire, inquire for the version).
    Vmm,
    /// The same calls one by one, timed each (the breakdown of [`Scheme::Vmm`]).
    Steps,
    /// The destination registers and sets its killpath during pre-copy; at the switchover
    /// it only acquires, with the version it expects (`SANLK_RES_LVER`, from the source's
    /// record), so that no inquire is needed.
    Preregistered,
    /// During pre-copy the source converts its lease to shared and the destination
    /// acquires it shared; at the switchover the source releases and the destination
    /// converts to exclusive.
    SharedConvert,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Steps => "steps",
            Self::Preregistered => "preregistered",
            Self::SharedConvert => "shared-convert",
        }
    }
}

/// The `lease-host` side: one host's "VMM", talking to its own daemon (`SANLOCK_RUN_DIR`).
/// Reads commands on stdin, answers one line each (`ok FIGURES...` or `err MESSAGE`).
pub fn lease_host() -> anyhow::Result<()> {
    let killpath = KillPath { program: "/bin/true".into(), args: String::new() };
    let mut res: Option<(Resource, Layout)> = None;
    let mut lease: Option<Lease> = None;
    let mut conn: Option<RawConn> = None;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
        let r: anyhow::Result<String> = (|| {
            let cur = || res.clone().context("no resource chosen");
            Ok(match w.as_slice() {
                ["join", ids, id, io] => {
                    let t = Instant::now();
                    Lockspace::new(LS, id.parse()?, Path::new(ids))?.add(io.parse()?)?;
                    format!("{:.3}", ms(t))
                }
                ["use", path, name, sector4k, num_hosts] => {
                    let layout = Layout { sector4k: *sector4k == "1", num_hosts: num_hosts.parse()? };
                    res = Some((Resource::new(LS, name, Path::new(path))?, layout));
                    String::new()
                }
                ["format"] => {
                    let (r, l) = cur()?;
                    l.format(&r)?;
                    String::new()
                }
                ["prepare"] => {
                    let c = RawConn::register()?;
                    c.killpath(&killpath)?;
                    conn = Some(c);
                    String::new()
                }
                ["prepare-shared"] => {
                    let (r, l) = cur()?;
                    let c = RawConn::register()?;
                    c.killpath(&killpath)?;
                    c.acquire(&r, l, AcquireMode { shared: true, lver: None })?;
                    conn = Some(c);
                    String::new()
                }
                ["to-shared"] => {
                    let (r, l) = cur()?;
                    conn.as_ref().context("no connection")?.convert(&r, l, true)?;
                    String::new()
                }
                ["acquire", "vmm"] => {
                    let (r, _) = cur()?;
                    let t = Instant::now();
                    let l = Lease::acquire(&r, Some(&killpath))?;
                    let took = ms(t);
                    let v = l.lver();
                    lease = Some(l);
                    format!("{took:.3} {v}")
                }
                ["acquire", "steps"] => {
                    let (r, l) = cur()?;
                    let t = Instant::now();
                    let c = RawConn::register()?;
                    let reg = ms(t);
                    let t1 = Instant::now();
                    c.killpath(&killpath)?;
                    let kp = ms(t1);
                    let t2 = Instant::now();
                    c.acquire(&r, l, AcquireMode::default())?;
                    let acq = ms(t2);
                    let t3 = Instant::now();
                    let v = c.lver(&r.name)?;
                    let inq = ms(t3);
                    let took = ms(t);
                    conn = Some(c);
                    format!(
                        "{took:.3} {v} register={reg:.3} killpath={kp:.3} acquire={acq:.3} inquire={inq:.3}"
                    )
                }
                ["acquire", "preregistered", lver] => {
                    let (r, l) = cur()?;
                    let c = conn.as_ref().context("not prepared")?;
                    let lver: u64 = lver.parse()?;
                    let t = Instant::now();
                    c.acquire(&r, l, AcquireMode { shared: false, lver: Some(lver) })?;
                    format!("{:.3} {}", ms(t), lver + 1)
                }
                ["acquire", "shared-convert"] => {
                    let (r, l) = cur()?;
                    let c = conn.as_ref().context("not prepared")?;
                    let t = Instant::now();
                    c.convert(&r, l, false)?;
                    format!("{:.3} 0", ms(t))
                }
                ["release"] => {
                    let t = Instant::now();
                    if let Some(mut l) = lease.take() {
                        l.release()?;
                    } else {
                        let (r, l) = cur()?;
                        conn.as_ref().context("nothing held")?.release(&r, l)?;
                    }
                    let took = ms(t);
                    conn = None;
                    format!("{took:.3}")
                }
                _ => bail!("unknown command {line:?}"),
            })
        })();
        match r {
            Ok(s) => writeln!(out, "ok {s}")?,
            Err(e) => writeln!(out, "err {e:#}")?,
        }
        out.flush()?;
    }
    Ok(())
}

/// A `lease-host` process; killed when dropped.
struct HostProc {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HostProc {
    fn spawn(daemon: &Daemon) -> anyhow::Result<Self> {
        let me = std::env::current_exe()?;
        let mut child = Command::new(me)
            .arg("lease-host")
            .env(RUN_DIR_ENV, daemon.run_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start ferry-bench lease-host")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Self { name: daemon.host_name().to_owned(), child, stdin, stdout })
    }

    fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn reply(&mut self, cmd: &str) -> anyhow::Result<Vec<String>> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim_end().split_once(' ').unwrap_or((line.trim_end(), "")) {
            ("ok", rest) => Ok(rest.split_whitespace().map(str::to_owned).collect()),
            ("err", e) => bail!("{} {cmd}: {e}", self.name),
            _ => bail!("{} {cmd}: the lease host ended ({line:?})", self.name),
        }
    }

    fn call(&mut self, cmd: &str) -> anyhow::Result<Vec<String>> {
        check_interrupt()?;
        self.send(cmd)?;
        self.reply(cmd)
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One variant's hand-overs.
#[derive(Debug, Serialize)]
struct HandoverRow {
    storage: String,
    fs: String,
    scheme: Scheme,
    sector: u32,
    num_hosts: u32,
    handovers: usize,
    release_ms: Pct,
    acquire_ms: Pct,
    total_ms: Pct,
    /// For the `steps` scheme: the median of each call, ms.
    steps_ms: BTreeMap<String, f64>,
}

/// Median and 90th percentile.
#[derive(Debug, Serialize)]
struct Pct {
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
}

impl Pct {
    fn of(v: &[f64]) -> Self {
        let s = Summary::of(v);
        Self { median: s.median, p90: percentile(v, 90.0), min: s.min, max: s.max }
    }
}

fn ms_of(reply: &[String]) -> anyhow::Result<f64> {
    reply.first().context("no time in the reply")?.parse().context("bad time in the reply")
}

fn handover_variant(
    hosts: &mut [HostProc; 2],
    dir: &Path,
    storage: &str,
    scheme: Scheme,
    layout: Layout,
    n: usize,
) -> anyhow::Result<HandoverRow> {
    let name = ferry_lease::new_resource_name();
    let path =
        dir.join(format!("lease-{}-{}-{}", scheme.name(), layout.num_hosts, u8::from(layout.sector4k)));
    zero_file(&path, MIB)?;
    let using = format!("use {} {name} {} {}", path.display(), u8::from(layout.sector4k), layout.num_hosts);
    for h in hosts.iter_mut() {
        h.call(&using)?;
    }
    hosts[0].call("format")?;
    // Host 1 holds the lease first (not timed).
    let first = if scheme == Scheme::Vmm { "acquire vmm" } else { "acquire steps" };
    let mut lver: u64 = hosts[0].call(first)?.get(1).context("no lease version")?.parse()?;
    let (mut rel, mut acq, mut tot) = (Vec::new(), Vec::new(), Vec::new());
    let mut steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in 0..n {
        let (s, d) = if i % 2 == 0 { (0, 1) } else { (1, 0) };
        // Pre-copy: what the scheme does before the switchover (not timed).
        match scheme {
            Scheme::Preregistered => {
                hosts[d].call("prepare")?;
            }
            Scheme::SharedConvert => {
                hosts[s].call("to-shared")?;
                hosts[d].call("prepare-shared")?;
            }
            Scheme::Vmm | Scheme::Steps => {}
        }
        // The switchover.
        let r = ms_of(&hosts[s].call("release")?)?;
        let cmd = match scheme {
            Scheme::Preregistered => format!("acquire preregistered {lver}"),
            other => format!("acquire {}", other.name()),
        };
        let reply = hosts[d].call(&cmd)?;
        let a = ms_of(&reply)?;
        if scheme == Scheme::SharedConvert {
            lver += 1;
        } else {
            lver = reply.get(1).context("no lease version")?.parse()?;
        }
        for kv in reply.iter().skip(2) {
            if let Some((k, v)) = kv.split_once('=') {
                steps.entry(k.to_owned()).or_default().push(v.parse()?);
            }
        }
        rel.push(r);
        acq.push(a);
        tot.push(r + a);
    }
    // The last holder lets go, so the next variant starts clean.
    let last = if n % 2 == 0 { 0 } else { 1 };
    hosts[last].call("release")?;
    let _ = std::fs::remove_file(&path);
    Ok(HandoverRow {
        storage: storage.to_owned(),
        fs: fs_type(dir),
        scheme,
        sector: if layout.sector4k { 4096 } else { 512 },
        num_hosts: layout.num_hosts,
        handovers: n,
        release_ms: Pct::of(&rel),
        acquire_ms: Pct::of(&acq),
        total_ms: Pct::of(&tot),
        steps_ms: steps.into_iter().map(|(k, v)| (k, Summary::of(&v).median)).collect(),
    })
}

fn handover(args: &LeasesArgs, scratch: &Path) -> anyhow::Result<Vec<HandoverRow>> {
    ensure!(args.handovers > 0, "--handovers must be at least 1");
    let tmpfs = Scratch(args.tmpfs_dir.join(format!("ferry-lbench-{}", std::process::id())));
    std::fs::create_dir_all(tmpfs.path())
        .with_context(|| format!("cannot create {}", tmpfs.path().display()))?;
    let disk = scratch.join("handover");
    std::fs::create_dir_all(&disk)?;
    let mut stores = vec![("tmpfs".to_owned(), tmpfs.path().to_owned()), ("disk".to_owned(), disk.clone())];
    let mut extra_dirs = Vec::new();
    for s in &args.store {
        let (name, dir) = s.split_once('=').with_context(|| format!("--store {s:?}: expected NAME=DIR"))?;
        let d = Scratch(Path::new(dir).join(format!("ferry-lbench-{}", std::process::id())));
        std::fs::create_dir_all(d.path()).with_context(|| format!("cannot create {}", d.path().display()))?;
        stores.push((name.to_owned(), d.path().to_owned()));
        extra_dirs.push(d);
    }
    let extra: Vec<&str> = args.daemon_arg.iter().map(String::as_str).collect();
    let mut rows = Vec::new();
    for (storage, dir) in &stores {
        let (storage, dir) = (storage.as_str(), dir.as_path());
        let pid = std::process::id();
        let daemons = [
            Daemon::start(scratch, &format!("lbench-h1-{pid}"), &extra)?,
            Daemon::start(scratch, &format!("lbench-h2-{pid}"), &extra)?,
        ];
        let mut hosts = [HostProc::spawn(&daemons[0])?, HostProc::spawn(&daemons[1])?];
        let ids = dir.join("ids");
        zero_file(&ids, MIB)?;
        let out = Command::new("sanlock")
            .args([
                "direct",
                "init",
                "-s",
                &format!("{LS}:0:{}:0", ids.display()),
                "-Z",
                "512",
                "-A",
                "1M",
                "-o",
            ])
            .arg(args.io_timeout.to_string())
            .output()
            .context("cannot run sanlock direct init")?;
        ensure!(out.status.success(), "sanlock direct init: {}", String::from_utf8_lossy(&out.stderr));
        eprintln!(
            "leases: hand-over on {storage} ({}, {}): both hosts join (about {} s)",
            dir.display(),
            fs_type(dir),
            2 * args.io_timeout + 1
        );
        for (i, h) in hosts.iter_mut().enumerate() {
            h.send(&format!("join {} {} {}", ids.display(), i + 1, args.io_timeout))?;
        }
        for h in hosts.iter_mut() {
            h.reply("join")?;
        }
        let mut variants = vec![(Scheme::Vmm, Layout::default())];
        if args.ideas {
            variants.extend([
                (Scheme::Steps, Layout::default()),
                (Scheme::Preregistered, Layout::default()),
                (Scheme::SharedConvert, Layout::default()),
                (Scheme::Steps, Layout { sector4k: false, num_hosts: 8 }),
                (Scheme::Preregistered, Layout { sector4k: false, num_hosts: 8 }),
            ]);
        }
        for (scheme, layout) in variants {
            eprintln!(
                "leases: hand-over on {storage}: {} sector {} num_hosts {}",
                scheme.name(),
                if layout.sector4k { 4096 } else { 512 },
                layout.num_hosts
            );
            rows.push(handover_variant(&mut hosts, dir, storage, scheme, layout, args.handovers)?);
        }
        drop(hosts);
        drop(daemons);
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Report {
    renewal: Option<CostReport>,
    /// Extra options of the hand-over's daemons.
    handover_daemon_args: Vec<String>,
    handover: Vec<HandoverRow>,
}

/// Runs the benchmark and prints the tables (or JSON).
pub fn run(ferry: &Path, args: &LeasesArgs, json: bool) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(args.seconds > 0, "--seconds must be at least 1");
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let scratch = Scratch::new("lbench")?;
    let renewal = if args.no_renewal { None } else { Some(renewal_cost(ferry, args, scratch.path())?) };
    let handover = if args.no_handover { Vec::new() } else { handover(args, scratch.path())? };
    let report = Report { renewal, handover_daemon_args: args.daemon_arg.clone(), handover };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let f = |s: &Summary| format!("{:.2} [{:.2}..{:.2}]", s.median, s.min, s.max);
    if let Some(c) = &report.renewal {
        println!(
            "leases: renewal cost on one host (memstress 16 MiB VMs {}, io_timeout {} s, {} s windows, scratch on {}; median [min..max] of {} windows)",
            if c.guests_running { "running" } else { "paused, lease held" },
            c.io_timeout,
            c.seconds,
            c.scratch_fs,
            c.rows.first().map(|r| r.daemon_cpu_ms_per_s.runs).unwrap_or(0)
        );
        println!(
            "{:>4}  {:>24}  {:>24}  {:>24}  {:>7}  {:>10}  {:>10}  {:>14}",
            "VMs",
            "daemon CPU (ms/s)",
            "lease threads (ms/s)",
            "host (ms/s)",
            "% core",
            "rd B/s",
            "wr B/s",
            "renewal (s)"
        );
        for r in &c.rows {
            let io = |k: &str| r.daemon_io_per_s.get(k).copied().unwrap_or(0.0);
            println!(
                "{:>4}  {:>24}  {:>24}  {:>24}  {:>7.3}  {:>10.0}  {:>10.0}  {:>14}",
                r.vms,
                f(&r.daemon_cpu_ms_per_s),
                f(&r.lease_threads_cpu_ms_per_s),
                f(&r.host_cpu_ms_per_s),
                r.host_cpu_ms_per_s.median / 10.0,
                io("read_bytes"),
                io("write_bytes"),
                r.renewal_interval_s
                    .as_ref()
                    .map(|s| format!("{:.0} ({} seen)", s.median, s.runs))
                    .unwrap_or_else(|| "none seen".into())
            );
        }
        if let Some(p) = c.per_vm_increment_ms_per_s {
            println!("per-VM increment: {p:.4} ms/s ({:.5} % of one core)", p / 10.0);
        }
        println!("(CPU from /proc tick counts, {} ticks/s; daemon I/O from /proc/PID/io)", ticks_per_s());
    }
    if !report.handover.is_empty() {
        println!(
            "leases: hand-over of one VM's lease between two hosts' daemons, {} times each{} (ms: median / p90)",
            args.handovers,
            if args.daemon_arg.is_empty() { String::new() } else { format!(", daemons with {}", args.daemon_arg.join(" ")) }
        );
        println!(
            "{:>6}  {:>10}  {:>15}  {:>7}  {:>6}  {:>15}  {:>15}  {:>15}",
            "store", "fs", "scheme", "sector", "hosts", "release", "acquire", "total"
        );
        for r in &report.handover {
            let p = |x: &Pct| format!("{:.2} / {:.2}", x.median, x.p90);
            let hosts = if r.num_hosts == 0 { "all".to_owned() } else { r.num_hosts.to_string() };
            println!(
                "{:>6}  {:>10}  {:>15}  {:>7}  {:>6}  {:>15}  {:>15}  {:>15}",
                r.storage,
                r.fs,
                r.scheme.name(),
                r.sector,
                hosts,
                p(&r.release_ms),
                p(&r.acquire_ms),
                p(&r.total_ms)
            );
            if !r.steps_ms.is_empty() {
                let s: Vec<String> = r.steps_ms.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
                println!("{:>6}  acquire's calls (median ms): {}", "", s.join(", "));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        let line = "4242 (lease-probe) S 1 4200 4200 0 -1 4194368 50 0 0 0 7 3 0 0 20 0 3 0 123 0 0";
        assert_eq!(parse_stat(line), Some(ProcStat { comm: "lease-probe".into(), pgrp: 4200, ticks: 10 }));
        // A name with spaces and parentheses ends at the last ')'.
        let line = "7 (a) b (c)) R 1 9 9 0 -1 0 0 0 0 0 120 80 0 0";
        assert_eq!(parse_stat(line), Some(ProcStat { comm: "a) b (c)".into(), pgrp: 9, ticks: 200 }));
        assert_eq!(parse_stat("12 (x) S 1"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn io_counters() {
        let io = parse_io("rchar: 10\nwchar: 20\nsyscr: 3\nread_bytes: 4096\nbogus\nx: y\n");
        assert_eq!(io.get("rchar"), Some(&10));
        assert_eq!(io.get("read_bytes"), Some(&4096));
        assert_eq!(io.len(), 4);
    }

    #[test]
    fn renewal_history() {
        let text = "timestamp=5332 read_ms=482 write_ms=5525 next_timeouts=0 next_errors=0\n\
                    timestamp=5353 read_ms=0 write_ms=1 next_timeouts=0 next_errors=0\nnoise\n";
        assert_eq!(
            parse_renewals(text),
            vec![
                Renewal { timestamp: 5332, read_ms: 482, write_ms: 5525 },
                Renewal { timestamp: 5353, read_ms: 0, write_ms: 1 }
            ]
        );
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 90.0), 18.0);
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&[3.0], 90.0), 3.0);
    }
}
