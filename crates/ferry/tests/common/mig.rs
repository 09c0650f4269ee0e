//! Helpers for the migration tests (`migration.rs`, `cancel.rs`): a memstress source with an
//! API socket, a `ferry receive`, `ferry migrate` in the foreground or background, and the
//! checks that the VM still runs where it should.
//!
//! Sources run on host A and receivers on host B of the shared datastore
//! (`super::leases`): every migration these helpers make moves a sanlock lease.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use super::leases::datastore;
use super::{ferry, pass_number, run_to_end, wait_timeout, write_random_file, TempDir, Vm};

pub const T: Duration = Duration::from_secs(60);

/// A TCP port on 127.0.0.1 for a server a test starts next (a `ferry receive`, a host daemon,
/// a controller: they bind it themselves, so the port is free only between now and then).
/// Three things keep that window safe when several tests and test binaries run side by side:
/// - it is below the kernel's ephemeral range (`ip_local_port_range`), so no outgoing
///   connection and no `bind(..:0)` (ours or another process's) is given it meanwhile;
/// - it is claimed, for the life of this test process, by an abstract unix socket named after
///   it (`@ferry-test-port-N`, gone when the process ends, nothing on disk), so no other test
///   of this process and no other test process that uses this function picks it too;
/// - a probe binds it, so nothing listens on it now.
pub fn free_port() -> u16 {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static CLAIMS: std::sync::Mutex<Vec<UnixListener>> = std::sync::Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // Ports 20000 up to the ephemeral range's start (32768 by default).
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    let (low, high) = (20000u32, ephemeral.clamp(21000, 65536));
    let span = high - low;
    // Each process starts somewhere else in the span, so processes rarely even try the same.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = std::process::id().wrapping_mul(7919).wrapping_add(nanos);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (low + start.wrapping_add(n) % span) as u16;
        let Ok(name) = SocketAddr::from_abstract_name(format!("ferry-test-port-{port}")) else { continue };
        let Ok(claim) = UnixListener::bind_addr(&name) else { continue };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            CLAIMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(claim);
            return port;
        }
    }
    panic!("no free TCP port from {low} to {high} on 127.0.0.1");
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

pub fn write_key(dir: &TempDir, name: &str, byte: u8) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, [byte; 32]).expect("key");
    p
}

/// A memstress VM with an API socket; waits until it runs its passes.
pub fn source(dir: &TempDir, extra: &[&str]) -> (Vm, PathBuf) {
    let sock = dir.path("src.sock");
    let home = dir.path("home");
    let mut args = vec!["--guest", "memstress", "--api-socket", s(&sock), "--home", s(&home)];
    args.extend_from_slice(extra);
    if !extra.contains(&"--memory") {
        args.extend_from_slice(&["--memory", "256M"]);
    }
    if !extra.contains(&"--cmdline") {
        args.extend_from_slice(&["--cmdline", "wss=8M"]);
    }
    let mut vm = Vm::spawn(on_a(ferry().arg("run").args(&args)));
    vm.wait_prefix(T, "memstress: ready");
    vm.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= 2));
    (vm, sock)
}

/// `cmd` (a `ferry run|restore|receive`) on host A of the shared datastore, with `--lease`.
pub fn on_a(cmd: &mut std::process::Command) -> &mut std::process::Command {
    datastore().a.leased(cmd)
}

/// `cmd` (a `ferry run|restore|receive`) on host B of the shared datastore, with `--lease`.
pub fn on_b(cmd: &mut std::process::Command) -> &mut std::process::Command {
    datastore().b.leased(cmd)
}

/// `ferry receive` on host B with its console on stdout; waits until it listens.
pub fn receiver(port: u16, key: &Path, sock: Option<&Path>, env: &[(&str, &str)]) -> Vm {
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut cmd = ferry();
    cmd.args(["receive", "--listen", &listen, "--auth-key-file", s(key)]);
    if let Some(sock) = sock {
        cmd.args(["--api-socket", s(sock)]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let vm = Vm::spawn(on_b(&mut cmd));
    vm.wait_stderr(T, "waiting for an incoming migration");
    vm
}

pub fn migrate_args<'a>(sock: &'a Path, port_arg: &'a str, key: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v =
        vec!["migrate", "--api-socket", s(sock), "--to", port_arg, "--auth-key-file", s(key), "--json"];
    v.extend_from_slice(extra);
    v
}

pub fn migrate(sock: &Path, port: u16, key: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let to = format!("tcp:127.0.0.1:{port}");
    let out = run_to_end(&migrate_args(sock, &to, key, extra), T);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "migrate printed no JSON report ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

/// Starts `ferry migrate` in the background.
pub fn migrate_bg(sock: &Path, port: u16, key: &Path, extra: &[&str]) -> Child {
    let to = format!("tcp:127.0.0.1:{port}");
    ferry()
        .args(migrate_args(sock, &to, key, extra))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn migrate")
}

pub fn finish(mut child: Child) -> (Output, serde_json::Value) {
    wait_timeout(&mut child, T).expect("migrate did not end");
    let out = child.wait_with_output().expect("output");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no JSON report ({e}): {}", String::from_utf8_lossy(&out.stderr));
    });
    (out, report)
}

pub fn info(sock: &Path) -> serde_json::Value {
    let out = run_to_end(&["info", "--api-socket", s(sock), "--json"], T);
    assert!(out.status.success(), "info failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("info JSON")
}

/// Waits until the source's migration is in pre-copy and has sent something.
pub fn wait_precopy(sock: &Path) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let i = info(sock);
        let m = &i["migration"];
        if m["phase"] == "pre-copy" && m["bytes_transferred"].as_u64().unwrap_or(0) > 0 {
            return i;
        }
        assert!(Instant::now() < deadline, "migration never reached pre-copy: {i}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VM still runs here: new passes after `after`, no corruption, state running.
pub fn still_runs(vm: &mut Vm, sock: &Path) {
    let last = vm.seen.iter().rev().find_map(|l| pass_number(l)).unwrap_or(0);
    vm.wait_line(T, |l| pass_number(l).is_some_and(|n| n >= last + 2));
    assert_eq!(info(sock)["state"], "running");
}

/// A source big enough, and a cap low enough, that pre-copy lasts several seconds.
pub fn slow_source(dir: &TempDir) -> (Vm, PathBuf) {
    slow_source_with(dir, &[])
}

/// [`slow_source`] with more `ferry run` arguments.
pub fn slow_source_with(dir: &TempDir, extra: &[&str]) -> (Vm, PathBuf) {
    let initrd = dir.path("initrd.img");
    write_random_file(&initrd, 32 << 20, 7);
    let mut args = vec!["--initrd", s(&initrd)];
    args.extend_from_slice(extra);
    source(dir, &args)
}
pub const SLOW: &[&str] = &["--bandwidth-mib", "4"];

/// One HTTP/1.1 request on a VMM's API socket; the status and the body as JSON (Null if
/// none).
pub fn http(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut stream = UnixStream::connect(sock).expect("connect to the API socket");
    stream.set_read_timeout(Some(T)).expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read answer");
    let text = String::from_utf8(raw).expect("utf8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    let json = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).expect("JSON body")
    };
    (status, json)
}

/// Waits until something answers on the API socket `sock`.
pub fn wait_socket(sock: &Path) {
    let deadline = Instant::now() + T;
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "{} never answered", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
