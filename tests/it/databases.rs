//! Preview databases, driven the way an operator and a visitor would: `wakegate db push`
//! (the real binary, in a pseudo-terminal for its progress bar) against a real
//! S3-compatible server (s3s-fs on 127.0.0.1), previews whose app reads a real
//! PostgreSQL or MariaDB server the provisioner started for them, visited through the
//! edge.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use wakegate_db::s3::Bucket;
use wakegate_testkit::s3::S3Server;

const DB_APP: &str = include_str!("../../examples/db-app/app.py");
const SANITIZE: &str = include_str!("../../examples/db-app/db/sanitize.sql");
const BUCKET: &str = "dumps";

async fn world_with_s3() -> (World, S3Server, Bucket) {
    world_with_s3_in(wakegate_testkit::tempdir("e2e")).await
}

async fn world_with_s3_in(data: std::path::PathBuf) -> (World, S3Server, Bucket) {
    let s3 = S3Server::start().await.unwrap();
    let settings = s3.settings(BUCKET);
    let extra: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let w = World::start_in(data, &extra, 600).await;
    let bucket = bucket_of(&s3, BUCKET);
    bucket.ensure().await.unwrap();
    (w, s3, bucket)
}

/// `wakegate db …` against the world's waker; stdout, stderr, success.
fn cli(w: &World, state: &std::path::Path, args: &[&str]) -> (String, String, bool) {
    let out = cli_command(w, state, args).output().unwrap();
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into(), out.status.success())
}

fn cli_command(w: &World, state: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wakegate"));
    c.arg("db")
        .args(args)
        .env("WAKEGATE_WAKER_URL", format!("http://{}", w.dev.waker_addr))
        .env("WAKEGATE_OPERATOR_TOKEN", &w.dev.operator_token)
        .env("XDG_STATE_HOME", state)
        .stdin(Stdio::null());
    c
}

/// Runs the CLI with its stderr on a pseudo-terminal; what the terminal showed, and
/// whether it succeeded.
fn cli_in_pty(w: &World, state: &std::path::Path, args: &[&str]) -> (String, bool) {
    run_in_pty(cli_command(w, state, args), OnPty::Stderr, None)
}

/// About `mb` MB of SQL with a greeting, users and notes.
fn dump_sql(mb: usize, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(mb * 1_000_000 + 4096);
    wakegate_testkit::dump::write_sql(&mut out, mb as u64 * 1_000_000, message).unwrap();
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out).unwrap();
    out
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

async fn base_of(w: &World, project: &str) -> Value {
    let (s, v) = w.op("GET", &format!("/v1/projects/{project}/dumps"), None).await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn object_sha256(bucket: &Bucket, key: &str) -> String {
    use sha2::Digest;
    let mut stream = bucket.read(key).await.unwrap();
    let mut h = sha2::Sha256::new();
    while let Some(chunk) = stream.try_next().await.unwrap() {
        h.update(&chunk);
    }
    hex::encode(h.finalize())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_checks_resumes_and_keeps_history() {
    let (w, _s3, bucket) = world_with_s3().await;
    let dir = wakegate_testkit::tempdir("dumps");
    let state = dir.join("state");

    // a 50 MB .sql.gz through the CLI, its progress bar on a terminal
    let big = gzip(&dump_sql(70, "hello from the big dump"));
    assert!(big.len() > 50_000_000, "{} bytes", big.len());
    let file = dir.join("base.sql.gz");
    std::fs::write(&file, &big).unwrap();
    let (screen, ok) = cli_in_pty(&w, &state, &["push", "demo", file.to_str().unwrap(), "--engine", "postgres"]);
    assert!(ok, "push failed:\n{screen}");
    assert!(screen.contains("pushing base.sql.gz"), "{screen}");
    assert!(screen.contains("MiB") && screen.contains("ETA") && screen.contains("/s"), "no progress bar:\n{screen}");
    let list = base_of(&w, "demo").await;
    let base = list["base"].as_str().unwrap().to_string();
    let d = &list["dumps"][0];
    assert_eq!((d["id"].as_str().unwrap(), d["state"].as_str().unwrap()), (base.as_str(), "ready"));
    assert_eq!(d["sha256"], sha256_hex(&big));
    assert_eq!(d["size"], big.len() as u64);
    assert_eq!(d["gzip"], true);
    let project_id = w.dev.store.project_by_name("demo").await.unwrap().unwrap().id;
    let key = format!("wakegate/dumps/{project_id}/{base}");
    assert_eq!(object_sha256(&bucket, &key).await, sha256_hex(&big), "the object in S3 is the file");

    // refused before it becomes the base: cut short, a bad CRC, another engine
    let small = dump_sql(1, "a small one");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("cut.sql", small[..small.len() - 40].to_vec(), "cut short"),
        ("badcrc.sql.gz", {
            let mut z = gzip(&small);
            let n = z.len();
            z[n - 8] ^= 0xff;
            z
        }, "gzip"),
        ("truncated.sql.gz", { let z = gzip(&small); z[..z.len() * 2 / 3].to_vec() }, "gzip"),
        ("mysql.sql", b"-- MariaDB dump 10.19\n/*!40101 SET NAMES utf8mb4 */;\nCREATE TABLE `t` (a int);\n-- Dump completed on 2026-11-25\n".to_vec(), "MySQL/MariaDB"),
    ];
    for (name, bytes, why) in cases {
        let f = dir.join(name);
        std::fs::write(&f, &bytes).unwrap();
        let (_, err, ok) = cli(&w, &state, &["push", "demo", f.to_str().unwrap()]);
        assert!(!ok, "{name} was accepted");
        assert!(err.contains("refused") && err.contains(why), "{name}: {err}");
        assert_eq!(base_of(&w, "demo").await["base"], base.as_str(), "{name} changed the base");
    }

    // the waker checks too, whatever a client claims: a cut dump sent by hand
    let (s, started) = w.op("POST", "/v1/projects/demo/dumps", Some(json!({"name": "by-hand.sql"}))).await;
    assert_eq!(s, 201, "{started}");
    let id = started["dump"]["id"].as_str().unwrap().to_string();
    let (s, url) = w.op("POST", &format!("/v1/projects/demo/dumps/{id}/parts/1"), None).await;
    assert_eq!(s, 200, "{url}");
    let cut = &small[..small.len() / 2];
    let put = reqwest::Client::new().put(url["url"].as_str().unwrap()).body(cut.to_vec()).send().await.unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let (s, v) = w
        .op(
            "POST",
            &format!("/v1/projects/demo/dumps/{id}/complete"),
            Some(json!({"size": cut.len(), "sha256": sha256_hex(cut)})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let refused = wakegate_testkit::eventually(WAIT, "the waker to refuse the cut dump", || async {
        let (_, v) = w.op("GET", &format!("/v1/projects/demo/dumps/{id}"), None).await;
        (v["state"] == "rejected").then_some(v)
    })
    .await;
    assert!(refused["reason"].as_str().unwrap().contains("cut short"), "{refused}");
    assert_eq!(base_of(&w, "demo").await["base"], base.as_str());

    // an interrupted push resumes: kill the CLI once a part is in S3, push again
    let plain = dump_sql(26, "resumed");
    let f = dir.join("resume.sql");
    std::fs::write(&f, &plain).unwrap();
    let mut first = wakegate_testkit::Proc(
        cli_command(&w, &state, &["push", "demo", f.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let uploading = wakegate_testkit::eventually(WAIT, "a part of the first push to land", || async {
        let list = base_of(&w, "demo").await;
        let d =
            list["dumps"].as_array()?.iter().find(|d| d["name"] == "resume.sql" && d["state"] == "uploading")?.clone();
        let (s, parts) = w.op("GET", &format!("/v1/projects/demo/dumps/{}/parts", d["id"].as_str()?), None).await;
        (s == 200 && !parts.as_array()?.is_empty()).then_some(d)
    })
    .await;
    let _ = first.0.kill();
    let _ = first.0.wait();
    let (out, err, ok) = cli(&w, &state, &["push", "demo", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming the upload of"), "{err}");
    let resumed_id = uploading["id"].as_str().unwrap();
    assert!(out.contains(resumed_id), "the same dump was completed: {out}");
    let list = base_of(&w, "demo").await;
    assert_eq!(list["base"], resumed_id);
    let d = list["dumps"].as_array().unwrap().iter().find(|d| d["id"] == resumed_id).unwrap();
    assert_eq!(d["sha256"], sha256_hex(&plain));

    // history: list, use an earlier one, the base cannot be removed, another can
    let (out, _, ok) = cli(&w, &state, &["list", "demo"]);
    assert!(ok);
    assert!(out.contains(&base) && out.contains(resumed_id) && out.contains("(base)"), "{out}");
    let (_, _, ok) = cli(&w, &state, &["use", "demo", &base]);
    assert!(ok);
    assert_eq!(base_of(&w, "demo").await["base"], base.as_str());
    let (_, err, ok) = cli(&w, &state, &["rm", "demo", &base]);
    assert!(!ok && err.contains("is the base"), "{err}");
    let (_, err, ok) = cli(&w, &state, &["rm", "demo", resumed_id]);
    assert!(ok, "{err}");
    assert!(!base_of(&w, "demo").await["dumps"].as_array().unwrap().iter().any(|d| d["id"] == resumed_id));
    // a wrong token is a clear error
    let out = cli_command(&w, &state, &["list", "demo"]).env("WAKEGATE_OPERATOR_TOKEN", "nope").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the operator token"));
    w.stop().await;
}

fn db_repo(engine: &str) -> wakegate_testkit::git::Repo {
    let env = if engine == "mariadb" { "env = \"vars\"\n" } else { "" };
    let manifest = format!(
        "run = \"exec python3 app.py\"\nhealth = \"/health\"\n[database]\nengine = \"{engine}\"\nname = \"shop\"\n{env}"
    );
    let repo = wakegate_testkit::git::Repo::new(&[
        ("app.py", DB_APP),
        ("wakegate.toml", &manifest),
        ("db/sanitize.sql", SANITIZE),
    ]);
    repo.branch("feature/other", &[("README", "another branch")]);
    repo
}

/// MariaDB takes the same hand-written SQL (no PostgreSQL-only syntax in it).
fn small_dump(message: &str) -> Vec<u8> {
    dump_sql(1, message)
}

/// A preview of `git_ref` in `project`, once running.
async fn running(w: &World, project: &str, git_ref: &str) -> Value {
    let (s, p) = w.op("POST", &format!("/v1/projects/{project}/previews"), Some(json!({ "ref": git_ref }))).await;
    assert!(s == 201 || s == 200, "{p}");
    w.wait_state(p["id"].as_str().unwrap(), "running").await
}

async fn text(w: &World, p: &Value, path: &str) -> String {
    let r = w.visit(p, path).await;
    if r.status != 200 {
        for m in w.machine_dirs() {
            let log = std::fs::read_to_string(w.dev.machines_dir.join(&m).join("app.log")).unwrap_or_default();
            eprintln!("{m}: {log}");
        }
        eprintln!("PREVIEWS {}", w.op("GET", "/v1/previews", None).await.1);
    }
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_preview_gets_its_own_database_on_both_engines() {
    let (w, _s3, _bucket) = world_with_s3().await;
    let dir = wakegate_testkit::tempdir("dbs");
    let state = dir.join("state");
    for engine in ["postgres", "mariadb"] {
        let project = format!("shop-{}", &engine[..2]);
        let repo = db_repo(engine);
        let (s, v) = w.op("POST", "/v1/projects", Some(json!({"name": project, "git_url": repo.url()}))).await;
        assert_eq!(s, 201, "{v}");
        let f = dir.join(format!("{engine}.sql.gz"));
        std::fs::write(&f, gzip(&small_dump(&format!("hello from {engine}")))).unwrap();
        let (_, err, ok) = cli(&w, &state, &["push", &project, f.to_str().unwrap(), "--engine", engine]);
        assert!(ok, "{err}");

        let a = running(&w, &project, "main").await;
        let b = running(&w, &project, "feature/other").await;
        // the app reads the dump's row through the edge; sanitize ran
        assert_eq!(text(&w, &a, "/").await, format!("message: hello from {engine}"));
        assert_eq!(text(&w, &a, "/email").await, "email: user1@example.invalid", "{engine}: sanitize ran");
        // the superuser is nobody's to use over the network: another preview's app
        // cannot log in to this one's server as it
        let a_machine = w.machine_of(a["id"].as_str().unwrap()).await;
        let db: Value =
            serde_json::from_slice(&std::fs::read(w.dev.machines_dir.join(&a_machine).join("db.json")).unwrap())
                .unwrap();
        let port = db["port"].as_u64().unwrap().to_string();
        let root = if engine == "mariadb" {
            Command::new("mariadb")
                .args(["--no-defaults", "-h", "127.0.0.1", "-P", &port, "-u", "root", "-e", "SELECT 1"])
                .output()
                .unwrap()
        } else {
            Command::new("psql")
                .args(["-X", "-h", "127.0.0.1", "-p", &port, "-U", "wakegate", "-d", "postgres", "-c", "SELECT 1"])
                .env("PGPASSWORD", "")
                .env("PGCONNECT_TIMEOUT", "5")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        };
        assert!(!root.status.success(), "{engine}: the superuser without its password over TCP");

        // writes stay in their own preview's database
        assert_eq!(text(&w, &a, "/write?note=only-in-a").await, "written");
        assert_eq!(text(&w, &b, "/write?note=only-in-b").await, "written");
        assert_eq!(text(&w, &a, "/notes").await, "notes: only-in-a");
        assert_eq!(text(&w, &b, "/notes").await, "notes: only-in-b");

        // --target: one preview gets another dump; the other and the base stay
        let base = base_of(&w, &project).await["base"].clone();
        let t = dir.join(format!("{engine}-target.sql"));
        std::fs::write(&t, small_dump("only for b")).unwrap();
        let b_id = b["id"].as_str().unwrap();
        let (out, err, ok) = cli(&w, &state, &["push", &project, t.to_str().unwrap(), "--target", b_id]);
        assert!(ok, "{err}");
        assert!(out.contains(&format!("preview {b_id} is being rebuilt")), "{out}");
        wakegate_testkit::eventually(WAIT, "b to serve the targeted dump", || async {
            // a machine being replaced may cut a response: not yet
            let r = w.try_visit(&b, "/").await?;
            (r.status == 200 && r.body == "message: only for b").then_some(())
        })
        .await;
        assert_eq!(text(&w, &a, "/").await, format!("message: hello from {engine}"));
        assert_eq!(base_of(&w, &project).await["base"], base, "--target leaves the base");

        // sleep keeps the database; `db pull` wakes it and takes its data home
        let a_id = a["id"].as_str().unwrap();
        let (s, _) = w.op("POST", &format!("/v1/previews/{a_id}/sleep"), None).await;
        assert_eq!(s, 202);
        w.wait_state(a_id, "sleeping").await;
        let pulled = dir.join(format!("{engine}-pulled.sql.gz"));
        let (screen, ok) = cli_in_pty(&w, &state, &["pull", a_id, "-o", pulled.to_str().unwrap()]);
        assert!(ok, "{screen}");
        // it woke the preview, waited for the dump, and showed the download's bar
        for seen in ["waking", "database", "downloading [", "KiB/", "ETA"] {
            assert!(screen.contains(seen), "{seen:?} on the terminal: {screen:?}");
        }
        let sql = gunzip(&std::fs::read(&pulled).unwrap());
        let sql = String::from_utf8_lossy(&sql);
        assert!(sql.contains("only-in-a") && sql.contains(&format!("hello from {engine}")), "{engine}: {sql:.2000}");
        assert!(!sql.contains("only-in-b"));
        let (s, v) = w.op("GET", &format!("/v1/previews/{a_id}/db/pull"), None).await;
        assert_eq!(s, 404, "the CLI removed the pulled object once downloaded: {v}");
        let a = w.wait_state(a_id, "running").await;
        // (the edge may hold the old origin for its route-cache time)
        wakegate_testkit::eventually(WAIT, "the woken app to answer, with its data", || async {
            // a machine being replaced may cut a response: not yet
            let r = w.try_visit(&a, "/notes").await?;
            (r.status == 200 && r.body == "notes: only-in-a").then_some(())
        })
        .await;

        // what a reviewer took home goes back in: b gets a's data
        let (_, err, ok) = cli(&w, &state, &["push", &project, pulled.to_str().unwrap(), "--target", b_id]);
        assert!(ok, "{engine}: the pulled dump is one Wakegate takes: {err}");
        wakegate_testkit::eventually(WAIT, "b to serve a's data", || async {
            // a machine being replaced may cut a response: not yet
            let r = w.try_visit(&b, "/notes").await?;
            (r.status == 200 && r.body == "notes: only-in-a").then_some(())
        })
        .await;

        // erase removes the database: its directory and its server
        let machine = w.machine_of(a_id).await;
        let pid = std::fs::read_to_string(w.dev.machines_dir.join(&machine).join("db.pid")).unwrap();
        let (s, _) = w.op("POST", &format!("/v1/previews/{a_id}/erase"), None).await;
        assert_eq!(s, 202);
        w.wait_state(a_id, "erased").await;
        wakegate_testkit::eventually(WAIT, "the machine and its database to go", || async {
            (!w.dev.machines_dir.join(&machine).exists()).then_some(())
        })
        .await;
        let alive = Command::new("kill")
            .args(["-0", "--", &format!("-{}", pid.trim())])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(!alive, "{engine}: the erased preview's database server stopped");
        let (s, _) = w.op("POST", &format!("/v1/previews/{b_id}/erase"), None).await;
        assert_eq!(s, 202);
        w.wait_state(b_id, "erased").await;
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dump_for_another_engine_fails_the_build_clearly() {
    let (w, _s3, _bucket) = world_with_s3().await;
    let dir = wakegate_testkit::tempdir("dbfail");
    let state = dir.join("state");
    // the repository says mariadb, with no sanitize file and no opt-out
    let manifest = "run = \"exec python3 app.py\"\nhealth = \"/health\"\n[database]\nengine = \"mariadb\"\n";
    let repo = wakegate_testkit::git::Repo::new(&[("app.py", DB_APP), ("wakegate.toml", manifest)]);
    let (s, v) = w.op("POST", "/v1/projects", Some(json!({"name": "nosan", "git_url": repo.url()}))).await;
    assert_eq!(s, 201, "{v}");
    let f = dir.join("d.sql");
    std::fs::write(&f, small_dump("x")).unwrap();
    let (_, err, ok) = cli(&w, &state, &["push", "nosan", f.to_str().unwrap(), "--engine", "postgres"]);
    assert!(ok, "{err}");
    let (s, p) = w.op("POST", "/v1/projects/nosan/previews", Some(json!({"ref": "main"}))).await;
    assert_eq!(s, 201, "{p}");
    let failed = w.wait_state(p["id"].as_str().unwrap(), "failed").await;
    assert_eq!(failed["phase"], "restoring_db", "{failed}");
    assert!(failed["reason"].as_str().unwrap().contains("is a PostgreSQL dump"), "{failed}");
    // the project's dumps keep one engine
    let (_, err, ok) = cli(&w, &state, &["push", "nosan", f.to_str().unwrap(), "--engine", "mariadb"]);
    assert!(!ok && err.contains("PostgreSQL dumps"), "the engine is the project's: {err}");
    w.stop().await;
}

/// The Hetzner backend: each preview's database server runs on the preview's own
/// server, restored by its agent from a presigned URL (never the bucket's credentials),
/// with the restore's progress reported; sleep and hibernation keep it, erase takes it
/// with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_hetzner_the_database_runs_on_the_preview_server() {
    let s3 = S3Server::start().await.unwrap();
    let settings = s3.settings(BUCKET);
    let c = hetzner_cloud().await;
    let extra: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let w = hetzner_world(&c, &extra).await;
    bucket_of(&s3, BUCKET).ensure().await.unwrap();
    let dir = wakegate_testkit::tempdir("hdb");
    let state = dir.join("state");
    for (engine, sleep_mode) in [("postgres", "stop"), ("mariadb", "hibernate")] {
        let project = format!("h-{}", &engine[..2]);
        let repo = db_repo(engine);
        let body = json!({"name": project, "git_url": repo.url(), "machine": {"sleep_mode": sleep_mode}});
        let (s, v) = w.op("POST", "/v1/projects", Some(body)).await;
        assert_eq!(s, 201, "{v}");
        let f = dir.join(format!("{engine}.sql.gz"));
        std::fs::write(&f, gzip(&dump_sql(8, &format!("hello from {engine} on hetzner")))).unwrap();
        let (_, err, ok) = cli(&w, &state, &["push", &project, f.to_str().unwrap(), "--engine", engine]);
        assert!(ok, "{err}");

        let (s, p) = w.op("POST", &format!("/v1/projects/{project}/previews"), Some(json!({"ref": "main"}))).await;
        assert_eq!(s, 201, "{p}");
        let id = p["id"].as_str().unwrap().to_string();
        // the splash shows how far the restore is, as the agent reports it
        let seen = wakegate_testkit::eventually(WAIT, "the restore's progress on the status", || async {
            let (_, v) = w.op("GET", &format!("/v1/previews/{id}"), None).await;
            if v["state"] == "running" {
                return Some(None);
            }
            v["progress"]["total"].as_u64().filter(|t| *t > 0).map(|_| Some(v.clone()))
        })
        .await;
        let p = w.wait_state(&id, "running").await;
        assert_eq!(text(&w, &p, "/").await, format!("message: hello from {engine} on hetzner"));
        assert_eq!(text(&w, &p, "/email").await, "email: user1@example.invalid", "{engine}: sanitize ran");
        assert_eq!(text(&w, &p, "/write?note=kept").await, "written");
        // `db pull`: the agent dumps the database and PUTs it to a presigned URL
        let pulled = dir.join(format!("{engine}-pulled.sql.gz"));
        let (_, err, ok) = cli(&w, &state, &["pull", &id, "-o", pulled.to_str().unwrap()]);
        assert!(ok, "{err}");
        let sql = gunzip(&std::fs::read(&pulled).unwrap());
        assert!(String::from_utf8_lossy(&sql).contains("kept"), "{engine}");
        let v = seen.expect("the restore's progress was on the preview while it ran");
        assert_eq!(v["phase"], "restoring_db", "{v}");
        assert!(v["progress"]["done"].as_u64() <= v["progress"]["total"].as_u64(), "{v}");

        // the machine got a URL, never the bucket's credentials
        for (sid, ..) in c.fake.with(|s| s.servers()) {
            let ud = c.fake.with(|s| s.user_data(sid)).unwrap();
            assert!(!ud.contains(wakegate_testkit::s3::SECRET_KEY) && !ud.contains(wakegate_testkit::s3::ACCESS_KEY));
        }

        // sleep keeps the database (a stopped server's disk, or the hibernation snapshot)
        let (s, _) = w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
        assert_eq!(s, 202);
        w.wait_state(&id, "sleeping").await;
        if sleep_mode == "hibernate" {
            let servers = c.fake.with(|s| s.servers());
            let mine = servers.iter().filter(|x| x.3.get("preview") == Some(&id)).count();
            assert_eq!(mine, 0, "hibernated: the server is gone, its snapshot kept");
        }
        let (s, _) = w.op("POST", &format!("/v1/previews/{id}/wake"), None).await;
        assert_eq!(s, 202);
        let p = w.wait_state(&id, "running").await;
        wakegate_testkit::eventually(WAIT, "the woken app to answer, with its data", || async {
            // a machine being replaced may cut a response: not yet
            let r = w.try_visit(&p, "/notes").await?;
            (r.status == 200 && r.body == "notes: kept").then_some(())
        })
        .await;

        // erase takes the database with the server
        let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
        assert_eq!(s, 202);
        w.wait_state(&id, "erased").await;
        // (the project's database image stays: it is the keeper's, not the preview's)
        wakegate_testkit::eventually(WAIT, "the server and its snapshots to go", || async {
            let mine = |l: &std::collections::BTreeMap<String, String>| l.get("preview") == Some(&id);
            c.fake.with(|s| {
                (!s.servers().iter().any(|x| mine(&x.3)) && !s.images().iter().any(|x| mine(&x.1))).then_some(())
            })
        })
        .await;
    }
    w.stop().await;
}

/// Hetzner: a builder server bakes the project's base dump; its snapshot (labelled with
/// the project and the dump's digest) is the image; the builder is deleted; the
/// project's pool is refilled from the snapshot, and a preview taking a pool machine (or
/// a new server) starts its database from the disk. A new base → a new image, the pool
/// machines of the old one recycled, the old snapshot collected once no preview uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_hetzner_the_image_is_a_snapshot_pools_are_made_from() {
    let s3 = S3Server::start().await.unwrap();
    let settings = s3.settings(BUCKET);
    let c = hetzner_cloud().await;
    let mut extra: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    extra.push(("WAKEGATE_POOLS", "hi-po/cx22@fsn1:1:2:86400,hi-ma/cx22@fsn1:1:2:86400"));
    let w = hetzner_world(&c, &extra).await;
    bucket_of(&s3, BUCKET).ensure().await.unwrap();
    let dir = wakegate_testkit::tempdir("himg");
    let state = dir.join("state");
    for engine in ["postgres", "mariadb"] {
        let project = format!("hi-{}", &engine[..2]);
        let repo = db_repo(engine);
        repo.branch("feature/third", &[("README", "a third branch")]);
        repo.branch("feature/fourth", &[("README", "a fourth branch")]);
        let (s, v) = w.op("POST", "/v1/projects", Some(json!({"name": project, "git_url": repo.url()}))).await;
        assert_eq!(s, 201, "{v}");
        let f = dir.join(format!("{engine}.sql.gz"));
        std::fs::write(&f, gzip(&dump_sql(2, &format!("baked on hetzner for {engine}")))).unwrap();
        let (_, err, ok) = cli(&w, &state, &["push", &project, f.to_str().unwrap(), "--engine", engine]);
        assert!(ok, "{err}");
        // the project's pool machines, ready, as (server, the snapshot it came from)
        let pool = |project: String| {
            let c = &c;
            move || {
                c.fake.with(|s| {
                    s.servers()
                        .into_iter()
                        .filter(|(_, _, _, l)| {
                            l.get("project") == Some(&project) && l.contains_key("pool") && !l.contains_key("preview")
                        })
                        .map(|(id, ..)| (id, s.server_image(id)))
                        .collect::<Vec<_>>()
                })
            }
        };

        // the first build imports and records the recipe; a builder bakes beside it
        let a = running(&w, &project, "main").await;
        let a_id = a["id"].as_str().unwrap();
        assert_eq!(database_of(&w, a_id).await["method"], "import");
        let image = ready_image(&w, &project).await;
        let image_id = image["id"].as_str().unwrap().to_string();
        assert!(image["version"].as_str().unwrap().chars().any(|c| c.is_ascii_digit()), "{image}");
        let snapshot: i64 = image["location"].as_str().unwrap().parse().unwrap();
        let labels = c.fake.with(|s| s.images()).into_iter().find(|(id, _)| *id == snapshot).expect("the snapshot").1;
        assert_eq!(labels.get("role").map(String::as_str), Some("db-image"), "{labels:?}");
        assert_eq!(labels.get("project"), Some(&project), "{labels:?}");
        assert_eq!(labels.get("image"), Some(&image_id), "{labels:?}");
        let sha = sha256_hex(&std::fs::read(&f).unwrap());
        assert!(labels.get("dump-sha256").is_some_and(|d| sha.starts_with(d.as_str())), "{labels:?} {sha}");
        // the builder is gone
        wakegate_testkit::eventually(WAIT, "the builder to be deleted", || async {
            let builders = c.fake.with(|s| s.servers()).into_iter().filter(|x| x.3.contains_key("role")).count();
            (builders == 0).then_some(())
        })
        .await;
        // the pool is made again from the snapshot
        let table = wakegate_provisioner::hetzner::pool_table(&wakegate_provisioner::hetzner::pool_key(
            &format!("project-{project}"),
            "cx22",
            "fsn1",
        ));
        let ready_from_image =
            wakegate_testkit::eventually(WAIT, "a ready pool machine made from the image", || async {
                let p = pool(project.clone())();
                let ready = w.dev.store.table_list(&table).await.unwrap();
                let made = !p.is_empty() && p.iter().all(|(_, i)| *i == Some(snapshot));
                let entry =
                    ready.first().map(|(m, raw)| (m.clone(), wakegate_provisioner::hetzner::PoolEntry::parse(raw)));
                entry.filter(|(_, e)| made && e.db_image.as_deref() == Some(image_id.as_str())).map(|(m, _)| m)
            })
            .await;

        // a preview takes it: its database was on the disk, sanitized, with passwords
        // of its own
        let b = running(&w, &project, "feature/other").await;
        let b_id = b["id"].as_str().unwrap();
        assert_eq!(w.machine_of(b_id).await, ready_from_image, "b took the pool's machine");
        let made = database_of(&w, b_id).await;
        assert_eq!((made["image"].as_str(), made["method"].as_str()), (Some(image_id.as_str()), Some("snapshot")));
        assert_eq!(text(&w, &b, "/").await, format!("message: baked on hetzner for {engine}"));
        assert_eq!(text(&w, &b, "/email").await, "email: user1@example.invalid", "{engine}: baked sanitized");
        // writes stay on b's disk: not in the image, not in a preview made after them
        assert_eq!(text(&w, &b, "/write?note=only-in-b").await, "written");
        let c_preview = running(&w, &project, "feature/third").await;
        let c_id = c_preview["id"].as_str().unwrap();
        assert_eq!(database_of(&w, c_id).await["method"], "snapshot");
        assert_eq!(text(&w, &c_preview, "/notes").await, "notes: ");
        assert_eq!(text(&w, &b, "/notes").await, "notes: only-in-b");

        // a new base: a new image, the pool's old machines recycled
        let f2 = dir.join(format!("{engine}-second.sql"));
        std::fs::write(&f2, dump_sql(1, "the second base")).unwrap();
        let (_, err, ok) = cli(&w, &state, &["push", &project, f2.to_str().unwrap()]);
        assert!(ok, "{err}");
        let second = wakegate_testkit::eventually(WAIT, "the new base's image", || async {
            let i = ready_image(&w, &project).await;
            (i["id"] != image_id.as_str()).then_some(i)
        })
        .await;
        let second_snapshot: i64 = second["location"].as_str().unwrap().parse().unwrap();
        wakegate_testkit::eventually(WAIT, "the pool made again from the new image", || async {
            let p = pool(project.clone())();
            (!p.is_empty() && p.iter().all(|(_, i)| *i == Some(second_snapshot))).then_some(())
        })
        .await;
        let d = running(&w, &project, "feature/fourth").await;
        assert_eq!(database_of(&w, d["id"].as_str().unwrap()).await["image"], second["id"]);
        assert_eq!(text(&w, &d, "/").await, "message: the second base");
        // the old snapshot stays while b and c use it, and goes once they are erased
        assert!(c.fake.with(|s| s.images()).iter().any(|(id, _)| *id == snapshot), "kept while used");
        for id in [b_id, c_id] {
            let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
            assert_eq!(s, 202);
            w.wait_state(id, "erased").await;
        }
        wakegate_testkit::eventually(WAIT, "the old image's snapshot to be collected", || async {
            let gone = !images_of(&w, &project).await.iter().any(|i| i["id"] == image_id.as_str());
            (gone && !c.fake.with(|s| s.images()).iter().any(|(id, _)| *id == snapshot)).then_some(())
        })
        .await;
        for id in [a_id, d["id"].as_str().unwrap()] {
            let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
            assert_eq!(s, 202);
            w.wait_state(id, "erased").await;
        }
    }
    w.stop().await;
}

/// The project's images as the API lists them.
async fn images_of(w: &World, project: &str) -> Vec<Value> {
    let (s, v) = w.op("GET", &format!("/v1/db/images?project={project}"), None).await;
    assert_eq!(s, 200, "{v}");
    v["images"].as_array().unwrap().clone()
}

/// The project's current image, once ready.
async fn ready_image(w: &World, project: &str) -> Value {
    wakegate_testkit::eventually(WAIT, "the project's image to be baked", || async {
        let images = images_of(w, project).await;
        if let Some(failed) = images.iter().find(|i| i["state"] == "failed") {
            panic!("the bake failed: {failed}");
        }
        images.into_iter().find(|i| i["state"] == "ready" && i["current"] == true)
    })
    .await
}

async fn database_of(w: &World, preview: &str) -> Value {
    let (s, v) = w.op("GET", &format!("/v1/previews/{preview}/db"), None).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Bake → clone → isolation → divergence → refresh → a new base → the old image
/// collected, for one engine. `method` is what clones must use (reflink on XFS).
async fn bake_and_clone(w: &World, engine: &str, method: Option<&str>) {
    let dir = wakegate_testkit::tempdir("images");
    let state = dir.join("state");
    let project = format!("img-{}", &engine[..2]);
    let repo = db_repo(engine);
    repo.branch("feature/third", &[("README", "a third branch")]);
    let (s, v) = w.op("POST", "/v1/projects", Some(json!({"name": project, "git_url": repo.url()}))).await;
    assert_eq!(s, 201, "{v}");
    let f = dir.join("base.sql.gz");
    std::fs::write(&f, gzip(&dump_sql(2, &format!("baked for {engine}")))).unwrap();
    let (_, err, ok) = cli(w, &state, &["push", &project, f.to_str().unwrap(), "--engine", engine]);
    assert!(ok, "{err}");

    // the first build imports (there is no image yet) and records the recipe; the
    // provisioner bakes the image beside it
    let a = running(w, &project, "main").await;
    let a_id = a["id"].as_str().unwrap();
    assert_eq!(database_of(w, a_id).await["method"], "import");
    let image = ready_image(w, &project).await;
    let image_id = image["id"].as_str().unwrap().to_string();
    assert_eq!(image["engine"], engine, "{image}");
    assert!(image["size"].as_u64().unwrap() > 1_000_000, "{image}");
    assert!(image["version"].as_str().unwrap().chars().any(|c| c.is_ascii_digit()), "{image}");
    let image_dir = w.data.join("db-images").join(&image_id);
    assert!(image_dir.join("db/data").is_dir(), "the image's data directory");

    // the next preview clones it: the app reads the baked, sanitized data
    let b = running(w, &project, "feature/other").await;
    let b_id = b["id"].as_str().unwrap();
    let made = database_of(w, b_id).await;
    assert_eq!(made["image"], image_id.as_str(), "{made}");
    let how = made["method"].as_str().unwrap().to_string();
    match method {
        Some(m) => assert_eq!(how, m, "{made}"),
        None => assert!(how == "reflink" || how == "copy", "{made}"),
    }
    assert_eq!(text(w, &b, "/").await, format!("message: baked for {engine}"));
    assert_eq!(text(w, &b, "/email").await, "email: user1@example.invalid", "{engine}: baked sanitized");
    // the clone has its own credentials, not the image's
    let b_machine = w.machine_of(b_id).await;
    let db: Value =
        serde_json::from_slice(&std::fs::read(w.dev.machines_dir.join(&b_machine).join("db.json")).unwrap()).unwrap();
    let baked: Value = serde_json::from_slice(&std::fs::read(image_dir.join("image.json")).unwrap()).unwrap();
    assert_ne!(db["password"], baked["db"]["password"], "the clone's app password is its own");

    // writes stay in the clone: not in the image, not in a clone made after them
    assert_eq!(text(w, &b, "/write?note=only-in-b").await, "written");
    let c = running(w, &project, "feature/third").await;
    let c_id = c["id"].as_str().unwrap();
    assert_eq!(database_of(w, c_id).await["image"], image_id.as_str());
    assert_eq!(text(w, &c, "/notes").await, "notes: ");
    assert_eq!(text(w, &b, "/notes").await, "notes: only-in-b");
    assert_eq!(text(w, &a, "/notes").await, "notes: ");
    // what the write changed is measured against the image
    wakegate_testkit::eventually(WAIT, "b's divergence to be measured", || async {
        let v = database_of(w, b_id).await;
        (v["diverged_bytes"].as_u64()? > 0).then_some(())
    })
    .await;

    // refresh: b's data is the image's again, the app untouched (same machine)
    let (out, err, ok) = cli(w, &state, &["refresh", b_id]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("refreshed from {image_id} ({how})")), "{out}");
    assert_eq!(text(w, &b, "/notes").await, "notes: ");
    assert_eq!(text(w, &b, "/").await, format!("message: baked for {engine}"));
    assert_eq!(w.machine_of(b_id).await, b_machine, "refreshing rebuilt nothing");
    // and from the dashboard's button
    assert_eq!(text(w, &b, "/write?note=again").await, "written");
    dashboard_refresh(w, b_id).await;
    wakegate_testkit::eventually(WAIT, "the dashboard's refresh", || async {
        let r = w.try_visit(&b, "/notes").await?;
        (r.status == 200 && r.body == "notes: ").then_some(())
    })
    .await;

    // the images view: engine, dump, size, age, and the previews using each
    let (out, err, ok) = cli(w, &state, &["images", &project]);
    assert!(ok, "{err}");
    for seen in [image_id.as_str(), "ready (current)", b_id, c_id, engine] {
        assert!(out.contains(seen), "{seen:?} in {out}");
    }
    assert!(!out.contains(a_id), "a imported: it uses no image\n{out}");

    // a new base bakes a new image; the old one stays while previews use it
    let f2 = dir.join("second.sql");
    std::fs::write(&f2, dump_sql(1, "the second base")).unwrap();
    let (_, err, ok) = cli(w, &state, &["push", &project, f2.to_str().unwrap()]);
    assert!(ok, "{err}");
    let second = wakegate_testkit::eventually(WAIT, "the new base's image", || async {
        let i = ready_image(w, &project).await;
        (i["id"] != image_id.as_str()).then_some(i)
    })
    .await;
    let old = images_of(w, &project).await.into_iter().find(|i| i["id"] == image_id.as_str());
    assert_eq!(old.as_ref().map(|o| o["current"].clone()), Some(json!(false)), "kept while used: {old:?}");
    // a refresh takes the current image
    let (out, err, ok) = cli(w, &state, &["refresh", c_id]);
    assert!(ok, "{err}");
    assert!(out.contains(second["id"].as_str().unwrap()), "{out}");
    assert_eq!(text(w, &c, "/").await, "message: the second base");
    // once nothing uses the old image, it is collected: record and directory
    for id in [b_id] {
        let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
        assert_eq!(s, 202);
        w.wait_state(id, "erased").await;
    }
    wakegate_testkit::eventually(WAIT, "the old image to be collected", || async {
        let gone = !images_of(w, &project).await.iter().any(|i| i["id"] == image_id.as_str());
        (gone && !image_dir.exists()).then_some(())
    })
    .await;
    for id in [a_id, c_id] {
        let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
        assert_eq!(s, 202);
        w.wait_state(id, "erased").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn previews_clone_the_baked_image_on_both_engines() {
    let (w, _s3, _bucket) = world_with_s3().await;
    for engine in ["postgres", "mariadb"] {
        bake_and_clone(&w, engine, None).await;
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_xfs_previews_clone_the_image_by_reflink() {
    let xfs = match wakegate_testkit::xfs::Xfs::make(1 << 30) {
        Ok(x) => x,
        Err(why) if std::env::var_os("WAKEGATE_REQUIRE_REFLINK").is_some() => panic!("no XFS here: {why}"),
        Err(why) => return eprintln!("skipped: this machine cannot make an XFS filesystem ({why})"),
    };
    let data = xfs.mount.join("data");
    std::fs::create_dir(&data).unwrap();
    let (w, _s3, _bucket) = world_with_s3_in(data).await;
    bake_and_clone(&w, "postgres", Some("reflink")).await;
    w.stop().await;
    drop(xfs);
}

/// Logs in to the dashboard and presses a preview's "Refresh data" button.
async fn dashboard_refresh(w: &World, preview: &str) {
    use wakegate_testkit::http;
    let (addr, host) = (w.dev.waker_addr, format!("127.0.0.1:{}", w.dev.waker_addr.port()));
    let form = [("accept", "text/html"), ("content-type", "application/x-www-form-urlencoded")];
    let body = format!("token={}", w.dev.operator_token);
    let r = http::send(addr, "POST", &host, "/dashboard/login", &form, body).await.unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    let cookie = r.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
    let r = http::send(addr, "GET", &host, "/dashboard", &[("cookie", &cookie)], "").await.unwrap();
    let action = format!("/dashboard/previews/{preview}/refresh-data");
    assert!(r.body.contains(&action) && r.body.contains("Refresh data"), "{}", r.body);
    let csrf = csrf_of(&r.body);
    let mut headers = form.to_vec();
    headers.push(("cookie", &cookie));
    let r = http::send(addr, "POST", &host, &action, &headers, format!("csrf={csrf}")).await.unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
}
