//! A real ACME CA for the certificate tests: Debian's `pebble` (Let's
//! Encrypt's test server) and `pebble-challtestsrv` as the DNS server both
//! pebble and the receiver ask, on free loopback ports. Records are added
//! through challtestsrv's management API; pebble validates HTTP-01 on the
//! router's plain port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::receiver::free_port;

/// pebble and its DNS server, with the files they use.
#[derive(Debug)]
pub struct Acme {
    pub dir: tempfile::TempDir,
    /// challtestsrv's DNS port (UDP and TCP).
    pub dns_port: u16,
    dns_management: u16,
    /// pebble's ACME API (HTTPS).
    pub acme_port: u16,
    pebble_management: u16,
    children: Vec<Child>,
}

fn log(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).expect("log file")
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Acme {
    /// Starts the DNS server and prepares pebble's files; [`Acme::start_ca`]
    /// starts pebble once the router's port is known.
    pub fn start() -> Acme {
        crate::require_program("pebble", "pebble");
        let challtestsrv = crate::require_program("pebble-challtestsrv", "pebble");
        let dir = tempfile::Builder::new().prefix("nx-acme-").tempdir().expect("tempdir");
        let (dns_port, dns_management, acme_port, pebble_management) =
            (free_port(), free_port(), free_port(), free_port());
        // pebble's own HTTPS certificate, from a CA of our own: the receiver
        // trusts that CA with --acme-ca-root.
        let d = dir.path();
        openssl(
            &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"]
                .into_iter()
                .chain(["-subj", "/CN=nx test ACME server CA", "-keyout", "ca.key", "-out", "ca.pem"])
                .chain(["-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign"])
                .collect::<Vec<_>>(),
            d,
        );
        openssl(
            &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost"]
                .into_iter()
                .chain(["-keyout", "pebble.key", "-out", "pebble.csr"])
                .collect::<Vec<_>>(),
            d,
        );
        std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(
            &["x509", "-req", "-in", "pebble.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
                .into_iter()
                .chain(["-days", "2", "-extfile", "ext", "-out", "pebble.pem"])
                .collect::<Vec<_>>(),
            d,
        );
        let child = crate::exec::spawn(
            Command::new(challtestsrv)
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-management", &format!("127.0.0.1:{dns_management}")])
                // Only what a test adds resolves: no default answers.
                .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "", "-defaultIPv6", ""])
                .stdout(log(d, "challtestsrv.log"))
                .stderr(Stdio::null()),
        )
        .expect("start pebble-challtestsrv");
        let acme = Acme { dir, dns_port, dns_management, acme_port, pebble_management, children: vec![child] };
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::blocking::Client::new();
        while client
            .post(format!("http://127.0.0.1:{dns_management}/clear-txt"))
            .body("{\"host\":\"x.\"}")
            .send()
            .is_err()
        {
            assert!(Instant::now() < deadline, "pebble-challtestsrv did not come up: {}", acme.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        acme
    }

    /// Starts pebble, which validates HTTP-01 challenges on `http_port` of
    /// the address a name resolves to (the router's).
    pub fn start_ca(&mut self, http_port: u16) {
        let pebble = crate::require_program("pebble", "pebble");
        let d = self.dir.path();
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.acme_port),
            "managementListenAddress": format!("127.0.0.1:{}", self.pebble_management),
            "certificate": d.join("pebble.pem"),
            "privateKey": d.join("pebble.key"),
            "httpPort": http_port,
            // TLS-ALPN-01 is not used; a port nothing listens on.
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(d.join("pebble.json"), config.to_string()).unwrap();
        let child = crate::exec::spawn(
            Command::new(pebble)
                .args(["-config", &d.join("pebble.json").to_string_lossy()])
                .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
                // No random waits before validation, no refused nonces, and
                // a new validation for almost every order (renewals too):
                // pebble still reuses a valid authorization for one order in
                // a hundred at 0, so no test may count on a new one.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .stdout(log(d, "pebble.log"))
                .stderr(Stdio::null()),
        )
        .expect("start pebble");
        self.children.push(child);
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(self.directory()).send().is_err() {
            assert!(Instant::now() < deadline, "pebble did not come up: {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client trusting pebble's HTTPS.
    fn client(&self) -> reqwest::blocking::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca_root()).unwrap()).unwrap();
        reqwest::blocking::Client::builder().add_root_certificate(ca).build().unwrap()
    }

    /// The CA of pebble's own HTTPS (not of the certificates it issues).
    pub fn ca_root(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The receiver flags that make it ask this CA, through this DNS server.
    pub fn receiver_args(&self) -> Vec<String> {
        vec![
            format!("--dns-resolver=127.0.0.1:{}", self.dns_port),
            format!("--acme-directory={}", self.directory()),
            format!("--acme-ca-root={}", self.ca_root().display()),
        ]
    }

    /// The root of the certificates pebble issues (new at every start),
    /// saved to a file for `curl --cacert`.
    pub fn issuing_root(&self) -> PathBuf {
        let pem = self
            .client()
            .get(format!("https://127.0.0.1:{}/roots/0", self.pebble_management))
            .send()
            .unwrap()
            .text()
            .unwrap();
        let path = self.dir.path().join("issuing-root.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }

    /// challtestsrv's management API (the fake Cloudflare writes there).
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.dns_management)
    }

    fn manage(&self, what: &str, body: serde_json::Value) {
        let resp = reqwest::blocking::Client::new()
            .post(format!("http://127.0.0.1:{}/{what}", self.dns_management))
            .body(body.to_string())
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "challtestsrv /{what}: {}", resp.status());
    }

    /// `host` has an A record to `ip`.
    pub fn add_a(&self, host: &str, ip: &str) {
        self.manage("add-a", serde_json::json!({ "host": format!("{host}."), "addresses": [ip] }));
    }

    /// `host` is a CNAME to `target`.
    pub fn set_cname(&self, host: &str, target: &str) {
        self.manage("set-cname", serde_json::json!({ "host": format!("{host}."), "target": format!("{target}.") }));
    }

    /// `host` has a TXT record holding `value`.
    pub fn set_txt(&self, host: &str, value: &str) {
        self.manage("set-txt", serde_json::json!({ "host": format!("{host}."), "value": value }));
    }

    /// `host` has no TXT record any more.
    pub fn clear_txt(&self, host: &str) {
        self.manage("clear-txt", serde_json::json!({ "host": format!("{host}.") }));
    }

    /// What pebble and challtestsrv printed, for failure messages.
    pub fn logs(&self) -> String {
        ["pebble.log", "challtestsrv.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Acme {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
