//! Live migration on real KVM, between two `ferry` processes over loopback TCP: the happy
//! path there and back with memory verification, and every fault the issue names. After
//! each, the VM runs exactly once (on the side the report says) with its memory intact:
//! memstress checks every page's stamp on every pass and prints CORRUPTION otherwise.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::faultproxy::{Action, Dir, FaultProxy, Trigger, When};
use common::mig::{
    finish, free_port, info, migrate, migrate_args, migrate_bg, receiver, s, slow_source, source, still_runs,
    wait_precopy, write_key, SLOW, T,
};
use common::{pass_number, require_kvm, run_to_end, TempDir};
use ferry_migration::auth;
use ferry_migration::protocol::{self as wire, Kind};

#[test]
fn there_and_back_with_verification_and_the_guest_never_notices() {
    require_kvm();
    let dir = TempDir::new("mig-ok");
    let key = write_key(&dir, "key", 1);
    let (mut src, src_sock) = source(&dir, &[]);
    let port = free_port();
    let dst_sock = dir.path("dst.sock");
    let mut dst = receiver(port, &key, Some(&dst_sock), &[]);

    let (out, r) = migrate(&src_sock, port, &key, &["--verify"]);
    assert!(out.status.success(), "migrate failed: {r}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["reason_code"], "completed", "{r}");
    assert_eq!(r["vm_running_on"], "destination");
    assert_eq!(r["verified"], true);
    let passes = r["passes"].as_array().expect("passes");
    assert!(passes.len() >= 2, "{r}");
    assert_eq!(passes.last().expect("last")["stop_and_copy"], true);
    assert_eq!(passes[0]["pages"], 65536, "pass 1 sends every page of 256 MiB");
    assert!(r["zero_pages"].as_u64().expect("zero") > 40_000, "zero pages go as markers: {r}");
    assert!(r["downtime_ms"].as_f64().expect("downtime") > 0.0);
    for k in ["total_ms", "setup_ms", "bytes_transferred", "pages_sent", "throughput_mb_s", "migration_id"] {
        assert!(!r[k].is_null(), "report lacks {k}: {r}");
    }
    let id = r["migration_id"].as_str().expect("id").to_string();

    // The source ends (exit 0) and the guest continues on the destination.
    let last_src = src.seen.iter().rev().find_map(|l| pass_number(l)).expect("source passes");
    assert!(src.wait(T).success(), "source exit: {}", src.stderr());
    let line = dst.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last_src + 1));
    assert!(pass_number(&line).is_some());
    let src_log = src.stderr();
    assert!(src_log.contains(&format!("migration {id}: pre-copy pass 1: sent 65536 pages (")), "{src_log}");
    assert!(src_log.contains("pages dirtied meanwhile; last pass: "), "{src_log}");
    assert!(
        src_log.contains(&format!(
            "migration {id}: features agreed with the destination: [\"generation\", \"reason_codes\", \"stall_bound\", \"delta\", \"lz4\"]"
        )),
        "{src_log}"
    );
    let dst_log = dst.stderr();
    assert!(dst_log.contains(&format!("migration {id}: restored (RESTORE_OK)")), "{dst_log}");
    assert!(dst_log.contains(&format!("migration {id}: memory verified")), "{dst_log}");
    // The lock moved: the destination names itself and this migration in it.
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("home").join("vm.lock")).expect("lock file"))
            .expect("lock record");
    assert_eq!(lock["migration_id"], id.as_str(), "{lock}");
    assert_eq!(lock["pid"], dst.child.id(), "{lock}");
    assert_eq!(lock["held"], true, "{lock}");
    assert_eq!(info(&dst_sock)["home"], s(&dir.path("home")));

    // And back: the destination is a full VMM that can migrate on.
    let port2 = free_port();
    let back_sock = dir.path("back.sock");
    let mut back = receiver(port2, &key, Some(&back_sock), &[]);
    let (out, r) = migrate(&dst_sock, port2, &key, &["--verify"]);
    assert!(out.status.success(), "migrate back failed: {r}");
    assert!(dst.wait(T).success());
    let last = dst.seen.iter().rev().find_map(|l| pass_number(l)).expect("passes");
    back.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last + 1));
    assert_eq!(info(&back_sock)["state"], "running");
    assert!(back.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn cancel_during_precopy_keeps_the_vm_on_the_source() {
    require_kvm();
    let dir = TempDir::new("mig-cancel");
    let key = write_key(&dir, "key", 2);
    let (mut src, sock) = slow_source(&dir);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let child = migrate_bg(&sock, port, &key, SLOW);
    let i = wait_precopy(&sock);
    // Everything else is refused while it runs.
    let again = run_to_end(&migrate_args(&sock, &format!("tcp:127.0.0.1:{port}"), &key, &[]), T);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already migrating"), "{again:?}");
    let pause = run_to_end(&["pause", "--api-socket", s(&sock)], T);
    assert!(String::from_utf8_lossy(&pause.stderr).contains("is in progress"), "{pause:?}");

    // What progress showed before the cancel is at most what the report counts.
    let shown = info(&sock)["migration"]["bytes_transferred"].as_u64().expect("bytes so far");
    assert!(shown > 0);
    let c = run_to_end(&["migrate-cancel", "--api-socket", s(&sock)], T);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let (out, r) = finish(child);
    assert!(!out.status.success());
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["reason_code"], "cancelled", "{r}");
    assert!(
        r["bytes_transferred"].as_u64().expect("bytes") >= shown,
        "the report undercounts: {shown} shown, {r}"
    );
    assert!(r["pages_sent"].as_u64().expect("pages") > 0, "{r}");
    assert_eq!(r["vm_running_on"], "source");
    assert_eq!(r["migration_id"], i["migration"]["migration_id"]);
    still_runs(&mut src, &sock);
    assert_eq!(info(&sock)["migration"]["phase"], "cancelled");
    assert_eq!(info(&sock)["migration"]["reason_code"], "cancelled");
    // Nothing more to cancel.
    let c = run_to_end(&["migrate-cancel", "--api-socket", s(&sock)], T);
    assert!(String::from_utf8_lossy(&c.stderr).contains("no migration is in progress"));
    // The destination dropped it and waits for the next one.
    dst.wait_stderr(T, "nothing runs here; waiting for another migration");
    assert!(dst.child.try_wait().expect("wait").is_none(), "the receiver exited");
}

#[test]
fn destination_killed_during_precopy() {
    require_kvm();
    let dir = TempDir::new("mig-kill");
    let key = write_key(&dir, "key", 3);
    let (mut src, sock) = slow_source(&dir);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let child = migrate_bg(&sock, port, &key, SLOW);
    wait_precopy(&sock);
    dst.child.kill().expect("kill");
    let (out, r) = finish(child);
    assert!(!out.status.success());
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["reason_code"], "connection_lost", "{r}");
    assert_eq!(r["vm_running_on"], "source");
    still_runs(&mut src, &sock);
}

#[test]
fn connection_cut_during_stop_and_copy_resumes_the_source() {
    require_kvm();
    let dir = TempDir::new("mig-cut");
    let key = write_key(&dir, "key", 4);
    let (mut src, sock) = source(&dir, &[]);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    // Both connections cut when the sender's State frame (the stop-and-copy) goes by.
    let proxy =
        FaultProxy::start(port, Some((Trigger::first(Dir::ToDst, Kind::State, When::Before), Action::Cut)));
    let (out, r) = migrate(&sock, proxy.port, &key, &[]);
    assert!(!out.status.success());
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["reason_code"], "connection_lost", "{r}");
    assert_eq!(r["vm_running_on"], "source");
    // It got as far as the stop-and-copy pass.
    assert!(r["passes"].as_array().expect("passes").iter().any(|p| p["stop_and_copy"] == true), "{r}");
    still_runs(&mut src, &sock);
    dst.wait_stderr(T, "waiting for another migration");
    assert!(dst.child.try_wait().expect("wait").is_none());
}

#[test]
fn restore_failure_on_the_destination_rolls_back() {
    require_kvm();
    let dir = TempDir::new("mig-restore");
    let key = write_key(&dir, "key", 5);
    let (mut src, sock) = source(&dir, &[]);
    let port = free_port();
    let dst = receiver(port, &key, None, &[("FERRY_FAULT_INJECT", "restore-fail")]);
    let (out, r) = migrate(&sock, port, &key, &[]);
    assert!(!out.status.success());
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["reason"].as_str().expect("reason").contains("could not restore the VM: fault injected"),
        "{r}"
    );
    assert_eq!(r["reason_code"], "restore_failed", "{r}");
    still_runs(&mut src, &sock);
    dst.wait_stderr(T, "waiting for another migration");
    // The text report names the code beside the sentence.
    let to = format!("tcp:127.0.0.1:{port}");
    let text = run_to_end(&["migrate", "--api-socket", s(&sock), "--to", &to, "--auth-key-file", s(&key)], T);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(!text.status.success());
    assert!(stdout.contains("reason:") && stdout.contains("[restore_failed]"), "{stdout}");
    still_runs(&mut src, &sock);
    // The lock never left the source.
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("home").join("vm.lock")).expect("lock"))
            .expect("lock record");
    assert_eq!(lock["migration_id"], serde_json::Value::Null, "{lock}");
    assert_eq!(lock["pid"], src.child.id(), "{lock}");
}

#[test]
fn destination_lacking_a_cpu_feature_refuses_before_memory_moves() {
    require_kvm();
    let dir = TempDir::new("mig-cpu");
    let key = write_key(&dir, "key", 6);
    let (mut src, sock) = source(&dir, &[]);
    let port = free_port();
    let _dst = receiver(port, &key, None, &[("FERRY_FAULT_INJECT", "hide-cpu-feature=sse2")]);
    let (out, r) = migrate(&sock, port, &key, &[]);
    assert!(!out.status.success());
    let reason = r["reason"].as_str().expect("reason");
    assert!(
        reason.contains("refused the VM") && reason.contains("lacks features") && reason.contains("sse2"),
        "{r}"
    );
    assert_eq!(r["reason_code"], "refused_by_destination/cpu_features", "{r}");
    assert_eq!(r["passes"].as_array().expect("passes").len(), 0, "no memory may move: {r}");
    still_runs(&mut src, &sock);
}

#[test]
fn destination_with_fewer_xsave_components_refuses_before_memory_moves() {
    require_kvm();
    // `--cpu-hide avx512f` (else `avx`) takes that state's XCR0 components from this host's
    // offer; a guest given them (all this host's KVM offers) cannot come.
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let host = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).expect("supported CPUID");
    let d = ferry_arch::cpuid::find(&host, 0xd, 0).expect("KVM offers leaf 0xD");
    let hide = if d.eax & 0xe0 != 0 { "avx512f" } else { "avx" };
    assert_ne!(d.eax & 0xe4, 0, "this host's KVM offers no AVX state (XCR0 {:#x})", d.eax);
    let dir = TempDir::new("mig-xsave");
    let key = write_key(&dir, "key", 6);
    let (mut src, sock) = source(&dir, &[]);
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut cmd = common::ferry();
    cmd.args(["receive", "--listen", &listen, "--auth-key-file"]).arg(&key).args(["--cpu-hide", hide]);
    let dst = common::Vm::spawn(common::mig::on_b(&mut cmd));
    dst.wait_stderr(T, "waiting for an incoming migration");
    let (out, r) = migrate(&sock, port, &key, &[]);
    assert!(!out.status.success());
    assert_eq!(r["reason_code"], "refused_by_destination/xsave", "{r}");
    assert!(r["reason"].as_str().is_some_and(|m| m.contains("XSAVE components")), "{r}");
    assert_eq!(r["passes"].as_array().expect("passes").len(), 0, "no memory may move: {r}");
    still_runs(&mut src, &sock);
}

#[test]
fn wrong_key_is_rejected_and_nothing_is_restored() {
    require_kvm();
    let dir = TempDir::new("mig-key");
    let (mut src, sock) = source(&dir, &[]);
    let port = free_port();
    let dst = receiver(port, &write_key(&dir, "dst-key", 7), None, &[]);
    let (out, r) = migrate(&sock, port, &write_key(&dir, "src-key", 8), &[]);
    assert!(!out.status.success());
    assert!(r["reason"].as_str().expect("reason").contains("authentication failed"), "{r}");
    assert_eq!(r["reason_code"], "auth_failed", "{r}");
    assert!(r["bytes_transferred"].as_u64().expect("bytes") < 4096, "{r}");
    still_runs(&mut src, &sock);
    let log = dst.wait_stderr(T, "waiting for another migration");
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("checks passed"), "{log}");
}

#[test]
fn nothing_listening_and_bad_requests() {
    require_kvm();
    let dir = TempDir::new("mig-bad");
    let key = write_key(&dir, "key", 9);
    let (mut src, sock) = source(&dir, &[]);
    let port = free_port();
    let (out, r) = migrate(&sock, port, &key, &[]);
    assert!(!out.status.success());
    assert_eq!(r["status"], "failed");
    assert!(r["reason"].as_str().expect("reason").contains("cannot connect to 127.0.0.1"), "{r}");
    assert_eq!(r["reason_code"], "unreachable", "{r}");
    // Refused before anything starts, each with one line.
    for (args, needle) in [
        (vec!["--to", "127.0.0.1:7000"], "bad migration address"),
        (vec!["--to", "tcp:127.0.0.1:99999"], "bad migration address"),
    ] {
        let mut a = vec!["migrate", "--api-socket", s(&sock), "--auth-key-file", s(&key)];
        a.extend(args);
        common::assert_one_line_error(&run_to_end(&a, T), needle);
    }
    let short = dir.path("short-key");
    std::fs::write(&short, b"tiny").expect("write");
    let a = ["migrate", "--api-socket", s(&sock), "--to", "tcp:127.0.0.1:1", "--auth-key-file", s(&short)];
    common::assert_one_line_error(&run_to_end(&a, T), "a key must have 16 to 4096");
    let a = ["receive", "--listen", "nowhere", "--auth-key-file", s(&key)];
    common::assert_one_line_error(&run_to_end(&a, T), "bad migration address");
    let missing = dir.path("missing");
    let a = ["receive", "--listen", "tcp:127.0.0.1:1", "--auth-key-file", s(&missing)];
    common::assert_one_line_error(&run_to_end(&a, T), "cannot read the auth key file");
    still_runs(&mut src, &sock);
}

#[test]
fn a_page_outside_guest_memory_aborts_that_migration() {
    require_kvm();
    let dir = TempDir::new("mig-page");
    let key_path = write_key(&dir, "key", 11);
    let port = free_port();
    let dst = receiver(port, &key_path, None, &[]);
    // A real source migrates through a proxy that replaces its first page batch with one
    // page far outside the guest's memory.
    let (_src, sock) = source(&dir, &[]);
    let proxy = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let (a, _) = l.accept().expect("accept");
            let b = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
                let _ = a2.shutdown(Shutdown::Both);
            });
            forward_with_a_bad_first_batch(a, b);
        });
        p
    };
    let (out, r) = migrate(&sock, proxy, &key_path, &[]);
    assert!(!out.status.success());
    assert!(r["reason"].as_str().expect("reason").contains("a page outside guest memory"), "{r}");
    assert_eq!(r["reason_code"], "protocol_error", "{r}");
    assert_eq!(r["vm_running_on"], "source");
    dst.wait_stderr(T, "waiting for another migration");
}

#[test]
fn several_streams_carry_the_pages_and_memory_verifies() {
    require_kvm();
    let dir = TempDir::new("mig-streams");
    let key = write_key(&dir, "key", 12);
    let (mut src, sock) = slow_source(&dir);
    let port = free_port();
    let dst_sock = dir.path("dst.sock");
    let mut dst = receiver(port, &key, Some(&dst_sock), &[]);
    let (out, r) = migrate(&sock, port, &key, &["--streams", "3", "--verify"]);
    assert!(out.status.success(), "migrate failed: {r}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["streams"], 3, "{r}");
    assert_eq!(r["verified"], true);
    assert_eq!(r["passes"][0]["pages"], 65536, "pass 1 sends every page, whatever stream: {r}");
    let id = r["migration_id"].as_str().expect("id").to_string();
    let last_src = src.seen.iter().rev().find_map(|l| pass_number(l)).expect("source passes");
    assert!(src.wait(T).success(), "source exit: {}", src.stderr());
    dst.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last_src + 1));
    assert!(src.stderr().contains(&format!("migration {id}: 3 streams open")), "{}", src.stderr());
    let dst_log = dst.stderr();
    assert!(dst_log.contains(&format!("migration {id}: 3 streams open")), "{dst_log}");
    assert!(dst_log.contains("received: ") && dst_log.contains("on the first stream"), "{dst_log}");
    // The first stream alone carried less than the whole first pass.
    let first: u64 = dst_log
        .lines()
        .find(|l| l.contains(&format!("migration {id}: pass 1 received: ")))
        .and_then(|l| l.split("received: ").nth(1)?.split(' ').next()?.parse().ok())
        .expect("pass 1 line");
    assert!(first < 65536, "{dst_log}");
    assert_eq!(info(&dst_sock)["state"], "running");
    // Bad stream counts are refused before anything connects.
    let bad =
        run_to_end(&migrate_args(&dst_sock, &format!("tcp:127.0.0.1:{port}"), &key, &["--streams", "9"]), T);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--streams"), "{bad:?}");
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

/// Forwards frames from `a` to `b`, replacing the first page batch with one page far
/// outside any guest's memory; closes both when either side ends.
fn forward_with_a_bad_first_batch(mut a: TcpStream, mut b: TcpStream) {
    let mut rewritten = false;
    while let Ok(f) = wire::read_frame(&mut a) {
        let mut payload = f.payload;
        if f.kind == Kind::Pages && !rewritten {
            let page = vec![0x5a; wire::PAGE_SIZE];
            wire::encode_pages([(1u64 << 40, &page[..])].into_iter(), &mut payload).expect("encode");
            rewritten = true;
        }
        if wire::write_frame(&mut b, f.kind, &payload).is_err() {
            break;
        }
    }
    // Only this direction ends here. The destination's answer (an Abort naming the bad
    // page, then its close) still goes back through the other direction's copy, which
    // closes the source's connection once it is through: closing it here too raced with
    // that copy, and the source sometimes saw a bare close (connection_lost) first.
    let _ = b.shutdown(Shutdown::Write);
}

/// What [`stream_proxy`] does with the source's connections after the first.
#[derive(Clone, Copy)]
enum ExtraStreams {
    /// Before each, open two connections of its own that do not join: garbage, and a
    /// Hello for another migration's stream 1.
    StrayFirst,
    /// Forward this many bytes of each (source to destination), then cut it.
    CutAfter(usize),
    /// Replace the first page batch on each with one page far outside guest memory.
    BadPage,
}

/// Forwards every connection to `to`; the first as it is, the others as `mode` says.
fn stream_proxy(to: u16, mode: ExtraStreams) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for (i, a) in l.incoming().enumerate() {
            let Ok(mut a) = a else { break };
            if i > 0 {
                if let ExtraStreams::StrayFirst = mode {
                    let mut junk = TcpStream::connect(("127.0.0.1", to)).expect("connect");
                    let _ = junk.write_all(b"GET / HTTP/1.0\r\n\r\n");
                    let mut other = TcpStream::connect(("127.0.0.1", to)).expect("connect");
                    let hello = wire::Hello {
                        protocol_version: wire::PROTOCOL_VERSION,
                        migration_id: "m-someone-else".into(),
                        ferry_version: "test".into(),
                        nonce: auth::hex(&[7u8; auth::NONCE_LEN]),
                        stream: 1,
                        ..Default::default()
                    };
                    let _ = wire::write_frame(&mut other, Kind::Hello, &wire::to_json(&hello));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            let Ok(mut b) = TcpStream::connect(("127.0.0.1", to)) else { break };
            let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
                let _ = a2.shutdown(Shutdown::Both);
            });
            if let (ExtraStreams::BadPage, true) = (mode, i > 0) {
                std::thread::spawn(move || forward_with_a_bad_first_batch(a, b));
                continue;
            }
            let limit = match mode {
                ExtraStreams::CutAfter(n) if i > 0 => n,
                _ => usize::MAX,
            };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut moved = 0usize;
                while moved < limit {
                    let n = match a.read(&mut buf[..(limit - moved).min(64 << 10)]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    moved += n;
                }
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn connections_that_do_not_join_as_streams_are_dropped() {
    require_kvm();
    let dir = TempDir::new("mig-stray");
    let key = write_key(&dir, "key", 13);
    let (mut src, sock) = source(&dir, &[]);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let proxy = stream_proxy(port, ExtraStreams::StrayFirst);
    let (out, r) = migrate(&sock, proxy, &key, &["--streams", "2", "--verify"]);
    assert!(out.status.success(), "migrate failed: {r}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["streams"], 2);
    let last_src = src.seen.iter().rev().find_map(|l| pass_number(l)).expect("source passes");
    assert!(src.wait(T).success());
    dst.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last_src + 1));
    let log = dst.stderr();
    assert!(log.contains("did not join as a stream: it names migration \"m-someone-else\""), "{log}");
    assert!(log.contains("dropped before authentication: the peer sent something that is not"), "{log}");
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn a_stream_cut_in_the_middle_of_a_pass_keeps_the_vm_on_the_source() {
    require_kvm();
    let dir = TempDir::new("mig-cut-stream");
    let key = write_key(&dir, "key", 14);
    let (mut src, sock) = slow_source(&dir);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let proxy = stream_proxy(port, ExtraStreams::CutAfter(2 << 20));
    let (out, r) = migrate(&sock, proxy, &key, &["--streams", "2"]);
    assert!(!out.status.success());
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["reason_code"], "connection_lost", "{r}");
    assert_eq!(r["vm_running_on"], "source");
    still_runs(&mut src, &sock);
    dst.wait_stderr(T, "nothing runs here; waiting for another migration");
    assert!(dst.child.try_wait().expect("wait").is_none(), "the receiver exited");
    // And the receiver takes the next migration, over several streams, in full.
    let (out, r) = migrate(&sock, port, &key, &["--streams", "2", "--verify"]);
    assert!(out.status.success(), "{r}");
    assert!(src.wait(T).success());
    dst.wait_line(T, |l| pass_number(l).is_some_and(|n| n > 2));
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn a_bad_page_batch_on_an_extra_stream_aborts_the_migration_at_once() {
    require_kvm();
    let dir = TempDir::new("mig-bad-stream");
    let key = write_key(&dir, "key", 15);
    let (mut src, sock) = slow_source(&dir);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let proxy = stream_proxy(port, ExtraStreams::BadPage);
    let started = Instant::now();
    let (out, r) = migrate(&sock, proxy, &key, &["--streams", "3"]);
    let took = started.elapsed();
    assert!(!out.status.success());
    assert_eq!(r["vm_running_on"], "source", "{r}");
    assert!(r["reason"].as_str().expect("reason").contains("a page outside guest memory"), "{r}");
    assert_eq!(r["reason_code"], "protocol_error", "{r}");
    // Neither side waited for a timeout (30 s) to notice.
    assert!(took < Duration::from_secs(20), "the failure took {took:?}: {r}");
    still_runs(&mut src, &sock);
    let log = dst.wait_stderr(T, "nothing runs here; waiting for another migration");
    assert!(log.contains("a page outside guest memory; nothing runs here"), "{log}");
    assert!(dst.child.try_wait().expect("wait").is_none(), "the receiver exited");
}
