//! A controller for the tests (`cluster.rs`, `cluster_ha.rs`, `cluster_placement.rs`): `ferry cluster serve` with a
//! configuration in a scratch directory and an identity from the test CA, and `ferry cluster
//! ...` run against it. Drop stops it (SIGTERM).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::hostd::{cluster, Hostd};
use super::{wait_timeout, TempDir};

/// A controller: its directory, configuration, URL and process.
pub struct Controller {
    pub dir: TempDir,
    pub config: PathBuf,
    pub url: String,
    pub process: Option<Child>,
}

impl Controller {
    /// A configuration in a scratch directory (`database`: a URL, or the default SQLite file),
    /// its identity from the test CA.
    pub fn new(tag: &str, database: Option<&str>) -> Controller {
        Controller::with_config(tag, database, "")
    }

    /// The same with `extra` appended to the configuration (e.g. a `[limits]` section).
    pub fn with_config(tag: &str, database: Option<&str>, extra: &str) -> Controller {
        let dir = TempDir::new(tag);
        let port = super::mig::free_port();
        let config = dir.path("cluster.toml");
        let mut text = format!(
            "name = \"ctl-{tag}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n",
            dir.path("state").display()
        );
        if let Some(db) = database {
            text.push_str(&format!("database = \"{db}\"\n"));
        }
        text.push_str(extra);
        std::fs::write(&config, text).expect("config");
        let out = ferry()
            .args(["cluster", "init", "--config"])
            .arg(&config)
            .arg("--ca")
            .arg(&cluster().ca)
            .output()
            .expect("ferry cluster init");
        assert!(out.status.success(), "ferry cluster init: {}", String::from_utf8_lossy(&out.stderr));
        Controller { dir, config, url: format!("https://127.0.0.1:{port}"), process: None }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("controller.log")).unwrap_or_default()
    }

    /// Starts it and waits until it answers as the active controller.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_answering(&["hosts"]);
    }

    /// Starts it beside an active controller and waits until it answers (`ferry cluster
    /// leader`: a standby answers nothing else).
    pub fn start_standby(&mut self) {
        self.spawn();
        self.wait_answering(&["leader"]);
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.process.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("controller.log"))
            .expect("log");
        let child = ferry()
            .args(["cluster", "serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferry cluster serve");
        self.process = Some(child);
    }

    fn wait_answering(&mut self, args: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.cli(args).status.success() {
            if let Some(Ok(Some(st))) = self.process.as_mut().map(Child::try_wait) {
                panic!("the controller exited ({st}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the controller did not answer:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ferry cluster ARGS --server URL`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut child = ferry()
            .arg("cluster")
            .args(args)
            .args(["--server", &self.url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ferry cluster");
        if wait_timeout(&mut child, Duration::from_secs(30)).is_none() {
            let _ = child.kill();
            panic!("ferry cluster {args:?} did not finish");
        }
        child.wait_with_output().expect("output")
    }

    /// `ferry cluster ARGS --json`, which must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "ferry cluster {args:?}: {}{}\ncontroller log:\n{}",
            // A command that fails with --json says why on stdout (a migration's record).
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// Waits until `pred` holds for `ferry cluster ARGS --json`; that report.
    pub fn wait_for(
        &self,
        args: &[&str],
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut a = args.to_vec();
        a.push("--json");
        loop {
            // A report may fail meanwhile (a VM between its hosts' reports is on none).
            let out = self.cli(&a);
            let v = if out.status.success() {
                serde_json::from_slice(&out.stdout).expect("json")
            } else {
                serde_json::json!({ "error": String::from_utf8_lossy(&out.stderr) })
            };
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not within {timeout:?}: {v}\ncontroller log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.process.take() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// `ferry` with the test CLI identity and no controller from the environment.
pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_LOG").env_remove("FERRY_HOST").env_remove("FERRY_SERVER");
    c.env(ferry_pki::IDENTITY_ENV, &cluster().client);
    c
}

/// `ferry host ARGS --host URL` of `h`, which must succeed; its JSON.
pub fn host_cmd(h: &Hostd, args: &[&str]) -> serde_json::Value {
    let out = ferry().arg("host").args(args).args(["--host", &h.url, "--json"]).output().expect("ferry host");
    assert!(
        out.status.success(),
        "ferry host {args:?}: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.daemon_log()
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The state of host `name` in a `ferry cluster hosts --json` report.
pub fn host_state<'a>(hosts: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    hosts["hosts"].as_array()?.iter().find(|h| h["name"] == name)?["state"].as_str()
}

impl Controller {
    /// `ferry vm ARGS --server URL`: `ferry vm` through the controller (no --host).
    pub fn vm_cli(&self, args: &[&str]) -> Output {
        let mut child = ferry()
            .arg("vm")
            .args(args)
            .args(["--server", &self.url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ferry vm");
        if wait_timeout(&mut child, Duration::from_secs(120)).is_none() {
            let _ = child.kill();
            panic!("ferry vm {args:?} did not finish");
        }
        child.wait_with_output().expect("output")
    }

    /// `ferry vm ARGS --server URL --json`, which must succeed.
    pub fn vm_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.vm_cli(&a);
        assert!(
            out.status.success(),
            "ferry vm {args:?}: {}\ncontroller log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }
}

/// `GET URL` with the CLI's identity, from one controller (no failover): its status and JSON
/// body (status 0 and the error when it cannot be reached). Bounded: 2 s to connect, 10 s in
/// all.
pub fn raw_get(url: &str) -> (u16, serde_json::Value) {
    let client = ferry_pki::BlockingClient::new(&cluster().client)
        .expect("client")
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(10));
    match client.get(url) {
        Ok(r) => (r.status, serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)),
        Err(e) => (0, serde_json::json!({ "error": e.to_string() })),
    }
}

/// Sends `signal` to the process `pid` the test started (SIGSTOP freezes a daemon: it keeps
/// its sockets and answers nothing; SIGCONT lets it go on).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: a signal to a process this test started.
    let r = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(r, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

/// The migration id a source daemon's log names on the line containing `marker` (`migration
/// ID: ...`), once it is there.
pub fn migration_id_at(log: &str, marker: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let head = &line[..line.find(marker)?];
    Some(head.rsplit("migration ").next()?.trim().to_string())
}

impl Controller {
    /// Starts it without waiting for anything (several controllers started at the same
    /// moment); [`Controller::wait_leader_report`] then waits until it answers.
    pub fn spawn_now(&mut self) {
        self.spawn();
    }

    /// Waits until it answers `ferry cluster leader` (standbys answer it too); fails if it
    /// exits first.
    pub fn wait_leader_report(&mut self) {
        self.wait_answering(&["leader"]);
    }

    /// Whether its process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}
