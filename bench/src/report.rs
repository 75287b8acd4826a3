//! The benchmark's result: per-server measurements, the rows of the comparison table
//! (service / peer ratios against the targets of the service's issue), and how they
//! are printed as text or JSON.

use serde::Serialize;

use crate::phases::{ConnectStats, IdleStats, PingStats};

/// Column names; the ratio column is always `SERVICE / PEER`.
pub const SERVICE: &str = "chatgate";
pub const PEER: &str = "peer";
pub const BASELINE: &str = "axum-bare";

/// Everything measured on one server.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    /// Problems that stopped a phase; the other phases still ran.
    pub errors: Vec<String>,
    pub cold_start_ms: Vec<f64>,
    pub cold_start_median_ms: Option<f64>,
    pub connects: Option<ConnectStats>,
    pub ping: Vec<PingStats>,
    pub idle: Option<IdleStats>,
}

impl TargetReport {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            errors: Vec::new(),
            cold_start_ms: Vec::new(),
            cold_start_median_ms: None,
            connects: None,
            ping: Vec::new(),
            idle: None,
        }
    }

    fn ping_at(&self, connections: usize) -> Option<&PingStats> {
        self.ping.iter().find(|p| p.connections == connections)
    }
}

/// One server's figures over several rounds: each figure is the median of the
/// rounds' figures (cold starts: the median of every start), errors keep their round.
pub fn combine_rounds(rounds: &[Vec<TargetReport>]) -> Vec<TargetReport> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|server| {
            let runs: Vec<&TargetReport> = rounds
                .iter()
                .filter_map(|round| round.iter().find(|t| t.name == server.name))
                .collect();
            let mut combined = TargetReport::new(&server.name);
            for (i, run) in runs.iter().enumerate() {
                let round = i + 1;
                combined
                    .errors
                    .extend(run.errors.iter().map(|e| format!("round {round}: {e}")));
                combined.cold_start_ms.extend(&run.cold_start_ms);
            }
            combined.cold_start_median_ms = median(&combined.cold_start_ms);
            let connects: Vec<&ConnectStats> =
                runs.iter().filter_map(|r| r.connects.as_ref()).collect();
            combined.connects = median_connects(&connects);
            let mut levels: Vec<usize> = runs
                .iter()
                .flat_map(|r| r.ping.iter().map(|p| p.connections))
                .collect();
            levels.sort_unstable();
            levels.dedup();
            combined.ping = levels
                .into_iter()
                .filter_map(|n| {
                    let at_n: Vec<&PingStats> = runs.iter().filter_map(|r| r.ping_at(n)).collect();
                    median_ping(&at_n)
                })
                .collect();
            let idle: Vec<&IdleStats> = runs.iter().filter_map(|r| r.idle.as_ref()).collect();
            combined.idle = median_idle(&idle);
            combined
        })
        .collect()
}

fn med<T>(runs: &[&T], field: impl Fn(&T) -> f64) -> f64 {
    let values: Vec<f64> = runs.iter().map(|r| field(r)).collect();
    median(&values).unwrap_or(f64::NAN)
}

fn median_connects(runs: &[&ConnectStats]) -> Option<ConnectStats> {
    let first = runs.first()?;
    Some(ConnectStats {
        connects: first.connects,
        concurrency: first.concurrency,
        wall_seconds: med(runs, |r| r.wall_seconds),
        connects_per_second: med(runs, |r| r.connects_per_second),
        latency_p50_ms: med(runs, |r| r.latency_p50_ms),
        latency_p99_ms: med(runs, |r| r.latency_p99_ms),
        upgrade_p50_ms: med(runs, |r| r.upgrade_p50_ms),
        upgrade_p99_ms: med(runs, |r| r.upgrade_p99_ms),
        server_cpu_seconds: med(runs, |r| r.server_cpu_seconds),
        server_cpu_per_connection_us: med(runs, |r| r.server_cpu_per_connection_us),
        generator_cpu_per_connection_us: med(runs, |r| r.generator_cpu_per_connection_us),
    })
}

fn median_ping(runs: &[&PingStats]) -> Option<PingStats> {
    let first = runs.first()?;
    Some(PingStats {
        connections: first.connections,
        round_trips: med(runs, |r| r.round_trips as f64) as usize,
        wall_seconds: med(runs, |r| r.wall_seconds),
        round_trips_per_second: med(runs, |r| r.round_trips_per_second),
        latency_p50_ms: med(runs, |r| r.latency_p50_ms),
        latency_p99_ms: med(runs, |r| r.latency_p99_ms),
        server_cpu_seconds: med(runs, |r| r.server_cpu_seconds),
        server_cpu_per_round_trip_us: med(runs, |r| r.server_cpu_per_round_trip_us),
        generator_cpu_per_round_trip_us: med(runs, |r| r.generator_cpu_per_round_trip_us),
    })
}

fn median_idle(runs: &[&IdleStats]) -> Option<IdleStats> {
    let first = runs.first()?;
    Some(IdleStats {
        connections: first.connections,
        rss_before_kib: med(runs, |r| r.rss_before_kib as f64) as u64,
        rss_after_kib: med(runs, |r| r.rss_after_kib as f64) as u64,
        rss_per_connection_kib: med(runs, |r| r.rss_per_connection_kib),
        server_threads: med(runs, |r| r.server_threads as f64) as u64,
    })
}

/// What a metric must reach for the service.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Goal {
    /// No target; shown for context.
    Info,
    /// service / peer must be at least this.
    RatioAtLeast(f64),
    /// service / peer must be at most this.
    RatioAtMost(f64),
    /// The service's own figure must be at most this.
    AtMost(f64),
}

impl Goal {
    fn describe(self, unit: &str) -> String {
        match self {
            Goal::Info => String::new(),
            Goal::RatioAtLeast(r) => format!(">= {r}x peer"),
            Goal::RatioAtMost(r) => format!("<= {r}x peer"),
            Goal::AtMost(v) => format!("<= {v} {unit}"),
        }
    }
}

/// One line of the comparison table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub unit: &'static str,
    /// One value per server, in the order of the report's servers.
    pub values: Vec<(String, Option<f64>)>,
    pub ratio: Option<f64>,
    pub goal: Goal,
    pub target: String,
    /// `met`, `MISSED`, `pending` (a side was not measured) or empty for context rows.
    pub verdict: &'static str,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    /// Medians over the rounds; these fill the table.
    pub servers: Vec<TargetReport>,
    pub rows: Vec<Row>,
    /// Every round's own figures.
    pub rounds: Vec<Vec<TargetReport>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    /// `/proc/loadavg` when the run started: other work on the machine moves the
    /// throughput figures (less so the CPU-per-operation ones).
    pub load_average_at_start: String,
}

impl Machine {
    pub fn this_one() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            load_average_at_start: load
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub revision: String,
    pub rounds: usize,
    pub ping_seconds: f64,
    pub ping_connections: Vec<usize>,
    pub connects: usize,
    pub connect_concurrency: usize,
    pub idle_connections: usize,
    pub cold_starts: usize,
}

type Extract = Box<dyn Fn(&TargetReport) -> Option<f64>>;

/// The table's rows, in reading order, with the targets of the service's issue.
pub fn rows(servers: &[TargetReport], settings: &Settings) -> Vec<Row> {
    let mut specs: Vec<(String, &'static str, Goal, Extract)> = Vec::new();
    for &n in &settings.ping_connections {
        specs.push((
            format!("round trips/s @{n} conns"),
            "1/s",
            Goal::RatioAtLeast(1.8),
            Box::new(move |t| t.ping_at(n).map(|p| p.round_trips_per_second)),
        ));
        specs.push((
            format!("server CPU/round trip @{n}"),
            "us",
            Goal::RatioAtMost(0.5),
            Box::new(move |t| t.ping_at(n).map(|p| p.server_cpu_per_round_trip_us)),
        ));
        specs.push((
            format!("round trip p50 @{n}"),
            "ms",
            Goal::Info,
            Box::new(move |t| t.ping_at(n).map(|p| p.latency_p50_ms)),
        ));
        specs.push((
            format!("round trip p99 @{n}"),
            "ms",
            Goal::Info,
            Box::new(move |t| t.ping_at(n).map(|p| p.latency_p99_ms)),
        ));
    }
    specs.push((
        "connects/s".into(),
        "1/s",
        Goal::RatioAtLeast(3.0),
        Box::new(|t| t.connects.as_ref().map(|c| c.connects_per_second)),
    ));
    specs.push((
        "server CPU/connection".into(),
        "us",
        Goal::RatioAtMost(0.25),
        Box::new(|t| t.connects.as_ref().map(|c| c.server_cpu_per_connection_us)),
    ));
    specs.push((
        "connect p50".into(),
        "ms",
        Goal::Info,
        Box::new(|t| t.connects.as_ref().map(|c| c.latency_p50_ms)),
    ));
    specs.push((
        "connect p99".into(),
        "ms",
        Goal::Info,
        Box::new(|t| t.connects.as_ref().map(|c| c.latency_p99_ms)),
    ));
    specs.push((
        format!("RSS/idle conn @{}", settings.idle_connections),
        "KiB",
        Goal::AtMost(8.0),
        Box::new(|t| t.idle.as_ref().map(|i| i.rss_per_connection_kib)),
    ));
    specs.push((
        "cold start (median)".into(),
        "ms",
        Goal::AtMost(50.0),
        Box::new(|t| t.cold_start_median_ms),
    ));

    specs
        .into_iter()
        .map(|(metric, unit, goal, extract)| {
            let values: Vec<(String, Option<f64>)> = servers
                .iter()
                .map(|s| (s.name.clone(), extract(s)))
                .collect();
            let of = |name: &str| {
                values
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, v)| *v)
                    .filter(|v| v.is_finite())
            };
            let (service, peer) = (of(SERVICE), of(PEER));
            let ratio = service.zip(peer).map(|(s, p)| s / p);
            let verdict = verdict(goal, service, ratio);
            Row {
                metric,
                unit,
                values,
                ratio,
                goal,
                target: goal.describe(unit),
                verdict,
            }
        })
        .collect()
}

fn verdict(goal: Goal, service: Option<f64>, ratio: Option<f64>) -> &'static str {
    let met = match goal {
        Goal::Info => return "",
        Goal::RatioAtLeast(r) => ratio.map(|x| x >= r),
        Goal::RatioAtMost(r) => ratio.map(|x| x <= r),
        Goal::AtMost(v) => service.map(|x| x <= v),
    };
    match met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "pending",
    }
}

/// The median of the samples (the mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn number(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if !v.is_finite() => "-".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The comparison as a Markdown table (readable in a terminal, pasteable into
/// BENCHMARKS.md), followed by any errors.
pub fn render_table(report: &Report) -> String {
    let mut header = vec!["metric".to_owned(), "unit".to_owned()];
    header.extend(report.servers.iter().map(|s| s.name.clone()));
    header.extend([
        format!("{SERVICE}/{PEER}"),
        "target".to_owned(),
        "verdict".to_owned(),
    ]);
    let mut lines: Vec<Vec<String>> = vec![header];
    for row in &report.rows {
        let mut line = vec![row.metric.clone(), row.unit.to_owned()];
        line.extend(row.values.iter().map(|(_, v)| number(*v)));
        line.push(row.ratio.map_or("-".into(), |r| format!("{r:.2}x")));
        line.push(row.target.clone());
        line.push(row.verdict.to_owned());
        lines.push(line);
    }
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let format_line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                // Text columns left-aligned, figures right-aligned.
                if c == 0 || c + 2 >= columns {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    let mut out = String::new();
    out.push_str(&format_line(&lines[0]));
    out.push('\n');
    // Markdown alignment row: figures right-aligned.
    let rule: String = widths
        .iter()
        .enumerate()
        .map(|(c, &w)| {
            if c == 0 || c + 2 >= columns {
                format!("{}|", "-".repeat(w + 2))
            } else {
                format!("{}:|", "-".repeat(w + 1))
            }
        })
        .collect();
    out.push_str(&format!("|{rule}\n"));
    for line in &lines[1..] {
        out.push_str(&format_line(line));
        out.push('\n');
    }
    for server in &report.servers {
        for error in &server.errors {
            out.push_str(&format!("\n{}: {error}", server.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            revision: String::new(),
            rounds: 1,
            ping_seconds: 1.0,
            ping_connections: vec![100],
            connects: 10,
            connect_concurrency: 2,
            idle_connections: 10,
            cold_starts: 1,
        }
    }

    fn with_cold_start(name: &str, ms: f64) -> TargetReport {
        let mut t = TargetReport::new(name);
        t.cold_start_median_ms = Some(ms);
        t
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn absolute_targets_judge_the_service_alone() {
        let servers = vec![with_cold_start(SERVICE, 12.0), with_cold_start(PEER, 300.0)];
        let rows = rows(&servers, &settings());
        let cold = rows
            .iter()
            .find(|r| r.metric.starts_with("cold start"))
            .unwrap();
        assert_eq!(cold.verdict, "met");
        assert!((cold.ratio.unwrap() - 0.04).abs() < 1e-9);
    }

    #[test]
    fn a_missing_service_leaves_targets_pending() {
        let servers = vec![TargetReport::new(SERVICE), with_cold_start(PEER, 300.0)];
        let rows = rows(&servers, &settings());
        assert!(
            rows.iter()
                .all(|r| r.verdict.is_empty() || r.verdict == "pending")
        );
    }

    #[test]
    fn rounds_combine_into_medians_per_server() {
        let rounds = vec![
            vec![with_cold_start(SERVICE, 10.0), with_cold_start(PEER, 300.0)],
            vec![with_cold_start(SERVICE, 30.0), with_cold_start(PEER, 500.0)],
        ];
        let mut rounds = rounds;
        rounds[0][0].cold_start_ms = vec![10.0, 11.0];
        rounds[1][0].cold_start_ms = vec![30.0];
        rounds[1][1].errors.push("boom".into());
        let combined = combine_rounds(&rounds);
        assert_eq!(combined[0].cold_start_median_ms, Some(11.0));
        assert_eq!(combined[1].errors, vec!["round 2: boom".to_owned()]);
    }

    #[test]
    fn ratio_targets_compare_against_the_peer() {
        assert_eq!(
            verdict(Goal::RatioAtLeast(1.8), Some(2.0), Some(1.7)),
            "MISSED"
        );
        assert_eq!(verdict(Goal::RatioAtMost(0.5), Some(2.0), Some(0.4)), "met");
        assert_eq!(verdict(Goal::AtMost(8.0), Some(9.0), None), "MISSED");
    }
}
