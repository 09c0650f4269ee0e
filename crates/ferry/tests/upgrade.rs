//! Rolling upgrades: operators upgrade hosts one at a time and evacuate them, so a VM must
//! live-migrate from the previous release (the last line of RELEASES, built from this
//! repository's history by scripts/previous-release.sh) to this build, and back where the
//! protocol allows. memstress checks every page's stamp on every pass across both moves.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{pass_number, require_kvm, wait_timeout, TempDir, Vm};

const T: Duration = Duration::from_secs(60);

/// The previous release's `ferry`.
fn previous() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_PREVIOUS_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/previous-release.sh")).output().expect("previous-release.sh");
    assert!(
        out.status.success(),
        "scripts/previous-release.sh failed; the upgrade test needs the previous release:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn current() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

fn cmd(bin: &Path, state: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env_remove("FERRY_LOG").env("FERRY_STATE_DIR", state);
    c
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn free_port() -> u16 {
    common::mig::free_port()
}

/// `BIN receive` on a free port; returns the VM and its address.
fn receive(bin: &Path, dir: &TempDir, key: &Path, sock: &Path) -> (Vm, String) {
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let vm = Vm::spawn(cmd(bin, &dir.path("state")).args([
        "receive",
        "--listen",
        &to,
        "--auth-key-file",
        s(key),
        "--api-socket",
        s(sock),
    ]));
    vm.wait_stderr(T, "waiting for an incoming migration");
    (vm, to)
}

/// `BIN migrate` from the VM at `sock` to `to`; asserts it completed.
fn migrate(bin: &Path, dir: &TempDir, sock: &Path, to: &str, key: &Path) {
    let mut child = cmd(bin, &dir.path("state"))
        .args(["migrate", "--api-socket", s(sock), "--to", to, "--auth-key-file", s(key), "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn migrate");
    wait_timeout(&mut child, T).expect("migrate did not end");
    let out = child.wait_with_output().expect("output");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["status"], "completed", "{} -> {to}: {report}", bin.display());
}

/// The guest goes on past the pass it had reached on the VMM it left.
fn goes_on(from: &mut Vm, to: &mut Vm) {
    assert!(from.wait(T).success(), "the source VMM did not end cleanly: {}", from.stderr());
    from.drain();
    let last = from.seen.iter().rev().find_map(|l| pass_number(l)).expect("passes on the source");
    to.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last + 1));
}

#[test]
fn previous_release_to_this_one_and_back() {
    require_kvm();
    let (old, new) = (previous(), current());
    let dir = TempDir::new("upgrade");
    let key = dir.path("key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    let home = dir.path("home");
    let a_sock = dir.path("a.sock");
    // The VM starts on a host still running the previous release.
    let mut a = Vm::spawn(cmd(&old, &dir.path("state")).args([
        "run",
        "--guest",
        "memstress",
        "--memory",
        "128M",
        "--cmdline",
        "wss=4M",
        "--api-socket",
        s(&a_sock),
        "--home",
        s(&home),
    ]));
    a.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= 2));

    // Evacuated to an upgraded host: the previous release's `migrate` drives its own VMM.
    let b_sock = dir.path("b.sock");
    let (mut b, to_b) = receive(&new, &dir, &key, &b_sock);
    migrate(&old, &dir, &a_sock, &to_b, &key);
    goes_on(&mut a, &mut b);
    // The upgraded VMM gave the home its generation as it took the VM over.
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("vm.generation")).expect("vm.generation"))
            .expect("JSON");
    assert_eq!(generation["generation"], 1, "{generation}");

    // And back to a host not yet upgraded.
    let c_sock = dir.path("c.sock");
    let (mut c, to_c) = receive(&old, &dir, &key, &c_sock);
    migrate(&new, &dir, &b_sock, &to_c, &key);
    goes_on(&mut b, &mut c);
    // The previous release accepts none of this build's optional features: the source says
    // that such a destination cannot refuse a stale copy.
    let b_log = b.stderr();
    assert!(b_log.contains("features agreed with the destination: []"), "{b_log}");
    assert!(b_log.contains("does not check the VM's generation"), "{b_log}");
    assert!(c.signal_and_wait(libc::SIGTERM, T).success());
}
