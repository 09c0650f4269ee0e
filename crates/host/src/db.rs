//! The daemon's SQLite database (`STATE_DIR/host.db`): a cache of the VMs it registered and
//! their last known state, and a log of events. The homes and their locks are the truth;
//! start-up reconciles this cache with them (see `daemon.rs`).
//!
//! Schema versions are forward migrations applied at start-up, each in a transaction that
//! records its version in `schema_version`; a database whose version is newer than this
//! binary knows is refused with both versions named. Version 2 adds the `migrations` table
//! (the host's migration history: each row's columns for queries, `record` the whole
//! [`ferry_host_api::MigrationRecord`] as JSON). Version 3 adds `cluster`: the controller
//! this host joined (`ferry host join`), at most one row. Version 4 adds EVC: `evc` (the
//! cluster's CPU baseline as the controller last answered, at most one row) and `vm_cpuid`
//! (the baseline generation each VM was last powered on under here). Version 5 adds
//! `cluster_controllers`: every controller of the cluster (standbys included) the active one
//! last named, in order, where the heartbeats turn when their controller fails.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use ferry_host_api::{ExitInfo, MigrationOutcome, MigrationRecord, MigrationRole, VmState};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

/// The schema, version by version.
const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        "CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        home TEXT NOT NULL UNIQUE,
        datastore TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        api_socket TEXT,
        taps TEXT NOT NULL DEFAULT '[]',
        last_exit TEXT,
        last_log TEXT NOT NULL DEFAULT '[]',
        updated_unix_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_unix_ms INTEGER NOT NULL,
        vm TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );",
    ),
    (
        2,
        "CREATE TABLE migrations (
        id TEXT PRIMARY KEY,
        vm TEXT NOT NULL,
        source TEXT NOT NULL,
        destination TEXT NOT NULL,
        role TEXT NOT NULL,
        started_unix_ms INTEGER NOT NULL,
        ended_unix_ms INTEGER,
        outcome TEXT NOT NULL,
        reason_code TEXT NOT NULL DEFAULT '',
        downtime_ms REAL,
        total_ms REAL,
        bytes INTEGER,
        passes TEXT,
        record TEXT NOT NULL
    );
    CREATE INDEX migrations_outcome ON migrations (outcome);",
    ),
    (
        3,
        "CREATE TABLE cluster (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        controller_url TEXT NOT NULL,
        joined_unix_ms INTEGER NOT NULL
    );",
    ),
    (
        4,
        "CREATE TABLE evc (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        baseline TEXT NOT NULL
    );
    CREATE TABLE vm_cpuid (
        name TEXT PRIMARY KEY,
        generation INTEGER NOT NULL
    );",
    ),
    (
        5,
        "CREATE TABLE cluster_controllers (
        url TEXT PRIMARY KEY,
        position INTEGER NOT NULL
    );",
    ),
];

/// Errors of the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed.
    #[error("the daemon's database {path} failed", path = .path.display())]
    Sql {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// Written by a newer Ferry.
    #[error("the daemon's database {path} has schema version {found}, newer than this Ferry's {known}; run a newer Ferry", path = .path.display())]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The newest this binary knows.
        known: u32,
    },
    /// A row does not decode.
    #[error("the daemon's database {path} holds a damaged row for VM {vm}: {reason}", path = .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The VM.
        vm: String,
        /// What is wrong.
        reason: String,
    },
}

/// One VM's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRow {
    /// Its name.
    pub name: String,
    /// Its home.
    pub home: PathBuf,
    /// Its datastore's name.
    pub datastore: String,
    /// Its state.
    pub state: VmState,
    /// Its VMM's pid, while one runs.
    pub pid: Option<u32>,
    /// Its VMM's API socket, while one runs.
    pub api_socket: Option<PathBuf>,
    /// Taps made for it.
    pub taps: Vec<String>,
    /// How its last VMM ended.
    pub last_exit: Option<ExitInfo>,
    /// Its log's last lines then.
    pub last_log: Vec<String>,
}

/// The database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
    path: PathBuf,
}

/// Now, ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Db {
    /// Opens (creating if absent) and migrates the database at `path`.
    pub async fn open(path: &Path) -> Result<Self, Error> {
        let sql = |source| Error::Sql { path: path.to_owned(), source };
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(sql)?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await.map_err(sql)?;
        let db = Db { pool, path: path.to_owned() };
        db.migrate().await?;
        Ok(db)
    }

    fn sql(&self) -> impl Fn(sqlx::Error) -> Error + '_ {
        move |source| Error::Sql { path: self.path.clone(), source }
    }

    /// The schema version of the file.
    pub async fn version(&self) -> Result<u32, Error> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            .fetch_one(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(row.try_get::<i64, _>(0).map_err(self.sql())? as u32)
    }

    async fn migrate(&self) -> Result<(), Error> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_unix_ms INTEGER NOT NULL)")
            .execute(&self.pool)
            .await
            .map_err(self.sql())?;
        let found = self.version().await?;
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if found > known {
            return Err(Error::TooNew { path: self.path.clone(), found, known });
        }
        for (version, script) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            let mut tx = self.pool.begin().await.map_err(self.sql())?;
            sqlx::raw_sql(script).execute(&mut *tx).await.map_err(self.sql())?;
            sqlx::query("INSERT INTO schema_version (version, applied_unix_ms) VALUES (?, ?)")
                .bind(*version as i64)
                .bind(unix_ms() as i64)
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
            tx.commit().await.map_err(self.sql())?;
            tracing::info!("database {}: schema version {version} applied", self.path.display());
        }
        Ok(())
    }

    /// Writes `row` (insert or replace).
    pub async fn put(&self, row: &VmRow) -> Result<(), Error> {
        sqlx::query(
            "INSERT OR REPLACE INTO vms (name, home, datastore, state, pid, api_socket, taps, last_exit, last_log, updated_unix_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.name)
        .bind(row.home.to_string_lossy().into_owned())
        .bind(&row.datastore)
        .bind(row.state.as_str())
        .bind(row.pid.map(i64::from))
        .bind(row.api_socket.as_ref().map(|p| p.to_string_lossy().into_owned()))
        .bind(serde_json::to_string(&row.taps).unwrap_or_else(|_| "[]".into()))
        .bind(row.last_exit.as_ref().and_then(|e| serde_json::to_string(e).ok()))
        .bind(serde_json::to_string(&row.last_log).unwrap_or_else(|_| "[]".into()))
        .bind(unix_ms() as i64)
        .execute(&self.pool)
        .await
        .map_err(self.sql())?;
        Ok(())
    }

    /// Removes a VM's row.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM vms WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(())
    }

    /// Every VM's row, by name.
    pub async fn all(&self) -> Result<Vec<VmRow>, Error> {
        let rows = sqlx::query(
            "SELECT name, home, datastore, state, pid, api_socket, taps, last_exit, last_log FROM vms ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            let name: String = r.try_get("name").map_err(self.sql())?;
            let damaged =
                |reason: String| Error::Damaged { path: self.path.clone(), vm: name.clone(), reason };
            let state: String = r.try_get("state").map_err(self.sql())?;
            let state = VmState::parse(&state).ok_or_else(|| damaged(format!("unknown state {state:?}")))?;
            let pid: Option<i64> = r.try_get("pid").map_err(self.sql())?;
            let sock: Option<String> = r.try_get("api_socket").map_err(self.sql())?;
            let taps: String = r.try_get("taps").map_err(self.sql())?;
            let last_exit: Option<String> = r.try_get("last_exit").map_err(self.sql())?;
            let last_log: String = r.try_get("last_log").map_err(self.sql())?;
            out.push(VmRow {
                home: PathBuf::from(r.try_get::<String, _>("home").map_err(self.sql())?),
                datastore: r.try_get("datastore").map_err(self.sql())?,
                state,
                pid: pid.and_then(|p| u32::try_from(p).ok()),
                api_socket: sock.map(PathBuf::from),
                taps: serde_json::from_str(&taps).map_err(|e| damaged(e.to_string()))?,
                last_exit: match last_exit {
                    Some(t) => Some(serde_json::from_str(&t).map_err(|e| damaged(e.to_string()))?),
                    None => None,
                },
                last_log: serde_json::from_str(&last_log).map_err(|e| damaged(e.to_string()))?,
                name,
            });
        }
        Ok(out)
    }

    /// The controller this host joined and when (`ferry host join`), if any.
    pub async fn controller(&self) -> Result<Option<(String, u64)>, Error> {
        let row = sqlx::query("SELECT controller_url, joined_unix_ms FROM cluster WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(self.sql())?;
        match row {
            Some(r) => Ok(Some((
                r.try_get("controller_url").map_err(self.sql())?,
                r.try_get::<i64, _>("joined_unix_ms").map_err(self.sql())? as u64,
            ))),
            None => Ok(None),
        }
    }

    /// Records the controller this host joined, or (`None`) that it left.
    pub async fn set_controller(&self, url: Option<&str>) -> Result<(), Error> {
        let query = match url {
            Some(url) => sqlx::query(
                "INSERT OR REPLACE INTO cluster (id, controller_url, joined_unix_ms) VALUES (1, ?, ?)",
            )
            .bind(url.to_string())
            .bind(unix_ms() as i64),
            None => sqlx::query("DELETE FROM cluster"),
        };
        query.execute(&self.pool).await.map_err(self.sql())?;
        Ok(())
    }

    /// The controllers of the cluster the active one last named, in order.
    pub async fn controllers(&self) -> Result<Vec<String>, Error> {
        let rows = sqlx::query("SELECT url FROM cluster_controllers ORDER BY position")
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql())?;
        rows.iter().map(|r| r.try_get("url").map_err(self.sql())).collect()
    }

    /// Replaces the controllers of the cluster (empty: the host left).
    pub async fn set_controllers(&self, urls: &[String]) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(self.sql())?;
        sqlx::query("DELETE FROM cluster_controllers").execute(&mut *tx).await.map_err(self.sql())?;
        for (i, url) in urls.iter().enumerate() {
            sqlx::query("INSERT OR IGNORE INTO cluster_controllers (url, position) VALUES (?, ?)")
                .bind(url)
                .bind(i as i64)
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
        }
        tx.commit().await.map_err(self.sql())?;
        Ok(())
    }

    /// The cluster's CPU baseline the controller last answered, if any.
    pub async fn evc(&self) -> Result<Option<ferry_cluster_api::EvcBaseline>, Error> {
        let row = sqlx::query("SELECT baseline FROM evc WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(self.sql())?;
        let Some(r) = row else { return Ok(None) };
        let text: String = r.try_get("baseline").map_err(self.sql())?;
        serde_json::from_str(&text).map(Some).map_err(|e| Error::Damaged {
            path: self.path.clone(),
            vm: "(evc)".into(),
            reason: e.to_string(),
        })
    }

    /// Records the cluster's CPU baseline, or (`None`) forgets it (the host left).
    pub async fn set_evc(&self, baseline: Option<&ferry_cluster_api::EvcBaseline>) -> Result<(), Error> {
        let query = match baseline {
            Some(b) => sqlx::query("INSERT OR REPLACE INTO evc (id, baseline) VALUES (1, ?)")
                .bind(serde_json::to_string(b).unwrap_or_default()),
            None => sqlx::query("DELETE FROM evc"),
        };
        query.execute(&self.pool).await.map_err(self.sql())?;
        Ok(())
    }

    /// The baseline generation each VM was last powered on under here, by name.
    pub async fn vm_cpuid_generations(&self) -> Result<std::collections::BTreeMap<String, u64>, Error> {
        let rows = sqlx::query("SELECT name, generation FROM vm_cpuid")
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql())?;
        let mut out = std::collections::BTreeMap::new();
        for r in rows {
            out.insert(
                r.try_get("name").map_err(self.sql())?,
                r.try_get::<i64, _>("generation").map_err(self.sql())? as u64,
            );
        }
        Ok(out)
    }

    /// Records VM `name`'s generation, or (`None`) that it has none from this host.
    pub async fn set_vm_cpuid_generation(&self, name: &str, generation: Option<u64>) -> Result<(), Error> {
        let query = match generation {
            Some(g) => sqlx::query("INSERT OR REPLACE INTO vm_cpuid (name, generation) VALUES (?, ?)")
                .bind(name.to_string())
                .bind(g as i64),
            None => sqlx::query("DELETE FROM vm_cpuid WHERE name = ?").bind(name.to_string()),
        };
        query.execute(&self.pool).await.map_err(self.sql())?;
        Ok(())
    }

    /// Writes a migration's record (insert or replace).
    pub async fn put_migration(&self, m: &MigrationRecord) -> Result<(), Error> {
        let mut stored = m.clone();
        stored.progress = None;
        sqlx::query(
            "INSERT OR REPLACE INTO migrations (id, vm, source, destination, role, started_unix_ms, ended_unix_ms,
             outcome, reason_code, downtime_ms, total_ms, bytes, passes, record)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&m.id)
        .bind(&m.vm)
        .bind(&m.source)
        .bind(&m.destination)
        .bind(match m.role {
            MigrationRole::Source => "source",
            MigrationRole::Destination => "destination",
        })
        .bind(m.started_unix_ms as i64)
        .bind(m.ended_unix_ms.map(|t| t as i64))
        .bind(m.outcome.as_str())
        .bind(&m.reason_code)
        .bind(m.downtime_ms)
        .bind(m.total_ms)
        .bind(m.bytes.map(|b| b as i64))
        .bind(m.passes.as_ref().map(|p| p.to_string()))
        .bind(serde_json::to_string(&stored).unwrap_or_default())
        .execute(&self.pool)
        .await
        .map_err(self.sql())?;
        Ok(())
    }

    /// Migration records, newest first: `outcome` filters (`active`, `failed` ...; `failed`
    /// includes `refused`: a migration the checks refused failed too, as in vMotion's failed
    /// list), `id` picks one.
    pub async fn migrations(
        &self,
        outcome: Option<MigrationOutcome>,
        id: Option<&str>,
    ) -> Result<Vec<MigrationRecord>, Error> {
        let rows = sqlx::query(
            "SELECT id, record FROM migrations
             WHERE (?1 IS NULL OR outcome = ?1 OR (?1 = 'failed' AND outcome = 'refused')) AND (?2 IS NULL OR id = ?2)
             ORDER BY started_unix_ms DESC LIMIT 1000",
        )
        .bind(outcome.map(|o| o.as_str()))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            let id: String = r.try_get("id").map_err(self.sql())?;
            let text: String = r.try_get("record").map_err(self.sql())?;
            out.push(serde_json::from_str(&text).map_err(|e| Error::Damaged {
                path: self.path.clone(),
                vm: format!("(migration {id})"),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Records an event (also logged).
    pub async fn event(&self, vm: Option<&str>, kind: &str, message: &str) -> Result<(), Error> {
        sqlx::query("INSERT INTO events (at_unix_ms, vm, kind, message) VALUES (?, ?, ?, ?)")
            .bind(unix_ms() as i64)
            .bind(vm)
            .bind(kind)
            .bind(message)
            .execute(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(())
    }

    /// The last `n` events of `vm`, oldest first.
    pub async fn events(&self, vm: &str, n: u32) -> Result<Vec<ferry_host_api::VmEvent>, Error> {
        let rows =
            sqlx::query("SELECT at_unix_ms, kind, message FROM events WHERE vm = ? ORDER BY id DESC LIMIT ?")
                .bind(vm)
                .bind(n as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(self.sql())?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(ferry_host_api::VmEvent {
                    at_unix_ms: r.try_get::<i64, _>("at_unix_ms")? as u64,
                    kind: r.try_get("kind")?,
                    message: r.try_get("message")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(self.sql())?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rows_round_trip_and_newer_schema_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-db-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("host.db");
        let db = Db::open(&path).await.expect("open");
        let row = VmRow {
            name: "a".into(),
            home: "/ds/a".into(),
            datastore: "ds".into(),
            state: VmState::Crashed,
            pid: None,
            api_socket: None,
            taps: vec!["fy00n0".into()],
            last_exit: Some(ExitInfo {
                code: None,
                signal: Some(9),
                requested: false,
                description: "signal 9".into(),
                at_unix_ms: 1,
            }),
            last_log: vec!["x".into()],
        };
        db.put(&row).await.expect("put");
        db.event(Some("a"), "crashed", "signal 9").await.expect("event");
        drop(db);
        let db = Db::open(&path).await.expect("reopen");
        assert_eq!(db.all().await.expect("all"), vec![row]);
        // The cluster's controllers, in order, replaced as a whole.
        let urls = vec!["https://b:1".to_string(), "https://a:1".to_string()];
        db.set_controllers(&urls).await.expect("controllers");
        assert_eq!(db.controllers().await.expect("controllers"), urls);
        db.set_controllers(&urls[1..]).await.expect("controllers");
        assert_eq!(db.controllers().await.expect("controllers"), urls[1..].to_vec());
        let m = MigrationRecord {
            id: "m-1".into(),
            vm: "a".into(),
            source: "h1".into(),
            destination: "h2".into(),
            role: MigrationRole::Source,
            started_unix_ms: 5,
            ended_unix_ms: Some(9),
            outcome: MigrationOutcome::Completed,
            reason_code: "completed".into(),
            reason: String::new(),
            downtime_ms: Some(1.5),
            total_ms: Some(4.0),
            orchestration_ms: None,
            orchestration: None,
            bytes: Some(10),
            passes: None,
            progress: None,
            reasons: Vec::new(),
            queue_position: None,
        };
        db.put_migration(&m).await.expect("put migration");
        assert_eq!(db.migrations(None, Some("m-1")).await.expect("by id"), vec![m.clone()]);
        assert_eq!(db.migrations(Some(MigrationOutcome::Completed), None).await.expect("done").len(), 1);
        assert!(db.migrations(Some(MigrationOutcome::Failed), None).await.expect("failed").is_empty());
        // A refused one is among the failed ones, with every reason kept.
        let refused = MigrationRecord {
            id: "m-2".into(),
            started_unix_ms: 6,
            outcome: MigrationOutcome::Refused,
            reason_code: "cpu_features".into(),
            reasons: vec![
                ferry_host_api::CheckReason {
                    code: ferry_host_api::CheckCode::CpuFeatures,
                    message: "avx2".into(),
                },
                ferry_host_api::CheckReason {
                    code: ferry_host_api::CheckCode::NotEnoughMemory,
                    message: "1 MiB".into(),
                },
            ],
            ..m.clone()
        };
        db.put_migration(&refused).await.expect("put refused");
        assert_eq!(db.migrations(Some(MigrationOutcome::Failed), None).await.expect("failed"), vec![refused]);
        let events = db.events("a", 5).await.expect("events");
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].kind.as_str(), events[0].message.as_str()), ("crashed", "signal 9"));
        sqlx::query("INSERT INTO schema_version VALUES (99, 0)").execute(&db.pool).await.expect("bump");
        drop(db);
        let e = Db::open(&path).await.expect_err("too new").to_string();
        assert!(e.contains("schema version 99, newer than this Ferry's 5"), "{e}");
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}
