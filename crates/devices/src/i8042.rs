//! The i8042 keyboard controller, reduced to what a VM without a keyboard needs: a
//! status port that reads "nothing pending" and the CPU reset command (0xfe written to
//! port 0x64), which Ferry treats as the guest asking to power off, since a VMM has no
//! firmware to reboot into. Linux uses it for `reboot` when told `reboot=k`.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The command byte that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;
/// Offset of the command/status port from the data port (0x60 + 4 = 0x64).
const COMMAND_OFFSET: u64 = 4;

/// The i8042 device: ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller that signals `reset_evt` when the guest pulses the reset line.
    pub fn new(reset_evt: EventFd) -> Self {
        Self { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty. Data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset_evt.write(1) {
                tracing::error!("cannot signal the guest's reset request: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(evt.try_clone().expect("clone"));
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(evt.read().is_err(), "a write to the data port is not a reset");
        dev.write(4, &[0xd1]);
        assert!(evt.read().is_err());
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().expect("signalled"), 1);
        let mut b = [0xffu8];
        dev.read(4, &mut b);
        assert_eq!(b[0], 0);
    }
}
