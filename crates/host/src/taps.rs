//! Tap devices for VM NICs, made with system calls (no `ip` process): a persistent tap
//! (`TUNSETIFF` + `TUNSETPERSIST` on /dev/net/tun, the flags `ip tuntap add mode tap` uses),
//! put on the port group's bridge (`SIOCBRADDIF`), up (`SIOCSIFFLAGS`); deleted with a
//! netlink `RTM_DELLINK` (which also works while a process still has the tap open). Names
//! come from [`crate::vmdef::tap_name`], so a restarted daemon knows which taps are its own.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `SIOCGIFFLAGS`, `SIOCSIFFLAGS`, `SIOCBRADDIF` (linux/sockios.h; not in libc for glibc).
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Errors making or deleting a tap. Each names the tap and the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a possible interface name.
    #[error("{0:?} is not a valid interface name (1-15 bytes, no '/', ':', whitespace or NUL)")]
    BadName(String),
    /// The port group's bridge is not there.
    #[error("bridge {bridge} of tap {tap} does not exist")]
    NoBridge {
        /// The tap.
        tap: String,
        /// The bridge.
        bridge: String,
    },
    /// A system call failed.
    #[error("tap {tap}: cannot {step}")]
    Sys {
        /// The tap.
        tap: String,
        /// What was being done ("create it", "put it on bridge br0" ...).
        step: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn sys(tap: &str, step: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error + '_ {
    let step = step.into();
    move |source| Error::Sys { tap: tap.to_string(), step, source }
}

/// An ifreq naming `name` (checked: at most IFNAMSIZ - 1 bytes, no NUL).
fn ifreq(name: &str) -> Result<libc::ifreq, Error> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if !ok {
        return Err(Error::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// A socket for interface ioctls.
fn ioctl_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket has no memory arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just made and is owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface index of `name`, if it exists.
fn index_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a NUL-terminated string that lives for the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Makes the persistent tap `name` (it must not exist).
fn make_persistent(name: &str) -> Result<(), Error> {
    let mut req = ifreq(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(sys(name, "open /dev/net/tun"))?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back) one ifreq, which lives for the call; the
    // descriptor is ours.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(sys(name, "create it (TUNSETIFF)")(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument; the descriptor is ours.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(sys(name, "make it persistent (TUNSETPERSIST)")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Puts `name` on `bridge` and sets it up.
fn attach_and_up(name: &str, bridge: &str) -> Result<(), Error> {
    let sock = ioctl_socket().map_err(sys(name, "open a socket for interface requests"))?;
    let index = index_of(name)
        .ok_or_else(|| sys(name, "find its index")(std::io::Error::from_raw_os_error(libc::ENODEV)))?;
    let mut breq = ifreq(bridge)?;
    breq.ifr_ifru.ifru_ifindex = index as libc::c_int;
    // SAFETY: SIOCBRADDIF reads one ifreq (the bridge's name, the port's index), which lives
    // for the call; the socket is ours.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF as _, &mut breq) } < 0 {
        return Err(sys(name, format!("put it on bridge {bridge} (SIOCBRADDIF)"))(
            std::io::Error::last_os_error(),
        ));
    }
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq, which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(sys(name, "read its flags (SIOCGIFFLAGS)")(std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS filled ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one ifreq, which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS as _, &mut req) } < 0 {
        return Err(sys(name, "set it up (SIOCSIFFLAGS)")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes tap `name` on `bridge`, up. A leftover tap of the same name is replaced; on
/// error nothing is left.
pub fn create(name: &str, bridge: &str) -> Result<(), Error> {
    ifreq(name)?;
    if index_of(bridge).is_none() {
        return Err(Error::NoBridge { tap: name.to_string(), bridge: bridge.to_string() });
    }
    if index_of(name).is_some() {
        delete(name);
    }
    make_persistent(name)?;
    let attached = attach_and_up(name, bridge);
    if attached.is_err() {
        delete(name);
    }
    attached
}

/// The netlink request deleting one link: a header and an ifinfomsg.
#[repr(C)]
struct DelLink {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    pad: u8,
    if_type: u16,
    index: i32,
    if_flags: u32,
    change: u32,
}

/// Deletes link `index` with `RTM_DELLINK` and waits for the kernel's answer.
fn del_link(name: &str, index: u32) -> Result<(), Error> {
    // SAFETY: socket has no memory arguments; the result is checked.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(sys(name, "open a netlink socket")(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just made and is owned here only.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = DelLink {
        len: std::mem::size_of::<DelLink>() as u32,
        kind: libc::RTM_DELLINK,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_UNSPEC as u8,
        pad: 0,
        if_type: 0,
        index: index as i32,
        if_flags: 0,
        change: 0,
    };
    // SAFETY: sockaddr_nl is plain data; all zeros (pid 0: the kernel) is valid.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: the request and the address live for the call; their sizes are given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            (&req as *const DelLink).cast(),
            std::mem::size_of::<DelLink>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(sys(name, "send RTM_DELLINK")(std::io::Error::last_os_error()));
    }
    // The answer: a header (16 bytes) then, for NLMSG_ERROR, the error code (0: done).
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf, which lives for the call.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(sys(name, "read the answer to RTM_DELLINK")(e));
        }
        let n = n as usize;
        if n < 20 {
            return Err(sys(name, "read the answer to RTM_DELLINK")(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a netlink answer of {n} bytes"),
            )));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if kind != libc::NLMSG_ERROR as u16 {
            continue;
        }
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return match code {
            0 => Ok(()),
            c => Err(sys(name, "delete it (RTM_DELLINK)")(std::io::Error::from_raw_os_error(-c))),
        };
    }
}

/// Deletes tap `name` if it exists (failures are logged: nothing else can be done).
pub fn delete(name: &str) {
    let Some(index) = index_of(name) else { return };
    match del_link(name, index) {
        Ok(()) => {}
        // Gone meanwhile.
        Err(Error::Sys { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {}
        Err(e) => tracing::warn!("cannot delete tap {name}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "a:b", "a b", "0123456789abcdef"] {
            assert!(matches!(ifreq(bad), Err(Error::BadName(_))), "{bad:?}");
        }
        assert!(ifreq("fttap0").is_ok());
    }

    /// Needs root (the suite runs as root): a tap is made on a bridge, up, and deleted; a
    /// missing bridge is refused with nothing left.
    #[test]
    fn made_on_a_bridge_and_deleted() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let id = std::process::id() % 100_000;
        let (bridge, tap) = (format!("ftbr{id}"), format!("fttp{id}"));
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().map(|s| s.success());
        assert_eq!(ip(&["link", "add", &bridge, "type", "bridge"]).ok(), Some(true));
        let made = create(&tap, &bridge);
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).ok();
        let flags = std::fs::read_to_string(format!("/sys/class/net/{tap}/flags")).unwrap_or_default();
        let tun_flags =
            std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).unwrap_or_default();
        // Made again over a leftover of the same name.
        let again = create(&tap, &bridge);
        delete(&tap);
        let gone = index_of(&tap).is_none();
        let refused = create(&tap, "ftnobridge");
        let _ = ip(&["link", "del", &bridge]);
        made.expect("create");
        again.expect("create over a leftover");
        assert!(master.is_some_and(|m| m.ends_with(&bridge)), "not on the bridge");
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("flags");
        assert_ne!(flags & libc::IFF_UP as u32, 0, "not up");
        let tun_flags =
            u32::from_str_radix(tun_flags.trim().trim_start_matches("0x"), 16).expect("tun flags");
        assert_eq!(
            tun_flags & (libc::IFF_TAP | libc::IFF_NO_PI) as u32,
            (libc::IFF_TAP | libc::IFF_NO_PI) as u32
        );
        assert!(gone, "tap {tap} left behind");
        assert!(matches!(refused, Err(Error::NoBridge { .. })), "{refused:?}");
        assert!(index_of(&tap).is_none());
    }
}
