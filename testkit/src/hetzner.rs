//! A stateful fake of the Hetzner Cloud API (`/v1`) on 127.0.0.1, covering what
//! Wakegate's backend uses: servers (create, get, list, update, delete, power on/off,
//! shutdown, create_image), actions that take time and end in success or error, images
//! (snapshots), firewalls, label selectors, pagination, `RateLimit-*` headers and the
//! error envelope `{"error": {"code", "message", "details"}}`. Bodies follow the
//! published reference; `hcloud`'s models are the schema (a test deserializes every
//! kind of response with them).
//!
//! [`HetznerState`] is the model with an explicit clock: the HTTP server drives it with
//! wall time, the cost simulation drives it with simulated time. Faults can be injected:
//! 429s, 5xx, failing actions, slow actions, and a *crash* (the n-th mutating request
//! is carried out but its response never comes back).
//!
//! A server "boots" by running what its user data says: [`AgentVms`] finds the Wakegate
//! agent in the cloud-config, and runs it with a per-server directory as its disk
//! (copied into snapshots and back, so hibernation keeps the disk).

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::fake_api::Reply;

/// The largest user data Hetzner accepts.
pub const MAX_USER_DATA: usize = 32 * 1024;

/// How long actions take, in ms.
#[derive(Clone, Debug)]
pub struct Durations {
    pub create_server: u64,
    pub create_from_snapshot: u64,
    pub power_on: u64,
    pub shutdown: u64,
    pub power_off: u64,
    pub create_image: u64,
    pub delete_server: u64,
    pub firewall: u64,
}

impl Durations {
    /// Short, for tests on wall time.
    pub fn fast() -> Durations {
        Durations {
            create_server: 150,
            create_from_snapshot: 200,
            power_on: 80,
            shutdown: 60,
            power_off: 30,
            create_image: 150,
            delete_server: 40,
            firewall: 20,
        }
    }
}

#[derive(Clone, Debug)]
struct Server {
    id: i64,
    name: String,
    labels: BTreeMap<String, String>,
    status: &'static str,
    created: u64,
    image: Option<i64>,
    image_name: String,
    server_type: String,
    location: String,
    user_data: Option<String>,
    firewalls: Vec<i64>,
    locked: bool,
}

#[derive(Clone, Debug)]
struct Image {
    id: i64,
    description: String,
    labels: BTreeMap<String, String>,
    status: &'static str,
    created: u64,
    from: (i64, String),
}

#[derive(Clone, Debug)]
struct Firewall {
    id: i64,
    name: String,
    labels: BTreeMap<String, String>,
    rules: Vec<Value>,
    created: u64,
}

#[derive(Clone, Copy, Debug)]
enum Done {
    ServerRunning(i64),
    ServerOff(i64),
    ServerDeleted(i64),
    ImageAvailable(i64),
    Nothing,
}

#[derive(Clone, Debug)]
struct Action {
    id: i64,
    command: String,
    resource: (i64, &'static str),
    started: u64,
    finish_at: u64,
    status: &'static str,
    fail: bool,
    done: Done,
}

/// What a VM sees of its server when it boots.
#[derive(Clone, Debug)]
pub struct Boot {
    pub server_id: i64,
    pub name: String,
    pub user_data: Option<String>,
    /// The snapshot the server was created from, if any (its disk is that snapshot's).
    pub from_image: Option<i64>,
}

/// Something that happened to a VM, for the process that plays it.
#[derive(Clone, Debug)]
pub enum VmEvent {
    Boot(Boot),
    Halt(i64),
    Snapshot { server_id: i64, image_id: i64 },
    Deleted(i64),
    ImageDeleted(i64),
}

/// Injected faults; each counter is used up request by request.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// The next n requests get 429 `rate_limit_exceeded`.
    pub rate_limited: u32,
    /// The next n requests get 503 `unavailable`.
    pub unavailable: u32,
    /// The next action with this command ends in error.
    pub fail_action: Vec<String>,
    /// Added to every action's duration.
    pub slow_by_ms: u64,
    /// The n-th mutating request from now is carried out but never answered.
    pub crash_after_mutations: Option<u32>,
    /// The n-th mutating request from now is never answered nor carried out.
    pub crash_before_mutations: Option<u32>,
    /// Set when an injected crash happened.
    pub crashed: bool,
}

/// A record of billing: how long each server existed (Hetzner bills stopped servers in
/// full) and how long each snapshot was kept.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    pub server_ms: u64,
    /// Hours billed: every server's lifetime rounded up to whole hours.
    pub billed_server_hours: u64,
    pub snapshot_ms: u64,
    pub servers_created: u64,
}

/// The fake's state and rules, on an explicit clock.
pub struct HetznerState {
    next_id: i64,
    servers: BTreeMap<i64, Server>,
    images: BTreeMap<i64, Image>,
    firewalls: BTreeMap<i64, Firewall>,
    actions: BTreeMap<i64, Action>,
    pub durations: Durations,
    pub faults: Faults,
    /// Requests allowed per hour, refilled continuously.
    pub rate_limit: u32,
    rate_remaining: f64,
    rate_at: u64,
    pub meter: Meter,
    /// Every request with its time and query, in order.
    pub log: Vec<Call>,
    events: Vec<VmEvent>,
    /// When set (a random state), each action takes 0.75–1.5× its stated duration, as
    /// cloud timings vary; `None`: exactly the stated duration.
    pub jitter: Option<crate::Rng>,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    /// Answered 429.
    pub limited: bool,
}

impl Call {
    /// The request's `label_selector`, decoded.
    pub fn label_selector(&self) -> Option<String> {
        self.query.split('&').find_map(|kv| kv.strip_prefix("label_selector=")).and_then(decode)
    }
}

fn err(status: u16, code: &str, message: &str) -> (u16, Value) {
    (status, json!({"error": {"code": code, "message": message, "details": {}}}))
}

/// RFC 3339 in UTC from ms since the epoch.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // civil-from-days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Hetzner's label selector: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.
pub fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    for t in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let ok = if let Some((k, v)) = t.split_once("!=") {
            labels.get(k.trim()).is_none_or(|x| x != v.trim())
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            labels.get(k.trim()).is_some_and(|x| x == v.trim())
        } else if let Some((k, set)) = t.split_once(" notin ").or_else(|| t.split_once(" in ")) {
            let set = set.trim().strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or("bad set")?;
            let inside = labels.get(k.trim()).is_some_and(|x| set.split(',').any(|s| s.trim() == x));
            if t.contains(" notin ") {
                !inside
            } else {
                inside
            }
        } else if let Some(k) = t.strip_prefix('!') {
            !labels.contains_key(k.trim())
        } else if t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)) {
            labels.contains_key(t)
        } else {
            return Err(format!("invalid label selector {t:?}"));
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn labels_of(v: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return Ok(out) };
    let obj = v.as_object().ok_or("labels must be an object")?;
    for (k, v) in obj {
        let v = v.as_str().ok_or("label values must be strings")?;
        let valid =
            |s: &str, max: usize| s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if k.is_empty() || !valid(k.rsplit('/').next().unwrap_or(k), 63) || !valid(v, 63) {
            return Err(format!("invalid label {k}={v}"));
        }
        out.insert(k.clone(), v.to_string());
    }
    Ok(out)
}

impl HetznerState {
    pub fn new(durations: Durations) -> HetznerState {
        HetznerState {
            next_id: 1000,
            servers: BTreeMap::new(),
            images: BTreeMap::new(),
            firewalls: BTreeMap::new(),
            actions: BTreeMap::new(),
            durations,
            faults: Faults::default(),
            rate_limit: 3600,
            rate_remaining: 3600.0,
            rate_at: 0,
            meter: Meter::default(),
            log: Vec::new(),
            events: Vec::new(),
            jitter: None,
        }
    }

    /// Every request as "METHOD /path", in order.
    pub fn calls(&self) -> impl Iterator<Item = String> + '_ {
        self.log.iter().map(|c| format!("{} {}", c.method, c.path))
    }

    /// One occurrence of a stated duration (see [`HetznerState::jitter`]).
    fn vary(&mut self, ms: u64) -> u64 {
        self.jitter.as_mut().map_or(ms, |r| r.vary(ms))
    }

    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// Events for the VM player since the last call.
    pub fn take_events(&mut self) -> Vec<VmEvent> {
        std::mem::take(&mut self.events)
    }

    /// Servers that exist now, as (id, name, status, labels).
    pub fn servers(&self) -> Vec<(i64, String, String, BTreeMap<String, String>)> {
        self.servers.values().map(|s| (s.id, s.name.clone(), s.status.to_string(), s.labels.clone())).collect()
    }

    /// The snapshot a server was created from, if any.
    pub fn server_image(&self, id: i64) -> Option<i64> {
        self.servers.get(&id).and_then(|s| s.image)
    }

    /// Snapshots that exist now, as (id, labels).
    pub fn images(&self) -> Vec<(i64, BTreeMap<String, String>)> {
        self.images.values().map(|i| (i.id, i.labels.clone())).collect()
    }

    /// Firewalls as (id, name, rules).
    pub fn firewalls(&self) -> Vec<(i64, String, Vec<Value>)> {
        self.firewalls.values().map(|f| (f.id, f.name.clone(), f.rules.clone())).collect()
    }

    /// Firewalls applied to a server.
    pub fn server_firewalls(&self, id: i64) -> Vec<i64> {
        self.servers.get(&id).map(|s| s.firewalls.clone()).unwrap_or_default()
    }

    pub fn user_data(&self, id: i64) -> Option<String> {
        self.servers.get(&id).and_then(|s| s.user_data.clone())
    }

    /// Leaves only `n` requests in the rate-limit budget.
    pub fn drain_budget(&mut self, n: f64) {
        self.rate_remaining = n;
    }

    /// Deletes a server behind the provisioner's back (a lost machine).
    pub fn vanish(&mut self, id: i64, now: u64) {
        if self.servers.contains_key(&id) {
            self.remove_server(id, now);
        }
    }

    /// The earliest time an action finishes, for simulations that jump the clock.
    pub fn next_deadline(&self) -> Option<u64> {
        self.actions.values().filter(|a| a.status == "running").map(|a| a.finish_at).min()
    }

    /// Adds the billing of what still exists at `now` (call once at the end).
    pub fn close_meter(&mut self, now: u64) {
        let ids: Vec<i64> = self.servers.keys().copied().collect();
        for id in ids {
            self.remove_server(id, now);
        }
        for img in std::mem::take(&mut self.images).into_values() {
            self.meter.snapshot_ms += now.saturating_sub(img.created);
        }
    }

    fn remove_server(&mut self, id: i64, now: u64) {
        if let Some(s) = self.servers.remove(&id) {
            let lived = now.saturating_sub(s.created);
            self.meter.server_ms += lived;
            self.meter.billed_server_hours += lived.div_ceil(3_600_000).max(1);
            self.events.push(VmEvent::Deleted(id));
        }
    }

    /// Finishes the actions due by `now` and applies what they did.
    pub fn advance(&mut self, now: u64) {
        let due: Vec<i64> =
            self.actions.values().filter(|a| a.status == "running" && a.finish_at <= now).map(|a| a.id).collect();
        for id in due {
            let a = self.actions.get_mut(&id).expect("listed");
            a.status = if a.fail { "error" } else { "success" };
            let (fail, done) = (a.fail, a.done);
            match done {
                Done::ServerRunning(s) => {
                    if let Some(srv) = self.servers.get_mut(&s) {
                        srv.locked = false;
                        if fail {
                            srv.status = "off";
                        } else {
                            srv.status = "running";
                            let boot = Boot {
                                server_id: s,
                                name: srv.name.clone(),
                                user_data: srv.user_data.clone(),
                                from_image: srv.image.filter(|i| *i > 0),
                            };
                            self.events.push(VmEvent::Boot(boot));
                        }
                    }
                }
                Done::ServerOff(s) => {
                    if let Some(srv) = self.servers.get_mut(&s) {
                        srv.locked = false;
                        if !fail {
                            srv.status = "off";
                            self.events.push(VmEvent::Halt(s));
                        }
                    }
                }
                Done::ServerDeleted(s) => {
                    if !fail {
                        self.remove_server(s, now);
                    } else if let Some(srv) = self.servers.get_mut(&s) {
                        srv.locked = false;
                    }
                }
                Done::ImageAvailable(i) => {
                    if let Some(from) = self.images.get(&i).map(|img| img.from.0) {
                        if let Some(srv) = self.servers.get_mut(&from) {
                            srv.locked = false;
                        }
                    }
                    if fail {
                        self.images.remove(&i);
                    } else if let Some(img) = self.images.get_mut(&i) {
                        img.status = "available";
                    }
                }
                Done::Nothing => {}
            }
        }
    }

    fn action(&mut self, now: u64, command: &str, resource: (i64, &'static str), ms: u64, done: Done) -> i64 {
        let id = self.id();
        let fail = match self.faults.fail_action.iter().position(|c| c == command) {
            Some(i) => {
                self.faults.fail_action.remove(i);
                true
            }
            None => false,
        };
        let finish_at = now + self.vary(ms) + self.faults.slow_by_ms;
        let a =
            Action { id, command: command.into(), resource, started: now, finish_at, status: "running", fail, done };
        self.actions.insert(id, a);
        id
    }

    fn action_json(&self, id: i64) -> Value {
        let a = &self.actions[&id];
        let error = if a.status == "error" {
            json!({"code": "action_failed", "message": format!("{} failed (injected)", a.command)})
        } else {
            Value::Null
        };
        json!({
            "id": a.id, "command": a.command, "status": a.status,
            "progress": if a.status == "running" { 50 } else { 100 },
            "started": rfc3339(a.started),
            "finished": if a.status == "running" { Value::Null } else { json!(rfc3339(a.finish_at)) },
            "resources": [{"id": a.resource.0, "type": a.resource.1}],
            "error": error,
        })
    }

    fn server_json(&self, s: &Server) -> Value {
        let image = match s.image.and_then(|i| self.images.get(&i)) {
            Some(img) => self.image_json(img),
            None => json!({
                "id": 161547269, "type": "system", "status": "available", "name": s.image_name,
                "description": s.image_name, "image_size": null, "disk_size": 5, "created": "2024-04-25T00:00:00+00:00",
                "created_from": null, "bound_to": null, "os_flavor": "ubuntu", "os_version": "24.04",
                "rapid_deploy": true, "protection": {"delete": false}, "deprecated": null, "deleted": null,
                "labels": {}, "architecture": "x86"
            }),
        };
        // Hetzner's reverse-DNS name is `static.<ip reversed>.clients.your-server.de`; here
        // it is `localhost`, a name that resolves to the loopback address the agent uses
        json!({
            "id": s.id, "name": s.name, "status": s.status, "created": rfc3339(s.created),
            "public_net": {
                "ipv4": {"id": s.id + 7_000_000, "ip": "127.0.0.1", "blocked": false, "dns_ptr": "localhost"},
                "ipv6": {"id": s.id + 8_000_000, "ip": "::1/128", "blocked": false, "dns_ptr": []},
                "floating_ips": [],
                "firewalls": s.firewalls.iter().map(|f| json!({"id": f, "status": "applied"})).collect::<Vec<_>>(),
            },
            "private_net": [],
            "server_type": {
                "id": 104, "name": s.server_type, "description": s.server_type.to_uppercase(), "cores": 2,
                "memory": 4.0, "disk": 40.0, "deprecated": false, "deprecation": null, "storage_type": "local",
                "cpu_type": "shared", "architecture": "x86", "category": "cost_optimized",
                "prices": [{"location": s.location, "price_hourly": {"net": "0.0060", "gross": "0.0071"},
                    "price_monthly": {"net": "3.7900", "gross": "4.5101"}, "included_traffic": 21990232555520u64,
                    "price_per_tb_traffic": {"net": "1.0000", "gross": "1.1900"}}],
                "locations": [{"id": 1, "name": s.location, "deprecation": null}]
            },
            "location": {
                "id": 1, "name": s.location, "description": "Falkenstein DC Park 1", "country": "DE",
                "city": "Falkenstein", "latitude": 50.47612, "longitude": 12.370071, "network_zone": "eu-central"
            },
            "image": image, "iso": null, "rescue_enabled": false, "locked": s.locked, "backup_window": null,
            "outgoing_traffic": 0, "ingoing_traffic": 0, "included_traffic": 21990232555520u64,
            "protection": {"delete": false, "rebuild": false}, "labels": s.labels,
            "volumes": [], "load_balancers": [], "primary_disk_size": 40, "placement_group": null
        })
    }

    fn image_json(&self, i: &Image) -> Value {
        json!({
            "id": i.id, "type": "snapshot", "status": i.status, "name": null, "description": i.description,
            "image_size": 1.2, "disk_size": 40, "created": rfc3339(i.created),
            "created_from": {"id": i.from.0, "name": i.from.1}, "bound_to": null, "os_flavor": "ubuntu",
            "os_version": null, "rapid_deploy": false, "protection": {"delete": false}, "deprecated": null,
            "deleted": null, "labels": i.labels, "architecture": "x86"
        })
    }

    fn firewall_json(&self, f: &Firewall) -> Value {
        let applied: Vec<Value> = self
            .servers
            .values()
            .filter(|s| s.firewalls.contains(&f.id))
            .map(|s| json!({"type": "server", "server": {"id": s.id}}))
            .collect();
        let rules: Vec<Value> = f
            .rules
            .iter()
            .map(|r| {
                json!({
                    "direction": r["direction"], "protocol": r["protocol"], "port": r.get("port").cloned().unwrap_or(Value::Null),
                    "source_ips": r.get("source_ips").cloned().unwrap_or(json!([])),
                    "destination_ips": r.get("destination_ips").cloned().unwrap_or(json!([])),
                    "description": r.get("description").cloned().unwrap_or(Value::Null),
                })
            })
            .collect();
        json!({"id": f.id, "name": f.name, "labels": f.labels, "created": rfc3339(f.created), "rules": rules, "applied_to": applied})
    }

    fn refill(&mut self, now: u64) {
        let per_ms = f64::from(self.rate_limit) / 3_600_000.0;
        self.rate_remaining =
            (self.rate_remaining + now.saturating_sub(self.rate_at) as f64 * per_ms).min(f64::from(self.rate_limit));
        self.rate_at = self.rate_at.max(now);
    }

    fn reply(&self, now: u64, status: u16, body: Value) -> Reply {
        let remaining = self.rate_remaining.floor() as u64;
        let missing = f64::from(self.rate_limit) - self.rate_remaining;
        let reset = now / 1000 + (missing * 3600.0 / f64::from(self.rate_limit)).ceil() as u64;
        Reply {
            status,
            body,
            headers: vec![
                ("ratelimit-limit", self.rate_limit.to_string()),
                ("ratelimit-remaining", remaining.to_string()),
                ("ratelimit-reset", reset.to_string()),
            ],
            hang: false,
        }
    }

    /// Handles one request at `now`.
    pub fn handle(&mut self, now: u64, method: &str, path: &str, query: &str, body: &[u8]) -> Reply {
        self.advance(now);
        self.log.push(Call { at: now, method: method.into(), path: path.into(), query: query.into(), limited: false });
        self.refill(now);
        if self.faults.rate_limited > 0 || self.rate_remaining < 1.0 {
            if let Some(c) = self.log.last_mut() {
                c.limited = true;
            }
            self.faults.rate_limited = self.faults.rate_limited.saturating_sub(1);
            let (s, b) = err(429, "rate_limit_exceeded", "rate limit exceeded");
            return self.reply(now, s, b);
        }
        self.rate_remaining -= 1.0;
        if self.faults.unavailable > 0 {
            self.faults.unavailable -= 1;
            let (s, b) = err(503, "unavailable", "service temporarily unavailable");
            return self.reply(now, s, b);
        }
        let mutating = method != "GET";
        if mutating {
            if let Some(n) = self.faults.crash_before_mutations.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.faults.crash_before_mutations = None;
                    self.faults.crashed = true;
                    let mut r = self.reply(now, 503, Value::Null);
                    r.hang = true;
                    return r;
                }
            }
        }
        let (status, body) = self.route(now, method, path, query, body);
        let mut r = self.reply(now, status, body);
        if mutating && status < 400 {
            if let Some(n) = self.faults.crash_after_mutations.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.faults.crash_after_mutations = None;
                    self.faults.crashed = true;
                    r.hang = true;
                }
            }
        }
        r
    }

    fn route(&mut self, now: u64, method: &str, path: &str, query: &str, body: &[u8]) -> (u16, Value) {
        let q: HashMap<String, String> = query
            .split('&')
            .filter(|s| !s.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                Some((decode(k)?, decode(v)?))
            })
            .collect();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return err(400, "json_error", &format!("invalid JSON: {e}")),
            }
        };
        let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
        let id = |i: usize| parts.get(i).and_then(|s| s.parse::<i64>().ok());
        match (method, parts.as_slice()) {
            ("GET", ["servers"]) => {
                let found = self.servers.values().map(|s| (&s.labels, Some(s.name.as_str()), s));
                listing("servers", found, |s| self.server_json(s), &q)
            }
            ("POST", ["servers"]) => self.create_server(now, &body),
            ("GET", ["servers", _]) => match id(1).and_then(|i| self.servers.get(&i)) {
                Some(s) => (200, json!({"server": self.server_json(s)})),
                None => err(404, "not_found", "server not found"),
            },
            ("PUT", ["servers", _]) => {
                let Some(sid) = id(1).filter(|i| self.servers.contains_key(i)) else {
                    return err(404, "not_found", "server not found");
                };
                let labels = match body.get("labels").map(|l| labels_of(Some(l))) {
                    Some(Err(e)) => return err(400, "invalid_input", &e),
                    Some(Ok(l)) => Some(l),
                    None => None,
                };
                if let Some(n) = body.get("name").and_then(Value::as_str) {
                    if self.servers.values().any(|s| s.name == n && s.id != sid) {
                        return err(409, "uniqueness_error", "server name is already used");
                    }
                    self.servers.get_mut(&sid).expect("checked").name = n.to_string();
                }
                let s = self.servers.get_mut(&sid).expect("checked");
                if let Some(l) = labels {
                    s.labels = l;
                }
                let s = self.servers[&sid].clone();
                (200, json!({"server": self.server_json(&s)}))
            }
            ("DELETE", ["servers", _]) => {
                let Some(sid) = id(1).filter(|i| self.servers.contains_key(i)) else {
                    return err(404, "not_found", "server not found");
                };
                let s = self.servers.get_mut(&sid).expect("checked");
                s.status = "deleting";
                s.locked = true;
                let ms = self.durations.delete_server;
                let a = self.action(now, "delete_server", (sid, "server"), ms, Done::ServerDeleted(sid));
                self.events.push(VmEvent::Halt(sid));
                (200, json!({"action": self.action_json(a)}))
            }
            ("POST", ["servers", _, "actions", cmd]) => self.server_action(now, id(1), cmd, &body),
            ("GET", ["actions", _]) => match id(1).filter(|i| self.actions.contains_key(i)) {
                Some(a) => (200, json!({"action": self.action_json(a)})),
                None => err(404, "not_found", "action not found"),
            },
            ("GET", ["images"]) => {
                if q.get("type").is_some_and(|t| t != "snapshot") {
                    return page("images", Vec::new(), &q);
                }
                let found = self.images.values().map(|i| (&i.labels, None, i));
                listing("images", found, |i| self.image_json(i), &q)
            }
            ("GET", ["images", _]) => match id(1).and_then(|i| self.images.get(&i)) {
                Some(i) => (200, json!({"image": self.image_json(i)})),
                None => err(404, "not_found", "image not found"),
            },
            ("DELETE", ["images", _]) => match id(1).and_then(|i| self.images.remove(&i)) {
                Some(img) => {
                    self.meter.snapshot_ms += now.saturating_sub(img.created);
                    self.events.push(VmEvent::ImageDeleted(img.id));
                    (204, Value::Null)
                }
                None => err(404, "not_found", "image not found"),
            },
            ("GET", ["firewalls"]) => {
                let found = self.firewalls.values().map(|f| (&f.labels, Some(f.name.as_str()), f));
                listing("firewalls", found, |f| self.firewall_json(f), &q)
            }
            ("POST", ["firewalls"]) => {
                let Some(name) = body.get("name").and_then(Value::as_str) else {
                    return err(400, "invalid_input", "name is required");
                };
                if self.firewalls.values().any(|f| f.name == name) {
                    return err(409, "uniqueness_error", "firewall name is already used");
                }
                let labels = match labels_of(body.get("labels")) {
                    Ok(l) => l,
                    Err(e) => return err(400, "invalid_input", &e),
                };
                let rules = match check_rules(body.get("rules")) {
                    Ok(r) => r,
                    Err(e) => return err(400, "invalid_input", &e),
                };
                let fid = self.id();
                let f = Firewall { id: fid, name: name.into(), labels, rules, created: now };
                let v = self.firewall_json(&f);
                self.firewalls.insert(fid, f);
                (201, json!({"firewall": v, "actions": []}))
            }
            ("POST", ["firewalls", _, "actions", "set_rules"]) => {
                let Some(fid) = id(1).filter(|i| self.firewalls.contains_key(i)) else {
                    return err(404, "not_found", "firewall not found");
                };
                let rules = match check_rules(body.get("rules")) {
                    Ok(r) => r,
                    Err(e) => return err(400, "invalid_input", &e),
                };
                self.firewalls.get_mut(&fid).expect("checked").rules = rules;
                let ms = self.durations.firewall;
                let a = self.action(now, "set_firewall_rules", (fid, "firewall"), ms, Done::Nothing);
                (201, json!({"actions": [self.action_json(a)]}))
            }
            _ => err(404, "not_found", &format!("no route for {method} {path}")),
        }
    }

    fn create_server(&mut self, now: u64, body: &Value) -> (u16, Value) {
        let (Some(name), Some(server_type), Some(image)) = (
            body.get("name").and_then(Value::as_str),
            body.get("server_type").and_then(Value::as_str),
            body.get("image").and_then(Value::as_str),
        ) else {
            return err(400, "invalid_input", "name, server_type and image are required");
        };
        if name.is_empty() || name.len() > 63 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return err(400, "invalid_input", "name must be a valid hostname");
        }
        if self.servers.values().any(|s| s.name == name) {
            return err(409, "uniqueness_error", "server name is already used");
        }
        let labels = match labels_of(body.get("labels")) {
            Ok(l) => l,
            Err(e) => return err(400, "invalid_input", &e),
        };
        let user_data = body.get("user_data").and_then(Value::as_str).map(str::to_string);
        if user_data.as_ref().is_some_and(|u| u.len() > MAX_USER_DATA) {
            return err(400, "invalid_input", "user_data is longer than 32 KiB");
        }
        let mut firewalls = Vec::new();
        for f in body.get("firewalls").and_then(Value::as_array).into_iter().flatten() {
            match f.get("firewall").and_then(Value::as_i64) {
                Some(fid) if self.firewalls.contains_key(&fid) => firewalls.push(fid),
                _ => return err(400, "invalid_input", "unknown firewall"),
            }
        }
        let (image_id, ms) = match image.parse::<i64>() {
            Ok(iid) => match self.images.get(&iid) {
                Some(img) if img.status == "available" => (Some(iid), self.durations.create_from_snapshot),
                Some(_) => return err(409, "conflict", "image is not available yet"),
                None => return err(404, "not_found", "image not found"),
            },
            Err(_) => (None, self.durations.create_server),
        };
        let sid = self.id();
        let s = Server {
            id: sid,
            name: name.into(),
            labels,
            status: "initializing",
            created: now,
            image: image_id,
            image_name: image.into(),
            server_type: server_type.into(),
            location: body.get("location").and_then(Value::as_str).unwrap_or("fsn1").into(),
            user_data,
            firewalls,
            locked: true,
        };
        self.servers.insert(sid, s);
        self.meter.servers_created += 1;
        let a = self.action(now, "create_server", (sid, "server"), ms, Done::ServerRunning(sid));
        let s = self.servers[&sid].clone();
        (
            201,
            json!({"server": self.server_json(&s), "action": self.action_json(a), "next_actions": [], "root_password": null}),
        )
    }

    fn server_action(&mut self, now: u64, sid: Option<i64>, cmd: &str, body: &Value) -> (u16, Value) {
        let Some(sid) = sid.filter(|i| self.servers.contains_key(i)) else {
            return err(404, "not_found", "server not found");
        };
        if self.servers[&sid].locked {
            return err(423, "locked", "server is locked by another action");
        }
        let d = self.durations.clone();
        let (command, ms, done, status) = match cmd {
            "poweron" => ("start_server", d.power_on, Done::ServerRunning(sid), "starting"),
            "poweroff" => ("stop_server", d.power_off, Done::ServerOff(sid), "stopping"),
            "shutdown" => ("shutdown_server", d.shutdown, Done::ServerOff(sid), "stopping"),
            "create_image" => {
                let labels = match labels_of(body.get("labels")) {
                    Ok(l) => l,
                    Err(e) => return err(400, "invalid_input", &e),
                };
                if body.get("type").and_then(Value::as_str).is_some_and(|t| t != "snapshot" && t != "backup") {
                    return err(400, "invalid_input", "type must be snapshot or backup");
                }
                let iid = self.id();
                let name = self.servers[&sid].name.clone();
                let description = body.get("description").and_then(Value::as_str).unwrap_or("").to_string();
                let img = Image { id: iid, description, labels, status: "creating", created: now, from: (sid, name) };
                let v = self.image_json(&img);
                self.images.insert(iid, img);
                self.servers.get_mut(&sid).expect("checked").locked = true;
                self.events.push(VmEvent::Snapshot { server_id: sid, image_id: iid });
                let a = self.action(now, "create_image", (sid, "server"), d.create_image, Done::ImageAvailable(iid));
                return (201, json!({"image": v, "action": self.action_json(a)}));
            }
            _ => return err(404, "not_found", &format!("unknown action {cmd}")),
        };
        let s = self.servers.get_mut(&sid).expect("checked");
        s.locked = true;
        if matches!(done, Done::ServerRunning(_)) && s.status == "running" {
            s.locked = false;
            let a = self.action(now, command, (sid, "server"), 0, Done::Nothing);
            return (201, json!({"action": self.action_json(a)}));
        }
        s.status = status;
        let a = self.action(now, command, (sid, "server"), ms, done);
        (201, json!({"action": self.action_json(a)}))
    }
}

fn check_rules(v: Option<&Value>) -> Result<Vec<Value>, String> {
    let rules = v.and_then(Value::as_array).cloned().unwrap_or_default();
    for r in &rules {
        let dir = r.get("direction").and_then(Value::as_str).ok_or("rule needs a direction")?;
        let proto = r.get("protocol").and_then(Value::as_str).ok_or("rule needs a protocol")?;
        if !["in", "out"].contains(&dir) || !["tcp", "udp", "icmp", "esp", "gre"].contains(&proto) {
            return Err("invalid direction or protocol".into());
        }
        if ["tcp", "udp"].contains(&proto) && r.get("port").and_then(Value::as_str).is_none() {
            return Err("tcp and udp rules need a port".into());
        }
        let ips = if dir == "in" { "source_ips" } else { "destination_ips" };
        if r.get(ips).and_then(Value::as_array).is_none_or(|a| a.is_empty()) {
            return Err(format!("{ips} must not be empty"));
        }
    }
    Ok(rules)
}

/// A list endpoint: the items matching `label_selector` (and `name`, for resources that
/// have one), one page of them.
fn listing<'a, T: 'a>(
    key: &str,
    items: impl Iterator<Item = (&'a BTreeMap<String, String>, Option<&'a str>, &'a T)>,
    json: impl Fn(&T) -> Value,
    q: &HashMap<String, String>,
) -> (u16, Value) {
    let sel = q.get("label_selector").map(String::as_str).unwrap_or("");
    let mut out = Vec::new();
    for (labels, name, item) in items {
        match selector_matches(sel, labels) {
            Ok(true) if q.get("name").is_none_or(|n| Some(n.as_str()) == name) => out.push(json(item)),
            Ok(_) => {}
            Err(e) => return err(400, "invalid_input", &e),
        }
    }
    page(key, out, q)
}

fn page(key: &str, items: Vec<Value>, q: &HashMap<String, String>) -> (u16, Value) {
    let per_page = q.get("per_page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(25).clamp(1, 50);
    let page = q.get("page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(1).max(1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let slice: Vec<Value> = items.into_iter().skip((page - 1) * per_page).take(per_page).collect();
    let meta = json!({"pagination": {
        "page": page, "per_page": per_page, "total_entries": total, "last_page": last,
        "previous_page": if page > 1 { json!(page - 1) } else { Value::Null },
        "next_page": if page < last { json!(page + 1) } else { Value::Null },
    }});
    (200, json!({key: slice, "meta": meta}))
}

/// Percent-decodes a query value (`+` is a space).
pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Plays VMs: told when servers boot, halt, are snapshotted and deleted.
pub trait VmPlayer: Send + Sync + 'static {
    fn event(&self, event: VmEvent);
}

/// The fake served over HTTP on 127.0.0.1.
pub struct FakeHetzner {
    pub addr: SocketAddr,
    pub token: String,
    pub state: Arc<Mutex<HetznerState>>,
    /// Wakes the ticker: something may have changed the next deadline.
    changed: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
    ticker: tokio::task::JoinHandle<()>,
}

/// Wall time in ms since the epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

impl FakeHetzner {
    /// The fake on wall time.
    pub async fn start(durations: Durations, player: Arc<dyn VmPlayer>) -> FakeHetzner {
        FakeHetzner::start_with(HetznerState::new(durations), player, wall_ms).await
    }

    /// The fake on the given clock (ms since the epoch): a simulation passes one that
    /// follows tokio's paused clock. Actions end, and the player hears of it, exactly at
    /// their deadlines.
    pub async fn start_with(state: HetznerState, player: Arc<dyn VmPlayer>, clock: fn() -> u64) -> FakeHetzner {
        let token = "fake-hcloud-token-0123456789".to_string();
        let state = Arc::new(Mutex::new(state));
        state.lock().unwrap().rate_at = clock();
        let changed = Arc::new(tokio::sync::Notify::new());
        let ticker = {
            let (state, changed) = (state.clone(), changed.clone());
            let player = player.clone();
            tokio::spawn(async move {
                loop {
                    let (events, next) = {
                        let mut s = state.lock().unwrap();
                        s.advance(clock());
                        (s.take_events(), s.next_deadline())
                    };
                    for e in events {
                        player.event(e);
                    }
                    let wait = next.map_or(3_600_000, |at| at.saturating_sub(clock()));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(wait.max(1))) => {}
                        _ = changed.notified() => {}
                    }
                }
            })
        };
        let (addr, task) = {
            let (state, changed, token) = (state.clone(), changed.clone(), token.clone());
            crate::fake_api::serve(move |req| {
                let reply = if req.authorization.as_deref() != Some(&format!("Bearer {token}")) {
                    let (status, body) = err(401, "unauthorized", "unable to authenticate");
                    Reply { status, body, headers: vec![], hang: false }
                } else {
                    let reply = state.lock().unwrap().handle(clock(), &req.method, &req.path, &req.query, &req.body);
                    changed.notify_one();
                    reply
                };
                std::future::ready(reply)
            })
            .await
        };
        FakeHetzner { addr, token, state, changed, task, ticker }
    }

    /// The base URL that replaces `https://api.hetzner.cloud/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut HetznerState) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap());
        self.changed.notify_one();
        out
    }
}

impl Drop for FakeHetzner {
    fn drop(&mut self) {
        self.task.abort();
        self.ticker.abort();
    }
}

/// Runs the Wakegate agent a server's cloud-config installs, as that server: its disk
/// is `<root>/server-<id>/`, its public address 127.0.0.1, its HTTP port a free one.
pub struct AgentVms {
    root: PathBuf,
    /// Each running server's init ([`VM_INIT`]).
    running: Mutex<HashMap<i64, std::process::Child>>,
}

/// A fake VM's PID 1: a child subreaper that runs the agent, reaps whatever ends below
/// it, and on SIGTERM powers off, killing every process of the machine (including
/// those that made their own sessions, as PostgreSQL's backends do) and reaping them,
/// so nothing of a halted machine lingers: not even a zombie whose pid a database's
/// lock file names.
const VM_INIT: &str = r#"
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
me = os.getpid()

def parents():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out

def below():
    ps = parents()
    def mine(p, hops=0):
        while p in ps and hops < 64:
            p, hops = ps[p], hops + 1
            if p == me:
                return True
        return False
    return [p for p in ps if p != me and mine(p)]

def power_off(*_):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = below()
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.01)
    os._exit(0)

signal.signal(signal.SIGTERM, power_off)
log = open(sys.argv[1], "ab")
subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
while True:
    try:
        os.wait()
    except ChildProcessError:
        signal.pause()
"#;

impl AgentVms {
    pub fn new(root: PathBuf) -> Arc<AgentVms> {
        std::fs::create_dir_all(&root).unwrap();
        Arc::new(AgentVms { root, running: Mutex::new(HashMap::new()) })
    }

    fn disk(&self, server: i64) -> PathBuf {
        self.root.join(format!("server-{server}"))
    }

    fn image(&self, image: i64) -> PathBuf {
        self.root.join(format!("image-{image}"))
    }

    /// Powers the server off: its init kills and reaps everything on it, then exits.
    fn halt(&self, server: i64) {
        let Some(mut init) = self.running.lock().unwrap().remove(&server) else { return };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &init.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if !matches!(init.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = init.kill();
        let _ = init.wait();
    }

    fn boot(&self, b: &Boot) -> Result<(), String> {
        // a running machine does not boot again
        if let Some(init) = self.running.lock().unwrap().get_mut(&b.server_id) {
            if matches!(init.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let disk = self.disk(b.server_id);
        if let Some(img) = b.from_image {
            if !disk.exists() {
                copy_dir(&self.image(img), &disk)?;
            }
        }
        std::fs::create_dir_all(&disk).map_err(|e| e.to_string())?;
        let Some(ud) = &b.user_data else { return Ok(()) };
        let files = cloud_config_files(ud)?;
        let script = files.get(AGENT_PATH).ok_or("no agent in the user data")?;
        let mut config: Value =
            serde_json::from_slice(files.get(AGENT_CONFIG).ok_or("no agent config")?).map_err(|e| e.to_string())?;
        config["root"] = json!(disk.join("srv").to_string_lossy());
        config["port"] = json!(crate::free_port());
        config["db_port"] = json!(crate::free_port());
        config["host"] = json!("127.0.0.1");
        let etc = disk.join("etc");
        std::fs::create_dir_all(&etc).map_err(|e| e.to_string())?;
        std::fs::write(etc.join("agent.py"), script).map_err(|e| e.to_string())?;
        std::fs::write(etc.join("agent.json"), config.to_string()).map_err(|e| e.to_string())?;
        std::fs::write(etc.join("init.py"), VM_INIT).map_err(|e| e.to_string())?;
        let init = std::process::Command::new("python3")
            .arg(etc.join("init.py"))
            .arg(disk.join("agent.log"))
            .arg("python3")
            .arg(etc.join("agent.py"))
            .arg(etc.join("agent.json"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.running.lock().unwrap().insert(b.server_id, init);
        Ok(())
    }
}

/// Where Wakegate's cloud-config puts the agent and its configuration.
pub const AGENT_PATH: &str = "/usr/local/lib/wakegate/agent.py";
pub const AGENT_CONFIG: &str = "/etc/wakegate/agent.json";

/// The files a `#cloud-config` user data writes (JSON flavour of YAML, base64 or plain).
pub fn cloud_config_files(user_data: &str) -> Result<HashMap<String, Vec<u8>>, String> {
    let body = user_data.strip_prefix("#cloud-config\n").ok_or("user data is not a #cloud-config")?;
    let doc: Value = serde_json::from_str(body).map_err(|e| format!("cloud-config: {e}"))?;
    let mut out = HashMap::new();
    for f in doc.get("write_files").and_then(Value::as_array).into_iter().flatten() {
        let path = f.get("path").and_then(Value::as_str).ok_or("write_files entry without path")?;
        let content = f.get("content").and_then(Value::as_str).unwrap_or("");
        let bytes = match f.get("encoding").and_then(Value::as_str) {
            Some("b64" | "base64") => b64_decode(content)?,
            Some("gz+b64" | "gzip+b64" | "gz+base64" | "gzip+base64") => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&b64_decode(content)?[..]), &mut out)
                    .map_err(|e| format!("gzip: {e}"))?;
                out
            }
            _ => content.as_bytes().to_vec(),
        };
        out.insert(path.to_string(), bytes);
    }
    Ok(out)
}

fn b64_decode(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean).map_err(|e| format!("invalid base64: {e}"))
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<(), String> {
    if !from.exists() {
        return Ok(());
    }
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cp -a {} {} failed", from.display(), to.display()))
    }
}

impl VmPlayer for AgentVms {
    fn event(&self, event: VmEvent) {
        match event {
            VmEvent::Boot(b) => {
                if let Err(e) = self.boot(&b) {
                    eprintln!("fake VM {} did not boot: {e}", b.server_id);
                }
            }
            VmEvent::Halt(id) => self.halt(id),
            VmEvent::Snapshot { server_id, image_id } => {
                // a snapshot of a running server would be inconsistent; Wakegate shuts down first
                if let Err(e) = copy_dir(&self.disk(server_id), &self.image(image_id)) {
                    eprintln!("fake snapshot failed: {e}");
                }
            }
            VmEvent::Deleted(id) => {
                self.halt(id);
                let _ = std::fs::remove_dir_all(self.disk(id));
            }
            VmEvent::ImageDeleted(id) => {
                let _ = std::fs::remove_dir_all(self.image(id));
            }
        }
    }
}

impl Drop for AgentVms {
    fn drop(&mut self) {
        let ids: Vec<i64> = self.running.lock().unwrap().keys().copied().collect();
        for id in ids {
            self.halt(id);
        }
    }
}

/// A player that does nothing (servers boot into nothing).
pub struct NoVms;

impl VmPlayer for NoVms {
    fn event(&self, _: VmEvent) {}
}
