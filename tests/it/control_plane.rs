//! The control plane against what an outside review found: operator values that used
//! to stop every background task, an idle sweeper that starved, ids that collided
//! across projects, two spellings of one branch, a crashed app nobody noticed, and
//! build output shown to anonymous visitors. Each test drives the real waker,
//! provisioner and edge.

use crate::common;

use common::*;
use serde_json::json;
use wakegate_core::lifecycle::{EraseReason, State};

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_values_are_checked_and_the_error_names_the_field() {
    let w = World::start().await;
    let url = w.repo.url();
    let cases = [
        (json!({"name": "a", "git_url": url, "idle_timeout_secs": 18446744073709551615u64}), "idle_timeout_secs"),
        (json!({"name": "a", "git_url": url, "idle_timeout_secs": 0}), "idle_timeout_secs"),
        (json!({"name": "a", "git_url": url, "idle_timeout_secs": -1}), "idle_timeout_secs"),
        (json!({"name": "a", "git_url": url, "idle_timeout_secs": "soon"}), "idle_timeout_secs"),
        (json!({"name": "a", "git_url": url, "ttl_hours": 1e300}), "ttl_hours"),
        (json!({"name": "a", "git_url": url, "ttl_hours": 0}), "ttl_hours"),
        (json!({"name": "A B", "git_url": url}), "name"),
        (json!({"name": "a", "git_url": "--upload-pack=x"}), "git_url"),
        (json!({"name": "a", "git_url": url, "machine": {"sleep_mode": "coma"}}), "machine.sleep_mode"),
        (json!({"name": "a", "git_url": url, "machine": {"server_type": "cx22; rm"}}), "machine.server_type"),
    ];
    for (body, field) in cases {
        let (s, v) = w.op("POST", "/v1/projects", Some(body.clone())).await;
        assert_eq!(s, 400, "{body} → {v}");
        assert_eq!(v["field"], field, "{body} → {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    let (s, _) = w.op("GET", "/v1/projects/a", None).await;
    assert_eq!(s, 404, "nothing was created");
    let (s, v) = w.op("POST", "/v1/projects", Some(json!({"name": "a", "git_url": url, "idle_timeout_secs": 1}))).await;
    assert_eq!((s, v["idle_timeout_secs"].as_u64()), (201, Some(1)), "{v}");
    w.stop().await;
}

/// A project stored before values were checked (an old store, a hand edit) must not
/// stop the sweepers: the demo preview still goes to sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_absurd_stored_value_cannot_stop_the_sweepers() {
    let w = World::start_with(&[], 1).await;
    let mut bad = wakegate_store::conformance::project("absurd");
    bad.idle_timeout_secs = u64::MAX;
    w.dev.store.create_project(&bad).await.unwrap();
    let mut p = wakegate_store::conformance::preview("pv-absurd");
    p.project_id = bad.id.clone();
    w.dev.store.put_preview(&p, None).await.unwrap();
    w.dev.store.touch(&["pv-absurd".into()], 1).await.unwrap();

    let main = w.running("main").await;
    w.wait_state(main["id"].as_str().unwrap(), "sleeping").await;
    w.stop().await;
}

/// Hundreds of previews that are not running, with old activity entries, used to fill
/// the sweeper's batch every time: the running one never slept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sleep_does_not_starve_behind_previews_that_are_not_running() {
    let w = World::start_with(&[], 1).await;
    let project = w.dev.store.project_by_name("demo").await.unwrap().unwrap();
    let ids: Vec<String> = (0..700).map(|i| format!("pv-old{i:04}")).collect();
    for id in &ids {
        let mut p = wakegate_store::conformance::preview(id);
        p.project_id = project.id.clone();
        p.state = State::Erased { reason: EraseReason::Ttl };
        w.dev.store.put_preview(&p, None).await.unwrap();
    }
    w.dev.store.touch(&ids, 1).await.unwrap();
    let main = w.running("main").await;
    w.wait_state(main["id"].as_str().unwrap(), "sleeping").await;
    assert!(
        w.dev.store.idle_before(now(), 1000).await.unwrap().len() < ids.len(),
        "entries of previews that do not run were cleared"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_branch_is_one_preview_and_ids_have_64_bits() {
    let w = World::start().await;
    let a = w.preview("main").await;
    let (s, b) = w.op("POST", "/v1/projects/demo/previews", Some(json!({"ref": "refs/heads/main"}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(a["id"], b["id"]);
    assert_eq!(b["git_ref"], "main");
    let id = a["id"].as_str().unwrap();
    let hash = id.strip_prefix("pv-").unwrap();
    assert_eq!(hash.len(), 16, "64 bits of hash: {id}");
    assert!(a["label"].as_str().unwrap().ends_with(hash));
    for bad in ["-x", "a..b", "a b", "refs/heads/", "x.lock", "a:b"] {
        let (s, v) = w.op("POST", "/v1/projects/demo/previews", Some(json!({ "ref": bad }))).await;
        assert_eq!((s, v["field"].as_str()), (400, Some("ref")), "{bad}: {v}");
    }
    w.wait_state(id, "running").await;
    w.stop().await;
}

/// Whatever sits at a preview's id is only answered for its own project and ref: a
/// collision is refused, never the other tenant's preview.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_checks_project_and_ref_of_an_existing_record() {
    let w = World::start().await;
    let project = w.dev.store.project_by_name("demo").await.unwrap().unwrap();
    let id = format!("pv-{}", wakegate_core::host::ref_hash(&project.id, "main"));
    let mut other = wakegate_store::conformance::preview(&id);
    other.project_id = "p_another_tenant".into();
    other.git_ref = "secret-branch".into();
    w.dev.store.put_preview(&other, None).await.unwrap();
    let (s, v) = w.op("POST", "/v1/projects/demo/previews", Some(json!({"ref": "main"}))).await;
    assert_eq!(s, 409, "{v}");
    assert!(!v.to_string().contains("secret-branch"), "{v}");
    w.stop().await;
}

/// `kill -9` of a running app: the preview is marked failed within seconds, with the
/// app's log for operators; visitors get a page with a summary and a retry, and the
/// retry brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_app_is_noticed_and_can_be_rebuilt() {
    let w = World::start().await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    let machine = w.machine_of(id).await;
    let started = std::time::Instant::now();
    wakegate_testkit::kill_recorded_group(&w.dev.machines_dir.join(&machine).join("app.pid"));
    let failed = w.wait_state(id, "failed").await;
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "noticed within seconds");
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("exited") && reason.contains("demo app listening"), "the log for operators: {reason}");
    let page = w.visit(&p, "/").await;
    assert_eq!(page.status, 503);
    assert!(page.body.contains("This preview stopped") && page.body.contains("Start it again"), "{}", page.body);
    assert_eq!(failed["phase"], "run", "{failed}");
    assert!(!page.body.contains("demo app listening"), "no log lines for visitors: {}", page.body);
    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/rebuild"), None).await;
    assert_eq!(s, 202);
    w.wait_state(id, "running").await;
    assert!(w.visit(&p, "/").await.body.contains("Hello from the main branch"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_build_output_is_for_operators_only() {
    let w = World::start().await;
    wakegate_testkit::git::git(&w.repo.work, &["checkout", "-q", "-b", "leaky"]);
    w.repo.commit(
        &[("wakegate.toml", "build = \"echo DATABASE_PASSWORD=hunter2; exit 3\"\nrun = \"python3 app.py\"\n")],
        "a build that prints a secret",
    );
    wakegate_testkit::git::git(&w.repo.work, &["push", "-q", "origin", "leaky"]);
    let p = w.preview("leaky").await;
    let failed = w.wait_state(p["id"].as_str().unwrap(), "failed").await;
    assert!(failed["reason"].as_str().unwrap().contains("hunter2"), "operators see the output: {failed}");
    let page = w.visit(&p, "/").await;
    assert_eq!(page.status, 503);
    assert!(page.body.contains("The build failed."), "{}", page.body);
    assert!(!page.body.contains("hunter2"), "visitors never do: {}", page.body);
    w.stop().await;
}
