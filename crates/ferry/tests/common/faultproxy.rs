//! A frame-aware TCP proxy between a migration's source and destination that breaks the
//! migration at one chosen frame. It reads each frame's 16-byte header (`FMIG`, kind, flags,
//! payload length, CRC) and forwards the payload's `len` bytes after it (a `Pages` frame's
//! length includes its page data), in both directions, on every connection it accepts.
//! The rule watches the first connection (stream 0); extra streams only pass through, and
//! are cut with it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ferry_migration::protocol::Kind;

const HEADER_LEN: usize = 16;

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Source to destination.
    ToDst,
    /// Destination to source.
    ToSrc,
}

/// Whether the action happens before the triggering frame is forwarded, or after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

/// The frame that fires the rule: the `nth` (from 1) frame of `kind` going `dir` on the
/// first connection, counting only frames after `after_pass_ends` PassEnd frames went to
/// the destination (1: pass 2 or later).
#[derive(Clone, Copy, Debug)]
pub struct Trigger {
    pub dir: Dir,
    pub kind: Kind,
    pub nth: u32,
    pub after_pass_ends: u32,
    pub when: When,
}

impl Trigger {
    /// The first `kind` frame going `dir`.
    pub fn first(dir: Dir, kind: Kind, when: When) -> Self {
        Trigger { dir, kind, nth: 1, after_pass_ends: 0, when }
    }
}

/// What happens when the rule fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Close both sides of every connection.
    Cut,
    /// Close the source's side of every connection; the destination's stays open and hears
    /// nothing more (it sees neither the rest of the stream nor a close).
    CutSource,
    /// Stop forwarding `Dir` (the frame and everything after it), keeping both connections open.
    Silence(Dir),
    /// Flip one byte of the frame's payload (or of its header's CRC if it has none).
    Corrupt,
    /// Stop forwarding this direction, tell the test ([`FaultProxy::wait_fired`]) and wait
    /// for [`FaultProxy::release`] (go on) or [`FaultProxy::cut`].
    Hold,
    /// Tell the test and go on forwarding (the test acts on its own, e.g. after a delay).
    Notify,
}

#[derive(Default)]
struct State {
    /// Frames of the trigger's kind and direction seen so far (that count).
    matched: u32,
    /// PassEnd frames that went to the destination on the first connection.
    pass_ends: u32,
    fired: bool,
    held: bool,
    closed: bool,
    keep_dst_open: bool,
    silenced: HashMap<Dir, bool>,
    /// (source side, destination side) of every connection.
    conns: Vec<(TcpStream, TcpStream)>,
}

struct Shared {
    rule: Option<(Trigger, Action)>,
    st: Mutex<State>,
    cv: Condvar,
    fired_tx: Mutex<mpsc::Sender<()>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self, st: &mut State, dst_too: bool) {
        for (a, b) in &st.conns {
            let _ = a.shutdown(Shutdown::Both);
            if dst_too {
                let _ = b.shutdown(Shutdown::Both);
            }
        }
        if dst_too {
            st.closed = true;
        } else {
            st.keep_dst_open = true;
        }
        self.cv.notify_all();
    }
}

/// A running proxy; listens on 127.0.0.1:[`FaultProxy::port`]. Dropping it closes everything.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    fired_rx: mpsc::Receiver<()>,
}

impl FaultProxy {
    /// Forwards every connection to 127.0.0.1:`to`, applying `rule` (none: a plain proxy).
    pub fn start(to: u16, rule: Option<(Trigger, Action)>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = l.local_addr().expect("proxy address").port();
        let (tx, fired_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            rule,
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            fired_tx: Mutex::new(tx),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for (i, a) in l.incoming().enumerate() {
                let Ok(a) = a else { break };
                if sh.lock().closed {
                    break;
                }
                let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else { break };
                let clones = (a.try_clone(), b.try_clone(), a.try_clone(), b.try_clone());
                let (Ok(a2), Ok(b2), Ok(a3), Ok(b3)) = clones else { break };
                sh.lock().conns.push((a3, b3));
                let (s1, s2) = (sh.clone(), sh.clone());
                std::thread::spawn(move || pump(&s1, Dir::ToDst, i == 0, a, b));
                std::thread::spawn(move || pump(&s2, Dir::ToSrc, i == 0, b2, a2));
            }
        });
        FaultProxy { port, shared, fired_rx }
    }

    /// Waits until the rule fired (Hold or Notify); false on timeout.
    pub fn wait_fired(&self, timeout: Duration) -> bool {
        self.fired_rx.recv_timeout(timeout).is_ok()
    }

    /// Whether the rule has fired.
    pub fn fired(&self) -> bool {
        self.shared.lock().fired
    }

    /// Ends a Hold: the held direction goes on.
    pub fn release(&self) {
        self.shared.lock().held = false;
        self.shared.cv.notify_all();
    }

    /// Closes both sides of every connection.
    pub fn cut(&self) {
        let sh = &self.shared;
        sh.close(&mut sh.lock(), true);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        // Wake the accept loop so that it sees `closed` and frees the port.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Forwards frames from `from` to `to` until either ends, applying the rule on the first
/// connection.
fn pump(sh: &Shared, dir: Dir, first: bool, mut from: TcpStream, mut to: TcpStream) {
    let mut frame = Vec::new();
    loop {
        frame.resize(HEADER_LEN, 0);
        if from.read_exact(&mut frame).is_err() {
            break;
        }
        let kind = u16::from_le_bytes([frame[4], frame[5]]);
        let len = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]) as usize;
        frame.resize(HEADER_LEN + len, 0);
        if from.read_exact(&mut frame[HEADER_LEN..]).is_err() {
            break;
        }
        let mut fire = None;
        if first {
            let mut st = sh.lock();
            if let Some((t, action)) = sh.rule {
                if !st.fired && t.dir == dir && t.kind as u16 == kind && st.pass_ends >= t.after_pass_ends {
                    st.matched += 1;
                    if st.matched == t.nth {
                        st.fired = true;
                        fire = Some((t.when, action));
                    }
                }
            }
            if dir == Dir::ToDst && kind == Kind::PassEnd as u16 {
                st.pass_ends += 1;
            }
        }
        if let Some((When::Before, action)) = fire {
            if !act(sh, action, &mut frame) {
                break;
            }
        }
        if !wait_unsilenced(sh, dir) || to.write_all(&frame).is_err() {
            break;
        }
        if let Some((When::After, action)) = fire {
            if !act(sh, action, &mut frame) {
                break;
            }
        }
    }
    let st = sh.lock();
    let (src, dst) = if dir == Dir::ToDst { (&from, &to) } else { (&to, &from) };
    let _ = src.shutdown(Shutdown::Both);
    if !st.keep_dst_open {
        let _ = dst.shutdown(Shutdown::Both);
    }
}

/// Applies `action` (to this frame, or this direction); false when the pump must end.
fn act(sh: &Shared, action: Action, frame: &mut [u8]) -> bool {
    let mut st = sh.lock();
    match action {
        Action::Cut => {
            sh.close(&mut st, true);
            return false;
        }
        Action::CutSource => {
            sh.close(&mut st, false);
            return false;
        }
        Action::Silence(d) => {
            st.silenced.insert(d, true);
        }
        Action::Corrupt => {
            let at = if frame.len() > HEADER_LEN { HEADER_LEN } else { 12 };
            frame[at] ^= 0x5a;
        }
        Action::Notify => {
            let _ = sh.fired_tx.lock().map(|t| t.send(()));
        }
        Action::Hold => {
            st.held = true;
            let _ = sh.fired_tx.lock().map(|t| t.send(()));
            while st.held && !st.closed {
                st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
    !st.closed
}

/// Waits while `dir` is silenced (until the proxy closes); false when it closed.
fn wait_unsilenced(sh: &Shared, dir: Dir) -> bool {
    let mut st = sh.lock();
    while st.silenced.get(&dir).copied().unwrap_or(false) && !st.closed {
        st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    !st.closed
}
