//! A ChatService as a Knative Serving `Service` (`serving.knative.dev/v1`): the
//! manifest `gcloud run services replace` takes for Cloud Run, or the one a
//! self-hosted Knative Serving applies. Pure, like [`crate::build`]: one spec, one
//! mapping, every rule unit-tested.
//!
//! The gate maps onto the platform's own probes: the startup probe holds traffic until
//! `/health/startup` is 200 (budget = `failureThreshold × periodSeconds`), liveness
//! asks `/health/live`. What a platform cannot do is refused with the field and the
//! limit, never silently approximated: a startup budget Cloud Run would cut short is
//! exactly the outage chatgate exists to prevent.

use crate::build::{
    CONTAINER_NAME, LIVENESS_FAILURE_THRESHOLD, LIVENESS_PERIOD_SECONDS, PROBE_TIMEOUT_SECONDS,
    READINESS_PERIOD_SECONDS,
};
use crate::crd::ChatService;
use crate::meta;
use chatgate_contract::config::{ConfigSet, ConfigValue, Key};
use chatgate_contract::paths;
use k8s_openapi::api::core::v1::{
    ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar, EnvVarSource,
    HTTPGetAction, Probe, ResourceRequirements, SecretKeySelector, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The annotation that says where a ChatService is deployed; `validate` checks a
/// ChatService annotated `cloudrun` against Cloud Run's limits.
pub const ANNOTATION_TARGET: &str = "chatgate.dev/target";

/// Seconds Cloud Run waits after SIGTERM before SIGKILL (not configurable).
pub const CLOUD_RUN_SIGTERM_SECONDS: i32 = 10;
/// Seconds of the SIGTERM window the service needs after its drain: closing every
/// socket with 1012, flushing the last agent events and exiting.
pub const DRAIN_EXIT_SECONDS: i32 = 2;
/// Longest startup probe Cloud Run runs (`failureThreshold × periodSeconds`).
pub const CLOUD_RUN_MAX_STARTUP_SECONDS: i32 = 240;
/// Longest request Cloud Run and (by default settings raised to it) Knative allow; a
/// WebSocket is one request, so no socket outlives it.
pub const MAX_REQUEST_TIMEOUT_SECONDS: i64 = 3600;
/// Highest `containerConcurrency` Cloud Run (and Knative by default) accepts.
pub const MAX_CONTAINER_CONCURRENCY: i64 = 1000;
/// Longest Cloud Run service name (revision names add a suffix to it).
pub const CLOUD_RUN_MAX_NAME_LEN: usize = 49;
/// Most CPUs a Cloud Run instance may have.
pub const CLOUD_RUN_MAX_CPU_MILLIS: i64 = 8000;
/// Most memory a Cloud Run instance may have (32 GiB).
pub const CLOUD_RUN_MAX_MEMORY_BYTES: i64 = 32 * 1024 * 1024 * 1024;
/// Name of the container port: `http1` makes Cloud Run and Knative speak HTTP/1.1 to
/// the container, which WebSocket upgrades need.
pub const PORT_NAME: &str = "http1";
/// The Secret Manager version a rendered Cloud Run service reads.
pub const SECRET_VERSION: &str = "latest";

/// Where a rendered manifest goes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The children the operator applies (ConfigMap, Deployment, Service, PDB).
    #[default]
    Kubernetes,
    /// A Cloud Run service, for `gcloud run services replace`.
    Cloudrun,
    /// A Knative Serving Service, for `kubectl apply`.
    Knative,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Kubernetes => "kubernetes",
            Target::Cloudrun => "cloudrun",
            Target::Knative => "knative",
        }
    }

    /// The target a ChatService's [`ANNOTATION_TARGET`] names, if any.
    pub fn annotated(cs: &ChatService) -> Option<Target> {
        match cs.annotations().get(ANNOTATION_TARGET).map(String::as_str) {
            Some("cloudrun") => Some(Target::Cloudrun),
            Some("knative") => Some(Target::Knative),
            Some("kubernetes") => Some(Target::Kubernetes),
            _ => None,
        }
    }

    fn platform(self) -> &'static str {
        match self {
            Target::Kubernetes => "Kubernetes",
            Target::Cloudrun => "Cloud Run",
            Target::Knative => "Knative",
        }
    }
}

/// Something a ChatService asks for that the target cannot do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The spec field or configuration key, e.g. `spec.startup.budgetSeconds`.
    pub field: String,
    /// What is wrong, with the platform's limit.
    pub message: String,
    /// What to change.
    pub fix: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.field, self.message, self.fix)
    }
}

/// `serving.knative.dev/v1` `Service`, the fields chatgate sets.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KnativeService {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: KnativeServiceSpec,
}

/// The Service's spec: only a revision template (all traffic to the latest revision).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KnativeServiceSpec {
    pub template: RevisionTemplate,
}

/// The template every new revision is made from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevisionTemplate {
    pub metadata: ObjectMeta,
    pub spec: RevisionSpec,
}

/// A revision: its limits and its one container.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSpec {
    /// Requests (here: open WebSockets) one instance takes at a time.
    pub container_concurrency: i64,
    /// Longest request, so the longest a WebSocket stays open.
    pub timeout_seconds: i64,
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}

impl KnativeService {
    pub fn to_yaml(&self) -> Result<String, serde_norway::Error> {
        serde_norway::to_string(self)
    }

    /// Sets (or replaces) a plain environment variable of the container.
    pub fn set_env(&mut self, name: &str, value: &str) {
        for container in &mut self.spec.template.spec.containers {
            let env = container.env.get_or_insert_with(Vec::new);
            env.retain(|e| e.name != name);
            env.push(EnvVar {
                name: name.to_owned(),
                value: Some(value.to_owned()),
                value_from: None,
            });
            env.sort_by(|a, b| a.name.cmp(&b.name));
        }
    }
}

/// Everything the target cannot do for `cs` (empty: it can be rendered). `config` is
/// the ChatService's declared configuration.
pub fn refusals(cs: &ChatService, config: &ConfigSet, target: Target) -> Vec<Refusal> {
    let mut out = Vec::new();
    if target == Target::Kubernetes {
        return out;
    }
    let spec = &cs.spec;
    let platform = target.platform();
    let mut refuse = |field: &str, message: String, fix: String| {
        out.push(Refusal {
            field: field.to_owned(),
            message,
            fix,
        });
    };

    if spec.replicas < 1 {
        refuse(
            "spec.replicas",
            format!(
                "is 0; the {platform} service keeps exactly spec.replicas instances (min = max scale), and a max scale of 0 means unlimited"
            ),
            "set spec.replicas to 1 or more".into(),
        );
    }
    if let Some(idle) = config
        .effective(Key::IdleTimeoutSeconds)
        .and_then(|v| v.trim().parse::<i64>().ok())
        && idle > MAX_REQUEST_TIMEOUT_SECONDS
    {
        refuse(
            Key::IdleTimeoutSeconds.as_str(),
            format!(
                "is {idle} s, but {platform} ends every request, so every WebSocket, after at most {MAX_REQUEST_TIMEOUT_SECONDS} s (the request timeout)"
            ),
            format!("set it to {MAX_REQUEST_TIMEOUT_SECONDS} or less in spec.config"),
        );
    }
    if target != Target::Cloudrun {
        return out;
    }

    let name = cs.name_any();
    if name.len() > CLOUD_RUN_MAX_NAME_LEN {
        refuse(
            "metadata.name",
            format!(
                "`{name}` has {} characters; a Cloud Run service name has at most {CLOUD_RUN_MAX_NAME_LEN}",
                name.len()
            ),
            "rename the ChatService".into(),
        );
    }
    let budget = spec.startup.budget_seconds;
    if budget > CLOUD_RUN_MAX_STARTUP_SECONDS {
        refuse(
            "spec.startup.budgetSeconds",
            format!(
                "is {budget} s, but Cloud Run runs a startup probe for at most {CLOUD_RUN_MAX_STARTUP_SECONDS} s (failureThreshold × periodSeconds); a shorter probe would restart instances still starting"
            ),
            format!("set it to {CLOUD_RUN_MAX_STARTUP_SECONDS} or less, or make startup faster"),
        );
    }
    let drain = spec.rollout.drain_seconds;
    let max_drain = CLOUD_RUN_SIGTERM_SECONDS - DRAIN_EXIT_SECONDS;
    if drain > max_drain {
        refuse(
            "spec.rollout.drainSeconds",
            format!(
                "is {drain} s, but Cloud Run kills an instance {CLOUD_RUN_SIGTERM_SECONDS} s after SIGTERM and the service needs {DRAIN_EXIT_SECONDS} s after the drain to close sockets with 1012 and exit"
            ),
            format!("set it to {max_drain} or less"),
        );
    }
    if spec.config_map_ref.is_some() {
        refuse(
            "spec.configMapRef",
            "Cloud Run has no ConfigMaps".into(),
            "move its keys into spec.config".into(),
        );
    }
    if spec.scheduling.is_some() {
        refuse(
            "spec.scheduling",
            "Cloud Run has no nodes to select or tolerate".into(),
            "remove spec.scheduling from the Cloud Run ChatService".into(),
        );
    }
    let limits = spec.resources.as_ref().and_then(|r| r.limits.as_ref());
    if let Some(cpu) = limits.and_then(|l| l.get("cpu")) {
        match cpu_millis(&cpu.0) {
            None => refuse(
                "spec.resources.limits.cpu",
                format!("`{}` is not a CPU quantity", cpu.0),
                "write it as `1`, `2` or `500m`".into(),
            ),
            Some(m) if m > CLOUD_RUN_MAX_CPU_MILLIS => refuse(
                "spec.resources.limits.cpu",
                format!("is {}, more than Cloud Run's 8 CPUs", cpu.0),
                "set it to 8 or less".into(),
            ),
            Some(m) if m < 1000 && concurrency(config) > 1 => refuse(
                "spec.resources.limits.cpu",
                format!(
                    "is {}; Cloud Run allows less than 1 CPU only with a concurrency of 1, and a chat instance serves many sockets",
                    cpu.0
                ),
                "set it to 1 or more".into(),
            ),
            Some(_) => {}
        }
    }
    if let Some(memory) = limits.and_then(|l| l.get("memory")) {
        match memory_bytes(&memory.0) {
            None => refuse(
                "spec.resources.limits.memory",
                format!("`{}` is not a memory quantity", memory.0),
                "write it as `512Mi` or `2Gi`".into(),
            ),
            Some(b) if b > CLOUD_RUN_MAX_MEMORY_BYTES => refuse(
                "spec.resources.limits.memory",
                format!("is {}, more than Cloud Run's 32Gi", memory.0),
                "set it to 32Gi or less".into(),
            ),
            Some(_) => {}
        }
    }
    out
}

/// Open WebSockets one instance takes: the service's own limit, within the platform's.
fn concurrency(config: &ConfigSet) -> i64 {
    config
        .effective(Key::MaxConnections)
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(MAX_CONTAINER_CONCURRENCY)
        .clamp(1, MAX_CONTAINER_CONCURRENCY)
}

/// Notes about a mapping that changes nothing the ChatService relies on but is worth
/// knowing (printed as warnings by `render`).
pub fn notes(config: &ConfigSet, target: Target) -> Vec<String> {
    let mut out = Vec::new();
    if target == Target::Kubernetes {
        return out;
    }
    if let Some(max) = config
        .effective(Key::MaxConnections)
        .and_then(|v| v.trim().parse::<i64>().ok())
        && max > MAX_CONTAINER_CONCURRENCY
    {
        out.push(format!(
            "{} is {max}; {} routes at most {MAX_CONTAINER_CONCURRENCY} concurrent requests to one instance, so containerConcurrency is {MAX_CONTAINER_CONCURRENCY}",
            Key::MaxConnections,
            target.platform()
        ));
    }
    out
}

/// The Knative Service for `cs` on `target` (Cloud Run or Knative); call [`refusals`]
/// first: this renders what it is given.
pub fn knative_service(cs: &ChatService, config: &ConfigSet, target: Target) -> KnativeService {
    let cloud_run = target == Target::Cloudrun;
    let spec = &cs.spec;
    let name = cs.name_any();

    // Literal configuration inline (Cloud Run has no ConfigMaps; for Knative one
    // object keeps the revision self-contained), Secret references as the platform's
    // secret references.
    let mut env = Vec::new();
    for (key, value) in &config.values {
        let var = match value {
            ConfigValue::Literal(v) => EnvVar {
                name: key.clone(),
                value: Some(v.clone()),
                value_from: None,
            },
            ConfigValue::SecretRef { secret, key: k } => {
                let (secret_name, secret_key) = if cloud_run {
                    (secret_manager_name(secret, k), SECRET_VERSION.to_owned())
                } else {
                    (secret.clone(), k.clone())
                };
                EnvVar {
                    name: key.clone(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret_name,
                            key: secret_key,
                            optional: None,
                        }),
                        ..EnvVarSource::default()
                    }),
                }
            }
        };
        env.push(var);
    }
    // The platform sets $PORT, which the service listens on when CHATGATE_LISTEN is
    // unset; logs are JSON for Cloud Logging unless the spec says otherwise.
    if config.get(crate::build::DEFAULT_LOG_FORMAT.0).is_none() {
        env.push(EnvVar {
            name: crate::build::DEFAULT_LOG_FORMAT.0.to_string(),
            value: Some(crate::build::DEFAULT_LOG_FORMAT.1.to_owned()),
            value_from: None,
        });
    }
    env.sort_by(|a, b| a.name.cmp(&b.name));

    let period = spec.startup.period_seconds.max(1);
    let failure_threshold = (spec.startup.budget_seconds.max(1) + period - 1) / period;
    let port = i32::from(paths::DEFAULT_PORT);
    let probe = |path: &str, period: i32, failure_threshold: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(PROBE_TIMEOUT_SECONDS.min(period)),
        ..Probe::default()
    };

    let resources = spec.resources.as_ref().map(|r| ResourceRequirements {
        // Cloud Run sizes an instance by its limits only.
        requests: if cloud_run { None } else { r.requests.clone() },
        limits: r.limits.clone(),
        ..ResourceRequirements::default()
    });

    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(spec.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.to_owned()),
            container_port: port,
            ..ContainerPort::default()
        }]),
        env: Some(env),
        env_from: (!cloud_run)
            .then(|| {
                spec.config_map_ref.as_ref().map(|r| {
                    vec![EnvFromSource {
                        config_map_ref: Some(ConfigMapEnvSource {
                            name: r.name.clone(),
                            optional: None,
                        }),
                        ..EnvFromSource::default()
                    }]
                })
            })
            .flatten(),
        startup_probe: Some(probe(paths::HEALTH_STARTUP, period, failure_threshold)),
        // Cloud Run stops routing to an instance at SIGTERM by itself; Knative's
        // queue-proxy also reads readiness, so a draining pod leaves at once.
        readiness_probe: (!cloud_run)
            .then(|| probe(paths::HEALTH_READY, READINESS_PERIOD_SECONDS, 1)),
        liveness_probe: Some(probe(
            paths::HEALTH_LIVE,
            LIVENESS_PERIOD_SECONDS,
            LIVENESS_FAILURE_THRESHOLD,
        )),
        resources,
        termination_message_policy: (!cloud_run).then(|| "FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };

    let scale = spec.replicas.max(1).to_string();
    let mut template_annotations = BTreeMap::new();
    if cloud_run {
        template_annotations.insert("autoscaling.knative.dev/minScale".to_owned(), scale.clone());
        template_annotations.insert("autoscaling.knative.dev/maxScale".to_owned(), scale);
        // Startup (and so the startup budget) runs with full CPU.
        template_annotations.insert(
            "run.googleapis.com/startup-cpu-boost".to_owned(),
            "true".to_owned(),
        );
        // A reconnecting client returns to the instance that holds its state.
        template_annotations.insert(
            "run.googleapis.com/sessionAffinity".to_owned(),
            "true".to_owned(),
        );
    } else {
        template_annotations.insert(
            "autoscaling.knative.dev/min-scale".to_owned(),
            scale.clone(),
        );
        template_annotations.insert("autoscaling.knative.dev/max-scale".to_owned(), scale);
    }

    // Cloud Run labels may not contain `/` or `.`; Knative takes the operator's own.
    let labels = if cloud_run {
        BTreeMap::from([
            ("managed-by".to_owned(), meta::MANAGED_BY.to_owned()),
            (
                "chatgate-environment".to_owned(),
                spec.environment.as_str().to_owned(),
            ),
        ])
    } else {
        meta::labels(&name, spec.environment.as_str())
    };

    let (node_selector, tolerations) = match (&spec.scheduling, cloud_run) {
        (Some(s), false) => (
            (!s.node_selector.is_empty()).then(|| s.node_selector.clone()),
            (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
        ),
        _ => (None, None),
    };

    KnativeService {
        api_version: "serving.knative.dev/v1".to_owned(),
        kind: "Service".to_owned(),
        metadata: ObjectMeta {
            name: Some(name),
            // On Cloud Run the namespace is the project, which gcloud supplies.
            namespace: if cloud_run { None } else { cs.namespace() },
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: KnativeServiceSpec {
            template: RevisionTemplate {
                metadata: ObjectMeta {
                    labels: (!cloud_run).then_some(labels),
                    annotations: Some(template_annotations),
                    ..ObjectMeta::default()
                },
                spec: RevisionSpec {
                    container_concurrency: concurrency(config),
                    timeout_seconds: MAX_REQUEST_TIMEOUT_SECONDS,
                    containers: vec![container],
                    node_selector,
                    tolerations,
                },
            },
        },
    }
}

/// The Secret Manager secret a Kubernetes Secret key maps to: `<secret>-<key>`, with
/// characters Secret Manager does not allow in names (`.`, for one) turned into `-`.
pub fn secret_manager_name(secret: &str, key: &str) -> String {
    format!("{secret}-{key}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A CPU quantity (`2`, `500m`, `1.5`) in millicores.
fn cpu_millis(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Some(m) = text.strip_suffix('m') {
        return m.parse::<i64>().ok();
    }
    let cores: f64 = text.parse().ok()?;
    (cores.is_finite() && cores >= 0.0).then(|| (cores * 1000.0).round() as i64)
}

/// A memory quantity (`512Mi`, `2Gi`, `1G`, `1000000`) in bytes.
fn memory_bytes(text: &str) -> Option<i64> {
    let text = text.trim();
    const UNITS: [(&str, f64); 10] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("k", 1e3),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("", 1.0),
    ];
    let (number, factor) = UNITS
        .iter()
        .find_map(|(suffix, factor)| text.strip_suffix(suffix).map(|n| (n, *factor)))?;
    let n: f64 = number.parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some((n * factor) as i64)
}

#[cfg(test)]
mod tests;
