//! The arbiter's identity rule on real KVM: both sides of a migration must lock the same
//! VM. A destination told to use another home (a copy of the source's, or a directory that
//! is no VM's home) refuses the VM in its checks, before any memory moves, and the VM runs
//! on at the source. (Before the lock identity, `ferry receive --home OTHER` let the
//! destination take over under another lock file while the source resumed under its own:
//! the VM ran on both sides at once.)

mod common;

use std::path::Path;

use common::mig::{free_port, migrate, receiver, s, source, still_runs, write_key, T};
use common::{ferry, require_kvm, TempDir, Vm};

/// `ferry receive --home HOME` on `port`.
fn receiver_with_home(port: u16, key: &Path, home: &Path) -> Vm {
    let listen = format!("tcp:127.0.0.1:{port}");
    let vm = Vm::spawn(ferry().args([
        "receive",
        "--listen",
        &listen,
        "--auth-key-file",
        s(key),
        "--home",
        s(home),
    ]));
    vm.wait_stderr(T, "waiting for an incoming migration");
    vm
}

/// Copies a home, subdirectories (`logs/`, `migrations/`) included.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn a_destination_home_that_is_not_the_sources_lock_is_refused() {
    require_kvm();
    let dir = TempDir::new("nt-home");
    let key = write_key(&dir, "key", 3);
    let (mut src, sock) = source(&dir, &["--memory", "128M", "--cmdline", "wss=4M"]);
    // A copy of the home: the same VM UUID, but another lock file.
    let copy = dir.path("copy");
    copy_dir(&dir.path("home"), &copy);
    let empty = dir.path("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    for (other, why) in [(&copy, "is not the source's VM lock"), (&empty, "is not a VM home")] {
        let port = free_port();
        let mut dst = receiver_with_home(port, &key, other);
        let (out, r) = migrate(&sock, port, &key, &[]);
        assert!(!out.status.success(), "{r}");
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(r["vm_running_on"], "source", "{r}");
        let reason = r["reason"].as_str().expect("reason");
        assert!(reason.contains("the destination refused the VM") && reason.contains(why), "{r}");
        assert_eq!(r["reason_code"], "refused_by_destination/lock_identity", "{r}");
        // Refused in the checks: not a page moved.
        assert_eq!(r["pages_sent"], 0, "{r}");
        still_runs(&mut src, &sock);
        // The copy was never locked nor changed; the source's lock never moved.
        let lock: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path("home").join("vm.lock")).expect("lock"))
                .expect("lock record");
        assert_eq!(lock["pid"], src.child.id(), "{lock}");
        assert!(!other.join("runs.log").exists() || other == &copy);
        dst.signal_and_wait(libc::SIGTERM, T);
    }
    // The copy's run record is the source's, copied: nothing ran under the copy's lock.
    let copied = std::fs::read_to_string(copy.join("runs.log")).expect("copied runs.log");
    assert!(copied.lines().all(|l| l.contains(&format!("\"pid\":{}", src.child.id()))), "{copied}");

    // The source's own home is accepted: the same migration then completes.
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let (out, r) = migrate(&sock, port, &key, &[]);
    assert!(out.status.success(), "{r}");
    assert!(src.wait(T).success());
    dst.wait_prefix(T, "memstress: pass ");
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}
