//! Opening a URL in the user's browser: `$BROWSER` (a list separated by `:`,
//! each a command, `%s` standing for the URL), else `xdg-open` when there is
//! a display.

use std::process::{Command, Stdio};

/// Opens `url`; returns the command that did, or why none could.
pub fn open(url: &str) -> Result<String, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut candidates: Vec<String> =
        env("BROWSER").map(|b| b.split(':').map(str::to_owned).collect()).unwrap_or_default();
    if env("DISPLAY").is_some() || env("WAYLAND_DISPLAY").is_some() {
        candidates.push("xdg-open".into());
    }
    if candidates.is_empty() {
        return Err("no browser here (set BROWSER, or run where DISPLAY is set)".into());
    }
    let mut tried = Vec::new();
    for c in candidates.iter().filter(|c| !c.trim().is_empty()) {
        let mut words: Vec<String> = c.split_whitespace().map(str::to_owned).collect();
        if words.iter().any(|w| w.contains("%s")) {
            words = words.into_iter().map(|w| w.replace("%s", url)).collect();
        } else {
            words.push(url.to_owned());
        }
        let status = Command::new(&words[0])
            .args(&words[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => return Ok(words[0].clone()),
            Ok(s) => tried.push(format!("{} exited with {s}", words[0])),
            Err(e) => tried.push(format!("{}: {e}", words[0])),
        }
    }
    Err(format!("no browser opened it ({})", tried.join("; ")))
}
