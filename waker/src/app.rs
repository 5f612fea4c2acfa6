//! The router: routes, tower layers and the OpenAPI document generated from the
//! handlers (so the served document is the code).

use crate::error::{ApiError, ErrorBody};
use crate::model::{Accepted, Health, NewPreview, NewProject, PreviewView, SetTtl, MAX_BODY};
use crate::waker::Waker;
use crate::{auth, db, edge, operator, orgs};
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{middleware, Json, Router};
use http::StatusCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use wakegate_core::route::{ActivityBatch, HostRequest, Project, RouteRecord};

/// Requests handled at once; more are refused with 503 at once rather than queued.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Longest a request may take: above the longest status long-poll.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);

/// The OpenAPI document of the waker.
#[derive(OpenApi)]
#[openapi(
    info(title = "Wakegate waker", description = "The control API: signed calls from the edge, and operator calls."),
    paths(
        health, openapi,
        edge::route, edge::status, edge::wake, edge::rebuild, edge::activity,
        operator::list_projects, operator::create_project, operator::get_project, operator::create_preview,
        operator::list_previews, operator::show, operator::pin, operator::unpin, operator::set_ttl,
        operator::sleep, operator::wake, operator::erase, operator::rebuild, operator::logs,
        orgs::list, orgs::create, orgs::show, orgs::add_domain, orgs::verify, orgs::remove_domain,
        orgs::add_base, orgs::remove_base, operator::custom_hostnames, crate::forge::hooks::receive,
        db::start, db::list, db::show, db::parts, db::part_url, db::complete, db::use_dump, db::remove, db::pull, db::pull_status, db::pull_done,
        crate::images::list, crate::images::show, crate::images::refresh,
    ),
    components(schemas(
        ErrorBody, Accepted, Health, NewProject, NewPreview, SetTtl, PreviewView, Project, RouteRecord,
        HostRequest, ActivityBatch, orgs::OrgView, orgs::DomainView, orgs::BaseView, orgs::NewOrg,
        orgs::NewDomain, orgs::NewBase, orgs::Org, orgs::Domain, orgs::Base, orgs::DomainStatus, orgs::DnsRecord,
        wakegate_core::route::CustomHost, crate::model::CustomHostnames, crate::saas::Registration,
        crate::forge::hooks::HookAnswer, wakegate_core::route::ForgeConfig, wakegate_core::route::SecretRef,
        wakegate_core::route::ForgeKind, wakegate_core::route::Change, wakegate_core::route::GoneInfo,
        wakegate_core::lifecycle::GoneWhy, db::NewDump, db::DumpView, db::UploadStarted, db::PartUrl,
        db::PartView, db::Completion, db::SentPart, db::DumpList, db::PullView, crate::model::LogSlice,
        crate::images::ImageView, crate::images::ImageList, crate::images::RefreshView, crate::images::DatabaseView,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "edge", description = "Called by the edge, signed with the shared edge key."),
        (name = "operator", description = "Called by operators with the bearer token."),
        (name = "forge", description = "Called by GitLab and GitHub, verified with the project's webhook secret."),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "operator_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "edge_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                wakegate_core::sign::SIGNATURE_HEADER,
                "HMAC-SHA256 over method, path, body digest, time and nonce (see wakegate_core::sign)",
            ))),
        );
    }
}

/// The document as served, made once.
pub fn openapi_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().expect("the document serializes"))
}

/// Whether the waker answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { ok: true })
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "the OpenAPI document", body = Object, content_type = "application/json")))]
async fn openapi() -> impl IntoResponse {
    ([(http::header::CONTENT_TYPE, "application/json")], openapi_json())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// Answers made outside the handlers (405 from routing, 503 from the timeout) get the
/// same JSON error body as everything else.
async fn json_errors(r: Response) -> Response {
    let status = r.status();
    let is_json =
        r.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    // the dashboard's pages are HTML on purpose
    let is_html = r.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if status.as_u16() < 400 || is_json || is_html {
        return r;
    }
    let (mut parts, _) = r.into_parts();
    let message = status.canonical_reason().unwrap_or("error").to_ascii_lowercase();
    let body = Json(ErrorBody { error: message, field: None, gone: None }).into_response();
    parts.headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, body.into_body())
}

/// The API with its layers.
pub fn router(waker: Arc<Waker>) -> Router {
    // authentication wraps each method's handler, not the path: a method the path does
    // not declare is a 405 before anything else
    let edge = |m: MethodRouter<Arc<Waker>>| m.route_layer(middleware::from_fn_with_state(waker.clone(), auth::edge));
    let op = |m: MethodRouter<Arc<Waker>>| m.route_layer(middleware::from_fn_with_state(waker.clone(), auth::operator));
    let api = Router::new()
        .route("/v1/edge/route", edge(get(edge::route)))
        .route("/v1/edge/status", edge(get(edge::status)))
        .route("/v1/edge/wake", edge(post(edge::wake)))
        .route("/v1/edge/rebuild", edge(post(edge::rebuild)))
        .route("/v1/edge/activity", edge(post(edge::activity)))
        .route("/v1/orgs", op(get(orgs::list).post(orgs::create)))
        .route("/v1/orgs/{org}", op(get(orgs::show)))
        .route("/v1/orgs/{org}/domains", op(post(orgs::add_domain)))
        .route("/v1/orgs/{org}/domains/{domain}", op(delete(orgs::remove_domain)))
        .route("/v1/orgs/{org}/domains/{domain}/verify", op(post(orgs::verify)))
        .route("/v1/orgs/{org}/bases", op(post(orgs::add_base)))
        .route("/v1/orgs/{org}/bases/{base}", op(delete(orgs::remove_base)))
        .route("/v1/custom-hostnames", op(get(operator::custom_hostnames)))
        .route("/v1/projects", op(get(operator::list_projects).post(operator::create_project)))
        .route("/v1/projects/{name}", op(get(operator::get_project)))
        .route("/v1/projects/{name}/previews", op(post(operator::create_preview)))
        .route("/v1/projects/{name}/dumps", op(get(db::list).post(db::start)))
        .route("/v1/projects/{name}/dumps/{id}", op(get(db::show).delete(db::remove)))
        .route("/v1/projects/{name}/dumps/{id}/parts", op(get(db::parts)))
        .route("/v1/projects/{name}/dumps/{id}/parts/{number}", op(post(db::part_url)))
        .route("/v1/projects/{name}/dumps/{id}/complete", op(post(db::complete)))
        .route("/v1/projects/{name}/dumps/{id}/use", op(post(db::use_dump)))
        .route("/v1/previews/{id}/db/pull", op(get(db::pull_status).post(db::pull).delete(db::pull_done)))
        .route("/v1/previews/{id}/db", op(get(crate::images::show)))
        .route("/v1/previews/{id}/db/refresh", op(post(crate::images::refresh)))
        .route("/v1/db/images", op(get(crate::images::list)))
        .route("/v1/previews", op(get(operator::list_previews)))
        .route("/v1/previews/{id}", op(get(operator::show)))
        .route("/v1/previews/{id}/pin", op(post(operator::pin)))
        .route("/v1/previews/{id}/unpin", op(post(operator::unpin)))
        .route("/v1/previews/{id}/ttl", op(put(operator::set_ttl)))
        .route("/v1/previews/{id}/sleep", op(post(operator::sleep)))
        .route("/v1/previews/{id}/wake", op(post(operator::wake)))
        .route("/v1/previews/{id}/erase", op(post(operator::erase)))
        .route("/v1/previews/{id}/rebuild", op(post(operator::rebuild)))
        .route("/v1/previews/{id}/logs", op(get(operator::logs)))
        .route(
            "/v1/forge/{project}/hook",
            post(crate::forge::hooks::receive).layer(DefaultBodyLimit::max(crate::forge::hooks::MAX_HOOK_BODY)),
        );
    Router::new()
        .route("/healthz", get(health))
        .route("/openapi.json", get(openapi))
        .merge(api)
        .merge(crate::dashboard::routes())
        .fallback(not_found)
        .with_state(waker)
        .layer(
            ServiceBuilder::new()
                .layer(TraceLayer::new_for_http())
                .layer(middleware::map_response(json_errors))
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    ApiError::Overloaded("too many requests in flight; try again")
                }))
                .load_shed()
                .concurrency_limit(MAX_IN_FLIGHT)
                .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT))
                .layer(DefaultBodyLimit::max(MAX_BODY)),
        )
}
