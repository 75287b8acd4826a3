//! A resync with nothing changed writes nothing: counted by the API server itself
//! (`apiserver_request_total`), so no write by any client goes unseen. Alone in its
//! test binary, so no other test's writes share the counters.

mod operator_support;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use chatgate_operator::crd::ChatService;
use chatgate_tests::wait::deployment_ready;
use chatgate_tests::{wait_for, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::Api;
use operator_support::*;

/// Kinds the operator writes (children and its own resource).
const RESOURCES: &[&str] = &[
    "chatservices",
    "deployments",
    "services",
    "configmaps",
    "poddisruptionbudgets",
];
/// Verbs that write (`APPLY` is how the API server labels a server-side apply).
const WRITE_VERBS: &[&str] = &["POST", "PUT", "PATCH", "APPLY", "DELETE"];

/// Write requests on [`RESOURCES`] the API server has served so far, by resource.
async fn writes(client: &Client) -> Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client
        .request_text(request)
        .await
        .context("GET /metrics from the API server")?;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        let (verb, resource) = (label("verb"), label("resource"));
        if WRITE_VERBS.contains(&verb.as_str()) && RESOURCES.contains(&resource.as_str()) {
            *out.entry(format!("{verb} {resource}/{}", label("subresource")))
                .or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_with_no_change_makes_zero_write_requests() -> Result<()> {
    let Setup { ns, admin, op, .. } = operator_in_new_namespace("op-resync").await?;

    let names = ["one", "two", "three"];
    for name in names {
        create(
            &admin,
            ns.name(),
            &ChatService::test(name).replicas(2).build(),
        )
        .await?;
    }
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let deployments: Api<Deployment> = ns.api(admin.clone());
    for name in names {
        wait_for(&chat_services, name, TIMEOUT, ready_now).await?;
        wait_for(&deployments, name, TIMEOUT, deployment_ready(2)).await?;
    }
    // Settled: every reconcile the rollout triggered has finished.
    let metrics = op.health.metrics.clone();
    wait_until(TIMEOUT, "reconciles to settle", || {
        let m = metrics.clone();
        async move { Ok((m.reconciles.get() == m.completed.get()).then_some(())) }
    })
    .await?;

    let before = writes(&admin).await?;
    let operator_writes = op.health.metrics.total_writes();
    let target = op.health.metrics.completed.get() + names.len() as u64;
    op.health.resync();
    let m = op.health.metrics.clone();
    wait_until(TIMEOUT, "a full resync of every ChatService", || {
        let m = m.clone();
        async move {
            Ok(
                (m.completed.get() >= target && m.reconciles.get() == m.completed.get())
                    .then_some(()),
            )
        }
    })
    .await?;
    let after = writes(&admin).await?;

    assert_eq!(
        op.health.metrics.total_writes(),
        operator_writes,
        "the operator counted its own writes"
    );
    let grown: Vec<String> = after
        .iter()
        .filter(|(k, v)| before.get(*k).copied().unwrap_or(0.0) < **v)
        .map(|(k, v)| format!("{k}: {} -> {v}", before.get(k).copied().unwrap_or(0.0)))
        .collect();
    assert!(
        grown.is_empty(),
        "write requests during a no-op resync: {grown:?}"
    );
    assert!(
        !before.is_empty(),
        "the counters were found (the rollout itself wrote)"
    );
    op.stop().await;
    Ok(())
}
