//! The operator dashboard on the waker.
//!
//! * In headless Chromium: log in through the form (a wrong token first), see the
//!   preview, erase it and rebuild it with the page's buttons, and watch its state move
//!   (erased, then building, then running) in the same page, never reloaded; axe-core
//!   finds no accessibility violations on the login form or the dashboard.
//! * Over plain HTTP (no browser, no JavaScript): the login form without a session,
//!   refusals without a CSRF token or with a forged session, actions done by forms
//!   with their outcome (a refusal in words) on the next page, the live endpoint,
//!   logout, and the login rate limit.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use wakegate_testkit::http::{self, Response};

/// axe-core, installed by `scripts/test` into the tools cache (`WAKEGATE_AXE_CORE` names
/// another copy of `axe.min.js`).
const AXE_VERSION: &str = "4.14.1";

fn axe_source() -> String {
    let path = std::env::var_os("WAKEGATE_AXE_CORE").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let tools = std::env::var_os("WAKEGATE_TOOLS").map(std::path::PathBuf::from).unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/wakegate/tools")
        });
        tools.join(format!("axe-core-{AXE_VERSION}/node_modules/axe-core/axe.min.js"))
    });
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "axe-core is not at {} ({e}); scripts/test installs it, or: \
             npm install --prefix ~/.cache/wakegate/tools/axe-core-{AXE_VERSION} axe-core@{AXE_VERSION}",
            path.display()
        )
    })
}

/// A headless Chromium session through chromedriver, with what this test needs beyond
/// `wakegate_testkit::browser::Browser`: typing, running scripts and reading elements.
struct Chromium {
    driver: std::process::Child,
    port: u16,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Chromium {
    async fn start() -> Chromium {
        let port = wakegate_testkit::free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver is installed (scripts/test installs it)");
        let mut b = Chromium { driver, port, session: String::new() };
        let profile = wakegate_testkit::tempdir("chromium");
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("/usr/bin/chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update", "--no-first-run",
                         "--disable-sync", "--disable-quic", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        // chromedriver takes a moment to listen: bounded retries
        for attempt in 0..100 {
            match b.call("POST", "/session", Some(caps.clone())).await {
                Ok(v) => {
                    b.session = v["sessionId"].as_str().unwrap_or_default().to_string();
                    break;
                }
                Err(e) if attempt == 99 => panic!("no WebDriver session: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        b.call("POST", &b.s("/timeouts"), Some(json!({"script": 60_000}))).await.unwrap();
        b
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let host = format!("127.0.0.1:{}", self.port);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let r = http::send(addr, method, &host, path, &[("content-type", "application/json")], body).await?;
        let v: Value = serde_json::from_str(&r.body)?;
        if r.status >= 400 {
            anyhow::bail!("webdriver {method} {path}: {}", v["value"]["message"]);
        }
        Ok(v["value"].clone())
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    async fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url }))).await.unwrap();
    }

    async fn url(&self) -> String {
        self.call("GET", &self.s("/url"), None).await.unwrap().as_str().unwrap_or_default().to_string()
    }

    async fn title(&self) -> String {
        self.call("GET", &self.s("/title"), None).await.unwrap().as_str().unwrap_or_default().to_string()
    }

    async fn element(&self, css: &str) -> anyhow::Result<String> {
        let el = self.call("POST", &self.s("/element"), Some(json!({"using": "css selector", "value": css}))).await?;
        el[ELEMENT].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("no element {css}"))
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await.unwrap();
        self.call("POST", &self.s(&format!("/element/{id}/click")), Some(json!({}))).await.unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await.unwrap();
        self.call("POST", &self.s(&format!("/element/{id}/clear")), Some(json!({}))).await.unwrap();
        self.call("POST", &self.s(&format!("/element/{id}/value")), Some(json!({ "text": text }))).await.unwrap();
    }

    async fn run(&self, script: &str, args: Value) -> Value {
        self.call("POST", &self.s("/execute/sync"), Some(json!({"script": script, "args": args}))).await.unwrap()
    }

    /// An element's text, or `None` while there is no such element.
    async fn text(&self, css: &str) -> Option<String> {
        let v = self
            .call(
                "POST",
                &self.s("/execute/sync"),
                Some(
                    json!({"script": "var e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                            "args": [css]}),
                ),
            )
            .await
            .ok()?;
        v.as_str().map(str::to_string)
    }

    /// Runs axe-core's default rules on the page; its violations, and the rules that
    /// found something to check and passed.
    async fn axe(&self, source: &str) -> (Vec<Value>, Vec<String>) {
        let loaded = self.run(&format!("{source}\n;return typeof window.axe;"), json!([])).await;
        assert_eq!(loaded, "object", "axe-core loads into the page");
        let script = r#"
            var done = arguments[arguments.length - 1];
            window.axe.run(document).then(function (r) {
              done({
                violations: r.violations.map(function (v) {
                  return { id: v.id, impact: v.impact, help: v.help,
                           nodes: v.nodes.map(function (n) { return n.html + " — " + n.failureSummary; }) };
                }),
                passes: r.passes.map(function (p) { return p.id; })
              });
            }, function (e) { done({ error: String(e) }); });
        "#;
        let r =
            self.call("POST", &self.s("/execute/async"), Some(json!({"script": script, "args": []}))).await.unwrap();
        assert!(r.get("error").is_none(), "axe failed: {r}");
        let passes = r["passes"].as_array().unwrap().iter().filter_map(|p| p.as_str().map(str::to_string)).collect();
        (r["violations"].as_array().cloned().unwrap_or_default(), passes)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // ending the session ends Chromium; then the driver this test started
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let (path, host) = (format!("/session/{}", self.session), format!("127.0.0.1:{}", self.port));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(5), http::send(addr, "DELETE", &host, &path, &[], ""))
                    .await;
            });
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn assert_accessible(page: &str, violations: &[Value], passes: &[String], rules: &[&str]) {
    assert!(
        violations.is_empty(),
        "axe-core finds violations on the {page}:\n{}",
        serde_json::to_string_pretty(violations).unwrap()
    );
    for rule in rules {
        assert!(passes.iter().any(|p| p == rule), "axe-core's {rule} rule checked the {page} and passed: {passes:?}");
    }
}

/// The states the preview's row has shown since [`record_states`], in order.
async fn seen(b: &Chromium) -> Vec<String> {
    let v = b.run("return window.__seen || [];", json!([])).await;
    v.as_array().unwrap().iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// Records every state the row of preview `id` shows, as the page changes it.
async fn record_states(b: &Chromium, id: &str) {
    let script = r##"
        var id = arguments[0];
        window.__seen = [];
        function note() {
          var el = document.querySelector("#state-" + id + " .state");
          var s = el ? el.textContent : "(no row)";
          if (window.__seen[window.__seen.length - 1] !== s) window.__seen.push(s);
        }
        note();
        new MutationObserver(note).observe(document.getElementById("live"),
          { subtree: true, childList: true, characterData: true });
        return true;
    "##;
    assert_eq!(b.run(script, json!([id])).await, true);
}

async fn wait_seen(b: &Chromium, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    wakegate_testkit::eventually(Duration::from_secs(120), what, || async {
        let s = seen(b).await;
        done(&s).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_dashboard_in_chromium() {
    let axe = axe_source();
    let w = World::start().await;
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let url = format!("http://127.0.0.1:{}/dashboard", w.dev.waker_addr.port());

    let b = Chromium::start().await;
    b.goto(&url).await;
    assert_eq!(b.title().await, "Log in · Wakegate");

    // a wrong token: the form again, saying so
    b.type_into("#token", "not-the-operator-token").await;
    b.click("#login button[type=submit]").await;
    let error = wakegate_testkit::eventually(WAIT, "the login error", || b.text("#login-error")).await;
    assert!(error.contains("not the operator token"), "{error}");
    assert_eq!(b.title().await, "Log in · Wakegate");
    let (violations, passes) = b.axe(&axe).await;
    assert_accessible("login form", &violations, &passes, &["label", "color-contrast"]);

    // the right one: the dashboard, with the preview running
    b.type_into("#token", &w.dev.operator_token).await;
    b.click("#login button[type=submit]").await;
    // either the dashboard, or the login form saying the cookie did not come back
    let state_css = format!("#state-{id} .state");
    wakegate_testkit::eventually(WAIT, "the page after the login", || async {
        (b.text(&state_css).await.is_some() || b.text("#login-notice").await.is_some()).then_some(())
    })
    .await;
    let notice = b.text("#login-notice").await;
    assert!(notice.is_none(), "Chromium kept the Secure session cookie over http://127.0.0.1: {notice:?}");
    assert_eq!(b.title().await, "Previews · Wakegate");
    assert_eq!(b.text(&state_css).await.as_deref(), Some("running"));
    let row = b.text(&format!("#preview-{id}")).await.unwrap();
    assert!(row.contains("demo") && row.contains("main"), "{row}");
    let (violations, passes) = b.axe(&axe).await;
    assert_accessible("dashboard", &violations, &passes, &["color-contrast", "button-name", "th-has-data-cells"]);

    // from here the page must never reload: a reload would lose this mark
    let dashboard_url = b.url().await;
    b.run("window.__kept = 'this page'; return true;", json!([])).await;
    record_states(&b, &id).await;

    b.click(&format!("#erase-{id}")).await;
    let s = wait_seen(&b, "the row to show erased", |s| s.iter().any(|x| x == "erased")).await;
    assert_eq!(s.first().map(String::as_str), Some("running"), "{s:?}");
    let said = b.text("#flash").await.unwrap_or_default();
    assert!(said.contains("Erase requested for demo main"), "{said}");
    assert_eq!(w.show(&id).await["state"], "erased");

    b.click(&format!("#rebuild-{id}")).await;
    let s = wait_seen(&b, "the row to go building, then running", |s| {
        let erased = s.iter().position(|x| x == "erased");
        let building = s.iter().rposition(|x| x == "building");
        matches!((erased, building), (Some(e), Some(b)) if e < b) && s.last().is_some_and(|x| x == "running")
    })
    .await;
    assert_eq!(s.first().map(String::as_str), Some("running"), "{s:?}");
    eprintln!("states the row showed: {s:?}");
    let said = b.text("#flash").await.unwrap_or_default();
    assert!(said.contains("Rebuild requested for demo main"), "{said}");
    assert_eq!(w.show(&id).await["state"], "running");

    assert_eq!(b.run("return window.__kept || null;", json!([])).await, "this page", "the page was never reloaded");
    assert_eq!(b.url().await, dashboard_url);
    let (violations, passes) = b.axe(&axe).await;
    assert_accessible("dashboard after the actions", &violations, &passes, &["color-contrast"]);
    // and the check does find what it should: an input without a label
    b.run(
        "var i = document.createElement('input'); document.querySelector('main').appendChild(i); return true;",
        json!([]),
    )
    .await;
    let (violations, _) = b.axe(&axe).await;
    assert!(violations.iter().any(|v| v["id"] == "label"), "{violations:?}");
    drop(b);
    w.stop().await;
}

/// `application/x-www-form-urlencoded`, as a browser sends it.
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => (b as char).to_string(),
                b' ' => "+".to_string(),
                b => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

struct Client {
    addr: std::net::SocketAddr,
    host: String,
}

impl Client {
    async fn get(&self, path: &str, cookie: Option<&str>) -> Response {
        let mut h = vec![("accept", "text/html")];
        h.extend(cookie.map(|c| ("cookie", c)));
        http::send(self.addr, "GET", &self.host, path, &h, "").await.unwrap()
    }

    async fn post(&self, path: &str, cookie: Option<&str>, body: &str, accept: &str) -> Response {
        let mut h = vec![("accept", accept), ("content-type", "application/x-www-form-urlencoded")];
        h.extend(cookie.map(|c| ("cookie", c)));
        http::send(self.addr, "POST", &self.host, path, &h, body.to_string()).await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_sessions_and_csrf_over_http() {
    let w = World::start().await;
    let p = w.preview("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let c = Client { addr: w.dev.waker_addr, host: format!("127.0.0.1:{}", w.dev.waker_addr.port()) };
    let html = "text/html";

    assert!(!wakegate_waker::openapi_json().contains("/dashboard"), "the dashboard is not part of the API document");

    // no session: the login form, and nothing of the previews
    let r = c.get("/dashboard", None).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.body.contains(r#"name="token""#) && r.body.contains(r#"<html lang="en">"#), "{}", r.body);
    assert!(!r.body.contains(&id));
    assert!(r.header("content-security-policy").unwrap().contains("frame-ancestors 'none'"));
    assert_eq!(c.get("/dashboard/live", None).await.status, 401);

    // a wrong token: 401 and the form, saying so
    let r = c.post("/dashboard/login", None, &form(&[("token", "wrong")]), html).await;
    assert_eq!(r.status, 401);
    assert!(r.header("content-type").unwrap().starts_with("text/html"), "a page, not the API's JSON");
    assert!(r.body.contains("That is not the operator token."), "{}", r.body);
    assert!(r.header("set-cookie").is_none());

    // the right one: a strict session cookie
    let r = c.post("/dashboard/login", None, &form(&[("token", &w.dev.operator_token)]), html).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/dashboard?session=new"));
    let set = r.header("set-cookie").unwrap().to_string();
    for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/dashboard"] {
        assert!(set.split("; ").any(|p| p == part), "{part} in {set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let session_id = cookie.split_once('=').unwrap().1.to_string();
    assert_eq!(session_id.len(), 64);
    // the store keeps a digest of the id, not the id
    let rows = w.dev.store.table_list("dashboard-sessions").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!rows[0].0.contains(&session_id) && !rows[0].1.contains(&session_id));

    let r = c.get("/dashboard?session=new", Some(&cookie)).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains(&format!(r#"id="preview-{id}""#)), "{}", r.body);
    assert!(r.body.contains("<h2 id=\"projects-heading\">"));
    let csrf = csrf_of(&r.body);
    assert_eq!(csrf.len(), 64);
    let pin = format!("/dashboard/previews/{id}/pin");

    // no CSRF token, or a wrong one: 403 and nothing done
    let r = c.post(&pin, Some(&cookie), "", html).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("nothing was done"), "{}", r.body);
    let r = c.post(&pin, Some(&cookie), &form(&[("csrf", &"0".repeat(64))]), html).await;
    assert_eq!(r.status, 403);
    assert_eq!(w.show(&id).await["pinned"], false);

    // a forged session (with the real CSRF token): 401 and the login form
    let forged = format!("wakegate_dashboard={}", "ab".repeat(32));
    let r = c.post(&pin, Some(&forged), &form(&[("csrf", &csrf)]), html).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains(r#"name="token""#) && r.body.contains("log in again"), "{}", r.body);
    let r = c.get("/dashboard", Some(&forged)).await;
    assert!(r.body.contains(r#"name="token""#) && !r.body.contains(&id), "{}", r.body);
    assert_eq!(w.show(&id).await["pinned"], false);

    // session and token: done, back to the row, and the next page says so (once)
    let r = c.post(&pin, Some(&cookie), &form(&[("csrf", &csrf)]), html).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some(format!("/dashboard#preview-{id}").as_str()));
    assert_eq!(w.show(&id).await["pinned"], true);
    let r = c.get("/dashboard", Some(&cookie)).await;
    assert!(r.body.contains("Pinned demo main: it stays until unpinned."), "{}", r.body);
    assert!(r.body.contains(&format!(r#"id="unpin-{id}""#)));
    let r = c.get("/dashboard", Some(&cookie)).await;
    assert!(!r.body.contains("Pinned demo main"), "the message is shown once");

    // the page's script gets JSON
    let r = c
        .post(&format!("/dashboard/previews/{id}/unpin"), Some(&cookie), &form(&[("csrf", &csrf)]), "application/json")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(w.show(&id).await["pinned"], false);

    // an action the state refuses is explained in words
    let r = c.post(&format!("/dashboard/previews/{id}/erase"), Some(&cookie), &form(&[("csrf", &csrf)]), html).await;
    assert_eq!(r.status, 303);
    w.wait_state(&id, "erased").await;
    let wake = format!("/dashboard/previews/{id}/wake");
    let r = c.post(&wake, Some(&cookie), &form(&[("csrf", &csrf)]), html).await;
    assert_eq!(r.status, 303);
    let r = c.get("/dashboard", Some(&cookie)).await;
    assert!(r.body.contains("Could not wake demo main: the preview is not asleep (it is erased)."), "{}", r.body);
    let r = c.post(&wake, Some(&cookie), &form(&[("csrf", &csrf)]), "application/json").await;
    assert_eq!(r.status, 409);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["message"].as_str().unwrap().starts_with("Could not wake demo main:"), "{v}");
    let r =
        c.post("/dashboard/previews/pv-nope/sleep", Some(&cookie), &form(&[("csrf", &csrf)]), "application/json").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("Could not sleep preview pv-nope: no preview pv-nope."), "{}", r.body);
    let r = c.post(&format!("/dashboard/previews/{id}/explode"), Some(&cookie), &form(&[("csrf", &csrf)]), html).await;
    assert_eq!(r.status, 404);

    // the live part, for the page's script
    let r = c.get("/dashboard/live", Some(&cookie)).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains(&format!(r#"id="state-{id}""#)) && !r.body.contains("<html"), "{}", r.body);

    // logout needs the token too, then the session is gone everywhere
    let r = c.post("/dashboard/logout", Some(&cookie), "", html).await;
    assert_eq!(r.status, 403);
    let r = c.post("/dashboard/logout", Some(&cookie), &form(&[("csrf", &csrf)]), html).await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    let r = c.get("/dashboard", Some(&cookie)).await;
    assert!(r.body.contains(r#"name="token""#) && !r.body.contains(&id), "{}", r.body);
    assert_eq!(c.post(&pin, Some(&cookie), &form(&[("csrf", &csrf)]), html).await.status, 401);
    assert_eq!(c.get("/dashboard/live", Some(&cookie)).await.status, 401);
    assert!(w.dev.store.table_list("dashboard-sessions").await.unwrap().is_empty());

    // login attempts from one address are limited, the right token included
    let mut refused = None;
    for _ in 0..20 {
        let r = c.post("/dashboard/login", None, &form(&[("token", "guess")]), html).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 401);
    }
    let r = refused.expect("guessing is limited");
    assert!(r.body.contains("Too many login attempts"), "{}", r.body);
    assert!(r.header("retry-after").is_some());
    let r = c.post("/dashboard/login", None, &form(&[("token", &w.dev.operator_token)]), html).await;
    assert_eq!(r.status, 429);
    w.stop().await;
}
