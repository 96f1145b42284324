//! One request's routing decision and the headers it carries across the hop,
//! shared by the router's HTTP/1 loop ([`crate::h1`]) and pingora's proxy,
//! which serves HTTP/2 ([`crate::proxy`]): both answer the same request the
//! same way.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use nx_protocol::logs::AccessLine;
use nx_protocol::names::url_for_host;
use nx_protocol::routes::{normalize_host, Target, ACME_CHALLENGE_PREFIX};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::pages::{Page, PageKind};
use crate::table::{Entry, RouteStore};
use crate::wake::Wakes;

/// Request id header: always the router's own, so an id in the logs names
/// one request, whatever the client sent.
pub const REQUEST_ID: &str = "x-request-id";

/// A client's own `X-Request-Id`, passed on under this name: apps can still
/// join their traces with a caller's, and cannot mistake it for the router's.
pub const CLIENT_REQUEST_ID: &str = "x-client-request-id";

/// Headers that claim where a request came from or how: only the router may
/// say, so a client's are dropped. X-Forwarded-For, -Proto, -Host and
/// X-Real-IP are then set by the router (replaced, never appended to).
const FORGEABLE: [HeaderName; 6] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static(CLIENT_REQUEST_ID),
];

/// The forwarding headers the router sets (replaced, never appended to):
/// a client's are dropped.
const ROUTER_SETS: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static(REQUEST_ID),
];

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1).
/// `connection` and `upgrade` are handled apart: an upgrade needs them.
const HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
];

/// The hop-by-hop headers present in `headers`. Most requests and responses
/// have none, and a scan of the names is cheaper than removing each absent one.
/// Headers that `Connection` cannot name: they frame the message or say
/// where it goes, and the router relies on them reaching the app.
const END_TO_END: [HeaderName; 4] = [header::HOST, header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::UPGRADE];

fn hop_by_hop(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers.keys().filter(|k| HOP_BY_HOP.contains(k)).cloned().collect()
}

/// The headers `req`'s `Connection` names (hop-by-hop for this request),
/// less those it cannot name ([`END_TO_END`]).
fn connection_named(req: &RequestHeader) -> Vec<HeaderName> {
    req.headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        // A client cannot name away what frames the message or says where
        // it goes (`Connection: host` would leave the app a request without
        // the Host it was routed by).
        .filter(|h| !END_TO_END.contains(h) && h.as_str() != "keep-alive" && h.as_str() != "close")
        .collect()
}

/// The client connection a request came on, as the forwarding headers tell it.
#[derive(Debug, Clone)]
pub struct Client {
    /// The client's address, formatted once per connection.
    ip: Option<HeaderValue>,
    tls: bool,
}

impl Client {
    pub fn new(ip: Option<IpAddr>, tls: bool) -> Client {
        Client { ip: ip.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok()), tls }
    }

    /// Whether the client connected over TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }
}

/// An app's listener as the router reaches it: its address, and which
/// deployment owns it. Connections are kept and reused by both: a port that
/// one deployment gives up and another is given must not carry the new
/// owner's requests over connections the old one accepted (and may have
/// handed, still open, to a process of its own that outlives it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    /// The owning deployment's id, hashed (ids are the receiver's random
    /// choice, so no tenant can make two of them collide).
    pub owner: u64,
}

impl Backend {
    pub fn new(addr: SocketAddr, deployment: &str) -> Backend {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        deployment.hash(&mut h);
        Backend { addr, owner: h.finish() }
    }
}

/// What the router does with a request.
#[derive(Debug)]
pub enum Decision {
    /// Proxy it to this upstream.
    Forward(Backend),
    /// Answer it with this page.
    Answer(Page),
}

/// One request as the router sees it: its host, route, id and start time.
#[derive(Debug)]
pub struct Exchange {
    pub host: String,
    pub route: Option<Arc<Entry>>,
    pub upstream: Option<Backend>,
    /// The router's id for this request.
    pub request_id: String,
    /// The client's own `X-Request-Id`, when it sent a usable one.
    pub client_request_id: Option<String>,
    pub started: Instant,
    /// Whether the request is forwarded, and so counted as open on the
    /// replica it went to, to be counted closed when it is dropped.
    open: bool,
    /// Which of the route's replicas it is counted on, when it has several.
    replica: Option<usize>,
    /// Whether it was sent to another replica already: only once.
    failed_over: bool,
    /// The `Strict-Transport-Security` header its answer carries, if any.
    hsts: Option<HeaderValue>,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(entry) = &self.route {
            if self.open {
                entry.traffic(self.forwarded_to()).close();
            }
        }
        self.release();
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The authority of an absolute-form request target (`GET http://host/path`),
/// which pingora keeps in the raw target only (its `Uri` holds the path).
fn target_authority(raw: &[u8]) -> Option<&str> {
    let raw = std::str::from_utf8(raw).ok()?;
    let (scheme, rest) = raw.split_once("://")?;
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return None;
    }
    Some(rest.split(['/', '?', '#']).next().unwrap_or_default())
}

/// The host a request is routed by: its Host header, else the authority of
/// an absolute-form target (pingora refuses the two when they differ), else
/// the URI's (HTTP/2's `:authority`).
fn request_host(req: &RequestHeader) -> String {
    let raw = req
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| target_authority(req.raw_path()))
        .or_else(|| req.uri.host())
        .unwrap_or_default();
    normalize_host(raw)
}

/// Whether a header name holds `_`: many frameworks fold `_` and `-`
/// together (CGI, WSGI, Rack, PHP), so `X_Real_IP` would reach them as the
/// `X-Real-IP` the router sets. Dropped, as nginx's `underscores_in_headers
/// off` does.
fn has_underscore(name: &HeaderName) -> bool {
    name.as_str().contains('_')
}

/// 128 random bits in lowercase hex.
fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = rand::random::<u128>();
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> ((31 - i) * 4)) & 0xf) as usize];
    }
    String::from_utf8_lossy(&id).into_owned()
}

/// Whether the request asks to switch protocols (WebSocket): HTTP/1.1, with
/// `Upgrade` named in `Connection` and present.
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req.headers.contains_key(header::UPGRADE)
        && req
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

impl Exchange {
    /// Routes a request by its host and gives it an id. ACME challenges for
    /// the host are answered first (on plain HTTP too, as the CA asks there),
    /// then a plain request for a host with a certificate is redirected to HTTPS.
    /// A request to a sleeping deployment is held until it wakes ([`crate::wake`]).
    pub async fn begin(store: &RouteStore, req: &RequestHeader, tls: bool) -> (Exchange, Decision) {
        let mut ex = Exchange {
            host: request_host(req),
            route: None,
            upstream: None,
            request_id: new_request_id(),
            client_request_id: req
                .headers
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 128)
                .map(str::to_owned),
            started: Instant::now(),
            open: false,
            replica: None,
            failed_over: false,
            hsts: None,
        };
        ex.hsts = store.hsts_for(&ex.host, tls);
        if let Some(answer) =
            req.uri.path().strip_prefix(ACME_CHALLENGE_PREFIX).and_then(|token| store.challenge(&ex.host, token))
        {
            return (ex, Decision::Answer(Page::challenge(answer)));
        }
        if let Some(port) = store.https_port_for(&ex.host).filter(|_| !tls) {
            let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
            let location = format!("{}{target}", url_for_host("https", &ex.host, port));
            return (ex, Decision::Answer(Page::redirect(location)));
        }
        let Some(entry) = store.lookup(&ex.host) else {
            let page = Page::unknown_host(&ex.host);
            return (ex, Decision::Answer(page));
        };
        entry.touch(unix_now());
        let decision = match ex.decide(entry, Some(store.wakes())) {
            Some(decided) => decided,
            None => ex.wake(store).await,
        };
        (ex, decision)
    }

    /// What to do with the request given its route; `None`: hold it until
    /// its deployment wakes. A starting route waits for the wake of its
    /// deployment when `wakes` has one under way (asked only then: it takes
    /// a lock the request path otherwise never does).
    fn decide(&mut self, entry: Arc<Entry>, wakes: Option<&Wakes>) -> Option<Decision> {
        let route = &entry.route;
        let decision = match &route.target {
            Target::Live { addr } => {
                let upstream = Backend::new(*addr, &route.deployment);
                self.upstream = Some(upstream);
                self.open = true;
                entry.traffic(self.forwarded_to()).open();
                Decision::Forward(upstream)
            }
            Target::Starting if wakes.is_some_and(|w| w.is_waking(&route.deployment)) => return self.hold(entry),
            Target::Replicas { .. } => match entry.replicas.as_ref().and_then(|r| r.pick(None)) {
                Some((i, upstream)) => {
                    self.upstream = Some(upstream);
                    self.replica = Some(i);
                    self.open = true;
                    entry.traffic(self.forwarded_to()).open();
                    Decision::Forward(upstream)
                }
                // The receiver lists only healthy replicas, and sends a
                // route without any as starting or failed.
                None => Decision::Answer(Page::starting(&route.app, &route.deployment)),
            },
            Target::Starting => Decision::Answer(Page::starting(&route.app, &route.deployment)),
            Target::Stopped { reason } => {
                Decision::Answer(Page::stopped(&route.app, &route.deployment, reason.as_deref()))
            }
            Target::Failed => Decision::Answer(Page::failed(&route.app, &route.deployment)),
            Target::Sleeping => return self.hold(entry),
        };
        self.route = Some(entry);
        Some(decision)
    }

    /// Keeps the sleeping route for [`Exchange::wake`].
    fn hold(&mut self, entry: Arc<Entry>) -> Option<Decision> {
        self.route = Some(entry);
        None
    }

    /// Holds a request whose route sleeps until its deployment is woken,
    /// then decides again on the route its host has then; a route still
    /// asleep gets the 503 page.
    async fn wake(&mut self, store: &RouteStore) -> Decision {
        let Some(entry) = self.route.clone() else { return Decision::Answer(Page::unknown_host(&self.host)) };
        let (app, deployment) = (&entry.route.app, &entry.route.deployment);
        match store.wakes().hold(store, &self.host, app, deployment).await {
            crate::wake::Woken::Answer(page) => Decision::Answer(page),
            crate::wake::Woken::Route(now) => {
                self.decide(now, None).unwrap_or_else(|| Decision::Answer(Page::wake_timeout(app, deployment)))
            }
        }
    }

    /// The index, in its route's target, of the address the request is
    /// forwarded to (0 for a live route); `None` when it is not forwarded.
    fn forwarded_to(&self) -> Option<usize> {
        self.open.then(|| self.replica.unwrap_or(0))
    }

    /// Stops counting the request on its replica.
    fn release(&mut self) {
        if let (Some(i), Some(entry)) = (self.replica.take(), &self.route) {
            if let Some(r) = &entry.replicas {
                r.done(i);
            }
        }
    }

    /// Leaves the request's replica out for a while: it could not be
    /// connected to. Nothing for a route without replicas.
    pub fn unreachable(&self) {
        if let (Some(i), Some(Some(r))) = (self.replica, self.route.as_ref().map(|e| e.replicas.as_ref())) {
            r.take_out(i);
        }
    }

    /// Another replica for a request its upstream failed before answering;
    /// `None` when the route has no other replica.
    pub fn fail_over(&mut self) -> Option<Backend> {
        let failed = self.replica.filter(|_| !self.failed_over)?;
        let entry = self.route.as_ref()?;
        let replicas = entry.replicas.as_ref()?;
        let (i, upstream) = replicas.pick(Some(failed))?;
        replicas.done(failed);
        // Open on the replica that has it now, so each replica's gauge of
        // open requests comes back to zero.
        entry.traffic(Some(failed)).close();
        entry.traffic(Some(i)).open();
        self.failed_over = true;
        self.replica = Some(i);
        self.upstream = Some(upstream);
        Some(upstream)
    }

    /// The app and deployment of the request's route, empty when none.
    pub fn names(&self) -> (&str, &str) {
        self.route.as_ref().map_or(("", ""), |e| (e.route.app.as_str(), e.route.deployment.as_str()))
    }

    /// The page for an upstream that failed with `e` before its response
    /// started: 504 when it took too long (to accept or to answer), 502 else.
    pub fn upstream_failed(&self, e: &pingora::Error) -> Page {
        let (app, deployment) = self.names();
        match e.etype() {
            pingora::ErrorType::ConnectTimedout | pingora::ErrorType::ReadTimedout => {
                Page::upstream_timeout(app, deployment)
            }
            _ => Page::upstream_down(app, deployment),
        }
    }

    /// The request header the upstream gets for the client's `req`:
    /// hop-by-hop headers out (and those the client named in `Connection`),
    /// the client's claims of where it came from out (headers whose names hold
    /// `_` too), the router's forwarding headers and request id in. `Connection`
    /// and `Upgrade` stay only for an upgrade, so upstream connections are kept
    /// alive whatever the client asked for its own connection. An absolute-form
    /// target is sent in origin-form, with the Host the request was routed by:
    /// an app reading the target's host could otherwise see another one.
    ///
    /// Built anew, sized for what it will hold, rather than a copy of the
    /// client's header edited in place: the copy's maps are full, and each
    /// header added to them grew and rehashed both (the value map and
    /// pingora's map of the names' case); the copy and its edit were a fifth
    /// of the router's instructions per request (bench/RESULTS.md, "Router").
    /// Header names keep the client's case, in the client's order.
    pub fn upstream_request(&self, req: &RequestHeader, client: &Client) -> pingora::Result<RequestHeader> {
        let upgrade = is_upgrade(req);
        let target = if target_authority(req.raw_path()).is_some() {
            req.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes()
        } else {
            req.raw_path()
        };
        // Room for the router's own: Host, Connection (an upgrade), the
        // five forwarding headers and the client's request id, and the
        // Transfer-Encoding the HTTP/1 loop may add to a body without one.
        let size = req.headers.len() + 9;
        let mut up = if req.has_case() {
            RequestHeader::build(req.method.clone(), target, Some(size))?
        } else {
            RequestHeader::build_no_case(req.method.clone(), target, Some(size))?
        };
        up.set_version(req.version);
        if let Some(end) = req.send_end_stream() {
            up.set_send_end_stream(end);
        }
        let named = connection_named(req);
        let passes = |name: &HeaderName| {
            !(HOP_BY_HOP.contains(name)
                || FORGEABLE.contains(name)
                || ROUTER_SETS.contains(name)
                || has_underscore(name)
                || *name == header::CONNECTION
                || (*name == header::UPGRADE && !upgrade)
                || named.contains(name))
        };
        if req.has_case() {
            // Both maps hold the same names in the same order.
            for ((name, value), (case, _)) in req.headers.iter().zip(req.case_header_iter()) {
                if passes(name) {
                    up.append_header(case.clone(), value.clone())?;
                }
            }
        } else {
            for (name, value) in req.headers.iter().filter(|(name, _)| passes(name)) {
                up.append_header(name.clone(), value.clone())?;
            }
        }
        if upgrade {
            up.insert_header(header::CONNECTION, "upgrade")?;
        }
        if !up.headers.contains_key(header::HOST) {
            up.insert_header(header::HOST, self.host.as_str())?;
        }
        if let Some(ip) = &client.ip {
            up.append_header("x-forwarded-for", ip.clone())?;
            up.append_header("x-real-ip", ip.clone())?;
        }
        if let Some(theirs) = &self.client_request_id {
            up.append_header(CLIENT_REQUEST_ID, theirs.as_str())?;
        }
        up.append_header("x-forwarded-proto", if client.tls { "https" } else { "http" })?;
        up.append_header("x-forwarded-host", self.host.as_str())?;
        up.append_header(REQUEST_ID, self.request_id.as_str())?;
        Ok(up)
    }

    /// The upstream's response header as the client gets it. When `draining`,
    /// the response closes its connection.
    pub fn rewrite_response(&self, resp: &mut ResponseHeader, draining: bool) -> pingora::Result<()> {
        for h in &hop_by_hop(&resp.headers) {
            resp.remove_header(h);
        }
        resp.insert_header(REQUEST_ID, self.request_id.as_str())?;
        if let Some(hsts) = &self.hsts {
            resp.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts.clone())?;
        }
        if draining {
            resp.insert_header(header::CONNECTION, "close")?;
        }
        Ok(())
    }

    /// The header and body of one of the router's own pages.
    pub fn page(&self, page: &Page, draining: bool) -> pingora::Result<(Box<ResponseHeader>, Bytes)> {
        let mut resp = ResponseHeader::build(page.status, Some(7))?;
        let body = match &page.kind {
            PageKind::Text(text) => {
                resp.insert_header(header::CONTENT_TYPE, "text/plain")?;
                Bytes::from(text.clone())
            }
            PageKind::Redirect(location) => {
                resp.insert_header(header::LOCATION, location.as_str())?;
                resp.insert_header(header::CONTENT_TYPE, "text/html; charset=utf-8")?;
                Bytes::from(page.html())
            }
            PageKind::Html => {
                resp.insert_header(header::CONTENT_TYPE, "text/html; charset=utf-8")?;
                Bytes::from(page.html())
            }
        };
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_header(REQUEST_ID, self.request_id.as_str())?;
        if let Some(hsts) = &self.hsts {
            resp.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts.clone())?;
        }
        if page.status == 503 {
            resp.insert_header(header::RETRY_AFTER, "2")?;
        }
        if draining {
            resp.insert_header(header::CONNECTION, "close")?;
        }
        Ok((Box::new(resp), body))
    }

    /// The end of a request: counted on its deployment (`status` 0 when no
    /// response was sent; body bytes read from and sent to the client), and
    /// the access log line ([`crate::access`]).
    pub fn finish(&self, req: &RequestHeader, status: u16, bytes: (usize, usize), error: Option<String>) {
        let micros = self.started.elapsed().as_micros() as u64;
        if let Some(entry) = &self.route {
            entry.traffic(self.forwarded_to()).record(status, micros, bytes.0 as u64, bytes.1 as u64);
        }
        let Some(log) = crate::access::installed() else { return };
        let (app, deployment) = self.names();
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        log.record(&AccessLine {
            ts,
            host: self.host.as_str().into(),
            method: req.method.as_str().into(),
            path: req.uri.path().into(),
            status,
            app: app.into(),
            deployment: deployment.into(),
            request_id: self.request_id.as_str().into(),
            client_request_id: self.client_request_id.as_deref().map(Into::into),
            micros,
            bytes_in: bytes.0 as u64,
            bytes_out: bytes.1 as u64,
            error: error.map(Into::into),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    fn exchange() -> Exchange {
        Exchange {
            host: "app.localhost".into(),
            route: None,
            upstream: None,
            request_id: "id-1".into(),
            client_request_id: None,
            started: Instant::now(),
            open: false,
            replica: None,
            failed_over: false,
            hsts: None,
        }
    }

    #[test]
    fn the_upstream_request_loses_hop_headers_and_gains_forwarding_ones() {
        let req = request(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-kept", "yes"),
        ]);
        let req = exchange().upstream_request(&req, &Client::new(Some("127.0.0.1".parse().unwrap()), true)).unwrap();
        let get = |h: &str| req.headers.get(h).map(|v| v.to_str().unwrap().to_owned());
        for gone in ["connection", "x-secret", "keep-alive", "upgrade"] {
            assert_eq!(get(gone), None, "{gone} crossed the hop");
        }
        assert_eq!(get("x-kept").as_deref(), Some("yes"));
        assert_eq!(get("x-forwarded-for").as_deref(), Some("127.0.0.1"));
        assert_eq!(get("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(get("x-forwarded-host").as_deref(), Some("app.localhost"));
        assert_eq!(get(REQUEST_ID).as_deref(), Some("id-1"));
    }

    #[test]
    fn the_upstream_request_keeps_the_method_target_names_case_and_order() {
        let mut req = RequestHeader::build("PATCH", b"/a/b?c=%20d", None).unwrap();
        for (k, v) in [("Host", "app.localhost"), ("X-Custom-Thing", "1"), ("accept", "*/*"), ("X-Custom-Thing", "2")] {
            req.append_header(k.to_string(), v).unwrap();
        }
        let up = exchange().upstream_request(&req, &Client::new(None, false)).unwrap();
        assert_eq!((up.method.as_str(), up.raw_path()), ("PATCH", &b"/a/b?c=%20d"[..]));
        let mut wire = Vec::new();
        up.header_to_h1_wire(&mut wire);
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "Host: app.localhost\r\nX-Custom-Thing: 1\r\nX-Custom-Thing: 2\r\naccept: */*\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: app.localhost\r\nx-request-id: id-1\r\n"
        );
        // An HTTP/2 request has no case to keep, and gets the same headers.
        let mut h2 = RequestHeader::build_no_case("GET", b"/", None).unwrap();
        h2.set_version(http::Version::HTTP_2);
        h2.append_header("x-kept", "yes").unwrap();
        h2.append_header("keep-alive", "timeout=5").unwrap();
        let up = exchange().upstream_request(&h2, &Client::new(Some("192.0.2.7".parse().unwrap()), true)).unwrap();
        assert!(!up.has_case());
        assert_eq!(up.version, http::Version::HTTP_2);
        let mut names: Vec<&str> = up.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-kept", "x-real-ip", REQUEST_ID]
        );
    }

    #[test]
    fn forwarding_claims_of_the_client_are_replaced_or_dropped() {
        let req = request(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-real-ip", "10.0.0.3"),
            ("forwarded", "for=10.0.0.4;proto=https"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "admin.example"),
            ("x-forwarded-port", "443"),
            ("x-client-request-id", "forged"),
            ("x-request-id", "theirs"),
        ]);
        let mut ex = exchange();
        ex.client_request_id = Some("theirs".into());
        let req = ex.upstream_request(&req, &Client::new(Some("192.0.2.7".parse().unwrap()), false)).unwrap();
        let all = |h: &str| {
            req.headers.get_all(h).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>().join(" | ")
        };
        assert_eq!(all("x-forwarded-for"), "192.0.2.7");
        assert_eq!(all("x-real-ip"), "192.0.2.7");
        assert_eq!(all("forwarded"), "");
        assert_eq!(all("x-forwarded-proto"), "http");
        assert_eq!(all("x-forwarded-host"), "app.localhost");
        assert_eq!(all("x-forwarded-port"), "");
        assert_eq!(all(REQUEST_ID), "id-1");
        assert_eq!(all(CLIENT_REQUEST_ID), "theirs");
        // Without an address, none is claimed; without a client id, none is passed.
        let req = request(&[("x-forwarded-for", "10.0.0.1"), ("x-real-ip", "10.0.0.3"), ("x-client-request-id", "x")]);
        let req = exchange().upstream_request(&req, &Client::new(None, true)).unwrap();
        for gone in ["x-forwarded-for", "x-real-ip", CLIENT_REQUEST_ID] {
            assert!(req.headers.get(gone).is_none(), "{gone}");
        }
    }

    #[test]
    fn headers_named_with_underscores_never_reach_the_app() {
        let req = request(&[
            ("x_forwarded_for", "10.0.0.1"),
            ("X_Real_IP", "10.0.0.2"),
            ("x_forwarded_host", "admin.example"),
            ("x-kept", "yes"),
        ]);
        let req = exchange().upstream_request(&req, &Client::new(Some("192.0.2.7".parse().unwrap()), false)).unwrap();
        let mut names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-kept", "x-real-ip", REQUEST_ID]
        );
    }

    #[test]
    fn connection_cannot_name_away_the_host_or_the_bodys_framing() {
        let req = request(&[
            ("host", "app.localhost"),
            ("content-length", "3"),
            ("connection", "host, Content-Length, transfer-encoding, x-private"),
            ("x-private", "hop"),
        ]);
        let req = exchange().upstream_request(&req, &Client::new(None, false)).unwrap();
        assert_eq!(req.headers.get("host").unwrap(), "app.localhost");
        assert_eq!(req.headers.get("content-length").unwrap(), "3");
        assert!(req.headers.get("x-private").is_none(), "a hop-by-hop header the client named is dropped");
        assert!(req.headers.get("connection").is_none());
    }

    #[test]
    fn an_absolute_form_target_is_routed_by_its_host_and_sent_in_origin_form() {
        let req = RequestHeader::build("GET", b"http://App.LocalHost:8080/p?q=1", None).unwrap();
        assert_eq!(request_host(&req), "app.localhost");
        let up = req.clone();
        let up = exchange().upstream_request(&up, &Client::new(None, false)).unwrap();
        assert_eq!(up.raw_path(), b"/p?q=1");
        assert_eq!(up.headers.get("host").unwrap(), "app.localhost");
        assert_eq!(up.headers.get("x-forwarded-host").unwrap(), "app.localhost");
        // The Host header is routed by (pingora refuses a target that names another).
        let mut with_host = RequestHeader::build("GET", b"https://app.localhost/", None).unwrap();
        with_host.insert_header("host", "app.localhost").unwrap();
        assert_eq!(request_host(&with_host), "app.localhost");
        let with_host = exchange().upstream_request(&with_host, &Client::new(None, true)).unwrap();
        assert_eq!(with_host.raw_path(), b"/");
        assert_eq!(with_host.headers.get_all("host").iter().count(), 1);
        assert_eq!(target_authority(b"/plain"), None);
        assert_eq!(target_authority(b"ftp://x/"), None);
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn an_upgrade_keeps_its_connection_and_upgrade_headers() {
        let req = request(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&req));
        let req = exchange().upstream_request(&req, &Client::new(None, false)).unwrap();
        assert_eq!(req.headers.get("connection").unwrap(), "upgrade");
        assert_eq!(req.headers.get("upgrade").unwrap(), "websocket");
        assert!(!is_upgrade(&request(&[("upgrade", "websocket")])), "Upgrade alone is no upgrade");
        let mut old = request(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        old.set_version(http::Version::HTTP_10);
        assert!(!is_upgrade(&old), "HTTP/1.0 has no upgrades");
    }

    #[test]
    fn pages_and_responses_carry_the_request_id_and_close_when_draining() {
        let ex = exchange();
        let (head, body) = ex.page(&Page::starting("web", "d1"), true).unwrap();
        assert_eq!(head.status, 503);
        assert_eq!(head.headers.get("retry-after").unwrap(), "2");
        assert_eq!(head.headers.get("connection").unwrap(), "close");
        assert_eq!(head.headers.get("content-length").unwrap().to_str().unwrap(), body.len().to_string());
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("keep-alive", "timeout=5").unwrap();
        ex.rewrite_response(&mut resp, false).unwrap();
        assert_eq!(resp.headers.get(REQUEST_ID).unwrap(), "id-1");
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("connection").is_none());
    }
}
