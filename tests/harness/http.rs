//! HTTP through the router: requests go to the router's loopback port with the
//! `Host` header of a preview or production URL, as a browser resolving
//! `*.localhost` would send them.

use std::time::Duration;

/// A response, reduced to what tests check.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: reqwest::header::HeaderMap,
}

/// A client for plain `http://` requests to the router: it loads no root
/// certificates, which took 1.8 ms per request (a client is made for each),
/// counted in the push bench's time to the preview's answer.
fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .tls_built_in_root_certs(false)
        .build()
        .expect("http client")
}

/// GET `url` (an `http://host:port/path` URL printed by nx) through the router
/// listening on `router_port` of 127.0.0.1.
pub fn get_url(router_port: u16, url: &str) -> Answer {
    let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("{url} is not an http URL"));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    get_host(router_port, authority, path)
}

/// GET `path` with `Host: host`.
pub fn get_host(router_port: u16, host: &str, path: &str) -> Answer {
    let resp = client()
        .get(format!("http://127.0.0.1:{router_port}{path}"))
        .header(reqwest::header::HOST, host)
        .send()
        .unwrap_or_else(|e| panic!("GET {host}{path} through the router failed: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().unwrap_or_default();
    Answer { status, body, headers }
}
