//! Prometheus metrics of the service, served at `/metrics`.
//!
//! Hot counters (accepted upgrades, active connections) are resolved once and kept
//! as handles, so the connection path touches an atomic, not a label lookup.
//!
//! What the startup report already knows (which critical services exist, how long
//! startup took or has taken so far) is not counted twice: it is read from the
//! report at each scrape ([`Metrics::observe_startup`]). The README's "Monitoring"
//! section lists every metric; the alert rules and the dashboard use these names.

use chatgate_contract::{HealthReport, ServiceState, StartupPhase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// An upgrade attempt on `/ws`: the HTTP status it got, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpgradeLabels {
    pub code: u16,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub active_connections: Gauge,
    upgrades: Family<UpgradeLabels, Counter>,
    upgrades_accepted: Counter,
    closes: Family<CodeLabel, Counter>,
    phase_seconds: Family<PhaseLabel, Gauge<f64, AtomicU64>>,
    phase_attempts: Family<PhaseLabel, Counter>,
    startup_complete: Gauge,
    startup_seconds: Gauge<f64, AtomicU64>,
    critical_services: Family<ServiceLabel, Gauge>,
    agent_events: Family<EventLabel, Counter>,
    pub agent_requests: Counter,
    errors_sent: Family<ErrorLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let active_connections = Gauge::default();
        registry.register(
            "chatgate_ws_active_connections",
            "Open /ws connections",
            active_connections.clone(),
        );
        let upgrades = Family::<UpgradeLabels, Counter>::default();
        registry.register(
            "chatgate_ws_upgrades",
            "/ws requests by HTTP status (101, 400, 401, 403, 503; any other 5xx is a defect) and result (accepted, over_limit, unauthorized, forbidden, bad_request, starting, draining, panic)",
            upgrades.clone(),
        );
        let closes = Family::<CodeLabel, Counter>::default();
        registry.register(
            "chatgate_ws_closes",
            "/ws connections closed, by close code (1006: no close frame)",
            closes.clone(),
        );
        let phase_seconds = Family::<PhaseLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "chatgate_startup_phase_duration_seconds",
            "How long each startup phase took (including retries)",
            phase_seconds.clone(),
        );
        let phase_attempts = Family::<PhaseLabel, Counter>::default();
        registry.register(
            "chatgate_startup_phase_attempts",
            "Attempts per startup phase (more than one: a dependency was retried)",
            phase_attempts.clone(),
        );
        let startup_complete = Gauge::default();
        registry.register(
            "chatgate_startup_complete",
            "1 once every critical service exists",
            startup_complete.clone(),
        );
        let startup_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "chatgate_startup_duration_seconds",
            "Seconds from process start to startup complete; while still starting, the seconds so far",
            startup_seconds.clone(),
        );
        let critical_services = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "chatgate_critical_service_up",
            "1 while the critical service exists and works (thread_store: its database answers)",
            critical_services.clone(),
        );
        let agent_events = Family::<EventLabel, Counter>::default();
        registry.register(
            "chatgate_agent_events",
            "Agent runs seen by clients: agent_started and agent_completed events sent",
            agent_events.clone(),
        );
        let agent_requests = Counter::default();
        registry.register(
            "chatgate_agent_requests",
            "Chat requests handed to the agent supervisor",
            agent_requests.clone(),
        );
        let errors_sent = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "chatgate_ws_errors",
            "error frames sent to clients, by code (rate_limited, llm_unavailable, invalid_json, ...)",
            errors_sent.clone(),
        );
        let upgrades_accepted = upgrades
            .get_or_create(&UpgradeLabels {
                code: 101,
                result: "accepted",
            })
            .clone();
        Metrics {
            registry,
            active_connections,
            upgrades,
            upgrades_accepted,
            closes,
            phase_seconds,
            phase_attempts,
            startup_complete,
            startup_seconds,
            critical_services,
            agent_events,
            agent_requests,
            errors_sent,
        }
    }

    /// One `/ws` request answered with `code`.
    pub fn upgrade(&self, code: u16, result: &'static str) {
        if code == 101 && result == "accepted" {
            self.upgrades_accepted.inc();
        } else {
            self.upgrades
                .get_or_create(&UpgradeLabels { code, result })
                .inc();
        }
    }

    /// Brings the startup gauges up to date with the report, just before a scrape.
    pub fn observe_startup(&self, report: &HealthReport, complete: bool, startup_seconds: f64) {
        self.startup_complete.set(i64::from(complete));
        self.startup_seconds.set(startup_seconds);
        for service in &report.services {
            self.critical_services
                .get_or_create(&ServiceLabel {
                    service: service.name.as_str(),
                })
                .set(i64::from(service.state == ServiceState::Ready));
        }
    }

    pub fn close(&self, code: u16) {
        self.closes.get_or_create(&CodeLabel { code }).inc();
    }

    pub fn phase_done(&self, phase: StartupPhase, seconds: f64) {
        self.phase_seconds
            .get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            })
            .set(seconds);
    }

    pub fn phase_attempt(&self, phase: StartupPhase) {
        self.phase_attempts
            .get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            })
            .inc();
    }

    pub fn agent_event(&self, event: &'static str) {
        self.agent_events.get_or_create(&EventLabel { event }).inc();
    }

    pub fn error_sent(&self, code: &'static str) {
        self.errors_sent.get_or_create(&ErrorLabel { code }).inc();
    }

    /// The OpenMetrics text exposition (Prometheus reads it).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
