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

/// Runs `ferry` with its own state root; returns the output and what is left under it.
fn run_in_state_root(args: &[&str]) -> (std::process::Output, Vec<String>) {
    let root = TempDir::new("state-root");
    let out = ferry()
        .env("FERRY_STATE_DIR", &root.0)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn ferry");
    let mut left = Vec::new();
    let mut stack = vec![root.0.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            left.push(p.strip_prefix(&root.0).expect("inside").display().to_string());
        }
    }
    left.retain(|p| p != "vms");
    (out, left)
}

#[test]
fn a_vm_that_cannot_start_leaves_no_home_behind() {
    require_kvm();
    let dir = TempDir::new("no-home-left");
    let not_elf = dir.path("not-elf");
    std::fs::write(&not_elf, b"hello").expect("write");
    let bad_ckpt = dir.path("ckpt");
    std::fs::create_dir_all(&bad_ckpt).expect("mkdir");
    std::fs::write(bad_ckpt.join("state.ferry"), b"garbage").expect("write");
    let new_home = dir.path("new-home");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--guest", "memstress", "--memory", "0"], "below the minimum"),
        (vec!["run", "--guest", "memstress", "--memory", "100T"], "exceeds this host"),
        (vec!["run", "--kernel", not_elf.to_str().expect("utf8")], "not an ELF image"),
        (
            vec![
                "restore",
                "--from",
                bad_ckpt.to_str().expect("utf8"),
                "--home",
                new_home.to_str().expect("utf8"),
            ],
            "not a Ferry checkpoint",
        ),
    ];
    for (args, needle) in cases {
        let (out, left) = run_in_state_root(&args);
        assert_one_line_error(&out, needle);
        assert!(left.is_empty(), "{args:?} left {left:?} under the state root");
        assert!(!new_home.exists(), "{args:?} left the home it made");
    }
}

#[test]
fn a_guest_that_rejects_its_options_fails_the_run() {
    require_kvm();
    // memstress cannot place a 1 GiB working set in 256 MiB: it says so and powers off
    // with a failure status, and `ferry run` exits 1 (not 0, as for a clean power-off).
    let (out, left) = run_in_state_root(&[
        "run",
        "--guest",
        "memstress",
        "--memory",
        "256M",
        "--cmdline",
        "wss=1G",
        "--log-level",
        "error",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.contains("does not fit in guest RAM"), "{console}");
    assert_one_line_error(&out, "the guest stopped with failure status 1");
    assert!(left.is_empty(), "left {left:?}");
    // A guest that finishes its work powers off cleanly: exit 0.
    let (out, _) = run_in_state_root(&[
        "run",
        "--guest",
        "memstress",
        "--memory",
        "64M",
        "--cmdline",
        "wss=1M passes=2",
        "--log-level",
        "error",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_console_reader_that_goes_away_is_reported_once() {
    use std::io::BufRead;
    require_kvm();
    let mut child = ferry()
        .args(["run", "--guest", "memstress", "--memory", "64M", "--cmdline", "wss=1M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Read one console line, then close the pipe (as `| head -1` does).
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("a console line");
    drop(out);
    // The VMM notices at its next console write (how soon depends on the guest's pace);
    // then the guest writes on for 2 s more, which must not be reported again.
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in std::io::BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            if l.contains("reader went away") {
                let _ = tx.send(());
            }
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let noticed = rx.recv_timeout(Duration::from_secs(60));
    if noticed.is_ok() {
        std::thread::sleep(Duration::from_secs(2));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let stderr = reader.join().expect("stderr reader");
    assert!(noticed.is_ok(), "the VMM never said the console reader went away: {stderr}");
    assert!(status.success(), "{status:?}");
    assert_eq!(stderr.matches("reader went away").count(), 1, "{stderr}");
    assert!(!stderr.contains("write failed"), "{stderr}");
}

#[test]
fn run_without_a_kernel_names_both_ways_and_its_own_help() {
    for args in [vec!["run"], vec!["--log-level", "info", "run"]] {
        let out = ferry().args(&args).stdin(Stdio::null()).output().expect("ferry");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_one_line_error(&out, "--guest <NAME>");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--kernel <PATH>") && stderr.contains("see 'ferry run --help'"), "{stderr}");
    }
}
