//! The app's output as its shim takes it: split into lines (a line longer
//! than [`MAX_LINE`] in pieces, which the log cuts and marks), and held to a
//! budget of lines per second.
//!
//! Writing a line costs the app a few bytes of a `write`; storing it costs
//! the shim a timestamp, a check for rotation and a write of its own, and
//! the shim runs as root outside the app's cgroup, so the app's CPU limit
//! does not cover it. Without a budget a megabyte of newlines was seconds
//! of the shim's CPU, and a pipe kept full kept the shim from answering its
//! receiver. The shim reads a bounded amount a turn ([`TURN_BYTES`]), finds
//! the lines in one pass, stores at most [`LINES_PER_SECOND`] a second
//! (after a burst of [`LINES_BURST`]) and counts the rest, and says how many
//! it dropped before the next line it stores: nothing goes missing
//! silently, and the app is never blocked on its output.

use std::time::Instant;

use crate::logs::MAX_LINE;

/// The most output the shim reads before it turns to its clients again.
pub const TURN_BYTES: usize = 256 * 1024;
/// Lines stored a second, sustained: an app answering 10,000 requests a
/// second with a line each is not cut.
pub const LINES_PER_SECOND: f64 = 10_000.0;
/// Lines stored at once after a quiet moment.
pub const LINES_BURST: f64 = 20_000.0;

/// What the shim stores, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    /// A line of the app's, without its newline.
    Line(String),
    /// This many lines were dropped before the next one.
    Dropped(u64),
}

/// The output not yet stored and the budget.
#[derive(Debug)]
pub struct Output {
    partial: Vec<u8>,
    tokens: f64,
    at: Instant,
    dropped: u64,
}

impl Output {
    pub fn new(now: Instant) -> Output {
        Output { partial: Vec::new(), tokens: LINES_BURST, at: now, dropped: 0 }
    }

    /// Takes `bytes` read at `now` and returns what to store: every line they
    /// complete that the budget allows, each after the count of those
    /// dropped before it.
    pub fn take(&mut self, bytes: &[u8], now: Instant) -> Vec<Entry> {
        self.partial.extend_from_slice(bytes);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * LINES_PER_SECOND).min(LINES_BURST);
        self.at = now;
        let mut entries = Vec::new();
        let mut start = 0;
        loop {
            let rest = &self.partial[start..];
            let end = match memchr::memchr(b'\n', rest) {
                Some(i) if i <= MAX_LINE => i + 1,
                _ if rest.len() > MAX_LINE => MAX_LINE + 1,
                _ => break,
            };
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                if self.dropped > 0 {
                    entries.push(Entry::Dropped(std::mem::take(&mut self.dropped)));
                }
                entries.push(Entry::Line(String::from_utf8_lossy(&rest[..end]).into_owned()));
            } else {
                self.dropped += 1;
            }
            start += end;
        }
        // Once, however many lines: the rest is shorter than a line.
        self.partial.drain(..start);
        entries
    }

    /// What is left once the output has closed: an unfinished line (stored
    /// whatever the budget, being one) and the count of lines dropped.
    pub fn finish(&mut self) -> Vec<Entry> {
        let mut entries = Vec::new();
        if self.dropped > 0 {
            entries.push(Entry::Dropped(std::mem::take(&mut self.dropped)));
        }
        if !self.partial.is_empty() {
            entries.push(Entry::Line(String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned()));
        }
        entries
    }
}

/// The platform's line about `n` dropped lines.
pub fn dropped_line(n: u64) -> String {
    format!("{n} lines of the app's output dropped: it wrote more than {LINES_PER_SECOND} lines a second")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn lines(entries: &[Entry]) -> usize {
        entries.iter().filter(|e| matches!(e, Entry::Line(_))).count()
    }

    #[test]
    fn lines_are_split_whole_and_a_long_one_in_pieces() {
        let now = Instant::now();
        let mut out = Output::new(now);
        assert_eq!(out.take(b"one\ntw", now), [Entry::Line("one\n".into())]);
        assert_eq!(out.take(b"o\n", now), [Entry::Line("two\n".into())]);
        let long = vec![b'x'; MAX_LINE + 10];
        let entries = out.take(&long, now);
        assert_eq!(entries, [Entry::Line("x".repeat(MAX_LINE + 1))]);
        assert_eq!(out.finish(), [Entry::Line("x".repeat(9))]);
    }

    #[test]
    fn a_flood_is_stored_to_the_budget_and_every_dropped_line_counted() {
        let now = Instant::now();
        let mut out = Output::new(now);
        let flood = vec![b'\n'; 1_000_000];
        let first = out.take(&flood, now);
        assert_eq!(lines(&first), LINES_BURST as usize);
        // A second later the budget has a second's lines again, and the
        // count of the dropped ones comes before the first line stored.
        let later = out.take(b"after\n", now + Duration::from_secs(1));
        assert_eq!(later, [Entry::Dropped(1_000_000 - LINES_BURST as u64), Entry::Line("after\n".into())]);
        // Dropped at the end: counted when the output closes.
        let again = out.take(&flood, now + Duration::from_secs(1));
        let stored = lines(&again) as u64;
        assert!(stored < LINES_PER_SECOND as u64, "{stored}");
        assert_eq!(out.finish(), [Entry::Dropped(1_000_000 - stored)]);
    }
}
