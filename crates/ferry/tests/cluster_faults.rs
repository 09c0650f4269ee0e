//! The controller under faults, end to end (docs/cluster.md "Faults"). Needs root (the host
//! daemons) and /dev/kvm.
//!
//! - `a_migration_whose_hosts_go_silent_frees_its_slot_and_takes_their_outcome_later` (SQLite;
//!   `a_migration_whose_hosts_go_silent_on_postgres` the same on PostgreSQL, gated as below):
//!   a controller with `[limits] per_cluster = 1` and four hosts. A memstress VM migrates from
//!   A to B through the controller; A's daemon freezes itself once its VMM handed the VM over
//!   (`FERRY_HOST_FAULT=stop-at=after`: the migration is active in both hosts' histories) and
//!   the test freezes B's daemon (SIGSTOP): neither answers. A second migration, C to D, waits
//!   in the queue behind it. After the configured silence (`[limits] host_lost_after_s =
//!   12`; the default is 30 s) the
//!   controller records the first one `unknown` (`host_lost`), its slot frees and the second
//!   leaves the queue (its start comes after the first's `unknown`, from the events) and
//!   completes; a cancel of the unknown one is refused with its reason. Both daemons go on:
//!   A ends the migration `completed`, and the controller's record takes it (events
//!   `recorded`, `unknown`, `reconciled`: never `failed`); the VM runs on B.
//! - `the_database_stops_and_comes_back` (PostgreSQL: a server of its own, started and
//!   stopped with `scripts/postgres.sh`; runs when `FERRY_TEST_POSTGRES_URL` is set, required
//!   with `FERRY_TEST_REQUIRE_POSTGRES=1`): a migration A to B through the controller, A frozen
//!   after the hand-over; PostgreSQL stopped outright. The controller fences itself (it steps
//!   down: the time is printed), answers `not_active` saying its database is unreachable, the
//!   CLI ends with that error (no hang), a migration asked of it is refused and none starts
//!   on the hosts; A goes on and completes the migration on the hosts alone, the VM runs on B.
//!   PostgreSQL back (same port): the controller takes the lease again (time printed), records
//!   the migration `completed` from A's history, the hosts are connected and the VM shown on B,
//!   and a migration by name (B to A) completes. Then PostgreSQL hangs (all its processes
//!   SIGSTOPped): a request made at that moment is answered `not_active` once the controller
//!   fences itself (no hang), the CLI fails clearly; SIGCONT: the controller is active again
//!   and the inventory current.
//! - `two_controllers_start_at_once_on_an_empty_database` (PostgreSQL, gated as above; no root
//!   needed): three times, two `ferry cluster serve` started at the same moment on a new empty
//!   database both come up (neither exits on the schema migration), the schema is at the
//!   newest version, exactly one is active and the other answers `not_active` naming it.
//!
//! No assertion depends on the machine's speed: the bounds are generous upper limits; the
//! measured times are printed.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{ferry, host_state, migration_id_at, raw_get, signal, Controller};
use common::hostd::{wait_console, Hostd};
use common::{require_kvm, require_root, TempDir};

/// The marker A's daemon logs when it freezes itself after the hand-over.
const FROZEN: &str = ": fault injection: stopped at after";

/// Waits until `pred` holds; how long it took.
fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// `ferry cluster migrate VM --to-host HOST --json` in the background (it follows the
/// migration; the test kills it at the end).
fn migrate_bg(ctl: &Controller, vm: &str, to: &str) -> Child {
    ferry()
        .args(["cluster", "migrate", vm, "--to-host", to, "--json", "--server", &ctl.url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry cluster migrate")
}

/// The kinds of a `ferry cluster migration ID --json` report's events.
fn kinds(detail: &serde_json::Value) -> Vec<String> {
    detail["events"]
        .as_array()
        .map(|l| l.iter().filter_map(|e| e["kind"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// When the event `kind` of a migration report happened (ms since the epoch).
fn event_at(detail: &serde_json::Value, kind: &str) -> Option<u64> {
    detail["events"].as_array()?.iter().find(|e| e["kind"] == kind)?["at_unix_ms"].as_u64()
}

/// The record of migration `id` in host `h`'s own history.
fn host_record(h: &Hostd, id: &str) -> Option<serde_json::Value> {
    let list = h.host_json(&["migrations"]);
    list["migrations"].as_array()?.iter().find(|m| m["id"] == id).cloned()
}

/// Waits until every name of `names` is `connected` at `ctl`.
fn all_connected(ctl: &Controller, names: &[&str]) {
    ctl.wait_for(&["hosts"], "every host connected", Duration::from_secs(30), |v| {
        names.iter().all(|n| host_state(v, n) == Some("connected"))
    });
}

/// Waits until `ctl` reports VM `vm` running on host `host`.
fn shown_on(ctl: &Controller, vm: &str, host: &str) {
    ctl.wait_for(&["vm", vm], &format!("{vm} shown running on {host}"), Duration::from_secs(30), |v| {
        v["vms"].as_array().is_some_and(|l| l.iter().any(|r| r["host"] == host && r["state"] == "running"))
    });
}

fn stop_child(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn a_migration_whose_hosts_go_silent_frees_its_slot_and_takes_their_outcome_later() {
    require_root();
    require_kvm();
    host_lost("lost", None);
}

#[test]
fn a_migration_whose_hosts_go_silent_on_postgres() {
    require_root();
    require_kvm();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let Some(db) = rt.block_on(ferry_cluster::testing::TestDatabase::create()) else {
        eprintln!("skipped: needs PostgreSQL (set FERRY_TEST_POSTGRES_URL; scripts/postgres.sh starts one)");
        return;
    };
    host_lost("pglost", Some(&db.url));
    drop(db);
}

/// The host-lost scenario (see the file's comment) with a controller on `database` (SQLite
/// when `None`); `tag` names the controller and the four hosts (`test-TAG-a` ...).
fn host_lost(tag: &str, database: Option<&str>) {
    // The silence bound from the configuration (the default is 30 s).
    let mut ctl = Controller::with_config(
        tag,
        database,
        "[limits]\nper_host = 1\nper_cluster = 1\nhost_lost_after_s = 12\n",
    );
    ctl.start();
    let mut a = Hostd::config(&format!("{tag}-a"), "");
    a.env.push(("FERRY_HOST_FAULT".into(), "stop-at=after".into()));
    let mut b = Hostd::config(&format!("{tag}-b"), &format!("shared = \"{}\"\n", a.ds().display()));
    let mut c = Hostd::config(&format!("{tag}-c"), "");
    let mut d = Hostd::config(&format!("{tag}-d"), &format!("shared = \"{}\"\n", c.ds().display()));
    let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|x| format!("test-{tag}-{x}")).collect();
    let (na, nb, nc, nd) = (names[0].as_str(), names[1].as_str(), names[2].as_str(), names[3].as_str());
    for h in [&mut a, &mut b, &mut c, &mut d] {
        h.start();
        h.host_json(&["join", &ctl.url]);
    }
    all_connected(&ctl, &[na, nb, nc, nd]);
    for (h, vm) in [(&a, "web"), (&c, "db")] {
        h.create_memstress(vm, &[]);
        h.vm_json(&["start", vm]);
        h.wait_state(vm, "running", Duration::from_secs(30));
        wait_console(&h.home(vm), "memstress: pass ", Duration::from_secs(30));
    }
    shown_on(&ctl, "web", na);
    shown_on(&ctl, "db", nc);

    // web: A to B, through the controller; A freezes after the hand-over.
    let web_cli = migrate_bg(&ctl, "web", nb);
    wait_until("A frozen after the hand-over", Duration::from_secs(120), || a.daemon_log().contains(FROZEN));
    let web = migration_id_at(&a.daemon_log(), FROZEN).expect("migration id");
    let rec = ctl.wait_for(&["migration", &web], "web's migration recorded", Duration::from_secs(20), |v| {
        v["record"]["id"] == web.as_str()
    });
    assert_eq!(rec["record"]["outcome"], "active", "{rec}");
    // db: C to D waits behind it (one migration in the cluster at once).
    let db_cli = migrate_bg(&ctl, "db", nd);
    let queued =
        ctl.wait_for(&["migrations", "--vm", "db"], "db's migration queued", Duration::from_secs(30), |v| {
            v["migrations"].as_array().is_some_and(|l| l.iter().any(|m| m["outcome"] == "queued"))
        });
    let db = queued["migrations"][0]["id"].as_str().expect("db's id").to_string();

    // B's daemon freezes too: neither host of web's migration answers.
    let b_pid = b.daemon.as_ref().expect("B's daemon").id();
    let a_pid = a.daemon.as_ref().expect("A's daemon").id();
    signal(b_pid, libc::SIGSTOP);
    let silent = Instant::now();
    let lost = ctl.wait_for(&["migration", &web], "web's migration unknown", Duration::from_secs(180), |v| {
        v["record"]["outcome"] != "active"
    });
    println!("host_lost: web's migration recorded unknown {:?} after B's daemon froze", silent.elapsed());
    assert_eq!(lost["record"]["outcome"], "unknown", "{lost}\n{}", ctl.log());
    assert_eq!(lost["record"]["reason_code"], "host_lost", "{lost}");
    assert!(lost["record"]["reason"].as_str().is_some_and(|r| r.contains("(bound 12 s)")), "{lost}");
    assert!(
        ctl.log().contains(&format!("migration {web}: unknown (host_lost)")),
        "the controller's log names it:\n{}",
        ctl.log()
    );
    // Its slot is free: db leaves the queue after it, and completes.
    let db_done =
        ctl.wait_for(&["migration", &db], "db's migration completed", Duration::from_secs(180), |v| {
            !matches!(v["record"]["outcome"].as_str(), Some("queued" | "active"))
        });
    assert_eq!(db_done["record"]["outcome"], "completed", "{db_done}\n{}", ctl.log());
    let lost_at = event_at(&lost, "unknown").expect("unknown event");
    let started_at = event_at(&db_done, "started").expect("db's started event");
    assert!(started_at >= lost_at, "db started at {started_at}, before web was lost at {lost_at}");
    d.wait_state("db", "running", Duration::from_secs(30));
    // Not cancelled from here: its hosts do not answer.
    let out = ferry().args(["migrations", "cancel", &web, "--server", &ctl.url]).output().expect("cancel");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("host_lost"), "{err}");
    // Still unknown (the hosts have not answered).
    let still = ctl.json(&["migration", &web]);
    assert_eq!(still["record"]["outcome"], "unknown", "{still}");
    let listed = ctl.json(&["migrations", "--unknown"]);
    let rows = listed["migrations"].as_array().expect("migrations");
    assert!(
        rows.iter().any(|m| m["id"] == web.as_str() && m["state"] == "unknown"),
        "ferry migrations --unknown: {listed}"
    );
    assert!(rows.iter().all(|m| m["outcome"] == "unknown"), "{listed}");

    // Both daemons go on: A ends the migration, and the controller takes the hosts' outcome.
    signal(b_pid, libc::SIGCONT);
    signal(a_pid, libc::SIGCONT);
    let back = Instant::now();
    let done = ctl.wait_for(&["migration", &web], "web's migration settled", Duration::from_secs(120), |v| {
        v["record"]["outcome"] != "unknown"
    });
    println!(
        "reconciled: web's migration {} {:?} after the daemons went on",
        done["record"]["outcome"],
        back.elapsed()
    );
    assert_eq!(done["record"]["outcome"], "completed", "{done}\n{}", ctl.log());
    assert_eq!(kinds(&done), ["recorded", "unknown", "reconciled"], "{done}");
    assert_eq!(host_record(&a, &web).expect("A's record")["outcome"], "completed");
    b.wait_state("web", "running", Duration::from_secs(30));
    all_connected(&ctl, &[na, nb, nc, nd]);
    shown_on(&ctl, "web", nb);
    // One migration of each VM in the history.
    for vm in ["web", "db"] {
        let h = ctl.json(&["migrations", "--vm", vm]);
        assert_eq!(h["migrations"].as_array().map(Vec::len), Some(1), "{h}");
    }
    stop_child(web_cli);
    stop_child(db_cli);
    drop(d);
    drop(c);
    drop(b);
    drop(a);
    drop(ctl);
}

/// A PostgreSQL server of the test's own (`scripts/postgres.sh`), which it may stop and start
/// again on the same port; stopped at drop.
struct PrivatePostgres {
    dir: TempDir,
    port: u16,
    url: String,
}

fn postgres_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/postgres.sh")
}

impl PrivatePostgres {
    /// A new server, or `None` (and why, printed) when the PostgreSQL tests do not run here.
    fn start(tag: &str) -> Option<PrivatePostgres> {
        // Gated as every PostgreSQL test: the shared server's variable says they run.
        ferry_cluster::testing::postgres_url()?;
        let dir = TempDir::new(tag);
        let out = Command::new(postgres_script()).arg("start").arg(&dir.0).output().expect("postgres.sh");
        assert!(out.status.success(), "postgres.sh start: {}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let port = std::fs::read_to_string(dir.path("port")).expect("port").trim().parse().expect("port");
        Some(PrivatePostgres { dir, port, url })
    }

    /// Stopped outright (`pg_ctl stop -m fast`: every connection closed).
    fn stop(&self) {
        let out = Command::new(postgres_script()).arg("stop").arg(&self.dir.0).output().expect("postgres.sh");
        assert!(out.status.success(), "postgres.sh stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The server's processes: the postmaster, then its children (backends and workers).
    fn processes(&self) -> Vec<u32> {
        let pid_file = std::fs::read_to_string(self.dir.path("data/postmaster.pid")).expect("postmaster.pid");
        let postmaster: u32 = pid_file.lines().next().and_then(|l| l.trim().parse().ok()).expect("pid");
        let mut out = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the fields after the last ')'.
            let ppid =
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
            if ppid == Some(postmaster) {
                out.push(pid);
            }
        }
        out
    }

    /// Every process of the server frozen (SIGSTOP): it hangs, its sockets open; the
    /// processes, for [`PrivatePostgres::thaw`].
    fn freeze(&self) -> Vec<u32> {
        let pids = self.processes();
        for &p in &pids {
            signal(p, libc::SIGSTOP);
        }
        pids
    }

    /// The frozen processes go on (SIGCONT), children first.
    fn thaw(pids: &[u32]) {
        for &p in pids.iter().rev() {
            signal(p, libc::SIGCONT);
        }
    }

    /// Started again on its port.
    fn restart(&self) {
        let out = Command::new(postgres_script())
            .arg("start")
            .arg(&self.dir.0)
            .arg(self.port.to_string())
            .output()
            .expect("postgres.sh");
        assert!(out.status.success(), "postgres.sh start again: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new(postgres_script()).arg("stop").arg(&self.dir.0).output();
    }
}

#[test]
fn the_database_stops_and_comes_back() {
    require_root();
    require_kvm();
    let Some(pg) = PrivatePostgres::start("pgstop-db") else {
        eprintln!("skipped: needs PostgreSQL (set FERRY_TEST_POSTGRES_URL; scripts/postgres.sh starts one)");
        return;
    };
    let mut ctl = Controller::new("pgstop", Some(&pg.url));
    ctl.start();
    let mut a = Hostd::config("pgstop-a", "");
    a.env.push(("FERRY_HOST_FAULT".into(), "stop-at=after".into()));
    let mut b = Hostd::config("pgstop-b", &format!("shared = \"{}\"\n", a.ds().display()));
    let (na, nb) = ("test-pgstop-a", "test-pgstop-b");
    for h in [&mut a, &mut b] {
        h.start();
        h.host_json(&["join", &ctl.url]);
    }
    all_connected(&ctl, &[na, nb]);
    a.create_memstress("web", &[]);
    a.vm_json(&["start", "web"]);
    a.wait_state("web", "running", Duration::from_secs(30));
    wait_console(&a.home("web"), "memstress: pass ", Duration::from_secs(30));
    shown_on(&ctl, "web", na);
    let term = ctl.json(&["leader"])["lease"]["term"].as_u64().expect("term");

    // A migration through the controller, A frozen after the hand-over: active everywhere.
    let cli = migrate_bg(&ctl, "web", nb);
    wait_until("A frozen after the hand-over", Duration::from_secs(120), || a.daemon_log().contains(FROZEN));
    let id = migration_id_at(&a.daemon_log(), FROZEN).expect("migration id");
    let rec = ctl.wait_for(&["migration", &id], "the migration recorded", Duration::from_secs(20), |v| {
        v["record"]["id"] == id.as_str()
    });
    assert_eq!(rec["record"]["outcome"], "active", "{rec}");

    // PostgreSQL stops outright.
    let stopped = Instant::now();
    pg.stop();
    let fenced = wait_until("the controller fences itself", Duration::from_secs(30), || {
        ctl.log().contains(&format!("active -> stepping_down (term {term})"))
    });
    println!("self-fencing: the controller stepped down {fenced:?} after PostgreSQL stopped");
    // Every request ends, with a clear error; the CLI too.
    let (status, body) = raw_get(&format!("{}/hosts", ctl.url));
    assert_eq!((status, body["code"].as_str()), (503, Some("not_active")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("cannot reach its database")), "{body}");
    let asked = Instant::now();
    let out = ctl.cli(&["hosts"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot reach its database"), "{err}");
    println!("the CLI's error came {:?} after it asked: {}", asked.elapsed(), err.trim());
    // It starts nothing: a migration asked of it is refused.
    let out = ctl.cli(&["migrate", "web", "--to-host", na]);
    assert!(
        !out.status.success(),
        "a migration through a fenced controller: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The hosts go on alone: A ends the migration, the VM runs on B.
    signal(a.daemon.as_ref().expect("A's daemon").id(), libc::SIGCONT);
    wait_until("A's history says completed", Duration::from_secs(60), || {
        host_record(&a, &id).is_some_and(|r| r["outcome"] == "completed")
    });
    b.wait_state("web", "running", Duration::from_secs(30));
    // Its home is on A's datastore, which B sees: its self-check goes on there.
    std::fs::write(a.home("web").join("console.log"), "").expect("truncate console");
    wait_console(&a.home("web"), "memstress: pass ", Duration::from_secs(30));
    // Still fenced, and no other migration reached the hosts.
    assert_eq!(raw_get(&format!("{}/hosts", ctl.url)).0, 503);
    for h in [&a, &b] {
        let list = h.host_json(&["migrations"]);
        assert_eq!(list["migrations"].as_array().map(Vec::len), Some(1), "{list}");
    }
    println!("PostgreSQL was down for {:?}", stopped.elapsed());

    // PostgreSQL back on its port: the controller takes the lease again.
    pg.restart();
    let back = Instant::now();
    let took = wait_until("the controller active again", Duration::from_secs(60), || {
        raw_get(&format!("{}/hosts", ctl.url)).0 == 200
    });
    println!("after PostgreSQL came back, the controller was active again within {took:?}");
    let report = ctl.json(&["leader"]);
    assert!(report["lease"]["term"].as_u64().is_some_and(|t| t > term), "{report}");
    // The migration that ended while it was away: completed, from A's history.
    let done =
        ctl.wait_for(&["migration", &id], "the migration recorded completed", Duration::from_secs(60), |v| {
            v["record"]["outcome"] != "active"
        });
    assert_eq!(done["record"]["outcome"], "completed", "{done}\n{}", ctl.log());
    println!("the migration was recorded completed {:?} after PostgreSQL came back", back.elapsed());
    // Inventory current again after heartbeats.
    all_connected(&ctl, &[na, nb]);
    shown_on(&ctl, "web", nb);
    // A migration by name works: back to A (A's fault is on its outgoing side only), once A
    // reports no live VMM of web any more.
    ctl.wait_for(&["vm", "web"], "web live on B only", Duration::from_secs(30), |v| {
        v["vms"].as_array().is_some_and(|l| {
            l.iter().all(|r| {
                r["host"] == nb || !matches!(r["state"].as_str(), Some("starting" | "running" | "paused"))
            })
        })
    });
    let out = ctl.cli(&["migrate", "web", "--to-host", na, "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && again["record"]["outcome"] == "completed",
        "the migration back: {again}\n{}\ncontroller log:\n{}\nA's log:\n{}\nB's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctl.log(),
        a.daemon_log(),
        b.daemon_log()
    );
    a.wait_state("web", "running", Duration::from_secs(30));

    // PostgreSQL hangs (every process frozen): a request made now ends when the controller
    // fences itself (never a hang), and the controller is active again once it goes on.
    let term = ctl.json(&["leader"])["lease"]["term"].as_u64().expect("term");
    let frozen = pg.freeze();
    let hung = Instant::now();
    let (status, body) = raw_get(&format!("{}/hosts", ctl.url));
    println!("with PostgreSQL frozen, a request was answered {status} after {:?}", hung.elapsed());
    assert_eq!((status, body["code"].as_str()), (503, Some("not_active")), "{body}");
    wait_until("the controller fences itself", Duration::from_secs(30), || {
        ctl.log().contains(&format!("active -> stepping_down (term {term})"))
    });
    let out = ctl.cli(&["vms"]);
    assert!(!out.status.success(), "ferry cluster vms with PostgreSQL frozen");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach its database"));
    PrivatePostgres::thaw(&frozen);
    let took = wait_until("the controller active again", Duration::from_secs(60), || {
        raw_get(&format!("{}/hosts", ctl.url)).0 == 200
    });
    println!("after PostgreSQL went on, the controller was active again within {took:?}");
    all_connected(&ctl, &[na, nb]);
    shown_on(&ctl, "web", na);
    stop_child(cli);
    drop(b);
    drop(a);
    drop(ctl);
    drop(pg);
}

#[test]
fn two_controllers_start_at_once_on_an_empty_database() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for round in 0..3 {
        let Some(db) = rt.block_on(ferry_cluster::testing::TestDatabase::create()) else {
            eprintln!(
                "skipped: needs PostgreSQL (set FERRY_TEST_POSTGRES_URL; scripts/postgres.sh starts one)"
            );
            return;
        };
        let mut c1 = Controller::new(&format!("race{round}a"), Some(&db.url));
        let mut c2 = Controller::new(&format!("race{round}b"), Some(&db.url));
        c1.spawn_now();
        c2.spawn_now();
        for c in [&mut c1, &mut c2] {
            c.wait_leader_report();
            assert!(c.exited().is_none(), "a controller exited:\n{}", c.log());
        }
        let version = rt.block_on(async {
            let store = ferry_cluster::store::Store::open(&db.url).await.expect("open");
            let v = store.version().await.expect("version");
            store.close().await;
            v
        });
        assert_eq!(version, ferry_cluster::store::schema::latest());
        // Exactly one active; the other names it.
        let mut answers = Vec::new();
        wait_until("one controller active", Duration::from_secs(30), || {
            answers = [&c1, &c2].iter().map(|c| raw_get(&format!("{}/hosts", c.url))).collect();
            answers.iter().filter(|(s, _)| *s == 200).count() == 1
                && answers.iter().any(|(s, b)| *s == 503 && b["active_url"].is_string())
        });
        let (active, standby) = if answers[0].0 == 200 { (&c1, &answers[1].1) } else { (&c2, &answers[0].1) };
        assert_eq!(standby["active_url"], active.url.as_str(), "{standby}");
        for c in [&mut c1, &mut c2] {
            assert!(c.exited().is_none(), "a controller exited:\n{}", c.log());
        }
        drop(c2);
        drop(c1);
        drop(db);
    }
}
