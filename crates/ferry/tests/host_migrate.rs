//! Migration by name between two hosts' daemons, end to end with real VMMs on KVM: two
//! daemons (own state directories, one datastore directory both see) migrate a memstress VM
//! A -> B and back with its self-check passing; both histories show the same ids; `--check`
//! refusals list every reason and reserve nothing; a destination receiver killed mid-way
//! leaves the VM running on the source and nothing reserved. Needs root and /dev/kvm.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::hostd::{wait_console, Hostd};
use common::{require_kvm, require_root};

const T: Duration = Duration::from_secs(20);

/// `ferry host ARGS --host URL --json` against `h` (in its namespace); the JSON answer.
fn host_json(h: &Hostd, args: &[&str]) -> serde_json::Value {
    let mut c = match &h.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_ferry")),
    };
    let out: Output = c
        .env_remove("FERRY_HOST")
        .env(ferry_pki::IDENTITY_ENV, &common::hostd::cluster().client)
        .arg("host")
        .args(args)
        .args(["--host", &h.url, "--json"])
        .output()
        .expect("ferry host");
    assert!(out.status.success(), "ferry host {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Two daemons on loopback: A with datastore `local`, B seeing A's datastore directory as
/// `shared` (the same id) and its own `local`. `extra_b` goes into B's configuration.
fn two_hosts(tag: &str, extra_a: &str, extra_b: &str) -> (Hostd, Hostd) {
    let mut a = Hostd::config(&format!("{tag}-a"), extra_a);
    let b_ds = format!("shared = \"{}\"\n{extra_b}", a.ds().display());
    let mut b = Hostd::config(&format!("{tag}-b"), &b_ds);
    a.start();
    b.start();
    (a, b)
}

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
    let list = host_json(h, &["migrations", "--id", id]);
    assert_eq!(list["migrations"].as_array().map(Vec::len), Some(1), "{list}");
    list["migrations"][0].clone()
}

#[test]
fn host_migrate_by_name_and_back() {
    require_kvm();
    require_root();
    let (a, b) = two_hosts("mig", "", "");
    a.create_memstress("m1", &[]);
    a.vm_json(&["start", "m1"]);
    let home = a.home("m1");
    memstress_passes(&home);

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
    let all = host_json(&a, &["migrations"]);
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
        assert!(host_json(&b, &["migrations"])["migrations"].as_array().expect("list").is_empty());
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
    let (a, b) = two_hosts("migfail", "", "");
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
