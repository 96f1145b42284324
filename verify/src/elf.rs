//! ELF details: kind, architecture, loader, needed libraries, the glibc symbol
//! versions required, and the compiler notes. Generic over 32 and 64 bits.
//!
//! Every file is hostile (the receiver inspects each upload), so what a file
//! costs to read follows from its size, never from what its tables claim:
//! the names copied out of it are bounded in number and length, the
//! version tables are walked a bounded number of steps (their entries chain
//! by offsets, and an offset of 0 makes `object`'s iterators repeat one
//! entry), and sections are found by comparing their names in place, since
//! looking a name up in a string table with no terminator reads to its end
//! once per section. A file beyond a bound is reported as such
//! ([`Report::oversized`]) and refused: no program needs that much.

use object::elf;
use object::read::elf::{Dyn, ElfFile, FileHeader, ProgramHeader, SectionHeader};
use object::{Object, ReadRef};

use crate::report::{compare_versions, ElfKind, Libc, Linkage, Report};

/// The most libraries a report names: real programs need a few dozen.
pub const MAX_NEEDED: usize = 256;
/// The longest library name kept: a file name's longest (`NAME_MAX`).
pub const MAX_LIBRARY_NAME: usize = 255;
/// The longest loader path kept (`PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// The most symbol version entries read, needs and their versions together:
/// a program linked against many libraries has a few hundred.
pub const MAX_VERSION_ENTRIES: usize = 16_384;
/// The longest compiler line kept from `.comment`.
const MAX_COMPILER_LINE: usize = 256;

/// `bytes` as text when it is at most `max` bytes long.
fn bounded(bytes: &[u8], max: usize) -> Option<String> {
    (bytes.len() <= max).then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// The bytes of the section named `name`, found without reading any other
/// section's name further than `name`'s length (see the top of this file).
pub fn section_data<'data, Elf: FileHeader, R: ReadRef<'data>>(
    file: &ElfFile<'data, Elf, R>,
    data: R,
    name: &str,
) -> Option<&'data [u8]> {
    let endian = file.endian();
    let sections = file.elf_section_table();
    let index = file.elf_header().shstrndx(endian, data).ok()?;
    let names = sections.section(object::SectionIndex(index as usize)).ok()?.data(endian, data).ok()?;
    sections.iter().find_map(|s| {
        let at = s.sh_name(endian) as usize;
        let here = names.get(at..at.checked_add(name.len() + 1)?)?;
        (here.strip_suffix(b"\0")? == name.as_bytes()).then(|| s.data(endian, data).ok()).flatten()
    })
}

/// Name of an `e_machine` value in Go/Docker spelling.
pub fn machine_name(machine: u16) -> String {
    match machine {
        elf::EM_X86_64 => "amd64".into(),
        elf::EM_AARCH64 => "arm64".into(),
        elf::EM_386 => "386".into(),
        elf::EM_ARM => "arm".into(),
        elf::EM_RISCV => "riscv64".into(),
        elf::EM_PPC64 => "ppc64".into(),
        elf::EM_S390 => "s390x".into(),
        elf::EM_MIPS => "mips".into(),
        elf::EM_LOONGARCH => "loong64".into(),
        other => format!("machine-{other}"),
    }
}

fn os_abi_name(abi: u8) -> String {
    match abi {
        elf::ELFOSABI_SYSV => "sysv".into(),
        elf::ELFOSABI_GNU => "linux".into(),
        elf::ELFOSABI_NETBSD => "netbsd".into(),
        elf::ELFOSABI_SOLARIS => "solaris".into(),
        elf::ELFOSABI_FREEBSD => "freebsd".into(),
        elf::ELFOSABI_OPENBSD => "openbsd".into(),
        other => format!("abi-{other}"),
    }
}

/// Fills `report` from an ELF file. Errors in optional parts are recorded in
/// `parse_errors` and the rest is still read.
pub fn inspect<'data, Elf: FileHeader, R: ReadRef<'data>>(file: &ElfFile<'data, Elf, R>, data: R, report: &mut Report) {
    let header = file.elf_header();
    let endian = file.endian();
    let ident = header.e_ident();
    report.bits = Some(if header.is_type_64() { 64 } else { 32 });
    report.endian = Some(if header.is_big_endian() { "big" } else { "little" }.into());
    let abi = os_abi_name(ident.os_abi);
    report.os = Some(match abi.as_str() {
        "sysv" | "linux" => "linux".to_owned(),
        other => other.to_owned(),
    });
    report.os_abi = Some(abi);
    report.arch = Some(machine_name(header.e_machine(endian)));

    for ph in file.elf_program_headers() {
        if ph.p_type(endian) == elf::PT_INTERP {
            match ph.data(endian, data) {
                Ok(bytes) => match bounded(bytes, MAX_PATH) {
                    Some(path) => report.interpreter = Some(path.trim_end_matches('\0').to_owned()),
                    None => {
                        report.oversized.get_or_insert(format!("names a loader path longer than {MAX_PATH} bytes"));
                    }
                },
                Err(_) => report.parse_errors.push("PT_INTERP points outside the file".into()),
            }
        }
    }
    report.elf_kind = Some(match header.e_type(endian) {
        elf::ET_EXEC => ElfKind::Executable,
        elf::ET_DYN if report.interpreter.is_some() => ElfKind::Pie,
        // A static PIE has no loader but an entry point; a library usually has none.
        elf::ET_DYN
            if file.entry() != 0 && section_data(file, data, ".interp").is_none() && has_no_soname(file, data) =>
        {
            ElfKind::Pie
        }
        elf::ET_DYN => ElfKind::SharedLibrary,
        elf::ET_REL => ElfKind::Relocatable,
        elf::ET_CORE => ElfKind::Core,
        _ => ElfKind::Other,
    });
    report.linkage = Some(if report.interpreter.is_some() { Linkage::Dynamic } else { Linkage::Static });

    let sections = file.elf_section_table();
    match sections.dynamic(endian, data) {
        Ok(Some((entries, link))) => {
            let strings = sections.strings(endian, data, link).ok();
            for d in entries.iter().filter(|d| d.d_tag(endian).into() == u64::from(elf::DT_NEEDED)) {
                if report.needed.len() == MAX_NEEDED {
                    report.oversized.get_or_insert(format!("names more than {MAX_NEEDED} needed libraries"));
                    break;
                }
                let Some(name) = strings.and_then(|s| s.get(d.d_val(endian).into() as u32).ok()) else { continue };
                let Some(name) = bounded(name, MAX_LIBRARY_NAME) else {
                    report
                        .oversized
                        .get_or_insert(format!("names a needed library longer than {MAX_LIBRARY_NAME} bytes"));
                    break;
                };
                report.needed.push(name);
            }
        }
        Ok(None) => {}
        Err(e) => report.parse_errors.push(format!("dynamic section: {e}")),
    }

    match sections.gnu_verneed(endian, data) {
        Ok(Some((mut needs, link))) => {
            let strings = sections.strings(endian, data, link).ok();
            let mut highest: Option<String> = None;
            let mut steps = 0;
            'needs: while let Ok(Some((_need, mut aux))) = needs.next() {
                loop {
                    steps += 1;
                    if steps > MAX_VERSION_ENTRIES {
                        report
                            .oversized
                            .get_or_insert(format!("has more than {MAX_VERSION_ENTRIES} symbol version entries"));
                        break 'needs;
                    }
                    let Ok(Some(a)) = aux.next() else { break };
                    let Some(name) = strings.and_then(|s| a.name(endian, s).ok()) else { continue };
                    let Some(v) = name.strip_prefix(b"GLIBC_") else { continue };
                    let Some(v) = bounded(v, MAX_LIBRARY_NAME) else { continue };
                    if v.starts_with(|c: char| c.is_ascii_digit())
                        && highest.as_deref().is_none_or(|h| compare_versions(&v, h).is_gt())
                    {
                        highest = Some(v);
                    }
                }
            }
            report.glibc_required = highest;
        }
        Ok(None) => {}
        Err(e) => report.parse_errors.push(format!("version needs: {e}")),
    }

    report.stripped = Some(!sections.iter().any(|s| s.sh_type(endian) == elf::SHT_SYMTAB));
    if let Some(comment) = section_data(file, data, ".comment") {
        report.compiler = compiler_from_comment(comment);
    }
    report.libc = Some(match report.interpreter.as_deref() {
        Some(i) if i.contains("ld-musl") => Libc::Musl,
        Some(i) if i.contains("ld-linux") => Libc::Glibc,
        Some(_) => Libc::Unknown,
        None if report.glibc_required.is_some() => Libc::Glibc,
        None => Libc::Unknown,
    });
}

/// Where Go's build information is in an ELF file without a
/// `.go.buildinfo` section (one whose section table was stripped): in its
/// first loaded segment that is writable and not executable, which Go's
/// linker starts with it and where Go's own tools (`debug/buildinfo`, `go
/// version`) look. Go 1.19's search only the first 64 KiB; this takes the
/// whole segment's bytes in the file, so an externally linked program
/// whose linker put other sections first is still found. `None` when there
/// is no such segment.
pub fn go_build_info_region<'data, Elf: FileHeader, R: ReadRef<'data>>(
    file: &ElfFile<'data, Elf, R>,
    data: R,
) -> Option<&'data [u8]> {
    let endian = file.endian();
    let writable = file
        .elf_program_headers()
        .iter()
        .find(|ph| ph.p_type(endian) == elf::PT_LOAD && ph.p_flags(endian) & (elf::PF_X | elf::PF_W) == elf::PF_W)?;
    writable.data(endian, data).ok()
}

/// The highest `GLIBC_x.y` version a C library defines (its `SHT_GNU_VERDEF`):
/// the newest symbol version binaries may require from it.
pub fn highest_glibc_defined(data: &[u8]) -> Option<String> {
    let file = ElfFile::<object::elf::FileHeader64<object::Endianness>>::parse(data).ok()?;
    let endian = file.endian();
    let sections = file.elf_section_table();
    let (mut defs, link) = sections.gnu_verdef(endian, data).ok()??;
    let strings = sections.strings(endian, data, link).ok()?;
    let mut highest: Option<String> = None;
    while let Ok(Some((_def, mut aux))) = defs.next() {
        while let Ok(Some(a)) = aux.next() {
            let Ok(name) = a.name(endian, strings) else { continue };
            let name = String::from_utf8_lossy(name);
            if let Some(v) = name.strip_prefix("GLIBC_") {
                if v.starts_with(|c: char| c.is_ascii_digit())
                    && highest.as_deref().is_none_or(|h| compare_versions(v, h).is_gt())
                {
                    highest = Some(v.to_owned());
                }
            }
        }
    }
    highest
}

fn has_no_soname<'data, Elf: FileHeader, R: ReadRef<'data>>(file: &ElfFile<'data, Elf, R>, data: R) -> bool {
    let endian = file.endian();
    match file.elf_section_table().dynamic(endian, data) {
        Ok(Some((entries, _))) => !entries.iter().any(|d| d.d_tag(endian).into() == u64::from(elf::DT_SONAME)),
        _ => true,
    }
}

/// The most telling compiler line of a `.comment` section: rustc first (Rust
/// binaries also carry the linker's GCC line), then GCC or clang.
/// The section is read in place, once per kind of line, and the line kept is
/// cut at 256 bytes: a section of millions of lines costs no copy of them.
pub fn compiler_from_comment(comment: &[u8]) -> Option<String> {
    let pick = |needle: &str| comment.split(|b| *b == 0).find(|l| memchr::memmem::find(l, needle.as_bytes()).is_some());
    let line =
        pick("rustc version").or_else(|| pick("Zig")).or_else(|| pick("GCC:")).or_else(|| pick("clang version"))?;
    Some(String::from_utf8_lossy(&line[..line.len().min(MAX_COMPILER_LINE)]).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiler_lines_prefer_rustc() {
        let c = b"GCC: (Debian 12.2.0-14) 12.2.0\0rustc version 1.95.0 (59807616e 2026-04-14)\0";
        assert_eq!(compiler_from_comment(c).unwrap(), "rustc version 1.95.0 (59807616e 2026-04-14)");
        assert_eq!(
            compiler_from_comment(b"GCC: (Debian 12.2.0-14) 12.2.0\0").unwrap(),
            "GCC: (Debian 12.2.0-14) 12.2.0"
        );
        assert_eq!(compiler_from_comment(b"\0\0"), None);
    }

    #[test]
    fn machines_use_go_names() {
        assert_eq!(machine_name(elf::EM_X86_64), "amd64");
        assert_eq!(machine_name(elf::EM_AARCH64), "arm64");
        assert_eq!(machine_name(9999), "machine-9999");
    }
}
