//! Sending guest pages without copying them: `vmsplice` puts references to the guest's
//! own pages into a pipe, `splice` hands them to the socket, and the kernel reads the
//! bytes only when it transmits them (on loopback: when the receiver copies them out).
//!
//! Pre-copy allows this because the guest keeps running anyway: a page the guest writes
//! after it was queued reaches the wire with its newer bytes (or a mix of old and new), and
//! since the write came after the dirty log was read for this pass, the page is in the next
//! pass's dirty set and is sent again. In the stop-and-copy the vCPUs are paused and the
//! bytes cannot change. This is why the frame checksum of a `Pages` frame leaves the page
//! data out (`ferry_migration::protocol`).

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// Pipe sizes to ask for, largest first (a full page batch; unprivileged processes may be
/// capped by `/proc/sys/fs/pipe-max-size`).
const PIPE_SIZES: [i32; 3] = [2 << 20, 1 << 20, 256 << 10];

/// Queues guest memory for one frame and sends it after the frame's head; see the module
/// documentation.
#[derive(Debug)]
pub(crate) struct PageWriter<'m> {
    mem: &'m GuestMemory,
    read: OwnedFd,
    write: OwnedFd,
    /// Host ranges of guest memory queued for the frame being built, merged when adjacent.
    queued: Vec<(usize, usize)>,
}

impl<'m> PageWriter<'m> {
    /// A writer of pages of `mem`, with its own pipe.
    pub fn new(mem: &'m GuestMemory) -> std::io::Result<Self> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given, which has room
        // for two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created by pipe2 and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for size in PIPE_SIZES {
            // SAFETY: F_SETPIPE_SZ on a pipe this function owns; failure leaves it as it was.
            if unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) } >= 0 {
                break;
            }
        }
        Ok(Self { mem, read, write, queued: Vec::new() })
    }

    /// Queues the page at `addr`; false if it is not guest memory.
    pub fn push(&mut self, addr: u64, len: usize) -> bool {
        let Ok(slice) = self.mem.get_slice(GuestAddress(addr), len) else {
            return false;
        };
        let host = slice.ptr_guard().as_ptr() as usize;
        match self.queued.last_mut() {
            Some((start, n)) if *start + *n == host => *n += len,
            _ => self.queued.push((host, len)),
        }
        true
    }

    /// Writes `head` and then every queued byte of guest memory to `sock`, and empties the
    /// queue. A write or splice that fails (a blocking one returns when the socket's send
    /// timeout passes, `splice` included) is handed to `blocked`, which says whether to try
    /// again (`Ok`) or gives the error to fail with.
    pub fn send(
        &mut self,
        sock: &TcpStream,
        head: &[u8],
        blocked: &mut dyn FnMut(std::io::Error) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut writer = sock;
        let mut head = head;
        while !head.is_empty() {
            match writer.write(head) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => head = &head[n..],
                Err(e) => blocked(e)?,
            }
        }
        let mut iov: Vec<libc::iovec> = self
            .queued
            .iter()
            .map(|&(base, len)| libc::iovec { iov_base: base as *mut _, iov_len: len })
            .collect();
        self.queued.clear();
        let mut at = 0usize;
        while at < iov.len() {
            let n = iov.len() - at;
            // SAFETY: the iovecs describe guest memory, mapped for as long as `self.mem`
            // lives (the borrow outlives this call); vmsplice only takes references to those
            // pages (it neither writes them nor keeps the iovec array). The pipe is empty
            // here and SPLICE_F_NONBLOCK keeps a full pipe from blocking.
            let moved = unsafe {
                libc::vmsplice(self.write.as_raw_fd(), iov[at..].as_ptr(), n, libc::SPLICE_F_NONBLOCK)
            };
            if moved < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if moved == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut moved = moved as usize;
            let mut left = moved;
            while left > 0 {
                let len = iov[at].iov_len;
                if left >= len {
                    left -= len;
                    at += 1;
                } else {
                    // SAFETY: advances within the same iovec's range.
                    iov[at].iov_base = unsafe { iov[at].iov_base.cast::<u8>().add(left).cast() };
                    iov[at].iov_len -= left;
                    left = 0;
                }
            }
            let more = if at < iov.len() { libc::SPLICE_F_MORE } else { 0 };
            while moved > 0 {
                // SAFETY: splice between two descriptors this process owns; no user memory
                // is passed.
                let n = unsafe {
                    libc::splice(
                        self.read.as_raw_fd(),
                        std::ptr::null_mut(),
                        sock.as_raw_fd(),
                        std::ptr::null_mut(),
                        moved,
                        libc::SPLICE_F_MOVE | more,
                    )
                };
                match n {
                    n if n > 0 => moved -= n as usize,
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    _ => blocked(std::io::Error::last_os_error())?,
                }
            }
        }
        Ok(())
    }
}

/// Whether the guest page at `addr` is all zeros; `None` if it is not guest memory.
pub(crate) fn page_is_zero(mem: &GuestMemory, addr: u64, page: usize) -> Option<bool> {
    let slice = mem.get_slice(GuestAddress(addr), page).ok()?;
    // Most pages with data show it in the first bytes.
    let mut first = [0u8; 64];
    slice.copy_to(&mut first[..]);
    if !ferry_migration::protocol::is_zero(&first) {
        return Some(false);
    }
    let mut buf = [0u8; 4096];
    let mut off = 0usize;
    while off < page {
        let n = (page - off).min(buf.len());
        let s = slice.subslice(off, n).ok()?;
        s.copy_to(&mut buf[..n]);
        if !ferry_migration::protocol::is_zero(&buf[..n]) {
            return Some(false);
        }
        off += n;
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use vm_memory::Bytes;

    use super::*;

    /// Head and pages arrive in order, adjacent pages merged, across more than a pipe's
    /// worth of data; a page outside memory is refused.
    #[test]
    fn sends_head_then_guest_pages() {
        let mem = crate::memory::create(64 << 20).expect("memory");
        for i in 0..1024u64 {
            mem.write_obj(i, GuestAddress(0x10_0000 + i * 4096)).expect("write");
        }
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let reader = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read");
            all
        });
        let sock = TcpStream::connect(addr).expect("connect");
        let mut w = PageWriter::new(&mem).expect("pipe");
        // 1024 pages (4 MiB, more than a pipe holds), then one more after a gap.
        for i in 0..1024u64 {
            assert!(w.push(0x10_0000 + i * 4096, 4096));
        }
        assert!(w.push(0x90_0000, 4096));
        assert_eq!(w.queued.len(), 2);
        assert!(!w.push(64 << 20, 4096));
        let mut fail =
            |e: std::io::Error| if e.kind() == std::io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        w.send(&sock, b"head", &mut fail).expect("send");
        w.send(&sock, b"tail", &mut fail).expect("send nothing queued");
        drop(sock);
        let all = reader.join().expect("reader");
        assert_eq!(all.len(), 4 + 1025 * 4096 + 4);
        assert_eq!(&all[..4], b"head");
        for i in 0..1024usize {
            let at = 4 + i * 4096;
            assert_eq!(u64::from_le_bytes(all[at..at + 8].try_into().expect("8")), i as u64);
        }
        assert!(all[4 + 1024 * 4096..4 + 1025 * 4096].iter().all(|&b| b == 0));
        assert_eq!(&all[all.len() - 4..], b"tail");
    }

    /// `splice` to a socket honours the socket's send timeout: with a peer that never
    /// reads, the send returns to `blocked` (which the stall bound relies on) instead of
    /// blocking for good.
    #[test]
    fn a_blocked_splice_returns_at_the_send_timeout() {
        let mem = crate::memory::create(64 << 20).expect("memory");
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let sock = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_peer, _) = l.accept().expect("accept");
        sock.set_write_timeout(Some(std::time::Duration::from_millis(100))).expect("timeout");
        let mut w = PageWriter::new(&mem).expect("pipe");
        let mut timeouts = 0;
        let t = std::time::Instant::now();
        let e = loop {
            // 64 MiB a round, far more than both socket buffers hold.
            for i in 0..(64u64 << 20) / 4096 {
                assert!(w.push(i * 4096, 4096));
            }
            let mut blocked = |e: std::io::Error| {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    timeouts += 1;
                }
                Err(e)
            };
            if let Err(e) = w.send(&sock, b"head", &mut blocked) {
                break e;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "the sends never blocked");
        };
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        assert_eq!(timeouts, 1);
    }

    #[test]
    fn zero_pages() {
        let mem = crate::memory::create(16 << 20).expect("memory");
        mem.write_obj(1u8, GuestAddress(0x2000 + 4095)).expect("write");
        mem.write_obj(1u8, GuestAddress(0x3000)).expect("write");
        assert_eq!(page_is_zero(&mem, 0x1000, 4096), Some(true));
        assert_eq!(page_is_zero(&mem, 0x2000, 4096), Some(false));
        assert_eq!(page_is_zero(&mem, 0x3000, 4096), Some(false));
        assert_eq!(page_is_zero(&mem, 16 << 20, 4096), None);
    }
}
