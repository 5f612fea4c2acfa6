//! The native edge as a hostile client meets it: raw sockets (a client library would
//! normalise these requests away) against the real edge, waker and demo app.
//!
//! Framing (a GET body cannot desync a pooled origin connection, duplicate `Host`, bad
//! chunked bodies), head limits with the edge's own pages, IDNA hosts, forwarding
//! headers the client cannot forge, header-read and idle timeouts, per-IP connection
//! caps, and the negative route cache with single-flight lookups.

use crate::common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wakegate_core::sign::Key;
use wakegate_edge::native::{EdgeConfig, EdgeServer};
use wakegate_testkit::http;

/// Writes `request`, then reads until the peer closes or `wait` passes.
async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_for(&mut s, wait).await
}

async fn read_for(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

const WAIT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_get_body_never_reaches_a_pooled_origin_connection() {
    let w = World::start().await;
    let p = w.running("main").await;
    let host = w.host(&p);
    // the body is a whole second request, which an origin that ignores GET bodies
    // would read as the next request on the pooled connection
    let smuggled = format!("GET /headers HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let attack = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nAccept: text/html\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let r = raw(w.edge, attack.as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 400, "{r}");
    assert!(r.contains("cannot carry a body"), "{r}");
    let chunked = format!("GET / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_eq!(status_of(&raw(w.edge, chunked.as_bytes(), WAIT).await), 400);
    // other visitors get their own answers
    for _ in 0..5 {
        let page = w.visit(&p, "/").await;
        assert!(page.body.contains("Hello from the main branch"), "{}", page.body);
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ambiguous_or_oversized_requests_get_the_edges_own_pages() {
    let w = World::start().await;
    let p = w.running("main").await;
    let host = w.host(&p);
    let two_hosts = format!("GET / HTTP/1.1\r\nHost: {host}\r\nHost: other.localhost\r\nConnection: close\r\n\r\n");
    let r = raw(w.edge, two_hosts.as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 400, "{r}");
    assert!(r.contains("more than once"), "{r}");

    let big = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(100_000));
    let r = raw(w.edge, big.as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 431, "{}", &r[..r.len().min(300)]);
    assert!(r.contains("x-wakegate: splash") && r.contains("headers are larger"), "the edge's own page");

    let long = |n: usize| format!("GET /{} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n", "u".repeat(n));
    let r = raw(w.edge, long(32 * 1024).as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 414, "{}", &r[..r.len().min(300)]);
    assert!(r.contains("x-wakegate: splash") && r.contains("URL is longer"));
    // past hyper's own limit on a request target (64 KiB) hyper answers 414 itself
    assert_eq!(status_of(&raw(w.edge, long(64 * 1024).as_bytes(), WAIT).await), 414);

    // a malformed chunked body is the client's fault (400), not the origin's (502):
    // exactly 400 where the edge reads the body itself (the rebuild form); when proxied,
    // the origin may answer before the bad chunk arrives, but it is never a 502
    let bad = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZZ\r\nhello\r\n0\r\n\r\n"
        )
    };
    let r = raw(w.edge, bad("/_wakegate/rebuild").as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 400, "{r}");
    let r = raw(w.edge, bad("/echo").as_bytes(), WAIT).await;
    assert!(matches!(status_of(&r), 200 | 400), "{r}");

    // Unicode names are mapped (IDNA), not refused as empty
    let r = raw(w.edge, "GET / HTTP/1.1\r\nHost: bücher.localhost\r\nConnection: close\r\n\r\n".as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(r.contains("xn--bcher-kva.localhost"), "{r}");
    let r = raw(w.edge, "GET / HTTP/1.1\r\nHost: a..b\r\nConnection: close\r\n\r\n".as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 400, "{r}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_origin_sees_the_edges_forwarding_headers_not_the_clients() {
    let w = World::start().await;
    let p = w.running("main").await;
    let host = w.host(&p);
    let forged = format!(
        "GET /headers HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
         Forwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n\
         Connection: close, host, x-forwarded-for\r\n\r\n"
    );
    let r = raw(w.edge, forged.as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 200, "{r}");
    let body: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["host"], host.as_str(), "the app sees the public host: {body}");
    assert_eq!(body["x-forwarded-for"], "127.0.0.1", "{body}");
    assert_eq!(body["x-real-ip"], "127.0.0.1", "{body}");
    assert_eq!(body["forwarded"], "for=127.0.0.1;proto=http", "{body}");
    assert_eq!(body["x-forwarded-proto"], "http", "{body}");
    assert_eq!(body["x-forwarded-host"], host.split(':').next().unwrap(), "{body}");
    w.stop().await;

    // behind a trusted proxy the chain is kept and extended
    let w = World::start_with(&[("WAKEGATE_TRUSTED_PROXIES", "127.0.0.0/8")], 600).await;
    let p = w.running("main").await;
    let r =
        http::send(w.edge, "GET", &w.host(&p), "/headers", &[("x-forwarded-for", "203.0.113.9")], "").await.unwrap();
    assert_eq!(r.json()["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_idle_and_greedy_clients_are_cut_off() {
    let w = World::start_with(
        &[
            ("WAKEGATE_HEADER_READ_SECS", "0.5"),
            ("WAKEGATE_IDLE_SECS", "0.8"),
            ("WAKEGATE_MAX_CONNECTIONS_PER_IP", "8"),
        ],
        600,
    )
    .await;
    let p = w.running("main").await;
    let host = w.host(&p);

    // a head that never finishes is closed after the header-read timeout
    let t0 = Instant::now();
    let r = raw(w.edge, format!("GET / HTTP/1.1\r\nHost: {host}\r\n").as_bytes(), Duration::from_secs(10)).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "closed after {:?}: {r:?}", t0.elapsed());

    // a kept-alive connection that goes quiet is closed after the idle timeout
    let mut s = TcpStream::connect(w.edge).await.unwrap();
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let r = read_for(&mut s, Duration::from_secs(10)).await;
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(t0.elapsed() < Duration::from_secs(5), "idle connection closed after {:?}", t0.elapsed());

    // one address cannot hold more than its share of connections; the edge still answers
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(w.edge).await.unwrap();
        s.write_all(format!("GET /health HTTP/1.1\r\nHost: {host}\r\n").as_bytes()).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = raw(w.edge, format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(), WAIT).await;
    assert_eq!(status_of(&r), 503, "over the per-IP cap: {r}");
    drop(held);
    let page = wakegate_testkit::eventually(Duration::from_secs(5), "a free slot", || async {
        http::get_html(w.edge, &host, "/").await.ok().filter(|r| r.status == 200)
    })
    .await;
    assert!(page.body.contains("Hello from the main branch"));
    w.stop().await;
}

/// A waker that knows no host, counts route lookups and answers each after 200 ms.
async fn counting_waker() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let lookups = Arc::new(AtomicUsize::new(0));
    let count = lookups.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        if head.starts_with(b"GET /v1/edge/route") {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        head.drain(..end + 4);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let body = r#"{"error":"no such preview"}"#;
                        let resp = format!("HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, lookups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_hosts_are_looked_up_once_and_remembered_briefly() {
    let (waker, lookups) = counting_waker().await;
    let mut cfg = EdgeConfig::new(
        format!("http://{waker}"),
        Key::new(TEST_EDGE_KEY.as_bytes().to_vec()),
        Key::new(TEST_CSRF_KEY.as_bytes().to_vec()),
        Key::new(TEST_ORIGIN_KEY.as_bytes().to_vec()),
    );
    cfg.negative_ttl = Duration::from_secs(30);
    let edge = EdgeServer::start("127.0.0.1:0".parse().unwrap(), cfg, 1).unwrap();
    // 50 visitors at once to a name nobody has: one lookup
    let visits: Vec<_> =
        (0..50).map(|_| tokio::spawn(http::get_html(edge.addr, "random-name.localhost", "/"))).collect();
    for v in visits {
        assert_eq!(v.await.unwrap().unwrap().status, 404);
    }
    assert_eq!(lookups.load(Ordering::SeqCst), 1, "single-flight");
    // and later visits within the negative TTL cost nothing
    for _ in 0..20 {
        assert_eq!(http::get_html(edge.addr, "random-name.localhost", "/").await.unwrap().status, 404);
    }
    assert_eq!(lookups.load(Ordering::SeqCst), 1, "negative cache");
    assert_eq!(http::get_html(edge.addr, "another-name.localhost", "/").await.unwrap().status, 404);
    assert_eq!(lookups.load(Ordering::SeqCst), 2);
}
