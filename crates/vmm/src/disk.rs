//! Disk images: `--disk path=FILE[,readonly=on]` ([`DiskConfig`], part of the migration
//! schema), opened and locked.
//!
//! A VM's writable disk lives on storage that other hosts may reach too; only one VMM may
//! write it. Each writable image is held under an exclusive OFD lock (`F_OFD_SETLK`,
//! `F_WRLCK` over the whole file), a read-only one under a shared lock: any number of
//! readers, or one writer. OFD locks belong to the open file, so they go away when the
//! VMM dies, however it dies, and they work across NFS and on local files alike. A second
//! VM opening a locked image fails with `disk FILE is in use by another VM` and starts
//! nothing.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Sector size the guest sees.
pub const SECTOR_SIZE: u64 = 512;

/// Errors parsing `--disk` or opening an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such file.
    #[error("disk {} does not exist", path.display())]
    Missing {
        /// The image.
        path: PathBuf,
    },
    /// A directory, device or other non-file.
    #[error("disk {} is not a regular file", path.display())]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
    /// Writable use asked of a file this process may only read.
    #[error("disk {} is read-only; pass readonly=on to use it read-only", path.display())]
    ReadOnlyFile {
        /// The image.
        path: PathBuf,
    },
    /// Another open file description holds a conflicting lock.
    #[error("disk {} is in use by another VM", path.display())]
    InUse {
        /// The image.
        path: PathBuf,
    },
    /// The size is not a whole number of sectors.
    #[error("disk {} is {size} bytes, not a multiple of {SECTOR_SIZE}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The same image twice in one VM.
    #[error("disk {} is given twice", path.display())]
    Duplicate {
        /// The image.
        path: PathBuf,
    },
    /// Any other failure opening, inspecting or locking the image.
    #[error("cannot open disk {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

pub use ferry_migration::schema::{DiskConfig, DiskParseError};

/// An open disk image, normally holding its lock.
#[derive(Debug)]
pub struct Disk {
    config: DiskConfig,
    file: File,
    sectors: u64,
    locked: bool,
}

impl Disk {
    /// Opens and locks the image of `config`.
    pub fn open(config: &DiskConfig) -> Result<Self, Error> {
        let mut d = Self::open_unlocked(config)?;
        d.lock()?;
        Ok(d)
    }

    /// Opens the image of `config` without taking its lock: a migration destination
    /// prepares the VM's disks while the source still holds them, and locks them at the
    /// switchover ([`Disk::lock`]).
    pub fn open_unlocked(config: &DiskConfig) -> Result<Self, Error> {
        let path = config.path.clone();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::Missing { path }),
            Err(source) => return Err(Error::Open { path, source }),
        };
        if !meta.is_file() {
            return Err(Error::NotAFile { path });
        }
        let file = match OpenOptions::new().read(true).write(!config.readonly).open(&path) {
            Ok(f) => f,
            Err(e)
                if !config.readonly
                    && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS)) =>
            {
                return Err(Error::ReadOnlyFile { path })
            }
            Err(source) => return Err(Error::Open { path, source }),
        };
        let size = meta.len();
        if size % SECTOR_SIZE != 0 {
            return Err(Error::Size { path, size });
        }
        Ok(Self { config: config.clone(), file, sectors: size / SECTOR_SIZE, locked: false })
    }

    /// Takes the image's lock (exclusive, or shared if read-only) without waiting.
    pub fn lock(&mut self) -> Result<(), Error> {
        let kind = if self.config.readonly { libc::F_RDLCK } else { libc::F_WRLCK };
        let path = self.config.path.clone();
        match ofd_lock(&self.file, kind as libc::c_short) {
            Ok(()) => {
                self.locked = true;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                Err(Error::InUse { path })
            }
            Err(source) => Err(Error::Open { path, source }),
        }
    }

    /// Drops the lock, keeping the file open (the source of a migration, once it has
    /// stopped for good). Flushes first, so that the next holder reads what was written.
    pub fn unlock(&mut self) {
        if let Err(e) = self.file.sync_data() {
            tracing::warn!("cannot flush disk {}: {e}", self.config.path.display());
        }
        if let Err(e) = ofd_lock(&self.file, libc::F_UNLCK as libc::c_short) {
            tracing::warn!("cannot unlock disk {}: {e}", self.config.path.display());
        }
        self.locked = false;
    }

    /// Drops what this host's page cache holds of the image (clean pages), so that the
    /// next reads come from the storage: a migration destination opened the image before
    /// the source's last writes, and on a shared file system (NFS) its cache may predate
    /// them. Called once the VM's lease and the image's lock have moved here, after the
    /// source flushed. Costs microseconds when nothing is cached; the guest's first reads
    /// of pages that were cached then go to the storage.
    pub fn drop_cache(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise on a descriptor this value owns; it changes no memory.
        let rc = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            tracing::warn!(
                "cannot drop the cached pages of disk {}: {}",
                self.config.path.display(),
                std::io::Error::from_raw_os_error(rc)
            );
        }
    }

    /// Whether this VMM holds the image's lock.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Refuses the same image twice in one VM.
    pub fn check_distinct(configs: &[DiskConfig]) -> Result<(), Error> {
        let mut seen = Vec::new();
        for c in configs {
            let id = std::fs::canonicalize(&c.path).unwrap_or_else(|_| c.path.clone());
            if seen.contains(&id) {
                return Err(Error::Duplicate { path: c.path.clone() });
            }
            seen.push(id);
        }
        Ok(())
    }

    /// What it was opened from.
    pub fn config(&self) -> &DiskConfig {
        &self.config
    }

    /// The open image (holding the lock).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.config.path
    }
}

/// Takes (`F_RDLCK`/`F_WRLCK`) or drops (`F_UNLCK`) an OFD lock over the whole of `file`,
/// without waiting.
pub(crate) fn ofd_lock(file: &File, kind: libc::c_short) -> std::io::Result<()> {
    // SAFETY: flock is plain data; all-zero is a valid value before the fields are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // the whole file
    fl.l_pid = 0; // required for OFD locks
                  // SAFETY: F_OFD_SETLK with a valid flock on a descriptor this File owns.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn image(d: &Path, size: u64) -> PathBuf {
        let p = d.join("disk.img");
        let f = File::create(&p).expect("create");
        f.set_len(size).expect("size");
        p
    }

    #[test]
    fn parses_the_option() {
        let c: DiskConfig = "path=/a/b.img".parse().expect("parse");
        assert_eq!(c, DiskConfig { path: "/a/b.img".into(), readonly: false });
        let c: DiskConfig = "path=x,readonly=on".parse().expect("parse");
        assert!(c.readonly);
        for bad in
            ["", "x.img", "path=", "readonly=on", "path=a,path=b", "path=a,readonly=maybe", "path=a,ro=1"]
        {
            let e = bad.parse::<DiskConfig>().expect_err(bad);
            assert!(e.to_string().contains("expected path=FILE"), "{e}");
        }
    }

    /// One writer, or many readers; a second writer is told the disk is in use; a lock
    /// goes with the open file.
    #[test]
    fn writers_exclude_everyone() {
        let d = dir("lock");
        let p = image(&d, 1 << 20);
        let rw = DiskConfig { path: p.clone(), readonly: false };
        let ro = DiskConfig { path: p.clone(), readonly: true };
        let first = Disk::open(&rw).expect("first");
        assert_eq!(first.sectors(), 2048);
        let e = Disk::open(&rw).expect_err("second writer");
        assert_eq!(e.to_string(), format!("disk {} is in use by another VM", p.display()));
        assert!(matches!(Disk::open(&ro), Err(Error::InUse { .. })));
        drop(first);
        let r1 = Disk::open(&ro).expect("reader");
        let r2 = Disk::open(&ro).expect("second reader");
        assert!(matches!(Disk::open(&rw), Err(Error::InUse { .. })));
        drop(r1);
        drop(r2);
        // Handed over: the holder unlocks (file still open), the next one locks.
        let mut a = Disk::open(&rw).expect("a");
        let mut b = Disk::open_unlocked(&rw).expect("b, unlocked");
        assert!(a.is_locked() && !b.is_locked());
        assert!(matches!(b.lock(), Err(Error::InUse { .. })));
        a.unlock();
        b.lock().expect("b takes over");
        assert!(matches!(a.lock(), Err(Error::InUse { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_images() {
        let d = dir("bad");
        let missing = DiskConfig { path: d.join("nope.img"), readonly: false };
        assert!(matches!(Disk::open(&missing), Err(Error::Missing { .. })));
        let is_dir = DiskConfig { path: d.clone(), readonly: false };
        assert!(matches!(Disk::open(&is_dir), Err(Error::NotAFile { .. })));
        let odd = DiskConfig { path: image(&d, 1000), readonly: false };
        assert!(matches!(Disk::open(&odd), Err(Error::Size { size: 1000, .. })));
        let p = image(&d, 4096);
        let twice = [DiskConfig { path: p.clone(), readonly: true }, DiskConfig { path: p, readonly: true }];
        assert!(matches!(Disk::check_distinct(&twice), Err(Error::Duplicate { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }
}
