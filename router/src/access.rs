//! The access log, off the request's path. Each worker thread appends its
//! lines (one JSON [`AccessLine`] each) to a buffer of its own, which it hands
//! whole to a writer thread once it holds [`FLUSH_BYTES`], and on the
//! worker's tick ([`FLUSH_EVERY`]) when it holds less. The hand-over is a
//! bounded queue: when the reader (the receiver, through a pipe) falls behind
//! and [`QUEUE`] batches wait, a further batch is dropped and its lines
//! counted ([`AccessLog::dropped`]), so a slow log never holds a request.
//! A request costs one serialization into memory the thread owns: no lock,
//! no system call.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nx_protocol::logs::AccessLine;

/// A worker hands its buffer over once it holds this much.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// How often each worker hands over what its buffer holds; the longest a
/// line waits in a quiet worker.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Batches waiting for the writer at most: with full batches, 4 MiB.
pub const QUEUE: usize = 64;

/// The process's access log: the writer thread's queue and what was dropped.
#[derive(Debug)]
pub struct AccessLog {
    /// Taken by [`AccessLog::close`], so the writer ends once the queue is empty.
    queue: Mutex<Option<SyncSender<Vec<u8>>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    dropped: AtomicU64,
}

/// One worker's lines not yet handed over.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

thread_local! {
    static BATCH: RefCell<Batch> = RefCell::default();
}

static LOG: OnceLock<AccessLog> = OnceLock::new();

impl AccessLog {
    /// An access log written to `out` by a thread of its own, through a
    /// queue of `queue` batches.
    pub fn new(mut out: Box<dyn Write + Send>, queue: usize) -> std::io::Result<AccessLog> {
        let (tx, rx) = sync_channel::<Vec<u8>>(queue);
        let writer = std::thread::Builder::new().name("nx-router-access".into()).spawn(move || {
            for batch in rx {
                // A reader that went away loses the lines; requests go on.
                let _ = out.write_all(&batch).and_then(|()| out.flush());
            }
        })?;
        Ok(AccessLog { queue: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)), dropped: AtomicU64::new(0) })
    }

    /// Lines dropped because the writer was behind (or closed).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Appends `line` to this thread's batch, handing the batch over when full.
    pub fn record(&self, line: &AccessLine<'_>) {
        BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            line.write_json(&mut batch.bytes);
            batch.bytes.push(b'\n');
            batch.lines += 1;
            if batch.bytes.len() >= FLUSH_BYTES {
                self.hand_over(&mut batch);
            }
        });
    }

    /// Hands this thread's batch over, whatever it holds.
    pub fn flush(&self) {
        BATCH.with(|batch| self.hand_over(&mut batch.borrow_mut()));
    }

    fn hand_over(&self, batch: &mut Batch) {
        if batch.lines == 0 {
            return;
        }
        let lines = std::mem::take(&mut batch.lines);
        let bytes = std::mem::replace(&mut batch.bytes, Vec::with_capacity(FLUSH_BYTES + 1024));
        let sent = match self.queue.lock() {
            Ok(queue) => match queue.as_ref().map(|q| q.try_send(bytes)) {
                Some(Ok(())) => true,
                Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => false,
            },
            Err(_) => false,
        };
        if !sent {
            self.dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }

    /// Stops taking batches and waits until the writer has written those queued.
    pub fn close(&self) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.take();
        }
        if let Some(writer) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = writer.join();
        }
    }
}

/// Makes `log` the process's access log (once; later calls keep the first).
pub fn install(log: AccessLog) {
    let _ = LOG.set(log);
}

/// The process's access log, when one is installed (not in unit tests of
/// the proxies, nor with `--access-log false`).
pub fn installed() -> Option<&'static AccessLog> {
    LOG.get()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::sync::mpsc::{channel, Receiver, Sender};

    /// A writer that passes each write on, and waits for `go` before the first.
    struct Gated {
        go: Option<Receiver<()>>,
        out: Sender<Vec<u8>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(go) = self.go.take() {
                let _ = go.recv();
            }
            let _ = self.out.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(n: usize) -> AccessLine<'static> {
        AccessLine {
            ts: 1_700_000_000_000_000,
            host: "web.localhost".into(),
            method: "GET".into(),
            path: Cow::Owned(format!("/{n}")),
            status: 200,
            app: "web".into(),
            deployment: "d1".into(),
            request_id: Cow::Owned(format!("r{n}")),
            client_request_id: None,
            micros: 10,
            bytes_in: 0,
            bytes_out: 2,
            error: None,
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_a_stuck_writer_drops_batches_with_a_count() {
        let (go_tx, go) = channel();
        let (out, written) = channel();
        let log = AccessLog::new(Box::new(Gated { go: Some(go), out }), 2)
            .unwrap_or_else(|e| panic!("cannot start the writer: {e}"));
        // Batch 1 is taken by the writer (stuck on `go`); 2 and 3 fill the
        // queue; 4 and 5 are dropped.
        for batch in 0..5 {
            for n in 0..3 {
                log.record(&line(batch * 3 + n));
            }
            log.flush();
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(log.dropped(), 6);
        go_tx.send(()).unwrap_or_else(|e| panic!("{e}"));
        log.close();
        let text: Vec<u8> = written.try_iter().flatten().collect();
        let text = String::from_utf8(text).unwrap_or_else(|e| panic!("{e}"));
        let paths: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<AccessLine<'_>>(l).map(|a| a.path.into_owned()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        let expected: Vec<String> = (0..9).map(|n| format!("/{n}")).collect();
        assert_eq!(paths, expected);
        assert_eq!(
            text.lines().next(),
            Some(
                r#"{"ts":1700000000000000,"host":"web.localhost","method":"GET","path":"/0","status":200,"app":"web","deployment":"d1","request_id":"r0","micros":10,"bytes_in":0,"bytes_out":2}"#
            )
        );
    }

    #[test]
    fn a_full_buffer_is_handed_over_without_waiting_for_the_tick() {
        let (out, written) = channel();
        let log = AccessLog::new(Box::new(Gated { go: None, out }), QUEUE).unwrap_or_else(|e| panic!("{e}"));
        let one = serde_json::to_vec(&line(0)).unwrap_or_default().len() + 1;
        let enough = FLUSH_BYTES / one + 1;
        for n in 0..enough {
            log.record(&line(n));
        }
        let batch = written.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| panic!("no batch: {e}"));
        assert!(batch.len() >= FLUSH_BYTES, "{}", batch.len());
        assert_eq!(log.dropped(), 0);
    }
}
