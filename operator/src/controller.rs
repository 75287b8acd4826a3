//! The reconcile of one `ChatService`, wiring the pipeline steps together:
//! validate → build → apply → status, plus Events for each condition transition.
//!
//! The steps that decide are pure and live in their own modules; this one only does
//! the I/O between them, and owns the error type and the metrics of a reconcile.

use crate::apply::{self, ApplyError, Stores, WriteError};
use crate::build::{self, CONTAINER_NAME};
use crate::crd::{ChatService, ChatServiceStatus};
use crate::meta::{FIELD_MANAGER, LABEL_INSTANCE};
use crate::metrics::Metrics;
use crate::status::{self, Applying, NotApplied, Observed};
use crate::validation;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use std::collections::{BTreeMap, HashMap};
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
    /// Consecutive failed reconciles per ChatService (`namespace/name`), for the back-off.
    pub failures: std::sync::Mutex<BTreeMap<String, u32>>,
    /// Statuses written that the ChatService cache may not show yet.
    pub written: Arc<WrittenStatuses>,
    /// The namespaces the operator watches; `None` for every namespace.
    pub watched_namespaces: Option<Vec<String>>,
}

impl Context {
    /// Whether a change in `namespace` reaches the operator through its watches.
    pub fn watches_namespace(&self, namespace: &str) -> bool {
        self.watched_namespaces
            .as_ref()
            .is_none_or(|watched| watched.iter().any(|w| w == namespace))
    }
}

/// The statuses this operator wrote that its ChatService cache may not show yet.
///
/// A reconcile triggered by a child (a Deployment's status, say) can start before the
/// watch has delivered the status the previous reconcile wrote. Starting from the
/// cached, older status it would write the same status again and announce the same
/// transitions twice (with 500 ChatServices created at once, a quarter of the status
/// writes were such repeats). So a written status is kept, with the resource version
/// of the ChatService it was computed from, until the cache moves past that version.
#[derive(Default)]
pub struct WrittenStatuses(std::sync::Mutex<HashMap<ObjectRef<ChatService>, Written>>);

struct Written {
    uid: Option<String>,
    /// The resource version of the ChatService the status was computed from.
    resource_version: Option<String>,
    status: ChatServiceStatus,
}

impl Written {
    /// Whether this status was computed from `cs` exactly as the cache holds it.
    fn computed_from(&self, cs: &ChatService) -> bool {
        self.uid == cs.metadata.uid && self.resource_version == cs.metadata.resource_version
    }
}

impl WrittenStatuses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<ChatService>, Written>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest status of `cs` this operator knows: the one it wrote, while the cache
    /// still holds the version that status was computed from; else the cached one.
    pub fn newest(&self, cs: &ChatService) -> Option<ChatServiceStatus> {
        let key = ObjectRef::from_obj(cs);
        let mut written = self.lock();
        match written.get(&key) {
            Some(w) if w.computed_from(cs) => Some(w.status.clone()),
            Some(_) => {
                written.remove(&key);
                cs.status.clone()
            }
            None => cs.status.clone(),
        }
    }

    /// `status` was written, computed from `cs` as it was then.
    pub fn wrote(&self, cs: &ChatService, status: &ChatServiceStatus) {
        self.lock().insert(
            ObjectRef::from_obj(cs),
            Written {
                uid: cs.metadata.uid.clone(),
                resource_version: cs.metadata.resource_version.clone(),
                status: status.clone(),
            },
        );
    }

    /// The watch delivered `cs` (changed or deleted): a status computed from an older
    /// version is in the cache now, or no longer matters.
    pub fn seen(&self, cs: &ChatService) {
        let key = ObjectRef::from_obj(cs);
        let mut written = self.lock();
        if written.get(&key).is_some_and(|w| !w.computed_from(cs)) {
            written.remove(&key);
        }
    }

    /// `cs` is gone.
    pub fn forget(&self, cs: &ChatService) {
        self.lock().remove(&ObjectRef::from_obj(cs));
    }
}

/// The first retry after a failed reconcile waits about this long.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Retries never wait longer than this, so a fixed cause is noticed within minutes.
const RETRY_CAP: Duration = Duration::from_secs(300);

/// How long to wait before retrying after the `failures`-th consecutive failure:
/// exponential from `RETRY_BASE`, capped at `RETRY_CAP`, with "equal jitter" —
/// somewhere in the upper half of that ceiling, chosen by `unit` (0.0..=1.0) — so
/// ChatServices that failed together (an API server outage) do not retry together.
pub fn retry_delay(failures: u32, unit: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let ceiling = RETRY_BASE.saturating_mul(1u32 << doublings).min(RETRY_CAP);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        1.0
    };
    ceiling / 2 + ceiling.mul_f64(unit / 2.0)
}

/// A uniformly spread number in 0.0..=1.0 without a random-number dependency: the
/// standard library seeds every `RandomState` from the operating system.
fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// How soon a ChatService that depends on an object no watch covers is looked at
/// again: a foreign object holding a child's name (its removal is noticed this way),
/// or a parity baseline in a namespace the operator does not watch (its creation or
/// change is).
const UNWATCHED_RECHECK: Duration = Duration::from_secs(15);

/// Reconciles one ChatService: one tracing span, one duration sample, one counter.
pub async fn reconcile(cs: Arc<ChatService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", name = %cs.name_any(), namespace = cs.namespace().unwrap_or_default());
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&cs, &ctx).instrument(span).await;
    if result.is_ok() {
        // A success starts the back-off over.
        ctx.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&format!(
                "{}/{}",
                cs.namespace().unwrap_or_default(),
                cs.name_any()
            ));
    }
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        ctx.metrics.failed(e.metric_label());
    }
    ctx.metrics.completed.inc();
    result
}

/// Retries a failed reconcile after an exponential, jittered pause; the error is
/// logged once.
pub fn error_policy(cs: Arc<ChatService>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", cs.namespace().unwrap_or_default(), cs.name_any());
    let failures = {
        let mut all = ctx
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = all.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = retry_delay(failures, jitter_unit());
    warn!(name = %cs.name_any(), namespace = cs.namespace().unwrap_or_default(), error = %error, failures, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
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
    let prev = ctx.written.newest(cs);
    let prev_conditions = prev.as_ref().map_or(&[][..], |s| s.conditions.as_slice());
    let mut apply_error = None;
    let applied = match validation.rollout() {
        None => {
            debug!(
                problems = validation.all_problems().count(),
                "configuration blocked; the last good workload stays"
            );
            Err(NotApplied::Blocked)
        }
        Some(spec) => {
            let desired = build::build(cs, spec);
            match apply::apply(&ctx.client, &ctx.stores, &desired).await {
                Ok(applied) => {
                    ctx.metrics.wrote("children", u64::from(applied.writes()));
                    if applied.writes() > 0 {
                        info!(writes = applied.writes(), config_hash = %applied.config_hash(), "applied children");
                    }
                    Ok(applied)
                }
                Err(ApplyError::Write(e)) => {
                    // Said on the status too, then retried through the error policy.
                    let why = NotApplied::Failed(e.to_string());
                    apply_error = Some(e);
                    Err(why)
                }
                Err(ApplyError::NotOwned(e)) => {
                    // A person must act; said on the status, looked at again now and
                    // then (the foreign object is outside the operator's labelled
                    // watches).
                    warn!(error = %e, "a child's name is taken");
                    Err(NotApplied::NotOwned(e.to_string()))
                }
            }
        }
    };
    let not_owned = matches!(applied, Err(NotApplied::NotOwned(_)));

    // 4. Status, from what was applied (or what still runs) and what the pods report.
    let running = match &applied {
        Ok(_) => None,
        Err(_) => ctx
            .stores
            .deployments
            .get(&ObjectRef::new(&name).within(&namespace)),
    };
    let applying = match &applied {
        Ok(applied) => Applying::Applied(applied),
        Err(why) => Applying::NotApplied {
            why: why.clone(),
            running: running.as_deref(),
        },
    };
    let pods: Vec<Pod> = ctx
        .stores
        .pods
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|p| p.labels().get(LABEL_INSTANCE) == Some(&name))
        .map(|p| p.as_ref().clone())
        .collect();
    let observed = Observed::new(
        cs,
        &validation,
        &applying,
        status::startup_failures(&pods, CONTAINER_NAME),
    );
    let next = status::desired_status(prev.as_ref(), &observed, &(ctx.clock)());
    ctx.metrics.observe_chatservice(cs, &next, Instant::now());
    if prev.as_ref() != Some(&next) {
        write_status(ctx, cs, &next)
            .await
            .map_err(|source| Error::Status { object, source })?;
        ctx.written.wrote(cs, &next);
        ctx.metrics.wrote("status", 1);
        // The Events go out beside the reconcile, not in it: each is one more round
        // trip, and while a reconcile slot is held for them a ChatService whose
        // Deployment has just become ready waits in the queue for a slot (with 500
        // ChatServices created at once, the last one was Ready 25 s sooner).
        tokio::spawn(publish_transitions(
            ctx.recorder.clone(),
            cs.object_ref(&()),
            status::transitions(prev_conditions, &next.conditions),
        ));
    }
    if let Some(e) = apply_error {
        return Err(e.into());
    }
    let baseline_unwatched = crate::dereference::baseline_of(cs)
        .is_some_and(|(namespace, _)| !ctx.watches_namespace(&namespace));
    if not_owned || baseline_unwatched {
        return Ok(Action::requeue(UNWATCHED_RECHECK.min(ctx.resync)));
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

/// One Event per condition that appeared or changed, in order. Events are best
/// effort: a failure to record one is logged, never fails the reconcile.
async fn publish_transitions(
    recorder: Recorder,
    reference: ObjectReference,
    transitions: Vec<status::Transition>,
) {
    for t in transitions {
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
        if let Err(e) = recorder.publish(&event, &reference).await {
            warn!(error = %e, reason = %t.reason, "could not record an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(resource_version: &str, status: Option<ChatServiceStatus>) -> ChatService {
        let mut cs = ChatService::test("chat")
            .namespace("ns")
            .stored("uid-1", 1)
            .build();
        cs.metadata.resource_version = Some(resource_version.to_owned());
        cs.status = status;
        cs
    }

    fn status(observed_generation: i64) -> ChatServiceStatus {
        ChatServiceStatus {
            observed_generation: Some(observed_generation),
            ..ChatServiceStatus::default()
        }
    }

    #[test]
    fn a_written_status_counts_until_the_cache_moves_past_what_it_was_computed_from() {
        let written = WrittenStatuses::default();
        let at_7 = stored("7", Some(status(0)));
        assert_eq!(written.newest(&at_7), Some(status(0)));
        written.wrote(&at_7, &status(1));
        // The cache still holds version 7: the written status is the newest.
        assert_eq!(written.newest(&at_7), Some(status(1)));
        // The watch delivered version 7 again (a re-list): still behind.
        written.seen(&at_7);
        assert_eq!(written.newest(&at_7), Some(status(1)));
        // The cache moved on (to the write, or past it): the cache is the newest.
        let at_8 = stored("8", Some(status(1)));
        written.seen(&at_8);
        assert!(written.0.lock().unwrap().is_empty());
        assert_eq!(written.newest(&at_7), Some(status(0)));
    }

    #[test]
    fn a_written_status_is_dropped_for_a_newer_version_another_object_or_a_deletion() {
        let written = WrittenStatuses::default();
        let at_7 = stored("7", None);
        written.wrote(&at_7, &status(1));
        // A reconcile that finds the cache ahead uses it, and forgets the write.
        let at_9 = stored("9", Some(status(2)));
        assert_eq!(written.newest(&at_9), Some(status(2)));
        assert!(written.0.lock().unwrap().is_empty());
        // The same name, recreated (another uid) at the same version number.
        written.wrote(&at_7, &status(1));
        let mut recreated = stored("7", None);
        recreated.metadata.uid = Some("uid-2".into());
        assert_eq!(written.newest(&recreated), None);
        written.wrote(&at_7, &status(1));
        written.forget(&at_7);
        assert!(written.0.lock().unwrap().is_empty());
    }

    #[test]
    fn retries_double_from_one_second_up_to_five_minutes() {
        let ceilings: Vec<u64> = (1..=12)
            .map(|n| retry_delay(n, 1.0).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000,
                300_000, 300_000
            ]
        );
        assert_eq!(retry_delay(u32::MAX, 1.0), RETRY_CAP);
        // The zeroth failure (not expected) is treated as the first.
        assert_eq!(retry_delay(0, 1.0), RETRY_BASE);
    }

    #[test]
    fn jitter_keeps_the_delay_in_the_upper_half_of_its_ceiling() {
        for n in 1..=15 {
            let ceiling = retry_delay(n, 1.0);
            assert_eq!(retry_delay(n, 0.0), ceiling / 2, "failure {n}");
            assert_eq!(
                retry_delay(n, 0.5),
                ceiling / 2 + ceiling / 4,
                "failure {n}"
            );
            for unit in [f64::NAN, -3.0, 7.0] {
                let d = retry_delay(n, unit);
                assert!(d >= ceiling / 2 && d <= ceiling, "{n} {unit}: {d:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_retries_apart() {
        let units: Vec<f64> = (0..200).map(|_| jitter_unit()).collect();
        assert!(units.iter().all(|u| (0.0..=1.0).contains(u)));
        let low = units.iter().filter(|u| **u < 0.5).count();
        // 200 fair draws fall below one half between 60 and 140 times except with
        // a probability far below one in a million.
        assert!((60..=140).contains(&low), "{low} of 200 below 0.5");
    }
}
