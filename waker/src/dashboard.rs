//! The operator dashboard: server-rendered pages under `/dashboard`, behind the operator
//! token.
//!
//! * [`session`] — login makes a session (a cookie naming a record in the store, with
//!   its CSRF token and the next page's message);
//! * [`page`] — what is shown, as data, and the askama templates
//!   (`waker/templates/dashboard/`);
//! * here — the routes, and the one place a dashboard answer's status is chosen
//!   ([`Refusal`]).
//!
//! Without JavaScript everything is forms and reloads: each action is a POST with the
//! session's CSRF token, answered by 303 back to the page, which shows what happened.
//! With JavaScript (`waker/assets/dashboard.js`) the page fetches `/dashboard/live` every
//! few seconds and swaps in the rows that changed, and actions are posted in place
//! (`Accept: application/json`, answered with `{ok, message}`).
//!
//! Each action calls the operator API's handler of the same name, so the dashboard and
//! the API cannot disagree. The routes are not in the OpenAPI document: they answer
//! HTML to a browser, not JSON to a program.

mod page;
mod session;

use crate::error::ApiError;
use crate::operator;
use crate::waker::{now_ms, Waker};
use askama::Template;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{middleware, Extension, Form, Json, Router};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use page::{Action, DashboardPage, Flash, LiveTables, LoginPage, MessagePage};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Login attempts one client address may make per [`LOGIN_WINDOW`] (a burst of this many,
/// then one every window / attempts), counted in the store so every replica shares them.
pub const LOGIN_ATTEMPTS: u32 = 10;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Longest preview id taken from a path.
const MAX_ID: usize = 64;

const CSS: &str = include_str!("../assets/dashboard.css");
const JS: &str = include_str!("../assets/dashboard.js");

/// Every dashboard answer carries these: nothing else may script, style or frame the
/// page, and nothing of it is cached.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes; the session cookie is their authentication (not the bearer
/// middleware).
pub fn routes() -> Router<Arc<Waker>> {
    Router::new()
        .route("/dashboard", get(show))
        .route("/dashboard/live", get(live))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/previews/{id}/{action}", post(act))
        .route("/dashboard/assets/dashboard.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .route("/dashboard/assets/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .layer(middleware::map_response(protect))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn protect(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    r
}

/// Why a dashboard request was not done; the only place its status is chosen. Answered
/// as a page, or as `{ok: false, message}` to the page's script.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// No session, or it ended: the login form.
    #[error("{}", login_message(.ended))]
    LoginRequired { ended: bool },
    #[error("That is not the operator token.")]
    WrongToken,
    #[error("Too many login attempts from your address; wait a few minutes and try again.")]
    TooManyAttempts,
    #[error(
        "This form did not come from your dashboard session (or the session changed), so nothing was done. \
         Go back to the dashboard and try again."
    )]
    Csrf,
    #[error("There is no such page.")]
    NotFound,
    #[error("The waker cannot read its store right now; try again in a moment.")]
    Unavailable(#[source] ApiError),
}

fn login_message(ended: &bool) -> &'static str {
    if *ended {
        "Your session has ended; log in again. Nothing was done."
    } else {
        "Log in first."
    }
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::LoginRequired { .. } | Refusal::WrongToken => StatusCode::UNAUTHORIZED,
            Refusal::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Csrf => StatusCode::FORBIDDEN,
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn answer(self, json: bool) -> Response {
        let status = self.status();
        let message = self.to_string();
        if let Refusal::Unavailable(e) = &self {
            warn!(error = %e, "dashboard: store unavailable");
        }
        let mut r = if json {
            (status, Json(Answer { ok: false, message })).into_response()
        } else {
            match self {
                Refusal::LoginRequired { ended } => {
                    let notice = ended.then_some(message);
                    html(status, LoginPage { title: "Log in", error: None, notice }.render())
                }
                Refusal::WrongToken | Refusal::TooManyAttempts => {
                    html(status, LoginPage { title: "Log in", error: Some(message), notice: None }.render())
                }
                _ => html(status, MessagePage { title: "Not done", message: &message }.render()),
            }
        };
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        r
    }
}

impl From<wakegate_store::StoreError> for Refusal {
    fn from(e: wakegate_store::StoreError) -> Refusal {
        Refusal::Unavailable(e.into())
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Refusal {
        Refusal::Unavailable(e)
    }
}

/// What the page's script is told of an action.
#[derive(serde::Serialize)]
struct Answer {
    ok: bool,
    message: String,
}

fn html(status: StatusCode, rendered: askama::Result<String>) -> Response {
    match rendered {
        Ok(body) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => {
            warn!(error = %e, "dashboard: rendering failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
        }
    }
}

/// Whether the page's script asked (it wants JSON, not a page).
fn wants_json(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"))
}

/// Every preview and project, read now.
async fn tables(w: &Waker, csrf: &str) -> Result<page::Tables, ApiError> {
    let now = now_ms();
    let projects = w.store.list_projects().await?;
    let by_id: HashMap<&str, &wakegate_core::route::Project> = projects.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut views: Vec<_> = w
        .store
        .list_previews()
        .await?
        .iter()
        .filter_map(|p| by_id.get(p.value.project_id.as_str()).map(|project| w.view(p, project)))
        .collect();
    w.complete_views(&mut views).await;
    let weeks = wakegate_store::stats::weeks(w.store.as_ref(), now).await?;
    let costs = wakegate_store::stats::costs(w.store.as_ref()).await?;
    let with_db = wakegate_db::Images::new(w.store.clone()).uses().await?.into_iter().map(|(p, _)| p).collect();
    Ok(page::tables(views, &projects, &weeks, &costs, &with_db, csrf.to_string(), now))
}

#[derive(Debug, Default, Deserialize)]
struct ShowQuery {
    /// Set by the redirect after a login.
    #[serde(default)]
    session: Option<String>,
}

/// `GET /dashboard`: the dashboard, or the login form.
async fn show(State(w): State<Arc<Waker>>, headers: HeaderMap, Query(q): Query<ShowQuery>) -> Response {
    let now = now_ms();
    let live = match session::load(&w, &headers, now).await {
        Ok(live) => live,
        Err(e) => return Refusal::from(e).answer(false),
    };
    let Some(live) = live else {
        let notice = if session::cookie(&headers).is_some() {
            Some("Your session has ended; log in again.".to_string())
        } else if q.session.as_deref() == Some("new") {
            // the login worked but the cookie did not come back: a Secure cookie over
            // plain HTTP to a name that is not loopback
            Some(
                "If you just logged in: your browser did not keep the session cookie. The cookie is Secure, so \
                 open the dashboard over HTTPS (or on localhost)."
                    .to_string(),
            )
        } else {
            None
        };
        return html(StatusCode::OK, LoginPage { title: "Log in", error: None, notice }.render());
    };
    let flash = match session::take_flash(&w, &live).await {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "dashboard: taking the message failed");
            None
        }
    };
    match tables(&w, &live.session.csrf).await {
        Ok(t) => html(StatusCode::OK, DashboardPage { title: "Previews", t: &t, flash }.render()),
        Err(e) => Refusal::from(e).answer(false),
    }
}

/// `GET /dashboard/live`: the tables alone, for the page's script.
async fn live(State(w): State<Arc<Waker>>, headers: HeaderMap) -> Response {
    let run = async {
        let live = session::load(&w, &headers, now_ms()).await?.ok_or(Refusal::LoginRequired { ended: true })?;
        Ok::<_, Refusal>(tables(&w, &live.session.csrf).await?)
    };
    match run.await {
        Ok(t) => html(StatusCode::OK, LiveTables { t: &t }.render()),
        Err(r) => r.answer(true),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

/// `POST /dashboard/login`: the operator token in, a session cookie out.
async fn login(
    State(w): State<Arc<Waker>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Form(form): Form<LoginForm>,
) -> Response {
    let run = async {
        let now = now_ms();
        // every attempt counts, so the budget bounds guesses whatever they are; behind a
        // proxy all clients share the proxy's address (and its budget)
        let who = peer.map_or_else(|| "unknown".to_string(), |Extension(ConnectInfo(a))| a.ip().to_string());
        if !w.store.rate_limit(&format!("dashboard-login:ip:{who}"), LOGIN_ATTEMPTS, LOGIN_WINDOW, now).await? {
            warn!(client = %who, "dashboard: too many login attempts");
            return Err(Refusal::TooManyAttempts);
        }
        let expected = w.config.operator_token.as_bytes();
        if form.token.is_empty() || !bool::from(subtle::ConstantTimeEq::ct_eq(form.token.as_bytes(), expected)) {
            warn!(client = %who, "dashboard: wrong operator token");
            return Err(Refusal::WrongToken);
        }
        let (id, _) = session::create(&w, now).await?;
        info!(client = %who, "dashboard: logged in");
        Ok(id)
    };
    match run.await {
        Ok(id) => {
            let mut r = Redirect::to("/dashboard?session=new").into_response();
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(refusal) => refusal.answer(false),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// `POST /dashboard/logout`: ends the session (with its CSRF token, so no other site
/// can log an operator out).
async fn logout(State(w): State<Arc<Waker>>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    let run = async {
        let Some(live) = session::load(&w, &headers, now_ms()).await? else { return Ok(()) };
        if !session::csrf_ok(&live.session, form.csrf.as_deref()) {
            return Err(Refusal::Csrf);
        }
        session::end(&w, &live).await?;
        info!("dashboard: logged out");
        Ok(())
    };
    match run.await {
        Ok(()) => {
            let mut r = Redirect::to("/dashboard").into_response();
            if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(refusal) => refusal.answer(wants_json(&headers)),
    }
}

/// `POST /dashboard/previews/{id}/{action}`: pin, unpin, sleep, wake, erase, rebuild or
/// refresh-data.
async fn act(
    State(w): State<Arc<Waker>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let json = wants_json(&headers);
    let run = async {
        let action = Action::parse(&action).ok_or(Refusal::NotFound)?;
        let live = session::load(&w, &headers, now_ms()).await?.ok_or(Refusal::LoginRequired { ended: true })?;
        if !session::csrf_ok(&live.session, form.csrf.as_deref()) {
            return Err(Refusal::Csrf);
        }
        let id_ok = id.len() <= MAX_ID && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let outcome = if id_ok {
            perform(&w, &id, action).await
        } else {
            Err(("a preview".to_string(), ApiError::NotFound("there is no such preview".into())))
        };
        Ok((live, action, outcome, id_ok))
    };
    let (live, action, outcome, id_ok) = match run.await {
        Ok(done) => done,
        Err(refusal) => return refusal.answer(json),
    };
    let (status, flash) = match outcome {
        Ok((name, state)) => {
            info!(preview = %id, action = action.as_str(), "dashboard action");
            (StatusCode::OK, Flash { ok: true, text: action.done(&name, &state) })
        }
        Err((name, e)) => (e.status(), Flash { ok: false, text: action.failed(&name, &e.to_string()) }),
    };
    if json {
        return (status, Json(Answer { ok: flash.ok, message: flash.text })).into_response();
    }
    if let Err(e) = session::set_flash(&w, &live, flash).await {
        warn!(error = %e, "dashboard: keeping the message failed");
    }
    // back to the row acted on (POST, redirect, GET: a reload repeats nothing); only a
    // checked id goes into the header
    let to = if id_ok { format!("/dashboard#preview-{id}") } else { "/dashboard".to_string() };
    Redirect::to(&to).into_response()
}

/// Does `action` through the operator API's handler. Ok: the preview's name and state
/// after; Err: its name (or id) and why.
async fn perform(w: &Arc<Waker>, id: &str, action: Action) -> Result<(String, String), (String, ApiError)> {
    let name = match w.load(id).await {
        Ok((p, _)) => format!("{} {}", p.value.project, wakegate_core::host::short_ref(&p.value.git_ref)),
        Err(e) => return Err((format!("preview {id}"), e)),
    };
    let (s, p) = (State(w.clone()), Path(id.to_string()));
    let state = match action {
        Action::Pin => operator::pin(s, p).await.map(|Json(v)| v.state),
        Action::Unpin => operator::unpin(s, p).await.map(|Json(v)| v.state),
        Action::Sleep => operator::sleep(s, p).await.map(|(_, Json(v))| v.state),
        Action::Wake => operator::wake(s, p).await.map(|(_, Json(v))| v.state),
        Action::Erase => operator::erase(s, p).await.map(|(_, Json(v))| v.state),
        Action::Rebuild => operator::rebuild(s, p).await.map(|(_, Json(a))| a.state),
        Action::RefreshData => crate::images::refresh(s, p).await.map(|(_, Json(r))| r.state),
    };
    state.map(|s| (name.clone(), s)).map_err(|e| (name, e))
}
