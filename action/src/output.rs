//! Human output: colour only on a terminal and never with NO_COLOR, aligned
//! tables, relative ages. Results go to stdout, progress and errors to stderr.

use std::io::IsTerminal;

use chrono::{DateTime, Utc};
use nx_protocol::api::DeploymentState;

/// ANSI colours used by the CLI.
#[derive(Debug, Clone, Copy)]
pub enum Color {
    Green,
    Red,
    Yellow,
    Dim,
    Bold,
}

fn color_enabled() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stdout().is_terminal()
}

/// `text` in `color` when stdout is a colour terminal.
pub fn paint(text: &str, color: Color) -> String {
    if !color_enabled() {
        return text.to_owned();
    }
    let code = match color {
        Color::Green => "32",
        Color::Red => "31",
        Color::Yellow => "33",
        Color::Dim => "2",
        Color::Bold => "1",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

pub fn state(s: DeploymentState) -> String {
    let color = match s {
        DeploymentState::Healthy => Color::Green,
        DeploymentState::Failed => Color::Red,
        DeploymentState::Pending | DeploymentState::Starting => Color::Yellow,
        DeploymentState::Stopped | DeploymentState::Sleeping => Color::Dim,
    };
    paint(s.as_str(), color)
}

/// "3m ago", "2h ago", "5d ago".
pub fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Visible width of a cell, ignoring colour codes.
fn width(s: &str) -> usize {
    let mut w = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => w += 1,
        }
    }
    w
}

/// Rows aligned in columns separated by two spaces; the last column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| width(s)).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(widths[i] - width(cell) + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// 1234567 -> "1.2 MB".
pub fn bytes(n: u64) -> String {
    match n {
        0..=999 => format!("{n} B"),
        1000..=999_999 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_ignoring_colour() {
        let rows = vec![
            vec!["ID".into(), "STATE".into(), "URL".into()],
            vec!["abc".into(), "\x1b[32mhealthy\x1b[0m".into(), "http://x".into()],
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "ID   STATE    URL");
        assert!(lines[1].ends_with("  http://x"));
        assert_eq!(width(&rows[1][1]), 7);
    }

    #[test]
    fn ages_and_sizes_read_well() {
        let now = Utc::now();
        assert_eq!(age(now - chrono::Duration::seconds(5), now), "5s ago");
        assert_eq!(age(now - chrono::Duration::hours(3), now), "3h ago");
        assert_eq!(age(now - chrono::Duration::days(9), now), "9d ago");
        assert_eq!(bytes(42_100_000), "42.1 MB");
        assert_eq!(bytes(12), "12 B");
    }
}
