//! `cargo run --release -p wakegate-testkit --bin cost-sim [-- --seed N --days D --per-weekday N]`:
//! a simulated week of previews against the fake Hetzner API; prints a Markdown report
//! of billed server-hours and wake times for each way of sleeping.

use wakegate_testkit::costsim::{report, Timings, Workload};

fn main() {
    let mut w = Workload::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--seed", Some(v)) => w.seed = v,
            ("--days", Some(v)) if v > 0 => w.days = v,
            ("--per-weekday", Some(v)) => w.per_weekday = v as u32,
            _ => {
                eprintln!("usage: cost-sim [--seed N] [--days D] [--per-weekday N]");
                std::process::exit(2);
            }
        }
    }
    print!("{}", report(&w, &Timings::default()));
}
