//! Migration: live-migrates memstress (1 GiB, 512 MiB random initrd, wss=64M) between two
//! `ferry` processes over loopback, several runs, and measures one plain TCP stream on
//! loopback in the same run as the throughput reference. When `qemu-system-x86_64` is on
//! PATH, the same invocation also migrates the same guest ELF with the same initrd file
//! between two QEMUs (microvm, KVM; see `qemu.rs`), one QEMU run after each Ferry run, and reports
//! QEMU's figures and the Ferry/QEMU ratios next to Ferry's.
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
            format!("wss={}", self.wss())
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
    /// One TCP stream from populated memory into fresh memory (what pass 1 must do).
    tcp_into_fresh_memory_mb_s: f64,
    pass1_vs_fresh: f64,
    /// What dirtier felt (pages/s before and during the migration, longest pause).
    guest_felt: Option<FeltSummary>,
    /// The same migration with QEMU; `null` when `qemu-system-x86_64` is not on PATH.
    qemu: Option<QemuReport>,
    /// With dirtier: QEMU with XBZRLE and auto-converge.
    qemu_xbzrle_auto_converge: Option<QemuReport>,
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

/// MB/s of one TCP stream on loopback carrying `mib` MiB from populated memory into fresh
/// memory (never touched, advised for transparent huge pages), the way a migration's first
/// pass must: no warm 2 MiB buffers on either side, every byte received lands on a page the
/// kernel has to allocate. Median of three; no guest runs meanwhile.
fn tcp_into_fresh_memory(mib: usize) -> anyhow::Result<f64> {
    let len = mib << 20;
    let src: std::sync::Arc<Vec<u8>> = std::sync::Arc::new((0..len).map(|i| (i ^ (i >> 12)) as u8).collect());
    let mut rates = Vec::new();
    for _ in 0..3 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let data = src.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let mut s = TcpStream::connect(addr)?;
            for chunk in data.chunks(2 << 20) {
                s.write_all(chunk)?;
            }
            Ok(())
        });
        let (mut r, _) = l.accept()?;
        let fresh = FreshMemory::new(len)?;
        let t = Instant::now();
        // SAFETY: `fresh` is a private anonymous mapping of `len` bytes that nothing else
        // uses and that outlives the slice.
        let buf = unsafe { std::slice::from_raw_parts_mut(fresh.0.cast::<u8>(), len) };
        r.read_exact(buf)?;
        rates.push(len as f64 / t.elapsed().as_secs_f64() / 1e6);
        writer.join().map_err(|_| anyhow::anyhow!("writer thread failed"))??;
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[1])
}

/// A fresh anonymous mapping advised for huge pages, unmapped on drop.
struct FreshMemory(*mut libc::c_void, usize);

impl FreshMemory {
    fn new(len: usize) -> anyhow::Result<Self> {
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
        // SAFETY: advice on the mapping just made; failure (no THP) changes nothing.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
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
        let out = Command::new(ferry)
            .args(["migrate", "--api-socket", &s(&src_sock), "--to", &format!("tcp:127.0.0.1:{port}")])
            .args([
                "--auth-key-file",
                &s(key),
                "--downtime-ms",
                &args.downtime_ms.to_string(),
                "--streams",
                &args.streams.to_string(),
                "--json",
                "--quiet",
            ])
            .output()?;
        let vcpu_share = sampler.stop();
        let mut report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("no report: {}", String::from_utf8_lossy(&out.stderr)))?;
        report["bench_vcpu_share"] = serde_json::json!(vcpu_share);
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
    let reports = &runs.ferry;
    let tcp = tcp_stream(Duration::from_secs(1))?;
    let fresh = tcp_into_fresh_memory(args.initrd_mib as usize)?;
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
        tcp_into_fresh_memory_mb_s: fresh,
        pass1_vs_fresh: pass1.median / fresh,
        pass1_mb_s: pass1,
        vcpu_share_pct: vcpu,
        streams: args.streams,
        tcp_stream_mb_s: tcp,
        guest_felt: FeltSummary::of(&felt),
        qemu: None,
        qemu_xbzrle_auto_converge: None,
    };
    if let Some(q) = &runs.qemu_bin {
        report.qemu = qemu_report(q, &runs.qemu, &report);
        report.qemu_xbzrle_auto_converge = qemu_report(q, &runs.qemu_xbzrle, &report);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let p = |name: &str, s: &Summary, unit: &str| {
            println!(
                "{name:<27} median {:>9.2} {unit}  [{:.2} .. {:.2}]  ({} runs)",
                s.median, s.min, s.max, s.runs
            )
        };
        let initrd =
            if args.dirtier() { "no initrd".to_string() } else { format!("{} MiB initrd", args.initrd_mib) };
        println!(
            "migration of {} ({} memory, {initrd}, {}, {} stream{}):",
            args.guest,
            args.memory,
            args.cmdline(),
            args.streams,
            if args.streams == 1 { "" } else { "s" }
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
        felt("", &report.guest_felt);
        println!(
            "{:<27} {:>13.0} MB/s (pass 1 reaches {:.0}% of it)",
            "one TCP stream",
            tcp,
            report.pass1_vs_tcp * 100.0
        );
        println!(
            "{:<27} {:>13.0} MB/s (pass 1 reaches {:.0}% of it)",
            "one stream, fresh memory",
            fresh,
            report.pass1_vs_fresh * 100.0
        );
        match &report.qemu {
            None if args.without_qemu => println!("QEMU side by side: skipped (--without-qemu)"),
            None => println!(
                "QEMU side by side: skipped, {} is not on PATH (scripts/bench.sh installs it)",
                qemu::BINARY
            ),
            Some(q) => {
                let same = if args.dirtier() { "same ELF and command line" } else { "same ELF and initrd" };
                println!("QEMU side by side, {same} ({}):", q.version);
                p("QEMU total", &q.total_ms, "ms");
                p("QEMU downtime", &q.downtime_ms, "ms");
                p("QEMU setup", &q.setup_ms, "ms");
                p("QEMU sent (RAM)", &q.bytes_mib, "MiB");
                p("QEMU passes (syncs)", &q.passes, "");
                felt("QEMU ", &q.guest_felt);
                println!(
                    "Ferry/QEMU: total {:.2}x (Ferry under half of QEMU: {}), downtime {:.2}x",
                    q.total_ratio,
                    if q.total_under_half { "yes" } else { "no" },
                    q.downtime_ratio
                );
            }
        }
        if let Some(q) = &report.qemu_xbzrle_auto_converge {
            println!("QEMU with XBZRLE and auto-converge:");
            p("QEMU+ total", &q.total_ms, "ms");
            p("QEMU+ downtime", &q.downtime_ms, "ms");
            p("QEMU+ sent (RAM)", &q.bytes_mib, "MiB");
            p("QEMU+ passes (syncs)", &q.passes, "");
            p("QEMU+ throttle at end", &q.throttle_pct, "%");
            felt("QEMU+ ", &q.guest_felt);
            println!(
                "Ferry/QEMU+: total {:.2}x (Ferry under half: {}), downtime {:.2}x",
                q.total_ratio,
                if q.total_under_half { "yes" } else { "no" },
                q.downtime_ratio
            );
        }
    }
    Ok(())
}

/// The guest's TSC frequency from dirtier's first console line (`... tsc_khz=N`).
fn tsc_khz(console: &str) -> Option<u64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("dirtier: wss=")?.split_once(" tsc_khz=")?.1.trim().parse().ok())
}

/// Ferry's reports, and QEMU's runs (plain; with XBZRLE and auto-converge) when QEMU runs.
struct Runs {
    ferry: Vec<serde_json::Value>,
    qemu_bin: Option<PathBuf>,
    qemu: Vec<qemu::Run>,
    qemu_xbzrle: Vec<qemu::Run>,
}

/// Ferry's runs, each followed by QEMU's run of the same guest when QEMU is installed
/// (interleaved, so that a change in the machine's load affects both sides alike); with
/// dirtier also QEMU with XBZRLE and auto-converge.
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
    let mut runs =
        Runs { ferry: Vec::new(), qemu_bin: qemu_bin.clone(), qemu: Vec::new(), qemu_xbzrle: Vec::new() };
    let felt = |r: &Option<Felt>| match r {
        Some(f) => format!(
            "; guest {:.0} pages/s before, {:.0} during, longest pause {:.1} ms",
            f.rate_before, f.rate_during, f.max_gap_ms
        ),
        None => String::new(),
    };
    for i in 0..args.runs {
        let r = one_run(ferry, dir, args, initrd, key).with_context(|| format!("run {}", i + 1))?;
        if !json {
            let f: Option<Felt> = serde_json::from_value(r["bench_guest_felt"].clone()).ok();
            eprintln!(
                "run {}: total {:.0} ms, downtime {:.2} ms, {} passes{}",
                i + 1,
                r["total_ms"].as_f64().unwrap_or(0.0),
                r["downtime_ms"].as_f64().unwrap_or(0.0),
                r["passes"].as_array().map(Vec::len).unwrap_or(0),
                felt(&f)
            );
        }
        let tsc_hz = r["bench_tsc_khz"].as_u64().map(|k| k * 1000);
        runs.ferry.push(r);
        let (Some(q), Some((elf, memory))) = (&qemu_bin, &setup) else { continue };
        let variants: &[bool] = if args.dirtier() { &[false, true] } else { &[false] };
        for &xbzrle in variants {
            let s = qemu::Setup {
                elf,
                initrd: (!args.dirtier()).then_some(initrd),
                memory: *memory,
                append: &cmdline,
                ready: args.ready(),
                tsc_hz,
                xbzrle_auto_converge: xbzrle,
                dirtier: args.dirtier(),
                downtime_ms: args.downtime_ms,
            };
            let name = if xbzrle { "QEMU (xbzrle, auto-converge)" } else { "QEMU" };
            let r = qemu::one_run(q, dir, &s).with_context(|| format!("{name} run {}", i + 1))?;
            if !json {
                eprintln!(
                    "{name} run {}: total {:.0} ms, downtime {:.2} ms, {} passes, throttle {:.0}%{}",
                    i + 1,
                    r.total_ms,
                    r.downtime_ms,
                    r.passes,
                    r.throttle_pct,
                    felt(&r.guest)
                );
            }
            if xbzrle {
                runs.qemu_xbzrle.push(r);
            } else {
                runs.qemu.push(r);
            }
        }
    }
    Ok(runs)
}

fn qemu_report(qemu: &Path, runs: &[qemu::Run], ferry: &Report) -> Option<QemuReport> {
    if runs.is_empty() {
        return None;
    }
    let f = |g: fn(&qemu::Run) -> f64| -> Summary { Summary::of(&runs.iter().map(g).collect::<Vec<_>>()) };
    let total_ms = f(|r| r.total_ms);
    let downtime_ms = f(|r| r.downtime_ms);
    let total_ratio = ferry.total_ms.median / total_ms.median;
    let felt: Vec<Felt> = runs.iter().filter_map(|r| r.guest.clone()).collect();
    Some(QemuReport {
        version: qemu::version(qemu).unwrap_or_else(|e| format!("unknown version ({e:#})")),
        setup_ms: f(|r| r.setup_ms),
        bytes_mib: f(|r| r.bytes / (1u64 << 20) as f64),
        passes: f(|r| r.passes),
        total_ratio,
        downtime_ratio: ferry.downtime_ms.median / downtime_ms.median,
        total_under_half: total_ratio < 0.5,
        throttle_pct: f(|r| r.throttle_pct),
        guest_felt: FeltSummary::of(&felt),
        total_ms,
        downtime_ms,
    })
}
