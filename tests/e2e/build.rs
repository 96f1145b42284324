//! `nx build` with real toolchains: a Go module, a Rust crate of this
//! workspace, a C program built by nx.toml's command, and a Bun app; each
//! binary is pushed and answers. And the errors that name their fix.

use std::path::{Path, PathBuf};

use nx_e2e::receiver::NxOutput;
use nx_e2e::{bin_dir, require_program, Receiver};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A copy of a fixture project in a temporary directory.
fn copy_project(name: &str, extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    for (file, text) in extra {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    dir
}

/// Runs nx in `dir` with the Go settings this machine needs (no module
/// proxy) and `path_prefix` before PATH.
fn nx_in(r: &Receiver, dir: &Path, args: &[&str], path_prefix: Option<&Path>) -> NxOutput {
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = path_prefix {
        path = std::env::join_paths(std::iter::once(p.to_owned()).chain(std::env::split_paths(&path))).unwrap();
    }
    let gocache = bin_dir().join("fixtures/go-cache");
    NxOutput::from(
        r.nx_command(&r.admin_token)
            .current_dir(dir)
            .env("PATH", path)
            .env("GOFLAGS", "-mod=mod")
            .env("GOPROXY", "off")
            .env("GOCACHE", gocache)
            // The harness gives nx a HOME of its own; rustup and cargo keep theirs.
            .env("CARGO_HOME", std::env::var_os("CARGO_HOME").unwrap_or_else(|| home().join(".cargo").into()))
            .env("RUSTUP_HOME", std::env::var_os("RUSTUP_HOME").unwrap_or_else(|| home().join(".rustup").into()))
            .args(args)
            .output()
            .unwrap(),
    )
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
}

fn pushed_preview(out: &NxOutput) -> String {
    out.json()["deployment"]["preview_url"].as_str().unwrap().to_owned()
}

#[test]
fn go_and_c_projects_build_push_and_answer_and_errors_name_the_fix() {
    require_program("go", "golang-go");
    require_program("musl-gcc", "musl-tools");
    let r = Receiver::start();
    r.create_app("web");

    let go = copy_project("goweb", &[]);
    let built = nx_in(&r, go.path(), &["build", "-o", "server"], None);
    assert_eq!(built.code, 0, "{built:?}");
    assert!(
        built.stderr.contains("CGO_ENABLED=0") && built.stderr.contains("go build -trimpath"),
        "the command is shown: {}",
        built.stderr
    );
    assert!(built.stderr.contains("will run on linux/amd64"), "{}", built.stderr);
    assert_eq!(built.stdout.trim(), "server");
    let pushed = nx_in(&r, go.path(), &["--json", "push", ".", "--app", "web"], None);
    assert_eq!(pushed.code, 0, "{pushed:?}");
    assert_eq!(r.get(&pushed_preview(&pushed)).body, "goweb\n");

    let c = copy_project(
        "c",
        &[("nx.toml", "app = \"web\"\nbuild = \"musl-gcc -static -O2 -o hello-c hello.c\"\nbinary = \"hello-c\"\n")],
    );
    // The project's nx.toml names the app, not the one where nx runs.
    r.create_app("other");
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("nx.toml"), "app = \"other\"\n").unwrap();
    let pushed = nx_in(&r, elsewhere.path(), &["--json", "push", c.path().to_str().unwrap()], None);
    assert_eq!(pushed.code, 0, "{pushed:?}");
    let preview = pushed_preview(&pushed);
    assert!(preview.contains("--web."), "pushed to the project's app: {preview}");
    assert_eq!(r.get(&preview).body, "hello from c\n");

    // A dynamic C build is checked like any binary; a project nx does not
    // know says which nx.toml keys to set; cgo cannot cross-build.
    let unknown = copy_project("c", &[]);
    let e = nx_in(&r, unknown.path(), &["build"], None);
    assert_eq!(e.code, 2, "{e:?}");
    assert!(e.stderr.contains("build = ") && e.stderr.contains("binary = "), "{}", e.stderr);
    let cgo =
        copy_project("goweb", &[("cgo.go", "package main\n\n// int answer(void) { return 42; }\nimport \"C\"\n")]);
    let e = nx_in(&r, cgo.path(), &["build", "--target", "linux/arm64"], None);
    assert_eq!(e.code, 2, "{e:?}");
    assert!(e.stderr.contains("cgo") && e.stderr.contains("linux/arm64"), "{}", e.stderr);
    let empty_path = tempfile::tempdir().unwrap();
    let no_go = r
        .nx_command(&r.admin_token)
        .current_dir(go.path())
        .env("PATH", empty_path.path())
        .arg("build")
        .output()
        .unwrap();
    let no_go = NxOutput::from(no_go);
    assert_eq!(no_go.code, 2, "{no_go:?}");
    assert!(no_go.stderr.contains("go is not installed") && no_go.stderr.contains("golang-go"), "{}", no_go.stderr);
}

#[test]
fn the_workspaces_rust_example_builds_pushes_and_answers() {
    require_program("cargo", "cargo (https://rustup.rs)");
    let r = Receiver::start();
    r.create_app("hello");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    let out = tempfile::tempdir().unwrap();
    let binary = out.path().join("hello");
    let built = nx_in(&r, &example, &["build", "-o", binary.to_str().unwrap()], None);
    assert_eq!(built.code, 0, "{built:?}");
    assert!(built.stderr.contains("cargo build --release --target x86_64-unknown-linux-"), "{}", built.stderr);
    let pushed = nx_in(&r, out.path(), &["--json", "push", "hello", "--app", "hello"], None);
    assert_eq!(pushed.code, 0, "{pushed:?}");
    assert!(r.get(&pushed_preview(&pushed)).body.starts_with("hello from hello"));
}

#[test]
fn a_bun_app_compiles_pushes_and_answers() {
    let bun_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-node/node_modules/.bin");
    assert!(
        bun_dir.join("bun").exists(),
        "bun is missing: scripts/test.sh installs it from npm into target/test-node (npm install --prefix target/test-node bun)"
    );
    let r = Receiver::start();
    r.create_app("web");
    let app = tempfile::tempdir().unwrap();
    std::fs::write(app.path().join("package.json"), r#"{"name": "shop", "module": "server.ts"}"#).unwrap();
    std::fs::write(
        app.path().join("server.ts"),
        "Bun.serve({ hostname: process.env.HOST, port: Number(process.env.PORT), fetch() { return new Response('hello from bun\\n'); } });\n",
    )
    .unwrap();
    let pushed = nx_in(&r, app.path(), &["--json", "push", ".", "--app", "web"], Some(&bun_dir));
    assert_eq!(pushed.code, 0, "{pushed:?}\n{}", r.log());
    assert_eq!(r.get(&pushed_preview(&pushed)).body, "hello from bun\n");
}

#[test]
fn the_action_builds_and_pushes_in_one_step() {
    require_program("go", "golang-go");
    let r = Receiver::start();
    r.create_app("web");
    let go = copy_project("goweb", &[]);
    let output = go.path().join("github-output");
    let ran = NxOutput::from(
        r.nx_command(&r.admin_token)
            .current_dir(go.path())
            .arg("github-action")
            .env("INPUT_APP", "web")
            .env("INPUT_BUILD", "true")
            .env("GITHUB_OUTPUT", &output)
            .env("GOFLAGS", "-mod=mod")
            .env("GOPROXY", "off")
            .env("GOCACHE", bin_dir().join("fixtures/go-cache"))
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    let outputs = std::fs::read_to_string(&output).unwrap();
    let preview = outputs.lines().find_map(|l| l.strip_prefix("preview-url=")).unwrap();
    assert_eq!(r.get(preview).body, "goweb\n");

    let command = NxOutput::from(
        r.nx_command(&r.admin_token)
            .current_dir(go.path())
            .arg("github-action")
            .env("INPUT_APP", "web")
            .env(
                "INPUT_BUILD",
                "env > build-env && CGO_ENABLED=0 GOFLAGS=-mod=mod GOPROXY=off go build -o by-command .",
            )
            .env("INPUT_BINARY", "by-command")
            .env("GOCACHE", bin_dir().join("fixtures/go-cache"))
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "the-workflows-oidc-request-token")
            .output()
            .unwrap(),
    );
    assert_eq!(command.code, 0, "{command:?}");
    assert!(go.path().join("by-command").exists());
    // The project's build is the project's code: it never sees the deploy key
    // or what would mint the workflow's OIDC tokens.
    let seen = std::fs::read_to_string(go.path().join("build-env")).unwrap();
    assert!(seen.contains("GOCACHE="), "the build's environment was recorded: {seen}");
    assert!(!seen.contains("NX_KEY=") && !seen.contains(&r.admin_token), "{seen}");
    assert!(!seen.contains("ACTIONS_ID_TOKEN_REQUEST_TOKEN"), "{seen}");
}
