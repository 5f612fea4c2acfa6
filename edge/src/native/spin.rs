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
//! Spinning spends CPU that is idle anyway only while the machine has some: under
//! load, a spinning thread would take the CPU from the processes it waits for (the
//! origin, other edge threads). [`Gate`] samples the machine's idle time every second
//! from `/proc/stat`, counting the spinners' own time as idle, and lets the spinners
//! run only while at least [`MIN_IDLE`] of it was idle. An idle edge does not spin at
//! all (there is no last event within the window).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Spinning is allowed while at least this share of the machine's CPU time (spinning
/// counted as idle) was idle over the last sample.
pub const MIN_IDLE: f64 = 0.2;

/// Samples shorter than this are not taken (`/proc/stat` counts in 10 ms ticks).
const MIN_SAMPLE: Duration = Duration::from_millis(500);

/// Whether the machine has idle CPU for spinning; shared by the edge threads.
pub struct Gate {
    open: AtomicBool,
    /// Nanoseconds spent spinning, all threads together.
    spun_ns: AtomicU64,
    last: Mutex<Option<Sample>>,
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    /// `/proc/stat` ticks: all CPU time, and idle (with I/O wait).
    total: u64,
    idle: u64,
    spun_ns: u64,
}

impl Gate {
    /// Closed until the first two samples say otherwise.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate { open: AtomicBool::new(false), spun_ns: AtomicU64::new(0), last: Mutex::new(None) })
    }

    pub fn open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a sample of `/proc/stat` if the last one is old enough, and opens or
    /// closes the gate by the idle share since then. Without `/proc/stat` (not Linux)
    /// the gate stays closed.
    pub fn sample(&self) {
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return };
        let Some((total, idle)) = cpu_ticks(&stat) else { return };
        let now = Sample { at: Instant::now(), total, idle, spun_ns: self.spun_ns.load(Ordering::Relaxed) };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = *last {
            if now.at.duration_since(prev.at) < MIN_SAMPLE {
                return;
            }
            let open = idle_share(prev, now).is_some_and(|idle| idle >= MIN_IDLE);
            self.open.store(open, Ordering::Relaxed);
        }
        *last = Some(now);
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
        Rc::new(Spin { window, gate, last: Cell::new(Instant::now()), events: Cell::new(0), parked: Cell::new(None) })
    }

    /// Work happened now: spin for the window from here.
    #[inline]
    pub fn touch(&self) {
        // under load (the gate closed) not even the clock is read
        if self.window.is_zero() || !self.gate.open() {
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
                // a turn in which no event came was spent spinning
                if self.events.get() == seen {
                    spun += now.saturating_duration_since(before);
                }
                (before, seen) = (now, self.events.get());
                if !self.hot(now) {
                    break;
                }
            }
            self.gate.spun_ns.fetch_add(spun.as_nanos() as u64, Ordering::Relaxed);
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
        let at = Instant::now();
        let prev = Sample { at, total: 1000, idle: 500, spun_ns: 0 };
        // 200 ticks, 10 idle, 90 ticks (900 ms) of them spun
        let now = Sample { at, total: 1200, idle: 510, spun_ns: 900_000_000 };
        assert_eq!(idle_share(prev, now), Some(0.5));
        // saturated
        let now = Sample { at, total: 1200, idle: 505, spun_ns: 0 };
        assert!(idle_share(prev, now).unwrap() < MIN_IDLE);
        // counters that went back (a container moved) or no time passed: no verdict
        assert_eq!(idle_share(prev, Sample { at, total: 900, idle: 400, spun_ns: 0 }), None);
        assert_eq!(idle_share(prev, prev), None);
    }

    #[test]
    fn a_closed_gate_or_zero_window_never_spins() {
        let gate = Gate::new();
        let spin = Spin::new(Duration::from_secs(60), gate.clone());
        spin.touch();
        assert!(!spin.hot(Instant::now()), "closed until sampled");
        gate.open.store(true, Ordering::Relaxed);
        assert!(spin.hot(Instant::now()));
        assert!(!spin.hot(Instant::now() + Duration::from_secs(61)), "window over");
        let off = Spin::new(Duration::ZERO, gate);
        off.touch();
        assert!(!off.hot(Instant::now()));
    }
}
