//! What every scenario prints besides its own table: the targets with their verdicts, the
//! machine, and the load average (other work on the machine skews pacing figures).

use serde::Serialize;
use serde_json::{json, Value};

pub use crate::host::loadavg;

use crate::host;

/// One target, its verdict, and what was measured.
#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

impl Target {
    pub fn new(
        what: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        met: bool,
    ) -> Target {
        Target {
            what: what.into(),
            target: target.into(),
            measured: measured.into(),
            met,
        }
    }
}

pub fn print_targets(targets: &[Target]) {
    println!("load average (1, 5, 15 min) at the end: {}", loadavg());
    for t in targets {
        println!(
            "target {} {}: {}, {}",
            t.what,
            t.target,
            t.measured,
            if t.met { "met" } else { "MISSED" }
        );
    }
}

/// nproc, CPU model and memory, for the record.
pub fn machine() -> Value {
    let (nproc, cpu, mem_gib) = host::host();
    json!({
        "nproc": nproc, "cpu": cpu, "mem_gib": (mem_gib * 10.0).round() / 10.0,
        "summary": format!("{nproc} CPUs ({cpu}), {mem_gib:.1} GiB RAM"),
    })
}

/// `numbers` joined by spaces, for per-second series.
pub fn series<T: std::fmt::Display>(numbers: impl IntoIterator<Item = T>) -> String {
    numbers
        .into_iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}
