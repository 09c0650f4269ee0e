//! The daemon's HTTP API: [`router`] builds it, [`serve`] serves it on a TCP listener.
//!
//! TLS goes in one place: [`serve`] (today plain HTTP on the listener). Swap it for a server
//! that takes the same listener and router and terminates mutual TLS first; the router does
//! not change.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_host_api::{Action, ApiError, CreateVm, ErrorCode, RegisterVm};

use crate::daemon::Shared;

/// An error answer.
#[derive(Debug)]
pub struct Failure(ApiError);

/// An error's message with its causes, one after another (a cause the message already
/// states is not repeated).
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

impl From<crate::daemon::Error> for Failure {
    fn from(e: crate::daemon::Error) -> Self {
        Failure(ApiError { code: e.code(), message: with_causes(&e) })
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl Failure {
    /// An answer with this error.
    pub fn from_api(e: ApiError) -> Failure {
        Failure(e)
    }
}

fn bad_request(message: String) -> Failure {
    Failure(ApiError { code: ErrorCode::BadRequest, message })
}

/// The daemon's routes (paths in [`ferry_host_api::paths`]).
pub fn router(state: Shared) -> Router {
    Router::new()
        .route(ferry_host_api::paths::HOST, get(host))
        .route(ferry_host_api::paths::VMS, get(list).post(create))
        .route(ferry_host_api::paths::REGISTER, post(register))
        .route("/vms/{name}", get(show).delete(unregister))
        .route("/vms/{name}/log", get(log))
        .route("/vms/{name}/migrate", post(migrate))
        .route(ferry_host_api::paths::MIGRATIONS, get(migrations))
        .route("/migrations/{id}/cancel", post(cancel_migration))
        .merge(
            // Only other hosts' daemons may reserve, complete or abort here.
            Router::new()
                .route(ferry_host_api::paths::INCOMING, post(incoming))
                .route(ferry_host_api::paths::INCOMING_CHECK, post(incoming_check))
                .route("/migrations/{id}/{step}", post(migration_step))
                .route_layer(axum::middleware::from_fn(ferry_pki::require_host)),
        )
        .route("/vms/{name}/{action}", post(action))
        .fallback(|| async {
            Failure(ApiError { code: ErrorCode::NotFound, message: "no such endpoint".into() })
        })
        .with_state(state)
}

/// Serves `router` on `listener` with mutual TLS (`tls`: the host's certificate, and client
/// certificates required from the cluster CA; `ferry_pki::serve_tls`) until `shutdown`
/// completes. Each request carries the peer's identity (`Extension<ferry_pki::PeerIdentity>`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    ferry_pki::serve_tls(listener, tls, router, shutdown).await
}

async fn host(State(d): State<Shared>) -> Json<ferry_host_api::HostInfo> {
    Json(d.host_info().await)
}

async fn list(State(d): State<Shared>) -> Json<ferry_host_api::VmList> {
    Json(d.list().await)
}

/// A JSON body, with a 400 and the reason when it does not parse.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("malformed request body: {e}")))
}

async fn create(
    State(d): State<Shared>,
    bytes: axum::body::Bytes,
) -> Result<Json<ferry_host_api::VmDetail>, Failure> {
    let req: CreateVm = body(&bytes)?;
    Ok(Json(d.create(req).await?))
}

async fn register(
    State(d): State<Shared>,
    bytes: axum::body::Bytes,
) -> Result<Json<ferry_host_api::VmDetail>, Failure> {
    let req: RegisterVm = body(&bytes)?;
    Ok(Json(d.register(req).await?))
}

async fn show(
    State(d): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<ferry_host_api::VmDetail>, Failure> {
    Ok(Json(d.show(&name).await?))
}

async fn unregister(
    State(d): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<ferry_host_api::VmDetail>, Failure> {
    Ok(Json(d.unregister(&name).await?))
}

async fn log(
    State(d): State<Shared>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<ferry_host_api::VmLog>, Failure> {
    let mut lines = 50;
    for kv in q.unwrap_or_default().split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("lines", v)) => {
                lines = v.parse().map_err(|_| bad_request(format!("lines={v}: not a number")))?
            }
            _ => return Err(bad_request(format!("unknown query parameter {kv:?}"))),
        }
    }
    Ok(Json(d.log(&name, lines).await?))
}

async fn action(
    State(d): State<Shared>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<ferry_host_api::VmDetail>, Failure> {
    let action = Action::parse(&action).ok_or_else(|| {
        Failure(ApiError {
            code: ErrorCode::NotFound,
            message: format!("no action {action:?} (start, stop, kill, suspend, resume, snapshot)"),
        })
    })?;
    Ok(Json(d.action(&name, action).await?))
}

async fn migrate(
    State(d): State<Shared>,
    Path(name): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Json<ferry_host_api::MigrateStarted>, Failure> {
    let req: ferry_host_api::MigrateVm = body(&bytes)?;
    Ok(Json(d.migrate(&name, req).await?))
}

async fn migrations(
    State(d): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Json<ferry_host_api::MigrationList>, Failure> {
    use ferry_host_api::MigrationOutcome;
    let (mut outcome, mut id) = (None, None);
    for kv in q.unwrap_or_default().split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=').unwrap_or((kv, "")) {
            ("active", _) => outcome = Some(MigrationOutcome::Active),
            ("failed", _) => outcome = Some(MigrationOutcome::Failed),
            ("id", v) if !v.is_empty() => id = Some(v.to_string()),
            _ => return Err(bad_request(format!("unknown query parameter {kv:?} (active, failed, id=ID)"))),
        }
    }
    Ok(Json(ferry_host_api::MigrationList { migrations: d.migrations(outcome, id.as_deref()).await? }))
}

/// `POST /migrations/ID/cancel`: cancel this host's outgoing migration.
async fn cancel_migration(
    State(d): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<ferry_host_api::MigrationRecord>, Failure> {
    Ok(Json(d.cancel_outgoing(&id).await?))
}

async fn incoming(
    State(d): State<Shared>,
    bytes: axum::body::Bytes,
) -> Result<Json<ferry_host_api::Reservation>, Failure> {
    let req: ferry_host_api::IncomingMigration = body(&bytes)?;
    Ok(Json(d.reserve(req).await?))
}

async fn incoming_check(
    State(d): State<Shared>,
    bytes: axum::body::Bytes,
) -> Result<Json<ferry_host_api::CheckReport>, Failure> {
    let req: ferry_host_api::IncomingMigration = body(&bytes)?;
    Ok(Json(d.incoming_check(req).await))
}

async fn migration_step(
    State(d): State<Shared>,
    Path((id, step)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> Result<Json<ferry_host_api::MigrationRecord>, Failure> {
    let record: ferry_host_api::MigrationRecord = body(&bytes)?;
    match step.as_str() {
        "complete" => Ok(Json(d.complete_incoming(&id, Some(&record)).await?)),
        "abort" => Ok(Json(d.abort_incoming(&id, &record).await?)),
        _ => Err(Failure(ApiError {
            code: ErrorCode::NotFound,
            message: format!("no step {step:?} (complete, abort)"),
        })),
    }
}
