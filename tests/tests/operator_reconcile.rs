//! The operator against the real control plane: children with the gate wired,
//! rollouts through Reconciling to Ready, refusals at admission and by validation,
//! startup failures named on the status, the status following the Deployment's
//! within a second, and garbage collection of children.
//!
//! Each test runs its own operator in-process, scoped to the test's namespace, with
//! leader election on a Lease there. Pods run on kwok's fake nodes, so they become
//! Running and Ready without containers.

mod operator_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use chatgate_contract::Environment;
use chatgate_operator::conditions::{self, reason};
use chatgate_operator::crd::{ChatService, SecretKeyRef};
use chatgate_operator::meta;
use chatgate_tests::{ControlPlane, TestNamespace, wait_for, wait_for_deletion, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use operator_support::status_log::{Side, StatusLog, signed_seconds};
use operator_support::*;
use serde_json::json;

const JWT_SECRET: &str = "a-test-secret-of-at-least-thirty-two-bytes";

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl().args(args).output().expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn merge_spec(
    api: &Api<ChatService>,
    name: &str,
    spec: serde_json::Value,
) -> Result<ChatService> {
    Ok(api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_gets_children_with_exactly_the_gate_wiring_and_becomes_ready() -> Result<()> {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = restricted_namespace(cp, "op-sample").await?;
    // The operator runs as the chart's ServiceAccount: its RBAC must be enough.
    install_chart_rbac(cp, ns.name())?;
    let mut op = Operator::start(
        cp.client_as_service_account(ns.name(), OPERATOR_SA),
        ns.name(),
        "only",
    );
    op.wait_leading(TIMEOUT).await?;

    let admin = cp.client();
    let cs = ChatService::test("chat")
        .replicas(2)
        .startup(30, 3)
        .drain_seconds(7)
        .build();
    create(&admin, ns.name(), &cs).await?;

    let deployments: Api<Deployment> = ns.api(admin.clone());
    let d = wait_for(&deployments, "chat", TIMEOUT, |_| true).await?;
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let startup = c.startup_probe.as_ref().unwrap();
    assert_eq!(
        startup.http_get.as_ref().unwrap().path.as_deref(),
        Some("/health/startup")
    );
    assert_eq!(
        startup.failure_threshold.unwrap() * startup.period_seconds.unwrap(),
        30
    );
    assert_eq!(startup.period_seconds, Some(3));
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/health/ready")
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/health/live")
    );
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    assert_eq!(
        c.lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .sleep
            .as_ref()
            .unwrap()
            .seconds,
        5
    );
    assert!(pod.termination_grace_period_seconds.unwrap() >= 5 + 7);
    let ru = d
        .spec
        .as_ref()
        .unwrap()
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
    let owner = &d.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("ChatService", Some(true))
    );
    assert_eq!(
        d.metadata.managed_fields.as_ref().unwrap()[0]
            .manager
            .as_deref(),
        Some(meta::FIELD_MANAGER)
    );

    let services: Api<Service> = ns.api(admin.clone());
    let config_maps: Api<ConfigMap> = ns.api(admin.clone());
    let pdbs: Api<PodDisruptionBudget> = ns.api(admin.clone());
    wait_for(&services, "chat", TIMEOUT, |_| true).await?;
    let cm = wait_for(&config_maps, "chat-config", TIMEOUT, |_| true).await?;
    assert_eq!(cm.data.as_ref().unwrap()["CHATGATE_ENV"], "development");
    wait_for(&pdbs, "chat", TIMEOUT, |_| true).await?;

    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let ready = wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let status = ready.status.as_ref().unwrap();
    assert_eq!(status.replicas_ready.as_deref(), Some("2/2"));
    assert!(conditions::find(&status.conditions, conditions::RECONCILING).is_none());
    assert!(conditions::find(&status.conditions, conditions::STALLED).is_none());
    assert!(conditions::is_true(
        &status.conditions,
        conditions::CONFIG_VALID
    ));
    assert!(conditions::is_true(
        &status.conditions,
        conditions::STARTUP_COMPLETE
    ));

    // The real kubectl agrees (kstatus-style wait on the Ready condition).
    kubectl_ok(
        cp,
        &[
            "wait",
            "--for=condition=Ready",
            "chatservice/chat",
            "-n",
            ns.name(),
            "--timeout=60s",
        ],
    );
    let table = kubectl_ok(cp, &["get", "chatsvc", "chat", "-n", ns.name()]);
    assert!(
        table.contains("development") && table.contains("True") && table.contains("2/2"),
        "{table}"
    );

    // Transitions were recorded as Events by the operator's account.
    let events: Api<Event> = ns.api(admin.clone());
    wait_until(TIMEOUT, "a Ready event for chat", || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some(reason::READY)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("chat")
                })
                .then_some(()))
        }
    })
    .await?;
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_goes_through_reconciling_to_ready() -> Result<()> {
    let Setup { ns, admin, op, .. } = operator_in_new_namespace("op-rollout").await?;

    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(2).build(),
    )
    .await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let first = wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;

    let seen = Arc::new(Mutex::new(Vec::<(Option<i64>, bool, bool)>::new()));
    let record = seen.clone();
    let watching = tokio::spawn({
        let api = chat_services.clone();
        async move {
            wait_for(&api, "chat", TIMEOUT, move |cs: &ChatService| {
                let reconciling = condition_true_now(cs, conditions::RECONCILING);
                record.lock().unwrap().push((
                    cs.status.as_ref().and_then(|s| s.observed_generation),
                    reconciling,
                    ready_now(cs),
                ));
                cs.metadata.generation >= Some(2) && ready_now(cs)
            })
            .await
        }
    });
    let changed = merge_spec(
        &chat_services,
        "chat",
        json!({ "image": "ghcr.io/chatgate/chatgate-service:next" }),
    )
    .await?;
    assert_eq!(
        changed.metadata.generation,
        Some(first.metadata.generation.unwrap() + 1)
    );
    let done = watching.await??;
    let generation = done.metadata.generation;
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|(g, reconciling, ready)| *g == generation && *reconciling && !*ready),
        "Reconciling=True was never observed for generation {generation:?}: {seen:?}"
    );
    let deployments: Api<Deployment> = ns.api(admin.clone());
    let d = deployments.get("chat").await?;
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("ghcr.io/chatgate/chatgate-service:next")
    );
    op.stop().await;
    Ok(())
}

/// The most a ChatService's `Ready` may trail its Deployment's own status: it follows
/// the Deployment watch, not a timed requeue (the resync is minutes).
const STATUS_LAG_BOUND: Duration = Duration::from_secs(1);

/// Marks `pod` ready or not through the status subresource, as the kubelet would when
/// its readiness probe starts failing or passes again. kwok leaves a Running pod's
/// conditions alone, so the Deployment's status follows only this.
async fn set_pod_ready(pods: &Api<Pod>, pod: &str, ready: bool) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    pods.patch_status(
        pod,
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"conditions": [
            {"type": "Ready", "status": status},
            {"type": "ContainersReady", "status": status},
        ]}})),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_follows_the_deployments_within_a_second() -> Result<()> {
    let Setup { ns, admin, op, .. } = operator_in_new_namespace("op-follow").await?;
    let log = StatusLog::start(admin.clone(), ns.name()).await?;
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(1).build(),
    )
    .await?;

    // Each step changes only the Deployment's status (through its pod), never the
    // ChatService: Ready must follow from the Deployment watch alone.
    let pods: Api<Pod> = ns.api(admin.clone());
    let mut lags = Vec::new();
    for (step, set_ready, nth) in [
        ("kwok started the pod", None, 0),
        ("the pod turned unready", Some(false), 0),
        ("the pod turned ready again", Some(true), 1),
    ] {
        let up = set_ready.unwrap_or(true);
        if let Some(ready) = set_ready {
            let selector = format!("{}=chat", meta::LABEL_INSTANCE);
            let pod = pods
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .into_iter()
                .next()
                .expect("the Deployment's pod");
            set_pod_ready(&pods, &pod.name_any(), ready).await?;
        }
        let deployment = log.wait(Side::Deployment, "chat", up, nth, TIMEOUT).await?;
        let chat_service = log
            .wait(Side::ChatService, "chat", up, nth, TIMEOUT)
            .await?;
        let lag = signed_seconds(deployment, chat_service);
        println!(
            "{step}: Ready={up} {:.0} ms after the Deployment's status",
            lag * 1000.0
        );
        lags.push((step, lag));
    }
    for (step, lag) in &lags {
        assert!(
            *lag < STATUS_LAG_BOUND.as_secs_f64(),
            "{step}: Ready followed the Deployment's status after {lag:.3} s (bound {STATUS_LAG_BOUND:?}); every change: {:?}",
            log.transitions()
        );
    }
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_refused_at_admission_with_the_cel_message() -> Result<()> {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = TestNamespace::new(cp, "op-cel").await?;
    let admin = cp.client();
    let cs = ChatService::test("prod")
        .in_env(Environment::Production)
        .with_secret("s")
        .replicas(1)
        .build();
    let err = create(&admin, ns.name(), &cs)
        .await
        .expect_err("a production ChatService with 1 replica is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("a production ChatService needs at least 2 replicas"),
        "{text}"
    );
    assert!(text.contains("spec.replicas"), "{text}");

    let mut bad_budget = ChatService::test("budget").startup(31, 2).build();
    bad_budget.metadata.name = Some("budget".into());
    let err = create(&admin, ns.name(), &bad_budget)
        .await
        .expect_err("a budget that is not a multiple of the period is refused");
    assert!(
        format!("{err:#}").contains("must be a multiple of startup.periodSeconds"),
        "{err:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_operator_rejects_leaves_the_old_deployment_and_stalls() -> Result<()> {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = TestNamespace::new(cp, "op-reject").await?;
    let admin = cp.client();
    create_secret(
        &admin,
        ns.name(),
        "chat-secrets",
        &[
            ("jwt-secret", JWT_SECRET),
            // Staging shares one PostgreSQL (kwok's pods never connect to it).
            ("database-url", "postgres://chat:pw@db.invalid:5432/chat"),
        ],
    )
    .await?;
    let mut op = Operator::start(admin.clone(), ns.name(), "only");
    op.wait_leading(TIMEOUT).await?;

    let cs = ChatService::test("chat")
        .in_env(Environment::Staging)
        .with_secret("chat-secrets")
        .replicas(1)
        .build();
    create(&admin, ns.name(), &cs).await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let good = wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let deployments: Api<Deployment> = ns.api(admin.clone());
    let before = deployments.get("chat").await?;

    // The LLM key now points at a Secret that does not exist.
    let llm = SecretKeyRef {
        name: "llm".into(),
        key: "api-key".into(),
    };
    merge_spec(
        &chat_services,
        "chat",
        json!({"llm": {"provider": "openai", "apiKeySecretRef": llm}}),
    )
    .await?;
    let (stalled, message) =
        wait_stalled(&chat_services, "chat", reason::MISSING_REFERENCE).await?;
    assert!(message.contains("CHATGATE_LLM_API_KEY"), "{message}");
    assert!(
        message.contains(&format!(
            "generation {} keeps serving",
            good.metadata.generation.unwrap()
        )),
        "{message}"
    );
    let ready = condition(&stalled, conditions::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reason::MISSING_REFERENCE)
    );
    let status = stalled.status.as_ref().unwrap();
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.key == "CHATGATE_LLM_API_KEY"),
        "{:?}",
        status.problems
    );
    assert_eq!(status.applied_generation, good.metadata.generation);

    let after = deployments.get("chat").await?;
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "the Deployment was not touched"
    );
    assert_eq!(after.spec, before.spec);

    // Creating the Secret clears it without touching the ChatService.
    create_secret(&admin, ns.name(), "llm", &[("api-key", "k")]).await?;
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let rolled = deployments.get("chat").await?;
    let env = rolled.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        env.iter().any(|e| e.name == "CHATGATE_LLM_API_KEY"),
        "{env:?}"
    );
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_failing_startup_is_named_on_the_status_and_printer_column() -> Result<()> {
    let Setup { cp, ns, admin, op } = operator_in_new_namespace("op-startup").await?;
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(1).build(),
    )
    .await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;

    let pods: Api<Pod> = ns.api(admin.clone());
    let pod = a_ready_pod(&pods, "chat").await?;

    // kwok runs no container, so the test writes what the kubelet would after the
    // service exited with its termination message: through the status subresource.
    let message = "phase=supervisor service=agent_supervisor: LLM API key missing";
    report_crash(&pods, &pod.name_any(), message, 3).await?;

    let want = format!(
        "pod {}: agent supervisor missing: LLM API key missing",
        pod.name_any()
    );
    let stalled = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        stalled_now(reason::STARTUP_FAILED),
    )
    .await?;
    assert_eq!(
        condition(&stalled, conditions::STALLED).unwrap().message,
        want
    );
    let ready = condition(&stalled, conditions::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("False", want.as_str())
    );
    let failure = &stalled.status.as_ref().unwrap().startup_failures[0];
    assert_eq!(failure.phase.as_deref(), Some("supervisor"));
    assert_eq!(failure.service.as_deref(), Some("agent_supervisor"));

    // Wait on the status first (kwok may put the pod back to ready afterwards).
    let table = kubectl_ok(cp, &["get", "chatservices", "-n", ns.name()]);
    if table.contains("StartupFailed") {
        assert!(
            table.contains("agent supervisor missing: LLM API key missing"),
            "{table}"
        );
    }
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_object_with_a_child_name_is_reported_not_taken_over() -> Result<()> {
    let Setup { ns, admin, op, .. } = operator_in_new_namespace("op-takeover").await?;
    let services: Api<Service> = ns.api(admin.clone());
    let theirs: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "chat", "labels": {"team": "payments"}},
        "spec": {"selector": {"app": "payments"}, "ports": [{"port": 9000}]},
    }))?;
    services.create(&Default::default(), &theirs).await?;

    let chat_services: Api<ChatService> = ns.api(admin.clone());
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(1).build(),
    )
    .await?;
    let (stalled, message) = wait_stalled(&chat_services, "chat", reason::CHILD_NOT_OWNED).await?;
    assert!(
        message.starts_with(&format!(
            "Service {0}/chat already exists and is not controlled by ChatService {0}/chat",
            ns.name()
        )),
        "{message}"
    );
    let ready = condition(&stalled, conditions::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reason::CHILD_NOT_OWNED)
    );

    // Their Service is as they made it: no owner reference, no field of the operator's.
    let after = services.get("chat").await?;
    assert!(after.metadata.owner_references.is_none(), "{after:?}");
    assert_eq!(
        after.spec.as_ref().and_then(|s| s.selector.clone()),
        Some([("app".to_owned(), "payments".to_owned())].into())
    );
    assert!(
        after
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .all(|m| m.manager.as_deref() != Some(meta::FIELD_MANAGER)),
        "{:?}",
        after.metadata.managed_fields
    );

    // Once they remove it, the operator creates its own and the ChatService gets Ready.
    services.delete("chat", &DeleteParams::default()).await?;
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let ours = services.get("chat").await?;
    assert!(
        ours.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "ChatService" && o.name == "chat"),
        "{ours:?}"
    );
    op.stop().await;
    Ok(())
}

fn template_config_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(meta::ANNOTATION_CONFIG_HASH))
        .cloned()
        .unwrap_or_default()
}

/// Pods read Secret values when they start, so a rotated Secret rolls them; a Secret
/// deleted during that rollout stalls the ChatService without another write, and
/// recreating it completes the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_referenced_secret_rolls_the_pods_and_deleting_it_mid_rollout_stalls()
-> Result<()> {
    let Setup { ns, admin, op, .. } = operator_in_new_namespace("op-rotate").await?;
    let secret_data = [
        ("jwt-secret", JWT_SECRET),
        ("database-url", "postgres://chat:pw@db.invalid:5432/chat"),
    ];
    create_secret(&admin, ns.name(), "chat-secrets", &secret_data).await?;
    let cs = ChatService::test("chat")
        .in_env(Environment::Staging)
        .with_secret("chat-secrets")
        .replicas(1)
        .build();
    create(&admin, ns.name(), &cs).await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let deployments: Api<Deployment> = ns.api(admin.clone());
    let before = deployments.get("chat").await?;
    let hash_before = template_config_hash(&before);
    assert!(!hash_before.is_empty());

    // Rotate the JWT secret: the pod template changes, so the Deployment rolls.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = ns.api(admin.clone());
    secrets
        .patch(
            "chat-secrets",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"jwt-secret": "a-rotated-secret-of-at-least-thirty-two-bytes"}})),
        )
        .await?;
    let rotated = wait_for(&deployments, "chat", TIMEOUT, move |d: &Deployment| {
        template_config_hash(d) != hash_before
    })
    .await?;

    // Deleted while that rollout goes on: the ChatService stalls naming the Secret,
    // and the operator writes nothing to the Deployment.
    secrets
        .delete("chat-secrets", &DeleteParams::default())
        .await?;
    let (_, message) = wait_stalled(&chat_services, "chat", reason::MISSING_REFERENCE).await?;
    assert!(message.contains("chat-secrets"), "{message}");
    let during = deployments.get("chat").await?;
    assert_eq!(during.metadata.generation, rotated.metadata.generation);
    assert_eq!(
        template_config_hash(&during),
        template_config_hash(&rotated)
    );

    // Back with the rotated values: Ready, on the rotated template.
    create_secret(
        &admin,
        ns.name(),
        "chat-secrets",
        &[
            (
                "jwt-secret",
                "a-rotated-secret-of-at-least-thirty-two-bytes",
            ),
            ("database-url", "postgres://chat:pw@db.invalid:5432/chat"),
        ],
    )
    .await?;
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let after = deployments.get("chat").await?;
    // A recreated Secret is a new object with a new version: one more roll, no more.
    assert!(after.metadata.generation <= rotated.metadata.generation.map(|g| g + 1));
    op.stop().await;
    Ok(())
}

/// A crash between applying the children and writing the status: the first operator
/// may apply children but is refused the status (its Role lacks `chatservices/status`,
/// which stops it at exactly that point on every attempt), then is killed without
/// releasing its Lease. The next one, as the chart's ServiceAccount, takes over,
/// writes the status and re-applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_between_children_and_status_is_taken_over_without_a_second_write()
-> Result<()> {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = TestNamespace::new(cp, "op-crash").await?;
    let admin = cp.client();
    install_chart_rbac_with(cp, ns.name(), &[&format!("watchNamespace={}", ns.name())])?;

    // The chart's rules in this namespace, less the status, for a user of its own.
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let roles: Api<Role> = ns.api(admin.clone());
    let mut rules = Vec::new();
    for role in roles.list(&ListParams::default()).await?.items {
        rules.extend(role.rules.unwrap_or_default());
    }
    rules.retain(|r| {
        !r.resources
            .iter()
            .flatten()
            .any(|x| x == "chatservices/status")
    });
    assert!(
        rules
            .iter()
            .any(|r| r.resources.iter().flatten().any(|x| x == "deployments"))
    );
    let user = format!("crashing-{}", ns.name());
    roles
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": user}, "rules": rules}))?,
        )
        .await?;
    ns.api::<RoleBinding>(admin.clone())
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": user},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            }))?,
        )
        .await?;
    let crashing = cp.client_as(&user, &[])?;
    chatgate_tests::wait_until(TIMEOUT, "the crashing user's Role to take effect", || {
        let api: Api<ChatService> = ns.api(crashing.clone());
        async move { Ok(api.list(&ListParams::default()).await.ok().map(|_| ())) }
    })
    .await?;

    let mut first = Operator::start_with(crashing, options(ns.name(), "first"));
    first.wait_leading(TIMEOUT).await?;
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(1).build(),
    )
    .await?;
    let deployments: Api<Deployment> = ns.api(admin.clone());
    let applied = wait_until(TIMEOUT, "the children applied", || {
        let deployments = deployments.clone();
        async move { Ok(deployments.get_opt("chat").await?) }
    })
    .await?;
    // Let it fail the status write a few times (retries back off from 1 s).
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let unwritten = chat_services.get("chat").await?.status.unwrap_or_default();
    assert!(unwritten.conditions.is_empty(), "{unwritten:?}");
    let config_maps: Api<ConfigMap> = ns.api(admin.clone());
    let services: Api<Service> = ns.api(admin.clone());
    let cm_version = config_maps
        .get(&meta::config_map_name("chat"))
        .await?
        .metadata
        .resource_version;
    let svc_version = services.get("chat").await?.metadata.resource_version;
    first.kill().await;

    // The successor waits out the dead leader's Lease, then converges.
    let token = cp.service_account_token(ns.name(), OPERATOR_SA).await?;
    let mut second =
        Operator::start_with(cp.client_with_token(&token)?, options(ns.name(), "second"));
    second.wait_leading(TIMEOUT).await?;
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let children_writes = second.health.metrics.writes_of("children");
    assert_eq!(children_writes, 0, "the successor re-applied children");
    assert_eq!(
        deployments.get("chat").await?.metadata.generation,
        applied.metadata.generation
    );
    assert_eq!(
        config_maps
            .get(&meta::config_map_name("chat"))
            .await?
            .metadata
            .resource_version,
        cm_version
    );
    assert_eq!(
        services.get("chat").await?.metadata.resource_version,
        svc_version
    );
    second.stop().await;
    Ok(())
}

/// The password a user pasted, which no surface a ChatService reader sees may carry.
const PASSWORD: &str = "Hunter2Secret";

/// Every status field, condition and Event of `name` as one text, to search for the password.
async fn everything_a_reader_sees(admin: &kube::Client, ns: &str, name: &str) -> Result<String> {
    let cs = Api::<ChatService>::namespaced(admin.clone(), ns)
        .get(name)
        .await?;
    let events = Api::<Event>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(format!(
        "{}\n{}",
        serde_json::to_string(&cs.status)?,
        serde_json::to_string(&events.items)?
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_secret_value_never_reaches_status_conditions_or_events() -> Result<()> {
    let Setup { ns, admin, op, .. } = operator_in_new_namespace("op-leak").await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let quoted = format!("\"postgres://chat:{PASSWORD}@db:5432/chat\"");

    // 1. Written inline: the operator's own validation names the key, not the value.
    let mut inline = ChatService::test("inline").replicas(1).build();
    inline.spec.database.url = Some(quoted.clone());
    create(&admin, ns.name(), &inline).await?;
    let (stalled, message) = wait_stalled(&chat_services, "inline", reason::INVALID_CONFIG).await?;
    assert!(message.contains("CHATGATE_DATABASE_URL"), "{message}");
    assert!(message.contains("remove them"), "{message}");
    let problems = &stalled.status.as_ref().unwrap().problems;
    assert!(
        problems.iter().any(|p| p.key == "CHATGATE_DATABASE_URL"),
        "{problems:?}"
    );

    // 2. From a Secret: the operator never reads the value, but the pod exits with the
    // service's termination line, which the status and an Event repeat.
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(1).build(),
    )
    .await?;
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    let pods: Api<Pod> = ns.api(admin.clone());
    let pod = a_ready_pod(&pods, "chat").await?;
    let set = chatgate_contract::config::ConfigSet::from_env_vars([
        ("CHATGATE_ENV", "staging"),
        ("CHATGATE_DATABASE_URL", quoted.as_str()),
        ("CHATGATE_JWT_SECRET", JWT_SECRET),
        ("CHATGATE_JWT_ISSUER", "https://issuer.example"),
        ("CHATGATE_JWT_AUDIENCE", "chatgate"),
    ]);
    let problems = chatgate_service::config::ServiceConfig::from_set(&set)
        .expect_err("a quoted URL is refused");
    let line = chatgate_service::config::termination_for(&problems).to_string();
    assert!(line.contains("CHATGATE_DATABASE_URL"), "{line}");
    report_crash(&pods, &pod.name_any(), &line, 2).await?;
    let (stalled, message) = wait_stalled(&chat_services, "chat", reason::STARTUP_FAILED).await?;
    assert!(message.contains("CHATGATE_DATABASE_URL"), "{message}");
    let failure = &stalled.status.as_ref().unwrap().startup_failures[0];
    assert!(failure.message.contains("wrapped in quotes"), "{failure:?}");

    // The Warning Events for both are recorded before the last status write is seen.
    let events: Api<Event> = ns.api(admin.clone());
    wait_until(TIMEOUT, "Warning Events for both ChatServices", || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            let warned = |name: &str| {
                list.items.iter().any(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
            };
            Ok((warned("inline") && warned("chat")).then_some(()))
        }
    })
    .await?;
    for name in ["inline", "chat"] {
        let seen = everything_a_reader_sees(&admin, ns.name(), name).await?;
        assert!(seen.contains("CHATGATE_DATABASE_URL"), "{seen}");
        assert!(!seen.contains(PASSWORD), "{name}: {seen}");
    }
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_chat_service_removes_its_children() -> Result<()> {
    let Setup { ns, admin, op, .. } = operator_in_new_namespace("op-delete").await?;
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(2).build(),
    )
    .await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;

    // Below two replicas the PodDisruptionBudget goes away.
    let pdbs: Api<PodDisruptionBudget> = ns.api(admin.clone());
    wait_for(&pdbs, "chat", TIMEOUT, |_| true).await?;
    merge_spec(&chat_services, "chat", json!({"replicas": 1})).await?;
    wait_for_deletion(&pdbs, "chat", TIMEOUT).await?;
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;

    chat_services
        .delete("chat", &DeleteParams::default())
        .await?;
    let deployments: Api<Deployment> = ns.api(admin.clone());
    let services: Api<Service> = ns.api(admin.clone());
    let config_maps: Api<ConfigMap> = ns.api(admin.clone());
    wait_for_deletion(&deployments, "chat", TIMEOUT).await?;
    wait_for_deletion(&services, "chat", TIMEOUT).await?;
    wait_for_deletion(&config_maps, "chat-config", TIMEOUT).await?;
    op.stop().await;
    Ok(())
}
