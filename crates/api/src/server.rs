//! The API server: a thread running a small tokio runtime with an axum router on the
//! unix socket. Each request is parsed into a [`Request`] and handed to the VMM through a
//! [`Handler`], called on a blocking thread so the VMM may take its time (a snapshot).
//! `GET /vm/events` and `GET /version` are answered here without the VMM: the events come
//! from the ring the handler shares ([`Handler::events`]).

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, put};
use axum::{Json, Router};

use crate::events::{Batch, Events};
use crate::types::{
    ApiError, MigrateRequest, ReceiveRequest, Request, Response, SnapshotRequest, VersionInfo,
};

/// The VMM side of the API.
pub trait Handler: Send + Sync + 'static {
    /// Carries out `request`. May block.
    fn handle(&self, request: Request) -> Result<Response, ApiError>;

    /// The VMM's event ring, for `GET /vm/events` (`None`: the endpoint answers 404).
    fn events(&self) -> Option<Arc<Events>> {
        None
    }
}

/// A handler that passes every request to a target that can be replaced while the server
/// runs: a receiving VMM serves its socket from its first moment with one handler, then
/// hands the same socket to the VM that arrived, with no moment where connections fail.
pub struct Delegate {
    target: std::sync::RwLock<Arc<dyn Handler>>,
}

impl Delegate {
    /// Delegates to `target` until [`Delegate::set`].
    pub fn new(target: Arc<dyn Handler>) -> Self {
        Self { target: std::sync::RwLock::new(target) }
    }

    /// From now on, requests go to `target` (those in flight finish with the old one).
    pub fn set(&self, target: Arc<dyn Handler>) {
        *self.target.write().unwrap_or_else(|p| p.into_inner()) = target;
    }

    fn current(&self) -> Arc<dyn Handler> {
        self.target.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::fmt::Debug for Delegate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delegate").finish_non_exhaustive()
    }
}

impl Handler for Delegate {
    fn handle(&self, request: Request) -> Result<Response, ApiError> {
        self.current().handle(request)
    }

    fn events(&self) -> Option<Arc<Events>> {
        self.current().events()
    }
}

/// Events copied out of the ring per chunk written to an event stream.
const EVENTS_PER_CHUNK: usize = 64;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process serves this socket.
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    /// Binding failed.
    #[error("cannot listen on API socket {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runtime or thread cannot start.
    #[error("cannot start the API server")]
    Start(#[source] std::io::Error),
}

/// A running server. [`ServerHandle::shutdown`] (or dropping it) stops accepting
/// connections, lets the requests in flight finish writing their responses, and removes
/// the socket file.
#[derive(Debug)]
pub struct ServerHandle {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops the server gracefully, waiting at most `timeout` for responses in flight.
    pub fn shutdown(&mut self, timeout: std::time::Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + timeout;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown(std::time::Duration::from_secs(2));
    }
}

/// Binds `path` (replacing a stale socket nobody listens on) and serves it on a thread.
pub fn spawn(path: &Path, handler: Arc<dyn Handler>) -> Result<ServerHandle, Error> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener =
        StdUnixListener::bind(path).map_err(|source| Error::Bind { path: path.to_owned(), source })?;
    // Only the VMM's user may drive the VM (the socket is created with the umask's mode).
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|source| Error::Bind { path: path.to_owned(), source })?;
    listener.set_nonblocking(true).map_err(|source| Error::Bind { path: path.to_owned(), source })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(Error::Start)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("API server cannot use its socket: {e}");
                        return;
                    }
                };
                let serve = axum::serve(listener, router(handler)).with_graceful_shutdown(async move {
                    let _ = stopped.await;
                });
                if let Err(e) = serve.await {
                    tracing::error!("API server stopped: {e}");
                }
            })
        })
        .map_err(Error::Start)?;
    Ok(ServerHandle { path: path.to_owned(), stop: Some(stop), thread: Some(thread) })
}

/// The routes.
pub fn router(handler: Arc<dyn Handler>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/vm", get(info))
        .route("/vm/migration", get(migration_status))
        .route("/vm/events", get(events))
        .route("/vm/pause", put(pause))
        .route("/vm/resume", put(resume))
        .route("/vm/snapshot", put(snapshot))
        .route("/vm/migrate", put(migrate))
        .route("/vm/migrate/cancel", put(migrate_cancel))
        .route("/vm/receive", put(receive))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(handler)
}

/// Endpoints that take no body refuse one, rather than act on a request they may have
/// misread (`{}` and empty are accepted).
fn no_body(body: &Bytes) -> Result<(), ApiError> {
    let text = body.trim_ascii();
    if text.is_empty() || text == b"{}" {
        return Ok(());
    }
    Err(ApiError::bad_request("this endpoint takes no request body (or an empty JSON object)"))
}

async fn call(handler: Arc<dyn Handler>, request: Request) -> HttpResponse {
    let result = tokio::task::spawn_blocking(move || handler.handle(request)).await;
    match result {
        Ok(Ok(Response::Info(info))) => Json(info).into_response(),
        Ok(Ok(Response::Snapshot(report))) => Json(report).into_response(),
        Ok(Ok(Response::MigrationStarted(started))) => (StatusCode::ACCEPTED, Json(started)).into_response(),
        Ok(Ok(Response::MigrationStatus(info))) => Json(info).into_response(),
        Ok(Ok(Response::ReceiveStarted(started))) => (StatusCode::ACCEPTED, Json(started)).into_response(),
        Ok(Ok(Response::Done)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error_response(e),
        Err(e) => error_response(ApiError::internal(format!("the request handler failed: {e}"))),
    }
}

fn error_response(e: ApiError) -> HttpResponse {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e)).into_response()
}

async fn info(State(h): State<Arc<dyn Handler>>) -> HttpResponse {
    call(h, Request::Info).await
}

async fn version() -> HttpResponse {
    Json(VersionInfo::current()).into_response()
}

async fn migration_status(State(h): State<Arc<dyn Handler>>) -> HttpResponse {
    call(h, Request::MigrationStatus).await
}

/// `?since=SEQ` (absent: 0, every event the ring holds).
fn parse_since(query: Option<&str>) -> Result<u64, ApiError> {
    let mut since = 0;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = v.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "bad events request: since must be a sequence number (0 or more), not {v:?}"
                    ))
                })?
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "bad events request: unknown query parameter {pair:?} (only since=SEQ)"
                )))
            }
        }
    }
    Ok(since)
}

/// `GET /vm/events?since=SEQ`: newline-delimited JSON, streamed while the connection is
/// open. The stream copies events out of the ring only as the connection takes them, so
/// a client that does not read holds nothing but its cursor; it never slows the VMM.
async fn events(State(h): State<Arc<dyn Handler>>, uri: Uri) -> HttpResponse {
    let since = match parse_since(uri.query()) {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    let Some(ring) = h.events() else {
        return error_response(ApiError::not_found("this VMM keeps no events"));
    };
    let watch = ring.subscribe();
    let stream = futures_util::stream::unfold((ring, watch, since), |(ring, mut watch, cursor)| async move {
        loop {
            // Marked seen before looking, so an event pushed in between wakes the wait.
            watch.borrow_and_update();
            match ring.after(cursor, EVENTS_PER_CHUNK) {
                Batch::Events(events, cursor) => {
                    let mut chunk = Vec::new();
                    for e in &events {
                        if serde_json::to_writer(&mut chunk, e).is_ok() {
                            chunk.push(b'\n');
                        }
                    }
                    let out: Result<Bytes, std::convert::Infallible> = Ok(Bytes::from(chunk));
                    return Some((out, (ring, watch, cursor)));
                }
                Batch::Closed => return None,
                Batch::Wait => {
                    if watch.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn pause(State(h): State<Arc<dyn Handler>>, body: Bytes) -> HttpResponse {
    if let Err(e) = no_body(&body) {
        return error_response(e);
    }
    call(h, Request::Pause).await
}

async fn resume(State(h): State<Arc<dyn Handler>>, body: Bytes) -> HttpResponse {
    if let Err(e) = no_body(&body) {
        return error_response(e);
    }
    call(h, Request::Resume).await
}

async fn snapshot(
    State(h): State<Arc<dyn Handler>>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> HttpResponse {
    match body {
        Ok(Json(req)) if req.to.is_relative() => error_response(ApiError::bad_request(format!(
            "bad snapshot request: \"to\" must be an absolute path ({} is relative to nothing the VMM knows)",
            req.to.display()
        ))),
        Ok(Json(req)) => call(h, Request::Snapshot(req)).await,
        Err(e) => error_response(ApiError::bad_request(format!("bad snapshot request: {}", e.body_text()))),
    }
}

async fn migrate(
    State(h): State<Arc<dyn Handler>>,
    body: Result<Json<MigrateRequest>, JsonRejection>,
) -> HttpResponse {
    match body {
        Ok(Json(req)) => call(h, Request::Migrate(req)).await,
        Err(e) => error_response(ApiError::bad_request(format!("bad migrate request: {}", e.body_text()))),
    }
}

async fn receive(
    State(h): State<Arc<dyn Handler>>,
    body: Result<Json<ReceiveRequest>, JsonRejection>,
) -> HttpResponse {
    match body {
        Ok(Json(req)) => call(h, Request::Receive(req)).await,
        Err(e) => error_response(ApiError::bad_request(format!("bad receive request: {}", e.body_text()))),
    }
}

async fn migrate_cancel(State(h): State<Arc<dyn Handler>>, body: Bytes) -> HttpResponse {
    if let Err(e) = no_body(&body) {
        return error_response(e);
    }
    call(h, Request::MigrateCancel).await
}

async fn method_not_allowed() -> HttpResponse {
    error_response(ApiError {
        status: 405,
        message:
            "method not allowed for this endpoint; see docs/api.md (GET /version, /vm, /vm/migration, /vm/events; PUT for every other endpoint)"
                .into(),
    })
}

async fn not_found() -> HttpResponse {
    error_response(ApiError {
        status: 404,
        message: "no such endpoint; see docs/api.md (GET /version, /vm, /vm/migration, /vm/events; PUT /vm/pause, /vm/resume, /vm/snapshot, /vm/migrate, /vm/migrate/cancel, /vm/receive)"
            .into(),
    })
}
