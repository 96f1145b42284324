//! Where the CLI finds its server and key: flags, then `NX_SERVER` / `NX_KEY`,
//! then the config file written by `nx login` (mode 0600).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context as _;
use nx_protocol::auth::Credential;
use serde::{Deserialize, Serialize};

use crate::failure::Failure;

/// The config file's contents.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FileConfig {
    pub server: Option<String>,
    pub key: Option<String>,
}

/// The config file: `$XDG_CONFIG_HOME/nx/config.toml` or `~/.config/nx/config.toml`.
pub fn path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("nx/config.toml"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/nx/config.toml"))
}

pub fn load() -> anyhow::Result<FileConfig> {
    let Some(path) = path() else { return Ok(FileConfig::default()) };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("{} is not valid; fix it or run `nx login` again", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn save(config: &FileConfig) -> anyhow::Result<PathBuf> {
    let path = path().context("neither XDG_CONFIG_HOME nor HOME is set; set one of them")?;
    let dir = path.parent().context("config path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(toml::to_string(config)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The server and key a command uses.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub key: Option<Credential>,
}

/// Whether plain `http://` to `server` keeps everything on this machine.
fn is_loopback(server: &str) -> bool {
    let Ok(url) = url::Url::parse(server) else { return false };
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Refuses plain `http://` to a receiver on another machine unless `insecure`.
fn transport_allowed(server: &str, insecure: bool) -> Result<(), Failure> {
    if server.starts_with("http://") && !insecure && !is_loopback(server) {
        return Err(Failure::Usage(format!(
            "server {server} is plain http on another machine: keys, database passwords and requests would cross the network in clear; use https://, or pass --insecure (NX_INSECURE=1) on a network you trust"
        )));
    }
    Ok(())
}

/// Resolves the server URL and key: flag, environment, config file. Plain
/// `http://` is refused for a receiver on another machine unless `insecure`:
/// new keys, the admin token and database passwords travel in answers.
pub fn resolve(server_flag: Option<&str>, key_flag: Option<&str>, insecure: bool) -> anyhow::Result<Target> {
    let file = load()?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let server = server_flag.map(str::to_owned).or_else(|| env("NX_SERVER")).or(file.server).ok_or_else(|| {
        Failure::Usage("no server configured: run `nx login --server URL --key KEY`, or set NX_SERVER".into())
    })?;
    let server = server.trim_end_matches('/').to_owned();
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(Failure::Usage(format!("server {server:?} must start with http:// or https://")).into());
    }
    transport_allowed(&server, insecure)?;
    let key = match key_flag.map(str::to_owned).or_else(|| env("NX_KEY")).or(file.key) {
        Some(k) => Some(Credential::parse(&k).map_err(|e| Failure::Usage(e.to_string()))?),
        None => None,
    };
    Ok(Target { server, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_refused_for_another_machine_unless_insecure() {
        for local in ["http://127.0.0.1:8070", "http://localhost:8070", "http://api.localhost", "http://[::1]:1"] {
            assert!(transport_allowed(local, false).is_ok(), "{local}");
        }
        for remote in ["http://192.0.2.10:8070", "http://nx.example.com", "http://localhost.example.com"] {
            let refused = transport_allowed(remote, false).unwrap_err().to_string();
            assert!(refused.contains("plain http on another machine") && refused.contains("--insecure"), "{refused}");
            assert!(transport_allowed(remote, true).is_ok(), "{remote} with --insecure");
        }
        assert!(transport_allowed("https://nx.example.com", false).is_ok());
    }
}
