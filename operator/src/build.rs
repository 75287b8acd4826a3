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
use chatgate_contract::config::{ConfigSet, ConfigValue};
use chatgate_contract::paths;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceRequirements, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
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
pub const OPERATOR_SET: &[(&str, &str)] = &[
    ("CHATGATE_LISTEN", "0.0.0.0:8080"),
    ("CHATGATE_TERMINATION_LOG", paths::DEFAULT_TERMINATION_LOG),
];
/// Logs are JSON in a cluster unless the spec says otherwise.
pub const DEFAULT_LOG_FORMAT: (&str, &str) = ("CHATGATE_LOG_FORMAT", "json");

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

/// The desired children of `cs`, whose configuration is `config` (from
/// [`crate::configuration::declared_config`], validated).
///
/// Owner references are set when `cs` has a uid (it came from the API server); an
/// offline render has none.
pub fn build(cs: &ChatService, config: &ConfigSet) -> Desired {
    build_with_secrets(cs, config, &BTreeMap::new())
}

/// As [`build`], with the `resourceVersion` of each referenced Secret by name: they
/// enter the configuration hash on the pod template, so rotating a referenced Secret
/// rolls the pods (which read Secret values only when they start). Without any (an
/// offline render) the hash is the configuration's alone.
pub fn build_with_secrets(
    cs: &ChatService,
    config: &ConfigSet,
    secret_versions: &BTreeMap<String, String>,
) -> Desired {
    let name = cs.name_any();
    let namespace = cs.namespace();
    let env = cs.spec.environment.as_str();
    let labels = meta::labels(&name, env);
    let owner: Option<OwnerReference> = cs.controller_owner_ref(&());

    let metadata = |object_name: String| ObjectMeta {
        name: Some(object_name),
        namespace: namespace.clone(),
        labels: Some(labels.clone()),
        owner_references: owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    };

    // Literals go to the ConfigMap, Secret references stay references.
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
            } => secret_env.push(json!({
                "name": key,
                "valueFrom": { "secretKeyRef": { "name": secret, "key": secret_key } },
            })),
        }
    }
    for (k, v) in OPERATOR_SET {
        data.insert((*k).to_owned(), (*v).to_owned());
    }
    data.entry(DEFAULT_LOG_FORMAT.0.to_owned())
        .or_insert_with(|| DEFAULT_LOG_FORMAT.1.to_owned());

    let config_hash = {
        let text = if secret_versions.is_empty() {
            serde_json::to_string(&(&data, &secret_env))
        } else {
            serde_json::to_string(&(&data, &secret_env, secret_versions))
        }
        .unwrap_or_default();
        meta::stable_hash(text.as_bytes())
    };

    let cm_name = meta::config_map_name(&name);
    let config_map = with_applied_hash(ConfigMap {
        metadata: metadata(cm_name.clone()),
        data: Some(data),
        ..ConfigMap::default()
    });

    let spec = &cs.spec;
    let period = spec.startup.period_seconds.max(1);
    // The CRD requires the budget to be a multiple of the period; rounding up keeps the
    // budget a lower bound even for input that skipped admission (offline render).
    let startup_failure_threshold = (spec.startup.budget_seconds.max(1) + period - 1) / period;
    let drain = spec.rollout.drain_seconds.max(0);
    let grace = PRE_STOP_SECONDS + drain + GRACE_MARGIN_SECONDS;
    let probe = |path: &str, period: i32, failure_threshold: i32| {
        json!({
            "httpGet": { "path": path, "port": PORT_NAME },
            "periodSeconds": period,
            "failureThreshold": failure_threshold,
            "timeoutSeconds": PROBE_TIMEOUT_SECONDS.min(period),
        })
    };
    let mut container = json!({
        "name": CONTAINER_NAME,
        "image": spec.image,
        "ports": [{ "name": PORT_NAME, "containerPort": i32::from(paths::DEFAULT_PORT), "protocol": "TCP" }],
        "envFrom": [{ "configMapRef": { "name": cm_name } }],
        "startupProbe": probe(paths::HEALTH_STARTUP, period, startup_failure_threshold),
        "readinessProbe": probe(paths::HEALTH_READY, READINESS_PERIOD_SECONDS, 1),
        "livenessProbe": probe(paths::HEALTH_LIVE, LIVENESS_PERIOD_SECONDS, LIVENESS_FAILURE_THRESHOLD),
        "lifecycle": { "preStop": { "sleep": { "seconds": PRE_STOP_SECONDS } } },
        "terminationMessagePath": paths::DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": RUN_AS_USER,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [{ "name": "tmp", "mountPath": "/tmp" }],
    });
    if !secret_env.is_empty() {
        container["env"] = Value::Array(secret_env);
    }
    // A container without requests is scheduled as if it needed nothing and, without
    // limits, can take the node's memory: the defaults apply when the spec names none.
    let resources = spec.resources.clone().unwrap_or_else(default_resources);
    container["resources"] = serde_json::to_value(resources).unwrap_or_default();

    let selector = meta::selector_labels(&name);
    let mut deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name.clone()),
        "spec": {
            "replicas": spec.replicas,
            "selector": { "matchLabels": selector },
            "revisionHistoryLimit": REVISION_HISTORY_LIMIT,
            "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": { "maxUnavailable": 0, "maxSurge": spec.rollout.max_surge.max(1) },
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        ANNOTATION_CONFIG_HASH: config_hash,
                    },
                },
                "spec": {
                    "containers": [container],
                    "terminationGracePeriodSeconds": grace,
                    // The service never talks to the Kubernetes API.
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                        "seccompProfile": { "type": "RuntimeDefault" },
                    },
                    "volumes": [{ "name": "tmp", "emptyDir": {} }],
                },
            },
        },
    });
    if let Some(scheduling) = &spec.scheduling {
        let pod = &mut deployment["spec"]["template"]["spec"];
        if !scheduling.node_selector.is_empty() {
            pod["nodeSelector"] = json!(scheduling.node_selector);
        }
        if !scheduling.tolerations.is_empty() {
            pod["tolerations"] = serde_json::to_value(&scheduling.tolerations).unwrap_or_default();
        }
    }
    let deployment: Deployment = typed(deployment);

    let service: Service = typed(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name.clone()),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{ "name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP" }],
        },
    }));

    let pod_disruption_budget = (spec.replicas >= 2).then(|| {
        typed::<PodDisruptionBudget>(json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(name.clone()),
            "spec": {
                "maxUnavailable": 1,
                "selector": { "matchLabels": selector },
                // A pod that never became ready protects nothing: let drains evict it.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }))
    });

    Desired {
        config_map,
        deployment: with_applied_hash(deployment),
        service: with_applied_hash(service),
        pod_disruption_budget: pod_disruption_budget.map(with_applied_hash),
        config_hash,
    }
}

/// `value` (built here from typed parts) as the typed object. The JSON is built from
/// typed values, so a mismatch is a bug in this file, caught by the unit tests.
fn typed<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("children are built from typed values")
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
