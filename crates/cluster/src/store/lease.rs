//! The store's high-availability tables (schema version 4): the leader lease (one row,
//! `controller_lease`) and the registry of controllers (`controllers`). Every time in them is
//! the DATABASE's clock (PostgreSQL `clock_timestamp()`, SQLite `julianday('now')`), never a
//! controller's: two controllers whose clocks disagree still agree on when the lease expires.
//! The statements are the same on both back ends but for that one expression.
//!
//! Taking the lease is one conditional `UPDATE ... WHERE expires <= now`: of two standbys
//! racing for an expired lease, the second finds it unexpired (PostgreSQL re-checks the
//! condition on the row the first one updated; SQLite runs one writer at a time) and takes
//! nothing. Renewing matches the holder's name and term and an unexpired lease only.

use ferry_cluster_api::{ControllerSeen, LeaseInfo};
use sqlx::Row;

use super::{Backend, Error, Store};

/// The database's clock, ms since the Unix epoch, as an SQL expression of `backend`.
fn now_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

/// The lease and the database's clock when it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRead {
    /// The lease row.
    pub lease: LeaseInfo,
    /// The database's clock, ms since the Unix epoch.
    pub now_unix_ms: u64,
}

impl Store {
    fn lease_sql(&self, template: &str) -> String {
        template.replace("{NOW}", now_sql(self.backend))
    }

    /// Takes the lease for `holder` (at `url`) for `ttl_ms` if it expired (or was released):
    /// the new term, or `None` if another controller holds it.
    pub async fn lease_acquire(&self, holder: &str, url: &str, ttl_ms: u64) -> Result<Option<u64>, Error> {
        let row = sqlx::query(&self.lease_sql(
            "UPDATE controller_lease SET holder = $1, holder_url = $2, term = term + 1,
                 acquired_unix_ms = {NOW}, renewed_unix_ms = {NOW}, expires_unix_ms = {NOW} + $3
             WHERE id = 1 AND expires_unix_ms <= {NOW}
             RETURNING term",
        ))
        .bind(holder)
        .bind(url)
        .bind(ttl_ms as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(self.sql())?;
        match row {
            Some(r) => Ok(Some(r.try_get::<i64, _>("term").map_err(self.sql())? as u64)),
            None => Ok(None),
        }
    }

    /// Renews `holder`'s lease of `term` for `ttl_ms` from now: `false` if it is no longer
    /// `holder`'s (another took it, or it expired).
    pub async fn lease_renew(&self, holder: &str, term: u64, ttl_ms: u64) -> Result<bool, Error> {
        let done = sqlx::query(&self.lease_sql(
            "UPDATE controller_lease SET renewed_unix_ms = {NOW}, expires_unix_ms = {NOW} + $3
             WHERE id = 1 AND holder = $1 AND term = $2 AND expires_unix_ms > {NOW}",
        ))
        .bind(holder)
        .bind(term as i64)
        .bind(ttl_ms as i64)
        .execute(&self.pool)
        .await
        .map_err(self.sql())?;
        Ok(done.rows_affected() > 0)
    }

    /// Releases `holder`'s lease of `term` (a controller that stops): a standby may take it at
    /// once. `false` if it was not `holder`'s.
    pub async fn lease_release(&self, holder: &str, term: u64) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE controller_lease SET expires_unix_ms = 0 WHERE id = 1 AND holder = $1 AND term = $2",
        )
        .bind(holder)
        .bind(term as i64)
        .execute(&self.pool)
        .await
        .map_err(self.sql())?;
        Ok(done.rows_affected() > 0)
    }

    /// The lease, and the database's clock.
    pub async fn lease(&self) -> Result<LeaseRead, Error> {
        let row = sqlx::query(&self.lease_sql(
            "SELECT holder, holder_url, term, acquired_unix_ms, renewed_unix_ms, expires_unix_ms, {NOW} AS now_ms
             FROM controller_lease WHERE id = 1",
        ))
        .fetch_optional(&self.pool)
        .await
        .map_err(self.sql())?
        .ok_or_else(|| Error::Damaged {
            table: "controller_lease",
            key: "1".into(),
            reason: "the lease row is missing".into(),
        })?;
        let ms = |name: &str| -> Result<u64, Error> {
            Ok(row.try_get::<i64, _>(name).map_err(self.sql())?.max(0) as u64)
        };
        let now = ms("now_ms")?;
        let expires = ms("expires_unix_ms")?;
        Ok(LeaseRead {
            lease: LeaseInfo {
                holder: row.try_get("holder").map_err(self.sql())?,
                holder_url: row.try_get("holder_url").map_err(self.sql())?,
                term: ms("term")?,
                acquired_unix_ms: ms("acquired_unix_ms")?,
                renewed_unix_ms: ms("renewed_unix_ms")?,
                expires_unix_ms: expires,
                expired: expires <= now,
            },
            now_unix_ms: now,
        })
    }

    /// Registers controller `name` at `url` (`started`: it has just started), or renews its
    /// registration.
    pub async fn controller_seen(&self, name: &str, url: &str, started: bool) -> Result<(), Error> {
        let statement = if started {
            "INSERT INTO controllers (name, url, started_unix_ms, last_seen_unix_ms) VALUES ($1, $2, {NOW}, {NOW})
             ON CONFLICT (name) DO UPDATE SET url = excluded.url, started_unix_ms = excluded.started_unix_ms,
                 last_seen_unix_ms = excluded.last_seen_unix_ms"
        } else {
            "INSERT INTO controllers (name, url, started_unix_ms, last_seen_unix_ms) VALUES ($1, $2, {NOW}, {NOW})
             ON CONFLICT (name) DO UPDATE SET url = excluded.url, last_seen_unix_ms = excluded.last_seen_unix_ms"
        };
        sqlx::query(&self.lease_sql(statement))
            .bind(name)
            .bind(url)
            .execute(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(())
    }

    /// Every registered controller, by name; `active` marks the one holding the lease in
    /// `lease` unless it expired.
    pub async fn controllers(&self, lease: &LeaseRead) -> Result<Vec<ControllerSeen>, Error> {
        let rows = sqlx::query(
            "SELECT name, url, started_unix_ms, last_seen_unix_ms FROM controllers ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            let name: String = r.try_get("name").map_err(self.sql())?;
            let seen = r.try_get::<i64, _>("last_seen_unix_ms").map_err(self.sql())?.max(0) as u64;
            out.push(ControllerSeen {
                active: !lease.lease.expired && lease.lease.holder == name,
                url: r.try_get("url").map_err(self.sql())?,
                started_unix_ms: r.try_get::<i64, _>("started_unix_ms").map_err(self.sql())?.max(0) as u64,
                last_seen_unix_ms: seen,
                age_ms: lease.now_unix_ms.saturating_sub(seen),
                name,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::on_both;

    #[test]
    fn one_holder_at_a_time_and_every_takeover_raises_the_term() {
        on_both(|store| async move {
            let lease = store.lease().await.expect("lease");
            assert!(
                lease.lease.expired && lease.lease.holder.is_empty() && lease.lease.term == 0,
                "{lease:?}"
            );
            let t1 = store.lease_acquire("a", "https://a:1", 60_000).await.expect("acquire");
            assert_eq!(t1, Some(1));
            // Held: b takes nothing, a renews.
            assert_eq!(store.lease_acquire("b", "https://b:1", 60_000).await.expect("acquire"), None);
            assert!(store.lease_renew("a", 1, 60_000).await.expect("renew"));
            assert!(!store.lease_renew("b", 1, 60_000).await.expect("renew"), "not b's");
            assert!(!store.lease_renew("a", 2, 60_000).await.expect("renew"), "not that term");
            let read = store.lease().await.expect("lease");
            assert_eq!((read.lease.holder.as_str(), read.lease.term, read.lease.expired), ("a", 1, false));
            assert!(read.lease.expires_unix_ms >= read.now_unix_ms + 50_000, "{read:?}");
            // Released: b takes it at once, term 2; a can no longer renew nor release it.
            assert!(store.lease_release("a", 1).await.expect("release"));
            assert_eq!(store.lease_acquire("b", "https://b:1", 60_000).await.expect("acquire"), Some(2));
            assert!(!store.lease_renew("a", 1, 60_000).await.expect("renew"));
            assert!(!store.lease_release("a", 1).await.expect("release"));
            assert_eq!(store.lease().await.expect("lease").lease.holder_url, "https://b:1");
        });
    }

    #[test]
    fn an_expired_lease_is_taken_over_and_cannot_be_renewed() {
        on_both(|store| async move {
            assert_eq!(store.lease_acquire("a", "https://a:1", 200).await.expect("acquire"), Some(1));
            // Whatever the machine's speed, 400 ms after a 200 ms lease was set it expired.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(store.lease().await.expect("lease").lease.expired);
            assert!(!store.lease_renew("a", 1, 200).await.expect("renew"), "expired");
            assert_eq!(store.lease_acquire("b", "https://b:1", 60_000).await.expect("acquire"), Some(2));
        });
    }

    #[test]
    fn controllers_register_and_the_holder_is_marked_active() {
        on_both(|store| async move {
            store.controller_seen("a", "https://a:1", true).await.expect("a");
            store.controller_seen("b", "https://b:1", true).await.expect("b");
            let started = store.lease().await.expect("lease");
            let list = store.controllers(&started).await.expect("list");
            assert_eq!(list.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
            assert!(list.iter().all(|c| !c.active), "nobody holds the lease: {list:?}");
            let a_started = list[0].started_unix_ms;
            store.lease_acquire("b", "https://b:1", 60_000).await.expect("acquire");
            store.controller_seen("a", "https://a:2", false).await.expect("a again");
            let read = store.lease().await.expect("lease");
            let list = store.controllers(&read).await.expect("list");
            assert_eq!(
                (list[0].url.as_str(), list[0].started_unix_ms, list[0].active),
                ("https://a:2", a_started, false)
            );
            assert!(list[1].active, "{list:?}");
        });
    }
}
