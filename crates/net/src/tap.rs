//! Tap devices: an existing tap (made by the operator or the host daemon, e.g.
//! `ip tuntap add tap0 mode tap`, enslaved to a bridge) opened for one VM NIC. Ferry never
//! creates one: opening a name that does not exist is an error, not a new device that
//! nothing is connected to.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_NAME: usize = 15;

/// Errors opening or using a tap device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a valid interface name.
    #[error("{0:?} is not a valid interface name (1-15 characters, no '/', ':' or whitespace)")]
    BadName(String),
    /// No interface of that name.
    #[error("tap device {0} does not exist (create it first: ip tuntap add {0} mode tap)")]
    Missing(String),
    /// An interface that is not a tap.
    #[error("network interface {0} is not a tap device")]
    NotTap(String),
    /// Another process has it open.
    #[error("tap device {0} is in use by another process")]
    Busy(String),
    /// Anything else.
    #[error("cannot open tap device {name}")]
    Open {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Checks `name` is a possible interface name.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

/// An open tap device: whole Ethernet frames, no packet-info header, non-blocking.
#[derive(Debug)]
pub struct Tap {
    name: String,
    file: File,
}

impl Tap {
    /// Opens the existing tap device `name`.
    pub fn open(name: &str) -> Result<Self, Error> {
        check_name(name)?;
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(Error::Missing(name.to_owned()));
        }
        if !sys.join("tun_flags").exists() {
            return Err(Error::NotTap(name.to_owned()));
        }
        let open_err = |source| Error::Open { name: name.to_owned(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(open_err)?;
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes back) one ifreq, which lives for the call; the
        // descriptor is ours.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => Error::Busy(name.to_owned()),
                // A tun (not tap) device of that name, or one made with other flags.
                Some(libc::EINVAL) => Error::NotTap(name.to_owned()),
                _ => open_err(e),
            });
        }
        Ok(Self { name: name.to_owned(), file })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one frame. `WouldBlock` if the device's queue is full.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Receives one frame into `buf`. `WouldBlock` if none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("tap0").is_ok());
        for bad in ["", "a/b", "a:b", "a b", "0123456789abcdef", ".", ".."] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    /// Needs root (the suite runs as root): a tap made for the test opens once; the second
    /// open is refused as busy; a missing name and a non-tap interface are refused.
    #[test]
    fn opens_existing_taps_only() {
        let name = format!("fytap{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().map(|s| s.success());
        assert_eq!(ip(&["tuntap", "add", &name, "mode", "tap"]).ok(), Some(true), "ip tuntap add (root?)");
        let r = std::panic::catch_unwind(|| {
            let t = Tap::open(&name).expect("open");
            assert_eq!(t.name(), name);
            assert!(matches!(Tap::open(&name), Err(Error::Busy(_))));
            // Nothing to read yet.
            let mut b = [0u8; 64];
            assert_eq!(t.recv(&mut b).expect_err("empty").kind(), std::io::ErrorKind::WouldBlock);
        });
        let _ = ip(&["link", "del", &name]);
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
        assert!(matches!(Tap::open("fynosuchtap"), Err(Error::Missing(_))));
        assert!(matches!(Tap::open("lo"), Err(Error::NotTap(_))));
    }
}
