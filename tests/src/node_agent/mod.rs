//! A test-side kubelet for one node that kwok does not manage: it runs each Pod
//! bound to its node from the container image the Pod names (chatgate's own images,
//! built by `make image`), executes the Pod's startup, readiness and liveness probes
//! against it, and writes
//! the Pod status a kubelet would (container states, `Ready`, restart counts,
//! termination messages). With it the readiness gate is proven end to end: the
//! Deployment the operator built gets a Ready pod only once the real service says
//! every critical service exists.
//!
//! How it plugs in:
//! 1. [`AgentNode::node`] is created in the cluster. It lacks kwok's annotation, so
//!    kwok leaves it alone, and carries a `NoSchedule` taint, so only Pods that
//!    tolerate it (the ones a test means for the agent) land there. The agent keeps
//!    the Node `Ready` and renews its Lease.
//! 2. The agent watches Pods with `spec.nodeName` equal to its node and runs the
//!    first container from its image ([`crate::image`]: the image's root
//!    filesystem in a mount namespace, as a [`crate::process::ManagedProcess`] so it
//!    dies with the test). The image reference resolves to a locally built image by
//!    version, revision or digest; any other is `ErrImagePull`, then
//!    `ImagePullBackOff`, as a kubelet reports it. The container gets the Pod's
//!    command and arguments, its environment (`env`, `envFrom`, Secret, ConfigMap
//!    and field references resolved through the API), its user
//!    (`securityContext.runAsUser`/`runAsGroup`, refused when `runAsNonRoot` meets
//!    root), a read-only root when `readOnlyRootFilesystem` says so, and its volumes
//!    (`emptyDir`, `configMap`, `secret`, and the projected service-account token
//!    from the TokenRequest API with the cluster CA and namespace at the standard
//!    path). `KUBERNETES_SERVICE_HOST`/`PORT` point at the loopback API server.
//!    The service image is told to listen on its Pod IP's loopback twin and its
//!    declared port (`CHATGATE_LISTEN`, see [`crate::pod_network`]), and its probes
//!    go there; any other image shares the host's network and listens on its
//!    declared container ports on 127.0.0.1, which must then be free.
//! 3. Probes follow the kubelet's rules (startup first; then readiness and
//!    liveness; thresholds and periods from the Pod). A container that exits, or
//!    fails its startup or liveness probe, is restarted with a back-off; its
//!    termination message (or its log's tail, under `FallbackToLogsOnError`) lands in
//!    `lastState.terminated`. A Pod being deleted gets SIGTERM after its `preStop`
//!    sleep, and is then removed, as a kubelet does.
//!
//! Where it differs from a kubelet, on purpose: the crash back-off starts at 1 s and
//! stops growing at 8 s (tests should not wait minutes), a Pod IP is reached at its
//! loopback twin rather than routed, and there is no network namespace per Pod
//! (see above). Nothing here dials a Pod or cluster IP.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, Pod, PodSpec, Probe, Secret, ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::control_plane::ControlPlane;
use crate::image::{Bundle, ContainerSpec, Image, Images, Mount, MountSource, unpack};
use crate::pod_network;
use crate::process::{ManagedProcess, free_loopback_ports, tail};

mod env;
mod pod;
mod probe;
mod volumes;

use env::{
    FieldContext, SERVICE_PORT, container_port, first_port, listens_where_told, resolve_env,
};
use pod::{Ending, PodRunner};
use probe::{ProbeState, Verdict};
use volumes::materialize_volume;

/// The taint that keeps ordinary Pods off an agent node.
pub const AGENT_NODE_TAINT_KEY: &str = "chatgate.dev/node-agent";
/// The label (`type: node-agent`) agent nodes carry, for node selectors.
pub const AGENT_NODE_LABEL: (&str, &str) = ("type", "node-agent");

/// How often the Node's heartbeat and Lease are renewed.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// The longest a Pod's `terminationGracePeriodSeconds` is honoured here.
const MAX_GRACE: Duration = Duration::from_secs(15);
/// First and largest crash back-off.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// What `FallbackToLogsOnError` takes from the log, as the kubelet does.
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

/// A node whose kubelet is a [`NodeAgent`] rather than kwok.
#[derive(Clone, Debug)]
pub struct AgentNode {
    pub name: String,
    /// Whether the node carries [`AGENT_NODE_TAINT_KEY`] (tests, next to kwok's
    /// nodes) or takes any Pod (the local platform, where it is the only node).
    pub tainted: bool,
}

impl AgentNode {
    /// The Node object to create for the agent: no kwok annotation and, when
    /// tainted, only tolerating Pods are scheduled to it.
    pub fn node(&self) -> Node {
        let taints = if self.tainted {
            json!([{ "key": AGENT_NODE_TAINT_KEY, "value": "true", "effect": "NoSchedule" }])
        } else {
            json!([])
        };
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    AGENT_NODE_LABEL.0: AGENT_NODE_LABEL.1,
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                },
            },
            "spec": { "taints": taints },
        }))
        .expect("a valid Node")
    }
}

/// What the agent knows about one Pod it runs, for tests to reach the service.
#[derive(Clone, Debug, Default)]
pub struct PodRecord {
    /// Where the current container listens, once started.
    pub address: Option<SocketAddr>,
    /// The current container's log file.
    pub log: Option<PathBuf>,
    /// Containers started so far (1 + restarts).
    pub starts: u32,
    /// Whether a readiness probe ever succeeded.
    pub ever_ready: bool,
}

type Records = Arc<Mutex<BTreeMap<(String, String), PodRecord>>>;

/// A running node agent. Dropping it stops every container it started.
///
/// It runs on a runtime of its own, so it outlives the test that started it: tests
/// of one binary run in parallel, each on its own runtime, and share one agent.
pub struct NodeAgent {
    node: AgentNode,
    records: Records,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        // Allowed inside an async context, unlike dropping the runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl NodeAgent {
    /// Registers tainted node `name` (only Pods that tolerate it land there) and
    /// starts serving the Pods bound to it from `images`.
    pub async fn start(cp: &ControlPlane, name: &str, images: Images) -> Result<NodeAgent> {
        Self::start_node(cp, name, true, images).await
    }

    /// Registers node `name` with no taint, so any Pod may land there: the local
    /// platform's node, where every Pod runs as a real process.
    pub async fn start_open(cp: &ControlPlane, name: &str, images: Images) -> Result<NodeAgent> {
        Self::start_node(cp, name, false, images).await
    }

    async fn start_node(
        cp: &ControlPlane,
        name: &str,
        tainted: bool,
        images: Images,
    ) -> Result<NodeAgent> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-agent-{name}"))
            .enable_all()
            .build()
            .context("starting the node agent's runtime")?;
        let node = AgentNode {
            name: name.to_owned(),
            tainted,
        };
        let workdir = cp.dir().join(format!("node-agent-{name}"));
        std::fs::create_dir_all(&workdir)
            .with_context(|| format!("creating {}", workdir.display()))?;
        let records = Records::default();
        let config = cp.admin_config();
        let api_port = cp
            .server_url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("no port in the API server URL {}", cp.server_url()))?;
        let registered = {
            let (node, records) = (node.clone(), records.clone());
            runtime.spawn(async move {
                // A client belongs to the runtime that made it: made here, it lives
                // as long as the agent.
                let client = Client::try_from(config).context("the agent's client")?;
                let nodes: Api<Node> = Api::all(client.clone());
                match nodes.create(&PostParams::default(), &node.node()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e).context(format!("creating agent node {}", node.name)),
                }
                heartbeat(&client, &node.name).await?;
                tokio::spawn(keep_alive(client.clone(), node.name.clone()));
                let kubelet = Kubelet {
                    client,
                    node: node.name.clone(),
                    images: Arc::new(images),
                    api_port,
                    workdir,
                    records,
                };
                tokio::spawn(kubelet.serve());
                anyhow::Ok(())
            })
        };
        let agent = NodeAgent {
            node,
            records,
            runtime: Some(runtime),
        };
        registered.await.context("the node agent's start")??;
        Ok(agent)
    }

    pub fn node(&self) -> &AgentNode {
        &self.node
    }

    /// What the agent knows of Pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every Pod the agent has run, by `(namespace, name)`.
    pub fn pods(&self) -> BTreeMap<(String, String), PodRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Renews the node's heartbeat and Lease until the agent stops.
async fn keep_alive(client: Client, name: String) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if let Err(e) = heartbeat(&client, &name).await {
            eprintln!("node agent {name}: heartbeat failed: {e:#}");
        }
    }
}

/// The current time at the seconds precision Kubernetes `Time` fields carry.
fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Marks the node Ready with room for Pods, and renews its Lease.
async fn heartbeat(client: &Client, name: &str) -> Result<()> {
    let now = now();
    let nodes: Api<Node> = Api::all(client.clone());
    let status = json!({
        "status": {
            "capacity": { "cpu": "16", "memory": "32Gi", "pods": "110" },
            "allocatable": { "cpu": "16", "memory": "32Gi", "pods": "110" },
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "NodeAgentReady",
                "message": "chatgate test node agent is serving",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "nodeInfo": {
                "kubeletVersion": format!("v{}", crate::K8S_VERSION),
                "containerRuntimeVersion": "chatgate-node-agent://0",
                "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
                "kernelVersion": "", "osImage": "", "machineID": "", "systemUUID": "",
                "bootID": "", "kubeProxyVersion": "",
            },
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(status))
        .await
        .with_context(|| format!("marking node {name} Ready"))?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": name },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": 40,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    leases
        .patch(
            name,
            &PatchParams::apply("chatgate-node-agent").force(),
            &Patch::Apply(lease),
        )
        .await
        .with_context(|| format!("renewing the Lease of node {name}"))?;
    Ok(())
}

/// The part of the agent that runs Pods.
#[derive(Clone)]
struct Kubelet {
    client: Client,
    node: String,
    images: Arc<Images>,
    /// The API server's loopback port, for `KUBERNETES_SERVICE_PORT`.
    api_port: u16,
    workdir: PathBuf,
    records: Records,
}

impl Kubelet {
    /// Watches this node's Pods, starting a runner for each new one and telling it
    /// when its Pod is being deleted.
    async fn serve(self) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut events = watcher(pods, config).default_backoff().boxed();
        let mut runners: BTreeMap<String, watch::Sender<bool>> = BTreeMap::new();
        while let Some(event) = events.next().await {
            let pod = match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(stop) = runners.remove(&pod.uid().unwrap_or_default()) {
                        let _ = stop.send(true);
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("node agent {}: pod watch: {e}", self.node);
                    continue;
                }
            };
            let uid = pod.uid().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                if let Some(stop) = runners.get(&uid) {
                    let _ = stop.send(true);
                }
                continue;
            }
            if runners.contains_key(&uid) || terminal(&pod) {
                continue;
            }
            let (stop_tx, stop_rx) = watch::channel(false);
            runners.insert(uid, stop_tx);
            let ip = pod_network::allocate();
            tokio::spawn(self.clone().run_pod(pod, ip, stop_rx));
        }
    }

    /// Runs one Pod's container until the Pod is deleted, restarting it as needed.
    async fn run_pod(self, pod: Pod, ip: Ipv4Addr, mut stop: watch::Receiver<bool>) {
        let mut runner = PodRunner::new(&self, pod, ip);
        let mut backoff = BACKOFF_START;
        loop {
            let ending = tokio::select! {
                ending = runner.run_container(&self) => ending,
                _ = deleted(&mut stop) => Ending::Deleted,
            };
            if let Ending::Deleted = ending {
                runner.stop_container().await;
                runner.finish_deletion().await;
                return;
            }
            runner.record_exit(ending, backoff).await;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = deleted(&mut stop) => {
                    runner.finish_deletion().await;
                    return;
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn record(&self, key: &(String, String), update: impl FnOnce(&mut PodRecord)) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        update(records.entry(key.clone()).or_default());
    }
}

/// Resolves once the runner is told its Pod is being deleted.
async fn deleted(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn terminal(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed")
}
