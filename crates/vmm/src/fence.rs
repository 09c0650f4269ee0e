//! Self-fencing: a VMM whose lease on shared storage is failing stops the VM before the
//! lease can expire and be taken over elsewhere, and gives the lease up. See
//! [`crate::lease`] for when, and docs/migration.md ("Leases") for why it is safe.

use ferry_api::events::Events;
use ferry_api::{EventBody, Side};

use crate::vcpu::{Request as VcpuRequest, RunState};
use crate::{Error, VmRunState, Vmm};

/// How long the fence waits for each vCPU to pause before it goes on without it (a vCPU
/// blocked in a disk write on hung storage pauses when the write returns: the request
/// stays).
const FENCE_PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Vmm {
    /// Stops the vCPUs (and with them disk writes and the NICs' traffic: the virtio queues
    /// are served only on vCPU exits and, for received packets, while the VM runs), then
    /// gives up the lease and the lock without waiting for the storage. From here the VM
    /// runs again only through [`Vmm::unfence`].
    pub(crate) fn fence(&mut self, reason: String) {
        if self.fenced.is_some() || self.home.lease().is_none() {
            return;
        }
        let t = std::time::Instant::now();
        // An outgoing migration that has not committed is cancelled first: its thread sees
        // the flag in every wait and rolls back, and the rollback cannot resume a fenced VM.
        // (After the commit the lease is the destination's already.)
        if self.cancel_migration().is_ok() {
            tracing::warn!("the outgoing migration is cancelled: this host is fencing the VM");
        }
        for v in &self.vcpus {
            v.request(VcpuRequest::Pause);
        }
        let mut stuck = 0;
        for v in &self.vcpus {
            if v.wait_for(RunState::Paused, FENCE_PAUSE_WAIT).is_err() {
                stuck += 1;
            }
        }
        // When the vCPUs stopped: now, or, if the watchdog fenced past the run deadline, the
        // latest moment one can have run guest code (none enters past the deadline, and the
        // watchdog kicks out those inside within its period): a VMM that was frozen (the
        // whole process stopped) and fences on thawing stopped running guest code when it
        // froze, long before now.
        let bound = self.home.lease().and_then(|l| l.fence_signal().last_run_bound_ns());
        let stopped_ns = bound.map_or(crate::monotonic_ns(), |b| b.min(crate::monotonic_ns()));
        let was_running = self.state == VmRunState::Running;
        self.state = VmRunState::Paused;
        // The generation it ran at: the only one it may resume at.
        self.state_generation = self.home.generation();
        self.home.fence();
        if self.run_recorded {
            self.fence_record = self.home.record_run_detached(
                crate::home::RunEvent::Stop,
                self.migrated_in.as_deref(),
                stopped_ns,
            );
            self.run_recorded = false;
        }
        tracing::error!(
            "FENCED: {reason}; vCPUs stopped{} in {:.1} ms and the lease given up{}",
            if was_running { "" } else { " (they were paused)" },
            t.elapsed().as_secs_f64() * 1e3,
            if stuck > 0 {
                format!(" ({stuck} vCPU(s) still in an exit: they stop when it returns)")
            } else {
                String::new()
            }
        );
        let id = self.migrating().map(str::to_owned).unwrap_or_default();
        push(&self.events, &id, reason.clone());
        self.fenced = Some(reason);
    }

    /// A fenced VM resumes only if this VMM gets the lease (and lock) back and the VM's
    /// generation is still the one it ran at: nobody started it elsewhere meanwhile.
    pub(crate) fn unfence(&mut self) -> Result<(), Error> {
        // Not while the datastore still hangs: taking the lock would block this thread
        // (which serves the API) for as long as it does.
        self.home.answers_within(UNFENCE_PROBE)?;
        self.home.acquire(self.migrated_in.as_deref())?;
        // start_generation (in resume_vcpus) checks the generation against state_generation.
        self.resume_vcpus().inspect_err(|_| self.home.release())?;
        tracing::info!("no longer fenced: the lease is back and the generation unchanged; the VM runs");
        self.fenced = None;
        Ok(())
    }

    /// Whether the VMM has fenced itself, and why.
    pub fn fenced(&self) -> Option<&str> {
        self.fenced.as_deref()
    }
}

/// How long a resume of a fenced VM waits for the home's storage to answer.
const UNFENCE_PROBE: std::time::Duration = std::time::Duration::from_secs(2);

fn push(events: &Events, id: &str, reason: String) {
    events.push(id, Side::Source, EventBody::Fenced { reason });
}
