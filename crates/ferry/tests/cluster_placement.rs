//! Placement through the controller, end to end: a controller and three host daemons on
//! loopback that see one shared datastore directory (`shared` on each), A giving VMs
//! 2048 MiB, B 1024 MiB, C 64 MiB (so C is "full"); A and B have port group `lan` (on `lo`,
//! which exists), C has none. A VM created by placement lands on A (the largest fraction
//! free after it); `--explain` lists every host with its score and C excluded with
//! `not_enough_memory` (and `port_group_missing` for a VM with a NIC on `lan`); a VM
//! migrated by name without a host (`ferry vm migrate NAME` through the controller) goes to
//! B and its memstress self-check passes there; two migrations placed at once do not both
//! land on B when it has room for one; bad input (a VM name that exists, a migration to an
//! unknown host, a datastore no host has) is refused clearly. The same body runs with the
//! controller on SQLite and on PostgreSQL. Needs root and /dev/kvm.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::controller::{host_cmd, host_state, Controller};
use common::hostd::{wait_console, Hostd};
use common::{require_kvm, require_root, TempDir};

/// The controller, three hosts and the shared datastore directory (removed last).
struct Three {
    ctl: Controller,
    a: Hostd,
    b: Hostd,
    c: Hostd,
    names: [String; 3],
    _shared: TempDir,
}

/// A host seeing `shared` with `vm_memory_mib` and `extra` TOML after its datastores.
fn host(tag: &str, shared: &TempDir, vm_memory_mib: u64, extra: &str) -> Hostd {
    let h = Hostd::config(tag, &format!("shared = \"{}\"\n{extra}", shared.0.display()));
    let text = std::fs::read_to_string(&h.config).expect("config");
    std::fs::write(
        &h.config,
        text.replace("[datastores]", &format!("vm_memory_mib = {vm_memory_mib}\n\n[datastores]")),
    )
    .expect("config");
    h
}

impl Three {
    /// A VM's home on the shared datastore.
    fn home(&self, vm: &str) -> std::path::PathBuf {
        self._shared.0.join(vm)
    }
}

fn three(tag: &str, database: Option<&str>) -> Three {
    let mut ctl = Controller::new(tag, database);
    ctl.start();
    let shared = TempDir::new(&format!("{tag}-shared"));
    let pg = "\n[portgroups]\nlan = \"lo\"\n";
    let mut a = host(&format!("{tag}-a"), &shared, 2048, pg);
    let mut b = host(&format!("{tag}-b"), &shared, 1024, pg);
    let mut c = host(&format!("{tag}-c"), &shared, 64, "");
    // A first: it writes the shared datastore's id, which B and C then read.
    a.start();
    b.start();
    c.start();
    for h in [&a, &b, &c] {
        host_cmd(h, &["join", &ctl.url]);
    }
    let names = [format!("test-{tag}-a"), format!("test-{tag}-b"), format!("test-{tag}-c")];
    ctl.wait_for(&["hosts"], "three hosts connected", Duration::from_secs(10), |v| {
        names.iter().all(|n| host_state(v, n) == Some("connected"))
    });
    Three { ctl, a, b, c, names, _shared: shared }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The hosts of a ranking: (host, rank, reason codes).
fn ranking(p: &serde_json::Value) -> Vec<(String, Option<u64>, Vec<String>)> {
    p["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            let codes = h["reasons"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["code"].as_str().map(str::to_string))
                .collect();
            (h["host"].as_str().unwrap_or("").to_string(), h["rank"].as_u64(), codes)
        })
        .collect()
}

fn create_args<'a>(name: &'a str, mib: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "create",
        name,
        "--datastore",
        "shared",
        "--memory-mib",
        mib,
        "--guest",
        "memstress",
        "--cmdline",
        "wss=8M",
    ];
    a.extend_from_slice(extra);
    a
}

/// Waits until the controller reports VM `name` on `host` in `state`.
fn reported(ctl: &Controller, name: &str, host: &str, state: &str) {
    ctl.wait_for(
        &["vm", name],
        &format!("{name} reported {state} on {host}"),
        Duration::from_secs(30),
        |v| v["vms"].as_array().is_some_and(|l| l.iter().any(|r| r["host"] == host && r["state"] == state)),
    );
}

fn placement(tag: &str, database: Option<&str>) {
    require_root();
    require_kvm();
    let t = three(tag, database);
    let (ctl, [na, nb, nc]) = (&t.ctl, &t.names);

    // The ranking of a create: A (1792 of 2048 MiB left) before B (768 of 1024), C full.
    let p = ctl.json(&create_args("v1", "256", &["--explain"]));
    let r = ranking(&p);
    assert_eq!(r.len(), 3, "{p}");
    assert_eq!((r[0].0.as_str(), r[0].1), (na.as_str(), Some(1)), "{p}");
    assert_eq!((r[1].0.as_str(), r[1].1), (nb.as_str(), Some(2)), "{p}");
    assert_eq!((r[2].0.as_str(), r[2].1), (nc.as_str(), None), "{p}");
    assert_eq!(r[2].2, ["not_enough_memory"], "{p}");
    let score = |i: usize, k: &str| p["hosts"][i]["score"][k].as_f64().expect("score");
    assert_eq!(score(0, "free_after_bytes"), (1792u64 << 20) as f64, "{p}");
    assert_eq!(score(1, "free_after_bytes"), (768u64 << 20) as f64, "{p}");
    assert!(score(0, "free_after_fraction") > score(1, "free_after_fraction"), "{p}");
    // The table, in words.
    let out = ctl.cli(&create_args("v1", "256", &["--explain"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains(na.as_str()) && text.contains(nb.as_str()) && text.contains("not_enough_memory"),
        "{text}"
    );
    assert!(text.contains(&format!("best: {na}")), "{text}");
    // A NIC on `lan`: C lacks the port group too.
    let p = ctl.json(&create_args("v1", "256", &["--nic", "portgroup=lan", "--explain"]));
    let r = ranking(&p);
    assert_eq!(r[2].2, ["port_group_missing", "not_enough_memory"], "{p}");

    // Bad input: a datastore no host has.
    let out =
        ctl.cli(&["create", "v9", "--datastore", "nowhere", "--memory-mib", "64", "--guest", "memstress"]);
    assert!(
        !out.status.success()
            && stderr(&out).contains("no host of this cluster has a datastore named \"nowhere\""),
        "{}",
        stderr(&out)
    );
    // A host named that cannot take it: refused with its reasons.
    let out = ctl.cli(&create_args("v9", "256", &["--host", nc]));
    assert!(!out.status.success() && stderr(&out).contains("not_enough_memory"), "{}", stderr(&out));

    // Created by placement: on A. Then through `ferry vm` (no --host): A again (a defined VM
    // holds no memory), and one on the host named.
    let v1 = ctl.json(&create_args("v1", "256", &[]));
    assert_eq!(v1["host"], na.as_str(), "{v1}");
    assert_eq!(v1["vm"]["state"], "defined", "{v1}");
    let v2 = ctl.vm_json(&create_args("v2", "448", &[]));
    assert_eq!(v2["host"], na.as_str(), "{v2}");
    let v3 = ctl.json(&create_args("v3", "448", &["--host", na]));
    assert_eq!(v3["host"], na.as_str(), "{v3}");
    for v in ["v1", "v2", "v3"] {
        reported(ctl, v, na, "defined");
    }
    // Bad input: the name exists.
    let out = ctl.cli(&create_args("v1", "64", &[]));
    assert!(
        !out.status.success() && stderr(&out).contains("a VM named \"v1\" already exists in this cluster"),
        "{}",
        stderr(&out)
    );
    // `ferry vm list` through the controller has the host column.
    let out = ctl.vm_cli(&["list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("HOST") && text.contains(na.as_str()),
        "{text}{}",
        stderr(&out)
    );

    // Started through the controller.
    for v in ["v1", "v2", "v3"] {
        let s = ctl.vm_json(&["start", v]);
        assert_eq!(s["host"], na.as_str(), "{s}");
    }
    for v in ["v1", "v2", "v3"] {
        reported(ctl, v, na, "running");
        wait_console(&t.home(v), "memstress: pass ", Duration::from_secs(60));
    }

    // Migrated by name without a host: the ranking first (A is the source, C is full).
    let p = ctl.vm_json(&["migrate", "v1", "--explain"]);
    assert_eq!(p["source"], na.as_str(), "{p}");
    let r = ranking(&p);
    assert_eq!((r[0].0.as_str(), r[0].1), (nb.as_str(), Some(1)), "{p}");
    let excluded: Vec<(&str, &[String])> = r[1..].iter().map(|h| (h.0.as_str(), h.2.as_slice())).collect();
    assert_eq!(
        excluded,
        [
            (na.as_str(), &["same_host".to_string()][..]),
            (nc.as_str(), &["not_enough_memory".to_string()][..])
        ],
        "{p}"
    );
    let done = ctl.vm_json(&["migrate", "v1"]);
    assert_eq!(done["record"]["outcome"], "completed", "{done}\ncontroller log:\n{}", ctl.log());
    assert_eq!(done["record"]["destination"], nb.as_str(), "{done}");
    t.b.wait_state("v1", "running", Duration::from_secs(30));
    std::fs::write(t.home("v1").join("console.log"), "").expect("truncate console");
    wait_console(&t.home("v1"), "memstress: pass ", Duration::from_secs(60));
    assert!(ctl.log().contains(&format!("placement of VM v1: host {nb}")), "{}", ctl.log());
    reported(ctl, "v1", nb, "running");

    // Bad input: a migration to an unknown host.
    let out = ctl.vm_cli(&["migrate", "v2", "--to-host", "nohost"]);
    assert!(!out.status.success() && stderr(&out).contains("no host named \"nohost\""), "{}", stderr(&out));

    // Two placements at once: B (768 MiB left) has room for one 448 MiB VM, C for none.
    // Whatever their order, one lands on B and the other finds no host (B's memory is held
    // by the first migration, or taken by its VM).
    let spawn = |v: &str| {
        let url = ctl.url.clone();
        let v = v.to_string();
        std::thread::spawn(move || {
            common::controller::ferry()
                .args(["vm", "migrate", &v, "--json", "--server", &url])
                .output()
                .expect("ferry vm migrate")
        })
    };
    let (o2, o3) = (spawn("v2"), spawn("v3"));
    let (o2, o3) = (o2.join().expect("v2"), o3.join().expect("v3"));
    let outcomes = [("v2", &o2), ("v3", &o3)];
    let moved: Vec<&str> = outcomes.iter().filter(|(_, o)| o.status.success()).map(|(v, _)| *v).collect();
    assert_eq!(
        moved.len(),
        1,
        "exactly one of v2, v3 moves: v2: {} {}\nv3: {} {}\ncontroller log:\n{}",
        String::from_utf8_lossy(&o2.stdout),
        stderr(&o2),
        String::from_utf8_lossy(&o3.stdout),
        stderr(&o3),
        ctl.log()
    );
    let (stayed, refused) = outcomes.iter().find(|(_, o)| !o.status.success()).expect("one refused");
    let err = stderr(refused);
    assert!(err.contains("no host can take VM") && err.contains("not_enough_memory"), "{err}");
    let record: serde_json::Value =
        serde_json::from_slice(&outcomes.iter().find(|(_, o)| o.status.success()).expect("moved").1.stdout)
            .expect("json");
    assert_eq!(record["record"]["destination"], nb.as_str(), "{record}");
    t.b.wait_state(moved[0], "running", Duration::from_secs(30));
    assert_eq!(t.a.vm_json(&["show", stayed])["state"], "running");
    // B never held both.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let on_b = t.b.vm_json(&["list"]);
        let running: u64 = on_b["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["state"] == "running")
            .filter_map(|v| v["memory_mib"].as_u64())
            .sum();
        assert!(running <= 1024, "B runs {running} MiB of VMs: {on_b}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = &t.c;
}

#[test]
fn placement_on_sqlite() {
    placement("pl-sqlite", None);
}

#[test]
fn placement_on_postgres() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let Some(db) = rt.block_on(ferry_cluster::testing::TestDatabase::create()) else { return };
    placement("pl-pg", Some(&db.url));
    drop(db);
}
