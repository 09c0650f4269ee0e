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
