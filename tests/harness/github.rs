//! A local stand-in for GitHub: its REST API, as far as the receiver uses it,
//! answering with GitHub's published response examples
//! (`tests/fixtures/github/api`) and recording every call; who may write to
//! the repository, the reviews of its pull requests and the members of its
//! teams are set by the test; and webhook deliveries signed the way GitHub
//! signs them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};
use sha2::Sha256;

/// One call the receiver made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub authorization: String,
    pub body: Value,
    /// What the fake answered.
    pub response: Value,
}

#[derive(Debug, Default)]
struct State {
    calls: Mutex<Vec<Call>>,
    next_id: AtomicI64,
    /// Answer this many calls with 500 before behaving.
    failures: AtomicU32,
    /// While set, calls wait before they are answered.
    stalled: AtomicBool,
    /// Permission on the repository by login (lower case); `read` otherwise,
    /// as GitHub answers for anyone on a public repository.
    permissions: Mutex<HashMap<String, String>>,
    /// The reviews of each pull request, in the order they were submitted.
    reviews: Mutex<HashMap<i64, Vec<Value>>>,
    /// Active members (lower case) of each team, by `org/slug`.
    teams: Mutex<HashMap<String, Vec<String>>>,
    /// The repositories GitHub shows: ids and owner ids by `owner/name`
    /// (lower case); [`REPOSITORY`] unless a test says otherwise.
    repositories: Mutex<HashMap<String, (i64, i64)>>,
}

/// The repository the suite's apps are linked to, its id and its owner's
/// id (the same as the OIDC issuer's tokens name).
pub const REPOSITORY: (&str, i64, i64) = ("nx-test/web", 700_001, 9_001);

/// The fake API, serving on a loopback port until dropped.
#[derive(Debug)]
pub struct FakeGitHub {
    pub url: String,
    state: Arc<State>,
    _server: crate::server::Local,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/github")
}

/// A published response example, by file name (without `.response.json`).
fn example(name: &str) -> Value {
    let path = fixtures().join(format!("api/{name}.response.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// A webhook payload example, by file name (without `.json`).
pub fn payload(name: &str) -> Value {
    let path = fixtures().join(format!("webhooks/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

impl FakeGitHub {
    pub fn start() -> FakeGitHub {
        let (name, id, owner) = REPOSITORY;
        let (server, state) = crate::server::serve(
            |_| State {
                next_id: AtomicI64::new(1000),
                repositories: Mutex::new([(name.to_owned(), (id, owner))].into()),
                ..State::default()
            },
            answer,
        );
        FakeGitHub { url: server.url.clone(), state, _server: server }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// The calls so far whose method and path match (the path may end in `*`).
    pub fn calls_to(&self, method: &str, path: &str) -> Vec<Call> {
        let matches = |p: &str| match path.strip_suffix('*') {
            Some(prefix) => p.starts_with(prefix),
            None => p == path,
        };
        self.calls().into_iter().filter(|c| c.method == method && matches(&c.path)).collect()
    }

    /// Makes the next `n` calls fail with 500, as GitHub does on a bad day.
    pub fn fail_next(&self, n: u32) {
        self.state.failures.store(n, Ordering::SeqCst);
    }

    /// Holds every answer while `stalled` (the calls are recorded at once).
    pub fn stall(&self, stalled: bool) {
        self.state.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Gives `login` a permission on the repository: `admin`, `write`
    /// (GitHub's answer for maintain too), `read` or `none`.
    pub fn set_permission(&self, login: &str, permission: &str) {
        self.state.permissions.lock().unwrap().insert(login.to_lowercase(), permission.into());
    }

    /// Records a review of pull request `pr` as GitHub lists it (`state` in
    /// upper case, as the REST API writes it); returns it.
    pub fn add_review(&self, pr: i64, id: i64, login: &str, state: &str, commit_id: &str) -> Value {
        let mut review = example("list-reviews")[0].clone();
        review["id"] = id.into();
        review["user"]["login"] = login.into();
        review["state"] = state.into();
        review["commit_id"] = commit_id.into();
        self.state.reviews.lock().unwrap().entry(pr).or_default().push(review.clone());
        review
    }

    /// Makes GitHub show no repository at all (`GET /repos/{owner}/{name}`
    /// answers 404, as for a repository the token cannot see).
    pub fn hide_repositories(&self) {
        self.state.repositories.lock().unwrap().clear();
    }

    /// Makes `logins` the active members of the team `org/slug`.
    pub fn set_team(&self, org: &str, slug: &str, logins: &[&str]) {
        let members = logins.iter().map(|l| l.to_lowercase()).collect();
        self.state.teams.lock().unwrap().insert(format!("{org}/{slug}").to_lowercase(), members);
    }
}

async fn answer(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let index = {
        let mut calls = state.calls.lock().unwrap();
        calls.push(Call {
            method: method.clone(),
            path: path.clone(),
            authorization,
            body: body.clone(),
            response: Value::Null,
        });
        calls.len() - 1
    };
    let reply = |status: u16, value: Value| {
        state.calls.lock().unwrap()[index].response = value.clone();
        let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert("content-type", "application/json".parse().unwrap());
        Ok(r)
    };
    while state.stalled.load(Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if state.failures.load(Ordering::SeqCst) > 0 {
        state.failures.fetch_sub(1, Ordering::SeqCst);
        return reply(500, json!({ "message": "Server Error" }));
    }
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let with = |mut v: Value, fields: &[(&str, Value)]| {
        for (k, f) in fields {
            v[*k] = f.clone();
        }
        v
    };
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["app", "installations", _, "access_tokens"]) => reply(
            201,
            json!({ "token": format!("ghs_fake{id}"), "expires_at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "permissions": {} }),
        ),
        ("GET", ["repos", owner, _, "installation"]) => {
            reply(200, json!({ "id": 4242, "account": { "login": owner }, "app_id": 1 }))
        }
        ("POST", ["repos", _, _, "issues", _, "comments"]) => {
            reply(201, with(example("create-issue-comment"), &[("id", id.into()), ("body", body["body"].clone())]))
        }
        ("PATCH", ["repos", _, _, "issues", "comments", c]) => {
            let c: i64 = c.parse().unwrap_or(0);
            reply(200, with(example("update-issue-comment"), &[("id", c.into()), ("body", body["body"].clone())]))
        }
        ("POST", ["repos", _, _, "statuses", _]) => {
            reply(201, with(example("create-commit-status"), &[("id", id.into())]))
        }
        ("POST", ["repos", _, _, "check-runs"]) => reply(
            201,
            with(example("create-check-run.completed"), &[("id", id.into()), ("head_sha", body["head_sha"].clone())]),
        ),
        ("PATCH", ["repos", _, _, "check-runs", c]) => {
            reply(200, with(example("update-check-run"), &[("id", c.parse::<i64>().unwrap_or(0).into())]))
        }
        ("POST", ["repos", _, _, "deployments"]) => reply(
            201,
            with(
                example("create-deployment.simple"),
                &[("id", id.into()), ("environment", body["environment"].clone())],
            ),
        ),
        ("POST", ["repos", _, _, "deployments", _, "statuses"]) => {
            reply(201, with(example("create-deployment-status"), &[("id", id.into())]))
        }
        // GitHub's repository object, as its webhooks carry it, made this one.
        ("GET", ["repos", owner, name]) => {
            let full_name = format!("{owner}/{name}");
            let known = state.repositories.lock().unwrap().get(&full_name.to_lowercase()).copied();
            match known {
                Some((id, owner_id)) => {
                    let mut repository = payload("pull_request.opened")["repository"].clone();
                    repository["id"] = id.into();
                    repository["name"] = (*name).into();
                    repository["full_name"] = full_name.into();
                    repository["owner"]["login"] = (*owner).into();
                    repository["owner"]["id"] = owner_id.into();
                    reply(200, repository)
                }
                None => {
                    reply(404, json!({ "message": "Not Found", "documentation_url": "https://docs.github.com/rest" }))
                }
            }
        }
        ("GET", ["repos", _, _, "collaborators", login, "permission"]) => {
            let permission =
                state.permissions.lock().unwrap().get(&login.to_lowercase()).cloned().unwrap_or_else(|| "read".into());
            let mut answer = example("get-collaborator-permission-level.admin");
            answer["role_name"] = permission.clone().into();
            answer["permission"] = permission.into();
            answer["user"]["login"] = (*login).into();
            reply(200, answer)
        }
        ("GET", ["repos", _, _, "pulls", pr, "reviews"]) => {
            let pr: i64 = pr.parse().unwrap_or(0);
            reply(200, Value::Array(state.reviews.lock().unwrap().get(&pr).cloned().unwrap_or_default()))
        }
        ("GET", ["orgs", org, "teams", slug, "memberships", login]) => {
            let team = format!("{org}/{slug}").to_lowercase();
            let member = state.teams.lock().unwrap().get(&team).is_some_and(|m| m.contains(&login.to_lowercase()));
            if member {
                let mut answer = example("get-team-membership.maintainer");
                answer["role"] = "member".into();
                reply(200, answer)
            } else {
                reply(404, json!({ "message": "Not Found", "documentation_url": "https://docs.github.com/rest" }))
            }
        }
        _ => reply(404, json!({ "message": "Not Found", "documentation_url": "https://docs.github.com/rest" })),
    }
}

/// A webhook delivery, signed with `secret` as GitHub signs it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: String,
    pub id: String,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn new(event: &str, payload: &Value) -> Delivery {
        Delivery {
            event: event.into(),
            id: format!("{:032x}", rand::random::<u128>()),
            body: payload.to_string().into_bytes(),
        }
    }

    /// `X-Hub-Signature-256` of the body under `secret`.
    pub fn signature(&self, secret: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&self.body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Posts it to the receiver's webhook endpoint with `signature`; returns
    /// the status and body.
    pub fn send_signed(&self, api: &str, signature: &str) -> (u16, String) {
        let resp = self.post_signed(api, signature);
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    }

    /// Posts it signed with `secret`; returns the whole answer (headers too).
    pub fn post(&self, api: &str, secret: &str) -> reqwest::blocking::Response {
        self.post_signed(api, &self.signature(secret))
    }

    fn post_signed(&self, api: &str, signature: &str) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new()
            .post(format!("{api}/v1/github/webhook"))
            .header("content-type", "application/json")
            .header("x-github-event", &self.event)
            .header("x-github-delivery", &self.id)
            .header("x-hub-signature-256", signature)
            .header("user-agent", "GitHub-Hookshot/fake")
            .body(self.body.clone())
            .send()
            .unwrap()
    }

    /// Posts it signed with `secret`.
    pub fn send(&self, api: &str, secret: &str) -> (u16, String) {
        self.send_signed(api, &self.signature(secret))
    }
}

/// Replaces the values at the JSON pointers given, as a test case needs.
pub fn with(mut v: Value, changes: &[(&str, Value)]) -> Value {
    for (pointer, value) in changes {
        *v.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer} in the payload")) = value.clone();
    }
    v
}

/// The calls in `calls` by method and path, for failure messages.
pub fn summary(calls: &[Call]) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in calls {
        *counts.entry(format!("{} {}", c.method, c.path)).or_default() += 1;
    }
    let mut lines: Vec<String> = counts.into_iter().map(|(k, n)| format!("{n} × {k}")).collect();
    lines.sort();
    lines.join("\n")
}
