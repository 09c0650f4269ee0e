//! Buses: port I/O and MMIO exits dispatched to devices by address range. One type serves
//! both; a port bus uses 16-bit addresses in the same 64-bit space.

use std::sync::{Arc, Mutex};

/// A device reached through port I/O or MMIO.
pub trait BusDevice: Send {
    /// Handles a read (`IN`, or an MMIO load) at `offset` from the device's base; fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write (`OUT`, or an MMIO store) at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors placing a device on the bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The range overlaps a device already on the bus.
    #[error("range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("range {base:#x}+{len} is empty or wraps")]
    BadRange {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Maps address ranges to devices. Unclaimed addresses read as all ones and ignore
/// writes, as on a PC with nothing decoding them.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self.entries.iter().map(|e| format!("{:#x}+{}", e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::BadRange { base, len })?;
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < end) {
            return Err(Error::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        self.entries.iter().find(|e| addr >= e.base && addr - e.base < e.len).map(|e| (e, addr - e.base))
    }

    /// Dispatches a read. Returns false if no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                // A device whose lock is poisoned has panicked; keep the VM alive and
                // let it read whatever the device's state now is.
                let mut dev = e.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false if no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                let mut dev = e.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Latch(Vec<(u64, u8)>);
    impl BusDevice for Latch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range() {
        let dev = Arc::new(Mutex::new(Latch::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().expect("lock").0, vec![(7, 9)]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Latch::default()))).expect("insert");
        assert!(matches!(
            bus.insert(0x64, 1, Arc::new(Mutex::new(Latch::default()))),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Latch::default()))),
            Err(Error::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(0x10, 0, Arc::new(Mutex::new(Latch::default()))),
            Err(Error::BadRange { .. })
        ));
    }
}
