//! Minimal hand-written FFI to libsanlock_client (sanlock 3.8.5 ABI), no bindgen.
//! Build: rustc -O --edition 2021 sanlock_ffi.rs -l sanlock_client -o sanlock_ffi
//! Demo:  SANLOCK_RUN_DIR=... ./sanlock_ffi LS vm1 /path/leases 0 <hold_s>
use std::ffi::{c_char, c_int, CStr};
use std::os::raw::c_void;

pub const SANLK_NAME_LEN: usize = 48;
pub const SANLK_PATH_LEN: usize = 1024;
pub const SANLK_HELPER_ARGS_LEN: usize = 128;
pub const SANLK_KILLPATH_PID: u32 = 0x1;
pub const SANLK_ACQUIRE_OWNER_NOWAIT: u32 = 0x8;
pub const SANLK_ACQUIRE_IDLIVE: c_int = -243; // sanlock_rv.h

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SanlkDisk { pub path: [c_char; SANLK_PATH_LEN], pub offset: u64, pub pad1: u32, pub pad2: u32 } // 1040 B

#[repr(C)]
pub struct SanlkResource {           // 128 B header + num_disks * SanlkDisk (flexible array)
    pub lockspace_name: [c_char; SANLK_NAME_LEN],
    pub name: [c_char; SANLK_NAME_LEN],
    pub lver: u64, pub data64: u64, pub data32: u32, pub unused: u32,
    pub flags: u32, pub num_disks: u32,
}
/// Resource with exactly one disk, laid out as libsanlock expects.
#[repr(C)]
pub struct SanlkResource1 { pub res: SanlkResource, pub disk: SanlkDisk }

#[repr(C)]
pub struct SanlkLockspace { pub name: [c_char; SANLK_NAME_LEN], pub host_id: u64, pub flags: u32, pub host_id_disk: SanlkDisk } // 1104 B (4 B pad before host_id_disk)

#[link(name = "sanlock_client")]
extern "C" {
    pub fn sanlock_register() -> c_int;
    pub fn sanlock_killpath(sock: c_int, flags: u32, path: *const c_char, args: *mut c_char) -> c_int;
    pub fn sanlock_acquire(sock: c_int, pid: c_int, flags: u32, res_count: c_int,
                           res_args: *mut *mut SanlkResource, opt_in: *mut c_void) -> c_int;
    pub fn sanlock_release(sock: c_int, pid: c_int, flags: u32, res_count: c_int,
                           res_args: *mut *mut SanlkResource) -> c_int;
    pub fn sanlock_inquire(sock: c_int, pid: c_int, flags: u32, res_count: *mut c_int,
                           res_state: *mut *mut c_char) -> c_int;
    pub fn sanlock_add_lockspace_timeout(ls: *mut SanlkLockspace, flags: u32, io_timeout: u32) -> c_int;
    pub fn sanlock_inq_lockspace(ls: *mut SanlkLockspace, flags: u32) -> c_int;
}
extern "C" { fn free(p: *mut c_void); }

fn fill(dst: &mut [c_char], s: &str) { for (d, b) in dst.iter_mut().zip(s.bytes()) { *d = b as c_char; } }

impl SanlkResource1 {
    pub fn new(ls: &str, name: &str, path: &str, offset: u64) -> Box<Self> {
        let mut r: Box<Self> = Box::new(unsafe { std::mem::zeroed() });
        fill(&mut r.res.lockspace_name, ls); fill(&mut r.res.name, name);
        fill(&mut r.disk.path[..SANLK_PATH_LEN - 1], path); r.disk.offset = offset; r.res.num_disks = 1;
        r
    }
}

fn main() {
    assert_eq!(std::mem::size_of::<SanlkDisk>(), 1040);
    assert_eq!(std::mem::size_of::<SanlkResource>(), 128);
    assert_eq!(std::mem::size_of::<SanlkLockspace>(), 1104);
    let a: Vec<String> = std::env::args().collect();
    let (ls, name, path, off, hold) = (&a[1], &a[2], &a[3], a[4].parse().unwrap(), a[5].parse::<u64>().unwrap());
    unsafe {
        let sock = sanlock_register();
        println!("register -> {sock}");
        let mut args = [0 as c_char; SANLK_HELPER_ARGS_LEN]; fill(&mut args, "vm1");
        let kp = b"/work/probe-sanlock/killpath.sh\0";
        println!("killpath -> {}", sanlock_killpath(sock, SANLK_KILLPATH_PID, kp.as_ptr() as _, args.as_mut_ptr()));
        let mut r = SanlkResource1::new(ls, name, path, off);
        let mut p = &mut r.res as *mut SanlkResource;
        let t = std::time::Instant::now();
        let rv = sanlock_acquire(sock, -1, 0, 1, &mut p, std::ptr::null_mut());
        println!("acquire -> {rv} in {:?}; lver now {}", t.elapsed(), r.res.lver);
        let (mut n, mut st): (c_int, *mut c_char) = (0, std::ptr::null_mut());
        let rv2 = sanlock_inquire(sock, -1, 0, &mut n, &mut st);
        if !st.is_null() { println!("inquire -> {rv2} n={n} {}", CStr::from_ptr(st).to_string_lossy()); free(st as _); }
        std::thread::sleep(std::time::Duration::from_secs(hold));
        println!("release -> {}", sanlock_release(sock, -1, 0, 1, &mut p));
    }
}
