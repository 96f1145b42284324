//! A local stand-in for Cloudflare's DNS API (v4), as far as the receiver's
//! DNS-01 provider uses it: list zones by name, create, list (filtered by
//! type, name and comment, as Cloudflare's `GET dns_records` is) and delete
//! TXT records. It checks the Bearer token and answers in Cloudflare's envelope
//! (`{success, errors, messages, result}`, with Cloudflare's error codes),
//! and writes each TXT record into pebble-challtestsrv (its `set-txt` /
//! `clear-txt` management API), the DNS server pebble and the receiver ask.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde_json::{json, Value};

use crate::acme::Acme;

/// A DNS record the fake holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub content: String,
    /// Cloudflare's free-text comment on the record.
    pub comment: Option<String>,
}

/// One call, as the fake saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path and query, under the API's base.
    pub path: String,
    pub authorization: String,
    /// The HTTP status answered.
    pub status: u16,
}

#[derive(Debug)]
struct State {
    token: String,
    /// Zone ids and names.
    zones: Vec<(String, String)>,
    /// challtestsrv's management API.
    challtestsrv: String,
    records: Mutex<Vec<Record>>,
    calls: Mutex<Vec<Call>>,
    next_id: AtomicU64,
}

/// The fake API, serving on a loopback port until dropped.
#[derive(Debug)]
pub struct FakeCloudflare {
    /// The API's base URL, as `--cloudflare-api` takes it.
    pub api: String,
    state: Arc<State>,
    _server: crate::server::Local,
}

/// The path under which Cloudflare serves its API (v4).
const BASE: &str = "/client/v4";

impl FakeCloudflare {
    /// Accepts `token` alone, for an account holding `zones`; records go into
    /// `acme`'s challtestsrv.
    pub fn start(acme: &Acme, token: &str, zones: &[&str]) -> FakeCloudflare {
        let zones =
            zones.iter().enumerate().map(|(i, z)| (format!("{:032x}", 0xc0ffee + i), (*z).to_owned())).collect();
        let (server, state) = crate::server::serve(
            |_| State {
                token: token.to_owned(),
                zones,
                challtestsrv: acme.management_url(),
                records: Mutex::default(),
                calls: Mutex::default(),
                next_id: AtomicU64::new(1),
            },
            answer,
        );
        FakeCloudflare { api: format!("{}{BASE}", server.url), state, _server: server }
    }

    /// The records the account holds now.
    pub fn records(&self) -> Vec<Record> {
        self.state.records.lock().unwrap().clone()
    }

    /// Puts a TXT record `name` into the zone holding it, as an earlier
    /// receiver (marked by `comment`) or the operator left it; its id.
    pub fn seed(&self, name: &str, content: &str, comment: Option<&str>) -> String {
        let (zone_id, _) = self.state.zones.iter().find(|(_, z)| name.ends_with(&format!(".{z}"))).unwrap();
        let id = format!("{:032x}", self.state.next_id.fetch_add(1, Ordering::SeqCst));
        self.state.records.lock().unwrap().push(Record {
            id: id.clone(),
            zone_id: zone_id.clone(),
            name: name.to_owned(),
            content: content.to_owned(),
            comment: comment.map(str::to_owned),
        });
        id
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }
}

/// Cloudflare's envelope around a result.
fn success(result: Value) -> (u16, Value) {
    (200, json!({ "success": true, "errors": [], "messages": [], "result": result }))
}

/// Cloudflare's envelope around an error.
fn failure(status: u16, code: u32, message: &str) -> (u16, Value) {
    (
        status,
        json!({ "success": false, "errors": [{ "code": code, "message": message }], "messages": [], "result": null }),
    )
}

async fn answer(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().strip_prefix(BASE).unwrap_or("").to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let (status, value) = if authorization != format!("Bearer {}", state.token) {
        failure(403, 9109, "Invalid access token")
    } else {
        route(&state, &method, &path, &query, &body).await
    };
    state.calls.lock().unwrap().push(Call {
        method: method.to_string(),
        path: if query.is_empty() { path } else { format!("{path}?{query}") },
        authorization,
        status,
    });
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(response)
}

async fn route(state: &State, method: &Method, path: &str, query: &str, body: &Value) -> (u16, Value) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["zones"]) => {
            let name = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "name").map(|(_, v)| v);
            let zones: Vec<Value> = state
                .zones
                .iter()
                .filter(|(_, z)| name.as_deref().is_none_or(|n| n == z))
                .map(|(id, z)| json!({ "id": id, "name": z, "status": "active" }))
                .collect();
            success(Value::Array(zones))
        }
        (&Method::POST, ["zones", zone, "dns_records"]) => create(state, zone, body).await,
        (&Method::GET, ["zones", zone, "dns_records"]) => list(state, zone, query),
        (&Method::DELETE, ["zones", zone, "dns_records", id]) => delete(state, zone, id).await,
        _ => failure(404, 7000, "No route for that URI"),
    }
}

fn zone_name<'a>(state: &'a State, zone: &str) -> Option<&'a str> {
    state.zones.iter().find(|(id, _)| id == zone).map(|(_, name)| name.as_str())
}

async fn create(state: &State, zone: &str, body: &Value) -> (u16, Value) {
    let Some(zone_name) = zone_name(state, zone) else {
        return failure(404, 7003, "Could not route to /zones/dns_records, perhaps your object identifier is invalid?");
    };
    let (Some(kind), Some(name), Some(content)) =
        (body["type"].as_str(), body["name"].as_str(), body["content"].as_str())
    else {
        return failure(400, 9000, "DNS name, type and content are required");
    };
    if kind != "TXT" {
        return failure(400, 1004, "the fake holds TXT records only");
    }
    if name != zone_name && !name.ends_with(&format!(".{zone_name}")) {
        return failure(400, 1004, "DNS Validation Error: the name is not in the zone");
    }
    let id = format!("{:032x}", state.next_id.fetch_add(1, Ordering::SeqCst));
    let comment = body["comment"].as_str().map(str::to_owned);
    let record = Record {
        id: id.clone(),
        zone_id: zone.to_owned(),
        name: name.to_owned(),
        content: content.to_owned(),
        comment: comment.clone(),
    };
    state.records.lock().unwrap().push(record);
    challtestsrv(state, "set-txt", json!({ "host": format!("{name}."), "value": content })).await;
    success(json!({
        "id": id, "zone_id": zone, "zone_name": zone_name, "name": name, "type": "TXT",
        "content": content, "ttl": body["ttl"].as_u64().unwrap_or(1), "proxied": false, "comment": comment,
    }))
}

/// The zone's records matching the query's `type`, `name` and `comment`
/// (each an exact match when given).
fn list(state: &State, zone: &str, query: &str) -> (u16, Value) {
    let Some(zone_name) = zone_name(state, zone) else {
        return failure(404, 7003, "Could not route to /zones/dns_records, perhaps your object identifier is invalid?");
    };
    let filter: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let wanted = |key: &str, value: Option<&str>| {
        filter.iter().filter(|(k, _)| k == key).all(|(_, v)| Some(v.as_str()) == value)
    };
    let records: Vec<Value> = state
        .records
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.zone_id == zone)
        .filter(|r| wanted("type", Some("TXT")) && wanted("name", Some(r.name.as_str())))
        .filter(|r| wanted("comment", r.comment.as_deref()))
        .map(|r| {
            json!({
                "id": r.id, "zone_id": zone, "zone_name": zone_name, "name": r.name, "type": "TXT",
                "content": r.content, "comment": r.comment,
            })
        })
        .collect();
    success(Value::Array(records))
}

async fn delete(state: &State, zone: &str, id: &str) -> (u16, Value) {
    let (removed, remaining) = {
        let mut records = state.records.lock().unwrap();
        let Some(at) = records.iter().position(|r| r.id == id && r.zone_id == zone) else {
            return failure(404, 81044, "Record does not exist.");
        };
        let removed = records.remove(at);
        let remaining: Vec<String> =
            records.iter().filter(|r| r.name == removed.name).map(|r| r.content.clone()).collect();
        (removed, remaining)
    };
    // challtestsrv clears a name's TXT values all at once: the others are
    // put back.
    let host = format!("{}.", removed.name);
    challtestsrv(state, "clear-txt", json!({ "host": host })).await;
    for value in remaining {
        challtestsrv(state, "set-txt", json!({ "host": host, "value": value })).await;
    }
    success(json!({ "id": id }))
}

async fn challtestsrv(state: &State, what: &str, body: Value) {
    let resp =
        reqwest::Client::new().post(format!("{}/{what}", state.challtestsrv)).body(body.to_string()).send().await;
    assert!(resp.is_ok_and(|r| r.status().is_success()), "challtestsrv /{what} failed");
}
