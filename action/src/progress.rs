//! Progress of long work on stderr: a bar on a terminal, a few plain lines
//! otherwise (CI logs), never on stdout, which carries results.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Byte progress of an upload, then a spinner while the server works.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    position: Arc<AtomicU64>,
    /// Last quarter reported in plain mode.
    reported: Arc<AtomicU64>,
    after: &'static str,
}

impl Progress {
    /// `after` is what the spinner says once every byte is sent.
    pub fn upload(total: u64, after: &'static str, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}") {
                bar.set_style(style);
            }
            bar.set_message("uploading");
            bar
        });
        let reported = if quiet { 4 } else { 0 };
        Progress { bar, total, position: Arc::default(), reported: Arc::new(AtomicU64::new(reported)), after }
    }

    pub fn advance(&self, n: u64) {
        let pos = self.position.fetch_add(n, Ordering::Relaxed) + n;
        match &self.bar {
            Some(bar) => bar.set_position(pos),
            None => {
                let quarter = (pos * 4).checked_div(self.total).unwrap_or(4);
                let seen = self.reported.load(Ordering::Relaxed);
                if quarter > seen
                    && self.reported.compare_exchange(seen, quarter, Ordering::Relaxed, Ordering::Relaxed).is_ok()
                {
                    eprintln!("uploaded {}% ({pos} of {} bytes)", quarter * 25, self.total);
                }
            }
        }
    }

    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Relaxed)
    }

    /// Every byte is sent: switch to a spinner.
    pub fn finish_upload(&self) {
        match &self.bar {
            Some(bar) => {
                if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                    bar.set_style(style);
                }
                bar.set_message(self.after);
                bar.enable_steady_tick(Duration::from_millis(100));
            }
            None => {
                if self.reported.swap(5, Ordering::Relaxed) < 5 {
                    eprintln!("{}", self.after);
                }
            }
        }
    }

    pub fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
