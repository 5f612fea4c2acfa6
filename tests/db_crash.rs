//! Kill the provisioner (SIGKILL, a separate process on Redis) while it imports a dump
//! into a preview's database, and start it again: the import starts over on a fresh
//! data directory, the preview is never ready with a half-imported database, and nothing
//! the killed run started is left.

mod common;

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

const DB_APP: &str = include_str!("../examples/db-app/app.py");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provisioner_killed_mid_import_starts_the_import_over() {
    let redis = RedisServer::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url(), "wg:").await.unwrap());
    let data = wakegate_testkit::tempdir("dbcrash");
    let machines = data.join("machines");
    let token = "operator-token-for-the-db-crash-test";
    let bucket = bucket_of(&s3, "dumps");
    bucket.ensure().await.unwrap();
    let waker = Arc::new(
        wakegate_waker::Waker::new(
            store.clone(),
            wakegate_waker::WakerConfig {
                edge_key: wakegate_core::sign::Key::new(b"edge-key-for-the-db-crash-test".to_vec()),
                operator_token: token.into(),
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
    let op = |method: &'static str, path: String, body: Option<serde_json::Value>| async move {
        wakegate::operator::call(waker_addr, token, method, &path, body).await.unwrap()
    };
    let (s, _) = op("POST", "/v1/projects".into(), Some(json!({"name": "big", "git_url": repo.url()}))).await;
    assert_eq!(s, 201);
    let file = data.join("big.sql");
    std::fs::write(&file, dump(40)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wakegate"))
        .args(["db", "push", "big", file.to_str().unwrap(), "--engine", "postgres"])
        .env("WAKEGATE_WAKER_URL", format!("http://{waker_addr}"))
        .env("WAKEGATE_OPERATOR_TOKEN", token)
        .env("XDG_STATE_HOME", data.join("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (s, p) = op("POST", "/v1/projects/big/previews".into(), Some(json!({"ref": "main"}))).await;
    assert_eq!(s, 201);
    let id = p["id"].as_str().unwrap().to_string();

    let first = provisioner(&redis.url(), &data, &s3);
    // wait until the import streams, with its progress on the record (the splash shows it)
    let (machine, import_pgid, db_pgid) = wakegate_testkit::eventually(WAIT, "the import to be under way", || async {
        let p = store.get_preview(&id).await.ok()??;
        let State::Building { machine: Some(m), phase: Phase::RestoringDb, .. } = &p.value.state else {
            return None;
        };
        let progress = p.value.progress?;
        assert!(progress.total > 40_000_000, "{progress:?}");
        if progress.done == 0 {
            return None;
        }
        let dir = machines.join(m);
        Some((m.clone(), read_pid(&dir.join("import.pid"))?, read_pid(&dir.join("db.pid"))?))
    })
    .await;
    drop(first); // SIGKILL: the import and the database server are left running
    let p = store.get_preview(&id).await.unwrap().unwrap();
    assert!(matches!(p.value.state, State::Building { .. }), "not ready half-imported: {:?}", p.value.state);

    let _second = provisioner(&redis.url(), &data, &s3);
    let done = wakegate_testkit::eventually(WAIT, "the build to finish after the restart", || async {
        let p = store.get_preview(&id).await.ok()??;
        matches!(p.value.state, State::Running { .. } | State::Failed { .. }).then_some(p)
    })
    .await;
    let State::Running { machine: serving, origin } = &done.value.state else {
        panic!("expected running: {:?}", done.value.state)
    };
    assert_eq!(serving, &machine);
    // the database is whole: the dump's last statement ran
    let port = origin.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let r = wakegate_testkit::http::send(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "GET",
        "app",
        "/",
        &[],
        String::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.body, "message: imported whole, to the last statement");
    // what the killed run started is gone: its import and its database server
    assert!(!group_alive(import_pgid), "the interrupted import was stopped");
    assert!(!group_alive(db_pgid), "the killed run's database server was stopped");
    let dirs: Vec<String> =
        std::fs::read_dir(&machines).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(dirs, vec![serving.clone()]);

    for pidfile in ["app.pid", "db.pid"] {
        wakegate_testkit::kill_recorded_group(&machines.join(serving).join(pidfile));
    }
    server.abort();
}
