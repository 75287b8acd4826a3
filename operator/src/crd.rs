//! The `ChatService` custom resource (group `chatgate.dev`, version `v1alpha1`).
//!
//! These Rust types are the single source of the CRD: `chatgate-operator crd` prints
//! it and `crds/` holds the generated YAML. Cross-field rules are CEL
//! (`x-kubernetes-validations`), so `kubectl apply` refuses a nonsensical spec with a
//! message a person understands before the operator ever sees it.

use chatgate_contract::{CriticalService, Environment};
use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A chat service: the chatgate service binary rolled out as a Deployment whose pods
/// receive traffic only after every critical service exists.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "chatgate.dev",
    version = "v1alpha1",
    kind = "ChatService",
    namespaced,
    status = "ChatServiceStatus",
    shortname = "chatsvc",
    category = "chatgate",
    derive = "PartialEq",
    doc = "A chat service whose pods take traffic only once every critical service exists.",
    printcolumn(name = "Env", type_ = "string", json_path = ".spec.environment"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Replicas", type_ = "string", json_path = ".status.replicasReady", description = "ready/desired replicas"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].message"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.environment != 'production' || self.spec.replicas >= 2")
        .message("a production ChatService needs at least 2 replicas so a rollout or node drain never leaves it without a ready pod")
        .field_path(".spec.replicas"),
    validation = Rule::new("self.spec.environment != 'production' || !has(self.spec.parity)")
        .message("a production ChatService is the parity baseline; remove spec.parity")
        .field_path(".spec.parity"),
)]
#[serde(rename_all = "camelCase")]
pub struct ChatServiceSpec {
    /// Container image of the chatgate service, e.g. `ghcr.io/acme/chatgate-service:1.4.2`.
    #[schemars(length(min = 1))]
    pub image: String,

    /// Number of pods. Production needs at least 2.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Which environment this is: development, staging or production. Decides which
    /// configuration keys are required.
    pub environment: Environment,

    /// How tokens on `/ws` are verified.
    #[serde(default)]
    pub jwt: JwtSpec,

    /// The LLM provider the agent supervisor uses.
    #[serde(default)]
    pub llm: LlmSpec,

    /// Where threads and messages are stored.
    #[serde(default)]
    pub database: DatabaseSpec,

    /// Further service configuration as `CHATGATE_*` keys (limits, origins, log format).
    /// Unknown keys are reported on the status, not ignored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,

    /// A ConfigMap in this namespace whose keys are `CHATGATE_*` configuration keys;
    /// loaded into the pods and validated like `config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<LocalObjectName>,

    /// Critical services startup must produce before a pod takes traffic. Defaults to all.
    #[serde(default = "default_critical_services")]
    #[schemars(length(min = 1))]
    pub critical_services: Vec<CriticalService>,

    /// Startup timing: how long a pod may take to build every critical service.
    #[serde(default)]
    pub startup: StartupSpec,

    /// How new pods replace old ones.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// CPU and memory requests and limits of the service container. When unset the
    /// operator requests 100m CPU and 128Mi memory and limits them to 1 CPU and 512Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Compare this (non-production) configuration with its production baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parity: Option<ParitySpec>,

    /// Which nodes the pods may run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,
}

/// Node placement of the pods, passed to the pod template as written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Labels a node must carry for the pods to run on it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Node taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

fn default_replicas() -> i32 {
    1
}

fn default_critical_services() -> Vec<CriticalService> {
    CriticalService::ALL.to_vec()
}

/// A key of a Secret in the ChatService's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A named object in the ChatService's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectName {
    /// Name of the object, in the ChatService's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The JWT signature algorithm `/ws` accepts (exactly one).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
    ES256,
}

impl JwtAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 => "HS256",
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::ES256 => "ES256",
        }
    }
}

/// JWT verification on `/ws`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.algorithm == 'HS256' || has(self.publicKeyRef)")
        .message("RS256 and ES256 need jwt.publicKeyRef (a Secret key holding the PEM public key)")
)]
pub struct JwtSpec {
    /// The only algorithm accepted. HS256 uses `secretRef`; RS256/ES256 use `publicKeyRef`.
    #[serde(default)]
    pub algorithm: JwtAlgorithm,
    /// Required `iss` claim. Required in staging and production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` claim. Required in staging and production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Secret key holding the HS256 secret (at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the PEM public key for RS256/ES256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_ref: Option<SecretKeyRef>,
    /// Clock skew tolerated on exp/nbf, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 300))]
    pub leeway_seconds: Option<i32>,
}

/// Which LLM API the agent supervisor calls.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    /// Deterministic, offline; for development and tests.
    #[default]
    Builtin,
    /// An OpenAI-compatible chat-completions API.
    Openai,
}

impl LlmProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            LlmProvider::Builtin => "builtin",
            LlmProvider::Openai => "openai",
        }
    }
}

/// The LLM provider of the agent supervisor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmSpec {
    /// `builtin` (deterministic, offline) or `openai` (an OpenAI-compatible API).
    #[serde(default)]
    pub provider: LlmProvider,
    /// Model name sent to the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Base URL of the OpenAI-compatible API (…/v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Secret key holding the provider's API key. Required for `openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
}

/// The thread store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.url) && has(self.urlSecretRef))")
        .message("set database.url or database.urlSecretRef, not both")
)]
pub struct DatabaseSpec {
    /// Database URL without credentials (e.g. `sqlite:///data/chat.db`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Secret key holding the database URL (use this when it carries credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
}

/// Startup timing budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.budgetSeconds % self.periodSeconds == 0")
        .message("startup.budgetSeconds must be a multiple of startup.periodSeconds: the startup probe allows budgetSeconds / periodSeconds failures")
)]
pub struct StartupSpec {
    /// Seconds a pod may take to produce every critical service before it is restarted.
    /// The startup probe's failureThreshold × periodSeconds equals this.
    #[serde(default = "default_budget")]
    #[schemars(range(min = 5, max = 3600))]
    pub budget_seconds: i32,
    /// Seconds between startup probes.
    #[serde(default = "default_probe_period")]
    #[schemars(range(min = 1, max = 60))]
    pub period_seconds: i32,
}

fn default_budget() -> i32 {
    60
}
fn default_probe_period() -> i32 {
    2
}

impl Default for StartupSpec {
    fn default() -> Self {
        StartupSpec {
            budget_seconds: default_budget(),
            period_seconds: default_probe_period(),
        }
    }
}

/// How a new configuration replaces the running pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Extra pods allowed during a rollout (maxUnavailable is always 0).
    #[serde(default = "default_max_surge")]
    #[schemars(range(min = 1, max = 100))]
    pub max_surge: i32,
    /// Seconds a rollout may make no progress before the ChatService is Stalled.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 30, max = 3600))]
    pub progress_deadline_seconds: i32,
    /// Seconds between SIGTERM and closing open sockets (readiness is 503 meanwhile).
    #[serde(default = "default_drain")]
    #[schemars(range(min = 0, max = 600))]
    pub drain_seconds: i32,
}

fn default_max_surge() -> i32 {
    1
}
fn default_progress_deadline() -> i32 {
    600
}
fn default_drain() -> i32 {
    5
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            max_surge: default_max_surge(),
            progress_deadline_seconds: default_progress_deadline(),
            drain_seconds: default_drain(),
        }
    }
}

/// What a parity violation does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ParityMode {
    /// A violation stalls the ChatService: nothing new is rolled out.
    #[default]
    Enforce,
    /// A violation is reported on the status and rolled out anyway.
    Warn,
}

/// Which production ChatService this one is compared with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParitySpec {
    /// The production baseline.
    pub baseline: BaselineRef,
    /// `CHATGATE_*` keys allowed to differ from the baseline despite their parity rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_differences: Vec<String>,
    /// Enforce (violation blocks rollout) or Warn (reported only).
    #[serde(default)]
    pub mode: ParityMode,
}

/// A ChatService, possibly in another namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct BaselineRef {
    /// Name of the production ChatService.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Defaults to the ChatService's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Observed state, following the Kubernetes API conventions and kstatus.
///
/// Defaulted to `observedGeneration: 0` by the API server until the operator writes a
/// status: kstatus (Helm 4's `--wait`, Flux) reads an object with no status at all as
/// `Current`, so a just-created ChatService would count as ready before the operator
/// has seen it; an observed generation behind `metadata.generation` reads `InProgress`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("default" = {"observedGeneration": 0}))]
pub struct ChatServiceStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (always), `Reconciling` and `Stalled` (only while True), and detail
    /// conditions `ConfigValid`, `ParityOK`, `StartupComplete`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Pods of the Deployment, old and new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Pods ready to take traffic (startup complete, readiness passing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Pods running the latest pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
    /// Pods available (ready for at least minReadySeconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_ready: Option<String>,
    /// Pods whose startup failed, with the phase and critical service from their
    /// termination message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub startup_failures: Vec<StartupFailure>,
    /// Every configuration or parity problem found, each naming its key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<ConfigProblem>,
    /// Hash of the configuration last rolled out (the last good one keeps serving when
    /// a newer spec fails validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config_hash: Option<String>,
    /// The generation whose configuration is rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<i64>,
}

/// A pod that failed startup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartupFailure {
    /// The pod's name.
    pub pod: String,
    /// The startup phase that failed (e.g. `supervisor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The critical service that could not be built (e.g. `agent_supervisor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// For people: "agent supervisor missing: LLM API key missing".
    pub message: String,
    /// How often the container restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<i32>,
}

/// One configuration problem, as on `chatgate-operator validate`'s table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigProblem {
    /// The `CHATGATE_*` key or spec field concerned.
    pub key: String,
    /// The rule broken: required, type, unknown-key, secret, parity:match, parity:present, baseline, reference.
    pub rule: String,
    /// What is wrong and what to do.
    pub message: String,
}
