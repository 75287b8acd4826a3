//! Two pods of the service on one real PostgreSQL, as a production ChatService runs:
//! how long a run's event takes to reach the user's socket on the other pod after it
//! reached the socket on the pod running the run (the fan-out's cost), how many
//! events per second reach the other pod, whether any is lost or duplicated, and
//! chat round trips per second with the clients on two pods against one.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Endpoint, TokenMint, Ws};
use crate::report::median;
use crate::server::{Server, TargetSpec};

/// What the two-pod run measured.
#[derive(Debug, Serialize)]
pub struct ReplicaReport {
    pub users: usize,
    pub runs_per_user: usize,
    pub runs: usize,
    /// Events the other pod's sockets received (each compared with the sender's).
    pub remote_events: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    /// Arrival on the other pod minus arrival on the running pod, per event.
    pub fanout_p50_ms: Option<f64>,
    pub fanout_p99_ms: Option<f64>,
    pub fanout_max_ms: Option<f64>,
    pub remote_events_per_second: f64,
    pub round_trip_clients: usize,
    pub round_trip_seconds: f64,
    /// Chat round trips (user_message → agent_completed) per second, all clients on one pod.
    pub round_trips_one_pod: f64,
    /// The same clients, half on each pod.
    pub round_trips_two_pods: f64,
}

/// The knobs of the two-pod run.
pub struct ReplicaSettings {
    pub users: usize,
    pub runs_per_user: usize,
    pub round_trip_clients: usize,
    pub round_trip_seconds: f64,
}

/// Starts PostgreSQL and two pods of `service_bin`, and measures.
pub async fn run(
    service_bin: &Path,
    jwt_secret: &str,
    settings: &ReplicaSettings,
    mint: &TokenMint,
) -> Result<ReplicaReport> {
    let pg = chatgate_tests::Postgres::start().context("starting PostgreSQL")?;
    let url = pg
        .create_database("bench")
        .context("creating the database")?;
    let spec = TargetSpec {
        name: "chatgate-pod".into(),
        program: service_bin.to_path_buf(),
        args: Vec::new(),
        env: [
            ("CHATGATE_LISTEN", "{addr}"),
            ("CHATGATE_JWT_SECRET", jwt_secret),
            ("CHATGATE_DATABASE_URL", url.as_str()),
            ("CHATGATE_RUNS_PER_MINUTE", "100000"),
            ("CHATGATE_MAX_CONNECTIONS_PER_USER", "64"),
            ("CHATGATE_LOG_FORMAT", "json"),
            ("RUST_LOG", "warn"),
            ("CHATGATE_TERMINATION_LOG", "{dir}/termination-log"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect(),
        greets: true,
    };
    let (a, _) = Server::start(&spec).await.context("starting pod a")?;
    let (b, _) = Server::start(&spec).await.context("starting pod b")?;
    let at = |server: &Server| Endpoint {
        addr: server.addr(),
        greets: true,
    };

    eprintln!(
        "[replicas] fan-out: {} users, {} runs each, sender on pod a, watcher on pod b",
        settings.users, settings.runs_per_user
    );
    let tokens = mint.mint(settings.users)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for token in tokens {
        let (a, b, runs) = (at(&a), at(&b), settings.runs_per_user);
        tasks.push(tokio::spawn(
            async move { user_runs(a, b, &token, runs).await },
        ));
    }
    let mut outcome = FanOut::default();
    for task in tasks {
        let user = task.await.context("a fan-out user task")??;
        outcome.merge(user);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut delays = outcome.delays_ms.clone();
    delays.sort_by(f64::total_cmp);
    let quantile = |q: f64| -> Option<f64> {
        (!delays.is_empty()).then(|| delays[((delays.len() - 1) as f64 * q).round() as usize])
    };

    eprintln!(
        "[replicas] round trips: {} clients for {}s on one pod, then split over two",
        settings.round_trip_clients, settings.round_trip_seconds
    );
    let window = Duration::from_secs_f64(settings.round_trip_seconds);
    let one = round_trips(&[at(&a)], settings.round_trip_clients, window, mint).await?;
    let two = round_trips(&[at(&a), at(&b)], settings.round_trip_clients, window, mint).await?;
    a.stop().await;
    b.stop().await;
    drop(pg);

    Ok(ReplicaReport {
        users: settings.users,
        runs_per_user: settings.runs_per_user,
        runs: settings.users * settings.runs_per_user,
        remote_events: outcome.delays_ms.len(),
        lost: outcome.lost,
        duplicated: outcome.duplicated,
        out_of_order: outcome.out_of_order,
        fanout_p50_ms: median(&delays),
        fanout_p99_ms: quantile(0.99),
        fanout_max_ms: delays.last().copied(),
        remote_events_per_second: outcome.delays_ms.len() as f64 / elapsed,
        round_trip_clients: settings.round_trip_clients,
        round_trip_seconds: settings.round_trip_seconds,
        round_trips_one_pod: one,
        round_trips_two_pods: two,
    })
}

/// One user's fan-out results.
#[derive(Default)]
struct FanOut {
    delays_ms: Vec<f64>,
    lost: usize,
    duplicated: usize,
    out_of_order: usize,
}

impl FanOut {
    fn merge(&mut self, other: FanOut) {
        self.delays_ms.extend(other.delays_ms);
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
    }
}

/// A user with a socket on each pod: runs `runs` chats from pod a and compares what
/// each socket received, event by event.
async fn user_runs(a: Endpoint, b: Endpoint, token: &str, runs: usize) -> Result<FanOut> {
    let mut sender = client::connect(a, token).await?;
    let mut watcher = client::connect(b, token).await?;
    let mut outcome = FanOut::default();
    for round in 0..runs {
        let message =
            serde_json::json!({"type": "user_message", "content": format!("fan-out {round}")});
        sender.send(Message::text(message.to_string())).await?;
        let sent = run_frames(&mut sender).await?;
        let seen = run_frames(&mut watcher).await?;
        compare(&sent, &seen, &mut outcome);
    }
    client::close(sender).await;
    client::close(watcher).await;
    Ok(outcome)
}

/// Frames of one run with their arrival times, until `agent_completed` or `error`.
async fn run_frames(ws: &mut Ws) -> Result<Vec<(String, Instant)>> {
    let mut frames = Vec::new();
    loop {
        let message = tokio::time::timeout(client::STEP_TIMEOUT, ws.next())
            .await
            .context("no event within the step timeout")?;
        let arrived = Instant::now();
        match message {
            Some(Ok(Message::Text(text))) => {
                let kind = serde_json::from_str::<serde_json::Value>(text.as_str())?["type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let last = kind == "agent_completed" || kind == "error";
                frames.push((text.as_str().to_owned(), arrived));
                if last {
                    return Ok(frames);
                }
            }
            Some(Ok(Message::Close(close))) => bail!("closed during a run: {close:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the connection ended during a run"),
        }
    }
}

/// Matches the watcher's frames to the sender's: each exactly once, in order.
fn compare(sent: &[(String, Instant)], seen: &[(String, Instant)], outcome: &mut FanOut) {
    // Identical frames (two equal deltas) are matched in turn, from where the last
    // match ended.
    let mut next = 0;
    let mut matched = 0;
    for (frame, arrived) in seen {
        let ahead = sent[next..].iter().position(|(f, _)| f == frame);
        match ahead {
            Some(offset) => {
                if offset > 0 {
                    outcome.out_of_order += 1;
                }
                let index = next + offset;
                let delay = arrived.saturating_duration_since(sent[index].1);
                outcome.delays_ms.push(delay.as_secs_f64() * 1e3);
                next = index + 1;
                matched += 1;
            }
            // Received again, or never sent to the sender at all: an extra frame.
            None => outcome.duplicated += 1,
        }
    }
    outcome.lost += sent.len().saturating_sub(matched);
}

/// Chat round trips per second from `clients` clients spread over `pods`, each
/// sending its next message when the last one completed, for `window`.
async fn round_trips(
    pods: &[Endpoint],
    clients: usize,
    window: Duration,
    mint: &TokenMint,
) -> Result<f64> {
    let tokens = mint.mint(clients)?;
    let mut sockets = Vec::with_capacity(clients);
    for (i, token) in tokens.iter().enumerate() {
        sockets.push(client::connect(pods[i % pods.len()], token).await?);
    }
    let deadline = Instant::now() + window;
    let completed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let completed = completed.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                let message = serde_json::json!({"type": "user_message", "content": format!("round trip {n}")});
                ws.send(Message::text(message.to_string())).await?;
                let frames = run_frames(&mut ws).await?;
                if frames.last().is_some_and(|(f, _)| f.contains("\"agent_completed\"")) {
                    completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    bail!("a run did not complete: {:?}", frames.last().map(|(f, _)| f));
                }
                n += 1;
            }
            client::close(ws).await;
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await.context("a round-trip client task")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(completed.load(std::sync::atomic::Ordering::Relaxed) as f64 / elapsed)
}

/// The two-pod figures as a table, against the targets.
pub fn render(report: &ReplicaReport) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2} ms"));
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    let p50_ok = report.fanout_p50_ms.is_some_and(|v| v < 2.0);
    let p99_ok = report.fanout_p99_ms.is_some_and(|v| v < 10.0);
    let exact = report.lost == 0 && report.duplicated == 0 && report.out_of_order == 0;
    let mut out = String::new();
    out.push_str(&format!(
        "two pods on one PostgreSQL: {} users x {} runs = {} runs, {} events relayed to the other pod\n\n",
        report.users, report.runs_per_user, report.runs, report.remote_events
    ));
    out.push_str(&format!(
        "{:<44} {:>14} {:>10} {}\n",
        "metric", "value", "target", ""
    ));
    out.push_str(&format!(
        "{:<44} {:>14} {:>10} {}\n",
        "fan-out delay p50 (other pod - running pod)",
        ms(report.fanout_p50_ms),
        "< 2 ms",
        verdict(p50_ok)
    ));
    out.push_str(&format!(
        "{:<44} {:>14} {:>10} {}\n",
        "fan-out delay p99",
        ms(report.fanout_p99_ms),
        "< 10 ms",
        verdict(p99_ok)
    ));
    out.push_str(&format!(
        "{:<44} {:>14} {:>10}\n",
        "fan-out delay max",
        ms(report.fanout_max_ms),
        ""
    ));
    out.push_str(&format!(
        "{:<44} {:>14} {:>10} {}\n",
        "lost / duplicated / out of order",
        format!(
            "{} / {} / {}",
            report.lost, report.duplicated, report.out_of_order
        ),
        "0 / 0 / 0",
        verdict(exact)
    ));
    out.push_str(&format!(
        "{:<44} {:>14.0}\n",
        "events/s reaching the other pod", report.remote_events_per_second
    ));
    out.push_str(&format!(
        "{:<44} {:>14.1}\n",
        format!(
            "chat round trips/s, {} clients on one pod",
            report.round_trip_clients
        ),
        report.round_trips_one_pod
    ));
    out.push_str(&format!(
        "{:<44} {:>14.1}\n",
        "the same clients split over two pods", report.round_trips_two_pods
    ));
    let ratio = if report.round_trips_one_pod > 0.0 {
        report.round_trips_two_pods / report.round_trips_one_pod
    } else {
        0.0
    };
    out.push_str(&format!("{:<44} {:>14.2}\n", "two pods / one pod", ratio));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(names: &[&str], start: Instant) -> Vec<(String, Instant)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| ((*n).to_owned(), start + Duration::from_millis(i as u64)))
            .collect()
    }

    #[test]
    fn lost_duplicated_and_reordered_events_are_counted() {
        let t = Instant::now();
        let sent = frames(&["a", "b", "c"], t);
        let mut exact = FanOut::default();
        compare(
            &sent,
            &frames(&["a", "b", "c"], t + Duration::from_millis(1)),
            &mut exact,
        );
        assert_eq!(
            (exact.lost, exact.duplicated, exact.out_of_order),
            (0, 0, 0)
        );
        assert!(exact.delays_ms.iter().all(|d| (*d - 1.0).abs() < 1e-6));

        let mut wrong = FanOut::default();
        compare(&sent, &frames(&["a", "c", "c"], t), &mut wrong);
        // `b` never came, `c` came twice and skipped ahead of `b`.
        assert_eq!(
            (wrong.lost, wrong.duplicated, wrong.out_of_order),
            (1, 1, 1)
        );
        let mut repeated = FanOut::default();
        let twice = frames(&["x", "x"], t);
        compare(&twice, &twice, &mut repeated);
        assert_eq!((repeated.lost, repeated.duplicated), (0, 0));
        let mut short = FanOut::default();
        compare(&sent, &frames(&["a"], t), &mut short);
        assert_eq!(short.lost, 2);
    }
}
