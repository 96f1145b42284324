//! Local log drain endpoints: Debian's rsyslog (`rsyslogd` with imtcp, plain
//! TCP and TLS through its gtls driver; scripts/test.sh installs `rsyslog`
//! and `rsyslog-gnutls`), writing each message as it arrived; and an HTTPS
//! sink (rustls, the certificate given) keeping each NDJSON line POSTed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::receiver::free_port;
use crate::require_program;

/// An rsyslogd with its own configuration, listening on a plain TCP port and
/// a TLS one, and writing every message (`%rawmsg%`, without its framing) as
/// one line of a file.
#[derive(Debug)]
pub struct Rsyslog {
    pub tcp_port: u16,
    pub tls_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Rsyslog {
    /// Starts rsyslogd serving TLS with `cert` and `key` and waits until both
    /// ports accept connections.
    pub fn start(cert: &Path, key: &Path) -> Rsyslog {
        let binary = require_program("rsyslogd", "rsyslog");
        assert!(
            Path::new("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists()
                || Path::new("/usr/lib/rsyslog/lmnsd_gtls.so").exists()
                || std::env::var_os("CI").is_none(),
            "rsyslog's TLS driver is missing: apt-get install rsyslog-gnutls"
        );
        let dir = tempfile::Builder::new().prefix("nx-e2e-rsyslog-").tempdir().expect("tempdir");
        let (tcp_port, tls_port) = (free_port(), free_port());
        let d = dir.path().display();
        let config = dir.path().join("rsyslog.conf");
        std::fs::write(
            &config,
            format!(
                "global(workDirectory=\"{d}\" defaultNetstreamDriverCAFile=\"{cert}\" \
                 defaultNetstreamDriverCertFile=\"{cert}\" defaultNetstreamDriverKeyFile=\"{key}\")\n\
                 module(load=\"imtcp\")\n\
                 input(type=\"imtcp\" port=\"{tcp_port}\" address=\"127.0.0.1\" ruleset=\"drains\")\n\
                 input(type=\"imtcp\" port=\"{tls_port}\" address=\"127.0.0.1\" ruleset=\"drains\" \
                 streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")\n\
                 template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
                 ruleset(name=\"drains\") {{ action(type=\"omfile\" file=\"{d}/messages\" template=\"raw\") }}\n",
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .expect("rsyslog.conf");
        let log = std::fs::File::create(dir.path().join("rsyslogd.log")).expect("rsyslog log");
        let child = crate::exec::spawn(
            Command::new(binary)
                .arg("-n")
                .arg("-f")
                .arg(&config)
                .arg("-i")
                .arg(dir.path().join("rsyslogd.pid"))
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("start rsyslogd");
        let r = Rsyslog { tcp_port, tls_port, dir, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in [tcp_port, tls_port] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "rsyslogd did not listen on {port}:\n{}", r.log());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        r
    }

    /// What rsyslogd printed, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.log")).unwrap_or_default()
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("messages"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTPS endpoint that keeps every line of every POST and answers 200.
#[derive(Debug)]
pub struct HttpsSink {
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    posts: Arc<Mutex<Vec<(String, String)>>>,
    _runtime: tokio::runtime::Runtime,
}

impl HttpsSink {
    /// Serves TLS with `cert` and `key` on a free loopback port.
    pub fn start(cert: &Path, key: &Path) -> HttpsSink {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert).expect("cert.pem").collect::<Result<_, _>>().expect("cert.pem");
        let key = PrivateKeyDer::from_pem_file(key).expect("key.pem");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("TLS certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let (kept, seen) = (lines.clone(), posts.clone());
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, kept, seen) = (acceptor.clone(), kept.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (kept, seen) = (kept.clone(), seen.clone());
                        async move {
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let path = req.uri().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let text = String::from_utf8_lossy(&body).into_owned();
                            seen.lock().unwrap().push((path, content_type));
                            kept.lock().unwrap().extend(text.lines().map(str::to_owned));
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        HttpsSink { port, lines, posts, _runtime: runtime }
    }

    /// Every NDJSON line received so far, in order.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().iter().map(|l| serde_json::from_str(l).expect("an NDJSON line")).collect()
    }

    /// Each POST's target and content type.
    pub fn posts(&self) -> Vec<(String, String)> {
        self.posts.lock().unwrap().clone()
    }
}
