//! Test harness: a private sanlock daemon per test "host" on one machine.
//!
//! Each [`Daemon`] has its own run directory (`SANLOCK_RUN_DIR`, where its socket lives;
//! a client picks its daemon with the same variable), its own host name (`-e`), no
//! watchdog (`-w 0`), no mlockall or realtime priority (`-l 0 -h 0`), no shared log file
//! (`-L -1`; its debug output goes to `daemon.log` in the run directory), and runs as root.
//! It is started under an `LD_PRELOAD` shim (built here from `testing/rlimit_shim.c`)
//! that lets it start on machines whose hard memlock/rtprio limits it cannot raise. Real
//! hosts run the packaged daemon and need none of this.
//!
//! Dropping a [`Daemon`] kills its process group (daemon and helper) and removes its
//! run directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHIM_SOURCE: &str = include_str!("../testing/rlimit_shim.c");

/// The variable naming a daemon's run directory, read by the daemon and by libsanlock.
pub const RUN_DIR_ENV: &str = "SANLOCK_RUN_DIR";

/// Builds the rlimit shim into `dir` (once) and returns its path.
pub fn shim(dir: &Path) -> std::io::Result<PathBuf> {
    let so = dir.join("ferry-rlimit-shim.so");
    if so.exists() {
        return Ok(so);
    }
    std::fs::create_dir_all(dir)?;
    let src = dir.join(format!("ferry-rlimit-shim-{}.c", std::process::id()));
    std::fs::write(&src, SHIM_SOURCE)?;
    let tmp = dir.join(format!("ferry-rlimit-shim-{}.so", std::process::id()));
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&tmp)
        .arg(&src)
        .arg("-ldl")
        .output()?;
    let _ = std::fs::remove_file(&src);
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "cannot build the rlimit shim: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    std::fs::rename(&tmp, &so)?;
    Ok(so)
}

/// A private sanlock daemon, killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    host_name: String,
    run_dir: PathBuf,
    child: Child,
}

impl Daemon {
    /// Starts a daemon named `host_name` with its run directory under `scratch`, with
    /// `extra` daemon options, and waits until it accepts connections.
    pub fn start(scratch: &Path, host_name: &str, extra: &[&str]) -> std::io::Result<Self> {
        Self::start_inner(scratch, host_name, extra, false)
    }

    /// [`Daemon::start`] for a daemon that lives as long as the test process: it gets
    /// `SIGKILL` when the thread that starts it ends, so start it from a thread that never
    /// does (a process-wide daemon is never dropped).
    pub fn start_for_process(scratch: &Path, host_name: &str, extra: &[&str]) -> std::io::Result<Self> {
        Self::start_inner(scratch, host_name, extra, true)
    }

    fn start_inner(scratch: &Path, host_name: &str, extra: &[&str], tied: bool) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        let shim = shim(scratch)?;
        let run_dir = scratch.join(format!("sanlock-run-{host_name}"));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)?;
        let log = std::fs::File::create(run_dir.join("daemon.log"))?;
        let mut command = Command::new("sanlock");
        if tied {
            // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .args(["daemon", "-D", "-w", "0", "-l", "0", "-h", "0", "-U", "root", "-G", "root", "-L", "-1"])
            .args(["-e", host_name])
            .args(extra)
            .env(RUN_DIR_ENV, &run_dir)
            .env("LD_PRELOAD", &shim)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let mut daemon = Self { host_name: host_name.to_owned(), run_dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.run_dir.join("sanlock.sock").exists() {
            if let Some(status) = daemon.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "sanlock daemon {host_name} exited at start ({status}): {}",
                    daemon.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("sanlock daemon {host_name} did not start")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// Its run directory (the value of [`RUN_DIR_ENV`] for its clients).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Its host name.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The daemon's process id (also its process group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("daemon.log")).unwrap_or_default()
    }

    /// Makes this process's sanlock calls go to this daemon.
    ///
    /// Sets an environment variable: call it before other threads read the environment
    /// (at the start of a test that is the only one using sanlock in its process).
    pub fn use_in_this_process(&self) {
        std::env::set_var(RUN_DIR_ENV, &self.run_dir);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill() on the process group this harness started; no memory involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Creates a zeroed file of `len` bytes (a lockspace or lease area).
pub fn zero_file(path: &Path, len: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(len)
}

/// A scratch directory removed when dropped (also when a test panics).
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh, empty `ferry-<tag>-<pid>` under the temporary directory.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("ferry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const FAULTFS_SOURCE: &str = include_str!("../testing/faultfs.c");

/// A FUSE passthrough of a backing directory whose operations a test can make hang, fail
/// with EIO or slow down ([`FaultFs::set`]): a host's view of a datastore with faults.
/// Built here from `testing/faultfs.c` (needs `libfuse3-dev`); unmounted when dropped.
#[derive(Debug)]
pub struct FaultFs {
    mountpoint: PathBuf,
    mode_file: PathBuf,
    child: Child,
}

impl FaultFs {
    /// Mounts `backing` at `mountpoint` (both created if needed), with the program built
    /// into `scratch`.
    pub fn mount(scratch: &Path, backing: &Path, mountpoint: &Path) -> std::io::Result<Self> {
        let program = scratch.join("ferry-faultfs");
        if !program.exists() {
            let src = scratch.join("ferry-faultfs.c");
            std::fs::write(&src, FAULTFS_SOURCE)?;
            let flags = Command::new("pkg-config").args(["fuse3", "--cflags", "--libs"]).output()?;
            if !flags.status.success() {
                return Err(std::io::Error::other("pkg-config fuse3 failed: is libfuse3-dev installed?"));
            }
            let flags = String::from_utf8_lossy(&flags.stdout).into_owned();
            let out = Command::new("cc")
                .args(["-O2", "-o"])
                .arg(&program)
                .arg(&src)
                .args(flags.split_whitespace())
                .output()?;
            let _ = std::fs::remove_file(&src);
            if !out.status.success() {
                return Err(std::io::Error::other(format!(
                    "cannot build faultfs: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let mode_file = scratch.join(format!("faultfs-{}.mode", std::process::id()));
        std::fs::write(&mode_file, "ok\n")?;
        let child = Command::new(&program)
            .arg(backing)
            .arg(&mode_file)
            .arg(mountpoint)
            .args(["-f", "-o", "auto_unmount"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut fs = Self { mountpoint: mountpoint.to_owned(), mode_file, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_mountpoint(mountpoint) {
            if let Some(status) = fs.child.try_wait()? {
                return Err(std::io::Error::other(format!("faultfs exited at start ({status})")));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("faultfs did not mount"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(fs)
    }

    /// Sets the mode: `ok`, `hang`, `eio` or `slow:MS`.
    pub fn set(&self, mode: &str) -> std::io::Result<()> {
        let tmp = self.mode_file.with_extension("new");
        std::fs::write(&tmp, format!("{mode}\n"))?;
        std::fs::rename(&tmp, &self.mode_file)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        // Hung requests finish first, then the mount goes.
        let _ = self.set("ok");
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.mountpoint).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.mode_file);
    }
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (std::fs::metadata(path), path.parent().map(std::fs::metadata)) else {
        return false;
    };
    me.dev() != parent.dev()
}
