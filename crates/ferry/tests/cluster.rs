//! The controller end to end: `ferry cluster serve` and two host daemons on loopback (one
//! datastore directory both see), both join; the inventory shows both hosts, the datastore
//! seen by both and the VMs; a host daemon killed is `not_responding` within seconds and its
//! VMs show the age of their last report; `ferry host leave` makes a host `disconnected`.
//! The same body runs with the controller on SQLite and on PostgreSQL
//! (`FERRY_TEST_POSTGRES_URL`, required with `FERRY_TEST_REQUIRE_POSTGRES=1`). Bad input:
//! an unknown VM or host, a client of another CA, a malformed configuration. Needs root
//! (the host daemons run as root).

mod common;

use std::time::{Duration, Instant};

use common::controller::{ferry, host_cmd, host_state, Controller};
use common::hostd::{cluster, Hostd};
use common::{require_root, TempDir};

/// The inventory test body, on the store `database` names (None: SQLite).
fn inventory(tag: &str, database: Option<&str>) {
    require_root();
    let mut ctl = Controller::new(tag, database);
    ctl.start();
    let mut a = Hostd::config(&format!("{tag}-a"), "");
    let mut b = Hostd::config(&format!("{tag}-b"), &format!("shared = \"{}\"\n", a.ds().display()));
    a.start();
    b.start();
    a.create_memstress("web", &[]);
    b.create_memstress("db", &[]);

    let joined = host_cmd(&a, &["join", &ctl.url]);
    assert_eq!(joined["controller"], format!("ctl-{tag}"), "{joined}");
    host_cmd(&b, &["join", &ctl.url]);
    let (na, nb) = (format!("test-{tag}-a"), format!("test-{tag}-b"));
    let hosts = ctl.wait_for(&["hosts"], "both hosts connected", Duration::from_secs(10), |v| {
        host_state(v, &na) == Some("connected") && host_state(v, &nb) == Some("connected")
    });
    assert_eq!(hosts["hosts"].as_array().map(Vec::len), Some(2), "{hosts}");
    // The datastore directory both see: one id, two hosts (B calls it `shared`).
    let ds = ctl.json(&["datastores"]);
    let both: Vec<&serde_json::Value> = ds["datastores"]
        .as_array()
        .expect("datastores")
        .iter()
        .filter(|d| d["hosts"].as_array().is_some_and(|h| h.len() == 2))
        .collect();
    assert_eq!(both.len(), 1, "one datastore seen by both hosts: {ds}");
    let names: Vec<&str> =
        both[0]["hosts"].as_array().expect("hosts").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["local", "shared"], "{ds}");
    // No port groups configured: none reported.
    assert_eq!(ctl.json(&["portgroups"])["portgroups"], serde_json::json!([]));
    let vms = ctl.json(&["vms"]);
    let list: Vec<(&str, &str, &str)> = vms["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or(""),
                v["host"].as_str().unwrap_or(""),
                v["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(list, [("db", nb.as_str(), "defined"), ("web", na.as_str(), "defined")], "{vms}");
    let web = ctl.json(&["vm", "web"]);
    assert_eq!(web["vms"][0]["host"], na.as_str());
    let detail = ctl.json(&["host", &na]);
    assert_eq!(detail["info"]["name"], na.as_str());
    // The membership as the host sees it.
    let m = host_cmd(&a, &["cluster"]);
    assert_eq!(m["controller_url"], ctl.url.as_str(), "{m}");

    // A's daemon dies: within seconds A is not_responding, its VM shown with its report's age.
    a.kill_daemon();
    let killed = Instant::now();
    ctl.wait_for(&["hosts"], "A not_responding", Duration::from_secs(15), |v| {
        host_state(v, &na) == Some("not_responding")
    });
    let marked = killed.elapsed();
    eprintln!("A marked not_responding {:.1} s after its daemon was killed", marked.as_secs_f64());
    assert!(marked < Duration::from_secs(10), "took {marked:?}");
    let web = ctl.json(&["vm", "web"]);
    assert_eq!(web["vms"][0]["host_state"], "not_responding", "{web}");
    assert_eq!(web["vms"][0]["state"], "defined", "{web}");
    assert!(web["vms"][0]["age_ms"].as_u64().is_some_and(|a| a >= 4000), "{web}");
    // B is still connected; the human report says so too.
    let out = ctl.cli(&["hosts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not_responding") && text.contains("connected"), "{text}");

    // A comes back: connected again (its daemon resumes the heartbeats it had).
    a.start();
    ctl.wait_for(&["hosts"], "A connected again", Duration::from_secs(10), |v| {
        host_state(v, &na) == Some("connected")
    });

    // B removed by the controller: disconnected, its heartbeats refused (the host says why);
    // it joins again.
    let removed = ctl.json(&["remove-host", &nb]);
    assert_eq!(removed["state"], "disconnected", "{removed}");
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(host_state(&ctl.json(&["hosts"]), &nb), Some("disconnected"));
    let m = host_cmd(&b, &["cluster"]);
    assert!(m["last_error"].as_str().is_some_and(|e| e.contains("join it again")), "{m}");
    host_cmd(&b, &["join", &ctl.url]);
    assert_eq!(host_state(&ctl.json(&["hosts"]), &nb), Some("connected"));
    let out = ctl.cli(&["remove-host", "nobody"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no host named \"nobody\"")
    );

    // B leaves: disconnected, and stays so.
    let left = host_cmd(&b, &["leave"]);
    assert!(left.get("last_error").is_none(), "{left}");
    ctl.wait_for(&["hosts"], "B disconnected", Duration::from_secs(5), |v| {
        host_state(v, &nb) == Some("disconnected")
    });
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(host_state(&ctl.json(&["hosts"]), &nb), Some("disconnected"));
    assert_eq!(host_cmd(&b, &["cluster"]).get("controller_url"), None);
}

#[test]
fn inventory_on_sqlite() {
    inventory("cl-sqlite", None);
}

#[test]
fn inventory_on_postgres() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let Some(db) = rt.block_on(ferry_cluster::testing::TestDatabase::create()) else { return };
    inventory("cl-pg", Some(&db.url));
    drop(db);
}

#[test]
fn bad_input_is_refused_clearly() {
    require_root();
    let mut ctl = Controller::new("cl-bad", None);
    ctl.start();
    let out = ctl.cli(&["vm", "nothing"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no host of this cluster has a VM named \"nothing\""), "{err}");
    let out = ctl.cli(&["host", "nobody"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no host named \"nobody\""), "{err}");

    // A client of another CA is refused at the handshake.
    let other = TempDir::new("cl-other-ca");
    ferry_pki::init_ca(&other.path("ca")).expect("other CA");
    ferry_pki::issue_client(&other.path("ca"), "mallory", &other.path("client")).expect("other client");
    let out = ferry()
        .args(["cluster", "hosts", "--server", &ctl.url, "--identity"])
        .arg(other.path("client"))
        .output()
        .expect("ferry");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("TLS"), "{err}");

    // A host daemon cannot join a controller whose certificate is of another CA.
    let mut a = Hostd::config("cl-bad-a", "");
    a.start();
    let out = ferry().args(["host", "join", "https://127.0.0.1:1", "--host", &a.url]).output().expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("did not take this host's heartbeat"), "{err}");
    let out = ferry().args(["host", "join", "http://127.0.0.1:1", "--host", &a.url]).output().expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("expected https://HOST:PORT"), "{err}");

    // A malformed configuration: file, line and field.
    let bad = ctl.dir.path("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:1\"\nstate_dir = \"/tmp/x\"\ndatabase = \"mysql://db\"\n")
        .expect("bad");
    let out = common::run_to_end(
        &["cluster", "serve", "--config", &bad.to_string_lossy()],
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.toml, line 3: database:"), "{err}");

    // No controller named anywhere: the error says how to name one.
    let out = ferry()
        .args(["cluster", "hosts"])
        .env("HOME", ctl.dir.path("home"))
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .expect("ferry");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("FERRY_SERVER"), "{err}");
    // ... and the CLI's configuration file names it.
    std::fs::create_dir_all(ctl.dir.path("home/.config/ferry")).expect("dir");
    std::fs::write(ctl.dir.path("home/.config/ferry/cli.toml"), format!("server = \"{}\"\n", ctl.url))
        .expect("cli.toml");
    let out = ferry()
        .args(["cluster", "hosts", "--json"])
        .env("HOME", ctl.dir.path("home"))
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .expect("ferry");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The controller serves the OpenAPI document that is checked in.
#[test]
fn openapi_is_served() {
    require_root();
    let mut ctl = Controller::new("cl-openapi", None);
    ctl.start();
    let client = ferry_pki::BlockingClient::new(&cluster().client).expect("client");
    let served = client.get(&format!("{}/openapi.json", ctl.url)).expect("get").json().expect("json");
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi/cluster.json"))
            .expect("file"),
    )
    .expect("json");
    assert_eq!(served, checked_in, "regenerate with `ferry cluster openapi > docs/openapi/cluster.json`");
    // Heartbeats are for hosts: the CLI's client certificate is refused.
    let r = client.post(&format!("{}/heartbeat", ctl.url), &serde_json::json!({})).expect("post");
    assert_eq!(r.status, 403);
}

/// A memstress VM checked against every host and migrated by name through the controller;
/// the controller's history has it with its passes. Needs /dev/kvm.
#[test]
fn migration_through_the_controller() {
    require_root();
    common::require_kvm();
    let mut ctl = Controller::new("cl-mig", None);
    ctl.start();
    let mut a = Hostd::config("cl-mig-a", "");
    let mut b = Hostd::config("cl-mig-b", &format!("shared = \"{}\"\n", a.ds().display()));
    // C: in maintenance, and without the VM's datastore.
    let mut c = Hostd::config("cl-mig-c", "");
    let text = std::fs::read_to_string(&c.config).expect("config");
    std::fs::write(&c.config, text.replace("[datastores]", "maintenance = true\n\n[datastores]"))
        .expect("config");
    a.start();
    b.start();
    c.start();
    a.create_memstress("web", &[]);
    a.vm_json(&["start", "web"]);
    a.wait_state("web", "running", Duration::from_secs(30));
    common::hostd::wait_console(&a.home("web"), "memstress: pass ", Duration::from_secs(30));
    host_cmd(&a, &["join", &ctl.url]);
    host_cmd(&b, &["join", &ctl.url]);
    host_cmd(&c, &["join", &ctl.url]);
    let (na, nb, nc) = ("test-cl-mig-a", "test-cl-mig-b", "test-cl-mig-c");
    ctl.wait_for(&["vm", "web"], "web reported running", Duration::from_secs(10), |v| {
        v["vms"][0]["state"] == "running"
    });

    assert_eq!(host_state(&ctl.json(&["hosts"]), nc), Some("maintenance"));
    // Every other host at once: B can take it; C cannot, for every one of its reasons.
    let table = ctl.json(&["migrate", "web", "--check"]);
    assert_eq!(table["source"], na, "{table}");
    assert_eq!(table["checks"].as_array().map(Vec::len), Some(2), "{table}");
    assert_eq!(
        (table["checks"][0]["host"].as_str(), table["checks"][0]["ok"].as_bool()),
        (Some(nb), Some(true)),
        "{table}"
    );
    assert_eq!(
        (table["checks"][1]["host"].as_str(), table["checks"][1]["ok"].as_bool()),
        (Some(nc), Some(false)),
        "{table}"
    );
    assert!(
        table["checks"][1]["reasons"].as_array().is_some_and(|r| r.len() >= 2),
        "maintenance and the datastore: {table}"
    );
    let out = ctl.cli(&["migrate", "web", "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(nc) && text.contains(" no "), "{text}");
    let out = ctl.cli(&["migrate", "web", "--check", "--to-host", "nobody"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no host named \"nobody\""), "{err}");

    // The migration by name, through the controller; the command waits for its end.
    let done = ctl.json(&["migrate", "web", "--to-host", nb]);
    assert_eq!(done["record"]["outcome"], "completed", "{done}\ncontroller log:\n{}", ctl.log());
    let id = done["record"]["id"].as_str().expect("id").to_string();
    assert!(done["record"]["passes"].as_array().is_some_and(|p| !p.is_empty()), "{done}");
    let kinds: Vec<&str> =
        done["events"].as_array().expect("events").iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"recorded"), "{done}");
    assert_eq!(kinds.last(), Some(&"completed"), "{done}");
    b.wait_state("web", "running", Duration::from_secs(30));
    // A fresh self-check pass on B (the console is truncated first).
    std::fs::write(a.home("web").join("console.log"), "").expect("truncate console");
    common::hostd::wait_console(&a.home("web"), "memstress: pass ", Duration::from_secs(30));

    // The history, filtered.
    let all = ctl.json(&["migrations"]);
    assert_eq!(all["migrations"][0]["id"], id.as_str(), "{all}");
    assert_eq!(
        ctl.json(&["migrations", "--vm", "web", "--host", nb])["migrations"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(ctl.json(&["migrations", "--failed"])["migrations"], serde_json::json!([]));
    let shown = ctl.json(&["migration", &id]);
    assert_eq!(shown["record"]["destination"], nb, "{shown}");
    // The controller's log follows the migration by its id.
    assert!(ctl.log().contains(&format!("migration {id}:")), "{}", ctl.log());
    // The inventory follows: web is on B at the next heartbeat.
    ctl.wait_for(&["vm", "web"], "web reported on B", Duration::from_secs(10), |v| {
        v["vms"].as_array().is_some_and(|l| l.iter().any(|r| r["host"] == nb && r["state"] == "running"))
    });
    // A migration started on a host directly (B -> A) reaches the controller's history from
    // B's own history.
    let back = b.vm_json(&["migrate", "web", "--to-host", &a.url]);
    assert_eq!(back["outcome"], "completed", "{back}");
    let back_id = back["id"].as_str().expect("id").to_string();
    a.wait_state("web", "running", Duration::from_secs(60));
    ctl.wait_for(&["migrations"], "the direct migration imported", Duration::from_secs(20), |v| {
        v["migrations"]
            .as_array()
            .is_some_and(|l| l.iter().any(|m| m["id"] == back_id.as_str() && m["outcome"] == "completed"))
    });
    ctl.wait_for(&["vm", "web"], "web reported on A", Duration::from_secs(10), |v| {
        v["vms"].as_array().is_some_and(|l| l.iter().any(|r| r["host"] == na && r["state"] == "running"))
    });
    // A VM action through the controller goes to the host whose VMM runs it.
    let stopped = ctl.json(&["vm", "web", "stop"]);
    assert_eq!(stopped["host"], na, "{stopped}");
    a.wait_state("web", "defined", Duration::from_secs(30));
    let out = ctl.cli(&["vm", "web", "explode"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no action \"explode\""), "{err}");
}

/// The features in a JSON array of names.
fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// The CPU features the VMM of VM `name` on `h` gives its guest (`ferry info`).
fn guest_features(h: &Hostd, name: &str) -> Vec<String> {
    let sock = h.dir.path("state").join("run").join(format!("{name}.sock"));
    let out = ferry().args(["info", "--json", "--api-socket"]).arg(&sock).output().expect("ferry info");
    assert!(out.status.success(), "ferry info: {}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info json");
    names(&info["cpu_features"])
}

/// The VM `name` in a `ferry cluster evc --json` report.
fn evc_vm<'a>(report: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    report["vms"].as_array()?.iter().find(|v| v["name"] == name)
}

/// EVC end to end (needs /dev/kvm): host A offers everything this machine's KVM does, host B
/// hides a feature F (`[cpu] hide`). A joins and sets the baseline (generation 1, with F); v1
/// started on A sees F; B is refused at join, F and v1 named; lowering the baseline
/// (generation 2) lets B join, and v1 keeps F until it is powered off: it cannot migrate to B;
/// v2 started on A now lacks F and migrates to B; v1 restarted gets generation 2 and
/// migrates too.
#[test]
fn evc_baseline_on_sqlite() {
    evc_baseline("cl-evc", None);
}

#[test]
fn evc_baseline_on_postgres() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let Some(db) = rt.block_on(ferry_cluster::testing::TestDatabase::create()) else { return };
    evc_baseline("cl-evcpg", Some(&db.url));
    drop(db);
}

/// The EVC test body, on the store `database` names (None: SQLite).
fn evc_baseline(tag: &str, database: Option<&str>) {
    require_root();
    common::require_kvm();
    let mut ctl = Controller::new(tag, database);
    ctl.start();
    let mut a = Hostd::config(&format!("{tag}-a"), "");
    a.start();
    let offered = names(&a.host_info()["cpu"]["kvm"]["features"]);
    // A feature a guest runs without (not lm, nx, x2apic), as tests/host_cpu.rs picks it.
    let f = ["avx2", "sse4.2", "popcnt", "ssse3", "sse3", "lahf_lm", "cx16"]
        .into_iter()
        .find(|f| offered.iter().any(|o| o == f))
        .unwrap_or_else(|| panic!("this machine's KVM offers none of the usual features: {offered:?}"));
    let mut b = Hostd::config(
        &format!("{tag}-b"),
        &format!("shared = \"{}\"\n\n[cpu]\nhide = [\"{f}\"]\n", a.ds().display()),
    );
    b.start();
    let (na, nb) = (format!("test-{tag}-a"), format!("test-{tag}-b"));
    let (na, nb) = (na.as_str(), nb.as_str());

    // A joins: the baseline is what A offers, generation 1.
    host_cmd(&a, &["join", &ctl.url]);
    let evc = ctl.json(&["evc"]);
    assert_eq!(evc["baseline"]["generation"], 1, "{evc}");
    assert_eq!(evc["baseline"]["set_by"], format!("first host {na}"), "{evc}");
    assert!(names(&evc["baseline"]["features"]).iter().any(|x| x == f), "{evc}");

    // v1 on A: generation 1, sees F.
    a.create_memstress("v1", &[]);
    a.vm_json(&["start", "v1"]);
    a.wait_state("v1", "running", Duration::from_secs(30));
    common::hostd::wait_console(&a.home("v1"), "memstress: pass ", Duration::from_secs(30));
    assert!(guest_features(&a, "v1").iter().any(|x| x == f), "v1 sees {f}");
    ctl.wait_for(&["evc"], "v1 at generation 1", Duration::from_secs(10), |v| {
        evc_vm(v, "v1").is_some_and(|vm| vm["generation"] == 1 && vm["current"] == true)
    });

    // B lacks F: refused at join, F and v1 named, with the way out.
    let out = ferry().args(["host", "join", &ctl.url, "--host", &b.url]).output().expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "B joined below the baseline");
    assert!(
        err.contains(&format!("lacks CPU features of the cluster's baseline (generation 1): {f}"))
            && err.contains(&format!("--hide {f}"))
            && err.contains(&format!("--baseline-of {nb}"))
            && err.contains(&format!("v1 on {na}")),
        "{err}"
    );
    let evc = ctl.json(&["evc"]);
    assert_eq!(evc["refused"][0]["name"], nb, "{evc}");
    assert_eq!(names(&evc["refused"][0]["lacking"]), [f], "{evc}");
    assert_eq!(host_state(&ctl.json(&["hosts"]), nb), None, "a refused host is not in the inventory");

    // Lowered: generation 2, v1 keeps F.
    let set = ctl.json(&["evc", "set", "--hide", f]);
    assert_eq!(set["baseline"]["generation"], 2, "{set}");
    assert_eq!(names(&set["removed"]), [f], "{set}");
    assert_eq!(set["vms_keeping"][0]["name"], "v1", "{set}");
    assert_eq!(names(&set["vms_keeping"][0]["above_baseline"]), [f], "{set}");
    host_cmd(&b, &["join", &ctl.url]);
    ctl.wait_for(&["hosts"], "B connected", Duration::from_secs(10), |v| {
        host_state(v, nb) == Some("connected")
    });
    // Raising it back above B is refused, B and F named.
    let out = ctl.cli(&["evc", "set", "--add", f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("{nb} lacks {f}")), "{err}");
    let out = ctl.cli(&["evc", "set", "--hide", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown CPU feature \"bogus\""), "{err}");

    // v1 (generation 1, F) cannot go to B: the existing cpu_features check.
    let out = ctl.cli(&["migrate", "v1", "--check", "--to-host", nb, "--json"]);
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let row = &table["checks"][0];
    assert_eq!(row["ok"], false, "{table} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        row["reasons"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r["code"] == "cpu_features" && r["message"].as_str().is_some_and(|m| m.contains(f)))),
        "{table}"
    );

    // v2 on A: generation 2, without F; migrates to B and runs there. (A change reaches a
    // host with its next heartbeat.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_cmd(&a, &["cluster"])["evc_generation"] != 2 {
        assert!(Instant::now() < deadline, "A did not get generation 2");
        std::thread::sleep(Duration::from_millis(200));
    }
    a.create_memstress("v2", &[]);
    a.vm_json(&["start", "v2"]);
    a.wait_state("v2", "running", Duration::from_secs(30));
    assert!(!guest_features(&a, "v2").iter().any(|x| x == f), "v2 does not see {f}");
    ctl.wait_for(&["evc"], "v2 at generation 2", Duration::from_secs(10), |v| {
        evc_vm(v, "v2").is_some_and(|vm| vm["generation"] == 2 && vm["current"] == true)
    });
    let done = ctl.json(&["migrate", "v2", "--to-host", nb]);
    assert_eq!(done["record"]["outcome"], "completed", "{done}\ncontroller log:\n{}", ctl.log());
    b.wait_state("v2", "running", Duration::from_secs(30));
    std::fs::write(a.home("v2").join("console.log"), "").expect("truncate console");
    common::hostd::wait_console(&a.home("v2"), "memstress: pass ", Duration::from_secs(30));

    // v1 powered off and on: generation 2, migrates.
    a.vm_json(&["stop", "v1"]);
    a.wait_state("v1", "defined", Duration::from_secs(30));
    a.vm_json(&["start", "v1"]);
    a.wait_state("v1", "running", Duration::from_secs(30));
    assert!(!guest_features(&a, "v1").iter().any(|x| x == f), "v1 restarted does not see {f}");
    ctl.wait_for(&["evc"], "v1 at generation 2", Duration::from_secs(10), |v| {
        evc_vm(v, "v1").is_some_and(|vm| vm["generation"] == 2)
    });
    let done = ctl.json(&["migrate", "v1", "--to-host", nb]);
    assert_eq!(done["record"]["outcome"], "completed", "{done}\ncontroller log:\n{}", ctl.log());
    b.wait_state("v1", "running", Duration::from_secs(30));

    // The report: both VMs on B at generation 2 (kept across the migration), A's extra F.
    let evc = ctl.wait_for(&["evc"], "both VMs reported on B", Duration::from_secs(10), |v| {
        ["v1", "v2"].iter().all(|n| evc_vm(v, n).is_some_and(|vm| vm["host"] == nb))
    });
    for n in ["v1", "v2"] {
        let vm = evc_vm(&evc, n).expect("vm");
        assert_eq!((vm["generation"].as_u64(), vm["current"].as_bool()), (Some(2), Some(true)), "{evc}");
        assert_eq!(vm["above_baseline"], serde_json::json!([]), "{evc}");
    }
    let host = |n: &str| evc["hosts"].as_array().and_then(|h| h.iter().find(|h| h["name"] == n)).cloned();
    assert_eq!(names(&host(na).expect("A")["extra"]), [f], "{evc}");
    assert_eq!(host(nb).expect("B")["extra"], serde_json::json!([]), "{evc}");
    assert_eq!(evc["refused"], serde_json::json!([]), "{evc}");
    let out = ctl.cli(&["evc"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("baseline generation 2 (operator: -"), "{text}");
    b.vm_json(&["stop", "v1"]);
    b.vm_json(&["stop", "v2"]);
}
