//! Every store test runs on SQLite and on PostgreSQL (when `FERRY_TEST_POSTGRES_URL` names a
//! server; required with `FERRY_TEST_REQUIRE_POSTGRES=1`).

use std::future::Future;
use std::path::PathBuf;

use ferry_cluster_api::HostState;
use ferry_host_api::{
    CpuInfo, DatastoreInfo, HostInfo, MemoryInfo, MigrationOutcome, MigrationRecord, MigrationRole,
    PortGroupInfo, VmState, VmSummary,
};

use sqlx::Row;

use super::{Backend, MigrationFilter, Store};
use crate::testing::TestDatabase;

/// Runs `body` on a fresh SQLite store and on a fresh PostgreSQL store.
pub(super) fn on_both<F, Fut>(body: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!(
            "ferry-store-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let store = Store::open_sqlite(&dir.join("cluster.db")).await.expect("open sqlite");
        assert_eq!(store.backend(), Backend::Sqlite);
        body(store.clone()).await;
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(db) = TestDatabase::create().await {
            let store = Store::open(&db.url).await.expect("open postgres");
            assert_eq!(store.backend(), Backend::Postgres);
            body(store.clone()).await;
            store.close().await;
        }
    });
}

pub(crate) fn info(name: &str, ds_id: &str, vms: &[(&str, VmState)]) -> HostInfo {
    HostInfo {
        api_version: 1,
        name: name.into(),
        ferry_version: "0.1.0".into(),
        migration_protocols: vec![1],
        cpu: CpuInfo {
            vendor: "GenuineIntel".into(),
            model: "test cpu".into(),
            cpus: 2,
            kvm: None,
            kvm_model: None,
        },
        memory: MemoryInfo {
            total_bytes: 4 << 30,
            available_bytes: 3 << 30,
            reserved_bytes: 0,
            vm_limit_bytes: None,
            free_for_vms_bytes: None,
        },
        datastores: vec![DatastoreInfo {
            name: "shared".into(),
            path: PathBuf::from(format!("/srv/{name}/shared")),
            id: ds_id.into(),
            free_bytes: 100,
            total_bytes: 200,
            lockspace: None,
        }],
        portgroups: vec![PortGroupInfo { name: "lan".into(), bridge: "br0".into(), present: true }],
        vms: vms
            .iter()
            .map(|(n, s)| VmSummary {
                name: (*n).into(),
                state: *s,
                memory_mib: 64,
                vcpus: 1,
                datastore: "shared".into(),
                pid: None,
                cpuid_generation: None,
            })
            .collect(),
    }
}

#[test]
fn schema_is_versioned_and_reopens() {
    on_both(|store| async move {
        assert_eq!(store.version().await.expect("version"), super::schema::latest());
        // Migrating again is a no-op.
        store.migrate().await.expect("again");
        assert_eq!(store.version().await.expect("version"), super::schema::latest());
    });
}

#[test]
fn a_newer_schema_is_refused_with_both_versions() {
    on_both(|store| async move {
        sqlx::query("INSERT INTO schema_version (version, applied_unix_ms) VALUES (999, 0)")
            .execute(&store.pool)
            .await
            .expect("insert");
        let err = store.migrate().await.expect_err("must refuse");
        assert!(matches!(err, super::Error::TooNew { found: 999, .. }), "{err}");
        assert!(
            err.to_string().contains("999") && err.to_string().contains(&super::schema::latest().to_string())
        );
    });
}

#[test]
fn sqlite_is_in_wal_mode() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("ferry-store-wal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let store = Store::open_sqlite(&dir.join("c.db")).await.expect("open");
        let row = sqlx::query("PRAGMA journal_mode").fetch_one(&store.pool).await.expect("pragma");
        let mode: String = row.try_get(0).expect("mode");
        assert_eq!(mode, "wal");
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn heartbeats_build_the_inventory() {
    on_both(|store| async move {
        store
            .heartbeat(
                "a",
                "https://10.0.0.1:7443",
                false,
                &info("a", "ds-1", &[("web", VmState::Running)]),
                1000,
            )
            .await
            .expect("a");
        store
            .heartbeat(
                "b",
                "https://10.0.0.2:7443",
                true,
                &info("b", "ds-1", &[("db", VmState::Defined)]),
                1500,
            )
            .await
            .expect("b");
        let hosts = store.hosts().await.expect("hosts");
        assert_eq!(
            hosts.iter().map(|h| (h.name.as_str(), h.state)).collect::<Vec<_>>(),
            [("a", HostState::Connected), ("b", HostState::Maintenance)]
        );
        assert_eq!(hosts[0].joined_unix_ms, 1000);
        let ds = store.datastores().await.expect("datastores");
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].hosts.iter().map(|s| s.host.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let pg = store.portgroups().await.expect("portgroups");
        assert_eq!(pg.len(), 1);
        assert_eq!(pg[0].hosts.len(), 2);
        let vms = store.vms(None, 2000).await.expect("vms");
        assert_eq!(
            vms.iter().map(|v| (v.name.as_str(), v.host.as_str(), v.age_ms)).collect::<Vec<_>>(),
            [("db", "b", 500), ("web", "a", 1000)]
        );
        assert_eq!(store.vms(Some("web"), 2000).await.expect("web").len(), 1);
        assert!(store.vms(Some("nothing"), 2000).await.expect("none").is_empty());
        // A later heartbeat replaces the host's report (the VM moved away), keeps joined.
        store
            .heartbeat("a", "https://10.0.0.1:7443", false, &info("a", "ds-2", &[]), 3000)
            .await
            .expect("a again");
        let a = store.host("a").await.expect("host").expect("a exists");
        assert_eq!((a.joined_unix_ms, a.last_seen_unix_ms), (1000, 3000));
        assert!(store.vms(Some("web"), 3000).await.expect("web").is_empty());
        assert_eq!(store.datastores().await.expect("ds").len(), 2);
        assert!(store.host("nobody").await.expect("query").is_none());
    });
}

#[test]
fn silent_hosts_become_not_responding_and_keep_their_vms() {
    on_both(|store| async move {
        store
            .heartbeat("a", "u", false, &info("a", "d", &[("web", VmState::Running)]), 1000)
            .await
            .expect("a");
        store.heartbeat("b", "u", false, &info("b", "d", &[]), 5000).await.expect("b");
        store.heartbeat("c", "u", false, &info("c", "d", &[]), 1000).await.expect("c");
        assert!(store.set_host_state("c", HostState::Disconnected).await.expect("leave"));
        assert!(!store.set_host_state("zz", HostState::Disconnected).await.expect("nobody"));
        assert_eq!(store.mark_not_responding(4000).await.expect("mark"), ["a"]);
        // Already marked: not again.
        assert!(store.mark_not_responding(4000).await.expect("mark").is_empty());
        let vms = store.vms(None, 7000).await.expect("vms");
        assert_eq!(vms.len(), 1);
        assert_eq!(
            (vms[0].host_state, vms[0].state.as_str(), vms[0].age_ms),
            (HostState::NotResponding, "running", 6000)
        );
        // A heartbeat brings it back.
        store.heartbeat("a", "u", false, &info("a", "d", &[]), 8000).await.expect("a");
        assert_eq!(store.host("a").await.expect("a").expect("a").state, HostState::Connected);
    });
}

fn record(id: &str, outcome: MigrationOutcome, started: u64) -> MigrationRecord {
    MigrationRecord {
        id: id.into(),
        vm: "web".into(),
        source: "a".into(),
        destination: "b".into(),
        role: MigrationRole::Source,
        started_unix_ms: started,
        ended_unix_ms: (outcome != MigrationOutcome::Active).then_some(started + 10),
        outcome,
        reason_code: outcome.as_str().into(),
        reason: String::new(),
        downtime_ms: None,
        total_ms: None,
        orchestration_ms: None,
        bytes: None,
        passes: None,
        progress: None,
        reasons: Vec::new(),
        orchestration: None,
        queue_position: None,
    }
}

#[test]
fn migration_history_is_appended_and_filtered() {
    on_both(|store| async move {
        store.record_migration(&record("m1", MigrationOutcome::Active, 100), 100).await.expect("m1");
        store.record_migration(&record("m1", MigrationOutcome::Active, 100), 105).await.expect("same");
        store.record_migration(&record("m1", MigrationOutcome::Completed, 100), 110).await.expect("done");
        // An ended migration does not go back.
        store.record_migration(&record("m1", MigrationOutcome::Active, 100), 120).await.expect("late");
        store.record_migration(&record("m2", MigrationOutcome::Failed, 200), 210).await.expect("m2");
        let all = store.migrations(&MigrationFilter::default()).await.expect("all");
        assert_eq!(all.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m2", "m1"]);
        assert_eq!(all[1].outcome, MigrationOutcome::Completed);
        let failed = MigrationFilter { outcome: Some(MigrationOutcome::Failed), ..Default::default() };
        assert_eq!(store.migrations(&failed).await.expect("failed").len(), 1);
        let by_host = MigrationFilter { host: Some("b".into()), ..Default::default() };
        assert_eq!(store.migrations(&by_host).await.expect("host").len(), 2);
        let other = MigrationFilter { vm: Some("other".into()), ..Default::default() };
        assert!(store.migrations(&other).await.expect("vm").is_empty());
        let events = store.migration_events("m1").await.expect("events");
        assert_eq!(
            events.iter().map(|e| (e.seq, e.kind.as_str())).collect::<Vec<_>>(),
            [(1, "recorded"), (2, "completed")]
        );
    });
}

#[test]
fn unsupported_urls_are_refused() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let err = rt.block_on(Store::open("mysql://root:secret@db/x")).expect_err("refused");
    assert!(matches!(err, super::Error::Url(_)));
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[test]
fn evc_generations_vms_and_refusals() {
    on_both(|store| async move {
        assert_eq!(store.evc_baseline().await.expect("none"), None);
        let first = ferry_cluster_api::EvcBaseline {
            generation: 1,
            features: vec!["avx2".into(), "lahf_lm".into()],
            set_by: "first host a".into(),
            set_unix_ms: 10,
        };
        assert!(store.evc_put(&first).await.expect("put"));
        // A second first baseline (a race of two first heartbeats) is not recorded.
        let other = ferry_cluster_api::EvcBaseline { set_by: "first host b".into(), ..first.clone() };
        assert!(!store.evc_put(&other).await.expect("again"));
        let second = ferry_cluster_api::EvcBaseline {
            generation: 2,
            features: vec!["avx2".into()],
            set_by: "operator: -lahf_lm".into(),
            set_unix_ms: 20,
        };
        assert!(store.evc_put(&second).await.expect("second"));
        assert_eq!(store.evc_baseline().await.expect("current"), Some(second.clone()));
        assert_eq!(store.evc_generations().await.expect("all"), vec![first, second]);

        store.evc_note_vms("a", &[("v1".into(), 1), ("v2".into(), 2)], 30).await.expect("note");
        store.evc_note_vms("b", &[("v1".into(), 2)], 40).await.expect("note b");
        let gens = store.evc_vm_generations().await.expect("gens");
        assert_eq!(gens.get("v1"), Some(&2));
        assert_eq!(gens.get("v2"), Some(&2));
        // More VMs than one statement takes, one of them named twice.
        let many: Vec<(String, u64)> =
            (0..250).map(|i| (format!("m{i:03}"), 3)).chain([("m007".to_string(), 3)]).collect();
        store.evc_note_vms("c", &many, 45).await.expect("note many");
        let gens = store.evc_vm_generations().await.expect("gens");
        assert_eq!(gens.len(), 252);
        assert!((0..250).all(|i| gens.get(&format!("m{i:03}")) == Some(&3)));

        store.evc_refuse("c", &["avx2".into()], &["lahf_lm".into()], 50).await.expect("refuse");
        let refused = store.evc_refused().await.expect("refused");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].lacking, vec!["lahf_lm".to_string()]);
        store.evc_unrefuse("c").await.expect("unrefuse");
        assert!(store.evc_refused().await.expect("none").is_empty());
    });
}

#[test]
fn memory_reserved_by_migrations_to_each_host() {
    on_both(|store| async move {
        let a = info("a", "ds", &[("web", VmState::Running), ("db", VmState::Running)]);
        store.heartbeat("a", "https://127.0.0.1:1", false, &a, 1000).await.expect("a");
        store.heartbeat("b", "https://127.0.0.1:2", false, &info("b", "ds", &[]), 1000).await.expect("b");
        assert!(store.reserved_by_destination(10_000).await.expect("none").is_empty());
        // Active to b: web's 64 MiB.
        let mut m1 = record("m1", MigrationOutcome::Active, 2000);
        store.record_migration(&m1, 2000).await.expect("m1");
        let r = store.reserved_by_destination(10_000).await.expect("active");
        assert_eq!(r.get("b"), Some(&(64 << 20)));
        // Queued (another engineer's outcome), db to b: counted too.
        sqlx::query(
            "INSERT INTO migrations (id, vm, source, destination, started_unix_ms, ended_unix_ms, outcome, reason_code, record)
             VALUES ('m2', 'db', 'a', 'b', 2100, NULL, 'queued', 'queued', '{}')",
        )
        .execute(&store.pool)
        .await
        .expect("queued row");
        assert_eq!(store.reserved_by_destination(10_000).await.expect("queued").get("b"), Some(&(128 << 20)));
        // Completed after b's last report: still counted until b reports again.
        m1.outcome = MigrationOutcome::Completed;
        m1.ended_unix_ms = Some(5000);
        store.record_migration(&m1, 5000).await.expect("done");
        assert_eq!(store.reserved_by_destination(10_000).await.expect("done").get("b"), Some(&(128 << 20)));
        // ... but not once it is long past (b stopped reporting: not a candidate anyway).
        let later = 5000 + 10 * 60 * 1000 + 1;
        assert_eq!(store.reserved_by_destination(later).await.expect("old").get("b"), Some(&(64 << 20)));
        store
            .heartbeat("b", "https://127.0.0.1:2", false, &info("b", "ds", &[]), 9000)
            .await
            .expect("b again");
        assert_eq!(
            store.reserved_by_destination(10_000).await.expect("reported").get("b"),
            Some(&(64 << 20))
        );
        // A failed one holds nothing.
        store.record_migration(&record("m3", MigrationOutcome::Failed, 3000), 3000).await.expect("m3");
        sqlx::query("DELETE FROM migrations WHERE id = 'm2'").execute(&store.pool).await.expect("delete");
        assert!(store.reserved_by_destination(10_000).await.expect("none left").is_empty());
    });
}

#[test]
fn the_queue_keeps_its_order_and_its_migrations_leave_it() {
    on_both(|store| async move {
        for (i, id) in ["q1", "q2", "q3"].iter().enumerate() {
            let position = store
                .enqueue(&record(id, MigrationOutcome::Queued, 100 + i as u64), "{\"to_host\":\"b\"}", 100)
                .await
                .expect("enqueue");
            assert_eq!(position, i as u32 + 1);
        }
        let q = store.queue().await.expect("queue");
        assert_eq!(
            q.iter().map(|q| (q.id.as_str(), q.position)).collect::<Vec<_>>(),
            [("q1", 1), ("q2", 2), ("q3", 3)]
        );
        assert_eq!(q[0].request, "{\"to_host\":\"b\"}");
        let queued = MigrationFilter { outcome: Some(MigrationOutcome::Queued), ..Default::default() };
        assert_eq!(store.migrations(&queued).await.expect("queued").len(), 3);
        // q1 starts: out of the queue, its row active with a `started` event.
        assert!(store.dequeue("q1").await.expect("dequeue"));
        assert!(!store.dequeue("q1").await.expect("again"));
        store.record_migration(&record("q1", MigrationOutcome::Active, 100), 110).await.expect("active");
        // q2 is cancelled while queued; q3 moves up.
        assert!(store.dequeue("q2").await.expect("dequeue"));
        store
            .record_migration(&record("q2", MigrationOutcome::Cancelled, 101), 120)
            .await
            .expect("cancelled");
        let q = store.queue().await.expect("queue");
        assert_eq!(q.iter().map(|q| (q.id.as_str(), q.position)).collect::<Vec<_>>(), [("q3", 1)]);
        let kinds = |id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .migration_events(id)
                    .await
                    .expect("events")
                    .into_iter()
                    .map(|e| e.kind)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(kinds("q1").await, ["queued", "started"]);
        assert_eq!(kinds("q2").await, ["queued", "cancelled"]);
        let cancelled = MigrationFilter { outcome: Some(MigrationOutcome::Cancelled), ..Default::default() };
        assert_eq!(store.migrations(&cancelled).await.expect("cancelled")[0].id, "q2");
    });
}

#[test]
fn a_completed_migration_moves_the_vm_in_the_inventory() {
    on_both(|store| async move {
        store
            .heartbeat(
                "a",
                "https://10.0.0.1:7443",
                false,
                &info("a", "ds1", &[("web", VmState::Running)]),
                1000,
            )
            .await
            .expect("a");
        store.heartbeat("b", "https://10.0.0.2:7443", false, &info("b", "ds1", &[]), 1000).await.expect("b");
        assert!(store.move_vm("web", "a", "b", 2000).await.expect("move"));
        let vms = store.vms(Some("web"), 2000).await.expect("vms");
        assert_eq!(
            vms.iter().map(|v| (v.host.as_str(), v.state.as_str())).collect::<Vec<_>>(),
            [("b", "running")]
        );
        // Nothing to move any more.
        assert!(!store.move_vm("web", "a", "b", 2100).await.expect("again"));
        // The destination reported it first: the source's stale report goes.
        store
            .heartbeat(
                "a",
                "https://10.0.0.1:7443",
                false,
                &info("a", "ds1", &[("db", VmState::Running)]),
                3000,
            )
            .await
            .expect("a");
        store
            .heartbeat(
                "b",
                "https://10.0.0.2:7443",
                false,
                &info("b", "ds1", &[("db", VmState::Running)]),
                3000,
            )
            .await
            .expect("b");
        assert!(store.move_vm("db", "a", "b", 3100).await.expect("move"));
        let vms = store.vms(Some("db"), 3100).await.expect("vms");
        assert_eq!(vms.iter().map(|v| v.host.as_str()).collect::<Vec<_>>(), ["b"]);
    });
}

/// The source reports a VM gone before the controller sees its migration end, and the
/// destination does not report it yet: the VM stays shown on the source until the end
/// moves it, never on no host.
#[test]
fn a_vm_leaving_under_a_followed_migration_stays_shown_until_it_ends() {
    on_both(|store| async move {
        let with_web = info("a", "ds1", &[("web", VmState::Running), ("db", VmState::Running)]);
        store.heartbeat("a", "https://10.0.0.1:7443", false, &with_web, 1000).await.expect("a");
        store.heartbeat("b", "https://10.0.0.2:7443", false, &info("b", "ds1", &[]), 1000).await.expect("b");
        store.record_migration(&record("m1", MigrationOutcome::Active, 1500), 1500).await.expect("m1");
        // a's report without web (and without db, which no migration takes: it goes).
        let without = info("a", "ds1", &[("cache", VmState::Running)]);
        store.heartbeat("a", "https://10.0.0.1:7443", false, &without, 2000).await.expect("a again");
        let shown = |vms: Vec<ferry_cluster_api::ClusterVm>| {
            vms.iter().map(|v| (v.name.clone(), v.host.clone())).collect::<Vec<_>>()
        };
        assert_eq!(
            shown(store.vms(None, 2000).await.expect("vms")),
            [("cache".to_string(), "a".to_string()), ("web".into(), "a".into())]
        );
        // a reports web again (the migration failed and it runs there): one row, updated.
        store.heartbeat("a", "https://10.0.0.1:7443", false, &with_web, 2500).await.expect("a back");
        assert_eq!(store.vms(Some("web"), 2500).await.expect("web").len(), 1);
        store.heartbeat("a", "https://10.0.0.1:7443", false, &without, 2600).await.expect("a gone");
        // The end moves it.
        assert!(store.move_vm("web", "a", "b", 3000).await.expect("move"));
        let mut done = record("m1", MigrationOutcome::Completed, 1500);
        done.ended_unix_ms = Some(3000);
        store.record_migration(&done, 3000).await.expect("done");
        assert_eq!(
            shown(store.vms(Some("web"), 3000).await.expect("web")),
            [("web".to_string(), "b".to_string())]
        );
        // Once it ended, the source's reports without it leave it where the end put it, and a
        // source report that drops a VM no migration takes drops it as before.
        store.heartbeat("a", "https://10.0.0.1:7443", false, &info("a", "ds1", &[]), 4000).await.expect("a");
        assert_eq!(shown(store.vms(None, 4000).await.expect("vms")), [("web".to_string(), "b".to_string())]);
    });
}

/// A heartbeat that changes only the host's memory keeps its rows and moves their report
/// time; one that changes a VM, a datastore or a port group rewrites those rows.
#[test]
fn unchanged_reports_keep_their_rows() {
    on_both(|store| async move {
        let first = info("a", "ds-1", &[("web", VmState::Running), ("db", VmState::Running)]);
        store.heartbeat("a", "https://10.0.0.1:7443", false, &first, 1000).await.expect("first");
        let mut memory_only = first.clone();
        memory_only.memory.available_bytes -= 1 << 20;
        store.heartbeat("a", "https://10.0.0.1:7443", false, &memory_only, 2000).await.expect("second");
        let vms = store.vms(None, 2500).await.expect("vms");
        assert_eq!(
            vms.iter().map(|v| (v.name.as_str(), v.state.as_str(), v.age_ms)).collect::<Vec<_>>(),
            [("db", "running", 500), ("web", "running", 500)]
        );
        let a = store.host("a").await.expect("host").expect("a");
        assert_eq!(a.info.memory.available_bytes, memory_only.memory.available_bytes);
        // A VM stopped, a datastore and a port group replaced: all rewritten.
        let mut changed = info("a", "ds-2", &[("web", VmState::Defined), ("db", VmState::Running)]);
        changed.portgroups[0].name = "san".into();
        store.heartbeat("a", "https://10.0.0.1:7443", false, &changed, 3000).await.expect("third");
        let vms = store.vms(Some("web"), 3000).await.expect("web");
        assert_eq!((vms.len(), vms[0].state.as_str(), vms[0].age_ms), (1, "defined", 0));
        let ds = store.datastores().await.expect("ds");
        assert_eq!(ds.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["ds-2"]);
        let pg = store.portgroups().await.expect("pg");
        assert_eq!(pg.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["san"]);
    });
}

/// The decoded inventories a store keeps are used only while their revision is the stored
/// one: another writer (a controller before a takeover) makes them read again, a heartbeat
/// refills them, and a revision never repeats even when the clock does.
#[test]
fn cached_inventories_follow_every_writer() {
    on_both(|store| async move {
        let first = info("a", "ds-1", &[("web", VmState::Running)]);
        store.heartbeat("a", "https://10.0.0.1:7443", false, &first, 5000).await.expect("first");
        store.heartbeat("b", "https://10.0.0.2:7443", false, &info("b", "ds-1", &[]), 5000).await.expect("b");
        let hosts = store.hosts().await.expect("hosts");
        assert_eq!(hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(*hosts[0].info, first);
        // Read twice: the same decoded inventory (from the cache), not a new one.
        let again = store.host("a").await.expect("host").expect("a");
        assert!(std::sync::Arc::ptr_eq(&hosts[0].info, &again.info));

        // Another controller on the same database (its own cache) writes a's inventory, with a
        // clock that went back: this store must see the new one.
        let other = Store { infos: super::InfoCache::default(), ..store.clone() };
        let mut moved = first.clone();
        moved.vms.clear();
        moved.memory.available_bytes -= 1 << 30;
        other.heartbeat("a", "https://10.0.0.1:7443", false, &moved, 4000).await.expect("other");
        let hosts = store.hosts().await.expect("hosts");
        assert_eq!(*hosts[0].info, moved);
        assert_eq!(*store.host("a").await.expect("host").expect("a").info, moved);
        // And back: this store's own heartbeat refills its cache with what it wrote.
        store.heartbeat("a", "https://10.0.0.1:7443", false, &first, 4001).await.expect("back");
        assert_eq!(*other.hosts().await.expect("hosts")[0].info, first);
        let hosts = store.hosts().await.expect("hosts");
        assert_eq!(*hosts[0].info, first);
        assert_eq!(*hosts[1].info, info("b", "ds-1", &[]));
    });
}

/// Controllers that start at once on a new database both open it: the schema is applied
/// once, by one of them.
#[test]
fn stores_opened_at_once_on_a_new_database_apply_the_schema_once() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("ferry-store-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut urls = vec![format!("sqlite://{}", dir.join("cluster.db").display())];
        let db = TestDatabase::create().await;
        urls.extend(db.as_ref().map(|d| d.url.clone()));
        for url in urls {
            let opens: Vec<_> = (0..4)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move { Store::open(&url).await })
                })
                .collect();
            for open in opens {
                let store = open.await.expect("task").unwrap_or_else(|e| panic!("open {url}: {e:?}"));
                assert_eq!(store.version().await.expect("version"), super::schema::latest());
                store.close().await;
            }
            let store = Store::open(&url).await.expect("reopen");
            let applied = sqlx::query("SELECT COUNT(*) AS n FROM schema_version")
                .fetch_one(&store.pool)
                .await
                .expect("count")
                .try_get::<i64, _>("n")
                .expect("n");
            assert_eq!(applied, super::schema::MIGRATIONS.len() as i64, "{url}: each version applied once");
            store.close().await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// A migration lost with its hosts (`unknown`) is not kept as an end: the outcome a host
/// reports later replaces it (with an event `reconciled`), once; other ends are kept.
#[test]
fn an_unknown_migration_takes_the_outcome_a_host_reports_later() {
    on_both(|store| async move {
        store.record_migration(&record("m1", MigrationOutcome::Active, 100), 100).await.expect("active");
        let mut lost = record("m1", MigrationOutcome::Active, 100);
        lost.outcome = MigrationOutcome::Unknown;
        lost.reason_code = "host_lost".into();
        store.record_migration(&lost, 200).await.expect("unknown");
        let by_id = MigrationFilter { id: Some("m1".into()), ..Default::default() };
        assert_eq!(store.migrations(&by_id).await.expect("m1")[0].outcome, MigrationOutcome::Unknown);
        // The ordinary recording keeps it (as it keeps every end) ...
        store.record_migration(&record("m1", MigrationOutcome::Failed, 100), 300).await.expect("kept");
        assert_eq!(store.migrations(&by_id).await.expect("m1")[0].outcome, MigrationOutcome::Unknown);
        // ... the reconciliation takes the host's.
        assert!(!store.reconcile_unknown(&lost, 350).await.expect("unknown is no answer"));
        let done = record("m1", MigrationOutcome::Completed, 100);
        assert!(store.reconcile_unknown(&done, 400).await.expect("reconciled"));
        let now = store.migrations(&by_id).await.expect("m1");
        assert_eq!((now[0].outcome, now[0].ended_unix_ms), (MigrationOutcome::Completed, Some(110)));
        let kinds: Vec<String> =
            store.migration_events("m1").await.expect("events").into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["recorded", "unknown", "reconciled"]);
        // Once: a later report changes nothing.
        assert!(!store
            .reconcile_unknown(&record("m1", MigrationOutcome::Failed, 100), 500)
            .await
            .expect("no"));
        let completed = MigrationFilter { outcome: Some(MigrationOutcome::Completed), ..Default::default() };
        assert_eq!(store.migrations(&completed).await.expect("completed").len(), 1);
        // An active migration is not touched by it.
        store.record_migration(&record("m2", MigrationOutcome::Active, 600), 600).await.expect("m2");
        assert!(!store
            .reconcile_unknown(&record("m2", MigrationOutcome::Failed, 600), 700)
            .await
            .expect("no"));
    });
}
