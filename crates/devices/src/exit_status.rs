//! The guest's exit status port (0xf4, as QEMU's `isa-debug-exit`): a guest that stops
//! because something went wrong writes a non-zero byte here before it powers off, so that
//! the VMM can tell a failure from a clean power-off (`ferry run` then exits non-zero). A
//! guest that never writes here powers off with status 0. The port keeps no state worth
//! migrating: a write ends the VM.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// The port.
pub const PORT: u16 = 0xf4;

/// The status the guest wrote last, shared with the VMM's run loop.
pub type Status = Arc<Mutex<Option<u8>>>;

/// The exit status device.
#[derive(Debug, Default)]
pub struct ExitStatus {
    status: Status,
}

impl ExitStatus {
    /// A device that records into `status`.
    pub fn new(status: Status) -> Self {
        Self { status }
    }
}

impl BusDevice for ExitStatus {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_records_the_status() {
        let status = Status::default();
        let mut dev = ExitStatus::new(status.clone());
        assert_eq!(*status.lock().expect("lock"), None);
        dev.write(0, &[3]);
        assert_eq!(*status.lock().expect("lock"), Some(3));
        let mut b = [9u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], 0);
    }
}
