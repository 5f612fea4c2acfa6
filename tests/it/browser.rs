//! Headless Chromium: a person opens an erased preview, clicks the button once, and the
//! same tab ends up showing the app with no further action.

use crate::common;

use common::*;
use std::time::Duration;
use wakegate_testkit::browser::Browser;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirm_to_rebuild_in_chromium() {
    let w = World::start().await;
    let p = w.running("feature/blue").await;
    let id = p["id"].as_str().unwrap();
    w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    w.wait_state(id, "erased").await;

    let browser = Browser::start().await.expect("chromium and chromedriver are installed (scripts/test installs them)");
    let url = format!("http://{}/", w.host(&p));
    browser.goto(&url).await.unwrap();
    assert_eq!(browser.title().await.unwrap(), "Preview erased · demo");
    let shot = browser.screenshot().await.unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a real screenshot");
    std::fs::write(w.data.join("confirm.png"), &shot).unwrap();

    browser.click("#confirm").await.unwrap();
    // no further action: the building page polls and reloads itself into the app
    let source = wakegate_testkit::eventually(Duration::from_secs(90), "the tab to show the app", || async {
        let s = browser.page_source().await.ok()?;
        s.contains("Hello from the feature/blue branch").then_some(s)
    })
    .await;
    assert!(source.contains(r#"id="app""#));
    assert_eq!(browser.current_url().await.unwrap(), url, "same tab, same URL");
    assert_eq!(w.show(id).await["state"], "running");
    drop(browser);
    w.stop().await;
}

/// The same at an org's custom name: Chromium resolves `*.previews.acme.com` to
/// 127.0.0.1 (a host resolver rule), opens the erased preview's custom URL, clicks once,
/// and the same tab becomes the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirm_to_rebuild_at_a_custom_name_in_chromium() {
    let (w, _dns) = with_custom_base().await;
    let p = w.running_shop("feature/blue").await;
    let id = p["id"].as_str().unwrap();
    w.op("POST", &format!("/v1/previews/{id}/erase"), None).await;
    w.wait_state(id, "erased").await;

    let browser = Browser::start_with(&["--host-resolver-rules=MAP *.previews.acme.com 127.0.0.1"])
        .await
        .expect("chromium and chromedriver are installed (scripts/test installs them)");
    let url = format!("http://{}/", w.custom_host(&p));
    assert!(url.starts_with("http://shop-feature-blue.previews.acme.com:"), "{url}");
    browser.goto(&url).await.unwrap();
    assert_eq!(browser.title().await.unwrap(), "Preview erased · shop");
    browser.click("#confirm").await.unwrap();
    wakegate_testkit::eventually(Duration::from_secs(90), "the tab to show the app", || async {
        let s = browser.page_source().await.ok()?;
        s.contains("Hello from the feature/blue branch").then_some(s)
    })
    .await;
    assert_eq!(browser.current_url().await.unwrap(), url, "same tab, same URL");
    assert_eq!(w.show(id).await["state"], "running");
    drop(browser);
    w.stop().await;
}
