//! `nx-shim STATE_DIR`: the per-sandbox supervisor the receiver starts (see
//! `nx_runtime::shim`). No async runtime: one thread, one `poll` loop, so it
//! stays small next to the app it runs.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: nx-shim STATE_DIR (the receiver starts it; it is not run by hand)");
        return std::process::ExitCode::from(2);
    };
    let code = nx_runtime::shim::main(std::path::Path::new(&dir));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
