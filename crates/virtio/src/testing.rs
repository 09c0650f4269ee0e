//! Test helpers: temporary images, and a driver that plays the guest against a transport
//! through its registers and guest memory only.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::block::Block;
use crate::chain::Chain;
use crate::device::VirtioDevice;
use crate::mmio::{status, MmioTransport};
use crate::GuestMemory;

/// Guest memory size.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where the driver puts the queue.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// The queue size the driver picks.
pub const QSIZE: u16 = 16;
/// Request buffers.
pub const HEADER: u64 = 0x10_000;
pub const STATUS: u64 = 0x20_000;
pub const DATA: u64 = 0x100_000;
/// What the status byte holds before the device writes it.
pub const POISON: u8 = 0xee;

/// Register offsets, as a driver knows them.
pub mod regs {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A file in the temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// A file of `size` bytes, each byte its offset modulo 251 (so that data read back
    /// from a given place is recognisable).
    pub fn new(size: u64) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ferry-virtio-test-{}-{n}.img", std::process::id()));
        let contents: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, contents).expect("write image");
        Self { path }
    }

    /// Opens it.
    pub fn open(&self, read_only: bool) -> File {
        OpenOptions::new().read(true).write(!read_only).open(&self.path).expect("open image")
    }

    /// Its contents.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read image")
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The byte `TempImage::new` put at `offset`.
pub fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A device with one queue that completes every request with nothing written.
#[derive(Debug)]
pub struct Dummy {
    pub queues: Vec<u16>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
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
        0
    }
}

/// A copy of `mem` in fresh memory, as a migration's destination has it.
pub fn copy_memory(mem: &GuestMemory) -> GuestMemory {
    let copy = memory();
    let mut buf = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut buf, GuestAddress(0)).expect("read");
    copy.write_slice(&buf, GuestAddress(0)).expect("write");
    copy
}

/// Guest memory for the tests.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// One completed request.
#[derive(Debug)]
pub struct Completion {
    /// The used element's length.
    pub len: u32,
    /// The status byte.
    pub status: u8,
    /// The writable data buffer after completion.
    pub data: Vec<u8>,
}

/// A virtio driver, as a guest would run it.
#[derive(Debug)]
pub struct Driver {
    pub t: MmioTransport,
    pub mem: GuestMemory,
    pub irq: EventFd,
    pub avail_idx: u16,
    pub next_desc: u16,
}

impl Driver {
    /// A driver for `device`, on fresh memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = memory();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
        let t = MmioTransport::new(device, mem.clone(), irq.try_clone().expect("clone")).expect("transport");
        Self { t, mem, irq, avail_idx: 0, next_desc: 0 }
    }

    /// A driver for a virtio-blk device on `img`.
    pub fn blk(img: &TempImage, read_only: bool, id: &[u8]) -> Self {
        Self::new(Box::new(Block::new(img.open(read_only), read_only, id).expect("block")))
    }

    pub fn read_reg(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    pub fn status(&self) -> u32 {
        self.read_reg(regs::STATUS)
    }

    /// Adds `bits` to the status, as Linux's `virtio_add_status` does.
    pub fn add_status(&mut self, bits: u32) {
        let s = self.status();
        self.write_reg(regs::STATUS, s | bits);
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&mut self) -> u64 {
        self.write_reg(regs::DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read_reg(regs::DEVICE_FEATURES));
        self.write_reg(regs::DEVICE_FEATURES_SEL, 0);
        (high << 32) | u64::from(self.read_reg(regs::DEVICE_FEATURES))
    }

    pub fn write_driver_features(&mut self, features: u64) {
        self.write_reg(regs::DRIVER_FEATURES_SEL, 1);
        self.write_reg(regs::DRIVER_FEATURES, (features >> 32) as u32);
        self.write_reg(regs::DRIVER_FEATURES_SEL, 0);
        self.write_reg(regs::DRIVER_FEATURES, features as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, accept every offered feature, FEATURES_OK.
    pub fn negotiate(&mut self) -> u64 {
        self.write_reg(regs::STATUS, 0);
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        let features = self.device_features();
        self.write_driver_features(features);
        self.add_status(status::FEATURES_OK);
        assert_ne!(self.status() & status::FEATURES_OK, 0, "device refused its own features");
        features
    }

    /// Sets up queue 0 at `DESC`/`AVAIL`/`USED` with `size` entries and makes it ready.
    pub fn setup_queue(&mut self, size: u32, desc: u64, avail: u64, used: u64) {
        self.configure_queue(0, size, desc, avail, used);
        self.avail_idx = 0;
        self.next_desc = 0;
    }

    /// Sets up queue `index` with `size` entries at `desc`/`avail`/`used` (zeroed) and
    /// makes it ready.
    pub fn configure_queue(&mut self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.write_reg(regs::QUEUE_SEL, index);
        assert_eq!(self.read_reg(regs::QUEUE_READY), 0);
        self.write_reg(regs::QUEUE_NUM, size);
        for (low, value) in
            [(regs::QUEUE_DESC_LOW, desc), (regs::QUEUE_AVAIL_LOW, avail), (regs::QUEUE_USED_LOW, used)]
        {
            self.write_reg(low, value as u32);
            self.write_reg(low + 4, (value >> 32) as u32);
        }
        // A zeroed ring, as the driver allocates it.
        for addr in [desc, avail, used] {
            let _ = self.mem.write_slice(&[0u8; 16 * 16], GuestAddress(addr));
        }
        self.write_reg(regs::QUEUE_READY, 1);
    }

    /// Negotiates, sets up the queue at the usual place, sets DRIVER_OK.
    pub fn start(&mut self) {
        self.negotiate();
        self.setup_queue(u32::from(QSIZE), DESC, AVAIL, USED);
        self.add_status(status::DRIVER_OK);
        assert_eq!(self.status() & status::NEEDS_RESET, 0);
        assert_ne!(self.status() & status::DRIVER_OK, 0);
    }

    /// Writes descriptor `index` of the table at `table`.
    pub fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(table + 16 * u64::from(index))).expect("descriptor");
    }

    /// Puts `head` in the available ring and publishes it (no notification).
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head.to_le(), GuestAddress(slot)).expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2)).expect("avail idx");
    }

    /// Writes a chain of `(addr, len, device-writable)` buffers at the next free
    /// descriptors and publishes it. Returns its head.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % QSIZE;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(DESC, index, addr, len, flags, next);
            self.next_desc = next;
        }
        self.publish(head);
        head
    }

    pub fn notify(&mut self) {
        self.write_reg(regs::QUEUE_NOTIFY, 0);
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx"))
    }

    /// Used element `i` (modulo the queue size): (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (u32::from_le(id), u32::from_le(len))
    }

    /// Reads and clears the interrupt eventfd's counter (0 if it was not signalled).
    pub fn take_irq(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    /// Writes a virtio-blk request header at `HEADER`.
    pub fn write_header(&self, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HEADER)).expect("header");
    }

    /// Submits a virtio-blk request (header, `out` data, `in_len` bytes to fill, status)
    /// and waits for it: it must complete within the notification.
    pub fn blk_request(&mut self, request_type: u32, sector: u64, out: &[u8], in_len: u32) -> Completion {
        self.write_header(request_type, sector);
        self.mem.write_slice(&[POISON], GuestAddress(STATUS)).expect("status");
        let mut bufs = vec![(HEADER, 16, false)];
        if !out.is_empty() {
            self.mem.write_slice(out, GuestAddress(DATA)).expect("out data");
            bufs.push((DATA, out.len() as u32, false));
        }
        if in_len > 0 {
            self.mem.write_slice(&vec![POISON; in_len as usize], GuestAddress(DATA)).expect("in data");
            bufs.push((DATA, in_len, true));
        }
        bufs.push((STATUS, 1, true));
        self.submit_and_complete(&bufs, in_len)
    }

    /// Submits `bufs`, notifies, and returns the completion (checking it is the next used
    /// element and names the chain's head). The data read back is `in_len` bytes at `DATA`.
    pub fn submit_and_complete(&mut self, bufs: &[(u64, u32, bool)], in_len: u32) -> Completion {
        let before = self.used_idx();
        let head = self.add_chain(bufs);
        self.notify();
        assert_eq!(self.used_idx(), before.wrapping_add(1), "request not completed");
        let (id, len) = self.used_elem(before);
        assert_eq!(id, u32::from(head));
        let mut status = [0u8];
        self.mem.read_slice(&mut status, GuestAddress(STATUS)).expect("status");
        let mut data = vec![0u8; in_len as usize];
        self.mem.read_slice(&mut data, GuestAddress(DATA)).expect("data");
        Completion { len, status: status[0], data }
    }
}

/// A queue of its own, as a driver of a device with several queues keeps it: where its
/// rings are, and the driver's positions in them.
#[derive(Debug)]
pub struct Ring {
    pub index: u32,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub next_desc: u16,
    /// The used elements the driver has looked at.
    pub seen_used: u16,
}

impl Ring {
    /// Queue `index` of `QSIZE` entries with its rings at `base`, `base + 0x1000` and
    /// `base + 0x2000`.
    pub fn new(index: u32, base: u64) -> Self {
        Self {
            index,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            next_desc: 0,
            seen_used: 0,
        }
    }

    /// Configures the queue through `d`'s registers and makes it ready.
    pub fn setup(&mut self, d: &mut Driver) {
        d.configure_queue(self.index, u32::from(QSIZE), self.desc, self.avail, self.used);
        self.avail_idx = 0;
        self.next_desc = 0;
        self.seen_used = 0;
    }

    /// Writes a chain of `(addr, len, device-writable)` buffers at the next free
    /// descriptors and publishes it (no notification). Returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % QSIZE;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(self.desc + 16 * u64::from(index))).expect("descriptor");
            self.next_desc = next;
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head.to_le(), GuestAddress(slot)).expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
        head
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).expect("used idx"))
    }

    /// The used elements not looked at yet: (id, len) each.
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.seen_used != end {
            let at = self.used + 4 + 8 * u64::from(self.seen_used % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
            out.push((u32::from_le(id), u32::from_le(len)));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}
