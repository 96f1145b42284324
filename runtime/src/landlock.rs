//! Landlock confinement of a sandbox, applied by the child before it executes
//! bwrap and so inherited by bwrap and everything the app starts:
//!
//! - **TCP binds** (ABI 4): only the deployment's own port. Apps share the
//!   host's network namespace, so without this a hostile app could bind a
//!   neighbour's port the moment the neighbour crashed and receive its traffic.
//!   Port 0 is not allowed either (an ephemeral bind serves no app that was
//!   given its port, and the kernel's ephemeral range is the operator's to
//!   keep apart from `--port-range`). Connecting is not restricted. A socket
//!   that listens without binding would still be given a port of the
//!   kernel's automatic range, since Landlock does not see `listen`: the
//!   shim's listen guard ([`crate::listen`]) refuses that.
//! - **Scopes** (ABI 6): abstract unix sockets and signals outside the sandbox's
//!   own Landlock domain are unreachable, so a host daemon listening on an
//!   abstract socket (a display server, systemd's, a container runtime's) cannot
//!   be reached from inside.
//!
//! On a kernel without Landlock, or with an older ABI, what cannot be enforced
//! is reported as not enforced with the reason; the rest still applies.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nx_protocol::api::Enforcement;

use crate::sys;

/// The first ABI with TCP bind rules.
pub const NET_ABI: u32 = 4;
/// The first ABI with abstract unix socket and signal scoping.
pub const SCOPE_ABI: u32 = 6;

/// What Landlock offers on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// The kernel's Landlock ABI version.
    Abi(u32),
    /// No Landlock: the errno of the version query.
    Unavailable(Errno),
}

impl Support {
    /// Asks the running kernel.
    pub fn detect() -> Support {
        match sys::landlock_abi() {
            Ok(abi) => Support::Abi(abi),
            Err(e) => Support::Unavailable(e),
        }
    }

    fn abi(self) -> u32 {
        match self {
            Support::Abi(v) => v,
            Support::Unavailable(_) => 0,
        }
    }

    /// The ruleset for a sandbox whose app listens on `port`, or `None` when
    /// the kernel can enforce none of it.
    pub fn ruleset(self, port: u16) -> std::io::Result<Option<OwnedFd>> {
        let (net, ports): (u64, &[u16]) =
            if self.abi() >= NET_ABI { (sys::LANDLOCK_NET_BIND_TCP, &[port]) } else { (0, &[]) };
        let scoped =
            if self.abi() >= SCOPE_ABI { sys::LANDLOCK_SCOPE_ABSTRACT_UNIX | sys::LANDLOCK_SCOPE_SIGNAL } else { 0 };
        if net == 0 && scoped == 0 {
            return Ok(None);
        }
        sys::landlock_ruleset(net, ports, scoped).map(Some)
    }

    /// The isolation report lines: `ports` and `abstract sockets`.
    pub fn report(self) -> Vec<Enforcement> {
        let line = |limit: &str, value: &str, needed: u32, feature: &str, since: &str| {
            if self.abi() >= needed {
                return Enforcement::enforced(limit, value.into(), "landlock");
            }
            let why = match self {
                Support::Unavailable(Errno::EOPNOTSUPP) => {
                    "Landlock is disabled on this kernel (add landlock to the lsm= boot parameter)".to_owned()
                }
                Support::Unavailable(e) => format!("this kernel has no Landlock ({e})"),
                Support::Abi(v) => {
                    format!("this kernel's Landlock ABI is {v}; {feature} needs ABI {needed} (Linux {since})")
                }
            };
            Enforcement::missing(limit, value.into(), &why)
        };
        vec![
            line("ports", "only its own TCP port can be bound", NET_ABI, "binding rules", "6.7"),
            line("abstract sockets", "the host's unreachable", SCOPE_ABI, "scoping", "6.12"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_says_what_each_abi_enforces_and_why_not() {
        let full = Support::Abi(7).report();
        assert!(full.iter().all(|e| e.by.as_deref() == Some("landlock") && e.note.is_none()), "{full:?}");

        let old = Support::Abi(5).report();
        assert_eq!(old[0].by.as_deref(), Some("landlock"));
        assert_eq!(old[1].by, None);
        assert_eq!(old[1].note.as_deref(), Some("this kernel's Landlock ABI is 5; scoping needs ABI 6 (Linux 6.12)"));

        let none = Support::Unavailable(Errno::ENOSYS).report();
        assert!(none.iter().all(|e| e.by.is_none()), "{none:?}");
        assert!(none[0].note.as_deref().unwrap().starts_with("this kernel has no Landlock (ENOSYS"), "{none:?}");
        let off = Support::Unavailable(Errno::EOPNOTSUPP).report();
        assert!(off[0].note.as_deref().unwrap().contains("lsm= boot parameter"), "{off:?}");
    }

    #[test]
    fn nothing_to_apply_without_landlock() {
        assert!(Support::Unavailable(Errno::ENOSYS).ruleset(20000).unwrap().is_none());
        assert!(Support::Abi(3).ruleset(20000).unwrap().is_none());
    }

    #[test]
    fn this_kernel_builds_a_ruleset_for_its_abi() {
        let support = Support::detect();
        match support {
            Support::Abi(v) if v >= NET_ABI => assert!(support.ruleset(20000).unwrap().is_some()),
            other => panic!("the test host's kernel must have Landlock ABI {NET_ABI}+ (found {other:?})"),
        }
    }
}
