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
