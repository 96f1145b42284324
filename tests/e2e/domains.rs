//! Custom domains against real DNS and a real ACME CA: pebble-challtestsrv
//! answers the receiver's (and pebble's) DNS questions, pebble issues
//! certificates after validating HTTP-01 through the router, and curl checks
//! the served certificate against pebble's root.

use std::process::Command;

use nx_e2e::acme::Acme;
use nx_e2e::cloudflare::FakeCloudflare;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::http::get_host;
use nx_e2e::receiver::{free_port, Options};
use nx_e2e::{eventually, Receiver};

const DOMAIN: &str = "www.example.test";

fn goweb_in_production(r: &Receiver, app: &str) {
    let pushed = r.push(app, &fixtures::go(Go::Static), &[]);
    r.nx_ok(&["promote", pushed["id"].as_str().unwrap()]);
}

/// The TXT record's token, as `nx domains ls` gives it.
fn txt_value(r: &Receiver, app: &str) -> String {
    let listed = r.nx_ok(&["--json", "domains", "ls", app]).json();
    let records = listed[0]["records"].as_array().unwrap();
    let txt = records.iter().find(|r| r["kind"] == "TXT").unwrap();
    assert_eq!(txt["name"], format!("_nx-verify.{DOMAIN}"));
    txt["value"].as_str().unwrap().to_owned()
}

/// curl's HTTP version, status and Location for a plain or HTTPS request, with
/// `DOMAIN` resolved to 127.0.0.1 and pebble's root trusted.
fn curl(url: &str, port: u16, root: &std::path::Path) -> (i32, String) {
    curl_host(url, DOMAIN, port, root)
}

/// [`curl`] for `host`, the answer's header included.
fn curl_host(url: &str, host: &str, port: u16, root: &std::path::Path) -> (i32, String) {
    let out = Command::new(nx_e2e::require_program("curl", "curl"))
        .args(["-isS", "--max-time", "10", "--cacert"])
        .arg(root)
        .args([
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            "-w",
            "\nHTTP/%{http_version} %{http_code} %{redirect_url}",
            url,
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn a_domain_is_served_only_once_its_records_are_found_and_belongs_to_one_app() {
    let acme = Acme::start();
    let r = Receiver::start_with(Options {
        args: vec![format!("--dns-resolver=127.0.0.1:{}", acme.dns_port), "--acme-directory=off".into()],
        ..Options::default()
    });
    let web_key = r.create_app("web");
    r.create_app("site");
    goweb_in_production(&r, "web");

    let added = r.nx_ok(&["domains", "add", "web", "WWW.Example.Test."]);
    let txt = txt_value(&r, "web");
    assert!(txt.starts_with("nx-verify=") && txt.len() == "nx-verify=".len() + 32, "{txt}");
    let txt_name = format!("_nx-verify.{DOMAIN}");
    for record in [[DOMAIN, "CNAME", "web.localhost"], [txt_name.as_str(), "TXT", txt.as_str()]] {
        let printed = added.stdout.lines().any(|l| l.split_whitespace().eq(record.iter().copied()));
        assert!(printed, "{record:?} in:\n{}", added.stdout);
    }

    // Nothing there yet: verify says exactly what to create, and the router
    // does not serve the name.
    let missing = r.nx(&["domains", "verify", "web", DOMAIN]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing.stderr.contains(&format!(
            "{DOMAIN} is not verified: no TXT record at _nx-verify.{DOMAIN}; create it with the value {txt}; \
             {DOMAIN} has no CNAME, A or AAAA record; create {DOMAIN} CNAME web.localhost"
        )),
        "{}",
        missing.stderr
    );
    assert_eq!(get_host(r.router_port, DOMAIN, "/").status, 404);

    // The CNAME alone, and a TXT record of someone else's: still refused, saying why.
    acme.set_cname(DOMAIN, "web.localhost");
    acme.set_txt(&format!("_nx-verify.{DOMAIN}"), "nx-verify=0000");
    let wrong = r.nx(&["domains", "verify", "web", DOMAIN]);
    assert!(
        wrong.stderr.contains(&format!(
            "{DOMAIN} is not verified: the TXT records at _nx-verify.{DOMAIN} are \"nx-verify=0000\", and none is {txt}; add that value"
        )),
        "{}",
        wrong.stderr
    );
    assert!(!wrong.stderr.contains("CNAME"), "the CNAME is there: {}", wrong.stderr);
    assert_eq!(get_host(r.router_port, DOMAIN, "/").status, 404);

    acme.set_txt(&format!("_nx-verify.{DOMAIN}"), &txt);
    let verified = r.nx_ok(&["domains", "verify", "web", DOMAIN]);
    assert!(verified.stdout.contains(&format!("{DOMAIN} is verified and served by web")), "{}", verified.stdout);
    let served = get_host(r.router_port, DOMAIN, "/headers");
    assert_eq!(served.status, 200, "{}", served.body);
    assert!(served.body.to_ascii_lowercase().contains(&format!("host: {DOMAIN}")), "{}", served.body);

    // One app per domain, one domain per app; only the admin attaches them.
    let taken = r.nx(&["domains", "add", "site", DOMAIN]);
    assert_eq!(taken.code, 1);
    assert!(
        taken.stderr.contains(&format!(
            "{DOMAIN} is attached to another app; a domain belongs to one app at most (remove it there first)"
        )),
        "{}",
        taken.stderr
    );
    let second = r.nx(&["domains", "add", "web", "shop.example.test"]);
    assert!(second.stderr.contains(&format!("app 'web' has the domain {DOMAIN} already")), "{}", second.stderr);
    let tenant = r.nx_with_key(&web_key, &["domains", "add", "web", "shop.example.test"]);
    assert_eq!(tenant.code, 1);
    assert!(tenant.stderr.contains("this needs the admin token"), "{}", tenant.stderr);
    let platform = r.nx(&["domains", "add", "site", "site.localhost"]);
    assert!(
        platform.stderr.contains("site.localhost is under the platform's own domain localhost"),
        "{}",
        platform.stderr
    );
    let address = r.nx(&["domains", "add", "site", "192.0.2.1"]);
    assert_eq!(address.code, 1);
    assert!(address.stderr.contains("192.0.2.1 is an IP address, not a domain name"), "{}", address.stderr);
    assert!(r.nx_ok(&["--json", "domains", "ls", "site"]).json().as_array().unwrap().is_empty());

    // Removed: no longer served, and free for another app.
    r.nx_ok(&["domains", "rm", "web", DOMAIN]);
    assert_eq!(get_host(r.router_port, DOMAIN, "/").status, 404);
    r.nx_ok(&["domains", "add", "site", DOMAIN]);

    let events = r.nx_ok(&["--json", "events", "--app", "web"]).json();
    let kinds: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    for kind in ["domain.add", "domain.verify", "domain.remove"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
}

#[test]
fn a_verified_domain_gets_an_acme_certificate_served_by_sni_and_renewed() {
    let mut acme = Acme::start();
    let tls_port = free_port();
    let mut args = acme.receiver_args();
    args.extend([
        format!("--router-tls-listen=127.0.0.1:{tls_port}"),
        "--public-address=127.0.0.1".into(),
        // pebble's certificates live five years: within this window every
        // certificate is due for renewal at once.
        "--acme-renew-before=3650d".into(),
    ]);
    let r = Receiver::start_with(Options { args, ..Options::default() });
    acme.start_ca(r.router_port);
    r.create_app("web");
    goweb_in_production(&r, "web");
    r.nx_ok(&["domains", "add", "web", DOMAIN]);
    acme.add_a(DOMAIN, "127.0.0.1");
    acme.set_txt(&format!("_nx-verify.{DOMAIN}"), &txt_value(&r, "web"));
    r.nx_ok(&["domains", "verify", "web", DOMAIN]);

    let first = eventually(60, "a certificate", || {
        let d = r.nx_ok(&["--json", "domains", "ls", "web"]).json()[0].clone();
        d["expires_at"].is_string().then_some(d)
    });
    assert!(first["issuer"].as_str().unwrap().starts_with("Pebble Intermediate CA"), "{first}");
    assert!(first["last_error"].is_null(), "{first}");
    let table = r.nx_ok(&["domains", "ls", "web"]).stdout;
    assert!(table.contains("https") && table.contains("Pebble Intermediate CA"), "{table}");

    // A client trusting pebble's root completes the handshake for the name
    // and is answered by the app, over HTTP/2: once the route table that
    // carries the certificate reached the router, just after it was recorded.
    let root = acme.issuing_root();
    let (code, out) = eventually(10, "the certificate served", || {
        let (code, out) = curl(&format!("https://{DOMAIN}:{tls_port}/headers"), tls_port, &root);
        (code == 0).then_some((code, out))
    });
    assert_eq!(code, 0, "{out}\n{}", r.log());
    assert!(out.to_ascii_lowercase().contains("x-forwarded-proto: https"), "{out}");
    assert!(out.ends_with("HTTP/2 200 "), "{out}");
    // Plain HTTP for the name goes to HTTPS, keeping path and query.
    let (code, out) = curl(&format!("http://{DOMAIN}:{}/a/b?c=1", r.router_port), r.router_port, &root);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with(&format!("HTTP/1.1 308 https://{DOMAIN}:{tls_port}/a/b?c=1")), "{out}");
    // Other hosts stay on plain HTTP.
    assert_eq!(get_host(r.router_port, "web.localhost", "/").status, 200);

    // Renewal: the certificate is in its renewal window, so the next round
    // (verify wakes it) replaces it with a new one.
    std::thread::sleep(std::time::Duration::from_secs(1));
    r.nx_ok(&["domains", "verify", "web", DOMAIN]);
    let renewed = eventually(60, "a renewed certificate", || {
        let d = r.nx_ok(&["--json", "domains", "ls", "web"]).json()[0].clone();
        (d["expires_at"] != first["expires_at"]).then_some(d)
    });
    assert!(renewed["expires_at"].as_str() > first["expires_at"].as_str(), "{renewed} after {first}");
    let (code, out) = curl(&format!("https://{DOMAIN}:{tls_port}/"), tls_port, &root);
    assert_eq!(code, 0, "{out}");

    // A name whose records are gone (it changed hands, say) is not asked of
    // the CA again: verifying it says why, the certificate attempt (due at
    // once) says why too, and the certificate stays as it was.
    acme.clear_txt(&format!("_nx-verify.{DOMAIN}"));
    let out = r.nx(&["domains", "verify", "web", DOMAIN]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&format!("{DOMAIN} is not verified: ")), "{out:?}");
    let refused = eventually(30, "an attempt refused for lack of records", || {
        let d = r.nx_ok(&["--json", "domains", "ls", "web"]).json()[0].clone();
        d["last_error"].as_str().is_some_and(|e| e.starts_with("the DNS records of")).then_some(d)
    });
    let error = refused["last_error"].as_str().unwrap();
    assert!(
        error
            .starts_with(&format!("the DNS records of {DOMAIN} are no longer found, so no certificate is asked for: ")),
        "{error}"
    );
    assert_eq!(refused["expires_at"], renewed["expires_at"]);
}

#[test]
fn a_failed_validation_is_shown_with_the_cas_reason_and_retried_later() {
    let mut acme = Acme::start();
    let mut args = acme.receiver_args();
    // The name resolves to an address the router does not listen on: the
    // receiver's check passes (it is a public address) and pebble's
    // validation cannot connect.
    args.extend([format!("--router-tls-listen=127.0.0.1:{}", free_port()), "--public-address=127.0.0.2".into()]);
    let r = Receiver::start_with(Options { args, ..Options::default() });
    acme.start_ca(r.router_port);
    r.create_app("web");
    r.nx_ok(&["domains", "add", "web", DOMAIN]);
    acme.add_a(DOMAIN, "127.0.0.2");
    acme.set_txt(&format!("_nx-verify.{DOMAIN}"), &txt_value(&r, "web"));
    r.nx_ok(&["domains", "verify", "web", DOMAIN]);
    let failed = eventually(60, "a failed attempt", || {
        let d = r.nx_ok(&["--json", "domains", "ls", "web"]).json()[0].clone();
        d["last_error"].as_str().is_some().then_some(d)
    });
    let error = failed["last_error"].as_str().unwrap();
    assert!(error.starts_with(&format!("the ACME CA refused the HTTP-01 validation of {DOMAIN}: ")), "{error}");
    assert!(
        error.contains("127.0.0.2") && error.to_ascii_lowercase().contains("connection refused"),
        "{error}\n{}",
        acme.logs()
    );
    assert!(failed["expires_at"].is_null());
    let next: chrono::DateTime<chrono::Utc> = failed["next_attempt_at"].as_str().unwrap().parse().unwrap();
    let wait = next - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::minutes(3) && wait <= chrono::Duration::minutes(5),
        "the default first retry is 5m: {wait}"
    );
    let table = r.nx_ok(&["domains", "ls", "web"]).stdout;
    assert!(table.contains("verified, no certificate yet") && table.contains(error), "{table}");
}

#[test]
fn previews_are_served_on_the_preview_domain_alone() {
    let r =
        Receiver::start_with(Options { args: vec!["--preview-domain=nxpreview.test".into()], ..Options::default() });
    r.create_app("web");
    let pushed = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = pushed["id"].as_str().unwrap();
    let url = pushed["preview_url"].as_str().unwrap();
    assert!(url.starts_with(&format!("http://{id}--web.nxpreview.test:")), "{url}");
    assert_eq!(r.get(url).status, 200);
    assert_eq!(get_host(r.router_port, &format!("{id}--web.localhost"), "/").status, 404);
    r.nx_ok(&["promote", id]);
    assert_eq!(get_host(r.router_port, "web.localhost", "/").status, 200, "production stays on --domain");
}

/// The preview domain of the wildcard tests, a zone of the fake Cloudflare account.
const PREVIEWS: &str = "nxpreview.test";
const CLOUDFLARE_TOKEN: &str = "cf-test-token-7d1c0a9e5b";

/// A receiver whose previews live under [`PREVIEWS`], with a wildcard
/// certificate of it asked of pebble (running, DNS-01 only) through the fake
/// Cloudflare account, authenticated by `token` given in the environment,
/// HSTS for a day, and the operator's self-signed certificate for
/// `web.localhost` as the fallback; its HTTPS port.
fn wildcard_receiver(acme: &Acme, cloudflare: &FakeCloudflare, token: &str) -> (Receiver, u16) {
    let tls_port = free_port();
    let mut args = acme.receiver_args();
    let (cert, key) = nx_e2e::tls::self_signed(acme.dir.path(), &["web.localhost"]);
    args.extend([
        format!("--router-tls-cert={}", cert.display()),
        format!("--router-tls-key={}", key.display()),
        "--router-hsts-max-age=1d".into(),
        format!("--router-tls-listen=127.0.0.1:{tls_port}"),
        format!("--preview-domain={PREVIEWS}"),
        format!("--wildcard-domain={PREVIEWS}"),
        format!("--cloudflare-api={}", cloudflare.api),
        // Every certificate is due for renewal at once (see above), and
        // renewed every round, ten seconds apart.
        "--acme-renew-before=3650d".into(),
        "--acme-interval=10s".into(),
    ]);
    let env = vec![("NX_CLOUDFLARE_API_TOKEN".to_owned(), token.to_owned())];
    (Receiver::start_with(Options { args, env, ..Options::default() }), tls_port)
}

/// N1: a challenge record a stopped receiver left (marked as the
/// receiver's) is deleted at the next start, before any order; the
/// operator's own TXT record at that name is kept.
#[test]
fn leftover_challenge_records_are_deleted_at_start_and_the_operators_kept() {
    let mut acme = Acme::start();
    acme.start_ca(free_port());
    let cloudflare = FakeCloudflare::start(&acme, CLOUDFLARE_TOKEN, &[PREVIEWS]);
    let name = format!("_acme-challenge.{PREVIEWS}");
    let leftover = cloudflare.seed(&name, "left-by-a-stopped-receiver", Some("nx-sandbox acme dns-01"));
    let operators = cloudflare.seed(&name, "v=operator", None);
    let (r, _) = wildcard_receiver(&acme, &cloudflare, CLOUDFLARE_TOKEN);
    eventually(90, "a wildcard certificate", || wildcard_status(&r)["expires_at"].is_string().then_some(()));
    let kept: Vec<String> = cloudflare.records().into_iter().map(|r| r.id).collect();
    assert_eq!(kept, [operators]);
    let calls = cloudflare.calls();
    let first_delete = calls.iter().find(|c| c.method == "DELETE").unwrap();
    assert!(first_delete.path.ends_with(&format!("/dns_records/{leftover}")), "{calls:?}");
    let first_create = calls.iter().position(|c| c.method == "POST").unwrap();
    assert!(calls.iter().position(|c| c.method == "DELETE").unwrap() < first_create, "{calls:?}");
}

/// The wildcard certificate's state in `nx status --json`.
fn wildcard_status(r: &Receiver) -> serde_json::Value {
    let status = r.nx_ok(&["--json", "status"]).json();
    let wildcards = status["wildcards"].as_array().unwrap_or_else(|| panic!("no wildcards in {status}"));
    assert_eq!(wildcards.len(), 1, "{status}");
    assert_eq!(wildcards[0]["name"], format!("*.{PREVIEWS}"));
    wildcards[0].clone()
}

/// The challenge records the fake Cloudflare was asked to create and delete:
/// every call authenticated with the token and answered 200, and no record
/// left behind.
fn assert_records_cleaned_up(cloudflare: &FakeCloudflare) -> usize {
    let calls = cloudflare.calls();
    for call in &calls {
        assert_eq!(call.authorization, format!("Bearer {CLOUDFLARE_TOKEN}"), "{call:?}");
        assert_eq!(call.status, 200, "{call:?}");
    }
    let created = calls.iter().filter(|c| c.method == "POST" && c.path.ends_with("/dns_records")).count();
    let deleted = calls.iter().filter(|c| c.method == "DELETE" && c.path.contains("/dns_records/")).count();
    assert!(created >= 1 && created == deleted, "{calls:?}");
    assert_eq!(cloudflare.records(), [], "the challenge records are deleted");
    created
}

#[test]
fn a_wildcard_certificate_by_dns01_makes_previews_https_from_their_first_request_with_hsts() {
    let mut acme = Acme::start();
    // DNS-01 alone: pebble's HTTP-01 port is never asked.
    acme.start_ca(free_port());
    let cloudflare = FakeCloudflare::start(&acme, CLOUDFLARE_TOKEN, &[PREVIEWS]);
    let (r, tls_port) = wildcard_receiver(&acme, &cloudflare, CLOUDFLARE_TOKEN);

    let first = eventually(90, "a wildcard certificate", || {
        let w = wildcard_status(&r);
        w["expires_at"].is_string().then_some(w)
    });
    assert!(first["issuer"].as_str().unwrap().starts_with("Pebble Intermediate CA"), "{first}");
    assert!(first["last_error"].is_null(), "{first}");
    let created = assert_records_cleaned_up(&cloudflare);
    let creates = cloudflare.calls().into_iter().filter(|c| c.method == "POST").collect::<Vec<_>>();
    assert!(creates[0].path.starts_with("/zones/") && creates.len() == created, "{creates:?}");
    let shown = r.nx_ok(&["status"]).stdout;
    assert!(shown.contains(&format!("certificate *.{PREVIEWS}: from Pebble Intermediate CA")), "{shown}");

    // A preview pushed now is HTTPS at its first request: a client trusting
    // pebble's root completes the handshake and the app answers, over HTTP/2.
    r.create_app("web");
    let pushed = r.push("web", &fixtures::go(Go::Static), &[]);
    let host = format!("{}--web.{PREVIEWS}", pushed["id"].as_str().unwrap());
    let root = acme.issuing_root();
    let (code, out) = curl_host(&format!("https://{host}:{tls_port}/headers"), &host, tls_port, &root);
    assert_eq!(code, 0, "{out}\n{}", r.log());
    assert!(out.to_ascii_lowercase().contains(&format!("host: {host}")), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-forwarded-proto: https"), "{out}");
    assert!(out.ends_with("HTTP/2 200 "), "{out}");
    // HSTS on the HTTPS answers of a name with a certificate of the receiver's.
    assert!(out.contains("\nstrict-transport-security: max-age=86400\r\n"), "{out}");
    // Plain HTTP for it goes to HTTPS, without HSTS (browsers ignore it there).
    let (code, out) = curl_host(&format!("http://{host}:{}/a?b=1", r.router_port), &host, r.router_port, &root);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with(&format!("HTTP/1.1 308 https://{host}:{tls_port}/a?b=1")), "{out}");
    assert!(!out.to_ascii_lowercase().contains("strict-transport-security"), "{out}");
    // A name served with the operator's fallback certificate gets no HSTS:
    // that certificate may not be valid for every name.
    r.nx_ok(&["promote", pushed["id"].as_str().unwrap()]);
    let fallback = acme.dir.path().join("cert.pem");
    let (code, out) = curl_host(&format!("https://web.localhost:{tls_port}/"), "web.localhost", tls_port, &fallback);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("HTTP/2 200 "), "{out}");
    assert!(!out.to_ascii_lowercase().contains("strict-transport-security"), "{out}");
    // A wildcard covers one level: a name two levels down gets the fallback,
    // which a client trusting pebble's root refuses.
    let deep = format!("x.{host}");
    let (code, out) = curl_host(&format!("https://{deep}:{tls_port}/"), &deep, tls_port, &root);
    assert_eq!(code, 60, "curl's certificate verification failure: {out}");

    // Renewed like the custom domains' certificates, by the next round.
    let renewed = eventually(60, "a renewed wildcard certificate", || {
        let w = wildcard_status(&r);
        (w["expires_at"] != first["expires_at"]).then_some(w)
    });
    assert!(renewed["expires_at"].as_str() > first["expires_at"].as_str(), "{renewed} after {first}");
    let (code, out) = curl_host(&format!("https://{host}:{tls_port}/"), &host, tls_port, &root);
    assert_eq!(code, 0, "{out}");
    // The renewal put out its own challenge record and took it back, unless
    // pebble handed the order the authorization it still holds as valid: it
    // does so one order in a hundred even at PEBBLE_AUTHZREUSE=0 (it draws
    // `rand.Intn(100) > percent`), and then there is nothing to put out.
    // Either way no record is left behind.
    assert!(assert_records_cleaned_up(&cloudflare) >= created);
}

#[test]
fn a_wrong_cloudflare_token_is_a_clear_error_in_the_status_and_creates_nothing() {
    let mut acme = Acme::start();
    acme.start_ca(free_port());
    let cloudflare = FakeCloudflare::start(&acme, CLOUDFLARE_TOKEN, &[PREVIEWS]);
    let wrong = "cf-revoked-token-0000";
    let (r, _) = wildcard_receiver(&acme, &cloudflare, wrong);

    let failed = eventually(60, "a failed attempt", || {
        let w = wildcard_status(&r);
        w["last_error"].is_string().then_some(w)
    });
    assert_eq!(
        failed["last_error"],
        format!(
            "the DNS-01 challenge record of *.{PREVIEWS} was not set: Cloudflare refused to look up the zone \
             {PREVIEWS} (HTTP 403): 9109 Invalid access token; check --cloudflare-api-token: it must be a valid \
             API token with Zone:Read and DNS:Edit permissions on the zone"
        ),
        "{failed}"
    );
    assert!(failed["expires_at"].is_null() && failed["issuer"].is_null(), "{failed}");
    let next: chrono::DateTime<chrono::Utc> = failed["next_attempt_at"].as_str().unwrap().parse().unwrap();
    let wait = next - chrono::Utc::now();
    assert!(wait > chrono::Duration::minutes(3) && wait <= chrono::Duration::minutes(5), "retried after 5m: {wait}");
    let shown = r.nx_ok(&["status"]).stdout;
    assert!(shown.contains(&format!("certificate *.{PREVIEWS}: not obtained yet")), "{shown}");
    assert!(shown.contains("last attempt failed: the DNS-01 challenge record of"), "{shown}");

    let calls = cloudflare.calls();
    assert!(!calls.is_empty() && calls.iter().all(|c| c.status == 403 && c.method == "GET"), "{calls:?}");
    assert!(calls.iter().all(|c| c.authorization == format!("Bearer {wrong}")), "{calls:?}");
    assert_eq!(cloudflare.records(), []);
    assert!(!r.log().contains(wrong), "the token is a secret: never logged");
}
