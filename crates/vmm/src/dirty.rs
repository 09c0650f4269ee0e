//! Dirty-page tracking for live migration.
//!
//! A page is dirty if the guest wrote it (KVM's dirty log, `KVM_MEM_LOG_DIRTY_PAGES` on
//! every memory slot) **or** the VMM wrote it through `vm-memory` (each region's
//! `AtomicBitmap`: device emulation, loaders). Missing the second half silently loses data
//! that a device wrote into guest memory during pre-copy; Firecracker had to patch that in
//! by hand, Ferry collects the union from the start.

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::memory::GuestMemory;
use crate::vm;
use crate::Vmm;

/// Errors tracking dirty pages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Turning logging on or off failed.
    #[error("cannot switch KVM dirty logging")]
    Switch(#[source] vm::Error),
    /// Reading a slot's log failed.
    #[error("cannot read the dirty log of memory slot {slot}")]
    Read {
        /// The slot.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The dirty pages of one memory region: bit `i` of `bits[i / 64]` is the page at
/// `start + i * 4096`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Guest-physical start of the region.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The bitmap.
    pub bits: Vec<u64>,
}

impl DirtyRegion {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Guest-physical addresses of the dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| self.start + ((w as u64) * 64 + b) * 4096)
        })
    }
}

/// The region's log of the VMM's own writes.
fn own_writes(r: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    // The mapping's bitmap covers the whole region (GuestMemoryRegion::bitmap would give a
    // slice view without the reset operations).
    std::ops::Deref::deref(r).bitmap()
}

/// The dirty log of one VM: cheap to clone, usable from the migration thread while the
/// vCPUs run (the KVM calls it makes are safe to issue concurrently with `KVM_RUN`).
#[derive(Clone, Debug)]
pub struct DirtyLog {
    vm: Arc<VmFd>,
    memory: GuestMemory,
}

impl DirtyLog {
    /// The log of the VM `vm` with guest memory `memory`.
    pub fn new(vm: Arc<VmFd>, memory: GuestMemory) -> Self {
        Self { vm, memory }
    }

    /// Starts logging: from now on every page written is reported once by
    /// [`DirtyLog::take`]. The VMM's own write log is cleared (its writes so far, loading
    /// the kernel and initrd, are part of the first full pass anyway).
    pub fn start(&self) -> Result<(), Error> {
        for r in self.memory.iter() {
            own_writes(r).reset();
        }
        vm::register_memory(&self.vm, &self.memory, KVM_MEM_LOG_DIRTY_PAGES).map_err(Error::Switch)
    }

    /// Stops logging.
    pub fn stop(&self) -> Result<(), Error> {
        vm::register_memory(&self.vm, &self.memory, 0).map_err(Error::Switch)
    }

    /// Returns and clears the pages dirtied since the last call (or since logging started):
    /// KVM's log OR the VMM's own writes, per region.
    pub fn take(&self) -> Result<Vec<DirtyRegion>, Error> {
        let mut out = Vec::with_capacity(self.memory.num_regions());
        for (slot, r) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let mut bits = self
                .vm
                .get_dirty_log(slot, r.len() as usize)
                .map_err(|source| Error::Read { slot, source })?;
            let own = own_writes(r).get_and_reset();
            for (w, o) in bits.iter_mut().zip(own) {
                *w |= o;
            }
            out.push(DirtyRegion { start: r.start_addr().0, len: r.len(), bits });
        }
        Ok(out)
    }
}

impl Vmm {
    /// This VM's dirty log.
    pub fn dirty_log(&self) -> DirtyLog {
        DirtyLog::new(self.vm.clone(), self.memory.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{KernelSource, SerialConfig, VmConfig};
    use vm_memory::{Bytes, GuestAddress};

    /// On real KVM: the guest's writes (memstress's working set) and the VMM's own writes
    /// both show up, and nothing else does.
    #[test]
    fn union_of_kvm_log_and_vmm_writes() {
        let guest = ferry_test_guest();
        let home = std::env::temp_dir().join(format!("ferry-dirty-test-{}", std::process::id()));
        let vmm = Vmm::build(
            VmConfig {
                memory: 64 << 20,
                vcpus: 1,
                kernel: KernelSource::Embedded { name: "test".into(), elf: guest },
                cmdline: "wss=1M".into(),
                initrd: None,
                serial: SerialConfig::Null,
                started_ns: 0,
                api_socket: None,
                home: Some(home.clone()),
                state_dir: std::env::temp_dir(),
                lease: None,
                disks: Vec::new(),
                nets: Vec::new(),
                cpu_hide: Vec::new(),
            },
            crate::StopSource::new().expect("stop source").0,
        )
        .expect("build");
        let log = vmm.dirty_log();
        log.start().expect("start");
        let mut vmm = vmm;
        vmm.resume_vcpus().expect("resume");
        std::thread::sleep(std::time::Duration::from_millis(1500));
        vmm.pause_vcpus().expect("pause");
        // A VMM write (as a device would do) at 40 MiB, far from the guest's working set.
        vmm.memory().write_obj(1u64, GuestAddress(40 << 20)).expect("write");
        let dirty = log.take().expect("dirty");
        let pages: Vec<u64> = dirty.iter().flat_map(|r| r.pages().collect::<Vec<_>>()).collect();
        assert!(pages.contains(&(40 << 20)), "the VMM's own write is missing");
        // memstress places its 1 MiB working set at 2 MiB and writes every page of it.
        let ws = pages.iter().filter(|&&p| (2 << 20..3 << 20).contains(&p)).count();
        assert_eq!(ws, 256, "working-set pages dirty: {ws}");
        assert!(
            pages.len() < 256 + 64,
            "{} pages dirty, expected the working set, stack and one more",
            pages.len()
        );
        // Taken: the next read is empty while the guest is paused.
        let again = log.take().expect("dirty");
        assert_eq!(again.iter().map(DirtyRegion::count).sum::<u64>(), 0);
        log.stop().expect("stop");
        drop(vmm);
        std::fs::remove_dir_all(&home).expect("remove the test's VM home");
    }

    /// The memstress image, built by the guests crate (a dev-dependency).
    fn ferry_test_guest() -> &'static [u8] {
        ferry_guests::find("memstress").expect("memstress").elf
    }

    #[test]
    fn pages_iterates_set_bits() {
        let r = DirtyRegion { start: 0x10_0000, len: 1 << 20, bits: vec![0b101, 1 << 63] };
        assert_eq!(r.count(), 3);
        let p: Vec<u64> = r.pages().collect();
        assert_eq!(p, vec![0x10_0000, 0x10_2000, 0x10_0000 + 127 * 4096]);
    }
}
