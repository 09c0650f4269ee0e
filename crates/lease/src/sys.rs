//! The parts of libsanlock_client's C interface Ferry uses (sanlock 3.8, `sanlock.h`,
//! `sanlock_admin.h`, `sanlock_resource.h`), declared by hand. Layouts are checked in the
//! tests below against the sizes and offsets of the C headers on x86_64.

use std::os::raw::{c_char, c_int};

/// `SANLK_NAME_LEN`: lockspace, resource and host names, including the terminating NUL.
pub const NAME_LEN: usize = 48;
/// `SANLK_PATH_LEN`: disk paths, including the terminating NUL.
pub const PATH_LEN: usize = 1024;
/// `SANLK_HELPER_PATH_LEN`, `SANLK_HELPER_ARGS_LEN`: the killpath program and its arguments.
pub const HELPER_PATH_LEN: usize = 128;
/// See [`HELPER_PATH_LEN`].
pub const HELPER_ARGS_LEN: usize = 128;

/// `SANLK_LSF_ALIGN1M | SANLK_LSF_SECTOR512`: 1 MiB areas of 512-byte sectors (2000 hosts).
pub const LSF_ALIGN1M_SECTOR512: u32 = 0x10 | 0x100;
/// `SANLK_RES_ALIGN1M | SANLK_RES_SECTOR512`.
pub const RES_ALIGN1M_SECTOR512: u32 = 0x10 | 0x100;
/// `SANLK_RES_LVER`: the resource's `lver` field is set (acquire only that version's successor).
#[cfg(feature = "testing")] // only the lease benchmark's experiments use it
pub const RES_LVER: u32 = 0x1;
/// `SANLK_RES_SHARED`: a shared-mode lease.
#[cfg(feature = "testing")] // only the lease benchmark's experiments use it
pub const RES_SHARED: u32 = 0x4;
/// `SANLK_RES_ALIGN1M | SANLK_RES_SECTOR4K`: 1 MiB areas of 4096-byte sectors (250 hosts).
#[cfg(feature = "testing")] // only the lease benchmark's experiments use it
pub const RES_ALIGN1M_SECTOR4K: u32 = 0x10 | 0x200;

/// `SANLK_KILLPATH_PID`: append the holder's pid to the killpath arguments.
pub const KILLPATH_PID: u32 = 0x1;
/// `SANLK_ACQUIRE_OWNER_NOWAIT`: fail at once if another host owns the lease.
pub const ACQUIRE_OWNER_NOWAIT: u32 = 0x8;
/// `SANLK_HOST_MASK` and the host states it selects from `sanlk_host.flags`.
pub const HOST_MASK: u32 = 0xF;

/// `struct sanlk_disk`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SanlkDisk {
    pub path: [c_char; PATH_LEN],
    pub offset: u64,
    pub pad1: u32,
    pub pad2: u32,
}

/// `struct sanlk_resource` with its flexible `disks[]` array of length one (Ferry's leases
/// are on one disk).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SanlkResource1 {
    pub lockspace_name: [c_char; NAME_LEN],
    pub name: [c_char; NAME_LEN],
    pub lver: u64,
    pub data64: u64,
    pub data32: u32,
    pub unused: u32,
    pub flags: u32,
    pub num_disks: u32,
    pub disks: [SanlkDisk; 1],
}

/// `struct sanlk_lockspace`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SanlkLockspace {
    pub name: [c_char; NAME_LEN],
    pub host_id: u64,
    pub flags: u32,
    pub host_id_disk: SanlkDisk,
}

/// `struct sanlk_host`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SanlkHost {
    pub host_id: u64,
    pub generation: u64,
    pub timestamp: u64,
    pub io_timeout: u32,
    pub flags: u32,
}

#[link(name = "sanlock_client")]
extern "C" {
    pub fn sanlock_register() -> c_int;
    pub fn sanlock_killpath(sock: c_int, flags: u32, path: *const c_char, args: *mut c_char) -> c_int;
    pub fn sanlock_acquire(
        sock: c_int,
        pid: c_int,
        flags: u32,
        res_count: c_int,
        res_args: *mut *mut SanlkResource1,
        opt_in: *mut libc::c_void,
    ) -> c_int;
    pub fn sanlock_release(
        sock: c_int,
        pid: c_int,
        flags: u32,
        res_count: c_int,
        res_args: *mut *mut SanlkResource1,
    ) -> c_int;
    #[cfg(feature = "testing")] // only the lease benchmark's experiments use it
    pub fn sanlock_convert(sock: c_int, pid: c_int, flags: u32, res: *mut SanlkResource1) -> c_int;
    pub fn sanlock_inquire(
        sock: c_int,
        pid: c_int,
        flags: u32,
        res_count: *mut c_int,
        res_state: *mut *mut c_char,
    ) -> c_int;
    pub fn sanlock_add_lockspace_timeout(ls: *mut SanlkLockspace, flags: u32, io_timeout: u32) -> c_int;
    pub fn sanlock_inq_lockspace(ls: *mut SanlkLockspace, flags: u32) -> c_int;
    pub fn sanlock_rem_lockspace(ls: *mut SanlkLockspace, flags: u32) -> c_int;
    pub fn sanlock_get_hosts(
        ls_name: *const c_char,
        host_id: u64,
        hss: *mut *mut SanlkHost,
        hss_count: *mut c_int,
        flags: u32,
    ) -> c_int;
    pub fn sanlock_write_lockspace(
        ls: *mut SanlkLockspace,
        max_hosts: c_int,
        flags: u32,
        io_timeout: u32,
    ) -> c_int;
    pub fn sanlock_write_resource(
        res: *mut SanlkResource1,
        max_hosts: c_int,
        num_hosts: c_int,
        flags: u32,
    ) -> c_int;
    pub fn sanlock_read_resource(res: *mut SanlkResource1, flags: u32) -> c_int;
    pub fn sanlock_read_resource_owners(
        res: *mut SanlkResource1,
        flags: u32,
        hss: *mut *mut SanlkHost,
        hss_count: *mut c_int,
    ) -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn layouts_match_the_c_headers() {
        assert_eq!((size_of::<SanlkDisk>(), align_of::<SanlkDisk>()), (1040, 8));
        assert_eq!(offset_of!(SanlkDisk, offset), 1024);
        assert_eq!(offset_of!(SanlkDisk, pad2), 1036);
        assert_eq!(offset_of!(SanlkResource1, name), 48);
        assert_eq!(offset_of!(SanlkResource1, lver), 96);
        assert_eq!(offset_of!(SanlkResource1, data64), 104);
        assert_eq!(offset_of!(SanlkResource1, data32), 112);
        assert_eq!(offset_of!(SanlkResource1, flags), 120);
        assert_eq!(offset_of!(SanlkResource1, num_disks), 124);
        assert_eq!(offset_of!(SanlkResource1, disks), 128);
        assert_eq!(size_of::<SanlkResource1>(), 128 + 1040);
        assert_eq!(size_of::<SanlkLockspace>(), 1104);
        assert_eq!(offset_of!(SanlkLockspace, host_id), 48);
        assert_eq!(offset_of!(SanlkLockspace, flags), 56);
        assert_eq!(offset_of!(SanlkLockspace, host_id_disk), 64);
        assert_eq!(size_of::<SanlkHost>(), 32);
        assert_eq!(offset_of!(SanlkHost, io_timeout), 24);
        assert_eq!(offset_of!(SanlkHost, flags), 28);
    }
}
