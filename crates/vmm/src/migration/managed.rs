//! The receiving VMM's API, from its first moment: `GET /vm` shows `receiving` with the
//! phase and progress of the incoming migration, `PUT /vm/receive` configures a VMM
//! started empty, `PUT /vm/migrate/cancel` cancels the incoming migration before its
//! commit. Once the VM arrives, [`super::receive`] hands the same server to the VM's
//! bridge ([`ferry_api::server::Delegate`]).
//!
//! Nothing here blocks on the receiving thread: requests read and write [`Status`], and a
//! configuration is left in a slot the receiving thread is woken to take.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_api::events::Events;
use ferry_api::server::Handler;
use ferry_api::{
    ApiError, ReceivePhase, ReceiveRequest, ReceiveStarted, ReceivingInfo, Request, Response, RunState,
    VmInfo,
};
use ferry_migration::auth::{self, Key};
use vmm_sys_util::eventfd::EventFd;

/// Errors setting up where and with which key to receive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key is not 16 to 4096 bytes.
    #[error("the key is {0} bytes; it must be {min} to {max}", min = auth::MIN_KEY_LEN, max = auth::MAX_KEY_LEN)]
    KeyLength(usize),
    /// `auth_key_hex` is not hex.
    #[error("auth_key_hex is not an even number of hex digits")]
    KeyNotHex,
    /// The key file or descriptor cannot be read.
    #[error("cannot read the key")]
    KeyRead(#[source] std::io::Error),
    /// The key file is unusable.
    #[error("cannot load the key")]
    KeyLoad(#[source] auth::Error),
    /// The descriptor is not a listening TCP socket.
    #[error("descriptor {fd} is not a listening TCP socket: {why}")]
    NotListening {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        why: String,
    },
    /// The address does not parse.
    #[error("bad listen address")]
    Address(#[source] Box<super::Error>),
    /// Binding failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request names both or neither of two alternatives.
    #[error("{0}")]
    Request(String),
}

/// Reads a key from `fd` (a pipe, a file) until end of file, and closes `fd`.
pub fn key_from_fd(fd: RawFd) -> Result<Key, Error> {
    use std::io::Read;
    if !fd_is_open(fd) {
        return Err(Error::KeyRead(std::io::Error::from_raw_os_error(libc::EBADF)));
    }
    // SAFETY: as above: `fd` is open and owned by no one else from here on.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    f.by_ref().take(auth::MAX_KEY_LEN as u64 + 1).read_to_end(&mut bytes).map_err(Error::KeyRead)?;
    Key::from_bytes(bytes).map_err(Error::KeyLength)
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of an int and its length.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Takes `fd`, an inherited descriptor, as the listener, after checking it is a listening
/// IPv4 or IPv6 stream socket. On error the descriptor is left alone (not closed).
pub fn listener_from_fd(fd: RawFd) -> Result<TcpListener, Error> {
    let not = |why: String| Error::NotListening { fd, why };
    if !fd_is_open(fd) {
        return Err(not("no such descriptor".into()));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| not(format!("not a socket ({e})")))?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(not(format!("socket family {domain}, not IPv4 or IPv6")));
    }
    let ty = sockopt(fd, libc::SO_TYPE).map_err(|e| not(e.to_string()))?;
    if ty != libc::SOCK_STREAM {
        return Err(not(format!("socket type {ty}, not a stream (TCP) socket")));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| not(e.to_string()))? == 0 {
        return Err(not("the socket does not listen (call listen() before handing it over)".into()));
    }
    // SAFETY: `fd` is an open listening TCP socket handed to this process to own; nothing
    // else in the process uses it.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    // SAFETY: sets close-on-exec on the descriptor this process now owns.
    unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

/// Binds `tcp:HOST:PORT`.
pub fn bind(listen: &str) -> Result<TcpListener, Error> {
    let addr = super::parse_address(listen).map_err(|e| Error::Address(Box::new(e)))?;
    TcpListener::bind(&addr).map_err(|source| Error::Listen { addr, source })
}

/// `tcp:HOST:PORT` of a bound listener.
pub fn local_name(listener: &TcpListener) -> String {
    match listener.local_addr() {
        Ok(SocketAddr::V6(a)) => format!("tcp:[{}]:{}", a.ip(), a.port()),
        Ok(a) => format!("tcp:{a}"),
        Err(_) => "tcp:?".into(),
    }
}

/// Checks and carries out a `PUT /vm/receive`: binds or takes the listener, decodes the key.
pub fn setup(req: &ReceiveRequest) -> Result<(TcpListener, Key), Error> {
    let key = match (&req.auth_key_hex, &req.auth_key_file) {
        (Some(h), None) => {
            let bytes = auth::unhex(h.trim()).ok_or(Error::KeyNotHex)?;
            Key::from_bytes(bytes).map_err(Error::KeyLength)?
        }
        (None, Some(f)) => Key::load(f).map_err(Error::KeyLoad)?,
        _ => return Err(Error::Request("give exactly one of auth_key_hex and auth_key_file".into())),
    };
    let listener = match (&req.listen, req.listen_fd) {
        (Some(a), None) => bind(a)?,
        (None, Some(fd)) => listener_from_fd(fd)?,
        _ => return Err(Error::Request("give exactly one of listen and listen_fd".into())),
    };
    Ok((listener, key))
}

/// What a receiving VMM shows and shares between its API and the receiving thread.
pub struct Status {
    inner: Mutex<Inner>,
    /// Pages placed by the migration in progress.
    pub pages: AtomicU64,
    /// Bytes of page data received by the migration in progress.
    pub bytes: AtomicU64,
    /// Set by a cancel; the receiving thread logs the failure as a cancel.
    cancelled: AtomicBool,
    /// Wakes the receiving thread when a configuration arrives.
    pub wake: EventFd,
    started: Instant,
}

struct Inner {
    phase: ReceivePhase,
    listen: Option<String>,
    id: Option<String>,
    /// Clones of the migration's streams, shut down by a cancel.
    streams: Vec<TcpStream>,
    /// A `PUT /vm/receive` configuration not yet taken by the receiving thread.
    configured: Option<(TcpListener, Key)>,
    /// Whether a listener is configured (from the command line or the API).
    has_listener: bool,
    /// What the incoming VM is, once its Config passed the checks.
    description: Option<crate::Description>,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status").finish_non_exhaustive()
    }
}

impl Status {
    /// A status for a VMM that listens already (`listen` is `Some`) or waits to be told.
    pub fn new(listen: Option<String>) -> std::io::Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner {
                phase: if listen.is_some() { ReceivePhase::Waiting } else { ReceivePhase::Unconfigured },
                has_listener: listen.is_some(),
                description: None,
                listen,
                id: None,
                streams: Vec::new(),
                configured: None,
            }),
            pages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            started: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration `PUT /vm/receive` left, if any.
    pub fn take_configured(&self) -> Option<(TcpListener, Key)> {
        let _ = self.wake.read();
        self.lock().configured.take()
    }

    /// A migration's first stream proved the key.
    pub fn begin(&self, id: &str, stream: Option<&TcpStream>) {
        let mut i = self.lock();
        i.id = Some(id.to_owned());
        i.phase = ReceivePhase::Authenticating;
        i.streams = stream.and_then(|s| s.try_clone().ok()).into_iter().collect();
        self.pages.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.cancelled.store(false, Ordering::SeqCst);
    }

    /// Another stream of the migration in progress, for a cancel to shut down too.
    pub fn add_stream(&self, stream: &TcpStream) {
        if let Ok(s) = stream.try_clone() {
            self.lock().streams.push(s);
        }
    }

    /// The migration in progress moved to `phase`. Returns false when it was cancelled
    /// (then a move to `Activating` must not happen).
    pub fn enter(&self, phase: ReceivePhase) -> bool {
        let mut i = self.lock();
        if self.cancelled.load(Ordering::SeqCst) {
            return false;
        }
        i.phase = phase;
        true
    }

    /// The incoming VM's Config passed the checks: `GET /vm` shows its memory, vCPUs and
    /// kernel from now on.
    pub fn describe(&self, d: &crate::Description) {
        self.lock().description = Some(d.clone());
    }

    /// The migration ended (failed or cancelled): back to waiting. Returns whether it was
    /// cancelled through the API.
    pub fn end(&self) -> bool {
        let mut i = self.lock();
        i.phase = ReceivePhase::Waiting;
        i.id = None;
        i.description = None;
        i.streams.clear();
        self.cancelled.swap(false, Ordering::SeqCst)
    }

    /// Whether the migration in progress was cancelled through the API.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Counts pages placed: `data` of them carried data.
    pub fn placed(&self, pages: u64, data: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.bytes.fetch_add(data * ferry_arch::layout::PAGE_SIZE, Ordering::Relaxed);
    }

    /// Cancels the migration in progress, before its commit.
    fn cancel(&self) -> Result<String, ApiError> {
        let i = self.lock();
        match (i.phase, &i.id) {
            (ReceivePhase::Activating, Some(id)) => Err(ApiError::conflict(format!(
                "migration {id} is past its last cancellable moment (restored here, the source may have committed): the VM is being activated here"
            ))),
            (_, Some(id)) => {
                self.cancelled.store(true, Ordering::SeqCst);
                // Reads fail at once; the receiving thread then tells the source (Abort,
                // code cancelled) on the main stream and drops everything.
                for s in &i.streams {
                    let _ = s.shutdown(std::net::Shutdown::Read);
                }
                tracing::info!("migration {id}: cancelled through the API; the source keeps the VM");
                Ok(id.clone())
            }
            _ => Err(ApiError::conflict("no incoming migration is in progress")),
        }
    }

    fn configure(&self, req: &ReceiveRequest) -> Result<ReceiveStarted, ApiError> {
        let mut i = self.lock();
        if i.has_listener {
            return Err(ApiError::conflict(match &i.listen {
                Some(l) => format!("this VMM already receives on {l}"),
                None => "this VMM already receives".into(),
            }));
        }
        let (listener, key) = setup(req).map_err(|e| ApiError::bad_request(super::error_chain(&e)))?;
        let listen = local_name(&listener);
        i.has_listener = true;
        i.listen = Some(listen.clone());
        i.phase = ReceivePhase::Waiting;
        i.configured = Some((listener, key));
        drop(i);
        let _ = self.wake.write(1);
        Ok(ReceiveStarted { listen })
    }

    fn info(&self) -> VmInfo {
        let i = self.lock();
        let d = i.description.as_ref();
        VmInfo {
            state: RunState::Receiving,
            memory_bytes: d.map_or(0, |d| d.memory),
            vcpus: d.map_or(0, |d| d.vcpus),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            kernel: d.map(|d| d.kernel.clone()).unwrap_or_default(),
            pid: std::process::id(),
            restored_from: None,
            home: None,
            migration: None,
            devices: Vec::new(),
            receiving: Some(ReceivingInfo {
                phase: i.phase,
                listen: i.listen.clone(),
                migration_id: i.id.clone(),
                pages: self.pages.load(Ordering::Relaxed),
                bytes: self.bytes.load(Ordering::Relaxed),
            }),
            fenced: None,
            cpu_features: Vec::new(),
            cpu_model: None,
        }
    }
}

/// The API handler while no VM runs here.
#[derive(Debug)]
pub struct Receiving {
    /// Shared with the receiving thread.
    pub status: Arc<Status>,
    /// The incoming migrations' events.
    pub events: Arc<Events>,
}

impl Handler for Receiving {
    fn handle(&self, request: Request) -> Result<Response, ApiError> {
        let busy = || ApiError::conflict("the VM is receiving: no VM runs here yet");
        match request {
            Request::Info => Ok(Response::Info(self.status.info())),
            Request::Receive(req) => self.status.configure(&req).map(Response::ReceiveStarted),
            Request::MigrateCancel => self.status.cancel().map(|_| Response::Done),
            Request::MigrationStatus => {
                Err(ApiError::not_found("no outgoing migration: this VMM is receiving (see GET /vm)"))
            }
            Request::Pause | Request::Resume | Request::Snapshot(_) | Request::Migrate(_) => Err(busy()),
        }
    }

    fn events(&self) -> Option<Arc<Events>> {
        Some(self.events.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listening_tcp_socket_is_taken() {
        let file = std::fs::File::open("/proc/self/status").expect("file");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let unix = std::os::unix::net::UnixListener::bind(
            std::env::temp_dir().join(format!("ferry-managed-{}.sock", std::process::id())),
        )
        .expect("unix");
        let tcp = socket2_free_connected();
        for fd in [file.as_raw_fd(), udp.as_raw_fd(), unix.as_raw_fd(), tcp.as_raw_fd(), -1, 100_000] {
            assert!(matches!(listener_from_fd(fd), Err(Error::NotListening { .. })), "fd {fd}");
        }
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("ferry-managed-{}.sock", std::process::id())),
        );
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = l.as_raw_fd();
        std::mem::forget(l);
        let taken = listener_from_fd(fd).expect("a listening socket is taken");
        assert!(local_name(&taken).starts_with("tcp:127.0.0.1:"));
    }

    /// A connected (not listening) TCP socket.
    fn socket2_free_connected() -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        TcpStream::connect(l.local_addr().expect("addr")).expect("connect")
    }

    #[test]
    fn receive_requests_need_one_of_each_and_a_key_of_the_right_length() {
        let req = |listen: Option<&str>, fd: Option<i32>, hex: Option<String>| ReceiveRequest {
            listen: listen.map(Into::into),
            listen_fd: fd,
            auth_key_hex: hex,
            auth_key_file: None,
        };
        let good = Some("ab".repeat(16));
        assert!(matches!(setup(&req(None, None, good.clone())), Err(Error::Request(_))));
        assert!(matches!(
            setup(&req(Some("tcp:127.0.0.1:0"), Some(3), good.clone())),
            Err(Error::Request(_))
        ));
        assert!(matches!(setup(&req(Some("tcp:127.0.0.1:0"), None, None)), Err(Error::Request(_))));
        assert!(matches!(
            setup(&req(Some("tcp:127.0.0.1:0"), None, Some("ab".repeat(15)))),
            Err(Error::KeyLength(15))
        ));
        assert!(matches!(
            setup(&req(Some("tcp:127.0.0.1:0"), None, Some("xyz".into()))),
            Err(Error::KeyNotHex)
        ));
        assert!(matches!(setup(&req(Some("127.0.0.1:0"), None, good.clone())), Err(Error::Address(_))));
        let (l, _) = setup(&req(Some("tcp:127.0.0.1:0"), None, good)).expect("good request");
        assert_ne!(l.local_addr().expect("addr").port(), 0);
    }

    #[test]
    fn a_second_configuration_and_a_cancel_with_nothing_in_progress_are_refused() {
        let status = Status::new(None).expect("status");
        let req = ReceiveRequest {
            listen: Some("tcp:127.0.0.1:0".into()),
            auth_key_hex: Some("cd".repeat(32)),
            ..Default::default()
        };
        assert_eq!(status.cancel().expect_err("nothing to cancel").status, 409);
        let started = status.configure(&req).expect("first");
        assert!(started.listen.starts_with("tcp:127.0.0.1:"));
        assert_eq!(status.configure(&req).expect_err("second").status, 409);
        assert!(status.take_configured().is_some());
        status.begin("m-1", None);
        assert!(status.enter(ReceivePhase::ReceivingMemory));
        assert!(status.cancel().is_ok());
        assert!(!status.enter(ReceivePhase::Activating), "a cancel that came first wins");
        assert!(status.end());
        assert_eq!(status.info().receiving.expect("receiving").phase, ReceivePhase::Waiting);
    }
}
