//! What is wrong with a configuration, as every reader (service, operator, `validate`)
//! reports it.

use super::Environment;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What kind of problem a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Required in this environment and not set.
    Required,
    /// Set, but not a valid value.
    Invalid,
    /// Not a key chatgate knows.
    Unknown,
    /// A secret written inline in a manifest outside development.
    SecretInline,
    /// Differs from the production baseline under the `match` rule.
    ParityMatch,
    /// Set on one side only under the `present` rule.
    ParityPresent,
    /// The production baseline could not be found.
    BaselineMissing,
    /// A referenced Secret or key does not exist.
    MissingReference,
    /// Valid on Kubernetes, but beyond what the deploy target (Cloud Run, Knative) can do.
    Platform,
}

impl ProblemKind {
    /// The rule column of tables.
    pub fn rule(self) -> &'static str {
        match self {
            ProblemKind::Required => "required",
            ProblemKind::Invalid => "type",
            ProblemKind::Unknown => "unknown-key",
            ProblemKind::SecretInline => "secret",
            ProblemKind::ParityMatch => "parity:match",
            ProblemKind::ParityPresent => "parity:present",
            ProblemKind::BaselineMissing => "baseline",
            ProblemKind::MissingReference => "reference",
            ProblemKind::Platform => "platform",
        }
    }

    pub fn is_parity(self) -> bool {
        matches!(
            self,
            ProblemKind::ParityMatch | ProblemKind::ParityPresent | ProblemKind::BaselineMissing
        )
    }
}

/// One thing wrong with a configuration: which key, in which environment, under
/// which rule, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub key: String,
    pub environment: Environment,
    pub kind: ProblemKind,
    pub message: String,
    pub fix: String,
}

impl Problem {
    pub fn new(
        key: impl Into<String>,
        environment: Environment,
        kind: ProblemKind,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Problem {
            key: key.into(),
            environment,
            kind,
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}): {}; {}",
            self.key,
            self.environment,
            self.kind.rule(),
            self.message,
            self.fix
        )
    }
}
