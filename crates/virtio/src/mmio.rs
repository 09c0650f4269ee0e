//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2 of the specification).
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x000 | MagicValue `0x74726976` ("virt") | R |
//! | 0x004 | Version (2) | R |
//! | 0x008 | DeviceID | R |
//! | 0x00c | VendorID | R |
//! | 0x010 | DeviceFeatures (32 bits chosen by DeviceFeaturesSel) | R |
//! | 0x014 | DeviceFeaturesSel | W |
//! | 0x020 | DriverFeatures (32 bits chosen by DriverFeaturesSel) | W |
//! | 0x024 | DriverFeaturesSel | W |
//! | 0x030 | QueueSel | W |
//! | 0x034 | QueueNumMax (0: no such queue) | R |
//! | 0x038 | QueueNum | W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify | W |
//! | 0x060 | InterruptStatus (bit 0 used buffer, bit 1 configuration change) | R |
//! | 0x064 | InterruptACK | W |
//! | 0x070 | Status | RW |
//! | 0x080/0x084 | QueueDescLow/High | W |
//! | 0x090/0x094 | QueueDriverLow/High (available ring) | W |
//! | 0x0a0/0x0a4 | QueueDeviceLow/High (used ring) | W |
//! | 0x0ac..0x0bc | SHMSel, SHMLen, SHMBase: no shared memory regions (length reads -1) | |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | device configuration space, any access width | RW |
//!
//! Registers are accessed 32 bits at a time; other widths read as zero and are ignored
//! when written, as are unknown registers. The guest is told about the device on the
//! kernel command line, `virtio_mmio.device=4K@<base>:<irq>` ([`MMIO_LEN`] bytes).
//!
//! ## Lifecycle
//!
//! The status register follows section 3.1: the driver only adds bits (`ACKNOWLEDGE`,
//! `DRIVER`, `FEATURES_OK`, `DRIVER_OK`, `FAILED`) until it writes 0, which resets the
//! device. `FEATURES_OK` is refused (left clear, for the driver to see) unless the driver
//! accepted `VIRTIO_F_VERSION_1` and nothing the device did not offer; `DRIVER_OK` needs
//! `FEATURES_OK`. Driver features may be written only between `DRIVER` and `FEATURES_OK`,
//! queue registers only between `FEATURES_OK` and `DRIVER_OK`, and not while the selected
//! queue is ready.
//!
//! ## Requests and interrupts
//!
//! A `QueueNotify` write serves, on the calling vCPU thread, every request the driver had
//! made available when the device looked, then interrupts the driver once if anything
//! completed (and the driver has not set `VRING_AVAIL_F_NO_INTERRUPT`). The interrupt is
//! a write to an [`EventFd`] that the VMM registers with KVM as an irqfd: edge-style, as
//! Firecracker does; the driver's handler reads `InterruptStatus` and acknowledges it.
//! Requests added after the device looked arrive with their own notification, since the
//! device never asks the driver to suppress them.
//!
//! ## Device-initiated work
//!
//! A queue of kind [`QueueKind::Receive`] (a network device's receive queue) is not
//! served on notification: the driver only lent the device buffers, which it fills when
//! input arrives on its backend. A transport for such a device has an event fd
//! ([`MmioTransport::event_fd`]); the transport signals it when the driver notifies a
//! receive queue and when the driver starts the device. The VMM's event loop watches it,
//! and the device's backend fd ([`MmioTransport::backend_fd`]) while
//! [`MmioTransport::device_event`] says [`Poll::Backend`], and calls `device_event` when
//! either is readable. The device takes and completes chains there, through
//! [`DeviceQueues`]; the transport raises one interrupt for the batch.
//!
//! ## Broken queues
//!
//! If the driver makes ready a queue whose rings are misaligned, of a bad size or not in
//! guest memory, or a queue later shows an unterminated descriptor chain, a head index
//! out of range or an available index more than the queue size ahead, the device sets
//! `DEVICE_NEEDS_RESET`, raises a configuration-change interrupt if the driver was
//! running, and ignores notifications until the driver resets it.

use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_TRANSPORT_F_END,
    VIRTIO_TRANSPORT_F_START,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::chain::{self, Chain};
use crate::device::{Poll, QueueKind, VirtioDevice};
use crate::queue::{self, VirtQueue};
use crate::GuestMemory;

/// The size of the MMIO window to reserve for one transport.
pub const MMIO_LEN: u64 = 0x1000;
/// `MagicValue`: "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2, the virtio 1.x ("modern") layout.
pub const VERSION: u32 = 2;
/// `VendorID`: "FRRY" in little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FRRY");
/// `InterruptStatus` bit: the device used a buffer.
pub const INT_USED_RING: u32 = reg::VIRTIO_MMIO_INT_VRING;
/// `InterruptStatus` bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = reg::VIRTIO_MMIO_INT_CONFIG;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Device status bits (section 2.1).
pub mod status {
    use super::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
    /// Every bit the driver may set.
    pub const DRIVER_BITS: u32 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED;
}

/// `VIRTIO_F_VERSION_1` as a feature mask.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC` as a feature mask.
pub const F_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// The transport feature bits (28 to 41) this transport can honour; the others are
/// never offered, whatever the device says.
const SUPPORTED_TRANSPORT_FEATURES: u64 = F_VERSION_1 | F_INDIRECT_DESC;

/// The transport feature bit range as a mask.
const TRANSPORT_FEATURES: u64 =
    ((1u64 << VIRTIO_TRANSPORT_F_END) - 1) & !((1u64 << VIRTIO_TRANSPORT_F_START) - 1);

const MAGIC: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
const VERSION_REG: u64 = reg::VIRTIO_MMIO_VERSION as u64;
const DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
const VENDOR_ID_REG: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
const DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
const QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
const QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
const QUEUE_NOTIFY: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
const QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const QUEUE_AVAIL_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const QUEUE_AVAIL_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const QUEUE_USED_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const QUEUE_USED_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const SHM_SEL: u64 = reg::VIRTIO_MMIO_SHM_SEL as u64;
const SHM_LEN_LOW: u64 = reg::VIRTIO_MMIO_SHM_LEN_LOW as u64;
const SHM_LEN_HIGH: u64 = reg::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
const SHM_BASE_LOW: u64 = reg::VIRTIO_MMIO_SHM_BASE_LOW as u64;
const SHM_BASE_HIGH: u64 = reg::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
const CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;

/// The largest queue the split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors creating a transport or serving a queue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device declares more queues than a 16-bit queue index reaches.
    #[error("the device has {count} queues, more than 65535")]
    QueueCount {
        /// Its number of queues.
        count: usize,
    },
    /// The device declares a queue no driver could use.
    #[error("queue {index} of the device has maximum size {size}, not a power of two from 1 to 32768")]
    QueueMaxSize {
        /// The queue.
        index: usize,
        /// Its declared maximum size.
        size: u16,
    },
    /// The driver made ready a queue that cannot be used.
    #[error("queue {index} cannot be used")]
    QueueConfig {
        /// The queue.
        index: u16,
        /// Why.
        #[source]
        source: queue::Error,
    },
    /// The rings of a running queue cannot be read or written (available index too far
    /// ahead, used ring not writable, ...).
    #[error("the rings of queue {index} cannot be used")]
    Ring {
        /// The queue.
        index: u16,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// The available ring said a request was there, but its entry could not be read.
    #[error("the available ring of queue {index} has an unreadable entry")]
    AvailEntry {
        /// The queue.
        index: u16,
    },
    /// A request's descriptor chain cannot be walked.
    #[error("queue {index}: the descriptor chain at head {head} is broken")]
    Chain {
        /// The queue.
        index: u16,
        /// The chain's head index.
        head: u16,
        /// Why.
        #[source]
        source: chain::Error,
    },
    /// The event fd of a device with a receive queue cannot be created.
    #[error("cannot create the virtio device's event fd")]
    EventFd(#[source] std::io::Error),
}

/// A virtio device behind a virtio-mmio register block.
#[derive(Debug)]
pub struct MmioTransport {
    pub(crate) device: Box<dyn VirtioDevice>,
    pub(crate) mem: GuestMemory,
    pub(crate) interrupt: EventFd,
    /// Features offered: the device's, masked to the transport features supported here,
    /// plus `VIRTIO_F_VERSION_1`.
    pub(crate) device_features: u64,
    pub(crate) driver_features: u64,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) queue_sel: u32,
    pub(crate) status: u32,
    pub(crate) interrupt_status: u32,
    pub(crate) config_generation: u32,
    pub(crate) queues: Vec<VirtQueue>,
    /// Signalled when the device has work for [`MmioTransport::device_event`]; only for
    /// devices with a [`QueueKind::Receive`] queue.
    pub(crate) event: Option<EventFd>,
}

impl MmioTransport {
    /// A transport for `device`, whose requests read and write `mem`, interrupting the
    /// guest through `interrupt` (keep a clone of it to register as an irqfd, or use
    /// [`MmioTransport::interrupt`]).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, interrupt: EventFd) -> Result<Self, Error> {
        let count = device.queue_max_sizes().len();
        if count > usize::from(u16::MAX) {
            return Err(Error::QueueCount { count });
        }
        let mut queues = Vec::with_capacity(count);
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(Error::QueueMaxSize { index, size });
            }
            queues.push(VirtQueue::new(size));
        }
        let device_features = Self::offered_features(device.as_ref());
        // `count` fits in a u16 (checked above).
        let event = if (0..count as u16).any(|q| device.queue_kind(q) == QueueKind::Receive) {
            Some(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?)
        } else {
            None
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            device_features,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues,
            event,
        })
    }

    /// What the transport offers for `device`.
    pub(crate) fn offered_features(device: &dyn VirtioDevice) -> u64 {
        let features = device.features();
        let dropped = features & TRANSPORT_FEATURES & !SUPPORTED_TRANSPORT_FEATURES;
        if dropped != 0 {
            tracing::debug!(
                dropped = format_args!("{dropped:#x}"),
                "not offering unsupported transport features"
            );
        }
        (features & !(TRANSPORT_FEATURES & !SUPPORTED_TRANSPORT_FEATURES)) | F_VERSION_1
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The eventfd the transport writes to interrupt the guest.
    pub fn interrupt(&self) -> &EventFd {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The features the driver accepted (meaningful once `FEATURES_OK` is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The fd the VMM's event loop always watches (for readability) for a device with
    /// device-initiated work (a receive queue), calling [`MmioTransport::device_event`]
    /// when it fires. `None` for devices that only serve requests (virtio-blk).
    pub fn event_fd(&self) -> Option<&EventFd> {
        self.event.as_ref()
    }

    /// The device's backend fd (a tap), which the VMM watches for readability while
    /// [`MmioTransport::device_event`] last said [`Poll::Backend`].
    pub fn backend_fd(&self) -> Option<RawFd> {
        self.device.backend_fd()
    }

    /// Runs the device's device-initiated work (for a network device: moves frames from
    /// its tap into the receive queue's buffers), interrupting the guest once if any
    /// buffer was used. The VMM's event loop calls it when the transport's event fd or
    /// the backend fd is readable; it clears the event fd. Returns whether to keep
    /// watching the backend fd. Does nothing (and says [`Poll::WaitForDriver`]) while the
    /// driver is not running the device; the event fd fires when it starts it.
    pub fn device_event(&mut self) -> Poll {
        if let Some(event) = &self.event {
            // Clears the counter; fails with EAGAIN if it was not signalled, which is fine.
            let _ = event.read();
        }
        if !self.running() {
            return Poll::WaitForDriver;
        }
        let mut queues =
            DeviceQueues { queues: &mut self.queues, mem: &self.mem, completed: Vec::new(), error: None };
        let poll = self.device.device_event(&mut queues);
        let DeviceQueues { completed, error, .. } = queues;
        let interrupt = completed.iter().any(|&index| {
            self.queues[usize::from(index)].ring.as_ref().is_some_and(|ring| wants_interrupt(ring, &self.mem))
        });
        if interrupt {
            self.raise(INT_USED_RING);
        }
        if let Some(e) = error {
            self.fail(e);
            return Poll::WaitForDriver;
        }
        poll
    }

    /// Whether the driver is running the device: `DRIVER_OK`, and neither
    /// `DEVICE_NEEDS_RESET` nor `FAILED`.
    fn running(&self) -> bool {
        self.status & (status::DRIVER_OK | status::NEEDS_RESET | status::FAILED) == status::DRIVER_OK
    }

    /// Signals the event fd, if the device has one: there is work for `device_event`.
    pub(crate) fn wake(&self) {
        if let Some(event) = &self.event {
            if let Err(e) = event.write(1) {
                let error: &dyn std::error::Error = &e;
                tracing::warn!(error, "cannot signal the virtio device's event fd");
            }
        }
    }

    /// Handles a read of `data.len()` bytes at `offset` in the register block.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(offset, len = data.len(), "virtio-mmio register read of a width other than 4");
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC => MAGIC_VALUE,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            // No shared memory regions: a length of -1 says so.
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "read of an unknown or write-only virtio-mmio register");
                0
            }
        }
    }

    /// Handles a write of `data` at `offset` in the register block. A write to
    /// `QueueNotify` serves that queue's requests before it returns.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(offset, len = data.len(), "virtio-mmio register write of a width other than 4");
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.set_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => {
                if let Some(q) = self.configurable_queue() {
                    // A size that does not fit 16 bits is as unusable as 0.
                    q.size = u16::try_from(value).unwrap_or(0);
                }
            }
            QUEUE_READY => self.set_queue_ready(value),
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.set_status(value),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    VirtQueue::set_half(&mut q.desc_table, offset == QUEUE_DESC_HIGH, value);
                }
            }
            QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    VirtQueue::set_half(&mut q.avail_ring, offset == QUEUE_AVAIL_HIGH, value);
                }
            }
            QUEUE_USED_LOW | QUEUE_USED_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    VirtQueue::set_half(&mut q.used_ring, offset == QUEUE_USED_HIGH, value);
                }
            }
            SHM_SEL => {}
            _ => tracing::debug!(offset, value, "write to an unknown or read-only virtio-mmio register"),
        }
    }

    fn selected_queue(&self) -> Option<&VirtQueue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may configure it now: during queue setup
    /// (`FEATURES_OK` without `DRIVER_OK` or `FAILED`) and while it is not ready.
    fn configurable_queue(&mut self) -> Option<&mut VirtQueue> {
        let index = self.configurable_queue_index()?;
        self.queues.get_mut(index)
    }

    fn configurable_queue_index(&self) -> Option<usize> {
        if self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED) != status::FEATURES_OK {
            tracing::debug!(status = self.status, "virtio-mmio queue register written outside queue setup");
            return None;
        }
        let sel = self.queue_sel;
        match self.queues.get(sel as usize) {
            Some(q) if q.ready => {
                tracing::debug!(queue = sel, "virtio-mmio queue register written while the queue is ready");
                None
            }
            Some(_) => Some(sel as usize),
            None => {
                tracing::debug!(
                    queue = sel,
                    "virtio-mmio queue register written for a queue that does not exist"
                );
                None
            }
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
            tracing::debug!(status = self.status, "driver features written outside feature negotiation");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            sel => tracing::debug!(sel, value, "driver features written for a selector beyond 64 bits"),
        }
    }

    fn set_queue_ready(&mut self, value: u32) {
        match value {
            0 => {
                if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    q.make_unready();
                }
            }
            1 => {
                let Some(index) = self.configurable_queue_index() else { return };
                if let Err(source) = self.queues[index].make_ready(&self.mem) {
                    // Fits: `new` refuses devices with more than 65535 queues.
                    self.fail(Error::QueueConfig { index: index as u16, source });
                }
            }
            _ => tracing::debug!(value, "QueueReady written with a value other than 0 or 1"),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's to set; unknown bits are ignored.
        let mut new = value & status::DRIVER_BITS;
        let cleared = old & status::DRIVER_BITS & !new;
        if cleared != 0 {
            tracing::debug!(old, value, "driver cleared device status bits without a reset; ignored");
            return;
        }
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            let acked = self.driver_features;
            let offered = self.device_features;
            if new & status::DRIVER == 0 || acked & F_VERSION_1 == 0 || acked & !offered != 0 {
                tracing::debug!(
                    acked = format_args!("{acked:#x}"),
                    offered = format_args!("{offered:#x}"),
                    "refusing the driver's features (FEATURES_OK stays clear)"
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            tracing::debug!(value, "DRIVER_OK without FEATURES_OK; ignored");
            new &= !status::DRIVER_OK;
        }
        self.status = new | (old & status::NEEDS_RESET);
        if (new & !old) & status::DRIVER_OK != 0 {
            self.device.activate(self.driver_features);
            // Receive buffers the driver added (and notified) before DRIVER_OK are usable now.
            self.wake();
        }
    }

    /// The device reset (status written with 0): back to the state of a new transport.
    fn reset(&mut self) {
        self.device.reset();
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// The device cannot go on: `DEVICE_NEEDS_RESET`, and a configuration-change
    /// interrupt if the driver is running.
    fn fail(&mut self, error: Error) {
        let error: &dyn std::error::Error = &error;
        tracing::warn!(error, "virtio device needs a reset after a driver error");
        if self.status & status::NEEDS_RESET != 0 {
            return;
        }
        self.status |= status::NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.raise(INT_CONFIG);
        }
    }

    /// Sets `bits` in the interrupt status and interrupts the guest.
    pub(crate) fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.interrupt.write(1) {
            let error: &dyn std::error::Error = &e;
            tracing::warn!(error, "cannot signal the virtio interrupt eventfd");
        }
    }

    fn notify(&mut self, value: u32) {
        if !self.running() {
            tracing::debug!(
                queue = value,
                status = self.status,
                "queue notification while the device is not running"
            );
            return;
        }
        let (Ok(index), Some(q)) = (u16::try_from(value), self.queues.get_mut(value as usize)) else {
            tracing::debug!(queue = value, "notification for a queue that does not exist");
            return;
        };
        let Some(ring) = q.ring.as_mut() else {
            tracing::debug!(queue = value, "notification for a queue that is not ready");
            return;
        };
        if self.device.queue_kind(index) == QueueKind::Receive {
            // New buffers: the device fills them from the VMM's event loop.
            self.wake();
            return;
        }
        let (completed, result) = serve_queue(self.device.as_mut(), index, ring, &self.mem);
        if completed > 0 && wants_interrupt(ring, &self.mem) {
            self.raise(INT_USED_RING);
        }
        if let Err(e) = result {
            self.fail(e);
        }
    }
}

/// Serves every request made available on `ring` up to the available index read on
/// entry. Returns how many completed, and why it stopped early, if it did.
fn serve_queue(
    device: &mut dyn VirtioDevice,
    index: u16,
    ring: &mut Queue,
    mem: &GuestMemory,
) -> (usize, Result<(), Error>) {
    let end = match ring.avail_idx(mem, Ordering::Acquire) {
        Ok(end) => end.0,
        Err(source) => return (0, Err(Error::Ring { index, source })),
    };
    let mut completed = 0;
    while ring.next_avail() != end {
        let chain = match take_chain(index, ring, mem) {
            Ok(chain) => chain,
            Err(e) => return (completed, Err(e)),
        };
        let len = device.process(index, &chain, mem);
        if let Err(source) = ring.add_used(mem, chain.head_index(), len) {
            return (completed, Err(Error::Ring { index, source }));
        }
        completed += 1;
    }
    (completed, Ok(()))
}

/// Takes the next chain the driver made available on `ring`, which it said is there.
fn take_chain(index: u16, ring: &mut Queue, mem: &GuestMemory) -> Result<Chain, Error> {
    // `iter` re-reads the available index and refuses one more than a queue ahead.
    let popped = match ring.iter(mem) {
        Ok(mut avail) => avail.next(),
        Err(source) => return Err(Error::Ring { index, source }),
    };
    let Some(desc_chain) = popped else {
        return Err(Error::AvailEntry { index });
    };
    let head = desc_chain.head_index();
    Chain::collect(desc_chain, mem).map_err(|source| Error::Chain { index, head, source })
}

/// A device's access to its queues during [`VirtioDevice::device_event`]: it takes the
/// chains the driver made available and completes them, one at a time.
///
/// A queue the device finds broken (an available index too far ahead, an unreadable
/// entry, a chain that does not terminate) ends the device's access: every later call
/// finds nothing, and the transport puts the device in `DEVICE_NEEDS_RESET` afterwards.
#[derive(Debug)]
pub struct DeviceQueues<'a> {
    queues: &'a mut [VirtQueue],
    mem: &'a GuestMemory,
    /// The queues with chains completed, for the interrupt.
    completed: Vec<u16>,
    error: Option<Error>,
}

impl DeviceQueues<'_> {
    /// Guest memory.
    pub fn mem(&self) -> &GuestMemory {
        self.mem
    }

    /// Whether the driver has made a chain available on `queue` that the device has not
    /// taken yet. False for a queue that does not exist or is not ready.
    pub fn has_available(&mut self, queue: u16) -> bool {
        if self.error.is_some() {
            return false;
        }
        let Some(ring) = self.queues.get(usize::from(queue)).and_then(|q| q.ring.as_ref()) else {
            return false;
        };
        match ring.avail_idx(self.mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != ring.next_avail(),
            Err(source) => {
                self.error = Some(Error::Ring { index: queue, source });
                false
            }
        }
    }

    /// Takes the next available chain of `queue`, calls `f` with it, and completes it with
    /// the length `f` returns (the bytes it wrote into the chain's writable buffers).
    /// Returns whether there was a chain (and `f` was called); false if there is none, the
    /// queue is not ready, or it is broken.
    pub fn serve_next(&mut self, queue: u16, f: impl FnOnce(&Chain, &GuestMemory) -> u32) -> bool {
        if !self.has_available(queue) {
            return false;
        }
        let mem = self.mem;
        let Some(ring) = self.queues.get_mut(usize::from(queue)).and_then(|q| q.ring.as_mut()) else {
            return false;
        };
        let chain = match take_chain(queue, ring, mem) {
            Ok(chain) => chain,
            Err(e) => {
                self.error = Some(e);
                return false;
            }
        };
        let len = f(&chain, mem);
        if let Err(source) = ring.add_used(mem, chain.head_index(), len) {
            self.error = Some(Error::Ring { index: queue, source });
            return true;
        }
        if !self.completed.contains(&queue) {
            self.completed.push(queue);
        }
        true
    }
}

/// Whether the driver wants an interrupt for new used buffers: unless it set
/// `VRING_AVAIL_F_NO_INTERRUPT` (read after the used index was published, so that a
/// driver re-enabling interrupts either sees the new entries or gets the interrupt).
fn wants_interrupt(ring: &Queue, mem: &GuestMemory) -> bool {
    fence(Ordering::SeqCst);
    match mem.load::<u16>(GuestAddress(ring.avail_ring()), Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

impl ferry_devices::BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Block, SECTOR_SIZE};
    use crate::testing::{
        regs, Driver, Dummy, TempImage, AVAIL, DATA, DESC, HEADER, MEM_SIZE, QSIZE, STATUS, USED,
    };
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};

    const S_OK: u8 = VIRTIO_BLK_S_OK as u8;

    fn blk_driver() -> (TempImage, Driver) {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let d = Driver::blk(&img, false, b"id");
        (img, d)
    }

    #[test]
    fn identifies_as_virtio_mmio_version_2() {
        let (_img, mut d) = blk_driver();
        assert_eq!(d.read_reg(regs::MAGIC), 0x7472_6976);
        assert_eq!(d.read_reg(regs::VERSION), 2);
        assert_eq!(d.read_reg(regs::DEVICE_ID), 2);
        assert_eq!(d.read_reg(regs::VENDOR_ID), VENDOR_ID);
        let features = d.device_features();
        assert_ne!(features & F_VERSION_1, 0);
        assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(features & F_INDIRECT_DESC, 0);
        d.write_reg(regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(d.read_reg(regs::DEVICE_FEATURES), 0);
        d.write_reg(regs::QUEUE_SEL, 0);
        assert_eq!(d.read_reg(regs::QUEUE_NUM_MAX), 256);
        d.write_reg(regs::QUEUE_SEL, 1);
        assert_eq!(d.read_reg(regs::QUEUE_NUM_MAX), 0);
        assert_eq!(d.read_reg(regs::QUEUE_READY), 0);
        assert_eq!(d.read_reg(regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(d.read_reg(regs::CONFIG_GENERATION), 0);
        assert_eq!(d.read_reg(regs::STATUS), 0);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), 0);
        // Configuration space at any width: capacity is 8 sectors.
        let mut cap = [0u8; 8];
        d.t.read(regs::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut one = [0xffu8; 1];
        d.t.read(regs::CONFIG, &mut one);
        assert_eq!(one[0], 8);
        d.t.write(regs::CONFIG, &[1, 2, 3, 4]);
        d.t.read(regs::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8, "configuration space is read-only");
        // Registers at other widths, unknown and write-only registers read as zero.
        let mut two = [0xffu8; 2];
        d.t.read(regs::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        let mut eight = [0xffu8; 8];
        d.t.read(regs::MAGIC, &mut eight);
        assert_eq!(eight, [0; 8]);
        for offset in [0x018, 0x038, 0x050, 0x0c0, 0x0f8, 0x003] {
            assert_eq!(d.read_reg(offset), 0, "offset {offset:#x}");
        }
        d.t.write(regs::STATUS, &[1]);
        assert_eq!(d.status(), 0, "a 1-byte status write is ignored");
    }

    #[test]
    fn unsupported_transport_features_are_never_offered() {
        let mut d = Driver::new(Box::new(Dummy { queues: vec![8] }));
        assert_eq!(d.device_features(), F_VERSION_1);
        #[derive(Debug)]
        struct Greedy(Vec<u16>);
        impl VirtioDevice for Greedy {
            fn device_type(&self) -> u32 {
                7
            }
            fn features(&self) -> u64 {
                (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << 34) | (1 << 38) | F_INDIRECT_DESC | 1 | (1 << 50)
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &self.0
            }
            fn read_config(&self, _offset: u64, data: &mut [u8]) {
                data.fill(0);
            }
            fn process(&mut self, _queue: u16, _chain: &Chain, _mem: &GuestMemory) -> u32 {
                0
            }
        }
        let mut d = Driver::new(Box::new(Greedy(vec![4])));
        assert_eq!(d.device_features(), F_VERSION_1 | F_INDIRECT_DESC | 1 | (1 << 50));
    }

    #[test]
    fn devices_with_unusable_queues_are_refused() {
        let mem = crate::testing::memory();
        for sizes in [vec![0u16], vec![3], vec![256, 65535], vec![u16::MAX]] {
            let efd = EventFd::new(0).expect("eventfd");
            let r = MmioTransport::new(Box::new(Dummy { queues: sizes.clone() }), mem.clone(), efd);
            assert!(matches!(r, Err(Error::QueueMaxSize { .. })), "{sizes:?}");
        }
        let efd = EventFd::new(0).expect("eventfd");
        let r = MmioTransport::new(Box::new(Dummy { queues: vec![1; 70000] }), mem.clone(), efd);
        assert!(matches!(r, Err(Error::QueueCount { count: 70000 })));
        let efd = EventFd::new(0).expect("eventfd");
        MmioTransport::new(Box::new(Dummy { queues: vec![] }), mem, efd).expect("no queues is fine");
    }

    #[test]
    fn feature_negotiation_follows_the_rules() {
        let (_img, mut d) = blk_driver();
        let offered = d.device_features();
        // Features written before DRIVER are ignored.
        d.write_driver_features(offered);
        d.add_status(status::ACKNOWLEDGE | status::DRIVER);
        d.add_status(status::FEATURES_OK);
        assert_eq!(d.status() & status::FEATURES_OK, 0, "nothing accepted, not even VERSION_1");
        // Without VERSION_1: refused.
        d.write_driver_features(offered & !F_VERSION_1);
        d.add_status(status::FEATURES_OK);
        assert_eq!(d.status() & status::FEATURES_OK, 0);
        // A feature not offered: refused.
        d.write_driver_features(offered | (1 << VIRTIO_RING_F_EVENT_IDX));
        d.add_status(status::FEATURES_OK);
        assert_eq!(d.status() & status::FEATURES_OK, 0);
        // DRIVER_OK before FEATURES_OK: ignored.
        d.add_status(status::DRIVER_OK);
        assert_eq!(d.status() & status::DRIVER_OK, 0);
        // A subset with VERSION_1: accepted.
        d.write_driver_features(F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH));
        d.add_status(status::FEATURES_OK);
        assert_ne!(d.status() & status::FEATURES_OK, 0);
        // Once accepted, the features are frozen.
        d.write_driver_features(offered);
        assert_eq!(d.t.driver_features(), F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH));
        // Clearing bits without a reset is ignored; so is the driver setting NEEDS_RESET.
        d.write_reg(regs::STATUS, status::ACKNOWLEDGE);
        assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        d.add_status(status::NEEDS_RESET | 0x10 | 0x100);
        assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        d.add_status(status::DRIVER_OK);
        assert_ne!(d.status() & status::DRIVER_OK, 0);
        // FAILED is the driver's to set.
        d.add_status(status::FAILED);
        assert_ne!(d.status() & status::FAILED, 0);
    }

    #[test]
    fn queue_registers_are_writable_only_during_setup() {
        let (_img, mut d) = blk_driver();
        // Before FEATURES_OK: ignored.
        d.write_reg(regs::QUEUE_SEL, 0);
        d.write_reg(regs::QUEUE_NUM, 8);
        d.write_reg(regs::QUEUE_DESC_LOW, 0x5000);
        d.write_reg(regs::QUEUE_READY, 1);
        assert_eq!(d.read_reg(regs::QUEUE_READY), 0);
        let q = &d.t.state().queues[0];
        assert_eq!((q.size, q.desc_table), (256, 0));
        d.start();
        // While ready, and after DRIVER_OK: ignored.
        d.write_reg(regs::QUEUE_NUM, 8);
        d.write_reg(regs::QUEUE_DESC_LOW, 0x5000);
        d.write_reg(regs::QUEUE_USED_HIGH, 1);
        let q = &d.t.state().queues[0];
        assert_eq!((q.size, q.desc_table, q.used_ring), (QSIZE, DESC, USED));
        // Queues beyond the device's: ignored, read as absent.
        d.write_reg(regs::QUEUE_SEL, 3);
        d.write_reg(regs::QUEUE_READY, 1);
        assert_eq!(d.read_reg(regs::QUEUE_READY), 0);
        assert_eq!(d.read_reg(regs::QUEUE_NUM_MAX), 0);
        // 64-bit addresses are assembled from both halves.
        let (_img, mut d) = blk_driver();
        d.negotiate();
        d.write_reg(regs::QUEUE_DESC_HIGH, 0x1);
        d.write_reg(regs::QUEUE_DESC_LOW, 0x2000);
        d.write_reg(regs::QUEUE_AVAIL_HIGH, 0x2);
        d.write_reg(regs::QUEUE_USED_HIGH, 0x3);
        let q = &d.t.state().queues[0];
        assert_eq!((q.desc_table, q.avail_ring, q.used_ring), (0x1_0000_2000, 0x2_0000_0000, 0x3_0000_0000));
    }

    #[test]
    fn status_zero_resets_the_device() {
        let (_img, mut d) = blk_driver();
        let fresh = d.t.state();
        d.start();
        d.write_reg(regs::QUEUE_SEL, 0);
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 0, &[], 512).status, S_OK);
        assert_ne!(d.read_reg(regs::INTERRUPT_STATUS), 0);
        d.write_reg(regs::STATUS, 0);
        assert_eq!(d.status(), 0);
        assert_eq!(d.read_reg(regs::QUEUE_READY), 0);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), 0);
        assert_eq!(d.t.state(), fresh);
        // The driver starts over, and the rings start from index 0 again.
        d.start();
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 1, &[], 512).status, S_OK);
        assert_eq!(d.used_idx(), 1);
    }

    #[test]
    fn interrupts_and_notifications() {
        let (_img, mut d) = blk_driver();
        // Notifications before DRIVER_OK are ignored.
        d.negotiate();
        d.setup_queue(u32::from(QSIZE), DESC, AVAIL, USED);
        d.write_header(VIRTIO_BLK_T_IN, 0);
        d.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        d.notify();
        assert_eq!(d.used_idx(), 0);
        d.add_status(status::DRIVER_OK);
        // Notifications of queues that do not exist, or with nothing new: nothing happens.
        for q in [1, 5, u32::MAX] {
            d.write_reg(regs::QUEUE_NOTIFY, q);
        }
        assert_eq!(d.used_idx(), 0);
        // Now the pending request and three more, with one notification: one interrupt.
        for _ in 0..3 {
            d.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        }
        d.notify();
        assert_eq!(d.used_idx(), 4);
        assert_eq!(d.take_irq(), 1);
        d.notify();
        assert_eq!(d.take_irq(), 0, "no interrupt when nothing completed");
        // The driver asks for no interrupts (VRING_AVAIL_F_NO_INTERRUPT): none.
        d.write_reg(regs::INTERRUPT_ACK, INT_USED_RING);
        d.mem.write_obj(1u16.to_le(), GuestAddress(AVAIL)).expect("flags");
        d.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        d.notify();
        assert_eq!(d.used_idx(), 5);
        assert_eq!(d.take_irq(), 0);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), 0);
        // A queue the driver took back (QueueReady = 0) is not served.
        d.mem.write_obj(0u16.to_le(), GuestAddress(AVAIL)).expect("flags");
        d.write_reg(regs::QUEUE_READY, 0);
        d.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        d.notify();
        assert_eq!(d.used_idx(), 5);
        // Acknowledging only some bits leaves the others.
        d.t.interrupt_status = INT_USED_RING | INT_CONFIG;
        d.write_reg(regs::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), INT_USED_RING);
    }

    /// Starts a driver, lets `corrupt` break the queue, notifies, and checks the device
    /// is in DEVICE_NEEDS_RESET, told the driver, and recovers after a reset.
    fn assert_breaks_queue(what: &str, corrupt: impl FnOnce(&mut Driver)) {
        let (_img, mut d) = blk_driver();
        d.start();
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 0, &[], 512).status, S_OK, "{what}");
        d.take_irq();
        d.write_reg(regs::INTERRUPT_ACK, INT_USED_RING);
        let used = d.used_idx();
        corrupt(&mut d);
        d.notify();
        assert_ne!(d.status() & status::NEEDS_RESET, 0, "{what}: NEEDS_RESET");
        assert_ne!(d.read_reg(regs::INTERRUPT_STATUS) & INT_CONFIG, 0, "{what}: config interrupt");
        assert_eq!(d.take_irq(), 1, "{what}: interrupt");
        assert_eq!(d.used_idx(), used, "{what}: nothing completed");
        // Ignored from now on, even valid requests; the driver's status writes keep the bit.
        d.write_header(VIRTIO_BLK_T_IN, 0);
        d.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        d.notify();
        assert_eq!(d.used_idx(), used, "{what}: ignored after NEEDS_RESET");
        d.add_status(status::ACKNOWLEDGE);
        assert_ne!(d.status() & status::NEEDS_RESET, 0);
        // A reset brings it back.
        d.start();
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 0, &[], 512).status, S_OK, "{what}: after reset");
    }

    #[test]
    fn broken_chains_put_the_device_in_needs_reset() {
        let next = VRING_DESC_F_NEXT as u16;
        assert_breaks_queue("two-descriptor loop", |d| {
            let h = d.next_desc;
            d.write_desc(DESC, h, HEADER, 16, next, h + 1);
            d.write_desc(DESC, h + 1, STATUS, 1, next | 2, h);
            d.publish(h);
        });
        assert_breaks_queue("self loop", |d| {
            d.write_desc(DESC, 0, HEADER, 16, next, 0);
            d.publish(0);
        });
        assert_breaks_queue("next index out of range", |d| {
            d.write_desc(DESC, 0, HEADER, 16, next, QSIZE);
            d.publish(0);
        });
        assert_breaks_queue("head index out of range", |d| d.publish(QSIZE));
        assert_breaks_queue("head index far out of range", |d| d.publish(u16::MAX));
        assert_breaks_queue("available index too far ahead", |d| {
            let idx = d.avail_idx.wrapping_add(QSIZE + 1);
            d.mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).expect("avail idx");
        });
        assert_breaks_queue("indirect table outside memory", |d| {
            d.write_desc(DESC, 0, 1 << 40, 64, VRING_DESC_F_INDIRECT as u16, 0);
            d.publish(0);
        });
        assert_breaks_queue("empty indirect table", |d| {
            d.write_desc(DESC, 0, 0x40_000, 0, VRING_DESC_F_INDIRECT as u16, 0);
            d.publish(0);
        });
        assert_breaks_queue("loop inside an indirect table", |d| {
            d.write_desc(0x40_000, 0, HEADER, 16, next, 1);
            d.write_desc(0x40_000, 1, STATUS, 1, next | 2, 0);
            d.write_desc(DESC, 0, 0x40_000, 32, VRING_DESC_F_INDIRECT as u16, 0);
            d.publish(0);
        });
        assert_breaks_queue("chain over 4 GiB", |d| {
            d.write_desc(DESC, 0, HEADER, u32::MAX, next, 1);
            d.write_desc(DESC, 1, STATUS, 2, 2, 0);
            d.publish(0);
        });
    }

    #[test]
    fn unusable_queues_put_the_device_in_needs_reset() {
        let cases: [(&str, u32, u64, u64, u64); 9] = [
            ("descriptor table outside memory", 16, 1 << 40, AVAIL, USED),
            ("used ring across the end of memory", 16, DESC, AVAIL, MEM_SIZE - 64),
            ("available ring at the top of the address space", 16, DESC, u64::MAX - 1, USED),
            ("misaligned descriptor table", 16, DESC + 8, AVAIL, USED),
            ("misaligned used ring", 16, DESC, AVAIL, USED + 2),
            ("size not a power of two", 12, DESC, AVAIL, USED),
            ("size above the maximum", 512, DESC, AVAIL, USED),
            ("size zero", 0, DESC, AVAIL, USED),
            ("size beyond 16 bits", 0x1_0010, DESC, AVAIL, USED),
        ];
        for (what, size, desc, avail, used) in cases {
            let (_img, mut d) = blk_driver();
            d.negotiate();
            d.setup_queue(size, desc, avail, used);
            assert_ne!(d.status() & status::NEEDS_RESET, 0, "{what}");
            assert_eq!(d.read_reg(regs::QUEUE_READY), 1, "{what}: ready as the driver asked");
            // Not running yet: no configuration interrupt.
            assert_eq!(d.take_irq(), 0, "{what}");
            d.add_status(status::DRIVER_OK);
            d.notify();
            assert_eq!(d.take_irq(), 0, "{what}");
            d.start();
            assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 0, &[], 512).status, S_OK, "{what}: after reset");
        }
    }

    #[test]
    fn random_register_writes_and_ring_garbage_never_panic() {
        // xorshift64*: deterministic, so a failure reproduces.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let offsets = [
            regs::DEVICE_FEATURES_SEL,
            regs::DRIVER_FEATURES,
            regs::DRIVER_FEATURES_SEL,
            regs::QUEUE_SEL,
            regs::QUEUE_NUM,
            regs::QUEUE_READY,
            regs::QUEUE_NOTIFY,
            regs::INTERRUPT_ACK,
            regs::STATUS,
            regs::QUEUE_DESC_LOW,
            regs::QUEUE_DESC_HIGH,
            regs::QUEUE_AVAIL_LOW,
            regs::QUEUE_AVAIL_HIGH,
            regs::QUEUE_USED_LOW,
            regs::QUEUE_USED_HIGH,
        ];
        let mut interrupts = 0;
        for round in 0..200 {
            let (img, mut d) = blk_driver();
            d.start();
            for _ in 0..200 {
                let r = rand();
                match r % 8 {
                    // Garbage in the descriptor table, the available ring or the buffers.
                    0..=2 => {
                        let base = [DESC, AVAIL, HEADER, 0x40_000][(r >> 8) as usize % 4];
                        let at = base + (rand() % 512);
                        let v = rand();
                        let bytes = if r & 0x100 != 0 { v.to_le_bytes() } else { (v & 0x1f).to_le_bytes() };
                        let _ = d.mem.write_slice(&bytes, GuestAddress(at));
                    }
                    // A well-formed request now and then, so that processing goes deep.
                    3 => {
                        d.write_header((rand() % 10) as u32, rand() % 10);
                        d.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
                    }
                    4 => d.notify(),
                    5 => {
                        let v = rand();
                        let idx =
                            if v & 1 == 0 { d.avail_idx.wrapping_add((v >> 1) as u16 % 4) } else { v as u16 };
                        let _ = d.mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2));
                    }
                    _ => {
                        let offset = if r & 0x100 != 0 {
                            offsets[(r >> 9) as usize % offsets.len()]
                        } else {
                            r % 0x200
                        };
                        let v = rand();
                        let value = if v & 1 == 0 { (v >> 1) as u32 % 20 } else { (v >> 1) as u32 };
                        d.write_reg(offset, value);
                    }
                }
                // Start over now and then, and soon after the device gave up.
                if r % 61 == 0 || (d.status() & status::NEEDS_RESET != 0 && r % 3 == 0) {
                    d.start();
                }
            }
            interrupts += d.take_irq();
            // Whatever happened, the state can be saved and restored.
            let state = d.t.state();
            let efd = EventFd::new(0).expect("eventfd");
            let blk = Box::new(Block::new(img.open(false), false, b"id").expect("block"));
            if let Err(e) = MmioTransport::restore(&state, blk, d.mem.clone(), efd) {
                panic!("round {round}: state {state:?} does not restore: {e}");
            }
        }
        // Not just garbage bouncing off the first check: requests did complete.
        assert!(interrupts > 1000, "only {interrupts} interrupts in all");
    }

    /// A device whose queue 0 is a receive queue: each device event fills every available
    /// chain with up to 4 bytes of "fill". Counts the chains `process` sees.
    #[derive(Debug)]
    struct Filler {
        queues: Vec<u16>,
        processed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl VirtioDevice for Filler {
        fn device_type(&self) -> u32 {
            43
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.queues
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn process(&mut self, _queue: u16, _chain: &Chain, _mem: &GuestMemory) -> u32 {
            self.processed.fetch_add(1, Ordering::Relaxed);
            0
        }
        fn queue_kind(&self, queue: u16) -> QueueKind {
            if queue == 0 {
                QueueKind::Receive
            } else {
                QueueKind::Request
            }
        }
        fn device_event(&mut self, queues: &mut DeviceQueues<'_>) -> Poll {
            assert!(!queues.has_available(7), "no such queue");
            while queues.serve_next(0, |chain, mem| {
                let n = chain.writable_len().min(4) as usize;
                chain.write_at(mem, 0, &b"fill"[..n]).map_or(0, |()| n as u32)
            }) {}
            Poll::WaitForDriver
        }
    }

    #[test]
    fn receive_queues_are_left_to_device_events() {
        let processed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut d = Driver::new(Box::new(Filler { queues: vec![16, 16], processed: processed.clone() }));
        let event =
            d.t.event_fd()
                .expect("a device with a receive queue has an event fd")
                .try_clone()
                .expect("clone");
        assert_eq!(d.t.backend_fd(), None);
        // Before DRIVER_OK: nothing happens.
        d.negotiate();
        d.setup_queue(u32::from(QSIZE), DESC, AVAIL, USED);
        d.add_chain(&[(DATA, 8, true)]);
        d.notify();
        assert!(event.read().is_err(), "notifications before DRIVER_OK are ignored");
        assert_eq!(d.t.device_event(), Poll::WaitForDriver);
        assert_eq!(d.used_idx(), 0);
        // DRIVER_OK signals the event fd: buffers added before are usable now.
        d.add_status(status::DRIVER_OK);
        assert_eq!(event.read().expect("signalled"), 1);
        d.t.device_event();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used_elem(0).1, 4);
        assert_eq!(d.take_irq(), 1);
        // A notification of the receive queue only signals the event fd.
        for _ in 0..3 {
            d.add_chain(&[(DATA, 2, true)]);
        }
        d.notify();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(processed.load(Ordering::Relaxed), 0);
        assert_eq!(event.read().expect("signalled"), 1);
        d.notify();
        // The device event takes all three, with one interrupt, and clears the event fd.
        d.t.device_event();
        assert!(event.read().is_err(), "cleared");
        assert_eq!(d.used_idx(), 4);
        assert_eq!(d.used_elem(3).1, 2);
        let mut b = [0u8; 4];
        d.mem.read_slice(&mut b, GuestAddress(DATA)).expect("read");
        assert_eq!(&b, b"fill");
        assert_eq!(d.take_irq(), 1);
        // Nothing completed: no interrupt. The driver asks for none: none.
        d.t.device_event();
        assert_eq!(d.take_irq(), 0);
        d.mem.write_obj(1u16.to_le(), GuestAddress(AVAIL)).expect("flags");
        d.add_chain(&[(DATA, 2, true)]);
        d.t.device_event();
        assert_eq!(d.used_idx(), 5);
        assert_eq!(d.take_irq(), 0);
        d.mem.write_obj(0u16.to_le(), GuestAddress(AVAIL)).expect("flags");
        // A broken chain: DEVICE_NEEDS_RESET and a configuration interrupt.
        d.write_desc(DESC, 0, DATA, 8, VRING_DESC_F_NEXT as u16, 0);
        d.publish(0);
        assert_eq!(d.t.device_event(), Poll::WaitForDriver);
        assert_ne!(d.status() & status::NEEDS_RESET, 0);
        assert_ne!(d.read_reg(regs::INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_eq!(d.take_irq(), 1);
        assert_eq!(d.used_idx(), 5);
        // The state saves and restores (nothing in flight), and a reset brings it back.
        let state = d.t.state();
        let efd = EventFd::new(0).expect("eventfd");
        let filler = Filler { queues: vec![16, 16], processed: processed.clone() };
        MmioTransport::restore(&state, Box::new(filler), d.mem.clone(), efd).expect("restore");
        d.start();
        d.add_chain(&[(DATA, 8, true)]);
        d.t.device_event();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(processed.load(Ordering::Relaxed), 0);
        // Devices without a receive queue have no event fd, and device events do nothing.
        let (_img, mut blk) = blk_driver();
        assert!(blk.t.event_fd().is_none());
        blk.start();
        blk.write_header(VIRTIO_BLK_T_IN, 0);
        blk.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(blk.t.device_event(), Poll::WaitForDriver);
        assert_eq!(blk.used_idx(), 0);
    }

    #[test]
    fn works_on_the_mmio_bus() {
        let img = TempImage::new(SECTOR_SIZE);
        let blk = Block::new(img.open(false), false, b"").expect("block");
        let efd = EventFd::new(0).expect("eventfd");
        let t = MmioTransport::new(Box::new(blk), crate::testing::memory(), efd).expect("transport");
        let mut bus = ferry_devices::Bus::new();
        bus.insert(0xd000_0000, MMIO_LEN, std::sync::Arc::new(std::sync::Mutex::new(t))).expect("insert");
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0000, &mut b));
        assert_eq!(u32::from_le_bytes(b), MAGIC_VALUE);
        assert!(bus.write(0xd000_0070, &1u32.to_le_bytes()));
        assert!(bus.read(0xd000_0070, &mut b));
        assert_eq!(u32::from_le_bytes(b), 1);
    }
}
