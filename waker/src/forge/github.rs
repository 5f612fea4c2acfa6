//! GitHub: the REST calls previews need, and its webhooks.
//!
//! Calls: pull requests, their conversation comments (issue comments), branches, and
//! deployments with statuses (`environment_url` = the preview URL; `inactive` when the
//! pull request closes). Every call sends `Accept: application/vnd.github+json` and
//! `X-GitHub-Api-Version: 2022-11-28`.
//!
//! Webhooks: `X-Hub-Signature-256: sha256=<hex>` is an HMAC-SHA256 of the raw body under
//! the webhook secret, checked in constant time. The delivery id is `X-GitHub-Delivery`
//! (kept by a redelivery).

use super::api::{segment, Http};
use super::hooks::{HookError, HookEvent, Parsed};
use super::{ChangeInfo, ChangeState, Comment, EnvState, EnvView, Forge, ForgeError, Views};
use async_trait::async_trait;
use hmac::Mac;
use http::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};
use wakegate_core::route::{ForgeConfig, ForgeKind};

pub struct GitHub {
    http: Http,
    /// `/repos/<owner>/<repo>`
    repo: String,
}

impl GitHub {
    pub fn new(config: &ForgeConfig, token: &str) -> Result<GitHub, ForgeError> {
        let extra = vec![("accept", "application/vnd.github+json"), ("x-github-api-version", "2022-11-28")];
        let (owner, name) = config.repo.split_once('/').unwrap_or((&config.repo, ""));
        Ok(GitHub {
            http: Http::new("github", &config.api_url, token, extra)?,
            repo: format!("/repos/{}/{}", segment(owner), segment(name)),
        })
    }
}

/// A pull request as the API (and the webhook's `pull_request`) describe it.
pub fn change_info(pr: &Value) -> Result<ChangeInfo, ForgeError> {
    let number = pr.get("number").and_then(Value::as_u64).ok_or_else(|| ForgeError::Shape("no number".into()))?;
    let merged =
        pr.get("merged").and_then(Value::as_bool).unwrap_or(false) || pr.get("merged_at").is_some_and(|m| !m.is_null());
    let state = match (pr.get("state").and_then(Value::as_str), merged) {
        (_, true) => ChangeState::Merged,
        (Some("open"), false) => ChangeState::Open,
        (Some("closed"), false) => ChangeState::Closed,
        (other, _) => return Err(ForgeError::Shape(format!("unknown pull request state {other:?}"))),
    };
    let head = pr.get("head").cloned().unwrap_or(Value::Null);
    let repo_name =
        |side: &Value| side.get("repo").and_then(|r| r.get("full_name")).and_then(Value::as_str).map(str::to_string);
    let base = pr.get("base").cloned().unwrap_or(Value::Null);
    // a fork, or a fork since deleted (`head.repo` null)
    let from_fork = match (repo_name(&head), repo_name(&base)) {
        (Some(h), Some(b)) => !h.eq_ignore_ascii_case(&b),
        (None, _) => true,
        _ => false,
    };
    let has_changes = pr.get("changed_files").and_then(Value::as_u64).map(|n| n > 0);
    Ok(ChangeInfo {
        number,
        url: pr.get("html_url").and_then(Value::as_str).unwrap_or("").to_string(),
        state,
        draft: pr.get("draft").and_then(Value::as_bool).unwrap_or(false),
        source_branch: head.get("ref").and_then(Value::as_str).unwrap_or("").to_string(),
        from_fork,
        head_sha: head.get("sha").and_then(Value::as_str).unwrap_or("").to_string(),
        has_changes,
    })
}

#[async_trait]
impl Forge for GitHub {
    fn kind(&self) -> ForgeKind {
        ForgeKind::Github
    }

    async fn change(&self, number: u64) -> Result<Option<ChangeInfo>, ForgeError> {
        let path = format!("{}/pulls/{number}", self.repo);
        self.http.json(Method::GET, &path, None).await?.map(|pr| change_info(&pr)).transpose()
    }

    async fn open_changes(&self) -> Result<Vec<ChangeInfo>, ForgeError> {
        let items = self.http.list(&format!("{}/pulls?state=open&per_page=100", self.repo)).await?;
        items.iter().map(change_info).collect()
    }

    async fn branch_exists(&self, branch: &str) -> Result<bool, ForgeError> {
        let path = format!("{}/branches/{}", self.repo, segment(branch));
        Ok(self.http.json(Method::GET, &path, None).await?.is_some())
    }

    async fn comments(&self, number: u64) -> Result<Vec<Comment>, ForgeError> {
        let items = self.http.list(&format!("{}/issues/{number}/comments?per_page=100", self.repo)).await?;
        Ok(items
            .iter()
            .filter_map(|c| {
                let body = c.get("body").and_then(Value::as_str).unwrap_or("").to_string();
                Some(Comment { id: c.get("id")?.as_u64()?, body })
            })
            .collect())
    }

    async fn create_comment(&self, number: u64, body: &str) -> Result<u64, ForgeError> {
        let path = format!("{}/issues/{number}/comments", self.repo);
        let c = self.http.json(Method::POST, &path, Some(&json!({ "body": body }))).await?;
        c.and_then(|c| c.get("id")?.as_u64()).ok_or_else(|| ForgeError::Shape("no such pull request".into()))
    }

    async fn edit_comment(&self, _number: u64, id: u64, body: &str) -> Result<bool, ForgeError> {
        let path = format!("{}/issues/comments/{id}", self.repo);
        Ok(self.http.json(Method::PATCH, &path, Some(&json!({ "body": body }))).await?.is_some())
    }

    async fn delete_comment(&self, _number: u64, id: u64) -> Result<(), ForgeError> {
        self.http.json(Method::DELETE, &format!("{}/issues/comments/{id}", self.repo), None).await.map(drop)
    }

    async fn publish(&self, view: &EnvView, views: &mut Views) -> Result<(), ForgeError> {
        if view.state == EnvState::Stopped && views.id.is_none() {
            views.state = Some(EnvState::Stopped);
            return Ok(());
        }
        // one deployment per commit; its statuses follow the preview
        if view.state != EnvState::Stopped && (views.id.is_none() || views.sha != view.sha) {
            let body = json!({
                "ref": view.sha.as_deref().unwrap_or(&view.git_ref),
                "environment": view.name,
                "auto_merge": false,
                "required_contexts": [],
                // not transient: a newer deployment's success marks older ones inactive
                "transient_environment": false,
                "production_environment": false,
                "description": "Wakegate preview",
            });
            let a = self
                .http
                .call(Method::POST, &self.http.url(&format!("{}/deployments", self.repo)), Some(&body))
                .await?;
            if a.status != 201 {
                return Err(ForgeError::Api { status: a.status, message: super::api::message(&a.body) });
            }
            views.id = Some(
                a.body.get("id").and_then(Value::as_u64).ok_or_else(|| ForgeError::Shape("no deployment id".into()))?,
            );
            views.sha = view.sha.clone();
            views.state = None;
        }
        if views.state == Some(view.state) {
            return Ok(());
        }
        let Some(id) = views.id else { return Ok(()) };
        let (state, description) = match view.state {
            EnvState::InProgress => ("in_progress", "Building the preview"),
            EnvState::Ready => ("success", "The preview is ready"),
            EnvState::Failed => ("failure", "The preview failed"),
            EnvState::Stopped => ("inactive", "The pull request closed"),
        };
        let mut body = json!({ "state": state, "description": description, "auto_inactive": true });
        if view.state != EnvState::Stopped {
            body["environment_url"] = Value::String(view.url.clone());
        }
        let path = format!("{}/deployments/{id}/statuses", self.repo);
        match self.http.json(Method::POST, &path, Some(&body)).await? {
            Some(_) => views.state = Some(view.state),
            // the deployment was deleted on GitHub: a new one next time
            None => *views = Views::default(),
        }
        Ok(())
    }
}

use super::hooks::header;

/// Checks `X-Hub-Signature-256` against the webhook secret.
pub fn verify(secret: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Result<(), HookError> {
    let secret = secret.ok_or_else(|| HookError::Misconfigured("no webhook secret is configured".into()))?;
    let given = header(headers, "x-hub-signature-256").ok_or(HookError::Forged("no X-Hub-Signature-256"))?;
    let hex_sig = given.strip_prefix("sha256=").ok_or(HookError::Forged("X-Hub-Signature-256 is not sha256=<hex>"))?;
    let sig = hex::decode(hex_sig).map_err(|_| HookError::Forged("X-Hub-Signature-256 is not hex"))?;
    super::hooks::hmac_sha256(secret.as_bytes(), &[body])
        .verify_slice(&sig)
        .map_err(|_| HookError::Forged("X-Hub-Signature-256 does not match"))
}

/// Signs a body as GitHub does (for tests and the benchmark).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mac = super::hooks::hmac_sha256(secret.as_bytes(), &[body]);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a delivery asks for. `repo` is the configured `owner/repo`, which the payload
/// must name.
pub fn parse(headers: &HeaderMap, body: &[u8], repo: &str) -> Result<Parsed, HookError> {
    let delivery =
        header(headers, "x-github-delivery").map(str::to_string).unwrap_or_else(|| super::hooks::body_id(body));
    let event = header(headers, "x-github-event").unwrap_or("");
    let payload: Value = serde_json::from_slice(body).map_err(|e| HookError::BadPayload(format!("not JSON: {e}")))?;
    let names_repo = payload
        .get("repository")
        .and_then(|r| r.get("full_name"))
        .and_then(Value::as_str)
        .is_some_and(|n| n.eq_ignore_ascii_case(repo));
    let event = match event {
        "pull_request" => {
            let number = payload
                .get("number")
                .or_else(|| payload.get("pull_request").and_then(|p| p.get("number")))
                .and_then(Value::as_u64)
                .ok_or(HookError::BadPayload("no number".into()))?;
            match payload.get("action").and_then(Value::as_str).unwrap_or("") {
                "opened" | "reopened" | "ready_for_review" => Some(HookEvent::Change { number, wake: true }),
                "synchronize" | "closed" | "converted_to_draft" => Some(HookEvent::Change { number, wake: false }),
                // edits, labels, reviews, assignments: nothing
                _ => None,
            }
        }
        "push" => super::hooks::push_event(&payload),
        // `ping` when the webhook is made, and everything else
        _ => None,
    };
    super::hooks::parsed(delivery, event, names_repo, repo)
}
