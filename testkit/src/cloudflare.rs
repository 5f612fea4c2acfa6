//! A stateful fake of Cloudflare for SaaS's custom-hostname endpoints
//! (`/client/v4/zones/{zone}/custom_hostnames`), following the published API: the
//! `{success, errors, messages, result}` envelope, `result_info` pagination
//! (`page`, `per_page` up to 50), a bearer token, validation errors (1411 invalid, 1406
//! duplicate), 404 for an unknown id, and 429 with `Retry-After` and `ratelimit`
//! headers when the test asks for it.
//!
//! Status transitions run on an explicit clock: a new hostname is `pending` with SSL
//! `pending_validation`; it becomes `active`/`active` once `activate_after` has passed
//! on the fake's clock (if set), or when the test calls [`CloudflareState::activate`].
//! The test can also move a hostname to `moved` or `blocked`, as Cloudflare does when its
//! DNS points elsewhere or it is on a block list.

use crate::fake_api::Reply;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// One custom hostname as the fake keeps it.
#[derive(Clone, Debug)]
pub struct Hostname {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub ssl_status: String,
    pub verification_errors: Vec<String>,
    pub created_at: u64,
}

#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
}

pub struct CloudflareState {
    pub zone: String,
    pub token: String,
    /// By id.
    pub hostnames: BTreeMap<String, Hostname>,
    /// Pending hostnames turn active this long after creation, on the fake's clock.
    pub activate_after: Option<u64>,
    /// Whether `*.` hostnames are accepted (an Enterprise plan's wildcard custom hostnames).
    pub wildcards: bool,
    /// The next this many requests get 429.
    pub limit_next: u32,
    pub log: Vec<Call>,
    next_id: u64,
}

fn envelope(result: Value) -> Value {
    json!({ "success": true, "errors": [], "messages": [], "result": result })
}

fn error(code: u32, message: &str) -> Value {
    json!({ "success": false, "errors": [{ "code": code, "message": message }], "messages": [], "result": null })
}

fn valid_hostname(h: &str, wildcards: bool) -> bool {
    let h = if wildcards { h.strip_prefix("*.").unwrap_or(h) } else { h };
    h.len() <= 253
        && h.split('.').count() >= 2
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl CloudflareState {
    pub fn new() -> CloudflareState {
        CloudflareState {
            zone: "023e105f4ecef8ad9ca31a8372d0c353".into(),
            token: "fake-cloudflare-token-0123456789".into(),
            hostnames: BTreeMap::new(),
            activate_after: None,
            wildcards: false,
            limit_next: 0,
            log: Vec::new(),
            next_id: 1,
        }
    }

    fn by_name(&mut self, hostname: &str) -> Option<&mut Hostname> {
        self.hostnames.values_mut().find(|h| h.hostname == hostname)
    }

    /// Certificate and hostname both active.
    pub fn activate(&mut self, hostname: &str) {
        let h = self.by_name(hostname).unwrap_or_else(|| panic!("no custom hostname {hostname}"));
        h.status = "active".into();
        h.ssl_status = "active".into();
        h.verification_errors.clear();
    }

    /// Any status, with the errors Cloudflare would report.
    pub fn set_status(&mut self, hostname: &str, status: &str, ssl_status: &str, errors: &[&str]) {
        let h = self.by_name(hostname).unwrap_or_else(|| panic!("no custom hostname {hostname}"));
        h.status = status.into();
        h.ssl_status = ssl_status.into();
        h.verification_errors = errors.iter().map(|e| e.to_string()).collect();
    }

    /// How many requests of `method` went to a path ending in `suffix`, answered with a
    /// 2xx.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        self.log.iter().filter(|c| c.method == method && c.path.ends_with(suffix) && c.status < 300).count()
    }

    fn advance(&mut self, now: u64) {
        if let Some(after) = self.activate_after {
            for h in self.hostnames.values_mut() {
                if h.status == "pending" && now >= h.created_at + after {
                    h.status = "active".into();
                    h.ssl_status = "active".into();
                }
            }
        }
    }

    fn json(h: &Hostname) -> Value {
        let mut ssl = json!({ "id": format!("ssl-{}", h.id), "type": "dv", "method": "http", "status": h.ssl_status });
        if h.ssl_status.contains("timed_out") || h.status == "blocked" {
            ssl["validation_errors"] = json!([{ "message": "certificate validation failed" }]);
        }
        json!({
            "id": h.id,
            "hostname": h.hostname,
            "status": h.status,
            "ssl": ssl,
            "verification_errors": h.verification_errors,
            "created_at": crate::hetzner::rfc3339(h.created_at),
        })
    }

    /// One request; `(status, headers, body)`.
    pub fn handle(
        &mut self,
        now: u64,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> (u16, Vec<(&'static str, String)>, Value) {
        self.advance(now);
        if self.limit_next > 0 {
            self.limit_next -= 1;
            let headers = vec![
                ("retry-after", "1".to_string()),
                ("ratelimit", "\"default\";r=0;t=1".to_string()),
                ("ratelimit-policy", "\"default\";q=1200;w=300".to_string()),
            ];
            return (429, headers, error(971, "Please wait and consider throttling your request speed"));
        }
        let prefix = format!("/client/v4/zones/{}/custom_hostnames", self.zone);
        let Some(rest) = path.strip_prefix(&prefix) else {
            return (404, vec![], error(7003, "Could not route to the requested path"));
        };
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), crate::hetzner::decode(v).unwrap_or_default()))
            .collect();
        match (method, rest) {
            ("POST", "") => {
                let req: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(_) => return (400, vec![], error(1411, "Invalid JSON body")),
                };
                let hostname = req["hostname"].as_str().unwrap_or("").to_string();
                if !valid_hostname(&hostname, self.wildcards) {
                    return (
                        400,
                        vec![],
                        error(1411, "Invalid custom hostname. Custom hostnames must be a valid hostname."),
                    );
                }
                if self.by_name(&hostname).is_some() {
                    return (409, vec![], error(1406, "Duplicate custom hostname found."));
                }
                let id = format!("{:032x}", self.next_id);
                self.next_id += 1;
                let h = Hostname {
                    id: id.clone(),
                    hostname,
                    status: "pending".into(),
                    ssl_status: "pending_validation".into(),
                    verification_errors: vec!["custom hostname does not CNAME to this zone.".into()],
                    created_at: now,
                };
                let out = Self::json(&h);
                self.hostnames.insert(id, h);
                (201, vec![], envelope(out))
            }
            ("GET", "") => {
                let per_page: usize = params.get("per_page").and_then(|v| v.parse().ok()).unwrap_or(20).clamp(5, 50);
                let page: usize = params.get("page").and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
                let all: Vec<&Hostname> = self
                    .hostnames
                    .values()
                    .filter(|h| params.get("hostname").is_none_or(|want| &h.hostname == want))
                    .collect();
                let total = all.len();
                let items: Vec<Value> =
                    all.iter().skip((page - 1) * per_page).take(per_page).map(|h| Self::json(h)).collect();
                let mut out = envelope(json!(items));
                out["result_info"] = json!({
                    "page": page,
                    "per_page": per_page,
                    "count": items.len(),
                    "total_count": total,
                    "total_pages": total.div_ceil(per_page).max(1),
                });
                (200, vec![], out)
            }
            ("GET", id) => match self.hostnames.get(id.trim_start_matches('/')) {
                Some(h) => (200, vec![], envelope(Self::json(h))),
                None => (404, vec![], error(1436, "The custom hostname was not found.")),
            },
            ("DELETE", id) => match self.hostnames.remove(id.trim_start_matches('/')) {
                Some(h) => (200, vec![], envelope(json!({ "id": h.id }))),
                None => (404, vec![], error(1436, "The custom hostname was not found.")),
            },
            _ => (405, vec![], error(10405, "Method not allowed")),
        }
    }
}

impl Default for CloudflareState {
    fn default() -> Self {
        CloudflareState::new()
    }
}

/// The fake on 127.0.0.1.
pub struct FakeCloudflare {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<CloudflareState>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeCloudflare {
    pub async fn start(state: CloudflareState, clock: fn() -> u64) -> FakeCloudflare {
        let state = Arc::new(Mutex::new(state));
        let (addr, task) = {
            let state = state.clone();
            crate::fake_api::serve(move |req| {
                let mut s = state.lock().unwrap();
                let (status, headers, body) = if req.authorization.as_deref() != Some(&format!("Bearer {}", s.token)) {
                    (403, vec![], error(10000, "Authentication error"))
                } else {
                    s.handle(clock(), &req.method, &req.path, &req.query, &req.body)
                };
                s.log.push(Call { method: req.method, path: req.path, query: req.query, status });
                std::future::ready(Reply { status, body, headers, hang: false })
            })
            .await
        };
        FakeCloudflare { addr, state, task }
    }

    /// The base URL that replaces `https://api.cloudflare.com/client/v4`.
    pub fn url(&self) -> String {
        format!("http://{}/client/v4", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut CloudflareState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

impl Drop for FakeCloudflare {
    fn drop(&mut self) {
        self.task.abort();
    }
}
