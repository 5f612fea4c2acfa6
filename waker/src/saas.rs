//! Cloudflare for SaaS: every custom name is registered as a custom hostname on the
//! zone the Worker serves, so Cloudflare issues its certificate and routes it to the
//! Worker.
//!
//! * [`Client`] speaks the published API (`/zones/{zone}/custom_hostnames`: create,
//!   find by hostname, get, delete, list with pagination) with a bearer token; a 429 is
//!   waited out as `Retry-After` says, a 5xx retried with back-off, a 4xx reported with
//!   Cloudflare's own message.
//! * [`sync`] makes the zone match the names previews have: one create per name (found
//!   by hostname first, so a crash between Cloudflare's answer and the store's write
//!   never creates twice), one delete when the name goes; pending hostnames are looked
//!   at again on a schedule that starts at a few seconds and backs off to an hour. A
//!   name is live only when both `status` and `ssl.status` are `active`. Per name by
//!   default; with `wildcard`, one `*.<base>` per base instead (plans that allow it).
//!
//! What Cloudflare said is kept in the store's `saas` table (hostname → registration)
//! and shown in each preview's view and at `GET /v1/custom-hostnames`.

use crate::waker::{now_ms, Waker};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tracing::{info, warn};
use utoipa::ToSchema;
use wakegate_core::Millis;

const TABLE: &str = "saas";
/// Custom hostnames included in the plan before they are billed.
pub const INCLUDED: usize = 100;
/// The first re-check of a pending hostname, doubled each time up to [`MAX_RECHECK`].
const FIRST_RECHECK: Duration = Duration::from_secs(5);
const MAX_RECHECK: Duration = Duration::from_secs(3600);
/// Tries at one request (429s and 5xx).
const TRIES: u32 = 4;

/// Where and how to reach Cloudflare.
#[derive(Clone, Debug)]
pub struct SaasConfig {
    /// `https://api.cloudflare.com/client/v4`
    pub api: String,
    pub zone_id: String,
    pub token: String,
    /// One `*.<base>` custom hostname per base instead of one per name.
    pub wildcard: bool,
    /// How often the zone is brought in line.
    pub every: Duration,
}

/// A custom hostname as Cloudflare describes it.
#[derive(Clone, Debug, Deserialize)]
pub struct CustomHostname {
    pub id: String,
    pub hostname: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub ssl: Option<Ssl>,
    #[serde(default)]
    pub verification_errors: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Ssl {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub validation_errors: Vec<Message>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
    result: Option<T>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

#[derive(Deserialize)]
struct ApiMessage {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct ResultInfo {
    #[serde(default)]
    total_pages: u64,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum SaasError {
    #[error("Cloudflare answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("cannot reach Cloudflare: {0}")]
    Transport(String),
}

/// The custom-hostname endpoints.
pub struct Client {
    http: reqwest::Client,
    config: SaasConfig,
}

impl Client {
    pub fn new(config: SaasConfig) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Client { http, config }
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/zones/{}/custom_hostnames{rest}", self.config.api.trim_end_matches('/'), self.config.zone_id)
    }

    /// One request with the envelope unwrapped; 429 and 5xx are retried. `Ok(None)` is
    /// a 404.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<(T, Option<ResultInfo>)>, SaasError> {
        let mut wait = Duration::from_millis(500);
        for attempt in 1..=TRIES {
            let mut req = self.http.request(method.clone(), url).bearer_auth(&self.config.token);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req.send().await;
            let status = resp.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
            crate::record_call("cloudflare", status, None);
            let resp = match resp {
                Ok(r) => r,
                Err(e) if attempt < TRIES => {
                    warn!(error = %e, "Cloudflare request failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    continue;
                }
                Err(e) => return Err(SaasError::Transport(e.to_string())),
            };
            let status = resp.status().as_u16();
            if (status == 429 || status >= 500) && attempt < TRIES {
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s.min(60)));
                tokio::time::sleep(retry_after.unwrap_or(wait)).await;
                wait *= 2;
                continue;
            }
            if status == 404 {
                return Ok(None);
            }
            let text = resp.text().await.map_err(|e| SaasError::Transport(e.to_string()))?;
            let env: Envelope<T> = serde_json::from_str(&text)
                .map_err(|e| SaasError::Api { status, message: format!("unreadable answer ({e}): {:.200}", text) })?;
            if !(200..300).contains(&status) || !env.success {
                let message = env
                    .errors
                    .iter()
                    .map(|e| format!("{} (code {})", e.message, e.code))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(SaasError::Api { status, message });
            }
            return match env.result {
                Some(r) => Ok(Some((r, env.result_info))),
                None => Err(SaasError::Api { status, message: "no result".into() }),
            };
        }
        Err(SaasError::Transport("out of tries".into()))
    }

    pub async fn create(&self, hostname: &str) -> Result<CustomHostname, SaasError> {
        let body = serde_json::json!({ "hostname": hostname, "ssl": { "method": "http", "type": "dv" } });
        self.call(reqwest::Method::POST, &self.url(""), Some(body))
            .await?
            .map(|(h, _)| h)
            .ok_or_else(|| SaasError::Api { status: 404, message: "the zone was not found".into() })
    }

    pub async fn find(&self, hostname: &str) -> Result<Option<CustomHostname>, SaasError> {
        let url = self.url(&format!("?hostname={hostname}&per_page=50"));
        let found: Option<(Vec<CustomHostname>, _)> = self.call(reqwest::Method::GET, &url, None).await?;
        Ok(found.and_then(|(list, _)| list.into_iter().find(|h| h.hostname == hostname)))
    }

    pub async fn get(&self, id: &str) -> Result<Option<CustomHostname>, SaasError> {
        Ok(self.call(reqwest::Method::GET, &self.url(&format!("/{id}")), None).await?.map(|(h, _)| h))
    }

    /// Deletes; a hostname that is already gone is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), SaasError> {
        let _: Option<(serde_json::Value, _)> =
            self.call(reqwest::Method::DELETE, &self.url(&format!("/{id}")), None).await?;
        Ok(())
    }

    /// Every custom hostname of the zone, page by page.
    pub async fn list(&self) -> Result<Vec<CustomHostname>, SaasError> {
        let mut out = Vec::new();
        for page in 1..=10_000u64 {
            let url = self.url(&format!("?page={page}&per_page=50"));
            let Some((items, info)) = self.call::<Vec<CustomHostname>>(reqwest::Method::GET, &url, None).await? else {
                break;
            };
            let n = items.len();
            out.extend(items);
            if n == 0 || info.is_none_or(|i| page >= i.total_pages) {
                break;
            }
        }
        Ok(out)
    }
}

/// What Wakegate knows of one custom hostname.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Registration {
    pub hostname: String,
    /// Cloudflare's id, once created.
    pub id: Option<String>,
    /// Cloudflare's `status` (`pending`, `active`, `moved`, `blocked`, …).
    pub status: String,
    /// Cloudflare's `ssl.status` (`pending_validation`, `active`, …).
    pub ssl_status: String,
    /// What Cloudflare reports as wrong, if anything.
    pub errors: Vec<String>,
    /// Both statuses are `active`: visitors reach the preview here over HTTPS.
    pub live: bool,
    pub checked_at: Millis,
    pub next_check_at: Millis,
    pub checks: u32,
}

impl Registration {
    fn from(h: &CustomHostname, now: Millis, checks: u32) -> Registration {
        let ssl_status = h.ssl.as_ref().map(|s| s.status.clone()).unwrap_or_default();
        let mut errors = h.verification_errors.clone();
        if let Some(ssl) = &h.ssl {
            errors.extend(ssl.validation_errors.iter().map(|m| m.message.clone()));
        }
        let live = h.status == "active" && ssl_status == "active";
        let backoff = FIRST_RECHECK.saturating_mul(1 << checks.min(16)).min(MAX_RECHECK);
        Registration {
            hostname: h.hostname.clone(),
            id: Some(h.id.clone()),
            status: h.status.clone(),
            ssl_status,
            errors,
            live,
            checked_at: now,
            // live ones are looked at hourly (a certificate can lapse, a name move)
            next_check_at: now + if live { MAX_RECHECK } else { backoff }.as_millis() as Millis,
            checks,
        }
    }
}

/// Registrations by hostname.
pub async fn registrations(w: &Waker) -> BTreeMap<String, Registration> {
    match w.store.table_list(TABLE).await {
        Ok(rows) => rows.into_iter().filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|r| (k, r))).collect(),
        Err(e) => {
            warn!(error = %e, "reading custom hostname registrations");
            BTreeMap::new()
        }
    }
}

/// The Cloudflare name that covers `host`: itself, or its base's wildcard.
pub fn covering(host: &str, base: &str, wildcard: bool) -> String {
    if wildcard {
        format!("*.{base}")
    } else {
        host.to_string()
    }
}

/// The hostnames the zone should have: every preview's custom names (or their bases'
/// wildcards).
async fn desired(w: &Waker, wildcard: bool) -> Option<BTreeSet<String>> {
    let previews = w.store.list_previews().await.map_err(|e| warn!(error = %e, "listing previews")).ok()?;
    Some(
        previews
            .iter()
            .flat_map(|p| p.value.custom_hosts.iter().map(|h| covering(&h.host, &h.base, wildcard)))
            .collect(),
    )
}

async fn store(w: &Waker, r: &Registration) {
    if let Ok(json) = serde_json::to_string(r) {
        if let Err(e) = w.store.table_put(TABLE, &r.hostname, &json).await {
            warn!(hostname = %r.hostname, error = %e, "storing a custom hostname");
        }
    }
}

/// Drops a registration (the next pass registers the name again if it is still wanted).
async fn forget(w: &Waker, hostname: &str) {
    if let Err(e) = w.store.table_remove(TABLE, hostname).await {
        warn!(%hostname, error = %e, "forgetting a custom hostname; the next pass tries again");
    }
}

/// One pass: creates what is missing, deletes what is no longer wanted, looks at what
/// is due. Failures are logged and retried on the next pass.
pub async fn sync(w: &Waker, client: &Client) {
    let wildcard = client.config.wildcard;
    let Some(want) = desired(w, wildcard).await else { return };
    let have = registrations(w).await;
    let now = now_ms();
    for hostname in want.iter().filter(|h| !have.contains_key(*h)) {
        // found first: a create whose answer was lost is not made twice
        let made = match client.find(hostname).await {
            Ok(Some(h)) => Ok(h),
            Ok(None) => client.create(hostname).await,
            Err(e) => Err(e),
        };
        match made {
            Ok(h) => {
                info!(%hostname, status = %h.status, "custom hostname registered");
                store(w, &Registration::from(&h, now, 0)).await;
            }
            Err(e) => {
                warn!(%hostname, error = %e, "registering a custom hostname");
                // recorded, so the view says why; the next pass tries again
                store(
                    w,
                    &Registration {
                        hostname: hostname.clone(),
                        id: None,
                        status: "error".into(),
                        ssl_status: String::new(),
                        errors: vec![e.to_string()],
                        live: false,
                        checked_at: now,
                        next_check_at: now,
                        checks: 0,
                    },
                )
                .await;
            }
        }
    }
    for (hostname, r) in have.iter().filter(|(h, _)| !want.contains(*h)) {
        let id = match &r.id {
            Some(id) => Some(id.clone()),
            None => client.find(hostname).await.ok().flatten().map(|h| h.id),
        };
        let gone = match id {
            Some(id) => client.delete(&id).await,
            None => Ok(()),
        };
        match gone {
            Ok(()) => {
                info!(%hostname, "custom hostname deleted");
                forget(w, hostname).await;
            }
            Err(e) => warn!(%hostname, error = %e, "deleting a custom hostname"),
        }
    }
    for (hostname, r) in have.iter().filter(|(h, r)| want.contains(*h) && r.next_check_at <= now) {
        let Some(id) = &r.id else {
            // a failed registration: start over
            forget(w, hostname).await;
            continue;
        };
        match client.get(id).await {
            Ok(Some(h)) => {
                let next = Registration::from(&h, now, r.checks + 1);
                if next.live != r.live {
                    info!(%hostname, live = next.live, status = %next.status, ssl = %next.ssl_status, "custom hostname");
                }
                store(w, &next).await;
            }
            // deleted behind our back: register again on the next pass
            Ok(None) => forget(w, hostname).await,
            Err(e) => warn!(%hostname, error = %e, "checking a custom hostname"),
        }
    }
}

/// Runs [`sync`] every `config.every`, for as long as the task lives.
/// With several waker replicas, one of them does each pass.
pub async fn sync_loop(w: std::sync::Arc<Waker>, client: Client) {
    loop {
        if crate::orgs::my_turn(&w, "saas:sync", client.config.every).await {
            sync(&w, &client).await;
        }
        tokio::time::sleep(client.config.every).await;
    }
}
