//! The shared datastore the migration and checkpoint tests run on: one sanlock lockspace
//! and two test "hosts" (private sanlock daemons, host ids 1 and 2, see
//! `ferry_lease::testing`), started once per test process and joined before the first
//! test uses them. Every VMM of those tests runs with `--lease`, as on shared storage: the
//! lease is the arbiter and `vm.lock` only its cache.
//!
//! The daemons live as long as the test process: they are started from a thread that
//! never ends with `PR_SET_PDEATHSIG`, and an `atexit` handler kills them and removes
//! their scratch directory when the test binary exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use ferry_lease::testing::{zero_file, Daemon, RUN_DIR_ENV};

/// The lockspace's I/O timeout (s): renewals every 6 s, a VMM fences at 21 s without one,
/// joining takes about 7 s. Long enough that a loaded test machine never fences a VM.
pub const IO_TIMEOUT: u32 = 3;
/// The lockspace's name.
pub const LOCKSPACE: &str = "FERRYSUITE";

/// One test host: its sanlock daemon and its host id in the lockspace.
#[derive(Debug)]
pub struct Host {
    daemon: Daemon,
    /// Its host id.
    pub id: u64,
    ids: PathBuf,
}

impl Host {
    /// The value of `--lease` for a VMM on this host.
    pub fn lease_arg(&self) -> String {
        format!("{LOCKSPACE}:{}:{},io_timeout={IO_TIMEOUT}", self.id, self.ids.display())
    }

    /// Points `cmd` at this host's sanlock daemon.
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env(RUN_DIR_ENV, self.daemon.run_dir())
    }

    /// `--lease` and this host's daemon for `cmd`, a `ferry run|receive|restore`.
    pub fn leased<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        self.env(cmd).arg("--lease").arg(self.lease_arg())
    }

    /// Its daemon's run directory.
    pub fn run_dir(&self) -> &Path {
        self.daemon.run_dir()
    }
}

/// The datastore: the lockspace file and its two hosts.
#[derive(Debug)]
pub struct Datastore {
    /// The lockspace file.
    pub ids: PathBuf,
    /// Host id 1 (sources).
    pub a: Host,
    /// Host id 2 (destinations).
    pub b: Host,
}

static DATASTORE: OnceLock<Datastore> = OnceLock::new();
static CLEANUP: Mutex<Vec<(i32, PathBuf)>> = Mutex::new(Vec::new());

/// The process's shared datastore, started and joined on first use.
pub fn datastore() -> &'static Datastore {
    DATASTORE.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("sanlock-daemons".into())
            .spawn(move || {
                let _ = tx.send(start());
                // The daemons die with this thread (PR_SET_PDEATHSIG): it never ends.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the sanlock daemons' thread");
        rx.recv().expect("the sanlock daemons' thread").unwrap_or_else(|e| panic!("{e}"))
    })
}

extern "C" fn cleanup() {
    if let Ok(list) = CLEANUP.lock() {
        for (pgid, scratch) in list.iter() {
            // SAFETY: kill() of the process group this test process started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            // FERRY_KEEP_DATASTORE=1 keeps the daemons' logs for a post-mortem.
            if std::env::var_os("FERRY_KEEP_DATASTORE").is_none() {
                let _ = std::fs::remove_dir_all(scratch);
            }
        }
    }
}

fn start() -> Result<Datastore, String> {
    super::require_root();
    let scratch = std::env::temp_dir().join(format!("ferry-datastore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| format!("create {}: {e}", scratch.display()))?;
    let ids = scratch.join("ids");
    zero_file(&ids, 1 << 20).map_err(|e| format!("lockspace file: {e}"))?;
    let out = Command::new("sanlock")
        .args([
            "direct",
            "init",
            "-s",
            &format!("{LOCKSPACE}:0:{}:0", ids.display()),
            "-Z",
            "512",
            "-A",
            "1M",
        ])
        .args(["-o", &IO_TIMEOUT.to_string()])
        .output()
        .map_err(|e| format!("run sanlock direct init (is the sanlock package installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!("sanlock direct init: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let host = |id: u64| -> Result<Host, String> {
        let name = format!("suite{id}-{}", std::process::id());
        let daemon = Daemon::start_for_process(&scratch, &name, &[])
            .map_err(|e| format!("start the sanlock daemon {name}: {e}"))?;
        let first = CLEANUP.lock().map(|mut l| {
            l.push((daemon.pid() as i32, scratch.clone()));
            l.len() == 1
        });
        if matches!(first, Ok(true)) {
            // SAFETY: registers a plain function with no captured state.
            unsafe { libc::atexit(cleanup) };
        }
        Ok(Host { daemon, id, ids: ids.clone() })
    };
    let (a, b) = (host(1)?, host(2)?);
    // Both join at once (each takes 2 x io_timeout + 1 s). On a busy machine a join can
    // fail (seen: "add_lockspace_timeout done -111" while other KVM tests ran): it is tried
    // three times before the tests that need the datastore fail.
    let join = |h: &Host| -> std::thread::JoinHandle<Result<(), String>> {
        let mut cmd = Command::new("sanlock");
        h.env(&mut cmd)
            .args(["client", "add_lockspace", "-s", &format!("{LOCKSPACE}:{}:{}:0", h.id, ids.display())])
            .args(["-o", &IO_TIMEOUT.to_string()]);
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            for _ in 0..3 {
                let out = cmd.output().map_err(|e| format!("sanlock client add_lockspace: {e}"))?;
                if out.status.success() {
                    return Ok(());
                }
                failures.push(format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(format!("sanlock client add_lockspace failed three times: {}", failures.join(" / ")))
        })
    };
    let (ja, jb) = (join(&a), join(&b));
    for j in [ja, jb] {
        j.join().map_err(|_| "the join thread panicked".to_string())??;
    }
    Ok(Datastore { ids, a, b })
}

/// Whether the lease in `home` is free (nobody holds it), as `ferry home` reads it;
/// waits up to `within` for a lease daemon to release the lease of a VMM that just ended.
/// `Err` carries what `ferry home` said last.
pub fn lease_free(home: &Path, within: Duration) -> Result<(), String> {
    let ds = datastore();
    let deadline = std::time::Instant::now() + within;
    loop {
        let mut cmd = super::ferry();
        let out = ds.a.env(&mut cmd).args(["home", home.to_str().expect("utf8 path"), "--json"]).output();
        let said = out.as_ref().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let free = serde_json::from_str::<serde_json::Value>(&said)
            .is_ok_and(|st| st["lease"].is_object() && st["lease"]["owner_host_id"].is_null());
        if free {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(said);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
