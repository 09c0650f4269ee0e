//! Checkpoint: snapshot time and size, and restore time to running vCPUs, for a 1 GiB
//! memstress guest holding 512 MiB of random initrd content.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::stats::Summary;

/// Arguments of the checkpoint benchmark.
#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// Runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Initrd size in MiB (random content).
    #[arg(long, default_value_t = 512)]
    initrd_mib: u64,
    /// Scratch directory (default: a new one under /tmp, removed at the end).
    #[arg(long)]
    scratch: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    memory: String,
    initrd_mib: u64,
    snapshot_total_ms: Summary,
    snapshot_paused_ms: Summary,
    snapshot_disk_mib: Summary,
    restore_to_running_vcpus_ms: Summary,
    restore_main_to_running_vcpus_ms: Summary,
}

pub(crate) fn write_random(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

pub(crate) fn wait_file_line(path: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).map(|s| s.contains(needle)).unwrap_or(false) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{needle:?} did not appear in {} within {timeout:?}", path.display())
}

fn stop(mut child: Child) -> anyhow::Result<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "ferry exited with {status}");
    Ok(())
}

/// Reads stderr until the "vCPUs running" line; returns its monotonic timestamp and the
/// ms-after-main figure.
fn wait_running(child: &mut Child) -> anyhow::Result<(u64, f64)> {
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if line.contains("vCPUs running") {
            let ns: u64 = line
                .split("monotonic_ns=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|d| d.parse().ok())
                .context("no monotonic_ns")?;
            let ms: f64 = line
                .split("running ")
                .nth(1)
                .and_then(|s| s.split(" ms").next())
                .and_then(|s| s.parse().ok())
                .context("no ms figure")?;
            // Keep draining stderr so the VMM never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok((ns, ms));
        }
    }
    bail!("ferry ended before its vCPUs ran")
}

/// Runs the benchmark.
pub fn run(ferry: &Path, args: &CheckpointArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let owned = args.scratch.is_none();
    let scratch = args
        .scratch
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ferry-bench-ckpt-{}", std::process::id())));
    std::fs::create_dir_all(&scratch)?;
    let initrd = scratch.join("initrd.img");
    if !json {
        eprintln!("checkpoint: writing a {} MiB random initrd", args.initrd_mib);
    }
    write_random(&initrd, args.initrd_mib)?;
    let (mut total, mut paused, mut disk, mut restore, mut restore_main) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..args.runs {
        let sock = scratch.join("vm.sock");
        // A console of its own per run: a stale one would show passes before this VM runs.
        let console = scratch.join(format!("console{run}.log"));
        let snap = scratch.join(format!("snap{run}"));
        let child = Command::new(ferry)
            .args(["run", "--guest", "memstress", "--memory", &args.memory, "--cmdline", "wss=16M"])
            .arg("--initrd")
            .arg(&initrd)
            .arg("--api-socket")
            .arg(&sock)
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start ferry")?;
        wait_file_line(&console, "memstress: pass ", Duration::from_secs(60))?;
        let out = Command::new(ferry)
            .args(["snapshot", "--json", "--stop", "--api-socket"])
            .arg(&sock)
            .arg("--to")
            .arg(&snap)
            .output()?;
        anyhow::ensure!(out.status.success(), "snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut child = child;
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "suspended VMM exited with {status}");
        total.push(report["total_ms"].as_f64().context("total_ms")?);
        paused.push(report["paused_ms"].as_f64().context("paused_ms")?);
        disk.push(report["disk_bytes"].as_f64().context("disk_bytes")? / (1u64 << 20) as f64);

        let t0 = ferry_vmm::monotonic_ns();
        let mut restored = Command::new(ferry)
            .args(["restore", "--serial"])
            .arg(format!("file:{}", console.display()))
            .arg("--from")
            .arg(&snap)
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let (at, ms) = wait_running(&mut restored)?;
        restore.push(at.saturating_sub(t0) as f64 / 1e6);
        restore_main.push(ms);
        stop(restored)?;
        std::fs::remove_dir_all(&snap)?;
    }
    if owned {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let r = Report {
        memory: args.memory.clone(),
        initrd_mib: args.initrd_mib,
        snapshot_total_ms: Summary::of(&total),
        snapshot_paused_ms: Summary::of(&paused),
        snapshot_disk_mib: Summary::of(&disk),
        restore_to_running_vcpus_ms: Summary::of(&restore),
        restore_main_to_running_vcpus_ms: Summary::of(&restore_main),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let f = |s: &Summary| format!("{:>9.2}  [{:.2}..{:.2}]", s.median, s.min, s.max);
        println!(
            "checkpoint: memstress, {} memory, {} MiB random initrd, wss=16M; {} runs (median [min..max])",
            r.memory, r.initrd_mib, args.runs
        );
        println!("  snapshot total (ms)             {}", f(&r.snapshot_total_ms));
        println!("  snapshot vCPUs paused (ms)      {}", f(&r.snapshot_paused_ms));
        println!("  snapshot on disk (MiB)          {}", f(&r.snapshot_disk_mib));
        println!("  restore, spawn->vCPUs run (ms)  {}   target < 20 ms", f(&r.restore_to_running_vcpus_ms));
        println!("  restore, main()->vCPUs run (ms) {}", f(&r.restore_main_to_running_vcpus_ms));
    }
    Ok(())
}
