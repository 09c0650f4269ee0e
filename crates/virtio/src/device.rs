//! What a virtio device implements for a transport to drive it.
//!
//! The transport owns everything the specification puts in the transport or the common
//! device model: feature negotiation, the status register, the virtqueues' configuration
//! and rings, interrupts. A device supplies its identity, its device-specific features
//! and configuration space, and handles one request (one descriptor chain) at a time.
//!
//! Most queues carry requests: the driver makes a chain available and notifies, and the
//! transport hands the chain to [`VirtioDevice::process`] there and then. A network
//! device's receive queue is the other way round: the driver only lends it buffers, and
//! the device fills one when a frame arrives from its backend, at a time of the backend's
//! choosing. Such a queue is of kind [`QueueKind::Receive`]; the transport does not
//! process it on notification but signals its event fd, and the VMM's event loop calls
//! [`MmioTransport::device_event`](crate::mmio::MmioTransport::device_event), which calls
//! [`VirtioDevice::device_event`] with access to the queues.

use std::os::fd::RawFd;

use crate::chain::Chain;
use crate::mmio::DeviceQueues;
use crate::GuestMemory;

/// How the transport treats the driver's notifications of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    /// The driver's chains are requests: on a notification the transport passes each to
    /// [`VirtioDevice::process`] and completes it with the length returned.
    Request,
    /// The driver's chains are empty buffers for the device to fill when it has input
    /// (a network device's receive queue). A notification only means there are new
    /// buffers: the transport signals its event fd and the device takes the buffers in
    /// [`VirtioDevice::device_event`].
    Receive,
}

/// What the VMM's event loop should wait for on behalf of a device, as
/// [`VirtioDevice::device_event`] (through
/// [`MmioTransport::device_event`](crate::mmio::MmioTransport::device_event)) reports it.
/// The transport's event fd is always to be watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Watch the device's backend fd ([`VirtioDevice::backend_fd`]) for input as well:
    /// the device has buffers to put it in.
    Backend,
    /// Stop watching the backend fd: the device will not take input now, because the
    /// driver has given it no buffer to put it in, has not started the device (or must
    /// reset it), or the backend failed. Input waits in the backend (or is dropped
    /// there). The transport's event fd fires when the driver adds buffers or starts
    /// the device; the next `device_event` then says [`Poll::Backend`] again.
    WaitForDriver,
}

/// Reads `data.len()` bytes at `offset` of a device's configuration space `config`; bytes
/// past its end read as zero (the guest may read any width anywhere in the window).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device ID (`VIRTIO_ID_BLOCK` = 2, ...).
    fn device_type(&self) -> u32;

    /// The feature bits the device offers. The transport adds `VIRTIO_F_VERSION_1` and
    /// refuses any driver that does not accept it.
    fn features(&self) -> u64;

    /// The maximum size of each of the device's virtqueues; its length is the number of
    /// queues. Each must be a power of two no greater than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads `data.len()` bytes of the device configuration space at `offset`. Bytes
    /// beyond the end of the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space at `offset`. The default ignores the write
    /// (configuration spaces are mostly read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "ignoring a write to read-only virtio configuration space");
    }

    /// The driver has set `DRIVER_OK` having accepted `features`.
    fn activate(&mut self, features: u64) {
        let _ = features;
    }

    /// The driver has reset the device.
    fn reset(&mut self) {}

    /// Serves one request, `chain`, taken from virtqueue `queue` (of kind
    /// [`QueueKind::Request`]). Returns the number of bytes written into the chain's
    /// device-writable buffers: the `len` of the used-ring element. A request the device
    /// cannot serve is answered (in a device-specific way), never a reason to panic.
    fn process(&mut self, queue: u16, chain: &Chain, mem: &GuestMemory) -> u32;

    /// How the transport treats notifications of `queue`. The default: requests.
    fn queue_kind(&self, queue: u16) -> QueueKind {
        let _ = queue;
        QueueKind::Request
    }

    /// The fd of the device's backend that the VMM watches for input (a tap), if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }

    /// Device-initiated work, run from the VMM's event loop: input on the backend fd, or
    /// new buffers on a [`QueueKind::Receive`] queue. The device takes chains with
    /// [`DeviceQueues::serve_next`], which completes each before it returns (nothing is
    /// ever left in flight, so the transport's state can be saved between two calls); the
    /// transport interrupts the driver once afterwards if anything completed. Called only
    /// while the driver is running the device. The default does nothing.
    fn device_event(&mut self, queues: &mut DeviceQueues<'_>) -> Poll {
        let _ = queues;
        Poll::WaitForDriver
    }
}
