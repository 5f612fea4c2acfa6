//! What operators see beside a preview's state: its last visit, and per project the
//! builds and wakes of the last seven days. Also the Prometheus metrics of lifecycle
//! transitions, recorded where every transition is applied ([`crate::driver`]).
//!
//! The activity index forgets a preview once it stops running, so last visits are kept
//! in their own table. A project's days are one record, pruned as it is written.

use crate::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use wakegate_core::lifecycle::{Phase, State};
use wakegate_core::metrics as m;
use wakegate_core::route::Preview;
use wakegate_core::Millis;

/// preview id → last visit (ms).
pub const VISITS: &str = "last-visits";
/// project id → [`Days`].
pub const DAYS: &str = "project-days";
const DAY_MS: Millis = 86_400_000;
/// Days a project's counts are kept and summed over.
pub const WEEK_DAYS: u64 = 7;

/// Records that these previews were visited at `at` (a later time wins).
pub async fn record_visits(store: &dyn Store, ids: &[String], at: Millis) -> crate::Result<()> {
    for id in ids {
        let current = store.table_get(VISITS, id).await?;
        if current.as_deref().and_then(|v| v.parse::<Millis>().ok()).is_some_and(|c| c >= at) {
            continue;
        }
        // a concurrent later visit wins the swap; ours is older then
        store.table_swap(VISITS, id, current.as_deref(), Some(&at.to_string())).await?;
    }
    Ok(())
}

/// One preview's last visit.
pub async fn last_visit(store: &dyn Store, id: &str) -> crate::Result<Option<Millis>> {
    Ok(store.table_get(VISITS, id).await?.and_then(|v| v.parse().ok()))
}

/// Every preview's last visit.
pub async fn last_visits(store: &dyn Store) -> crate::Result<HashMap<String, Millis>> {
    Ok(store.table_list(VISITS).await?.into_iter().filter_map(|(k, v)| Some((k, v.parse().ok()?))).collect())
}

/// A project's counts per day (days since the epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Days(pub BTreeMap<u64, Counts>);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    #[serde(default)]
    pub builds: u64,
    #[serde(default)]
    pub wakes: u64,
}

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Build,
    Wake,
}

impl Days {
    /// The counts of the [`WEEK_DAYS`] days up to `now`.
    pub fn week(&self, now: Millis) -> Counts {
        let today = now / DAY_MS;
        self.0
            .range(today.saturating_sub(WEEK_DAYS - 1)..=today)
            .fold(Counts::default(), |a, (_, c)| Counts { builds: a.builds + c.builds, wakes: a.wakes + c.wakes })
    }
}

/// Adds one to a project's count for today, dropping days older than a week.
pub async fn bump(store: &dyn Store, project_id: &str, what: Count, now: Millis) -> crate::Result<()> {
    let today = now / DAY_MS;
    for _ in 0..16 {
        let raw = store.table_get(DAYS, project_id).await?;
        let mut days: Days = raw.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
        days.0.retain(|d, _| *d + WEEK_DAYS > today);
        let c = days.0.entry(today).or_default();
        match what {
            Count::Build => c.builds += 1,
            Count::Wake => c.wakes += 1,
        }
        let next = serde_json::to_string(&days).map_err(|e| StoreError::Backend(e.to_string()))?;
        if store.table_swap(DAYS, project_id, raw.as_deref(), Some(&next)).await? {
            return Ok(());
        }
    }
    Err(StoreError::Conflict)
}

/// Every project's counts of the last week.
pub async fn weeks(store: &dyn Store, now: Millis) -> crate::Result<HashMap<String, Counts>> {
    Ok(store
        .table_list(DAYS)
        .await?
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_str::<Days>(&v).ok()?.week(now))))
        .collect())
}

/// project id → what its running servers cost per hour now (written by the provisioner,
/// from its cloud's prices).
pub const COSTS: &str = "project-hourly-cost";

/// Records each project's cost per hour; projects left out cost nothing now.
pub async fn set_costs(store: &dyn Store, costs: &HashMap<String, f64>) -> crate::Result<()> {
    for (project, _) in store.table_list(COSTS).await? {
        if !costs.contains_key(&project) {
            store.table_remove(COSTS, &project).await?;
        }
    }
    for (project, cost) in costs {
        store.table_put(COSTS, project, &cost.to_string()).await?;
    }
    Ok(())
}

/// Each project's estimated cost per hour now (absent: nothing running, or no prices).
pub async fn costs(store: &dyn Store) -> crate::Result<HashMap<String, f64>> {
    Ok(store.table_list(COSTS).await?.into_iter().filter_map(|(k, v)| Some((k, v.parse().ok()?))).collect())
}

fn seconds(ms: Millis) -> f64 {
    ms as f64 / 1000.0
}

/// Records what a state change means: metrics here, and the project's counts in the
/// store (a failure there is logged; the transition stands).
pub(crate) async fn observe(store: &dyn Store, before: &Preview, after: &Preview, now: Millis) {
    let since = now.saturating_sub(before.state_since);
    let mut count = None;
    match (&before.state, &after.state) {
        (State::Building { phase, .. }, next) => {
            // the phase being left, unless the build started over
            let left = match next {
                State::Building { phase: p, .. } => p != phase && *p != Phase::Queued,
                _ => true,
            };
            if left {
                metrics::histogram!(m::BUILD_PHASE_SECONDS, "phase" => phase.as_str()).record(seconds(since));
            }
            let result = match next {
                // a redeploy that failed keeps the old version running, and says why
                State::Running { .. } if after.last_error.is_some() => Some("failed"),
                State::Running { .. } => Some("ok"),
                State::Failed { .. } => Some("failed"),
                _ => None,
            };
            if let Some(result) = result {
                metrics::counter!(m::BUILDS, "result" => result).increment(1);
                let took = seconds(now.saturating_sub(before.built_at));
                metrics::histogram!(m::BUILD_SECONDS, "result" => result).record(took);
                count = Some(Count::Build);
            }
        }
        (State::Waking { .. }, State::Running { .. }) => count = Some(Count::Wake),
        _ => {}
    }
    if let (State::Erasing { reason, .. }, false) = (&after.state, matches!(before.state, State::Erasing { .. })) {
        metrics::counter!(m::ERASES, "reason" => reason.as_str()).increment(1);
    }
    // whatever way it was erased (with machines or not), its logs go
    if matches!(after.state, State::Erased { .. } | State::Gone { .. }) {
        if let Err(e) = crate::logs::remove(store, &after.id).await {
            tracing::warn!(preview = %after.id, error = %e, "dropping an erased preview's logs failed");
        }
    }
    if let Some(what) = count {
        if let Err(e) = bump(store, &after.project_id, what, now).await {
            tracing::warn!(preview = %after.id, error = %e, "counting a build or wake failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_week_sums_the_last_seven_days() {
        let mut d = Days::default();
        for day in 0..10 {
            d.0.insert(day, Counts { builds: 1, wakes: day });
        }
        let now = 9 * DAY_MS + 5;
        assert_eq!(d.week(now), Counts { builds: 7, wakes: 3 + 4 + 5 + 6 + 7 + 8 + 9 });
    }
}
