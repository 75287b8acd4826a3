//! The phased startup: config → auth → storage → llm → bridge → supervisor →
//! validate. Each phase produces one critical service; together they form
//! [`CriticalServices`], the only value the `/ws` handler can serve with.
//!
//! A phase fails permanently (bad configuration: exit with a termination line) or
//! waits on a dependency (storage retries with backoff, visible on
//! `/health/startup`) until `CHATGATE_STARTUP_BUDGET_SECONDS` runs out.

use crate::agent::AgentSupervisor;
use crate::auth::{DevToken, JwtVerifier};
use crate::bridge::WsBridge;
use crate::config::{self, ServiceConfig};
use crate::llm::LlmClient;
use crate::metrics::Metrics;
use crate::replicas::Replicas;
use crate::store::ThreadStore;
use backon::{BackoffBuilder, ExponentialBuilder};
use chatgate_contract::{
    ConfigSet, CriticalService, HealthReport, HealthState, PhaseReport, PhaseStatus, ServiceReport,
    ServiceState, StartupPhase, TerminationMessage,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Every critical service. There is no `Option` here: a value of this type is the
/// proof that startup completed, and only [`run`] can make one.
pub struct CriticalServices {
    pub config: Arc<ServiceConfig>,
    pub verifier: JwtVerifier,
    pub store: ThreadStore,
    /// The other pods sharing the store (just this process with SQLite).
    pub replicas: Replicas,
    pub bridge: WsBridge,
    pub supervisor: AgentSupervisor,
    _built_by_startup: BuiltByStartup,
}

/// Private, so no code outside this module can assemble [`CriticalServices`].
struct BuiltByStartup;

/// What `/health/startup` and `/health/ready` report while and after startup runs.
pub struct Progress {
    started: Instant,
    inner: Mutex<ProgressInner>,
}

struct ProgressInner {
    state: HealthState,
    current: Option<StartupPhase>,
    phases: Vec<PhaseReport>,
    services: Vec<ServiceReport>,
    error: Option<String>,
    schema_version: Option<i64>,
    /// How long startup took, once complete.
    took: Option<Duration>,
}

impl Progress {
    pub fn new(started: Instant) -> Progress {
        Progress {
            started,
            inner: Mutex::new(ProgressInner {
                state: HealthState::Starting,
                current: None,
                phases: StartupPhase::ALL
                    .into_iter()
                    .map(|name| PhaseReport {
                        name,
                        status: PhaseStatus::Pending,
                        duration_ms: None,
                        attempts: 0,
                        last_error: None,
                    })
                    .collect(),
                services: CriticalService::ALL
                    .into_iter()
                    .map(|name| ServiceReport {
                        name,
                        state: ServiceState::Missing,
                    })
                    .collect(),
                error: None,
                schema_version: None,
                took: None,
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut ProgressInner) -> R) -> R {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner)
    }

    fn phase(inner: &mut ProgressInner, phase: StartupPhase) -> &mut PhaseReport {
        let index = StartupPhase::ALL
            .iter()
            .position(|p| *p == phase)
            .unwrap_or(0);
        &mut inner.phases[index]
    }

    fn begin(&self, phase: StartupPhase) {
        self.with(|inner| {
            inner.current = Some(phase);
            let report = Self::phase(inner, phase);
            report.status = PhaseStatus::Running;
            report.attempts += 1;
        });
    }

    fn retrying(&self, phase: StartupPhase, error: String) {
        self.with(|inner| {
            let report = Self::phase(inner, phase);
            report.status = PhaseStatus::Retrying;
            report.last_error = Some(error);
        });
    }

    fn again(&self, phase: StartupPhase) {
        self.with(|inner| Self::phase(inner, phase).attempts += 1);
    }

    fn done(&self, phase: StartupPhase, took: Duration) {
        self.with(|inner| {
            let report = Self::phase(inner, phase);
            report.status = PhaseStatus::Done;
            report.duration_ms = Some(took.as_millis() as u64);
            report.last_error = None;
            if let Some(service) = phase.produces()
                && let Some(s) = inner.services.iter_mut().find(|s| s.name == service)
            {
                s.state = ServiceState::Ready;
            }
        });
    }

    /// Startup failed: the report names the phase and carries the termination line.
    pub fn fail(&self, failed_in: StartupPhase, message: &TerminationMessage, took: Duration) {
        self.with(|inner| {
            inner.state = HealthState::Failed;
            inner.current = Some(message.phase);
            let report = Self::phase(inner, failed_in);
            report.status = PhaseStatus::Failed;
            report.duration_ms = Some(took.as_millis() as u64);
            report.last_error = Some(message.cause.clone());
            inner.error = Some(message.to_string());
        });
    }

    pub fn complete(&self) {
        let took = self.started.elapsed();
        self.with(|inner| {
            inner.state = HealthState::Ready;
            inner.current = None;
            inner.took = Some(took);
        });
    }

    /// Seconds startup took; while it still runs, the seconds so far.
    pub fn startup_seconds(&self) -> f64 {
        self.with(|inner| inner.took)
            .unwrap_or_else(|| self.started.elapsed())
            .as_secs_f64()
    }

    pub fn draining(&self) {
        self.with(|inner| {
            if inner.state != HealthState::Failed {
                inner.state = HealthState::Draining;
            }
        });
    }

    /// The phase running now (for the 503 body of `/ws`).
    pub fn current_phase(&self) -> Option<StartupPhase> {
        self.with(|inner| inner.current)
    }

    pub fn set_service_state(&self, service: CriticalService, state: ServiceState) {
        self.with(|inner| {
            if let Some(s) = inner.services.iter_mut().find(|s| s.name == service) {
                s.state = state;
            }
        });
    }

    pub fn report(&self) -> HealthReport {
        let uptime_ms = self.started.elapsed().as_millis() as u64;
        self.with(|inner| HealthReport {
            state: inner.state,
            phase: inner.current,
            phases: inner.phases.clone(),
            services: inner.services.clone(),
            error: inner.error.clone(),
            schema_version: inner.schema_version,
            uptime_ms,
        })
    }
}

/// A startup failure: the line for the termination log, and the phase that was
/// running when it happened (which may differ from the phase the line names: a
/// configuration problem found in `config` is attributed to the service it breaks).
#[derive(Debug)]
pub struct StartupFailure {
    pub running: StartupPhase,
    pub message: TerminationMessage,
}

/// Runs every phase in order. `deadline` (the process start plus `budget`) bounds
/// the whole startup.
pub async fn run(
    set: &ConfigSet,
    progress: &Progress,
    metrics: &Metrics,
    deadline: Instant,
    budget: Duration,
) -> Result<CriticalServices, StartupFailure> {
    let budget_note = |phase: StartupPhase, last: Option<String>| StartupFailure {
        running: phase,
        message: TerminationMessage::new(
            phase,
            phase.produces(),
            format!(
                "startup did not finish within CHATGATE_STARTUP_BUDGET_SECONDS ({}s){}; fix the dependency or raise the budget",
                budget.as_secs(),
                last.map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            ),
        ),
    };
    let phases = run_phases(set, progress, metrics, deadline);
    match tokio::time::timeout_at(deadline.into(), phases).await {
        Ok(result) => result,
        Err(_) => {
            let phase = progress.current_phase().unwrap_or(StartupPhase::Config);
            let last = progress.with(|inner| Progress::phase(inner, phase).last_error.clone());
            Err(budget_note(phase, last))
        }
    }
}

async fn run_phases(
    set: &ConfigSet,
    progress: &Progress,
    metrics: &Metrics,
    deadline: Instant,
) -> Result<CriticalServices, StartupFailure> {
    let timer = PhaseTimer { progress, metrics };

    let t = timer.begin(StartupPhase::Config);
    let config = match ServiceConfig::from_set(set) {
        Ok(c) => Arc::new(c),
        Err(problems) => {
            return Err(StartupFailure {
                running: StartupPhase::Config,
                message: config::termination_for(&problems),
            });
        }
    };
    info!(environment = %config.environment, listen = %config.listen, "configuration valid");
    timer.done(t);

    let t = timer.begin(StartupPhase::Auth);
    let (verifier, dev_token) = JwtVerifier::from_settings(&config.jwt)
        .map_err(|cause| permanent(StartupPhase::Auth, cause))?;
    if let Some(dev) = dev_token {
        print_dev_token(&dev, config.listen);
    }
    timer.done(t);

    let t = timer.begin(StartupPhase::Storage);
    let store = connect_store(&config.database_url, &timer, deadline).await?;
    progress.with(|inner| inner.schema_version = Some(store.schema_version()));
    let replicas = join_replicas(&store, &timer, deadline).await?;
    timer.done(t);

    let t = timer.begin(StartupPhase::Llm);
    let llm = LlmClient::from_config(
        config.llm.provider.as_str(),
        config.llm.api_key.clone(),
        &config.llm.base_url,
        &config.llm.model,
    )
    .map_err(|e| permanent(StartupPhase::Llm, e.to_string()))?;
    timer.done(t);

    let t = timer.begin(StartupPhase::Bridge);
    let bridge = WsBridge::new(config.bridge.clone());
    timer.done(t);

    let t = timer.begin(StartupPhase::Supervisor);
    let supervisor = AgentSupervisor::new(store.clone(), llm, config.runs_per_minute)
        .with_page_bytes(config.bridge.max_message_bytes)
        .with_run_limits(config.run_limits)
        .with_replicas(replicas.clone());
    timer.done(t);

    // Every service exists by construction; what is left to check is that the
    // store still answers now that everything else is built.
    let t = timer.begin(StartupPhase::Validate);
    store.ping().await.map_err(|e| StartupFailure {
        running: StartupPhase::Validate,
        message: TerminationMessage::new(
            StartupPhase::Validate,
            Some(CriticalService::ThreadStore),
            e.to_string(),
        ),
    })?;
    timer.done(t);

    Ok(CriticalServices {
        config,
        verifier,
        store,
        replicas,
        bridge,
        supervisor,
        _built_by_startup: BuiltByStartup,
    })
}

fn permanent(phase: StartupPhase, cause: String) -> StartupFailure {
    StartupFailure {
        running: phase,
        message: TerminationMessage::new(phase, phase.produces(), cause),
    }
}

/// How one attempt of the storage phase failed.
enum Attempt {
    /// Waiting can help (the database is starting, unreachable for now).
    Wait(String),
    /// Only a configuration change can help.
    Fail(String),
}

/// Connects the thread store, retrying transient failures.
async fn connect_store(
    url: &str,
    timer: &PhaseTimer<'_>,
    deadline: Instant,
) -> Result<ThreadStore, StartupFailure> {
    retry_storage(timer, deadline, || async {
        ThreadStore::connect(url).await.map_err(|e| {
            if e.is_transient() {
                Attempt::Wait(e.to_string())
            } else {
                Attempt::Fail(e.to_string())
            }
        })
    })
    .await
}

/// Joins the other pods through a PostgreSQL store (its heartbeat, its listener for
/// their events), retrying like the connection itself; SQLite needs nobody.
async fn join_replicas(
    store: &ThreadStore,
    timer: &PhaseTimer<'_>,
    deadline: Instant,
) -> Result<Replicas, StartupFailure> {
    let Some(pool) = store.postgres_pool() else {
        return Ok(Replicas::single());
    };
    retry_storage(timer, deadline, || async {
        Replicas::join(pool.clone()).await.map_err(|e| {
            Attempt::Wait(format!(
                "the thread store at {} does not let this pod join the others (events, limits): {e}",
                store.target()
            ))
        })
    })
    .await
}

/// Runs a storage-phase step until it succeeds, fails for good, or the deadline ends
/// the wait, with capped exponential backoff; every retry shows on `/health/startup`.
async fn retry_storage<T, F, Fut>(
    timer: &PhaseTimer<'_>,
    deadline: Instant,
    mut attempt: F,
) -> Result<T, StartupFailure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    const PHASE: StartupPhase = StartupPhase::Storage;
    // Not jittered: each pod waits on its own, and the waits are what
    // `/health/startup` and the log show.
    let mut backoffs = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .build();
    loop {
        // One attempt may not take the whole budget: a black-holed host would
        // otherwise hide every retry from /health/startup.
        let attempt_limit = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(10));
        let error = match tokio::time::timeout(attempt_limit, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(Attempt::Wait(error))) => error,
            Ok(Err(Attempt::Fail(error))) => return Err(permanent(PHASE, error)),
            Err(_) => format!(
                "the thread store did not answer within {}s",
                attempt_limit.as_secs()
            ),
        };
        let backoff = backoffs.next().unwrap_or(Duration::from_secs(2));
        warn!(phase = %PHASE, retry_in_ms = backoff.as_millis() as u64, error = %error, "the thread store is not usable yet; retrying");
        timer.progress.retrying(PHASE, error);
        tokio::time::sleep(backoff).await;
        timer.progress.again(PHASE);
        timer.metrics.phase_attempt(PHASE);
    }
}

/// Times and logs phases, and mirrors them into health and metrics.
struct PhaseTimer<'a> {
    progress: &'a Progress,
    metrics: &'a Metrics,
}

struct Running {
    phase: StartupPhase,
    started: Instant,
}

impl PhaseTimer<'_> {
    fn begin(&self, phase: StartupPhase) -> Running {
        self.progress.begin(phase);
        self.metrics.phase_attempt(phase);
        Running {
            phase,
            started: Instant::now(),
        }
    }

    fn done(&self, running: Running) {
        let took = running.started.elapsed();
        self.progress.done(running.phase, took);
        self.metrics.phase_done(running.phase, took.as_secs_f64());
        info!(
            phase = %running.phase,
            service = running.phase.produces().map(|s| s.as_str()).unwrap_or("none"),
            duration_ms = took.as_micros() as f64 / 1000.0,
            "startup phase done"
        );
    }
}

/// The development token block `make run` shows: the token and how to connect.
fn print_dev_token(dev: &DevToken, listen: SocketAddr) {
    let host = if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    let url = format!("ws://{host}{}", chatgate_contract::paths::WS);
    let hours = dev.valid_for.as_secs() / 3600;
    println!(
        "\nCHATGATE_JWT_SECRET is not set, so this development run generated one.\n\
         Development token for user `{user}` (valid {hours}h):\n\n  {token}\n\n\
         Connect with websocat:\n\n  websocat -H 'Authorization: Bearer {token}' {url}\n\n\
         or from a browser console:\n\n  ws = new WebSocket('{url}', ['chatgate.v1', 'bearer.{token}']); ws.onmessage = e => console.log(e.data); ws.onopen = () => ws.send(JSON.stringify({{type: 'user_message', content: 'hello'}}))\n",
        user = dev.user_id,
        token = dev.token,
    );
}

/// Writes the one-line termination message Kubernetes shows in the pod status.
/// A path that cannot be written (not in a pod, read-only) is logged, not fatal:
/// the process is exiting either way.
pub fn write_termination_log(path: &str, message: &TerminationMessage) {
    if let Err(e) = std::fs::write(path, format!("{message}\n")) {
        warn!(path, error = %e, "cannot write the termination message; set CHATGATE_TERMINATION_LOG to a writable path");
    }
}
