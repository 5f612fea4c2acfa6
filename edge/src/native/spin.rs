//! Busy-polling for a moment after an edge thread last had work, while the machine
//! has CPU to spare.
//!
//! On a virtual machine, a vCPU with nothing to run halts, and waking it again for
//! the next packet (an interrupt through the host, a VM entry) takes tens of
//! microseconds. A proxied request waits twice, for the origin's response and for the
//! client's next request, and at low load those wake-ups are most of the latency a
//! proxy adds. For `window` after the last request or origin response, the thread's
//! spinner keeps the runtime polling the OS for readiness with a zero timeout instead
//! of sleeping, so a packet that arrives meanwhile is picked up at once (HAProxy's
//! `busy-polling` does this always).
//!
//! Spinning spends CPU that is idle anyway, and only while the machine has some:
//! under load, a spinning thread would take the CPU from the processes it waits for
//! (the origin, other edge threads). [`Gate`] samples the machine's idle time once a
//! second from `/proc/stat` (one sampler task, on the first edge thread), counting the
//! spinners' own empty turns as idle. It opens at [`OPEN_IDLE`] idle and closes below
//! [`CLOSE_IDLE`] (the gap keeps it from flapping). In a cgroup with a CPU quota
//! (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), the gate never opens: the host's idle time
//! says nothing about the quota, and spinning would spend it. An idle edge does not
//! spin at all (there is no last event within the window).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The gate opens when at least this share of the machine's CPU time (empty spinning
/// turns counted as idle) was idle over the last sample...
pub const OPEN_IDLE: f64 = 0.3;
/// ...and closes when less than this was.
pub const CLOSE_IDLE: f64 = 0.2;

/// How often the gate is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A turn of the spinner longer than this did something else than poll (the thread
/// was preempted, or other tasks worked): it is not counted as idle.
const MAX_EMPTY_TURN: Duration = Duration::from_micros(50);

/// Spinning time is added to the gate's count once this much has gathered.
const REPORT_SPUN: Duration = Duration::from_millis(1);

/// Whether the machine has idle CPU for spinning; shared by the edge threads.
pub struct Gate {
    open: AtomicBool,
    /// Nanoseconds spent spinning, all threads together.
    spun_ns: AtomicU64,
}

#[derive(Clone, Copy)]
struct Sample {
    /// `/proc/stat` ticks: all CPU time, and idle (with I/O wait).
    total: u64,
    idle: u64,
    spun_ns: u64,
}

impl Gate {
    /// Closed until the sampler's first two samples say otherwise.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate { open: AtomicBool::new(false), spun_ns: AtomicU64::new(0) })
    }

    /// Samples every [`SAMPLE_EVERY`] until dropped (one sampler for all the edge's
    /// threads), opening or closing the gate by the idle share since the last sample.
    /// Under a CPU quota, or without `/proc/stat` (not Linux), the gate stays closed.
    pub async fn sampler(self: Arc<Self>) {
        if cpu_quota() {
            return tracing::info!("busy-polling off: this process runs under a CPU quota (cgroup)");
        }
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prev = None;
        loop {
            every.tick().await;
            let Some(now) = self.sample() else { continue };
            if let Some(prev) = prev {
                let open = self.open.load(Ordering::Relaxed);
                self.open.store(next_open(open, idle_share(prev, now)), Ordering::Relaxed);
            }
            prev = Some(now);
        }
    }

    pub fn open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// The machine's CPU ticks now, and the spinners' time so far.
    fn sample(&self) -> Option<Sample> {
        let (total, idle) = cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
        Some(Sample { total, idle, spun_ns: self.spun_ns.load(Ordering::Relaxed) })
    }
}

/// The idle share of the CPU time between two samples, spinning counted as idle.
fn idle_share(prev: Sample, now: Sample) -> Option<f64> {
    let total = now.total.checked_sub(prev.total)?;
    if total == 0 {
        return None;
    }
    let idle = now.idle.checked_sub(prev.idle)?;
    // a tick is 10 ms (USER_HZ is 100 on Linux)
    let spun = now.spun_ns.saturating_sub(prev.spun_ns) / 10_000_000;
    Some(((idle + spun) as f64 / total as f64).min(1.0))
}

/// Whether the gate is open after a sample: it opens at [`OPEN_IDLE`] and closes below
/// [`CLOSE_IDLE`]; a sample with no verdict closes it.
fn next_open(open: bool, idle: Option<f64>) -> bool {
    match idle {
        None => false,
        Some(idle) if open => idle >= CLOSE_IDLE,
        Some(idle) => idle >= OPEN_IDLE,
    }
}

/// Whether this process's cgroup caps its CPU time: v2 `cpu.max` not `max`, or v1
/// `cpu.cfs_quota_us` not -1.
fn cpu_quota() -> bool {
    let Ok(cgroups) = std::fs::read_to_string("/proc/self/cgroup") else { return false };
    cgroups.lines().any(|line| {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let path = path.trim_end_matches('/');
        let read = |file: String| std::fs::read_to_string(file).ok();
        if controllers.is_empty() {
            read(format!("/sys/fs/cgroup{path}/cpu.max")).is_some_and(|max| quota_set(&max))
        } else if controllers.split(',').any(|c| c == "cpu") {
            [format!("/sys/fs/cgroup/{controllers}{path}"), format!("/sys/fs/cgroup/cpu{path}")]
                .into_iter()
                .find_map(|dir| read(format!("{dir}/cpu.cfs_quota_us")))
                .is_some_and(|q| quota_set(&q))
        } else {
            false
        }
    })
}

/// `cpu.max` reads `max 100000` without a quota and `50000 100000` with one;
/// `cpu.cfs_quota_us` reads `-1` without one.
fn quota_set(value: &str) -> bool {
    value.split_ascii_whitespace().next().is_some_and(|q| q != "max" && q != "-1")
}

/// All and idle ticks from the `cpu` line of `/proc/stat`: user, nice, system, idle,
/// iowait, irq, softirq, steal (guest time is already in user).
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_ascii_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    Some((v.iter().sum(), v[3] + v[4]))
}

/// One edge thread's spinner.
pub struct Spin {
    window: Duration,
    gate: Arc<Gate>,
    last: Cell<Instant>,
    /// Events seen (requests and origin responses), to tell a spin from work.
    events: Cell<u64>,
    /// The spinner's waker while it waits for work.
    parked: Cell<Option<Waker>>,
}

impl Spin {
    pub fn new(window: Duration, gate: Arc<Gate>) -> Rc<Spin> {
        // no event yet: as if the last was a window ago
        let last = Instant::now().checked_sub(window).unwrap_or_else(Instant::now);
        Rc::new(Spin { window, gate, last: Cell::new(last), events: Cell::new(0), parked: Cell::new(None) })
    }

    /// Work happened now: spin for the window from here.
    #[inline]
    pub fn touch(&self) {
        // under load (the gate closed) not even the clock is read; with no window the
        // sampler never runs and the gate stays closed
        if !self.gate.open() {
            return;
        }
        self.last.set(Instant::now());
        self.events.set(self.events.get().wrapping_add(1));
        if let Some(w) = self.parked.take() {
            w.wake();
        }
    }

    fn hot(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last.get()) < self.window && self.gate.open()
    }

    fn report(&self, spun: &mut Duration) {
        self.gate.spun_ns.fetch_add(spun.as_nanos() as u64, Ordering::Relaxed);
        *spun = Duration::ZERO;
    }

    /// Runs on the edge thread until the thread ends (with a zero window it returns at
    /// once).
    pub async fn run(self: Rc<Self>) {
        if self.window.is_zero() {
            return;
        }
        loop {
            std::future::poll_fn(|cx| {
                if self.hot(Instant::now()) {
                    Poll::Ready(())
                } else {
                    self.parked.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            let (mut before, mut seen, mut spun) = (Instant::now(), self.events.get(), Duration::ZERO);
            loop {
                // tokio polls the OS for readiness (zero timeout) before it polls a
                // yielded task again
                tokio::task::yield_now().await;
                let now = Instant::now();
                // a short turn in which no event came was spent spinning
                let turn = now.saturating_duration_since(before);
                if self.events.get() == seen && turn <= MAX_EMPTY_TURN {
                    spun += turn;
                }
                (before, seen) = (now, self.events.get());
                // reported as it gathers, so a long stretch of spinning reads as idle
                // in the sample it falls in
                if spun >= REPORT_SPUN {
                    self.report(&mut spun);
                }
                if !self.hot(now) {
                    break;
                }
            }
            self.report(&mut spun);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_line() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\nintr 1\n";
        assert_eq!(cpu_ticks(stat), Some((990, 820)));
        assert_eq!(cpu_ticks("cpu  1 2\n"), None);
        assert_eq!(cpu_ticks("cpu  1 2 x 4 5\n"), None);
        assert_eq!(cpu_ticks("intr 1\n"), None);
    }

    #[test]
    fn spinning_counts_as_idle() {
        let prev = Sample { total: 1000, idle: 500, spun_ns: 0 };
        // 200 ticks, 10 idle, 90 ticks (900 ms) of them spun
        let now = Sample { total: 1200, idle: 510, spun_ns: 900_000_000 };
        assert_eq!(idle_share(prev, now), Some(0.5));
        // saturated
        let now = Sample { total: 1200, idle: 505, spun_ns: 0 };
        assert!(idle_share(prev, now).unwrap() < CLOSE_IDLE);
        // counters that went back (a container moved) or no time passed: no verdict
        assert_eq!(idle_share(prev, Sample { total: 900, idle: 400, spun_ns: 0 }), None);
        assert_eq!(idle_share(prev, prev), None);
    }

    #[test]
    fn the_gate_opens_and_closes_at_different_shares() {
        assert!(!next_open(false, Some(0.25)), "not open below OPEN_IDLE");
        assert!(next_open(false, Some(0.3)));
        assert!(next_open(true, Some(0.25)), "stays open down to CLOSE_IDLE");
        assert!(!next_open(true, Some(0.1)));
        assert!(!next_open(true, None), "no verdict closes it");
    }

    #[test]
    fn a_cpu_quota_is_read_from_cpu_max() {
        assert!(!quota_set("max 100000\n"));
        assert!(quota_set("50000 100000\n"));
        assert!(!quota_set(""));
        assert!(!quota_set("-1\n"));
        assert!(quota_set("200000\n"));
    }

    #[test]
    fn spins_only_after_an_event_and_while_the_gate_is_open() {
        let gate = Gate::new();
        let window = Duration::from_secs(60);
        let spin = Spin::new(window, gate.clone());
        gate.open.store(true, Ordering::Relaxed);
        assert!(!spin.hot(Instant::now()), "no event yet");
        gate.open.store(false, Ordering::Relaxed);
        spin.touch();
        gate.open.store(true, Ordering::Relaxed);
        assert!(!spin.hot(Instant::now()), "an event while the gate was shut is not counted");
        spin.touch();
        assert!(spin.hot(Instant::now()));
        assert!(!spin.hot(Instant::now() + window + Duration::from_secs(1)), "window over");
        gate.open.store(false, Ordering::Relaxed);
        assert!(!spin.hot(Instant::now()), "the gate shut");
        let off = Spin::new(Duration::ZERO, gate.clone());
        gate.open.store(true, Ordering::Relaxed);
        off.touch();
        assert!(!off.hot(Instant::now()));
    }

    fn parked(spin: &Spin) -> bool {
        let w = spin.parked.take();
        let parked = w.is_some();
        spin.parked.set(w);
        parked
    }

    /// The spinner on a real runtime: parked until an event, spinning (its empty turns
    /// counted) for the window, parked again after it.
    #[test]
    fn the_spinner_runs_for_the_window_and_parks() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let gate = Gate::new();
            gate.open.store(true, Ordering::Relaxed);
            let spin = Spin::new(Duration::from_millis(20), gate.clone());
            tokio::task::spawn_local(spin.clone().run());
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(parked(&spin), "parked before any event");
            spin.touch();
            tokio::task::yield_now().await;
            assert!(!parked(&spin), "spinning after an event");
            // parked again after the window (bounded: a loaded machine may hold the
            // thread back for a while)
            let t0 = Instant::now();
            while !parked(&spin) {
                assert!(t0.elapsed() < Duration::from_secs(10), "still spinning 10 s after a 20 ms window");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(t0.elapsed() >= Duration::from_millis(15), "parked before the window was over");
            assert!(gate.spun_ns.load(Ordering::Relaxed) > 0, "empty turns were counted");
        })
    }
}
