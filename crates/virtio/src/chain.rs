//! One request's descriptor chain, as the device sees it.
//!
//! The descriptors are read from guest memory exactly once, when the chain is taken from
//! the available ring (the driver could rewrite them while the device works; reading
//! once means the device acts on one consistent view). The device then sees two byte
//! streams: the device-readable buffers end to end, and the device-writable buffers end
//! to end, whatever the driver's framing (virtio 1.x makes no layout promises). Reads and
//! writes of those streams go through `vm-memory`, so every byte the device writes marks
//! the dirty bitmap.

use std::ops::Range;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemory;

/// Errors walking a descriptor chain or accessing its buffers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not even one descriptor could be read: the head index is outside the queue, or the
    /// descriptor table (or an indirect table) is not in guest memory.
    #[error("the descriptor chain is empty: its head is outside the queue or unreadable")]
    Empty,
    /// The chain does not end where it should: it loops, is longer than the queue (or its
    /// indirect table), points past the table, or adds up to more than 4 GiB.
    #[error("the descriptor chain does not terminate (a loop, a next index out of range, or over 4 GiB)")]
    Unterminated,
    /// An access beyond the end of the readable or writable stream.
    #[error("bytes {offset}..{offset}+{len} are beyond the {available} bytes of the chain's buffers")]
    OutOfBounds {
        /// Offset in the stream.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Length of the stream.
        available: u64,
    },
    /// A buffer's address plus offset overflows 64 bits.
    #[error("a buffer of the descriptor chain wraps around the guest address space")]
    AddressOverflow,
    /// A buffer is not (entirely) in guest memory.
    #[error("a buffer of the descriptor chain is outside guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// A descriptor chain split into its device-readable and device-writable buffers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    in_memory: bool,
}

impl Chain {
    /// Reads the whole chain starting at `chain`'s head (following an indirect table if
    /// there is one). Fails if the chain is empty or does not terminate; buffers outside
    /// guest memory are not an error here (see [`Chain::in_memory`]), since the device
    /// can still answer such a request with an error status.
    pub(crate) fn collect(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Result<Self, Error> {
        let mut out = Chain { head: chain.head_index(), in_memory: true, ..Chain::default() };
        let mut last_has_next = None;
        // `virtio-queue` bounds the walk: at most the queue's size (or the indirect
        // table's) descriptors, and at most 4 GiB in all. It ends the iteration early,
        // silently, on a loop, a bad index or an unreadable descriptor: then the last
        // descriptor still says another one follows.
        for desc in chain {
            last_has_next = Some(desc.has_next());
            let seg = Segment { addr: desc.addr(), len: desc.len() };
            if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize) {
                out.in_memory = false;
            }
            if desc.is_write_only() {
                out.writable_len += u64::from(seg.len);
                out.writable.push(seg);
            } else {
                out.readable_len += u64::from(seg.len);
                out.readable.push(seg);
            }
        }
        match last_has_next {
            None => Err(Error::Empty),
            Some(true) => Err(Error::Unterminated),
            Some(false) => Ok(out),
        }
    }

    /// The index of the chain's first descriptor (the id of its used-ring element).
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// Total length of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Whether every buffer lies entirely in guest memory. If not, some reads or writes
    /// of the chain fail; a device checks this before acting on a request, so that it
    /// does not, say, write a disk and then fail to report it.
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Reads `buf.len()` bytes of the readable stream starting at `offset`.
    pub fn read_at(&self, mem: &GuestMemory, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        for_each_piece(&self.readable, self.readable_len, offset, buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr).map_err(Error::Memory)
        })
    }

    /// Writes `buf` into the writable stream starting at `offset`.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> Result<(), Error> {
        for_each_piece(&self.writable, self.writable_len, offset, buf.len(), |addr, range| {
            mem.write_slice(&buf[range], addr).map_err(Error::Memory)
        })
    }
}

/// Calls `f(guest address, range of the caller's buffer)` for each piece of the stream
/// `segs` (of total length `total`) that `offset..offset+len` covers, in order.
fn for_each_piece(
    segs: &[Segment],
    total: u64,
    offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, Range<usize>) -> Result<(), Error>,
) -> Result<(), Error> {
    let out_of_bounds = Error::OutOfBounds { offset, len, available: total };
    match offset.checked_add(len as u64) {
        Some(end) if end <= total => {}
        _ => return Err(out_of_bounds),
    }
    let mut done = 0usize;
    let mut seg_start = 0u64;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_end = seg_start + u64::from(seg.len);
        let pos = offset + done as u64;
        if pos < seg_end {
            let within = pos - seg_start;
            // At most `len - done`, which is a usize.
            let n = (seg_end - pos).min((len - done) as u64) as usize;
            let addr = seg.addr.checked_add(within).ok_or(Error::AddressOverflow)?;
            f(addr, done..done + n)?;
            done += n;
        }
        seg_start = seg_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(readable: &[(u64, u32)], writable: &[(u64, u32)]) -> Chain {
        let seg = |&(a, l): &(u64, u32)| Segment { addr: GuestAddress(a), len: l };
        Chain {
            head: 0,
            readable: readable.iter().map(seg).collect(),
            writable: writable.iter().map(seg).collect(),
            readable_len: readable.iter().map(|s| u64::from(s.1)).sum(),
            writable_len: writable.iter().map(|s| u64::from(s.1)).sum(),
            in_memory: true,
        }
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory")
    }

    #[test]
    fn streams_span_segments() {
        let mem = memory();
        mem.write_slice(b"abc", GuestAddress(0x100)).expect("write");
        mem.write_slice(b"", GuestAddress(0x200)).expect("write");
        mem.write_slice(b"defgh", GuestAddress(0x300)).expect("write");
        let c = chain(&[(0x100, 3), (0x200, 0), (0x300, 5)], &[(0x1000, 2), (0x2000, 4)]);
        assert_eq!(c.readable_len(), 8);
        let mut buf = [0u8; 4];
        c.read_at(&mem, 2, &mut buf).expect("read");
        assert_eq!(&buf, b"cdef");
        c.write_at(&mem, 1, b"WXYZ").expect("write");
        let mut a = [0u8; 2];
        mem.read_slice(&mut a, GuestAddress(0x1000)).expect("read");
        assert_eq!(a[1], b'W');
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x2000)).expect("read");
        assert_eq!(&b[..3], b"XYZ");
        assert!(matches!(c.write_at(&mem, 5, b"ab"), Err(Error::OutOfBounds { .. })));
        c.write_at(&mem, 4, b"ab").expect("up to the end");
        assert!(matches!(c.read_at(&mem, u64::MAX, &mut buf), Err(Error::OutOfBounds { .. })));
        // Zero-length accesses at the end are fine.
        c.write_at(&mem, 6, b"").expect("empty write");
    }

    #[test]
    fn buffers_outside_memory_fail_cleanly() {
        let mem = memory();
        let c = chain(&[(0xfff0, 0x20)], &[(u64::MAX - 1, 4)]);
        let mut buf = [0u8; 0x20];
        assert!(matches!(c.read_at(&mem, 0, &mut buf), Err(Error::Memory(_))));
        assert!(matches!(c.write_at(&mem, 3, b"x"), Err(Error::AddressOverflow)));
    }
}
