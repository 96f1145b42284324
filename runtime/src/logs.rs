//! Per-deployment logs: what the app prints (stdout and stderr, in order) and what
//! the supervisor says about it, one timestamped line each, in a size-capped file
//! that rotates, with a live feed for `nx logs -f`. Only the platform's lines
//! start with its mark (`nx_protocol::logs`): an app cannot print one.
//!
//! Two processes write a deployment's file: its shim (what the app prints, and
//! how it stopped) and the receiver (health, restarts). Each line is one
//! `write` in append mode, so lines never interleave, and a writer that finds
//! the file rotated by the other one follows it rather than rotating again.
//! The receiver's live feed therefore follows the file, not its own writes.
//!
//! Programs that outlive the receiver (PostgreSQL, nx-router) write into a
//! pipe read by a log keeper ([`Log::keeper`]): an `nx-shim --keep-log`
//! process of their own, which caps and rotates their log as the receiver
//! would, and which no receiver restart breaks.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nx_protocol::logs::{looks_like_platform, APP_MARK, PLATFORM_MARK};

use crate::process::{Command, ProcessManager, SpawnError, Stream};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::broadcast;

/// Longest line kept; longer ones are cut, so one runaway line cannot fill memory.
pub const MAX_LINE: usize = 16 * 1024;

/// How much log to keep per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Size at which the current file is rotated.
    pub max_file_bytes: u64,
    /// Rotated files kept (`.1` is the newest).
    pub keep_rotated: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self { max_file_bytes: 8 << 20, keep_rotated: 2 }
    }
}

struct Sink {
    path: PathBuf,
    file: File,
    written: u64,
    limits: LogLimits,
}

/// A deployment's log; cheap to clone.
#[derive(Clone)]
pub struct Log {
    sink: Arc<Mutex<Sink>>,
    live: broadcast::Sender<String>,
    /// Where the following of the file stands, when the live feed comes from
    /// following it (another process writes to it too) rather than from this
    /// handle's own writes.
    followed: Option<Arc<Mutex<Followed>>>,
}

/// How far a shared log's follower has read: the file it was opened on and
/// the offset there, and the file and offset up to which every whole line
/// has been sent to the live feed or skipped (nobody listening).
#[derive(Debug, Clone, Copy)]
struct Followed {
    opened: (u64, u64),
    sent: (u64, u64),
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").finish_non_exhaustive()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

impl Log {
    /// Opens (appending) the log at `path`.
    pub fn open(path: &Path, limits: LogLimits) -> io::Result<Log> {
        Self::open_with(path, limits, 1024)
    }

    /// Opens the log at `path` for a writer that keeps no live feed (a
    /// shim: nobody subscribes in its process, so it holds no queue).
    pub fn open_writer(path: &Path, limits: LogLimits) -> io::Result<Log> {
        Self::open_with(path, limits, 1)
    }

    /// Opens the log at `path`, which another process (the deployment's
    /// shim) writes too: the live feed follows the file, so it carries every
    /// line whoever wrote it. Needs a tokio runtime; the following stops when
    /// the last clone of the log is dropped.
    pub fn open_shared(path: &Path, limits: LogLimits) -> io::Result<Log> {
        let mut log = Self::open_with(path, limits, 1024)?;
        let start = std::fs::metadata(path)?;
        let at = (start.ino(), start.len());
        let followed = Arc::new(Mutex::new(Followed { opened: at, sent: at }));
        log.followed = Some(followed.clone());
        tokio::spawn(follow(path.to_owned(), followed, Arc::downgrade(&log.sink), log.live.clone()));
        Ok(log)
    }

    fn open_with(path: &Path, limits: LogLimits, capacity: usize) -> io::Result<Log> {
        let file = open_append(path)?;
        let written = file.metadata()?.len();
        let (live, _) = broadcast::channel(capacity);
        let sink = Sink { path: path.to_owned(), file, written, limits };
        Ok(Log { sink: Arc::new(Mutex::new(sink)), live, followed: None })
    }

    /// Where the log is stored.
    pub fn path(&self) -> PathBuf {
        self.sink.lock().map(|s| s.path.clone()).unwrap_or_default()
    }

    /// How much of it is kept.
    pub fn limits(&self) -> LogLimits {
        self.sink.lock().map(|s| s.limits).unwrap_or_default()
    }

    /// Appends one line of the app's output; one that would pass for the
    /// platform's is stored behind [`APP_MARK`].
    pub fn app_line(&self, line: &str) {
        self.write(&[app_text(line)]);
    }

    /// Appends one line from the platform, marked so users can tell it apart.
    pub fn system_line(&self, line: &str) {
        self.write(&[format!("{PLATFORM_MARK} {line}")]);
    }

    /// Appends lines of the app's output with one timestamp and one write:
    /// a shim stores a turn's lines at once.
    pub fn app_lines(&self, lines: &[String]) {
        let texts: Vec<String> = lines.iter().map(|l| app_text(l)).collect();
        self.write(&texts);
    }

    fn write(&self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let stamped: Vec<String> = lines.iter().map(|l| format!("{now} {}", cut(l))).collect();
        let Ok(mut sink) = self.sink.lock() else { return };
        if let Err(e) = sink.append(&stamped) {
            tracing::warn!(path = %sink.path.display(), error = %e, "cannot write log");
        }
        drop(sink);
        if self.followed.is_none() {
            for line in stamped {
                // Nobody listening is fine.
                let _ = self.live.send(line);
            }
        }
    }

    /// A feed of every line written from now on, and the stored lines
    /// written since this handle opened the log that the feed will not
    /// carry (at most `max_bytes` of them, the newest): what a reader that
    /// comes late but must miss nothing of this life takes, as the log
    /// drains do, which look for new deployments once a second. Only a
    /// shared log keeps the place it was opened at; others give no lines.
    pub fn subscribe_since_open(&self, max_bytes: u64) -> (Vec<String>, broadcast::Receiver<String>) {
        let Some(followed) = &self.followed else { return (Vec::new(), self.subscribe()) };
        // The follower sends under this lock: nothing is sent between the
        // reading of the file and the subscription, so nothing is had twice.
        let Ok(at) = followed.lock() else { return (Vec::new(), self.subscribe()) };
        let feed = self.subscribe();
        let (ino, from) = at.opened;
        // After a rotation the opened file has another name: its lines are
        // left out rather than looked for.
        let same = std::fs::metadata(self.path()).is_ok_and(|m| m.ino() == ino);
        if !same || at.sent.0 != ino || at.sent.1 <= from {
            return (Vec::new(), feed);
        }
        let from = from.max(at.sent.1.saturating_sub(max_bytes));
        let bytes = read_between(&self.path(), from, at.sent.1).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        // A cut at `max_bytes` may fall inside a line: drop its head.
        let whole = if from > at.opened.1 { text.split_once('\n').map_or("", |(_, rest)| rest) } else { &text };
        (whole.lines().map(str::to_owned).collect(), feed)
    }

    /// The last `n` lines stored (without timestamps), oldest first, whoever
    /// wrote them.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let Ok(sink) = self.sink.lock() else { return Vec::new() };
        let lines = read_recent(&sink.path, n, sink.limits.keep_rotated).unwrap_or_default();
        lines.into_iter().map(|l| l.split_once(' ').map_or(l.clone(), |(_, text)| text.to_owned())).collect()
    }

    /// A feed of every line written from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.live.subscribe()
    }

    /// The last `n` lines stored (with rotated files, `keep_rotated` of
    /// them), a feed of the lines written from now on, and how many of the
    /// feed's first lines to skip because the stored lines already hold
    /// them: together every line once, in order. A shared log's follower
    /// sends a line up to 100 ms after it was written; taken under its
    /// lock, the count is exact. (Read without it, a line written a moment
    /// before came again after the newer ones it preceded.)
    pub fn tail_then_follow(&self, n: usize, keep_rotated: u32) -> (Vec<String>, broadcast::Receiver<String>, usize) {
        let path = self.path();
        let Some(Ok(at)) = self.followed.as_ref().map(|f| f.lock()) else {
            let feed = self.subscribe();
            return (read_recent(&path, n, keep_rotated).unwrap_or_default(), feed, 0);
        };
        let feed = self.subscribe();
        // The follower's place is at the start of a line of the current
        // file, unless a rotation came since: then the stored lines are
        // read whole and nothing is skipped.
        let (ino, sent) = at.sent;
        let unsent = match std::fs::metadata(&path) {
            Ok(m) if m.ino() == ino => read_between(&path, sent, m.len().max(sent)).unwrap_or_default(),
            _ => return (read_recent(&path, n, keep_rotated).unwrap_or_default(), feed, 0),
        };
        // Whole lines only: an unfinished one is the feed's once it ends.
        let whole = unsent.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let skip = unsent[..whole].iter().filter(|b| **b == b'\n').count();
        let stored = recent_lines(&path, n, keep_rotated, Some(sent + whole as u64)).unwrap_or_default();
        (stored, feed, skip)
    }

    /// Starts a keeper of this log (`shim` is the nx-shim program) and
    /// returns the writable end of its pipe, to become a long-lived
    /// program's stdout and stderr. The keeper runs in its own session
    /// without a parent-death signal, so it outlives the receiver, and ends
    /// when the last writer closes the pipe (the program and its children
    /// have exited).
    pub async fn keeper(&self, pm: &ProcessManager, shim: &Path) -> Result<OwnedFd, SpawnError> {
        let limits = self.limits();
        let mut cmd = Command::new(shim).args([
            "--keep-log".into(),
            self.path().into_os_string(),
            limits.max_file_bytes.to_string().into(),
            limits.keep_rotated.to_string().into(),
        ]);
        cmd.stdin = Stream::Pipe;
        cmd.new_session = true;
        let mut child = pm.spawn(cmd).await?;
        child.stdin.take().ok_or_else(|| SpawnError::Start {
            program: shim.display().to_string(),
            source: io::Error::other("no pipe to its stdin"),
        })
    }

    /// Copies the lines of `fd` (a pipe) into the log until it closes.
    pub async fn pump(&self, fd: OwnedFd) {
        self.pump_with(fd, |_| {}).await
    }

    /// [`Log::pump`], also handing each line (without its newline) to `each`.
    pub async fn pump_with(&self, fd: OwnedFd, mut each: impl FnMut(&str)) {
        let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else { return };
        // `take` bounds each read so a line without newline cannot grow forever.
        let mut reader = tokio::io::BufReader::new(pipe);
        let mut buf = Vec::with_capacity(256);
        loop {
            buf.clear();
            match (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    self.app_line(&line);
                    each(line.trim_end_matches(['\r', '\n']));
                }
            }
        }
    }
}

/// The text stored for a line of the app's: one that would pass for the
/// platform's goes behind [`APP_MARK`].
fn app_text(line: &str) -> String {
    // Without its line ending, a control character that would send every
    // line through the Unicode fold of the check.
    let line = line.trim_end_matches(['\r', '\n']);
    if looks_like_platform(line) {
        format!("{APP_MARK} {line}")
    } else {
        line.to_owned()
    }
}

/// `line` without its line ending, cut at [`MAX_LINE`] (saying so).
fn cut(line: &str) -> std::borrow::Cow<'_, str> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.len() <= MAX_LINE {
        return line.into();
    }
    let mut at = MAX_LINE;
    while !line.is_char_boundary(at) {
        at -= 1;
    }
    format!("{} [line cut]", &line[..at]).into()
}

impl Sink {
    /// Appends `lines`, each with its newline, in one write.
    fn append(&mut self, lines: &[String]) -> io::Result<()> {
        let mut record = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            record.push_str(line);
            record.push('\n');
        }
        // The other writer may have rotated the file: then write to the new one.
        let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        if current != Some(self.file.metadata()?.ino()) {
            self.file = open_append(&self.path)?;
            self.written = self.file.metadata()?.len();
        }
        if self.written + record.len() as u64 > self.limits.max_file_bytes && self.written > 0 {
            // The other writer's lines count too.
            self.written = self.file.metadata()?.len();
            if self.written + record.len() as u64 > self.limits.max_file_bytes {
                self.rotate()?;
                self.written = 0;
            }
        }
        // One write in append mode: a line never interleaves with another
        // process's.
        self.file.write_all(record.as_bytes())?;
        self.written += record.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.limits.keep_rotated;
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(rotated(&self.path, keep));
            for i in (1..keep).rev() {
                let _ = std::fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1));
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = open_append(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

/// A log keeper's loop (`nx-shim --keep-log PATH MAX_FILE_BYTES KEEP`):
/// copies the lines of `input` into the log at `path`, each cut at
/// [`MAX_LINE`], until `input` closes.
pub fn keep(input: impl Read, path: &Path, limits: LogLimits) -> io::Result<()> {
    let log = Log::open_writer(path, limits)?;
    let mut reader = BufReader::new(input);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        match (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => log.app_line(&String::from_utf8_lossy(&buf)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends every line appended to the log at `path` (from where `followed`
/// says it was opened) to `live`, following rotations, while the log and a
/// subscriber exist; records in `followed` how far it has sent.
async fn follow(
    path: PathBuf,
    followed: Arc<Mutex<Followed>>,
    sink: std::sync::Weak<Mutex<Sink>>,
    live: broadcast::Sender<String>,
) {
    let mut partial: Vec<u8> = Vec::new();
    // The file being read, held open: what was appended to it before a
    // rotation is read through it whatever it is called by then.
    let mut current: Option<(u64, File)> = None;
    let at = followed.lock().map(|f| f.opened).unwrap_or_default();
    let mut offset = at.1;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if sink.strong_count() == 0 {
            return;
        }
        let Ok(mut place) = followed.lock() else { return };
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if live.receiver_count() == 0 {
            // Nobody follows: skip what was written meanwhile.
            current = None;
            offset = meta.len();
            partial.clear();
            place.sent = (meta.ino(), offset);
            continue;
        }
        let ino = current.as_ref().map_or(at.0, |(i, _)| *i);
        if current.is_none() {
            current = File::open(&path).ok().filter(|f| f.metadata().is_ok_and(|m| m.ino() == ino)).map(|f| (ino, f));
            if current.is_none() {
                offset = 0;
            }
        }
        if meta.ino() != ino {
            // Rotated: the rest of the file read so far, then any rotated
            // file newer than it, then the new one from its start.
            if let Some((_, file)) = &mut current {
                send_lines(&live, &mut partial, &read_rest(file, offset));
            }
            let keep = sink.upgrade().and_then(|s| s.lock().ok().map(|s| s.limits.keep_rotated)).unwrap_or(0);
            let rotated_files: Vec<PathBuf> = (1..=keep).map(|i| rotated(&path, i)).collect();
            if let Some(pos) = rotated_files.iter().position(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == ino)) {
                for newer in rotated_files[..pos].iter().rev() {
                    send_lines(&live, &mut partial, &read_from(newer, 0).unwrap_or_default());
                }
            }
            current = File::open(&path).ok().and_then(|f| f.metadata().ok().map(|m| (m.ino(), f)));
            offset = 0;
        }
        if let Some((_, file)) = &mut current {
            let new = read_rest(file, offset);
            offset += new.len() as u64;
            send_lines(&live, &mut partial, &new);
        }
        let ino = current.as_ref().map_or(meta.ino(), |(i, _)| *i);
        place.sent = (ino, offset - partial.len() as u64);
    }
}

fn read_rest(file: &mut File, offset: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_ok() {
        let _ = file.read_to_end(&mut buf);
    }
    buf
}

/// The bytes of the file at `path` from `from` to `to`.
fn read_between(path: &Path, from: u64, to: u64) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.take(to - from).read_to_end(&mut buf)?;
    Ok(buf)
}

fn read_from(path: &Path, offset: u64) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

fn send_lines(live: &broadcast::Sender<String>, partial: &mut Vec<u8>, bytes: &[u8]) {
    partial.extend_from_slice(bytes);
    while let Some(end) = partial.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = partial.drain(..=end).collect();
        let _ = live.send(String::from_utf8_lossy(&line[..end]).into_owned());
    }
}

fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// The last `n` lines stored at `path`, reading into rotated files when the
/// current one has fewer.
pub fn read_recent(path: &Path, n: usize, keep_rotated: u32) -> io::Result<Vec<String>> {
    recent_lines(path, n, keep_rotated, None)
}

/// [`read_recent`] with the current file read up to byte `end` only.
fn recent_lines(path: &Path, n: usize, keep_rotated: u32, end: Option<u64>) -> io::Result<Vec<String>> {
    use std::io::Read;
    let mut files = vec![path.to_owned()];
    files.extend((1..=keep_rotated).map(|i| rotated(path, i)));
    let mut lines: VecDeque<String> = VecDeque::new();
    for (i, file) in files.into_iter().enumerate() {
        if lines.len() >= n {
            break;
        }
        let f = match File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let limit = if i == 0 { end.unwrap_or(u64::MAX) } else { u64::MAX };
        let mut chunk: Vec<String> = BufReader::new(f.take(limit)).lines().map_while(Result::ok).collect();
        chunk.reverse();
        for line in chunk {
            if lines.len() >= n {
                break;
            }
            lines.push_front(line);
        }
    }
    Ok(lines.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nx-logs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("d.log")
    }

    /// The text of stored lines, without their timestamps.
    fn texts(lines: &[String]) -> Vec<&str> {
        lines.iter().map(|l| l.split_once(' ').map_or(l.as_str(), |(_, text)| text)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_follow_from_the_tail_has_every_line_once_and_in_order() {
        let path = temp("tail-follow");
        let shared = Log::open_shared(&path, LogLimits::default()).unwrap();
        // The shim's handle on the same file.
        let shim = Log::open_writer(&path, LogLimits::default()).unwrap();
        let mut listening = shared.subscribe();
        for i in 0..4 {
            shim.app_line(&format!("old {i}"));
        }
        for i in 0..4 {
            assert_eq!(listening.recv().await.unwrap().split_once(' ').unwrap().1, format!("old {i}"));
        }
        // Written since the follower's last read (time stands still until
        // this task waits): stored, not sent yet.
        for i in 0..3 {
            shim.app_line(&format!("new {i}"));
        }
        let (stored, mut feed, skip) = shared.tail_then_follow(2, 0);
        assert_eq!(texts(&stored), ["new 1", "new 2"]);
        assert_eq!(skip, 3, "the feed's first three lines are the stored ones");
        shim.app_line("after");
        let mut fed = Vec::new();
        while fed.len() < skip + 1 {
            fed.push(feed.recv().await.unwrap());
        }
        assert_eq!(texts(&fed[skip..]), ["after"]);
        assert_eq!(texts(&fed[..skip]), ["new 0", "new 1", "new 2"]);
    }

    #[test]
    fn a_keeper_caps_lines_and_rotates_until_its_input_closes() {
        let path = temp("keeper");
        let long = "y".repeat(MAX_LINE + 100);
        let input = format!("first\n{long}\n{long}\nlast without newline");
        keep(input.as_bytes(), &path, LogLimits { max_file_bytes: 20_000, keep_rotated: 1 }).unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        let older = std::fs::read_to_string(rotated(&path, 1)).unwrap();
        // Each long line was cut at MAX_LINE and the rest of it arrived as
        // a line of its own; the second one did not fit in the first file.
        let cut = format!(" {} [line cut]\n", "y".repeat(MAX_LINE));
        assert!(older.contains(" first\n") && older.contains(&cut), "{}", older.len());
        assert!(current.contains(&cut), "{}", current.len());
        assert!(current.ends_with(" last without newline\n"), "{current}");
        assert!(!rotated(&path, 2).exists());
    }

    #[test]
    fn lines_are_stamped_and_tailed() {
        let path = temp("tail");
        let log = Log::open(&path, LogLimits::default()).unwrap();
        log.app_line("hello\n");
        log.system_line("exited with status 1");
        assert_eq!(log.tail(5), ["hello", "[nx] exited with status 1"]);
        let stored = read_recent(&path, 10, 2).unwrap();
        assert_eq!(stored.len(), 2);
        assert!(stored[0].ends_with("Z hello"), "{}", stored[0]);
        assert!(stored[0].starts_with("20"), "{}", stored[0]);
    }

    #[test]
    fn an_app_cannot_print_a_platform_line() {
        let path = temp("forged");
        let log = Log::open(&path, LogLimits::default()).unwrap();
        log.app_line("[nx] healthy on 127.0.0.1:1");
        log.app_line("\u{1b}[2K[nx] exited with status 0");
        log.app_line("says [nx] in the middle");
        log.system_line("healthy on 127.0.0.1:2");
        assert_eq!(
            log.tail(4),
            [
                "[app] [nx] healthy on 127.0.0.1:1",
                "[app] \u{1b}[2K[nx] exited with status 0",
                "says [nx] in the middle",
                "[nx] healthy on 127.0.0.1:2"
            ]
        );
        let platform: Vec<String> = read_recent(&path, 10, 2)
            .unwrap()
            .into_iter()
            .filter_map(|l| l.split_once(' ').map(|(_, text)| text.to_owned()))
            .filter(|text| text.starts_with(PLATFORM_MARK))
            .collect();
        assert_eq!(platform, ["[nx] healthy on 127.0.0.1:2"]);
    }

    #[test]
    fn files_rotate_and_stay_bounded() {
        let path = temp("rotate");
        let limits = LogLimits { max_file_bytes: 1000, keep_rotated: 2 };
        let log = Log::open(&path, limits).unwrap();
        for i in 0..500 {
            log.app_line(&format!("line {i:04}"));
        }
        let dir = path.parent().unwrap();
        let total: u64 = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(total <= 3 * 1000, "{total} bytes kept");
        assert!(!rotated(&path, 3).exists());
        let recent = read_recent(&path, 40, 2).unwrap();
        assert_eq!(recent.len(), 40);
        assert!(recent.last().unwrap().ends_with("line 0499"));
        // Across the rotation boundary the order stays oldest first.
        let numbers: Vec<u32> = recent.iter().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    }

    #[test]
    fn long_lines_are_cut() {
        let path = temp("long");
        let log = Log::open(&path, LogLimits::default()).unwrap();
        log.app_line(&"é".repeat(MAX_LINE));
        let tail = log.tail(1);
        assert!(tail[0].ends_with("[line cut]"));
        assert!(tail[0].len() <= MAX_LINE + 20);
    }

    #[tokio::test]
    async fn a_shared_log_feeds_the_other_writers_lines_across_rotations() {
        let path = temp("shared");
        let limits = LogLimits { max_file_bytes: 400, keep_rotated: 2 };
        let receiver = Log::open_shared(&path, limits).unwrap();
        let mut feed = receiver.subscribe();
        // The shim's handle, as another process would hold it.
        let shim = Log::open_writer(&path, limits).unwrap();
        for i in 0..20 {
            shim.app_line(&format!("app line {i:02}"));
            if i % 5 == 0 {
                receiver.system_line(&format!("platform line {i:02}"));
            }
            // The feed polls the file; a rotation at a time between polls.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        let mut seen = Vec::new();
        while seen.len() < 24 {
            let line = tokio::time::timeout(std::time::Duration::from_secs(5), feed.recv()).await.unwrap().unwrap();
            seen.push(line.split_once(' ').unwrap().1.to_owned());
        }
        let apps: Vec<&String> = seen.iter().filter(|l| l.starts_with("app line")).collect();
        assert_eq!(apps.len(), 20, "{seen:?}");
        assert!(apps.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
        assert!(seen.contains(&"[nx] platform line 15".to_owned()), "{seen:?}");
        // Every line is whole in the files, and the tail reads them back.
        let stored = read_recent(&path, 100, 2).unwrap();
        assert!(stored.iter().all(|l| l.ends_with(|c: char| c.is_ascii_digit())), "{stored:?}");
        assert_eq!(receiver.tail(1), ["app line 19"]);
    }

    #[tokio::test]
    async fn a_late_reader_gets_the_lines_since_the_log_opened_once_each() {
        let path = temp("since-open");
        let shim = Log::open_writer(&path, LogLimits::default()).unwrap();
        shim.app_line("an earlier life");
        let receiver = Log::open_shared(&path, LogLimits::default()).unwrap();
        for i in 0..3 {
            shim.app_line(&format!("first {i}"));
        }
        // The follower has passed them with nobody listening.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (earlier, mut feed) = receiver.subscribe_since_open(1 << 20);
        let text: Vec<&str> = earlier.iter().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(text, ["first 0", "first 1", "first 2"]);
        shim.app_line("later");
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), feed.recv()).await.unwrap().unwrap();
        assert!(next.ends_with(" later"), "{next}");
        // A budget smaller than the lines keeps the newest whole ones.
        let (newest, _) = receiver.subscribe_since_open(40);
        assert_eq!(newest.len(), 1, "{newest:?}");
        assert!(newest[0].ends_with(" later"), "{newest:?}");
        // A log opened for writing alone has no place to read back from.
        assert!(shim.subscribe_since_open(1 << 20).0.is_empty());
    }

    #[tokio::test]
    async fn live_feed_sees_new_lines() {
        let path = temp("live");
        let log = Log::open(&path, LogLimits::default()).unwrap();
        let mut feed = log.subscribe();
        log.app_line("one");
        assert!(feed.recv().await.unwrap().ends_with(" one"));
    }
}
