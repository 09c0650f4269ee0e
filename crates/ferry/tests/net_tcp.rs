//! TCP through a live migration: the bundled `netecho` guest's TCP echo (port 7, one
//! connection at a time, in guest memory) on the namespaced network of `net.rs`. A client
//! keeps one connection open and streams a known byte pattern while the VM moves from host
//! A to host B; no byte may be lost, duplicated or reordered, and no reset may arrive.
//! Also: segments to a closed port and a second connection while one is open get a RST,
//! and a connection closes both ways.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netvm::{in_netns, netecho, ping, receiver_on_b, MAC};
use common::{require_kvm, require_root, run_to_end, TempDir};
use ferry_testnet::{Net, VM_IP};

const T: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A TCP connection from the client namespace to the VM's `port`.
fn connect(net: &Net, port: u16) -> std::io::Result<TcpStream> {
    let ip: Ipv4Addr = VM_IP.parse().expect("VM_IP");
    in_netns(&net.client, move || TcpStream::connect_timeout(&SocketAddr::from((ip, port)), T))
        .join()
        .expect("connect thread")
}

/// Sends `msg` and reads exactly as many bytes back.
fn echo(c: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    c.set_read_timeout(Some(T)).expect("timeout");
    c.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).expect("read the echo");
    back
}

/// Byte `k` of the streamed data: a pattern in which no shift by a chunk's length (a lost
/// or repeated segment) lines up again.
fn pattern(k: u64) -> u8 {
    (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

#[test]
fn tcp_echo_refuses_other_ports_and_a_second_connection() {
    require_kvm();
    require_root();
    let net = Net::new("k").expect("test network");
    let dir = TempDir::new("net-tcp-rst");
    let (sock, home) = (dir.path("a.sock"), dir.path("a.home"));
    let mut vm = netecho(&net.a, &sock, &home);
    assert!(ping(&net, 2), "no ping replies from the VM");

    let mut first = connect(&net, 7).expect("connect to the echo port");
    assert_eq!(echo(&mut first, b"ferry tcp echo"), b"ferry tcp echo");
    // A closed port: the SYN gets a RST.
    let e = connect(&net, 9).expect_err("port 9 accepted a connection");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    // One connection at a time: a second one is refused with a RST, not queued.
    let e = connect(&net, 7).expect_err("a second connection was accepted");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    // The first is untouched by both.
    let big: Vec<u8> = (0..20_000u64).map(pattern).collect();
    assert!(echo(&mut first, &big) == big, "a 20 KB echo came back different");
    // Closing: our FIN, then the guest's once it has echoed everything.
    first.write_all(b"last words").expect("write");
    first.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).expect("read to the guest's FIN");
    assert_eq!(rest, b"last words");
    drop(first);
    // The guest listens again.
    let mut again = connect(&net, 7).expect("connect after the close");
    assert_eq!(echo(&mut again, b"again"), b"again");
    drop(again);
    let line = vm.wait_line(T, |l| l.contains(" tcp conns 2 "));
    let rst: u64 = line
        .split(" rst ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rst count in {line:?}"));
    assert!(rst >= 2, "the guest counted {rst} resets sent: {line}");
    let _ = vm.signal_and_wait(libc::SIGTERM, T);
}

/// The migration test's stream: chunks of `CHUNK` every `PACE` (a modest rate: about
/// 250 KB/s offered; the guest echoes by emulation), `LEAD` bytes echoed before the
/// migration starts, the stream going on for as long as it runs, then `TAIL` bytes more.
const CHUNK: u64 = 1024;
const PACE: Duration = Duration::from_millis(4);
const LEAD: u64 = 128 * 1024;
const TAIL: u64 = 128 * 1024;
/// More than the stream can reach within the test's timeouts: a bound, never reached.
const MAX_BYTES: u64 = 64 << 20;

/// The client's view of the echo stream: when each read returned and how much.
struct Received {
    reads: Vec<(Instant, usize)>,
    total: u64,
}

/// Reads the echo to its end (the guest's FIN), checking every byte against the pattern.
fn read_echo(mut c: TcpStream, got: Arc<AtomicU64>) -> Result<Received, String> {
    c.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut r = Received { reads: Vec::new(), total: 0 };
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) => return Ok(r),
            Ok(n) => n,
            Err(e) => return Err(format!("read failed after {} bytes: {e} ({:?})", r.total, e.kind())),
        };
        r.reads.push((Instant::now(), n));
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(r.total + i as u64)) {
            return Err(format!(
                "byte {} of the echo is wrong (lost, duplicated or reordered data)",
                r.total + i as u64
            ));
        }
        r.total += n as u64;
        got.store(r.total, Ordering::SeqCst);
        if r.total > MAX_BYTES {
            return Err(format!("{} bytes came back, more than could have been sent", r.total));
        }
    }
}

/// One TCP connection streams through a live migration from host A to host B (it streams
/// all along the migration and for 128 KiB after it): every byte comes back once and in
/// order, no reset arrives, the stream completes after the move and closes cleanly.
/// Prints the longest pause in the echo stream and the migration's downtime.
#[test]
fn an_open_tcp_connection_survives_the_migration() {
    require_kvm();
    require_root();
    let net = Net::new("p").expect("test network");
    let dir = TempDir::new("net-tcp-mig");
    let key = dir.path("key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    let (sock_a, home) = (dir.path("a.sock"), dir.path("home"));
    let mut a = netecho(&net.a, &sock_a, &home);
    let (mut b, listen, sock_b) = receiver_on_b(&net, &dir, &key);

    let conn = connect(&net, 7).expect("connect to the echo port");
    conn.set_nodelay(true).expect("nodelay");
    let got = Arc::new(AtomicU64::new(0));
    let migrated = Arc::new(AtomicBool::new(false));
    let reader = {
        let (c, got) = (conn.try_clone().expect("clone"), got.clone());
        std::thread::spawn(move || read_echo(c, got))
    };
    // The writer streams until the migration has completed, then TAIL bytes more; it
    // returns how many it sent.
    let writer = {
        let (mut c, migrated) = (conn.try_clone().expect("clone"), migrated.clone());
        std::thread::spawn(move || -> Result<u64, String> {
            let (mut k, mut end) = (0u64, MAX_BYTES);
            while k < end {
                if end == MAX_BYTES && migrated.load(Ordering::SeqCst) {
                    end = k + TAIL;
                }
                let chunk: Vec<u8> = (k..k + CHUNK).map(pattern).collect();
                c.write_all(&chunk).map_err(|e| format!("write failed at byte {k}: {e} ({:?})", e.kind()))?;
                k += CHUNK;
                std::thread::sleep(PACE);
            }
            c.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
            Ok(k)
        })
    };

    // Migrate once LEAD bytes have come back.
    let deadline = Instant::now() + T;
    while got.load(Ordering::SeqCst) < LEAD {
        assert!(
            Instant::now() < deadline,
            "only {} bytes echoed before the migration",
            got.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = got.load(Ordering::SeqCst);
    let started = Instant::now();
    let out = run_to_end(
        &["migrate", "--api-socket", s(&sock_a), "--to", &listen, "--auth-key-file", s(&key), "--json"],
        T,
    );
    let done = Instant::now();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(report["status"], "completed", "{report}");
    let at_switch = got.load(Ordering::SeqCst);
    migrated.store(true, Ordering::SeqCst);
    assert!(a.wait(T).success(), "{}", a.stderr());

    let sent =
        writer.join().expect("writer thread").unwrap_or_else(|e| panic!("the client could not send: {e}"));
    let rx = reader.join().expect("reader thread").unwrap_or_else(|e| panic!("echo stream: {e}"));
    assert_eq!(rx.total, sent, "bytes echoed against bytes sent");
    assert!(rx.total >= at_switch + TAIL, "the stream did not go on after the migration");
    assert_eq!(net.switch_port_of(MAC).as_deref(), Some("sw-b"), "the switch learned the VM's move");
    // Still the same VM, now on B: it counts one connection and sent no reset.
    let line = b.wait_line(T, |l| l.contains(" tcp conns "));
    assert!(line.contains(" tcp conns 1 ") && line.contains(" rst 0"), "{line}");

    // The longest pause in the echo stream, and where it fell.
    let (gap, gap_end) =
        rx.reads.windows(2).map(|w| (w[1].0 - w[0].0, w[1].0)).max_by_key(|g| g.0).expect("several reads");
    let ms = |t: Instant| {
        let (after, before) = (t.saturating_duration_since(started), started.saturating_duration_since(t));
        (after.as_secs_f64() - before.as_secs_f64()) * 1e3
    };
    let where_ms = format!(
        "from {:.0} to {:.0} ms after `ferry migrate` started; it returned at {:.0} ms",
        ms(gap_end - gap),
        ms(gap_end),
        ms(done)
    );
    eprintln!(
        "tcp echo through the migration: {sent} bytes in {} reads, {before} back before it started and \
         {at_switch} when it completed; longest pause {:.1} ms ({where_ms}); downtime {} ms; guest: {line}",
        rx.reads.len(),
        gap.as_secs_f64() * 1e3,
        report["downtime_ms"],
    );
    let info = run_to_end(&["info", "--api-socket", s(&sock_b), "--json"], T);
    assert!(info.status.success());
    let _ = b.signal_and_wait(libc::SIGTERM, T);
}
