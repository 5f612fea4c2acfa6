//! The waker API against its OpenAPI document, and its security: every documented
//! operation is called on the live server; each answer's status must be documented and
//! its body must match the schema. Forged signatures, replays, clock skew, missing
//! tokens and oversized bodies are refused.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use wakegate_core::sign::{self, Key};
use wakegate_testkit::http;

const EDGE_KEY: &str = "edge-key-for-the-api-tests-0123456789";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn signed(w: &World, method: &str, path: &str, body: &str, t: u64, nonce: &str) -> http::Response {
    let sig = sign::sign(
        &Key::new(EDGE_KEY.as_bytes().to_vec()),
        method,
        path,
        &sign::body_digest(body.as_bytes()),
        t,
        nonce,
    );
    let host = w.dev.waker_addr.to_string();
    http::send(
        w.dev.waker_addr,
        method,
        &host,
        path,
        &[(sign::SIGNATURE_HEADER, &sig), ("content-type", "application/json")],
        body.to_string(),
    )
    .await
    .unwrap()
}

async fn operator(w: &World, method: &str, path: &str, body: &str, token: Option<&str>) -> http::Response {
    let host = w.dev.waker_addr.to_string();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        h.push(("authorization", a.as_str()));
    }
    http::send(w.dev.waker_addr, method, &host, path, &h, body.to_string()).await.unwrap()
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            let kind = if r.contains("/responses/") { "responses" } else { "schemas" };
            &spec["components"][kind][name]
        }
        None => schema,
    }
}

/// A validator for the part of JSON Schema the document uses.
fn validate(spec: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            errors.push(format!("{at}: expected {types:?}, got {v}"));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let (Some(obj), Some(props)) = (v.as_object(), schema.get("properties").and_then(Value::as_object)) {
        for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap()) {
                errors.push(format!("{at}: missing {r}"));
            }
        }
        for (k, val) in obj {
            match props.get(k) {
                Some(s) => validate(spec, s, val, &format!("{at}.{k}"), errors),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: undocumented property {k}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(spec, items, x, &format!("{at}[{i}]"), errors);
        }
    }
}

fn operation<'a>(spec: &'a Value, method: &str, path: &str) -> Option<(String, &'a Value)> {
    let path = path.split('?').next().unwrap();
    let segs: Vec<&str> = path.split('/').collect();
    for (template, ops) in spec["paths"].as_object().unwrap() {
        let t: Vec<&str> = template.split('/').collect();
        if t.len() == segs.len() && t.iter().zip(&segs).all(|(a, b)| a.starts_with('{') || a == b) {
            if let Some(op) = ops.get(method.to_ascii_lowercase()) {
                return Some((format!("{method} {template}"), op));
            }
        }
    }
    None
}

fn check(spec: &Value, method: &str, path: &str, r: &http::Response, seen: &mut BTreeSet<String>) {
    let (name, op) =
        operation(spec, method, path).unwrap_or_else(|| panic!("{method} {path} is not in the OpenAPI document"));
    seen.insert(name.clone());
    let status = r.status.to_string();
    let resp = op["responses"]
        .get(&status)
        .unwrap_or_else(|| panic!("{name}: status {status} is not documented ({})", r.body));
    let resp = resolve(spec, resp);
    if let Some(schema) = resp.pointer("/content/application~1json/schema") {
        let mut errors = Vec::new();
        validate(spec, schema, &r.json(), &name, &mut errors);
        assert!(errors.is_empty(), "{name} {status}: {errors:?}\n{}", r.body);
    } else {
        assert!(r.body.is_empty(), "{name} {status}: undocumented body {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_matches_its_openapi_document() {
    let dns = wakegate_testkit::dns::DnsServer::start(&["acme.com"]).await;
    let servers = dns.addr.to_string();
    let s3 = wakegate_testkit::s3::S3Server::start().await.unwrap();
    let s3_settings = s3.settings("dumps");
    let mut extra = vec![("WAKEGATE_EDGE_KEY", EDGE_KEY), ("WAKEGATE_DNS_SERVERS", servers.as_str())];
    extra.extend(s3_settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let w = World::start_with(&extra, 600).await;
    let spec: Value = serde_json::from_str(wakegate_waker::openapi_json()).unwrap();
    let tok = Some(w.dev.operator_token.as_str());
    let mut seen = BTreeSet::new();

    let served: Value = operator(&w, "GET", "/openapi.json", "", None).await.json();
    assert_eq!(served, spec, "the server serves the document generated from its handlers");

    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let host = p["host"].as_str().unwrap().to_string();
    let mut n = 0;
    let mut nonce = || {
        n += 1;
        format!("n{n}")
    };

    // (method, path, body, operator?)
    let operator_calls: Vec<(&str, String, String)> = vec![
        ("GET", "/healthz".into(), String::new()),
        ("GET", "/openapi.json".into(), String::new()),
        ("GET", "/v1/projects".into(), String::new()),
        (
            "POST",
            "/v1/projects".into(),
            json!({"name": "other", "git_url": w.repo.url(), "ttl_hours": 0.5}).to_string(),
        ),
        ("POST", "/v1/projects".into(), json!({"name": "other", "git_url": w.repo.url()}).to_string()),
        ("POST", "/v1/projects".into(), json!({"name": "Bad Name", "git_url": "x"}).to_string()),
        ("POST", "/v1/projects".into(), json!({"name": "x", "git_url": "x", "ttl_hours": 9000}).to_string()),
        ("POST", "/v1/projects".into(), "{not json".into()),
        ("POST", "/v1/projects".into(), "x".repeat(70 * 1024)),
        ("GET", "/v1/projects/demo".into(), String::new()),
        ("GET", "/v1/projects/nope".into(), String::new()),
        ("POST", "/v1/projects/demo/previews".into(), json!({"ref": "main"}).to_string()),
        ("POST", "/v1/projects/demo/previews".into(), json!({"ref": "--upload-pack=evil"}).to_string()),
        ("POST", "/v1/projects/demo/previews".into(), json!({"ref": "missing"}).to_string()),
        ("POST", "/v1/projects/nope/previews".into(), json!({"ref": "main"}).to_string()),
        ("GET", "/v1/previews".into(), String::new()),
        ("GET", format!("/v1/previews/{id}"), String::new()),
        ("GET", "/v1/previews/nope".into(), String::new()),
        ("POST", format!("/v1/previews/{id}/pin"), String::new()),
        ("POST", format!("/v1/previews/{id}/unpin"), String::new()),
        ("PUT", format!("/v1/previews/{id}/ttl"), json!({"ttl_hours": 2.5}).to_string()),
        ("PUT", format!("/v1/previews/{id}/ttl"), json!({"ttl_hours": null}).to_string()),
        ("PUT", format!("/v1/previews/{id}/ttl"), json!({"ttl_hours": 0}).to_string()),
        ("GET", format!("/v1/previews/{id}/logs?stream=build"), String::new()),
        ("GET", format!("/v1/previews/{id}/logs?stream=app&from=5"), String::new()),
        ("GET", format!("/v1/previews/{id}/logs?stream=db"), String::new()),
        ("GET", "/v1/previews/nope/logs?stream=app".into(), String::new()),
        ("POST", format!("/v1/previews/{id}/rebuild"), String::new()),
    ];
    for (m, path, body) in &operator_calls {
        let r = operator(&w, m, path, body, tok).await;
        check(&spec, m, path, &r, &mut seen);
    }
    // orgs, a domain proven through the DNS server, a base
    let org_calls: Vec<(&str, &str, Value, u16)> = vec![
        ("GET", "/v1/orgs", Value::Null, 200),
        ("GET", "/v1/custom-hostnames", Value::Null, 200),
        ("POST", "/v1/orgs", json!({"name": "acme"}), 201),
        ("POST", "/v1/orgs", json!({"name": "acme"}), 409),
        ("POST", "/v1/orgs", json!({"name": "Not A Name"}), 400),
        ("GET", "/v1/orgs/acme", Value::Null, 200),
        ("GET", "/v1/orgs/nope", Value::Null, 404),
        ("POST", "/v1/orgs/acme/domains", json!({"domain": "acme.com"}), 201),
        ("POST", "/v1/orgs/acme/domains", json!({"domain": "co.uk"}), 400),
        ("POST", "/v1/orgs/acme/domains/acme.com/verify", Value::Null, 422),
        ("SET-TXT", "", Value::Null, 0),
        ("POST", "/v1/orgs/acme/domains/acme.com/verify", Value::Null, 200),
        ("POST", "/v1/orgs/acme/bases", json!({"base": "acme.com"}), 400),
        ("POST", "/v1/orgs/acme/bases", json!({"base": "previews.acme.com"}), 201),
        ("POST", "/v1/orgs/acme/bases", json!({"base": "previews.acme.com"}), 200),
        ("DELETE", "/v1/orgs/acme/domains/acme.com", Value::Null, 409),
        ("DELETE", "/v1/orgs/acme/bases/previews.acme.com", Value::Null, 204),
        ("DELETE", "/v1/orgs/acme/domains/acme.com", Value::Null, 204),
    ];
    let mut challenge = Value::Null;
    for (m, path, body, status) in org_calls {
        if m == "SET-TXT" {
            dns.set_txt(challenge["name"].as_str().unwrap(), &[challenge["value"].as_str().unwrap()]).await;
            continue;
        }
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let r = operator(&w, m, path, &body, tok).await;
        assert_eq!(r.status, status, "{m} {path}: {}", r.body);
        if path.ends_with("/domains") && status == 201 {
            challenge = r.json()["challenge"].clone();
        }
        check(&spec, m, path, &r, &mut seen);
    }
    w.wait_state(&id, "running").await;
    for (m, path) in [("POST", format!("/v1/previews/{id}/sleep")), ("POST", format!("/v1/previews/{id}/wake"))] {
        let r = operator(&w, m, &path, "", tok).await;
        check(&spec, m, &path, &r, &mut seen);
        if path.ends_with("sleep") {
            w.wait_state(&id, "sleeping").await;
        }
    }
    w.wait_state(&id, "running").await;
    // missing or wrong token
    for t in [None, Some("wrong")] {
        let r = operator(&w, "GET", "/v1/previews", "", t).await;
        assert_eq!(r.status, 401);
        check(&spec, "GET", "/v1/previews", &r, &mut seen);
    }

    let edge_calls: Vec<(&str, String, String)> = vec![
        ("GET", format!("/v1/edge/route?host={host}"), String::new()),
        ("GET", "/v1/edge/route?host=nope.localhost".into(), String::new()),
        ("GET", "/v1/edge/route?host=bad_host!".into(), String::new()),
        ("GET", format!("/v1/edge/status?host={host}&after=0&wait=100"), String::new()),
        ("POST", "/v1/edge/wake".into(), json!({"host": host}).to_string()),
        ("POST", "/v1/edge/wake".into(), json!({"host": "nope.localhost"}).to_string()),
        ("POST", "/v1/edge/activity".into(), json!({"hosts": [host, "nope.localhost", "bad_host!"]}).to_string()),
        ("POST", "/v1/edge/activity".into(), json!({"hosts": "nope"}).to_string()),
        ("POST", "/v1/edge/rebuild".into(), json!({"host": host, "client_ip": "127.0.0.1"}).to_string()),
    ];
    for (m, path, body) in &edge_calls {
        let r = signed(&w, m, path, body, now(), &nonce()).await;
        check(&spec, m, path, &r, &mut seen);
    }
    let (_, erase) = w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    check(
        &spec,
        "POST",
        &format!("/v1/previews/{id}/erase"),
        &http::Response { status: 202, headers: Default::default(), body: erase.to_string() },
        &mut seen,
    );
    w.wait_state(&id, "erased").await;
    let r = signed(
        &w,
        "POST",
        "/v1/edge/rebuild",
        &json!({"host": host, "client_ip": "127.0.0.1"}).to_string(),
        now(),
        &nonce(),
    )
    .await;
    assert_eq!(r.status, 202);
    check(&spec, "POST", "/v1/edge/rebuild", &r, &mut seen);

    // forge webhooks: a project without a forge, bad forge settings, then a GitHub
    // project whose deliveries are forged, ignored, accepted, repeated, too big, bad
    let hook = |project: &str| format!("/v1/forge/{project}/hook");
    let deliver = |path: String, event: &'static str, id: &'static str, secret: &'static str, body: String| {
        let sig = wakegate_waker::forge::github::sign(secret, body.as_bytes());
        let addr = w.dev.waker_addr;
        async move {
            let h = [
                ("content-type", "application/json"),
                ("x-github-event", event),
                ("x-github-delivery", id),
                ("x-hub-signature-256", sig.as_str()),
            ];
            http::send(addr, "POST", &addr.to_string(), &path, &h, body).await.unwrap()
        }
    };
    let r = deliver(hook("demo"), "ping", "1", "s", "{}".into()).await;
    assert_eq!(r.status, 404, "{}", r.body);
    check(&spec, "POST", &hook("demo"), &r, &mut seen);
    let secrets = wakegate_testkit::tempdir("api-secrets");
    std::fs::write(secrets.join("hook"), "hook-secret").unwrap();
    let forge = |repo: &str, api: &str| {
        json!({"kind": "github", "api_url": api, "repo": repo, "token": {"env": "WAKEGATE_API_TEST_TOKEN"},
               "webhook_secret": {"file": secrets.join("hook").to_str().unwrap()}})
    };
    for (bad, field) in [
        (forge("acme", "https://api.github.com"), "forge.repo"),
        (forge("acme/shop", "http://api.github.com"), "forge.api_url"),
        (forge("acme/shop", "https://user:pw@api.github.com"), "forge.api_url"),
    ] {
        let body = json!({"name": "hooked", "git_url": w.repo.url(), "forge": bad}).to_string();
        let r = operator(&w, "POST", "/v1/projects", &body, tok).await;
        assert_eq!((r.status, r.json()["field"].as_str()), (400, Some(field)), "{}", r.body);
    }
    let body = json!({"name": "hooked", "git_url": w.repo.url(), "forge": forge("acme/shop", "http://127.0.0.1:9")});
    let r = operator(&w, "POST", "/v1/projects", &body.to_string(), tok).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let pr = json!({"action": "opened", "number": 5, "repository": {"full_name": "acme/shop"},
                    "pull_request": {"number": 5}})
    .to_string();
    let other = pr.replace("acme/shop", "acme/other");
    for (event, id, secret, body, status) in [
        ("pull_request", "d1", "wrong", pr.clone(), 401),
        ("ping", "d0", "hook-secret", json!({"zen": "hi"}).to_string(), 202),
        ("pull_request", "d1", "hook-secret", pr.clone(), 202),
        ("pull_request", "d1", "hook-secret", pr.clone(), 200),
        ("pull_request", "d2", "hook-secret", other, 422),
        ("pull_request", "d3", "hook-secret", "{not json".to_string(), 400),
        ("pull_request", "d4", "hook-secret", format!("{{\"pad\": \"{}\"}}", "x".repeat(3 << 20)), 413),
    ] {
        let r = deliver(hook("hooked"), event, id, secret, body).await;
        assert_eq!(r.status, status, "{event} {id}: {}", r.body);
        check(&spec, "POST", &hook("hooked"), &r, &mut seen);
    }

    // a dump pushed by hand, the way the CLI does, and its history
    bucket_of(&s3, "dumps").ensure().await.unwrap();
    let dump = b"CREATE TABLE t (a int);\nINSERT INTO t VALUES (1);\n".to_vec();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&dump))
    };
    let mut call = async |method: &str, path: String, body: Value, status: u16| {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let r = operator(&w, method, &path, &body, tok).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        check(&spec, method, &path, &r, &mut seen);
        if r.body.is_empty() {
            Value::Null
        } else {
            r.json()
        }
    };
    let started = call("POST", "/v1/projects/demo/dumps".into(), json!({"name": "d.sql"}), 400).await;
    assert_eq!(started["field"], "engine");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let started =
            call("POST", "/v1/projects/demo/dumps".into(), json!({"name": "d.sql", "engine": "postgres"}), 201).await;
        ids.push(started["dump"]["id"].as_str().unwrap().to_string());
    }
    let d = format!("/v1/projects/demo/dumps/{}", ids[0]);
    call("POST", format!("{d}/parts/0"), Value::Null, 400).await;
    let url = call("POST", format!("{d}/parts/1"), Value::Null, 200).await;
    let put = reqwest::Client::new().put(url["url"].as_str().unwrap()).body(dump.clone()).send().await.unwrap();
    assert!(put.status().is_success());
    call("GET", format!("{d}/parts"), Value::Null, 200).await;
    call("POST", format!("{d}/complete"), json!({"size": dump.len(), "sha256": "nope"}), 400).await;
    call("POST", format!("{d}/complete"), json!({"size": dump.len(), "sha256": sha}), 202).await;
    wakegate_testkit::eventually(WAIT, "the dump to be checked", || async {
        let r = operator(&w, "GET", &d, "", tok).await;
        (r.json()["state"] == "ready").then_some(())
    })
    .await;
    let shown = call("GET", d.clone(), Value::Null, 200).await;
    assert_eq!(shown["base"], true, "{shown}");
    call("POST", format!("{d}/complete"), json!({"size": dump.len(), "sha256": sha}), 200).await;
    call("GET", "/v1/projects/demo/dumps".into(), Value::Null, 200).await;
    call("POST", format!("{d}/use"), Value::Null, 200).await;
    call("POST", format!("/v1/projects/demo/dumps/{}/use", ids[1]), Value::Null, 409).await;
    call("DELETE", d.clone(), Value::Null, 409).await;
    call("DELETE", format!("/v1/projects/demo/dumps/{}", ids[1]), Value::Null, 204).await;
    call("GET", "/v1/projects/nope/dumps".into(), Value::Null, 404).await;

    // a database pull: refused while the preview is not running; this app has none, so
    // the pull fails and says why
    call("POST", format!("/v1/previews/{id}/db/pull"), Value::Null, 409).await;
    call("GET", format!("/v1/previews/{id}/db/pull"), Value::Null, 404).await;
    let running = w.running("feature/blue").await;
    let rid = running["id"].as_str().unwrap();
    let asked = call("POST", format!("/v1/previews/{rid}/db/pull"), Value::Null, 202).await;
    assert_eq!(asked["state"], "pending", "{asked}");
    let failed = wakegate_testkit::eventually(WAIT, "the pull to fail", || async {
        let r = operator(&w, "GET", &format!("/v1/previews/{rid}/db/pull"), "", tok).await;
        (r.json()["state"] == "failed").then(|| r.json())
    })
    .await;
    assert!(failed["reason"].as_str().unwrap().contains("no database"), "{failed}");
    call("GET", format!("/v1/previews/{rid}/db/pull"), Value::Null, 200).await;
    call("DELETE", format!("/v1/previews/{rid}/db/pull"), Value::Null, 204).await;
    call("DELETE", format!("/v1/previews/{rid}/db/pull"), Value::Null, 404).await;
    // database images: none yet (this app has no database); nothing to refresh
    let images = call("GET", "/v1/db/images".into(), Value::Null, 200).await;
    assert_eq!(images["images"], json!([]), "{images}");
    call("GET", "/v1/db/images?project=demo".into(), Value::Null, 200).await;
    call("GET", "/v1/db/images?project=nope".into(), Value::Null, 404).await;
    call("GET", format!("/v1/previews/{rid}/db"), Value::Null, 404).await;
    call("POST", format!("/v1/previews/{rid}/db/refresh"), Value::Null, 409).await;
    call("POST", format!("/v1/previews/{id}/db/refresh"), Value::Null, 409).await;
    call("POST", "/v1/previews/nope/db/refresh".into(), Value::Null, 404).await;

    let documented: BTreeSet<String> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| ops.as_object().unwrap().keys().map(move |m| format!("{} {p}", m.to_ascii_uppercase())))
        .collect();
    let missed: Vec<_> = documented.difference(&seen).collect();
    assert!(missed.is_empty(), "operations never exercised: {missed:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edge_calls_refuse_forgery_replay_and_skew() {
    let w = World::start_with(&[("WAKEGATE_EDGE_KEY", EDGE_KEY)], 600).await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap();
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(id, "sleeping").await;
    let path = format!("/v1/edge/route?host={}", p["host"].as_str().unwrap());
    let t = now();

    let ok = signed(&w, "GET", &path, "", t, "abc1").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let replay = signed(&w, "GET", &path, "", t, "abc1").await;
    assert_eq!((replay.status, replay.json()["error"].clone()), (401, json!("signature was already used")));
    let skewed = signed(&w, "GET", &path, "", t - 120_000, "abc2").await;
    assert_eq!(skewed.json()["error"], "signature timestamp is outside the allowed clock skew");
    let future = signed(&w, "GET", &path, "", t + 120_000, "abc3").await;
    assert_eq!(future.status, 401);

    // a signature for one request does not carry over to another
    let sig = sign::sign(&Key::new(EDGE_KEY.as_bytes().to_vec()), "GET", &path, &sign::body_digest(b""), t, "abc4");
    let host = w.dev.waker_addr.to_string();
    let body = json!({"host": p["host"]}).to_string();
    let r =
        http::send(w.dev.waker_addr, "POST", &host, "/v1/edge/wake", &[(sign::SIGNATURE_HEADER, &sig)], body.clone())
            .await
            .unwrap();
    assert_eq!((r.status, r.json()["error"].clone()), (401, json!("signature does not match")));
    let forged = sign::sign(
        &Key::new(b"not-the-edge-key-at-all".to_vec()),
        "POST",
        "/v1/edge/wake",
        &sign::body_digest(body.as_bytes()),
        t,
        "abc5",
    );
    let r = http::send(
        w.dev.waker_addr,
        "POST",
        &host,
        "/v1/edge/wake",
        &[(sign::SIGNATURE_HEADER, &forged)],
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    let r = http::send(w.dev.waker_addr, "POST", &host, "/v1/edge/wake", &[], body).await.unwrap();
    assert_eq!((r.status, r.json()["error"].clone()), (401, json!("missing signature")));
    let r = http::send(w.dev.waker_addr, "POST", &host, "/v1/edge/wake", &[(sign::SIGNATURE_HEADER, "garbage")], "{}")
        .await
        .unwrap();
    assert_eq!((r.status, r.json()["error"].clone()), (401, json!("malformed signature header")));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(w.show(id).await["state"], "sleeping", "refused wake calls woke nothing");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creating_a_preview_again_repairs_a_missing_host_binding() {
    // as if waker died between writing the record and binding its host
    let w = World::start().await;
    let project = w.dev.store.project_by_name("demo").await.unwrap().unwrap();
    let label = wakegate_core::host::preview_label(&project.name, &project.id, "main");
    let mut p =
        wakegate_store::conformance::preview(&format!("pv-{}", wakegate_core::host::ref_hash(&project.id, "main")));
    p.project_id = project.id.clone();
    p.project = project.name.clone();
    p.git_ref = "main".into();
    p.label = label.clone();
    (p.created_at, p.built_at, p.state_since) = (now(), now(), now());
    w.dev.store.put_preview(&p, None).await.unwrap();
    let host = format!("{label}.localhost");
    assert!(w.dev.store.resolve_host(&host).await.unwrap().is_none());
    let v = w.preview("main").await;
    assert_eq!(v["id"], p.id.as_str());
    assert_eq!(w.dev.store.resolve_host(&host).await.unwrap().as_deref(), Some(p.id.as_str()));
    w.wait_state(&p.id, "running").await; // the reconciler queued the lost build job too
    w.stop().await;
}

/// A tiny deterministic generator (xorshift), so a failure can be replayed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }

    fn value(&mut self, depth: u32) -> Value {
        match self.next() % if depth > 2 { 6 } else { 8 } {
            0 => Value::Null,
            1 => json!(self.next().is_multiple_of(2)),
            2 => json!(*self.pick(&[0i64, -1, 1, 255, 65536, i64::MAX, i64::MIN])),
            3 => json!(*self.pick(&[0.5f64, -0.0, 1e308, -1e308, 1e-300, 8760.000001])),
            4 => json!(*self.pick(&[u64::MAX, 18446744073709551615u64, 30_001])),
            5 => json!(self.string()),
            6 => Value::Array((0..self.next() % 4).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for _ in 0..self.next() % 4 {
                    m.insert(self.string(), self.value(depth + 1));
                }
                Value::Object(m)
            }
        }
    }

    fn string(&mut self) -> String {
        let long = "x".repeat(5000);
        self.pick(&[
            "",
            "main",
            "refs/heads/main",
            "-x",
            "a..b",
            "nope.localhost",
            "bad_host!",
            "é",
            "\u{0}",
            "%00",
            "stop",
            "hibernate",
            "127.0.0.1",
            "::1",
            "not-an-ip",
            "demo",
            "x\ny",
            long.as_str(),
        ])
        .to_string()
    }

    /// A body for a request schema: mostly objects with its own field names holding
    /// values of any type, sometimes something else entirely.
    fn body(&mut self, spec: &Value, schema: Option<&Value>) -> String {
        let props = schema.map(|s| resolve(spec, s)).and_then(|s| s.get("properties")).and_then(Value::as_object);
        match (self.next() % 6, props) {
            (0, _) => self
                .pick(&[
                    "",
                    "{",
                    "[]",
                    "null",
                    "\"x\"",
                    "{\"a\":",
                    "\u{0}",
                    "[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]",
                ])
                .to_string(),
            (1, _) | (_, None) => self.value(0).to_string(),
            (_, Some(props)) => {
                let mut m = serde_json::Map::new();
                for name in props.keys() {
                    if !self.next().is_multiple_of(5) {
                        let v = if self.next().is_multiple_of(2) { json!(self.string()) } else { self.value(1) };
                        m.insert(name.clone(), v);
                    }
                }
                Value::Object(m).to_string()
            }
        }
    }
}

/// Every operation, driven with generated input (path parameters, queries and bodies of
/// any shape, correctly signed or authorised so they reach the handlers): each answer's
/// status is documented for its operation, its body matches, and none is a 5xx. Every
/// undeclared method on a documented path is a 405 with the JSON error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_input_gets_documented_answers_and_undeclared_methods_405() {
    let w = World::start_with(&[("WAKEGATE_EDGE_KEY", EDGE_KEY)], 600).await;
    let spec: Value = serde_json::from_str(wakegate_waker::openapi_json()).unwrap();
    let tok = Some(w.dev.operator_token.as_str());
    let p = w.preview("main").await;
    let (id, host) = (p["id"].as_str().unwrap().to_string(), p["host"].as_str().unwrap().to_string());
    let mut seen = BTreeSet::new();
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    for (template, ops) in spec["paths"].as_object().unwrap() {
        for m in methods {
            if ops.get(m.to_ascii_lowercase()).is_none() {
                let path = template.replace("{id}", &id).replace("{name}", "demo");
                let r = operator(&w, m, &path, "", tok).await;
                assert_eq!(r.status, 405, "{m} {path}: {}", r.body);
                assert!(r.json()["error"].is_string(), "{m} {path}: {}", r.body);
            }
        }
    }
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut nonce = 0u64;
    for _round in 0..12 {
        for (template, ops) in spec["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let method = method.to_ascii_uppercase();
                let params = ["nope", "%00", "..", "%2F", "%C3%A9", "demo", "a-b"];
                let long = "a".repeat(300);
                let pick_id = if g.next().is_multiple_of(2) { id.as_str() } else { g.pick(&params) };
                let pick_name =
                    if g.next().is_multiple_of(2) { "demo" } else { *g.pick(&[params[0], params[1], long.as_str()]) };
                let pick_org = *g.pick(&["default", "acme", params[0], params[1], long.as_str()]);
                let pick_dns =
                    *g.pick(&["acme.com", "previews.acme.com", "co.uk", params[1], params[4], long.as_str()]);
                let mut path = template
                    .replace("{id}", pick_id)
                    .replace("{name}", pick_name)
                    .replace("{org}", pick_org)
                    .replace("{domain}", pick_dns)
                    .replace("{base}", pick_dns);
                if template.starts_with("/v1/edge/") && method == "GET" {
                    let h = if g.next().is_multiple_of(2) { host.clone() } else { g.string() };
                    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
                    path = format!("{path}?host={}", enc(&h));
                    if g.next().is_multiple_of(2) {
                        let extra = g.pick::<&str>(&[
                            "&after=99999999999999999999",
                            "&after=-1",
                            "&wait=50",
                            "&wait=x",
                            "&after=1&wait=20",
                        ]);
                        path.push_str(extra);
                    }
                }
                let schema = op.pointer("/requestBody/content/application~1json/schema");
                let body =
                    if schema.is_some() || g.next().is_multiple_of(4) { g.body(&spec, schema) } else { String::new() };
                let r = if template.starts_with("/v1/edge/") {
                    nonce += 1;
                    signed(&w, &method, &path, &body, now(), &format!("gen{nonce}")).await
                } else {
                    operator(&w, &method, &path, &body, tok).await
                };
                assert!(
                    r.status < 500
                        || r.status == 503 && r.json()["error"].as_str().is_some_and(|e| e.contains("limit")),
                    "{method} {path} {body:.200} → {} {}",
                    r.status,
                    r.body
                );
                check(&spec, &method, &path, &r, &mut seen);
            }
        }
    }
    w.stop().await;
}

/// Two waker replicas on one Redis: a signature used at one is refused at the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_is_refused_by_every_replica() {
    let redis = wakegate_testkit::redis::RedisServer::start().await.unwrap();
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let store = std::sync::Arc::new(wakegate_store::RedisStore::connect(&redis.url(), "wg:").await.unwrap());
        let waker = std::sync::Arc::new(wakegate_waker::Waker::new(
            store,
            wakegate_waker::WakerConfig {
                edge_key: Key::new(EDGE_KEY.as_bytes().to_vec()),
                operator_token: "t".into(),
                preview_base: "localhost".into(),
                preview_url_template: "http://{label}.localhost".into(),
            },
            std::sync::Arc::new(wakegate_waker::refs::GitRefs::new(std::time::Duration::from_secs(1))),
        ));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap());
        tasks.push(tokio::spawn(wakegate_waker::serve(l, waker)));
    }
    let path = "/v1/edge/route?host=nope.localhost";
    let sig = sign::sign(&Key::new(EDGE_KEY.as_bytes().to_vec()), "GET", path, &sign::body_digest(b""), now(), "once");
    let call = |addr| {
        let sig = sig.clone();
        async move { http::send(addr, "GET", "w", path, &[(sign::SIGNATURE_HEADER, &sig)], "").await.unwrap() }
    };
    assert_eq!(call(addrs[0]).await.status, 404, "the first use is answered");
    let r = call(addrs[1]).await;
    assert_eq!((r.status, r.json()["error"].clone()), (401, json!("signature was already used")), "{}", r.body);
    for t in tasks {
        t.abort();
    }
}
