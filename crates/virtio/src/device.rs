//! What a virtio device implements for a transport to drive it.
//!
//! The transport owns everything the specification puts in the transport or the common
//! device model: feature negotiation, the status register, the virtqueues' configuration
//! and rings, interrupts. A device supplies its identity, its device-specific features
//! and configuration space, and handles one request (one descriptor chain) at a time.

use crate::chain::Chain;
use crate::GuestMemory;

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

    /// Serves one request, `chain`, taken from virtqueue `queue`. Returns the number of
    /// bytes written into the chain's device-writable buffers: the `len` of the used-ring
    /// element. A request the device cannot serve is answered (in a device-specific way),
    /// never a reason to panic.
    fn process(&mut self, queue: u16, chain: &Chain, mem: &GuestMemory) -> u32;
}
