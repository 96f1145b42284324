//! `nx-shim STATE_DIR`: the per-sandbox supervisor the receiver starts (see
//! `nx_runtime::shim`). No async runtime: one thread, one `poll` loop, so it
//! stays small next to the app it runs.
//!
//! `nx-shim --park STATE_DIR`: a parked sandbox the receiver keeps ready
//! (see `nx_runtime::pool`).
//!
//! `nx-shim --keep-log PATH MAX_FILE_BYTES KEEP`: a log keeper (see
//! `nx_runtime::logs::keep`), writing what arrives on stdin into a capped,
//! rotated log, for the programs that outlive the receiver.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str =
    "usage: nx-shim STATE_DIR | nx-shim --park STATE_DIR | nx-shim --keep-log PATH MAX_FILE_BYTES KEEP \
                     (the receiver starts it; it is not run by hand)";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--park" => {
            ExitCode::from(u8::try_from(nx_runtime::pool::park_main(Path::new(dir))).unwrap_or(1))
        }
        [dir] if dir != "--keep-log" => {
            let code = nx_runtime::shim::main(Path::new(dir));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        [flag, path, max, keep] if flag == "--keep-log" => {
            let limits = match (max.to_str().map(str::parse), keep.to_str().map(str::parse)) {
                (Some(Ok(max_file_bytes)), Some(Ok(keep_rotated))) => {
                    nx_runtime::LogLimits { max_file_bytes, keep_rotated }
                }
                _ => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            };
            match nx_runtime::logs::keep(std::io::stdin().lock(), Path::new(path), limits) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nx-shim: cannot keep the log {}: {e}", Path::new(path).display());
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
