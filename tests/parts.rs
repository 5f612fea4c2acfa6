//! `wakegate waker`, `wakegate provisioner` and `wakegate edge` as three processes
//! sharing one Redis: create a preview through the operator API, visit it through the
//! edge, see the app; put it to sleep and visit again; restart Redis under them and
//! see every part carry on without a restart of its own.

mod common;

use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;
use wakegate_testkit::Proc;
use wakegate_testkit::{free_port, http, redis::RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_on_redis_serve_a_preview() {
    let mut redis = RedisServer::start_persistent().await.unwrap();
    let data = wakegate_testkit::tempdir("parts");
    let (edge_port, waker_port) = (free_port(), free_port());
    let token = "operator-token-for-the-parts-test";
    let env = [
        ("WAKEGATE_REDIS_URL", redis.url()),
        ("WAKEGATE_DATA", data.display().to_string()),
        ("WAKEGATE_EDGE_ADDR", format!("127.0.0.1:{edge_port}")),
        ("WAKEGATE_WAKER_ADDR", format!("127.0.0.1:{waker_port}")),
        ("WAKEGATE_EDGE_KEY", TEST_EDGE_KEY.to_string()),
        ("WAKEGATE_CSRF_KEY", TEST_CSRF_KEY.to_string()),
        ("WAKEGATE_ORIGIN_KEY", TEST_ORIGIN_KEY.to_string()),
        ("WAKEGATE_OPERATOR_TOKEN", token.to_string()),
        ("WAKEGATE_SWEEP_SECS", "0.3".to_string()),
    ];
    let spawn = |part: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wakegate"));
        cmd.arg(part).stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        Proc(cmd.spawn().unwrap())
    };
    let _waker = spawn("waker");
    let _provisioner = spawn("provisioner");
    let _edge = spawn("edge");
    let waker = std::net::SocketAddr::from(([127, 0, 0, 1], waker_port));
    let edge = std::net::SocketAddr::from(([127, 0, 0, 1], edge_port));
    wakegate_testkit::eventually(WAIT, "waker to listen", || async {
        http::send(waker, "GET", "w", "/healthz", &[], "").await.ok().filter(|r| r.status == 200)
    })
    .await;

    let repo = demo_repo();
    let op = |method: &'static str, path: String, body: Option<serde_json::Value>| async move {
        wakegate::operator::call(waker, token, method, &path, body).await.unwrap()
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
    for machine in std::fs::read_dir(data.join("machines")).unwrap().flatten() {
        wakegate_testkit::kill_recorded_group(&machine.path().join("app.pid"));
    }
}
