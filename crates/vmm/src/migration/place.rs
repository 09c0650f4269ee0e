//! Placing received pages into guest memory on the destination.
//!
//! Page data is read from the socket straight into guest memory, one run of consecutive
//! pages (up to 2 MiB) per read: the kernel copies it once, from the socket buffer to the
//! guest's page. Guest memory is fresh anonymous memory backed by transparent huge pages
//! (`memory::create`), so the first byte of a 2 MiB stretch makes the kernel allocate and
//! clear one huge page instead of 512 small ones; on this kind of host, first touch of
//! memory is most of the receiver's cost.
//!
//! A zero marker costs nothing for a page that never held data (it still reads as zeros);
//! a page that held data is cleared. Every run is checked against guest memory before a
//! byte of it is read.
//!
//! With several streams, one placer serves them all from their threads: within a pass a
//! page comes once, on one stream, and passes do not overlap (the source waits for every
//! stream's `PassAck`), so no two threads touch the same page; the record of written
//! pages is atomic because neighbouring pages share its words.
//!
//! During the first pass a helper thread may populate guest memory a little ahead of the
//! receive ([`super::populate`]): the placer tells it how far the receive has reached.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_migration::delta::{DeltaError, Entry};
use ferry_migration::protocol::{self as wire, Run, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::populate::Ahead;
use crate::memory::GuestMemory;

const OUTSIDE: wire::Error = wire::Error::BadPages("a page outside guest memory");

/// Places pages into one VM's guest memory; see the module documentation.
#[derive(Debug)]
pub struct Placer<'a> {
    mem: &'a GuestMemory,
    /// Pages that hold data we placed: a zero marker for one of them must clear it; any
    /// other page still reads as zeros and may cost no host RAM.
    written: Vec<AtomicU64>,
    /// Counts what is placed, for a receiving VMM's `GET /vm`.
    progress: Option<&'a super::managed::Status>,
    /// The populate-ahead helper, told where the receive is.
    ahead: Option<&'a Ahead<'a>>,
}

impl<'a> Placer<'a> {
    /// A placer for `mem`.
    pub fn new(mem: &'a GuestMemory) -> Self {
        let top = mem.iter().map(|r| r.last_addr().0 + 1).max().unwrap_or(0);
        let written = (0..(top / PAGE_SIZE as u64).div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { mem, written, progress: None, ahead: None }
    }

    /// The page at `addr` is all zeros.
    pub fn zero(&self, addr: u64) -> Result<(), wire::Error> {
        let (word, bit) = self.bit(addr)?;
        self.reached(addr.saturating_add(PAGE_SIZE as u64));
        if self.written[word].fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
            let zero = [0u8; PAGE_SIZE];
            self.mem.write_slice(&zero, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
        } else if !self.mem.address_in_range(GuestAddress(addr)) {
            return Err(OUTSIDE);
        }
        Ok(())
    }

    /// Reads the data of `pages` pages from `addr` on from `sock` into guest memory.
    pub fn receive(&self, addr: u64, pages: usize, sock: &TcpStream) -> Result<(), wire::Error> {
        let host = self.host_range(addr, pages)?;
        self.reached(addr.saturating_add((pages * PAGE_SIZE) as u64));
        // SAFETY: `host_range` checked that `host .. host + pages * PAGE_SIZE` lies inside
        // one mapped region of guest memory, which lives as long as `self.mem`. Nothing else
        // uses these pages while they arrive (no vCPU runs, nothing restores or hashes, and
        // no other stream carries them in this pass; see the module documentation), and
        // the kernel writes into them as into any buffer. (That last point rests on the
        // source, which is authenticated: frames carry no pass number, so a faulty source
        // that sent one page on two streams at once would have two receives race into it.
        // The page's bytes would be wrong, as they could be from any faulty source; no
        // memory outside guest RAM is at stake.)
        unsafe { recv_exact(sock, host, pages * PAGE_SIZE) }?;
        self.mark(addr, pages)
    }

    /// Places a run whose data is in memory (the receiver reads from the socket with
    /// [`Placer::receive`]).
    #[cfg(test)]
    pub fn place(&self, run: wire::PageRun<'_>) -> Result<(), wire::Error> {
        match run {
            wire::PageRun::Zero(addr) => self.zero(addr),
            wire::PageRun::Data { addr, data } => {
                let pages = data.len() / PAGE_SIZE;
                self.host_range(addr, pages)?;
                self.mem.write_slice(data, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
                self.mark(addr, pages)
            }
        }
    }

    /// Places the pages of a `DeltaPages` frame (payload checked against its checksum):
    /// zero markers, whole pages, and deltas, each applied only if the page here is the one
    /// it was made against (its CRC-32). Returns the pages in it.
    pub fn place_deltas(&self, payload: &[u8]) -> Result<u64, wire::Error> {
        let entries = ferry_migration::delta::parse(payload)?;
        let mut data = 0u64;
        for e in &entries {
            let (Entry::Zero(a) | Entry::Full(a, _) | Entry::Lz4(a, _) | Entry::Delta { addr: a, .. }) = *e;
            self.reached(a.saturating_add(PAGE_SIZE as u64));
            match *e {
                Entry::Zero(addr) => self.zero(addr)?,
                Entry::Full(addr, page) => {
                    self.host_range(addr, 1)?;
                    self.mem.write_slice(page, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
                    self.mark(addr, 1)?;
                    data += 1;
                }
                Entry::Lz4(addr, packed) => {
                    self.host_range(addr, 1)?;
                    let mut page = [0u8; PAGE_SIZE];
                    ferry_migration::delta::decompress(packed, &mut page)?;
                    self.mem.write_slice(&page, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
                    self.mark(addr, 1)?;
                    data += 1;
                }
                Entry::Delta { addr, base_crc, delta } => {
                    self.host_range(addr, 1)?;
                    let mut page = [0u8; PAGE_SIZE];
                    self.mem.read_slice(&mut page, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
                    if crc32fast::hash(&page) != base_crc {
                        return Err(DeltaError::BaseMismatch.into());
                    }
                    ferry_migration::delta::apply(&mut page, delta)?;
                    self.mem.write_slice(&page, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
                    self.mark(addr, 1)?;
                    data += 1;
                }
            }
        }
        if let Some(p) = self.progress {
            p.placed(entries.len() as u64, data);
        }
        Ok(entries.len() as u64)
    }

    /// Counts what is placed in `progress` too.
    pub fn with_progress(self, progress: &'a super::managed::Status) -> Self {
        Self { progress: Some(progress), ..self }
    }

    /// Tells `ahead` how far the receive has reached (from the first page placed on).
    pub fn with_ahead(self, ahead: Option<&'a Ahead<'a>>) -> Self {
        Self { ahead, ..self }
    }

    /// The first pass has ended on a stream: the populate-ahead helper stops (later passes
    /// carry pages the first one populated).
    pub fn first_pass_done(&self) {
        if let Some(a) = self.ahead {
            a.finish();
        }
    }

    /// The receive has reached guest address `end` (exclusive). Only a hint: the helper never
    /// leaves guest memory whatever it is told.
    fn reached(&self, end: u64) {
        if let Some(a) = self.ahead {
            a.reached(end);
        }
    }

    /// Places one run of a batch whose data follows on `sock`.
    pub fn place_run(&self, run: Run, sock: &TcpStream) -> Result<(), wire::Error> {
        let (pages, data) = match run {
            Run::Zero(addr) => {
                self.zero(addr)?;
                (1, 0)
            }
            Run::Data { addr, pages } => {
                self.receive(addr, pages, sock)?;
                (pages as u64, pages as u64)
            }
        };
        if let Some(p) = self.progress {
            p.placed(pages, data);
        }
        Ok(())
    }

    /// The host address of `pages` pages from `addr`, all inside one region of guest memory.
    fn host_range(&self, addr: u64, pages: usize) -> Result<*mut u8, wire::Error> {
        let len = (pages as u64).checked_mul(PAGE_SIZE as u64).ok_or(OUTSIDE)?;
        let end = addr.checked_add(len).ok_or(OUTSIDE)?;
        let region = self.mem.find_region(GuestAddress(addr)).ok_or(OUTSIDE)?;
        if pages == 0 || end - 1 > region.last_addr().0 {
            return Err(OUTSIDE);
        }
        self.bit(end - PAGE_SIZE as u64)?;
        self.mem.get_host_address(GuestAddress(addr)).map_err(|_| OUTSIDE)
    }

    fn bit(&self, addr: u64) -> Result<(usize, u64), wire::Error> {
        let pfn = addr / PAGE_SIZE as u64;
        let word = usize::try_from(pfn / 64).map_err(|_| OUTSIDE)?;
        if word >= self.written.len() {
            return Err(OUTSIDE);
        }
        Ok((word, 1 << (pfn % 64)))
    }

    fn mark(&self, addr: u64, pages: usize) -> Result<(), wire::Error> {
        for p in 0..pages as u64 {
            let (word, bit) = self.bit(addr + p * PAGE_SIZE as u64)?;
            self.written[word].fetch_or(bit, Ordering::AcqRel);
        }
        Ok(())
    }
}

/// Reads exactly `len` bytes from `sock` into `buf`. The socket's read timeout applies to
/// each wait.
///
/// # Safety
///
/// `buf .. buf + len` must be writable memory that nothing else reads or writes meanwhile.
unsafe fn recv_exact(sock: &TcpStream, buf: *mut u8, len: usize) -> Result<(), wire::Error> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: the caller guarantees `buf .. buf + len` is writable and unshared;
        // `buf + done .. buf + len` is inside it.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.add(done).cast(), len - done, libc::MSG_WAITALL) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(wire::Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(wire::Error::Io(e));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;
    use ferry_migration::protocol::PageRun;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    fn read(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let mut v = page(0xee);
        mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
        v
    }

    /// New pages, pages placed again, zero markers for placed and untouched pages, and bad
    /// runs, which change nothing.
    #[test]
    fn places_runs_and_zero_markers() {
        let mem = crate::memory::create(16 << 20).expect("memory");
        let top = 16u64 << 20;
        let p = Placer::new(&mem);
        let run: Vec<u8> = [page(1), page(2), page(3)].concat();
        p.place(PageRun::Data { addr: 0x10_0000, data: &run }).expect("new run");
        let run: Vec<u8> = [page(4), page(5), page(6)].concat();
        p.place(PageRun::Data { addr: 0x10_2000, data: &run }).expect("overlapping run");
        p.place(PageRun::Zero(0x10_1000)).expect("zero over data");
        p.place(PageRun::Zero(0x20_0000)).expect("zero, untouched");
        // Outside memory, or running off its end: refused before anything is written.
        assert!(p.place(PageRun::Zero(top)).is_err());
        let two: Vec<u8> = [page(7), page(7)].concat();
        assert!(p.place(PageRun::Data { addr: top - 0x1000, data: &two }).is_err());
        assert!(p.place(PageRun::Data { addr: !0xfffu64, data: &two }).is_err());
        assert_eq!(read(&mem, 0x10_0000), page(1));
        assert_eq!(read(&mem, 0x10_1000), page(0));
        assert_eq!(read(&mem, 0x10_2000), page(4));
        assert_eq!(read(&mem, 0x10_3000), page(5));
        assert_eq!(read(&mem, 0x10_4000), page(6));
        assert_eq!(read(&mem, 0x20_0000), page(0));
        assert_eq!(read(&mem, top - 0x1000), page(0));
    }

    /// Delta frames as the source's cache makes them apply page by page; a delta against a
    /// page that is not its base (a replayed frame, a cache that does not mirror this side)
    /// is refused and leaves the page as it was.
    #[test]
    fn places_delta_frames_and_refuses_a_delta_against_another_page() {
        use ferry_migration::delta::{DeltaBatch, SentCache};
        let mem = crate::memory::create(16 << 20).expect("memory");
        let p = Placer::new(&mem);
        let mut cache = SentCache::new(1 << 20, false);
        let mut batch = DeltaBatch::new();
        let mut a = [7u8; PAGE_SIZE];
        cache.add(&mut batch, 0x10_0000, &a, true);
        cache.add(&mut batch, 0x10_1000, &[0; PAGE_SIZE], true);
        assert_eq!(p.place_deltas(batch.payload()).expect("whole pages"), 2);
        a[5] = 1;
        batch.clear();
        cache.add(&mut batch, 0x10_0000, &a, true);
        let replay = batch.payload().to_vec();
        assert_eq!(p.place_deltas(&replay).expect("delta"), 1);
        assert_eq!(read(&mem, 0x10_0000), a.to_vec());
        assert_eq!(cache.delta_pages, 1);
        // The same delta again: its base is gone.
        let err = p.place_deltas(&replay).expect_err("replayed delta");
        assert!(
            matches!(err, wire::Error::Delta(ferry_migration::delta::DeltaError::BaseMismatch)),
            "{err:?}"
        );
        assert_eq!(read(&mem, 0x10_0000), a.to_vec());
        // A delta outside guest memory.
        let mut far = DeltaBatch::new();
        far.push(Entry::Delta { addr: 1 << 40, base_crc: 0, delta: &[] });
        assert!(p.place_deltas(far.payload()).is_err());
    }

    /// Runs read from a socket land where they belong; a run outside memory is refused
    /// before anything is read, and a connection that ends mid-run is an error.
    #[test]
    fn receives_runs_from_a_socket() {
        let mem = crate::memory::create(16 << 20).expect("memory");
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let writer = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            let data: Vec<u8> = (0..600u32).flat_map(|i| vec![(i % 251) as u8 + 1; PAGE_SIZE]).collect();
            s.write_all(&data).expect("write");
            s.write_all(&page(9)[..100]).expect("write");
        });
        let (sock, _) = l.accept().expect("accept");
        let p = Placer::new(&mem);
        assert!(p.receive((16 << 20) - 0x1000, 2, &sock).is_err());
        p.receive(0x40_0000, 600, &sock).expect("run");
        p.place_run(Run::Zero(0x40_1000), &sock).expect("zero over a received page");
        writer.join().expect("writer");
        assert!(matches!(p.receive(0x10_0000, 1, &sock), Err(wire::Error::Io(_))));
        assert_eq!(read(&mem, 0x40_0000), page(1));
        assert_eq!(read(&mem, 0x40_1000), page(0));
        assert_eq!(read(&mem, 0x40_0000 + 599 * 0x1000), page((599 % 251) as u8 + 1));
    }

    /// With the populate-ahead helper running beside it, a receive of runs and zero markers
    /// lands the same bytes (populating never overwrites a page), and the helper ends when
    /// the first pass does.
    #[test]
    fn receives_runs_with_the_helper_populating_ahead() {
        use super::super::populate::Ahead;
        let mem = crate::memory::create(64 << 20).expect("memory");
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let pages = 2000u32;
        let writer = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            let data: Vec<u8> = (0..pages).flat_map(|i| vec![(i % 251) as u8 + 1; PAGE_SIZE]).collect();
            s.write_all(&data).expect("write");
        });
        let (sock, _) = l.accept().expect("accept");
        let ahead = Ahead::new(&mem, 4 << 20);
        let p = Placer::new(&mem).with_ahead(Some(&ahead));
        std::thread::scope(|s| {
            let _stop = ahead.finish_on_drop();
            let helper = s.spawn(|| ahead.run());
            // Data in runs of 100 pages from 1 MiB on, a zero marker over every 7th page.
            for run in 0..pages / 100 {
                let at = 0x10_0000 + u64::from(run) * 100 * 0x1000;
                p.receive(at, 100, &sock).expect("run");
                p.zero(at + 7 * 0x1000).expect("zero");
            }
            p.first_pass_done();
            assert!(helper.join().expect("helper").is_ok());
        });
        writer.join().expect("writer");
        for i in 0..pages {
            let at = 0x10_0000 + u64::from(i) * 0x1000;
            let want = if i % 100 == 7 { page(0) } else { page((i % 251) as u8 + 1) };
            assert_eq!(read(&mem, at), want, "page {i}");
        }
        assert_eq!(read(&mem, 0x10_0000 + u64::from(pages) * 0x1000), page(0));
        assert_eq!(read(&mem, 0), page(0));
    }
}
