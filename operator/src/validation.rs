//! Validation before rollout: the declared configuration, the Secrets and ConfigMap
//! it references, and parity with the production baseline.
//!
//! Interface used by the reconciler. The present implementation checks only the
//! declared configuration; reference and parity checks fill in behind it.

use crate::configuration::declared_config;
use crate::crd::{ChatService, ParityMode};
use chatgate_contract::config::{Origin, Problem};
use std::collections::BTreeMap;

/// What validation found for one ChatService.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Validation {
    /// Problems with this resource's own configuration and references (`ConfigValid`).
    pub config_problems: Vec<Problem>,
    /// Parity with the production baseline (`ParityOK`); `None` when no baseline is set.
    pub parity: Option<ParityOutcome>,
    /// Data of `spec.configMapRef` as read, so the workload can roll when it changes.
    pub config_map_data: Option<BTreeMap<String, String>>,
}

/// The result of comparing with the baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct ParityOutcome {
    /// `namespace/name` of the baseline.
    pub baseline: String,
    pub mode: ParityMode,
    pub problems: Vec<Problem>,
}

impl Validation {
    /// A configuration that must not be rolled out: the last good one keeps serving.
    pub fn blocks_rollout(&self) -> bool {
        !self.config_problems.is_empty()
            || self
                .parity
                .as_ref()
                .is_some_and(|p| p.mode == ParityMode::Enforce && !p.problems.is_empty())
    }
}

/// Reads what the spec points at and validates it.
pub async fn check(_client: &kube::Client, cs: &ChatService) -> Result<Validation, kube::Error> {
    let (config, mut problems) = declared_config(&cs.spec, None);
    problems.extend(config.validate(Origin::Manifest));
    Ok(Validation { config_problems: problems, parity: None, config_map_data: None })
}
