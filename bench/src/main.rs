//! `chatgate-bench`: the load generator behind `make bench`. It starts the chatgate
//! service, the FastAPI peer and a bare axum baseline, one at a time on free loopback
//! ports, drives each with the same authenticated WebSocket load, and prints service /
//! peer ratios against the service's performance targets.

mod client;
mod phases;
mod replicas;
mod report;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use client::{Endpoint, TokenMint};
use report::{Machine, Report, Settings, TargetReport};
use server::{Server, TargetSpec};

/// The secret the FastAPI peer uses by default; both servers verify with it.
const DEFAULT_SECRET: &str = "bench-secret-0123456789abcdef-0123456789";

#[derive(Debug, Parser)]
#[command(about = "Benchmarks chatgate-service against the FastAPI peer and a bare axum server")]
struct Args {
    /// The chatgate-service binary (release build). Its column is left empty without it.
    #[arg(long)]
    service_bin: Option<PathBuf>,
    /// Extra environment for the service, KEY=VALUE (repeatable).
    #[arg(long = "service-env", value_parser = parse_env)]
    service_env: Vec<(String, String)>,
    /// `uvicorn` of a virtualenv with fastapi, `uvicorn[standard]`, pyjwt, websockets.
    #[arg(long)]
    peer_uvicorn: Option<PathBuf>,
    /// Directory holding `fastapi_ws.py`.
    #[arg(long)]
    peer_app_dir: Option<PathBuf>,
    /// The `chatgate-bench-baseline` binary (bare axum ping/pong).
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// HS256 secret shared by the load generator and the servers.
    #[arg(long, default_value = DEFAULT_SECRET)]
    jwt_secret: String,
    /// Length of each ping/pong phase.
    #[arg(long, default_value_t = 5.0)]
    ping_seconds: f64,
    /// Open connections during the ping/pong phases, one phase per value.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    ping_connections: Vec<usize>,
    /// Connections opened (and closed) in the connect phase.
    #[arg(long, default_value_t = 2000)]
    connects: usize,
    /// Connections being opened at once in the connect phase.
    #[arg(long, default_value_t = 50)]
    connect_concurrency: usize,
    /// Idle connections held for the memory phase.
    #[arg(long, default_value_t = 4000)]
    idle_connections: usize,
    /// Cold starts per server; the median is reported.
    #[arg(long, default_value_t = 5)]
    cold_starts: usize,
    /// What was measured (e.g. `git describe --always --dirty`), kept in the report.
    #[arg(long, default_value = "")]
    revision: String,
    /// Rounds; each measures every server in turn, and the table shows the median
    /// of the rounds, so load that comes and goes on the machine hits every server.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Servers to measure (columns), by name.
    #[arg(long, value_delimiter = ',', default_value = "chatgate,peer,axum-bare")]
    servers: Vec<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Instead of the comparison: two pods of the service on one PostgreSQL
    /// (fan-out delay, events relayed, round trips on two pods against one).
    #[arg(long)]
    replicas: bool,
    /// Users in the fan-out measurement, each with a socket on each pod.
    #[arg(long, default_value_t = 20)]
    replica_users: usize,
    /// Runs each of those users starts.
    #[arg(long, default_value_t = 10)]
    replica_runs: usize,
    /// Clients in the round-trip measurement.
    #[arg(long, default_value_t = 20)]
    round_trip_clients: usize,
    /// Length of each round-trip measurement.
    #[arg(long, default_value_t = 5.0)]
    round_trip_seconds: f64,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    raise_open_files_limit();
    // Dropping `run` on Ctrl-C drops every `Server` guard, which kills its process.
    let outcome = tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; servers stopped");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatgate-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.replicas {
        return run_replicas(&args).await;
    }
    let settings = Settings {
        revision: args.revision.clone(),
        rounds: args.rounds.max(1),
        ping_seconds: args.ping_seconds,
        ping_connections: args.ping_connections.clone(),
        connects: args.connects,
        connect_concurrency: args.connect_concurrency,
        idle_connections: args.idle_connections,
        cold_starts: args.cold_starts,
    };
    let machine = Machine::this_one();
    let mint = TokenMint::new(&args.jwt_secret);
    let specs = specs(&args);
    let mut rounds = Vec::with_capacity(settings.rounds);
    for round in 1..=settings.rounds {
        eprintln!("round {round}/{}", settings.rounds);
        let mut reports = Vec::new();
        for (name, spec) in &specs {
            if !args.servers.iter().any(|s| s == name) {
                continue;
            }
            let report = match spec {
                Some(spec) => measure(spec, &settings, &mint).await,
                None => {
                    let mut r = TargetReport::new(name);
                    r.errors.push("not run: no binary given".into());
                    r
                }
            };
            reports.push(report);
        }
        rounds.push(reports);
    }
    let servers = report::combine_rounds(&rounds);
    let rows = report::rows(&servers, &settings);
    let report = Report {
        machine,
        settings,
        servers,
        rows,
        rounds,
    };
    publish(&args, &report, || {
        format!(
            "revision {}; machine: {} CPUs, {}; load average at start {}; median of {} rounds\n\n{}",
            report.settings.revision,
            report.machine.cpus,
            report.machine.cpu_model,
            report.machine.load_average_at_start,
            report.settings.rounds,
            report::render_table(&report),
        )
    })
}

/// Writes the report to `--json-out`, and prints it as JSON (`--json`) or as `table`.
fn publish(
    args: &Args,
    report: &impl serde::Serialize,
    table: impl FnOnce() -> String,
) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        println!("{}", table());
    }
    Ok(())
}

async fn run_replicas(args: &Args) -> Result<()> {
    let service = args
        .service_bin
        .as_ref()
        .context("--replicas measures the service: pass --service-bin")?;
    let settings = replicas::ReplicaSettings {
        users: args.replica_users,
        runs_per_user: args.replica_runs,
        round_trip_clients: args.round_trip_clients,
        round_trip_seconds: args.round_trip_seconds,
    };
    let mint = TokenMint::new(&args.jwt_secret);
    let report = replicas::run(service, &args.jwt_secret, &settings, &mint).await?;
    publish(args, &report, || {
        format!(
            "revision {}\n\n{}",
            args.revision,
            replicas::render(&report)
        )
    })
}

/// The three servers, in column order; `None` when its program was not given.
fn specs(args: &Args) -> Vec<(&'static str, Option<TargetSpec>)> {
    let service = args.service_bin.as_ref().map(|program| {
        let mut env: Vec<(String, String)> = [
            ("CHATGATE_LISTEN", "{addr}"),
            ("CHATGATE_JWT_SECRET", args.jwt_secret.as_str()),
            ("CHATGATE_ENV", "development"),
            ("CHATGATE_LOG_FORMAT", "json"),
            ("RUST_LOG", "warn"),
            ("CHATGATE_IDLE_TIMEOUT_SECONDS", "3600"),
            ("CHATGATE_TERMINATION_LOG", "{dir}/termination-log"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        env.extend(args.service_env.iter().cloned());
        TargetSpec {
            name: report::SERVICE.into(),
            program: program.clone(),
            args: Vec::new(),
            env,
            greets: true,
        }
    });
    let peer = args.peer_uvicorn.as_ref().map(|uvicorn| TargetSpec {
        name: report::PEER.into(),
        program: uvicorn.clone(),
        args: [
            "--app-dir",
            // The server runs in a directory of its own: pass an absolute path.
            &std::path::absolute(args.peer_app_dir.as_deref().unwrap_or(".".as_ref()))
                .unwrap_or_default()
                .display()
                .to_string(),
            "fastapi_ws:app",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        .map(str::to_owned)
        .to_vec(),
        env: vec![("JWT_SECRET".into(), args.jwt_secret.clone())],
        greets: false,
    });
    let baseline = args.baseline_bin.as_ref().map(|program| TargetSpec {
        name: report::BASELINE.into(),
        program: program.clone(),
        args: vec!["--listen".into(), "{addr}".into()],
        env: Vec::new(),
        greets: false,
    });
    vec![
        (report::SERVICE, service),
        (report::PEER, peer),
        (report::BASELINE, baseline),
    ]
}

/// All phases against one server: cold starts, then connect churn and ping/pong on
/// one instance, then idle memory on a fresh instance (so earlier phases' freed
/// memory does not hide what idle connections cost).
async fn measure(spec: &TargetSpec, settings: &Settings, mint: &TokenMint) -> TargetReport {
    let mut report = TargetReport::new(&spec.name);
    let name = &spec.name;

    eprintln!("[{name}] cold starts x{}", settings.cold_starts);
    for _ in 0..settings.cold_starts {
        match Server::start(spec).await {
            Ok((server, took)) => {
                report.cold_start_ms.push(took.as_secs_f64() * 1e3);
                server.stop().await;
            }
            Err(e) => {
                report.errors.push(format!("start: {e:#}"));
                return report;
            }
        }
    }
    report.cold_start_median_ms = report::median(&report.cold_start_ms);

    match Server::start(spec).await {
        Ok((server, _)) => {
            let endpoint = Endpoint {
                addr: server.addr(),
                greets: spec.greets,
            };
            eprintln!(
                "[{name}] connects: {} at concurrency {}",
                settings.connects, settings.connect_concurrency
            );
            let churn = if settings.connects == 0 {
                None
            } else {
                Some(
                    phases::connect_churn(
                        endpoint,
                        server.pid(),
                        mint,
                        settings.connects,
                        settings.connect_concurrency,
                    )
                    .await,
                )
            };
            match churn {
                Some(Ok(stats)) => report.connects = Some(stats),
                Some(Err(e)) => report.errors.push(format!("connects: {e:#}")),
                None => {}
            }
            for &connections in settings.ping_connections.iter().filter(|&&n| n > 0) {
                eprintln!(
                    "[{name}] ping/pong: {connections} connections for {}s",
                    settings.ping_seconds
                );
                let window = Duration::from_secs_f64(settings.ping_seconds);
                match phases::ping_throughput(endpoint, server.pid(), mint, connections, window)
                    .await
                {
                    Ok(stats) => report.ping.push(stats),
                    Err(e) => report.errors.push(format!("ping @{connections}: {e:#}")),
                }
            }
            server.stop().await;
        }
        Err(e) => report.errors.push(format!("start: {e:#}")),
    }

    eprintln!(
        "[{name}] idle memory: {} connections",
        settings.idle_connections
    );
    match Server::start(spec).await {
        Ok((server, _)) => {
            let endpoint = Endpoint {
                addr: server.addr(),
                greets: spec.greets,
            };
            match phases::idle_memory(endpoint, server.pid(), mint, settings.idle_connections).await
            {
                Ok(stats) => report.idle = Some(stats),
                Err(e) => report.errors.push(format!("idle memory: {e:#}")),
            }
            server.stop().await;
        }
        Err(e) => report.errors.push(format!("start: {e:#}")),
    }
    report
}

/// Thousands of connections need thousands of descriptors in this process and in the
/// servers it starts (they inherit the limit): raise the soft limit to the hard one.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the `rlimit` struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
