//! A week of previews, run by Wakegate's own waker and provisioner on simulated time:
//! what each way of sleeping costs in billed server-hours and Hetzner API requests,
//! and how long a visitor waits for a wake.
//!
//! What decides the cost is Wakegate's own code; only the visitors and the machines are
//! played. Each mode is one tokio runtime on a paused clock (time jumps to the next
//! timer whenever every task waits) running:
//! * the waker's router, called in process with signed edge requests and operator
//!   requests — previews are created, visited (route, wake, status long-poll, activity)
//!   and erased when their branch merges through the API the edge and forges use;
//! * the provisioner (job lanes, TTL and idle sweepers, reconciler, liveness) with
//!   the Hetzner backend and its API client, against the stateful fake Hetzner API
//!   over HTTP on 127.0.0.1, which bills each server from creation to deletion
//!   (stopped or not) and each snapshot by the GB-hour;
//! * the agent endpoint, which simulated machines call as the real agent does: after
//!   the boot they ask for work and report ready once the app would be up.
//!
//! Played, not run: the visitor's side of the edge and splash page (one route lookup, a
//! wake, status long-polls, one activity report per visit; no route cache or hold), and
//! the agent (`agent.py`). A round trip over loopback may let the paused clock jump to
//! the next timer (at most the job lanes' 0.5 s poll), so wake times can read up to a
//! few seconds high and vary slightly from run to run.
//!
//! The fake's action durations are the stated Hetzner timings, each occurrence 0.75–1.5×.
//! Every request the provisioner sends to the fake is counted, listings included.

use crate::workload::{plan, Plan, Rng, Timings, Workload, DAY, HOUR, MIN};
use axum::body::Body;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use tower::ServiceExt;
use wakegate_core::sign::{self, Key};
use wakegate_provisioner::agent_api::AgentApi;
use wakegate_provisioner::hetzner::{api::ClientOptions, HetznerCloud, HetznerSettings, CLOUDFLARE_RANGES};
use wakegate_provisioner::runner::Provisioner;
use wakegate_provisioner::Settings;
use wakegate_store::{now_ms, EmbeddedStore, SharedStore};
use wakegate_testkit::hetzner::{cloud_config_files, Call, Durations, FakeHetzner, HetznerState, VmEvent, VmPlayer};
use wakegate_waker::refs::RefChecker;
use wakegate_waker::{Waker, WakerConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Never sleeps; erased when the branch merges.
    AlwaysOn,
    /// Powered off when idle (still billed); erased when the branch merges.
    Stop,
    /// Powered off when idle, and erased after the TTL.
    StopTtl,
    /// Snapshot + delete when idle; erased after the TTL.
    HibernateTtl,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::AlwaysOn, Mode::Stop, Mode::StopTtl, Mode::HibernateTtl];

    pub fn name(self) -> &'static str {
        match self {
            Mode::AlwaysOn => "always-on",
            Mode::Stop => "stop",
            Mode::StopTtl => "stop + TTL",
            Mode::HibernateTtl => "hibernate + TTL",
        }
    }

    /// The project as an operator creates it for this mode.
    fn project(self, w: &Workload) -> Value {
        // the API's largest values stand for "never" within a week
        let (idle, ttl_hours, sleep_mode) = match self {
            Mode::AlwaysOn => (30 * 24 * 3600, 8760.0, "stop"),
            Mode::Stop => (w.idle_timeout / 1000, 8760.0, "stop"),
            Mode::StopTtl => (w.idle_timeout / 1000, w.ttl as f64 / HOUR as f64, "stop"),
            Mode::HibernateTtl => (w.idle_timeout / 1000, w.ttl as f64 / HOUR as f64, "hibernate"),
        };
        json!({
            "name": "sim",
            "git_url": "https://git.example.com/acme/shop.git",
            "ttl_hours": ttl_hours,
            "idle_timeout_secs": idle,
            "machine": {"sleep_mode": sleep_mode},
        })
    }
}

/// What one mode cost.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub previews: usize,
    pub visits: usize,
    pub billed_server_hours: u64,
    pub server_hours: f64,
    pub snapshot_gb_hours: f64,
    pub servers_created: u64,
    /// Waits of visits that found the preview asleep or waking (ms), sorted.
    pub wake_waits: Vec<u64>,
    /// Visits that found the preview erased by the TTL (a rebuild is offered).
    pub after_ttl: usize,
    /// Visits that got to the end of what they did (the rest were cut off by the end).
    pub finished: usize,
    /// Visits that found the preview failed, or whose wake never finished: what they saw.
    pub failed: Vec<String>,
    /// Requests the provisioner sent to the Hetzner API.
    pub api_requests: usize,
    /// Of those, the reconciler's listing requests (every managed server and snapshot:
    /// two or more a listing).
    pub api_listings: usize,
    /// Of those, action polls (`GET /actions/{id}`).
    pub api_action_polls: usize,
    /// The most requests in one simulated hour, and which hour (from the start).
    pub api_peak_hour: usize,
    pub api_peak_at: u64,
    /// Requests answered 429 (over the hourly allowance).
    pub api_rate_limited: usize,
    /// Servers and snapshots at the end that no preview's state holds.
    pub orphans: usize,
}

impl Outcome {
    pub fn wake_pct(&self, p: f64) -> Option<u64> {
        if self.wake_waits.is_empty() {
            return None;
        }
        let i = ((self.wake_waits.len() as f64 - 1.0) * p).round() as usize;
        Some(self.wake_waits[i])
    }

    pub fn api_per_hour(&self, days: u64) -> f64 {
        self.api_requests as f64 / (days.max(1) * 24) as f64
    }
}

/// Every ref exists: what a forge says of a branch is not what this measures.
struct EveryRef;

#[async_trait::async_trait]
impl RefChecker for EveryRef {
    async fn exists(&self, _: &str, _: &str) -> Result<bool, String> {
        Ok(true)
    }
}

/// Machines that boot, then act as the Wakegate agent does: ask the control plane for
/// work until they get some (a pool machine waits), build or start the app, report ready.
struct SimVms {
    t: Timings,
    agent: OnceLock<SocketAddr>,
    rng: Mutex<Rng>,
    /// The agent task of each running server.
    running: Mutex<HashMap<i64, tokio::task::AbortHandle>>,
    /// Machines whose app is built (a snapshot keeps it, so a restore is a restart).
    built: Arc<Mutex<HashSet<String>>>,
}

impl VmPlayer for SimVms {
    fn event(&self, event: VmEvent) {
        match event {
            VmEvent::Boot(b) => {
                let Some(agent) = self.agent.get().copied() else { return };
                let Some(config) = b.user_data.as_deref().and_then(|ud| cloud_config_files(ud).ok()).and_then(|f| {
                    serde_json::from_slice::<Value>(f.get(wakegate_testkit::hetzner::AGENT_CONFIG)?).ok()
                }) else {
                    return;
                };
                let machine = config["machine"].as_str().unwrap_or_default().to_string();
                let token = config["token"].as_str().unwrap_or_default().to_string();
                let (boot, deploy, start) = {
                    let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
                    (rng.vary(self.t.boot), rng.vary(self.t.first_deploy), rng.vary(self.t.app_start))
                };
                let built = self.built.clone();
                let task = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(boot)).await;
                    agent_life(agent, &machine, &token, &built, deploy, start).await;
                });
                if let Some(old) =
                    self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(b.server_id, task.abort_handle())
                {
                    old.abort();
                }
            }
            VmEvent::Halt(id) | VmEvent::Deleted(id) => {
                if let Some(task) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    task.abort();
                }
            }
            VmEvent::Snapshot { .. } | VmEvent::ImageDeleted(_) => {}
        }
    }
}

/// The agent on a booted machine (see `provisioner/src/hetzner/agent.py`).
async fn agent_life(
    agent: SocketAddr,
    machine: &str,
    token: &str,
    built: &Mutex<HashSet<String>>,
    deploy: u64,
    start: u64,
) {
    let auth = format!("Bearer {token}");
    let headers = [("x-wakegate-machine", machine), ("authorization", auth.as_str())];
    loop {
        match wakegate_testkit::http::send(agent, "GET", "control", "/v1/agent/work", &headers, "").await {
            Ok(r) if r.status == 200 => break,
            Ok(r) if r.status == 410 => return,
            Ok(r) => {
                let wait = r.header("retry-after").and_then(|v| v.parse::<f64>().ok()).unwrap_or(5.0);
                tokio::time::sleep(Duration::from_secs_f64(wait.clamp(1.0, 60.0))).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(5)).await,
        }
    }
    let first = !built.lock().unwrap_or_else(|e| e.into_inner()).contains(machine);
    tokio::time::sleep(Duration::from_millis(if first { deploy } else { start })).await;
    let body = json!({"port": 80}).to_string();
    let mut headers = headers.to_vec();
    headers.push(("content-type", "application/json"));
    for _ in 0..10 {
        if let Ok(r) =
            wakegate_testkit::http::send(agent, "POST", "control", "/v1/agent/ready", &headers, body.clone()).await
        {
            if r.status == 204 {
                built.lock().unwrap_or_else(|e| e.into_inner()).insert(machine.to_string());
            }
            if r.status < 500 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The waker's API, called in process as the edge and an operator call it.
struct Api {
    router: axum::Router,
    edge_key: Key,
    operator_token: String,
    nonce: AtomicU64,
}

const EDGE_KEY: &[u8] = b"simulated-edge-key-0123456789abcdef";
const OPERATOR_TOKEN: &str = "simulated-operator-token";

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>, edge: bool) -> (u16, Value) {
        let raw = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = http::Request::builder().method(method).uri(path).header("content-type", "application/json");
        if edge {
            let nonce = format!("sim{}", self.nonce.fetch_add(1, Ordering::Relaxed));
            let digest = sign::body_digest(raw.as_bytes());
            let sig = sign::sign(&self.edge_key, method, path, &digest, now_ms(), &nonce);
            req = req.header(sign::SIGNATURE_HEADER, sig);
        } else {
            req = req.header("authorization", format!("Bearer {}", self.operator_token));
        }
        let Ok(req) = req.body(Body::from(raw)) else { return (0, Value::Null) };
        let Ok(resp) = self.router.clone().oneshot(req).await;
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn edge(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, body, true).await
    }

    async fn operator(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, body, false).await
    }
}

#[derive(Default)]
struct Visits {
    count: usize,
    /// Visits that got to the end of what they did.
    finished: usize,
    wake_waits: Vec<u64>,
    after_ttl: usize,
    failed: Vec<String>,
}

/// Longest a visitor waits for a wake before it counts as failed.
const GIVE_UP: Duration = Duration::from_secs(30 * 60);

/// One visit, as the edge and the splash page make it: look the host up; a running app
/// is used (activity reported); an asleep one is woken and waited for.
async fn visit(api: Arc<Api>, host: String, visits: Arc<Mutex<Visits>>) {
    visit_once(&api, &host, &visits).await;
    visits.lock().unwrap_or_else(|e| e.into_inner()).finished += 1;
}

async fn visit_once(api: &Api, host: &str, visits: &Mutex<Visits>) {
    let began = Instant::now();
    let record = |f: &dyn Fn(&mut Visits)| f(&mut visits.lock().unwrap_or_else(|e| e.into_inner()));
    let fail = |what: String| visits.lock().unwrap_or_else(|e| e.into_inner()).failed.push(what);
    record(&|v| v.count += 1);
    let (status, mut route) = api.edge("GET", &format!("/v1/edge/route?host={host}"), None).await;
    if status != 200 {
        return fail(format!("route {host}: {status} {route}"));
    }
    let state = |r: &Value| r["status"]["state"].as_str().unwrap_or_default().to_string();
    match state(&route).as_str() {
        "running" | "building" => {}
        "erased" => return record(&|v| v.after_ttl += 1),
        "sleeping" | "waking" => {
            if state(&route) == "sleeping" {
                let (s, _) = api.edge("POST", "/v1/edge/wake", Some(json!({ "host": host }))).await;
                if s != 202 {
                    return fail(format!("wake {host}: {s}"));
                }
            }
            // the splash page long-polls the status until the app answers
            loop {
                if began.elapsed() > GIVE_UP {
                    return fail(format!("{host}: not awake after {GIVE_UP:?}: {route}"));
                }
                let after = route["version"].as_u64().unwrap_or(0);
                let path = format!("/v1/edge/status?host={host}&after={after}&wait=25000");
                let (s, r) = api.edge("GET", &path, None).await;
                if s != 200 {
                    return fail(format!("status {host}: {s} {r}"));
                }
                route = r;
                match state(&route).as_str() {
                    "running" => break,
                    "sleeping" | "waking" => {}
                    // the branch merged while the visitor waited: the page says so
                    "erased" if route["status"]["reason"] == "manual" => return,
                    _ => return fail(format!("waking {host} ended in {route}")),
                }
            }
            let waited = began.elapsed().as_millis() as u64;
            record(&|v| v.wake_waits.push(waited));
        }
        _ => return fail(format!("visit {host}: {route}")),
    }
    // the page is used: the edge reports activity
    api.edge("POST", "/v1/edge/activity", Some(json!({ "hosts": [host] }))).await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive,
    Visit,
    Merge,
}

const PREVIEW_BASE: &str = "preview.localhost";

/// Runs the week in one mode. Needs a current-thread runtime on a paused clock
/// ([`run_mode`] makes one).
pub async fn simulate(w: &Workload, t: &Timings, mode: Mode, plans: &[Plan]) -> anyhow::Result<Outcome> {
    let store: SharedStore = Arc::new(EmbeddedStore::in_memory());
    let mut hetzner = HetznerState::new(Durations {
        create_server: t.create,
        create_from_snapshot: t.create_from_snapshot,
        power_on: t.power_on,
        shutdown: t.shutdown,
        power_off: t.shutdown,
        create_image: t.snapshot,
        delete_server: t.delete,
        firewall: 1_000,
    });
    hetzner.rate_limit = 3600;
    hetzner.jitter = Some(Rng::new(w.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let vms = Arc::new(SimVms {
        t: t.clone(),
        agent: OnceLock::new(),
        rng: Mutex::new(Rng::new(w.seed.wrapping_add(0x5EED))),
        running: Mutex::default(),
        built: Arc::default(),
    });
    let fake = FakeHetzner::start_with(hetzner, vms.clone(), now_ms).await;
    let machine_key = Key::new(b"simulated-machine-key-0123456789".to_vec());
    let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent_addr = agent_listener.local_addr()?;
    let settings = Settings { preview_url_template: format!("http://{{label}}.{PREVIEW_BASE}"), ..Settings::default() };
    let cloud = Arc::new(HetznerCloud::new(
        HetznerSettings {
            api: ClientOptions::new(fake.url(), fake.token.clone()),
            image: "ubuntu-24.04".into(),
            server_type: "cx22".into(),
            location: "fsn1".into(),
            control_url: format!("http://{agent_addr}"),
            control_plane_ips: vec!["203.0.113.10/32".into()],
            edge_ranges: CLOUDFLARE_RANGES.iter().map(|s| s.to_string()).collect(),
            app_port: 80,
            pools: Vec::new(),
            ready_timeout: Duration::from_secs(900),
            shutdown_timeout: Duration::from_secs(60),
        },
        store.clone(),
        machine_key.clone(),
    )?);
    let agent_api = Arc::new(AgentApi {
        store: store.clone(),
        cloud: cloud.clone(),
        key: machine_key,
        retry_after: "5".into(),
        preview_url_template: settings.preview_url_template.clone(),
        dumps: None,
        db_images: false,
    });
    let agent_task = tokio::spawn(wakegate_provisioner::agent_api::serve(agent_listener, agent_api));
    let _ = vms.agent.set(agent_addr);
    let provisioner = Arc::new(Provisioner::new(store.clone(), cloud, settings.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks = provisioner.spawn_all(stop_rx);
    let waker = Arc::new(Waker::new(
        store.clone(),
        WakerConfig {
            edge_key: Key::new(EDGE_KEY.to_vec()),
            operator_token: OPERATOR_TOKEN.into(),
            preview_base: PREVIEW_BASE.into(),
            preview_url_template: settings.preview_url_template.clone(),
        },
        Arc::new(EveryRef),
    ));
    let api = Arc::new(Api {
        router: wakegate_waker::router(waker),
        edge_key: Key::new(EDGE_KEY.to_vec()),
        operator_token: OPERATOR_TOKEN.into(),
        nonce: AtomicU64::new(0),
    });
    let (s, body) = api.operator("POST", "/v1/projects", Some(mode.project(w))).await;
    anyhow::ensure!(s == 201, "creating the project: {s} {body}");

    // the API requests of each simulated hour
    let epoch = now_ms();

    let mut events: Vec<(u64, Ev, usize)> = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        events.push((p.arrive, Ev::Arrive, i));
        events.extend(p.visits.iter().map(|v| (*v, Ev::Visit, i)));
        if let Some(m) = p.merged {
            events.push((m, Ev::Merge, i));
        }
    }
    events.sort();
    let end = w.days * DAY;
    let t0 = Instant::now();
    let visits = Arc::new(Mutex::new(Visits::default()));
    let mut previews: Vec<Option<(String, String)>> = vec![None; plans.len()];
    let mut visitors = tokio::task::JoinSet::new();
    for (at, ev, i) in events {
        if at > end {
            break;
        }
        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
        match ev {
            Ev::Arrive => {
                let body = json!({ "ref": format!("feature/change-{i}") });
                let (s, v) = api.operator("POST", "/v1/projects/sim/previews", Some(body)).await;
                anyhow::ensure!(s == 201, "creating preview {i}: {s} {v}");
                let id = v["id"].as_str().unwrap_or_default().to_string();
                let host = v["host"].as_str().unwrap_or_default().to_string();
                previews[i] = Some((id, host));
            }
            Ev::Visit => {
                if let Some((_, host)) = &previews[i] {
                    visitors.spawn(visit(api.clone(), host.clone(), visits.clone()));
                }
            }
            Ev::Merge => {
                if let Some((id, _)) = &previews[i] {
                    // the forge says the branch merged: the preview is erased
                    let (s, v) = api.operator("POST", &format!("/v1/previews/{id}/erase"), None).await;
                    anyhow::ensure!(s == 202 || s == 409, "erasing preview {i}: {s} {v}");
                }
            }
        }
        while visitors.try_join_next().is_some() {}
    }
    tokio::time::sleep_until(t0 + Duration::from_millis(end)).await;
    visitors.abort_all();
    // everything in the cloud belongs to a preview
    let mut held = HashSet::new();
    for p in store.list_previews().await? {
        held.extend(p.value.state.machines().into_iter().cloned());
    }
    let orphans = fake.with(|h| {
        let loose = |labels: &std::collections::BTreeMap<String, String>| {
            !labels.get("machine").is_some_and(|m| held.contains(m))
        };
        h.servers().iter().filter(|s| loose(&s.3)).count() + h.images().iter().filter(|i| loose(&i.1)).count()
    });
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }
    agent_task.abort();
    let now = now_ms();
    let mut out = fake.with(|h| {
        h.advance(now);
        h.close_meter(now);
        let count = |f: &dyn Fn(&Call) -> bool| h.log.iter().filter(|c| f(c)).count();
        let mut hours: HashMap<u64, usize> = HashMap::new();
        for c in &h.log {
            *hours.entry(c.at.saturating_sub(epoch) / HOUR).or_default() += 1;
        }
        Outcome {
            billed_server_hours: h.meter.billed_server_hours,
            server_hours: h.meter.server_ms as f64 / HOUR as f64,
            snapshot_gb_hours: h.meter.snapshot_ms as f64 / HOUR as f64 * SNAPSHOT_GB,
            servers_created: h.meter.servers_created,
            api_requests: h.log.len(),
            api_listings: count(&|c| c.method == "GET" && c.label_selector().as_deref() == Some("managed-by=wakegate")),
            api_action_polls: count(&|c| c.method == "GET" && c.path.starts_with("/v1/actions/")),
            api_peak_hour: hours.values().copied().max().unwrap_or(0),
            api_peak_at: hours.iter().max_by_key(|(h, n)| (**n, std::cmp::Reverse(**h))).map_or(0, |(h, _)| *h),
            api_rate_limited: count(&|c| c.limited),
            ..Outcome::default()
        }
    });
    let v = std::mem::take(&mut *visits.lock().unwrap_or_else(|e| e.into_inner()));
    out.previews = plans.len();
    out.visits = v.count;
    out.wake_waits = v.wake_waits;
    out.wake_waits.sort_unstable();
    out.after_ttl = v.after_ttl;
    out.finished = v.finished;
    out.failed = v.failed;
    out.orphans = orphans;
    Ok(out)
}

/// Runs one mode on its own paused clock.
pub fn run_mode(w: &Workload, t: &Timings, mode: Mode, plans: &[Plan]) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?;
    rt.block_on(simulate(w, t, mode, plans))
}

/// Size of a preview's snapshot.
pub const SNAPSHOT_GB: f64 = 3.0;
/// cx22: €0.0074 per hour (≈ €4.59 a month cap), snapshots €0.011 per GB-month.
pub const EUR_PER_SERVER_HOUR: f64 = 0.0074;
pub const EUR_PER_GB_MONTH: f64 = 0.011;

/// An hour of the simulated week (it starts on a Monday at 00:00), e.g. `Tue 18:00`.
fn hour_name(h: u64) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    format!("{} {:02}:00", DAYS[(h / 24 % 7) as usize], h % 24)
}

/// The report as Markdown.
pub fn report(w: &Workload, t: &Timings) -> anyhow::Result<String> {
    let plans = plan(w);
    let visits: usize = plans.iter().map(|p| p.visits.len()).sum();
    let mut s = String::new();
    s.push_str(&format!(
        "Workload (seed {}): {} days, {} previews ({}/weekday, {}/weekend day, arriving {}:00–{}:00), {} visits in review sessions {} h apart on average (working hours only), merged after 1–{} days ({}% never merge); idle timeout {} min, TTL {} h.\n\n",
        w.seed, w.days, plans.len(), w.per_weekday, w.per_weekend_day, w.work_start_h, w.work_end_h, visits,
        w.session_gap_mean / HOUR, w.max_life_days, w.abandoned_pct, w.idle_timeout / MIN, w.ttl / HOUR
    ));
    s.push_str(&format!(
        "Stated Hetzner timings (each occurrence 0.75–1.5×): create {} s (from a snapshot {} s), power on {} s, shutdown {} s, snapshot {} s, delete {} s, boot {} s; the app starts again in {} s (first deploy {} s). Prices: €{}/server-hour (cx22), €{}/GB-month for {} GB snapshots. Provisioner settings: the defaults.\n\n",
        t.create / 1000, t.create_from_snapshot / 1000, t.power_on / 1000, t.shutdown / 1000, t.snapshot / 1000,
        t.delete / 1000, t.boot / 1000, t.app_start / 1000, t.first_deploy / 1000, EUR_PER_SERVER_HOUR,
        EUR_PER_GB_MONTH, SNAPSHOT_GB
    ));
    s.push_str("| mode | billed server-hours | vs always-on | snapshot GB-h | € / week | visits that waited for a wake | wake p50 | wake p95 | visits after TTL | failed visits | API requests / h (busiest hour) | reconciler listing requests / action polls / 429s |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut results = Vec::new();
    for mode in Mode::ALL {
        results.push((mode, run_mode(w, t, mode, &plans)?));
    }
    let base = results[0].1.billed_server_hours.max(1) as f64;
    let failures: Vec<String> =
        results.iter().flat_map(|(m, r)| r.failed.iter().map(move |f| format!("- {}: {f}\n", m.name()))).collect();
    for (mode, r) in &results {
        let eur =
            r.billed_server_hours as f64 * EUR_PER_SERVER_HOUR + r.snapshot_gb_hours / (30.0 * 24.0) * EUR_PER_GB_MONTH;
        let pct = |p| r.wake_pct(p).map(|ms| format!("{:.1} s", ms as f64 / 1000.0)).unwrap_or_else(|| "–".into());
        s.push_str(&format!(
            "| {} | {} | {:.2}× | {:.0} | {:.2} | {} | {} | {} | {} | {} | {:.1} ({}, {}) | {} / {} / {} |\n",
            mode.name(),
            r.billed_server_hours,
            r.billed_server_hours as f64 / base,
            r.snapshot_gb_hours,
            eur,
            r.wake_waits.len(),
            pct(0.5),
            pct(0.95),
            r.after_ttl,
            r.failed.len(),
            r.api_per_hour(w.days),
            r.api_peak_hour,
            hour_name(r.api_peak_at),
            r.api_listings,
            r.api_action_polls,
            r.api_rate_limited,
        ));
    }
    s.push_str("\nServers created: ");
    let created: Vec<String> = results.iter().map(|(m, r)| format!("{} {}", m.name(), r.servers_created)).collect();
    s.push_str(&created.join(", "));
    s.push_str(".\n");
    if !failures.is_empty() {
        s.push_str("\nFailed visits:\n\n");
        s.extend(failures);
    }
    Ok(s)
}
