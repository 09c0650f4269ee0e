//! `ferry receive` against peers that do not play by the protocol: slow, silent, many,
//! oversized, random, malformed, and a second migration while one is in progress. No such
//! peer may hold the receiver, make it allocate before authentication, or keep a real
//! migration from completing. Real `ferry` processes on real KVM, over loopback TCP.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::mig::{free_port, receiver, write_key};
use common::{
    ferry, pass_number, peak_rss, require_kvm, run_to_end, wait_timeout, write_random_file, TempDir, Vm,
};
use ferry_migration::auth::{self, Key, Role};
use ferry_migration::protocol::{self as wire, Kind};

const T: Duration = Duration::from_secs(60);
/// The receiver's deadline for a whole handshake.
const DEADLINE: Duration = Duration::from_secs(5);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A small memstress VM with an API socket; waits until it runs its passes.
fn small_source(dir: &TempDir, name: &str, extra: &[&str]) -> (Vm, PathBuf) {
    let sock = dir.path(&format!("{name}.sock"));
    let home = dir.path(&format!("{name}-home"));
    let mut args = vec!["--guest", "memstress", "--api-socket", s(&sock), "--home", s(&home)];
    args.extend_from_slice(extra);
    if !extra.contains(&"--memory") {
        args.extend_from_slice(&["--memory", "64M"]);
    }
    if !extra.contains(&"--cmdline") {
        args.extend_from_slice(&["--cmdline", "wss=4M"]);
    }
    let mut vm = Vm::spawn(common::mig::on_a(common::ferry().arg("run").args(&args)));
    vm.wait_prefix(T, "memstress: ready");
    vm.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= 2));
    (vm, sock)
}

/// A source with 24 MiB of incompressible memory and a small working set: with [`SLOW`],
/// pass 1 lasts about 7 s and the next ones converge.
fn slow_source(dir: &TempDir, name: &str) -> (Vm, PathBuf) {
    let initrd = dir.path(&format!("{name}-initrd.img"));
    write_random_file(&initrd, 24 << 20, 11);
    small_source(dir, name, &["--memory", "128M", "--initrd", s(&initrd), "--cmdline", "wss=256K"])
}
const SLOW: &[&str] = &["--bandwidth-mib", "4"];

fn migrate_args(sock: &Path, port: u16, key: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> =
        ["migrate", "--api-socket", s(sock), "--auth-key-file", s(key), "--json", "--to"]
            .iter()
            .map(|a| a.to_string())
            .collect();
    v.push(format!("tcp:127.0.0.1:{port}"));
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "migrate printed no JSON report ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn migrate(sock: &Path, port: u16, key: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let args = migrate_args(sock, port, key, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_to_end(&args, T);
    let r = report(&out);
    (out, r)
}

/// Migrates `src` to the receiver `dst` and checks the VM went on there.
fn migration_completes(
    src: &mut Vm,
    sock: &Path,
    dst: &mut Vm,
    port: u16,
    key: &Path,
    extra: &[&str],
) -> serde_json::Value {
    let (out, r) = migrate(sock, port, key, extra);
    assert!(out.status.success(), "migrate failed: {r}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["reason_code"], "completed", "{r}");
    assert_eq!(r["vm_running_on"], "destination", "{r}");
    let last = src.seen.iter().rev().find_map(|l| pass_number(l)).expect("source passes");
    assert!(src.wait(T).success(), "source exit: {}", src.stderr());
    dst.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last));
    r
}

/// A receiver that has a VM now: it ends cleanly on SIGTERM and never panicked.
fn stop(mut dst: Vm) -> String {
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success(), "{}", dst.stderr());
    let log = dst.stderr();
    assert!(!log.contains("panicked"), "{log}");
    log
}

fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).expect("connect")
}

/// A frame header announcing `len` bytes of `kind` (the payload is up to the caller).
fn header(kind: Kind, len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(wire::MAGIC);
    h.extend_from_slice(&(kind as u16).to_le_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h
}

fn hello(id: &str, nonce: &[u8]) -> wire::Hello {
    wire::Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        migration_id: id.into(),
        ferry_version: "test".into(),
        nonce: auth::hex(nonce),
        stream: 0,
        ..Default::default()
    }
}

/// Sends raw bytes to a receiver and returns what it answered before closing.
fn poke(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut c = connect(port);
    let _ = c.write_all(bytes);
    let _ = c.shutdown(Shutdown::Write);
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut v = Vec::new();
    let _ = c.read_to_end(&mut v);
    v
}

/// Authenticates to a receiver as a source that knows `key`; returns the connection.
fn authenticated(port: u16, key: &Key, id: &str) -> TcpStream {
    let mut c = connect(port);
    let nonce = auth::nonce().expect("nonce");
    wire::write_frame(&mut c, Kind::Hello, &wire::to_json(&hello(id, &nonce))).expect("hello");
    let f = wire::read_frame(&mut c).expect("challenge");
    let ch: wire::Challenge = f.json(Kind::Challenge, "Challenge").expect("challenge");
    assert!(key.check(Role::Receiver, id, &nonce, &ch.proof), "the receiver's proof");
    let theirs = auth::unhex(&ch.nonce).expect("hex");
    let resp = wire::ChallengeResponse { proof: key.prove(Role::Sender, id, &theirs) };
    wire::write_frame(&mut c, Kind::ChallengeResponse, &wire::to_json(&resp)).expect("response");
    c
}

/// Half a handshake: a Hello, the receiver's Challenge read, no answer.
fn half_handshake(port: u16, id: &str) -> TcpStream {
    let mut c = connect(port);
    let h = hello(id, &[3u8; auth::NONCE_LEN]);
    wire::write_frame(&mut c, Kind::Hello, &wire::to_json(&h)).expect("hello");
    c.set_read_timeout(Some(T)).expect("timeout");
    let f = wire::read_frame(&mut c).expect("challenge");
    assert_eq!(f.kind, Kind::Challenge);
    c
}

/// Whether the receiver has closed `c` (EOF or reset) within `wait`.
fn closed_within(c: &mut TcpStream, wait: Duration) -> bool {
    c.set_read_timeout(Some(wait)).expect("timeout");
    let mut b = [0u8; 64];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_peer_sending_a_byte_a_second_is_dropped_at_the_deadline_and_a_migration_goes_through() {
    require_kvm();
    let dir = TempDir::new("bad-slow");
    let key = write_key(&dir, "key", 0x41);
    let (mut src, sock) = slow_source(&dir, "src");
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);

    // One byte of a Hello's header a second; the receiver cuts it off at its deadline.
    let mut slow = connect(port);
    let started = Instant::now();
    let dribbler = std::thread::spawn(move || {
        let mut frame = header(Kind::Hello, 100);
        frame.extend_from_slice(&[b' '; 100]);
        for b in frame {
            if slow.write_all(&[b]).is_err() || closed_within(&mut slow, Duration::from_secs(1)) {
                return started.elapsed();
            }
        }
        panic!("the receiver read a whole frame sent a byte a second");
    });
    std::thread::sleep(Duration::from_secs(1));
    // A real migration meanwhile, long enough that the slow peer's deadline passes during it
    // (once the VM is in, the receiver stops listening and drops every pending connection).
    let migration = std::thread::spawn(move || {
        migration_completes(&mut src, &sock, &mut dst, port, &key, SLOW);
        dst
    });
    let held = dribbler.join().expect("dribbler");
    let dst = migration.join().expect("migration");
    assert!(held >= DEADLINE - Duration::from_millis(500), "dropped after {held:?}");
    assert!(held < DEADLINE + Duration::from_secs(3), "dropped after {held:?}");
    let log = stop(dst);
    assert!(log.contains("dropped before authentication: the migration connection failed: no complete handshake within 5 s"), "{log}");
}

#[test]
fn two_hundred_silent_connections_do_not_keep_a_migration_out() {
    require_kvm();
    let dir = TempDir::new("bad-silent");
    let key = write_key(&dir, "key", 0x42);
    let (mut src, sock) = small_source(&dir, "src", &[]);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    // More than any listen backlog; they stay open and say nothing.
    let silent: Vec<TcpStream> = (0..200).map(|_| connect(port)).collect();
    migration_completes(&mut src, &sock, &mut dst, port, &key, &[]);
    drop(silent);
    let log = stop(dst);
    assert!(log.contains("connections were being authenticated and the oldest goes first"), "{log}");
}

#[test]
fn more_than_sixteen_half_handshakes_drop_the_oldest_and_a_migration_goes_through() {
    require_kvm();
    let dir = TempDir::new("bad-many");
    let key = write_key(&dir, "key", 0x43);
    let (mut src, sock) = small_source(&dir, "src", &[]);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let mut half: Vec<TcpStream> = (0..20).map(|i| half_handshake(port, &format!("m-half-{i}"))).collect();
    // The four oldest went to make room; the sixteen newest are still waiting.
    for (i, c) in half.iter_mut().enumerate().take(4) {
        assert!(closed_within(c, Duration::from_secs(2)), "half-handshake {i} still open");
    }
    for (i, c) in half.iter_mut().enumerate().skip(4) {
        assert!(!closed_within(c, Duration::from_millis(50)), "half-handshake {i} was dropped");
    }
    migration_completes(&mut src, &sock, &mut dst, port, &key, &[]);
    // The rest end at their deadline.
    for (i, c) in half.iter_mut().enumerate() {
        assert!(closed_within(c, DEADLINE + Duration::from_secs(3)), "half-handshake {i} still open");
    }
    let log = stop(dst);
    assert!(log.contains("migration m-half-19: source runs Ferry test"), "{log}");
    assert!(log.contains("the oldest goes first"), "{log}");
}

#[test]
fn a_first_frame_claiming_sixty_mib_is_dropped_without_allocating() {
    require_kvm();
    let dir = TempDir::new("bad-big");
    let key_path = write_key(&dir, "key", 0x44);
    let key = Key::from_bytes(vec![0x44; 32]).expect("key");
    let port = free_port();
    let dst = receiver(port, &key_path, None, &[]);
    let pid = dst.child.id();
    // Idle, after a first handshake (so what a connection costs anyway is in).
    drop(authenticated(port, &key, "m-warm-up"));
    dst.wait_stderr(T, "migration m-warm-up: failed");
    let idle = peak_rss(pid);

    // A State header of 60 MiB and the first MiB of its payload.
    let mut c = connect(port);
    c.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = c.write_all(&header(Kind::State, 60 << 20));
    let _ = c.write_all(&vec![0x5a; 1 << 20]);
    assert!(closed_within(&mut c, Duration::from_secs(10)), "the connection stayed open");
    dst.wait_stderr(T, "the peer sent State where Hello or ChallengeResponse (a handshake) was expected");
    // The same with a handshake kind over the handshake bound.
    let answer = poke(port, &header(Kind::Hello, 1 << 20));
    assert!(String::from_utf8_lossy(&answer).contains("at most 4096 are allowed"), "{answer:?}");

    let peak = peak_rss(pid);
    assert!(peak < idle + (20 << 20), "peak RSS went from {idle} to {peak} bytes");
    eprintln!("receiver peak RSS: {} KiB idle, {} KiB after the 60 MiB claim", idle >> 10, peak >> 10);
    // Still answering properly.
    drop(authenticated(port, &key, "m-after"));
    let mut dst = dst;
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success(), "{}", dst.stderr());
}

#[test]
fn random_bytes_are_dropped_and_the_receiver_stays_sane() {
    require_kvm();
    let dir = TempDir::new("bad-random");
    let key_path = write_key(&dir, "key", 0x45);
    let key = Key::from_bytes(vec![0x45; 32]).expect("key");
    let port = free_port();
    let mut dst = receiver(port, &key_path, None, &[]);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..40 {
        let len = (next() % 8192) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Every other one starts like a frame, so that the kind and length are random too.
        if i % 2 == 1 {
            let mut h = wire::MAGIC.to_vec();
            h.extend((0..12).map(|_| next() as u8));
            bytes.splice(0..0, h);
        }
        poke(port, &bytes);
    }
    // A proper handshake still works, and the receiver still exits on a signal.
    let mut c = authenticated(port, &key, "m-after-random");
    wire::write_frame(&mut c, Kind::Config, b"{}").expect("config");
    let f = wire::read_frame(&mut c).expect("abort");
    assert_eq!(f.kind, Kind::Abort);
    dst.wait_stderr(T, "migration m-after-random: failed: the peer sent a malformed Config message");
    // SIGTERM ends the receiver at once, even with connections in their handshake.
    let mut pending: Vec<TcpStream> = (0..5).map(|_| connect(port)).collect();
    let started = Instant::now();
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success(), "{}", dst.stderr());
    assert!(started.elapsed() < DEADLINE, "the receiver took {:?} to stop", started.elapsed());
    for c in &mut pending {
        assert!(closed_within(c, Duration::from_secs(2)), "a pending connection outlived the receiver");
    }
    let log = dst.stderr();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("dropped before authentication"), "{log}");
}

#[test]
fn malformed_truncated_and_oversized_messages_leave_the_receiver_sane() {
    require_kvm();
    let dir = TempDir::new("bad-malformed");
    let key_path = write_key(&dir, "key", 0x30);
    let key = Key::from_bytes(vec![0x30; 32]).expect("key");
    let port = free_port();
    let mut dst = receiver(port, &key_path, None, &[]);

    // Not a frame at all.
    poke(port, b"GET / HTTP/1.1\r\n\r\n");
    dst.wait_stderr(T, "bad magic");
    // A Hello claiming 1 GiB: refused from the header, nothing allocated.
    let answer = poke(port, &header(Kind::Hello, 1 << 30));
    assert!(String::from_utf8_lossy(&answer).contains("at most 4096 are allowed"), "{answer:?}");
    // Truncated: a header and half a payload, then the connection closes.
    let mut t = Vec::new();
    wire::write_frame(&mut t, Kind::Hello, b"{\"protocol_version\":1}").expect("frame");
    poke(port, &t[..t.len() - 5]);
    // Valid frame, malformed JSON.
    let mut m = Vec::new();
    wire::write_frame(&mut m, Kind::Hello, b"{not json").expect("frame");
    poke(port, &m);
    dst.wait_stderr(T, "malformed Hello message");

    // After authentication: a malformed Config.
    let mut c = authenticated(port, &key, "m-test-config");
    wire::write_frame(&mut c, Kind::Config, b"{\"description\":7}").expect("config");
    let f = wire::read_frame(&mut c).expect("abort");
    assert_eq!(f.kind, Kind::Abort);
    // The Abort says why as a code, beside the sentence.
    let abort: wire::Abort = f.json(Kind::Abort, "Abort").expect("abort payload");
    assert_eq!(abort.code, wire::ReasonCode::ProtocolError, "{abort:?}");
    dst.wait_stderr(T, "migration m-test-config: failed: the peer sent a malformed Config message");

    // A real migration still goes through afterwards.
    let (mut src, sock) = small_source(&dir, "src", &[]);
    migration_completes(&mut src, &sock, &mut dst, port, &key_path, &[]);
    stop(dst);
}

#[test]
fn a_second_migration_while_one_is_in_progress_is_told_the_receiver_is_busy() {
    require_kvm();
    let dir = TempDir::new("bad-busy");
    let key = write_key(&dir, "key", 0x46);
    let (mut first, first_sock) = slow_source(&dir, "first");
    let (mut second, second_sock) = small_source(&dir, "second", &[]);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);

    let args = migrate_args(&first_sock, port, &key, SLOW);
    let child = ferry()
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn migrate");
    let log = dst.wait_stderr(T, ": checks passed; reserved");
    let id = log
        .lines()
        .find_map(|l| {
            l.split_once(": checks passed")?.0.rsplit_once("migration ").map(|(_, id)| id.to_string())
        })
        .expect("the first migration's id");

    let (out, r) = migrate(&second_sock, port, &key, &[]);
    assert!(!out.status.success());
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["vm_running_on"], "source", "{r}");
    let busy = format!("the receiver is busy with migration {id}");
    assert!(r["reason"].as_str().expect("reason").contains(&busy), "{r}");
    assert_eq!(r["reason_code"], "busy", "{r}");
    let second_id = r["migration_id"].as_str().expect("id").to_string();
    dst.wait_stderr(T, &format!("migration {second_id}: refused: {busy}"));

    // The first one goes on and completes.
    let mut child = child;
    wait_timeout(&mut child, T).expect("the first migrate did not end");
    let out = child.wait_with_output().expect("output");
    let r = report(&out);
    assert!(out.status.success(), "first migration failed: {r}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["migration_id"], id.as_str());
    assert!(first.wait(T).success(), "{}", first.stderr());
    dst.wait_line(T, |l| pass_number(l).is_some());
    // The second VM never left its host.
    let last = second.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0);
    second.wait_line(T, |l| pass_number(l).is_some_and(|n| n > last + 1));
    assert!(second.signal_and_wait(libc::SIGTERM, T).success());
    stop(dst);
}
