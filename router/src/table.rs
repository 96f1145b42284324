//! The live route table: swapped whole and atomically, persisted on every
//! change (without its certificates, which stay in memory), indexed by host
//! for the request path, and counting when each deployment was last requested
//! and its traffic.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use nx_protocol::metrics::{RouterTraffic, Traffic};
use nx_protocol::routes::{Activity, Route, RouteTable, Target};

use crate::balance::Replicas;
use crate::certs::CertStore;
use crate::traffic::Counters;
use crate::wake::Wakes;

/// Why a table was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("route table generation {offered} is older than the current {current}; refusing to go back")]
    Stale { offered: u64, current: u64 },
    #[error("cannot save the route table to {path}: {source}")]
    Save { path: PathBuf, source: std::io::Error },
    #[error("cannot read the route table from {path}: {source}")]
    Load { path: PathBuf, source: std::io::Error },
    #[error("route table in {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

/// One host's route, as a request sees it.
#[derive(Debug)]
pub struct Entry {
    pub route: Route,
    /// What is counted of the deployment; shared by every host of the
    /// deployment and kept across table replacements.
    counted: Arc<Counted>,
    /// The route's replicas when it has several, with their load; new with
    /// every table, so a replica left out is back in the receiver's next one.
    pub replicas: Option<Replicas>,
    /// The traffic counters of each address the route forwards to, in the
    /// order of its target's (one for a live route): resolved when the table
    /// is taken, so a request finds its replica's counters by index.
    upstreams: Box<[Arc<Counters>]>,
    /// Whether traffic is counted (`--traffic-counters`).
    counting: bool,
}

/// What the router counts of one deployment.
#[derive(Debug, Default)]
struct Counted {
    /// Unix seconds of the deployment's last request.
    last_request: AtomicU64,
    /// The requests the router answered itself (no replica got them).
    traffic: Counters,
    /// The requests forwarded, by the port of the replica that got them;
    /// kept while the deployment's routes forward to that port, so new
    /// tables keep counting on, and a replica that left (or restarted on a
    /// port a table no longer names) starts again from zero.
    upstreams: Mutex<BTreeMap<u16, Arc<Counters>>>,
}

impl Counted {
    /// The counters of requests forwarded to `port`, made on first use.
    fn upstream(&self, port: u16) -> Arc<Counters> {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        upstreams.entry(port).or_default().clone()
    }

    /// Everything counted: per port, and the whole (with the router's own answers).
    fn read(&self) -> (Traffic, BTreeMap<u16, Traffic>) {
        let upstreams = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        let by_port: BTreeMap<u16, Traffic> = upstreams.iter().map(|(p, c)| (*p, c.read())).collect();
        let total = by_port.values().fold(self.traffic.read(), |sum, t| sum.plus(t));
        (total, by_port)
    }
}

impl Entry {
    /// Records a request at `now` (Unix seconds). Stores only when the second
    /// changed, so busy hosts do not bounce the cache line between workers.
    pub fn touch(&self, now: u64) {
        let last = &self.counted.last_request;
        if last.load(Ordering::Relaxed) < now {
            last.store(now, Ordering::Relaxed);
        }
    }

    /// The counters a request is counted on: those of the replica it was
    /// forwarded to (`upstream`: its index in the route's target; 0 for a
    /// live route), else those of the router's own answers.
    pub fn traffic(&self, upstream: Option<usize>) -> &Counters {
        if !self.counting {
            return Counters::off();
        }
        match upstream.and_then(|i| self.upstreams.get(i)) {
            Some(counters) => counters,
            None => &self.counted.traffic,
        }
    }
}

/// A table with its host index.
#[derive(Debug, Default)]
struct Live {
    table: Arc<RouteTable>,
    hosts: HashMap<String, Arc<Entry>>,
}

/// The table every request reads, and the file it is saved to.
#[derive(Debug)]
pub struct RouteStore {
    current: ArcSwap<Live>,
    state_file: PathBuf,
    /// Serialises writers, so generation checks and saves happen in order;
    /// holds the counters of every deployment in the table.
    write: Mutex<HashMap<String, Arc<Counted>>>,
    /// The certificates of the current table, served by SNI.
    certs: Arc<CertStore>,
    /// The port HTTPS is served on, when it is: plain requests for a host
    /// with a certificate are redirected there.
    https_port: Option<u16>,
    /// Requests held for sleeping deployments; told of every new table.
    wakes: Wakes,
    /// The `Strict-Transport-Security` value of HTTPS answers for hosts with
    /// a certificate of the receiver's (--hsts-max-age).
    hsts: Option<http::HeaderValue>,
    /// Whether requests are counted (`--traffic-counters`).
    counting: bool,
}

impl RouteStore {
    /// Restores the table saved in `state_file`, or starts empty when there is none.
    pub fn open(state_file: &Path) -> Result<RouteStore, TableError> {
        RouteStore::with_certs(state_file, Arc::new(CertStore::new(None)), None)
    }

    /// [`RouteStore::open`], with the certificate store the HTTPS listener
    /// resolves names through and the port it listens on.
    pub fn with_certs(
        state_file: &Path,
        certs: Arc<CertStore>,
        https_port: Option<u16>,
    ) -> Result<RouteStore, TableError> {
        let table = match std::fs::read(state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| TableError::Parse { path: state_file.to_owned(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RouteTable::default(),
            Err(source) => return Err(TableError::Load { path: state_file.to_owned(), source }),
        };
        let mut activity = HashMap::new();
        let live = index(table, &mut activity, true);
        Ok(RouteStore {
            current: ArcSwap::from_pointee(live),
            state_file: state_file.to_owned(),
            write: Mutex::new(activity),
            certs,
            https_port,
            wakes: Wakes::default(),
            hsts: None,
            counting: true,
        })
    }

    /// Counts no traffic (`--traffic-counters false`, a bench setting):
    /// requests go through [`Counters::off`], and [`RouteStore::traffic`]
    /// has nothing to say.
    pub fn without_traffic_counters(mut self) -> RouteStore {
        self.counting = false;
        let table = (*self.current.load().table).clone();
        let activity = self.write.get_mut().unwrap_or_else(|p| p.into_inner());
        self.current.store(Arc::new(index(table, activity, false)));
        self
    }

    /// Sends `Strict-Transport-Security: max-age=<max_age>` with HTTPS
    /// answers for hosts with a certificate of the receiver's (not the
    /// operator's fallback, which may not be valid for them): a browser then
    /// never asks for them over plain HTTP for that long.
    pub fn with_hsts(mut self, max_age: Option<std::time::Duration>) -> RouteStore {
        self.hsts = max_age.and_then(|age| http::HeaderValue::try_from(format!("max-age={}", age.as_secs())).ok());
        self
    }

    /// The `Strict-Transport-Security` value for an answer to `host`, over
    /// TLS when `tls`.
    pub fn hsts_for(&self, host: &str, tls: bool) -> Option<http::HeaderValue> {
        self.hsts.clone().filter(|_| tls && self.certs.covers(host))
    }

    /// The key authorization for an ACME HTTP-01 `token` on `host`.
    pub fn challenge(&self, host: &str, token: &str) -> Option<String> {
        self.current.load().table.challenges.get(host).and_then(|t| t.get(token)).cloned()
    }

    /// Where a plain HTTP request for `host` is redirected: the HTTPS port,
    /// when HTTPS is served and the receiver gave a certificate for `host`.
    pub fn https_port_for(&self, host: &str) -> Option<u16> {
        self.https_port.filter(|_| self.certs.covers(host))
    }

    /// The route for a normalised host.
    pub fn lookup(&self, host: &str) -> Option<Arc<Entry>> {
        self.current.load().hosts.get(host).cloned()
    }

    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.current.load().table.clone()
    }

    /// The requests held for sleeping deployments.
    pub fn wakes(&self) -> &Wakes {
        &self.wakes
    }

    /// The hosts served with a certificate of the receiver's.
    pub fn certified_hosts(&self) -> Vec<String> {
        self.certs.hosts()
    }

    /// When each deployment was last requested through this router.
    pub fn activity(&self) -> Activity {
        let counters = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let deployments = counters
            .iter()
            .map(|(d, c)| (d.clone(), c.last_request.load(Ordering::Relaxed)))
            .filter(|(_, t)| *t > 0)
            .collect();
        Activity { deployments }
    }

    /// The traffic of every deployment in the table; one that left the table
    /// is gone with its counters, so the receiver's families lose it too.
    /// `None` when the router counts no traffic.
    pub fn traffic(&self) -> Option<RouterTraffic> {
        if !self.counting {
            return None;
        }
        let counters = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut traffic = RouterTraffic {
            access_lines_dropped: crate::access::installed().map(|log| log.dropped()),
            ..RouterTraffic::default()
        };
        for (deployment, counted) in counters.iter() {
            let (total, by_port) = counted.read();
            traffic.deployments.insert(deployment.clone(), total);
            if !by_port.is_empty() {
                traffic.replicas.insert(deployment.clone(), by_port);
            }
        }
        Some(traffic)
    }

    /// Makes `table` current, then saves it. A table with an older generation
    /// than the current one is refused; the same generation is accepted again
    /// (the receiver re-sends after it restarts).
    ///
    /// Served before it is saved: requests held for a wake go on without
    /// waiting for the file's two fsyncs. A failed save is still an error,
    /// after which the receiver publishes again within a second, so a
    /// restart can only find an older table in the file while the receiver
    /// knows it has to send one (as it does after every failed publish).
    pub fn replace(&self, mut table: RouteTable) -> Result<(), TableError> {
        let certificates = std::mem::take(&mut table.certificates);
        let mut activity = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current.load().table.generation;
        if table.generation < current {
            return Err(TableError::Stale { offered: table.generation, current });
        }
        self.certs.replace(&certificates);
        let live = Arc::new(index(table, &mut activity, self.counting));
        self.current.store(live.clone());
        // After the store: a held request told its wake is over looks the
        // new table up. Under the write lock, so wakes see tables in order.
        self.wakes.table_replaced(&live.table);
        // Under the write lock too: saves happen in the tables' order.
        save_atomically(&self.state_file, &live.table)
            .map_err(|source| TableError::Save { path: self.state_file.clone(), source })
    }
}

/// Indexes `table` by host, giving each entry its deployment's counters: the
/// existing ones, or new ones. Counters of deployments no longer in the table
/// are dropped.
fn index(table: RouteTable, activity: &mut HashMap<String, Arc<Counted>>, counting: bool) -> Live {
    activity.retain(|d, _| table.routes.values().any(|r| &r.deployment == d));
    let mut forwarded: HashMap<&str, Vec<u16>> = HashMap::new();
    let hosts = table
        .routes
        .iter()
        .map(|(host, route)| {
            let counted = activity.entry(route.deployment.clone()).or_default().clone();
            let (replicas, addrs) = match &route.target {
                Target::Replicas { addrs } => (Some(Replicas::new(addrs, &route.deployment)), addrs.as_slice()),
                Target::Live { addr } => (None, std::slice::from_ref(addr)),
                _ => (None, &[][..]),
            };
            let ports = forwarded.entry(route.deployment.as_str()).or_default();
            ports.extend(addrs.iter().map(|a| a.port()));
            let upstreams = addrs.iter().map(|a| counted.upstream(a.port())).collect();
            (host.clone(), Arc::new(Entry { route: route.clone(), counted, replicas, upstreams, counting }))
        })
        .collect();
    for (deployment, counted) in activity.iter() {
        let ports = forwarded.get(deployment.as_str()).map_or(&[][..], Vec::as_slice);
        counted.upstreams.lock().unwrap_or_else(|p| p.into_inner()).retain(|port, _| ports.contains(port));
    }
    Live { table: Arc::new(table), hosts }
}

/// Write to a temporary file, fsync, rename over the old file, fsync the
/// directory: a crash leaves either the old table or the new one on disk.
fn save_atomically(path: &Path, table: &RouteTable) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp.1, table)?;
    tmp.1.write_all(b"\n")?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!(".routes.{}.{}.tmp", std::process::id(), rand::random::<u32>()));
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nx_protocol::routes::Target;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nx-table-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn table(generation: u64, port: u16) -> RouteTable {
        let mut t = RouteTable { generation, ..Default::default() };
        t.routes.insert(
            "web.localhost".into(),
            Route {
                app: "web".into(),
                deployment: "abcdefgh".into(),
                target: Target::Live { addr: ([127, 0, 0, 1], port).into() },
            },
        );
        t
    }

    #[test]
    fn tables_survive_a_restart() {
        let d = dir("restart");
        let state = d.join("routes.json");
        let store = RouteStore::open(&state).unwrap();
        assert!(store.lookup("web.localhost").is_none());
        store.replace(table(1, 20001)).unwrap();
        drop(store);
        let again = RouteStore::open(&state).unwrap();
        assert_eq!(again.snapshot().generation, 1);
        assert_eq!(
            again.lookup("web.localhost").unwrap().route.target,
            Target::Live { addr: ([127, 0, 0, 1], 20001).into() }
        );
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }

    #[test]
    fn a_table_is_served_before_its_save_and_a_failed_save_is_an_error() {
        let d = dir("unsaved");
        let state = d.join("routes.json");
        let store = RouteStore::open(&state).unwrap();
        store.replace(table(1, 20001)).unwrap();
        // The directory gone, the next save cannot happen.
        std::fs::remove_dir_all(&d).unwrap();
        let err = store.replace(table(2, 20002)).unwrap_err();
        assert!(matches!(&err, TableError::Save { path, .. } if *path == state), "{err}");
        // Served all the same (the receiver sends it again after the error).
        assert_eq!(store.snapshot().generation, 2);
        assert_eq!(
            store.lookup("web.localhost").unwrap().route.target,
            Target::Live { addr: ([127, 0, 0, 1], 20002).into() }
        );
    }

    #[test]
    fn older_generations_are_refused() {
        let d = dir("stale");
        let store = RouteStore::open(&d.join("routes.json")).unwrap();
        store.replace(table(5, 1)).unwrap();
        store.replace(table(5, 2)).unwrap();
        let err = store.replace(table(4, 3)).unwrap_err();
        assert!(matches!(err, TableError::Stale { offered: 4, current: 5 }), "{err}");
        assert_eq!(
            store.lookup("web.localhost").unwrap().route.target,
            Target::Live { addr: ([127, 0, 0, 1], 2).into() }
        );
    }

    #[test]
    fn activity_is_per_deployment_and_survives_new_tables() {
        let d = dir("activity");
        let store = RouteStore::open(&d.join("routes.json")).unwrap();
        let mut t = table(1, 20001);
        t.routes.insert(
            "other.localhost".into(),
            Route { app: "web".into(), deployment: "zzzzzzzz".into(), target: Target::Starting },
        );
        store.replace(t.clone()).unwrap();
        assert!(store.activity().deployments.is_empty(), "nothing requested yet");
        store.lookup("web.localhost").unwrap().touch(1_000);
        store.lookup("web.localhost").unwrap().touch(999);
        assert_eq!(store.activity().deployments.get("abcdefgh"), Some(&1_000), "older times never win");

        // A new table keeps the counter of a deployment it still routes...
        t.generation = 2;
        t.routes.insert(
            "abcdefgh--web.localhost".into(),
            Route { app: "web".into(), deployment: "abcdefgh".into(), target: Target::Starting },
        );
        store.replace(t).unwrap();
        assert_eq!(store.activity().deployments.get("abcdefgh"), Some(&1_000));
        store.lookup("abcdefgh--web.localhost").unwrap().touch(2_000);
        assert_eq!(store.activity().deployments.get("abcdefgh"), Some(&2_000), "hosts of one deployment share it");

        // Traffic is per deployment too, whichever host it came by.
        store.lookup("web.localhost").unwrap().traffic(Some(0)).record(200, 10, 0, 5);
        store.lookup("abcdefgh--web.localhost").unwrap().traffic(None).record(500, 10, 0, 7);
        let traffic = store.traffic().unwrap();
        let web = &traffic.deployments["abcdefgh"];
        assert_eq!((web.total(), web.errors(), web.bytes_out), (2, 1, 12));
        assert_eq!(traffic.deployments["zzzzzzzz"].total(), 0);

        // ...and forgets the ones it no longer routes.
        store.replace(RouteTable { generation: 3, ..Default::default() }).unwrap();
        assert!(store.activity().deployments.is_empty());
        assert!(store.traffic().unwrap().deployments.is_empty(), "a deployment that left the table leaves the metrics");
    }

    #[test]
    fn forwarded_traffic_is_counted_per_replica_port_and_kept_while_the_port_is_routed() {
        let d = dir("replicas");
        let store = RouteStore::open(&d.join("routes.json")).unwrap();
        let addrs = |ports: &[u16]| ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect::<Vec<_>>();
        let mut t = table(1, 20001);
        t.routes.get_mut("web.localhost").unwrap().target = Target::Replicas { addrs: addrs(&[20001, 20002, 20003]) };
        store.replace(t.clone()).unwrap();
        let entry = store.lookup("web.localhost").unwrap();
        entry.traffic(Some(0)).record(200, 10, 0, 1);
        entry.traffic(Some(2)).record(200, 10, 0, 1);
        entry.traffic(Some(2)).record(500, 10, 0, 1);
        entry.traffic(Some(1)).open();
        entry.traffic(None).record(503, 10, 0, 1);
        let traffic = store.traffic().unwrap();
        let ports = &traffic.replicas["abcdefgh"];
        let by_port: Vec<(u16, u64, u64)> = ports.iter().map(|(p, t)| (*p, t.total(), t.open)).collect();
        assert_eq!(by_port, [(20001, 1, 0), (20002, 0, 1), (20003, 2, 0)]);
        let total = &traffic.deployments["abcdefgh"];
        assert_eq!((total.total(), total.errors(), total.open), (4, 2, 1), "the whole has the router's own 503 too");
        assert_eq!(traffic.access_lines_dropped, None, "no access log in this process");

        // The next table keeps counting on the ports it still routes (one
        // healthy replica left is a live route) and forgets the others.
        t.generation = 2;
        t.routes.get_mut("web.localhost").unwrap().target = Target::Live { addr: addrs(&[20003])[0] };
        store.replace(t).unwrap();
        store.lookup("web.localhost").unwrap().traffic(Some(0)).record(200, 10, 0, 1);
        let traffic = store.traffic().unwrap();
        let ports: Vec<(u16, u64)> = traffic.replicas["abcdefgh"].iter().map(|(p, t)| (*p, t.total())).collect();
        assert_eq!(ports, [(20003, 3)]);
        assert_eq!(traffic.deployments["abcdefgh"].total(), 4, "the router's own answers stay counted");
    }

    #[test]
    fn private_keys_never_reach_the_state_file_and_challenges_are_per_host() {
        let d = dir("keys");
        let state = d.join("routes.json");
        let store = RouteStore::open(&state).unwrap();
        let mut t = table(1, 20001);
        t.certificates.push(nx_protocol::routes::Certificate {
            hosts: vec!["web.localhost".into()],
            chain_pem: "chain".into(),
            key_pem: "THE-PRIVATE-KEY".into(),
        });
        t.challenges.insert("web.localhost".into(), [("tok".to_owned(), "tok.thumb".to_owned())].into());
        store.replace(t).unwrap();
        let saved = std::fs::read_to_string(&state).unwrap();
        assert!(!saved.contains("THE-PRIVATE-KEY"), "{saved}");
        assert!(store.snapshot().certificates.is_empty());
        assert_eq!(store.challenge("web.localhost", "tok").as_deref(), Some("tok.thumb"));
        assert_eq!(store.challenge("other.localhost", "tok"), None);
        assert_eq!(store.challenge("web.localhost", "other"), None);
        // A router started from the state file has no certificate of the
        // receiver's, and says so (the receiver then sends them again).
        let restarted = RouteStore::open(&state).unwrap();
        assert!(restarted.certified_hosts().is_empty());
    }

    #[test]
    fn a_corrupt_state_file_is_a_clear_error() {
        let d = dir("corrupt");
        let state = d.join("routes.json");
        std::fs::write(&state, b"{not json").unwrap();
        let err = RouteStore::open(&state).unwrap_err();
        assert!(err.to_string().contains("routes.json"), "{err}");
    }
}
