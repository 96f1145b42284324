//! `POST /v1/github/webhook`: the HTTP side of GitHub's deliveries. Signed by
//! GitHub, not by nx, so verified here before anything is read past its
//! declared length; what a delivery asks for, and the worker that does it,
//! are `github::webhook`'s.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::github::webhook::{
    parse, read_deadline, signature_valid, signature_well_formed, Queued, MAX_BODY, READING_AT_ONCE,
    READING_PER_ADDRESS,
};

/// The handler. Answers 202 once the work is queued (or 200 for a ping and a
/// repeated delivery); 401 for a bad signature and 503 for a full queue,
/// before anything is recorded.
pub async fn receive(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, String), ApiError> {
    let Some(github) = &state.github else {
        return Err(ApiError::NotFound(
            "GitHub webhooks are off: start nx-receiver with --github-webhook-secret".into(),
        ));
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let signature = header("x-hub-signature-256");
    if !signature_well_formed(&signature) {
        return Err(ApiError::Unauthorized(
            "a delivery needs X-Hub-Signature-256: sha256=<hex>; set the webhook's secret on GitHub".into(),
        ));
    }
    let too_large = || ApiError::TooLarge(format!("webhook deliveries are at most {MAX_BODY} bytes"));
    // GitHub always says how long a delivery is, which sets its deadline.
    let Some(len) = header("content-length").parse::<u64>().ok() else {
        return Err(ApiError::LengthRequired("a delivery needs Content-Length (GitHub always sends one)".into()));
    };
    if len > MAX_BODY as u64 {
        return Err(too_large());
    }
    let Some(_reading) = github.reading.admit(peer.ip()) else {
        return Err(ApiError::Unavailable(format!(
            "{READING_AT_ONCE} deliveries are being read already ({READING_PER_ADDRESS} at most from one address); \
             redeliver this one from the webhook's settings"
        )));
    };
    let deadline = read_deadline(len);
    let body = match tokio::time::timeout(deadline, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return Err(too_large()),
        Err(_) => {
            return Err(ApiError::Timeout(format!(
                "the delivery's {len} bytes did not arrive within {}s",
                deadline.as_secs()
            )))
        }
    };
    if !signature_valid(github.secret.expose().as_bytes(), &body, &signature) {
        return Err(ApiError::Unauthorized(
            "the X-Hub-Signature-256 of this delivery does not match: check the webhook secret".into(),
        ));
    }
    let (delivery, event) = (header("x-github-delivery"), header("x-github-event"));
    if delivery.is_empty() || event.is_empty() {
        return Err(ApiError::BadRequest("a delivery needs X-GitHub-Delivery and X-GitHub-Event".into()));
    }
    let work = if event == "ping" {
        None
    } else {
        let payload: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("the delivery is not JSON: {e}")))?;
        parse(&event, &payload)
    };
    // A place in the queue first: a delivery refused for want of one is not
    // recorded, so its redelivery (same delivery id) is taken.
    let queued = match work {
        Some(work) => {
            let slot = github.queue.try_reserve().map_err(|_| {
                let waiting = github.queue.max_capacity();
                tracing::warn!(delivery, event, waiting, "webhook queue full; delivery refused");
                ApiError::Unavailable(format!(
                    "the receiver's webhook queue is full ({waiting} waiting); redeliver this delivery once it \
                     drains (the webhook's Recent Deliveries, or GitHub's redeliver API: GitHub does not retry \
                     on its own)"
                ))
            })?;
            Some((work, slot))
        }
        None => None,
    };
    if !state.db.record_delivery(&delivery, &event).await? {
        tracing::info!(delivery, event, "duplicate webhook delivery ignored");
        return Ok((StatusCode::OK, "duplicate delivery, ignored\n".into()));
    }
    match queued {
        Some((work, slot)) => {
            tracing::info!(delivery, event, ?work, "webhook queued");
            slot.send(Queued { delivery, work });
            Ok((StatusCode::ACCEPTED, "queued\n".into()))
        }
        None if event == "ping" => Ok((StatusCode::OK, "pong\n".into())),
        None => Ok((StatusCode::ACCEPTED, "ignored\n".into())),
    }
}
