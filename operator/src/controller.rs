//! The reconcile of one `ChatService`, wiring the pipeline steps together:
//! validate → build → apply → status, plus Events for each condition transition.
//!
//! The steps that decide are pure and live in their own modules; this one only does
//! the I/O between them, and owns the error type and the metrics of a reconcile.

use crate::apply::{self, Stores, WriteError};
use crate::build::{self, CONTAINER_NAME};
use crate::configuration::declared_config;
use crate::crd::{ChatService, ChatServiceStatus};
use crate::meta::{FIELD_MANAGER, LABEL_INSTANCE};
use crate::metrics::Metrics;
use crate::status::{self, Observed, Rollout};
use crate::validation;
use chatgate_contract::config::KEY_PREFIX;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{Instrument, debug, info, info_span, warn};

/// Everything one reconcile fails with. Each variant has a short metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading what the spec references (Secrets, ConfigMap, baseline) failed.
    #[error("reading what ChatService {object} references: {source}")]
    Dereference {
        object: String,
        #[source]
        source: kube::Error,
    },
    /// A child could not be applied or deleted.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The status could not be written.
    #[error("writing the status of ChatService {object}: {source}")]
    Status {
        object: String,
        #[source]
        source: kube::Error,
    },
    /// A ChatService without a namespace (cannot come from the API server).
    #[error("ChatService {0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// The `reason` label of `chatgate_operator_reconcile_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Dereference { .. } => "dereference",
            Error::Write(_) => "apply",
            Error::Status { .. } => "status",
            Error::NoNamespace(_) => "no_namespace",
        }
    }
}

/// The clock, injected so the status step is deterministic in tests.
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

/// The wall clock, to the second (the precision Kubernetes stores).
pub fn system_clock() -> Clock {
    Arc::new(|| {
        let now = k8s_openapi::jiff::Timestamp::now();
        Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
    })
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// How often a ChatService is reconciled with no event at all.
    pub resync: Duration,
}

/// Reconciles one ChatService: one tracing span, one duration sample, one counter.
pub async fn reconcile(cs: Arc<ChatService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", name = %cs.name_any(), namespace = cs.namespace().unwrap_or_default());
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&cs, &ctx).instrument(span).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        ctx.metrics.failed(e.metric_label());
    }
    ctx.metrics.completed.inc();
    result
}

/// Retries a failed reconcile after a short pause; the error is logged once.
pub fn error_policy(cs: Arc<ChatService>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(name = %cs.name_any(), namespace = cs.namespace().unwrap_or_default(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_inner(cs: &ChatService, ctx: &Context) -> Result<Action, Error> {
    let name = cs.name_any();
    let namespace = cs
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    if cs.meta().deletion_timestamp.is_some() {
        // Children go with it: the garbage collector follows their owner references.
        return Ok(Action::await_change());
    }
    let object = format!("{namespace}/{name}");

    // 1. Read what the spec points at, and validate.
    let validation =
        validation::check(&ctx.client, cs)
            .await
            .map_err(|source| Error::Dereference {
                object: object.clone(),
                source,
            })?;

    // 2 + 3. Build and apply, unless the configuration must not roll out.
    let prev = cs.status.clone().unwrap_or_default();
    let live_deployment = || {
        ctx.stores
            .deployments
            .get(&ObjectRef::new(&name).within(&namespace))
    };
    let prev_applied = prev
        .applied_config_hash
        .clone()
        .zip(prev.applied_generation);
    let mut apply_error = None;
    let (deployment, applied) = if validation.blocks_rollout() {
        debug!(
            problems = validation.all_problems().count(),
            "configuration blocked; the last good workload stays"
        );
        (live_deployment(), prev_applied)
    } else {
        let config_map_data = validation.config_map_data.as_ref().map(|d| {
            d.iter()
                .filter(|(k, _)| k.starts_with(KEY_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        });
        let (config, _) = declared_config(&cs.spec, config_map_data.as_ref());
        let desired = build::build(cs, &config);
        match apply::apply(&ctx.client, &ctx.stores, &desired).await {
            Ok(result) => {
                ctx.metrics.wrote("children", u64::from(result.writes));
                if result.writes > 0 {
                    info!(writes = result.writes, config_hash = %desired.config_hash, "applied children");
                }
                let applied =
                    if prev.applied_config_hash.as_deref() == Some(desired.config_hash.as_str()) {
                        // Same configuration: keep the generation that first rolled it out.
                        prev.applied_config_hash
                            .clone()
                            .zip(prev.applied_generation.or(cs.metadata.generation))
                    } else {
                        Some((
                            desired.config_hash.clone(),
                            cs.metadata.generation.unwrap_or(0),
                        ))
                    };
                (Some(result.deployment), applied)
            }
            Err(e) => {
                // Said on the status too, then retried through the error policy.
                apply_error = Some(e);
                (live_deployment(), prev_applied)
            }
        }
    };

    // 4. Status, from what was applied and what the pods report.
    let pods: Vec<Pod> = ctx
        .stores
        .pods
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|p| p.labels().get(LABEL_INSTANCE) == Some(&name))
        .map(|p| p.as_ref().clone())
        .collect();
    let observed = Observed {
        generation: cs.metadata.generation,
        desired_replicas: cs.spec.replicas,
        validation: &validation,
        rollout: deployment.as_deref().map(Rollout::of),
        startup_failures: status::startup_failures(&pods, CONTAINER_NAME),
        applied,
        apply_error: apply_error.as_ref().map(ToString::to_string),
    };
    let next = status::desired_status(cs.status.as_ref(), &observed, &(ctx.clock)());
    if cs.status.as_ref() != Some(&next) {
        write_status(ctx, cs, &next)
            .await
            .map_err(|source| Error::Status { object, source })?;
        ctx.metrics.wrote("status", 1);
        publish_transitions(ctx, cs, &prev, &next).await;
    }
    if let Some(e) = apply_error {
        return Err(e.into());
    }
    Ok(Action::requeue(ctx.resync))
}

async fn write_status(
    ctx: &Context,
    cs: &ChatService,
    status: &ChatServiceStatus,
) -> Result<(), kube::Error> {
    let api: Api<ChatService> =
        Api::namespaced(ctx.client.clone(), &cs.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": ChatService::api_version(&()),
        "kind": ChatService::kind(&()),
        "status": status,
    });
    api.patch_status(
        &cs.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// One Event per condition that appeared or changed. Events are best effort: a
/// failure to record one is logged, never fails the reconcile.
async fn publish_transitions(
    ctx: &Context,
    cs: &ChatService,
    prev: &ChatServiceStatus,
    next: &ChatServiceStatus,
) {
    let reference = cs.object_ref(&());
    for t in status::transitions(&prev.conditions, &next.conditions) {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.clone(),
            note: Some(crate::conditions::truncate(
                &format!("{}={}: {}", t.type_, t.status, t.message),
                1000,
            )),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, reason = %t.reason, "could not record an Event");
        }
    }
}
