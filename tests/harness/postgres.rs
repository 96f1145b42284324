//! A PostgreSQL cluster outside the receiver, for `--database-url`: initdb'd
//! and run as Debian's `postgres` user in a temporary directory, with password
//! authentication on loopback.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::receiver::{free_port, psql};

const BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(format!("{BIN}/{program}"));
    cmd
}

/// A running cluster with an `admin` superuser.
#[derive(Debug)]
pub struct ExternalCluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    password: String,
    child: Option<Child>,
}

impl ExternalCluster {
    pub fn start() -> ExternalCluster {
        let dir = tempfile::Builder::new().prefix("nx-extpg-").tempdir_in("/tmp").unwrap();
        let (uid, gid) =
            nx_runtime::sys::lookup_user("postgres").expect("Debian's postgres user (apt-get install postgresql)");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let password = format!("ext{}", hex::encode(rand::random::<[u8; 12]>()));
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &password).unwrap();
        std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        let data = dir.path().join("data");
        let out = crate::exec::output(
            as_postgres("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "admin", "--auth=scram-sha-256", "--no-locale", "-E", "UTF8"])
                .arg(format!("--pwfile={}", pwfile.display())),
        )
        .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let child = crate::exec::spawn(
            as_postgres("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-k")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap();
        let cluster = ExternalCluster { dir, port, password, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while psql(&cluster.admin_url(), "SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "the external cluster did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://admin:{}@127.0.0.1:{}/postgres", self.password, self.port)
    }
}

impl Drop for ExternalCluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
            let _ = c.wait();
        }
    }
}
