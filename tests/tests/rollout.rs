//! The product's proof, measured from the client side: a fleet of chat clients
//! connects through the local platform's router (which, like kube-proxy, sends new
//! connections only to endpoints Kubernetes marks ready) to real `chatgate-service`
//! pods that the operator rolls, and counts every failure a user would notice.
//!
//! Scenarios (issue 13): a good rollout; a rollout whose critical service cannot
//! start; a slow startup; a staging configuration drifting from production; and the
//! first three again with a naive Deployment of the same binary (one always-200
//! probe, default `maxUnavailable`, no preStop), side by side. The tables go to
//! stderr and to `target/e2e/rollout.md`; `make e2e` shows them, and BENCHMARKS.md
//! records them.
//!
//! A real Prometheus watches every scenario with the chart's scrape jobs and alert
//! rules as shipped (issue 14): the chat pods found through the control plane, the
//! operator's `/metrics`. Its alerts are polled into a timeline per scenario: the
//! startup-failure alert must fire in scenario 2, the `/ws` server-error alert must
//! never so much as go pending, and nothing else may fire.

mod operator_support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use chatgate_contract::Environment;
use chatgate_operator::conditions::{self, reason};
use chatgate_operator::crd::{ChatService, JwtAlgorithm, ParityMode, SecretKeyRef};
use chatgate_operator::meta;
use chatgate_tests::fleet::{Fleet, FleetOptions, FleetReport};
use chatgate_tests::image::{Images, service_reference, workspace_root};
use chatgate_tests::node_agent::{AGENT_NODE_LABEL, AGENT_NODE_TAINT_KEY};
use chatgate_tests::process::free_loopback_ports;
use chatgate_tests::prom_tools::ensure_prom_tools;
use chatgate_tests::prometheus::{AlertChange, AlertLog, Prometheus, PrometheusOptions};
use chatgate_tests::router::Router;
use chatgate_tests::tokens::Signer;
use chatgate_tests::wait::deployment_ready;
use chatgate_tests::{ControlPlane, NodeAgent, Postgres, TestNamespace, wait_for, wait_until};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator_support::*;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

/// Clients in the fleet; each is one user with one socket.
const CLIENTS: usize = 200;
/// How often each client starts a message, and pings.
const MESSAGE_EVERY: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_secs(2);
/// How long the fleet runs before and after each change.
const SETTLE: Duration = Duration::from_secs(3);
/// How long the fleet may take to finish its messages and read its threads back.
const FINISH_WITHIN: Duration = Duration::from_secs(30);
/// The pods' startup budget and probe period, and the drain (preStop) seconds.
const STARTUP_BUDGET_S: i32 = 30;
const DRAIN_S: i32 = 2;
/// How long the slow dependency stays unreachable.
const SLOW_DEPENDENCY: Duration = Duration::from_secs(5);
/// How long a naive rollout that never completes is watched.
const NAIVE_WATCH: Duration = Duration::from_secs(20);
/// How long a rollout may take before the scenario fails.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

const SECRET_KEYS: &str = "chat-keys";
const SECRET_KEYS_NEXT: &str = "chat-keys-next";
const SECRET_DB: &str = "chat-db";
const SECRET_DB_SLOW: &str = "chat-db-slow";
const KEY_PUBLIC: &str = "jwt-public-key";
const KEY_DB: &str = "database-url";

/// The alert every scenario must never raise: `/ws` server errors.
const WS_SERVER_ERRORS: &str = "ChatGateWsServerErrors";
/// The alert a rollout whose critical service cannot start must raise.
const STARTUP_FAILURE: &str = "ChatGateStartupFailure";

/// What every scenario shares: the control plane, one node agent running the
/// images, one PostgreSQL server, the signing key of every token, and Prometheus
/// with the timeline of its alerts.
struct Platform {
    cp: &'static ControlPlane,
    agent: NodeAgent,
    postgres: Postgres,
    signer: Signer,
    images: &'static Images,
    prometheus: Arc<Prometheus>,
    alerts: AlertLog,
}

impl Platform {
    async fn start() -> Result<Platform> {
        let cp = ControlPlane::shared().await;
        install_crd(cp).await?;
        let images = Images::shared().await?;
        let agent = NodeAgent::start(cp, "rollout-node-0", images.clone()).await?;
        let postgres = tokio::task::spawn_blocking(Postgres::start).await??;
        let tools = tokio::task::spawn_blocking(ensure_prom_tools).await??;
        let prometheus = Arc::new(
            Prometheus::start(
                &tools,
                PrometheusOptions {
                    kubeconfig: cp.kubeconfig_path().to_owned(),
                    interval: Duration::from_secs(1),
                },
            )
            .await?,
        );
        let alerts = AlertLog::start(prometheus.clone(), Duration::from_millis(500));
        Ok(Platform {
            cp,
            agent,
            postgres,
            signer: Signer::generate_ec()?,
            images,
            prometheus,
            alerts,
        })
    }

    /// A namespace with its operator leading, its `/metrics` scraped by Prometheus.
    async fn operator(&self, prefix: &str) -> Result<Setup> {
        let address = SocketAddr::from(([127, 0, 0, 1], free_loopback_ports(1)?[0]));
        let setup = operator_in_new_namespace_serving(prefix, &address.to_string()).await?;
        self.prometheus.set_operator_targets(&[address])?;
        Ok(setup)
    }

    /// What Prometheus saw of namespace `ns` during the scenario: the `/ws` upgrades
    /// it scraped from the pods and every alert change. `must_fire` must have fired;
    /// nothing else may have, and the `/ws` server-error alert not even gone pending.
    async fn observe_alerts(&self, ns: &str, measured: &mut Measured, must_fire: &[&str]) {
        // One more scrape and rule evaluation after the fleet's last request.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let query = format!("sum(chatgate_ws_upgrades_total{{namespace=\"{ns}\"}})");
        match self.prometheus.query(&query).await {
            Ok(result) => {
                measured.scraped_upgrades = result.first().map_or(0.0, |(_, v)| *v);
            }
            Err(e) => measured
                .problems
                .push(format!("querying Prometheus: {e:#}")),
        }
        if measured.scraped_upgrades < 1.0 {
            let targets = self.prometheus.targets().await.unwrap_or_default();
            measured.problems.push(format!(
                "Prometheus scraped no /ws upgrade from the pods of {ns}; its targets: {targets:?}; its log:\n{}",
                self.prometheus.log()
            ));
        }
        measured.alerts = self.alerts.changes_in(ns);
        for name in must_fire {
            if !measured
                .alerts
                .iter()
                .any(|c| c.alert == *name && c.state == "firing")
            {
                measured.problems.push(format!(
                    "{name} did not fire; alert changes: {:?}",
                    measured.alerts
                ));
            }
        }
        for change in &measured.alerts {
            if change.alert == WS_SERVER_ERRORS {
                measured
                    .problems
                    .push(format!("{WS_SERVER_ERRORS} went {}", change.state));
            } else if change.state == "firing" && !must_fire.contains(&change.alert.as_str()) {
                measured
                    .problems
                    .push(format!("{} fired: {}", change.alert, change.summary));
            }
        }
    }

    fn public_key(&self) -> &str {
        match &self.signer {
            Signer::EcKeyPair { public_pem, .. } => public_pem,
            Signer::Secret(_) => unreachable!("the platform signs with ES256"),
        }
    }

    fn fleet(&self, router: &Router, prefix: &str) -> Result<Fleet> {
        let users = (0..CLIENTS)
            .map(|i| {
                let user = format!("{prefix}-{i}");
                let token = self.signer.token(&user, Duration::from_secs(3600))?;
                Ok((user, token))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Fleet::start(FleetOptions {
            url: format!("ws://{}/ws", router.address()),
            users,
            message_every: MESSAGE_EVERY,
            ping_every: PING_EVERY,
        }))
    }
}

/// What one run of a scenario measured.
#[derive(Debug, Default)]
struct Measured {
    fleet: FleetReport,
    /// Change applied → rollout complete (every pod of the new version ready).
    time_to_ready: Option<Duration>,
    /// Change applied → ChatService `Stalled`.
    time_to_stalled: Option<Duration>,
    /// Connections the router sent to a pod before its startup completed.
    routed_before_startup: usize,
    /// Connections the router closed for want of a ready endpoint.
    router_no_endpoint: u64,
    /// When the change that started the rollout was applied.
    change_at: Option<SystemTime>,
    /// `/ws` upgrades Prometheus scraped from the scenario's pods.
    scraped_upgrades: f64,
    /// Every alert change Prometheus showed in the scenario's namespace.
    alerts: Vec<AlertChange>,
    /// What the chatgate run must show and did not.
    problems: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_lose_nothing_through_good_broken_slow_and_drifting_rollouts() -> Result<()> {
    let platform = Platform::start().await?;
    let mut tables = String::new();
    let mut problems = Vec::new();
    let started = Instant::now();
    for scenario in [Scenario::Good, Scenario::Broken, Scenario::Slow] {
        eprintln!("rollout: {} at {:.0?}", scenario.title(), started.elapsed());
        let chatgate = measure(
            scenario.chatgate(&platform).await,
            &mut problems,
            scenario,
            "chatgate",
        );
        let naive = measure(
            scenario.naive(&platform).await,
            &mut problems,
            scenario,
            "naive",
        );
        tables.push_str(&table(scenario, &chatgate, Some(&naive)));
    }
    eprintln!(
        "rollout: {} at {:.0?}",
        Scenario::Drift.title(),
        started.elapsed()
    );
    let drift = measure(
        drifting_staging(&platform).await,
        &mut problems,
        Scenario::Drift,
        "chatgate",
    );
    tables.push_str(&table(Scenario::Drift, &drift, None));
    publish(&tables)?;
    if !problems.is_empty() {
        bail!("{}\n\n{tables}", problems.join("\n"));
    }
    Ok(())
}

/// The run's measurements, with its expectations' misses moved to `problems`; a
/// run that could not finish counts as a problem and measures nothing.
fn measure(
    run: Result<Measured>,
    problems: &mut Vec<String>,
    scenario: Scenario,
    variant: &str,
) -> Measured {
    match run {
        Ok(mut measured) => {
            for p in measured.problems.drain(..) {
                problems.push(format!("{} ({variant}): {p}", scenario.title()));
            }
            measured
        }
        Err(e) => {
            problems.push(format!(
                "{} ({variant}) did not run: {e:#}",
                scenario.title()
            ));
            Measured::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Good,
    Broken,
    Slow,
    Drift,
}

impl Scenario {
    fn title(self) -> &'static str {
        match self {
            Scenario::Good => "1. rolling update to a good version",
            Scenario::Broken => {
                "2. rolling update to a version whose critical service cannot start"
            }
            Scenario::Slow => "3. slow startup (a dependency reachable only after 5 s)",
            Scenario::Drift => "4. staging configuration drifting from production",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Scenario::Good => "good",
            Scenario::Broken => "broken",
            Scenario::Slow => "slow",
            Scenario::Drift => "drift",
        }
    }

    /// The scenario on a ChatService the operator manages.
    async fn chatgate(self, platform: &Platform) -> Result<Measured> {
        let Setup { ns, admin, op, .. } =
            platform.operator(&format!("e2e-{}", self.prefix())).await?;
        let result = self.chatgate_in(platform, &ns, &admin).await;
        op.stop().await;
        result
    }

    async fn chatgate_in(
        self,
        platform: &Platform,
        ns: &TestNamespace,
        admin: &Client,
    ) -> Result<Measured> {
        let database = secrets(platform, ns, admin, self.prefix()).await?;
        let chat_services: Api<ChatService> = ns.api(admin.clone());
        let cs = chat_services
            .create(&PostParams::default(), &production_chat_service())
            .await
            .context("creating ChatService chat")?;
        wait_rolled_out(&chat_services, "chat", cs.metadata.generation.unwrap_or(1)).await?;

        let router = Router::start(admin.clone(), ns.name(), "chat", loopback0()).await?;
        let fleet = platform.fleet(&router, self.prefix())?;
        wait_connected(&fleet).await?;
        tokio::time::sleep(SETTLE).await;

        let mut measured = Measured::default();
        let _door = match self {
            Scenario::Slow => Some(slow_database(platform, ns, admin, &database).await?),
            _ => None,
        };
        let changed = Instant::now();
        let change_at = SystemTime::now();
        measured.change_at = Some(change_at);
        let patched = chat_services
            .patch(
                "chat",
                &PatchParams::default(),
                &Patch::Merge(self.change(platform)),
            )
            .await
            .context("changing ChatService chat")?;
        let generation = patched.metadata.generation.unwrap_or_default();
        match self {
            Scenario::Good | Scenario::Slow => {
                wait_rolled_out(&chat_services, "chat", generation).await?;
                measured.time_to_ready = Some(changed.elapsed());
            }
            Scenario::Broken => {
                let (stalled, message) =
                    wait_stalled(&chat_services, "chat", reason::STARTUP_FAILED).await?;
                measured.time_to_stalled = Some(changed.elapsed());
                let failure = stalled
                    .status
                    .as_ref()
                    .and_then(|s| s.startup_failures.first().cloned());
                let named = failure
                    .as_ref()
                    .map(|f| (f.phase.clone(), f.service.clone()));
                if named != Some((Some("auth".into()), Some("jwt_verifier".into()))) {
                    measured.problems.push(format!(
                        "Stalled does not name auth/jwt_verifier: {message}"
                    ));
                }
                if changed.elapsed() > Duration::from_secs(STARTUP_BUDGET_S as u64) {
                    measured.problems.push(format!(
                        "Stalled after {:?}, beyond the {STARTUP_BUDGET_S} s startup budget",
                        changed.elapsed()
                    ));
                }
                // The old pods keep serving while it is stalled.
                tokio::time::sleep(SETTLE).await;
                let fixed = Instant::now();
                fix_the_key(platform, ns, admin).await?;
                wait_rolled_out(&chat_services, "chat", generation).await?;
                measured.time_to_ready = Some(fixed.elapsed());
            }
            Scenario::Drift => unreachable!("drift has its own run"),
        }
        // Ready counts the new pods; the old ones drain after it. The fleet keeps
        // going until they are gone, so every socket they held has moved.
        let pods: Api<Pod> = ns.api(admin.clone());
        let instance = format!("{}=chat", meta::LABEL_INSTANCE);
        wait_pods_settled(&pods, &instance, ROLLOUT_TIMEOUT).await?;
        tokio::time::sleep(SETTLE).await;
        measured.fleet = fleet.finish(FINISH_WITHIN).await;
        measured.router_no_endpoint = router.no_endpoint();
        measured.routed_before_startup =
            routed_before_startup(&router, &platform.agent, ns.name(), change_at)?;
        expect_no_failures(&mut measured);
        if self == Scenario::Good && measured.fleet.closes_with(1012) == 0 {
            measured
                .problems
                .push("no socket was moved by a drain (1012)".into());
        }
        if self == Scenario::Slow && measured.time_to_ready.is_some_and(|t| t < SLOW_DEPENDENCY) {
            measured.problems.push(format!(
                "the rollout finished in {:?}, before the dependency was reachable",
                measured.time_to_ready
            ));
        }
        if measured.routed_before_startup > 0 {
            measured.problems.push(format!(
                "{} connections reached a pod before its startup completed",
                measured.routed_before_startup
            ));
        }
        let must_fire: &[&str] = match self {
            Scenario::Broken => &[STARTUP_FAILURE],
            _ => &[],
        };
        platform
            .observe_alerts(ns.name(), &mut measured, must_fire)
            .await;
        Ok(measured)
    }

    /// The change that starts the rollout, as a merge patch of the ChatService.
    fn change(self, platform: &Platform) -> Value {
        match self {
            // The same binary by digest: a new pod template, a good version.
            Scenario::Good => json!({"spec": {"image": digest_reference(platform)}}),
            // A public key only the binary can find unparsable.
            Scenario::Broken => json!({"spec": {"jwt": {"publicKeyRef": {
                "name": SECRET_KEYS_NEXT, "key": KEY_PUBLIC,
            }}}}),
            Scenario::Slow => json!({"spec": {"database": {"urlSecretRef": {
                "name": SECRET_DB_SLOW, "key": KEY_DB,
            }}}}),
            Scenario::Drift => unreachable!("drift has its own run"),
        }
    }

    /// The scenario on a naive Deployment of the same binary and configuration.
    async fn naive(self, platform: &Platform) -> Result<Measured> {
        let cp = platform.cp;
        let admin = cp.client();
        let ns = TestNamespace::new(cp, &format!("e2e-naive-{}", self.prefix())).await?;
        let database = secrets(platform, &ns, &admin, &format!("naive_{}", self.prefix())).await?;
        // The operator renders the Deployment once, in a namespace of its own; the
        // naive one is that pod template with the operator's wiring taken out.
        let (before, after, config_maps) = self.rendered(platform).await?;
        let config_maps_api: Api<ConfigMap> = ns.api(admin.clone());
        for mut cm in config_maps {
            cm.metadata = kube::api::ObjectMeta {
                name: cm.metadata.name.clone(),
                ..Default::default()
            };
            config_maps_api.create(&PostParams::default(), &cm).await?;
        }
        let deployments: Api<Deployment> = ns.api(admin.clone());
        deployments
            .create(&PostParams::default(), &naive_deployment(&before))
            .await
            .context("creating the naive Deployment")?;
        let services: Api<Service> = ns.api(admin.clone());
        services
            .create(&PostParams::default(), &naive_service())
            .await?;
        wait_naive_rolled_out(&deployments, ROLLOUT_TIMEOUT).await?;

        let router = Router::start(admin.clone(), ns.name(), NAIVE, loopback0()).await?;
        let fleet = platform.fleet(&router, &format!("naive-{}", self.prefix()))?;
        wait_connected(&fleet).await?;
        tokio::time::sleep(SETTLE).await;

        let mut measured = Measured::default();
        let _door = match self {
            Scenario::Slow => Some(slow_database(platform, &ns, &admin, &database).await?),
            _ => None,
        };
        let changed = Instant::now();
        let change_at = SystemTime::now();
        let mut updated = naive_deployment(&after);
        updated.metadata.resource_version = None;
        deployments
            .patch(
                NAIVE,
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&updated),
            )
            .await
            .context("rolling the naive Deployment")?;
        match self {
            Scenario::Broken => {
                // It never completes by itself; watch it as long as chatgate's run
                // took to stall, then fix the key and watch it again.
                let _ = wait_naive_rolled_out(&deployments, NAIVE_WATCH).await;
                fix_the_key(platform, &ns, &admin).await?;
                let fixed = Instant::now();
                if wait_naive_rolled_out(&deployments, NAIVE_WATCH)
                    .await
                    .is_ok()
                {
                    measured.time_to_ready = Some(fixed.elapsed());
                }
            }
            _ => {
                if wait_naive_rolled_out(&deployments, ROLLOUT_TIMEOUT)
                    .await
                    .is_ok()
                {
                    measured.time_to_ready = Some(changed.elapsed());
                }
            }
        }
        let pods: Api<Pod> = ns.api(admin.clone());
        let _ = wait_pods_settled(&pods, &format!("app={NAIVE}"), NAIVE_WATCH).await;
        tokio::time::sleep(SETTLE).await;
        measured.fleet = fleet.finish(FINISH_WITHIN).await;
        measured.router_no_endpoint = router.no_endpoint();
        measured.routed_before_startup =
            routed_before_startup(&router, &platform.agent, ns.name(), change_at)?;
        Ok(measured)
    }

    /// The operator's Deployment before and after this scenario's change (taken
    /// from a ChatService in a namespace of its own, rendered but not run), and its
    /// ConfigMaps.
    async fn rendered(
        self,
        platform: &Platform,
    ) -> Result<(Deployment, Deployment, Vec<ConfigMap>)> {
        let Setup { ns, admin, op, .. } =
            operator_in_new_namespace(&format!("e2e-render-{}", self.prefix())).await?;
        let url = secrets(platform, &ns, &admin, &format!("render_{}", self.prefix())).await?;
        // Rendering needs every Secret the change names, not a reachable database.
        create_secret(&admin, ns.name(), SECRET_DB_SLOW, &[(KEY_DB, &url)]).await?;
        let cs = rendered_only(production_chat_service());
        let chat_services: Api<ChatService> = ns.api(admin.clone());
        let deployments: Api<Deployment> = ns.api(admin.clone());
        chat_services.create(&PostParams::default(), &cs).await?;
        let before = rendered_deployment(&deployments, None).await?;
        chat_services
            .patch(
                "chat",
                &PatchParams::default(),
                &Patch::Merge(self.change(platform)),
            )
            .await?;
        let after = rendered_deployment(&deployments, before.metadata.generation).await?;
        let config_maps: Api<ConfigMap> = ns.api(admin.clone());
        let selector = format!("{}={}", meta::LABEL_INSTANCE, "chat");
        let maps = config_maps
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        op.stop().await;
        Ok((before, after, maps))
    }
}

/// Scenario 4: a staging ChatService compared with production in `enforce` mode
/// drifts (it accepts tokens from another issuer than production); no new pod may be
/// created, the clients of the running version see nothing.
async fn drifting_staging(platform: &Platform) -> Result<Measured> {
    let Setup { ns, admin, op, .. } = platform.operator("e2e-drift").await?;
    let result = drifting_staging_in(platform, &ns, &admin).await;
    op.stop().await;
    result
}

async fn drifting_staging_in(
    platform: &Platform,
    ns: &TestNamespace,
    admin: &Client,
) -> Result<Measured> {
    secrets(platform, ns, admin, "drift").await?;
    let chat_services: Api<ChatService> = ns.api(admin.clone());
    let mut production = rendered_only(production_chat_service());
    production.metadata.name = Some("chat-production".into());
    chat_services
        .create(&PostParams::default(), &production)
        .await?;
    let mut staging = production_chat_service();
    staging.spec.environment = Environment::Staging;
    staging.spec.parity = ChatService::test("chat")
        .baseline("chat-production", ParityMode::Enforce)
        .build()
        .spec
        .parity;
    let created = chat_services
        .create(&PostParams::default(), &staging)
        .await?;
    wait_rolled_out(
        &chat_services,
        "chat",
        created.metadata.generation.unwrap_or(1),
    )
    .await?;
    let pods: Api<Pod> = ns.api(admin.clone());
    let replica_sets: Api<ReplicaSet> = ns.api(admin.clone());
    let pods_before = names(&pods, "chat").await?;
    let sets_before = names(&replica_sets, "chat").await?;

    let router = Router::start(admin.clone(), ns.name(), "chat", loopback0()).await?;
    let fleet = platform.fleet(&router, "drift")?;
    wait_connected(&fleet).await?;
    tokio::time::sleep(SETTLE).await;

    let mut measured = Measured {
        change_at: Some(SystemTime::now()),
        ..Measured::default()
    };
    let changed = Instant::now();
    // Staging starts accepting tokens from another issuer than production: a key
    // whose parity rule is `match`, so the rollout must not start.
    let drifted_issuer = format!(
        "{}-staging",
        staging.spec.jwt.issuer.as_deref().unwrap_or("chatgate")
    );
    chat_services
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"jwt": {"issuer": drifted_issuer}}})),
        )
        .await?;
    let stalled = wait_for(
        &chat_services,
        "chat",
        ROLLOUT_TIMEOUT,
        |cs: &ChatService| {
            condition(cs, conditions::PARITY_OK).is_some_and(|c| c.status == "False")
        },
    )
    .await?;
    measured.time_to_stalled = Some(changed.elapsed());
    if !condition_true_now(&stalled, conditions::STALLED) {
        measured
            .problems
            .push(format!("not Stalled: {:?}", stalled.status));
    }
    let parity = condition(&stalled, conditions::PARITY_OK).map(|c| c.message.clone());
    if !parity
        .as_deref()
        .is_some_and(|m| m.contains("CHATGATE_JWT_ISSUER"))
    {
        measured.problems.push(format!(
            "ParityOK does not name CHATGATE_JWT_ISSUER: {parity:?}"
        ));
    }
    tokio::time::sleep(SETTLE * 2).await;
    if names(&pods, "chat").await? != pods_before {
        measured.problems.push("pods changed while stalled".into());
    }
    if names(&replica_sets, "chat").await? != sets_before {
        measured
            .problems
            .push("a new ReplicaSet was created".into());
    }
    measured.fleet = fleet.finish(FINISH_WITHIN).await;
    measured.router_no_endpoint = router.no_endpoint();
    expect_no_failures(&mut measured);
    platform.observe_alerts(ns.name(), &mut measured, &[]).await;
    Ok(measured)
}

/// The production ChatService every scenario starts from: two replicas on the agent
/// node, ES256 tokens, PostgreSQL, the built-in agent.
fn production_chat_service() -> ChatService {
    let mut cs = ChatService::test("chat")
        .in_env(Environment::Production)
        .image(&service_reference())
        .replicas(2)
        .with_secret(SECRET_DB)
        .startup(STARTUP_BUDGET_S, 1)
        .drain_seconds(DRAIN_S)
        .max_surge(1)
        .on_nodes(AGENT_NODE_LABEL.0, AGENT_NODE_LABEL.1, AGENT_NODE_TAINT_KEY)
        .build();
    cs.spec.jwt.algorithm = JwtAlgorithm::ES256;
    cs.spec.jwt.secret_ref = None;
    cs.spec.jwt.public_key_ref = Some(SecretKeyRef {
        name: SECRET_KEYS.into(),
        key: KEY_PUBLIC.into(),
    });
    cs
}

/// `cs` with its pods bound for a node that does not exist: rendered, never run.
fn rendered_only(mut cs: ChatService) -> ChatService {
    cs.spec.scheduling = ChatService::test("chat")
        .on_nodes("chatgate.dev/render-only", "true", AGENT_NODE_TAINT_KEY)
        .build()
        .spec
        .scheduling;
    cs
}

/// Waits until every pod matching `selector` is ready and none is terminating:
/// the old version's pods are gone.
async fn wait_pods_settled(pods: &Api<Pod>, selector: &str, within: Duration) -> Result<()> {
    let pods = pods.clone();
    let selector = selector.to_owned();
    wait_until(within, "the old pods to be gone", move || {
        let (pods, selector) = (pods.clone(), selector.clone());
        async move {
            let list = pods.list(&ListParams::default().labels(&selector)).await?;
            let settled = !list.items.is_empty()
                && list.items.iter().all(|p| {
                    p.metadata.deletion_timestamp.is_none() && chatgate_tests::wait::pod_ready(p)
                });
            Ok(settled.then_some(()))
        }
    })
    .await
    .map_err(|e| anyhow!("{e}"))
}

/// The Secrets of a scenario: the public key (good), the next key (not a key), and
/// the database URL of a database of its own, whose URL is returned.
async fn secrets(
    platform: &Platform,
    ns: &TestNamespace,
    admin: &Client,
    database: &str,
) -> Result<String> {
    let url = platform
        .postgres
        .create_database(&format!("e2e_{database}"))?;
    create_secret(
        admin,
        ns.name(),
        SECRET_KEYS,
        &[(KEY_PUBLIC, platform.public_key())],
    )
    .await?;
    create_secret(
        admin,
        ns.name(),
        SECRET_KEYS_NEXT,
        &[(KEY_PUBLIC, "not a PEM public key")],
    )
    .await?;
    create_secret(admin, ns.name(), SECRET_DB, &[(KEY_DB, &url)]).await?;
    Ok(url)
}

/// Fixes the unparsable key: the good public key into the Secret the broken
/// version reads.
async fn fix_the_key(platform: &Platform, ns: &TestNamespace, admin: &Client) -> Result<()> {
    let secrets: Api<Secret> = ns.api(admin.clone());
    secrets
        .patch(
            SECRET_KEYS_NEXT,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {KEY_PUBLIC: platform.public_key()}})),
        )
        .await
        .context("fixing the public key")?;
    Ok(())
}

/// The database behind a door that stays shut for [`SLOW_DEPENDENCY`] after the
/// first knock: Secret `chat-db-slow` points at it.
async fn slow_database(
    platform: &Platform,
    ns: &TestNamespace,
    admin: &Client,
    url: &str,
) -> Result<SlowDoor> {
    let door = SlowDoor::open_after(platform.postgres.port(), SLOW_DEPENDENCY).await?;
    let slow_url = url.replace(
        &format!("127.0.0.1:{}", platform.postgres.port()),
        &format!("127.0.0.1:{}", door.port),
    );
    if slow_url == url {
        bail!("the database URL {url} does not name the server's port");
    }
    create_secret(admin, ns.name(), SECRET_DB_SLOW, &[(KEY_DB, &slow_url)]).await?;
    Ok(door)
}

/// A TCP forwarder to PostgreSQL that refuses every connection until `delay` after
/// the first one arrives, as a dependency that comes up late does.
struct SlowDoor {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowDoor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowDoor {
    async fn open_after(upstream: u16, delay: Duration) -> Result<SlowDoor> {
        let listener = TcpListener::bind(loopback0()).await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let mut opens_at: Option<Instant> = None;
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let opens = *opens_at.get_or_insert_with(|| Instant::now() + delay);
                if Instant::now() < opens {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Ok(SlowDoor { port, task })
    }
}

/// Waits until ChatService `name` has observed `generation` and is Ready (every pod
/// of that generation ready, none of an older one left).
async fn wait_rolled_out(
    api: &Api<ChatService>,
    name: &str,
    generation: i64,
) -> Result<ChatService> {
    Ok(
        wait_for(api, name, ROLLOUT_TIMEOUT, move |cs: &ChatService| {
            let observed = cs.status.as_ref().and_then(|s| s.observed_generation);
            observed >= Some(generation) && ready_now(cs)
        })
        .await?,
    )
}

/// Waits until every client has connected once.
async fn wait_connected(fleet: &Fleet) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.connections() < CLIENTS as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {CLIENTS} clients connected within 60 s: {:?}",
                fleet.connections(),
                fleet.snapshot()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// What chatgate promises its clients through any of these rollouts.
fn expect_no_failures(measured: &mut Measured) {
    let f = &measured.fleet;
    let checks = [
        ("failed upgrades", f.failed_upgrades_total()),
        ("5xx answers", f.http_5xx),
        ("1011 closes", f.closes_with(1011)),
        (
            "closes other than 1000/1001/1012/1013",
            f.unexpected_closes(),
        ),
        ("lost messages", f.lost),
        ("duplicated messages", f.duplicated),
        (
            "clients whose thread was not read back",
            f.unverified_clients,
        ),
    ];
    for (what, n) in checks {
        if n > 0 {
            measured.problems.push(format!("{n} {what}: {f:?}"));
        }
    }
    if f.messages_acknowledged == 0 {
        measured.problems.push("no message was acknowledged".into());
    }
}

/// Connections the router sent, after `since`, to a pod whose startup had not
/// completed yet (by the pod's own log line).
fn routed_before_startup(
    router: &Router,
    agent: &NodeAgent,
    namespace: &str,
    since: SystemTime,
) -> Result<usize> {
    let mut early = 0;
    for routed in router.routed().into_iter().filter(|r| r.at >= since) {
        let complete = agent
            .pod(namespace, &routed.pod)
            .and_then(|record| record.log)
            .and_then(|log| startup_completed_at(&log));
        match complete {
            Some(at) if routed.at >= at => {}
            _ => early += 1,
        }
    }
    Ok(early)
}

/// When the pod's service logged "startup complete" (its first start's log).
fn startup_completed_at(log: &std::path::Path) -> Option<SystemTime> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("startup complete; every critical service exists"))?;
    let time: Value = serde_json::from_str(line).ok()?;
    let at: Timestamp = time["time"].as_str()?.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(at.as_nanosecond().try_into().ok()?))
}

/// The names of the objects of ChatService `instance`.
async fn names<K>(api: &Api<K>, instance: &str) -> Result<BTreeSet<String>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let selector = format!("{}={instance}", meta::LABEL_INSTANCE);
    Ok(api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .map(|o| o.name_any())
        .collect())
}

/// The service image by digest: the same binary under a new reference.
fn digest_reference(platform: &Platform) -> String {
    let tagged = service_reference();
    let repository = tagged.rsplit_once(':').map_or(tagged.as_str(), |(r, _)| r);
    format!("{repository}@{}", platform.images.service.digest)
}

fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The naive Deployment's and Service's name and `app` label, and its replicas
/// (the ChatService's).
const NAIVE: &str = "naive";
const NAIVE_REPLICAS: i32 = 2;

/// The operator's pod template with its wiring taken out, as the original system
/// ran it: one always-200 probe (`/health/live`) for readiness and liveness, no
/// startup probe, no preStop, the default rolling-update strategy (25 % / 25 %) and
/// termination grace period.
fn naive_deployment(rendered: &Deployment) -> Deployment {
    let spec = rendered.spec.clone().unwrap_or_default();
    let mut template = spec.template;
    let labels = [("app".to_owned(), NAIVE.to_owned())].into_iter().collect();
    template.metadata = Some(kube::api::ObjectMeta {
        labels: Some(labels),
        ..Default::default()
    });
    if let Some(pod) = template.spec.as_mut() {
        // On the agent node, as the ChatService's own pods (the rendered template
        // was bound for nowhere).
        let placed = production_chat_service()
            .spec
            .scheduling
            .unwrap_or_default();
        pod.node_selector = Some(placed.node_selector);
        pod.tolerations = Some(placed.tolerations);
        pod.affinity = None;
        pod.termination_grace_period_seconds = None;
        for container in &mut pod.containers {
            let always_200 = container.liveness_probe.clone().map(|mut probe| {
                if let Some(get) = probe.http_get.as_mut() {
                    get.path = Some("/health/live".into());
                }
                probe
            });
            container.startup_probe = None;
            container.readiness_probe = always_200.clone();
            container.liveness_probe = always_200;
            container.lifecycle = None;
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAIVE},
        "spec": {
            "replicas": NAIVE_REPLICAS,
            "selector": {"matchLabels": {"app": NAIVE}},
            "template": template,
        },
    }))
    .expect("a valid Deployment")
}

fn naive_service() -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAIVE},
        "spec": {
            "selector": {"app": NAIVE},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }))
    .expect("a valid Service")
}

/// The operator's Deployment, once written (and changed after `previous`).
async fn rendered_deployment(
    deployments: &Api<Deployment>,
    previous: Option<i64>,
) -> Result<Deployment> {
    Ok(wait_for(
        deployments,
        "chat",
        ROLLOUT_TIMEOUT,
        move |d: &Deployment| d.metadata.generation > previous,
    )
    .await?)
}

/// Waits until the naive Deployment's rollout is complete, as `kubectl rollout
/// status` judges it: its pods are all of the new version and ready, and no old
/// pod is left.
async fn wait_naive_rolled_out(deployments: &Api<Deployment>, within: Duration) -> Result<()> {
    let rolled_out = deployment_ready(NAIVE_REPLICAS);
    wait_for(deployments, NAIVE, within, move |d: &Deployment| {
        rolled_out(d) && d.status.as_ref().and_then(|s| s.replicas) == Some(NAIVE_REPLICAS)
    })
    .await?;
    Ok(())
}

/// One cell of a table row, from one run's measurements.
type Cell = fn(&Measured) -> String;

/// One scenario's table: chatgate and, when run, the naive Deployment side by side.
fn table(scenario: Scenario, chatgate: &Measured, naive: Option<&Measured>) -> String {
    let mut out = format!("\n### {}\n\n", scenario.title());
    let header = match naive {
        Some(_) => "| | chatgate | naive Deployment |\n| --- | ---: | ---: |\n",
        None => "| | chatgate |\n| --- | ---: |\n",
    };
    out.push_str(header);
    let rows: Vec<(&str, Cell)> = vec![
        ("clients", |m| m.fleet.clients.to_string()),
        ("connections (upgrades that succeeded)", |m| {
            m.fleet.connections.to_string()
        }),
        ("messages acknowledged", |m| {
            m.fleet.messages_acknowledged.to_string()
        }),
        ("messages answered", |m| {
            m.fleet.messages_completed.to_string()
        }),
        ("**failed upgrades**", |m| {
            kinds(m.fleet.failed_upgrades_total(), &m.fleet.failed_upgrades)
        }),
        ("**5xx answers**", |m| m.fleet.http_5xx.to_string()),
        ("**1011 closes**", |m| m.fleet.closes_with(1011).to_string()),
        ("**lost messages**", |m| m.fleet.lost.to_string()),
        ("**duplicated messages**", |m| {
            m.fleet.duplicated.to_string()
        }),
        ("sockets moved by a drain (1012)", |m| {
            m.fleet.closes_with(1012).to_string()
        }),
        ("other closes", |m| other_closes(&m.fleet)),
        ("errors sent to clients", |m| error_kinds(&m.fleet)),
        ("upgrade success", |m| {
            percent(
                m.fleet.connections,
                m.fleet.connections + m.fleet.failed_upgrades_total(),
            )
        }),
        ("connections routed to a pod still starting", |m| {
            m.routed_before_startup.to_string()
        }),
        ("connections refused for want of a ready pod", |m| {
            m.router_no_endpoint.to_string()
        }),
        ("time to ready", |m| seconds(m.time_to_ready)),
        ("time to `Stalled`", |m| seconds(m.time_to_stalled)),
        ("`/ws` upgrades Prometheus scraped", |m| match m.change_at {
            Some(_) => format!("{:.0}", m.scraped_upgrades),
            None => "—".into(),
        }),
        ("alerts fired (after the change)", |m| {
            alert_timeline(m, true)
        }),
        ("alerts pending, not fired", |m| alert_timeline(m, false)),
    ];
    for (name, cell) in rows {
        let _ = write!(out, "| {name} | {} |", cell(chatgate));
        if let Some(naive) = naive {
            let _ = write!(out, " {} |", cell(naive));
        }
        out.push('\n');
    }
    out
}

/// The alerts that fired (`fired`), or went pending and never fired, each with when
/// after the change it happened and, for fired ones, when it resolved.
fn alert_timeline(m: &Measured, fired: bool) -> String {
    let Some(start) = m.change_at else {
        return "—".into();
    };
    let after = |at: SystemTime| {
        let s = at
            .duration_since(start)
            .map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64());
        format!("{s:+.0} s")
    };
    let names: BTreeSet<&str> = m.alerts.iter().map(|c| c.alert.as_str()).collect();
    let mut out = Vec::new();
    for name in names {
        let changes: Vec<&AlertChange> = m.alerts.iter().filter(|c| c.alert == name).collect();
        let firing = changes.iter().find(|c| c.state == "firing");
        match (fired, firing) {
            (true, Some(f)) => {
                let resolved = changes
                    .iter()
                    .find(|c| c.state == "inactive" && c.at > f.at)
                    .map(|c| format!(", resolved {}", after(c.at)))
                    .unwrap_or_default();
                out.push(format!("{name} {}{resolved}", after(f.at)));
            }
            (false, None) => {
                if let Some(p) = changes.iter().find(|c| c.state == "pending") {
                    out.push(format!("{name} {}", after(p.at)));
                }
            }
            _ => {}
        }
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join("; ")
    }
}

fn kinds(total: u64, by_kind: &std::collections::BTreeMap<String, u64>) -> String {
    if total == 0 {
        return "0".into();
    }
    let parts: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!("{total} ({})", parts.join(", "))
}

fn other_closes(report: &FleetReport) -> String {
    let parts: Vec<String> = report
        .closes
        .iter()
        .filter(|(code, _)| ![1000, 1011, 1012].contains(*code))
        .map(|(code, n)| format!("{code}: {n}"))
        .collect();
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join(", ")
    }
}

fn error_kinds(report: &FleetReport) -> String {
    if report.errors.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = report
        .errors
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    parts.join(", ")
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "—".into();
    }
    format!("{:.2} %", part as f64 * 100.0 / whole as f64)
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

/// Prints the tables and writes them to `target/e2e/rollout.md`.
fn publish(tables: &str) -> Result<()> {
    let report =
        format!("## Rollouts as clients see them ({CLIENTS} clients through the router)\n{tables}");
    eprintln!("{report}");
    let dir = workspace_root().join("target/e2e");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("rollout.md"), &report)?;
    Ok(())
}
