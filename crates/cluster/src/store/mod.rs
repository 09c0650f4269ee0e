//! The controller's store: one data-access layer over SQLite (default: a file in the state
//! directory, WAL mode) or PostgreSQL (`database = "postgres://..."`), through sqlx's `Any`
//! driver. Every query is written once, with `$N` placeholders (both back ends accept them)
//! and only the types both know (text, 64-bit integers, doubles).
//!
//! The schema ([`schema`]) is versioned: forward migrations run at start-up, each in a
//! transaction that records its version in `schema_version`; a store whose version is newer
//! than this binary knows is refused with both versions named.
//!
//! Live state (`hosts` and what each reported) is replaced host by host at each heartbeat;
//! history (`migrations`, `migration_events`) is appended to.

pub mod evc;
pub mod lease;
pub mod placement;
pub mod queue;
pub mod schema;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_cluster_api::{
    ClusterDatastore, ClusterPortGroup, ClusterVm, DatastoreSeen, HostState, HostSummary, PortGroupSeen,
};
use ferry_host_api::{HostInfo, MigrationOutcome, MigrationRecord};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use sqlx::{Executor, Row};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database URL is not one the store speaks.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    Url(String),
    /// The database failed.
    #[error("the controller's database ({backend} {location}) failed")]
    Sql {
        /// `sqlite` or `postgres`.
        backend: Backend,
        /// The file, or the server without credentials.
        location: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// Written by a newer Ferry.
    #[error("the controller's database ({backend} {location}) has schema version {found}, newer than this Ferry's {known}; run a newer Ferry")]
    TooNew {
        /// `sqlite` or `postgres`.
        backend: Backend,
        /// The file or server.
        location: String,
        /// Its version.
        found: u32,
        /// The newest this binary knows.
        known: u32,
    },
    /// A row does not decode.
    #[error("the controller's database holds a damaged row in {table} ({key}): {reason}")]
    Damaged {
        /// The table.
        table: &'static str,
        /// The row's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Which database is behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (WAL mode).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

/// A host's row.
#[derive(Clone, Debug, PartialEq)]
pub struct HostRow {
    /// Its name.
    pub name: String,
    /// Its daemon's API.
    pub api_url: String,
    /// Its state.
    pub state: HostState,
    /// Its configuration's maintenance flag at the last heartbeat.
    pub maintenance: bool,
    /// First heartbeat.
    pub joined_unix_ms: u64,
    /// Last heartbeat.
    pub last_seen_unix_ms: u64,
    /// Its last inventory (shared with the store's cache of decoded inventories).
    pub info: Arc<HostInfo>,
}

impl HostRow {
    /// The API's summary, ages taken at `now_ms`.
    pub fn summary(&self, now_ms: u64) -> HostSummary {
        HostSummary {
            name: self.name.clone(),
            api_url: self.api_url.clone(),
            state: self.state,
            joined_unix_ms: self.joined_unix_ms,
            last_seen_unix_ms: self.last_seen_unix_ms,
            age_ms: now_ms.saturating_sub(self.last_seen_unix_ms),
            vms: self.info.vms.len() as u32,
            cpus: self.info.cpu.cpus,
            cpu_model: self.info.cpu.model.clone(),
            memory_total_bytes: self.info.memory.total_bytes,
            memory_available_bytes: self.info.memory.available_bytes,
            ferry_version: self.info.ferry_version.clone(),
        }
    }
}

/// Which migrations [`Store::migrations`] lists.
#[derive(Clone, Debug, Default)]
pub struct MigrationFilter {
    /// Only those with this outcome.
    pub outcome: Option<MigrationOutcome>,
    /// Only this VM's.
    pub vm: Option<String>,
    /// Only those from or to this host.
    pub host: Option<String>,
    /// Only this one.
    pub id: Option<String>,
}

pub use ferry_cluster_api::MigrationEvent;

/// Now, ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    location: String,
    infos: InfoCache,
}

/// The hosts' decoded inventories by name, each with the `info_rev` it was decoded at:
/// decoding 2,500 inventories is most of what a check or a placement over the whole cluster
/// costs, and between two of them only the revisions that moved need decoding again. A
/// revision is raised by every write of `info` (whoever wrote it: another controller
/// before a takeover too), so an entry is used only while the database still has its
/// revision; the heartbeats this process takes refill it as they write.
#[derive(Clone, Debug, Default)]
struct InfoCache(Arc<Mutex<HashMap<String, Revised>>>);

/// An inventory and its revision.
type Revised = (i64, Arc<HostInfo>);

impl InfoCache {
    fn get(&self, name: &str, rev: i64) -> Option<Arc<HostInfo>> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(name).filter(|(r, _)| *r == rev).map(|(_, info)| info.clone())
    }

    fn put(&self, name: &str, rev: i64, info: Arc<HostInfo>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(name.to_string(), (rev, info));
    }

    /// Forgets the hosts not in `names` (they left).
    fn keep_only(&self, names: &std::collections::HashSet<&str>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|name, _| names.contains(name.as_str()));
    }
}

/// The PostgreSQL advisory lock key under which one controller at a time upgrades the
/// schema ("ferry" in ASCII).
const MIGRATE_LOCK: i64 = 0x0066_6572_7279;

/// A host's row without its inventory, and the inventory if the cache had it.
struct HostHead {
    name: String,
    api_url: String,
    state: HostState,
    maintenance: bool,
    joined_unix_ms: u64,
    last_seen_unix_ms: u64,
    info: Option<Arc<HostInfo>>,
}

/// The columns of a host's row, its inventory's revision but not the inventory.
const HOST_COLUMNS: &str = "name, api_url, state, maintenance, joined_unix_ms, last_seen_unix_ms, info_rev";

/// `postgres://user:secret@host/db` without the secret.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

impl Store {
    /// Opens (creating a SQLite file if absent) and migrates the store at `url`
    /// (`sqlite://PATH` or `postgres://...`).
    pub async fn open(url: &str) -> Result<Store, Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite://") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(Error::Url(redact(url)));
        };
        let location = redact(url);
        let sql = |source| Error::Sql { backend, location: location.clone(), source };
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let connect_url = match backend {
            Backend::Sqlite => {
                // One writer at a time anyway; WAL lets readers go on meanwhile.
                options = options.max_connections(4).after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        Ok(())
                    })
                });
                if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                }
            }
            Backend::Postgres => {
                options = options.max_connections(8);
                url.to_string()
            }
        };
        let pool = options.connect(&connect_url).await.map_err(sql)?;
        let store = Store { pool, backend, location, infos: InfoCache::default() };
        store.migrate().await?;
        Ok(store)
    }

    /// Opens a SQLite file.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Store, Error> {
        Store::open(&format!("sqlite://{}", path.display())).await
    }

    /// The back end.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where it is (file or server, without credentials).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await
    }

    fn sql(&self) -> impl Fn(sqlx::Error) -> Error + '_ {
        move |source| Error::Sql { backend: self.backend, location: self.location.clone(), source }
    }

    /// The schema version.
    pub async fn version(&self) -> Result<u32, Error> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
            .fetch_one(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(row.try_get::<i64, _>("v").map_err(self.sql())? as u32)
    }

    /// Brings the schema to the newest version. Two controllers starting at once on a new
    /// database must not both apply a version (the second would fail on a table that
    /// exists): on PostgreSQL they take turns on an advisory lock held by a connection for
    /// the whole upgrade (released when that session ends, even if this process dies); on
    /// SQLite each version's transaction begins with a write, which waits for the other
    /// writer (busy timeout), and then reads the version again.
    async fn migrate(&self) -> Result<(), Error> {
        let mut turn = None;
        if self.backend == Backend::Postgres {
            let mut conn = self.pool.acquire().await.map_err(self.sql())?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATE_LOCK)
                .execute(&mut *conn)
                .await
                .map_err(self.sql())?;
            turn = Some(conn);
        }
        let done = self.migrate_in_turn().await;
        if let Some(mut conn) = turn {
            // A failed unlock ends with the session: drop the connection rather than return it.
            if sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATE_LOCK)
                .execute(&mut *conn)
                .await
                .is_err()
            {
                let _ = conn.detach();
            }
        }
        done
    }

    async fn migrate_in_turn(&self) -> Result<(), Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL, applied_unix_ms BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .map_err(self.sql())?;
        let found = self.version().await?;
        let known = schema::latest();
        if found > known {
            return Err(Error::TooNew {
                backend: self.backend,
                location: self.location.clone(),
                found,
                known,
            });
        }
        for (version, statements) in schema::MIGRATIONS.iter().filter(|m| m.0 > found) {
            let mut tx = self.pool.begin().await.map_err(self.sql())?;
            if self.backend == Backend::Sqlite {
                // A write first: SQLite's lock for writing, taken now (waiting for another
                // writer), not at the first CREATE after a read.
                sqlx::query("UPDATE schema_version SET applied_unix_ms = applied_unix_ms WHERE version < 0")
                    .execute(&mut *tx)
                    .await
                    .map_err(self.sql())?;
            }
            let applied = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
                .fetch_one(&mut *tx)
                .await
                .map_err(self.sql())?
                .try_get::<i64, _>("v")
                .map_err(self.sql())?;
            if applied >= i64::from(*version) {
                tx.commit().await.map_err(self.sql())?;
                continue;
            }
            for statement in *statements {
                sqlx::query(statement).execute(&mut *tx).await.map_err(self.sql())?;
            }
            sqlx::query("INSERT INTO schema_version (version, applied_unix_ms) VALUES ($1, $2)")
                .bind(*version as i64)
                .bind(unix_ms() as i64)
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
            tx.commit().await.map_err(self.sql())?;
            tracing::info!(
                "controller store {} {}: schema version {version} applied",
                self.backend,
                self.location
            );
        }
        Ok(())
    }

    /// Records a heartbeat of host `name`: its row (joined now if new; `connected`, or
    /// `maintenance` with the flag) and everything it reports, replacing its previous report.
    pub async fn heartbeat(
        &self,
        name: &str,
        api_url: &str,
        maintenance: bool,
        info: &HostInfo,
        now_ms: u64,
    ) -> Result<(), Error> {
        let state = if maintenance { HostState::Maintenance } else { HostState::Connected };
        let info_json = serde_json::to_string(info).map_err(|e| Error::Damaged {
            table: "hosts",
            key: name.to_string(),
            reason: e.to_string(),
        })?;
        let now = now_ms as i64;
        // The rows of what did not change since the last report stay (only the VMs' report
        // time moves): most heartbeats change only the free memory. A previous report that
        // does not decode counts as changed. Read before the transaction: on SQLite a
        // transaction that reads first and then writes fails at once (SQLITE_BUSY, no busy
        // wait) when another connection wrote meanwhile; a host sends one heartbeat at a
        // time, so nothing else changes its rows in between.
        let stored_rev: Option<i64> = sqlx::query("SELECT info_rev FROM hosts WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.sql())?
            .map(|r| r.try_get("info_rev"))
            .transpose()
            .map_err(self.sql())?;
        let previous: Option<Arc<HostInfo>> = match stored_rev {
            None => None,
            Some(rev) => match self.infos.get(name, rev) {
                Some(info) => Some(info),
                None => {
                    self.read_infos(&[name]).await.ok().and_then(|mut read| read.remove(name)).map(|r| r.1)
                }
            },
        };
        let mut tx = self.pool.begin().await.map_err(self.sql())?;
        let same_datastores = previous.as_ref().is_some_and(|p| p.datastores == info.datastores);
        let same_portgroups = previous.as_ref().is_some_and(|p| p.portgroups == info.portgroups);
        let same_vms = previous.as_ref().is_some_and(|p| p.vms == info.vms);
        // The revision: one more than the stored one, and never below now (schema 6).
        let rev: i64 = sqlx::query(
            "INSERT INTO hosts (name, api_url, state, maintenance, joined_unix_ms, last_seen_unix_ms, info, info_rev)
             VALUES ($1, $2, $3, $4, $5, $5, $6, $5)
             ON CONFLICT (name) DO UPDATE SET api_url = excluded.api_url, state = excluded.state,
                 maintenance = excluded.maintenance, last_seen_unix_ms = excluded.last_seen_unix_ms,
                 info = excluded.info,
                 info_rev = CASE WHEN hosts.info_rev + 1 > excluded.info_rev THEN hosts.info_rev + 1
                                 ELSE excluded.info_rev END
             RETURNING info_rev",
        )
        .bind(name)
        .bind(api_url)
        .bind(state.as_str())
        .bind(i64::from(maintenance))
        .bind(now)
        .bind(info_json)
        .fetch_one(&mut *tx)
        .await
        .map_err(self.sql())?
        .try_get("info_rev")
        .map_err(self.sql())?;
        for (table, same) in [
            ("host_datastores", same_datastores),
            ("host_portgroups", same_portgroups),
            ("host_vms", same_vms),
        ] {
            if same {
                continue;
            }
            // A VM this host no longer reports while the controller follows its migration
            // from here keeps its row until that migration ends: the host may report it
            // gone before the controller sees the end, and the end moves the row to the
            // destination (`move_vm`), so the VM is never shown on no host in between.
            let keep = if table == "host_vms" {
                " AND name NOT IN (SELECT vm FROM migrations WHERE source = $1 AND outcome = 'active')"
            } else {
                ""
            };
            sqlx::query(&format!("DELETE FROM {table} WHERE host = $1{keep}"))
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
        }
        if same_vms {
            sqlx::query("UPDATE host_vms SET reported_unix_ms = $1 WHERE host = $2")
                .bind(now)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
        }
        for d in info.datastores.iter().filter(|_| !same_datastores) {
            sqlx::query(
                "INSERT INTO host_datastores (datastore_id, host, name, path, free_bytes, total_bytes)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&d.id)
            .bind(name)
            .bind(&d.name)
            .bind(d.path.to_string_lossy().into_owned())
            .bind(d.free_bytes as i64)
            .bind(d.total_bytes as i64)
            .execute(&mut *tx)
            .await
            .map_err(self.sql())?;
        }
        for p in info.portgroups.iter().filter(|_| !same_portgroups) {
            sqlx::query("INSERT INTO host_portgroups (name, host, bridge, present) VALUES ($1, $2, $3, $4)")
                .bind(&p.name)
                .bind(name)
                .bind(&p.bridge)
                .bind(i64::from(p.present))
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
        }
        for v in info.vms.iter().filter(|_| !same_vms) {
            sqlx::query(
                "INSERT INTO host_vms (name, host, state, memory_mib, vcpus, datastore, reported_unix_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (name, host) DO UPDATE SET state = excluded.state, memory_mib = excluded.memory_mib,
                     vcpus = excluded.vcpus, datastore = excluded.datastore,
                     reported_unix_ms = excluded.reported_unix_ms",
            )
            .bind(&v.name)
            .bind(name)
            .bind(v.state.as_str())
            .bind(v.memory_mib as i64)
            .bind(i64::from(v.vcpus))
            .bind(&v.datastore)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(self.sql())?;
        }
        tx.commit().await.map_err(self.sql())?;
        self.infos.put(name, rev, Arc::new(info.clone()));
        Ok(())
    }

    /// Sets host `name`'s state; `false` if no such host.
    pub async fn set_host_state(&self, name: &str, state: HostState) -> Result<bool, Error> {
        let done = sqlx::query("UPDATE hosts SET state = $1 WHERE name = $2")
            .bind(state.as_str())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks `not_responding` every `connected` or `maintenance` host whose last heartbeat is
    /// older than `cutoff_unix_ms`; their names.
    pub async fn mark_not_responding(&self, cutoff_unix_ms: u64) -> Result<Vec<String>, Error> {
        let mut tx = self.pool.begin().await.map_err(self.sql())?;
        let rows = sqlx::query(
            "SELECT name FROM hosts WHERE state IN ('connected', 'maintenance') AND last_seen_unix_ms < $1
             ORDER BY name",
        )
        .bind(cutoff_unix_ms as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.sql())?;
        let mut names = Vec::new();
        for r in rows {
            let name: String = r.try_get("name").map_err(self.sql())?;
            sqlx::query("UPDATE hosts SET state = 'not_responding' WHERE name = $1")
                .bind(&name)
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
            names.push(name);
        }
        tx.commit().await.map_err(self.sql())?;
        Ok(names)
    }

    /// A host's row as selected by [`HOST_COLUMNS`], with its inventory if the cache has it
    /// at the row's revision (otherwise [`Store::complete`] reads and decodes it).
    fn host_row(&self, r: &sqlx::any::AnyRow) -> Result<HostHead, Error> {
        let name: String = r.try_get("name").map_err(self.sql())?;
        let state: String = r.try_get("state").map_err(self.sql())?;
        let state = HostState::parse(&state).ok_or_else(|| Error::Damaged {
            table: "hosts",
            key: name.clone(),
            reason: format!("unknown state {state:?}"),
        })?;
        let rev: i64 = r.try_get("info_rev").map_err(self.sql())?;
        Ok(HostHead {
            info: self.infos.get(&name, rev),
            api_url: r.try_get("api_url").map_err(self.sql())?,
            state,
            maintenance: r.try_get::<i64, _>("maintenance").map_err(self.sql())? != 0,
            joined_unix_ms: r.try_get::<i64, _>("joined_unix_ms").map_err(self.sql())? as u64,
            last_seen_unix_ms: r.try_get::<i64, _>("last_seen_unix_ms").map_err(self.sql())? as u64,
            name,
        })
    }

    /// Reads and decodes the inventories of `names` (those the cache lacks), caching them;
    /// by name, with the revision read (a host that left meanwhile is absent).
    async fn read_infos(&self, names: &[&str]) -> Result<HashMap<String, Revised>, Error> {
        let mut found = HashMap::with_capacity(names.len());
        for chunk in names.chunks(500) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let text = format!("SELECT name, info_rev, info FROM hosts WHERE name IN ({})", marks.join(", "));
            let mut query = sqlx::query(&text);
            for name in chunk {
                query = query.bind(*name);
            }
            for r in query.fetch_all(&self.pool).await.map_err(self.sql())? {
                let name: String = r.try_get("name").map_err(self.sql())?;
                let rev: i64 = r.try_get("info_rev").map_err(self.sql())?;
                let text: String = r.try_get("info").map_err(self.sql())?;
                let info: HostInfo = serde_json::from_str(&text).map_err(|e| Error::Damaged {
                    table: "hosts",
                    key: name.clone(),
                    reason: e.to_string(),
                })?;
                let info = Arc::new(info);
                self.infos.put(&name, rev, info.clone());
                found.insert(name, (rev, info));
            }
        }
        Ok(found)
    }

    /// Fills in the inventories the cache lacked; drops rows whose host left meanwhile.
    async fn complete(&self, rows: Vec<HostHead>) -> Result<Vec<HostRow>, Error> {
        let missing: Vec<&str> = rows.iter().filter(|r| r.info.is_none()).map(|r| r.name.as_str()).collect();
        let mut read = if missing.is_empty() { HashMap::new() } else { self.read_infos(&missing).await? };
        Ok(rows
            .into_iter()
            .filter_map(|head| {
                let info = match head.info {
                    Some(info) => info,
                    None => read.remove(&head.name)?.1,
                };
                Some(HostRow {
                    name: head.name,
                    api_url: head.api_url,
                    state: head.state,
                    maintenance: head.maintenance,
                    joined_unix_ms: head.joined_unix_ms,
                    last_seen_unix_ms: head.last_seen_unix_ms,
                    info,
                })
            })
            .collect())
    }

    /// Every host, by name. The inventories come from the cache where their revision is
    /// still the stored one; only the others are read and decoded.
    pub async fn hosts(&self) -> Result<Vec<HostRow>, Error> {
        let text = format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name");
        let rows = sqlx::query(&text).fetch_all(&self.pool).await.map_err(self.sql())?;
        let rows = rows.iter().map(|r| self.host_row(r)).collect::<Result<Vec<_>, _>>()?;
        self.infos.keep_only(&rows.iter().map(|r| r.name.as_str()).collect());
        self.complete(rows).await
    }

    /// Host `name`.
    pub async fn host(&self, name: &str) -> Result<Option<HostRow>, Error> {
        let text = format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = $1");
        let row = sqlx::query(&text).bind(name).fetch_optional(&self.pool).await.map_err(self.sql())?;
        let Some(row) = row else { return Ok(None) };
        Ok(self.complete(vec![self.host_row(&row)?]).await?.pop())
    }

    /// The VMs every host reported (by name, then host), or those named `name`; ages at
    /// `now_ms`.
    pub async fn vms(&self, name: Option<&str>, now_ms: u64) -> Result<Vec<ClusterVm>, Error> {
        let rows = sqlx::query(
            "SELECT v.name, v.host, h.state AS host_state, v.state, v.memory_mib, v.vcpus, v.datastore,
                    v.reported_unix_ms
             FROM host_vms v JOIN hosts h ON h.name = v.host
             WHERE $1 = '' OR v.name = $1
             ORDER BY v.name, v.host",
        )
        .bind(name.unwrap_or(""))
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            let vm: String = r.try_get("name").map_err(self.sql())?;
            let host_state: String = r.try_get("host_state").map_err(self.sql())?;
            let host_state = HostState::parse(&host_state).ok_or_else(|| Error::Damaged {
                table: "hosts",
                key: vm.clone(),
                reason: format!("unknown state {host_state:?}"),
            })?;
            let reported = r.try_get::<i64, _>("reported_unix_ms").map_err(self.sql())? as u64;
            out.push(ClusterVm {
                host: r.try_get("host").map_err(self.sql())?,
                host_state,
                state: r.try_get("state").map_err(self.sql())?,
                memory_mib: r.try_get::<i64, _>("memory_mib").map_err(self.sql())? as u64,
                vcpus: r.try_get::<i64, _>("vcpus").map_err(self.sql())? as u32,
                datastore: r.try_get("datastore").map_err(self.sql())?,
                reported_unix_ms: reported,
                age_ms: now_ms.saturating_sub(reported),
                name: vm,
            });
        }
        Ok(out)
    }

    /// Every datastore by id, with the hosts that see it.
    pub async fn datastores(&self) -> Result<Vec<ClusterDatastore>, Error> {
        let rows = sqlx::query(
            "SELECT datastore_id, host, name, path, free_bytes, total_bytes FROM host_datastores
             ORDER BY datastore_id, host",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out: Vec<ClusterDatastore> = Vec::new();
        for r in rows {
            let id: String = r.try_get("datastore_id").map_err(self.sql())?;
            let seen = DatastoreSeen {
                host: r.try_get("host").map_err(self.sql())?,
                name: r.try_get("name").map_err(self.sql())?,
                path: r.try_get("path").map_err(self.sql())?,
                free_bytes: r.try_get::<i64, _>("free_bytes").map_err(self.sql())? as u64,
                total_bytes: r.try_get::<i64, _>("total_bytes").map_err(self.sql())? as u64,
            };
            match out.last_mut() {
                Some(d) if d.id == id => d.hosts.push(seen),
                _ => out.push(ClusterDatastore { id, hosts: vec![seen] }),
            }
        }
        Ok(out)
    }

    /// Every port group by name, with the hosts that have it.
    pub async fn portgroups(&self) -> Result<Vec<ClusterPortGroup>, Error> {
        let rows = sqlx::query("SELECT name, host, bridge, present FROM host_portgroups ORDER BY name, host")
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql())?;
        let mut out: Vec<ClusterPortGroup> = Vec::new();
        for r in rows {
            let name: String = r.try_get("name").map_err(self.sql())?;
            let seen = PortGroupSeen {
                host: r.try_get("host").map_err(self.sql())?,
                bridge: r.try_get("bridge").map_err(self.sql())?,
                present: r.try_get::<i64, _>("present").map_err(self.sql())? != 0,
            };
            match out.last_mut() {
                Some(p) if p.name == name => p.hosts.push(seen),
                _ => out.push(ClusterPortGroup { name, hosts: vec![seen] }),
            }
        }
        Ok(out)
    }

    /// Records a migration (new, or a later report of one known): its row, and an event
    /// when it is new or its outcome changed. A migration that ended is never changed back
    /// to `active` (history is append-only once written).
    pub async fn record_migration(&self, m: &MigrationRecord, now_ms: u64) -> Result<(), Error> {
        let damaged = |reason: String| Error::Damaged { table: "migrations", key: m.id.clone(), reason };
        let record = serde_json::to_string(m).map_err(|e| damaged(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(self.sql())?;
        let previous = sqlx::query("SELECT outcome FROM migrations WHERE id = $1")
            .bind(&m.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.sql())?;
        let previous: Option<String> = match previous {
            Some(r) => Some(r.try_get("outcome").map_err(self.sql())?),
            None => None,
        };
        let event = match previous.as_deref() {
            None => Some((
                "recorded",
                format!("{} {} -> {}: {}", m.vm, m.source, m.destination, m.outcome.as_str()),
            )),
            Some(p) if p == m.outcome.as_str() => None,
            // Out of the queue.
            Some(p) if p == MigrationOutcome::Queued.as_str() && m.outcome == MigrationOutcome::Active => {
                Some(("started", format!("{} -> {}: left the queue", m.source, m.destination)))
            }
            // Ended: keep the end.
            Some(p) if p != MigrationOutcome::Active.as_str() && p != MigrationOutcome::Queued.as_str() => {
                tx.commit().await.map_err(self.sql())?;
                return Ok(());
            }
            Some(_) => Some((m.outcome.as_str(), format!("{} ({})", m.reason, m.reason_code))),
        };
        sqlx::query(
            "INSERT INTO migrations (id, vm, source, destination, started_unix_ms, ended_unix_ms, outcome, reason_code, record)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET ended_unix_ms = excluded.ended_unix_ms, outcome = excluded.outcome,
                 reason_code = excluded.reason_code, record = excluded.record",
        )
        .bind(&m.id)
        .bind(&m.vm)
        .bind(&m.source)
        .bind(&m.destination)
        .bind(m.started_unix_ms as i64)
        .bind(m.ended_unix_ms.map(|t| t as i64))
        .bind(m.outcome.as_str())
        .bind(&m.reason_code)
        .bind(record)
        .execute(&mut *tx)
        .await
        .map_err(self.sql())?;
        if let Some((kind, message)) = event {
            sqlx::query(
                "INSERT INTO migration_events (migration_id, seq, at_unix_ms, kind, message)
                 SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4 FROM migration_events WHERE migration_id = $1",
            )
            .bind(&m.id)
            .bind(now_ms as i64)
            .bind(kind)
            .bind(message)
            .execute(&mut *tx)
            .await
            .map_err(self.sql())?;
        }
        tx.commit().await.map_err(self.sql())?;
        Ok(())
    }

    /// Migrations matching `filter`, newest first; `failed` includes those the checks refused
    /// (as the hosts' own histories count them).
    pub async fn migrations(&self, filter: &MigrationFilter) -> Result<Vec<MigrationRecord>, Error> {
        let rows = sqlx::query(
            "SELECT id, record FROM migrations
             WHERE ($1 = '' OR outcome = $1 OR ($1 = 'failed' AND outcome = 'refused')) AND ($2 = '' OR vm = $2)
               AND ($3 = '' OR source = $3 OR destination = $3) AND ($4 = '' OR id = $4)
             ORDER BY started_unix_ms DESC, id",
        )
        .bind(filter.outcome.map_or("", MigrationOutcome::as_str))
        .bind(filter.vm.as_deref().unwrap_or(""))
        .bind(filter.host.as_deref().unwrap_or(""))
        .bind(filter.id.as_deref().unwrap_or(""))
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            let id: String = r.try_get("id").map_err(self.sql())?;
            let record: String = r.try_get("record").map_err(self.sql())?;
            out.push(serde_json::from_str(&record).map_err(|e| Error::Damaged {
                table: "migrations",
                key: id,
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Migration `id`'s events, oldest first.
    pub async fn migration_events(&self, id: &str) -> Result<Vec<MigrationEvent>, Error> {
        let rows = sqlx::query(
            "SELECT seq, at_unix_ms, kind, message FROM migration_events WHERE migration_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            out.push(MigrationEvent {
                seq: r.try_get::<i64, _>("seq").map_err(self.sql())? as u64,
                at_unix_ms: r.try_get::<i64, _>("at_unix_ms").map_err(self.sql())? as u64,
                kind: r.try_get("kind").map_err(self.sql())?,
                message: r.try_get("message").map_err(self.sql())?,
            });
        }
        Ok(out)
    }
}

/// A PostgreSQL `url` with its database name replaced by `db` (tests and benchmarks make
/// a database of their own on one server).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{host_part}/{db}{query}")
}

#[cfg(test)]
pub(crate) mod tests;
