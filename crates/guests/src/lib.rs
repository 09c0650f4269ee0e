//! Ferry's test guests: small bare-metal x86-64 programs, built from the C and assembly
//! source in this crate by `build.rs` and embedded in Ferry. They boot through PVH like
//! Linux and make migration checkable from inside the guest.
//!
//! Guest ABI: PVH entry (`rt/entry.S`), the first instruction writes port 0x80 (boot
//! timer), console on the 16550 at 0x3f8, power-off by writing 0xfe to port 0x64, TSC
//! frequency from CPUID leaf 0x4000_0010.

/// A bundled guest.
#[derive(Debug)]
pub struct Guest {
    /// Its name (`ferry run --guest NAME`).
    pub name: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Its command-line options.
    pub cmdline_help: &'static str,
    /// The ELF image.
    pub elf: &'static [u8],
}

static GUESTS: &[Guest] = &[Guest {
    name: "memstress",
    summary: "stamps every page of its working set on each pass and checks the previous \
              stamps, so any lost or stale page shows as a CORRUPTION line",
    cmdline_help: "wss=SIZE (working set, default 64M), seed=N (default 1), rate=N (pages/s, \
                   0 = as fast as it can), passes=N (power off after N passes, 0 = never)",
    elf: include_bytes!(concat!(env!("OUT_DIR"), "/memstress.elf")),
}];

/// Every bundled guest.
pub fn all() -> &'static [Guest] {
    GUESTS
}

/// The guest called `name`.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    }

    #[test]
    fn every_guest_is_a_pvh_elf_at_one_mib() {
        for g in all() {
            let e = g.elf;
            assert_eq!(&e[..4], b"\x7fELF", "{}", g.name);
            assert_eq!((e[4], e[5]), (2, 1), "{}: ELF64 little endian", g.name);
            assert_eq!(u16_at(e, 16), 2, "{}: ET_EXEC", g.name);
            assert_eq!(u16_at(e, 18), 62, "{}: x86-64", g.name);
            let (phoff, phnum) = (u64_at(e, 32) as usize, u16_at(e, 56) as usize);
            let mut loads = Vec::new();
            let mut entry = None;
            for i in 0..phnum {
                let ph = &e[phoff + i * 56..phoff + (i + 1) * 56];
                match u32_at(ph, 0) {
                    1 => loads.push((u64_at(ph, 24), u64_at(ph, 40))),
                    4 => {
                        let off = u64_at(ph, 8) as usize;
                        let n = &e[off..off + u64_at(ph, 32) as usize];
                        assert_eq!((u32_at(n, 0), u32_at(n, 4), u32_at(n, 8)), (4, 4, 18), "{}", g.name);
                        assert_eq!(&n[12..16], b"Xen\0");
                        entry = Some(u64::from(u32_at(n, 16)));
                    }
                    _ => {}
                }
            }
            let entry = entry.unwrap_or_else(|| panic!("{}: no PVH note", g.name));
            assert!(loads.iter().all(|&(a, _)| a >= 0x10_0000), "{}: {loads:x?}", g.name);
            assert!(loads.iter().any(|&(a, l)| entry >= a && entry < a + l), "{}: entry outside", g.name);
        }
    }

    #[test]
    fn lookup() {
        assert!(find("memstress").is_some());
        assert!(find("nope").is_none());
    }
}
