//! Every child process of the harness starts here. A program that also runs
//! the runtime's process manager (the benchmarks do) must start its children
//! through it, because the manager reaps every child with `waitpid(-1)`: a
//! command run with `std::process` beside it loses its exit status
//! (`ECHILD`, "No child processes") whenever the manager collects it first.
//! One-shot commands go through the manager when there is one; long-lived
//! children (the receiver, moto) refuse to start beside one, so the race is a
//! clear panic at once rather than a failure now and then.

use std::process::{Child, Command, Output};

/// Runs `cmd` to completion and collects its output, through this program's
/// process manager if it has one.
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    let Some(pm) = nx_runtime::ProcessManager::current() else { return cmd.output() };
    let mut managed = nx_runtime::process::Command::new(cmd.get_program());
    managed.args = cmd.get_args().map(ToOwned::to_owned).collect();
    // The manager's children get exactly the environment given, so start
    // from this program's and apply the command's changes, as std does.
    let mut env: std::collections::BTreeMap<_, _> = std::env::vars_os().collect();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => env.insert(key.to_owned(), v.to_owned()),
            None => env.remove(key),
        };
    }
    managed.env = env.into_iter().collect();
    managed.cwd = cmd.get_current_dir().map(ToOwned::to_owned);
    // A thread of its own: the caller may or may not be inside a runtime.
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(pm.output(managed)).map_err(std::io::Error::other)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the thread running a command panicked")))
    })?;
    Ok(Output { status: out.status, stdout: out.stdout, stderr: out.stderr })
}

/// Starts a long-lived child, which this program waits for itself.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    assert!(
        nx_runtime::ProcessManager::current().is_none(),
        "{:?} cannot be started beside this program's process manager, which would reap it; \
         run it in a program (or benchmark) of its own",
        cmd.get_program()
    );
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a process manager reaping around it, every command still gets
    /// its own exit status, its output and its environment.
    #[test]
    fn commands_beside_a_process_manager_keep_their_exit_status() {
        let pm = nx_runtime::ProcessManager::global().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            rt.spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = pm.output(nx_runtime::process::Command::new("/bin/true")).await;
                }
            })
        };
        for i in 0..50 {
            let out = output(
                Command::new("/bin/sh").args(["-c", "echo \"$NX_ROUND\"; exit 3"]).env("NX_ROUND", i.to_string()),
            )
            .unwrap();
            assert_eq!(out.status.code(), Some(3), "round {i}");
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), i.to_string());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(churn).unwrap();
        let refused = std::panic::catch_unwind(|| spawn(&mut Command::new("/bin/true")));
        assert!(refused.is_err(), "a long-lived child is refused beside a process manager");
    }
}
