//! `wakegate waker`, `wakegate provisioner` and `wakegate edge` as three processes
//! sharing one Redis: create a preview through the operator API, visit it through the
//! edge, see the app; put it to sleep and visit again; restart Redis under them and
//! see every part carry on without a restart of its own.

use crate::common;

use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;
use wakegate_testkit::Proc;
use wakegate_testkit::{free_port, http, redis::RedisServer};

/// Three parts' shared settings in these tests (Redis, data, addresses, keys), and how
/// to start one of them as a process.
struct Parts {
    env: Vec<(&'static str, String)>,
    data: std::path::PathBuf,
    edge_port: u16,
    waker: std::net::SocketAddr,
    edge: std::net::SocketAddr,
    token: &'static str,
}

impl Parts {
    fn new(redis: &RedisServer, tag: &str, token: &'static str, extra: &[(&'static str, &str)]) -> Parts {
        let data = wakegate_testkit::tempdir(tag);
        let (edge_port, waker_port) = (free_port(), free_port());
        let mut env = vec![
            ("WAKEGATE_REDIS_URL", redis.url()),
            ("WAKEGATE_DATA", data.display().to_string()),
            ("WAKEGATE_EDGE_ADDR", format!("127.0.0.1:{edge_port}")),
            ("WAKEGATE_WAKER_ADDR", format!("127.0.0.1:{waker_port}")),
            ("WAKEGATE_EDGE_KEY", TEST_EDGE_KEY.to_string()),
            ("WAKEGATE_CSRF_KEY", TEST_CSRF_KEY.to_string()),
            ("WAKEGATE_ORIGIN_KEY", TEST_ORIGIN_KEY.to_string()),
            ("WAKEGATE_OPERATOR_TOKEN", token.to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        Parts { env, data, edge_port, waker: at(waker_port), edge: at(edge_port), token }
    }

    /// Starts `wakegate <part>` with its standard error to `stderr`.
    fn spawn_to(&self, part: &str, stderr: Stdio) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wakegate"));
        cmd.arg(part).stdout(Stdio::null()).stderr(stderr);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Proc(cmd.spawn().unwrap())
    }

    fn spawn(&self, part: &str) -> Proc {
        self.spawn_to(part, Stdio::null())
    }

    async fn waker_listens(&self) {
        wakegate_testkit::eventually(WAIT, "waker to listen", || async {
            http::send(self.waker, "GET", "w", "/healthz", &[], "").await.ok().filter(|r| r.status == 200)
        })
        .await;
    }

    async fn op(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        wakegate::operator::call(self.waker, self.token, method, path, body).await.unwrap()
    }

    /// Stops the apps this test's provisioners started.
    fn kill_apps(&self) {
        for machine in std::fs::read_dir(self.data.join("machines")).unwrap().flatten() {
            wakegate_testkit::kill_recorded_group(&machine.path().join("app.pid"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_on_redis_serve_a_preview() {
    let mut redis = RedisServer::start_persistent().await.unwrap();
    let parts = Parts::new(&redis, "parts", "operator-token-for-the-parts-test", &[("WAKEGATE_SWEEP_SECS", "0.3")]);
    let (edge_port, waker, edge, token) = (parts.edge_port, parts.waker, parts.edge, parts.token);
    let _waker = parts.spawn("waker");
    let _provisioner = parts.spawn("provisioner");
    let _edge = parts.spawn("edge");
    parts.waker_listens().await;

    let repo = demo_repo();
    let op = |method: &'static str, path: String, body: Option<serde_json::Value>| {
        let parts = &parts;
        async move { parts.op(method, &path, body).await }
    };
    let (s, _) = op("POST", "/v1/projects".into(), Some(json!({"name": "demo", "git_url": repo.url()}))).await;
    assert_eq!(s, 201);
    let (s, p) = op("POST", "/v1/projects/demo/previews".into(), Some(json!({"ref": "feature/blue"}))).await;
    assert_eq!(s, 201);
    let id = p["id"].as_str().unwrap().to_string();
    let host = format!("{}.localhost:{edge_port}", p["label"].as_str().unwrap());
    assert_eq!(p["url"], format!("http://{host}"), "preview URLs name the edge");

    let page = wakegate_testkit::eventually(WAIT, "the app through the edge", || async {
        let r = http::get_html(edge, &host, "/").await.ok()?;
        r.body.contains("Hello from the feature/blue branch").then_some(r)
    })
    .await;
    assert_eq!(page.status, 200);

    let (s, _) = op("POST", format!("/v1/previews/{id}/sleep"), None).await;
    assert_eq!(s, 202);
    wakegate_testkit::eventually(WAIT, "sleep", || async {
        let (_, v) = op("GET", format!("/v1/previews/{id}"), None).await;
        (v["state"] == "sleeping").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the edge's route cache
    let r =
        http::send(edge, "GET", &host, "/api/hello", &[("accept", "application/json"), ("user-agent", "curl/8")], "")
            .await
            .unwrap();
    assert_eq!(r.status, 200, "held until awake: {}", r.body);

    // Redis goes away and comes back: waker and provisioner reconnect by themselves
    redis.restart(Duration::from_millis(500)).await.unwrap();
    let (s, main) = wakegate_testkit::eventually(WAIT, "the waker to answer again", || async {
        let r =
            wakegate::operator::call(waker, token, "POST", "/v1/projects/demo/previews", Some(json!({"ref": "main"})))
                .await
                .ok()?;
        (r.0 != 503).then_some(r)
    })
    .await;
    assert_eq!(s, 201, "{main}");
    let main_host = format!("{}.localhost:{edge_port}", main["label"].as_str().unwrap());
    wakegate_testkit::eventually(WAIT, "a preview built after the restart", || async {
        let r = http::get_html(edge, &main_host, "/").await.ok()?;
        r.body.contains("Hello from the main branch").then_some(())
    })
    .await;
    let (_, v) = op("GET", format!("/v1/previews/{id}"), None).await;
    assert_eq!(v["state"], "running", "the record from before the restart is there");

    // stop the apps this test's provisioner started
    parts.kill_apps();
}

/// Sends SIGTERM to a part and returns its exit status (it must stop within `within`).
fn terminate(p: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(p.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "the part did not stop within {within:?} of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM (what systemd and container runtimes send) stops each part gracefully: the
/// edge finishes every response in flight before it exits, the provisioner stops
/// mid-build and the next one finishes the build, and every part exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_work_in_flight_finish_and_the_next_start_repairs() {
    let redis = RedisServer::start().await.unwrap();
    let extra = [("WAKEGATE_SWEEP_SECS", "0.3"), ("WAKEGATE_LEASE_SECS", "2"), ("WAKEGATE_SHUTDOWN_GRACE_SECS", "10")];
    let parts = Parts::new(&redis, "sigterm", "operator-token-for-the-sigterm-test", &extra);
    let (edge_port, edge) = (parts.edge_port, parts.edge);
    let spawn = |part: &str| parts.spawn(part);
    let mut waker_proc = spawn("waker");
    let mut provisioner = spawn("provisioner");
    let mut edge_proc = spawn("edge");
    parts.waker_listens().await;
    let repo = demo_repo();
    let op = |method: &'static str, path: String, body: Option<serde_json::Value>| {
        let parts = &parts;
        async move { parts.op(method, &path, body).await }
    };
    let (s, _) = op("POST", "/v1/projects".into(), Some(json!({"name": "demo", "git_url": repo.url()}))).await;
    assert_eq!(s, 201);
    let (_, p) = op("POST", "/v1/projects/demo/previews".into(), Some(json!({"ref": "main"}))).await;
    let host = format!("{}.localhost:{edge_port}", p["label"].as_str().unwrap());
    wakegate_testkit::eventually(WAIT, "the app through the edge", || async {
        let r = http::get_html(edge, &host, "/").await.ok()?;
        r.body.contains("Hello from the main branch").then_some(())
    })
    .await;

    // the edge under load: streamed responses (250 ms each), every one of them begun
    // (its first chunk read) before the signal
    let (begun_tx, mut begun) = tokio::sync::mpsc::channel::<()>(32);
    let stream = |_| {
        let (host, begun_tx) = (host.clone(), begun_tx.clone());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(edge).await?;
            let req =
                format!("GET /stream HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl/8\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await?;
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let mut told = false;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<String, std::io::Error>(String::from_utf8_lossy(&got).into_owned());
                }
                got.extend_from_slice(&buf[..n]);
                if !told && String::from_utf8_lossy(&got).contains("chunk 0") {
                    told = true;
                    let _ = begun_tx.send(()).await;
                }
            }
        })
    };
    let inflight: Vec<_> = (0..24).map(stream).collect();
    for _ in 0..24 {
        tokio::time::timeout(WAIT, begun.recv()).await.expect("every stream begins").unwrap();
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = terminate(&mut edge_proc, Duration::from_secs(15));
        (s, edge_proc)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "the edge exits 0 on SIGTERM: {:?}", status.0);
    for r in inflight {
        let body = r.await.unwrap().expect("no request in flight is reset");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("chunk 4") && body.ends_with("0\r\n\r\n"), "every response finished: {body}");
    }
    assert!(http::send(edge, "GET", &host, "/", &[], "").await.is_err(), "nothing listens once stopped");
    let _edge = spawn("edge");

    // the provisioner stops mid-build; the next one finishes the build
    let (_, blue) = op("POST", "/v1/projects/demo/previews".into(), Some(json!({"ref": "feature/blue"}))).await;
    let blue_id = blue["id"].as_str().unwrap().to_string();
    let status =
        tokio::task::spawn_blocking(move || terminate(&mut provisioner, Duration::from_secs(20))).await.unwrap();
    assert!(status.success(), "the provisioner exits 0 on SIGTERM: {status:?}");
    let _provisioner = spawn("provisioner");
    let blue_host = format!("{}.localhost:{edge_port}", blue["label"].as_str().unwrap());
    wakegate_testkit::eventually(WAIT, "the build to finish under the next provisioner", || async {
        let r = http::get_html(edge, &blue_host, "/").await.ok()?;
        r.body.contains("Hello from the feature/blue branch").then_some(())
    })
    .await;
    let (_, v) = op("GET", format!("/v1/previews/{blue_id}"), None).await;
    assert_eq!(v["state"], "running", "{v}");

    // the waker too
    let status =
        tokio::task::spawn_blocking(move || terminate(&mut waker_proc, Duration::from_secs(15))).await.unwrap();
    assert!(status.success(), "the waker exits 0 on SIGTERM: {status:?}");

    parts.kill_apps();
}

/// `WAKEGATE_LOG_FORMAT=json` writes one JSON object per line, with the spans (the
/// preview a job works on); `RUST_LOG` directives are honoured exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_are_json_lines_filtered_as_rust_log_says() {
    let redis = RedisServer::start().await.unwrap();
    let extra = [("WAKEGATE_LOG_FORMAT", "json"), ("RUST_LOG", "warn,wakegate_provisioner=debug")];
    let parts = Parts::new(&redis, "logs", "operator-token-for-the-logs-test", &extra);
    let token = parts.token;
    let log = parts.data.join("provisioner.log");
    let _waker = parts.spawn("waker");
    let mut provisioner = parts.spawn_to("provisioner", Stdio::from(std::fs::File::create(&log).unwrap()));
    parts.waker_listens().await;
    let repo = demo_repo();
    let op = |method: &'static str, path: String, body: Option<serde_json::Value>| {
        let parts = &parts;
        async move { parts.op(method, &path, body).await }
    };
    op("POST", "/v1/projects".into(), Some(json!({"name": "demo", "git_url": repo.url()}))).await;
    let (_, p) = op("POST", "/v1/projects/demo/previews".into(), Some(json!({"ref": "main"}))).await;
    let id = p["id"].as_str().unwrap().to_string();
    wakegate_testkit::eventually(WAIT, "the preview to run", || async {
        let (_, v) = op("GET", format!("/v1/previews/{id}"), None).await;
        (v["state"] == "running").then_some(())
    })
    .await;
    tokio::task::spawn_blocking(move || terminate(&mut provisioner, Duration::from_secs(20))).await.unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    let (mut debug, mut in_span) = (false, false);
    for l in &lines {
        let (level, target) = (l["level"].as_str().unwrap(), l["target"].as_str().unwrap());
        assert!(l["timestamp"].is_string() && l["fields"]["message"].is_string(), "{l}");
        if matches!(level, "INFO" | "DEBUG" | "TRACE") {
            assert!(target.starts_with("wakegate_provisioner"), "only what RUST_LOG asks for: {l}");
            assert_ne!(level, "TRACE", "{l}");
        }
        debug |= level == "DEBUG";
        in_span |= l["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["preview"] == id.as_str()));
    }
    assert!(debug, "wakegate_provisioner=debug lets its debug lines through: {text}");
    assert!(in_span, "a job's lines carry the preview it works on: {text}");
    assert!(!text.contains(token), "no secrets in the logs");

    parts.kill_apps();
}
