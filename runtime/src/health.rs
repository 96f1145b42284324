//! Health checks: is the app answering on its port yet?
//!
//! The check speaks just enough HTTP/1.1 to read a status line, over a fresh TCP
//! connection, so it measures what the router will see and costs no client
//! library. Polling starts at 250 us and backs off to 50 ms: most apps are up
//! within a few milliseconds, the start-to-healthy time is a figure we
//! publish, and a woken app's first request waits for it. The starts in
//! their first 100 ms share a budget of probes per second, so many at once
//! (a restart of every app) poll each the slower; a start past them (an
//! app slow to answer, or one that never does) backs off and takes no
//! share of it, so it cannot slow the others' first probes. The starts past
//! their first 100 ms share a budget of their own: a thousand starting at
//! once on two cores wait seconds for the CPU, and probing each every 50 ms
//! (20,000 refused connections a second) took a tenth of the CPU they
//! waited for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How to tell that an app is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HealthCheck {
    /// `GET path`; with `require_success`, only 2xx and 3xx count, otherwise any
    /// HTTP answer does (the default check of `/`, which many apps answer 404).
    Http { path: String, require_success: bool },
    /// A TCP connection is accepted.
    Tcp,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck::Http { path: "/".into(), require_success: false }
    }
}

/// Why one probe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("nothing accepts connections on {0}")]
    Refused(SocketAddr),
    #[error("{0} accepted the connection but sent no HTTP answer within {1:?}")]
    NoAnswer(SocketAddr, Duration),
    #[error("{addr} answered {path} with status {status}")]
    Status { addr: SocketAddr, path: String, status: u16 },
}

/// One probe.
pub async fn probe(addr: SocketAddr, check: &HealthCheck, timeout: Duration) -> Result<(), ProbeError> {
    let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        _ => return Err(ProbeError::Refused(addr)),
    };
    let HealthCheck::Http { path, require_success } = check else { return Ok(()) };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: nx-health\r\nConnection: close\r\n\r\n");
    let status = tokio::time::timeout(timeout, async {
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = Vec::with_capacity(64);
        let mut chunk = [0u8; 64];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        parse_status(&buf)
    })
    .await
    .ok()
    .flatten();
    match status {
        None => Err(ProbeError::NoAnswer(addr, timeout)),
        Some(s) if *require_success && !(200..400).contains(&s) => {
            Err(ProbeError::Status { addr, path: path.clone(), status: s })
        }
        Some(_) => Ok(()),
    }
}

fn parse_status(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// The uids owning the sockets that listen on `addr`: on its port, at its
/// address or a wildcard one, as the kernel's socket diagnostics
/// (`NETLINK_SOCK_DIAG`) list them for this network namespace. Sandboxes
/// share the host's network namespace, so an answer on an app's port
/// proves nothing about who gave it; the owner of the listening socket does.
pub fn listeners(addr: SocketAddr) -> std::io::Result<Vec<u32>> {
    let mut uids = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for msg in crate::sys::sock_diag_dump(&listeners_request(family, addr.port()))? {
            match parse_listener(&msg) {
                Some(l) if l.port == addr.port() && l.receives(addr.ip()) => uids.push(l.uid),
                _ => {}
            }
        }
    }
    Ok(uids)
}

/// One listening socket as the kernel describes it.
#[derive(Debug, PartialEq, Eq)]
struct Listener {
    ip: IpAddr,
    port: u16,
    uid: u32,
    /// An IPv6 socket that takes no IPv4 connections (`IPV6_V6ONLY`).
    v6only: bool,
}

impl Listener {
    /// Whether connections to `to` on its port reach this socket: its own
    /// address, or a wildcard (`0.0.0.0`, `::` or `::ffff:0.0.0.0`); IPv4
    /// ones through an IPv6 socket only when it is not v6-only.
    fn receives(&self, to: IpAddr) -> bool {
        let canonical = self.ip.to_canonical();
        let wildcard = canonical.is_unspecified();
        match to {
            IpAddr::V4(_) => (self.ip.is_ipv4() || !self.v6only) && (wildcard || canonical == to),
            IpAddr::V6(_) => self.ip.is_ipv6() && (self.ip.is_unspecified() || self.ip == to),
        }
    }
}

/// A `SOCK_DIAG_BY_FAMILY` dump request for the TCP sockets of `family`
/// listening on `port`: a netlink header and an `inet_diag_req_v2`. Asking
/// for the listening state alone keeps the kernel out of its table of
/// connections.
fn listeners_request(family: i32, port: u16) -> Vec<u8> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
    const TCP_LISTEN: u32 = 10;
    const LEN: u32 = 16 + 56;
    let mut m = Vec::with_capacity(LEN as usize);
    m.extend(LEN.to_ne_bytes());
    m.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend(NLM_F_REQUEST_DUMP.to_ne_bytes());
    m.extend(1u32.to_ne_bytes()); // sequence
    m.extend(0u32.to_ne_bytes()); // to the kernel
    m.extend([family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend((1u32 << TCP_LISTEN).to_ne_bytes());
    // inet_diag_sockid: the source port (network order) filters the dump;
    // addresses, interface and cookie are left open.
    m.extend(port.to_be_bytes());
    m.resize(LEN as usize, 0);
    m
}

/// The listening socket one `inet_diag_msg` describes: its bound address,
/// port and owner, and for IPv6 its `INET_DIAG_SKV6ONLY` attribute (which
/// the kernel adds to every IPv6 socket's message, after the 72 bytes of
/// the message itself).
fn parse_listener(msg: &[u8]) -> Option<Listener> {
    const INET_DIAG_SKV6ONLY: u16 = 11;
    let family = i32::from(*msg.first()?);
    let port = u16::from_be_bytes(msg.get(4..6)?.try_into().ok()?);
    let src = msg.get(8..24)?;
    let uid = u32::from_ne_bytes(msg.get(64..68)?.try_into().ok()?);
    let (ip, v6only) = match family {
        libc::AF_INET => (IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&src[..4]).ok()?)), false),
        libc::AF_INET6 => {
            let mut v6only = None;
            let mut at = 72;
            while let (Some(len), Some(kind)) = (msg.get(at..at + 2), msg.get(at + 2..at + 4)) {
                let len = usize::from(u16::from_ne_bytes([len[0], len[1]]));
                if len < 4 {
                    break;
                }
                if u16::from_ne_bytes([kind[0], kind[1]]) == INET_DIAG_SKV6ONLY {
                    v6only = msg.get(at + 4).map(|b| *b != 0);
                }
                at += (len + 3) & !3;
            }
            // Without the attribute it cannot be told: counted as taking
            // IPv4 too, so a socket that may answer is never overlooked.
            (IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).ok()?)), v6only.unwrap_or(false))
        }
        _ => return None,
    };
    Some(Listener { ip, port, uid, v6only })
}

/// How long after the start probes run at their first pace.
const FAST_POLL: Duration = Duration::from_millis(100);

/// The pause between a start's first probes.
const FIRST_PAUSE: Duration = Duration::from_micros(250);

/// The longest pause between probes.
const LONGEST_PAUSE: Duration = Duration::from_millis(50);

/// A budget of probes per second that the waits counted in it share.
struct Budget {
    waiting: AtomicU32,
    per_second: u32,
    /// The longest pause a share may ask for.
    longest: Duration,
}

/// The budget of the waits in their first [`FAST_POLL`]: one start alone
/// polls every [`FIRST_PAUSE`], a hundred at once every 25 ms each (never
/// slower than [`LONGEST_PAUSE`]).
static FIRST_PROBES: Budget = Budget { waiting: AtomicU32::new(0), per_second: 4_000, longest: LONGEST_PAUSE };

/// The budget of the waits past their first [`FAST_POLL`]: up to a hundred
/// poll at their own back-off; a thousand each every half second.
static LATER_PROBES: Budget =
    Budget { waiting: AtomicU32::new(0), per_second: 2_000, longest: Duration::from_millis(500) };

/// One wait counted in a [`Budget`] while it lives.
struct Waiting(&'static Budget);

impl Waiting {
    fn begin(budget: &'static Budget) -> Waiting {
        budget.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(budget)
    }

    /// The shortest pause that keeps the waits in flight within the budget.
    fn share(&self) -> Duration {
        (Duration::from_secs(1) * self.0.waiting.load(Ordering::Relaxed) / self.0.per_second).min(self.0.longest)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The pause between two probes of a wait `elapsed` old whose last pause
/// was `last` (`None` before the first), given its `share` of its budget.
fn next_pause(last: Option<Duration>, elapsed: Duration, share: Duration) -> Duration {
    // A static binary answers within a few milliseconds of its start, and a
    // refused connect on loopback costs microseconds: poll at the first pace
    // at first, so "healthy" follows the first answer closely, then back
    // off for the slow starters.
    let paced = match last {
        Some(last) if elapsed >= FAST_POLL => (last * 2).min(LONGEST_PAUSE),
        Some(last) => last.max(FIRST_PAUSE).min(LONGEST_PAUSE),
        None => FIRST_PAUSE,
    };
    paced.max(share)
}

/// Probes until one succeeds or `deadline` passes; returns the last failure.
/// `give_up` is polled between probes: when it returns true (say, the process
/// exited), the wait ends early.
pub async fn wait_healthy(
    addr: SocketAddr,
    check: &HealthCheck,
    deadline: Duration,
    mut give_up: impl FnMut() -> bool,
) -> Result<(), ProbeError> {
    let start = tokio::time::Instant::now();
    let mut waiting = Waiting::begin(&FIRST_PROBES);
    let mut timer = None;
    let mut pause = None;
    loop {
        let remaining = deadline.saturating_sub(start.elapsed());
        let result = probe(addr, check, remaining.min(Duration::from_secs(2)).max(Duration::from_millis(50))).await;
        if result.is_ok() || start.elapsed() >= deadline || give_up() {
            return result;
        }
        if start.elapsed() >= FAST_POLL && std::ptr::eq(waiting.0, &FIRST_PROBES) {
            waiting = Waiting::begin(&LATER_PROBES);
        }
        let next = next_pause(pause, start.elapsed(), waiting.share());
        // Made at the first pause (an adopted app answers the first probe);
        // without one (out of descriptors) it sleeps on tokio's timer.
        if timer.is_none() {
            timer = crate::sys::PreciseTimer::new().ok();
        }
        let slept = match timer.as_mut() {
            Some(t) => t.sleep(next).await.is_ok(),
            None => false,
        };
        if !slept {
            tokio::time::sleep(next).await;
        }
        pause = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[test]
    fn listening_sockets_are_found_with_their_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let me = crate::sys::effective_uid();
        assert_eq!(listeners(addr).unwrap(), vec![me]);
        // A connection to it is not a listener.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (_accepted, _) = l.accept().unwrap();
        assert_eq!(listeners(addr).unwrap(), vec![me]);
        drop(l);
        assert_eq!(listeners(addr).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn both_families_and_wildcards_are_listed_and_other_addresses_are_not() {
        let any6 = std::net::TcpListener::bind("[::]:0").unwrap();
        let port = any6.local_addr().unwrap().port();
        let me = crate::sys::effective_uid();
        assert_eq!(listeners(SocketAddr::from(([127, 0, 0, 1], port))).unwrap(), vec![me], "[::] takes IPv4 too");
        let other = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let elsewhere = SocketAddr::from(([127, 0, 0, 1], other.local_addr().unwrap().port()));
        assert_eq!(listeners(elsewhere).unwrap(), Vec::<u32>::new(), "127.0.0.2 does not answer for 127.0.0.1");
        use nix::sys::socket::{bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType};
        let v6only = socket(AddressFamily::Inet6, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        setsockopt(&v6only, sockopt::Ipv6V6Only, &true).unwrap();
        let any =
            nix::sys::socket::SockaddrIn6::from(std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0));
        bind(std::os::fd::AsRawFd::as_raw_fd(&v6only), &any).unwrap();
        listen(&v6only, Backlog::new(8).unwrap()).unwrap();
        let v6only = std::net::TcpListener::from(v6only);
        let port = v6only.local_addr().unwrap().port();
        assert_eq!(
            listeners(SocketAddr::from(([127, 0, 0, 1], port))).unwrap(),
            Vec::<u32>::new(),
            "a v6-only [::] takes no IPv4 connection"
        );
        let v4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], v4.local_addr().unwrap().port()));
        assert_eq!(listeners(addr).unwrap(), vec![me]);
    }

    #[test]
    fn wildcards_of_both_forms_and_mapped_addresses_receive_ipv4() {
        let l = |ip: &str, v6only| Listener { ip: ip.parse().unwrap(), port: 80, uid: 1, v6only };
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(l("0.0.0.0", false).receives(local));
        assert!(l("::", false).receives(local));
        assert!(l("::ffff:0.0.0.0", false).receives(local), "the mapped wildcard");
        assert!(l("::ffff:127.0.0.1", false).receives(local));
        assert!(!l("::", true).receives(local), "v6-only");
        assert!(!l("127.0.0.2", false).receives(local));
        assert!(!l("::1", false).receives(local));
    }

    #[tokio::test]
    async fn any_answer_counts_for_the_default_check() {
        let addr = server("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
        probe(addr, &HealthCheck::default(), Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn explicit_paths_need_success() {
        let addr = server("HTTP/1.1 500 Oops\r\n\r\n").await;
        let check = HealthCheck::Http { path: "/healthz".into(), require_success: true };
        let err = probe(addr, &check, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err, ProbeError::Status { addr, path: "/healthz".into(), status: 500 });
    }

    #[tokio::test]
    async fn garbage_is_not_an_answer() {
        let addr = server("SSH-2.0-OpenSSH\r\n").await;
        let err = probe(addr, &HealthCheck::default(), Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, ProbeError::NoAnswer(..)), "{err}");
        probe(addr, &HealthCheck::Tcp, Duration::from_millis(200)).await.unwrap();
    }

    #[test]
    fn probes_start_fast_back_off_and_share_a_budget() {
        let ms = Duration::from_millis;
        assert_eq!(next_pause(None, ms(0), Duration::ZERO), FIRST_PAUSE);
        assert_eq!(next_pause(Some(FIRST_PAUSE), ms(50), Duration::ZERO), FIRST_PAUSE, "fast for the first 100 ms");
        assert_eq!(next_pause(Some(FIRST_PAUSE), ms(100), Duration::ZERO), FIRST_PAUSE * 2);
        assert_eq!(next_pause(Some(ms(40)), ms(900), Duration::ZERO), LONGEST_PAUSE);
        // The share of each of `n` waits in a budget like `like`.
        let share = |like: &Budget, n: usize| {
            let budget = Budget { waiting: AtomicU32::new(0), per_second: like.per_second, longest: like.longest };
            let budget: &'static Budget = Box::leak(Box::new(budget));
            let waits: Vec<Waiting> = (0..n).map(|_| Waiting::begin(budget)).collect();
            let share = waits[0].share();
            drop(waits);
            assert_eq!(budget.waiting.load(Ordering::Relaxed), 0, "a wait leaves its budget when it ends");
            share
        };
        // A hundred waits at once each take a hundredth of the budget.
        assert_eq!(share(&FIRST_PROBES, 100), ms(25));
        assert_eq!(next_pause(None, ms(0), share(&FIRST_PROBES, 100)), ms(25));
        assert_eq!(next_pause(Some(ms(25)), ms(10), Duration::ZERO), ms(25), "the pace never speeds up");
        assert_eq!(share(&FIRST_PROBES, 1_000), LONGEST_PAUSE, "never slower than the budget's longest");
        // Past the first 100 ms: a hundred waits back off as they would alone,
        // a thousand share the later budget, half a second each at most.
        assert_eq!(next_pause(Some(ms(40)), ms(900), share(&LATER_PROBES, 100)), LONGEST_PAUSE);
        assert_eq!(next_pause(Some(ms(50)), ms(900), share(&LATER_PROBES, 1_000)), ms(500));
        assert_eq!(next_pause(Some(ms(50)), ms(900), share(&LATER_PROBES, 5_000)), ms(500));
    }

    #[tokio::test]
    async fn the_precise_timer_never_wakes_early_and_can_be_rearmed() {
        let mut timer = crate::sys::PreciseTimer::new().unwrap();
        for pause in [Duration::from_micros(300), Duration::ZERO, Duration::from_millis(3)] {
            let started = std::time::Instant::now();
            timer.sleep(pause).await.unwrap();
            assert!(started.elapsed() >= pause, "woke after {:?} of {pause:?}", started.elapsed());
        }
    }

    #[tokio::test]
    async fn refused_until_deadline() {
        let addr = free_addr();
        let err = wait_healthy(addr, &HealthCheck::Tcp, Duration::from_millis(100), || false).await.unwrap_err();
        assert_eq!(err, ProbeError::Refused(addr));
    }

    #[tokio::test]
    async fn give_up_ends_the_wait() {
        let addr = free_addr();
        let started = std::time::Instant::now();
        let err = wait_healthy(addr, &HealthCheck::Tcp, Duration::from_secs(30), || true).await;
        assert!(err.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
