//! The desired children of a validated `ChatService`: ConfigMap, Deployment, Service
//! and PodDisruptionBudget. Pure: no client, no clock, so every wiring rule is proven
//! by unit tests and `chatgate-operator render` prints exactly what would be applied.
//!
//! The Deployment is where the gate is wired: the startup probe holds traffic until
//! every critical service exists (its budget is `failureThreshold × periodSeconds`),
//! readiness follows `/health/ready`, liveness `/health/live` only (never
//! dependencies), a failed startup's one-line reason lands in the pod status through
//! the termination-message path, and a rollout never removes a ready pod first.

use crate::crd::ChatService;
use crate::meta::{self, ANNOTATION_APPLIED_HASH, ANNOTATION_CONFIG_HASH};
use crate::validation::ValidatedSpec;
use chatgate_contract::config::{ConfigSet, ConfigValue, Key};
use chatgate_contract::paths;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use std::collections::BTreeMap;

/// Name of the service container in the pod.
pub const CONTAINER_NAME: &str = "chatgate";
/// Name of the container port serving `/ws`, the probes and `/metrics`.
pub const PORT_NAME: &str = "http";
/// Port of the Service in front of the pods.
pub const SERVICE_PORT: i32 = 80;
/// Seconds the `preStop` hook waits before SIGTERM, so endpoints drop the pod before it
/// starts draining (a `sleep` action: no shell needed in the image).
pub const PRE_STOP_SECONDS: i32 = 5;
/// Seconds of slack after preStop and drain before the kubelet kills the process.
pub const GRACE_MARGIN_SECONDS: i32 = 10;
/// Non-root user the service runs as (the distroless `nonroot` user).
pub const RUN_AS_USER: i64 = 65532;
/// Readiness probe period: how fast a draining or degraded pod leaves the endpoints.
pub const READINESS_PERIOD_SECONDS: i32 = 5;
/// Liveness probe period; liveness only starts once the startup probe succeeded.
pub const LIVENESS_PERIOD_SECONDS: i32 = 10;
/// Consecutive liveness failures before a restart.
pub const LIVENESS_FAILURE_THRESHOLD: i32 = 3;
/// Timeout of each probe request.
pub const PROBE_TIMEOUT_SECONDS: i32 = 2;
/// Old ReplicaSets kept for `kubectl rollout undo`.
pub const REVISION_HISTORY_LIMIT: i32 = 5;

/// Keys the operator sets because they depend on how it runs the container.
pub const OPERATOR_SET: &[(Key, &str)] = &[
    (Key::Listen, "0.0.0.0:8080"),
    (Key::TerminationLog, paths::DEFAULT_TERMINATION_LOG),
];
/// Logs are JSON in a cluster unless the spec says otherwise.
pub const DEFAULT_LOG_FORMAT: (Key, &str) = (Key::LogFormat, "json");

/// Everything the operator wants to exist for one ChatService.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// Only with 2 or more replicas; an existing one is deleted otherwise.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// Hash of the configuration the pods get (pod template annotation).
    pub config_hash: String,
}

impl Desired {
    /// The children as one multi-document YAML stream, as `render` prints them.
    pub fn to_yaml(&self) -> Result<String, serde_norway::Error> {
        let mut docs = vec![
            serde_norway::to_string(&self.config_map)?,
            serde_norway::to_string(&self.deployment)?,
            serde_norway::to_string(&self.service)?,
        ];
        if let Some(pdb) = &self.pod_disruption_budget {
            docs.push(serde_norway::to_string(pdb)?);
        }
        Ok(docs.join("---\n"))
    }
}

/// CPU and memory for the service container when `spec.resources` is unset: requests
/// that fit the service at rest (startup and a few idle sockets), limits with room for
/// bursts of streamed replies.
pub fn default_resources() -> ResourceRequirements {
    let quantities = |cpu: &str, memory: &str| {
        Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ]))
    };
    ResourceRequirements {
        requests: quantities("100m", "128Mi"),
        limits: quantities("1", "512Mi"),
        ..ResourceRequirements::default()
    }
}

/// The desired children of `cs`, whose configuration validation has produced.
///
/// Owner references are set when `cs` has a uid (it came from the API server); an
/// offline render has none. The `resourceVersion` of each referenced Secret enters the
/// configuration hash on the pod template, so rotating a referenced Secret rolls the
/// pods (which read Secret values only when they start); without any (an offline
/// render) the hash is the configuration's alone.
pub fn build(cs: &ChatService, spec: &ValidatedSpec) -> Desired {
    let children = Children::of(cs);
    let (config_map, secret_env) = build_config_map(&children, spec.config());
    let config_hash = config_hash(&config_map, &secret_env, spec.secret_versions());
    let deployment = build_deployment(&children, cs, secret_env, &config_hash);
    Desired {
        config_map: with_applied_hash(config_map),
        deployment: with_applied_hash(deployment),
        service: with_applied_hash(build_service(&children)),
        pod_disruption_budget: (cs.spec.replicas >= 2)
            .then(|| with_applied_hash(build_pod_disruption_budget(&children))),
        config_hash,
    }
}

/// What every child of one ChatService shares: its name, metadata and pod selector.
struct Children {
    name: String,
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
}

impl Children {
    fn of(cs: &ChatService) -> Children {
        let name = cs.name_any();
        Children {
            labels: meta::labels(&name, cs.spec.environment.as_str()),
            selector: meta::selector_labels(&name),
            namespace: cs.namespace(),
            owner: cs.controller_owner_ref(&()),
            name,
        }
    }

    /// The metadata of the child called `object_name`.
    fn metadata(&self, object_name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(object_name),
            namespace: self.namespace.clone(),
            labels: Some(self.labels.clone()),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    fn label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: Some(self.selector.clone()),
            ..LabelSelector::default()
        }
    }
}

/// The ConfigMap of the configuration's literals (and the keys the operator sets), and
/// the container's variables for its Secret references, which stay references.
fn build_config_map(children: &Children, config: &ConfigSet) -> (ConfigMap, Vec<EnvVar>) {
    let mut data = BTreeMap::new();
    let mut secret_env = Vec::new();
    for (key, value) in &config.values {
        match value {
            ConfigValue::Literal(v) => {
                data.insert(key.clone(), v.clone());
            }
            ConfigValue::SecretRef {
                secret,
                key: secret_key,
            } => secret_env.push(EnvVar {
                name: key.clone(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: secret_key.clone(),
                        optional: None,
                    }),
                    ..EnvVarSource::default()
                }),
            }),
        }
    }
    for (k, v) in OPERATOR_SET {
        data.insert(k.to_string(), (*v).to_owned());
    }
    data.entry(DEFAULT_LOG_FORMAT.0.to_string())
        .or_insert_with(|| DEFAULT_LOG_FORMAT.1.to_owned());
    let config_map = ConfigMap {
        metadata: children.metadata(meta::config_map_name(&children.name)),
        data: Some(data),
        ..ConfigMap::default()
    };
    (config_map, secret_env)
}

/// The hash of what the pods read at start: the ConfigMap's data, the Secret
/// references, and (in the cluster) the versions of the referenced Secrets.
fn config_hash(
    config_map: &ConfigMap,
    secret_env: &[EnvVar],
    secret_versions: &BTreeMap<String, String>,
) -> String {
    let empty = BTreeMap::new();
    let data = config_map.data.as_ref().unwrap_or(&empty);
    let text = if secret_versions.is_empty() {
        serde_json::to_string(&(data, secret_env))
    } else {
        serde_json::to_string(&(data, secret_env, secret_versions))
    }
    .unwrap_or_default();
    meta::stable_hash(text.as_bytes())
}

/// An HTTP probe of the service's port.
fn probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(PROBE_TIMEOUT_SECONDS.min(period)),
        ..Probe::default()
    }
}

/// The Deployment running the gated service; `secret_env` are the container's
/// variables read from Secrets, `config_hash` rolls the pods when it changes.
fn build_deployment(
    children: &Children,
    cs: &ChatService,
    secret_env: Vec<EnvVar>,
    config_hash: &str,
) -> Deployment {
    let spec = &cs.spec;
    let period = spec.startup.period_seconds.max(1);
    // The CRD requires the budget to be a multiple of the period; rounding up keeps the
    // budget a lower bound even for input that skipped admission (offline render).
    let startup_failure_threshold = (spec.startup.budget_seconds.max(1) + period - 1) / period;
    let drain = spec.rollout.drain_seconds.max(0);
    let grace = PRE_STOP_SECONDS + drain + GRACE_MARGIN_SECONDS;
    let runtime_default_seccomp = || {
        Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        })
    };
    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(spec.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.to_owned()),
            container_port: i32::from(paths::DEFAULT_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: meta::config_map_name(&children.name),
                optional: None,
            }),
            ..EnvFromSource::default()
        }]),
        env: (!secret_env.is_empty()).then_some(secret_env),
        startup_probe: Some(probe(
            paths::HEALTH_STARTUP,
            period,
            startup_failure_threshold,
        )),
        readiness_probe: Some(probe(paths::HEALTH_READY, READINESS_PERIOD_SECONDS, 1)),
        liveness_probe: Some(probe(
            paths::HEALTH_LIVE,
            LIVENESS_PERIOD_SECONDS,
            LIVENESS_FAILURE_THRESHOLD,
        )),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::from(PRE_STOP_SECONDS),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        termination_message_path: Some(paths::DEFAULT_TERMINATION_LOG.to_owned()),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: runtime_default_seccomp(),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        }]),
        // A container without requests is scheduled as if it needed nothing and,
        // without limits, can take the node's memory: the defaults apply when the spec
        // names none.
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        ..Container::default()
    };
    let scheduling = spec.scheduling.as_ref();
    let pod = PodSpec {
        containers: vec![container],
        termination_grace_period_seconds: Some(i64::from(grace)),
        // The service never talks to the Kubernetes API.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            fs_group: Some(RUN_AS_USER),
            seccomp_profile: runtime_default_seccomp(),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }]),
        node_selector: scheduling
            .filter(|s| !s.node_selector.is_empty())
            .map(|s| s.node_selector.clone()),
        tolerations: scheduling
            .filter(|s| !s.tolerations.is_empty())
            .map(|s| s.tolerations.clone()),
        ..PodSpec::default()
    };
    Deployment {
        metadata: children.metadata(children.name.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: children.label_selector(),
            revision_history_limit: Some(REVISION_HISTORY_LIMIT),
            progress_deadline_seconds: Some(spec.rollout.progress_deadline_seconds),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(spec.rollout.max_surge.max(1))),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(children.labels.clone()),
                    annotations: Some(BTreeMap::from([(
                        ANNOTATION_CONFIG_HASH.to_owned(),
                        config_hash.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The ClusterIP Service in front of the pods.
fn build_service(children: &Children) -> Service {
    Service {
        metadata: children.metadata(children.name.clone()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(children.selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: SERVICE_PORT,
                target_port: Some(IntOrString::String(PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The PodDisruptionBudget that lets a drain take one pod at a time.
fn build_pod_disruption_budget(children: &Children) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: children.metadata(children.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(children.label_selector()),
            // A pod that never became ready protects nothing: let drains evict it.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The object with [`ANNOTATION_APPLIED_HASH`] set to the hash of its content.
fn with_applied_hash<K: Resource + Serialize>(mut object: K) -> K {
    object.annotations_mut().remove(ANNOTATION_APPLIED_HASH);
    let text = serde_json::to_string(&object).unwrap_or_default();
    let hash = meta::stable_hash(text.as_bytes());
    object
        .annotations_mut()
        .insert(ANNOTATION_APPLIED_HASH.to_owned(), hash);
    object
}

#[cfg(test)]
mod tests;
