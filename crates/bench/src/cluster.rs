//! `ferry-bench cluster`: the controller at vCenter's published maximums (2,500 hosts,
//! 40,000 powered-on VMs), in two parts.
//!
//! 1. **Simulator** (as govmomi's vcsim is for vCenter): the controller's real store
//!    (`ferry_cluster::store`, on a SQLite file and on a PostgreSQL database) and its real
//!    router (`ferry_cluster::server::router`), driven in this process. Every synthetic host's
//!    inventory goes through the real `POST /heartbeat` handler (JSON parse, EVC, store), with
//!    the peer identity and address the TLS server would have attached; only TLS and the
//!    sockets are left out. Timed: each heartbeat (the join pass, then steady passes), the CPU
//!    it costs (this process, plus PostgreSQL's backends of the run's database), listing every
//!    VM (the store call and the router's `GET /vms` JSON), the check of one VM against every
//!    host and the placement decision (when the controller has them: `precheck` and
//!    `placement::rank`).
//! 2. **Agents**: a real `ferry cluster serve` process and `--agents` simulated host agents in
//!    this process, each with its own host certificate from a throwaway CA, each sending the
//!    real `POST /heartbeat` every 2 s over mutual TLS (a new connection each time, as the
//!    host daemon does). Timed: heartbeat latency, the controller's CPU (`/proc/PID/stat`) and
//!    RSS; then the other hosts' inventories are sent once each over HTTPS (up to 40,000 VMs)
//!    and the controller's RSS and `GET /vms` over HTTPS are measured.
//!
//! The synthetic inventory: the CPU of this machine as KVM offers it (three generations:
//! the first hides two features, the second one, the third none; the first host to join is
//! of the first, so it sets the EVC baseline every other host offers), memory of 512 GiB to
//! 1 TiB, groups of 32 hosts sharing 2 to 4 datastores plus one datastore every host sees,
//! three port groups each, `--vms-per-host` running VMs of 2 to 16 GiB each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_cluster_api::{paths, Heartbeat};
use ferry_host_api::{CpuInfo, DatastoreInfo, HostInfo, MemoryInfo, PortGroupInfo, VmState, VmSummary};
use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::Row;

use crate::leases::{parse_stat, percentile};
use crate::stats::Summary;

/// The environment variable the controller's tests take a PostgreSQL server's URL from.
const POSTGRES_URL_ENV: &str = "FERRY_TEST_POSTGRES_URL";

/// The heartbeat interval the hosts use (ms).
const INTERVAL_MS: u64 = ferry_cluster_api::HEARTBEAT_INTERVAL_MS;

/// Hosts that share a group of datastores.
const GROUP: usize = 32;

/// Which store(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backends {
    /// A SQLite file (WAL), in a temporary directory.
    Sqlite,
    /// A fresh database on the PostgreSQL server of `--database`.
    Postgres,
    /// Both, SQLite first.
    Both,
}

/// Arguments of the cluster benchmark.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  scripts/bench.sh cluster                       # full scale, SQLite and PostgreSQL (bench.sh starts one)
  ferry-bench cluster --backend sqlite --hosts 200 --agents 50 --agent-seconds 6
  ferry-bench cluster --database postgres://postgres@127.0.0.1:5433/postgres --json
  ferry-bench cluster --no-agents --runs 5       # the simulator only")]
pub struct ClusterArgs {
    /// Simulated hosts.
    #[arg(long, default_value_t = 2500)]
    hosts: usize,
    /// Running VMs on each host.
    #[arg(long, default_value_t = 16)]
    vms_per_host: usize,
    /// Runs (each: a fresh store filled by the join pass, then one steady heartbeat pass and
    /// the other measurements); figures are medians over runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which store.
    #[arg(long, value_enum, default_value = "both")]
    backend: Backends,
    /// A PostgreSQL server (its database is used to create one database per run), else
    /// $FERRY_TEST_POSTGRES_URL.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Checks and placements timed per run (for their p50 and p99).
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Real agents over TLS against a `ferry cluster serve` process (0: none).
    #[arg(long, default_value_t = 300)]
    agents: usize,
    /// The measuring window of the agents part, seconds (after every agent joined).
    #[arg(long, default_value_t = 20)]
    agent_seconds: u64,
    /// Skip the agents part.
    #[arg(long)]
    no_agents: bool,
    /// Skip the simulator part.
    #[arg(long)]
    no_simulator: bool,
}

// ---------------------------------------------------------------------------------------
// The synthetic inventory

/// What every synthetic host shares: this machine's CPU as KVM offers it.
#[derive(Clone, Debug)]
pub struct Template {
    cpu: CpuInfo,
    /// The features the first and second CPU generations lack.
    older: [String; 2],
}

impl Template {
    /// This machine's CPU (a fixed list of common x86 features when KVM cannot be asked).
    pub fn probe() -> Template {
        let mut cpu = ferry_host::inventory::cpu(&[]);
        cpu.kvm_model = ferry_arch::model::probe_host(&[]).ok();
        if cpu.kvm.is_none() {
            let features = [
                "fpu",
                "vme",
                "de",
                "pse",
                "tsc",
                "msr",
                "pae",
                "mce",
                "cx8",
                "apic",
                "sep",
                "mtrr",
                "pge",
                "mca",
                "cmov",
                "pat",
                "pse36",
                "clflush",
                "mmx",
                "fxsr",
                "sse",
                "sse2",
                "ss",
                "ht",
                "syscall",
                "nx",
                "lm",
                "sse3",
                "pclmulqdq",
                "ssse3",
                "fma",
                "cx16",
                "sse4_1",
                "sse4_2",
                "movbe",
                "popcnt",
                "aes",
                "xsave",
                "avx",
                "f16c",
                "rdrand",
                "lahf_lm",
                "abm",
                "fsgsbase",
                "bmi1",
                "avx2",
                "smep",
                "bmi2",
                "erms",
                "invpcid",
                "rdseed",
                "adx",
                "smap",
                "clflushopt",
                "xsaveopt",
            ];
            cpu.kvm = Some(ferry_host_api::KvmCpuid {
                digest: "synthetic".into(),
                entries: 40,
                features: features.iter().map(|f| f.to_string()).collect(),
                hidden: Vec::new(),
            });
        }
        if cpu.cpus == 0 {
            cpu.cpus = 64;
        }
        let features = cpu.kvm.as_ref().map(|k| k.features.clone()).unwrap_or_default();
        // Two features an older CPU generation would lack: the newest ones this machine has.
        let pick = |prefer: &[&str], skip: &str| {
            prefer
                .iter()
                .find(|p| **p != skip && features.iter().any(|f| f == *p))
                .map(|p| p.to_string())
                .or_else(|| features.iter().rev().find(|f| *f != skip).cloned())
                .unwrap_or_default()
        };
        let first = pick(&["avx512f", "adx", "rdseed", "avx2"], "");
        let second = pick(&["rdseed", "adx", "bmi2", "movbe"], &first);
        Template { cpu, older: [first, second] }
    }

    /// A host's CPU: generation `i % 3` (0 lacks both older features, 1 the first, 2 none).
    fn cpu(&self, i: usize) -> CpuInfo {
        let mut cpu = self.cpu.clone();
        cpu.cpus = 64 + 32 * (i % 3) as u32;
        if let Some(k) = cpu.kvm.as_mut() {
            let lacks: &[String] = match i % 3 {
                0 => &self.older,
                1 => &self.older[..1],
                _ => &[],
            };
            k.features.retain(|f| !lacks.contains(f));
            k.hidden = lacks.to_vec();
        }
        cpu
    }
}

/// The name of synthetic host `i`.
pub fn host_name(i: usize) -> String {
    format!("esx-{i:04}")
}

/// The name of VM `k` of host `i`.
pub fn vm_name(i: usize, k: usize) -> String {
    format!("vm-{i:04}-{k:02}")
}

const GIB: u64 = 1 << 30;

/// Synthetic host `i`'s inventory (`beat`: which heartbeat, to vary the free memory as real
/// hosts' reports do).
pub fn host_info(t: &Template, i: usize, vms_per_host: usize, beat: u64) -> HostInfo {
    let group = i / GROUP;
    let datastores_in_group = 2 + group % 3;
    let mut datastores: Vec<DatastoreInfo> = (0..datastores_in_group)
        .map(|d| DatastoreInfo {
            name: format!("ds-{group:03}-{d}"),
            path: PathBuf::from(format!("/vmfs/volumes/ds-{group:03}-{d}")),
            id: format!("00000000-0000-4000-8000-{group:06}{d:06}"),
            free_bytes: 8 * 1024 * GIB - (group as u64 % 7) * 100 * GIB,
            total_bytes: 16 * 1024 * GIB,
            lockspace: Some(format!("ds-{group:03}-{d}")),
        })
        .collect();
    datastores.push(DatastoreInfo {
        name: "shared".into(),
        path: PathBuf::from("/vmfs/volumes/shared"),
        id: "00000000-0000-4000-8000-ffffffffffff".into(),
        free_bytes: 100 * 1024 * GIB,
        total_bytes: 200 * 1024 * GIB,
        lockspace: Some("shared".into()),
    });
    let vms: Vec<VmSummary> = (0..vms_per_host)
        .map(|k| VmSummary {
            name: vm_name(i, k),
            state: VmState::Running,
            memory_mib: 2048 << (k % 4),
            vcpus: 2 << (k % 3),
            datastore: datastores[k % datastores.len()].name.clone(),
            pid: Some(10_000 + k as u32),
            cpuid_generation: Some(1),
        })
        .collect();
    let total_bytes = (512 + 256 * (i % 3) as u64) * GIB;
    let used: u64 = vms.iter().map(|v| v.memory_mib << 20).sum();
    // A few hundred MiB of jitter between heartbeats, as page cache and ballooning move.
    let jitter = ((i as u64 * 7919 + beat * 104_729) % 512) << 20;
    let available = total_bytes.saturating_sub(used).saturating_sub(16 * GIB + jitter);
    HostInfo {
        api_version: ferry_host_api::API_VERSION,
        name: host_name(i),
        ferry_version: env!("CARGO_PKG_VERSION").to_string(),
        migration_protocols: vec![ferry_migration::protocol::PROTOCOL_VERSION],
        cpu: t.cpu(i),
        memory: MemoryInfo {
            total_bytes,
            available_bytes: available,
            reserved_bytes: used,
            vm_limit_bytes: None,
            free_for_vms_bytes: Some(available),
        },
        datastores,
        portgroups: ["vm-network", "vmotion", &format!("vlan-{}", 100 + group % 10)]
            .iter()
            .map(|p| PortGroupInfo { name: p.to_string(), bridge: format!("br-{p}"), present: true })
            .collect(),
        vms,
    }
}

/// The heartbeat body of host `i`.
fn heartbeat(t: &Template, i: usize, vms_per_host: usize, beat: u64, join: bool) -> Heartbeat {
    Heartbeat {
        api_url: format!("https://10.{}.{}.{}:7443", 1 + i / 65536, (i / 256) % 256, i % 256),
        maintenance: false,
        join,
        info: host_info(t, i, vms_per_host, beat),
    }
}

// ---------------------------------------------------------------------------------------
// Measuring

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system CPU of process `pid` (and its threads), seconds.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|l| parse_stat(&l))
        .map_or(0.0, |s| s.ticks as f64 / ticks_per_second())
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A PostgreSQL database made for one run, dropped by [`Database::drop_it`].
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    async fn create(admin_url: &str, tag: &str) -> anyhow::Result<Database> {
        sqlx::any::install_default_drivers();
        let name = format!("ferry_bench_{}_{tag}", std::process::id());
        let admin = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {admin_url}"))?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        admin.close().await;
        let url = ferry_cluster::store::with_database(admin_url, &name);
        Ok(Database { admin_url: admin_url.to_string(), name, url })
    }

    async fn drop_it(self) {
        if let Ok(admin) = AnyPoolOptions::new().max_connections(1).connect(&self.admin_url).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .execute(&admin)
                .await;
            admin.close().await;
        }
    }

    /// CPU seconds of the server's backends serving this database (the pids connected now,
    /// read from `/proc`: the server runs on this machine).
    async fn backend_pids(&self) -> Vec<u32> {
        let Ok(admin) = AnyPoolOptions::new().max_connections(1).connect(&self.admin_url).await else {
            return Vec::new();
        };
        let rows = sqlx::query("SELECT pid::BIGINT AS pid FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.name)
            .fetch_all(&admin)
            .await
            .unwrap_or_default();
        admin.close().await;
        rows.iter().filter_map(|r| r.try_get::<i64, _>("pid").ok()).map(|p| p as u32).collect()
    }
}

/// CPU of a set of processes between two readings.
struct CpuWatch {
    start: BTreeMap<u32, f64>,
}

impl CpuWatch {
    fn start(pids: &[u32]) -> CpuWatch {
        CpuWatch { start: pids.iter().map(|p| (*p, cpu_seconds(*p))).collect() }
    }

    /// CPU seconds used since [`CpuWatch::start`] by those and by `more` (new since).
    fn seconds(&self, more: &[u32]) -> f64 {
        let mut pids: Vec<u32> = self.start.keys().copied().collect();
        pids.extend(more.iter().filter(|p| !self.start.contains_key(p)));
        pids.iter().map(|p| (cpu_seconds(*p) - self.start.get(p).copied().unwrap_or(0.0)).max(0.0)).sum()
    }
}

// ---------------------------------------------------------------------------------------
// Part 1: the simulator

/// One simulator run's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimRun {
    /// The join pass (each host's first heartbeat), seconds.
    pub join_pass_s: f64,
    /// Steady heartbeats (an unchanged inventory but the free memory): median, ms.
    pub heartbeat_p50_ms: f64,
    /// p99, ms.
    pub heartbeat_p99_ms: f64,
    /// The steady pass's CPU (this process, plus PostgreSQL's backends), seconds.
    pub heartbeat_pass_cpu_s: f64,
    /// That CPU over the 2 s in which 2,500 hosts send it: the fraction of one core.
    pub heartbeat_cpu_fraction: f64,
    /// `Store::vms(None)`, ms.
    pub list_store_ms: f64,
    /// `GET /vms` through the router, to the last byte of its JSON, ms.
    pub list_http_ms: f64,
    /// The JSON's size, bytes.
    pub list_http_bytes: usize,
    /// VMs listed.
    pub vms_listed: usize,
    /// `Store::hosts()` (every host's row with its inventory: what a check against every
    /// host or a placement reads first), median of `--samples`, ms: the store's cache of
    /// decoded inventories is warm, as in an active controller whose heartbeats refill it.
    pub hosts_load_ms: f64,
    /// The same from a store just opened (nothing decoded yet: a controller's first check
    /// after it starts or takes over), median of 3, ms.
    pub hosts_load_cold_ms: f64,
    /// The check of one VM against every host: p50, ms (absent: not in this controller).
    pub check_p50_ms: Option<f64>,
    /// p99, ms.
    pub check_p99_ms: Option<f64>,
    /// Hosts that passed the check (of those checked).
    pub check_compatible: Option<usize>,
    /// Placement decision: p50, ms.
    pub placement_p50_ms: Option<f64>,
    /// p99, ms.
    pub placement_p99_ms: Option<f64>,
    /// `rank` alone (hosts already read), p50, ms.
    pub rank_p50_ms: Option<f64>,
    /// This process's VmRSS after the run, KiB (the simulator's inventories included).
    pub process_rss_kib: u64,
}

/// The simulator's figures of one back end.
#[derive(Debug, Serialize)]
pub struct SimReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Hosts.
    pub hosts: usize,
    /// VMs.
    pub vms: usize,
    /// Each run.
    pub runs: Vec<SimRun>,
    /// Medians (and spread) over runs, by figure.
    pub summary: BTreeMap<String, Summary>,
    /// What could not be measured, in words.
    pub notes: Vec<String>,
}

/// A controller on `store` with a throwaway identity, and its router.
pub struct Sim {
    /// The shared controller state.
    pub controller: ferry_cluster::server::Shared,
    router: axum::Router,
}

impl Sim {
    /// A controller named `controller` on `store`, active (it takes the leader lease in the
    /// store, as a real one does, before it answers); `identity` holds a host-kind identity
    /// (the controller's client of the host daemons, unused here).
    pub async fn new(store: ferry_cluster::store::Store, identity: &Path) -> anyhow::Result<Sim> {
        let client = ferry_pki::Client::new(identity).context("the simulated controller's identity")?;
        let leader = ferry_cluster::leader::Leader::new(
            "controller",
            "https://127.0.0.1:1",
            ferry_cluster::leader::Timing::default(),
        );
        tokio::spawn(leader.clone().run(store.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !leader.is_active() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the simulated controller never took the leader lease"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let controller = Arc::new(ferry_cluster::server::Controller {
            name: "controller".into(),
            store,
            client,
            leader,
            limits: ferry_cluster::queue::Limits::default(),
            dispatch: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            placing: ferry_cluster::placement::Pending::default(),
        });
        let router = ferry_cluster::server::router(controller.clone());
        Ok(Sim { controller, router })
    }

    /// Sends `body` as host `host`'s `POST /heartbeat` through the router, with the identity
    /// and peer address the TLS server attaches; the status and the answer.
    pub async fn heartbeat(&self, host: &str, body: bytes_body::Bytes) -> (u16, Vec<u8>) {
        let peer = ferry_pki::PeerIdentity { name: host.to_string(), kind: ferry_pki::Kind::Host };
        self.call(axum::http::Method::POST, paths::HEARTBEAT, body, Some(peer)).await
    }

    /// `GET path` through the router as a client.
    pub async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let peer = ferry_pki::PeerIdentity { name: "bench".into(), kind: ferry_pki::Kind::Client };
        self.call(axum::http::Method::GET, path, bytes_body::Bytes::new(), Some(peer)).await
    }

    async fn call(
        &self,
        method: axum::http::Method,
        path: &str,
        body: bytes_body::Bytes,
        peer: Option<ferry_pki::PeerIdentity>,
    ) -> (u16, Vec<u8>) {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap_or_default();
        if let Some(p) = peer {
            request.extensions_mut().insert(p);
        }
        let addr: SocketAddr = SocketAddr::from(([10, 0, 0, 1], 40000));
        request.extensions_mut().insert(axum::extract::ConnectInfo(addr));
        let mut router = self.router.clone();
        let response = match tower_service::Service::call(&mut router, request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap_or_default();
        (status, bytes.to_vec())
    }
}

/// Bytes for request bodies.
mod bytes_body {
    pub use axum::body::Bytes;
}

/// The host-kind identity the simulated controller and the real one use, and the CA, made
/// once in `dir`.
struct Pki {
    ca: PathBuf,
    controller: PathBuf,
    client: PathBuf,
    dir: PathBuf,
}

impl Pki {
    fn make(dir: &Path) -> anyhow::Result<Pki> {
        let ca = dir.join("ca");
        ferry_pki::init_ca(&ca).context("cannot make the throwaway CA")?;
        let controller = dir.join("controller");
        ferry_pki::issue_host(&ca, "controller", &["127.0.0.1".to_string()], &controller)
            .context("cannot issue the controller's identity")?;
        let client = dir.join("client");
        ferry_pki::issue_client(&ca, "bench", &client).context("cannot issue the client identity")?;
        Ok(Pki { ca, controller, client, dir: dir.to_path_buf() })
    }

    /// Host `i`'s identity directory (issued on first use).
    fn host(&self, i: usize) -> anyhow::Result<PathBuf> {
        let out = self.dir.join("hosts").join(host_name(i));
        if !out.join("cert.pem").exists() {
            ferry_pki::issue_host(&self.ca, &host_name(i), &[], &out)
                .with_context(|| format!("cannot issue host {}'s identity", host_name(i)))?;
        }
        Ok(out)
    }
}

/// The check of one VM against every host and the placement decision, as the controller
/// makes them ([`ferry_cluster::precheck`], [`ferry_cluster::placement::rank`]).
pub mod decide {
    use super::*;
    use ferry_cluster::precheck::{precheck, VmFacts};

    /// What was timed, ms per sample.
    pub struct Timed {
        /// The check: the store's hosts and reservations read, the facts, every host
        /// prechecked.
        pub check: Vec<f64>,
        /// Hosts that passed (the last check).
        pub compatible: usize,
        /// The placement decision: the same reads, then `rank` over every host.
        pub placement: Vec<f64>,
        /// `rank` alone over hosts already read.
        pub rank_only: Vec<f64>,
    }

    /// The facts of `vm` from the stored inventory (the controller asks the source daemon
    /// for the VM's port groups and hidden features; the simulator gives `vm-network`, none).
    async fn facts(sim: &Sim, hosts: &[ferry_cluster::store::HostRow], vm: &str) -> anyhow::Result<VmFacts> {
        let source = hosts
            .iter()
            .find(|h| h.info.vms.iter().any(|v| v.name == vm))
            .with_context(|| format!("no host reports {vm}"))?;
        let baseline = sim.controller.store.evc_baseline().await?.map(|b| b.features);
        VmFacts::from_source(vm, &source.info, vec!["vm-network".into()], &[], baseline.as_deref())
            .with_context(|| format!("{vm} has no facts"))
    }

    async fn held(sim: &Sim) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut r = sim.controller.store.reserved_by_destination(ferry_cluster::store::unix_ms()).await?;
        for (host, bytes) in sim.controller.placing.by_host() {
            *r.entry(host).or_insert(0) += bytes;
        }
        Ok(r)
    }

    /// Times `samples` checks of VM `vm` against every host and as many placements.
    pub async fn time(sim: &Sim, vm: &str, samples: usize) -> anyhow::Result<Timed> {
        let mut out =
            Timed { check: Vec::new(), compatible: 0, placement: Vec::new(), rank_only: Vec::new() };
        for _ in 0..samples {
            let t0 = Instant::now();
            let hosts = sim.controller.store.hosts().await?;
            let reserved = held(sim).await?;
            let f = facts(sim, &hosts, vm).await?;
            let mut compatible = 0;
            for h in hosts.iter().filter(|h| f.source.as_deref() != Some(h.name.as_str())) {
                if precheck(&f, h, reserved.get(&h.name).copied().unwrap_or(0)).is_ok() {
                    compatible += 1;
                }
            }
            out.check.push(ms(t0.elapsed()));
            out.compatible = compatible;

            let t0 = Instant::now();
            let hosts = sim.controller.store.hosts().await?;
            let reserved = held(sim).await?;
            let f = facts(sim, &hosts, vm).await?;
            let t1 = Instant::now();
            let ranking = ferry_cluster::placement::rank(&f, &hosts, &reserved);
            out.rank_only.push(ms(t1.elapsed()));
            out.placement.push(ms(t0.elapsed()));
            if ranking.first().and_then(|h| h.rank) != Some(1) {
                bail!("placement found no host for {vm}");
            }
        }
        Ok(out)
    }
}

async fn sim_run(
    args: &ClusterArgs,
    t: &Template,
    pki: &Pki,
    url: &str,
    pg: Option<&Database>,
    progress: &str,
) -> anyhow::Result<SimRun> {
    let store = ferry_cluster::store::Store::open(url).await.context("cannot open the store")?;
    let sim = Sim::new(store, &pki.controller).await?;
    let mut run = SimRun::default();
    // The join pass.
    let bodies: Vec<bytes_body::Bytes> = (0..args.hosts)
        .map(|i| serde_json::to_vec(&heartbeat(t, i, args.vms_per_host, 0, true)).map(Into::into))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    for (i, body) in bodies.into_iter().enumerate() {
        let (status, answer) = sim.heartbeat(&host_name(i), body).await;
        if status != 200 {
            bail!(
                "host {}'s join was refused ({status}): {}",
                host_name(i),
                String::from_utf8_lossy(&answer)
            );
        }
        if i % 500 == 499 {
            eprintln!("{progress}: {} hosts joined", i + 1);
        }
    }
    run.join_pass_s = started.elapsed().as_secs_f64();
    // A steady pass: every host again, its free memory changed.
    let bodies: Vec<bytes_body::Bytes> = (0..args.hosts)
        .map(|i| serde_json::to_vec(&heartbeat(t, i, args.vms_per_host, 1, false)).map(Into::into))
        .collect::<Result<_, _>>()?;
    let pids_before = match pg {
        Some(db) => db.backend_pids().await,
        None => Vec::new(),
    };
    let mut pids = pids_before.clone();
    pids.push(std::process::id());
    let cpu = CpuWatch::start(&pids);
    let mut lat = Vec::with_capacity(args.hosts);
    for (i, body) in bodies.into_iter().enumerate() {
        let t0 = Instant::now();
        let (status, answer) = sim.heartbeat(&host_name(i), body).await;
        lat.push(ms(t0.elapsed()));
        if status != 200 {
            bail!(
                "host {}'s heartbeat was refused ({status}): {}",
                host_name(i),
                String::from_utf8_lossy(&answer)
            );
        }
    }
    let pids_after = match pg {
        Some(db) => db.backend_pids().await,
        None => Vec::new(),
    };
    run.heartbeat_pass_cpu_s = cpu.seconds(&pids_after);
    run.heartbeat_cpu_fraction = run.heartbeat_pass_cpu_s / (INTERVAL_MS as f64 / 1000.0);
    run.heartbeat_p50_ms = percentile(&lat, 50.0);
    run.heartbeat_p99_ms = percentile(&lat, 99.0);
    eprintln!(
        "{progress}: steady heartbeats p50 {:.2} ms, p99 {:.2} ms",
        run.heartbeat_p50_ms, run.heartbeat_p99_ms
    );
    // Listing, median of 5 each.
    let mut store_ms = Vec::new();
    let mut http_ms = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let listed = sim.controller.store.vms(None, ferry_cluster::store::unix_ms()).await?;
        store_ms.push(ms(t0.elapsed()));
        run.vms_listed = listed.len();
        drop(listed);
        let t0 = Instant::now();
        let (status, body) = sim.get(paths::VMS).await;
        http_ms.push(ms(t0.elapsed()));
        if status != 200 {
            bail!("GET /vms answered {status}: {}", String::from_utf8_lossy(&body));
        }
        run.list_http_bytes = body.len();
        let vms: ferry_cluster_api::VmList =
            serde_json::from_slice(&body).context("GET /vms answered no VM list")?;
        if vms.vms.len() != args.hosts * args.vms_per_host {
            bail!("GET /vms listed {} VMs, {} expected", vms.vms.len(), args.hosts * args.vms_per_host);
        }
    }
    run.list_store_ms = percentile(&store_ms, 50.0);
    run.list_http_ms = percentile(&http_ms, 50.0);
    eprintln!("{progress}: list store {store_ms:.0?} ms, GET /vms {http_ms:.0?} ms");
    let mut loads = Vec::new();
    for _ in 0..args.samples.min(20) {
        let t0 = Instant::now();
        let hosts = sim.controller.store.hosts().await?;
        loads.push(ms(t0.elapsed()));
        if hosts.len() != args.hosts {
            bail!("the store has {} hosts, {} expected", hosts.len(), args.hosts);
        }
    }
    run.hosts_load_ms = percentile(&loads, 50.0);
    let mut cold = Vec::new();
    for _ in 0..3 {
        let fresh = ferry_cluster::store::Store::open(url).await.context("cannot open the store again")?;
        let t0 = Instant::now();
        let hosts = fresh.hosts().await?;
        cold.push(ms(t0.elapsed()));
        fresh.close().await;
        if hosts.len() != args.hosts {
            bail!("the store has {} hosts, {} expected", hosts.len(), args.hosts);
        }
    }
    run.hosts_load_cold_ms = percentile(&cold, 50.0);
    eprintln!("{progress}: Store::hosts warm {loads:.1?} ms, cold {cold:.1?} ms");
    // Check and placement of a VM of the last host, powered on under the baseline.
    // Its VM on the datastore every host sees, so that every host is a candidate.
    let last = args.hosts - 1;
    let shared = (2 + (last / GROUP) % 3) % args.vms_per_host.max(1);
    let vm = vm_name(last, shared);
    let timed = decide::time(&sim, &vm, args.samples).await?;
    run.check_p50_ms = Some(percentile(&timed.check, 50.0));
    run.check_p99_ms = Some(percentile(&timed.check, 99.0));
    run.check_compatible = Some(timed.compatible);
    run.placement_p50_ms = Some(percentile(&timed.placement, 50.0));
    run.placement_p99_ms = Some(percentile(&timed.placement, 99.0));
    run.rank_p50_ms = Some(percentile(&timed.rank_only, 50.0));
    eprintln!(
        "{progress}: check p50 {:.1} ms p99 {:.1} ms ({} compatible), placement p50 {:.1} ms p99 {:.1} ms (rank alone {:.1} ms)",
        percentile(&timed.check, 50.0),
        percentile(&timed.check, 99.0),
        timed.compatible,
        percentile(&timed.placement, 50.0),
        percentile(&timed.placement, 99.0),
        percentile(&timed.rank_only, 50.0)
    );
    run.process_rss_kib = status_kib(std::process::id(), "VmRSS").unwrap_or(0);
    sim.controller.store.close().await;
    Ok(run)
}

/// A figure's name and how to read it from a run.
type Figure<T> = (&'static str, fn(&T) -> Option<f64>);

fn summarize<T>(runs: &[T], figures: &[Figure<T>]) -> BTreeMap<String, Summary> {
    let mut out = BTreeMap::new();
    for (name, get) in figures {
        let values: Vec<f64> = runs.iter().filter_map(get).collect();
        if !values.is_empty() {
            out.insert(name.to_string(), Summary::of(&values));
        }
    }
    out
}

type SimFigure = Figure<SimRun>;

const SIM_FIGURES: &[SimFigure] = &[
    ("join_pass_s", |r| Some(r.join_pass_s)),
    ("heartbeat_p50_ms", |r| Some(r.heartbeat_p50_ms)),
    ("heartbeat_p99_ms", |r| Some(r.heartbeat_p99_ms)),
    ("heartbeat_pass_cpu_s", |r| Some(r.heartbeat_pass_cpu_s)),
    ("heartbeat_cpu_fraction", |r| Some(r.heartbeat_cpu_fraction)),
    ("list_store_ms", |r| Some(r.list_store_ms)),
    ("list_http_ms", |r| Some(r.list_http_ms)),
    ("hosts_load_ms", |r| Some(r.hosts_load_ms)),
    ("hosts_load_cold_ms", |r| Some(r.hosts_load_cold_ms)),
    ("check_p50_ms", |r| r.check_p50_ms),
    ("check_p99_ms", |r| r.check_p99_ms),
    ("placement_p50_ms", |r| r.placement_p50_ms),
    ("placement_p99_ms", |r| r.placement_p99_ms),
    ("rank_p50_ms", |r| r.rank_p50_ms),
    ("process_rss_mib", |r| Some(r.process_rss_kib as f64 / 1024.0)),
];

/// Runs the simulator on one back end (`admin_url`: the PostgreSQL server, for postgres).
pub async fn simulate(
    args: &ClusterArgs,
    t: &Template,
    work: &Path,
    backend: &str,
    admin_url: Option<&str>,
) -> anyhow::Result<SimReport> {
    let pki = Pki::make(&work.join(format!("sim-{backend}")))?;
    let mut runs = Vec::new();
    for r in 0..args.runs {
        let progress = format!("simulator {backend} run {}/{}", r + 1, args.runs);
        let run = match admin_url {
            None => {
                let file = work.join(format!("sim-{r}.db"));
                let result =
                    sim_run(args, t, &pki, &format!("sqlite://{}", file.display()), None, &progress).await;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
                }
                result?
            }
            Some(admin) => {
                let db = Database::create(admin, &format!("sim{r}")).await?;
                let result = sim_run(args, t, &pki, &db.url, Some(&db), &progress).await;
                db.drop_it().await;
                result?
            }
        };
        runs.push(run);
    }
    let notes =
        vec!["check and placement: the controller's precheck and rank over the stored inventory; the \
         VM's port groups and hidden features, which the controller asks the source daemon for, \
         are given (vm-network, none), and the source daemon's real check of the chosen host is \
         not part of it"
            .to_string()];
    Ok(SimReport {
        backend: backend.to_string(),
        hosts: args.hosts,
        vms: args.hosts * args.vms_per_host,
        summary: summarize(&runs, SIM_FIGURES),
        runs,
        notes,
    })
}

// ---------------------------------------------------------------------------------------
// Part 2: real agents over TLS

/// One agents run's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentRun {
    /// Agents that sent heartbeats.
    pub agents: usize,
    /// Heartbeats taken in the window.
    pub heartbeats: usize,
    /// Heartbeats that failed in the window.
    pub failed: usize,
    /// Heartbeat latency seen by the agents (connect, TLS handshake, request, answer): p50, ms.
    pub latency_p50_ms: f64,
    /// p99, ms.
    pub latency_p99_ms: f64,
    /// The controller's CPU over the window: the fraction of one core.
    pub controller_cpu_fraction: f64,
    /// PostgreSQL's backends of the controller's database over the window (postgres only).
    pub postgres_cpu_fraction: Option<f64>,
    /// The controller's VmRSS at the end of the window, MiB.
    pub controller_rss_mib: f64,
    /// Hosts whose inventory was then sent once each (so the store holds every host).
    pub fed_hosts: usize,
    /// Of those, heartbeats refused or failed.
    pub feed_failed: usize,
    /// Seconds to send them (8 at a time).
    pub feed_s: f64,
    /// The controller's VmRSS after that, MiB.
    pub controller_rss_full_mib: f64,
    /// `GET /vms` over HTTPS with every VM (median of 3), ms.
    pub list_https_ms: f64,
    /// VMs it listed.
    pub vms_listed: usize,
    /// The controller's peak RSS (VmHWM) at the end, MiB.
    pub controller_peak_rss_mib: f64,
}

/// The agents part's figures of one back end.
#[derive(Debug, Serialize)]
pub struct AgentReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The ferry binary that served.
    pub ferry: String,
    /// Each run.
    pub runs: Vec<AgentRun>,
    /// Medians over runs.
    pub summary: BTreeMap<String, Summary>,
}

type AgentFigure = Figure<AgentRun>;

const AGENT_FIGURES: &[AgentFigure] = &[
    ("heartbeats_failed", |r| Some(r.failed as f64)),
    ("feed_failed", |r| Some(r.feed_failed as f64)),
    ("latency_p50_ms", |r| Some(r.latency_p50_ms)),
    ("latency_p99_ms", |r| Some(r.latency_p99_ms)),
    ("controller_cpu_fraction", |r| Some(r.controller_cpu_fraction)),
    ("postgres_cpu_fraction", |r| r.postgres_cpu_fraction),
    ("controller_rss_mib", |r| Some(r.controller_rss_mib)),
    ("feed_s", |r| Some(r.feed_s)),
    ("controller_rss_full_mib", |r| Some(r.controller_rss_full_mib)),
    ("list_https_ms", |r| Some(r.list_https_ms)),
    ("controller_peak_rss_mib", |r| Some(r.controller_peak_rss_mib)),
];

/// A `ferry cluster serve` process, SIGTERMed (then SIGKILLed) on drop.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

async fn serve(ferry: &Path, pki: &Pki, dir: &Path, database: &str) -> anyhow::Result<Served> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let config = dir.join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"controller\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nidentity_dir = \"{}\"\ndatabase = \"{database}\"\n",
            dir.join("state").display(),
            pki.controller.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let child = Command::new(ferry)
        .args(["--log-level", "warn", "cluster", "serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", ferry.display()))?;
    let served = Served { child, url: format!("https://127.0.0.1:{port}") };
    let client =
        ferry_pki::Client::new(&pki.client)?.with_timeouts(Duration::from_secs(2), Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(&format!("{}{}", served.url, paths::HOSTS)).await {
            if r.is_success() {
                return Ok(served);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the controller did not answer within 30 s (its log: {})",
                dir.join("controller.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One agent's heartbeats until `stop`: latencies (ms) of those sent after `window_from`,
/// and failures then.
async fn agent(
    client: ferry_pki::Client,
    url: String,
    bodies: [serde_json::Value; 2],
    phase: Duration,
    window_from: Instant,
    stop: Arc<AtomicBool>,
) -> (Vec<f64>, usize, Option<String>) {
    let mut lat = Vec::new();
    let mut failed = 0;
    let mut last_error = None;
    let mut next = tokio::time::Instant::now() + phase;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next).await;
        next += Duration::from_millis(INTERVAL_MS);
        let t0 = Instant::now();
        let body = if first { &bodies[0] } else { &bodies[1] };
        let result = client.post(&url, body).await;
        let ok = matches!(&result, Ok(r) if r.is_success());
        if !ok {
            last_error = Some(match result {
                Ok(r) => format!("{}: {}", r.status, String::from_utf8_lossy(&r.body)),
                Err(e) => e.to_string(),
            });
        }
        first &= !ok;
        if t0 >= window_from && !stop.load(Ordering::Relaxed) {
            if ok {
                lat.push(ms(t0.elapsed()));
            } else {
                failed += 1;
            }
        }
    }
    (lat, failed, last_error)
}

async fn agents_run(
    args: &ClusterArgs,
    t: &Template,
    ferry: &Path,
    pki: &Pki,
    dir: &Path,
    (database, pg): (&str, Option<&Database>),
    progress: &str,
) -> anyhow::Result<AgentRun> {
    let served = serve(ferry, pki, dir, database).await?;
    let pid = served.child.id();
    let heartbeat_url = format!("{}{}", served.url, paths::HEARTBEAT);
    let n = args.agents.min(args.hosts);
    let stop = Arc::new(AtomicBool::new(false));
    // Every agent joins within the first interval; the window starts two intervals later.
    let warmup = Duration::from_millis(3 * INTERVAL_MS);
    let window_from = Instant::now() + warmup;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = ferry_pki::Client::new(&pki.host(i)?)?
            .with_timeouts(Duration::from_secs(2), Duration::from_secs(5));
        let bodies = [
            serde_json::to_value(heartbeat(t, i, args.vms_per_host, 0, true))?,
            serde_json::to_value(heartbeat(t, i, args.vms_per_host, 1, false))?,
        ];
        let phase = Duration::from_micros(i as u64 * INTERVAL_MS * 1000 / n as u64);
        tasks.spawn(agent(client, heartbeat_url.clone(), bodies, phase, window_from, stop.clone()));
    }
    eprintln!("{progress}: {n} agents started; measuring for {} s", args.agent_seconds);
    tokio::time::sleep_until(tokio::time::Instant::from_std(window_from)).await;
    let pg_pids = match pg {
        Some(db) => db.backend_pids().await,
        None => Vec::new(),
    };
    let controller_cpu = CpuWatch::start(&[pid]);
    let pg_cpu = CpuWatch::start(&pg_pids);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.agent_seconds)).await;
    let window = t0.elapsed().as_secs_f64();
    let mut run = AgentRun {
        agents: n,
        controller_cpu_fraction: controller_cpu.seconds(&[]) / window,
        controller_rss_mib: status_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0,
        ..AgentRun::default()
    };
    if let Some(db) = pg {
        run.postgres_cpu_fraction = Some(pg_cpu.seconds(&db.backend_pids().await) / window);
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut last_error = None;
    while let Some(joined) = tasks.join_next().await {
        let (l, failed, e) = joined?;
        lat.extend(l);
        run.failed += failed;
        last_error = last_error.or(e);
    }
    run.heartbeats = lat.len();
    if lat.is_empty() {
        bail!("no heartbeat was taken in the window (last error: {})", last_error.unwrap_or_default());
    }
    if let Some(e) = &last_error {
        eprintln!("{progress}: note: {} heartbeats failed; the last error: {e}", run.failed);
    }
    run.latency_p50_ms = percentile(&lat, 50.0);
    run.latency_p99_ms = percentile(&lat, 99.0);
    eprintln!(
        "{progress}: {} heartbeats, p50 {:.1} ms, p99 {:.1} ms, controller {:.0}% of a core, {:.0} MiB",
        run.heartbeats,
        run.latency_p50_ms,
        run.latency_p99_ms,
        run.controller_cpu_fraction * 100.0,
        run.controller_rss_mib
    );
    // The other hosts' inventories, once each, 8 at a time.
    let t0 = Instant::now();
    let rest: Vec<usize> = (n..args.hosts).collect();
    for chunk in rest.chunks(8) {
        let mut sends = tokio::task::JoinSet::new();
        for &i in chunk {
            let client = ferry_pki::Client::new(&pki.host(i)?)?
                .with_timeouts(Duration::from_secs(5), Duration::from_secs(30));
            let body = serde_json::to_value(heartbeat(t, i, args.vms_per_host, 0, true))?;
            let url = heartbeat_url.clone();
            sends.spawn(async move { (i, client.post(&url, &body).await) });
        }
        while let Some(sent) = sends.join_next().await {
            let (i, answer) = sent?;
            match answer {
                Ok(r) if r.is_success() => {}
                Ok(r) => {
                    run.feed_failed += 1;
                    eprintln!(
                        "{progress}: host {}'s heartbeat refused: {} {}",
                        host_name(i),
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
                Err(e) => {
                    run.feed_failed += 1;
                    eprintln!("{progress}: host {}'s heartbeat failed: {e}", host_name(i));
                }
            }
        }
        if chunk[0] % 400 < 8 {
            eprintln!("{progress}: {} of {} hosts' inventories sent", chunk[chunk.len() - 1] + 1, args.hosts);
        }
    }
    run.fed_hosts = rest.len();
    run.feed_s = t0.elapsed().as_secs_f64();
    run.controller_rss_full_mib = status_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;
    let client =
        ferry_pki::Client::new(&pki.client)?.with_timeouts(Duration::from_secs(5), Duration::from_secs(60));
    let mut lists = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let answer = client.get(&format!("{}{}", served.url, paths::VMS)).await?.error_for_status()?;
        lists.push(ms(t0.elapsed()));
        let list: ferry_cluster_api::VmList = serde_json::from_slice(&answer.body)?;
        run.vms_listed = list.vms.len();
    }
    run.list_https_ms = percentile(&lists, 50.0);
    run.controller_peak_rss_mib = status_kib(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0;
    drop(served);
    Ok(run)
}

/// Runs the agents part on one back end.
pub async fn agents(
    args: &ClusterArgs,
    t: &Template,
    ferry: &Path,
    work: &Path,
    backend: &str,
    admin_url: Option<&str>,
) -> anyhow::Result<AgentReport> {
    let pki = Pki::make(&work.join("agents-pki")).or_else(|_| -> anyhow::Result<Pki> {
        // Made by an earlier back end: reuse it.
        let dir = work.join("agents-pki");
        Ok(Pki { ca: dir.join("ca"), controller: dir.join("controller"), client: dir.join("client"), dir })
    })?;
    let issued = Instant::now();
    for i in 0..args.hosts {
        pki.host(i)?;
    }
    eprintln!(
        "agents {backend}: {} host identities ready in {:.1} s",
        args.hosts,
        issued.elapsed().as_secs_f64()
    );
    let mut runs = Vec::new();
    for r in 0..args.runs {
        let progress = format!("agents {backend} run {}/{}", r + 1, args.runs);
        let dir = work.join(format!("agents-{backend}-{r}"));
        let run = match admin_url {
            None => {
                let db = format!("sqlite://{}", dir.join("cluster.db").display());
                agents_run(args, t, ferry, &pki, &dir, (&db, None), &progress).await
            }
            Some(admin) => {
                let db = Database::create(admin, &format!("agents{r}")).await?;
                let result = agents_run(args, t, ferry, &pki, &dir, (&db.url, Some(&db)), &progress).await;
                db.drop_it().await;
                result
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        runs.push(run?);
    }
    Ok(AgentReport {
        backend: backend.to_string(),
        ferry: ferry.display().to_string(),
        summary: summarize(&runs, AGENT_FIGURES),
        runs,
    })
}

// ---------------------------------------------------------------------------------------
// The command

/// Everything measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Hosts and VMs per host.
    pub hosts: usize,
    /// VMs per host.
    pub vms_per_host: usize,
    /// The simulator, by back end.
    pub simulator: Vec<SimReport>,
    /// The agents part, by back end.
    pub agents: Vec<AgentReport>,
    /// The targets and whether they were met (by the medians).
    pub targets: Vec<Target>,
}

/// A target of the issue.
#[derive(Debug, Serialize)]
pub struct Target {
    /// What.
    pub what: String,
    /// The back end.
    pub backend: String,
    /// Measured.
    pub measured: f64,
    /// The limit.
    pub limit: f64,
    /// The unit.
    pub unit: String,
    /// Met.
    pub met: bool,
}

fn targets(report: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    let mut push = |what: &str, backend: &str, measured: Option<f64>, limit: f64, unit: &str| {
        if let Some(m) = measured {
            out.push(Target {
                what: what.into(),
                backend: backend.into(),
                measured: m,
                limit,
                unit: unit.into(),
                met: m < limit,
            });
        }
    };
    let median = |s: &BTreeMap<String, Summary>, k: &str| s.get(k).map(|v| v.median);
    for s in &report.simulator {
        push(
            "list every VM (GET /vms through the router)",
            &s.backend,
            median(&s.summary, "list_http_ms"),
            1000.0,
            "ms",
        );
        push(
            "check of one VM against every host, p99",
            &s.backend,
            median(&s.summary, "check_p99_ms"),
            100.0,
            "ms",
        );
        push("placement decision, p99", &s.backend, median(&s.summary, "placement_p99_ms"), 50.0, "ms");
    }
    for a in &report.agents {
        push("list every VM over HTTPS", &a.backend, median(&a.summary, "list_https_ms"), 1000.0, "ms");
        push("controller peak RSS", &a.backend, median(&a.summary, "controller_peak_rss_mib"), 1024.0, "MiB");
    }
    out
}

fn print(report: &Report) {
    let fig = |s: &BTreeMap<String, Summary>, k: &str| {
        s.get(k).map_or("-".to_string(), |v| format!("{:.2} ({:.2}-{:.2})", v.median, v.min, v.max))
    };
    for s in &report.simulator {
        println!(
            "simulator, {}: {} hosts, {} VMs, {} runs (median (min-max))",
            s.backend,
            s.hosts,
            s.vms,
            s.runs.len()
        );
        for (label, key) in [
            ("join pass, s", "join_pass_s"),
            ("steady heartbeat p50, ms", "heartbeat_p50_ms"),
            ("steady heartbeat p99, ms", "heartbeat_p99_ms"),
            ("CPU of one pass (all hosts), s", "heartbeat_pass_cpu_s"),
            ("CPU at every host each 2 s, cores", "heartbeat_cpu_fraction"),
            ("list VMs, store call, ms", "list_store_ms"),
            ("list VMs, GET /vms JSON, ms", "list_http_ms"),
            ("Store::hosts() (all), cache warm, ms", "hosts_load_ms"),
            ("Store::hosts() (all), just opened, ms", "hosts_load_cold_ms"),
            ("check 1 VM x all hosts p50, ms", "check_p50_ms"),
            ("check 1 VM x all hosts p99, ms", "check_p99_ms"),
            ("placement p50, ms", "placement_p50_ms"),
            ("placement p99, ms", "placement_p99_ms"),
            ("rank() alone p50, ms", "rank_p50_ms"),
            ("bench process RSS, MiB", "process_rss_mib"),
        ] {
            println!("  {label:<36} {}", fig(&s.summary, key));
        }
        for n in &s.notes {
            println!("  note: {n}");
        }
    }
    for a in &report.agents {
        let agents = a.runs.first().map_or(0, |r| r.agents);
        println!(
            "agents over TLS, {}: {agents} agents every 2 s, {} runs, controller {}",
            a.backend,
            a.runs.len(),
            a.ferry
        );
        for (label, key) in [
            ("heartbeats failed in the window", "heartbeats_failed"),
            ("heartbeat latency p50, ms", "latency_p50_ms"),
            ("heartbeat latency p99, ms", "latency_p99_ms"),
            ("controller CPU, cores", "controller_cpu_fraction"),
            ("PostgreSQL backends CPU, cores", "postgres_cpu_fraction"),
            ("controller RSS, MiB", "controller_rss_mib"),
            ("other hosts sent once, s", "feed_s"),
            ("  of which refused or failed", "feed_failed"),
            ("controller RSS, every host, MiB", "controller_rss_full_mib"),
            ("GET /vms over HTTPS, every VM, ms", "list_https_ms"),
            ("controller peak RSS, MiB", "controller_peak_rss_mib"),
        ] {
            println!("  {label:<36} {}", fig(&a.summary, key));
        }
    }
    for t in &report.targets {
        println!(
            "target {} ({}): {:.1} {} against {} {}: {}",
            t.what,
            t.backend,
            t.measured,
            t.unit,
            t.limit,
            t.unit,
            if t.met { "met" } else { "MISSED" }
        );
    }
}

/// `ferry-bench cluster`.
pub fn run(ferry: &Path, args: &ClusterArgs, json: bool) -> anyhow::Result<()> {
    if args.hosts == 0 || args.runs == 0 || args.samples == 0 {
        bail!("--hosts, --runs and --samples must be at least 1");
    }
    let backends: Vec<&str> = match args.backend {
        Backends::Sqlite => vec!["sqlite"],
        Backends::Postgres => vec!["postgres"],
        Backends::Both => vec!["sqlite", "postgres"],
    };
    let admin =
        args.database.clone().or_else(|| std::env::var(POSTGRES_URL_ENV).ok().filter(|u| !u.is_empty()));
    if backends.contains(&"postgres") && admin.is_none() {
        bail!(
            "no PostgreSQL server: pass --database postgres://... or set {POSTGRES_URL_ENV} \
             (`scripts/postgres.sh start DIR` starts one; `scripts/bench.sh cluster` does it for you), \
             or run with --backend sqlite"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let work = std::env::temp_dir().join(format!("ferry-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = rt.block_on(async {
        let t = Template::probe();
        let mut report = Report {
            hosts: args.hosts,
            vms_per_host: args.vms_per_host,
            simulator: Vec::new(),
            agents: Vec::new(),
            targets: Vec::new(),
        };
        for backend in &backends {
            let url = if *backend == "postgres" { admin.as_deref() } else { None };
            if !args.no_simulator {
                report.simulator.push(simulate(args, &t, &work, backend, url).await?);
            }
            if !args.no_agents && args.agents > 0 {
                report.agents.push(agents(args, &t, ferry, &work, backend, url).await?);
            }
        }
        report.targets = targets(&report);
        anyhow::Ok(report)
    });
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulator at a small scale on SQLite: every host joins through the real
    /// heartbeat handler, every VM is listed, a second pass is taken.
    #[test]
    fn simulator_smoke_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("ferry-bench-cluster-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let args = ClusterArgs {
            hosts: 20,
            vms_per_host: 4,
            runs: 1,
            backend: Backends::Sqlite,
            database: None,
            samples: 3,
            agents: 0,
            agent_seconds: 1,
            no_agents: true,
            no_simulator: false,
        };
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        let t = Template::probe();
        let report = rt.block_on(simulate(&args, &t, &dir, "sqlite", None)).expect("simulator");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(report.vms, 80);
        assert_eq!(report.runs[0].vms_listed, 80);
        assert!(report.runs[0].list_http_bytes > 80 * 50);
        assert!(report.summary.contains_key("heartbeat_p99_ms"));
    }

    #[test]
    fn generations_nest() {
        let t = Template::probe();
        let features = |i| t.cpu(i).kvm.map(|k| k.features).unwrap_or_default();
        let (g0, g1, g2) = (features(0), features(1), features(2));
        assert!(g0.iter().all(|f| g1.contains(f)) && g1.iter().all(|f| g2.contains(f)));
        assert!(g0.len() < g2.len());
        assert_ne!(t.older[0], t.older[1]);
    }

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            ferry_cluster::store::with_database("postgres://p@127.0.0.1:5/postgres", "x"),
            "postgres://p@127.0.0.1:5/x"
        );
        assert_eq!(
            ferry_cluster::store::with_database("postgres://p@h:5/postgres?a=b", "y"),
            "postgres://p@h:5/y?a=b"
        );
    }
}
