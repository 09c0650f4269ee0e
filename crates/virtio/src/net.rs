//! virtio-net (section 5.1 of the specification) on a tap device.
//!
//! Two queues: 0 receives (frames from the tap to the guest), 1 transmits (frames from the
//! guest to the tap), [`QUEUE_SIZE`] entries each. Every frame in either direction is
//! preceded by the 12-byte `virtio_net_hdr_v1` ([`HEADER_LEN`]). Offered features:
//! `VIRTIO_NET_F_MAC` (the configuration space holds the MAC) and `VIRTIO_NET_F_STATUS`
//! (the link is always up), with the transport's `VIRTIO_F_VERSION_1`. No checksum or
//! segmentation offloads, no mergeable receive buffers, no control queue, one queue pair:
//! so every frame is a plain Ethernet frame and the header carries nothing but, on
//! receive, `num_buffers = 1`.
//!
//! The network is lossy, and the device treats it so: it never blocks, and a frame it
//! cannot pass on is dropped and counted ([`NetStats`]), never a reason to stop.
//!
//! - **Transmit** runs on the vCPU thread, in the guest's `QueueNotify` of queue 1: for
//!   each chain, the frame after the header (14 to [`MAX_FRAME_LEN`] bytes, else dropped)
//!   is gathered into a bounce buffer and written to the tap, one frame per write. If the
//!   tap's queue is full (`WouldBlock`), or the tap fails, the frame is dropped. Every
//!   chain completes with used length 0.
//! - **Receive** is device-initiated: the receive queue is of kind
//!   [`QueueKind::Receive`], and frames move in [`VirtioDevice::device_event`], which the
//!   VMM's event loop runs through
//!   [`MmioTransport::device_event`](crate::mmio::MmioTransport::device_event) when the
//!   tap is readable or the guest added receive buffers. While the guest has a free
//!   buffer and the tap a frame (at most [`QUEUE_SIZE`] frames per call), the frame is
//!   read into a bounce buffer and written, after a header, into the buffer through
//!   `vm-memory` (so the pages are marked dirty for migration); a buffer too small for it
//!   completes empty and the frame is dropped. The transport interrupts once per call.
//!   Without a free buffer the device reads nothing (frames wait in the tap's queue, and
//!   the kernel drops them when it is full) and says [`Poll::WaitForDriver`]: the VMM
//!   stops watching the tap until the transport's event fd reports new buffers.
//!
//! A checkpoint or migration needs nothing of the device beyond the transport's state,
//! whose configuration space carries the MAC ([`saved_mac`]): the restored device is
//! built on whatever tap the destination has, with the same MAC, and a different MAC is
//! refused by the restore. Frames in flight (in the tap, not yet in a buffer) are not
//! saved, and the counters start again from zero.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_net::{MacAddr, Tap};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};

use crate::chain::{self, Chain};
use crate::device::{Poll, QueueKind, VirtioDevice};
use crate::mmio::DeviceQueues;
use crate::persist::MmioTransportState;
use crate::GuestMemory;

/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Each queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, before every frame in both directions.
pub const HEADER_LEN: usize = 12;
/// The shortest frame passed on: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// The longest frame passed on (as Firecracker: 64 KiB of IP plus an Ethernet header).
pub const MAX_FRAME_LEN: usize = 65550;

/// The header of every received frame: no flags, no segmentation, `num_buffers` 1.
const RX_HEADER: [u8; HEADER_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// Configuration space: `mac` (6 bytes) and `status` (u16).
const CONFIG_LEN: usize = 8;
/// Offset of `status` in the configuration space.
const CONFIG_STATUS: usize = 6;

/// Why a frame was dropped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A transmit chain shorter than the header.
    #[error("the transmit chain is {len} readable bytes, shorter than the {HEADER_LEN}-byte header")]
    ShortHeader {
        /// Readable bytes.
        len: u64,
    },
    /// A frame shorter than an Ethernet header or longer than [`MAX_FRAME_LEN`].
    #[error("a frame of {len} bytes is not between {MIN_FRAME_LEN} and {MAX_FRAME_LEN} bytes")]
    FrameLength {
        /// The frame's length.
        len: u64,
    },
    /// A receive buffer too small for the frame.
    #[error("a {frame}-byte frame does not fit in a receive buffer of {buffer} bytes with its header")]
    BufferTooSmall {
        /// The frame's length.
        frame: usize,
        /// The buffer's (writable) length.
        buffer: u64,
    },
    /// A buffer of the chain lies outside guest memory.
    #[error("a buffer of the chain is outside guest memory")]
    OutsideMemory,
    /// Reading or writing the chain's buffers failed.
    #[error("cannot access the chain's buffers")]
    Guest(#[source] chain::Error),
    /// The tap took only part of the frame.
    #[error("the tap took {written} bytes of a {len}-byte frame")]
    ShortWrite {
        /// Bytes written.
        written: usize,
        /// The frame's length.
        len: usize,
    },
    /// Reading or writing the tap failed (`WouldBlock` when its queue is full).
    #[error("tap I/O failed")]
    Tap(#[source] io::Error),
}

/// Frame counters, shared between the device and its [`NetHandle`]s.
#[derive(Debug, Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn rx(&self, len: usize) {
        Self::add(&self.rx_frames, 1);
        Self::add(&self.rx_bytes, len);
    }

    fn tx(&self, len: usize) {
        Self::add(&self.tx_frames, 1);
        Self::add(&self.tx_bytes, len);
    }

    fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
        }
    }
}

/// A NIC's frame counters since the device was created (on this host). Bytes are frame
/// bytes, without the virtio header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames read from the tap but not delivered: the guest's buffer was too small (or
    /// unusable), or the frame too short or too long.
    pub rx_dropped: u64,
    /// Frames the guest sent that went to the tap.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the guest sent that were dropped: malformed, too short or too long, or the
    /// tap refused them (full, down, gone).
    pub tx_dropped: u64,
}

/// What the VMM keeps of a [`Net`] after handing it to its transport, usable without
/// locking the transport: the tap's fd (for its epoll), the counters, and RARP
/// announcements after a migration.
#[derive(Clone, Debug)]
pub struct NetHandle {
    tap: Arc<Tap>,
    mac: MacAddr,
    counters: Arc<Counters>,
}

impl NetHandle {
    /// The tap's fd, to watch for readability while the transport's
    /// [`device_event`](crate::mmio::MmioTransport::device_event) says [`Poll::Backend`].
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The NIC's MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The frame counters now.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// Sends one RARP announcement from the NIC's MAC
    /// ([`ferry_net::rarp::frame`]) on the tap. The VMM calls it once per round of
    /// [`ferry_net::rarp::schedule`] after a migration, once the guest runs. Not counted
    /// as the guest's traffic. `WouldBlock` if the tap's queue is full.
    pub fn announce(&self) -> io::Result<()> {
        let frame = ferry_net::rarp::frame(self.mac);
        let written = self.tap.send(&frame)?;
        if written != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the tap took part of the RARP frame"));
        }
        Ok(())
    }
}

/// A virtio-net device on a tap.
pub struct Net {
    tap: Arc<Tap>,
    mac: MacAddr,
    config: [u8; CONFIG_LEN],
    counters: Arc<Counters>,
    queue_sizes: [u16; 2],
    /// Bounce buffers, allocated on first use.
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Whether a tap failure was logged as a warning since the tap last worked (the rest
    /// are logged at debug level, so that a dead tap does not flood the log).
    tap_warned: bool,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A NIC with address `mac` on `tap` (opened non-blocking, without packet info, as
    /// [`Tap::open`] does).
    pub fn new(tap: Tap, mac: MacAddr) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac.0);
        config[CONFIG_STATUS..CONFIG_STATUS + 2]
            .copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Self {
            tap: Arc::new(tap),
            mac,
            config,
            counters: Arc::default(),
            queue_sizes: [QUEUE_SIZE; 2],
            rx_buf: Vec::new(),
            tx_buf: Vec::new(),
            tap_warned: false,
        }
    }

    /// The NIC's MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's fd.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// A handle on the tap and the counters, to keep before boxing the device for its
    /// transport.
    pub fn handle(&self) -> NetHandle {
        NetHandle { tap: self.tap.clone(), mac: self.mac, counters: self.counters.clone() }
    }

    /// The frame counters now.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// Logs a tap failure: a warning the first time, then at debug level until the tap
    /// works again.
    fn tap_failed(&mut self, what: &'static str, e: &Error) {
        let error: &dyn std::error::Error = e;
        if self.tap_warned {
            tracing::debug!(tap = self.tap.name(), error, "{what}");
        } else {
            tracing::warn!(
                tap = self.tap.name(),
                error,
                "{what} (further failures are logged at debug level)"
            );
            self.tap_warned = true;
        }
    }

    /// Sends the frame in the transmit chain `chain` to the tap; returns its length.
    fn transmit(&mut self, chain: &Chain, mem: &GuestMemory) -> Result<usize, Error> {
        let total = chain.readable_len();
        let len = total.checked_sub(HEADER_LEN as u64).ok_or(Error::ShortHeader { len: total })?;
        if len < MIN_FRAME_LEN as u64 || len > MAX_FRAME_LEN as u64 {
            return Err(Error::FrameLength { len });
        }
        if !chain.in_memory() {
            return Err(Error::OutsideMemory);
        }
        if self.tx_buf.is_empty() {
            self.tx_buf = vec![0; MAX_FRAME_LEN];
        }
        // At most MAX_FRAME_LEN.
        let frame = &mut self.tx_buf[..len as usize];
        chain.read_at(mem, HEADER_LEN as u64, frame).map_err(Error::Guest)?;
        match self.tap.send(frame) {
            Ok(written) if written == frame.len() => Ok(written),
            Ok(written) => Err(Error::ShortWrite { written, len: frame.len() }),
            Err(e) => Err(Error::Tap(e)),
        }
    }

    /// Moves frames from the tap into the receive queue's buffers.
    fn receive(&mut self, queues: &mut DeviceQueues<'_>) -> Poll {
        if self.rx_buf.is_empty() {
            self.rx_buf = vec![0; MAX_FRAME_LEN];
        }
        for _ in 0..QUEUE_SIZE {
            // Look for a buffer before reading: without one, the frame stays in the tap.
            if !queues.has_available(RX_QUEUE) {
                return Poll::WaitForDriver;
            }
            let len = match self.tap.recv(&mut self.rx_buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Backend,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    // The tap device was deleted: nothing will ever come.
                    self.tap_failed("the tap is gone; no longer reading it", &Error::Tap(e));
                    return Poll::WaitForDriver;
                }
                Err(e) => {
                    // The frame, if there was one, is lost; the next may do better.
                    Counters::add(&self.counters.rx_dropped, 1);
                    self.tap_failed("cannot read a frame from the tap", &Error::Tap(e));
                    continue;
                }
            };
            self.tap_warned = false;
            // The tap reports a frame's full length even when it did not fit.
            let frame = match self.rx_buf.get(..len) {
                Some(frame) if len >= MIN_FRAME_LEN => frame,
                _ => {
                    Counters::add(&self.counters.rx_dropped, 1);
                    let error: &dyn std::error::Error = &Error::FrameLength { len: len as u64 };
                    tracing::debug!(error, "dropping a frame from the tap");
                    continue;
                }
            };
            let counters = &self.counters;
            let served = queues.serve_next(RX_QUEUE, |chain, mem| match write_frame(chain, mem, frame) {
                Ok(used) => {
                    counters.rx(frame.len());
                    used
                }
                Err(e) => {
                    Counters::add(&counters.rx_dropped, 1);
                    let error: &dyn std::error::Error = &e;
                    tracing::debug!(error, "dropping a frame for the guest");
                    0
                }
            });
            if !served {
                // The queue turned out to be broken: the device needs a reset.
                Counters::add(&self.counters.rx_dropped, 1);
            }
        }
        Poll::Backend
    }
}

/// Writes the receive header and `frame` into `chain`'s writable buffers; returns the
/// used length.
fn write_frame(chain: &Chain, mem: &GuestMemory, frame: &[u8]) -> Result<u32, Error> {
    let needed = HEADER_LEN + frame.len();
    if chain.writable_len() < needed as u64 {
        return Err(Error::BufferTooSmall { frame: frame.len(), buffer: chain.writable_len() });
    }
    if !chain.in_memory() {
        return Err(Error::OutsideMemory);
    }
    chain.write_at(mem, 0, &RX_HEADER).map_err(Error::Guest)?;
    chain.write_at(mem, HEADER_LEN as u64, frame).map_err(Error::Guest)?;
    // At most HEADER_LEN + MAX_FRAME_LEN.
    Ok(needed as u32)
}

/// The MAC in a saved virtio-net transport state (its configuration space), to build the
/// restored device with. `None` if the state is not of a virtio-net device.
pub fn saved_mac(state: &MmioTransportState) -> Option<MacAddr> {
    if state.device_type != VIRTIO_ID_NET {
        return None;
    }
    // The saved configuration space leaves out trailing zeros.
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(&state.config) {
        *d = *s;
    }
    Some(MacAddr(mac))
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config, offset, data);
    }

    fn process(&mut self, queue: u16, chain: &Chain, mem: &GuestMemory) -> u32 {
        if queue != TX_QUEUE {
            // Not called: the receive queue is of kind Receive.
            return 0;
        }
        match self.transmit(chain, mem) {
            Ok(len) => {
                self.counters.tx(len);
                self.tap_warned = false;
            }
            Err(e) => {
                Counters::add(&self.counters.tx_dropped, 1);
                match e {
                    Error::Tap(ref io) if io.kind() == io::ErrorKind::WouldBlock => {
                        tracing::debug!(tap = self.tap.name(), "the tap's queue is full; dropping a frame");
                    }
                    Error::Tap(_) | Error::ShortWrite { .. } => {
                        self.tap_failed("cannot send a frame to the tap", &e)
                    }
                    _ => {
                        let error: &dyn std::error::Error = &e;
                        tracing::debug!(error, "dropping a frame from the guest");
                    }
                }
            }
        }
        0
    }

    fn queue_kind(&self, queue: u16) -> QueueKind {
        if queue == RX_QUEUE {
            QueueKind::Receive
        } else {
            QueueKind::Request
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn device_event(&mut self, queues: &mut DeviceQueues<'_>) -> Poll {
        self.receive(queues)
    }
}

/// These tests need root (the suite runs as root): each makes its own tap devices
/// (`ip tuntap add`), deleted when the test ends, even by a panic, and plays the guest's
/// driver through the registers on one side and the host's network on the other, through
/// an `AF_PACKET` socket bound to the tap: what the device writes to the tap arrives on
/// the socket, and what the socket sends arrives on the tap for the device to read.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmio::{status, MmioTransport, INT_USED_RING};
    use crate::testing::{copy_memory, regs, Driver, Ring, MEM_SIZE};
    use std::ffi::CString;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    /// Source of the frames the host sends.
    const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    /// The ethertype of the tests' frames (IEEE local experimental).
    const ETHERTYPE: u16 = 0x88b5;
    /// Where the receive buffers go: `RX_BUFS + head * 0x1000`, at most 4 KiB each.
    const RX_BUFS: u64 = 0x100_000;
    /// Where transmitted frames are put together.
    const TX_BUF: u64 = 0x200_000;
    const RX_BUF_LEN: u32 = 2048;

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    fn ip(args: &[&str]) -> bool {
        std::process::Command::new("ip").args(args).status().is_ok_and(|s| s.success())
    }

    /// A tap device made for a test, deleted on drop.
    struct TestTap {
        name: String,
    }

    impl TestTap {
        fn new() -> Self {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("fyvn{}x{n}", std::process::id() % 1_000_000);
            assert!(ip(&["tuntap", "add", &name, "mode", "tap"]), "ip tuntap add {name} (root?)");
            let tap = Self { name };
            // Without IPv6 the kernel sends nothing through the tap by itself (router
            // solicitations, MLD reports), so the device reads only the tests' frames.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name), "1");
            assert!(ip(&["link", "set", &tap.name, "up"]), "ip link set {} up", tap.name);
            tap
        }

        /// Opens the tap, and waits until frames sent to it on `sock` reach it (its carrier
        /// comes up when it is opened, and the kernel starts its queue a little later).
        fn open_ready(&self, sock: &PacketSocket) -> Tap {
            let tap = Tap::open(&self.name).expect("open tap");
            let probe = test_frame(0xff, 60);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "frames sent to {} never arrive", self.name);
                sock.send(&probe);
                if readable(tap.as_raw_fd(), 100) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            let mut buf = vec![0u8; 2048];
            while tap.recv(&mut buf).is_ok() {}
            tap
        }
    }

    impl Drop for TestTap {
        fn drop(&mut self) {
            let _ = ip(&["link", "del", &self.name]);
        }
    }

    /// Whether `fd` becomes readable within `ms` milliseconds.
    fn readable(fd: RawFd, ms: i32) -> bool {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, which lives for the call.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        rc == 1 && p.revents & libc::POLLIN != 0
    }

    /// An `AF_PACKET` socket bound to one interface: the host's side of the tap.
    struct PacketSocket {
        fd: OwnedFd,
    }

    impl PacketSocket {
        fn bind(ifname: &str) -> Self {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the result is checked.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            };
            assert!(raw >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            // SAFETY: `raw` is a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let cname = CString::new(ifname).expect("name");
            // SAFETY: a NUL-terminated string that lives for the call.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert_ne!(ifindex, 0, "no interface {ifname}");
            // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: bind reads one sockaddr_ll, of the length given, which lives for the call.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "bind to {ifname}: {}", io::Error::last_os_error());
            Self { fd }
        }

        /// Sends `frame` out of the interface (into the tap, for the device to read).
        fn send(&self, frame: &[u8]) {
            // SAFETY: send reads `frame.len()` bytes of `frame`, which lives for the call.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize, "send: {}", io::Error::last_os_error());
        }

        /// The next frame that came in from the interface (written by the device) within
        /// two seconds, skipping the socket's own.
        fn recv(&self) -> Option<Vec<u8>> {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !readable(self.fd.as_raw_fd(), left.as_millis() as i32 + 1) {
                    return None;
                }
                // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: recvfrom writes at most `buf.len()` bytes into `buf` and at most
                // `len` bytes into `sll`, both of which live for the call.
                let n = unsafe {
                    libc::recvfrom(
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut sll as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                if n < 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                return Some(buf[..n as usize].to_vec());
            }
        }

        /// Asserts that nothing comes in for a while.
        fn assert_quiet(&self) {
            if readable(self.fd.as_raw_fd(), 100) {
                if let Some(f) = self.recv() {
                    panic!("unexpected frame of {} bytes: {:02x?}", f.len(), &f[..f.len().min(32)]);
                }
            }
        }
    }

    /// A frame of `len` bytes from `PEER` to `MAC`, its payload made of `tag`.
    fn test_frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(len);
        f.extend_from_slice(&MAC.0);
        f.extend_from_slice(&PEER);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend((0..len - 14).map(|i| tag ^ (i as u8)));
        f
    }

    /// The guest's driver of a NIC, and the host's side of its tap.
    struct NetDriver {
        d: Driver,
        rx: Ring,
        tx: Ring,
        handle: NetHandle,
        event: EventFd,
        sock: PacketSocket,
        /// Last, so that the tap is deleted after the device closed it.
        tap: TestTap,
    }

    impl NetDriver {
        fn new() -> Self {
            Self::with_tap(TestTap::new(), MAC)
        }

        fn with_tap(tap: TestTap, mac: MacAddr) -> Self {
            let sock = PacketSocket::bind(&tap.name);
            let net = Net::new(tap.open_ready(&sock), mac);
            let handle = net.handle();
            let d = Driver::new(Box::new(net));
            Self::around(d, handle, sock, tap)
        }

        fn around(d: Driver, handle: NetHandle, sock: PacketSocket, tap: TestTap) -> Self {
            let event = d.t.event_fd().expect("event fd").try_clone().expect("clone");
            assert_eq!(d.t.backend_fd(), Some(handle.tap_fd()));
            Self { d, rx: Ring::new(0, 0x1000), tx: Ring::new(1, 0x10_000), handle, event, sock, tap }
        }

        /// Negotiates every offered feature, sets both queues up, DRIVER_OK.
        fn start(&mut self) {
            self.d.negotiate();
            self.rx.setup(&mut self.d);
            self.tx.setup(&mut self.d);
            self.d.add_status(status::DRIVER_OK);
            assert_eq!(self.d.status() & status::NEEDS_RESET, 0);
        }

        /// Adds receive buffers of `len` bytes, and notifies.
        fn add_rx_buffers(&mut self, count: usize, len: u32) {
            for _ in 0..count {
                let addr = RX_BUFS + u64::from(self.rx.next_desc) * 0x1000;
                self.rx.add_chain(&self.d.mem, &[(addr, len, true)]);
            }
            self.d.write_reg(regs::QUEUE_NOTIFY, 0);
        }

        /// Transmits `frame` behind a header, split into descriptors at `splits` (offsets
        /// in header + frame); returns the used element.
        fn transmit(&mut self, frame: &[u8], splits: &[usize]) -> (u32, u32) {
            let mut bytes = vec![0u8; HEADER_LEN];
            bytes.extend_from_slice(frame);
            self.d.mem.write_slice(&bytes, GuestAddress(TX_BUF)).expect("frame");
            let mut bufs = Vec::new();
            let mut start = 0;
            for &end in splits.iter().chain(std::iter::once(&bytes.len())) {
                bufs.push((TX_BUF + start as u64, (end - start) as u32, false));
                start = end;
            }
            self.transmit_chain(&bufs)
        }

        fn transmit_chain(&mut self, bufs: &[(u64, u32, bool)]) -> (u32, u32) {
            let head = self.tx.add_chain(&self.d.mem, bufs);
            self.d.write_reg(regs::QUEUE_NOTIFY, 1);
            let used = self.tx.take_used(&self.d.mem);
            assert_eq!(used.len(), 1, "one transmit chain completed");
            assert_eq!(used[0].0, u32::from(head));
            used[0]
        }

        /// Sends `frame` to the tap from the host, and waits until the tap has a frame.
        fn inject(&self, frame: &[u8]) {
            self.sock.send(frame);
            assert!(readable(self.handle.tap_fd(), 2000), "the frame did not reach the tap");
        }

        /// The receive buffers used since the last look: (head, used len, bytes written).
        fn received(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
            let used = self.rx.take_used(&self.d.mem);
            used.into_iter()
                .map(|(head, len)| {
                    let mut b = vec![0u8; len as usize];
                    self.d
                        .mem
                        .read_slice(&mut b, GuestAddress(RX_BUFS + u64::from(head) * 0x1000))
                        .expect("read");
                    (head, len, b)
                })
                .collect()
        }

        fn event_signalled(&self) -> bool {
            self.event.read().is_ok()
        }

        fn tap_has_frames(&self) -> bool {
            readable(self.handle.tap_fd(), 0)
        }
    }

    /// Header then frame, as the guest finds them in a receive buffer.
    fn with_header(frame: &[u8]) -> Vec<u8> {
        let mut b = RX_HEADER.to_vec();
        b.extend_from_slice(frame);
        b
    }

    #[test]
    fn identifies_as_a_nic() {
        let mut n = NetDriver::new();
        let d = &mut n.d;
        assert_eq!(d.read_reg(regs::DEVICE_ID), 1);
        let features = d.device_features();
        assert_eq!(features, crate::mmio::F_VERSION_1 | (1 << 5) | (1 << 16), "VERSION_1, MAC, STATUS only");
        for (q, max) in [(0, 256), (1, 256), (2, 0)] {
            d.write_reg(regs::QUEUE_SEL, q);
            assert_eq!(d.read_reg(regs::QUEUE_NUM_MAX), max, "queue {q}");
        }
        let mut config = [0xffu8; 12];
        d.t.read(regs::CONFIG, &mut config);
        assert_eq!(&config[..6], &MAC.0);
        assert_eq!(&config[6..8], &1u16.to_le_bytes(), "link up");
        assert_eq!(&config[8..], &[0; 4]);
        let mut one = [0u8; 1];
        d.t.read(regs::CONFIG + 5, &mut one);
        assert_eq!(one[0], 0x56);
        d.t.write(regs::CONFIG, &[1, 2, 3, 4, 5, 6]);
        d.t.read(regs::CONFIG, &mut config);
        assert_eq!(&config[..6], &MAC.0, "the MAC is read-only");
        assert_eq!(n.handle.mac(), MAC);
        assert_eq!(n.handle.tap_name(), n.tap.name);
        assert_eq!(n.handle.stats(), NetStats::default());
        let state = n.d.t.state();
        assert_eq!(saved_mac(&state), Some(MAC));
        assert_eq!(state.config.len(), 7, "MAC and status, less the trailing zero");
    }

    #[test]
    fn transmit_strips_the_header() {
        let mut n = NetDriver::new();
        n.start();
        // One descriptor for header and frame.
        let small = test_frame(1, 60);
        assert_eq!(n.transmit(&small, &[]).1, 0, "used length 0");
        assert_eq!(n.sock.recv().as_deref(), Some(&small[..]));
        assert_eq!(n.d.take_irq(), 1);
        assert_eq!(n.d.read_reg(regs::INTERRUPT_STATUS), INT_USED_RING);
        // Header alone, the frame in uneven pieces.
        let full = test_frame(2, 1514);
        assert_eq!(n.transmit(&full, &[HEADER_LEN, 20, 700]).1, 0);
        assert_eq!(n.sock.recv().as_deref(), Some(&full[..]));
        // Header and frame sharing a descriptor.
        let split = test_frame(3, 100);
        n.transmit(&split, &[8, 30]);
        assert_eq!(n.sock.recv().as_deref(), Some(&split[..]));
        // The shortest and the longest frames.
        let shortest = test_frame(4, MIN_FRAME_LEN);
        n.transmit(&shortest, &[]);
        assert_eq!(n.sock.recv().as_deref(), Some(&shortest[..]));
        let longest = test_frame(5, MAX_FRAME_LEN);
        n.transmit(&longest, &[HEADER_LEN]);
        assert_eq!(n.sock.recv().as_deref(), Some(&longest[..]));
        let sent = [60, 1514, 100, MIN_FRAME_LEN, MAX_FRAME_LEN];
        let stats = n.handle.stats();
        assert_eq!(
            (stats.tx_frames, stats.tx_bytes, stats.tx_dropped),
            (5, sent.iter().sum::<usize>() as u64, 0)
        );

        // Malformed chains are dropped, counted, and completed with nothing written.
        n.transmit(&test_frame(6, MIN_FRAME_LEN)[..MIN_FRAME_LEN - 1], &[]);
        n.transmit(&[], &[]);
        n.transmit(&test_frame(7, MAX_FRAME_LEN + 1), &[]);
        n.transmit_chain(&[(TX_BUF, HEADER_LEN as u32 - 1, false)]);
        n.transmit_chain(&[(TX_BUF, HEADER_LEN as u32, false), (MEM_SIZE - 30, 60, false)]);
        n.transmit_chain(&[(TX_BUF, 100, true)]);
        n.sock.assert_quiet();
        let stats = n.handle.stats();
        assert_eq!((stats.tx_frames, stats.tx_dropped), (5, 6));
        // The tap refuses frames while it is down (EIO): dropped too.
        assert!(ip(&["link", "set", &n.tap.name, "down"]));
        n.transmit(&small, &[]);
        assert_eq!(n.handle.stats().tx_dropped, 7);
        assert!(ip(&["link", "set", &n.tap.name, "up"]));
        // None of it stopped the device.
        assert_eq!(n.d.status() & status::NEEDS_RESET, 0);
        assert_eq!(n.tx.used_idx(&n.d.mem), 12);
        assert_eq!(n.handle.stats().rx_frames, 0);
    }

    #[test]
    fn receive_fills_buffers_behind_a_header() {
        let mut n = NetDriver::new();
        n.start();
        n.event_signalled();
        n.add_rx_buffers(4, RX_BUF_LEN);
        assert!(n.event_signalled(), "new receive buffers signal the event fd");
        assert!(n.received().is_empty(), "the notification itself reads nothing");
        // Nothing on the tap yet: keep watching it.
        assert_eq!(n.d.t.device_event(), Poll::Backend);
        assert!(n.received().is_empty());
        assert_eq!(n.d.take_irq(), 0);
        // Three frames: three buffers, one interrupt.
        let frames = [test_frame(1, 60), test_frame(2, 1514), test_frame(3, 100)];
        for f in &frames {
            n.inject(f);
        }
        assert_eq!(n.d.t.device_event(), Poll::Backend);
        let got = n.received();
        assert_eq!(got.len(), 3);
        for (i, ((head, len, bytes), f)) in got.iter().zip(&frames).enumerate() {
            assert_eq!(*head, i as u32);
            assert_eq!(*len as usize, HEADER_LEN + f.len(), "frame {i}");
            assert_eq!(bytes, &with_header(f), "frame {i}");
        }
        assert_eq!(n.d.take_irq(), 1);
        assert_eq!(n.d.read_reg(regs::INTERRUPT_STATUS), INT_USED_RING);
        let stats = n.handle.stats();
        assert_eq!((stats.rx_frames, stats.rx_bytes, stats.rx_dropped), (3, 60 + 1514 + 100, 0));
        assert!(!n.tap_has_frames());
        // The fourth buffer takes the next frame; then there is none left: stop watching.
        n.inject(&frames[0]);
        assert_eq!(n.d.t.device_event(), Poll::WaitForDriver);
        assert_eq!(n.received().len(), 1);
        // Any layout: the header in a descriptor of its own, the frame across two.
        let addr = RX_BUFS + u64::from(n.rx.next_desc) * 0x1000;
        n.rx.add_chain(
            &n.d.mem,
            &[(addr, HEADER_LEN as u32, true), (addr + 0x100, 50, true), (addr + 0x800, 50, true)],
        );
        let f = test_frame(9, 90);
        n.inject(&f);
        assert_eq!(n.d.t.device_event(), Poll::WaitForDriver);
        let used = n.rx.take_used(&n.d.mem);
        assert_eq!(used[0].1 as usize, HEADER_LEN + 90);
        let mut b = vec![0u8; 102];
        n.d.mem.read_slice(&mut b[..12], GuestAddress(addr)).expect("read");
        n.d.mem.read_slice(&mut b[12..62], GuestAddress(addr + 0x100)).expect("read");
        n.d.mem.read_slice(&mut b[62..], GuestAddress(addr + 0x800)).expect("read");
        assert_eq!(b, with_header(&f));
        assert_eq!(n.d.status() & status::NEEDS_RESET, 0);
    }

    #[test]
    fn without_buffers_nothing_is_read() {
        let mut n = NetDriver::new();
        // Before the driver starts the device: nothing is read.
        let first = test_frame(1, 80);
        n.inject(&first);
        assert_eq!(n.d.t.device_event(), Poll::WaitForDriver);
        assert!(n.tap_has_frames());
        n.start();
        assert!(n.event_signalled(), "DRIVER_OK signals the event fd");
        // Running, but no buffer: still nothing read.
        assert_eq!(n.d.t.device_event(), Poll::WaitForDriver);
        assert!(n.tap_has_frames());
        assert_eq!(n.handle.stats(), NetStats::default());
        assert_eq!(n.d.take_irq(), 0);
        // A buffer: the frame waiting in the tap lands in it.
        let second = test_frame(2, 70);
        n.inject(&second);
        n.add_rx_buffers(1, RX_BUF_LEN);
        assert!(n.event_signalled());
        assert_eq!(n.d.t.device_event(), Poll::WaitForDriver, "the one buffer is used");
        let got = n.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].2, with_header(&first));
        assert!(n.tap_has_frames(), "the second frame still waits");
        assert_eq!(n.d.take_irq(), 1);
        n.add_rx_buffers(2, RX_BUF_LEN);
        assert_eq!(n.d.t.device_event(), Poll::Backend, "a buffer is left, and the tap is empty");
        let got = n.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].2, with_header(&second));
        assert!(!n.tap_has_frames());
        assert_eq!(n.handle.stats().rx_frames, 2);
        // After a reset, nothing is read until the driver is back.
        n.d.write_reg(regs::STATUS, 0);
        n.inject(&first);
        assert_eq!(n.d.t.device_event(), Poll::WaitForDriver);
        assert!(n.tap_has_frames());
    }

    #[test]
    fn small_buffers_drop_the_frame() {
        let mut n = NetDriver::new();
        n.start();
        let f = test_frame(1, 60);
        // Too small by one byte, then one that fits exactly, then one outside memory.
        n.add_rx_buffers(1, (HEADER_LEN + 59) as u32);
        n.add_rx_buffers(1, (HEADER_LEN + 60) as u32);
        n.rx.add_chain(&n.d.mem, &[(MEM_SIZE - 100, 200, true)]);
        n.add_rx_buffers(1, RX_BUF_LEN);
        for _ in 0..4 {
            n.inject(&f);
        }
        assert_eq!(n.d.t.device_event(), Poll::WaitForDriver);
        let got = n.received();
        let lens: Vec<u32> = got.iter().map(|g| g.1).collect();
        assert_eq!(lens, [0, 72, 0, 72]);
        assert_eq!(got[1].2, with_header(&f));
        let mut untouched = vec![0u8; 71];
        n.d.mem.read_slice(&mut untouched, GuestAddress(RX_BUFS)).expect("read");
        assert!(untouched.iter().all(|&b| b == 0), "nothing written into the small buffer");
        let stats = n.handle.stats();
        assert_eq!((stats.rx_frames, stats.rx_dropped), (2, 2));
        assert_eq!(n.d.status() & status::NEEDS_RESET, 0);
    }

    #[test]
    fn receive_marks_the_dirty_bitmap() {
        let mut n = NetDriver::new();
        n.start();
        // A buffer across a page boundary.
        let buf = RX_BUFS + 0x1000 - 0x100;
        n.rx.add_chain(&n.d.mem, &[(buf, RX_BUF_LEN, true)]);
        let mem = n.d.mem.clone();
        let region = mem.find_region(GuestAddress(0)).expect("region");
        let bitmap = std::ops::Deref::deref(region).bitmap();
        let f = test_frame(1, 1000);
        n.inject(&f);
        bitmap.reset();
        n.d.t.device_event();
        assert_eq!(n.rx.take_used(&n.d.mem), [(0, 1012)]);
        assert!(!bitmap.is_addr_set(RX_BUFS as usize - 1), "page before the buffer clean");
        assert!(bitmap.is_addr_set(RX_BUFS as usize), "buffer's first page dirty");
        assert!(bitmap.is_addr_set(RX_BUFS as usize + 0x1000), "buffer's second page dirty");
        assert!(!bitmap.is_addr_set(RX_BUFS as usize + 0x2000), "page after the frame clean");
        assert!(bitmap.is_addr_set(n.rx.used as usize), "used ring dirty");
        assert!(!bitmap.is_addr_set(n.rx.desc as usize), "descriptor table clean");
        assert!(!bitmap.is_addr_set(n.rx.avail as usize), "available ring clean");
        assert!(!bitmap.is_addr_set(n.tx.used as usize), "transmit queue untouched");
    }

    #[test]
    fn announce_sends_a_rarp_frame() {
        let n = NetDriver::new();
        n.handle.announce().expect("announce");
        assert_eq!(n.sock.recv().as_deref(), Some(&ferry_net::rarp::frame(MAC)[..]));
        assert_eq!(n.handle.stats(), NetStats::default(), "not the guest's traffic");
    }

    #[test]
    fn restored_device_carries_on_with_another_tap() {
        let mut n = NetDriver::new();
        n.start();
        n.add_rx_buffers(4, RX_BUF_LEN);
        let f = test_frame(1, 60);
        n.inject(&f);
        n.d.t.device_event();
        assert_eq!(n.received().len(), 1);
        n.transmit(&f, &[]);
        assert_eq!(n.sock.recv().as_deref(), Some(&f[..]));
        // A frame left in the tap is not part of the state.
        n.inject(&test_frame(2, 60));

        let state = n.d.t.state();
        let json = serde_json::to_string(&state).expect("json");
        let state: MmioTransportState = serde_json::from_str(&json).expect("parse");
        assert_eq!(state.device_type, 1);
        assert_eq!(state.queues.len(), 2);
        assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (1, 1));
        assert_eq!((state.queues[1].next_avail, state.queues[1].next_used), (1, 1));
        let mac = saved_mac(&state).expect("a NIC's state");
        assert_eq!(mac, MAC);
        let mem = copy_memory(&n.d.mem);
        let (rx, tx) =
            (std::mem::replace(&mut n.rx, Ring::new(0, 0)), std::mem::replace(&mut n.tx, Ring::new(1, 0)));
        drop(n);

        // The destination has another tap. A device with another MAC is refused.
        let tap = TestTap::new();
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let wrong = Net::new(Tap::open(&tap.name).expect("open"), other);
        assert!(matches!(
            MmioTransport::restore(&state, Box::new(wrong), mem.clone(), irq.try_clone().expect("clone")),
            Err(crate::persist::Error::Config)
        ));
        // The same MAC is accepted.
        let sock = PacketSocket::bind(&tap.name);
        let net = Net::new(tap.open_ready(&sock), mac);
        let handle = net.handle();
        let t = MmioTransport::restore(&state, Box::new(net), mem.clone(), irq.try_clone().expect("clone"))
            .expect("restore");
        let d = Driver { t, mem, irq, avail_idx: 0, next_desc: 0 };
        let mut r = NetDriver::around(d, handle, sock, tap);
        (r.rx, r.tx) = (rx, tx);
        assert_eq!(r.d.t.state(), state);
        assert!(r.event_signalled(), "a restored running NIC looks at its queues at once");
        assert_eq!(r.d.t.device_event(), Poll::Backend, "three buffers left, an empty tap");
        // Receive goes on into the next buffer, transmit on the new tap.
        let g = test_frame(3, 200);
        r.inject(&g);
        assert_eq!(r.d.t.device_event(), Poll::Backend);
        let got = r.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1), (1, (HEADER_LEN + 200) as u32));
        assert_eq!(got[0].2, with_header(&g));
        assert_eq!(r.transmit(&g, &[HEADER_LEN]).0, 1, "the second transmit chain");
        assert_eq!(r.sock.recv().as_deref(), Some(&g[..]));
        r.handle.announce().expect("announce");
        assert_eq!(r.sock.recv().as_deref(), Some(&ferry_net::rarp::frame(MAC)[..]));
        let stats = r.handle.stats();
        assert_eq!((stats.rx_frames, stats.tx_frames), (1, 1), "counters start again on the destination");
    }
}
