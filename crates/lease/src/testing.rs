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

/// How a benchmark lays out a lease area, beyond Ferry's own (512-byte sectors, every host
/// id up to 2000 in the Paxos area).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// 4096-byte sectors (250 hosts in 1 MiB) instead of 512.
    pub sector4k: bool,
    /// The host ids the lease's Paxos area serves (`num_hosts` of sanlock_write_resource;
    /// 0: all the area holds). Hosts with a larger id cannot acquire it.
    pub num_hosts: u32,
}

impl Layout {
    fn res_flags(self) -> u32 {
        if self.sector4k {
            crate::sys::RES_ALIGN1M_SECTOR4K
        } else {
            crate::sys::RES_ALIGN1M_SECTOR512
        }
    }

    fn raw(
        self,
        res: &crate::Resource,
        extra: u32,
        lver: u64,
    ) -> Result<crate::sys::SanlkResource1, crate::Error> {
        let mut r = res.raw()?;
        r.flags = self.res_flags() | extra;
        r.lver = lver;
        Ok(r)
    }

    /// Formats `res` with this layout (destroys the lease).
    pub fn format(self, res: &crate::Resource) -> Result<(), crate::Error> {
        let mut r = self.raw(res, 0, 0)?;
        let max_hosts = if self.sector4k { 250 } else { 2000 };
        // SAFETY: `r` is a valid sanlk_resource with one disk, outliving the call.
        let rv = unsafe { crate::sys::sanlock_write_resource(&mut r, max_hosts, self.num_hosts as i32, 0) };
        crate::error::check("write_resource", rv).map(drop)
    }
}

/// How [`RawConn::acquire`] asks for a lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcquireMode {
    /// Shared mode (`SANLK_RES_SHARED`).
    pub shared: bool,
    /// Acquire only if the lease's version on disk is this one (`SANLK_RES_LVER`): the
    /// acquisition then has the next version, known without an inquire.
    pub lver: Option<u64>,
}

/// A registered connection to the daemon on which a benchmark drives sanlock's calls one
/// by one (register, killpath, acquire, convert, inquire, release), to time each and to
/// try options Ferry's [`crate::Lease`] does not use. The daemon releases what it holds
/// when it is dropped (the connection closes).
#[derive(Debug)]
pub struct RawConn {
    sock: std::os::fd::OwnedFd,
}

impl RawConn {
    /// Registers this process with the daemon on a new connection.
    pub fn register() -> Result<Self, crate::Error> {
        use std::os::fd::FromRawFd;
        // SAFETY: no arguments; returns a new socket or a negative error.
        let fd = crate::error::check("register", unsafe { crate::sys::sanlock_register() })?;
        // SAFETY: `fd` is a new socket this process owns from here on.
        Ok(Self { sock: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) } })
    }

    /// Sets the killpath, as Ferry's VMM does.
    pub fn killpath(&self, k: &crate::KillPath) -> Result<(), crate::Error> {
        crate::set_killpath(&self.sock, k)
    }

    /// Acquires `res` (laid out as `layout`) without waiting for another owner.
    pub fn acquire(
        &self,
        res: &crate::Resource,
        layout: Layout,
        mode: AcquireMode,
    ) -> Result<(), crate::Error> {
        use std::os::fd::AsRawFd;
        let mut extra = if mode.shared { crate::sys::RES_SHARED } else { 0 };
        if mode.lver.is_some() {
            extra |= crate::sys::RES_LVER;
        }
        let mut r = layout.raw(res, extra, mode.lver.unwrap_or(0))?;
        let mut list = [&mut r as *mut crate::sys::SanlkResource1];
        // SAFETY: one valid resource pointer, outliving the call, on the registered socket.
        let rv = unsafe {
            crate::sys::sanlock_acquire(
                self.sock.as_raw_fd(),
                -1,
                crate::sys::ACQUIRE_OWNER_NOWAIT,
                1,
                list.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        crate::error::check("acquire", rv).map(drop)
    }

    /// Converts the held `res` to shared (`shared`) or exclusive mode, without waiting.
    pub fn convert(&self, res: &crate::Resource, layout: Layout, shared: bool) -> Result<(), crate::Error> {
        use std::os::fd::AsRawFd;
        let mut r = layout.raw(res, if shared { crate::sys::RES_SHARED } else { 0 }, 0)?;
        // SAFETY: a valid resource, outliving the call, on the registered socket;
        // SANLK_CONVERT_OWNER_NOWAIT has the value of SANLK_ACQUIRE_OWNER_NOWAIT.
        let rv = unsafe {
            crate::sys::sanlock_convert(self.sock.as_raw_fd(), -1, crate::sys::ACQUIRE_OWNER_NOWAIT, &mut r)
        };
        crate::error::check("convert", rv).map(drop)
    }

    /// The version of the held lease `name` (sanlock_inquire).
    pub fn lver(&self, name: &str) -> Result<u64, crate::Error> {
        crate::inquire_lver(&self.sock, name)
    }

    /// Releases `res`.
    pub fn release(&self, res: &crate::Resource, layout: Layout) -> Result<(), crate::Error> {
        use std::os::fd::AsRawFd;
        let mut r = layout.raw(res, 0, 0)?;
        let mut list = [&mut r as *mut crate::sys::SanlkResource1];
        // SAFETY: one valid resource pointer, outliving the call, on the registered socket.
        let rv = unsafe { crate::sys::sanlock_release(self.sock.as_raw_fd(), -1, 0, 1, list.as_mut_ptr()) };
        crate::error::check("release", rv).map(drop)
    }
}
