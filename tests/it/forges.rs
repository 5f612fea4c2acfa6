//! GitLab and GitHub drive previews, end to end: signed webhook deliveries (shaped as
//! each forge's published examples) reach the real waker, whose forge client talks to a
//! stateful fake of the forge's REST API; builds run on the local backend from a real
//! git repository, and visitors come through the edge.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use wakegate_testkit::forges::{FakeForge, Kind};
use wakegate_testkit::http;

const SECRET: &str = "webhook-secret-for-the-forge-tests";
const SIGNING: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn forge_settings() -> Vec<(&'static str, &'static str)> {
    vec![
        ("WAKEGATE_FORGE_INBOX_SECS", "0.1"),
        ("WAKEGATE_FORGE_STATUS_SECS", "0.2"),
        ("WAKEGATE_FORGE_RECONCILE_SECS", "3600"),
    ]
}

/// A world with project `shop` on the demo repository, driven by a fake forge. Secrets
/// are in files the project names.
struct Forged {
    w: World,
    fake: FakeForge,
    kind: Kind,
}

impl Forged {
    async fn start(kind: Kind, extra: &[(&'static str, &'static str)], signing: bool) -> Forged {
        let mut settings = forge_settings();
        settings.extend_from_slice(extra);
        let w = World::start_with(&settings, 600).await;
        let fake = FakeForge::start(kind).await;
        let dir = wakegate_testkit::tempdir("secrets");
        let file = |name: &str, value: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("{value}\n")).unwrap();
            json!({ "file": p.to_str().unwrap() })
        };
        let mut forge = json!({
            "kind": match kind { Kind::Gitlab => "gitlab", Kind::Github => "github" },
            "api_url": fake.api_url(),
            "repo": fake.repo(),
            "token": file("token", &fake.token()),
            "webhook_secret": file("webhook", SECRET),
            "forks": true,
        });
        if signing {
            forge["signing_secret"] = file("signing", SIGNING);
        }
        let (s, body) = w
            .op("POST", "/v1/projects", Some(json!({ "name": "shop", "git_url": w.repo.url(), "forge": forge })))
            .await;
        assert_eq!(s, 201, "{body}");
        Forged { w, fake, kind }
    }

    /// Delivers a payload as the forge would, signed, with delivery id `id`.
    async fn deliver(&self, event: &str, body: &Value, id: &str) -> (u16, Value) {
        let raw = body.to_string();
        let now = wakegate_store::now_ms() / 1000;
        let mut headers: Vec<(&str, String)> = vec![("content-type", "application/json".into())];
        match self.kind {
            Kind::Gitlab => {
                headers.push(("x-gitlab-event", event.into()));
                headers.push(("x-gitlab-token", SECRET.into()));
                headers.push(("idempotency-key", id.into()));
                headers.push(("x-gitlab-event-uuid", id.into()));
                headers.push(("webhook-id", id.into()));
                headers.push(("webhook-timestamp", now.to_string()));
                headers
                    .push(("webhook-signature", wakegate_waker::forge::gitlab::sign(SIGNING, id, now, raw.as_bytes())));
            }
            Kind::Github => {
                headers.push(("x-github-event", event.into()));
                headers.push(("x-github-delivery", id.into()));
                headers.push(("x-hub-signature-256", wakegate_waker::forge::github::sign(SECRET, raw.as_bytes())));
            }
        }
        self.post(&headers, raw).await
    }

    async fn post(&self, headers: &[(&str, String)], raw: String) -> (u16, Value) {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let addr = self.w.dev.waker_addr;
        let r = http::send(addr, "POST", &addr.to_string(), "/v1/forge/shop/hook", &h, raw).await.unwrap();
        (r.status, serde_json::from_str(&r.body).unwrap_or(Value::Null))
    }

    async fn change_event(&self, number: u64, action: &str, oldrev: Option<&str>, id: &str) -> (u16, Value) {
        let (event, body) = self.fake.change_hook(number, action, oldrev);
        self.deliver(&event, &body, id).await
    }

    fn action(&self, gitlab: &'static str, github: &'static str) -> &'static str {
        match self.kind {
            Kind::Gitlab => gitlab,
            Kind::Github => github,
        }
    }

    /// The head commit of `branch` in the repository.
    fn head(&self, branch: &str) -> String {
        wakegate_testkit::git::git(&self.w.repo.bare, &["rev-parse", branch]).trim().to_string()
    }

    /// Commits `files` on `branch` and pushes; returns the new head.
    fn push(&self, branch: &str, files: &[(&str, &str)]) -> String {
        let work = &self.w.repo.work;
        wakegate_testkit::git::git(work, &["checkout", "-q", branch]);
        self.w.repo.commit(files, "a push");
        wakegate_testkit::git::git(work, &["push", "-q", "origin", branch]);
        wakegate_testkit::git::git(work, &["checkout", "-q", "main"]);
        self.head(branch)
    }

    /// The preview of `git_ref` in project `shop`, if there is one.
    async fn preview_of(&self, git_ref: &str) -> Option<Value> {
        let (s, list) = self.w.op("GET", "/v1/previews", None).await;
        assert_eq!(s, 200);
        list.as_array().unwrap().iter().find(|p| p["project"] == "shop" && p["git_ref"] == git_ref).cloned()
    }

    async fn wait_preview(&self, git_ref: &str, state: &str) -> Value {
        wakegate_testkit::eventually(WAIT, &format!("the preview of {git_ref} to be {state}"), || async {
            let p = self.preview_of(git_ref).await?;
            if p["state"] == "failed" && state != "failed" {
                panic!("preview failed: {p}");
            }
            (p["state"] == state).then_some(p)
        })
        .await
    }

    /// Waits until the inbox is empty (every delivery worked on).
    async fn drained(&self) {
        wakegate_testkit::eventually(WAIT, "the forge inbox to drain", || async {
            let rows = self.w.dev.store.table_list(wakegate_waker::forge::hooks::INBOX).await.unwrap();
            rows.is_empty().then_some(())
        })
        .await
    }

    fn comments(&self, number: u64) -> Vec<String> {
        self.fake.state.lock().unwrap().comments_on(number).into_iter().map(|c| c.body).collect()
    }

    async fn comment_saying(&self, number: u64, what: &str) -> String {
        wakegate_testkit::eventually(WAIT, &format!("the comment on {number} to say {what:?}"), || async {
            let c = self.comments(number);
            assert!(c.len() <= 1, "more than one comment: {c:?}");
            c.into_iter().find(|b| b.contains(what))
        })
        .await
    }

    /// The environment (GitLab) or the latest deployment (GitHub) named for `git_ref`.
    fn env_of(&self, git_ref: &str) -> Option<wakegate_testkit::forges::FakeEnv> {
        let st = self.fake.state.lock().unwrap();
        st.envs.values().rev().find(|e| e.name.ends_with(git_ref)).cloned()
    }
}

/// Runs the futures concurrently (on this task), answers in order.
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

fn slow_manifest() -> String {
    MANIFEST.replace("build = \"python3 -m py_compile app.py\"", "build = \"sleep 30 && python3 -m py_compile app.py\"")
}

async fn the_lifecycle(kind: Kind) {
    let f = Forged::start(kind, &[], kind == Kind::Gitlab).await;
    let reference = |n: u64| match kind {
        Kind::Gitlab => format!("!{n}"),
        Kind::Github => format!("#{n}"),
    };

    // open → the preview runs and the comment shows its URL
    f.w.repo.branch("feature/login", &[("content.html", "<h1>login v1</h1>")]);
    let v1 = f.head("feature/login");
    f.fake.state.lock().unwrap().open(7, "feature/login", &v1);
    let (s, a) = f.change_event(7, f.action("open", "opened"), None, "d-open-7").await;
    assert_eq!((s, a["outcome"].as_str()), (202, Some("accepted")), "{a}");
    let p = f.wait_preview("feature/login", "running").await;
    assert!(f.w.visit(&p, "/").await.body.contains("login v1"));
    let comment = f.comment_saying(7, "Ready").await;
    assert!(comment.contains(p["url"].as_str().unwrap()), "{comment}");
    assert!(comment.starts_with("<!-- wakegate:preview"), "found again by its marker: {comment}");
    wakegate_testkit::eventually(WAIT, "the forge's view to carry the URL", || async {
        let e = f.env_of("feature/login")?;
        (e.external_url.as_deref() == p["url"].as_str()).then_some(())
    })
    .await;
    let first_machine = f.w.machine_of(p["id"].as_str().unwrap()).await;

    // push a slow build, then push again while it builds: the old build is abandoned,
    // its machine deleted, and the running version serves until the new one is ready
    let v2 = f.push("feature/login", &[("content.html", "<h1>login v2</h1>"), ("wakegate.toml", &slow_manifest())]);
    f.fake.state.lock().unwrap().changes.get_mut(&7).unwrap().sha = v2.clone();
    let (s, _) = f.change_event(7, f.action("update", "synchronize"), Some(&v1), "d-push-2").await;
    assert_eq!(s, 202);
    let id = p["id"].as_str().unwrap().to_string();
    let slow_machine = wakegate_testkit::eventually(WAIT, "the slow build to be under way", || async {
        let rec = f.w.dev.store.get_preview(&id).await.unwrap().unwrap();
        match &rec.value.state {
            wakegate_core::lifecycle::State::Building { machine: Some(m), phase, .. }
                if *phase == wakegate_core::lifecycle::Phase::Build =>
            {
                Some(m.clone())
            }
            _ => None,
        }
    })
    .await;
    assert!(f.w.visit(&p, "/").await.body.contains("login v1"), "the old version serves during the build");
    f.comment_saying(7, "Building").await;
    let v3 = f.push("feature/login", &[("content.html", "<h1>login v3</h1>"), ("wakegate.toml", MANIFEST)]);
    f.fake.state.lock().unwrap().changes.get_mut(&7).unwrap().sha = v3.clone();
    // GitLab sends both a push and a merge request update; either one is enough
    let (event, body) = f.fake.push_hook("feature/login", &v2, &v3);
    assert_eq!(f.deliver(&event, &body, "d-push-3a").await.0, 202);
    f.change_event(7, f.action("update", "synchronize"), Some(&v2), "d-push-3b").await;
    wakegate_testkit::eventually(WAIT, "v3 to serve", || async {
        f.w.visit(&p, "/").await.body.contains("login v3").then_some(())
    })
    .await;
    wakegate_testkit::eventually(WAIT, "the abandoned build's and the replaced version's machines to go", || async {
        let machines = f.w.machine_dirs();
        (!machines.contains(&slow_machine) && !machines.contains(&first_machine)).then_some(())
    })
    .await;
    let comment = f.comment_saying(7, "Ready").await;
    assert!(comment.contains(&v3[..8]), "the comment names the commit: {comment}");

    // a draft gets nothing
    f.w.repo.branch("feature/draft", &[("content.html", "<h1>draft</h1>")]);
    let d = f.head("feature/draft");
    f.fake.state.lock().unwrap().open(8, "feature/draft", &d);
    f.fake.state.lock().unwrap().changes.get_mut(&8).unwrap().draft = true;
    assert_eq!(f.change_event(8, f.action("open", "opened"), None, "d-open-8").await.0, 202);
    f.drained().await;
    assert!(f.preview_of("feature/draft").await.is_none(), "no preview for a draft");
    assert!(f.comments(8).is_empty(), "no comment on a draft");

    // a title edit or an approval changes nothing (and is not even queued)
    let (s, a) = f.change_event(7, f.action("approved", "edited"), None, "d-edit-7").await;
    assert_eq!((s, a["outcome"].as_str()), (202, Some("ignored")), "{a}");

    // close → erased, 410 "closed", comment gone, environment stopped / deployment inactive
    f.fake.state.lock().unwrap().changes.get_mut(&7).unwrap().state = "closed".into();
    assert_eq!(f.change_event(7, f.action("close", "closed"), None, "d-close-7").await.0, 202);
    f.wait_preview("feature/login", "gone").await;
    // once the edge's cached route runs out
    let page = wakegate_testkit::eventually(WAIT, "the edge to say gone", || async {
        let page = f.w.visit(&p, "/").await;
        (page.status == 410).then_some(page)
    })
    .await;
    assert!(page.body.contains("gone: closed"), "{}", page.body);
    wakegate_testkit::eventually(WAIT, "the comment to be deleted", || async {
        f.comments(7).is_empty().then_some(())
    })
    .await;
    wakegate_testkit::eventually(WAIT, "the forge's view to stop", || async {
        let e = f.env_of("feature/login")?;
        let stopped = match kind {
            Kind::Gitlab => e.state == "stopped",
            Kind::Github => e.statuses.last().is_some_and(|(s, _)| s == "inactive"),
        };
        stopped.then_some(())
    })
    .await;
    wakegate_testkit::eventually(WAIT, "a closed merge request to leave no machine", || async {
        f.w.machine_dirs().is_empty().then_some(())
    })
    .await;

    // merge → 410 "merged in !9" with the link
    f.w.repo.branch("feature/pay", &[("content.html", "<h1>pay</h1>")]);
    let pay = f.head("feature/pay");
    f.fake.state.lock().unwrap().open(9, "feature/pay", &pay);
    f.change_event(9, f.action("open", "opened"), None, "d-open-9").await;
    let p9 = f.wait_preview("feature/pay", "running").await;
    f.comment_saying(9, "Ready").await;
    f.fake.state.lock().unwrap().changes.get_mut(&9).unwrap().state = "merged".into();
    f.change_event(9, f.action("merge", "closed"), None, "d-merge-9").await;
    f.wait_preview("feature/pay", "gone").await;
    let page = wakegate_testkit::eventually(WAIT, "the edge to say gone", || async {
        let page = f.w.visit(&p9, "/").await;
        (page.status == 410).then_some(page)
    })
    .await;
    assert!(page.body.contains(&format!("merged in {}", reference(9))), "{}", page.body);
    let link = match kind {
        Kind::Gitlab => format!("http://{}/acme/shop/-/merge_requests/9", f.fake.addr),
        Kind::Github => "https://github.com/acme/shop/pull/9".to_string(),
    };
    assert!(page.body.contains(&format!("href=\"{link}\"")), "{}", page.body);
    wakegate_testkit::eventually(WAIT, "the merged one's comment to go", || async {
        f.comments(9).is_empty().then_some(())
    })
    .await;
    // nothing can rebuild a merged preview
    let (s, v) = f.w.op("POST", &format!("/v1/previews/{}/rebuild", p9["id"].as_str().unwrap()), None).await;
    assert_eq!(s, 410, "{v}");
    assert_eq!(v["gone"]["why"], "merged", "{v}");
    f.w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitlab_merge_requests_open_push_close_merge_and_draft() {
    the_lifecycle(Kind::Gitlab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_pull_requests_open_push_close_merge_and_draft() {
    the_lifecycle(Kind::Github).await;
}

async fn deliveries_at_once(kind: Kind) {
    let f = Forged::start(kind, &[], false).await;
    f.w.repo.branch("feature/x", &[("content.html", "<h1>x</h1>")]);
    let head = f.head("feature/x");
    f.fake.state.lock().unwrap().open(3, "feature/x", &head);
    let open = f.action("open", "opened");

    // forged: 401 and nothing happens
    let (event, body) = f.fake.change_hook(3, open, None);
    let raw = body.to_string();
    let forged: Vec<(&str, String)> = match kind {
        Kind::Gitlab => vec![
            ("x-gitlab-event", event.clone()),
            ("x-gitlab-token", "guess".into()),
            ("idempotency-key", "f-1".into()),
        ],
        Kind::Github => vec![
            ("x-github-event", event.clone()),
            ("x-github-delivery", "f-1".into()),
            ("x-hub-signature-256", wakegate_waker::forge::github::sign("guess", raw.as_bytes())),
        ],
    };
    let (s, v) = f.post(&forged, raw.clone()).await;
    assert_eq!(s, 401, "{v}");
    let (s, _) = f.post(&forged[..1], raw.clone()).await;
    assert_eq!(s, 401, "unsigned");
    // a body changed after signing is forged too
    let tampered = raw.replace("feature/x", "feature/y");
    let mut signed: Vec<(&str, String)> = forged.clone();
    if kind == Kind::Github {
        signed[2].1 = wakegate_waker::forge::github::sign(SECRET, raw.as_bytes());
        assert_eq!(f.post(&signed, tampered).await.0, 401);
    }
    assert!(f.w.dev.store.table_list(wakegate_waker::forge::hooks::INBOX).await.unwrap().is_empty());
    assert!(f.preview_of("feature/x").await.is_none(), "a forged delivery did nothing");

    // 20 deliveries of the same event at once (as a forge's retries race): one is
    // accepted, and there is one preview, one comment, one build
    let sends = (0..20).map(|_| f.change_event(3, open, None, "same-delivery"));
    let answers = join_all(sends).await;
    let accepted = answers.iter().filter(|(s, a)| *s == 202 && a["outcome"] == "accepted").count();
    let duplicates = answers.iter().filter(|(s, a)| *s == 200 && a["outcome"] == "duplicate").count();
    assert_eq!((accepted, duplicates), (1, 19), "{answers:?}");
    // and 20 distinct deliveries of it (a forge resending): still one of everything
    let ids: Vec<String> = (0..20).map(|i| format!("resent-{i}")).collect();
    let sends = ids.iter().map(|id| f.change_event(3, open, None, id));
    for (s, a) in join_all(sends).await {
        assert_eq!(s, 202, "{a}");
    }
    let p = f.wait_preview("feature/x", "running").await;
    f.drained().await;
    f.comment_saying(3, "Ready").await;
    assert_eq!(f.comments(3).len(), 1);
    let machine = f.w.machine_of(p["id"].as_str().unwrap()).await;
    assert_eq!(f.w.machine_dirs(), vec![machine.clone()], "one build");
    assert_eq!(f.w.app_starts(&machine), 1);
    let previews = f.w.op("GET", "/v1/previews", None).await.1;
    assert_eq!(previews.as_array().unwrap().iter().filter(|p| p["project"] == "shop").count(), 1);

    // a replay of an accepted delivery: no side effect (once the forge's view is settled)
    wakegate_testkit::eventually(WAIT, "the forge's view to say ready", || async {
        let e = f.env_of("feature/x")?;
        let ready = match kind {
            Kind::Gitlab => e.external_url.is_some(),
            Kind::Github => e.statuses.last().is_some_and(|(s, _)| s == "success"),
        };
        ready.then_some(())
    })
    .await;
    let posts_before = f.fake.state.lock().unwrap().calls("POST", "");
    let (s, a) = f.change_event(3, open, None, "same-delivery").await;
    assert_eq!((s, a["outcome"].as_str()), (200, Some("duplicate")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.fake.state.lock().unwrap().calls("POST", ""), posts_before, "nothing written to the forge");

    // a merge request from a fork builds the forge's ref for it in this repository
    f.w.repo.branch("fork-work", &[("content.html", "<h1>from a fork</h1>")]);
    let fork_head = f.head("fork-work");
    let fork_ref = match kind {
        Kind::Gitlab => "refs/merge-requests/4/head",
        Kind::Github => "refs/pull/4/head",
    };
    wakegate_testkit::git::git(&f.w.repo.bare, &["update-ref", fork_ref, &fork_head]);
    f.w.repo.delete_branch("fork-work");
    {
        let mut st = f.fake.state.lock().unwrap();
        st.open(4, "fork-work", &fork_head);
        st.changes.get_mut(&4).unwrap().fork = true;
        st.branches.remove("fork-work");
    }
    f.change_event(4, open, None, "fork-open").await;
    let fp = f.wait_preview(fork_ref, "running").await;
    assert!(f.w.visit(&fp, "/").await.body.contains("from a fork"));

    f.w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitlab_concurrent_replayed_and_forged_deliveries() {
    deliveries_at_once(Kind::Gitlab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_concurrent_replayed_and_forged_deliveries() {
    deliveries_at_once(Kind::Github).await;
}

async fn lost_deliveries(kind: Kind) {
    // the reconciler runs every second; pages of one item, and rate limits on the way
    let f = Forged::start(kind, &[("WAKEGATE_FORGE_RECONCILE_SECS", "1")], false).await;
    f.fake.state.lock().unwrap().page_cap = 1;
    for (n, branch) in [(11, "feature/a"), (12, "feature/b")] {
        f.w.repo.branch(branch, &[("content.html", &format!("<h1>{branch}</h1>"))]);
        let head = f.head(branch);
        f.fake.state.lock().unwrap().open(n, branch, &head);
    }
    f.fake.state.lock().unwrap().limit_next = 2;
    // no delivery at all (the endpoint was down): the reconciler finds both
    f.wait_preview("feature/a", "running").await;
    f.wait_preview("feature/b", "running").await;
    f.comment_saying(11, "Ready").await;
    f.comment_saying(12, "Ready").await;
    // someone deletes a comment: the next pass makes it again
    let id = f.fake.state.lock().unwrap().comments_on(11)[0].id;
    f.fake.state.lock().unwrap().comments.remove(&id);
    f.comment_saying(11, "Ready").await;
    // a push nobody heard of redeploys; a merge nobody heard of ends the preview
    let head = f.push("feature/a", &[("content.html", "<h1>a, pushed</h1>")]);
    f.fake.state.lock().unwrap().changes.get_mut(&11).unwrap().sha = head;
    f.fake.state.lock().unwrap().changes.get_mut(&12).unwrap().state = "merged".into();
    let a = f.preview_of("feature/a").await.unwrap();
    wakegate_testkit::eventually(WAIT, "the unheard push to serve", || async {
        f.w.visit(&a, "/").await.body.contains("a, pushed").then_some(())
    })
    .await;
    f.wait_preview("feature/b", "gone").await;
    wakegate_testkit::eventually(WAIT, "the merged one's comment to go", || async {
        f.comments(12).is_empty().then_some(())
    })
    .await;
    assert_eq!(f.comments(11).len(), 1);
    assert!(
        f.fake.state.lock().unwrap().log.iter().any(|c| c.status == 429 || c.status == 403),
        "rate limits were met"
    );
    f.w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitlab_reconciler_repairs_lost_deliveries() {
    lost_deliveries(Kind::Gitlab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_reconciler_repairs_lost_deliveries() {
    lost_deliveries(Kind::Github).await;
}
