//! One pass of pages from the source, over one or more streams.
//!
//! Each stream has a thread (the first stream's is the migration thread itself). The
//! threads take batches of up to [`MAX_PAGES_PER_FRAME`] pages from the pass's page list in
//! turn, so a stream that runs faster sends more; each sends its batches straight from
//! guest memory ([`PageWriter`]), then its own `PassEnd`, and waits for that stream's
//! `PassAck`. The pass is over when every stream has its answer: only then does the next
//! pass start, so a page sent again in pass N+1 can never overtake its pass-N copy on
//! another stream.
//!
//! A failure on any stream stops the others at their next batch; the first error is the
//! pass's.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_migration::protocol::{
    self as wire, parse_json, read_frame_into, to_json, write_frame, Kind, PageBatch, PassAck, PassEnd,
    MAX_PAGES_PER_FRAME, PAGE_SIZE,
};

use ferry_migration::delta::{DeltaBatch, SentCache};

use super::link::{In, Out, Progress, SLICE};
use super::splice::{page_is_zero, PageWriter};
use super::Error;
use crate::memory::GuestMemory;

/// How often the first stream reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// What a pass needs to know.
#[derive(Debug)]
pub(crate) struct Pass<'a> {
    /// The migration id, for the log.
    pub id: &'a str,
    /// Pass number.
    pub number: u32,
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// Set when an operator cancels the migration.
    pub cancel: &'a AtomicBool,
    /// Bandwidth cap over all streams, bytes/s; 0 for none.
    pub cap: u64,
    /// Wait for each stream's `PassAck` (the stop-and-copy pass collects its answer later).
    pub wait_ack: bool,
    /// The stall bound: a stream whose peer acknowledges nothing for this long fails.
    pub stall: Duration,
    /// What the pass has put on the wire so far (kept when it fails).
    pub counted: &'a Counted,
    /// The delta cache: pages go in `DeltaPages` frames, as deltas where it holds them (and
    /// compressed where it compresses them); pass 1 does not fill it.
    pub delta: Option<&'a Mutex<SentCache>>,
}

/// What a pass has put on the wire so far, all streams together, batch by batch: kept
/// when the pass fails, so that the report of a failed or cancelled migration counts what
/// was sent before it ended.
#[derive(Debug, Default)]
pub(crate) struct Counted {
    /// Pages, zero markers included.
    pub pages: AtomicU64,
    /// Zero markers.
    pub zero: AtomicU64,
    /// Bytes on the wire.
    pub bytes: AtomicU64,
}

/// What a pass sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Pages, zero markers included.
    pub pages: u64,
    /// Zero markers.
    pub zero: u64,
    /// Bytes on the wire, frame headers included.
    pub bytes: u64,
    /// Of those, the first stream's: the one the stop-and-copy will have to itself, so its
    /// rate, not all streams', is what predicts the downtime.
    pub first_bytes: u64,
}

/// State the streams of one pass share.
struct Shared<'p> {
    pages: Mutex<&'p mut (dyn Iterator<Item = (u64, bool)> + Send)>,
    /// The extra streams, shut down when any stream fails so that none waits out a timeout.
    extra: &'p [&'p TcpStream],
    stop: AtomicBool,
    pages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    started: Instant,
}

impl Shared<'_> {
    /// Stops every stream: the others at their next batch, and those blocked on an extra
    /// stream at once (the first stream stays open for the Abort and the peer's reason).
    fn fail(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            for s in self.extra {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Pass<'_> {
    /// Sends `pages` (guest-physical address, and whether it is known to be zero without
    /// reading it) over `streams`; `progress` hears (pages, bytes) sent so far now and then.
    pub fn send(
        &self,
        streams: &[&TcpStream],
        pages: &mut (dyn Iterator<Item = (u64, bool)> + Send),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Sent, Error> {
        let Some((first, rest)) = streams.split_first() else {
            return Err(Error::Vmm("send a pass: no stream".into()));
        };
        let shared = Shared {
            pages: Mutex::new(pages),
            extra: rest,
            stop: AtomicBool::new(false),
            pages_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            started: Instant::now(),
        };
        let results: Vec<Result<Sent, Error>> = std::thread::scope(|s| {
            let others: Vec<_> = rest
                .iter()
                .map(|stream| {
                    let shared = &shared;
                    std::thread::Builder::new()
                        .name("migration-stream".into())
                        .spawn_scoped(s, move || self.stream(stream, shared, None))
                })
                .collect();
            if others.iter().any(Result::is_err) {
                shared.fail();
            }
            let mut all = vec![self.stream(first, &shared, Some(progress))];
            for h in others {
                all.push(match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(Error::Vmm("send pages (a stream thread panicked)".into()))),
                    Err(e) => Err(Error::Vmm(format!("start a stream thread: {e}"))),
                });
            }
            all
        });
        let mut total = Sent::default();
        let mut first_error = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(s) => {
                    if i == 0 {
                        total.first_bytes = s.bytes;
                    }
                    total.pages += s.pages;
                    total.zero += s.zero;
                    total.bytes += s.bytes;
                }
                Err(Error::StreamStopped) => {}
                Err(e) if first_error.is_some() => {
                    tracing::debug!(
                        "migration {}: pass {}: another stream failed too: {}",
                        self.id,
                        self.number,
                        super::error_chain(&e)
                    );
                }
                Err(e) => first_error = Some(e),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None if shared.stop.load(Ordering::SeqCst) => Err(Error::Vmm("send a pass (stopped)".into())),
            None => Ok(total),
        }
    }

    /// One stream's share of the pass.
    fn stream(
        &self,
        stream: &TcpStream,
        shared: &Shared<'_>,
        progress: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<Sent, Error> {
        let r = self.stream_inner(stream, shared, progress);
        if r.is_err() {
            shared.fail();
        }
        r.map_err(|e| peer_reason(stream, super::link::typed(e)))
    }

    fn stream_inner(
        &self,
        stream: &TcpStream,
        shared: &Shared<'_>,
        mut progress: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<Sent, Error> {
        let mut out = PageWriter::new(self.mem).map_err(wire::Error::Io)?;
        let mut batch = PageBatch::new();
        let mut delta_batch = DeltaBatch::new();
        let mut copy = Box::new([0u8; PAGE_SIZE]);
        let mut take: Vec<(u64, bool)> = Vec::with_capacity(MAX_PAGES_PER_FRAME);
        let mut mine = Sent::default();
        let mut last_progress = Instant::now();
        // The peer's progress, checked before each batch too: with a bandwidth cap the
        // socket buffers take seconds of batches before any write blocks.
        let waiting = format!("sending pass {}", self.number);
        let mut watch = Progress::new(stream, self.stall);
        loop {
            take.clear();
            {
                let mut pages = shared.pages.lock().unwrap_or_else(|p| p.into_inner());
                let pages: &mut (dyn Iterator<Item = (u64, bool)> + Send) = &mut **pages;
                take.extend(pages.take(MAX_PAGES_PER_FRAME));
            }
            if take.is_empty() {
                break;
            }
            if shared.stop.load(Ordering::SeqCst) {
                return Err(Error::StreamStopped);
            }
            if self.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            watch.check(&waiting, true).map_err(wire::Error::Io)?;
            let (batch_pages, batch_zero, n) = match self.delta {
                Some(cache) => {
                    let (zero, n) =
                        self.send_delta_batch(stream, &take, cache, &mut delta_batch, &mut copy)?;
                    (take.len() as u64, zero, n)
                }
                None => {
                    for &(addr, known_zero) in &take {
                        let zero = known_zero
                            || page_is_zero(self.mem, addr, PAGE_SIZE).ok_or(Error::Memory { addr })?;
                        if zero {
                            batch.push_zero(addr)?;
                        } else {
                            batch.push_data(addr)?;
                            if !out.push(addr, PAGE_SIZE) {
                                return Err(Error::Memory { addr });
                            }
                        }
                    }
                    let (batch_pages, batch_zero) = (batch.len() as u64, batch.zero_pages());
                    let data_len = batch.data_len();
                    let head = batch.finish();
                    let n = (head.len() + data_len) as u64;
                    let mut blocked = |e| watch.blocked(e, &waiting, self.cancel, true);
                    out.send(stream, head, &mut blocked).map_err(wire::Error::Io)?;
                    batch.clear();
                    (batch_pages, batch_zero, n)
                }
            };
            mine.pages += batch_pages;
            mine.zero += batch_zero;
            mine.bytes += n;
            self.counted.pages.fetch_add(batch_pages, Ordering::Relaxed);
            self.counted.zero.fetch_add(batch_zero, Ordering::Relaxed);
            self.counted.bytes.fetch_add(n, Ordering::Relaxed);
            let pages = shared.pages_sent.fetch_add(take.len() as u64, Ordering::Relaxed) + take.len() as u64;
            let bytes = shared.bytes_sent.fetch_add(n, Ordering::Relaxed) + n;
            if self.cap > 0 {
                // Sleep until the pass, all streams together, is back under the cap.
                let due = Duration::from_secs_f64(bytes as f64 / self.cap as f64);
                // In slices, so that a cancel is not kept waiting.
                while let Some(wait) = due.checked_sub(shared.started.elapsed()) {
                    if self.cancel.load(Ordering::SeqCst) {
                        return Err(Error::Cancelled);
                    }
                    std::thread::sleep(wait.min(SLICE));
                }
            }
            if let Some(report) = progress.as_mut() {
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    last_progress = Instant::now();
                    report(pages, bytes);
                }
            }
        }
        let end = to_json(&PassEnd { pass: self.number, pages: mine.pages });
        write_frame(&mut Out::new(stream, self.stall, self.cancel, &waiting), Kind::PassEnd, &end)?;
        mine.bytes += (wire::HEADER_LEN + end.len()) as u64;
        if self.wait_ack {
            wait_ack(stream, self.number, mine.pages, self.stall, self.cancel)?;
        }
        Ok(mine)
    }
}

impl Pass<'_> {
    /// Sends `take` as one `DeltaPages` frame: each page copied out of guest memory first
    /// (the cache must hold exactly what goes on the wire), then a delta against the cached
    /// copy where it is small, else the page whole. Returns the zero pages and the bytes.
    fn send_delta_batch(
        &self,
        stream: &TcpStream,
        take: &[(u64, bool)],
        cache: &Mutex<SentCache>,
        batch: &mut DeltaBatch,
        copy: &mut [u8; PAGE_SIZE],
    ) -> Result<(u64, u64), Error> {
        use vm_memory::{Bytes, GuestAddress};
        batch.clear();
        let mut zero = 0;
        {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            for &(addr, known_zero) in take {
                if known_zero {
                    copy.fill(0);
                } else {
                    self.mem.read_slice(copy, GuestAddress(addr)).map_err(|_| Error::Memory { addr })?;
                }
                if copy.iter().all(|&b| b == 0) {
                    zero += 1;
                }
                cache.add(batch, addr, copy, self.number > 1);
            }
        }
        let payload = batch.payload();
        let waiting = format!("sending pass {}", self.number);
        write_frame(&mut Out::new(stream, self.stall, self.cancel, &waiting), Kind::DeltaPages, payload)?;
        Ok((zero, (wire::HEADER_LEN + payload.len()) as u64))
    }
}

/// Waits on `stream` for the `PassAck` of `pass` with `pages` pages, failing after `stall`
/// without progress (the pass's bytes still being acknowledged counts as progress).
pub(crate) fn wait_ack(
    stream: &TcpStream,
    pass: u32,
    pages: u64,
    stall: Duration,
    cancel: &AtomicBool,
) -> Result<(), Error> {
    let mut payload = Vec::new();
    let waiting = format!("waiting for the PassAck of pass {pass}");
    let got = read_frame_into(&mut In::new(stream, stall, cancel, &waiting), &mut payload)
        .map_err(|e| super::link::typed(e.into()))?;
    let ack: PassAck = parse_json(got, &payload, Kind::PassAck, "PassAck")?;
    if ack != (PassAck { pass, pages }) {
        return Err(Error::Protocol(wire::Error::Unexpected {
            got: Kind::PassAck,
            expected: "the PassAck of the pass just sent",
        }));
    }
    Ok(())
}

/// After a failed write on `stream`: the peer may have said why before closing.
pub(crate) fn peer_reason(stream: &TcpStream, e: Error) -> Error {
    if !matches!(e, Error::Protocol(wire::Error::Io(_))) {
        return e;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut payload = Vec::new();
    match read_frame_into(&mut &*stream, &mut payload) {
        Ok(Kind::Abort) => match parse_json::<PassEnd>(Kind::Abort, &payload, Kind::PassEnd, "") {
            Err(peer) => Error::Protocol(peer),
            Ok(_) => e,
        },
        _ => e,
    }
}
