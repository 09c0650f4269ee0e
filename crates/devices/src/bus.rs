//! The port I/O bus.

use std::sync::{Arc, Mutex};

/// A device reached through x86 port I/O.
pub trait PioDevice: Send {
    /// Handles an `IN` at `offset` from the device's base port; fills `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles an `OUT` at `offset` from the device's base port.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors placing a device on the bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The range overlaps a device already on the bus.
    #[error("port range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
    /// Zero-length or wrapping range.
    #[error("port range {base:#x}+{len} is empty or wraps")]
    BadRange {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
}

struct Entry {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Maps port ranges to devices. Unclaimed ports read as all ones and ignore writes, as
/// on a PC with nothing decoding them.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self.entries.iter().map(|e| format!("{:#x}+{}", e.base, e.len)).collect();
        f.debug_struct("PioBus").field("ranges", &ranges).finish()
    }
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at ports `base..base+len`.
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::BadRange { base, len })?;
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < end) {
            return Err(Error::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Entry, u16)> {
        self.entries.iter().find(|e| port >= e.base && port - e.base < e.len).map(|e| (e, port - e.base))
    }

    /// Dispatches an `IN`. Returns false if no device claims the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
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

    /// Dispatches an `OUT`. Returns false if no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
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
    struct Latch(Vec<(u16, u8)>);
    impl PioDevice for Latch {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range() {
        let dev = Arc::new(Mutex::new(Latch::default()));
        let mut bus = PioBus::new();
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
        let mut bus = PioBus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Latch::default()))).expect("insert");
        assert!(matches!(
            bus.insert(0x64, 1, Arc::new(Mutex::new(Latch::default()))),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xffff, 2, Arc::new(Mutex::new(Latch::default()))),
            Err(Error::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(0x10, 0, Arc::new(Mutex::new(Latch::default()))),
            Err(Error::BadRange { .. })
        ));
    }
}
