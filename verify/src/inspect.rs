//! The entry point: bytes in, [`Report`] out. Never panics, whatever the bytes.

use object::read::elf::ElfFile;
use object::read::macho::{FatArch, MachOFatFile32, MachOFatFile64};
use object::{Architecture, FileKind, Object, ObjectSection};

use crate::report::{Format, Libc, Linkage, Report, Toolchain};
use crate::{auditable, elf, gobuild};

/// The most architectures of a fat Mach-O a report names.
const MAX_FAT_ARCHES: usize = 16;

/// Inspects a whole file.
pub fn inspect(data: &[u8]) -> Report {
    let size = data.len() as u64;
    if data.is_empty() {
        return Report::empty(Format::Empty, 0);
    }
    if data.starts_with(b"#!") {
        let mut r = Report::empty(Format::Script, size);
        let line = data.split(|b| *b == b'\n').next().unwrap_or_default();
        r.shebang = Some(String::from_utf8_lossy(line).trim().to_owned());
        return r;
    }
    if data.starts_with(b"PK\x03\x04") || data.starts_with(b"PK\x05\x06") {
        return Report::empty(Format::Zip, size);
    }
    let (mut report, searched) = match FileKind::parse(data) {
        Ok(FileKind::Elf32) => elf_file::<object::elf::FileHeader32<object::Endianness>>(data, size),
        Ok(FileKind::Elf64) => elf_file::<object::elf::FileHeader64<object::Endianness>>(data, size),
        Ok(FileKind::MachO32 | FileKind::MachO64) => {
            (generic(data, Format::MachO, "darwin", true), Searched::whole(data))
        }
        Ok(FileKind::MachOFat32) => (
            fat(MachOFatFile32::parse(data).map(|f| f.arches().iter().map(|a| a.architecture()).collect()), size),
            Searched::whole(data),
        ),
        Ok(FileKind::MachOFat64) => (
            fat(MachOFatFile64::parse(data).map(|f| f.arches().iter().map(|a| a.architecture()).collect()), size),
            Searched::whole(data),
        ),
        // A PE file's sections are not looked up by name: a long name is an
        // offset into a string table, read to its terminator (see elf.rs).
        Ok(FileKind::Pe32 | FileKind::Pe64) => (generic(data, Format::Pe, "windows", false), Searched::whole(data)),
        _ => (Report::empty(Format::Unknown, size), Searched::whole(data)),
    };
    if report.go.is_none() && report.format != Format::Unknown {
        match searched.go_build_info.and_then(gobuild::find) {
            Some(Ok(info)) => report.go = Some(info),
            Some(Err(e)) => report.parse_errors.push(e),
            None => {}
        }
    }
    report.toolchain = toolchain(&report, searched.strings);
    if report.toolchain == Toolchain::Go && report.linkage == Some(Linkage::Static) {
        report.libc = Some(Libc::None);
    }
    if let Some(go) = &report.go {
        if let Some(os) = &go.goos {
            report.os = Some(os.clone());
        }
    }
    report
}

/// The bytes searched when a file's sections do not say what is looked for.
struct Searched<'d> {
    /// Where Go's build information may be (`None`: nowhere).
    go_build_info: Option<&'d [u8]>,
    /// Where a Rust program keeps the paths of its standard library's
    /// sources, which its panic messages carry.
    strings: &'d [u8],
}

impl<'d> Searched<'d> {
    fn whole(data: &'d [u8]) -> Searched<'d> {
        Searched { go_build_info: Some(data), strings: data }
    }
}

/// An ELF file's report, and where its bytes are searched: the build
/// information in the segment Go's linker puts it in
/// ([`elf::go_build_info_region`]) and Rust's paths in `.rodata` (the whole
/// file when it has none), rather than the whole file, which took about 5
/// ms for each of the two searches in a 20 MB binary, on the push's path
/// twice (`nx` checks a binary before its upload, the receiver after). What
/// they find shapes the report and a refusal's remedy, and for a Go program
/// the operating system its build information names.
fn elf_file<'d, Elf: object::read::elf::FileHeader<Endian = object::Endianness>>(
    data: &'d [u8],
    size: u64,
) -> (Report, Searched<'d>) {
    match ElfFile::<Elf>::parse(data) {
        Ok(f) => {
            let mut r = Report::empty(Format::Elf, size);
            elf::inspect(&f, data, &mut r);
            sections(|name| elf::section_data(&f, data, name), &mut r);
            let strings = elf::section_data(&f, data, ".rodata").unwrap_or(data);
            (r, Searched { go_build_info: elf::go_build_info_region(&f, data), strings })
        }
        Err(e) => (damaged(Format::Elf, size, e), Searched::whole(data)),
    }
}

fn damaged(format: Format, size: u64, e: object::Error) -> Report {
    let mut r = Report::empty(format, size);
    r.parse_errors.push(format!("{} header does not parse: {e}", format.describe()));
    r
}

/// Facts every object format offers through `object::File`; its sections
/// are read when `by_name` (fixed-size names, found without a string table).
fn generic(data: &[u8], format: Format, os: &str, by_name: bool) -> Report {
    let mut r = Report::empty(format, data.len() as u64);
    r.os = Some(os.to_owned());
    match object::File::parse(data) {
        Ok(f) => {
            r.arch = Some(arch_name(f.architecture()));
            r.bits = Some(if f.is_64() { 64 } else { 32 });
            r.endian = Some(if f.is_little_endian() { "little" } else { "big" }.into());
            if by_name {
                sections(|name| f.section_by_name(name).and_then(|s| s.data().ok()), &mut r);
            }
        }
        Err(e) => r.parse_errors.push(format!("{} does not parse: {e}", format.describe())),
    }
    r
}

fn fat(arches: object::Result<Vec<Architecture>>, size: u64) -> Report {
    let mut r = Report::empty(Format::FatMachO, size);
    r.os = Some("darwin".into());
    match arches {
        // The count is the file's to claim: a few are named, as a refusal
        // names them.
        Ok(a) => r.fat_arches = a.into_iter().take(MAX_FAT_ARCHES).map(arch_name).collect(),
        Err(e) => r.parse_errors.push(format!("fat Mach-O does not parse: {e}")),
    }
    r
}

/// Reads the sections every format may carry, found by `section`: Go build
/// info and cargo-auditable.
fn sections<'d>(section: impl Fn(&str) -> Option<&'d [u8]>, r: &mut Report) {
    for name in [".go.buildinfo", "__go_buildinfo"] {
        if let Some(data) = section(name) {
            match gobuild::parse(data) {
                Ok(info) => r.go = Some(info),
                Err(e) => r.parse_errors.push(e),
            }
        }
    }
    if let Some(data) = section(auditable::SECTION) {
        match auditable::decode(data) {
            Ok(deps) => r.rust_dependencies = Some(deps),
            Err(e) => r.parse_errors.push(e),
        }
    }
}

/// Go/Docker spelling of an architecture.
pub fn arch_name(a: Architecture) -> String {
    match a {
        Architecture::X86_64 => "amd64".into(),
        Architecture::Aarch64 => "arm64".into(),
        Architecture::I386 => "386".into(),
        Architecture::Arm => "arm".into(),
        Architecture::Riscv64 => "riscv64".into(),
        Architecture::PowerPc64 => "ppc64".into(),
        Architecture::S390x => "s390x".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

fn toolchain(r: &Report, strings: &[u8]) -> Toolchain {
    if r.go.is_some() {
        return Toolchain::Go;
    }
    let compiler = r.compiler.as_deref().unwrap_or_default();
    if r.rust_dependencies.is_some() || compiler.contains("rustc") || contains(strings, b"/rustc/") {
        return Toolchain::Rust;
    }
    if compiler.contains("Zig") {
        return Toolchain::Zig;
    }
    if compiler.contains("GCC") || compiler.contains("clang") {
        return Toolchain::C;
    }
    Toolchain::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_inputs_get_a_format() {
        assert_eq!(inspect(b"").format, Format::Empty);
        let s = inspect(b"#!/bin/sh\necho hi\n");
        assert_eq!(s.format, Format::Script);
        assert_eq!(s.shebang.as_deref(), Some("#!/bin/sh"));
        assert_eq!(inspect(b"PK\x03\x04rest").format, Format::Zip);
        assert_eq!(inspect(b"random bytes here").format, Format::Unknown);
    }

    #[test]
    fn this_test_binary_is_a_linux_elf_for_this_machine() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let r = inspect(&exe);
        assert_eq!(r.format, Format::Elf);
        assert_eq!(r.os.as_deref(), Some("linux"));
        let expected = if cfg!(target_arch = "x86_64") { "amd64" } else { "arm64" };
        assert_eq!(r.arch.as_deref(), Some(expected));
        assert_eq!(r.toolchain, Toolchain::Rust);
        assert_eq!(r.linkage, Some(Linkage::Dynamic));
        assert!(r.needed.iter().any(|n| n.starts_with("libc.so")), "{:?}", r.needed);
        assert!(r.glibc_required.is_some());
        assert_eq!(r.libc, Some(Libc::Glibc));
    }

    #[test]
    fn every_truncation_of_a_real_binary_is_survived() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Step through the header region byte by byte, then coarser.
        let mut len = 0;
        while len < exe.len() {
            let _ = inspect(&exe[..len]);
            len += if len < 4096 { 1 } else { exe.len() / 97 };
        }
    }
}
