//! `nx login`: check the server and key, then store them.

use nx_protocol::api::{AppInfo, Health};
use nx_protocol::auth::Credential;

use crate::cli::Global;
use crate::client::{get_public, Client};
use crate::config::{self, FileConfig, Target};
use crate::failure::Failure;

pub async fn run(g: &Global) -> anyhow::Result<()> {
    let mut file = config::load()?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let server = g.server.clone().or_else(|| env("NX_SERVER")).or(file.server.clone()).ok_or_else(|| {
        Failure::Usage("pass --server URL (the receiver's API, for example http://127.0.0.1:8070)".into())
    })?;
    let server = server.trim_end_matches('/').to_owned();
    let health: Health = get_public(&server, "/v1/health").await?;
    let key = g.key.clone().or_else(|| env("NX_KEY")).or(file.key.clone());
    if let Some(k) = &key {
        let cred = Credential::parse(k).map_err(|e| Failure::Usage(e.to_string()))?;
        // A signed call proves the key before it is stored.
        let apps: Vec<AppInfo> =
            Client::new(&Target { server: server.clone(), key: Some(cred.clone()) })?.get("/v1/apps").await?;
        let scope = if cred.is_admin() {
            "admin token".to_owned()
        } else {
            format!("deploy key for {}", apps.first().map_or("?", |a| a.name.as_str()))
        };
        eprintln!("key accepted ({scope})");
    }
    file = FileConfig { server: Some(server.clone()), key };
    let path = config::save(&file)?;
    eprintln!("logged in to {server} (nx-receiver {}); settings saved in {}", health.version, path.display());
    Ok(())
}
