//! Helpers for tests in this crate and others: hand-made kernels with exactly the
//! header defects a test needs.

/// Builds a minimal ELF64 x86-64 executable with one PT_LOAD segment at physical `paddr`
/// holding `code`, and, if `pvh_entry` is given, a PT_NOTE with the Xen PVH entry note.
pub fn make_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let phoff = 64u64;
    let data_off = phoff + 56 * u64::from(phnum);
    let note_off = data_off + code.len() as u64;
    let mut f = vec![0u8; 64];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&phoff.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let phdr = |ty: u32, off: u64, addr: u64, size: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&ty.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&size.to_le_bytes());
        p[40..48].copy_from_slice(&size.to_le_bytes());
        p
    };
    f.extend(phdr(1, data_off, paddr, code.len() as u64));
    let mut note = Vec::new();
    if let Some(entry) = pvh_entry {
        note.extend(4u32.to_le_bytes()); // namesz
        note.extend(4u32.to_le_bytes()); // descsz
        note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend(b"Xen\0");
        note.extend(entry.to_le_bytes());
        f.extend(phdr(4, note_off, 0, note.len() as u64));
    }
    f.extend_from_slice(code);
    f.extend(note);
    f
}
