//! Disks on real KVM: virtio-blk over virtio-mmio with the bundled `blkstress` guest
//! (numbered, checksummed records, each read back, all re-checked every 64 records and
//! after every move; any lost, duplicated or corrupt record prints CORRUPTION, which
//! fails the test), exclusive image locks, bad `--disk` input, and disks that move with
//! the VM: snapshot/restore and live migration, including a destination that cannot take
//! the disk's lock.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{assert_one_line_error, ferry, require_kvm, require_root, run_to_end, TempDir, Vm};

const T: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn image(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.path(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(size).expect("size image");
    p
}

/// The N of a `blkstress: records N` line.
fn records(line: &str) -> Option<u64> {
    line.strip_prefix("blkstress: records ")?.trim().parse().ok()
}

/// blkstress on `disk` with an API socket; waits until it has written `at_least` records.
fn blkstress(dir: &TempDir, disk: &Path, tag: &str, at_least: u64) -> (Vm, PathBuf) {
    let sock = dir.path(&format!("{tag}.sock"));
    let home = dir.path(&format!("{tag}.home"));
    let disk_arg = format!("path={}", s(disk));
    let mut vm = Vm::spawn(common::mig::on_a(ferry().arg("run").args([
        "--guest",
        "blkstress",
        "--memory",
        "64M",
        "--disk",
        &disk_arg,
        "--api-socket",
        s(&sock),
        "--home",
        s(&home),
    ])));
    vm.wait_prefix(T, "blkstress: ready");
    vm.wait_line(T, |l| records(l).is_some_and(|n| n >= at_least));
    (vm, sock)
}

fn last_records(vm: &Vm) -> u64 {
    vm.seen.iter().filter_map(|l| records(l)).max().unwrap_or(0)
}

#[test]
fn blkstress_writes_and_finds_its_records_again() {
    require_kvm();
    let dir = TempDir::new("disk-basic");
    let disk = image(&dir, "disk.img", 4 << 20);
    let arg = format!("path={}", s(&disk));
    let mut vm =
        Vm::start(&["--guest", "blkstress", "--memory", "64M", "--disk", &arg, "--cmdline", "records=100"]);
    let ready = vm.wait_prefix(T, "blkstress: ready");
    assert_eq!(ready, "blkstress: ready capacity=8192");
    vm.wait_prefix(T, "blkstress: done records=100");
    assert!(vm.wait(T).success(), "{}", vm.stderr());
    assert!(vm.seen.iter().any(|l| l == "blkstress: new disk"), "{:?}", vm.seen);
    // The guest found the device where the command line said, at the first window.
    assert!(
        vm.seen.iter().any(|l| l.starts_with("blkstress: virtio-blk at 0xd0000000 irq 5")),
        "{:?}",
        vm.seen
    );

    // The records are on the image: a second VM finds, checks and continues them.
    let mut again =
        Vm::start(&["--guest", "blkstress", "--memory", "64M", "--disk", &arg, "--cmdline", "records=50"]);
    again.wait_prefix(T, "blkstress: disk holds 100 records");
    again.wait_prefix(T, "blkstress: done records=150");
    assert!(again.wait(T).success());
    let bytes = std::fs::read(&disk).expect("read image");
    assert_eq!(&bytes[..8], b"BLKSHDR1", "the header sector is on the image");
}

#[test]
fn a_second_vm_on_the_same_disk_is_refused() {
    require_kvm();
    let dir = TempDir::new("disk-lock");
    let disk = image(&dir, "disk.img", 1 << 20);
    let (_first, _) = blkstress(&dir, &disk, "a", 0);
    let arg = format!("path={}", s(&disk));
    let console = dir.path("second.console");
    let serial = format!("file:{}", s(&console));
    let out = run_to_end(&["run", "--guest", "blkstress", "--disk", &arg, "--serial", &serial], T);
    assert_one_line_error(&out, &format!("disk {} is in use by another VM", s(&disk)));
    // Nothing started: the console was never opened.
    assert!(!console.exists(), "the refused VM opened its console");
    // Read-only does not get around a writer either.
    let ro = format!("path={},readonly=on", s(&disk));
    let out = run_to_end(&["run", "--guest", "blkstress", "--disk", &ro], T);
    assert_one_line_error(&out, "is in use by another VM");
}

#[test]
fn bad_disk_options_are_refused_before_anything_starts() {
    require_kvm();
    let dir = TempDir::new("disk-bad");
    let good = image(&dir, "good.img", 1 << 20);
    let odd = image(&dir, "odd.img", 1000);
    let cases: Vec<(String, String)> = vec![
        (format!("path={}", s(&dir.path("missing.img"))), "does not exist".into()),
        (format!("path={}", s(&dir.0)), "is not a regular file".into()),
        (format!("path={}", s(&odd)), "is 1000 bytes, not a multiple of 512".into()),
        ("readonly=on".into(), "no path=FILE".into()),
        (format!("path={},readonly=perhaps", s(&good)), "use on or off".into()),
        (format!("path={},cache=none", s(&good)), "unknown key".into()),
    ];
    for (arg, needle) in cases {
        let out = run_to_end(&["run", "--guest", "blkstress", "--disk", &arg], T);
        assert_one_line_error(&out, &needle);
    }
    let arg = format!("path={}", s(&good));
    let out = run_to_end(&["run", "--guest", "blkstress", "--disk", &arg, "--disk", &arg], T);
    assert_one_line_error(&out, "is given twice");
}

/// A writable image on a file this process may only read: refused unless readonly=on.
#[test]
fn read_only_file_needs_readonly_on() {
    require_kvm();
    require_root();
    let dir = TempDir::new("disk-ro");
    let disk = image(&dir, "ro.img", 1 << 20);
    // Root ignores permission bits; an immutable file is read-only even for root.
    let chattr = Command::new("chattr").args(["+i", s(&disk)]).status().expect("chattr");
    assert!(chattr.success(), "chattr +i failed (filesystem without the flag?)");
    let arg = format!("path={}", s(&disk));
    let out = run_to_end(&["run", "--guest", "blkstress", "--disk", &arg], T);
    let ro = format!("path={},readonly=on", s(&disk));
    let mut vm = Vm::start(&["--guest", "blkstress", "--memory", "64M", "--disk", &ro]);
    // blkstress refuses a read-only device: it got one.
    let line = vm.wait_line(T, |l| l.starts_with("blkstress: error"));
    let _ = vm.wait(T);
    let _ = Command::new("chattr").args(["-i", s(&disk)]).status();
    assert_one_line_error(&out, "is read-only; pass readonly=on");
    assert!(line.contains("read-only"), "{line}");
}

#[test]
fn snapshot_and_restore_carry_the_disk() {
    require_kvm();
    let dir = TempDir::new("disk-snap");
    let disk = image(&dir, "disk.img", 4 << 20);
    let (mut vm, sock) = blkstress(&dir, &disk, "a", 128);
    let ckpt = dir.path("ckpt");
    let out = run_to_end(&["snapshot", "--api-socket", s(&sock), "--to", s(&ckpt), "--stop"], T);
    assert!(out.status.success(), "snapshot: {}", String::from_utf8_lossy(&out.stderr));
    assert!(vm.wait(T).success());
    vm.drain();
    let before = last_records(&vm);

    // While another VM holds the disk (memstress, which never touches it), the restore
    // is refused and starts nothing.
    let arg = format!("path={}", s(&disk));
    let mut holder =
        Vm::start(&["--guest", "memstress", "--memory", "64M", "--cmdline", "wss=1M", "--disk", &arg]);
    holder.wait_prefix(T, "memstress: ready");
    let out = common::run_cmd_to_end(
        common::mig::on_b(ferry().args(["restore", "--from", s(&ckpt), "--serial", "null"])),
        T,
    );
    assert_one_line_error(&out, "is in use by another VM");
    let _ = holder.signal_and_wait(libc::SIGTERM, T);

    // Restored: the guest re-checks its records and goes on writing after them.
    let mut restored = Vm::spawn(common::mig::on_b(ferry().args(["restore", "--from", s(&ckpt)])));
    restored.wait_line(T, |l| records(l).is_some_and(|n| n >= before + 128));
    let _ = restored.signal_and_wait(libc::SIGTERM, T);
}

/// Live migration with a disk: the guest keeps writing and finds every record on the
/// destination; the disk's lock moves with the VM.
#[test]
fn migration_moves_the_disk_and_its_lock() {
    require_kvm();
    let dir = TempDir::new("disk-mig");
    let disk = image(&dir, "disk.img", 4 << 20);
    let key = dir.path("key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    let (mut src, sock) = blkstress(&dir, &disk, "a", 64);
    let port = common::mig::free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vm::spawn(common::mig::on_b(ferry().args([
        "receive",
        "--listen",
        &listen,
        "--auth-key-file",
        s(&key),
    ])));
    dst.wait_stderr(T, "waiting for an incoming migration");
    let out = run_to_end(
        &[
            "migrate",
            "--api-socket",
            s(&sock),
            "--to",
            &listen,
            "--auth-key-file",
            s(&key),
            "--verify",
            "--json",
        ],
        T,
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["status"], "completed", "{report}");
    assert!(src.wait(T).success());
    src.drain();
    let at_switch = last_records(&src);
    // blkstress on the destination re-checks its window and goes on past the switchover.
    dst.wait_line(T, |l| records(l).is_some_and(|n| n >= at_switch + 128));
    // The destination holds the disk now.
    let arg = format!("path={}", s(&disk));
    let out = run_to_end(&["run", "--guest", "blkstress", "--disk", &arg], T);
    assert_one_line_error(&out, "is in use by another VM");
    let _ = dst.signal_and_wait(libc::SIGTERM, T);
}

/// The destination sees another file at the disk's path (a host whose "shared" storage is
/// not the same), and a VM there holds that file: it cannot take the disk's lock at the
/// switchover, so the migration rolls back and the guest goes on at the source with every
/// record intact.
#[test]
fn destination_that_cannot_lock_the_disk_rolls_back() {
    require_kvm();
    require_root();
    let dir = TempDir::new("disk-nolock");
    let disk = image(&dir, "disk.img", 4 << 20);
    let other = image(&dir, "other.img", 4 << 20);
    let key = dir.path("key");
    std::fs::write(&key, [9u8; 32]).expect("key");
    let (mut src, sock) = blkstress(&dir, &disk, "a", 64);
    // The VM that holds the destination's file.
    let (_holder, _) = blkstress(&dir, &other, "holder", 0);
    let port = common::mig::free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    // The destination in its own mount namespace, where the disk's path is the other file.
    let host_b = &common::leases::datastore().b;
    let script = format!(
        "mount --bind {} {} && exec {} receive --listen {listen} --auth-key-file {} --lease {}",
        s(&other),
        s(&disk),
        env!("CARGO_BIN_EXE_ferry"),
        s(&key),
        host_b.lease_arg()
    );
    let mut cmd = Command::new("unshare");
    host_b.env(&mut cmd);
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    cmd.env("FERRY_STATE_DIR", common::state_dir());
    let mut dst = Vm::spawn(&mut cmd);
    dst.wait_stderr(T, "waiting for an incoming migration");
    let out = run_to_end(
        &["migrate", "--api-socket", s(&sock), "--to", &listen, "--auth-key-file", s(&key), "--json"],
        T,
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert!(!out.status.success());
    assert_eq!(report["status"], "failed", "{report}");
    assert_eq!(report["vm_running_on"], "source", "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("disk") && reason.contains("in use by another VM"), "{reason}");
    // The guest goes on at the source, records intact.
    src.drain();
    let n = last_records(&src);
    src.wait_line(T, |l| records(l).is_some_and(|m| m >= n + 128));
    let _ = dst.signal_and_wait(libc::SIGTERM, T);
}
