//! The readiness gate end to end: the operator's Deployment runs the real
//! `chatgate-service` binary on a node served by the test node agent, which executes
//! the Pod's probes. A Pod whose critical services all exist becomes Ready, is
//! published as a ready endpoint and serves an authenticated WebSocket; a Pod whose
//! critical service cannot be built never becomes Ready, and the ChatService names
//! the service from the real binary's termination message.

mod operator_support;

use anyhow::{Context, Result};
use chatgate_operator::conditions::{self, reason};
use chatgate_operator::crd::{ChatService, JwtAlgorithm, SecretKeyRef};
use chatgate_operator::meta;
use chatgate_tests::image::{Images, service_reference};
use chatgate_tests::node_agent::{AGENT_NODE_LABEL, AGENT_NODE_TAINT_KEY};
use chatgate_tests::process::free_loopback_ports;
use chatgate_tests::wait::pod_ready;
use chatgate_tests::{ControlPlane, NodeAgent, wait_for, wait_until};
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use operator_support::*;
use serde_json::json;
use tokio::sync::OnceCell;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const JWT_SECRET: &str = "a-test-signing-secret-of-at-least-32-bytes";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "chatgate";

/// One node agent for the test binary (tests run in parallel and share it).
async fn agent(cp: &'static ControlPlane) -> &'static NodeAgent {
    static AGENT: OnceCell<NodeAgent> = OnceCell::const_new();
    AGENT
        .get_or_init(|| async {
            let images = Images::shared().await.expect("the images build");
            NodeAgent::start(cp, "agent-node-0", images.clone())
                .await
                .expect("the node agent starts")
        })
        .await
}

/// A development ChatService on the agent's node, with its JWT secret and database
/// URL in Secret `chat-secrets`.
fn on_agent_node(name: &str) -> chatgate_operator::fixtures::ChatServiceBuilder {
    ChatService::test(name)
        .image(&service_reference())
        .replicas(1)
        .with_secret("chat-secrets")
        .startup(20, 1)
        .drain_seconds(1)
        .on_nodes(AGENT_NODE_LABEL.0, AGENT_NODE_LABEL.1, AGENT_NODE_TAINT_KEY)
}

async fn secrets(admin: &kube::Client, ns: &str, extra: &[(&str, &str)]) -> Result<()> {
    let mut keys = vec![
        ("jwt-secret", JWT_SECRET),
        ("database-url", "sqlite::memory:"),
    ];
    keys.extend_from_slice(extra);
    create_secret(admin, ns, "chat-secrets", &keys).await?;
    Ok(())
}

/// The pods of ChatService `name`.
async fn pods_of(pods: &Api<Pod>, name: &str) -> Result<Vec<Pod>> {
    let selector = format!("{}={name}", meta::LABEL_INSTANCE);
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// `(ready, not ready)` endpoint counts of Service `name`'s EndpointSlices.
async fn endpoints(slices: &Api<EndpointSlice>, name: &str) -> Result<(usize, usize)> {
    let selector = format!("kubernetes.io/service-name={name}");
    let mut counts = (0, 0);
    for slice in slices
        .list(&ListParams::default().labels(&selector))
        .await?
    {
        for endpoint in slice.endpoints {
            let ready = endpoint.conditions.and_then(|c| c.ready).unwrap_or(false);
            if ready {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
    }
    Ok(counts)
}

/// For a failure message: the chat pods' statuses and what the agent ran.
async fn what_the_node_saw(pods: &Api<Pod>, agent: &NodeAgent) -> String {
    let statuses: Vec<String> = match pods_of(pods, "chat").await {
        Ok(list) => list
            .iter()
            .map(|p| format!("{}: {}", p.name_any(), json!(p.status)))
            .collect(),
        Err(e) => vec![format!("(pods could not be listed: {e})")],
    };
    format!("pods: {statuses:#?}\nnode agent: {:#?}", agent.pods())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_takes_traffic_once_every_critical_service_exists() -> Result<()> {
    let Setup { cp, ns, admin, op } = operator_in_new_namespace("gate-ok").await?;
    let agent = agent(cp).await;
    secrets(&admin, ns.name(), &[]).await?;
    create(&admin, ns.name(), &on_agent_node("chat").build()).await?;

    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let pods: Api<Pod> = ns.api(admin.clone());
    let ready = match wait_for(&chat_services, "chat", TIMEOUT, ready_now).await {
        Ok(cs) => cs,
        Err(e) => anyhow::bail!("{e}\n{}", what_the_node_saw(&pods, agent).await),
    };
    assert_eq!(
        ready.status.as_ref().unwrap().replicas_ready.as_deref(),
        Some("1/1")
    );
    let pod = pods_of(&pods, "chat")
        .await?
        .into_iter()
        .find(pod_ready)
        .context("a ready pod")?;
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(agent.node().name.as_str())
    );
    let record = agent
        .pod(ns.name(), &pod.name_any())
        .context("the agent ran the pod")?;
    assert!(record.ever_ready);
    let log = std::fs::read_to_string(record.log.as_ref().unwrap())?;
    assert!(
        log.contains("startup complete; every critical service exists"),
        "{log}"
    );
    // StartupComplete comes from the pods' started state.
    let startup = condition(&ready, conditions::STARTUP_COMPLETE).unwrap();
    assert_eq!(startup.status, "True", "{startup:?}");

    // The Service publishes the pod as a ready endpoint.
    let slices: Api<EndpointSlice> = ns.api(admin.clone());
    wait_until(TIMEOUT, "one ready endpoint for Service chat", || {
        let slices = slices.clone();
        async move { Ok((endpoints(&slices, "chat").await? == (1, 0)).then_some(())) }
    })
    .await?;

    // And the real service behind it serves an authenticated WebSocket with the
    // JWT secret the operator wired from the Secret.
    let address = record.address.context("the pod's address")?;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({
            "sub": "ada", "iss": ISSUER, "aud": AUDIENCE,
            "exp": jsonwebtoken::get_current_timestamp() + 600,
        }),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?;
    let mut request = format!("ws://{address}/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(connected) => connected,
        Err(e) => anyhow::bail!(
            "WebSocket to {address}: {e}\n{}",
            what_the_node_saw(&pods, agent).await
        ),
    };
    let next_text =
        async |socket: &mut tokio_tungstenite::WebSocketStream<_>| -> Result<serde_json::Value> {
            loop {
                let frame = tokio::time::timeout(TIMEOUT, socket.next())
                    .await?
                    .context("the socket closed")??;
                if let Message::Text(text) = frame {
                    return Ok(serde_json::from_str(&text)?);
                }
            }
        };
    assert_eq!(next_text(&mut socket).await?["type"], "connected");
    socket
        .send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await?;
    assert_eq!(next_text(&mut socket).await?["type"], "pong");
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_missing_a_critical_service_never_takes_traffic_and_the_status_names_it() -> Result<()>
{
    let Setup { cp, ns, admin, op } = operator_in_new_namespace("gate-broken").await?;
    let agent = agent(cp).await;
    // The key exists, so the operator's reference checks pass; its value is not a
    // public key, which only the service itself can find out.
    secrets(
        &admin,
        ns.name(),
        &[("jwt-public-key", "not a PEM public key")],
    )
    .await?;
    let mut cs = on_agent_node("chat").build();
    cs.spec.jwt.algorithm = JwtAlgorithm::RS256;
    cs.spec.jwt.secret_ref = None;
    cs.spec.jwt.public_key_ref = Some(SecretKeyRef {
        name: "chat-secrets".into(),
        key: "jwt-public-key".into(),
    });
    create(&admin, ns.name(), &cs).await?;

    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let (stalled, message) = wait_stalled(&chat_services, "chat", reason::STARTUP_FAILED).await?;
    assert!(message.contains("JWT verifier missing"), "{message}");
    let failure = &stalled.status.as_ref().unwrap().startup_failures[0];
    assert_eq!(
        (failure.phase.as_deref(), failure.service.as_deref()),
        (Some("auth"), Some("jwt_verifier")),
        "{failure:?}"
    );
    let ready = condition(&stalled, conditions::READY).unwrap();
    assert_eq!(ready.status, "False");
    assert_eq!(
        condition(&stalled, conditions::CONFIG_VALID)
            .unwrap()
            .status,
        "True",
        "the operator could not have known"
    );

    // The pod ran the real binary, which exited naming the service; it never
    // became ready and the Service never published it as ready.
    let pods: Api<Pod> = ns.api(admin.clone());
    let pod = pods_of(&pods, "chat").await?.pop().context("a pod")?;
    let record = agent
        .pod(ns.name(), &pod.name_any())
        .context("the agent ran the pod")?;
    assert!(record.starts >= 1);
    assert!(!record.ever_ready);
    assert!(!pod_ready(&pod));
    let slices: Api<EndpointSlice> = ns.api(admin.clone());
    assert_eq!(endpoints(&slices, "chat").await?.0, 0);
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_image_the_node_cannot_pull_waits_in_image_pull_backoff() -> Result<()> {
    let Setup { cp, ns, admin, op } = operator_in_new_namespace("gate-pull").await?;
    let agent = agent(cp).await;
    secrets(&admin, ns.name(), &[]).await?;
    let missing = "ghcr.io/chatgate/chatgate-service:no-such-tag";
    create(
        &admin,
        ns.name(),
        &on_agent_node("chat").image(missing).build(),
    )
    .await?;

    let pods: Api<Pod> = ns.api(admin.clone());
    let waiting_reason = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone())
    };
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    wait_until(
        TIMEOUT,
        "the pod to go ErrImagePull, then ImagePullBackOff",
        || {
            let (pods, seen) = (pods.clone(), seen.clone());
            async move {
                let chat_pods = pods_of(&pods, "chat").await?;
                let mut seen = seen.lock().unwrap();
                for pod in chat_pods {
                    if let Some(reason) = waiting_reason(&pod) {
                        seen.insert(reason);
                    }
                    assert!(!pod_ready(&pod), "a pod without its image became ready");
                }
                Ok(
                    (seen.contains("ErrImagePull") && seen.contains("ImagePullBackOff"))
                        .then_some(()),
                )
            }
        },
    )
    .await
    .with_context(|| format!("reasons seen: {:?}", seen.lock().unwrap()))?;
    let pod = pods_of(&pods, "chat").await?.pop().context("a pod")?;
    let record = agent.pod(ns.name(), &pod.name_any()).unwrap_or_default();
    assert_eq!(record.starts, 0, "no container starts without its image");
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_operator_runs_in_cluster_from_its_image_and_gates_a_chat_service() -> Result<()>
{
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let agent = agent(cp).await;
    let images = Images::shared().await?;
    // Restricted Pod Security: the chart's pod and the ChatService's pods run as
    // the profile demands, and the node agent enforces their securityContext.
    let ns = restricted_namespace(cp, "in-cluster").await?;
    let admin = cp.client();
    // Pods share the host's network here, so the operator's port must be free.
    let port = free_loopback_ports(1)?[0];
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/chatgate-operator");
    let values = [
        "replicas=1".to_owned(),
        format!("watchNamespace={}", ns.name()),
        format!("metrics.service.port={port}"),
        format!("nodeSelector.{}={}", AGENT_NODE_LABEL.0, AGENT_NODE_LABEL.1),
        format!("tolerations[0].key={AGENT_NODE_TAINT_KEY}"),
        "tolerations[0].operator=Exists".to_owned(),
        "tolerations[0].effect=NoSchedule".to_owned(),
    ];
    let mut install = cp.helm();
    install.args(["install", ns.name(), chart, "--namespace", ns.name()]);
    for value in &values {
        install.args(["--set", value]);
    }
    let out = install.output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The operator pod runs the chart's image (the reference it names is the one
    // `make image` tagged) and becomes ready once its watches synced.
    let pods: Api<Pod> = ns.api(admin.clone());
    let operator_pod = wait_until(TIMEOUT, "the chart's operator pod to be ready", || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=chatgate-operator"))
                .await?;
            Ok(list.items.into_iter().find(pod_ready))
        }
    })
    .await
    .with_context(|| format!("operator pod never ready; node saw: {:?}", agent.pods()))?;
    let container = &operator_pod.spec.as_ref().context("a pod spec")?.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(images.operator.reference().as_str())
    );

    secrets(&admin, ns.name(), &[]).await?;
    create(&admin, ns.name(), &on_agent_node("chat").build()).await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    wait_for(&chat_services, "chat", TIMEOUT, ready_now)
        .await
        .with_context(|| format!("ChatService never Ready; node saw: {:?}", agent.pods()))?;

    // The one that reconciled it is the in-cluster operator: it holds the Lease
    // under its pod name, using the token the node projected for its
    // ServiceAccount.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api(admin.clone());
    let lease = leases.get(chatgate_operator::run::LEASE_NAME).await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(operator_pod.name_any().as_str())
    );
    let mut uninstall = cp.helm();
    uninstall.args(["uninstall", ns.name(), "--namespace", ns.name(), "--wait"]);
    let out = uninstall.output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
