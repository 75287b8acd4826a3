//! `make cluster`: starts a local Kubernetes control plane for a person, prints the
//! `export KUBECONFIG=...` line, and stops everything on Ctrl-C. With a command
//! after `--` it runs that command against the cluster instead and stops the
//! cluster when the command ends (what `make run` uses).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chatgate_tests::{ControlPlane, ControlPlaneOptions, LocalCluster, local};
use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "chatgate-cluster",
    about = "Run a local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)"
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

    if !args.command.is_empty() {
        let mut child = tokio::process::Command::new(&args.command[0]);
        child.args(&args.command[1..]);
        if let Some(path) = &kubeconfig {
            child.env("KUBECONFIG", path);
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
        eprintln!(
            "chatgate-cluster: logs in {}/logs; press Ctrl-C to stop",
            cp.dir().display()
        );
        shutdown.requested().await;
        eprintln!("chatgate-cluster: stopping");
        drop(cluster);
    }
    Ok(ExitCode::SUCCESS)
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
