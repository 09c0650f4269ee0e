//! Placement: the controller picks the host for a VM to create, register or migrate.
//!
//! [`rank`] is pure: every host of the store through the precheck ([`crate::precheck`]), the
//! hosts that pass scored and ordered, the others with every reason. The score (also in
//! docs/cluster.md, "Placement"):
//!
//! 1. the most free memory after placement, as a fraction of what VMs may have on the host:
//!    `(free - reserved - vm) / total`, where `free` is what the host last reported free for
//!    VMs (its own migration check's figure), `reserved` what the controller holds on it
//!    (the memory of the VMs of migrations `active` or `queued` to it, of migrations that
//!    completed after its last report, and of creates in progress), `total` its
//!    `vm_memory_mib` or its memory;
//! 2. then the lowest load: the vCPUs of its running VMs per logical CPU;
//! 3. then the host's name.
//!
//! A migration then asks the source daemon's real check for the best host, and the next one
//! if that check fails; a create or register is forwarded to the best host's daemon. One
//! decision at a time (a lock), and the memory of the VM is held on the chosen host in the
//! controller's memory ([`Pending`]) until the create ends or the migration is in the
//! store's history: two placements at once cannot both count the same free memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_cluster_api::{
    CheckReason, CreateVmRequest, ErrorCode, MigrateRequest, MigrationStarted, Placement, PlacementHost,
    PlacementScore, RegisterVmRequest, VmActionDone,
};
use ferry_host_api::{CreateVm, RegisterVm, VmDetail};

use crate::error_chain;
use crate::precheck::{precheck, DatastoreRef, Fit, VmFacts};
use crate::server::{Controller, Failure};
use crate::store::{unix_ms, HostRow};

/// How long a migration's hold stays at most, waiting for the migration to be in the
/// store's history (where it counts as `active`).
const MIGRATION_HOLD_AT_MOST: Duration = Duration::from_secs(10);

/// Ranks every host in `hosts` for `vm`, with `reserved` bytes held by the controller on
/// each (by host name; absent: 0): the hosts that pass the precheck first, best first,
/// with their rank (from 1) and score; then the others by name with every reason. Pure.
pub fn rank(vm: &VmFacts, hosts: &[HostRow], reserved: &BTreeMap<String, u64>) -> Vec<PlacementHost> {
    let mut fit: Vec<(&HostRow, Fit)> = Vec::new();
    let mut excluded: Vec<PlacementHost> = Vec::new();
    for h in hosts {
        match precheck(vm, h, reserved.get(&h.name).copied().unwrap_or(0)) {
            Ok(f) => fit.push((h, f)),
            Err(reasons) => {
                excluded.push(PlacementHost { host: h.name.clone(), rank: None, score: None, reasons })
            }
        }
    }
    let fraction =
        |f: &Fit| if f.memory.total == 0 { 0.0 } else { f.memory.after as f64 / f.memory.total as f64 };
    fit.sort_by(|(ha, a), (hb, b)| {
        fraction(b)
            .total_cmp(&fraction(a))
            .then(a.load.total_cmp(&b.load))
            .then_with(|| ha.name.cmp(&hb.name))
    });
    excluded.sort_by(|a, b| a.host.cmp(&b.host));
    let mut out: Vec<PlacementHost> = fit
        .iter()
        .enumerate()
        .map(|(i, (h, f))| PlacementHost {
            host: h.name.clone(),
            rank: Some(i as u32 + 1),
            score: Some(PlacementScore {
                total_bytes: f.memory.total,
                free_bytes: f.memory.free,
                reserved_bytes: f.memory.reserved,
                free_after_bytes: f.memory.after,
                free_after_fraction: fraction(f),
                load: f.load,
            }),
            reasons: Vec::new(),
        })
        .collect();
    out.extend(excluded);
    out
}

/// The memory the controller holds for placements in progress (creates, registers, and
/// migrations until their history row exists), by host. In memory: a restarted controller
/// starts with none (what it held was for requests that died with it).
#[derive(Debug, Default)]
pub struct Pending {
    held: Arc<Mutex<BTreeMap<u64, (String, u64)>>>,
    next: AtomicU64,
    /// One decision at a time: ranking, the chosen host's check and the hold.
    decide: tokio::sync::Mutex<()>,
}

/// Memory held on a host until dropped.
#[derive(Debug)]
pub struct Hold {
    held: Arc<Mutex<BTreeMap<u64, (String, u64)>>>,
    id: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Ok(mut h) = self.held.lock() {
            h.remove(&self.id);
        }
    }
}

impl Pending {
    /// Holds `bytes` on `host` until the answer is dropped.
    pub fn hold(&self, host: &str, bytes: u64) -> Hold {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.held.lock() {
            h.insert(id, (host.to_string(), bytes));
        }
        Hold { held: Arc::clone(&self.held), id }
    }

    /// What is held, by host.
    pub fn by_host(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Ok(h) = self.held.lock() {
            for (host, bytes) in h.values() {
                *out.entry(host.clone()).or_insert(0) += bytes;
            }
        }
        out
    }
}

fn failure(code: ErrorCode, message: String) -> Failure {
    Failure::new(code, message)
}

/// What the controller holds on each host: the store's migrations to it plus [`Pending`].
async fn reserved(c: &Controller) -> Result<BTreeMap<String, u64>, Failure> {
    let mut r = c.store.reserved_by_destination(unix_ms()).await?;
    for (host, bytes) in c.placing.by_host() {
        *r.entry(host).or_insert(0) += bytes;
    }
    Ok(r)
}

/// "no host can take VM X: a: code; b: code, code".
fn nowhere(vm: &str, ranking: &[PlacementHost]) -> Failure {
    let rows: Vec<String> = ranking
        .iter()
        .map(|h| {
            let codes: Vec<&str> = h.reasons.iter().map(|r| r.code.as_str()).collect();
            format!("{}: {}", h.host, codes.join(", "))
        })
        .collect();
    failure(
        ErrorCode::Conflict,
        if rows.is_empty() {
            format!("no host can take VM {vm}: the cluster has no other host")
        } else {
            format!("no host can take VM {vm} ({}); see the reasons with explain", rows.join("; "))
        },
    )
}

/// Sends `body` to `host`'s daemon at `path` (GET without a body) and decodes its answer;
/// its error answers keep their kind.
async fn call<T: serde::de::DeserializeOwned>(
    c: &Controller,
    host: &HostRow,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<T, Failure> {
    let url = format!("{}{path}", host.api_url);
    let answer = match body {
        Some(b) => c.client.post(&url, b).await,
        None => c.client.get(&url).await,
    }
    .map_err(|e| {
        failure(
            ErrorCode::HostFailed,
            format!("host {} ({}) did not answer: {}", host.name, host.api_url, error_chain(&e)),
        )
    })?;
    crate::migrate::host_answer(&host.name, answer)
}

/// The facts of VM `vm` for its migration: its source (the host whose VMM runs it), its
/// report there, its port groups and `cpu_hide` from its definition (asked of the source
/// daemon), and its EVC generation's features.
async fn migration_facts(c: &Controller, vm: &str) -> Result<(HostRow, VmFacts), Failure> {
    let source = crate::migrate::source_of(c, vm).await?;
    let detail: VmDetail = call(c, &source, &ferry_host_api::paths::vm(vm), None).await?;
    let portgroups = detail.definition.nics.iter().map(|n| n.portgroup.clone()).collect();
    let generation = match source.info.vms.iter().find(|v| v.name == vm).and_then(|v| v.cpuid_generation) {
        Some(g) => Some(g),
        None => c.store.evc_vm_generations().await?.get(vm).copied(),
    };
    let baseline = match generation {
        Some(g) => {
            c.store.evc_generations().await?.into_iter().find(|b| b.generation == g).map(|b| b.features)
        }
        None => None,
    };
    let facts =
        VmFacts::from_source(vm, &source.info, portgroups, &detail.definition.cpu_hide, baseline.as_deref())
            .ok_or_else(|| {
                failure(ErrorCode::NotFound, format!("host {} no longer reports VM {vm:?}", source.name))
            })?;
    Ok((source, facts))
}

/// `POST /vms/NAME/migrate` with `explain` and no `to_host`: the ranking, nothing migrated.
pub async fn explain_migration(c: &Controller, vm: &str) -> Result<Placement, Failure> {
    let (source, facts) = migration_facts(c, vm).await?;
    let hosts = c.store.hosts().await?;
    let ranking = rank(&facts, &hosts, &reserved(c).await?);
    Ok(Placement { vm: vm.into(), source: Some(source.name), memory_mib: facts.memory_mib, hosts: ranking })
}

/// `POST /vms/NAME/migrate` without `to_host`: the best host whose real check (by the
/// source daemon) passes, then the migration to it as with `to_host`; the VM's memory is
/// held there until the migration is in the history.
pub async fn migrate(
    c: &Arc<Controller>,
    vm: &str,
    req: &MigrateRequest,
) -> Result<MigrationStarted, Failure> {
    let decision = c.placing.decide.lock().await;
    let (source, facts) = migration_facts(c, vm).await?;
    let hosts = c.store.hosts().await?;
    let mut ranking = rank(&facts, &hosts, &reserved(c).await?);
    let mut chosen = None;
    for row in ranking.iter_mut().filter(|r| r.rank.is_some()) {
        let Some(dest) = hosts.iter().find(|h| h.name == row.host) else { continue };
        let check = crate::migrate::check_one(c, &source, vm, dest, req).await;
        if check.ok {
            chosen = Some(dest.name.clone());
            break;
        }
        tracing::info!(
            "placement of VM {vm}: host {} passed the controller's checks, not the source's: {}",
            dest.name,
            check.reasons.iter().map(|r| r.code.as_str()).collect::<Vec<_>>().join(", ")
        );
        row.rank = None;
        row.reasons = check.reasons;
    }
    let Some(dest) = chosen else { return Err(nowhere(vm, &ranking)) };
    let hold = c.placing.hold(&dest, facts.memory_mib << 20);
    drop(decision);
    tracing::info!("placement of VM {vm}: host {dest} (from {})", source.name);
    let req = MigrateRequest { to_host: Some(dest), ..req.clone() };
    let started = crate::migrate::migrate(c, vm, &req).await?;
    if let Some(id) = started.migration_id.clone() {
        // Until the follower records it (then it counts as `active`), the hold stands.
        let c = Arc::clone(c);
        tokio::spawn(async move {
            let filter = crate::store::MigrationFilter { id: Some(id), ..Default::default() };
            let until = tokio::time::Instant::now() + MIGRATION_HOLD_AT_MOST;
            while tokio::time::Instant::now() < until {
                if c.store.migrations(&filter).await.is_ok_and(|m| !m.is_empty()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(hold);
        });
    }
    Ok(started)
}

/// The facts of a VM to create from its definition.
fn create_facts(req: &CreateVmRequest) -> VmFacts {
    let d = &req.definition;
    VmFacts {
        name: d.name.clone(),
        memory_mib: d.memory_mib,
        vcpus: d.vcpus,
        source: None,
        datastore: Some(DatastoreRef::Name(req.datastore.clone())),
        portgroups: d.nics.iter().map(|n| n.portgroup.clone()).collect(),
        cpu_features: None,
        migration_protocols: Vec::new(),
        api_version: None,
    }
}

/// Refuses a create of a name the cluster has, or on a datastore no host has.
async fn create_input(c: &Controller, req: &CreateVmRequest, hosts: &[HostRow]) -> Result<(), Failure> {
    let name = &req.definition.name;
    let existing = c.store.vms(Some(name), unix_ms()).await?;
    if !existing.is_empty() {
        let on: Vec<&str> = existing.iter().map(|v| v.host.as_str()).collect();
        return Err(failure(
            ErrorCode::Conflict,
            format!("a VM named {name:?} already exists in this cluster (on host {})", on.join(", ")),
        ));
    }
    if !hosts.iter().any(|h| h.info.datastores.iter().any(|d| d.name == req.datastore)) {
        return Err(failure(
            ErrorCode::NotFound,
            format!("no host of this cluster has a datastore named {:?}", req.datastore),
        ));
    }
    Ok(())
}

/// The ranking of `facts` on `req_host` only (named) or on every host.
fn ranking_for(
    facts: &VmFacts,
    hosts: &[HostRow],
    reserved: &BTreeMap<String, u64>,
    req_host: Option<&str>,
) -> Result<Vec<PlacementHost>, Failure> {
    match req_host {
        Some(name) => {
            let h = hosts.iter().find(|h| h.name == name).ok_or_else(|| {
                failure(ErrorCode::NotFound, format!("no host named {name:?} joined this cluster"))
            })?;
            Ok(rank(facts, std::slice::from_ref(h), reserved))
        }
        None => Ok(rank(facts, hosts, reserved)),
    }
}

/// `POST /vms` with `explain`: the ranking, nothing created.
pub async fn explain_create(c: &Controller, req: &CreateVmRequest) -> Result<Placement, Failure> {
    let hosts = c.store.hosts().await?;
    create_input(c, req, &hosts).await?;
    let facts = create_facts(req);
    let hosts = ranking_for(&facts, &hosts, &reserved(c).await?, req.host.as_deref())?;
    Ok(Placement { vm: facts.name, source: None, memory_mib: facts.memory_mib, hosts })
}

/// `POST /vms`: the named host, or the best one, checked by the controller; its daemon
/// creates the VM (the VM's memory held there meanwhile).
pub async fn create(c: &Controller, req: &CreateVmRequest) -> Result<VmActionDone, Failure> {
    let decision = c.placing.decide.lock().await;
    let hosts = c.store.hosts().await?;
    create_input(c, req, &hosts).await?;
    let facts = create_facts(req);
    let ranking = ranking_for(&facts, &hosts, &reserved(c).await?, req.host.as_deref())?;
    let Some(best) = ranking.iter().find(|r| r.rank == Some(1)) else {
        return Err(nowhere(&facts.name, &ranking));
    };
    let host = hosts.iter().find(|h| h.name == best.host).cloned().ok_or_else(|| {
        failure(ErrorCode::Internal, format!("host {} vanished from the ranking", best.host))
    })?;
    let _hold = c.placing.hold(&host.name, facts.memory_mib << 20);
    drop(decision);
    tracing::info!("VM {}: created on host {} by placement", facts.name, host.name);
    let body = CreateVm { datastore: req.datastore.clone(), definition: req.definition.clone() };
    let body = serde_json::to_value(&body).map_err(|e| failure(ErrorCode::Internal, e.to_string()))?;
    let vm: VmDetail = call(c, &host, ferry_host_api::paths::VMS, Some(&body)).await?;
    Ok(VmActionDone { host: host.name, vm })
}

/// The datastore (id) and path under it of `path` on `host`, if one of its datastores holds it.
fn under_datastore<'a>(host: &'a HostRow, path: &'a Path) -> Option<(&'a str, &'a Path)> {
    host.info
        .datastores
        .iter()
        .find_map(|d| path.strip_prefix(&d.path).ok().map(|rest| (d.id.as_str(), rest)))
}

/// The facts of a home to register and, per host that sees its datastore, its path there.
fn register_facts(
    req: &RegisterVmRequest,
    hosts: &[HostRow],
) -> Result<(VmFacts, BTreeMap<String, PathBuf>), Failure> {
    let Some((id, rest)) = hosts.iter().find_map(|h| under_datastore(h, &req.path)) else {
        return Err(failure(
            ErrorCode::NotFound,
            format!("{} is on no datastore of a host of this cluster", req.path.display()),
        ));
    };
    let name = rest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut paths = BTreeMap::new();
    for h in hosts {
        if let Some(d) = h.info.datastores.iter().find(|d| d.id == id) {
            paths.insert(h.name.clone(), d.path.join(rest));
        }
    }
    let facts = VmFacts {
        name,
        memory_mib: 0,
        vcpus: 0,
        source: None,
        datastore: Some(DatastoreRef::Id(id.to_string())),
        portgroups: Vec::new(),
        cpu_features: None,
        migration_protocols: Vec::new(),
        api_version: None,
    };
    Ok((facts, paths))
}

/// `POST /vms/register` with `explain`: the ranking, nothing registered.
pub async fn explain_register(c: &Controller, req: &RegisterVmRequest) -> Result<Placement, Failure> {
    let hosts = c.store.hosts().await?;
    let (facts, _) = register_facts(req, &hosts)?;
    let hosts = ranking_for(&facts, &hosts, &reserved(c).await?, req.host.as_deref())?;
    Ok(Placement { vm: facts.name, source: None, memory_mib: 0, hosts })
}

/// `POST /vms/register`: the named host, or the best one among those that see the home's
/// datastore; its daemon registers the home (its path there).
pub async fn register(c: &Controller, req: &RegisterVmRequest) -> Result<VmActionDone, Failure> {
    let hosts = c.store.hosts().await?;
    let (facts, paths) = register_facts(req, &hosts)?;
    let ranking = ranking_for(&facts, &hosts, &reserved(c).await?, req.host.as_deref())?;
    let Some(best) = ranking.iter().find(|r| r.rank == Some(1)) else {
        return Err(nowhere(&facts.name, &ranking));
    };
    let (Some(host), Some(path)) = (hosts.iter().find(|h| h.name == best.host), paths.get(&best.host)) else {
        return Err(failure(ErrorCode::Internal, format!("host {} vanished from the ranking", best.host)));
    };
    let body = serde_json::to_value(RegisterVm { path: path.clone() })
        .map_err(|e| failure(ErrorCode::Internal, e.to_string()))?;
    let vm: VmDetail = call(c, host, ferry_host_api::paths::REGISTER, Some(&body)).await?;
    tracing::info!("VM {}: registered on host {} ({})", vm.name, host.name, path.display());
    Ok(VmActionDone { host: host.name.clone(), vm })
}

/// The reasons of a ranking row, for the CLI's table.
pub fn reasons_text(reasons: &[CheckReason]) -> String {
    reasons.iter().map(|r| format!("{}: {}", r.code, r.message)).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precheck::tests::{facts, host, vm_on};
    use ferry_host_api::VmState;

    fn order(r: &[PlacementHost]) -> Vec<(&str, Option<u32>)> {
        r.iter().map(|h| (h.host.as_str(), h.rank)).collect()
    }

    #[test]
    fn most_free_after_placement_first() {
        // c has the most free bytes but the smallest fraction left of its total.
        let hosts = vec![host("a", 4096, 2048), host("b", 1024, 1024), host("c", 16384, 4096)];
        let r = rank(&facts(None), &hosts, &BTreeMap::new());
        assert_eq!(order(&r), [("b", Some(1)), ("a", Some(2)), ("c", Some(3))]);
        let s = r[0].score.as_ref().expect("score");
        assert_eq!(s.free_after_bytes, 768 << 20);
        assert!((s.free_after_fraction - 0.75).abs() < 1e-9);
    }

    #[test]
    fn load_then_name_break_ties() {
        let mut a = host("a", 4096, 2048);
        let b = host("b", 4096, 2048);
        let c = host("c", 4096, 2048);
        vm_on(&mut a, "x", 64, 2, VmState::Running);
        let r = rank(&facts(None), &[a, c, b], &BTreeMap::new());
        assert_eq!(order(&r), [("b", Some(1)), ("c", Some(2)), ("a", Some(3))]);
        assert!((r[2].score.as_ref().expect("score").load - 0.5).abs() < 1e-9);
    }

    #[test]
    fn reservations_count_and_excluded_hosts_last() {
        let hosts = vec![host("a", 4096, 2048), host("b", 4096, 1024), host("full", 4096, 100)];
        let mut reserved = BTreeMap::new();
        // 1536 MiB held on a: b (1024 free) is now better.
        reserved.insert("a".to_string(), 1536u64 << 20);
        let r = rank(&facts(None), &hosts, &reserved);
        assert_eq!(order(&r), [("b", Some(1)), ("a", Some(2)), ("full", None)]);
        assert_eq!(r[1].score.as_ref().expect("score").reserved_bytes, 1536 << 20);
        assert_eq!(r[2].reasons.iter().map(|x| x.code.as_str()).collect::<Vec<_>>(), ["not_enough_memory"]);
        // Held beyond what a has: excluded too.
        reserved.insert("a".to_string(), 1900u64 << 20);
        let r = rank(&facts(None), &hosts, &reserved);
        assert_eq!(order(&r), [("b", Some(1)), ("a", None), ("full", None)]);
    }

    #[test]
    fn pending_holds_until_dropped() {
        let p = Pending::default();
        let one = p.hold("a", 100);
        let two = p.hold("a", 50);
        let three = p.hold("b", 7);
        assert_eq!(p.by_host(), BTreeMap::from([("a".to_string(), 150), ("b".to_string(), 7)]));
        drop(two);
        drop(three);
        assert_eq!(p.by_host(), BTreeMap::from([("a".to_string(), 100)]));
        drop(one);
        assert!(p.by_host().is_empty());
    }

    #[test]
    fn no_host_at_all() {
        let r = rank(&facts(None), &[], &BTreeMap::new());
        assert!(r.is_empty());
        let text = nowhere("web1", &r).message().to_string();
        assert!(text.contains("no other host"), "{text}");
    }

    #[test]
    fn register_maps_the_path_per_host() {
        let mut a = host("a", 4096, 2048);
        let mut b = host("b", 4096, 2048);
        std::sync::Arc::make_mut(&mut a.info).datastores[0].path = "/mnt/a/ds".into();
        std::sync::Arc::make_mut(&mut b.info).datastores[0].path = "/mnt/b/ds".into();
        let req = RegisterVmRequest { path: "/mnt/a/ds/web2".into(), host: None, explain: false };
        let (f, paths) = register_facts(&req, &[a.clone(), b.clone()]).expect("on a datastore");
        assert_eq!(f.name, "web2");
        assert_eq!(f.datastore, Some(DatastoreRef::Id("ds-id".into())));
        assert_eq!(paths.get("b").map(PathBuf::as_path), Some(Path::new("/mnt/b/ds/web2")));
        let req = RegisterVmRequest { path: "/elsewhere/web2".into(), host: None, explain: false };
        assert!(register_facts(&req, &[a, b]).is_err());
    }
}
