//! What Flux and Helm 4 (kstatus) and Argo CD (deploy/argocd/health.lua, run by
//! gopher-lua the way Argo CD runs it) conclude from a ChatService, proven on objects
//! recorded from the real control plane with the real operator: ready, rolling out,
//! stalled on bad configuration, stalled on a startup failure, and a spec the
//! operator has not observed yet.

mod operator_support;

use anyhow::{Context, Result};
use chatgate_contract::Environment;
use chatgate_operator::conditions::{self, reason};
use chatgate_operator::crd::ChatService;
use chatgate_tests::status_check::verdicts;
use chatgate_tests::{ControlPlane, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use operator_support::*;
use serde_json::json;
use std::path::{Path, PathBuf};

const HEALTH_LUA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/argocd/health.lua");
const ARGOCD_CM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/argocd/argocd-cm.yaml"
);

/// The object as `kubectl get -o json` prints it, saved under `dir/<state>.json`.
fn record(cp: &ControlPlane, ns: &str, name: &str, dir: &Path, state: &str) -> Result<PathBuf> {
    let out = cp
        .kubectl()
        .args(["get", "chatservice", name, "-n", ns, "-o", "json"])
        .output()
        .context("kubectl get chatservice")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl get chatservice {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(format!("{state}.json"));
    std::fs::write(&path, &out.stdout)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kstatus_and_the_argo_cd_health_check_read_every_state_right() -> Result<()> {
    let Setup { cp, ns, admin, op } = operator_in_new_namespace("status-readers").await?;
    let api: Api<ChatService> = ns.api(admin.clone());
    let dir = tempfile::tempdir()?;
    let mut recorded: Vec<(&str, PathBuf)> = Vec::new();

    // Ready: kwok runs the pods and reports them ready.
    create(
        &admin,
        ns.name(),
        &ChatService::test("ready").replicas(1).build(),
    )
    .await?;
    // Rolling out: its pods ask for nodes nobody has, so they stay Pending.
    create(
        &admin,
        ns.name(),
        &ChatService::test("rolling")
            .replicas(1)
            .on_nodes("chatgate.dev/pool", "nowhere", "chatgate.dev/none")
            .build(),
    )
    .await?;
    // Stalled on bad configuration: staging without its JWT settings.
    create(
        &admin,
        ns.name(),
        &ChatService::test("bad-config")
            .in_env(Environment::Staging)
            .replicas(1)
            .build(),
    )
    .await?;
    // Stalled on startup: becomes ready first, then its pod fails startup.
    create(
        &admin,
        ns.name(),
        &ChatService::test("startup").replicas(1).build(),
    )
    .await?;

    wait_for(&api, "ready", TIMEOUT, ready_now).await?;
    recorded.push((
        "ready",
        record(cp, ns.name(), "ready", dir.path(), "ready")?,
    ));

    wait_for(&api, "rolling", TIMEOUT, |cs: &ChatService| {
        condition_true_now(cs, conditions::RECONCILING)
    })
    .await?;
    recorded.push((
        "rolling",
        record(cp, ns.name(), "rolling", dir.path(), "rolling")?,
    ));

    wait_for(&api, "bad-config", TIMEOUT, |cs: &ChatService| {
        condition_true_now(cs, conditions::STALLED)
    })
    .await?;
    recorded.push((
        "bad-config",
        record(cp, ns.name(), "bad-config", dir.path(), "stalled-config")?,
    ));

    wait_for(&api, "startup", TIMEOUT, ready_now).await?;
    let pods: Api<Pod> = ns.api(admin.clone());
    let pod = a_ready_pod(&pods, "startup").await?;
    // kwok runs no container, so the test writes what the kubelet writes after the
    // service exits with its termination message: this is the line the real binary
    // writes for a JWT public key that is not a PEM key.
    let message = "phase=auth service=jwt_verifier: CHATGATE_JWT_PUBLIC_KEY is neither a PEM key (no -----BEGIN line) nor a readable file (No such file or directory (os error 2)); set it to the PEM text or a path to it";
    report_crash(&pods, &pod.name_any(), message, 3).await?;
    wait_for(
        &api,
        "startup",
        TIMEOUT,
        stalled_now(reason::STARTUP_FAILED),
    )
    .await?;
    recorded.push((
        "startup",
        record(cp, ns.name(), "startup", dir.path(), "stalled-startup")?,
    ));

    // Stale: the operator is gone when the spec changes, so the status still
    // describes the previous generation (what any reader sees in the moment between
    // an apply and the operator's next reconcile).
    op.stop().await;
    api.patch(
        "ready",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"image": "ghcr.io/chatgate/chatgate-service:next"}})),
    )
    .await?;
    let stale = api.get("ready").await?;
    assert!(
        stale.status.as_ref().and_then(|s| s.observed_generation) < stale.metadata.generation,
        "{:?}",
        stale.status
    );
    recorded.push((
        "stale",
        record(cp, ns.name(), "ready", dir.path(), "stale")?,
    ));

    let files: Vec<PathBuf> = recorded.iter().map(|(_, f)| f.clone()).collect();
    let kstatus = verdicts(&["kstatus"], &files)?;
    let argocd = verdicts(&["argocd-health", HEALTH_LUA], &files)?;
    let expected = [
        ("ready", "Current", "Healthy"),
        ("rolling", "InProgress", "Progressing"),
        ("bad-config", "Failed", "Degraded"),
        ("startup", "Failed", "Degraded"),
        ("stale", "InProgress", "Progressing"),
    ];
    for (i, (state, want_kstatus, want_argocd)) in expected.iter().enumerate() {
        assert_eq!(recorded[i].0, *state);
        let object = std::fs::read_to_string(&files[i])?;
        assert_eq!(
            kstatus[i].status, *want_kstatus,
            "kstatus of the {state} ChatService: {:?}\n{object}",
            kstatus[i]
        );
        assert_eq!(
            argocd[i].status, *want_argocd,
            "Argo CD health of the {state} ChatService: {:?}\n{object}",
            argocd[i]
        );
    }
    // Argo CD shows the operator's own words: the failing phase and service.
    assert!(
        argocd[3].message.contains("StartupFailed"),
        "{:?}",
        argocd[3]
    );
    assert!(
        argocd[3].message.contains(&pod.name_any()),
        "{:?}",
        argocd[3]
    );
    assert!(
        argocd[2].message.contains("CHATGATE_JWT"),
        "{:?}",
        argocd[2]
    );
    Ok(())
}

#[test]
fn the_argocd_cm_snippet_installs_exactly_health_lua() -> Result<()> {
    let snippet: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(ARGOCD_CM)?)?;
    let script = snippet["data"]["resource.customizations.health.chatgate.dev_ChatService"]
        .as_str()
        .context("the argocd-cm snippet has no health key for chatgate.dev/ChatService")?;
    assert_eq!(script, std::fs::read_to_string(HEALTH_LUA)?);
    Ok(())
}
