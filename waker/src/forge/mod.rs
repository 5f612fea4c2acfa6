//! GitLab and GitHub drive previews.
//!
//! * [`hooks`] — the webhook endpoint: verifies a delivery on its raw body, drops one
//!   already seen (by delivery id, in the store, so replicas share it), persists it in
//!   the store's inbox and answers at once;
//! * [`sync`] — the work: an inbox loop turns deliveries into previews (open → build,
//!   push → redeploy, close/merge → erase into *gone*), a status loop keeps the one
//!   comment per merge request and the forge's environment or deployment in step with
//!   the preview, and a paced reconciler lists open merge requests to repair whatever a
//!   lost delivery missed. Everything about one merge request happens under a lock in
//!   the store, so concurrent deliveries never post two comments;
//! * [`gitlab`], [`github`] — each forge's REST calls and webhook formats behind one
//!   [`Forge`] trait;
//! * [`api`] — the HTTP both share (rate limits, retries, pagination).
//!
//! Tokens are read when needed from where the project's [`ForgeConfig`] says (an
//! environment variable or a file); they go in an `Authorization` header, never in a
//! URL, an argument or a log line.

pub mod api;
pub mod github;
pub mod gitlab;
pub mod hooks;
pub mod sync;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use wakegate_core::route::{Change, ForgeConfig, ForgeKind, Project};

/// Why a forge call failed.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("the forge answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("cannot reach the forge: {0}")]
    Transport(String),
    #[error("the forge's rate limit is spent; it resets in {}s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    #[error("the forge's token: {0}")]
    Token(#[source] wakegate_store::secret::SecretError),
    #[error("unexpected answer from the forge: {0}")]
    Shape(String),
}

/// Where a merge request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeState {
    Open,
    Closed,
    Merged,
}

/// A merge request (pull request) as the forge's API describes it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeInfo {
    pub number: u64,
    pub url: String,
    pub state: ChangeState,
    pub draft: bool,
    pub source_branch: String,
    /// From another repository: built from the forge's merge request ref.
    pub from_fork: bool,
    pub head_sha: String,
    /// `Some(false)` when the forge says it changes nothing; `None` when it has not
    /// said yet.
    pub has_changes: Option<bool>,
}

impl ChangeInfo {
    /// The ref its preview builds: the source branch, or for a fork the ref the forge
    /// keeps in the target repository.
    pub fn preview_ref(&self, kind: ForgeKind) -> String {
        match (self.from_fork, kind) {
            (false, _) => self.source_branch.clone(),
            (true, ForgeKind::Gitlab) => format!("refs/merge-requests/{}/head", self.number),
            (true, ForgeKind::Github) => format!("refs/pull/{}/head", self.number),
        }
    }

    pub fn link(&self, kind: ForgeKind) -> Change {
        Change { forge: kind, number: self.number, url: self.url.clone() }
    }
}

/// What the forge's own view of the preview (a GitLab environment, a GitHub
/// deployment) should say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvView {
    /// `review/<ref>` on GitLab, `preview/<ref>` on GitHub.
    pub name: String,
    pub url: String,
    pub state: EnvState,
    pub sha: Option<String>,
    /// The git ref a GitHub deployment is made for when no commit is known.
    pub git_ref: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvState {
    /// Building or waking.
    InProgress,
    /// Running or asleep: the URL works (a visit wakes it).
    Ready,
    Failed,
    /// The merge request closed or merged: stopped / inactive.
    Stopped,
}

impl EnvState {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvState::InProgress => "in_progress",
            EnvState::Ready => "ready",
            EnvState::Failed => "failed",
            EnvState::Stopped => "stopped",
        }
    }
}

/// What Wakegate remembers of the forge's view between calls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Views {
    /// The environment's or the deployment's id.
    #[serde(default)]
    pub id: Option<u64>,
    /// The commit the deployment is for (GitHub).
    #[serde(default)]
    pub sha: Option<String>,
    /// The state last published.
    #[serde(default)]
    pub state: Option<EnvState>,
    #[serde(default)]
    pub url: Option<String>,
}

/// A comment on a merge request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment {
    pub id: u64,
    pub body: String,
}

/// One forge's REST calls for one repository.
#[async_trait]
pub trait Forge: Send + Sync {
    fn kind(&self) -> ForgeKind;
    /// The merge request now; `None` when there is no such one.
    async fn change(&self, number: u64) -> Result<Option<ChangeInfo>, ForgeError>;
    /// Every open merge request (all pages).
    async fn open_changes(&self) -> Result<Vec<ChangeInfo>, ForgeError>;
    async fn branch_exists(&self, branch: &str) -> Result<bool, ForgeError>;
    /// Its comments (all pages).
    async fn comments(&self, number: u64) -> Result<Vec<Comment>, ForgeError>;
    async fn create_comment(&self, number: u64, body: &str) -> Result<u64, ForgeError>;
    /// `false` when the comment no longer exists.
    async fn edit_comment(&self, number: u64, id: u64, body: &str) -> Result<bool, ForgeError>;
    /// A comment already gone is fine.
    async fn delete_comment(&self, number: u64, id: u64) -> Result<(), ForgeError>;
    /// Brings the environment / deployment in line with `view`, updating `views`.
    async fn publish(&self, view: &EnvView, views: &mut Views) -> Result<(), ForgeError>;
}

/// The client for a project's forge, with its token read now.
pub fn client(config: &ForgeConfig) -> Result<Arc<dyn Forge>, ForgeError> {
    let token = wakegate_store::secret::resolve(&config.token).map_err(ForgeError::Token)?;
    Ok(match config.kind {
        ForgeKind::Gitlab => Arc::new(gitlab::GitLab::new(config, &token)?),
        ForgeKind::Github => Arc::new(github::GitHub::new(config, &token)?),
    })
}

/// Makes forge clients; tests count or replace them.
pub trait Clients: Send + Sync {
    fn client(&self, project: &Project) -> Result<Option<Arc<dyn Forge>>, ForgeError>;
}

/// How long a client (and the token it read) is reused: a rotated token or a changed
/// configuration takes effect within this.
const CLIENT_TTL: Duration = Duration::from_secs(60);

type Made = (ForgeConfig, std::time::Instant, Arc<dyn Forge>);

/// Clients as production makes them: one per project, reused for [`CLIENT_TTL`] (the
/// loops call every few seconds; each new client would read the token again and open
/// new connections).
#[derive(Default)]
pub struct RealClients {
    made: std::sync::Mutex<std::collections::HashMap<String, Made>>,
}

impl Clients for RealClients {
    fn client(&self, project: &Project) -> Result<Option<Arc<dyn Forge>>, ForgeError> {
        let Some(config) = &project.forge else { return Ok(None) };
        let mut made = self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((c, at, forge)) = made.get(&project.id) {
            if c == config && at.elapsed() < CLIENT_TTL {
                return Ok(Some(forge.clone()));
            }
        }
        let forge = client(config)?;
        made.insert(project.id.clone(), (config.clone(), std::time::Instant::now(), forge.clone()));
        Ok(Some(forge))
    }
}

/// How often the forge loops run.
#[derive(Clone, Debug)]
pub struct ForgeSettings {
    /// The inbox is read this often (and at once when a delivery arrives here).
    pub inbox_every: Duration,
    /// Comments and environments are brought in line with previews this often.
    pub status_every: Duration,
    /// Open merge requests are listed this often, per project.
    pub reconcile_every: Duration,
    /// Deliveries are remembered (for de-duplication) this long.
    pub remember: Duration,
}

impl Default for ForgeSettings {
    fn default() -> ForgeSettings {
        ForgeSettings {
            inbox_every: Duration::from_secs(1),
            status_every: Duration::from_secs(5),
            reconcile_every: Duration::from_secs(300),
            remember: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

/// Checks a forge configuration; the error names the field.
pub fn check_config(c: &ForgeConfig) -> Result<(), (&'static str, String)> {
    let url = reqwest::Url::parse(&c.api_url).map_err(|e| ("forge.api_url", format!("not a URL: {e}")))?;
    let loopback = url.host_str().is_some_and(|h| h == "127.0.0.1" || h == "localhost" || h == "[::1]");
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(("forge.api_url", "the API must be https:// (the token goes with every call)".into()));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(("forge.api_url", "the API URL takes no query, fragment or credentials".into()));
    }
    let repo_ok = match c.kind {
        ForgeKind::Gitlab => {
            !c.repo.is_empty()
                && c.repo.len() <= 255
                && !c.repo.starts_with('/')
                && !c.repo.ends_with('/')
                && c.repo.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_./".contains(ch))
        }
        ForgeKind::Github => {
            let mut parts = c.repo.split('/');
            let ok = |p: Option<&str>| {
                p.is_some_and(|p| {
                    !p.is_empty()
                        && p.len() <= 100
                        && p.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
                })
            };
            ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
        }
    };
    if !repo_ok {
        let want = match c.kind {
            ForgeKind::Gitlab => "a project id or a group/project path",
            ForgeKind::Github => "owner/repo",
        };
        return Err(("forge.repo", format!("forge.repo must be {want}")));
    }
    for (field, secret) in [
        ("forge.token", Some(&c.token)),
        ("forge.webhook_secret", c.webhook_secret.as_ref()),
        ("forge.signing_secret", c.signing_secret.as_ref()),
    ] {
        if let Some(s) = secret {
            wakegate_store::secret::check(s).map_err(|e| (field, e))?;
        }
    }
    match c.kind {
        ForgeKind::Gitlab if c.webhook_secret.is_none() && c.signing_secret.is_none() => {
            Err(("forge.webhook_secret", "GitLab needs a webhook_secret or a signing_secret".into()))
        }
        ForgeKind::Github if c.webhook_secret.is_none() => {
            Err(("forge.webhook_secret", "GitHub needs a webhook_secret".into()))
        }
        ForgeKind::Github if c.signing_secret.is_some() => {
            Err(("forge.signing_secret", "GitHub signs with the webhook_secret".into()))
        }
        _ => Ok(()),
    }
}
