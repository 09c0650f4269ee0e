//! The VM's home directory and its exclusive lock: the arbiter that a VM runs in one VMM
//! only (vMotion's lock on the VM's files on shared storage).
//!
//! The lock is an open-file-description (OFD) write lock on `DIR/vm.lock`: it conflicts
//! with every other open of the file, in this process or any other on any host sharing the
//! file system's lock manager, and the kernel drops it when the process dies, so a crashed
//! VMM never leaves its VM locked. The file's content names the holder, for messages.

use crate::disk::ofd_lock;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in a home directory.
pub const LOCK_FILE: &str = "vm.lock";
/// Where homes go when `--home` is not given: `$FERRY_STATE_DIR/vms/<id>`, with
/// `FERRY_STATE_DIR` defaulting to this.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";

/// Errors with a VM home.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory or lock file cannot be created or opened.
    #[error("cannot use VM home {path}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another VMM holds the lock.
    #[error("VM home {path} is locked by another VMM ({holder}): the VM runs elsewhere")]
    Held {
        /// The directory.
        path: PathBuf,
        /// Who holds it, as the holder wrote it.
        holder: String,
    },
    /// The lock call failed for another reason.
    #[error("cannot lock VM home {path}")]
    Lock {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The default home for a new VM.
pub fn default_home(id: &str) -> PathBuf {
    let root =
        std::env::var_os("FERRY_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    root.join("vms").join(id)
}

/// A VM home whose lock this VMM holds while the value lives (or until [`VmHome::release`]).
#[derive(Debug)]
pub struct VmHome {
    dir: PathBuf,
    lock: Option<File>,
}

impl VmHome {
    /// Creates `dir` if needed and takes its lock, without waiting.
    pub fn lock(dir: &Path) -> Result<Self, Error> {
        let mut home = Self::unlocked(dir);
        home.acquire(None)?;
        Ok(home)
    }

    /// A home whose lock is not (yet) held: a migration destination reserves the VM under
    /// it and takes the lock only at the switchover.
    pub fn unlocked(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), lock: None }
    }

    /// Takes the lock, without waiting, naming this process (and `note`, e.g. the migration
    /// that brought the VM here) in the lock file. Returns what the file said before: the
    /// last holder's name if it ended without releasing (it died, or still runs the VM it
    /// took over), empty if it released cleanly.
    pub fn acquire(&mut self, note: Option<&str>) -> Result<String, Error> {
        if self.lock.is_some() {
            return Ok(String::new());
        }
        let dir = self.dir.clone();
        let open = |source| Error::Open { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(open)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(open)?;
        let mut previous = String::new();
        match ofd_lock(&file, libc::F_WRLCK as libc::c_short) {
            Ok(()) => {
                let _ = file.read_to_string(&mut previous);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                let _ = file.read_to_string(&mut previous);
                let holder = previous.trim().to_string();
                let holder = if holder.is_empty() { "holder unknown".to_string() } else { holder };
                return Err(Error::Held { path: dir, holder });
            }
            Err(source) => return Err(Error::Lock { path: dir, source }),
        }
        // Name ourselves for whoever finds the lock taken.
        let mut me = format!("pid {} on {}", std::process::id(), hostname());
        if let Some(note) = note {
            me.push_str(&format!(" ({note})"));
        }
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.write_all(me.as_bytes());
        let _ = file.sync_data();
        self.lock = Some(file);
        Ok(previous.trim().to_string())
    }

    /// [`VmHome::acquire`], retrying while another VMM holds the lock, for up to `wait`.
    pub fn acquire_within(&mut self, note: Option<&str>, wait: std::time::Duration) -> Result<String, Error> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.acquire(note) {
                Err(Error::Held { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                other => return other,
            }
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this VMM still holds the lock.
    pub fn is_held(&self) -> bool {
        self.lock.is_some()
    }

    /// Gives the lock up (the source of a migration, once it has stopped for good).
    pub fn release(&mut self) {
        if let Some(f) = self.lock.take() {
            let _ = f.set_len(0);
            let _ = ofd_lock(&f, libc::F_UNLCK as libc::c_short);
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "this host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_release() {
        let dir = std::env::temp_dir().join(format!("ferry-home-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = VmHome::lock(&dir).expect("first lock");
        assert!(a.is_held());
        // OFD locks conflict between open file descriptions, even in one process.
        match VmHome::lock(&dir) {
            Err(Error::Held { holder, .. }) => {
                assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}")
            }
            other => panic!("expected Held, got {other:?}"),
        }
        a.release();
        assert!(!a.is_held());
        let b = VmHome::lock(&dir).expect("after release");
        drop(b);
        // Dropping the File closes the description and so drops the lock.
        let _c = VmHome::lock(&dir).expect("after drop");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_last_holder_is_named_unless_it_released() {
        let dir = std::env::temp_dir().join(format!("ferry-home-note-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = VmHome::unlocked(&dir);
        assert!(!a.is_held());
        assert_eq!(a.acquire(Some("migration m-1")).expect("lock"), "");
        // A holder that ends without releasing (a crash) leaves its name behind.
        drop(a);
        let mut b = VmHome::unlocked(&dir);
        let before = b.acquire(None).expect("lock");
        assert!(before.ends_with("(migration m-1)"), "{before}");
        b.release();
        let mut c = VmHome::unlocked(&dir);
        assert_eq!(c.acquire(None).expect("lock"), "");
        // Waiting gives up after the deadline while another holds it.
        let mut d = VmHome::unlocked(&dir);
        let t = std::time::Instant::now();
        assert!(matches!(
            d.acquire_within(None, std::time::Duration::from_millis(50)),
            Err(Error::Held { .. })
        ));
        assert!(t.elapsed() >= std::time::Duration::from_millis(50));
        drop(c);
        d.acquire_within(None, std::time::Duration::from_millis(50)).expect("free now");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn unusable_directory() {
        assert!(matches!(VmHome::lock(Path::new("/proc/ferry-no-home")), Err(Error::Open { .. })));
    }
}
