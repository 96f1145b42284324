//! The app's output as its shim takes it: split into lines (a line longer
//! than [`MAX_LINE`] in pieces, which the log cuts and marks), and read no
//! faster than a budget of lines and bytes a second.
//!
//! Writing a line costs the app a few bytes of a `write`; storing it costs
//! the shim a timestamp, a check for rotation and its share of a write, and
//! the shim runs as root outside the app's cgroup, so the app's CPU limit
//! does not cover it. Without a budget a megabyte of newlines was seconds
//! of the shim's CPU, and a pipe kept full kept the shim from answering its
//! receiver. The shim reads a bounded amount a turn ([`TURN_BYTES`]), finds
//! the lines in one pass, stores a turn's lines in one write, and once the
//! app has written more than [`LINES_PER_SECOND`] lines or
//! [`BYTES_PER_SECOND`] bytes a second (after a burst) it stops reading
//! until the budget allows again, within a turn too: the pipe fills and the
//! app's writes wait, so the cost of a flood falls on the app. A turn that
//! drains the pipe is followed by a pause ([`TURN_GAP`]), so tiny writes
//! are read together. The budget holds after the app has ended as well:
//! what it left in its pipe beyond it is not read.

use std::time::{Duration, Instant};

use crate::logs::MAX_LINE;

/// The most output the shim reads before it turns to its clients again.
pub const TURN_BYTES: usize = 256 * 1024;
/// Lines read a second, sustained: an app answering 10,000 requests a
/// second with a line each is not held back.
pub const LINES_PER_SECOND: f64 = 10_000.0;
/// Lines read at once after a quiet moment.
pub const LINES_BURST: f64 = 20_000.0;
/// Bytes read a second, sustained, and at once: storing costs the shim
/// about 10 ns a byte, so 2 MiB a second is about 2% of a CPU.
pub const BYTES_PER_SECOND: f64 = 2.0 * 1024.0 * 1024.0;
pub const BYTES_BURST: f64 = 8.0 * 1024.0 * 1024.0;
/// The least time between two turns that found the pipe drained: an app
/// writing a byte at a time wakes its shim at most 100 times a second, its
/// bytes read together.
pub const TURN_GAP: Duration = Duration::from_millis(10);

/// The output not yet stored and the budget left.
#[derive(Debug)]
pub struct Output {
    partial: Vec<u8>,
    lines: f64,
    bytes: f64,
    at: Instant,
}

impl Output {
    pub fn new(now: Instant) -> Output {
        Output { partial: Vec::new(), lines: LINES_BURST, bytes: BYTES_BURST, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.lines = (self.lines + elapsed * LINES_PER_SECOND).min(LINES_BURST);
        self.bytes = (self.bytes + elapsed * BYTES_PER_SECOND).min(BYTES_BURST);
        self.at = now;
    }

    /// How long until the shim may read again at `now`; `None`: now.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        let short = |left: f64, rate: f64| if left >= 1.0 { 0.0 } else { (1.0 - left) / rate };
        let secs = short(self.lines, LINES_PER_SECOND).max(short(self.bytes, BYTES_PER_SECOND));
        (secs > 0.0).then(|| Duration::from_secs_f64(secs))
    }

    /// Takes `bytes` read at `now` and returns every line they complete,
    /// without its newline; what they cost comes off the budget.
    pub fn take(&mut self, bytes: &[u8], now: Instant) -> Vec<String> {
        self.refill(now);
        self.bytes -= bytes.len() as f64;
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        let mut start = 0;
        loop {
            let rest = &self.partial[start..];
            let end = match memchr::memchr(b'\n', rest) {
                Some(i) if i <= MAX_LINE => i + 1,
                _ if rest.len() > MAX_LINE => MAX_LINE + 1,
                _ => break,
            };
            let line = &rest[..end];
            lines.push(String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line)).into_owned());
            start += end;
        }
        self.lines -= lines.len() as f64;
        // Once, however many lines: the rest is shorter than a line.
        self.partial.drain(..start);
        lines
    }

    /// An unfinished line left once the output has closed.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_whole_and_a_long_one_in_pieces() {
        let now = Instant::now();
        let mut out = Output::new(now);
        assert_eq!(out.take(b"one\ntw", now), ["one"]);
        assert_eq!(out.take(b"o\r\n", now), ["two\r"]);
        let long = vec![b'x'; MAX_LINE + 10];
        assert_eq!(out.take(&long, now), ["x".repeat(MAX_LINE + 1)]);
        assert_eq!(out.finish(), Some("x".repeat(9)));
        assert_eq!(out.finish(), None);
    }

    #[test]
    fn a_flood_stops_the_reading_until_the_budget_allows_and_loses_nothing() {
        let now = Instant::now();
        let mut out = Output::new(now);
        assert_eq!(out.wait(now), None);
        // A burst of lines: all of them taken, then a wait for the budget.
        let flood = vec![b'\n'; 30_000];
        assert_eq!(out.take(&flood, now).len(), 30_000);
        let wait = out.wait(now).expect("over the budget");
        // 10,001 lines short at 10,000 a second.
        assert!((Duration::from_millis(1000)..=Duration::from_millis(1001)).contains(&wait), "{wait:?}");
        assert_eq!(out.wait(now + wait), None);
        // Bytes count too: a few long lines use the byte budget first.
        let mut out = Output::new(now);
        let long = vec![b'y'; 9 << 20];
        assert_eq!(out.take(&long, now).len(), long.len() / (MAX_LINE + 1));
        assert!(out.wait(now).is_some_and(|w| w > Duration::from_millis(100)));
        assert_eq!(out.wait(now + Duration::from_secs(1)), None);
    }
}
