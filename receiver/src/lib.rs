//! nx-receiver: receives binaries, keeps them in object storage, runs them in
//! sandboxes with their own databases, and routes them to preview and
//! production URLs.
//!
//! Contract of this crate:
//! - nothing is recorded in the metadata database that is not durable first:
//!   an artifact row follows a published object, an app row follows its
//!   database; a failure on the way leaves no row and no temporary file;
//! - every request except `GET /v1/health` and `GET /v1/target` is signed and
//!   authenticated before its body is read ([`api::auth`]);
//! - the deployment watcher is the only writer of a running deployment's state,
//!   and it updates the database before the router, and both before anyone is
//!   told ([`deploy`]);
//! - every child process (PostgreSQL, nx-router, sandboxes) is started through
//!   the runtime's process manager and stops when the receiver stops.

pub mod api;
pub mod apps;
pub mod artifacts;
pub mod config;
pub mod counters;
pub mod databases;
pub mod db;
pub mod deploy;
pub mod domains;
pub mod drains;
pub mod github;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod network;
pub mod ports;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod sftp;
pub mod telemetry;
pub mod volumes;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level modules each top-level module names (`crate::x`), read
    /// from the sources: module `a` is `src/a.rs` and everything under
    /// `src/a/`.
    fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let relative = path.strip_prefix(src).unwrap();
                let first = relative.components().next().unwrap().as_os_str().to_string_lossy();
                let module = first.trim_end_matches(".rs").to_owned();
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
                let names = graph.entry(module.clone()).or_default();
                for line in code {
                    for (i, _) in line.match_indices("crate::") {
                        let rest = &line[i + 7..];
                        // `crate::{a, b::c}` names several.
                        let listed = match rest.strip_prefix('{') {
                            Some(inner) => inner.split('}').next().unwrap_or_default().split(',').collect(),
                            None => vec![rest],
                        };
                        for item in listed {
                            let name: String =
                                item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                            if !name.is_empty() && name != module {
                                names.insert(name);
                            }
                        }
                    }
                }
            }
        }
        graph
    }

    /// Data flows one way through the receiver's modules: no two import each
    /// other, directly or through others.
    #[test]
    fn no_two_modules_import_each_other() {
        let graph = imports(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
        assert!(graph.get("deploy").is_some_and(|d| d.contains("db")), "the reader sees imports: {graph:?}");
        // A module reaches itself through its imports: a cycle.
        for start in graph.keys() {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
            while let Some((at, path)) = todo.pop() {
                for next in graph.get(&at).into_iter().flatten() {
                    assert!(next != start, "an import cycle: {} -> {start}", path.join(" -> "));
                    if seen.insert(next.clone()) {
                        todo.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
                    }
                }
            }
        }
    }
}
