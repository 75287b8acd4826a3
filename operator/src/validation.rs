//! Validation before rollout: the declared configuration, the Secrets and ConfigMap
//! it references, and parity with the production baseline.
//!
//! [`evaluate`] is pure: it sees the ChatService and what [`crate::dereference`]
//! read for it, and returns every problem at once. The operator runs it through
//! [`check`]; `chatgate-operator validate` runs the same function on manifests, so
//! a pipeline and the cluster can never disagree about a configuration.

use crate::configuration::{STRUCTURED_KEYS, declared_config};
use crate::crd::{ChatService, ParityMode};
use crate::dereference::{self, Dereferenced, Lookup};
use chatgate_contract::Environment;
use chatgate_contract::config::{
    ConfigSet, KEY_PREFIX, Origin, ParityPolicy, Problem, ProblemKind,
};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// The `key` of a problem about `spec.configMapRef` itself (not one of its keys).
pub const CONFIG_MAP_FIELD: &str = "spec.configMapRef";
/// The `key` of a problem about the baseline itself (missing, not production).
pub const BASELINE_FIELD: &str = "spec.parity.baseline";
/// The `key` of a problem about `spec.parity` on a production resource.
pub const PARITY_FIELD: &str = "spec.parity";

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

    /// Every problem, configuration first, then parity.
    pub fn all_problems(&self) -> impl Iterator<Item = &Problem> {
        self.config_problems
            .iter()
            .chain(self.parity.iter().flat_map(|p| p.problems.iter()))
    }
}

/// Reads what the spec points at and validates it.
pub async fn check(client: &kube::Client, cs: &ChatService) -> Result<Validation, kube::Error> {
    let read = dereference::read(client, cs).await?;
    Ok(evaluate(cs, &read))
}

/// The spec field a configuration key is set from, for messages.
fn field_of(key: &str) -> &'static str {
    STRUCTURED_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, f)| *f)
        .unwrap_or("spec.config")
}

/// Only `CHATGATE_*` keys of a ConfigMap become service configuration, as in the
/// service, which reads only `CHATGATE_*` variables.
fn configuration_keys(data: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    data.iter()
        .filter(|(k, _)| k.starts_with(KEY_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Validates a ChatService against what was read for it. Pure; never panics.
pub fn evaluate(cs: &ChatService, read: &Dereferenced) -> Validation {
    let env = cs.spec.environment;
    let namespace = cs.namespace().unwrap_or_else(|| "default".to_string());
    let mut problems = Vec::new();

    let config_map_data = match (&cs.spec.config_map_ref, &read.config_map) {
        (Some(r), Some(Lookup::NotFound)) => {
            problems.push(Problem::new(
                CONFIG_MAP_FIELD,
                env,
                ProblemKind::MissingReference,
                format!("ConfigMap `{}` does not exist in namespace `{namespace}`", r.name),
                format!(
                    "create it in `{namespace}` (its CHATGATE_* keys become configuration) or remove spec.configMapRef"
                ),
            ));
            None
        }
        (Some(r), Some(Lookup::Forbidden(why))) => {
            problems.push(Problem::new(
                CONFIG_MAP_FIELD,
                env,
                ProblemKind::MissingReference,
                format!(
                    "ConfigMap `{}` in namespace `{namespace}` could not be read: {why}",
                    r.name
                ),
                "grant the operator `get` on configmaps in this namespace (the chart's RBAC does)",
            ));
            None
        }
        (Some(_), Some(Lookup::Found(data))) => Some(data.clone()),
        (_, _) => None,
    };

    let (config, declared) = declared_config(
        &cs.spec,
        config_map_data.as_ref().map(configuration_keys).as_ref(),
    );
    problems.extend(declared);
    problems.extend(config.validate(Origin::Manifest));
    if let Some(secrets) = &read.secrets {
        problems.extend(reference_problems(&config, secrets, env, &namespace));
    }

    if env == Environment::Production && cs.spec.parity.is_some() {
        problems.push(Problem::new(
            PARITY_FIELD,
            env,
            ProblemKind::Invalid,
            "is set on a production ChatService, which is itself the parity baseline",
            "remove spec.parity from the production resource",
        ));
    }

    Validation {
        config_problems: problems,
        parity: parity(cs, &config, read, &namespace),
        config_map_data,
    }
}

/// Every Secret reference of the configuration checked against what the Secrets hold.
fn reference_problems(
    config: &ConfigSet,
    secrets: &BTreeMap<String, Lookup<dereference::SecretKeys>>,
    env: Environment,
    namespace: &str,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (config_key, secret, key) in config.secret_refs() {
        if secret.trim().is_empty() || key.trim().is_empty() {
            continue; // Reported by the contract as an incomplete reference.
        }
        let field = field_of(config_key);
        let found = secrets.get(secret).unwrap_or(&Lookup::NotFound);
        let (message, fix) = match found {
            Lookup::NotFound => (
                format!(
                    "comes from Secret `{secret}` (key `{key}`, {field}), which does not exist in namespace `{namespace}`"
                ),
                format!(
                    "create it: `kubectl -n {namespace} create secret generic {secret} --from-literal={key}=...`, or point {field} at an existing Secret"
                ),
            ),
            Lookup::Forbidden(why) => (
                format!(
                    "comes from Secret `{secret}` in namespace `{namespace}`, which could not be read: {why}"
                ),
                "grant the operator `get` on secrets in this namespace (the chart's RBAC does)"
                    .to_string(),
            ),
            Lookup::Found(keys) if !keys.keys.contains(key) => {
                let has = if keys.keys.is_empty() {
                    "it has no keys".to_string()
                } else {
                    format!(
                        "it has {}",
                        keys.keys
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                (
                    format!(
                        "comes from key `{key}` of Secret `{secret}` ({field}), which has no such key ({has})"
                    ),
                    format!(
                        "add key `{key}` to Secret `{secret}`, or point {field} at the key that holds it"
                    ),
                )
            }
            Lookup::Found(keys) if keys.empty.contains(key) => (
                format!("comes from key `{key}` of Secret `{secret}` ({field}), which is empty"),
                format!("put the value into key `{key}` of Secret `{secret}`"),
            ),
            Lookup::Found(_) => continue,
        };
        problems.push(Problem::new(
            config_key,
            env,
            ProblemKind::MissingReference,
            message,
            fix,
        ));
    }
    problems
}

fn parity(
    cs: &ChatService,
    config: &ConfigSet,
    read: &Dereferenced,
    namespace: &str,
) -> Option<ParityOutcome> {
    let spec = cs.spec.parity.as_ref()?;
    if cs.spec.environment == Environment::Production {
        return None;
    }
    let env = cs.spec.environment;
    let (baseline_ns, baseline_name) =
        dereference::baseline_of(cs).unwrap_or_else(|| (namespace.to_string(), String::new()));
    let baseline = format!("{baseline_ns}/{baseline_name}");
    let baseline_problem = |message: String, fix: String| {
        vec![Problem::new(
            BASELINE_FIELD,
            env,
            ProblemKind::BaselineMissing,
            message,
            fix,
        )]
    };
    let problems = match &read.baseline {
        None | Some(Lookup::NotFound) => baseline_problem(
            format!("the production baseline ChatService `{baseline}` does not exist"),
            format!(
                "create `{baseline}` (environment: production) or correct spec.parity.baseline; offline, pass its manifest among the files"
            ),
        ),
        Some(Lookup::Forbidden(why)) => baseline_problem(
            format!("the production baseline ChatService `{baseline}` could not be read: {why}"),
            format!("grant the operator `get` on chatservices in namespace `{baseline_ns}`"),
        ),
        Some(Lookup::Found(b)) if b.resource.spec.environment != Environment::Production => {
            baseline_problem(
                format!(
                    "the baseline ChatService `{baseline}` is a {} resource, not production",
                    b.resource.spec.environment
                ),
                "point spec.parity.baseline at the production ChatService".to_string(),
            )
        }
        Some(Lookup::Found(b)) => {
            // The baseline's own problems are reported on the baseline; here only the
            // comparison counts, so its spell-it-differently problems are dropped.
            let cm = b.config_map.as_ref().map(configuration_keys);
            let (theirs, _) = declared_config(&b.resource.spec, cm.as_ref());
            let policy = ParityPolicy {
                allowed_differences: spec.allowed_differences.iter().cloned().collect(),
            };
            config.parity_with(&theirs, &policy)
        }
    };
    Some(ParityOutcome {
        baseline,
        mode: spec.mode,
        problems,
    })
}
