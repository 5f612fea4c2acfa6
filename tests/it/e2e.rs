//! A preview's life, driven over HTTP as a user and an operator would, against the
//! composition `wakegate dev` runs (embedded store, local backend, real git, real apps).

use crate::common;

use common::*;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wakegate_testkit::http;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn branches_serve_their_own_content_streams_and_websockets() {
    let w = World::start().await;
    let main = w.running("main").await;
    let blue = w.running("feature/blue").await;
    assert_ne!(main["url"], blue["url"]);
    assert!(main["url"].as_str().unwrap().starts_with("http://demo-main-"));

    let page = w.visit(&main, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Hello from the main branch"), "{}", page.body);
    let page = w.visit(&blue, "/").await;
    assert!(page.body.contains("Hello from the feature/blue branch"), "{}", page.body);

    // streamed response passes through chunk by chunk
    let s = w.api(&main, "/stream", &[]).await;
    assert_eq!(s.body, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");

    // request bodies are streamed to the origin intact (1 MiB)
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let digest = wakegate_core::sign::body_digest(&big);
    let r = http::send(w.edge, "POST", &w.host(&main), "/upload", &[("content-type", "application/octet-stream")], big)
        .await
        .unwrap();
    assert_eq!(r.json()["sha256"], digest);

    // forwarding headers and the origin signature arrive; hop-by-hop headers do not
    let h = w
        .api(
            &main,
            "/headers",
            &[("connection", "keep-alive, x-secret-hop"), ("x-secret-hop", "1"), ("te", "trailers")],
        )
        .await
        .json();
    assert_eq!(h["x-forwarded-host"], w.host(&main).split(':').next().unwrap());
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert!(h["x-wakegate-origin-signature"].as_str().unwrap().starts_with("t="));
    assert!(h.get("te").is_none(), "{h}");
    if !through_worker() {
        // the native edge drops headers a client names in `Connection`; in a Worker the
        // runtime consumes `Connection` before the Worker can see which ones it named
        assert!(h.get("x-secret-hop").is_none(), "{h}");
    }

    // a WebSocket echo through the edge
    let mut s = tokio::net::TcpStream::connect(w.edge).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        w.host(&main)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let mask = [1u8, 2, 3, 4];
    let msg = b"hello through wakegate";
    let mut frame = vec![0x81, 0x80 | msg.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(msg.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await.unwrap();
    assert_eq!(hdr[0], 0x81);
    let mut echoed = vec![0u8; (hdr[1] & 0x7f) as usize];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, msg);

    // unknown and malformed hosts
    let r = http::get_html(w.edge, &format!("nope.localhost:{}", w.edge.port()), "/").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("No preview here"));
    // underscores are valid in URLs but not in DNS labels: our parser refuses it
    let r = http::get_html(w.edge, &format!("bad_host.localhost:{}", w.edge.port()), "/").await.unwrap();
    assert_eq!(r.status, 400);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn erased_preview_confirm_to_rebuild() {
    let w = World::start().await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    assert_eq!(s, 202);
    w.wait_state(id, "erased").await;

    let page = w.visit(&p, "/some/page?x=1").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("This preview was erased"), "{}", page.body);
    assert!(page.body.contains(r#"<form method="post" action="/_wakegate/rebuild">"#));
    assert!(page.body.contains(r#"name="return_to" value="/some/page?x=1""#));
    assert_eq!(page.header("x-robots-tag"), Some("noindex"));
    let token = csrf_of(&page.body);

    // GET never rebuilds; POST without a token, with a forged one, or from another origin: 403
    assert_eq!(w.api(&p, "/_wakegate/rebuild", &[]).await.status, 404);
    assert_eq!(post_form(&w, &p, "", &[]).await.status, 403);
    assert_eq!(post_form(&w, &p, "csrf=123.deadbeef", &[]).await.status, 403);
    let forged = format!("{}.{}", u64::MAX / 2, token.split_once('.').unwrap().1);
    assert_eq!(post_form(&w, &p, &format!("csrf={forged}"), &[]).await.status, 403);
    assert_eq!(post_form(&w, &p, &format!("csrf={token}"), &[("origin", "http://evil.example")]).await.status, 403);
    assert_eq!(post_form(&w, &p, &format!("csrf={token}"), &[("user-agent", "Slackbot 1.0")]).await.status, 403);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.show(id).await["state"], "erased", "nothing was built");
    assert!(w.dev.store.jobs().await.unwrap().is_empty(), "no job was queued");

    // with the token: 303 back to the page, the build runs, the URL serves the app
    let r = post_form(
        &w,
        &p,
        &format!("csrf={token}&return_to=%2Fsome%2Fpage%3Fx%3D1"),
        &[("origin", &format!("http://{}", w.host(&p)))],
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/some/page?x=1"));
    let page = w.visit(&p, "/").await;
    assert!(page.status == 503 || page.status == 200, "{}", page.status);
    w.wait_state(id, "running").await;
    assert!(w.visit(&p, "/").await.body.contains("Hello from the main branch"));
    w.stop().await;
}

/// An org's custom name works like the default one, through either front door: it
/// proxies a running preview, wakes a sleeping one for a held API client, and offers an
/// erased one's rebuild with a CSRF token bound to the name the form was served on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_names_proxy_wake_and_offer_the_rebuild() {
    let (w, dns) = common::with_custom_base().await;
    let p = w.running_shop("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let custom = w.custom_host(&p);
    assert!(custom.starts_with("shop-main.previews.acme.com:"), "{custom}");
    let json = [("accept", "application/json"), ("user-agent", "curl/8.5.0")];
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &json, "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["hello"], "from the demo app");
    let page = http::get_html(w.edge, &custom, "/").await.unwrap();
    assert!(page.body.contains("Hello from the main branch"), "{}", page.body);

    // asleep: a held API client wakes it at the custom name
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &json, "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // erased: the custom name keeps offering the rebuild
    w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    w.wait_state(&id, "erased").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let page = http::get_html(w.edge, &custom, "/cart").await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("This preview was erased"), "{}", page.body);
    let token = csrf_of(&page.body);
    // a token served on the default name does not work on the custom one
    let other = csrf_of(&w.visit(&p, "/").await.body);
    let origin = format!("http://{custom}");
    let r = post_form_at(&w, &custom, &format!("csrf={other}"), &[("origin", &origin)]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post_form_at(&w, &custom, &format!("csrf={token}&return_to=%2Fcart"), &[("origin", &origin)]).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/cart"));
    w.wait_state(&id, "running").await;
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &json, "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // the domain's record goes missing: past the grace period its names show a page
    // that says so and wake nothing; the default name keeps serving
    dns.set_txt("_wakegate-challenge.acme.com", &[]).await;
    let page = wakegate_testkit::eventually(Duration::from_secs(20), "the suspended page", || async {
        let page = http::get_html(w.edge, &custom, "/").await.ok()?;
        (page.status == 403).then_some(page)
    })
    .await;
    assert!(page.body.contains("This address is suspended"), "{}", page.body);
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &json, "").await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(w.api(&w.show(&id).await, "/api/hello", &[]).await.status, 200);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_return_to_sends_the_visitor_home() {
    let w = World::start().await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    w.wait_state(id, "erased").await;
    let token = csrf_of(&w.visit(&p, "/").await.body);
    // a line break in return_to once reached a panic after the rebuild was accepted
    let r = post_form(&w, &p, &format!("csrf={token}&return_to=%2F%0A"), &[]).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/"));
    w.wait_state(id, "running").await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sleeping_preview_wakes_once_for_200_visits_and_holds_api_clients() {
    let w = World::start().await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let machine = w.machine_of(&id).await;
    assert_eq!(w.app_starts(&machine), 1);

    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;

    // 200 browsers at once: all get the waking page; one wake
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let addr = w.edge;
        let host = w.host(&p);
        tasks.push(tokio::spawn(async move { http::get_html(addr, &host, "/").await.unwrap() }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 503 {
            assert!(r.body.contains("Waking this preview"), "{}", r.body);
            assert!(r.body.contains("/_wakegate/status?after="));
        }
        *statuses.entry(r.status).or_insert(0) += 1;
    }
    assert!(statuses.get(&503).copied().unwrap_or(0) > 0, "{statuses:?}");
    w.wait_state(&id, "running").await;
    assert!(w.visit(&p, "/").await.body.contains("Hello from the main branch"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.app_starts(&machine), 2, "exactly one wake: the build's start plus one");

    // the status endpoint the page polls
    let st = w.api(&p, "/_wakegate/status?after=0", &[]).await.json();
    assert_eq!(st["state"], "running");

    // an API client is held until the app answers
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    let r = w.api(&p, "/api/hello", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["hello"], "from the demo app");
    assert_eq!(w.app_starts(&machine), 3);
    w.stop().await;
}

/// More API clients than the waker takes requests at once (1,024) arrive together at a
/// sleeping preview: all are held and get the app, with one wake. (The edge sends one
/// wake and one status long-poll per version for all of them; `scripts/bench`'s
/// thousand-client row is where the difference shows: 488 of 1,000 got 503 when each
/// held client polled on its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_held_clients_than_the_waker_takes_at_once_all_get_the_app() {
    let clients = if common::through_worker() { 200 } else { 1200 };
    let w = World::start_with(&[("WAKEGATE_MAX_CONNECTIONS_PER_IP", "4096")], 600).await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let machine = w.machine_of(&id).await;
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    let starts = w.app_starts(&machine);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (edge, host) = (w.edge, w.host(&p));
        tasks.push(tokio::spawn(async move {
            let headers = [("accept", "application/json"), ("user-agent", "held-client")];
            http::send(edge, "GET", &host, "/api/hello", &headers, "").await.map(|r| r.status).unwrap_or(0)
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&200), Some(&clients), "{statuses:?}");
    assert_eq!(w.app_starts(&machine), starts + 1, "one wake");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bots_and_probes_never_wake_nor_count() {
    let w = World::start().await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = w.dev.store.last_activity(&id).await.unwrap();
    for ua in
        ["Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "UptimeRobot/2.0", "facebookexternalhit/1.1"]
    {
        let r = http::send(w.edge, "GET", &w.host(&p), "/", &[("accept", "text/html"), ("user-agent", ua)], "")
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{ua}");
        let r = http::send(w.edge, "GET", &w.host(&p), "/", &[("user-agent", ua)], "").await.unwrap();
        assert_eq!(r.status, 503, "{ua}");
        assert!(r.header("retry-after").is_some());
    }
    let r = http::send(
        w.edge,
        "GET",
        &w.host(&p),
        "/",
        &[("accept", "text/html"), ("user-agent", http::BROWSER_UA), ("sec-purpose", "prefetch")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    // Google's unfurlers and safety checks, Safari's previews, HEAD and CORS preflights
    for (method, headers) in [
        ("GET", vec![("user-agent", "Google-PageRenderer Google (+https://developers.google.com/+/web/snippet/)")]),
        ("GET", vec![("user-agent", "Mozilla/5.0 (compatible; GoogleOther)")]),
        ("GET", vec![("user-agent", "Google-Safety")]),
        ("GET", vec![("user-agent", http::BROWSER_UA), ("x-purpose", "preview")]),
        ("HEAD", vec![("user-agent", http::BROWSER_UA)]),
        ("OPTIONS", vec![("user-agent", http::BROWSER_UA), ("access-control-request-method", "POST")]),
    ] {
        let mut h = headers.clone();
        h.push(("accept", "text/html"));
        let r = http::send(w.edge, method, &w.host(&p), "/", &h, "").await.unwrap();
        assert_eq!(r.status, 503, "{method} {headers:?}");
        let r = http::send(w.edge, method, &w.host(&p), "/api/hello", &headers, "").await.unwrap();
        assert_eq!(r.status, 503, "{method} {headers:?}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.show(&id).await["state"], "sleeping");
    assert_eq!(w.dev.store.last_activity(&id).await.unwrap(), before, "bots are not activity");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fractional_hour_ttl_erases_and_pinned_previews_stay() {
    let w = World::start().await;
    let p = w.running("main").await;
    let pinned = w.running("feature/blue").await;
    let id = p["id"].as_str().unwrap();
    let pid = pinned["id"].as_str().unwrap();
    assert!(p["ttl_remaining_ms"].as_u64().unwrap() > 23 * 3_600_000);

    // bad TTLs are refused with a clear error
    for bad in [json!(0), json!(-1), json!(8761), json!("x")] {
        let (s, body) = w.op("PUT", &format!("/v1/previews/{id}/ttl"), Some(json!({ "ttl_hours": bad }))).await;
        assert_eq!(s, 400, "{bad}: {body}");
    }
    let (s, v) = w.op("POST", &format!("/v1/previews/{pid}/pin"), None).await;
    assert_eq!((s, v["pinned"].clone()), (200, json!(true)));
    assert!(v["ttl_remaining_ms"].is_null(), "pinned previews do not expire");
    for target in [id, pid] {
        let (s, v) = w.op("PUT", &format!("/v1/previews/{target}/ttl"), Some(json!({ "ttl_hours": 0.001 }))).await;
        assert_eq!(s, 200, "{v}");
    }
    let erased = w.wait_state(id, "erased").await;
    assert_eq!(erased["reason"], "ttl");
    let page = w.visit(&p, "/").await;
    assert!(page.body.contains("This preview was erased"));
    assert_eq!(w.show(pid).await["state"], "running");
    // the erased preview's machine is deleted right after the tombstone is written
    wakegate_testkit::eventually(WAIT, "the erased machine to be deleted", || async {
        (w.machine_dirs().len() == 1).then_some(())
    })
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_branch_is_gone() {
    let w = World::start().await;
    let p = w.running("feature/blue").await;
    let id = p["id"].as_str().unwrap();
    w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    w.wait_state(id, "erased").await;
    w.repo.delete_branch("feature/blue");
    let page = wakegate_testkit::eventually(WAIT, "the gone page", || async {
        let r = w.visit(&p, "/").await;
        (r.status == 410).then_some(r)
    })
    .await;
    assert!(page.body.contains("This preview is gone"));
    assert!(!page.body.contains("<form"), "nothing to rebuild");
    assert_eq!(w.show(id).await["state"], "gone");
    assert_eq!(w.api(&p, "/", &[]).await.status, 410);
    // a preview for a ref that does not exist is refused
    let (s, _) = w.op("POST", "/v1/projects/demo/previews", Some(json!({"ref": "no-such-branch"}))).await;
    assert_eq!(s, 422);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_previews_go_to_sleep() {
    let w = World::start_with(&[], 1).await;
    let p = w.running("main").await;
    w.wait_state(p["id"].as_str().unwrap(), "sleeping").await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_redeploy_keeps_the_previous_version_serving() {
    let w = World::start().await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    w.repo.commit(
        &[("wakegate.toml", "build = \"echo broken >&2; exit 3\"\nrun = \"python3 app.py\"\n")],
        "break the build",
    );
    wakegate_testkit::git::git(&w.repo.work, &["push", "-q", "origin", "main"]);
    let (s, v) = w.op("POST", &format!("/v1/previews/{id}/rebuild"), None).await;
    assert_eq!(s, 202, "{v}");
    let v = wakegate_testkit::eventually(WAIT, "the redeploy to fail", || async {
        let v = w.show(id).await;
        (v["state"] == "running" && !v["last_error"].is_null()).then_some(v)
    })
    .await;
    assert!(v["last_error"].as_str().unwrap().contains("broken"), "{v}");
    assert!(w.visit(&p, "/").await.body.contains("Hello from the main branch"));
    assert_eq!(w.machine_dirs().len(), 1, "the failed build's machine is deleted");

    // a first build that fails shows the failed page with a retry button
    let (_, blue) = w.op("POST", "/v1/projects/demo/previews", Some(json!({"ref": "feature/blue"}))).await;
    let blue = w.wait_state(blue["id"].as_str().unwrap(), "running").await;
    let bid = blue["id"].as_str().unwrap();
    wakegate_testkit::git::git(&w.repo.work, &["checkout", "-q", "feature/blue"]);
    w.repo.commit(&[("wakegate.toml", "build = \"exit 4\"\nrun = \"python3 app.py\"\n")], "break blue");
    wakegate_testkit::git::git(&w.repo.work, &["push", "-q", "origin", "feature/blue"]);
    w.op("POST", &format!("/v1/previews/{bid}/erase"), None).await;
    w.wait_state(bid, "erased").await;
    w.op("POST", &format!("/v1/previews/{bid}/rebuild"), None).await;
    w.wait_state(bid, "failed").await;
    let page = w.visit(&blue, "/").await;
    assert_eq!(page.status, 503);
    assert!(page.body.contains("failed to start") && page.body.contains("Try again"), "{}", page.body);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_visit_under_a_stale_cached_route_still_wakes_the_preview() {
    // the edge caches running routes; the preview falls asleep while its route is cached
    let w = World::start_with(&[("WAKEGATE_ROUTE_CACHE_SECS", "60")], 600).await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    assert!(w.visit(&p, "/").await.body.contains("Hello from the main branch"));
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    let page = w.visit(&p, "/").await;
    assert_eq!(page.status, 503, "{}", page.body);
    assert!(page.body.contains("Waking this preview"), "{}", page.body);
    w.wait_state(&id, "running").await;

    // an API client under the stale route is held while it wakes, not answered 502
    assert_eq!(w.api(&p, "/api/hello", &[]).await.status, 200);
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    let r = w.api(&p, "/api/hello", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["hello"], "from the demo app");
    w.stop().await;
}
