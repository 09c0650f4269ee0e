//! The controller's HTTP API ([`router`]) and its OpenAPI document ([`openapi`]), generated
//! from the same types and handlers.
//!
//! Heartbeats and leaving are for host certificates only (`ferry_pki::require_host`), and
//! the host's name is its certificate's: a host cannot report for another.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ferry_cluster_api::{
    paths, ApiError, CheckTable, ControllerRole, DatastoreList, ErrorCode, Heartbeat, HeartbeatAck,
    HostDetail, HostList, HostState, HostSummary, LeaderReport, MigrateRequest, MigrationDetail,
    MigrationList, MigrationStarted, NotActive, PortGroupList, VmList, HEARTBEAT_INTERVAL_MS,
};
use ferry_pki::PeerIdentity;
use utoipa::OpenApi;

use crate::store::{self, unix_ms, Store};

/// What the handlers share.
#[derive(Debug)]
pub struct Controller {
    /// The controller's name.
    pub name: String,
    /// The store.
    pub store: Store,
    /// The controller's client of the host daemons (its own certificate).
    pub client: ferry_pki::Client,
    /// The leader lease: whether this controller is the active one (docs/cluster.md "High
    /// availability"); background tasks ask it before acting.
    pub leader: Arc<crate::leader::Leader>,
    /// How many migrations run at once (`[limits]`).
    pub limits: crate::queue::Limits,
    /// Held while deciding whether a migration starts or waits, and while starting it, so
    /// that two decisions never count the same free slot.
    pub dispatch: tokio::sync::Mutex<()>,
    /// Wakes the dispatcher (a migration ended, or was queued).
    pub wake: tokio::sync::Notify,
    /// Memory held by placements in progress (creates, migrations not yet in the history).
    pub placing: crate::placement::Pending,
}

/// The shared controller.
pub type Shared = Arc<Controller>;

/// An error answer.
#[derive(Debug)]
pub struct Failure(ApiError);

impl Failure {
    /// An error answer.
    pub fn new(code: ErrorCode, message: String) -> Failure {
        Failure(ApiError { code, message })
    }

    /// Its message.
    pub fn message(&self) -> &str {
        &self.0.message
    }
}

impl From<store::Error> for Failure {
    fn from(e: store::Error) -> Self {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        tracing::warn!("{message}");
        Failure::new(ErrorCode::Internal, message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

/// The OpenAPI document of the controller's API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Ferry controller API",
        description = "The cluster controller (`ferry cluster serve`): inventory of the joined hosts, fed by their heartbeats. Mutual TLS with the cluster CA."
    ),
    paths(
        leader,
        heartbeat,
        leave,
        hosts,
        host,
        vms,
        vm,
        vm_action,
        datastores,
        portgroups,
        migrate,
        migrations,
        migration,
        evc,
        evc_set,
        cancel_migration,
        create,
        register
    ),
    components(schemas(
        ApiError,
        ErrorCode,
        HostState,
        CheckTable,
        NotActive,
        ControllerRole,
        ferry_cluster_api::Placement
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document, as served at `GET /openapi.json` (pretty JSON, stable order).
pub fn openapi() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = ferry_cluster_api::API_VERSION.to_string();
    doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The controller's routes (paths in [`ferry_cluster_api::paths`]).
pub fn router(state: Shared) -> Router {
    Router::new()
        .route(paths::HOSTS, get(hosts))
        .route("/hosts/{name}", get(host).delete(remove_host))
        .route(paths::VMS, get(vms).post(create))
        .route(paths::REGISTER, post(register))
        .route("/vms/{name}", get(vm))
        .route(paths::DATASTORES, get(datastores))
        .route(paths::PORTGROUPS, get(portgroups))
        .route("/vms/{name}/migrate", post(migrate))
        .route("/vms/{name}/{action}", post(vm_action))
        .route(paths::MIGRATIONS, get(migrations))
        .route("/migrations/{id}", get(migration))
        .route("/migrations/{id}/cancel", post(cancel_migration))
        .route(paths::EVC, get(evc).post(evc_set))
        .route(
            paths::OPENAPI,
            get(|| async { ([(axum::http::header::CONTENT_TYPE, "application/json")], openapi()) }),
        )
        .merge(
            Router::new()
                .route(paths::HEARTBEAT, post(heartbeat))
                .route(paths::LEAVE, post(leave))
                .route_layer(axum::middleware::from_fn(ferry_pki::require_host)),
        )
        .route(paths::LEADER, get(leader))
        .fallback(|| async { Failure::new(ErrorCode::NotFound, "no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), only_active))
        .with_state(state)
}

/// A standby answers every request but `GET /leader` and `GET /openapi.json` with
/// `not_active` (503) and the active controller's URL when one holds the lease.
async fn only_active(
    State(c): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if path == paths::LEADER || path == paths::OPENAPI {
        return next.run(request).await;
    }
    if c.leader.is_active() {
        return until_fenced(&c, next.run(request)).await;
    }
    not_active(&c)
}

/// `answer`, unless this controller stops being active first (it could not renew its leader
/// lease: its database is down or hangs): then the request is dropped where it stands and
/// answered `not_active`, so that no request outlives the self-fencing bound (docs/cluster.md
/// "Faults") and a fenced controller acts no more.
async fn until_fenced(c: &Controller, answer: impl std::future::Future<Output = Response>) -> Response {
    let mut status = c.leader.subscribe();
    // The term it answers in: a step-down and a new term in between count too.
    let term = status.borrow().term;
    let fenced = async {
        loop {
            let now = status.borrow_and_update().clone();
            if now.role != ControllerRole::Active || now.term != term {
                return;
            }
            if status.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    tokio::select! {
        r = answer => r,
        () = fenced => {
            tracing::warn!("controller {}: stepped down while answering a request; answered not_active", c.name);
            not_active(c)
        }
    }
}

/// The `not_active` answer (503) with the active controller's URL when one holds the lease.
fn not_active(c: &Controller) -> Response {
    let status = c.leader.status();
    let (active, active_url) = match status.holder {
        Some((name, url, _)) if name != c.name => (Some(name), Some(url)),
        _ => (None, None),
    };
    let message = match (&active, &active_url) {
        (Some(name), Some(url)) => {
            format!("controller {} is a standby; the active controller is {name} at {url}", c.name)
        }
        _ => match c.leader.database_fault() {
            // Fenced: its database is down or hangs (docs/cluster.md "Faults").
            Some((for_, why)) => format!(
                "controller {} cannot reach its database for {:.1} s ({why}), so it acts no more (it \
                 holds no leader lease); the hosts and their VMs go on without it; try again once the \
                 database is back",
                c.name,
                for_.as_secs_f64()
            ),
            None => format!(
                "controller {} is a standby and no controller holds the leader lease now (a takeover takes a few seconds); try again",
                c.name
            ),
        },
    };
    let body = NotActive {
        code: ErrorCode::NotActive,
        message,
        controller: c.name.clone(),
        active,
        active_url,
        term: status.term,
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// Which controller is active (holds the leader lease), its term, and every controller with
/// its last renewal; answered by standbys too.
#[utoipa::path(get, path = "/leader", responses((status = 200, body = LeaderReport)))]
async fn leader(State(c): State<Shared>) -> Result<Json<LeaderReport>, Failure> {
    let read = c.store.lease().await?;
    let controllers = c.store.controllers(&read).await?;
    Ok(Json(LeaderReport {
        answered_by: c.name.clone(),
        role: c.leader.status().role,
        lease: read.lease,
        controllers,
        now_unix_ms: read.now_unix_ms,
    }))
}

/// The host's API URL: an unspecified IP is replaced by the heartbeat's source address.
fn api_url(given: &str, peer: SocketAddr) -> Result<String, Failure> {
    let bad = || Failure::new(ErrorCode::BadRequest, format!("api_url {given:?} is not https://IP:PORT"));
    let addr: SocketAddr =
        given.strip_prefix("https://").ok_or_else(bad)?.trim_end_matches('/').parse().map_err(|_| bad())?;
    let addr = if addr.ip().is_unspecified() { SocketAddr::new(peer.ip(), addr.port()) } else { addr };
    Ok(format!("https://{addr}"))
}

/// A joined host's inventory.
#[utoipa::path(post, path = "/heartbeat", request_body = Heartbeat,
    responses((status = 200, body = HeartbeatAck), (status = 400, body = ApiError), (status = 403, description = "not a host certificate"),
        (status = 409, description = "cpu_below_baseline: the host lacks features of the EVC baseline", body = ApiError)))]
async fn heartbeat(
    State(c): State<Shared>,
    Extension(peer): Extension<PeerIdentity>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    bytes: axum::body::Bytes,
) -> Result<Json<HeartbeatAck>, Failure> {
    let beat: Heartbeat = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("malformed heartbeat: {e}")))?;
    let url = api_url(&beat.api_url, addr)?;
    let known = c.store.host(&peer.name).await?;
    if !beat.join && known.as_ref().is_some_and(|h| h.state == HostState::Disconnected) {
        return Err(Failure::new(
            ErrorCode::Conflict,
            format!(
                "host {} left or was removed from this cluster; join it again with `ferry host join`",
                peer.name
            ),
        ));
    }
    if let Some(why) = duplicate_join(known.as_ref(), beat.join, &url, unix_ms()) {
        tracing::warn!("host {}: join from {addr} refused: {why}", peer.name);
        return Err(Failure::new(ErrorCode::Conflict, why));
    }
    let evc = crate::evc::heartbeat(&c, &peer.name, &beat.info).await?;
    c.store.heartbeat(&peer.name, &url, beat.maintenance, &beat.info, unix_ms()).await?;
    match known.map(|h| h.state) {
        None => tracing::info!("host {} joined from {addr} (API {url})", peer.name),
        Some(HostState::NotResponding | HostState::Disconnected) => {
            tracing::info!("host {} is back (API {url})", peer.name)
        }
        Some(_) => {}
    }
    Ok(Json(HeartbeatAck {
        controller: c.name.clone(),
        interval_ms: HEARTBEAT_INTERVAL_MS,
        evc,
        controllers: c.leader.known(),
    }))
}

/// Why a join must be refused as a second host with a name already in the cluster: `known`,
/// the host of that name, still answers (a heartbeat within the last
/// `MISSED_HEARTBEATS` intervals) from another API URL. Two daemons with one name would
/// overwrite each other's inventory at every heartbeat. The same daemon joining again (same
/// URL), or a host whose old address went silent, may join.
fn duplicate_join(
    known: Option<&crate::store::HostRow>,
    join: bool,
    url: &str,
    now_ms: u64,
) -> Option<String> {
    let h = known?;
    let alive = matches!(h.state, HostState::Connected | HostState::Maintenance)
        && now_ms.saturating_sub(h.last_seen_unix_ms)
            < HEARTBEAT_INTERVAL_MS * ferry_cluster_api::MISSED_HEARTBEATS;
    (join && alive && h.api_url != url).then(|| {
        format!(
            "a host named {} is already in this cluster and answering at {} (this join came from {url}); \
             each host needs a name of its own (its certificate's), or remove the other first \
             (`ferry cluster remove-host {}`)",
            h.name, h.api_url, h.name
        )
    })
}

/// The calling host leaves the cluster: `disconnected` (its last report stays).
#[utoipa::path(post, path = "/leave",
    responses((status = 200, body = HostSummary), (status = 404, body = ApiError), (status = 403, description = "not a host certificate")))]
async fn leave(
    State(c): State<Shared>,
    Extension(peer): Extension<PeerIdentity>,
) -> Result<Json<HostSummary>, Failure> {
    if !c.store.set_host_state(&peer.name, HostState::Disconnected).await? {
        return Err(Failure::new(
            ErrorCode::NotFound,
            format!("host {} never joined this controller", peer.name),
        ));
    }
    tracing::info!("host {} left the cluster", peer.name);
    let row = c.store.host(&peer.name).await?.ok_or_else(|| {
        Failure::new(ErrorCode::NotFound, format!("host {} never joined this controller", peer.name))
    })?;
    Ok(Json(row.summary(unix_ms())))
}

/// Every host that joined, by name.
#[utoipa::path(get, path = "/hosts", responses((status = 200, body = HostList)))]
async fn hosts(State(c): State<Shared>) -> Result<Json<HostList>, Failure> {
    let now = unix_ms();
    Ok(Json(HostList { hosts: c.store.hosts().await?.iter().map(|h| h.summary(now)).collect() }))
}

/// One host: its summary and last inventory.
#[utoipa::path(get, path = "/hosts/{name}", params(("name" = String, Path, description = "The host's name")),
    responses((status = 200, body = HostDetail), (status = 404, body = ApiError)))]
async fn host(State(c): State<Shared>, Path(name): Path<String>) -> Result<Json<HostDetail>, Failure> {
    let row = c.store.host(&name).await?.ok_or_else(|| {
        Failure::new(ErrorCode::NotFound, format!("no host named {name:?} joined this cluster"))
    })?;
    Ok(Json(HostDetail { summary: row.summary(unix_ms()), info: (*row.info).clone() }))
}

/// Removes a host: `disconnected`, its last report kept; its heartbeats are refused until it
/// joins again.
#[utoipa::path(delete, path = "/hosts/{name}", params(("name" = String, Path, description = "The host's name")),
    responses((status = 200, body = HostSummary), (status = 404, body = ApiError)))]
async fn remove_host(
    State(c): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<HostSummary>, Failure> {
    if !c.store.set_host_state(&name, HostState::Disconnected).await? {
        return Err(Failure::new(ErrorCode::NotFound, format!("no host named {name:?} joined this cluster")));
    }
    tracing::info!("host {name} removed from the cluster");
    let row = c.store.host(&name).await?.ok_or_else(|| {
        Failure::new(ErrorCode::NotFound, format!("no host named {name:?} joined this cluster"))
    })?;
    Ok(Json(row.summary(unix_ms())))
}

/// Every VM the hosts reported, with the age of the report.
#[utoipa::path(get, path = "/vms", responses((status = 200, body = VmList)))]
async fn vms(State(c): State<Shared>) -> Result<Json<VmList>, Failure> {
    Ok(Json(VmList { vms: c.store.vms(None, unix_ms()).await? }))
}

/// The hosts' reports of one VM (one, unless its home is registered on several hosts).
#[utoipa::path(get, path = "/vms/{name}", params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, body = VmList), (status = 404, body = ApiError)))]
async fn vm(State(c): State<Shared>, Path(name): Path<String>) -> Result<Json<VmList>, Failure> {
    let vms = c.store.vms(Some(&name), unix_ms()).await?;
    if vms.is_empty() {
        return Err(Failure::new(
            ErrorCode::NotFound,
            format!("no host of this cluster has a VM named {name:?}"),
        ));
    }
    Ok(Json(VmList { vms }))
}

/// Every datastore by id, with the hosts that see it.
#[utoipa::path(get, path = "/datastores", responses((status = 200, body = DatastoreList)))]
async fn datastores(State(c): State<Shared>) -> Result<Json<DatastoreList>, Failure> {
    Ok(Json(DatastoreList { datastores: c.store.datastores().await? }))
}

/// Every port group by name, with the hosts that have it.
#[utoipa::path(get, path = "/portgroups", responses((status = 200, body = PortGroupList)))]
async fn portgroups(State(c): State<Shared>) -> Result<Json<PortGroupList>, Failure> {
    Ok(Json(PortGroupList { portgroups: c.store.portgroups().await? }))
}

/// Checks (`check: true`: a row per destination) or a migration of a VM, asked of the host
/// that has it.
#[utoipa::path(post, path = "/vms/{name}/migrate", params(("name" = String, Path, description = "The VM's name")),
    request_body = MigrateRequest,
    responses((status = 200, description = "CheckTable with check, Placement with explain, else MigrationStarted (without to_host, to the host placement picks)", body = MigrationStarted),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 502, body = ApiError)))]
async fn migrate(
    State(c): State<Shared>,
    Path(name): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Response, Failure> {
    let req: MigrateRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("malformed request body: {e}")))?;
    if req.explain && (req.check || req.to_host.is_some()) {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            "explain shows the placement's ranking: it takes neither to_host nor check".into(),
        ));
    }
    if req.check {
        Ok(Json(crate::migrate::check(&c, &name, &req).await?).into_response())
    } else if req.explain {
        Ok(Json(crate::placement::explain_migration(&c, &name).await?).into_response())
    } else if req.to_host.is_none() {
        Ok(Json(crate::placement::migrate(&c, &name, &req).await?).into_response())
    } else {
        Ok(Json(crate::migrate::migrate(&c, &name, &req).await?).into_response())
    }
}

/// A VM action (start, stop, kill, suspend, resume, snapshot), forwarded to the host that has
/// the VM.
#[utoipa::path(post, path = "/vms/{name}/{action}",
    params(("name" = String, Path, description = "The VM's name"),
        ("action" = String, Path, description = "start, stop, kill, suspend, resume or snapshot")),
    responses((status = 200, body = ferry_cluster_api::VmActionDone), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 502, body = ApiError)))]
async fn vm_action(
    State(c): State<Shared>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<ferry_cluster_api::VmActionDone>, Failure> {
    let action = ferry_host_api::Action::parse(&action).ok_or_else(|| {
        Failure::new(
            ErrorCode::NotFound,
            format!("no action {action:?} (start, stop, kill, suspend, resume, snapshot)"),
        )
    })?;
    Ok(Json(crate::migrate::action(&c, &name, action).await?))
}

/// The controller's migration history, newest first.
#[utoipa::path(get, path = "/migrations",
    params(("active" = Option<bool>, Query, description = "only those in progress"),
        ("failed" = Option<bool>, Query, description = "only failed ones, refused ones included"),
        ("vm" = Option<String>, Query, description = "only this VM's"),
        ("host" = Option<String>, Query, description = "only those from or to this host")),
    responses((status = 200, body = MigrationList), (status = 400, body = ApiError)))]
async fn migrations(State(c): State<Shared>, RawQuery(q): RawQuery) -> Result<Json<MigrationList>, Failure> {
    let mut filter = store::MigrationFilter::default();
    for kv in q.unwrap_or_default().split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=').unwrap_or((kv, "")) {
            ("active", _) => filter.outcome = Some(ferry_host_api::MigrationOutcome::Active),
            ("failed", _) => filter.outcome = Some(ferry_host_api::MigrationOutcome::Failed),
            ("queued", _) => filter.outcome = Some(ferry_host_api::MigrationOutcome::Queued),
            ("cancelled", _) => filter.outcome = Some(ferry_host_api::MigrationOutcome::Cancelled),
            ("unknown", _) => filter.outcome = Some(ferry_host_api::MigrationOutcome::Unknown),
            ("vm", v) if !v.is_empty() => filter.vm = Some(v.to_string()),
            ("host", v) if !v.is_empty() => filter.host = Some(v.to_string()),
            _ => {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!(
                    "unknown query parameter {kv:?} (active, failed, queued, cancelled, unknown, vm=NAME, host=NAME)"
                ),
                ))
            }
        }
    }
    let mut migrations = c.store.migrations(&filter).await?;
    crate::migrate::with_positions(&c, &mut migrations).await?;
    Ok(Json(MigrationList { migrations }))
}

/// Cancels a migration: a queued one leaves the queue, a running one is cancelled by its
/// source host before its commit (the VM stays there). Answers the migration once it ended.
#[utoipa::path(post, path = "/migrations/{id}/cancel", params(("id" = String, Path, description = "The migration's id")),
    responses((status = 200, body = MigrationDetail), (status = 404, body = ApiError),
        (status = 409, description = "it has ended, or committed: it can no longer be cancelled", body = ApiError),
        (status = 502, body = ApiError)))]
async fn cancel_migration(
    State(c): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<MigrationDetail>, Failure> {
    Ok(Json(crate::migrate::cancel(&c, &id).await?))
}

/// One migration: its record (with per-pass statistics) and the controller's events.
#[utoipa::path(get, path = "/migrations/{id}", params(("id" = String, Path, description = "The migration's id")),
    responses((status = 200, body = MigrationDetail), (status = 404, body = ApiError)))]
async fn migration(
    State(c): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<MigrationDetail>, Failure> {
    Ok(Json(crate::migrate::detail(&c, &id).await?))
}

/// The cluster's CPU baseline (EVC): its features and generation, each host's extra and
/// lacking features, each powered-on VM's CPUID generation.
#[utoipa::path(get, path = "/evc", responses((status = 200, body = ferry_cluster_api::EvcReport)))]
async fn evc(State(c): State<Shared>) -> Result<Json<ferry_cluster_api::EvcReport>, Failure> {
    Ok(Json(crate::evc::report(&c).await?))
}

/// Changes the CPU baseline (a new generation): VMs powered on from then on get it; those
/// running keep theirs until they are powered off.
#[utoipa::path(post, path = "/evc", request_body = ferry_cluster_api::EvcSet,
    responses((status = 200, body = ferry_cluster_api::EvcChanged), (status = 400, body = ApiError),
        (status = 404, body = ApiError), (status = 409, description = "a host lacks a feature added, or no baseline yet", body = ApiError)))]
async fn evc_set(
    State(c): State<Shared>,
    bytes: axum::body::Bytes,
) -> Result<Json<ferry_cluster_api::EvcChanged>, Failure> {
    let req: ferry_cluster_api::EvcSet = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("malformed request body: {e}")))?;
    Ok(Json(crate::evc::set(&c, &req).await?))
}

/// Creates a VM on the host named, else on the one placement picks; `explain`: only the
/// ranking.
#[utoipa::path(post, path = "/vms", request_body = ferry_cluster_api::CreateVmRequest,
    responses((status = 200, description = "VmActionDone, or Placement with explain", body = ferry_cluster_api::VmActionDone),
        (status = 400, body = ApiError), (status = 404, description = "no such host or datastore", body = ApiError),
        (status = 409, description = "the name exists, or no host can take the VM", body = ApiError), (status = 502, body = ApiError)))]
async fn create(State(c): State<Shared>, bytes: axum::body::Bytes) -> Result<Response, Failure> {
    let req: ferry_cluster_api::CreateVmRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("malformed request body: {e}")))?;
    if req.explain {
        Ok(Json(crate::placement::explain_create(&c, &req).await?).into_response())
    } else {
        Ok(Json(crate::placement::create(&c, &req).await?).into_response())
    }
}

/// Registers an existing home on the host named, else on the one placement picks among the
/// hosts that see its datastore; `explain`: only the ranking.
#[utoipa::path(post, path = "/vms/register", request_body = ferry_cluster_api::RegisterVmRequest,
    responses((status = 200, description = "VmActionDone, or Placement with explain", body = ferry_cluster_api::VmActionDone),
        (status = 400, body = ApiError), (status = 404, description = "no such host, or the path is on no datastore", body = ApiError),
        (status = 409, body = ApiError), (status = 502, body = ApiError)))]
async fn register(State(c): State<Shared>, bytes: axum::body::Bytes) -> Result<Response, Failure> {
    let req: ferry_cluster_api::RegisterVmRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("malformed request body: {e}")))?;
    if req.explain {
        Ok(Json(crate::placement::explain_register(&c, &req).await?).into_response())
    } else {
        Ok(Json(crate::placement::register(&c, &req).await?).into_response())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_urls() {
        let peer: std::net::SocketAddr = "10.1.2.3:5555".parse().expect("addr");
        assert_eq!(super::api_url("https://0.0.0.0:7443", peer).expect("ok"), "https://10.1.2.3:7443");
        assert_eq!(super::api_url("https://127.0.0.1:7443/", peer).expect("ok"), "https://127.0.0.1:7443");
        assert!(super::api_url("http://127.0.0.1:7443", peer).is_err());
        assert!(super::api_url("https://host:7443", peer).is_err());
    }

    /// A second daemon joining with a name a live host has is refused; the same daemon
    /// joining again, a regular heartbeat, or a name whose host went silent are not.
    #[test]
    fn a_second_host_with_a_live_name_cannot_join() {
        use ferry_cluster_api::HostState;
        let row = |state, last_seen_unix_ms| crate::store::HostRow {
            name: "a".into(),
            api_url: "https://10.0.0.1:7443".into(),
            state,
            maintenance: false,
            joined_unix_ms: 0,
            last_seen_unix_ms,
            info: crate::store::tests::info("a", "ds1", &[]).into(),
        };
        let live = row(HostState::Connected, 10_000);
        let why = super::duplicate_join(Some(&live), true, "https://10.0.0.9:7443", 11_000).expect("refused");
        assert!(why.contains("already in this cluster and answering at https://10.0.0.1:7443"), "{why}");
        assert!(super::duplicate_join(Some(&live), true, "https://10.0.0.1:7443", 11_000).is_none());
        assert!(super::duplicate_join(Some(&live), false, "https://10.0.0.9:7443", 11_000).is_none());
        assert!(super::duplicate_join(Some(&live), true, "https://10.0.0.9:7443", 20_000).is_none());
        let gone = row(HostState::NotResponding, 10_000);
        assert!(super::duplicate_join(Some(&gone), true, "https://10.0.0.9:7443", 11_000).is_none());
        assert!(super::duplicate_join(None, true, "https://10.0.0.9:7443", 11_000).is_none());
    }

    /// docs/openapi/cluster.json is what the server serves.
    #[test]
    fn checked_in_openapi_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi/cluster.json");
        let generated = super::openapi();
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in.trim_end() == generated.trim_end(),
            "docs/openapi/cluster.json differs from the controller's API; regenerate it with \
             `cargo run -p ferry -- cluster openapi > docs/openapi/cluster.json`"
        );
    }
}
