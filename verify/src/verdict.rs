//! The verdict: will this file run on that server, and if not, exactly what to
//! do about it, in the words of the toolchain that built it.

use nx_protocol::target::ServerTarget;
use serde::{Deserialize, Serialize};

use crate::report::{compare_versions, ElfKind, Format, Linkage, Report, Toolchain};

/// One reason the file will not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// What is wrong, in one sentence.
    pub problem: String,
    /// What to do, as a command where there is one.
    pub remedy: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.problem, self.remedy)
    }
}

/// The outcome of [`judge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub runs: bool,
    pub problems: Vec<Problem>,
}

impl Verdict {
    /// All problems as one message, for errors and annotations.
    pub fn message(&self) -> String {
        self.problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    }
}

fn rust_triple(arch: &str) -> &'static str {
    if arch == "arm64" {
        "aarch64-unknown-linux-musl"
    } else {
        "x86_64-unknown-linux-musl"
    }
}

fn zig_arch(arch: &str) -> &'static str {
    if arch == "arm64" {
        "aarch64"
    } else {
        "x86_64"
    }
}

/// How to build a static Linux binary for `arch` with the toolchain that built
/// the file.
fn build_for_linux(report: &Report, arch: &str) -> String {
    match report.toolchain {
        Toolchain::Go => format!("build with GOOS=linux GOARCH={arch} CGO_ENABLED=0 go build"),
        Toolchain::Rust => {
            let t = rust_triple(arch);
            format!("build with `rustup target add {t}` and `cargo build --release --target {t}` (from macOS, `cargo zigbuild --target {t}`)")
        }
        Toolchain::Zig => format!("build with `zig build -Dtarget={}-linux-musl`", zig_arch(arch)),
        Toolchain::C => format!("compile it for Linux {arch} and link it statically, for example `musl-gcc -static -O2 -o app app.c` on a Linux {arch} machine"),
        Toolchain::Unknown => format!("build a Linux {arch} executable, preferably statically linked (`nx build` does it for Go, Rust, Zig and Bun projects)"),
    }
}

/// How to get rid of a dependency on the host's C library.
fn build_static(report: &Report, arch: &str, server_glibc: Option<&str>) -> String {
    let older = server_glibc
        .map(|v| format!(", or build on a system whose glibc is {v} or older (Debian 12 has 2.36)"))
        .unwrap_or_default();
    match report.toolchain {
        Toolchain::Go if report.go.as_ref().and_then(|g| g.cgo_enabled) == Some(true) => {
            format!("build with CGO_ENABLED=0 if the program can do without cgo{older}")
        }
        Toolchain::Go => format!("build with CGO_ENABLED=0{older}"),
        Toolchain::Rust => {
            let t = rust_triple(arch);
            format!("build a static binary with `cargo build --release --target {t}`{older}")
        }
        Toolchain::Zig => format!("build with `-Dtarget={}-linux-musl`{older}", zig_arch(arch)),
        Toolchain::C => format!("link statically with `musl-gcc -static`{older}"),
        Toolchain::Unknown => format!("link it statically{older}"),
    }
}

/// The first few of `names`, and how many more: a refusal's message is
/// stored and shown, and a file may name hundreds.
fn listed(names: &[&str]) -> String {
    const SHOWN: usize = 8;
    match names.len().checked_sub(SHOWN) {
        Some(more) if more > 0 => format!("{} and {more} more", names[..SHOWN].join(", ")),
        _ => names.join(", "),
    }
}

/// Judges `report` against `target`.
pub fn judge(report: &Report, target: &ServerTarget) -> Verdict {
    let arch = target.arch.as_str();
    let mut problems = Vec::new();
    let mut add = |problem: String, remedy: String| problems.push(Problem { problem, remedy });
    let made_for = |r: &Report| {
        r.arch.clone().or_else(|| r.fat_arches.first().cloned()).unwrap_or_else(|| "an unknown architecture".into())
    };
    match report.format {
        Format::Empty => {
            add("the file is empty".into(), "push the built binary; check the output path of your build".into())
        }
        Format::Zip => add("the file is a zip archive".into(), "unpack it and push the executable inside".into()),
        Format::Unknown => add(
            "the file is not an executable the server knows (ELF expected)".into(),
            "push the compiled binary, not a source file or archive".into(),
        ),
        Format::Script => {
            let shebang = report.shebang.as_deref().unwrap_or("#!");
            add(
                format!("the file is a script ({shebang}) and sandboxes have no interpreter"),
                "compile your program to a binary and push that".into(),
            )
        }
        Format::Pe => {
            add(format!("the file is a Windows program (PE, {})", made_for(report)), build_for_linux(report, arch))
        }
        Format::MachO | Format::FatMachO => {
            let arches = if report.fat_arches.is_empty() { made_for(report) } else { report.fat_arches.join(", ") };
            add(format!("the file is a macOS program (Mach-O, {arches})"), build_for_linux(report, arch))
        }
        Format::Elf => judge_elf(report, target, &mut add),
    }
    Verdict { runs: problems.is_empty(), problems }
}

fn judge_elf(report: &Report, target: &ServerTarget, add: &mut impl FnMut(String, String)) {
    let arch = target.arch.as_str();
    let Some(file_arch) = report.arch.as_deref() else {
        add(
            format!("the ELF file is damaged or truncated ({})", report.parse_errors.join("; ")),
            "rebuild it and push again; check that the upload or download of the build output completed".into(),
        );
        return;
    };
    if let Some(what) = &report.oversized {
        add(
            format!("the file {what}, more than any program needs, so it was not read further"),
            "push the program's own binary as your build writes it".into(),
        );
        return;
    }
    let os = report.os.as_deref().unwrap_or("linux");
    if os != "linux" {
        add(format!("the file is built for {os}, not Linux"), build_for_linux(report, arch));
        return;
    }
    match report.elf_kind {
        Some(ElfKind::Relocatable) => add(
            "the file is an object file (.o), not an executable".into(),
            "link it into a program and push that".into(),
        ),
        Some(ElfKind::SharedLibrary) => {
            add("the file is a shared library, not an executable".into(), "push the program that uses it".into())
        }
        Some(ElfKind::Core) => add("the file is a core dump".into(), "push the program, not its crash dump".into()),
        _ => {}
    }
    if file_arch != arch {
        add(format!("the file is built for {file_arch} but the server runs {arch}"), build_for_linux(report, arch));
        return;
    }
    if report.linkage != Some(Linkage::Dynamic) {
        return;
    }
    if let Some(interp) = &report.interpreter {
        if !target.interpreters.is_empty() && !target.interpreters.contains(interp) {
            add(
                format!("the file needs the loader {interp}, which the server does not have"),
                build_static(report, arch, target.glibc.as_deref()),
            );
        }
    }
    if !target.libraries.is_empty() {
        let missing: Vec<&str> =
            report.needed.iter().filter(|n| !target.libraries.contains(n)).map(String::as_str).collect();
        if !missing.is_empty() {
            add(
                format!("the file needs {}, which the server does not have", listed(&missing)),
                build_static(report, arch, None),
            );
        }
    }
    if let (Some(need), Some(have)) = (&report.glibc_required, &target.glibc) {
        if compare_versions(need, have).is_gt() {
            add(
                format!("the file needs GLIBC_{need} but the server has glibc {have}"),
                build_static(report, arch, Some(have)),
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::{GoBuildInfo, Libc};

    /// A Debian 12 amd64 server.
    pub(crate) fn server() -> ServerTarget {
        ServerTarget {
            os: "linux".into(),
            arch: "amd64".into(),
            glibc: Some("2.36".into()),
            interpreters: vec!["/lib64/ld-linux-x86-64.so.2".into()],
            libraries: vec!["libc.so.6".into(), "libm.so.6".into()],
            digest_in_footer: false,
        }
    }

    fn elf(arch: &str) -> Report {
        let mut r = Report::empty(Format::Elf, 100);
        r.os = Some("linux".into());
        r.arch = Some(arch.into());
        r.elf_kind = Some(ElfKind::Executable);
        r.linkage = Some(Linkage::Static);
        r
    }

    #[test]
    fn a_static_linux_binary_runs() {
        assert!(judge(&elf("amd64"), &server()).runs);
    }

    #[test]
    fn a_mac_go_binary_gets_the_go_command() {
        let mut r = Report::empty(Format::MachO, 100);
        r.arch = Some("arm64".into());
        r.toolchain = Toolchain::Go;
        r.go = Some(GoBuildInfo { goos: Some("darwin".into()), goarch: Some("arm64".into()), ..Default::default() });
        let v = judge(&r, &server());
        assert!(!v.runs);
        assert!(v.message().contains("macOS"), "{}", v.message());
        assert!(v.message().contains("GOOS=linux GOARCH=amd64 CGO_ENABLED=0 go build"), "{}", v.message());
    }

    #[test]
    fn newer_glibc_is_named_with_a_static_remedy() {
        let mut r = elf("amd64");
        r.linkage = Some(Linkage::Dynamic);
        r.interpreter = Some("/lib64/ld-linux-x86-64.so.2".into());
        r.needed = vec!["libc.so.6".into()];
        r.glibc_required = Some("2.38".into());
        r.libc = Some(Libc::Glibc);
        r.toolchain = Toolchain::Rust;
        let v = judge(&r, &server());
        assert!(!v.runs);
        let m = v.message();
        assert!(m.contains("GLIBC_2.38") && m.contains("glibc 2.36"), "{m}");
        assert!(m.contains("x86_64-unknown-linux-musl"), "{m}");
    }

    #[test]
    fn missing_loader_and_libraries_are_named() {
        let mut r = elf("amd64");
        r.linkage = Some(Linkage::Dynamic);
        r.interpreter = Some("/lib/ld-musl-x86_64.so.1".into());
        r.needed = vec!["libc.musl-x86_64.so.1".into(), "libfoo.so.3".into()];
        let m = judge(&r, &server()).message();
        assert!(m.contains("/lib/ld-musl-x86_64.so.1"), "{m}");
        assert!(m.contains("libfoo.so.3"), "{m}");
    }

    #[test]
    fn many_missing_libraries_are_named_by_the_first_few_and_counted() {
        let mut r = elf("amd64");
        r.linkage = Some(Linkage::Dynamic);
        r.needed = (0..200).map(|i| format!("libmissing{i}.so")).collect();
        let m = judge(&r, &server()).message();
        assert!(m.contains("libmissing0.so, ") && m.contains("libmissing7.so and 192 more"), "{m}");
        assert!(!m.contains("libmissing8.so"), "{m}");
    }

    #[test]
    fn an_oversized_file_is_refused_for_what_it_holds() {
        let mut r = elf("amd64");
        r.oversized = Some("names more than 256 needed libraries".into());
        let v = judge(&r, &server());
        assert!(!v.runs);
        assert!(
            v.message().starts_with("the file names more than 256 needed libraries, more than any program needs"),
            "{}",
            v.message()
        );
    }

    #[test]
    fn wrong_architecture_and_non_executables_are_refused() {
        let mut r = elf("arm64");
        r.toolchain = Toolchain::Go;
        let m = judge(&r, &server()).message();
        assert!(m.contains("built for arm64 but the server runs amd64"), "{m}");
        assert!(m.contains("GOARCH=amd64"), "{m}");
        let mut o = elf("amd64");
        o.elf_kind = Some(ElfKind::Relocatable);
        assert!(judge(&o, &server()).message().contains("object file"));
    }

    #[test]
    fn scripts_windows_and_junk_are_refused_with_a_remedy() {
        for r in [
            Report::empty(Format::Script, 1),
            Report::empty(Format::Pe, 1),
            Report::empty(Format::Empty, 0),
            Report::empty(Format::Zip, 1),
            Report::empty(Format::Unknown, 1),
        ] {
            let v = judge(&r, &server());
            assert!(!v.runs);
            assert!(v.problems.iter().all(|p| !p.remedy.is_empty()));
        }
    }
}
