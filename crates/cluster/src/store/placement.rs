//! What placement reads from the store beyond the hosts' rows: the memory held on each host
//! by migrations to it.

use std::collections::BTreeMap;

use sqlx::Row;

use super::{Error, Store};

/// A migration that ended this long before its destination's last heartbeat is in that
/// heartbeat's report (the host's inventory is taken just before it is sent).
const REPORT_MARGIN_MS: i64 = 1000;

/// A completed migration older than this is in its destination's report or the destination
/// stopped reporting (then it is `not_responding` and no candidate anyway).
const RECENT_MS: i64 = 10 * 60 * 1000;

impl Store {
    /// The memory of the VMs of migrations to each host (by destination name, bytes) that
    /// its last report may not count yet: outcome `active` or `queued`, or completed after
    /// its last heartbeat (less `REPORT_MARGIN_MS`) and within `RECENT_MS` of `now_ms`.
    /// A VM's memory is what its hosts report (the largest, if several do); a migration of a
    /// VM no host reports counts 0. One query, whatever the cluster's size: the migrations
    /// are found by outcome and end time (index of schema 6), each VM by its key.
    pub async fn reserved_by_destination(&self, now_ms: u64) -> Result<BTreeMap<String, u64>, Error> {
        let rows = sqlx::query(
            "SELECT m.destination AS host,
                    CAST(SUM(COALESCE((SELECT MAX(v.memory_mib) FROM host_vms v WHERE v.name = m.vm), 0)) AS BIGINT) AS mib
             FROM migrations m
             LEFT JOIN hosts h ON h.name = m.destination
             WHERE m.outcome IN ('active', 'queued')
                OR (m.outcome = 'completed' AND m.ended_unix_ms > $2
                    AND m.ended_unix_ms + $1 > COALESCE(h.last_seen_unix_ms, 0))
             GROUP BY m.destination",
        )
        .bind(REPORT_MARGIN_MS)
        .bind(now_ms as i64 - RECENT_MS)
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = BTreeMap::new();
        for r in rows {
            let host: String = r.try_get("host").map_err(self.sql())?;
            let mib: i64 = r.try_get("mib").map_err(self.sql())?;
            out.insert(host, (mib.max(0) as u64) << 20);
        }
        Ok(out)
    }
}
