//! The world the end-to-end tests run in: `Dev` (the composition `wakegate dev` runs) on
//! the embedded store, with a real git repository holding the demo app on two branches.
//!
//! The front door is the native edge, or with `WAKEGATE_E2E_EDGE=worker` the Worker
//! under `wrangler dev` in front of the same waker: the same tests run through both.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use wakegate::config::Config;
use wakegate::dev::Dev;
use wakegate_testkit::git::Repo;
use wakegate_testkit::http::{self, Response};

pub const APP: &str = include_str!("../../examples/demo-app/app.py");
pub const MANIFEST: &str = include_str!("../../examples/demo-app/wakegate.toml");
pub const MAIN: &str = include_str!("../../examples/demo-app/content.html");
pub const BLUE: &str = include_str!("../../examples/demo-app/content-blue.html");
pub const WAIT: Duration = Duration::from_secs(60);

pub struct World {
    pub dev: Dev,
    pub repo: Repo,
    pub data: std::path::PathBuf,
    /// Where visitors connect: the native edge or the Worker.
    pub edge: std::net::SocketAddr,
    pub worker: Option<wakegate_testkit::wrangler::Wrangler>,
}

pub const TEST_EDGE_KEY: &str = "edge-key-for-the-end-to-end-tests";
pub const TEST_CSRF_KEY: &str = "csrf-key-for-the-end-to-end-tests";
pub const TEST_ORIGIN_KEY: &str = "origin-key-for-the-end-to-end-tests";

/// Whether these tests go through the Worker (`WAKEGATE_E2E_EDGE=worker`).
pub fn through_worker() -> bool {
    std::env::var("WAKEGATE_E2E_EDGE").is_ok_and(|v| v == "worker")
}

pub fn settings(data: &std::path::Path, extra: &[(&str, &str)]) -> Config {
    let mut m: HashMap<String, String> = [
        ("WAKEGATE_DATA", data.to_str().unwrap()),
        ("WAKEGATE_EDGE_ADDR", "127.0.0.1:0"),
        ("WAKEGATE_WAKER_ADDR", "127.0.0.1:0"),
        ("WAKEGATE_SWEEP_SECS", "0.2"),
        ("WAKEGATE_CLOUD_REQUESTS_PER_HOUR", "100000"),
        ("WAKEGATE_CLOUD_LIST_SECS", "0.3"),
        ("WAKEGATE_LIVENESS_SECS", "0.3"),
        ("WAKEGATE_ORPHAN_GRACE_SECS", "2"),
        ("WAKEGATE_ROUTE_CACHE_SECS", "0.5"),
        ("WAKEGATE_ACTIVITY_SECS", "0.2"),
        ("WAKEGATE_HOLD_SECS", "30"),
        ("WAKEGATE_EDGE_KEY", TEST_EDGE_KEY),
        ("WAKEGATE_CSRF_KEY", TEST_CSRF_KEY),
        ("WAKEGATE_ORIGIN_KEY", TEST_ORIGIN_KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    Config::from_source(&m).unwrap()
}

/// A repository with the demo app on `main` and `feature/blue`.
pub fn demo_repo() -> Repo {
    let repo = Repo::new(&[("app.py", APP), ("wakegate.toml", MANIFEST), ("content.html", MAIN)]);
    repo.branch("feature/blue", &[("content.html", BLUE)]);
    repo
}

impl World {
    pub async fn start() -> World {
        Self::start_with(&[], 600).await
    }

    pub async fn start_with(extra: &[(&str, &str)], idle_timeout_secs: u64) -> World {
        Self::start_in(wakegate_testkit::tempdir("e2e"), extra, idle_timeout_secs).await
    }

    /// A world whose data (store, machines, database images) lives under `data`.
    pub async fn start_in(data: std::path::PathBuf, extra: &[(&str, &str)], idle_timeout_secs: u64) -> World {
        let cfg = settings(&data, extra);
        let store = Arc::new(wakegate_store::EmbeddedStore::open(&data.join("store.log")).unwrap());
        let dev = Dev::start(&cfg, store).await.unwrap();
        let repo = demo_repo();
        let (edge, worker) = if through_worker() {
            let edge_key = m_get(extra, "WAKEGATE_EDGE_KEY").unwrap_or(TEST_EDGE_KEY).to_string();
            let wrangler = wakegate_testkit::wrangler::Wrangler::start(&[
                ("WAKER_URL", format!("http://{}", dev.waker_addr)),
                ("EDGE_KEY", edge_key),
                ("CSRF_KEY", TEST_CSRF_KEY.to_string()),
                ("ORIGIN_KEY", TEST_ORIGIN_KEY.to_string()),
                ("ROUTE_CACHE_SECS", "0.5".to_string()),
                ("ACTIVITY_SECS", "0.2".to_string()),
                ("HOLD_SECS", "30".to_string()),
            ])
            .await
            .expect("wrangler dev starts");
            (wrangler.addr(), Some(wrangler))
        } else {
            (dev.edge_addr, None)
        };
        let w = World { dev, repo, data, edge, worker };
        let (s, body) = w
            .op("POST", "/v1/projects", Some(json!({"name": "demo", "git_url": w.repo.url(), "ttl_hours": 24, "idle_timeout_secs": idle_timeout_secs})))
            .await;
        assert_eq!(s, 201, "{body}");
        w
    }

    pub async fn op(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        wakegate::operator::call(self.dev.waker_addr, &self.dev.operator_token, method, path, body).await.unwrap()
    }

    /// Creates a preview for `git_ref` and returns its view.
    pub async fn preview(&self, git_ref: &str) -> Value {
        let (s, v) = self.op("POST", "/v1/projects/demo/previews", Some(json!({ "ref": git_ref }))).await;
        assert!(s == 201 || s == 200, "{s} {v}");
        v
    }

    pub async fn show(&self, id: &str) -> Value {
        let (s, v) = self.op("GET", &format!("/v1/previews/{id}"), None).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    pub async fn wait_state(&self, id: &str, state: &str) -> Value {
        wakegate_testkit::eventually(WAIT, &format!("{id} to be {state}"), || async {
            let v = self.show(id).await;
            if v["state"] == "failed" && state != "failed" {
                panic!("preview failed: {v}");
            }
            (v["state"] == state).then_some(v)
        })
        .await
    }

    /// `<label>.localhost:<edge port>`
    pub fn host(&self, preview: &Value) -> String {
        format!("{}.localhost:{}", preview["label"].as_str().unwrap(), self.edge.port())
    }

    pub async fn visit(&self, preview: &Value, path: &str) -> Response {
        http::get_html(self.edge, &self.host(preview), path).await.unwrap()
    }

    /// [`World::visit`], with a transport error as `None` (for polling loops).
    pub async fn try_visit(&self, preview: &Value, path: &str) -> Option<Response> {
        http::get_html(self.edge, &self.host(preview), path).await.ok()
    }

    pub async fn api(&self, preview: &Value, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut h = vec![("accept", "application/json"), ("user-agent", "curl/8.5.0")];
        h.extend_from_slice(headers);
        http::send(self.edge, "GET", &self.host(preview), path, &h, "").await.unwrap()
    }

    /// A running preview.
    pub async fn running(&self, git_ref: &str) -> Value {
        let p = self.preview(git_ref).await;
        self.wait_state(p["id"].as_str().unwrap(), "running").await
    }

    pub async fn machine_of(&self, id: &str) -> String {
        let p = self.dev.store.get_preview(id).await.unwrap().unwrap();
        p.value.state.machines().first().map(|m| m.to_string()).expect("preview has a machine")
    }

    /// How many times the app on this machine started (its log says so once a start).
    pub fn app_starts(&self, machine: &str) -> usize {
        let log = std::fs::read_to_string(self.dev.machines_dir.join(machine).join("app.log")).unwrap_or_default();
        log.lines().filter(|l| l.contains("demo app listening")).count()
    }

    pub fn machine_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dev.machines_dir)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    pub async fn stop(self) {
        drop(self.worker);
        self.dev.shutdown().await;
    }
}

/// The CSRF token in a confirm page.
pub fn csrf_of(page: &str) -> String {
    let at = page.find(r#"name="csrf" value=""#).expect("page has a CSRF field") + r#"name="csrf" value=""#.len();
    page[at..].split('"').next().unwrap().to_string()
}

pub async fn post_form(w: &World, preview: &Value, body: &str, extra: &[(&str, &str)]) -> Response {
    post_form_at(w, &w.host(preview), body, extra).await
}

/// The rebuild form posted to `host` (`name:port`).
pub async fn post_form_at(w: &World, host: &str, body: &str, extra: &[(&str, &str)]) -> Response {
    let mut h = vec![("content-type", "application/x-www-form-urlencoded"), ("accept", "text/html")];
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("user-agent")) {
        h.push(("user-agent", http::BROWSER_UA));
    }
    h.extend_from_slice(extra);
    http::send(w.edge, "POST", host, "/_wakegate/rebuild", &h, body.to_string()).await.unwrap()
}

/// A world whose org `acme` has proven `acme.com` (its TXT record on a DNS server on
/// 127.0.0.1) and whose project `shop` (the demo repository) answers under the base
/// `previews.acme.com` too.
pub async fn with_custom_base() -> (World, wakegate_testkit::dns::DnsServer) {
    let dns = wakegate_testkit::dns::DnsServer::start(&["acme.com"]).await;
    let servers = dns.addr.to_string();
    // a record that goes missing suspends the domain within a second
    let w = World::start_with(
        &[
            ("WAKEGATE_DNS_SERVERS", servers.as_str()),
            ("WAKEGATE_DOMAIN_GRACE_SECS", "0.5"),
            ("WAKEGATE_DOMAIN_RECHECK_SECS", "0.2"),
        ],
        600,
    )
    .await;
    let (s, v) = w.op("POST", "/v1/orgs", Some(json!({ "name": "acme" }))).await;
    assert_eq!(s, 201, "{v}");
    let (s, d) = w.op("POST", "/v1/orgs/acme/domains", Some(json!({ "domain": "acme.com" }))).await;
    assert_eq!(s, 201, "{d}");
    dns.set_txt(d["challenge"]["name"].as_str().unwrap(), &[d["challenge"]["value"].as_str().unwrap()]).await;
    let (s, v) = w.op("POST", "/v1/orgs/acme/domains/acme.com/verify", None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = w.op("POST", "/v1/orgs/acme/bases", Some(json!({ "base": "previews.acme.com" }))).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = w
        .op(
            "POST",
            "/v1/projects",
            Some(json!({ "name": "shop", "git_url": w.repo.url(), "ttl_hours": 24, "org": "acme" })),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    (w, dns)
}

impl World {
    /// A running preview of the project `shop` (see [`with_custom_base`]).
    pub async fn running_shop(&self, git_ref: &str) -> Value {
        let (s, p) = self.op("POST", "/v1/projects/shop/previews", Some(json!({ "ref": git_ref }))).await;
        assert!(s == 201 || s == 200, "{s} {p}");
        self.wait_state(p["id"].as_str().unwrap(), "running").await
    }

    /// The preview's first custom name with the edge's port.
    pub fn custom_host(&self, preview: &Value) -> String {
        format!("{}:{}", preview["custom_hosts"][0]["host"].as_str().expect("a custom name"), self.edge.port())
    }
}

fn m_get<'a>(pairs: &'a [(&str, &str)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// `wakegate provisioner` as a separate process on Redis (killed with SIGKILL when
/// dropped), with crash-test pacing and `extra` settings.
pub fn provisioner_process(redis: &str, data: &std::path::Path, extra: &[(String, String)]) -> wakegate_testkit::Proc {
    wakegate_testkit::Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_wakegate"))
            .arg("provisioner")
            .env("WAKEGATE_REDIS_URL", redis)
            .env("WAKEGATE_DATA", data)
            .env("WAKEGATE_LEASE_SECS", "1.5")
            .env("WAKEGATE_SWEEP_SECS", "0.3")
            .env("WAKEGATE_ORPHAN_GRACE_SECS", "1")
            .env("WAKEGATE_PREVIEW_URL", "http://{label}.localhost:1")
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Whether any process of this process group is alive.
pub fn group_alive(pgid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The process (group) id a pid file holds.
pub fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The bucket the `WAKEGATE_S3_*` settings of `s3` name, as Wakegate's config reads them.
pub fn bucket_of(s3: &wakegate_testkit::s3::S3Server, bucket: &str) -> wakegate_db::s3::Bucket {
    let settings = s3.settings(bucket);
    let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    wakegate_db::s3::Bucket::new(settings_at(&pairs).s3.expect("S3 settings"))
}

fn settings_at(extra: &[(&str, &str)]) -> Config {
    settings(std::path::Path::new("/nonexistent"), extra)
}

pub const MACHINE_KEY: &str = "machine-key-for-the-hetzner-tests";

/// The fake Hetzner Cloud API, and the VMs its servers boot (the agent each server's
/// user data carries, run with a directory as its disk).
pub struct HetznerCloud {
    pub fake: wakegate_testkit::hetzner::FakeHetzner,
    pub vms: Arc<wakegate_testkit::hetzner::AgentVms>,
}

pub async fn hetzner_cloud() -> HetznerCloud {
    use wakegate_testkit::hetzner::{AgentVms, Durations, FakeHetzner};
    let vms = AgentVms::new(wakegate_testkit::tempdir("vms"));
    let fake = FakeHetzner::start(Durations::fast(), vms.clone()).await;
    HetznerCloud { fake, vms }
}

/// A world on the Hetzner backend against `c`, with `extra` settings.
pub async fn hetzner_world(c: &HetznerCloud, extra: &[(&str, &str)]) -> World {
    let url = c.fake.url();
    let mut env = vec![
        ("WAKEGATE_BACKEND", "hetzner"),
        ("WAKEGATE_HETZNER_URL", url.as_str()),
        ("WAKEGATE_HETZNER_TOKEN", c.fake.token.as_str()),
        ("WAKEGATE_MACHINE_KEY", MACHINE_KEY),
        ("WAKEGATE_AGENT_ADDR", "127.0.0.1:0"),
        ("WAKEGATE_HETZNER_POLL_SECS", "0.02"),
        ("WAKEGATE_HETZNER_BACKOFF_SECS", "0.02"),
        ("WAKEGATE_AGENT_RETRY_SECS", "0.1"),
        ("WAKEGATE_CONTROL_PLANE_IPS", "203.0.113.7/32"),
    ];
    env.extend_from_slice(extra);
    World::start_with(&env, 600).await
}

/// Which of a command's outputs a pseudo-terminal gets (the other is discarded).
pub enum OnPty {
    Stdout,
    Stderr,
}

/// Runs `cmd` with one output on a pseudo-terminal (`cols` wide, or the default size);
/// what the terminal showed, and whether the command succeeded.
pub fn run_in_pty(mut cmd: std::process::Command, on: OnPty, cols: Option<u16>) -> (String, bool) {
    use std::io::Read;
    use std::process::Stdio;
    let size = cols.map(|ws_col| nix::pty::Winsize { ws_row: 40, ws_col, ws_xpixel: 0, ws_ypixel: 0 });
    let pty = nix::pty::openpty(size.as_ref(), None).unwrap();
    let (tty, other) = (Stdio::from(pty.slave), Stdio::null());
    let (stdout, stderr) = match on {
        OnPty::Stdout => (tty, other),
        OnPty::Stderr => (other, tty),
    };
    let mut child = cmd.stdout(stdout).stderr(stderr).spawn().unwrap();
    // the command holds our copy of the terminal's end: closed, the child's exit ends
    // the reads
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child's end closes
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let ok = child.wait().unwrap().success();
    (reader.join().unwrap(), ok)
}
