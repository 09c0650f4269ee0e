//! The memstress guest on real KVM: boot, progress, power-off, signals, large memory with
//! a large initrd that must be seen by the guest without touching the rest of memory.

mod common;

use std::time::{Duration, Instant};

use common::{initrd_sum, pass_number, require_kvm, write_random_file, TempDir, Vm};

#[test]
fn memstress_runs_and_stops_on_sigterm() {
    require_kvm();
    let started = Instant::now();
    let mut vm = Vm::start(&["--guest", "memstress", "--memory", "256M", "--cmdline", "wss=16M"]);
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let ready_after = started.elapsed();
    // Pass lines with growing numbers.
    let mut last = 0;
    for _ in 0..3 {
        let line = vm.wait_prefix(Duration::from_secs(5), "memstress: pass ");
        let n = pass_number(&line).expect("pass number");
        assert!(n >= last, "pass numbers went backwards: {last} then {n}");
        last = n;
    }
    assert!(last >= 2, "expected several passes, last was {last}");
    let status = vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.success(), "SIGTERM should end the VM cleanly, got {status:?}; stderr:\n{}", vm.stderr());
    eprintln!("memstress ready after {ready_after:?}");
}

#[test]
fn sigint_stops_cleanly() {
    require_kvm();
    let mut vm = Vm::start(&["--guest", "memstress", "--memory", "64M", "--cmdline", "wss=4M"]);
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let status = vm.signal_and_wait(libc::SIGINT, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

#[test]
fn guest_power_off_exits_zero() {
    require_kvm();
    let mut vm = Vm::start(&["--guest", "memstress", "--memory", "64M", "--cmdline", "wss=2M passes=3"]);
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: done");
    let status = vm.wait(Duration::from_secs(10));
    assert!(status.success(), "power-off should exit 0, got {status:?}; stderr:\n{}", vm.stderr());
    assert!(vm.stderr().contains("powered off"), "{}", vm.stderr());
}

#[test]
fn several_vcpus() {
    require_kvm();
    let mut vm = Vm::start(&[
        "--guest",
        "memstress",
        "--memory",
        "128M",
        "--cpus",
        "4",
        "--cmdline",
        "wss=4M passes=2",
    ]);
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: done");
    assert!(vm.wait(Duration::from_secs(10)).success());
}

#[test]
fn serial_to_file() {
    require_kvm();
    let dir = TempDir::new("serialfile");
    let log = dir.path("console.log");
    let mut vm = Vm::start(&[
        "--guest",
        "memstress",
        "--memory",
        "64M",
        "--cmdline",
        "wss=2M passes=2",
        "--serial",
        &format!("file:{}", log.display()),
    ]);
    let status = vm.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}: {}", vm.stderr());
    let text = std::fs::read_to_string(&log).expect("console log");
    assert!(text.lines().any(|l| l == "memstress: ready"), "{text}");
    assert!(text.lines().any(|l| l == "memstress: done"), "{text}");
    vm.drain();
    assert!(vm.seen.is_empty(), "console went to stdout too: {:?}", vm.seen);
}

/// Resident bytes of the guest-memory mapping of `pid` (the anonymous mapping of exactly
/// `size` bytes), from /proc/PID/smaps.
fn guest_mapping_rss(pid: u32, size: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let want = format!("Size: {:>14} kB", size / 1024).split_whitespace().collect::<Vec<_>>().join(" ");
    let mut in_mapping = false;
    let mut found = None;
    for line in smaps.lines() {
        let norm = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if norm.starts_with("Size:") {
            in_mapping = norm == want;
        } else if in_mapping && norm.starts_with("Rss:") {
            let kb: u64 = norm.split(' ').nth(1).expect("rss").parse().expect("rss kb");
            assert!(found.is_none(), "two {size}-byte mappings");
            found = Some(kb * 1024);
        }
    }
    found.unwrap_or_else(|| panic!("no {size}-byte mapping in smaps of {pid}"))
}

#[test]
fn two_gib_guest_with_512_mib_initrd_touches_only_what_it_needs() {
    require_kvm();
    let dir = TempDir::new("initrd512");
    let initrd = dir.path("initrd.img");
    write_random_file(&initrd, 512 << 20, 42);
    let expected_sum = initrd_sum(&initrd);

    let mut vm = Vm::start(&[
        "--guest",
        "memstress",
        "--memory",
        "2G",
        "--initrd",
        initrd.to_str().expect("utf8"),
        "--cmdline",
        "wss=16M",
    ]);
    let line = vm.wait_prefix(Duration::from_secs(30), "memstress: initrd ");
    assert!(line.contains(&format!("size={}", 512u64 << 20)), "{line}");
    assert!(
        line.contains(&format!("sum={expected_sum:#018x}")),
        "guest saw a different initrd: {line}, expected sum {expected_sum:#018x}"
    );
    vm.wait_line(Duration::from_secs(30), |l| l == "memstress: ready");
    vm.wait_prefix(Duration::from_secs(10), "memstress: pass ");

    let rss = guest_mapping_rss(vm.child.id(), 2 << 30);
    // The initrd, the 16 MiB working set, the guest image, boot structures and page
    // tables; not the other 1.5 GiB.
    let budget = (512u64 << 20) + (16 << 20) + (4 << 20);
    assert!(rss <= budget, "guest memory resident: {} MiB, budget {} MiB", rss >> 20, budget >> 20);
    assert!(rss >= 512 << 20, "initrd not resident? {} MiB", rss >> 20);
    eprintln!("2 GiB guest resident: {} MiB", rss >> 20);

    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn memory_above_the_mmio_hole() {
    require_kvm();
    // 4 GiB: 3 GiB below the hole, 1 GiB above 4 GiB. The guest must boot and run.
    let mut vm = Vm::start(&["--guest", "memstress", "--memory", "4G", "--cmdline", "wss=4M passes=2"]);
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: done");
    assert!(vm.wait(Duration::from_secs(10)).success());
}
