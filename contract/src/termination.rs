//! The one-line termination message a failed startup writes, and its parser.
//!
//! The service writes it to the container's termination-message path; Kubernetes
//! copies it into the pod status, where the operator reads it back to name the phase
//! and critical service on the `ChatService` status.

use crate::startup::{CriticalService, StartupPhase};
use std::fmt;
use std::str::FromStr;

/// `phase=<phase> service=<service>: <cause>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminationMessage {
    pub phase: StartupPhase,
    pub service: Option<CriticalService>,
    pub cause: String,
}

impl TerminationMessage {
    pub fn new(
        phase: StartupPhase,
        service: Option<CriticalService>,
        cause: impl Into<String>,
    ) -> Self {
        // One line only: Kubernetes shows the message verbatim and tools split on lines.
        let cause = cause.into().replace(['\n', '\r'], " ");
        TerminationMessage {
            phase,
            service,
            cause,
        }
    }

    /// A short sentence for people: "agent supervisor missing: LLM API key not set".
    pub fn summary(&self) -> String {
        match self.service {
            Some(s) => format!("{} missing: {}", s.human(), self.cause),
            None => format!("startup phase {} failed: {}", self.phase, self.cause),
        }
    }
}

impl fmt::Display for TerminationMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let service = self.service.map(|s| s.as_str()).unwrap_or("none");
        write!(
            f,
            "phase={} service={}: {}",
            self.phase, service, self.cause
        )
    }
}

impl FromStr for TerminationMessage {
    type Err = String;
    /// Parses the first line that has the shape; anything else is not ours.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        for line in s.lines() {
            let Some(rest) = line.trim().strip_prefix("phase=") else {
                continue;
            };
            let Some((phase, rest)) = rest.split_once(' ') else {
                continue;
            };
            let Some(rest) = rest.strip_prefix("service=") else {
                continue;
            };
            let Some((service, cause)) = rest.split_once(':') else {
                continue;
            };
            let Ok(phase) = phase.parse::<StartupPhase>() else {
                continue;
            };
            let service = if service == "none" {
                None
            } else {
                service.parse().ok()
            };
            return Ok(TerminationMessage::new(phase, service, cause.trim()));
        }
        Err("not a chatgate termination message".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses_and_summarises() {
        let m: TerminationMessage =
            "phase=supervisor service=agent_supervisor: LLM API key missing"
                .parse()
                .unwrap();
        assert_eq!(m.phase, StartupPhase::Supervisor);
        assert_eq!(m.service, Some(CriticalService::AgentSupervisor));
        assert_eq!(m.summary(), "agent supervisor missing: LLM API key missing");
        assert_eq!(
            m.to_string(),
            "phase=supervisor service=agent_supervisor: LLM API key missing"
        );
    }

    #[test]
    fn multi_line_causes_become_one_line() {
        let m = TerminationMessage::new(
            StartupPhase::Config,
            Some(CriticalService::Configuration),
            "a\nb",
        );
        assert_eq!(m.to_string().lines().count(), 1);
    }

    #[test]
    fn foreign_text_is_not_parsed() {
        assert!("Error: exit 1".parse::<TerminationMessage>().is_err());
    }
}
