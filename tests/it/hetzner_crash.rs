//! Crash safety on the Hetzner backend, and replicas sharing one Redis.
//!
//! The crash test walks one preview through build → hibernate → wake → erase. For every
//! step that changes the cloud (each mutating Hetzner API call), it crashes the
//! provisioner there, once *before* the call takes effect and once *after* it took
//! effect but before its answer arrived: the fake API holds the request forever and
//! the provisioner's runtime is torn down mid-flight. A fresh provisioner then takes
//! over from the store, and the test asserts that the flow completes, no preview is
//! lost, no preview ever has two servers, and once the reaper has run no server or
//! image exists that no record references.

use crate::common;

use common::{APP, MAIN, MANIFEST};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use wakegate_core::lifecycle::State;
use wakegate_core::sign::Key;
use wakegate_provisioner::agent_api::AgentApi;
use wakegate_provisioner::hetzner::{api::ClientOptions, HetznerCloud, HetznerSettings};
use wakegate_provisioner::runner::Provisioner;
use wakegate_store::SharedStore;
use wakegate_testkit::eventually;
use wakegate_testkit::hetzner::{AgentVms, Durations, FakeHetzner};

const TOKEN: &str = "operator-token-for-the-hetzner-crash-test";
const WAIT: Duration = Duration::from_secs(45);

struct Rig {
    fake: FakeHetzner,
    _vms: Arc<AgentVms>,
    store: SharedStore,
    waker: SocketAddr,
    agent: SocketAddr,
    key: Key,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
    repo: wakegate_testkit::git::Repo,
    rounds: std::sync::atomic::AtomicU32,
    /// The dumps' bucket, when the rig bakes database images.
    dumps: Option<wakegate_db::s3::Bucket>,
}

fn settings(fake: &FakeHetzner, agent: SocketAddr) -> HetznerSettings {
    let mut api = ClientOptions::new(fake.url(), fake.token.clone());
    api.action_poll = Duration::from_millis(20);
    api.action_poll_max = Duration::from_millis(100);
    api.backoff_base = Duration::from_millis(20);
    api.action_timeout = Duration::from_secs(20);
    api.request_timeout = Duration::from_secs(60);
    HetznerSettings {
        api,
        image: "ubuntu-24.04".into(),
        server_type: "cx22".into(),
        location: "fsn1".into(),
        control_url: format!("http://{agent}"),
        control_plane_ips: vec!["127.0.0.1/32".into()],
        edge_ranges: wakegate_provisioner::hetzner::CLOUDFLARE_RANGES.iter().map(|s| s.to_string()).collect(),
        app_port: 80,
        pools: Vec::new(),
        ready_timeout: Duration::from_secs(30),
        shutdown_timeout: Duration::from_secs(10),
    }
}

impl Rig {
    async fn start(store: SharedStore) -> Rig {
        Rig::start_with(store, None).await
    }

    async fn start_with(store: SharedStore, dumps: Option<wakegate_db::s3::Bucket>) -> Rig {
        let vms = AgentVms::new(wakegate_testkit::tempdir("crash-vms"));
        let fake = FakeHetzner::start(Durations::fast(), vms.clone()).await;
        let key = Key::new(b"machine-key-for-the-crash-test".to_vec());
        let waker = Arc::new(wakegate_waker::Waker::new(
            store.clone(),
            wakegate_waker::WakerConfig {
                edge_key: Key::new(b"edge-key-for-the-hetzner-crash-test".to_vec()),
                operator_token: TOKEN.into(),
                preview_base: "localhost".into(),
                preview_url_template: "http://{label}.localhost:1".into(),
            },
            Arc::new(wakegate_waker::refs::GitRefs::new(Duration::from_secs(1))),
        ));
        let wl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let al = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (waker_addr, agent_addr) = (wl.local_addr().unwrap(), al.local_addr().unwrap());
        // the agent endpoint is stateless: here it stands for the replicas that did not crash
        let cloud = Arc::new(HetznerCloud::new(settings(&fake, agent_addr), store.clone(), key.clone()).unwrap());
        // made once up front, so that each flow's steps are the same every round
        cloud.ensure_firewall().await.unwrap();
        let agent = Arc::new(AgentApi {
            store: store.clone(),
            cloud,
            key: key.clone(),
            retry_after: "0.1".into(),
            preview_url_template: "http://{label}.localhost:1".into(),
            dumps: dumps.clone(),
            db_images: true,
        });
        let tasks = vec![
            tokio::spawn(wakegate_waker::serve(wl, waker)),
            tokio::spawn(wakegate_provisioner::agent_api::serve(al, agent)),
        ];
        let repo =
            wakegate_testkit::git::Repo::new(&[("app.py", APP), ("wakegate.toml", MANIFEST), ("content.html", MAIN)]);
        Rig {
            fake,
            _vms: vms,
            store,
            waker: waker_addr,
            agent: agent_addr,
            key,
            _tasks: tasks,
            repo,
            rounds: Default::default(),
            dumps,
        }
    }

    async fn op(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        wakegate::operator::call(self.waker, TOKEN, method, path, body).await.unwrap()
    }

    /// The fake API crashes at mutating call `k`, before or after it takes effect.
    fn arm_crash(&self, k: u32, before: bool) {
        self.fake.with(|s| {
            s.faults.crashed = false;
            if before {
                s.faults.crash_before_mutations = Some(k);
            } else {
                s.faults.crash_after_mutations = Some(k);
            }
        });
    }

    fn disarm_crash(&self) {
        self.fake.with(|s| {
            s.faults.crash_after_mutations = None;
            s.faults.crash_before_mutations = None;
        });
    }

    fn replica(&self) -> Replica {
        Replica::start(self.store.clone(), settings(&self.fake, self.agent), self.key.clone(), self.dumps.clone())
    }

    async fn state(&self, id: &str) -> State {
        self.store.get_preview(id).await.unwrap().expect("the preview is never lost").value.state
    }

    async fn wait(&self, id: &str, what: &str, want: impl Fn(&State) -> bool) {
        eventually(WAIT, what, || async {
            let s = self.state(id).await;
            assert!(!matches!(s, State::Failed { .. }), "{what}: the preview failed: {s:?}");
            want(&s).then_some(())
        })
        .await
    }

    fn has_server(&self, preview: &str) -> bool {
        self.fake.with(|s| s.servers().iter().any(|x| x.3.get("preview").map(String::as_str) == Some(preview)))
    }

    /// Servers and images by machine label.
    fn cloud_machines(&self) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
        self.fake.with(|s| {
            let mut servers = BTreeMap::new();
            for (_, name, _, labels) in s.servers() {
                *servers.entry(labels.get("machine").cloned().unwrap_or(name)).or_insert(0) += 1;
            }
            let mut images = BTreeMap::new();
            for (id, labels) in s.images() {
                *images.entry(labels.get("machine").cloned().unwrap_or(id.to_string())).or_insert(0) += 1;
            }
            (servers, images)
        })
    }

    /// No preview has two servers; after reaping nothing is unreferenced, and the preview
    /// `id` is still there.
    async fn assert_consistent(&self, id: &str) {
        let _ = self.state(id).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let previews = self.store.list_previews().await.unwrap();
            let referenced: Vec<String> = previews
                .iter()
                .flat_map(|p| p.value.state.machines().iter().map(|m| m.to_string()).collect::<Vec<_>>())
                .collect();
            let servers_by_preview = self.fake.with(|s| {
                let mut n: BTreeMap<String, usize> = BTreeMap::new();
                for (_, _, _, labels) in s.servers() {
                    if let Some(p) = labels.get("preview") {
                        *n.entry(p.clone()).or_default() += 1;
                    }
                }
                n
            });
            assert!(servers_by_preview.values().all(|n| *n <= 1), "a preview with two servers: {servers_by_preview:?}");
            let (servers, images) = self.cloud_machines();
            assert!(servers.values().all(|n| *n <= 1), "two servers for one machine: {servers:?}");
            let stray: Vec<&String> = servers.keys().chain(images.keys()).filter(|m| !referenced.contains(m)).collect();
            if stray.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "unreferenced after {WAIT:?}: {stray:?}; servers {:?}; images {images:?}",
                self.fake.with(|s| s.servers()),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A provisioner in its own runtime, so that dropping the runtime is a crash.
struct Replica {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    fn start(
        store: SharedStore,
        settings: HetznerSettings,
        key: Key,
        dumps: Option<wakegate_db::s3::Bucket>,
    ) -> Replica {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.spawn(async move {
                let cloud = Arc::new(HetznerCloud::new(settings, store.clone(), key).unwrap());
                let mut p = Provisioner::new(
                    store,
                    cloud,
                    wakegate_provisioner::Settings {
                        lease: Duration::from_millis(1500),
                        poll: Duration::from_millis(200),
                        sweep_every: Duration::from_millis(200),
                        orphan_grace: Duration::from_millis(500),
                        preview_url_template: "http://{label}.localhost:1".into(),
                        // the fake API has no hourly allowance to protect
                        cloud_requests_per_hour: 1_000_000,
                        list_every: Duration::from_millis(200),
                        ..Default::default()
                    },
                );
                p.dumps = dumps;
                let p = Arc::new(p);
                let (keep, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(p.clone().run_sweeps(rx.clone()));
                tokio::spawn(p.clone().run_images(rx.clone()));
                p.run_jobs(rx).await;
                drop(keep);
            });
            let _ = rx.recv();
            // everything in flight stops where it is: a crash
            rt.shutdown_background();
        });
        Replica { stop: Some(tx), thread: Some(thread) }
    }

    fn kill(mut self) {
        drop(self.stop.take());
        let _ = self.thread.take().unwrap().join();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Flow {
    Build,
    Hibernate,
    Wake,
    Erase,
}

impl Rig {
    async fn begin(&self, flow: Flow, id: &mut String, project: &str) {
        match flow {
            Flow::Build => {
                // a new branch each time: a new preview
                let n = self.rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let branch = format!("round-{n}");
                self.repo.branch(&branch, &[]);
                let body = Some(json!({ "ref": branch }));
                let (s, p) = self.op("POST", &format!("/v1/projects/{project}/previews"), body).await;
                assert_eq!(s, 201, "{p}");
                *id = p["id"].as_str().unwrap().to_string();
            }
            Flow::Hibernate => assert_eq!(self.op("POST", &format!("/v1/previews/{id}/sleep"), None).await.0, 202),
            Flow::Wake => assert_eq!(self.op("POST", &format!("/v1/previews/{id}/wake"), None).await.0, 202),
            Flow::Erase => assert_eq!(self.op("POST", &format!("/v1/previews/{id}/erase"), None).await.0, 202),
        }
    }

    async fn finish(&self, flow: Flow, id: &str) {
        match flow {
            Flow::Build | Flow::Wake => self.wait(id, "running", |s| matches!(s, State::Running { .. })).await,
            Flow::Hibernate => self.wait(id, "sleeping", |s| matches!(s, State::Sleeping { .. })).await,
            Flow::Erase => self.wait(id, "erased", |s| matches!(s, State::Erased { .. })).await,
        }
    }

    /// Runs `flow` with a crash at mutating step `k` (before or after it took effect).
    /// Returns false when the flow has fewer than `k` steps (nothing crashed).
    async fn crash_during(&self, flow: Flow, id: &mut String, project: &str, k: u32, before: bool) -> bool {
        let first = self.replica();
        self.arm_crash(k, before);
        self.begin(flow, id, project).await;
        let crashed = eventually(WAIT, "the crash point or the end of the flow", || async {
            if self.fake.with(|s| s.faults.crashed) {
                return Some(true);
            }
            let s = self.state(id).await;
            let done = match flow {
                Flow::Build | Flow::Wake => matches!(s, State::Running { .. }),
                Flow::Hibernate => matches!(s, State::Sleeping { .. }),
                // the state says erased before the machines are gone
                Flow::Erase => matches!(s, State::Erased { .. }) && !self.has_server(id),
            };
            done.then_some(false)
        })
        .await;
        first.kill();
        self.disarm_crash();
        let second = self.replica();
        self.finish(flow, id).await;
        self.assert_consistent(id).await;
        second.kill();
        crashed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_at_any_step_of_build_hibernate_wake_erase_is_repaired() {
    let store: SharedStore = Arc::new(wakegate_store::EmbeddedStore::in_memory());
    let rig = Rig::start(store).await;
    let body = json!({"name": "crashy", "git_url": rig.repo.url(), "machine": {"sleep_mode": "hibernate"}});
    assert_eq!(rig.op("POST", "/v1/projects", Some(body)).await.0, 201);
    let flows = [Flow::Build, Flow::Hibernate, Flow::Wake, Flow::Erase];
    let mut crashes = 0;
    for (i, flow) in flows.into_iter().enumerate() {
        for before in [true, false] {
            for k in 1.. {
                // a fresh preview brought to where this flow starts, without crashes
                let mut id = String::new();
                {
                    let r = rig.replica();
                    for f in &flows[..i] {
                        rig.begin(*f, &mut id, "crashy").await;
                        rig.finish(*f, &id).await;
                    }
                    r.kill();
                }
                let crashed = rig.crash_during(flow, &mut id, "crashy", k, before).await;
                if crashed {
                    crashes += 1;
                    eprintln!("{flow:?}: crash {} step {k}: repaired", if before { "before" } else { "after" });
                }
                // leave nothing behind for the next round
                if !matches!(flow, Flow::Erase) {
                    let r = rig.replica();
                    rig.begin(Flow::Erase, &mut id, "crashy").await;
                    rig.finish(Flow::Erase, &id).await;
                    rig.assert_consistent(&id).await;
                    r.kill();
                }
                if !crashed {
                    break;
                }
                assert!(k < 10, "{flow:?} has more mutating steps than expected");
            }
        }
    }
    assert!(crashes >= 12, "only {crashes} crash points were exercised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_one_redis_do_each_job_once() {
    let redis = wakegate_testkit::redis::RedisServer::start().await.unwrap();
    let store: SharedStore = Arc::new(wakegate_store::RedisStore::connect(&redis.url(), "wg:").await.unwrap());
    let rig = Rig::start(store).await;
    assert_eq!(rig.op("POST", "/v1/projects", Some(json!({"name": "many", "git_url": rig.repo.url()}))).await.0, 201);
    let replicas: Vec<Replica> = (0..3).map(|_| rig.replica()).collect();
    let mut ids = Vec::new();
    for i in 0..6 {
        rig.repo.branch(&format!("b{i}"), &[]);
        let (s, p) = rig.op("POST", "/v1/projects/many/previews", Some(json!({"ref": format!("b{i}")}))).await;
        assert_eq!(s, 201, "{p}");
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        rig.wait(id, "running", |s| matches!(s, State::Running { .. })).await;
    }
    let creates = rig.fake.with(|s| s.calls().filter(|c| c == "POST /v1/servers").count());
    assert_eq!(creates, 6, "one server per preview, however many replicas");
    for id in &ids {
        assert_eq!(rig.op("POST", &format!("/v1/previews/{id}/sleep"), None).await.0, 202);
    }
    for id in &ids {
        rig.wait(id, "sleeping", |s| matches!(s, State::Sleeping { .. })).await;
    }
    let shutdowns = rig.fake.with(|s| s.calls().filter(|c| c.ends_with("/actions/shutdown")).count());
    assert_eq!(shutdowns, 6, "each sleep ran once");
    drop(replicas);
}

/// Crash safety of a database image's bake on Hetzner. For every mutating step of a
/// bake (the builder's create, its shutdown, the snapshot, the builder's delete), the
/// provisioner crashes there, once before the step took effect and once after; a fresh
/// one takes the bake over when its heartbeat is stale. The image ends ready with one
/// snapshot, and no builder server or bake order is left. Each round changes the
/// recipe, so the round before's image is no longer wanted: its snapshot is collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_at_any_step_of_a_bake_leaves_one_snapshot_and_no_builder() {
    use wakegate_db::{Dump, DumpState, Dumps, Engine, ImageState, Images, Recipe};
    let s3 = wakegate_testkit::s3::S3Server::start().await.unwrap();
    let bucket = common::bucket_of(&s3, "dumps");
    bucket.ensure().await.unwrap();
    let store: SharedStore = Arc::new(wakegate_store::EmbeddedStore::in_memory());
    let rig = Rig::start_with(store.clone(), Some(bucket.clone())).await;
    let body = json!({"name": "baker", "git_url": rig.repo.url()});
    assert_eq!(rig.op("POST", "/v1/projects", Some(body)).await.0, 201);
    let project = store.project_by_name("baker").await.unwrap().unwrap();
    // the project's base dump, in S3
    let mut sql = Vec::new();
    wakegate_testkit::dump::write_sql(&mut sql, 256 * 1024, "baked through crashes").unwrap();
    let mut dump = Dump::new(&project.id, Engine::Postgres, "base.sql", "wakegate/", wakegate_provisioner::now_ms());
    bucket.upload_reader(&dump.key, &sql[..], 5 << 20).await.unwrap();
    dump.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&sql));
    (dump.state, dump.size, dump.sql_bytes) = (DumpState::Ready, sql.len() as u64, sql.len() as u64);
    let dumps = Dumps::new(store.clone());
    dumps.create(&dump).await.unwrap();
    dumps.set_base(&project.id, None, &dump.id).await.unwrap();
    let images = Images::new(store.clone());

    let mut crashes = 0;
    let mut round = 0;
    for before in [true, false] {
        for k in 1.. {
            round += 1;
            let recipe = Recipe {
                engine: Engine::Postgres,
                name: "app".into(),
                sanitize: Some(format!("-- round {round}\nSELECT 1;\n")),
            };
            images.set_recipe(&project.id, &recipe).await.unwrap();
            let id = recipe.image_id(&dump.sha256);
            let first = rig.replica();
            rig.arm_crash(k, before);
            let crashed = eventually(WAIT, "the crash point or the image", || async {
                if rig.fake.with(|s| s.faults.crashed) {
                    return Some(true);
                }
                let i = images.get(&project.id, &id).await.unwrap();
                i.is_some_and(|i| i.state == ImageState::Ready).then_some(false)
            })
            .await;
            first.kill();
            rig.disarm_crash();
            let second = rig.replica();
            let image = eventually(Duration::from_secs(90), "the image, baked by the next provisioner", || async {
                let i = images.get(&project.id, &id).await.unwrap()?;
                assert_ne!(i.state, ImageState::Failed, "the bake failed: {i:?}");
                (i.state == ImageState::Ready).then_some(i)
            })
            .await;
            // one snapshot (this image's), no builder, no order: the round before's
            // image collected too
            eventually(WAIT, "nothing but the image's snapshot", || async {
                let (snapshots, builders) = rig.fake.with(|s| {
                    let snaps: Vec<(i64, BTreeMap<String, String>)> = s.images();
                    let builders = s.servers().into_iter().filter(|x| x.3.contains_key("role")).count();
                    (snaps, builders)
                });
                let orders = store.table_list(wakegate_provisioner::hetzner::bake::BAKES).await.unwrap();
                let one = snapshots.len() == 1
                    && snapshots[0].0.to_string() == image.location
                    && snapshots[0].1.get("image") == Some(&id);
                (one && builders == 0 && orders.is_empty()).then_some(())
            })
            .await;
            second.kill();
            if crashed {
                crashes += 1;
                eprintln!("bake: crash {} step {k}: repaired", if before { "before" } else { "after" });
            } else {
                break;
            }
            assert!(k < 10, "a bake has more mutating steps than expected");
        }
    }
    assert!(crashes >= 6, "only {crashes} crash points of a bake were exercised");
}
