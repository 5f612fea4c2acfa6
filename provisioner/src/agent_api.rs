//! The control-plane endpoint machines' agents call (see `hetzner/agent.py`): they pull
//! their work and report phases, readiness and failure here. Any provisioner replica
//! can answer: everything is read from and written to the store, and reports become
//! lifecycle events through the same compare-and-set driver as everything else.
//!
//! Every call names its machine (`X-Wakegate-Machine`) and proves it with the bearer
//! token made for that machine only (`wakegate_core::sign::machine_token`); a machine
//! can only report on the preview whose state holds it. An agent whose app exits while
//! running reports it (`/v1/agent/exited`): the preview is marked failed with the
//! reason, and its page offers a retry.
//!
//! Served on axum through [`wakegate_serve`] (connection caps, header-read and idle
//! timeouts); undeclared methods are 405.

use crate::cloud::Cloud;
use crate::hetzner::bake::{BakeOutcome, BakeWork, BAKES};
use crate::hetzner::{MachineRecord, PullOrder, PullOutcome, MACHINES, PULL_ORDERS};
use crate::now_ms;
use axum::extract::{Extension, State as Api};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};
use wakegate_core::lifecycle::{Event, Phase, State};
use wakegate_core::sign::{verify_machine_token, Key};
use wakegate_store::driver::apply;
use wakegate_store::SharedStore;

/// Longest body an agent may send.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest failure reason kept.
const MAX_REASON: usize = 4096;

pub struct AgentApi {
    pub store: SharedStore,
    pub cloud: Arc<dyn Cloud>,
    pub key: Key,
    /// What a waiting pool machine is told to wait before asking again, in seconds.
    pub retry_after: String,
    pub preview_url_template: String,
    /// The dumps' bucket, when S3 is configured: an agent restoring a database gets a
    /// presigned URL of its dump (never the bucket's credentials).
    pub dumps: Option<wakegate_db::s3::Bucket>,
    /// Whether builds use database images (`WAKEGATE_DB_IMAGES`).
    pub db_images: bool,
}

/// Longest body carrying a recipe: its sanitize SQL, each byte of which JSON may write
/// as six (`\u00e9`).
const MAX_RECIPE_BODY: usize = 6 * wakegate_db::image::MAX_SANITIZE + 16 * 1024;

/// A recipe an agent sends is branch input: its name goes into SQL the builder runs as
/// the superuser, and the project's image is baked with it.
fn check_recipe(r: &wakegate_db::Recipe, engine: wakegate_db::Engine) -> Result<(), String> {
    crate::manifest::check_db_name(&r.name)?;
    if r.engine != engine {
        return Err("the recipe's engine is not its dump's".into());
    }
    if r.sanitize.as_ref().is_some_and(|s| s.len() > wakegate_db::image::MAX_SANITIZE) {
        return Err("the recipe's sanitize SQL is longer than an image is baked with".into());
    }
    Ok(())
}

/// How long an agent's upload URL for a pulled database works: it asks just before.
const PULL_PUT_TTL: std::time::Duration = std::time::Duration::from_secs(900);
/// How long an agent's dump URL works: it asks just before downloading.
const DUMP_URL_TTL: std::time::Duration = std::time::Duration::from_secs(600);

type Resp = Response<Full<Bytes>>;

fn reply(status: u16, body: serde_json::Value) -> Resp {
    let body = if status == 204 { Bytes::new() } else { Bytes::from(body.to_string()) };
    Response::builder().status(status).header("content-type", "application/json").body(Full::new(body)).expect("valid")
}

fn error(status: u16, message: &str) -> Resp {
    reply(status, json!({ "error": message }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseReport {
    phase: Phase,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadyReport {
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailedReport {
    phase: Phase,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressReport {
    done: u64,
    total: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullReport {
    key: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitReport {
    reason: String,
}

/// A builder's report: the image baked (its data's size and the engine's version), or
/// why not.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BakedReport {
    image: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// What a build's agent asks before making its database: its recipe (`None` when it
/// has none an image could be baked with: a missing or too big sanitize file) and the
/// database image on its disk, if any.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DbAsk {
    #[serde(default)]
    recipe: Option<wakegate_db::Recipe>,
    #[serde(default)]
    image: Option<String>,
}

/// How a build's agent made its database.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DbMadeReport {
    #[serde(default)]
    recipe: Option<wakegate_db::Recipe>,
    #[serde(default)]
    dump: Option<String>,
    #[serde(default)]
    image: Option<String>,
    method: wakegate_db::CloneMethod,
    took_ms: u64,
}

/// The answer to an order's outcome: recorded (204), not this machine's to report
/// (409), or the store failed (503).
fn outcome_recorded<T, E: std::fmt::Display>(edited: Result<Option<T>, E>, unknown: &str) -> Resp {
    match edited {
        Ok(Some(_)) => reply(204, json!(null)),
        Ok(None) => error(409, unknown),
        Err(e) => error(503, &e.to_string()),
    }
}

/// The machine a call proved it is.
#[derive(Clone)]
struct Machine(String);

fn to_axum(r: Resp) -> axum::response::Response {
    r.map(axum::body::Body::new)
}

fn cut(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut at = MAX_REASON;
        while !reason.is_char_boundary(at) {
            at -= 1;
        }
        reason.truncate(at);
    }
    reason
}

/// Reads a bounded JSON body of `T`; 413 or 400 otherwise.
async fn body<T: serde::de::DeserializeOwned>(b: axum::body::Body) -> Result<T, Resp> {
    body_within(b, MAX_BODY).await
}

async fn body_within<T: serde::de::DeserializeOwned>(b: axum::body::Body, max: usize) -> Result<T, Resp> {
    let bytes = axum::body::to_bytes(b, max).await.map_err(|_| error(413, &format!("body larger than {max} bytes")))?;
    serde_json::from_slice(&bytes).map_err(|e| error(400, &format!("invalid body: {e}")))
}

fn header(h: &axum::http::HeaderMap, name: &str) -> String {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

async fn authenticate(
    Api(api): Api<Arc<AgentApi>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let machine = header(req.headers(), "x-wakegate-machine");
    let auth = header(req.headers(), "authorization");
    let proven = {
        let token = auth.strip_prefix("Bearer ").unwrap_or("");
        !machine.is_empty() && verify_machine_token(&api.key, &machine, token)
    };
    if !proven {
        return to_axum(error(401, "unknown machine or wrong token"));
    }
    req.extensions_mut().insert(Machine(machine));
    next.run(req).await
}

async fn work(Api(api): Api<Arc<AgentApi>>, Extension(Machine(m)): Extension<Machine>) -> axum::response::Response {
    to_axum(api.work(&m).await)
}

async fn dump(Api(api): Api<Arc<AgentApi>>, Extension(Machine(m)): Extension<Machine>) -> axum::response::Response {
    to_axum(api.dump(&m, DbAsk { recipe: None, image: None }).await)
}

async fn dump_for((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    to_axum(match body_within::<DbAsk>(b, MAX_RECIPE_BODY).await {
        Ok(ask) => api.dump(&m, ask).await,
        Err(e) => e,
    })
}

async fn db_made((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    to_axum(match body_within::<DbMadeReport>(b, MAX_RECIPE_BODY).await {
        Ok(r) => api.db_made(&m, r).await,
        Err(e) => e,
    })
}

async fn baked((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    to_axum(match body::<BakedReport>(b).await {
        Ok(r) => api.baked(&m, r).await,
        Err(e) => e,
    })
}

async fn pull_order(
    Api(api): Api<Arc<AgentApi>>,
    Extension(Machine(m)): Extension<Machine>,
) -> axum::response::Response {
    to_axum(api.pull_order(&m).await)
}

async fn pulled((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    to_axum(match body::<PullReport>(b).await {
        Ok(r) => api.pulled(&m, r).await,
        Err(e) => e,
    })
}

/// Reads a `T`, turns it into a [`Report`] (or a 400 with the message) and records it.
async fn record<T: serde::de::DeserializeOwned>(
    api: &AgentApi,
    machine: &str,
    b: axum::body::Body,
    to_report: impl FnOnce(T) -> Result<Report, &'static str>,
) -> axum::response::Response {
    to_axum(match body::<T>(b).await.map(to_report) {
        Ok(Ok(r)) => api.report(machine, r).await,
        Ok(Err(message)) => error(400, message),
        Err(e) => e,
    })
}

type Call = (Api<Arc<AgentApi>>, Extension<Machine>, axum::body::Body);

async fn phase((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    record(&api, &m, b, |r: PhaseReport| Ok(Report::Phase(r.phase))).await
}

async fn ready((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    record(&api, &m, b, |r: ReadyReport| match r.port {
        0 => Err("port must be 1–65535"),
        port => Ok(Report::Ready(port)),
    })
    .await
}

async fn failed((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    record(&api, &m, b, |r: FailedReport| Ok(Report::Failed(r.phase, cut(r.reason)))).await
}

async fn progress((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    to_axum(match body::<ProgressReport>(b).await {
        Ok(r) => api.progress(&m, r).await,
        Err(e) => e,
    })
}

#[derive(Deserialize)]
struct LogQuery {
    stream: String,
    #[serde(default)]
    offset: u64,
}

/// `GET`: how much of this machine's log file the store has; `POST` (raw bytes): what
/// the file holds from `offset`. Both answer `{"shipped": n}`, where to go on from.
async fn logs(
    axum::extract::Query(q): axum::extract::Query<LogQuery>,
    method: axum::http::Method,
    (Api(api), Extension(Machine(m)), b): Call,
) -> axum::response::Response {
    let Some(stream) = wakegate_store::logs::Stream::parse(&q.stream) else {
        return to_axum(error(400, "stream must be build or app"));
    };
    let bytes = match axum::body::to_bytes(b, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return to_axum(error(413, &format!("body larger than {MAX_BODY} bytes"))),
    };
    to_axum(api.ship_log(&m, stream, (method == axum::http::Method::POST).then_some((q.offset, &bytes[..]))).await)
}

async fn exited((Api(api), Extension(Machine(m)), b): Call) -> axum::response::Response {
    record(&api, &m, b, |r: ExitReport| Ok(Report::Exited(cut(r.reason)))).await
}

/// The agent endpoint's routes.
pub fn router(api: Arc<AgentApi>) -> axum::Router {
    use axum::routing::{get, post, MethodRouter};
    let auth =
        |m: MethodRouter<Arc<AgentApi>>| m.route_layer(axum::middleware::from_fn_with_state(api.clone(), authenticate));
    axum::Router::new()
        .route("/v1/agent/work", auth(get(work)))
        .route("/v1/agent/phase", auth(post(phase)))
        .route("/v1/agent/ready", auth(post(ready)))
        .route("/v1/agent/failed", auth(post(failed)))
        .route("/v1/agent/exited", auth(post(exited)))
        .route("/v1/agent/dump", auth(get(dump).post(dump_for)))
        .route("/v1/agent/db", auth(post(db_made)))
        .route("/v1/agent/baked", auth(post(baked)))
        .route("/v1/agent/progress", auth(post(progress)))
        .route("/v1/agent/pull", auth(get(pull_order).post(pulled)))
        .route("/v1/agent/logs", auth(get(logs).post(logs)))
        .fallback(|| async { to_axum(error(404, "no such agent call")) })
        .with_state(api.clone())
}

/// Serves agents on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, api: Arc<AgentApi>) {
    wakegate_serve::serve(listener, router(api), wakegate_serve::Limits::default()).await
}

impl AgentApi {
    /// The machine's record and the preview it works for, if it works for one now.
    async fn lookup(&self, machine: &str) -> Result<(MachineRecord, Option<wakegate_core::route::Preview>), Resp> {
        let raw = match self.store.table_get(MACHINES, machine).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return Err(error(410, "this machine is not wanted")),
            Err(e) => return Err(error(503, &e.to_string())),
        };
        let record: MachineRecord = serde_json::from_str(&raw).map_err(|e| error(500, &e.to_string()))?;
        let Some(preview) = record.preview.clone() else {
            return Ok((record, None));
        };
        match self.store.get_preview(&preview).await {
            Ok(p) => Ok((record, p.map(|p| p.value))),
            Err(e) => Err(error(503, &e.to_string())),
        }
    }

    async fn work(&self, machine: &str) -> Resp {
        // a builder's work is its bake
        match self.bake_order(machine).await {
            Ok(Some(w)) => return reply(200, json!({ "bake": w })),
            Ok(None) => {}
            Err(r) => return r,
        }
        let (record, preview) = match self.lookup(machine).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Some(preview) = preview else {
            return if record.pool.is_some() && record.preview.is_none() {
                self.wait()
            } else {
                error(410, "this machine is not wanted")
            };
        };
        let holds = preview.state.machines().iter().any(|m| m.as_str() == machine);
        if !holds {
            return error(410, "this machine is not wanted");
        }
        match &preview.state {
            // newer code was pushed: this machine is about to be replaced
            State::Building { restart: true, .. } => return error(410, "this machine is not wanted"),
            State::Building { .. } | State::Waking { .. } | State::Running { .. } => {}
            // going to sleep: the machine is about to stop
            _ => return self.wait(),
        }
        let project = match self.store.get_project(&preview.project_id).await {
            Ok(Some(p)) => p,
            Ok(None) => return error(410, "the project no longer exists"),
            Err(e) => return error(503, &e.to_string()),
        };
        // a private repository's token, for the agent's credential helper (never in the
        // URL); an unreadable one fails the build with the reason
        let git_auth = match crate::runner::git_auth(&project) {
            Ok(a) => a.map(|a| json!({ "origin": a.origin, "username": a.username, "token": a.token })),
            Err(reason) => return error(503, &reason),
        };
        reply(
            200,
            json!({
                "git_auth": git_auth,
                "preview": preview.id,
                "git_url": project.git_url,
                "git_ref": preview.git_ref,
                "preview_url": self.preview_url_template.replace("{label}", &preview.label),
                "preview_urls": wakegate_core::route::preview_urls(
                    &self.preview_url_template,
                    &preview.label,
                    &preview.custom_hosts,
                ),
            }),
        )
    }

    /// The preview `machine` builds, while it builds on it.
    async fn building(&self, machine: &str) -> Result<wakegate_core::route::Preview, Resp> {
        let (_, preview) = self.lookup(machine).await?;
        match preview {
            Some(p) if matches!(&p.state, State::Building { machine: Some(m), restart: false, .. } if m == machine) => {
                Ok(p)
            }
            _ => Err(error(409, "the preview is not being built on this machine")),
        }
    }

    /// Where the database of the preview `machine` builds comes from: 200 with
    /// `use_image` when the database image on the machine's disk is one the build may
    /// use (a ready image of the project's base dump, baked with the build's recipe), else
    /// with a presigned URL of the dump; 204 when there is no dump (the database starts
    /// empty); 409 with the reason the build fails with.
    async fn dump(&self, machine: &str, ask: DbAsk) -> Resp {
        use wakegate_core::route::Restore;
        let preview = match self.building(machine).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let dump = match crate::runner::dump_source(&self.store, self.dumps.as_ref(), &preview, DUMP_URL_TTL).await {
            Ok(Some(d)) => d,
            Ok(None) => return reply(204, json!(null)),
            Err(reason) => return error(409, &reason),
        };
        if let Some(r) = &ask.recipe {
            if let Err(why) = check_recipe(r, dump.engine) {
                return error(400, &why);
            }
        }
        let (offered, baking) = crate::images::offered(&self.store, &preview, self.db_images).await;
        let fits = match (&ask.image, &ask.recipe) {
            (Some(have), Some(recipe)) => {
                let digest = recipe.digest();
                offered.iter().any(|i| &i.id == have && i.recipe_digest == digest && i.dump_id == dump.id)
            }
            _ => false,
        };
        if fits {
            crate::runner::record_progress(&self.store, &preview.id, dump.size, dump.size, Some(Restore::Clone)).await;
            return reply(200, json!({ "use_image": ask.image, "id": dump.id, "engine": dump.engine }));
        }
        let how = if baking { Restore::ImportWhileBaking } else { Restore::Import };
        crate::runner::record_progress(&self.store, &preview.id, 0, dump.size, Some(how)).await;
        match serde_json::to_value(&dump) {
            Ok(order) => reply(200, order),
            Err(e) => error(500, &format!("the dump order could not be written: {e}")),
        }
    }

    /// Records how the build's database was made (and, from the base dump, the
    /// project's recipe: its image is baked with it).
    async fn db_made(&self, machine: &str, r: DbMadeReport) -> Resp {
        let preview = match self.building(machine).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        // only what this build was given: its own dump, an image it was offered
        let dump = match crate::runner::preview_dump(&self.store, &preview).await {
            Ok(d) => d,
            Err(e) => return error(503, &e),
        };
        if r.dump.as_deref() != dump.as_ref().map(|d| d.id.as_str()) {
            return error(400, "that is not the dump this build was given");
        }
        if let (Some(recipe), Some(d)) = (&r.recipe, &dump) {
            if let Err(why) = check_recipe(recipe, d.engine) {
                return error(400, &why);
            }
        }
        if let Some(image) = &r.image {
            let (offered, _) = crate::images::offered(&self.store, &preview, self.db_images).await;
            if !offered.iter().any(|i| &i.id == image) {
                return error(400, "that is not an image this build was offered");
            }
        }
        let made = crate::cloud::DbMade {
            recipe: r.recipe,
            dump_id: r.dump,
            image: r.image,
            method: r.method,
            took_ms: r.took_ms,
        };
        let on_base = preview.dump.is_none();
        crate::images::record_made(&self.store, &preview.id, &preview.project_id, &made, on_base).await;
        reply(204, json!(null))
    }

    /// The bake this machine is the builder of, marked asked for.
    async fn bake_order(&self, machine: &str) -> Result<Option<BakeWork>, Resp> {
        let w = match self.store.table_get(BAKES, machine).await {
            Ok(Some(raw)) => serde_json::from_str::<BakeWork>(&raw).map_err(|e| error(500, &e.to_string()))?,
            Ok(None) => return Ok(None),
            Err(e) => return Err(error(503, &e.to_string())),
        };
        if w.outcome.is_some() {
            // reported already: a restarted agent stays idle until the machine stops
            return Err(error(410, "this builder's bake is over"));
        }
        if !w.fetched {
            let image = w.image.clone();
            let marked = wakegate_store::edit_record(self.store.as_ref(), BAKES, machine, |o: BakeWork| {
                (o.image == image && !o.fetched).then_some(BakeWork { fetched: true, ..o })
            });
            if let Err(e) = marked.await {
                return Err(error(503, &e.to_string()));
            }
        }
        Ok(Some(w))
    }

    /// How the builder's bake went.
    async fn baked(&self, machine: &str, r: BakedReport) -> Resp {
        let outcome = match (r.size, r.version, r.reason) {
            (Some(size), Some(version), None) => BakeOutcome::Baked { size, version: cut(version) },
            (None, None, Some(reason)) => BakeOutcome::Failed { reason: cut(reason) },
            _ => return error(400, "give either size and version, or reason"),
        };
        let edited = wakegate_store::edit_record(self.store.as_ref(), BAKES, machine, |w: BakeWork| {
            (w.image == r.image && w.outcome.is_none()).then(|| BakeWork { outcome: Some(outcome.clone()), ..w })
        })
        .await;
        outcome_recorded(edited, "no such bake is asked of this machine")
    }

    /// Where this machine's log file is shipped to, after adding `chunk` (its offset and
    /// bytes) when there is one.
    async fn ship_log(&self, machine: &str, stream: wakegate_store::logs::Stream, chunk: Option<(u64, &[u8])>) -> Resp {
        let (_, preview) = match self.lookup(machine).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Some(preview) = preview.filter(|p| wakegate_store::logs::current_machine(&p.state) == Some(machine)) else {
            return error(409, "this machine is not the one its preview shows the logs of");
        };
        let preview = preview.id;
        let shipped = match chunk {
            Some((offset, data)) => {
                wakegate_store::logs::append(self.store.as_ref(), &preview, stream, machine, offset, data).await
            }
            None => wakegate_store::logs::shipped(self.store.as_ref(), &preview, stream, machine).await,
        };
        match shipped {
            Ok(n) => reply(200, json!({ "shipped": n })),
            Err(e) => error(503, &e.to_string()),
        }
    }

    /// How far the dump's download is, for the splash page.
    async fn progress(&self, machine: &str, r: ProgressReport) -> Resp {
        let preview = match self.building(machine).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        crate::runner::record_progress(&self.store, &preview.id, r.done.min(r.total), r.total, None).await;
        reply(204, json!(null))
    }

    fn wait(&self) -> Resp {
        Response::builder()
            .status(204)
            .header("retry-after", self.retry_after.as_str())
            .body(Full::new(Bytes::new()))
            .expect("valid")
    }

    async fn order(&self, machine: &str) -> Result<Option<PullOrder>, Resp> {
        match self.store.table_get(PULL_ORDERS, machine).await {
            Ok(Some(raw)) => serde_json::from_str(&raw).map(Some).map_err(|e| error(500, &e.to_string())),
            Ok(None) => Ok(None),
            Err(e) => Err(error(503, &e.to_string())),
        }
    }

    /// The database dump this running machine is asked for: 200 with where to PUT it
    /// (a presigned URL made now, good for [`PULL_PUT_TTL`]), or 204 (ask again after
    /// Retry-After). Only an order whose pull is still under way, for the preview this
    /// machine runs, is handed out: one a crash left behind is worth nothing.
    async fn pull_order(&self, machine: &str) -> Resp {
        let order = match self.order(machine).await {
            Ok(Some(o)) if o.outcome.is_none() => o,
            Ok(_) => return self.wait(),
            Err(r) => return r,
        };
        let (_, preview) = match self.lookup(machine).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Some(preview) = preview.filter(|p| matches!(&p.state, State::Running { machine: m, .. } if m == machine))
        else {
            return self.wait();
        };
        match wakegate_db::Pulls::new(self.store.clone()).get(&preview.id).await {
            Ok(Some(p)) if p.key == order.key && p.under_way() => {}
            Ok(_) => return self.wait(),
            Err(e) => return error(503, &e.to_string()),
        }
        let Some(bucket) = &self.dumps else { return error(503, "this control plane has no S3 settings") };
        let url = match bucket.presign_put(&order.key, PULL_PUT_TTL).await {
            Ok(u) => u,
            Err(e) => return error(502, &e),
        };
        if !order.fetched {
            let fetched = wakegate_store::edit_record(self.store.as_ref(), PULL_ORDERS, machine, |o: PullOrder| {
                (o.key == order.key && !o.fetched).then_some(PullOrder { fetched: true, ..o })
            });
            if let Err(e) = fetched.await {
                return error(503, &e.to_string());
            }
        }
        reply(200, json!({ "key": order.key, "url": url }))
    }

    /// How the machine's dump went: uploaded with its size, or why not.
    async fn pulled(&self, machine: &str, r: PullReport) -> Resp {
        let outcome = match (r.size, r.reason) {
            (Some(size), None) => PullOutcome::Uploaded { size },
            (None, Some(reason)) => PullOutcome::Failed { reason: cut(reason) },
            _ => return error(400, "give either size or reason"),
        };
        let edited = wakegate_store::edit_record(self.store.as_ref(), PULL_ORDERS, machine, |o: PullOrder| {
            (o.key == r.key && o.outcome.is_none()).then(|| PullOrder { outcome: Some(outcome.clone()), ..o })
        })
        .await;
        outcome_recorded(edited, "no such dump is asked of this machine")
    }

    async fn report(&self, machine: &str, report: Report) -> Resp {
        let (record, preview) = match self.lookup(machine).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Some(preview) = preview else {
            return error(410, "this machine works for no preview");
        };
        let mine = match (&preview.state, &report) {
            (State::Running { machine: m, .. }, Report::Exited(_)) => m == machine,
            (State::Building { machine: Some(m), .. } | State::Waking { machine: m }, _) => m == machine,
            (State::Running { machine: m, .. }, _) => {
                // a restarted agent reporting again: nothing changes
                return if m == machine { reply(204, json!(null)) } else { error(410, "this machine is not wanted") };
            }
            _ => false,
        };
        if !mine {
            return error(409, "the preview is not waiting on this machine");
        }
        let event = match report {
            Report::Phase(phase) => {
                if !matches!(preview.state, State::Building { .. }) {
                    return reply(204, json!(null));
                }
                Event::PhaseReached { phase }
            }
            Report::Ready(port) => {
                let Some(host) = record.origin_host() else {
                    return error(503, "the machine's address is not known yet");
                };
                Event::Ready { machine: machine.to_string(), origin: format!("http://{host}:{port}") }
            }
            Report::Failed(phase, reason) => Event::BuildFailed {
                reason: format!("{}: {reason}", phase.label()),
                machine: Some(machine.to_string()),
            },
            Report::Exited(reason) => Event::MachineLost { machine: machine.to_string(), reason },
        };
        match apply(self.store.as_ref(), &preview.id, &event, now_ms()).await {
            Ok(applied) => {
                if let Event::Ready { origin, .. } = &event {
                    info!(%machine, preview = %preview.id, %origin, "machine reported ready");
                }
                for m in applied.delete {
                    let cloud = self.cloud.clone();
                    tokio::spawn(async move {
                        if let Err(e) = cloud.delete(&m).await {
                            warn!(machine = %m, error = %e, "delete failed; the reaper will retry");
                        }
                    });
                }
                reply(204, json!(null))
            }
            Err(e) => error(409, &e.to_string()),
        }
    }
}

enum Report {
    Phase(Phase),
    Ready(u16),
    Failed(Phase, String),
    /// The app exited while the preview ran.
    Exited(String),
}
