//! Starting a control plane: its PKI and working directory, then etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok, each waited for, everything
//! undone if any step fails.

use super::*;

/// A start in progress: owns what has been started so far, and undoes it when
/// dropped before being handed to a [`ControlPlane`].
pub(super) struct Starting {
    pub(super) dir: PathBuf,
    pub(super) processes: Vec<ManagedProcess>,
    pub(super) handed_over: bool,
}

pub(super) struct Ready {
    pub(super) kubeconfig_path: PathBuf,
    pub(super) server: String,
    pub(super) etcd_port: u16,
    pub(super) ca: CertificateAuthority,
    pub(super) admin_config: Config,
    pub(super) fake_nodes: Vec<String>,
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
    pub(super) async fn run(&mut self, options: &ControlPlaneOptions, bin: &Path) -> Result<Ready> {
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

/// `GET http://127.0.0.1:<port><path>` answered 200 within 2 s.
pub(super) async fn http_get_ok(port: u16, path: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), crate::http::get_local(port, path)).await,
        Ok(Ok((200, _)))
    )
}
