//! The migration queue (`migration_queue`, schema version 3) and the inventory's move of a
//! migrated VM. A queued migration also has its `migrations` row (outcome `queued`, with an
//! event `queued`), so the history lists it; the queue row keeps its order and its request.

use ferry_host_api::{MigrationOutcome, MigrationRecord};
use sqlx::Row;

use super::{Error, Store};

/// A migration waiting in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    /// Its id (the one the hosts will use).
    pub id: String,
    /// Its place, from 1.
    pub position: u32,
    /// The VM.
    pub vm: String,
    /// The host it leaves.
    pub source: String,
    /// The host it goes to.
    pub destination: String,
    /// The request (`ferry_cluster_api::MigrateRequest`, JSON).
    pub request: String,
    /// When it was queued, ms since the Unix epoch.
    pub queued_unix_ms: u64,
}

impl Store {
    /// Puts `record` (outcome `queued`) at the end of the queue with `request` (JSON); its
    /// position (from 1).
    pub async fn enqueue(&self, record: &MigrationRecord, request: &str, now_ms: u64) -> Result<u32, Error> {
        let damaged = |reason: String| Error::Damaged { table: "migrations", key: record.id.clone(), reason };
        let json = serde_json::to_string(record).map_err(|e| damaged(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(self.sql())?;
        sqlx::query(
            "INSERT INTO migration_queue (id, seq, vm, source, destination, request, queued_unix_ms)
             SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5, $6 FROM migration_queue",
        )
        .bind(&record.id)
        .bind(&record.vm)
        .bind(&record.source)
        .bind(&record.destination)
        .bind(request)
        .bind(now_ms as i64)
        .execute(&mut *tx)
        .await
        .map_err(self.sql())?;
        let row = sqlx::query("SELECT COUNT(*) AS n FROM migration_queue")
            .fetch_one(&mut *tx)
            .await
            .map_err(self.sql())?;
        let position = row.try_get::<i64, _>("n").map_err(self.sql())? as u32;
        sqlx::query(
            "INSERT INTO migrations (id, vm, source, destination, started_unix_ms, ended_unix_ms, outcome, reason_code, record)
             VALUES ($1, $2, $3, $4, $5, NULL, $6, '', $7)",
        )
        .bind(&record.id)
        .bind(&record.vm)
        .bind(&record.source)
        .bind(&record.destination)
        .bind(now_ms as i64)
        .bind(MigrationOutcome::Queued.as_str())
        .bind(json)
        .execute(&mut *tx)
        .await
        .map_err(self.sql())?;
        sqlx::query(
            "INSERT INTO migration_events (migration_id, seq, at_unix_ms, kind, message) VALUES ($1, 1, $2, 'queued', $3)",
        )
        .bind(&record.id)
        .bind(now_ms as i64)
        .bind(format!(
            "{} {} -> {}: queued, position {position}",
            record.vm, record.source, record.destination
        ))
        .execute(&mut *tx)
        .await
        .map_err(self.sql())?;
        tx.commit().await.map_err(self.sql())?;
        Ok(position)
    }

    /// The queue, oldest first, with positions.
    pub async fn queue(&self) -> Result<Vec<Queued>, Error> {
        let rows = sqlx::query(
            "SELECT id, vm, source, destination, request, queued_unix_ms FROM migration_queue ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            out.push(Queued {
                id: r.try_get("id").map_err(self.sql())?,
                position: i as u32 + 1,
                vm: r.try_get("vm").map_err(self.sql())?,
                source: r.try_get("source").map_err(self.sql())?,
                destination: r.try_get("destination").map_err(self.sql())?,
                request: r.try_get("request").map_err(self.sql())?,
                queued_unix_ms: r.try_get::<i64, _>("queued_unix_ms").map_err(self.sql())? as u64,
            });
        }
        Ok(out)
    }

    /// Takes migration `id` out of the queue; whether it was there.
    pub async fn dequeue(&self, id: &str) -> Result<bool, Error> {
        let done = sqlx::query("DELETE FROM migration_queue WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(done.rows_affected() > 0)
    }

    /// A migration completed: VM `vm`'s report moves from host `from` to host `to` at once
    /// (the destination's next heartbeat confirms or corrects it; the source's next one no
    /// longer has it). Nothing happens if `from` no longer reports it (a heartbeat came
    /// first); whether a row changed.
    pub async fn move_vm(&self, vm: &str, from: &str, to: &str, now_ms: u64) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await.map_err(self.sql())?;
        // A write first: the transaction holds the write lock from its start (SQLite would
        // refuse at once to upgrade a read transaction that another writer overtook).
        sqlx::query("UPDATE host_vms SET reported_unix_ms = reported_unix_ms WHERE name = $1 AND host = $2")
            .bind(vm)
            .bind(from)
            .execute(&mut *tx)
            .await
            .map_err(self.sql())?;
        let known = sqlx::query("SELECT name FROM host_vms WHERE name = $1 AND host = $2")
            .bind(vm)
            .bind(from)
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.sql())?;
        let known_to = sqlx::query("SELECT name FROM host_vms WHERE name = $1 AND host = $2")
            .bind(vm)
            .bind(to)
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.sql())?;
        if known.is_none() {
            tx.commit().await.map_err(self.sql())?;
            return Ok(false);
        }
        if known_to.is_some() {
            // The destination reported it already: the source's report is stale.
            sqlx::query("DELETE FROM host_vms WHERE name = $1 AND host = $2")
                .bind(vm)
                .bind(from)
                .execute(&mut *tx)
                .await
                .map_err(self.sql())?;
            tx.commit().await.map_err(self.sql())?;
            return Ok(true);
        }
        sqlx::query(
            "UPDATE host_vms SET host = $1, state = 'running', reported_unix_ms = $2 WHERE name = $3 AND host = $4",
        )
        .bind(to)
        .bind(now_ms as i64)
        .bind(vm)
        .bind(from)
        .execute(&mut *tx)
        .await
        .map_err(self.sql())?;
        tx.commit().await.map_err(self.sql())?;
        Ok(true)
    }

    /// A migration recorded `unknown` (its hosts went silent: `host_lost`) takes the outcome a
    /// host reports now (`m`: `active` again, or how it ended), with an event `reconciled`.
    /// Nothing happens unless its row is `unknown` (an end recorded otherwise is kept) or when
    /// `m` is itself `queued` or `unknown`; whether it changed.
    pub async fn reconcile_unknown(&self, m: &MigrationRecord, now_ms: u64) -> Result<bool, Error> {
        if matches!(m.outcome, MigrationOutcome::Queued | MigrationOutcome::Unknown) {
            return Ok(false);
        }
        let damaged = |reason: String| Error::Damaged { table: "migrations", key: m.id.clone(), reason };
        let record = serde_json::to_string(m).map_err(|e| damaged(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(self.sql())?;
        // The write first: on SQLite the transaction holds the write lock from its start.
        let done = sqlx::query(
            "UPDATE migrations SET ended_unix_ms = $2, outcome = $3, reason_code = $4, record = $5
             WHERE id = $1 AND outcome = $6",
        )
        .bind(&m.id)
        .bind(m.ended_unix_ms.map(|t| t as i64))
        .bind(m.outcome.as_str())
        .bind(&m.reason_code)
        .bind(record)
        .bind(MigrationOutcome::Unknown.as_str())
        .execute(&mut *tx)
        .await
        .map_err(self.sql())?;
        if done.rows_affected() == 0 {
            tx.commit().await.map_err(self.sql())?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO migration_events (migration_id, seq, at_unix_ms, kind, message)
             SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, 'reconciled', $3 FROM migration_events WHERE migration_id = $1",
        )
        .bind(&m.id)
        .bind(now_ms as i64)
        .bind(format!(
            "a host answered again: {} ({}) from host {}'s history",
            m.outcome.as_str(),
            m.reason_code,
            match m.role {
                ferry_host_api::MigrationRole::Source => &m.source,
                ferry_host_api::MigrationRole::Destination => &m.destination,
            }
        ))
        .execute(&mut *tx)
        .await
        .map_err(self.sql())?;
        tx.commit().await.map_err(self.sql())?;
        Ok(true)
    }
}
