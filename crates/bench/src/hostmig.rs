//! Migration by name between two hosts' daemons (`ferry host serve`) on loopback: where the
//! time outside the VMM's own migration goes (the `orchestration` steps of the source's
//! migration record), and the daemon's memory with 0 and with `--vms` registered VMs.
//!
//! Two daemons with their own state directories share one datastore directory and one port
//! group (a bridge made for the run); a cluster CA, the daemons' identities and the CLI's
//! are made with the ferry binary (`ferry ca init|issue`, `ferry host init`). A memstress VM
//! with one NIC migrates A -> B -> A ... `--migrations` times through `ferry vm migrate`;
//! after each, its self-check must pass again on the destination. Needs root and /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::Serialize;

use crate::leases::percentile;

/// Where the ferry CLI finds its client identity (`ferry_pki::IDENTITY_ENV`).
const IDENTITY_ENV: &str = "FERRY_IDENTITY";

/// Arguments of the hostmig benchmark.
#[derive(Debug, clap::Args)]
pub struct HostmigArgs {
    /// Migrations (A -> B, B -> A, ...).
    #[arg(long, default_value_t = 10)]
    migrations: usize,
    /// The migrating VM's memory, MiB.
    #[arg(long, default_value_t = 32)]
    memory_mib: u64,
    /// VMs registered (created, not started) on host A for the memory figure.
    #[arg(long, default_value_t = 50)]
    vms: usize,
    /// Give the VM no NIC (no tap, no port group): the reservation without taps.
    #[arg(long)]
    no_nic: bool,
}

/// The orchestration steps of one migration (the source's record), ms.
#[derive(Clone, Debug, Default, Serialize)]
struct Row {
    id: String,
    from: String,
    to: String,
    /// The CLI's wall time of `ferry vm migrate`.
    cli_ms: f64,
    /// The VMM's own migration (its report's `total_ms`).
    vmm_ms: f64,
    downtime_ms: f64,
    orchestration_ms: f64,
    checks_ms: f64,
    reservation_ms: f64,
    start_ms: f64,
    follow_ms: f64,
    completion_ms: f64,
    source_cleanup_ms: f64,
}

/// Median and 90th percentile.
#[derive(Debug, Serialize)]
struct Spread {
    median: f64,
    p90: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Spread {
        Spread { median: percentile(v, 50.0), p90: percentile(v, 90.0) }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    migrations: Vec<Row>,
    summary: std::collections::BTreeMap<&'static str, Spread>,
    /// The source daemon's VmRSS with no VM registered, KiB.
    rss_kib_0_vms: u64,
    /// With `vms` registered VMs (after creating them), KiB.
    rss_kib_with_vms: u64,
    /// The same after listing them and the history five times, KiB.
    rss_kib_with_vms_after_lists: u64,
    vms: usize,
    nic: bool,
    memory_mib: u64,
}

/// A daemon of the run.
struct Host {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    url: String,
    daemon: Option<Child>,
}

/// Everything the run made: killed and removed at drop.
struct Run {
    ferry: PathBuf,
    scratch: PathBuf,
    client: PathBuf,
    bridge: Option<String>,
    hosts: Vec<Host>,
}

impl Run {
    fn ferry(&self) -> Command {
        let mut c = Command::new(&self.ferry);
        c.env(IDENTITY_ENV, &self.client).env_remove("FERRY_HOST").env_remove("FERRY_LOG");
        c
    }

    /// `ferry ARGS`, which must succeed.
    fn ok(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = self.ferry().args(args).stdin(Stdio::null()).output().context("run ferry")?;
        if !out.status.success() {
            bail!("ferry {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    }

    /// `ferry vm ARGS --host URL --json` against host `h`; its JSON answer.
    fn vm(&self, h: usize, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = vec!["vm"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--host", &self.hosts[h].url, "--json"]);
        let out = self.ok(&a)?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("ferry {}: not JSON", a.join(" ")))
    }

    fn start(&mut self, h: usize) -> anyhow::Result<()> {
        let host = &self.hosts[h];
        let log = std::fs::File::create(host.dir.join("daemon.log")).context("daemon log")?;
        let child = self
            .ferry()
            .args(["host", "serve", "--config"])
            .arg(&host.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn ferry host serve")?;
        self.hosts[h].daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.vm(h, &["list"]).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.hosts[h].daemon.as_mut().map(Child::try_wait) {
                bail!("daemon {} exited ({st}) at start; see {}", self.hosts[h].name, self.scratch.display());
            }
            ensure!(Instant::now() < deadline, "daemon {} did not answer in 30 s", self.hosts[h].name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn rss_kib(&self, h: usize) -> anyhow::Result<u64> {
        let pid = self.hosts[h].daemon.as_ref().map(Child::id).context("daemon not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for h in 0..self.hosts.len() {
            if self.hosts[h].daemon.is_none() {
                continue;
            }
            if let Ok(list) = self.vm(h, &["list"]) {
                for v in list["vms"].as_array().into_iter().flatten() {
                    if let Some(pid) = v["pid"].as_u64() {
                        // SAFETY: a signal to a VMM this run's daemon started.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        for h in &mut self.hosts {
            if let Some(mut d) = h.daemon.take() {
                // SAFETY: a signal to our own child.
                unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while !matches!(d.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        // VMMs of this run's datastore the daemons did not know of any more.
        let ds = self.scratch.join("ds").to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&ds) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                    // SAFETY: a VMM of this run's datastore.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Some(b) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", "dev", b]).status();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits for a fresh memstress pass (its self-check) on the VM's console.
fn memstress_passes(home: &Path, timeout: Duration) -> anyhow::Result<()> {
    let console = home.join("console.log");
    std::fs::write(&console, "").context("truncate the console")?;
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        ensure!(!text.contains("CORRUPTION"), "the guest reported corruption:\n{text}");
        if text.lines().any(|l| l.starts_with("memstress: pass ")) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "no memstress pass within {timeout:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints its figures.
pub fn run(ferry: &Path, args: &HostmigArgs, json: bool) -> anyhow::Result<()> {
    ensure!(args.migrations >= 1, "--migrations must be at least 1");
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "hostmig needs root (taps, KVM)");
    let scratch = std::env::temp_dir().join(format!("ferry-bench-hostmig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("ds")).context("scratch directory")?;
    let mut run = Run {
        ferry: ferry.to_owned(),
        client: scratch.join("client"),
        scratch: scratch.clone(),
        bridge: None,
        hosts: Vec::new(),
    };
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let ca = scratch.join("ca");
    run.ok(&["ca", "init", "--dir", &s(&ca)])?;
    run.ok(&[
        "ca",
        "issue",
        "--ca",
        &s(&ca),
        "--name",
        "bench-cli",
        "--kind",
        "client",
        "--out",
        &s(&run.client),
    ])?;
    let mut portgroups = String::new();
    if !args.no_nic {
        let bridge = format!("fhm{}", std::process::id() % 100_000);
        let st = Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]).status()?;
        ensure!(st.success(), "cannot make bridge {bridge}");
        run.bridge = Some(bridge.clone());
        let st = Command::new("ip").args(["link", "set", &bridge, "up"]).status()?;
        ensure!(st.success(), "cannot set bridge {bridge} up");
        portgroups = format!("\n[portgroups]\nbench = \"{bridge}\"\n");
    }
    for name in ["a", "b"] {
        let dir = scratch.join(name);
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let config = dir.join("host.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"bench-{name}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n\n[datastores]\nds = \"{}\"\n{portgroups}",
                dir.join("state").display(),
                scratch.join("ds").display()
            ),
        )?;
        run.ok(&["host", "init", "--config", &s(&config), "--ca", &s(&ca)])?;
        run.hosts.push(Host {
            name: format!("bench-{name}"),
            dir,
            config,
            url: format!("https://127.0.0.1:{port}"),
            daemon: None,
        });
    }
    run.start(0)?;
    run.start(1)?;
    // The daemon's memory with nothing registered (after a few requests).
    for _ in 0..3 {
        run.vm(0, &["list"])?;
    }
    let rss_kib_0_vms = run.rss_kib(0)?;

    let mem = args.memory_mib.to_string();
    let mut create = vec!["create", "m", "--datastore", "ds", "--memory-mib", &mem, "--vcpus", "1"];
    create.extend_from_slice(&["--guest", "memstress", "--cmdline", "wss=8M"]);
    if !args.no_nic {
        create.extend_from_slice(&["--nic", "portgroup=bench"]);
    }
    run.vm(0, &create)?;
    run.vm(0, &["start", "m"])?;
    let home = scratch.join("ds").join("m");
    memstress_passes(&home, Duration::from_secs(30))?;

    let mut rows = Vec::new();
    for i in 0..args.migrations {
        let (from, to) = if i % 2 == 0 { (0, 1) } else { (1, 0) };
        let to_url = run.hosts[to].url.clone();
        let t = Instant::now();
        let r = run.vm(from, &["migrate", "m", "--to-host", &to_url])?;
        let cli_ms = t.elapsed().as_secs_f64() * 1e3;
        ensure!(r["outcome"] == "completed", "migration {i} did not complete: {r}");
        let id = r["id"].as_str().unwrap_or_default().to_string();
        // The record's figures are the source's (they come with the CLI's final answer).
        let o = &r["orchestration"];
        ensure!(o.is_object(), "migration {id}: no orchestration steps in its record: {r}");
        let total = f(&r["total_ms"]);
        let orch = f(&r["orchestration_ms"]);
        let cleanup = f(&o["source_cleanup_ms"]);
        let row = Row {
            id,
            from: run.hosts[from].name.clone(),
            to: run.hosts[to].name.clone(),
            cli_ms,
            vmm_ms: total - cleanup - orch,
            downtime_ms: f(&r["downtime_ms"]),
            orchestration_ms: orch,
            checks_ms: f(&o["checks_ms"]),
            reservation_ms: f(&o["reservation_ms"]),
            start_ms: f(&o["start_ms"]),
            follow_ms: f(&o["follow_ms"]),
            completion_ms: f(&o["completion_ms"]),
            source_cleanup_ms: cleanup,
        };
        if !json {
            eprintln!(
                "{:>2} {} {} -> {}: vmm {:.1} ms, outside {:.1} ms (checks {:.1}, reservation {:.1}, start {:.1}, following {:.1}, completion {:.1}), source clean-up {:.1} ms, CLI {:.0} ms",
                i + 1, row.id, row.from, row.to, row.vmm_ms, row.orchestration_ms, row.checks_ms,
                row.reservation_ms, row.start_ms, row.follow_ms, row.completion_ms, row.source_cleanup_ms, row.cli_ms
            );
        }
        rows.push(row);
        // Its self-check on the destination; also the same idle time before each migration.
        memstress_passes(&home, Duration::from_secs(30))
            .with_context(|| format!("after migration {}", i + 1))?;
        std::thread::sleep(Duration::from_millis(200));
    }

    // The daemon's memory with `vms` registered VMs.
    for i in 0..args.vms {
        let name = format!("r{i:03}");
        run.vm(
            0,
            &[
                "create",
                &name,
                "--datastore",
                "ds",
                "--memory-mib",
                "32",
                "--vcpus",
                "1",
                "--guest",
                "memstress",
            ],
        )?;
    }
    let rss_kib_with_vms = run.rss_kib(0)?;
    for _ in 0..5 {
        run.vm(0, &["list"])?;
        run.ok(&["host", "migrations", "--host", &run.hosts[0].url, "--json"])?;
    }
    let rss_kib_with_vms_after_lists = run.rss_kib(0)?;

    let col = |g: fn(&Row) -> f64| Spread::of(&rows.iter().map(g).collect::<Vec<_>>());
    let mut summary = std::collections::BTreeMap::new();
    summary.insert("vmm_ms", col(|r| r.vmm_ms));
    summary.insert("downtime_ms", col(|r| r.downtime_ms));
    summary.insert("orchestration_ms", col(|r| r.orchestration_ms));
    summary.insert("checks_ms", col(|r| r.checks_ms));
    summary.insert("reservation_ms", col(|r| r.reservation_ms));
    summary.insert("start_ms", col(|r| r.start_ms));
    summary.insert("follow_ms", col(|r| r.follow_ms));
    summary.insert("completion_ms", col(|r| r.completion_ms));
    summary.insert("source_cleanup_ms", col(|r| r.source_cleanup_ms));
    summary.insert("cli_ms", col(|r| r.cli_ms));
    let report = Report {
        migrations: rows,
        summary,
        rss_kib_0_vms,
        rss_kib_with_vms,
        rss_kib_with_vms_after_lists,
        vms: args.vms,
        nic: !args.no_nic,
        memory_mib: args.memory_mib,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "migration by name on loopback: {} migrations of a {} MiB memstress VM{}",
        report.migrations.len(),
        args.memory_mib,
        if args.no_nic { " without a NIC" } else { " with one NIC (a tap on a bridge)" }
    );
    println!("{:<20} {:>9} {:>9}", "ms", "median", "p90");
    for (k, v) in &report.summary {
        println!("{k:<20} {:>9.1} {:>9.1}", v.median, v.p90);
    }
    println!(
        "daemon VmRSS: {:.1} MB with no VM, {:.1} MB with {} registered VMs, {:.1} MB after listing them and the history 5 times",
        report.rss_kib_0_vms as f64 / 1024.0,
        report.rss_kib_with_vms as f64 / 1024.0,
        args.vms,
        report.rss_kib_with_vms_after_lists as f64 / 1024.0
    );
    Ok(())
}
