//! `make cluster`: starts the local platform for a person — a Kubernetes control
//! plane, and with `--run-pods` a node whose Pods run as real processes from
//! chatgate's images, with `--route` a router playing kube-proxy for a Service —
//! prints the `export KUBECONFIG=...` line, and stops everything on Ctrl-C. With a
//! command after `--` it runs that command against the cluster instead and stops
//! the cluster when the command ends (what `make run` uses).

use std::path::PathBuf;
use std::process::ExitCode;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chatgate_tests::image::{Images, workspace_root};
use chatgate_tests::router::Router;
use chatgate_tests::tokens::Signer;
use chatgate_tests::{ControlPlane, ControlPlaneOptions, LocalCluster, NodeAgent, Postgres, local};
use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "chatgate-cluster",
    about = "Run a local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok), optionally with a node that runs Pods as real processes and a router in front of a Service"
)]
struct Args {
    /// Use the cluster the current kubeconfig points at when it answers, and start
    /// one only when it does not.
    #[arg(long)]
    reuse_existing: bool,
    /// Also copy the kubeconfig here, for a path that stays the same across runs.
    #[arg(long, value_name = "PATH")]
    kubeconfig_out: Option<PathBuf>,
    /// How many kwok-managed fake nodes to create.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Also register node `chatgate-node-0`, whose kubelet runs each Pod bound to it
    /// as a real process from chatgate's images (built into target/images first),
    /// with its probes, restarts, preStop and termination messages. With
    /// `--nodes 0` every Pod runs for real.
    #[arg(long)]
    run_pods: bool,
    /// Also start a PostgreSQL server on loopback (from the binaries
    /// `hack/postgres.sh` finds) with database `chat`; its URL is printed and given
    /// to the command as CHATGATE_DEMO_DATABASE_URL.
    #[arg(long)]
    postgres: bool,
    /// Route new connections on ADDRESS (loopback) to the ready endpoints of Service
    /// NAMESPACE/NAME, as kube-proxy does. May be repeated.
    #[arg(long, value_name = "NAMESPACE/NAME=ADDRESS")]
    route: Vec<String>,
    /// Print a bearer token for USER, signed (HS256) with the secret in
    /// $CHATGATE_JWT_SECRET for issuer `https://issuer.example` and audience
    /// `chatgate`, valid for a day, and exit.
    #[arg(long, value_name = "USER")]
    token_for: Option<String>,
    /// A command to run with KUBECONFIG set; the cluster stops when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chatgate-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    if let Some(user) = &args.token_for {
        let secret = std::env::var("CHATGATE_JWT_SECRET")
            .map_err(|_| anyhow!("--token-for needs the signing secret in CHATGATE_JWT_SECRET"))?;
        println!(
            "{}",
            Signer::Secret(secret).token(user, Duration::from_secs(24 * 3600))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let routes = args
        .route
        .iter()
        .map(|r| parse_route(r))
        .collect::<Result<Vec<_>>>()?;
    // Listen before starting anything: a Ctrl-C during the start must stop what
    // has been started, not kill this process and leave the rest to the kernel.
    let mut shutdown = Shutdown::listen()?;
    let cluster = tokio::select! {
        cluster = start_or_reuse(&args) => cluster?,
        _ = shutdown.requested() => {
            eprintln!("chatgate-cluster: interrupted while starting; stopped what had started");
            return Ok(ExitCode::from(130));
        }
    };

    if let (Some(out), Some(path)) = (&args.kubeconfig_out, cluster.kubeconfig_path()) {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&path, out)
            .with_context(|| format!("copying the kubeconfig to {}", out.display()))?;
    }
    let kubeconfig = args
        .kubeconfig_out
        .clone()
        .or_else(|| cluster.kubeconfig_path());
    let node = match (&cluster, args.run_pods) {
        (LocalCluster::Started(cp), true) => Some(platform_node(cp).await?),
        (LocalCluster::Existing(_), true) => {
            eprintln!(
                "chatgate-cluster: --run-pods applies to a started control plane; the existing cluster's own nodes run the Pods"
            );
            None
        }
        (_, false) => None,
    };
    let started = matches!(cluster, LocalCluster::Started(_));
    if !started && (args.postgres || !routes.is_empty()) {
        eprintln!(
            "chatgate-cluster: --postgres and --route apply to a started control plane; the existing cluster's own network and databases serve it"
        );
    }
    let database = if args.postgres && started {
        let postgres = tokio::task::spawn_blocking(Postgres::start)
            .await
            .context("starting PostgreSQL")??;
        let url = postgres.create_database("chat")?;
        eprintln!(
            "chatgate-cluster: PostgreSQL on 127.0.0.1:{}",
            postgres.port()
        );
        Some((postgres, url))
    } else {
        None
    };
    let mut routers = Vec::new();
    for (namespace, service, address) in routes.iter().filter(|_| started) {
        let router = Router::start(cluster.client()?, namespace, service, *address).await?;
        eprintln!(
            "chatgate-cluster: routing {} to the ready endpoints of Service {namespace}/{service}",
            router.address()
        );
        routers.push(router);
    }

    if !args.command.is_empty() {
        let mut child = tokio::process::Command::new(&args.command[0]);
        child.args(&args.command[1..]);
        if let Some(path) = &kubeconfig {
            child.env("KUBECONFIG", path);
        }
        if let Some((_, url)) = &database {
            child.env("CHATGATE_DEMO_DATABASE_URL", url);
        }
        if let Some(router) = routers.first() {
            child.env("CHATGATE_ROUTER", router.address().to_string());
        }
        let mut child = child
            .spawn()
            .with_context(|| format!("starting {}", args.command.join(" ")))?;
        let status = tokio::select! {
            status = child.wait() => status?,
            _ = shutdown.requested() => {
                // The command shares our terminal and got the same Ctrl-C; give it
                // the chance to exit on its own before the cluster goes away.
                child.wait().await?
            }
        };
        // Pods and routers first: they talk to the control plane until they stop.
        drop((routers, node, database));
        drop(cluster);
        return Ok(ExitCode::from(
            status.code().unwrap_or(1).clamp(0, 255) as u8
        ));
    }

    if let LocalCluster::Started(cp) = &cluster {
        println!(
            "export KUBECONFIG={}",
            kubeconfig
                .expect("started clusters have a kubeconfig")
                .display()
        );
        eprintln!(
            "chatgate-cluster: Kubernetes v{} at {} ready in {:.1}s; nodes: {}; binaries in {}",
            chatgate_tests::K8S_VERSION,
            cp.server_url(),
            cp.started_in().as_secs_f64(),
            cp.fake_nodes().join(", "),
            cp.bin_dir().display()
        );
        if let Some((_, url)) = &database {
            println!("export CHATGATE_DEMO_DATABASE_URL={url}");
        }
        eprintln!(
            "chatgate-cluster: logs in {}/logs; press Ctrl-C to stop",
            cp.dir().display()
        );
        shutdown.requested().await;
        eprintln!("chatgate-cluster: stopping");
        drop((routers, node, database));
        drop(cluster);
    }
    Ok(ExitCode::SUCCESS)
}

/// The untainted node whose Pods run as processes, from images built first.
async fn platform_node(cp: &ControlPlane) -> Result<NodeAgent> {
    // The binaries next to this one (`make run` and `make cluster` build them
    // together), so the platform needs no second build.
    let binaries = std::env::current_exe()?
        .parent()
        .map(std::path::Path::to_path_buf)
        .context("the directory of chatgate-cluster")?;
    let out = workspace_root().join("target/images");
    let images = tokio::task::spawn_blocking(move || Images::build(&out, Some(&binaries)))
        .await
        .context("building the images")??;
    let agent = NodeAgent::start_open(cp, "chatgate-node-0", images).await?;
    eprintln!(
        "chatgate-cluster: node {} runs Pods as processes (logs under {})",
        agent.node().name,
        cp.dir().display()
    );
    Ok(agent)
}

/// `NAMESPACE/NAME=ADDRESS` → its parts; the address must be on loopback.
fn parse_route(route: &str) -> Result<(String, String, SocketAddr)> {
    let shape = || {
        format!(
            "--route {route}: expected NAMESPACE/NAME=ADDRESS, such as default/chat-dev=127.0.0.1:8080"
        )
    };
    let (service, address) = route.split_once('=').ok_or_else(|| anyhow!(shape()))?;
    let (namespace, name) = service.split_once('/').ok_or_else(|| anyhow!(shape()))?;
    let address: SocketAddr = address.parse().map_err(|_| anyhow!(shape()))?;
    if !address.ip().is_loopback() {
        bail!("--route {route}: the router listens on loopback only; use 127.0.0.1:PORT");
    }
    Ok((namespace.to_owned(), name.to_owned(), address))
}

async fn start_or_reuse(args: &Args) -> Result<LocalCluster> {
    if args.reuse_existing
        && let Some(config) = local::reachable_cluster().await
    {
        eprintln!(
            "chatgate-cluster: using the reachable cluster at {}",
            config.cluster_url
        );
        return Ok(LocalCluster::Existing(Box::new(config)));
    }
    eprintln!("chatgate-cluster: starting a local control plane");
    let cp = ControlPlane::start(ControlPlaneOptions {
        fake_nodes: args.nodes,
    })
    .await?;
    Ok(LocalCluster::Started(Box::new(cp)))
}

/// Ctrl-C (SIGINT) or SIGTERM, whichever comes first. The handlers are installed
/// when this is made, so a signal is never lost to the default action.
struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
}

impl Shutdown {
    fn listen() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_route;

    #[test]
    fn a_route_names_its_namespace_service_and_loopback_address() {
        let (ns, name, address) = parse_route("default/chat-dev=127.0.0.1:8080").unwrap();
        assert_eq!((ns.as_str(), name.as_str()), ("default", "chat-dev"));
        assert_eq!(address.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn a_malformed_or_non_loopback_route_is_refused_with_the_expected_shape() {
        for bad in [
            "chat-dev=127.0.0.1:8080",
            "default/chat-dev",
            "default/chat=nowhere",
        ] {
            let e = parse_route(bad).unwrap_err().to_string();
            assert!(e.contains("expected NAMESPACE/NAME=ADDRESS"), "{bad}: {e}");
        }
        let e = parse_route("default/chat=10.0.0.1:80")
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback only"), "{e}");
    }
}
