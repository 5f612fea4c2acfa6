//! `/metrics`: a build, a visit, a sleep, a refused bot and a wake move the counters and
//! histograms they should, in the Prometheus text format as a scraper parses it.
//!
//! One test in this file: the recorder is one per process.

mod common;

use common::{through_worker, World};
use prometheus_parse::{Scrape, Value};
use std::time::Duration;
use wakegate_testkit::http;

/// One scrape, parsed.
struct Metrics(Scrape);

impl Metrics {
    async fn scrape(w: &World) -> Metrics {
        let addr = w.dev.metrics_addr.expect("metrics are on");
        let r = http::send(addr, "GET", &addr.to_string(), "/metrics", &[], "").await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
        let lines = r.body.lines().map(|l| Ok(l.to_string())).collect::<Vec<_>>();
        Metrics(Scrape::parse(lines.into_iter()).expect("the exposition format parses"))
    }

    /// The sample `name` whose labels include `labels` (0 when absent): a counter's or
    /// gauge's value, or a histogram's `_count`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
                Value::Summary(_) => panic!("{name} is a summary; durations are histograms"),
            })
            .sum()
    }

    /// Every histogram's buckets are cumulative and end in `+Inf` = `_count`.
    fn check_histograms(&self) {
        for s in &self.0.samples {
            if let Value::Histogram(b) = &s.value {
                assert!(b.windows(2).all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count), "{s:?}");
                let inf = b.last().expect("buckets");
                assert!(inf.less_than.is_infinite(), "{s:?}");
                let count = self
                    .0
                    .samples
                    .iter()
                    .find(|c| c.metric == format!("{}_count", s.metric) && c.labels == s.labels)
                    .unwrap_or_else(|| panic!("{} {:?} has buckets but no _count", s.metric, s.labels));
                match &count.value {
                    Value::Untyped(c) | Value::Counter(c) => assert_eq!(*c, inf.count, "{}", s.metric),
                    other => panic!("{}_count is {other:?}", s.metric),
                }
            }
        }
    }
}

/// Scrapes until `ok` holds (bounded): counts reported in batches and gauges set by
/// the sweeper arrive a little later than the event.
async fn eventually(w: &World, what: &str, ok: impl Fn(&Metrics) -> bool) -> Metrics {
    for _ in 0..100 {
        let m = Metrics::scrape(w).await;
        if ok(&m) {
            return m;
        }
        if through_worker() {
            // the Worker has no timers: its counts ride on the next request's report
            http::send(w.edge, "GET", "nobody.localhost", "/", &[], "").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = Metrics::scrape(w).await;
    let text: Vec<String> = m.0.samples.iter().map(|s| format!("{} {:?} {:?}", s.metric, s.labels, s.value)).collect();
    panic!("{what} never showed in /metrics:\n{}", text.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_with_builds_wakes_sleeps_and_bots() {
    let w = World::start_with(&[("WAKEGATE_METRICS_ADDR", "127.0.0.1:0")], 600).await;
    let edge = if through_worker() { "worker" } else { "native" };
    let before = Metrics::scrape(&w).await;
    assert_eq!(before.get("wakegate_builds_total", &[]), 0.0, "nothing built yet");

    // a build
    let p = w.running("main").await;
    let id = p["id"].as_str().unwrap().to_string();
    let m = eventually(&w, "the build", |m| m.get("wakegate_builds_total", &[("result", "ok")]) >= 1.0).await;
    assert_eq!(m.get("wakegate_builds_total", &[("result", "ok")]), 1.0);
    assert_eq!(m.get("wakegate_build_duration_seconds_count", &[("result", "ok")]), 1.0);
    for phase in ["queued", "checkout", "build", "start", "health"] {
        assert_eq!(m.get("wakegate_build_phase_duration_seconds_count", &[("phase", phase)]), 1.0, "{phase}");
    }
    assert!(m.get("wakegate_build_duration_seconds_sum", &[("result", "ok")]) > 0.0);
    assert_eq!(
        m.get("wakegate_ref_checks_total", &[("result", "exists")]),
        1.0,
        "creating the preview checked its ref"
    );
    assert!(m.get("wakegate_jobs_total", &[("kind", "build"), ("result", "ok")]) >= 1.0);

    // visits are proxied, and timed at the native edge
    for _ in 0..3 {
        assert_eq!(w.visit(&p, "/").await.status, 200);
    }
    let m = eventually(&w, "proxied visits", |m| {
        m.get("wakegate_edge_requests_total", &[("edge", edge), ("answer", "proxy")]) >= 3.0
    })
    .await;
    if edge == "native" {
        assert!(m.get("wakegate_edge_request_duration_seconds_count", &[("answer", "proxy")]) >= 3.0);
    }
    let m = eventually(&w, "the previews gauge", |m| m.get("wakegate_previews", &[("state", "running")]) == 1.0).await;
    assert_eq!(m.get("wakegate_previews", &[("state", "sleeping")]), 0.0);
    // set when the cloud is listed, which is paced apart from the sweeps
    eventually(&w, "the servers gauge", |m| m.get("wakegate_servers", &[("state", "running")]) >= 1.0).await;

    // a sleep asked for by an operator
    let (s, _) = w.op("POST", &format!("/v1/previews/{id}/sleep"), None).await;
    assert_eq!(s, 202);
    w.wait_state(&id, "sleeping").await;
    let m = Metrics::scrape(&w).await;
    assert_eq!(m.get("wakegate_sleeps_total", &[("reason", "manual")]), 1.0);
    assert_eq!(m.get("wakegate_sleeps_total", &[("reason", "idle")]), 0.0);

    // a bot is refused a wake, and counted
    let bot = [("accept", "text/html"), ("user-agent", "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)")];
    let r = http::send(w.edge, "GET", &w.host(&p), "/", &bot, "").await.unwrap();
    assert_eq!(r.status, 503);
    eventually(&w, "the refused bot", |m| m.get("wakegate_bot_visits_refused_total", &[("edge", edge)]) == 1.0).await;
    assert_eq!(w.show(&id).await["state"], "sleeping", "the bot woke nothing");

    // a person's visit wakes it
    let r =
        http::send(w.edge, "GET", &w.host(&p), "/", &[("accept", "text/html"), ("user-agent", http::BROWSER_UA)], "")
            .await
            .unwrap();
    assert!(r.body.contains("<html"), "the splash page");
    w.wait_state(&id, "running").await;
    let m = eventually(&w, "the wake", |m| {
        m.get("wakegate_wake_duration_seconds_count", &[("kind", "warm"), ("result", "ok")]) == 1.0
    })
    .await;
    assert!(m.get("wakegate_wake_duration_seconds_sum", &[("kind", "warm"), ("result", "ok")]) > 0.0);
    assert_eq!(m.get("wakegate_wake_phase_duration_seconds_count", &[("phase", "queued")]), 1.0);
    assert_eq!(m.get("wakegate_wake_phase_duration_seconds_count", &[("phase", "start")]), 1.0);
    assert_eq!(m.get("wakegate_builds_total", &[]), 1.0, "a wake is not a build");
    m.check_histograms();
    // everything exported under the prefix is a known metric
    for sample in &m.0.samples {
        let known = |n: &str| wakegate_core::metrics::ALL.iter().any(|(name, _, _)| *name == n);
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| sample.metric.strip_suffix(suffix))
            .filter(|b| known(b))
            .unwrap_or(&sample.metric);
        assert!(!base.starts_with("wakegate_") || known(base), "{base} is not in wakegate_core::metrics::ALL");
        assert!(!base.starts_with("wakegate_") || m.0.docs.contains_key(base), "{base} has no HELP");
    }
    eventually(&w, "the splash page", |m| {
        m.get("wakegate_edge_requests_total", &[("edge", edge), ("answer", "page")]) >= 1.0
    })
    .await;

    // the counts behind the dashboard: one build and one wake this week
    let weeks = wakegate_store::stats::weeks(w.dev.store.as_ref(), wakegate_store::now_ms()).await.unwrap();
    let project = w.op("GET", "/v1/projects/demo", None).await.1["id"].as_str().unwrap().to_string();
    assert_eq!(weeks[&project], wakegate_store::stats::Counts { builds: 1, wakes: 1 });
    // and the last visit is the operator's to see
    assert!(w.show(&id).await["last_visit_at"].as_u64().is_some());
    w.stop().await;
}
