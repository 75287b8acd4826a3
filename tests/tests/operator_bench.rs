//! Operator benchmark (not a timed test): 500 ChatServices applied at once against
//! the real control plane, with the release operator binary as a separate process.
//!
//! Reports: time until every ChatService has `status.observedGeneration ==
//! metadata.generation` and its Deployment, Service and ConfigMap exist; where the
//! time to `Ready` goes (every Deployment created, every Deployment rolled out by its
//! own status, every ChatService Ready, and per ChatService the operator's lag from
//! its Deployment rolling out to its `Ready`); the operator's peak RSS (`VmHWM`); and
//! write requests the API server served during a full no-op resync. Run with `make bench-operator`, i.e.
//! `cargo build --release -p chatgate-operator && cargo test --release -p chatgate-tests
//! --test operator_bench -- --ignored --nocapture` (`BENCH_CHATSERVICES`,
//! `BENCH_REPLICAS` override the defaults 500 and 0).

mod operator_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chatgate_operator::crd::ChatService;
use chatgate_operator::meta;
use chatgate_tests::http::get_local as http_get;
use chatgate_tests::proc_stats;
use chatgate_tests::{ControlPlane, TestNamespace, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use operator_support::status_log::{Side, StatusLog, lags, quantile};
use operator_support::*;

const WRITE_VERBS: &[&str] = &["POST", "PUT", "PATCH", "APPLY", "DELETE"];
const RESOURCES: &[&str] = &[
    "chatservices",
    "deployments",
    "services",
    "configmaps",
    "poddisruptionbudgets",
];
/// The resync period the benchmark runs the operator with, so a full no-op resync
/// happens within the run.
const RESYNC_SECONDS: u64 = 20;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn operator_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CHATGATE_OPERATOR_BIN") {
        return Ok(p.into());
    }
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("chatgate-operator");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("no chatgate-operator binary: cargo build --release -p chatgate-operator")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `apiserver_request_total` summed by (verb, resource), over every code and scope.
async fn api_server_requests(client: &Client) -> Result<BTreeMap<(String, String), f64>> {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await?;
    let mut total = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |n: &str| {
            labels
                .split(&format!("{n}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        *total
            .entry((label("verb"), label("resource")))
            .or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(total)
}

/// Write requests the API server served for the operator's kinds so far.
async fn api_server_writes(client: &Client) -> Result<f64> {
    Ok(api_server_requests(client)
        .await?
        .iter()
        .filter(|((verb, resource), _)| {
            WRITE_VERBS.contains(&verb.as_str()) && RESOURCES.contains(&resource.as_str())
        })
        .map(|(_, n)| n)
        .sum())
}

/// The requests served between two counts, per (verb, resource), most first, for
/// the operator's kinds and those the controller-manager writes for them.
fn requests_between(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = after
        .iter()
        .filter(|((_, resource), _)| {
            RESOURCES.contains(&resource.as_str())
                || ["replicasets", "events", "secrets", "pods"].contains(&resource.as_str())
        })
        .map(|((verb, resource), n)| {
            let was = before
                .get(&(verb.clone(), resource.clone()))
                .copied()
                .unwrap_or(0.0);
            (format!("{verb} {resource}"), n - was)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// The operator's peak resident set in KiB (`VmHWM`), 0 when it cannot be read.
fn peak_rss_kib(pid: u32) -> u64 {
    proc_stats::peak_rss_bytes(pid).map_or(0, |b| b / 1024)
}

/// The CPU seconds of every process that takes part, and of the machine, at one
/// moment; two of them give what each spent in between.
struct CpuSample {
    processes: Vec<(String, Option<Duration>)>,
    machine: Option<Duration>,
    at: Instant,
}

impl CpuSample {
    fn take(processes: &[(String, u32)]) -> CpuSample {
        CpuSample {
            processes: processes
                .iter()
                .map(|(name, pid)| (name.clone(), proc_stats::cpu_time(*pid).ok()))
                .collect(),
            machine: proc_stats::machine_busy_time().ok(),
            at: Instant::now(),
        }
    }

    /// `cpu_s_<process>` for each process and `machine_busy_cores` between `self` and
    /// `later`.
    fn spent_until(&self, later: &CpuSample) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .processes
            .iter()
            .zip(&later.processes)
            .map(|((name, a), (_, b))| {
                let spent = a.zip(*b).map_or("n/a".to_owned(), |(a, b)| {
                    format!("{:.1}", b.saturating_sub(a).as_secs_f64())
                });
                (format!("cpu_s_{name}"), spent)
            })
            .collect();
        let wall = later.at.saturating_duration_since(self.at).as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = self
            .machine
            .zip(later.machine)
            .map_or("n/a".to_owned(), |(a, b)| {
                let busy = b.saturating_sub(a).as_secs_f64();
                format!("{:.2} of {cores}", busy / wall.max(f64::EPSILON))
            });
        out.push(("machine_busy_cores".to_owned(), busy));
        out
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What kube-controller-manager's log says of its own client's rate limiter: how many
/// "client-side throttling" lines it wrote (at the default verbosity client-go logs
/// waits over a second, at most one every 10 s), and the longest wait among them.
fn client_side_throttling(log: &std::path::Path) -> (usize, f64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut lines = 0;
    let mut longest: f64 = 0.0;
    for line in text
        .lines()
        .filter(|l| l.contains("client-side throttling"))
    {
        lines += 1;
        // `"Waited before sending request" delay="1.19s" reason="client-side throttling, …"`
        let waited = line
            .split("delay=")
            .nth(1)
            .map(|r| r.trim_start_matches('"'))
            .and_then(|r| r.split(['"', ' ']).next())
            .and_then(go_duration_seconds);
        longest = longest.max(waited.unwrap_or(0.0));
    }
    (lines, longest)
}

/// Seconds in a Go duration such as `1.5s`, `980ms` or `1m2.5s`.
fn go_duration_seconds(d: &str) -> Option<f64> {
    let (minutes, rest) = match d.split_once('m') {
        Some((m, r)) if !r.starts_with('s') => (m.parse::<f64>().ok()?, r),
        _ => (0.0, d),
    };
    let seconds = if let Some(ms) = rest.strip_suffix("ms") {
        ms.parse::<f64>().ok()? / 1000.0
    } else if let Some(s) = rest.strip_suffix('s') {
        s.parse::<f64>().ok()?
    } else if rest.is_empty() {
        0.0
    } else {
        return None;
    };
    Some(minutes * 60.0 + seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench-operator"]
async fn bench_500_chatservices_applied_at_once() -> Result<()> {
    let count = env_or("BENCH_CHATSERVICES", 500);
    let replicas = env_or("BENCH_REPLICAS", 0) as i32;
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = TestNamespace::new(cp, "op-bench").await?;
    let admin = cp.client();

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let binary = operator_binary()?;
    let log = std::fs::File::create(cp.dir().join("bench-operator.log"))?;
    let child = Command::new(&binary)
        .args([
            "run",
            "--namespace",
            ns.name(),
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--resync-seconds",
            &RESYNC_SECONDS.to_string(),
            "--identity",
            "bench",
            "--concurrency",
            "16",
        ])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    let _child = Killed(child);
    wait_until(
        TIMEOUT,
        "the operator to lead with synced watches",
        || async move {
            Ok(http_get(port, "/readyz")
                .await
                .ok()
                .filter(|(c, b)| *c == 200 && b.contains("leader"))
                .map(|_| ()))
        },
    )
    .await?;
    let rss_idle = peak_rss_kib(pid);

    // Every Deployment's and ChatService's changes, from before the first create.
    let log = StatusLog::start(admin.clone(), ns.name()).await?;

    // Apply them all at once (32 requests in flight).
    let api: Api<ChatService> = ns.api(admin.clone());
    let mut processes = cp.pids();
    processes.push(("operator".to_owned(), pid));
    processes.push(("bench".to_owned(), std::process::id()));
    let cpu_at_start = CpuSample::take(&processes);
    let requests_at_start = api_server_requests(&admin).await?;
    let started = Instant::now();
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..count {
        let (api, in_flight) = (api.clone(), in_flight.clone());
        creates.spawn(async move {
            let _permit = in_flight.acquire_owned().await;
            let cs = ChatService::test(&format!("chat-{i:04}"))
                .replicas(replicas)
                .build();
            api.create(&PostParams::default(), &cs).await.map(|_| ())
        });
    }
    while let Some(done) = creates.join_next().await {
        done??;
    }
    let applied_in = started.elapsed();

    let (deployments, services, config_maps): (Api<Deployment>, Api<Service>, Api<ConfigMap>) = (
        ns.api(admin.clone()),
        ns.api(admin.clone()),
        ns.api(admin.clone()),
    );
    let managed = ListParams::default().labels(&meta::managed_selector());
    let progress = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = progress.clone();
    let converged = wait_until(
        Duration::from_secs(300),
        "every ChatService observed with its children",
        || {
            let (api, deployments, services, config_maps, managed, seen) = (
                api.clone(),
                deployments.clone(),
                services.clone(),
                config_maps.clone(),
                managed.clone(),
                seen.clone(),
            );
            async move {
                let all = api.list(&ListParams::default()).await?;
                let observed = all
                    .items
                    .iter()
                    .filter(|cs| {
                        cs.status.as_ref().and_then(|s| s.observed_generation)
                            == cs.metadata.generation
                    })
                    .count();
                let d = deployments.list_metadata(&managed).await?.items.len();
                let s = services.list_metadata(&managed).await?.items.len();
                let c = config_maps.list_metadata(&managed).await?.items.len();
                *seen.lock().unwrap() =
                    format!("{observed} observed, {d} Deployments, {s} Services, {c} ConfigMaps");
                Ok((observed >= count && d >= count && s >= count && c >= count).then_some(()))
            }
        },
    )
    .await;
    if let Err(e) = converged {
        let log = std::fs::read_to_string(cp.dir().join("bench-operator.log")).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "{e}\nprogress: {}\noperator log tail:\n{}",
            progress.lock().unwrap(),
            tail.join("\n")
        );
    }
    let converged_in = started.elapsed();
    let rss_peak = peak_rss_kib(pid);

    // Settle: every ChatService Ready and no reconcile in flight, so the resync below
    // finds nothing to do.
    wait_until(
        Duration::from_secs(300),
        "every ChatService Ready and the operator idle",
        || {
            let api = api.clone();
            async move {
                let all = api.list(&ListParams::default()).await?;
                if all.items.iter().filter(|cs| ready_now(cs)).count() < count {
                    return Ok(None);
                }
                let (_, m) = http_get(port, "/metrics").await?;
                let (started, done) = (
                    metric(&m, "chatgate_operator_reconciles_total"),
                    metric(&m, "chatgate_operator_reconciles_completed_total"),
                );
                Ok((started == done).then_some(()))
            }
        },
    )
    .await?;
    let settled_in = started.elapsed();
    let cpu_spent = cpu_at_start.spent_until(&CpuSample::take(&processes));
    let requests_until_settled =
        requests_between(&requests_at_start, &api_server_requests(&admin).await?);
    let (_, m) = http_get(port, "/metrics").await?;
    let reconciles_until_settled = metric(&m, "chatgate_operator_reconciles_completed_total");

    // Where the time to Ready went: the deployment controller (Deployment created →
    // rolled out by its own status) and the operator (rolled out → ChatService Ready).
    wait_until(
        TIMEOUT,
        "the status log to see every Deployment rolled out and every ChatService Ready",
        || {
            let log = &log;
            async move {
                Ok((log.first_up(Side::Deployment).len() >= count
                    && log.first_up(Side::ChatService).len() >= count)
                    .then_some(()))
            }
        },
    )
    .await?;
    let created = log.appeared(Side::Deployment);
    let rolled_out = log.first_up(Side::Deployment);
    let ready = log.first_up(Side::ChatService);
    let last = |m: &BTreeMap<String, Instant>| {
        m.values()
            .max()
            .map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64())
    };
    let operator_lags: Vec<f64> = lags(&rolled_out, &ready).into_values().collect();
    let controller_times: Vec<f64> = lags(&created, &rolled_out).into_values().collect();
    let ms = |q: f64| {
        format!(
            "{:.0}",
            1000.0 * quantile(&operator_lags, q).unwrap_or(f64::NAN)
        )
    };
    let secs = |q: f64| format!("{:.1}", quantile(&controller_times, q).unwrap_or(f64::NAN));
    let throttling = client_side_throttling(&cp.dir().join("logs/kube-controller-manager.log"));

    // A full no-op resync: every ChatService reconciled once more, nothing changed.
    let (_, m) = http_get(port, "/metrics").await?;
    let completed = metric(&m, "chatgate_operator_reconciles_completed_total");
    let before = api_server_writes(&admin).await?;
    let operator_writes_before = metric(&m, "chatgate_operator_writes_total");
    let resync_started = Instant::now();
    wait_until(
        Duration::from_secs(RESYNC_SECONDS * 6),
        "a full periodic resync",
        || async move {
            let (_, m) = http_get(port, "/metrics").await?;
            Ok((metric(&m, "chatgate_operator_reconciles_completed_total")
                >= completed + count as f64)
                .then_some(()))
        },
    )
    .await?;
    let resync_in = resync_started.elapsed();
    let after = api_server_writes(&admin).await?;
    let (_, m) = http_get(port, "/metrics").await?;
    let operator_writes_after = metric(&m, "chatgate_operator_writes_total");
    let duration_sum = metric(&m, "chatgate_operator_reconcile_duration_seconds_sum");
    let duration_count = metric(&m, "chatgate_operator_reconcile_duration_seconds_count");
    let rss_end = peak_rss_kib(pid);

    let report: BTreeMap<&str, String> = BTreeMap::from([
        ("chatservices", count.to_string()),
        ("replicas_each", replicas.to_string()),
        (
            "create_requests_done_s",
            format!("{:.2}", applied_in.as_secs_f64()),
        ),
        (
            "all_observed_with_children_s",
            format!("{:.2}", converged_in.as_secs_f64()),
        ),
        (
            "operator_peak_rss_mib",
            format!("{:.1}", rss_end.max(rss_peak) as f64 / 1024.0),
        ),
        (
            "operator_rss_idle_mib",
            format!("{:.1}", rss_idle as f64 / 1024.0),
        ),
        ("noop_resync_reconciles", count.to_string()),
        (
            "all_ready_and_idle_s",
            format!("{:.2}", settled_in.as_secs_f64()),
        ),
        (
            "all_deployments_created_s",
            format!("{:.2}", last(&created)),
        ),
        (
            "all_deployments_available_s",
            format!("{:.2}", last(&rolled_out)),
        ),
        ("all_ready_s", format!("{:.2}", last(&ready))),
        ("operator_lag_p50_ms", ms(0.5)),
        ("operator_lag_p99_ms", ms(0.99)),
        ("operator_lag_max_ms", ms(1.0)),
        ("deployment_controller_p50_s", secs(0.5)),
        ("deployment_controller_max_s", secs(1.0)),
        ("kcm_throttled_log_lines", throttling.0.to_string()),
        ("kcm_longest_throttle_s", format!("{:.1}", throttling.1)),
        (
            "noop_resync_duration_s",
            format!("{:.2}", resync_in.as_secs_f64()),
        ),
        (
            "noop_resync_apiserver_writes",
            format!("{}", after - before),
        ),
        (
            "noop_resync_operator_writes",
            format!("{}", operator_writes_after - operator_writes_before),
        ),
        (
            "mean_reconcile_ms",
            format!("{:.2}", 1000.0 * duration_sum / duration_count.max(1.0)),
        ),
        ("operator_binary", binary.display().to_string()),
    ]);
    println!("\n== operator benchmark ==");
    for (k, v) in &report {
        println!("{k:32} {v}");
    }
    // Until every ChatService was Ready and the operator idle: who spent the CPU.
    for (k, v) in &cpu_spent {
        println!("{k:32} {v}");
    }
    println!(
        "{:32} {reconciles_until_settled}",
        "reconciles_until_settled"
    );
    // The requests the API server served meanwhile (the bench's own polls included).
    for (what, n) in &requests_until_settled {
        println!("{:32} {n}", format!("requests {what}"));
    }
    assert_eq!(after - before, 0.0, "a no-op resync wrote");
    Ok(())
}
