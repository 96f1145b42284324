//! Resource limits through cgroups: v2 where its controllers are available,
//! v1 hierarchies where that is what the host has, and a report of what could
//! not be enforced, so nothing is skipped silently.
//!
//! The cgroup root (`/sys/fs/cgroup` in production) is passed in: the unit tests
//! run against a temporary directory shaped like each layout.

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::sys;

/// Limits for one sandbox. `None` means no limit asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPU in thousandths of a core (1000 = one core).
    pub cpu_millis: Option<u32>,
    pub pids: Option<u32>,
    pub nofile: Option<u64>,
    pub tmp_bytes: u64,
    pub data_bytes: Option<u64>,
}

impl Limits {
    /// No limit at all: a parked slot's cgroup, before a sandbox claims it.
    pub const NONE: Limits =
        Limits { memory_bytes: None, cpu_millis: None, pids: None, nofile: None, tmp_bytes: 0, data_bytes: None };
}

pub use nx_protocol::api::Enforcement;

/// Human form of a byte count.
pub fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Failures to set up a cgroup; the path says where.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write { path: PathBuf, value: String, source: std::io::Error },
    #[error("cannot move cgroup {from} to {to}: {source}")]
    Claim { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("the parked cgroup {slot:?} is not in the hierarchies of {wanted:?}")]
    Unlike { slot: Vec<PathBuf>, wanted: Vec<PathBuf> },
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.into(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create { path: path.to_owned(), source }),
    }
}

/// Which cgroup layout the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// The unified hierarchy at this path, with these controllers available.
    V2 { root: PathBuf, controllers: Vec<String> },
    /// Legacy hierarchies, one path per controller that is mounted.
    V1 { memory: Option<PathBuf>, cpu: Option<PathBuf>, pids: Option<PathBuf> },
    /// No usable cgroups.
    None,
}

const WANTED: [&str; 3] = ["memory", "cpu", "pids"];

impl Driver {
    /// Reads the layout under `root` (`/sys/fs/cgroup`). cgroup v2 is used when
    /// it offers at least one of the controllers we need; otherwise the v1
    /// hierarchies that are mounted.
    pub fn detect(root: &Path) -> Driver {
        for unified in [root.to_owned(), root.join("unified")] {
            if let Ok(text) = std::fs::read_to_string(unified.join("cgroup.controllers")) {
                let controllers: Vec<String> =
                    text.split_whitespace().filter(|c| WANTED.contains(c)).map(str::to_owned).collect();
                if !controllers.is_empty() {
                    return Driver::V2 { root: unified, controllers };
                }
            }
        }
        let v1 = |name: &str, probe: &str| Some(root.join(name)).filter(|d| d.join(probe).exists());
        let memory = v1("memory", "memory.limit_in_bytes");
        let cpu = v1("cpu", "cpu.cfs_quota_us").or_else(|| v1("cpu,cpuacct", "cpu.cfs_quota_us"));
        // The root of a v1 pids hierarchy has no pids.max; its children do.
        let pids = v1("pids", "cgroup.procs");
        if memory.is_none() && cpu.is_none() && pids.is_none() {
            Driver::None
        } else {
            Driver::V1 { memory, cpu, pids }
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Driver::V2 { .. } => "cgroup v2",
            Driver::V1 { .. } => "cgroup v1",
            Driver::None => "none",
        }
    }

    /// Whether this host has the cgroup controller `name` for sandboxes.
    fn has(&self, name: &str) -> bool {
        match self {
            Driver::V2 { controllers, .. } => controllers.iter().any(|c| c == name),
            Driver::V1 { memory, cpu, pids } => match name {
                "memory" => memory.is_some(),
                "cpu" => cpu.is_some(),
                "pids" => pids.is_some(),
                _ => false,
            },
            Driver::None => false,
        }
    }

    /// What cgroups enforce of `limits` on this host, without touching it.
    pub fn plan(&self, limits: &Limits) -> Vec<Enforcement> {
        let note = match self {
            Driver::None => "this host has no usable cgroups",
            _ => "no such cgroup controller on this host",
        };
        let entry = |controller: &str, value: String| {
            if self.has(controller) {
                Enforcement::enforced(controller, value, self.describe())
            } else {
                Enforcement::missing(controller, value, note)
            }
        };
        let mut report = Vec::new();
        if let Some(m) = limits.memory_bytes {
            report.push(entry("memory", mib(m)));
        }
        if let Some(c) = limits.cpu_millis {
            report.push(entry("cpu", cores(c)));
        }
        if let Some(p) = limits.pids {
            report.push(entry("pids", p.to_string()));
        }
        report
    }

    /// The cgroup `group/name` (group is this receiver's parent, shared by
    /// its sandboxes) with the `limits` its controllers can take
    /// ([`Driver::plan`] says which), without touching the host:
    /// [`Cgroup::create`] makes it, or [`Cgroup::claim`] takes a parked one
    /// over. On v1 it has a directory in every hierarchy the host has, limited
    /// or not, so a fresh sandbox and one started from a parked slot are
    /// alike. The limits cgroups cannot take (nofile, tmp, data) are left to
    /// the caller.
    pub fn prepare(&self, group: &str, name: &str, limits: &Limits) -> Cgroup {
        let mut cg = Cgroup::default();
        let set =
            |cg: &mut Cgroup, file: PathBuf, value: String| cg.limits.push(Setting { file, value, if_present: false });
        match self {
            Driver::V2 { root, controllers } => {
                let parent = root.join(group);
                let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
                // Controllers flow down only where every ancestor enables them.
                cg.parents.push(parent.clone());
                for dir in [root, &parent] {
                    cg.enable.push(Setting {
                        file: dir.join("cgroup.subtree_control"),
                        value: enable.join(" "),
                        if_present: false,
                    });
                }
                let dir = parent.join(name);
                if let (Some(m), true) = (limits.memory_bytes, self.has("memory")) {
                    set(&mut cg, dir.join("memory.max"), m.to_string());
                    // No swap: the limit is the memory the app gets.
                    cg.limits.push(Setting { file: dir.join("memory.swap.max"), value: "0".into(), if_present: true });
                }
                if let (Some(c), true) = (limits.cpu_millis, self.has("cpu")) {
                    set(&mut cg, dir.join("cpu.max"), format!("{} 100000", u64::from(c) * 100));
                }
                if let (Some(p), true) = (limits.pids, self.has("pids")) {
                    set(&mut cg, dir.join("pids.max"), p.to_string());
                }
                cg.dirs.push(dir);
            }
            Driver::V1 { memory, cpu, pids } => {
                for hierarchy in [memory, cpu, pids].into_iter().flatten() {
                    cg.parents.push(hierarchy.join(group));
                    cg.dirs.push(hierarchy.join(group).join(name));
                }
                let dir = |h: &Option<PathBuf>| h.as_ref().map(|h| h.join(group).join(name));
                if let (Some(m), Some(dir)) = (limits.memory_bytes, dir(memory)) {
                    set(&mut cg, dir.join("memory.limit_in_bytes"), m.to_string());
                    cg.limits.push(Setting {
                        file: dir.join("memory.memsw.limit_in_bytes"),
                        value: m.to_string(),
                        if_present: true,
                    });
                }
                if let (Some(c), Some(dir)) = (limits.cpu_millis, dir(cpu)) {
                    set(&mut cg, dir.join("cpu.cfs_period_us"), "100000".into());
                    set(&mut cg, dir.join("cpu.cfs_quota_us"), (u64::from(c) * 100).to_string());
                }
                if let (Some(p), Some(dir)) = (limits.pids, dir(pids)) {
                    set(&mut cg, dir.join("pids.max"), p.to_string());
                }
            }
            Driver::None => {}
        }
        cg
    }

    /// Removes the directories of `group` (a receiver's parent of its
    /// sandboxes' cgroups) that are empty; one still holding a cgroup stays.
    pub fn remove_group(&self, group: &str) {
        let roots: Vec<&PathBuf> = match self {
            Driver::V2 { root, .. } => vec![root],
            Driver::V1 { memory, cpu, pids } => [memory, cpu, pids].into_iter().flatten().collect(),
            Driver::None => Vec::new(),
        };
        for root in roots {
            let _ = std::fs::remove_dir(root.join(group));
        }
    }

    /// Creates the cgroup `group/name` with `limits` ([`Driver::prepare`]).
    pub fn create(&self, group: &str, name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let cg = self.prepare(group, name, limits);
        cg.create()?;
        Ok(cg)
    }
}

/// One value written into a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    file: PathBuf,
    value: String,
    /// Written only where the kernel offers the file (swap accounting is
    /// optional).
    if_present: bool,
}

impl Setting {
    fn apply(&self) -> Result<(), CgroupError> {
        if self.if_present && !self.file.exists() {
            return Ok(());
        }
        write(&self.file, &self.value)
    }
}

fn cores(millis: u32) -> String {
    format!("{:.1} cores", f64::from(millis) / 1000.0)
}

/// Everything that enforces one sandbox's limits.
#[derive(Debug, Clone)]
pub struct Enforced {
    pub cgroup: Cgroup,
    pub rlimits: Vec<sys::Rlimit>,
    pub report: Vec<Enforcement>,
}

fn rlimit(resource: sys::RlimitResource, value: u64) -> sys::Rlimit {
    sys::Rlimit { resource, soft: value, hard: value }
}

/// The cgroup for `limits` (made when the sandbox starts: see
/// [`Driver::prepare`]) and resource limits for the gaps: open files always
/// by rlimit; memory by RLIMIT_DATA and processes by RLIMIT_NPROC (counted
/// per uid, and every app has its own) only where no cgroup controller can;
/// the /tmp size by its tmpfs. The data volume is the caller's, which
/// appends its own entry.
pub fn enforce(driver: &Driver, group: &str, name: &str, limits: &Limits) -> Enforced {
    let cgroup = driver.prepare(group, name, limits);
    let (report, rlimits) = plan(driver, limits);
    Enforced { cgroup, rlimits, report }
}

/// What [`enforce`] would report and which resource limits it would set,
/// without touching the host.
pub fn plan(driver: &Driver, limits: &Limits) -> (Vec<Enforcement>, Vec<sys::Rlimit>) {
    use sys::RlimitResource as R;
    let mut report = driver.plan(limits);
    let mut rlimits = vec![rlimit(R::Core, 0)];
    for e in &mut report {
        if e.by.is_some() {
            continue;
        }
        match e.limit.as_str() {
            "memory" => {
                if let Some(m) = limits.memory_bytes {
                    rlimits.push(rlimit(R::Data, m));
                    e.by = Some("rlimit (data segment)".into());
                }
            }
            "pids" => {
                if let Some(p) = limits.pids {
                    rlimits.push(rlimit(R::NProc, u64::from(p)));
                    e.by = Some("rlimit (processes of the app's uid)".into());
                }
            }
            "cpu" => {
                e.note =
                    Some("no cpu cgroup controller; RLIMIT_CPU caps CPU time, not a share, so it is not used".into())
            }
            _ => {}
        }
    }
    if let Some(n) = limits.nofile {
        rlimits.push(rlimit(R::NoFile, n));
        report.push(Enforcement::enforced("nofile", n.to_string(), "rlimit"));
    }
    report.push(Enforcement::enforced("tmp", mib(limits.tmp_bytes), "tmpfs"));
    (report, rlimits)
}

/// One sandbox's cgroups (one directory per v1 hierarchy, one for v2), and
/// how they are made: what [`Driver::prepare`] planned, nothing for one
/// known by its directories alone ([`Cgroup::from_dirs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    /// Shared parents, made first.
    parents: Vec<PathBuf>,
    /// Written into the parents (cgroup v2's controllers) before the
    /// directories are made.
    enable: Vec<Setting>,
    /// Written into the directories, in order.
    limits: Vec<Setting>,
}

impl Cgroup {
    /// Makes the directories and writes the limits; what exists already is
    /// kept (a new life of a sandbox joins the cgroup of the last).
    pub fn create(&self) -> Result<(), CgroupError> {
        for parent in &self.parents {
            mkdir(parent)?;
        }
        for setting in &self.enable {
            setting.apply()?;
        }
        for dir in &self.dirs {
            mkdir(dir)?;
        }
        self.limits.iter().try_for_each(Setting::apply)
    }

    /// Takes over the cgroup `slot` (made by [`Cgroup::create`] under the
    /// same parents, its processes already in it): an empty directory of
    /// this name left by an earlier life is removed, the slot's directories
    /// are renamed to this cgroup's names (the kernel moves no task for a
    /// rename, so nothing waits on its locks), and this cgroup's limits are
    /// written into them. The limits are in place when this returns. On an
    /// error the directories may be partly renamed: [`Cgroup::claim_leftovers`]
    /// says which to clear.
    pub fn claim(&self, slot: &Cgroup) -> Result<(), CgroupError> {
        let paired = self.dirs.len() == slot.dirs.len()
            && self.dirs.iter().zip(&slot.dirs).all(|(to, from)| to.parent() == from.parent());
        if !paired {
            return Err(CgroupError::Unlike { slot: slot.dirs.clone(), wanted: self.dirs.clone() });
        }
        for (to, from) in self.dirs.iter().zip(&slot.dirs) {
            match std::fs::remove_dir(to) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CgroupError::Claim { from: from.clone(), to: to.clone(), source: e })
                }
                _ => {}
            }
            std::fs::rename(from, to).map_err(|source| CgroupError::Claim {
                from: from.clone(),
                to: to.clone(),
                source,
            })?;
        }
        self.limits.iter().try_for_each(Setting::apply)
    }

    /// After a [`Cgroup::claim`] of `slot` failed: every directory of the
    /// slot's that exists under either name, to be destroyed.
    pub fn claim_leftovers(&self, slot: &Cgroup) -> Cgroup {
        let dirs = self.dirs.iter().chain(&slot.dirs).filter(|d| d.is_dir()).cloned().collect();
        Cgroup::from_dirs(dirs)
    }

    /// The files a process writes its pid to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Every process in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            // Never 0 or below: a signal to those reaches a whole process
            // group, or every process.
            .flat_map(|t| t.split_whitespace().filter_map(|p| p.parse().ok()).filter(|p| *p > 0).collect::<Vec<_>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The cgroup made of these directories (as [`Cgroup::dirs`] gave them),
    /// for a process that did not create it: a shim, or `stop-all`.
    pub fn from_dirs(dirs: Vec<PathBuf>) -> Cgroup {
        Cgroup { dirs, ..Cgroup::default() }
    }

    /// One directory per v1 hierarchy, one for v2.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Kills whatever is still inside and removes the directories. Safe to
    /// call on an empty cgroup.
    pub fn destroy(&self) {
        self.kill_all();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Kills every process inside (`cgroup.kill` on v2, SIGKILL per process
    /// on v1) and waits, up to a second, until none is left; the directories
    /// stay, so a new sandbox can join them.
    pub fn kill_all(&self) {
        for dir in &self.dirs {
            let kill = dir.join("cgroup.kill");
            if kill.exists() {
                let _ = std::fs::write(&kill, "1");
            }
        }
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = sys::signal_process(pid, Signal::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Times the memory limit was hit and a process was killed for it.
    pub fn oom_kills(&self) -> u64 {
        for dir in &self.dirs {
            // v2: memory.events "oom_kill N"; v1: memory.oom_control "oom_kill N".
            for file in ["memory.events", "memory.oom_control"] {
                if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                    if let Some(n) = text.lines().find_map(|l| l.strip_prefix("oom_kill ")) {
                        return n.trim().parse().unwrap_or(0);
                    }
                }
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nx-cgroup-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn limits() -> Limits {
        Limits {
            memory_bytes: Some(256 << 20),
            cpu_millis: Some(500),
            pids: Some(64),
            nofile: Some(1024),
            tmp_bytes: 64 << 20,
            data_bytes: None,
        }
    }

    #[test]
    fn v2_limits_are_written_and_controllers_enabled() {
        let root = tree("v2");
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma\n").unwrap();
        // The kernel makes these files in every new cgroup; the fake needs them up front.
        std::fs::create_dir_all(root.join("nx/d1")).unwrap();
        std::fs::write(root.join("nx/d1/memory.swap.max"), "max\n").unwrap();
        let driver = Driver::detect(&root);
        assert!(matches!(&driver, Driver::V2 { controllers, .. } if controllers.len() == 3), "{driver:?}");
        let (cg, report) = (driver.create("nx", "d1", &limits()).unwrap(), driver.plan(&limits()));
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        // In the order the kernel lists them.
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("nx/cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("nx/d1/memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("nx/d1/memory.swap.max"), "0");
        assert_eq!(read("nx/d1/cpu.max"), "50000 100000");
        assert_eq!(read("nx/d1/pids.max"), "64");
        assert_eq!(cg.procs_files(), vec![root.join("nx/d1/cgroup.procs")]);
        assert!(report.iter().all(|e| e.by.as_deref() == Some("cgroup v2")), "{report:?}");
        assert_eq!(report.len(), 3);
    }

    #[test]
    fn v2_with_only_hugetlb_falls_back_to_v1() {
        // The layout of the test machines: unified has only hugetlb, v1 has the rest.
        let root = tree("hybrid");
        std::fs::create_dir_all(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        for (dir, file) in [("memory", "memory.limit_in_bytes"), ("cpu", "cpu.cfs_quota_us"), ("pids", "cgroup.procs")]
        {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join(file), "").unwrap();
        }
        let driver = Driver::detect(&root);
        assert!(matches!(driver, Driver::V1 { memory: Some(_), cpu: Some(_), pids: Some(_) }), "{driver:?}");
        let (cg, report) = (driver.create("nx", "d1", &limits()).unwrap(), driver.plan(&limits()));
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("memory/nx/d1/memory.limit_in_bytes"), (256u64 << 20).to_string());
        assert_eq!(read("cpu/nx/d1/cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu/nx/d1/cpu.cfs_period_us"), "100000");
        assert_eq!(read("pids/nx/d1/pids.max"), "64");
        assert_eq!(cg.procs_files().len(), 3);
        assert!(report.iter().all(|e| e.by.as_deref() == Some("cgroup v1")), "{report:?}");
    }

    #[test]
    fn missing_controllers_are_reported_not_skipped() {
        let root = tree("partial");
        std::fs::create_dir_all(root.join("pids")).unwrap();
        std::fs::write(root.join("pids/cgroup.procs"), "").unwrap();
        let report = Driver::detect(&root).plan(&limits());
        let memory = report.iter().find(|e| e.limit == "memory").unwrap();
        assert_eq!(memory.by, None);
        assert!(memory.note.as_deref().unwrap().contains("no such cgroup controller"));
        assert_eq!(report.iter().find(|e| e.limit == "pids").unwrap().by.as_deref(), Some("cgroup v1"));

        let empty = tree("none");
        assert_eq!(Driver::detect(&empty), Driver::None);
        let (cg, report) = (Driver::None.create("nx", "d1", &limits()).unwrap(), Driver::None.plan(&limits()));
        assert!(cg.procs_files().is_empty());
        assert!(report.iter().all(|e| e.by.is_none()));
    }

    #[test]
    fn rlimits_fill_the_gaps_and_everything_is_reported() {
        let e = enforce(&Driver::None, "nx", "d1", &limits());
        let by = |l: &str| e.report.iter().find(|x| x.limit == l).and_then(|x| x.by.clone());
        assert_eq!(by("memory").as_deref(), Some("rlimit (data segment)"));
        assert_eq!(by("pids").as_deref(), Some("rlimit (processes of the app's uid)"));
        assert_eq!(by("cpu"), None);
        assert_eq!(by("nofile").as_deref(), Some("rlimit"));
        assert_eq!(by("tmp").as_deref(), Some("tmpfs"));
        let resources: Vec<_> = e.rlimits.iter().map(|r| r.resource).collect();
        assert!(resources.contains(&sys::RlimitResource::Data));
        assert!(resources.contains(&sys::RlimitResource::NProc));
        assert!(resources.contains(&sys::RlimitResource::NoFile));
    }

    /// A v1 layout with the three hierarchies, as the test machines have.
    fn v1_tree(name: &str) -> (PathBuf, Driver) {
        let root = tree(name);
        for (dir, file) in [("memory", "memory.limit_in_bytes"), ("cpu", "cpu.cfs_quota_us"), ("pids", "cgroup.procs")]
        {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join(file), "").unwrap();
        }
        let driver = Driver::detect(&root);
        (root, driver)
    }

    #[test]
    fn preparing_touches_nothing_and_every_hierarchy_gets_a_directory() {
        let (root, driver) = v1_tree("prepare");
        let only_pids = Limits { memory_bytes: None, cpu_millis: None, ..limits() };
        let cg = driver.prepare("nx", "d1", &only_pids);
        assert!(!root.join("pids/nx").exists(), "prepare must not touch the host");
        assert_eq!(cg.dirs().len(), 3, "a directory per hierarchy, limited or not: {cg:?}");
        cg.create().unwrap();
        assert!(root.join("memory/nx/d1").is_dir() && root.join("cpu/nx/d1").is_dir());
        assert_eq!(std::fs::read_to_string(root.join("pids/nx/d1/pids.max")).unwrap(), "64");
        assert!(!root.join("memory/nx/d1/memory.limit_in_bytes").exists(), "no memory limit was asked for");
        // A second life keeps the directories and writes the limits again.
        cg.create().unwrap();
    }

    #[test]
    fn a_claim_renames_the_parked_cgroup_and_writes_the_limits() {
        let (root, driver) = v1_tree("claim");
        let slot = driver.create("nx", "parked-1", &Limits::NONE).unwrap();
        assert!(!root.join("memory/nx/parked-1/memory.limit_in_bytes").exists(), "a parked slot has no limits");
        let target = driver.prepare("nx", "d1", &limits());
        target.claim(&slot).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        for h in ["memory", "cpu", "pids"] {
            assert!(!root.join(h).join("nx/parked-1").exists(), "{h}: the slot's name is gone");
        }
        assert_eq!(read("memory/nx/d1/memory.limit_in_bytes"), (256u64 << 20).to_string());
        assert_eq!(read("cpu/nx/d1/cpu.cfs_quota_us"), "50000");
        assert_eq!(read("pids/nx/d1/pids.max"), "64");
        // Claimed once, the slot is gone: a second claim of it fails and
        // leaves the first sandbox's cgroup alone.
        let other = driver.prepare("nx", "d2", &limits());
        let err = other.claim(&slot).unwrap_err();
        assert!(matches!(&err, CgroupError::Claim { to, .. } if to == &root.join("memory/nx/d2")), "{err}");
        assert_eq!(read("pids/nx/d1/pids.max"), "64");
        assert!(other.claim_leftovers(&slot).dirs().is_empty(), "nothing of the slot is left to clear");
    }

    #[test]
    fn a_claim_that_cannot_finish_says_what_to_clear() {
        let (root, driver) = v1_tree("claim-fail");
        let slot = driver.create("nx", "parked-2", &Limits::NONE).unwrap();
        // The memory cgroup of an earlier life still has files in it (on
        // cgroupfs: still has processes), so it cannot be replaced.
        let target = driver.prepare("nx", "d1", &limits());
        std::fs::create_dir_all(root.join("memory/nx/d1")).unwrap();
        std::fs::write(root.join("memory/nx/d1/busy"), "").unwrap();
        let err = target.claim(&slot).unwrap_err();
        assert!(err.to_string().starts_with("cannot move cgroup "), "{err}");
        let left = target.claim_leftovers(&slot);
        assert!(
            left.dirs().contains(&root.join("memory/nx/d1")) && left.dirs().contains(&root.join("cpu/nx/parked-2"))
        );

        let elsewhere = driver.prepare("other", "d1", &limits());
        let err = elsewhere.claim(&slot).unwrap_err();
        assert!(matches!(err, CgroupError::Unlike { .. }), "{err}");
        assert!(root.join("pids/nx/parked-2").is_dir(), "an unlike slot is not touched");
    }

    #[test]
    fn oom_kills_are_read_from_either_layout() {
        let root = tree("oom");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/memory.events"), "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n").unwrap();
        assert_eq!(Cgroup::from_dirs(vec![root.join("a")]).oom_kills(), 2);
    }
}
