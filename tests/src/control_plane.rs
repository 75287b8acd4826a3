//! A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC,
//! PodSecurity admission, client-certificate users), kube-controller-manager,
//! kube-scheduler, and kwok simulating the kubelets of a few fake nodes.
//!
//! A test binary shares one through [`ControlPlane::shared`]; `make cluster` and
//! `make run` own one through [`ControlPlane::start`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, PostParams};
use kube::config::{
    AuthInfo, Cluster, Context as KubeContext, KubeConfigOptions, Kubeconfig, NamedAuthInfo,
    NamedCluster, NamedContext,
};
use kube::{Client, Config};

use crate::bins::{self, K8S_VERSION};
use crate::pki::{CertificateAuthority, ServiceAccountKey};
use crate::process::{ManagedProcess, free_loopback_ports};
use crate::wait::{WaitError, wait_for, wait_until};

/// The annotation kwok selects its nodes by; nodes without it are left alone (for
/// a future [`crate::node_agent::NodeAgent`]).
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// The value of [`KWOK_NODE_ANNOTATION`] on kwok's nodes.
pub const KWOK_NODE_ANNOTATION_VALUE: &str = "fake";
/// The label every kwok node carries (`type: kwok`), for node selectors in tests.
pub const KWOK_NODE_LABEL: (&str, &str) = ("type", "kwok");
/// The admin user's name; its certificate is in group `system:masters`.
pub const ADMIN_USER: &str = "chatgate-admin";
/// The names [`ControlPlane::stop_process`] and [`ControlPlane::start_process`] take.
pub const ETCD: &str = "etcd";
pub const KUBE_APISERVER: &str = "kube-apiserver";

/// The API server may take a while on two busy cores; one failed start is retried.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: usize = 2;
/// kube-controller-manager's client rate limit: requests per second, and burst. kwok
/// needs none raised: its client has no rate limiter.
const KCM_API_QPS: u32 = 400;
const KCM_API_BURST: u32 = 800;
/// How many log lines per process a failure report shows.
const LOG_TAIL_LINES: usize = 25;
/// Prefix of the per-start working directory under the system temp dir.
const DIR_PREFIX: &str = "chatgate-cp-";

/// What to start.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// How many kwok-managed nodes to create (named `kwok-node-0`, `kwok-node-1`, ...).
    pub fake_nodes: usize,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self { fake_nodes: 2 }
    }
}

/// A running control plane. Dropping it stops every process it started and
/// removes its working directory.
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    kubeconfig_path: PathBuf,
    server: String,
    etcd_port: u16,
    ca: CertificateAuthority,
    admin_config: Config,
    fake_nodes: Vec<String>,
    /// In start order; stopped in reverse.
    processes: Mutex<Vec<ManagedProcess>>,
    started_in: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("kubeconfig", &self.kubeconfig_path)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// The control plane this test binary shares: started by the first test that
    /// asks (building the binaries first if needed), stopped when the binary exits.
    ///
    /// # Panics
    /// When it cannot start; the message carries the tail of every process's log.
    pub async fn shared() -> &'static ControlPlane {
        match shared::get().await {
            Ok(cp) => cp,
            Err(e) => panic!("the shared control plane failed to start:\n{e}"),
        }
    }

    /// Starts a control plane owned by the caller. Builds the binaries first if the
    /// cache lacks them, and retries the whole start once.
    pub async fn start(options: ControlPlaneOptions) -> Result<ControlPlane> {
        let bin_dir = tokio::task::spawn_blocking(bins::ensure_binaries)
            .await
            .context("building the Kubernetes binaries")??;
        remove_stale_dirs();
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(&options, &bin_dir).await {
                Ok(cp) => return Ok(cp),
                Err(e) => {
                    crate::progress(&format!(
                        "control plane start attempt {attempt}/{START_ATTEMPTS} failed: {e:#}"
                    ));
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    async fn start_once(options: &ControlPlaneOptions, bin_dir: &Path) -> Result<ControlPlane> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the control plane's working directory")?
            .keep();
        let mut starting = Starting {
            dir: dir.clone(),
            processes: Vec::new(),
            handed_over: false,
        };
        let result = starting.run(options, bin_dir).await;
        match result {
            Ok(ready) => {
                starting.handed_over = true;
                Ok(ControlPlane {
                    dir,
                    bin_dir: bin_dir.to_owned(),
                    kubeconfig_path: ready.kubeconfig_path,
                    server: ready.server,
                    etcd_port: ready.etcd_port,
                    ca: ready.ca,
                    admin_config: ready.admin_config,
                    fake_nodes: ready.fake_nodes,
                    processes: Mutex::new(std::mem::take(&mut starting.processes)),
                    started_in: started.elapsed(),
                })
            }
            Err(e) => {
                let logs = logs_report(&starting.processes, LOG_TAIL_LINES);
                // `starting` drops after this: processes killed, directory removed.
                Err(anyhow!("{e:#}\n{logs}"))
            }
        }
    }

    /// The kubeconfig (admin user) that kubectl, helm and kube-rs share.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// Where etcd, kube-apiserver, kubectl, helm, ... are.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// This control plane's working directory (certificates, logs, data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The names of the kwok-managed nodes.
    pub fn fake_nodes(&self) -> &[String] {
        &self.fake_nodes
    }

    /// How long the start took, binaries already built.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The cluster CA certificate (PEM), for anything that must trust the API server.
    pub fn ca_cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The admin's client configuration (group `system:masters`).
    pub fn admin_config(&self) -> Config {
        self.admin_config.clone()
    }

    /// A client authenticated as the admin. A `kube::Client` belongs to the Tokio
    /// runtime that made it, so each test makes its own: call this inside the test.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn client(&self) -> Client {
        Client::try_from(self.admin_config()).expect("an admin client from a valid config")
    }

    /// A client authenticated by a client certificate for `user` in `groups`
    /// (at most two groups), signed by the cluster CA. RBAC sees exactly this user.
    pub fn client_as(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let cert = self.ca.issue_client(user, groups)?;
        let auth: AuthInfo = serde_json::from_value(serde_json::json!({
            "client-certificate-data": BASE64.encode(&cert.cert_pem),
            "client-key-data": BASE64.encode(&cert.key_pem),
        }))?;
        let mut config = self.admin_config();
        config.auth_info = auth;
        Ok(Client::try_from(config)?)
    }

    /// A client acting as service account `namespace/name` with its groups, by
    /// the admin impersonating it; RBAC evaluates the service account's bindings
    /// exactly as for its own token. The account need not exist.
    pub fn client_as_service_account(&self, namespace: &str, name: &str) -> Client {
        let mut config = self.admin_config();
        config.auth_info.impersonate = Some(service_account_user(namespace, name));
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".to_owned(),
        ]);
        Client::try_from(config).expect("an impersonating client from a valid config")
    }

    /// A client using a bearer token, e.g. one from [`Self::service_account_token`].
    pub fn client_with_token(&self, token: &str) -> Result<Client> {
        let auth: AuthInfo = serde_json::from_value(serde_json::json!({ "token": token }))?;
        let mut config = self.admin_config();
        config.auth_info = auth;
        Ok(Client::try_from(config)?)
    }

    /// A real token for an existing service account, from the TokenRequest API.
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| {
                format!("requesting a token for service account {namespace}/{name}")
            })?;
        answer.status.map(|s| s.token).ok_or_else(|| {
            anyhow!("the token request for {namespace}/{name} came back without a token")
        })
    }

    /// `kubectl` from the cache, with `KUBECONFIG` set to this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig_path);
        cmd
    }

    /// `helm` from the cache, with `KUBECONFIG` set and its cache, config and data
    /// directories inside this control plane's directory, so a test never reads or
    /// writes the user's own helm state.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("helm"));
        let home = self.dir.join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig_path)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// The last lines of every process's log, one section per process.
    pub fn logs(&self, lines: usize) -> String {
        logs_report(&self.lock_processes(), lines)
    }

    /// Prints [`Self::logs`] to stderr.
    pub fn dump_logs(&self) {
        eprintln!("{}", self.logs(LOG_TAIL_LINES));
    }

    /// Stops every process (kwok first, etcd last) with a short grace period each,
    /// and removes the working directory. Also what dropping does.
    pub fn stop(&self) {
        let mut processes = self.lock_processes();
        while let Some(mut p) = processes.pop() {
            p.stop(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Kills every process at once and removes the working directory: for exit
    /// paths that cannot wait.
    pub(crate) fn kill_now(&self) {
        let mut processes = self.lock_processes();
        while let Some(mut p) = processes.pop() {
            p.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Stops one component (SIGTERM, then SIGKILL after `grace`), leaving the others
    /// running and its data in place: a fault, for tests that prove what survives it.
    pub fn stop_process(&self, name: &str, grace: Duration) -> Result<()> {
        self.with_process(name, |p| {
            p.stop(grace);
            Ok(())
        })
    }

    /// Starts a component stopped by [`Self::stop_process`] again, as it first ran
    /// (same ports, data and certificates), and waits until the API server answers
    /// `/readyz` again.
    pub async fn start_process(&self, name: &str) -> Result<()> {
        self.with_process(name, ManagedProcess::start_again)?;
        let etcd_port = self.etcd_port;
        wait_until(READY_TIMEOUT, "etcd /health to answer 200", || async move {
            Ok(http_get_ok(etcd_port, "/health").await.then_some(()))
        })
        .await?;
        let probe = self.client();
        wait_until(
            READY_TIMEOUT,
            "kube-apiserver /readyz to answer 200",
            || {
                let probe = probe.clone();
                async move {
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    Ok(probe.request_text(req).await.ok().map(|_| ()))
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Writes a key of etcd's own, outside the API server's prefix, so that etcd's
    /// revision moves on: an API server started after this cannot serve a watch from
    /// a resource version seen before it (the client gets `410 Gone` and lists again).
    /// Returns the new revision.
    pub async fn advance_etcd_revision(&self) -> Result<u64> {
        let url = format!("http://127.0.0.1:{}/v3/kv/put", self.etcd_port);
        let body = serde_json::json!({
            "key": BASE64.encode("/chatgate-tests/revision"),
            "value": BASE64.encode(format!("{:?}", Instant::now())),
        });
        let answer: serde_json::Value = reqwest::Client::new()
            .post(&url)
            .json(&body)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("writing a key through etcd's gateway ({url})"))?
            .json()
            .await?;
        answer["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| anyhow!("etcd's put answer has no revision: {answer}"))
    }

    fn with_process<T>(
        &self,
        name: &str,
        act: impl FnOnce(&mut ManagedProcess) -> Result<T>,
    ) -> Result<T> {
        let mut processes = self.lock_processes();
        let process = processes
            .iter_mut()
            .find(|p| p.name() == name)
            .ok_or_else(|| anyhow!("this control plane runs no process named {name}"))?;
        act(process)
    }

    fn lock_processes(&self) -> MutexGuard<'_, Vec<ManagedProcess>> {
        self.processes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The user name Kubernetes gives service account `namespace/name`.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

fn logs_report(processes: &[ManagedProcess], lines: usize) -> String {
    let mut out = String::new();
    for p in processes {
        out.push_str(&format!(
            "----- {} (pid {}, last {lines} lines of {}) -----\n{}\n",
            p.name(),
            p.pid(),
            p.log_path().display(),
            p.log_tail(lines)
        ));
    }
    out
}

/// Removes working directories of earlier runs whose process is gone (a run
/// killed by a signal cannot clean up after itself; its children died with it).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A start in progress: owns what has been started so far, and undoes it when
/// dropped before being handed to a [`ControlPlane`].
struct Starting {
    dir: PathBuf,
    processes: Vec<ManagedProcess>,
    handed_over: bool,
}

struct Ready {
    kubeconfig_path: PathBuf,
    server: String,
    etcd_port: u16,
    ca: CertificateAuthority,
    admin_config: Config,
    fake_nodes: Vec<String>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        // Only a failed start gets here still owning its directory: a successful
        // one handed processes and directory to its `ControlPlane`.
        if self.handed_over {
            return;
        }
        while let Some(mut p) = self.processes.pop() {
            p.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Starting {
    async fn run(&mut self, options: &ControlPlaneOptions, bin: &Path) -> Result<Ready> {
        let dir = &self.dir.clone();
        let [etcd_port, etcd_peer_port, api_port, kcm_port, sched_port]: [u16; 5] =
            free_loopback_ports(5)?
                .try_into()
                .map_err(|_| anyhow!("five ports"))?;
        let server = format!("https://127.0.0.1:{api_port}");

        // Certificates and keys, fresh for this start.
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        let ca = CertificateAuthority::generate("chatgate-test-ca")?;
        let serving = ca.issue_server(
            "kube-apiserver",
            &[
                "127.0.0.1",
                "localhost",
                "10.96.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )?;
        let admin = ca.issue_client(ADMIN_USER, &["system:masters"])?;
        let sa_key = ServiceAccountKey::generate()?;
        let ca_crt = write(&pki, "ca.crt", ca.cert_pem())?;
        let ca_key = write(&pki, "ca.key", &ca.key_pem())?;
        let serving_crt = write(&pki, "apiserver.crt", &serving.cert_pem)?;
        let serving_key = write(&pki, "apiserver.key", &serving.key_pem)?;
        let sa_private = write(&pki, "sa.key", &sa_key.private_pem)?;
        let sa_public = write(&pki, "sa.pub", &sa_key.public_pem)?;

        let admin_kubeconfig = kubeconfig(&server, ca.cert_pem(), &admin.cert_pem, &admin.key_pem);
        let kubeconfig_yaml =
            serde_norway::to_string(&admin_kubeconfig).context("writing the kubeconfig")?;
        let kubeconfig_path = write(dir, "kubeconfig", &kubeconfig_yaml)?;
        let admin_config =
            Config::from_custom_kubeconfig(admin_kubeconfig, &KubeConfigOptions::default())
                .await
                .context("reading the generated kubeconfig")?;

        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let arg = |k: &str, v: &dyn AsRef<std::ffi::OsStr>| {
            let mut s = std::ffi::OsString::from(format!("--{k}="));
            s.push(v.as_ref());
            s
        };

        // etcd
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args([
            arg("data-dir", &dir.join("etcd")),
            arg("listen-client-urls", &etcd_url),
            arg("advertise-client-urls", &etcd_url),
            arg("listen-peer-urls", &peer_url),
            arg("initial-advertise-peer-urls", &peer_url),
            arg("initial-cluster", &format!("default={peer_url}")),
            arg("unsafe-no-fsync", &"true"),
            arg("log-level", &"warn"),
        ]);
        self.spawn(ETCD, etcd, &logs)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        self.until(deadline, "etcd /health to answer 200", || async {
            Ok(http_get_ok(etcd_port, "/health").await.then_some(()))
        })
        .await?;

        // kube-apiserver
        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        apiserver.args([
            arg("etcd-servers", &etcd_url),
            arg("cert-dir", &dir.join("apiserver-certs")),
            arg("tls-cert-file", &serving_crt),
            arg("tls-private-key-file", &serving_key),
            arg("client-ca-file", &ca_crt),
            arg("secure-port", &api_port.to_string()),
            arg("bind-address", &"127.0.0.1"),
            arg("advertise-address", &"127.0.0.1"),
            // Endpoints may not point at loopback; nothing in-cluster dials the API.
            arg("endpoint-reconciler-type", &"none"),
            arg("service-cluster-ip-range", &"10.96.0.0/16"),
            arg("allow-privileged", &"true"),
            arg("authorization-mode", &"Node,RBAC"),
            arg("service-account-issuer", &format!("{server}/")),
            arg("service-account-key-file", &sa_public),
            arg("service-account-signing-key-file", &sa_private),
            // PodSecurity and ServiceAccount are in the default admission set;
            // named here so the intent survives a change of defaults.
            arg("enable-admission-plugins", &"PodSecurity,ServiceAccount"),
        ]);
        self.spawn(KUBE_APISERVER, apiserver, &logs)?;
        let probe = Client::try_from(admin_config.clone())?;
        self.until(deadline, "kube-apiserver /readyz to answer 200", || {
            let probe = probe.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(probe.request_text(req).await.ok().map(|_| ()))
            }
        })
        .await?;
        let namespaces: Api<Namespace> = Api::all(probe.clone());
        self.until(deadline, "namespace `default` to exist", || {
            let namespaces = namespaces.clone();
            async move { Ok(namespaces.get_opt("default").await?.map(|_| ())) }
        })
        .await?;

        // kube-controller-manager: Deployments → ReplicaSets → Pods, garbage
        // collection, service-account tokens, namespace deletion.
        let mut kcm = Command::new(bin.join("kube-controller-manager"));
        kcm.args([
            arg("kubeconfig", &kubeconfig_path),
            arg("bind-address", &"127.0.0.1"),
            arg("secure-port", &kcm_port.to_string()),
            arg("leader-elect", &"false"),
            arg("controllers", &"*"),
            arg("use-service-account-credentials", &"true"),
            arg("root-ca-file", &ca_crt),
            arg("service-account-private-key-file", &sa_private),
            arg("cluster-signing-cert-file", &ca_crt),
            arg("cluster-signing-key-file", &ca_key),
            // Its client's default rate limit (20 requests/s, bursts of 30) is sized
            // for sharing a production API server; here it is the only heavy client of
            // a test one, and at 500 Deployments at once that limit alone held each
            // Deployment's status back by up to 52 s (`make bench-operator`), so the
            // benchmark measured the simulated cluster instead of the operator.
            arg("kube-api-qps", &KCM_API_QPS.to_string()),
            arg("kube-api-burst", &KCM_API_BURST.to_string()),
        ]);
        self.spawn("kube-controller-manager", kcm, &logs)?;

        let mut scheduler = Command::new(bin.join("kube-scheduler"));
        scheduler.args([
            arg("kubeconfig", &kubeconfig_path),
            arg("bind-address", &"127.0.0.1"),
            arg("secure-port", &sched_port.to_string()),
            arg("leader-elect", &"false"),
        ]);
        self.spawn("kube-scheduler", scheduler, &logs)?;

        // kwok: the kubelets of the fake nodes, and only of those.
        let stages = bins::kwok_stages_dir();
        let mut kwok = Command::new(bin.join("kwok"));
        kwok.env("KWOK_WORKDIR", dir.join("kwok")).args([
            arg("kubeconfig", &kubeconfig_path),
            arg("manage-all-nodes", &"false"),
            arg(
                "manage-nodes-with-annotation-selector",
                &format!("{KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}"),
            ),
            arg("node-lease-duration-seconds", &"40"),
        ]);
        for stage in bins::KWOK_STAGES {
            kwok.arg(arg("config", &stages.join(stage)));
        }
        self.spawn("kwok", kwok, &logs)?;

        let nodes: Api<Node> = Api::all(probe.clone());
        let mut fake_nodes = Vec::new();
        for i in 0..options.fake_nodes {
            let name = format!("kwok-node-{i}");
            nodes
                .create(&PostParams::default(), &fake_node(&name))
                .await
                .with_context(|| format!("creating fake node {name}"))?;
            fake_nodes.push(name);
        }
        for name in &fake_nodes {
            let left = deadline.saturating_duration_since(Instant::now());
            self.check_alive()?;
            wait_for(&nodes, name, left, node_schedulable)
                .await
                .map_err(|e: WaitError| anyhow!(e))
                .with_context(|| {
                    format!("fake node {name} never became Ready (is kwok running?)")
                })?;
        }
        self.check_alive()?;

        Ok(Ready {
            kubeconfig_path,
            server,
            etcd_port,
            ca,
            admin_config,
            fake_nodes,
        })
    }

    fn spawn(&mut self, name: &str, command: Command, logs: &Path) -> Result<()> {
        let p = ManagedProcess::spawn(name, command, &logs.join(format!("{name}.log")))?;
        self.processes.push(p);
        Ok(())
    }

    /// Fails when any started process has exited: no point waiting for it then.
    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.processes {
            if let Some(status) = p.exit_status() {
                bail!(
                    "{} exited early ({status}); see {}",
                    p.name(),
                    p.log_path().display()
                );
            }
        }
        Ok(())
    }

    async fn until<F, Fut>(&mut self, deadline: Instant, what: &str, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<()>>>,
    {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let processes = &mut self.processes;
        wait_until(timeout, what, || {
            let dead = processes.iter_mut().find_map(|p| {
                p.exit_status()
                    .map(|s| format!("{} exited early ({s})", p.name()))
            });
            let fut = probe();
            async move {
                if let Some(dead) = dead {
                    return Err(anyhow!(dead));
                }
                fut.await
            }
        })
        .await
        .map_err(anyhow::Error::from)
    }
}

fn write(dir: &Path, name: &str, content: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Name of the cluster, the user's context and the current context in the kubeconfig.
const KUBECONFIG_CONTEXT: &str = "chatgate-local";

/// A kubeconfig for the admin, with every credential inline so the file can be
/// copied anywhere.
fn kubeconfig(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Kubeconfig {
    Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        clusters: vec![NamedCluster {
            name: KUBECONFIG_CONTEXT.into(),
            cluster: Some(Cluster {
                server: Some(server.into()),
                certificate_authority_data: Some(BASE64.encode(ca_pem)),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: ADMIN_USER.into(),
            auth_info: Some(AuthInfo {
                client_certificate_data: Some(BASE64.encode(cert_pem)),
                client_key_data: Some(BASE64.encode(key_pem).into()),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: KUBECONFIG_CONTEXT.into(),
            context: Some(KubeContext {
                cluster: KUBECONFIG_CONTEXT.into(),
                user: Some(ADMIN_USER.into()),
                namespace: Some("default".into()),
                ..KubeContext::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(KUBECONFIG_CONTEXT.into()),
        ..Kubeconfig::default()
    }
}

/// A node for kwok to manage: annotated so kwok picks it up, labelled for
/// selectors, with room for plenty of pods.
fn fake_node(name: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {
                KWOK_NODE_LABEL.0: KWOK_NODE_LABEL.1,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "status": {
            "allocatable": { "cpu": "32", "memory": "256Gi", "pods": "110" },
            "capacity": { "cpu": "32", "memory": "256Gi", "pods": "110" },
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": format!("v{K8S_VERSION}-kwok"),
                "kubeProxyVersion": "",
                "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
                "machineID": "", "osImage": "", "systemUUID": "",
            },
        },
    }))
    .expect("a valid Node")
}

/// Ready, and without the NoSchedule taints a node carries until the node
/// controller has seen it Ready — so the scheduler will place pods on it.
fn node_schedulable(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.effect == "NoSchedule"));
    ready && !tainted
}

/// `GET http://127.0.0.1:<port><path>` answered 200 within 2 s.
async fn http_get_ok(port: u16, path: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), crate::http::get_local(port, path)).await,
        Ok(Ok((200, _)))
    )
}

/// The shared, per-test-binary control plane.
mod shared {
    use super::*;
    use tokio::sync::OnceCell;

    static SHARED: OnceCell<Result<ControlPlane, String>> = OnceCell::const_new();

    pub(super) async fn get() -> Result<&'static ControlPlane, &'static str> {
        let result = SHARED
            .get_or_init(|| async {
                let started = Instant::now();
                let result = ControlPlane::start(ControlPlaneOptions::default())
                    .await
                    .map_err(|e| format!("{e:#}"));
                if let Ok(cp) = &result {
                    install_exit_hooks();
                    crate::progress(&format!(
                        "control plane ready at {} in {:.1}s (kubeconfig {})",
                        cp.server_url(),
                        started.elapsed().as_secs_f64(),
                        cp.kubeconfig_path().display()
                    ));
                }
                result
            })
            .await;
        result.as_ref().map_err(|e| e.as_str())
    }

    /// A static is never dropped, so the shared control plane is stopped from
    /// `atexit` (the test harness exits through `exit`, also when tests failed);
    /// and a panic prints every process's log tail into the failing test's output.
    fn install_exit_hooks() {
        extern "C" fn stop_shared() {
            if let Some(Ok(cp)) = SHARED.get() {
                cp.kill_now();
            }
        }
        // SAFETY: registering a plain `extern "C"` function.
        unsafe {
            libc::atexit(stop_shared);
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if let Some(Ok(cp)) = SHARED.get() {
                eprintln!(
                    "chatgate-tests: control plane logs at the time of the panic:\n{}",
                    cp.logs(LOG_TAIL_LINES)
                );
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_carries_the_server_and_inline_credentials() {
        // Round-trip through the file format, as kubectl and helm read it.
        let yaml =
            serde_norway::to_string(&kubeconfig("https://127.0.0.1:6443", "CA", "CERT", "KEY"))
                .unwrap();
        let parsed = Kubeconfig::from_yaml(&yaml).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(
            cluster.certificate_authority_data.as_deref(),
            Some(BASE64.encode("CA").as_str())
        );
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            user.client_certificate_data.as_deref(),
            Some(BASE64.encode("CERT").as_str())
        );
        assert_eq!(parsed.current_context.as_deref(), Some("chatgate-local"));
    }

    #[test]
    fn a_fake_node_is_kwok_managed_and_schedulable_only_when_ready_and_untainted() {
        let mut node = fake_node("n");
        let annotations = node.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations[KWOK_NODE_ANNOTATION],
            KWOK_NODE_ANNOTATION_VALUE
        );
        assert_eq!(node.metadata.labels.clone().unwrap()["type"], "kwok");
        assert!(!node_schedulable(&node), "no Ready condition yet");

        node.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(serde_json::json!({ "type": "Ready", "status": "True" }))
                .unwrap(),
        ]);
        node.spec = Some(
            serde_json::from_value(serde_json::json!({
                "taints": [{ "key": "node.kubernetes.io/not-ready", "effect": "NoSchedule" }],
            }))
            .unwrap(),
        );
        assert!(!node_schedulable(&node), "still tainted");

        node.spec = None;
        assert!(node_schedulable(&node));
    }
}
