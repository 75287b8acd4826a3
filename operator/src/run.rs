//! Running the operator: the watches and their caches, the controller, leader
//! election on a Lease, and the operator's own `/healthz`, `/readyz` and `/metrics`.
//!
//! Only the leader runs the controller (and so only the leader writes). A standby
//! instance holds no watches; it is alive and ready — ready means "fit to take over",
//! so a rollout of the operator's own Deployment never waits on the lease.

use crate::apply::Stores;
use crate::controller::{self, Clock, Context};
use crate::crd::ChatService;
use crate::meta::{CONTROLLER_NAME, managed_selector};
use crate::metrics::Metrics;
use crate::watches;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// Name of the Lease the instances compete for.
pub const LEASE_NAME: &str = "chatgate-operator";

/// How the operator runs.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Watch only these namespaces, separated by commas (default: every namespace).
    /// Scoped, the operator needs no cluster-wide permission at all.
    #[arg(long, env = "CHATGATE_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`; empty to serve none.
    #[arg(long, env = "CHATGATE_OPERATOR_HTTP", default_value = "0.0.0.0:8081")]
    pub http: String,
    /// Seconds between reconciles of an unchanged ChatService.
    #[arg(long, default_value_t = 300)]
    pub resync_seconds: u64,
    /// Elect a leader on a Lease so several replicas are safe.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the Lease (default: `--namespace`, else the pod's namespace from
    /// `POD_NAMESPACE`, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds a leader's lease is valid without renewal; a standby takes over after that.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds before expiry at which the leader renews.
    #[arg(long, default_value_t = 5)]
    pub lease_grace_seconds: u64,
    /// This instance's identity on the Lease and on Events (default: the pod name from
    /// `POD_NAME`, else the host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Reconciles running at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: None,
            http: "0.0.0.0:8081".into(),
            resync_seconds: 300,
            leader_election: true,
            lease_namespace: None,
            lease_duration_seconds: 15,
            lease_grace_seconds: 5,
            identity: None,
            concurrency: 16,
        }
    }
}

impl Options {
    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "chatgate-operator".into());
            format!("{}-{}", host.trim(), std::process::id())
        })
    }

    fn lease_namespace(&self) -> String {
        self.lease_namespace
            .clone()
            .or_else(|| self.namespaces().into_iter().next())
            .unwrap_or_else(|| "default".into())
    }

    /// The namespaces `--namespace` names, in order, without blanks or repeats; empty
    /// means every namespace.
    pub fn namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for ns in self.namespace.iter().flat_map(|n| n.split(',')) {
            let ns = ns.trim();
            if !ns.is_empty() && !out.iter().any(|o| o == ns) {
                out.push(ns.to_owned());
            }
        }
        out
    }
}

/// What the HTTP endpoints and tests can see of a running operator.
#[derive(Default)]
pub struct Health {
    /// This instance holds the lease (always true without leader election).
    pub leader: AtomicBool,
    /// The controller's watches have listed everything at least once.
    pub synced: AtomicBool,
    /// The operator cannot work any more (lease or controller loop died).
    pub failed: AtomicBool,
    /// Shutting down: not ready any more.
    pub stopping: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Namespace scopes whose watches have listed (the caches are synced when all have).
    synced_scopes: std::sync::atomic::AtomicUsize,
    /// The watch being waited for before the caches count as synced (diagnostics).
    pub pending: std::sync::Mutex<&'static str>,
    /// Asks the running controller to reconcile every ChatService now.
    resync: Notify,
}

impl Health {
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Ready: not stopping, and either a standby or a leader whose caches are synced.
    pub fn is_ready(&self) -> (bool, &'static str) {
        if self.failed.load(Ordering::SeqCst) {
            (false, "failed")
        } else if self.stopping.load(Ordering::SeqCst) {
            (false, "stopping")
        } else if !self.is_leader() {
            (true, "standby: not the leader")
        } else if self.synced.load(Ordering::SeqCst) {
            (true, "leader: watches synced")
        } else {
            (false, "leader: watches not synced yet")
        }
    }

    /// The kind whose watch has not listed yet ("" when synced or not leading).
    pub fn pending_watch(&self) -> &'static str {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reconcile every ChatService now (a forced resync; used by tests and the benchmark).
    pub fn resync(&self) {
        self.resync.notify_one();
    }
}

/// Aborts the task when dropped, so a dropped (or aborted) operator takes its
/// background tasks with it.
struct AbortOnDrop<T>(Option<JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    fn new(task: JoinHandle<T>) -> Self {
        AbortOnDrop(Some(task))
    }

    /// The task, no longer aborted on drop.
    fn into_inner(mut self) -> Option<JoinHandle<T>> {
        self.0.take()
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// How long one watch request lasts before the API server ends it and the watcher
/// resumes from its last resource version. Short, so that traffic (an event, a
/// bookmark, or the end) arrives well within [`API_READ_TIMEOUT`] on a healthy watch.
const WATCH_TIMEOUT_SECONDS: u32 = 40;
/// The longest the operator waits for the API server to send anything on a request.
/// kube-client sets no read timeout, and the watcher's idle timeout starts only once
/// a watch's response has begun: a watch request the API server accepts and never
/// answers (as one may while its watch cache initializes after a restart) would
/// otherwise stop that watch for good, silently.
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(55);

/// The controller's backoff over all its watches together: none, because each watch
/// already backs off on its own (`default_backoff`). A shared one pauses every watch
/// while any one fails: after an API server restart many fail at once, the shared
/// pause grew past a minute, again and again, and the status stopped following the
/// Deployments (`tests/tests/faults.rs`).
struct EachWatchBacksOffAlone;

impl Iterator for EachWatchBacksOffAlone {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for EachWatchBacksOffAlone {
    fn reset(&mut self) {}
}

/// The watch parameters every watch of the operator uses.
fn watch_config() -> watcher::Config {
    watcher::Config::default()
        .any_semantic()
        .timeout(WATCH_TIMEOUT_SECONDS)
}

/// The operator's API client: `config` with a read timeout, so that no request,
/// a watch's start included, can wait forever for an API server that never answers.
pub fn api_client(mut config: kube::Config) -> anyhow::Result<Client> {
    config.read_timeout = Some(API_READ_TIMEOUT);
    // The timeout counts from the request, not from when a pooled connection last
    // carried something.
    config.reset_reader_on_write = true;
    Ok(Client::try_from(config)?)
}

/// A watch of managed `K` objects, cached in a store, as a stream of changed objects.
fn cached<K>(
    api: Api<K>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let config = watch_config().labels(&managed_selector());
    let stream = reflector::reflector(
        writer,
        watcher(api, config).default_backoff().modify(|o| {
            // Managed fields are never read; dropping them keeps the caches small.
            o.managed_fields_mut().clear();
        }),
    )
    .touched_objects();
    (reader, stream)
}

/// Resolves to true once `store`'s watch has listed everything, false if the watch
/// ended first.
fn ready<K>(store: &Store<K>) -> BoxFuture<'static, bool>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let store = store.clone();
    async move { store.wait_until_ready().await.is_ok() }.boxed()
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `stop` resolves: one per watched namespace when scoped
/// (a watch covers one namespace or all of them; scoped, no request is cluster-wide),
/// one for every namespace otherwise. Sets `health.synced` once every watch has listed.
pub async fn run_controller(
    client: Client,
    options: &Options,
    health: Arc<Health>,
    clock: Clock,
    stop: impl Future<Output = ()> + Send,
) {
    let namespaces = options.namespaces();
    let scopes: Vec<Option<&str>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    health.synced_scopes.store(0, Ordering::SeqCst);
    let all = futures::future::join_all(scopes.iter().map(|scope| {
        run_scope(
            client.clone(),
            *scope,
            &scopes,
            options,
            health.clone(),
            clock.clone(),
        )
    }));
    // Dropping the controllers stops them at once: a reconcile cut short is repeated
    // by the next leader, and every write is idempotent.
    tokio::select! {
        _ = all => {}
        _ = stop => {}
    }
    health.synced.store(false, Ordering::SeqCst);
    health.synced_scopes.store(0, Ordering::SeqCst);
}

/// The controller of one scope (a namespace, or all of them with `None`); `scopes` are
/// all the scopes running, whose ChatServices may be baselines for this one's.
async fn run_scope(
    client: Client,
    ns: Option<&str>,
    scopes: &[Option<&str>],
    options: &Options,
    health: Arc<Health>,
    clock: Clock,
) {
    let (config_maps, cm_stream) = cached::<ConfigMap>(api(&client, ns));
    let (deployments, deploy_stream) = cached::<Deployment>(api(&client, ns));
    let (services, svc_stream) = cached::<Service>(api(&client, ns));
    let (pod_disruption_budgets, pdb_stream) = cached::<PodDisruptionBudget>(api(&client, ns));
    let (pods, pod_stream) = cached::<Pod>(api(&client, ns));
    let stores = Stores {
        config_maps,
        deployments,
        services,
        pod_disruption_budgets,
        pods,
    };

    // The ChatService watch is built here rather than by `Controller::new` so that
    // readiness can observe its first complete list on the stream itself. Waiting on
    // the controller's store (`Store::wait_until_ready`) instead never returns: the
    // controller waits on the same one-shot, which keeps only the last waiter's waker.
    let (cs_store, cs_writer) = reflector::store();
    let (listed_tx, listed) = watch::channel(false);
    let written = Arc::new(controller::WrittenStatuses::default());
    let chat_services = reflector::reflector(
        cs_writer,
        watcher(api::<ChatService>(&client, ns), watch_config()).default_backoff(),
    )
    .inspect({
        let metrics = health.metrics.clone();
        let written = written.clone();
        move |event| match event {
            Ok(watcher::Event::InitDone) => {
                listed_tx.send_replace(true);
            }
            Ok(watcher::Event::Apply(cs) | watcher::Event::InitApply(cs)) => {
                written.seen(cs);
            }
            Ok(watcher::Event::Delete(cs)) => {
                written.forget(cs);
                metrics.forget_chatservice(&cs.namespace().unwrap_or_default(), &cs.name_any());
            }
            _ => {}
        }
    })
    .applied_objects()
    // A change of status alone is the operator's own write (or a stale copy of it):
    // reconciling it again costs a round of reads and decides nothing new.
    // Everything the operator reads of a ChatService is its spec (the generation),
    // labels and annotations; a status edited by hand is put right on the next
    // event or resync.
    .predicate_filter(
        predicates::generation
            .combine(predicates::labels)
            .combine(predicates::annotations),
        PredicateConfig::default(),
    );
    let controller = Controller::for_stream(chat_services, cs_store.clone());

    // Referenced objects, mapped back to the ChatServices that use them. Secrets are
    // watched as metadata only: their values never enter the operator's memory.
    let secrets = watcher(
        api::<PartialObjectMeta<Secret>>(&client, ns),
        watch_config(),
    )
    .default_backoff()
    .touched_objects();
    let referenced_config_maps = watcher(
        api::<PartialObjectMeta<ConfigMap>>(&client, ns),
        watch_config(),
    )
    .default_backoff()
    .touched_objects();
    // Baselines may live in other namespaces: watched in every scope the operator
    // runs (never beyond them, so a scoped operator makes no cluster-wide request).
    // Only changes are needed (the mapper finds the ChatServices comparing with
    // one), so no second cache of ChatServices is kept.
    let baselines = futures::stream::select_all(scopes.iter().map(|scope| {
        watcher(api::<ChatService>(&client, *scope), watch_config())
            .default_backoff()
            .touched_objects()
            .boxed()
    }));

    let ready_stores = stores.clone();
    let ready_health = health.clone();
    let scope_count = scopes.len();
    let _sync = AbortOnDrop::new(tokio::spawn(async move {
        let s = &ready_stores;
        // Each store below has this task as its only waiter (see above for why that
        // matters). A `false` means the watch is gone: the controller is stopping.
        let waits: [(&str, BoxFuture<'static, bool>); 6] = [
            (
                "chatservices",
                async move {
                    let mut listed = listed;
                    listed.wait_for(|l| *l).await.is_ok()
                }
                .boxed(),
            ),
            ("configmaps", ready(&s.config_maps)),
            ("deployments", ready(&s.deployments)),
            ("services", ready(&s.services)),
            ("poddisruptionbudgets", ready(&s.pod_disruption_budgets)),
            ("pods", ready(&s.pods)),
        ];
        for (kind, wait) in waits {
            *ready_health
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = kind;
            if !wait.await {
                return;
            }
        }
        let listed = ready_health.synced_scopes.fetch_add(1, Ordering::SeqCst) + 1;
        if listed < scope_count {
            return;
        }
        *ready_health
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = "";
        ready_health.synced.store(true, Ordering::SeqCst);
        info!("watches synced");
    }));

    let resync_health = health.clone();
    let resync = futures::stream::unfold(resync_health, |h| async move {
        h.resync.notified().await;
        Some(((), h))
    });

    let reporter = Reporter {
        controller: CONTROLLER_NAME.into(),
        instance: Some(options.identity()),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        stores: stores.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics: health.metrics.clone(),
        clock,
        resync: Duration::from_secs(options.resync_seconds.max(1)),
        failures: Default::default(),
        written,
        watched_namespaces: scopes
            .iter()
            .map(|scope| scope.map(str::to_owned))
            .collect(),
    });

    let (s1, s2, s3) = (cs_store.clone(), cs_store.clone(), cs_store.clone());
    let running = controller
        .with_config(kube::runtime::controller::Config::default().concurrency(options.concurrency))
        .trigger_backoff(EachWatchBacksOffAlone)
        .owns_stream(cm_stream)
        .owns_stream(deploy_stream)
        .owns_stream(svc_stream)
        .owns_stream(pdb_stream)
        .watches_stream(pod_stream, |pod: Pod| {
            crate::meta::owner_name(pod.metadata.labels.as_ref())
                .zip(pod.namespace())
                .map(|(name, ns)| ObjectRef::<ChatService>::new(name).within(&ns))
        })
        .watches_stream(secrets, move |s| {
            watches::chatservices_using_secret(&s1, &s)
        })
        .watches_stream(referenced_config_maps, move |c| {
            watches::chatservices_using_config_map(&s2, &c)
        })
        .watches_stream(baselines, move |b| {
            watches::chatservices_comparing_with(&s3, &b)
        })
        .reconcile_all_on(resync)
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|result| {
            let metrics = health.metrics.clone();
            async move {
                match result {
                    Err(kube::runtime::controller::Error::QueueError(e)) => {
                        watch_failed(&metrics, &e);
                    }
                    Err(e) => tracing::debug!(error = %e, "reconcile trigger"),
                    Ok(_) => {}
                }
            }
        });
    running.await;
}

/// Holding the Lease, judged by its own record. kube-lease-manager keeps reporting
/// "leader" while it cannot reach the API server, for as long as that lasts; past
/// the Lease's expiry a standby may take over, and two instances would reconcile at
/// once. So, like client-go's renew deadline, the leader reads its Lease every
/// `every` and steps down once the last renewal it can see is `max_age` old
/// (duration minus half the grace: before a standby may take over), then leads again
/// only once a fresh renewal shows. An answer alone proves nothing: with etcd down
/// the API server still answers reads from its cache, so the renewal time is what
/// counts (written by this process's lease manager, so read against its own clock).
#[derive(Clone, Copy)]
struct Renewal {
    every: Duration,
    max_age: Duration,
}

impl Renewal {
    /// How much longer this instance's lease stays fresh, if the API server shows it
    /// held by `identity`; `None` when it shows another holder, no renewal, or cannot
    /// be read.
    /// A read that takes longer than `every` (as one does while etcd is down) counts
    /// as no answer.
    async fn fresh_for(&self, leases: &Api<Lease>, identity: &str) -> Option<Duration> {
        let read = tokio::time::timeout(self.every, leases.get_opt(LEASE_NAME));
        let lease = read.await.ok()?.ok()??;
        let spec = lease.spec?;
        if spec.holder_identity.as_deref() != Some(identity) {
            return None;
        }
        let renewed = spec.renew_time?.0;
        let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed);
        let age = Duration::try_from(age).unwrap_or(Duration::ZERO);
        self.max_age.checked_sub(age).filter(|left| !left.is_zero())
    }

    /// Waits until a fresh renewal by `identity` shows: true, or false if `stopped`
    /// came first.
    async fn confirm(
        &self,
        leases: &Api<Lease>,
        identity: &str,
        stopped: impl Future<Output = ()>,
    ) -> bool {
        let confirmed = async {
            while self.fresh_for(leases, identity).await.is_none() {
                tokio::time::sleep(self.every).await;
            }
        };
        tokio::select! {
            () = confirmed => true,
            () = stopped => false,
        }
    }

    /// Resolves once no fresh renewal has shown for `max_age`: the Lease may be
    /// about to expire.
    async fn missed(self, leases: Api<Lease>, identity: String) {
        let mut fresh_until = tokio::time::Instant::now() + self.max_age;
        loop {
            tokio::time::sleep(self.every).await;
            if let Some(left) = self.fresh_for(&leases, &identity).await {
                fresh_until = tokio::time::Instant::now() + left;
            } else if tokio::time::Instant::now() >= fresh_until {
                return;
            }
        }
    }
}

/// Counts and logs a failed watch. Each watch retries on its own with backoff; an
/// expired one (410 Gone) lists everything again, so nothing it missed is lost.
fn watch_failed(metrics: &Metrics, error: &watcher::Error) {
    let code = watch_error_code(error);
    metrics.watch_failed(&code);
    if code == "410" {
        info!(error = %error, "a watch expired (410 Gone): listing again");
    } else {
        warn!(error = %error, code, "a watch failed; retrying with backoff");
    }
}

/// The HTTP status a failed watch request was answered with, or `transport`.
fn watch_error_code(error: &watcher::Error) -> String {
    match error {
        watcher::Error::WatchError(status) => status.code.to_string(),
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => status.code.to_string(),
            _ => "transport".to_owned(),
        },
        _ => "transport".to_owned(),
    }
}

/// Runs the operator until `shutdown` resolves: HTTP endpoints, leader election and,
/// while leading, the controller.
pub async fn run(
    client: Client,
    options: Options,
    health: Arc<Health>,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _http = if options.http.is_empty() {
        None
    } else {
        let addr: SocketAddr = options
            .http
            .parse()
            .map_err(|e| anyhow::anyhow!("--http {}: {e}", options.http))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
        info!(%addr, "serving /healthz, /readyz and /metrics");
        Some(AbortOnDrop::new(tokio::spawn(serve(
            listener,
            health.clone(),
        ))))
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let _shutdown = AbortOnDrop::new(tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    }));
    let stop_check = stop_rx.clone();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    if !options.leader_election {
        health.leader.store(true, Ordering::SeqCst);
        health.metrics.leader.set(1);
        run_controller(client, &options, health.clone(), clock, stopped()).await;
        health.stopping.store(true, Ordering::SeqCst);
        return Ok(());
    }

    let identity = options.identity();
    let duration = options.lease_duration_seconds.max(2);
    let grace = options.lease_grace_seconds.clamp(1, duration - 1);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &options.lease_namespace());
    let renewal = Renewal {
        every: Duration::from_secs(grace).div_f32(2.0),
        max_age: Duration::from_secs(duration) - Duration::from_secs(grace).div_f32(2.0),
    };
    let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(options.lease_namespace())
        .with_identity(identity.clone())
        .with_duration(duration)
        .with_grace(grace)
        .with_field_manager(lease_field_manager(&identity))
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    let lease_task = AbortOnDrop::new(task);
    info!(%identity, "waiting for the leader lease");
    loop {
        // Standby until this instance holds the lease.
        tokio::select! {
            changed = leading.wait_for(|l| *l) => {
                if changed.is_err() {
                    health.failed.store(true, Ordering::SeqCst);
                    error!("the lease manager stopped");
                    break;
                }
            }
            _ = stopped() => break,
        }
        // The lease manager also says "leader" while it cannot reach the API server:
        // confirm with the Lease itself before leading.
        if !renewal.confirm(&leases, &identity, stopped()).await {
            break;
        }
        info!(%identity, "leading: starting the controller");
        health.leader.store(true, Ordering::SeqCst);
        health.metrics.leader.set(1);
        let mut lost = leading.clone();
        let lost_or_stopped = {
            let stopped = stopped();
            let missed = renewal.missed(leases.clone(), identity.clone());
            async move {
                tokio::select! {
                    _ = lost.wait_for(|l| !*l) => {}
                    _ = missed => warn!("the Lease could not be confirmed within the renew deadline: stepping down"),
                    _ = stopped => {}
                }
            }
        };
        run_controller(
            client.clone(),
            &options,
            health.clone(),
            clock.clone(),
            lost_or_stopped,
        )
        .await;
        health.leader.store(false, Ordering::SeqCst);
        health.metrics.leader.set(0);
        health.metrics.forget_all_chatservices();
        if *stop_check.borrow() {
            break;
        }
        warn!(%identity, "lost the lease: controller stopped, back to standby");
    }
    health.stopping.store(true, Ordering::SeqCst);
    // Closing the channel makes the lease manager release the lease, so a standby
    // takes over at once instead of after the lease expires.
    drop(leading);
    let released = match lease_task.into_inner() {
        Some(task) => tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_ok(),
        None => true,
    };
    if !released {
        warn!("the lease was not released in time; a standby takes over when it expires");
    }
    Ok(())
}

/// The field manager an instance acquires the Lease with. It must differ per
/// instance: the lease manager takes an orphaned Lease with a server-side apply, and
/// only a *different* manager owning `holderIdentity` makes a competing apply fail
/// with a conflict. One shared name let two instances both "acquire" the Lease.
pub fn lease_field_manager(identity: &str) -> String {
    // The API server caps field manager names at 128 bytes.
    crate::conditions::truncate(&format!("{CONTROLLER_NAME}-lease-{identity}"), 128)
}

async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    if let Err(e) = axum::serve(listener, app).await {
        error!(error = %e, "the HTTP server stopped");
    }
}

/// Live: the process and its runtime answer, and nothing it depends on has died.
async fn healthz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.failed.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "failed: the lease manager or controller stopped\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    let (ready, why) = h.is_ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{why}\n"))
}

async fn metrics(
    State(h): State<Arc<Health>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::{Metrics, Options, lease_field_manager, watch_error_code, watcher};

    #[test]
    fn an_expired_watch_is_told_apart_from_other_watch_failures() {
        let gone = kube::core::Status {
            code: 410,
            message: "too old resource version: 5 (9)".into(),
            ..Default::default()
        };
        assert_eq!(
            watch_error_code(&watcher::Error::WatchError(Box::new(gone.clone()))),
            "410"
        );
        assert_eq!(
            watch_error_code(&watcher::Error::WatchStartFailed(kube::Error::Api(
                Box::new(gone)
            ))),
            "410"
        );
        assert_eq!(
            watch_error_code(&watcher::Error::NoResourceVersion),
            "transport"
        );
        let metrics = Metrics::default();
        metrics.watch_failed("410");
        assert_eq!(metrics.watch_errors_with("410"), 1);
        assert!(
            metrics
                .encode()
                .contains("chatgate_operator_watch_errors_total{code=\"410\"} 1")
        );
    }

    #[test]
    fn each_instance_acquires_the_lease_under_its_own_field_manager() {
        let a = lease_field_manager("chatgate-operator-7d9f-abcde");
        let b = lease_field_manager("chatgate-operator-7d9f-fghij");
        assert_ne!(a, b);
        assert_eq!(a, "chatgate-operator-lease-chatgate-operator-7d9f-abcde");
        assert!(lease_field_manager(&"é".repeat(100)).len() <= 128);
    }

    #[test]
    fn namespaces_are_a_comma_separated_list_without_blanks_or_repeats() {
        let with = |ns: Option<&str>| Options {
            namespace: ns.map(str::to_owned),
            ..Options::default()
        };
        assert!(with(None).namespaces().is_empty());
        assert!(with(Some(" , ")).namespaces().is_empty());
        assert_eq!(with(Some("a")).namespaces(), ["a"]);
        assert_eq!(with(Some("b, a,,b ")).namespaces(), ["b", "a"]);
        // The Lease lives in the first watched namespace unless told otherwise.
        assert_eq!(with(Some("b, a")).lease_namespace(), "b");
        assert_eq!(with(None).lease_namespace(), "default");
    }
}
