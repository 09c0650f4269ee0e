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
    CheckReason, CheckTable, ErrorCode, HostCheck, HostState, MigrateRequest, MigrationStarted,
};
use ferry_host_api::{MigrateStarted, MigrateVm, MigrationList, MigrationOutcome};

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
) -> Result<MigrateStarted, Failure> {
    let body = MigrateVm {
        to_host: dest.api_url.clone(),
        downtime_ms: req.downtime_ms,
        streams: req.streams,
        check,
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
    match ask(c, source, vm, dest, req, true).await {
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

/// `POST /vms/NAME/migrate`: checks, then the source daemon migrates; followed until it ends.
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
    if !matches!(dest.state, HostState::Connected | HostState::Maintenance) {
        let checks = check_one(c, &source, vm, &dest, req).await;
        return Ok(MigrationStarted {
            vm: vm.into(),
            source: source.name,
            destination: dest.name,
            checks,
            migration_id: None,
        });
    }
    let started = ask(c, &source, vm, &dest, req, false).await?;
    let checks = host_check(&dest, &started.checks);
    if let Some(id) = &started.migration_id {
        tracing::info!(
            "migration {id}: VM {vm} from host {} to host {} started through the controller",
            source.name,
            dest.name
        );
        tokio::spawn(follow(Arc::clone(c), source.clone(), id.clone()));
    }
    Ok(MigrationStarted {
        vm: vm.into(),
        source: source.name,
        destination: dest.name,
        checks,
        migration_id: started.migration_id,
    })
}

/// Follows migration `id` in `source`'s history until it ends, recording each change.
async fn follow(c: Arc<Controller>, source: HostRow, id: String) {
    let url = format!("{}{}?id={id}", source.api_url, ferry_host_api::paths::MIGRATIONS);
    let deadline = tokio::time::Instant::now() + FOLLOW_AT_MOST;
    let mut last_error = String::new();
    while tokio::time::Instant::now() < deadline {
        let answer = c.client.get(&url).await.and_then(ferry_pki::Response::error_for_status);
        match answer.map(|r| serde_json::from_slice::<MigrationList>(&r.body)) {
            Ok(Ok(list)) => match list.migrations.into_iter().next() {
                Some(record) => {
                    if let Err(e) = c.store.record_migration(&record, unix_ms()).await {
                        tracing::warn!("migration {id}: cannot record it: {}", error_chain(&e));
                    }
                    if record.outcome != MigrationOutcome::Active {
                        tracing::info!(
                            "migration {id}: {} ({}){}",
                            record.outcome.as_str(),
                            record.reason_code,
                            record.downtime_ms.map(|d| format!(", downtime {d:.1} ms")).unwrap_or_default()
                        );
                        return;
                    }
                }
                None => {
                    let text = format!("host {} has no record of it", source.name);
                    if text != last_error {
                        tracing::warn!("migration {id}: {text}");
                        last_error = text;
                    }
                }
            },
            Ok(Err(e)) => {
                tracing::warn!("migration {id}: host {} sent a malformed history: {e}", source.name)
            }
            Err(e) => {
                let text = error_chain(&e);
                if text != last_error {
                    tracing::warn!("migration {id}: cannot ask host {} about it: {text}", source.name);
                    last_error = text;
                }
            }
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
    tracing::warn!("migration {id}: not ended after {FOLLOW_AT_MOST:?}; no longer followed");
}

/// At start-up: follows again the migrations the history holds as active (a controller that
/// restarted forgets none).
pub async fn resume(c: &Arc<Controller>) {
    let filter =
        crate::store::MigrationFilter { outcome: Some(MigrationOutcome::Active), ..Default::default() };
    let active = match c.store.migrations(&filter).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("cannot read the active migrations: {}", error_chain(&e));
            return;
        }
    };
    for m in active {
        match c.store.host(&m.source).await {
            Ok(Some(source)) => {
                tracing::info!("migration {}: following it again (controller restarted)", m.id);
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
        return Err(failure(code, format!("host {}: {text}", host.name)));
    }
    let detail = serde_json::from_slice(&answer.body).map_err(|e| {
        failure(ErrorCode::HostFailed, format!("host {} sent a malformed answer: {e}", host.name))
    })?;
    tracing::info!("VM {vm}: {} on host {}", action.as_str(), host.name);
    Ok(ferry_cluster_api::VmActionDone { host: host.name, vm: detail })
}

/// Imports the hosts' own histories: every migration a joined, answering host reports as its
/// source (started with `ferry vm migrate` on the host, or through the controller) goes into
/// the controller's history. Idempotent; an ended migration is never changed back.
pub async fn import_histories(c: &Controller) {
    let hosts = match c.store.hosts().await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("cannot list the hosts to import their histories: {}", error_chain(&e));
            return;
        }
    };
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
        for m in list.migrations.iter().filter(|m| m.role == ferry_host_api::MigrationRole::Source) {
            if let Err(e) = c.store.record_migration(m, unix_ms()).await {
                tracing::warn!(
                    "migration {}: cannot record it from host {}'s history: {}",
                    m.id,
                    host.name,
                    error_chain(&e)
                );
            }
        }
    }
}
