//! The bundled `netecho` guest on the namespaced test network of `ferry_testnet` (a
//! switch, hosts A and B each with a tap `vm0` on a bridge, a client): shared by `net.rs`
//! and `net_tcp.rs`. VMs started here hold a lease on the shared datastore
//! (`super::leases`), as every migration test's VMs do.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_testnet::{Net, HOST_B_IP, TAP, VM_IP};

use super::mig::{on_a, on_b, s};
use super::{TempDir, Vm};

const T: Duration = Duration::from_secs(60);
/// The NIC's MAC in every netecho test.
pub const MAC: &str = "52:54:00:77:00:02";

/// `ferry run` of netecho inside namespace `net_ns`, on its tap; waits until it is ready.
pub fn netecho(net_ns: &str, sock: &Path, home: &Path) -> Vm {
    let mut cmd = Net::exec(net_ns, env!("CARGO_BIN_EXE_ferry"));
    cmd.env("FERRY_STATE_DIR", super::state_dir());
    let net = format!("tap={TAP},mac={MAC}");
    let cmdline = format!("ip={VM_IP}/24");
    cmd.args(["run", "--guest", "netecho", "--memory", "64M", "--cmdline", &cmdline, "--net", &net]);
    cmd.args(["--api-socket", s(sock), "--home", s(home)]);
    let mut vm = Vm::spawn(on_a(&mut cmd));
    vm.wait_prefix(T, "netecho: ready");
    vm
}

/// `ping` from the client namespace; true if all `count` came back.
pub fn ping(net: &Net, count: u32) -> bool {
    Net::exec(&net.client, "ping")
        .args(["-c", &count.to_string(), "-i", "0.2", "-W", "2", VM_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace fd we own.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The destination: `ferry receive` in host B's namespace (its own tap `vm0`), listening
/// on B's address, with an API socket in `dir`. Returns the VMM, the `--to` address for
/// `ferry migrate`, and the API socket.
pub fn receiver_on_b(net: &Net, dir: &TempDir, key: &Path) -> (Vm, String, PathBuf) {
    let port = super::mig::free_port();
    let listen = format!("tcp:{HOST_B_IP}:{port}");
    let sock = dir.path("b.sock");
    let mut cmd = Net::exec(&net.b, env!("CARGO_BIN_EXE_ferry"));
    cmd.env("FERRY_STATE_DIR", super::state_dir());
    cmd.args(["receive", "--listen", &listen, "--auth-key-file", s(key), "--api-socket", s(&sock)]);
    let vm = Vm::spawn(on_b(&mut cmd));
    vm.wait_stderr(T, "waiting for an incoming migration");
    (vm, listen, sock)
}
