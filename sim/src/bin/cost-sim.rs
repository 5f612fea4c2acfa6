//! `cargo run --release -p wakegate-sim --bin cost-sim [-- --seed N --days D --per-weekday N]`:
//! a simulated week of previews run by Wakegate's own waker and provisioner against the
//! fake Hetzner API; prints a Markdown report of billed server-hours, Hetzner API
//! requests and wake times for each way of sleeping.

use wakegate_sim::costsim::report;
use wakegate_sim::workload::{Timings, Workload};

fn main() -> anyhow::Result<()> {
    let mut w = Workload::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--seed", Some(v)) => w.seed = v,
            ("--days", Some(v)) if (1..=28).contains(&v) => w.days = v,
            ("--per-weekday", Some(v)) if v <= 500 => w.per_weekday = v as u32,
            _ => {
                eprintln!("usage: cost-sim [--seed N] [--days 1..=28] [--per-weekday 0..=500]");
                std::process::exit(2);
            }
        }
    }
    print!("{}", report(&w, &Timings::default())?);
    Ok(())
}
