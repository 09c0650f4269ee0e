//! Cancel and the stall bound, on real KVM with the real `ferry` binary: a cancel ends the
//! migration within a second whatever the source waits for (an answer the destination
//! holds back, a server that never answers, a destination that stopped reading), and a
//! destination that stops making progress fails the migration at `--stall-timeout-s`. After
//! each, the VM runs exactly once with its memory intact (memstress checks every page on
//! every pass and prints CORRUPTION otherwise).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::mig::{
    finish, free_port, info, migrate, migrate_bg, receiver, s, slow_source, slow_source_with, source,
    still_runs, wait_precopy, write_key, SLOW, T,
};
use common::{pass_number, require_kvm, run_to_end, TempDir, Vm};
use ferry_migration::protocol::{self as wire, Kind};

/// Small VMs: the tests are about waits, not about moving memory.
const SMALL: &[&str] = &["--memory", "128M", "--cmdline", "wss=4M"];

/// How long a cancel may take to end the migration, seen from the test (the contract is
/// 1 s inside the VMM; this adds two process starts and the API round trips, which a slow
/// or busy machine stretches). Every wait these tests cancel would end on its own at least
/// 4 s after the cancel (a 5 s connect timeout, an 8 or 10 s stall bound, a server that
/// holds on until the test ends), so a cancel that did nothing still fails this bound.
const CANCEL_WITHIN: Duration = Duration::from_secs(3);

/// Which frames [`holding_proxy`] keeps to itself.
#[derive(Clone, Copy)]
enum Hold {
    /// The destination's RestoreResult (the source waits for it with its VM paused).
    RestoreResult,
    /// The source's Commit (the destination waits for it, the source for Activated).
    Commit,
}

/// Forwards one migration connection to `to` frame by frame, both ways, and keeps the
/// frames `hold` names (the connections stay open); says on the channel when it kept one.
/// A side that closes closes the other.
fn holding_proxy(to: u16, hold: Hold) -> (u16, mpsc::Receiver<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else { return };
        let (a2, b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
        let (to_source, to_destination) = match hold {
            Hold::RestoreResult => (Some(Kind::RestoreResult as u16), None),
            Hold::Commit => (None, Some(Kind::Commit as u16)),
        };
        let tx2 = tx.clone();
        std::thread::spawn(move || forward_frames(b2, a2, to_source, &tx2));
        forward_frames(a, b, to_destination, &tx);
    });
    (port, rx)
}

/// Copies frames from `from` to `to`, keeping those of kind `keep`; closes both at the end.
fn forward_frames(mut from: TcpStream, mut to: TcpStream, keep: Option<u16>, kept: &mpsc::Sender<()>) {
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; wire::HEADER_LEN];
        if from.read_exact(&mut h).is_err() {
            break;
        }
        let kind = u16::from_le_bytes([h[4], h[5]]);
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        payload.resize(len, 0);
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        if Some(kind) == keep {
            let _ = kept.send(());
            continue;
        }
        if to.write_all(&h).and_then(|_| to.write_all(&payload)).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Cancels the migration of the VM behind `sock` and waits for `child` (its `ferry
/// migrate`) to report; returns the report and how long that took from the cancel.
fn cancel_and_finish(sock: &Path, child: Child) -> (serde_json::Value, Duration) {
    let t = Instant::now();
    let c = run_to_end(&["migrate-cancel", "--api-socket", s(sock)], T);
    assert!(c.status.success(), "cancel failed: {}", String::from_utf8_lossy(&c.stderr));
    let (out, r) = finish(child);
    let took = t.elapsed();
    assert!(!out.status.success(), "{r}");
    eprintln!("cancel to report: {took:?}");
    (r, took)
}

/// The report says the migration was cancelled within [`CANCEL_WITHIN`] and the VM runs
/// on the source, unharmed.
fn assert_cancelled(r: &serde_json::Value, took: Duration, src: &mut Vm, sock: &Path) {
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["reason_code"], "cancelled", "{r}");
    assert_eq!(r["vm_running_on"], "source", "{r}");
    assert!(took < CANCEL_WITHIN, "the cancel took {took:?}: {r}");
    still_runs(src, sock);
    assert_eq!(info(sock)["migration"]["phase"], "cancelled");
}

/// Sends SIGSTOP or SIGKILL to `vm`.
fn signal(vm: &Vm, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(vm.child.id() as i32, sig) }, 0);
}

#[test]
fn cancel_while_the_source_waits_for_restore_result() {
    require_kvm();
    let dir = TempDir::new("cancel-restore");
    let key = write_key(&dir, "key", 21);
    let (mut src, sock) = source(&dir, SMALL);
    let port = free_port();
    let dst = receiver(port, &key, None, &[]);
    let (proxy, held) = holding_proxy(port, Hold::RestoreResult);
    let child = migrate_bg(&sock, proxy, &key, &[]);
    held.recv_timeout(T).expect("the destination never answered RESTORE_OK");
    // The source waits with its vCPUs paused (default stall bound: 10 s).
    let i = wait_info(&sock, "restoring and paused", |i| i["migration"]["phase"] == "restoring");
    assert_eq!(i["state"], "paused", "{i}");
    let (r, took) = cancel_and_finish(&sock, child);
    assert_cancelled(&r, took, &mut src, &sock);
    // The destination saw the connection close, could not take the lock the source still
    // holds, and dropped its copy.
    dst.wait_stderr(T, "nothing runs here; waiting for another migration");
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("home").join("vm.lock")).expect("lock"))
            .expect("lock record");
    assert_eq!(lock["migration_id"], serde_json::Value::Null, "the lock never left the source: {lock}");
    assert_eq!(lock["pid"], src.child.id(), "the lock never left the source: {lock}");
}

#[test]
fn cancel_while_a_silent_server_never_answers() {
    require_kvm();
    let dir = TempDir::new("cancel-silent");
    let key = write_key(&dir, "key", 22);
    let (mut src, sock) = source(&dir, SMALL);
    // Accepts and never reads or answers (until the test is done with it).
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (accepted_tx, accepted) = mpsc::channel();
    let (done, done_rx) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (c, _) = l.accept().expect("accept");
        let _ = accepted_tx.send(());
        let _ = done_rx.recv_timeout(T);
        drop(c);
    });
    let child = migrate_bg(&sock, port, &key, &[]);
    // Connected: the source now waits for an answer to its Hello.
    accepted.recv_timeout(T).expect("the source never connected");
    assert_eq!(info(&sock)["migration"]["phase"], "setup");
    let (r, took) = cancel_and_finish(&sock, child);
    assert_cancelled(&r, took, &mut src, &sock);
    let _ = done.send(());
    server.join().expect("server");
}

#[test]
fn cancel_while_connecting() {
    require_kvm();
    let dir = TempDir::new("cancel-connect");
    let key = write_key(&dir, "key", 26);
    let (mut src, sock) = source(&dir, SMALL);
    // A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    // hangs (retrying) until its 5 s timeout.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    // SAFETY: listen() on a socket this test owns, with no memory passed.
    assert_eq!(unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 0) }, 0);
    let addr = l.local_addr().expect("addr");
    let fillers: Vec<TcpStream> =
        (0..4).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()).collect();
    let child = migrate_bg(&sock, port, &key, &[]);
    // Once the migration is in setup, give its connect a moment to be under way (cancelled
    // sooner, it is cancelled before connecting, which this also accepts: nothing was sent).
    wait_info(&sock, "a migration in setup", |i| i["migration"]["phase"] == "setup");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(info(&sock)["migration"]["phase"], "setup");
    let (r, took) = cancel_and_finish(&sock, child);
    assert_eq!(r["bytes_transferred"], 0, "it was still connecting: {r}");
    assert_cancelled(&r, took, &mut src, &sock);
    drop(fillers);
}

#[test]
fn cancel_while_blocked_writing_to_a_destination_that_stopped_reading() {
    require_kvm();
    let dir = TempDir::new("cancel-blocked");
    let key = write_key(&dir, "key", 23);
    let (mut src, sock) = slow_source_with(&dir, SMALL);
    let port = free_port();
    let dst = receiver(port, &key, None, &[]);
    // The destination's buffer (4 MiB at this cap and bound) and the source's fill within
    // seconds; the stall bound would end the migration only 8 s after.
    let mut args = SLOW.to_vec();
    args.extend_from_slice(&["--stall-timeout-s", "8"]);
    let child = migrate_bg(&sock, port, &key, &args);
    wait_precopy(&sock);
    signal(&dst, libc::SIGSTOP);
    // Blocked in a write: the bytes sent stop growing for longer than the cap's sleeps
    // between batches (0.5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut last, mut since) = (0u64, Instant::now());
    loop {
        let m = &info(&sock)["migration"];
        assert_eq!(m["phase"], "pre-copy", "{m}");
        let sent = m["bytes_transferred"].as_u64().expect("bytes");
        if sent != last {
            (last, since) = (sent, Instant::now());
        } else if since.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the source never blocked: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (r, took) = cancel_and_finish(&sock, child);
    signal(&dst, libc::SIGKILL);
    assert_cancelled(&r, took, &mut src, &sock);
}

#[test]
fn a_destination_stopped_in_pass_1_fails_the_migration_at_the_stall_bound() {
    require_kvm();
    let dir = TempDir::new("stall-pass");
    let key = write_key(&dir, "key", 24);
    let (mut src, sock) = slow_source_with(&dir, SMALL);
    let port = free_port();
    let dst = receiver(port, &key, None, &[]);
    let mut args = SLOW.to_vec();
    // Without compression (auto turns it on at this cap): compressed and zero-page frames
    // are tiny, and a stopped destination's kernel acknowledges thousands of them before its
    // buffer fills in memory terms, so the stall shows later (6 to 9 s seen here; see
    // docs/migration.md, "The stall bound"). This checks the bound itself.
    args.extend_from_slice(&["--stall-timeout-s", "2", "--compress", "off"]);
    let child = migrate_bg(&sock, port, &key, &args);
    wait_precopy(&sock);
    let t = Instant::now();
    signal(&dst, libc::SIGSTOP);
    let (out, r) = finish(child);
    let took = t.elapsed();
    signal(&dst, libc::SIGKILL);
    eprintln!("stop to report: {took:?}");
    assert!(!out.status.success());
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["vm_running_on"], "source", "{r}");
    let reason = r["reason"].as_str().expect("reason");
    assert!(reason.contains("made no progress for 2 s") && reason.contains("stall timeout"), "{r}");
    assert_eq!(r["reason_code"], "stalled", "{r}");
    assert!(r["passes"].as_array().expect("passes").is_empty(), "pass 1 never ended: {r}");
    // The bound counts from when the destination stops taking data. A stopped process's
    // kernel still takes what fits into its receive buffer, which the source cannot tell
    // from bytes read; for a capped migration the destination sizes that buffer to an
    // eighth of the bound's worth of the cap (1 MiB here, about 0.6 s to fill). So: at
    // least the bound, at most the bound plus that plus a little (without the bound: never,
    // within 40 s; with full-size buffers: 6.5 s). The little is generous (up to 2.4 s) for
    // a slow or busy machine: the buffer's fill time is set by the cap, not by the machine.
    assert!(took >= Duration::from_secs(2), "failed before the bound, after {took:?}: {r}");
    assert!(took < Duration::from_secs(5), "found after {took:?}: {r}\nsource log:\n{}", src.stderr());
    still_runs(&mut src, &sock);
}

#[test]
fn a_lost_commit_keeps_the_source_paused_no_longer_than_the_stall_bound() {
    require_kvm();
    let dir = TempDir::new("stall-commit");
    let key = write_key(&dir, "key", 25);
    let (mut src, sock) = source(&dir, SMALL);
    let port = free_port();
    let dst_sock = dir.path("dst.sock");
    let mut dst = receiver(port, &key, Some(&dst_sock), &[]);
    let (proxy, held) = holding_proxy(port, Hold::Commit);
    let (_out, r) = migrate(&sock, proxy, &key, &["--stall-timeout-s", "2"]);
    held.try_recv().expect("the Commit went by the proxy");
    // Paused from the stop-and-copy to the report: everything after the pre-copy passes.
    let passes = r["passes"].as_array().expect("passes");
    let precopy: f64 =
        passes.iter().filter(|p| p["stop_and_copy"] == false).map(|p| p["ms"].as_f64().expect("ms")).sum();
    let paused_ms = r["total_ms"].as_f64().expect("total") - r["setup_ms"].as_f64().expect("setup") - precopy;
    eprintln!("paused about {paused_ms:.0} ms: {r}");
    // The bound plus the stop-and-copy and the rollback, with room for a slow machine; far
    // below the 10 s default bound, which would mean `--stall-timeout-s` was not applied.
    assert!(paused_ms < 5000.0, "paused {paused_ms} ms with a 2 s stall bound: {r}");
    // Who runs the VM after a lost Commit is the lock's business: exactly one side does,
    // with its memory intact.
    match r["vm_running_on"].as_str().expect("location") {
        "source" => {
            // The source heard nothing for the bound, took the lock back and resumed.
            assert!(matches!(r["reason_code"].as_str(), Some("stalled" | "connection_lost")), "{r}");
            still_runs(&mut src, &sock);
            dst.wait_stderr(T, "nothing runs here; waiting for another migration");
        }
        "destination" => {
            assert_eq!(r["reason_code"], "completed", "{r}");
            assert!(src.wait(T).success(), "source exit: {}", src.stderr());
            let last = src.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0);
            dst.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last + 1));
            assert_eq!(info(&dst_sock)["state"], "running");
            assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
        }
        other => panic!("the VM runs {other}: {r}"),
    }
}

#[test]
fn a_stall_bound_out_of_range_is_refused_before_anything_starts() {
    require_kvm();
    let dir = TempDir::new("stall-range");
    let key = write_key(&dir, "key", 27);
    let (mut src, sock) = source(&dir, SMALL);
    for bad in ["0", "601"] {
        let out = run_to_end(
            &["migrate", "--api-socket", s(&sock), "--to", "tcp:127.0.0.1:1", "--auth-key-file", s(&key)]
                .into_iter()
                .chain(["--stall-timeout-s", bad])
                .collect::<Vec<_>>(),
            T,
        );
        common::assert_one_line_error(&out, "--stall-timeout-s");
    }
    // The API checks it too.
    let mut req = ferry_api::MigrateRequest::new("tcp:127.0.0.1:1", key.clone());
    req.stall_timeout_s = 601;
    let e = ferry_api::client::send(&sock, &ferry_api::Request::Migrate(req), T).expect_err("refused");
    let e = format!("{e:#}");
    assert!(e.contains("stall_timeout_s must be 1 to 600 seconds, not 601"), "{e}");
    still_runs(&mut src, &sock);
    assert!(info(&sock)["migration"].is_null(), "no migration may have started");
}

#[test]
fn pause_or_resume_after_the_state_was_taken_cancels_the_migration_first() {
    require_kvm();
    for request in ["resume", "pause"] {
        let dir = TempDir::new("cancel-by-api");
        let key = write_key(&dir, "key", 24);
        let (mut src, sock) = source(&dir, SMALL);
        let port = free_port();
        let _dst = receiver(port, &key, None, &[]);
        let (proxy, held) = holding_proxy(port, Hold::RestoreResult);
        let child = migrate_bg(&sock, proxy, &key, &[]);
        held.recv_timeout(T).expect("the destination never answered RESTORE_OK");
        assert_eq!(info(&sock)["state"], "paused");
        let generation_before = home_generation(&dir);
        // The request is answered once the migration has rolled back.
        let t = Instant::now();
        let out = run_to_end(&[request, "--api-socket", s(&sock)], T);
        assert!(out.status.success(), "{request}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(t.elapsed() < CANCEL_WITHIN, "{request} took {:?}", t.elapsed());
        let (_, r) = finish(child);
        assert_eq!(r["status"], "cancelled", "{request}: {r}");
        assert_eq!(r["vm_running_on"], "source", "{request}: {r}");
        // The rollback resumed the VM under a new generation; a pause then paused it.
        assert!(home_generation(&dir) > generation_before, "{request}");
        match request {
            "resume" => still_runs(&mut src, &sock),
            _ => {
                assert_eq!(info(&sock)["state"], "paused");
                let out = run_to_end(&["resume", "--api-socket", s(&sock)], T);
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                still_runs(&mut src, &sock);
            }
        }
    }
}

#[test]
fn pause_before_the_state_is_taken_is_refused() {
    require_kvm();
    let dir = TempDir::new("pause-precopy");
    let key = write_key(&dir, "key", 25);
    let (mut src, sock) = slow_source(&dir);
    let port = free_port();
    let _dst = receiver(port, &key, None, &[]);
    let child = migrate_bg(&sock, port, &key, SLOW);
    wait_precopy(&sock);
    let out = run_to_end(&["pause", "--api-socket", s(&sock)], T);
    common::assert_one_line_error(&out, "is in progress; cancel it first");
    assert_eq!(info(&sock)["migration"]["phase"], "pre-copy");
    let (r, _) = cancel_and_finish(&sock, child);
    assert_eq!(r["status"], "cancelled", "{r}");
    still_runs(&mut src, &sock);
}

/// Waits (at most [`T`]) until `ferry info` on `sock` satisfies `pred`; that report.
fn wait_info(sock: &Path, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let i = info(sock);
        if pred(&i) {
            return i;
        }
        assert!(Instant::now() < deadline, "never {what}: {i}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM's generation, from its home.
fn home_generation(dir: &TempDir) -> u64 {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path("home").join("vm.generation")).expect("generation"),
    )
    .expect("JSON");
    g["generation"].as_u64().expect("generation")
}
