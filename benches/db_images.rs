//! Database images against importing: for each engine and for generated dumps of about
//! 200 MB and 2 GB of SQL, the time from "preview created" (the operator API's answer)
//! to "its database answers a query" (the provisioner has started the preview's own
//! server, seen it answer `SELECT 1` and given it the preview's passwords), cloned from
//! the project's image and imported from the dump. The real Wakegate (waker, provisioner,
//! local backend, embedded store) with a real S3-compatible server, PostgreSQL and
//! MariaDB; on an XFS filesystem with reflink made in a file when the machine allows it.
//!
//! `cargo bench --bench db_images` (`scripts/bench-db`); `WAKEGATE_BENCH_DB_MB=200,2000`,
//! `WAKEGATE_BENCH_DB_ENGINES=postgres,mariadb` and `WAKEGATE_BENCH_DB_RUNS=3` change the
//! sizes, engines and runs. A run of every engine at both default sizes writes its
//! section of BENCHMARKS.md; a partial one only prints its rows.

#[path = "../tests/common/mod.rs"]
mod common;

use serde_json::{json, Value};
use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SANITIZE: &str = "UPDATE users SET email = concat('user', id, '@example.invalid');\n";
const APP: &str = include_str!("../examples/db-app/app.py");
const WAIT: Duration = Duration::from_secs(4 * 3600);

/// Writes about `mb` MB of generated SQL, gzipped, to `path`.
fn write_dump(path: &std::path::Path, mb: u64) {
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    wakegate_testkit::dump::write_sql(&mut gz, mb * 1_000_000, "baked").unwrap();
    gz.finish().unwrap().flush().unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
    format!("{lo:.2}–{hi:.2}")
}

struct Stand {
    dev: wakegate::dev::Dev,
}

impl Stand {
    async fn start(data: &std::path::Path, s3: &[(String, String)], images: bool) -> Stand {
        let mut extra: Vec<(&str, &str)> = s3.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        extra.push(("WAKEGATE_DB_IMAGES", if images { "true" } else { "false" }));
        extra.push(("WAKEGATE_SWEEP_SECS", "0.5"));
        let cfg = common::settings(data, &extra);
        let store = Arc::new(wakegate_store::EmbeddedStore::open(&data.join("store.log")).unwrap());
        Stand { dev: wakegate::dev::Dev::start(&cfg, store).await.unwrap() }
    }

    async fn op(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        wakegate::operator::call(self.dev.waker_addr, &self.dev.operator_token, method, path, body).await.unwrap()
    }

    /// Creates a preview of `git_ref`; (seconds until its database answered, seconds the
    /// restore itself took, how it was made). The preview is erased afterwards.
    async fn one(&self, project: &str, git_ref: &str) -> (f64, f64, String) {
        let began = Instant::now();
        let (s, p) = self.op("POST", &format!("/v1/projects/{project}/previews"), Some(json!({"ref": git_ref}))).await;
        assert_eq!(s, 201, "{p}");
        let id = p["id"].as_str().unwrap().to_string();
        let made = wakegate_testkit::eventually(WAIT, "the preview's database", || async {
            let (s, v) = self.op("GET", &format!("/v1/previews/{id}/db"), None).await;
            if s == 200 {
                return Some(v);
            }
            let (_, p) = self.op("GET", &format!("/v1/previews/{id}"), None).await;
            assert_ne!(p["state"], "failed", "{p}");
            None
        })
        .await;
        let total = began.elapsed().as_secs_f64();
        let (s, _) = self.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
        assert_eq!(s, 202);
        wakegate_testkit::eventually(WAIT, "the preview to be erased", || async {
            let (_, p) = self.op("GET", &format!("/v1/previews/{id}"), None).await;
            (p["state"] == "erased").then_some(())
        })
        .await;
        (total, made["took_ms"].as_f64().unwrap() / 1000.0, made["method"].as_str().unwrap().to_string())
    }
}

fn main() {
    let runs: usize = std::env::var("WAKEGATE_BENCH_DB_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let sizes: Vec<u64> = std::env::var("WAKEGATE_BENCH_DB_MB")
        .unwrap_or_else(|_| "200,2000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let engines: Vec<String> = std::env::var("WAKEGATE_BENCH_DB_ENGINES")
        .unwrap_or_else(|_| "postgres,mariadb".into())
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| e == "postgres" || e == "mariadb")
        .collect();
    let whole = sizes == [200, 2000] && engines == ["postgres", "mariadb"];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let xfs = wakegate_testkit::xfs::Xfs::make(16 << 30);
    let (root, fs) = match &xfs {
        Ok(x) => (x.mount.clone(), "XFS with reflink, in a file on a loop device".to_string()),
        Err(why) => {
            eprintln!("no XFS ({why}): measuring on the temporary directory's filesystem");
            (wakegate_testkit::tempdir("dbbench"), "the temporary directory's filesystem (no reflink)".to_string())
        }
    };
    let mut rows = Vec::new();
    for engine in &engines {
        for &mb in &sizes {
            rows.push(rt.block_on(measure(&root, engine, mb, runs)));
        }
    }
    drop(xfs);
    let mut md = format!(
        "## Database images\n\nMeasured by `scripts/bench-db` (= `cargo bench --bench db_images`) in one run on one machine ({} cores), on {fs}: the time from a preview being created (the operator API's answer) to its database answering (its own server started, `SELECT 1` answered, its passwords set), the median of {runs} previews each, with the spread. From the image: cloned from the project's baked image; importing: the same dump imported (`WAKEGATE_DB_IMAGES=false`). The restore column is the provisioner's own measure of the database step alone. Dumps: generated SQL (a filler table of random text), gzipped.\n\n| engine | dump (SQL) | bake | from the image: s (spread) | restore | importing: s (spread) | restore | importing / image |\n|---|---|---|---|---|---|---|---|\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for r in &rows {
        md.push_str(r);
    }
    println!("\n{md}");
    if whole {
        wakegate_testkit::write_benchmarks_section("db-images", &md);
        println!("written to BENCHMARKS.md");
    } else {
        println!("a partial run (engines {engines:?}, sizes {sizes:?}): BENCHMARKS.md left as it was");
    }
}

/// One row: an engine and a dump size.
async fn measure(root: &std::path::Path, engine: &str, mb: u64, runs: usize) -> String {
    let dir = root.join(format!("{engine}-{mb}"));
    std::fs::create_dir_all(&dir).unwrap();
    let s3 = wakegate_testkit::s3::S3Server::start().await.unwrap();
    let settings = s3.settings("dumps");
    let bucket = common::bucket_of(&s3, "dumps");
    bucket.ensure().await.unwrap();
    let env = if engine == "mariadb" { "env = \"vars\"\n" } else { "" };
    let manifest = format!(
        "run = \"exec python3 app.py\"\nhealth = \"/health\"\n[database]\nengine = \"{engine}\"\nname = \"shop\"\n{env}"
    );
    let repo = wakegate_testkit::git::Repo::new(&[
        ("app.py", APP),
        ("wakegate.toml", &manifest),
        ("db/sanitize.sql", SANITIZE),
    ]);
    for i in 0..2 * runs {
        repo.branch(&format!("b{i}"), &[("README", &format!("branch {i}"))]);
    }
    let dump = wakegate_testkit::tempdir("dbdump").join("dump.sql.gz");
    eprintln!("{engine} {mb} MB: generating the dump");
    write_dump(&dump, mb);

    // images on: the first build's recipe bakes the image; then previews clone it
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let st = Stand::start(&data, &settings, true).await;
    let (s, v) = st.op("POST", "/v1/projects", Some(json!({"name": "shop", "git_url": repo.url()}))).await;
    assert_eq!(s, 201, "{v}");
    let out = Command::new(env!("CARGO_BIN_EXE_wakegate"))
        .args(["db", "push", "shop", dump.to_str().unwrap(), "--engine", engine])
        .env("WAKEGATE_WAKER_URL", format!("http://{}", st.dev.waker_addr))
        .env("WAKEGATE_OPERATOR_TOKEN", &st.dev.operator_token)
        .env("XDG_STATE_HOME", dir.join("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if let Err(e) = std::fs::remove_file(&dump) {
        eprintln!("could not remove {}: {e}", dump.display());
    }
    // the recipe a build would record, so the bake runs alone (a build beside it would
    // slow both)
    let project = st.dev.store.list_projects().await.unwrap().into_iter().find(|p| p.name == "shop").unwrap();
    let recipe = wakegate_db::Recipe {
        engine: wakegate_db::Engine::parse(engine).unwrap(),
        name: "shop".into(),
        sanitize: Some(SANITIZE.into()),
    };
    wakegate_db::Images::new(st.dev.store.clone()).set_recipe(&project.id, &recipe).await.unwrap();
    eprintln!("{engine} {mb} MB: baking");
    let image = wakegate_testkit::eventually(WAIT, "the image to be baked", || async {
        let (_, v) = st.op("GET", "/v1/db/images", None).await;
        let i = v["images"].as_array()?.first()?.clone();
        assert_ne!(i["state"], "failed", "{i}");
        (i["state"] == "ready").then_some(i)
    })
    .await;
    let bake = image["bake_ms"].as_f64().unwrap() / 1000.0;
    let (mut clone, mut clone_restore, mut method) = (Vec::new(), Vec::new(), String::new());
    for i in 0..runs {
        let (total, restore, how) = st.one("shop", &format!("b{i}")).await;
        eprintln!("{engine} {mb} MB: from the image ({how}) {total:.3} s (restore {restore:.3} s)");
        clone.push(total);
        clone_restore.push(restore);
        method = how;
    }
    st.dev.shutdown().await;

    // images off: the same dump imported
    let st = Stand::start(&data, &settings, false).await;
    let (mut import, mut import_restore) = (Vec::new(), Vec::new());
    for i in runs..2 * runs {
        let (total, restore, how) = st.one("shop", &format!("b{i}")).await;
        assert_eq!(how, "import");
        eprintln!("{engine} {mb} MB: importing {total:.1} s (restore {restore:.1} s)");
        import.push(total);
        import_restore.push(restore);
    }
    st.dev.shutdown().await;
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        eprintln!("could not remove {}: {e}", dir.display());
    }
    let size = if mb >= 1000 { format!("{:.1} GB", mb as f64 / 1000.0) } else { format!("{mb} MB") };
    format!(
        "| {engine} | {size} | {bake:.1} s | {:.3} ({}) {method} | {:.3} | {:.1} ({}) | {:.1} | {:.0}× |\n",
        median(clone.clone()),
        spread(&clone),
        median(clone_restore),
        median(import.clone()),
        spread(&import),
        median(import_restore),
        median(import) / median(clone),
    )
}
