//! A host daemon for the tests (`host.rs`, `host_errors.rs`): a configuration in a scratch
//! directory (a datastore, a state directory, optionally port groups), `ferry host serve`
//! started on a free port (in a network namespace when given one), and `ferry vm ...` run
//! against it. Drop kills the VMMs it started, the daemon, and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{wait_timeout, TempDir};

/// The test process's cluster CA and the CLI's client identity (made once, removed when the
/// test binary exits).
pub struct Cluster {
    /// `ca.pem`, `ca.key`.
    pub ca: PathBuf,
    /// The CLI's identity (`cert.pem`, `key.pem`, `ca.pem`): `FERRY_IDENTITY` of every
    /// `ferry vm`/`ferry host` command the tests run.
    pub client: PathBuf,
}

static CLUSTER: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
static CLUSTER_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

extern "C" fn remove_cluster() {
    if let Some(d) = CLUSTER_DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The process's cluster CA and client identity.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-test-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if CLUSTER_DIR.set(dir.clone()).is_ok() {
            // SAFETY: registers a plain function with no captured state.
            unsafe { libc::atexit(remove_cluster) };
        }
        let ca = dir.join("ca");
        ferry_pki::init_ca(&ca).expect("make the test cluster CA");
        let client = dir.join("client");
        ferry_pki::issue_client(&ca, "test-cli", &client).expect("issue the CLI's certificate");
        Cluster { ca, client }
    })
}

/// A daemon and its directory.
pub struct Hostd {
    pub dir: TempDir,
    pub config: PathBuf,
    pub url: String,
    /// Network namespace the daemon and the CLI run in, if any.
    pub netns: Option<String>,
    pub daemon: Option<Child>,
    /// Environment of the daemon and the CLI (e.g. a private sanlock daemon's run dir).
    pub env: Vec<(String, String)>,
}

impl Hostd {
    /// `ferry` in the daemon's namespace and environment.
    fn cmd(&self) -> Command {
        let mut c = ferry_in(self.netns.as_deref());
        c.env(ferry_pki::IDENTITY_ENV, &cluster().client);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `ferry host init` against the test cluster CA, unless the identity exists.
    fn init_identity(&self) {
        if self.dir.path("state").join("identity").join("cert.pem").exists() {
            return;
        }
        let out = self
            .cmd()
            .args(["host", "init", "--config"])
            .arg(&self.config)
            .arg("--ca")
            .arg(&cluster().ca)
            .output()
            .expect("run ferry host init");
        assert!(out.status.success(), "ferry host init: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `ferry` run in `netns` (or here).
fn ferry_in(netns: Option<&str>) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_ferry")),
    };
    c.env_remove("FERRY_LOG").env_remove("FERRY_HOST");
    c
}

impl Hostd {
    /// A configuration with datastore `local` and `extra` TOML appended (port groups ...).
    pub fn config(tag: &str, extra: &str) -> Self {
        let dir = TempDir::new(tag);
        std::fs::create_dir_all(dir.path("ds")).expect("datastore dir");
        let port = super::mig::free_port();
        let config = dir.path("host.toml");
        let text = format!(
            "name = \"test-{tag}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n\n[datastores]\nlocal = \"{}\"\n{extra}",
            dir.path("state").display(),
            dir.path("ds").display()
        );
        std::fs::write(&config, text).expect("config");
        Hostd {
            dir,
            config,
            url: format!("https://127.0.0.1:{port}"),
            netns: None,
            daemon: None,
            env: Vec::new(),
        }
    }

    /// Starts the daemon and waits until it answers.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        self.init_identity();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("daemon.log"))
            .expect("daemon log");
        let child = self
            .cmd()
            .args(["host", "serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferry host serve");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.vm(&["list"]).status.success() {
                return;
            }
            if let Some(d) = self.daemon.as_mut() {
                if let Ok(Some(st)) = d.try_wait() {
                    panic!("the daemon exited ({st}) at start:\n{}", self.daemon_log());
                }
            }
            assert!(Instant::now() < deadline, "the daemon did not answer:\n{}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `ferry host serve` to its end (for configurations that must be refused).
    pub fn serve_to_end(&self) -> Output {
        let mut child = self
            .cmd()
            .args(["host", "serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
            let _ = child.kill();
            panic!("ferry host serve did not exit");
        }
        child.wait_with_output().expect("output")
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL to the daemon (its VMMs go on).
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// SIGTERM to the daemon, and wait for it.
    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            if wait_timeout(&mut d, Duration::from_secs(10)).is_none() {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
    }

    /// `ferry vm ARGS --host URL`.
    pub fn vm(&self, args: &[&str]) -> Output {
        let mut child = self
            .cmd()
            .arg("vm")
            .args(args)
            .args(["--host", &self.url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry vm");
        if wait_timeout(&mut child, Duration::from_secs(120)).is_none() {
            let _ = child.kill();
            panic!("ferry vm {args:?} did not finish");
        }
        child.wait_with_output().expect("output")
    }

    /// `ferry host info --json` of this daemon, which must succeed.
    pub fn host_info(&self) -> serde_json::Value {
        let out =
            self.cmd().args(["host", "info", "--json", "--host", &self.url]).output().expect("host info");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// `ferry host ARGS --host URL --json` against this daemon (in its namespace), which must
    /// succeed; the JSON answer.
    pub fn host_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .cmd()
            .arg("host")
            .args(args)
            .args(["--host", &self.url, "--json"])
            .output()
            .expect("ferry host");
        assert!(out.status.success(), "ferry host {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// `ferry vm ARGS --json`, which must succeed; its report.
    pub fn vm_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.vm(&a);
        assert!(
            out.status.success(),
            "ferry vm {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        serde_json::from_slice(&out.stdout).expect("JSON report")
    }

    /// `ferry vm ARGS`, which must fail; its stderr.
    pub fn vm_fails(&self, args: &[&str]) -> String {
        let out = self.vm(args);
        assert!(
            !out.status.success(),
            "ferry vm {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Waits until VM `name` is in `state`; its report.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.vm_json(&["show", name]);
            if v["state"] == state {
                return v;
            }
            assert!(Instant::now() < deadline, "VM {name} is not {state} within {timeout:?}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The datastore's directory.
    pub fn ds(&self) -> PathBuf {
        self.dir.path("ds")
    }

    /// A VM's home.
    pub fn home(&self, name: &str) -> PathBuf {
        self.ds().join(name)
    }

    /// `ferry vm create NAME` with a small memstress guest and `extra` options.
    pub fn create_memstress(&self, name: &str, extra: &[&str]) -> serde_json::Value {
        let mut a = vec![
            "create",
            name,
            "--datastore",
            "local",
            "--memory-mib",
            "64",
            "--vcpus",
            "1",
            "--guest",
            "memstress",
            "--cmdline",
            "wss=8M",
        ];
        a.extend_from_slice(extra);
        self.vm_json(&a)
    }
}

/// Two daemons on loopback, started: A with datastore `local`, B seeing A's datastore
/// directory as `shared` (the same id) beside its own `local`; `top_b` goes at the top of B's
/// configuration (before its datastores).
pub fn two_hosts(tag: &str, top_b: &str) -> (Hostd, Hostd) {
    let mut a = Hostd::config(&format!("{tag}-a"), "");
    let mut b = Hostd::config(&format!("{tag}-b"), &format!("shared = \"{}\"\n", a.ds().display()));
    let text = std::fs::read_to_string(&b.config).expect("config");
    std::fs::write(&b.config, text.replace("[datastores]", &format!("{top_b}\n[datastores]")))
        .expect("config");
    a.start();
    b.start();
    (a, b)
}

/// Whether process `pid` is alive (not a zombie).
pub fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until the console of the VM at `home` has a line starting with `prefix`.
pub fn wait_console(home: &Path, prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(home.join("console.log")).unwrap_or_default();
        assert!(!text.contains("CORRUPTION"), "the guest reported corruption:\n{text}");
        if let Some(l) = text.lines().rev().find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no console line {prefix:?} within {timeout:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        // The VMMs first (while the daemon runs, it deletes their taps as they end).
        if self.daemon.is_some() {
            let out = self.vm(&["list", "--json"]);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                for vm in v["vms"].as_array().into_iter().flatten() {
                    if let Some(pid) = vm["pid"].as_u64() {
                        // SAFETY: a signal to a VMM this test's daemon started.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        self.stop_daemon();
        // VMMs the daemon did not know of any more (a crashed test), by their home.
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            if text.contains(&*self.ds().to_string_lossy()) && text.contains("--api-socket") {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                    // SAFETY: a VMM of this test's datastore.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}
