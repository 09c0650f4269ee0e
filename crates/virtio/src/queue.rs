//! One virtqueue as the transport keeps it: the values the driver wrote to the queue
//! registers, and, once the driver has made a valid queue ready, the live split ring.
//!
//! The registers are kept raw, as written, rather than applied to the ring one by one:
//! a value that does not make a usable queue (a size that is not a power of two, a
//! misaligned address) must not be silently dropped, or the device and the driver would
//! disagree about where the rings are. Everything is checked together when the driver
//! sets `QueueReady`.

use virtio_queue::{Queue, QueueState, QueueT};

use crate::GuestMemory;

/// Why a queue the driver made ready cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Size or alignment rejected by `virtio-queue`.
    #[error("queue configuration rejected (size {size}, descriptors {desc:#x}, driver area {avail:#x}, device area {used:#x})")]
    Config {
        /// Queue size.
        size: u16,
        /// Descriptor table.
        desc: u64,
        /// Available ring.
        avail: u64,
        /// Used ring.
        used: u64,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// A ring is not entirely inside guest memory.
    #[error("queue rings are not inside guest memory (size {size}, descriptors {desc:#x}, driver area {avail:#x}, device area {used:#x})")]
    OutsideMemory {
        /// Queue size.
        size: u16,
        /// Descriptor table.
        desc: u64,
        /// Available ring.
        avail: u64,
        /// Used ring.
        used: u64,
    },
}

/// A virtqueue's registers and ring.
#[derive(Debug)]
pub(crate) struct VirtQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The ring, when `ready` and the configuration is usable. `ready` without a ring is a
    /// broken queue: the device is in `DEVICE_NEEDS_RESET`.
    pub ring: Option<Queue>,
}

impl VirtQueue {
    /// A queue in its reset state: size at its maximum, addresses zero, not ready.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            ring: None,
        }
    }

    /// Back to the reset state.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Builds the ring from the registers and the ring positions, checking everything:
    /// size, alignment, and that each ring lies in guest memory.
    pub fn build_ring(&self, mem: &GuestMemory, next_avail: u16, next_used: u16) -> Result<Queue, Error> {
        let state = QueueState {
            max_size: self.max_size,
            next_avail,
            next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: true,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        let (size, desc, avail, used) = (self.size, self.desc_table, self.avail_ring, self.used_ring);
        let ring =
            Queue::try_from(state).map_err(|source| Error::Config { size, desc, avail, used, source })?;
        if !ring.is_valid(mem) {
            return Err(Error::OutsideMemory { size, desc, avail, used });
        }
        Ok(ring)
    }

    /// The driver wrote `QueueReady = 1`: builds the ring. On error the queue is ready
    /// but has no ring (broken), and the caller puts the device in `DEVICE_NEEDS_RESET`.
    pub fn make_ready(&mut self, mem: &GuestMemory) -> Result<(), Error> {
        self.ready = true;
        self.ring = None;
        self.ring = Some(self.build_ring(mem, 0, 0)?);
        Ok(())
    }

    /// The driver wrote `QueueReady = 0`.
    pub fn make_unready(&mut self) {
        self.ready = false;
        self.ring = None;
    }

    /// Sets the low or high half of a 64-bit address register.
    pub fn set_half(reg: &mut u64, high: bool, value: u32) {
        *reg = if high {
            (*reg & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (*reg & !0xffff_ffff) | u64::from(value)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn ready_checks_size_alignment_and_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let mut q = VirtQueue::new(16);
        q.desc_table = 0x1000;
        q.avail_ring = 0x2000;
        q.used_ring = 0x3000;
        q.make_ready(&mem).expect("valid queue");
        assert!(q.ring.is_some());

        for (size, desc, used) in [(3, 0x1000, 0x3000), (32, 0x1000, 0x3000), (0, 0x1000, 0x3000)] {
            let mut bad = VirtQueue { size, desc_table: desc, used_ring: used, ..VirtQueue::new(16) };
            bad.avail_ring = 0x2000;
            assert!(matches!(bad.make_ready(&mem), Err(Error::Config { .. })), "size {size}");
            assert!(bad.ready && bad.ring.is_none());
        }
        let mut misaligned =
            VirtQueue { desc_table: 0x1008, avail_ring: 0x2000, used_ring: 0x3000, ..VirtQueue::new(16) };
        assert!(matches!(misaligned.make_ready(&mem), Err(Error::Config { .. })));
        let mut outside =
            VirtQueue { desc_table: 0xfff0, avail_ring: 0x2000, used_ring: 0x3000, ..VirtQueue::new(16) };
        assert!(matches!(outside.make_ready(&mem), Err(Error::OutsideMemory { .. })));
        let mut wrapping = VirtQueue {
            desc_table: u64::MAX - 15,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            ..VirtQueue::new(16)
        };
        assert!(wrapping.make_ready(&mem).is_err());
    }

    #[test]
    fn address_halves() {
        let mut r = 0u64;
        VirtQueue::set_half(&mut r, false, 0x1234_5678);
        VirtQueue::set_half(&mut r, true, 0x9abc_def0);
        assert_eq!(r, 0x9abc_def0_1234_5678);
        VirtQueue::set_half(&mut r, false, 0);
        assert_eq!(r, 0x9abc_def0_0000_0000);
    }
}
