//! GitLab: the REST v4 calls previews need, and its webhooks.
//!
//! Calls: merge requests (`/projects/:id/merge_requests[/:iid]`), their notes, branches
//! and environments (`review/<ref>`, `external_url` = the preview URL, stopped when the
//! merge request closes). The project is its numeric id or its path, escaped.
//!
//! Webhooks: `X-Gitlab-Token` is the plain secret (compared in constant time); with a
//! signing token, `webhook-signature` must hold a `v1,<base64>` HMAC-SHA256 of
//! `{webhook-id}.{webhook-timestamp}.{body}` under the `whsec_` key, within ±5 minutes.
//! The delivery id is `Idempotency-Key` (the same on every retry).

use super::api::{segment, Http};
use super::hooks::{HookError, HookEvent, Parsed};
use super::{ChangeInfo, ChangeState, Comment, EnvState, EnvView, Forge, ForgeError, Views};
use async_trait::async_trait;
use base64::Engine;
use hmac::Mac;
use http::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};
use wakegate_core::route::{ForgeConfig, ForgeKind};

/// Farthest a signed delivery's timestamp may be from now.
pub const SIGNATURE_TOLERANCE_SECS: u64 = 5 * 60;

pub struct GitLab {
    http: Http,
    /// `/projects/<escaped id>`
    project: String,
}

impl GitLab {
    pub fn new(config: &ForgeConfig, token: &str) -> Result<GitLab, ForgeError> {
        Ok(GitLab {
            http: Http::new("gitlab", &config.api_url, token, vec![])?,
            project: format!("/projects/{}", segment(&config.repo)),
        })
    }

    fn mr_path(&self, iid: u64) -> String {
        format!("{}/merge_requests/{iid}", self.project)
    }
}

fn u64_of(v: &Value, key: &str) -> Result<u64, ForgeError> {
    v.get(key).and_then(Value::as_u64).ok_or_else(|| ForgeError::Shape(format!("no numeric {key}")))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A merge request as the API (and the webhook's `object_attributes`) describe it.
pub fn change_info(mr: &Value) -> Result<ChangeInfo, ForgeError> {
    let state = match str_of(mr, "state") {
        "merged" => ChangeState::Merged,
        "closed" => ChangeState::Closed,
        // `locked` is a merge under way: still open until it says merged
        "opened" | "locked" => ChangeState::Open,
        other => return Err(ForgeError::Shape(format!("unknown merge request state {other:?}"))),
    };
    let draft = mr.get("draft").or_else(|| mr.get("work_in_progress")).and_then(Value::as_bool).unwrap_or(false);
    let source = mr.get("source_project_id").and_then(Value::as_u64);
    let target = mr.get("target_project_id").and_then(Value::as_u64);
    // `changes_count` is a string: "" until GitLab has counted, "1000+" when many
    let has_changes = match mr.get("changes_count") {
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s != "0"),
        Some(Value::Number(n)) => Some(n.as_u64() != Some(0)),
        _ => None,
    };
    let sha = mr
        .get("sha")
        .and_then(Value::as_str)
        .or_else(|| mr.get("last_commit").and_then(|c| c.get("id")).and_then(Value::as_str))
        .unwrap_or("");
    Ok(ChangeInfo {
        number: u64_of(mr, "iid")?,
        url: mr.get("web_url").or_else(|| mr.get("url")).and_then(Value::as_str).unwrap_or("").to_string(),
        state,
        draft,
        source_branch: str_of(mr, "source_branch").to_string(),
        from_fork: matches!((source, target), (Some(s), Some(t)) if s != t),
        head_sha: sha.to_string(),
        has_changes,
    })
}

#[async_trait]
impl Forge for GitLab {
    fn kind(&self) -> ForgeKind {
        ForgeKind::Gitlab
    }

    async fn change(&self, number: u64) -> Result<Option<ChangeInfo>, ForgeError> {
        self.http.json(Method::GET, &self.mr_path(number), None).await?.map(|mr| change_info(&mr)).transpose()
    }

    async fn open_changes(&self) -> Result<Vec<ChangeInfo>, ForgeError> {
        let items = self.http.list(&format!("{}/merge_requests?state=opened&per_page=100", self.project)).await?;
        items.iter().map(change_info).collect()
    }

    async fn branch_exists(&self, branch: &str) -> Result<bool, ForgeError> {
        let path = format!("{}/repository/branches/{}", self.project, segment(branch));
        Ok(self.http.json(Method::GET, &path, None).await?.is_some())
    }

    async fn comments(&self, number: u64) -> Result<Vec<Comment>, ForgeError> {
        let items = self.http.list(&format!("{}/notes?sort=asc&per_page=100", self.mr_path(number))).await?;
        Ok(items
            .iter()
            .filter_map(|n| Some(Comment { id: n.get("id")?.as_u64()?, body: str_of(n, "body").to_string() }))
            .collect())
    }

    async fn create_comment(&self, number: u64, body: &str) -> Result<u64, ForgeError> {
        let path = format!("{}/notes", self.mr_path(number));
        let note = self.http.json(Method::POST, &path, Some(&json!({ "body": body }))).await?;
        note.as_ref().map(|n| u64_of(n, "id")).unwrap_or_else(|| Err(ForgeError::Shape("no such merge request".into())))
    }

    async fn edit_comment(&self, number: u64, id: u64, body: &str) -> Result<bool, ForgeError> {
        let path = format!("{}/notes/{id}", self.mr_path(number));
        Ok(self.http.json(Method::PUT, &path, Some(&json!({ "body": body }))).await?.is_some())
    }

    async fn delete_comment(&self, number: u64, id: u64) -> Result<(), ForgeError> {
        self.http.json(Method::DELETE, &format!("{}/notes/{id}", self.mr_path(number)), None).await.map(drop)
    }

    async fn publish(&self, view: &EnvView, views: &mut Views) -> Result<(), ForgeError> {
        let envs = format!("{}/environments", self.project);
        if view.state == EnvState::Stopped {
            if let (Some(id), false) = (views.id, views.state == Some(EnvState::Stopped)) {
                // already stopped or deleted by someone: fine
                let a = self.http.call(Method::POST, &self.http.url(&format!("{envs}/{id}/stop")), None).await?;
                if !(200..=299).contains(&a.status) && a.status != 404 {
                    return Err(ForgeError::Api { status: a.status, message: super::api::message(&a.body) });
                }
            }
            views.state = Some(EnvState::Stopped);
            return Ok(());
        }
        if views.id.is_none() {
            let found = self.http.list(&format!("{envs}?name={}&per_page=100", segment(&view.name))).await?;
            let env = found.iter().find(|e| str_of(e, "name") == view.name);
            views.id = env.and_then(|e| e.get("id")?.as_u64());
            views.url = env.and_then(|e| e.get("external_url")?.as_str().map(str::to_string));
        }
        match views.id {
            None => {
                let body = json!({ "name": view.name, "external_url": view.url, "tier": "development" });
                let env = self.http.json(Method::POST, &envs, Some(&body)).await?;
                views.id = env.as_ref().and_then(|e| e.get("id")?.as_u64());
                views.url = Some(view.url.clone());
            }
            Some(id) if views.url.as_deref() != Some(view.url.as_str()) => {
                let body = json!({ "external_url": view.url });
                if self.http.json(Method::PUT, &format!("{envs}/{id}"), Some(&body)).await?.is_none() {
                    // deleted on the forge: made again next time
                    views.id = None;
                    return Ok(());
                }
                views.url = Some(view.url.clone());
            }
            Some(_) => {}
        }
        views.state = Some(view.state);
        Ok(())
    }
}

use super::hooks::header;

/// Checks a delivery against the project's secrets: every one configured must match.
/// `secret` and `signing` are the resolved values.
pub fn verify(
    secret: Option<&str>,
    signing: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    now_secs: u64,
) -> Result<(), HookError> {
    use subtle::ConstantTimeEq;
    if secret.is_none() && signing.is_none() {
        return Err(HookError::Misconfigured("no webhook secret is configured".into()));
    }
    if let Some(secret) = secret {
        let given = header(headers, "x-gitlab-token").ok_or(HookError::Forged("no X-Gitlab-Token"))?;
        if !bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
            return Err(HookError::Forged("X-Gitlab-Token does not match"));
        }
    }
    if let Some(signing) = signing {
        let key = signing_key(signing)?;
        let id = header(headers, "webhook-id").ok_or(HookError::Forged("no webhook-id"))?;
        let ts = header(headers, "webhook-timestamp").ok_or(HookError::Forged("no webhook-timestamp"))?;
        let sigs = header(headers, "webhook-signature").ok_or(HookError::Forged("no webhook-signature"))?;
        let at: u64 = ts.parse().map_err(|_| HookError::Forged("webhook-timestamp is not a number"))?;
        if at.abs_diff(now_secs) > SIGNATURE_TOLERANCE_SECS {
            return Err(HookError::Forged("webhook-timestamp is more than 5 minutes away"));
        }
        let valid = sigs.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|sig| {
            let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else { return false };
            super::hooks::hmac_sha256(&key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])
                .verify_slice(&sig)
                .is_ok()
        });
        if !valid {
            return Err(HookError::Forged("webhook-signature does not match"));
        }
    }
    Ok(())
}

/// The HMAC key of a `whsec_<base64>` signing token.
fn signing_key(token: &str) -> Result<Vec<u8>, HookError> {
    let b64 = token.strip_prefix("whsec_").unwrap_or(token);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| HookError::Misconfigured("the signing secret is not whsec_<base64>".into()))
}

/// Signs a body as GitLab does (for tests and the benchmark).
pub fn sign(signing: &str, id: &str, ts: u64, body: &[u8]) -> String {
    let key = signing_key(signing).unwrap_or_default();
    let ts = ts.to_string();
    let mac = super::hooks::hmac_sha256(&key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// What a delivery asks for. `repo` is the configured project, which the payload must
/// name.
pub fn parse(headers: &HeaderMap, body: &[u8], repo: &str) -> Result<Parsed, HookError> {
    let delivery = header(headers, "idempotency-key")
        .or_else(|| header(headers, "x-gitlab-event-uuid"))
        .or_else(|| header(headers, "webhook-id"))
        .map(str::to_string)
        .unwrap_or_else(|| super::hooks::body_id(body));
    let event = header(headers, "x-gitlab-event").unwrap_or("");
    let payload: Value = serde_json::from_slice(body).map_err(|e| HookError::BadPayload(format!("not JSON: {e}")))?;
    let project = payload.get("project").cloned().unwrap_or(Value::Null);
    let names_repo =
        project.get("path_with_namespace").and_then(Value::as_str).is_some_and(|p| p.eq_ignore_ascii_case(repo))
            || project.get("id").and_then(Value::as_u64).is_some_and(|id| id.to_string() == repo)
            || payload.get("project_id").and_then(Value::as_u64).is_some_and(|id| id.to_string() == repo);
    let event = match event {
        "Merge Request Hook" => {
            let attrs = payload.get("object_attributes").ok_or(HookError::BadPayload("no object_attributes".into()))?;
            let number = attrs.get("iid").and_then(Value::as_u64).ok_or(HookError::BadPayload("no iid".into()))?;
            let action = attrs.get("action").and_then(Value::as_str).unwrap_or("");
            let draft = payload.get("changes").and_then(|c| c.get("draft"));
            let ready = draft.is_some_and(|d| d.get("current") == Some(&Value::Bool(false)));
            match action {
                "open" | "reopen" => Some(HookEvent::Change { number, wake: true }),
                "close" | "merge" => Some(HookEvent::Change { number, wake: false }),
                // new commits (`oldrev`), or marked ready / draft
                "update" if attrs.get("oldrev").is_some() || draft.is_some() => {
                    Some(HookEvent::Change { number, wake: ready })
                }
                // title edits, approvals, labels: nothing
                _ => None,
            }
        }
        "Push Hook" => super::hooks::push_event(&payload),
        _ => None,
    };
    super::hooks::parsed(delivery, event, names_repo, repo)
}
