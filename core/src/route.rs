//! Records and wire types shared by edge, waker, store and provisioner.

use crate::lifecycle::{EraseReason, GoneWhy, Phase, State};
use crate::Millis;
use serde::{Deserialize, Serialize};

/// A project: a repository whose refs get previews.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// Random, stable id (part of every preview hash).
    pub id: String,
    /// DNS-safe short name, unique.
    pub name: String,
    /// Any URL git can fetch from: file://, https://, git://.
    pub git_url: String,
    /// Default TTL of its previews.
    pub ttl_hours: f64,
    /// A running preview with no activity for this long is put to sleep.
    pub idle_timeout_secs: u64,
    pub created_at: Millis,
    /// What its previews run on; the backend's defaults fill what is unset.
    #[serde(default)]
    pub machine: MachineSpec,
    /// The org that owns it (projects stored before orgs existed belong to the default
    /// org).
    #[serde(default = "default_org_id")]
    pub org_id: String,
    /// The GitLab or GitHub project whose merge requests drive its previews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<ForgeConfig>,
}

/// Where a secret is read from when it is needed: never the secret itself, so the store
/// holds no token in plain text.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// An environment variable of the process that needs it (waker, provisioner).
    Env(String),
    /// A file (its content, trimmed).
    File(String),
}

/// A project's forge: where its merge requests are, and how Wakegate reaches them.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgeConfig {
    pub kind: ForgeKind,
    /// The API root: `https://gitlab.com/api/v4` (or a self-hosted GitLab's),
    /// `https://api.github.com`.
    pub api_url: String,
    /// GitLab: the project's numeric id or `group/project` path; GitHub: `owner/repo`.
    pub repo: String,
    /// The API token (also used to clone a private repository).
    pub token: SecretRef,
    /// GitLab's secret token (`X-Gitlab-Token`) or GitHub's webhook secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<SecretRef>,
    /// GitLab's signing token (`whsec_…`): deliveries must carry a valid
    /// `webhook-signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<SecretRef>,
    /// Preview draft merge requests too (default: not until they are ready).
    #[serde(default)]
    pub drafts: bool,
    /// Preview merge requests that change nothing too (default: not).
    #[serde(default)]
    pub empty: bool,
    /// Preview merge requests from forks too (default: not: their code is anyone's, and
    /// it runs on machines this installation pays for).
    #[serde(default)]
    pub forks: bool,
}

impl ForgeConfig {
    /// The user name that goes with the token when git fetches over HTTPS.
    pub fn git_username(&self) -> &'static str {
        match self.kind {
            ForgeKind::Gitlab => "oauth2",
            ForgeKind::Github => "x-access-token",
        }
    }
}

/// The id of the org every installation has, which projects without one belong to.
pub const DEFAULT_ORG_ID: &str = "org-default";

fn default_org_id() -> String {
    DEFAULT_ORG_ID.to_string()
}

/// Every URL a preview answers at: the default one (`template` with `{label}`
/// replaced) first, then one per custom name, with the default URL's scheme and port.
pub fn preview_urls(template: &str, label: &str, custom_hosts: &[CustomHost]) -> Vec<String> {
    let scheme = if template.starts_with("http://") { "http" } else { "https" };
    let tail = template.split("{label}").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let port = tail
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    std::iter::once(template.replace("{label}", label))
        .chain(custom_hosts.iter().map(|h| format!("{scheme}://{}{port}", h.host)))
        .collect()
}

/// A name a preview answers at under one of its org's preview bases.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomHost {
    pub host: String,
    /// The org's base it is under.
    pub base: String,
    /// Why the name differs from `<project>-<ref-slug>.<base>` (another ref of the
    /// project maps to that name first), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A project's machines: size, place, and how they sleep.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// e.g. `cx22`; `None`: the backend's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_type: Option<String>,
    /// e.g. `fsn1`; `None`: the backend's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default)]
    pub sleep_mode: SleepMode,
}

/// How an idle preview sleeps.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SleepMode {
    /// Power off: the quickest wake, but Hetzner bills a stopped server in full.
    #[default]
    Stop,
    /// Snapshot the disk and delete the server: cheap; a wake creates it again.
    Hibernate,
}

impl SleepMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SleepMode::Stop => "stop",
            SleepMode::Hibernate => "hibernate",
        }
    }
}

/// Which forge a project's merge requests live on.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForgeKind {
    Gitlab,
    Github,
}

impl ForgeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ForgeKind::Gitlab => "gitlab",
            ForgeKind::Github => "github",
        }
    }
}

/// The merge request (GitLab) or pull request (GitHub) a preview belongs to.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub forge: ForgeKind,
    /// The MR's iid / the PR's number.
    pub number: u64,
    /// Its page on the forge.
    pub url: String,
}

impl Change {
    /// How the forge writes it: `!42` on GitLab, `#42` on GitHub.
    pub fn reference(&self) -> String {
        match self.forge {
            ForgeKind::Gitlab => format!("!{}", self.number),
            ForgeKind::Github => format!("#{}", self.number),
        }
    }
}

/// One preview: a project at a ref, with its lifecycle state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preview {
    pub id: String,
    pub project_id: String,
    pub project: String,
    pub git_ref: String,
    /// The one DNS label under the preview base.
    pub label: String,
    pub state: State,
    pub state_since: Millis,
    pub created_at: Millis,
    /// When the current (or last) version was requested; the TTL counts from here.
    pub built_at: Millis,
    /// Per-preview TTL override in hours.
    pub ttl_hours: Option<f64>,
    pub pinned: bool,
    /// The last failure that did not change the state (a failed redeploy).
    pub last_error: Option<String>,
    /// Where it also answers: one name under each of its org's preview bases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_hosts: Vec<CustomHost>,
    /// The merge request it follows, when a forge drives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    /// The commit the forge last said the ref is at: a push of another one redeploys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The dump this preview's database comes from instead of the project's base
    /// (`wakegate db push --target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump: Option<String>,
    /// How far the current phase is (bytes of a database being restored); cleared
    /// whenever the state or phase changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// Work done of work to do, in bytes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    /// How a database is being restored, when that is what the bytes are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how: Option<Restore>,
}

/// How a preview's database is being made.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Restore {
    /// Cloned from the project's database image.
    Clone,
    /// The dump imported; no image is ready.
    Import,
    /// The dump imported while its image is being baked for the previews after it.
    ImportWhileBaking,
}

impl Progress {
    /// `12.3 MB of 50.0 MB`, and how, when it is known.
    pub fn text(&self) -> String {
        let mb = |b: u64| b as f64 / 1_000_000.0;
        let bytes = format!("{:.1} MB of {:.1} MB", mb(self.done.min(self.total)), mb(self.total));
        match self.how {
            None => bytes,
            Some(Restore::Clone) => format!("cloning its image, {bytes}"),
            Some(Restore::Import) => format!("importing the dump, {bytes}"),
            Some(Restore::ImportWhileBaking) => {
                format!("importing the dump, {bytes} (its image is being baked: the next previews clone it)")
            }
        }
    }
}

impl Preview {
    /// The TTL in force: the override, else the project's.
    pub fn effective_ttl_hours(&self, project: &Project) -> f64 {
        self.ttl_hours.unwrap_or(project.ttl_hours)
    }

    /// When the TTL erases this preview; `None` when pinned or nothing is left to erase.
    pub fn expires_at(&self, project: &Project) -> Option<Millis> {
        if self.pinned || matches!(self.state, State::Erased { .. } | State::Erasing { .. } | State::Gone { .. }) {
            return None;
        }
        Some(crate::ttl::expires_at(self.built_at, self.effective_ttl_hours(project)))
    }
}

/// What the edge routes on, as waker sends it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    pub preview_id: String,
    pub project: String,
    pub git_ref: String,
    pub status: RouteStatus,
    /// The record's version: status long-polls wait for a newer one.
    pub version: u64,
    /// TTL remaining in ms; absent when pinned or erased.
    pub ttl_remaining_ms: Option<Millis>,
    pub pinned: bool,
}

/// The part of a preview's state the edge needs.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RouteStatus {
    Running {
        origin: String,
    },
    /// `origin` is set during a redeploy: the old version still serves.
    Building {
        phase: Phase,
        origin: Option<String>,
        /// How far the phase is, when it says (restoring a database).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Progress>,
    },
    Sleeping,
    Waking,
    Failed {
        phase: Phase,
        /// A short public summary ([`Phase::failure_summary`]), never build output.
        reason: String,
    },
    Erased {
        reason: EraseReason,
        rebuildable: bool,
    },
    /// Nothing to rebuild: the branch is gone, or the merge request `change` was closed
    /// or merged.
    Gone {
        #[serde(default)]
        why: GoneWhy,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<Change>,
    },
    /// The host is an org's custom name under `domain`, whose ownership is no longer
    /// proven (its TXT record has been missing past the grace period).
    Suspended {
        domain: String,
    },
}

impl RouteStatus {
    /// The edge's view of a lifecycle state. `rebuildable` says whether the ref exists;
    /// `change` is the merge request a gone page links to.
    /// `progress` is how far a build's phase is.
    pub fn from_state(
        state: &State,
        rebuildable: bool,
        change: Option<&Change>,
        progress: Option<Progress>,
    ) -> RouteStatus {
        let gone = |why| RouteStatus::Gone { why, change: change.cloned() };
        match state {
            State::Running { origin, .. } => RouteStatus::Running { origin: origin.clone() },
            State::Building { phase, serving, .. } => {
                RouteStatus::Building { phase: *phase, origin: serving.as_ref().map(|s| s.origin.clone()), progress }
            }
            State::Sleeping { .. } => RouteStatus::Sleeping,
            // a stop under way is about to be asleep; a wake asked for now is remembered
            State::Stopping { wake_after: false, .. } => RouteStatus::Sleeping,
            State::Stopping { wake_after: true, .. } | State::Waking { .. } => RouteStatus::Waking,
            // the stored reason can hold build output: visitors get the phase's summary
            State::Failed { phase, .. } => {
                RouteStatus::Failed { phase: *phase, reason: phase.failure_summary().into() }
            }
            // being erased because its merge request closed: already gone for visitors
            State::Erasing { reason: EraseReason::Closed, .. } => gone(GoneWhy::Closed),
            State::Erasing { reason: EraseReason::Merged, .. } => gone(GoneWhy::Merged),
            State::Erasing { reason, .. } | State::Erased { reason } => {
                RouteStatus::Erased { reason: *reason, rebuildable }
            }
            State::Gone { why } => gone(*why),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            RouteStatus::Running { .. } => "running",
            RouteStatus::Building { .. } => "building",
            RouteStatus::Sleeping => "sleeping",
            RouteStatus::Waking => "waking",
            RouteStatus::Failed { .. } => "failed",
            RouteStatus::Erased { .. } => "erased",
            RouteStatus::Gone { .. } => "gone",
            RouteStatus::Suspended { .. } => "suspended",
        }
    }

    /// The origin that serves now, if any.
    pub fn origin(&self) -> Option<&str> {
        match self {
            RouteStatus::Running { origin } => Some(origin),
            RouteStatus::Building { origin, .. } => origin.as_deref(),
            _ => None,
        }
    }
}

/// Why a preview is gone, as the waker's 410 answers say it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoneInfo {
    pub why: GoneWhy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
}

/// Body of the edge's wake and rebuild calls.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRequest {
    pub host: String,
    /// The visitor's address, for per-IP limits (rebuild).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
}

/// Body of the edge's batched activity report: hosts that saw traffic since the last one.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityBatch {
    pub hosts: Vec<String>,
    /// Requests answered since the last report, by answer
    /// ([`crate::metrics::EDGE_ANSWERS`]): the Worker's metrics, which the waker
    /// records (the native edge serves its own).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub served: std::collections::BTreeMap<String, u64>,
    /// Requests to a sleeping preview refused a wake (bots, prefetches, `HEAD`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_wakes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Longest body waker accepts.
pub const MAX_API_BODY: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_urls_put_the_default_first_and_keep_its_scheme_and_port() {
        let h = |host: &str| CustomHost { host: host.into(), base: "previews.acme.com".into(), note: None };
        let custom = [h("shop-main.previews.acme.com")];
        assert_eq!(
            preview_urls("https://{label}.preview.example.com", "shop-main-1", &custom),
            ["https://shop-main-1.preview.example.com", "https://shop-main.previews.acme.com"]
        );
        assert_eq!(
            preview_urls("http://{label}.localhost:8080", "x", &custom),
            ["http://x.localhost:8080", "http://shop-main.previews.acme.com:8080"]
        );
        assert_eq!(preview_urls("http://{label}.localhost:8080/", "x", &[]), ["http://x.localhost:8080/"]);
    }
}
