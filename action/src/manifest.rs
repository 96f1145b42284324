//! `nx.toml`: what an app's repository says about how it runs. `nx push` and
//! the GitHub Action read it; flags and action inputs override it.
//!
//! ```toml
//! app = "web"
//! args = ["--listen", "127.0.0.1:$PORT"]
//! build = "make server"   # only for projects nx build does not recognise
//! binary = "server"       # what that command makes
//!
//! [env]            # plain settings; secrets belong in `nx env set`
//! LOG_LEVEL = "info"
//!
//! [health]
//! path = "/healthz"   # or: tcp = true
//!
//! [limits]
//! memory = "256MiB"
//! cpu = 0.5
//!
//! [preview]
//! database = "empty"  # shared, empty or copy
//! forks = "label"     # previews of forks' pull requests a maintainer labels
//!                     # (default "never"); see workflows/README.md
//! fork_label = "nx-preview"  # the label (default nx-preview)
//!
//! [scale]
//! sleep_after = "15m"            # previews stop after this long without a
//!                                # request and start again on the next one
//!                                # (default 15m; at least 2s, or "off")
//! production_sleep_after = "off" # the same for production (default off)
//! replicas = 3        # sandboxes production runs (default 1), balanced by the router
//! preview_replicas = 2 # sandboxes each preview runs (default 1)
//!
//! [promote]
//! on = "push"         # the action promotes pushes to `branch` (default);
//!                     # "merge": the merged pull request's preview (webhook);
//!                     # "approval": an approving review (webhook); "manual"
//! branch = "main"     # default: the repository's default branch
//! approvals = 2       # with "approval": distinct approvers needed (default 1);
//!                     # only people with write access count, on the commit
//!                     # that was previewed last
//! reviewers = ["octocat", "@my-org/release-team"]  # who must be among them
//! allow_author = false  # the pull request's author's approval counts (default no)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nx_protocol::api::{check_fork_label, AppSettings, ForkPreviews, HealthSetting, PreviewDb, PromoteOn, Role};
use nx_protocol::units::parse_size;
use serde::Deserialize;

use crate::failure::Failure;

/// The file name looked for.
pub const FILE: &str = "nx.toml";

/// A parsed `nx.toml`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The app pushes go to.
    pub app: Option<String>,
    /// Arguments for the binary; `$PORT` and `$HOST` are expanded on the server.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables for each deployment (not secret: this file is in the repository).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How `nx build` builds a project it does not recognise (C, make, ...):
    /// a shell command run in the project's directory.
    pub build: Option<String>,
    /// The file the build makes (with `build`), the crate's binary when it
    /// has several, or the server entry of a Bun app.
    pub binary: Option<String>,
    pub health: Option<Health>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub preview: Preview,
    #[serde(default)]
    pub promote: Promote,
    #[serde(default)]
    pub scale: Scale,
}

/// `[scale]`: how many sandboxes production runs, and when idle deployments
/// sleep; see [`nx_protocol::api::ScaleSettings`].
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub replicas: Option<u32>,
    pub preview_replicas: Option<u32>,
    /// Previews: a duration like `15m`, or `off`.
    pub sleep_after: Option<String>,
    /// Production and the rollback target.
    pub production_sleep_after: Option<String>,
}

/// `[health]`: exactly one of `path` or `tcp = true`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub path: Option<String>,
    #[serde(default)]
    pub tcp: bool,
}

/// `[limits]`: sizes as text (`256MiB`), cpu in cores.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub memory: Option<String>,
    pub cpu: Option<f64>,
    pub pids: Option<u32>,
    pub nofile: Option<u64>,
    pub tmp: Option<String>,
    pub data: Option<String>,
}

/// `[preview]`
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preview {
    pub database: Option<PreviewDb>,
    /// `never` or `label`; see [`ForkPreviews`].
    pub forks: Option<ForkPreviews>,
    pub fork_label: Option<String>,
}

/// `[promote]`: what makes production.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promote {
    /// `push`, `merge`, `approval` or `manual`; see [`PromoteOn`].
    pub on: Option<PromoteOn>,
    /// The branch whose pushes promote (with `on = "push"`); the
    /// repository's default branch when not given.
    pub branch: Option<String>,
    /// With `on = "approval"`: see [`nx_protocol::api::ApprovalRule`].
    pub approvals: Option<u32>,
    pub reviewers: Option<Vec<String>>,
    pub allow_author: Option<bool>,
}

impl Manifest {
    /// Parses `text`, read from `path`; errors name the file and the line.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, Failure> {
        let m: Manifest =
            toml::from_str(text).map_err(|e| Failure::Usage(format!("{} is not valid: {e}", path.display())))?;
        m.settings_over(&AppSettings::default()).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        Ok(m)
    }

    /// The app settings with this file's health, limits and preview database
    /// over `current`; `None` when the file changes nothing.
    pub fn settings_over(&self, current: &AppSettings) -> Result<Option<AppSettings>, String> {
        let mut s = current.clone();
        if let Some(h) = &self.health {
            s.health = Some(match (&h.path, h.tcp) {
                (Some(path), false) => HealthSetting::Http { path: path.clone() },
                (None, true) => HealthSetting::Tcp,
                _ => return Err("[health] needs exactly one of `path = \"/...\"` or `tcp = true`".into()),
            });
        }
        let mib = |field: &str, v: &Option<String>| -> Result<Option<u64>, String> {
            v.as_deref()
                .map(|t| parse_size(t).map(|b| (b >> 20).max(1)).map_err(|e| format!("limits.{field}: {e}")))
                .transpose()
        };
        let l = &self.limits;
        s.limits.memory_mib = mib("memory", &l.memory)?.or(s.limits.memory_mib);
        s.limits.tmp_mib = mib("tmp", &l.tmp)?.or(s.limits.tmp_mib);
        s.limits.data_mib = mib("data", &l.data)?.or(s.limits.data_mib);
        s.limits.cpu = l.cpu.or(s.limits.cpu);
        s.limits.pids = l.pids.or(s.limits.pids);
        s.limits.nofile = l.nofile.or(s.limits.nofile);
        if let Some(db) = self.preview.database {
            s.preview_db = db;
        }
        if let Some(forks) = self.preview.forks {
            s.preview_forks = forks;
        }
        if let Some(label) = &self.preview.fork_label {
            check_fork_label(label).map_err(|e| format!("[preview] {e}"))?;
            s.fork_label = Some(label.clone());
        }
        for (name, asked, setting) in [
            ("replicas", self.scale.replicas, &mut s.scale.replicas),
            ("preview_replicas", self.scale.preview_replicas, &mut s.scale.preview_replicas),
        ] {
            if let Some(n) = asked {
                if n == 0 {
                    return Err(format!("[scale] {name} must be at least 1"));
                }
                *setting = Some(n);
            }
        }
        if let Some(on) = self.promote.on {
            s.promote_on = on;
        }
        for (role, value) in
            [(Role::Preview, &self.scale.sleep_after), (Role::Production, &self.scale.production_sleep_after)]
        {
            if let Some(v) = value {
                s.scale.set(role, v).map_err(|e| format!("[scale] {e}"))?;
            }
        }
        let p = &self.promote;
        s.approval.approvals = p.approvals.unwrap_or(s.approval.approvals);
        s.approval.reviewers = p.reviewers.clone().unwrap_or(s.approval.reviewers);
        s.approval.allow_author = p.allow_author.unwrap_or(s.approval.allow_author);
        s.approval.check()?;
        Ok((s != *current).then_some(s))
    }
}

/// The `nx.toml` that applies in `dir`: there or in a parent, up to the root
/// of the git repository.
pub fn find(dir: &Path) -> Option<PathBuf> {
    for d in dir.ancestors() {
        let candidate = d.join(FILE);
        if candidate.is_file() {
            return Some(candidate);
        }
        if d.join(".git").exists() {
            return None;
        }
    }
    None
}

/// Loads the manifest named by `explicit` (which must exist), or the one
/// [`find`] finds from the working directory, if any.
pub fn load(explicit: Option<&Path>) -> Result<Option<(PathBuf, Manifest)>, Failure> {
    let cwd = std::env::current_dir().map_err(|e| Failure::Usage(format!("cannot read the working directory: {e}")))?;
    load_for(&cwd, explicit)
}

/// Like [`load`], looking from `dir` instead of the working directory.
pub fn load_for(dir: &Path, explicit: Option<&Path>) -> Result<Option<(PathBuf, Manifest)>, Failure> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => match find(dir) {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    Ok(Some((path.clone(), Manifest::parse(&text, &path)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
app = "web"
args = ["--port", "$PORT"]
[env]
LOG_LEVEL = "info"
[health]
path = "/healthz"
[limits]
memory = "256MiB"
cpu = 0.5
data = "2GiB"
[preview]
database = "empty"
forks = "label"
fork_label = "safe to preview"
[promote]
on = "manual"
approvals = 2
reviewers = ["octocat", "@nx-test/release"]
[scale]
replicas = 3
preview_replicas = 2
sleep_after = "30m"
production_sleep_after = "off"
"#;

    #[test]
    fn a_full_file_parses_into_settings() {
        let m = Manifest::parse(FULL, Path::new("nx.toml")).unwrap();
        assert_eq!(m.app.as_deref(), Some("web"));
        assert_eq!(m.args, ["--port", "$PORT"]);
        assert_eq!(m.env["LOG_LEVEL"], "info");
        assert_eq!(m.promote.on, Some(PromoteOn::Manual));
        let s = m.settings_over(&AppSettings::default()).unwrap().unwrap();
        assert_eq!(s.health, Some(HealthSetting::Http { path: "/healthz".into() }));
        assert_eq!(s.limits.memory_mib, Some(256));
        assert_eq!(s.limits.data_mib, Some(2048));
        assert_eq!(s.limits.cpu, Some(0.5));
        assert_eq!(s.preview_db, PreviewDb::Empty);
        assert_eq!((s.scale.replicas, s.scale.preview_replicas), (Some(3), Some(2)));
        assert_eq!((s.preview_forks, s.fork_label()), (ForkPreviews::Label, "safe to preview"));
        assert_eq!(s.promote_on, PromoteOn::Manual);
        assert_eq!((s.approval.approvals, s.approval.reviewers.len(), s.approval.allow_author), (2, 2, false));
        assert_eq!((s.scale.preview_sleep_secs, s.scale.production_sleep_secs), (Some(1800), Some(0)));
        // Applied once, the same file changes nothing.
        assert_eq!(m.settings_over(&s).unwrap(), None);
    }

    #[test]
    fn mistakes_name_the_file_the_line_and_the_field() {
        let e = Manifest::parse("app = \"web\"\nmemroy = 5\n", Path::new("/repo/nx.toml")).unwrap_err().to_string();
        assert!(e.contains("/repo/nx.toml") && e.contains("line 2") && e.contains("memroy"), "{e}");
        let e = Manifest::parse("[limits]\nmemory = \"lots\"\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("limits.memory"), "{e}");
        let e = Manifest::parse("[health]\npath = \"/\"\ntcp = true\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("exactly one"), "{e}");
        let e = Manifest::parse("[scale]\nsleep_after = \"1s\"\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("nx.toml: [scale] sleep_after \"1s\" must be whole seconds, at least 2s"), "{e}");
        let e = Manifest::parse("[preview]\ndatabase = \"fresh\"\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("shared") && e.contains("empty"), "{e}");
        let e = Manifest::parse("[preview]\nforks = \"always\"\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("never") && e.contains("label"), "{e}");
        let e = Manifest::parse("[preview]\nfork_label = \"\"\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("nx.toml: [preview] fork label \"\" must be 1 to 50 characters"), "{e}");
        let e = Manifest::parse("[promote]\napprovals = 0\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("approvals must be at least 1"), "{e}");
        let e = Manifest::parse("[promote]\nreviewers = [\"@org\"]\n", Path::new("nx.toml")).unwrap_err().to_string();
        assert!(e.contains("\"@org\" is neither a GitHub login"), "{e}");
    }

    #[test]
    fn the_file_is_found_up_to_the_repository_root() {
        let root = std::env::temp_dir().join(format!("nx-manifest-{}", std::process::id()));
        let deep = root.join("repo/service/src");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(root.join("repo/.git")).unwrap();
        assert_eq!(find(&deep), None);
        std::fs::write(root.join("nx.toml"), "").unwrap();
        assert_eq!(find(&deep), None, "nothing above the repository counts");
        std::fs::write(root.join("repo/service/nx.toml"), "").unwrap();
        assert_eq!(find(&deep), Some(root.join("repo/service/nx.toml")));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
