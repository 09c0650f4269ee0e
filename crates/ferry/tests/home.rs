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
