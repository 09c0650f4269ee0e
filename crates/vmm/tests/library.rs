//! The VMM as a library, without the `ferry` binary's process setup: a memstress VM is
//! built and run through `ferry_vmm`'s API, with no console and a stop handle instead of
//! signals, and stopped through that handle. The process's signal mask is left as it was.
//! Needs /dev/kvm (fails without it, like every KVM test).

use std::time::{Duration, Instant};

use ferry_vmm::{KernelSource, RunOutcome, SerialConfig, StopSource, VmConfig, Vmm};

/// The calling thread's blocked signals (1..=64).
fn blocked() -> Vec<i32> {
    // SAFETY: sigset_t is plain data; pthread_sigmask fills it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a null new set only queries the mask into `set`, a valid sigset_t.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set) };
    assert_eq!(rc, 0, "pthread_sigmask");
    // SAFETY: `set` was initialised by pthread_sigmask.
    (1..=64).filter(|&s| unsafe { libc::sigismember(&set, s) } == 1).collect()
}

#[test]
fn a_vm_runs_and_stops_through_the_library_without_touching_signals() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
    let before = blocked();
    let home = std::env::temp_dir().join(format!("ferry-library-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let (stop, handle) = StopSource::new().expect("stop source");
    let guest = ferry_guests::find("memstress").expect("memstress").elf;
    let vmm = Vmm::build(
        VmConfig {
            memory: 64 << 20,
            vcpus: 1,
            kernel: KernelSource::Embedded { name: "memstress".into(), elf: guest },
            cmdline: "wss=1M".into(),
            initrd: None,
            serial: SerialConfig::Null,
            started_ns: ferry_vmm::monotonic_ns(),
            api_socket: None,
            home: Some(home.clone()),
            state_dir: std::env::temp_dir(),
            lease: None,
            disks: Vec::new(),
            nets: Vec::new(),
            cpu_hide: Vec::new(),
        },
        stop,
    )
    .expect("build");
    assert_eq!(blocked(), before, "building the VM changed the signal mask");
    let runner = std::thread::spawn(move || {
        let before = blocked();
        let outcome = vmm.run();
        (outcome, before, blocked())
    });
    // Let the guest run a while, then stop it the way a daemon would.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!runner.is_finished(), "the VM ended on its own");
    let asked = Instant::now();
    handle.stop().expect("stop");
    let (outcome, run_before, run_after) = runner.join().expect("run thread");
    let outcome = outcome.expect("run");
    assert_eq!(outcome, RunOutcome::Signalled(ferry_vmm::stop::HANDLE_STOP_SIGNAL));
    assert!(asked.elapsed() < Duration::from_secs(5), "stopping took {:?}", asked.elapsed());
    assert_eq!(run_before, run_after, "running the VM changed the signal mask");
    assert_eq!(blocked(), before, "the signal mask changed");
    assert!(!before.contains(&libc::SIGTERM), "the test harness blocks SIGTERM itself");
    let _ = std::fs::remove_dir_all(&home);
}
