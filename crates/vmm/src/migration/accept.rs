//! The destination's front door: every connection to `ferry receive` is accepted and
//! authenticated here, and only an authenticated one reaches a migration.
//!
//! ```text
//! acceptor thread ──accept──> handshake thread, one per connection (at most 16 pending;
//!   │                           a 17th drops the oldest unauthenticated one)
//!   │                             Hello, Challenge, ChallengeResponse: 5 s in all, frames of
//!   │                             at most 4 KiB, nothing else read before authentication
//!   │                             ├─ stream 0, receiver idle ──> the migration thread
//!   │                             ├─ stream 0, receiver busy ──> Abort "the receiver is busy
//!   │                             │                              with migration m-…"
//!   │                             └─ stream k ──> the migration in progress, if it is the one
//!   │                                             named and it waits for stream k
//!   └── keeps accepting while a migration runs, so the listen backlog never fills
//! ```
//!
//! The [`Desk`] is where the handshake threads leave authenticated connections for the
//! migration thread, which polls its eventfd together with the stop signals.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migration::auth::{self, Key};
use ferry_migration::handshake;
use ferry_migration::outcome::ReasonCode;
use ferry_migration::protocol::{self as wire, to_json, write_frame, Hello, Kind};
use vmm_sys_util::eventfd::EventFd;

use super::{error_chain, Error};

/// How long a connection has for its whole handshake (Hello, Challenge, ChallengeResponse),
/// counted from its accept.
pub(super) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Most connections being authenticated at once; another one drops the oldest.
pub(super) const MAX_PENDING: usize = 16;
/// How long telling an authenticated source that the receiver is busy may take.
const REFUSE_WINDOW: Duration = Duration::from_secs(2);
/// Stack of a handshake thread: it parses 4 KiB frames and computes two HMACs.
const HANDSHAKE_STACK: usize = 256 << 10;

/// An authenticated connection and the Hello it came with.
pub(super) struct Authenticated {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub hello: Hello,
}

/// Where handshake threads leave authenticated connections for the migration thread.
pub(super) struct Desk {
    state: Mutex<DeskState>,
    /// Written after a connection is left in `state`.
    ready: EventFd,
}

#[derive(Default)]
struct DeskState {
    phase: Phase,
    /// The first stream of a new migration, for the migration thread.
    first: Option<Authenticated>,
    /// While the migration in progress waits for its extra streams: how many it has in all.
    joining: Option<u32>,
    /// Extra streams that proved the key for the migration in progress.
    joined: Vec<Authenticated>,
}

#[derive(Default, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for a migration.
    #[default]
    Idle,
    /// This migration is in progress.
    Busy(String),
    /// `ferry receive` is done (the VM arrived, or a signal): nothing more is taken.
    Closed,
}

impl Desk {
    pub(super) fn new() -> Result<Self, Error> {
        let ready = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| Error::Vmm(format!("create the receiver's eventfd: {e}")))?;
        Ok(Desk { state: Mutex::new(DeskState::default()), ready })
    }

    fn state(&self) -> MutexGuard<'_, DeskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        let _ = self.ready.write(1);
    }

    /// Readable when a connection may be waiting (see [`Desk::take_first`] and
    /// [`Desk::take_joined`]).
    pub(super) fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// The first stream of a new migration, if one has been authenticated. The receiver is
    /// busy with it from then on, until [`Desk::idle`].
    pub(super) fn take_first(&self) -> Option<Authenticated> {
        let _ = self.ready.read();
        self.state().first.take()
    }

    /// The migration in progress has ended here without the VM: take the next one.
    pub(super) fn idle(&self) {
        let mut s = self.state();
        if s.phase != Phase::Closed {
            s.phase = Phase::Idle;
        }
        s.joining = None;
        s.joined.clear();
    }

    /// Nothing more is taken (connections left here are dropped).
    pub(super) fn close(&self) {
        let mut s = self.state();
        s.phase = Phase::Closed;
        s.first = None;
        s.joining = None;
        s.joined.clear();
    }

    /// The migration in progress takes extra streams 1..`streams` until
    /// [`Desk::stop_joining`].
    pub(super) fn start_joining(&self, streams: u32) {
        self.state().joining = Some(streams);
    }

    /// Extra streams that joined since the last call.
    pub(super) fn take_joined(&self) -> Vec<Authenticated> {
        let _ = self.ready.read();
        std::mem::take(&mut self.state().joined)
    }

    /// The migration in progress takes no more extra streams.
    pub(super) fn stop_joining(&self) {
        let mut s = self.state();
        s.joining = None;
        s.joined.clear();
    }

    /// The migration in progress.
    fn current(&self) -> Option<String> {
        match &self.state().phase {
            Phase::Busy(id) => Some(id.clone()),
            _ => None,
        }
    }

    /// Before any proof: may a connection join migration `id` as stream `k`?
    fn may_join(&self, id: &str, k: u32) -> Result<(), Error> {
        let s = self.state();
        let no = |why: String| Err(Error::NotJoined(why));
        match (&s.phase, s.joining) {
            (Phase::Busy(current), _) if current != id => {
                no(format!("it names migration {id:?}, not the one in progress"))
            }
            (Phase::Busy(_), Some(streams)) if k < streams => Ok(()),
            (Phase::Busy(_), Some(streams)) if streams > 1 => {
                no(format!("it names stream {k}; this migration has streams 1 to {}", streams - 1))
            }
            (Phase::Busy(_), _) => no(format!("migration {id} takes no extra stream now")),
            _ => no(format!("it names migration {id:?}, which is not in progress here")),
        }
    }

    /// Hands an authenticated connection over: stream 0 becomes the migration in progress
    /// if there is none, stream k joins the migration in progress. Gives it back with the
    /// reason when it has no place.
    fn hand_over(&self, conn: Authenticated) -> Result<(), Box<(Authenticated, Error)>> {
        let mut s = self.state();
        let (id, k) = (conn.hello.migration_id.as_str(), conn.hello.stream);
        let refused = match (&s.phase, k) {
            (Phase::Idle, 0) => {
                s.phase = Phase::Busy(id.to_string());
                s.first = Some(conn);
                drop(s);
                self.wake();
                return Ok(());
            }
            (Phase::Busy(current), 0) => Error::Busy(current.clone()),
            (Phase::Busy(current), _) if current == id && s.joining.is_some_and(|n| k < n) => {
                s.joined.push(conn);
                drop(s);
                self.wake();
                return Ok(());
            }
            (Phase::Closed, _) => Error::NotJoined("the receiver is shutting down".into()),
            _ => Error::NotJoined(format!("migration {id} takes no extra stream now")),
        };
        Err(Box::new((conn, refused)))
    }
}

/// Accepts connections on its own thread until dropped; then closes the listener and drops
/// every connection not yet authenticated.
pub(super) struct Acceptor {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    pub(super) fn start(listener: TcpListener, key: Key, desk: Arc<Desk>) -> Result<Self, Error> {
        let io = |e: std::io::Error| Error::Protocol(wire::Error::Io(e));
        listener.set_nonblocking(true).map_err(io)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io)?);
        let front = Front { key: Arc::new(key), desk, pending: Arc::new(Mutex::new(VecDeque::new())) };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || front.accept_loop(&listener, &s))
            .map_err(|e| Error::Vmm(format!("start the acceptor thread: {e}")))?;
        Ok(Acceptor { stop, thread: Some(thread) })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection being authenticated.
struct Pending {
    seq: u64,
    peer: SocketAddr,
    since: Instant,
    /// A handle on its socket, to shut it down from the acceptor.
    stream: TcpStream,
}

type PendingList = Arc<Mutex<VecDeque<Pending>>>;

/// What the acceptor and its handshake threads share.
struct Front {
    key: Arc<Key>,
    desk: Arc<Desk>,
    pending: PendingList,
}

fn lock(p: &PendingList) -> MutexGuard<'_, VecDeque<Pending>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Front {
    fn accept_loop(&self, listener: &TcpListener, stop: &EventFd) {
        let mut seq = 0u64;
        loop {
            let mut fds = [
                libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fds[1].revents != 0 {
                break;
            }
            loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        seq += 1;
                        self.admit(seq, stream, peer);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) => {
                        // Out of descriptors or memory: let some handshakes end first.
                        tracing::warn!("cannot accept a connection: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
        for p in lock(&self.pending).drain(..) {
            let _ = p.stream.shutdown(Shutdown::Both);
        }
    }

    /// Starts the handshake of a new connection, dropping the oldest pending one if
    /// [`MAX_PENDING`] are.
    fn admit(&self, seq: u64, stream: TcpStream, peer: SocketAddr) {
        let since = Instant::now();
        let handle = match stream.set_nonblocking(false).and_then(|()| stream.try_clone()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("connection from {peer} dropped: {e}");
                return;
            }
        };
        tracing::debug!("connection from {peer}");
        {
            let mut pending = lock(&self.pending);
            while pending.len() >= MAX_PENDING {
                let Some(old) = pending.pop_front() else { break };
                let _ = old.stream.shutdown(Shutdown::Both);
                tracing::warn!(
                    "connection from {} dropped before authentication after {} ms: {MAX_PENDING} \
                     connections were being authenticated and the oldest goes first",
                    old.peer,
                    old.since.elapsed().as_millis()
                );
            }
            pending.push_back(Pending { seq, peer, since, stream: handle });
        }
        let (key, desk, pending) = (self.key.clone(), self.desk.clone(), self.pending.clone());
        let spawned = std::thread::Builder::new()
            .name("migration-handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn(move || serve(seq, stream, peer, since + HANDSHAKE_DEADLINE, &key, &desk, &pending));
        if let Err(e) = spawned {
            lock(&self.pending).retain(|p| p.seq != seq);
            tracing::warn!("connection from {peer} dropped: cannot start its handshake thread: {e}");
        }
    }
}

/// One connection's handshake thread: authenticates it by `deadline`, then hands it over
/// (or tells the source why not).
fn serve(
    seq: u64,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    key: &Key,
    desk: &Desk,
    pending: &PendingList,
) {
    let mut hello = None;
    let r = authenticate(&stream, key, desk, deadline, &mut hello);
    // Authenticated or failed, it is no longer pending; if it was dropped as the oldest,
    // the acceptor has said so and shut it down.
    let dropped = {
        let mut p = lock(pending);
        let before = p.len();
        p.retain(|p| p.seq != seq);
        p.len() == before
    };
    if dropped {
        return;
    }
    match r {
        Ok(()) => {
            let Some(hello) = hello else { return };
            let (id, k) = (hello.migration_id.clone(), hello.stream);
            if k == 0 {
                tracing::info!("migration {id}: source authenticated");
            } else {
                tracing::debug!("migration {id}: stream {k} from {peer} authenticated");
            }
            let conn = Authenticated { stream, peer, hello };
            if let Err(refused) = desk.hand_over(conn) {
                let (conn, why) = *refused;
                let msg = error_chain(&why);
                if let Error::Busy(_) = why {
                    tracing::warn!("migration {id}: refused: {msg}");
                } else {
                    tracing::warn!("migration {id}: dropped a connection from {peer}: {msg}");
                }
                refuse(&conn.stream, &msg, why.code());
            }
        }
        Err(e) => {
            let msg = error_chain(&e);
            // Tell the peer why, unless the connection is what failed or it aborted.
            if !matches!(e, Error::Protocol(wire::Error::Io(_) | wire::Error::PeerAborted { .. })) {
                let at = deadline.min(Instant::now() + Duration::from_secs(1));
                let abort = to_json(&wire::Abort::new(msg.clone(), e.code()));
                let _ = write_frame(&mut Deadline { stream: &stream, at }, Kind::Abort, &abort);
            }
            match &hello {
                Some(h) if h.stream == 0 => {
                    let next = match desk.current() {
                        Some(other) => format!("migration {other} goes on"),
                        None => "waiting for another migration".into(),
                    };
                    tracing::warn!("migration {}: failed: {msg}; nothing runs here; {next}", h.migration_id)
                }
                Some(h) => {
                    tracing::warn!("migration {}: dropped a connection from {peer}: {msg}", h.migration_id)
                }
                None => tracing::warn!("connection from {peer} dropped before authentication: {msg}"),
            }
        }
    }
}

/// Hello, Challenge, ChallengeResponse, all by `deadline`; nothing but those frames, none
/// over 4 KiB. `hello` is the peer's Hello once it is known to be well-formed.
fn authenticate(
    stream: &TcpStream,
    key: &Key,
    desk: &Desk,
    deadline: Instant,
    hello: &mut Option<Hello>,
) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Protocol(wire::Error::Io(e));
    stream.set_nodelay(true).map_err(io)?;
    let mut rw = Deadline { stream, at: deadline };
    let mut payload = Vec::new();
    let h = hello.insert(handshake::read_hello(&mut rw, &mut payload)?);
    handshake::check_hello(h)?;
    if h.stream == 0 {
        tracing::info!("migration {}: source runs Ferry {}", h.migration_id, h.ferry_version);
    } else {
        desk.may_join(&h.migration_id, h.stream)?;
    }
    let my_nonce = auth::nonce()?;
    handshake::challenge(&mut rw, key, h, &my_nonce, &mut payload)?;
    Ok(())
}

/// Tells an authenticated source why its connection has no place here: an Abort, then
/// what it sends meanwhile (its Config) is read and thrown away until it closes, so that
/// closing here does not reset the connection before it has read the Abort.
fn refuse(stream: &TcpStream, reason: &str, code: ReasonCode) {
    let at = Instant::now() + REFUSE_WINDOW;
    let mut rw = Deadline { stream, at };
    let abort = to_json(&wire::Abort::new(reason, code));
    if write_frame(&mut rw, Kind::Abort, &abort).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(rw.read(&mut sink), Ok(n) if n > 0) {}
}

/// A connection read and written against one deadline: each call may block only for the
/// time left, so a peer that sends one byte at a time gains nothing.
struct Deadline<'a> {
    stream: &'a TcpStream,
    at: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Self::expired());
        }
        Ok(left)
    }

    fn expired() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no complete handshake within {} s", HANDSHAKE_DEADLINE.as_secs()),
        )
    }

    /// A socket timeout shows as `WouldBlock`: the deadline passed.
    fn timed<T>(r: std::io::Result<T>) -> std::io::Result<T> {
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Self::expired(),
            _ => e,
        })
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        Self::timed((&mut &*self.stream).read(buf))
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        Self::timed((&mut &*self.stream).write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (c, s)
    }

    /// One deadline for the whole read: a byte every 100 ms does not extend it.
    #[test]
    fn a_dribbling_peer_meets_one_deadline() {
        let (mut c, s) = pair();
        let t = std::thread::spawn(move || {
            for _ in 0..30 {
                if c.write_all(b"F").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let mut rw = Deadline { stream: &s, at: started + Duration::from_millis(700) };
        let mut payload = Vec::new();
        let e = wire::read_handshake_frame(&mut rw, &mut payload).expect_err("deadline");
        let took = started.elapsed();
        assert!(matches!(&e, wire::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut), "{e:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
        drop(s);
        let _ = t.join();
    }

    fn hello(id: &str, stream: u32) -> Hello {
        Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            migration_id: id.into(),
            ferry_version: "test".into(),
            nonce: auth::hex(&[1u8; auth::NONCE_LEN]),
            stream,
            ..Default::default()
        }
    }

    /// The desk's answers: the first stream-0 connection becomes the migration, another is
    /// told the receiver is busy; extra streams join only the migration named, while it
    /// waits for them.
    #[test]
    fn the_desk_takes_one_migration_and_its_streams() {
        let desk = Desk::new().expect("desk");
        let conn = |h: Hello| {
            let (c, s) = pair();
            (c, Authenticated { stream: s, peer: "127.0.0.1:1".parse().expect("addr"), hello: h })
        };
        assert!(matches!(desk.may_join("m-a", 1), Err(Error::NotJoined(_))));
        let (_c1, a) = conn(hello("m-a", 0));
        assert!(desk.hand_over(a).is_ok());
        let (_c2, b) = conn(hello("m-b", 0));
        let refused = desk.hand_over(b).expect_err("busy");
        assert!(matches!(&refused.1, Error::Busy(id) if id == "m-a"));
        assert_eq!(error_chain(&refused.1), "the receiver is busy with migration m-a");
        assert_eq!(desk.take_first().expect("first").hello.migration_id, "m-a");
        // No extra streams before the migration asks for them, nor beyond its count.
        assert!(desk.may_join("m-a", 1).is_err());
        desk.start_joining(3);
        assert!(desk.may_join("m-a", 2).is_ok());
        assert!(desk.may_join("m-a", 3).is_err());
        assert!(desk.may_join("m-b", 1).is_err());
        let (_c3, j) = conn(hello("m-a", 2));
        assert!(desk.hand_over(j).is_ok());
        assert_eq!(desk.take_joined().len(), 1);
        desk.stop_joining();
        let (_c4, late) = conn(hello("m-a", 1));
        assert!(desk.hand_over(late).is_err());
        desk.idle();
        let (_c5, c) = conn(hello("m-c", 0));
        assert!(desk.hand_over(c).is_ok());
        desk.close();
        assert!(desk.take_first().is_none());
        let (_c6, d) = conn(hello("m-d", 0));
        assert!(desk.hand_over(d).is_err());
    }
}
