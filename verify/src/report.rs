//! What the inspector found in a file: every fact `nx verify` prints.

use serde::{Deserialize, Serialize};

/// The container format of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Elf,
    MachO,
    /// A universal (fat) Mach-O holding several architectures.
    FatMachO,
    Pe,
    /// A text file starting with `#!`.
    Script,
    Zip,
    Empty,
    Unknown,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Elf => "ELF",
            Format::MachO => "Mach-O",
            Format::FatMachO => "fat Mach-O",
            Format::Pe => "PE (Windows)",
            Format::Script => "script",
            Format::Zip => "zip archive",
            Format::Empty => "empty file",
            Format::Unknown => "unknown",
        }
    }
}

/// The kind of ELF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ElfKind {
    Executable,
    /// Position-independent executable (or shared object; see `interpreter`).
    Pie,
    SharedLibrary,
    Relocatable,
    Core,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Linkage {
    Static,
    Dynamic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Libc {
    Glibc,
    Musl,
    /// No C library at all (Go without cgo, `-nostdlib`).
    None,
    Unknown,
}

/// The toolchain that built the file, as far as it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Toolchain {
    Go,
    Rust,
    Zig,
    C,
    Unknown,
}

/// The build information Go embeds in every binary (`go version -m`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoBuildInfo {
    pub go_version: String,
    /// The main package path (`path` line).
    pub path: Option<String>,
    /// The main module path (`mod` line).
    pub main_module: Option<String>,
    pub goos: Option<String>,
    pub goarch: Option<String>,
    pub cgo_enabled: Option<bool>,
}

/// A dependency recorded by cargo-auditable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RustDependency {
    pub name: String,
    pub version: String,
}

/// Everything known about a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub format: Format,
    pub size: u64,
    /// `linux`, `darwin`, `windows`, `freebsd`, ...
    pub os: Option<String>,
    /// ELF OS/ABI byte as a name (`sysv`, `linux`, `freebsd`).
    pub os_abi: Option<String>,
    /// Go/Docker spelling: `amd64`, `arm64`, `386`, `arm`, `riscv64`.
    pub arch: Option<String>,
    /// Every architecture of a fat Mach-O.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fat_arches: Vec<String>,
    pub bits: Option<u8>,
    /// `little` or `big`.
    pub endian: Option<String>,
    pub elf_kind: Option<ElfKind>,
    pub linkage: Option<Linkage>,
    pub interpreter: Option<String>,
    /// Shared libraries it needs (`DT_NEEDED`).
    pub needed: Vec<String>,
    /// Highest `GLIBC_x.y` symbol version it requires, `2.34`.
    pub glibc_required: Option<String>,
    /// The C library it was built against.
    pub libc: Option<Libc>,
    pub stripped: Option<bool>,
    pub toolchain: Toolchain,
    /// `rustc 1.95.0`, `GCC 12.2.0`, from `.comment` when present.
    pub compiler: Option<String>,
    pub go: Option<GoBuildInfo>,
    /// Dependencies embedded by cargo-auditable.
    pub rust_dependencies: Option<Vec<RustDependency>>,
    /// The `#!` line of a script.
    pub shebang: Option<String>,
    /// Problems parsing the file (truncated, corrupt); the report is partial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parse_errors: Vec<String>,
    /// What the file holds more of than any program needs, where reading
    /// stopped ("names more than 256 needed libraries"); such a file is
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oversized: Option<String>,
}

impl Report {
    pub(crate) fn empty(format: Format, size: u64) -> Report {
        Report {
            format,
            size,
            os: None,
            os_abi: None,
            arch: None,
            fat_arches: Vec::new(),
            bits: None,
            endian: None,
            elf_kind: None,
            linkage: None,
            interpreter: None,
            needed: Vec::new(),
            glibc_required: None,
            libc: None,
            stripped: None,
            toolchain: Toolchain::Unknown,
            compiler: None,
            go: None,
            rust_dependencies: None,
            shebang: None,
            parse_errors: Vec::new(),
            oversized: None,
        }
    }
}

/// Compares dotted versions numerically: `2.9 < 2.34`.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |s: &str| s.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    parse(a).cmp(&parse(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("2.9", "2.34"), Ordering::Less);
        assert_eq!(compare_versions("2.36", "2.36"), Ordering::Equal);
        assert_eq!(compare_versions("2.38", "2.36"), Ordering::Greater);
        assert_eq!(compare_versions("2.2.5", "2.3"), Ordering::Less);
    }
}
