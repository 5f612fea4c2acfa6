//! `POST /v1/forge/{project}/hook`: a forge's delivery, verified on its raw body,
//! de-duplicated by delivery id and persisted, then acknowledged at once (both forges
//! give up after 10 s); [`super::sync`] does the work.
//!
//! Order matters for "loses nothing": a delivery id already worked on is a duplicate;
//! otherwise the delivery is put in the inbox under its id with a compare-and-set (which
//! one caller wins, on whichever replica), and only then remembered as seen. A request
//! dropped half-way never leaves a claim without its event: at worst a much later replay
//! is worked on again, which changes nothing.

use crate::error::ApiError;
use crate::waker::{now_ms, Waker};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tracing::{info, warn};
use utoipa::ToSchema;
use wakegate_core::route::ForgeKind;
use wakegate_core::Millis;

/// Largest delivery read: merge request events are a few KB; a push of many commits
/// can be larger (GitHub caps payloads at 25 MB; what is refused here is repaired by the
/// reconciler).
pub const MAX_HOOK_BODY: usize = 2 * 1024 * 1024;
/// Deliveries waiting to be worked on, by `<project id>/<delivery>`.
pub const INBOX: &str = "forge-inbox";
/// Delivery ids seen, by `<project id>/<delivery>`, with when they were seen.
pub const SEEN: &str = "forge-seen";
/// Longest delivery id kept as it is (longer ones are hashed).
const MAX_DELIVERY_ID: usize = 128;

/// What a delivery asks Wakegate to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HookEvent {
    /// A merge request was opened, updated, closed or merged: its preview is brought in
    /// line with what the forge's API says of it now. `wake`: opened, reopened or marked
    /// ready, so a sleeping preview wakes too.
    Change { number: u64, wake: bool },
    /// A branch moved (`after` is all zeros when it was deleted).
    Push { branch: String, after: String },
}

/// A delivery, read.
#[derive(Debug)]
pub struct Parsed {
    pub delivery: String,
    /// `None`: nothing to do (a ping, a title edit, a label).
    pub event: Option<HookEvent>,
}

/// A delivery in the inbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub project_id: String,
    pub delivery: String,
    pub event: HookEvent,
    pub received_at: Millis,
    #[serde(default)]
    pub attempts: u32,
    /// Not tried again before this (after a failure).
    #[serde(default)]
    pub not_before: Millis,
    /// A worker took it until then (another replica leaves it alone meanwhile).
    #[serde(default)]
    pub lease_until: Millis,
}

/// Why a delivery was refused.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The signature or token is missing or wrong.
    #[error("forged or unsigned delivery: {0}")]
    Forged(&'static str),
    /// The project's secret cannot be read.
    #[error("{0}")]
    Misconfigured(String),
    #[error("bad payload: {0}")]
    BadPayload(String),
    /// Signed with this project's secret but about another repository.
    #[error("the delivery is not about {0}")]
    OtherRepo(String),
}

impl From<HookError> for ApiError {
    fn from(e: HookError) -> ApiError {
        match e {
            HookError::Forged(_) => ApiError::Unauthorized(e.to_string()),
            HookError::Misconfigured(m) => {
                // which variable or file is the installation's business, not the caller's
                warn!(error = %m, "a webhook secret cannot be read");
                ApiError::Misconfigured("the webhook secret is not available; try again later".into())
            }
            HookError::BadPayload(_) => ApiError::bad("body", e.to_string()),
            HookError::OtherRepo(_) => ApiError::Unprocessable(e.to_string()),
        }
    }
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes a key of any length (a longer one is hashed): this cannot fail, whatever
    // the key a project configured
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac
}

/// A delivery id for a delivery that carries none: the body's digest, so the same body
/// sent twice is one delivery.
pub fn body_id(body: &[u8]) -> String {
    format!("sha256-{}", hex::encode(Sha256::digest(body)))
}

/// A header's value, trimmed; `None` when absent or empty.
pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

/// A branch push (both forges send `ref` and `after`); tags and malformed commits are
/// nothing to do.
pub fn push_event(payload: &serde_json::Value) -> Option<HookEvent> {
    let r = payload.get("ref").and_then(serde_json::Value::as_str)?;
    let after = payload.get("after").and_then(serde_json::Value::as_str)?;
    let commit = (40..=64).contains(&after.len()) && after.bytes().all(|b| b.is_ascii_hexdigit());
    let branch = r.strip_prefix("refs/heads/")?;
    commit.then(|| HookEvent::Push { branch: branch.to_string(), after: after.to_ascii_lowercase() })
}

/// What a delivery asks for, once it is known to be about `repo` (`names_repo`).
pub fn parsed(delivery: String, event: Option<HookEvent>, names_repo: bool, repo: &str) -> Result<Parsed, HookError> {
    if event.is_some() && !names_repo {
        return Err(HookError::OtherRepo(repo.to_string()));
    }
    Ok(Parsed { delivery, event })
}

/// A delivery id safe as a store key.
fn key_safe(id: &str) -> String {
    if id.len() <= MAX_DELIVERY_ID && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        id.to_string()
    } else {
        body_id(id.as_bytes())
    }
}

/// The answer to a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct HookAnswer {
    /// `accepted` (persisted, to be worked on), `duplicate` (seen before: nothing
    /// happens) or `ignored` (nothing to do for this kind of event).
    pub outcome: &'static str,
    pub delivery: String,
}

/// A GitLab (merge request, push) or GitHub (`pull_request`, `push`) webhook delivery.
#[utoipa::path(post, path = "/v1/forge/{project}/hook", tag = "forge",
    params(("project" = String, Path, description = "project name")),
    request_body(content = Object, description = "the forge's payload, verified on its raw bytes"),
    responses(
        (status = 200, body = HookAnswer, description = "a duplicate: nothing happens"),
        (status = 202, body = HookAnswer, description = "accepted or ignored"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody),
        (status = 422, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn receive(
    State(w): State<Arc<Waker>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<HookAnswer>), ApiError> {
    let project =
        w.store.project_by_name(&name).await?.ok_or_else(|| ApiError::NotFound(format!("no project {name}")))?;
    let config =
        project.forge.as_ref().ok_or_else(|| ApiError::NotFound(format!("project {name} has no forge configured")))?;
    let read = |s: &Option<wakegate_core::route::SecretRef>| -> Result<Option<String>, HookError> {
        s.as_ref()
            .map(|s| wakegate_store::secret::resolve(s).map_err(|e| HookError::Misconfigured(e.to_string())))
            .transpose()
    };
    let secret = read(&config.webhook_secret)?;
    let verified = match config.kind {
        ForgeKind::Gitlab => {
            let signing = read(&config.signing_secret)?;
            super::gitlab::verify(secret.as_deref(), signing.as_deref(), &headers, &body, now_ms() / 1000)
        }
        ForgeKind::Github => super::github::verify(secret.as_deref(), &headers, &body),
    };
    if let Err(e) = verified {
        warn!(project = %name, error = %e, "webhook delivery refused");
        return Err(e.into());
    }
    let parsed = match config.kind {
        ForgeKind::Gitlab => super::gitlab::parse(&headers, &body, &config.repo),
        ForgeKind::Github => super::github::parse(&headers, &body, &config.repo),
    }?;
    let delivery = key_safe(&parsed.delivery);
    let Some(event) = parsed.event else {
        return Ok((StatusCode::ACCEPTED, Json(HookAnswer { outcome: "ignored", delivery })));
    };
    let now = now_ms();
    let key = format!("{}/{delivery}", project.id);
    let duplicate = || {
        info!(project = %name, %delivery, "duplicate delivery");
        Ok((StatusCode::OK, Json(HookAnswer { outcome: "duplicate", delivery: delivery.clone() })))
    };
    if w.store.table_get(SEEN, &key).await?.is_some() {
        return duplicate();
    }
    let item = Delivery {
        project_id: project.id.clone(),
        delivery: delivery.clone(),
        event,
        received_at: now,
        attempts: 0,
        not_before: 0,
        lease_until: 0,
    };
    let json = serde_json::to_string(&item).map_err(|e| ApiError::Misconfigured(e.to_string()))?;
    // the one caller whose write lands works on it; the others are duplicates
    if !w.store.table_swap(INBOX, &key, None, Some(&json)).await? {
        return duplicate();
    }
    if let Err(e) = w.store.table_put(SEEN, &key, &now.to_string()).await {
        // the event is safe in the inbox; only a later replay could be worked on again
        warn!(%delivery, error = %e, "remembering a delivery failed");
    }
    info!(project = %name, %delivery, event = ?item.event, "delivery accepted");
    w.forge.inbox.notify_one();
    Ok((StatusCode::ACCEPTED, Json(HookAnswer { outcome: "accepted", delivery })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(*k, v);
            }
        }
        h
    }

    #[test]
    fn github_signatures_follow_the_published_test_vector() {
        // from GitHub's "Validating webhook deliveries"
        let sig = super::super::github::sign("It's a Secret to Everybody", b"Hello, World!");
        assert_eq!(sig, "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17");
        let h = headers(&[("x-hub-signature-256", &sig)]);
        assert!(super::super::github::verify(Some("It's a Secret to Everybody"), &h, b"Hello, World!").is_ok());
        assert!(super::super::github::verify(Some("It's a Secret to Everybody"), &h, b"Hello, World?").is_err());
        assert!(super::super::github::verify(Some("other"), &h, b"Hello, World!").is_err());
        assert!(super::super::github::verify(Some("s"), &HeaderMap::new(), b"x").is_err());
        let h = headers(&[("x-hub-signature-256", "sha1=abc")]);
        assert!(super::super::github::verify(Some("s"), &h, b"x").is_err());
    }

    #[test]
    fn gitlab_tokens_and_signatures() {
        use super::super::gitlab::{sign, verify};
        let body = br#"{"object_kind":"merge_request"}"#;
        assert!(verify(Some("s3cret"), None, &headers(&[("x-gitlab-token", "s3cret")]), body, 0).is_ok());
        assert!(verify(Some("s3cret"), None, &headers(&[("x-gitlab-token", "s3cre")]), body, 0).is_err());
        assert!(verify(Some("s3cret"), None, &HeaderMap::new(), body, 0).is_err());
        // Standard Webhooks: v1,<base64 HMAC of id.ts.body> under the whsec_ key
        let key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let now = 1_700_000_000;
        let sig = sign(key, "msg_1", now, body);
        let h = |sig: &str, ts: u64| {
            headers(&[("webhook-id", "msg_1"), ("webhook-timestamp", &ts.to_string()), ("webhook-signature", sig)])
        };
        assert!(verify(None, Some(key), &h(&sig, now), body, now + 10).is_ok());
        assert!(verify(None, Some(key), &h(&format!("v1,AAAA {sig}"), now), body, now).is_ok(), "any v1 matches");
        assert!(verify(None, Some(key), &h(&sig, now), body, now + 301).is_err(), "too old");
        assert!(verify(None, Some(key), &h(&sig, now), body, now - 301).is_err(), "from the future");
        assert!(verify(None, Some(key), &h(&sig, now), b"{}", now).is_err(), "another body");
        assert!(verify(None, Some(key), &h(&sig.replace("v1,", "v1a,"), now), body, now).is_err());
        // both configured: both must hold
        let mut both = h(&sig, now);
        assert!(verify(Some("t"), Some(key), &both, body, now).is_err());
        both.insert("x-gitlab-token", HeaderValue::from_static("t"));
        assert!(verify(Some("t"), Some(key), &both, body, now).is_ok());
    }

    proptest::proptest! {
        /// Whatever a client sends, parsing and verifying answer without panicking.
        #[test]
        fn hostile_deliveries_never_panic(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            event in "(Merge Request Hook|Push Hook|pull_request|push|ping|[ -~]{0,20})",
            sig in "[ -~]{0,100}",
            ts in "[0-9]{0,12}|[ -~]{0,12}",
            json_ish in r#"\{("(object_kind|object_attributes|iid|action|ref|after|number|repository|full_name|project|path_with_namespace|changes|draft|current)": ?(\{\}|\[\]|null|1|"x"|true|"refs/heads/a"|"open"|"update"|"opened"|"acme/shop"), ?){0,8}\}"#,
        ) {
            for b in [body.as_slice(), json_ish.as_bytes()] {
                let h = headers(&[
                    ("x-gitlab-event", &event), ("x-github-event", &event), ("x-gitlab-token", &sig),
                    ("x-hub-signature-256", &sig), ("webhook-id", &sig), ("webhook-timestamp", &ts),
                    ("webhook-signature", &sig), ("idempotency-key", &sig), ("x-github-delivery", &sig),
                ]);
                let _ = super::super::gitlab::parse(&h, b, "acme/shop");
                let _ = super::super::github::parse(&h, b, "acme/shop");
                let _ = super::super::gitlab::verify(Some("s"), Some("whsec_AAAA"), &h, b, 1_700_000_000);
                let _ = super::super::github::verify(Some("s"), &h, b);
                let _ = key_safe(&sig);
            }
        }
    }

    #[test]
    fn delivery_ids_are_safe_keys() {
        assert_eq!(key_safe("3c1e9f2a-7d7b-4f0e-9a4b-2f1c8d1e0b11"), "3c1e9f2a-7d7b-4f0e-9a4b-2f1c8d1e0b11");
        assert!(key_safe("a/b c").starts_with("sha256-"));
        assert!(key_safe(&"x".repeat(500)).len() < 80);
    }
}
