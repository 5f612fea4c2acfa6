//! A week of previews against the fake Hetzner API on simulated time: what each way of
//! sleeping costs in billed server-hours, and how long a visitor waits for a wake.
//!
//! Every server operation is a request to [`HetznerState`] (the same model the HTTP fake
//! serves) at the simulated time; the fake's own meter does the billing (a server is
//! billed from creation to deletion, running or not, each server rounded up to whole
//! hours; snapshots by the GB-hour). Action durations are the stated Hetzner timings
//! in [`Timings`]; a wake is over when the app answers (the action, the boot, the app's
//! start).

use crate::hetzner::{Durations, HetznerState};
use serde_json::{json, Value};
use std::collections::BinaryHeap;

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Never sleeps; erased when the branch merges.
    AlwaysOn,
    /// Powered off when idle (still billed); erased when the branch merges.
    Stop,
    /// Powered off when idle, and erased after the TTL.
    StopTtl,
    /// Snapshot + delete when idle; erased after the TTL.
    HibernateTtl,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::AlwaysOn, Mode::Stop, Mode::StopTtl, Mode::HibernateTtl];

    pub fn name(self) -> &'static str {
        match self {
            Mode::AlwaysOn => "always-on",
            Mode::Stop => "stop",
            Mode::StopTtl => "stop + TTL",
            Mode::HibernateTtl => "hibernate + TTL",
        }
    }
}

/// What one mode cost.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub mode: Mode,
    pub previews: usize,
    pub visits: usize,
    pub billed_server_hours: u64,
    pub server_hours: f64,
    pub snapshot_gb_hours: f64,
    /// Waits of visits that found the preview asleep (ms), sorted.
    pub wake_waits: Vec<u64>,
    /// Visits that found the preview erased by the TTL (a rebuild is offered).
    pub after_ttl: usize,
    pub api_requests: usize,
}

impl Outcome {
    pub fn wake_pct(&self, p: f64) -> Option<u64> {
        if self.wake_waits.is_empty() {
            return None;
        }
        let i = ((self.wake_waits.len() as f64 - 1.0) * p).round() as usize;
        Some(self.wake_waits[i])
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn exp(&mut self, mean: u64) -> u64 {
        (-(1.0 - self.unit()).ln() * mean as f64) as u64
    }
}

/// One preview's life: when it is created, visited and merged.
#[derive(Clone, Debug)]
pub struct Plan {
    pub arrive: u64,
    pub visits: Vec<u64>,
    pub merged: Option<u64>,
}

/// The previews of the week (the same for every mode).
pub fn plan(w: &Workload) -> Vec<Plan> {
    let mut rng = Rng(w.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
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
                t = next_work(v + rng.exp(w.session_gap_mean));
            }
            out.push(Plan { arrive, visits, merged });
        }
    }
    out.sort_by_key(|p| p.arrive);
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive,
    Visit,
    /// An operation this preview was waiting on is over.
    Done,
    IdleCheck,
    Merge,
    Ttl,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum St {
    None,
    Building,
    Running,
    Stopping,
    Hibernating,
    /// The snapshot is made; the server is being deleted.
    Deleting,
    Asleep,
    Waking,
    Erased,
}

struct Preview {
    st: St,
    server: Option<i64>,
    image: Option<i64>,
    last_active: u64,
    built_at: u64,
    /// Visits waiting for the wake under way.
    waiting: Vec<u64>,
    wake_after: bool,
}

fn req(h: &mut HetznerState, now: u64, method: &str, path: &str, body: Value) -> Value {
    let raw = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let r = h.handle(now, method, p, q, &raw);
    assert!(r.status < 400, "{method} {path}: {} {}", r.status, r.body);
    r.body
}

fn create(h: &mut HetznerState, now: u64, i: usize, image: String) -> i64 {
    let body = json!({"name": format!("wg-{i}"), "server_type": "cx22", "image": image,
        "labels": {"managed-by": "wakegate", "machine": format!("wg-{i}")}});
    req(h, now, "POST", "/v1/servers", body)["server"]["id"].as_i64().expect("server id")
}

/// A stated duration as one occurrence of it: 0.75× to 1.5× (cloud timings vary).
fn vary(rng: &mut Rng, ms: u64) -> u64 {
    (ms as f64 * (0.75 + 0.75 * rng.unit())) as u64
}

/// Starts waking an asleep preview; returns when its app answers.
fn wake(h: &mut HetznerState, now: u64, i: usize, p: &mut Preview, t: &Timings, mode: Mode, rng: &mut Rng) -> u64 {
    p.st = St::Waking;
    let rest = vary(rng, t.boot) + vary(rng, t.app_start);
    match (mode, p.server, p.image) {
        (Mode::HibernateTtl, _, Some(img)) => {
            h.durations.create_from_snapshot = vary(rng, t.create_from_snapshot);
            let d = h.durations.create_from_snapshot;
            p.server = Some(create(h, now, i, img.to_string()));
            now + d + rest
        }
        (_, Some(s), _) => {
            h.durations.power_on = vary(rng, t.power_on);
            let d = h.durations.power_on;
            req(h, now, "POST", &format!("/v1/servers/{s}/actions/poweron"), Value::Null);
            now + d + rest
        }
        _ => unreachable!("asleep without a server or a snapshot"),
    }
}

/// Runs the week in one mode.
pub fn simulate(w: &Workload, t: &Timings, mode: Mode, plans: &[Plan]) -> Outcome {
    let mut h = HetznerState::new(Durations {
        create_server: t.create,
        create_from_snapshot: t.create_from_snapshot,
        power_on: t.power_on,
        shutdown: t.shutdown,
        power_off: t.shutdown,
        create_image: t.snapshot,
        delete_server: t.delete,
        firewall: 1_000,
    });
    h.rate_limit = 3600;
    let mut rng = Rng(w.seed.wrapping_add(0x5EED) | 1);
    let mut queue: BinaryHeap<std::cmp::Reverse<(u64, Ev, usize)>> = BinaryHeap::new();
    let mut ps: Vec<Preview> = plans
        .iter()
        .map(|_| Preview {
            st: St::None,
            server: None,
            image: None,
            last_active: 0,
            built_at: 0,
            waiting: Vec::new(),
            wake_after: false,
        })
        .collect();
    for (i, p) in plans.iter().enumerate() {
        queue.push(std::cmp::Reverse((p.arrive, Ev::Arrive, i)));
        for v in &p.visits {
            queue.push(std::cmp::Reverse((*v, Ev::Visit, i)));
        }
        if let Some(m) = p.merged {
            queue.push(std::cmp::Reverse((m, Ev::Merge, i)));
        }
    }
    let ttl = matches!(mode, Mode::StopTtl | Mode::HibernateTtl);
    let sleeps = mode != Mode::AlwaysOn;
    let end = w.days * DAY;
    let mut out = Outcome {
        mode,
        previews: plans.len(),
        visits: 0,
        billed_server_hours: 0,
        server_hours: 0.0,
        snapshot_gb_hours: 0.0,
        wake_waits: Vec::new(),
        after_ttl: 0,
        api_requests: 0,
    };
    while let Some(std::cmp::Reverse((now, ev, i))) = queue.pop() {
        if now > end {
            break;
        }
        h.advance(now);
        let p = &mut ps[i];
        match ev {
            Ev::Arrive => {
                p.server = Some(create(&mut h, now, i, "ubuntu-24.04".into()));
                p.st = St::Building;
                p.built_at = now;
                p.last_active = now;
                queue.push(std::cmp::Reverse((now + t.create + t.boot + t.first_deploy, Ev::Done, i)));
                if ttl {
                    queue.push(std::cmp::Reverse((now + w.ttl, Ev::Ttl, i)));
                }
            }
            Ev::Visit => {
                out.visits += 1;
                p.last_active = now;
                match p.st {
                    St::Running | St::Building | St::None => {}
                    St::Erased => out.after_ttl += 1,
                    St::Waking => p.waiting.push(now),
                    St::Stopping | St::Hibernating | St::Deleting => {
                        p.waiting.push(now);
                        p.wake_after = true;
                    }
                    St::Asleep => {
                        p.waiting.push(now);
                        let ready = wake(&mut h, now, i, p, t, mode, &mut rng);
                        queue.push(std::cmp::Reverse((ready, Ev::Done, i)));
                    }
                }
                if sleeps && matches!(p.st, St::Running | St::Building | St::Waking) {
                    queue.push(std::cmp::Reverse((now + w.idle_timeout, Ev::IdleCheck, i)));
                }
            }
            Ev::Done => match p.st {
                St::Building | St::Waking => {
                    if p.st == St::Waking {
                        for v in p.waiting.drain(..) {
                            out.wake_waits.push(now - v);
                        }
                        if let Some(img) = p.image.take() {
                            req(&mut h, now, "DELETE", &format!("/v1/images/{img}"), Value::Null);
                        }
                    }
                    p.st = St::Running;
                    if sleeps {
                        queue.push(std::cmp::Reverse((now + w.idle_timeout, Ev::IdleCheck, i)));
                    }
                }
                St::Stopping if mode == Mode::HibernateTtl => {
                    let s = p.server.expect("a server to snapshot");
                    let body = json!({"type": "snapshot", "labels": {"managed-by": "wakegate"}});
                    let r = req(&mut h, now, "POST", &format!("/v1/servers/{s}/actions/create_image"), body);
                    p.image = r["image"]["id"].as_i64();
                    p.st = St::Hibernating;
                    queue.push(std::cmp::Reverse((now + t.snapshot, Ev::Done, i)));
                }
                St::Hibernating => {
                    let s = p.server.take().expect("a server to delete");
                    req(&mut h, now, "DELETE", &format!("/v1/servers/{s}"), Value::Null);
                    p.st = St::Deleting;
                    queue.push(std::cmp::Reverse((now + t.delete, Ev::Done, i)));
                }
                St::Stopping | St::Deleting => {
                    p.st = St::Asleep;
                    // visits that came while it went to sleep wake it at once
                    if std::mem::take(&mut p.wake_after) {
                        let ready = wake(&mut h, now, i, p, t, mode, &mut rng);
                        queue.push(std::cmp::Reverse((ready, Ev::Done, i)));
                    }
                }
                _ => {}
            },
            Ev::IdleCheck => {
                if p.st == St::Running && now >= p.last_active + w.idle_timeout {
                    let s = p.server.expect("running on a server");
                    req(&mut h, now, "POST", &format!("/v1/servers/{s}/actions/shutdown"), Value::Null);
                    p.st = St::Stopping;
                    queue.push(std::cmp::Reverse((now + t.shutdown, Ev::Done, i)));
                }
            }
            Ev::Merge | Ev::Ttl => {
                if ev == Ev::Ttl && now < p.built_at + w.ttl {
                    continue;
                }
                if p.st == St::Erased {
                    continue;
                }
                if matches!(p.st, St::Building | St::Stopping | St::Hibernating | St::Deleting | St::Waking) {
                    // the operation under way finishes first
                    queue.push(std::cmp::Reverse((now + MIN, ev, i)));
                    continue;
                }
                if let Some(s) = p.server.take() {
                    req(&mut h, now, "DELETE", &format!("/v1/servers/{s}"), Value::Null);
                }
                if let Some(img) = p.image.take() {
                    req(&mut h, now, "DELETE", &format!("/v1/images/{img}"), Value::Null);
                }
                p.waiting.clear();
                p.st = St::Erased;
            }
        }
    }
    h.advance(end);
    out.api_requests = h.calls.len();
    h.close_meter(end);
    out.billed_server_hours = h.meter.billed_server_hours;
    out.server_hours = h.meter.server_ms as f64 / HOUR as f64;
    out.snapshot_gb_hours = h.meter.snapshot_ms as f64 / HOUR as f64 * SNAPSHOT_GB;
    out.wake_waits.sort_unstable();
    out
}

/// Size of a preview's snapshot.
pub const SNAPSHOT_GB: f64 = 3.0;
/// cx22: €0.0074 per hour (≈ €4.59 a month cap), snapshots €0.011 per GB-month.
pub const EUR_PER_SERVER_HOUR: f64 = 0.0074;
pub const EUR_PER_GB_MONTH: f64 = 0.011;

/// The report as Markdown.
pub fn report(w: &Workload, t: &Timings) -> String {
    let plans = plan(w);
    let visits: usize = plans.iter().map(|p| p.visits.len()).sum();
    let mut s = String::new();
    s.push_str(&format!(
        "Workload (seed {}): {} days, {} previews ({}/weekday, {}/weekend day, arriving {}:00–{}:00), {} visits in review sessions {} h apart on average (working hours only), merged after 1–{} days ({}% never merge); idle timeout {} min, TTL {} h.\n\n",
        w.seed, w.days, plans.len(), w.per_weekday, w.per_weekend_day, w.work_start_h, w.work_end_h, visits,
        w.session_gap_mean / HOUR, w.max_life_days, w.abandoned_pct, w.idle_timeout / MIN, w.ttl / HOUR
    ));
    s.push_str(&format!(
        "Stated Hetzner timings: create {} s (from a snapshot {} s), power on {} s, shutdown {} s, snapshot {} s, delete {} s, boot {} s; the app starts again in {} s (first deploy {} s). Prices: €{}/server-hour (cx22), €{}/GB-month for {} GB snapshots.\n\n",
        t.create / 1000, t.create_from_snapshot / 1000, t.power_on / 1000, t.shutdown / 1000, t.snapshot / 1000,
        t.delete / 1000, t.boot / 1000, t.app_start / 1000, t.first_deploy / 1000, EUR_PER_SERVER_HOUR,
        EUR_PER_GB_MONTH, SNAPSHOT_GB
    ));
    s.push_str("| mode | billed server-hours | vs always-on | snapshot GB-h | € / week | visits that waited for a wake | wake p50 | wake p95 | visits after TTL | API requests |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let results: Vec<Outcome> = Mode::ALL.iter().map(|m| simulate(w, t, *m, &plans)).collect();
    let base = results[0].billed_server_hours.max(1) as f64;
    for r in &results {
        let eur =
            r.billed_server_hours as f64 * EUR_PER_SERVER_HOUR + r.snapshot_gb_hours / (30.0 * 24.0) * EUR_PER_GB_MONTH;
        let pct = |p| r.wake_pct(p).map(|ms| format!("{:.1} s", ms as f64 / 1000.0)).unwrap_or_else(|| "–".into());
        s.push_str(&format!(
            "| {} | {} | {:.2}× | {:.0} | {:.2} | {} | {} | {} | {} | {} |\n",
            r.mode.name(),
            r.billed_server_hours,
            r.billed_server_hours as f64 / base,
            r.snapshot_gb_hours,
            eur,
            r.wake_waits.len(),
            pct(0.5),
            pct(0.95),
            r.after_ttl,
            r.api_requests,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_week_is_deterministic_and_sleeping_saves() {
        let w = Workload { days: 3, per_weekday: 6, per_weekend_day: 1, ..Workload::default() };
        let t = Timings::default();
        let plans = plan(&w);
        assert_eq!(plans.len(), 18);
        let on = simulate(&w, &t, Mode::AlwaysOn, &plans);
        let stop = simulate(&w, &t, Mode::Stop, &plans);
        let hib = simulate(&w, &t, Mode::HibernateTtl, &plans);
        assert!(on.wake_waits.is_empty(), "an always-on preview never wakes");
        // stopping saves nothing on Hetzner: a stopped server is billed in full
        assert_eq!(stop.billed_server_hours, on.billed_server_hours);
        assert!(
            hib.billed_server_hours < on.billed_server_hours,
            "{} vs {}",
            hib.billed_server_hours,
            on.billed_server_hours
        );
        let slowest = (t.power_on + t.boot + t.app_start) * 3 / 2;
        assert!(stop.wake_pct(0.95).unwrap() <= slowest);
        assert!(hib.wake_pct(0.5).unwrap() > stop.wake_pct(0.5).unwrap(), "a snapshot wake is slower");
        assert_eq!(report(&w, &t), report(&w, &t));
    }
}
