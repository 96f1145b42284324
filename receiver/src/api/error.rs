//! The one error type of the HTTP API. Client mistakes carry a message that says
//! what was wrong and how to fix it; internal causes are logged once, with the
//! request's method and path, and never sent to the client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nx_protocol::api::ErrorBody;

use nx_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The request is refused whoever asks (over a cap, a link no token proves).
    #[error("{0}")]
    Forbidden(String),
    /// The caller's credential may not do this; another key may.
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    LengthRequired(String),
    #[error("{0}")]
    TooLarge(String),
    /// The upload is fine but cannot run here (the verifier's verdict).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    /// The client's own share of something is used up (its app's uploads).
    #[error("{0}")]
    TooManyRequests(String),
    /// The client took too long sending its request.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn internal(e: impl Into<anyhow::Error>) -> ApiError {
        ApiError::Internal(e.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::Denied(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::LengthRequired(_) => StatusCode::LENGTH_REQUIRED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<crate::artifacts::ArtifactError> for ApiError {
    fn from(e: crate::artifacts::ArtifactError) -> Self {
        match e {
            crate::artifacts::ArtifactError::Db(e) => e.into(),
            crate::artifacts::ArtifactError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::TooLarge { .. } => ApiError::TooLarge(message),
            // The head proved the key: a footer it did not sign means a body
            // changed on its way, as a digest that does not match does.
            StoreError::Footer(_) => ApiError::BadRequest(message),
            StoreError::LengthMismatch { .. } | StoreError::DigestMismatch { .. } | StoreError::Body(_) => {
                ApiError::BadRequest(message)
            }
            // Where the disk filled is the operator's to know, not the client's.
            StoreError::DiskFull { path } => {
                tracing::error!(path = %path.display(), "an upload found the disk full");
                ApiError::InsufficientStorage(
                    "the server's disk is full; push again once its operator freed space".into(),
                )
            }
            StoreError::Unavailable { .. } | StoreError::Busy { .. } => ApiError::Unavailable(message),
            StoreError::AppBusy { .. } => ApiError::TooManyRequests(message),
            StoreError::TimedOut { .. } => ApiError::Timeout(message),
            StoreError::Io { .. } | StoreError::Missing { .. } | StoreError::BadUrl { .. } => {
                ApiError::Internal(e.into())
            }
        }
    }
}

/// What a 503 tells the client to wait before trying again, in seconds.
pub const RETRY_AFTER_SECS: u32 = 10;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let error = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error answering a request");
                "internal error in the receiver; its log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let credential = matches!(self, ApiError::Unauthorized(_) | ApiError::Denied(_));
        let mut response = (status, Json(ErrorBody { error, credential })).into_response();
        // Every 503 is a passing condition (busy, full): say when to come back.
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        }
        response
    }
}

/// Edit distance, for "did you mean" suggestions.
pub fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// "app x does not exist" with the closest existing names.
pub fn unknown_app(name: &str, existing: &[String]) -> ApiError {
    let mut close: Vec<&String> = existing.iter().filter(|e| distance(name, e) <= 2 || e.starts_with(name)).collect();
    close.sort_by_key(|e| distance(name, e));
    close.truncate(3);
    let hint = if close.is_empty() {
        "create it with `nx apps create NAME` or list apps with `nx apps ls`".to_owned()
    } else {
        format!("did you mean {}?", close.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(" or "))
    };
    ApiError::NotFound(format!("app '{name}' does not exist; {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_refusals_of_the_credential_say_so() {
        let body = |e: ApiError| async move {
            let bytes = axum::body::to_bytes(e.into_response().into_body(), 4096).await.unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        assert_eq!(
            body(ApiError::Denied("use the admin token".into())).await,
            r#"{"error":"use the admin token","credential":true}"#
        );
        assert_eq!(
            body(ApiError::Unauthorized("unknown key".into())).await,
            r#"{"error":"unknown key","credential":true}"#
        );
        assert_eq!(body(ApiError::Forbidden("over the cap".into())).await, r#"{"error":"over the cap"}"#);
    }

    #[test]
    fn distances_are_levenshtein() {
        assert_eq!(distance("web", "web"), 0);
        assert_eq!(distance("wbe", "web"), 2);
        assert_eq!(distance("api", "apis"), 1);
        assert_eq!(distance("", "abc"), 3);
    }

    #[test]
    fn unknown_apps_suggest_close_names() {
        let existing = vec!["web".to_owned(), "worker".to_owned(), "api".to_owned()];
        let msg = unknown_app("wbe", &existing).to_string();
        assert!(msg.contains("did you mean 'web'"), "{msg}");
        let msg = unknown_app("zzzzzz", &existing).to_string();
        assert!(msg.contains("nx apps create"), "{msg}");
    }

    #[test]
    fn internal_causes_are_not_sent() {
        let e = ApiError::internal(anyhow::anyhow!("password=hunter2 leaked"));
        assert_eq!(e.to_string(), "internal error");
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
