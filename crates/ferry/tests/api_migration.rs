//! Asynchronous migration through the API alone, on real KVM with the real `ferry` binary:
//! `PUT /vm/migrate` answers 202 with the id, `GET /vm/events` streams the phases and passes
//! (resumable with `since`, never held up by a client that does not read),
//! `GET /vm/migration` and `HOME/migrations/<id>.json` give the report, and the destination's
//! own events show the same migration. No `ferry migrate` process is involved.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mig::{
    free_port, http, receiver, s, slow_source_with, source, still_runs, wait_socket, write_key, T,
};
use common::{require_kvm, TempDir};
use serde_json::Value;

/// Small VMs: these tests are about the API, not about moving memory.
const SMALL: &[&str] = &["--memory", "128M", "--cmdline", "wss=4M"];

fn migrate_request(port: u16, key: &Path, extra: Value) -> Value {
    let mut v = serde_json::json!({"to": format!("tcp:127.0.0.1:{port}"), "auth_key_file": s(key)});
    if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        v.extend(extra.clone());
    }
    v
}

/// `GET /vm/events?since=SEQ`, raw: the status line and headers are checked, then the
/// chunked body is read line by line.
struct Events {
    reader: BufReader<UnixStream>,
}

impl Events {
    fn open(sock: &Path, since: &str) -> Self {
        Self::try_open(sock, since).expect("the VMM serves its event stream")
    }

    /// Subscribes; `None` if the VMM does not serve its socket (any more).
    fn try_open(sock: &Path, since: &str) -> Option<Self> {
        let mut stream = UnixStream::connect(sock).ok()?;
        stream.set_read_timeout(Some(T)).ok()?;
        write!(
            stream,
            "GET /vm/events?since={since} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        assert!(lower.contains("application/x-ndjson"), "{head}");
        Some(Events { reader })
    }
}

/// Event lines, whatever the chunking.
struct EventLines {
    events: Events,
    queue: std::collections::VecDeque<Value>,
}

impl EventLines {
    fn open(sock: &Path, since: u64) -> Self {
        EventLines { events: Events::open(sock, &since.to_string()), queue: Default::default() }
    }

    /// [`EventLines::open`], or `None` if the VMM no longer serves its socket (it ended).
    fn try_open(sock: &Path, since: u64) -> Option<Self> {
        Some(EventLines { events: Events::try_open(sock, &since.to_string())?, queue: Default::default() })
    }

    fn next(&mut self) -> Option<Value> {
        if let Some(v) = self.queue.pop_front() {
            return Some(v);
        }
        let r = &mut self.events.reader;
        loop {
            let mut size = String::new();
            if r.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let size = size.trim();
            if size.is_empty() {
                continue;
            }
            let n = usize::from_str_radix(size, 16).expect("chunk size");
            if n == 0 {
                return None;
            }
            let mut data = vec![0; n];
            r.read_exact(&mut data).ok()?;
            for line in String::from_utf8(data).expect("utf8").lines().filter(|l| !l.is_empty()) {
                self.queue.push_back(serde_json::from_str(line).expect("event JSON"));
            }
            if let Some(v) = self.queue.pop_front() {
                return Some(v);
            }
        }
    }
}

/// Reads events until migration `id`'s report; returns every event read.
fn follow_to_report(ev: &mut EventLines, id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    while let Some(e) = ev.next() {
        let done = e["kind"] == "report" && e["migration_id"] == id;
        seen.push(e);
        if done {
            return seen;
        }
    }
    panic!("the event stream ended before the report: {seen:?}");
}

fn phases(events: &[Value], side: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["kind"] == "phase" && e["side"] == side)
        .map(|e| e["phase"].as_str().expect("phase").to_string())
        .collect()
}

fn report_file(home: &Path, id: &str) -> Value {
    let path = home.join("migrations").join(format!("{id}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("report JSON")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Waits until `GET /vm/migration` shows migration `id` ended; returns it.
fn wait_ended(sock: &Path, id: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let (status, m) = http(sock, "GET", "/vm/migration", None);
        assert_eq!(status, 200, "{m}");
        if m["migration_id"] == id && !m["report"].is_null() {
            return m;
        }
        assert!(Instant::now() < deadline, "migration {id} never ended: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_migration_driven_by_http_alone() {
    require_kvm();
    let dir = TempDir::new("api-mig");
    let key = write_key(&dir, "key", 21);
    let (mut src, sock) = source(&dir, SMALL);
    let home = dir.path("home");
    let port = free_port();
    let dst_sock = dir.path("dst.sock");
    let mut dst = receiver(port, &key, Some(&dst_sock), &[]);

    let (status, v) = http(&sock, "GET", "/version", None);
    assert_eq!(status, 200);
    assert_eq!(v["api_version"], 2);
    assert!(v["ferry_version"].is_string(), "{v}");
    let (status, e) = http(&sock, "GET", "/vm/migration", None);
    assert_eq!(status, 404, "no migration yet: {e}");
    assert!(e["error"].is_string(), "{e}");

    let mut ev = EventLines::open(&sock, 0);
    let (status, started) =
        http(&sock, "PUT", "/vm/migrate", Some(&migrate_request(port, &key, Value::Null)));
    assert_eq!(status, 202, "{started}");
    let id = started["migration_id"].as_str().expect("migration_id").to_string();
    assert!(id.starts_with("m-"), "{id}");

    let events = follow_to_report(&mut ev, &id);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "sequence numbers from 1, one by one: {events:?}");
        assert_eq!(e["migration_id"], id.as_str());
        assert_eq!(e["side"], "source");
    }
    assert_eq!(
        phases(&events, "source"),
        ["setup", "pre-copy", "stop-and-copy", "restoring", "committed", "completed"],
        "{events:?}"
    );
    let passes: Vec<&Value> = events.iter().filter(|e| e["kind"] == "pass").collect();
    assert!(passes.len() >= 2, "a pre-copy pass and the stop-and-copy: {events:?}");
    assert!(passes[0]["expected_downtime_ms"].as_f64().is_some(), "pass 1 has its estimate: {:?}", passes[0]);
    assert_eq!(passes.last().expect("pass")["stop_and_copy"], true);
    let report = &events.last().expect("report")["report"];
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["migration_id"], id.as_str());
    assert_eq!(report["passes"].as_array().expect("passes").len(), passes.len());

    // The report is in the home, as sent.
    assert_eq!(&report_file(&home, &id), report);
    // The stream ends with the VMM.
    assert!(ev.next().is_none(), "the source's stream goes on after its VMM ended");
    assert!(src.wait(T).success(), "{}", src.stderr());

    // The destination's events, once it serves its API: its side of the same migration.
    wait_socket(&dst_sock);
    let mut dev = EventLines::open(&dst_sock, 0);
    let mut dst_events = Vec::new();
    while let Some(e) = dev.next() {
        let end = e["kind"] == "phase" && e["phase"] == "completed";
        dst_events.push(e);
        if end {
            break;
        }
    }
    assert!(dst_events.iter().all(|e| e["migration_id"] == id.as_str() && e["side"] == "destination"));
    assert_eq!(
        phases(&dst_events, "destination"),
        ["setup", "pre-copy", "restoring", "committed", "completed"],
        "{dst_events:?}"
    );
    assert!(dst_events.iter().filter(|e| e["kind"] == "pass").count() >= 2, "{dst_events:?}");
    let dst_record: Value = serde_json::from_slice(
        &std::fs::read(home.join("migrations").join(format!("{id}.destination.json")))
            .expect("destination record"),
    )
    .expect("JSON");
    assert_eq!(dst_record["migration_id"], id.as_str());
    assert_eq!(dst_record["status"], "completed");

    // Both VMMs logged the migration into the home, each in its own file.
    let logs: Vec<String> = std::fs::read_dir(home.join("logs"))
        .expect("logs")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("log"))
        .collect();
    let with_id = logs.iter().filter(|l| l.contains(&format!("migration {id}:"))).count();
    assert_eq!(with_id, 2, "a log per VMM naming the migration: {} files", logs.len());
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn an_event_client_that_reconnects_with_since_misses_nothing_and_sees_nothing_twice() {
    require_kvm();
    let dir = TempDir::new("api-resume");
    let key = write_key(&dir, "key", 22);
    let (mut src, sock) = slow_source_with(&dir, SMALL);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    // Slow enough for several connections, with a downtime limit it reaches at that rate.
    let req = migrate_request(port, &key, serde_json::json!({"bandwidth_mib": 8, "downtime_ms": 2000}));
    let (status, started) = http(&sock, "PUT", "/vm/migrate", Some(&req));
    assert_eq!(status, 202, "{started}");
    let id = started["migration_id"].as_str().expect("id").to_string();
    // One event per connection, then hang up and resume after the last one seen.
    let mut seqs = Vec::new();
    let mut last = 0u64;
    let deadline = Instant::now() + T;
    let vmm_gone = |seqs: &[u64]| {
        // The source VMM ends once the VM runs on the destination: a client that reconnects
        // after that finds the outcome in the home (as a daemon restarted meanwhile does).
        let report = dir.path("home").join("migrations").join(format!("{id}.json"));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_else(|e| {
            panic!("the source VMM went away with no report in its home ({e}); events seen: {seqs:?}")
        }))
        .expect("report JSON");
        assert_eq!(r["status"], "completed", "{r}");
    };
    loop {
        assert!(Instant::now() < deadline, "no report: {seqs:?}");
        let Some(mut ev) = EventLines::try_open(&sock, last) else {
            vmm_gone(&seqs);
            break;
        };
        let Some(e) = ev.next() else {
            vmm_gone(&seqs);
            break;
        };
        drop(ev);
        assert_ne!(e["kind"], "gap", "{e}");
        let seq = e["seq"].as_u64().expect("seq");
        seqs.push(seq);
        last = seq;
        if e["kind"] == "report" {
            assert_eq!(e["migration_id"], id.as_str());
            assert_eq!(e["report"]["status"], "completed", "{e}");
            break;
        }
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "no duplicates, no gaps");
    assert!(src.wait(T).success(), "{}", src.stderr());
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn a_client_that_never_reads_holds_up_nothing() {
    require_kvm();
    let dir = TempDir::new("api-stuck");
    let key = write_key(&dir, "key", 23);
    let (mut src, sock) = source(&dir, SMALL);
    let pid = src.child.id();
    // Subscribes and never reads a byte.
    let mut stuck = UnixStream::connect(&sock).expect("connect");
    write!(stuck, "GET /vm/events?since=0 HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let before = rss_kib(pid);
    // Many short migrations (to a port nobody listens on: each fails at once and reports),
    // more events than the ring holds, more bytes than the socket buffers take.
    let closed = free_port();
    let mut ids = Vec::new();
    for _ in 0..400 {
        let (status, started) =
            http(&sock, "PUT", "/vm/migrate", Some(&migrate_request(closed, &key, Value::Null)));
        assert_eq!(status, 202, "{started}");
        let id = started["migration_id"].as_str().expect("id").to_string();
        let m = wait_ended(&sock, &id);
        assert_eq!(m["report"]["status"], "failed", "{m}");
        ids.push(id);
    }
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 32 << 10, "the VMM grew by {grown} KiB with a client that does not read");
    // A client that comes now is told what the ring no longer holds, then gets the rest.
    let mut ev = EventLines::open(&sock, 0);
    let first = ev.next().expect("an event");
    assert_eq!(first["kind"], "gap", "{first}");
    assert_eq!(first["missed_from"], 1);
    // And a real migration completes with the stuck client still connected.
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let (status, started) =
        http(&sock, "PUT", "/vm/migrate", Some(&migrate_request(port, &key, Value::Null)));
    assert_eq!(status, 202, "{started}");
    let id = started["migration_id"].as_str().expect("id").to_string();
    let events = follow_to_report(&mut ev, &id);
    assert_eq!(events.last().expect("report")["report"]["status"], "completed");
    let t = Instant::now();
    assert!(src.wait(T).success(), "{}", src.stderr());
    assert!(t.elapsed() < Duration::from_secs(10), "the source took {:?} to exit", t.elapsed());
    drop(stuck);
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn bad_requests_are_refused_and_a_cancelled_migration_reports_through_the_api_and_the_home() {
    require_kvm();
    let dir = TempDir::new("api-bad");
    let key = write_key(&dir, "key", 24);
    let (mut src, sock) = slow_source_with(&dir, SMALL);
    let home = dir.path("home");
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);

    let (status, e) = http(&sock, "PUT", "/vm/migrate/cancel", None);
    assert_eq!(status, 409, "nothing to cancel: {e}");
    for bad in ["x", "-1", "1.5", "99999999999999999999999"] {
        let (status, e) = http(&sock, "GET", &format!("/vm/events?since={bad}"), None);
        assert_eq!(status, 400, "since={bad}: {e}");
        assert!(e["error"].as_str().expect("error").contains("since"), "{e}");
    }
    let (status, e) = http(&sock, "GET", "/vm/events?until=3", None);
    assert_eq!(status, 400, "{e}");
    let (status, e) =
        http(&sock, "PUT", "/vm/migrate", Some(&serde_json::json!({"to": "tcp:127.0.0.1:1", "nonsense": 1})));
    assert_eq!(status, 400, "{e}");

    let req = migrate_request(port, &key, serde_json::json!({"bandwidth_mib": 4}));
    let (status, started) = http(&sock, "PUT", "/vm/migrate", Some(&req));
    assert_eq!(status, 202, "{started}");
    let id = started["migration_id"].as_str().expect("id").to_string();
    let (status, e) = http(&sock, "PUT", "/vm/migrate", Some(&req));
    assert_eq!(status, 409, "a second migration while one runs: {e}");
    assert!(e["error"].as_str().expect("error").contains(&id), "{e}");
    // Progress while it runs.
    let deadline = Instant::now() + T;
    loop {
        let (_, m) = http(&sock, "GET", "/vm/migration", None);
        if m["phase"] == "pre-copy" && m["bytes_transferred"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(m["migration_id"], id.as_str());
            assert!(m["report"].is_null(), "{m}");
            assert!(m["rate_mib_s"].as_f64().is_some(), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "never in pre-copy: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, e) = http(&sock, "PUT", "/vm/migrate/cancel", None);
    assert_eq!(status, 204, "{e}");
    let m = wait_ended(&sock, &id);
    assert_eq!(m["phase"], "cancelled", "{m}");
    assert_eq!(m["report"]["status"], "cancelled", "{m}");
    assert_eq!(m["report"]["vm_running_on"], "source", "{m}");
    assert_eq!(report_file(&home, &id), m["report"]);
    let (status, e) = http(&sock, "PUT", "/vm/migrate/cancel", None);
    assert_eq!(status, 409, "nothing to cancel any more: {e}");
    // The stream tells the whole story, ending with the report.
    let mut ev = EventLines::open(&sock, 0);
    let events = follow_to_report(&mut ev, &id);
    assert_eq!(phases(&events, "source").last().map(String::as_str), Some("cancelled"));
    still_runs(&mut src, &sock);
    assert!(src.signal_and_wait(libc::SIGTERM, T).success());
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn ferry_migrate_says_so_when_the_source_vmm_goes_away() {
    require_kvm();
    let dir = TempDir::new("api-gone");
    let key = write_key(&dir, "key", 25);
    let (mut src, sock) = slow_source_with(&dir, SMALL);
    let port = free_port();
    let mut dst = receiver(port, &key, None, &[]);
    let child = common::mig::migrate_bg(&sock, port, &key, &["--bandwidth-mib", "4"]);
    let deadline = Instant::now() + T;
    loop {
        let (_, m) = http(&sock, "GET", "/vm/migration", None);
        if m["phase"] == "pre-copy" {
            break;
        }
        assert!(Instant::now() < deadline, "never in pre-copy: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    src.signal_and_wait(libc::SIGKILL, T);
    let out = child.wait_with_output().expect("migrate output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("the source VMM went away"), "{stderr}");
    assert!(stderr.contains("last phase was pre-copy"), "{stderr}");
    assert!(!stderr.contains("malformed"), "{stderr}");
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}

#[test]
fn a_receiver_never_given_a_migration_gives_up_at_its_deadline() {
    require_kvm();
    let dir = TempDir::new("api-deadline");
    let key = write_key(&dir, "key", 26);
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = common::run_to_end(
        &["receive", "--listen", &listen, "--auth-key-file", s(&key), "--deadline-s", "2"],
        T,
    );
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no migration started within 2 s (--deadline-s)"), "{stderr}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "gave up after {took:?}");
}

#[test]
fn both_sides_followed_live_through_their_event_streams_with_http_alone() {
    require_kvm();
    let dir = TempDir::new("api-both");
    let key = write_key(&dir, "key", 0x5a);
    let (mut src, sock) = slow_source_with(&dir, SMALL);
    // The destination starts empty and is told where to listen and the key over its API.
    let dsock = dir.path("dst.sock");
    let mut dst = common::Vm::spawn(common::mig::on_b(common::ferry().args([
        "receive",
        "--api-socket",
        s(&dsock),
        "--deadline-s",
        "120",
    ])));
    wait_socket(&dsock);
    let hex: String = [0x5au8; 32].iter().map(|b| format!("{b:02x}")).collect();
    let (status, v) = http(
        &dsock,
        "PUT",
        "/vm/receive",
        Some(&serde_json::json!({"listen": "tcp:127.0.0.1:0", "auth_key_hex": hex})),
    );
    assert_eq!(status, 202, "{v}");
    let port: u16 = v["listen"]
        .as_str()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no listening address in {v}"));

    // Both event streams are open before the migration starts.
    let mut dev = EventLines::open(&dsock, 0);
    let mut sev = EventLines::open(&sock, 0);
    let req = migrate_request(port, &key, serde_json::json!({"bandwidth_mib": 8, "downtime_ms": 2000}));
    let (status, started) = http(&sock, "PUT", "/vm/migrate", Some(&req));
    assert_eq!(status, 202, "{started}");
    let id = started["migration_id"].as_str().expect("id").to_string();

    // The destination's side, live: its stream spans the receiving VMM and the VM it became
    // (one socket); should it end at the hand-over, it resumes after the last event seen.
    let mut dst_events: Vec<Value> = Vec::new();
    let deadline = Instant::now() + T;
    'dst: loop {
        while let Some(e) = dev.next() {
            let done = e["kind"] == "phase" && e["phase"] == "completed";
            dst_events.push(e);
            if done {
                break 'dst;
            }
        }
        assert!(Instant::now() < deadline, "the destination never completed: {dst_events:?}");
        let last = dst_events.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
        dev = EventLines::open(&dsock, last);
    }
    assert!(dst_events.iter().all(|e| e["migration_id"] == id.as_str() && e["side"] == "destination"));
    assert_eq!(
        phases(&dst_events, "destination"),
        ["setup", "pre-copy", "restoring", "committed", "completed"],
        "{dst_events:?}"
    );
    assert!(dst_events.iter().any(|e| e["kind"] == "pass"), "{dst_events:?}");
    let seqs: Vec<u64> = dst_events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "no gaps, no duplicates: {seqs:?}");

    // The source's side, to its report.
    let events = follow_to_report(&mut sev, &id);
    assert_eq!(
        phases(&events, "source"),
        ["setup", "pre-copy", "stop-and-copy", "restoring", "committed", "completed"],
        "{events:?}"
    );
    assert_eq!(events.last().expect("report")["report"]["status"], "completed");
    assert!(src.wait(T).success(), "{}", src.stderr());
    // The VM runs on the destination, on the API socket it received on.
    let (status, v) = http(&dsock, "GET", "/vm", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    still_runs(&mut dst, &dsock);
    assert!(dst.signal_and_wait(libc::SIGTERM, T).success());
}
