//! Who may call: the edge proves each call with an HMAC signature over method, path,
//! body digest, time and a nonce; operators carry a bearer token.

use crate::error::ApiError;
use crate::model::MAX_BODY;
use crate::waker::{now_ms, Waker};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use wakegate_core::sign::{self, MAX_SKEW_MS};

/// Checks an edge call's signature and claims its nonce in the store, so a replay is
/// refused by every replica. The body is read (bounded) to check its digest, then
/// handed on.
pub async fn edge(State(waker): State<Arc<Waker>>, req: Request, next: Next) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| ApiError::TooLarge(MAX_BODY))?;
    let header = parts.headers.get(sign::SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let now = now_ms();
    let signed =
        sign::verify(&waker.config.edge_key, header, parts.method.as_str(), path, &sign::body_digest(&body), now)
            .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    // a signature is good for ±MAX_SKEW around its time: remember it that long
    let until = signed.t.saturating_add(MAX_SKEW_MS).max(now) + 1;
    if !waker.store.claim_nonce(&signed.nonce, until, now).await? {
        return Err(ApiError::Unauthorized(sign::SignError::Replay.to_string()));
    }
    Ok(next.run(Request::from_parts(parts, axum::body::Body::from(body))).await)
}

/// Checks the operator's bearer token (in constant time).
pub async fn operator(State(waker): State<Arc<Waker>>, req: Request, next: Next) -> Result<Response, ApiError> {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let expected = waker.config.operator_token.as_bytes();
    if !token.is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected))) {
        return Err(ApiError::Unauthorized("operator token required (Authorization: Bearer …)".into()));
    }
    Ok(next.run(req).await)
}
