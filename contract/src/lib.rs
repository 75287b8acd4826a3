//! The contract between the chatgate operator and the chatgate service.
//!
//! Everything both sides must agree on lives here, once: the configuration schema
//! and its validation and parity rules, the health JSON, the endpoint paths, the
//! critical services and startup phases, and the termination-message format the
//! operator reads back from failed pods. The crate is pure (no I/O, no Kubernetes,
//! no async), so the service, the operator and the offline `validate` command can
//! never disagree about a key.

pub mod build_info;
pub mod config;
pub mod health;
pub mod paths;
pub mod startup;
pub mod termination;

pub use config::{
    ConfigSet, ConfigValue, Environment, JwtAlgorithm, KEYS, Key, KeySpec, LlmProvider, Origin,
    ParityPolicy, ParityRule, Problem, ProblemKind, ValueKind, explain, key_spec,
};
pub use health::{
    HealthReport, HealthState, PhaseReport, PhaseStatus, ServiceReport, ServiceState,
};
pub use startup::{CriticalService, StartupPhase};
pub use termination::TerminationMessage;
