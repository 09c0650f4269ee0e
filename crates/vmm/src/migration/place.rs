//! Placing received pages into guest memory on the destination.
//!
//! The destination's guest memory is fresh anonymous memory: a page the guest never
//! touched does not exist yet. Writing a received page into it the plain way makes the
//! kernel allocate a page, clear it, and then we copy over the cleared bytes: the clearing
//! is pure waste, and on this kind of host it dominated the receiver's profile (65% of its
//! time in `clear_page`). With a userfaultfd registered over guest memory, `UFFDIO_COPY`
//! allocates the page and fills it from our buffer in one step, and takes a whole run of
//! consecutive pages (up to 2 MiB, see [`PageRun`]) per call.
//!
//! Rules that keep this from ever blocking a thread:
//! - the userfaultfd exists only while pages arrive, and only the receiving thread touches
//!   guest memory then (no vCPU runs, nothing restores or hashes);
//! - a page is copied the plain way only when it is known to exist (we placed it before,
//!   or `UFFDIO_COPY` said `EEXIST` for exactly that page), or once the userfaultfd is
//!   closed; any other `UFFDIO_COPY` failure closes it and the rest goes the plain way.
//!
//! Without userfaultfd (not permitted, or an old kernel) pages are copied the plain way.

use ferry_migration::protocol::{self as wire, PageRun, PAGE_SIZE};
use userfaultfd::{Uffd, UffdBuilder};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

const OUTSIDE: wire::Error = wire::Error::BadPages("a page outside guest memory");

/// Places pages into one VM's guest memory; see the module documentation.
#[derive(Debug)]
pub struct Placer<'a> {
    mem: &'a GuestMemory,
    /// Pages that hold data we placed: a zero marker for one of them must clear it; any
    /// other page is still the fresh zero page and costs no host RAM.
    written: Vec<u64>,
    /// Registered (missing mode) over every region while it is `Some`.
    uffd: Option<Uffd>,
    id: &'a str,
}

impl<'a> Placer<'a> {
    /// A placer for `mem`; `id` is the migration's, for the log.
    pub fn new(mem: &'a GuestMemory, id: &'a str) -> Self {
        let top = mem.iter().map(|r| r.last_addr().0 + 1).max().unwrap_or(0);
        let written = vec![0u64; (top / PAGE_SIZE as u64).div_ceil(64) as usize];
        let uffd = match register(mem) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::info!(
                    "migration {id}: userfaultfd not available ({e}); placing pages by plain copy"
                );
                None
            }
        };
        Self { mem, written, uffd, id }
    }

    /// Whether pages go in through userfaultfd.
    pub fn uses_userfaultfd(&self) -> bool {
        self.uffd.is_some()
    }

    /// Places one run of a batch.
    pub fn place(&mut self, run: PageRun<'_>) -> Result<(), wire::Error> {
        match run {
            PageRun::Zero(addr) => {
                let (word, bit) = self.bit(addr)?;
                if self.written[word] & bit != 0 {
                    let zero = [0u8; PAGE_SIZE];
                    self.mem.write_slice(&zero, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
                    self.written[word] &= !bit;
                } else if !self.mem.address_in_range(GuestAddress(addr)) {
                    return Err(OUTSIDE);
                }
                Ok(())
            }
            PageRun::Data { addr, data } => {
                // The whole run must be guest memory before any of it is placed.
                let len = data.len() as u64;
                let end = addr.checked_add(len).ok_or(OUTSIDE)?;
                let mut at = addr;
                while at < end {
                    let r = self.mem.find_region(GuestAddress(at)).ok_or(OUTSIDE)?;
                    at = (r.last_addr().0 + 1).min(end);
                }
                // Split into stretches that are all new or all placed before.
                let mut from = 0usize;
                while from < data.len() {
                    let first = addr + from as u64;
                    let new = !self.is_written(first)?;
                    let mut to = from + PAGE_SIZE;
                    while to < data.len() && self.is_written(addr + to as u64)? != new {
                        to += PAGE_SIZE;
                    }
                    self.place_data(first, &data[from..to], new)?;
                    from = to;
                }
                Ok(())
            }
        }
    }

    fn bit(&self, addr: u64) -> Result<(usize, u64), wire::Error> {
        let pfn = addr / PAGE_SIZE as u64;
        let word = usize::try_from(pfn / 64).map_err(|_| OUTSIDE)?;
        if word >= self.written.len() {
            return Err(OUTSIDE);
        }
        Ok((word, 1 << (pfn % 64)))
    }

    fn is_written(&self, addr: u64) -> Result<bool, wire::Error> {
        let (word, bit) = self.bit(addr)?;
        Ok(self.written[word] & bit != 0)
    }

    fn mark(&mut self, addr: u64, pages: usize) -> Result<(), wire::Error> {
        for p in 0..pages as u64 {
            let (word, bit) = self.bit(addr + p * PAGE_SIZE as u64)?;
            self.written[word] |= bit;
        }
        Ok(())
    }

    /// Places `data` at `addr`: pages all `new` (never placed) or all placed before, inside
    /// guest memory (checked by the caller).
    fn place_data(&mut self, addr: u64, data: &[u8], new: bool) -> Result<(), wire::Error> {
        let pages = data.len() / PAGE_SIZE;
        if new && self.uffd.is_some() {
            // One region holds it: the caller checked every page is guest memory and
            // regions are split at their ends below.
            let mut done = 0usize;
            while done < data.len() {
                let at = addr + done as u64;
                let region = self.mem.find_region(GuestAddress(at)).ok_or(OUTSIDE)?;
                let in_region = (region.last_addr().0 + 1 - at) as usize;
                let chunk = &data[done..done + in_region.min(data.len() - done)];
                if !self.uffd_copy(at, chunk)? {
                    // Page by page: EEXIST names a page that exists, safe to overwrite.
                    for (i, page) in chunk.chunks(PAGE_SIZE).enumerate() {
                        let a = at + (i * PAGE_SIZE) as u64;
                        if self.uffd.is_none() || !self.uffd_copy(a, page)? {
                            self.mem.write_slice(page, GuestAddress(a)).map_err(|_| OUTSIDE)?;
                        }
                    }
                }
                done += chunk.len();
            }
        } else {
            self.mem.write_slice(data, GuestAddress(addr)).map_err(|_| OUTSIDE)?;
        }
        self.mark(addr, pages)
    }

    /// `UFFDIO_COPY` of `data` to `addr` (inside one region). `Ok(false)` if it did not
    /// place everything; after an error other than `EEXIST` the userfaultfd is closed, so
    /// that plain copies are safe from then on.
    fn uffd_copy(&mut self, addr: u64, data: &[u8]) -> Result<bool, wire::Error> {
        let Some(uffd) = &self.uffd else { return Ok(false) };
        let host = self.mem.get_host_address(GuestAddress(addr)).map_err(|_| OUTSIDE)?;
        // SAFETY: `host .. host + data.len()` lies inside one mapped region of guest memory
        // (the callers check the run against the regions), registered with this userfaultfd;
        // `data` is a live slice of that length. UFFDIO_COPY only fills pages that do not
        // exist yet and fails with EEXIST instead of overwriting one; no other thread uses
        // guest memory while pages arrive.
        let r = unsafe { uffd.copy(data.as_ptr().cast(), host.cast(), data.len(), true) };
        match r {
            Ok(n) if n == data.len() => Ok(true),
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => Ok(false),
            Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) if data.len() > PAGE_SIZE => Ok(false),
            other => {
                tracing::warn!(
                    "migration {}: UFFDIO_COPY at {addr:#x} failed ({other:?}); placing the rest by plain copy",
                    self.id
                );
                self.uffd = None;
                Ok(false)
            }
        }
    }
}

/// A userfaultfd registered in missing mode over every region of `mem`.
fn register(mem: &GuestMemory) -> Result<Uffd, userfaultfd::Error> {
    let uffd = UffdBuilder::new().close_on_exec(true).non_blocking(true).create()?;
    for r in mem.iter() {
        let host = r.as_ptr();
        uffd.register(host.cast(), r.len() as usize)?;
    }
    Ok(uffd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    fn read(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let mut v = page(0xee);
        mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
        v
    }

    /// New pages (through UFFDIO_COPY when permitted), pages placed again, zero markers for
    /// placed and untouched pages, and bad runs, which change nothing.
    #[test]
    fn places_runs_and_zero_markers() {
        let mem = crate::memory::create(16 << 20).expect("memory");
        let top = 16u64 << 20;
        {
            let mut p = Placer::new(&mem, "t");
            let run: Vec<u8> = [page(1), page(2), page(3)].concat();
            p.place(PageRun::Data { addr: 0x10_0000, data: &run }).expect("new run");
            // Again over a stretch of placed and new pages: the placed ones by plain copy.
            let run: Vec<u8> = [page(4), page(5), page(6)].concat();
            p.place(PageRun::Data { addr: 0x10_2000, data: &run }).expect("mixed run");
            p.place(PageRun::Zero(0x10_1000)).expect("zero over data");
            p.place(PageRun::Zero(0x20_0000)).expect("zero, untouched");
            // Outside memory, or running off its end: refused before anything is written.
            assert!(p.place(PageRun::Zero(top)).is_err());
            let two: Vec<u8> = [page(7), page(7)].concat();
            assert!(p.place(PageRun::Data { addr: top - 0x1000, data: &two }).is_err());
            assert!(p.place(PageRun::Data { addr: !0xfffu64, data: &two }).is_err());
        }
        // The placer is gone (and its userfaultfd with it): every page reads back.
        assert_eq!(read(&mem, 0x10_0000), page(1));
        assert_eq!(read(&mem, 0x10_1000), page(0));
        assert_eq!(read(&mem, 0x10_2000), page(4));
        assert_eq!(read(&mem, 0x10_3000), page(5));
        assert_eq!(read(&mem, 0x10_4000), page(6));
        assert_eq!(read(&mem, 0x20_0000), page(0));
        assert_eq!(read(&mem, top - 0x1000), page(0));
    }

    /// As root (which the suite requires) the fast path is the one taken.
    #[test]
    fn uses_userfaultfd_as_root() {
        let mem = crate::memory::create(16 << 20).expect("memory");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(Placer::new(&mem, "t").uses_userfaultfd());
        }
    }
}
