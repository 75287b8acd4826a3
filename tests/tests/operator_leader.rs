//! Leader election and restarts: of two instances exactly one reconciles; killing it
//! hands over; an operator restarted in the middle of a rollout converges. Also the
//! operator's own `/healthz`, `/readyz` and `/metrics`.

mod operator_support;

use anyhow::{Result, bail};
use chatgate_operator::crd::ChatService;
use chatgate_operator::run::{LEASE_NAME, lease_field_manager};
use chatgate_tests::http::get_local as http_get;
use chatgate_tests::{ControlPlane, TestNamespace, wait_for, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use operator_support::*;
use serde_json::json;

/// A free loopback port (bound once, then released for the operator to bind).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    l.local_addr().expect("its address").port()
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_instances_one_leads_and_killing_it_hands_over() -> Result<()> {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = TestNamespace::new(cp, "op-leader").await?;
    let admin = cp.client();
    let (port_a, port_b) = (free_port(), free_port());
    let with_http = |id: &str, port: u16| {
        let mut o = options(ns.name(), id);
        o.http = format!("127.0.0.1:{port}");
        o
    };
    let a = Operator::start_with(admin.clone(), with_http("a", port_a));
    let b = Operator::start_with(admin.clone(), with_http("b", port_b));
    let (ha, hb) = (a.health.clone(), b.health.clone());
    wait_until(TIMEOUT, "one instance to lead", || {
        let (ha, hb) = (ha.clone(), hb.clone());
        async move { Ok((ha.is_leader() || hb.is_leader()).then_some(())) }
    })
    .await?;
    assert!(
        !(a.health.is_leader() && b.health.is_leader()),
        "two leaders"
    );
    let (mut leader, standby, leader_id, standby_id, leader_port, standby_port) =
        if a.health.is_leader() {
            (a, b, "a", "b", port_a, port_b)
        } else {
            (b, a, "b", "a", port_b, port_a)
        };
    leader.wait_leading(TIMEOUT).await?;
    let leases: Api<Lease> = ns.api(admin.clone());
    assert_eq!(holder(&leases).await.as_deref(), Some(leader_id));

    // A standby that read the Lease as orphaned (a stale read, or both instances
    // starting at once) takes it with a server-side apply; that apply must conflict
    // with the leader's ownership of `holderIdentity`, or there would be two leaders.
    let stale_take = leases
        .patch(
            LEASE_NAME,
            &PatchParams::apply(&lease_field_manager(standby_id)),
            &Patch::Apply(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "spec": {"holderIdentity": standby_id},
            })),
        )
        .await;
    match stale_take {
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        other => bail!("a standby's apply of holderIdentity must conflict, got {other:?}"),
    }
    assert_eq!(holder(&leases).await.as_deref(), Some(leader_id));

    // Both are alive and ready; only the leader says it leads.
    let (code, body) = http_get(standby_port, "/readyz").await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("standby"), "{body}");
    let (code, body) = http_get(leader_port, "/readyz").await?;
    assert_eq!((code, body.trim()), (200, "leader: watches synced"));
    assert_eq!(http_get(standby_port, "/healthz").await?.0, 200);

    let chat_services: Api<ChatService> = ns.api(admin.clone());
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(1).build(),
    )
    .await?;
    wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    assert_eq!(
        standby.health.metrics.reconciles.get(),
        0,
        "the standby never reconciles"
    );
    let (_, metrics) = http_get(leader_port, "/metrics").await?;
    assert!(metrics.contains("chatgate_operator_leader 1"), "{metrics}");
    assert!(
        metrics.contains("chatgate_operator_reconciles_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("chatgate_operator_reconcile_duration_seconds_bucket"),
        "{metrics}"
    );
    // The ChatService's state as the alerts read it, on the leader only.
    let ready_series = format!(
        "chatgate_operator_chatservice_condition{{namespace=\"{}\",chatservice=\"chat\",environment=\"development\",condition=\"Ready\"}} 1",
        ns.name()
    );
    assert!(metrics.contains(&ready_series), "{metrics}");
    assert!(
        metrics.contains(
            "chatgate_operator_time_to_ready_seconds_count{environment=\"development\"} 1"
        ),
        "{metrics}"
    );
    let (_, standby_metrics) = http_get(standby_port, "/metrics").await?;
    assert!(
        !standby_metrics.contains("chatgate_operator_chatservice_condition{"),
        "a standby reports no ChatService: {standby_metrics}"
    );

    // A crash: the lease is not released; the standby takes over once it expires.
    leader.kill().await;
    let hs = standby.health.clone();
    wait_until(TIMEOUT, "the standby to take over", || {
        let hs = hs.clone();
        async move { Ok(hs.is_leader().then_some(())) }
    })
    .await?;
    assert_eq!(holder(&leases).await.as_deref(), Some(standby_id));

    // The new leader reconciles: a spec change converges.
    let changed = chat_services
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
    let done = wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    assert_eq!(done.metadata.generation, changed.metadata.generation);
    assert_eq!(done.status.unwrap().replicas_ready.as_deref(), Some("2/2"));
    assert!(standby.health.metrics.reconciles.get() > 0);
    // The new leader reports the ChatService, and stops when it is deleted.
    let (_, metrics) = http_get(standby_port, "/metrics").await?;
    assert!(metrics.contains(&ready_series), "{metrics}");
    chat_services.delete("chat", &Default::default()).await?;
    wait_until(
        TIMEOUT,
        "the deleted ChatService's series to go",
        move || async move {
            let (_, metrics) = http_get(standby_port, "/metrics").await?;
            Ok((!metrics.contains("chatservice=\"chat\"")).then_some(()))
        },
    )
    .await?;
    standby.stop().await;
    // A graceful stop releases the lease at once.
    if holder(&leases).await.is_some_and(|h| h == standby_id) {
        bail!("the lease was not released on a graceful stop");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restarted_mid_rollout_converges() -> Result<()> {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = TestNamespace::new(cp, "op-restart").await?;
    let admin = cp.client();
    let mut first = Operator::start(admin.clone(), ns.name(), "first");
    first.wait_leading(TIMEOUT).await?;

    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let deployments: Api<Deployment> = ns.api(admin.clone());
    create(
        &admin,
        ns.name(),
        &ChatService::test("chat").replicas(3).build(),
    )
    .await?;
    // The rollout has started (the Deployment exists) when the operator dies.
    wait_for(&deployments, "chat", TIMEOUT, |_| true).await?;
    first.kill().await;

    // While no operator runs, the spec changes.
    let changed = chat_services
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"image": "ghcr.io/chatgate/chatgate-service:next"}})),
        )
        .await?;

    let mut second = Operator::start(admin.clone(), ns.name(), "second");
    second.wait_leading(TIMEOUT).await?;
    let done = wait_for(&chat_services, "chat", TIMEOUT, ready_now).await?;
    assert_eq!(done.metadata.generation, changed.metadata.generation);
    assert_eq!(
        done.status.as_ref().unwrap().replicas_ready.as_deref(),
        Some("3/3")
    );
    let d = deployments.get("chat").await?;
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("ghcr.io/chatgate/chatgate-service:next")
    );
    second.stop().await;
    Ok(())
}
