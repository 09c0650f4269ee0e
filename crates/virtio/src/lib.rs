//! Virtio devices for Ferry: the virtio-mmio transport, a virtio-blk and a virtio-net
//! device.
//!
//! What is here:
//!
//! - [`mmio::MmioTransport`]: the virtio 1.x MMIO register block (version 2, "modern"
//!   only), as in section 4.2 of the virtio specification. The VMM places it on its MMIO
//!   bus (it implements [`ferry_devices::BusDevice`]) and forwards the vCPUs' MMIO exits
//!   to it. A write to `QueueNotify` processes that queue synchronously on the calling
//!   vCPU thread; completions set the used-buffer bit of `InterruptStatus` and write to an
//!   [`EventFd`](vmm_sys_util::eventfd::EventFd) that the VMM registers with KVM as an
//!   irqfd.
//! - [`block::Block`]: a virtio-blk device backed by a raw image in a [`std::fs::File`]:
//!   `IN`, `OUT`, `FLUSH` and `GET_ID` requests, read-only images, sector ranges checked
//!   against the capacity.
//! - [`net::Net`]: a virtio-net device on a [`ferry_net::Tap`]: one receive and one
//!   transmit queue, the MAC and a link-up status in the configuration space, no
//!   offloads. Transmit runs in the guest's `QueueNotify` exit; receive is
//!   device-initiated, run by the VMM's event loop through
//!   [`MmioTransport::device_event`] when the tap is readable or the guest added receive
//!   buffers (see [`device::QueueKind::Receive`]). Frames it cannot pass on are dropped
//!   and counted ([`net::NetStats`]).
//! - [`persist`]: the serialisable state of a transport and its queues, enough to recreate
//!   both on another host ([`mmio::MmioTransport::state`], [`mmio::MmioTransport::restore`]),
//!   with every field checked on restore.
//! - [`chain::Chain`]: one request's descriptor chain, read once from guest memory and
//!   seen by the device as a readable and a writable byte stream (any layout).
//!
//! The split virtqueue itself (rings, descriptor chains, indirect tables) is rust-vmm's
//! `virtio-queue`. Every access the devices make to guest memory goes through `vm-memory`,
//! so every byte a device writes is recorded in the region's
//! [`AtomicBitmap`](vm_memory::bitmap::AtomicBitmap): live migration collects those pages
//! together with KVM's dirty log.
//!
//! Guest mistakes never stop the VMM: a request the device cannot serve completes with an
//! error status (`VIRTIO_BLK_S_IOERR`, `VIRTIO_BLK_S_UNSUPP`) or, for a NIC, an empty used
//! element and a dropped frame; a queue the device cannot
//! use (rings outside guest memory, a bad size, a looping or truncated descriptor chain, an
//! available index too far ahead) puts the device in `DEVICE_NEEDS_RESET` and it ignores
//! that guest until it resets the device.
//!
//! ## Wiring it into a VMM
//!
//! ```text
//! let irq = EventFd::new(EFD_NONBLOCK)?;            // registered with KVM_IRQFD for the GSI
//! vm_fd.register_irqfd(&irq, gsi)?;
//! let blk = Block::new(image_file, read_only, b"serial")?;
//! let transport = MmioTransport::new(Box::new(blk), guest_memory.clone(), irq)?;
//! mmio_bus.insert(base, mmio::MMIO_LEN, Arc::new(Mutex::new(transport)))?;
//! // kernel command line: virtio_mmio.device=4K@<base>:<gsi>
//! ```
//!
//! A checkpoint saves [`MmioTransport::state`] (serde) with the vCPUs paused; a restore
//! builds a new [`Block`] on the same image and calls [`MmioTransport::restore`] with the
//! restored guest memory and a new eventfd (also available as
//! [`ferry_checkpoint::Persist`]).
//!
//! A NIC also needs the VMM's event loop (level-triggered epoll), which watches the
//! transport's event fd always and the tap only while the device can take frames:
//!
//! ```text
//! let net = Net::new(Tap::open(&cfg.tap)?, cfg.mac);    // on restore: net::saved_mac(&state)
//! let handle = net.handle();                             // tap fd, counters, announce()
//! let transport = MmioTransport::new(Box::new(net), guest_memory.clone(), irq)?;  // or ::restore
//! let event_fd = transport.event_fd().expect("a NIC has one").try_clone()?;
//! epoll.add(&event_fd, EPOLLIN);                         // always; the tap fd not yet
//! // when event_fd or the tap fd is readable:
//! match transport.lock().device_event() {                // clears event_fd
//!     Poll::Backend => epoll.add_or_keep(handle.tap_fd(), EPOLLIN),
//!     Poll::WaitForDriver => epoll.remove_if_there(handle.tap_fd()),
//! }
//! // after a migration, once the vCPUs run: handle.announce() at each ferry_net::rarp::schedule() delay
//! ```
//!
//! The event fd fires when the driver starts the device, adds receive buffers, and right
//! after a restore of a running device, so the tap is watched as soon as there is
//! somewhere to put its frames.
//!
//! What is not here (yet):
//!
//! - `VIRTIO_F_RING_EVENT_IDX` (notification suppression by index): not offered. The
//!   device never suppresses the driver's notifications; it honours the driver's
//!   `VRING_AVAIL_F_NO_INTERRUPT` flag.
//! - Packed virtqueues (`VIRTIO_F_RING_PACKED`), `VIRTIO_F_NOTIFICATION_DATA`,
//!   `VIRTIO_F_RING_RESET`, shared-memory regions, the legacy (version 1) MMIO layout and
//!   the PCI transport.
//! - virtio-blk `DISCARD`, `WRITE_ZEROES`, multiple queues, and any asynchronous I/O:
//!   requests run to completion inside the `QueueNotify` exit.
//! - virtio-net offloads (checksum, TSO/GSO, `MRG_RXBUF`), its control queue, multiple
//!   queue pairs, `VIRTIO_NET_F_MTU`, link status changes and indirect descriptors (not
//!   offered to a NIC); without `VIRTIO_F_RING_EVENT_IDX` the guest kicks the receive
//!   queue after every refill.
//! - Every other device type.

pub mod block;
pub mod chain;
pub mod device;
pub mod mmio;
pub mod net;
pub mod persist;
mod queue;

#[cfg(test)]
mod testing;

pub use block::Block;
pub use chain::Chain;
pub use device::{Poll, QueueKind, VirtioDevice};
pub use mmio::{DeviceQueues, MmioTransport};
pub use net::{Net, NetHandle, NetStats};
pub use persist::{MmioTransportState, VirtQueueState};

/// Guest memory as the VMM maps it: `vm-memory` regions that log the VMM's own writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
