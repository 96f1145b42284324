//! The operator's caps on an app's limits, and what counts as raising them.
//!
//! An app's limits are its settings over the receiver's defaults
//! (`ServeConfig::limits_for`). Nobody, the admin included, may set one above
//! the operator's cap (`--max-app-memory` ...), and a deploy key may not raise
//! one at all: otherwise a leaked deploy key could take the host's memory,
//! CPU or disk (a data volume is a sparse image, so its size is not checked
//! against free space by anything else).

use nx_protocol::api::{LimitSettings, ScaleSettings};

use crate::config::ServeConfig;

/// A limit above the operator's cap.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{limit} {asked} is over this server's cap of {cap}; the operator sets it with --max-app-{flag}")]
pub struct OverCap {
    pub limit: &'static str,
    pub flag: &'static str,
    pub asked: String,
    pub cap: String,
}

/// One limit in comparable units, with how to show it.
struct Value {
    limit: &'static str,
    flag: &'static str,
    value: f64,
    cap: f64,
    unit: &'static str,
}

impl Value {
    fn show(&self, v: f64) -> String {
        match self.unit {
            "MiB" => format!("{} MiB", v as u64),
            _ => format!("{v}"),
        }
    }
}

/// The effective limits of `own` (settings over the defaults), each with its
/// cap, in the settings' own units: compared before anything is converted to
/// bytes, so no value can wrap around into a small one.
fn effective(config: &ServeConfig, own: &LimitSettings) -> [Value; 6] {
    let mib = |bytes: u64| (bytes >> 20) as f64;
    let or_mib = |v: Option<u64>, default: u64| v.map_or(mib(default), |m| m as f64);
    [
        Value {
            limit: "memory",
            flag: "memory",
            value: or_mib(own.memory_mib, config.default_memory),
            cap: mib(config.max_app_memory),
            unit: "MiB",
        },
        Value {
            limit: "cpu",
            flag: "cpu",
            value: own.cpu.unwrap_or(config.default_cpu),
            cap: config.max_app_cpu,
            unit: "cores",
        },
        Value {
            limit: "pids",
            flag: "pids",
            value: f64::from(own.pids.unwrap_or(config.default_pids)),
            cap: f64::from(config.max_app_pids),
            unit: "",
        },
        Value {
            limit: "nofile",
            flag: "nofile",
            value: own.nofile.unwrap_or(config.default_nofile) as f64,
            cap: config.max_app_nofile as f64,
            unit: "",
        },
        Value {
            limit: "tmp",
            flag: "tmp",
            value: or_mib(own.tmp_mib, config.default_tmp),
            cap: mib(config.max_app_tmp),
            unit: "MiB",
        },
        Value {
            limit: "data",
            flag: "data",
            value: or_mib(own.data_mib, config.default_data),
            cap: mib(config.max_app_data),
            unit: "MiB",
        },
    ]
}

/// Whether `own` stays within the operator's caps.
pub fn within_caps(config: &ServeConfig, own: &LimitSettings) -> Result<(), OverCap> {
    for v in effective(config, own) {
        if v.value > v.cap {
            return Err(OverCap { limit: v.limit, flag: v.flag, asked: v.show(v.value), cap: v.show(v.cap) });
        }
    }
    Ok(())
}

/// The most replicas an app may run.
pub const MAX_REPLICAS: u32 = 16;

/// Why a replica count is refused; `kind` is `""` for production's, `"preview "` for previews'.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplicasRefused {
    #[error("{kind}replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")]
    OutOfRange { kind: &'static str, replicas: u32 },
    #[error("{replicas} {kind}replicas of {each} {limit} each need {total} {limit}, over this server's cap of {cap} per app; lower the {kind}replicas or the app's {limit} limit (`nx apps set APP --{flag} ...`), or the operator raises --max-app-{flag}")]
    OverCap {
        kind: &'static str,
        replicas: u32,
        limit: &'static str,
        flag: &'static str,
        each: String,
        total: String,
        cap: String,
    },
}

/// Whether the replicas of `scale` (production's, then each preview's)
/// stay within the operator's per-app caps with the limits `own`: each
/// replica has the app's limits (memory, cpu, tasks, descriptors and /tmp
/// in a cgroup and sandbox of its own), so N of them cost N times as much.
/// Only `data` is shared: one volume.
pub fn replicas_within_caps(
    config: &ServeConfig,
    own: &LimitSettings,
    scale: &ScaleSettings,
) -> Result<(), ReplicasRefused> {
    for (kind, replicas) in [("", scale.replicas), ("preview ", scale.preview_replicas)] {
        count_within_caps(config, own, kind, replicas.unwrap_or(1))?;
    }
    Ok(())
}

fn count_within_caps(
    config: &ServeConfig,
    own: &LimitSettings,
    kind: &'static str,
    replicas: u32,
) -> Result<(), ReplicasRefused> {
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(ReplicasRefused::OutOfRange { kind, replicas });
    }
    for v in effective(config, own).into_iter().filter(|v| v.limit != "data") {
        let total = v.value * f64::from(replicas);
        if total > v.cap {
            return Err(ReplicasRefused::OverCap {
                kind,
                replicas,
                limit: v.limit,
                flag: v.flag,
                each: v.show(v.value),
                total: v.show(total),
                cap: v.show(v.cap),
            });
        }
    }
    Ok(())
}

/// The first limit that `new` raises over `current`, as "memory (512 MiB to 1024 MiB)".
pub fn raised(config: &ServeConfig, current: &LimitSettings, new: &LimitSettings) -> Option<String> {
    effective(config, current)
        .into_iter()
        .zip(effective(config, new))
        .find(|(old, new)| new.value > old.value)
        .map(|(old, new)| format!("{} ({} to {})", new.limit, old.show(old.value), new.show(new.value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(caps: &[(&str, &str)]) -> ServeConfig {
        let mut config = ServeConfig::defaults();
        for (flag, value) in caps {
            match *flag {
                "--max-app-memory" => config.max_app_memory = nx_protocol::units::parse_size(value).unwrap(),
                "--max-app-cpu" => config.max_app_cpu = value.parse().unwrap(),
                other => panic!("{other} is not set by these tests"),
            }
        }
        config
    }

    #[test]
    fn defaults_are_within_the_default_caps() {
        assert_eq!(within_caps(&config(&[]), &LimitSettings::default()), Ok(()));
    }

    #[test]
    fn a_limit_over_its_cap_is_refused_with_the_flag_to_raise_it() {
        let c = config(&[("--max-app-memory", "2GiB")]);
        let ask = LimitSettings { memory_mib: Some(100_000 * 1024), ..Default::default() };
        let err = within_caps(&c, &ask).unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory 102400000 MiB is over this server's cap of 2048 MiB; the operator sets it with --max-app-memory"
        );
        let cpu = LimitSettings { cpu: Some(64.0), ..Default::default() };
        assert_eq!(within_caps(&c, &cpu).unwrap_err().limit, "cpu");
        let data = LimitSettings { data_mib: Some(u64::MAX >> 20), ..Default::default() };
        assert_eq!(within_caps(&c, &data).unwrap_err().limit, "data");
        // 2^44 MiB is 0 once shifted into bytes: it must still count as huge.
        let wraps = LimitSettings { memory_mib: Some(1 << 44), tmp_mib: Some(1 << 44), ..Default::default() };
        assert_eq!(within_caps(&c, &wraps).unwrap_err().limit, "memory");
    }

    #[test]
    fn replicas_cost_their_count_times_the_limits() {
        let c = config(&[("--max-app-memory", "2GiB")]);
        let own = LimitSettings { memory_mib: Some(512), cpu: Some(0.5), ..Default::default() };
        assert_eq!(replicas_within_caps(&c, &own, &production(4)), Ok(()));
        assert_eq!(
            replicas_within_caps(&c, &own, &production(5)).unwrap_err().to_string(),
            "5 replicas of 512 MiB memory each need 2560 MiB memory, over this server's cap of 2048 MiB per app; \
             lower the replicas or the app's memory limit (`nx apps set APP --memory ...`), or the operator raises \
             --max-app-memory"
        );
        assert_eq!(
            replicas_within_caps(&config(&[]), &LimitSettings::default(), &production(5)).unwrap_err().to_string(),
            "5 replicas of 1 cpu each need 5 cpu, over this server's cap of 4 per app; lower the replicas or the \
             app's cpu limit (`nx apps set APP --cpu ...`), or the operator raises --max-app-cpu"
        );
        // Tasks, descriptors and /tmp count N times too: N fork bombs, not one.
        let big = config(&[("--max-app-memory", "64GiB"), ("--max-app-cpu", "64")]);
        let small = LimitSettings { memory_mib: Some(64), cpu: Some(0.1), tmp_mib: Some(16), ..Default::default() };
        assert_eq!(
            replicas_within_caps(&big, &small, &production(9)).unwrap_err().to_string(),
            "9 replicas of 512 pids each need 4608 pids, over this server's cap of 4096 per app; lower the replicas \
             or the app's pids limit (`nx apps set APP --pids ...`), or the operator raises --max-app-pids"
        );
        let fewer = LimitSettings { pids: Some(256), ..small };
        assert_eq!(replicas_within_caps(&big, &fewer, &production(16)), Ok(()));
        let tmp = LimitSettings { tmp_mib: None, ..fewer };
        assert_eq!(
            replicas_within_caps(&big, &tmp, &production(5)),
            Err(ReplicasRefused::OverCap {
                kind: "",
                replicas: 5,
                limit: "tmp",
                flag: "tmp",
                each: "256 MiB".into(),
                total: "1280 MiB".into(),
                cap: "1024 MiB".into()
            })
        );
        let files = LimitSettings { nofile: Some(8192), ..fewer };
        assert!(matches!(
            replicas_within_caps(&big, &files, &production(9)),
            Err(ReplicasRefused::OverCap { limit: "nofile", .. })
        ));
        for n in [0, MAX_REPLICAS + 1] {
            assert_eq!(
                replicas_within_caps(&c, &own, &production(n)),
                Err(ReplicasRefused::OutOfRange { kind: "", replicas: n })
            );
        }
        // Each preview's replicas cost as much, and are checked on their own.
        let previews = ScaleSettings { preview_replicas: Some(5), ..production(4) };
        assert_eq!(
            replicas_within_caps(&config(&[]), &LimitSettings::default(), &previews).unwrap_err().to_string(),
            "5 preview replicas of 1 cpu each need 5 cpu, over this server's cap of 4 per app; lower the preview \
             replicas or the app's cpu limit (`nx apps set APP --cpu ...`), or the operator raises --max-app-cpu"
        );
        let none = ScaleSettings { preview_replicas: Some(0), ..ScaleSettings::default() };
        assert_eq!(
            replicas_within_caps(&c, &own, &none).unwrap_err().to_string(),
            "preview replicas must be between 1 and 16, not 0"
        );
    }

    fn production(replicas: u32) -> ScaleSettings {
        ScaleSettings { replicas: Some(replicas), ..ScaleSettings::default() }
    }

    #[test]
    fn raising_is_measured_against_the_effective_limit() {
        let c = config(&[]);
        let none = LimitSettings::default();
        let lower = LimitSettings { memory_mib: Some(128), ..Default::default() };
        let higher = LimitSettings { memory_mib: Some(1024), ..Default::default() };
        assert_eq!(raised(&c, &none, &lower), None, "lowering below the default");
        assert_eq!(raised(&c, &none, &none), None, "keeping");
        assert_eq!(raised(&c, &none, &higher).as_deref(), Some("memory (512 MiB to 1024 MiB)"));
        assert_eq!(
            raised(&c, &lower, &none).as_deref(),
            Some("memory (128 MiB to 512 MiB)"),
            "back to the default is up"
        );
    }
}
