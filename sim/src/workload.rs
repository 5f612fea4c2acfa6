//! The week's traffic and the stated cloud timings, shared by every mode of the cost
//! simulation: when previews are created, visited and merged.

pub const MIN: u64 = 60_000;
pub const HOUR: u64 = 60 * MIN;
pub const DAY: u64 = 24 * HOUR;

/// Stated Hetzner durations (ms) and the app's own start.
#[derive(Clone, Debug)]
pub struct Timings {
    /// create_server from a system image, to `running`.
    pub create: u64,
    /// create_server from a snapshot of a used preview disk, to `running`.
    pub create_from_snapshot: u64,
    pub power_on: u64,
    pub shutdown: u64,
    /// create_image of a preview disk.
    pub snapshot: u64,
    pub delete: u64,
    /// OS boot until the agent runs.
    pub boot: u64,
    /// First deploy: checkout, image build, database restore, start.
    pub first_deploy: u64,
    /// Starting the built app again after a stop or hibernation.
    pub app_start: u64,
}

impl Default for Timings {
    fn default() -> Timings {
        Timings {
            create: 12_000,
            create_from_snapshot: 35_000,
            power_on: 6_000,
            shutdown: 8_000,
            snapshot: 45_000,
            delete: 4_000,
            boot: 15_000,
            first_deploy: 120_000,
            app_start: 6_000,
        }
    }
}

/// The week's traffic.
#[derive(Clone, Debug)]
pub struct Workload {
    pub seed: u64,
    pub days: u64,
    /// New previews per weekday and per weekend day.
    pub per_weekday: u32,
    pub per_weekend_day: u32,
    /// Working hours (local) when previews arrive and people visit.
    pub work_start_h: u64,
    pub work_end_h: u64,
    /// Mean gap between review sessions of one preview, during working hours.
    pub session_gap_mean: u64,
    /// A branch merges (and its preview is erased) after 1..=max_life_days days.
    pub max_life_days: u64,
    /// Share of branches that never merge this week (abandoned).
    pub abandoned_pct: u32,
    pub idle_timeout: u64,
    pub ttl: u64,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            seed: 7,
            days: 7,
            per_weekday: 24,
            per_weekend_day: 3,
            work_start_h: 8,
            work_end_h: 19,
            session_gap_mean: 4 * HOUR,
            max_life_days: 4,
            abandoned_pct: 15,
            idle_timeout: 30 * MIN,
            ttl: 72 * HOUR,
        }
    }
}

pub use wakegate_testkit::Rng;

/// One preview's life: when it is created, visited and merged.
#[derive(Clone, Debug)]
pub struct Plan {
    pub arrive: u64,
    pub visits: Vec<u64>,
    pub merged: Option<u64>,
}

/// The previews of the week (the same for every mode).
pub fn plan(w: &Workload) -> Vec<Plan> {
    let mut rng = Rng::new(w.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let end = w.days * DAY;
    let work = |t: u64| {
        let h = t % DAY / HOUR;
        let weekday = (t / DAY) % 7 < 5;
        weekday && h >= w.work_start_h && h < w.work_end_h
    };
    // the next working moment at or after t
    let next_work = |mut t: u64| {
        while !work(t) && t < end + 7 * DAY {
            t = (t / HOUR + 1) * HOUR;
        }
        t
    };
    let mut out = Vec::new();
    for day in 0..w.days {
        let weekday = day % 7 < 5;
        let n = if weekday { w.per_weekday } else { w.per_weekend_day };
        for _ in 0..n {
            let span = (w.work_end_h - w.work_start_h) * HOUR;
            let arrive = day * DAY + w.work_start_h * HOUR + rng.below(span);
            let merged = if rng.below(100) < u64::from(w.abandoned_pct) {
                None
            } else {
                Some(arrive + (1 + rng.below(w.max_life_days)) * DAY - rng.below(6 * HOUR))
            };
            let until = merged.unwrap_or(end).min(end);
            let mut visits = Vec::new();
            // the author looks at it once built, then reviewers come in sessions
            let mut t = arrive + 3 * MIN + rng.below(20 * MIN);
            while t < until {
                let in_session = 1 + rng.below(5);
                let mut v = t;
                for _ in 0..in_session {
                    if v < until {
                        visits.push(v);
                    }
                    v += MIN + rng.below(4 * MIN);
                }
                let resume = v + rng.exp(w.session_gap_mean);
                t = next_work(resume);
                if t != resume {
                    // a session put off to the next working morning starts some time
                    // in its first hours, not on the stroke of the hour
                    t += rng.below(90 * MIN);
                }
            }
            out.push(Plan { arrive, visits, merged });
        }
    }
    out.sort_by_key(|p| p.arrive);
    out
}
