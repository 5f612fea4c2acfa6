//! The store conformance suite against both implementations.

use std::sync::Arc;
use wakegate_store::{conformance, EmbeddedStore, RedisStore, Store};
use wakegate_testkit::redis::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_in_memory() {
    conformance::run_all(|| async { Arc::new(EmbeddedStore::in_memory()) as Arc<dyn Store> }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_on_disk() {
    let dir = wakegate_testkit::tempdir("store");
    let n = std::sync::atomic::AtomicU32::new(0);
    conformance::run_all(|| {
        let path = dir.join(format!("s{}.log", n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        async move { Arc::new(EmbeddedStore::open(&path).unwrap()) as Arc<dyn Store> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis() {
    let server = RedisServer::start().await.unwrap();
    let url = server.url();
    let n = std::sync::atomic::AtomicU32::new(0);
    conformance::run_all(|| {
        let prefix = format!("t{}:", n.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let url = url.clone();
        async move { Arc::new(RedisStore::connect(&url, &prefix).await.unwrap()) as Arc<dyn Store> }
    })
    .await;
}

#[tokio::test]
async fn embedded_survives_restart_and_torn_write() {
    let dir = wakegate_testkit::tempdir("store-restart");
    let path = dir.join("store.log");
    {
        let s = EmbeddedStore::open(&path).unwrap();
        s.create_project(&conformance::project("web")).await.unwrap();
        let p = conformance::preview("a");
        s.put_preview(&p, None).await.unwrap();
        s.put_preview(&p, Some(1)).await.unwrap();
        s.bind_host("h.localhost", "a").await.unwrap();
        s.enqueue("a", wakegate_core::lifecycle::JobKind::Build).await.unwrap();
        s.table_put("pool", "m1", "1").await.unwrap();
        s.table_put("pool", "m2", "2").await.unwrap();
        assert!(s.table_remove("pool", "m1").await.unwrap());
    }
    // a crash mid-append leaves half a line
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"op\":\"pre").unwrap();
    let s = EmbeddedStore::open(&path).unwrap();
    assert_eq!(s.get_preview("a").await.unwrap().unwrap().version, 2);
    assert_eq!(s.resolve_host("h.localhost").await.unwrap().as_deref(), Some("a"));
    assert_eq!(s.jobs().await.unwrap().len(), 1, "queued jobs survive a restart");
    assert!(s.project_by_name("web").await.unwrap().is_some());
    assert_eq!(s.table_list("pool").await.unwrap(), vec![("m2".to_string(), "2".to_string())]);
    // garbage in the middle is an error, not silent loss
    std::fs::write(&path, "garbage\n{}\n").unwrap();
    assert!(EmbeddedStore::open(&path).is_err());
}

/// A flipped byte in the last complete record is corruption, not a torn write: the
/// start stops with an error naming the file and line, and the file is left as it was.
#[tokio::test]
async fn embedded_refuses_a_corrupt_last_record() {
    let dir = wakegate_testkit::tempdir("store-corrupt");
    let path = dir.join("store.log");
    {
        let s = EmbeddedStore::open(&path).unwrap();
        s.create_project(&conformance::project("web")).await.unwrap();
        s.create_project(&conformance::project("api")).await.unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.last(), Some(&b'\n'));
    let lines = bytes.iter().filter(|b| **b == b'\n').count();
    let at = bytes.len() - 10; // inside the last record's JSON
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = EmbeddedStore::open(&path).err().expect("a corrupt record stops the start");
    let msg = err.to_string();
    assert!(msg.contains(&format!("store.log:{lines}")), "names the file and line: {msg}");
    assert!(msg.contains("checksum"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was compacted away");
}

/// A log from before checksums is read once and rewritten with them.
#[tokio::test]
async fn embedded_reads_a_legacy_log() {
    let dir = wakegate_testkit::tempdir("store-legacy");
    let path = dir.join("store.log");
    let project = serde_json::to_string(&conformance::project("web")).unwrap();
    std::fs::write(&path, format!("{{\"op\":\"project\",\"project\":{project}}}\n")).unwrap();
    let s = EmbeddedStore::open(&path).unwrap();
    assert!(s.project_by_name("web").await.unwrap().is_some());
    drop(s);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.split_once(' ').is_some_and(|(sum, _)| sum.len() == 8), "rewritten with checksums: {text}");
    assert!(EmbeddedStore::open(&path).unwrap().project_by_name("web").await.unwrap().is_some());
}

const FSIZE_CHILD: &str = "WAKEGATE_TEST_FSIZE_CHILD";

/// A disk that fills up mid-record: the write fails and is cut back off the file; once
/// there is room again the next record lands on a clean line, and every acknowledged
/// record is there at the next start. The child process runs this test's own binary
/// under a soft `ulimit -f` with SIGXFSZ ignored, so writes past the limit fail with
/// EFBIG as on a full disk; it then lifts the limit itself.
#[tokio::test]
async fn embedded_rolls_back_a_partial_write() {
    if let Ok(path) = std::env::var(FSIZE_CHILD) {
        let s = EmbeddedStore::open(std::path::Path::new(&path)).unwrap();
        let mut acked = 0;
        for i in 0..10_000 {
            let mut p = conformance::project(&format!("p{i}"));
            p.git_url = "x".repeat(300);
            match s.create_project(&p).await {
                Ok(()) => acked += 1,
                Err(e) => {
                    // the disk has room again: the next record must start on a clean line
                    let (_, hard) = rlimit::Resource::FSIZE.get().unwrap();
                    rlimit::Resource::FSIZE.set(hard, hard).unwrap();
                    s.create_project(&conformance::project("after")).await.unwrap();
                    println!("ACKED {} ERR {e}", acked + 1);
                    return;
                }
            }
        }
        panic!("the size limit never hit");
    }
    let dir = wakegate_testkit::tempdir("store-enospc");
    let path = dir.join("store.log");
    drop(EmbeddedStore::open(&path).unwrap());
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -S -f 16; exec \"$0\" --exact embedded_rolls_back_a_partial_write --nocapture")
        .arg(&exe)
        .env(FSIZE_CHILD, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let acked: usize = stdout
        .split("ACKED ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("child output: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(acked > 5, "{stdout}");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.last(), Some(&b'\n'), "the partial record was cut off");
    let s = EmbeddedStore::open(&path).unwrap();
    assert_eq!(s.list_projects().await.unwrap().len(), acked, "every acknowledged record is there");
    assert!(s.project_by_name("after").await.unwrap().is_some());
}
