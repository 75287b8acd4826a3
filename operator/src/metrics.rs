//! The operator's own Prometheus metrics, served on `/metrics`.
//!
//! Besides the reconcile counters, each ChatService's state as the alerts need it:
//! its conditions, its pods failing startup, and how long each generation took to
//! become Ready. Those series exist on the leader only (a standby reconciles
//! nothing) and go away with their ChatService.

use crate::conditions;
use crate::crd::{ChatService, ChatServiceStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

/// Label of a failed reconcile: the error variant's short name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: String,
}

/// Label of a write to the API server: the kind written.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: String,
}

/// Label of a failed watch request: the HTTP status the API server answered
/// (`410` = the watch expired and the cache was listed again), or `transport`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchErrorLabels {
    pub code: String,
}

/// One ChatService.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChatServiceLabels {
    pub namespace: String,
    pub chatservice: String,
    pub environment: String,
}

/// One condition of one ChatService.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub chatservice: String,
    pub environment: String,
    pub condition: &'static str,
}

/// A startup failure: the ChatService, and the critical service that could not be built.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartupFailureLabels {
    pub namespace: String,
    pub chatservice: String,
    pub environment: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvironmentLabel {
    pub environment: String,
}

/// The conditions exported per ChatService (absent on the status reads as 0).
pub const EXPORTED_CONDITIONS: [&str; 6] = [
    conditions::READY,
    conditions::RECONCILING,
    conditions::STALLED,
    conditions::STARTUP_COMPLETE,
    conditions::CONFIG_VALID,
    conditions::PARITY_OK,
];

fn time_to_ready_histogram() -> Histogram {
    // 1 s .. ~34 min: a rollout that takes longer than that is stuck, and the
    // "rollout not progressing" alert says so.
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

/// What the metrics remember of one ChatService between reconciles.
struct Tracked {
    environment: String,
    /// The startup failures already counted: (pod, restart count).
    failures_seen: BTreeSet<(String, i32)>,
    /// The generation being timed to Ready, when the operator first saw it, and
    /// whether it has been observed Ready yet.
    generation: Option<i64>,
    first_seen: Instant,
    ready_observed: bool,
    /// The `service` labels of the startup failure counters made for it.
    failure_services: BTreeSet<String>,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles finished, successfully or not.
    pub completed: Counter,
    /// Reconciles that failed, by error.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
    /// Writes made (applies, deletes, status patches), by kind.
    pub writes: Family<WriteLabels, Counter>,
    /// 1 while this instance holds the leader lease.
    pub leader: Gauge,
    /// Watch requests that failed, by HTTP status.
    pub watch_errors: Family<WatchErrorLabels, Counter>,
    conditions: Family<ConditionLabels, Gauge>,
    startup_failing: Family<ChatServiceLabels, Gauge>,
    startup_failures: Family<StartupFailureLabels, Counter>,
    time_to_ready: Family<EnvironmentLabel, Histogram, fn() -> Histogram>,
    tracked: Mutex<HashMap<(String, String), Tracked>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("chatgate_operator");
        let reconciles = Counter::default();
        let completed = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let writes = Family::<WriteLabels, Counter>::default();
        let leader = Gauge::default();
        let watch_errors = Family::<WatchErrorLabels, Counter>::default();
        let conditions = Family::<ConditionLabels, Gauge>::default();
        let startup_failing = Family::<ChatServiceLabels, Gauge>::default();
        let startup_failures = Family::<StartupFailureLabels, Counter>::default();
        let time_to_ready =
            Family::<EnvironmentLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                time_to_ready_histogram,
            );
        registry.register(
            "chatservice_condition",
            "1 while the ChatService's condition is True (Ready, Reconciling, Stalled, StartupComplete, ConfigValid, ParityOK)",
            conditions.clone(),
        );
        registry.register(
            "chatservice_startup_failures",
            "Pods of the ChatService listed in status.startupFailures now",
            startup_failing.clone(),
        );
        registry.register(
            "startup_failures",
            "Pod startups that failed (each crash counted once), by the critical service that could not be built",
            startup_failures.clone(),
        );
        registry.register(
            "time_to_ready_seconds",
            "From the operator first seeing a ChatService generation to its Ready condition being True",
            time_to_ready.clone(),
        );
        registry.register(
            "reconciles",
            "ChatService reconciles started",
            reconciles.clone(),
        );
        registry.register(
            "reconciles_completed",
            "ChatService reconciles finished, successfully or not",
            completed.clone(),
        );
        registry.register(
            "reconcile_failures",
            "ChatService reconciles that failed, by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one ChatService reconcile",
            duration.clone(),
        );
        registry.register(
            "writes",
            "Writes to the API server (applies, deletes, status), by kind",
            writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "watch_errors",
            "Failed watch and list requests, by HTTP status (410: the watch expired and was listed again; transport: no answer)",
            watch_errors.clone(),
        );
        Metrics {
            registry,
            reconciles,
            completed,
            failures,
            duration,
            writes,
            leader,
            watch_errors,
            conditions,
            startup_failing,
            startup_failures,
            time_to_ready,
            tracked: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn failed(&self, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn wrote(&self, kind: &str, n: u64) {
        if n > 0 {
            self.writes
                .get_or_create(&WriteLabels {
                    kind: kind.to_owned(),
                })
                .inc_by(n);
        }
    }

    /// A watch or list request failed with `code` (an HTTP status, or `transport`).
    pub fn watch_failed(&self, code: &str) {
        self.watch_errors
            .get_or_create(&WatchErrorLabels {
                code: code.to_owned(),
            })
            .inc();
    }

    /// Failed watch requests so far with `code`.
    pub fn watch_errors_with(&self, code: &str) -> u64 {
        self.watch_errors
            .get_or_create(&WatchErrorLabels {
                code: code.to_owned(),
            })
            .get()
    }

    /// Records a ChatService's state after a reconcile: `status` is what was just
    /// computed for `cs` (whose own status is what it carried before: on the first
    /// sight of a ChatService that is already Ready, nothing is timed).
    pub fn observe_chatservice(&self, cs: &ChatService, status: &ChatServiceStatus, now: Instant) {
        let namespace = cs.metadata.namespace.as_deref().unwrap_or_default();
        let name = cs.metadata.name.as_deref().unwrap_or_default();
        let environment = cs.spec.environment.as_str();
        let generation = cs.metadata.generation;
        let previous = cs.status.as_ref();
        let mut tracked = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (namespace.to_owned(), name.to_owned());
        if tracked
            .get(&key)
            .is_some_and(|t| t.environment != environment)
        {
            // The environment is a label: the old series must not linger.
            if let Some(old) = tracked.remove(&key) {
                self.remove_series(namespace, name, &old);
            }
        }
        let entry = tracked.entry(key).or_insert_with(|| {
            let already_ready = previous.is_some_and(|p| {
                p.observed_generation == generation
                    && conditions::is_true(&p.conditions, conditions::READY)
            });
            Tracked {
                environment: environment.to_owned(),
                failures_seen: BTreeSet::new(),
                generation,
                first_seen: now,
                ready_observed: already_ready,
                failure_services: BTreeSet::new(),
            }
        });
        let labels = ChatServiceLabels {
            namespace: namespace.to_owned(),
            chatservice: name.to_owned(),
            environment: environment.to_owned(),
        };
        for condition in EXPORTED_CONDITIONS {
            self.conditions
                .get_or_create(&ConditionLabels {
                    namespace: namespace.to_owned(),
                    chatservice: name.to_owned(),
                    environment: environment.to_owned(),
                    condition,
                })
                .set(i64::from(conditions::is_true(
                    &status.conditions,
                    condition,
                )));
        }
        self.startup_failing
            .get_or_create(&labels)
            .set(status.startup_failures.len() as i64);
        let current: BTreeSet<(String, i32)> = status
            .startup_failures
            .iter()
            .map(|f| (f.pod.clone(), f.restart_count.unwrap_or(0)))
            .collect();
        for failure in &status.startup_failures {
            let seen = (failure.pod.clone(), failure.restart_count.unwrap_or(0));
            if entry.failures_seen.contains(&seen) {
                continue;
            }
            let service = failure.service.clone().unwrap_or_else(|| "unknown".into());
            entry.failure_services.insert(service.clone());
            self.startup_failures
                .get_or_create(&StartupFailureLabels {
                    namespace: namespace.to_owned(),
                    chatservice: name.to_owned(),
                    environment: environment.to_owned(),
                    service,
                })
                .inc();
        }
        entry.failures_seen = current;
        if entry.generation != generation {
            entry.generation = generation;
            entry.first_seen = now;
            entry.ready_observed = false;
        }
        if !entry.ready_observed
            && status.observed_generation == generation
            && conditions::is_true(&status.conditions, conditions::READY)
        {
            entry.ready_observed = true;
            self.time_to_ready
                .get_or_create(&EnvironmentLabel {
                    environment: environment.to_owned(),
                })
                .observe(
                    now.saturating_duration_since(entry.first_seen)
                        .as_secs_f64(),
                );
        }
    }

    /// A ChatService is gone: its series go too.
    pub fn forget_chatservice(&self, namespace: &str, name: &str) {
        let removed = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(namespace.to_owned(), name.to_owned()));
        if let Some(old) = removed {
            self.remove_series(namespace, name, &old);
        }
    }

    /// Leadership is lost: a standby reports no ChatService (the new leader does).
    pub fn forget_all_chatservices(&self) {
        let all: Vec<_> = std::mem::take(
            &mut *self
                .tracked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .collect();
        for ((namespace, name), old) in all {
            self.remove_series(&namespace, &name, &old);
        }
    }

    fn remove_series(&self, namespace: &str, name: &str, old: &Tracked) {
        for condition in EXPORTED_CONDITIONS {
            self.conditions.remove(&ConditionLabels {
                namespace: namespace.to_owned(),
                chatservice: name.to_owned(),
                environment: old.environment.clone(),
                condition,
            });
        }
        self.startup_failing.remove(&ChatServiceLabels {
            namespace: namespace.to_owned(),
            chatservice: name.to_owned(),
            environment: old.environment.clone(),
        });
        for service in &old.failure_services {
            self.startup_failures.remove(&StartupFailureLabels {
                namespace: namespace.to_owned(),
                chatservice: name.to_owned(),
                environment: old.environment.clone(),
                service: service.clone(),
            });
        }
    }

    /// Writes of `kind` (`children`, `status`) made so far.
    pub fn writes_of(&self, kind: &str) -> u64 {
        self.writes
            .get_or_create(&WriteLabels {
                kind: kind.to_owned(),
            })
            .get()
    }

    /// Writes made so far, all kinds.
    pub fn total_writes(&self) -> u64 {
        ["children", "status"]
            .iter()
            .map(|k| self.writes_of(k))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::StartupFailure;
    use chatgate_contract::Environment;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use std::time::Duration;

    fn condition(type_: &str, status: bool) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            reason: "Test".to_owned(),
            message: String::new(),
            last_transition_time: Time(Default::default()),
            observed_generation: None,
        }
    }

    fn status(generation: i64, ready: bool, failing: &[(&str, i32)]) -> ChatServiceStatus {
        ChatServiceStatus {
            observed_generation: Some(generation),
            conditions: vec![
                condition(conditions::READY, ready),
                condition(conditions::RECONCILING, !ready),
            ],
            startup_failures: failing
                .iter()
                .map(|(pod, restarts)| StartupFailure {
                    pod: (*pod).to_owned(),
                    phase: Some("auth".into()),
                    service: Some("jwt_verifier".into()),
                    message: "jwt verifier missing".into(),
                    restart_count: Some(*restarts),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn cs(
        namespace: &str,
        name: &str,
        environment: Environment,
        generation: i64,
        previous: Option<&ChatServiceStatus>,
    ) -> ChatService {
        let mut cs = ChatService::test(name)
            .namespace(namespace)
            .in_env(environment)
            .stored("uid", generation)
            .build();
        cs.status = previous.cloned();
        cs
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn conditions_and_startup_failures_are_exported_per_chatservice() {
        let m = Metrics::default();
        let t0 = Instant::now();
        m.observe_chatservice(
            &cs("team", "chat", Environment::Staging, 1, None),
            &status(1, false, &[("chat-a", 1)]),
            t0,
        );
        // The same crash seen again is not counted again; a new restart is.
        m.observe_chatservice(
            &cs("team", "chat", Environment::Staging, 1, None),
            &status(1, false, &[("chat-a", 1)]),
            t0,
        );
        m.observe_chatservice(
            &cs("team", "chat", Environment::Staging, 1, None),
            &status(1, false, &[("chat-a", 2), ("chat-b", 0)]),
            t0,
        );
        let text = m.encode();
        let labels = "namespace=\"team\",chatservice=\"chat\",environment=\"staging\"";
        for expected in [
            format!("chatgate_operator_chatservice_condition{{{labels},condition=\"Ready\"}} 0"),
            format!(
                "chatgate_operator_chatservice_condition{{{labels},condition=\"Reconciling\"}} 1"
            ),
            format!("chatgate_operator_chatservice_condition{{{labels},condition=\"Stalled\"}} 0"),
            format!("chatgate_operator_chatservice_startup_failures{{{labels}}} 2"),
            format!(
                "chatgate_operator_startup_failures_total{{{labels},service=\"jwt_verifier\"}} 3"
            ),
        ] {
            assert!(text.contains(&expected), "{expected} missing from\n{text}");
        }

        m.forget_chatservice("team", "chat");
        let text = m.encode();
        assert!(!text.contains("chatservice=\"chat\""), "{text}");
    }

    #[test]
    fn time_to_ready_is_observed_once_per_generation() {
        let m = Metrics::default();
        let t0 = Instant::now();
        m.observe_chatservice(
            &cs("team", "chat", Environment::Production, 1, None),
            &status(1, false, &[]),
            t0,
        );
        m.observe_chatservice(
            &cs("team", "chat", Environment::Production, 1, None),
            &status(1, true, &[]),
            t0 + Duration::from_secs(3),
        );
        m.observe_chatservice(
            &cs("team", "chat", Environment::Production, 1, None),
            &status(1, true, &[]),
            t0 + Duration::from_secs(9),
        );
        let text = m.encode();
        let count = line(
            &text,
            "chatgate_operator_time_to_ready_seconds_count{environment=\"production\"}",
        )
        .expect(&text);
        assert!(count.ends_with(" 1"), "{count}");
        let sum = line(
            &text,
            "chatgate_operator_time_to_ready_seconds_sum{environment=\"production\"}",
        )
        .expect(&text);
        assert!(sum.ends_with(" 3.0"), "{sum}");

        // A new generation is timed from when it is first seen.
        m.observe_chatservice(
            &cs("team", "chat", Environment::Production, 2, None),
            &status(1, true, &[]),
            t0 + Duration::from_secs(20),
        );
        m.observe_chatservice(
            &cs("team", "chat", Environment::Production, 2, None),
            &status(2, true, &[]),
            t0 + Duration::from_secs(25),
        );
        let text = m.encode();
        let count = line(
            &text,
            "chatgate_operator_time_to_ready_seconds_count{environment=\"production\"}",
        )
        .expect(&text);
        assert!(count.ends_with(" 2"), "{count}");
    }

    #[test]
    fn a_chatservice_already_ready_when_first_seen_is_not_timed() {
        let m = Metrics::default();
        let ready = status(4, true, &[]);
        m.observe_chatservice(
            &cs("team", "chat", Environment::Development, 4, Some(&ready)),
            &ready,
            Instant::now(),
        );
        assert!(
            !m.encode().contains("time_to_ready_seconds_count{"),
            "{}",
            m.encode()
        );
    }

    #[test]
    fn losing_the_lease_drops_every_chatservice_series() {
        let m = Metrics::default();
        m.observe_chatservice(
            &cs("a", "one", Environment::Staging, 1, None),
            &status(1, true, &[]),
            Instant::now(),
        );
        m.observe_chatservice(
            &cs("b", "two", Environment::Staging, 1, None),
            &status(1, false, &[("p", 0)]),
            Instant::now(),
        );
        m.forget_all_chatservices();
        let text = m.encode();
        assert!(!text.contains("chatservice=\""), "{text}");
    }

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.failed("apply");
        m.duration.observe(0.01);
        let text = m.encode();
        for name in [
            "chatgate_operator_reconciles_total 1",
            "chatgate_operator_reconcile_failures_total{reason=\"apply\"} 1",
            "chatgate_operator_reconcile_duration_seconds_bucket",
            "chatgate_operator_leader 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
