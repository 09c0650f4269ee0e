//! The VM's virtio devices: where each sits (a 4 KiB virtio-mmio window from
//! [`MMIO_BASE`], one IOAPIC pin from [`FIRST_GSI`], in the order given on the command
//! line), how the guest learns of them (`virtio_mmio.device=4K@BASE:GSI` on the kernel
//! command line, and a `LNRO0005` device in the ACPI DSDT, see `ferry-acpi`), their interrupts (an irqfd per device) and their state in checkpoints
//! and migrations ([`VirtioState`]).
//!
//! A NIC is backed by a tap device on this host; only its MAC moves with the VM (the
//! destination may use a tap of another name). Its receive path runs on the VMM's event
//! loop ([`VirtioDevices::net_fds`], [`VirtioDevices::device_event`]).
//!
//! A disk's image is held under its lock ([`crate::disk`]) for as long as the device
//! lives; the device does its I/O through a duplicate of the same open file, so the lock
//! can be dropped and taken again (a migration's handover) without closing anything.

use std::sync::{Arc, Mutex};

use std::os::fd::{AsRawFd, RawFd};

use ferry_devices::Bus;
use ferry_net::{NetConfig, Tap};
use ferry_virtio::device::Poll;
use ferry_virtio::net::NetHandle;
use ferry_virtio::{Block, MmioTransport, Net};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::disk::Disk;
use crate::memory::GuestMemory;

/// First virtio-mmio window (inside the 32-bit MMIO hole).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of each window.
pub const MMIO_SIZE: u64 = ferry_virtio::mmio::MMIO_LEN;
/// IOAPIC pin of the first device (0-4 are the PC's timer, keyboard, cascade, COM2, COM1).
pub const FIRST_GSI: u32 = 5;
/// Most virtio devices in one VM (IOAPIC pins 5..=20).
pub const MAX_DEVICES: usize = 16;

/// Errors setting up virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More devices than windows and pins.
    #[error("{0} virtio devices requested; a VM can have at most {MAX_DEVICES}")]
    TooMany(usize),
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] crate::disk::Error),
    /// The block device refused the image.
    #[error("disk {path}: cannot create its virtio-blk device")]
    Block {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: ferry_virtio::block::Error,
    },
    /// The transport could not be created.
    #[error("cannot create a virtio-mmio transport")]
    Transport(#[from] ferry_virtio::mmio::Error),
    /// A saved device state does not fit the device recreated from it.
    #[error("virtio device {index}: the saved state does not fit it")]
    Restore {
        /// Its position.
        index: usize,
        /// Why.
        #[source]
        source: ferry_virtio::persist::Error,
    },
    /// A saved state names devices in another order or place.
    #[error("virtio device {index}: saved at {saved_base:#x} pin {saved_gsi}, expected {base:#x} pin {gsi}")]
    Placement {
        /// Its position.
        index: usize,
        /// Saved window.
        saved_base: u64,
        /// Saved pin.
        saved_gsi: u32,
        /// Expected window.
        base: u64,
        /// Expected pin.
        gsi: u32,
    },
    /// An eventfd or irqfd could not be set up.
    #[error("cannot set up the interrupt of virtio device {index}")]
    Interrupt {
        /// Its position.
        index: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The MMIO bus refused the window.
    #[error(transparent)]
    Bus(#[from] ferry_devices::bus::Error),
    /// A tap device cannot be used.
    #[error(transparent)]
    Tap(#[from] ferry_net::tap::Error),
    /// A saved device list and its backends do not match up.
    #[error("{states} saved virtio devices but {backends} backends for them")]
    Backends {
        /// Saved devices.
        states: usize,
        /// Backends.
        backends: usize,
    },
    /// Two NICs share a MAC or a tap.
    #[error("{0}")]
    Nics(String),
    /// A saved NIC state names another MAC than its configuration.
    #[error("virtio device {index}: the saved NIC has MAC {saved}, the configuration {config}")]
    Mac {
        /// Its position.
        index: usize,
        /// In the state.
        saved: String,
        /// In the configuration.
        config: String,
    },
}

pub use ferry_migration::schema::{Backend, VirtioState};

/// What backs each device, opened: disks (locked or not, as the caller chose) and taps.
#[derive(Debug, Default)]
pub struct Opened {
    disks: std::vec::IntoIter<Disk>,
    taps: std::vec::IntoIter<Tap>,
}

/// Opens what `backends` name, in order, before any device exists: every disk image
/// (taking its lock if `lock_disks`) and every tap, where a NIC's tap may be renamed by
/// `tap_map` (`(name on the source, name here)`: taps are per host, the MAC moves).
pub fn open_backends(
    backends: &[Backend],
    lock_disks: bool,
    tap_map: &[(String, String)],
) -> Result<(Opened, Vec<Backend>), Error> {
    if backends.len() > MAX_DEVICES {
        return Err(Error::TooMany(backends.len()));
    }
    // The backends as they are called here, checked together before anything is opened.
    let here: Vec<Backend> = backends
        .iter()
        .map(|b| match b {
            Backend::Net(cfg) => {
                let name = tap_map.iter().find(|(from, _)| *from == cfg.tap).map_or(&cfg.tap, |(_, to)| to);
                Backend::Net(NetConfig { tap: name.clone(), mac: cfg.mac })
            }
            Backend::Disk(_) => b.clone(),
        })
        .collect();
    let nics: Vec<NetConfig> = here
        .iter()
        .filter_map(|b| match b {
            Backend::Net(n) => Some(n.clone()),
            Backend::Disk(_) => None,
        })
        .collect();
    ferry_net::mac::check_nics(&nics).map_err(Error::Nics)?;
    let mut disks = Vec::new();
    let mut taps = Vec::new();
    for b in &here {
        match b {
            Backend::Disk(cfg) => {
                let mut d = Disk::open_unlocked(cfg)?;
                if lock_disks {
                    d.lock()?;
                }
                disks.push(d);
            }
            Backend::Net(cfg) => taps.push(Tap::open(&cfg.tap)?),
        }
    }
    Ok((Opened { disks: disks.into_iter(), taps: taps.into_iter() }, here))
}

struct Entry {
    backend: Backend,
    base: u64,
    gsi: u32,
    transport: Arc<Mutex<MmioTransport>>,
    disk: Option<Disk>,
    net: Option<NetHandle>,
}

/// The VM's virtio devices.
#[derive(Default)]
pub struct VirtioDevices {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.entries.iter().map(|e| e.backend.device_name(e.base)).collect();
        f.debug_struct("VirtioDevices").field("devices", &names).finish()
    }
}

fn place(index: usize) -> (u64, u32) {
    (MMIO_BASE + index as u64 * MMIO_SIZE, FIRST_GSI + index as u32)
}

fn block_device(disk: &Disk, index: usize) -> Result<Box<dyn ferry_virtio::VirtioDevice>, Error> {
    let path = disk.path().display().to_string();
    let io = disk
        .file()
        .try_clone()
        .map_err(|source| Error::Disk(crate::disk::Error::Open { path: disk.path().to_owned(), source }))?;
    let id = format!("ferry-disk-{index}");
    let dev = Block::new(io, disk.config().readonly, id.as_bytes())
        .map_err(|source| Error::Block { path, source })?;
    Ok(Box::new(dev))
}

type Made = (Box<dyn ferry_virtio::VirtioDevice>, Option<Disk>, Option<NetHandle>);

/// The device for `backend`, from the next disk or tap `opened` holds.
fn device(backend: &Backend, index: usize, opened: &mut Opened) -> Result<Made, Error> {
    match backend {
        Backend::Disk(cfg) => {
            let disk = match opened.disks.next() {
                Some(d) => d,
                None => Disk::open_unlocked(cfg)?,
            };
            Ok((block_device(&disk, index)?, Some(disk), None))
        }
        Backend::Net(cfg) => {
            let tap = match opened.taps.next() {
                Some(t) => t,
                None => Tap::open(&cfg.tap)?,
            };
            let net = Net::new(tap, cfg.mac);
            let handle = net.handle();
            Ok((Box::new(net), None, Some(handle)))
        }
    }
}

fn interrupt(vm: &VmFd, index: usize, gsi: u32) -> Result<EventFd, Error> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Interrupt { index, source })?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| Error::Interrupt { index, source: std::io::Error::from_raw_os_error(e.errno()) })?;
    Ok(evt)
}

impl VirtioDevices {
    /// Devices for a VM that boots, one per backend in order, from what
    /// [`open_backends`] opened for them.
    pub fn create(vm: &VmFd, mem: &GuestMemory, backends: &[Backend], opened: Opened) -> Result<Self, Error> {
        Self::build(vm, mem, backends, None, opened)
    }

    /// Devices recreated from saved `states`, around what [`open_backends`] opened for
    /// `backends` (the states' backends as they are called here).
    pub fn restore(
        vm: &VmFd,
        mem: &GuestMemory,
        states: &[VirtioState],
        backends: &[Backend],
        opened: Opened,
    ) -> Result<Self, Error> {
        if states.len() != backends.len() {
            return Err(Error::Backends { states: states.len(), backends: backends.len() });
        }
        Self::build(vm, mem, backends, Some(states), opened)
    }

    fn build(
        vm: &VmFd,
        mem: &GuestMemory,
        backends: &[Backend],
        states: Option<&[VirtioState]>,
        mut opened: Opened,
    ) -> Result<Self, Error> {
        if backends.len() > MAX_DEVICES {
            return Err(Error::TooMany(backends.len()));
        }
        let mut entries = Vec::with_capacity(backends.len());
        for (index, backend) in backends.iter().enumerate() {
            let (base, gsi) = place(index);
            let state = states.and_then(|s| s.get(index));
            if let Some(s) = state {
                if (s.base, s.gsi) != (base, gsi) {
                    return Err(Error::Placement { index, saved_base: s.base, saved_gsi: s.gsi, base, gsi });
                }
                if let (Backend::Net(cfg), Some(saved)) =
                    (backend, ferry_virtio::net::saved_mac(&s.transport))
                {
                    if saved != cfg.mac {
                        return Err(Error::Mac {
                            index,
                            saved: saved.to_string(),
                            config: cfg.mac.to_string(),
                        });
                    }
                }
            }
            let (dev, disk, net) = device(backend, index, &mut opened)?;
            let irq = interrupt(vm, index, gsi)?;
            let t = match state {
                Some(s) => MmioTransport::restore(&s.transport, dev, mem.clone(), irq)
                    .map_err(|source| Error::Restore { index, source })?,
                None => MmioTransport::new(dev, mem.clone(), irq)?,
            };
            if let (Some(_), Some(evt)) = (&net, t.event_fd()) {
                // The guest lending RX buffers (a write of 0 to QueueNotify) only has to
                // wake the event loop: KVM signals the NIC's event fd itself, without an
                // exit to the VMM (an ioeventfd). TX notifications still exit: the frames
                // go out inside the exit.
                let at = kvm_ioctls::IoEventAddress::Mmio(
                    base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY),
                );
                vm.register_ioevent(evt, &at, u32::from(ferry_virtio::net::RX_QUEUE)).map_err(|e| {
                    Error::Interrupt { index, source: std::io::Error::from_raw_os_error(e.errno()) }
                })?;
            }
            let transport = Arc::new(Mutex::new(t));
            entries.push(Entry { backend: backend.clone(), base, gsi, transport, disk, net });
        }
        Ok(Self { entries })
    }

    /// Places every transport on the MMIO bus.
    pub fn attach(&self, bus: &mut Bus) -> Result<(), Error> {
        for e in &self.entries {
            bus.insert(e.base, MMIO_SIZE, e.transport.clone())?;
        }
        Ok(())
    }

    /// What the kernel command line must carry so the guest finds the devices.
    pub fn cmdline(&self) -> String {
        self.entries
            .iter()
            .map(|e| format!("virtio_mmio.device={}K@{:#x}:{}", MMIO_SIZE >> 10, e.base, e.gsi))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The devices as the ACPI tables describe them (a DSDT entry each).
    pub fn acpi_devices(&self) -> Vec<ferry_acpi::MmioDevice> {
        self.entries
            .iter()
            .map(|e| ferry_acpi::MmioDevice { base: e.base, len: MMIO_SIZE, gsi: e.gsi })
            .collect()
    }

    /// Names for the migration's device list.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.backend.device_name(e.base)).collect()
    }

    /// The backends, in order.
    pub fn backends(&self) -> Vec<Backend> {
        self.entries.iter().map(|e| e.backend.clone()).collect()
    }

    /// Every device's state. The vCPUs must be paused (requests complete within the exit
    /// that starts them, so none is in flight then).
    pub fn save(&self) -> Vec<VirtioState> {
        self.entries
            .iter()
            .map(|e| VirtioState {
                backend: e.backend.clone(),
                base: e.base,
                gsi: e.gsi,
                transport: e.transport.lock().unwrap_or_else(|p| p.into_inner()).state(),
            })
            .collect()
    }

    /// Takes every disk's lock (a migration destination, before its vCPUs start). On a
    /// failure the locks taken so far are dropped again.
    pub fn lock_disks(&mut self) -> Result<(), Error> {
        let mut taken = Vec::new();
        for i in 0..self.entries.len() {
            let r = match &mut self.entries[i].disk {
                Some(d) if !d.is_locked() => d.lock().map(|()| true),
                _ => Ok(false),
            };
            match r {
                Ok(true) => taken.push(i),
                Ok(false) => {}
                Err(err) => {
                    for j in taken {
                        if let Some(d) = &mut self.entries[j].disk {
                            d.unlock();
                        }
                    }
                    return Err(err.into());
                }
            }
        }
        // The source flushed before it let the VM go: read what it wrote, not what this
        // host may have cached before (see Disk::drop_cache).
        for e in &self.entries {
            if let Some(d) = &e.disk {
                d.drop_cache();
            }
        }
        Ok(())
    }

    /// Flushes and drops every disk's lock (a migration source that has stopped for good).
    pub fn unlock_disks(&mut self) {
        for e in &mut self.entries {
            if let Some(d) = &mut e.disk {
                d.unlock();
            }
        }
    }

    /// The NICs' fds for the event loop: (device index, event fd, tap fd). Watch the event
    /// fd always, the tap fd while [`VirtioDevices::device_event`] says [`Poll::Backend`].
    pub fn net_fds(&self) -> Vec<(usize, RawFd, RawFd)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let net = e.net.as_ref()?;
                let t = e.transport.lock().unwrap_or_else(|p| p.into_inner());
                Some((i, t.event_fd()?.as_raw_fd(), net.tap_fd()))
            })
            .collect()
    }

    /// Device-initiated work of device `index` (a NIC: frames from its tap into the
    /// guest's buffers). Only while the vCPUs run: with them paused for a snapshot or a
    /// migration's last copy, guest memory must not change.
    pub fn device_event(&self, index: usize) -> Poll {
        match self.entries.get(index) {
            Some(e) => e.transport.lock().unwrap_or_else(|p| p.into_inner()).device_event(),
            None => Poll::WaitForDriver,
        }
    }

    /// The NICs (to announce after a migration, and for `info`).
    pub fn nics(&self) -> Vec<NetHandle> {
        self.entries.iter().filter_map(|e| e.net.clone()).collect()
    }

    /// Every device for `info`.
    pub fn info(&self) -> Vec<ferry_api::DeviceInfo> {
        self.entries
            .iter()
            .map(|e| {
                let (backend, readonly, locked, mac, stats) = match (&e.backend, &e.disk, &e.net) {
                    (Backend::Disk(c), d, _) => (
                        c.path.display().to_string(),
                        Some(c.readonly),
                        d.as_ref().map(Disk::is_locked),
                        None,
                        None,
                    ),
                    (Backend::Net(c), _, n) => (
                        c.tap.clone(),
                        None,
                        None,
                        Some(c.mac.to_string()),
                        n.as_ref().map(|n| {
                            let s = n.stats();
                            ferry_api::NicStats {
                                rx_frames: s.rx_frames,
                                rx_bytes: s.rx_bytes,
                                rx_dropped: s.rx_dropped,
                                tx_frames: s.tx_frames,
                                tx_bytes: s.tx_bytes,
                                tx_dropped: s.tx_dropped,
                            }
                        }),
                    ),
                };
                ferry_api::DeviceInfo {
                    name: e.backend.device_name(e.base),
                    gsi: e.gsi,
                    backend,
                    readonly,
                    locked,
                    mac,
                    stats,
                }
            })
            .collect()
    }

    /// Whether there is no device.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
