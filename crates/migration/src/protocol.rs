//! The migration wire protocol, version 2.
//!
//! Every message is a frame:
//!
//! ```text
//! offset size
//!      0    4  magic "FMIG"
//!      4    2  message kind (little endian)
//!      6    2  flags, zero in version 2
//!      8    4  payload length
//!     12    4  CRC-32 (IEEE) of the payload; for `Pages`, of its count and entries only
//!     16    -  payload
//! ```
//!
//! Each kind has its own payload bound ([`Kind::max_payload`]); a frame that claims more,
//! an unknown kind, non-zero flags, a bad magic or checksum ends the migration. Control
//! messages carry JSON; memory travels in binary `Pages` batches ([`PageBatch`]).
//!
//! Version 2 differs from version 1 only there: the data of a `Pages` frame is sent straight
//! from guest memory while the guest runs (the sender never copies it), so it can change
//! between the sender's checksum and the wire. The checksum covers what must never be wrong
//! (the count and the addresses); page data is covered by TCP's checksum on the way and, end
//! to end, by `--verify`. A page the guest changed in flight was dirtied after the dirty log
//! was read, so a later pass sends it again.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub use crate::outcome::{Check, ReasonCode};

/// Frame magic.
pub const MAGIC: &[u8; 4] = b"FMIG";
/// Protocol version this Ferry speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// Frame header size.
pub const HEADER_LEN: usize = 16;
/// Guest page size on the wire.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: usize = 512;
/// Flag in a page entry's address: the page is all zeros and has no data.
pub const ZERO_PAGE: u64 = 1;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed or closed.
    #[error("the migration connection failed")]
    Io(#[from] std::io::Error),
    /// Not a frame.
    #[error("the peer sent something that is not a Ferry migration frame (bad magic)")]
    BadMagic,
    /// Unknown kind.
    #[error("the peer sent an unknown message kind {0}")]
    UnknownKind(u16),
    /// Flags set that this version does not define.
    #[error("the peer sent a {kind:?} message with unknown flags {flags:#x}")]
    BadFlags {
        /// The kind.
        kind: Kind,
        /// The flags.
        flags: u16,
    },
    /// Payload larger than the kind allows.
    #[error("the peer sent a {kind:?} message of {len} bytes; at most {max} are allowed")]
    TooLarge {
        /// The kind.
        kind: Kind,
        /// Claimed length.
        len: u32,
        /// Bound.
        max: u32,
    },
    /// Checksum mismatch.
    #[error("a {0:?} message arrived corrupted (checksum mismatch)")]
    BadChecksum(Kind),
    /// A `DeltaPages` frame is malformed, or a delta does not apply.
    #[error("bad DeltaPages frame")]
    Delta(#[from] crate::delta::DeltaError),
    /// JSON payload does not parse.
    #[error("the peer sent a malformed {kind:?} message")]
    Json {
        /// The kind.
        kind: Kind,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Binary page batch malformed.
    #[error("the peer sent a malformed page batch: {0}")]
    BadPages(&'static str),
    /// The peer aborted the migration: its reason, and its code ([`ReasonCode::Unknown`]
    /// from an older peer).
    #[error("the peer aborted the migration: {reason}")]
    PeerAborted {
        /// The peer's sentence.
        reason: String,
        /// The peer's code.
        code: ReasonCode,
    },
    /// A message that has no place at this point of the protocol.
    #[error("the peer sent {got:?} where {expected} was expected")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What the state machine wanted.
        expected: &'static str,
    },
}

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Sender -> receiver: protocol version, migration id.
    Hello = 1,
    /// Receiver -> sender: a nonce to prove the shared key with.
    Challenge = 2,
    /// Sender -> receiver: HMAC of the nonce.
    ChallengeResponse = 3,
    /// Sender -> receiver: the VM's configuration, for the pre-migration checks.
    Config = 4,
    /// Receiver -> sender: checks passed, VM reserved.
    Accept = 5,
    /// Either way: the migration is refused or aborted, with the reason.
    Abort = 6,
    /// Sender -> receiver: a batch of pages.
    Pages = 7,
    /// Sender -> receiver: a pre-copy pass ended.
    PassEnd = 8,
    /// Sender -> receiver: the checkpoint state at the switchover.
    State = 9,
    /// Sender -> receiver: the memory hash (with --verify).
    Verify = 10,
    /// Receiver -> sender: restore succeeded (RESTORE_OK) or failed (RESTORE_FAILED).
    RestoreResult = 11,
    /// Sender -> receiver: the source has stopped for good and released the VM's lock.
    Commit = 12,
    /// Receiver -> sender: the VM runs on the destination.
    Activated = 13,
    /// Receiver -> sender: every page of a pass is in guest memory.
    PassAck = 14,
    /// Sender -> receiver: pages of a later pass, whole or as deltas against the copy the
    /// receiver holds (the `delta` feature; [`crate::delta`]).
    DeltaPages = 15,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => ChallengeResponse,
            4 => Config,
            5 => Accept,
            6 => Abort,
            7 => Pages,
            8 => PassEnd,
            9 => State,
            10 => Verify,
            11 => RestoreResult,
            12 => Commit,
            13 => Activated,
            14 => PassAck,
            15 => DeltaPages,
            _ => return None,
        })
    }

    /// The largest payload this kind may carry.
    pub fn max_payload(self) -> u32 {
        match self {
            Kind::Pages => (4 + MAX_PAGES_PER_FRAME * (8 + PAGE_SIZE)) as u32,
            Kind::DeltaPages => (4 + MAX_PAGES_PER_FRAME * (crate::delta::ENTRY_HEAD + PAGE_SIZE)) as u32,
            Kind::State => 64 << 20,
            Kind::Config | Kind::Verify => 1 << 20,
            Kind::Abort | Kind::RestoreResult => 64 << 10,
            _ => 4 << 10,
        }
    }
}

/// One received frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its payload, checked against the kind's bound and the checksum.
    pub payload: Vec<u8>,
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> Result<(), Error> {
    let len =
        u32::try_from(payload.len()).ok().filter(|&l| l <= kind.max_payload()).ok_or(Error::TooLarge {
            kind,
            len: payload.len().min(u32::MAX as usize) as u32,
            max: kind.max_payload(),
        })?;
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header[12..16].copy_from_slice(&checksum(kind, payload).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)?;
    Ok(())
}

/// The part of a payload the frame checksum covers: all of it, but for `Pages` only the
/// count and the entries (as many as the count claims and the payload holds).
fn checked_part(kind: Kind, payload: &[u8]) -> &[u8] {
    if kind != Kind::Pages || payload.len() < 4 {
        return payload;
    }
    let count = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    let end = count.min(MAX_PAGES_PER_FRAME).saturating_mul(8).saturating_add(4);
    &payload[..end.min(payload.len())]
}

/// The frame checksum of `payload` as a `kind` message.
fn checksum(kind: Kind, payload: &[u8]) -> u32 {
    crc32fast::hash(checked_part(kind, payload))
}

/// Reads one frame, checking magic, kind, flags, the kind's bound and the checksum before
/// allocating for the payload.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, Error> {
    let mut payload = Vec::new();
    let kind = read_frame_into(r, &mut payload)?;
    Ok(Frame { kind, payload })
}

/// Encodes a control message as a frame payload.
pub fn to_json<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_vec(msg).unwrap_or_default()
}
impl Error {
    /// How this ends a migration: the connection's loss, the peer's own code (`unknown`
    /// from an older peer), or a broken protocol.
    pub fn code(&self) -> ReasonCode {
        match self {
            Error::Io(_) => ReasonCode::ConnectionLost,
            Error::PeerAborted { code, .. } => *code,
            _ => ReasonCode::ProtocolError,
        }
    }
}

impl Frame {
    /// Parses the payload of a control message of kind `kind`.
    pub fn json<T: for<'de> Deserialize<'de>>(&self, kind: Kind, expected: &'static str) -> Result<T, Error> {
        parse_json(self.kind, &self.payload, kind, expected)
    }
}

/// Parses the payload of a control message that arrived as `got` where `want` was
/// expected. An `Abort` becomes [`Error::PeerAborted`] with the peer's reason.
pub fn parse_json<T: for<'de> Deserialize<'de>>(
    got: Kind,
    payload: &[u8],
    want: Kind,
    expected: &'static str,
) -> Result<T, Error> {
    if got == Kind::Abort && want != Kind::Abort {
        let abort: Abort =
            serde_json::from_slice(payload).map_err(|source| Error::Json { kind: Kind::Abort, source })?;
        return Err(Error::PeerAborted { reason: abort.reason, code: abort.code });
    }
    if got != want {
        return Err(Error::Unexpected { got, expected });
    }
    serde_json::from_slice(payload).map_err(|source| Error::Json { kind: want, source })
}

/// `Hello`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version.
    pub protocol_version: u32,
    /// The migration id, made by the source and logged on both sides.
    pub migration_id: String,
    /// The sender's Ferry version.
    pub ferry_version: String,
    /// Hex nonce for the receiver to prove the key with.
    #[serde(default)]
    pub nonce: String,
    /// Which stream of the migration this connection is: 0 for the first (control and
    /// pages), 1.. for the extra page streams that join after `Accept`.
    #[serde(default)]
    pub stream: u32,
    /// What this connection carries (absent from the previous release: pages).
    #[serde(default)]
    pub role: StreamRole,
    /// Optional features the sender can use ([`FEATURES`]); the receiver answers with
    /// those it accepts in its [`Challenge`]. A new kind of encoding or stream is a feature
    /// negotiated here, not a new protocol version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// What a migration connection carries. The role is named in every Hello, so that new
/// kinds of streams (disk blocks, post-copy page requests) join a migration as a
/// negotiated role, not a new protocol.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StreamRole {
    /// Guest memory pages (and, on stream 0, the control messages and the state).
    #[default]
    Pages,
    /// A role this Ferry does not know (a newer peer's): refused.
    #[serde(other)]
    Unknown,
}

/// The optional features this Ferry offers and accepts in a Hello:
/// - `generation`: the destination runs the State only while it is the VM's newest
///   generation (docs/migration.md, "The arbiter"); a source warns when the destination
///   does not accept it (an older Ferry that cannot refuse a stale copy);
/// - `reason_codes`: Abort and RestoreResult carry a reason code;
/// - `stall_bound`: the destination bounds its waits by the source's stall bound;
/// - `delta`: pages of later passes may come in `DeltaPages` frames ([`crate::delta`]);
/// - `lz4`: pages in `DeltaPages` frames may come compressed, and pass 1 may come in them.
pub const FEATURES: &[&str] = &["generation", "reason_codes", "stall_bound", "delta", "lz4"];

/// The features of `offered` that this Ferry also has, in [`FEATURES`]' order.
pub fn accept_features(offered: &[String]) -> Vec<String> {
    FEATURES.iter().filter(|f| offered.iter().any(|o| o == *f)).map(|f| f.to_string()).collect()
}

/// The identity an extra stream proves the key over: the migration id and the stream
/// number, so that no stream's proof can be replayed as another's.
pub fn stream_id(migration_id: &str, stream: u32) -> String {
    if stream == 0 {
        migration_id.to_string()
    } else {
        format!("{migration_id}#{stream}")
    }
}

/// `Challenge`: the receiver's nonce for the sender to prove the key with, and the
/// receiver's own proof over the sender's nonce (see [`crate::auth`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Challenge {
    /// Hex nonce.
    pub nonce: String,
    /// Hex HMAC proving the receiver knows the key.
    pub proof: String,
    /// The features of the Hello that the receiver accepts (absent from the previous
    /// release: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// `ChallengeResponse`: the sender's proof over the receiver's nonce.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChallengeResponse {
    /// Hex HMAC.
    pub proof: String,
}

/// `Accept`: the pre-migration checks passed and the VM is reserved.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Accept {
    /// The receiver's Ferry version.
    pub ferry_version: String,
}

/// `PassEnd`: the pages of one pass have all been sent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PassEnd {
    /// Pass number, from 1; the stop-and-copy pass is the last.
    pub pass: u32,
    /// Pages sent in it.
    pub pages: u64,
}

/// `PassAck`: the receiver has placed every page of a pass. The sender times a pass up to
/// this answer, so its bandwidth figure is what reached the destination rather than what
/// fit into socket buffers, and nothing of the last pre-copy pass is still in flight when
/// the guest is paused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PassAck {
    /// The pass.
    pub pass: u32,
    /// Pages placed in it.
    pub pages: u64,
}

/// `Verify`: CRC-32 of each `chunk_bytes` of guest memory, regions in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verify {
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// One checksum per chunk.
    pub crcs: Vec<u32>,
}

/// `RestoreResult`: RESTORE_OK (`ok`) or RESTORE_FAILED with the reason and its code.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreResult {
    /// Whether the destination restored the VM (its vCPUs wait for the commit).
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub reason: String,
    /// Why not, as a code (`restore_failed`, `verify_mismatch`, ...). Older destinations
    /// send none: a failed RestoreResult without a code is `restore_failed`.
    #[serde(default, skip_serializing_if = "ReasonCode::is_unknown")]
    pub code: ReasonCode,
}

/// `Commit`: the source has stopped for good and released the VM's lock.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Commit {}

/// `Activated`: the destination holds the lock and its vCPUs run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Activated {
    /// `CLOCK_MONOTONIC` ns (destination clock) between receiving Commit and starting the
    /// vCPUs; for the downtime figure.
    pub activation_ns: u64,
}

/// `Abort`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Abort {
    /// Why, in a sentence for people.
    pub reason: String,
    /// Why, as a code for programs. Older peers send none ([`ReasonCode::Unknown`]): the
    /// reader derives what it can from where the Abort came, never from `reason`.
    #[serde(default, skip_serializing_if = "ReasonCode::is_unknown")]
    pub code: ReasonCode,
}

impl Abort {
    /// An Abort with `reason` and `code`.
    pub fn new(reason: impl Into<String>, code: ReasonCode) -> Self {
        Self { reason: reason.into(), code }
    }
}

/// Encodes a page batch: `entries` are (address, page bytes); zero pages become markers.
/// (The sender builds a [`PageBatch`] over guest memory instead; this is for tests and
/// tools that hold pages in buffers.)
pub fn encode_pages<'a>(
    entries: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let mut batch = PageBatch::new();
    let mut data = Vec::new();
    for (addr, page) in entries {
        if page.len() != PAGE_SIZE {
            return Err(Error::BadPages("a page is not 4096 bytes"));
        }
        if is_zero(page) {
            batch.push_zero(addr)?;
        } else {
            batch.push_data(addr)?;
            data.extend_from_slice(page);
        }
    }
    out.clear();
    out.extend_from_slice(&batch.finish()[HEADER_LEN..]);
    out.extend_from_slice(&data);
    Ok(())
}

/// The frame header, count and entries of a `Pages` batch, built page by page. The payload
/// is
///
/// ```text
/// count: u32 (at most MAX_PAGES_PER_FRAME)
/// count x u64: guest-physical address, page-aligned; bit 0 (ZERO_PAGE) = all zeros, no data
/// the 4096 bytes of every page without ZERO_PAGE, in entry order, back to back
/// ```
///
/// The batch holds no page data: the sender writes [`PageBatch::finish`]'s bytes and then
/// the data pages straight from guest memory, in entry order. Data is contiguous so that
/// the receiver can read a run of consecutive pages into guest memory with one call.
#[derive(Debug)]
pub struct PageBatch {
    /// Frame header, count, entries.
    head: Vec<u8>,
    count: u32,
    data_pages: u32,
}

impl Default for PageBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PageBatch {
    /// An empty batch with room for a full frame.
    pub fn new() -> Self {
        let mut head = Vec::with_capacity(HEADER_LEN + 4 + 8 * MAX_PAGES_PER_FRAME);
        head.resize(HEADER_LEN + 4, 0);
        Self { head, count: 0, data_pages: 0 }
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether another page would not fit.
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_PAGES_PER_FRAME
    }

    /// Zero pages in the batch (sent as markers).
    pub fn zero_pages(&self) -> u64 {
        u64::from(self.count - self.data_pages)
    }

    /// Bytes of page data that follow the head on the wire.
    pub fn data_len(&self) -> usize {
        self.data_pages as usize * PAGE_SIZE
    }

    fn push(&mut self, entry: u64) -> Result<(), Error> {
        if self.is_full() {
            return Err(Error::BadPages("too many pages for one frame"));
        }
        if entry & (PAGE_SIZE as u64 - 1) & !ZERO_PAGE != 0 {
            return Err(Error::BadPages("unaligned page"));
        }
        self.head.extend_from_slice(&entry.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// Adds the page at `addr` with its data (which the sender writes after the head).
    pub fn push_data(&mut self, addr: u64) -> Result<(), Error> {
        if addr & ZERO_PAGE != 0 {
            return Err(Error::BadPages("unaligned page"));
        }
        self.push(addr)?;
        self.data_pages += 1;
        Ok(())
    }

    /// Adds the page at `addr` as a zero marker (no data).
    pub fn push_zero(&mut self, addr: u64) -> Result<(), Error> {
        if addr & ZERO_PAGE != 0 {
            return Err(Error::BadPages("unaligned page"));
        }
        self.push(addr | ZERO_PAGE)
    }

    /// Fills in the frame header and returns header, count and entries: the bytes to write
    /// before the [`PageBatch::data_len`] bytes of page data.
    pub fn finish(&mut self) -> &[u8] {
        let payload_len = (self.head.len() - HEADER_LEN + self.data_len()) as u32;
        self.head[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.head[HEADER_LEN..]);
        self.head[..4].copy_from_slice(MAGIC);
        self.head[4..6].copy_from_slice(&(Kind::Pages as u16).to_le_bytes());
        self.head[6..8].copy_from_slice(&[0, 0]);
        self.head[8..12].copy_from_slice(&payload_len.to_le_bytes());
        self.head[12..16].copy_from_slice(&crc.to_le_bytes());
        &self.head
    }

    /// Empties the batch for reuse.
    pub fn clear(&mut self) {
        self.head.truncate(HEADER_LEN + 4);
        self.count = 0;
        self.data_pages = 0;
    }
}

/// Whether a buffer is all zeros (word at a time).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// A frame header that passed its checks; the payload has not been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The kind.
    pub kind: Kind,
    /// Payload length, within the kind's bound.
    pub len: u32,
    crc: u32,
}

/// Reads and checks a frame header: magic, kind, flags, the kind's bound.
pub fn read_header<R: Read>(r: &mut R) -> Result<Header, Error> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    check_header(&header)
}

impl Header {
    /// Reads the payload into `payload` (reused between calls, so a migration does not
    /// allocate per frame) and checks its checksum.
    pub fn read_payload<R: Read>(&self, r: &mut R, payload: &mut Vec<u8>) -> Result<(), Error> {
        // Reused buffer: zero-fill only the part it never had.
        let len = self.len as usize;
        if payload.len() < len {
            payload.resize(len, 0);
        } else {
            payload.truncate(len);
        }
        r.read_exact(payload)?;
        if checksum(self.kind, payload) != self.crc {
            return Err(Error::BadChecksum(self.kind));
        }
        Ok(())
    }

    /// For a `Pages` frame: reads its count and entries into `entries` and checks them
    /// (checksum, alignment, that the length is exactly the data they announce). The page
    /// data, [`PageEntries::data_len`] bytes in entry order, is the rest of the frame, still
    /// on the stream.
    pub fn read_page_entries<R: Read>(&self, r: &mut R, entries: &mut PageEntries) -> Result<(), Error> {
        if self.kind != Kind::Pages {
            return Err(Error::Unexpected { got: self.kind, expected: "Pages" });
        }
        let mut count = [0u8; 4];
        if self.len < 4 {
            return Err(Error::BadPages("no count"));
        }
        r.read_exact(&mut count)?;
        let n = u32::from_le_bytes(count) as usize;
        if n > MAX_PAGES_PER_FRAME {
            return Err(Error::BadPages("more pages than a frame may hold"));
        }
        let head_len = 4 + 8 * n;
        if (self.len as usize) < head_len {
            return Err(Error::BadPages("truncated entries"));
        }
        let raw = &mut entries.raw;
        raw.clear();
        raw.extend_from_slice(&count);
        raw.resize(head_len, 0);
        r.read_exact(&mut raw[4..])?;
        if crc32fast::hash(raw) != self.crc {
            return Err(Error::BadChecksum(Kind::Pages));
        }
        entries.check(self.len as usize - head_len)
    }
}

/// Reads one frame into `payload` (reused between calls). Same checks as [`read_frame`].
pub fn read_frame_into<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> Result<Kind, Error> {
    let h = read_header(r)?;
    h.read_payload(r, payload)?;
    Ok(h.kind)
}

/// The largest payload a frame may have before the peer is authenticated.
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 4 << 10;

/// Reads one frame of a handshake into `payload`: `Hello`, `ChallengeResponse`, or an
/// `Abort` (a sender that rejects the receiver's proof says so), none larger than
/// [`HANDSHAKE_MAX_PAYLOAD`]. A header announcing another kind or a larger payload is an
/// error before any of the payload is read, so an unauthenticated peer never makes the
/// reader allocate more than that.
pub fn read_handshake_frame<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> Result<Kind, Error> {
    let h = read_header(r)?;
    if !matches!(h.kind, Kind::Hello | Kind::ChallengeResponse | Kind::Abort) {
        return Err(Error::Unexpected { got: h.kind, expected: "Hello or ChallengeResponse (a handshake)" });
    }
    if h.len > HANDSHAKE_MAX_PAYLOAD {
        return Err(Error::TooLarge { kind: h.kind, len: h.len, max: HANDSHAKE_MAX_PAYLOAD });
    }
    h.read_payload(r, payload)?;
    Ok(h.kind)
}

fn check_header(header: &[u8; HEADER_LEN]) -> Result<Header, Error> {
    if &header[..4] != MAGIC {
        return Err(Error::BadMagic);
    }
    let raw_kind = u16::from_le_bytes([header[4], header[5]]);
    let kind = Kind::from_u16(raw_kind).ok_or(Error::UnknownKind(raw_kind))?;
    let flags = u16::from_le_bytes([header[6], header[7]]);
    if flags != 0 {
        return Err(Error::BadFlags { kind, flags });
    }
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if len > kind.max_payload() {
        return Err(Error::TooLarge { kind, len, max: kind.max_payload() });
    }
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    Ok(Header { kind, len, crc })
}

/// The count and entries of a `Pages` batch, checked; reused from batch to batch.
#[derive(Debug, Default)]
pub struct PageEntries {
    /// Count (4 bytes) and entries (8 bytes each), as on the wire.
    raw: Vec<u8>,
    data_pages: usize,
}

impl PageEntries {
    /// Parses and checks the count and entries of a whole `Pages` payload (data included).
    pub fn parse(payload: &[u8]) -> Result<Self, Error> {
        let count = payload.get(..4).ok_or(Error::BadPages("no count"))?;
        let n = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
        if n > MAX_PAGES_PER_FRAME {
            return Err(Error::BadPages("more pages than a frame may hold"));
        }
        let raw = payload.get(..4 + 8 * n).ok_or(Error::BadPages("truncated entries"))?.to_vec();
        let mut e = PageEntries { raw, data_pages: 0 };
        e.check(payload.len() - (4 + 8 * n))?;
        Ok(e)
    }

    /// Checks every entry and that `data_len` bytes are exactly the announced page data.
    fn check(&mut self, data_len: usize) -> Result<(), Error> {
        let mut with_data = 0usize;
        for i in 0..self.len() {
            let raw = self.entry(i);
            if raw & (PAGE_SIZE as u64 - 1) & !ZERO_PAGE != 0 {
                return Err(Error::BadPages("unaligned address"));
            }
            if raw & ZERO_PAGE == 0 {
                with_data += 1;
            }
        }
        self.data_pages = with_data;
        if data_len < with_data * PAGE_SIZE {
            return Err(Error::BadPages("truncated page data"));
        }
        if data_len > with_data * PAGE_SIZE {
            return Err(Error::BadPages("trailing bytes after the last page"));
        }
        Ok(())
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.raw.len().saturating_sub(4) / 8
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of page data that follow the entries.
    pub fn data_len(&self) -> usize {
        self.data_pages * PAGE_SIZE
    }

    fn entry(&self, i: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.raw[4 + 8 * i..12 + 8 * i]);
        u64::from_le_bytes(a)
    }

    /// The batch as runs: every zero page on its own, and data pages with consecutive
    /// addresses merged into one run (never wrapping around the address space). The data
    /// runs' lengths add up to [`PageEntries::data_len`], in order.
    pub fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        let mut i = 0usize;
        std::iter::from_fn(move || {
            let raw = self.entry_at(i)?;
            i += 1;
            if raw & ZERO_PAGE != 0 {
                return Some(Run::Zero(raw & !ZERO_PAGE));
            }
            let mut pages = 1usize;
            while let Some(next) = self.entry_at(i) {
                if next & ZERO_PAGE != 0 || raw.checked_add((pages * PAGE_SIZE) as u64) != Some(next) {
                    break;
                }
                pages += 1;
                i += 1;
            }
            Some(Run::Data { addr: raw, pages })
        })
    }

    fn entry_at(&self, i: usize) -> Option<u64> {
        (i < self.len()).then(|| self.entry(i))
    }
}

/// A piece of a `Pages` batch, from [`PageEntries::runs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// The page at this address is all zeros.
    Zero(u64),
    /// `pages` pages at consecutive addresses from `addr`; their data is next on the wire.
    Data {
        /// Guest-physical address of the first page.
        addr: u64,
        /// How many.
        pages: usize,
    },
}

/// A piece of a decoded `Pages` payload held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRun<'a> {
    /// The page at this address is all zeros.
    Zero(u64),
    /// Pages at consecutive addresses from `addr`, with their data back to back
    /// (`data.len()` is a non-zero multiple of [`PAGE_SIZE`]).
    Data {
        /// Guest-physical address of the first page.
        addr: u64,
        /// The pages' bytes.
        data: &'a [u8],
    },
}

impl PageRun<'_> {
    /// Pages in the run.
    pub fn pages(&self) -> u64 {
        match self {
            PageRun::Zero(_) => 1,
            PageRun::Data { data, .. } => (data.len() / PAGE_SIZE) as u64,
        }
    }
}

/// Decodes a whole `Pages` payload into runs, as [`PageEntries::runs`] does, with each data
/// run's bytes. Checks the count, every address and the data length before calling `run`
/// at all; never reads past the payload. Returns the number of pages. (The receiver reads
/// page data straight from the stream into guest memory instead; this is for tests, tools
/// and the fuzzer.)
pub fn decode_page_runs(
    payload: &[u8],
    mut run: impl FnMut(PageRun<'_>) -> Result<(), Error>,
) -> Result<usize, Error> {
    let entries = PageEntries::parse(payload)?;
    let mut at = 4 + 8 * entries.len();
    for r in entries.runs() {
        match r {
            Run::Zero(addr) => run(PageRun::Zero(addr))?,
            Run::Data { addr, pages } => {
                let data = &payload[at..at + pages * PAGE_SIZE];
                at += data.len();
                run(PageRun::Data { addr, data })?;
            }
        }
    }
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_features_are_negotiated_and_the_previous_release_still_parses() {
        // The previous release's Hello and Challenge: no role, no features.
        let old: Hello = serde_json::from_str(
            r#"{"protocol_version":2,"migration_id":"m-1","ferry_version":"0.1.0","nonce":"00","stream":0}"#,
        )
        .expect("old Hello");
        assert_eq!((old.role, old.features.len()), (StreamRole::Pages, 0));
        let old: Challenge = serde_json::from_str(r#"{"nonce":"00","proof":"11"}"#).expect("old Challenge");
        assert!(old.features.is_empty());
        // A newer peer's role is refused by name, not misread.
        let newer: Hello = serde_json::from_str(
            r#"{"protocol_version":2,"migration_id":"m-1","ferry_version":"9","nonce":"00","role":"disk_blocks"}"#,
        )
        .expect("newer Hello");
        assert_eq!(newer.role, StreamRole::Unknown);
        // The receiver accepts what it knows of what is offered, in its own order.
        let offered = vec!["zstd".to_string(), "stall_bound".to_string(), "generation".to_string()];
        assert_eq!(accept_features(&offered), vec!["generation".to_string(), "stall_bound".to_string()]);
        assert!(accept_features(&[]).is_empty());
        // This build's Hello offers everything it has, and an empty list is not sent at all.
        let h = Hello { features: FEATURES.iter().map(|f| f.to_string()).collect(), ..Default::default() };
        assert!(String::from_utf8(to_json(&h)).expect("utf8").contains("\"generation\""));
        assert!(!String::from_utf8(to_json(&Hello::default())).expect("utf8").contains("features"));
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let hello = Hello {
            protocol_version: 1,
            migration_id: "m-1".into(),
            ferry_version: "0.1.0".into(),
            nonce: "00".into(),
            stream: 0,
            ..Default::default()
        };
        write_frame(&mut buf, Kind::Hello, &to_json(&hello)).expect("write");
        write_frame(&mut buf, Kind::PassEnd, b"{}").expect("write");
        let mut r = &buf[..];
        let f = read_frame(&mut r).expect("read");
        assert_eq!(f.json::<Hello>(Kind::Hello, "Hello").expect("json"), hello);
        let f = read_frame(&mut r).expect("read");
        assert!(matches!(
            f.json::<Hello>(Kind::Hello, "Hello"),
            Err(Error::Unexpected { got: Kind::PassEnd, .. })
        ));
        assert!(matches!(read_frame(&mut r), Err(Error::Io(_))));
    }

    #[test]
    fn abort_carries_the_reason() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Abort, &to_json(&Abort::new("no", ReasonCode::Busy))).expect("write");
        let f = read_frame(&mut &buf[..]).expect("read");
        let e = f.json::<Hello>(Kind::Hello, "Hello").expect_err("abort");
        assert!(
            matches!(&e, Error::PeerAborted { reason, code: ReasonCode::Busy } if reason == "no"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "the peer aborted the migration: no");
    }

    #[test]
    fn rejects_bad_frames() {
        let mut good = Vec::new();
        write_frame(&mut good, Kind::Hello, b"{}").expect("write");
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(read_frame(&mut &b[..]), Err(Error::BadMagic)));
        let mut b = good.clone();
        b[4] = 99;
        assert!(matches!(read_frame(&mut &b[..]), Err(Error::UnknownKind(99))));
        let mut b = good.clone();
        b[6] = 1;
        assert!(matches!(read_frame(&mut &b[..]), Err(Error::BadFlags { .. })));
        let mut b = good.clone();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_frame(&mut &b[..]), Err(Error::TooLarge { .. })));
        let mut b = good.clone();
        b[HEADER_LEN] ^= 1;
        assert!(matches!(read_frame(&mut &b[..]), Err(Error::BadChecksum(Kind::Hello))));
        assert!(matches!(read_frame(&mut &good[..good.len() - 1]), Err(Error::Io(_))));
        assert!(write_frame(&mut Vec::new(), Kind::Hello, &vec![0u8; 5000]).is_err());
    }

    /// Before authentication only small handshake frames are read: another kind, or a
    /// length over the handshake bound, fails on the header with nothing allocated.
    #[test]
    fn handshake_frames_are_small_and_few() {
        let mut payload = Vec::new();
        let mut hello = Vec::new();
        write_frame(&mut hello, Kind::Hello, b"{}").expect("write");
        assert_eq!(read_handshake_frame(&mut &hello[..], &mut payload).expect("hello"), Kind::Hello);
        let mut abort = Vec::new();
        write_frame(&mut abort, Kind::Abort, &to_json(&Abort::new("no", ReasonCode::Unknown)))
            .expect("write");
        assert_eq!(read_handshake_frame(&mut &abort[..], &mut payload).expect("abort"), Kind::Abort);
        // A State header claiming 60 MiB, with nothing behind it: refused from the header.
        let mut state = Vec::new();
        state.extend_from_slice(MAGIC);
        state.extend_from_slice(&(Kind::State as u16).to_le_bytes());
        state.extend_from_slice(&[0, 0]);
        state.extend_from_slice(&(60u32 << 20).to_le_bytes());
        state.extend_from_slice(&[0; 4]);
        let mut payload = Vec::new();
        let e = read_handshake_frame(&mut &state[..], &mut payload).expect_err("state");
        assert!(matches!(e, Error::Unexpected { got: Kind::State, .. }), "{e:?}");
        assert_eq!(payload.capacity(), 0);
        // An Abort may be 64 KiB after the handshake, not during it.
        let mut big = Vec::new();
        write_frame(&mut big, Kind::Abort, &vec![b'x'; 5000]).expect("write");
        let e = read_handshake_frame(&mut &big[..], &mut payload).expect_err("big abort");
        assert!(matches!(e, Error::TooLarge { max: HANDSHAKE_MAX_PAYLOAD, .. }), "{e:?}");
        assert_eq!(payload.capacity(), 0);
        let mut config = Vec::new();
        write_frame(&mut config, Kind::Config, b"{}").expect("write");
        assert!(read_handshake_frame(&mut &config[..], &mut payload).is_err());
    }

    /// A batch's head followed by its data is one valid frame; zero pages are markers only.
    fn batch_frame(b: &mut PageBatch, data: &[u8]) -> Vec<u8> {
        assert_eq!(b.data_len(), data.len());
        let mut wire = b.finish().to_vec();
        wire.extend_from_slice(data);
        b.clear();
        wire
    }

    #[test]
    fn page_batch_is_one_frame_with_zero_markers() {
        let mut b = PageBatch::new();
        b.push_data(0x1000).expect("push");
        b.push_zero(0x2000).expect("push");
        assert_eq!((b.len(), b.zero_pages(), b.data_len()), (2, 1, PAGE_SIZE));
        assert!(b.push_data(0x2001).is_err());
        assert!(b.push_zero(0x2001).is_err());
        assert!(b.push_data(0x2800).is_err());
        let wire = batch_frame(&mut b, &[7u8; PAGE_SIZE]);
        assert!(b.is_empty());
        let mut payload = Vec::new();
        assert_eq!(read_frame_into(&mut &wire[..], &mut payload).expect("read"), Kind::Pages);
        let mut got = Vec::new();
        decode_page_runs(&payload, |r| {
            got.push(r.to_owned_test());
            Ok(())
        })
        .expect("decode");
        assert_eq!(got, vec![(0x1000, Some(vec![7u8; PAGE_SIZE])), (0x2000, None)]);
        // Reused: the next batch starts clean.
        b.push_data(0x3000).expect("push");
        let wire = batch_frame(&mut b, &[1u8; PAGE_SIZE]);
        assert_eq!(wire.len(), HEADER_LEN + 4 + 8 + PAGE_SIZE);
    }

    /// Page data may change between the sender's checksum and the wire (it is sent from
    /// running guest memory): the frame is still good. A changed count or address is not.
    #[test]
    fn the_checksum_covers_entries_not_page_data() {
        let mut b = PageBatch::new();
        b.push_data(0x1000).expect("push");
        let wire = batch_frame(&mut b, &[7u8; PAGE_SIZE]);
        let mut changed_data = wire.clone();
        changed_data[HEADER_LEN + 12 + 100] = 8;
        let f = read_frame(&mut &changed_data[..]).expect("data changed in flight");
        assert_eq!(f.payload[12 + 100], 8);
        let mut changed_addr = wire.clone();
        changed_addr[HEADER_LEN + 5] ^= 0x10;
        assert!(matches!(read_frame(&mut &changed_addr[..]), Err(Error::BadChecksum(Kind::Pages))));
        let mut changed_count = wire;
        changed_count[HEADER_LEN] = 2;
        assert!(read_frame(&mut &changed_count[..]).is_err());
    }

    /// The streaming read (entries, then runs whose data stays on the stream) agrees with
    /// decoding the whole payload, and leaves the stream at the data.
    #[test]
    fn streamed_entries_match_the_decoded_payload() {
        let page = |b: u8| vec![b; PAGE_SIZE];
        let mut out = Vec::new();
        let entries = [
            (0x1000u64, page(1)),
            (0x2000, page(2)),
            (0x3000, page(0)),
            (0x9000, page(3)),
            (0x8000, page(4)),
        ];
        encode_pages(entries.iter().map(|(a, p)| (*a, &p[..])), &mut out).expect("encode");
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Pages, &out).expect("frame");
        let mut r = &wire[..];
        let h = read_header(&mut r).expect("header");
        let mut e = PageEntries::default();
        h.read_page_entries(&mut r, &mut e).expect("entries");
        assert_eq!((e.len(), e.data_len()), (5, 4 * PAGE_SIZE));
        let runs: Vec<Run> = e.runs().collect();
        assert_eq!(
            runs,
            vec![
                Run::Data { addr: 0x1000, pages: 2 },
                Run::Zero(0x3000),
                Run::Data { addr: 0x9000, pages: 1 },
                Run::Data { addr: 0x8000, pages: 1 },
            ]
        );
        assert_eq!(r, &[page(1), page(2), page(3), page(4)].concat()[..]);
        // Not a Pages frame; a lying length; a bad checksum.
        let mut hello = Vec::new();
        write_frame(&mut hello, Kind::Hello, b"{}").expect("frame");
        let mut r = &hello[..];
        let h = read_header(&mut r).expect("header");
        assert!(h.read_page_entries(&mut r, &mut e).is_err());
        let mut short = wire.clone();
        short[8..12].copy_from_slice(&((4 + 5 * 8 + PAGE_SIZE) as u32).to_le_bytes());
        let mut r = &short[..];
        let h = read_header(&mut r).expect("header");
        assert!(matches!(h.read_page_entries(&mut r, &mut e), Err(Error::BadPages("truncated page data"))));
        let mut bad = wire;
        bad[12] ^= 1;
        let mut r = &bad[..];
        let h = read_header(&mut r).expect("header");
        assert!(matches!(h.read_page_entries(&mut r, &mut e), Err(Error::BadChecksum(Kind::Pages))));
    }

    #[test]
    fn zero_check() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
    }

    impl PageRun<'_> {
        fn to_owned_test(self) -> (u64, Option<Vec<u8>>) {
            match self {
                PageRun::Zero(a) => (a, None),
                PageRun::Data { addr, data } => (addr, Some(data.to_vec())),
            }
        }
    }

    #[test]
    fn pages_round_trip_with_zero_markers() {
        let a = vec![7u8; PAGE_SIZE];
        let z = vec![0u8; PAGE_SIZE];
        let mut out = Vec::new();
        encode_pages([(0x1000u64, &a[..]), (0x2000, &z[..])].into_iter(), &mut out).expect("encode");
        assert_eq!(out.len(), 4 + 8 + 8 + PAGE_SIZE);
        let mut got = Vec::new();
        let n = decode_page_runs(&out, |r| {
            got.push(r.to_owned_test());
            Ok(())
        })
        .expect("decode");
        assert_eq!(n, 2);
        assert_eq!(got, vec![(0x1000, Some(a)), (0x2000, None)]);
    }

    /// Consecutive data pages come out as one run; a gap, a zero page or a step backwards
    /// starts a new one.
    #[test]
    fn consecutive_pages_merge_into_runs() {
        let page = |b: u8| vec![b; PAGE_SIZE];
        let (p1, p2, p3, p4, p5, z) = (page(1), page(2), page(3), page(4), page(5), page(0));
        let entries = [
            (0x1000u64, &p1[..]),
            (0x2000, &p2[..]),
            (0x3000, &p3[..]),
            (0x4000, &z[..]),
            (0x5000, &p4[..]),
            (0x7000, &p5[..]),
            (0x6000, &p1[..]),
        ];
        let mut out = Vec::new();
        encode_pages(entries.into_iter(), &mut out).expect("encode");
        let mut got = Vec::new();
        let n = decode_page_runs(&out, |r| {
            got.push(r.to_owned_test());
            Ok(())
        })
        .expect("decode");
        assert_eq!(n, 7);
        let three: Vec<u8> = [p1.clone(), p2, p3].concat();
        assert_eq!(
            got,
            vec![
                (0x1000, Some(three)),
                (0x4000, None),
                (0x5000, Some(p4)),
                (0x7000, Some(p5.clone())),
                (0x6000, Some(p1)),
            ]
        );
        assert_eq!(PageRun::Data { addr: 0, data: &out[..2 * PAGE_SIZE] }.pages(), 2);
        // A run never wraps around the address space.
        let mut top = Vec::new();
        encode_pages([(!0xfffu64, &p5[..]), (0, &p5[..])].into_iter(), &mut top).expect("encode");
        let mut runs = 0;
        decode_page_runs(&top, |_| {
            runs += 1;
            Ok(())
        })
        .expect("decode");
        assert_eq!(runs, 2);
    }

    #[test]
    fn malformed_page_batches_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1, 0, 0],
            vec![1, 0, 0, 0],
            [2u32.to_le_bytes().to_vec(), 0x1001u64.to_le_bytes().to_vec()].concat(),
            [1u32.to_le_bytes().to_vec(), 0x1000u64.to_le_bytes().to_vec(), vec![1; 10]].concat(),
            [1u32.to_le_bytes().to_vec(), 0x1000u64.to_le_bytes().to_vec(), vec![1; PAGE_SIZE + 1]].concat(),
            [1u32.to_le_bytes().to_vec(), 0x1001u64.to_le_bytes().to_vec(), vec![1; PAGE_SIZE]].concat(),
            [1u32.to_le_bytes().to_vec(), 0x1003u64.to_le_bytes().to_vec()].concat(),
            [0u32.to_le_bytes().to_vec(), vec![0; 3]].concat(),
            u32::MAX.to_le_bytes().to_vec(),
        ];
        for c in cases {
            let mut called = false;
            let r = decode_page_runs(&c, |_| {
                called = true;
                Ok(())
            });
            assert!(r.is_err() && !called, "{c:?}");
        }
    }

    /// Random garbage, and random mutations of valid streams, never panic the decoder and
    /// never make it allocate beyond a kind's bound.
    #[test]
    fn random_input_never_panics() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut valid = Vec::new();
        write_frame(&mut valid, Kind::Hello, b"{\"protocol_version\":1}").expect("write");
        let page = vec![9u8; PAGE_SIZE];
        let mut pages = Vec::new();
        encode_pages([(0x4000u64, &page[..])].into_iter(), &mut pages).expect("encode");
        write_frame(&mut valid, Kind::Pages, &pages).expect("write");
        for _ in 0..20_000 {
            let mut data = if next() % 2 == 0 {
                (0..(next() % 64)).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                let mut v = valid.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % v.len();
                    v[i] = next() as u8;
                }
                v
            };
            if next() % 3 == 0 {
                data.truncate((next() as usize) % (data.len() + 1));
            }
            let mut r = &data[..];
            while let Ok(f) = read_frame(&mut r) {
                assert!(f.payload.len() <= f.kind.max_payload() as usize);
                let _ = decode_page_runs(&f.payload, |_| Ok(()));
                let _ = f.json::<Hello>(Kind::Hello, "Hello");
            }
            // The receiver's way: page entries first, the data left on the stream.
            let mut r = &data[..];
            let mut entries = PageEntries::default();
            while let Ok(h) = read_header(&mut r) {
                if h.kind != Kind::Pages || h.read_page_entries(&mut r, &mut entries).is_err() {
                    break;
                }
                let runs: usize =
                    entries.runs().map(|run| if let Run::Data { pages, .. } = run { pages } else { 1 }).sum();
                assert_eq!(runs, entries.len());
                r = r.get(entries.data_len()..).unwrap_or_default();
            }
        }
    }

    #[test]
    fn abort_and_restore_result_carry_a_code_and_read_without_one() {
        // From this release: the code travels beside the sentence.
        let a = Abort::new("the receiver is busy with migration m-1", ReasonCode::Busy);
        let json = String::from_utf8(to_json(&a)).expect("utf8");
        assert!(json.contains(r#""code":"busy""#), "{json}");
        assert_eq!(serde_json::from_str::<Abort>(&json).expect("parse"), a);
        let r = RestoreResult {
            ok: false,
            reason: "x".into(),
            code: ReasonCode::RefusedByDestination(Check::CpuFeatures),
        };
        let json = String::from_utf8(to_json(&r)).expect("utf8");
        assert!(json.contains(r#""code":"refused_by_destination/cpu_features""#), "{json}");
        assert_eq!(serde_json::from_str::<RestoreResult>(&json).expect("parse"), r);
        // From the previous release (protocol 2 without codes): no code is `unknown`.
        let old: Abort = serde_json::from_str(r#"{"reason":"authentication failed"}"#).expect("parse");
        assert_eq!(old.code, ReasonCode::Unknown);
        let old: RestoreResult = serde_json::from_str(r#"{"ok":false,"reason":"no"}"#).expect("parse");
        assert_eq!(old.code, ReasonCode::Unknown);
        // To the previous release: its structs ignore the extra field; an ok answer has none.
        let ok = to_json(&RestoreResult { ok: true, reason: String::new(), code: ReasonCode::Unknown });
        assert_eq!(ok, br#"{"ok":true,"reason":""}"#);
        // An Abort in place of an answer carries its code into the error.
        let e = parse_json::<Accept>(Kind::Abort, &to_json(&a), Kind::Accept, "Accept").expect_err("abort");
        assert!(matches!(e, Error::PeerAborted { code: ReasonCode::Busy, .. }), "{e:?}");
    }
}
