//! `nx-init` as `build.rs` built it, run on its own: it runs the program it
//! is given with its arguments and input, and ends with that program's
//! status the way bwrap reports one.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};

use nx_runtime::process::{Command, Stream};
use nx_runtime::ProcessManager;

async fn run(args: &[&str]) -> nx_runtime::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let init = nx_runtime::spec::install_init(dir.path()).unwrap();
    let pm = ProcessManager::global().unwrap();
    pm.output(Command::new(&init).args(args.iter().copied())).await.unwrap()
}

#[tokio::test]
async fn it_runs_the_program_with_its_arguments_and_ends_with_its_code() {
    let out = run(&["/bin/sh", "-c", "echo \"$0 $1\"; exit 3", "one", "two"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one two\n");
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test]
async fn a_program_killed_by_a_signal_ends_it_with_128_plus_the_signal() {
    let out = run(&["/bin/sh", "-c", "kill -TERM $$"]).await;
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
}

#[tokio::test]
async fn a_program_that_cannot_run_is_named_with_the_reason() {
    let out = run(&["/nonexistent/app"]).await;
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "nx-init: cannot run /nonexistent/app: No such file or directory (os error 2)\n"
    );
    let none = run(&[]).await;
    assert_eq!(none.status.code(), Some(127));
    // A go descriptor that is not open starts nothing.
    let closed = run(&["--go-fd", "57", "/bin/true"]).await;
    assert_eq!(closed.status.code(), Some(125), "{closed:?}");
    assert!(String::from_utf8_lossy(&closed.stderr).starts_with("nx-init: not told to go ("), "{closed:?}");
    assert!(
        String::from_utf8_lossy(&none.stderr).starts_with("nx-init: usage: nx-init [--go-fd N] PROGRAM"),
        "{none:?}"
    );
}

#[tokio::test]
async fn the_program_reads_the_same_input() {
    let dir = tempfile::tempdir().unwrap();
    let init = nx_runtime::spec::install_init(dir.path()).unwrap();
    let pm = ProcessManager::global().unwrap();
    let mut cmd = Command::new(&init).args(["/bin/sh", "-c", "read line; echo \"got $line\""]);
    cmd.stdin = Stream::Pipe;
    cmd.stdout = Stream::Pipe;
    let mut child = pm.spawn(cmd).await.unwrap();
    // Written, then closed as the file is dropped.
    std::fs::File::from(child.stdin.take().unwrap()).write_all(b"hello\n").unwrap();
    let mut text = String::new();
    std::fs::File::from(child.stdout.take().unwrap()).read_to_string(&mut text).unwrap();
    assert_eq!(text, "got hello\n");
    assert!(child.wait().await.success());
}
