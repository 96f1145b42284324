//! `nx push`: verify locally against the server's target, upload with progress,
//! wait for the health check, print the preview URL. [`execute`] is shared with
//! the GitHub Action.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use nx_protocol::api::{AppInfo, DeploymentInfo, DeploymentState, Promotion, PushMeta, Source};
use nx_protocol::target::ServerTarget;
use nx_protocol::AppName;
use serde::Serialize;

use super::{named_or_only_app, print_json};
use crate::cli::{Global, PushArgs};
use crate::client::{digest_of, get_public, Client, UploadDigest};
use crate::failure::Failure;
use crate::manifest::Manifest;
use crate::output::{bytes, paint, state, Color};
use crate::progress::Progress;

/// Parses repeated `KEY=VALUE` settings.
pub fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut env = BTreeMap::new();
    for p in pairs {
        let (k, v) =
            p.split_once('=').ok_or_else(|| Failure::Usage(format!("environment setting {p:?} must be KEY=VALUE")))?;
        if k.is_empty() {
            return Err(Failure::Usage(format!("environment setting {p:?} has an empty name")));
        }
        env.insert(k.to_owned(), v.to_owned());
    }
    Ok(env)
}

/// Attempts of one upload before giving up on a flaky connection.
const ATTEMPTS: u32 = 3;

fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<Failure>(), Some(Failure::Unreachable(_))))
}

/// One push.
#[derive(Debug)]
pub struct Job<'a> {
    pub path: &'a Path,
    pub app: &'a AppName,
    pub meta: PushMeta,
    /// Check the binary against the server's target before uploading.
    pub verify: bool,
    pub promote: bool,
    /// No progress output (JSON mode).
    pub quiet: bool,
    /// The nx.toml whose settings (health, limits, preview database) the app
    /// is brought to before the upload.
    pub manifest: Option<&'a (std::path::PathBuf, Manifest)>,
    /// A preview of a fork's pull request, pushed by a `pull_request_target`
    /// run's token, which may push and nothing else: the app is not read
    /// first and no nx.toml is applied.
    pub fork_preview: bool,
    /// The server's target when it was asked already (for a build just
    /// before the push): not asked again.
    pub target: Option<ServerTarget>,
}

/// What a push produced.
#[derive(Debug, Serialize)]
pub struct Pushed {
    pub deployment: DeploymentInfo,
    pub promotion: Option<Promotion>,
}

/// Runs a push: local verification, upload, optional promotion. A deployment
/// that failed on the server is returned, not an error; the caller decides.
pub async fn execute(client: &Client, job: Job<'_>) -> anyhow::Result<Pushed> {
    // The binary is read on a blocking thread, and hashed on another from
    // the moment it is read, while the server is asked about the app and
    // what it runs: a push's fixed cost before its upload is then the
    // longer of the read and the requests (about 8 ms), not the hash's
    // 12-30 ms for 20 MB. A receiver that takes the digest after the body
    // gets the upload at once, hashed while it goes out; an older one once
    // the hash is done.
    let path = job.path.to_owned();
    let read = async move {
        let data = tokio::task::spawn_blocking(move || read_binary(&path)).await?;
        anyhow::Ok(data.map(|data| (digest_of(data.clone()), data)))
    };
    // The push's first signed call, which a wrong key or an unknown app
    // fails before megabytes are sent (a server refusing an upload stops
    // reading it, which can cut the answer off). A fork's preview may not
    // read the app; its upload is refused early enough on the signature of
    // its head alone.
    let app = async {
        if job.fork_preview {
            return Ok(None);
        }
        client.get::<AppInfo>(&format!("/v1/apps/{}", job.app)).await.map(Some)
    };
    // Without verification the target only says how the digest may be sent:
    // a server that cannot say is sent it ahead.
    let known = job.target.clone();
    let target = async {
        if known.is_some() {
            return Ok(known);
        }
        let target = client.get_public::<ServerTarget>("/v1/target").await;
        if job.verify {
            target.map(Some)
        } else {
            Ok(target.ok())
        }
    };
    let (read, app, target) = tokio::join!(read, app, target);
    // What is wrong here is said first: the file, then the server.
    let (digest, data) = read
        .map_err(|e| anyhow::anyhow!("reading the binary stopped: {e}"))?
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", job.path.display())))?;
    let (app, target) = (app?, target?);
    let size = data.len() as u64;
    if let Some(target) = target.as_ref().filter(|_| job.verify) {
        if let Some(refused) = super::verify::refusal(job.path, &data, target) {
            return Err(refused.into());
        }
    }
    // Only for a binary that will be pushed: a refused one changes nothing.
    if let Some(app) = &app {
        apply_manifest(client, &job, app).await?;
    }
    let mut meta = job.meta;
    // One id for every attempt: a retry gets the deployment an attempt that
    // lost its answer made, never a second one.
    meta.push_id.get_or_insert_with(|| hex::encode(rand::random::<[u8; 16]>()));
    let meta_json = serde_json::to_vec(&meta)?;
    if !job.quiet {
        eprintln!("pushing {} ({}) to {}", job.path.display(), bytes(size), job.app);
    }
    let ahead = match target {
        Some(target) if target.digest_in_footer => None,
        _ => Some(digest.clone().await.map_err(anyhow::Error::msg)?),
    };
    let after = if meta.no_wait { "starting on the server" } else { "verifying and starting on the server" };
    let api = format!("/v1/apps/{}/deployments", job.app);
    let mut attempt = 1;
    let deployment = loop {
        let progress = Progress::upload(size, after, job.quiet);
        let signed = match &ahead {
            Some(sha256) => UploadDigest::Ahead(sha256),
            None => UploadDigest::InFooter(digest.clone()),
        };
        let result: anyhow::Result<DeploymentInfo> =
            client.upload(&api, data.clone(), signed, &meta_json, progress.clone()).await;
        progress.clear();
        // A hash that failed cut the body short, which looks like a lost
        // connection: said as what it is, and not tried again.
        if let (Err(_), Some(Err(hashing))) = (&result, digest.peek()) {
            return Err(anyhow::anyhow!("cannot push {}: {hashing}", job.path.display()));
        }
        match result {
            Err(e) if attempt < ATTEMPTS && is_unreachable(&e) => {
                let pause = std::time::Duration::from_secs(1 << attempt);
                eprintln!(
                    "the connection failed ({e:#}); trying again in {}s ({} of {ATTEMPTS})",
                    pause.as_secs(),
                    attempt + 1
                );
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            other => break other?,
        }
    };
    let promotion = if job.promote && deployment.state == DeploymentState::Healthy {
        let path = format!("/v1/apps/{}/deployments/{}/promote", job.app, deployment.id);
        Some(client.post::<_, Promotion>(&path, &serde_json::json!({})).await?)
    } else {
        None
    };
    Ok(Pushed { deployment, promotion })
}

/// Brings the app to nx.toml's settings, if they change anything (`info`:
/// the app as the server has it now).
async fn apply_manifest(client: &Client, job: &Job<'_>, info: &AppInfo) -> anyhow::Result<()> {
    if let Some((path, manifest)) = job.manifest {
        let wanted =
            manifest.settings_over(&info.settings).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        if let Some(settings) = wanted {
            client.put::<_, AppInfo>(&format!("/v1/apps/{}/settings", job.app), &settings).await?;
            if !job.quiet {
                eprintln!("settings of {} updated from {}", job.app, path.display());
            }
        }
    }
    Ok(())
}

/// The whole file at `path`, read into one buffer: the bytes that are
/// checked, hashed and sent, whatever happens to the file meanwhile.
fn read_binary(path: &Path) -> std::io::Result<Bytes> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    // Its size is taken first, and the signature covers it: it must be a
    // file (a pipe or a device has no size to sign).
    if !metadata.is_file() {
        return Err(std::io::Error::other("not a regular file; write the binary to a file and push that"));
    }
    let size = usize::try_from(metadata.len()).map_err(std::io::Error::other)?;
    let mut data = vec![0u8; size];
    file.read_exact(&mut data)?;
    // A file that grew since its size was taken is refused, as one that
    // shrank is by `read_exact`: the bytes sent are all the file's.
    if file.read(&mut [0u8; 1])? != 0 {
        return Err(std::io::Error::other("the file grew while it was read; push it once it is complete"));
    }
    Ok(Bytes::from(data))
}

/// The error for a deployment that did not become healthy, with its last words.
pub fn failed(info: &DeploymentInfo) -> Failure {
    let mut msg = format!("deployment {} {}", info.id, info.state);
    if let Some(e) = &info.error {
        msg.push_str(&format!(": {e}"));
    }
    if !info.log_tail.is_empty() {
        msg.push_str("\nlast lines of its log:\n");
        // The app's own words: shown, never acted on by the terminal.
        let tail = info.log_tail.iter().map(|l| format!("  | {}", nx_protocol::logs::neutralise(l)));
        msg.push_str(&tail.collect::<Vec<_>>().join("\n"));
    }
    Failure::Refused(msg)
}

pub async fn run(g: &Global, mut args: PushArgs) -> anyhow::Result<()> {
    // A directory is built first; its nx.toml is the one that applies, read
    // once, and the server's target is asked once for the build and its check.
    let dir = args.path.is_dir().then(|| args.path.clone());
    let manifest = match &dir {
        Some(dir) => crate::manifest::load_for(dir, g.manifest.as_deref())?,
        None => crate::manifest::load(g.manifest.as_deref())?,
    };
    let target = crate::config::resolve(g.server.as_deref(), g.key.as_deref(), g.insecure)?;
    let mut verify = !args.skip_verify;
    let mut server_target = None;
    if let Some(dir) = &dir {
        let asked = get_public(&target.server, "/v1/target").await?;
        args.path = super::build::build_dir(dir, manifest.as_ref().map(|(_, m)| m), None, &asked).await?;
        server_target = Some(asked);
        verify = false;
    }
    // After the build: an OIDC token lives minutes, and the build may be long.
    let client = Client::for_push(&target).await?;
    let named = args.app.app.clone().or_else(|| manifest.as_ref().and_then(|(_, m)| m.app.clone()));
    let app = named_or_only_app(&client, named).await?;
    let app = AppName::parse(&app).map_err(|e| Failure::Usage(e.to_string()))?;
    let (mut env, manifest_args) = match &manifest {
        Some((_, m)) => (m.env.clone(), m.args.clone()),
        None => (BTreeMap::new(), Vec::new()),
    };
    env.extend(parse_env(&args.env)?);
    let meta = PushMeta {
        args: if args.args.is_empty() { manifest_args } else { args.args.clone() },
        env,
        filename: args.path.file_name().map(|f| f.to_string_lossy().into_owned()),
        source: Source::Cli,
        pr: args.pr,
        git_sha: args.git_sha.clone(),
        git_ref: args.git_ref.clone(),
        ..PushMeta::default()
    };
    let job = Job {
        path: &args.path,
        app: &app,
        meta,
        verify,
        promote: args.promote,
        quiet: g.json,
        manifest: manifest.as_ref(),
        fork_preview: false,
        target: server_target,
    };
    let pushed = execute(&client, job).await?;
    let info = &pushed.deployment;
    if g.json {
        print_json(&pushed)?;
    } else {
        println!("{} {} {}", app, paint(info.id.as_str(), Color::Bold), state(info.state));
        println!("  preview:  {}", info.preview_url);
        println!("  digest:   sha256:{}", info.digest);
        if let Some(p) = &pushed.promotion {
            println!("  production: {}", p.production_url);
        }
    }
    if info.state == DeploymentState::Healthy {
        Ok(())
    } else {
        Err(failed(info).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_settings_parse() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        assert!(parse_env(&["NOEQUALS".into()]).is_err());
        assert!(parse_env(&["=v".into()]).is_err());
    }

    #[tokio::test]
    async fn a_binary_is_read_whole_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        // Pieces of a megabyte and a part of one, and an empty file.
        for size in [0, 1, (1 << 20) - 1, 1 << 20, (5 << 20) + 12_345] {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let path = dir.path().join(format!("bin-{size}"));
            std::fs::write(&path, &bytes).unwrap();
            let data = read_binary(&path).unwrap();
            assert_eq!(data, bytes, "size {size}");
            let expected = nx_protocol::auth::sha256_hex(&bytes);
            assert_eq!(digest_of(data).await.unwrap(), expected, "size {size}");
        }
        let missing = read_binary(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        let not_a_file = read_binary(dir.path()).unwrap_err();
        assert_eq!(not_a_file.to_string(), "not a regular file; write the binary to a file and push that");
    }
}
