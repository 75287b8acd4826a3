//! The kubelet's probe rules for one probe: its schedule, thresholds and verdicts.

use super::*;

/// One probe's schedule and consecutive results.
pub(super) struct ProbeState {
    pub(super) probe: Probe,
    /// The loopback address the probe's `httpGet` goes to.
    pub(super) address: SocketAddr,
    pub(super) next: Option<Instant>,
    pub(super) failures: i32,
}

pub(super) enum Verdict {
    Passed,
    /// Failed, but below the failure threshold.
    Failing,
    /// The failure threshold is reached; why.
    Failed(String),
}

impl ProbeState {
    /// A probe of `container`, which listens at `address`; when it was `told`
    /// where to listen, every port of it maps to that address.
    pub(super) fn new(
        probe: Probe,
        container: &Container,
        address: SocketAddr,
        told: bool,
    ) -> ProbeState {
        let declared = probe
            .http_get
            .as_ref()
            .and_then(|get| container_port(container, &get.port));
        let port = if told { Some(address.port()) } else { declared };
        ProbeState {
            address: SocketAddr::new(address.ip(), port.unwrap_or_default()),
            probe,
            next: None,
            failures: 0,
        }
    }

    fn period(&self) -> Duration {
        Duration::from_secs(self.probe.period_seconds.unwrap_or(10).max(1) as u64)
    }

    /// Due at `initialDelaySeconds` after the container started, then every period.
    pub(super) fn due(&mut self, now: Instant, started: Instant) -> bool {
        let first = started
            + Duration::from_secs(self.probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let due = now >= self.next.unwrap_or(first).max(first);
        if due {
            self.next = Some(now + self.period());
        }
        due
    }

    pub(super) async fn run(&mut self) -> Verdict {
        let address = self.address;
        let Some(get) = &self.probe.http_get else {
            return Verdict::Passed; // only HTTP probes are run; others pass
        };
        let path = get.path.clone().unwrap_or_else(|| "/".into());
        let timeout = Duration::from_secs(self.probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let result = tokio::time::timeout(timeout, crate::http::probe(address, &path)).await;
        let outcome = match result {
            Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
            Ok(Ok(code)) => Err(format!("HTTP probe failed with statuscode: {code}")),
            Ok(Err(e)) => Err(format!(
                "Get \"http://{address}{path}\": {}",
                e.root_cause()
            )),
            Err(_) => Err(format!(
                "Get \"http://{address}{path}\": timeout after {timeout:?}"
            )),
        };
        match outcome {
            Ok(()) => {
                self.failures = 0;
                Verdict::Passed
            }
            Err(why) => {
                self.failures += 1;
                if self.failures >= self.probe.failure_threshold.unwrap_or(3).max(1) {
                    Verdict::Failed(why)
                } else {
                    Verdict::Failing
                }
            }
        }
    }
}
