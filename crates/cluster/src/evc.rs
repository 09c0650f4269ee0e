//! EVC: the cluster's CPU baseline. The first host that joins with KVM's CPUID sets it (its
//! offered features, after its `[cpu] hide`); the operator lowers or raises it
//! (`POST /evc`). Each change is a new generation. Every heartbeat's answer carries it; the
//! hosts hide from every VM they power on the features they offer beyond it, and report the
//! generation each VM was powered on under (a VM keeps its CPUID until it is powered off).
//! A host lacking a baseline feature is refused at join ([`ErrorCode::CpuBelowBaseline`]),
//! and the baseline cannot be raised above what a host of the cluster offers.
//!
//! The arithmetic is in plain functions ([`lacking`], [`extra`], [`apply`]) tested below.

use std::collections::{BTreeMap, BTreeSet};

use ferry_cluster_api::{
    ErrorCode, EvcBaseline, EvcChanged, EvcHost, EvcRefused, EvcReport, EvcSet, EvcVm, HostState,
};
use ferry_host_api::{HostInfo, VmState};

use crate::server::{Controller, Failure};
use crate::store::unix_ms;

/// Errors of a baseline change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A name is not a CPU feature Ferry knows.
    #[error(transparent)]
    Unknown(#[from] ferry_arch::cpuid::UnknownFeature),
    /// Nothing asked.
    #[error("nothing to change: give --hide F[,F...], --add F[,F...] or --baseline-of HOST")]
    Empty,
    /// A feature is both removed and added.
    #[error("feature {0} is both hidden and added")]
    Both(String),
}

/// Features of `baseline` that `offered` lacks, sorted.
pub fn lacking(offered: &[String], baseline: &[String]) -> Vec<String> {
    let offered: BTreeSet<&String> = offered.iter().collect();
    let out: BTreeSet<String> = baseline.iter().filter(|f| !offered.contains(f)).cloned().collect();
    out.into_iter().collect()
}

/// Features `offered` has beyond `baseline`, sorted: what a host hides from the VMs it powers on.
pub fn extra(offered: &[String], baseline: &[String]) -> Vec<String> {
    lacking(baseline, offered)
}

/// The baseline `current` changed by `set` (`of_host`: the features of `set.baseline_of`),
/// sorted; names checked.
pub fn apply(current: &[String], set: &EvcSet, of_host: Option<&[String]>) -> Result<Vec<String>, Error> {
    if set.hide.is_empty() && set.add.is_empty() && set.baseline_of.is_none() {
        return Err(Error::Empty);
    }
    let hide: BTreeSet<String> =
        set.hide.iter().map(|f| ferry_arch::cpuid::parse_feature_name(f)).collect::<Result<_, _>>()?;
    let add: BTreeSet<String> =
        set.add.iter().map(|f| ferry_arch::cpuid::parse_feature_name(f)).collect::<Result<_, _>>()?;
    if let Some(f) = hide.intersection(&add).next() {
        return Err(Error::Both(f.clone()));
    }
    let mut out: BTreeSet<String> = current.iter().cloned().collect();
    if let Some(of) = of_host {
        let of: BTreeSet<&String> = of.iter().collect();
        out.retain(|f| of.contains(f));
    }
    out.retain(|f| !hide.contains(f));
    out.extend(add);
    Ok(out.into_iter().collect())
}

/// Whether a VM in `state` is powered on for EVC: a VMM runs it, or it is suspended (its
/// checkpoint keeps its CPUID; a resume restores it).
pub fn powered_on(state: VmState) -> bool {
    state.has_process() || state == VmState::Suspended
}

/// The features KVM offers on a host, from its report (`None`: it could not ask KVM).
fn offered(info: &HostInfo) -> Option<&[String]> {
    info.cpu.kvm.as_ref().map(|k| k.features.as_slice())
}

/// The powered-on VMs of the cluster with their generation (by name): the generation their
/// host reports, else the last one recorded (a VM that moved keeps its CPUID).
async fn vms(c: &Controller, baseline: Option<&EvcBaseline>) -> Result<Vec<EvcVm>, Failure> {
    let generations: BTreeMap<u64, Vec<String>> =
        c.store.evc_generations().await?.into_iter().map(|b| (b.generation, b.features)).collect();
    let recorded = c.store.evc_vm_generations().await?;
    let mut out: BTreeMap<String, EvcVm> = BTreeMap::new();
    for host in c.store.hosts().await? {
        for v in host.info.vms.iter().filter(|v| powered_on(v.state)) {
            let generation = v.cpuid_generation.or_else(|| recorded.get(&v.name).copied());
            let above = match (generation.and_then(|g| generations.get(&g)), baseline) {
                (Some(features), Some(b)) => extra(features, &b.features),
                _ => Vec::new(),
            };
            let vm = EvcVm {
                name: v.name.clone(),
                host: host.name.clone(),
                state: v.state.as_str().to_string(),
                generation,
                current: generation.is_some() && generation == baseline.map(|b| b.generation),
                above_baseline: above,
            };
            // A VM between two hosts' reports: the one with a running VMM wins.
            match out.get(&v.name) {
                Some(known) if known.state == VmState::Running.as_str() => {}
                _ => {
                    out.insert(v.name.clone(), vm);
                }
            }
        }
    }
    Ok(out.into_values().collect())
}

/// `GET /evc`.
pub async fn report(c: &Controller) -> Result<EvcReport, Failure> {
    let baseline = c.store.evc_baseline().await?;
    let mut hosts = Vec::new();
    for h in c.store.hosts().await? {
        let features = offered(&h.info);
        let (extra, lacking) = match (features, &baseline) {
            (Some(f), Some(b)) => (extra(f, &b.features), lacking(f, &b.features)),
            _ => (Vec::new(), Vec::new()),
        };
        hosts.push(EvcHost { name: h.name, state: h.state, cpuid_known: features.is_some(), extra, lacking });
    }
    let joined: BTreeSet<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let refused = c
        .store
        .evc_refused()
        .await?
        .into_iter()
        .filter(|r| !joined.contains(&r.host))
        .map(|r| EvcRefused { name: r.host, lacking: r.lacking, at_unix_ms: r.at_unix_ms })
        .collect();
    let vms = vms(c, baseline.as_ref()).await?;
    Ok(EvcReport { baseline, hosts, vms, refused })
}

/// The part of a heartbeat that is EVC's, before it is recorded: sets the first baseline,
/// refuses a host that lacks baseline features (recording what it offers, for
/// `--baseline-of`), records the VMs' generations. Answers the baseline for the
/// acknowledgement.
pub async fn heartbeat(c: &Controller, host: &str, info: &HostInfo) -> Result<Option<EvcBaseline>, Failure> {
    let Some(features) = offered(info) else {
        // A host that cannot ask KVM runs no VM; nothing to compare.
        return Ok(c.store.evc_baseline().await?);
    };
    let baseline = match c.store.evc_baseline().await? {
        Some(b) => b,
        None => {
            let mut sorted = features.to_vec();
            sorted.sort();
            sorted.dedup();
            let first = EvcBaseline {
                generation: 1,
                features: sorted,
                set_by: format!("first host {host}"),
                set_unix_ms: unix_ms(),
            };
            if c.store.evc_put(&first).await? {
                tracing::info!(
                    "EVC baseline generation 1 set from host {host}: {} features",
                    first.features.len()
                );
            }
            // Another host's first heartbeat may have set it meanwhile.
            c.store.evc_baseline().await?.unwrap_or(first)
        }
    };
    let missing = lacking(features, &baseline.features);
    if !missing.is_empty() {
        c.store.evc_refuse(host, features, &missing, unix_ms()).await?;
        let keeping: Vec<String> = vms(c, Some(&baseline))
            .await?
            .into_iter()
            .filter(|v| v.host != host)
            .map(|v| format!("{} on {}", v.name, v.host))
            .collect();
        tracing::warn!("host {host} refused: it lacks {} of the EVC baseline", missing.join(", "));
        return Err(Failure::new(
            ErrorCode::CpuBelowBaseline,
            format!(
                "host {host} lacks CPU features of the cluster's baseline (generation {}): {}; lower the \
                 baseline to let it join: `ferry cluster evc set --hide {}` or `ferry cluster evc set \
                 --baseline-of {host}`; {}",
                baseline.generation,
                missing.join(", "),
                missing.join(","),
                if keeping.is_empty() {
                    "no powered-on VM would keep the higher baseline".to_string()
                } else {
                    format!(
                        "the powered-on VMs keep the higher baseline until they are powered off: {}",
                        keeping.join(", ")
                    )
                }
            ),
        ));
    }
    c.store.evc_unrefuse(host).await?;
    let started: Vec<(String, u64)> = info
        .vms
        .iter()
        .filter(|v| powered_on(v.state))
        .filter_map(|v| v.cpuid_generation.map(|g| (v.name.clone(), g)))
        .collect();
    c.store.evc_note_vms(host, &started, unix_ms()).await?;
    Ok(Some(baseline))
}

/// `POST /evc`.
pub async fn set(c: &Controller, req: &EvcSet) -> Result<EvcChanged, Failure> {
    let bad = |e: Error| Failure::new(ErrorCode::BadRequest, e.to_string());
    let current = c.store.evc_baseline().await?.ok_or_else(|| {
        Failure::new(
            ErrorCode::Conflict,
            "the cluster has no CPU baseline yet: the first host that joins sets it".into(),
        )
    })?;
    let hosts = c.store.hosts().await?;
    let of_host: Option<Vec<String>> = match &req.baseline_of {
        None => None,
        Some(name) => {
            let joined =
                hosts.iter().find(|h| &h.name == name).and_then(|h| offered(&h.info).map(<[_]>::to_vec));
            let refused = || async {
                c.store
                    .evc_refused()
                    .await
                    .map(|r| r.into_iter().find(|r| &r.host == name).map(|r| r.features))
            };
            match joined {
                Some(f) => Some(f),
                None => Some(refused().await?.ok_or_else(|| {
                    Failure::new(
                        ErrorCode::NotFound,
                        format!(
                            "no host named {name:?} joined this cluster or tried to (its CPU features are not known)"
                        ),
                    )
                })?),
            }
        }
    };
    let features = apply(&current.features, req, of_host.as_deref()).map_err(bad)?;
    // Raising: every host of the cluster must offer the new baseline.
    let mut above = Vec::new();
    for h in hosts.iter().filter(|h| h.state != HostState::Disconnected) {
        if let Some(f) = offered(&h.info) {
            let missing = lacking(f, &features);
            if !missing.is_empty() {
                above.push(format!("{} lacks {}", h.name, missing.join(", ")));
            }
        }
    }
    if !above.is_empty() {
        return Err(Failure::new(
            ErrorCode::Conflict,
            format!(
                "the baseline cannot be raised above what the cluster's hosts offer: {}",
                above.join("; ")
            ),
        ));
    }
    let removed = lacking(&features, &current.features);
    let added = extra(&features, &current.features);
    let baseline = if removed.is_empty() && added.is_empty() {
        current
    } else {
        let mut how = Vec::new();
        if !removed.is_empty() {
            how.push(format!("-{}", removed.join(",-")));
        }
        if !added.is_empty() {
            how.push(format!("+{}", added.join(",+")));
        }
        let next = EvcBaseline {
            generation: current.generation + 1,
            features,
            set_by: format!("operator: {}", how.join(" ")),
            set_unix_ms: unix_ms(),
        };
        if !c.store.evc_put(&next).await? {
            return Err(Failure::new(
                ErrorCode::Conflict,
                format!("the baseline changed meanwhile (generation {} exists); look again", next.generation),
            ));
        }
        tracing::info!("EVC baseline generation {}: {}", next.generation, next.set_by);
        next
    };
    let vms_keeping =
        vms(c, Some(&baseline)).await?.into_iter().filter(|v| !v.above_baseline.is_empty()).collect();
    Ok(EvcChanged { baseline, removed, added, vms_keeping })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn lacking_and_extra() {
        let baseline = v(&["avx2", "lahf_lm", "sse4.2"]);
        assert_eq!(lacking(&v(&["sse4.2", "avx2"]), &baseline), v(&["lahf_lm"]));
        assert_eq!(lacking(&v(&["sse4.2", "avx2", "lahf_lm", "aes"]), &baseline), Vec::<String>::new());
        assert_eq!(extra(&v(&["sse4.2", "avx2", "lahf_lm", "aes", "aes"]), &baseline), v(&["aes"]));
        assert_eq!(extra(&v(&["sse4.2"]), &baseline), Vec::<String>::new());
    }

    #[test]
    fn apply_hide_add_and_intersect() {
        let current = v(&["avx2", "lahf_lm", "sse4.2"]);
        let hide = EvcSet { hide: v(&["lahf_lm", " avx2 "]), ..Default::default() };
        assert_eq!(apply(&current, &hide, None).expect("hide"), v(&["sse4.2"]));
        let add = EvcSet { add: v(&["aes"]), ..Default::default() };
        assert_eq!(apply(&current, &add, None).expect("add"), v(&["aes", "avx2", "lahf_lm", "sse4.2"]));
        let of = EvcSet { baseline_of: Some("b".into()), ..Default::default() };
        assert_eq!(
            apply(&current, &of, Some(&v(&["sse4.2", "avx2", "aes"]))).expect("of"),
            v(&["avx2", "sse4.2"])
        );
        // Hiding what is absent changes nothing.
        let nothing = EvcSet { hide: v(&["aes"]), ..Default::default() };
        assert_eq!(apply(&current, &nothing, None).expect("same"), current);
    }

    #[test]
    fn apply_refuses_bad_requests() {
        let current = v(&["avx2"]);
        assert_eq!(apply(&current, &EvcSet::default(), None), Err(Error::Empty));
        let both = EvcSet { hide: v(&["avx2"]), add: v(&["avx2"]), ..Default::default() };
        assert_eq!(apply(&current, &both, None), Err(Error::Both("avx2".into())));
        let unknown = EvcSet { hide: v(&["bogus"]), ..Default::default() };
        assert!(matches!(apply(&current, &unknown, None), Err(Error::Unknown(_))));
    }

    #[test]
    fn powered_on_states() {
        assert!(powered_on(VmState::Running));
        assert!(powered_on(VmState::Suspended));
        assert!(powered_on(VmState::Paused));
        assert!(!powered_on(VmState::Defined));
        assert!(!powered_on(VmState::Crashed));
        assert!(!powered_on(VmState::Elsewhere));
    }
}
