//! `nx build`: which toolchain builds a project for the server, and how.
//! [`plan`] reads the project and decides; [`run`] runs the plan, streaming
//! the toolchain's output to stderr, and returns the binary it made.
//!
//! - `build = "..."` in nx.toml: that command (with `binary = "..."`), for C
//!   and anything else;
//! - `go.mod`: `go build -trimpath` with GOOS/GOARCH, CGO_ENABLED=0 unless
//!   the package imports "C" (then only for the host's own platform);
//! - `Cargo.toml`: `cargo build --release` for the musl target when it is
//!   installed, else the host's gnu target (the verifier then checks the
//!   glibc floor against the server's);
//! - `build.zig`: `zig build` for the musl target;
//! - `package.json` with a server entry: `bun build --compile`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nx_protocol::target::ServerTarget;

use crate::failure::Failure;
use crate::manifest::Manifest;

/// What will be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The kind of project, for messages: `Go module`, `Rust crate`, ...
    pub kind: &'static str,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dir: PathBuf,
    /// Where the binary will be.
    pub output: PathBuf,
}

impl Plan {
    /// The command as a user would type it.
    pub fn display(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut words = env;
        words.push(self.program.clone());
        words.extend(self.args.iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() }));
        words.join(" ")
    }
}

/// What the machine offers; probed for real by [`Host::probe`], given by
/// hand in tests.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// `amd64` or `arm64`.
    pub arch: String,
    /// Programs found on PATH, by name.
    pub programs: Vec<String>,
    /// Rust targets installed (`rustup target list --installed`, or the
    /// sysroot's `lib/rustlib`).
    pub rust_targets: Vec<String>,
}

impl Host {
    pub fn probe() -> Host {
        let arch = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            "x86_64" => "amd64",
            other => other,
        }
        .to_owned();
        let programs = ["go", "cargo", "rustc", "zig", "bun", "sh"]
            .iter()
            .filter(|p| which(p).is_some())
            .map(|p| (*p).to_owned())
            .collect();
        let rust_targets = rust_targets();
        Host { arch, programs, rust_targets }
    }

    fn has(&self, program: &str) -> bool {
        self.programs.iter().any(|p| p == program)
    }
}

/// A program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn rust_targets() -> Vec<String> {
    let Ok(out) = toolchain("rustc").args(["--print", "sysroot"]).output() else { return Vec::new() };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::read_dir(sysroot.join("lib/rustlib"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("lib").is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn missing(tool: &str, how: &str) -> Failure {
    Failure::Usage(format!("{tool} is not installed; {how}"))
}

/// Decides how to build the project in `dir` for `target`.
pub fn plan(dir: &Path, manifest: Option<&Manifest>, target: &ServerTarget, host: &Host) -> Result<Plan, Failure> {
    let arch = target.arch.as_str();
    let (rust_arch, zig_arch, bun_arch) = match arch {
        "amd64" => ("x86_64", "x86_64", "x64"),
        "arm64" => ("aarch64", "aarch64", "arm64"),
        other => return Err(Failure::Usage(format!("the server's architecture {other} is not one nx can build for"))),
    };
    let base = |kind, program: &str, args: Vec<String>, output: PathBuf| Plan {
        kind,
        program: program.to_owned(),
        args,
        env: Vec::new(),
        dir: dir.to_owned(),
        output,
    };
    if let Some(command) = manifest.and_then(|m| m.build.clone()) {
        let binary = manifest.and_then(|m| m.binary.clone()).ok_or_else(|| {
            Failure::Usage(
                "nx.toml has `build` but not `binary`: name the file the command makes, like binary = \"server\""
                    .into(),
            )
        })?;
        let mut p = base("build command", "sh", vec!["-c".into(), command], dir.join(binary));
        p.env = vec![("NX_TARGET_OS".into(), target.os.clone()), ("NX_TARGET_ARCH".into(), arch.to_owned())];
        return Ok(p);
    }
    if dir.join("go.mod").is_file() {
        if !host.has("go") {
            return Err(missing("go", "install it with `apt-get install golang-go` or from https://go.dev/dl"));
        }
        let name = go_module_name(&dir.join("go.mod")).unwrap_or_else(|| "server".into());
        let output = dir.join(&name);
        let cgo = uses_cgo(dir);
        if cgo && arch != host.arch {
            return Err(Failure::Usage(format!(
                "this Go module imports \"C\" (cgo), which cannot be cross-built for linux/{arch} from linux/{}: \
                 build it on a linux/{arch} machine, or remove the cgo dependency (pure-Go drivers exist for most databases)",
                host.arch
            )));
        }
        let mut p = base(
            "Go module",
            "go",
            vec!["build".into(), "-trimpath".into(), "-o".into(), output.display().to_string(), ".".into()],
            output,
        );
        p.env = vec![
            ("GOOS".into(), "linux".into()),
            ("GOARCH".into(), arch.to_owned()),
            ("CGO_ENABLED".into(), if cgo { "1" } else { "0" }.into()),
        ];
        return Ok(p);
    }
    if dir.join("Cargo.toml").is_file() {
        if !host.has("cargo") {
            return Err(missing("cargo", "install Rust with rustup (https://rustup.rs)"));
        }
        let musl = format!("{rust_arch}-unknown-linux-musl");
        let gnu = format!("{rust_arch}-unknown-linux-gnu");
        let triple = if host.rust_targets.contains(&musl) {
            musl
        } else if host.rust_targets.contains(&gnu) {
            gnu
        } else {
            return Err(Failure::Usage(format!(
                "no Rust target for linux/{arch} is installed; run `rustup target add {musl}` (static binaries, the surest kind)"
            )));
        };
        let (bin, target_dir) = cargo_binary(dir, manifest)?;
        let output = target_dir.join(&triple).join("release").join(&bin);
        return Ok(base(
            "Rust crate",
            "cargo",
            vec!["build".into(), "--release".into(), "--target".into(), triple, "--bin".into(), bin],
            output,
        ));
    }
    if dir.join("build.zig").is_file() {
        if !host.has("zig") {
            return Err(missing("zig", "get it from https://ziglang.org/download"));
        }
        let name = manifest.and_then(|m| m.binary.clone()).ok_or_else(|| {
            Failure::Usage(
                "name the executable build.zig installs with `binary = \"zig-out/bin/NAME\"` in nx.toml".into(),
            )
        })?;
        return Ok(base(
            "Zig project",
            "zig",
            vec!["build".into(), "-Doptimize=ReleaseSafe".into(), format!("-Dtarget={zig_arch}-linux-musl")],
            dir.join(name),
        ));
    }
    if dir.join("package.json").is_file() {
        let entry = bun_entry(dir, manifest)?;
        if !host.has("bun") {
            return Err(missing("bun", "install it with `npm install -g bun` or from https://bun.sh"));
        }
        let output = dir.join("server");
        return Ok(base(
            "Bun app",
            "bun",
            vec![
                "build".into(),
                "--compile".into(),
                format!("--target=bun-linux-{bun_arch}"),
                entry,
                "--outfile".into(),
                output.display().to_string(),
            ],
            output,
        ));
    }
    Err(Failure::Usage(format!(
        "{} has no go.mod, Cargo.toml, build.zig or package.json; say how to build it in nx.toml: \
         build = \"make server\" and binary = \"server\"",
        dir.display()
    )))
}

/// The last element of the module path: what `go build` names the binary.
fn go_module_name(go_mod: &Path) -> Option<String> {
    let text = std::fs::read_to_string(go_mod).ok()?;
    let module = text.lines().find_map(|l| l.trim().strip_prefix("module "))?.trim().trim_matches('"');
    module.rsplit('/').next().filter(|n| !n.is_empty()).map(str::to_owned)
}

/// Whether a Go file of the package in `dir` (tests aside) imports "C".
fn uses_cgo(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "go") && !p.to_string_lossy().ends_with("_test.go"))
        .any(|p| {
            std::fs::read_to_string(&p).is_ok_and(|t| {
                t.lines().any(|l| {
                    let l = l.trim();
                    l == "import \"C\"" || l == "\"C\""
                })
            })
        })
}

/// The binary target of the package in `dir`, and the target directory.
fn cargo_binary(dir: &Path, manifest: Option<&Manifest>) -> Result<(String, PathBuf), Failure> {
    let out = toolchain("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Failure::Usage(format!("cannot run cargo metadata: {e}")))?;
    if !out.status.success() {
        return Err(Failure::Refused(format!("cargo metadata failed for {}", dir.display())));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| Failure::Refused(format!("cargo metadata: {e}")))?;
    let manifest_path = std::fs::canonicalize(dir.join("Cargo.toml")).unwrap_or_else(|_| dir.join("Cargo.toml"));
    let package = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["manifest_path"].as_str().map(PathBuf::from).as_deref() == Some(manifest_path.as_path()))
        .ok_or_else(|| {
            Failure::Usage(format!(
                "{} is a workspace without a package of its own; run nx build in a member's directory",
                dir.display()
            ))
        })?;
    let bins: Vec<String> = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")))
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    let chosen = manifest.and_then(|m| m.binary.clone());
    let bin = match (chosen, bins.as_slice()) {
        (Some(b), _) if bins.contains(&b) => b,
        (Some(b), _) => {
            return Err(Failure::Usage(format!(
                "nx.toml names binary {b:?}, but the crate's binaries are {}",
                bins.join(", ")
            )))
        }
        (None, [only]) => only.clone(),
        (None, []) => return Err(Failure::Usage(format!("the crate in {} has no binary to build", dir.display()))),
        (None, many) => {
            return Err(Failure::Usage(format!(
                "the crate has several binaries ({}); name one with binary = \"...\" in nx.toml",
                many.join(", ")
            )))
        }
    };
    let target_dir = meta["target_directory"].as_str().map(PathBuf::from).unwrap_or_else(|| dir.join("target"));
    Ok((bin, target_dir))
}

/// The server's entry point of a JavaScript/TypeScript project.
fn bun_entry(dir: &Path, manifest: Option<&Manifest>) -> Result<String, Failure> {
    if let Some(entry) = manifest.and_then(|m| m.binary.clone()) {
        return Ok(entry);
    }
    let text = std::fs::read_to_string(dir.join("package.json"))
        .map_err(|e| Failure::Usage(format!("cannot read package.json: {e}")))?;
    let pkg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Failure::Usage(format!("package.json is not valid JSON: {e}")))?;
    let candidates = [
        pkg["module"].as_str(),
        pkg["main"].as_str(),
        Some("server.ts"),
        Some("index.ts"),
        Some("server.js"),
        Some("index.js"),
    ];
    let found = candidates.into_iter().flatten().find(|e| dir.join(e).is_file()).map(str::to_owned);
    found.ok_or_else(|| {
        Failure::Usage(
            "package.json names no server entry (`main` or `module`), and there is no server.ts or index.ts".into(),
        )
    })
}

/// Variables a project's build never sees: its build scripts, dependencies
/// and toolchain plugins are the project's code, and an untrusted pull
/// request's build would otherwise read the deploy key (or mint the
/// workflow's OIDC tokens) and push anything.
const WITHHELD_FROM_BUILDS: [&str; 5] = [
    "NX_KEY",
    "NX_ADMIN_TOKEN",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    "ACTIONS_ID_TOKEN_REQUEST_URL",
    "ACTIONS_RUNTIME_TOKEN",
];

/// A toolchain command, without the variables in [`WITHHELD_FROM_BUILDS`].
pub fn toolchain(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for name in WITHHELD_FROM_BUILDS {
        command.env_remove(name);
    }
    command
}

/// Runs `plan`, the toolchain's output going to stderr; returns the binary.
pub fn run(plan: &Plan) -> anyhow::Result<PathBuf> {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    let status = toolchain(&plan.program)
        .args(&plan.args)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .status()
        .map_err(|e| Failure::Usage(format!("cannot run {}: {e}", plan.program)))?;
    if !status.success() {
        return Err(Failure::Refused(format!("the build failed ({status}): {}", plan.display())).into());
    }
    if !plan.output.is_file() {
        return Err(Failure::Refused(format!("the build succeeded but made no {}", plan.output.display())).into());
    }
    Ok(plan.output.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    fn host(programs: &[&str], rust_targets: &[&str]) -> Host {
        Host {
            arch: "amd64".into(),
            programs: programs.iter().map(|p| (*p).to_owned()).collect(),
            rust_targets: rust_targets.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn target(arch: &str) -> ServerTarget {
        ServerTarget::parse_os_arch(&format!("linux/{arch}")).unwrap()
    }

    #[test]
    fn go_modules_build_static_for_the_servers_arch_unless_they_need_cgo() {
        let d = project(&[
            ("go.mod", "module example.com/shop/api\n\ngo 1.19\n"),
            ("main.go", "package main\nfunc main() {}\n"),
        ]);
        let p = plan(d.path(), None, &target("arm64"), &host(&["go"], &[])).unwrap();
        assert_eq!(p.output, d.path().join("api"));
        assert!(
            p.env.contains(&("GOARCH".into(), "arm64".into())) && p.env.contains(&("CGO_ENABLED".into(), "0".into()))
        );
        assert!(p.args.contains(&"-trimpath".to_owned()));

        std::fs::write(d.path().join("db.go"), "package main\n\nimport \"C\"\n").unwrap();
        let e = plan(d.path(), None, &target("arm64"), &host(&["go"], &[])).unwrap_err().to_string();
        assert!(e.contains("cgo") && e.contains("linux/arm64"), "{e}");
        let native = plan(d.path(), None, &target("amd64"), &host(&["go"], &[])).unwrap();
        assert!(native.env.contains(&("CGO_ENABLED".into(), "1".into())));
        let e = plan(d.path(), None, &target("amd64"), &host(&[], &[])).unwrap_err().to_string();
        assert!(e.contains("go is not installed") && e.contains("golang-go"), "{e}");
    }

    #[test]
    fn rust_prefers_musl_and_says_how_to_get_a_target() {
        let d = project(&[(
            "Cargo.toml",
            "[package]\nname = \"srv\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
        )]);
        std::fs::create_dir(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/main.rs"), "fn main() {}\n").unwrap();
        let musl = plan(
            d.path(),
            None,
            &target("amd64"),
            &host(&["cargo"], &["x86_64-unknown-linux-gnu", "x86_64-unknown-linux-musl"]),
        )
        .unwrap();
        assert!(musl.args.contains(&"x86_64-unknown-linux-musl".to_owned()), "{musl:?}");
        assert!(musl.output.ends_with("x86_64-unknown-linux-musl/release/srv"), "{musl:?}");
        let gnu = plan(d.path(), None, &target("amd64"), &host(&["cargo"], &["x86_64-unknown-linux-gnu"])).unwrap();
        assert!(gnu.args.contains(&"x86_64-unknown-linux-gnu".to_owned()));
        let e = plan(d.path(), None, &target("arm64"), &host(&["cargo"], &["x86_64-unknown-linux-gnu"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rustup target add aarch64-unknown-linux-musl"), "{e}");
    }

    #[test]
    fn other_projects_say_which_nx_toml_keys_to_set() {
        let d = project(&[("Makefile", "all:\n")]);
        let e = plan(d.path(), None, &target("amd64"), &host(&["sh"], &[])).unwrap_err().to_string();
        assert!(e.contains("build = ") && e.contains("binary = "), "{e}");
        let m = Manifest { build: Some("make server".into()), binary: Some("server".into()), ..Manifest::default() };
        let p = plan(d.path(), Some(&m), &target("amd64"), &host(&["sh"], &[])).unwrap();
        assert_eq!((p.program.as_str(), p.args[1].as_str()), ("sh", "make server"));
        assert_eq!(p.output, d.path().join("server"));
        let no_binary = Manifest { build: Some("make".into()), ..Manifest::default() };
        assert!(plan(d.path(), Some(&no_binary), &target("amd64"), &host(&["sh"], &[]))
            .unwrap_err()
            .to_string()
            .contains("binary"));
    }

    #[test]
    fn bun_apps_compile_their_server_entry() {
        let d = project(&[("package.json", r#"{"name":"shop","module":"src/server.ts"}"#)]);
        std::fs::create_dir(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/server.ts"), "Bun.serve({fetch(){return new Response('hi')}})\n").unwrap();
        let p = plan(d.path(), None, &target("amd64"), &host(&["bun"], &[])).unwrap();
        assert!(p.args.contains(&"--compile".to_owned()) && p.args.contains(&"src/server.ts".to_owned()), "{p:?}");
        assert!(p.args.contains(&"--target=bun-linux-x64".to_owned()));
        let e = plan(d.path(), None, &target("amd64"), &host(&[], &[])).unwrap_err().to_string();
        assert!(e.contains("npm install -g bun"), "{e}");
    }
}
