//! What a process, or the whole machine, has consumed, read from `/proc`: CPU time
//! (all threads, user + system), resident memory and its peak. The benchmarks read
//! the server's own counters, which keeps the figures honest when the load generator
//! shares the machine's cores.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// User + system CPU time of every thread of `pid`, from `/proc/<pid>/stat`.
///
/// Resolution is one clock tick (`sysconf(_SC_CLK_TCK)`, 10 ms at 100 Hz); phases are
/// sized so they span hundreds of ticks.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
}

/// Resident set size of `pid` in bytes, from the `VmRSS` line of `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS:").map(|kib| kib * 1024)
}

/// Peak resident set size of `pid` in bytes, from the `VmHWM` line of
/// `/proc/<pid>/status`.
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    status_field(pid, "VmHWM:").map(|kib| kib * 1024)
}

/// Number of threads of `pid`, from `/proc/<pid>/status`.
pub fn threads(pid: u32) -> Result<u64> {
    status_field(pid, "Threads:")
}

/// CPU time the whole machine has spent busy, summed over its cores, from the `cpu`
/// line of `/proc/stat`: everything but idle and I/O wait.
pub fn machine_busy_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = parse_busy_ticks(&stat).context("parsing /proc/stat")?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
}

/// The number on the `key` line of `/proc/<pid>/status` (memory lines are in KiB).
fn status_field(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&status, key).with_context(|| format!("no {key} line in {path}"))
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    Duration::from_micros(ticks.saturating_mul(1_000_000) / per_second)
}

/// utime + stime (fields 14 and 15). The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Result<u64> {
    let Some(end_of_comm) = stat.rfind(')') else {
        bail!("no command name")
    };
    let fields: Vec<&str> = stat[end_of_comm + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else {
        bail!("too few fields")
    };
    Ok(utime.parse::<u64>()? + stime.parse::<u64>()?)
}

/// user, nice, system, irq, softirq and steal of the `cpu` line (guest time is
/// inside user); idle and iowait are left out.
fn parse_busy_ticks(stat: &str) -> Result<u64> {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        bail!("no cpu line")
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if ticks.len() < 8 {
        bail!("too few fields")
    }
    Ok(ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum())
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (uvicorn (w) 1) S 1 4242 4242 0 -1 4194304 100 0 0 0 \
                    250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat).unwrap(), 300);
    }

    #[test]
    fn ticks_become_microseconds() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tx\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(12345));
        assert_eq!(parse_status_kib(status, "Threads:"), Some(3));
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 9000 50 4 6 8 0 0\ncpu0 50 1 15 4500 25 2 3 4 0 0\n";
        assert_eq!(parse_busy_ticks(stat).unwrap(), 100 + 2 + 30 + 4 + 6 + 8);
        assert!(parse_busy_ticks("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(peak_rss_bytes(pid).unwrap() >= rss_bytes(pid).unwrap() / 2);
        cpu_time(pid).unwrap();
        machine_busy_time().unwrap();
    }
}
