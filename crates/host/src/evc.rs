//! EVC on a host: the cluster's CPU baseline as the controller's heartbeat answers last gave
//! it (kept in the database, so it holds across a restart), applied to every VM this host
//! powers on (a fresh start; a resume from suspend and a VM received by migration keep their
//! CPUID): the VMM is given `--cpu-hide` = the features this host offers beyond the baseline
//! (plus `[cpu] hide` and the VM's own `cpu_hide`, as before). The generation each VM was
//! powered on under is recorded and reported in the VM list (`cpuid_generation`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use ferry_cluster_api::EvcBaseline;

use crate::db::Db;

/// The baseline and the VMs' generations (a cache of the database).
#[derive(Debug, Default)]
pub struct Evc {
    baseline: Mutex<Option<EvcBaseline>>,
    vms: Mutex<BTreeMap<String, u64>>,
}

/// What a fresh start gets from the baseline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartCpuid {
    /// Features to hide beyond `[cpu] hide` and the VM's own.
    pub hide: Vec<String>,
    /// The generation (none outside a cluster with a baseline).
    pub generation: Option<u64>,
}

/// The features of `offered` beyond `baseline` that `--cpu-hide` can hide, sorted. A feature
/// bit Ferry has no name for cannot be hidden; it is left (and logged).
pub fn to_hide(offered: &[String], baseline: &[String]) -> Vec<String> {
    let mut out: Vec<String> = offered
        .iter()
        .filter(|f| !baseline.contains(f))
        .filter(|f| match ferry_arch::cpuid::parse_feature_name(f) {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!("EVC: feature {f} is beyond the cluster's baseline but cannot be hidden");
                false
            }
        })
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a VM in `state` is powered on (a VMM runs it, or it is suspended: its checkpoint
/// keeps its CPUID).
pub fn powered_on(state: ferry_host_api::VmState) -> bool {
    state.has_process() || state == ferry_host_api::VmState::Suspended
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Evc {
    /// Loads the baseline and the generations from the database.
    pub async fn load(db: &Db) -> Result<Evc, crate::db::Error> {
        Ok(Evc { baseline: Mutex::new(db.evc().await?), vms: Mutex::new(db.vm_cpuid_generations().await?) })
    }

    /// The baseline now.
    pub fn baseline(&self) -> Option<EvcBaseline> {
        lock(&self.baseline).clone()
    }

    /// Keeps the controller's baseline (`None`: the host left its cluster); written to the
    /// database when it changed.
    pub async fn set_baseline(
        &self,
        db: &Db,
        baseline: Option<&EvcBaseline>,
    ) -> Result<(), crate::db::Error> {
        if lock(&self.baseline).as_ref() == baseline {
            return Ok(());
        }
        db.set_evc(baseline).await?;
        match baseline {
            Some(b) => {
                tracing::info!("EVC baseline generation {} ({} features)", b.generation, b.features.len())
            }
            None => tracing::info!("EVC baseline forgotten (left the cluster)"),
        }
        *lock(&self.baseline) = baseline.cloned();
        Ok(())
    }

    /// What a fresh start on a host offering `offered` gets.
    pub fn for_start(&self, offered: &[String]) -> StartCpuid {
        match &*lock(&self.baseline) {
            Some(b) => StartCpuid { hide: to_hide(offered, &b.features), generation: Some(b.generation) },
            None => StartCpuid::default(),
        }
    }

    /// Records the generation VM `name` was powered on under here (`None`: none known, as
    /// for a VM received by migration).
    pub async fn record(&self, db: &Db, name: &str, generation: Option<u64>) -> Result<(), crate::db::Error> {
        db.set_vm_cpuid_generation(name, generation).await?;
        let mut vms = lock(&self.vms);
        match generation {
            Some(g) => vms.insert(name.to_string(), g),
            None => vms.remove(name),
        };
        Ok(())
    }

    /// VM `name`'s generation, if this host powered it on under one.
    pub fn generation(&self, name: &str) -> Option<u64> {
        lock(&self.vms).get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hides_what_is_beyond_the_baseline() {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_string()).collect::<Vec<_>>();
        assert_eq!(
            super::to_hide(&v(&["sse4.2", "lahf_lm", "avx2"]), &v(&["sse4.2"])),
            v(&["avx2", "lahf_lm"])
        );
        assert!(super::to_hide(&v(&["sse4.2"]), &v(&["sse4.2", "avx2"])).is_empty());
        // A bit without a name cannot be given to --cpu-hide.
        assert!(super::to_hide(&v(&["leaf 0x1 ecx bit 99"]), &[]).is_empty());
    }
}
