//! The cost simulation runs the real waker and provisioner, with the Hetzner backend,
//! against the fake Hetzner API on a paused clock.

use wakegate_sim::costsim::{run_mode, Mode};
use wakegate_sim::workload::{plan, Timings, Workload};

#[test]
fn two_days_of_previews_through_the_real_control_plane() {
    let w = Workload { days: 2, per_weekday: 5, per_weekend_day: 1, ..Workload::default() };
    let t = Timings::default();
    let plans = plan(&w);
    let on = run_mode(&w, &t, Mode::AlwaysOn, &plans).unwrap();
    let hib = run_mode(&w, &t, Mode::HibernateTtl, &plans).unwrap();
    for (name, r) in [("always-on", &on), ("hibernate", &hib)] {
        eprintln!("{name}: {r:?}");
        let planned = plans.iter().map(|p| p.visits.len()).sum::<usize>();
        assert_eq!((r.visits, r.finished), (planned, planned), "{name}: every visit was made and finished");
        assert_eq!(r.api_rate_limited, 0, "{name}: never over Hetzner's hourly allowance");
        assert!(r.failed.is_empty(), "{name}: failed visits: {:?}", r.failed);
        assert_eq!(r.orphans, 0, "{name}: nothing in the cloud without a preview");
        // the reconciler keeps to its budget: a tenth of Hetzner's 3,600 an hour
        let hours = (w.days * 24) as usize;
        assert!(r.api_listings <= 360 * hours, "{name}: {} listings in {hours} h", r.api_listings);
    }
    assert_eq!(on.servers_created, plans.len() as u64, "always-on: one server per preview");
    assert!(on.wake_waits.is_empty(), "an always-on preview never sleeps");
    assert!(!hib.wake_waits.is_empty(), "hibernated previews were woken");
    // a wake from a snapshot: create from the image, boot, start the app (each ≤ 1.5×),
    // plus the polling of the create action
    let slowest = (t.create_from_snapshot + t.boot + t.app_start) * 3 / 2 + 10_000;
    assert!(hib.wake_pct(1.0).unwrap() <= slowest, "{:?}", hib.wake_waits);
    assert!(
        hib.billed_server_hours < on.billed_server_hours,
        "hibernating saves: {} vs {}",
        hib.billed_server_hours,
        on.billed_server_hours
    );
    assert!(hib.snapshot_gb_hours > 0.0);
}
