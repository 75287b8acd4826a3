//! When each Deployment's rollout completes (or falls back) and when its ChatService's
//! `Ready` follows, as two watches in the test process see them: how far a
//! ChatService's status trails its Deployment's own status.
//!
//! Both watches run in one process against one API server, so the difference of two
//! instants is the operator's lag plus at most the skew of two watch deliveries; the
//! status timestamps Kubernetes stores are whole seconds, too coarse for this.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chatgate_operator::crd::ChatService;
use chatgate_operator::meta;
use chatgate_operator::status::Rollout;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ready_now;

/// Which object changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// The Deployment's status shows its rollout complete: every desired pod updated,
    /// ready and available, no old pod left (what the operator's `Ready` waits for).
    Deployment,
    /// The ChatService's `Ready` is True for its current generation.
    ChatService,
}

/// One change of one side of one ChatService, with the instant it was seen.
#[derive(Debug, Clone)]
pub struct Transition {
    pub at: Instant,
    pub name: String,
    pub side: Side,
    /// The side's state after the change: rolled out / Ready.
    pub up: bool,
}

#[derive(Default)]
struct Log {
    transitions: Vec<Transition>,
    state: BTreeMap<(Side, String), bool>,
    /// When each object was first seen.
    appeared: BTreeMap<(Side, String), Instant>,
}

impl Log {
    fn observe(&mut self, side: Side, name: String, up: bool) {
        self.appeared
            .entry((side, name.clone()))
            .or_insert_with(Instant::now);
        let was = self.state.insert((side, name.clone()), up).unwrap_or(false);
        if was != up {
            self.transitions.push(Transition {
                at: Instant::now(),
                name,
                side,
                up,
            });
        }
    }
}

/// A running pair of watches on one namespace's managed Deployments and ChatServices,
/// logging every change of either side. Dropping it stops the watches.
pub struct StatusLog {
    log: Arc<Mutex<Log>>,
    changed: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Drop for StatusLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a watch event tells the log.
enum Seen {
    /// An object as it is now: its side, name and state.
    State(Side, String, bool),
    /// The watch has listed everything.
    Listed,
    /// Nothing about a status (a deletion is not a change of status).
    Nothing,
}

fn seen<K>(event: watcher::Event<K>, state: impl Fn(&K) -> (Side, String, bool)) -> Seen {
    match event {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
            let (side, name, up) = state(&o);
            Seen::State(side, name, up)
        }
        watcher::Event::InitDone => Seen::Listed,
        watcher::Event::Init | watcher::Event::Delete(_) => Seen::Nothing,
    }
}

/// The Deployment's rollout is complete by its own status.
pub fn rolled_out(d: &Deployment) -> bool {
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    Rollout::of(d).complete(desired)
}

impl StatusLog {
    /// Starts both watches on `ns` and returns once both have listed, so nothing that
    /// changes afterwards is missed.
    pub async fn start(client: Client, ns: &str) -> Result<StatusLog> {
        let log = Arc::new(Mutex::new(Log::default()));
        let (changed_tx, changed) = watch::channel(0usize);
        let (listed_tx, mut listed) = watch::channel(0usize);
        let deployments = watcher(
            Api::<Deployment>::namespaced(client.clone(), ns),
            watcher::Config::default().labels(&meta::managed_selector()),
        )
        .default_backoff()
        .map_ok(|e| seen(e, |d| (Side::Deployment, d.name_any(), rolled_out(d))))
        .boxed();
        let chat_services = watcher(
            Api::<ChatService>::namespaced(client, ns),
            watcher::Config::default(),
        )
        .default_backoff()
        .map_ok(|e| seen(e, |cs| (Side::ChatService, cs.name_any(), ready_now(cs))))
        .boxed();
        let record = log.clone();
        let task = tokio::spawn(async move {
            let mut both = futures::stream::select(deployments, chat_services);
            while let Some(event) = both.next().await {
                match event {
                    Ok(Seen::State(side, name, up)) => {
                        let mut log = record.lock().unwrap_or_else(|e| e.into_inner());
                        log.observe(side, name, up);
                        let n = log.transitions.len();
                        drop(log);
                        changed_tx.send_replace(n);
                    }
                    Ok(Seen::Listed) => {
                        listed_tx.send_modify(|n| *n += 1);
                    }
                    // A watch error is retried by the backoff.
                    Ok(Seen::Nothing) | Err(_) => {}
                }
            }
        });
        let status_log = StatusLog { log, changed, task };
        tokio::time::timeout(super::TIMEOUT, listed.wait_for(|n| *n >= 2))
            .await
            .context("the Deployment and ChatService watches to list")?
            .context("the status watches ended")?;
        Ok(status_log)
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every change seen so far, in the order seen.
    pub fn transitions(&self) -> Vec<Transition> {
        self.lock().transitions.clone()
    }

    /// The instant `name`'s `side` changed to `up` for the `nth` time (from 0).
    pub fn nth(&self, side: Side, name: &str, up: bool, nth: usize) -> Option<Instant> {
        self.lock()
            .transitions
            .iter()
            .filter(|t| t.side == side && t.name == name && t.up == up)
            .nth(nth)
            .map(|t| t.at)
    }

    /// Waits until [`Self::nth`] has happened and returns its instant.
    pub async fn wait(
        &self,
        side: Side,
        name: &str,
        up: bool,
        nth: usize,
        timeout: Duration,
    ) -> Result<Instant> {
        let mut changed = self.changed.clone();
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(at) = self.nth(side, name, up, nth) {
                    return Ok(at);
                }
                if changed.changed().await.is_err() {
                    bail!("the status watches ended");
                }
            }
        })
        .await;
        match found {
            Ok(found) => found,
            Err(_) => bail!(
                "timed out after {timeout:?} waiting for {side:?} {name} to turn {} for the {}th time; seen: {:?}",
                if up { "up" } else { "down" },
                nth + 1,
                self.transitions()
            ),
        }
    }

    /// Per name, when the `side` object was first seen.
    pub fn appeared(&self, side: Side) -> BTreeMap<String, Instant> {
        self.lock()
            .appeared
            .iter()
            .filter(|((s, _), _)| *s == side)
            .map(|((_, name), at)| (name.clone(), *at))
            .collect()
    }

    /// Per name, when the `side` first turned up (rolled out / Ready).
    pub fn first_up(&self, side: Side) -> BTreeMap<String, Instant> {
        let mut out = BTreeMap::new();
        for t in self
            .lock()
            .transitions
            .iter()
            .filter(|t| t.side == side && t.up)
        {
            out.entry(t.name.clone()).or_insert(t.at);
        }
        out
    }
}

/// Per name present in both, `to - from` in seconds.
pub fn lags(
    from: &BTreeMap<String, Instant>,
    to: &BTreeMap<String, Instant>,
) -> BTreeMap<String, f64> {
    from.iter()
        .filter_map(|(name, f)| to.get(name).map(|t| (name.clone(), signed_seconds(*f, *t))))
        .collect()
}

/// The `q`-quantile (0.0..=1.0, nearest rank) of `values`; `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).max(1);
    sorted.get(rank - 1).copied()
}

/// `to - from` in seconds, negative when `to` is earlier.
pub fn signed_seconds(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_secs_f64(),
        None => -from.duration_since(to).as_secs_f64(),
    }
}
