//! What the dashboard shows, as data: rows made from [`PreviewView`]s and project
//! counts, times as relative text beside their absolute value, the actions a state
//! offers, and the askama templates (`waker/templates/dashboard/`, escaped by default).
//!
//! Pure: the time is an argument, nothing here reads the store or a clock.

use crate::model::PreviewView;
use askama::Template;
use std::collections::HashMap;
use wakegate_core::lifecycle::Phase;
use wakegate_core::route::Project;
use wakegate_core::Millis;
use wakegate_store::stats::Counts;

/// What an operator can do to a preview from the dashboard; each is the operator API's
/// call of the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Pin,
    Unpin,
    Sleep,
    Wake,
    Erase,
    Rebuild,
    /// The running preview's data made again from its project's database image.
    RefreshData,
}

impl Action {
    pub(crate) const ALL: [Action; 7] =
        [Action::Pin, Action::Unpin, Action::Sleep, Action::Wake, Action::Erase, Action::Rebuild, Action::RefreshData];

    /// The path segment (`/dashboard/previews/{id}/{action}`) and the API call's name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Pin => "pin",
            Action::Unpin => "unpin",
            Action::Sleep => "sleep",
            Action::Wake => "wake",
            Action::Erase => "erase",
            Action::Rebuild => "rebuild",
            Action::RefreshData => "refresh-data",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The button's visible text.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Action::Pin => "Pin",
            Action::Unpin => "Unpin",
            Action::Sleep => "Sleep",
            Action::Wake => "Wake",
            Action::Erase => "Erase",
            Action::Rebuild => "Rebuild",
            Action::RefreshData => "Refresh data",
        }
    }

    /// The button's style: erasing loses the preview's machine and data.
    pub(crate) fn class(self) -> &'static str {
        match self {
            Action::Erase => "danger",
            Action::Rebuild | Action::Wake => "primary",
            _ => "secondary",
        }
    }

    /// The buttons a preview in `state` shows. Any action may still be posted (the
    /// state may have moved since the page was drawn): the lifecycle decides, and a
    /// refusal is shown to the operator.
    pub(crate) fn offered(state: &str, pinned: bool, has_db: bool) -> Vec<Action> {
        let mut v = Vec::new();
        if state != "gone" {
            v.push(if pinned { Action::Unpin } else { Action::Pin });
        }
        if state == "running" {
            v.push(Action::Sleep);
        }
        if matches!(state, "sleeping" | "stopping") {
            v.push(Action::Wake);
        }
        if matches!(state, "erased" | "failed" | "running") {
            v.push(Action::Rebuild);
        }
        if state == "running" && has_db {
            v.push(Action::RefreshData);
        }
        if matches!(state, "building" | "running" | "stopping" | "sleeping" | "waking" | "failed") {
            v.push(Action::Erase);
        }
        v
    }

    /// What the operator is told when it worked; `state` is the preview's state after.
    pub(crate) fn done(self, name: &str, state: &str) -> String {
        match self {
            Action::Pin => format!("Pinned {name}: it stays until unpinned."),
            Action::Unpin => format!("Unpinned {name}: its TTL counts again."),
            Action::Sleep => format!("Sleep requested for {name}; it is {state} now."),
            Action::Wake => format!("Wake requested for {name}; it is {state} now."),
            Action::Erase => format!("Erase requested for {name}; it is {state} now."),
            Action::Rebuild => format!("Rebuild requested for {name}; it is {state} now."),
            Action::RefreshData => {
                format!("Data refresh requested for {name}: its database is made again from the current image.")
            }
        }
    }

    /// What the operator is told when it was refused or failed.
    pub(crate) fn failed(self, name: &str, why: &str) -> String {
        let verb = match self {
            Action::RefreshData => "refresh the data of",
            other => other.as_str(),
        };
        format!("Could not {verb} {name}: {why}.")
    }
}

/// A moment, three ways: for `<time datetime>`, for a tooltip, and for reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct When {
    pub iso: String,
    pub absolute: String,
    pub relative: String,
}

impl When {
    pub(crate) fn new(at: Millis, now: Millis) -> When {
        When { iso: rfc3339(at), absolute: absolute(at), relative: relative(at, now) }
    }
}

pub(crate) struct Link {
    pub href: String,
    pub text: String,
}

/// One preview's row.
pub(crate) struct Row {
    pub id: String,
    pub project: String,
    pub git_ref: String,
    /// How buttons name it: "demo main".
    pub name: String,
    pub state: String,
    /// The build phase (building, failed), in words.
    pub phase: Option<String>,
    /// Why it was erased (`manual`, `ttl`).
    pub reason: Option<String>,
    /// A failure's full message (build output included: operators only).
    pub failure: Option<String>,
    pub urls: Vec<Link>,
    pub created: When,
    pub deployed: When,
    pub visited: Option<When>,
    pub ttl: String,
    pub pinned: bool,
    pub actions: Vec<Action>,
}

/// One project's line of the summary.
pub(crate) struct ProjectRow {
    pub name: String,
    pub previews: usize,
    pub running: usize,
    pub builds: u64,
    pub wakes: u64,
    /// Estimated EUR per hour, formatted; `None`: nothing priced is running.
    pub cost: Option<String>,
}

/// Everything the live part of the page shows.
pub(crate) struct Tables {
    pub previews: Vec<Row>,
    pub projects: Vec<ProjectRow>,
    /// The session's CSRF token, in every action form.
    pub csrf: String,
}

/// Builds the tables: previews by project and ref, projects by name.
pub(crate) fn tables(
    mut views: Vec<PreviewView>,
    projects: &[Project],
    weeks: &HashMap<String, Counts>,
    costs: &HashMap<String, f64>,
    with_db: &std::collections::HashSet<String>,
    csrf: String,
    now: Millis,
) -> Tables {
    let short = |v: &PreviewView| wakegate_core::host::short_ref(&v.git_ref).to_string();
    views.sort_by_cached_key(|v| (v.project.clone(), short(v)));
    let mut summary: Vec<ProjectRow> = projects
        .iter()
        .map(|p| {
            let counts = weeks.get(&p.id).copied().unwrap_or_default();
            ProjectRow {
                name: p.name.clone(),
                previews: views.iter().filter(|v| v.project == p.name).count(),
                running: views.iter().filter(|v| v.project == p.name && v.state == "running").count(),
                builds: counts.builds,
                wakes: counts.wakes,
                cost: costs.get(&p.id).copied().and_then(cost_text),
            }
        })
        .collect();
    summary.sort_by(|a, b| a.name.cmp(&b.name));
    let previews = views
        .into_iter()
        .map(|v| {
            let has_db = with_db.contains(&v.id);
            row(v, now, has_db)
        })
        .collect();
    Tables { previews, projects: summary, csrf }
}

fn row(v: PreviewView, now: Millis, has_db: bool) -> Row {
    let short = wakegate_core::host::short_ref(&v.git_ref).to_string();
    let phase = v.phase.as_deref().map(phase_text);
    let (reason, failure) = match v.state.as_str() {
        "failed" => (None, v.reason.clone().or(v.last_error.clone())),
        "erased" | "erasing" => (v.reason.clone(), None),
        _ => (None, None),
    };
    let urls = std::iter::once(&v.url)
        .chain(v.custom_urls.iter())
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .map(|u| Link { href: u.clone(), text: u.split_once("://").map_or(u.as_str(), |(_, rest)| rest).to_string() })
        .collect();
    let ttl = match (&v.ttl_remaining, v.pinned) {
        (_, true) => "never (pinned)".to_string(),
        (Some(left), false) => left.clone(),
        (None, false) => "—".to_string(),
    };
    Row {
        name: format!("{} {short}", v.project),
        actions: Action::offered(&v.state, v.pinned, has_db),
        created: When::new(v.created_at, now),
        deployed: When::new(v.deployed_at, now),
        visited: v.last_visit_at.map(|at| When::new(at, now)),
        id: v.id,
        project: v.project,
        git_ref: short,
        state: v.state,
        phase,
        reason,
        failure,
        urls,
        ttl,
        pinned: v.pinned,
    }
}

/// A phase in words ("Checking out the code"); an unknown one as it came.
fn phase_text(phase: &str) -> String {
    Phase::ALL
        .into_iter()
        .chain([Phase::Run])
        .find(|p| p.as_str() == phase)
        .map_or_else(|| phase.replace('_', " "), |p| p.label().to_string())
}

/// `€0.0123`: cents are too coarse for one small server's hour.
pub(crate) fn cost_text(eur_per_hour: f64) -> Option<String> {
    if !eur_per_hour.is_finite() || eur_per_hour < 0.0 {
        return None;
    }
    Some(if eur_per_hour >= 1.0 { format!("€{eur_per_hour:.2}") } else { format!("€{eur_per_hour:.4}") })
}

/// "just now", "3 min ago", "5 h ago", "2 days ago": coarse on purpose, so the page
/// the browser refreshes changes only when something did.
pub(crate) fn relative(at: Millis, now: Millis) -> String {
    let s = now.saturating_sub(at) / 1000;
    match s {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", s / 60),
        3600..172_800 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn parts(ms: Millis) -> (i64, u32, u32, u64, u64, u64) {
    let s = ms / 1000;
    let (y, mo, d) = civil((s / 86_400) as i64);
    (y, mo, d, (s % 86_400) / 3600, (s % 3600) / 60, s % 60)
}

/// `2024-05-01T12:03:04Z`
pub(crate) fn rfc3339(ms: Millis) -> String {
    let (y, mo, d, h, mi, s) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `2024-05-01 12:03 UTC`
pub(crate) fn absolute(ms: Millis) -> String {
    let (y, mo, d, h, mi, _) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02} UTC")
}

/// A message to the operator, green or red.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Flash {
    pub ok: bool,
    pub text: String,
}

#[derive(Template)]
#[template(path = "dashboard/login.html")]
pub(crate) struct LoginPage<'a> {
    pub title: &'a str,
    /// Why the form is shown again (a wrong token), tied to the field.
    pub error: Option<String>,
    /// Something to know first (the session ended).
    pub notice: Option<String>,
}

#[derive(Template)]
#[template(path = "dashboard/page.html")]
pub(crate) struct DashboardPage<'a> {
    pub title: &'a str,
    pub t: &'a Tables,
    pub flash: Option<Flash>,
}

/// The live part alone, which the page's script fetches and swaps in.
#[derive(Template)]
#[template(path = "dashboard/tables.html")]
pub(crate) struct LiveTables<'a> {
    pub t: &'a Tables,
}

/// A refusal or failure, with the way back.
#[derive(Template)]
#[template(path = "dashboard/message.html")]
pub(crate) struct MessagePage<'a> {
    pub title: &'a str,
    pub message: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_are_coarse() {
        let now = 1_000_000_000_000;
        assert_eq!(relative(now, now), "just now");
        assert_eq!(relative(now - 59_999, now), "just now");
        assert_eq!(relative(now - 60_000, now), "1 min ago");
        assert_eq!(relative(now - 3_599_999, now), "59 min ago");
        assert_eq!(relative(now - 3_600_000, now), "1 h ago");
        assert_eq!(relative(now - 47 * 3_600_000, now), "47 h ago");
        assert_eq!(relative(now - 3 * 86_400_000, now), "3 days ago");
        // a clock behind the record's writer
        assert_eq!(relative(now + 5_000, now), "just now");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_564_984_000), "2024-05-01T12:03:04Z");
        assert_eq!(absolute(1_714_564_984_999), "2024-05-01 12:03 UTC");
        assert_eq!(rfc3339(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn actions_by_state() {
        use Action::*;
        assert_eq!(Action::offered("running", false, false), vec![Pin, Sleep, Rebuild, Erase]);
        assert_eq!(Action::offered("running", true, false), vec![Unpin, Sleep, Rebuild, Erase]);
        assert_eq!(Action::offered("running", false, true), vec![Pin, Sleep, Rebuild, RefreshData, Erase]);
        assert_eq!(Action::offered("sleeping", false, true), vec![Pin, Wake, Erase]);
        assert_eq!(Action::offered("erased", false, false), vec![Pin, Rebuild]);
        assert_eq!(Action::offered("building", false, false), vec![Pin, Erase]);
        assert_eq!(Action::offered("erasing", false, false), vec![Pin]);
        assert_eq!(Action::offered("gone", false, false), vec![]);
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Action::parse("delete"), None);
    }

    #[test]
    fn costs() {
        assert_eq!(cost_text(0.0065).as_deref(), Some("€0.0065"));
        assert_eq!(cost_text(1.5).as_deref(), Some("€1.50"));
        assert_eq!(cost_text(f64::NAN), None);
        assert_eq!(cost_text(-1.0), None);
    }

    fn view(project: &str, git_ref: &str, state: &str) -> PreviewView {
        PreviewView {
            id: format!("pv-{project}-{}", git_ref.replace('/', "-")),
            project: project.into(),
            git_ref: git_ref.into(),
            label: "l".into(),
            host: "l.localhost".into(),
            url: "http://l.localhost:8080".into(),
            custom_hosts: vec![],
            custom_urls: vec!["javascript:alert(1)".into(), "https://l.previews.acme.com".into()],
            custom_hostnames: vec![],
            state: state.into(),
            phase: (state == "building").then(|| "checkout".into()),
            progress: None,
            reason: (state == "erased").then(|| "manual".into()),
            pinned: false,
            ttl_hours: 24.0,
            ttl_remaining_ms: Some(3_600_000),
            ttl_remaining: Some("1h 00m".into()),
            created_at: 0,
            deployed_at: 0,
            last_visit_at: None,
            last_error: None,
            version: 1,
        }
    }

    fn project(id: &str, name: &str) -> Project {
        Project {
            id: id.into(),
            name: name.into(),
            git_url: "/r".into(),
            ttl_hours: 24.0,
            idle_timeout_secs: 600,
            created_at: 0,
            machine: Default::default(),
            org_id: "default".into(),
            forge: None,
        }
    }

    #[test]
    fn rows_and_summary() {
        let views = vec![
            view("web", "main", "running"),
            view("demo", "refs/heads/feature/<b>", "building"),
            view("demo", "main", "erased"),
        ];
        let projects = [project("p2", "web"), project("p1", "demo"), project("p3", "idle")];
        let weeks = HashMap::from([("p1".to_string(), Counts { builds: 3, wakes: 2 })]);
        let costs = HashMap::from([("p2".to_string(), 0.0123)]);
        let t = tables(views, &projects, &weeks, &costs, &Default::default(), "tok".into(), 120_000);
        let order: Vec<_> = t.previews.iter().map(|r| (r.project.as_str(), r.git_ref.as_str())).collect();
        assert_eq!(order, [("demo", "feature/<b>"), ("demo", "main"), ("web", "main")]);
        let building = &t.previews[0];
        assert_eq!(building.phase.as_deref(), Some("Checking out the code"));
        assert_eq!(building.name, "demo feature/<b>");
        assert_eq!(building.created.relative, "2 min ago");
        // only web links are links
        let urls: Vec<_> = building.urls.iter().map(|l| l.href.as_str()).collect();
        assert_eq!(urls, ["http://l.localhost:8080", "https://l.previews.acme.com"]);
        assert_eq!(building.urls[0].text, "l.localhost:8080");
        assert_eq!(t.previews[1].reason.as_deref(), Some("manual"));
        let summary: Vec<_> =
            t.projects.iter().map(|p| (p.name.as_str(), p.previews, p.running, p.builds, p.cost.clone())).collect();
        assert_eq!(
            summary,
            [("demo", 2, 0, 3, None), ("idle", 0, 0, 0, None), ("web", 1, 1, 0, Some("€0.0123".to_string()))]
        );
    }

    #[test]
    fn pages_escape_what_they_show() {
        let views = vec![view("demo", "refs/heads/<script>x</script>", "running")];
        let t = tables(
            views,
            &[project("p1", "demo")],
            &HashMap::new(),
            &HashMap::new(),
            &Default::default(),
            "c\"srf".into(),
            0,
        );
        let html = DashboardPage {
            title: "Previews",
            t: &t,
            flash: Some(Flash { ok: false, text: "<img src=x onerror=alert(1)>".into() }),
        }
        .render()
        .unwrap();
        assert!(!html.contains("<script>x"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(html.contains("&#60;script&#62;x"), "{html}");
        assert!(html.contains(r#"value="c&#34;srf""#), "{html}");
        assert!(html.contains(r#"<html lang="en">"#));
        // every button says which preview it acts on
        assert!(
            html.contains(r#"Sleep<span class="vh"> preview demo &#60;script&#62;x&#60;/script&#62;</span>"#),
            "{html}"
        );
        let live = LiveTables { t: &t }.render().unwrap();
        assert!(html.contains(&live), "the page embeds exactly what the live endpoint sends");
    }
}
