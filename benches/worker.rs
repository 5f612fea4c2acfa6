//! Figures for the edge Worker in workerd (`cargo bench --bench worker`, after
//! `scripts/build-worker`):
//!
//! * the wasm module's size, raw and gzipped;
//! * start-up: `workerd serve` spawned → first HTTP answer from our Worker (median of 5);
//! * CPU per proxied request with a cached route: workerd's own CPU time (utime+stime
//!   from /proc) over N sequential requests to a running preview, for our Worker and for
//!   a plain JavaScript pass-through Worker (`fetch(origin + path)`) in the same workerd
//!   serving the same origin; the difference is what Wakegate adds.
//!
//! Loopback only; every loop is bounded in count.

#[path = "../tests/common/mod.rs"]
mod common;

// the same allocator as the `wakegate` binary
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wakegate_testkit::wrangler::repo_root;

const REQUESTS: usize = 1000;

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 of stat (utime, stime) are 12 and 13 after the comm field
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn capnp(dir: &std::path::Path, edge_port: u16, baseline_port: u16, waker: &str, origin: &str) -> std::path::PathBuf {
    // capnp `embed` paths are relative to the config file
    for f in ["index.js", "index_bg.wasm"] {
        std::fs::copy(repo_root().join("edge/build").join(f), dir.join(f)).unwrap();
    }
    let cfg = format!(
        r#"using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "edge", worker = .edge),
    (name = "baseline", worker = .baseline),
    (name = "internet", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [
    (name = "edge", address = "127.0.0.1:{edge_port}", http = (), service = "edge"),
    (name = "baseline", address = "127.0.0.1:{baseline_port}", http = (), service = "baseline"),
  ],
);
const edge :Workerd.Worker = (
  modules = [
    (name = "index.js", esModule = embed "index.js"),
    (name = "index_bg.wasm", wasm = embed "index_bg.wasm"),
  ],
  compatibilityDate = "2025-06-01",
  globalOutbound = "internet",
  bindings = [
    (name = "WAKER_URL", text = "{waker}"),
    (name = "EDGE_KEY", text = "{ek}"),
    (name = "CSRF_KEY", text = "{ck}"),
    (name = "ORIGIN_KEY", text = "{ok}"),
    (name = "ROUTE_CACHE_SECS", text = "3600"),
    (name = "ACTIVITY_SECS", text = "1"),
  ],
);
const baseline :Workerd.Worker = (
  modules = [ (name = "main.js", esModule = embed "baseline.js") ],
  compatibilityDate = "2025-06-01",
  globalOutbound = "internet",
);
"#,
        ek = common::TEST_EDGE_KEY,
        ck = common::TEST_CSRF_KEY,
        ok = common::TEST_ORIGIN_KEY,
    );
    std::fs::write(
        dir.join("baseline.js"),
        format!("export default {{ async fetch(req) {{ const u = new URL(req.url); return fetch(\"{origin}\" + u.pathname + u.search, req); }} }};\n"),
    )
    .unwrap();
    let path = dir.join("config.capnp");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn workerd() -> std::path::PathBuf {
    repo_root().join("node_modules/@cloudflare/workerd-linux-64/bin/workerd")
}

async fn until_answers(addr: std::net::SocketAddr, host: &str) {
    for _ in 0..2000 {
        if wakegate_testkit::http::send(addr, "GET", host, "/", &[("user-agent", "probe-bot")], "").await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("workerd did not answer");
}

#[tokio::main]
async fn main() {
    let wasm = repo_root().join("edge/build/index_bg.wasm");
    let raw = std::fs::read(&wasm).expect("build the Worker first: scripts/build-worker");
    let gz = Command::new("gzip").args(["-9", "-c"]).arg(&wasm).output().unwrap().stdout.len();
    println!("wasm size: {} bytes raw, {} bytes gzipped (-9)", raw.len(), gz);

    let w = common::World::start().await;
    let p = w.running("main").await;
    let machine = w.machine_of(p["id"].as_str().unwrap()).await;
    let origin = w
        .dev
        .store
        .get_preview(p["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap()
        .value
        .state
        .origin()
        .unwrap()
        .to_string();
    let dir = wakegate_testkit::tempdir("workerd");
    let (ep, bp) = (wakegate_testkit::free_port(), wakegate_testkit::free_port());
    let config = capnp(&dir, ep, bp, &format!("http://{}", w.dev.waker_addr), &origin);
    let edge = std::net::SocketAddr::from(([127, 0, 0, 1], ep));
    let baseline = std::net::SocketAddr::from(([127, 0, 0, 1], bp));
    let host = format!("{}.localhost", p["label"].as_str().unwrap());

    // start-up
    let mut startups = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let mut child = Command::new(workerd())
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        until_answers(edge, "nope.localhost").await;
        startups.push(t0.elapsed());
        child.kill().unwrap();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        child.wait().unwrap();
    }
    startups.sort();
    println!(
        "workerd start-up to first answer: median {:.1} ms (min {:.1}, max {:.1}; 5 runs)",
        startups[2].as_secs_f64() * 1e3,
        startups[0].as_secs_f64() * 1e3,
        startups[4].as_secs_f64() * 1e3
    );

    // CPU per proxied request
    let mut child =
        Command::new(workerd()).arg("serve").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    until_answers(edge, "nope.localhost").await;
    until_answers(baseline, &host).await;
    let mut per_request = Vec::new();
    for (name, addr) in [("wakegate edge (cached route)", edge), ("JS pass-through baseline", baseline)] {
        for _ in 0..200 {
            let r = wakegate_testkit::http::send(addr, "GET", &host, "/api/hello", &[("user-agent", "bench")], "")
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{name}: {}", r.body);
        }
        let c0 = cpu_ticks(pid);
        let t0 = Instant::now();
        for _ in 0..REQUESTS {
            let r = wakegate_testkit::http::send(addr, "GET", &host, "/api/hello", &[("user-agent", "bench")], "")
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
        let wall = t0.elapsed();
        let cpu_ms = (cpu_ticks(pid) - c0) as f64 * 10.0; // 100 ticks per second
        let per = cpu_ms * 1000.0 / REQUESTS as f64;
        per_request.push(per);
        println!(
            "{name}: workerd CPU {per:.0} µs/request over {REQUESTS} requests ({:.0} req/s sequential, wall {:.2} s)",
            REQUESTS as f64 / wall.as_secs_f64(),
            wall.as_secs_f64()
        );
    }
    println!(
        "edge/baseline CPU ratio: {:.2}; Wakegate adds {:.0} µs CPU per proxied request",
        per_request[0] / per_request[1],
        per_request[0] - per_request[1]
    );
    println!("(app starts so far: {})", w.app_starts(&machine));
    child.kill().unwrap();
    child.wait().unwrap();
    w.stop().await;
}
