//! The host daemon (`ferry host serve`) end to end, with real VMM processes on KVM: a VM's
//! lifecycle through `ferry vm`, the daemon killed and restarted while a VM runs, a VMM
//! killed behind the daemon's back, and a NIC's tap on a port group's bridge (in a network
//! namespace). Needs root and /dev/kvm.

mod common;

use std::time::Duration;

use common::hostd::{alive, wait_console, Hostd};
use common::{require_kvm, require_root};

const T: Duration = Duration::from_secs(20);

#[test]
fn host_vm_lifecycle() {
    require_kvm();
    let mut h = Hostd::config("life", "");
    h.start();
    let created = h.create_memstress("m1", &["--disk", "data.img:1M"]);
    assert_eq!(created["state"], "defined");
    let home = h.home("m1");
    assert!(home.join("vm.toml").is_file() && home.join("data.img").is_file());

    let started = h.vm_json(&["start", "m1"]);
    assert_eq!(started["state"], "running", "{started}");
    let pid = started["pid"].as_u64().expect("pid");
    assert!(alive(pid));
    assert!(
        started["lock_holder"].as_str().expect("lock holder").contains(&format!("pid {pid}")),
        "{started}"
    );
    // The VMM's API socket is private to root.
    let sock = started["api_socket"].as_str().expect("socket");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(sock).expect("socket").permissions());
    assert_eq!(mode & 0o077, 0, "API socket mode {mode:o}");
    let run = std::path::Path::new(sock).parent().expect("run dir");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(run).expect("run dir").permissions());
    assert_eq!(mode & 0o777, 0o700, "run directory mode {mode:o}");
    wait_console(&home, "memstress: pass ", T);

    let list = h.vm_json(&["list"]);
    assert_eq!(list["vms"][0]["name"], "m1");
    assert_eq!(list["vms"][0]["state"], "running");

    let host = h.host_info();
    assert_eq!(host["name"], "test-life");
    assert_eq!(host["memory"]["reserved_bytes"], 64 << 20);
    let ds_id = std::fs::read_to_string(h.ds().join(".ferry-datastore")).expect("datastore id");
    assert_eq!(host["datastores"][0]["id"], ds_id.trim());
    assert!(host["cpu"]["kvm"]["entries"].as_u64().expect("cpuid entries") > 0, "{host}");
    assert_eq!(host["vms"][0]["state"], "running");

    let log = h.vm_json(&["log", "m1", "--lines", "200"]);
    assert!(log["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .any(|l| l.as_str().is_some_and(|l| l.contains("memstress"))));

    // A second start is refused while it runs.
    let e = h.vm_fails(&["start", "m1"]);
    assert!(e.contains("VM m1 is running"), "{e}");

    // Paused behind the daemon's back (ferry pause on the socket): shown paused; resumed
    // through the daemon.
    let out = common::ferry().args(["pause", "--api-socket", sock]).output().expect("pause");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.vm_json(&["show", "m1"])["state"], "paused");
    assert_eq!(h.vm_json(&["resume", "m1"])["state"], "running");

    // Snapshot, suspend, resume.
    h.vm_json(&["snapshot", "m1"]);
    assert_eq!(std::fs::read_dir(home.join("snapshots")).expect("snapshots").count(), 1);
    let s = h.vm_json(&["suspend", "m1"]);
    assert_eq!(s["state"], "suspended", "{s}");
    assert!(!alive(pid));
    let r = h.vm_json(&["resume", "m1"]);
    assert_eq!(r["state"], "running", "{r}");
    let pid2 = r["pid"].as_u64().expect("pid");
    std::fs::write(home.join("console.log"), "").expect("truncate console");
    wait_console(&home, "memstress: pass ", T);

    let stopped = h.vm_json(&["stop", "m1"]);
    assert_eq!(stopped["state"], "defined", "{stopped}");
    assert_eq!(stopped["last_exit"]["requested"], true);
    assert_eq!(stopped["last_exit"]["code"], 0);
    assert!(!alive(pid2));
    assert!(!std::path::Path::new(sock).exists(), "the socket is removed");
    let e = h.vm_fails(&["stop", "m1"]);
    assert!(e.contains("no VMM runs it"), "{e}");
    // A running VM cannot be unregistered.
    h.vm_json(&["start", "m1"]);
    let e = h.vm_fails(&["unregister", "m1"]);
    assert!(e.contains("VM m1 is running: stop it before unregistering it"), "{e}");
}

#[test]
fn host_daemon_restart_readopts_running_vm() {
    require_kvm();
    let mut h = Hostd::config("readopt", "");
    h.start();
    h.create_memstress("m2", &[]);
    let pid = h.vm_json(&["start", "m2"])["pid"].as_u64().expect("pid");
    h.kill_daemon();
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid), "the VMM outlives the daemon");
    h.start();
    let v = h.vm_json(&["show", "m2"]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid));
    assert!(h.daemon_log().contains("re-adopted"), "{}", h.daemon_log());
    // The re-adopted VMM is supervised: a stop through the new daemon ends it.
    let stopped = h.vm_json(&["stop", "m2"]);
    assert_eq!(stopped["state"], "defined", "{stopped}");
    assert!(!alive(pid));

    // A VM that ended while the daemon was down is reconciled from its home at start-up.
    let pid = h.vm_json(&["start", "m2"])["pid"].as_u64().expect("pid");
    h.kill_daemon();
    // SAFETY: a signal to the VMM this test's daemon started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // Gone, every thread of it, before the daemon starts again. A killed VMM takes a while
    // to end on a busy machine; its main thread shows as a zombie while its vCPU threads
    // still exit and keep its files, the home's lock among them, open: a daemon starting
    // then sees the lock held and says `elsewhere`, rightly.
    let deadline = std::time::Instant::now() + T;
    while !all_threads_ended(pid) {
        assert!(std::time::Instant::now() < deadline, "the killed VMM {pid} is still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    h.start();
    let v = h.vm_json(&["show", "m2"]);
    assert_eq!(v["state"], "crashed", "{v}");
    assert!(v["last_exit"]["description"].as_str().expect("exit").contains("daemon was not running"), "{v}");
}

/// Whether every thread of process `pid` has ended (gone, or a zombie: past closing its
/// files).
fn all_threads_ended(pid: u64) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return true };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |s| {
            s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    })
}

#[test]
fn host_vmm_killed_is_crashed_with_its_signal() {
    require_kvm();
    let mut h = Hostd::config("crash", "");
    h.start();
    h.create_memstress("m3", &[]);
    let pid = h.vm_json(&["start", "m3"])["pid"].as_u64().expect("pid");
    wait_console(&h.home("m3"), "memstress: pass ", T);
    // SAFETY: a signal to the VMM this test's daemon started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let v = h.wait_state("m3", "crashed", T);
    assert_eq!(v["last_exit"]["signal"], 9, "{v}");
    assert_eq!(v["last_exit"]["requested"], false, "{v}");
    assert!(v["last_exit"]["description"].as_str().expect("description").contains("SIGKILL"));
    assert!(!v["last_log"].as_array().expect("last log").is_empty(), "{v}");
    assert!(v.get("pid").is_none(), "{v}");
    let events = v["events"].as_array().expect("events");
    assert!(events.iter().any(|e| e["kind"] == "crashed"), "{v}");
    // Nothing restarts it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(h.vm_json(&["show", "m3"])["state"], "crashed");
    let text = String::from_utf8_lossy(&h.vm(&["show", "m3"]).stdout).into_owned();
    assert!(text.contains("state:      crashed") && text.contains("signal 9 (SIGKILL)"), "{text}");
    // It can be started again by hand.
    assert_eq!(h.vm_json(&["start", "m3"])["state"], "running");
}

/// A network namespace with a bridge, removed at drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("fyh-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &name, "link", "set", "br0", "up"]);
        ip(&["-n", &name, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        ns
    }

    fn links_on_bridge(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.0, "-o", "link", "show", "master", "br0"])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn host_nic_tap_on_port_group_bridge() {
    require_kvm();
    require_root();
    let ns = Netns::new("nic");
    let mut h = Hostd::config("nic", "\n[portgroups]\nprod = \"br0\"\n");
    h.netns = Some(ns.0.clone());
    h.start();
    let v = h.create_memstress("n1", &["--nic", "portgroup=prod"]);
    let mac = v["definition"]["nics"][0]["mac"].as_str().expect("mac").to_string();
    assert!(mac.starts_with("52:54:00:"), "{v}");
    // The same MAC on another VM is refused, and nothing is created for it.
    let e = h.vm_fails(&[
        "create",
        "n2",
        "--datastore",
        "local",
        "--memory-mib",
        "64",
        "--guest",
        "memstress",
        "--nic",
        &format!("portgroup=prod,mac={mac}"),
    ]);
    assert!(e.contains(&format!("MAC {mac} is already used by VM \"n1\"")), "{e}");
    assert!(!h.home("n2").exists());

    let v = h.vm_json(&["start", "n1"]);
    assert_eq!(v["state"], "running", "{v}");
    let tap = v["taps"][0].as_str().expect("tap").to_string();
    assert!(tap.len() <= 15);
    assert!(ns.links_on_bridge().contains(&tap), "{}", ns.links_on_bridge());
    let host: serde_json::Value = {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                env!("CARGO_BIN_EXE_ferry"),
                "host",
                "info",
                "--json",
                "--host",
                &h.url,
            ])
            .env(ferry_pki::IDENTITY_ENV, &common::hostd::cluster().client)
            .output()
            .expect("host info");
        serde_json::from_slice(&out.stdout).expect("json")
    };
    assert_eq!(host["portgroups"][0]["name"], "prod");
    assert_eq!(host["portgroups"][0]["present"], true);
    h.vm_json(&["stop", "n1"]);
    assert!(!ns.links_on_bridge().contains(&tap), "the tap is deleted when the VM stops");

    // A crash deletes the tap too.
    let pid = h.vm_json(&["start", "n1"])["pid"].as_u64().expect("pid");
    assert!(ns.links_on_bridge().contains(&tap));
    // SAFETY: a signal to the VMM this test's daemon started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    h.wait_state("n1", "crashed", T);
    assert!(!ns.links_on_bridge().contains(&tap), "the tap is deleted when the VMM crashes");

    // A netecho guest on the port group answers ping from the bridge's side.
    let v = h.vm_json(&[
        "create",
        "e1",
        "--datastore",
        "local",
        "--memory-mib",
        "64",
        "--guest",
        "netecho",
        "--cmdline",
        "ip=10.77.0.2/24",
        "--nic",
        "portgroup=prod",
    ]);
    assert_eq!(v["state"], "defined");
    h.vm_json(&["start", "e1"]);
    wait_console(&h.home("e1"), "netecho: ready", T);
    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.0, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"])
        .output()
        .expect("ping");
    assert!(ping.status.success(), "ping: {}", String::from_utf8_lossy(&ping.stdout));
    drop(h);
}

#[test]
fn host_home_held_elsewhere_is_not_started() {
    require_kvm();
    let mut h = Hostd::config("held", "");
    h.start();
    h.create_memstress("m4", &[]);
    let home = h.home("m4");
    // Another VMM (not this daemon's) runs the VM's home.
    let mut other = common::Vm::start(&[
        "--guest",
        "memstress",
        "--memory",
        "64M",
        "--cmdline",
        "wss=8M",
        "--serial",
        "null",
        "--home",
        home.to_str().expect("path"),
    ]);
    other.wait_stderr(T, "vCPUs running");
    let e = h.vm_fails(&["start", "m4"]);
    assert!(e.contains("VM m4 runs elsewhere: its home is held by the holder of its lock (pid"), "{e}");
    assert_eq!(h.vm_json(&["show", "m4"])["state"], "elsewhere");
    // A restarted daemon finds it held too.
    h.stop_daemon();
    h.start();
    assert_eq!(h.vm_json(&["show", "m4"])["state"], "elsewhere");
    // Once the other VMM is gone, this host can run it.
    other.signal_and_wait(libc::SIGTERM, T);
    assert_eq!(h.vm_json(&["start", "m4"])["state"], "running");
}

#[test]
fn host_two_daemons_report_the_same_datastore_id() {
    let mut a = Hostd::config("ds-a", "");
    a.start();
    // B sees A's datastore directory (as two hosts see one NFS export) under another name.
    let mut b = Hostd::config("ds-b", &format!("shared = \"{}\"\n", a.ds().display()));
    b.start();
    let (ia, ib) = (a.host_info(), b.host_info());
    let id_of = |v: &serde_json::Value, name: &str| -> String {
        v["datastores"]
            .as_array()
            .expect("datastores")
            .iter()
            .find(|d| d["name"] == name)
            .and_then(|d| d["id"].as_str())
            .expect("datastore")
            .to_string()
    };
    assert_eq!(id_of(&ia, "local"), id_of(&ib, "shared"));
    assert_ne!(id_of(&ia, "local"), id_of(&ib, "local"));
}

/// A datastore with a sanlock lockspace (a private sanlock daemon, see
/// `ferry_lease::testing`): the daemon starts the VM with `--lease`, `show` names the lease's
/// owner, and a stop gives it up. About 6 s (joining the lockspace takes 2 x io_timeout + 1 s).
#[test]
fn host_leased_datastore_runs_vm_under_its_lease() {
    require_kvm();
    require_root();
    let scratch = common::TempDir::new("host-lease");
    let ds = scratch.path("ds");
    std::fs::create_dir_all(&ds).expect("datastore");
    let ids = ds.join("ids");
    ferry_lease::testing::zero_file(&ids, 1 << 20).expect("lockspace file");
    let out = std::process::Command::new("sanlock")
        .args([
            "direct",
            "init",
            "-s",
            &format!("FERRYHOST:0:{}:0", ids.display()),
            "-Z",
            "512",
            "-A",
            "1M",
            "-o",
            "2",
        ])
        .output()
        .expect("sanlock direct init (is the sanlock package installed?)");
    assert!(out.status.success(), "sanlock direct init: {}", String::from_utf8_lossy(&out.stderr));
    let sanlock = ferry_lease::testing::Daemon::start(&scratch.0, &format!("hl-{}", std::process::id()), &[])
        .expect("start a sanlock daemon");
    let mut h = Hostd::config(
        "lease",
        &format!(
            "shared = {{ path = \"{}\", lockspace = \"FERRYHOST\", host_id = 1, ids = \"{}\", io_timeout = 2 }}\n",
            ds.display(),
            ids.display()
        ),
    );
    h.env.push((ferry_lease::testing::RUN_DIR_ENV.into(), sanlock.run_dir().display().to_string()));
    h.start();
    h.vm_json(&[
        "create",
        "l1",
        "--datastore",
        "shared",
        "--memory-mib",
        "64",
        "--guest",
        "memstress",
        "--cmdline",
        "wss=8M",
    ]);
    let v = h.vm_json(&["start", "l1"]);
    assert_eq!(v["state"], "running", "{v}");
    let log = std::fs::read_to_string(ds.join("l1").join("vm.log")).expect("vm.log");
    assert!(log.contains("--lease") && log.contains("FERRYHOST:1:"), "{log}");
    let holder = v["lock_holder"].as_str().unwrap_or_default().to_string();
    assert!(holder.contains("lease held by host id 1"), "{v}");
    let stopped = h.vm_json(&["stop", "l1"]);
    assert_eq!(stopped["state"], "defined", "{stopped}");
    drop(h);
    drop(sanlock);
}
