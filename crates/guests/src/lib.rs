//! Ferry's test guests: small bare-metal x86-64 programs, built from the C and assembly
//! source in this crate by `build.rs` and embedded in Ferry. They boot through PVH like
//! Linux and make migration checkable from inside the guest.
//!
//! Guest ABI: PVH entry (`rt/entry.S`), the first instruction writes port 0x80 (boot
//! timer), console on the 16550 at 0x3f8, power-off by writing 0xfe to port 0x64, TSC
//! frequency from CPUID leaf 0x4000_0010. Devices beyond the console (blkstress's disk,
//! netecho's NIC) are virtio-mmio version 2 transports named on the command line as Linux's
//! `virtio_mmio.device=<size>@<base>:<irq>`, below 4 GiB (the guests identity-map only
//! that). dirtier runs its loop in ring 3 (`rt/ring3.{h,c,S}`), where guest code runs
//! natively on this project's hosts, and calls back into ring 0 with `int $0x80`.

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

static GUESTS: &[Guest] = &[
    Guest {
        name: "memstress",
        summary: "stamps every page of its working set on each pass and checks the previous \
                  stamps, so any lost or stale page shows as a CORRUPTION line",
        cmdline_help: "wss=SIZE (working set, default 64M), seed=N (default 1), rate=N (pages/s, \
                       0 = as fast as it can), passes=N (power off after N passes, 0 = never)",
        elf: include_bytes!(concat!(env!("OUT_DIR"), "/memstress.elf")),
    },
    Guest {
        name: "blkstress",
        summary: "appends numbered, checksummed records to a virtio-blk disk through its own \
                  virtio-mmio driver, reads each back and re-reads the newest ones every 64 \
                  records, so any lost, stale or corrupt block shows as a CORRUPTION line",
        cmdline_help: "seed=N (default 1), records=N (power off after N records this boot, \
                       0 = never), rate=N (records/s, 0 = as fast as it can), window=N (newest \
                       records re-read at each check, default 512, 0 = all), format=1 \
                       (overwrite a disk that is not blkstress's); the disk is the first \
                       virtio-blk among virtio_mmio.device=SIZE@BASE:IRQ (Linux's format)",
        elf: include_bytes!(concat!(env!("OUT_DIR"), "/blkstress.elf")),
    },
    Guest {
        name: "netecho",
        summary: "a network echo host on a virtio-net NIC through its own virtio-mmio driver: \
                  answers ARP for its address, ICMP echo (ping) and UDP port 7 (echo), sends a \
                  gratuitous ARP at start and prints rx/tx counts every 2 seconds",
        cmdline_help: "ip=A.B.C.D[/N] (required, the guest's IPv4 address); the NIC is the first \
                       virtio-net among virtio_mmio.device=SIZE@BASE:IRQ (Linux's format)",
        elf: include_bytes!(concat!(env!("OUT_DIR"), "/netecho.elf")),
    },
    Guest {
        name: "dirtier",
        summary: "rewrites one 8-byte stamp in every page of its working set from ring 3, at \
                  native speed, checking each page's previous stamp first, so any lost or stale \
                  page shows as a CORRUPTION line (and a failed power-off); prints its rate, \
                  rounds and the longest pause it felt every second (report_ms)",
        cmdline_help: "wss=SIZE (working set, default 128M), rate=N (pages/s, 0 = as fast as it \
                       can), seconds=N (power off after about N seconds, 0 = never), report_ms=N (progress \
                       line interval, default 1000), words=N (8-byte words written per page, \
                       default 1, at most 512)",
        elf: include_bytes!(concat!(env!("OUT_DIR"), "/dirtier.elf")),
    },
];

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

    /// Each guest passes the same header checks `ferry run` applies: a 64-bit x86 ELF with
    /// a PVH note whose entry lies in a segment, every segment at or above 1 MiB.
    #[test]
    fn every_guest_is_a_pvh_elf_at_one_mib() {
        for g in all() {
            let h = ferry_boot::read_headers(&mut std::io::Cursor::new(g.elf)).expect(g.name);
            let entry = u64::from(h.pvh_entry.unwrap_or_else(|| panic!("{}: no PVH note", g.name)));
            assert!(h.segments.iter().all(|s| s.start >= 0x10_0000), "{}: {:x?}", g.name, h.segments);
            assert!(
                h.segments.iter().any(|s| (s.start..s.end).contains(&entry)),
                "{}: entry outside",
                g.name
            );
        }
    }

    #[test]
    fn lookup() {
        assert!(find("memstress").is_some());
        assert!(find("blkstress").is_some());
        assert!(find("netecho").is_some());
        assert!(find("dirtier").is_some());
        assert!(find("nope").is_none());
    }
}
