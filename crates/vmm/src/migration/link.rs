//! The source's connections to the destination: how every wait on the peer is bounded
//! (the stall bound) and how a cancel interrupts it.
//!
//! - **Cancel**: each socket the migration thread opens is registered in [`Sockets`], which
//!   the VMM thread shares; a cancel shuts all of them down there, so a read, write or
//!   splice blocked in the kernel returns at once. Connecting is interruptible on its own
//!   ([`connect`] polls in 50 ms slices and looks at the cancel flag).
//! - **Stall bound**: writes go through [`Out`], with the socket's send timeout set to a
//!   short [`SLICE`]. A write that cannot go on returns after a slice and [`Progress`] looks
//!   at how far the peer's application has read (the right edge of the window it
//!   advertises): if that has not moved for the stall bound while bytes were waiting, the
//!   write fails with [`Stalled`]. Neither written nor acknowledged bytes would do: a peer
//!   that stopped reading still lets the socket buffers (8 MiB each way, the peer's kernel
//!   acknowledging into its own) absorb seconds of a capped pass before any write blocks,
//!   so a pass also checks before each batch. Reads of answers go through [`In`] (receive timeout [`SLICE`] too): they fail
//!   when neither a byte of the answer came nor one of this side's was acknowledged for
//!   their bound.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a read or write blocks before the stall and cancel checks run.
pub(crate) const SLICE: Duration = Duration::from_millis(200);
/// How often [`connect`] looks at the cancel flag (nothing else can wake it).
const CONNECT_SLICE: Duration = Duration::from_millis(50);

/// The peer made no progress for the stall bound: carried inside an [`io::Error`] of kind
/// `TimedOut` from the write or read that waited, and turned into
/// [`super::Error::Stalled`] by the migration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the destination made no progress for {secs} s while the source was {waiting} (stall timeout)")]
pub struct Stalled {
    /// What the source was doing.
    pub waiting: String,
    /// The bound, in seconds.
    pub secs: f64,
}

impl Stalled {
    pub(crate) fn new(waiting: impl Into<String>, bound: Duration) -> Self {
        Self { waiting: waiting.into(), secs: bound.as_secs_f64() }
    }

    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, self)
    }

    /// The stall inside `e`, if that is what `e` is.
    pub(crate) fn in_io(e: &io::Error) -> Option<&Stalled> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<Stalled>())
    }
}

/// The migration's sockets, shared by the migration thread (which registers each one as
/// it opens it) and the VMM thread (which shuts them all down on a cancel).
#[derive(Debug, Default, Clone)]
pub(crate) struct Sockets(Arc<Mutex<Registry>>);

#[derive(Debug, Default)]
struct Registry {
    open: Vec<TcpStream>,
    shut: bool,
}

impl Sockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `s`: a cancel shuts it down. If a cancel came first, `s` is shut down now.
    pub fn register(&self, s: &TcpStream) -> io::Result<()> {
        let mut r = self.lock();
        if r.shut {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        r.open.push(s.try_clone()?);
        Ok(())
    }

    /// Shuts every registered socket down (and those registered later): whatever blocks on
    /// them returns at once.
    pub fn shut_down(&self) {
        let mut r = self.lock();
        r.shut = true;
        for s in &r.open {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The I/O error of a wait a cancel ended. Not of kind `Interrupted`, which `write_all`
/// and `read_exact` retry.
fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the migration was cancelled")
}

/// Connects to `addr` within `timeout`, giving up within [`CONNECT_SLICE`] of `cancel`
/// being set.
pub(crate) fn connect(addr: &SocketAddr, timeout: Duration, cancel: &AtomicBool) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket() has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid socket address of `len` bytes for the call.
    let rc =
        unsafe { libc::connect(fd.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(cancelled());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection timed out"));
            }
            let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            let ms = left.min(CONNECT_SLICE).as_millis().max(1) as libc::c_int;
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 {
                break;
            }
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one int into `err`, whose size `len` gives.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all zeros is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Offsets in the kernel's `struct tcp_info` (`linux/tcp.h`; the structure only grows).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_SND_WND: usize = 228;

/// How far the peer lets this side send on `fd`: the bytes it acknowledged plus the receive
/// window it advertises (the right edge of the window; Linux 6.2 and later report the
/// window, earlier ones only the acknowledged bytes). The edge moves only when the peer's
/// application reads: a stopped process's kernel still acknowledges what fits into its
/// receive buffer, but each of those acknowledgements shrinks the window by as much. Also
/// whether any written byte still waits for its acknowledgement.
fn window_edge(fd: RawFd) -> io::Result<(u64, bool)> {
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    let mut info = Info([0; 256]);
    let mut len = std::mem::size_of::<Info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`, and sets `len` to how many.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.0.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let field = |at: usize, n: usize| -> u64 {
        let mut b = [0u8; 8];
        if at + n <= len as usize {
            b[..n].copy_from_slice(&info.0[at..at + n]);
        }
        u64::from_ne_bytes(b)
    };
    let edge = field(TCPI_BYTES_ACKED, 8) + field(TCPI_SND_WND, 4);
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int into `outq`.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((edge, outq > 0))
}

/// Watches one socket for the peer's progress: the right edge of its receive window
/// ([`window_edge`]).
#[derive(Debug)]
pub(crate) struct Progress {
    fd: RawFd,
    bound: Duration,
    edge: u64,
    since: Instant,
}

impl Progress {
    /// Starts watching `s` with stall bound `bound`.
    pub fn new(s: &TcpStream, bound: Duration) -> Self {
        let fd = s.as_raw_fd();
        Self { fd, bound, edge: window_edge(fd).map(|(e, _)| e).unwrap_or(0), since: Instant::now() }
    }

    /// The peer did something (sent a byte): the stall clock starts again.
    pub fn reset(&mut self) {
        self.since = Instant::now();
    }

    /// Fails with [`Stalled`] if the peer has taken nothing (its window's right edge has
    /// not moved) for the stall bound. A writer (`idle_ok`) is not stalled while nothing of
    /// its waits for acknowledgement; a reader waiting for an answer is, once the bound
    /// passes without a byte either way.
    pub fn check(&mut self, waiting: &str, idle_ok: bool) -> io::Result<()> {
        let (edge, waits) = window_edge(self.fd)?;
        if edge != self.edge || (idle_ok && !waits) {
            self.edge = edge;
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() >= self.bound {
            return Err(Stalled::new(waiting, self.bound).into_io());
        }
        Ok(())
    }

    /// After a read or write on the socket returned `e`: `Ok` to try again, or the error
    /// to fail with (`e` itself, a stall, or an interruption because of `cancel`).
    pub fn blocked(
        &mut self,
        e: io::Error,
        waiting: &str,
        cancel: &AtomicBool,
        idle_ok: bool,
    ) -> io::Result<()> {
        match e.kind() {
            io::ErrorKind::Interrupted => Ok(()),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(cancelled());
                }
                self.check(waiting, idle_ok)
            }
            _ => Err(e),
        }
    }
}

/// A socket's write side under the stall bound (see the module documentation); the socket's
/// send timeout must be [`SLICE`].
pub(crate) struct Out<'a> {
    stream: &'a TcpStream,
    progress: Progress,
    cancel: &'a AtomicBool,
    waiting: &'a str,
}

impl<'a> Out<'a> {
    /// Writes to `stream` that fail after `bound` without the peer's progress, `waiting`
    /// naming what for in the error.
    pub fn new(stream: &'a TcpStream, bound: Duration, cancel: &'a AtomicBool, waiting: &'a str) -> Self {
        Self { stream, progress: Progress::new(stream, bound), cancel, waiting }
    }
}

impl Write for Out<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.stream).write(buf) {
                Ok(n) => return Ok(n),
                Err(e) => self.progress.blocked(e, self.waiting, self.cancel, true)?,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket's read side for an answer under a bound: it fails when no byte has come and
/// the peer has read none of this side's for that long (so a long queue of this side's
/// data still draining into a slow peer is not a stall). The socket's receive timeout must be
/// [`SLICE`].
pub(crate) struct In<'a> {
    stream: &'a TcpStream,
    progress: Progress,
    cancel: &'a AtomicBool,
    waiting: &'a str,
}

impl<'a> In<'a> {
    /// Reads from `stream` waiting at most `bound` without progress; `waiting` names the
    /// answer in the error.
    pub fn new(stream: &'a TcpStream, bound: Duration, cancel: &'a AtomicBool, waiting: &'a str) -> Self {
        Self { stream, progress: Progress::new(stream, bound), cancel, waiting }
    }
}

impl Read for In<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.stream).read(buf) {
                Ok(n) => {
                    self.progress.reset();
                    return Ok(n);
                }
                Err(e) => self.progress.blocked(e, self.waiting, self.cancel, false)?,
            }
        }
    }
}

/// `e` with a stall inside it (from [`Out`], [`In`] or [`Progress`]) as
/// [`super::Error::Stalled`].
pub(crate) fn typed(e: super::Error) -> super::Error {
    use ferry_migration::protocol::Error as Wire;
    match e {
        super::Error::Protocol(Wire::Io(io)) => match Stalled::in_io(&io) {
            Some(st) => super::Error::Stalled(st.clone()),
            None => super::Error::Protocol(Wire::Io(io)),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A peer that never reads: a write fails with a stall once the buffers are full and
    /// nothing has been acknowledged for the bound; a cancel ends a connect at once.
    #[test]
    fn a_peer_that_stops_reading_stalls_the_writer() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let cancel = AtomicBool::new(false);
        let s = connect(&addr, Duration::from_secs(5), &cancel).expect("connect");
        let (_peer, _) = l.accept().expect("accept");
        s.set_write_timeout(Some(SLICE)).expect("timeout");
        let t = Instant::now();
        let mut out = Out::new(&s, Duration::from_millis(500), &cancel, "sending test data");
        let chunk = vec![7u8; 1 << 20];
        let e = loop {
            if let Err(e) = out.write_all(&chunk) {
                break e;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "never stalled");
        };
        let st = Stalled::in_io(&e).expect("a stall");
        assert_eq!(st.secs, 0.5);
        assert!(st.to_string().contains("while the source was sending test data"), "{st}");
    }

    /// The cancel flag alone (no shutdown) ends a blocked write within a slice or two.
    #[test]
    fn a_cancel_ends_a_blocked_write() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_peer, _) = l.accept().expect("accept");
        s.set_write_timeout(Some(SLICE)).expect("timeout");
        let cancel = std::sync::Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.store(true, Ordering::SeqCst);
        });
        let t = Instant::now();
        let mut out = Out::new(&s, Duration::from_secs(60), &cancel, "sending test data");
        let chunk = vec![7u8; 1 << 20];
        let e = loop {
            if let Err(e) = out.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    /// A peer that never answers: the read fails after its bound, naming what it waited for.
    #[test]
    fn a_peer_that_does_not_answer_stalls_the_reader() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let cancel = AtomicBool::new(false);
        let s = TcpStream::connect(addr).expect("connect");
        let (_peer, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(SLICE)).expect("timeout");
        let t = Instant::now();
        let mut buf = [0u8; 16];
        let e = In::new(&s, Duration::from_millis(600), &cancel, "waiting for Challenge")
            .read_exact(&mut buf)
            .expect_err("no answer");
        assert!(Stalled::in_io(&e).is_some(), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(600) && t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn shutting_the_registry_down_wakes_a_blocked_read() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let s = TcpStream::connect(addr).expect("connect");
        let (_peer, _) = l.accept().expect("accept");
        let sockets = Sockets::default();
        sockets.register(&s).expect("register");
        let t = Instant::now();
        let closer = {
            let sockets = sockets.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                sockets.shut_down();
            })
        };
        let mut buf = [0u8; 4];
        let n = (&s).read(&mut buf).expect("read");
        assert_eq!(n, 0);
        assert!(t.elapsed() < Duration::from_secs(2));
        closer.join().expect("join");
        // Registered after the cancel: shut down at once.
        let s2 = TcpStream::connect(addr).expect("connect");
        sockets.register(&s2).expect("register");
        assert_eq!((&s2).read(&mut buf).expect("read"), 0);
    }

    #[test]
    fn a_cancel_interrupts_a_connect() {
        // A non-routable address (TEST-NET-1): the SYN goes nowhere.
        let addr: SocketAddr = "192.0.2.1:9".parse().expect("addr");
        let cancel = AtomicBool::new(true);
        let t = Instant::now();
        // Cancelled, or refused at once where the host has no route at all.
        assert!(connect(&addr, Duration::from_secs(5), &cancel).is_err(), "connected to TEST-NET-1");
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
