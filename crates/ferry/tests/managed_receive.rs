//! The receiving side as a managed VMM, on real KVM with the real `ferry` binary: a
//! `ferry receive` started with `--api-socket` alone serves `GET /vm` (`receiving`, its
//! phase and progress) from its first moment, is told where to listen and the key by
//! `PUT /vm/receive`, can be cancelled through its API before the commit, takes an
//! inherited listening socket (`--listen-fd`) and a key through a pipe (`--auth-key-fd`),
//! and refuses bad input with 400 or 409. Once the VM runs, the same socket serves it.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mig::{
    finish, free_port, http, migrate_bg, s, slow_source_with, source, still_runs, wait_socket, write_key,
    SLOW, T,
};
use common::{ferry, require_kvm, TempDir, Vm};
use serde_json::{json, Value};

/// Small VMs: these tests are about the receiving side's API, not about moving memory.
const SMALL: &[&str] = &["--memory", "128M", "--cmdline", "wss=4M"];

fn get_vm(sock: &Path) -> Value {
    let (status, v) = http(sock, "GET", "/vm", None);
    assert_eq!(status, 200, "{v}");
    v
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key `write_key(dir, name, byte)` writes, in hex.
fn key_hex(byte: u8) -> String {
    hex(&[byte; 32])
}

/// `ferry receive --api-socket SOCK` and nothing else; waits until the socket answers.
fn empty_receiver(sock: &Path) -> Vm {
    let vm = Vm::spawn(common::mig::on_b(ferry().args([
        "receive",
        "--api-socket",
        s(sock),
        "--deadline-s",
        "120",
    ])));
    wait_socket(sock);
    vm
}

/// Waits until the receiver's `GET /vm` satisfies `pred`; returns that answer.
fn wait_vm(sock: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let v = get_vm(sock);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `PUT /vm/receive` on 127.0.0.1, any port, with the hex key; returns the port bound.
fn configure(sock: &Path, byte: u8) -> u16 {
    let (status, v) = http(
        sock,
        "PUT",
        "/vm/receive",
        Some(&json!({"listen": "tcp:127.0.0.1:0", "auth_key_hex": key_hex(byte)})),
    );
    assert_eq!(status, 202, "{v}");
    let listen = v["listen"].as_str().expect("listen");
    listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
}

#[test]
fn started_empty_configured_by_put_receive_then_running_on_the_same_socket() {
    require_kvm();
    let dir = TempDir::new("managed-rx");
    let key = write_key(&dir, "key", 0x5a);
    let dsock = dir.path("dst.sock");
    let mut dst = empty_receiver(&dsock);
    let v = get_vm(&dsock);
    assert_eq!(v["state"], "receiving", "{v}");
    assert_eq!(v["receiving"]["phase"], "unconfigured", "{v}");
    assert_eq!(v["memory_bytes"], 0, "nothing is known before a Config: {v}");

    let port = configure(&dsock, 0x5a);
    let v = get_vm(&dsock);
    assert_eq!(v["receiving"]["phase"], "waiting", "{v}");
    assert_eq!(v["receiving"]["listen"], format!("tcp:127.0.0.1:{port}"), "{v}");

    let (mut src, ssock) = slow_source_with(&dir, SMALL);
    // Slow (seconds of pre-copy to watch) but allowed to finish: the guest dirties 4 MiB
    // per second, which takes a second to copy at 4 MiB/s.
    let child = migrate_bg(&ssock, port, &key, &[SLOW[0], SLOW[1], "--downtime-ms", "5000"]);
    let v = wait_vm(&dsock, "receiving memory with bytes", |v| {
        v["receiving"]["phase"] == "receiving_memory" && v["receiving"]["bytes"].as_u64().unwrap_or(0) > 0
    });
    assert!(v["receiving"]["migration_id"].is_string(), "{v}");
    assert!(v["receiving"]["pages"].as_u64().unwrap_or(0) > 0, "{v}");
    // What is arriving, from its Config: the source's memory size, vCPUs and kernel.
    assert_eq!(v["memory_bytes"].as_u64(), Some(128 << 20), "{v}");
    assert_eq!((v["vcpus"].as_u64(), v["kernel"].as_str()), (Some(1), Some("guest memstress")), "{v}");
    let (_, r) = finish(child);
    assert_eq!(r["status"], "completed", "{r}");
    // The same socket, never closed, now serves the VM.
    let v = wait_vm(&dsock, "running", |v| v["state"] == "running");
    assert!(v.get("receiving").is_none(), "{v}");
    let (status, e) = http(&dsock, "PUT", "/vm/receive", Some(&json!({"listen": "tcp:127.0.0.1:0"})));
    assert_eq!(status, 409, "{e}");
    assert!(src.wait(T).success());
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn cancel_through_the_receivers_api_keeps_the_vm_on_the_source() {
    require_kvm();
    let dir = TempDir::new("managed-cancel");
    let key = write_key(&dir, "key", 0x3c);
    let dsock = dir.path("dst.sock");
    let mut dst = empty_receiver(&dsock);
    let port = configure(&dsock, 0x3c);
    let (status, e) = http(&dsock, "PUT", "/vm/migrate/cancel", None);
    assert_eq!(status, 409, "nothing to cancel yet: {e}");

    let (mut src, ssock) = slow_source_with(&dir, SMALL);
    let child = migrate_bg(&ssock, port, &key, SLOW);
    wait_vm(&dsock, "receiving memory", |v| {
        v["receiving"]["phase"] == "receiving_memory" && v["receiving"]["bytes"].as_u64().unwrap_or(0) > 0
    });
    let (status, e) = http(&dsock, "PUT", "/vm/migrate/cancel", None);
    assert_eq!(status, 204, "{e}");
    let (_, r) = finish(child);
    assert_eq!(r["status"], "failed", "{r}");
    // The receiver sends Abort (code cancelled) before closing: the source reports the
    // peer's cancel. A source blocked writing may see the close (reset) first.
    assert!(matches!(r["reason_code"].as_str(), Some("cancelled" | "connection_lost")), "{r}");
    assert_eq!(r["vm_running_on"], "source", "{r}");
    still_runs(&mut src, &ssock);
    let v = wait_vm(&dsock, "back to waiting", |v| v["receiving"]["phase"] == "waiting");
    assert_eq!(v["state"], "receiving", "{v}");
    dst.wait_stderr(T, "cancelled through the API");
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
    assert!(src.signal_and_wait(libc::SIGTERM, T).success());
}

/// Makes `fd` of the child the same open file as `fd` here (inherited across exec).
fn inherit(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    // SAFETY: the closure only calls fcntl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
}

#[test]
fn listen_fd_and_auth_key_fd_from_a_parent() {
    require_kvm();
    let dir = TempDir::new("managed-fd");
    let key = write_key(&dir, "key", 0x77);
    let dsock = dir.path("dst.sock");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (rd, mut wr) = pipe();
    wr.write_all(&[0x77; 32]).expect("write key");
    drop(wr);
    let (lfd, kfd) = (listener.as_raw_fd(), rd.as_raw_fd());
    let mut cmd = ferry();
    cmd.args(["receive", "--listen-fd", &lfd.to_string(), "--auth-key-fd", &kfd.to_string()]);
    cmd.args(["--api-socket", s(&dsock)]);
    inherit(&mut cmd, vec![lfd, kfd]);
    let mut dst = Vm::spawn(common::mig::on_b(&mut cmd));
    drop(listener);
    drop(rd);
    dst.wait_stderr(T, "waiting for an incoming migration");
    let v = get_vm(&dsock);
    assert_eq!(v["receiving"]["phase"], "waiting", "{v}");
    // The API socket is already configured: a PUT /vm/receive is refused.
    let (status, e) = http(
        &dsock,
        "PUT",
        "/vm/receive",
        Some(&json!({"listen": "tcp:127.0.0.1:0", "auth_key_hex": key_hex(0x77)})),
    );
    assert_eq!(status, 409, "{e}");

    let (mut src, ssock) = source(&dir, SMALL);
    let (_, r) = finish(migrate_bg(&ssock, port, &key, &[]));
    assert_eq!(r["status"], "completed", "{r}");
    wait_vm(&dsock, "running", |v| v["state"] == "running");
    assert!(src.wait(T).success());
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
}

#[test]
fn bad_input_is_refused() {
    require_kvm();
    let dir = TempDir::new("managed-bad");
    let dsock = dir.path("dst.sock");
    // Descriptors that are not listening TCP sockets, inherited by the receiver: a regular
    // file, a UDP socket, a TCP socket that does not listen.
    let file = std::fs::File::create(dir.path("plain")).expect("file");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let mut cmd = ferry();
    cmd.args(["receive", "--api-socket", s(&dsock), "--deadline-s", "120"]);
    inherit(&mut cmd, vec![file.as_raw_fd(), udp.as_raw_fd()]);
    let mut dst = Vm::spawn(&mut cmd);
    wait_socket(&dsock);
    let good = key_hex(1);

    // PUT /vm/migrate on a receiving VMM.
    let (status, e) = http(
        &dsock,
        "PUT",
        "/vm/migrate",
        Some(&json!({"to": "tcp:127.0.0.1:1", "auth_key_file": "/nonexistent"})),
    );
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap_or("").contains("receiving"), "{e}");
    for p in ["/vm/pause", "/vm/resume"] {
        assert_eq!(http(&dsock, "PUT", p, None).0, 409, "{p}");
    }

    // A key of the wrong length, too short and too long, and not hex.
    for k in [hex(&[1; 15]), hex(&[1; 4097]), "zz".repeat(16)] {
        let (status, e) = http(
            &dsock,
            "PUT",
            "/vm/receive",
            Some(&json!({"listen": "tcp:127.0.0.1:0", "auth_key_hex": k})),
        );
        assert_eq!(status, 400, "{e}");
    }
    // Neither or both listen sources; a bad address.
    for body in [
        json!({"auth_key_hex": good}),
        json!({"listen": "tcp:127.0.0.1:0", "listen_fd": 3, "auth_key_hex": good}),
        json!({"listen": "127.0.0.1:0", "auth_key_hex": good}),
        json!({"listen": "tcp:127.0.0.1:0"}),
    ] {
        let (status, e) = http(&dsock, "PUT", "/vm/receive", Some(&body));
        assert_eq!(status, 400, "{body}: {e}");
    }
    // Descriptors that are not listening TCP sockets, and one that does not exist.
    for fd in [file.as_raw_fd(), udp.as_raw_fd(), 999] {
        let (status, e) =
            http(&dsock, "PUT", "/vm/receive", Some(&json!({"listen_fd": fd, "auth_key_hex": good})));
        assert_eq!(status, 400, "fd {fd}: {e}");
        assert!(e["error"].as_str().unwrap_or("").contains("not a listening TCP socket"), "{e}");
    }
    assert_eq!(get_vm(&dsock)["receiving"]["phase"], "unconfigured");

    // The first good request is taken; a second one is refused.
    let port = free_port();
    let body = json!({"listen": format!("tcp:127.0.0.1:{port}"), "auth_key_hex": good});
    let (status, v) = http(&dsock, "PUT", "/vm/receive", Some(&body));
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["listen"], format!("tcp:127.0.0.1:{port}"));
    let (status, e) = http(&dsock, "PUT", "/vm/receive", Some(&body));
    assert_eq!(status, 409, "{e}");
    dst.wait_stderr(T, "waiting for an incoming migration");
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn command_line_needs_a_listen_source_or_an_api_socket() {
    let out = common::run_to_end(&["receive"], T);
    assert!(!out.status.success());
    let out = common::run_to_end(&["receive", "--listen", "tcp:127.0.0.1:0"], T);
    assert!(!out.status.success(), "a listen address without a key");
    let out = common::run_to_end(
        &["receive", "--listen", "tcp:127.0.0.1:0", "--listen-fd", "3", "--auth-key-file", "k"],
        T,
    );
    assert!(!out.status.success(), "two listen sources");
}
