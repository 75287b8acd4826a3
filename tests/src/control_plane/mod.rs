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

mod kubeconfig;
mod nodes;
mod start;

use kubeconfig::kubeconfig;
use nodes::{fake_node, node_schedulable};
use start::{Starting, http_get_ok};

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

    /// The components it runs, as (name, process id), in start order: what a
    /// benchmark samples to say which process spent the time.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.lock_processes()
            .iter()
            .map(|p| (p.name().to_owned(), p.pid()))
            .collect()
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
