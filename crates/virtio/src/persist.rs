//! Saving and restoring a virtio-mmio transport and its queues, for checkpoints and live
//! migration.
//!
//! The state is taken between vCPU exits and device events: requests are served
//! synchronously inside the `QueueNotify` exit, and a device event completes every chain
//! it takes before it returns, so none is ever in flight and every chain is either
//! completed (in the used ring, in guest memory) or still only in the available ring,
//! where the restored device finds it at `next_avail`. The device itself carries no state
//! of its own beyond what is here (virtio-blk: its image, given again on restore;
//! virtio-net: its MAC, in the configuration space, and a tap, any tap); the configuration
//! space is saved so that a restore onto a different device (another image size, a
//! read-only flag that changed, another MAC) is refused instead of surprising the guest.
//!
//! Compatibility: fields are only ever added, with `#[serde(default)]`, following the
//! rule of `ferry-checkpoint`.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VirtioDevice;
use crate::mmio::{self, status, MmioTransport, INT_CONFIG, INT_USED_RING};
use crate::queue::{self, VirtQueue};
use crate::GuestMemory;

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport cannot be built for the device at all.
    #[error("cannot create the transport for the restored device")]
    Transport(#[from] mmio::Error),
    /// The state is of another kind of device.
    #[error("the state is of virtio device type {saved}, the device given is of type {device}")]
    DeviceType {
        /// Type in the state.
        saved: u32,
        /// Type of the device given.
        device: u32,
    },
    /// The device offers other features than the saved one did.
    #[error("the saved device offered features {saved:#x}, the device given offers {device:#x}")]
    Features {
        /// Offered features in the state.
        saved: u64,
        /// Features the device given offers.
        device: u64,
    },
    /// The driver accepted features the device never offered.
    #[error("the saved driver features {acked:#x} include some not offered ({offered:#x})")]
    DriverFeatures {
        /// Accepted features.
        acked: u64,
        /// Offered features.
        offered: u64,
    },
    /// The configuration space differs (another image size, say).
    #[error("the device's configuration space differs from the saved one")]
    Config,
    /// A status no sequence of driver writes produces.
    #[error("the saved device status {0:#x} is impossible")]
    Status(u32),
    /// Interrupt status bits that do not exist.
    #[error("the saved interrupt status {0:#x} has unknown bits")]
    InterruptStatus(u32),
    /// Another number of queues.
    #[error("the state has {saved} queues, the device given has {device}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device given.
        device: usize,
    },
    /// A queue's maximum size differs.
    #[error("queue {index} had maximum size {saved}, the device given has {device}")]
    QueueMaxSize {
        /// The queue.
        index: usize,
        /// Maximum in the state.
        saved: u16,
        /// Maximum of the device given.
        device: u16,
    },
    /// A queue state no running device could be in.
    #[error("queue {index}: {why}")]
    QueueState {
        /// The queue.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A queue that was running cannot be rebuilt on this memory.
    #[error("queue {index} cannot be restored")]
    Queue {
        /// The queue.
        index: usize,
        /// Why.
        #[source]
        source: queue::Error,
    },
}

/// One virtqueue's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtQueueState {
    /// The device's maximum size for this queue.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver made the queue ready.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring (driver area).
    pub avail_ring: u64,
    /// Guest-physical address of the used ring (device area).
    pub used_ring: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use. Never offered by this transport, so always false;
    /// kept so that a state from a transport that did offer it is refused, not misread.
    #[serde(default)]
    pub event_idx: bool,
}

/// A virtio-mmio transport's saved state: everything needed to recreate it, with its
/// device, on another host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The virtio device ID.
    pub device_type: u32,
    /// Features offered (device and transport).
    pub device_features: u64,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// The device status register.
    pub status: u32,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// The device configuration space as the guest saw it.
    pub config: Vec<u8>,
    /// The queues, in index order.
    pub queues: Vec<VirtQueueState>,
}

/// How much configuration space is saved and compared (the whole of virtio-blk's).
const CONFIG_SAVE_LEN: usize = 256;

fn config_bytes(device: &dyn VirtioDevice) -> Vec<u8> {
    let mut config = vec![0u8; CONFIG_SAVE_LEN];
    device.read_config(0, &mut config);
    // Trailing zeros carry nothing; leave them out of the saved state.
    let len = config.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    config.truncate(len);
    config
}

impl MmioTransport {
    /// The transport's state. Take it while no vCPU is in an exit to this device.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            device_features: self.device_features,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            config: config_bytes(self.device.as_ref()),
            queues: self
                .queues
                .iter()
                .map(|q| VirtQueueState {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                    next_avail: q.ring.as_ref().map_or(0, |r| r.next_avail()),
                    next_used: q.ring.as_ref().map_or(0, |r| r.next_used()),
                    event_idx: false,
                })
                .collect(),
        }
    }

    /// Recreates a transport from `state` around `device` (built afresh by the caller,
    /// on the same image), on the restored guest memory `mem`, interrupting through
    /// `interrupt`. Refuses a state for another device or one no transport could be
    /// in. If the saved interrupt status was pending, the interrupt is raised again
    /// (a spurious interrupt is harmless; a lost one could hang the driver).
    pub fn restore(
        state: &MmioTransportState,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: EventFd,
    ) -> Result<Self, Error> {
        let mut t = MmioTransport::new(device, mem, interrupt)?;
        let device_type = t.device.device_type();
        if state.device_type != device_type {
            return Err(Error::DeviceType { saved: state.device_type, device: device_type });
        }
        if state.device_features != t.device_features {
            return Err(Error::Features { saved: state.device_features, device: t.device_features });
        }
        if state.driver_features & !state.device_features != 0 {
            return Err(Error::DriverFeatures {
                acked: state.driver_features,
                offered: state.device_features,
            });
        }
        if state.config != config_bytes(t.device.as_ref()) {
            return Err(Error::Config);
        }
        check_status(state.status)?;
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(Error::InterruptStatus(state.interrupt_status));
        }
        if state.queues.len() != t.queues.len() {
            return Err(Error::QueueCount { saved: state.queues.len(), device: t.queues.len() });
        }
        let needs_reset = state.status & status::NEEDS_RESET != 0;
        for (index, (saved, q)) in state.queues.iter().zip(t.queues.iter_mut()).enumerate() {
            if saved.ready && state.status & status::FEATURES_OK == 0 {
                return Err(Error::QueueState { index, why: "ready before feature negotiation" });
            }
            restore_queue(index, saved, q, &t.mem, needs_reset)?;
        }
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.interrupt_status = state.interrupt_status;
        t.config_generation = state.config_generation;
        if t.status & status::DRIVER_OK != 0 {
            t.device.activate(t.driver_features);
            // A device with device-initiated work looks at its queues at once.
            t.wake();
        }
        if t.interrupt_status != 0 {
            // The bits are already set; this only writes the eventfd.
            t.raise(t.interrupt_status);
        }
        Ok(t)
    }
}

/// Checks that a driver following the transport's rules could have produced `s`.
fn check_status(s: u32) -> Result<(), Error> {
    let known = status::DRIVER_BITS | status::NEEDS_RESET;
    let bad = s & !known != 0
        || (s & status::FEATURES_OK != 0 && s & status::DRIVER == 0)
        || (s & status::DRIVER_OK != 0 && s & status::FEATURES_OK == 0);
    if bad {
        return Err(Error::Status(s));
    }
    Ok(())
}

fn restore_queue(
    index: usize,
    saved: &VirtQueueState,
    q: &mut VirtQueue,
    mem: &GuestMemory,
    needs_reset: bool,
) -> Result<(), Error> {
    if saved.max_size != q.max_size {
        return Err(Error::QueueMaxSize { index, saved: saved.max_size, device: q.max_size });
    }
    if saved.event_idx {
        return Err(Error::QueueState { index, why: "event index suppression is not supported" });
    }
    q.size = saved.size;
    q.desc_table = saved.desc_table;
    q.avail_ring = saved.avail_ring;
    q.used_ring = saved.used_ring;
    q.ready = saved.ready;
    if !saved.ready {
        if saved.next_avail != 0 || saved.next_used != 0 {
            return Err(Error::QueueState { index, why: "ring positions on a queue that is not ready" });
        }
        return Ok(());
    }
    // Requests complete as they are taken, so the device is at most one request (the
    // one whose chain broke the queue) ahead in the available ring.
    let in_flight = saved.next_avail.wrapping_sub(saved.next_used);
    if in_flight > 1 || (in_flight == 1 && !needs_reset) {
        return Err(Error::QueueState { index, why: "requests taken but not completed" });
    }
    match q.build_ring(mem, saved.next_avail, saved.next_used) {
        Ok(ring) => q.ring = Some(ring),
        // A broken queue stays broken: the guest has been told to reset the device.
        Err(_) if needs_reset => q.ring = None,
        Err(source) => return Err(Error::Queue { index, source }),
    }
    Ok(())
}

impl ferry_checkpoint::Persist for MmioTransport {
    type State = MmioTransportState;
    type Args = (Box<dyn VirtioDevice>, GuestMemory, EventFd);
    type Error = Error;

    fn save(&self) -> Self::State {
        self.state()
    }

    fn restore((device, mem, interrupt): Self::Args, state: &Self::State) -> Result<Self, Self::Error> {
        MmioTransport::restore(state, device, mem, interrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Block, SECTOR_SIZE};
    use crate::testing::{copy_memory, regs, Driver, Dummy, TempImage, AVAIL, DESC, MEM_SIZE, QSIZE, USED};
    use ferry_checkpoint::Persist;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const S_OK: u8 = VIRTIO_BLK_S_OK as u8;

    fn block(img: &TempImage, read_only: bool) -> Box<dyn VirtioDevice> {
        Box::new(Block::new(img.open(read_only), read_only, b"id").expect("block"))
    }

    /// Moves `d` to a restored transport over a copy of its memory.
    fn migrate(d: Driver, state: &MmioTransportState, device: Box<dyn VirtioDevice>) -> Driver {
        let mem = copy_memory(&d.mem);
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let t = MmioTransport::restore(state, device, mem.clone(), irq.try_clone().expect("clone"))
            .expect("restore");
        Driver { t, mem, irq, avail_idx: d.avail_idx, next_desc: d.next_desc }
    }

    #[test]
    fn restored_transport_carries_on() {
        let img = TempImage::new(32 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"id");
        d.start();
        let data = vec![0x5au8; 1024];
        assert_eq!(d.blk_request(VIRTIO_BLK_T_OUT, 4, &data, 0).status, S_OK);
        assert_eq!(d.blk_request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).status, S_OK);
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 4, &[], 512).status, S_OK);
        // Interrupt raised, not yet acknowledged when the VM stops.
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), crate::mmio::INT_USED_RING);
        d.write_reg(regs::QUEUE_SEL, 0);

        let state = d.t.state();
        assert_eq!(state.device_type, 2);
        assert_eq!(state.status, 0xf);
        assert_eq!(state.driver_features, state.device_features);
        assert_eq!(state.config[..8], 32u64.to_le_bytes());
        let q = &state.queues[0];
        assert_eq!((q.max_size, q.size, q.ready), (256, QSIZE, true));
        assert_eq!((q.desc_table, q.avail_ring, q.used_ring), (DESC, AVAIL, USED));
        assert_eq!((q.next_avail, q.next_used), (3, 3));

        let json = serde_json::to_string(&state).expect("json");
        let back: MmioTransportState = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, state);

        let mut r = migrate(d, &back, block(&img, false));
        assert_eq!(r.t.state(), state);
        assert_eq!(r.take_irq(), 1, "the pending interrupt is raised again");
        assert_eq!(r.status(), 0xf);
        assert_eq!(r.read_reg(regs::QUEUE_READY), 1);
        r.write_reg(regs::INTERRUPT_ACK, crate::mmio::INT_USED_RING);
        // The driver goes on where it was: the next used element is number 3.
        let c = r.blk_request(VIRTIO_BLK_T_IN, 4, &[], 1024);
        assert_eq!((c.status, c.len), (S_OK, 1025));
        assert_eq!(c.data, data);
        assert_eq!(r.used_idx(), 4);
        let c = r.blk_request(VIRTIO_BLK_T_OUT, 0, &data[..512], 0);
        assert_eq!(c.status, S_OK);
        assert_eq!(&img.contents()[..512], &data[..512]);
        assert_eq!(r.t.state().queues[0].next_used, 5);
        assert_eq!(r.take_irq(), 2);

        // And through the Persist trait.
        let saved = Persist::save(&r.t);
        let args = (block(&img, false), r.mem.clone(), EventFd::new(0).expect("eventfd"));
        let again = <MmioTransport as Persist>::restore(args, &saved).expect("restore");
        assert_eq!(again.state(), saved);
    }

    #[test]
    fn fresh_and_half_set_up_transports_restore() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let d = Driver::blk(&img, false, b"id");
        let fresh = d.t.state();
        let r = migrate(d, &fresh, block(&img, false));
        assert_eq!(r.t.state(), fresh);

        // Between FEATURES_OK and DRIVER_OK, queue configured but not ready.
        let mut d = Driver::blk(&img, false, b"id");
        d.negotiate();
        d.write_reg(regs::QUEUE_NUM, 8);
        d.write_reg(regs::QUEUE_DESC_LOW, 0x8000);
        let state = d.t.state();
        let mut r = migrate(d, &state, block(&img, false));
        assert_eq!(r.t.state(), state);
        r.write_reg(regs::QUEUE_AVAIL_LOW, AVAIL as u32);
        r.write_reg(regs::QUEUE_USED_LOW, USED as u32);
        r.write_reg(regs::QUEUE_READY, 1);
        r.add_status(crate::mmio::status::DRIVER_OK);
        assert_eq!(r.status(), 0xf);
        assert_eq!(r.t.state().queues[0].desc_table, 0x8000);
    }

    #[test]
    fn a_broken_device_stays_broken() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"id");
        d.start();
        d.write_desc(DESC, 0, 0x10_000, 16, VRING_DESC_F_NEXT as u16, 0);
        d.publish(0);
        d.notify();
        let state = d.t.state();
        assert_ne!(state.status & status::NEEDS_RESET, 0);
        assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (1, 0));
        let mut r = migrate(d, &state, block(&img, false));
        assert_ne!(r.status() & status::NEEDS_RESET, 0);
        r.notify();
        assert_eq!(r.used_idx(), 0);
        r.start();
        assert_eq!(r.blk_request(VIRTIO_BLK_T_IN, 0, &[], 512).status, S_OK);
    }

    #[test]
    fn mismatched_or_impossible_states_are_refused() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"id");
        d.start();
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 0, &[], 512).status, S_OK);
        let good = d.t.state();
        let restore = |state: &MmioTransportState, device: Box<dyn VirtioDevice>| {
            MmioTransport::restore(state, device, d.mem.clone(), EventFd::new(0).expect("eventfd"))
        };
        restore(&good, block(&img, false)).expect("the good state restores");

        // Other devices.
        assert!(matches!(
            restore(&good, Box::new(Dummy { queues: vec![256] })),
            Err(Error::DeviceType { saved: 2, device: 42 })
        ));
        assert!(matches!(restore(&good, block(&img, true)), Err(Error::Features { .. })));
        let bigger = TempImage::new(16 * SECTOR_SIZE);
        assert!(matches!(restore(&good, block(&bigger, false)), Err(Error::Config)));
        let dummy = Driver::new(Box::new(Dummy { queues: vec![256] })).t.state();
        assert!(matches!(
            restore(&dummy, Box::new(Dummy { queues: vec![256, 256] })),
            Err(Error::QueueCount { saved: 1, device: 2 })
        ));
        assert!(matches!(
            restore(&dummy, Box::new(Dummy { queues: vec![128] })),
            Err(Error::QueueMaxSize { index: 0, saved: 256, device: 128 })
        ));

        // Impossible values.
        let bad = |f: &dyn Fn(&mut MmioTransportState)| {
            let mut s = good.clone();
            f(&mut s);
            restore(&s, block(&img, false))
        };
        assert!(matches!(bad(&|s| s.driver_features |= 1 << 29), Err(Error::DriverFeatures { .. })));
        assert!(matches!(bad(&|s| s.status |= 0x10), Err(Error::Status(0x1f))));
        assert!(matches!(bad(&|s| s.status = status::DRIVER_OK | status::DRIVER), Err(Error::Status(_))));
        assert!(matches!(bad(&|s| s.status = status::FEATURES_OK), Err(Error::Status(_))));
        assert!(matches!(bad(&|s| s.interrupt_status = 4), Err(Error::InterruptStatus(4))));
        assert!(matches!(bad(&|s| s.queues[0].size = 12), Err(Error::Queue { index: 0, .. })));
        assert!(matches!(bad(&|s| s.queues[0].size = 0), Err(Error::Queue { index: 0, .. })));
        assert!(matches!(bad(&|s| s.queues[0].used_ring = MEM_SIZE), Err(Error::Queue { index: 0, .. })));
        assert!(matches!(bad(&|s| s.queues[0].desc_table = DESC + 4), Err(Error::Queue { index: 0, .. })));
        assert!(matches!(bad(&|s| s.queues[0].next_avail = 7), Err(Error::QueueState { index: 0, .. })));
        assert!(matches!(bad(&|s| s.queues[0].next_used = 2), Err(Error::QueueState { index: 0, .. })));
        assert!(matches!(bad(&|s| s.queues[0].event_idx = true), Err(Error::QueueState { index: 0, .. })));
        assert!(matches!(
            bad(&|s| {
                s.queues[0].ready = false;
                s.queues[0].next_avail = 1;
            }),
            Err(Error::QueueState { index: 0, .. })
        ));
        assert!(matches!(
            bad(&|s| s.status = status::ACKNOWLEDGE | status::DRIVER),
            Err(Error::QueueState { index: 0, .. })
        ));
        // A broken queue is acceptable only in a device that says it needs a reset.
        let broken = bad(&|s| {
            s.queues[0].size = 12;
            s.status |= status::NEEDS_RESET;
        })
        .expect("a broken queue in a device that needs a reset");
        assert_eq!(broken.state().queues[0].size, 12);
        assert!(broken.queues[0].ring.is_none());

        // A state from a later Ferry with fields this one does not know still reads.
        let mut json: serde_json::Value = serde_json::to_value(&good).expect("json");
        json["future_field"] = serde_json::json!(1);
        json["queues"][0]["future_queue_field"] = serde_json::json!("x");
        let later: MmioTransportState = serde_json::from_value(json).expect("parse");
        assert_eq!(later, good);
    }
}
