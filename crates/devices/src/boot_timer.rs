//! Port 0x80, the PC's POST code port. Ferry's test guests write to it as their very first
//! instruction, so the first write marks when the guest started executing; benchmarks
//! read that moment to measure the time from process start to the guest's first
//! instruction. Later writes are ignored, as POST codes are.

use std::sync::{Arc, OnceLock};

use crate::bus::BusDevice;

/// The moment of the first write, in `CLOCK_MONOTONIC` nanoseconds (the same clock a
/// benchmark harness in another process reads).
pub type FirstWrite = Arc<OnceLock<u64>>;

/// The port 0x80 device.
#[derive(Debug, Default)]
pub struct BootTimer {
    first_write: FirstWrite,
}

impl BootTimer {
    /// A timer recording into `first_write`.
    pub fn new(first_write: FirstWrite) -> Self {
        Self { first_write }
    }
}

/// Reads `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        let _ = self.first_write.set(monotonic_ns());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_first_write() {
        let t = FirstWrite::default();
        let mut dev = BootTimer::new(t.clone());
        assert!(t.get().is_none());
        dev.write(0, &[1]);
        let first = *t.get().expect("recorded");
        std::thread::sleep(std::time::Duration::from_millis(2));
        dev.write(0, &[2]);
        assert_eq!(*t.get().expect("recorded"), first);
        assert!(first <= monotonic_ns());
    }
}
