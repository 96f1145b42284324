//! A real S3-compatible server for the storage tests: moto's server from PyPI,
//! which scripts/test.sh installs into `target/test-venv`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::receiver::free_port;

/// The test virtualenv's bin directory.
pub fn venv_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin")
}

/// A moto server on a free loopback port, with one bucket.
#[derive(Debug)]
pub struct Moto {
    pub port: u16,
    pub bucket: String,
    child: Option<Child>,
}

impl Moto {
    pub fn start() -> Moto {
        let server = venv_bin().join("moto_server");
        assert!(
            server.is_file(),
            "{} is missing: scripts/test.sh installs moto (python3 -m venv target/test-venv && target/test-venv/bin/pip install 'moto[server]')",
            server.display()
        );
        let port = free_port();
        let child = crate::exec::spawn(
            Command::new(server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("start moto_server");
        let moto = Moto { port, bucket: "nx-artifacts".into(), child: Some(child) };
        let client = reqwest::blocking::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // moto does not check signatures: a plain PUT creates the bucket.
            if let Ok(r) = client.put(format!("{}/{}", moto.endpoint(), moto.bucket)).send() {
                if r.status().is_success() {
                    return moto;
                }
            }
            assert!(Instant::now() < deadline, "moto_server did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The receiver settings that make it use this server.
    pub fn receiver_env(&self) -> Vec<(String, String)> {
        [
            ("NX_STORE", format!("s3://{}/prefix", self.bucket)),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The keys stored in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let text = reqwest::blocking::get(format!("{}/{}", self.endpoint(), self.bucket)).unwrap().text().unwrap();
        text.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect()
    }

    /// Stops the server, as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
