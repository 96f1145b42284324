//! Files made to cost the inspector far more than their size, built byte by
//! byte: each is read in bounded time and memory and, where it claims more
//! than any program needs, refused for what it holds. Without the bounds of
//! `elf.rs` the first copies gigabytes, the third loops for minutes and the
//! fourth reads terabytes.

use object::elf;

use crate::report::Format;
use crate::verdict::tests::server;
use crate::{elf::MAX_NEEDED, inspect, judge};

/// One section of a hand-made ELF file.
struct Section {
    /// Offset of the name in the section name table.
    name: u32,
    kind: u32,
    data: Vec<u8>,
    link: u32,
    info: u32,
    entsize: u64,
}

impl Section {
    fn new(name: u32, kind: u32, data: Vec<u8>) -> Section {
        Section { name, kind, data, link: 0, info: 0, entsize: 0 }
    }
}

/// A little-endian x86-64 ELF executable of `sections` (numbered from 1),
/// whose section name table is section `names`.
fn elf64(sections: &[Section], names: u16) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    let mut offsets = Vec::new();
    for s in sections {
        out.resize(out.len().next_multiple_of(8), 0);
        offsets.push(out.len() as u64);
        out.extend_from_slice(&s.data);
    }
    out.resize(out.len().next_multiple_of(8), 0);
    let shoff = out.len() as u64;
    out.extend_from_slice(&[0u8; 64]);
    for (s, offset) in sections.iter().zip(offsets) {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(&s.name.to_le_bytes());
        h.extend_from_slice(&s.kind.to_le_bytes());
        h.extend_from_slice(&[0u8; 16]);
        h.extend_from_slice(&offset.to_le_bytes());
        h.extend_from_slice(&(s.data.len() as u64).to_le_bytes());
        h.extend_from_slice(&s.link.to_le_bytes());
        h.extend_from_slice(&s.info.to_le_bytes());
        h.extend_from_slice(&8u64.to_le_bytes());
        h.extend_from_slice(&s.entsize.to_le_bytes());
        out.extend_from_slice(&h);
    }
    let mut e = Vec::with_capacity(64);
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    e.extend_from_slice(&[0u8; 8]);
    e.extend_from_slice(&elf::ET_EXEC.to_le_bytes());
    e.extend_from_slice(&elf::EM_X86_64.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&0x40_1000u64.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&shoff.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 0, 64, sections.len() as u16 + 1, names] {
        e.extend_from_slice(&half.to_le_bytes());
    }
    out[..64].copy_from_slice(&e);
    out
}

/// The section name table for sections named `.dynstr` (offset 1) and a
/// second name at offset 9, and itself at 9 + that name's length + 1.
fn names(second: &str) -> (Vec<u8>, u32) {
    let mut t = b"\0.dynstr\0".to_vec();
    t.extend_from_slice(second.as_bytes());
    t.push(0);
    let own = t.len() as u32;
    t.extend_from_slice(b".shstrtab\0");
    (t, own)
}

/// A dynamic section of `n` entries of `tag` with value `value`, then its end.
fn dynamic(tag: u32, value: u64, n: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(16 * (n + 1));
    for _ in 0..n {
        d.extend_from_slice(&u64::from(tag).to_le_bytes());
        d.extend_from_slice(&value.to_le_bytes());
    }
    d.extend_from_slice(&[0u8; 16]);
    d
}

/// `.dynstr` holding `strings`, a `.dynamic` of `n` DT_NEEDED entries naming
/// the first, and the name table.
fn needing(strings: &[u8], n: usize) -> Vec<u8> {
    let (table, own) = names(".dynamic");
    let dynamic = Section { link: 1, entsize: 16, ..Section::new(9, elf::SHT_DYNAMIC, dynamic(elf::DT_NEEDED, 1, n)) };
    elf64(&[Section::new(1, elf::SHT_STRTAB, strings.to_vec()), dynamic, Section::new(own, elf::SHT_STRTAB, table)], 3)
}

#[test]
fn one_huge_library_name_needed_many_times_is_refused_not_copied() {
    let mut strings = vec![0u8];
    strings.extend(std::iter::repeat_n(b'A', 1 << 20));
    strings.push(0);
    // Copied once per entry, 2,000 entries would be 2 GiB.
    let report = inspect(&needing(&strings, 2_000));
    assert_eq!(report.format, Format::Elf);
    assert!(report.needed.is_empty(), "{} names kept", report.needed.len());
    assert_eq!(report.oversized.as_deref(), Some("names a needed library longer than 255 bytes"));
    let verdict = judge(&report, &server());
    assert!(!verdict.runs);
    assert!(
        verdict.message().starts_with("the file names a needed library longer than 255 bytes"),
        "{}",
        verdict.message()
    );
}

#[test]
fn more_libraries_than_any_program_needs_are_refused() {
    let report = inspect(&needing(b"\0libx.so.1\0", 5_000));
    assert_eq!(report.needed.len(), MAX_NEEDED);
    assert!(report.needed.iter().all(|n| n == "libx.so.1"));
    assert_eq!(report.oversized.as_deref(), Some("names more than 256 needed libraries"));
    assert!(!judge(&report, &server()).runs);
}

#[test]
fn version_needs_that_repeat_one_entry_are_walked_a_bounded_number_of_steps() {
    // 2,000 needs, each claiming 65,535 versions and all pointing at one
    // version whose `vna_next` is 0: `object` hands out that version again
    // and again, 131 million times in all.
    let needs = 2_000u32;
    let mut table = Vec::new();
    for i in 0..needs {
        let aux = 16 * (needs - i);
        let next = if i + 1 < needs { 16 } else { 0 };
        table.extend_from_slice(&1u16.to_le_bytes());
        table.extend_from_slice(&u16::MAX.to_le_bytes());
        for word in [0u32, aux, next] {
            table.extend_from_slice(&word.to_le_bytes());
        }
    }
    for word in [0u32, 2 << 16, 1, 0] {
        table.extend_from_slice(&word.to_le_bytes());
    }
    let (names, own) = names(".gnu.version_r");
    let verneed = Section { link: 1, info: 1, ..Section::new(9, elf::SHT_GNU_VERNEED, table) };
    let file = elf64(
        &[
            Section::new(1, elf::SHT_STRTAB, b"\0GLIBC_2.2.5\0".to_vec()),
            verneed,
            Section::new(own, elf::SHT_STRTAB, names),
        ],
        3,
    );
    let report = inspect(&file);
    assert_eq!(report.oversized.as_deref(), Some("has more than 16384 symbol version entries"));
    assert_eq!(report.glibc_required.as_deref(), Some("2.2.5"));
    assert!(!judge(&report, &server()).runs);
}

#[test]
fn section_names_without_an_end_are_compared_not_read_to_the_end() {
    // 20,000 sections all named at offset 1 of a 4 MiB name table with no
    // terminator: each lookup by name in `object` reads the table to its
    // end for every section, 80 GB per name looked up.
    let mut table = vec![0u8];
    table.extend(std::iter::repeat_n(b'x', 4 << 20));
    let mut sections: Vec<Section> = (0..20_000).map(|_| Section::new(1, elf::SHT_PROGBITS, Vec::new())).collect();
    sections.push(Section::new(1, elf::SHT_STRTAB, table));
    let file = elf64(&sections, sections.len() as u16);
    let report = inspect(&file);
    assert_eq!(report.format, Format::Elf);
    assert_eq!(report.arch.as_deref(), Some("amd64"));
    assert_eq!(report.compiler, None);
    assert_eq!(report.oversized, None);
}

#[test]
fn a_compiler_note_of_a_million_lines_yields_one_short_line() {
    let mut comment = b"x\0".repeat(1_000_000);
    comment.extend_from_slice(b"GCC: ");
    comment.extend(std::iter::repeat_n(b'y', 10_000));
    let line = crate::elf::compiler_from_comment(&comment).expect("the GCC line is found");
    assert!(line.starts_with("GCC: yyy") && line.len() == 256, "{} bytes", line.len());
}

#[test]
fn a_fat_mach_o_claiming_many_architectures_names_a_few() {
    let arches = 100_000u32;
    let mut file = vec![0xca, 0xfe, 0xba, 0xbe];
    file.extend_from_slice(&arches.to_be_bytes());
    for _ in 0..arches {
        for word in [0x0100_0007u32, 3, 0, 0, 0] {
            file.extend_from_slice(&word.to_be_bytes());
        }
    }
    let report = inspect(&file);
    assert_eq!(report.format, Format::FatMachO);
    assert_eq!(report.fat_arches.len(), 16);
    assert!(report.fat_arches.iter().all(|a| a == "amd64"), "{:?}", report.fat_arches);
}
