//! The waker's one error type and the one place a status code is chosen.

use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde::Serialize;
use tracing::warn;
use utoipa::ToSchema;
use wakegate_core::lifecycle::{GoneWhy, Rejected};
use wakegate_core::route::GoneInfo;
use wakegate_store::driver::ApplyError;
use wakegate_store::StoreError;

/// Every error answer's body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// The request field at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For a 410: why the preview is gone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gone: Option<GoneInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` names the part at fault.
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The ref behind a preview is gone, or its merge request closed or merged.
    #[error("{}", gone_message(.0))]
    Gone(GoneInfo),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// Well-formed but refers to something that cannot be used (a missing ref).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// The repository could not be asked.
    #[error("cannot reach the repository: {0}")]
    Upstream(String),
    /// The store is down or failed; retrying later can help.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] StoreError),
    /// Something the installation must fix (a secret that cannot be read).
    #[error("{0}")]
    Misconfigured(String),
    /// Too many requests in flight, or one took too long.
    #[error("{0}")]
    Overloaded(&'static str),
}

fn gone_message(g: &GoneInfo) -> String {
    let reference = g.change.as_ref().map(|c| c.reference()).unwrap_or_else(|| "merge request".into());
    match g.why {
        GoneWhy::RefDeleted => "the branch no longer exists".into(),
        GoneWhy::Closed => format!("{reference} was closed"),
        GoneWhy::Merged => format!("merged in {reference}"),
    }
}

impl ApiError {
    /// The branch no longer exists.
    pub fn ref_gone() -> ApiError {
        ApiError::Gone(GoneInfo::default())
    }

    pub fn bad(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest { field: Some(field.to_string()), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) | ApiError::Overloaded(_) | ApiError::Misconfigured(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Exists(what) => ApiError::Conflict(format!("{what} already exists")),
            StoreError::Conflict => ApiError::Conflict("concurrent update, try again".into()),
            e => {
                warn!(error = %e, "store error");
                ApiError::Unavailable(e)
            }
        }
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> ApiError {
        match e {
            ApplyError::NotFound(id) => ApiError::NotFound(format!("no preview {id}")),
            ApplyError::Rejected(Rejected::Gone) => ApiError::ref_gone(),
            ApplyError::Rejected(r) => ApiError::Conflict(r.to_string()),
            ApplyError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let field = match &self {
            ApiError::BadRequest { field, .. } => field.clone(),
            _ => None,
        };
        let gone = match &self {
            ApiError::Gone(g) => Some(g.clone()),
            _ => None,
        };
        match &self {
            ApiError::TooManyRequests(_) => {
                metrics::counter!(wakegate_core::metrics::RATE_LIMITED, "where" => "waker").increment(1)
            }
            ApiError::Overloaded(_) => {
                metrics::counter!(wakegate_core::metrics::RATE_LIMITED, "where" => "waker_overload").increment(1)
            }
            _ => {}
        }
        let mut r = (self.status(), Json(ErrorBody { error: self.to_string(), field, gone })).into_response();
        if matches!(self, ApiError::TooManyRequests(_) | ApiError::Overloaded(_) | ApiError::Unavailable(_)) {
            r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        r
    }
}
