//! The fixed startup phases and the critical services each one produces.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One step of the service's deterministic startup, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartupPhase {
    Config,
    Auth,
    Storage,
    Llm,
    Bridge,
    Supervisor,
    Validate,
}

impl StartupPhase {
    /// Every phase, in execution order.
    pub const ALL: [StartupPhase; 7] = [
        StartupPhase::Config,
        StartupPhase::Auth,
        StartupPhase::Storage,
        StartupPhase::Llm,
        StartupPhase::Bridge,
        StartupPhase::Supervisor,
        StartupPhase::Validate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StartupPhase::Config => "config",
            StartupPhase::Auth => "auth",
            StartupPhase::Storage => "storage",
            StartupPhase::Llm => "llm",
            StartupPhase::Bridge => "bridge",
            StartupPhase::Supervisor => "supervisor",
            StartupPhase::Validate => "validate",
        }
    }

    /// The critical service this phase produces (`validate` produces none: it checks
    /// that every required one exists).
    pub fn produces(self) -> Option<CriticalService> {
        match self {
            StartupPhase::Config => Some(CriticalService::Configuration),
            StartupPhase::Auth => Some(CriticalService::JwtVerifier),
            StartupPhase::Storage => Some(CriticalService::ThreadStore),
            StartupPhase::Llm => Some(CriticalService::LlmClient),
            StartupPhase::Bridge => Some(CriticalService::WsBridge),
            StartupPhase::Supervisor => Some(CriticalService::AgentSupervisor),
            StartupPhase::Validate => None,
        }
    }
}

impl fmt::Display for StartupPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StartupPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StartupPhase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown startup phase `{s}`"))
    }
}

/// The critical services' names, for readers of the earlier constant.
pub const CRITICAL_SERVICE_NAMES: &[&str] = &CriticalService::NAMES;

/// A service the `/ws` handler cannot work without.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CriticalService {
    Configuration,
    JwtVerifier,
    ThreadStore,
    LlmClient,
    WsBridge,
    AgentSupervisor,
}

impl CriticalService {
    /// Every critical service, in the order startup produces them.
    pub const ALL: [CriticalService; 6] = [
        CriticalService::Configuration,
        CriticalService::JwtVerifier,
        CriticalService::ThreadStore,
        CriticalService::LlmClient,
        CriticalService::WsBridge,
        CriticalService::AgentSupervisor,
    ];

    /// Every critical service's name, in startup order.
    pub const NAMES: [&'static str; CriticalService::ALL.len()] =
        crate::config::names_of!(CriticalService);

    pub const fn as_str(self) -> &'static str {
        match self {
            CriticalService::Configuration => "configuration",
            CriticalService::JwtVerifier => "jwt_verifier",
            CriticalService::ThreadStore => "thread_store",
            CriticalService::LlmClient => "llm_client",
            CriticalService::WsBridge => "ws_bridge",
            CriticalService::AgentSupervisor => "agent_supervisor",
        }
    }

    /// Words for people, e.g. in `kubectl get` output ("agent supervisor").
    pub fn human(self) -> &'static str {
        match self {
            CriticalService::Configuration => "configuration",
            CriticalService::JwtVerifier => "JWT verifier",
            CriticalService::ThreadStore => "thread store",
            CriticalService::LlmClient => "LLM client",
            CriticalService::WsBridge => "WebSocket bridge",
            CriticalService::AgentSupervisor => "agent supervisor",
        }
    }

    /// The phase that produces this service.
    pub fn phase(self) -> StartupPhase {
        StartupPhase::ALL
            .into_iter()
            .find(|p| p.produces() == Some(self))
            .unwrap_or(StartupPhase::Validate)
    }
}

impl fmt::Display for CriticalService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CriticalService {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CriticalService::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown critical service `{s}` (known: {})",
                    CriticalService::ALL.map(|c| c.as_str()).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_critical_service_has_exactly_one_producing_phase() {
        for service in CriticalService::ALL {
            let producers: Vec<_> = StartupPhase::ALL
                .into_iter()
                .filter(|p| p.produces() == Some(service))
                .collect();
            assert_eq!(producers.len(), 1, "{service}");
            assert_eq!(service.phase(), producers[0]);
        }
    }

    #[test]
    fn names_round_trip() {
        for p in StartupPhase::ALL {
            assert_eq!(p.as_str().parse::<StartupPhase>().unwrap(), p);
        }
        for c in CriticalService::ALL {
            assert_eq!(c.as_str().parse::<CriticalService>().unwrap(), c);
        }
    }
}
