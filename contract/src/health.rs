//! The JSON body of `/health/startup` and `/health/ready`, read by people and the operator.

use crate::startup::{CriticalService, StartupPhase};
use serde::{Deserialize, Serialize};

/// Overall state of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Startup phases are still running (or retrying a dependency).
    Starting,
    /// Startup complete, every critical service exists, accepting `/ws`.
    Ready,
    /// SIGTERM received: no new upgrades, open sockets are being closed.
    Draining,
    /// Startup failed permanently; the process is about to exit.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseStatus {
    Pending,
    Running,
    /// Waiting on a dependency, with backoff.
    Retrying,
    Done,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    Missing,
    Ready,
    /// Exists, but a dependency it uses is currently not usable.
    Degraded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseReport {
    pub name: StartupPhase,
    pub status: PhaseStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_ms: Option<u64>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceReport {
    pub name: CriticalService,
    pub state: ServiceState,
}

/// The body both health endpoints answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub state: HealthState,
    /// The phase running now, or the one that failed; `None` once complete.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub phase: Option<StartupPhase>,
    pub phases: Vec<PhaseReport>,
    pub services: Vec<ServiceReport>,
    /// The error that stopped startup, if any (same text as the termination message).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The newest schema migration applied to the thread store's database, once the
    /// storage phase has connected (pods of two versions may share one database).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub schema_version: Option<i64>,
    /// Milliseconds since the process started.
    pub uptime_ms: u64,
}
