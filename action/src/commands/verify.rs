//! `nx verify`: what the file is, and whether it will run on the server.
//! Exit 0 when it will run, 1 when it will not, 2 when the file cannot be read.

use nx_protocol::target::ServerTarget;
use nx_verify::report::{ElfKind, Linkage, Report};
use nx_verify::Verdict;
use serde::Serialize;

use super::print_json;
use crate::cli::{Global, VerifyArgs};
use crate::client::get_public;
use crate::failure::Failure;
use crate::output::{bytes, paint, Color};

#[derive(Serialize)]
struct Output<'a> {
    path: String,
    report: &'a Report,
    target: &'a ServerTarget,
    verdict: &'a Verdict,
}

/// The target: `explicit` (`--target`), else the configured server's, else
/// linux/amd64.
pub async fn server_target(g: &Global, explicit: Option<&str>) -> anyhow::Result<ServerTarget> {
    if let Some(t) = explicit {
        return ServerTarget::parse_os_arch(t).ok_or_else(|| {
            Failure::Usage(format!("--target {t:?} is not supported; use linux/amd64 or linux/arm64")).into()
        });
    }
    let configured = crate::config::resolve(g.server.as_deref(), None, g.insecure).ok().map(|t| t.server);
    match configured {
        Some(server) => get_public(&server, "/v1/target").await,
        None => Ok(ServerTarget::parse_os_arch("linux/amd64").unwrap_or_else(|| unreachable!("a supported target"))),
    }
}

fn describe(r: &Report) -> Vec<(&'static str, String)> {
    let mut rows = vec![("format", r.format.describe().to_owned())];
    if let (Some(bits), Some(endian)) = (r.bits, &r.endian) {
        rows[0].1.push_str(&format!(" {bits}-bit {endian}-endian"));
    }
    if let Some(kind) = r.elf_kind {
        let k = match kind {
            ElfKind::Executable => "executable",
            ElfKind::Pie => "position-independent executable",
            ElfKind::SharedLibrary => "shared library",
            ElfKind::Relocatable => "object file",
            ElfKind::Core => "core dump",
            ElfKind::Other => "other",
        };
        rows[0].1.push_str(&format!(", {k}"));
    }
    if let Some(os) = &r.os {
        let abi = r.os_abi.as_deref().map(|a| format!(" (OS/ABI {a})")).unwrap_or_default();
        rows.push(("os", format!("{os}{abi}")));
    }
    if let Some(a) = &r.arch {
        rows.push(("arch", a.clone()));
    }
    if !r.fat_arches.is_empty() {
        rows.push(("arches", r.fat_arches.join(", ")));
    }
    if let Some(l) = r.linkage {
        let text = match (l, &r.interpreter) {
            (Linkage::Dynamic, Some(i)) => format!("dynamic, loader {i}"),
            (Linkage::Dynamic, None) => "dynamic".into(),
            (Linkage::Static, _) => "static".into(),
        };
        rows.push(("linkage", text));
    }
    if let Some(libc) = r.libc {
        let need = r.glibc_required.as_deref().map(|v| format!(", needs GLIBC_{v}")).unwrap_or_default();
        rows.push(("libc", format!("{}{need}", format!("{libc:?}").to_lowercase())));
    }
    if !r.needed.is_empty() {
        rows.push(("needs", r.needed.join(", ")));
    }
    if let Some(s) = r.stripped {
        rows.push(("stripped", if s { "yes" } else { "no" }.into()));
    }
    if let Some(go) = &r.go {
        let mut text = go.go_version.clone();
        let settings: Vec<String> = [
            go.cgo_enabled.map(|c| format!("CGO_ENABLED={}", u8::from(c))),
            go.goos.as_ref().map(|v| format!("GOOS={v}")),
            go.goarch.as_ref().map(|v| format!("GOARCH={v}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !settings.is_empty() {
            text.push_str(&format!(" ({})", settings.join(", ")));
        }
        if let Some(m) = go.main_module.as_ref().or(go.path.as_ref()) {
            text.push_str(&format!(", module {m}"));
        }
        rows.push(("go", text));
    } else {
        rows.push(("toolchain", format!("{:?}", r.toolchain).to_lowercase()));
    }
    if let Some(c) = &r.compiler {
        rows.push(("compiler", c.clone()));
    }
    if let Some(deps) = &r.rust_dependencies {
        rows.push(("crates", format!("{} (cargo-auditable)", deps.len())));
    }
    if let Some(s) = &r.shebang {
        rows.push(("shebang", s.clone()));
    }
    rows.push(("size", bytes(r.size)));
    for e in &r.parse_errors {
        rows.push(("damaged", e.clone()));
    }
    rows
}

/// The refusal for a binary that will not run on `target`, with each
/// problem and its fix; `None` when it will run.
pub fn refusal(path: &std::path::Path, data: &[u8], target: &ServerTarget) -> Option<Failure> {
    let verdict = nx_verify::judge(&nx_verify::inspect(data), target);
    if verdict.runs {
        return None;
    }
    Some(Failure::Refused(format!(
        "{} will not run on the server ({}/{}):\n{}",
        path.display(),
        target.os,
        target.arch,
        verdict
            .problems
            .iter()
            .map(|p| format!("  - {}\n    fix: {}", p.problem, p.remedy))
            .collect::<Vec<_>>()
            .join("\n")
    )))
}

pub async fn run(g: &Global, args: VerifyArgs) -> anyhow::Result<()> {
    let data = tokio::fs::read(&args.path)
        .await
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", args.path.display())))?;
    let target = server_target(g, args.target.as_deref()).await?;
    let report = nx_verify::inspect(&data);
    let verdict = nx_verify::judge(&report, &target);
    if g.json {
        print_json(&Output {
            path: args.path.display().to_string(),
            report: &report,
            target: &target,
            verdict: &verdict,
        })?;
    } else {
        println!("{}", paint(&args.path.display().to_string(), Color::Bold));
        for (k, v) in describe(&report) {
            println!("  {k:<10} {v}");
        }
        let on = match &target.glibc {
            Some(v) => format!("{}/{} (glibc {v})", target.os, target.arch),
            None => format!("{}/{}", target.os, target.arch),
        };
        if verdict.runs {
            println!("  {:<10} {}", "verdict", paint(&format!("will run on {on}"), Color::Green));
        } else {
            println!("  {:<10} {}", "verdict", paint(&format!("will not run on {on}"), Color::Red));
            for p in &verdict.problems {
                println!("    - {}\n      fix: {}", p.problem, p.remedy);
            }
        }
    }
    if verdict.runs {
        Ok(())
    } else {
        Err(Failure::Refused(format!("{} will not run on the server", args.path.display())).into())
    }
}
