//! A controller for the tests (`cluster.rs`, `cluster_placement.rs`): `ferry cluster serve`
//! with a configuration in a scratch directory, its identity from the test CA, on SQLite or
//! on the PostgreSQL database given; `ferry cluster ...` run against it.

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

    /// Starts it and waits until it answers.
    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.path("controller.log")).expect("log");
        let child = ferry()
            .args(["cluster", "serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferry cluster serve");
        self.process = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.cli(&["hosts"]).status.success() {
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
            "ferry cluster {args:?}: {}\ncontroller log:\n{}",
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
