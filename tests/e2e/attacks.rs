//! The attack suite: a hostile app of our own (`tests/fixtures/evil/evil.c`)
//! runs inside its sandbox next to an innocent one and tries every escape in
//! the book. Each attack must fail, and the host and the other app must be
//! intact afterwards.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::free_port;
use nx_e2e::{app_processes, deployment_processes, eventually, processes_of, Receiver};

struct Lab {
    r: Receiver,
    evil_id: String,
    evil_url: String,
    victim_url: String,
    victim_port: u16,
}

impl Lab {
    fn attack(&self, what: &str) -> String {
        let a = self.r.get(&format!("{}attack/{what}", self.evil_url));
        assert_eq!(a.status, 200, "attack {what}: {a:?}");
        eprintln!("attack {what}: {}", a.body);
        a.body
    }

    /// Fails the test unless the attack says it was blocked; returns the details.
    fn blocked(&self, what: &str) -> String {
        let out = self.attack(what);
        assert!(out.starts_with("BLOCKED"), "attack {what} was not blocked: {out}");
        out
    }

    fn info(&self, what: &str) -> String {
        let out = self.attack(what);
        assert!(out.starts_with("INFO "), "attack {what}: {out}");
        out
    }
}

fn number_after(text: &str, word: &str) -> u64 {
    text.split(word)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in {text:?}"))
}

fn lab() -> Lab {
    let r = Receiver::start();
    r.create_app("victim");
    r.create_app("evil");
    r.nx(&[
        "apps", "set", "evil", "--memory", "64MiB", "--pids", "48", "--nofile", "256", "--tmp", "16MiB", "--data",
        "32MiB",
    ])
    .success();
    let victim = r.push("victim", &fixtures::go(Go::Static), &[]);
    let evil = r.push("evil", &fixtures::evil(), &["--arg", "serve"]);
    // A setuid-root copy of the hostile program inside its own /data: the
    // classic way to try to turn a file on disk into privilege.
    let suid = r.data_dir().join("apps/evil/data/suid-evil");
    std::fs::copy(fixtures::evil(), &suid).unwrap();
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    Lab {
        evil_id: evil["id"].as_str().unwrap().to_owned(),
        evil_url: format!("{}/", evil["preview_url"].as_str().unwrap()),
        victim_url: victim["preview_url"].as_str().unwrap().to_owned(),
        victim_port: victim["port"].as_u64().unwrap() as u16,
        r,
    }
}

#[test]
fn hostile_app_cannot_escape_its_sandbox() {
    let lab = lab();
    let r = &lab.r;
    assert_eq!(r.get(&lab.evil_url).body, "evil is up");

    // Files of the host and of other apps.
    // Nothing of the host is there to open.
    let absent = |path: String| {
        assert_eq!(
            lab.blocked(&format!("open?path={path}")),
            format!("BLOCKED open {path}: No such file or directory")
        );
    };
    absent("/etc/shadow".into());
    let victim_data = r.data_dir().join("apps/victim/data");
    std::fs::write(victim_data.join("secret"), "victim's").unwrap();
    absent(format!("{}/secret", victim_data.display()));
    absent(format!("{}/secrets/master.key", r.data_dir().display()));
    assert_eq!(lab.blocked("writebin"), "BLOCKED write /app/evil: Permission denied, unlink: Read-only file system");
    // The root it was given, and no more (the program is dynamically
    // linked: /usr and its links are there too): /dev holds the six harmless
    // nodes (the host's directory of them, which is root's), /etc the
    // app's own files and the loader's cache; neither takes a new
    // file. POSIX shared memory works, in its own size-limited /tmp.
    assert_eq!(lab.info("ls?path=/"), "INFO app bin data dev etc lib lib64 nx-init proc sbin tmp usr ");
    assert_eq!(lab.info("ls?path=/dev"), "INFO fd full null random shm stderr stdin stdout tty urandom zero ");
    assert_eq!(lab.info("ls?path=/etc"), "INFO group hosts ld.so.cache nsswitch.conf passwd resolv.conf ssl ");
    assert_eq!(lab.blocked("create?path=/dev/sda"), "BLOCKED create /dev/sda: Permission denied");
    assert_eq!(lab.blocked("create?path=/etc/profile"), "BLOCKED create /etc/profile: Read-only file system");
    assert_eq!(lab.attack("create?path=/dev/shm/evil"), "INFO created /dev/shm/evil");

    // Other processes: the receiver's pid does not exist in the sandbox's
    // pid namespace; tracing is the filter's EPERM (without it, TRACEME
    // would succeed).
    let procs = lab.blocked("procs");
    assert!(number_after(&procs, "BLOCKED") <= 4, "{procs}");
    let receiver = r.pid().unwrap();
    assert_eq!(lab.blocked(&format!("kill-pid?pid={receiver}")), format!("BLOCKED kill {receiver}: No such process"));
    assert_eq!(
        lab.blocked("ptrace"),
        "BLOCKED ptrace attach: Operation not permitted, traceme: Operation not permitted"
    );

    // Privilege. The plain attempts fail for want of capabilities too; the
    // filtered ones are made with arguments the kernel itself would refuse
    // otherwise (EFAULT, EINVAL, ...), so EPERM there is the filter's alone.
    let eperm = "Operation not permitted";
    assert_eq!(lab.blocked("mount"), format!("BLOCKED mount: {eperm}, umount: {eperm}, fsopen: {eperm}"));
    // A nested user namespace would be ENOSPC (bwrap --disable-userns) without the filter.
    assert_eq!(lab.blocked("unshare"), format!("BLOCKED unshare user: {eperm}, ns: {eperm}, clone(NEWUSER): {eperm}"));
    let filtered = [
        "mount(bad source)",
        "umount2(bad flags)",
        "open_tree(bad flags)",
        "fsconfig(no fd)",
        "mount_setattr(bad flags)",
        "unshare(bad flags)",
        "setns(no fd)",
        "keyctl(bad command)",
        "perf_event_open(no attr)",
        "io_uring_setup(no params)",
        "ptrace(bad request)",
        "open_by_handle_at(no fd)",
    ];
    let expected: String = filtered.iter().map(|call| format!("{call}: {eperm}, ")).collect();
    assert_eq!(lab.blocked("filtered"), format!("BLOCKED {expected}"));
    let setuid = lab.blocked("setuid?path=/data/suid-evil");
    assert_eq!(setuid, "BLOCKED /data/suid-evil ran with euid=1000");
    // Without the filter TIOCSTI on /dev/null would be ENOTTY.
    assert_eq!(lab.blocked("tiocsti"), format!("BLOCKED TIOCSTI: {eperm}; /dev/tty: No such device or address"));
    // An IP socket's type is a stream's or a datagram's (the kernel would say
    // EPERM to a raw one, CAP_NET_RAW being dropped; a sequenced packet one is
    // SCTP's where its module is loaded); a packet socket's family is refused
    // by the seccomp filter before any capability is checked.
    assert_eq!(
        lab.blocked("rawsock"),
        "BLOCKED raw: Socket type not supported, packet: Address family not supported by protocol"
    );
    // Every family but unix, IPv4, IPv6 and netlink route queries answers as
    // on a kernel without it; the allowed ones work.
    let refused = "Address family not supported by protocol";
    let protocol = "Protocol not supported";
    assert_eq!(
        lab.blocked("families"),
        format!(
            "BLOCKED alg: {refused}, vsock: {refused}, packet: {refused}, tipc: {refused}, netlink-audit: {refused}, \
             netlink-uevent: {refused}, netlink-netfilter: {refused}, mptcp: {protocol}, sctp: {protocol}, \
             socketpair-tipc: {refused}; \
             unix: ok, inet: ok, inet6: ok, netlink-route: ok, "
        )
    );
    // Abstract unix sockets are shared by the network namespace, so a host
    // daemon's would be one connect away; Landlock's scope refuses it.
    let name = format!("nx-e2e-host-daemon-{}", std::process::id());
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(&name).unwrap();
    let _daemon = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    assert_eq!(
        lab.blocked(&format!("abstract?name={name}")),
        format!("BLOCKED connect @{name}: Operation not permitted")
    );

    // The network: other apps, the receiver, the router, the metadata address.
    for port in [lab.victim_port, r.api_port, r.router_port] {
        let out = lab.blocked(&format!("connect?host=127.0.0.1&port={port}"));
        assert!(out.contains("Connection refused"), "{out}");
    }
    // The host's DNS port: closed unless the operator allows it. Something
    // listens there (this test's listener, or the host's resolver), so only
    // the rule can refuse the connection.
    let _dns = match std::net::TcpListener::bind("127.0.0.1:53") {
        Ok(l) => Some(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => None,
        Err(e) => panic!("cannot listen on 127.0.0.1:53: {e}"),
    };
    assert_eq!(lab.blocked("connect?host=127.0.0.1&port=53"), "BLOCKED connect 127.0.0.1:53: Connection refused");
    // Cloud metadata and private networks: refused by nftables before a
    // packet leaves (one attempt each; the route would lead off the host).
    for host in ["169.254.169.254", "100.100.100.200", "10.0.0.1"] {
        assert_eq!(
            lab.blocked(&format!("connect?host={host}&port=80")),
            format!("BLOCKED connect {host}:80: No route to host")
        );
    }
    // Its own database it may reach.
    let db = lab.attack(&format!("connect?host=127.0.0.1&port={}", r.pg_port));
    assert!(db.starts_with("ESCAPED connected"), "an app must reach its database: {db}");

    // What it was given: three descriptors and its own variables.
    assert_eq!(lab.info("fds"), "INFO 0,1,2,");
    let env = lab.info("env");
    // PWD is bwrap's, set by --chdir /data.
    let allowed = [
        "PWD",
        "PORT",
        "HOST",
        "NX_APP",
        "NX_DEPLOYMENT",
        "HOME",
        "TMPDIR",
        "PATH",
        "SSL_CERT_FILE",
        "DATABASE_URL",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
    ];
    for name in env.trim_start_matches("INFO ").split_whitespace() {
        assert!(allowed.contains(&name), "unexpected variable {name} in the sandbox: {env}");
    }
    assert!(!env.contains("NX_ADMIN_TOKEN") && !env.contains("RUST_LOG"));

    // Limits: each exhaustion stops at the app's own limit.
    let forks = lab.info("forkbomb");
    assert!(number_after(&forks, "forked") < 48, "{forks}");
    assert!(forks.contains("Resource temporarily unavailable"), "{forks}");
    let files = lab.info("nofile");
    assert!(number_after(&files, "opened") <= 256, "{files}");
    assert!(files.contains("Too many open files"), "{files}");
    let tmp = lab.info("filltmp");
    assert!(number_after(&tmp, "wrote") <= 16, "{tmp}");
    assert!(tmp.contains("No space left on device"), "{tmp}");
    let data = lab.info("filldata");
    assert!(number_after(&data, "wrote") <= 32, "{data}");
    assert!(data.contains("No space left on device"), "{data}");
    let hog = lab.blocked("memhog?mb=512");
    assert!(hog.contains("killed by signal 9"), "the memory limit killed the hog: {hog}");
    assert_eq!(r.get(&lab.evil_url).body, "evil is up", "only the hog died, not its app");

    // kill -1 reaches nothing outside the sandbox.
    lab.info("kill-all");

    // No secret on a command line or in a log: the database password the app
    // was given appears in no process's arguments and in no log file.
    let evil_id = lab.evil_id.clone();
    let app_pid = deployment_processes(&r.data_dir(), &evil_id)
        .into_iter()
        .find(|(_, cmd)| cmd.starts_with("/app/evil"))
        .map(|(pid, _)| pid)
        .expect("the evil app runs");
    let environ = std::fs::read(format!("/proc/{app_pid}/environ")).unwrap();
    let password = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|v| v.strip_prefix("PGPASSWORD=").map(str::to_owned))
        .expect("the app has a database password");
    for (pid, cmd) in processes_of(&r.data_dir(), &[&evil_id]) {
        assert!(!cmd.contains(&password), "process {pid} has the password on its command line: {cmd}");
    }
    for log in [
        r.log_path(),
        r.data_dir().join("logs/postgres.log"),
        r.data_dir().join(format!("logs/deployments/{evil_id}.log")),
    ] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains(&password), "{} has the password", log.display());
    }

    // Every limit is reported with what enforces it.
    let listing = r.nx(&["--json", "ls", "evil"]).success().json();
    let limits = listing[0]["deployments"][0]["limits"].as_array().unwrap().clone();
    let by = |l: &str| {
        limits.iter().find(|e| e["limit"] == l).and_then(|e| e["by"].as_str()).unwrap_or("NOT ENFORCED").to_owned()
    };
    for l in ["memory", "cpu", "pids"] {
        assert!(by(l).starts_with("cgroup") || by(l).starts_with("rlimit"), "{l}: {}", by(l));
    }
    assert_eq!(
        (by("nofile").as_str(), by("tmp").as_str(), by("data").as_str(), by("network").as_str()),
        ("rlimit", "tmpfs", "ext4 volume", "nftables")
    );
    assert_eq!((by("ports").as_str(), by("abstract sockets").as_str()), ("landlock", "landlock"));
    let status = r.nx(&["--json", "status"]).success().json();
    let isolation: Vec<(String, String)> = status["isolation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["limit"].as_str().unwrap().to_owned(), e["by"].as_str().unwrap_or("NOT ENFORCED").to_owned()))
        .collect();
    for line in [
        ("ports", "landlock"),
        ("abstract sockets", "landlock"),
        ("syscalls", "seccomp"),
        ("devices", "a directory of root's"),
    ] {
        assert!(isolation.contains(&(line.0.to_owned(), line.1.to_owned())), "{line:?} in {isolation:?}");
    }

    // The host and the other app are intact.
    let victim = r.get(&lab.victim_url);
    assert_eq!((victim.status, victim.body.as_str()), (200, "goweb\n"));
    assert_eq!(std::fs::read_to_string(victim_data.join("secret")).unwrap(), "victim's");
    let health = reqwest::blocking::get(format!("{}/v1/health", r.api())).unwrap();
    assert!(health.status().is_success());
    assert!(r.pid().is_some());
}

#[test]
fn a_squatter_never_gets_its_neighbours_port() {
    let lab = lab();
    let r = &lab.r;
    let port = lab.victim_port;
    // Landlock refuses the bind itself (EACCES), before the kernel would say
    // the port is in use; a free port that is not its own is refused alike.
    assert_eq!(lab.blocked(&format!("bind?port={port}")), format!("BLOCKED bind {port}: Permission denied"));
    let free = free_port();
    assert_eq!(lab.blocked(&format!("bind?port={free}")), format!("BLOCKED bind {free}: Permission denied"));
    // Nor is a port of the kernel's choosing had by listening unbound: the
    // shim's listen guard says EACCES, which listen never says of its own.
    assert_eq!(lab.blocked("listen"), "BLOCKED listen unbound: Permission denied");

    // The neighbour crashes and restarts while the squatter tries all along.
    let victim = r.nx(&["--json", "ls", "victim"]).success().json();
    let victim_id = victim[0]["deployments"][0]["id"].as_str().unwrap().to_owned();
    let before = app_processes(&r.data_dir(), &victim_id);
    assert_eq!(before.len(), 1, "{before:?}");
    let squat_url = format!("{}attack/squat?port={port}&ms=5000", lab.evil_url);
    let router_port = r.router_port;
    let squatter = std::thread::spawn(move || nx_e2e::http::get_url(router_port, &squat_url));
    std::thread::sleep(std::time::Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(before[0].0), nix::sys::signal::Signal::SIGKILL).unwrap();
    // Every answer while it restarts is the neighbour's or the router's, never the squatter's.
    let restarted = eventually(30, "the neighbour to restart and answer", || {
        let a = r.get(&lab.victim_url);
        assert_ne!(a.body, "squatted", "the squatter answered the neighbour's request");
        let now = app_processes(&r.data_dir(), &victim_id);
        (a.status == 200 && now.len() == 1 && now[0].0 != before[0].0).then_some(a)
    });
    assert_eq!(restarted.body, "goweb\n");
    let squat = squatter.join().unwrap();
    assert_eq!(squat.status, 200, "{squat:?}");
    let tries = number_after(&squat.body, &format!("squat {port}:"));
    assert!(tries > 100, "{}", squat.body);
    assert_eq!(
        squat.body,
        format!("BLOCKED squat {port}: {tries} tries, EACCES {tries}, EADDRINUSE 0, other 0 (-), bound 0, served 0")
    );
}

#[test]
fn tenant_variables_reach_only_the_app() {
    let r = Receiver::start();
    r.create_app("evil");
    r.push("evil", &fixtures::evil(), &["--arg", "serve"]);
    // The app's own files on the host: a library, by a name for LD_PRELOAD
    // and by the name of a library bwrap links (for LD_LIBRARY_PATH), and a
    // directory for GCONV_PATH.
    let data = r.data_dir().join("apps/evil/data");
    let uid = std::fs::metadata(&data).unwrap().uid();
    for dir in ["lib", "gconv"] {
        std::fs::create_dir(data.join(dir)).unwrap();
        std::os::unix::fs::chown(data.join(dir), Some(uid), Some(uid)).unwrap();
    }
    for name in ["preload.so", "lib/libcap.so.2"] {
        std::fs::copy(fixtures::preload_marker(), data.join(name)).unwrap();
        std::os::unix::fs::chown(data.join(name), Some(uid), Some(uid)).unwrap();
    }
    // Where the library reports having been loaded: the host's /tmp, writable by all.
    let witness = tempfile::Builder::new().prefix("nx-e2e-preload-").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(witness.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let preload = data.join("preload.so").display().to_string();
    let vars = [
        ("LD_PRELOAD", preload.clone()),
        ("LD_LIBRARY_PATH", data.join("lib").display().to_string()),
        ("GCONV_PATH", data.join("gconv").display().to_string()),
        ("NX_PRELOAD_MARKER", witness.path().join("loaded").display().to_string()),
    ];
    // The witness works: a host program given these variables does load it.
    let control = std::process::Command::new("/bin/true")
        .env("LD_PRELOAD", &preload)
        .env("NX_PRELOAD_MARKER", witness.path().join("control"))
        .status()
        .unwrap();
    assert!(control.success());
    assert!(std::fs::read_to_string(witness.path().join("control")).unwrap().starts_with("/bin/true (uid 0)"));

    let assignments: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec!["env", "set"];
    args.extend(assignments.iter().map(String::as_str));
    args.extend(["--app", "evil"]);
    let set = r.nx(&args);
    // Checked first: had bwrap loaded the library, this says where it ran.
    assert!(
        !witness.path().join("loaded").exists(),
        "tenant code ran outside the sandbox: {}",
        std::fs::read_to_string(witness.path().join("loaded")).unwrap_or_default()
    );
    set.success();
    // The app runs with them...
    let (app, environ) = eventually(60, "the app to run with its variables", || {
        let listing = r.nx(&["--json", "ls", "evil"]).success().json();
        listing[0]["deployments"].as_array().unwrap().iter().find_map(|d| {
            let id = d["id"].as_str()?;
            app_processes(&r.data_dir(), id).into_iter().find_map(|(pid, _)| {
                let environ =
                    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).ok()?).into_owned();
                environ.contains(&assignments[0]).then_some((id.to_owned(), environ))
            })
        })
    });
    let inside: Vec<&str> = environ.split('\0').collect();
    for a in &assignments {
        assert!(inside.contains(&a.as_str()), "{a} not in the app's environment: {inside:?}");
    }
    // ...and nothing on the host side loaded the library.
    assert!(
        !witness.path().join("loaded").exists(),
        "tenant code ran outside the sandbox: {}",
        std::fs::read_to_string(witness.path().join("loaded")).unwrap_or_default()
    );
    // No value is on any command line, and bwrap's own environment is the platform's.
    let mut bwraps = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).into_owned();
        for (k, v) in &vars {
            assert!(!cmdline.contains(v.as_str()), "the value of {k} is on the command line of {pid}: {cmdline:?}");
        }
        if cmdline.starts_with("/usr/bin/bwrap\0") && cmdline.contains(&format!("/run/{app}/")) {
            bwraps += 1;
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            assert_eq!(String::from_utf8_lossy(&environ), "PATH=/usr/sbin:/usr/bin:/sbin:/bin\0", "bwrap {pid}");
        }
    }
    assert!(bwraps >= 1, "no bwrap process of deployment {app} was found");
    assert!(!witness.path().join("loaded").exists());
}

/// What `head -c1 PATH` run as `uid` says on stderr (empty when it read).
fn read_as(uid: u32, path: &std::path::Path) -> String {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("/usr/bin/head").arg("-c1").arg(path).uid(uid).gid(uid).output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tenant_files_are_readable_by_their_uid_alone() {
    let r = Receiver::start();
    r.create_app("victim");
    r.create_app("other");
    let victim = r.push("victim", &fixtures::go(Go::Static), &[]);
    r.push("other", &fixtures::go(Go::Static), &[]);
    let id = victim["id"].as_str().unwrap();
    let digest = victim["digest"].as_str().unwrap();
    let data = r.data_dir();
    let uid_of = |app: &str| std::fs::metadata(data.join(format!("apps/{app}/data"))).unwrap().uid();
    let (victim_uid, other_uid) = (uid_of("victim"), uid_of("other"));
    let files = [
        data.join("apps/victim/data.img"),
        data.join(format!("logs/deployments/{id}.log")),
        {
            // The binary's directory, bound at /app, holds it alone.
            let bin = data.join(format!("run/{id}/app"));
            let names: Vec<_> = std::fs::read_dir(&bin).unwrap().flatten().map(|e| e.path()).collect();
            assert_eq!(names.len(), 1, "{names:?}");
            names[0].clone()
        },
        data.join(format!("store/artifacts/{}", digest.trim_start_matches("sha256:"))),
    ];
    for file in &files {
        assert!(file.is_file(), "{} is missing", file.display());
        for (who, uid) in [("nobody", 65_534), ("another app", other_uid)] {
            assert_eq!(
                read_as(uid, file),
                format!("/usr/bin/head: cannot open '{}' for reading: Permission denied\n", file.display()),
                "{who} read {}",
                file.display()
            );
        }
    }
    // The image is root's alone; the binary is the app's to read through its run directory.
    let image = std::fs::metadata(&files[0]).unwrap();
    assert_eq!((image.uid(), image.mode() & 0o777), (0, 0o600));
    assert_eq!(read_as(victim_uid, &files[2]), "");
}

/// An app that listens without binding first is handed a port the kernel
/// picks from its automatic range (Landlock sees binds only), so one that
/// held all the others would be handed the database's port when PostgreSQL
/// restarts. The platform's ports in that range are reserved: the kernel
/// never picks them, whatever an app holds. Here the database's port is in
/// the range, as the default 54320 is.
#[test]
fn the_platforms_ports_in_the_kernels_automatic_range_are_reserved() {
    // A port the kernel picked itself is in its automatic range.
    let pg_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let r = Receiver::start_with(nx_e2e::receiver::Options { pg_port: Some(pg_port), ..Default::default() });
    // Read as a receiver reads it: under its lock, in one read (other
    // receivers of the suite write it meanwhile).
    let path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let locked = nx_runtime::sys::lock(std::fs::File::open(path).unwrap()).unwrap();
    let reserved = nx_receiver::ports::read_at_once(&locked).unwrap();
    drop(locked);
    let held = reserved.trim().split(',').filter(|s| !s.is_empty()).any(|part| {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&pg_port)
    });
    assert!(held, "the database's port {pg_port} is not in ip_local_reserved_ports: {reserved}");
    // The receiver's database answers there.
    r.create_app("web");
}

#[test]
fn the_operator_opens_private_ranges_and_host_dns_by_flag() {
    let r = Receiver::start_with(nx_e2e::receiver::Options {
        args: ["--allow-egress", "10.20.0.0/16,fd00:1::/32", "--allow-host-dns"].map(String::from).to_vec(),
        ..Default::default()
    });
    let status = r.nx(&["--json", "status"]).success().json();
    let network = status["isolation"].as_array().unwrap().iter().find(|e| e["limit"] == "network").unwrap().clone();
    assert_eq!(network["by"], "nftables");
    assert_eq!(
        network["value"],
        "local ports closed except the database (".to_owned()
            + &r.pg_port.to_string()
            + ") and DNS; private, CGNAT, link-local and unique-local addresses closed except 10.20.0.0/16, fd00:1::/32"
    );
    // A range with host bits is refused with the range to write instead.
    let bad = std::process::Command::new(nx_e2e::bin("nx-receiver"))
        .args(["serve", "--allow-egress", "10.20.0.1/16"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("write the range's first address (10.20.0.0/16)"), "{err}");
}
