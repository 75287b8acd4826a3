//! Prometheus metrics of the service, served at `/metrics`.
//!
//! Hot counters (accepted connects, active connections) are resolved once and kept
//! as handles, so the connection path touches an atomic, not a label lookup.

use chatgate_contract::StartupPhase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
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
    connects: Family<ResultLabel, Counter>,
    pub connects_accepted: Counter,
    closes: Family<CodeLabel, Counter>,
    phase_seconds: Family<PhaseLabel, Gauge<f64, AtomicU64>>,
    phase_attempts: Family<PhaseLabel, Counter>,
    pub startup_complete: Gauge,
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
        let connects = Family::<ResultLabel, Counter>::default();
        registry.register(
            "chatgate_ws_connects",
            "/ws upgrade attempts by result (accepted, unauthorized, forbidden, unavailable, over_limit, bad_request)",
            connects.clone(),
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
        let connects_accepted = connects
            .get_or_create(&ResultLabel { result: "accepted" })
            .clone();
        Metrics {
            registry,
            active_connections,
            connects,
            connects_accepted,
            closes,
            phase_seconds,
            phase_attempts,
            startup_complete,
            agent_events,
            agent_requests,
            errors_sent,
        }
    }

    pub fn connect(&self, result: &'static str) {
        self.connects.get_or_create(&ResultLabel { result }).inc();
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
