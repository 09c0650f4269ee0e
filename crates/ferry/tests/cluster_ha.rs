//! High availability of the controller, end to end, on PostgreSQL only (two `ferry cluster
//! serve` on one database; `FERRY_TEST_POSTGRES_URL`, required with
//! `FERRY_TEST_REQUIRE_POSTGRES=1`, else these tests print why they do not run).
//!
//! - `a_standby_takes_over_a_migration_in_flight`: the standby answers `not_active` with the
//!   active's URL; the CLI with both URLs (and with a dead one first) works; two hosts join;
//!   a memstress VM is migrated by name through the active controller, whose source daemon is
//!   frozen (`FERRY_HOST_FAULT=stop-at=after`) so the migration is certainly active when the
//!   active controller is SIGKILLed; the standby takes the lease (the measured time is
//!   printed; bound 20 s), the hosts heartbeat to it, it follows the migration again and
//!   records it completed, the CLI that waited for it through the takeover prints it, the VM
//!   runs on exactly one host (one VMM process), its self-check passes, and the history has
//!   that one migration.
//! - `a_controller_cut_from_its_database_steps_down`: each controller reaches PostgreSQL
//!   through a TCP proxy of the test that can hold every byte (a database that hangs); the
//!   active one, cut, steps down by itself before the other takes over, answers
//!   `not_active` and does nothing more; both cut: none is active; the database back: exactly
//!   one is active, with a higher term.
//!
//! Needs root (the host daemons) and, for the first, /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{ferry, raw_get, Controller};
use common::hostd::{wait_console, Hostd};
use common::{require_kvm, require_root, wait_timeout};
use ferry_cluster::testing::TestDatabase;

/// A fresh database on the test server, or `None` (and why, printed) when there is none and
/// none is required; fails when `FERRY_TEST_REQUIRE_POSTGRES=1` and there is none.
fn database(rt: &tokio::runtime::Runtime) -> Option<TestDatabase> {
    let db = rt.block_on(TestDatabase::create());
    if db.is_none() {
        eprintln!("skipped: controller HA needs PostgreSQL (set FERRY_TEST_POSTGRES_URL; scripts/postgres.sh starts one)");
    }
    db
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// `ferry cluster ARGS --server SERVERS`.
fn cli(servers: &str, args: &[&str]) -> std::process::Output {
    let mut child = ferry()
        .arg("cluster")
        .args(args)
        .args(["--server", servers])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry cluster");
    if wait_timeout(&mut child, Duration::from_secs(60)).is_none() {
        let _ = child.kill();
        panic!("ferry cluster {args:?} did not finish");
    }
    child.wait_with_output().expect("output")
}

/// `ferry cluster leader --json` asked of `servers`, if it answers.
fn leader(servers: &str) -> Option<serde_json::Value> {
    let out = cli(servers, &["leader", "--json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("json"))
}

/// Waits until `pred` holds; how long it took.
fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid as u32 == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Waits until host `h` heartbeats to controller `c` (`ferry host cluster`: its controller,
/// no error).
fn follows(h: &Hostd, c: &Controller, timeout: Duration) {
    let start = Instant::now();
    loop {
        let m = h.host_json(&["cluster"]);
        if m["controller_url"] == c.url.as_str() && m["last_error"].is_null() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "host {} does not follow {} within {timeout:?}: {m}\ndaemon log:\n{}",
            h.url,
            c.url,
            h.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn host_state<'a>(hosts: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    hosts["hosts"].as_array()?.iter().find(|h| h["name"] == name)?["state"].as_str()
}

#[test]
fn a_standby_takes_over_a_migration_in_flight() {
    require_root();
    require_kvm();
    let rt = runtime();
    let Some(db) = database(&rt) else { return };
    let mut c1 = Controller::new("ha1", Some(&db.url));
    c1.start();
    let mut c2 = Controller::new("ha2", Some(&db.url));
    c2.start_standby();
    let both = format!("{},{}", c1.url, c2.url);

    // The standby answers not_active (503) with the active's URL.
    let (status, body) = raw_get(&format!("{}/hosts", c2.url));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "not_active", "{body}");
    assert_eq!(body["active_url"], c1.url.as_str(), "{body}");
    assert_eq!(body["active"], "ctl-ha1", "{body}");
    // Both answer the leader report: c1 active, its term.
    let report = leader(&c2.url).expect("leader report from the standby");
    assert_eq!(report["answered_by"], "ctl-ha2", "{report}");
    assert_eq!(report["role"], "standby", "{report}");
    assert_eq!(report["lease"]["holder"], "ctl-ha1", "{report}");
    assert_eq!(report["lease"]["expired"], false, "{report}");
    let term = report["lease"]["term"].as_u64().expect("term");
    let names: Vec<&str> = report["controllers"]
        .as_array()
        .expect("controllers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["ctl-ha1", "ctl-ha2"], "{report}");
    let out = cli(&c2.url, &["leader"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("active: ctl-ha1 at {}, term {term},", c1.url)), "{text}");
    assert!(text.contains("answered by ctl-ha2 (standby)"), "{text}");
    // The CLI: the standby alone (its hint followed), both, a dead one first.
    for servers in [c2.url.clone(), both.clone(), format!("https://127.0.0.1:1,{}", c2.url)] {
        let out = cli(&servers, &["hosts", "--json"]);
        assert!(out.status.success(), "--server {servers}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // None answering: every one tried is named.
    let out = cli("https://127.0.0.1:1,https://127.0.0.1:2", &["hosts"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("https://127.0.0.1:1") && err.contains("https://127.0.0.1:2"),
        "{err}"
    );

    // Two hosts; A freezes itself once its VMM handed the VM over (before it tells B and
    // ends its record): the migration is active in every history until A goes on.
    let mut a = Hostd::config("ha-a", "");
    a.env.push(("FERRY_HOST_FAULT".into(), "stop-at=after".into()));
    let mut b = Hostd::config("ha-b", &format!("shared = \"{}\"\n", a.ds().display()));
    a.start();
    b.start();
    let (na, nb) = ("test-ha-a", "test-ha-b");
    a.host_json(&["join", &c1.url]);
    // A standby given to a join: the host joins the active one it names.
    let joined = b.host_json(&["join", &c2.url]);
    assert_eq!(joined["controller_url"], c1.url.as_str(), "{joined}");
    c1.wait_for(&["hosts"], "both hosts connected", Duration::from_secs(20), |v| {
        host_state(v, na) == Some("connected") && host_state(v, nb) == Some("connected")
    });
    // The heartbeat answers name both controllers (the active one's list is refreshed every
    // second from the registry).
    for h in [&a, &b] {
        wait_until("the host knows both controllers", Duration::from_secs(20), || {
            h.host_json(&["cluster"])["controllers"] == serde_json::json!([c1.url, c2.url])
        });
    }
    a.create_memstress("web", &[]);
    a.vm_json(&["start", "web"]);
    a.wait_state("web", "running", Duration::from_secs(30));
    wait_console(&a.home("web"), "memstress: pass ", Duration::from_secs(30));
    c1.wait_for(&["vm", "web"], "web reported on A", Duration::from_secs(20), |v| {
        v["vms"].as_array().is_some_and(|l| l.iter().any(|r| r["host"] == na && r["state"] == "running"))
    });

    // The migration by name, through the controllers (the CLI waits for its end).
    let mut waiting = ferry()
        .args(["cluster", "migrate", "web", "--to-host", nb, "--json", "--server", &both])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry cluster migrate");
    let marker = ": fault injection: stopped at after";
    wait_until("A frozen after the hand-over", Duration::from_secs(120), || a.daemon_log().contains(marker));
    let log = a.daemon_log();
    let line = log.lines().find(|l| l.contains(marker)).expect("marker line");
    let id = line[..line.find(marker).expect("marker")]
        .rsplit("migration ")
        .next()
        .expect("id")
        .trim()
        .to_string();
    // The active controller recorded it, active.
    let rec = c1.wait_for(&["migration", &id], "the migration recorded", Duration::from_secs(20), |v| {
        v["record"]["id"] == id.as_str()
    });
    assert_eq!(rec["record"]["outcome"], "active", "{rec}");

    // The active controller dies in the middle of it; A goes on.
    let killed = Instant::now();
    c1.kill();
    let a_pid = a.daemon.as_ref().expect("daemon").id() as i32;
    // SAFETY: a signal to the daemon this test started.
    unsafe { libc::kill(a_pid, libc::SIGCONT) };
    let mut took = Duration::ZERO;
    wait_until("the standby takes the lease", Duration::from_secs(20), || {
        let taken = leader(&c2.url).is_some_and(|r| {
            r["lease"]["holder"] == "ctl-ha2" && r["lease"]["expired"] == false && r["role"] == "active"
        });
        took = killed.elapsed();
        taken
    });
    println!("takeover: controller ctl-ha2 active {took:?} after the SIGKILL of ctl-ha1");
    let report = leader(&c2.url).expect("leader");
    assert_eq!(report["lease"]["term"].as_u64(), Some(term + 1), "{report}");
    assert!(c2.log().contains(&format!("standby -> active (term {})", term + 1)), "{}", c2.log());

    // The new active follows the migration again and records its end.
    let done = c2.wait_for(&["migration", &id], "the migration completed", Duration::from_secs(60), |v| {
        v["record"]["outcome"] != "active" && !v["record"]["outcome"].is_null()
    });
    assert_eq!(done["record"]["outcome"], "completed", "{done}\n{}", c2.log());
    assert!(c2.log().contains(&format!("migration {id}: following it again")), "{}", c2.log());
    // The CLI that waited for it through the takeover got it.
    assert!(wait_timeout(&mut waiting, Duration::from_secs(60)).is_some(), "the waiting CLI did not end");
    let out = waiting.wait_with_output().expect("output");
    assert!(out.status.success(), "the waiting CLI: {}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(printed["record"]["id"], id.as_str(), "{printed}");
    assert_eq!(printed["record"]["outcome"], "completed", "{printed}");

    // The hosts heartbeat to the new active one.
    for h in [&a, &b] {
        follows(h, &c2, Duration::from_secs(20));
    }
    let hosts = c2.json(&["hosts"]);
    assert_eq!(host_state(&hosts, na), Some("connected"), "{hosts}");
    assert_eq!(host_state(&hosts, nb), Some("connected"), "{hosts}");

    // The VM runs on B, and on B only: one VMM of its home; its self-check passes there.
    b.wait_state("web", "running", Duration::from_secs(30));
    let home = a.home("web");
    let vmms = processes_with(&home.to_string_lossy());
    assert_eq!(vmms.len(), 1, "VMM processes of {}: {vmms:?}", home.display());
    std::fs::write(home.join("console.log"), "").expect("truncate console");
    wait_console(&home, "memstress: pass ", Duration::from_secs(30));
    c2.wait_for(&["vm", "web"], "web reported on B only", Duration::from_secs(20), |v| {
        v["vms"].as_array().is_some_and(|l| {
            l.iter().filter(|r| r["state"] == "running").count() == 1
                && l.iter().any(|r| r["host"] == nb && r["state"] == "running")
        })
    });
    // Nothing ran twice: one migration of web in the history, with one start and one end.
    let history = c2.json(&["migrations", "--vm", "web"]);
    assert_eq!(history["migrations"].as_array().map(Vec::len), Some(1), "{history}");
    let kinds: Vec<String> = done["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect();
    assert_eq!(kinds, ["recorded", "completed"], "{done}");
    drop(a);
    drop(b);
    drop(c2);
    drop(c1);
    drop(db);
}

/// A TCP proxy to PostgreSQL that can hold every byte (`block`: the database seems to hang)
/// and come back (`restore`: the held connections are closed, new ones go through).
struct PgProxy {
    port: u16,
    blocked: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl PgProxy {
    fn start(to: u16) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let p = PgProxy {
            port,
            blocked: Arc::new(AtomicBool::new(false)),
            epoch: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (blocked, epoch, stop) = (p.blocked.clone(), p.epoch.clone(), p.stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let (blocked, epoch, stop) = (blocked.clone(), epoch.clone(), stop.clone());
                std::thread::spawn(move || {
                    let born = epoch.load(Ordering::SeqCst);
                    while blocked.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if epoch.load(Ordering::SeqCst) != born || stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else { return };
                    let pumps =
                        [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())];
                    for (from, into) in pumps {
                        let (Ok(from), Ok(into)) = (from, into) else { return };
                        let (blocked, epoch, stop) = (blocked.clone(), epoch.clone(), stop.clone());
                        std::thread::spawn(move || pump(from, into, born, &blocked, &epoch, &stop));
                    }
                });
            }
        });
        p
    }

    /// Every byte held from now on: the database hangs for its clients.
    fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
    }

    /// The held connections closed, new ones go through.
    fn restore(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.blocked.store(false, Ordering::SeqCst);
    }
}

fn pump(
    mut from: TcpStream,
    mut into: TcpStream,
    born: u64,
    blocked: &AtomicBool,
    epoch: &AtomicU64,
    stop: &AtomicBool,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::SeqCst) || epoch.load(Ordering::SeqCst) != born {
            break;
        }
        if blocked.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = into.shutdown(Shutdown::Both);
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `url` with its port replaced by `port`.
fn via(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    format!("{scheme}://{host}:{port}/{path}")
}

fn port_of(url: &str) -> u16 {
    let rest = url.split_once("://").expect("scheme").1;
    let authority = rest.split('/').next().expect("authority");
    authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(5432)
}

/// The first line of `log` containing `needle`, with its time (the log's RFC 3339 prefix).
fn logged_at(log: &str, needle: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(needle))?;
    Some(line.split_whitespace().next()?.to_string())
}

#[test]
fn a_controller_cut_from_its_database_steps_down() {
    require_root();
    let rt = runtime();
    let Some(db) = database(&rt) else { return };
    let pg = port_of(&db.url);
    let (p1, p2) = (PgProxy::start(pg), PgProxy::start(pg));
    let mut c1 = Controller::new("cut1", Some(&via(&db.url, p1.port)));
    c1.start();
    let mut c2 = Controller::new("cut2", Some(&via(&db.url, p2.port)));
    c2.start_standby();
    let term = leader(&c1.url).expect("leader")["lease"]["term"].as_u64().expect("term");
    let mut h = Hostd::config("cut-h", "");
    h.start();
    h.host_json(&["join", &c1.url]);
    // The heartbeat answers name both controllers.
    wait_until("the host knows both controllers", Duration::from_secs(20), || {
        h.host_json(&["cluster"])["controllers"] == serde_json::json!([c1.url, c2.url])
    });

    // c1's database hangs: it steps down by itself, then c2 takes over (term + 1).
    let cut = Instant::now();
    p1.block();
    let stepped = wait_until("c1 steps down", Duration::from_secs(20), || {
        c1.log().contains(&format!("active -> stepping_down (term {term})"))
    });
    println!("self-fencing: ctl-cut1 stepped down {stepped:?} after its database hung");
    let (status, body) = raw_get(&format!("{}/hosts", c1.url));
    assert_eq!((status, body["code"].as_str()), (503, Some("not_active")), "{body}");
    let took = wait_until("c2 takes over", Duration::from_secs(20), || {
        c2.log().contains(&format!("standby -> active (term {})", term + 1))
    });
    println!("takeover: ctl-cut2 active {:?} after ctl-cut1's database hung", cut.elapsed().max(took));
    // In that order: c1 stopped acting before c2 began (the logs' times).
    let down_at = logged_at(&c1.log(), "active -> stepping_down").expect("c1's line");
    let up_at = logged_at(&c2.log(), &format!("standby -> active (term {})", term + 1)).expect("c2's line");
    assert!(down_at < up_at, "c1 stepped down at {down_at}, c2 took over at {up_at}");
    // The host follows c2; c1 still answers not_active and acts no more.
    follows(&h, &c2, Duration::from_secs(20));
    // c1's database back: it stays a standby (c2 holds the lease) over several renewals.
    p1.restore();
    wait_until("c1 reads the lease again", Duration::from_secs(20), || {
        leader(&c1.url).is_some_and(|r| r["answered_by"] == "ctl-cut1" && r["lease"]["holder"] == "ctl-cut2")
    });
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = raw_get(&format!("{}/hosts", c1.url));
    assert_eq!((status, body["active_url"].as_str()), (503, Some(c2.url.as_str())), "{body}");
    let report = leader(&c1.url).expect("leader");
    assert_eq!(
        (report["role"].as_str(), report["lease"]["term"].as_u64()),
        (Some("standby"), Some(term + 1)),
        "{report}"
    );

    // Both cut: c2 steps down too, and none is active.
    p1.block();
    p2.block();
    wait_until("c2 steps down", Duration::from_secs(20), || {
        c2.log().contains(&format!("active -> stepping_down (term {})", term + 1))
    });
    for c in [&c1, &c2] {
        let (status, body) = raw_get(&format!("{}/hosts", c.url));
        assert_eq!((status, body["code"].as_str()), (503, Some("not_active")), "{}: {body}", c.url);
    }
    // The database back: exactly one is active again, with a higher term.
    p1.restore();
    p2.restore();
    let back = Instant::now();
    wait_until("one controller active again", Duration::from_secs(20), || {
        [&c1, &c2].iter().any(|c| raw_get(&format!("{}/hosts", c.url)).0 == 200)
    });
    println!("after the database came back, a controller was active within {:?}", back.elapsed());
    // Renewals keep it; the other stays a standby.
    std::thread::sleep(Duration::from_secs(2));
    let answers: Vec<u16> = [&c1, &c2].iter().map(|c| raw_get(&format!("{}/hosts", c.url)).0).collect();
    assert_eq!(answers.iter().filter(|&&s| s == 200).count(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|&&s| s == 503).count(), 1, "{answers:?}");
    let report = leader(&format!("{},{}", c1.url, c2.url)).expect("leader");
    assert!(report["lease"]["term"].as_u64().is_some_and(|t| t >= term + 2), "{report}");
    drop(h);
    drop(c2);
    drop(c1);
    drop(p1);
    drop(p2);
    drop(db);
}
