//! virtio-blk (section 5.2 of the specification) on a raw disk image.
//!
//! One request queue. Requests run to completion when the driver notifies the queue:
//!
//! | type | action | status |
//! |---|---|---|
//! | `IN` (0) | `pread` the image into the writable buffers | `OK`, or `IOERR` |
//! | `OUT` (1) | `pwrite` the readable buffers to the image | `IOERR` on a read-only device |
//! | `FLUSH` (4) | `fdatasync` the image | |
//! | `GET_ID` (8) | the 20-byte id given at creation, NUL-padded | |
//! | anything else | nothing | `UNSUPP` |
//!
//! A request is its chain's readable bytes (the 16-byte header, then for `OUT` the data)
//! and writable bytes (for `IN` the data, then the one-byte status), however the driver
//! splits them into descriptors. Data lengths must be whole sectors and the range must
//! lie within the capacity; buffers outside guest memory fail the request before the image
//! is touched. Data moves between the image and guest memory through a bounded bounce
//! buffer and `vm-memory`, so the pages a read fills are marked dirty for migration.
//!
//! Offered features: `VIRTIO_BLK_F_FLUSH`, `VIRTIO_BLK_F_SEG_MAX`, `VIRTIO_BLK_F_RO` for
//! a read-only image, and `VIRTIO_RING_F_INDIRECT_DESC`.

use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use crate::chain::{self, Chain};
use crate::device::VirtioDevice;
use crate::mmio::F_INDIRECT_DESC;
use crate::GuestMemory;

/// Bytes per sector, as the guest counts them.
pub const SECTOR_SIZE: u64 = 512;
/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request, told to the driver (`seg_max`): the queue size less
/// the header and status descriptors, as QEMU does.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the id string `GET_ID` returns.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The request header: type (u32), reserved (u32), sector (u64), little-endian.
pub const HEADER_LEN: u64 = 16;

/// Configuration space as far as `num_queues` (`struct virtio_blk_config`).
const CONFIG_LEN: usize = 36;
/// Offset of `capacity` (u64) in the configuration space.
const CONFIG_CAPACITY: usize = 0;
/// Offset of `seg_max` (u32).
const CONFIG_SEG_MAX: usize = 12;
/// Size of the bounce buffer between the image and guest memory.
const BOUNCE_LEN: usize = 128 << 10;

/// Errors creating the device, and why a request fails.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image's size cannot be found.
    #[error("cannot find the size of the disk image")]
    ImageSize(#[source] io::Error),
    /// The image is not a whole number of sectors.
    #[error("the disk image is {size} bytes, not a multiple of {SECTOR_SIZE}")]
    Unaligned {
        /// Its size.
        size: u64,
    },
    /// The id is longer than `GET_ID` can return.
    #[error("the disk id is {len} bytes, longer than the {ID_LEN} of virtio-blk")]
    IdTooLong {
        /// Its length.
        len: usize,
    },
    /// The request's readable part is shorter than a header.
    #[error("the request is {len} readable bytes, shorter than its {HEADER_LEN}-byte header")]
    ShortHeader {
        /// Readable bytes.
        len: u64,
    },
    /// A buffer of the request lies outside guest memory.
    #[error("a buffer of the request is outside guest memory")]
    OutsideMemory,
    /// The data is not a whole number of sectors.
    #[error("the request carries {len} data bytes, not a multiple of {SECTOR_SIZE}")]
    DataLength {
        /// Data bytes.
        len: u64,
    },
    /// The sectors are not all on the disk.
    #[error("sectors {sector}+{count} are beyond the disk's {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sector count.
        count: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A request type the device does not implement.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// Reading, writing or syncing the image failed.
    #[error("disk image I/O failed")]
    Io(#[source] io::Error),
    /// Reading or writing the request's buffers failed.
    #[error("cannot access the request's buffers")]
    Guest(#[source] chain::Error),
}

impl Error {
    /// The status byte reporting this failure to the driver.
    fn status(&self) -> u8 {
        match self {
            Error::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A virtio-blk device on a raw image.
pub struct Block {
    file: File,
    read_only: bool,
    /// Capacity in sectors.
    capacity: u64,
    id: [u8; ID_LEN],
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    /// Reused between requests; allocated on first use.
    bounce: Vec<u8>,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("file", &self.file)
            .field("read_only", &self.read_only)
            .field("capacity", &self.capacity)
            .field("id", &String::from_utf8_lossy(&self.id))
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device on the raw image `file` (opened read-write unless `read_only`), whose
    /// capacity is the file's size, answering `GET_ID` with `id` (at most 20 bytes,
    /// NUL-padded).
    pub fn new(file: File, read_only: bool, id: &[u8]) -> Result<Self, Error> {
        if id.len() > ID_LEN {
            return Err(Error::IdTooLong { len: id.len() });
        }
        // Seeking to the end also sizes block devices, whose metadata says 0. The cursor
        // does not matter: all I/O is positional.
        let size = (&file).seek(SeekFrom::End(0)).map_err(Error::ImageSize)?;
        if size % SECTOR_SIZE != 0 {
            return Err(Error::Unaligned { size });
        }
        let capacity = size / SECTOR_SIZE;
        let mut padded = [0u8; ID_LEN];
        padded[..id.len()].copy_from_slice(id);
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Self {
            file,
            read_only,
            capacity,
            id: padded,
            config,
            queue_sizes: [QUEUE_SIZE],
            bounce: Vec::new(),
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Executes the request in `chain`, whose status byte is at `status_at` in the
    /// writable stream. Returns the number of data bytes written before the status.
    fn execute(&mut self, chain: &Chain, mem: &GuestMemory, status_at: u64) -> Result<u64, Error> {
        if chain.readable_len() < HEADER_LEN {
            return Err(Error::ShortHeader { len: chain.readable_len() });
        }
        if !chain.in_memory() {
            return Err(Error::OutsideMemory);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        chain.read_at(mem, 0, &mut header).map_err(Error::Guest)?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        match request_type {
            VIRTIO_BLK_T_IN => {
                let len = status_at;
                let offset = self.byte_range(sector, len)?;
                self.transfer(chain, mem, offset, len, Direction::ToGuest)?;
                Ok(len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(Error::ReadOnly);
                }
                let len = chain.readable_len() - HEADER_LEN;
                let offset = self.byte_range(sector, len)?;
                self.transfer(chain, mem, offset, len, Direction::ToImage)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(Error::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = status_at.min(ID_LEN as u64);
                chain.write_at(mem, 0, &self.id[..n as usize]).map_err(Error::Guest)?;
                Ok(n)
            }
            other => Err(Error::Unsupported(other)),
        }
    }

    /// Checks that `len` bytes from `sector` are whole sectors on the disk; returns the
    /// byte offset in the image.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, Error> {
        if len % SECTOR_SIZE != 0 {
            return Err(Error::DataLength { len });
        }
        let count = len / SECTOR_SIZE;
        match sector.checked_add(count) {
            // `sector <= capacity = size / 512`, so this cannot overflow.
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(Error::OutOfRange { sector, count, capacity: self.capacity }),
        }
    }

    /// Moves `len` bytes between the image at `offset` and the request's data: the
    /// writable stream from 0 (`IN`) or the readable stream after the header (`OUT`).
    fn transfer(
        &mut self,
        chain: &Chain,
        mem: &GuestMemory,
        offset: u64,
        len: u64,
        direction: Direction,
    ) -> Result<(), Error> {
        if self.bounce.is_empty() {
            self.bounce = vec![0; BOUNCE_LEN];
        }
        let mut done = 0u64;
        while done < len {
            // At most BOUNCE_LEN.
            let n = (len - done).min(BOUNCE_LEN as u64) as usize;
            let buf = &mut self.bounce[..n];
            match direction {
                Direction::ToGuest => {
                    self.file.read_exact_at(buf, offset + done).map_err(Error::Io)?;
                    chain.write_at(mem, done, buf).map_err(Error::Guest)?;
                }
                Direction::ToImage => {
                    chain.read_at(mem, HEADER_LEN + done, buf).map_err(Error::Guest)?;
                    self.file.write_all_at(buf, offset + done).map_err(Error::Io)?;
                }
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// Which way a transfer goes.
#[derive(Clone, Copy, Debug)]
enum Direction {
    /// Image to guest memory (`IN`).
    ToGuest,
    /// Guest memory to image (`OUT`).
    ToImage,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | F_INDIRECT_DESC;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config, offset, data);
    }

    fn process(&mut self, _queue: u16, chain: &Chain, mem: &GuestMemory) -> u32 {
        let Some(status_at) = chain.writable_len().checked_sub(1) else {
            tracing::debug!(
                head = chain.head_index(),
                "virtio-blk request without a status byte; returned unanswered"
            );
            return 0;
        };
        let (status, written) = match self.execute(chain, mem, status_at) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                let error: &dyn std::error::Error = &e;
                if matches!(e, Error::Io(_)) {
                    tracing::warn!(error, "virtio-blk request failed");
                } else {
                    tracing::debug!(error, "virtio-blk request refused");
                }
                (e.status(), 0)
            }
        };
        match chain.write_at(mem, status_at, &[status]) {
            // At most the chain's writable length, which `virtio-queue` keeps under 4 GiB.
            Ok(()) => u32::try_from(written + 1).unwrap_or(u32::MAX),
            Err(e) => {
                let error: &dyn std::error::Error = &e;
                tracing::debug!(error, "cannot write the virtio-blk status byte");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmio::{status, INT_USED_RING};
    use crate::testing::{pattern, regs, Driver, TempImage, DATA, DESC, HEADER, POISON, QSIZE, STATUS, USED};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
    const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn config_space_and_features() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let blk = Block::new(img.open(false), false, b"disk-1").expect("block");
        assert_eq!(blk.capacity(), 8);
        assert_eq!(blk.device_type(), 2);
        assert_eq!(blk.queue_max_sizes(), &[QUEUE_SIZE]);
        let f = blk.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut b = [0u8; 2];
        blk.read_config(1, &mut b);
        assert_eq!(b, [0, 0]);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        // Beyond the end (and far beyond): zeros, no panic.
        let mut tail = [0xffu8; 8];
        blk.read_config(34, &mut tail);
        assert_eq!(tail, [0; 8]);
        blk.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 8]);

        let ro = Block::new(img.open(true), true, b"").expect("block");
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert!(ro.read_only());
    }

    #[test]
    fn rejects_bad_images_and_ids() {
        let odd = TempImage::new(1000);
        assert!(matches!(Block::new(odd.open(false), false, b""), Err(Error::Unaligned { size: 1000 })));
        let img = TempImage::new(SECTOR_SIZE);
        assert!(matches!(
            Block::new(img.open(false), false, b"an id that is much too long"),
            Err(Error::IdTooLong { len: 27 })
        ));
        let empty = TempImage::new(0);
        assert_eq!(Block::new(empty.open(false), false, b"").expect("empty").capacity(), 0);
    }

    #[test]
    fn byte_ranges() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let blk = Block::new(img.open(false), false, b"").expect("block");
        assert_eq!(blk.byte_range(0, 8 * SECTOR_SIZE).expect("whole disk"), 0);
        assert_eq!(blk.byte_range(7, SECTOR_SIZE).expect("last sector"), 7 * SECTOR_SIZE);
        assert_eq!(blk.byte_range(8, 0).expect("empty at the end"), 8 * SECTOR_SIZE);
        assert!(matches!(blk.byte_range(8, SECTOR_SIZE), Err(Error::OutOfRange { .. })));
        assert!(matches!(blk.byte_range(7, 2 * SECTOR_SIZE), Err(Error::OutOfRange { .. })));
        assert!(matches!(blk.byte_range(u64::MAX, SECTOR_SIZE), Err(Error::OutOfRange { .. })));
        assert!(matches!(blk.byte_range(0, 100), Err(Error::DataLength { len: 100 })));
    }

    #[test]
    fn write_read_flush_get_id() {
        let img = TempImage::new(64 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"ferry-disk-0");
        d.start();
        assert_eq!(d.take_irq(), 0);

        // OUT: two sectors at sector 3.
        let data: Vec<u8> = (0..2 * SECTOR_SIZE).map(|i| (i * 7 + 1) as u8).collect();
        let c = d.blk_request(VIRTIO_BLK_T_OUT, 3, &data, 0);
        assert_eq!((c.status, c.len), (S_OK, 1));
        let on_disk = img.contents();
        assert_eq!(&on_disk[3 * 512..5 * 512], &data[..]);
        assert_eq!(on_disk[3 * 512 - 1], pattern(3 * 512 - 1));
        assert_eq!(on_disk[5 * 512], pattern(5 * 512));
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(d.take_irq(), 1);
        d.write_reg(regs::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), 0);

        // IN: four sectors from 2: one of the pattern, the two written, one of the pattern.
        let c = d.blk_request(VIRTIO_BLK_T_IN, 2, &[], 4 * 512);
        assert_eq!((c.status, c.len), (S_OK, 4 * 512 + 1));
        assert_eq!(&c.data[512..1536], &data[..]);
        assert!(c.data[..512].iter().enumerate().all(|(i, &b)| b == pattern(2 * 512 + i as u64)));
        assert!(c.data[1536..].iter().enumerate().all(|(i, &b)| b == pattern(5 * 512 + i as u64)));
        assert_eq!(d.take_irq(), 1);

        // FLUSH.
        let c = d.blk_request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
        assert_eq!((c.status, c.len), (S_OK, 1));

        // GET_ID: 20 bytes, NUL-padded.
        let c = d.blk_request(VIRTIO_BLK_T_GET_ID, 0, &[], ID_LEN as u32);
        assert_eq!((c.status, c.len), (S_OK, ID_LEN as u32 + 1));
        assert_eq!(&c.data[..12], b"ferry-disk-0");
        assert_eq!(&c.data[12..], &[0u8; 8]);

        // The used ring holds all four, in order, and the interrupt fired for each.
        assert_eq!(d.used_idx(), 4);
        assert_eq!(d.take_irq(), 2);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), INT_USED_RING);
    }

    #[test]
    fn read_only_refuses_writes() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, true, b"ro");
        let features = d.negotiate();
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        d.setup_queue(u32::from(QSIZE), DESC, crate::testing::AVAIL, USED);
        d.add_status(status::DRIVER_OK);
        let before = img.contents();
        let c = d.blk_request(VIRTIO_BLK_T_OUT, 0, &[0xaa; 512], 0);
        assert_eq!((c.status, c.len), (S_IOERR, 1));
        assert_eq!(img.contents(), before);
        let c = d.blk_request(VIRTIO_BLK_T_IN, 1, &[], 512);
        assert_eq!(c.status, S_OK);
        assert_eq!(c.data[0], pattern(512));
        let c = d.blk_request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
        assert_eq!(c.status, S_OK);
    }

    #[test]
    fn out_of_range_and_malformed_requests_fail() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"");
        d.start();
        let before = img.contents();
        for (sector, sectors) in [(8u64, 1u32), (7, 2), (u64::MAX, 1), (u64::MAX / 512 + 1, 1)] {
            let c = d.blk_request(VIRTIO_BLK_T_IN, sector, &[], sectors * 512);
            assert_eq!((c.status, c.len), (S_IOERR, 1), "IN at {sector}+{sectors}");
            assert!(c.data.iter().all(|&b| b == POISON), "no data written on failure");
            let c = d.blk_request(VIRTIO_BLK_T_OUT, sector, &vec![1u8; sectors as usize * 512], 0);
            assert_eq!((c.status, c.len), (S_IOERR, 1), "OUT at {sector}+{sectors}");
        }
        // Not whole sectors.
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 0, &[], 100).status, S_IOERR);
        assert_eq!(d.blk_request(VIRTIO_BLK_T_OUT, 0, &[1u8; 700], 0).status, S_IOERR);
        // Unknown and unimplemented types.
        assert_eq!(d.blk_request(11, 0, &[], 0).status, S_UNSUPP); // DISCARD
        assert_eq!(d.blk_request(13, 0, &[], 0).status, S_UNSUPP); // WRITE_ZEROES
        assert_eq!(d.blk_request(0xdead_beef, 0, &[], 0).status, S_UNSUPP);
        // A header shorter than 16 bytes.
        d.mem.write_slice(&[POISON], GuestAddress(STATUS)).expect("status");
        let c = d.submit_and_complete(&[(HEADER, 8, false), (STATUS, 1, true)], 0);
        assert_eq!((c.status, c.len), (S_IOERR, 1));
        // No writable byte for the status: returned with nothing written.
        let c = d.submit_and_complete(&[(HEADER, 16, false)], 0);
        assert_eq!(c.len, 0);
        // Zero sectors at the end of the disk is a valid, empty request.
        assert_eq!(d.blk_request(VIRTIO_BLK_T_OUT, 8, &[], 0).status, S_OK);
        assert_eq!(img.contents(), before);
        assert_eq!(d.status() & status::NEEDS_RESET, 0);
    }

    #[test]
    fn buffers_outside_memory_fail_the_request() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"");
        d.start();
        let before = img.contents();
        let end = crate::testing::MEM_SIZE;
        d.write_header(VIRTIO_BLK_T_IN, 0);
        // Data straddling the end of memory: IOERR, and nothing read into memory.
        let c = d.submit_and_complete(&[(HEADER, 16, false), (end - 256, 512, true), (STATUS, 1, true)], 0);
        assert_eq!((c.status, c.len), (S_IOERR, 1));
        // A write whose data is far outside memory: the image is untouched.
        d.write_header(VIRTIO_BLK_T_OUT, 0);
        let c = d.submit_and_complete(&[(HEADER, 16, false), (1 << 40, 512, false), (STATUS, 1, true)], 0);
        assert_eq!((c.status, c.len), (S_IOERR, 1));
        let c =
            d.submit_and_complete(&[(HEADER, 16, false), (u64::MAX - 100, 512, false), (STATUS, 1, true)], 0);
        assert_eq!((c.status, c.len), (S_IOERR, 1));
        assert_eq!(img.contents(), before);
        // The header outside memory.
        let c = d.submit_and_complete(&[(1 << 40, 16, false), (STATUS, 1, true)], 0);
        assert_eq!((c.status, c.len), (S_IOERR, 1));
        // The status byte outside memory: completed, nothing written.
        d.write_header(VIRTIO_BLK_T_FLUSH, 0);
        let before_used = d.used_idx();
        d.add_chain(&[(HEADER, 16, false), (1 << 40, 1, true)]);
        d.notify();
        assert_eq!(d.used_idx(), before_used.wrapping_add(1));
        assert_eq!(d.used_elem(before_used).1, 0);
        // The device is still fine.
        assert_eq!(d.status() & status::NEEDS_RESET, 0);
        assert_eq!(d.blk_request(VIRTIO_BLK_T_IN, 0, &[], 512).status, S_OK);
    }

    #[test]
    fn any_layout_and_indirect_descriptors() {
        let img = TempImage::new(8 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"");
        d.start();
        // Header and data in one readable buffer; the data split unevenly.
        let mut req = vec![0u8; 16 + 1024];
        req[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        req[8..16].copy_from_slice(&2u64.to_le_bytes());
        for (i, b) in req[16..].iter_mut().enumerate() {
            *b = (i % 13) as u8;
        }
        d.mem.write_slice(&req[..300], GuestAddress(DATA)).expect("part 1");
        d.mem.write_slice(&req[300..], GuestAddress(DATA + 0x10000)).expect("part 2");
        let c = d.submit_and_complete(
            &[(DATA, 300, false), (DATA + 0x10000, (req.len() - 300) as u32, false), (STATUS, 1, true)],
            0,
        );
        assert_eq!(c.status, S_OK);
        assert_eq!(&img.contents()[1024..2048], &req[16..]);

        // IN through an indirect table of four descriptors: header, data in two pieces,
        // and the status byte sharing the last writable buffer.
        let table = 0x40_000u64;
        d.write_header(VIRTIO_BLK_T_IN, 2);
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        d.write_desc(table, 0, HEADER, 16, next, 1);
        d.write_desc(table, 1, DATA, 1000, next | write, 2);
        d.write_desc(table, 2, DATA + 0x20000, 25, write, 0);
        d.mem.write_slice(&[POISON; 25], GuestAddress(DATA + 0x20000)).expect("poison");
        let before = d.used_idx();
        let head = d.next_desc;
        d.write_desc(DESC, head, table, 3 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        d.next_desc = (head + 1) % QSIZE;
        d.publish(head);
        d.notify();
        assert_eq!(d.used_idx(), before + 1);
        assert_eq!(d.used_elem(before), (u32::from(head), 1025));
        let mut got = vec![0u8; 1025];
        d.mem.read_slice(&mut got[..1000], GuestAddress(DATA)).expect("read");
        d.mem.read_slice(&mut got[1000..], GuestAddress(DATA + 0x20000)).expect("read");
        assert_eq!(&got[..1024], &req[16..]);
        assert_eq!(got[1024], S_OK);
    }

    #[test]
    fn large_requests_cross_the_bounce_buffer() {
        let sectors = 3 * BOUNCE_LEN as u64 / SECTOR_SIZE + 5;
        let img = TempImage::new(sectors * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"");
        d.start();
        let len = (sectors - 1) * SECTOR_SIZE;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        assert_eq!(d.blk_request(VIRTIO_BLK_T_OUT, 1, &data, 0).status, S_OK);
        assert_eq!(&img.contents()[512..], &data[..]);
        let c = d.blk_request(VIRTIO_BLK_T_IN, 1, &[], len as u32);
        assert_eq!((c.status, c.len), (S_OK, len as u32 + 1));
        assert!(c.data == data);
    }

    #[test]
    fn device_writes_mark_the_dirty_bitmap() {
        let img = TempImage::new(64 * SECTOR_SIZE);
        let mut d = Driver::blk(&img, false, b"");
        d.start();
        let mem = d.mem.clone();
        let region = mem.find_region(GuestAddress(0)).expect("region");
        let bitmap = std::ops::Deref::deref(region).bitmap();
        bitmap.reset();
        // A read of 3 pages' worth into DATA + 0x800: pages DATA .. DATA + 3 pages. What
        // the test's driver writes goes through vm-memory too (a guest's writes would not),
        // so the bitmap is cleared between setting the request up and notifying.
        d.write_header(VIRTIO_BLK_T_IN, 0);
        d.mem.write_slice(&[POISON], GuestAddress(STATUS)).expect("poison");
        d.add_chain(&[(HEADER, 16, false), (DATA + 0x800, 3 * 4096, true), (STATUS, 1, true)]);
        bitmap.reset();
        d.notify();
        assert_eq!(d.used_idx(), 1);
        let mut st = [0u8];
        d.mem.read_slice(&mut st, GuestAddress(STATUS)).expect("status");
        assert_eq!(st[0], S_OK);
        for page in 0..4 {
            assert!(bitmap.is_addr_set((DATA + page * 4096) as usize), "data page {page} dirty");
        }
        assert!(!bitmap.is_addr_set((DATA + 4 * 4096) as usize), "page after the data clean");
        assert!(bitmap.is_addr_set(STATUS as usize), "status page dirty");
        assert!(bitmap.is_addr_set(USED as usize), "used ring dirty");
        assert!(!bitmap.is_addr_set(HEADER as usize), "header (only read) clean");
        assert!(!bitmap.is_addr_set(DESC as usize), "descriptor table (only read) clean");
        assert!(!bitmap.is_addr_set(crate::testing::AVAIL as usize), "available ring (only read) clean");
    }
}
