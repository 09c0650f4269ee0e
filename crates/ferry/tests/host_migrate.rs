//! Migration by name between two hosts' daemons, end to end with real VMMs on KVM: two
//! daemons (own state directories, one datastore directory both see) migrate a memstress VM
//! A -> B and back with its self-check passing; both histories show the same ids; `--check`
//! refusals list every reason and reserve nothing; a destination receiver killed mid-way
//! leaves the VM running on the source and nothing reserved. Needs root and /dev/kvm.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::hostd::{two_hosts, wait_console, Hostd};
use common::{require_kvm, require_root};

const T: Duration = Duration::from_secs(20);

/// Truncates the VM's console and waits for a fresh memstress pass (its self-check).
fn memstress_passes(home: &Path) -> String {
    std::fs::write(home.join("console.log"), "").expect("truncate console");
    wait_console(home, "memstress: pass ", T)
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Nothing of a reservation left on `h`: no receiving VMM of its state directory, no file in
/// its run directory.
fn nothing_reserved(h: &Hostd) {
    let run = h.dir.path("state").join("run");
    let receivers = processes_with("receive --listen-fd")
        .into_iter()
        .filter(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&c).contains(&*run.to_string_lossy())
        })
        .collect::<Vec<_>>();
    assert!(receivers.is_empty(), "receivers left on {}: {receivers:?}", h.url);
    let files: Vec<_> = std::fs::read_dir(&run).into_iter().flatten().flatten().map(|e| e.path()).collect();
    assert!(files.is_empty(), "files left in {}: {files:?}", run.display());
}

fn record(h: &Hostd, id: &str) -> serde_json::Value {
    let list = h.host_json(&["migrations", "--id", id]);
    assert_eq!(list["migrations"].as_array().map(Vec::len), Some(1), "{list}");
    list["migrations"][0].clone()
}

#[test]
fn host_migrate_by_name_and_back() {
    require_kvm();
    require_root();
    let (a, b) = two_hosts("mig", "");
    a.create_memstress("m1", &[]);
    a.vm_json(&["start", "m1"]);
    let home = a.home("m1");
    memstress_passes(&home);

    // The VMM says which CPU features its guest has (the checks compare them with the
    // destination's KVM).
    let sock = a.dir.path("state").join("run").join("m1.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["info", "--json", "--api-socket"])
        .arg(&sock)
        .output()
        .expect("ferry info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info json");
    let features = info["cpu_features"].as_array().map(Vec::len).unwrap_or(0);
    assert!(features > 10, "{info}");
    let c = a.vm_json(&["migrate", "m1", "--to-host", &b.url, "--check"]);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["destination_home"], home.display().to_string(), "{c}");
    nothing_reserved(&b);

    let mut ids = Vec::new();
    for (from, to) in [(&a, &b), (&b, &a)] {
        let t = Instant::now();
        let r = from.vm_json(&["migrate", "m1", "--to-host", &to.url]);
        let wall = t.elapsed();
        assert_eq!(r["outcome"], "completed", "{r}\nsource log:\n{}", from.daemon_log());
        let id = r["id"].as_str().expect("id").to_string();
        eprintln!(
            "migration {id}: {} -> {}: CLI {:.0} ms, total {} ms, VMM downtime {} ms, outside the VMM's migration {} ms",
            r["source"], r["destination"], wall.as_secs_f64() * 1e3, r["total_ms"], r["downtime_ms"], r["orchestration_ms"]
        );
        let v = to.wait_state("m1", "running", T);
        assert!(v["pid"].as_u64().is_some(), "{v}");
        // The source forgot it (its home is the destination's now).
        let e = from.vm_fails(&["show", "m1"]);
        assert!(e.contains("no VM named \"m1\""), "{e}");
        memstress_passes(&home);
        // Both histories have it, under the same id.
        let src = record(from, &id);
        let dst = record(to, &id);
        assert_eq!((src["role"].as_str(), dst["role"].as_str()), (Some("source"), Some("destination")));
        assert_eq!(src["outcome"], "completed");
        assert_eq!(dst["outcome"], "completed");
        // Every daemon log line about it carries its id.
        assert!(from.daemon_log().contains(&format!("migration {id}: completed")), "{}", from.daemon_log());
        assert!(to.daemon_log().contains(&format!("migration {id}: completed")), "{}", to.daemon_log());
        nothing_reserved(from);
        if std::env::var_os("FERRY_TEST_SHOW_LOGS").is_some() {
            eprintln!("--- source log:\n{}\n--- destination log:\n{}", from.daemon_log(), to.daemon_log());
        }
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    let all = a.host_json(&["migrations"]);
    assert_eq!(all["migrations"].as_array().map(Vec::len), Some(2), "{all}");
}

#[test]
fn host_migrate_refusals_list_every_reason_and_reserve_nothing() {
    require_kvm();
    require_root();
    // B: no port group, A's datastore not visible (only its own), too little memory for VMs.
    let (a, b) = {
        let mut a = Hostd::config("refuse-a", "\n[portgroups]\nprod = \"lo\"\n");
        let mut b = Hostd::config("refuse-b", "");
        std::fs::write(
            &b.config,
            std::fs::read_to_string(&b.config)
                .expect("config")
                .replace("[datastores]", "vm_memory_mib = 16\n\n[datastores]"),
        )
        .expect("config");
        a.start();
        b.start();
        (a, b)
    };
    // A VM with a NIC on `prod`, not started: the refusal names that too.
    a.vm_json(&[
        "create",
        "r1",
        "--datastore",
        "local",
        "--memory-mib",
        "64",
        "--guest",
        "memstress",
        "--nic",
        "portgroup=prod",
    ]);
    for check in [true, false] {
        let mut args = vec!["migrate", "r1", "--to-host", &b.url];
        if check {
            args.push("--check");
        }
        args.push("--json");
        let out = a.vm(&args);
        assert!(!out.status.success(), "refused");
        let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(c["ok"], false, "{c}");
        let codes: Vec<&str> =
            c["reasons"].as_array().expect("reasons").iter().filter_map(|r| r["code"].as_str()).collect();
        for want in ["vm_not_running", "datastore_not_visible", "port_group_missing", "not_enough_memory"] {
            assert!(codes.contains(&want), "{want} missing in {c}");
        }
        nothing_reserved(&b);
        assert!(b.host_json(&["migrations"])["migrations"].as_array().expect("list").is_empty());
    }
    // A destination that does not answer.
    let out = a.vm(&["migrate", "r1", "--to-host", "https://127.0.0.1:1", "--check", "--json"]);
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert!(c["reasons"].as_array().expect("reasons").iter().any(|r| r["code"] == "unreachable"), "{c}");
}

#[test]
fn host_migrate_receiver_killed_leaves_vm_on_source() {
    require_kvm();
    require_root();
    let (a, b) = two_hosts("migfail", "");
    a.vm_json(&[
        "create",
        "f1",
        "--datastore",
        "local",
        "--memory-mib",
        "256",
        "--guest",
        "memstress",
        "--cmdline",
        "wss=160M",
    ]);
    a.vm_json(&["start", "f1"]);
    let home = a.home("f1");
    memstress_passes(&home);
    // Kill B's receiver as soon as it exists.
    let run = b.dir.path("state").join("run").to_string_lossy().into_owned();
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            let found = processes_with("receive --listen-fd")
                .into_iter()
                .filter(|p| {
                    let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    String::from_utf8_lossy(&c).contains(&run)
                })
                .collect::<Vec<_>>();
            if let Some(p) = found.first() {
                std::thread::sleep(Duration::from_millis(30));
                // SAFETY: a signal to the test's receiving VMM.
                unsafe { libc::kill(*p, libc::SIGKILL) };
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    });
    let out = a.vm(&["migrate", "f1", "--to-host", &b.url, "--json"]);
    assert!(killer.join().expect("killer"), "no receiver appeared");
    assert!(!out.status.success(), "the migration must fail: {}", String::from_utf8_lossy(&out.stdout));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["outcome"], "failed", "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    eprintln!("migration {id} failed as it should: {} {}", r["reason_code"], r["reason"]);
    // The VM runs on A, its self-check goes on; B has nothing.
    assert_eq!(a.vm_json(&["show", "f1"])["state"], "running");
    memstress_passes(&home);
    let e = b.vm_fails(&["show", "f1"]);
    assert!(e.contains("no VM named"), "{e}");
    let deadline = Instant::now() + T;
    while record(&b, &id)["outcome"] == "active" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(record(&b, &id)["outcome"], "failed");
    assert_eq!(record(&a, &id)["outcome"], "failed");
    nothing_reserved(&b);
    let leftovers: Vec<_> = std::fs::read_dir(&home)
        .expect("home")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("console.m-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Hosts a (10.89.0.1) and b (10.89.0.2) and a client c (10.89.0.100) in network namespaces
/// joined by a switch bridge; each host's port group `prod` is its bridge br0. Removed at drop.
struct Net {
    tag: String,
}

impl Net {
    fn new() -> Self {
        let tag = format!("fym{}", std::process::id() % 100_000);
        let net = Net { tag: tag.clone() };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let sw = format!("{tag}-sw");
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "sw0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "sw0", "up"]);
        for (n, ns) in ["a", "b", "c"].iter().enumerate() {
            let name = net.ns(ns);
            let (inner, outer) = (format!("{tag}-{ns}"), format!("{tag}-{ns}-sw"));
            ip(&["netns", "add", &name]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer]);
            ip(&["link", "set", &inner, "netns", &name]);
            ip(&["link", "set", &outer, "netns", &sw]);
            ip(&["-n", &sw, "link", "set", &outer, "master", "sw0", "up"]);
            if *ns == "c" {
                ip(&["-n", &name, "link", "set", &inner, "up"]);
                ip(&["-n", &name, "addr", "add", "10.89.0.100/24", "dev", &inner]);
            } else {
                // A fixed MAC: a bridge otherwise takes its ports' lowest, which changes
                // when a VM's tap leaves it.
                let mac = format!("02:00:00:89:00:0{}", n + 1);
                ip(&["-n", &name, "link", "add", "br0", "address", &mac, "type", "bridge"]);
                ip(&["-n", &name, "link", "set", &inner, "master", "br0", "up"]);
                ip(&["-n", &name, "link", "set", "br0", "up"]);
                ip(&["-n", &name, "addr", "add", &format!("10.89.0.{}/24", n + 1), "dev", "br0"]);
            }
        }
        net
    }

    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.tag)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in ["a", "b", "c", "sw"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(ns)]).output();
        }
    }
}

/// A daemon in namespace `ns` listening on `ip`, with port group prod = br0 and `extra`.
fn host_in(net: &Net, ns: &str, ip: &str, extra: &str) -> Hostd {
    let mut h = Hostd::config(&format!("nsmig-{ns}"), &format!("{extra}\n[portgroups]\nprod = \"br0\"\n"));
    let text = std::fs::read_to_string(&h.config).expect("config");
    let port = h.url.rsplit(':').next().expect("port").to_string();
    let text = text
        .lines()
        .map(|l| if l.starts_with("listen = ") { format!("listen = \"{ip}:{port}\"") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&h.config, text + "\n").expect("config");
    h.url = format!("https://{ip}:{port}");
    h.netns = Some(net.ns(ns));
    // The host's certificate names its address (the other host dials it).
    let out = Command::new("ip")
        .args(["netns", "exec", &net.ns(ns), env!("CARGO_BIN_EXE_ferry"), "host", "init", "--config"])
        .arg(&h.config)
        .arg("--ca")
        .arg(&common::hostd::cluster().ca)
        .args(["--address", ip])
        .output()
        .expect("host init");
    assert!(out.status.success(), "host init: {}", String::from_utf8_lossy(&out.stderr));
    h.start();
    h
}

#[test]
fn host_migrate_netecho_in_namespaces_while_pinged() {
    require_kvm();
    require_root();
    let net = Net::new();
    let a = host_in(&net, "a", "10.89.0.1", "");
    let b = host_in(&net, "b", "10.89.0.2", &format!("shared = \"{}\"", a.ds().display()));
    a.vm_json(&[
        "create",
        "e1",
        "--datastore",
        "local",
        "--memory-mib",
        "64",
        "--guest",
        "netecho",
        "--cmdline",
        "ip=10.89.0.50/24",
        "--nic",
        "portgroup=prod",
    ]);
    a.vm_json(&["start", "e1"]);
    wait_console(&a.home("e1"), "netecho: ready", T);
    let ping = |count: &str, interval: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.ns("c"),
                "ping",
                "-D",
                "-c",
                count,
                "-i",
                interval,
                "-W",
                "1",
                "10.89.0.50",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ping")
    };
    assert!(ping("3", "0.2").wait().expect("ping").success(), "the VM answers ping on host a");
    let pinger = ping("400", "0.01");
    std::thread::sleep(Duration::from_millis(800));
    let r = a.vm_json(&["migrate", "e1", "--to-host", &b.url]);
    assert_eq!(r["outcome"], "completed", "{r}\n{}", a.daemon_log());
    let out = pinger.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    let times: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let outage_ms = times.windows(2).map(|w| (w[1] - w[0]) * 1e3).fold(0.0, f64::max);
    eprintln!(
        "migration {}: network outage seen by the client: {outage_ms:.1} ms ({} replies of 400, 10 ms interval); VMM downtime {} ms",
        r["id"],
        times.len(),
        r["downtime_ms"]
    );
    assert!(times.len() > 200, "{text}");
    assert!(ping("3", "0.2").wait().expect("ping").success(), "the VM answers ping on host b");
    let v = b.wait_state("e1", "running", T);
    let tap = v["taps"][0].as_str().expect("tap").to_string();
    let links = |ns: &str| {
        let out =
            Command::new("ip").args(["-n", ns, "-o", "link", "show", "master", "br0"]).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(links(&net.ns("b")).contains(&tap), "the tap is on b's bridge");
    assert!(!links(&net.ns("a")).contains(&tap), "the tap is gone from a's bridge");
    assert_eq!(record(&a, r["id"].as_str().expect("id"))["role"], "source");
    drop(a);
    drop(b);
    drop(net);
}

#[test]
fn host_migrate_destination_daemon_killed_midway() {
    require_kvm();
    require_root();
    let (a, mut b) = two_hosts("migkill", "");
    a.vm_json(&[
        "create",
        "k1",
        "--datastore",
        "local",
        "--memory-mib",
        "256",
        "--guest",
        "memstress",
        "--cmdline",
        "wss=160M",
    ]);
    a.vm_json(&["start", "k1"]);
    let home = a.home("k1");
    memstress_passes(&home);
    let b_url = b.url.clone();
    let migrate = {
        let cmd_args = ["migrate".to_string(), "k1".into(), "--to-host".into(), b_url, "--json".into()];
        let a_ref: &Hostd = &a;
        std::thread::scope(|s| {
            let t = s.spawn(move || a_ref.vm(&cmd_args.iter().map(String::as_str).collect::<Vec<_>>()));
            // SIGKILL B's daemon once it has reserved; its receiver goes on alone.
            let deadline = Instant::now() + T;
            while !b.daemon_log().contains("receiver pid") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            b.kill_daemon();
            let out = t.join().expect("migrate");
            b.start();
            out
        })
    };
    let r: serde_json::Value = serde_json::from_slice(&migrate.stdout).unwrap_or_default();
    let id = r["id"].as_str().expect("id").to_string();
    eprintln!("migration {id} with B's daemon killed: {} {}", r["outcome"], r["reason_code"]);
    // Exactly one host runs the VM, and that host's record says so, once B has settled.
    let deadline = Instant::now() + Duration::from_secs(60);
    let on = loop {
        let on_a = a.vm(&["show", "k1", "--json"]);
        let on_b = b.vm(&["show", "k1", "--json"]);
        let running = |o: &Output| {
            o.status.success()
                && serde_json::from_slice::<serde_json::Value>(&o.stdout)
                    .is_ok_and(|v| v["state"] == "running")
        };
        let b_done = record(&b, &id)["outcome"] != "active";
        match (running(&on_a), running(&on_b)) {
            (true, false) if b_done => break "a",
            (false, true) if b_done => break "b",
            (true, true) => panic!("the VM is registered running on both hosts"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "the VM settles on neither host");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("migration {id}: the VM runs on host {on}; B's record: {}", record(&b, &id)["reason"]);
    memstress_passes(&home);
    if on == "a" {
        nothing_reserved(&b);
        assert_eq!(record(&b, &id)["outcome"], "failed");
    } else {
        assert_eq!(record(&b, &id)["outcome"], "completed");
        assert!(!a.vm(&["show", "k1"]).status.success(), "A forgot the VM");
    }
}

#[test]
fn host_migrate_source_daemon_killed_midway() {
    require_kvm();
    require_root();
    // B's reservations expire after 3 s: one whose receiver runs the VM is completed then.
    let (mut a, b) = two_hosts("migskill", "reservation_ttl_s = 3");
    a.vm_json(&[
        "create",
        "k2",
        "--datastore",
        "local",
        "--memory-mib",
        "256",
        "--guest",
        "memstress",
        "--cmdline",
        "wss=160M",
    ]);
    a.vm_json(&["start", "k2"]);
    let home = a.home("k2");
    memstress_passes(&home);
    let b_url = b.url.clone();
    let a_pid = a.daemon.as_ref().expect("daemon").id() as i32;
    std::thread::scope(|s| {
        let a_ref: &Hostd = &a;
        let t = s.spawn(move || a_ref.vm(&["migrate", "k2", "--to-host", &b_url, "--json"]));
        let deadline = Instant::now() + T;
        while !a_ref.daemon_log().contains("migrates VM k2") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // SAFETY: SIGKILL to the test's daemon A; its VMM goes on migrating.
        unsafe { libc::kill(a_pid, libc::SIGKILL) };
        // The CLI loses its daemon and fails; the migration goes on in the VMMs.
        let _ = t.join();
    });
    a.kill_daemon();
    let id = a
        .daemon_log()
        .lines()
        .find_map(|l| l.split("migration ").nth(1)?.split(':').next().map(str::to_string))
        .expect("the migration's id in A's log");
    a.start();
    // B completes it at its reservation's expiry (its receiver runs the VM); A finds the
    // home held by B: the VM is elsewhere there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = b.vm(&["show", "k2", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["state"] == "running" && v["pid"].as_u64().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "k2 is not running on B: {v}\n{}", b.daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let on_a = a.wait_state("k2", "elsewhere", T);
    assert!(on_a["pid"].is_null(), "{on_a}");
    memstress_passes(&home);
    let deadline = Instant::now() + T;
    while record(&a, &id)["outcome"] == "active" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(record(&a, &id)["outcome"], "completed", "{}", a.daemon_log());
    assert_eq!(record(&b, &id)["outcome"], "completed", "{}", b.daemon_log());
    nothing_reserved(&a);
}

/// The N of the last `blkstress: records N` line of the VM's console.
fn blk_records(home: &Path) -> u64 {
    let text = std::fs::read_to_string(home.join("console.log")).unwrap_or_default();
    assert!(!text.contains("CORRUPTION"), "the guest reported corruption:\n{text}");
    text.lines().filter_map(|l| l.strip_prefix("blkstress: records ")?.trim().parse().ok()).max().unwrap_or(0)
}

#[test]
fn host_migrate_blkstress_with_its_disk_and_bad_input() {
    require_kvm();
    require_root();
    let (a, b) = two_hosts("migblk", "");
    a.vm_json(&[
        "create",
        "d1",
        "--datastore",
        "local",
        "--memory-mib",
        "64",
        "--guest",
        "blkstress",
        "--disk",
        "data.img:16M",
    ]);
    a.vm_json(&["start", "d1"]);
    let home = a.home("d1");
    wait_console(&home, "blkstress: records ", T);
    for (from, to) in [(&a, &b), (&b, &a)] {
        let before = blk_records(&home);
        let r = from.vm_json(&["migrate", "d1", "--to-host", &to.url]);
        assert_eq!(r["outcome"], "completed", "{r}");
        // Its console starts afresh on the destination: records go on from where they were,
        // each re-read and checked by the guest.
        let deadline = Instant::now() + T;
        while blk_records(&home) <= before {
            assert!(Instant::now() < deadline, "no new records after {before} on {}", to.url);
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("migration {}: blkstress at record {before}, now {}", r["id"], blk_records(&home));
    }
    // Bad input: an unknown VM, a URL that is not https, a host that does not answer.
    let e = a.vm_fails(&["migrate", "nosuch", "--to-host", &b.url]);
    assert!(e.contains("no VM named \"nosuch\""), "{e}");
    let e = a.vm_fails(&["migrate", "d1", "--to-host", "ftp://127.0.0.1:1"]);
    assert!(e.contains("not an https://HOST:PORT URL"), "{e}");
    let out = a.vm(&["migrate", "d1", "--to-host", "https://127.0.0.1:1", "--json"]);
    assert!(!out.status.success());
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(c["reasons"][0]["code"], "unreachable", "{c}");
    assert_eq!(a.vm_json(&["show", "d1"])["state"], "running");
    nothing_reserved(&b);
}
