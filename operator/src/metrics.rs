//! The operator's own Prometheus metrics, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
        Metrics {
            registry,
            reconciles,
            completed,
            failures,
            duration,
            writes,
            leader,
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

    /// Writes made so far, all kinds.
    pub fn total_writes(&self) -> u64 {
        ["children", "status"]
            .iter()
            .map(|k| {
                self.writes
                    .get_or_create(&WriteLabels {
                        kind: (*k).to_owned(),
                    })
                    .get()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
