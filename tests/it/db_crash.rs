//! Kill the provisioner (SIGKILL, a separate process on Redis) while it imports a dump
//! into a preview's database, and start it again: the import starts over on a fresh
//! data directory, the preview is never ready with a half-imported database, and nothing
//! the killed run started is left.

use crate::common;

use common::*;
use serde_json::json;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use wakegate_core::lifecycle::{Phase, State};
use wakegate_store::{RedisStore, Store};
use wakegate_testkit::redis::RedisServer;
use wakegate_testkit::s3::S3Server;
use wakegate_testkit::Proc;

const DB_APP: &str = include_str!("../../examples/db-app/app.py");

fn provisioner(redis: &str, data: &std::path::Path, s3: &S3Server) -> Proc {
    provisioner_process(redis, data, &s3.settings("dumps"))
}

/// About `mb` MB of inserts: a few seconds of importing.
fn dump(mb: usize) -> String {
    let mut s = String::from(
        "CREATE TABLE greeting (id int PRIMARY KEY, message text);\n\
         INSERT INTO greeting VALUES (1, 'imported whole');\n\
         CREATE TABLE users (id int PRIMARY KEY, email text);\n\
         INSERT INTO users VALUES (1, 'a@real.example');\n\
         CREATE TABLE notes (note text);\n\
         CREATE TABLE filler (id int, payload text);\n",
    );
    let mut id = 0;
    while s.len() < mb * 1_000_000 {
        s.push_str("INSERT INTO filler VALUES ");
        for row in 0..100 {
            id += 1;
            if row > 0 {
                s.push(',');
            }
            s.push_str(&format!("({id}, 'row {id} of the filler table, long enough to take a while to import')"));
        }
        s.push_str(";\n");
    }
    // the last row says the import got to the end
    s.push_str("UPDATE greeting SET message = 'imported whole, to the last statement';\n");
    s
}

/// Redis, S3, a waker in this process, and a project `big` whose base is a 40 MB
/// PostgreSQL dump (the provisioners are separate processes the tests kill).
struct Stand {
    redis: RedisServer,
    s3: S3Server,
    store: Arc<dyn Store>,
    data: std::path::PathBuf,
    machines: std::path::PathBuf,
    waker_addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
    repo: wakegate_testkit::git::Repo,
}

const TOKEN: &str = "operator-token-for-the-db-crash-test";

impl Stand {
    async fn start() -> Stand {
        let redis = RedisServer::start().await.unwrap();
        let s3 = S3Server::start().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url(), "wg:").await.unwrap());
        let data = wakegate_testkit::tempdir("dbcrash");
        let machines = data.join("machines");
        let bucket = bucket_of(&s3, "dumps");
        bucket.ensure().await.unwrap();
        let waker = Arc::new(
            wakegate_waker::Waker::new(
                store.clone(),
                wakegate_waker::WakerConfig {
                    edge_key: wakegate_core::sign::Key::new(b"edge-key-for-the-db-crash-test".to_vec()),
                    operator_token: TOKEN.into(),
                    preview_base: "localhost".into(),
                    preview_url_template: "http://{label}.localhost:1".into(),
                },
                Arc::new(wakegate_waker::refs::GitRefs::new(Duration::from_secs(1))),
            )
            .with_dumps(Some(bucket)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let waker_addr = listener.local_addr().unwrap();
        let server = tokio::spawn(wakegate_waker::serve(listener, waker));

        let manifest =
            "run = \"exec python3 app.py\"\nhealth = \"/health\"\n[database]\nengine = \"postgres\"\nsanitize = false\n";
        let repo = wakegate_testkit::git::Repo::new(&[("app.py", DB_APP), ("wakegate.toml", manifest)]);
        repo.branch("feature/b", &[("README", "b")]);
        repo.branch("feature/c", &[("README", "c")]);
        let st = Stand { redis, s3, store, data, machines, waker_addr, server, repo };
        let (s, _) = st.op("POST", "/v1/projects", Some(json!({"name": "big", "git_url": st.repo.url()}))).await;
        assert_eq!(s, 201);
        let file = st.data.join("big.sql");
        std::fs::write(&file, dump(40)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_wakegate"))
            .args(["db", "push", "big", file.to_str().unwrap(), "--engine", "postgres"])
            .env("WAKEGATE_WAKER_URL", format!("http://{waker_addr}"))
            .env("WAKEGATE_OPERATOR_TOKEN", TOKEN)
            .env("XDG_STATE_HOME", st.data.join("state"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        st
    }

    async fn op(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        wakegate::operator::call(self.waker_addr, TOKEN, method, path, body).await.unwrap()
    }

    fn provisioner(&self) -> Proc {
        provisioner(&self.redis.url(), &self.data, &self.s3)
    }

    /// A preview of `git_ref`, asked for.
    async fn preview(&self, git_ref: &str) -> String {
        let (s, p) = self.op("POST", "/v1/projects/big/previews", Some(json!({"ref": git_ref}))).await;
        assert_eq!(s, 201, "{p}");
        p["id"].as_str().unwrap().to_string()
    }

    async fn settled(&self, id: &str) -> wakegate_store::Versioned<wakegate_core::route::Preview> {
        wakegate_testkit::eventually(WAIT, "the build to finish", || async {
            let p = self.store.get_preview(id).await.ok()??;
            matches!(p.value.state, State::Running { .. } | State::Failed { .. }).then_some(p)
        })
        .await
    }

    /// Stops everything the provisioners started (they were killed, not stopped).
    fn clean_up(&self) {
        for root in [self.machines.clone(), self.data.join("db-images")] {
            for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
                for pidfile in ["app.pid", "db.pid", "import.pid", "build.pid"] {
                    wakegate_testkit::kill_recorded_group(&e.path().join(pidfile));
                }
            }
        }
        self.server.abort();
    }
}

/// What the app at `origin` answers at `/`.
async fn message(origin: &str) -> String {
    let port = origin.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wakegate_testkit::http::send(addr, "GET", "app", "/", &[], String::new()).await.unwrap().body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provisioner_killed_mid_import_starts_the_import_over() {
    let st = Stand::start().await;
    let (store, machines) = (&st.store, &st.machines);
    let id = st.preview("main").await;
    let first = st.provisioner();
    // wait until the import streams, with its progress on the record (the splash shows it)
    let (machine, import_pgid, db_pgid) = wakegate_testkit::eventually(WAIT, "the import to be under way", || async {
        let p = store.get_preview(&id).await.ok()??;
        let State::Building { machine: Some(m), phase: Phase::RestoringDb, .. } = &p.value.state else {
            return None;
        };
        // the first record says only how (an import), with no bytes yet
        let progress = p.value.progress.filter(|g| g.done > 0)?;
        assert!(progress.total > 40_000_000, "{progress:?}");
        let dir = machines.join(m);
        Some((m.clone(), read_pid(&dir.join("import.pid"))?, read_pid(&dir.join("db.pid"))?))
    })
    .await;
    drop(first); // SIGKILL: the import and the database server are left running
    let p = store.get_preview(&id).await.unwrap().unwrap();
    assert!(matches!(p.value.state, State::Building { .. }), "not ready half-imported: {:?}", p.value.state);

    let _second = st.provisioner();
    let done = st.settled(&id).await;
    let State::Running { machine: serving, origin } = &done.value.state else {
        panic!("expected running: {:?}", done.value.state)
    };
    assert_eq!(serving, &machine);
    // the database is whole: the dump's last statement ran
    assert_eq!(message(origin).await, "message: imported whole, to the last statement");
    // what the killed run started is gone: its import and its database server
    assert!(!group_alive(import_pgid), "the interrupted import was stopped");
    assert!(!group_alive(db_pgid), "the killed run's database server was stopped");
    let dirs: Vec<String> =
        std::fs::read_dir(machines).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(dirs, vec![serving.clone()]);
    st.clean_up();
}

/// Kill the provisioner while it bakes the project's image: the half-baked image is
/// never used (a build meanwhile imports), the next run removes what the killed bake
/// left (its directory, its import, its database server) and bakes again, and the
/// previews after it clone the whole image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provisioner_killed_mid_bake_leaves_nothing_half_baked() {
    let st = Stand::start().await;
    let images = st.data.join("db-images");
    let a = st.preview("main").await;
    let first = st.provisioner();
    // the first build imports and records the recipe; the bake follows
    assert!(matches!(st.settled(&a).await.value.state, State::Running { .. }));
    let (image, import_pgid, db_pgid) =
        wakegate_testkit::eventually(WAIT, "the bake's import to be under way", || async {
            let (_, v) = st.op("GET", "/v1/db/images", None).await;
            let i = v["images"].as_array()?.first()?.clone();
            assert_eq!(i["state"], "baking", "{i}");
            // the attempt's own directory, `<id>.<worker>-<attempt>.baking`
            let id = i["id"].as_str()?;
            let dir = std::fs::read_dir(&images).ok()?.flatten().map(|e| e.path()).find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(&format!("{id}.")) && name.ends_with(".baking")
            })?;
            Some((i["id"].as_str()?.to_string(), read_pid(&dir.join("import.pid"))?, read_pid(&dir.join("db.pid"))?))
        })
        .await;
    drop(first); // SIGKILL mid-import
    let (_, v) = st.op("GET", "/v1/db/images", None).await;
    assert_eq!(v["images"][0]["state"], "baking", "never ready half-baked: {v}");

    // a build while the image is not whole imports, and the splash says why
    let b = st.preview("feature/b").await;
    let _second = st.provisioner();
    let seen = wakegate_testkit::eventually(WAIT, "b to restore its database", || async {
        let p = st.store.get_preview(&b).await.ok()??;
        p.value.progress.and_then(|g| g.how)
    })
    .await;
    assert_eq!(seen, wakegate_core::route::Restore::ImportWhileBaking);
    let done = st.settled(&b).await;
    let State::Running { origin, .. } = &done.value.state else { panic!("b: {:?}", done.value.state) };
    assert_eq!(message(origin).await, "message: imported whole, to the last statement");
    let (_, made) = st.op("GET", &format!("/v1/previews/{b}/db"), None).await;
    assert_eq!(made["method"], "import", "{made}");

    // the killed bake is taken over: its leftovers stopped and removed, baked again
    let ready = wakegate_testkit::eventually(WAIT, "the image to be baked again", || async {
        let (_, v) = st.op("GET", "/v1/db/images", None).await;
        let i = v["images"].as_array()?.first()?.clone();
        (i["state"] == "ready").then_some(i)
    })
    .await;
    assert_eq!(ready["id"], image.as_str());
    assert_eq!(ready["attempts"], 2, "{ready}");
    assert!(!group_alive(import_pgid), "the killed bake's import was stopped");
    assert!(!group_alive(db_pgid), "the killed bake's database server was stopped");
    let left: Vec<String> =
        std::fs::read_dir(&images).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec![image.clone()], "only the whole image");

    // the next preview clones it, whole
    let c = st.preview("feature/c").await;
    let done = st.settled(&c).await;
    let State::Running { origin, .. } = &done.value.state else { panic!("c: {:?}", done.value.state) };
    assert_eq!(message(origin).await, "message: imported whole, to the last statement");
    let (_, made) = st.op("GET", &format!("/v1/previews/{c}/db"), None).await;
    assert_eq!(made["image"], image.as_str(), "{made}");
    st.clean_up();
}
