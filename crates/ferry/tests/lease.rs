//! Leases on shared storage (`--lease`, sanlock) on real KVM, with a private sanlock daemon
//! per test "host" (see `ferry_lease::testing`): the lease keeps a second host from
//! starting the VM, moves with a migration, and a VMM whose lease cannot be renewed fences
//! itself. Needs root, KVM and the `sanlock` package; each test joins its lockspace
//! (2 x io_timeout + 1 s = 5 s per host) and cleans up its daemons and files.
//!
//! The self-fencing tests wait for the fence (about 10-14 s) or for longer than it: they
//! are the long ones (~25 s each). The storage-fault tests put the datastore behind a FUSE
//! passthrough (`ferry_lease::testing::FaultFs`, needs `/dev/fuse` and `libfuse3-dev`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mig::{free_port, http, info, migrate, s, write_key, T};
use common::{ferry, pass_number, require_kvm, require_root, wait_timeout, TempDir, Vm};
use ferry_lease::testing::{zero_file, Daemon, FaultFs, RUN_DIR_ENV};

/// The lockspaces' I/O timeout: renewals every 4 s, the VMM fences at 14 s.
const IO: u32 = 2;
const LS: &str = "FERRYTEST";
/// Sanlock renews a host's lease every 2 x io_timeout: the faults strike at a random point
/// of that cycle.
const RENEWAL: Duration = Duration::from_secs(2 * IO as u64);

/// One test "host": its sanlock daemon and its host id.
struct Host {
    daemon: Daemon,
    id: u64,
}

impl Host {
    /// `ferry` talking to this host's daemon.
    fn ferry(&self) -> Command {
        let mut c = ferry();
        c.env(RUN_DIR_ENV, self.daemon.run_dir());
        c
    }

    /// Its `--lease` argument.
    fn lease(&self, ids: &Path) -> String {
        format!("{LS}:{}:{},io_timeout={IO}", self.id, s(ids))
    }
}

/// A datastore (a directory with a formatted lockspace file) and `n` hosts.
fn datastore(dir: &TempDir, n: u64) -> (PathBuf, Vec<Host>) {
    datastore_in(dir, &dir.0, n)
}

/// [`datastore`] with the lockspace file in `at`.
fn datastore_in(dir: &TempDir, at: &Path, n: u64) -> (PathBuf, Vec<Host>) {
    require_root();
    require_kvm();
    let ids = at.join("ids");
    zero_file(&ids, 1 << 20).expect("lockspace file");
    // Recording the io_timeout in the lockspace makes the first join take 2 x IO + 1 s.
    let out = Command::new("sanlock")
        .args(["direct", "init", "-s", &format!("{LS}:0:{}:0", s(&ids)), "-Z", "512", "-A", "1M", "-o"])
        .arg(IO.to_string())
        .output()
        .expect("run sanlock direct init (is the sanlock package installed?)");
    assert!(out.status.success(), "sanlock direct init: {}", String::from_utf8_lossy(&out.stderr));
    let hosts = (1..=n)
        .map(|id| {
            let name = format!("h{id}-{}", std::process::id());
            Host { daemon: Daemon::start(&dir.0, &name, &[]).expect("start a sanlock daemon"), id }
        })
        .collect();
    (ids, hosts)
}

/// `ferry run` of a memstress VM on `host` with the lease and an API socket, console on
/// stdout; returns at once.
fn spawn_leased(host: &Host, ids: &Path, home: &Path, sock: &Path) -> Vm {
    let lease = host.lease(ids);
    Vm::spawn(host.ferry().args([
        "run",
        "--guest",
        "memstress",
        "--memory",
        "64M",
        "--cmdline",
        "wss=2M",
        "--home",
        s(home),
        "--lease",
        &lease,
        "--api-socket",
        s(sock),
    ]))
}

/// A memstress VM on `host` with the lease, an API socket and its console on stdout.
fn leased_vm(host: &Host, ids: &Path, home: &Path, sock: &Path) -> Vm {
    let mut vm = spawn_leased(host, ids, home, sock);
    vm.wait_prefix(T, "memstress: ready");
    vm.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= 2));
    vm
}

/// `ferry home DIR --json` through `host`'s daemon.
fn home_status(host: &Host, home: &Path) -> serde_json::Value {
    let out = host.ferry().args(["home", s(home), "--json"]).output().expect("ferry home");
    assert!(out.status.success(), "ferry home: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("home JSON")
}

/// What `GET /vm/events?since=0` sends within a second (the stream stays open).
fn events_so_far(sock: &Path) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
    write!(stream, "GET /vm/events?since=0 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&raw).into_owned()
}

/// A random moment of at most `max` for a fault (`what` names it): the storage-fault tests
/// strike at a different point of the renewal cycle (or of a migration) on every run. The
/// seed is printed; `FERRY_LEASE_SEED=N` replays a run.
fn random_moment(what: &str, max: Duration) -> Duration {
    let seed =
        std::env::var("FERRY_LEASE_SEED").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    // One xorshift step spreads nearby seeds apart.
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let d = Duration::from_millis(x % (max.as_millis() as u64 + 1));
    eprintln!("{what} at {} ms (seed {seed}; FERRY_LEASE_SEED={seed} replays it)", d.as_millis());
    d
}

/// Runs a command to its end (at most `T`).
fn output(cmd: &mut Command) -> Output {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    wait_timeout(&mut child, T).expect("the command did not end");
    child.wait_with_output().expect("output")
}

#[test]
fn a_leased_vm_runs_on_one_host_only_and_the_next_holder_raises_the_lease_version() {
    let dir = TempDir::new("lease-one");
    let (ids, hosts) = datastore(&dir, 2);
    let (a, b) = (&hosts[0], &hosts[1]);
    let home = dir.path("home");
    let sock_a = dir.path("a.sock");
    let mut vm_a = leased_vm(a, &ids, &home, &sock_a);
    let st = home_status(a, &home);
    assert_eq!(st["lease"]["owner_host_id"], 1, "{st}");
    assert_eq!(st["lease"]["lver"], 1, "{st}");
    assert_eq!(st["lock"]["lease"]["host_id"], 1, "{st}");

    // Host B (its own daemon, its own host id) cannot start the VM: one clear line.
    let lease_b = b.lease(&ids);
    let t = Instant::now();
    let out = output(b.ferry().args([
        "run",
        "--guest",
        "memstress",
        "--memory",
        "64M",
        "--home",
        s(&home),
        "--lease",
        &lease_b,
        "--serial",
        "null",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("its lease in lockspace FERRYTEST is held elsewhere"), "{err}");
    eprintln!(
        "second host refused in {:.1} s (with its 5 s join): {}",
        t.elapsed().as_secs_f64(),
        err.trim()
    );
    // Nor can a VMM without --lease (it would not see the lease).
    let out = output(a.ferry().args(["run", "--guest", "memstress", "--memory", "64M", "--home", s(&home)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has a lease"), "{err}");
    // A runs on, untouched.
    let last = vm_a.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0);
    vm_a.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= last + 2));
    assert_eq!(info(&sock_a)["state"], "running");

    // A stops and releases: B starts it, with the next lease version.
    assert!(vm_a.signal_and_wait(libc::SIGTERM, T).success());
    let st = home_status(b, &home);
    assert_eq!(st["lease"]["owner_host_id"], serde_json::Value::Null, "{st}");
    let sock_b = dir.path("b.sock");
    let mut vm_b = leased_vm(b, &ids, &home, &sock_b);
    let st = home_status(b, &home);
    assert_eq!(st["lease"]["owner_host_id"], 2, "{st}");
    assert_eq!(st["lease"]["lver"], 2, "{st}");
    assert_eq!(st["generation"]["generation"], 2, "{st}");
    assert!(vm_b.signal_and_wait(libc::SIGTERM, T).success());
    common::overlap::check_home(&home, &[]).expect("no overlap in runs.log");
}

#[test]
fn a_migration_moves_the_lease() {
    let dir = TempDir::new("lease-mig");
    let (ids, hosts) = datastore(&dir, 2);
    let (a, b) = (&hosts[0], &hosts[1]);
    let home = dir.path("home");
    let sock = dir.path("a.sock");
    let mut src = leased_vm(a, &ids, &home, &sock);
    let key = write_key(&dir, "key", 5);
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let lease_b = b.lease(&ids);
    let mut dst = Vm::spawn(b.ferry().args([
        "receive",
        "--listen",
        &listen,
        "--auth-key-file",
        s(&key),
        "--lease",
        &lease_b,
    ]));
    // The destination joins the lockspace before it listens.
    dst.wait_stderr(T, "waiting for an incoming migration");
    let (out, r) = migrate(&sock, port, &key, &[]);
    assert!(out.status.success(), "{r}\n{}", dst.stderr());
    assert_eq!(r["vm_running_on"], "destination", "{r}");
    assert!(src.wait(T).success());
    dst.wait_line(T, |l| pass_number(l).is_some());
    let st = home_status(b, &home);
    assert_eq!(st["lease"]["owner_host_id"], 2, "{st}");
    assert_eq!(st["lease"]["lver"], 2, "{st}");
    let released = src.stderr().lines().find(|l| l.contains("lease released in")).map(str::to_owned);
    let acquired = dst.stderr().lines().find(|l| l.contains("acquired in")).map(str::to_owned);
    eprintln!(
        "downtime {} ms; source: {}; destination: {}",
        r["downtime_ms"],
        released.as_deref().unwrap_or("?"),
        acquired.as_deref().unwrap_or("?")
    );
    assert!(released.is_some() && acquired.is_some(), "{}\n{}", src.stderr(), dst.stderr());
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
    common::overlap::check_home(&home, &[]).expect("no overlap in runs.log");
}

/// Long (~25 s): waits for the VMM to fence itself.
#[test]
fn a_vmm_whose_lease_is_not_renewed_fences_itself_and_does_not_resume() {
    let dir = TempDir::new("lease-fence");
    let (ids, hosts) = datastore(&dir, 1);
    let a = &hosts[0];
    let home = dir.path("home");
    let sock = dir.path("a.sock");
    let mut vm = leased_vm(a, &ids, &home, &sock);
    // The lease daemon stops (as a hung daemon, or a host whose daemon is frozen): nothing
    // renews the lease and, without a watchdog, nothing in sanlock fences. The VMM does.
    let stopped = Instant::now();
    // SAFETY: stopping the daemon this test started.
    unsafe { libc::kill(a.daemon.pid() as i32, libc::SIGSTOP) };
    let line = vm.wait_stderr(Duration::from_secs(30), "FENCED");
    let fenced_after = stopped.elapsed();
    let limit = Duration::from_secs(7 * u64::from(IO));
    eprintln!("fenced {:.1} s after the daemon stopped", fenced_after.as_secs_f64());
    assert!(fenced_after <= limit + Duration::from_secs(1), "{line}");
    let i = info(&sock);
    assert_eq!(i["state"], "fenced", "{i}");
    assert!(i["fenced"].as_str().is_some_and(|r| r.contains("last renewed")), "{i}");
    // The guest stopped: no new pass in two seconds.
    vm.drain();
    let last = vm.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(2));
    vm.drain();
    let now = vm.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0);
    assert!(now <= last + 1, "the guest ran on after the fence: pass {last} -> {now}");
    // Neither a resume (no lease to be had) nor a pause or snapshot moves it.
    let (code, body) = http(&sock, "PUT", "/vm/resume", None);
    assert_eq!(code, 409, "{body}");
    let (code, body) = http(&sock, "PUT", "/vm/pause", None);
    assert_eq!(code, 409, "{body}");
    // The event stream says so too.
    let events = events_so_far(&sock);
    assert!(events.contains("\"kind\":\"fenced\""), "{events}");
    // SAFETY: resuming the daemon this test stopped.
    unsafe { libc::kill(a.daemon.pid() as i32, libc::SIGCONT) };
    assert!(vm.signal_and_wait(libc::SIGTERM, T).success());
    let runs = std::fs::read_to_string(home.join("runs.log")).expect("runs.log");
    assert!(runs.lines().last().is_some_and(|l| l.contains("\"stop\"")), "{runs}");
}

/// Sets the storage back to `ok` when dropped: declared after the VMM, it is dropped before
/// it, so that a failing test does not leave the VMM stuck in the kernel on hung storage.
struct Unhang<'a>(&'a FaultFs);

impl Drop for Unhang<'_> {
    fn drop(&mut self) {
        let _ = self.0.set("ok");
    }
}

/// The last memstress pass on the console so far.
fn last_pass(vm: &mut Vm) -> u64 {
    vm.drain();
    vm.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0)
}

/// Long (~25 s): the datastore stops answering; the VMM fences itself before its lease
/// could expire, refuses a resume at once while the storage hangs, and stays fenced when the
/// storage comes back.
#[test]
fn a_vmm_whose_storage_hangs_fences_itself_before_its_lease_can_expire() {
    let dir = TempDir::new("lease-hang");
    let fs = FaultFs::mount(&dir.0, &dir.path("backing"), &dir.path("ds")).expect("mount the FUSE datastore");
    let (ids, hosts) = datastore_in(&dir, fs.path(), 1);
    let a = &hosts[0];
    let home = fs.path().join("home");
    let sock = dir.path("a.sock");
    let mut vm = leased_vm(a, &ids, &home, &sock);
    // Whatever happens, the storage answers again before the VMM is killed (dropped first).
    let _unhang = Unhang(&fs);
    std::thread::sleep(random_moment("the storage hangs", RENEWAL));
    fs.set("hang").expect("hang");
    let hung = Instant::now();
    let err = vm.wait_stderr(Duration::from_secs(30), "FENCED");
    let after = hung.elapsed();
    eprintln!("fenced {:.1} s after the storage hung", after.as_secs_f64());
    // The last renewal was at most 2 x IO before the hang; the VMM fences at 7 x IO.
    assert!(after <= Duration::from_secs(7 * u64::from(IO) + 1), "{err}");
    let i = info(&sock);
    assert_eq!(i["state"], "fenced", "{i}");
    let last = last_pass(&mut vm);
    std::thread::sleep(Duration::from_secs(2));
    let now = last_pass(&mut vm);
    assert!(now <= last + 1, "the guest ran on after the fence: pass {last} -> {now}");
    // A resume while the storage still hangs is refused within its 2 s probe, and the VMM
    // goes on answering (taking the lock would have blocked its API thread for as long).
    let asked = Instant::now();
    let out = output(ferry().args(["resume", "--api-socket", s(&sock)]));
    let took = asked.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("did not answer within 2 s"), "{err}");
    assert!(took < Duration::from_secs(5), "the resume took {took:?}");
    assert_eq!(info(&sock)["state"], "fenced");
    // The storage comes back: nothing resumes the VM on its own.
    fs.set("ok").expect("ok");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(info(&sock)["state"], "fenced");
    assert_eq!(last_pass(&mut vm), now);
    assert!(vm.signal_and_wait(libc::SIGTERM, T).success());
}

/// Long (~25 s): the datastore fails every operation for 1 to 5 s (less than the 14 s
/// fence time), from a random moment of the renewal cycle, and recovers; the VM runs on
/// where it was.
#[test]
fn storage_errors_shorter_than_the_fence_time_leave_the_vm_running() {
    let dir = TempDir::new("lease-eio");
    let fs = FaultFs::mount(&dir.0, &dir.path("backing"), &dir.path("ds")).expect("mount the FUSE datastore");
    let (ids, hosts) = datastore_in(&dir, fs.path(), 1);
    let a = &hosts[0];
    let home = fs.path().join("home");
    let sock = dir.path("a.sock");
    let mut vm = leased_vm(a, &ids, &home, &sock);
    let _unhang = Unhang(&fs);
    std::thread::sleep(random_moment("the storage fails", RENEWAL));
    fs.set("eio").expect("eio");
    // 1 to 5 s of errors: at most 5 s, so the last good renewal is at most 2 x IO + 5 = 9 s
    // old when they stop, well before the 14 s fence.
    std::thread::sleep(
        Duration::from_secs(1) + random_moment("the errors end after 1 s +", Duration::from_secs(4)),
    );
    fs.set("ok").expect("ok");
    // Past the moment the VMM would have fenced had the errors gone on.
    std::thread::sleep(Duration::from_secs(7 * u64::from(IO) - 5 + 4));
    let i = info(&sock);
    assert_eq!(i["state"], "running", "{i}\n{}", vm.stderr());
    assert!(!vm.stderr().contains("FENCED"), "{}", vm.stderr());
    let last = last_pass(&mut vm);
    vm.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= last + 2));
    let st = home_status(a, &home);
    assert_eq!(st["lease"]["owner_host_id"], 1, "{st}");
    assert!(vm.signal_and_wait(libc::SIGTERM, T).success());
}

/// Starts `ferry run` of the VM in `home` on `host`; `Some` once its vCPUs run, `None` if
/// it exits first (the lease is held elsewhere).
fn try_start(host: &Host, ids: &Path, home: &Path, sock: &Path) -> Option<Vm> {
    let mut vm = spawn_leased(host, ids, home, sock);
    let deadline = Instant::now() + T;
    loop {
        if vm.stderr().contains("vCPUs running") {
            return Some(vm);
        }
        if let Ok(Some(_)) = vm.child.try_wait() {
            return None;
        }
        assert!(Instant::now() < deadline, "ferry run neither ran nor failed: {}", vm.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Long (~100 s): host A's view of the datastore hangs; A fences itself; host B, which
/// reaches the datastore by another path, can start the VM only once A's lease has
/// expired (8 x io_timeout + 60 s after A's last renewal), and then runs it once: the run
/// records show no overlap.
#[test]
fn another_host_takes_over_only_after_the_lease_expired() {
    let dir = TempDir::new("lease-takeover");
    let backing = dir.path("backing");
    let fs = FaultFs::mount(&dir.0, &backing, &dir.path("ds")).expect("mount the FUSE datastore");
    let (ids_a, hosts) = datastore_in(&dir, fs.path(), 2);
    let (a, b) = (&hosts[0], &hosts[1]);
    // A sees the datastore through the FUSE mount, B through the backing directory.
    let (ids_b, home_a, home_b) = (backing.join("ids"), fs.path().join("home"), backing.join("home"));
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let mut vm_a = leased_vm(a, &ids_a, &home_a, &sock_a);
    let _unhang = Unhang(&fs);
    // B is refused while A holds the lease (and B joins the lockspace meanwhile).
    assert!(try_start(b, &ids_b, &home_b, &sock_b).is_none());
    std::thread::sleep(random_moment("A's storage hangs", RENEWAL));
    fs.set("hang").expect("hang");
    let hung = Instant::now();
    vm_a.wait_stderr(Duration::from_secs(30), "FENCED");
    let fenced = hung.elapsed();
    let mut attempts = 0;
    let mut vm_b = loop {
        attempts += 1;
        if let Some(vm) = try_start(b, &ids_b, &home_b, &sock_b) {
            break vm;
        }
        assert!(hung.elapsed() < Duration::from_secs(150), "B never got the lease");
        std::thread::sleep(Duration::from_secs(2));
    };
    let taken = hung.elapsed();
    eprintln!(
        "storage hung at 0 s; A fenced at {:.1} s; B started the VM at {:.1} s (attempt {attempts})",
        fenced.as_secs_f64(),
        taken.as_secs_f64()
    );
    // A's last renewal was at most 2 x IO before the hang: B waited out 8 x IO + 60 s.
    assert!(taken >= Duration::from_secs(8 * u64::from(IO) + 60 - 2 * u64::from(IO)), "{taken:?}");
    assert!(taken > fenced + Duration::from_secs(50), "fenced {fenced:?}, taken {taken:?}");
    vm_b.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= 2));
    assert_eq!(info(&sock_b)["state"], "running");
    assert_eq!(info(&sock_a)["state"], "fenced");
    let st = home_status(b, &home_b);
    assert_eq!(st["lease"]["owner_host_id"], 2, "{st}");
    assert!(vm_b.signal_and_wait(libc::SIGTERM, T).success());
    // Storage back: A's stop record (with the moment its vCPUs stopped) reaches runs.log.
    fs.set("ok").expect("ok");
    vm_a.signal_and_wait(libc::SIGTERM, T);
    common::overlap::check_home(&home_b, &[]).expect("the VM ran once at a time");
}

/// Long (~100 s): host A is frozen whole (its VMM and its lease daemon stopped); host B
/// takes the VM over once A's lease has expired; A, thawed, stops its copy before a vCPU
/// runs another guest instruction, and the run records show no overlap.
#[test]
fn a_frozen_host_thawed_after_a_takeover_never_runs_its_copy_again() {
    let dir = TempDir::new("lease-frozen");
    let (ids, hosts) = datastore(&dir, 2);
    let (a, b) = (&hosts[0], &hosts[1]);
    let home = dir.path("home");
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let mut vm_a = leased_vm(a, &ids, &home, &sock_a);
    assert!(try_start(b, &ids, &home, &sock_b).is_none());
    let (daemon_pid, vmm_pid) = (a.daemon.pid() as i32, vm_a.child.id() as i32);
    std::thread::sleep(random_moment("host A freezes", RENEWAL));
    let freeze = |sig| {
        // SAFETY: signals to the processes this test started.
        unsafe {
            libc::kill(daemon_pid, sig);
            libc::kill(vmm_pid, sig);
        }
    };
    freeze(libc::SIGSTOP);
    let frozen = Instant::now();
    let frozen_ns = common::overlap::monotonic_ns();
    std::thread::sleep(Duration::from_millis(500));
    let before = last_pass(&mut vm_a);
    let mut vm_b = loop {
        if let Some(vm) = try_start(b, &ids, &home, &sock_b) {
            break vm;
        }
        if frozen.elapsed() >= Duration::from_secs(150) {
            let log = b.daemon.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "B never got the lease; B's daemon:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    eprintln!("A frozen at 0 s; B started the VM at {:.1} s", frozen.elapsed().as_secs_f64());
    vm_b.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= 2));
    freeze(libc::SIGCONT);
    // A fences itself, or its lease daemon, finding the lease failed long ago (past its
    // kill grace), kills it first: either way its copy never runs again.
    let thawed = Instant::now();
    let killed = loop {
        if vm_a.stderr().contains("FENCED") {
            break false;
        }
        if let Ok(Some(_)) = vm_a.child.try_wait() {
            break true;
        }
        assert!(thawed.elapsed() < Duration::from_secs(10), "A neither fenced nor ended: {}", vm_a.stderr());
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_secs(2));
    let after = last_pass(&mut vm_a);
    assert_eq!(after, before, "A's guest ran after the thaw (pass {before} -> {after})");
    eprintln!("after the thaw A was {}", if killed { "killed by its lease daemon" } else { "fenced" });
    // A fenced VMM may still be killed by its daemon (its kill grace ran out while frozen):
    // if it answers, it says fenced.
    let out = output(ferry().args(["info", "--api-socket", s(&sock_a), "--json"]));
    if out.status.success() {
        let i: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info JSON");
        assert_eq!(i["state"], "fenced", "{i}");
    }
    assert_eq!(info(&sock_b)["state"], "running");
    assert!(vm_b.signal_and_wait(libc::SIGTERM, T).success());
    let a_pid = vm_a.child.id();
    vm_a.signal_and_wait(libc::SIGTERM, T);
    // A killed at the thaw wrote no stop: its run ended when it froze.
    common::overlap::check_home(&home, &[(a_pid, frozen_ns)]).expect("the VM ran once at a time");
}

/// Long (~25 s): the source's lease stops being renewed in the middle of a migration. The
/// source fences itself and cancels the migration first: the VM stays fenced on the source,
/// the destination never runs it, and `runs.log` shows one run.
#[test]
fn a_vmm_that_fences_in_the_middle_of_a_migration_cancels_it() {
    let dir = TempDir::new("lease-fence-mig");
    let (ids, hosts) = datastore(&dir, 2);
    let (a, b) = (&hosts[0], &hosts[1]);
    let home = dir.path("home");
    let sock = dir.path("a.sock");
    let _src = leased_vm(a, &ids, &home, &sock);
    let key = write_key(&dir, "key", 6);
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let lease_b = b.lease(&ids);
    let mut dst = Vm::spawn(b.ferry().args([
        "receive",
        "--listen",
        &listen,
        "--auth-key-file",
        s(&key),
        "--lease",
        &lease_b,
    ]));
    dst.wait_stderr(T, "waiting for an incoming migration");
    // A migration that cannot converge for longer than the fence takes: 2 MiB rewritten
    // faster than a 1 MiB/s link copies it, whole pages (no deltas, no compression), a 1 ms
    // downtime limit that even a 99% throttle does not reach before the fence.
    let child = common::mig::migrate_bg(
        &sock,
        port,
        &key,
        &["--bandwidth-mib", "1", "--downtime-ms", "1", "--delta-cache-mib", "0", "--compress", "off"],
    );
    common::mig::wait_precopy(&sock);
    // SAFETY: stopping the daemon this test started.
    unsafe { libc::kill(a.daemon.pid() as i32, libc::SIGSTOP) };
    let (_, r) = common::mig::finish(child);
    // SAFETY: resuming the daemon this test stopped.
    unsafe { libc::kill(a.daemon.pid() as i32, libc::SIGCONT) };
    assert_eq!(r["reason_code"], "cancelled", "{r}");
    assert_eq!(r["vm_running_on"], "source", "{r}");
    let i = info(&sock);
    assert_eq!(i["state"], "fenced", "{i}");
    // The destination never ran the guest.
    dst.drain();
    assert!(!dst.seen.iter().any(|l| pass_number(l).is_some()), "the destination ran the guest");
    common::overlap::check_home(&home, &[]).expect("no overlap in runs.log");
}

/// Long (~30 s): the source's datastore hangs at a random moment of pre-copy (0-1.5 s in;
/// the destination sees the datastore through another path that keeps working). The source
/// fences itself and the migration ends, rolled back: the VM stays fenced on the source,
/// the destination never runs it, and `runs.log` shows one run.
#[test]
fn a_migration_whose_source_storage_hangs_rolls_back_and_never_runs_twice() {
    let dir = TempDir::new("lease-hang-mig");
    let backing = dir.path("backing");
    let fs = FaultFs::mount(&dir.0, &backing, &dir.path("ds")).expect("mount the FUSE datastore");
    // One datastore, seen by A through the FUSE mount and by B directly: the same id.
    std::fs::write(backing.join(".ferry-datastore"), "ds-hang-mig\n").expect("datastore id");
    let (ids_a, hosts) = datastore_in(&dir, fs.path(), 2);
    let (a, b) = (&hosts[0], &hosts[1]);
    let (ids_b, home_a, home_b) = (backing.join("ids"), fs.path().join("home"), backing.join("home"));
    let sock = dir.path("a.sock");
    let mut src = leased_vm(a, &ids_a, &home_a, &sock);
    let _unhang = Unhang(&fs);
    let key = write_key(&dir, "key", 7);
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let lease_b = b.lease(&ids_b);
    let mut dst = Vm::spawn(b.ferry().args([
        "receive",
        "--listen",
        &listen,
        "--auth-key-file",
        s(&key),
        "--lease",
        &lease_b,
        "--home",
        s(&home_b),
    ]));
    dst.wait_stderr(T, "waiting for an incoming migration");
    let child = common::mig::migrate_bg(
        &sock,
        port,
        &key,
        &["--bandwidth-mib", "1", "--downtime-ms", "1", "--delta-cache-mib", "0", "--compress", "off"],
    );
    common::mig::wait_precopy(&sock);
    // At a random moment of pre-copy.
    let delay = random_moment("the storage hangs into pre-copy", Duration::from_millis(1500));
    std::thread::sleep(delay);
    fs.set("hang").expect("hang");
    let (_, r) = common::mig::finish(child);
    assert_eq!(r["vm_running_on"], "source", "{r}");
    assert_ne!(r["status"], "completed", "{r}");
    assert_eq!(info(&sock)["state"], "fenced");
    fs.set("ok").expect("ok");
    dst.drain();
    assert!(!dst.seen.iter().any(|l| pass_number(l).is_some()), "the destination ran the guest");
    assert!(src.signal_and_wait(libc::SIGTERM, T).success());
    common::overlap::check_home(&home_b, &[]).expect("no overlap in runs.log");
}

/// A suspend and a restore on leases: the suspended VM gives its lease up, another host
/// restores it from the checkpoint under the lease (raising the lease version), and the
/// first host cannot start the VM meanwhile.
#[test]
fn a_suspended_vm_is_restored_under_the_lease_on_another_host() {
    let dir = TempDir::new("lease-ckpt");
    let (ids, hosts) = datastore(&dir, 2);
    let (a, b) = (&hosts[0], &hosts[1]);
    let home = dir.path("home");
    let sock = dir.path("a.sock");
    let mut vm = leased_vm(a, &ids, &home, &sock);
    let ckpt = dir.path("ckpt");
    let req = serde_json::json!({"to": s(&ckpt), "stop": true});
    let (code, body) = http(&sock, "PUT", "/vm/snapshot", Some(&req));
    assert_eq!(code, 200, "{body}");
    assert!(vm.wait(T).success(), "{}", vm.stderr());
    let lease_b = b.lease(&ids);
    let sock_b = dir.path("b.sock");
    let mut restored = Vm::spawn(b.ferry().args([
        "restore",
        "--from",
        s(&ckpt),
        "--home",
        s(&home),
        "--lease",
        &lease_b,
        "--api-socket",
        s(&sock_b),
    ]));
    let last = vm.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0);
    restored.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last));
    let st = home_status(b, &home);
    assert_eq!(st["lease"]["owner_host_id"], 2, "{st}");
    assert_eq!(st["lease"]["lver"], 2, "{st}");
    // The first host cannot start it while B holds the lease.
    assert!(try_start(a, &ids, &home, &dir.path("a2.sock")).is_none(), "A started the VM B holds");
    assert!(restored.signal_and_wait(libc::SIGTERM, T).success());
    common::overlap::check_home(&home, &[]).expect("no overlap in runs.log");
}
