//! RARP announcements: after a migration the destination sends, for each NIC, a few
//! broadcast RARP frames from the VM's MAC, so that every switch (and Linux bridge) on the
//! way updates its forwarding table to the destination's port at once, instead of when
//! the guest next happens to send something. Same frame as QEMU's announce, and a similar
//! schedule: 5 rounds once the guest runs, the gaps growing from 50 to 200 ms. The VMM sends
//! one round more at the switchover, as soon as the destination holds the VM's lock and
//! before the vCPUs start, so the switches already point at the new host while they start.

use std::time::Duration;

use crate::MacAddr;

/// Ethertype of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Length of the frame (the Ethernet minimum without FCS).
pub const FRAME_LEN: usize = 60;

/// A RARP "request reverse" frame from `mac`, broadcast.
pub fn frame(mac: MacAddr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    f[6..12].copy_from_slice(&mac.0); // source: the VM
    f[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // operation: request reverse
    f[22..28].copy_from_slice(&mac.0); // sender hardware address
                                       // sender protocol address 0.0.0.0
    f[32..38].copy_from_slice(&mac.0); // target hardware address
                                       // target protocol address 0.0.0.0, then padding
    f
}

/// Delays before each round, from activation: 0, 50, 150, 300, 500 ms in total.
pub fn schedule() -> impl Iterator<Item = Duration> {
    [0u64, 50, 100, 150, 200].into_iter().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layout() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = frame(mac);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac.0);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac.0);
        assert!(f[38..].iter().all(|&b| b == 0));
        assert_eq!(schedule().count(), 5);
    }
}
