//! Kill the provisioner (SIGKILL, a real separate process on Redis) in the middle of a
//! build and start it again: the build completes, and no process or checkout is left
//! that no record references.

use crate::common;

use common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use wakegate_core::lifecycle::State;
use wakegate_store::{RedisStore, Store};
use wakegate_testkit::redis::RedisServer;
use wakegate_testkit::Proc;

fn provisioner(redis: &str, data: &std::path::Path) -> Proc {
    provisioner_process(redis, data, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provisioner_killed_mid_build_recovers_without_leaks() {
    let redis = RedisServer::start().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url(), "wg:").await.unwrap());
    let data = wakegate_testkit::tempdir("crash");
    let machines = data.join("machines");
    let token = "operator-token-for-the-crash-test";
    let waker = Arc::new(wakegate_waker::Waker::new(
        store.clone(),
        wakegate_waker::WakerConfig {
            edge_key: wakegate_core::sign::Key::new(b"edge-key-for-the-crash-test".to_vec()),
            operator_token: token.into(),
            preview_base: "localhost".into(),
            preview_url_template: "http://{label}.localhost:1".into(),
        },
        Arc::new(wakegate_waker::refs::GitRefs::new(Duration::from_secs(1))),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let waker_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(wakegate_waker::serve(listener, waker));

    let slow = "build = \"sleep 4\"\nrun = \"exec python3 app.py\"\nhealth = \"/health\"\n";
    let repo = wakegate_testkit::git::Repo::new(&[("app.py", APP), ("wakegate.toml", slow), ("content.html", MAIN)]);
    let op = |method: &'static str, path: String, body: Option<serde_json::Value>| async move {
        wakegate::operator::call(waker_addr, token, method, &path, body).await.unwrap()
    };
    let (s, _) = op("POST", "/v1/projects".into(), Some(json!({"name": "slow", "git_url": repo.url()}))).await;
    assert_eq!(s, 201);
    let (s, p) = op("POST", "/v1/projects/slow/previews".into(), Some(json!({"ref": "main"}))).await;
    assert_eq!(s, 201);
    let id = p["id"].as_str().unwrap().to_string();

    let first = provisioner(&redis.url(), &data);
    // wait until the build command runs on a machine
    let (machine, build_pgid) = wakegate_testkit::eventually(WAIT, "the build to start", || async {
        let p = store.get_preview(&id).await.ok()??;
        let State::Building { machine: Some(m), .. } = &p.value.state else {
            return None;
        };
        let pgid = read_pid(&machines.join(m).join("build.pid"))?;
        Some((m.clone(), pgid))
    })
    .await;
    assert!(group_alive(build_pgid));
    drop(first); // SIGKILL: no cleanup of any kind

    let _second = provisioner(&redis.url(), &data);
    let done = wakegate_testkit::eventually(WAIT, "the build to finish after the restart", || async {
        let p = store.get_preview(&id).await.ok()??;
        matches!(p.value.state, State::Running { .. } | State::Failed { .. }).then_some(p)
    })
    .await;
    let State::Running { machine: now_serving, .. } = &done.value.state else {
        panic!("expected running: {:?}", done.value.state)
    };
    // the retried build goes on with the machine it recorded: a preview never gets two
    assert_eq!(now_serving, &machine, "the recorded machine was reused");

    // nothing unreferenced is left: one machine directory, the one the record names;
    // the interrupted build's processes are gone
    wakegate_testkit::eventually(WAIT, "only the recorded machine to be left", || async {
        let dirs: Vec<String> = std::fs::read_dir(&machines)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        (dirs == vec![now_serving.clone()]).then_some(())
    })
    .await;
    assert!(!group_alive(build_pgid), "the interrupted build's process group was stopped");
    assert!(store.jobs().await.unwrap().is_empty());

    // stop the app we started, by its recorded process group
    wakegate_testkit::kill_recorded_group(&machines.join(now_serving).join("app.pid"));
    server.abort();
}
