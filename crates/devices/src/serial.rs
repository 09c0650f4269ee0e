//! The 16550A serial console (COM1: ports 0x3f8..0x3ff, IRQ 4), on `vm-superio`.
//!
//! Interrupts reach the guest through an eventfd registered with KVM as an irqfd for the
//! UART's IRQ line, so raising one never leaves the kernel's fast path.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's first port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's IRQ line.
pub const COM1_IRQ: u32 = 4;
/// Number of ports a 16550 decodes.
pub const PORT_COUNT: u16 = 8;

/// Errors setting up the serial console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The output file cannot be opened for writing.
    #[error("cannot open serial output file {path} for writing")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The interrupt eventfd cannot be created or cloned.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    /// A saved state that no UART can have.
    #[error("the saved serial state is invalid (receive FIFO larger than the UART's)")]
    BadState,
    /// The input FIFO is full.
    #[error("the serial input FIFO is full")]
    InputFull,
}

/// Raises the UART's interrupt by writing to an eventfd that KVM injects as an IRQ.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A trigger on `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
#[derive(Debug)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(File),
    /// Nowhere.
    Sink,
}

impl SerialOutput {
    /// The console's reader went away (`ferry run | head`): the guest goes on, and its
    /// console output goes nowhere from now on, said once.
    fn reader_gone(&mut self) {
        tracing::warn!("the serial console's reader went away; console output is dropped from now on");
        *self = SerialOutput::Sink;
    }

    /// Opens (creating or truncating) `path` for the console.
    pub fn file(path: &Path) -> Result<Self, Error> {
        File::create(path)
            .map(SerialOutput::File)
            .map_err(|source| Error::OpenFile { path: path.to_owned(), source })
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match self {
            SerialOutput::Stdout => io::stdout().write(buf),
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        };
        match r {
            // The console's reader went away (`ferry run | head`): the guest goes on, and
            // its console output goes nowhere from now on, said once.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.reader_gone();
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = match self {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Sink => Ok(()),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.reader_gone();
                Ok(())
            }
            r => r,
        }
    }
}

/// The saved state of the UART: every register and the receive FIFO. The transmit side
/// has no buffer to save: each byte the guest sends is written out at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register (pending interrupt).
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The serial console device.
#[derive(Debug)]
pub struct Serial {
    uart: Uart<EventFdTrigger, vm_superio::serial::NoEvents, SerialOutput>,
    /// Console writes that failed: the first is logged, the rest only counted.
    write_errors: u64,
}

impl Serial {
    /// A UART writing to `out` and raising its interrupt on `irq_evt`.
    pub fn new(irq_evt: EventFd, out: SerialOutput) -> Self {
        Self { uart: Uart::new(EventFdTrigger::new(irq_evt), out), write_errors: 0 }
    }

    /// Saves the UART's registers and receive FIFO.
    pub fn save(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Rebuilds a UART from a saved state, writing to `out` and raising `irq_evt`.
    pub fn restore(state: &SerialState, irq_evt: EventFd, out: SerialOutput) -> Result<Self, Error> {
        let uart =
            Uart::from_state(&state.into(), EventFdTrigger::new(irq_evt), vm_superio::serial::NoEvents, out)
                .map_err(|_| Error::BadState)?;
        Ok(Self { uart, write_errors: 0 })
    }

    /// Feeds bytes typed on the console to the guest. Returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        self.uart.enqueue_raw_bytes(bytes).map_err(|_| Error::InputFull)
    }

    /// Free space in the input FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.uart.read(offset as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, b) {
                // Losing console output must not stop the guest, nor flood the log.
                self.write_errors += 1;
                if self.write_errors == 1 {
                    tracing::warn!("serial console write failed: {e}; further failures are not logged");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_to_file_and_raises_irq() {
        let dir = std::env::temp_dir().join(format!("ferry-serial-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("out");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = Serial::new(irq.try_clone().expect("clone"), SerialOutput::file(&path).expect("file"));
        // Enable the THR-empty interrupt (IER bit 1), then send "hi".
        s.write(1, &[0x2]);
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(std::fs::read(&path).expect("read"), b"hi");
        assert!(irq.read().expect("irq raised") >= 1);
        // LSR: transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Input.
        assert_eq!(s.enqueue_input(b"x").expect("enqueue"), 1);
        let mut rx = [0u8];
        s.read(0, &mut rx);
        assert_eq!(rx[0], b'x');
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn state_round_trip() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = Serial::new(irq.try_clone().expect("clone"), SerialOutput::Sink);
        s.write(3, &[0x83]); // DLAB on, 8 bits
        s.write(0, &[0x0c]); // divisor 12
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[0x1]); // RX interrupt on
        s.enqueue_input(b"ab").expect("input");
        let saved = s.save();
        assert_eq!(saved.in_buffer, b"ab");
        let json = serde_json::to_string(&saved).expect("json");
        let back: SerialState = serde_json::from_str(&json).expect("parse");
        let mut r = Serial::restore(&back, irq, SerialOutput::Sink).expect("restore");
        assert_eq!(r.save(), saved);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let bad = SerialState { in_buffer: vec![0; 1000], ..saved };
        assert!(matches!(
            Serial::restore(&bad, EventFd::new(0).expect("efd"), SerialOutput::Sink),
            Err(Error::BadState)
        ));
    }

    #[test]
    fn unwritable_file_is_an_error() {
        let err = SerialOutput::file(Path::new("/nonexistent-dir/x")).expect_err("no dir");
        assert!(err.to_string().contains("/nonexistent-dir/x"));
    }
}
