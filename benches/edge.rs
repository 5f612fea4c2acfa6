//! Wakegate's edge against nginx, the wake path, and lookups at scale: one run on one
//! machine, printed as a table and written to BENCHMARKS.md (`scripts/bench`).
//!
//! * proxy overhead: one fast origin (nginx serving static files) measured direct,
//!   through nginx as a reverse proxy (a second nginx, in processes of its own as the
//!   edge is), and through the native edge with a cached running
//!   route (wrk on loopback): small file under load and one connection at a time, a
//!   1 MiB response, and a WebSocket echo round trip;
//! * lookups at scale: 100k previews in the embedded store and in Redis, p50/p99 of a
//!   signed route lookup in waker; memory of the edge's route cache;
//! * the wake path on the local backend: first request to first app byte, split into the
//!   app's own start time and Wakegate's overhead; 1000 concurrent first requests.
//!
//! Every load is bounded in count and time, on 127.0.0.1 only.

#[path = "../tests/common/mod.rs"]
mod common;

// the same allocator as the `wakegate` binary
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wakegate_core::lifecycle::State;
use wakegate_core::route::{Preview, Project};
use wakegate_core::sign::{self, Key};
use wakegate_edge::native::{EdgeConfig, EdgeServer};
use wakegate_store::{EmbeddedStore, RedisStore, SharedStore};
use wakegate_testkit::{free_port, http, tempdir};
use wakegate_waker::{refs::GitRefs, Waker, WakerConfig};

const LOAD_SECS: u32 = 3;
/// wrk runs per row; the median is reported.
const RUNS: usize = 5;
const PREVIEWS_AT_SCALE: usize = 100_000;
const LOOKUPS: usize = 2_000;
const CACHE_ROUTES: usize = 20_000;
const WS_ROUND_TRIPS: usize = 2_000;
const CONCURRENT_FIRST: usize = 1_000;
/// Webhook deliveries per run, and how many are in flight at once.
const HOOK_DELIVERIES: usize = 1_000;
const HOOK_CONCURRENCY: usize = 8;

struct Proc(Child);
impl Drop for Proc {
    /// SIGTERM first, so nginx's master takes its workers with it (SIGKILL would leave
    /// them running), then SIGKILL if it has not gone within two seconds.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        for _ in 0..40 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The time to acknowledge a forge's webhook delivery: verified on the raw body,
/// de-duplicated and persisted in the (file-backed, embedded) store, answered; the inbox
/// loop works on the deliveries meanwhile (a fake GitHub answers its calls). The
/// reference is `GET /healthz` on the same waker, measured the same way in the same run.
async fn hooks_ack(md: &mut String) {
    use wakegate_testkit::forges::{FakeForge, Kind};
    let row = |md: &mut String, line: String| {
        println!("{line}");
        md.push_str(&line);
        md.push('\n');
    };
    let w = common::World::start_with(&[("WAKEGATE_FORGE_RECONCILE_SECS", "3600")], 600).await;
    let fake = FakeForge::start(Kind::Github).await;
    let dir = tempdir("bench-secrets");
    std::fs::write(dir.join("token"), fake.token()).unwrap();
    std::fs::write(dir.join("hook"), "bench-webhook-secret").unwrap();
    let forge = serde_json::json!({
        "kind": "github", "api_url": fake.api_url(), "repo": fake.repo(),
        "token": {"file": dir.join("token").to_str().unwrap()},
        "webhook_secret": {"file": dir.join("hook").to_str().unwrap()},
    });
    let (s, v) = w
        .op("POST", "/v1/projects", Some(serde_json::json!({"name": "shop", "git_url": w.repo.url(), "forge": forge})))
        .await;
    assert_eq!(s, 201, "{v}");
    let head = wakegate_testkit::git::git(&w.repo.bare, &["rev-parse", "feature/blue"]).trim().to_string();
    fake.state.lock().unwrap().open(1, "feature/blue", &head);
    let (event, payload) = fake.change_hook(1, "synchronize", Some("0000"));
    let body = payload.to_string();
    let sig = wakegate_waker::forge::github::sign("bench-webhook-secret", body.as_bytes());
    let addr = w.dev.waker_addr;
    // one run: HOOK_DELIVERIES requests from HOOK_CONCURRENCY clients; latencies sorted
    let run = |hook: bool, round: usize| {
        let (event, body, sig) = (event.clone(), body.clone(), sig.clone());
        async move {
            let mut tasks = Vec::new();
            for c in 0..HOOK_CONCURRENCY {
                let (event, body, sig) = (event.clone(), body.clone(), sig.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    for i in 0..HOOK_DELIVERIES / HOOK_CONCURRENCY {
                        let id = format!("bench-{round}-{c}-{i}");
                        let t = Instant::now();
                        let r = if hook {
                            let h = [
                                ("content-type", "application/json"),
                                ("x-github-event", event.as_str()),
                                ("x-github-delivery", id.as_str()),
                                ("x-hub-signature-256", sig.as_str()),
                            ];
                            http::send(addr, "POST", &addr.to_string(), "/v1/forge/shop/hook", &h, body.clone()).await
                        } else {
                            http::send(addr, "GET", &addr.to_string(), "/healthz", &[], "").await
                        }
                        .unwrap();
                        lat.push(t.elapsed());
                        assert!(r.status == 202 || r.status == 200, "{} {}", r.status, r.body);
                    }
                    lat
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all.sort();
            all
        }
    };
    run(true, 1000).await; // warm-up
    let (mut hook_p50, mut hook_p99, mut ref_p50, mut ref_p99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..RUNS {
        let h = run(true, round).await;
        let r = run(false, round).await;
        hook_p50.push(ms(percentile(&h, 0.5)));
        hook_p99.push(ms(percentile(&h, 0.99)));
        ref_p50.push(ms(percentile(&r, 0.5)));
        ref_p99.push(ms(percentile(&r, 0.99)));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (hp50, _, _) = med(&mut hook_p50);
    let (hp99, lo, hi) = med(&mut hook_p99);
    let (rp50, _, _) = med(&mut ref_p50);
    let (rp99, _, _) = med(&mut ref_p99);
    row(md, "\n## Forge webhook acknowledgement (loopback)\n".into());
    row(md, format!("{HOOK_DELIVERIES} signed GitHub `pull_request` deliveries (distinct delivery ids) per run from {HOOK_CONCURRENCY} clients, a new connection each, to the waker on the embedded (file-backed) store; each is verified, claimed, persisted and answered 202 while the inbox loop works on them. Median of {RUNS} runs, with the spread of the p99s; the reference is `GET /healthz` on the same waker, measured the same way in the same runs.\n"));
    row(md, "| request | p50 ms | p99 ms (spread) | p99 vs `/healthz` |".into());
    row(md, "|---|---:|---:|---:|".into());
    row(md, format!("| webhook delivery (ack) | {hp50:.2} | {hp99:.2} ({lo:.2}–{hi:.2}) | {:.1}× |", hp99 / rp99));
    row(md, format!("| `GET /healthz` | {rp50:.2} | {rp99:.2} | 1.0× |"));
    w.stop().await;
}

/// An nginx of its own in `dir`, serving `servers` (an `http` block's server lines).
fn nginx(dir: &std::path::Path, servers: &str) -> Proc {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let conf = format!(
        r#"worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  sendfile on; tcp_nodelay on; keepalive_requests 1000000;
{servers}
}}
"#,
        d = dir.display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    Proc(
        Command::new("nginx")
            .args(["-p"])
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx)"),
    )
}

/// The origin: an nginx serving static files on `port`.
fn nginx_origin(dir: &std::path::Path, port: u16) -> Proc {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the origin\n").unwrap();
    std::fs::write(www.join("1mib.bin"), vec![7u8; 1 << 20]).unwrap();
    nginx(dir, &format!("  server {{ listen 127.0.0.1:{port}; root {}; }}", www.display()))
}

/// The reference proxy: another nginx (a process of its own, as the edge is: an nginx
/// proxying to a server of the same nginx may answer both sides in one worker, a hop no
/// real deployment has), keep-alive reverse proxies to the origin on two ports: one
/// with `proxy_buffering off` (streams like the edge), one with nginx's default
/// buffering.
fn nginx_proxy(dir: &std::path::Path, origin_port: u16, proxy_port: u16, buffered_port: u16) -> Proc {
    let to = "proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\";";
    nginx(
        dir,
        &format!(
            r#"  upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 128; }}
  server {{ listen 127.0.0.1:{proxy_port}; location / {{ {to} proxy_buffering off; }} }}
  server {{ listen 127.0.0.1:{buffered_port}; location / {{ {to} }} }}"#
        ),
    )
}

struct Wrk {
    rps: f64,
    p50: f64,
    p99: f64,
    /// Lowest and highest req/s of the runs.
    spread: (f64, f64),
}

fn parse_latency(v: &str) -> f64 {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

fn wrk(url: &str, host: &str, threads: u32, conns: u32, secs: u32) -> Wrk {
    let run = |d: u32| {
        Command::new("wrk")
            .args([
                "-t",
                &threads.to_string(),
                "-c",
                &conns.to_string(),
                "-d",
                &format!("{d}s"),
                "--latency",
                "-H",
                &format!("Host: {host}"),
                url,
            ])
            .output()
            .expect("wrk (apt-get install wrk)")
    };
    run(1); // warm-up
            // two shared cores make single runs noisy: the median of RUNS runs, by req/s, and the
            // spread of all of them
    let mut runs: Vec<Wrk> = (0..RUNS).map(|_| parse_wrk(&String::from_utf8_lossy(&run(secs).stdout))).collect();
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let spread = (runs[0].rps, runs[runs.len() - 1].rps);
    let mut median = runs.swap_remove(runs.len() / 2);
    median.spread = spread;
    median
}

fn parse_wrk(out: &str) -> Wrk {
    let mut w = Wrk { rps: f64::NAN, p50: f64::NAN, p99: f64::NAN, spread: (f64::NAN, f64::NAN) };
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50 = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99 = parse_latency(v);
        }
    }
    assert!(w.rps.is_finite(), "wrk output not understood:\n{out}");
    w
}

/// A minimal WebSocket echo origin (no Sec-WebSocket-Accept check by our client).
async fn ws_origin() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n").await;
                let mut hdr = [0u8; 2];
                while s.read_exact(&mut hdr).await.is_ok() {
                    let n = (hdr[1] & 0x7f) as usize;
                    let mut mask = [0u8; 4];
                    let mut data = vec![0u8; n];
                    if s.read_exact(&mut mask).await.is_err() || s.read_exact(&mut data).await.is_err() {
                        return;
                    }
                    for (i, x) in data.iter_mut().enumerate() {
                        *x ^= mask[i % 4];
                    }
                    let mut out = vec![hdr[0], n as u8];
                    out.extend_from_slice(&data);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn ws_round_trips(addr: SocketAddr, host: &str) -> Vec<Duration> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: bench\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let msg = b"ping ping ping ping ping ping ping ping";
    let mut frame = vec![0x81, 0x80 | msg.len() as u8, 1, 2, 3, 4];
    frame.extend(msg.iter().enumerate().map(|(i, x)| x ^ [1u8, 2, 3, 4][i % 4]));
    let mut times = Vec::with_capacity(WS_ROUND_TRIPS);
    let mut back = vec![0u8; 2 + msg.len()];
    for _ in 0..WS_ROUND_TRIPS {
        let t0 = Instant::now();
        s.write_all(&frame).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        times.push(t0.elapsed());
    }
    times.sort();
    times
}

fn project() -> Project {
    Project {
        id: "pbench".into(),
        name: "bench".into(),
        git_url: "file:///nonexistent".into(),
        ttl_hours: 8760.0,
        idle_timeout_secs: 86_400,
        created_at: now_ms(),
        machine: Default::default(),
        org_id: wakegate_core::route::DEFAULT_ORG_ID.into(),
        forge: None,
    }
}

fn running_preview(i: usize, origin: &str) -> Preview {
    Preview {
        id: format!("pv{i}"),
        project_id: "pbench".into(),
        project: "bench".into(),
        git_ref: format!("branch-{i}"),
        label: format!("bench-{i}"),
        state: State::Running { machine: format!("m{i}"), origin: origin.to_string() },
        state_since: now_ms(),
        created_at: now_ms(),
        built_at: now_ms(),
        ttl_hours: None,
        pinned: true,
        last_error: None,
        custom_hosts: Vec::new(),
        change: None,
        commit: None,
        dump: None,
        progress: None,
    }
}

async fn fill(store: &SharedStore, n: usize, origin: &str) {
    store.create_project(&project()).await.unwrap();
    let chunk = n / 16;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        let origin = origin.to_string();
        tasks.push(tokio::spawn(async move {
            for i in t * chunk..(t + 1) * chunk {
                store.put_preview(&running_preview(i, &origin), None).await.unwrap();
                store.bind_host(&format!("bench-{i}.localhost"), &format!("pv{i}")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

const EDGE_KEY: &str = "edge-key-for-the-benchmarks-0123456789";

async fn waker_on(store: SharedStore) -> SocketAddr {
    let waker = Arc::new(Waker::new(
        store,
        WakerConfig {
            edge_key: Key::new(EDGE_KEY.as_bytes().to_vec()),
            operator_token: "bench-operator-token".into(),
            preview_base: "localhost".into(),
            preview_url_template: "http://{label}.localhost".into(),
        },
        Arc::new(GitRefs::new(Duration::from_secs(60))),
    ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(wakegate_waker::serve(l, waker));
    addr
}

async fn lookups(waker: SocketAddr, n_previews: usize) -> (Duration, Duration) {
    let key = Key::new(EDGE_KEY.as_bytes().to_vec());
    let mut times = Vec::with_capacity(LOOKUPS);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..LOOKUPS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let path = format!("/v1/edge/route?host=bench-{}.localhost", x as usize % n_previews);
        let sig = sign::sign(&key, "GET", &path, &sign::body_digest(b""), now_ms(), &format!("n{i}"));
        let t0 = Instant::now();
        let r = http::send(waker, "GET", "waker", &path, &[(sign::SIGNATURE_HEADER, &sig)], "").await.unwrap();
        times.push(t0.elapsed());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()))
        .unwrap()
}

/// The wake path: first request to first byte, and a thousand concurrent first requests
/// (`WAKEGATE_BENCH_ONLY=wake` runs only this, and writes nothing).
async fn wake_path(md: &mut String) {
    let row = |md: &mut String, line: String| {
        println!("{line}");
        md.push_str(&line);
        md.push('\n');
    };
    // ---------- the wake path ----------
    row(md, "## The wake path (local backend, the demo app)\n".into());
    // 1000 clients from one address: above the default per-IP connection cap
    let w = common::World::start_with(&[("WAKEGATE_MAX_CONNECTIONS_PER_IP", "4096")], 600).await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let machine = w.machine_of(&id).await;
    let src = w.dev.machines_dir.join(&machine).join("src");
    // the app's own start time: its command, to its first healthy answer
    let mut app_starts = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let t0 = Instant::now();
        let _app = Proc(
            Command::new("python3")
                .arg("app.py")
                .current_dir(&src)
                .env("PORT", port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Ok(r) = http::send(addr, "GET", "x", "/health", &[], "").await {
                if r.status == 200 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        app_starts.push(t0.elapsed());
    }
    app_starts.sort();
    let app = app_starts[1];
    let mut firsts = Vec::new();
    for _ in 0..3 {
        w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
        w.wait_state(&id, "sleeping").await;
        let t0 = Instant::now();
        let r = w.api(&p, "/api/hello", &[]).await;
        firsts.push(t0.elapsed());
        assert_eq!(r.status, 200);
    }
    firsts.sort();
    let first = firsts[1];
    row(md, format!("First request to first app byte (API client, held): median {:.0} ms = app's own start {:.0} ms + Wakegate {:.0} ms (3 runs each).\n",
        ms(first), ms(app), ms(first.saturating_sub(app))));

    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    let starts_before = w.app_starts(&machine);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENT_FIRST {
        let (edge, host) = (w.edge, w.host(&p));
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = http::send(
                edge,
                "GET",
                &host,
                "/api/hello",
                &[("accept", "application/json"), ("user-agent", "bench")],
                "",
            )
            .await;
            (r.map(|r| r.status).unwrap_or(0), t.elapsed())
        }));
    }
    let mut done = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        let (status, d) = t.await.unwrap();
        *statuses.entry(status).or_insert(0usize) += 1;
        done.push(d);
    }
    let ok = statuses.get(&200).copied().unwrap_or(0);
    let others: Vec<String> = statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(s, n)| if *s == 0 { format!("{n} no answer") } else { format!("{n} got {s}") })
        .collect();
    let others = if others.is_empty() { String::new() } else { format!(" ({})", others.join(", ")) };
    done.sort();
    let wakes = w.app_starts(&machine) - starts_before;
    row(md, format!("{CONCURRENT_FIRST} concurrent first requests: {ok} got the app{others}, {wakes} wake(s); all answered within {:.0} ms (p50 {:.0} ms, p99 {:.0} ms).\n",
        ms(t0.elapsed()), ms(percentile(&done, 0.5)), ms(percentile(&done, 0.99))));
    w.stop().await;
}

#[tokio::main(worker_threads = 2)]
async fn main() {
    let mut md = String::new();
    let row = |md: &mut String, line: String| {
        println!("{line}");
        md.push_str(&line);
        md.push('\n');
    };

    // ---------- proxy overhead ----------
    let (sp, pp, bp) = (free_port(), free_port(), free_port());
    let _origin = nginx_origin(&tempdir("bench-origin"), sp);
    let _nginx = nginx_proxy(&tempdir("bench-nginx"), sp, pp, bp);
    for port in [sp, pp, bp] {
        for _ in 0..100 {
            let answer = http::send(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "x", "/hello.txt", &[], "").await;
            if answer.is_ok_and(|r| r.status == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let origin = format!("http://127.0.0.1:{sp}");
    let ws = ws_origin().await;
    let store: SharedStore = Arc::new(EmbeddedStore::in_memory());
    fill(&store, 16, &origin).await;
    // a route to the WebSocket origin too
    store.put_preview(&running_preview(1_000_000, &format!("http://{ws}")), None).await.unwrap();
    store.bind_host("bench-ws.localhost", "pv1000000").await.unwrap();
    let waker = waker_on(store.clone()).await;
    let mut edge_cfg = EdgeConfig::new(
        format!("http://{waker}"),
        Key::new(EDGE_KEY.as_bytes().to_vec()),
        Key::new(b"csrf-key-for-the-benchmarks".to_vec()),
        Key::new(b"origin-key-for-the-benchmarks".to_vec()),
    );
    edge_cfg.route_ttl = Duration::from_secs(3600);
    edge_cfg.max_per_ip = 100_000;
    // as `wakegate edge` serves: a single-threaded runtime per core
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    // and the same with busy-polling off, to show what it brings
    let mut still_cfg = edge_cfg.clone();
    still_cfg.busy_poll = Duration::ZERO;
    let edge = EdgeServer::start("127.0.0.1:0".parse().unwrap(), edge_cfg, threads).unwrap();
    let edge_addr = edge.addr;
    let still = EdgeServer::start("127.0.0.1:0".parse().unwrap(), still_cfg, threads).unwrap();
    let host = "bench-0.localhost";
    let r = http::send(edge_addr, "GET", host, "/hello.txt", &[("user-agent", "bench")], "").await.unwrap();
    assert_eq!(r.body, "hello from the origin\n");
    if let Ok(secs) = std::env::var("WAKEGATE_BENCH_SERVE_SECS") {
        // for profiling: keep the edge and origins up, print where, do nothing else
        println!(
            "edge http://{edge_addr} (busy-polling off: {}) origin {origin} nginx-proxy 127.0.0.1:{pp} host {host} pid {}",
            still.addr,
            std::process::id()
        );
        tokio::time::sleep(Duration::from_secs(secs.parse().unwrap_or(60))).await;
        return;
    }

    if std::env::var("WAKEGATE_BENCH_ONLY").as_deref() == Ok("wake") {
        return wake_path(&mut md).await;
    }
    if std::env::var("WAKEGATE_BENCH_ONLY").as_deref() == Ok("hooks") {
        return hooks_ack(&mut md).await;
    }
    row(&mut md, "## Proxy overhead (wrk, loopback)\n".into());
    row(&mut md, format!("Each row: the median of {RUNS} wrk runs of {LOAD_SECS} s (by req/s) after a 1 s warm-up; *spread* is the lowest and highest req/s of those runs. Ratios are against nginx with `proxy_buffering off` (it streams, as the edge does) and with nginx's default buffering, both measured in the same run. The edge runs with its defaults, which include busy-polling: for 100 µs after a request or an origin response, an edge thread polls for the next event instead of sleeping, while the machine has idle CPU (a halted vCPU takes tens of microseconds to wake; `WAKEGATE_EDGE_BUSY_POLL_US`). The row under it is the same edge with busy-polling off.\n"));
    row(&mut md, "| scenario | path | req/s (spread) | p50 ms | p99 ms | vs nginx unbuffered | vs nginx buffered | p99 added over direct |".into());
    row(&mut md, "|---|---|---:|---:|---:|---:|---:|---:|".into());
    let cases = [
        ("small file, 2 threads × 50 connections", "/hello.txt", 2, 50),
        ("small file, 1 connection", "/hello.txt", 1, 1),
        ("1 MiB response, 2 × 8 connections", "/1mib.bin", 2, 8),
    ];
    for (name, path, t, c) in cases {
        let direct = wrk(&format!("http://127.0.0.1:{sp}{path}"), host, t, c, LOAD_SECS);
        let nginx_off = wrk(&format!("http://127.0.0.1:{pp}{path}"), host, t, c, LOAD_SECS);
        let nginx_buf = wrk(&format!("http://127.0.0.1:{bp}{path}"), host, t, c, LOAD_SECS);
        let via_edge = wrk(&format!("http://{edge_addr}{path}"), host, t, c, LOAD_SECS);
        let via_still = wrk(&format!("http://{}{path}", still.addr), host, t, c, LOAD_SECS);
        for (label, w) in [
            ("direct", &direct),
            ("nginx, proxy_buffering off", &nginx_off),
            ("nginx, default buffering", &nginx_buf),
            ("wakegate edge", &via_edge),
            ("wakegate edge, busy-polling off", &via_still),
        ] {
            row(
                &mut md,
                format!(
                    "| {name} | {label} | {:.0} ({:.0}–{:.0}) | {:.3} | {:.3} | {:.2}× | {:.2}× | {:+.3} ms |",
                    w.rps,
                    w.spread.0,
                    w.spread.1,
                    w.p50,
                    w.p99,
                    w.rps / nginx_off.rps,
                    w.rps / nginx_buf.rps,
                    w.p99 - direct.p99
                ),
            );
        }
    }
    let direct_ws = ws_round_trips(ws, "bench-ws.localhost").await;
    let edge_ws = ws_round_trips(edge_addr, "bench-ws.localhost").await;
    row(&mut md, format!("\nWebSocket echo round trip ({WS_ROUND_TRIPS} messages, one connection): direct p50 {:.3} ms / p99 {:.3} ms; through the edge p50 {:.3} ms / p99 {:.3} ms.\n",
        ms(percentile(&direct_ws, 0.5)), ms(percentile(&direct_ws, 0.99)), ms(percentile(&edge_ws, 0.5)), ms(percentile(&edge_ws, 0.99))));

    // ---------- lookups at scale ----------
    row(
        &mut md,
        format!("## Route lookups with {PREVIEWS_AT_SCALE} previews (waker, signed HTTP, {LOOKUPS} random hosts)\n"),
    );
    row(&mut md, "| store | fill time | p50 ms | p99 ms |".into());
    row(&mut md, "|---|---:|---:|---:|".into());
    let emb_dir = tempdir("bench-store");
    let emb: SharedStore = Arc::new(EmbeddedStore::open(&emb_dir.join("store.log")).unwrap());
    let t0 = Instant::now();
    fill(&emb, PREVIEWS_AT_SCALE, &origin).await;
    let fill_emb = t0.elapsed();
    let (p50, p99) = lookups(waker_on(emb).await, PREVIEWS_AT_SCALE).await;
    row(
        &mut md,
        format!("| embedded (file-backed) | {:.1} s | {:.3} | {:.3} |", fill_emb.as_secs_f64(), ms(p50), ms(p99)),
    );
    let redis = wakegate_testkit::redis::RedisServer::start().await.unwrap();
    let rs: SharedStore = Arc::new(RedisStore::connect(&redis.url(), "wg:").await.unwrap());
    let t0 = Instant::now();
    fill(&rs, PREVIEWS_AT_SCALE, &origin).await;
    let fill_redis = t0.elapsed();
    let (p50, p99) = lookups(waker_on(rs).await, PREVIEWS_AT_SCALE).await;
    row(&mut md, format!("| Redis 7 | {:.1} s | {:.3} | {:.3} |", fill_redis.as_secs_f64(), ms(p50), ms(p99)));

    // memory of the edge's route cache: fill a fresh edge with CACHE_ROUTES running routes
    let big_store: SharedStore = Arc::new(EmbeddedStore::in_memory());
    fill(&big_store, CACHE_ROUTES, &origin).await;
    let big_waker = waker_on(big_store).await;
    let mut cache_cfg = EdgeConfig::new(
        format!("http://{big_waker}"),
        Key::new(EDGE_KEY.as_bytes().to_vec()),
        Key::new(b"c".repeat(16)),
        Key::new(b"o".repeat(16)),
    );
    cache_cfg.route_ttl = Duration::from_secs(3600);
    cache_cfg.activity_every = Duration::from_millis(100);
    cache_cfg.max_per_ip = 100_000;
    let cache_edge = EdgeServer::start("127.0.0.1:0".parse().unwrap(), cache_cfg, 1).unwrap();
    // warm the thread (pools, buffers) before the baseline
    http::send(cache_edge.addr, "GET", "bench-0.localhost", "/hello.txt", &[("user-agent", "bench")], "")
        .await
        .unwrap();
    let before = rss_kib();
    let per_task = CACHE_ROUTES / 8;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let addr = cache_edge.addr;
        tasks.push(tokio::spawn(async move {
            for i in t * per_task..(t + 1) * per_task {
                let r = http::send(
                    addr,
                    "GET",
                    &format!("bench-{i}.localhost"),
                    "/hello.txt",
                    &[("user-agent", "bench")],
                    "",
                )
                .await
                .unwrap();
                assert_eq!(r.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib();
    assert_eq!(cache_edge.cached_routes(), CACHE_ROUTES);
    let per_entry = (after.saturating_sub(before)) as f64 * 1024.0 / CACHE_ROUTES as f64;
    row(&mut md, format!("\nEdge route cache: {CACHE_ROUTES} running routes added {} KiB of RSS, ≈ {per_entry:.0} bytes a route (≈ {:.0} MiB for {PREVIEWS_AT_SCALE}).\n",
        after.saturating_sub(before), per_entry * PREVIEWS_AT_SCALE as f64 / 1048576.0));

    wake_path(&mut md).await;
    hooks_ack(&mut md).await;

    let machine_line = format!(
        "{} cores, {}, {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                .split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_string()))
            .unwrap_or_default(),
        String::from_utf8_lossy(&Command::new("nginx").arg("-v").output().unwrap().stderr).trim()
    );
    let doc = format!(
        "Measured by `scripts/bench` (= `cargo bench --bench edge`) in one run on one machine: {machine_line}; loopback only; wrk: the median of {RUNS} runs of {LOAD_SECS} s per row (by req/s) after a 1 s warm-up, with the spread of the runs. Ratios are against nginx measured in the same run.\n\n{md}"
    );
    wakegate_testkit::write_benchmarks_section("edge", &doc);
    println!("\nwritten to BENCHMARKS.md");
}
