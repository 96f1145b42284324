//! `nx-init`: pid 1 of every sandbox's pid namespace. bwrap runs it with
//! `--as-pid-1`; it starts the app as pid 2, reaps every orphan the app's
//! processes leave to it, and exits with the app's status as soon as the app
//! has ended (the kernel then kills whatever else the namespace holds).
//!
//! It replaces bwrap's own init, which is a copy of bwrap left over from the
//! sandbox's setup: about 190 KiB of private memory per sandbox, where this
//! one is about 40 KiB. That is what keeps 1,000 idle sandboxes under 1 MB
//! each beyond their apps (ARCHITECTURE.md, Decisions). It behaves as bwrap's
//! init does: no handler for the signals that stop a process (pid 1 of a
//! namespace receives only SIGKILL and SIGSTOP from outside without one, so
//! the shim's SIGTERM goes to the app), the app in its session, and the
//! exit status bwrap reports (the code, or 128 + the signal). The Rust
//! runtime's own SIGSEGV/SIGBUS handlers (its stack overflow report) are
//! there: the app can fake one to end its own sandbox, which it can do
//! anyway by exiting. Two differences an app could see: a program that
//! cannot be executed ends with status 127 and "nx-init: cannot run ..."
//! (bwrap said "execvp" and 1), and a file without a `#!` line is not
//! retried with `/bin/sh` as `execvp` does (the receiver refuses scripts
//! anyway). It is not position independent: it runs as the app's own user
//! in the app's own sandbox, so its addresses guard nothing.
//!
//! `build.rs` compiles this file on its own, with nothing but `std`, as a
//! static executable (musl where installed, no relocations at start) that
//! the receiver installs beside its data and binds into each sandbox
//! ([`crate::spec::install_init`]). It is also a module of the library so
//! that the workspace's lints and tests cover it. Its one system call
//! without a `std` wrapper, `waitpid(-1)`, is declared here for that reason,
//! rather than taken from [`crate::sys`], and its other `unsafe` (taking the
//! descriptor of `--go-fd`) is here too.
//!
//! With `--go-fd N` it starts the app only once the byte `g` arrives on
//! descriptor N, and ends without starting it if the descriptor reaches its
//! end: a sandbox made ready ahead of its start ([`crate::ready`]) waits
//! here, with bwrap's whole setup done, for its shim's go, and dies with
//! its shim.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, ExitStatus};

/// Runs `nx-init [--go-fd N] PROGRAM [ARGS...]`.
pub fn main() -> ExitCode {
    const USAGE: &str = "nx-init: usage: nx-init [--go-fd N] PROGRAM [ARGS...] (bwrap runs it as each sandbox's pid 1)";
    let mut args = std::env::args_os().skip(1).peekable();
    // A sandbox made ready ahead of its start: the app starts on its shim's
    // go, and never if the shim is gone (the pipe's end).
    if args.next_if(|a| a == "--go-fd").is_some() {
        let Some(fd) = args.next().and_then(|f| f.to_str()?.parse::<i32>().ok()) else {
            eprintln!("{USAGE}");
            return ExitCode::from(127);
        };
        if let Err(e) = wait_for_go(fd) {
            eprintln!("nx-init: not told to go ({e}); the app is not started");
            return ExitCode::from(125);
        }
    }
    let Some(program) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(127);
    };
    let app = match Command::new(&program).args(args).spawn() {
        Ok(child) => child.id(),
        Err(e) => {
            eprintln!("nx-init: cannot run {}: {e}", program.to_string_lossy());
            return ExitCode::from(127);
        }
    };
    loop {
        match wait_any() {
            Ok((pid, raw)) if u32::try_from(pid) == Ok(app) => return ExitCode::from(exit_code(raw)),
            // An orphan the app left, reaped so it is no zombie.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("nx-init: cannot wait for the app: {e}");
                return ExitCode::from(255);
            }
        }
    }
}

/// Waits for the byte `g` on descriptor `fd`, the read end of a pipe whose
/// write end only the sandbox's shim holds, and closes it so the app does
/// not inherit it. Its end, or any other byte, is an error.
#[allow(unsafe_code)]
fn wait_for_go(fd: i32) -> io::Result<()> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    // Owned below only if open: `from_raw_fd` requires it.
    std::fs::metadata(format!("/proc/self/fd/{fd}"))?;
    // SAFETY: `fd` is open (checked above); it was handed to this process
    // for this wait alone, and nothing else here owns it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut byte = [0u8; 1];
    loop {
        return match pipe.read(&mut byte) {
            Ok(1) if byte[0] == b'g' => Ok(()),
            Ok(0) => Err(io::Error::other("its shim is gone")),
            Ok(_) => Err(io::Error::other("an unexpected byte")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// The exit code that stands for the app's wait status, as bwrap reports
/// one: the app's code, or 128 + the signal that ended it.
pub fn exit_code(raw: i32) -> u8 {
    let status = ExitStatus::from_raw(raw);
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(255),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 255,
    }
}

/// Waits for any child: `(pid, raw wait status)`.
#[allow(unsafe_code)]
fn wait_any() -> io::Result<(i32, i32)> {
    extern "C" {
        fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    }
    let mut raw = 0;
    // SAFETY: waitpid writes one int through the pointer, which points at a
    // live local; pid_t is i32 on Linux.
    let pid = unsafe { waitpid(-1, &mut raw, 0) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((pid, raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_is_the_apps_or_128_plus_its_signal() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(255 << 8), 255);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGTERM), 143);
        // Killed by a signal with a core dump (0x80).
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), 139);
    }
}
