//! Just enough ELF parsing to check a kernel before loading it.

use std::io::{Read, Seek, SeekFrom};

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Notes larger than this are not read (a kernel's notes are a few hundred bytes).
const MAX_NOTE_SEGMENT: u64 = 1 << 20;
const EM_X86_64: u16 = 62;
/// More program headers than any kernel has; bounds what we read from the file.
const MAX_PHDRS: u16 = 256;

/// What is wrong with a kernel file's ELF headers.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file is shorter than an ELF header or its headers.
    #[error("the file is too short to be an ELF kernel")]
    Truncated,
    /// Reading the file failed.
    #[error("cannot read the kernel file")]
    Io(#[source] std::io::Error),
    /// The magic number is missing.
    #[error("the file is not an ELF image (no \\x7fELF magic); Ferry boots ELF kernels such as vmlinux")]
    NotElf,
    /// Not a 64-bit little-endian x86-64 executable.
    #[error("the ELF image is not a 64-bit little-endian x86-64 executable")]
    WrongKind,
    /// Program header table malformed.
    #[error("the ELF program header table is malformed")]
    BadProgramHeaders,
    /// Nothing to load.
    #[error("the ELF image has no loadable segment")]
    NoLoadableSegment,
}

/// What the headers say about a kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelHeaders {
    /// Physical ranges of the loadable segments.
    pub segments: Vec<Segment>,
    /// The PVH entry point from the Xen note, if any.
    pub pvh_entry: Option<u32>,
}

/// One loadable segment's physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First physical address.
    pub start: u64,
    /// First physical address after the segment (`p_paddr + p_memsz`).
    pub end: u64,
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> Result<(), ElfError> {
    r.seek(SeekFrom::Start(offset)).map_err(ElfError::Io)?;
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ElfError::Truncated,
        _ => ElfError::Io(e),
    })
}

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

/// Finds the PVH entry note in a PT_NOTE segment's bytes.
fn find_pvh_note(notes: &[u8]) -> Option<u32> {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = u32_at(notes, at) as usize;
        let descsz = u32_at(notes, at + 4) as usize;
        let kind = u32_at(notes, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align4(namesz))?;
        let next = desc_at.checked_add(align4(descsz))?;
        if desc_at.checked_add(descsz)? > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes[name_at..name_at + namesz] == *b"Xen\0" && descsz >= 4 {
            return Some(u32_at(notes, desc_at));
        }
        at = next;
    }
    None
}

/// Checks the ELF header, and returns the physical ranges of the loadable segments and
/// the PVH entry point.
pub fn read_headers<R: Read + Seek>(r: &mut R) -> Result<KernelHeaders, ElfError> {
    r.seek(SeekFrom::Start(0)).map_err(ElfError::Io)?;
    let mut head = Vec::with_capacity(EHDR_SIZE);
    r.by_ref().take(EHDR_SIZE as u64).read_to_end(&mut head).map_err(ElfError::Io)?;
    if head.len() < 4 || head[..4] != *b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if head.len() < EHDR_SIZE {
        return Err(ElfError::Truncated);
    }
    let eh = head;
    // ELFCLASS64, ELFDATA2LSB, e_machine x86-64.
    if eh[4] != 2 || eh[5] != 1 || u16_at(&eh, 18) != EM_X86_64 {
        return Err(ElfError::WrongKind);
    }
    let phoff = u64_at(&eh, 32);
    let phentsize = u16_at(&eh, 54);
    let phnum = u16_at(&eh, 56);
    if usize::from(phentsize) != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS || phoff < EHDR_SIZE as u64 {
        return Err(ElfError::BadProgramHeaders);
    }
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    let mut ph = [0u8; PHDR_SIZE];
    for i in 0..u64::from(phnum) {
        read_at(r, phoff + i * PHDR_SIZE as u64, &mut ph)?;
        let kind = u32_at(&ph, 0);
        if kind == PT_NOTE && pvh_entry.is_none() {
            let offset = u64_at(&ph, 8);
            let size = u64_at(&ph, 32);
            if size > MAX_NOTE_SEGMENT {
                return Err(ElfError::BadProgramHeaders);
            }
            let mut notes = vec![0u8; size as usize];
            read_at(r, offset, &mut notes)?;
            pvh_entry = find_pvh_note(&notes);
            continue;
        }
        if kind != PT_LOAD {
            continue;
        }
        let paddr = u64_at(&ph, 24);
        let filesz = u64_at(&ph, 32);
        let memsz = u64_at(&ph, 40);
        if filesz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(ElfError::BadProgramHeaders);
        }
        let end = paddr.checked_add(memsz).ok_or(ElfError::BadProgramHeaders)?;
        segments.push(Segment { start: paddr, end });
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadableSegment);
    }
    Ok(KernelHeaders { segments, pvh_entry })
}
