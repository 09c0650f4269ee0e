//! Leases on shared storage through sanlock (the lease manager of libvirt and oVirt): a
//! safe wrapper over `libsanlock_client`.
//!
//! - A [`Lockspace`] is a datastore's area of host ids: each host joins it with its own id
//!   ([`Lockspace::add`]) and its sanlock daemon renews that id's *delta lease* (a timestamp
//!   on the datastore) every `2 * io_timeout` seconds. One renewal keeps every lease the host
//!   holds in the lockspace alive.
//! - A [`Resource`] is one lease (a Paxos lease, a 1 MiB area; Ferry's are one file per VM
//!   in its home). [`Lease::acquire`] registers this process with the daemon and acquires
//!   it; the lease stays held while the returned [`Lease`] (which owns the registered socket)
//!   lives, and the daemon releases it if the process dies.
//! - [`Lockspace::host`] reads a host's last renewal (seconds of `CLOCK_MONOTONIC`, which
//!   every process on the host shares): a holder's own check that its lease is still fresh,
//!   which sanlock without a watchdog does not otherwise guarantee.
//!
//! Every call goes to the local daemon (socket in `$SANLOCK_RUN_DIR`, `/run/sanlock` by
//! default). Calls on one registered socket must not overlap: [`Lease`] takes `&mut self`.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

mod error;
mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Code, Error};

/// A lockspace: a name, this host's id in it and the file (or device) holding its delta
/// leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lockspace {
    /// Its name (at most 47 bytes, no colon).
    pub name: String,
    /// This host's id (1 to 2000).
    pub host_id: u64,
    /// The file or device.
    pub path: PathBuf,
    /// Where the area starts in it (a multiple of 1 MiB).
    pub offset: u64,
}

/// What a host's delta lease says, as the local daemon last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// Its id.
    pub host_id: u64,
    /// Raised every time the host joins the lockspace.
    pub generation: u64,
    /// Its last renewal, in seconds of the renewing host's `CLOCK_MONOTONIC`.
    pub timestamp: u64,
    /// Its I/O timeout in seconds.
    pub io_timeout: u32,
    /// What the local daemon makes of it.
    pub state: HostState,
}

/// `SANLK_HOST_*`: a host's liveness as the local daemon judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostState {
    /// Not watched for long enough to tell.
    Unknown,
    /// Its delta lease is not held.
    Free,
    /// It renews.
    Live,
    /// It has not renewed for its fail time: it is killing its lease holders.
    Fail,
    /// It has not renewed for its dead time: its leases may be taken.
    Dead,
    /// A value this crate does not know.
    Other(u32),
}

impl HostState {
    fn from_flags(flags: u32) -> Self {
        match flags & sys::HOST_MASK {
            1 => Self::Unknown,
            2 => Self::Free,
            3 => Self::Live,
            4 => Self::Fail,
            5 => Self::Dead,
            other => Self::Other(other),
        }
    }
}

impl From<sys::SanlkHost> for HostInfo {
    fn from(h: sys::SanlkHost) -> Self {
        Self {
            host_id: h.host_id,
            generation: h.generation,
            timestamp: h.timestamp,
            io_timeout: h.io_timeout,
            state: HostState::from_flags(h.flags),
        }
    }
}

/// Copies `value` into a NUL-terminated C field of `N` bytes.
fn fill<const N: usize>(what: &'static str, value: &[u8], colon_ok: bool) -> Result<[c_char; N], Error> {
    let invalid = |why| Error::Invalid { what, value: String::from_utf8_lossy(value).into_owned(), why };
    if value.is_empty() {
        return Err(invalid("it is empty"));
    }
    if value.len() >= N {
        return Err(invalid("it is too long"));
    }
    if value.contains(&0) {
        return Err(invalid("it holds a NUL byte"));
    }
    if !colon_ok && value.contains(&b':') {
        return Err(invalid("it holds a colon"));
    }
    let mut out = [0 as c_char; N];
    for (o, b) in out.iter_mut().zip(value) {
        *o = *b as c_char;
    }
    Ok(out)
}

/// The text of a NUL-terminated C field.
fn text(field: &[c_char]) -> String {
    let bytes: Vec<u8> = field.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn disk(path: &Path, offset: u64) -> Result<sys::SanlkDisk, Error> {
    Ok(sys::SanlkDisk {
        path: fill::<{ sys::PATH_LEN }>("path", path.as_os_str().as_bytes(), true)?,
        offset,
        pad1: 0,
        pad2: 0,
    })
}

/// Takes ownership of an array of hosts that libsanlock allocated with `malloc`.
///
/// # Safety
/// `hss` is null or points to `count` initialised hosts allocated with `malloc`.
unsafe fn take_hosts(hss: *mut sys::SanlkHost, count: i32) -> Vec<HostInfo> {
    if hss.is_null() {
        return Vec::new();
    }
    let n = usize::try_from(count).unwrap_or(0);
    // SAFETY: the caller guarantees `count` initialised elements at `hss`.
    let hosts = unsafe { std::slice::from_raw_parts(hss, n) }.iter().map(|h| HostInfo::from(*h)).collect();
    // SAFETY: libsanlock allocated the array with malloc and hands it to the caller.
    unsafe { libc::free(hss.cast()) };
    hosts
}

impl Lockspace {
    /// A lockspace at offset 0 of `path`, checked against sanlock's field sizes.
    pub fn new(name: &str, host_id: u64, path: &Path) -> Result<Self, Error> {
        let ls = Self { name: name.to_owned(), host_id, path: path.to_owned(), offset: 0 };
        ls.raw()?;
        Ok(ls)
    }

    fn raw(&self) -> Result<sys::SanlkLockspace, Error> {
        Ok(sys::SanlkLockspace {
            name: fill::<{ sys::NAME_LEN }>("lockspace name", self.name.as_bytes(), false)?,
            host_id: self.host_id,
            flags: sys::LSF_ALIGN1M_SECTOR512,
            host_id_disk: disk(&self.path, self.offset)?,
        })
    }

    /// Formats the lockspace's area (the file must exist; 1 MiB, for 2000 hosts), recording
    /// `io_timeout` so that the first [`Lockspace::add`] waits `2 * io_timeout` and not the
    /// default 20 s. Destroys every host's record: only for a new datastore.
    pub fn format(&self, io_timeout: u32) -> Result<(), Error> {
        let mut ls = self.raw()?;
        // SAFETY: `ls` is a valid, initialised sanlk_lockspace that outlives the call.
        let rv = unsafe { sys::sanlock_write_lockspace(&mut ls, 0, 0, io_timeout) };
        error::check("write_lockspace", rv).map(drop)
    }

    /// Joins the lockspace with this host's id (blocks for `2 * io_timeout` of the last
    /// writer of the id's record, plus a second; longer if another live host uses the id).
    /// `io_timeout` 0 takes the daemon's default (10 s).
    pub fn add(&self, io_timeout: u32) -> Result<(), Error> {
        let mut ls = self.raw()?;
        // SAFETY: `ls` is a valid sanlk_lockspace that outlives the call.
        let rv = unsafe { sys::sanlock_add_lockspace_timeout(&mut ls, 0, io_timeout) };
        match error::check("add_lockspace", rv) {
            // Already joined (by an earlier call, or another Ferry on this host).
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Whether this host has joined the lockspace.
    pub fn is_joined(&self) -> Result<bool, Error> {
        let mut ls = self.raw()?;
        // SAFETY: `ls` is a valid sanlk_lockspace that outlives the call.
        let rv = unsafe { sys::sanlock_inq_lockspace(&mut ls, 0) };
        match error::check("inq_lockspace", rv) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Leaves the lockspace (the daemon kills the processes still holding leases in it).
    pub fn rem(&self) -> Result<(), Error> {
        let mut ls = self.raw()?;
        // SAFETY: `ls` is a valid sanlk_lockspace that outlives the call.
        let rv = unsafe { sys::sanlock_rem_lockspace(&mut ls, 0) };
        error::check("rem_lockspace", rv).map(drop)
    }

    /// What the local daemon knows of `host_id`'s delta lease (`None`: nothing).
    pub fn host(&self, host_id: u64) -> Result<Option<HostInfo>, Error> {
        Ok(self.hosts(host_id)?.into_iter().find(|h| h.host_id == host_id))
    }

    /// Every host the local daemon has seen alive in the lockspace (`host_id` 0), or one.
    pub fn hosts(&self, host_id: u64) -> Result<Vec<HostInfo>, Error> {
        let name = CString::new(self.name.as_bytes()).map_err(|_| Error::Invalid {
            what: "lockspace name",
            value: self.name.clone(),
            why: "it holds a NUL byte",
        })?;
        let mut hss: *mut sys::SanlkHost = std::ptr::null_mut();
        let mut count = 0;
        // SAFETY: `name` is NUL-terminated, the out-pointers are valid for the call.
        let rv = unsafe { sys::sanlock_get_hosts(name.as_ptr(), host_id, &mut hss, &mut count, 0) };
        // SAFETY: on return libsanlock has set `hss` to null or a malloc'd array of `count`.
        let hosts = unsafe { take_hosts(hss, count) };
        error::check("get_hosts", rv)?;
        Ok(hosts)
    }
}

/// A resource lease: its lockspace, its name and its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// The lockspace's name.
    pub lockspace: String,
    /// The resource's name (unique in the lockspace; at most 47 bytes, no colon).
    pub name: String,
    /// The file or device.
    pub path: PathBuf,
    /// Where the lease starts in it (a multiple of 1 MiB).
    pub offset: u64,
}

/// Who owns a resource lease, from its record on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owners {
    /// The lease version: raised by one on every acquisition.
    pub lver: u64,
    /// The owners (an exclusive lease has at most one); a released lease has none.
    pub hosts: Vec<HostInfo>,
}

impl Resource {
    /// A resource at offset 0 of `path`, checked against sanlock's field sizes.
    pub fn new(lockspace: &str, name: &str, path: &Path) -> Result<Self, Error> {
        let r =
            Self { lockspace: lockspace.to_owned(), name: name.to_owned(), path: path.to_owned(), offset: 0 };
        r.raw()?;
        Ok(r)
    }

    fn raw(&self) -> Result<sys::SanlkResource1, Error> {
        Ok(sys::SanlkResource1 {
            lockspace_name: fill::<{ sys::NAME_LEN }>("lockspace name", self.lockspace.as_bytes(), false)?,
            name: fill::<{ sys::NAME_LEN }>("resource name", self.name.as_bytes(), false)?,
            lver: 0,
            data64: 0,
            data32: 0,
            unused: 0,
            flags: sys::RES_ALIGN1M_SECTOR512,
            num_disks: 1,
            disks: [disk(&self.path, self.offset)?],
        })
    }

    /// Formats the lease's area (the file must exist and be 1 MiB or larger). Destroys the
    /// lease: only for a new one.
    pub fn format(&self) -> Result<(), Error> {
        let mut r = self.raw()?;
        // SAFETY: `r` is a valid sanlk_resource with one disk, outliving the call.
        let rv = unsafe { sys::sanlock_write_resource(&mut r, 0, 0, 0) };
        error::check("write_resource", rv).map(drop)
    }

    /// The resource formatted at offset 0 of `path`, with its lockspace and name read from
    /// its record.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let mut r = sys::SanlkResource1 {
            lockspace_name: [0; sys::NAME_LEN],
            name: [0; sys::NAME_LEN],
            lver: 0,
            data64: 0,
            data32: 0,
            unused: 0,
            flags: 0,
            num_disks: 1,
            disks: [disk(path, 0)?],
        };
        // SAFETY: `r` is a valid sanlk_resource with one disk, outliving the call; the
        // daemon fills in its header.
        let rv = unsafe { sys::sanlock_read_resource(&mut r, 0) };
        error::check("read_resource", rv)?;
        Ok(Self { lockspace: text(&r.lockspace_name), name: text(&r.name), path: path.to_owned(), offset: 0 })
    }

    /// Who owns the lease and its version, read from disk (for operators; needs the
    /// local daemon but not the lockspace).
    pub fn owners(&self) -> Result<Owners, Error> {
        let mut r = self.raw()?;
        let mut hss: *mut sys::SanlkHost = std::ptr::null_mut();
        let mut count = 0;
        // SAFETY: `r` is a valid sanlk_resource with one disk; the out-pointers are valid.
        let rv = unsafe { sys::sanlock_read_resource_owners(&mut r, 0, &mut hss, &mut count) };
        // SAFETY: libsanlock has set `hss` to null or a malloc'd array of `count` hosts.
        let hosts = unsafe { take_hosts(hss, count) };
        error::check("read_resource_owners", rv)?;
        Ok(Owners { lver: r.lver, hosts })
    }

    /// Whether `host_id` marked its hold of lease version `lver` released in its ballot
    /// block, read from disk.
    ///
    /// sanlock releases a lease by clearing the leader record's timestamp, but only when
    /// the releasing host wrote that leader itself; when another host committed the
    /// leader on its behalf (two hosts raced in Disk Paxos and the loser completed the
    /// winner's ballot), the releasing host marks only its own ballot block released, and
    /// the leader still names it as the owner. sanlock's next acquirer treats such a lease
    /// as free; so do operators' reports, through this.
    pub fn released_by(&self, host_id: u64, lver: u64) -> Result<bool, Error> {
        let io = |source| Error::Os { op: "read the lease's ballot block", source };
        let leader = read_sectors(&self.path, self.offset, 512).map_err(io)?;
        let word32 = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let word64 = |b: &[u8], at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        if word32(&leader, 0) != PAXOS_DISK_MAGIC {
            return Err(Error::Sanlock { op: "read the lease's leader record", code: Code::LeaderMagic });
        }
        let sector = u64::from(word32(&leader, 12));
        if !(sector == 512 || sector == 4096) || !(1..=2000).contains(&host_id) {
            return Ok(false);
        }
        // Sector 0: the leader; 1: requests; 2 + (host id - 1): each host's ballot block.
        let at = self.offset + sector * (2 + host_id - 1);
        let dblock = read_sectors(&self.path, at, sector as usize).map_err(io)?;
        Ok(word64(&dblock, DBLOCK_LVER) == lver && word32(&dblock, DBLOCK_FLAGS) & DBLOCK_FL_RELEASED != 0)
    }
}

/// The leader record's magic number (`PAXOS_DISK_MAGIC`).
const PAXOS_DISK_MAGIC: u32 = 0x0615_2010;
/// In a ballot block (`struct paxos_dblock`: mbal, bal, inp, inp2, inp3, lver as u64, then
/// checksum and flags as u32, little-endian): where lver and flags are.
const DBLOCK_LVER: usize = 40;
const DBLOCK_FLAGS: usize = 52;
/// The ballot block's flag: its host released the lease version it names.
const DBLOCK_FL_RELEASED: u32 = 1;

/// Reads `len` bytes at `offset` of `path`, bypassing the page cache where the file
/// system allows (sanlock writes with `O_DIRECT`; another host's writes on shared storage
/// are not in this host's cache).
fn read_sectors(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const ALIGN: usize = 4096;
    let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path);
    let Ok(file) = direct else {
        let mut buf = vec![0u8; len];
        std::fs::File::open(path)?.read_exact_at(&mut buf, offset)?;
        return Ok(buf);
    };
    // An aligned buffer: O_DIRECT needs the memory, offset and length aligned.
    let mut raw = vec![0u8; len + ALIGN];
    let skip = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[skip..skip + len];
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(buf.to_vec()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let mut buf = vec![0u8; len];
            std::fs::File::open(path)?.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        }
        Err(e) => Err(e),
    }
}

/// What sanlock runs when this process's lease is failing, instead of sending SIGTERM: a
/// program with arguments, to which sanlock appends the holder's pid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KillPath {
    /// The program (absolute, at most 127 bytes).
    pub program: PathBuf,
    /// Its arguments, space-separated (at most 127 bytes in all).
    pub args: String,
}

/// A resource lease held by this process, through its registered connection to the
/// daemon. Dropping it releases the lease (and closing the connection would too).
#[derive(Debug)]
pub struct Lease {
    sock: OwnedFd,
    resource: Resource,
    lver: u64,
    held: bool,
}

impl Lease {
    /// Registers this process with the daemon, sets `killpath` if given, and acquires
    /// `resource` without waiting for another owner. The resource's lockspace must be
    /// joined on this host.
    pub fn acquire(resource: &Resource, killpath: Option<&KillPath>) -> Result<Self, Error> {
        // SAFETY: no arguments; returns a new socket or a negative error.
        let fd = error::check("register", unsafe { sys::sanlock_register() })?;
        // SAFETY: `fd` is a new socket this process owns from here on.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(k) = killpath {
            set_killpath(&sock, k)?;
        }
        let mut raw = resource.raw()?;
        let mut list = [&mut raw as *mut sys::SanlkResource1];
        // SAFETY: one valid resource pointer, outliving the call; no options (NULL).
        let rv = unsafe {
            sys::sanlock_acquire(
                sock.as_raw_fd(),
                -1,
                sys::ACQUIRE_OWNER_NOWAIT,
                1,
                list.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        error::check("acquire", rv)?;
        let mut lease = Self { sock, resource: resource.clone(), lver: 0, held: true };
        lease.lver = inquire_lver(&lease.sock, &lease.resource.name)?;
        Ok(lease)
    }

    /// The lease version of this acquisition (sanlock raises it on every acquisition).
    pub fn lver(&self) -> u64 {
        self.lver
    }

    /// The resource.
    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// Whether the lease is still held (not released).
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Releases the lease (the connection stays registered until the value goes).
    pub fn release(&mut self) -> Result<(), Error> {
        if !self.held {
            return Ok(());
        }
        let mut raw = self.resource.raw()?;
        let mut list = [&mut raw as *mut sys::SanlkResource1];
        // SAFETY: one valid resource pointer, outliving the call, on the registered socket.
        let rv = unsafe { sys::sanlock_release(self.sock.as_raw_fd(), -1, 0, 1, list.as_mut_ptr()) };
        error::check("release", rv)?;
        self.held = false;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Closing the socket makes the daemon release too; releasing first says it cleanly.
        let _ = self.release();
    }
}

/// Sets the program sanlock runs instead of SIGTERM when `sock`'s leases fail.
fn set_killpath(sock: &OwnedFd, k: &KillPath) -> Result<(), Error> {
    let program = fill::<{ sys::HELPER_PATH_LEN }>("killpath", k.program.as_os_str().as_bytes(), true)?;
    let mut args = [0 as c_char; sys::HELPER_ARGS_LEN];
    if !k.args.is_empty() {
        args = fill::<{ sys::HELPER_ARGS_LEN }>("killpath arguments", k.args.as_bytes(), true)?;
    }
    // SAFETY: both buffers are NUL-terminated and live for the call; the socket is
    // registered and used by this thread only.
    let rv = unsafe {
        sys::sanlock_killpath(sock.as_raw_fd(), sys::KILLPATH_PID, program.as_ptr(), args.as_mut_ptr())
    };
    error::check("killpath", rv).map(drop)
}

/// The version of the lease `name` held through `sock`, from the daemon's state string
/// (`LOCKSPACE:NAME:PATH:OFFSET:LVER`; sanlock_acquire does not return it).
fn inquire_lver(sock: &OwnedFd, name: &str) -> Result<u64, Error> {
    let mut count = 0;
    let mut state: *mut c_char = std::ptr::null_mut();
    // SAFETY: the socket is registered; the out-pointers are valid for the call.
    let rv = unsafe { sys::sanlock_inquire(sock.as_raw_fd(), -1, 0, &mut count, &mut state) };
    let text = if state.is_null() {
        String::new()
    } else {
        // SAFETY: libsanlock returns a malloc'd NUL-terminated string.
        let s = unsafe { CStr::from_ptr(state) }.to_string_lossy().into_owned();
        // SAFETY: the string is ours to free.
        unsafe { libc::free(state.cast()) };
        s
    };
    error::check("inquire", rv)?;
    parse_lver(&text, name)
        .ok_or(Error::Unexpected { op: "inquire", what: format!("no version of the lease in {text:?}") })
}

/// The version of `name` in an inquire state string: resources separated by spaces, each
/// `LOCKSPACE:NAME:PATH:OFFSET[:PATH:OFFSET...]:LVER` (colons in paths escaped).
fn parse_lver(state: &str, name: &str) -> Option<u64> {
    state.split(' ').find_map(|res| {
        let mut fields = res.splitn(3, ':');
        let _ls = fields.next()?;
        if fields.next()? != name {
            return None;
        }
        res.rsplit(':').next()?.parse().ok()
    })
}

/// `CLOCK_MONOTONIC` in whole seconds: the clock of sanlock's timestamps.
pub fn monotonic_secs() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

/// A fresh resource name (32 hex digits): unique in any lockspace.
pub fn new_resource_name() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests;
