//! The store's EVC tables (schema version 2): the baselines (`evc_generations`, append-only,
//! the newest is current), the generation each VM was powered on under (`evc_vms`) and the
//! hosts refused at join (`evc_refused`).

use std::collections::BTreeMap;

use ferry_cluster_api::EvcBaseline;
use sqlx::Row;

use super::{Error, Store};

/// A host refused at join: what it offers and what it lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedRow {
    /// The host.
    pub host: String,
    /// Its offered features.
    pub features: Vec<String>,
    /// The baseline features it lacked.
    pub lacking: Vec<String>,
    /// When, ms since the Unix epoch.
    pub at_unix_ms: u64,
}

impl Store {
    fn features_of(&self, table: &'static str, key: &str, json: &str) -> Result<Vec<String>, Error> {
        serde_json::from_str(json).map_err(|e| Error::Damaged {
            table,
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// Every baseline the cluster had, oldest first (the last is current).
    pub async fn evc_generations(&self) -> Result<Vec<EvcBaseline>, Error> {
        let rows = sqlx::query(
            "SELECT generation, features, set_by, set_unix_ms FROM evc_generations ORDER BY generation",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            let generation = r.try_get::<i64, _>("generation").map_err(self.sql())? as u64;
            let features: String = r.try_get("features").map_err(self.sql())?;
            out.push(EvcBaseline {
                generation,
                features: self.features_of("evc_generations", &generation.to_string(), &features)?,
                set_by: r.try_get("set_by").map_err(self.sql())?,
                set_unix_ms: r.try_get::<i64, _>("set_unix_ms").map_err(self.sql())? as u64,
            });
        }
        Ok(out)
    }

    /// The current baseline, if any.
    pub async fn evc_baseline(&self) -> Result<Option<EvcBaseline>, Error> {
        Ok(self.evc_generations().await?.pop())
    }

    /// Records baseline `generation` (`features` sorted) unless that generation exists: `false`
    /// when it did (someone else changed the baseline meanwhile; re-read and retry).
    pub async fn evc_put(&self, baseline: &EvcBaseline) -> Result<bool, Error> {
        let features = serde_json::to_string(&baseline.features).map_err(|e| Error::Damaged {
            table: "evc_generations",
            key: baseline.generation.to_string(),
            reason: e.to_string(),
        })?;
        let done = sqlx::query(
            "INSERT INTO evc_generations (generation, features, set_by, set_unix_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (generation) DO NOTHING",
        )
        .bind(baseline.generation as i64)
        .bind(features)
        .bind(&baseline.set_by)
        .bind(baseline.set_unix_ms as i64)
        .execute(&self.pool)
        .await
        .map_err(self.sql())?;
        Ok(done.rows_affected() > 0)
    }

    /// Records the generations `host` reports for its powered-on VMs: one statement per
    /// 200 VMs (a heartbeat's 16 VMs were 16 statements and a transaction).
    pub async fn evc_note_vms(&self, host: &str, vms: &[(String, u64)], now_ms: u64) -> Result<(), Error> {
        // A VM named twice in one statement would make the upsert touch a row twice.
        let mut vms: Vec<&(String, u64)> = vms.iter().collect();
        vms.sort_by(|a, b| a.0.cmp(&b.0));
        vms.dedup_by(|a, b| a.0 == b.0);
        for chunk in vms.chunks(200) {
            let values: Vec<String> =
                (0..chunk.len()).map(|i| format!("(${}, ${}, $1, $2)", 3 + 2 * i, 4 + 2 * i)).collect();
            let text = format!(
                "INSERT INTO evc_vms (vm, generation, host, reported_unix_ms) VALUES {}
                 ON CONFLICT (vm) DO UPDATE SET generation = excluded.generation, host = excluded.host,
                     reported_unix_ms = excluded.reported_unix_ms",
                values.join(", ")
            );
            let mut query = sqlx::query(&text).bind(host).bind(now_ms as i64);
            for (vm, generation) in chunk {
                query = query.bind(vm).bind(*generation as i64);
            }
            query.execute(&self.pool).await.map_err(self.sql())?;
        }
        Ok(())
    }

    /// The last generation reported for each VM, by name.
    pub async fn evc_vm_generations(&self) -> Result<BTreeMap<String, u64>, Error> {
        let rows = sqlx::query("SELECT vm, generation FROM evc_vms")
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql())?;
        let mut out = BTreeMap::new();
        for r in rows {
            out.insert(
                r.try_get("vm").map_err(self.sql())?,
                r.try_get::<i64, _>("generation").map_err(self.sql())? as u64,
            );
        }
        Ok(out)
    }

    /// Records that `host` (offering `features`) was refused for lacking `lacking`.
    pub async fn evc_refuse(
        &self,
        host: &str,
        features: &[String],
        lacking: &[String],
        now_ms: u64,
    ) -> Result<(), Error> {
        let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        sqlx::query(
            "INSERT INTO evc_refused (host, features, lacking, at_unix_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (host) DO UPDATE SET features = excluded.features, lacking = excluded.lacking,
                 at_unix_ms = excluded.at_unix_ms",
        )
        .bind(host)
        .bind(json(features))
        .bind(json(lacking))
        .bind(now_ms as i64)
        .execute(&self.pool)
        .await
        .map_err(self.sql())?;
        Ok(())
    }

    /// Forgets `host`'s refusal (it joined).
    pub async fn evc_unrefuse(&self, host: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM evc_refused WHERE host = $1")
            .bind(host)
            .execute(&self.pool)
            .await
            .map_err(self.sql())?;
        Ok(())
    }

    /// The hosts refused at join, by name.
    pub async fn evc_refused(&self) -> Result<Vec<RefusedRow>, Error> {
        let rows = sqlx::query("SELECT host, features, lacking, at_unix_ms FROM evc_refused ORDER BY host")
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for r in rows {
            let host: String = r.try_get("host").map_err(self.sql())?;
            let features: String = r.try_get("features").map_err(self.sql())?;
            let lacking: String = r.try_get("lacking").map_err(self.sql())?;
            out.push(RefusedRow {
                features: self.features_of("evc_refused", &host, &features)?,
                lacking: self.features_of("evc_refused", &host, &lacking)?,
                at_unix_ms: r.try_get::<i64, _>("at_unix_ms").map_err(self.sql())? as u64,
                host,
            });
        }
        Ok(out)
    }
}
