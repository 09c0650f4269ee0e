//! The VM's home lock: one VMM at a time runs a VM, a dead VMM releases it, and a restore
//! of a VM that still runs elsewhere is refused.

mod common;

use std::time::Duration;

use common::{assert_one_line_error, ferry, require_kvm, run_to_end, TempDir, Vm};

fn start(home: &str, extra: &[&str]) -> Vm {
    let mut args = vec!["--guest", "memstress", "--memory", "32M", "--cmdline", "wss=1M", "--home", home];
    args.extend_from_slice(extra);
    let mut vm = Vm::start(&args);
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    vm
}

#[test]
fn second_vm_on_the_same_home_is_refused() {
    require_kvm();
    let dir = TempDir::new("home-twice");
    let home = dir.path("vm1");
    let h = home.to_str().expect("utf8");
    let mut first = start(h, &[]);
    let out =
        run_to_end(&["run", "--guest", "memstress", "--memory", "32M", "--home", h], Duration::from_secs(20));
    assert_one_line_error(&out, &format!("VM home {h} is locked by another VMM (pid {}", first.child.id()));
    // The first one is unharmed.
    first.wait_prefix(Duration::from_secs(10), "memstress: pass ");
    assert!(first.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
    // Once it has ended, the home is free again.
    let mut again = start(h, &[]);
    assert!(again.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn a_killed_vmm_releases_its_home() {
    require_kvm();
    let dir = TempDir::new("home-kill");
    let home = dir.path("vm");
    let h = home.to_str().expect("utf8");
    let mut first = start(h, &[]);
    first.child.kill().expect("kill -9");
    first.wait(Duration::from_secs(5));
    let mut second = start(h, &[]);
    assert!(second.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn restore_refuses_a_vm_that_still_runs() {
    require_kvm();
    let dir = TempDir::new("home-restore");
    let home = dir.path("vm");
    let h = home.to_str().expect("utf8");
    let sock = dir.path("vm.sock");
    let mut vm = start(h, &["--api-socket", sock.to_str().expect("utf8")]);
    let snap = dir.path("snap");
    let out = run_to_end(
        &["snapshot", "--api-socket", sock.to_str().expect("utf8"), "--to", snap.to_str().expect("utf8")],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The checkpoint names the VM's home; the VM still runs there.
    let out = run_to_end(
        &["restore", "--from", snap.to_str().expect("utf8"), "--serial", "null"],
        Duration::from_secs(20),
    );
    assert_one_line_error(&out, "is locked by another VMM");
    // A copy under another home is a different VM and may run.
    let other = dir.path("clone");
    let mut clone = Vm::spawn(ferry().args([
        "restore",
        "--from",
        snap.to_str().expect("utf8"),
        "--home",
        other.to_str().expect("utf8"),
    ]));
    clone.wait_prefix(Duration::from_secs(10), "memstress: pass ");
    assert!(clone.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

fn home_status(home: &std::path::Path) -> serde_json::Value {
    let out = run_to_end(&["home", home.to_str().expect("utf8"), "--json"], Duration::from_secs(10));
    assert!(out.status.success(), "ferry home: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ferry home --json")
}

/// The `run`/`stop` records of `runs.log`, as (pid, event, generation).
fn runs(home: &std::path::Path) -> Vec<(u64, String, u64)> {
    std::fs::read_to_string(home.join("runs.log"))
        .expect("runs.log")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            (
                v["pid"].as_u64().expect("pid"),
                v["event"].as_str().expect("event").to_string(),
                v["generation"].as_u64().expect("generation"),
            )
        })
        .collect()
}

#[test]
fn every_start_and_resume_raises_the_generation_and_is_recorded() {
    require_kvm();
    let dir = TempDir::new("home-gen");
    let home = dir.path("vm");
    let h = home.to_str().expect("utf8");
    let sock = dir.path("vm.sock");
    let s = sock.to_str().expect("utf8");
    let mut vm = start(h, &["--api-socket", s]);
    let st = home_status(&home);
    assert_eq!(st["generation"]["generation"], 1, "{st}");
    assert_eq!(st["locked"], true, "{st}");
    assert_eq!(st["lock"]["pid"], vm.child.id(), "{st}");
    assert_eq!(st["lock"]["held"], true, "{st}");
    let t = Duration::from_secs(20);
    for cmd in ["pause", "resume", "pause", "resume"] {
        let out = run_to_end(&[cmd, "--api-socket", s], t);
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(home_status(&home)["generation"]["generation"], 3);
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
    let pid = u64::from(vm.child.id());
    let expected: Vec<(u64, String, u64)> =
        [("run", 1), ("stop", 1), ("run", 2), ("stop", 2), ("run", 3), ("stop", 3)]
            .iter()
            .map(|(e, g)| (pid, e.to_string(), *g))
            .collect();
    assert_eq!(runs(&home), expected);
    let st = home_status(&home);
    assert_eq!((st["locked"].as_bool(), st["lock"]["held"].as_bool()), (Some(false), Some(false)), "{st}");
    // A second boot from the same home goes on from there.
    let mut again = start(h, &[]);
    assert_eq!(home_status(&home)["generation"]["generation"], 4);
    assert!(again.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn a_checkpoint_the_vm_ran_past_needs_revert() {
    require_kvm();
    let dir = TempDir::new("home-revert");
    let home = dir.path("vm");
    let h = home.to_str().expect("utf8");
    let sock = dir.path("vm.sock");
    let s = sock.to_str().expect("utf8");
    let t = Duration::from_secs(30);
    let mut vm = start(h, &["--api-socket", s]);
    let snap = dir.path("snap");
    let out = run_to_end(&["snapshot", "--api-socket", s, "--to", snap.to_str().expect("utf8")], t);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The VM resumed after the snapshot (generation 2), so the checkpoint (1) is stale.
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
    let out = run_to_end(&["restore", "--from", snap.to_str().expect("utf8"), "--serial", "null"], t);
    assert_one_line_error(&out, "the checkpoint is of generation 1, but the VM in");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--revert"));
    assert_eq!(home_status(&home)["generation"]["generation"], 2, "a refused restore changed the home");
    // With the operator's word it runs, at a generation above every earlier one.
    let mut back = Vm::spawn(ferry().args(["restore", "--from", snap.to_str().expect("utf8"), "--revert"]));
    back.wait_prefix(Duration::from_secs(10), "memstress: pass ");
    assert_eq!(home_status(&home)["generation"]["generation"], 3);
    assert!(back.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());

    // A suspended VM's checkpoint is its newest state: no --revert needed, and only once.
    let mut vm = start(h, &["--api-socket", s]);
    let sus = dir.path("suspended");
    let out = run_to_end(&["snapshot", "--api-socket", s, "--to", sus.to_str().expect("utf8"), "--stop"], t);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(vm.wait(Duration::from_secs(10)).success());
    let mut resumed = Vm::spawn(ferry().args(["restore", "--from", sus.to_str().expect("utf8")]));
    resumed.wait_prefix(Duration::from_secs(10), "memstress: pass ");
    assert!(resumed.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
    let out = run_to_end(&["restore", "--from", sus.to_str().expect("utf8"), "--serial", "null"], t);
    assert_one_line_error(&out, "has run on since");

    // A home that belongs to another VM is refused outright.
    let other = dir.path("other");
    let mut o = start(other.to_str().expect("utf8"), &[]);
    assert!(o.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
    let out = run_to_end(
        &[
            "restore",
            "--from",
            sus.to_str().expect("utf8"),
            "--home",
            other.to_str().expect("utf8"),
            "--revert",
        ],
        t,
    );
    assert_one_line_error(&out, "belongs to VM");
}
