//! The HTTP side: the routes and the process lifecycle (bind first, start up,
//! serve, drain on SIGTERM/SIGINT, exit).
//!
//! The listener is bound before any startup phase runs, so `/health/live` and
//! `/health/startup` answer from the first milliseconds and a slow dependency is
//! visible instead of a connection refused.

use crate::instance::ServiceInstance;
use crate::logging::{self, LogFormat};
use crate::startup;
use crate::ws;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chatgate_contract::config::Key;
use chatgate_contract::{ConfigSet, CriticalService, HealthReport, ServiceState, paths};
use futures::FutureExt;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tracing::{Instrument, debug, error, info, warn};

/// The key a listen failure names, as the contract spells it.
const LISTEN_KEY: &str = Key::Listen.as_str();

/// How long stopping agent runs and closing open sockets with 1012 may take,
/// together, before the process exits anyway (the drain delay comes before this).
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long a readiness check may wait on the thread store.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

fn router(instance: Arc<ServiceInstance>) -> Router {
    Router::new()
        .route(paths::HEALTH_LIVE, get(live))
        .route(paths::HEALTH_STARTUP, get(startup_health))
        .route(paths::HEALTH_READY, get(ready))
        .route(paths::HEALTH, get(ready))
        .route(paths::METRICS, get(metrics))
        .route(
            paths::WS,
            get(ws::upgrade).route_layer(axum::middleware::from_fn_with_state(
                instance.clone(),
                count_upgrade,
            )),
        )
        .layer(axum::middleware::from_fn(cloud_trace))
        .with_state(instance)
}

/// Serves a request inside a span carrying its `X-Cloud-Trace-Context`, so every line
/// logged for it (a WebSocket's whole life too) correlates with the platform's trace.
async fn cloud_trace(request: Request, next: axum::middleware::Next) -> Response {
    let trace = request
        .headers()
        .get(logging::CLOUD_TRACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(logging::CloudTrace::parse);
    let Some(trace) = trace else {
        return next.run(request).await;
    };
    let span = tracing::info_span!(
        "request",
        trace_id = %trace.trace_id,
        span_id = tracing::field::Empty,
        trace_sampled = trace.sampled,
    );
    if let Some(id) = &trace.span_id {
        span.record(logging::SPAN_ID_FIELD, id.as_str());
    }
    next.run(request).instrument(span).await
}

async fn live() -> &'static str {
    "ok"
}

fn health(status: StatusCode, report: HealthReport) -> Response {
    let mut response = (status, axum::Json(report)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn startup_health(State(instance): State<Arc<ServiceInstance>>) -> Response {
    let report = instance.progress.report();
    // Startup stays complete while draining: a startup probe that failed now would
    // only make Kubernetes restart a pod that is shutting down on purpose.
    let status = if instance.started() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    health(status, report)
}

async fn ready(State(instance): State<Arc<ServiceInstance>>) -> Response {
    let Some(services) = instance.serving() else {
        return health(StatusCode::SERVICE_UNAVAILABLE, instance.progress.report());
    };
    let store_ok = matches!(
        tokio::time::timeout(READY_CHECK_TIMEOUT, services.store.ping()).await,
        Ok(Ok(()))
    );
    instance.progress.set_service_state(
        CriticalService::ThreadStore,
        if store_ok {
            ServiceState::Ready
        } else {
            ServiceState::Degraded
        },
    );
    let status = if store_ok && !instance.is_draining() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    health(status, instance.progress.report())
}

async fn metrics(State(instance): State<Arc<ServiceInstance>>) -> Response {
    instance.metrics.observe_startup(
        &instance.progress.report(),
        instance.started(),
        instance.progress.startup_seconds(),
    );
    let body = instance.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// `/ws`, counted by the status it answers with, whichever check answered. A panic
/// while upgrading is a defect: it is answered with 500 (counted, so the alert on
/// `/ws` server errors sees it) instead of a reset connection.
async fn count_upgrade(
    State(instance): State<Arc<ServiceInstance>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    counted(&instance, next.run(request)).await
}

async fn counted(instance: &ServiceInstance, answer: impl Future<Output = Response>) -> Response {
    let response = AssertUnwindSafe(answer)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| upgrade_panicked());
    let result = response
        .extensions()
        .get::<ws::UpgradeResult>()
        .map_or("other", |r| r.0);
    instance.metrics.upgrade(response.status().as_u16(), result);
    response
}

fn upgrade_panicked() -> Response {
    error!("the /ws upgrade panicked; answered 500 (a defect: please report it with this log)");
    let body = serde_json::json!({
        "error": "internal",
        "message": "the server failed while accepting this connection; retry, and report it if it persists",
    });
    ws::tagged(
        (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response(),
        "panic",
    )
}

/// Connections accepted that have not yet sent their first request's headers, at
/// most: beyond it new connections wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 1024;

/// The accept loop. Unlike `axum::serve`, a connection must deliver its first
/// request's headers within `header_timeout` (and later requests' headers too, once
/// they start), and at most [`MAX_HANDSHAKES`] connections may be waiting to: a
/// client that connects and sends nothing, or one byte a minute, cannot hold the
/// process's sockets before it has even asked for `/ws`. On `shutdown` it stops
/// accepting and lets open connections (upgraded WebSockets included) finish.
async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = handshakes.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Chat frames are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        let waiting = Arc::new(std::sync::Mutex::new(Some(permit)));
        let service = {
            let waiting = waiting.clone();
            let router = router.clone();
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                // The headers are in: the connection's handshake slot is free.
                waiting.lock().unwrap_or_else(|e| e.into_inner()).take();
                tower::ServiceExt::oneshot(router.clone(), request.map(axum::body::Body::new))
            })
        };
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout);
        let connection = builder
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::pin!(connection);
            // hyper's header timeout starts with the first byte; a connection that
            // sends nothing at all is closed here (dropping it closes the socket).
            tokio::select! {
                _ = &mut connection => {}
                _ = tokio::time::sleep(header_timeout) => {
                    if waiting.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        debug!("closing a connection that sent no request headers in time");
                        return;
                    }
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Runs the service to the end. Returns the process exit code.
pub async fn run(set: ConfigSet, started: Instant) -> i32 {
    logging::init(
        LogFormat::from_config(set.effective(Key::LogFormat)),
        "info",
    );
    let termination_log = set
        .effective(Key::TerminationLog)
        .unwrap_or(paths::DEFAULT_TERMINATION_LOG)
        .to_string();
    let instance = Arc::new(ServiceInstance::new(started));
    // Registered first thing, so a SIGTERM during startup is a clean exit rather
    // than the default kill.
    let mut signals = Signals::register();

    // Bind before the phases run; an address that cannot even be bound fails the
    // config phase with the key named.
    let listener = match bind(&set).await {
        Ok(l) => l,
        Err(cause) => {
            let failure = startup::StartupFailure {
                running: chatgate_contract::StartupPhase::Config,
                message: chatgate_contract::TerminationMessage::new(
                    chatgate_contract::StartupPhase::Config,
                    Some(CriticalService::Configuration),
                    cause,
                ),
            };
            return fail(&instance, failure, &termination_log, started);
        }
    };
    let local = listener.local_addr().ok();
    info!(address = ?local, "listening");

    let shutdown = tokio_util::sync::CancellationToken::new();
    let header_timeout = Duration::from_secs(
        set.effective(Key::HeaderTimeoutSeconds)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(10)
            .max(1),
    );
    let server = tokio::spawn(serve(
        listener,
        router(instance.clone()),
        header_timeout,
        shutdown.clone(),
    ));

    let budget = set
        .effective(Key::StartupBudgetSeconds)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(60);
    let budget = Duration::from_secs(budget);
    let deadline = started + budget;

    let signal = termination_signal(&mut signals);
    tokio::pin!(signal);
    let outcome = tokio::select! {
        outcome = startup::run(&set, &instance.progress, &instance.metrics, deadline, budget) => Some(outcome),
        _ = &mut signal => None,
    };
    let services = match outcome {
        Some(Ok(services)) => Arc::new(services),
        Some(Err(failure)) => return fail(&instance, failure, &termination_log, started),
        None => {
            info!("shutdown requested during startup; exiting");
            instance.progress.draining();
            shutdown.cancel();
            return 0;
        }
    };
    let drain = services.config.drain;
    let bridge = services.bridge.clone();
    let supervisor = services.supervisor.clone();
    let replicas = services.replicas.clone();
    instance.start_serving(services);
    info!(
        took_ms = started.elapsed().as_micros() as f64 / 1000.0,
        "startup complete; every critical service exists"
    );

    signal.await;
    // Readiness drops at once so the load balancer stops sending new clients;
    // the sockets already open keep working through the drain delay.
    instance.start_draining();
    info!(
        drain_seconds = drain.as_secs(),
        open = bridge.open(),
        "shutdown requested; readiness is 503, draining"
    );
    tokio::time::sleep(drain).await;
    // Runs still going end with `error shutting_down` (the client resends after
    // reconnecting), then every socket is told 1012.
    supervisor.shutdown();
    // One deadline for both steps, so the pod's grace period (drain + margin) holds.
    let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
    // Cancelled runs queue their last event before the sockets hear 1012.
    if tokio::time::timeout_at(deadline, supervisor.wait_idle())
        .await
        .is_err()
    {
        warn!(
            still_running = supervisor.active_runs(),
            "agent runs did not stop in time; closing their sockets anyway"
        );
    }
    let open = bridge.open();
    if tokio::time::timeout_at(deadline, bridge.close_all())
        .await
        .is_err()
    {
        warn!(
            still_open = bridge.open(),
            "sockets did not close in time after 1012; exiting anyway"
        );
    }
    info!(
        closed = open,
        "open sockets closed with 1012 (service restart)"
    );
    // This pod's sockets and runs stop counting for the other pods now, not after
    // they notice the missing heartbeat.
    let _ = tokio::time::timeout(Duration::from_secs(2), replicas.leave()).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    info!("stopped");
    0
}

async fn bind(set: &ConfigSet) -> Result<TcpListener, String> {
    let raw = set
        .effective(Key::Listen)
        .unwrap_or("127.0.0.1:8080")
        .trim()
        .to_string();
    let addr: SocketAddr = match raw.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(raw.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                format!("{LISTEN_KEY} `{raw}` is not an address this host can listen on; use IP:PORT such as 127.0.0.1:8080")
            })?,
    };
    TcpListener::bind(addr).await.map_err(|e| {
        format!("{LISTEN_KEY} {addr} cannot be bound ({e}); choose a free port or stop the process using it")
    })
}

fn fail(
    instance: &ServiceInstance,
    failure: startup::StartupFailure,
    termination_log: &str,
    started: Instant,
) -> i32 {
    instance
        .progress
        .fail(failure.running, &failure.message, started.elapsed());
    error!(
        phase = %failure.message.phase,
        service = failure.message.service.map(|s| s.as_str()).unwrap_or("none"),
        cause = %failure.message.cause,
        "startup failed: {}", failure.message.summary()
    );
    startup::write_termination_log(termination_log, &failure.message);
    // Also on stderr for people running the binary by hand.
    eprintln!("{}", failure.message);
    1
}

/// SIGTERM (Kubernetes) and SIGINT (Ctrl-C) handlers.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        if term.is_none() || int.is_none() {
            warn!("cannot listen for SIGTERM/SIGINT; shutdown will not drain");
        }
        Signals { term, int }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn termination_signal(signals: &mut Signals) {
    async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
        match signal {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        _ = next(&mut signals.term) => {}
        _ = next(&mut signals.int) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_upgrade_is_answered_500_and_counted() {
        let instance = ServiceInstance::new(Instant::now());
        let response = counted(&instance, async { panic!("a defect in the upgrade") }).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let exposition = instance.metrics.encode();
        assert!(
            exposition.contains("chatgate_ws_upgrades_total{code=\"500\",result=\"panic\"} 1"),
            "{exposition}"
        );
    }

    #[tokio::test]
    async fn ws_before_startup_is_counted_as_503_starting() {
        let instance = ServiceInstance::new(Instant::now());
        let response = counted(&instance, std::future::ready(ws::not_serving(&instance))).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            instance
                .metrics
                .encode()
                .contains("chatgate_ws_upgrades_total{code=\"503\",result=\"starting\"} 1")
        );
    }
}
