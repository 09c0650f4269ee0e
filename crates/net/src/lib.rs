//! Host networking for Ferry's VMs.
//!
//! - [`MacAddr`] and [`NetConfig`]: the `--net tap=NAME,mac=MAC` option;
//! - [`Tap`]: an existing tap device opened for one VM NIC (frames without packet info);
//! - [`rarp`]: the frames a destination sends after a migration so that switches learn at
//!   once where the VM's MAC went (what vMotion's "Notify Switches" and QEMU's announce do).

pub mod mac;
pub mod rarp;
pub mod tap;

pub use mac::{MacAddr, NetConfig};
pub use tap::Tap;
