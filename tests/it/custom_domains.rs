//! Custom org subdomains, driven through the operator API and the edge as an org would:
//! a real DNS server on 127.0.0.1 serves the org's zone (the test writes its records),
//! hickory's resolver looks the challenge up, and previews answer under the org's base.

use crate::common;

use common::World;
use serde_json::{json, Value};
use std::time::Duration;
use wakegate_testkit::dns::DnsServer;
use wakegate_testkit::http;

async fn op(w: &World, method: &str, path: &str, body: Value) -> (u16, Value) {
    w.op(method, path, Some(body)).await
}

fn error(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

/// Creates `org`, adds `domain`, writes its challenge record and verifies it.
async fn verified(w: &World, dns: &DnsServer, org: &str, domain: &str) {
    let (s, v) = op(w, "POST", "/v1/orgs", json!({ "name": org })).await;
    assert!(s == 201 || s == 409, "{s} {v}");
    let (s, d) = op(w, "POST", &format!("/v1/orgs/{org}/domains"), json!({ "domain": domain })).await;
    assert!(s == 201 || s == 200, "{s} {d}");
    dns.set_txt(d["challenge"]["name"].as_str().unwrap(), &[d["challenge"]["value"].as_str().unwrap()]).await;
    let (s, v) = w.op("POST", &format!("/v1/orgs/{org}/domains/{domain}/verify"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "verified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_org_proves_its_domain_and_its_previews_answer_under_its_base() {
    let dns = DnsServer::start(&["acme.com", "globex.com"]).await;
    let servers = dns.addr.to_string();
    let w = World::start_with(
        &[
            ("WAKEGATE_DNS_SERVERS", servers.as_str()),
            ("WAKEGATE_DOMAIN_GRACE_SECS", "1"),
            ("WAKEGATE_DOMAIN_RECHECK_SECS", "0.2"),
        ],
        600,
    )
    .await;

    // ---- proving ownership: the record to create, and precise failures
    let (s, v) = op(&w, "POST", "/v1/orgs", json!({ "name": "acme" })).await;
    assert_eq!(s, 201, "{v}");
    let (s, d) = op(&w, "POST", "/v1/orgs/acme/domains", json!({ "domain": "ACME.com." })).await;
    assert_eq!(s, 201, "{d}");
    assert_eq!(d["name"], "acme.com");
    assert_eq!(d["status"], "pending");
    assert_eq!(d["challenge"]["name"], "_wakegate-challenge.acme.com");
    assert_eq!(d["challenge"]["type"], "TXT");
    let expected = d["challenge"]["value"].as_str().unwrap().to_string();
    assert!(expected.starts_with("wakegate-verify="), "{expected}");
    let (s, v) = w.op("POST", "/v1/orgs/acme/domains/acme.com/verify", None).await;
    assert_eq!(s, 422, "{v}");
    assert!(error(&v).contains("does not exist (NXDOMAIN)"), "{v}");
    dns.set_txt("_wakegate-challenge.acme.com", &["wakegate-verify=someone-else"]).await;
    let (s, v) = w.op("POST", "/v1/orgs/acme/domains/acme.com/verify", None).await;
    assert_eq!(s, 422, "{v}");
    assert!(error(&v).contains("\"wakegate-verify=someone-else\"") && error(&v).contains(&expected), "{v}");
    dns.set_txt("_wakegate-challenge.acme.com", &["v=spf1 -all", &expected]).await;
    let (s, v) = w.op("POST", "/v1/orgs/acme/domains/acme.com/verify", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "verified");

    // ---- another org can neither take the domain nor use it
    verified(&w, &dns, "globex", "globex.com").await;
    let (s, d) = op(&w, "POST", "/v1/orgs/globex/domains", json!({ "domain": "acme.com" })).await;
    assert_eq!(s, 409, "{d}");
    assert!(error(&d).contains("verified by another org"), "{d}");

    // ---- bases: hostile names, each refused naming its rule
    let bad = [
        ("acme.com", 400, "registrable domain (an apex)"),
        ("co.uk", 400, "public suffix (ICANN section"),
        ("github.io", 400, "public suffix (private section"),
        ("*.previews.acme.com", 400, "is a wildcard"),
        ("127.0.0.1", 400, "is an IP address"),
        ("previews..acme.com", 400, "empty label"),
        ("prеviews.acme.com", 400, "mixes Latin and Cyrillic letters"),
        ("previews.globex.com", 400, "not a strict subdomain of a domain acme has verified (acme.com)"),
    ];
    for (base, status, rule) in bad {
        let (s, v) = op(&w, "POST", "/v1/orgs/acme/bases", json!({ "base": base })).await;
        assert_eq!(s, status, "{base}: {v}");
        assert!(error(&v).contains(rule), "{base}: {v}");
        assert_eq!(v["field"], "base", "{base}: {v}");
    }
    let long = format!("{}.acme.com", "a".repeat(64));
    let (s, v) = op(&w, "POST", "/v1/orgs/acme/bases", json!({ "base": long })).await;
    assert!(s == 400 && error(&v).contains("longer than 63 bytes"), "{v}");
    // normalised, then accepted; the answer says which record to add
    let (s, b) = op(&w, "POST", "/v1/orgs/acme/bases", json!({ "base": "Previews.ACME.com." })).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["name"], "previews.acme.com");
    assert_eq!(b["dns"]["name"], "*.previews.acme.com");
    assert_eq!(b["dns"]["type"], "CNAME");
    // nesting, across orgs and within one
    let (s, v) = op(&w, "POST", "/v1/orgs/acme/bases", json!({ "base": "x.previews.acme.com" })).await;
    assert!(s == 409 && error(&v).contains("is under previews.acme.com"), "{v}");
    dns.set_txt("_wakegate-challenge.eng.acme.com", &[]).await;
    let (s, d) = op(&w, "POST", "/v1/orgs/globex/domains", json!({ "domain": "eng.acme.com" })).await;
    assert_eq!(s, 201, "{d}");
    dns.set_txt("_wakegate-challenge.eng.acme.com", &[d["challenge"]["value"].as_str().unwrap()]).await;
    let (s, v) = w.op("POST", "/v1/orgs/globex/domains/eng.acme.com/verify", None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = op(&w, "POST", "/v1/orgs/globex/bases", json!({ "base": "previews.eng.acme.com" })).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = op(&w, "POST", "/v1/orgs/acme/bases", json!({ "base": "eng.acme.com" })).await;
    assert!(s == 409 && error(&v).contains("parent of previews.eng.acme.com, a preview base of another org"), "{v}");
    let (s, v) = op(&w, "POST", "/v1/orgs/acme/bases", json!({ "base": "a.previews.eng.acme.com" })).await;
    assert!(s == 409 && error(&v).contains("under previews.eng.acme.com, a preview base of another org"), "{v}");

    // ---- previews of the org answer under the base, through the edge
    let (s, v) = op(
        &w,
        "POST",
        "/v1/projects",
        json!({ "name": "shop", "git_url": w.repo.url(), "ttl_hours": 24, "idle_timeout_secs": 600, "org": "acme" }),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, p) = op(&w, "POST", "/v1/projects/shop/previews", json!({ "ref": "main" })).await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["custom_hosts"][0]["host"], "shop-main.previews.acme.com", "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    let p = w.wait_state(&id, "running").await;
    let r = w.api(&p, "/api/hello", &[]).await;
    assert_eq!(r.status, 200, "the default name: {}", r.body);
    let custom = format!("shop-main.previews.acme.com:{}", w.edge.port());
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &[("accept", "application/json")], "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["hello"], "from the demo app");
    // the app is told every URL it answers at; PREVIEW_URL stays the default one
    let urls = r.json()["preview_urls"].as_str().unwrap().to_string();
    let default = r.json()["preview_url"].as_str().unwrap().to_string();
    assert_eq!(urls, format!("{default},http://shop-main.previews.acme.com:{}", w.edge.port()));
    // the default name keeps working
    let p = w.show(&id).await;
    assert_eq!(w.api(&p, "/api/hello", &[]).await.status, 200);

    // two refs that map to one name: the later gets a hash suffix and says so
    let (s, q) = op(&w, "POST", "/v1/projects/shop/previews", json!({ "ref": "feature/blue" })).await;
    assert_eq!(s, 201, "{q}");
    assert_eq!(q["custom_hosts"][0]["host"], "shop-feature-blue.previews.acme.com", "{q}");
    w.repo.branch("feature-blue", &[("content.html", "<p>the other blue</p>")]);
    let (s, q2) = op(&w, "POST", "/v1/projects/shop/previews", json!({ "ref": "feature-blue" })).await;
    assert_eq!(s, 201, "{q2}");
    let renamed = q2["custom_hosts"][0]["host"].as_str().unwrap();
    assert!(renamed.starts_with("shop-feature-blue-") && renamed.ends_with(".previews.acme.com"), "{q2}");
    assert!(q2["custom_hosts"][0]["note"].as_str().unwrap().contains("another ref"), "{q2}");

    // a sleeping preview wakes at its custom name
    w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    w.wait_state(&id, "sleeping").await;
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &[("accept", "application/json")], "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    w.wait_state(&id, "running").await;

    // ---- the record disappears: suspended after the grace period, back when it returns
    dns.set_txt("_wakegate-challenge.acme.com", &[]).await;
    wakegate_testkit::eventually(Duration::from_secs(20), "acme.com suspended", || async {
        let (_, org) = w.op("GET", "/v1/orgs/acme", None).await;
        let d = org["domains"].as_array().unwrap().iter().find(|d| d["name"] == "acme.com").cloned().unwrap();
        (d["status"] == "suspended").then_some(org)
    })
    .await;
    let (_, org) = w.op("GET", "/v1/orgs/acme", None).await;
    assert_eq!(org["bases"][0]["suspended"], true, "{org}");
    assert!(org["domains"][0]["last_check"].as_str().unwrap().contains("NXDOMAIN"), "{org}");
    // its names show a page that says so (past the edge's route cache); the default
    // name still serves
    tokio::time::sleep(Duration::from_millis(700)).await;
    let page = http::get_html(w.edge, &custom, "/").await.unwrap();
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("This address is suspended") && page.body.contains("_wakegate-challenge.acme.com"));
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &[("accept", "application/json")], "").await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(w.api(&w.show(&id).await, "/api/hello", &[]).await.status, 200);
    dns.set_txt("_wakegate-challenge.acme.com", &[&expected]).await;
    wakegate_testkit::eventually(Duration::from_secs(20), "acme.com verified again", || async {
        let (_, org) = w.op("GET", "/v1/orgs/acme", None).await;
        (org["bases"][0]["suspended"] == false).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &[("accept", "application/json")], "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // ---- removing the base unbinds its names
    let (s, v) = w.op("DELETE", "/v1/orgs/acme/bases/previews.acme.com", None).await;
    assert_eq!(s, 204, "{v}");
    let p = w.show(&id).await;
    assert_eq!(p["custom_hosts"], json!([]), "{p}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = http::send(w.edge, "GET", &custom, "/api/hello", &[("accept", "application/json")], "").await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    w.stop().await;
}

/// Org `acme` with `previews.acme.com` (proven through a DNS server on loopback) and its
/// project `shop`, on a waker that registers names with the fake Cloudflare `state`
/// serves (`extra`: more settings).
async fn cloudflare_world(
    state: wakegate_testkit::cloudflare::CloudflareState,
    extra: &[(&str, &str)],
) -> (World, DnsServer, wakegate_testkit::cloudflare::FakeCloudflare) {
    let dns = DnsServer::start(&["acme.com"]).await;
    let cf = wakegate_testkit::cloudflare::FakeCloudflare::start(state, wakegate_testkit::hetzner::wall_ms).await;
    let (zone, token) = cf.with(|s| (s.zone.clone(), s.token.clone()));
    let (servers, api) = (dns.addr.to_string(), cf.url());
    let mut settings = vec![
        ("WAKEGATE_DNS_SERVERS", servers.as_str()),
        ("WAKEGATE_CLOUDFLARE_API", api.as_str()),
        ("WAKEGATE_CLOUDFLARE_ZONE_ID", zone.as_str()),
        ("WAKEGATE_CLOUDFLARE_API_TOKEN", token.as_str()),
        ("WAKEGATE_SAAS_SECS", "0.2"),
    ];
    settings.extend_from_slice(extra);
    let w = World::start_with(&settings, 600).await;
    verified(&w, &dns, "acme", "acme.com").await;
    let (s, v) = op(&w, "POST", "/v1/orgs/acme/bases", json!({ "base": "previews.acme.com" })).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = op(
        &w,
        "POST",
        "/v1/projects",
        json!({ "name": "shop", "git_url": w.repo.url(), "ttl_hours": 24, "org": "acme" }),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    (w, dns, cf)
}

/// Each custom name becomes one Cloudflare for SaaS custom hostname (created once,
/// through 429s; deleted once when the name goes); the preview's view shows what
/// Cloudflare says, and a name goes live when the fake turns it active.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_names_are_cloudflare_custom_hostnames_until_they_go() {
    use wakegate_testkit::cloudflare::CloudflareState;
    let (w, _dns, cf) = cloudflare_world(CloudflareState::new(), &[]).await;
    // Cloudflare rate-limits the first requests: waited out, not lost
    cf.with(|s| s.limit_next = 2);
    let mut ids = Vec::new();
    for r in ["main", "feature/blue"] {
        let (s, p) = op(&w, "POST", "/v1/projects/shop/previews", json!({ "ref": r })).await;
        assert_eq!(s, 201, "{p}");
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    let main = "shop-main.previews.acme.com";
    let pending = wakegate_testkit::eventually(Duration::from_secs(30), "registered with Cloudflare", || async {
        let p = w.show(&ids[0]).await;
        let h = p["custom_hostnames"].get(0).cloned()?;
        (h["status"] == "pending").then_some(h)
    })
    .await;
    assert_eq!(pending["hostname"], main);
    assert_eq!(pending["live"], false);
    assert_eq!(pending["ssl_status"], "pending_validation");
    assert!(pending["errors"][0].as_str().unwrap().contains("CNAME"), "{pending}");

    // the fake turns it active: live in the preview's view
    cf.with(|s| s.activate(main));
    wakegate_testkit::eventually(Duration::from_secs(30), "live", || async {
        let p = w.show(&ids[0]).await;
        (p["custom_hostnames"][0]["live"] == true).then_some(())
    })
    .await;
    // moved away (the org's CNAME points elsewhere): no longer live, and why
    cf.with(|s| s.set_status(main, "moved", "active", &["custom hostname does not CNAME to this zone."]));
    let (_, all) = w.op("GET", "/v1/custom-hostnames", None).await;
    assert_eq!(all["enabled"], true);
    assert_eq!(all["in_use"], 2, "{all}");
    assert_eq!(all["included"], 100);

    // removing the base deletes both hostnames, once each
    let (s, v) = w.op("DELETE", "/v1/orgs/acme/bases/previews.acme.com", None).await;
    assert_eq!(s, 204, "{v}");
    wakegate_testkit::eventually(Duration::from_secs(30), "hostnames deleted", || async {
        cf.with(|s| s.hostnames.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    cf.with(|s| {
        assert_eq!(s.count("POST", "/custom_hostnames"), 2, "one create per name: {:?}", s.log);
        assert_eq!(s.log.iter().filter(|c| c.method == "DELETE" && c.status == 200).count(), 2, "{:?}", s.log);
        assert!(s.log.iter().any(|c| c.status == 429), "the rate limit was met");
    });
    let (_, all) = w.op("GET", "/v1/custom-hostnames", None).await;
    assert_eq!(all["in_use"], 0, "{all}");
    w.stop().await;
}

/// The client reads every page of a zone's custom hostnames, and reports Cloudflare's
/// own errors.
#[tokio::test]
async fn the_cloudflare_client_pages_and_reports_errors() {
    use wakegate_testkit::cloudflare::{CloudflareState, FakeCloudflare};
    use wakegate_waker::saas::{Client, SaasConfig};
    let cf = FakeCloudflare::start(CloudflareState::new(), wakegate_testkit::hetzner::wall_ms).await;
    let (zone, token) = cf.with(|s| (s.zone.clone(), s.token.clone()));
    let config = SaasConfig { api: cf.url(), zone_id: zone, token, wildcard: false, every: Duration::from_secs(1) };
    let client = Client::new(config.clone());
    for i in 0..120 {
        client.create(&format!("p{i}.previews.acme.com")).await.unwrap();
    }
    let all = client.list().await.unwrap();
    assert_eq!(all.len(), 120);
    assert_eq!(cf.with(|s| s.log.iter().filter(|c| c.method == "GET").count()), 3, "50 a page");
    let dup = client.create("p1.previews.acme.com").await.unwrap_err().to_string();
    assert!(dup.contains("409") && dup.contains("Duplicate custom hostname") && dup.contains("1406"), "{dup}");
    let bad = client.create("*.previews.acme.com").await.unwrap_err().to_string();
    assert!(bad.contains("400") && bad.contains("Invalid custom hostname"), "{bad}");
    let found = client.find("p7.previews.acme.com").await.unwrap().unwrap();
    client.delete(&found.id).await.unwrap();
    client.delete(&found.id).await.unwrap();
    assert!(client.get(&found.id).await.unwrap().is_none());
    let wrong = Client::new(SaasConfig { token: "wrong".into(), ..config });
    let denied = wrong.list().await.unwrap_err().to_string();
    assert!(denied.contains("403") && denied.contains("Authentication error"), "{denied}");
}

/// The same through the CLI: `wakegate org …` against a running waker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_manages_orgs_domains_and_bases() {
    let dns = DnsServer::start(&["acme.com"]).await;
    let servers = dns.addr.to_string();
    let w = World::start_with(&[("WAKEGATE_DNS_SERVERS", servers.as_str())], 600).await;
    let waker = format!("http://{}", w.dev.waker_addr);
    let token = w.dev.operator_token.clone();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wakegate"))
            .arg("org")
            .args(args)
            .env("WAKEGATE_WAKER_URL", &waker)
            .env("WAKEGATE_OPERATOR_TOKEN", &token)
            .env("WAKEGATE_DATA", w.data.join("cli"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["create", "acme"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&["add-domain", "acme", "ACME.com"]);
    assert!(ok, "{out}{err}");
    let d: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["challenge"]["name"], "_wakegate-challenge.acme.com");
    let (ok, _, err) = cli(&["verify", "acme", "acme.com"]);
    assert!(!ok && err.contains("422") && err.contains("NXDOMAIN"), "{err}");
    dns.set_txt("_wakegate-challenge.acme.com", &[d["challenge"]["value"].as_str().unwrap()]).await;
    let (ok, out, err) = cli(&["verify", "acme", "acme.com"]);
    assert!(ok && out.contains("\"verified\""), "{out}{err}");
    let (ok, _, err) = cli(&["add-base", "acme", "co.uk"]);
    assert!(!ok && err.contains("public suffix") && err.contains("(base)"), "{err}");
    let (ok, out, err) = cli(&["add-base", "acme", "Previews.ACME.com."]);
    assert!(ok && out.contains("*.previews.acme.com"), "{out}{err}");
    let (ok, out, _) = cli(&["show", "acme"]);
    assert!(ok && out.contains("previews.acme.com"), "{out}");
    let (ok, out, err) = cli(&["remove-base", "acme", "previews.acme.com"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&["remove-domain", "acme", "acme.com"]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = cli(&["list"]);
    assert!(ok && out.contains("\"acme\"") && out.contains("\"default\""), "{out}");
    w.stop().await;
}

/// With `WAKEGATE_CLOUDFLARE_WILDCARD`, a base is one `*.<base>` custom hostname however
/// many previews answer under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wildcard_custom_hostname_covers_a_base() {
    use wakegate_testkit::cloudflare::CloudflareState;
    let mut state = CloudflareState::new();
    state.wildcards = true;
    state.activate_after = Some(0);
    let (w, _dns, cf) = cloudflare_world(state, &[("WAKEGATE_CLOUDFLARE_WILDCARD", "true")]).await;
    let mut ids = Vec::new();
    for r in ["main", "feature/blue"] {
        let (s, p) = op(&w, "POST", "/v1/projects/shop/previews", json!({ "ref": r })).await;
        assert_eq!(s, 201, "{p}");
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        wakegate_testkit::eventually(Duration::from_secs(30), "covered by the live wildcard", || async {
            let p = w.show(id).await;
            let h = p["custom_hostnames"].get(0).cloned()?;
            (h["hostname"] == "*.previews.acme.com" && h["live"] == true).then_some(())
        })
        .await;
    }
    cf.with(|s| {
        assert_eq!(s.hostnames.len(), 1);
        assert_eq!(s.count("POST", "/custom_hostnames"), 1, "{:?}", s.log);
    });
    w.stop().await;
}
