//! CPU time and memory of a process, and the machine's CPU use, read from `/proc`: for the
//! benches that run the daemon as its own process and report what it costs.

use std::time::Duration;

/// User plus system CPU time of process `pid` (`self` for this one) so far; zero if unreadable.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces:
    // state is field 3, utime field 14 and stime field 15 of the whole line.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks =
        |index: usize| -> u64 { fields.get(index).and_then(|f| f.parse().ok()).unwrap_or(0) };
    ticks_to_duration(ticks(11) + ticks(12))
}

/// A `kB` field of `/proc/PID/status`, such as `VmRSS:`, in bytes; 0 if unreadable.
pub fn status_bytes(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The machine's CPU time so far, from the first line of `/proc/stat`: (busy, total), where
/// busy leaves out idle and I/O wait.
pub fn machine_cpu() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (
        ticks_to_duration(total.saturating_sub(idle)),
        ticks_to_duration(total),
    )
}

/// `/proc` counts CPU time in USER_HZ ticks, 100 a second on every Linux architecture.
const TICKS_PER_SECOND: u64 = 100;

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks * (1000 / TICKS_PER_SECOND))
}
