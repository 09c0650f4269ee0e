//! The host daemon fault matrix (issue 14): a migration by name between two daemons on
//! loopback, with either daemon killed with SIGKILL at each step, then restarted.
//!
//! The VM's datastore is leased (the shared sanlock lockspace of `common::leases`: host ids
//! 1 and 2), so "the lease holder" is real. Each cell starts a memstress VM on A, starts
//! `ferry vm migrate` to B, waits until the faulted daemon stops itself at the step
//! (`FERRY_HOST_FAULT=stop-at=STEP`: it logs `fault injection: stopped at STEP` and SIGSTOPs
//! itself) or, for the destination at the source's moments, until A's log shows the moment;
//! SIGKILLs that daemon, restarts it without the fault, and waits (bounded) until both
//! settle. Then: exactly one host has the VM registered and running, the one whose VMM holds
//! the lease; the other shows it `elsewhere` or not at all; the guest ran exactly once (the
//! never-twice overlap checker over `runs.log`) and its self-check passes; the host that does
//! not run it has no receiver, socket, key file, or console file of the migration left; both
//! histories hold a final (not `active`) record with the same id (the destination's only if
//! it reserved). Also: a reservation whose time is up mid-migration lets it finish. Needs
//! root, /dev/kvm and sanlock. Cells run one at a time.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::hostd::{cluster, wait_console, Hostd};
use common::{leases, overlap, require_kvm, require_root, TempDir};

/// The cells share the lockspace and the machine's two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const T: Duration = Duration::from_secs(30);
/// How long both daemons get to settle after the restart.
const SETTLE: Duration = Duration::from_secs(60);
const FAULT_ENV: &str = "FERRY_HOST_FAULT";

/// Which daemon dies, and when.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// A's daemon, stopped at this step by `FERRY_HOST_FAULT`.
    Source(&'static str),
    /// B's daemon, stopped at this step by `FERRY_HOST_FAULT`.
    Destination(&'static str),
    /// B's daemon (no fault), as soon as A's log has a line containing this.
    DestinationWhenSourceLogs(&'static str),
}

/// Two daemons seeing one leased datastore (`shared`), and what must go with the cell.
struct Pair {
    a: Hostd,
    b: Hostd,
    ds: TempDir,
    cli: Option<Child>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(mut c) = self.cli.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // VMMs of this datastore the daemons no longer list (Hostd's drop knows only theirs).
        for pid in processes_with(&self.ds.0.to_string_lossy()) {
            // SAFETY: a VMM of this cell's datastore.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn pair(tag: &str) -> Pair {
    let lockspace = leases::datastore();
    let ds = TempDir::new(&format!("{tag}-shared"));
    let shared = |id: u64| {
        format!(
            "shared = {{ path = \"{}\", lockspace = \"{}\", host_id = {id}, ids = \"{}\", io_timeout = {} }}\n",
            ds.0.display(),
            leases::LOCKSPACE,
            lockspace.ids.display(),
            leases::IO_TIMEOUT
        )
    };
    let mut a = Hostd::config(&format!("{tag}-a"), &shared(lockspace.a.id));
    a.env.push((ferry_lease::testing::RUN_DIR_ENV.into(), lockspace.a.run_dir().display().to_string()));
    let mut b = Hostd::config(&format!("{tag}-b"), &shared(lockspace.b.id));
    b.env.push((ferry_lease::testing::RUN_DIR_ENV.into(), lockspace.b.run_dir().display().to_string()));
    // An unused reservation goes after 5 s (a cell whose source died before its VMM
    // migrated waits that long).
    let text = std::fs::read_to_string(&b.config).expect("config");
    std::fs::write(&b.config, text.replace("[datastores]", "reservation_ttl_s = 5\n\n[datastores]"))
        .expect("config");
    Pair { a, b, ds, cli: None }
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid as u32 == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// `ferry host migrations --id ID --json` on `h`: its record of `id`, if any.
fn record(h: &Hostd, id: &str) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env_remove("FERRY_HOST")
        .env(ferry_pki::IDENTITY_ENV, &cluster().client)
        .args(["host", "migrations", "--id", id, "--json", "--host", &h.url])
        .output()
        .expect("ferry host migrations");
    assert!(out.status.success(), "ferry host migrations: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let list = v["migrations"].as_array().cloned().unwrap_or_default();
    assert!(list.len() <= 1, "two records of {id}: {v}");
    list.into_iter().next()
}

/// `ferry vm show NAME --json` on `h`, if the VM is registered there.
fn show(h: &Hostd, name: &str) -> Option<serde_json::Value> {
    let out = h.vm(&["show", name, "--json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("json"))
}

/// Waits until `h`'s daemon log has a line containing `needle`; that line.
fn wait_log(h: &Hostd, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = h.daemon_log().lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no log line {needle:?} within {timeout:?}:\n{}", h.daemon_log());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The migration id of a daemon log line (`migration ID: ...`).
fn id_of(line: &str) -> String {
    line.split("migration ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no migration id in {line:?}"))
        .to_string()
}

/// Nothing of migration `id` left on `h`, which does not run the VM: no receiver or VMM of
/// its run directory, no file (socket, key) in it, no console file of the migration, no
/// memory reserved.
fn nothing_left(h: &Hostd, home: &Path, id: &str) {
    let run = h.dir.path("state").join("run");
    let vmms = processes_with(&run.to_string_lossy());
    assert!(vmms.is_empty(), "VMMs left on {}: {vmms:?}", h.url);
    let files: Vec<_> = std::fs::read_dir(&run).into_iter().flatten().flatten().map(|e| e.path()).collect();
    assert!(files.is_empty(), "files left in {}: {files:?}", run.display());
    let console = home.join(format!("console.{id}.log"));
    assert!(!console.exists(), "{} left", console.display());
    // No reservation held (nor a VM running there) in its inventory.
    let info = h.host_info();
    assert_eq!(info["memory"]["reserved_bytes"], 0, "{} still reserves memory: {}", h.url, info["memory"]);
}

fn cell(tag: &str, kill: Kill) {
    cell_with(tag, kill, false);
}

/// A cell; with `freeze_receiver`, B's receiving VMM is also stopped (SIGSTOP: it lives but
/// does not answer) while B's daemon comes back, and let go 3 s later.
fn cell_with(tag: &str, kill: Kill, freeze_receiver: bool) {
    require_kvm();
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = pair(tag);
    let fault = match kill {
        Kill::Source(step) => Some((true, step)),
        Kill::Destination(step) => Some((false, step)),
        Kill::DestinationWhenSourceLogs(_) => None,
    };
    if let Some((on_a, step)) = fault {
        let h = if on_a { &mut p.a } else { &mut p.b };
        h.env.push((FAULT_ENV.into(), format!("stop-at={step}")));
    }
    p.a.start();
    p.b.start();
    let name = format!("f-{tag}");
    p.a.vm_json(&[
        "create",
        &name,
        "--datastore",
        "shared",
        "--memory-mib",
        "64",
        "--guest",
        "memstress",
        "--cmdline",
        "wss=16M",
    ]);
    let started = p.a.vm_json(&["start", &name]);
    assert_eq!(started["state"], "running", "{started}");
    let home = p.ds.0.join(&name);
    std::fs::write(home.join("console.log"), "").expect("truncate console");
    wait_console(&home, "memstress: pass ", T);
    p.cli = Some(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .env_remove("FERRY_HOST")
            .env(ferry_pki::IDENTITY_ENV, &cluster().client)
            .args(["vm", "migrate", &name, "--to-host", &p.b.url, "--host", &p.a.url, "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferry vm migrate"),
    );
    // The moment, then SIGKILL; the daemon comes back without the fault.
    let (line, killed_a) = match kill {
        Kill::Source(step) => (wait_log(&p.a, &format!("fault injection: stopped at {step}"), T), true),
        Kill::Destination(step) => (wait_log(&p.b, &format!("fault injection: stopped at {step}"), T), false),
        Kill::DestinationWhenSourceLogs(needle) => (wait_log(&p.a, needle, T), false),
    };
    let id = id_of(&line);
    let h = if killed_a { &mut p.a } else { &mut p.b };
    h.kill_daemon();
    h.env.retain(|(k, _)| k != FAULT_ENV);
    eprintln!("{tag}: migration {id}: {} daemon killed at {line:?}", if killed_a { "A's" } else { "B's" });
    let frozen = if freeze_receiver {
        let receivers = processes_with(&p.b.dir.path("state").join("run").to_string_lossy());
        assert!(!receivers.is_empty(), "{tag}: no receiver on B to freeze");
        for pid in &receivers {
            // SAFETY: SIGSTOP to a receiving VMM of this cell's B.
            unsafe { libc::kill(*pid, libc::SIGSTOP) };
        }
        receivers
    } else {
        Vec::new()
    };
    let h = if killed_a { &mut p.a } else { &mut p.b };
    h.start();
    if !frozen.is_empty() {
        std::thread::sleep(Duration::from_secs(3));
        for pid in &frozen {
            // SAFETY: SIGCONT to the receivers stopped above.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
    // Both settle: one host runs the VM, the other does not; no record active.
    let deadline = Instant::now() + SETTLE;
    let (on, ra, rb) = loop {
        let (va, vb) = (show(&p.a, &name), show(&p.b, &name));
        let runs = |v: &Option<serde_json::Value>| {
            v.as_ref().is_some_and(|v| v["state"] == "running" && v["pid"].as_u64().is_some())
        };
        let (ra, rb) = (record(&p.a, &id), record(&p.b, &id));
        let final_ = |r: &Option<serde_json::Value>| r.as_ref().is_none_or(|r| r["outcome"] != "active");
        let settled = ra.is_some() && final_(&ra) && final_(&rb);
        // The host that does not run it knows so (or forgot the VM): a restarted source
        // daemon re-adopts its VMM, still paused at the switchover, and says `elsewhere`
        // only once that VMM has ended, which takes longer on a busy machine.
        let other_knows =
            |v: &Option<serde_json::Value>| v.as_ref().is_none_or(|v| v["state"] == "elsewhere");
        // A migration recorded completed moved the VM to B, whatever A's row says: the source
        // daemon records the outcome a few milliseconds before it unregisters the VM, and
        // with B's daemon dead (no row to show) A alone looked like the runner in that gap.
        let completed =
            |r: &Option<serde_json::Value>| r.as_ref().is_some_and(|r| r["outcome"] == "completed");
        let moved = completed(&ra) || completed(&rb);
        match (runs(&va), runs(&vb)) {
            // For a moment both may say so: a source daemon records its VMM's end (it
            // committed) after the destination registered the VM. Whether the guest ever
            // ran twice is the overlap checker's question, below.
            (true, false) if settled && !moved && other_knows(&vb) => break ('a', ra, rb),
            (false, true) if settled && other_knows(&va) => break ('b', ra, rb),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: not settled within {SETTLE:?}: A {va:?} {ra:?}\nB {vb:?} {rb:?}\nA's log:\n{}\nB's log:\n{}",
            p.a.daemon_log(),
            p.b.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let lockspace = leases::datastore();
    let (runner, other, runner_id) =
        if on == 'a' { (&p.a, &p.b, lockspace.a.id) } else { (&p.b, &p.a, lockspace.b.id) };
    // Read again until it answers (a daemon just restarted may refuse one call while it
    // re-adopts); a VM that stays unregistered on the host that runs it fails here, with why.
    let v = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = runner.vm(&["show", &name, "--json"]);
            if out.status.success() {
                break serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json");
            }
            assert!(
                Instant::now() < deadline,
                "{tag}: host {on} runs the VM but does not show it: {}\nits log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                runner.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let pid = v["pid"].as_u64().expect("pid");
    assert!(common::hostd::alive(pid), "{tag}: the VMM {pid} that runs the VM is not alive");
    let holder = v["lock_holder"].as_str().unwrap_or_default();
    assert!(
        holder.contains(&format!("lease held by host id {runner_id}")),
        "{tag}: the VM runs on the host that does not hold its lease: {v}"
    );
    assert!(holder.contains(&format!("pid {pid} ")), "{tag}: the lease is not its VMM's: {v}");
    match show(other, &name) {
        None => {}
        Some(o) => assert_eq!(o["state"], "elsewhere", "{tag}: the host that does not run the VM: {o}"),
    }
    // Exactly once, and its memory intact.
    let runs = overlap::check_home(&home, &[]).unwrap_or_else(|e| panic!("{tag}: {e}"));
    std::fs::write(home.join("console.log"), "").expect("truncate console");
    wait_console(&home, "memstress: pass ", T);
    nothing_left(other, &home, &id);
    let ra = ra.expect("A's record");
    assert_eq!(ra["role"], "source", "{ra}");
    let want = if on == 'b' { "completed" } else { "failed" };
    assert_eq!(ra["outcome"], want, "{tag}: A's record: {ra}");
    match &rb {
        Some(rb) => {
            assert_eq!(rb["role"], "destination", "{rb}");
            assert_eq!(rb["outcome"], want, "{tag}: B's record: {rb}");
        }
        // B never heard of it only if A died before reserving.
        None => assert!(
            matches!(kill, Kill::Source("checks")),
            "{tag}: B has no record of {id}:\n{}",
            p.b.daemon_log()
        ),
    }
    eprintln!(
        "{tag}: migration {id}: the VM runs on {on} ({holder}); A {} {}, B {}; {} runs.log events",
        ra["outcome"],
        ra["reason_code"],
        rb.as_ref().map(|r| format!("{} {}", r["outcome"], r["reason_code"])).unwrap_or("no record".into()),
        runs.events
    );
}

#[test]
fn source_killed_after_checks() {
    cell("s-checks", Kill::Source("checks"));
}

#[test]
fn source_killed_after_reservation() {
    cell("s-reserved", Kill::Source("reserved"));
}

#[test]
fn source_killed_once_its_vmm_migrates() {
    cell("s-started", Kill::Source("started"));
}

#[test]
fn source_killed_at_switchover() {
    cell("s-switch", Kill::Source("switchover"));
}

#[test]
fn source_killed_after_the_vmm_reported() {
    cell("s-after", Kill::Source("after"));
}

#[test]
fn destination_killed_while_reserving() {
    cell("d-reserve", Kill::Destination("reserve"));
}

/// Its receiver does not answer while B's daemon comes back: it is waited for, not taken for
/// gone (its socket removed under it, the process left behind), then released.
#[test]
fn destination_killed_while_reserving_its_receiver_silent() {
    cell_with("d-silent", Kill::Destination("reserve"), true);
}

#[test]
fn destination_killed_at_complete() {
    cell("d-complete", Kill::Destination("complete"));
}

#[test]
fn destination_killed_once_the_source_migrates() {
    cell("d-started", Kill::DestinationWhenSourceLogs("migrates VM f-d-started"));
}

#[test]
fn destination_killed_at_switchover() {
    cell("d-switch", Kill::DestinationWhenSourceLogs("phase stop-and-copy"));
}

/// A reservation whose time is up while its migration is still going (B's
/// `reservation_ttl_s = 1`, a migration of a 2 GiB VM that lasts longer)
/// is left to finish: no daemon dies, and the migration completes, the VM on B, once.
#[test]
fn reservation_expiring_mid_migration_lets_it_finish() {
    require_kvm();
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = pair("ttl");
    let text = std::fs::read_to_string(&p.b.config).expect("config");
    std::fs::write(&p.b.config, text.replace("reservation_ttl_s = 5", "reservation_ttl_s = 1"))
        .expect("config");
    p.a.start();
    p.b.start();
    let name = "f-ttl";
    p.a.vm_json(&[
        "create",
        name,
        "--datastore",
        "shared",
        "--memory-mib",
        "2048",
        "--guest",
        "memstress",
        "--cmdline",
        "wss=1500M",
    ]);
    p.a.vm_json(&["start", name]);
    let home = p.ds.0.join(name);
    // Two passes: the working set written through, so the migration has it all to copy.
    for _ in 0..2 {
        std::fs::write(home.join("console.log"), "").expect("truncate console");
        wait_console(&home, "memstress: pass ", T);
    }
    let b_url = p.b.url.clone();
    let out = p.a.vm(&["migrate", name, "--to-host", &b_url, "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let id =
        r["id"].as_str().unwrap_or_else(|| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
    let rb = record(&p.b, id).expect("B's record");
    let total = r["total_ms"].as_f64().unwrap_or_default();
    assert_eq!(r["outcome"], "completed", "A: {r}\nB: {rb}\nB's log:\n{}", p.b.daemon_log());
    // The point of the test: the reservation's time was up while the VMMs migrated.
    assert!(
        p.b.daemon_log().contains("the reservation's time is up while its receiver migrates"),
        "the migration ({total:.0} ms) ended before the reservation's 1 s:\n{}",
        p.b.daemon_log()
    );
    assert_eq!(rb["outcome"], "completed", "B: {rb}");
    let v = p.b.wait_state(name, "running", T);
    assert!(v["pid"].as_u64().is_some(), "{v}");
    overlap::check_home(&home, &[]).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(home.join("console.log"), "").expect("truncate console");
    wait_console(&home, "memstress: pass ", T);
    eprintln!("ttl: migration {id}: {total:.0} ms with a 1 s reservation: {}", rb["outcome"]);
}
