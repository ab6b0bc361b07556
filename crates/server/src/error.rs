//! OpenAI error objects: `{"error":{"message","type","param","code"}}` with the right status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }
    /// 400 for a request that cannot be served as written.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 400 naming the offending parameter.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message);
        e.param = Some(param.to_owned());
        e
    }
    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{model}` does not exist."));
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed for this route")
    }
    pub fn unauthorized() -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "Incorrect API key provided.");
        e.code = Some("invalid_api_key");
        e
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message)
    }
    pub fn overloaded() -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "The server is overloaded: too many waiting requests. Retry shortly.");
        e.retry_after = Some(1);
        e
    }
    pub fn loading() -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "The model is still loading.");
        e.retry_after = Some(2);
        e
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message)
    }
    /// 503 once the engine's backend can serve nothing more (for example a lost GPU context):
    /// only a restart helps, so no Retry-After.
    pub fn backend_failed(why: &str) -> Self {
        let mut e = Self::unavailable(format!("The inference backend has failed and cannot serve requests until the server is restarted: {why}"));
        e.code = Some("backend_failed");
        e
    }
    /// 503 for a request that arrives while the server drains before exiting: another replica
    /// can serve it.
    pub fn shutting_down() -> Self {
        let mut e = Self::unavailable("The server is shutting down and accepts no new requests.");
        e.code = Some("shutting_down");
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
