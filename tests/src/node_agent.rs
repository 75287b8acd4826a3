//! A test-side kubelet for one node that kwok does not manage: it runs the real
//! `chatgate-service` binary for each Pod bound to its node, on a loopback port,
//! executes the Pod's startup, readiness and liveness probes against it, and writes
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
//! 2. The agent watches Pods with `spec.nodeName` equal to its node and starts the
//!    first container as a local process ([`crate::process::ManagedProcess`], so it
//!    dies with the test). The image is not pulled: every container runs the
//!    service binary, with the Pod's environment (`env`, `envFrom`, Secret and
//!    ConfigMap references resolved through the API) and `CHATGATE_LISTEN` and
//!    `CHATGATE_TERMINATION_LOG` pointed at a free loopback port and a local file.
//! 3. Probes follow the kubelet's rules (startup first; then readiness and
//!    liveness; thresholds and periods from the Pod). A container that exits, or
//!    fails its startup or liveness probe, is restarted with a back-off; its
//!    termination message (or its log's tail, under `FallbackToLogsOnError`) lands in
//!    `lastState.terminated`. A Pod being deleted gets SIGTERM after its `preStop`
//!    sleep, and is then removed, as a kubelet does.
//!
//! Where it differs from a kubelet, on purpose: the crash back-off starts at 1 s and
//! stops growing at 8 s (tests should not wait minutes), and Pod IPs are made-up
//! addresses written to the status only. Nothing here dials a Pod or cluster IP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Probe, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::control_plane::ControlPlane;
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
}

impl AgentNode {
    /// The Node object to create for the agent: no kwok annotation, tainted so
    /// only tolerating Pods are scheduled to it.
    pub fn node(&self) -> Node {
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
            "spec": {
                "taints": [{ "key": AGENT_NODE_TAINT_KEY, "value": "true", "effect": "NoSchedule" }],
            },
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
    /// Registers node `name` and starts serving the Pods bound to it with `binary`.
    pub async fn start(cp: &ControlPlane, name: &str, binary: PathBuf) -> Result<NodeAgent> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-agent-{name}"))
            .enable_all()
            .build()
            .context("starting the node agent's runtime")?;
        let node = AgentNode {
            name: name.to_owned(),
        };
        let workdir = cp.dir().join(format!("node-agent-{name}"));
        std::fs::create_dir_all(&workdir)
            .with_context(|| format!("creating {}", workdir.display()))?;
        let records = Records::default();
        let config = cp.admin_config();
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
                    binary,
                    workdir,
                    records,
                    next_ip: Arc::new(AtomicU32::new(0)),
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

/// The `chatgate-service` binary next to this test binary. `cargo test --workspace`
/// has built it already; it is (re)built here only when missing or older than the
/// service's sources, as when this test binary is run on its own after an edit. (A
/// build here resolves features for the service alone, unlike the workspace test
/// build, so doing it unconditionally would recompile much of the dependency graph.)
pub fn service_binary() -> Result<PathBuf> {
    // target/debug/deps/<test> → target/debug/chatgate-service
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no target directory above {}", exe.display()))?;
    let binary = dir.join("chatgate-service");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    let sources = [
        "service/src",
        "service/migrations",
        "service/Cargo.toml",
        "contract/src",
        "contract/Cargo.toml",
        "Cargo.lock",
    ];
    let newest = sources
        .iter()
        .filter_map(|s| newest_change(&workspace.join(s)))
        .max();
    if built.is_some() && newest <= built {
        return Ok(binary);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "chatgate-service", "--bin"])
        .arg("chatgate-service")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .status()
        .with_context(|| format!("running {cargo} build -p chatgate-service"))?;
    if !status.success() {
        bail!("cargo build -p chatgate-service failed ({status})");
    }
    if !binary.exists() {
        bail!("{} does not exist after building it", binary.display());
    }
    Ok(binary)
}

/// The latest modification time of `path` or anything under it.
fn newest_change(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| newest_change(&entry.path()))
        .chain(own)
        .max()
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
    binary: PathBuf,
    workdir: PathBuf,
    records: Records,
    next_ip: Arc<AtomicU32>,
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
            let n = self.next_ip.fetch_add(1, Ordering::Relaxed);
            let ip = format!("10.250.{}.{}", n / 250, n % 250 + 2);
            tokio::spawn(self.clone().run_pod(pod, ip, stop_rx));
        }
    }

    /// Runs one Pod's container until the Pod is deleted, restarting it as needed.
    async fn run_pod(self, pod: Pod, ip: String, mut stop: watch::Receiver<bool>) {
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
    /// The Pod is being deleted.
    Deleted,
}

/// One Pod's container and its status as this agent reports it.
struct PodRunner {
    pods: Api<Pod>,
    key: (String, String),
    uid: String,
    spec_container: Container,
    grace: Duration,
    ip: String,
    start_time: Time,
    restarts: i32,
    last_terminated: Option<Value>,
    process: Option<ManagedProcess>,
    /// `(status, lastTransitionTime)` of the Ready condition, to change the time
    /// only when the status changes.
    ready_since: (bool, Time),
}

impl PodRunner {
    fn new(kubelet: &Kubelet, pod: Pod, ip: String) -> PodRunner {
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
            spec_container: spec.containers.into_iter().next().unwrap_or_default(),
            grace,
            ip,
            start_time: now(),
            restarts: 0,
            last_terminated: None,
            process: None,
            ready_since: (false, now()),
        }
    }

    /// Starts the container, runs its probes, and returns when it ends.
    async fn run_container(&mut self, kubelet: &Kubelet) -> Ending {
        let env = match resolve_env(&kubelet.client, &self.key.0, &self.spec_container).await {
            Ok(env) => env,
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
        let port = match free_loopback_ports(1) {
            Ok(ports) => ports[0],
            Err(e) => {
                eprintln!("node agent: no free loopback port: {e:#}");
                return Ending::ConfigError;
            }
        };
        let dir = kubelet
            .workdir
            .join(format!("{}-{}-{}", self.key.0, self.key.1, self.restarts));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("node agent: creating {}: {e}", dir.display());
            return Ending::ConfigError;
        }
        let termination_log = dir.join("termination-log");
        let log = dir.join("container.log");
        let mut command = Command::new(&kubelet.binary);
        command.env_clear().envs(env).envs([
            ("CHATGATE_LISTEN", format!("127.0.0.1:{port}")),
            (
                "CHATGATE_TERMINATION_LOG",
                termination_log.display().to_string(),
            ),
        ]);
        let started = now();
        match ManagedProcess::spawn(&self.key.1, command, &log) {
            Ok(p) => self.process = Some(p),
            Err(e) => {
                eprintln!("node agent: {e:#}");
                return Ending::ConfigError;
            }
        }
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        kubelet.record(&self.key, |r| {
            r.address = Some(address);
            r.log = Some(log.clone());
            r.starts += 1;
        });
        let running = json!({"running": {"startedAt": started}});
        self.write_status(running.clone(), false, false).await;

        let c = &self.spec_container;
        let mut startup = c.startup_probe.clone().map(ProbeState::new);
        let mut readiness = c.readiness_probe.clone().map(ProbeState::new);
        let mut liveness = c.liveness_probe.clone().map(ProbeState::new);
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
                    match probe.run(port).await {
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
                    let ready = match probe.run(port).await {
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
                    && let Verdict::Failed(why) = probe.run(port).await
                {
                    return self.kill("liveness", started, why, &termination_log).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
            Ending::ConfigError | Ending::Deleted => return,
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
    namespace: &str,
    container: &Container,
) -> Result<BTreeMap<String, String>, String> {
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

/// One probe's schedule and consecutive results.
struct ProbeState {
    probe: Probe,
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
    fn new(probe: Probe) -> ProbeState {
        ProbeState {
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

    async fn run(&mut self, port: u16) -> Verdict {
        let Some(get) = &self.probe.http_get else {
            return Verdict::Passed; // only HTTP probes are run; others pass
        };
        let path = get.path.clone().unwrap_or_else(|| "/".into());
        let timeout = Duration::from_secs(self.probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        // Every container port (`get.port`, by name or number) is served on the one
        // loopback port the service listens on.
        let result = tokio::time::timeout(timeout, http_status(port, &path)).await;
        let outcome = match result {
            Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
            Ok(Ok(code)) => Err(format!("HTTP probe failed with statuscode: {code}")),
            Ok(Err(e)) => Err(format!("Get \"http://127.0.0.1:{port}{path}\": {e}")),
            Err(_) => Err(format!(
                "Get \"http://127.0.0.1:{port}{path}\": timeout after {timeout:?}"
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

/// `GET path` on `127.0.0.1:port`; the response's status code.
async fn http_status(port: u16, path: &str) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: kube-probe/chatgate-node-agent\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {line:?}")))
}
