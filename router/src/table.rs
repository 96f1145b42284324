//! The live route table: swapped whole and atomically, persisted on every change.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use nx_protocol::routes::{Route, RouteTable};

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

/// The table every request reads, and the file it is saved to.
#[derive(Debug)]
pub struct RouteStore {
    current: ArcSwap<RouteTable>,
    state_file: PathBuf,
    /// Serialises writers so generation checks and saves happen in order.
    write: Mutex<()>,
}

impl RouteStore {
    /// Restores the table saved in `state_file`, or starts empty when there is none.
    pub fn open(state_file: &Path) -> Result<RouteStore, TableError> {
        let table = match std::fs::read(state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| TableError::Parse { path: state_file.to_owned(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RouteTable::default(),
            Err(source) => return Err(TableError::Load { path: state_file.to_owned(), source }),
        };
        Ok(RouteStore {
            current: ArcSwap::from_pointee(table),
            state_file: state_file.to_owned(),
            write: Mutex::new(()),
        })
    }

    /// The route for a normalised host.
    pub fn lookup(&self, host: &str) -> Option<Route> {
        self.current.load().routes.get(host).cloned()
    }

    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.current.load_full()
    }

    /// Saves `table` and then makes it current. A table with an older generation
    /// than the current one is refused; the same generation is accepted again
    /// (the receiver re-sends after it restarts).
    pub fn replace(&self, table: RouteTable) -> Result<(), TableError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current.load().generation;
        if table.generation < current {
            return Err(TableError::Stale { offered: table.generation, current });
        }
        save_atomically(&self.state_file, &table)
            .map_err(|source| TableError::Save { path: self.state_file.clone(), source })?;
        self.current.store(Arc::new(table));
        Ok(())
    }
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
            again.lookup("web.localhost").unwrap().target,
            Target::Live { addr: ([127, 0, 0, 1], 20001).into() }
        );
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }

    #[test]
    fn older_generations_are_refused() {
        let d = dir("stale");
        let store = RouteStore::open(&d.join("routes.json")).unwrap();
        store.replace(table(5, 1)).unwrap();
        store.replace(table(5, 2)).unwrap();
        let err = store.replace(table(4, 3)).unwrap_err();
        assert!(matches!(err, TableError::Stale { offered: 4, current: 5 }), "{err}");
        assert_eq!(store.lookup("web.localhost").unwrap().target, Target::Live { addr: ([127, 0, 0, 1], 2).into() });
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
