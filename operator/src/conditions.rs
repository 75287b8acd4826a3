//! Condition types and reasons of `ChatService.status.conditions`, and the one rule
//! every condition follows: `lastTransitionTime` changes only when the status does.
//!
//! The names follow kstatus (`Ready`, `Reconciling`, `Stalled`) so `kubectl wait`,
//! Helm 4, Flux and Argo CD read the resource without a custom health check.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Serving the current spec with every desired replica ready. Always present.
pub const READY: &str = "Ready";
/// A rollout is in progress. Present only while True (kstatus).
pub const RECONCILING: &str = "Reconciling";
/// Cannot progress without a change by a person. Present only while True (kstatus).
pub const STALLED: &str = "Stalled";
/// The declared configuration and the Secrets and ConfigMap it references are valid.
pub const CONFIG_VALID: &str = "ConfigValid";
/// The configuration is in parity with the production baseline (only with `spec.parity`).
pub const PARITY_OK: &str = "ParityOK";
/// Every desired pod finished startup with every critical service present.
pub const STARTUP_COMPLETE: &str = "StartupComplete";

/// `status: "True"`.
pub const TRUE: &str = "True";
/// `status: "False"`.
pub const FALSE: &str = "False";

/// Reasons, CamelCase as the API conventions ask.
pub mod reason {
    /// Every desired replica runs the current configuration and is ready.
    pub const READY: &str = "Ready";
    /// New pods are being created or old ones replaced.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// The Deployment has not been created or observed yet.
    pub const CREATING: &str = "Creating";
    /// The spec or its configuration fails validation; nothing new is rolled out.
    pub const INVALID_CONFIG: &str = "InvalidConfig";
    /// A referenced Secret, ConfigMap or key does not exist.
    pub const MISSING_REFERENCE: &str = "MissingReference";
    /// The configuration differs from the production baseline and parity is enforced.
    pub const PARITY_VIOLATION: &str = "ParityViolation";
    /// The production baseline named in `spec.parity` does not exist.
    pub const BASELINE_MISSING: &str = "BaselineMissing";
    /// Pods exit during startup; their termination message names the phase and service.
    pub const STARTUP_FAILED: &str = "StartupFailed";
    /// An object with a child's name exists and is not controlled by this ChatService;
    /// the operator does not take it over.
    pub const CHILD_NOT_OWNED: &str = "ChildNotOwned";
    /// A child could not be written; the operator retries.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// The Deployment made no progress within `spec.rollout.progressDeadlineSeconds`.
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    /// The configuration is valid.
    pub const VALID: &str = "Valid";
    /// The configuration matches the production baseline by every parity rule.
    pub const IN_PARITY: &str = "InParity";
    /// Every desired pod completed startup.
    pub const STARTUP_COMPLETE: &str = "StartupComplete";
    /// Pods are still starting (building their critical services).
    pub const STARTING: &str = "Starting";
}

/// A condition as the operator decides it, before timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Decided {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Decided {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }

    fn status_str(&self) -> &'static str {
        if self.status { TRUE } else { FALSE }
    }
}

/// The conditions `decided` as written to the status: each keeps the previous
/// `lastTransitionTime` when its status did not flip, and takes `now` otherwise
/// (also when it is new). Conditions absent from `decided` are dropped, which is
/// how `Reconciling` and `Stalled` disappear once False.
pub fn merge(
    prev: &[Condition],
    decided: &[Decided],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    decided
        .iter()
        .map(|d| {
            let status = d.status_str();
            let last_transition_time = prev
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: d.type_.to_owned(),
                status: status.to_owned(),
                reason: d.reason.to_owned(),
                message: truncate(&d.message, MAX_MESSAGE),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The API server limits a condition message to 32768 bytes; stay well below so a
/// long problem list never makes the status write fail.
pub const MAX_MESSAGE: usize = 4096;

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut cut = max.saturating_sub(3);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &s[..cut])
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let first = merge(
            &[],
            &[Decided::new(READY, false, reason::CREATING, "a")],
            Some(1),
            &at(10),
        );
        assert_eq!(first[0].last_transition_time, at(10));
        // Same status, new reason and message: the time stays.
        let second = merge(
            &first,
            &[Decided::new(READY, false, reason::ROLLING_OUT, "b")],
            Some(2),
            &at(20),
        );
        assert_eq!(second[0].last_transition_time, at(10));
        assert_eq!(second[0].reason, "RollingOut");
        assert_eq!(second[0].observed_generation, Some(2));
        // Flip: the time moves.
        let third = merge(
            &second,
            &[Decided::new(READY, true, reason::READY, "c")],
            Some(2),
            &at(30),
        );
        assert_eq!(third[0].last_transition_time, at(30));
    }

    #[test]
    fn absent_conditions_are_dropped_and_reappear_with_a_new_time() {
        let a = merge(
            &[],
            &[Decided::new(STALLED, true, reason::STARTUP_FAILED, "x")],
            Some(1),
            &at(1),
        );
        let b = merge(&a, &[], Some(1), &at(2));
        assert!(b.is_empty());
        let c = merge(
            &b,
            &[Decided::new(STALLED, true, reason::STARTUP_FAILED, "x")],
            Some(1),
            &at(3),
        );
        assert_eq!(c[0].last_transition_time, at(3));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = "é".repeat(5000);
        let t = truncate(&s, MAX_MESSAGE);
        assert!(t.len() <= MAX_MESSAGE);
        assert!(t.ends_with("..."));
        assert_eq!(truncate("short", 10), "short");
    }
}
