//! The Hetzner Cloud API client: `hcloud`'s models over a transport that keeps to the
//! API's limits.
//!
//! `hcloud`'s generated functions drop response headers, so they cannot see
//! `RateLimit-Remaining`/`RateLimit-Reset`; this transport sends the same requests with
//! the same models and reads them. Behaviour:
//! * every response's `RateLimit-*` headers are remembered; when few requests are left,
//!   calls are paced to the refill rate instead of running into 429s;
//! * 429, 423 (locked by another action), 5xx and connection errors are retried with
//!   exponential backoff and jitter (`Retry-After` wins when sent);
//! * errors carry the API's envelope (`code`, `message`);
//! * lists follow `meta.pagination.next_page`;
//! * actions are polled until `success` or `error`, with a timeout.

use hcloud::models;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{debug, warn};
use wakegate_core::metrics as m;

/// The production endpoint.
pub const BASE_URL: &str = "https://api.hetzner.cloud/v1";

/// How the client paces, retries and waits.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub base_url: String,
    pub token: String,
    /// Attempts per request for retryable failures.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Requests kept in reserve: below this many remaining, calls are paced.
    pub reserve: u64,
    /// First wait before polling a running action; each later wait is 1.5× longer, up
    /// to `action_poll_max` (a 45 s snapshot costs 12 polls, not 45).
    pub action_poll: Duration,
    /// The longest wait between two polls of one action.
    pub action_poll_max: Duration,
    pub action_timeout: Duration,
    pub request_timeout: Duration,
}

impl ClientOptions {
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> ClientOptions {
        ClientOptions {
            base_url: base_url.into(),
            token: token.into(),
            max_attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            reserve: 20,
            action_poll: Duration::from_secs(1),
            action_poll_max: Duration::from_secs(5),
            action_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Hetzner API {status} {code}: {message}")]
    Api { status: u16, code: String, message: String },
    #[error("Hetzner API unreachable: {0}")]
    Transport(String),
    #[error("Hetzner action {id} ({command}) failed: {message}")]
    Action { id: i64, command: String, message: String },
    #[error("Hetzner action {id} ({command}) still running after {secs}s")]
    ActionTimeout { id: i64, command: String, secs: u64 },
}

impl ApiError {
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Api { status: 404, .. })
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Budget {
    limit: Option<u64>,
    remaining: Option<u64>,
    /// Unix seconds at which the budget is full again.
    reset: Option<u64>,
}

/// Requests made and retried, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub requests: u64,
    pub retries: u64,
    pub rate_limited: u64,
    pub paced: u64,
}

pub struct Client {
    http: reqwest::Client,
    opts: ClientOptions,
    budget: Mutex<Budget>,
    counters: Mutex<Counters>,
}

fn unix_now() -> u64 {
    crate::now_ms() / 1000
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    // 50%..100% of d
    d.mul_f64(0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0)
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Client, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(opts.request_timeout)
            .user_agent(concat!("wakegate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transport(e.to_string()))?;
        Ok(Client { http, opts, budget: Mutex::new(Budget::default()), counters: Mutex::new(Counters::default()) })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    pub fn counters(&self) -> Counters {
        *self.counters.lock().unwrap()
    }

    /// How long to hold the next request so the budget lasts until it resets.
    fn pace(&self) -> Option<Duration> {
        let b = *self.budget.lock().unwrap();
        let (Some(limit), Some(remaining), Some(reset)) = (b.limit, b.remaining, b.reset) else {
            return None;
        };
        if remaining > self.opts.reserve || limit == 0 {
            return None;
        }
        // the budget refills evenly: one request every 3600/limit seconds
        let per = Duration::from_secs_f64(3600.0 / limit as f64);
        let until_reset = Duration::from_secs(reset.saturating_sub(unix_now()));
        Some(per.mul_f64((self.opts.reserve - remaining + 1) as f64).min(until_reset))
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.opts.backoff_base.saturating_mul(1u32 << attempt.min(16));
        jitter(exp.min(self.opts.backoff_max))
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<(u16, bytes::Bytes), ApiError> {
        let url = format!("{}{}", self.opts.base_url.trim_end_matches('/'), path);
        let mut attempt = 0;
        loop {
            if let Some(wait) = self.pace() {
                self.counters.lock().unwrap().paced += 1;
                debug!(?wait, "pacing Hetzner API calls to the rate limit");
                tokio::time::sleep(wait).await;
            }
            self.counters.lock().unwrap().requests += 1;
            let mut req = self.http.request(method.clone(), &url).bearer_auth(&self.opts.token).query(query);
            if let Some(b) = body {
                req = req.json(b);
            }
            let (retry_after, err) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let h = resp.headers();
                    {
                        let mut b = self.budget.lock().unwrap();
                        b.limit = header_u64(h, "ratelimit-limit").or(b.limit);
                        b.remaining = header_u64(h, "ratelimit-remaining").or(b.remaining);
                        b.reset = header_u64(h, "ratelimit-reset").or(b.reset);
                        if let Some(r) = b.remaining {
                            metrics::gauge!(m::CLOUD_RATELIMIT_REMAINING, "api" => "hetzner").set(r as f64);
                        }
                    }
                    metrics::counter!(m::CLOUD_REQUESTS, "api" => "hetzner", "outcome" => m::cloud_outcome(status))
                        .increment(1);
                    let retry_after = header_u64(h, "retry-after").map(Duration::from_secs);
                    let bytes = resp.bytes().await.map_err(|e| ApiError::Transport(e.to_string()))?;
                    if status < 400 {
                        return Ok((status, bytes));
                    }
                    let (code, message) = match serde_json::from_slice::<models::ErrorResponse>(&bytes) {
                        Ok(e) => (e.error.code, e.error.message),
                        Err(_) => ("unknown".to_string(), String::from_utf8_lossy(&bytes).into_owned()),
                    };
                    let e = ApiError::Api { status, code, message };
                    if status == 429 {
                        self.counters.lock().unwrap().rate_limited += 1;
                        // out of budget: wait for at least one request's refill
                        let b = *self.budget.lock().unwrap();
                        let refill = b.limit.map(|l| Duration::from_secs_f64(3600.0 / l.max(1) as f64));
                        (retry_after.or(refill), e)
                    } else if status == 423 || status >= 500 {
                        (retry_after, e)
                    } else {
                        return Err(e);
                    }
                }
                Err(e) => {
                    metrics::counter!(m::CLOUD_REQUESTS, "api" => "hetzner", "outcome" => m::cloud_outcome(0))
                        .increment(1);
                    (None, ApiError::Transport(e.to_string()))
                }
            };
            attempt += 1;
            if attempt >= self.opts.max_attempts {
                return Err(err);
            }
            self.counters.lock().unwrap().retries += 1;
            let wait = retry_after.unwrap_or_default().max(self.backoff(attempt - 1));
            warn!(%method, path, error = %err, ?wait, attempt, "Hetzner API call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let (status, bytes) = self.send(method, path, query, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Api {
            status,
            code: "invalid_response".into(),
            message: format!("{path}: {e}"),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> Result<T, ApiError> {
        self.call::<T, ()>(reqwest::Method::GET, path, query, None).await
    }

    /// Every page of a list.
    async fn list<T: DeserializeOwned, R: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        split: impl Fn(R) -> (Vec<T>, models::Meta),
    ) -> Result<Vec<T>, ApiError> {
        let mut out = Vec::new();
        let mut page = 1;
        loop {
            let mut q = query.to_vec();
            q.push(("page", page.to_string()));
            q.push(("per_page", "50".into()));
            let (items, meta) = split(self.get::<R>(path, &q).await?);
            out.extend(items);
            match meta.pagination.next_page {
                Some(next) if next > page => page = next,
                _ => return Ok(out),
            }
        }
    }

    pub async fn servers(&self, label_selector: &str) -> Result<Vec<models::Server>, ApiError> {
        self.list("/servers", &[("label_selector", label_selector.to_string())], |r: models::ListServersResponse| {
            (r.servers, *r.meta)
        })
        .await
    }

    pub async fn server_by_name(&self, name: &str) -> Result<Option<models::Server>, ApiError> {
        let found = self
            .list("/servers", &[("name", name.to_string())], |r: models::ListServersResponse| (r.servers, *r.meta))
            .await?;
        Ok(found.into_iter().find(|s| s.name == name))
    }

    pub async fn create_server(
        &self,
        req: &models::CreateServerRequest,
    ) -> Result<models::CreateServerResponse, ApiError> {
        self.call(reqwest::Method::POST, "/servers", &[], Some(req)).await
    }

    pub async fn set_server_labels(
        &self,
        id: i64,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<(), ApiError> {
        let req = models::ReplaceServerRequest { labels: Some(labels), name: None };
        let _: models::ReplaceServerResponse =
            self.call(reqwest::Method::PUT, &format!("/servers/{id}"), &[], Some(&req)).await?;
        Ok(())
    }

    /// Deletes a server and waits for it; a missing server is not an error.
    pub async fn delete_server(&self, id: i64) -> Result<(), ApiError> {
        let path = format!("/servers/{id}");
        match self.call::<models::DeleteServerResponse, ()>(reqwest::Method::DELETE, &path, &[], None).await {
            Ok(r) => match r.action {
                Some(a) => self.wait(*a).await.map(|_| ()),
                None => Ok(()),
            },
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `poweron`, `poweroff` or `shutdown`; waits for the action.
    pub async fn server_action(&self, id: i64, action: &str) -> Result<(), ApiError> {
        let path = format!("/servers/{id}/actions/{action}");
        let r: models::PowerOnServerResponse = self.call(reqwest::Method::POST, &path, &[], None::<&()>).await?;
        self.wait(*r.action).await.map(|_| ())
    }

    /// Snapshots a server; returns the image once available.
    pub async fn create_snapshot(
        &self,
        id: i64,
        description: &str,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<i64, ApiError> {
        let req = models::CreateImageFromServerRequest {
            description: Some(description.to_string()),
            labels: Some(labels),
            r#type: Some(models::create_image_from_server_request::Type::Snapshot),
        };
        let path = format!("/servers/{id}/actions/create_image");
        let r: models::CreateImageFromServerResponse = self.call(reqwest::Method::POST, &path, &[], Some(&req)).await?;
        let image = r.image.ok_or_else(|| ApiError::Transport("create_image returned no image".into()))?;
        if let Some(a) = r.action {
            self.wait(*a).await?;
        }
        Ok(image.id)
    }

    pub async fn snapshots(&self, label_selector: &str) -> Result<Vec<models::Image>, ApiError> {
        self.list(
            "/images",
            &[("type", "snapshot".into()), ("label_selector", label_selector.to_string())],
            |r: models::ListImagesResponse| (r.images, *r.meta),
        )
        .await
    }

    /// Deletes an image; a missing image is not an error.
    pub async fn delete_image(&self, id: i64) -> Result<(), ApiError> {
        match self.send::<()>(reqwest::Method::DELETE, &format!("/images/{id}"), &[], None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn firewalls(&self, label_selector: &str) -> Result<Vec<models::Firewall>, ApiError> {
        self.list(
            "/firewalls",
            &[("label_selector", label_selector.to_string())],
            |r: models::ListFirewallsResponse| (r.firewalls, *r.meta),
        )
        .await
    }

    pub async fn create_firewall(&self, req: &models::CreateFirewallRequest) -> Result<models::Firewall, ApiError> {
        let r: models::CreateFirewallResponse = self.call(reqwest::Method::POST, "/firewalls", &[], Some(req)).await?;
        for a in r.actions.unwrap_or_default() {
            self.wait(a).await?;
        }
        r.firewall.map(|f| *f).ok_or_else(|| ApiError::Transport("create firewall returned no firewall".into()))
    }

    pub async fn set_firewall_rules(&self, id: i64, rules: Vec<models::Rule>) -> Result<(), ApiError> {
        let path = format!("/firewalls/{id}/actions/set_rules");
        let r: models::SetRulesResponse =
            self.call(reqwest::Method::POST, &path, &[], Some(&models::SetRulesRequest { rules })).await?;
        for a in r.actions {
            self.wait(a).await?;
        }
        Ok(())
    }

    /// Polls an action until it ends; its error is returned as [`ApiError::Action`].
    pub async fn wait(&self, action: models::Action) -> Result<models::Action, ApiError> {
        let deadline = tokio::time::Instant::now() + self.opts.action_timeout;
        let mut a = action;
        let mut pause = self.opts.action_poll;
        loop {
            match a.status {
                models::action::Status::Success => return Ok(a),
                models::action::Status::Error => {
                    let message = a.error.map(|e| format!("{}: {}", e.code, e.message)).unwrap_or_default();
                    return Err(ApiError::Action { id: a.id, command: a.command, message });
                }
                models::action::Status::Running => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::ActionTimeout {
                    id: a.id,
                    command: a.command,
                    secs: self.opts.action_timeout.as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = pause.mul_f64(1.5).min(self.opts.action_poll_max.max(self.opts.action_poll));
            let r: models::GetActionResponse = self.get(&format!("/actions/{}", a.id), &[]).await?;
            a = *r.action;
        }
    }
}

/// Parses the API's RFC 3339 timestamps (`2024-01-02T03:04:05+00:00`, `Z`, fractions)
/// into ms since the epoch.
pub fn parse_time(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { std::str::from_utf8(b.get(r)?).ok()?.parse().ok() };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut frac_ms = 0i64;
    if let Some(r) = rest.strip_prefix('.') {
        let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
        frac_ms = format!("{digits:0<3}")[..3].parse().ok()?;
        rest = &r[digits.len()..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // days-from-civil (H. Hinnant)
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn parses_api_timestamps() {
        assert_eq!(parse_time("1970-01-01T00:00:00+00:00"), Some(0));
        assert_eq!(parse_time("2016-01-30T23:55:00+00:00"), Some(1_454_198_100_000));
        assert_eq!(parse_time("2016-01-30T23:55:00Z"), Some(1_454_198_100_000));
        assert_eq!(parse_time("2016-01-31T01:55:00.25+02:00"), Some(1_454_198_100_250));
        assert_eq!(parse_time("2024-02-29T12:00:00+00:00"), Some(1_709_208_000_000));
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("2016-01-30T23:55:00"), None);
    }
}
