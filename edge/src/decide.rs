//! The routing decision.

use wakegate_core::lifecycle::{EraseReason, GoneWhy, Phase};
use wakegate_core::route::{Change, RouteRecord, RouteStatus};

/// What the front door knows about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestInfo {
    /// `Accept` names `text/html` (a person in a browser).
    pub wants_html: bool,
    /// A person's request: may wake or rebuild a preview and counts as activity. False
    /// for crawlers, unfurlers, probes, prefetches and previews, and for `HEAD` and
    /// `OPTIONS` (CORS preflights), which no person's visit needs a machine for.
    pub may_wake: bool,
}

/// Which splash page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageKind {
    Waking,
    Building {
        phase: Phase,
        progress: Option<wakegate_core::route::Progress>,
    },
    /// `by_ttl`: erased because its time was up.
    ConfirmRebuild {
        by_ttl: bool,
    },
    Failed {
        phase: Phase,
        reason: String,
    },
    /// Why, and the merge request to link to.
    Gone {
        why: GoneWhy,
        change: Option<Change>,
    },
    /// The custom name's domain is suspended.
    Suspended {
        domain: String,
    },
}

/// What to do with a request to a known preview host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forward to the origin the route names (`route.status.origin()`).
    Proxy,
    /// Show a page; when `wake`, start the wake after the page is sent.
    Page { page: PageKind, wake: bool },
    /// An API client: (wake and) wait, bounded, until the preview runs.
    Hold { wake: bool },
    /// A plain answer for clients that do not want HTML.
    Unavailable { status: u16, retry_after: Option<u32>, state: &'static str },
}

/// Decides what a request gets. Pure and total.
pub fn decide(route: &RouteRecord, req: RequestInfo) -> Decision {
    if route.status.origin().is_some() {
        return Decision::Proxy;
    }
    let state = route.status.as_str();
    let unavailable = |status, retry_after| Decision::Unavailable { status, retry_after, state };
    match (&route.status, req.wants_html) {
        (RouteStatus::Sleeping, true) => Decision::Page { page: PageKind::Waking, wake: req.may_wake },
        (RouteStatus::Sleeping, false) if !req.may_wake => unavailable(503, Some(30)),
        (RouteStatus::Sleeping, false) => Decision::Hold { wake: true },
        (RouteStatus::Waking, true) => Decision::Page { page: PageKind::Waking, wake: false },
        (RouteStatus::Building { phase, progress, .. }, true) => {
            Decision::Page { page: PageKind::Building { phase: *phase, progress: *progress }, wake: false }
        }
        (RouteStatus::Waking | RouteStatus::Building { .. }, false) if !req.may_wake => unavailable(503, Some(30)),
        (RouteStatus::Waking | RouteStatus::Building { .. }, false) => Decision::Hold { wake: false },
        (RouteStatus::Failed { phase, reason }, true) => {
            Decision::Page { page: PageKind::Failed { phase: *phase, reason: reason.clone() }, wake: false }
        }
        (RouteStatus::Failed { .. }, false) => unavailable(503, None),
        (RouteStatus::Erased { rebuildable: true, reason }, true) => {
            Decision::Page { page: PageKind::ConfirmRebuild { by_ttl: *reason == EraseReason::Ttl }, wake: false }
        }
        (RouteStatus::Erased { rebuildable: true, .. }, false) => unavailable(404, None),
        (RouteStatus::Erased { rebuildable: false, .. }, true) => {
            Decision::Page { page: PageKind::Gone { why: GoneWhy::RefDeleted, change: None }, wake: false }
        }
        (RouteStatus::Gone { why, change }, true) => {
            Decision::Page { page: PageKind::Gone { why: *why, change: change.clone() }, wake: false }
        }
        (RouteStatus::Erased { rebuildable: false, .. } | RouteStatus::Gone { .. }, false) => unavailable(410, None),
        (RouteStatus::Suspended { domain }, true) => {
            Decision::Page { page: PageKind::Suspended { domain: domain.clone() }, wake: false }
        }
        (RouteStatus::Suspended { .. }, false) => unavailable(403, None),
        // origin() covered these
        (RouteStatus::Running { .. }, _) => unavailable(502, Some(5)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A route record in this state (shared with the cache's tests).
    pub(crate) fn route(status: RouteStatus) -> RouteRecord {
        RouteRecord {
            preview_id: "p".into(),
            project: "web".into(),
            git_ref: "main".into(),
            status,
            version: 1,
            ttl_remaining_ms: None,
            pinned: false,
        }
    }

    const HTML: RequestInfo = RequestInfo { wants_html: true, may_wake: true };
    const API: RequestInfo = RequestInfo { wants_html: false, may_wake: true };
    const BOT_HTML: RequestInfo = RequestInfo { wants_html: true, may_wake: false };
    const BOT_API: RequestInfo = RequestInfo { wants_html: false, may_wake: false };

    #[test]
    fn running_and_redeploying_proxy() {
        let r = route(RouteStatus::Running { origin: "http://127.0.0.1:9".into() });
        for req in [HTML, API, BOT_HTML, BOT_API] {
            assert_eq!(decide(&r, req), Decision::Proxy);
        }
        let r = route(RouteStatus::Building { phase: Phase::Build, origin: Some("http://o".into()), progress: None });
        assert_eq!(decide(&r, HTML), Decision::Proxy);
    }

    #[test]
    fn only_people_and_api_clients_wake() {
        let r = route(RouteStatus::Sleeping);
        assert_eq!(decide(&r, HTML), Decision::Page { page: PageKind::Waking, wake: true });
        assert_eq!(decide(&r, API), Decision::Hold { wake: true });
        assert_eq!(decide(&r, BOT_HTML), Decision::Page { page: PageKind::Waking, wake: false });
        assert!(matches!(decide(&r, BOT_API), Decision::Unavailable { status: 503, .. }));
    }

    #[test]
    fn every_status_has_an_answer() {
        let statuses = [
            RouteStatus::Waking,
            RouteStatus::Building { phase: Phase::Checkout, origin: None, progress: None },
            RouteStatus::Failed { phase: Phase::Build, reason: "x".into() },
            RouteStatus::Erased { reason: EraseReason::Ttl, rebuildable: true },
            RouteStatus::Erased { reason: EraseReason::Ttl, rebuildable: false },
            RouteStatus::Gone { why: GoneWhy::RefDeleted, change: None },
        ];
        let expect_html = [
            Decision::Page { page: PageKind::Waking, wake: false },
            Decision::Page { page: PageKind::Building { phase: Phase::Checkout, progress: None }, wake: false },
            Decision::Page { page: PageKind::Failed { phase: Phase::Build, reason: "x".into() }, wake: false },
            Decision::Page { page: PageKind::ConfirmRebuild { by_ttl: true }, wake: false },
            Decision::Page { page: PageKind::Gone { why: GoneWhy::RefDeleted, change: None }, wake: false },
            Decision::Page { page: PageKind::Gone { why: GoneWhy::RefDeleted, change: None }, wake: false },
        ];
        for (s, want) in statuses.iter().zip(expect_html) {
            assert_eq!(decide(&route(s.clone()), HTML), want, "{s:?}");
            assert_eq!(decide(&route(s.clone()), BOT_HTML), want, "bots see pages too, never wake: {s:?}");
        }
        assert_eq!(decide(&route(statuses[0].clone()), API), Decision::Hold { wake: false });
        assert!(matches!(decide(&route(statuses[4].clone()), API), Decision::Unavailable { status: 410, .. }));
        assert!(matches!(decide(&route(statuses[3].clone()), API), Decision::Unavailable { status: 404, .. }));
    }
}
