//! Migration limits, the controller's queue and cancel, end to end: a controller with
//! `[limits] per_host = 2` and two host daemons on loopback (one datastore directory both
//! see). Three migrations asked at once from host A to host B: two run, one waits (in
//! position 1) and runs when a slot frees; all three complete and the guests' self-checks
//! pass on B. Then, back from B: a queued migration cancelled (never started, the VM still on B) and a
//! running one cancelled (the VM keeps running on B, A keeps no VMM for it, both hosts'
//! histories and the controller's say cancelled). The queue survives a controller restart.
//! `ferry migrations --json` fields along the way. Needs root and /dev/kvm.
//!
//! The migrations must overlap whatever the machine's speed: each is capped at a few MiB/s
//! (`--bandwidth-mib`) and the guests are dirtiers writing whole pages (words=512), which
//! neither compression nor delta encoding shrinks, so each lasts seconds on any machine
//! (memstress pages are 16 bytes of stamp and 4080 zero bytes: compressed, they would cross
//! a capped link in milliseconds).

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{ferry, host_cmd, Controller};
use common::hostd::{wait_console, Hostd};
use common::{require_kvm, require_root, wait_timeout};

/// A dirtier VM of 64 MiB whose 8 MiB working set is rewritten, whole pages, 200 pages a
/// second.
fn create_dirtier(h: &Hostd, name: &str) {
    h.vm_json(&[
        "create",
        name,
        "--datastore",
        "local",
        "--memory-mib",
        "64",
        "--vcpus",
        "1",
        "--guest",
        "dirtier",
        "--cmdline",
        "wss=8M words=512 rate=200 report_ms=500",
    ]);
    h.vm_json(&["start", name]);
}

/// `ferry migrations ARGS --json --server URL` (the top-level command), which must succeed.
fn migrations(ctl: &Controller, args: &[&str]) -> serde_json::Value {
    let out = ferry()
        .arg("migrations")
        .args(args)
        .args(["--json", "--server", &ctl.url])
        .output()
        .expect("ferry migrations");
    assert!(
        out.status.success(),
        "ferry migrations {args:?}: {}\ncontroller log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctl.log()
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The rows of a `ferry migrations --json` report.
fn rows(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["migrations"].as_array().cloned().unwrap_or_default()
}

/// Waits until `pred` holds for `ferry migrations ARGS --json`; that report.
fn wait_migrations(
    ctl: &Controller,
    args: &[&str],
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = rows(&migrations(ctl, args));
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not within {timeout:?}: {r:#?}\ncontroller log:\n{}",
            ctl.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ferry cluster migrate VM --to-host HOST --json` in the background (it follows the
/// migration until it ends).
fn migrate_bg(ctl: &Controller, vm: &str, to: &str, bandwidth_mib: u32) -> Child {
    ferry()
        .args(["cluster", "migrate", vm, "--to-host", to, "--downtime-ms", "2000", "--bandwidth-mib"])
        .arg(bandwidth_mib.to_string())
        .args(["--json", "--server", &ctl.url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry cluster migrate")
}

/// The end of a background `ferry cluster migrate`: its exit success, its JSON report, its
/// progress lines.
fn finish(ctl: &Controller, mut child: Child) -> (bool, serde_json::Value, String) {
    if wait_timeout(&mut child, Duration::from_secs(180)).is_none() {
        let _ = child.kill();
        panic!("ferry cluster migrate did not end\ncontroller log:\n{}", ctl.log());
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {stderr}\ncontroller log:\n{}", ctl.log()));
    (out.status.success(), report, stderr)
}

fn event_kinds(detail: &serde_json::Value) -> Vec<String> {
    detail["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect()
}

/// The guest's self-check passes anew: a fresh progress line (the console truncated first)
/// that ends `ok` (a lost or stale page would have stopped it with CORRUPTION). `h`: host
/// A, whose datastore directory holds every VM's home (B sees it as `shared`).
fn self_check(h: &Hostd, vm: &str) {
    let console = h.home(vm).join("console.log");
    std::fs::write(&console, "").expect("truncate console");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The last line may be half written: a whole one ends ` ok`.
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(!text.contains("CORRUPTION"), "{vm}: the guest reported corruption:\n{text}");
        if text.lines().any(|l| l.starts_with("dirtier: rate=") && l.ends_with(" ok")) {
            return;
        }
        assert!(Instant::now() < deadline, "{vm}: no self-check line within 30 s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VMM processes host `h`'s daemon runs for VM `vm` (their API socket is in its state
/// directory), received ones included.
fn vmms_of(h: &Hostd, vm: &str) -> Vec<u32> {
    let state = h.ds().parent().expect("the host's directory").join("state");
    let state = state.to_string_lossy().to_string();
    let sock = format!("/{vm}.sock");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).to_string()).collect();
        let api = args.iter().position(|a| a == "--api-socket").and_then(|i| args.get(i + 1));
        if api.is_some_and(|a| a.starts_with(&state) && a.ends_with(&sock)) {
            pids.push(pid);
        }
    }
    pids
}

/// The host's migration record `id` (its `ferry host migrations`), if any.
fn host_record(h: &Hostd, id: &str) -> Option<serde_json::Value> {
    host_cmd(h, &["migrations"])["migrations"].as_array()?.iter().find(|m| m["id"] == id).cloned()
}

/// Limits, queue and cancel on the store `database` names (None: SQLite).
fn limits_queue_and_cancel(tag: &str, database: Option<&str>) {
    require_root();
    require_kvm();
    let mut ctl = Controller::with_config(tag, database, "\n[limits]\nper_host = 2\nper_cluster = 8\n");
    ctl.start();
    let mut a = Hostd::config(&format!("{tag}-a"), "");
    let mut b = Hostd::config(&format!("{tag}-b"), &format!("shared = \"{}\"\n", a.ds().display()));
    a.start();
    b.start();
    let vms = ["v1", "v2", "v3"];
    for v in vms {
        create_dirtier(&a, v);
    }
    for v in vms {
        a.wait_state(v, "running", Duration::from_secs(30));
        wait_console(&a.home(v), "dirtier: rate=", Duration::from_secs(60));
    }
    host_cmd(&a, &["join", &ctl.url]);
    host_cmd(&b, &["join", &ctl.url]);
    let (na, nb) = (format!("test-{tag}-a"), format!("test-{tag}-b"));
    ctl.wait_for(&["vms"], "the three VMs reported running", Duration::from_secs(15), |v| {
        v["vms"].as_array().is_some_and(|l| l.iter().filter(|r| r["state"] == "running").count() == 3)
    });

    // Three at once from A to B: two run, the third waits in position 1.
    let children: Vec<Child> = vms.iter().map(|v| migrate_bg(&ctl, v, &nb, 2)).collect();
    let seen = wait_migrations(&ctl, &[], "two running and one queued", Duration::from_secs(60), |r| {
        r.iter().filter(|m| m["outcome"] == "active").count() == 2
            && r.iter().filter(|m| m["outcome"] == "queued").count() == 1
    });
    let queued = seen.iter().find(|m| m["outcome"] == "queued").expect("queued").clone();
    assert_eq!(queued["state"], "queued 1", "{queued:#}");
    assert_eq!(queued["queue_position"], 1, "{queued:#}");
    assert_eq!((queued["source"].as_str(), queued["destination"].as_str()), (Some(&na[..]), Some(&nb[..])));
    assert!(queued["reason"].as_str().is_some_and(|r| r.contains("per_host")), "{queued:#}");
    for m in seen.iter().filter(|m| m["outcome"] == "active") {
        assert!(m["state"].as_str().is_some_and(|s| s.starts_with("running")), "{m:#}");
    }
    let queued_id = queued["id"].as_str().expect("id").to_string();
    assert_eq!(rows(&migrations(&ctl, &["--queued"])).len(), 1);
    // Live progress of a running one, from the source host's record (the controller
    // follows it every 0.5 s).
    let running =
        wait_migrations(&ctl, &["--active"], "progress with a percent", Duration::from_secs(60), |r| {
            r.iter()
                .any(|m| m["progress"]["percent"].is_number() && m["progress"]["memory_pages"] == 64 * 256)
        });
    let p = &running.iter().find(|m| m["progress"]["percent"].is_number()).expect("progress")["progress"];
    for field in ["pass", "pages_left", "rate_mib_s", "expected_downtime_ms", "bytes_transferred"] {
        assert!(p[field].is_number(), "{field}: {p:#}");
    }

    let mut details = Vec::new();
    for c in children {
        let (ok, detail, progress) = finish(&ctl, c);
        assert!(ok, "{detail:#}\n{progress}\ncontroller log:\n{}", ctl.log());
        assert_eq!(detail["record"]["outcome"], "completed", "{detail:#}");
        details.push((detail, progress));
    }
    // The queued one says so in its events and in its follower's lines, then started.
    let (qd, qprogress) =
        details.iter().find(|(d, _)| d["record"]["id"] == queued_id.as_str()).expect("queued one");
    let kinds = event_kinds(qd);
    assert_eq!(kinds.first().map(String::as_str), Some("queued"), "{qd:#}");
    assert!(kinds.iter().any(|k| k == "started"), "{qd:#}");
    assert_eq!(kinds.last().map(String::as_str), Some("completed"), "{qd:#}");
    assert!(qd["events"][0]["message"].as_str().is_some_and(|m| m.contains("position 1")), "{qd:#}");
    assert!(qprogress.contains("queued, position 1"), "{qprogress}");
    assert!(qprogress.contains("running: pass"), "{qprogress}");
    for (d, _) in &details {
        if d["record"]["id"] != queued_id.as_str() {
            assert!(!event_kinds(d).iter().any(|k| k == "queued"), "{d:#}");
        }
    }
    // A figure, not an assertion: from the first end the controller saw to the queued one's
    // start (the dispatcher is woken by the end; its follower polls every 0.5 s).
    let at = |d: &serde_json::Value, kind: &str| {
        d["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["kind"] == kind)
            .and_then(|e| e["at_unix_ms"].as_u64())
    };
    let first_end = details
        .iter()
        .filter(|(d, _)| d["record"]["id"] != queued_id.as_str())
        .filter_map(|(d, _)| at(d, "completed"))
        .min();
    if let (Some(end), Some(start)) = (first_end, at(qd, "started")) {
        eprintln!(
            "figure: the queued migration started {} ms after the first end was recorded",
            start.saturating_sub(end)
        );
    }
    // The inventory moved at once: each VM is shown on B (no gap until B's heartbeat).
    for v in vms {
        let shown = ctl.json(&["vm", v]);
        assert!(
            shown["vms"].as_array().is_some_and(|l| l.iter().any(|r| r["host"] == nb.as_str())),
            "{v}: {shown:#}"
        );
    }
    for v in vms {
        b.wait_state(v, "running", Duration::from_secs(30));
        self_check(&a, v);
    }
    // The history's fields, through `ferry migrations --json`.
    let done = rows(&migrations(&ctl, &["--host", &nb]));
    assert_eq!(done.len(), 3, "{done:#?}");
    for m in &done {
        assert_eq!(m["state"], "completed", "{m:#}");
        assert_eq!(m["reason_code"], "completed", "{m:#}");
        for field in ["id", "vm", "source", "destination", "started_unix_ms", "ended_unix_ms"] {
            assert!(!m[field].is_null(), "{field}: {m:#}");
        }
        for field in ["downtime_ms", "total_ms", "bytes"] {
            assert!(m[field].is_number(), "{field}: {m:#}");
        }
        assert!(m["passes"].as_array().is_some_and(|p| !p.is_empty()), "{m:#}");
    }
    // `ferry migrations show` and `ferry cluster migrations` are the same data.
    let shown = migrations(&ctl, &["show", &queued_id]);
    assert_eq!(shown["record"]["state"], "completed", "{shown:#}");
    assert_eq!(ctl.json(&["migrations", "--vm", "v1"])["migrations"].as_array().map(Vec::len), Some(1));

    // Back from B: two slow ones run, the third waits; the waiting one is cancelled.
    let c1 = migrate_bg(&ctl, "v1", &na, 1);
    let c2 = migrate_bg(&ctl, "v2", &na, 1);
    wait_migrations(&ctl, &["--active"], "v1 and v2 running", Duration::from_secs(30), |r| r.len() == 2);
    let c3 = migrate_bg(&ctl, "v3", &na, 1);
    let q = wait_migrations(&ctl, &["--queued"], "v3 queued", Duration::from_secs(30), |r| r.len() == 1);
    assert_eq!(q[0]["vm"], "v3", "{q:#?}");
    let q_id = q[0]["id"].as_str().expect("id").to_string();
    let t = Instant::now();
    let cancelled = migrations(&ctl, &["cancel", &q_id]);
    eprintln!("figure: `ferry migrations cancel` of a queued migration took {:?}", t.elapsed());
    assert_eq!(cancelled["record"]["outcome"], "cancelled", "{cancelled:#}");
    assert_eq!(cancelled["record"]["state"], "cancelled", "{cancelled:#}");
    let (ok, d3, _) = finish(&ctl, c3);
    assert!(!ok, "a cancelled migration's follower fails: {d3:#}");
    assert_eq!(d3["record"]["outcome"], "cancelled", "{d3:#}");
    assert_eq!(event_kinds(&d3), ["queued", "cancelled"], "{d3:#}");
    // Never started: no host has a record of it; v3 runs on B.
    assert!(host_record(&b, &q_id).is_none() && host_record(&a, &q_id).is_none());
    assert_eq!(b.wait_state("v3", "running", Duration::from_secs(5))["state"], "running");

    // A running one is cancelled: v1 keeps running on B, A keeps nothing of it.
    let r1 = wait_migrations(&ctl, &["--active", "--vm", "v1"], "v1 running", Duration::from_secs(30), |r| {
        r.len() == 1
    });
    let id1 = r1[0]["id"].as_str().expect("id").to_string();
    let t = Instant::now();
    let cancelled = migrations(&ctl, &["cancel", &id1]);
    eprintln!(
        "figure: `ferry migrations cancel` of a running migration took {:?} (until both hosts recorded it)",
        t.elapsed()
    );
    assert_eq!(cancelled["record"]["outcome"], "cancelled", "{cancelled:#}\ncontroller log:\n{}", ctl.log());
    assert_eq!(cancelled["record"]["reason_code"], "cancelled", "{cancelled:#}");
    let (ok, d1, _) = finish(&ctl, c1);
    assert!(!ok && d1["record"]["outcome"] == "cancelled", "{d1:#}");
    b.wait_state("v1", "running", Duration::from_secs(10));
    let src = host_record(&b, &id1).expect("B's record");
    assert_eq!(
        (src["role"].as_str(), src["outcome"].as_str()),
        (Some("source"), Some("cancelled")),
        "{src:#}"
    );
    let dst = host_record(&a, &id1).expect("A's record");
    assert_eq!(
        (dst["role"].as_str(), dst["outcome"].as_str()),
        (Some("destination"), Some("cancelled")),
        "{dst:#}"
    );
    let on_a = a.vm_json(&["list"]);
    assert!(
        !on_a["vms"].as_array().into_iter().flatten().any(|v| v["name"] == "v1"),
        "A keeps nothing of v1: {on_a:#}"
    );
    assert_eq!(vmms_of(&a, "v1"), Vec::<u32>::new(), "A's receiving VMM of v1 is gone");
    assert_eq!(vmms_of(&b, "v1").len(), 1, "v1's VMM on B");
    self_check(&a, "v1");
    // Cancelling it again answers the same; an ended one cannot be cancelled.
    assert_eq!(migrations(&ctl, &["cancel", &id1])["record"]["outcome"], "cancelled");
    let (ok, d2, _) = finish(&ctl, c2);
    assert!(ok, "{d2:#}");
    let id2 = d2["record"]["id"].as_str().expect("id").to_string();
    let out = ferry().args(["migrations", "cancel", &id2, "--server", &ctl.url]).output().expect("cancel");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already ended: completed"), "{err}");
    let out =
        ferry().args(["migrations", "watch", "m-nosuchthing", "--server", &ctl.url]).output().expect("watch");
    assert!(!out.status.success(), "an unknown id fails");
    a.wait_state("v2", "running", Duration::from_secs(30));
    self_check(&a, "v2");
    assert_eq!(rows(&migrations(&ctl, &["--cancelled"])).len(), 2);
}

#[test]
fn limits_queue_and_cancel_on_sqlite() {
    limits_queue_and_cancel("clq", None);
}

#[test]
fn limits_queue_and_cancel_on_postgres() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let Some(db) = rt.block_on(ferry_cluster::testing::TestDatabase::create()) else { return };
    limits_queue_and_cancel("clq-pg", Some(&db.url));
    drop(db);
}

/// With one migration per host, the second waits; the controller restarts meanwhile (its
/// follower detached with Ctrl-C first: the migration goes on); the queue is in the store,
/// so the second runs when the first ends.
#[test]
fn the_queue_survives_a_controller_restart() {
    require_root();
    require_kvm();
    let tag = "clq-rs";
    let mut ctl = Controller::with_config(tag, None, "\n[limits]\nper_host = 1\n");
    ctl.start();
    let mut a = Hostd::config(&format!("{tag}-a"), "");
    let mut b = Hostd::config(&format!("{tag}-b"), &format!("shared = \"{}\"\n", a.ds().display()));
    a.start();
    b.start();
    for v in ["w1", "w2"] {
        create_dirtier(&a, v);
    }
    for v in ["w1", "w2"] {
        a.wait_state(v, "running", Duration::from_secs(30));
    }
    host_cmd(&a, &["join", &ctl.url]);
    host_cmd(&b, &["join", &ctl.url]);
    let nb = format!("test-{tag}-b");
    ctl.wait_for(&["vms"], "both VMs reported running", Duration::from_secs(15), |v| {
        v["vms"].as_array().is_some_and(|l| l.iter().filter(|r| r["state"] == "running").count() == 2)
    });
    let c1 = migrate_bg(&ctl, "w1", &nb, 1);
    wait_migrations(&ctl, &["--active"], "w1 running", Duration::from_secs(30), |r| r.len() == 1);
    let c2 = migrate_bg(&ctl, "w2", &nb, 2);
    let q = wait_migrations(&ctl, &["--queued"], "w2 queued", Duration::from_secs(30), |r| r.len() == 1);
    assert_eq!((q[0]["vm"].as_str(), q[0]["queue_position"].as_u64()), (Some("w2"), Some(1)), "{q:#?}");
    let w2 = q[0]["id"].as_str().expect("id").to_string();
    // Ctrl-C on the followers: they detach, nothing is cancelled.
    for c in [c1, c2] {
        // SAFETY: a signal to a child this test started.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let mut c = c;
        assert!(wait_timeout(&mut c, Duration::from_secs(10)).is_some(), "the follower ends on SIGINT");
    }
    if let Some(mut p) = ctl.process.take() {
        // SAFETY: a signal to the controller this test started.
        unsafe { libc::kill(p.id() as i32, libc::SIGTERM) };
        assert!(wait_timeout(&mut p, Duration::from_secs(10)).is_some(), "the controller stops");
    }
    ctl.start();
    // w1 copies at least 8 MiB of whole pages at 1 MiB/s: it still runs, and w2 still waits
    // (from the store), on any machine.
    let q = rows(&migrations(&ctl, &["--queued"]));
    assert_eq!(q.len(), 1, "{q:#?}");
    assert_eq!(
        (q[0]["id"].as_str(), q[0]["queue_position"].as_u64()),
        (Some(w2.as_str()), Some(1)),
        "{q:#?}"
    );
    let done = wait_migrations(&ctl, &[], "both completed", Duration::from_secs(180), |r| {
        r.iter().filter(|m| m["outcome"] == "completed").count() == 2
    });
    let w2_row = done.iter().find(|m| m["id"] == w2.as_str()).expect("w2");
    assert_eq!(w2_row["vm"], "w2");
    let detail = migrations(&ctl, &["show", &w2]);
    let kinds = event_kinds(&detail);
    assert_eq!(kinds.first().map(String::as_str), Some("queued"), "{detail:#}");
    assert!(kinds.iter().any(|k| k == "started"), "{detail:#}");
    for v in ["w1", "w2"] {
        b.wait_state(v, "running", Duration::from_secs(30));
        self_check(&a, v);
    }
}
