//! Checks and migrations through the controller: it finds the host that has the VM (from
//! the hosts' reports), asks that host's daemon for the checks or the migration (as `ferry vm
//! migrate --host SOURCE` does), follows the migration in the source's history until it ends
//! and records it in the controller's history. Every log line names the migration
//! (`migration ID: ...`).
//!
//! The controller decides nothing the hosts decide: the source daemon runs the checks and the
//! migration, the VM's lock on the datastore decides where it runs.

use std::sync::Arc;
use std::time::Duration;

use ferry_cluster_api::{
    CheckReason, CheckTable, ErrorCode, HostCheck, HostState, MigrateRequest, MigrationDetail,
    MigrationStarted,
};
use ferry_host_api::{
    MigrateStarted, MigrateVm, MigrationList, MigrationOutcome, MigrationRecord, MigrationRole,
};

use crate::error_chain;
use crate::queue::Pair;

use crate::server::{Controller, Failure};
use crate::store::{unix_ms, HostRow};

/// How often an active migration is asked about.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// A migration the source has not ended after this long is no longer followed.
const FOLLOW_AT_MOST: Duration = Duration::from_secs(3600);

fn failure(code: ErrorCode, message: String) -> Failure {
    Failure::new(code, message)
}

/// The host that has VM `name` and answers: the one whose VMM runs it, else the only one
/// that reports it.
pub(crate) async fn source_of(c: &Controller, name: &str) -> Result<HostRow, Failure> {
    let reports = c.store.vms(Some(name), unix_ms()).await?;
    if reports.is_empty() {
        return Err(failure(ErrorCode::NotFound, format!("no host of this cluster has a VM named {name:?}")));
    }
    let live = |s: &str| matches!(s, "starting" | "running" | "paused");
    let chosen = reports
        .iter()
        .find(|v| live(&v.state))
        .or_else(|| if reports.len() == 1 { reports.first() } else { None })
        .ok_or_else(|| {
            failure(
                ErrorCode::Conflict,
                format!(
                    "VM {name:?} is registered on several hosts ({}) and runs on none",
                    reports.iter().map(|v| v.host.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
    if !matches!(chosen.host_state, HostState::Connected | HostState::Maintenance) {
        return Err(failure(
            ErrorCode::Conflict,
            format!(
                "VM {name:?} is on host {}, which is {} (report {} ms old)",
                chosen.host, chosen.host_state, chosen.age_ms
            ),
        ));
    }
    c.store
        .host(&chosen.host)
        .await?
        .ok_or_else(|| failure(ErrorCode::NotFound, format!("host {} is gone", chosen.host)))
}

/// Asks `source` for the migration of `vm` to `dest` (checks only with `check`).
async fn ask(
    c: &Controller,
    source: &HostRow,
    vm: &str,
    dest: &HostRow,
    req: &MigrateRequest,
    check: bool,
    id: Option<&str>,
) -> Result<MigrateStarted, Failure> {
    let body = MigrateVm {
        to_host: dest.api_url.clone(),
        downtime_ms: req.downtime_ms,
        streams: req.streams,
        check,
        migration_id: id.map(str::to_string),
        bandwidth_mib: req.bandwidth_mib,
    };
    let body = serde_json::to_value(&body).map_err(|e| failure(ErrorCode::Internal, e.to_string()))?;
    let url = format!("{}{}", source.api_url, ferry_host_api::paths::migrate(vm));
    let host_failed = |e: String| {
        failure(
            ErrorCode::HostFailed,
            format!("host {} ({}) did not answer the migration request: {e}", source.name, source.api_url),
        )
    };
    let answer = c.client.post(&url, &body).await.map_err(|e| host_failed(error_chain(&e)))?;
    if !answer.is_success() {
        let text = match serde_json::from_slice::<ferry_host_api::ApiError>(&answer.body) {
            Ok(e) => e.message,
            Err(_) => String::from_utf8_lossy(&answer.body).trim().to_string(),
        };
        let code = if answer.status == 404 { ErrorCode::NotFound } else { ErrorCode::HostFailed };
        return Err(failure(code, format!("host {} refused: {text}", source.name)));
    }
    serde_json::from_slice(&answer.body).map_err(|e| host_failed(format!("malformed answer: {e}")))
}

/// A host daemon's answer as a `T`, or its error as the controller's: the daemon's typed code
/// mapped to ours (its internal errors are `host_failed`), the message prefixed with the host.
pub(crate) fn host_answer<T: serde::de::DeserializeOwned>(
    host: &str,
    answer: ferry_pki::Response,
) -> Result<T, Failure> {
    if !answer.is_success() {
        let (code, text) = match serde_json::from_slice::<ferry_host_api::ApiError>(&answer.body) {
            Ok(e) => (
                match e.code {
                    ferry_host_api::ErrorCode::NotFound => ErrorCode::NotFound,
                    ferry_host_api::ErrorCode::Conflict => ErrorCode::Conflict,
                    ferry_host_api::ErrorCode::BadRequest => ErrorCode::BadRequest,
                    ferry_host_api::ErrorCode::Internal => ErrorCode::HostFailed,
                },
                e.message,
            ),
            Err(_) => (ErrorCode::HostFailed, String::from_utf8_lossy(&answer.body).trim().to_string()),
        };
        return Err(failure(code, format!("host {host}: {text}")));
    }
    serde_json::from_slice(&answer.body)
        .map_err(|e| failure(ErrorCode::HostFailed, format!("host {host} sent a malformed answer: {e}")))
}

/// The check row of one destination.
pub(crate) async fn check_one(
    c: &Controller,
    source: &HostRow,
    vm: &str,
    dest: &HostRow,
    req: &MigrateRequest,
) -> HostCheck {
    if !matches!(dest.state, HostState::Connected | HostState::Maintenance) {
        return HostCheck {
            host: dest.name.clone(),
            ok: false,
            reasons: vec![CheckReason {
                code: "host_not_connected".into(),
                message: format!("host {} is {}", dest.name, dest.state),
            }],
        };
    }
    match ask(c, source, vm, dest, req, true, None).await {
        Ok(started) => host_check(dest, &started.checks),
        Err(e) => HostCheck {
            host: dest.name.clone(),
            ok: false,
            reasons: vec![CheckReason { code: "source_failed".into(), message: e.message().to_string() }],
        },
    }
}

/// A destination's row of the check table from the source daemon's report.
fn host_check(dest: &HostRow, report: &ferry_host_api::CheckReport) -> HostCheck {
    HostCheck {
        host: dest.name.clone(),
        ok: report.ok,
        reasons: report
            .reasons
            .iter()
            .map(|r| CheckReason { code: r.code.as_str().to_string(), message: r.message.clone() })
            .collect(),
    }
}

/// `POST /vms/NAME/migrate` with `check`: one row per destination (`to_host`, or every
/// other host).
pub async fn check(c: &Controller, vm: &str, req: &MigrateRequest) -> Result<CheckTable, Failure> {
    let source = source_of(c, vm).await?;
    let dests: Vec<HostRow> = match &req.to_host {
        Some(name) => vec![destination(c, name, &source).await?],
        None => c.store.hosts().await?.into_iter().filter(|h| h.name != source.name).collect(),
    };
    let mut checks = Vec::new();
    for d in &dests {
        checks.push(check_one(c, &source, vm, d, req).await);
    }
    Ok(CheckTable { vm: vm.to_string(), source: source.name, checks })
}

async fn destination(c: &Controller, name: &str, source: &HostRow) -> Result<HostRow, Failure> {
    if name == source.name {
        return Err(failure(ErrorCode::BadRequest, format!("VM is already on host {name}")));
    }
    c.store
        .host(name)
        .await?
        .ok_or_else(|| failure(ErrorCode::NotFound, format!("no host named {name:?} joined this cluster")))
}

/// `POST /vms/NAME/migrate`: within the limits, the source daemon checks and migrates at once
/// (with the controller's id) and the controller follows it until it ends; beyond them, the
/// checks run and, if they pass, the migration waits in the queue (answered with its id and
/// position) for [`dispatch`] to start it.
pub async fn migrate(
    c: &Arc<Controller>,
    vm: &str,
    req: &MigrateRequest,
) -> Result<MigrationStarted, Failure> {
    let to = req.to_host.as_deref().ok_or_else(|| {
        failure(
            ErrorCode::BadRequest,
            "a migration needs to_host: the controller does not choose a destination (not yet); check every host with check: true".into(),
        )
    })?;
    let source = source_of(c, vm).await?;
    let dest = destination(c, to, &source).await?;
    let answer = |checks: HostCheck, id: Option<String>, queued: Option<(u32, String)>| MigrationStarted {
        vm: vm.into(),
        source: source.name.clone(),
        destination: dest.name.clone(),
        checks,
        migration_id: id,
        queue_position: queued.as_ref().map(|q| q.0),
        queue_reason: queued.map(|q| q.1),
    };
    if !matches!(dest.state, HostState::Connected | HostState::Maintenance) {
        let checks = check_one(c, &source, vm, &dest, req).await;
        return Ok(answer(checks, None, None));
    }
    let id = new_id();
    let pair = Pair::new(&source.name, &dest.name);
    let wait = {
        let _turn = c.dispatch.lock().await;
        let running = running_pairs(c).await?;
        let queue = c.store.queue().await?;
        let mut pairs: Vec<Pair> = queue.iter().map(|q| Pair::new(&q.source, &q.destination)).collect();
        pairs.push(pair.clone());
        let plan = crate::queue::plan(c.limits, &running, &pairs);
        if plan.contains(&queue.len()) {
            // The last moment to find out that this controller stepped down since the
            // request came.
            if !c.leader.is_active() {
                return Err(failure(
                    ErrorCode::NotActive,
                    "this controller stepped down while checking the request; nothing was started: ask the active one".into(),
                ));
            }
            let started = ask(c, &source, vm, &dest, req, false, Some(&id)).await?;
            let checks = host_check(&dest, &started.checks);
            if let Some(mid) = &started.migration_id {
                tracing::info!(
                    "migration {mid}: VM {vm} from host {} to host {} started through the controller",
                    source.name,
                    dest.name
                );
                record_started(c, mid, vm, &source.name, &dest.name).await;
                tokio::spawn(follow(Arc::clone(c), source.clone(), mid.clone()));
            }
            if plan.len() > 1 {
                // Queued ones may go too: the dispatcher starts them.
                c.wake.notify_one();
            }
            return Ok(answer(checks, started.migration_id, None));
        }
        // The limit it waits for: with those ahead of it that start now counted.
        let mut ahead = running.clone();
        ahead.extend(plan.iter().filter_map(|&i| pairs.get(i).cloned()));
        crate::queue::admit(c.limits, &ahead, &pair).err()
    };
    let reason = wait.map(|w| w.to_string()).unwrap_or_else(|| "migrations ahead of it in the queue".into());
    // Checked now (nothing reserved), and again when it starts.
    let checks = check_one(c, &source, vm, &dest, req).await;
    if !checks.ok {
        return Ok(answer(checks, None, None));
    }
    let record = MigrationRecord {
        reason: reason.clone(),
        ..MigrationRecord::begin(
            &id,
            vm,
            (&source.name, &dest.name),
            MigrationRole::Source,
            MigrationOutcome::Queued,
            unix_ms(),
        )
    };
    let request = serde_json::to_string(req).map_err(|e| failure(ErrorCode::Internal, e.to_string()))?;
    let position = {
        let _turn = c.dispatch.lock().await;
        c.store.enqueue(&record, &request, unix_ms()).await?
    };
    tracing::info!(
        "migration {id}: VM {vm} from host {} to host {} queued, position {position}: {reason}",
        source.name,
        dest.name
    );
    // A slot may have freed meanwhile.
    c.wake.notify_one();
    Ok(answer(checks, Some(id), Some((position, reason))))
}

/// A migration id made by the controller (the hosts use it too): `m-` and 12 hex digits.
fn new_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 6];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // No /dev/urandom: the clock's nanoseconds and a counter, still unique here.
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).rotate_left(40);
        bytes.copy_from_slice(&n.to_le_bytes()[..6]);
    }
    format!("m-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The migrations that count against the limits: the history's active ones.
async fn running_pairs(c: &Controller) -> Result<Vec<Pair>, Failure> {
    let filter =
        crate::store::MigrationFilter { outcome: Some(MigrationOutcome::Active), ..Default::default() };
    Ok(c.store.migrations(&filter).await?.iter().map(|m| Pair::new(&m.source, &m.destination)).collect())
}

/// Records migration `id` as active at once (its source's record replaces it at the first
/// follow), so that it counts against the limits from now on.
async fn record_started(c: &Controller, id: &str, vm: &str, source: &str, destination: &str) {
    let record = MigrationRecord::begin(
        id,
        vm,
        (source, destination),
        MigrationRole::Source,
        MigrationOutcome::Active,
        unix_ms(),
    );
    if let Err(e) = save(c, &record).await {
        tracing::warn!("migration {id}: cannot record it: {}", error_chain(&e));
    }
}

/// How often the dispatcher looks at the queue without being woken.
const DISPATCH_EVERY: Duration = Duration::from_secs(1);

/// The dispatcher: starts queued migrations in FIFO order as slots free up (woken when a
/// followed migration ends, and every `DISPATCH_EVERY`: migrations started on hosts
/// directly free slots too). The queue is in the store: a restarted controller goes on.
pub async fn dispatch(c: Arc<Controller>) {
    loop {
        tokio::select! {
            _ = c.wake.notified() => {}
            _ = tokio::time::sleep(DISPATCH_EVERY) => {}
        }
        // Only the active controller starts queued migrations (a standby's queue is the
        // same rows: it starts them once it takes over).
        if c.leader.is_active() {
            dispatch_once(&c).await;
        }
    }
}

/// One round of the dispatcher.
pub async fn dispatch_once(c: &Arc<Controller>) {
    let _turn = c.dispatch.lock().await;
    let queue = match c.store.queue().await {
        Ok(q) if q.is_empty() => return,
        Ok(q) => q,
        Err(e) => {
            tracing::warn!("cannot read the migration queue: {}", error_chain(&e));
            return;
        }
    };
    let running = match running_pairs(c).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot count the active migrations: {}", e.message());
            return;
        }
    };
    let pairs: Vec<Pair> = queue.iter().map(|q| Pair::new(&q.source, &q.destination)).collect();
    let mut failed = false;
    for i in crate::queue::plan(c.limits, &running, &pairs) {
        if let Some(q) = queue.get(i) {
            failed |= !start_queued(c, q).await;
        }
    }
    if failed {
        // Its slot is free again.
        c.wake.notify_one();
    }
}

/// Starts queued migration `q` (checked again by its source); false if it ended `failed`.
async fn start_queued(c: &Arc<Controller>, q: &crate::store::queue::Queued) -> bool {
    let id = &q.id;
    let fail = |code: &str, reason: String, reasons: Vec<ferry_host_api::CheckReason>| {
        let code = code.to_string();
        async move {
            tracing::warn!("migration {id}: failed when leaving the queue ({code}): {reason}");
            let now = unix_ms();
            let record = MigrationRecord {
                ended_unix_ms: Some(now),
                reason_code: code,
                reason,
                reasons,
                ..MigrationRecord::begin(
                    id,
                    &q.vm,
                    (&q.source, &q.destination),
                    MigrationRole::Source,
                    MigrationOutcome::Failed,
                    q.queued_unix_ms,
                )
            };
            if let Err(e) = save(c, &record).await {
                tracing::warn!("migration {id}: cannot record it: {}", error_chain(&e));
            }
            if let Err(e) = c.store.dequeue(id).await {
                tracing::warn!("migration {id}: cannot take it out of the queue: {}", error_chain(&e));
            }
            false
        }
    };
    let req: MigrateRequest = match serde_json::from_str(&q.request) {
        Ok(r) => r,
        Err(e) => return fail("internal", format!("its stored request does not decode: {e}"), vec![]).await,
    };
    let source = match source_of(c, &q.vm).await {
        Ok(s) if s.name == q.source => s,
        Ok(s) => {
            return fail(
                "vm_moved",
                format!("VM {} is now on host {}, not {}", q.vm, s.name, q.source),
                vec![],
            )
            .await
        }
        Err(e) => return fail("source_failed", e.message().to_string(), vec![]).await,
    };
    let dest = match c.store.host(&q.destination).await {
        Ok(Some(d)) if matches!(d.state, HostState::Connected | HostState::Maintenance) => d,
        Ok(Some(d)) => {
            return fail("host_not_connected", format!("host {} is {}", d.name, d.state), vec![]).await
        }
        Ok(None) => return fail("host_not_found", format!("host {} is gone", q.destination), vec![]).await,
        Err(e) => return fail("internal", error_chain(&e), vec![]).await,
    };
    // A controller that stopped between asking the source and taking the migration out of
    // the queue finds it in the source's history: adopted, not asked again.
    if let Some(known) = source_record(c, &source, id).await {
        tracing::info!(
            "migration {id}: already in host {}'s history ({}): adopted",
            source.name,
            known.outcome.as_str()
        );
        if let Err(e) = save(c, &known).await {
            tracing::warn!("migration {id}: cannot record it: {}", error_chain(&e));
        }
        if let Err(e) = c.store.dequeue(id).await {
            tracing::warn!("migration {id}: cannot take it out of the queue: {}", error_chain(&e));
        }
        if known.outcome == MigrationOutcome::Active {
            tokio::spawn(follow(Arc::clone(c), source, id.clone()));
        }
        return true;
    }
    match ask(c, &source, &q.vm, &dest, &req, false, Some(id)).await {
        Ok(started) if started.migration_id.is_some() => {
            tracing::info!(
                "migration {id}: VM {} from host {} to host {} leaves the queue and starts",
                q.vm,
                source.name,
                dest.name
            );
            record_started(c, id, &q.vm, &source.name, &dest.name).await;
            if let Err(e) = c.store.dequeue(id).await {
                tracing::warn!("migration {id}: cannot take it out of the queue: {}", error_chain(&e));
            }
            tokio::spawn(follow(Arc::clone(c), source, id.clone()));
            true
        }
        Ok(started) => {
            let reasons = started.checks.reasons;
            let code =
                reasons.first().map(|r| r.code.as_str().to_string()).unwrap_or_else(|| "refused".into());
            let text =
                reasons.iter().map(|r| format!("{}: {}", r.code.as_str(), r.message)).collect::<Vec<_>>();
            fail(&code, format!("the checks refused it when it left the queue: {}", text.join("; ")), reasons)
                .await
        }
        Err(e) => fail("source_failed", e.message().to_string(), vec![]).await,
    }
}

/// Records `m` in the history; tried again a few times when the store fails (SQLite
/// refuses at once a write transaction whose snapshot another writer overtook: the
/// followers, the importer, the dispatcher and cancel all write migrations).
async fn save(c: &Controller, m: &MigrationRecord) -> Result<(), crate::store::Error> {
    let mut tries = 0u64;
    loop {
        match c.store.record_migration(m, unix_ms()).await {
            Err(e @ crate::store::Error::Sql { .. }) if tries < 5 => {
                tries += 1;
                tracing::debug!("migration {}: the store is busy ({}); again", m.id, error_chain(&e));
                tokio::time::sleep(Duration::from_millis(20 * tries)).await;
            }
            other => return other,
        }
    }
}

/// Migration `id` in `source`'s history, if it answers and has it.
async fn source_record(c: &Controller, source: &HostRow, id: &str) -> Option<MigrationRecord> {
    let url = format!("{}{}?id={id}", source.api_url, ferry_host_api::paths::MIGRATIONS);
    let answer = c.client.get(&url).await.and_then(ferry_pki::Response::error_for_status).ok()?;
    serde_json::from_slice::<MigrationList>(&answer.body).ok()?.migrations.into_iter().next()
}

/// `POST /migrations/ID/cancel`: a queued migration leaves the queue (`cancelled`, never
/// started); an active one is cancelled by its source host (the VM stays there, the
/// destination releases its reservation); the controller records the source's answer.
pub async fn cancel(c: &Arc<Controller>, id: &str) -> Result<MigrationDetail, Failure> {
    let by_id = crate::store::MigrationFilter { id: Some(id.to_string()), ..Default::default() };
    {
        let _turn = c.dispatch.lock().await;
        if c.store.dequeue(id).await? {
            let mut record = c.store.migrations(&by_id).await?.into_iter().next().ok_or_else(|| {
                failure(ErrorCode::Internal, format!("migration {id} was queued without a history row"))
            })?;
            let now = unix_ms();
            record.outcome = MigrationOutcome::Cancelled;
            record.reason_code = "cancelled".into();
            record.reason = "cancelled while queued: it never started".into();
            record.ended_unix_ms = Some(now);
            save(c, &record).await?;
            tracing::info!("migration {id}: cancelled while queued (VM {})", record.vm);
            return detail(c, id).await;
        }
    }
    let record = c.store.migrations(&by_id).await?.into_iter().next().ok_or_else(|| {
        failure(ErrorCode::NotFound, format!("no migration {id:?} in the controller's history"))
    })?;
    match record.outcome {
        MigrationOutcome::Active => {}
        MigrationOutcome::Cancelled => return detail(c, id).await,
        MigrationOutcome::Unknown => {
            return Err(failure(
                ErrorCode::Conflict,
                format!(
                    "migration {id}: its hosts {} and {} stopped answering (host_lost); nothing can be \
                     cancelled until one answers again (its outcome then comes from their histories)",
                    record.source, record.destination
                ),
            ))
        }
        other => {
            return Err(failure(
                ErrorCode::Conflict,
                format!("migration {id} has already ended: {} ({})", other.as_str(), record.reason_code),
            ))
        }
    }
    let source = c.store.host(&record.source).await?.ok_or_else(|| {
        failure(ErrorCode::Conflict, format!("migration {id}: its source host {} is unknown", record.source))
    })?;
    tracing::info!("migration {id}: cancel asked for; forwarded to host {}", source.name);
    let url = format!("{}{}", source.api_url, ferry_host_api::paths::cancel(id));
    let answer = c.client.post(&url, &serde_json::Value::Null).await.map_err(|e| {
        failure(
            ErrorCode::HostFailed,
            format!(
                "host {} ({}) did not answer the cancel: {}",
                source.name,
                source.api_url,
                error_chain(&e)
            ),
        )
    })?;
    let ended: MigrationRecord = host_answer(&source.name, answer)?;
    save(c, &ended).await?;
    tracing::info!("migration {id}: {} ({}) after the cancel", ended.outcome.as_str(), ended.reason_code);
    c.wake.notify_one();
    detail(c, id).await
}

/// `GET /migrations/ID`: the record (with its queue position) and the events.
pub async fn detail(c: &Controller, id: &str) -> Result<MigrationDetail, Failure> {
    let filter = crate::store::MigrationFilter { id: Some(id.to_string()), ..Default::default() };
    let mut list = c.store.migrations(&filter).await?;
    with_positions(c, &mut list).await?;
    let record = list.into_iter().next().ok_or_else(|| {
        failure(ErrorCode::NotFound, format!("no migration {id:?} in the controller's history"))
    })?;
    Ok(MigrationDetail { record, events: c.store.migration_events(id).await? })
}

/// Fills in the queue positions of the queued migrations of `list`.
pub async fn with_positions(c: &Controller, list: &mut [MigrationRecord]) -> Result<(), Failure> {
    if !list.iter().any(|m| m.outcome == MigrationOutcome::Queued) {
        return Ok(());
    }
    let queue = c.store.queue().await?;
    for m in list.iter_mut().filter(|m| m.outcome == MigrationOutcome::Queued) {
        m.queue_position = queue.iter().find(|q| q.id == m.id).map(|q| q.position);
    }
    Ok(())
}

/// At most this long for one question to a host about a migration it follows (a frozen
/// daemon accepts connections and never answers).
const ASK_DEADLINE: Duration = Duration::from_secs(5);
/// How often a migration recorded `unknown` (its hosts went silent) is asked about.
const LOST_FOLLOW_EVERY: Duration = Duration::from_secs(5);

/// What one host answered about a migration.
enum Heard {
    /// Its record.
    Record(Box<MigrationRecord>),
    /// It answered, without a record (none, an error status, a malformed list): why.
    Nothing(String),
    /// No answer (refused, reset, timed out): why.
    Silent(String),
}

/// Asks `host` for its record of migration `id`, within [`ASK_DEADLINE`].
async fn hear(c: &Controller, host: &HostRow, id: &str) -> Heard {
    let url = format!("{}{}?id={id}", host.api_url, ferry_host_api::paths::MIGRATIONS);
    let answer = match tokio::time::timeout(ASK_DEADLINE, c.client.get(&url)).await {
        Err(_) => return Heard::Silent(format!("host {} did not answer within {ASK_DEADLINE:?}", host.name)),
        Ok(Err(e)) => {
            return Heard::Silent(format!("cannot ask host {} about it: {}", host.name, error_chain(&e)))
        }
        Ok(Ok(a)) => a,
    };
    if !answer.is_success() {
        return Heard::Nothing(format!("host {} answered with status {}", host.name, answer.status));
    }
    match serde_json::from_slice::<MigrationList>(&answer.body) {
        Ok(list) => match list.migrations.into_iter().next() {
            Some(r) => Heard::Record(Box::new(r)),
            None => Heard::Nothing(format!("host {} has no record of it", host.name)),
        },
        Err(e) => Heard::Nothing(format!("host {} sent a malformed history: {e}", host.name)),
    }
}

/// Migration `id` as the controller's history holds it.
async fn stored(c: &Controller, id: &str) -> Option<MigrationRecord> {
    let by_id = crate::store::MigrationFilter { id: Some(id.to_string()), ..Default::default() };
    c.store.migrations(&by_id).await.ok()?.into_iter().next()
}

/// Records active migration `id` `unknown` (`host_lost`): its hosts were silent for
/// `silent_ms`; its slots are free from now on. Whether it was recorded so (not if it ended
/// meanwhile, or the store failed).
async fn mark_lost(c: &Controller, id: &str, silent_ms: u64) -> bool {
    let Some(mut record) = stored(c, id).await else { return false };
    if record.outcome != MigrationOutcome::Active {
        return false;
    }
    record.outcome = MigrationOutcome::Unknown;
    record.reason_code = "host_lost".into();
    record.reason = format!(
        "neither host {} nor host {} answered about it for {} s (bound {} s): its slots are freed; \
         its outcome is taken from their histories when one of them answers again",
        record.source,
        record.destination,
        silent_ms / 1000,
        c.limits.host_lost_after.as_secs()
    );
    match save(c, &record).await {
        Ok(()) => {
            tracing::warn!("migration {id}: unknown (host_lost): {}", record.reason);
            c.wake.notify_one();
            true
        }
        Err(e) => {
            tracing::warn!("migration {id}: cannot record it unknown: {}", error_chain(&e));
            false
        }
    }
}

/// Follows migration `id` in `source`'s history until it ends, recording each change. When
/// the source does not tell, its destination is asked; when neither has answered for
/// `[limits] host_lost_after_s` ([`crate::queue::HOST_LOST_AFTER`]), the migration is recorded
/// `unknown` (`host_lost`, its
/// slots freed) and asked about every [`LOST_FOLLOW_EVERY`] until a host's record settles it
/// ([`crate::queue::settle`]).
async fn follow(c: Arc<Controller>, source: HostRow, id: String) {
    use crate::queue::{settle, Side, Silence, Verdict};
    let deadline = tokio::time::Instant::now() + FOLLOW_AT_MOST;
    let mut source = source;
    let mut last_error = String::new();
    // Only the active controller follows, and only in the term it started in: after a
    // takeover the new active one follows it again (`resume`).
    let term = c.leader.active_term();
    let mut silence = Silence::new(unix_ms(), c.limits.host_lost_after);
    let known = stored(&c, &id).await;
    let mut destination = known.as_ref().map(|m| m.destination.clone());
    // Recorded `unknown` (here, or before a restart or a takeover).
    let mut lost = known.is_some_and(|m| m.outcome == MigrationOutcome::Unknown);
    while tokio::time::Instant::now() < deadline {
        if term.is_none() || c.leader.active_term() != term {
            tracing::info!("migration {id}: no longer followed here (this controller is not the active one)");
            return;
        }
        let from_source = hear(&c, &source, &id).await;
        let mut answered = !matches!(from_source, Heard::Silent(_));
        let mut from_destination = None;
        if !matches!(from_source, Heard::Record(_)) {
            // The source cannot tell (or has not answered): its destination may.
            if destination.is_none() {
                // The store failed when following began.
                destination = stored(&c, &id).await.map(|m| m.destination);
            }
            if let Some(Ok(Some(dest))) = match &destination {
                Some(name) => Some(c.store.host(name).await),
                None => None,
            } {
                let heard = hear(&c, &dest, &id).await;
                answered |= !matches!(heard, Heard::Silent(_));
                from_destination = Some(heard);
            }
            if matches!(from_source, Heard::Silent(_)) {
                // It may have joined again at another address.
                if let Ok(Some(again)) = c.store.host(&source.name).await {
                    source = again;
                }
            }
        }
        let now = unix_ms();
        if answered {
            silence.answered(now);
        }
        let (src, dst) = (
            match from_source {
                Heard::Record(r) => Ok(*r),
                Heard::Nothing(why) | Heard::Silent(why) => Err(why),
            },
            match from_destination {
                Some(Heard::Record(r)) => Ok(*r),
                Some(Heard::Nothing(why) | Heard::Silent(why)) => Err(why),
                None => Err(String::new()),
            },
        );
        let decided = match settle(src.as_ref().ok().map(|r| r.outcome), dst.as_ref().ok().map(|r| r.outcome))
        {
            Some(Side::Source) => src.as_ref().ok().cloned(),
            Some(Side::Destination) => dst.as_ref().ok().cloned(),
            None => None,
        };
        let Some(record) = decided else {
            let text = [src.err(), dst.err()]
                .into_iter()
                .flatten()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            if text != last_error {
                tracing::warn!("migration {id}: {text}");
                last_error = text;
            }
            if !lost {
                if let Verdict::Lost { silent_ms } = silence.verdict(now) {
                    lost = mark_lost(&c, &id, silent_ms).await;
                }
            }
            tokio::time::sleep(if lost { LOST_FOLLOW_EVERY } else { FOLLOW_EVERY }).await;
            continue;
        };
        if lost {
            match c.store.reconcile_unknown(&record, now).await {
                Ok(changed) => {
                    if changed {
                        tracing::info!(
                            "migration {id}: host {} answered again: {} ({}); the unknown record takes it",
                            if record.role == MigrationRole::Source {
                                &record.source
                            } else {
                                &record.destination
                            },
                            record.outcome.as_str(),
                            record.reason_code
                        );
                    }
                    lost = false;
                }
                Err(e) => tracing::warn!("migration {id}: cannot reconcile it: {}", error_chain(&e)),
            }
        }
        if !lost {
            if let Err(e) = save(&c, &record).await {
                tracing::warn!("migration {id}: cannot record it: {}", error_chain(&e));
            }
        }
        if record.outcome != MigrationOutcome::Active && !lost {
            c.wake.notify_one();
            if record.outcome == MigrationOutcome::Completed {
                // The inventory follows at once (the heartbeats confirm it).
                match c.store.move_vm(&record.vm, &record.source, &record.destination, unix_ms()).await {
                    Ok(true) => tracing::info!(
                        "migration {id}: VM {} now shown on host {}",
                        record.vm,
                        record.destination
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        "migration {id}: cannot move VM {} in the inventory: {}",
                        record.vm,
                        error_chain(&e)
                    ),
                }
            }
            tracing::info!(
                "migration {id}: {} ({}){}",
                record.outcome.as_str(),
                record.reason_code,
                record.downtime_ms.map(|d| format!(", downtime {d:.1} ms")).unwrap_or_default()
            );
            return;
        }
        tokio::time::sleep(if lost { LOST_FOLLOW_EVERY } else { FOLLOW_EVERY }).await;
    }
    tracing::warn!("migration {id}: not ended after {FOLLOW_AT_MOST:?}; no longer followed");
}

/// At start-up and at every takeover: follows again the migrations the history holds as active
/// or unknown (a controller that restarted, or a standby that took over, forgets none).
pub async fn resume(c: &Arc<Controller>) {
    let mut followed = Vec::new();
    // The unknown ones too: their hosts may answer again.
    for outcome in [MigrationOutcome::Active, MigrationOutcome::Unknown] {
        let filter = crate::store::MigrationFilter { outcome: Some(outcome), ..Default::default() };
        match c.store.migrations(&filter).await {
            Ok(list) => followed.extend(list),
            Err(e) => {
                tracing::warn!("cannot read the {} migrations: {}", outcome.as_str(), error_chain(&e));
                return;
            }
        }
    }
    for m in followed {
        match c.store.host(&m.source).await {
            Ok(Some(source)) => {
                tracing::info!(
                    "migration {}: following it again ({}; this controller restarted or took over)",
                    m.id,
                    m.outcome.as_str()
                );
                tokio::spawn(follow(Arc::clone(c), source, m.id.clone()));
            }
            _ => tracing::warn!("migration {}: its source host {} is unknown; not followed", m.id, m.source),
        }
    }
}

/// `POST /vms/NAME/ACTION`: forwarded to the host that has the VM (the one whose VMM runs
/// it, else the only one that reports it); the host's answer.
pub async fn action(
    c: &Controller,
    vm: &str,
    action: ferry_host_api::Action,
) -> Result<ferry_cluster_api::VmActionDone, Failure> {
    let host = source_of(c, vm).await?;
    let url = format!("{}{}", host.api_url, ferry_host_api::paths::action(vm, action));
    let answer = c.client.post(&url, &serde_json::Value::Null).await.map_err(|e| {
        failure(
            ErrorCode::HostFailed,
            format!("host {} ({}) did not answer: {}", host.name, host.api_url, error_chain(&e)),
        )
    })?;
    let detail = host_answer(&host.name, answer)?;
    tracing::info!("VM {vm}: {} on host {}", action.as_str(), host.name);
    Ok(ferry_cluster_api::VmActionDone { host: host.name, vm: detail })
}

/// Imports the hosts' own histories: every migration a joined, answering host reports as its
/// source (started with `ferry vm migrate` on the host, or through the controller) goes into
/// the controller's history. Idempotent; an ended migration is never changed back. A migration
/// recorded `unknown` takes its source's or its destination's record, as the two settle it
/// together ([`crate::queue::settle`]: `completed` from either wins).
pub async fn import_histories(c: &Controller) {
    let hosts = match c.store.hosts().await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("cannot list the hosts to import their histories: {}", error_chain(&e));
            return;
        }
    };
    // The migrations lost with their hosts: settled once every host's history was read
    // (`reconcile_imported`).
    let lost =
        crate::store::MigrationFilter { outcome: Some(MigrationOutcome::Unknown), ..Default::default() };
    let unknown: Vec<String> = match c.store.migrations(&lost).await {
        Ok(list) => list.into_iter().map(|m| m.id).collect(),
        Err(e) => {
            tracing::warn!("cannot list the unknown migrations: {}", error_chain(&e));
            Vec::new()
        }
    };
    // What the hosts report of those: the source's record and the destination's.
    let mut reports: std::collections::BTreeMap<String, (Option<MigrationRecord>, Option<MigrationRecord>)> =
        std::collections::BTreeMap::new();
    for host in hosts.iter().filter(|h| matches!(h.state, HostState::Connected | HostState::Maintenance)) {
        let url = format!("{}{}", host.api_url, ferry_host_api::paths::MIGRATIONS);
        let list = match c.client.get(&url).await.and_then(ferry_pki::Response::error_for_status) {
            Ok(r) => match serde_json::from_slice::<MigrationList>(&r.body) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("host {} sent a malformed migration history: {e}", host.name);
                    continue;
                }
            },
            Err(e) => {
                tracing::debug!("cannot read host {}'s migration history: {}", host.name, error_chain(&e));
                continue;
            }
        };
        for m in list.migrations.iter() {
            if unknown.contains(&m.id) {
                let (source, destination) = reports.entry(m.id.clone()).or_default();
                match m.role {
                    MigrationRole::Source => *source = Some(m.clone()),
                    MigrationRole::Destination => *destination = Some(m.clone()),
                }
                continue;
            }
            if m.role != MigrationRole::Source {
                continue;
            }
            if let Err(e) = save(c, m).await {
                tracing::warn!(
                    "migration {}: cannot record it from host {}'s history: {}",
                    m.id,
                    host.name,
                    error_chain(&e)
                );
            }
        }
    }
    for (source, destination) in reports.into_values() {
        reconcile_imported(c, source, destination).await;
    }
}

/// A migration recorded `unknown`, as its source and its destination report it (`None`: not
/// in the histories read): the record takes the one that settles it ([`crate::queue::settle`]:
/// `completed` from either wins).
async fn reconcile_imported(
    c: &Controller,
    source: Option<MigrationRecord>,
    destination: Option<MigrationRecord>,
) {
    let decided = match crate::queue::settle(
        source.as_ref().map(|m| m.outcome),
        destination.as_ref().map(|m| m.outcome),
    ) {
        Some(crate::queue::Side::Source) => source,
        Some(crate::queue::Side::Destination) => destination,
        None => None,
    };
    let Some(m) = decided else { return };
    let host = if m.role == MigrationRole::Source { &m.source } else { &m.destination };
    match c.store.reconcile_unknown(&m, unix_ms()).await {
        Ok(true) => {
            tracing::info!(
                "migration {}: host {host} answered again: {} ({}); the unknown record takes it",
                m.id,
                m.outcome.as_str(),
                m.reason_code
            );
            if m.outcome != MigrationOutcome::Active {
                c.wake.notify_one();
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!("migration {}: cannot reconcile it: {}", m.id, error_chain(&e)),
    }
}
