//! The seccomp filter every sandbox runs under, as a classic BPF program for
//! `bwrap --add-seccomp-fd`.
//!
//! It blocks what a web app never needs and what kernel exploits and sandbox
//! escapes start with: tracing other processes, mounting, new namespaces, the
//! keyring, BPF, perf, userfaultfd, io_uring, kexec, kernel modules, handle-based
//! opens, and the terminal-injection ioctls. Sockets may be made only in the
//! families a web app uses (unix, IPv4, IPv6, and netlink for route queries,
//! which `getaddrinfo` and `getifaddrs` make); every other family (AF_ALG,
//! AF_VSOCK, AF_PACKET, AF_TIPC, other netlink protocols: the usual homes of
//! kernel bugs) answers EAFNOSUPPORT, as on a kernel built without it. Any other architecture's system
//! call table (i386 through `int 0x80`, 32-bit ARM) kills the process; on x86-64
//! every x32 call is refused. `clone3` answers ENOSYS, so C libraries fall back to
//! `clone`, whose flags a filter can inspect (clone3 passes them in memory).
//!
//! The program is built by a small assembler with symbolic jump targets, and the
//! unit tests run it through an interpreter of the same instruction set, so the
//! logic is tested here and the kernel's enforcement in the attack suite.

/// One BPF instruction, laid out as the kernel's `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Instruction classes and modes used here (linux/filter.h).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// Offsets into `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of argument `i` (little-endian machines).
const fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
/// x32 system calls are x86-64 numbers with this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
const EAFNOSUPPORT: u32 = 97;
const EPROTONOSUPPORT: u32 = 93;

/// Socket families `socket` and `socketpair` may use; AF_INET and AF_INET6
/// only with [`INET_PROTOCOLS`], AF_NETLINK only with [`NETLINK_ROUTE`].
const AF_UNIX: u32 = libc::AF_UNIX as u32;
const INET_FAMILIES: [u32; 2] = [libc::AF_INET as u32, libc::AF_INET6 as u32];
/// The protocols of AF_INET and AF_INET6 sockets: the default for the type,
/// TCP, UDP and ICMP (ping). Landlock's bind rule covers plain TCP alone, so
/// MPTCP, SCTP or SMC sockets would let an app bind a neighbour's port (an
/// MPTCP listener answers plain TCP clients); they answer EPROTONOSUPPORT.
const INET_PROTOCOLS: [u32; 5] =
    [0, libc::IPPROTO_TCP as u32, libc::IPPROTO_UDP as u32, libc::IPPROTO_ICMP as u32, libc::IPPROTO_ICMPV6 as u32];
/// The types of AF_INET and AF_INET6 sockets, with or without their
/// `SOCK_NONBLOCK` and `SOCK_CLOEXEC` flags: a stream or datagram socket.
/// Others answer ESOCKTNOSUPPORT: with protocol 0 a `SOCK_SEQPACKET` socket
/// is SCTP's where its module is loaded, which the protocols alone let by.
const INET_TYPES: [u32; 2] = [libc::SOCK_STREAM as u32, libc::SOCK_DGRAM as u32];
const SOCKET_FLAGS: [u32; 4] =
    [0, libc::SOCK_NONBLOCK as u32, libc::SOCK_CLOEXEC as u32, (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u32];
const ESOCKTNOSUPPORT: u32 = 94;
const AF_NETLINK: u32 = libc::AF_NETLINK as u32;
const NETLINK_ROUTE: u32 = libc::NETLINK_ROUTE as u32;

/// Namespace flags `clone` may not carry.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWCGROUP
    | 0x80) as u32; // CLONE_NEWTIME

/// A machine the filter can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// The machine this program runs on.
    pub fn host() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Aarch64)
        } else {
            None
        }
    }

    fn audit(self) -> u32 {
        match self {
            Arch::X86_64 => AUDIT_ARCH_X86_64,
            Arch::Aarch64 => AUDIT_ARCH_AARCH64,
        }
    }
}

/// A system call known by name on each architecture.
#[derive(Debug, Clone, Copy)]
pub struct Syscall {
    pub name: &'static str,
    pub x86_64: Option<u32>,
    pub aarch64: Option<u32>,
}

const fn both(name: &'static str, x86_64: u32, aarch64: u32) -> Syscall {
    Syscall { name, x86_64: Some(x86_64), aarch64: Some(aarch64) }
}

const fn x86(name: &'static str, x86_64: u32) -> Syscall {
    Syscall { name, x86_64: Some(x86_64), aarch64: None }
}

/// Refused with EPERM outright. Numbers from the kernel's syscall tables
/// (arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h).
pub const DENIED: &[Syscall] = &[
    both("ptrace", 101, 117),
    both("process_vm_readv", 310, 270),
    both("process_vm_writev", 311, 271),
    both("mount", 165, 40),
    both("umount2", 166, 39),
    both("pivot_root", 155, 41),
    both("open_tree", 428, 428),
    both("move_mount", 429, 429),
    both("fsopen", 430, 430),
    both("fsconfig", 431, 431),
    both("fsmount", 432, 432),
    both("fspick", 433, 433),
    both("mount_setattr", 442, 442),
    both("unshare", 272, 97),
    both("setns", 308, 268),
    both("keyctl", 250, 219),
    both("add_key", 248, 217),
    both("request_key", 249, 218),
    both("bpf", 321, 280),
    both("perf_event_open", 298, 241),
    both("userfaultfd", 323, 282),
    both("io_uring_setup", 425, 425),
    both("io_uring_enter", 426, 426),
    both("io_uring_register", 427, 427),
    both("kexec_load", 246, 104),
    both("kexec_file_load", 320, 294),
    both("init_module", 175, 105),
    both("finit_module", 313, 273),
    both("delete_module", 176, 106),
    both("open_by_handle_at", 304, 265),
    both("name_to_handle_at", 303, 264),
    both("acct", 163, 89),
    both("swapon", 167, 224),
    both("swapoff", 168, 225),
    both("reboot", 169, 142),
    both("syslog", 103, 116),
    both("settimeofday", 164, 170),
    both("clock_settime", 227, 112),
    both("clock_adjtime", 305, 266),
    both("adjtimex", 159, 171),
    both("quotactl", 179, 60),
    both("vhangup", 153, 58),
    both("lookup_dcookie", 212, 18),
    both("personality", 135, 92),
    x86("uselib", 134),
    x86("iopl", 172),
    x86("ioperm", 173),
    x86("_sysctl", 156),
];

const CLONE: Syscall = both("clone", 56, 220);
const CLONE3: Syscall = both("clone3", 435, 435);
const IOCTL: Syscall = both("ioctl", 16, 29);
const SOCKET: Syscall = both("socket", 41, 198);
const LISTEN: Syscall = both("listen", 50, 201);
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const SOCKETPAIR: Syscall = both("socketpair", 53, 199);
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;

impl Syscall {
    fn nr(&self, arch: Arch) -> Option<u32> {
        match arch {
            Arch::X86_64 => self.x86_64,
            Arch::Aarch64 => self.aarch64,
        }
    }
}

/// Where a jump goes before layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Next,
    Label(Label),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Allow,
    Kill,
    Eperm,
    Enosys,
    Eafnosupport,
    Clone,
    Ioctl,
    Socket,
    Inet,
    InetProtocol,
    Netlink,
}

enum Op {
    Load(u32),
    Jump { code: u16, k: u32, jt: Target, jf: Target },
    Ret(u32),
    Mark(Label),
}

/// Starting a program: nx-router has no reason to, so a hijacked router
/// cannot run a shell.
pub const EXEC: &[Syscall] = &[both("execve", 59, 221), both("execveat", 322, 281)];

/// The filter that hands a sandbox's `listen` calls to its shim (a user
/// notification; `crate::listen` decides them): Landlock holds binds to the
/// app's own port, but a socket that listens unbound is given a port of
/// the kernel's automatic range, which Landlock does not see. Everything
/// else passes, to the sandboxes' filter that bwrap installs after it.
pub fn listen_filter(arch: Arch) -> Vec<Insn> {
    use Target::{Label as To, Next};
    let Some(listen) = LISTEN.nr(arch) else { unreachable!("both machines have listen") };
    assemble(&[
        Op::Load(OFF_ARCH),
        Op::Jump { code: BPF_JMP_JEQ_K, k: arch.audit(), jt: Next, jf: To(Label::Allow) },
        Op::Load(OFF_NR),
        Op::Jump { code: BPF_JMP_JEQ_K, k: listen, jt: Next, jf: To(Label::Allow) },
        Op::Ret(RET_USER_NOTIF),
        Op::Mark(Label::Allow),
        Op::Ret(RET_ALLOW),
    ])
}

/// Builds the sandboxes' filter for `arch`.
pub fn filter(arch: Arch) -> Vec<Insn> {
    build(arch, &[])
}

/// Builds nx-router's filter for `arch`: the sandboxes' one, and no exec.
pub fn router_filter(arch: Arch) -> Vec<Insn> {
    build(arch, EXEC)
}

/// The filter refusing [`DENIED`] and `also_denied` with EPERM.
fn build(arch: Arch, also_denied: &[Syscall]) -> Vec<Insn> {
    use Label::*;
    use Target::Next;
    let jeq = |k, jt: Target| Op::Jump { code: BPF_JMP_JEQ_K, k, jt, jf: Next };
    let mut ops =
        vec![Op::Load(OFF_ARCH), Op::Jump { code: BPF_JMP_JEQ_K, k: arch.audit(), jt: Next, jf: Target::Label(Kill) }];
    ops.push(Op::Load(OFF_NR));
    if arch == Arch::X86_64 {
        ops.push(Op::Jump { code: BPF_JMP_JGE_K, k: X32_SYSCALL_BIT, jt: Target::Label(Eperm), jf: Next });
    }
    for s in DENIED.iter().chain(also_denied) {
        if let Some(nr) = s.nr(arch) {
            ops.push(jeq(nr, Target::Label(Eperm)));
        }
    }
    for (call, label) in [(CLONE, Clone), (IOCTL, Ioctl), (CLONE3, Enosys), (SOCKET, Socket), (SOCKETPAIR, Socket)] {
        if let Some(nr) = call.nr(arch) {
            ops.push(jeq(nr, Target::Label(label)));
        }
    }
    ops.push(Op::Ret(RET_ALLOW));
    ops.push(Op::Mark(Clone));
    ops.push(Op::Load(off_arg_lo(0)));
    ops.push(Op::Jump { code: BPF_JMP_JSET_K, k: NAMESPACE_FLAGS, jt: Target::Label(Eperm), jf: Next });
    ops.push(Op::Ret(RET_ALLOW));
    ops.push(Op::Mark(Ioctl));
    ops.push(Op::Load(off_arg_lo(1)));
    ops.push(jeq(TIOCSTI, Target::Label(Eperm)));
    ops.push(jeq(TIOCLINUX, Target::Label(Eperm)));
    ops.push(Op::Ret(RET_ALLOW));
    ops.push(Op::Mark(Socket));
    ops.push(Op::Load(off_arg_lo(0)));
    ops.push(jeq(AF_UNIX, Target::Label(Allow)));
    for family in INET_FAMILIES {
        ops.push(jeq(family, Target::Label(Inet)));
    }
    ops.push(Op::Jump {
        code: BPF_JMP_JEQ_K,
        k: AF_NETLINK,
        jt: Target::Label(Netlink),
        jf: Target::Label(Eafnosupport),
    });
    ops.push(Op::Mark(Netlink));
    ops.push(Op::Load(off_arg_lo(2)));
    ops.push(jeq(NETLINK_ROUTE, Target::Label(Allow)));
    ops.push(Op::Mark(Eafnosupport));
    ops.push(Op::Ret(RET_ERRNO | EAFNOSUPPORT));
    ops.push(Op::Mark(Inet));
    ops.push(Op::Load(off_arg_lo(1)));
    for kind in INET_TYPES {
        for flags in SOCKET_FLAGS {
            ops.push(jeq(kind | flags, Target::Label(InetProtocol)));
        }
    }
    ops.push(Op::Ret(RET_ERRNO | ESOCKTNOSUPPORT));
    ops.push(Op::Mark(InetProtocol));
    ops.push(Op::Load(off_arg_lo(2)));
    for protocol in INET_PROTOCOLS {
        ops.push(jeq(protocol, Target::Label(Allow)));
    }
    ops.push(Op::Ret(RET_ERRNO | EPROTONOSUPPORT));
    ops.push(Op::Mark(Allow));
    ops.push(Op::Ret(RET_ALLOW));
    ops.push(Op::Mark(Eperm));
    ops.push(Op::Ret(RET_ERRNO | EPERM));
    ops.push(Op::Mark(Enosys));
    ops.push(Op::Ret(RET_ERRNO | ENOSYS));
    ops.push(Op::Mark(Kill));
    ops.push(Op::Ret(RET_KILL_PROCESS));
    assemble(&ops)
}

fn assemble(ops: &[Op]) -> Vec<Insn> {
    // Pass 1: the index each label stands at.
    let mut index = 0usize;
    let mut labels = Vec::new();
    for op in ops {
        match op {
            Op::Mark(l) => labels.push((*l, index)),
            _ => index += 1,
        }
    }
    let at = |l: Label| {
        labels.iter().find(|(x, _)| *x == l).map(|(_, i)| *i).unwrap_or_else(|| unreachable!("label {l:?} is placed"))
    };
    // Pass 2: relative jumps.
    let mut out = Vec::with_capacity(index);
    for op in ops {
        let here = out.len();
        let rel = |t: Target| -> u8 {
            match t {
                Target::Next => 0,
                Target::Label(l) => {
                    u8::try_from(at(l) - here - 1).unwrap_or_else(|_| unreachable!("filter fits 8-bit jumps"))
                }
            }
        };
        match op {
            Op::Load(off) => out.push(Insn { code: BPF_LD_W_ABS, jt: 0, jf: 0, k: *off }),
            Op::Jump { code, k, jt, jf } => out.push(Insn { code: *code, jt: rel(*jt), jf: rel(*jf), k: *k }),
            Op::Ret(k) => out.push(Insn { code: BPF_RET_K, jt: 0, jf: 0, k: *k }),
            Op::Mark(_) => {}
        }
    }
    out
}

/// The program as bwrap reads it: `struct sock_filter` records in host order.
pub fn to_bytes(program: &[Insn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for i in program {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel would see for one call.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    /// Runs `program` the way the kernel's classic BPF interpreter does, for the
    /// instructions the filter uses.
    fn run(program: &[Insn], d: &Data) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        OFF_NR => d.nr,
                        OFF_ARCH => d.arch,
                        k => {
                            let arg = ((k - 16) / 8) as usize;
                            if (k - 16) % 8 == 0 {
                                d.args[arg] as u32
                            } else {
                                (d.args[arg] >> 32) as u32
                            }
                        }
                    }
                }
                BPF_JMP_JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                BPF_JMP_JGE_K => pc += usize::from(if acc >= i.k { i.jt } else { i.jf }),
                BPF_JMP_JSET_K => pc += usize::from(if acc & i.k != 0 { i.jt } else { i.jf }),
                BPF_RET_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    fn call(arch: Arch, name: &str, args: [u64; 6]) -> u32 {
        let table = DENIED.iter().chain(EXEC).chain([CLONE, CLONE3, IOCTL, SOCKET, SOCKETPAIR].iter());
        let nr = table.clone().find(|s| s.name == name).and_then(|s| s.nr(arch)).unwrap_or_else(|| panic!("{name}"));
        run(&filter(arch), &Data { nr, arch: arch.audit(), args })
    }

    #[test]
    fn the_listen_filter_hands_listen_alone_to_the_shim() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let program = listen_filter(arch);
            let at = |nr: u32, audit: u32| run(&program, &Data { nr, arch: audit, args: [0; 6] });
            let listen = LISTEN.nr(arch).unwrap();
            assert_eq!(at(listen, arch.audit()), RET_USER_NOTIF, "{arch:?}");
            for other in [SOCKET, SOCKETPAIR, CLONE] {
                assert_eq!(at(other.nr(arch).unwrap(), arch.audit()), RET_ALLOW, "{arch:?} {}", other.name);
            }
            // Another machine's table is the sandboxes' filter's to refuse.
            assert_eq!(at(listen, 0x4000_0003), RET_ALLOW, "{arch:?}");
        }
        assert_eq!(LISTEN.nr(Arch::host().unwrap()), Some(libc::SYS_listen as u32));
    }

    #[test]
    fn every_denied_call_gets_eperm_on_both_machines() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            for s in DENIED {
                if s.nr(arch).is_some() {
                    assert_eq!(call(arch, s.name, [0; 6]), RET_ERRNO | EPERM, "{arch:?} {}", s.name);
                }
            }
        }
    }

    #[test]
    fn the_router_filter_refuses_exec_and_every_denied_call_and_the_sandbox_filter_allows_exec() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let router = router_filter(arch);
            for s in DENIED.iter().chain(EXEC) {
                // Some denied calls exist on x86-64 only.
                let Some(nr) = s.nr(arch) else { continue };
                let got = run(&router, &Data { nr, arch: arch.audit(), args: [0; 6] });
                assert_eq!(got, RET_ERRNO | EPERM, "{arch:?} {}", s.name);
            }
            for s in EXEC {
                assert_eq!(call(arch, s.name, [0; 6]), RET_ALLOW, "sandboxes run their app: {arch:?} {}", s.name);
            }
        }
        let router = router_filter(Arch::X86_64);
        // read, write, socket(AF_INET), connect, accept4, epoll_wait, mmap, futex.
        for nr in [0u32, 1, 41, 42, 288, 232, 9, 202] {
            let stream = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64;
            let args = [u64::from(libc::AF_INET as u32), stream, 0, 0, 0, 0];
            assert_eq!(run(&router, &Data { nr, arch: AUDIT_ARCH_X86_64, args }), RET_ALLOW, "nr {nr}");
        }
    }

    #[test]
    fn ordinary_calls_pass() {
        let prog = filter(Arch::X86_64);
        for nr in [0u32, 1, 2, 3, 42, 43, 49, 50, 57, 59, 60, 231, 257] {
            assert_eq!(run(&prog, &Data { nr, arch: AUDIT_ARCH_X86_64, args: [0; 6] }), RET_ALLOW, "nr {nr}");
        }
    }

    #[test]
    fn clone_is_inspected_and_clone3_falls_back() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let thread =
                (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u64;
            assert_eq!(call(arch, "clone", [thread, 0, 0, 0, 0, 0]), RET_ALLOW);
            assert_eq!(call(arch, "clone", [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]), RET_ALLOW);
            assert_eq!(call(arch, "clone", [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]), RET_ERRNO | EPERM);
            assert_eq!(
                call(arch, "clone", [(libc::CLONE_NEWNET | libc::SIGCHLD) as u64, 0, 0, 0, 0, 0]),
                RET_ERRNO | EPERM
            );
            assert_eq!(call(arch, "clone3", [0; 6]), RET_ERRNO | ENOSYS);
        }
    }

    #[test]
    fn terminal_injection_ioctls_are_refused_others_pass() {
        assert_eq!(call(Arch::X86_64, "ioctl", [0, u64::from(TIOCSTI), 0, 0, 0, 0]), RET_ERRNO | EPERM);
        assert_eq!(call(Arch::X86_64, "ioctl", [0, u64::from(TIOCLINUX), 0, 0, 0, 0]), RET_ERRNO | EPERM);
        // The high half of the argument is ignored by the kernel for ioctl numbers.
        assert_eq!(call(Arch::X86_64, "ioctl", [0, (1 << 32) | u64::from(TIOCSTI), 0, 0, 0, 0]), RET_ERRNO | EPERM);
        assert_eq!(call(Arch::X86_64, "ioctl", [0, 0x5401, 0, 0, 0, 0]), RET_ALLOW, "TCGETS");
    }

    #[test]
    fn sockets_only_in_web_families() {
        let af = |f: i32| f as u64;
        for arch in [Arch::X86_64, Arch::Aarch64] {
            for name in ["socket", "socketpair"] {
                for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
                    let sock_stream = libc::SOCK_STREAM as u64 | libc::SOCK_CLOEXEC as u64;
                    assert_eq!(call(arch, name, [af(family), sock_stream, 0, 0, 0, 0]), RET_ALLOW, "{name} {family}");
                }
                for family in [libc::AF_ALG, libc::AF_VSOCK, libc::AF_PACKET, libc::AF_TIPC, libc::AF_BLUETOOTH, 4242] {
                    assert_eq!(
                        call(arch, name, [af(family), 0, 0, 0, 0, 0]),
                        RET_ERRNO | EAFNOSUPPORT,
                        "{arch:?} {name} {family}"
                    );
                }
                let inet = |family: i32, proto: i32| call(arch, name, [af(family), 1, proto as u64, 0, 0, 0]);
                for family in [libc::AF_INET, libc::AF_INET6] {
                    for proto in [libc::IPPROTO_TCP, libc::IPPROTO_UDP, libc::IPPROTO_ICMP, libc::IPPROTO_ICMPV6] {
                        assert_eq!(inet(family, proto), RET_ALLOW, "{family} protocol {proto}");
                    }
                    // MPTCP (262), SCTP, SMC (256): Landlock's TCP bind rule does not cover them.
                    for proto in [262, libc::IPPROTO_SCTP, 256, libc::IPPROTO_RAW] {
                        assert_eq!(inet(family, proto), RET_ERRNO | EPROTONOSUPPORT, "{family} protocol {proto}");
                    }
                    // Streams and datagrams, with their flags; a sequenced
                    // packet socket of the default protocol is SCTP's.
                    let typed = |kind: i32| call(arch, name, [af(family), kind as u64, 0, 0, 0, 0]);
                    for kind in [libc::SOCK_STREAM, libc::SOCK_DGRAM] {
                        for flags in
                            [0, libc::SOCK_NONBLOCK, libc::SOCK_CLOEXEC, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC]
                        {
                            assert_eq!(typed(kind | flags), RET_ALLOW, "{family} type {kind} flags {flags}");
                        }
                    }
                    for kind in [
                        libc::SOCK_SEQPACKET,
                        libc::SOCK_RAW,
                        libc::SOCK_RDM,
                        libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    ] {
                        assert_eq!(typed(kind), RET_ERRNO | ESOCKTNOSUPPORT, "{family} type {kind}");
                    }
                }
                let netlink = |proto: i32| call(arch, name, [af(libc::AF_NETLINK), 3, proto as u64, 0, 0, 0]);
                assert_eq!(netlink(libc::NETLINK_ROUTE), RET_ALLOW);
                for proto in
                    [libc::NETLINK_AUDIT, libc::NETLINK_KOBJECT_UEVENT, libc::NETLINK_NETFILTER, libc::NETLINK_XFRM]
                {
                    assert_eq!(netlink(proto), RET_ERRNO | EAFNOSUPPORT, "netlink protocol {proto}");
                }
            }
            // Only the low 32 bits are the family, as the kernel reads an int.
            assert_eq!(call(arch, "socket", [(1 << 32) | af(libc::AF_ALG), 0, 0, 0, 0, 0]), RET_ERRNO | EAFNOSUPPORT);
        }
    }

    #[test]
    fn foreign_tables_are_shut() {
        let prog = filter(Arch::X86_64);
        // i386 through int 0x80: killed whatever the number.
        assert_eq!(run(&prog, &Data { nr: 20, arch: 0x4000_0003, args: [0; 6] }), RET_KILL_PROCESS);
        // x32: refused whatever the number.
        assert_eq!(
            run(&prog, &Data { nr: X32_SYSCALL_BIT | 39, arch: AUDIT_ARCH_X86_64, args: [0; 6] }),
            RET_ERRNO | EPERM
        );
        assert_eq!(
            run(&filter(Arch::Aarch64), &Data { nr: 20, arch: 0x4000_0028, args: [0; 6] }),
            RET_KILL_PROCESS,
            "arm32"
        );
    }

    #[test]
    fn numbers_match_this_machines_libc() {
        let arch = Arch::host().unwrap();
        let check = [
            ("ptrace", libc::SYS_ptrace),
            ("mount", libc::SYS_mount),
            ("unshare", libc::SYS_unshare),
            ("bpf", libc::SYS_bpf),
            ("io_uring_setup", libc::SYS_io_uring_setup),
            ("open_tree", libc::SYS_open_tree),
            ("mount_setattr", libc::SYS_mount_setattr),
            ("kexec_file_load", libc::SYS_kexec_file_load),
            ("open_by_handle_at", libc::SYS_open_by_handle_at),
            ("userfaultfd", libc::SYS_userfaultfd),
        ];
        for (name, nr) in check {
            let s = DENIED.iter().find(|s| s.name == name).unwrap();
            assert_eq!(s.nr(arch), Some(nr as u32), "{name}");
        }
        assert_eq!(CLONE.nr(arch), Some(libc::SYS_clone as u32));
        assert_eq!(CLONE3.nr(arch), Some(libc::SYS_clone3 as u32));
        assert_eq!(IOCTL.nr(arch), Some(libc::SYS_ioctl as u32));
        assert_eq!(SOCKET.nr(arch), Some(libc::SYS_socket as u32));
        assert_eq!(SOCKETPAIR.nr(arch), Some(libc::SYS_socketpair as u32));
        assert_eq!(TIOCSTI, libc::TIOCSTI as u32);
    }

    #[test]
    fn bytes_are_eight_per_instruction() {
        let prog = filter(Arch::X86_64);
        assert_eq!(to_bytes(&prog).len(), prog.len() * 8);
        assert!(prog.len() < 100);
    }
}
