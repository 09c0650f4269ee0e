//! How a VMM learns that it must stop, without the library touching the process's signals.
//!
//! The `ferry` binary blocks SIGTERM and SIGINT in its first thread, before any other
//! exists, makes a signalfd for them and hands it over as [`StopSource::signalfd`]. A
//! program embedding the library (a test, a daemon running several VMs) makes a
//! [`StopSource::new`] instead and stops the VMM through its [`StopHandle`]; the process's
//! signal mask is then never touched. Either way the VMM thread watches one descriptor.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// What a stop through a [`StopHandle`] is reported as ([`crate::RunOutcome::Signalled`],
/// `interrupted by signal`): SIGTERM, the signal that asks for the same.
pub const HANDLE_STOP_SIGNAL: i32 = libc::SIGTERM;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A signalfd: each read is one `signalfd_siginfo`.
    Signals,
    /// An eventfd written by a [`StopHandle`].
    Event,
}

/// The descriptor a VMM watches for "stop": readable once a stop was asked for.
#[derive(Debug)]
pub struct StopSource {
    fd: OwnedFd,
    kind: Kind,
}

/// Asks the VMM holding the matching [`StopSource`] to stop (as SIGTERM would).
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<OwnedFd>);

impl StopSource {
    /// A signalfd (non-blocking) for signals the caller has blocked in every thread of the
    /// process: the `ferry` binary's SIGTERM and SIGINT.
    pub fn signalfd(fd: OwnedFd) -> Self {
        Self { fd, kind: Kind::Signals }
    }

    /// A stop source with no signal behind it, and the handle that triggers it.
    pub fn new() -> io::Result<(Self, StopHandle)> {
        // SAFETY: eventfd() has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let handle = StopHandle(Arc::new(fd.try_clone()?));
        Ok((Self { fd, kind: Kind::Event }, handle))
    }

    /// The descriptor and how to read it, for code that polls it.
    pub(crate) fn raw(&self) -> RawStop {
        RawStop { fd: self.fd.as_raw_fd(), kind: self.kind }
    }

    /// A stop asked for since the last read: the signal (see [`HANDLE_STOP_SIGNAL`]).
    pub(crate) fn read(&self) -> Option<i32> {
        self.raw().read()
    }
}

impl AsRawFd for StopSource {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A borrowed [`StopSource`]: its descriptor and kind.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawStop {
    fd: RawFd,
    kind: Kind,
}

impl RawStop {
    /// The descriptor, readable once a stop was asked for.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Another descriptor for the source this one borrows from (a VM built by a receiver
    /// keeps watching it).
    pub fn dup(&self) -> io::Result<StopSource> {
        // SAFETY: a `RawStop` is made from a live `StopSource` and used only while that
        // source lives (by the receiver that borrows it), so the descriptor is open.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        Ok(StopSource { fd: fd.try_clone_to_owned()?, kind: self.kind })
    }

    /// A stop asked for since the last read (non-blocking): the signal number.
    pub fn read(&self) -> Option<i32> {
        match self.kind {
            Kind::Signals => {
                // SAFETY: signalfd_siginfo is plain data.
                let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                let size = std::mem::size_of::<libc::signalfd_siginfo>();
                // SAFETY: reading at most `size` bytes into `info`, which is that large.
                let n =
                    unsafe { libc::read(self.fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
                (n == size as isize).then_some(info.ssi_signo as i32)
            }
            Kind::Event => {
                let mut count = 0u64;
                // SAFETY: reading 8 bytes into a u64 (an eventfd's counter).
                let n = unsafe { libc::read(self.fd, (&mut count as *mut u64).cast(), 8) };
                (n == 8 && count > 0).then_some(HANDLE_STOP_SIGNAL)
            }
        }
    }
}

impl StopHandle {
    /// Asks the VMM to stop: as SIGTERM does for the `ferry` binary, the VM is stopped in
    /// order (a receiver gives up waiting or aborts a migration before its commit).
    pub fn stop(&self) -> io::Result<()> {
        let one = 1u64;
        // SAFETY: writing 8 bytes from a u64 to an eventfd this handle owns.
        let n = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n == 8 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_stops_its_source_once() {
        let (source, handle) = StopSource::new().expect("stop source");
        assert_eq!(source.read(), None);
        handle.stop().expect("stop");
        let copy = source.raw().dup().expect("dup");
        assert_eq!(copy.read(), Some(HANDLE_STOP_SIGNAL));
        assert_eq!(source.read(), None);
    }
}
