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

/// How a container run ended.
enum Ending {
    /// The process exited by itself.
    Exited {
        code: i32,
        started: Time,
        message: String,
    },
    /// A probe's failure threshold was reached; the process was killed.
    Killed {
        probe: &'static str,
        started: Time,
        message: String,
    },
    /// The environment could not be built (a missing Secret or key).
    ConfigError,
    /// The image could not be pulled (it is not one this node has).
    PullFailed,
    /// The Pod is being deleted.
    Deleted,
}

/// One Pod's container and its status as this agent reports it.
struct PodRunner {
    pods: Api<Pod>,
    key: (String, String),
    uid: String,
    pod_spec: PodSpec,
    spec_container: Container,
    grace: Duration,
    ip: Ipv4Addr,
    start_time: Time,
    restarts: i32,
    /// Failed pulls of the image so far.
    pull_attempts: u32,
    last_terminated: Option<Value>,
    process: Option<ManagedProcess>,
    /// `(status, lastTransitionTime)` of the Ready condition, to change the time
    /// only when the status changes.
    ready_since: (bool, Time),
}

impl PodRunner {
    fn new(kubelet: &Kubelet, pod: Pod, ip: Ipv4Addr) -> PodRunner {
        let namespace = pod.namespace().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let grace = Duration::from_secs(
            spec.termination_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 3600) as u64,
        )
        .min(MAX_GRACE);
        PodRunner {
            pods: Api::namespaced(kubelet.client.clone(), &namespace),
            key: (namespace, pod.name_any()),
            uid: pod.uid().unwrap_or_default(),
            spec_container: spec.containers.first().cloned().unwrap_or_default(),
            pod_spec: spec,
            grace,
            ip,
            start_time: now(),
            restarts: 0,
            pull_attempts: 0,
            last_terminated: None,
            process: None,
            ready_since: (false, now()),
        }
    }

    /// Starts the container, runs its probes, and returns when it ends.
    async fn run_container(&mut self, kubelet: &Kubelet) -> Ending {
        let reference = self.spec_container.image.clone().unwrap_or_default();
        let Some(image) = kubelet.images.resolve(&reference).cloned() else {
            // The first failed pull shows as ErrImagePull through its back-off;
            // later attempts as ImagePullBackOff, as the kubelet reports them.
            self.pull_attempts += 1;
            if self.pull_attempts > 1 {
                self.write_status(
                    json!({"waiting": {
                        "reason": "ImagePullBackOff",
                        "message": format!("Back-off pulling image \"{reference}\""),
                    }}),
                    false,
                    false,
                )
                .await;
                return Ending::PullFailed;
            }
            self.write_status(
                json!({"waiting": {
                    "reason": "ErrImagePull",
                    "message": format!(
                        "failed to pull and unpack image \"{reference}\": {reference}: not found (this node has {} and {})",
                        kubelet.images.service.reference(), kubelet.images.operator.reference()
                    ),
                }}),
                false,
                false,
            )
            .await;
            return Ending::PullFailed;
        };
        let dir = kubelet
            .workdir
            .join(format!("{}-{}-{}", self.key.0, self.key.1, self.restarts));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("node agent: creating {}: {e}", dir.display());
            return Ending::ConfigError;
        }
        let bundle = {
            let (image, tools, bundles) = (
                image.clone(),
                kubelet.images.tools.clone(),
                kubelet.workdir.join("bundles"),
            );
            match tokio::task::spawn_blocking(move || unpack(&image, &tools, &bundles)).await {
                Ok(Ok(bundle)) => bundle,
                Ok(Err(e)) => {
                    eprintln!("node agent: unpacking {reference}: {e:#}");
                    return Ending::ConfigError;
                }
                Err(e) => {
                    eprintln!("node agent: unpacking {reference}: {e}");
                    return Ending::ConfigError;
                }
            }
        };
        let termination_log = dir.join("termination-log");
        let log = dir.join("container.log");
        // The service listens on the Pod IP's loopback twin at its declared port;
        // any other image on the host's loopback at its declared ports.
        let told = listens_where_told(&image);
        let address = if told {
            let twin = pod_network::loopback(IpAddr::V4(self.ip)).unwrap_or(Ipv4Addr::LOCALHOST);
            SocketAddr::from((
                twin,
                first_port(&self.spec_container).unwrap_or(SERVICE_PORT),
            ))
        } else {
            let port = match first_port(&self.spec_container) {
                Some(port) => port,
                None => match free_loopback_ports(1) {
                    Ok(ports) => ports[0],
                    Err(e) => {
                        eprintln!("node agent: no free loopback port: {e:#}");
                        return Ending::ConfigError;
                    }
                },
            };
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        };
        let spec = match self
            .container_spec(kubelet, &bundle, &termination_log, told.then_some(address))
            .await
        {
            Ok(spec) => spec,
            Err(message) => {
                self.write_status(
                    json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}),
                    false,
                    false,
                )
                .await;
                return Ending::ConfigError;
            }
        };
        let started = now();
        match spec.spawn(&self.key.1, &bundle, &dir.join("container"), &log) {
            Ok(p) => self.process = Some(p),
            Err(e) => {
                eprintln!("node agent: {e:#}");
                return Ending::ConfigError;
            }
        }
        kubelet.record(&self.key, |r| {
            r.address = Some(address);
            r.log = Some(log.clone());
            r.starts += 1;
        });
        let running = json!({"running": {"startedAt": started}});
        self.write_status(running.clone(), false, false).await;

        let c = &self.spec_container;
        let probe = |p: &Option<Probe>| p.clone().map(|p| ProbeState::new(p, c, address, told));
        let mut startup = probe(&c.startup_probe);
        let mut readiness = probe(&c.readiness_probe);
        let mut liveness = probe(&c.liveness_probe);
        let mut is_started = startup.is_none();
        let mut is_ready = false;
        if is_started {
            self.write_status(running.clone(), true, readiness.is_none())
                .await;
            is_ready = readiness.is_none();
        }
        let begun = Instant::now();
        loop {
            if let Some(code) = self.process.as_mut().and_then(|p| p.exit_status()) {
                let code = code.code().unwrap_or(137);
                self.process = None;
                return Ending::Exited {
                    code,
                    started,
                    message: termination_message(
                        &self.spec_container,
                        &termination_log,
                        &log,
                        code,
                    ),
                };
            }
            let now = Instant::now();
            if !is_started {
                if let Some(probe) = startup.as_mut()
                    && probe.due(now, begun)
                {
                    match probe.run().await {
                        Verdict::Passed => {
                            is_started = true;
                            // Readiness is probed at once, not a period later.
                            if let Some(r) = readiness.as_mut() {
                                r.next = None;
                            }
                            self.write_status(running.clone(), true, false).await;
                        }
                        Verdict::Failing => {}
                        Verdict::Failed(why) => {
                            return self.kill("startup", started, why, &termination_log).await;
                        }
                    }
                }
            } else {
                if let Some(probe) = readiness.as_mut()
                    && probe.due(now, begun)
                {
                    let ready = match probe.run().await {
                        Verdict::Passed => true,
                        Verdict::Failing => is_ready,
                        Verdict::Failed(_) => false,
                    };
                    if ready {
                        kubelet.record(&self.key, |r| r.ever_ready = true);
                    }
                    if ready != is_ready {
                        is_ready = ready;
                        self.write_status(running.clone(), true, ready).await;
                    }
                }
                if let Some(probe) = liveness.as_mut()
                    && probe.due(now, begun)
                    && let Verdict::Failed(why) = probe.run().await
                {
                    return self.kill("liveness", started, why, &termination_log).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The container as the Pod specifies it, on the image unpacked in `bundle`:
    /// command and arguments, environment (with `CHATGATE_LISTEN` when `listen` is
    /// given), user, root filesystem mode and volumes. An error is what the kubelet
    /// would report as `CreateContainerConfigError`.
    async fn container_spec(
        &self,
        kubelet: &Kubelet,
        bundle: &Bundle,
        termination_log: &Path,
        listen: Option<SocketAddr>,
    ) -> Result<ContainerSpec, String> {
        let container = &self.spec_container;
        let mut spec = ContainerSpec::from_image(bundle);
        // `command` replaces the entrypoint and drops the image's `cmd`; `args`
        // replaces `cmd` (the image config's split is in the bundle's args: the
        // entrypoint is the first element, as chatgate's images have no `cmd`).
        match (&container.command, &container.args) {
            (Some(command), args) => {
                spec.args = command
                    .iter()
                    .chain(args.iter().flatten())
                    .cloned()
                    .collect();
            }
            (None, Some(args)) => {
                spec.args.truncate(1);
                spec.args.extend(args.iter().cloned());
            }
            (None, None) => {}
        }
        let context = FieldContext {
            namespace: &self.key.0,
            name: &self.key.1,
            uid: &self.uid,
            node: &kubelet.node,
            service_account: self
                .pod_spec
                .service_account_name
                .as_deref()
                .unwrap_or("default"),
        };
        spec.env
            .extend(resolve_env(&kubelet.client, &context, container).await?);
        // What every kubelet adds: where the API server is.
        spec.env
            .insert("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into());
        spec.env.insert(
            "KUBERNETES_SERVICE_PORT".into(),
            kubelet.api_port.to_string(),
        );
        if let Some(listen) = listen {
            spec.env
                .insert("CHATGATE_LISTEN".into(), listen.to_string());
        }
        let pod_security = self.pod_spec.security_context.as_ref();
        let security = container.security_context.as_ref();
        if let Some(uid) = security
            .and_then(|s| s.run_as_user)
            .or(pod_security.and_then(|s| s.run_as_user))
        {
            spec.uid =
                u32::try_from(uid).map_err(|_| format!("runAsUser {uid} is out of range"))?;
        }
        if let Some(gid) = security
            .and_then(|s| s.run_as_group)
            .or(pod_security.and_then(|s| s.run_as_group))
        {
            spec.gid =
                u32::try_from(gid).map_err(|_| format!("runAsGroup {gid} is out of range"))?;
        }
        let non_root = security
            .and_then(|s| s.run_as_non_root)
            .or(pod_security.and_then(|s| s.run_as_non_root))
            .unwrap_or(false);
        if non_root && spec.uid == 0 {
            return Err("container has runAsNonRoot and image will run as root".into());
        }
        spec.read_only_root = security
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false);
        // The image's own /tmp is what a runtime gives; volumes replace it where
        // the Pod mounts one.
        spec.mounts.clear();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = self
                .pod_spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| format!("volume {:?} is mounted but not defined", mount.name))?;
            let host = materialize_volume(
                &kubelet.client,
                &context,
                volume,
                // A Pod's volumes outlive its container's restarts.
                &kubelet
                    .workdir
                    .join(format!("{}-{}-volumes", self.key.0, self.key.1)),
                spec.uid,
            )
            .await?;
            spec.mounts.push(Mount {
                target: mount.mount_path.clone(),
                source: MountSource::Bind {
                    host,
                    read_only: mount.read_only.unwrap_or(false) || volume.empty_dir.is_none(),
                },
            });
        }
        std::fs::write(termination_log, "")
            .map_err(|e| format!("creating the termination log: {e}"))?;
        std::os::unix::fs::chown(termination_log, Some(spec.uid), Some(spec.gid))
            .map_err(|e| format!("handing the termination log to the container's user: {e}"))?;
        spec.mounts.push(Mount {
            target: container
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
            source: MountSource::Bind {
                host: termination_log.to_owned(),
                read_only: false,
            },
        });
        Ok(spec)
    }

    /// Kills the container after a failed probe.
    async fn kill(
        &mut self,
        probe: &'static str,
        started: Time,
        why: String,
        termination_log: &Path,
    ) -> Ending {
        self.stop_container().await;
        let written = std::fs::read_to_string(termination_log).unwrap_or_default();
        Ending::Killed {
            probe,
            started,
            message: if written.is_empty() { why } else { written },
        }
    }

    /// SIGTERM (after the `preStop` sleep), then SIGKILL once the grace period is over.
    async fn stop_container(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        let pre_stop = self
            .spec_container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map(|s| Duration::from_secs(s.seconds.clamp(0, 3600) as u64))
            .unwrap_or_default()
            .min(self.grace);
        tokio::time::sleep(pre_stop).await;
        let grace = self.grace.saturating_sub(pre_stop);
        let _ = tokio::task::spawn_blocking(move || process.stop(grace)).await;
    }

    /// Writes the ended container into `lastState` and waits in `CrashLoopBackOff`.
    async fn record_exit(&mut self, ending: Ending, backoff: Duration) {
        let finished = now();
        let terminated = match ending {
            Ending::Exited {
                code,
                started,
                message,
            } => json!({
                "exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "message": message, "startedAt": started, "finishedAt": finished,
            }),
            Ending::Killed {
                probe,
                started,
                message,
            } => json!({
                "exitCode": 137, "reason": format!("{probe} probe failed"),
                "message": message, "startedAt": started, "finishedAt": finished,
            }),
            // Already reported as CreateContainerConfigError; retried after the back-off.
            Ending::ConfigError | Ending::PullFailed | Ending::Deleted => return,
        };
        self.restarts += 1;
        self.last_terminated = Some(terminated);
        let waiting = json!({"waiting": {
            "reason": "CrashLoopBackOff",
            "message": format!(
                "back-off {}s restarting failed container={} pod={}_{}",
                backoff.as_secs(), self.spec_container.name, self.key.1, self.key.0
            ),
        }});
        self.write_status(waiting, false, false).await;
    }

    /// Removes the Pod once its container stopped, as the kubelet does.
    async fn finish_deletion(&self) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let _ = self.pods.delete(&self.key.1, &params).await;
    }

    /// Writes Pod status: phase, IPs, the container's state, and the conditions.
    async fn write_status(&mut self, state: Value, started: bool, ready: bool) {
        if self.ready_since.0 != ready {
            self.ready_since = (ready, now());
        }
        let since = &self.ready_since.1;
        let flag = |b: bool| if b { "True" } else { "False" };
        let not_ready_reason = (!ready).then_some("ContainersNotReady");
        let mut container = json!({
            "name": self.spec_container.name,
            "image": self.spec_container.image,
            "imageID": "",
            "containerID": format!("chatgate-node-agent://{}-{}", self.uid, self.restarts),
            "ready": ready,
            "started": started,
            "restartCount": self.restarts,
            "state": state,
        });
        if let Some(last) = &self.last_terminated {
            container["lastState"] = json!({ "terminated": last });
        }
        let condition = |type_: &str| {
            json!({
                "type": type_, "status": flag(ready), "reason": not_ready_reason,
                "lastTransitionTime": since,
            })
        };
        let status = json!({
            "status": {
                "phase": "Running",
                "hostIP": "10.250.255.1",
                "hostIPs": [{ "ip": "10.250.255.1" }],
                "podIP": self.ip,
                "podIPs": [{ "ip": self.ip }],
                "startTime": self.start_time,
                "conditions": [
                    { "type": "Initialized", "status": "True", "lastTransitionTime": self.start_time },
                    { "type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": self.start_time },
                    condition("ContainersReady"),
                    condition("Ready"),
                ],
                "containerStatuses": [container],
            }
        });
        if let Err(e) = self
            .pods
            .patch_status(
                &self.key.1,
                &PatchParams::default(),
                &Patch::Strategic(status),
            )
            .await
        {
            // A Pod deleted meanwhile is the usual cause; the watch stops the runner.
            eprintln!(
                "node agent: status of pod {}/{}: {e}",
                self.key.0, self.key.1
            );
        }
    }
}

/// The container's termination message: the file, or under `FallbackToLogsOnError`
/// after a failure with an empty file, the log's tail.
fn termination_message(container: &Container, file: &Path, log: &Path, code: i32) -> String {
    let written = std::fs::read_to_string(file).unwrap_or_default();
    let fallback = container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    if written.is_empty() && fallback && code != 0 {
        let text = tail(log, FALLBACK_LOG_LINES);
        let start = text.len().saturating_sub(FALLBACK_LOG_BYTES);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        return text[start..].to_owned();
    }
    written
}

/// The container's environment, as the kubelet builds it: `envFrom` first, then
/// `env`. A missing ConfigMap, Secret or key is an error naming it.
async fn resolve_env(
    client: &Client,
    pod: &FieldContext<'_>,
    container: &Container,
) -> Result<BTreeMap<String, String>, String> {
    let namespace = pod.namespace;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let config_map = |name: String| {
        let api = config_maps.clone();
        async move {
            match api.get_opt(&name).await {
                Ok(Some(cm)) => Ok(cm.data.unwrap_or_default()),
                Ok(None) => Err(format!("configmap \"{name}\" not found")),
                Err(e) => Err(format!("reading configmap \"{name}\": {e}")),
            }
        }
    };
    let secret = |name: String| {
        let api = secrets.clone();
        async move {
            match api.get_opt(&name).await {
                Ok(Some(s)) => Ok(s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect::<BTreeMap<_, _>>()),
                Ok(None) => Err(format!("secret \"{name}\" not found")),
                Err(e) => Err(format!("reading secret \"{name}\": {e}")),
            }
        }
    };
    let mut env = BTreeMap::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let values = if let Some(r) = &source.config_map_ref {
            match config_map(r.name.clone()).await {
                Ok(v) => v,
                Err(_) if r.optional == Some(true) => continue,
                Err(e) => return Err(e),
            }
        } else if let Some(r) = &source.secret_ref {
            match secret(r.name.clone()).await {
                Ok(v) => v,
                Err(_) if r.optional == Some(true) => continue,
                Err(e) => return Err(e),
            }
        } else {
            continue;
        };
        env.extend(values.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) if from.field_ref.is_some() => {
                let path = from
                    .field_ref
                    .as_ref()
                    .map(|f| f.field_path.as_str())
                    .unwrap_or_default();
                pod.field(path)
                    .ok_or_else(|| format!("unsupported fieldPath {path:?} in env {}", var.name))?
            }
            (None, Some(from)) => {
                let (values, name, key, optional, kind) = if let Some(r) = &from.secret_key_ref {
                    (
                        secret(r.name.clone()).await,
                        &r.name,
                        &r.key,
                        r.optional,
                        "secret",
                    )
                } else if let Some(r) = &from.config_map_key_ref {
                    (
                        config_map(r.name.clone()).await,
                        &r.name,
                        &r.key,
                        r.optional,
                        "configmap",
                    )
                } else {
                    continue;
                };
                match values.map(|mut v| v.remove(key)) {
                    Ok(Some(v)) => v,
                    _ if optional == Some(true) => continue,
                    Ok(None) => {
                        return Err(format!(
                            "couldn't find key {key} in {kind} {namespace}/{name}"
                        ));
                    }
                    Err(e) => return Err(e),
                }
            }
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// What a `fieldRef` or downward-API item can name about the Pod.
struct FieldContext<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
    node: &'a str,
    service_account: &'a str,
}

impl FieldContext<'_> {
    fn field(&self, path: &str) -> Option<String> {
        Some(
            match path {
                "metadata.name" => self.name,
                "metadata.namespace" => self.namespace,
                "metadata.uid" => self.uid,
                "spec.nodeName" => self.node,
                "spec.serviceAccountName" => self.service_account,
                _ => return None,
            }
            .to_owned(),
        )
    }
}

/// The port the service image declares (`EXPOSE 8080/tcp`), for a container that
/// names none.
const SERVICE_PORT: u16 = 8080;

/// Whether the image takes its listen address from `CHATGATE_LISTEN` (the
/// service), so the agent can give each of its containers an address of its own.
fn listens_where_told(image: &Image) -> bool {
    image.name == "chatgate-service"
}

/// The container's first declared port.
fn first_port(container: &Container) -> Option<u16> {
    container
        .ports
        .iter()
        .flatten()
        .next()
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// A probe's port, by number or by the name of a container port.
fn container_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Writes a volume's content into a directory of its own under `dir` and returns
/// it: an empty directory for `emptyDir` (mode 0777, as the kubelet makes it);
/// the items of a `configMap` or `secret`; for `projected`, a service-account
/// token from the TokenRequest API bound to the Pod, ConfigMap items (the cluster
/// CA from `kube-root-ca.crt`) and downward-API fields.
async fn materialize_volume(
    client: &Client,
    pod: &FieldContext<'_>,
    volume: &Volume,
    dir: &Path,
    uid: u32,
) -> Result<PathBuf, String> {
    let host = dir.join(&volume.name);
    let io = |e: std::io::Error| format!("volume {:?}: {e}", volume.name);
    std::fs::create_dir_all(&host).map_err(io)?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), pod.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), pod.namespace);
    let config_map_files =
        async |name: &str, optional: Option<bool>| -> Result<BTreeMap<String, Vec<u8>>, String> {
            match config_maps.get_opt(name).await {
                Ok(Some(cm)) => Ok(cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect()),
                Ok(None) if optional == Some(true) => Ok(BTreeMap::new()),
                Ok(None) => Err(format!("configmap \"{name}\" not found")),
                Err(e) => Err(format!("reading configmap \"{name}\": {e}")),
            }
        };
    let secret_files =
        async |name: &str, optional: Option<bool>| -> Result<BTreeMap<String, Vec<u8>>, String> {
            match secrets.get_opt(name).await {
                Ok(Some(s)) => Ok(s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()),
                Ok(None) if optional == Some(true) => Ok(BTreeMap::new()),
                Ok(None) => Err(format!("secret \"{name}\" not found")),
                Err(e) => Err(format!("reading secret \"{name}\": {e}")),
            }
        };
    if volume.empty_dir.is_some() {
        std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .map_err(io)?;
        return Ok(host);
    } else if let Some(source) = &volume.config_map {
        files = config_map_files(&source.name, source.optional).await?;
    } else if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        files = secret_files(&name, source.optional).await?;
    } else if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: token.audience.clone().into_iter().collect(),
                        expiration_seconds: token.expiration_seconds,
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some(pod.name.to_owned()),
                            uid: Some(pod.uid.to_owned()),
                        }),
                    },
                    ..TokenRequest::default()
                };
                let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), pod.namespace);
                let issued = accounts
                    .create_token_request(pod.service_account, &PostParams::default(), &request)
                    .await
                    .map_err(|e| {
                        format!(
                            "requesting a token for serviceaccount {}/{}: {e}",
                            pod.namespace, pod.service_account
                        )
                    })?;
                let token_value = issued.status.map(|s| s.token).unwrap_or_default();
                files.insert(token.path.clone(), token_value.into_bytes());
            }
            if let Some(cm) = &source.config_map {
                let mut all = config_map_files(&cm.name, cm.optional).await?;
                match &cm.items {
                    Some(items) => {
                        for item in items {
                            if let Some(v) = all.remove(&item.key) {
                                files.insert(item.path.clone(), v);
                            }
                        }
                    }
                    None => files.extend(all),
                }
            }
            if let Some(secret) = &source.secret {
                files.extend(secret_files(&secret.name, secret.optional).await?);
            }
            if let Some(downward) = &source.downward_api {
                for item in downward.items.iter().flatten() {
                    let path = item
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.as_str())
                        .unwrap_or_default();
                    let value = pod
                        .field(path)
                        .ok_or_else(|| format!("unsupported downward API fieldPath {path:?}"))?;
                    files.insert(item.path.clone(), value.into_bytes());
                }
            }
        }
    } else {
        return Err(format!(
            "volume {:?}: only emptyDir, configMap, secret and projected volumes are supported here",
            volume.name
        ));
    }
    for (path, content) in files {
        if path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(format!(
                "volume {:?}: item path {path:?} must be relative",
                volume.name
            ));
        }
        let file = host.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&file, content).map_err(io)?;
        // Readable by the container's user, as the kubelet's 0644 default is.
        std::os::unix::fs::chown(&file, Some(uid), None).map_err(io)?;
    }
    Ok(host)
}

/// One probe's schedule and consecutive results.
struct ProbeState {
    probe: Probe,
    /// The loopback address the probe's `httpGet` goes to.
    address: SocketAddr,
    next: Option<Instant>,
    failures: i32,
}

enum Verdict {
    Passed,
    /// Failed, but below the failure threshold.
    Failing,
    /// The failure threshold is reached; why.
    Failed(String),
}

impl ProbeState {
    /// A probe of `container`, which listens at `address`; when it was `told`
    /// where to listen, every port of it maps to that address.
    fn new(probe: Probe, container: &Container, address: SocketAddr, told: bool) -> ProbeState {
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
    fn due(&mut self, now: Instant, started: Instant) -> bool {
        let first = started
            + Duration::from_secs(self.probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let due = now >= self.next.unwrap_or(first).max(first);
        if due {
            self.next = Some(now + self.period());
        }
        due
    }

    async fn run(&mut self) -> Verdict {
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
