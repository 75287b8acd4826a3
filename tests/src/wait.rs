//! Waiting for the cluster to reach a state, with a deadline and an error that says
//! what was awaited and what was last seen. Tests synchronise with these, never
//! with sleeps.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a wait ended without its condition holding.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out after {timeout:?} waiting for {what}; last seen: {last_seen}")]
    Timeout {
        what: String,
        timeout: Duration,
        last_seen: String,
    },
    #[error("gave up waiting for {what}: {source:#}")]
    Failed {
        what: String,
        #[source]
        source: anyhow::Error,
    },
}

/// Watches `name` until `condition` holds for it and returns the object that
/// satisfied it. On timeout the error shows the object as it last was.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    condition: impl Fn(&K) -> bool + Send + 'static,
) -> Result<K, WaitError>
where
    K: Resource + Clone + Debug + Send + Sync + DeserializeOwned + Serialize + 'static,
    K::DynamicType: Default,
{
    let what = format!("{} {}", K::kind(&Default::default()), name);
    let watched = kube::runtime::wait::await_condition(api.clone(), name, move |o: Option<&K>| {
        o.is_some_and(&condition)
    });
    match tokio::time::timeout(timeout, watched).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => Err(WaitError::Failed {
            what,
            source: anyhow::anyhow!("the object was deleted"),
        }),
        Ok(Err(e)) => Err(WaitError::Failed {
            what,
            source: e.into(),
        }),
        Err(_) => Err(WaitError::Timeout {
            last_seen: describe(api.get_opt(name).await),
            what,
            timeout,
        }),
    }
}

/// Watches `name` until it no longer exists (finalizers done, garbage collected).
pub async fn wait_for_deletion<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
) -> Result<(), WaitError>
where
    K: Resource + Clone + Debug + Send + Sync + DeserializeOwned + Serialize + 'static,
    K::DynamicType: Default,
{
    let what = format!("{} {} to be deleted", K::kind(&Default::default()), name);
    let watched =
        kube::runtime::wait::await_condition(api.clone(), name, |o: Option<&K>| o.is_none());
    match tokio::time::timeout(timeout, watched).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(WaitError::Failed {
            what,
            source: e.into(),
        }),
        Err(_) => Err(WaitError::Timeout {
            last_seen: describe(api.get_opt(name).await),
            what,
            timeout,
        }),
    }
}

/// Polls `probe` until it returns `Ok(Some(value))`, backing off from 50 ms to
/// 1 s between tries. `Ok(None)` means "not yet"; an `Err` is remembered as the
/// last thing seen and the polling goes on, so a flaky read does not end the wait
/// (use [`wait_for`] instead when the state can be watched).
pub async fn wait_until<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut probe: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let last_seen =
            match tokio::time::timeout(left.max(Duration::from_millis(1)), probe()).await {
                Ok(Ok(Some(value))) => return Ok(value),
                Ok(Ok(None)) => "condition not met".to_owned(),
                Ok(Err(e)) => format!("error: {e:#}"),
                Err(_) => "the last probe did not answer in time".to_owned(),
            };
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout {
                what: what.to_owned(),
                timeout,
                last_seen,
            });
        }
        // Not a synchronisation sleep: the pause between two probes of a deadline-bound poll.
        tokio::time::sleep(interval.min(deadline.saturating_duration_since(Instant::now()))).await;
        interval = (interval * 2).min(Duration::from_secs(1));
    }
}

/// `deployment` has rolled out: the controller saw the latest spec and `replicas`
/// pods are updated, available and ready.
pub fn deployment_ready(replicas: i32) -> impl Fn(&Deployment) -> bool + Send + 'static {
    move |d: &Deployment| {
        let generation = d.metadata.generation;
        d.status.as_ref().is_some_and(|s| {
            s.observed_generation == generation
                && s.ready_replicas.unwrap_or(0) == replicas
                && s.available_replicas.unwrap_or(0) == replicas
                && s.updated_replicas.unwrap_or(0) == replicas
        })
    }
}

/// The pod's `Ready` condition is `True`.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// An object as a wait error shows it: its status, or the whole object if it has none.
fn describe<K: Serialize + ResourceExt>(found: kube::Result<Option<K>>) -> String {
    match found {
        Ok(None) => "(it does not exist)".to_owned(),
        Err(e) => format!("(could not read it: {e})"),
        Ok(Some(obj)) => {
            let value = serde_json::to_value(&obj).unwrap_or_default();
            let shown = value
                .get("status")
                .map(|status| serde_json::json!({ "status": status }))
                .unwrap_or(value);
            let text = shown.to_string();
            const LIMIT: usize = 4000;
            if text.len() > LIMIT {
                let cut = (0..=LIMIT)
                    .rev()
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(0);
                format!("{}… (truncated)", &text[..cut])
            } else {
                text
            }
        }
    }
}
