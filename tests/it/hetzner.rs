//! Wakegate on the Hetzner backend, end to end: edge, waker and provisioner as in
//! `wakegate dev`, the production Hetzner client pointed at the stateful fake API
//! (`wakegate_testkit::hetzner`), and every fake server playing its VM by running the
//! agent its cloud-init user data carries, which pulls its work from the agent
//! endpoint and reports there. Visits go through the edge as a visitor's would.

use crate::common;

use common::*;
use serde_json::{json, Value};
use wakegate_testkit::eventually;
use wakegate_testkit::hetzner::{cloud_config_files, AGENT_PATH};

fn servers(c: &HetznerCloud) -> Vec<(i64, String, String, std::collections::BTreeMap<String, String>)> {
    c.fake.with(|s| s.servers())
}

fn calls(c: &HetznerCloud, what: &str) -> usize {
    c.fake.with(|s| s.calls().filter(|l| l == what).count())
}

async fn content(w: &World, p: &Value) -> String {
    eventually(WAIT, "the app behind the edge", || async {
        let r = w.visit(p, "/").await;
        (r.status == 200 && r.body.contains("<h1")).then_some(r.body)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_visit_stop_wake_erase_on_hetzner() {
    let c = hetzner_cloud().await;
    let w = hetzner_world(&c, &[]).await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    assert!(content(&w, &p).await.contains("main"), "the main branch's page");

    // one server, labelled, firewalled, deployed by cloud-init's agent; the edge reaches
    // it by its reverse-DNS name (Workers cannot fetch IP addresses)
    let machine = w.machine_of(id).await;
    let state = w.dev.store.get_preview(id).await.unwrap().unwrap().value.state;
    let wakegate_core::lifecycle::State::Running { origin, .. } = state else { panic!("{state:?}") };
    assert!(origin.starts_with("http://localhost:"), "{origin}");
    let list = servers(&c);
    assert_eq!(list.len(), 1, "{list:?}");
    let (sid, name, status, labels) = &list[0];
    assert_eq!((name.as_str(), status.as_str()), (machine.as_str(), "running"));
    assert_eq!(labels.get("managed-by").map(String::as_str), Some("wakegate"));
    assert_eq!(labels.get("machine"), Some(&machine));
    assert_eq!(labels.get("preview").map(String::as_str), Some(id));
    assert_eq!(labels.get("project").map(String::as_str), Some("demo"));
    let fws = c.fake.with(|s| s.firewalls());
    assert_eq!(fws.len(), 1);
    assert_eq!(c.fake.with(|s| s.server_firewalls(*sid)), vec![fws[0].0], "the firewall is attached at creation");
    let rules = &fws[0].2;
    let ports: Vec<&str> = rules.iter().map(|r| r["port"].as_str().unwrap()).collect();
    assert_eq!(ports, ["80", "443"], "HTTP(S) only");
    for r in rules {
        assert_eq!(r["direction"], "in");
        let src: Vec<&str> = r["source_ips"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(src.contains(&"173.245.48.0/20") && src.contains(&"2606:4700::/32"), "Cloudflare's ranges");
        assert!(src.contains(&"203.0.113.7/32"), "the control plane");
        assert!(!src.contains(&"0.0.0.0/0"));
    }
    let ud = c.fake.with(|s| s.user_data(*sid)).unwrap();
    assert!(cloud_config_files(&ud).unwrap().contains_key(AGENT_PATH));
    assert!(!ud.contains(MACHINE_KEY), "the machine key never leaves the control plane");

    // sleep = power off (stop mode); the server stays
    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    assert_eq!(s, 202);
    w.wait_state(id, "sleeping").await;
    assert_eq!(servers(&c)[0].2, "off");
    // a visit wakes it: power on, the agent starts the app again without rebuilding
    let page = w.visit(&p, "/").await;
    assert!(page.body.contains("Waking this preview"), "the waking page while it boots: {}", page.body);
    assert!(content(&w, &p).await.contains("main"));
    assert_eq!(servers(&c).len(), 1);
    assert_eq!(calls(&c, &format!("POST /v1/servers/{sid}/actions/poweron")), 1);
    assert_eq!(calls(&c, "POST /v1/servers"), 1, "a wake creates nothing");

    // erase: the server goes
    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    assert_eq!(s, 202);
    w.wait_state(id, "erased").await;
    eventually(WAIT, "the server to be deleted", || async { servers(&c).is_empty().then_some(()) }).await;
    w.stop().await;
    drop(c.vms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hibernate_snapshots_deletes_and_wakes_from_the_snapshot() {
    let c = hetzner_cloud().await;
    let w = hetzner_world(&c, &[]).await;
    let body =
        json!({"name": "hib", "git_url": w.repo.url(), "machine": {"sleep_mode": "hibernate", "server_type": "cpx11"}});
    let (s, v) = w.op("POST", "/v1/projects", Some(body)).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["machine"]["sleep_mode"], "hibernate");
    let (s, p) = w.op("POST", "/v1/projects/hib/previews", Some(json!({"ref": "feature/blue"}))).await;
    assert_eq!(s, 201, "{p}");
    let id = p["id"].as_str().unwrap();
    w.wait_state(id, "running").await;
    assert!(content(&w, &p).await.contains("blue"));
    let machine = w.machine_of(id).await;

    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    assert_eq!(s, 202);
    w.wait_state(id, "sleeping").await;
    assert!(servers(&c).is_empty(), "hibernated: no server is billed");
    let images = c.fake.with(|s| s.images());
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].1.get("machine"), Some(&machine));
    assert_eq!(images[0].1.get("managed-by").map(String::as_str), Some("wakegate"));

    // a visit creates the server again from the snapshot, under the same name
    assert!(content(&w, &p).await.contains("blue"));
    let list = servers(&c);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].1, machine);
    eventually(WAIT, "the spent snapshot to be deleted", || async {
        c.fake.with(|s| s.images()).is_empty().then_some(())
    })
    .await;
    assert_eq!(calls(&c, "POST /v1/servers"), 2, "built once, woken once");

    // erasing a hibernated preview deletes its snapshot
    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    assert_eq!(s, 202);
    w.wait_state(id, "sleeping").await;
    assert_eq!(c.fake.with(|s| s.images()).len(), 1);
    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    assert_eq!(s, 202);
    w.wait_state(id, "erased").await;
    eventually(WAIT, "nothing left", || async {
        (servers(&c).is_empty() && c.fake.with(|s| s.images()).is_empty()).then_some(())
    })
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pools_hand_out_ready_machines_refill_and_recycle() {
    let c = hetzner_cloud().await;
    let w = hetzner_world(&c, &[("WAKEGATE_POOLS", "cx22@fsn1:2:3:3")]).await;
    let pooled =
        || servers(&c).into_iter().filter(|s| s.3.contains_key("pool") && !s.3.contains_key("preview")).count();
    let table = wakegate_provisioner::hetzner::pool_table(&wakegate_provisioner::hetzner::pool_key(
        "ubuntu-24.04",
        "cx22",
        "fsn1",
    ));
    let ready: Vec<String> = eventually(WAIT, "two ready pool machines", || async {
        let ready = w.dev.store.table_list(&table).await.unwrap();
        (ready.len() >= 2).then(|| ready.into_iter().map(|(m, _)| m).collect())
    })
    .await;
    let p = w.running("main").await;
    let machine = w.machine_of(p["id"].as_str().unwrap()).await;
    assert!(ready.contains(&machine), "the build took a ready machine: {machine} in {ready:?}");
    assert!(content(&w, &p).await.contains("main"));
    // the keeper refills, and never passes max
    eventually(WAIT, "the pool to be refilled", || async { (pooled() >= 2).then_some(()) }).await;
    assert!(pooled() <= 3);
    // ready machines older than max age (3 s) are replaced
    let before: Vec<String> = servers(&c).into_iter().filter(|s| !s.3.contains_key("preview")).map(|s| s.1).collect();
    eventually(WAIT, "old pool machines to be recycled", || async {
        let now: Vec<String> = servers(&c).into_iter().filter(|s| !s.3.contains_key("preview")).map(|s| s.1).collect();
        (now.len() >= 2 && now.iter().all(|m| !before.contains(m))).then_some(())
    })
    .await;
    // the preview's machine is not the pool's any more
    assert!(servers(&c).iter().any(|s| s.1 == machine));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_faults_are_retried_and_failed_actions_fail_the_build_clearly() {
    let c = hetzner_cloud().await;
    let w = hetzner_world(&c, &[]).await;
    c.fake.with(|s| {
        s.faults.rate_limited = 3;
        s.faults.unavailable = 2;
        s.faults.slow_by_ms = 300;
    });
    let p = w.running("main").await;
    assert!(content(&w, &p).await.contains("main"));
    let counters = w.dev.hetzner.as_ref().unwrap().client().counters();
    assert!(counters.rate_limited >= 3 && counters.retries >= 5, "{counters:?}");

    c.fake.with(|s| {
        s.faults.slow_by_ms = 0;
        s.faults.fail_action = vec!["create_server".into()];
    });
    let q = w.preview("feature/blue").await;
    let qid = q["id"].as_str().unwrap();
    let failed = w.wait_state(qid, "failed").await;
    assert!(failed["reason"].as_str().unwrap().contains("create_server failed"), "{failed}");
    // the failed machine is cleaned up, and a rebuild works
    eventually(WAIT, "the failed server to be deleted", || async { (servers(&c).len() == 1).then_some(()) }).await;
    let (s, _) = w.op("POST", &format!("/v1/previews/{qid}/rebuild"), None).await;
    assert_eq!(s, 202);
    w.wait_state(qid, "running").await;
    assert!(content(&w, &q).await.contains("blue"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reaper_deletes_orphans_and_a_vanished_server_fails_its_preview() {
    let c = hetzner_cloud().await;
    let w = hetzner_world(&c, &[]).await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    // an orphan: a managed server no record references (a crash between create and record)
    let client = w.dev.hetzner.as_ref().unwrap().client();
    let mut req = hcloud::models::CreateServerRequest::new("ubuntu-24.04".into(), "wg-orphan".into(), "cx22".into());
    req.labels =
        Some([("managed-by".to_string(), "wakegate".to_string()), ("machine".into(), "wg-orphan".into())].into());
    client.create_server(&req).await.unwrap();
    let foreign = hcloud::models::CreateServerRequest::new("ubuntu-24.04".into(), "not-ours".into(), "cx22".into());
    let foreign = client.create_server(&foreign).await.unwrap();
    client.wait(*foreign.action).await.unwrap();
    // orphaned snapshots: one of a machine no record knows, one without a machine label
    let labels = |m: Option<&str>| {
        let mut l = std::collections::HashMap::from([("managed-by".to_string(), "wakegate".to_string())]);
        if let Some(m) = m {
            l.insert("machine".into(), m.into());
        }
        l
    };
    client.create_snapshot(foreign.server.id, "stray", labels(Some("wg-gone"))).await.unwrap();
    client.create_snapshot(foreign.server.id, "stray", labels(None)).await.unwrap();
    assert_eq!(c.fake.with(|s| s.images()).len(), 2);
    eventually(WAIT, "the orphans to be reaped", || async {
        let names: Vec<String> = servers(&c).into_iter().map(|s| s.1).collect();
        (!names.contains(&"wg-orphan".to_string()) && c.fake.with(|s| s.images()).is_empty()).then_some(())
    })
    .await;
    let names: Vec<String> = servers(&c).into_iter().map(|s| s.1).collect();
    assert!(names.contains(&"not-ours".to_string()), "servers without our label are never touched");
    assert!(names.contains(&w.machine_of(id).await));

    // the preview's server disappears behind our back
    let sid = servers(&c).into_iter().find(|s| s.3.get("preview").map(String::as_str) == Some(id)).unwrap().0;
    c.fake.with(|s| s.vanish(sid, wakegate_provisioner::now_ms()));
    let failed = w.wait_state(id, "failed").await;
    assert!(failed["reason"].as_str().unwrap().contains("disappeared"), "{failed}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_paces_itself_before_the_rate_limit() {
    let c = hetzner_cloud().await;
    // 36000/h: one request back every 100 ms; only 5 left now
    c.fake.with(|s| {
        s.rate_limit = 36_000;
    });
    let mut opts = wakegate_provisioner::hetzner::api::ClientOptions::new(c.fake.url(), c.fake.token.clone());
    opts.reserve = 20;
    let client = wakegate_provisioner::hetzner::api::Client::new(opts).unwrap();
    client.servers("managed-by=wakegate").await.unwrap();
    c.fake.with(|s| s.drain_budget(5.0));
    for _ in 0..8 {
        client.servers("managed-by=wakegate").await.unwrap();
    }
    let k = client.counters();
    assert_eq!(k.rate_limited, 0, "pacing kept it under the limit: {k:?}");
    assert!(k.paced > 0, "{k:?}");
    // a wrong token is a clear error, not a retry loop
    let bad = wakegate_provisioner::hetzner::api::Client::new(wakegate_provisioner::hetzner::api::ClientOptions::new(
        c.fake.url(),
        "wrong",
    ))
    .unwrap();
    let e = bad.servers("").await.unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("unauthorized"), "{e}");
    drop(c.vms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_paginated_and_slow_actions_time_out() {
    let c = hetzner_cloud().await;
    let mut opts = wakegate_provisioner::hetzner::api::ClientOptions::new(c.fake.url(), c.fake.token.clone());
    opts.action_poll = std::time::Duration::from_millis(20);
    opts.action_poll_max = std::time::Duration::from_millis(100);
    opts.action_timeout = std::time::Duration::from_millis(300);
    let client = wakegate_provisioner::hetzner::api::Client::new(opts).unwrap();
    for i in 0..120 {
        let mut req = hcloud::models::CreateServerRequest::new("ubuntu-24.04".into(), format!("s{i}"), "cx22".into());
        let role = if i % 2 == 0 { "even" } else { "odd" };
        req.labels = Some([("managed-by".to_string(), "wakegate".to_string()), ("role".into(), role.into())].into());
        client.create_server(&req).await.unwrap();
    }
    let before = calls(&c, "GET /v1/servers");
    assert_eq!(client.servers("managed-by=wakegate").await.unwrap().len(), 120);
    assert_eq!(calls(&c, "GET /v1/servers") - before, 3, "three pages of 50");
    assert_eq!(client.servers("managed-by=wakegate,role=odd").await.unwrap().len(), 60);
    assert_eq!(client.servers("role in (odd,even),role!=odd").await.unwrap().len(), 60);
    let e = client.servers("a b").await.unwrap_err().to_string();
    assert!(e.contains("400") || e.contains("invalid"), "{e}");

    c.fake.with(|s| s.faults.slow_by_ms = 5_000);
    let req = hcloud::models::CreateServerRequest::new("ubuntu-24.04".into(), "slow".into(), "cx22".into());
    let created = client.create_server(&req).await.unwrap();
    let e = client.wait(*created.action).await.unwrap_err();
    assert!(matches!(e, wakegate_provisioner::hetzner::api::ApiError::ActionTimeout { .. }), "{e}");
    drop(c.vms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_endpoint_refuses_forged_and_foreign_reports() {
    let c = hetzner_cloud().await;
    let w = hetzner_world(&c, &[]).await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    let machine = w.machine_of(id).await;
    let agent = w.dev.agent_addr.unwrap();
    let key = wakegate_core::sign::Key::new(MACHINE_KEY.as_bytes().to_vec());
    let call = |m: String, token: String, method: &'static str, path: &'static str, body: String| async move {
        let auth = format!("Bearer {token}");
        let headers = [("x-wakegate-machine", m.as_str()), ("authorization", auth.as_str())];
        wakegate_testkit::http::send(agent, method, "control", path, &headers, body).await.unwrap()
    };
    let good = wakegate_core::sign::machine_token(&key, &machine);
    // its own machine may ask for work
    let r = call(machine.clone(), good.clone(), "GET", "/v1/agent/work", String::new()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["git_ref"], "main");
    // a forged token, another machine's token, no machine: refused
    let forged = wakegate_core::sign::machine_token(&wakegate_core::sign::Key::new(b"guessed".to_vec()), &machine);
    for (m, t) in [(machine.clone(), forged), ("wg-other".to_string(), good.clone()), (String::new(), good.clone())] {
        let r = call(m, t, "POST", "/v1/agent/ready", r#"{"port":1}"#.into()).await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // a machine that holds no preview cannot report on one
    let stranger = "wg-stranger".to_string();
    let st = wakegate_core::sign::machine_token(&key, &stranger);
    let r = call(stranger, st, "POST", "/v1/agent/ready", r#"{"port":1}"#.into()).await;
    assert_eq!(r.status, 410, "{}", r.body);
    // bad bodies get clear errors; an oversized one is refused whole
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/ready", r#"{"port":0}"#.into()).await;
    assert_eq!(r.status, 400);
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/phase", r#"{"phase":"dancing"}"#.into()).await;
    assert_eq!(r.status, 400);
    let big = format!(r#"{{"phase":"build","reason":"{}"}}"#, "x".repeat(64 * 1024));
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/failed", big).await;
    assert_eq!(r.status, 413);
    let r = call(machine.clone(), good.clone(), "GET", "/v1/agent/ready", String::new()).await;
    assert_eq!(r.status, 405, "an undeclared method");
    // database calls: a running machine is no builder, and builds no database now
    let baked = r#"{"image":"i-0011223344556677","size":1,"version":"postgres 15"}"#;
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/baked", baked.into()).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let both = r#"{"image":"i-0011223344556677","size":1,"version":"v","reason":"no"}"#;
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/baked", both.into()).await;
    assert_eq!(r.status, 400, "size and a reason: {}", r.body);
    let ask = r#"{"recipe":{"engine":"postgres","name":"app","sanitize":null},"image":"i-0011223344556677"}"#;
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/dump", ask.into()).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let made = r#"{"recipe":null,"dump":"d-1","image":null,"method":"import","took_ms":5}"#;
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/db", made.into()).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/db", r#"{"method":"teleport","took_ms":1}"#.into())
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // a recipe's sanitize SQL may be long (JSON may write each byte as six), up to a limit
    let huge = format!(r#"{{"recipe":{{"engine":"postgres","name":"app","sanitize":"{}"}}}}"#, "x".repeat(7 << 20));
    let r = call(machine.clone(), good.clone(), "POST", "/v1/agent/dump", huge).await;
    assert_eq!(r.status, 413, "{}", r.body);
    // none of that changed the preview
    let v = w.show(id).await;
    assert_eq!(v["state"], "running");
    assert!(content(&w, &p).await.contains("main"));
    // the agent saw its app exit: the preview is failed with the reason, for operators
    let r =
        call(machine.clone(), good.clone(), "POST", "/v1/agent/exited", r#"{"reason":"the app exited (137)"}"#.into())
            .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let v = w.wait_state(id, "failed").await;
    assert!(v["reason"].as_str().unwrap().contains("exited (137)"), "{v}");
    w.stop().await;
}
