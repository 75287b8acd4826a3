//! Faults of the control plane itself, each on a control plane of its own so that
//! no other test shares the outage: kube-apiserver killed and restarted in the
//! middle of a reconcile, etcd stopped for 20 s, and watches that expire (410 Gone)
//! and list again. Each ends converged (the ChatService `Ready` for its latest
//! generation), with no write made twice, by the same operator that never restarted.

mod operator_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chatgate_operator::crd::ChatService;
use chatgate_operator::meta;
use chatgate_tests::control_plane::{ETCD, KUBE_APISERVER};
use chatgate_tests::{ControlPlane, ControlPlaneOptions, TestNamespace, wait_for, wait_until};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use operator_support::{Operator, TIMEOUT, create, install_crd, options, ready_now};
use serde_json::json;

/// How long etcd stays down: longer than the operator's Lease (8 s in these tests),
/// so leadership is lost and must be regained.
const ETCD_OUTAGE: Duration = Duration::from_secs(20);
/// How long the API server stays down after being killed.
const API_OUTAGE: Duration = Duration::from_secs(5);

/// A control plane of its own, a namespace, and an operator leading in it with
/// ChatService `chat` Ready.
struct Fixture {
    // Field order is drop order: the operator and namespace go before their
    // control plane.
    op: Operator,
    ns: TestNamespace,
    admin: Client,
    cp: ControlPlane,
}

impl Fixture {
    /// `lease` overrides the test operator's Lease (duration, grace in seconds).
    async fn start(prefix: &str, lease: Option<(u64, u64)>) -> Result<Fixture> {
        // The operator's log (warnings and up unless RUST_LOG says more), shown with
        // a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,chatgate_operator=info".into()),
            )
            .with_test_writer()
            .try_init();
        let cp = ControlPlane::start(ControlPlaneOptions { fake_nodes: 1 }).await?;
        install_crd(&cp).await?;
        let ns = TestNamespace::new(&cp, prefix).await?;
        let admin = cp.client();
        // The client the operator binary makes, with its read timeout.
        let client = chatgate_operator::run::api_client(cp.admin_config())?;
        let mut options = options(ns.name(), "only");
        if let Some((duration, grace)) = lease {
            options.lease_duration_seconds = duration;
            options.lease_grace_seconds = grace;
        }
        let mut op = Operator::start_with(client, options);
        op.wait_leading(TIMEOUT).await?;
        create(
            &admin,
            ns.name(),
            &ChatService::test("chat").replicas(1).build(),
        )
        .await?;
        wait_for(&self_api(&admin, ns.name()), "chat", TIMEOUT, ready_now).await?;
        Ok(Fixture { op, ns, admin, cp })
    }

    fn chat_services(&self) -> Api<ChatService> {
        self_api(&self.admin, self.ns.name())
    }

    /// The operator's writes of children so far.
    fn children_writes(&self) -> u64 {
        self.op.health.metrics.writes_of("children")
    }

    /// Changes the ChatService's image: a change to the Deployment only.
    async fn change_image(&self, tag: &str) -> Result<()> {
        self.chat_services()
            .patch(
                "chat",
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "spec": {"image": format!("ghcr.io/chatgate/chatgate-service:{tag}")}
                })),
            )
            .await
            .context("changing the ChatService's image")?;
        Ok(())
    }

    /// Waits until the operator has started a reconcile after `before` reconciles:
    /// the moment to strike for a fault "mid-reconcile".
    async fn reconcile_started_after(&self, before: u64) -> Result<()> {
        let metrics = self.op.health.metrics.clone();
        wait_until(
            TIMEOUT,
            "the operator to start reconciling the change",
            || {
                let started = metrics.reconciles.get() > before;
                async move { Ok(started.then_some(())) }
            },
        )
        .await?;
        Ok(())
    }

    /// Waits until `chat` is Ready for its latest generation with the Deployment
    /// rolled out to `tag`, then checks what a fault must not have caused.
    async fn converged(&self, tag: &str, before: &Children, writes_before: u64) -> Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.admin.clone(), self.ns.name());
        let waited = wait_for(&self.chat_services(), "chat", TIMEOUT, ready_now).await;
        let deployment = deployments.get("chat").await?;
        let cs = waited.with_context(|| {
            format!(
                "converging after the fault; the Deployment is at generation {:?}, status {}; {}",
                deployment.metadata.generation,
                serde_json::to_string(&deployment.status).unwrap_or_default(),
                watch_errors(&self.op)
            )
        })?;
        let image = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        ensure!(
            image.ends_with(&format!(":{tag}")),
            "the Deployment runs {image}, not :{tag}"
        );

        let after = Children::read(&self.admin, self.ns.name()).await?;
        let changed = before.changed(&after);
        // The image is the Deployment's alone: it changed, once; nothing else did.
        ensure!(
            changed == ["Deployment/chat"],
            "children changed: {changed:?} (expected the Deployment only)"
        );
        ensure!(
            after.generation("Deployment/chat") == before.generation("Deployment/chat") + 1,
            "the Deployment's spec was written more than once: generation {} -> {}",
            before.generation("Deployment/chat"),
            after.generation("Deployment/chat")
        );
        // One ReplicaSet per template the Deployment ever had: the old and the new.
        let replica_sets: Api<ReplicaSet> = Api::namespaced(self.admin.clone(), self.ns.name());
        let sets = replica_sets.list(&ListParams::default()).await?.items;
        ensure!(sets.len() == 2, "{} ReplicaSets, expected 2", sets.len());
        // A write whose answer the fault swallowed may be made again, but only one
        // that changes something: never more writes than changed children.
        let writes = self.children_writes() - writes_before;
        ensure!(
            writes as usize <= changed.len(),
            "{writes} writes of children for {} changed",
            changed.len()
        );
        ensure!(self.op.is_running(), "the operator stopped");
        println!(
            "converged: generation {:?}, {writes} child write(s), watch errors: {}",
            cs.metadata.generation,
            watch_errors(&self.op)
        );
        Ok(())
    }
}

fn self_api(admin: &Client, ns: &str) -> Api<ChatService> {
    Api::namespaced(admin.clone(), ns)
}

fn watch_errors(op: &Operator) -> String {
    op.health
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("chatgate_operator_watch_errors_total{"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each child's `resourceVersion` and `generation`, keyed `Kind/name`.
struct Children(BTreeMap<String, (String, i64)>);

impl Children {
    async fn read(client: &Client, ns: &str) -> Result<Children> {
        let lp = ListParams::default().labels(&meta::managed_selector());
        let mut all = BTreeMap::new();
        let mut add = |kind: &str, items: Vec<kube::api::ObjectMeta>| {
            for m in items {
                all.insert(
                    format!("{kind}/{}", m.name.unwrap_or_default()),
                    (
                        m.resource_version.unwrap_or_default(),
                        m.generation.unwrap_or(0),
                    ),
                );
            }
        };
        let config_maps: Vec<ConfigMap> =
            Api::namespaced(client.clone(), ns).list(&lp).await?.items;
        add(
            "ConfigMap",
            config_maps.into_iter().map(|o| o.metadata).collect(),
        );
        let services: Vec<Service> = Api::namespaced(client.clone(), ns).list(&lp).await?.items;
        add(
            "Service",
            services.into_iter().map(|o| o.metadata).collect(),
        );
        let pdbs: Vec<PodDisruptionBudget> =
            Api::namespaced(client.clone(), ns).list(&lp).await?.items;
        add(
            "PodDisruptionBudget",
            pdbs.into_iter().map(|o| o.metadata).collect(),
        );
        let deployments: Vec<Deployment> =
            Api::namespaced(client.clone(), ns).list(&lp).await?.items;
        add(
            "Deployment",
            deployments.into_iter().map(|o| o.metadata).collect(),
        );
        Ok(Children(all))
    }

    fn generation(&self, key: &str) -> i64 {
        self.0.get(key).map_or(0, |(_, g)| *g)
    }

    /// The children whose content changed: a new generation where the kind has one
    /// (its status is written by controllers, its spec only by the operator), a new
    /// resourceVersion otherwise; and any child added or removed.
    fn changed(&self, after: &Children) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> =
            self.0.keys().chain(after.0.keys()).collect();
        keys.into_iter()
            .filter(|k| match (self.0.get(*k), after.0.get(*k)) {
                (Some((rv_a, g_a)), Some((rv_b, g_b))) => {
                    if *g_a > 0 || *g_b > 0 {
                        g_a != g_b
                    } else {
                        rv_a != rv_b
                    }
                }
                _ => true,
            })
            .cloned()
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_killed_mid_reconcile_and_restarted_converges_without_a_second_write()
-> Result<()> {
    let f = Fixture::start("fault-api", None).await?;
    let before = Children::read(&f.admin, f.ns.name()).await?;
    let writes_before = f.children_writes();
    let reconciles = f.op.health.metrics.reconciles.get();

    f.change_image("v2").await?;
    f.reconcile_started_after(reconciles).await?;
    // A crash, not a shutdown: requests in flight get no answer.
    f.cp.stop_process(KUBE_APISERVER, Duration::ZERO)?;
    tokio::time::sleep(API_OUTAGE).await;
    f.cp.start_process(KUBE_APISERVER).await?;

    f.converged("v2", &before, writes_before).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stopped_for_20_seconds_mid_reconcile_converges_without_a_second_write() -> Result<()>
{
    let mut f = Fixture::start("fault-etcd", None).await?;
    let before = Children::read(&f.admin, f.ns.name()).await?;
    let writes_before = f.children_writes();
    let reconciles = f.op.health.metrics.reconciles.get();

    f.change_image("v2").await?;
    f.reconcile_started_after(reconciles).await?;
    let stopped = Instant::now();
    f.cp.stop_process(ETCD, Duration::from_secs(5))?;
    tokio::time::sleep(ETCD_OUTAGE.saturating_sub(stopped.elapsed())).await;
    // The Lease could not be renewed for longer than it lasts: leadership was lost.
    ensure!(
        !f.op.health.is_leader(),
        "the operator still claims to lead with etcd down for {ETCD_OUTAGE:?}"
    );
    f.cp.start_process(ETCD).await?;

    // The same operator (never restarted) takes the Lease again and finishes.
    f.op.wait_leading(TIMEOUT).await?;
    f.converged("v2", &before, writes_before).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_list_again_and_see_changes_made_meanwhile() -> Result<()> {
    // A Lease that outlasts the API server's restart, so the same watches resume
    // (and expire) rather than the operator stepping down and listing afresh.
    let f = Fixture::start("fault-watch", Some((120, 40))).await?;
    let before = Children::read(&f.admin, f.ns.name()).await?;
    let writes_before = f.children_writes();
    let expired_before = f.op.health.metrics.watch_errors_with("410");

    // Every resource version the operator's watches hold is older than what a
    // freshly started API server can resume from once etcd's revision has moved on.
    f.cp.stop_process(KUBE_APISERVER, Duration::from_secs(10))?;
    let revision = f.cp.advance_etcd_revision().await?;
    f.cp.start_process(KUBE_APISERVER).await?;
    // A change made while the watches are still reconnecting: the fresh list
    // (not a resumed watch) is what must show it to the operator.
    f.change_image("v3").await?;

    let metrics = f.op.health.metrics.clone();
    wait_until(TIMEOUT, "a watch to expire with 410 Gone", || {
        let expired = metrics.watch_errors_with("410") > expired_before;
        async move { Ok(expired.then_some(())) }
    })
    .await
    .with_context(|| format!("etcd at revision {revision}; {}", watch_errors(&f.op)))?;
    f.converged("v3", &before, writes_before).await
}
