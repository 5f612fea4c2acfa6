//! `/metrics`: the process's Prometheus exposition, on its own address
//! (`WAKEGATE_METRICS_ADDR`; off when unset, so nothing is exposed by accident).
//!
//! The parts record through the `metrics` facade (names in [`wakegate_core::metrics`]);
//! without an installed recorder that costs one atomic load. Durations are histograms
//! with buckets from 5 ms to 15 min, so rates and quantiles aggregate across processes.

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wakegate_core::metrics::{Kind, ALL};

/// Buckets of every `_seconds` histogram: an edge answer (ms) to a cold build (minutes).
const BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (one per process: `wakegate dev`
/// runs every part in one and serves their metrics together).
pub fn handle() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .context("histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    // a second caller racing here loses the install and uses the first handle
    if metrics::set_global_recorder(recorder).is_ok() {
        for (name, kind, help) in ALL {
            match kind {
                Kind::Counter => metrics::describe_counter!(*name, *help),
                Kind::Gauge => metrics::describe_gauge!(*name, *help),
                Kind::Histogram => metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help),
            }
        }
        let _ = HANDLE.set(handle);
    }
    HANDLE.get().cloned().context("another metrics recorder is installed in this process")
}

/// Serves `/metrics` on `addr` until `shutdown`; returns the bound address.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let handle = handle()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener to {addr} (WAKEGATE_METRICS_ADDR)"))?;
    let bound = listener.local_addr()?;
    let rendering = handle.clone();
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = rendering.clone();
            async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], h.render())
            }
        }),
    );
    // histograms keep their samples until drained: drain them even when nobody scrapes
    let drain = handle.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = every.tick() => drain.run_upkeep(),
                () = stop.cancelled() => return,
            }
        }
    });
    tokio::spawn(wakegate_serve::serve_until(
        listener,
        router,
        wakegate_serve::Limits::default(),
        shutdown,
        Duration::from_secs(1),
    ));
    tracing::info!(addr = %bound, "metrics on /metrics");
    Ok(bound)
}

/// Starts `/metrics` when the configuration asks for it.
pub async fn maybe_serve(addr: Option<SocketAddr>, shutdown: &CancellationToken) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        serve(addr, shutdown.clone()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The operator's files that name metrics (the Grafana dashboard, the alerting rules
    //! and the Metrics section of operations.md) keep up with [`ALL`]: a renamed metric
    //! fails here rather than as an empty panel or an alert that never fires.

    use std::collections::BTreeSet;
    use wakegate_core::metrics::{Kind, ALL};

    const DASHBOARD: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/wakegate.json"));
    const ALERTS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/prometheus/alerts.yml"));
    const OPERATIONS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"));

    /// The metrics `text` names: every `wakegate_…` token, a histogram's `_bucket`,
    /// `_sum` and `_count` series taken as the histogram itself.
    fn named(text: &str) -> BTreeSet<String> {
        let token = regex::Regex::new(r"wakegate_[a-z_]+").unwrap();
        token
            .find_iter(text)
            .map(|m| {
                let t = m.as_str();
                for suffix in ["_bucket", "_sum", "_count"] {
                    if let Some(base) = t.strip_suffix(suffix) {
                        if ALL.iter().any(|(n, k, _)| *n == base && *k == Kind::Histogram) {
                            return base.to_string();
                        }
                    }
                }
                t.to_string()
            })
            .collect()
    }

    fn assert_known(file: &str, names: &BTreeSet<String>) {
        for name in names {
            assert!(
                ALL.iter().any(|(n, _, _)| *n == name.as_str()),
                "{file} names {name}, which is not in wakegate_core::metrics::ALL"
            );
        }
    }

    /// The queries of the dashboard's panels; every panel has one at least.
    fn panel_queries() -> Vec<String> {
        let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
        let panels = dashboard["panels"].as_array().expect("the dashboard has panels");
        assert!(!panels.is_empty(), "the dashboard has panels");
        let mut queries = Vec::new();
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            let Some(targets) = panel["targets"].as_array() else {
                panic!("panel {title:?} has no targets");
            };
            let exprs: Vec<&str> =
                targets.iter().filter_map(|t| t["expr"].as_str()).filter(|e| !e.trim().is_empty()).collect();
            assert!(!exprs.is_empty(), "panel {title:?} has no query");
            queries.extend(exprs.into_iter().map(str::to_string));
        }
        queries
    }

    /// From `## Metrics` to the next `## ` heading (the rest of the page names crates,
    /// such as the `wakegate_…` log targets, which are no metrics).
    fn metrics_section() -> &'static str {
        let start = OPERATIONS.find("\n## Metrics\n").expect("operations.md has a Metrics section") + 1;
        let rest = &OPERATIONS[start..];
        let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
        &rest[..end]
    }

    #[test]
    fn the_dashboard_the_alerts_and_the_docs_name_only_exported_metrics() {
        assert_known("docs/grafana/wakegate.json (queries)", &named(&panel_queries().join("\n")));
        assert_known("docs/grafana/wakegate.json", &named(DASHBOARD));
        assert_known("docs/prometheus/alerts.yml", &named(ALERTS));
        assert_known("the Metrics section of docs/operations.md", &named(metrics_section()));
    }

    #[test]
    fn every_metric_is_documented_and_charted() {
        let documented = named(metrics_section());
        let charted = named(&panel_queries().join("\n"));
        for (name, _, _) in ALL {
            assert!(documented.contains(*name), "{name} is not described in the Metrics section of docs/operations.md");
            assert!(charted.contains(*name), "no panel of docs/grafana/wakegate.json queries {name}");
        }
    }

    #[test]
    fn every_alert_has_a_query_a_duration_a_severity_and_words() {
        let rules: Vec<&str> = ALERTS.split("- alert:").skip(1).collect();
        assert!(rules.len() >= 8, "alerts.yml has {} rules", rules.len());
        for rule in rules {
            let name = rule.lines().next().unwrap_or("").trim();
            for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
                assert!(rule.contains(key), "alert {name} has no {key}");
            }
        }
    }
}
