//! Devices: blkstress's disk throughput as the guest sees it (records written, each read
//! back and flushed) and as the host sees it (the VMM's read and write system calls), and
//! the network outage a client sees while the VM live-migrates between two hosts (network
//! namespaces joined by a bridge, see `ferry-testnet`): a ping every millisecond, the
//! longest silence between two replies, against the migration's downtime.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_testnet::{Net, HOST_B_IP, TAP, VM_IP};
use serde::Serialize;

use crate::checkpoint::wait_file_line;
use crate::stats::Summary;

/// Arguments of the devices benchmark.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// Runs of each measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// How long each disk run measures, seconds.
    #[arg(long, default_value_t = 3.0)]
    disk_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    runs: usize,
    /// Records per second blkstress completed (write, flush, read back, header update).
    disk_records_per_s: Summary,
    /// The guest's view: record payload written per second, KiB/s.
    disk_guest_write_kib_s: Summary,
    /// The host's view: bytes the VMM read and wrote per second (`/proc/PID/io`), KiB/s.
    disk_host_read_kib_s: Summary,
    /// Same, written.
    disk_host_write_kib_s: Summary,
    /// Longest gap between two ping replies during the migration, ms.
    net_outage_ms: Summary,
    /// The migrations' downtime, ms.
    net_downtime_ms: Summary,
    /// Longest gap between two replies in the second before the migration (the guest's own
    /// jitter: it answers by instruction emulation here), ms.
    net_gap_before_ms: Summary,
    /// Median outage minus median downtime (target: at most 10 ms).
    net_outage_over_downtime_ms: f64,
}

/// Kills the child at drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn io_counters(pid: u32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).context("read /proc/PID/io")?;
    let get =
        |k: &str| -> u64 { text.lines().find_map(|l| l.strip_prefix(k)?.trim().parse().ok()).unwrap_or(0) };
    Ok((get("rchar:"), get("wchar:")))
}

fn last_records(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("blkstress: records ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// One disk run: (records/s, guest KiB/s, host read KiB/s, host write KiB/s).
fn disk_run(ferry: &Path, dir: &Path, seconds: f64) -> anyhow::Result<(f64, f64, f64, f64)> {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let console = dir.join("blk.console");
    let _ = std::fs::remove_file(&console);
    let child = Command::new(ferry)
        .args(["run", "--guest", "blkstress", "--memory", "64M", "--home"])
        .arg(dir.join("blk.home"))
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .arg("--serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let child = Killed(child);
    wait_file_line(&console, "blkstress: records 64", Duration::from_secs(60))?;
    // The guest prints its count every 64 records: time the moments it changes.
    let (r0, w0) = io_counters(child.0.id())?;
    let t0 = Instant::now();
    let mut first: Option<(Instant, u64)> = None;
    let mut last: Option<(Instant, u64)> = None;
    let mut seen = last_records(&console);
    while t0.elapsed().as_secs_f64() < seconds {
        std::thread::sleep(Duration::from_millis(5));
        let n = last_records(&console);
        if n != seen {
            seen = n;
            let at = (Instant::now(), n);
            if first.is_none() {
                first = Some(at);
            }
            last = Some(at);
        }
    }
    let (r1, w1) = io_counters(child.0.id())?;
    let secs = t0.elapsed().as_secs_f64();
    drop(child);
    if std::fs::read_to_string(&console)?.contains("CORRUPTION") {
        bail!("blkstress reported CORRUPTION");
    }
    let (Some((ta, na)), Some((tb, nb))) = (first, last) else {
        bail!("blkstress made no progress in {seconds} s");
    };
    if nb == na {
        bail!("blkstress made too little progress in {seconds} s to measure; give more --disk-seconds");
    }
    let records = (nb - na) as f64 / (tb - ta).as_secs_f64();
    Ok((
        records,
        records * 512.0 / 1024.0,
        (r1 - r0) as f64 / secs / 1024.0,
        (w1 - w0) as f64 / secs / 1024.0,
    ))
}

/// One migration under ping: (outage ms, downtime ms, longest gap in the second before).
fn net_run(ferry: &Path, dir: &Path, run: usize) -> anyhow::Result<(f64, f64, f64)> {
    let net = Net::new(&format!("b{run}")).map_err(anyhow::Error::msg)?;
    let key = dir.join("key");
    std::fs::write(&key, [3u8; 32])?;
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (con_a, log_b) = (dir.join("a.console"), dir.join("b.log"));
    let _ = std::fs::remove_file(&con_a);
    let in_ns = |ns: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(ferry);
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    };
    let a = in_ns(&net.a)
        .args(["run", "--guest", "netecho", "--memory", "64M", "--cmdline"])
        .arg(format!("ip={VM_IP}/24"))
        .arg("--net")
        .arg(format!("tap={TAP},mac=52:54:00:77:00:02"))
        .arg("--api-socket")
        .arg(&sock_a)
        .arg("--home")
        .arg(dir.join(format!("home{run}")))
        .arg("--serial")
        .arg(format!("file:{}", con_a.display()))
        .stderr(Stdio::null())
        .spawn()?;
    let _a = Killed(a);
    wait_file_line(&con_a, "netecho: ready", Duration::from_secs(60))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("tcp:{HOST_B_IP}:{port}");
    let b = in_ns(&net.b)
        .args(["receive", "--serial", "null", "--listen", &listen, "--auth-key-file"])
        .arg(&key)
        .arg("--api-socket")
        .arg(&sock_b)
        .stderr(std::fs::File::create(&log_b)?)
        .spawn()?;
    let _b = Killed(b);
    wait_file_line(&log_b, "waiting for an incoming migration", Duration::from_secs(10))?;
    let ping_log = dir.join("ping.txt");
    let ping = Command::new("ip")
        .args(["netns", "exec", &net.client, "ping", "-D", "-i", "0.001", "-W", "1", VM_IP])
        .stdout(std::fs::File::create(&ping_log)?)
        .stderr(Stdio::null())
        .spawn()
        .context("ping (iputils-ping; scripts/setup.sh installs it)")?;
    let mut ping = Killed(ping);
    std::thread::sleep(Duration::from_millis(1000));
    let migrate_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let out = Command::new(ferry)
        .args(["migrate", "--quiet", "--json", "--api-socket"])
        .arg(&sock_a)
        .args(["--to", &listen, "--auth-key-file"])
        .arg(&key)
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("no report: {}", String::from_utf8_lossy(&out.stderr)))?;
    if report["status"] != "completed" {
        bail!("migration did not complete: {report}");
    }
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: signalling our own child (SIGINT makes ping flush its output).
    unsafe { libc::kill(ping.0.id() as i32, libc::SIGINT) };
    let _ = ping.0.wait();
    let times: Vec<f64> = std::fs::read_to_string(&ping_log)?
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    if times.len() < 100 {
        bail!("only {} ping replies: the VM did not answer", times.len());
    }
    let gap = |t: &[f64]| t.windows(2).map(|w| (w[1] - w[0]) * 1e3).fold(0.0, f64::max);
    let outage = gap(&times);
    let before: Vec<f64> = times.iter().copied().filter(|&t| t < migrate_at).collect();
    Ok((outage, report["downtime_ms"].as_f64().unwrap_or(0.0), gap(&before)))
}

pub fn run(ferry: &Path, args: &DevicesArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.disk_seconds > 0.0, "--disk-seconds must be positive");
    let dir = std::env::temp_dir().join(format!("ferry-bench-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> anyhow::Result<Report> {
        let mut disk = Vec::new();
        for i in 0..args.runs {
            let r =
                disk_run(ferry, &dir, args.disk_seconds).with_context(|| format!("disk run {}", i + 1))?;
            if !json {
                eprintln!(
                    "disk run {}: {:.0} records/s, host read {:.0} KiB/s, write {:.0} KiB/s",
                    i + 1,
                    r.0,
                    r.2,
                    r.3
                );
            }
            disk.push(r);
        }
        let mut nets = Vec::new();
        for i in 0..args.runs {
            let r = net_run(ferry, &dir, i).with_context(|| format!("network run {}", i + 1))?;
            if !json {
                eprintln!(
                    "network run {}: outage {:.1} ms, downtime {:.1} ms, longest gap before the migration {:.1} ms",
                    i + 1,
                    r.0,
                    r.1,
                    r.2
                );
            }
            nets.push(r);
        }
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| Summary::of(&disk.iter().map(f).collect::<Vec<_>>());
        let outage = Summary::of(&nets.iter().map(|r| r.0).collect::<Vec<_>>());
        let downtime = Summary::of(&nets.iter().map(|r| r.1).collect::<Vec<_>>());
        let baseline = Summary::of(&nets.iter().map(|r| r.2).collect::<Vec<_>>());
        Ok(Report {
            runs: args.runs,
            disk_records_per_s: col(|r| r.0),
            disk_guest_write_kib_s: col(|r| r.1),
            disk_host_read_kib_s: col(|r| r.2),
            disk_host_write_kib_s: col(|r| r.3),
            net_outage_over_downtime_ms: outage.median - downtime.median,
            net_outage_ms: outage,
            net_downtime_ms: downtime,
            net_gap_before_ms: baseline,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let p = |name: &str, s: &Summary, unit: &str| {
        println!(
            "{name:<28} median {:>9.1} {unit}  [{:.1} .. {:.1}]  ({} runs)",
            s.median, s.min, s.max, s.runs
        )
    };
    println!("disk: blkstress on a 64 MiB raw image (512-byte records, each flushed and read back)");
    p("records", &report.disk_records_per_s, "/s");
    p("guest: record data written", &report.disk_guest_write_kib_s, "KiB/s");
    p("host: VMM reads", &report.disk_host_read_kib_s, "KiB/s");
    p("host: VMM writes", &report.disk_host_write_kib_s, "KiB/s");
    println!("network: netecho migrated host A -> B (namespaces, one bridge), client pings every 1 ms");
    p("outage seen by the client", &report.net_outage_ms, "ms");
    p("migration downtime", &report.net_downtime_ms, "ms");
    p("longest gap, no migration", &report.net_gap_before_ms, "ms");
    println!(
        "{:<28} {:>16.1} ms (target: at most 10 ms: {})",
        "outage - downtime",
        report.net_outage_over_downtime_ms,
        if report.net_outage_over_downtime_ms <= 10.0 + 1e-9 { "met" } else { "missed" }
    );
    Ok(())
}
