//! Log drains: each app's output (its sandboxes' stdout and stderr lines and
//! the platform's lines about them), its platform events (the audit log's
//! rows) and the router's access log lines for it, shipped off the host as
//! RFC 5424 syslog over TCP or TLS (octet-counting framing, RFC 6587/5425)
//! or as NDJSON batches POSTed over HTTPS. A drain is an app's, or
//! platform-wide (the admin's), which gets every app's records and the
//! platform's own events.
//!
//! Nothing here waits on a drain: each has a bounded queue
//! (`--drain-buffer` records and `--drain-buffer-mib` of them, whichever
//! is reached first); when it is full the oldest record is dropped
//! and counted ([`DrainStats::dropped`], exported in /metrics), so a drain
//! that is down or slow costs memory up to its bound and never holds an app,
//! the router or the API. The sources are read from feeds that drop for a
//! lagging reader too (the deployment log's live feed, the router's access
//! pipe), counted in [`Hub::lagged`]. What the queues hold at a graceful
//! stop is kept for the next start ([`spool`]).

pub mod send;
pub mod spool;
pub mod target;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nx_protocol::api::EventInfo;
use nx_protocol::logs::AccessLine;
use tokio::sync::{broadcast, watch, Notify};

use crate::db::{Db, DrainRow};
use crate::deploy::Deployer;
use crate::secrets::MasterKey;
use target::Target;

/// How often new deployments and new audit events are looked for.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How much of what a deployment printed before the drains found it is
/// read back from its log, at most.
const EARLIER_LINES_BYTES: u64 = 1 << 20;

/// Polls between two readings of the drains from the database.
const RELOAD_EVERY_POLLS: u32 = 30;

/// Audit events read per poll at most.
const EVENTS_PER_POLL: i64 = 500;

/// How long an id skipped by the audit log's reading is looked for again:
/// ids come from a sequence, so a transaction that took its id before a
/// concurrent one can commit after it; an id that never shows up is one
/// whose transaction rolled back.
const GAP_WAIT: Duration = Duration::from_secs(120);

/// Skipped ids looked for at most (the oldest forgotten first).
const MAX_GAPS: usize = 10_000;

/// Where the drains' reading of the audit log stands: the highest id read,
/// and the ids below it not read yet, each with when it was first skipped.
#[derive(Debug)]
struct EventCursor {
    last: i64,
    gaps: std::collections::BTreeMap<i64, std::time::Instant>,
}

impl EventCursor {
    fn new(last: i64) -> EventCursor {
        EventCursor { last, gaps: Default::default() }
    }

    /// The skipped ids to read again.
    fn gaps(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }

    /// Takes the ids of a reading (oldest first) made at `now`: each is
    /// either above `last`, and the ids it passes over become gaps, or a gap
    /// filled. Gaps older than [`GAP_WAIT`] are given up.
    fn read(&mut self, ids: impl IntoIterator<Item = i64>, now: std::time::Instant) {
        for id in ids {
            if id > self.last {
                let from = (self.last + 1).max(id.saturating_sub(MAX_GAPS as i64));
                for skipped in from..id {
                    self.gaps.insert(skipped, now);
                }
                self.last = id;
            } else {
                self.gaps.remove(&id);
            }
        }
        self.gaps.retain(|_, since| now.duration_since(*since) < GAP_WAIT);
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
    }
}

/// Which stream a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A line of a deployment's log: what the app printed, or the platform's
    /// line about it (`[nx] ...`).
    App,
    /// A row of the audit log.
    Event,
    /// A line of the router's access log.
    Access,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::App => "app",
            Source::Event => "event",
            Source::Access => "access",
        }
    }
}

/// One record shipped to drains.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub at: DateTime<Utc>,
    /// None for a platform event of no app.
    pub app: Option<String>,
    pub deployment: Option<String>,
    pub source: Source,
    /// The line as syslog carries it.
    pub message: String,
    /// The structured form NDJSON carries beside the message (the access
    /// line, the event), when there is one.
    pub fields: Option<serde_json::Value>,
}

impl Record {
    /// A stored log line (`<timestamp> <text>`) of `deployment`.
    pub fn app_line(app: &str, deployment: &str, stored: &str) -> Record {
        let (at, text) = match stored.split_once(' ') {
            Some((ts, text)) => match DateTime::parse_from_rfc3339(ts) {
                Ok(at) => (at.with_timezone(&Utc), text),
                Err(_) => (Utc::now(), stored),
            },
            None => (Utc::now(), stored),
        };
        Record {
            at,
            app: Some(app.to_owned()),
            deployment: Some(deployment.to_owned()),
            source: Source::App,
            message: text.to_owned(),
            fields: None,
        }
    }

    /// The bytes the record holds, as counted against `--drain-buffer-mib`:
    /// its strings, its structured fields as they serialise (an access
    /// line holds its path and host twice) and a fixed share for the
    /// allocations themselves.
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = 128;
        let fields = self.fields.as_ref().map_or(0, |f| serde_json::to_string(f).map_or(0, |s| s.len()));
        OVERHEAD
            + self.message.len()
            + fields
            + self.app.as_ref().map_or(0, String::len)
            + self.deployment.as_ref().map_or(0, String::len)
    }

    /// A row of the audit log.
    pub fn event(e: &EventInfo) -> Record {
        Record {
            at: e.at,
            app: e.app.clone(),
            deployment: e.deployment.clone(),
            source: Source::Event,
            message: format!("{} by {} {}", e.kind, e.actor, e.detail),
            fields: serde_json::to_value(e).ok(),
        }
    }

    /// A line of the router's access log.
    pub fn access(line: &AccessLine<'_>) -> Record {
        let at = DateTime::from_timestamp_micros(line.ts as i64).unwrap_or_else(Utc::now);
        let mut message = format!(
            "{} {} {} {} {}us in={} out={} request_id={}",
            line.host, line.method, line.path, line.status, line.micros, line.bytes_in, line.bytes_out, line.request_id
        );
        if let Some(e) = &line.error {
            message.push_str(&format!(" error={e:?}"));
        }
        Record {
            at,
            app: Some(line.app.clone().into_owned()),
            deployment: Some(line.deployment.clone().into_owned()),
            source: Source::Access,
            message,
            fields: serde_json::to_value(line).ok(),
        }
    }
}

/// One drain's figures, for /metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainStats {
    pub id: String,
    /// None for a platform-wide drain.
    pub app: Option<String>,
    /// Records taken into its queue.
    pub queued: u64,
    /// Records written to the drain.
    pub sent: u64,
    /// Records dropped: the oldest, when the queue was full (in records or
    /// in bytes).
    pub dropped: u64,
    /// Records waiting now.
    pub waiting: u64,
    /// Whether the last attempt to ship reached the drain.
    pub up: bool,
}

/// What drains are allowed to reach and hold.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Records one drain holds while it is down or slow.
    pub buffer: usize,
    /// Bytes of records ([`Record::weight`]) one drain holds at most: the
    /// record bound alone lets 16 KiB lines pin 160 MiB per drain.
    pub buffer_bytes: usize,
    /// Which non-public addresses drains may reach.
    pub reach: target::Reach,
    /// PEM certificates trusted beside the system's roots (tests, private CAs).
    pub extra_roots: Option<Vec<u8>>,
    /// The name syslog messages carry as HOSTNAME.
    pub hostname: String,
    /// Where the drains' queues are kept across a restart ([`spool`]).
    pub spool: std::path::PathBuf,
}

/// The records a queue holds, each with its weight, and their sum.
#[derive(Debug, Default)]
struct Held {
    records: VecDeque<(Arc<Record>, usize)>,
    bytes: usize,
}

impl Held {
    fn pop_front(&mut self) {
        if let Some((_, weight)) = self.records.pop_front() {
            self.bytes -= weight;
        }
    }
}

/// A drain's queue: bounded in records and in bytes, the oldest dropped
/// first.
#[derive(Debug, Default)]
struct Queue {
    held: Mutex<Held>,
    ready: Notify,
    queued: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    up: std::sync::atomic::AtomicBool,
}

impl Queue {
    /// Queues `record` of `weight` bytes, dropping the oldest until both
    /// `cap` records and `cap_bytes` hold. A record heavier than `cap_bytes`
    /// alone is dropped itself rather than emptying the queue for it.
    fn push(&self, record: Arc<Record>, weight: usize, cap: usize, cap_bytes: usize) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if weight > cap_bytes {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(mut held) = self.held.lock() else { return };
        while !held.records.is_empty() && (held.records.len() >= cap || held.bytes + weight > cap_bytes) {
            held.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        held.records.push_back((record, weight));
        held.bytes += weight;
        drop(held);
        self.ready.notify_one();
    }

    /// Up to `n` records from the front, left in the queue.
    fn peek(&self, n: usize) -> Vec<Arc<Record>> {
        self.held.lock().map(|h| h.records.iter().take(n).map(|(r, _)| r.clone()).collect()).unwrap_or_default()
    }

    /// Removes the records of `batch`, shipped, from the front. Those the
    /// queue dropped meanwhile (it filled while they were sent) are counted
    /// as dropped already, so the front is matched by identity and only the
    /// others count as sent: queued = sent + dropped + waiting.
    fn shipped(&self, batch: &[Arc<Record>]) {
        let Ok(mut held) = self.held.lock() else { return };
        let mut sent = 0;
        for shipped in batch {
            if held.records.front().is_some_and(|(r, _)| Arc::ptr_eq(r, shipped)) {
                held.pop_front();
                sent += 1;
            }
        }
        self.sent.fetch_add(sent, Ordering::Relaxed);
    }

    fn waiting(&self) -> u64 {
        self.held.lock().map_or(0, |h| h.records.len() as u64)
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.held.lock().map_or(0, |h| h.bytes)
    }
}

/// A running drain: its queue and the task shipping it.
#[derive(Debug)]
struct Drain {
    app: Option<String>,
    queue: Arc<Queue>,
    stop: watch::Sender<bool>,
}

/// Every drain of the receiver, fed by the sources.
#[derive(Debug)]
pub struct Hub {
    db: Db,
    master: Arc<MasterKey>,
    settings: Settings,
    drains: Mutex<HashMap<String, Drain>>,
    /// Records the hub's sources dropped because it read too slowly.
    lagged: AtomicU64,
}

impl Hub {
    pub fn new(db: Db, master: Arc<MasterKey>, settings: Settings) -> Arc<Hub> {
        Arc::new(Hub { db, master, settings, drains: Mutex::new(HashMap::new()), lagged: AtomicU64::new(0) })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Starts the drains stored, and reads the sources until `stop`: every
    /// running deployment's log, the audit log, and the router's access
    /// lines (`access`, when the receiver runs the router).
    pub async fn run(
        self: Arc<Self>,
        deployer: Arc<Deployer>,
        access: Option<broadcast::Receiver<Arc<str>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        match self.reload().await {
            // What each drain kept was taken back as it started; the rest
            // belongs to no drain that runs.
            Ok(()) => {
                let running: Vec<String> = self.drains.lock().map(|d| d.keys().cloned().collect()).unwrap_or_default();
                let removed = spool::sweep(&self.settings.spool, &running.iter().map(String::as_str).collect());
                if removed > 0 {
                    tracing::info!(files = removed, "removed records kept for drains that no longer run");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the log drains; none ships until one is added or removed")
            }
        }
        if let Some(access) = access {
            tokio::spawn(self.clone().follow_access(access));
        }
        let mut followed: HashSet<String> = HashSet::new();
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut events = EventCursor::new(self.db.last_event_id().await.unwrap_or(0));
        let mut every = tokio::time::interval(POLL_EVERY);
        let mut polls: u32 = 0;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = every.tick() => {}
            }
            polls = polls.wrapping_add(1);
            // The API reloads on every change it makes; this catches what it
            // could not (a database error at the time).
            if polls % RELOAD_EVERY_POLLS == 0 {
                if let Err(e) = self.reload().await {
                    tracing::debug!(error = %e, "cannot read the log drains");
                }
            }
            while let Ok(id) = ended.try_recv() {
                followed.remove(&id);
            }
            for (id, log) in deployer.running_logs() {
                if followed.contains(&id) {
                    continue;
                }
                let Ok(Some(row)) = self.db.deployment(&id).await else { continue };
                followed.insert(id.clone());
                // Found up to a poll after it started: what it printed
                // meanwhile is read back from its log.
                let (earlier, feed) = log.subscribe_since_open(EARLIER_LINES_BYTES);
                drop(log);
                let ended = ended_tx.clone();
                let hub = self.clone();
                tokio::spawn(async move {
                    for line in &earlier {
                        hub.dispatch(Arc::new(Record::app_line(&row.app_name, &id, line)));
                    }
                    hub.follow_log(&row.app_name, &id, feed).await;
                    let _ = ended.send(id);
                });
            }
            match self.db.events_after(events.last, &events.gaps(), EVENTS_PER_POLL).await {
                Ok(read) => {
                    events.read(read.iter().map(|e| e.id), std::time::Instant::now());
                    for e in &read {
                        self.dispatch(Arc::new(Record::event(e)));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read the audit log for drains"),
            }
        }
        self.keep_queues();
    }

    /// Stops every drain and keeps what its queue holds for the next start
    /// (the newest within the drain's byte budget, as written).
    fn keep_queues(&self) {
        let waiting: Vec<(String, Vec<Arc<Record>>)> = match self.drains.lock() {
            Ok(drains) => drains
                .iter()
                .map(|(id, drain)| {
                    let _ = drain.stop.send(true);
                    (id.clone(), drain.queue.peek(usize::MAX))
                })
                .collect(),
            Err(_) => return,
        };
        for (id, records) in waiting.iter().filter(|(_, r)| !r.is_empty()) {
            match spool::save(&self.settings.spool, id, records, self.settings.buffer_bytes) {
                Ok(kept) => tracing::info!(
                    drain = %id,
                    records = kept,
                    dropped = records.len() - kept,
                    "kept a drain's records for the next start"
                ),
                Err(e) => tracing::warn!(error = %e, records = records.len(), "a drain's records are lost"),
            }
        }
    }

    async fn follow_log(&self, app: &str, deployment: &str, mut feed: broadcast::Receiver<String>) {
        loop {
            match feed.recv().await {
                Ok(line) => self.dispatch(Arc::new(Record::app_line(app, deployment, &line))),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }

    async fn follow_access(self: Arc<Self>, mut feed: broadcast::Receiver<Arc<str>>) {
        loop {
            match feed.recv().await {
                Ok(line) => match serde_json::from_str::<AccessLine<'_>>(&line) {
                    Ok(access) if !access.app.is_empty() => self.dispatch(Arc::new(Record::access(&access))),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "an access line that is not one"),
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }

    /// Queues `record` on its app's drains and the platform-wide ones.
    pub fn dispatch(&self, record: Arc<Record>) {
        let weight = record.weight();
        let Ok(drains) = self.drains.lock() else { return };
        for drain in drains.values() {
            let mine = match (&drain.app, &record.app) {
                (None, _) => true,
                (Some(own), Some(app)) => own == app,
                (Some(_), None) => false,
            };
            if mine {
                drain.queue.push(record.clone(), weight, self.settings.buffer, self.settings.buffer_bytes);
            }
        }
    }

    /// Brings the running drains in line with the database: new ones start,
    /// removed ones stop (what they held is dropped).
    pub async fn reload(self: &Arc<Self>) -> Result<(), sqlx::Error> {
        let rows = self.db.all_drains().await?;
        let Ok(mut drains) = self.drains.lock() else { return Ok(()) };
        let wanted: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        drains.retain(|id, drain| {
            let keep = wanted.contains(id.as_str());
            if !keep {
                let _ = drain.stop.send(true);
            }
            keep
        });
        for row in rows {
            if drains.contains_key(&row.id) {
                continue;
            }
            match self.start(&row) {
                Ok(drain) => {
                    drains.insert(row.id.clone(), drain);
                }
                Err(e) => tracing::warn!(drain = %row.id, shown = %row.shown, error = %e, "cannot start a log drain"),
            }
        }
        Ok(())
    }

    fn start(self: &Arc<Self>, row: &DrainRow) -> anyhow::Result<Drain> {
        let url = self.master.open_str(&row.url_sealed)?;
        // Checked again: --drain-allow-private or --drain-allow-loopback may
        // have been turned off since.
        let target = Target::parse(&url, self.settings.reach)?;
        let queue = Arc::new(Queue::default());
        self.take_kept(&row.id, &queue);
        let (stop, stopped) = watch::channel(false);
        let shipper = send::Shipper::new(target, row.shown.clone(), &self.settings)?;
        tokio::spawn(ship(shipper, queue.clone(), stopped));
        Ok(Drain { app: row.app_name.clone(), queue, stop })
    }

    /// Queues what drain `id` kept at the last stop, if anything.
    fn take_kept(&self, id: &str, queue: &Queue) {
        let (buffer, bytes) = (self.settings.buffer, self.settings.buffer_bytes);
        match spool::take(&self.settings.spool, id, bytes) {
            Ok((kept, skipped)) => {
                if !kept.is_empty() || skipped > 0 {
                    tracing::info!(drain = %id, records = kept.len(), skipped, "took back a drain's records kept at the last stop");
                }
                for record in kept {
                    let weight = record.weight();
                    queue.push(Arc::new(record), weight, buffer, bytes);
                }
            }
            Err(e) => tracing::warn!(error = %e, "a drain's records kept at the last stop are lost"),
        }
    }

    /// Every drain's figures.
    pub fn stats(&self) -> Vec<DrainStats> {
        let Ok(drains) = self.drains.lock() else { return Vec::new() };
        let mut all: Vec<DrainStats> = drains
            .iter()
            .map(|(id, d)| DrainStats {
                id: id.clone(),
                app: d.app.clone(),
                queued: d.queue.queued.load(Ordering::Relaxed),
                sent: d.queue.sent.load(Ordering::Relaxed),
                dropped: d.queue.dropped.load(Ordering::Relaxed),
                waiting: d.queue.waiting(),
                up: d.queue.up.load(Ordering::Relaxed),
            })
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Records the sources dropped because the hub read them too slowly.
    pub fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }
}

/// Records shipped per write (syslog) or POST (NDJSON) at most.
const BATCH: usize = 500;

/// Ships a drain's queue until `stop`: a batch at a time, reconnecting with
/// a backoff (1 s doubling to 30 s) while the drain is down; what waits
/// meanwhile stays in the bounded queue.
async fn ship(mut shipper: send::Shipper, queue: Arc<Queue>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let batch = queue.peek(BATCH);
        if batch.is_empty() {
            tokio::select! {
                _ = stop.changed() => return,
                _ = queue.ready.notified() => continue,
            }
        }
        let result = tokio::select! {
            _ = stop.changed() => return,
            r = shipper.send(&batch) => r,
        };
        match result {
            Ok(()) => {
                queue.shipped(&batch);
                queue.up.store(true, Ordering::Relaxed);
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                queue.up.store(false, Ordering::Relaxed);
                tracing::debug!(drain = %shipper.shown(), error = %e, "log drain down; its records wait in its queue");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Arc<Record> {
        Arc::new(Record {
            at: Utc::now(),
            app: Some("web".into()),
            deployment: None,
            source: Source::App,
            message: format!("line {n}"),
            fields: None,
        })
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_counts_them() {
        let queue = Queue::default();
        for n in 0..5 {
            queue.push(record(n), 1, 3, usize::MAX);
        }
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 2);
        let held: Vec<String> = queue.peek(10).iter().map(|r| r.message.clone()).collect();
        assert_eq!(held, ["line 2", "line 3", "line 4"]);
        // Two shipped while two more came and pushed one of them out.
        let batch = queue.peek(2);
        queue.push(record(5), 1, 3, usize::MAX);
        queue.push(record(6), 1, 3, usize::MAX);
        queue.shipped(&batch);
        let held: Vec<String> = queue.peek(10).iter().map(|r| r.message.clone()).collect();
        assert_eq!(held, ["line 4", "line 5", "line 6"]);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 4);
        assert_eq!(queue.sent.load(Ordering::Relaxed), 0);
        let batch = queue.peek(2);
        queue.shipped(&batch);
        assert_eq!(queue.sent.load(Ordering::Relaxed), 2);
        assert_eq!(queue.queued.load(Ordering::Relaxed), 7);
        assert_eq!(queue.waiting(), 1);
    }

    /// D1: 16 KiB lines against a drain that never reads stay within the
    /// byte budget, the oldest dropped and counted as for the record bound.
    #[test]
    fn a_queue_holds_no_more_bytes_than_its_budget() {
        let queue = Queue::default();
        let line = |n: usize| {
            Arc::new(Record { message: format!("{n:05} {}", "x".repeat(16 * 1024 - 6)), ..(*record(0)).clone() })
        };
        let weight = line(0).weight();
        assert_eq!(weight, 128 + 16 * 1024 + "web".len());
        let budget = 1024 * 1024;
        for n in 0..1000 {
            let r = line(n);
            queue.push(r.clone(), r.weight(), 10_000, budget);
        }
        let fits = budget / weight;
        assert_eq!(queue.waiting(), fits as u64);
        assert_eq!(queue.bytes(), fits * weight);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), (1000 - fits) as u64);
        assert_eq!(queue.peek(1)[0].message[..5], format!("{:05}", 1000 - fits));
        // Shipping frees their bytes.
        let batch = queue.peek(10);
        queue.shipped(&batch);
        assert_eq!(queue.bytes(), (fits - 10) * weight);
        // A record beyond the whole budget is dropped itself, the queue kept.
        let huge = line(1000);
        queue.push(huge, budget + 1, 10_000, budget);
        assert_eq!(queue.waiting(), (fits - 10) as u64);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), (1000 - fits + 1) as u64);
        assert_eq!(queue.queued.load(Ordering::Relaxed), 1001);
    }

    /// D3: an event committed after a higher id was read is still read
    /// (once), and a gap that never fills is given up after `GAP_WAIT`.
    #[test]
    fn events_committed_out_of_id_order_are_read_once() {
        let start = std::time::Instant::now();
        let mut cursor = EventCursor::new(10);
        // 11 and 12 are still uncommitted when 13 is read.
        cursor.read([13], start);
        assert_eq!(cursor.last, 13);
        assert_eq!(cursor.gaps(), [11, 12]);
        // 12 commits: the next reading asks for it again and gets it.
        cursor.read([12, 14], start + Duration::from_secs(1));
        assert_eq!(cursor.gaps(), [11]);
        assert_eq!(cursor.last, 14);
        // 11 rolled back: looked for until GAP_WAIT, then forgotten.
        cursor.read([], start + GAP_WAIT - Duration::from_millis(1));
        assert_eq!(cursor.gaps(), [11]);
        cursor.read([], start + GAP_WAIT);
        assert!(cursor.gaps().is_empty());
        // A jump far ahead remembers only the last MAX_GAPS ids.
        cursor.read([14 + 2 * MAX_GAPS as i64], start + GAP_WAIT);
        assert_eq!(cursor.gaps().len(), MAX_GAPS);
        assert_eq!(cursor.gaps()[0], 14 + MAX_GAPS as i64);
    }

    #[test]
    fn stored_lines_keep_their_time_and_access_lines_read_as_one_line() {
        let r = Record::app_line("web", "d1", "2026-11-30T03:30:00.123Z hello world");
        assert_eq!(r.at.to_rfc3339(), "2026-11-30T03:30:00.123+00:00");
        assert_eq!(r.message, "hello world");
        let line = AccessLine {
            ts: 1_764_473_400_000_000,
            host: "web.localhost".into(),
            method: "GET".into(),
            path: "/x".into(),
            status: 200,
            app: "web".into(),
            deployment: "d1".into(),
            request_id: "r1".into(),
            client_request_id: None,
            micros: 42,
            bytes_in: 0,
            bytes_out: 5,
            error: None,
        };
        let r = Record::access(&line);
        assert_eq!(r.message, "web.localhost GET /x 200 42us in=0 out=5 request_id=r1");
        assert_eq!(r.at.to_rfc3339(), "2025-11-30T03:30:00+00:00");
    }
}
