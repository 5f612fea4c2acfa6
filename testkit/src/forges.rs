//! Stateful fakes of the GitLab (REST v4) and GitHub REST endpoints Wakegate uses,
//! following the published APIs:
//!
//! * GitLab: `/projects/:id/merge_requests[/:iid]`, `…/notes[/:id]`,
//!   `/repository/branches/:branch`, `/environments` (list by `name`, create, update,
//!   stop); the id is the numeric id or the escaped path; a token in
//!   `Authorization: Bearer` or `PRIVATE-TOKEN`; `{"message": …}` errors (401, 404,
//!   400); offset pagination with `Link`, `x-next-page`, `x-page`, `x-total`; 429 with
//!   `RateLimit-*` and `Retry-After`.
//! * GitHub: `/repos/:o/:r/pulls[/:n]`, `/issues/:n/comments`,
//!   `/issues/comments/:id`, `/branches/:b`, `/deployments` and their `statuses`;
//!   `Bearer` token (401 `Bad credentials`), `User-Agent` required (403), 404 `Not
//!   Found`, 422 on a missing field; `Link` pagination; 403 with
//!   `x-ratelimit-remaining: 0` and `x-ratelimit-reset`, or 429 with `retry-after`.
//!
//! Each fake also writes the webhook payloads its forge sends, shaped as the published
//! examples (GitLab's Merge Request and Push Hooks, GitHub's `pull_request` and `push`),
//! so tests deliver what a forge would. A test can make the next requests rate-limited,
//! cap page sizes to force pagination, and read the log of calls.

use crate::fake_api::{percent_decode, ApiRequest, Reply};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Which forge a fake plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gitlab,
    Github,
}

/// A merge request / pull request.
#[derive(Clone, Debug)]
pub struct FakeChange {
    pub number: u64,
    pub title: String,
    /// `open`, `closed` or `merged`.
    pub state: String,
    pub draft: bool,
    pub source_branch: String,
    pub target_branch: String,
    pub sha: String,
    pub fork: bool,
    /// Files changed.
    pub changes: u64,
}

#[derive(Clone, Debug)]
pub struct FakeComment {
    pub id: u64,
    pub number: u64,
    pub body: String,
}

/// A GitLab environment, or a GitHub deployment with its statuses.
#[derive(Clone, Debug)]
pub struct FakeEnv {
    pub id: u64,
    pub name: String,
    pub external_url: Option<String>,
    /// GitLab: `available` / `stopped`.
    pub state: String,
    /// GitHub: the deployment's ref.
    pub git_ref: String,
    /// GitHub: `(state, environment_url)` in order.
    pub statuses: Vec<(String, Option<String>)>,
}

#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub status: u16,
}

pub struct ForgeState {
    pub kind: Kind,
    pub token: String,
    /// GitLab: `group/project`; GitHub: `owner/repo`.
    pub repo: String,
    pub project_id: u64,
    pub web: String,
    pub changes: BTreeMap<u64, FakeChange>,
    pub comments: BTreeMap<u64, FakeComment>,
    pub branches: BTreeSet<String>,
    pub envs: BTreeMap<u64, FakeEnv>,
    /// The next this many requests are rate-limited.
    pub limit_next: u32,
    /// Largest page served (the APIs allow 100).
    pub page_cap: usize,
    pub log: Vec<Call>,
    next_id: u64,
}

impl ForgeState {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Opens a merge request from `branch` (which is created) at `sha`.
    pub fn open(&mut self, number: u64, branch: &str, sha: &str) -> FakeChange {
        self.branches.insert(branch.to_string());
        let c = FakeChange {
            number,
            title: format!("Change {number}"),
            state: "open".into(),
            draft: false,
            source_branch: branch.to_string(),
            target_branch: "main".into(),
            sha: sha.to_string(),
            fork: false,
            changes: 1,
        };
        self.changes.insert(number, c.clone());
        c
    }

    pub fn comments_on(&self, number: u64) -> Vec<FakeComment> {
        self.comments.values().filter(|c| c.number == number).cloned().collect()
    }

    pub fn calls(&self, method: &str, path_contains: &str) -> usize {
        self.log.iter().filter(|c| c.method == method && c.path.contains(path_contains)).count()
    }
}

/// A fake forge on 127.0.0.1.
pub struct FakeForge {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ForgeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeForge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeForge {
    pub async fn start(kind: Kind) -> FakeForge {
        let (repo, token) = match kind {
            Kind::Gitlab => ("acme/shop", "glpat-fake-token-0123456789"),
            Kind::Github => ("acme/shop", "ghp_fakeToken0123456789"),
        };
        let state = Arc::new(Mutex::new(ForgeState {
            kind,
            token: token.into(),
            repo: repo.into(),
            project_id: 4242,
            web: String::new(),
            changes: BTreeMap::new(),
            comments: BTreeMap::new(),
            branches: BTreeSet::from(["main".to_string()]),
            envs: BTreeMap::new(),
            limit_next: 0,
            page_cap: 100,
            log: Vec::new(),
            next_id: 1000,
        }));
        let s = state.clone();
        let (addr, task) = crate::fake_api::serve(move |req| {
            let s = s.clone();
            async move {
                let mut st = s.lock().unwrap();
                let (method, path) = (req.method.clone(), req.path.clone());
                let reply = match st.kind {
                    Kind::Gitlab => gitlab(&mut st, &req),
                    Kind::Github => github(&mut st, &req),
                };
                st.log.push(Call { method, path, status: reply.status });
                reply
            }
        })
        .await;
        state.lock().unwrap().web = match kind {
            Kind::Gitlab => format!("http://{addr}/acme/shop"),
            Kind::Github => "https://github.com/acme/shop".into(),
        };
        FakeForge { addr, state, task }
    }

    /// The API root a project configures.
    pub fn api_url(&self) -> String {
        match self.state.lock().unwrap().kind {
            Kind::Gitlab => format!("http://{}/api/v4", self.addr),
            Kind::Github => format!("http://{}", self.addr),
        }
    }

    pub fn token(&self) -> String {
        self.state.lock().unwrap().token.clone()
    }

    pub fn repo(&self) -> String {
        self.state.lock().unwrap().repo.clone()
    }

    /// The webhook payload the forge sends for `action` on merge request `number`
    /// (GitLab: `open`, `reopen`, `update`, `close`, `merge`, `approved`; GitHub:
    /// `opened`, `synchronize`, `closed`, `ready_for_review`, `edited`, …), and the
    /// event header's value. `oldrev` is the head before a push (GitLab `update`).
    pub fn change_hook(&self, number: u64, action: &str, oldrev: Option<&str>) -> (String, Value) {
        let st = self.state.lock().unwrap();
        let c = st.changes.get(&number).cloned().expect("a change the fake knows");
        match st.kind {
            Kind::Gitlab => {
                let mut attrs = gitlab_mr(&st, &c);
                attrs["action"] = json!(action);
                attrs["url"] = attrs["web_url"].clone();
                attrs["last_commit"] = json!({ "id": c.sha, "message": "fixed readme" });
                if let Some(old) = oldrev {
                    attrs["oldrev"] = json!(old);
                }
                let changes = match action {
                    "update" if c.draft => json!({ "draft": { "previous": false, "current": true } }),
                    "update" if oldrev.is_none() => json!({ "title": { "previous": "Old", "current": c.title } }),
                    _ => json!({}),
                };
                let body = json!({
                    "object_kind": "merge_request",
                    "event_type": "merge_request",
                    "user": { "id": 1, "name": "Administrator", "username": "root" },
                    "project": {
                        "id": st.project_id,
                        "path_with_namespace": st.repo,
                        "web_url": st.web,
                        "git_http_url": format!("{}.git", st.web),
                    },
                    "object_attributes": attrs,
                    "changes": changes,
                    "labels": [],
                });
                ("Merge Request Hook".into(), body)
            }
            Kind::Github => {
                let pr = github_pr(&st, &c);
                let mut body = json!({
                    "action": action,
                    "number": c.number,
                    "pull_request": pr,
                    "repository": { "id": st.project_id, "full_name": st.repo },
                    "sender": { "login": "octocat" },
                });
                if action == "synchronize" {
                    body["before"] = json!(oldrev.unwrap_or(""));
                    body["after"] = json!(c.sha);
                }
                ("pull_request".into(), body)
            }
        }
    }

    /// The push payload for `branch` moving from `before` to `after`.
    pub fn push_hook(&self, branch: &str, before: &str, after: &str) -> (String, Value) {
        let st = self.state.lock().unwrap();
        match st.kind {
            Kind::Gitlab => (
                "Push Hook".into(),
                json!({
                    "object_kind": "push", "event_name": "push",
                    "before": before, "after": after, "ref": format!("refs/heads/{branch}"),
                    "checkout_sha": after, "project_id": st.project_id,
                    "project": { "id": st.project_id, "path_with_namespace": st.repo },
                    "commits": [], "total_commits_count": 1,
                }),
            ),
            Kind::Github => (
                "push".into(),
                json!({
                    "ref": format!("refs/heads/{branch}"), "before": before, "after": after,
                    "created": false, "deleted": after.bytes().all(|b| b == b'0'), "forced": false,
                    "repository": { "id": st.project_id, "full_name": st.repo },
                    "commits": [], "head_commit": null,
                }),
            ),
        }
    }
}

fn reply(status: u16, body: Value) -> Reply {
    Reply { status, body, headers: Vec::new(), hang: false }
}

fn not_found(kind: Kind) -> Reply {
    match kind {
        Kind::Gitlab => reply(404, json!({ "message": "404 Not Found" })),
        Kind::Github => {
            reply(404, json!({ "message": "Not Found", "documentation_url": "https://docs.github.com/rest" }))
        }
    }
}

/// A page of `items` as both APIs serve it, with `Link` (and GitLab's `x-*`) headers.
fn page(st: &ForgeState, req: &ApiRequest, items: Vec<Value>, default_per_page: usize) -> Reply {
    let per_page = req.param("per_page").and_then(|p| p.parse().ok()).unwrap_or(default_per_page).clamp(1, 100);
    let per_page = per_page.min(st.page_cap);
    let page_no: usize = req.param("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    let total = items.len();
    let pages = total.div_ceil(per_page).max(1);
    let slice: Vec<Value> = items.into_iter().skip((page_no - 1) * per_page).take(per_page).collect();
    let mut r = reply(200, Value::Array(slice));
    let host = req.header("host").unwrap_or("127.0.0.1");
    let link = |n: usize| {
        let q: Vec<String> = req
            .query
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("page="))
            .map(str::to_string)
            .chain([format!("page={n}")])
            .collect();
        format!("<http://{host}{}?{}>", req.path, q.join("&"))
    };
    let mut links = Vec::new();
    if page_no < pages {
        links.push(format!("{}; rel=\"next\"", link(page_no + 1)));
    }
    links.push(format!("{}; rel=\"first\"", link(1)));
    links.push(format!("{}; rel=\"last\"", link(pages)));
    r.headers.push(("link", links.join(", ")));
    if st.kind == Kind::Gitlab {
        let next = if page_no < pages { (page_no + 1).to_string() } else { String::new() };
        r.headers.extend([
            ("x-page", page_no.to_string()),
            ("x-per-page", per_page.to_string()),
            ("x-next-page", next),
            ("x-total", total.to_string()),
            ("x-total-pages", pages.to_string()),
        ]);
    }
    r
}

fn body_of(req: &ApiRequest) -> Value {
    serde_json::from_slice(&req.body).unwrap_or(Value::Null)
}

fn gitlab_mr(st: &ForgeState, c: &FakeChange) -> Value {
    let state = match c.state.as_str() {
        "open" => "opened",
        s => s,
    };
    json!({
        "id": 90_000 + c.number, "iid": c.number, "project_id": st.project_id, "title": c.title,
        "state": state, "draft": c.draft, "work_in_progress": c.draft,
        "source_branch": c.source_branch, "target_branch": c.target_branch,
        "source_project_id": if c.fork { st.project_id + 1 } else { st.project_id },
        "target_project_id": st.project_id,
        "sha": c.sha, "merge_commit_sha": if c.state == "merged" { json!("f00d") } else { Value::Null },
        "web_url": format!("{}/-/merge_requests/{}", st.web, c.number),
        "changes_count": c.changes.to_string(),
        "detailed_merge_status": "mergeable",
    })
}

fn gitlab(st: &mut ForgeState, req: &ApiRequest) -> Reply {
    if st.limit_next > 0 {
        st.limit_next -= 1;
        let mut r = reply(429, json!("Retry later"));
        let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
        r.headers.extend([
            ("ratelimit-limit", "600".to_string()),
            ("ratelimit-name", "throttle_authenticated_api".to_string()),
            ("ratelimit-observed", "601".to_string()),
            ("ratelimit-remaining", "0".to_string()),
            ("ratelimit-reset", reset.to_string()),
            ("retry-after", "1".to_string()),
        ]);
        return r;
    }
    let token = req
        .header("private-token")
        .map(str::to_string)
        .or_else(|| req.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).map(str::to_string));
    if token.as_deref() != Some(st.token.as_str()) {
        return reply(401, json!({ "message": "401 Unauthorized" }));
    }
    let Some(rest) = req.path.strip_prefix("/api/v4/projects/") else { return not_found(st.kind) };
    let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let id = percent_decode(id);
    if id != st.repo && id != st.project_id.to_string() {
        return reply(404, json!({ "message": "404 Project Not Found" }));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["merge_requests"]) => {
            let want = req.param("state").unwrap_or_else(|| "all".into());
            let items = st
                .changes
                .values()
                .filter(|c| want == "all" || gitlab_mr(st, c)["state"] == want.as_str())
                .map(|c| gitlab_mr(st, c))
                .collect();
            page(st, req, items, 20)
        }
        ("GET", ["merge_requests", iid]) => match iid.parse().ok().and_then(|n: u64| st.changes.get(&n)) {
            Some(c) => reply(200, gitlab_mr(st, c)),
            None => not_found(st.kind),
        },
        ("GET", ["merge_requests", iid, "notes"]) => {
            let n: u64 = iid.parse().unwrap_or(0);
            if !st.changes.contains_key(&n) {
                return not_found(st.kind);
            }
            let items = st
                .comments
                .values()
                .filter(|c| c.number == n)
                .map(|c| json!({ "id": c.id, "body": c.body, "system": false, "noteable_type": "MergeRequest", "noteable_iid": n }))
                .collect();
            page(st, req, items, 20)
        }
        ("POST", ["merge_requests", iid, "notes"]) => {
            let n: u64 = iid.parse().unwrap_or(0);
            if !st.changes.contains_key(&n) {
                return not_found(st.kind);
            }
            let Some(body) = body_of(req).get("body").and_then(Value::as_str).map(str::to_string) else {
                return reply(400, json!({ "message": "400 Bad request - body is missing" }));
            };
            let id = st.id();
            st.comments.insert(id, FakeComment { id, number: n, body: body.clone() });
            reply(201, json!({ "id": id, "body": body, "noteable_iid": n }))
        }
        ("PUT", ["merge_requests", iid, "notes", nid]) => {
            let n: u64 = iid.parse().unwrap_or(0);
            let body = body_of(req).get("body").and_then(Value::as_str).map(str::to_string);
            match (nid.parse().ok().and_then(|id: u64| st.comments.get_mut(&id)), body) {
                (Some(c), Some(body)) if c.number == n => {
                    c.body = body;
                    reply(200, json!({ "id": c.id, "body": c.body }))
                }
                (Some(_), None) => reply(400, json!({ "message": "400 Bad request - body is missing" })),
                _ => reply(404, json!({ "message": "404 Note Not Found" })),
            }
        }
        ("DELETE", ["merge_requests", _, "notes", nid]) => {
            match nid.parse().ok().and_then(|id: u64| st.comments.remove(&id)) {
                Some(_) => reply(204, Value::Null),
                None => reply(404, json!({ "message": "404 Note Not Found" })),
            }
        }
        ("GET", ["repository", "branches", b]) => {
            let b = percent_decode(b);
            if st.branches.contains(&b) {
                reply(200, json!({ "name": b, "merged": false, "protected": false }))
            } else {
                reply(404, json!({ "message": "404 Branch Not Found" }))
            }
        }
        ("GET", ["environments"]) => {
            let name = req.param("name");
            let items =
                st.envs.values().filter(|e| name.as_ref().is_none_or(|n| &e.name == n)).map(gitlab_env).collect();
            page(st, req, items, 20)
        }
        ("POST", ["environments"]) => {
            let b = body_of(req);
            let Some(name) = b.get("name").and_then(Value::as_str).map(str::to_string) else {
                return reply(400, json!({ "message": "400 Bad request - name is missing" }));
            };
            if st.envs.values().any(|e| e.name == name) {
                return reply(400, json!({ "message": { "name": ["has already been taken"] } }));
            }
            let id = st.id();
            let env = FakeEnv {
                id,
                name,
                external_url: b.get("external_url").and_then(Value::as_str).map(str::to_string),
                state: "available".into(),
                git_ref: String::new(),
                statuses: Vec::new(),
            };
            let out = gitlab_env(&env);
            st.envs.insert(id, env);
            reply(201, out)
        }
        ("PUT", ["environments", eid]) => match eid.parse().ok().and_then(|id: u64| st.envs.get_mut(&id)) {
            Some(e) => {
                if let Some(u) = body_of(req).get("external_url").and_then(Value::as_str) {
                    e.external_url = Some(u.to_string());
                }
                reply(200, gitlab_env(e))
            }
            None => not_found(st.kind),
        },
        ("POST", ["environments", eid, "stop"]) => match eid.parse().ok().and_then(|id: u64| st.envs.get_mut(&id)) {
            Some(e) => {
                e.state = "stopped".into();
                reply(200, gitlab_env(e))
            }
            None => not_found(st.kind),
        },
        _ => not_found(st.kind),
    }
}

fn gitlab_env(e: &FakeEnv) -> Value {
    json!({ "id": e.id, "name": e.name, "slug": e.name.replace('/', "-"), "external_url": e.external_url, "state": e.state, "tier": "development" })
}

fn github_pr(st: &ForgeState, c: &FakeChange) -> Value {
    let head_repo = if c.fork { "someone/shop".to_string() } else { st.repo.clone() };
    json!({
        "number": c.number, "title": c.title,
        "state": if c.state == "open" { "open" } else { "closed" },
        "draft": c.draft, "merged": c.state == "merged",
        "merged_at": if c.state == "merged" { json!("2026-11-25T10:00:00Z") } else { Value::Null },
        "html_url": format!("{}/pull/{}", st.web, c.number),
        "head": { "ref": c.source_branch, "sha": c.sha, "label": format!("acme:{}", c.source_branch),
                  "repo": { "id": 1, "full_name": head_repo, "fork": c.fork } },
        "base": { "ref": c.target_branch, "sha": "base", "repo": { "id": 1, "full_name": st.repo } },
        "additions": c.changes, "deletions": 0, "changed_files": c.changes,
    })
}

fn github(st: &mut ForgeState, req: &ApiRequest) -> Reply {
    let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
    if st.limit_next > 0 {
        st.limit_next -= 1;
        let mut r = reply(
            403,
            json!({ "message": "API rate limit exceeded for user ID 1.", "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting" }),
        );
        r.headers.extend([
            ("x-ratelimit-limit", "5000".to_string()),
            ("x-ratelimit-remaining", "0".to_string()),
            ("x-ratelimit-used", "5000".to_string()),
            ("x-ratelimit-reset", reset.to_string()),
            ("x-ratelimit-resource", "core".to_string()),
        ]);
        return r;
    }
    if req.header("user-agent").is_none_or(str::is_empty) {
        return reply(
            403,
            json!({ "message": "Request forbidden by administrative rules. Please make sure your request has a User-Agent header" }),
        );
    }
    if req.authorization.as_deref() != Some(format!("Bearer {}", st.token).as_str()) {
        return reply(
            401,
            json!({ "message": "Bad credentials", "documentation_url": "https://docs.github.com/rest" }),
        );
    }
    let Some(rest) = req.path.strip_prefix(&format!("/repos/{}/", st.repo)) else { return not_found(st.kind) };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut r = match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["pulls"]) => {
            let want = req.param("state").unwrap_or_else(|| "open".into());
            let items = st
                .changes
                .values()
                .filter(|c| want == "all" || github_pr(st, c)["state"] == want.as_str())
                .map(|c| {
                    // the list leaves out the counts a single pull request has
                    let mut pr = github_pr(st, c);
                    for k in ["additions", "deletions", "changed_files", "merged"] {
                        pr.as_object_mut().unwrap().remove(k);
                    }
                    pr
                })
                .collect();
            page(st, req, items, 30)
        }
        ("GET", ["pulls", n]) => match n.parse().ok().and_then(|n: u64| st.changes.get(&n)) {
            Some(c) => reply(200, github_pr(st, c)),
            None => not_found(st.kind),
        },
        ("GET", ["issues", n, "comments"]) => {
            let n: u64 = n.parse().unwrap_or(0);
            let items =
                st.comments.values().filter(|c| c.number == n).map(|c| json!({ "id": c.id, "body": c.body })).collect();
            page(st, req, items, 30)
        }
        ("POST", ["issues", n, "comments"]) => {
            let n: u64 = n.parse().unwrap_or(0);
            if !st.changes.contains_key(&n) {
                return not_found(st.kind);
            }
            let Some(body) = body_of(req).get("body").and_then(Value::as_str).map(str::to_string) else {
                return reply(422, json!({ "message": "Invalid request.\n\n\"body\" wasn't supplied." }));
            };
            let id = st.id();
            st.comments.insert(id, FakeComment { id, number: n, body: body.clone() });
            reply(201, json!({ "id": id, "body": body }))
        }
        ("PATCH", ["issues", "comments", id]) => {
            let body = body_of(req).get("body").and_then(Value::as_str).map(str::to_string);
            match (id.parse().ok().and_then(|id: u64| st.comments.get_mut(&id)), body) {
                (Some(c), Some(body)) => {
                    c.body = body;
                    reply(200, json!({ "id": c.id, "body": c.body }))
                }
                (Some(_), None) => reply(422, json!({ "message": "Invalid request.\n\n\"body\" wasn't supplied." })),
                (None, _) => not_found(st.kind),
            }
        }
        ("DELETE", ["issues", "comments", id]) => match id.parse().ok().and_then(|id: u64| st.comments.remove(&id)) {
            Some(_) => reply(204, Value::Null),
            None => not_found(st.kind),
        },
        ("GET", ["branches", b]) => {
            let b = percent_decode(b);
            if st.branches.contains(&b) {
                reply(200, json!({ "name": b, "protected": false }))
            } else {
                reply(404, json!({ "message": "Branch not found" }))
            }
        }
        ("POST", ["deployments"]) => {
            let b = body_of(req);
            let (Some(git_ref), Some(env)) =
                (b.get("ref").and_then(Value::as_str), b.get("environment").and_then(Value::as_str))
            else {
                return reply(422, json!({ "message": "Invalid request.\n\n\"ref\" wasn't supplied." }));
            };
            let id = st.id();
            st.envs.insert(
                id,
                FakeEnv {
                    id,
                    name: env.to_string(),
                    external_url: None,
                    state: "created".into(),
                    git_ref: git_ref.to_string(),
                    statuses: Vec::new(),
                },
            );
            reply(
                201,
                json!({ "id": id, "ref": git_ref, "environment": env, "transient_environment": b["transient_environment"] }),
            )
        }
        ("POST", ["deployments", id, "statuses"]) => {
            let b = body_of(req);
            const STATES: [&str; 7] = ["error", "failure", "inactive", "in_progress", "queued", "pending", "success"];
            let Some(state) = b.get("state").and_then(Value::as_str).filter(|s| STATES.contains(s)).map(str::to_string)
            else {
                return reply(422, json!({ "message": "Validation Failed" }));
            };
            match id.parse().ok().and_then(|id: u64| st.envs.get_mut(&id)) {
                Some(d) => {
                    let url = b.get("environment_url").and_then(Value::as_str).map(str::to_string);
                    d.statuses.push((state.clone(), url.clone()));
                    d.state = state.clone();
                    if url.is_some() {
                        d.external_url = url.clone();
                    }
                    reply(201, json!({ "id": 1, "state": state, "environment_url": url }))
                }
                None => not_found(st.kind),
            }
        }
        _ => not_found(st.kind),
    };
    r.headers.extend([
        ("x-ratelimit-limit", "5000".to_string()),
        ("x-ratelimit-remaining", "4999".to_string()),
        ("x-ratelimit-reset", reset.to_string()),
    ]);
    r
}
