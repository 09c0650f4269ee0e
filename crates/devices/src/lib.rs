//! Emulated legacy devices for Ferry.
//!
//! The guest reaches these through port I/O. Each device implements [`BusDevice`] and is
//! placed on a [`Bus`] that the vCPU threads dispatch `IN`/`OUT` exits to.
//!
//! - [`serial::Serial`]: a 16550A UART (COM1 at 0x3f8, IRQ 4), on `vm-superio`;
//! - [`i8042::I8042`]: the keyboard controller's reset line, which Ferry treats as the guest
//!   powering off (as Firecracker does);
//! - [`boot_timer::BootTimer`]: the POST code port 0x80; its first write marks the guest's
//!   first instruction, for boot-time measurements;
//! - [`exit_status::ExitStatus`]: port 0xf4, where a guest that fails writes a non-zero
//!   status before it powers off.

pub mod boot_timer;
pub mod bus;
pub mod exit_status;
pub mod i8042;
pub mod serial;

pub use bus::{Bus, BusDevice};
