//! What the operator tests share: installing the CRD and the chart's RBAC, running
//! the operator in-process on the test's runtime (scoped to the test's namespace),
//! small readers of the ChatService status, and a log of when each ChatService's
//! status followed its Deployment's.

#![allow(dead_code)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chatgate_operator::conditions;
use chatgate_operator::controller::system_clock;
use chatgate_operator::crd::ChatService;
use chatgate_operator::run::{Health, Options, run};
use chatgate_tests::{ControlPlane, TestNamespace, wait_for, wait_until};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod status_log;

/// Long enough for a rollout on two busy cores, short enough to fail usefully.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The service account the chart's RBAC binds (release name = namespace name).
pub const OPERATOR_SA: &str = "chatgate-operator";

/// Installs (or updates) the generated CRD and waits until it is served.
pub async fn install_crd(cp: &ControlPlane) -> Result<()> {
    let client = cp.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = ChatService::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("chatgate-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("applying the ChatService CRD")?;
    wait_for(&crds, &name, TIMEOUT, |c: &CustomResourceDefinition| {
        c.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    })
    .await?;
    // Established can precede the first served list by a moment.
    let api: Api<ChatService> = Api::all(client);
    wait_until(TIMEOUT, "ChatServices to be served", || {
        let api = api.clone();
        async move { Ok(api.list(&Default::default()).await.ok().map(|_| ())) }
    })
    .await?;
    Ok(())
}

/// Installs the chart's RBAC (ServiceAccount, ClusterRole and bindings, leader Role)
/// into `ns` with `helm template | kubectl apply`, release named after the namespace
/// so cluster-scoped names never collide between tests.
pub fn install_chart_rbac(cp: &ControlPlane, ns: &str) -> Result<String> {
    install_chart_rbac_with(cp, ns, &[])
}

/// As [`install_chart_rbac`], with more `--set-string` values (e.g. `watchNamespace=a\,b`).
pub fn install_chart_rbac_with(cp: &ControlPlane, ns: &str, values: &[&str]) -> Result<String> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/chatgate-operator");
    let rendered = cp
        .helm()
        .args([
            "template",
            ns,
            chart,
            "--namespace",
            ns,
            "--set",
            &format!("serviceAccount.name={OPERATOR_SA}"),
        ])
        .args(values.iter().flat_map(|v| ["--set-string", v]))
        .args([
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ])
        .output()
        .context("running helm template")?;
    if !rendered.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
    }
    let mut apply = cp
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl apply")?;
    use std::io::Write;
    apply
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(&rendered.stdout)?;
    let out = apply.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply of the chart's RBAC failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&rendered.stdout).into_owned())
}

/// An operator running in-process on the test's runtime.
pub struct Operator {
    pub health: Arc<Health>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Operator {
    /// Starts an operator watching only `ns`, with leader election on a Lease in `ns`
    /// and short lease timings, as `client`'s user.
    pub fn start(client: Client, ns: &str, identity: &str) -> Operator {
        Self::start_with(client, options(ns, identity))
    }

    pub fn start_with(client: Client, options: Options) -> Operator {
        let health = Arc::new(Health::default());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            client,
            options,
            health.clone(),
            system_clock(),
            async move {
                let _ = rx.await;
            },
        ));
        Operator {
            health,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops it as SIGTERM would: the lease is released.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }

    /// Kills it as a crash would: every task is dropped, the lease is not released.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// True while its task runs: it has neither ended nor been stopped or killed.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until it leads and its watches have synced; on timeout the error says
    /// what the operator last reported, or how it ended.
    pub async fn wait_leading(&mut self, timeout: Duration) -> Result<()> {
        let health = self.health.clone();
        let waited = wait_until(
            timeout,
            "the operator to lead with synced watches",
            move || {
                let health = health.clone();
                async move { Ok((health.is_leader() && health.is_ready().0).then_some(())) }
            },
        )
        .await;
        if let Err(e) = waited {
            let (_, why) = self.health.is_ready();
            let ended = match self.task.take_if(|t| t.is_finished()) {
                Some(task) => format!("the operator ended: {:?}", task.await),
                None => "the operator is still running".to_owned(),
            };
            let pending = self.health.pending_watch();
            bail!("{e}; readiness: {why}; waiting for the {pending} watch; {ended}");
        }
        Ok(())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What most operator tests start from: the CRD installed, a fresh namespace, and one
/// operator leading in it with its watches synced.
pub struct Setup {
    pub cp: &'static ControlPlane,
    pub ns: TestNamespace,
    pub admin: Client,
    pub op: Operator,
}

pub async fn operator_in_new_namespace(prefix: &str) -> Result<Setup> {
    operator_in_new_namespace_serving(prefix, "").await
}

/// As [`operator_in_new_namespace`], with the operator serving `/metrics` (and its
/// health endpoints) on `http` (`127.0.0.1:PORT`; empty serves none).
pub async fn operator_in_new_namespace_serving(prefix: &str, http: &str) -> Result<Setup> {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ns = TestNamespace::new(cp, prefix).await?;
    let admin = cp.client();
    let mut op = Operator::start_with(
        admin.clone(),
        Options {
            http: http.to_owned(),
            ..options(ns.name(), "only")
        },
    );
    op.wait_leading(TIMEOUT).await?;
    Ok(Setup { cp, ns, admin, op })
}

/// Options for a test operator in `ns`.
pub fn options(ns: &str, identity: &str) -> Options {
    Options {
        namespace: Some(ns.to_owned()),
        http: String::new(),
        resync_seconds: 300,
        leader_election: true,
        lease_namespace: Some(ns.to_owned()),
        lease_duration_seconds: 8,
        lease_grace_seconds: 3,
        identity: Some(identity.to_owned()),
        concurrency: 4,
    }
}

/// A namespace enforcing the `restricted` Pod Security profile, so every pod the
/// operator renders is admitted by the real PodSecurity admission or the test fails.
pub async fn restricted_namespace(cp: &ControlPlane, prefix: &str) -> Result<TestNamespace> {
    TestNamespace::with_labels(
        cp,
        prefix,
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await
}

pub async fn create_secret(
    client: &Client,
    ns: &str,
    name: &str,
    keys: &[(&str, &str)],
) -> Result<Secret> {
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": keys.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned()))).collect::<serde_json::Map<_, _>>(),
    }))?;
    Ok(Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?)
}

pub async fn create(client: &Client, ns: &str, cs: &ChatService) -> Result<ChatService> {
    let mut cs = cs.clone();
    cs.metadata.namespace = Some(ns.to_owned());
    Ok(Api::<ChatService>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cs)
        .await?)
}

/// The condition `type_` of `cs`, if present.
pub fn condition<'a>(
    cs: &'a ChatService,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    cs.status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, type_))
}

/// `type_` is True for the ChatService's current generation.
pub fn condition_true_now(cs: &ChatService, type_: &str) -> bool {
    let generation = cs.metadata.generation;
    cs.status
        .as_ref()
        .is_some_and(|s| s.observed_generation == generation)
        && condition(cs, type_)
            .is_some_and(|c| c.status == "True" && c.observed_generation == generation)
}

/// Ready=True for the current generation.
pub fn ready_now(cs: &ChatService) -> bool {
    condition_true_now(cs, conditions::READY)
}

/// Waits until ChatService `name` is Stalled with `reason` for its current
/// generation; the object and the Stalled condition's message.
pub async fn wait_stalled(
    api: &Api<ChatService>,
    name: &str,
    reason: &'static str,
) -> Result<(ChatService, String)> {
    let stalled = wait_for(api, name, TIMEOUT, stalled_now(reason)).await?;
    let message = condition(&stalled, conditions::STALLED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    Ok((stalled, message))
}

/// Stalled=True with `reason` for the current generation.
pub fn stalled_now(reason: &'static str) -> impl Fn(&ChatService) -> bool + Send + 'static {
    move |cs: &ChatService| {
        condition_true_now(cs, conditions::STALLED)
            && condition(cs, conditions::STALLED).is_some_and(|c| c.reason == reason)
    }
}

/// A ready pod of ChatService `name`, from `pods` (the ChatService's namespace).
pub async fn a_ready_pod(pods: &Api<Pod>, name: &str) -> Result<Pod> {
    let selector = format!("{}={name}", chatgate_operator::meta::LABEL_INSTANCE);
    Ok(wait_until(TIMEOUT, &format!("a ready pod of {name}"), || {
        let pods = pods.clone();
        let selector = selector.clone();
        async move {
            let list = pods.list(&ListParams::default().labels(&selector)).await?;
            Ok(list.items.into_iter().find(chatgate_tests::wait::pod_ready))
        }
    })
    .await?)
}

/// Writes, through the status subresource, what the kubelet writes after the service
/// container exited with `message` as its termination message and was restarted
/// `restarts` times (kwok runs no container, so a test plays that part).
pub async fn report_crash(pods: &Api<Pod>, pod: &str, message: &str, restarts: i32) -> Result<()> {
    pods.patch_status(
        pod,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"containerStatuses": [{
            "name": "chatgate",
            "image": "ghcr.io/chatgate/chatgate-service:test",
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}},
        }]}})),
    )
    .await?;
    Ok(())
}
