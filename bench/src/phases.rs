//! The measured phases run against one server: connection churn, ping/pong
//! throughput at a fixed number of connections, and memory held by idle connections.
//! Each phase is bounded in count and in time, and reads the server's CPU time or
//! RSS from `/proc` right around the measured window.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use tokio::sync::{Barrier, watch};
use tokio::task::JoinSet;

use crate::client::{self, Endpoint, STEP_TIMEOUT, TokenMint, Ws};
use chatgate_tests::proc_stats;

/// Connections opened at once while setting up a phase (not measured).
const SETUP_CONCURRENCY: usize = 50;
/// Upper bound on round trips per connection in one ping phase.
const MAX_ROUND_TRIPS_PER_CONNECTION: usize = 1_000_000;
/// Time for the server to finish tearing down closed connections before CPU is read.
const SETTLE: Duration = Duration::from_millis(200);
/// Connections opened, pinged and closed before the idle baseline RSS is read, so
/// one-time allocations (thread-locals, pools, lazy statics) are not charged to them.
const IDLE_WARMUP_CONNECTIONS: usize = 20;

/// Connection churn: authenticated upgrades (plus the first frame, for servers that
/// greet), each closed right after.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectStats {
    pub connects: usize,
    pub concurrency: usize,
    pub wall_seconds: f64,
    pub connects_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// TCP connect to `101` only; the rest of `latency` is waiting for the greeting.
    pub upgrade_p50_ms: f64,
    pub upgrade_p99_ms: f64,
    pub server_cpu_seconds: f64,
    pub server_cpu_per_connection_us: f64,
    /// The load generator's own CPU per connection: it shares the cores.
    pub generator_cpu_per_connection_us: f64,
}

/// Ping/pong throughput with a fixed number of open connections, each pinging in a
/// loop (one ping in flight per connection).
#[derive(Debug, Clone, Serialize)]
pub struct PingStats {
    pub connections: usize,
    pub round_trips: usize,
    pub wall_seconds: f64,
    pub round_trips_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub server_cpu_seconds: f64,
    pub server_cpu_per_round_trip_us: f64,
    /// The load generator's own CPU per round trip: it shares the cores.
    pub generator_cpu_per_round_trip_us: f64,
}

/// Memory held by idle authenticated connections.
#[derive(Debug, Clone, Serialize)]
pub struct IdleStats {
    pub connections: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_connection_kib: f64,
    pub server_threads: u64,
}

/// Opens `count` connections (`concurrency` at a time), closes each at once, and
/// charges the server's CPU time over the whole churn to the connections.
pub async fn connect_churn(
    endpoint: Endpoint,
    pid: u32,
    mint: &TokenMint,
    count: usize,
    concurrency: usize,
) -> Result<ConnectStats> {
    let tokens = Arc::new(mint.mint(count)?);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = proc_stats::cpu_time(pid)?;
    let own_before = proc_stats::cpu_time(std::process::id())?;
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let (tokens, next) = (tokens.clone(), next.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut upgrades = Vec::new();
            let mut closing = JoinSet::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = tokens.get(i) else { break };
                let t = Instant::now();
                let (ws, upgraded) = client::connect_timed(endpoint, token).await?;
                latencies.push(t.elapsed());
                upgrades.push(upgraded);
                // Close concurrently, as departing clients do, while the next connects.
                closing.spawn(client::close(ws));
            }
            let connected_by = Instant::now();
            closing.join_all().await;
            anyhow::Ok((latencies, upgrades, connected_by))
        });
    }
    let mut latencies = Vec::with_capacity(count);
    let mut upgrades: Vec<u32> = Vec::with_capacity(count);
    let mut last_connect = start;
    while let Some(joined) = workers.join_next().await {
        let (lat, upgraded, connected_by) = joined??;
        latencies.extend(lat);
        upgrades.extend(upgraded.into_iter().map(as_micros));
        last_connect = last_connect.max(connected_by);
    }
    tokio::time::sleep(SETTLE).await;
    let cpu = proc_stats::cpu_time(pid)?.saturating_sub(cpu_before);
    let own = proc_stats::cpu_time(std::process::id())?.saturating_sub(own_before);
    let wall = last_connect - start;
    let mut micros: Vec<u32> = latencies.iter().map(|d| as_micros(*d)).collect();
    micros.sort_unstable();
    upgrades.sort_unstable();
    Ok(ConnectStats {
        connects: latencies.len(),
        concurrency,
        wall_seconds: wall.as_secs_f64(),
        connects_per_second: latencies.len() as f64 / wall.as_secs_f64(),
        latency_p50_ms: percentile_ms(&micros, 0.50),
        latency_p99_ms: percentile_ms(&micros, 0.99),
        upgrade_p50_ms: percentile_ms(&upgrades, 0.50),
        upgrade_p99_ms: percentile_ms(&upgrades, 0.99),
        server_cpu_seconds: cpu.as_secs_f64(),
        server_cpu_per_connection_us: cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64,
        generator_cpu_per_connection_us: own.as_secs_f64() * 1e6 / latencies.len().max(1) as f64,
    })
}

/// Opens `connections`, warms each with one round trip, then has all of them ping in
/// a loop for `duration`; the server's CPU time over that window is divided by the
/// round trips completed in it.
pub async fn ping_throughput(
    endpoint: Endpoint,
    pid: u32,
    mint: &TokenMint,
    connections: usize,
    duration: Duration,
) -> Result<PingStats> {
    let sockets = open_many(endpoint, mint, connections).await?;
    let ready = Arc::new(Barrier::new(sockets.len() + 1));
    let (go, window) = watch::channel(None::<Instant>);
    let mut pingers = JoinSet::new();
    for mut ws in sockets {
        let (ready, mut window) = (ready.clone(), window.clone());
        pingers.spawn(async move {
            let warm = client::ping(&mut ws).await;
            // Reach the barrier even after a failure, so the others are not stranded.
            ready.wait().await;
            warm?;
            let end = (*window.wait_for(Option::is_some).await?).context("no window")?;
            let mut latencies: Vec<u32> = Vec::with_capacity(4096);
            while Instant::now() < end && latencies.len() < MAX_ROUND_TRIPS_PER_CONNECTION {
                let t = Instant::now();
                client::ping(&mut ws).await?;
                latencies.push(as_micros(t.elapsed()));
            }
            anyhow::Ok((ws, latencies, Instant::now()))
        });
    }
    tokio::time::timeout(STEP_TIMEOUT * 2, ready.wait())
        .await
        .context("connections did not all answer a first ping")?;
    let cpu_before = proc_stats::cpu_time(pid)?;
    let own_before = proc_stats::cpu_time(std::process::id())?;
    let start = Instant::now();
    go.send(Some(start + duration))?;

    let mut latencies = Vec::new();
    let mut finished = start;
    let mut sockets = Vec::with_capacity(connections);
    let mut first_error = None;
    while let Some(joined) = pingers.join_next().await {
        match joined? {
            Ok((ws, lat, done)) => {
                sockets.push(ws);
                latencies.extend(lat);
                finished = finished.max(done);
            }
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    let cpu = proc_stats::cpu_time(pid)?.saturating_sub(cpu_before);
    let own = proc_stats::cpu_time(std::process::id())?.saturating_sub(own_before);
    close_all(sockets).await;
    if let Some(e) = first_error {
        return Err(e.context("a connection failed during the ping phase"));
    }
    let wall = finished - start;
    latencies.sort_unstable();
    let round_trips = latencies.len();
    Ok(PingStats {
        connections,
        round_trips,
        wall_seconds: wall.as_secs_f64(),
        round_trips_per_second: round_trips as f64 / wall.as_secs_f64(),
        latency_p50_ms: percentile_ms(&latencies, 0.50),
        latency_p99_ms: percentile_ms(&latencies, 0.99),
        server_cpu_seconds: cpu.as_secs_f64(),
        server_cpu_per_round_trip_us: cpu.as_secs_f64() * 1e6 / round_trips.max(1) as f64,
        generator_cpu_per_round_trip_us: own.as_secs_f64() * 1e6 / round_trips.max(1) as f64,
    })
}

/// Warms the server with a few connections, then opens `connections` idle ones and
/// charges the growth of the server's RSS to them.
pub async fn idle_memory(
    endpoint: Endpoint,
    pid: u32,
    mint: &TokenMint,
    connections: usize,
) -> Result<IdleStats> {
    let mut warmup = open_many(endpoint, mint, IDLE_WARMUP_CONNECTIONS).await?;
    for ws in &mut warmup {
        client::ping(ws).await?;
    }
    close_all(warmup).await;
    tokio::time::sleep(SETTLE).await;

    let rss_before = proc_stats::rss_bytes(pid)?;
    let sockets = open_many(endpoint, mint, connections).await?;
    let (stop, stopped) = watch::channel(false);
    let mut holders = JoinSet::new();
    for ws in sockets {
        holders.spawn(client::hold_idle(ws, stopped.clone()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = proc_stats::rss_bytes(pid)?;
    let server_threads = proc_stats::threads(pid)?;
    stop.send(true)?;
    let _ = tokio::time::timeout(STEP_TIMEOUT * 2, holders.join_all()).await;
    Ok(IdleStats {
        connections,
        rss_before_kib: rss_before / 1024,
        rss_after_kib: rss_after / 1024,
        rss_per_connection_kib: (rss_after as f64 - rss_before as f64)
            / 1024.0
            / connections as f64,
        server_threads,
    })
}

/// Opens `count` authenticated connections, `SETUP_CONCURRENCY` at a time.
async fn open_many(endpoint: Endpoint, mint: &TokenMint, count: usize) -> Result<Vec<Ws>> {
    let tokens = Arc::new(mint.mint(count)?);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..SETUP_CONCURRENCY.min(count) {
        let (tokens, next) = (tokens.clone(), next.clone());
        workers.spawn(async move {
            let mut opened = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = tokens.get(i) else { break };
                match client::connect(endpoint, token).await {
                    Ok(ws) => opened.push(ws),
                    Err(e) => return (opened, Some(e.context(format!("opening connection {i}")))),
                }
            }
            (opened, None)
        });
    }
    let mut sockets = Vec::with_capacity(count);
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        let (opened, error) = joined?;
        sockets.extend(opened);
        first_error = first_error.or(error);
    }
    if let Some(e) = first_error {
        close_all(sockets).await;
        return Err(e);
    }
    Ok(sockets)
}

/// Closes every socket, `SETUP_CONCURRENCY` at a time.
async fn close_all(sockets: Vec<Ws>) {
    let sockets = Arc::new(std::sync::Mutex::new(sockets));
    let mut workers = JoinSet::new();
    for _ in 0..SETUP_CONCURRENCY {
        let sockets = sockets.clone();
        workers.spawn(async move {
            loop {
                let next = sockets.lock().map_err(|_| anyhow!("poisoned"))?.pop();
                let Some(ws) = next else { break };
                client::close(ws).await;
            }
            anyhow::Ok(())
        });
    }
    workers.join_all().await;
}

fn as_micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted_micros: &[u32], q: f64) -> f64 {
    if sorted_micros.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_micros.len() as f64).ceil() as usize).clamp(1, sorted_micros.len());
    f64::from(sorted_micros[rank - 1]) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&samples, 0.50), 50.0);
        assert_eq!(percentile_ms(&samples, 0.99), 99.0);
        assert_eq!(percentile_ms(&[7000], 0.99), 7.0);
        assert!(percentile_ms(&[], 0.5).is_nan());
    }
}
