//! Delta encoding of re-sent pages (the `delta` feature; the idea of QEMU's XBZRLE).
//!
//! A page sent again in a later pass usually differs in a few bytes from the copy the
//! destination already holds. The source keeps a bounded cache of pages as it sent them
//! ([`SentCache`]); for a page in the cache it sends the difference when that is small,
//! else the whole page, and the cache takes the new copy either way. The destination needs
//! no cache: the page in guest memory *is* the copy the delta applies to, because nothing
//! writes guest memory on the destination before the VM runs there.
//!
//! Pages go in `DeltaPages` frames (the whole payload is checksummed: the sender encodes it
//! into a buffer of its own, unlike `Pages`, whose data goes from guest memory to the
//! socket unread):
//!
//! ```text
//! u32 count
//! count x { u64 address | flags, u16 length, u32 crc-32 of the base page, length bytes }
//! ```
//!
//! Flags: [`ZERO`] (the page is all zeros; length 0), [`FULL`] (length 4096, the page as
//! sent), [`LZ4`] (the page compressed with LZ4's block format, shorter than a page, which
//! must decompress to exactly 4096 bytes; feature `lz4`), none (a delta, at most [`MAX_DELTA`] bytes, against the page the destination
//! holds, whose CRC-32 must be the entry's: a delta against anything else, a replayed or
//! corrupt frame, or a cache that does not mirror the destination, fails the migration
//! instead of writing a wrong page).
//!
//! A delta is a list of `{u16 skip, u16 len, len bytes}`: leave `skip` bytes as they are,
//! then write `len` new ones; what no entry reaches is unchanged. It must stay inside the
//! page and use every byte it has.
//!
//! The mirror rule: the cache holds a page only when the destination's copy is exactly the
//! cached bytes, i.e. the page's last send went through a `DeltaPages` frame (as `FULL`,
//! `ZERO` or a delta) on this migration. Pages sent from guest memory in `Pages` frames
//! (pass 1, zero-copy) are never cached; a page evicted from the cache goes whole next time.
//! Passes do not overlap across streams (the source waits for every stream's `PassAck`), so
//! a page's delta never overtakes the copy it applies to.

use std::collections::{HashMap, VecDeque};

use crate::protocol::PAGE_SIZE;

/// Entry flag: the page is all zeros.
pub const ZERO: u64 = 1;
/// Entry flag: the whole page follows.
pub const FULL: u64 = 2;
/// Entry flag: the page follows compressed (LZ4 block format).
pub const LZ4: u64 = 4;
/// A compressed page is sent only when it is at most this long (else it goes whole).
pub const MAX_COMPRESSED: usize = PAGE_SIZE * 3 / 4;
/// The largest delta sent; a page whose delta is larger goes whole.
pub const MAX_DELTA: usize = PAGE_SIZE / 2;
/// Bytes of an entry before its data.
pub const ENTRY_HEAD: usize = 8 + 2 + 4;

/// What is wrong with a `DeltaPages` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The frame ends inside an entry, or has bytes after the last.
    #[error("a DeltaPages frame is truncated or has trailing bytes")]
    Truncated,
    /// An address that is not page-aligned, or flags that are not defined.
    #[error("a DeltaPages entry has an unaligned address or unknown flags")]
    BadEntry,
    /// A length that does not fit the entry's kind.
    #[error("a DeltaPages entry has a length its kind does not allow")]
    BadLength,
    /// A delta that runs past the end of the page, or has bytes left over.
    #[error("a delta runs past the end of its page")]
    Overrun,
    /// The destination's copy of the page is not the one the delta was made against.
    #[error("a delta does not apply: the destination's copy of the page is not its base")]
    BaseMismatch,
    /// A compressed page that does not decompress to exactly one page.
    #[error("a compressed page does not decompress to exactly 4096 bytes")]
    BadCompressed,
}

/// Compresses `page` into `out` (cleared first); `false` when the result would be longer
/// than [`MAX_COMPRESSED`] (the page goes whole). A page whose first 256 bytes hold more than
/// 200 distinct byte pairs is taken as incompressible without trying (random data, already
/// compressed data): the check costs far less than a failed compression.
pub fn compress(page: &[u8; PAGE_SIZE], out: &mut Vec<u8>) -> bool {
    let mut seen = [0u64; 1024];
    let mut distinct = 0;
    for w in page[..256].windows(2) {
        let k = (usize::from(w[0]) << 8 | usize::from(w[1])) & 0xffff;
        let (word, bit) = (k / 64, 1u64 << (k % 64));
        if seen[word] & bit == 0 {
            seen[word] |= bit;
            distinct += 1;
        }
    }
    if distinct > 200 {
        return false;
    }
    out.clear();
    out.resize(lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 0);
    match lz4_flex::block::compress_into(page, out) {
        Ok(n) if n <= MAX_COMPRESSED => {
            out.truncate(n);
            true
        }
        _ => false,
    }
}

/// Decompresses one page from `data` into `page`; the data must make exactly one page.
pub fn decompress(data: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), DeltaError> {
    match lz4_flex::block::decompress_into(data, page) {
        Ok(PAGE_SIZE) => Ok(()),
        _ => Err(DeltaError::BadCompressed),
    }
}

/// Encodes the difference from `old` to `new` into `out` (cleared first). Returns `false`,
/// with `out` unspecified, when it would be longer than `limit`.
pub fn encode(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], out: &mut Vec<u8>, limit: usize) -> bool {
    out.clear();
    let mut i = 0;
    let mut skip_from = 0;
    while i < PAGE_SIZE {
        // Compare 8 bytes at a time while they agree.
        if i + 8 <= PAGE_SIZE && old[i..i + 8] == new[i..i + 8] {
            i += 8;
            continue;
        }
        if old[i] == new[i] {
            i += 1;
            continue;
        }
        // A changed run: extend it while bytes differ, bridging equal gaps shorter than an
        // entry's header (cheaper to resend them than to start a new entry).
        let start = i;
        let mut end = i + 1;
        let mut j = end;
        while j < PAGE_SIZE {
            if old[j] != new[j] {
                end = j + 1;
                j += 1;
            } else if j - end < 4 {
                j += 1;
            } else {
                break;
            }
        }
        let skip = start - skip_from;
        let len = end - start;
        if out.len() + 4 + len > limit {
            return false;
        }
        out.extend_from_slice(&(skip as u16).to_le_bytes());
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&new[start..end]);
        skip_from = end;
        i = end;
    }
    true
}

/// Applies `delta` to `page` in place. Checks everything before writing anything.
pub fn apply(page: &mut [u8; PAGE_SIZE], delta: &[u8]) -> Result<(), DeltaError> {
    check(delta)?;
    let (mut at, mut pos) = (0usize, 0usize);
    while at < delta.len() {
        let skip = u16::from_le_bytes([delta[at], delta[at + 1]]) as usize;
        let len = u16::from_le_bytes([delta[at + 2], delta[at + 3]]) as usize;
        pos += skip;
        page[pos..pos + len].copy_from_slice(&delta[at + 4..at + 4 + len]);
        pos += len;
        at += 4 + len;
    }
    Ok(())
}

/// Whether `delta` is well formed for one page.
fn check(delta: &[u8]) -> Result<(), DeltaError> {
    let (mut at, mut pos) = (0usize, 0usize);
    while at < delta.len() {
        if delta.len() - at < 4 {
            return Err(DeltaError::Overrun);
        }
        let skip = u16::from_le_bytes([delta[at], delta[at + 1]]) as usize;
        let len = u16::from_le_bytes([delta[at + 2], delta[at + 3]]) as usize;
        pos += skip + len;
        if pos > PAGE_SIZE || delta.len() - at - 4 < len {
            return Err(DeltaError::Overrun);
        }
        at += 4 + len;
    }
    Ok(())
}

/// One entry of a `DeltaPages` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// The page is all zeros.
    Zero(u64),
    /// The whole page.
    Full(u64, &'a [u8]),
    /// The page, compressed ([`decompress`]).
    Lz4(u64, &'a [u8]),
    /// A delta against the page the destination holds, whose CRC-32 is `base_crc`.
    Delta {
        /// The page.
        addr: u64,
        /// CRC-32 of the page it applies to.
        base_crc: u32,
        /// The delta.
        delta: &'a [u8],
    },
}

/// Builds the payload of a `DeltaPages` frame.
#[derive(Debug, Default)]
pub struct DeltaBatch {
    buf: Vec<u8>,
    count: u32,
}

impl DeltaBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self { buf: vec![0; 4], count: 0 }
    }

    /// Entries in it.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds an entry.
    pub fn push(&mut self, e: Entry<'_>) {
        let (addr, crc, data): (u64, u32, &[u8]) = match e {
            Entry::Zero(a) => (a | ZERO, 0, &[]),
            Entry::Full(a, page) => (a | FULL, 0, page),
            Entry::Lz4(a, data) => (a | LZ4, 0, data),
            Entry::Delta { addr, base_crc, delta } => (addr, base_crc, delta),
        };
        self.buf.extend_from_slice(&addr.to_le_bytes());
        self.buf.extend_from_slice(&(data.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    /// The payload (count filled in).
    pub fn payload(&mut self) -> &[u8] {
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        &self.buf
    }

    /// Empties the batch for reuse.
    pub fn clear(&mut self) {
        self.buf.truncate(4);
        self.count = 0;
    }
}

/// Parses a `DeltaPages` payload (already checksummed) into its entries, checking each.
pub fn parse(payload: &[u8]) -> Result<Vec<Entry<'_>>, DeltaError> {
    if payload.len() < 4 {
        return Err(DeltaError::Truncated);
    }
    let count = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    if count > crate::protocol::MAX_PAGES_PER_FRAME {
        return Err(DeltaError::BadLength);
    }
    let mut out = Vec::with_capacity(count);
    let mut at = 4;
    for _ in 0..count {
        let head = payload.get(at..at + ENTRY_HEAD).ok_or(DeltaError::Truncated)?;
        let raw = u64::from_le_bytes(head[..8].try_into().map_err(|_| DeltaError::Truncated)?);
        let len = u16::from_le_bytes([head[8], head[9]]) as usize;
        let crc = u32::from_le_bytes([head[10], head[11], head[12], head[13]]);
        let flags = raw & (PAGE_SIZE as u64 - 1);
        let addr = raw & !(PAGE_SIZE as u64 - 1);
        let data = payload.get(at + ENTRY_HEAD..at + ENTRY_HEAD + len).ok_or(DeltaError::Truncated)?;
        out.push(match flags {
            ZERO if len == 0 => Entry::Zero(addr),
            FULL if len == PAGE_SIZE => Entry::Full(addr, data),
            LZ4 if len > 0 && len < PAGE_SIZE => Entry::Lz4(addr, data),
            0 if len <= MAX_DELTA => {
                check(data)?;
                Entry::Delta { addr, base_crc: crc, delta: data }
            }
            ZERO | FULL | LZ4 | 0 => return Err(DeltaError::BadLength),
            _ => return Err(DeltaError::BadEntry),
        });
        at += ENTRY_HEAD + len;
    }
    if at != payload.len() {
        return Err(DeltaError::Truncated);
    }
    Ok(out)
}

/// The source's copy of pages as the destination holds them, bounded; the oldest entry
/// goes first when it is full.
#[derive(Debug)]
pub struct SentCache {
    pages: HashMap<u64, Box<[u8; PAGE_SIZE]>>,
    order: VecDeque<u64>,
    capacity: usize,
    scratch: Vec<u8>,
    packed: Vec<u8>,
    /// Compress pages that go whole (feature `lz4`).
    compress: bool,
    /// Pages sent as deltas, and their bytes.
    pub delta_pages: u64,
    /// Bytes of those deltas.
    pub delta_bytes: u64,
    /// Pages that went whole (not cached, or a delta too large).
    pub full_pages: u64,
    /// Pages sent compressed.
    pub compressed_pages: u64,
    /// Bytes of those compressed pages.
    pub compressed_bytes: u64,
}

impl SentCache {
    /// A cache of at most `bytes` of pages (0: none; then it only compresses, if asked);
    /// `compress` sends pages that go whole compressed when that makes them shorter.
    pub fn new(bytes: u64, compress: bool) -> Self {
        let capacity = (bytes / PAGE_SIZE as u64) as usize;
        Self {
            pages: HashMap::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::new(),
            capacity,
            scratch: Vec::with_capacity(MAX_DELTA),
            packed: Vec::new(),
            compress,
            delta_pages: 0,
            delta_bytes: 0,
            full_pages: 0,
            compressed_pages: 0,
            compressed_bytes: 0,
        }
    }

    /// Pages it holds.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Adds the page at `addr`, whose bytes are `now` (a copy the caller made, which is what
    /// goes on the wire), to `batch`: as a delta against the cached copy when that is small,
    /// else whole (compressed if asked and shorter) or as a zero marker. The cache takes
    /// `now` as the destination's copy, when `cache_it` (the first pass does not fill it:
    /// most of its pages are never sent again).
    pub fn add(&mut self, batch: &mut DeltaBatch, addr: u64, now: &[u8; PAGE_SIZE], cache_it: bool) {
        let zero = now.iter().all(|&b| b == 0);
        if let Some(old) = self.pages.get_mut(&addr) {
            if !zero && encode(old, now, &mut self.scratch, MAX_DELTA) {
                let base_crc = crc32fast::hash(&old[..]);
                batch.push(Entry::Delta { addr, base_crc, delta: &self.scratch });
                self.delta_pages += 1;
                self.delta_bytes += self.scratch.len() as u64;
                old.copy_from_slice(now);
                return;
            }
            old.copy_from_slice(now);
        } else if cache_it && self.capacity > 0 {
            if self.pages.len() >= self.capacity {
                while let Some(gone) = self.order.pop_front() {
                    if self.pages.remove(&gone).is_some() {
                        break;
                    }
                }
            }
            self.pages.insert(addr, Box::new(*now));
            self.order.push_back(addr);
        }
        if zero {
            batch.push(Entry::Zero(addr));
        } else if self.compress && compress(now, &mut self.packed) {
            batch.push(Entry::Lz4(addr, &self.packed));
            self.compressed_pages += 1;
            self.compressed_bytes += self.packed.len() as u64;
        } else {
            batch.push(Entry::Full(addr, now));
            self.full_pages += 1;
        }
    }

    /// The page at `addr` went (or may have gone) to the destination some other way: its
    /// copy here no longer mirrors the destination's.
    pub fn forget(&mut self, addr: u64) {
        self.pages.remove(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Box<[u8; PAGE_SIZE]> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        p
    }

    #[test]
    fn a_few_changed_bytes_make_a_small_delta_that_applies() {
        let old = page(1);
        let mut new = old.clone();
        new[0] ^= 1;
        new[100..108].copy_from_slice(&7u64.to_le_bytes());
        new[4095] = 0;
        let mut d = Vec::new();
        assert!(encode(&old, &new, &mut d, MAX_DELTA));
        assert!(d.len() < 40, "{} bytes", d.len());
        let mut dst = old.clone();
        apply(&mut dst, &d).expect("applies");
        assert_eq!(dst, new);
    }

    #[test]
    fn an_unchanged_page_is_an_empty_delta_and_a_rewritten_one_too_big() {
        let old = page(3);
        let mut d = vec![9];
        assert!(encode(&old, &old, &mut d, MAX_DELTA));
        assert!(d.is_empty());
        assert!(!encode(&old, &page(4), &mut d, MAX_DELTA));
    }

    #[test]
    fn deltas_that_leave_the_page_or_have_leftovers_are_refused_untouched() {
        let mut p = page(5);
        let before = p.clone();
        let past_end = [0xff, 0x0f, 2, 0, 1, 2]; // skip 4095, write 2
        assert_eq!(apply(&mut p, &past_end), Err(DeltaError::Overrun));
        let short = [0, 0, 8, 0, 1]; // 8 bytes announced, 1 present
        assert_eq!(apply(&mut p, &short), Err(DeltaError::Overrun));
        assert_eq!(apply(&mut p, &[0, 0]), Err(DeltaError::Overrun));
        assert_eq!(p, before);
    }

    #[test]
    fn random_changes_round_trip() {
        let mut seed = 0x1234_5678_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let old = page(next() as u8);
            let mut new = old.clone();
            for _ in 0..(next() % 64) {
                new[(next() % PAGE_SIZE as u64) as usize] = next() as u8;
            }
            let mut d = Vec::new();
            if encode(&old, &new, &mut d, MAX_DELTA) {
                let mut dst = old.clone();
                apply(&mut dst, &d).expect("applies");
                assert_eq!(dst, new);
            }
        }
    }

    #[test]
    fn a_batch_round_trips_and_the_cache_sends_deltas_once_it_holds_a_page() {
        let mut cache = SentCache::new(2 * PAGE_SIZE as u64, false);
        let mut batch = DeltaBatch::new();
        let a = page(1);
        cache.add(&mut batch, 0x1000, &a, true);
        let mut a2 = a.clone();
        a2[10] = 0;
        cache.add(&mut batch, 0x2000, &[0; PAGE_SIZE], true);
        let payload = batch.payload().to_vec();
        let e = parse(&payload).expect("parses");
        assert!(matches!(e[0], Entry::Full(0x1000, d) if d == &a[..]));
        assert_eq!(e[1], Entry::Zero(0x2000));
        batch.clear();
        cache.add(&mut batch, 0x1000, &a2, true);
        let payload = batch.payload().to_vec();
        match parse(&payload).expect("parses")[..] {
            [Entry::Delta { addr: 0x1000, base_crc, delta }] => {
                assert_eq!(base_crc, crc32fast::hash(&a[..]));
                let mut dst = a.clone();
                apply(&mut dst, delta).expect("applies");
                assert_eq!(dst, a2);
            }
            ref other => panic!("{other:?}"),
        }
        assert_eq!((cache.delta_pages, cache.full_pages), (1, 1));
        // Full: the oldest page goes.
        cache.add(&mut batch, 0x3000, &a, true);
        assert_eq!(cache.len(), 2);
        cache.forget(0x3000);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn malformed_frames_are_refused() {
        let mut b = DeltaBatch::new();
        b.push(Entry::Zero(0x1000));
        let good = b.payload().to_vec();
        assert!(parse(&good).is_ok());
        assert_eq!(parse(&good[..good.len() - 1]), Err(DeltaError::Truncated));
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(parse(&extra), Err(DeltaError::Truncated));
        let mut flags = good.clone();
        flags[4] = 8; // unknown flag
        assert_eq!(parse(&flags), Err(DeltaError::BadEntry));
        let mut zero_with_data = DeltaBatch::new();
        zero_with_data.push(Entry::Delta { addr: 0x1000 | ZERO, base_crc: 0, delta: &[0, 0, 1, 0, 5] });
        assert_eq!(parse(zero_with_data.payload()), Err(DeltaError::BadLength));
        let mut too_big = DeltaBatch::new();
        too_big.push(Entry::Delta { addr: 0x1000, base_crc: 0, delta: &[0; MAX_DELTA + 4] });
        assert_eq!(parse(too_big.payload()), Err(DeltaError::BadLength));
        let mut count = good.clone();
        count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&count), Err(DeltaError::BadLength));
    }

    #[test]
    fn pages_that_compress_go_compressed_and_random_ones_whole() {
        let mut text = [0u8; PAGE_SIZE];
        for (i, b) in text.iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
        }
        let mut random = [0u8; PAGE_SIZE];
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut cache = SentCache::new(0, true);
        let mut batch = DeltaBatch::new();
        cache.add(&mut batch, 0x1000, &text, false);
        cache.add(&mut batch, 0x2000, &random, false);
        assert_eq!((cache.compressed_pages, cache.full_pages, cache.len()), (1, 1, 0));
        let payload = batch.payload().to_vec();
        match parse(&payload).expect("parses")[..] {
            [Entry::Lz4(0x1000, data), Entry::Full(0x2000, _)] => {
                assert!(data.len() < 200, "{}", data.len());
                let mut page = [0u8; PAGE_SIZE];
                decompress(data, &mut page).expect("decompresses");
                assert_eq!(page, text);
            }
            ref other => panic!("{other:?}"),
        }
    }

    #[test]
    fn compressed_pages_of_the_wrong_size_are_refused() {
        let mut page = [0u8; PAGE_SIZE];
        let short = lz4_flex::block::compress(&[7u8; 100]);
        assert_eq!(decompress(&short, &mut page), Err(DeltaError::BadCompressed));
        let long = lz4_flex::block::compress(&[7u8; PAGE_SIZE + 1]);
        assert_eq!(decompress(&long, &mut page), Err(DeltaError::BadCompressed));
        assert_eq!(decompress(&[0xff, 0xff, 0xff], &mut page), Err(DeltaError::BadCompressed));
        let mut b = DeltaBatch::new();
        b.push(Entry::Lz4(0x1000, &[0; PAGE_SIZE]));
        assert_eq!(parse(b.payload()), Err(DeltaError::BadLength), "as long as a page: not compressed");
    }
}
