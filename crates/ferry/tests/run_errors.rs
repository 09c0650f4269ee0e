//! Bad input to `ferry run`: each case gets one clear line on stderr and a non-zero exit,
//! never a panic or a hang.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{assert_one_line_error, ferry, require_kvm, require_root, run_to_end, TempDir};

const T: Duration = Duration::from_secs(30);

fn run(args: &[&str]) -> std::process::Output {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    run_to_end(&all, T)
}

#[test]
fn missing_dev_kvm() {
    require_root();
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there.
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {} run --guest memstress",
            env!("CARGO_BIN_EXE_ferry")
        ))
        .stdin(Stdio::null())
        .output()
        .expect("unshare");
    assert_one_line_error(&out, "/dev/kvm does not exist");
}

#[test]
fn unreadable_dev_kvm() {
    require_root();
    require_kvm();
    // /dev/kvm is root's (crw-------); run as nobody.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_ferry"),
            "run",
            "--guest",
            "memstress",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("setpriv");
    assert_one_line_error(&out, "cannot open /dev/kvm");
}

#[test]
fn kernel_missing() {
    assert_one_line_error(
        &run(&["--kernel", "/nonexistent/vmlinux"]),
        "kernel /nonexistent/vmlinux does not exist",
    );
}

#[test]
fn kernel_not_elf() {
    require_kvm();
    let dir = TempDir::new("notelf");
    let path = dir.path("vmlinux");
    std::fs::write(&path, b"this is a text file, not a kernel\n".repeat(10)).expect("write");
    assert_one_line_error(&run(&["--kernel", path.to_str().expect("utf8")]), "not an ELF image");
}

#[test]
fn kernel_is_a_directory() {
    assert_one_line_error(&run(&["--kernel", "/tmp"]), "is a directory");
}

#[test]
fn elf_without_pvh_note() {
    require_kvm();
    // An ordinary host executable: ELF, x86-64, no PVH note.
    assert_one_line_error(&run(&["--kernel", "/bin/true"]), "no PVH entry note");
}

#[test]
fn kernel_overlapping_the_memory_layout() {
    require_kvm();
    let dir = TempDir::new("overlap");
    // A segment over the boot structures below 1 MiB.
    let low = dir.path("low.elf");
    std::fs::write(&low, ferry_boot::testing::make_elf(0x6000, &[0xf4; 64], Some(0x6000))).expect("write");
    assert_one_line_error(&run(&["--kernel", low.to_str().expect("utf8")]), "outside guest RAM above 1 MiB");
    // A segment past the end of a 64 MiB guest.
    let high = dir.path("high.elf");
    std::fs::write(&high, ferry_boot::testing::make_elf(128 << 20, &[0xf4; 64], Some(128 << 20)))
        .expect("write");
    assert_one_line_error(
        &run(&["--kernel", high.to_str().expect("utf8"), "--memory", "64M"]),
        "outside guest RAM above 1 MiB",
    );
}

#[test]
fn initrd_missing() {
    assert_one_line_error(
        &run(&["--guest", "memstress", "--initrd", "/nonexistent/initrd"]),
        "initrd /nonexistent/initrd does not exist",
    );
}

#[test]
fn initrd_larger_than_memory() {
    require_kvm();
    let dir = TempDir::new("bigrd");
    let path = dir.path("initrd");
    // Sparse: costs no disk.
    std::fs::File::create(&path).expect("create").set_len(300 << 20).expect("set_len");
    assert_one_line_error(
        &run(&["--guest", "memstress", "--memory", "256M", "--initrd", path.to_str().expect("utf8")]),
        "is larger than guest memory",
    );
    // Smaller than memory but not fitting above the kernel.
    std::fs::File::create(&path).expect("create").set_len(255 << 20).expect("set_len");
    assert_one_line_error(
        &run(&["--guest", "memstress", "--memory", "256M", "--initrd", path.to_str().expect("utf8")]),
        "does not fit in guest RAM",
    );
}

#[test]
fn memory_unparsable() {
    let out = run(&["--guest", "memstress", "--memory", "lots"]);
    assert_one_line_error(&out, "cannot parse size \"lots\"");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn memory_below_minimum() {
    require_kvm();
    assert_one_line_error(&run(&["--guest", "memstress", "--memory", "8M"]), "below the minimum of 16 MiB");
}

#[test]
fn memory_above_host() {
    require_kvm();
    assert_one_line_error(&run(&["--guest", "memstress", "--memory", "64T"]), "exceeds this host's");
}

#[test]
fn unknown_guest() {
    assert_one_line_error(
        &run(&["--guest", "doom"]),
        "unknown guest \"doom\"; the bundled guests are: memstress",
    );
}

#[test]
fn zero_cpus() {
    require_kvm();
    assert_one_line_error(&run(&["--guest", "memstress", "--cpus", "0"]), "at least one vCPU");
}

#[test]
fn too_many_cpus() {
    require_kvm();
    assert_one_line_error(&run(&["--guest", "memstress", "--cpus", "300"]), "300 vCPUs requested; at most");
}

#[test]
fn unwritable_serial_file() {
    require_kvm();
    assert_one_line_error(
        &run(&["--guest", "memstress", "--serial", "file:/nonexistent/dir/console.log"]),
        "cannot open serial output file /nonexistent/dir/console.log",
    );
}

#[test]
fn bad_serial_destination() {
    assert_one_line_error(
        &run(&["--guest", "memstress", "--serial", "tcp:1234"]),
        "cannot parse serial destination",
    );
}

#[test]
fn kernel_and_guest_together() {
    assert_one_line_error(&run(&["--guest", "memstress", "--kernel", "/bin/true"]), "cannot be used with");
}

#[test]
fn help_teaches() {
    let out = ferry().args(["run", "--help"]).output().expect("help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in ["--memory", "--initrd", "PVH", "0x3f8", "powers off", "Examples:"] {
        assert!(help.contains(needle), "`ferry run --help` lacks {needle:?}:\n{help}");
    }
}
