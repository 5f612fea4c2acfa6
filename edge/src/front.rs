//! The pure steps of the pipeline, without I/O: classify a request, turn a decision into
//! a concrete page, shape the status JSON the splash page polls, and check the rebuild
//! form. Time and keys are arguments.

use crate::{bots, PageKind, RequestInfo};
use wakegate_core::host::{normalize_host, Host};
use wakegate_core::redirect::safe_return_to;
use wakegate_core::route::{RouteRecord, RouteStatus};
use wakegate_core::sign::{self, Key};
use wakegate_core::{form, ttl, Millis};
use wakegate_splash::{Context, Page};

/// Longest rebuild form body.
pub const MAX_FORM: usize = 8 * 1024;
/// Longest single status long-poll to waker.
pub const STATUS_WAIT_MS: u64 = 25_000;

/// Classifies a request: what it wants, and whether it is a person's (see
/// [`RequestInfo::may_wake`]). `header` looks a request header up by lowercase name.
pub fn request_info<'a>(method: &str, header: impl Fn(&str) -> Option<&'a str>) -> RequestInfo {
    let speculative_method = method.eq_ignore_ascii_case("HEAD") || method.eq_ignore_ascii_case("OPTIONS");
    RequestInfo {
        wants_html: header("accept").is_some_and(|a| a.contains("text/html")),
        may_wake: !speculative_method && !bots::is_bot(header),
    }
}

/// The concrete page for a decision; forms get a fresh CSRF token for this host.
pub fn page_for(kind: &PageKind, host: &Host, csrf_key: &Key, now: Millis) -> Page {
    let csrf = || sign::csrf_token(csrf_key, host.as_str(), now);
    match kind {
        PageKind::Waking => Page::Waking,
        PageKind::Building { phase, progress } => Page::Building { phase: *phase, progress: *progress },
        PageKind::ConfirmRebuild { by_ttl } => Page::ConfirmRebuild { csrf: csrf(), by_ttl: *by_ttl },
        PageKind::Failed { phase, reason } => Page::Failed { phase: *phase, reason: reason.clone(), csrf: csrf() },
        PageKind::Gone { why, change } => Page::Gone { why: *why, change: change.clone() },
        PageKind::Suspended { domain } => Page::Suspended { domain: domain.clone() },
    }
}

/// What a page says about the preview.
pub fn context<'a>(route: &'a RouteRecord, return_to: &'a str) -> Context<'a> {
    Context {
        project: &route.project,
        git_ref: &route.git_ref,
        version: route.version,
        return_to,
        ttl_remaining: route.ttl_remaining_ms.map(ttl::format_remaining),
    }
}

/// The JSON `/_wakegate/status` answers with.
pub fn status_json(r: &RouteRecord) -> serde_json::Value {
    let mut detail = None;
    let (phase, reason) = match &r.status {
        RouteStatus::Building { phase, progress, .. } => {
            detail = progress.map(|p| p.text());
            (Some(*phase), None)
        }
        RouteStatus::Failed { phase, reason } => (Some(*phase), Some(reason.clone())),
        _ => (None, None),
    };
    serde_json::json!({
        "state": r.status.as_str(),
        "phase": phase.map(|p| p.as_str()),
        "phase_label": phase.map(|p| p.label()),
        "detail": detail,
        "reason": reason,
        "version": r.version,
        "ttl_remaining_ms": r.ttl_remaining_ms,
    })
}

/// Why a rebuild form was refused: status and the sentence to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

/// Checks a rebuild POST: not a bot, same origin (when the browser says), a valid CSRF
/// token for this host. Returns where to send the visitor afterwards.
pub fn check_rebuild_form(
    info: RequestInfo,
    origin_header: Option<&str>,
    host: &Host,
    body: &str,
    csrf_key: &Key,
    now: Millis,
) -> Result<String, Refusal> {
    let refuse = |reason: String| Refusal { status: 403, reason };
    if !info.may_wake {
        return Err(refuse("Automated clients cannot rebuild previews.".into()));
    }
    if let Some(origin) = origin_header {
        let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
        if normalize_host(origin_host).ok().as_ref() != Some(host) {
            return Err(refuse("This form can only be sent from the preview's own page.".into()));
        }
    }
    let pairs = form::parse_pairs(body);
    if let Err(e) = sign::verify_csrf(csrf_key, host.as_str(), form::get(&pairs, "csrf"), now) {
        return Err(refuse(format!(
            "The form has expired or was not sent from this page ({e}). Reload the page and try again."
        )));
    }
    Ok(safe_return_to(form::get(&pairs, "return_to").unwrap_or("/")).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_form_checks() {
        let key = Key::new(b"csrf-key".to_vec());
        let host = normalize_host("a.localhost").unwrap();
        let person = RequestInfo { wants_html: true, may_wake: true };
        let token = sign::csrf_token(&key, "a.localhost", 1000);
        let body = format!("csrf={token}&return_to=%2Fx");
        assert_eq!(check_rebuild_form(person, None, &host, &body, &key, 2000), Ok("/x".into()));
        assert_eq!(
            check_rebuild_form(person, Some("http://a.localhost:8080"), &host, &body, &key, 2000),
            Ok("/x".into())
        );
        assert!(check_rebuild_form(person, Some("http://evil.example"), &host, &body, &key, 2000).is_err());
        assert!(check_rebuild_form(person, None, &host, "csrf=1.00", &key, 2000).is_err());
        let bot = RequestInfo { wants_html: true, may_wake: false };
        assert!(check_rebuild_form(bot, None, &host, &body, &key, 2000).is_err());
        let evil_return = format!("csrf={token}&return_to=%2F%2Fevil.example");
        assert_eq!(check_rebuild_form(person, None, &host, &evil_return, &key, 2000), Ok("/".into()));
        for evil in ["%2F%0A", "%2F%5Cevil.example", "%2F%09%2Fevil.example", "%2F%0D%0ASet-Cookie:%20a=b"] {
            let body = format!("csrf={token}&return_to={evil}");
            assert_eq!(check_rebuild_form(person, None, &host, &body, &key, 2000), Ok("/".into()), "{evil}");
        }
    }
}
